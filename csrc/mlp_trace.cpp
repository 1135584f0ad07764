// The fused CNF trace op: an MLP vector field f(z, t) and the trace of df/dz in one pass.
//
// Forward-mode tangents ride along the primal: for each layer the B primal rows and the m * B
// tangent rows (one block per probe; the d basis vectors for the exact trace) are stacked into one
// [(1 + m) B, H] matrix and multiplied by the layer's weight in ONE GEMM (float: tiles of oneDNN's brgemm
// micro-kernel, see gemm_nn; the bias is added to the primal rows only). One vectorized pass then maps the
// primal rows to sigma(a) and the tangent rows to sigma'(a) * a_dot (sigma' evaluated once per primal element, not per probe). At the
// output, tr = scale * sum(eps * f_dot) (exact: the diagonal of the basis tangents).
//
// Backward (analytic, first order through both streams): per layer one stacked GEMM for the input
// gradient (G W) and one for the weight gradient (G^T X), and one vectorized pass that recomputes
// X from the saved pre-activations and turns the input gradient into the pre-activation gradient:
//   G_a = gX_a sigma'(a) + sigma''(a) sum_k gX_k a_dot_k,   G_k = gX_k sigma'(a).
// The registered fwd/bwd pair saves only the stacked hidden pre-activations (one flat buffer, also the op's
// third output; its layout is private to the pair): for tanh the primal rows hold tanh(a) instead, and the
// exact trace's first-layer tangent rows (W's columns, the same for every sample) are not stored. The eager
// autograd node keeps wide fields' layer outputs instead and frees them during the backward (see wide_fwd).
//
// The Python side (flowops/ops/mlp_trace.py) adds the fake kernels, the Python autograd formula used
// under torch.compile, and the CUDA implementation (torch GEMMs + Triton elementwise kernels).
#include "flowops.h"
#include "gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>


#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <vector>

namespace flowops {
namespace {

using at::vec::Vectorized;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class Act : int { TANH = 0, SOFTPLUS = 1, SILU = 2 };

Act parse_act(c10::string_view name) {
  if (name == "tanh") return Act::TANH;
  if (name == "softplus") return Act::SOFTPLUS;
  if (name == "silu") return Act::SILU;
  TORCH_CHECK_VALUE(false, "flowops.mlp_trace: activation must be 'tanh', 'softplus' or 'silu', got '",
                    std::string(name), "'");
}

void check(const at::Tensor& z, const at::Tensor& t, at::TensorList weights, at::TensorList biases,
           const std::optional<at::Tensor>& eps) {
  TORCH_CHECK_VALUE(z.dim() == 2 && z.size(1) >= 1, "flowops.mlp_trace: z must be [batch, features], got ",
                    z.sizes());
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
                   "flowops.mlp_trace (cpu): z must be float32 or float64, got ", z.scalar_type());
  const int64_t B = z.size(0), d = z.size(1);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, "flowops.mlp_trace: t must be [", B, "], got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == z.scalar_type(), "flowops.mlp_trace: t must have z's dtype");
  TORCH_CHECK_VALUE(!weights.empty() && weights.size() == biases.size(),
                    "flowops.mlp_trace: need one bias per weight and at least one layer");
  int64_t width = d + 1;
  for (size_t l = 0; l < weights.size(); ++l) {
    TORCH_CHECK_VALUE(weights[l].dim() == 2 && weights[l].size(1) == width && biases[l].dim() == 1 &&
                          biases[l].size(0) == weights[l].size(0),
                      "flowops.mlp_trace: layer ", l, " weight ", weights[l].sizes(), " / bias ", biases[l].sizes(),
                      " does not chain from width ", width);
    TORCH_CHECK_TYPE(weights[l].scalar_type() == z.scalar_type() && biases[l].scalar_type() == z.scalar_type(),
                     "flowops.mlp_trace: parameters must have z's dtype");
    width = weights[l].size(0);
  }
  TORCH_CHECK_VALUE(width == d, "flowops.mlp_trace: the last layer must output ", d, " values, got ", width);
  if (eps.has_value() && eps->defined()) {
    TORCH_CHECK_VALUE(eps->dim() == 3 && eps->size(0) >= 1 && eps->size(1) == B && eps->size(2) == d,
                      "flowops.mlp_trace: eps must be [probes, ", B, ", ", d, "], got ", eps->sizes());
    TORCH_CHECK_TYPE(eps->scalar_type() == z.scalar_type(), "flowops.mlp_trace: eps must have z's dtype");
  }
}

// tanh without Sleef's tanh (several times slower than its exp on AVX-512): for |a| < 0.625 the odd
// minimax polynomial of Cephes' tanhf, above it 1 - 2 / (exp(2|a|) + 1) with the sign restored; about
// 2 ulp in float32. float64 keeps the library tanh.
template <typename T>
inline Vectorized<T> fast_tanh(const Vectorized<T>& a) {
  if constexpr (std::is_same_v<T, float>) {
    using Vec = Vectorized<float>;
    const Vec one(1.f), two(2.f);
    const Vec x = a.abs();
    const Vec z = a * a;
    Vec p = at::vec::fmadd(Vec(-5.70498872745e-3f), z, Vec(2.06390887954e-2f));
    p = at::vec::fmadd(p, z, Vec(-5.37397155531e-2f));
    p = at::vec::fmadd(p, z, Vec(1.33314422036e-1f));
    p = at::vec::fmadd(p, z, Vec(-3.33332819422e-1f));
    const Vec small = at::vec::fmadd(p * z, a, a);
    const Vec e = at::vec::minimum(x * two, Vec(88.f)).exp();
    Vec big = one - two / (e + one);
    big = Vec::blendv(big, big.neg(), a < Vec(0.f));
    return Vec::blendv(big, small, x < Vec(0.625f));
  } else {
    return a.tanh();
  }
}

// sigma(a), sigma'(a), sigma''(a), vectorized.
template <typename T>
inline void derivs(const Vectorized<T>& a, Act act, Vectorized<T>& h, Vectorized<T>& s1, Vectorized<T>& s2) {
  using Vec = Vectorized<T>;
  const Vec one(T(1));
  if (act == Act::TANH) {
    h = fast_tanh(a);
    s1 = one - h * h;
    s2 = Vec(T(-2)) * h * s1;
    return;
  }
  const Vec e = a.abs().neg().exp();
  const Vec inv = one / (one + e);
  const Vec sg = Vec::blendv(e * inv, inv, a >= Vec(T(0)));  // sigmoid without overflow
  const Vec ds = sg * (one - sg);
  if (act == Act::SOFTPLUS) {
    h = at::vec::maximum(a, Vec(T(0))) + e.log1p();
    s1 = sg;
    s2 = ds;
  } else {
    h = a * sg;
    s1 = at::vec::fmadd(a, ds, sg);
    s2 = ds * at::vec::fmadd(a, one - Vec(T(2)) * sg, Vec(T(2)));
  }
}


// Rows stored per sample for hidden layer l: the primal and the m tangents, except the exact trace's
// first layer, whose tangent pre-activations are the columns of W (the same for every sample).
int64_t stored_rows(int64_t l, int64_t m, bool exact) { return l == 0 && exact ? 1 : 1 + m; }

int64_t acts_numel(int64_t B, int64_t m, bool exact, at::TensorList weights) {
  int64_t n = 0;
  for (size_t l = 0; l + 1 < weights.size(); ++l) n += stored_rows(l, m, exact) * B * weights[l].size(0);
  return n;
}

// Samples are processed in chunks of C rows (every chunk runs all layers, forward and backward), so
// the working buffers are chunk-sized and stay in cache; only the saved pre-activations span the batch.
// The saved buffer is chunk-major: layer l's block of chunk c ([(1 + m) C_c, H_l], primal rows first)
// starts at base_l + (1 + m) * b0 * H_l, where b0 is the chunk's first sample.
//
// Narrow fields (widest hidden layer <= kChunkParallelMaxWidth) run the chunks in parallel, one thread
// per run of chunks with single-threaded GEMMs: their GEMMs are too small to split well across threads.
// Each chunk then writes its parameter gradients into a slot of its own and the slots are summed in
// chunk order, so the result does not depend on the number of threads. Wide fields run the chunks one
// after another with multithreaded GEMMs accumulating straight into the gradients.
constexpr int64_t kChunkParallelMaxWidth = 256;
constexpr int64_t kSmallD = 8;  // see fwd_pass / bwd_pass

int64_t chunk_rows(int64_t B, int64_t m, int64_t hmax, int64_t elem) {
  const int64_t target = (128 * 1024) / std::max<int64_t>(1, elem * (1 + m) * std::max<int64_t>(hmax, 1));
  int64_t c = std::max<int64_t>(target, (256 + m) / (1 + m));
  c = (c + 15) / 16 * 16;
  return std::min(std::max<int64_t>(c, 1), std::max<int64_t>(B, 1));
}

struct Plan {
  int64_t B, d, m, L, C, hmax, chunks;
  bool exact, parallel, small;
  Act act;
  std::vector<int64_t> base;  // offset of each hidden layer's region in the saved buffer
};

Plan make_plan(const at::Tensor& z, int64_t m, bool exact, at::TensorList weights, Act act) {
  Plan p{z.size(0), z.size(1), m, static_cast<int64_t>(weights.size()), 0, 1, 0, exact, false, false, act, {}};
  int64_t off = 0;
  for (int64_t l = 0; l + 1 < p.L; ++l) {
    p.base.push_back(off);
    off += stored_rows(l, m, exact) * p.B * weights[l].size(0);
    p.hmax = std::max(p.hmax, weights[l].size(0));
  }
  p.C = chunk_rows(p.B, m, p.hmax, z.element_size());
  p.chunks = p.B == 0 ? 0 : (p.B + p.C - 1) / p.C;
  p.parallel = p.hmax <= kChunkParallelMaxWidth && p.chunks > 1;
  p.small = p.hmax <= kChunkParallelMaxWidth && p.d <= kSmallD && p.L >= 2;
  return p;
}

// Runs fn(c) for every chunk c: in parallel (contiguous runs of chunks per thread, fn's GEMMs then
// single-threaded) or in order.
template <typename F>
void for_chunks(const Plan& p, const F& fn) {
  if (p.parallel) {
    const at::ThreadLocalState state;  // the caller's dispatch state (below autograd) for the workers too
    at::parallel_for(0, p.chunks, 1, [&](int64_t c0, int64_t c1) {
      at::ThreadLocalStateGuard guard(state);
      for (int64_t c = c0; c < c1; ++c) fn(c);
    });
  } else {
    for (int64_t c = 0; c < p.chunks; ++c) fn(c);
  }
}

// Per-thread scratch: one buffer per worker of for_chunks, allocated on first use.
struct Scratch {
  std::vector<at::Tensor> bufs;
  int64_t count, numel;
  at::TensorOptions opts;
  Scratch(int64_t count_, int64_t numel_, at::TensorOptions o) : count(count_), numel(numel_), opts(o) {
    bufs.resize(static_cast<size_t>(std::max(1, at::get_num_threads())) * count);
  }
  at::Tensor get(int64_t i) {
    const size_t slot = static_cast<size_t>(at::in_parallel_region() ? at::get_thread_num() : 0) * count + i;
    if (slot >= bufs.size()) return at::empty({numel}, opts);
    if (!bufs[slot].defined()) bufs[slot] = at::empty({numel}, opts);
    return bufs[slot];
  }
};


// ---- small output dimension: the first and last layers inside the elementwise passes ---------------
// For d <= kSmallD the first layer's products with [z, t] and the probes (K = d + 1) and the last
// layer's product (N = d) are skinny GEMMs that cost more in call overhead than in arithmetic. These
// passes compute them in registers instead: the first hidden layer's pass builds its pre-activations
// from z, t and eps, and its backward pass yields dz, dt and the first layer's parameter gradients
// without storing G; the last hidden layer's pass produces f and the trace, and its backward pass
// starts from grad_f and grad_trace and accumulates the last layer's gradients.

template <typename T>
struct SmallD {
  int64_t B, d, M;
  bool exact;
  T scale;
  const T* z;    // [B, d]
  const T* t;    // [B]
  const T* eps;  // [M, B, d] or null (exact)
  const T* w0t;  // [d + 1, H0]: row i is the first weight's column i (row d: time)
  const T* b0;   // [H0]
  const T* wl;   // [d, Htop]: the last weight
  const T* bl;   // [d]
};

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) s += buf[i];
  return s;
}

// sigma(a), sigma'(a), sigma''(a) from what the forward pass stored in a primal row of P: tanh(a) for tanh
// (its derivatives are polynomials of it), a itself otherwise.
template <typename T>
inline void saved_derivs(const Vectorized<T>& stored, Act act, Vectorized<T>& h, Vectorized<T>& s1,
                         Vectorized<T>& s2) {
  using Vec = Vectorized<T>;
  if (act == Act::TANH) {
    h = stored;
    s1 = Vec(T(1)) - h * h;
    s2 = Vec(T(-2)) * h * s1;
  } else {
    derivs(stored, act, h, s1, s2);
  }
}

// One hidden layer's forward pass over rows [r0, r1) of a chunk of n samples starting at global sample c0.
// P = [a; a_dot_0; ...; a_dot_{M-1}] (rows of H, tangent block k at P + (k + 1) n H); the pass writes
// X[:n] = sigma(a) and X's tangent rows sigma'(a) * a_dot_k, adding `bias` to the primal rows first, and
// rewrites P's primal rows with what the backward reads (tanh(a) for tanh, else the biased a).
// `bcast` (the exact trace's first layer): the tangent rows are not stored, a_dot_k is row k of bcast [M, H]
// for every sample (the basis probe e_k times W) and P holds the primal rows only.
// FIRST (small d): the pre-activations come from z, t (and eps, whose tangent rows go to P) instead of P.
// LAST (small d): X is not written; f and tr get the outputs.
template <typename T, bool FIRST, bool LAST>
void fwd_pass(T* P, T* X, int64_t n, int64_t H, Act act, const T* bias, const T* bcast, const SmallD<T>& s,
              int64_t c0, int64_t r0, int64_t r1, T* f, T* tr) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t M = s.M, d = s.d, N = n * H;
  for (int64_t b = r0; b < r1; ++b) {
    const int64_t gb = c0 + b;
    Vec facc[kSmallD];
    for (int64_t i = 0; i < d; ++i) facc[i] = Vec(T(0));
    Vec tacc(T(0));
    for (int64_t j = 0; j < H; j += V) {
      const int64_t nn = std::min<int64_t>(V, H - j);
      const int64_t o = b * H + j;
      Vec a;
      if constexpr (FIRST) {
        a = Vec::loadu(s.b0 + j, nn);
        for (int64_t i = 0; i < d; ++i) a = at::vec::fmadd(Vec(s.z[gb * d + i]), Vec::loadu(s.w0t + i * H + j, nn), a);
        a = at::vec::fmadd(Vec(s.t[gb]), Vec::loadu(s.w0t + d * H + j, nn), a);
      } else {
        a = Vec::loadu(P + o, nn);
        if (bias != nullptr) a = a + Vec::loadu(bias + j, nn);
      }
      Vec h, s1, s2;
      derivs(a, act, h, s1, s2);
      if (act == Act::TANH) {
        h.store(P + o, nn);
      } else if (FIRST || bias != nullptr) {
        a.store(P + o, nn);
      }
      if constexpr (LAST) {
        for (int64_t i = 0; i < d; ++i) facc[i] = at::vec::fmadd(h, Vec::loadu(s.wl + i * H + j, nn), facc[i]);
      } else {
        h.store(X + o, nn);
      }
      for (int64_t k = 1; k <= M; ++k) {
        Vec ad;
        if (bcast != nullptr) {
          ad = Vec::loadu(bcast + (k - 1) * H + j, nn);
        } else if (FIRST) {
          const T* e = s.eps + ((k - 1) * s.B + gb) * d;
          ad = Vec(T(0));
          for (int64_t i = 0; i < d; ++i) ad = at::vec::fmadd(Vec(e[i]), Vec::loadu(s.w0t + i * H + j, nn), ad);
          ad.store(P + k * N + o, nn);
        } else {
          ad = Vec::loadu(P + k * N + o, nn);
        }
        const Vec xt = s1 * ad;
        if constexpr (LAST) {
          if (s.exact) {
            tacc = at::vec::fmadd(xt, Vec::loadu(s.wl + (k - 1) * H + j, nn), tacc);
          } else {
            const T* e = s.eps + ((k - 1) * s.B + gb) * d;
            Vec u(T(0));
            for (int64_t i = 0; i < d; ++i) u = at::vec::fmadd(Vec(e[i]), Vec::loadu(s.wl + i * H + j, nn), u);
            tacc = at::vec::fmadd(xt, u, tacc);
          }
        } else {
          xt.store(X + k * N + o, nn);
        }
      }
    }
    if constexpr (LAST) {
      for (int64_t i = 0; i < d; ++i) f[gb * d + i] = s.bl[i] + hsum(facc[i]);
      tr[gb] = s.scale * hsum(tacc);
    }
  }
}

// One hidden layer's backward pass over rows [r0, r1): in place on gX, which becomes G, the pre-activation
// gradient (G_a = gX_a sigma'(a) + sigma''(a) sum_k gX_k a_dot_k, G_k = gX_k sigma'(a)); X receives the
// recomputed activations for the weight gradient. `bcast` as in fwd_pass.
// TOP (small d, the last hidden layer): gX comes from grad_f / grad_trace through the last weight (computed
// here, gX is not read), the last layer's weight gradient is accumulated into gwl [d, H], X is not written
// and G goes to G_out. BOTTOM (small d, the first hidden layer): G is not written; dz and dt go to gz / gt and
// the first layer's gradients are accumulated into gw0 [d + 1, H] (transposed) and gb0 [H].
template <typename T, bool TOP, bool BOTTOM>
void bwd_pass(T* gX, const T* P, T* X, T* G_out, int64_t n, int64_t H, Act act, const T* bcast,
              const SmallD<T>& s, int64_t c0, int64_t r0, int64_t r1, const T* gf, const T* gtr, T* gwl, T* gw0,
              T* gb0, T* gz, T* gt) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t M = s.M, d = s.d, N = n * H;
  for (int64_t b = r0; b < r1; ++b) {
    const int64_t gb = c0 + b;
    Vec zacc[kSmallD + 1];
    if constexpr (BOTTOM) {
      for (int64_t i = 0; i <= d; ++i) zacc[i] = Vec(T(0));
    }
    for (int64_t j = 0; j < H; j += V) {
      const int64_t nn = std::min<int64_t>(V, H - j);
      const int64_t o = b * H + j;
      Vec h, s1, s2;
      saved_derivs(Vec::loadu(P + o, nn), act, h, s1, s2);
      Vec gp;
      if constexpr (TOP) {
        gp = Vec(T(0));
        for (int64_t i = 0; i < d; ++i) {
          const Vec w = Vec::loadu(s.wl + i * H + j, nn);
          gp = at::vec::fmadd(Vec(gf[gb * d + i]), w, gp);
          (at::vec::fmadd(Vec(gf[gb * d + i]), h, Vec::loadu(gwl + i * H + j, nn))).store(gwl + i * H + j, nn);
        }
      } else {
        gp = Vec::loadu(gX + o, nn);
        h.store(X + o, nn);
      }
      Vec cross(T(0));
      for (int64_t k = 1; k <= M; ++k) {
        const int64_t ok = k * N + o;
        const T* e = (TOP || BOTTOM) && !s.exact ? s.eps + ((k - 1) * s.B + gb) * d : nullptr;
        const Vec ad = bcast != nullptr ? Vec::loadu(bcast + (k - 1) * H + j, nn) : Vec::loadu(P + ok, nn);
        const Vec xt = s1 * ad;
        Vec gh;
        if constexpr (TOP) {
          const T g = s.scale * gtr[gb];
          if (s.exact) {
            gh = Vec(g) * Vec::loadu(s.wl + (k - 1) * H + j, nn);
            T* row = gwl + (k - 1) * H + j;
            at::vec::fmadd(Vec(g), xt, Vec::loadu(row, nn)).store(row, nn);
          } else {
            Vec u(T(0));
            for (int64_t i = 0; i < d; ++i) {
              u = at::vec::fmadd(Vec(e[i]), Vec::loadu(s.wl + i * H + j, nn), u);
              T* row = gwl + i * H + j;
              at::vec::fmadd(Vec(g * e[i]), xt, Vec::loadu(row, nn)).store(row, nn);
            }
            gh = Vec(g) * u;
          }
        } else {
          gh = Vec::loadu(gX + ok, nn);
          xt.store(X + ok, nn);
        }
        const Vec gt_k = s1 * gh;
        cross = at::vec::fmadd(gh, ad, cross);
        if constexpr (BOTTOM) {
          if (s.exact) {
            T* row = gw0 + (k - 1) * H + j;
            (Vec::loadu(row, nn) + gt_k).store(row, nn);
          } else {
            for (int64_t i = 0; i < d; ++i) {
              T* row = gw0 + i * H + j;
              at::vec::fmadd(Vec(e[i]), gt_k, Vec::loadu(row, nn)).store(row, nn);
            }
          }
        } else {
          gt_k.store((TOP ? G_out : gX) + ok, nn);
        }
      }
      const Vec g0 = at::vec::fmadd(gp, s1, s2 * cross);
      if constexpr (BOTTOM) {
        for (int64_t i = 0; i < d; ++i) {
          zacc[i] = at::vec::fmadd(g0, Vec::loadu(s.w0t + i * H + j, nn), zacc[i]);
          T* row = gw0 + i * H + j;
          at::vec::fmadd(Vec(s.z[gb * d + i]), g0, Vec::loadu(row, nn)).store(row, nn);
        }
        zacc[d] = at::vec::fmadd(g0, Vec::loadu(s.w0t + d * H + j, nn), zacc[d]);
        T* row = gw0 + d * H + j;
        at::vec::fmadd(Vec(s.t[gb]), g0, Vec::loadu(row, nn)).store(row, nn);
        (Vec::loadu(gb0 + j, nn) + g0).store(gb0 + j, nn);
      } else {
        g0.store((TOP ? G_out : gX) + o, nn);
      }
    }
    if constexpr (BOTTOM) {
      for (int64_t i = 0; i < d; ++i) gz[gb * d + i] = hsum(zacc[i]);
      gt[gb] = hsum(zacc[d]);
    }
  }
}

template <typename T>
SmallD<T> make_small(const at::Tensor& z, const at::Tensor& t, const at::Tensor& eps, const at::Tensor& w0t,
                     const at::Tensor& b0, const at::Tensor& wl, const at::Tensor& bl, int64_t m, bool exact) {
  return SmallD<T>{z.size(0), z.size(1), m, exact, static_cast<T>(exact ? 1.0 : 1.0 / static_cast<double>(m)),
                   z.const_data_ptr<T>(), t.const_data_ptr<T>(), exact ? nullptr : eps.const_data_ptr<T>(),
                   w0t.const_data_ptr<T>(), b0.const_data_ptr<T>(), wl.const_data_ptr<T>(), bl.const_data_ptr<T>()};
}

// A small-d chunk's whole pass, single-threaded (that path runs inside the parallel loop over chunks).
template <typename T>
void fwd_small(bool first, bool last, T* P, T* X, int64_t n, int64_t H, Act act, const T* bias, const T* bcast,
               const SmallD<T>& s, int64_t c0, T* f, T* tr) {
  if (first && last) {
    fwd_pass<T, true, true>(P, X, n, H, act, bias, bcast, s, c0, 0, n, f, tr);
  } else if (first) {
    fwd_pass<T, true, false>(P, X, n, H, act, bias, bcast, s, c0, 0, n, f, tr);
  } else if (last) {
    fwd_pass<T, false, true>(P, X, n, H, act, bias, bcast, s, c0, 0, n, f, tr);
  } else {
    fwd_pass<T, false, false>(P, X, n, H, act, bias, bcast, s, c0, 0, n, f, tr);
  }
}

template <typename T>
void bwd_small(bool top, bool bottom, T* gX, const T* P, T* X, T* G_out, int64_t n, int64_t H, Act act,
               const T* bcast, const SmallD<T>& s, int64_t c0, const T* gf, const T* gtr, T* gwl, T* gw0, T* gb0,
               T* gz, T* gt) {
  if (top && bottom) {
    bwd_pass<T, true, true>(gX, P, X, G_out, n, H, act, bcast, s, c0, 0, n, gf, gtr, gwl, gw0, gb0, gz, gt);
  } else if (top) {
    bwd_pass<T, true, false>(gX, P, X, G_out, n, H, act, bcast, s, c0, 0, n, gf, gtr, gwl, gw0, gb0, gz, gt);
  } else if (bottom) {
    bwd_pass<T, false, true>(gX, P, X, G_out, n, H, act, bcast, s, c0, 0, n, gf, gtr, gwl, gw0, gb0, gz, gt);
  } else {
    bwd_pass<T, false, false>(gX, P, X, G_out, n, H, act, bcast, s, c0, 0, n, gf, gtr, gwl, gw0, gb0, gz, gt);
  }
}

// The generic passes (any d) of one hidden layer over a chunk of B samples, rows in parallel.
inline int64_t row_grain(int64_t M, int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * (1 + M))); }

template <typename T>
SmallD<T> plain_pass(int64_t B, int64_t M) {
  return SmallD<T>{B, 0, M, true, T(1), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
}

template <typename T>
void act_fwd(T* P, T* X, int64_t B, int64_t M, int64_t H, Act act, const T* bias, const T* bcast) {
  const SmallD<T> s = plain_pass<T>(B, M);
  at::parallel_for(0, B, row_grain(M, H), [&](int64_t r0, int64_t r1) {
    fwd_pass<T, false, false>(P, X, B, H, act, bias, bcast, s, 0, r0, r1, nullptr, nullptr);
  });
}

template <typename T>
void act_bwd(T* gX, const T* P, T* X, int64_t B, int64_t M, int64_t H, Act act, const T* bcast) {
  const SmallD<T> s = plain_pass<T>(B, M);
  at::parallel_for(0, B, row_grain(M, H), [&](int64_t r0, int64_t r1) {
    bwd_pass<T, false, false>(gX, P, X, nullptr, B, H, act, bcast, s, 0, r0, r1, nullptr, nullptr, nullptr,
                              nullptr, nullptr, nullptr, nullptr);
  });
}

using namespace blas;  // the GEMMs (csrc/gemm.h)


// The top of the backward for chunk [b0, b0 + n): G = [grad_f; the trace's gradient on the stacked last-layer
// tangent rows] ([(1 + m) n, d]): scale * grad_tr * eps for Hutchinson, grad_tr on the basis rows' diagonal.
void top_grad(at::Tensor G, const at::Tensor& gf, const at::Tensor& gtr, const at::Tensor& eps, bool exact,
              double scale, int64_t b0, int64_t n, int64_t m, int64_t d) {
  G.narrow(0, 0, n).copy_(gf.narrow(0, b0, n));
  auto Gd = G.narrow(0, n, m * n).view({m, n, d});
  auto gtc = gtr.narrow(0, b0, n);
  if (exact) {
    Gd.zero_();
    Gd.diagonal(0, 0, 2).copy_(gtc.unsqueeze(1).expand({n, d}));
  } else {
    at::mul_out(Gd, eps.narrow(1, b0, n), gtc.mul(scale).view({1, n, 1}));
  }
}

// f and the trace of chunk [b0, b0 + n) from its stacked last-layer outputs F ([(1 + m) n, d], no bias yet).
void outputs_from_last(const at::Tensor& F, const at::Tensor& bias, const at::Tensor& eps, bool exact, int64_t b0,
                       int64_t n, int64_t m, int64_t d, at::Tensor& f, at::Tensor& tr) {
  auto fc = f.narrow(0, b0, n);
  at::add_out(fc, F.narrow(0, 0, n), bias);
  auto Fd = F.narrow(0, n, m * n).view({m, n, d});
  auto trc = tr.narrow(0, b0, n);
  if (exact) {
    at::sum_out(trc, Fd.diagonal(0, 0, 2), {1});
  } else {
    at::sum_out(trc, Fd * eps.narrow(1, b0, n), {0, 2});
    trc.mul_(1.0 / static_cast<double>(m));
  }
}

void colsum_into(at::Tensor out, const at::Tensor& A, bool fresh) {  // out (+)= A.sum(0)
  if (fresh) {
    at::sum_out(out, A, {0});
  } else {
    out.add_(A.sum(0));
  }
}

// The first layer's stacked pre-activations of chunk [b0, b0 + n) without the bias (the activation pass
// adds it): primal rows z W_z^T + t w_t, tangent rows eps W_z^T (exact: none; the pass broadcasts W_z's
// columns). `wz` is W's z columns, contiguous ([H0, d]).
void first_layer(at::Tensor& P, const at::Tensor& z, const at::Tensor& t, const at::Tensor& w, const at::Tensor& wz,
                 const at::Tensor& eps, bool exact, int64_t b0, int64_t n, int64_t d, int64_t m) {
  auto Pp = P.narrow(0, 0, n);
  gemm_nt(Pp, z.narrow(0, b0, n), wz);
  Pp.addr_(t.narrow(0, b0, n), w.select(1, d));
  if (!exact) {
    for (int64_t k = 0; k < m; ++k) {
      auto Pk = P.narrow(0, (1 + k) * n, n);
      gemm_nt(Pk, eps.select(0, k).narrow(0, b0, n), wz);
    }
  }
}

// The first layer's gradients from chunk [b0, b0 + n)'s first-hidden-layer pre-activation gradient G
// ([(1 + m) n, H0]): into gw0z / gw0t (the first weight's z columns and time column) and gb0 (written when
// `fresh`, else accumulated), dz and dt of the chunk. `wz` as in first_layer.
void first_layer_grads(const at::Tensor& G, const at::Tensor& z, const at::Tensor& t, const at::Tensor& eps,
                       const at::Tensor& w0, const at::Tensor& wz, bool exact, int64_t b0, int64_t n, int64_t m,
                       int64_t d, at::Tensor gw0z, at::Tensor gw0t, at::Tensor gb0, at::Tensor& gz, at::Tensor& gt,
                       bool fresh) {
  auto ga = G.narrow(0, 0, n);
  auto gAd = G.narrow(0, n, m * n);
  gemm_tn(gw0z, ga, z.narrow(0, b0, n), !fresh);
  if (exact) {
    gw0z.add_(gAd.view({d, n, -1}).sum(1).t());
  } else {
    for (int64_t k = 0; k < m; ++k) gemm_tn(gw0z, gAd.narrow(0, k * n, n), eps.select(0, k).narrow(0, b0, n), true);
  }
  if (fresh) {
    at::mv_out(gw0t, ga.t(), t.narrow(0, b0, n));
  } else {
    gw0t.addmv_(ga.t(), t.narrow(0, b0, n));
  }
  colsum_into(gb0, ga, fresh);
  auto gzc = gz.narrow(0, b0, n);
  auto gtc = gt.narrow(0, b0, n);
  gemm_nn(gzc, ga, wz);
  at::mv_out(gtc, ga, w0.select(1, d));
}

// What the forward and the backward both derive from their arguments: checked, contiguous inputs, the
// chunk plan (which holds the sizes) and the weight layouts the passes read.
struct Prepared {
  at::Tensor z, t, eps;  // eps undefined for the exact trace
  Plan plan;
  std::vector<at::Tensor> bc;  // contiguous biases
  at::Tensor wzt;              // exact: row k is the first layer's tangent for the basis probe e_k
  at::Tensor w0t;              // small d: the first layer's input rows [z, t] as columns
  std::vector<at::Tensor> wc;  // each weight contiguous (itself unless it is a strided view)
  at::Tensor wzc;              // not small d: the first weight's z columns, contiguous ([H0, d])
};

Prepared prepare(const at::Tensor& z_in, const at::Tensor& t_in, at::TensorList weights, at::TensorList biases,
                 const std::optional<at::Tensor>& eps_opt, c10::string_view activation) {
  check(z_in, t_in, weights, biases, eps_opt);
  const bool exact = !(eps_opt.has_value() && eps_opt->defined());
  Prepared p;
  p.z = z_in.contiguous();
  p.t = t_in.contiguous();
  p.eps = exact ? at::Tensor() : eps_opt->contiguous();
  p.plan = make_plan(p.z, exact ? p.z.size(1) : eps_opt->size(0), exact, weights, parse_act(activation));
  for (const auto& b : biases) p.bc.push_back(b.contiguous());
  if (exact) p.wzt = weights[0].narrow(1, 0, p.plan.d).t().contiguous();
  if (p.plan.small) {
    p.w0t = weights[0].t().contiguous();
  } else {
    p.wzc = weights[0].narrow(1, 0, p.plan.d).contiguous();
  }
  for (const auto& w : weights) p.wc.push_back(w.contiguous());
  return p;
}

// The upstream gradients as the backward passes read them: z's dtype, contiguous [B, d] and [B].
std::pair<at::Tensor, at::Tensor> upstream(const Prepared& in, const at::Tensor& grad_f, const at::Tensor& grad_trace) {
  return {grad_f.to(in.z.scalar_type()).reshape({in.plan.B, in.plan.d}).contiguous(),
          grad_trace.to(in.z.scalar_type()).reshape({in.plan.B}).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_prepared(const Prepared& in, at::TensorList weights) {
  const Plan& plan = in.plan;
  const Act act = plan.act;
  const bool exact = plan.exact;
  const int64_t B = plan.B, d = plan.d, m = plan.m, L = plan.L;
  const at::Tensor &z = in.z, &t = in.t, &eps = in.eps, &wzt = in.wzt, &w0t = in.w0t, &wl = in.wc.back();
  const std::vector<at::Tensor>& bc = in.bc;
  auto acts = at::empty({acts_numel(B, m, exact, weights)}, z.options());
  auto f = at::empty({B, d}, z.options());
  auto tr = at::empty({B}, z.options());
  if (B == 0) return {f, tr, acts};
  const int64_t C = plan.C;
  Scratch xs(1, (1 + m) * C * plan.hmax, z.options()), fs(1, (1 + m) * C * d, z.options());
  for_chunks(plan, [&](int64_t c) {
    const int64_t b0 = c * C, n = std::min(C, B - b0);
    at::Tensor scratch = xs.get(0);
    at::Tensor X;
    if (plan.small) {
      AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_trace_fwd_small", [&] {
        const SmallD<scalar_t> sd = make_small<scalar_t>(z, t, eps, w0t, bc[0], wl, bc[L - 1], m, exact);
        for (int64_t l = 0; l + 1 < L; ++l) {
          const int64_t H = weights[l].size(0), rows = stored_rows(l, m, exact);
          at::Tensor P = acts.narrow(0, plan.base[l] + rows * b0 * H, rows * n * H).view({rows * n, H});
          if (l > 0) gemm_nt(P, X, in.wc[l]);
          X = scratch.narrow(0, 0, (1 + m) * n * H).view({(1 + m) * n, H});
          fwd_small<scalar_t>(l == 0, l + 2 == L, P.mutable_data_ptr<scalar_t>(), X.mutable_data_ptr<scalar_t>(), n, H,
                              act, bc[l].const_data_ptr<scalar_t>(),
                              l == 0 && exact ? sd.w0t : nullptr, sd, b0, f.mutable_data_ptr<scalar_t>(),
                              tr.mutable_data_ptr<scalar_t>());
        }
      });
      return;
    }
    at::Tensor Fbuf = fs.get(0);
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor& w = weights[l];
      const int64_t H = w.size(0);
      const bool hidden = l + 1 < L;
      const int64_t rows = hidden ? stored_rows(l, m, exact) : 1 + m;
      at::Tensor P = hidden ? acts.narrow(0, plan.base[l] + rows * b0 * H, rows * n * H).view({rows * n, H})
                            : Fbuf.narrow(0, 0, (1 + m) * n * d).view({(1 + m) * n, d});
      if (l == 0) {
        first_layer(P, z, t, w, in.wzc, eps, exact, b0, n, d, m);
      } else {
        gemm_nt(P, X, in.wc[l]);
      }
      if (hidden) {
        X = scratch.narrow(0, 0, (1 + m) * n * H).view({(1 + m) * n, H});
        AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_trace_act_fwd", [&] {
          act_fwd<scalar_t>(P.mutable_data_ptr<scalar_t>(), X.mutable_data_ptr<scalar_t>(), n, m, H, act,
                            bc[l].const_data_ptr<scalar_t>(),
                            l == 0 && exact ? wzt.const_data_ptr<scalar_t>() : nullptr);
        });
      } else {
        outputs_from_last(P, bc[l], eps, exact, b0, n, m, d, f, tr);
      }
    }
  });
  return {f, tr, acts};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_trace_fwd_cpu(const at::Tensor& z, const at::Tensor& t,
                                                                 at::TensorList weights, at::TensorList biases,
                                                                 const std::optional<at::Tensor>& eps,
                                                                 c10::string_view activation) {
  return fwd_prepared(prepare(z, t, weights, biases, eps, activation), weights);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_trace_bwd_cpu(
    const at::Tensor& grad_f, const at::Tensor& grad_trace, const at::Tensor& z_in, const at::Tensor& t_in,
    at::TensorList weights, at::TensorList biases, const std::optional<at::Tensor>& eps_opt, const at::Tensor& acts,
    c10::string_view activation) {
  const Prepared in = prepare(z_in, t_in, weights, biases, eps_opt, activation);
  const Plan& plan = in.plan;
  const Act act = plan.act;
  const bool exact = plan.exact;
  const int64_t B = plan.B, d = plan.d, m = plan.m, L = plan.L;
  const at::Tensor &z = in.z, &t = in.t, &eps = in.eps, &wzt = in.wzt, &w0t = in.w0t, &wl = in.wc.back();
  const std::vector<at::Tensor>& bc = in.bc;
  TORCH_CHECK_VALUE(acts.numel() == acts_numel(B, m, exact, weights), "flowops.mlp_trace_bwd: acts has ",
                    acts.numel(), " elements, expected ", acts_numel(B, m, exact, weights));
  TORCH_CHECK_VALUE(grad_f.numel() == B * d && grad_trace.numel() == B,
                    "flowops.mlp_trace_bwd: gradients must be [B, d] and [B]");
  // Parallel chunks overwrite the gradients with their slots' sum below; otherwise chunks accumulate into them.
  std::vector<at::Tensor> gws(L), gbs(L);
  for (int64_t l = 0; l < L; ++l) {
    gws[l] = plan.parallel ? at::empty_like(weights[l], at::MemoryFormat::Contiguous)
                           : at::zeros_like(weights[l], at::MemoryFormat::Contiguous);
    gbs[l] = plan.parallel ? at::empty_like(biases[l], at::MemoryFormat::Contiguous)
                           : at::zeros_like(biases[l], at::MemoryFormat::Contiguous);
  }
  auto gz = at::empty({B, d}, z.options());
  auto gt = at::empty({B}, z.options());
  if (B == 0) return {gz, gt, gws, gbs};
  const auto [gf, gtr] = upstream(in, grad_f, grad_trace);
  auto actc = acts.contiguous();
  const int64_t C = plan.C;
  // Parallel chunks: one flat slot of all parameter gradients per chunk, summed in chunk order below.
  std::vector<int64_t> goff;
  int64_t gtotal = 0;
  for (int64_t l = 0; l < L; ++l) {
    goff.push_back(gtotal);
    gtotal += weights[l].numel() + biases[l].numel();
  }
  // Each chunk's slot is written (not accumulated) once per gradient, so it needs no zero fill.
  at::Tensor slots = plan.parallel ? at::empty({plan.chunks, gtotal}, z.options()) : at::Tensor();
  const bool fresh = plan.parallel;
  const int64_t cap = (1 + m) * C * std::max(plan.hmax, d);
  Scratch bufs(3, cap, z.options());
  const double scale = exact ? 1.0 : 1.0 / static_cast<double>(m);
  const at::Tensor& w0 = weights[0];
  for_chunks(plan, [&](int64_t c) {
    const int64_t b0 = c * C, n = std::min(C, B - b0);
    std::vector<at::Tensor> cw(L), cb(L);  // where this chunk's parameter gradients go
    for (int64_t l = 0; l < L; ++l) {
      if (plan.parallel) {
        auto row = slots.select(0, c);
        cw[l] = row.narrow(0, goff[l], weights[l].numel()).view(weights[l].sizes());
        cb[l] = row.narrow(0, goff[l] + weights[l].numel(), biases[l].numel());
      } else {
        cw[l] = gws[l];
        cb[l] = gbs[l];
      }
    }
    at::Tensor buf_a = bufs.get(0), spare = bufs.get(1), xbuf = bufs.get(2);
    if (plan.small) {
      const int64_t H0 = w0.size(0), Ht = weights[L - 1].size(1);
      AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_trace_bwd_small", [&] {
        // this chunk's first- and last-layer gradients, accumulated by the passes (gw0 as [d + 1, H0])
        std::vector<scalar_t> gwl(d * Ht, scalar_t(0)), gw0((d + 1) * H0, scalar_t(0)), gb0(H0, scalar_t(0));
        const SmallD<scalar_t> sd = make_small<scalar_t>(z, t, eps, w0t, bc[0], wl, bc[L - 1], m, exact);
        at::Tensor G = buf_a.narrow(0, 0, (1 + m) * n * Ht).view({(1 + m) * n, Ht});
        for (int64_t l = L - 2; l >= 0; --l) {  // hidden layer l; weight l + 1 maps its output onwards
          const int64_t H = weights[l].size(0), rows = stored_rows(l, m, exact);
          const scalar_t* P = actc.const_data_ptr<scalar_t>() + plan.base[l] + rows * b0 * H;
          const bool top = l + 2 == L, bottom = l == 0;
          at::Tensor gX, X;
          if (!top) {
            gX = spare.narrow(0, 0, (1 + m) * n * H).view({(1 + m) * n, H});
            gemm_nn(gX, G, in.wc[l + 1]);
            X = xbuf.narrow(0, 0, (1 + m) * n * H).view({(1 + m) * n, H});
          }
          bwd_small<scalar_t>(top, bottom, top ? nullptr : gX.mutable_data_ptr<scalar_t>(), P,
                              top ? nullptr : X.mutable_data_ptr<scalar_t>(), top ? G.mutable_data_ptr<scalar_t>() : nullptr,
                              n, H, act, bottom && exact ? sd.w0t : nullptr, sd, b0, gf.const_data_ptr<scalar_t>(),
                              gtr.const_data_ptr<scalar_t>(),
                              gwl.data(), gw0.data(), gb0.data(), gz.mutable_data_ptr<scalar_t>(),
                              gt.mutable_data_ptr<scalar_t>());
          if (!top) {
            gemm_tn(cw[l + 1], G, X, !fresh);
            colsum_into(cb[l + 1], G.narrow(0, 0, n), fresh);
            std::swap(buf_a, spare);
            G = gX;
          }
        }
        // into this chunk's slot (fresh) or onto the gradients; cw/cb are contiguous
        scalar_t* owl = cw[L - 1].mutable_data_ptr<scalar_t>();
        scalar_t* obl = cb[L - 1].mutable_data_ptr<scalar_t>();
        scalar_t* ow0 = cw[0].mutable_data_ptr<scalar_t>();  // [H0, d + 1]
        scalar_t* ob0 = cb[0].mutable_data_ptr<scalar_t>();
        const scalar_t* gfp = gf.const_data_ptr<scalar_t>() + b0 * d;
        std::vector<scalar_t> gbl(d, scalar_t(0));
        for (int64_t b = 0; b < n; ++b) {
          for (int64_t i = 0; i < d; ++i) gbl[i] += gfp[b * d + i];
        }
        auto put = [fresh](scalar_t* o, scalar_t v) { *o = fresh ? v : *o + v; };
        for (int64_t i = 0; i < d * Ht; ++i) put(owl + i, gwl[i]);
        for (int64_t i = 0; i < d; ++i) put(obl + i, gbl[i]);
        for (int64_t j = 0; j < H0; ++j) {
          for (int64_t i = 0; i <= d; ++i) put(ow0 + j * (d + 1) + i, gw0[i * H0 + j]);
          put(ob0 + j, gb0[j]);
        }
      });
      return;
    }
    at::Tensor G = buf_a.narrow(0, 0, (1 + m) * n * d).view({(1 + m) * n, d});
    top_grad(G, gf, gtr, eps, exact, scale, b0, n, m, d);
    for (int64_t l = L - 1; l >= 1; --l) {
      const int64_t Hp = weights[l - 1].size(0);
      const int64_t rows = stored_rows(l - 1, m, exact);
      auto P = actc.narrow(0, plan.base[l - 1] + rows * b0 * Hp, rows * n * Hp).view({rows * n, Hp});
      at::Tensor gX = spare.narrow(0, 0, (1 + m) * n * Hp).view({(1 + m) * n, Hp});
      gemm_nn(gX, G, in.wc[l]);
      at::Tensor X = xbuf.narrow(0, 0, (1 + m) * n * Hp).view({(1 + m) * n, Hp});
      AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_trace_act_bwd", [&] {
        act_bwd<scalar_t>(gX.mutable_data_ptr<scalar_t>(), P.const_data_ptr<scalar_t>(), X.mutable_data_ptr<scalar_t>(),
                          n, m, Hp, act, l == 1 && exact ? wzt.const_data_ptr<scalar_t>() : nullptr);
      });
      gemm_tn(cw[l], G, X, !fresh);
      colsum_into(cb[l], G.narrow(0, 0, n), fresh);
      std::swap(buf_a, spare);  // G's buffer becomes the spare; gX (in `spare` until now) is the new G
      G = gX;
    }
    first_layer_grads(G, z, t, eps, w0, in.wzc, exact, b0, n, m, d, cw[0].narrow(1, 0, d), cw[0].select(1, d), cb[0],
                      gz, gt, fresh);
  });
  if (plan.parallel) {
    auto total = slots.select(0, 0).clone();  // summed in chunk order: independent of the thread count
    for (int64_t c = 1; c < plan.chunks; ++c) total.add_(slots.select(0, c));
    for (int64_t l = 0; l < L; ++l) {
      gws[l].copy_(total.narrow(0, goff[l], weights[l].numel()).view(weights[l].sizes()));
      gbs[l].copy_(total.narrow(0, goff[l] + weights[l].numel(), biases[l].numel()));
    }
  }
  return {gz, gt, gws, gbs};
}

namespace {

// ---- the eager node's path for wide fields (widest hidden layer > kChunkParallelMaxWidth) ---------------
// Layer by layer over the whole batch (rows chunk-major as above, so every GEMM is one call over all
// rows), keeping for each hidden layer its output X = [sigma(a); sigma'(a) a_dot] (the next GEMM's input
// and the weight gradient's operand, so the backward recomputes nothing) and, for SiLU only, the
// pre-activations [a; a_dot] as well (its sigma' has zeros, so a_dot cannot be recovered from X). tanh and
// softplus get sigma', and sigma'' a_dot as a multiple of the stored tangent, from sigma(a) alone:
//   tanh:     sigma' = 1 - h^2,      sigma'' a_dot = -2 h x_dot
//   softplus: sigma' = -expm1(-h),   sigma'' a_dot = exp(-h) x_dot
// The backward walks the layers top down: the weight gradient (one GEMM over all rows), then per chunk the
// input gradient and the pass that turns it into the pre-activation gradient, written over the layer's
// stored buffer when the graph is not retained, whose memory is released as soon as the layer below is done.
// The peak is then the stored outputs plus the parameter gradients and one chunk of scratch, not both
// streams' saved state, scratch and gradients at once.

struct WideSaved {
  std::vector<at::Tensor> X, pre;  // per hidden layer [(1 + m) B, H]; pre only for SiLU
};

// G (pre-activation gradient) from the input gradient gX of one chunk; `src` is the layer's X (tanh,
// softplus) or its pre-activations (SiLU). G may alias src (each position is read before it is written).
template <typename T>
void act_bwd_stored(const T* gX, const T* src, T* G, int64_t n, int64_t M, int64_t H, Act act) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t N = n * H;
  at::parallel_for(0, n, row_grain(M, H), [&](int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      for (int64_t j = 0; j < H; j += V) {
        const int64_t nn = std::min<int64_t>(V, H - j);
        const int64_t o = b * H + j;
        const Vec v = Vec::loadu(src + o, nn);
        Vec s1, c;  // sigma'(a), and what multiplies sum_k gX_k * stored_k to give sigma''(a) sum_k gX_k a_dot_k
        if (act == Act::TANH) {
          s1 = Vec(T(1)) - v * v;
          c = Vec(T(-2)) * v;
        } else if (act == Act::SOFTPLUS) {
          s1 = v.neg().expm1().neg();
          c = v.neg().exp();
        } else {
          Vec h;
          derivs(v, act, h, s1, c);
        }
        Vec cross(T(0));
        for (int64_t k = 1; k <= M; ++k) {
          const int64_t ok = k * N + o;
          const Vec g = Vec::loadu(gX + ok, nn);
          cross = at::vec::fmadd(g, Vec::loadu(src + ok, nn), cross);
          (s1 * g).store(G + ok, nn);
        }
        at::vec::fmadd(Vec::loadu(gX + o, nn), s1, c * cross).store(G + o, nn);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> wide_fwd(const Prepared& in, at::TensorList weights, WideSaved& saved) {
  const Plan& p = in.plan;
  const int64_t B = p.B, d = p.d, m = p.m, L = p.L, C = p.C, R = 1 + m;
  const bool keep_pre = p.act == Act::SILU;
  const auto opts = in.z.options();
  auto f = at::empty({B, d}, opts);
  auto tr = at::empty({B}, opts);
  at::Tensor prev;
  for (int64_t l = 0; l + 1 < L; ++l) {
    const int64_t H = weights[l].size(0);
    at::Tensor P = at::empty({R * B, H}, opts);
    if (l > 0) gemm_nt(P, prev, in.wc[l]);
    at::Tensor X = keep_pre ? at::empty_like(P) : P;  // tanh / softplus: the pass turns P into X in place
    for (int64_t b0 = 0; b0 < B; b0 += C) {
      const int64_t n = std::min(C, B - b0);
      at::Tensor Pc = P.narrow(0, R * b0, R * n), Xc = X.narrow(0, R * b0, R * n);
      if (l == 0) {
        first_layer(Pc, in.z, in.t, weights[0], in.wzc, in.eps, p.exact, b0, n, d, m);
        if (p.exact && keep_pre) Pc.narrow(0, n, m * n).view({m, n, H}).copy_(in.wzt.unsqueeze(1).expand({m, n, H}));
      }
      AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "mlp_trace_wide_fwd", [&] {
        act_fwd<scalar_t>(Pc.mutable_data_ptr<scalar_t>(), Xc.mutable_data_ptr<scalar_t>(), n, m, H, p.act,
                          in.bc[l].const_data_ptr<scalar_t>(),
                          l == 0 && p.exact ? in.wzt.const_data_ptr<scalar_t>() : nullptr);
      });
    }
    saved.X.push_back(X);
    if (keep_pre) saved.pre.push_back(P);
    prev = X;
  }
  at::Tensor F = at::empty({R * B, d}, opts);
  gemm_nt(F, prev, in.wc[L - 1]);
  for (int64_t b0 = 0; b0 < B; b0 += C) {
    const int64_t n = std::min(C, B - b0);
    outputs_from_last(F.narrow(0, R * b0, R * n), in.bc[L - 1], in.eps, p.exact, b0, n, m, d, f, tr);
  }
  return {f, tr};
}

// `consume`: the saved buffers may be overwritten and are released as the walk passes them.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> wide_bwd(
    const at::Tensor& grad_f, const at::Tensor& grad_trace, const Prepared& in, at::TensorList weights,
    at::TensorList biases, WideSaved& saved, bool consume) {
  const Plan& p = in.plan;
  const int64_t B = p.B, d = p.d, m = p.m, L = p.L, C = p.C, R = 1 + m;
  const bool keep_pre = p.act == Act::SILU;
  const auto opts = in.z.options();
  const double scale = p.exact ? 1.0 : 1.0 / static_cast<double>(m);
  const auto [gf, gtr] = upstream(in, grad_f, grad_trace);
  std::vector<at::Tensor> gws(L), gbs(L);
  at::Tensor G = at::empty({R * B, d}, opts);
  for (int64_t b0 = 0; b0 < B; b0 += C) {
    const int64_t n = std::min(C, B - b0);
    top_grad(G.narrow(0, R * b0, R * n), gf, gtr, in.eps, p.exact, scale, b0, n, m, d);
  }
  at::Tensor scratch = at::empty({R * std::min(C, B) * p.hmax}, opts);
  for (int64_t l = L - 1; l >= 1; --l) {  // weight l maps hidden layer l - 1 onwards
    const int64_t Hp = weights[l - 1].size(0);
    at::Tensor X = saved.X[l - 1];
    gws[l] = at::empty_like(weights[l], at::MemoryFormat::Contiguous);
    gemm_tn(gws[l], G, X, false);
    gbs[l] = at::zeros_like(biases[l], at::MemoryFormat::Contiguous);
    at::Tensor src = keep_pre ? saved.pre[l - 1] : X;
    at::Tensor Gn = consume ? src : at::empty_like(src);
    if (consume && keep_pre) {  // SiLU: X's last reader was the weight gradient above (the pass reads pre)
      X.reset();
      saved.X[l - 1].reset();
    }
    for (int64_t b0 = 0; b0 < B; b0 += C) {
      const int64_t n = std::min(C, B - b0);
      at::Tensor Gc = G.narrow(0, R * b0, R * n);
      gbs[l].add_(Gc.narrow(0, 0, n).sum(0));
      at::Tensor gX = scratch.narrow(0, 0, R * n * Hp).view({R * n, Hp});
      gemm_nn(gX, Gc, in.wc[l]);
      AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "mlp_trace_wide_bwd", [&] {
        act_bwd_stored<scalar_t>(gX.const_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>() + R * b0 * Hp,
                                 Gn.mutable_data_ptr<scalar_t>() + R * b0 * Hp, n, m, Hp, p.act);
      });
    }
    G = Gn;
    if (consume && l < L - 1) {  // the layer above's buffers held the G just used
      saved.X[l].reset();
      if (keep_pre) saved.pre[l].reset();
    }
  }
  // the first weight's z columns and time column accumulate separately (contiguous: brgemm-eligible)
  auto gwz = at::zeros({weights[0].size(0), d}, opts);
  auto gwt = at::zeros({weights[0].size(0)}, opts);
  gbs[0] = at::zeros_like(biases[0], at::MemoryFormat::Contiguous);
  auto gz = at::empty({B, d}, opts);
  auto gt = at::empty({B}, opts);
  for (int64_t b0 = 0; b0 < B; b0 += C) {
    const int64_t n = std::min(C, B - b0);
    first_layer_grads(G.narrow(0, R * b0, R * n), in.z, in.t, in.eps, weights[0], in.wzc, p.exact, b0, n, m, d, gwz,
                      gwt, gbs[0], gz, gt, false);
  }
  gws[0] = at::cat({gwz, gwt.unsqueeze(1)}, 1);
  return {gz, gt, gws, gbs};
}

bool use_wide(const Plan& p) { return !p.small && !p.parallel && p.B > 0; }

// Eager fast path: the autograd node lives in C++.
class MLPTraceFn : public torch::autograd::Function<MLPTraceFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& t, at::TensorList weights,
                               at::TensorList biases, const std::optional<at::Tensor>& eps,
                               c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Prepared in = prepare(z, t, weights, biases, eps, activation);
    at::Tensor f, tr, acts;
    if (use_wide(in.plan)) {
      WideSaved wide;
      std::tie(f, tr) = wide_fwd(in, weights, wide);
      // private buffers of this node (never handed out), kept out of save_for_backward so that the backward
      // can release them layer by layer
      ctx->saved_data["wide_X"] = c10::List<at::Tensor>(wide.X);
      ctx->saved_data["wide_pre"] = c10::List<at::Tensor>(wide.pre);
    } else {
      std::tie(f, tr, acts) = fwd_prepared(in, weights);
    }
    const bool has_eps = eps.has_value() && eps->defined();
    std::vector<at::Tensor> saved{z, t, acts, has_eps ? *eps : at::Tensor()};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), biases.begin(), biases.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["layers"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["has_eps"] = has_eps;
    ctx->saved_data["activation"] = std::string(activation);
    return {f, tr};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_first_order("mlp_trace");
    auto s = ctx->get_saved_variables();
    const int64_t L = ctx->saved_data["layers"].toInt();
    const bool has_eps = ctx->saved_data["has_eps"].toBool();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const at::Tensor& z = s[0];
    std::vector<at::Tensor> weights(s.begin() + 4, s.begin() + 4 + L);
    std::vector<at::Tensor> biases(s.begin() + 4 + L, s.begin() + 4 + 2 * L);
    std::optional<at::Tensor> eps = has_eps ? std::optional<at::Tensor>(s[3]) : std::nullopt;
    auto gf = grads[0].defined() ? grads[0] : at::zeros_like(z);
    auto gt = grads[1].defined() ? grads[1] : at::zeros({z.size(0)}, z.options());
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor gz, gtime;
    std::vector<at::Tensor> gws, gbs;
    auto found = ctx->saved_data.find("wide_X");
    if (found != ctx->saved_data.end()) {
      WideSaved wide;
      wide.X = found->second.toTensorList().vec();
      wide.pre = ctx->saved_data["wide_pre"].toTensorList().vec();
      // without retain_graph this is the only backward through the node: its buffers become scratch
      const bool consume = !torch::autograd::get_current_graph_task_keep_graph();
      if (consume) {
        ctx->saved_data.erase("wide_X");
        ctx->saved_data.erase("wide_pre");
      }
      std::tie(gz, gtime, gws, gbs) = wide_bwd(gf, gt, prepare(z, s[1], weights, biases, eps, activation), weights,
                                               biases, wide, consume);
    } else {
      std::tie(gz, gtime, gws, gbs) = mlp_trace_bwd_cpu(gf, gt, z, s[1], weights, biases, eps, s[2], activation);
    }
    variable_list out;
    out.reserve(2 + 2 * L + 2);
    out.push_back(gz);
    out.push_back(gtime);
    for (auto& g : gws) out.push_back(g);
    for (auto& g : gbs) out.push_back(g);
    out.emplace_back();  // eps: a constant
    out.emplace_back();  // activation
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> mlp_trace_autograd(const at::Tensor& z, const at::Tensor& t,
                                                      at::TensorList weights, at::TensorList biases,
                                                      const std::optional<at::Tensor>& eps,
                                                      c10::string_view activation) {
  TORCH_CHECK_VALUE(z.device().is_cpu(), "flowops.mlp_trace (C++ autograd path) runs on CPU tensors");
  auto out = MLPTraceFn::apply(z, t, weights, biases, eps, activation);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> mlp_trace_plain(const at::Tensor& z, const at::Tensor& t, at::TensorList weights,
                                                   at::TensorList biases, const std::optional<at::Tensor>& eps,
                                                   c10::string_view activation) {
  auto [f, tr, acts] = mlp_trace_fwd_cpu(z, t, weights, biases, eps, activation);
  return {f, tr};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowops, m) {
  m.def("mlp_trace_fwd(Tensor z, Tensor t, Tensor[] weights, Tensor[] biases, Tensor? eps, str activation) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mlp_trace_bwd(Tensor grad_f, Tensor grad_trace, Tensor z, Tensor t, Tensor[] weights, Tensor[] biases, "
        "Tensor? eps, Tensor acts, str activation) -> (Tensor, Tensor, Tensor[], Tensor[])");
  m.def("mlp_trace(Tensor z, Tensor t, Tensor[] weights, Tensor[] biases, Tensor? eps, str activation) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flowops, CPU, m) {
  m.impl("mlp_trace_fwd", &mlp_trace_fwd_cpu);
  m.impl("mlp_trace_bwd", &mlp_trace_bwd_cpu);
  m.impl("mlp_trace", &mlp_trace_plain);
}

TORCH_LIBRARY_IMPL(flowops, Autograd, m) {
  m.impl("mlp_trace", &mlp_trace_autograd);
}

}  // namespace flowops
