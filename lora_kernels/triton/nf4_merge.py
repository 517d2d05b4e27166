"""Merged LoRA weight in one pass: ``W_eff = Ŵ + (B ⊙ s) · A`` written as a dense [N, K] tensor.

The large-M forward route: ``y = F.linear(x, W_eff, bias)`` equals ``x · Ŵᵀ + ((x · Aᵀ) ⊙ s) · Bᵀ + bias``,
so the whole LoRA/QLoRA forward is this memory-bound kernel plus one cuBLAS GEMM.

Shapes and dtypes:

========  ===============================  ===============================================
weight    NF4Weight of shape (N, K)        Ŵ[n, k] = fl(NF4[idx] * absmax[(n*K + k) // bs])
          (single or double quant),        in fp32, exactly as ``nf4_quant.dequantize``
          K % blocksize == 0               before its final cast
          or dense [N, K] fp32/bf16/fp16   Ŵ = W (upcast to fp32); W[:, k] contiguous
lora_a    [r, K] fp32/bf16/fp16 or None    1 <= r <= 256; None (with lora_b None): no LoRA
lora_b    [N, r] fp32/bf16/fp16 or None    any strides (no copies are made)
scale     float, or fp32 0-d / [r]         per-rank scale (AdaLoRA)
out       [N, K] ``dtype``                 contiguous; dtype default = the weight's dtype
========  ===============================  ===============================================

``W_eff[n, k] = dtype(Ŵ[n, k] + Σ_j bs[n, j] · A[j, k])`` with ``bs = B ⊙ s`` (s a scalar or per-rank),
accumulated in fp32 by ``tl.dot`` *into the Ŵ tile itself* (Ŵ is the dot's accumulator), over
chunks of R_BLOCK ranks (r padded to >= 16 by masked loads; A, B and s are never copied or padded
in memory), and rounded once to ``dtype`` at the end.

Dot operands: ``bs`` is formed in fp32 (``fl(B * s)``) and, like A, cast to the output dtype when
it is fp16/bf16 (tensor-core MMA, exact products, fp32 accumulation: each operand is rounded at
most once -- B ⊙ s always unless s is a power of two, A only when given in a wider dtype).  An
fp32 output uses fp32 operands with ``input_precision="ieee"`` (never tf32).  Every launch passes
``enable_fp_fusion=False``: the nested absmax decode ``fl(fl(code[q] * nested_absmax) + offset)`` and
``Ŵ = NF4[idx] * absmax`` keep their roundings (no FMA), so with lora_a=None the output is
bit-identical to ``lora_kernels.dequantize_nf4``.

Kernel: a 1-D grid over [BLOCK_N, BLOCK_K] output tiles (N tiles fastest, so programs running
together share A's [r, BLOCK_K] slice in L2; config K_FASTEST: K tiles fastest, consecutive rows).
Per program: BLOCK_N*BLOCK_K/2 packed bytes + BLOCK_N*max(1, BLOCK_K/bs) absmax codes read from HBM,
r*(BLOCK_N + BLOCK_K) A/B elements read (L2-resident: A is [r, K], B is [N, r]),
BLOCK_N*BLOCK_K*out.itemsize bytes written, and
2*BLOCK_N*BLOCK_K*r FLOPs on the tensor cores.  L2 traffic for A and B per output element is
2*r*(1/BLOCK_N + 1/BLOCK_K) bytes: from r ~ 64 up it exceeds the 2.5 B of HBM traffic.
(Why Ŵ is the accumulator: adding a separate fp32 LoRA tile needs a second [BLOCK_N, BLOCK_K] fp32
tile live plus a layout conversion between the blocked Ŵ and the MMA layout; measured 15-20 %
slower on the H100 with the 64x128 tile, 27-43 % with the 16x256 one in session 19.)

H100 (sm_90, triton 3.6), bf16, double-quantized bs=64, CUDA-graph timings, the 64x128 tile:
14336x4096: r=16 77 us, r=64 91 us, r=256 156 us (``dequantize_nf4`` alone: 53 us = 2.77 TB/s);
4096x14336: 82 / 95 / 158 us; 4096x4096: 25 / 30 / 48 us (dequantize_nf4: 16 us).
Session 19 (training_probe, whole weight, graph replay): r = 16 with the small-rank default tile
(16x256, 2 warps) 86-87 us on 4096x14336 / 14336x4096 (64x128 in the same run: 91-93), 0.32 ms on
8192x28672 (0.35); no LoRA 59-61 us / 0.22 ms against dequantize_nf4's 56 us / 0.21 ms.
No ``triton.autotune``: one small config dict (``DEFAULT_CONFIG``) that ``config=`` overrides.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._ext import env_number
from ..codes import NESTED_BLOCKSIZE
from ..nf4 import NF4Weight
from .launch import CachedLauncher
from .nf4_lora_matmul import _absmax_of, _check_device, _is_pow2, _next_pow2

__all__ = ["dequantize_merge", "DEFAULT_CONFIG", "MAX_RANK"]

MAX_RANK = 256
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Hopper default: BLOCK_N x BLOCK_K output tile, R_BLOCK ranks per tl.dot (the rank is walked in
#: chunks; the chunk shrinks to max(16, next_pow2(r)) for small r).  Swept on an H100 (bf16,
#: 4096x4096 / 4096x14336 / 14336x4096, r = 16 / 64 / 256): 64x128 beats 64x256 by ~12 % at r = 16
#: (122 vs 186 registers) and loses ~7 % at r = 256; R_BLOCK=32 is 5-9 % faster than 64 at
#: r = 64; num_stages=1 is 5-25 % slower; 8 warps or 128-row tiles are slower.
#: Measured and dropped in session 19 (H100, 8192x28672, r = 16; results/probe_training_ab_*_session19*):
#: the low-rank term as rank-1 fp32 FMAs on the CUDA cores (0.35 -> 0.58 ms), the tile kept as
#: high / low nibble halves up to the store (no-LoRA 0.276 -> 0.274; with the term 0.50-1.68 ms),
#: and the low-rank term as its own MMA tile added to Ŵ in Ŵ's layout (16x256x2: 0.32 -> 0.41-0.46 ms).
#: K_FASTEST (session 19; ``$LORA_KERNELS_MERGE_K_FASTEST=1`` for every launch): tiles ordered
#: along K first, so the programs resident together write whole consecutive rows (one contiguous
#: span) instead of one BLOCK_K-wide column band down every row of the output.  The N-first order
#: was chosen for A's L2 reuse, but A [r, K] and B [N, r] fit in L2 either way; session 18 saw the
#: merge without the low-rank term at 1.13x dequantize_nf4 on 4096x14336 and 1.33x on 8192x28672,
#: a size dependence the flat, sequential dequantize does not have (a TLB / DRAM-page suspect).
DEFAULT_CONFIG = dict(BLOCK_N=64, BLOCK_K=128, R_BLOCK=32, num_warps=4, num_stages=2,
                      K_FASTEST=os.environ.get("LORA_KERNELS_MERGE_K_FASTEST", "0") == "1")
_CONFIG_KEYS = frozenset(DEFAULT_CONFIG)

#: Launches without a ``config`` at rank r <= SMALL_RANK_MAX (and without LoRA) use this tile instead
#: of DEFAULT_CONFIG's (``$LORA_KERNELS_MERGE_SMALL_RANK_MAX``, default 16; -1 turns it off).  Session
#: 19's sweep on the H100 (bf16, 22 tiles, as the training step launches them at a 64 MB workspace):
#: 16x256 with 2 warps takes the forward + backward merges of 8192x28672 from 0.76 to 0.70 ms at
#: r = 16 and r = 4 (4096x14336: 0.19 -> 0.18; the no-LoRA merge 0.275 -> 0.239 against
#: dequantize_nf4's 0.207), but loses 9 % at r = 64 and 15 % at r = 128, where 64x128 stays best
#: (A's L2 traffic per output element grows as 2r / BLOCK_N).  Without the low-rank term the tiles
#: also go K_FASTEST: 0.239 -> 0.222 ms on 8192x28672, 0.062 -> 0.059 on 4096x14336 (with it, K_FASTEST
#: was 1-3 % slower).
SMALL_RANK_MAX = env_number("LORA_KERNELS_MERGE_SMALL_RANK_MAX", 16, int, minimum=-1)
SMALL_RANK_TILE = dict(BLOCK_N=16, BLOCK_K=256, num_warps=2)


def default_config(r: int) -> dict:
    """The config a launch without ``config`` uses at LoRA rank ``r`` (0: no LoRA term)."""
    if r <= SMALL_RANK_MAX:
        return dict(DEFAULT_CONFIG, **SMALL_RANK_TILE, **({"K_FASTEST": True} if r == 0 else {}))
    return DEFAULT_CONFIG


def window_col_unit(blocksize: int) -> int:
    """Column windows of launches without a ``config`` must start at multiples of this (every
    default tile's BLOCK_K and the blocksize): what the streamed routes chunk columns by."""
    return max(128, DEFAULT_CONFIG["BLOCK_K"], SMALL_RANK_TILE["BLOCK_K"], blocksize)


# =============================================================================================
# Kernel
# =============================================================================================
@triton.jit
def _merge_kernel(
    w_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr,
    a_ptr, b_ptr, s_ptr, out_ptr,
    N, K, KH, KB, N_OFF, K_OFF, R, s_scalar,
    stride_wn, stride_ar, stride_ak, stride_bn, stride_br,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DENSE: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
    HAS_LORA: tl.constexpr, R_BLOCK: tl.constexpr, SCALE_VEC: tl.constexpr, IEEE: tl.constexpr,
    K_FASTEST: tl.constexpr,
):
    # Bytes per program: see the module docstring.  Output tile [BLOCK_N, BLOCK_K] of W_eff.
    # N, K: the output window's size; the weight (NF4 or dense), A and B are the full tensors,
    # read at rows N_OFF + n and columns K_OFF + k (KH = full K / 2 bytes and KB = full K / BS
    # blocks per row of an NF4 weight; there K_OFF is a multiple of BLOCK_K and of BS).  Offsets
    # instead of sliced views: no view ops on the host per launch.
    pid = tl.program_id(0)
    if K_FASTEST:
        num_pid_k = tl.cdiv(K, BLOCK_K)
        pid_k = pid % num_pid_k
        pid_n = pid // num_pid_k
    else:
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pid_n = pid % num_pid_n
        pid_k = pid // num_pid_n
    k0 = pid_k * BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    nmask = offs_n < N
    kmask = offs_k < K
    n64 = offs_n.to(tl.int64)
    g64 = n64 + N_OFF                         # rows of the full weight (and of B)
    gk = K_OFF + offs_k                       # columns of the full weight (and of A)

    # ---- Ŵ tile in fp32
    if DENSE:
        w = tl.load(w_ptr + g64[:, None] * stride_wn + gk[None, :],
                    mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    else:
        # byte j of the tile holds columns k0 + 2j (high nibble) and k0 + 2j + 1 (low nibble);
        # K % BS == 0, so a quantization block never crosses a row: block = n * KB + k // BS.
        gk0 = K_OFF + k0                      # first column of this tile in the full weight
        offs_kh = gk0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(w_ptr + g64[:, None] * KH + offs_kh[None, :],
                       mask=nmask[:, None] & ((k0 + 2 * tl.arange(0, BLOCK_K // 2)) < K)[None, :],
                       other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))
        lo = tl.load(code_ptr + (byte & 15))
        if BLOCK_K <= BS:
            # one block per row in this tile (BS is a multiple of BLOCK_K: powers of two)
            amax = _absmax_of(g64 * KB + gk0 // BS, nmask, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr,
                              NESTED, NBS)
            w = tl.reshape(tl.join(hi * amax[:, None], lo * amax[:, None]), [BLOCK_N, BLOCK_K])
        else:
            NBT: tl.constexpr = BLOCK_K // BS
            vals = tl.reshape(tl.join(hi, lo), [BLOCK_N, BLOCK_K])
            bcol = gk0 // BS + tl.arange(0, NBT)
            amax = _absmax_of(g64[:, None] * KB + bcol[None, :], nmask[:, None] & (bcol[None, :] < KB),
                              absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, NESTED, NBS)
            w = tl.reshape(tl.reshape(vals, [BLOCK_N, NBT, BS]) * amax[:, :, None], [BLOCK_N, BLOCK_K])

    # ---- + low-rank term: tl.dot over chunks of R_BLOCK ranks with Ŵ as the fp32 accumulator
    # (masked: no padded copies)
    if HAS_LORA:
        for r0 in range(0, R, R_BLOCK):
            rr = r0 + tl.arange(0, R_BLOCK)
            rmask = rr < R
            bt = tl.load(b_ptr + g64[:, None] * stride_bn + rr[None, :] * stride_br,
                         mask=nmask[:, None] & rmask[None, :], other=0.0)
            if SCALE_VEC:
                bt = bt.to(tl.float32) * tl.load(s_ptr + rr, mask=rmask, other=0.0)[None, :]
            else:
                bt = bt.to(tl.float32) * s_scalar
            at = tl.load(a_ptr + rr[:, None] * stride_ar + gk[None, :] * stride_ak,
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
            if IEEE:
                w = tl.dot(bt.to(tl.float32), at.to(tl.float32), w, input_precision="ieee")
            else:
                w = tl.dot(bt.to(out_ptr.dtype.element_ty), at.to(out_ptr.dtype.element_ty), w)

    tl.store(out_ptr + n64[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=nmask[:, None] & kmask[None, :])


# =============================================================================================
# Launcher
# =============================================================================================
#: merge_window's launches after the first of each argument signature skip JITFunction.run's
#: per-call binding (launch.py: ~37 of ~56 µs host time per launch on the H100 machine)
_launch_merge = CachedLauncher(_merge_kernel)


def _resolve_config(override: dict | None, r: int) -> dict:
    cfg = dict(default_config(r))
    if override is not None:
        if not isinstance(override, dict):
            raise TypeError(f"dequantize_merge: config must be a dict, got {type(override).__name__}")
        bad = set(override) - _CONFIG_KEYS
        if bad:
            raise ValueError(f"dequantize_merge: unknown config key(s) {sorted(bad)}; "
                             f"expected a subset of {sorted(_CONFIG_KEYS)}")
        cfg.update(override)
    for name, lo in (("BLOCK_N", 16), ("BLOCK_K", 32), ("R_BLOCK", 16)):
        if not _is_pow2(cfg[name]) or cfg[name] < lo:
            raise ValueError(f"dequantize_merge: config {name} must be a power of two >= {lo}, got {cfg[name]!r}")
    if cfg["BLOCK_N"] * cfg["BLOCK_K"] > 2**16:
        raise ValueError(f"dequantize_merge: config BLOCK_N * BLOCK_K must be <= 65536, got "
                         f"{cfg['BLOCK_N']} * {cfg['BLOCK_K']}")
    if not _is_pow2(cfg["num_warps"]) or cfg["num_warps"] > 32:
        raise ValueError(f"dequantize_merge: config num_warps must be a power of two <= 32, got {cfg['num_warps']!r}")
    if not isinstance(cfg["num_stages"], int) or isinstance(cfg["num_stages"], bool) or cfg["num_stages"] < 1:
        raise ValueError(f"dequantize_merge: config num_stages must be an int >= 1, got {cfg['num_stages']!r}")
    if not isinstance(cfg["K_FASTEST"], bool):
        raise ValueError(f"dequantize_merge: config K_FASTEST must be a bool, got {cfg['K_FASTEST']!r}")
    return cfg


def scale_operands(scale, r: int, device) -> tuple[float, torch.Tensor | None]:
    """(s_scalar, s_vec) as the kernel takes them: a float scale, or a tensor one (shape [] or [r])
    as a contiguous fp32 [r] vector on ``device`` (s_scalar then unused)."""
    if isinstance(scale, torch.Tensor):
        return 1.0, scale.detach().reshape(-1).to(device=device, dtype=torch.float32).expand(r).contiguous()
    return float(scale), None


def _window(win, size: int, name: str) -> tuple[int, int]:
    if win is None:
        return 0, size
    try:
        a, b = (int(v) for v in win)
    except (TypeError, ValueError):
        raise TypeError(f"dequantize_merge: {name} must be a (start, stop) pair of ints, got {win!r}") from None
    if not 0 <= a < b <= size:
        raise ValueError(f"dequantize_merge: {name} window {(a, b)} must satisfy 0 <= start < stop <= {size}")
    return a, b


def _check_float_tensor(name: str, t, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"dequantize_merge: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize_merge: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"dequantize_merge: {name} must be 2-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"dequantize_merge: {name} is on {t.device} but the weight is on {device}")


def dequantize_merge(
    weight: NF4Weight | torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float | torch.Tensor = 1.0,
    dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
) -> torch.Tensor:
    """W_eff [N, K] = dtype(Ŵ + (lora_b ⊙ scale) · lora_a): fp32 accumulation into Ŵ, one rounding at the end.

    weight: NF4Weight (N, K) with K % blocksize == 0, or a dense [N, K] fp32/bf16/fp16 tensor whose
    rows are contiguous (stride(1) == 1).  lora_a [r, K], lora_b [N, r] (fp32/bf16/fp16),
    1 <= r <= 256; both None: plain dequantize (bit-identical to ``lora_kernels.dequantize_nf4``).
    scale: float, or a float tensor of shape [] or [r] (AdaLoRA per-rank scale; used as fp32).
    dtype: fp32/bf16/fp16, default the NF4 weight's original dtype / the dense tensor's dtype.
    out: optional contiguous [N, K] tensor of ``dtype`` on the weight's device, filled and returned.
    config: dict overriding ``default_config(r)`` (``DEFAULT_CONFIG``, with ``SMALL_RANK_TILE`` for
    r <= SMALL_RANK_MAX; keys BLOCK_N, BLOCK_K, R_BLOCK, num_warps, num_stages, K_FASTEST).
    rows, cols: optional windows ``(start, stop)``: only W_eff[rows[0]:rows[1], cols[0]:cols[1]] is
    computed and returned (``out`` then has the window's shape); ``cols[0]`` must be a multiple of
    the blocksize and of the config's BLOCK_K.  The streamed routes (``library``) write the merged
    weight chunk by chunk this way, so the dense [N, K] weight never exists whole.
    """
    # ------------------------------------------------------------------ weight
    if isinstance(weight, NF4Weight):
        dense = False
        if len(weight.shape) != 2:
            raise ValueError(f"dequantize_merge: the NF4 weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
        weight.validate(check_tables=False)          # NF4FormatError (a ValueError) names the bad field
        device = weight.device
        N, K = weight.shape
        bs = weight.blocksize
        if K % bs != 0:
            raise ValueError(f"dequantize_merge: K={K} is not a multiple of the NF4 blocksize {bs}; the kernel "
                             f"needs whole blocks per row (use dequantize_nf4 + a torch addmm instead)")
        for name in ("packed", "absmax", "code", "nested_absmax", "nested_code"):
            t = getattr(weight, name)
            if t is not None and not t.is_contiguous():
                raise ValueError(f"dequantize_merge: NF4 {name} must be contiguous")
        default_dtype = weight.dtype
    elif isinstance(weight, torch.Tensor):
        dense = True
        if weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dequantize_merge: a dense weight must be float32, bfloat16 or float16, "
                            f"got {weight.dtype}")
        if weight.dim() != 2:
            raise ValueError(f"dequantize_merge: a dense weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
        device = weight.device
        N, K = weight.shape
        if weight.stride(1) != 1 and K > 1:
            raise ValueError(f"dequantize_merge: a dense weight must have contiguous rows (stride(1) == 1), "
                             f"got strides {weight.stride()}")
        bs = 64
        default_dtype = weight.dtype
    else:
        raise TypeError(f"dequantize_merge: weight must be an NF4Weight or a dense tensor, got {type(weight).__name__}")
    _check_device(device, "dequantize_merge")

    if dtype is None:
        dtype = default_dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize_merge: dtype must be float32, bfloat16 or float16, got {dtype}")

    # ------------------------------------------------------------------ LoRA factors and scale
    has_lora = lora_a is not None or lora_b is not None
    r = 0
    s_scalar, s_vec = 1.0, None
    if has_lora:
        if lora_a is None or lora_b is None:
            raise ValueError(f"dequantize_merge: lora_a and lora_b must both be given or both be None "
                             f"(lora_a is {'None' if lora_a is None else 'given'}, "
                             f"lora_b is {'None' if lora_b is None else 'given'})")
        _check_float_tensor("lora_a", lora_a, device)
        _check_float_tensor("lora_b", lora_b, device)
        r = lora_a.shape[0]
        if lora_a.shape[1] != K:
            raise ValueError(f"dequantize_merge: lora_a must be [r, K={K}], got {tuple(lora_a.shape)}")
        if tuple(lora_b.shape) != (N, r):
            raise ValueError(f"dequantize_merge: lora_b must be [N={N}, r={r}], got {tuple(lora_b.shape)}")
        if not 1 <= r <= MAX_RANK:
            raise ValueError(f"dequantize_merge: rank r={r} must be in 1..{MAX_RANK}")
        if isinstance(scale, torch.Tensor):
            if not scale.is_floating_point():
                raise TypeError(f"dequantize_merge: scale must be a float tensor, got {scale.dtype}")
            if scale.device != device:
                raise ValueError(f"dequantize_merge: scale is on {scale.device} but the weight is on {device}")
            if not (scale.dim() == 0 or (scale.dim() == 1 and scale.numel() == r)):
                raise ValueError(f"dequantize_merge: a scale tensor must have shape [] or [r={r}], "
                                 f"got {tuple(scale.shape)}")
        elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError(f"dequantize_merge: scale must be a float or a float tensor, got {type(scale).__name__}")
        s_scalar, s_vec = scale_operands(scale, r, device)

    # ------------------------------------------------------------------ window
    cfg = _resolve_config(config, r)
    n0, n1 = _window(rows, N, "rows")
    k0, k1 = _window(cols, K, "cols")
    align = 1 if dense else max(cfg["BLOCK_K"], bs)
    if k0 % align:
        raise ValueError(f"dequantize_merge: cols start {k0} must be a multiple of {align} "
                         f"(the blocksize and BLOCK_K)")
    N, K = n1 - n0, k1 - k0

    # ------------------------------------------------------------------ output, config
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"dequantize_merge: out must be a torch.Tensor, got {type(out).__name__}")
        if (tuple(out.shape) != (N, K) or out.dtype != dtype or out.device != device
                or not out.is_contiguous()):
            raise ValueError(f"dequantize_merge: out must be a contiguous [{N}, {K}] {dtype} tensor on {device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})")
    else:
        out = torch.empty((N, K), dtype=dtype, device=device)
    if N == 0 or K == 0:
        return out
    return merge_window(out, weight, lora_a, lora_b, s_scalar, s_vec, (n0, n1), (k0, k1), cfg)


def merge_window(out: torch.Tensor, weight, lora_a, lora_b, s_scalar: float, s_vec: torch.Tensor | None,
                 rows: tuple[int, int], cols: tuple[int, int], cfg: dict | None = None) -> torch.Tensor:
    """Launch only (no argument checks: the caller has made them, as ``dequantize_merge`` does):
    W_eff[rows[0]:rows[1], cols[0]:cols[1]] written row-major from ``out``'s first element (``out``:
    a contiguous [rows, cols] tensor, or any contiguous tensor of the output dtype with at least
    that many elements, e.g. a flat workspace), with ``s_vec`` an fp32 [r] vector or None (then the
    float ``s_scalar``); ``weight``, ``lora_a``, ``lora_b`` are the full tensors (the window is
    passed as offsets, not views); ``cfg`` None: ``default_config(r)``.  The streamed routes of
    ``library`` call this per chunk to keep the host cost of a chunk to one launch.  Returns ``out``."""
    (n0, n1), (k0, k1) = rows, cols
    N, K = n1 - n0, k1 - k0
    dense = not isinstance(weight, NF4Weight)
    if dense:
        w = absmax = nested = ncode = offset = code = weight
        nested_flag = False
        stride_wn = weight.stride(0)
        bs, KH, KB = 64, 0, 0
    else:
        bs = weight.blocksize
        KH, KB = weight.shape[1] // 2, weight.shape[1] // bs
        w = weight.packed                     # [n/2, 1] uint8: only its data pointer is used
        code = weight.code
        absmax = weight.absmax
        nested_flag = weight.nested_absmax is not None
        nested = weight.nested_absmax if nested_flag else code
        ncode = weight.nested_code if nested_flag else code
        offset = weight.offset if nested_flag else code
        stride_wn = 0
    has_lora = lora_a is not None
    if cfg is None:
        cfg = default_config(lora_a.shape[0] if has_lora else 0)
    if has_lora:
        a_arg, b_arg = lora_a, lora_b
        r = lora_a.shape[0]
        stride_ar, stride_ak = lora_a.stride()
        stride_bn, stride_br = lora_b.stride()
        r_block = min(cfg["R_BLOCK"], max(16, _next_pow2(r)))
    else:
        a_arg = b_arg = out
        r = stride_ar = stride_ak = stride_bn = stride_br = 0
        r_block = 16
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    meta_key = (bn, bk, dense, nested_flag, bs, has_lora, r_block, s_vec is not None, out.dtype == torch.float32,
                cfg["num_warps"], cfg["num_stages"], cfg["K_FASTEST"])
    meta = _META.get(meta_key)
    if meta is None:          # the constexpr / option dicts, built once per combination
        meta = _META[meta_key] = (
            dict(BLOCK_N=bn, BLOCK_K=bk, DENSE=dense, NESTED=nested_flag, BS=bs, NBS=NESTED_BLOCKSIZE,
                 HAS_LORA=has_lora, R_BLOCK=r_block, SCALE_VEC=s_vec is not None, IEEE=out.dtype == torch.float32,
                 K_FASTEST=cfg["K_FASTEST"]),
            dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False))
    _launch_merge(
        -(-N // bn) * -(-K // bk),               # integer ceil-divisions (triton.cdiv costs µs per call)
        (w, absmax, nested, ncode, offset, code, a_arg, b_arg, s_vec if s_vec is not None else out, out,
         N, K, KH, KB, n0, k0, r, s_scalar, stride_wn, stride_ar, stride_ak, stride_bn, stride_br),
        *meta,
    )
    return out


_META: dict = {}
