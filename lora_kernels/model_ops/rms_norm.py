"""RMSNorm (transformers' ``LlamaRMSNorm``): reference, autograd Function, public function.

``rms_norm(x, weight, eps)``: x [..., H] fp32/bf16/fp16, weight [H] fp16/bf16/fp32/fp64; returns
``weight · x̂`` with x̂ = x · rsqrt(mean(x²) + eps) computed in fp32 and rounded to x's dtype; output
dtype ``torch.promote_types(weight.dtype, x.dtype)``, shape of x.  Kernels and bytes moved:
``lora_kernels/triton/rms_norm.py``.
"""

from __future__ import annotations

import math

import torch

from . import KERNEL_DTYPES, _reference_under_compile, refuse_double_backward, use_triton

__all__ = ["rms_norm", "rms_norm_reference", "RMSNormFunction", "WEIGHT_DTYPES"]

WEIGHT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                       compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` in plain PyTorch (the unpatched numerics, autograd included).

    ``compute_dtype=torch.float64`` with float64 ``x`` and ``weight`` evaluates the same math with
    no intermediate rounding (what the tests compare against, and gradcheck)."""
    input_dtype = x.dtype
    hidden_states = x.to(compute_dtype)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, H] with unit-stride columns: a view where the strides allow, else a copy."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[1] > 1 and x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    return x2d


class RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x, weight, eps) on the Triton kernels.  Saves x (the input itself), weight and
    the fp32 rstd [rows]; the backward computes dweight only when weight needs a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from ..triton.rms_norm import rms_norm_forward

        y2d, rstd = rms_norm_forward(_rows(x), weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y2d.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from ..triton.rms_norm import rms_norm_backward
        refuse_double_backward("rms_norm")

        x, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx2d, dw = rms_norm_backward(_rows(dy), _rows(x), weight, rstd,
                                     compute_dx=need_dx, compute_dweight=need_dw)
        return (dx2d.view(x.shape) if need_dx else None), dw, None


def _validate(x, weight, eps) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"rms_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"rms_norm: weight must be a torch.Tensor, got {type(weight).__name__}")
    if x.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"rms_norm: x must be float32, bfloat16 or float16 (float64: reference path), got {x.dtype}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"rms_norm: weight must be float16, bfloat16, float32 or float64, got {weight.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"rms_norm: x must be [..., H] with H >= 1, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must have shape [H={x.shape[-1]}] (x's last dim), "
                         f"got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"rms_norm: eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"rms_norm: eps must be finite and >= 0, got {eps}")


@_reference_under_compile(rms_norm_reference)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim, with ``LlamaRMSNorm``'s numerics (module docstring).

    x [..., H] fp32/bf16/fp16 (any strides; float64 always runs the reference, as LlamaRMSNorm), weight
    [H] fp16/bf16/fp32/fp64 on x's device, eps >= 0.  Returns a contiguous tensor of x's shape in
    ``promote_types(weight.dtype, x.dtype)``.  Runs the Triton kernels when ``use_triton(x)`` (and
    H <= ``MAX_HIDDEN``), else ``rms_norm_reference``; both are differentiable in x and weight (the
    kernels' backward once: no double backward)."""
    _validate(x, weight, eps)
    if x.dtype != torch.float64 and use_triton(x):
        from ..triton.rms_norm import MAX_HIDDEN

        if x.shape[-1] <= MAX_HIDDEN:
            return RMSNormFunction.apply(x, weight if weight.stride(0) == 1 else weight.contiguous(), float(eps))
    return rms_norm_reference(x, weight, eps)
