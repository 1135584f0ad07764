// The Glow conditioner as one op: conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3 (stride 1, zero padding 1,
// biases), forward and backward, on GEMMs over the N * H * W pixels held as channels-last rows.
//
// With P pixels, C input, K hidden and O output channels:
//   forward   col = im2col(x) [P, 9C];  H1 = relu(col W1 + b1);  H2 = relu(H1 W2^T + b2)  ([P, K] each);
//             G = H2 W3 [P, 9O] (every tap's contribution at its source pixel); y = b3 + sum of G over the
//             nine taps, each read at its shifted pixel, written NCHW.
//   backward  dcol3 [P, 9O] = the output gradient gathered at each source pixel for every tap;
//             dW3 = H2^T dcol3, dH2 = dcol3 W3^T; dA2 = dH2 [H2 > 0]; dW2 = dA2^T H1, dH1 = dA2 W2;
//             dA1 = dH1 [H1 > 0]; dW1 = col^T dA1; dcol = dA1 W1^T; dx = the taps of dcol summed back to
//             their source pixels (col2im), written NCHW.
// W1 = w1 as [9C, K] (row (kh * 3 + kw) * C + c) and W3 = w3 as [K, 9O] (column (kh * 3 + kw) * O + o) are
// rebuilt per call (a few KB). The products are the float brgemm tiles of gemm.h (float64: at::mm); the
// padding never enters a product (no zero rows, no border pixels), and the 3x3 convolution with few output
// channels is one GEMM against all nine taps' weights instead of nine thin ones. The node saves x (no copy),
// H1 and H2; the backward rebuilds col from x.
// torch.compile and other devices run the nn.Conv2d modules (flowops/nn/glow.py decides).
#include "flowops.h"
#include "gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <limits>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <type_traits>
#include <vector>

namespace flowops {
namespace {

using namespace blas;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Geom {
  int64_t N, C, H, W, K, O, P;
};

void check_param(const at::Tensor& t, const at::Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "flowops.conv_net: ", name, " must have shape ", shape, ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), "flowops.conv_net: ", name, " has dtype ",
                    t.scalar_type(), ", x has ", x.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "flowops.conv_net: ", name, " is on ", t.device(), ", x on ",
                    x.device());
}

Geom check(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
           const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3) {
  TORCH_CHECK_VALUE(x.dim() == 4, "flowops.conv_net: x must be [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "flowops.conv_net (C++) runs on CPU tensors, got ", x.device());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                    "flowops.conv_net: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(w1.dim() == 4 && w3.dim() == 4, "flowops.conv_net: w1 and w3 must be 4-d conv weights, got ",
                    w1.sizes(), " and ", w3.sizes());
  Geom g{x.size(0), x.size(1), x.size(2), x.size(3), w1.size(0), w3.size(0), x.size(0) * x.size(2) * x.size(3)};
  check_param(w1, x, "w1", {g.K, g.C, 3, 3});
  check_param(b1, x, "b1", {g.K});
  check_param(w2, x, "w2", {g.K, g.K, 1, 1});
  check_param(b2, x, "b2", {g.K});
  check_param(w3, x, "w3", {g.O, g.K, 3, 3});
  check_param(b3, x, "b3", {g.O});
  return g;
}

// at::parallel_for over the N * H image rows: fn(n, h).
template <typename F>
void for_rows(const Geom& g, int64_t cost_per_row, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cost_per_row));
  at::parallel_for(0, g.N * g.H, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fn(r / g.H, r % g.H);
  });
}

// dst [P, 9D] (row p = pixel (n, h, w)): tap t = kh * 3 + kw of pixel (h, w) holds src's row of pixel
// (h + s * (kh - 1), w + s * (kw - 1)), zero outside the image. src [P, D] channels-last rows. s = +1 is
// im2col (the input each output pixel reads), s = -1 gathers an output gradient at every source pixel.
template <typename T>
void gather_taps(T* dst, const T* src, const Geom& g, int64_t D, int64_t s) {
  for_rows(g, 9 * D * g.W, [&](int64_t n, int64_t h) {
    for (int64_t w = 0; w < g.W; ++w) {
      T* out = dst + ((n * g.H + h) * g.W + w) * 9 * D;
      for (int64_t t = 0; t < 9; ++t, out += D) {
        const int64_t hh = h + s * (t / 3 - 1), ww = w + s * (t % 3 - 1);
        if (hh < 0 || hh >= g.H || ww < 0 || ww >= g.W) {
          std::fill(out, out + D, T(0));
        } else {
          std::copy_n(src + ((n * g.H + hh) * g.W + ww) * D, D, out);
        }
      }
    }
  });
}

// out[n, d, h, w] (NCHW, contiguous) = bias[d] + sum over taps t of taps[pixel (h - s (kh - 1), w - s (kw - 1)),
// t * D + d] (taps [P, 9D]): s = +1 sums each tap's contribution at the pixel it reads from (the last
// convolution's output), s = -1 with bias = nullptr is col2im (the input gradient).
template <typename T>
void scatter_taps(T* out, const T* taps, const T* bias, const Geom& g, int64_t D, int64_t s) {
  for_rows(g, 9 * D * g.W, [&](int64_t n, int64_t h) {
    thread_local std::vector<T> acc;
    acc.resize(static_cast<size_t>(g.W * D));
    for (int64_t w = 0; w < g.W; ++w) {
      T* a = acc.data() + w * D;
      for (int64_t d = 0; d < D; ++d) a[d] = bias ? bias[d] : T(0);
      for (int64_t t = 0; t < 9; ++t) {
        const int64_t hh = h + s * (t / 3 - 1), ww = w + s * (t % 3 - 1);
        if (hh < 0 || hh >= g.H || ww < 0 || ww >= g.W) continue;
        const T* src = taps + ((n * g.H + hh) * g.W + ww) * 9 * D + t * D;
        for (int64_t d = 0; d < D; ++d) a[d] += src[d];
      }
    }
    const int64_t HW = g.H * g.W;
    T* o = out + n * D * HW + h * g.W;
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t w = 0; w < g.W; ++w) o[d * HW + w] = acc[w * D + d];
    }
  });
}

// x (any strides) -> channels-last rows [P, C].
at::Tensor rows_of(const at::Tensor& x, const Geom& g) {
  return x.permute({0, 2, 3, 1}).contiguous().view({g.P, x.size(1)});
}

// A (in place, [P, K]) = relu(A + b).
template <typename T>
void bias_relu(T* a, const T* b, int64_t P, int64_t K) {
  at::parallel_for(0, P, std::max<int64_t>(1, 32768 / K), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      T* r = a + p * K;
      for (int64_t k = 0; k < K; ++k) r[k] = std::max(r[k] + b[k], T(0));
    }
  });
}

// ReLU-kink records for the reversible engine. A recomputation from a rebuilt input (values a few ulps off) can
// put a hidden unit whose pre-activation is within rounding of zero on the other side of the ReLU, and such
// flips are what move the recomputed gradients. Per row r of H ([P, K]) with largest value m_r and
// tau_r = tol * m_r: "record" keeps the units with 0 < h < 2 tau_r (flat index, value); "apply" (on the
// recomputation) zeroes the units with 0 < h < tau_r and then writes the recorded values back, so every unit
// that moved by less than tau_r is on the forward's side of the kink with the forward's value.
struct Kinks {
  double tol = 0;
  bool record = false;
  at::Tensor idx[2], val[2];  // record: outputs; apply: inputs (int32 flat indices, values)
};

// One row of bias_relu_kinks' first pass (the generic path): r = relu(r + b) exactly as bias_relu computes it
// (std::max(z, 0): z itself when z is NaN or -0), with the row's largest value m (NaN when the row holds a NaN,
// as a max that propagates NaN gives it) and its smallest positive value lo (infinity when none).
template <typename T>
inline void relu_row_stats(T* r, const T* b, int64_t K, T& m, T& lo) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const Vec zero(T(0)), inf(std::numeric_limits<T>::infinity());
  Vec vm = zero, vlo = inf;
  int64_t k = 0;
  for (; k + V <= K; k += V) {
    const Vec z = Vec::loadu(r + k) + Vec::loadu(b + k);
    const Vec v = Vec::blendv(z, zero, z < zero);
    v.store(r + k);
    vm = at::vec::maximum(vm, v);
    vlo = at::vec::minimum(vlo, Vec::blendv(inf, v, v > zero));
  }
  T lanes[V], lows[V];
  vm.store(lanes);
  vlo.store(lows);
  m = 0;
  lo = std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < V; ++i) {
    m = std::isnan(lanes[i]) ? lanes[i] : std::max(m, lanes[i]);
    lo = std::min(lo, lows[i]);
  }
  for (; k < K; ++k) {
    r[k] = std::max(r[k] + b[k], T(0));
    m = std::isnan(r[k]) || std::isnan(m) ? std::numeric_limits<T>::quiet_NaN() : std::max(m, r[k]);
    if (r[k] > T(0)) lo = std::min(lo, r[k]);
  }
}

#if defined(__AVX512F__)
inline float hmax16(__m512 v) {
  const __m256 a = _mm256_max_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 c = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  c = _mm_max_ps(c, _mm_movehl_ps(c, c));
  return _mm_cvtss_f32(_mm_max_ss(c, _mm_movehdup_ps(c)));
}

// The whole kink pass of one row for float with AVX-512 (K a multiple of 16): the same results as the generic
// path with fewer instructions per vector. max_ps(0, z) is std::max(z, 0) bit for bit; one NaN mask instead of
// a NaN-propagating max per vector; the smallest positive value stays a vector compared with 2 tau at once; the
// band tests give lane masks directly. The pass runs on every hidden unit of a recording or an application.
inline void kink_row_avx512(float* r, const float* b, int64_t K, float tol, bool record, int64_t base,
                            std::vector<std::pair<int32_t, float>>* out) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 vm = zero, vlo = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = _mm512_max_ps(zero, _mm512_add_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(b + k)));
    _mm512_storeu_ps(r + k, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vm = _mm512_max_ps(vm, v);
    vlo = _mm512_mask_min_ps(vlo, _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), vlo, v);
  }
  if (nan) return;  // a NaN row: its tau is NaN, nothing to record or clear
  const float tau = tol * hmax16(vm);
  if (!_mm512_cmp_ps_mask(vlo, _mm512_set1_ps(2 * tau), _CMP_LT_OQ)) return;  // no unit in the band (most rows)
  const __m512 vt = _mm512_set1_ps(tau);
  if (!record) {
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = _mm512_loadu_ps(r + k);
      const __mmask16 clear = _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(v, vt, _CMP_LT_OQ);
      _mm512_storeu_ps(r + k, _mm512_mask_mov_ps(v, clear, zero));
    }
    return;
  }
  for (int64_t k = 0; k < K; k += 16) {  // 0 < h < 2 tau  <=>  |h - tau| < tau
    const __m512 v = _mm512_loadu_ps(r + k);
    for (unsigned in_band = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(v, vt)), vt, _CMP_LT_OQ); in_band;
         in_band &= in_band - 1) {
      const int64_t j = k + __builtin_ctz(in_band);
      out->emplace_back(static_cast<int32_t>(base + j), r[j]);
    }
  }
}
#endif

// A (in place, [P, K]) = relu(A + b) with the Kinks pass of `layer` on each row while it is in cache.
template <typename T>
void bias_relu_kinks(T* a, const T* b, int64_t P, int64_t K, Kinks& kk, int layer) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr uint64_t kAllLanes = (uint64_t(1) << V) - 1;
  const Vec zero(T(0));
  const T tol = static_cast<T>(kk.tol);
  std::vector<std::vector<std::pair<int32_t, T>>> found(kk.record ? at::get_num_threads() : 0);
  at::parallel_for(0, P, std::max<int64_t>(1, 32768 / K), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      T* r = a + p * K;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) {
        if (K % 16 == 0) {
          kink_row_avx512(r, b, K, tol, kk.record, p * K, kk.record ? &found[at::get_thread_num()] : nullptr);
          continue;
        }
      }
#endif
      T m, lo;  // the row's largest value and smallest positive one
      relu_row_stats<T>(r, b, K, m, lo);
      const T tau = tol * m;
      if (!(lo < 2 * tau)) continue;  // no unit in the band (most rows; a NaN row): nothing to record or clear
      const Vec vt(tau);
      int64_t k = 0;
      if (!kk.record) {
        for (; k + V <= K; k += V) {
          const Vec v = Vec::loadu(r + k);
          Vec::blendv(v, zero, (v > zero) & (v < vt)).store(r + k);
        }
        for (; k < K; ++k) r[k] = (r[k] > T(0) && r[k] < tau) ? T(0) : r[k];
        continue;
      }
      auto& out = found[at::get_thread_num()];
      // 0 < h < 2 tau  <=>  |h - tau| < tau; a vector's lanes in the band as bits (zero_mask: lanes that are not)
      for (; k + V <= K; k += V) {
        uint64_t in_band = ~static_cast<uint64_t>(((Vec::loadu(r + k) - vt).abs() < vt).zero_mask()) & kAllLanes;
        for (; in_band; in_band &= in_band - 1) {
          const int64_t j = k + __builtin_ctzll(in_band);
          out.emplace_back(static_cast<int32_t>(p * K + j), r[j]);
        }
      }
      for (; k < K; ++k) {
        if (std::abs(r[k] - tau) < tau) out.emplace_back(static_cast<int32_t>(p * K + k), r[k]);
      }
    }
  });
  if (!kk.record) {
    const int32_t* ip = kk.idx[layer].const_data_ptr<int32_t>();
    const T* vp = kk.val[layer].const_data_ptr<T>();
    for (int64_t i = 0; i < kk.idx[layer].numel(); ++i) a[ip[i]] = vp[i];
    return;
  }
  int64_t n = 0;
  for (const auto& v : found) n += static_cast<int64_t>(v.size());
  at::Tensor idx = at::empty({n}, at::TensorOptions().dtype(at::kInt));
  at::Tensor val = at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  int32_t* ip = idx.mutable_data_ptr<int32_t>();
  T* vp = val.mutable_data_ptr<T>();
  for (const auto& v : found) {
    for (const auto& e : v) {
      *ip++ = e.first;
      *vp++ = e.second;
    }
  }
  kk.idx[layer] = idx;
  kk.val[layer] = val;
}

// G (in place) = G where H > 0, else 0 (the ReLU's backward, H its output).
template <typename T>
void relu_mask(T* gr, const T* h, int64_t numel) {
  at::parallel_for(0, numel, 65536, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) gr[i] = h[i] > T(0) ? gr[i] : T(0);
  });
}

struct Weights {
  at::Tensor W1, W2, W3;  // [9C, K], [K, K] (w2 as stored), [K, 9O]
};

// Conv weights (contiguous [A, B, 3, 3]: element (a, b, tap t) at (a * B + b) * 9 + t) and the GEMM matrices
// hold the same values in another order: matrix element (a, b, t) at a * sa + b * sb + t * st. W1 [9C, K]
// (row t * C + c) from w1 [K, C, 3, 3]: (sa, sb, st) = (1, K, C K); W3 [K, 9O] (column t * O + o) from
// w3 [O, K, 3, 3]: (1, 9 O, O). to_matrix copies conv -> matrix, else matrix -> conv (the weight gradients).
// Plain loops: aten's copies of the permuted views took ~30 us per call for these few tens of KB.
template <typename T>
void rearrange(T* conv, T* mat, int64_t A, int64_t B, int64_t sa, int64_t sb, int64_t st, bool to_matrix) {
  for (int64_t a = 0; a < A; ++a) {
    for (int64_t b = 0; b < B; ++b) {
      T* c = conv + (a * B + b) * 9;
      T* mm = mat + a * sa + b * sb;
      for (int64_t t = 0; t < 9; ++t) {
        if (to_matrix) {
          mm[t * st] = c[t];
        } else {
          c[t] = mm[t * st];
        }
      }
    }
  }
}

Weights weight_matrices(const Geom& g, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3) {
  at::Tensor c1 = w1.contiguous(), c3 = w3.contiguous();  // read only
  Weights m{at::empty({9 * g.C, g.K}, c1.options()), w2.reshape({g.K, g.K}).contiguous(),
            at::empty({g.K, 9 * g.O}, c3.options())};
  AT_DISPATCH_FLOATING_TYPES(c1.scalar_type(), "conv_net_weights", [&] {
    rearrange<scalar_t>(c1.data_ptr<scalar_t>(), m.W1.data_ptr<scalar_t>(), g.K, g.C, 1, g.K, g.C * g.K, true);
    rearrange<scalar_t>(c3.data_ptr<scalar_t>(), m.W3.data_ptr<scalar_t>(), g.O, g.K, 1, 9 * g.O, g.O, true);
  });
  return m;
}

struct Forward {
  at::Tensor y, H1, H2;
};

// A buffer this op manages itself, reported to torch.profiler's memory tracking as the CPU allocator reports its
// own (bytes > 0 while in use, < 0 when released), so peak-memory measurements count it.
void report(void* p, int64_t bytes) { c10::reportMemoryUsageToProfiler(p, bytes, 0, 0, c10::Device(c10::kCPU)); }

// Temporaries of one call come from two per-thread scratch slots kept between calls: fresh multi-MB buffers
// fault their pages in on every call (the temporaries are about twice the saved activations). A slot is kept
// up to kKeepBytes (larger requests are allocated per call); at Glow's level 1 at batch 16 the two slots hold
// about 4 MB. Never hand a scratch view out (outputs and saved tensors are fresh).
constexpr int64_t kKeepBytes = int64_t{64} << 20;

at::Tensor scratch(int slot, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  thread_local at::Tensor kept[2][2];  // [float, double][slot]
  const int64_t numel = rows * cols;
  const size_t elem = opts.dtype().itemsize();
  if (numel * static_cast<int64_t>(elem) > kKeepBytes) return at::empty({rows, cols}, opts);
  at::Tensor& t = kept[elem == 8 ? 1 : 0][slot];
  if (!t.defined() || t.numel() < numel) t = at::empty({numel}, opts);
  // a view that is reported while it lives (as a fresh buffer would be) and keeps the slot's storage alive
  // (the slot may be regrown while an older view is still in use)
  const int64_t bytes = numel * static_cast<int64_t>(elem);
  void* p = t.data_ptr();
  report(p, bytes);
  return at::from_blob(p, {rows, cols}, [keep = t, bytes](void* q) { report(q, -bytes); }, opts);
}

// The saved hidden activations (H1, H2) come from a process-wide pool of freed buffers, keyed by size: a fresh
// multi-MB buffer faults its pages in on first touch (about 0.3 - 0.4 ms per 2 MB here, a tenth of a level-1
// call), and a training step frees and reallocates the same sizes every time. Buffers under 256 KB use the
// ordinary allocator. The pool keeps at most FLOWOPS_POOL_MB (read once; default 256, 0 = no pool) of freed
// buffers; flowops::conv_net_empty_cache() hands them back. Deleters may run on any thread (a mutex).
class Pool {
 public:
  void* get(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        held_ -= bytes;
        return p;
      }
    }
    return c10::alloc_cpu(bytes);
  }
  void put(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ + bytes <= cap_) {
        free_[bytes].push_back(p);
        held_ += bytes;
        return;
      }
    }
    c10::free_cpu(p);
  }
  int64_t clear() {
    std::unordered_map<size_t, std::vector<void*>> out;
    int64_t released;
    {
      std::lock_guard<std::mutex> lock(mu_);
      out.swap(free_);
      released = static_cast<int64_t>(held_);
      held_ = 0;
    }
    for (auto& kv : out) {
      for (void* p : kv.second) c10::free_cpu(p);
    }
    return released;
  }
  bool enabled() const { return cap_ > 0; }
  int64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(held_);
  }

 private:
  static size_t cap_from_env() {
    const char* v = std::getenv("FLOWOPS_POOL_MB");
    if (v == nullptr || *v == '\0') return size_t{256} << 20;
    char* end = nullptr;
    const long long mb = std::strtoll(v, &end, 10);
    return (end == v || mb <= 0) ? 0 : static_cast<size_t>(mb) << 20;
  }
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t held_ = 0;
  const size_t cap_ = cap_from_env();
};

// Never destroyed: tensors freed during interpreter exit still hand their buffers back. A forked child starts
// with a fresh pool (another thread may have held the mutex at the fork; the parent's free buffers are left).
std::atomic<Pool*> g_pool{nullptr};

void fresh_pool_in_child() { g_pool.store(new Pool()); }

Pool& pool() {
  Pool* p = g_pool.load();
  if (p == nullptr) {
    static std::once_flag once;
    std::call_once(once, [] {
      g_pool.store(new Pool());
#if defined(__unix__) || defined(__APPLE__)
      pthread_atfork(nullptr, nullptr, &fresh_pool_in_child);
#endif
    });
    p = g_pool.load();
  }
  return *p;
}

at::Tensor pooled(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  const size_t bytes = static_cast<size_t>(rows * cols) * opts.dtype().itemsize();
  if (bytes < (size_t{256} << 10) || !pool().enabled()) return at::empty({rows, cols}, opts);
  void* p = pool().get(bytes);
  report(p, static_cast<int64_t>(bytes));
  return at::from_blob(p, {rows, cols}, [bytes](void* q) {
    report(q, -static_cast<int64_t>(bytes));
    pool().put(q, bytes);
  }, opts);
}

at::Tensor im2col(const at::Tensor& x, const Geom& g, int slot) {
  const at::Tensor xr = rows_of(x, g);
  auto col = scratch(slot, g.P, 9 * g.C, xr.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_net_im2col", [&] {
    gather_taps<scalar_t>(col.mutable_data_ptr<scalar_t>(), xr.const_data_ptr<scalar_t>(), g, g.C, 1);
  });
  return col;
}

// keep: H1 and H2 are fresh tensors for the backward; otherwise (no gradient) they live in the scratch slots.
// out: (y, H1, H2) written into these (checked by the caller) instead; callers pass keep = true with it.
Forward forward_impl(const at::Tensor& x, const Weights& m, const at::Tensor& b1, const at::Tensor& b2,
                     const at::Tensor& b3, const Geom& g, bool keep, Kinks* kinks = nullptr,
                     const Forward* out = nullptr) {
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  Forward f;
  f.y = out ? out->y : at::empty({g.N, g.O, g.H, g.W}, opts);
  if (g.P == 0) return f;
  const at::Tensor col = im2col(x, g, 0);
  f.H1 = out ? out->H1 : keep ? pooled(g.P, g.K, opts) : scratch(1, g.P, g.K, opts);
  const auto bb1 = b1.contiguous(), bb2 = b2.contiguous(), bb3 = b3.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_net_fwd", [&] {
    gemm_nn(f.H1, col, m.W1, 0);
    if (kinks) {
      bias_relu_kinks<scalar_t>(f.H1.mutable_data_ptr<scalar_t>(), bb1.const_data_ptr<scalar_t>(), g.P, g.K, *kinks, 0);
    } else {
      bias_relu<scalar_t>(f.H1.mutable_data_ptr<scalar_t>(), bb1.const_data_ptr<scalar_t>(), g.P, g.K);
    }
    f.H2 = out ? out->H2 : keep ? pooled(g.P, g.K, opts) : scratch(0, g.P, g.K, opts);  // col is dead
    gemm_nt(f.H2, f.H1, m.W2);
    if (kinks) {
      bias_relu_kinks<scalar_t>(f.H2.mutable_data_ptr<scalar_t>(), bb2.const_data_ptr<scalar_t>(), g.P, g.K, *kinks, 1);
    } else {
      bias_relu<scalar_t>(f.H2.mutable_data_ptr<scalar_t>(), bb2.const_data_ptr<scalar_t>(), g.P, g.K);
    }
    auto G = keep ? scratch(0, g.P, 9 * g.O, opts) : scratch(1, g.P, 9 * g.O, opts);  // col or H1: dead
    gemm_nn(G, f.H2, m.W3, 0);
    scatter_taps<scalar_t>(f.y.mutable_data_ptr<scalar_t>(), G.const_data_ptr<scalar_t>(),
                           bb3.const_data_ptr<scalar_t>(), g, g.O, 1);
  });
  return f;
}

// Gradients (x, w1, b1, w2, b2, w3, b3); gx undefined unless need_x. With `into` (six contiguous tensors of the
// parameters' shapes, checked by the caller) the parameter gradients are written there and returned as those
// tensors; otherwise they are fresh.
std::vector<at::Tensor> backward_impl(const at::Tensor& gy, const at::Tensor& x, const Forward& f, const Weights& m,
                                      const Geom& g, bool need_x, at::TensorList into = {}) {
  const auto opts = gy.options().memory_format(at::MemoryFormat::Contiguous);
  const bool dst = !into.empty();
  std::vector<at::Tensor> out(7);
  if (dst) {
    for (int i = 0; i < 6; ++i) out[i + 1] = into[i];
  }
  if (g.P == 0) {
    out[0] = need_x ? at::zeros({g.N, g.C, g.H, g.W}, opts) : at::Tensor();
    if (dst) {
      for (int i = 1; i < 7; ++i) out[i].zero_();
      return out;
    }
    out[1] = at::zeros({g.K, g.C, 3, 3}, opts);
    out[2] = at::zeros({g.K}, opts);
    out[3] = at::zeros({g.K, g.K, 1, 1}, opts);
    out[4] = at::zeros({g.K}, opts);
    out[5] = at::zeros({g.O, g.K, 3, 3}, opts);
    out[6] = at::zeros({g.O}, opts);
    return out;
  }
  // a column sum into its destination (the same kernel either way)
  auto col_sum = [&](int i, const at::Tensor& a) {
    if (dst) {
      at::sum_out(out[i], a, 0);
    } else {
      out[i] = a.sum(0);
    }
  };
  const at::Tensor gr = rows_of(gy, g);
  col_sum(6, gr);
  auto dW3 = at::empty({g.K, 9 * g.O}, opts);
  auto dW2 = dst ? out[3].view({g.K, g.K}) : at::empty({g.K, g.K}, opts);
  auto dW1 = at::empty({9 * g.C, g.K}, opts);
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "conv_net_bwd", [&] {
    // temporaries in the two scratch slots, each reused once its previous contents are dead
    auto dcol3 = scratch(0, g.P, 9 * g.O, opts);
    gather_taps<scalar_t>(dcol3.mutable_data_ptr<scalar_t>(), gr.const_data_ptr<scalar_t>(), g, g.O, -1);
    gemm_tn_split_k(dW3, f.H2, dcol3);
    auto dA2 = scratch(1, g.P, g.K, opts);
    gemm_nt(dA2, dcol3, m.W3);
    relu_mask<scalar_t>(dA2.mutable_data_ptr<scalar_t>(), f.H2.const_data_ptr<scalar_t>(), dA2.numel());
    col_sum(4, dA2);
    gemm_tn_split_k(dW2, dA2, f.H1);
    auto dA1 = scratch(0, g.P, g.K, opts);  // dcol3 is dead
    gemm_nn(dA1, dA2, m.W2, 0);
    relu_mask<scalar_t>(dA1.mutable_data_ptr<scalar_t>(), f.H1.const_data_ptr<scalar_t>(), dA1.numel());
    col_sum(2, dA1);
    // col rebuilt (x is kept anyway: the coupling's pass-through half) in dA2's slot; dcol after it in the same
    gemm_tn_split_k(dW1, im2col(x, g, 1), dA1);
    if (need_x) {
      auto dcol = scratch(1, g.P, 9 * g.C, opts);
      gemm_nt(dcol, dA1, m.W1);
      out[0] = at::empty({g.N, g.C, g.H, g.W}, opts);
      scatter_taps<scalar_t>(out[0].mutable_data_ptr<scalar_t>(), dcol.const_data_ptr<scalar_t>(), nullptr, g, g.C,
                             -1);
    }
  });
  if (!dst) {
    out[1] = at::empty({g.K, g.C, 3, 3}, opts);
    out[5] = at::empty({g.O, g.K, 3, 3}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "conv_net_weight_grads", [&] {
    rearrange<scalar_t>(out[1].data_ptr<scalar_t>(), dW1.data_ptr<scalar_t>(), g.K, g.C, 1, g.K, g.C * g.K, false);
    rearrange<scalar_t>(out[5].data_ptr<scalar_t>(), dW3.data_ptr<scalar_t>(), g.O, g.K, 1, 9 * g.O, g.O, false);
  });
  if (!dst) out[3] = dW2.view({g.K, g.K, 1, 1});
  return out;
}

class ConvNetFn : public torch::autograd::Function<ConvNetFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                               const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
                               const at::Tensor& b3) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Geom g = check(x, w1, b1, w2, b2, w3, b3);
    Forward f = forward_impl(x, weight_matrices(g, w1, w2, w3), b1, b2, b3, g, true);
    ctx->save_for_backward({x, f.H1, f.H2, w1, w2, w3});  // the weight matrices are rebuilt (KBs)
    ctx->saved_data["geom"] = std::vector<int64_t>{g.N, g.C, g.H, g.W, g.K, g.O, g.P};
    return {f.y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_first_order("conv_net");
    auto s = ctx->get_saved_variables();
    const auto v = ctx->saved_data["geom"].toIntVector();
    const Geom g{v[0], v[1], v[2], v[3], v[4], v[5], v[6]};
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (!grads[0].defined()) return variable_list(7);
    Forward f{at::Tensor(), s[1], s[2]};
    const Weights m = weight_matrices(g, s[3], s[4], s[5]);
    return backward_impl(grads[0], s[0], f, m, g, ctx->needs_input_grad(0));
  }
};

at::Tensor conv_net_plain(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3) {
  const Geom g = check(x, w1, b1, w2, b2, w3, b3);
  return forward_impl(x, weight_matrices(g, w1, w2, w3), b1, b2, b3, g, false).y;
}

at::Tensor conv_net_autograd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                             const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3) {
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || w1.requires_grad() || b1.requires_grad() ||
                                                   w2.requires_grad() || b2.requires_grad() ||
                                                   w3.requires_grad() || b3.requires_grad());
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv_net_plain(x, w1, b1, w2, b2, w3, b3);
  }
  return ConvNetFn::apply(x, w1, b1, w2, b2, w3, b3)[0];
}

// The forward and backward as two plain calls (no autograd node), for callers that run a layer's recomputation
// and its local backward back to back (the reversible engine): conv_net_fwd returns y and the hidden
// activations H1, H2 ([P, K], pooled buffers); conv_net_bwd takes them back with the output gradient and returns
// the gradients of (x, w1, b1, w2, b2, w3, b3), x's empty when need_x is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_net_fwd_cpu(const at::Tensor& x, const at::Tensor& w1,
                                                                const at::Tensor& b1, const at::Tensor& w2,
                                                                const at::Tensor& b2, const at::Tensor& w3,
                                                                const at::Tensor& b3) {
  const Geom g = check(x, w1, b1, w2, b2, w3, b3);
  Forward f = forward_impl(x, weight_matrices(g, w1, w2, w3), b1, b2, b3, g, true);
  if (g.P == 0) f.H1 = f.H2 = at::empty({0, g.K}, x.options());
  return {f.y, f.H1, f.H2};
}

// (y, H1, H2) of a forward given by the caller (named `names` in errors): contiguous [N, O, H, W], [P, K], [P, K]
// tensors of x's dtype and device, checked.
Forward checked_acts(const char* op, const char* const names[3], const at::Tensor& x, const Geom& g,
                     const at::Tensor& y, const at::Tensor& h1, const at::Tensor& h2) {
  const std::vector<int64_t> ys{g.N, g.O, g.H, g.W}, hs{g.P, g.K};
  const at::Tensor* ts[3] = {&y, &h1, &h2};
  for (int i = 0; i < 3; ++i) {
    const auto& want = i == 0 ? ys : hs;
    TORCH_CHECK_VALUE(ts[i]->sizes() == at::IntArrayRef(want) && ts[i]->is_contiguous() &&
                          ts[i]->scalar_type() == x.scalar_type() && ts[i]->device() == x.device(),
                      op, ": ", names[i], " must be contiguous ", at::IntArrayRef(want),
                      " tensors of x's dtype and device, got ", ts[i]->sizes());
  }
  return Forward{y, h1, h2};
}

// conv_net_fwd writing y, H1 and H2 into the given tensors (contiguous, x's dtype and device, shapes [N, O, H, W],
// [P, K], [P, K]; the reversible engine's kept activations, views of a buffer of the activation pool); returns
// nothing.
void conv_net_fwd_into_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                           const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& y,
                           const at::Tensor& h1, const at::Tensor& h2) {
  const Geom g = check(x, w1, b1, w2, b2, w3, b3);
  static const char* const names[3] = {"y", "h1 and h2", "h1 and h2"};
  const Forward out = checked_acts("flowops.conv_net_fwd_into", names, x, g, y, h1, h2);
  forward_impl(x, weight_matrices(g, w1, w2, w3), b1, b2, b3, g, true, nullptr, &out);
}

// A [rows, cols] buffer of the activation pool (a freed buffer of that size when there is one; 256 KB and more),
// for callers that lay out several activations in one (the reversible engine's kept activations); its memory goes
// back to the pool when freed.
at::Tensor conv_net_pooled(int64_t rows, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "flowops.conv_net_pooled: sizes must be non-negative, got ", rows, ", ",
                    cols);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, "flowops.conv_net_pooled: dtype must be float32 or "
                    "float64, got ", dtype);
  return pooled(rows, cols, at::TensorOptions().dtype(dtype));
}

// The Kinks of a recording (apply empty) or of an application of the four tensors a recording returned, checked.
Kinks kinks_of(const at::Tensor& x, const Geom& g, double tol, at::TensorList apply) {
  TORCH_CHECK_VALUE(tol >= 0 && tol < 0.5, "flowops.conv_net_fwd_kinks: tol must be in [0, 0.5), got ", tol);
  TORCH_CHECK_VALUE(g.P * g.K < (int64_t(1) << 31), "flowops.conv_net_fwd_kinks: ", g.P, " x ", g.K,
                    " hidden units do not fit int32 indices");
  TORCH_CHECK_VALUE(apply.empty() || apply.size() == 4, "flowops.conv_net_fwd_kinks: apply must be empty (record) "
                    "or the four tensors a recording returned, got ", apply.size());
  Kinks kk;
  kk.tol = tol;
  kk.record = apply.empty();
  for (size_t l = 0; l < 2 && !kk.record; ++l) {
    const auto& idx = apply[2 * l];
    const auto& val = apply[2 * l + 1];
    TORCH_CHECK_VALUE(idx.dim() == 1 && idx.scalar_type() == at::kInt && idx.is_contiguous() && idx.is_cpu() &&
                          val.dim() == 1 && val.numel() == idx.numel() && val.scalar_type() == x.scalar_type() &&
                          val.is_contiguous() && val.is_cpu(),
                      "flowops.conv_net_fwd_kinks: apply must be the (int32 indices, values) pairs a recording "
                      "returned");
    const int32_t* ip = idx.const_data_ptr<int32_t>();
    bool in_range = true;
    for (int64_t i = 0; i < idx.numel(); ++i) in_range &= ip[i] >= 0 && ip[i] < g.P * g.K;
    TORCH_CHECK_VALUE(in_range, "flowops.conv_net_fwd_kinks: recorded indices out of range for ", g.P, " x ", g.K);
    kk.idx[l] = idx;
    kk.val[l] = val;
  }
  return kk;
}

// conv_net_fwd with ReLU-kink records (see Kinks): with `apply` empty it records them ([idx1, val1, idx2, val2]
// returned; h1 and h2 come back empty); with `apply` = those four tensors it applies them to this recomputation
// (h1 and h2 as conv_net_fwd returns them, nothing else).
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> conv_net_fwd_kinks_cpu(
    const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& w3, const at::Tensor& b3, double tol, at::TensorList apply) {
  const Geom g = check(x, w1, b1, w2, b2, w3, b3);
  Kinks kk = kinks_of(x, g, tol, apply);
  // recording keeps no activations (H1, H2 in the scratch slots; empty tensors returned)
  Forward f = forward_impl(x, weight_matrices(g, w1, w2, w3), b1, b2, b3, g, !kk.record, g.P ? &kk : nullptr);
  if (kk.record || g.P == 0) f.H1 = f.H2 = at::empty({0, g.K}, x.options());
  if (!kk.record) return {f.y, f.H1, f.H2, {}};
  for (int l = 0; l < 2 && g.P == 0; ++l) {  // no rows: the pass never ran
    kk.idx[l] = at::empty({0}, at::TensorOptions().dtype(at::kInt));
    kk.val[l] = at::empty({0}, x.options());
  }
  return {f.y, f.H1, f.H2, {kk.idx[0], kk.val[0], kk.idx[1], kk.val[1]}};
}

// The destinations of conv_net_bwd_into's six parameter gradients.
void check_into(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3, at::TensorList grads) {
  TORCH_CHECK_VALUE(grads.size() == 6, "flowops.conv_net_bwd_into: grads must be six tensors (w1, b1, w2, b2, w3, "
                    "b3), got ", grads.size());
  const at::Tensor* params[6] = {&w1, &b1, &w2, &b2, &w3, &b3};
  for (int i = 0; i < 6; ++i) {
    const auto& d = grads[i];
    TORCH_CHECK_VALUE(d.sizes() == params[i]->sizes() && d.is_contiguous() && d.scalar_type() == x.scalar_type() &&
                          d.device() == x.device(),
                      "flowops.conv_net_bwd_into: grads[", i, "] must be a contiguous ", params[i]->sizes(),
                      " tensor of x's dtype and device, got ", d.sizes(), " ", d.scalar_type());
  }
}

std::vector<at::Tensor> conv_net_bwd_checked(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& h1,
                                             const at::Tensor& h2, const at::Tensor& w1, const at::Tensor& b1,
                                             const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
                                             const at::Tensor& b3, bool need_x, at::TensorList into) {
  const Geom g = check(x, w1, b1, w2, b2, w3, b3);
  for (const auto* t : {&h1, &h2}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == g.P && t->size(1) == g.K && t->is_contiguous() &&
                          t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                      "flowops.conv_net_bwd: h1 and h2 must be the contiguous [", g.P, ", ", g.K,
                      "] activations conv_net_fwd returned, got ", t->sizes());
  }
  TORCH_CHECK_VALUE(gy.sizes() == at::IntArrayRef({g.N, g.O, g.H, g.W}) && gy.scalar_type() == x.scalar_type(),
                    "flowops.conv_net_bwd: grad_y must be [", g.N, ", ", g.O, ", ", g.H, ", ", g.W, "] of x's dtype, "
                    "got ", gy.sizes(), " ", gy.scalar_type());
  Forward f{at::Tensor(), h1, h2};
  auto out = backward_impl(gy, x, f, weight_matrices(g, w1, w2, w3), g, need_x, into);
  if (!out[0].defined()) out[0] = at::empty({0}, x.options());
  return out;
}

std::vector<at::Tensor> conv_net_bwd_cpu(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& h1,
                                         const at::Tensor& h2, const at::Tensor& w1, const at::Tensor& b1,
                                         const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
                                         const at::Tensor& b3, bool need_x) {
  return conv_net_bwd_checked(gy, x, h1, h2, w1, b1, w2, b2, w3, b3, need_x, {});
}

// conv_net_bwd writing the six parameter gradients into `grads` (contiguous tensors of w1, b1, w2, b2, w3, b3's
// shapes and x's dtype and device, overwritten: the reversible engine's gradient buffer, so the gradients need no
// allocation and no copy); returns the gradient of x (empty when need_x is false).
at::Tensor conv_net_bwd_into_cpu(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& h1, const at::Tensor& h2,
                                 const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                 const at::Tensor& w3, const at::Tensor& b3, bool need_x, at::TensorList grads) {
  check_into(x, w1, b1, w2, b2, w3, b3, grads);
  auto out = conv_net_bwd_checked(gy, x, h1, h2, w1, b1, w2, b2, w3, b3, need_x, grads);
  return out[0];
}

// The reversible walk's whole step for one of Glow's couplings (split mask, conv_net conditioner) in one call, with
// the calls the walk would make one by one (same kernels, same values bit for bit): y's pass-through part
// yp = y[:, pass] feeds the conditioner's recomputation (conv_net_fwd, or conv_net_fwd_kinks applying `kinks`, the
// four tensors of a recording, with tol kink_tol), or `acts` = (cond, h1, h2) are the forward's kept activations
// (recompute false) or the buffers the recomputation writes into (recompute true); the coupling's inverse rebuilds
// xt from yt = y[:, trans] (affine_coupling, inverse) and its backward gives (grad xt, grad cond)
// (affine_coupling_bwd); the conditioner's backward writes its six parameter gradients into `grads`
// (conv_net_bwd_into) and its input gradient joins grad_y's pass-through part. Returns (x, grad_x), x = the
// channels of yp and xt in y's order, grad_x likewise (empty when need_x is false). Between the walk's large GEMMs
// one call instead of about ten keeps the cold per-call overhead (argument parsing, dispatch) off the step.
std::tuple<at::Tensor, at::Tensor> glow_coupling_reverse_cpu(
    const at::Tensor& y, const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3,
    int64_t pass_start, int64_t pass_len, int64_t trans_start, int64_t trans_len, c10::string_view scale,
    double clamp, double kink_tol, at::TensorList kinks, at::TensorList acts, bool recompute, bool need_x,
    at::TensorList grads) {
  TORCH_CHECK_VALUE(y.dim() == 4, "flowops.glow_coupling_reverse: y must be [N, C, H, W], got ", y.sizes());
  TORCH_CHECK_VALUE(grad_y.sizes() == y.sizes() && grad_y.scalar_type() == y.scalar_type(),
                    "flowops.glow_coupling_reverse: grad_y must have y's shape and dtype, got ", grad_y.sizes());
  const int64_t C = y.size(1);
  const bool pass_first = pass_start < trans_start;
  TORCH_CHECK_VALUE(pass_len > 0 && trans_len > 0 && pass_len + trans_len == C &&
                        (pass_first ? pass_start == 0 && trans_start == pass_len
                                    : trans_start == 0 && pass_start == trans_len),
                    "flowops.glow_coupling_reverse: the pass-through and transformed channel ranges must split y's ",
                    C, " channels in two, got (", pass_start, ", ", pass_len, ") and (", trans_start, ", ", trans_len,
                    ")");
  const auto yp = y.narrow(1, pass_start, pass_len), yt = y.narrow(1, trans_start, trans_len);
  const Geom g = check(yp, w1, b1, w2, b2, w3, b3);
  check_into(yp, w1, b1, w2, b2, w3, b3, grads);
  TORCH_CHECK_VALUE(acts.empty() || acts.size() == 3, "flowops.glow_coupling_reverse: acts must be empty or "
                    "(cond, h1, h2), got ", acts.size(), " tensors");
  TORCH_CHECK_VALUE(kinks.empty() || (acts.empty() || recompute), "flowops.glow_coupling_reverse: kink records "
                    "apply to a recomputation, not to kept activations");
  const Weights m = weight_matrices(g, w1, w2, w3);
  Forward f;
  static const char* const names[3] = {"acts[0]", "acts[1]", "acts[2]"};
  if (!acts.empty()) f = checked_acts("flowops.glow_coupling_reverse", names, yp, g, acts[0], acts[1], acts[2]);
  if (acts.empty() || recompute) {  // (no rows: forward_impl returns y alone, which is all the backward reads)
    Kinks kk;
    if (!kinks.empty()) kk = kinks_of(yp, g, kink_tol, kinks);
    const Forward out = f;
    f = forward_impl(yp, m, b1, b2, b3, g, true, kinks.empty() || g.P == 0 ? nullptr : &kk,
                     acts.empty() ? nullptr : &out);
  }
  const std::string sc(scale);
  const auto xt = std::get<0>(affine_coupling_fwd_cpu(yt, f.y, std::nullopt, sc, clamp, true));
  auto [gxt, gcond] = affine_coupling_bwd_cpu(grad_y.narrow(1, trans_start, trans_len), grad_logdet, xt, f.y,
                                              std::nullopt, sc, clamp, false);
  auto gxp = backward_impl(gcond, yp, f, m, g, need_x, grads)[0];
  auto x = pass_first ? at::cat({yp, xt}, 1) : at::cat({xt, yp}, 1);
  if (!need_x) return {x, at::empty({0}, y.options())};
  auto gyp = grad_y.narrow(1, pass_start, pass_len) + gxp;
  return {x, pass_first ? at::cat({gyp, gxt}, 1) : at::cat({gxt, gyp}, 1)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowops, m) {
  m.def("conv_net(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3) -> Tensor");
  m.def("conv_net_fwd(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("conv_net_fwd_kinks(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, float tol, "
        "Tensor[] apply) -> (Tensor, Tensor, Tensor, Tensor[])");
  m.def("conv_net_bwd(Tensor grad_y, Tensor x, Tensor h1, Tensor h2, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
        "Tensor w3, Tensor b3, bool need_x) -> Tensor[]");
  m.def("conv_net_bwd_into(Tensor grad_y, Tensor x, Tensor h1, Tensor h2, Tensor w1, Tensor b1, Tensor w2, "
        "Tensor b2, Tensor w3, Tensor b3, bool need_x, Tensor(a!)[] grads) -> Tensor");
  m.def("conv_net_fwd_into(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, "
        "Tensor(a!) y, Tensor(b!) h1, Tensor(c!) h2) -> ()");
  m.def("glow_coupling_reverse(Tensor y, Tensor grad_y, Tensor grad_logdet, Tensor w1, Tensor b1, Tensor w2, "
        "Tensor b2, Tensor w3, Tensor b3, int pass_start, int pass_len, int trans_start, int trans_len, str scale, "
        "float clamp, float kink_tol, Tensor[] kinks, Tensor(b!)[] acts, bool recompute, bool need_x, "
        "Tensor(a!)[] grads) -> (Tensor, Tensor)");
  m.def("conv_net_pooled(int rows, int cols, ScalarType dtype) -> Tensor", &conv_net_pooled);
  m.def("conv_net_empty_cache() -> int", [] { return pool().clear(); });
  m.def("conv_net_cached_bytes() -> int", [] { return pool().held(); });
}

TORCH_LIBRARY_IMPL(flowops, CPU, m) {
  m.impl("conv_net", &conv_net_plain);
  m.impl("conv_net_fwd", &conv_net_fwd_cpu);
  m.impl("conv_net_fwd_kinks", &conv_net_fwd_kinks_cpu);
  m.impl("conv_net_bwd", &conv_net_bwd_cpu);
  m.impl("conv_net_bwd_into", &conv_net_bwd_into_cpu);
  m.impl("conv_net_fwd_into", &conv_net_fwd_into_cpu);
  m.impl("glow_coupling_reverse", &glow_coupling_reverse_cpu);
}

TORCH_LIBRARY_IMPL(flowops, Autograd, m) {
  m.impl("conv_net", &conv_net_autograd);
}

}  // namespace flowops
