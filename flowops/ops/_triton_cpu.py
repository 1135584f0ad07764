"""Autograd wrapper that runs the Triton kernels directly (CPU tensors under TRITON_INTERPRET=1).

On CUDA the same launchers sit behind the registered operator; this path lets the
test suite exercise them, forward and backward, on a machine without a GPU.
"""
import torch


class TritonCoupling(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, params, mask, scale, clamp, inverse):
        from ..kernels import affine_coupling as k

        y, logdet = k.affine_coupling_fwd(x, params, mask, scale, clamp, inverse)
        ctx.save_for_backward(x, params, mask)
        ctx.cfg = (scale, clamp, inverse)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        if torch.is_grad_enabled():
            raise RuntimeError("flowops.affine_coupling: higher-order gradients (backward with create_graph=True) are "
                               "not supported by the fused kernels; run under flowops.use_backend('reference')")
        from ..kernels import affine_coupling as k

        x, params, mask = ctx.saved_tensors
        gx, gp = k.affine_coupling_bwd(grad_y.contiguous(), grad_logdet.contiguous(), x, params, mask, *ctx.cfg)
        return gx, gp, None, None, None, None
