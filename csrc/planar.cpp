// The fused planar-flow stack: K planar maps z <- z + u_k tanh(w_k . z + b_k) applied in
// one pass over memory, with the summed log-det log|1 + (1 - t_k^2) (w_k . u_k)|, and its
// analytic backward. Operator schemas, CPU kernels and the C++ autograd node live here; the
// Python side (flowops/ops/planar.py) adds fake kernels, the Python autograd formula used under
// torch.compile, and the CUDA (Triton) implementation.
//
// Layout: z is [B, d] row-major. The kernels vectorize across samples: a tile of V samples
// (one at::vec lane each) is transposed into a [d][V] block, every layer is then d FMAs for
// the dot product, one vector tanh, d FMAs for the update and one vector log, and the tile is
// transposed back on store. This suits d = 2 (toy flows) and d = 64 alike, with no horizontal
// reductions and one vector tanh per V samples.
//
// Backward: per tile, the forward is recomputed from the saved input z_0 into a per-thread
// buffer of the K layer inputs z_k and the K tanh values (nothing but z_0 is saved between
// forward and backward), then the layers are walked from K-1 down to 0. Parameter gradients
// are accumulated in vector registers per fixed-size chunk of samples, reduced per chunk into a
// [chunks, K, 2d+2] partial buffer and summed in a fixed order: deterministic, no atomics, the
// same bits for any thread count.
#include "flowops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace flowops {
namespace {

using at::vec::Vectorized;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kChunkTiles = 16;  // tiles per backward chunk (one partial-gradient row each)

void check_inputs(const at::Tensor& z, const at::Tensor& w, const at::Tensor& u, const at::Tensor& b) {
  TORCH_CHECK_VALUE(z.dim() == 2, "planar_stack: z must be [batch, features], got shape ", z.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == z.size(1), "planar_stack: w must be [K, ", z.size(1),
                    "], got shape ", w.sizes());
  TORCH_CHECK_VALUE(u.sizes() == w.sizes(), "planar_stack: u_hat must have w's shape ", w.sizes(), ", got ",
                    u.sizes());
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == w.size(0), "planar_stack: b must be [", w.size(0), "], got shape ",
                    b.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == z.scalar_type() && u.scalar_type() == z.scalar_type() &&
                       b.scalar_type() == z.scalar_type(),
                   "planar_stack: w, u_hat and b must have z's dtype ", z.scalar_type());
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
                   "planar_stack (cpu): z must be float32 or float64, got ", z.scalar_type());
}

// Transposes n <= V rows of x (row length d) into blk[j * V + lane], zero-padding lanes >= n.
template <typename T>
inline void load_tile(const T* x, int64_t n, int64_t d, T* blk, int64_t V) {
  for (int64_t j = 0; j < d; ++j) {
    T* col = blk + j * V;
    for (int64_t s = 0; s < n; ++s) col[s] = x[s * d + j];
    for (int64_t s = n; s < V; ++s) col[s] = T(0);
  }
}

template <typename T>
inline void store_tile(T* x, int64_t n, int64_t d, const T* blk, int64_t V) {
  for (int64_t s = 0; s < n; ++s)
    for (int64_t j = 0; j < d; ++j) x[s * d + j] = blk[j * V + s];
}

// sum_j x[j] * c[j] + init over the lanes; four independent accumulators once d >= 8, so the
// FMA latency chain is d/4 long instead of d (d = 64: the dot product would otherwise bound the layer).
template <typename T>
inline Vectorized<T> dot(const Vectorized<T>* x, const T* c, int64_t d, T init) {
  using Vec = Vectorized<T>;
  if (d < 8) {
    Vec a(init);
    for (int64_t j = 0; j < d; ++j) a = at::vec::fmadd(x[j], Vec(c[j]), a);
    return a;
  }
  Vec a0(init), a1(T(0)), a2(T(0)), a3(T(0));
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    a0 = at::vec::fmadd(x[j], Vec(c[j]), a0);
    a1 = at::vec::fmadd(x[j + 1], Vec(c[j + 1]), a1);
    a2 = at::vec::fmadd(x[j + 2], Vec(c[j + 2]), a2);
    a3 = at::vec::fmadd(x[j + 3], Vec(c[j + 3]), a3);
  }
  for (; j < d; ++j) a0 = at::vec::fmadd(x[j], Vec(c[j]), a0);
  return (a0 + a1) + (a2 + a3);
}

// DIM > 0: the feature count is the compile-time constant DIM (registers); DIM == 0: runtime d.
template <typename T, int DIM>
void fwd_kernel(const T* z, int64_t B, int64_t d_rt, int64_t K, const T* w, const T* u, const T* b, const T* c,
                T* out, T* logdet) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t d = DIM > 0 ? DIM : d_rt;
  const int64_t tiles = (B + V - 1) / V;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, K * d));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> blk_store(d * V);
    std::vector<Vec> zdyn(DIM > 0 ? 0 : d);
    Vec zfix[DIM > 0 ? DIM : 1];
    Vec* zv = DIM > 0 ? zfix : zdyn.data();
    T* blk = blk_store.data();
    T ld_store[V];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b0 = tile * V, n = std::min<int64_t>(V, B - b0);
      load_tile(z + b0 * d, n, d, blk, V);
      for (int64_t j = 0; j < d; ++j) zv[j] = Vec::loadu(blk + j * V);
      Vec ld(T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T* wk = w + k * d;
        const T* uk = u + k * d;
        Vec t = dot(zv, wk, d, b[k]).tanh();
        for (int64_t j = 0; j < d; ++j) zv[j] = at::vec::fmadd(t, Vec(uk[j]), zv[j]);
        Vec D = at::vec::fmadd(Vec(T(1)) - t * t, Vec(c[k]), Vec(T(1)));
        ld = ld + D.abs().log();
      }
      for (int64_t j = 0; j < d; ++j) zv[j].store(blk + j * V);
      store_tile(out + b0 * d, n, d, blk, V);
      ld.store(ld_store);
      for (int64_t s = 0; s < n; ++s) logdet[b0 + s] = ld_store[s];
    }
  });
}

// partial: [chunks, K, 2d + 2] holding per layer sum(s z_k) (grad w without the c term), sum(g t)
// (grad u without the c term), sum(s) (grad b) and sum(r) (the coefficient of the c terms).
template <typename T, int DIM>
void bwd_kernel(const T* gz, const T* gld, const T* z, int64_t B, int64_t d_rt, int64_t K, const T* w,
                const T* u, const T* b, const T* c, T* gx, T* partial) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t d = DIM > 0 ? DIM : d_rt;
  const int64_t tiles = (B + V - 1) / V;
  const int64_t chunks = (tiles + kChunkTiles - 1) / kChunkTiles;
  const int64_t P = 2 * d + 2;
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<T> blk_store(d * V);
    T* blk = blk_store.data();
    std::vector<Vec> zs(K * d), ts(K), acc_w(K * d), acc_u(K * d), acc_b(K), acc_r(K);
    std::vector<Vec> zdyn(DIM > 0 ? 0 : d), gdyn(DIM > 0 ? 0 : d);
    Vec zfix[DIM > 0 ? DIM : 1], gfix[DIM > 0 ? DIM : 1];
    Vec* zv = DIM > 0 ? zfix : zdyn.data();
    Vec* gv = DIM > 0 ? gfix : gdyn.data();
    T lanes[V];
    for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
      std::fill(acc_w.begin(), acc_w.end(), Vec(T(0)));
      std::fill(acc_u.begin(), acc_u.end(), Vec(T(0)));
      std::fill(acc_b.begin(), acc_b.end(), Vec(T(0)));
      std::fill(acc_r.begin(), acc_r.end(), Vec(T(0)));
      const int64_t tend = std::min(tiles, (chunk + 1) * kChunkTiles);
      for (int64_t tile = chunk * kChunkTiles; tile < tend; ++tile) {
        const int64_t b0 = tile * V, n = std::min<int64_t>(V, B - b0);
        // recompute the forward, keeping each layer's input and tanh
        load_tile(z + b0 * d, n, d, blk, V);
        for (int64_t j = 0; j < d; ++j) zv[j] = Vec::loadu(blk + j * V);
        for (int64_t k = 0; k < K; ++k) {
          const T* wk = w + k * d;
          const T* uk = u + k * d;
          Vec* zk = zs.data() + k * d;
          for (int64_t j = 0; j < d; ++j) zk[j] = zv[j];
          Vec t = dot(zv, wk, d, b[k]).tanh();
          ts[k] = t;
          for (int64_t j = 0; j < d; ++j) zv[j] = at::vec::fmadd(t, Vec(uk[j]), zv[j]);
        }
        // upstream gradients (padded lanes are zero, so they add nothing to the parameter sums)
        load_tile(gz + b0 * d, n, d, blk, V);
        for (int64_t j = 0; j < d; ++j) gv[j] = Vec::loadu(blk + j * V);
        for (int64_t s = 0; s < V; ++s) lanes[s] = s < n ? gld[b0 + s] : T(0);
        const Vec gl = Vec::loadu(lanes);
        for (int64_t k = K - 1; k >= 0; --k) {
          const T* wk = w + k * d;
          const T* uk = u + k * d;
          const Vec* zk = zs.data() + k * d;
          Vec* aw = acc_w.data() + k * d;
          Vec* au = acc_u.data() + k * d;
          const Vec t = ts[k];
          const Vec ck(c[k]);
          const Vec s1 = Vec(T(1)) - t * t;
          const Vec invD = Vec(T(1)) / at::vec::fmadd(s1, ck, Vec(T(1)));
          const Vec gdot = dot(gv, uk, d, T(0));
          const Vec glD = gl * invD;
          // d/dt [g . u t + gl log|1 + (1 - t^2) c|] = g . u - 2 gl t c / D ; times dt/da = 1 - t^2
          const Vec s = (gdot - Vec(T(2)) * glD * t * ck) * s1;
          for (int64_t j = 0; j < d; ++j) {
            au[j] = at::vec::fmadd(gv[j], t, au[j]);
            aw[j] = at::vec::fmadd(s, zk[j], aw[j]);
            gv[j] = at::vec::fmadd(s, Vec(wk[j]), gv[j]);
          }
          acc_b[k] = acc_b[k] + s;
          acc_r[k] = at::vec::fmadd(glD, s1, acc_r[k]);
        }
        for (int64_t j = 0; j < d; ++j) gv[j].store(blk + j * V);
        store_tile(gx + b0 * d, n, d, blk, V);
      }
      T* prow = partial + chunk * K * P;
      auto sum = [](const Vec& v) { return at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, v); };
      for (int64_t k = 0; k < K; ++k) {
        T* pk = prow + k * P;
        for (int64_t j = 0; j < d; ++j) {
          pk[j] = sum(acc_w[k * d + j]);
          pk[d + j] = sum(acc_u[k * d + j]);
        }
        pk[2 * d] = sum(acc_b[k]);
        pk[2 * d + 1] = sum(acc_r[k]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> planar_stack_fwd_cpu(const at::Tensor& z_in, const at::Tensor& w_in,
                                                        const at::Tensor& u_in, const at::Tensor& b_in) {
  check_inputs(z_in, w_in, u_in, b_in);
  auto z = z_in.contiguous();
  auto w = w_in.contiguous();
  auto u = u_in.contiguous();
  auto b = b_in.contiguous();
  const int64_t B = z.size(0), d = z.size(1), K = w.size(0);
  auto out = at::empty_like(z, at::MemoryFormat::Contiguous);
  auto logdet = at::zeros({B}, z.options());
  if (B == 0) return {out, logdet};
  if (d == 0 || K == 0) {
    out.copy_(z);
    return {out, logdet};
  }
  auto c = (w * u).sum(1).contiguous();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "planar_stack_fwd_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    auto run = [&](auto kernel) {
      kernel(zp, B, d, K, w.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
             c.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), logdet.mutable_data_ptr<scalar_t>());
    };
    switch (d) {
      case 1: run(fwd_kernel<scalar_t, 1>); break;
      case 2: run(fwd_kernel<scalar_t, 2>); break;
      case 3: run(fwd_kernel<scalar_t, 3>); break;
      case 4: run(fwd_kernel<scalar_t, 4>); break;
      default: run(fwd_kernel<scalar_t, 0>); break;
    }
  });
  return {out, logdet};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> planar_stack_bwd_cpu(
    const at::Tensor& grad_z, const at::Tensor& grad_logdet, const at::Tensor& z_in, const at::Tensor& w_in,
    const at::Tensor& u_in, const at::Tensor& b_in) {
  check_inputs(z_in, w_in, u_in, b_in);
  TORCH_CHECK_VALUE(grad_z.sizes() == z_in.sizes(), "planar_stack_bwd: grad_z must have z's shape ", z_in.sizes(),
                    ", got ", grad_z.sizes());
  TORCH_CHECK_VALUE(grad_logdet.numel() == z_in.size(0), "planar_stack_bwd: grad_logdet must have shape [",
                    z_in.size(0), "], got ", grad_logdet.sizes());
  auto z = z_in.contiguous();
  auto w = w_in.contiguous();
  auto u = u_in.contiguous();
  auto b = b_in.contiguous();
  auto gz = grad_z.to(z.scalar_type()).contiguous();
  auto gld = grad_logdet.to(z.scalar_type()).reshape({-1}).contiguous();
  const int64_t B = z.size(0), d = z.size(1), K = w.size(0);
  auto gx = at::empty_like(z, at::MemoryFormat::Contiguous);
  if (B == 0 || d == 0 || K == 0) {
    gx.copy_(gz);
    return {gx, at::zeros_like(w), at::zeros_like(u), at::zeros_like(b)};
  }
  auto c = (w * u).sum(1).contiguous();
  constexpr int64_t Vf = Vectorized<float>::size();
  const int64_t V = z.scalar_type() == at::kDouble ? Vectorized<double>::size() : Vf;
  const int64_t tiles = (B + V - 1) / V;
  const int64_t chunks = (tiles + kChunkTiles - 1) / kChunkTiles;
  auto partial = at::empty({chunks, K, 2 * d + 2}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "planar_stack_bwd_cpu", [&] {
    auto run = [&](auto kernel) {
      kernel(gz.const_data_ptr<scalar_t>(), gld.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), B, d, K,
             w.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
             c.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<scalar_t>());
    };
    switch (d) {
      case 1: run(bwd_kernel<scalar_t, 1>); break;
      case 2: run(bwd_kernel<scalar_t, 2>); break;
      case 3: run(bwd_kernel<scalar_t, 3>); break;
      case 4: run(bwd_kernel<scalar_t, 4>); break;
      default: run(bwd_kernel<scalar_t, 0>); break;
    }
  });
  // fixed-order sum over chunks (a plain loop: at::sum's order could depend on the thread count)
  auto total = partial.select(0, 0).clone();
  for (int64_t i = 1; i < chunks; ++i) total.add_(partial.select(0, i));
  auto R = total.select(1, 2 * d + 1).unsqueeze(1);
  auto gw = total.narrow(1, 0, d) + R * u;
  auto gu = total.narrow(1, d, d) + R * w;
  auto gb = total.select(1, 2 * d).contiguous();
  return {gx, gw, gu, gb};
}

namespace {

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& z, const at::Tensor& w, const at::Tensor& u,
                                            const at::Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flowops::planar_stack_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(z, w, u, b);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bwd(const at::Tensor& gz, const at::Tensor& gld,
                                                                    const at::Tensor& z, const at::Tensor& w,
                                                                    const at::Tensor& u, const at::Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flowops::planar_stack_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(gz, gld, z, w, u, b);
}

// Eager fast path: the autograd node lives in C++.
class PlanarStackFn : public torch::autograd::Function<PlanarStackFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& w, const at::Tensor& u,
                               const at::Tensor& b) {
    auto [out, logdet] = call_fwd(z, w, u, b);
    ctx->save_for_backward({z, w, u, b});
    return {out, logdet};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_first_order("planar_stack");
    auto s = ctx->get_saved_variables();
    auto gz = grads[0].defined() ? grads[0] : at::zeros_like(s[0]);
    auto gl = grads[1].defined() ? grads[1] : at::zeros({s[0].size(0)}, s[0].options());
    auto [gx, gw, gu, gb] = call_bwd(gz, gl, s[0], s[1], s[2], s[3]);
    return {gx, gw, gu, gb};
  }
};

std::tuple<at::Tensor, at::Tensor> planar_stack_autograd(const at::Tensor& z, const at::Tensor& w,
                                                         const at::Tensor& u, const at::Tensor& b) {
  auto out = PlanarStackFn::apply(z, w, u, b);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> planar_stack_plain(const at::Tensor& z, const at::Tensor& w, const at::Tensor& u,
                                                      const at::Tensor& b) {
  return call_fwd(z, w, u, b);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowops, m) {
  m.def("planar_stack_fwd(Tensor z, Tensor w, Tensor u_hat, Tensor b) -> (Tensor, Tensor)");
  m.def("planar_stack_bwd(Tensor grad_z, Tensor grad_logdet, Tensor z, Tensor w, Tensor u_hat, Tensor b) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("planar_stack(Tensor z, Tensor w, Tensor u_hat, Tensor b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flowops, CPU, m) {
  m.impl("planar_stack_fwd", &planar_stack_fwd_cpu);
  m.impl("planar_stack_bwd", &planar_stack_bwd_cpu);
}

TORCH_LIBRARY_IMPL(flowops, Autograd, m) {
  m.impl("planar_stack", &planar_stack_autograd);
}

TORCH_LIBRARY_IMPL(flowops, CompositeExplicitAutograd, m) {
  m.impl("planar_stack", &planar_stack_plain);
}

}  // namespace flowops
