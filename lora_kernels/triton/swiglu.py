"""SwiGLU gating of a Llama MLP, ``h = silu(gate) * up``, and its gradient, one elementwise kernel each.

Shapes and dtypes (every tensor the same shape [..., I] and dtype, on one device):

==========  ==========================  ==============================================
gate        [..., I] fp32/bf16/fp16     ``gate_proj(x)``; any strides (non-contiguous
up          [..., I] same               inputs are copied to contiguous first)
h           [..., I] same               ``silu_mul_forward``'s output, contiguous
dh          [..., I] same               gradient of h; made contiguous like the inputs
d_gate      [..., I] same               ``silu_mul_backward``'s outputs, contiguous;
d_up        [..., I] same               each only when asked for
==========  ==========================  ==============================================

Math, per element, in fp32 (the inputs upcast), rounded once to the dtype at the end.  With
``e = exp(-g)`` and ``σ = 1 / (1 + e)``:

    h      = g / (1 + e) * u                       (silu(g) * u)
    d_up   = dh * g * σ                            (dh * silu(g))
    d_gate = dh * u * σ * (1 + g * (1 - σ))        (dh * u * silu'(g))

``1 - σ`` is taken as ``e * σ`` for g >= 0 (no cancellation when σ is near 1) and as ``1 - σ`` for
g < 0 (there it is >= 1/2; ``e`` may be inf).  PyTorch's eager ``F.silu(gate) * up`` rounds
``silu(gate)`` to the dtype before the product, and its backward rounds ``dh * up`` before
``silu_backward``: these kernels round once, so they are at least as close to the exact result.

Grid: 1-D over the flattened elements, ``BLOCK`` elements per program (masked tail), int32
offsets unless numel + BLOCK reaches 2**31 (then int64).  Memory-bound; bytes per element with
``s`` = the dtype's size (2 for bf16/fp16):

    forward:                reads gate, up;      writes h             3 s  (6 B bf16)
    backward, both grads:   reads dh, gate, up;  writes d_gate, d_up  5 s  (10 B bf16)
    backward, d_gate only:  reads dh, gate, up;  writes d_gate        4 s  (8 B bf16)
    backward, d_up only:    reads dh, gate;      writes d_up          3 s  (6 B bf16)

For the 1.1B model's MLP (gate, up [32, 1024, 5632] bf16: 184,549,376 elements) that is 1.107 GB
for the forward and 1.845 GB for the backward (both grads): about 0.33 ms and 0.55 ms at
3.35 TB/s.  PyTorch's eager ``F.silu(gate) * up`` moves more in bf16: forward 10 B/element (silu
writes silu(gate), the product reads it back), backward 18 B/element (three kernels:
dh * silu(gate), dh * up, silu_backward), and it keeps silu(gate) alive for the backward as a
third saved tensor (2 B/element; this Function saves gate and up only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model_ops import KERNEL_DTYPES
from .launch import CachedLauncher
from .nf4_lora_matmul import _check_device

__all__ = ["silu_mul_forward", "silu_mul_backward", "BLOCK", "NUM_WARPS"]

#: elements per program, and warps per program: 4096 / (8 * 32) = 16 elements per thread
#: (two 16-byte vector loads per tensor in bf16/fp16, four in fp32)
BLOCK = 4096
NUM_WARPS = 8
_INT32_LIMIT = 2**31 - 1


# =============================================================================================
# Kernels
# =============================================================================================
@triton.jit
def _block(numel, BLOCK: tl.constexpr, OFFSET_64: tl.constexpr):
    # this program's BLOCK element offsets (int64 when OFFSET_64) and their in-range mask
    pid = tl.program_id(0)
    if OFFSET_64:
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < numel


@triton.jit
def _silu_mul_forward_kernel(gate_ptr, up_ptr, h_ptr, numel,
                             BLOCK: tl.constexpr, OFFSET_64: tl.constexpr):
    # reads BLOCK gate + BLOCK up elements, writes BLOCK h elements
    offs, mask = _block(numel, BLOCK, OFFSET_64)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_backward_kernel(dh_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, numel,
                              BLOCK: tl.constexpr, OFFSET_64: tl.constexpr,
                              WRITE_D_GATE: tl.constexpr, WRITE_D_UP: tl.constexpr):
    # reads dh, gate (and up when WRITE_D_GATE); writes the requested gradients
    offs, mask = _block(numel, BLOCK, OFFSET_64)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.exp(-g)
    sig = 1.0 / (1.0 + e)
    if WRITE_D_GATE:
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        one_minus_sig = tl.where(g >= 0.0, e * sig, 1.0 - sig)
        d_gate = dh * u * sig * (1.0 + g * one_minus_sig)
        tl.store(d_gate_ptr + offs, d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask)
    if WRITE_D_UP:
        d_up = dh * (g * sig)
        tl.store(d_up_ptr + offs, d_up.to(d_up_ptr.dtype.element_ty), mask=mask)


_launch_forward = CachedLauncher(_silu_mul_forward_kernel)
_launch_backward = CachedLauncher(_silu_mul_backward_kernel)


# =============================================================================================
# Launchers
# =============================================================================================
def _check_operand(op: str, name: str, t, ref: torch.Tensor | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if ref is None:
        return
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but gate has {ref.dtype}")
    if t.shape != ref.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but gate has {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but gate is on {ref.device}")


def _check_out(op: str, name: str, out, ref: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(ref.shape, dtype=ref.dtype, device=ref.device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(out).__name__}")
    if (out.shape != ref.shape or out.dtype != ref.dtype or out.device != ref.device
            or not out.is_contiguous()):
        raise ValueError(f"{op}: {name} must be a contiguous {tuple(ref.shape)} {ref.dtype} tensor on "
                         f"{ref.device}, got {out.dtype} {tuple(out.shape)} on {out.device} "
                         f"(contiguous={out.is_contiguous()})")
    return out


def _offset_64(numel: int, force: bool | None) -> bool:
    return force if force is not None else numel + BLOCK > _INT32_LIMIT


def silu_mul_forward(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None,
                     offset_64: bool | None = None) -> torch.Tensor:
    """h = silu(gate) * up in fp32, rounded once to the inputs' dtype; returns ``h`` (contiguous).

    gate, up: same shape, dtype (fp32/bf16/fp16) and device (CUDA, or CPU under TRITON_INTERPRET=1);
    non-contiguous ones are copied to contiguous.  out: optional contiguous tensor of that shape and
    dtype, filled and returned.  offset_64: force int64 (True) or int32 (False) element offsets
    (default: int64 only when numel + BLOCK >= 2**31).
    """
    op = "silu_mul_forward"
    _check_operand(op, "gate", gate, None)
    _check_operand(op, "up", up, gate)
    _check_device(gate.device, op)
    out = _check_out(op, "out", out, gate)
    numel = gate.numel()
    if numel == 0:
        return out
    gate, up = gate.contiguous(), up.contiguous()
    _launch_forward(triton.cdiv(numel, BLOCK), (gate, up, out, numel),
                    dict(BLOCK=BLOCK, OFFSET_64=_offset_64(numel, offset_64)),
                    dict(num_warps=NUM_WARPS))
    return out


def silu_mul_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, *,
                      need_d_gate: bool = True, need_d_up: bool = True,
                      d_gate: torch.Tensor | None = None, d_up: torch.Tensor | None = None,
                      offset_64: bool | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d_gate, d_up) of h = silu(gate) * up for the incoming gradient ``dh``, one launch for both.

    d_gate = dh * up * σ * (1 + gate * (1 - σ)), d_up = dh * gate * σ with σ = sigmoid(gate), in fp32,
    each rounded once to the dtype.  dh, gate, up: same shape, dtype and device (non-contiguous ones
    are copied to contiguous); ``up`` is read only for d_gate and may be None when
    ``need_d_gate`` is False.  A gradient not needed (``need_d_gate`` / ``need_d_up`` False) is
    neither computed nor written and is returned as None; with neither needed nothing is launched.
    d_gate, d_up: optional contiguous output tensors (used only when that gradient is needed).
    """
    op = "silu_mul_backward"
    _check_operand(op, "gate", gate, None)
    if up is None:
        if need_d_gate:
            raise ValueError(f"{op}: up is needed for d_gate (need_d_gate=True) but is None")
    else:
        _check_operand(op, "up", up, gate)
    _check_operand(op, "dh", dh, gate)
    _check_device(gate.device, op)
    d_gate = _check_out(op, "d_gate", d_gate, gate) if need_d_gate else None
    d_up = _check_out(op, "d_up", d_up, gate) if need_d_up else None
    numel = gate.numel()
    if numel == 0 or not (need_d_gate or need_d_up):
        return d_gate, d_up
    dh, gate = dh.contiguous(), gate.contiguous()
    up = up.contiguous() if need_d_gate else gate          # not read without d_gate
    d_gate_arg = d_gate if d_gate is not None else d_up    # a pointer the kernel never touches
    d_up_arg = d_up if d_up is not None else d_gate
    _launch_backward(triton.cdiv(numel, BLOCK), (dh, gate, up, d_gate_arg, d_up_arg, numel),
                     dict(BLOCK=BLOCK, OFFSET_64=_offset_64(numel, offset_64),
                          WRITE_D_GATE=bool(need_d_gate), WRITE_D_UP=bool(need_d_up)),
                     dict(num_warps=NUM_WARPS))
    return d_gate, d_up
