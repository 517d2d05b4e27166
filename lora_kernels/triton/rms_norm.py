"""RMSNorm forward and backward (Llama's ``LlamaRMSNorm``), one pass over the rows each way.

Shapes and dtypes:

=============  ===============================  =================================================
x              [R, H] fp32/bf16/fp16            rows at any stride, columns unit-stride
weight         [H] fp16/bf16/fp32/fp64          unit-stride
y (out)        [R, H] ``promote(weight, x)``    contiguous (as ``weight * x̂.to(x.dtype)`` gives)
rstd           [R] fp32                         contiguous; saved for the backward
dy             [R, H] y's dtype                 rows at any stride, columns unit-stride
dx             [R, H] x's dtype                 contiguous
dweight        [H] weight's dtype               only when asked for (frozen norms in LoRA: never)
=============  ===============================  =================================================

Forward, per row (fp32, as transformers computes it)::

    rstd = rsqrt(mean(x²) + eps)
    x̂    = x · rstd, rounded to x's dtype
    y    = weight · x̂ (fp32 product; fp64 for an fp64 weight), rounded once to y's dtype

Backward, per row, with x̂ = x · rstd in fp32 (the forward's rounding of x̂ taken as the identity,
as autograd does for casts) and g = dy · weight in fp32::

    dx      = rstd · (g − x̂ · mean(g · x̂))
    dweight = Σ_rows dy · x̂   (x̂ rounded to x's dtype, as in the forward; fp32 accumulation)

Kernels: each program handles tiles of BLOCK_R rows x BLOCK_H columns (BLOCK_H = next power of two
>= H, so one tile holds whole rows; BLOCK_R > 1 only for H < 2048, see ``_tile``).  The forward
launches one program per tile.  The backward launches at most a few programs per SM (a grid-stride
loop over the tiles), each keeping an fp32 [BLOCK_H] dweight accumulator in registers and writing
it to an fp32 [programs, H] workspace that one ``sum(0)`` reduces; without dweight it launches one
program per tile.  Row offsets are int64.  H up to ``MAX_HIDDEN`` (one row must fit a tile; the
backward spills a little from H = 16384 on, see ``_tile``).  Launches pass
``enable_fp_fusion=False`` (x² is rounded before it is summed, as torch's pow + mean do).

Bytes moved per element of x (b = x.itemsize, o = y.itemsize):
forward b + o (read x, write y; the weight, H elements, is read per program from L2) plus 4 per
row (rstd); backward 2b + o (read x and dy, write dx) plus 4 per row (rstd) plus, with dweight,
2 · 4 · programs · H for the fp32 workspace (written, then read by the ``sum(0)``).
bf16 x [32768, 2048], bf16 weight: forward 268.4 MB + 0.13 MB (rstd); backward 402.7 MB + 0.13 MB,
plus 8.7 MB with dweight on a 132-SM H100 (528 programs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import CachedLauncher
from ..model_ops import KERNEL_DTYPES as X_DTYPES
from ..model_ops.rms_norm import WEIGHT_DTYPES
from .nf4_lora_matmul import _check_device, _next_pow2, _num_sms

__all__ = ["rms_norm_forward", "rms_norm_backward", "MAX_HIDDEN", "X_DTYPES", "WEIGHT_DTYPES"]

#: the largest hidden size one tile takes (a whole row in registers; 32 warps at this size)
MAX_HIDDEN = 65536
#: rows are packed into one tile until it holds this many elements (small H only)
_TILE_ELEMS = 2048


# =============================================================================================
# Kernels
# =============================================================================================
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    n_rows, H, stride_x_row, eps,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, OUT_FP64: tl.constexpr,
):
    # One [BLOCK_R, BLOCK_H] tile of whole rows: reads BLOCK_R*H elements of x (and H of the
    # weight), writes BLOCK_R*H of y and BLOCK_R rstd values.
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < n_rows
    col_mask = cols < H
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1) / H
    rstd = tl.rsqrt(mean_sq + eps)
    tl.store(rstd_ptr + rows64, rstd, mask=row_mask)

    x_hat = (x * rstd[:, None]).to(x_ptr.dtype.element_ty)     # rounded to x's dtype, as HF does
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
    if OUT_FP64:
        y = w.to(tl.float64) * x_hat.to(tl.float64)
    else:
        y = w.to(tl.float32) * x_hat.to(tl.float32)
    tl.store(y_ptr + rows64[:, None] * H + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    n_rows, H, stride_x_row, stride_dy_row,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    # Grid-stride loop over [BLOCK_R, BLOCK_H] tiles of whole rows.  Per tile: reads BLOCK_R*H
    # elements of x and of dy and BLOCK_R rstd values, writes BLOCK_R*H of dx; per program: reads
    # H weight elements, writes H fp32 dweight partial sums (row pid of the workspace).
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < H
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, BLOCK_R)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows64, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]
        if COMPUTE_DX:
            g = dy * w[None, :]
            mean_gx = tl.sum(g * x_hat, axis=1) / H
            dx = rstd[:, None] * (g - x_hat * mean_gx[:, None])
            tl.store(dx_ptr + rows64[:, None] * H + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            x_hat_rounded = x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
            dw_acc += tl.sum(dy * x_hat_rounded, axis=0)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * H + cols, dw_acc, mask=col_mask)


_launch_fwd = CachedLauncher(_rms_norm_fwd_kernel)
_launch_bwd = CachedLauncher(_rms_norm_bwd_kernel)


# =============================================================================================
# Launch parameters
# =============================================================================================
def _tile(n_rows: int, H: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_H, forward num_warps, backward num_warps): whole rows per tile, rows packed
    up to _TILE_ELEMS elements.  The backward holds about twice the registers per element (x, dy,
    weight, dweight accumulator), so it gets twice the warps: <= 8 elements per thread.  ptxas
    (sm_90, bf16; triton 3.9's code compiled without a GPU, not timed) then reports no spills up
    to H = 8192 (64 / 77 / 59 registers at H = 2048 / 4096 / 8192) and 144 bytes of stack at
    H = 16384 (32 warps, the most a block takes).  Not tuned on a GPU."""
    block_h = max(16, _next_pow2(H))
    block_r = max(1, min(_TILE_ELEMS // block_h, _next_pow2(max(n_rows, 1))))
    n = block_r * block_h
    fwd_warps = 32 if n >= 32768 else 16 if n >= 8192 else 8 if n >= 2048 else 4
    bwd_warps = min(32, max(4, n // 256))
    return block_r, block_h, fwd_warps, bwd_warps


def backward_programs(n_rows: int, H: int, device: torch.device) -> int:
    """Programs the backward launches when it computes dweight (rows of the fp32 workspace):
    up to 4 per SM (2 at 32 warps), never more than there are tiles; 4 on the CPU (interpreter)."""
    block_r, _, _, num_warps = _tile(n_rows, H)
    n_tiles = triton.cdiv(n_rows, block_r)
    if device.type == "cuda":
        per_sm = 2 if num_warps >= 32 else 4
        target = _num_sms(device) * per_sm
    else:
        target = 4
    return max(1, min(n_tiles, target))


# =============================================================================================
# Checks
# =============================================================================================
def _check_rows(op: str, name: str, t, dtypes, device=None, H=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be one of {', '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D [rows, H], got shape {tuple(t.shape)}")
    if H is not None and t.shape[1] != H:
        raise ValueError(f"{op}: {name} must have H={H} columns, got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.shape[0] > 0 and t.stride(1) != 1:
        raise ValueError(f"{op}: {name} must have unit-stride columns (stride(1) == 1), got strides {t.stride()}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}")


def _check_weight(op: str, weight, H: int, device: torch.device) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{op}: weight must be one of {', '.join(str(d) for d in WEIGHT_DTYPES)}, got {weight.dtype}")
    if tuple(weight.shape) != (H,):
        raise ValueError(f"{op}: weight must have shape [H={H}], got {tuple(weight.shape)}")
    if H > 1 and weight.stride(0) != 1:
        raise ValueError(f"{op}: weight must be unit-stride, got stride {weight.stride()}")
    if weight.device != device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {device}")


def _check_out(op: str, name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be a contiguous {list(shape)} {dtype} tensor on {device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})")


def _check_common(op: str, x, weight) -> None:
    _check_rows(op, "x", x, X_DTYPES)
    _check_device(x.device, op)
    H = x.shape[1]
    if not 1 <= H <= MAX_HIDDEN:
        raise ValueError(f"{op}: H={H} must be in 1..{MAX_HIDDEN}")
    _check_weight(op, weight, H, x.device)


# =============================================================================================
# Launchers
# =============================================================================================
def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
    out: torch.Tensor | None = None, rstd: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): y [R, H] = weight · (x · rstd rounded to x's dtype) in ``promote(weight, x)``,
    rstd [R] fp32 = rsqrt(mean(x²) + eps) (module docstring).  x [R, H] fp32/bf16/fp16 with
    unit-stride columns, weight [H]; ``out`` / ``rstd``: optional contiguous buffers to fill."""
    op = "rms_norm_forward"
    _check_common(op, x, weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    R, H = x.shape
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if out is None:
        out = torch.empty((R, H), dtype=out_dtype, device=x.device)
    else:
        _check_out(op, "out", out, (R, H), out_dtype, x.device)
    if rstd is None:
        rstd = torch.empty((R,), dtype=torch.float32, device=x.device)
    else:
        _check_out(op, "rstd", rstd, (R,), torch.float32, x.device)
    if R == 0:
        return out, rstd
    block_r, block_h, num_warps, _ = _tile(R, H)
    _launch_fwd(
        triton.cdiv(R, block_r),
        (x, weight, out, rstd, R, H, x.stride(0), float(eps)),
        dict(BLOCK_R=block_r, BLOCK_H=block_h, OUT_FP64=out_dtype == torch.float64),
        dict(num_warps=num_warps, enable_fp_fusion=False),
    )
    return out, rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, *,
    compute_dx: bool = True, compute_dweight: bool = True,
    dx_out: torch.Tensor | None = None, dweight_partial: torch.Tensor | None = None,
    programs: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight) of ``rms_norm_forward`` (module docstring), each None when not asked for.
    dy [R, H] in y's dtype, x and weight as in the forward, rstd [R] fp32 from the forward.
    dx [R, H] in x's dtype (``dx_out``: optional contiguous buffer); dweight [H] in weight's dtype,
    the fp32 sum over ``programs`` partial rows (default ``backward_programs``; more programs than
    tiles is allowed, the extra rows are zeros; ``dweight_partial``: optional contiguous fp32
    [programs, H] workspace)."""
    op = "rms_norm_backward"
    _check_common(op, x, weight)
    R, H = x.shape
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    _check_rows(op, "dy", dy, (out_dtype,), x.device, H)
    if dy.shape[0] != R:
        raise ValueError(f"{op}: dy must have shape [{R}, {H}] like x, got {tuple(dy.shape)}")
    _check_out(op, "rstd", rstd, (R,), torch.float32, x.device)
    if dx_out is not None and compute_dx:
        _check_out(op, "dx_out", dx_out, (R, H), x.dtype, x.device)
    if programs is not None and (isinstance(programs, bool) or not isinstance(programs, int) or programs < 1):
        raise ValueError(f"{op}: programs must be an int >= 1, got {programs!r}")

    dx = None
    if compute_dx:
        dx = dx_out if dx_out is not None else torch.empty((R, H), dtype=x.dtype, device=x.device)
    if not (compute_dx or compute_dweight):
        return None, None
    if R == 0:
        dw = torch.zeros((H,), dtype=weight.dtype, device=x.device) if compute_dweight else None
        return dx, dw

    block_r, block_h, _, num_warps = _tile(R, H)
    n_tiles = triton.cdiv(R, block_r)
    if compute_dweight:
        n_programs = programs if programs is not None else backward_programs(R, H, x.device)
        if dweight_partial is None:
            dweight_partial = torch.empty((n_programs, H), dtype=torch.float32, device=x.device)
        else:
            _check_out(op, "dweight_partial", dweight_partial, (n_programs, H), torch.float32, x.device)
    else:
        n_programs = n_tiles           # one tile per program; no workspace
        dweight_partial = rstd         # unused pointer
    _launch_bwd(
        n_programs,
        (dy, x, weight, rstd, dx if dx is not None else x, dweight_partial,
         R, H, x.stride(0), dy.stride(0)),
        dict(BLOCK_R=block_r, BLOCK_H=block_h, COMPUTE_DX=bool(compute_dx), COMPUTE_DW=bool(compute_dweight)),
        dict(num_warps=num_warps, enable_fp_fusion=False),
    )
    dw = dweight_partial.sum(0).to(weight.dtype) if compute_dweight else None
    return dx, dw
