// Declarations shared by the flowops C++ translation units.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <tuple>

namespace flowops {

// Scale maps of affine coupling. ADDITIVE means params hold the shift only.
enum class ScaleMap : int { EXP = 0, SOFTCLAMP = 1, SIGMOID = 2, ADDITIVE = 3 };

ScaleMap parse_scale(const std::string& name);

// y = x * s(raw) + shift (or the inverse), logdet[b] = sum of log s over the
// positions that are not passed through. x is [B, C, *], params [B, 2C, *]
// ([B, C, *] for ADDITIVE), mask (optional) holds C*prod(*) values of x's dtype
// with 1 marking pass-through positions.
std::tuple<at::Tensor, at::Tensor> affine_coupling_fwd_cpu(
    const at::Tensor& x, const at::Tensor& params,
    const std::optional<at::Tensor>& mask, const std::string& scale,
    double clamp, bool inverse);

// Gradients for x and params given the upstream grads of y and logdet; x and
// params are the forward's inputs (the scale is recomputed from them).
std::tuple<at::Tensor, at::Tensor> affine_coupling_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_logdet,
    const at::Tensor& x, const at::Tensor& params,
    const std::optional<at::Tensor>& mask, const std::string& scale,
    double clamp, bool inverse);

// The fused kernels give first-order gradients; a backward run with create_graph=True
// (grad mode on inside the backward) would silently lose the second-order terms, so it raises.
void check_first_order(const char* op);

}  // namespace flowops
