// Operator schemas, CPU kernel registration and the C++ autograd wiring of the
// flowops extension. The schemas match the Python definitions in
// flowops/ops/_library.py, which take over when this extension is not built.
#include "flowops.h"

#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>
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

// Bit-exact rebuilds (flowops/reversible.py, bit_exact=True): the difference between the keys of a tensor and of
// its rebuild, a float's bits read as a signed integer with the magnitude bits of negative values flipped (keys
// order like the floats). Differences wrap in the key's width, so adding them back restores every bit pattern.
template <typename K>
inline K float_key(K bits) {
  constexpr int top = static_cast<int>(sizeof(K) * 8 - 1);
  return static_cast<K>(bits ^ ((bits >> top) & std::numeric_limits<K>::max()));  // an involution: key -> bits too
}

template <typename K>
inline K wrap_sub(K a, K b) {
  using U = std::make_unsigned_t<K>;
  return static_cast<K>(static_cast<U>(a) - static_cast<U>(b));
}

template <typename K>
inline K wrap_add(K a, K b) {
  using U = std::make_unsigned_t<K>;
  return static_cast<K>(static_cast<U>(a) + static_cast<U>(b));
}

at::ScalarType key_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return at::kInt;
    case at::kDouble: return at::kLong;
    case at::kHalf:
    case at::kBFloat16: return at::kShort;
    default:
      TORCH_CHECK_TYPE(false, "flowops.rebuild_record: float16, bfloat16, float32 or float64 expected, got ",
                       t.scalar_type());
  }
}

template <typename F>
void for_key_type(at::ScalarType kt, const F& fn) {
  if (kt == at::kInt) {
    fn(int32_t{});
  } else if (kt == at::kLong) {
    fn(int64_t{});
  } else {
    fn(int16_t{});
  }
}

// (small int8 [x's shape], idx int64 [E], vals [E] of the key type): small = the key difference clamped to
// [-127, 127]; idx, vals = the flat positions where it does not fit and their exact differences. All three
// empty when the rebuild is exact.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rebuild_record_cpu(const at::Tensor& x_in, const at::Tensor& r_in) {
  TORCH_CHECK_VALUE(x_in.sizes() == r_in.sizes() && x_in.scalar_type() == r_in.scalar_type(),
                    "flowops.rebuild_record: x and rebuilt must have the same shape and dtype, got ", x_in.sizes(),
                    " ", x_in.scalar_type(), " and ", r_in.sizes(), " ", r_in.scalar_type());
  const auto kt = key_type(x_in);
  const auto x = x_in.contiguous().view(kt), r = r_in.contiguous().view(kt);
  const int64_t n = x.numel();
  auto small = at::empty(x_in.sizes(), x_in.options().dtype(at::kChar));
  std::vector<at::Tensor> out;
  for_key_type(kt, [&](auto zero) {
    using K = decltype(zero);
    const K* xp = x.const_data_ptr<K>();
    const K* rp = r.const_data_ptr<K>();
    int8_t* sp = small.mutable_data_ptr<int8_t>();
    // fixed chunks (deterministic positions): count per chunk, then collect the exceptions chunk by chunk
    constexpr int64_t kChunk = 32768;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<int64_t> differ(static_cast<size_t>(chunks), 0), over(static_cast<size_t>(chunks), 0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t nd = 0, no = 0;
        for (int64_t i = c * kChunk, e = std::min(n, i + kChunk); i < e; ++i) {
          const K d = wrap_sub(float_key(xp[i]), float_key(rp[i]));
          const K cl = std::min<K>(std::max<K>(d, K(-127)), K(127));
          sp[i] = static_cast<int8_t>(cl);
          nd += d != 0;
          no += d != cl;
        }
        differ[c] = nd;
        over[c] = no;
      }
    });
    int64_t total_differ = 0, total_over = 0;
    std::vector<int64_t> start(static_cast<size_t>(chunks), 0);
    for (int64_t c = 0; c < chunks; ++c) {
      total_differ += differ[c];
      start[c] = total_over;
      total_over += over[c];
    }
    if (total_differ == 0) {
      out = {at::empty({0}, small.options()), at::empty({0}, x.options().dtype(at::kLong)), at::empty({0}, x.options())};
      return;
    }
    auto idx = at::empty({total_over}, x.options().dtype(at::kLong));
    auto vals = at::empty({total_over}, x.options());
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    K* vp = vals.mutable_data_ptr<K>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {  // rare: values near zero rebuilt from large ones
      for (int64_t c = c0; c < c1; ++c) {
        int64_t e = start[c];
        for (int64_t i = c * kChunk, end = std::min(n, i + kChunk); i < end && e < start[c] + over[c]; ++i) {
          if (sp[i] == 127 || sp[i] == -127) {
            const K d = wrap_sub(float_key(xp[i]), float_key(rp[i]));
            if (d != K(sp[i])) {
              ip[e] = i;
              vp[e++] = d;
            }
          }
        }
      }
    });
    out = {small, idx, vals};
  });
  return {out[0], out[1], out[2]};
}

// The original tensor from its rebuild and rebuild_record's record (small empty: the rebuild itself).
at::Tensor rebuild_apply_cpu(const at::Tensor& r_in, const at::Tensor& small, const at::Tensor& idx,
                             const at::Tensor& vals) {
  const auto kt = key_type(r_in);
  if (small.numel() == 0) return r_in.contiguous().clone();
  TORCH_CHECK_VALUE(small.sizes() == r_in.sizes() && small.scalar_type() == at::kChar && small.is_contiguous(),
                    "flowops.rebuild_apply: small must be a contiguous int8 tensor of the rebuild's shape ",
                    r_in.sizes(), ", got ", small.sizes(), " ", small.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 1 && idx.scalar_type() == at::kLong && vals.dim() == 1 &&
                        vals.scalar_type() == kt && vals.numel() == idx.numel(),
                    "flowops.rebuild_apply: idx (int64) and vals (", kt, ") must be 1-d of one length");
  const auto r = r_in.contiguous().view(kt);
  auto x = at::empty_like(r);
  const int64_t n = r.numel();
  for_key_type(kt, [&](auto zero) {
    using K = decltype(zero);
    const K* rp = r.const_data_ptr<K>();
    const int8_t* sp = small.const_data_ptr<int8_t>();
    K* xp = x.mutable_data_ptr<K>();
    at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) xp[i] = float_key(wrap_add(float_key(rp[i]), static_cast<K>(sp[i])));
    });
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const K* vp = vals.const_data_ptr<K>();
    for (int64_t e = 0; e < idx.numel(); ++e) {
      TORCH_CHECK_VALUE(ip[e] >= 0 && ip[e] < n, "flowops.rebuild_apply: idx out of range");
      xp[ip[e]] = float_key(wrap_add(float_key(rp[ip[e]]), vp[e]));
    }
  });
  return x.view(r_in.scalar_type()).view(r_in.sizes());
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
  m.def("rebuild_record(Tensor x, Tensor rebuilt) -> (Tensor, Tensor, Tensor)");
  m.def("rebuild_apply(Tensor rebuilt, Tensor small, Tensor idx, Tensor vals) -> Tensor");
}

TORCH_LIBRARY_IMPL(flowops, CPU, m) {
  m.impl("affine_coupling_fwd", &fwd_cpu);
  m.impl("affine_coupling_bwd", &bwd_cpu);
  m.impl("rebuild_record", &rebuild_record_cpu);
  m.impl("rebuild_apply", &rebuild_apply_cpu);
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
