"""Cross-entropy over LM logits without the fp32 copy: ``loss_i = lse_i - x[i, t_i]``, and its gradient.

Shapes and dtypes:

=============  ===========================  ======================================================
logits         [T, V] fp32/bf16/fp16        read only (never written); last dim unit stride,
                                            any row stride (a row-padded or sliced tensor is fine)
target         [T] int64/int32              class index per row; ``ignore_index`` marks a skipped row
row_loss       [T] fp32 (forward output)    lse_i - x[i, t_i]; 0 for ignored rows
lse            [T] fp32 (forward output)    log Σ_v exp(x[i, v]); 0 for ignored rows (unused there)
scale          0-d fp32 (backward input)    d(loss)/d(Σ row_loss): grad_output / denominator
grad_logits    [T, V] logits' dtype         a NEW contiguous tensor (backward output)
=============  ===========================  ======================================================

Math (all in fp32, inputs upcast on load, one rounding of the gradient to the logits' dtype):

* forward, per row, over V in chunks of ``BLOCK_V`` (online log-sum-exp, one ``exp`` per element):
  ``m' = max(m, max_chunk x)``, ``s' = s · exp(m - m') + Σ_chunk exp(x - m')``; ``lse = m + log s``.
  A chunk that is all ``-inf`` (masked vocabulary) keeps ``s = 0`` (the shift uses 0 while the
  running max is still ``-inf``), so leading ``-inf`` logits do not turn the row into NaN.
* ``row_loss = lse - x[t]``; ``0`` where ``t == ignore_index``; **NaN** where ``t`` is not
  ``ignore_index`` and lies outside ``[0, V)`` (PyTorch raises / device-asserts there; this kernel
  reads nothing out of bounds and needs no host sync, so the loss becomes NaN instead).
* backward: ``grad[i, v] = scale · (exp(x[i, v] - lse_i) - [v == t_i])``; an all-zero row for an
  ignored target (its logits are not read); an all-NaN row for an out-of-range target.

Ignored rows are masked off entirely: their logits are never loaded (no HBM traffic).

Bytes per logits element, E = logits' itemsize, for a non-ignored row (ignored rows: 0 read):
forward reads E (plus, per row, the target and 8 bytes written: row_loss, lse); backward reads E
and writes E (every row is written, ignored ones with zeros; plus target and lse per row).
bf16, 5 % of rows ignored (GB = 1e9 bytes):

==========================  ========================  =====================================
logits                      forward                   backward
==========================  ========================  =====================================
[32·1024, 32000]  2.10 GB   1.99 GB read              1.99 GB read + 2.10 GB written
[4·1024, 128256]  1.05 GB   1.00 GB read              1.00 GB read + 1.05 GB written
==========================  ========================  =====================================

The fp32 route it replaces (``logits.float()`` + ``F.cross_entropy``), counted in fp32 logits
sizes F (4.19 GB at [32·1024, 32000]): forward >= 3.5 F (upcast: bf16 read + fp32 write;
log-softmax: read + write) = 14.7 GB; backward >= 5.5 F (zero-filled NLL gradient write;
log-softmax backward: 2 reads + 1 write; the cast back: fp32 read + bf16 write) = 23 GB; and it
keeps the 4.19 GB fp32 log-softmax alive from forward to backward.

Grid: one program per row, which walks its V logits in ``BLOCK_V`` chunks (any V; row offsets
in int64, so T·V may exceed 2^31).  No ``triton.autotune``: ``BLOCK_V`` = min(next_pow2(V), 4096)
with 8 warps (16 elements per thread per chunk: two 16-byte loads of a 16-bit row), overridable
by ``block_v=`` / ``num_warps=``.  Not yet timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import CachedLauncher
from ..model_ops import KERNEL_DTYPES
from ..model_ops.cross_entropy import INDEX_DTYPES
from .nf4_lora_matmul import _check_device, _is_pow2, _next_pow2

__all__ = ["cross_entropy_forward", "cross_entropy_backward", "pick_config", "MAX_BLOCK_V"]


#: largest chunk of a row one program holds in registers at a time (fp32 working values)
MAX_BLOCK_V = 4096
_DEFAULT_WARPS = 8


# =============================================================================================
# Kernels
# =============================================================================================
@triton.jit
def _ce_forward_kernel(
    logits_ptr, target_ptr, row_loss_ptr, lse_ptr,
    V, stride_row, ignore_index,
    BLOCK_V: tl.constexpr,
):
    # one row per program: reads V logits (none for an ignored row), writes row_loss and lse
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    t = tl.load(target_ptr + row).to(tl.int64)
    keep = t != ignore_index
    v_end = tl.where(keep, V, 0)                      # an ignored row loads nothing
    offs = tl.arange(0, BLOCK_V)

    m = -float("inf")                                 # running max
    s = 0.0                                           # running Σ exp(x - m)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(row_ptr + cols, mask=cols < v_end, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    lse = m + tl.log(tl.where(keep, s, 1.0))          # (an ignored row has s = 0: no log(0))

    valid = (t >= 0) & (t < v_end)                    # false for an ignored row too
    x_t = tl.load(row_ptr + t, mask=valid, other=0.0).to(tl.float32)
    loss = tl.where(valid, lse - x_t, float("nan"))
    tl.store(row_loss_ptr + row, tl.where(keep, loss, 0.0))
    tl.store(lse_ptr + row, tl.where(keep, lse, 0.0))


@triton.jit
def _ce_backward_kernel(
    logits_ptr, target_ptr, lse_ptr, scale_ptr, grad_ptr,
    V, stride_row, stride_grad_row, ignore_index,
    BLOCK_V: tl.constexpr,
):
    # one row per program: reads V logits (none for an ignored row), writes V gradient elements
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * stride_grad_row
    t = tl.load(target_ptr + row).to(tl.int64)
    keep = t != ignore_index
    v_end = tl.where(keep, V, 0)                      # an ignored row loads nothing
    valid = (t >= 0) & (t < V)
    lse = tl.load(lse_ptr + row)
    coef = tl.where(valid, tl.load(scale_ptr).to(tl.float32), float("nan"))
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        cmask = cols < V
        x = tl.load(row_ptr + cols, mask=cols < v_end, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        g = (p - tl.where(cols == t, 1.0, 0.0)) * coef
        g = tl.where(keep, g, 0.0)
        tl.store(grad_row_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=cmask)


# =============================================================================================
# Launchers
# =============================================================================================
_launch_forward = CachedLauncher(_ce_forward_kernel)
_launch_backward = CachedLauncher(_ce_backward_kernel)


def pick_config(V: int, block_v: int | None = None, num_warps: int | None = None) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for vocabulary size V: defaults min(next_pow2(V), 4096) and 8 warps
    (fewer warps for a short row: at least 8 elements per thread); either may be overridden
    (a power of two: BLOCK_V >= 16, num_warps <= 32)."""
    if block_v is None:
        block_v = min(_next_pow2(max(V, 16)), MAX_BLOCK_V)
    elif not _is_pow2(block_v) or block_v < 16:
        raise ValueError(f"cross_entropy: block_v must be a power of two >= 16, got {block_v!r}")
    if num_warps is None:
        num_warps = max(1, min(_DEFAULT_WARPS, block_v // 256))
    elif not _is_pow2(num_warps) or num_warps > 32:
        raise ValueError(f"cross_entropy: num_warps must be a power of two <= 32, got {num_warps!r}")
    return block_v, num_warps


def _check_inputs(logits, target) -> tuple[int, int]:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cross_entropy: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(f"cross_entropy: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be 2-D [T, V], got shape {tuple(logits.shape)}")
    T, V = logits.shape
    if V < 1:
        raise ValueError(f"cross_entropy: logits must have V >= 1 classes, got shape {tuple(logits.shape)}")
    if logits.stride(1) != 1 and V > 1:
        raise ValueError(f"cross_entropy: logits' last dim must have unit stride, got strides {logits.stride()}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"cross_entropy: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"cross_entropy: target must be int64 or int32, got {target.dtype}")
    if tuple(target.shape) != (T,):
        raise ValueError(f"cross_entropy: target must have shape [T={T}], got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"cross_entropy: target is on {target.device} but logits are on {logits.device}")
    if T > 0 and target.stride(0) != 1:
        raise ValueError(f"cross_entropy: target must be contiguous, got stride {target.stride()}")
    _check_device(logits.device, "cross_entropy")
    return T, V


def _check_vector_out(name: str, out, T: int, device) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cross_entropy: {name} must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != (T,) or out.dtype != torch.float32 or out.device != device or not out.is_contiguous():
        raise ValueError(f"cross_entropy: {name} must be a contiguous [{T}] float32 tensor on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    *,
    row_loss_out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy: returns (row_loss [T] fp32, lse [T] fp32), one launch.

    logits [T, V] fp32/bf16/fp16 (last dim unit stride, any row stride), target [T] int64/int32
    (contiguous).  row_loss[i] = lse[i] - logits[i, target[i]] in fp32; 0 (and lse 0) where
    target == ignore_index; NaN where target is outside [0, V) and not ignore_index.
    row_loss_out / lse_out: optional contiguous [T] fp32 buffers, filled and returned.
    Reads T·V·itemsize bytes of logits (ignored rows: none), writes 8 bytes per row.
    """
    T, V = _check_inputs(logits, target)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"cross_entropy: ignore_index must be an int, got {type(ignore_index).__name__}")
    block_v, num_warps = pick_config(V, block_v, num_warps)
    if row_loss_out is None:
        row_loss_out = torch.empty(T, dtype=torch.float32, device=logits.device)
    else:
        _check_vector_out("row_loss_out", row_loss_out, T, logits.device)
    if lse_out is None:
        lse_out = torch.empty(T, dtype=torch.float32, device=logits.device)
    else:
        _check_vector_out("lse_out", lse_out, T, logits.device)
    if T == 0:
        return row_loss_out, lse_out
    _launch_forward(     # on the logits' device (launch.py; device_map="auto" puts them on the last GPU)
        T,
        (logits, target, row_loss_out, lse_out, V, logits.stride(0), ignore_index),
        dict(BLOCK_V=block_v),
        dict(num_warps=num_warps),
    )
    return row_loss_out, lse_out


def cross_entropy_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int = -100,
    *,
    out: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """grad_logits [T, V] in logits' dtype: scale · (softmax(logits) - onehot(target)) per row, one launch.

    logits, target: as the forward got them; lse: its [T] fp32 output; scale: a 0-d (or 1-element)
    fp32 tensor on the logits' device, read by the kernel (no host sync): the gradient of the loss
    with respect to Σ row_loss (grad_output / denominator).  Ignored rows get zeros, rows with an
    out-of-range target NaN.  out: optional contiguous [T, V] tensor of logits' dtype, filled and
    returned (never the logits themselves).  Reads T·V·itemsize bytes of logits (ignored rows:
    none) and writes T·V·itemsize bytes.
    """
    T, V = _check_inputs(logits, target)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"cross_entropy: ignore_index must be an int, got {type(ignore_index).__name__}")
    _check_vector_out("lse", lse, T, logits.device)
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"cross_entropy: scale must be a torch.Tensor, got {type(scale).__name__}")
    if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != logits.device:
        raise ValueError(f"cross_entropy: scale must be a 1-element float32 tensor on {logits.device}, "
                         f"got {scale.dtype} {tuple(scale.shape)} on {scale.device}")
    block_v, num_warps = pick_config(V, block_v, num_warps)
    if out is None:
        out = torch.empty((T, V), dtype=logits.dtype, device=logits.device)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"cross_entropy: out must be a torch.Tensor, got {type(out).__name__}")
        if (tuple(out.shape) != (T, V) or out.dtype != logits.dtype or out.device != logits.device
                or not out.is_contiguous()):
            raise ValueError(f"cross_entropy: out must be a contiguous [{T}, {V}] {logits.dtype} tensor on "
                             f"{logits.device}, got {out.dtype} {tuple(out.shape)} on {out.device} "
                             f"(contiguous={out.is_contiguous()})")
        if T > 0 and out.data_ptr() == logits.data_ptr():
            raise ValueError("cross_entropy: out must not be the logits tensor (the gradient is a new tensor)")
    if T == 0:
        return out
    _launch_backward(
        T,
        (logits, target, lse, scale, out, V, logits.stride(0), out.stride(0), ignore_index),
        dict(BLOCK_V=block_v),
        dict(num_warps=num_warps),
    )
    return out
