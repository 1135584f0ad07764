// A whole coupling layer whose conditioner is a small MLP, as one autograd node:
// split -> MLP (addmm + activation) -> fused affine coupling -> concat, with a
// hand-written backward. For low-dimensional flows trained on CPU (2-D toys,
// tabular data) the per-op dispatch and autograd bookkeeping of an eager MLP
// costs more than its arithmetic; here the layer is one call each way.
#include "flowops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>

namespace flowops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class Act { RELU, TANH };

Act parse_act(c10::string_view name) {
  if (name == "relu") return Act::RELU;
  if (name == "tanh") return Act::TANH;
  TORCH_CHECK_VALUE(false, "flowops.coupling_mlp: activation must be 'relu' or 'tanh', got '", std::string(name), "'");
}

void check(const at::Tensor& x, at::TensorList weights, at::TensorList biases, int64_t pass_start, int64_t pass_len,
           int64_t trans_start) {
  TORCH_CHECK_VALUE(x.dim() == 2, "flowops.coupling_mlp: x must be [batch, features], got ", x.sizes());
  TORCH_CHECK_VALUE(!weights.empty() && weights.size() == biases.size(),
                    "flowops.coupling_mlp: need one bias per weight and at least one layer");
  const int64_t D = x.size(1), trans_len = D - pass_len;
  TORCH_CHECK_VALUE(pass_len > 0 && trans_len > 0 && pass_start >= 0 && trans_start >= 0 &&
                        pass_start + pass_len <= D && trans_start + trans_len <= D &&
                        (pass_start + pass_len == trans_start || trans_start + trans_len == pass_start),
                    "flowops.coupling_mlp: pass-through and transformed slices must partition the features");
  int64_t width = pass_len;
  for (size_t l = 0; l < weights.size(); ++l) {
    TORCH_CHECK_VALUE(weights[l].dim() == 2 && weights[l].size(1) == width && biases[l].dim() == 1 &&
                          biases[l].size(0) == weights[l].size(0),
                      "flowops.coupling_mlp: layer ", l, " weight ", weights[l].sizes(), " / bias ", biases[l].sizes(),
                      " does not chain from width ", width);
    TORCH_CHECK_TYPE(weights[l].scalar_type() == x.scalar_type() && biases[l].scalar_type() == x.scalar_type(),
                     "flowops.coupling_mlp: parameters must have x's dtype");
    width = weights[l].size(0);
  }
  TORCH_CHECK_VALUE(width == 2 * trans_len, "flowops.coupling_mlp: the last layer must output ", 2 * trans_len,
                    " values (raw scale then shift), got ", width);
}

// g = g * (h > 0), in place, one vectorized pass (threshold_backward allocates and costs several
// times more at these sizes).
void relu_backward_(at::Tensor& g, const at::Tensor& h) {
  if (!g.is_contiguous() || !h.is_contiguous() || g.sizes() != h.sizes()) {
    g = at::threshold_backward(g, h, 0);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "flowops_relu_backward", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    scalar_t* gp = g.mutable_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), 65536, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      for (; i + Vec::size() <= end; i += Vec::size()) {
        Vec::blendv(Vec(scalar_t(0)), Vec::loadu(gp + i), Vec::loadu(hp + i) > Vec(scalar_t(0))).store(gp + i);
      }
      for (; i < end; ++i) gp[i] = hp[i] > scalar_t(0) ? gp[i] : scalar_t(0);
    });
  });
}

at::Tensor assemble(const at::Tensor& pass, const at::Tensor& trans, bool pass_first) {
  return pass_first ? at::cat({pass, trans}, 1) : at::cat({trans, pass}, 1);
}

// One coupling layer's forward; appends what its backward needs to `saved`
// (x, params, weights..., hidden activations...).
std::tuple<at::Tensor, at::Tensor> layer_forward(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                                 int64_t pass_start, int64_t pass_len, int64_t trans_start, Act act,
                                                 const std::string& scale, double clamp, bool inverse,
                                                 std::vector<at::Tensor>& saved) {
  check(x, weights, biases, pass_start, pass_len, trans_start);
  const int64_t trans_len = x.size(1) - pass_len;
  at::Tensor xp = x.narrow(1, pass_start, pass_len);
  at::Tensor xt = x.narrow(1, trans_start, trans_len);
  const size_t L = weights.size();
  std::vector<at::Tensor> hidden;  // post-activation outputs of the hidden layers
  at::Tensor h = xp;
  for (size_t l = 0; l < L; ++l) {
    at::Tensor a = at::addmm(biases[l], h, weights[l].t());
    if (l + 1 < L) {
      if (act == Act::RELU) a.clamp_min_(0); else a.tanh_();
      hidden.push_back(a);
    }
    h = a;
  }
  auto [yt, logdet] = affine_coupling_fwd_cpu(xt, h, std::nullopt, scale, clamp, inverse);
  saved.push_back(x);
  saved.push_back(h);
  saved.insert(saved.end(), weights.begin(), weights.end());
  saved.insert(saved.end(), hidden.begin(), hidden.end());
  return {assemble(xp, yt, pass_start < trans_start), logdet};
}

// Backward of one layer from its slice of the saved tensors (starting at `base`).
// Writes the parameter gradients into gw/gb and returns the gradient of x.
at::Tensor layer_backward(const at::Tensor& gy_in, const at::Tensor& gld, const std::vector<at::Tensor>& saved,
                          size_t base, int64_t L, int64_t pass_start, int64_t pass_len, int64_t trans_start, Act act,
                          const std::string& scale, double clamp, bool inverse, at::Tensor* gw, at::Tensor* gb) {
  const at::Tensor& x = saved[base];
  const at::Tensor& params = saved[base + 1];
  const int64_t trans_len = x.size(1) - pass_len;
  at::Tensor xp = x.narrow(1, pass_start, pass_len);
  at::Tensor xt = x.narrow(1, trans_start, trans_len);
  at::Tensor gy = gy_in.contiguous();
  auto [gxt, gh] = affine_coupling_bwd_cpu(gy.narrow(1, trans_start, trans_len), gld, xt, params, std::nullopt,
                                           scale, clamp, inverse);
  at::Tensor gxp;
  for (int64_t l = L - 1; l >= 0; --l) {
    const at::Tensor& w = saved[base + 2 + l];
    const at::Tensor& h_prev = l == 0 ? xp : saved[base + 2 + L + (l - 1)];
    gw[l] = gh.t().mm(h_prev);
    gb[l] = gh.sum(0);
    at::Tensor g_in = gh.mm(w);
    if (l > 0) {
      if (act == Act::RELU) {
        relu_backward_(g_in, h_prev);
        gh = g_in;
      } else {
        gh = at::tanh_backward(g_in, h_prev);
      }
    } else {
      gxp = g_in.add_(gy.narrow(1, pass_start, pass_len));
    }
  }
  return assemble(gxp, gxt, pass_start < trans_start);
}

// A stack of such layers as ONE autograd node: layer k uses weights[offsets[k] : offsets[k+1]] and the
// split (pass_starts[k], pass_lens[k], trans_starts[k]). With `inverse` the layers run last to first.
class CouplingMLPStackFn : public torch::autograd::Function<CouplingMLPStackFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, c10::IntArrayRef offsets, c10::IntArrayRef pass_starts,
                               c10::IntArrayRef pass_lens, c10::IntArrayRef trans_starts, c10::string_view activation,
                               c10::string_view scale, double clamp, bool inverse) {
    const int64_t K = static_cast<int64_t>(pass_starts.size());
    TORCH_CHECK_VALUE(K >= 1 && static_cast<int64_t>(offsets.size()) == K + 1 &&
                          static_cast<int64_t>(pass_lens.size()) == K &&
                          static_cast<int64_t>(trans_starts.size()) == K && offsets[0] == 0 &&
                          offsets[K] == static_cast<int64_t>(weights.size()),
                      "flowops.coupling_mlp_stack: inconsistent layer description");
    const Act act = parse_act(activation);
    const std::string s(scale);
    std::vector<at::Tensor> saved;
    std::vector<int64_t> bases(K);
    at::Tensor h = x, total;
    for (int64_t i = 0; i < K; ++i) {
      const int64_t k = inverse ? K - 1 - i : i;
      bases[k] = static_cast<int64_t>(saved.size());
      auto w = weights.slice(offsets[k], offsets[k + 1] - offsets[k]);
      auto b = biases.slice(offsets[k], offsets[k + 1] - offsets[k]);
      auto [y, ld] = layer_forward(h, w, b, pass_starts[k], pass_lens[k], trans_starts[k], act, s, clamp, inverse,
                                   saved);
      total = i == 0 ? ld : total.add_(ld);
      h = y;
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["bases"] = bases;
    ctx->saved_data["offsets"] = offsets.vec();
    ctx->saved_data["pass_starts"] = pass_starts.vec();
    ctx->saved_data["pass_lens"] = pass_lens.vec();
    ctx->saved_data["trans_starts"] = trans_starts.vec();
    ctx->saved_data["act"] = static_cast<int64_t>(act);
    ctx->saved_data["scale"] = s;
    ctx->saved_data["clamp"] = clamp;
    ctx->saved_data["inverse"] = inverse;
    return {h, total};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_first_order("coupling_mlp_stack");
    auto saved = ctx->get_saved_variables();
    auto bases = ctx->saved_data["bases"].toIntVector();
    auto offsets = ctx->saved_data["offsets"].toIntVector();
    auto pass_starts = ctx->saved_data["pass_starts"].toIntVector();
    auto pass_lens = ctx->saved_data["pass_lens"].toIntVector();
    auto trans_starts = ctx->saved_data["trans_starts"].toIntVector();
    const Act act = static_cast<Act>(ctx->saved_data["act"].toInt());
    const std::string scale = ctx->saved_data["scale"].toStringRef();
    const double clamp = ctx->saved_data["clamp"].toDouble();
    const bool inverse = ctx->saved_data["inverse"].toBool();
    const int64_t K = static_cast<int64_t>(bases.size());
    const int64_t P = offsets[K];
    std::vector<at::Tensor> gw(P), gb(P);
    at::Tensor g = grads[0];
    for (int64_t i = K - 1; i >= 0; --i) {
      const int64_t k = inverse ? K - 1 - i : i;
      g = layer_backward(g, grads[1], saved, bases[k], offsets[k + 1] - offsets[k], pass_starts[k], pass_lens[k],
                         trans_starts[k], act, scale, clamp, inverse, gw.data() + offsets[k], gb.data() + offsets[k]);
    }
    variable_list out;
    out.reserve(1 + 2 * P + 8);
    out.push_back(g);
    for (auto& t : gw) out.push_back(t);
    for (auto& t : gb) out.push_back(t);
    for (int i = 0; i < 8; ++i) out.emplace_back();
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> coupling_mlp_stack(const at::Tensor& x, at::TensorList weights,
                                                      at::TensorList biases, c10::IntArrayRef offsets,
                                                      c10::IntArrayRef pass_starts, c10::IntArrayRef pass_lens,
                                                      c10::IntArrayRef trans_starts, c10::string_view activation,
                                                      c10::string_view scale, double clamp, bool inverse) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "flowops.coupling_mlp_stack runs on CPU tensors");
  auto out = CouplingMLPStackFn::apply(x, weights, biases, offsets, pass_starts, pass_lens, trans_starts, activation,
                                       scale, clamp, inverse);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> coupling_mlp(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                                int64_t pass_start, int64_t pass_len, int64_t trans_start,
                                                c10::string_view activation, c10::string_view scale, double clamp,
                                                bool inverse) {
  const int64_t n = static_cast<int64_t>(weights.size());
  return coupling_mlp_stack(x, weights, biases, {0, n}, {pass_start}, {pass_len}, {trans_start}, activation, scale,
                            clamp, inverse);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowops, m) {
  m.def("coupling_mlp(Tensor x, Tensor[] weights, Tensor[] biases, int pass_start, int pass_len, int trans_start, "
        "str activation, str scale, float clamp, bool inverse) -> (Tensor, Tensor)");
  m.def("coupling_mlp_stack(Tensor x, Tensor[] weights, Tensor[] biases, int[] offsets, int[] pass_starts, "
        "int[] pass_lens, int[] trans_starts, str activation, str scale, float clamp, bool inverse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flowops, CompositeImplicitAutograd, m) {
  m.impl("coupling_mlp", &coupling_mlp);
  m.impl("coupling_mlp_stack", &coupling_mlp_stack);
}

}  // namespace flowops
