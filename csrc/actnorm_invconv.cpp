// The fused Glow op actnorm_invconv: ActNorm folded into the invertible 1x1 convolution.
//
//   forward:  y = W diag(e) (x + b)            = A x + c,  A = W diag(e),   c = W (e * b)
//   inverse:  x = diag(1/e) M z - b            = A z + c,  A = diag(1/e) M, c = -b
//
// with e = exp(log_scale), W the 1x1-convolution matrix and M = W^-1 (the caller passes the matrix of
// the direction it runs, so an inverse built from triangular solves and cached by the layer is reused).
// The log-det is +-S * (sum(log_scale) + w_logdet) per sample, S = prod(spatial), w_logdet = log|det W|.
//
// Both directions are one channel matmul per sample on the [N, C, S] view of NCHW memory (no permute
// copies): one pass over the activations instead of ActNorm's two elementwise passes plus a separate
// convolution. The backward is two matmuls over the activations (grad_x = A^T grad_y and the C x C
// parameter gradient sum_n grad_y[n] x[n]^T, reduced over samples in a fixed order: deterministic, no
// atomics) and one channel sum of grad_y; everything else is C x C algebra mapping the folded (A, c)
// gradients back to log_scale, bias, weight and w_logdet.
//
// Registered ops: actnorm_invconv_fwd / actnorm_invconv_bwd (CPU kernels here; fake kernels, the Python
// autograd formula used under torch.compile and the CUDA/Triton kernels in flowops/ops/actnorm_invconv.py)
// and actnorm_invconv, whose autograd node lives in C++ (the eager CPU fast path).
#include "flowops.h"

#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <array>
#include <algorithm>
#include <cmath>
#include <vector>
#include <torch/library.h>

namespace flowops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_inputs(const at::Tensor& x, const at::Tensor& ls, const at::Tensor& b, const at::Tensor& w,
                  const at::Tensor* wld) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "actnorm_invconv: x must be [batch, channels, *spatial], got shape ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(ls.dim() == 1 && ls.size(0) == C, "actnorm_invconv: log_scale must have shape [", C,
                    "], got ", ls.sizes());
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == C, "actnorm_invconv: bias must have shape [", C, "], got ",
                    b.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == C && w.size(1) == C, "actnorm_invconv: weight must have shape [",
                    C, ", ", C, "], got ", w.sizes());
  TORCH_CHECK_VALUE(!wld || wld->numel() == 1, "actnorm_invconv: w_logdet must hold one value, got shape ",
                    wld->sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(ls.scalar_type() == dt && b.scalar_type() == dt && w.scalar_type() == dt &&
                       (!wld || wld->scalar_type() == dt),
                   "actnorm_invconv: log_scale, bias, weight and w_logdet must have x's dtype ", dt);
}

// The upstream gradients of a backward at x: grad_y of x's shape, grad_logdet one value per sample.
void check_grads(const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "actnorm_invconv_bwd: grad_y must have x's shape ", x.sizes(),
                    ", got ", grad_y.sizes());
  TORCH_CHECK_VALUE(grad_logdet.numel() == x.size(0), "actnorm_invconv_bwd: grad_logdet must have shape [",
                    x.size(0), "], got ", grad_logdet.sizes());
}

int64_t spatial_size(const at::Tensor& x) {
  int64_t s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s *= x.size(d);
  return s;
}

// (A, c, e) of the folded map; e = exp(log_scale) (forward) or exp(-log_scale) (inverse).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fold(const at::Tensor& ls, const at::Tensor& b, const at::Tensor& w,
                                                    bool inverse) {
  if (!inverse) {
    auto e = ls.exp();
    return {(w * e.unsqueeze(0)).contiguous(), at::mv(w, e * b), e};
  }
  auto ie = ls.neg().exp();
  return {(w * ie.unsqueeze(1)).contiguous(), b.neg(), ie};
}

// The map itself, y = A x + c (no log-det): one channel matmul per sample on the [N, C, S] view.
at::Tensor apply_folded(const at::Tensor& x_in, const at::Tensor& ls, const at::Tensor& b, const at::Tensor& w,
                        bool inverse) {
  auto x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = spatial_size(x);
  auto [A, c, e] = fold(ls, b, w, inverse);
  at::Tensor y;
  if (S == 1) {
    y = at::addmm(c, x.view({N, C}), A.t());
  } else {
    y = at::baddbmm(c.view({1, C, 1}), A.expand({N, C, C}), x.view({N, C, S}));
  }
  return y.view(x.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> actnorm_invconv_fwd_cpu(const at::Tensor& x_in, const at::Tensor& ls,
                                                           const at::Tensor& b, const at::Tensor& w,
                                                           const at::Tensor& wld, bool inverse) {
  check_inputs(x_in, ls, b, w, &wld);
  const int64_t N = x_in.size(0), S = spatial_size(x_in);
  auto y = apply_folded(x_in, ls, b, w, inverse);
  auto total = (ls.sum() + wld.reshape({})) * static_cast<double>(inverse ? -S : S);
  auto logdet = total.expand({N}).contiguous();
  return {y, logdet};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> actnorm_invconv_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& x_in, const at::Tensor& ls,
    const at::Tensor& b, const at::Tensor& w, const at::Tensor& wld, bool inverse) {
  check_inputs(x_in, ls, b, w, &wld);
  check_grads(grad_y, grad_logdet, x_in);
  auto x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = spatial_size(x);
  auto g = grad_y.to(x.scalar_type()).contiguous();
  auto [A, c, e] = fold(ls, b, w, inverse);
  at::Tensor gx, gA, gc;
  if (S == 1) {
    auto g2 = g.view({N, C}), x2 = x.view({N, C});
    gx = at::mm(g2, A);
    gA = at::mm(g2.t(), x2);
    gc = g2.sum(0);
  } else {
    auto g3 = g.view({N, C, S}), x3 = x.view({N, C, S});
    gx = at::bmm(A.t().expand({N, C, C}), g3);
    // per-sample C x C products, summed over samples in index order (deterministic)
    gA = at::bmm(g3, x3.transpose(1, 2)).sum(0);
    gc = g3.sum(at::IntArrayRef{0, 2});
  }
  const double s = static_cast<double>(S);
  auto gsum = grad_logdet.to(x.scalar_type()).sum() * s;  // d(total)/d(log_scale_i) and d/d(w_logdet), +-
  at::Tensor gls, gb, gw, gwld;
  if (!inverse) {
    // A = W diag(e), c = W (e * b)
    auto eb = e * b;
    auto wtgc = at::mv(w.t(), gc);
    gw = gA * e.unsqueeze(0) + at::outer(gc, eb);
    auto ge = (gA * w).sum(0) + wtgc * b;
    gb = wtgc * e;
    gls = ge * e + gsum;
    gwld = gsum;
  } else {
    // A = diag(1/e) M, c = -b
    gw = gA * e.unsqueeze(1);
    gls = -(e * (gA * w).sum(1)) - gsum;
    gb = gc.neg();
    gwld = gsum.neg();
  }
  return {gx.view(x.sizes()), gls, gb, gw, gwld.reshape(wld.sizes()).clone()};
}

namespace {

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& x, const at::Tensor& ls, const at::Tensor& b,
                                            const at::Tensor& w, const at::Tensor& wld, bool inverse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flowops::actnorm_invconv_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, ls, b, w, wld, inverse);
}

using Grads5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads5 call_bwd(const at::Tensor& gy, const at::Tensor& gld, const at::Tensor& x, const at::Tensor& ls,
                const at::Tensor& b, const at::Tensor& w, const at::Tensor& wld, bool inverse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flowops::actnorm_invconv_bwd", "")
                       .typed<Grads5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(gy, gld, x, ls, b, w, wld, inverse);
}

// Eager fast path: the autograd node lives in C++.
class ActnormInvconvFn : public torch::autograd::Function<ActnormInvconvFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& ls, const at::Tensor& b,
                               const at::Tensor& w, const at::Tensor& wld, bool inverse) {
    auto [y, logdet] = call_fwd(x, ls, b, w, wld, inverse);
    ctx->save_for_backward({x, ls, b, w, wld});
    ctx->saved_data["inverse"] = inverse;
    return {y, logdet};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_first_order("actnorm_invconv");
    auto s = ctx->get_saved_variables();
    auto gy = grads[0].defined() ? grads[0] : at::zeros_like(s[0]);
    auto gl = grads[1].defined() ? grads[1] : at::zeros({s[0].size(0)}, s[0].options());
    auto [gx, gls, gb, gw, gwld] = call_bwd(gy, gl, s[0], s[1], s[2], s[3], s[4],
                                            ctx->saved_data["inverse"].toBool());
    return {gx, gls, gb, gw, gwld, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> actnorm_invconv_autograd(const at::Tensor& x, const at::Tensor& ls,
                                                            const at::Tensor& b, const at::Tensor& w,
                                                            const at::Tensor& wld, bool inverse) {
  auto out = ActnormInvconvFn::apply(x, ls, b, w, wld, inverse);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> actnorm_invconv_plain(const at::Tensor& x, const at::Tensor& ls,
                                                         const at::Tensor& b, const at::Tensor& w,
                                                         const at::Tensor& wld, bool inverse) {
  return call_fwd(x, ls, b, w, wld, inverse);
}

// Glow's LU weight W = P L U, L = tril(lower, -1) + I, U = triu(upper, 1) + diag(sign * exp(log_s)), as one
// autograd node: the fused layers rebuild W once per training step, and as a chain of ~10 small eager ops
// (and as many backward nodes) that costs more than the C x C arithmetic. Backward, with G = P^T grad_W:
// grad_lower = tril(G U^T, -1), grad_upper = triu(L^T G, 1), grad_log_s = diag(L^T G) * sign * exp(log_s).
void check_lu_args(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& sign,
                   const at::Tensor& log_s) {
  TORCH_CHECK_VALUE(lower.dim() == 2 && lower.size(0) == lower.size(1), "lu_weight: lower must be square, got ",
                    lower.sizes());
  const int64_t C = lower.size(0);
  TORCH_CHECK_VALUE(perm.sizes() == lower.sizes() && upper.sizes() == lower.sizes(),
                    "lu_weight: perm, lower and upper must all be [", C, ", ", C, "]");
  TORCH_CHECK_VALUE(sign.dim() == 1 && sign.size(0) == C && log_s.dim() == 1 && log_s.size(0) == C,
                    "lu_weight: sign and log_s must be [", C, "]");
}

// W = P L U for small C as plain loops (no tril/triu/eye/diag/mm chain of tiny eager ops), with P applied as
// a row gather. L[i][k] = lower[i][k] (k < i), L[i][i] = 1; U[k][j] = upper[k][j] (j > k), U[k][k] = d_k =
// sign_k exp(log_s_k).

// perm as a row gather, rows[i] = the column of row i's single 1, for contiguous CPU float/double arguments
// and a 0/1 permutation matrix (what InvConv1x1 keeps); empty otherwise (the caller uses the aten formula).
std::vector<int64_t> perm_rows(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
                               const at::Tensor& sign, const at::Tensor& log_s) {
  const auto dt = lower.scalar_type();
  if (dt != at::kFloat && dt != at::kDouble) return {};
  for (const auto* t : {&perm, &lower, &upper, &sign, &log_s})
    if (!t->device().is_cpu() || t->scalar_type() != dt || !t->is_contiguous()) return {};
  const int64_t C = lower.size(0);
  std::vector<int64_t> rows(C, -1);
  std::vector<char> used(C, 0);
  AT_DISPATCH_FLOATING_TYPES(dt, "lu_weight_perm", [&] {
    const scalar_t* P = perm.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < C; ++i) {
      for (int64_t j = 0; j < C; ++j) {
        const scalar_t v = P[i * C + j];
        if (v == scalar_t(1) && rows[i] < 0 && !used[j]) {
          rows[i] = j;
          used[j] = 1;
        } else if (v != scalar_t(0)) {
          rows.clear();
          return;
        }
      }
      if (rows[i] < 0) {
        rows.clear();
        return;
      }
    }
  });
  return rows;
}

template <typename T>
std::vector<T> lu_diag(const at::Tensor& sign, const at::Tensor& log_s) {
  const int64_t C = sign.size(0);
  std::vector<T> d(C);
  for (int64_t k = 0; k < C; ++k) d[k] = sign.const_data_ptr<T>()[k] * std::exp(log_s.const_data_ptr<T>()[k]);
  return d;
}

// W[i] = (L U)[rows[i]], (L U)[r][j] = sum_{k <= min(r, j)} L[r][k] U[k][j], accumulated over k with the inner
// loop over j contiguous; d = the diagonal of U (lu_diag).
template <typename T>
void lu_weight_rows(const std::vector<int64_t>& rows, int64_t C, const T* lo, const T* up, const T* d, T* w) {
  for (int64_t i = 0; i < C; ++i) {
    const int64_t r = rows[i];
    T* out = w + i * C;
    std::fill_n(out, C, T(0));
    for (int64_t k = 0; k <= r; ++k) {
      const T l = k == r ? T(1) : lo[r * C + k];
      const T* u = up + k * C;
      out[k] += l * d[k];
      for (int64_t j = k + 1; j < C; ++j) out[j] += l * u[j];
    }
  }
}

at::Tensor lu_weight_loops(const std::vector<int64_t>& rows, const at::Tensor& lower, const at::Tensor& upper,
                           const at::Tensor& sign, const at::Tensor& log_s) {
  auto W = at::empty_like(lower);
  AT_DISPATCH_FLOATING_TYPES(lower.scalar_type(), "lu_weight", [&] {
    lu_weight_rows<scalar_t>(rows, lower.size(0), lower.const_data_ptr<scalar_t>(), upper.const_data_ptr<scalar_t>(),
                             lu_diag<scalar_t>(sign, log_s).data(), W.mutable_data_ptr<scalar_t>());
  });
  return W;
}

// Gradients of W = P L U for dW as loops whose inner loops are axpys along a row (vectorizable): G = P^T dW
// (G[rows[i]] = dW[i]); d lower = strict lower of G U^T (row i: sum_j G[i][j] (U^T row j)), d upper = strict upper
// of L^T G, d log_s = diag(L^T G) * d. Outputs gl and gu zero-filled by the caller.
template <typename T>
void lu_grads_axpy(const T* gw, const std::vector<int64_t>& rows, int64_t C, const T* lo, const T* up, const T* d,
                   T* gl, T* gu, T* gs) {
  std::vector<T> G(C * C), Ut(C * C, T(0)), row(C);
  for (int64_t i = 0; i < C; ++i) std::copy_n(gw + i * C, C, G.data() + rows[i] * C);
  for (int64_t k = 0; k < C; ++k) {  // Ut[j][k] = U[k][j]
    Ut[k * C + k] = d[k];
    for (int64_t j = k + 1; j < C; ++j) Ut[j * C + k] = up[k * C + j];
  }
  for (int64_t i = 1; i < C; ++i) {
    std::fill_n(row.data(), i, T(0));
    const T* gi = G.data() + i * C;
    for (int64_t j = 0; j < C; ++j) {
      const T gij = gi[j];
      const T* uj = Ut.data() + j * C;
      const int64_t lim = std::min(i, j + 1);  // U^T row j is zero beyond column j
      for (int64_t k = 0; k < lim; ++k) row[k] += gij * uj[k];
    }
    std::copy_n(row.data(), i, gl + i * C);
  }
  for (int64_t k = 0; k < C; ++k) {
    std::copy_n(G.data() + k * C, C, row.data());
    for (int64_t i = k + 1; i < C; ++i) {
      const T l = lo[i * C + k];
      const T* gi = G.data() + i * C;
      for (int64_t j = k; j < C; ++j) row[j] += l * gi[j];
    }
    gs[k] = row[k] * d[k];
    for (int64_t j = k + 1; j < C; ++j) gu[k * C + j] = row[j];
  }
}

std::array<at::Tensor, 3> lu_weight_grads_loops(const at::Tensor& grad, const std::vector<int64_t>& rows,
                                                const at::Tensor& lower, const at::Tensor& upper,
                                                const at::Tensor& sign, const at::Tensor& log_s) {
  const int64_t C = lower.size(0);
  auto g_lower = at::zeros_like(lower), g_upper = at::zeros_like(upper), g_log_s = at::empty_like(log_s);
  auto dW = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES(lower.scalar_type(), "lu_weight_backward", [&] {
    lu_grads_axpy<scalar_t>(dW.const_data_ptr<scalar_t>(), rows, C, lower.const_data_ptr<scalar_t>(),
                            upper.const_data_ptr<scalar_t>(), lu_diag<scalar_t>(sign, log_s).data(),
                            g_lower.mutable_data_ptr<scalar_t>(), g_upper.mutable_data_ptr<scalar_t>(),
                            g_log_s.mutable_data_ptr<scalar_t>());
  });
  return {g_lower, g_upper, g_log_s};
}

// The factors as tensors: L = tril(lower, -1) + I, U = triu(upper, 1) + diag(d), d = sign * exp(log_s). For
// contiguous CPU float/double arguments L and U are written by loops (the values of the aten chain, without its
// eight tiny eager ops; d always by the aten exp, so the reverse's triangular solves give
// InvConv1x1.inverse_weight's W^-1 bit for bit); otherwise by that chain. Used for the inverse and for any other
// P (not a permutation matrix, other devices or dtypes), with two matmuls.
std::array<at::Tensor, 3> lu_factors(const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& sign,
                                     const at::Tensor& log_s) {
  auto d = sign * log_s.exp();
  const auto dt = lower.scalar_type();
  const bool loops = (dt == at::kFloat || dt == at::kDouble) && upper.scalar_type() == dt &&
                     d.scalar_type() == dt && lower.is_cpu() && upper.is_cpu() && lower.is_contiguous() &&
                     upper.is_contiguous() && d.is_contiguous();
  if (!loops) {
    auto L = lower.tril(-1) + at::eye(lower.size(0), lower.options());
    auto U = upper.triu(1) + at::diag(d);
    return {L, U, d};
  }
  const int64_t C = lower.size(0);
  auto L = at::zeros_like(lower), U = at::zeros_like(upper);
  AT_DISPATCH_FLOATING_TYPES(dt, "lu_factors", [&] {
    const scalar_t* lo = lower.const_data_ptr<scalar_t>();
    const scalar_t* up = upper.const_data_ptr<scalar_t>();
    const scalar_t* dd = d.const_data_ptr<scalar_t>();
    scalar_t* l = L.mutable_data_ptr<scalar_t>();
    scalar_t* u = U.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < C; ++i) {
      for (int64_t k = 0; k < i; ++k) l[i * C + k] = lo[i * C + k];
      l[i * C + i] = scalar_t(1);
      u[i * C + i] = dd[i];
      for (int64_t j = i + 1; j < C; ++j) u[i * C + j] = up[i * C + j];
    }
  });
  return {L, U, d};
}

// The gradients of (lower, upper, log_s) for W's gradient: the loops when perm is a permutation matrix (rows
// not empty), else the aten formula of W = P L U.
std::array<at::Tensor, 3> lu_weight_grads(const at::Tensor& grad, const std::vector<int64_t>& rows,
                                          const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
                                          const at::Tensor& sign, const at::Tensor& log_s) {
  if (!rows.empty()) return lu_weight_grads_loops(grad, rows, lower, upper, sign, log_s);
  auto [L, U, d] = lu_factors(lower, upper, sign, log_s);
  auto G = at::mm(perm.t(), grad);
  auto LtG = at::mm(L.t(), G);
  return {at::mm(G, U.t()).tril(-1), LtG.triu(1), LtG.diagonal() * d};
}

class LuWeightFn : public torch::autograd::Function<LuWeightFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& perm, const at::Tensor& lower,
                            const at::Tensor& upper, const at::Tensor& sign, const at::Tensor& log_s) {
    check_lu_args(perm, lower, upper, sign, log_s);
    auto rows = perm_rows(perm, lower, upper, sign, log_s);
    ctx->save_for_backward({perm, lower, upper, sign, log_s});
    at::Tensor W;
    if (!rows.empty()) {
      W = lu_weight_loops(rows, lower, upper, sign, log_s);
    } else {
      auto [L, U, d] = lu_factors(lower, upper, sign, log_s);
      W = at::mm(at::mm(perm, L), U);
    }
    ctx->saved_data["rows"] = std::move(rows);
    return W;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_first_order("lu_weight");
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    auto s = ctx->get_saved_variables();
    const auto rows = ctx->saved_data["rows"].toIntVector();
    auto g = lu_weight_grads(grads[0], rows, s[0], s[1], s[2], s[3], s[4]);
    return {at::Tensor(), g[0], g[1], at::Tensor(), g[2]};
  }
};

at::Tensor lu_weight_plain(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
                           const at::Tensor& sign, const at::Tensor& log_s) {
  check_lu_args(perm, lower, upper, sign, log_s);
  const auto rows = perm_rows(perm, lower, upper, sign, log_s);
  if (!rows.empty()) return lu_weight_loops(rows, lower, upper, sign, log_s);
  auto [L, U, d] = lu_factors(lower, upper, sign, log_s);
  return at::mm(at::mm(perm, L), U);
}

at::Tensor lu_weight_autograd(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
                              const at::Tensor& sign, const at::Tensor& log_s) {
  return LuWeightFn::apply(perm, lower, upper, sign, log_s);
}

// The gradients of (lower, upper, log_s) for an upstream gradient of W, as one plain call (no autograd node):
// for callers that hold W's gradient already (the reversible engine's direct path).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lu_weight_bwd_cpu(const at::Tensor& grad, const at::Tensor& perm,
                                                                 const at::Tensor& lower, const at::Tensor& upper,
                                                                 const at::Tensor& sign, const at::Tensor& log_s) {
  check_lu_args(perm, lower, upper, sign, log_s);
  TORCH_CHECK_VALUE(grad.sizes() == lower.sizes() && grad.scalar_type() == lower.scalar_type(),
                    "lu_weight_bwd: grad must have lower's shape ", lower.sizes(), " and dtype, got ", grad.sizes());
  auto g = lu_weight_grads(grad, perm_rows(perm, lower, upper, sign, log_s), perm, lower, upper, sign, log_s);
  return {g[0], g[1], g[2]};
}

// actnorm_invconv_reverse as plain loops for small C (the reversible walk's common case: contiguous CPU
// float/double, a permutation P, no bit-exact record). The same mathematics as the aten path below, in one
// single-threaded pass per product with no operator calls but the output allocations: between the walk's large
// GEMMs, whose data evict the caches, a chain of ~30 small aten ops costs several times its warm time, and these
// products are tiny (C <= 64, 2 C^2 S N flops each). W^-1 = U^-1 L^-1 P^T comes from substitutions here (equal to
// the aten triangular solves up to rounding, so x is the inverse up to rounding; with a record the aten path
// rebuilds bit for bit what the forward recorded), and the sums run in a fixed order (deterministic).
constexpr int64_t kLoopMaxC = 64;

template <typename T>
void reverse_kernel(const T* y, const T* g, const T* gld, int64_t N, int64_t C, int64_t S, const T* ls, const T* b,
                    const std::vector<int64_t>& rows, const T* lo, const T* up, const T* d, T* x, T* gx, T* gls,
                    T* gb, T* gw, T& gsum) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t CC = C * C;
  std::vector<T> e(C), ie(C), W(CC), Winv(CC), A(CC), Ainv(CC);
  for (int64_t k = 0; k < C; ++k) {
    e[k] = std::exp(ls[k]);
    ie[k] = std::exp(-ls[k]);
  }
  lu_weight_rows<T>(rows, C, lo, up, d, W.data());
  // W^-1 = U^-1 (L^-1 P^T) by substitutions on whole rows (axpys along the row): Mrow r = (P^T)_r - sum_{k<r}
  // lower[r][k] Mrow k, then W^-1 row r = (Mrow r - sum_{k>r} upper[r][k] (W^-1 row k)) / d_r
  std::vector<T> M(CC, T(0));
  for (int64_t j = 0; j < C; ++j) M[rows[j] * C + j] = T(1);
  for (int64_t r = 1; r < C; ++r) {
    T* mr = M.data() + r * C;
    for (int64_t k = 0; k < r; ++k) {
      const T l = lo[r * C + k];
      const T* mk = M.data() + k * C;
      for (int64_t j = 0; j < C; ++j) mr[j] -= l * mk[j];
    }
  }
  for (int64_t r = C - 1; r >= 0; --r) {
    T* wr = Winv.data() + r * C;
    std::copy_n(M.data() + r * C, C, wr);
    for (int64_t k = r + 1; k < C; ++k) {
      const T u = up[r * C + k];
      const T* wk = Winv.data() + k * C;
      for (int64_t j = 0; j < C; ++j) wr[j] -= u * wk[j];
    }
    const T inv = T(1) / d[r];
    for (int64_t j = 0; j < C; ++j) wr[j] *= inv;
  }
  for (int64_t i = 0; i < C; ++i) {
    for (int64_t k = 0; k < C; ++k) {
      Ainv[i * C + k] = ie[i] * Winv[i * C + k];  // inverse: x = diag(1/e) W^-1 y - b
      A[k * C + i] = W[i * C + k] * e[k];          // forward: y = W diag(e) x + c, stored transposed (A^T)
    }
  }
  const int64_t full = S / V * V;
  // x = Ainv y - b and grad_x = A^T grad_y, one output row (channel) at a time, vectors along the spatial axis
  // (four output rows at a time: independent accumulators, one load of the input row per four products)
  auto rowmix = [&](const T* Mx, const T* in, T* out, const T* shift) {
    int64_t i = 0;
    for (; i + 4 <= C; i += 4) {
      const T* m0 = Mx + i * C;
      for (int64_t s = 0; s < full; s += V) {
        Vec a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
        for (int64_t k = 0; k < C; ++k) {
          const Vec yv = Vec::loadu(in + k * S + s);
          a0 = at::vec::fmadd(Vec(m0[k]), yv, a0);
          a1 = at::vec::fmadd(Vec(m0[C + k]), yv, a1);
          a2 = at::vec::fmadd(Vec(m0[2 * C + k]), yv, a2);
          a3 = at::vec::fmadd(Vec(m0[3 * C + k]), yv, a3);
        }
        if (shift) {
          a0 = a0 - Vec(shift[i]);
          a1 = a1 - Vec(shift[i + 1]);
          a2 = a2 - Vec(shift[i + 2]);
          a3 = a3 - Vec(shift[i + 3]);
        }
        a0.store(out + i * S + s);
        a1.store(out + (i + 1) * S + s);
        a2.store(out + (i + 2) * S + s);
        a3.store(out + (i + 3) * S + s);
      }
    }
    for (; i < C; ++i) {
      const T* mi = Mx + i * C;
      for (int64_t s = 0; s < full; s += V) {
        Vec acc(T(0));
        for (int64_t k = 0; k < C; ++k) acc = at::vec::fmadd(Vec(mi[k]), Vec::loadu(in + k * S + s), acc);
        if (shift) acc = acc - Vec(shift[i]);
        acc.store(out + i * S + s);
      }
    }
    for (int64_t r = 0; r < C; ++r) {  // the spatial tail
      const T* mr = Mx + r * C;
      for (int64_t s = full; s < S; ++s) {
        T acc = 0;
        for (int64_t k = 0; k < C; ++k) acc += mr[k] * in[k * S + s];
        out[r * S + s] = shift ? acc - shift[r] : acc;
      }
    }
  };
  for (int64_t n = 0; n < N; ++n) {
    rowmix(Ainv.data(), y + n * C * S, x + n * C * S, b);
    rowmix(A.data(), g + n * C * S, gx + n * C * S, nullptr);
  }
  // gA = sum_n grad_y[n] x[n]^T and gc = sum grad_y over samples and pixels: per (i, k) one vector accumulator
  // over (sample, spatial vector), reduced once
  std::vector<T> gA(CC), gc(C);
  T lanes[V];
  auto reduce = [&](const Vec& acc) {
    acc.store(lanes);
    T t = 0;
    for (int64_t l = 0; l < V; ++l) t += lanes[l];
    return t;
  };
  for (int64_t i = 0; i < C; ++i) {
    Vec ci(T(0));
    T ct = 0;
    for (int64_t n = 0; n < N; ++n) {
      const T* gi = g + (n * C + i) * S;
      for (int64_t s = 0; s < full; s += V) ci = ci + Vec::loadu(gi + s);
      for (int64_t s = full; s < S; ++s) ct += gi[s];
    }
    gc[i] = reduce(ci) + ct;
    int64_t k = 0;
    for (; k + 4 <= C; k += 4) {  // four columns at a time: independent accumulators, one load of grad_y's row
      Vec a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
      T t0 = 0, t1 = 0, t2 = 0, t3 = 0;
      for (int64_t n = 0; n < N; ++n) {
        const T* gi = g + (n * C + i) * S;
        const T* xk = x + (n * C + k) * S;
        for (int64_t s = 0; s < full; s += V) {
          const Vec gv = Vec::loadu(gi + s);
          a0 = at::vec::fmadd(gv, Vec::loadu(xk + s), a0);
          a1 = at::vec::fmadd(gv, Vec::loadu(xk + S + s), a1);
          a2 = at::vec::fmadd(gv, Vec::loadu(xk + 2 * S + s), a2);
          a3 = at::vec::fmadd(gv, Vec::loadu(xk + 3 * S + s), a3);
        }
        for (int64_t s = full; s < S; ++s) {
          t0 += gi[s] * xk[s];
          t1 += gi[s] * xk[S + s];
          t2 += gi[s] * xk[2 * S + s];
          t3 += gi[s] * xk[3 * S + s];
        }
      }
      gA[i * C + k] = reduce(a0) + t0;
      gA[i * C + k + 1] = reduce(a1) + t1;
      gA[i * C + k + 2] = reduce(a2) + t2;
      gA[i * C + k + 3] = reduce(a3) + t3;
    }
    for (; k < C; ++k) {
      Vec acc(T(0));
      T tl = 0;
      for (int64_t n = 0; n < N; ++n) {
        const T* gi = g + (n * C + i) * S;
        const T* xk = x + (n * C + k) * S;
        for (int64_t s = 0; s < full; s += V) acc = at::vec::fmadd(Vec::loadu(gi + s), Vec::loadu(xk + s), acc);
        for (int64_t s = full; s < S; ++s) tl += gi[s] * xk[s];
      }
      gA[i * C + k] = reduce(acc) + tl;
    }
  }
  T gl = 0;
  for (int64_t n = 0; n < N; ++n) gl += gld[n];
  gsum = gl * static_cast<T>(S);
  // back from the folded (A, c) to weight, log_scale and bias (A = W diag(e), c = W (e * b))
  for (int64_t k = 0; k < C; ++k) {
    T wtgc = 0, ge = 0;
    for (int64_t i = 0; i < C; ++i) {
      wtgc += W[i * C + k] * gc[i];
      ge += gA[i * C + k] * W[i * C + k];
    }
    ge += wtgc * b[k];
    gb[k] = wtgc * e[k];
    gls[k] = ge * e[k] + gsum;
  }
  for (int64_t i = 0; i < C; ++i) {
    for (int64_t k = 0; k < C; ++k) gw[i * C + k] = gA[i * C + k] * e[k] + gc[i] * (e[k] * b[k]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> reverse_loops(
    const at::Tensor& y, const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& log_scale,
    const at::Tensor& bias, const std::vector<int64_t>& rows, const at::Tensor& lower, const at::Tensor& upper,
    const at::Tensor& sign, const at::Tensor& log_s) {
  const int64_t N = y.size(0), C = y.size(1), S = spatial_size(y);
  auto x = at::empty_like(y, at::MemoryFormat::Contiguous), gx = at::empty_like(y, at::MemoryFormat::Contiguous);
  auto gls = at::empty_like(log_scale), gb = at::empty_like(bias), gw = at::empty_like(lower);
  at::Tensor g_lower, g_upper, g_log_s;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "actnorm_invconv_reverse", [&] {
    scalar_t gsum = 0;
    reverse_kernel<scalar_t>(y.const_data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(),
                             grad_logdet.const_data_ptr<scalar_t>(), N, C, S, log_scale.const_data_ptr<scalar_t>(),
                             bias.const_data_ptr<scalar_t>(), rows, lower.const_data_ptr<scalar_t>(),
                             upper.const_data_ptr<scalar_t>(), lu_diag<scalar_t>(sign, log_s).data(),
                             x.mutable_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(),
                             gls.mutable_data_ptr<scalar_t>(), gb.mutable_data_ptr<scalar_t>(),
                             gw.mutable_data_ptr<scalar_t>(), gsum);
    auto g = lu_weight_grads_loops(gw, rows, lower, upper, sign, log_s);
    g_lower = g[0];
    g_upper = g[1];
    g_log_s = g[2];
    scalar_t* gs = g_log_s.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < C; ++k) gs[k] += gsum;  // the log-det's share: w_logdet = sum(log_s)
  });
  return {x, gx, gls, gb, g_lower, g_upper, g_log_s};
}

// A GlowStep's ActNorm + 1x1 convolution walked backwards in one call (the reversible engine's direct path):
// x = the inverse of y, then the gradients of the forward at x, W's gradient taken back to (lower, upper, log_s)
// plus the log-det's share of log_s. For C <= 64, a permutation P and no record: reverse_loops (x up to rounding,
// the sums in their own order). Otherwise the aten path: W^-1 = U^-1 L^-1 P^T by two triangular solves, as
// InvConv1x1.inverse_weight builds it (x = GlowStep.norm_conv_inverse(y) bit for bit), actnorm_invconv_bwd with
// W = P L U as lu_weight builds it, and lu_weight_bwd's formula; with a record (flowops/reversible.py,
// bit_exact=True) the rebuild is corrected by rebuild_apply first, so it is the forward's input bit for bit.
// Returns (x, grad_x, grad_log_scale, grad_bias, grad_lower, grad_upper, grad_log_s).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
actnorm_invconv_reverse_cpu(const at::Tensor& y, const at::Tensor& grad_y, const at::Tensor& grad_logdet,
                            const at::Tensor& log_scale, const at::Tensor& bias, const at::Tensor& perm,
                            const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& sign,
                            const at::Tensor& log_s, const std::optional<at::Tensor>& record_small,
                            const std::optional<at::Tensor>& record_idx, const std::optional<at::Tensor>& record_vals) {
  check_lu_args(perm, lower, upper, sign, log_s);
  check_inputs(y, log_scale, bias, lower, nullptr);
  check_grads(grad_y, grad_logdet, y);
  // rows (a permutation P) implies contiguous CPU LU arguments of lower's dtype, which check_inputs made y's
  const auto rows = perm_rows(perm, lower, upper, sign, log_s);
  const auto dt = y.scalar_type();
  auto plain = [&](const at::Tensor& t) { return t.is_cpu() && t.is_contiguous() && t.scalar_type() == dt; };
  if (!record_small.has_value() && !rows.empty() && lower.size(0) <= kLoopMaxC && plain(y) && plain(grad_y) &&
      plain(grad_logdet) && plain(log_scale) && plain(bias)) {
    return reverse_loops(y, grad_y, grad_logdet, log_scale, bias, rows, lower, upper, sign, log_s);
  }
  const auto wld = log_s.sum();
  auto [L, U, d] = lu_factors(lower, upper, sign, log_s);
  const auto lo_solve = at::linalg_solve_triangular(L, perm.t(), /*upper=*/false, /*left=*/true,
                                                    /*unitriangular=*/true);
  const auto w_inv = at::linalg_solve_triangular(U, lo_solve, /*upper=*/true);
  auto x = apply_folded(y, log_scale, bias, w_inv, /*inverse=*/true);
  if (record_small.has_value()) {  // a bit-exact rebuild: the forward's rounding record applied before the gradients
    TORCH_CHECK_VALUE(record_idx.has_value() && record_vals.has_value(),
                      "actnorm_invconv_reverse: a record is small, idx and vals together");
    static auto apply = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("flowops::rebuild_apply", "")
                            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&)>();
    x = apply.call(x, *record_small, *record_idx, *record_vals);
  }
  const auto w = rows.empty() ? at::mm(at::mm(perm, L), U) : lu_weight_loops(rows, lower, upper, sign, log_s);
  auto [gx, gls, gb, gw, gwld] = actnorm_invconv_bwd_cpu(grad_y, grad_logdet, x, log_scale, bias, w, wld, false);
  auto [g_lower, g_upper, g_log_s] = lu_weight_grads(gw, rows, perm, lower, upper, sign, log_s);
  return {x, gx, gls, gb, g_lower, g_upper, g_log_s + gwld};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowops, m) {
  m.def("lu_weight(Tensor perm, Tensor lower, Tensor upper, Tensor sign, Tensor log_s) -> Tensor");
  m.def("lu_weight_bwd(Tensor grad, Tensor perm, Tensor lower, Tensor upper, Tensor sign, Tensor log_s) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("actnorm_invconv_reverse(Tensor y, Tensor grad_y, Tensor grad_logdet, Tensor log_scale, Tensor bias, "
        "Tensor perm, Tensor lower, Tensor upper, Tensor sign, Tensor log_s, Tensor? record_small=None, "
        "Tensor? record_idx=None, Tensor? record_vals=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("actnorm_invconv_fwd(Tensor x, Tensor log_scale, Tensor bias, Tensor weight, Tensor w_logdet, "
        "bool inverse) -> (Tensor, Tensor)");
  m.def("actnorm_invconv_bwd(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor log_scale, Tensor bias, "
        "Tensor weight, Tensor w_logdet, bool inverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("actnorm_invconv(Tensor x, Tensor log_scale, Tensor bias, Tensor weight, Tensor w_logdet, "
        "bool inverse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flowops, CPU, m) {
  m.impl("actnorm_invconv_fwd", &actnorm_invconv_fwd_cpu);
  m.impl("actnorm_invconv_bwd", &actnorm_invconv_bwd_cpu);
  m.impl("lu_weight_bwd", &lu_weight_bwd_cpu);
  m.impl("actnorm_invconv_reverse", &actnorm_invconv_reverse_cpu);
}

TORCH_LIBRARY_IMPL(flowops, Autograd, m) {
  m.impl("actnorm_invconv", &actnorm_invconv_autograd);
  m.impl("lu_weight", &lu_weight_autograd);
}

TORCH_LIBRARY_IMPL(flowops, CompositeExplicitAutograd, m) {
  m.impl("actnorm_invconv", &actnorm_invconv_plain);
  m.impl("lu_weight", &lu_weight_plain);
}

}  // namespace flowops
