// Operator schemas, CPU kernel registration and the C++ autograd wiring of the
// flowops extension. The schemas match the Python definitions in
// flowops/ops/_library.py, which take over when this extension is not built.
#include "flowops.h"

#include <Python.h>
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>

namespace flowops {

void check_first_order(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "flowops.", op,
              ": higher-order gradients (backward with create_graph=True) are not supported by the fused kernels; "
              "run the model under flowops.use_backend('reference') for them");
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& x, const at::Tensor& p,
                                            const std::optional<at::Tensor>& mask, const std::string& scale,
                                            double clamp, bool inverse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flowops::affine_coupling_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const std::optional<at::Tensor>&,
                                                                 c10::string_view, double, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // straight to the device kernel
  return op.call(x, p, mask, scale, clamp, inverse);
}

std::tuple<at::Tensor, at::Tensor> call_bwd(const at::Tensor& gy, const at::Tensor& gld, const at::Tensor& x,
                                            const at::Tensor& p, const std::optional<at::Tensor>& mask,
                                            const std::string& scale, double clamp, bool inverse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flowops::affine_coupling_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, c10::string_view, double, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(gy, gld, x, p, mask, scale, clamp, inverse);
}

// Eager fast path: the autograd node lives in C++, so a call costs a few
// microseconds instead of a Python autograd.Function round trip.
class AffineCouplingFn : public torch::autograd::Function<AffineCouplingFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& params,
                               const std::optional<at::Tensor>& mask, c10::string_view scale, double clamp,
                               bool inverse) {
    std::string s(scale);
    auto [y, logdet] = call_fwd(x, params, mask, s, clamp, inverse);
    ctx->save_for_backward({x, params});
    ctx->saved_data["mask"] = mask;
    ctx->saved_data["scale"] = s;
    ctx->saved_data["clamp"] = clamp;
    ctx->saved_data["inverse"] = inverse;
    return {y, logdet};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_first_order("affine_coupling");
    auto saved = ctx->get_saved_variables();
    auto mask = ctx->saved_data["mask"].toOptional<at::Tensor>();
    if (!mask.has_value() && ctx->saved_data["scale"].toStringRef() == "additive") {
      // y = x +- t: both gradients are the upstream gradient itself (negated for the inverse's shift)
      return {grads[0], ctx->saved_data["inverse"].toBool() ? grads[0].neg() : grads[0], at::Tensor(), at::Tensor(),
              at::Tensor(), at::Tensor()};
    }
    auto [gx, gp] = call_bwd(grads[0], grads[1], saved[0], saved[1], mask, ctx->saved_data["scale"].toStringRef(),
                             ctx->saved_data["clamp"].toDouble(), ctx->saved_data["inverse"].toBool());
    return {gx, gp, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> affine_coupling_autograd(const at::Tensor& x, const at::Tensor& params,
                                                            const std::optional<at::Tensor>& mask,
                                                            c10::string_view scale, double clamp, bool inverse) {
  auto out = AffineCouplingFn::apply(x, params, mask, scale, clamp, inverse);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_plain(const at::Tensor& x, const at::Tensor& params,
                                                         const std::optional<at::Tensor>& mask,
                                                         c10::string_view scale, double clamp, bool inverse) {
  return call_fwd(x, params, mask, std::string(scale), clamp, inverse);
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& x, const at::Tensor& params,
                                           const std::optional<at::Tensor>& mask, c10::string_view scale,
                                           double clamp, bool inverse) {
  return affine_coupling_fwd_cpu(x, params, mask, std::string(scale), clamp, inverse);
}

std::tuple<at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& gy, const at::Tensor& gld, const at::Tensor& x,
                                           const at::Tensor& params, const std::optional<at::Tensor>& mask,
                                           c10::string_view scale, double clamp, bool inverse) {
  return affine_coupling_bwd_cpu(gy, gld, x, params, mask, std::string(scale), clamp, inverse);
}

std::string cpu_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace

TORCH_LIBRARY(flowops, m) {
  m.def("affine_coupling_fwd(Tensor x, Tensor params, Tensor? mask, str scale, float clamp, bool inverse) -> (Tensor, Tensor)");
  m.def("affine_coupling_bwd(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor params, Tensor? mask, str scale, float clamp, bool inverse) -> (Tensor, Tensor)");
  m.def("affine_coupling(Tensor x, Tensor params, Tensor? mask, str scale, float clamp, bool inverse) -> (Tensor, Tensor)");
  m.def("cpu_capability() -> str", &cpu_capability);
}

TORCH_LIBRARY_IMPL(flowops, CPU, m) {
  m.impl("affine_coupling_fwd", &fwd_cpu);
  m.impl("affine_coupling_bwd", &bwd_cpu);
}

TORCH_LIBRARY_IMPL(flowops, Autograd, m) {
  m.impl("affine_coupling", &affine_coupling_autograd);
}

TORCH_LIBRARY_IMPL(flowops, CompositeExplicitAutograd, m) {
  m.impl("affine_coupling", &affine_coupling_plain);
}

}  // namespace flowops

// Importing flowops._C loads this library and runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "flowops C++ kernels (operators under torch.ops.flowops)", -1, nullptr};
  return PyModule_Create(&module);
}
