"""The LoRA backward's two products with dY from one read of dY (issue 4's training step).

With dY [M, N], B [N, r] and T = x·Aᵀ [M, r] (all one float dtype, r ≤ 64):

    U  = dY · B                [M, r]   (for dA = s·Uᵀ·x and, with dropout, dX's low-rank term)
    dB = s · dYᵀ · T           [N, r]

cuBLAS computes these as two skinny GEMMs, each streaming the whole of dY (2·M·N bytes in bf16: at
M = 4096 on an 8192→28672 layer 235 MB, ~78 µs at 3 TB/s, twice).  ``lora_dy_pass`` reads each dY
tile once and feeds both products from it:

    grid (⌈M / BM⌉, S): program (i, j) owns rows [i·BM, (i+1)·BM) and the j-th of S column ranges;
    per BN-column tile it loads dY[rows, cols] and computes
        U_part[j, rows]   += dY_tile · B[cols]                (fp32, kept in registers)
        dB_part[i, cols]   = dY_tileᵀ · T[rows]               (fp32, stored)
    then U = Σ_j U_part[j] and dB = s · Σ_i dB_part[i], summed by torch in a fixed order
    (deterministic: no atomics), each rounded once to its output dtype.

Bytes: dY once (2MN), plus the fp32 partials: dB_part 4·⌈M/BM⌉·N·r written and read back (with
BM = 256 and r = 16 that is 1/8 of dY's bytes, each way), U_part 4·S·M·r (small).  So the pair
moves ~1.25·2MN bytes instead of 2·2MN.  For r > 32 the partials grow past the saving
(``worth_it`` says when to use it).  Accumulation is fp32 throughout; the result differs from
cuBLAS's (another summation order), not in accuracy.

dtypes: fp16 / bf16 / fp32 inputs (fp32 dots in IEEE precision); U in ``u_dtype`` (default dY's),
dB in ``db_dtype`` (default B's).  H100, bf16, M = 4096, r = 16 (session 18, graph replay; cuBLAS's U
and dB GEMMs in brackets): 8192→28672 135 µs (166), 4096→14336 78 (91), 28672→8192 55 (59),
14336→4096 39 (30): it pays only where N is large; the backward uses it only on request
(``library.FUSED_DY_PASS``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import device_guard

_BM, _BN = 256, 64
#: tests set this: the partial buffers start as NaN, so an element the kernel leaves unwritten shows
_POISON = False


def _poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@triton.jit
def _dy_pass_kernel(dy_ptr, b_ptr, t_ptr, u_part_ptr, db_part_ptr, M, N, R, cols_per_split,
                    stride_dy, stride_b, stride_t,
                    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    m_ok = rm < M
    r_ok = rr < R
    t = tl.load(t_ptr + rm[:, None].to(tl.int64) * stride_t + rr[None, :],
                mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    u = tl.zeros([BM, BR], dtype=tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, N)
    db_row = db_part_ptr + pid_m.to(tl.int64) * N * R
    for n0 in range(n_lo, n_hi, BN):
        rn = n0 + tl.arange(0, BN)
        n_ok = rn < n_hi
        dy = tl.load(dy_ptr + rm[:, None].to(tl.int64) * stride_dy + rn[None, :],
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None].to(tl.int64) * stride_b + rr[None, :],
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if IEEE:
            u = tl.dot(dy, b, u, input_precision="ieee")
            db = tl.dot(tl.trans(dy), t, input_precision="ieee")
        else:
            u = tl.dot(dy, b, u)
            db = tl.dot(tl.trans(dy), t)
        tl.store(db_row + rn[:, None].to(tl.int64) * R + rr[None, :], db, mask=n_ok[:, None] & r_ok[None, :])
    tl.store(u_part_ptr + pid_s.to(tl.int64) * M * R + rm[:, None].to(tl.int64) * R + rr[None, :], u,
             mask=m_ok[:, None] & r_ok[None, :])


def worth_it(M: int, N: int, r: int) -> bool:
    """Whether the fused pass should beat cuBLAS's two GEMMs: r ≤ 32 (the partials grow with r),
    dY of at least 32 MB in bf16 (its extra launches: two sums), and N ≥ 8192 (session 18: slower
    than cuBLAS at N = 4096, faster at 8192 and up)."""
    return r <= 32 and N >= 8192 and 2 * M * N >= 2**25


def lora_dy_pass(dy: torch.Tensor, lora_b: torch.Tensor, t: torch.Tensor, scale: float, *,
                 u_dtype: torch.dtype | None = None, db_dtype: torch.dtype | None = None,
                 splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dB) = (dY · B, scale · dYᵀ · T) from one read of dY.

    dy [M, N], lora_b [N, r], t [M, r]: one float dtype (fp16 / bf16 / fp32), same device (CUDA, or
    CPU under TRITON_INTERPRET=1), row-major rows (unit last stride; others are copied); 1 ≤ r ≤ 64;
    scale a Python float.  ``splits``: column ranges per row block (default: enough programs for
    ~4 per SM).  Returns U [M, r] in ``u_dtype`` (default dy's) and dB [N, r] in ``db_dtype``
    (default lora_b's)."""
    if not all(isinstance(v, torch.Tensor) and v.dim() == 2 for v in (dy, lora_b, t)):
        raise ValueError("lora_dy_pass: dy, lora_b and t must be 2-D tensors")
    M, N = dy.shape
    r = lora_b.shape[1]
    if lora_b.shape[0] != N or tuple(t.shape) != (M, r):
        raise ValueError(f"lora_dy_pass: expected lora_b [N={N}, r] and t [M={M}, r], got "
                         f"{tuple(lora_b.shape)} and {tuple(t.shape)}")
    if not 1 <= r <= 64:
        raise ValueError(f"lora_dy_pass: r must be in 1..64, got {r}")
    if dy.dtype not in (torch.float16, torch.bfloat16, torch.float32) or lora_b.dtype != dy.dtype \
            or t.dtype != dy.dtype:
        raise ValueError(f"lora_dy_pass: dy, lora_b and t must share one of fp16/bf16/fp32, got "
                         f"{dy.dtype}, {lora_b.dtype}, {t.dtype}")
    if not (dy.device == lora_b.device == t.device):
        raise ValueError("lora_dy_pass: dy, lora_b and t must be on one device")
    if isinstance(scale, torch.Tensor):
        raise TypeError("lora_dy_pass: scale must be a Python float")
    dy, lora_b, t = (v if v.stride(-1) == 1 else v.contiguous() for v in (dy, lora_b, t))
    u_dtype = u_dtype or dy.dtype
    db_dtype = db_dtype or lora_b.dtype
    if M == 0 or N == 0:
        return (torch.zeros((M, r), dtype=u_dtype, device=dy.device),
                torch.zeros((N, r), dtype=db_dtype, device=dy.device))
    row_blocks = triton.cdiv(M, _BM)
    if splits is None:
        sms = torch.cuda.get_device_properties(dy.device).multi_processor_count if dy.is_cuda else 4
        splits = max(1, min(triton.cdiv(N, _BN), triton.cdiv(4 * sms, row_blocks)))
    cols = triton.cdiv(triton.cdiv(N, splits), _BN) * _BN
    splits = triton.cdiv(N, cols)
    br = max(16, triton.next_power_of_2(r))
    alloc = _poisoned if _POISON else torch.empty
    u_part = alloc((splits, M, r), dtype=torch.float32, device=dy.device)
    db_part = alloc((row_blocks, N, r), dtype=torch.float32, device=dy.device)
    with device_guard(dy):
        _dy_pass_kernel[(row_blocks, splits)](
            dy, lora_b, t, u_part, db_part, M, N, r, cols, dy.stride(0), lora_b.stride(0), t.stride(0),
            BM=_BM, BN=_BN, BR=br, IEEE=dy.dtype == torch.float32, num_warps=8, num_stages=3)
    u = u_part.sum(0) if splits > 1 else u_part[0]
    db = db_part.sum(0) if row_blocks > 1 else db_part[0]
    if scale != 1.0:
        db.mul_(scale)
    return u.to(u_dtype), db.to(db_dtype)
