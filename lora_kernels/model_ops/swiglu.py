"""SwiGLU gating of the Llama MLP: ``h = silu(gate) * up``.

transformers' ``LlamaMLP.forward`` is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with
``act_fn = F.silu``; :func:`silu_mul` replaces the ``act_fn(gate) * up`` part (two PyTorch kernels
forward, three backward) by one Triton kernel each way (``lora_kernels/triton/swiglu.py``, which
gives the math and the bytes moved).

* :func:`silu_mul_reference`: ``F.silu(gate) * up``, exactly the unpatched numerics (in bf16/fp16:
  silu evaluated in fp32 and rounded to the dtype, then the product rounded again).
* :class:`SiluMulFunction`: autograd over the launchers; fp32 math, one rounding per output.
  Saves ``gate`` and ``up`` when d_gate is needed, ``gate`` alone when only d_up is; one backward
  launch writes whichever gradients ``ctx.needs_input_grad`` asks for.
* :func:`silu_mul`: the public entry (checks, then the Function or the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import KERNEL_DTYPES, _reference_under_compile, refuse_double_backward, use_triton

__all__ = ["silu_mul", "silu_mul_reference", "SiluMulFunction"]

_DTYPES = KERNEL_DTYPES + (torch.float64,)


def _kernels():
    from ..triton import swiglu
    return swiglu


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in the tensors' dtype: what an unpatched ``LlamaMLP`` computes."""
    return F.silu(gate) * up


class SiluMulFunction(torch.autograd.Function):
    """``apply(gate, up)`` -> h = silu(gate) * up; gate, up: same shape and fp32/bf16/fp16 dtype, on
    CUDA (or the CPU under TRITON_INTERPRET=1).  Prefer :func:`silu_mul`, which checks its arguments."""

    @staticmethod
    def forward(ctx, gate, up):
        need_d_gate, need_d_up = ctx.needs_input_grad
        if need_d_gate:
            ctx.save_for_backward(gate, up)
        elif need_d_up:
            ctx.save_for_backward(gate)
        return _kernels().silu_mul_forward(gate, up)

    @staticmethod
    def backward(ctx, dh):
        refuse_double_backward("silu_mul")
        need_d_gate, need_d_up = ctx.needs_input_grad
        if not (need_d_gate or need_d_up):
            return None, None
        saved = ctx.saved_tensors
        gate = saved[0]
        up = saved[1] if need_d_gate else None
        return _kernels().silu_mul_backward(dh, gate, up, need_d_gate=need_d_gate, need_d_up=need_d_up)


def _check_args(gate, up) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"silu_mul: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"silu_mul: {name} must be float32, bfloat16 or float16 (float64: reference "
                            f"only), got {t.dtype}")
    if up.dtype != gate.dtype:
        raise TypeError(f"silu_mul: gate and up must have the same dtype, got gate {gate.dtype} and "
                        f"up {up.dtype}")
    if up.shape != gate.shape:
        raise ValueError(f"silu_mul: gate and up must have the same shape (no broadcasting), got gate "
                         f"{tuple(gate.shape)} and up {tuple(up.shape)}")
    if up.device != gate.device:
        raise ValueError(f"silu_mul: gate and up must be on the same device, got gate on {gate.device} "
                         f"and up on {up.device}")


@_reference_under_compile(silu_mul_reference)
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up, differentiable in both.

    gate, up: [..., I] of one shape, dtype (fp32/bf16/fp16) and device; any strides (the kernels
    copy non-contiguous inputs to contiguous ones).  Returns a new tensor of that shape and dtype
    (contiguous from the kernels), computed in fp32 and rounded once (the reference rounds
    silu(gate) first).  Runs
    the Triton kernels when ``lora_kernels.model_ops.use_triton(gate)`` is true (through
    :class:`SiluMulFunction` when a gradient is needed, the forward launcher alone otherwise), else
    :func:`silu_mul_reference`; float64 always runs the reference (for gradcheck).
    """
    _check_args(gate, up)
    if gate.dtype not in KERNEL_DTYPES or not use_triton(gate):
        return silu_mul_reference(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMulFunction.apply(gate, up)
    return _kernels().silu_mul_forward(gate, up)
