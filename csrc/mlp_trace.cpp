// The fused CNF trace op: an MLP vector field f(z, t) and the trace of df/dz in one pass.
//
// Forward-mode tangents ride along the primal: for each layer the B primal rows and the m * B
// tangent rows (one block per probe; the d basis vectors for the exact trace) are stacked into one
// [(1 + m) B, H] matrix and multiplied by the layer's weight in ONE GEMM (at::mm; the bias is added
// to the primal rows only). One vectorized pass then maps the primal rows to sigma(a) and the
// tangent rows to sigma'(a) * a_dot (sigma' evaluated once per primal element, not per probe). At the
// output, tr = scale * sum(eps * f_dot) (exact: the diagonal of the basis tangents).
//
// Backward (analytic, first order through both streams): per layer one stacked GEMM for the input
// gradient (G W) and one for the weight gradient (G^T X), and one vectorized pass that recomputes
// X from the saved pre-activations and turns the input gradient into the pre-activation gradient:
//   G_a = gX_a sigma'(a) + sigma''(a) sum_k gX_k a_dot_k,   G_k = gX_k sigma'(a).
// Only the stacked hidden pre-activations are saved (one flat buffer, also the op's third output).
//
// The Python side (flowops/ops/mlp_trace.py) adds the fake kernels, the Python autograd formula used
// under torch.compile, and the CUDA implementation (torch GEMMs + Triton elementwise kernels).
#include "flowops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
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

// sigma(a), sigma'(a), sigma''(a), vectorized.
template <typename T>
inline void derivs(const Vectorized<T>& a, Act act, Vectorized<T>& h, Vectorized<T>& s1, Vectorized<T>& s2) {
  using Vec = Vectorized<T>;
  const Vec one(T(1));
  if (act == Act::TANH) {
    h = a.tanh();
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

// X[:B] = sigma(a), X[(k+1)B:] = sigma'(a) * a_dot_k, for P = [a; a_dot_0; ...; a_dot_{M-1}], rows of H.
// With `bias`, the primal rows of P get it added first (and written back: P is what backward reads).
template <typename T>
void act_fwd(T* P, T* X, int64_t B, int64_t M, int64_t H, Act act, const T* bias) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t N = B * H;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * (1 + M)));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b * H;
      for (int64_t j = 0; j < H; j += V) {
        const int64_t n = std::min<int64_t>(V, H - j);
        const int64_t o = row + j;
        Vec h, s1, s2;
        Vec a = Vec::loadu(P + o, n);
        if (bias != nullptr) {
          a = a + Vec::loadu(bias + j, n);
          a.store(P + o, n);
        }
        derivs(a, act, h, s1, s2);
        h.store(X + o, n);
        for (int64_t k = 1; k <= M; ++k) (s1 * Vec::loadu(P + k * N + o, n)).store(X + k * N + o, n);
      }
    }
  });
}

// In place on gX (becomes G, the pre-activation gradient); X receives the recomputed activations.
template <typename T>
void act_bwd(T* gX, const T* P, T* X, int64_t B, int64_t M, int64_t H, Act act) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t N = B * H;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * (1 + M)));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b * H;
      for (int64_t j = 0; j < H; j += V) {
        const int64_t n = std::min<int64_t>(V, H - j);
        const int64_t o = row + j;
        Vec h, s1, s2;
        derivs(Vec::loadu(P + o, n), act, h, s1, s2);
        h.store(X + o, n);
        Vec cross(T(0));
        for (int64_t k = 1; k <= M; ++k) {
          const int64_t ok = k * N + o;
          const Vec ad = Vec::loadu(P + ok, n);
          const Vec gh = Vec::loadu(gX + ok, n);
          (s1 * ad).store(X + ok, n);
          (s1 * gh).store(gX + ok, n);
          cross = at::vec::fmadd(gh, ad, cross);
        }
        at::vec::fmadd(Vec::loadu(gX + o, n), s1, s2 * cross).store(gX + o, n);
      }
    }
  });
}

int64_t acts_numel(int64_t B, int64_t m, at::TensorList weights) {
  int64_t n = 0;
  for (size_t l = 0; l + 1 < weights.size(); ++l) n += (1 + m) * B * weights[l].size(0);
  return n;
}

// Samples are processed in chunks of C rows (every chunk runs all layers, forward and backward), so
// the working buffers are chunk-sized and stay in cache; only the saved pre-activations span the batch.
// The saved buffer is chunk-major: layer l's block of chunk c ([(1 + m) C_c, H_l], primal rows first)
// starts at base_l + (1 + m) * b0 * H_l, where b0 is the chunk's first sample.
int64_t chunk_rows(int64_t B, int64_t m, int64_t hmax, int64_t elem) {
  const int64_t target = (128 * 1024) / std::max<int64_t>(1, elem * (1 + m) * std::max<int64_t>(hmax, 1));
  int64_t c = std::max<int64_t>(target, (256 + m) / (1 + m));
  c = (c + 15) / 16 * 16;
  return std::min(std::max<int64_t>(c, 1), std::max<int64_t>(B, 1));
}

struct Layout {
  int64_t B, d, m, L, C;
  std::vector<int64_t> base;  // offset of each hidden layer's region in the saved buffer
};

Layout make_layout(int64_t B, int64_t d, int64_t m, at::TensorList weights, int64_t elem) {
  Layout lay{B, d, m, static_cast<int64_t>(weights.size()), 0, {}};
  int64_t off = 0, hmax = 1;
  for (int64_t l = 0; l + 1 < lay.L; ++l) {
    lay.base.push_back(off);
    off += (1 + m) * B * weights[l].size(0);
    hmax = std::max(hmax, weights[l].size(0));
  }
  lay.C = chunk_rows(B, m, hmax, elem);
  return lay;
}

// The first layer's stacked pre-activations of the chunk [b0, b0 + n): primal rows z W^T + t w_t + b
// (the bias is added here) and the tangent rows eps W^T (exact: the basis, W[:, i] in every row).
void first_layer(at::Tensor& P, const at::Tensor& z, const at::Tensor& t, const at::Tensor& w, const at::Tensor& b,
                 const at::Tensor& eps, bool exact, int64_t b0, int64_t n, int64_t d, int64_t m) {
  const int64_t H = w.size(0);
  auto wz = w.narrow(1, 0, d);
  auto Pp = P.narrow(0, 0, n);
  at::addmm_out(Pp, b, z.narrow(0, b0, n), wz.t());
  Pp.addr_(t.narrow(0, b0, n), w.select(1, d));
  auto Pt = P.narrow(0, n, m * n);
  if (exact) {
    Pt.view({d, n, H}).copy_(wz.t().unsqueeze(1));
  } else {
    at::mm_out(Pt, eps.narrow(1, b0, n).reshape({m * n, d}), wz.t());
  }
}

// acc += A^T B for row-stacked A [K, M], B [K, N]. MKL's transposed-A GEMM is several times slower than
// the plain one when the output is small and K long (hidden 64: a 64 x 64 weight gradient summed over
// hundreds of stacked rows), so A^T is materialized first there (a copy of A, cheap next to the GEMM).
void accumulate_tn(at::Tensor acc, const at::Tensor& A, const at::Tensor& B) {
  if (A.size(1) * B.size(1) < 16 * A.size(0)) {
    acc.addmm_(A.t().contiguous(), B);
  } else {
    acc.addmm_(A.t(), B);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_trace_fwd_cpu(const at::Tensor& z_in, const at::Tensor& t_in,
                                                                 at::TensorList weights, at::TensorList biases,
                                                                 const std::optional<at::Tensor>& eps_opt,
                                                                 c10::string_view activation) {
  check(z_in, t_in, weights, biases, eps_opt);
  const Act act = parse_act(activation);
  const bool exact = !(eps_opt.has_value() && eps_opt->defined());
  auto z = z_in.contiguous();
  auto t = t_in.contiguous();
  const int64_t B = z.size(0), d = z.size(1);
  const int64_t m = exact ? d : eps_opt->size(0);
  const int64_t L = static_cast<int64_t>(weights.size());
  auto acts = at::empty({acts_numel(B, m, weights)}, z.options());
  auto f = at::empty({B, d}, z.options());
  auto tr = at::empty({B}, z.options());
  if (B == 0) return {f, tr, acts};
  at::Tensor eps = exact ? at::Tensor() : eps_opt->contiguous();
  const Layout lay = make_layout(B, d, m, weights, z.element_size());
  int64_t hmax = 1;
  for (int64_t l = 0; l + 1 < L; ++l) hmax = std::max(hmax, weights[l].size(0));
  at::Tensor scratch = at::empty({(1 + m) * lay.C * hmax}, z.options());
  at::Tensor Fbuf = at::empty({(1 + m) * lay.C * d}, z.options());
  std::vector<at::Tensor> bc(L);
  for (int64_t l = 0; l < L; ++l) bc[l] = biases[l].contiguous();
  for (int64_t b0 = 0; b0 < B; b0 += lay.C) {
    const int64_t n = std::min(lay.C, B - b0);
    at::Tensor X;
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor& w = weights[l];
      const int64_t H = w.size(0);
      const bool hidden = l + 1 < L;
      at::Tensor P = hidden ? acts.narrow(0, lay.base[l] + (1 + m) * b0 * H, (1 + m) * n * H).view({(1 + m) * n, H})
                            : Fbuf.narrow(0, 0, (1 + m) * n * d).view({(1 + m) * n, d});
      if (l == 0) {
        first_layer(P, z, t, w, bc[0], eps, exact, b0, n, d, m);
      } else {
        at::mm_out(P, X, w.t());
      }
      if (hidden) {
        X = scratch.narrow(0, 0, (1 + m) * n * H).view({(1 + m) * n, H});
        AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_trace_act_fwd", [&] {
          act_fwd<scalar_t>(P.mutable_data_ptr<scalar_t>(), X.mutable_data_ptr<scalar_t>(), n, m, H, act,
                            l == 0 ? nullptr : bc[l].const_data_ptr<scalar_t>());
        });
      } else {
        auto fc = f.narrow(0, b0, n);
        at::add_out(fc, P.narrow(0, 0, n), bc[l]);
        auto Fd = P.narrow(0, n, m * n).view({m, n, d});
        auto trc = tr.narrow(0, b0, n);
        if (exact) {
          at::sum_out(trc, Fd.diagonal(0, 0, 2), {1});
        } else {
          at::sum_out(trc, Fd * eps.narrow(1, b0, n), {0, 2});
          trc.mul_(1.0 / static_cast<double>(m));
        }
      }
    }
  }
  return {f, tr, acts};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_trace_bwd_cpu(
    const at::Tensor& grad_f, const at::Tensor& grad_trace, const at::Tensor& z_in, const at::Tensor& t_in,
    at::TensorList weights, at::TensorList biases, const std::optional<at::Tensor>& eps_opt, const at::Tensor& acts,
    c10::string_view activation) {
  check(z_in, t_in, weights, biases, eps_opt);
  const Act act = parse_act(activation);
  const bool exact = !(eps_opt.has_value() && eps_opt->defined());
  auto z = z_in.contiguous();
  auto t = t_in.contiguous();
  const int64_t B = z.size(0), d = z.size(1);
  const int64_t m = exact ? d : eps_opt->size(0);
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(acts.numel() == acts_numel(B, m, weights), "flowops.mlp_trace_bwd: acts has ", acts.numel(),
                    " elements, expected ", acts_numel(B, m, weights));
  TORCH_CHECK_VALUE(grad_f.numel() == B * d && grad_trace.numel() == B,
                    "flowops.mlp_trace_bwd: gradients must be [B, d] and [B]");
  std::vector<at::Tensor> gws(L), gbs(L);
  for (int64_t l = 0; l < L; ++l) {
    gws[l] = at::zeros_like(weights[l], at::MemoryFormat::Contiguous);
    gbs[l] = at::zeros_like(biases[l], at::MemoryFormat::Contiguous);
  }
  auto gz = at::empty({B, d}, z.options());
  auto gt = at::empty({B}, z.options());
  if (B == 0) return {gz, gt, gws, gbs};
  at::Tensor eps = exact ? at::Tensor() : eps_opt->contiguous();
  auto gf = grad_f.to(z.scalar_type()).reshape({B, d}).contiguous();
  auto gtr = grad_trace.to(z.scalar_type()).reshape({B}).contiguous();
  auto actc = acts.contiguous();
  const Layout lay = make_layout(B, d, m, weights, z.element_size());
  int64_t hmax = 1;
  for (int64_t l = 0; l + 1 < L; ++l) hmax = std::max(hmax, weights[l].size(0));
  const int64_t cap = (1 + m) * lay.C * std::max(hmax, d);
  at::Tensor buf_a = at::empty({cap}, z.options()), buf_b = at::empty({cap}, z.options());
  at::Tensor xbuf = at::empty({(1 + m) * lay.C * hmax}, z.options());
  const double scale = exact ? 1.0 : 1.0 / static_cast<double>(m);
  const at::Tensor& w0 = weights[0];
  auto wz = w0.narrow(1, 0, d);
  auto gw0z = gws[0].narrow(1, 0, d);
  auto gw0t = gws[0].select(1, d);
  for (int64_t b0 = 0; b0 < B; b0 += lay.C) {
    const int64_t n = std::min(lay.C, B - b0);
    at::Tensor G = buf_a.narrow(0, 0, (1 + m) * n * d).view({(1 + m) * n, d});
    at::Tensor spare = buf_b;
    G.narrow(0, 0, n).copy_(gf.narrow(0, b0, n));
    auto Gd = G.narrow(0, n, m * n).view({m, n, d});
    auto gtc = gtr.narrow(0, b0, n);
    if (exact) {
      Gd.zero_();
      Gd.diagonal(0, 0, 2).copy_(gtc.unsqueeze(1).expand({n, d}));
    } else {
      at::mul_out(Gd, eps.narrow(1, b0, n), gtc.mul(scale).view({1, n, 1}));
    }
    for (int64_t l = L - 1; l >= 1; --l) {
      const at::Tensor& w = weights[l];
      const int64_t Hp = weights[l - 1].size(0);
      auto P = actc.narrow(0, lay.base[l - 1] + (1 + m) * b0 * Hp, (1 + m) * n * Hp).view({(1 + m) * n, Hp});
      at::Tensor gX = spare.narrow(0, 0, (1 + m) * n * Hp).view({(1 + m) * n, Hp});
      at::mm_out(gX, G, w);
      at::Tensor X = xbuf.narrow(0, 0, (1 + m) * n * Hp).view({(1 + m) * n, Hp});
      AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_trace_act_bwd", [&] {
        act_bwd<scalar_t>(gX.mutable_data_ptr<scalar_t>(), P.const_data_ptr<scalar_t>(), X.mutable_data_ptr<scalar_t>(),
                          n, m, Hp, act);
      });
      accumulate_tn(gws[l], G, X);
      gbs[l].add_(G.narrow(0, 0, n).sum(0));
      spare = G.data_ptr() == buf_a.data_ptr() ? buf_a : buf_b;
      G = gX;
    }
    auto ga = G.narrow(0, 0, n);
    auto gAd = G.narrow(0, n, m * n);
    auto zc = z.narrow(0, b0, n);
    accumulate_tn(gw0z, ga, zc);
    if (exact) {
      gw0z.add_(gAd.view({d, n, -1}).sum(1).t());
    } else {
      accumulate_tn(gw0z, gAd, eps.narrow(1, b0, n).reshape({m * n, d}));
    }
    gw0t.addmv_(ga.t(), t.narrow(0, b0, n));
    gbs[0].add_(ga.sum(0));
    auto gzc = gz.narrow(0, b0, n);
    auto gtc2 = gt.narrow(0, b0, n);
    at::mm_out(gzc, ga, wz);
    at::mv_out(gtc2, ga, w0.select(1, d));
  }
  return {gz, gt, gws, gbs};
}

namespace {

// Eager fast path: the autograd node lives in C++.
class MLPTraceFn : public torch::autograd::Function<MLPTraceFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& t, at::TensorList weights,
                               at::TensorList biases, const std::optional<at::Tensor>& eps,
                               c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [f, tr, acts] = mlp_trace_fwd_cpu(z, t, weights, biases, eps, activation);
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
    auto [gz, gtime, gws, gbs] = mlp_trace_bwd_cpu(gf, gt, z, s[1], weights, biases, eps, s[2], activation);
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
