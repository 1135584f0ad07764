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
        from ..kernels import affine_coupling as k

        x, params, mask = ctx.saved_tensors
        gx, gp = k.affine_coupling_bwd(grad_y.contiguous(), grad_logdet.contiguous(), x, params, mask, *ctx.cfg)
        return gx, gp, None, None, None, None
