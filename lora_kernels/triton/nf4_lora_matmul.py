"""Fused QLoRA / LoRA forward: ``y = x · Ŵᵀ + ((x · Aᵀ) ⊙ s) · Bᵀ + bias`` in Triton.

Shapes and dtypes (M = rows of x after the caller flattened its leading dims):

========  ===========================  ==============================================
x         [M, K] bf16 / fp16            made contiguous here (a copy if it is not)
weight    NF4Weight of shape (N, K)     Ŵ[n, k] = fl(NF4[idx] * absmax[(n*K + k) // bs]),
          or dense [N, K] (x's dtype)   K % blocksize == 0 (else: use the fallback)
lora_a    [r, K] (x's dtype) or None    1 <= r <= 256; None: no low-rank term
lora_b    [N, r] (x's dtype)
scale     float, or fp32 [r]            per-rank scale (AdaLoRA), or a 0-d tensor
bias      [N] (x's dtype or fp32)       or None
y         [M, N] x's dtype              fp32 accumulation throughout
========  ===========================  ==============================================

The dense weight is never materialised in global memory: every K step loads the packed uint8
tile [BLOCK_N, BLOCK_K/2], splits the two nibbles (high nibble = even k), maps them through
the 16 NF4 levels, multiplies by the block's absmax in fp32 (decoded in the kernel from its
8-bit code when double-quantized), casts to x's dtype and feeds ``tl.dot``.

Kernels (see each one's comment for bytes/FLOPs per program):

* ``_lora_matmul_kernel`` -- tiled GEMM for large M, grouped program order, low-rank term and
  bias fused as an epilogue.  Also computes ``T = (x · Aᵀ) ⊙ s`` (dense weight = A, column
  scale epilogue, no LoRA) -- the small first launch of every call that has a LoRA term.
* ``_lora_gemv_kernel`` -- M <= 16 (decode), memory-bound on the 4-bit weight: split over
  N tiles and K slices; fp32 atomics into a zeroed [M, N] workspace when split, then
  ``_lora_gemv_finish_kernel`` adds the LoRA term + bias and casts (one program per N tile).
  With a single K slice the gemv kernel runs the epilogue itself.

Launchers: :func:`lora_matmul`, :func:`pick_route`, :func:`candidate_configs`.
No ``triton.autotune``: configs come from small tables (per compute capability) and can be
overridden with ``config=``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..codes import NESTED_BLOCKSIZE
from ..nf4 import NF4Weight
from .launch import device_guard

__all__ = ["lora_matmul", "pick_route", "candidate_configs", "default_config", "GEMV_MAX_M", "MAX_RANK"]

GEMV_MAX_M = 16
MAX_RANK = 256
_X_DTYPES = (torch.bfloat16, torch.float16)

_LUT_MODES = {"gather": 0, "select": 1}


# =============================================================================================
# Device helpers (@triton.jit functions shared by the kernels)
# =============================================================================================
@triton.jit
def _nf4_lut(idx, code_ptr, LUT: tl.constexpr):
    """NF4 level of each 4-bit index (int32 tensor) as fp32.

    LUT == 0 ("gather"): a gather from the 64-byte code table (one L1 line: one wavefront per
    warp-wide gather).  LUT == 1 ("select"): a 4-level select tree over the 16 levels held in
    registers (15 selects per element, no memory traffic)."""
    if LUT == 0:
        v = tl.load(code_ptr + idx)
    else:
        b0 = (idx & 1) != 0
        b1 = (idx & 2) != 0
        b2 = (idx & 4) != 0
        b3 = (idx & 8) != 0
        l0 = tl.where(b0, tl.load(code_ptr + 1), tl.load(code_ptr + 0))
        l1 = tl.where(b0, tl.load(code_ptr + 3), tl.load(code_ptr + 2))
        l2 = tl.where(b0, tl.load(code_ptr + 5), tl.load(code_ptr + 4))
        l3 = tl.where(b0, tl.load(code_ptr + 7), tl.load(code_ptr + 6))
        l4 = tl.where(b0, tl.load(code_ptr + 9), tl.load(code_ptr + 8))
        l5 = tl.where(b0, tl.load(code_ptr + 11), tl.load(code_ptr + 10))
        l6 = tl.where(b0, tl.load(code_ptr + 13), tl.load(code_ptr + 12))
        l7 = tl.where(b0, tl.load(code_ptr + 15), tl.load(code_ptr + 14))
        m0 = tl.where(b1, l1, l0)
        m1 = tl.where(b1, l3, l2)
        m2 = tl.where(b1, l5, l4)
        m3 = tl.where(b1, l7, l6)
        n0 = tl.where(b2, m1, m0)
        n1 = tl.where(b2, m3, m2)
        v = tl.where(b3, n1, n0)
    return v


@triton.jit
def _absmax_of(blk, mask, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr,
               NESTED: tl.constexpr, NBS: tl.constexpr):
    """fp32 absmax of the blocks ``blk`` (int64 tensor).  Double-quantized:
    fl(fl(nested_code[q] * nested_absmax[blk // 256]) + offset) -- two roundings only when the
    kernel is compiled with enable_fp_fusion=False (the launcher's ``fp_fusion`` config key)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        prod = tl.load(ncode_ptr + q) * tl.load(nested_ptr + blk // NBS, mask=mask, other=0.0)
        a = prod + tl.load(offset_ptr)
    else:
        a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return a


@triton.jit
def _nf4_tile(w_ptrs, wmask, rows64, nmask, k0, KB,
              absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BS: tl.constexpr,
              NESTED: tl.constexpr, NBS: tl.constexpr, LUT: tl.constexpr):
    """fp32 tile [BLOCK_N, BLOCK_K] of Ŵ = NF4[idx] * absmax for rows ``rows64`` and columns
    k0 .. k0 + BLOCK_K.  ``w_ptrs``: uint8 pointers [BLOCK_N, BLOCK_K // 2] to the packed bytes of
    those columns (byte j holds columns k0 + 2j (high nibble) and k0 + 2j + 1 (low nibble)).
    Needs K % BS == 0, so a block never crosses a row: block = n * KB + k // BS."""
    byte = tl.load(w_ptrs, mask=wmask, other=0).to(tl.int32)
    hi = _nf4_lut(byte >> 4, code_ptr, LUT)
    lo = _nf4_lut(byte & 15, code_ptr, LUT)
    vals = tl.reshape(tl.join(hi, lo), [BLOCK_N, BLOCK_K])     # column 2j = high nibble
    if BLOCK_K <= BS:
        # One block per row in this K step (BS is a multiple of BLOCK_K: powers of two).
        blk = rows64 * KB + k0 // BS
        a = _absmax_of(blk, nmask, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, NESTED, NBS)
        w = vals * a[:, None]
    else:
        NBT: tl.constexpr = BLOCK_K // BS
        bcol = k0 // BS + tl.arange(0, NBT)
        blk = rows64[:, None] * KB + bcol[None, :]
        bmask = nmask[:, None] & (bcol[None, :] < KB)
        a = _absmax_of(blk, bmask, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, NESTED, NBS)
        w = tl.reshape(tl.reshape(vals, [BLOCK_N, NBT, BS]) * a[:, :, None], [BLOCK_N, BLOCK_K])
    return w


@triton.jit
def _weight_tile(w_ptrs, n64, nmask, k0, K, KH, KB, offs_k, offs_kh,
                 absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BS: tl.constexpr, NESTED: tl.constexpr,
                 NBS: tl.constexpr, LUT: tl.constexpr, DENSE: tl.constexpr, EVEN_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] weight tile at columns k0.. of both kernels' K loops: a dense load
    (``w_ptrs`` to the elements) or an fp32 NF4 tile (``w_ptrs`` to the packed bytes; ``_nf4_tile``)."""
    if DENSE:
        if EVEN_K:
            w = tl.load(w_ptrs, mask=nmask[:, None], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=nmask[:, None] & (k0 + offs_k[None, :] < K), other=0.0)
    else:
        if EVEN_K:
            wmask = nmask[:, None]
        else:
            wmask = nmask[:, None] & (k0 // 2 + offs_kh[None, :] < KH)
        w = _nf4_tile(w_ptrs, wmask, n64, nmask, k0, KB,
                      absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr,
                      BLOCK_N, BLOCK_K, BS, NESTED, NBS, LUT)
    return w


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, R, s_scalar,
              t_ptr, b_ptr, bias_ptr, s_ptr, y_ptr, stride_tm, stride_ym,
              HAS_LORA: tl.constexpr, R_BLOCK: tl.constexpr, LORA_DOT: tl.constexpr,
              HAS_BIAS: tl.constexpr, SCALE_MODE: tl.constexpr, ATOMIC: tl.constexpr):
    """acc [BM, BN] fp32 -> (acc * s_col) + T[rows, :R] · B[cols, :R]ᵀ + bias -> y (cast, or
    fp32 atomic add when ATOMIC).  The rank is walked in chunks of R_BLOCK (>= 16, masked), so
    A/B/T need no padded copies; LORA_DOT=False does the chunk product with FMAs (BM < 16)."""
    mmask = offs_m < M
    nmask = offs_n < N
    m64 = offs_m.to(tl.int64)
    if SCALE_MODE == 1:
        acc = acc * s_scalar
    elif SCALE_MODE == 2:
        acc = acc * tl.load(s_ptr + offs_n, mask=nmask, other=0.0)[None, :]
    if HAS_LORA:
        # Per chunk: BM*R_BLOCK + R_BLOCK*BN elements loaded, 2*BM*BN*R_BLOCK FLOPs.
        n64 = offs_n.to(tl.int64)
        for r0 in range(0, R, R_BLOCK):
            rr = r0 + tl.arange(0, R_BLOCK)
            rmask = rr < R
            t = tl.load(t_ptr + m64[:, None] * stride_tm + rr[None, :],
                        mask=mmask[:, None] & rmask[None, :], other=0.0)
            bt = tl.load(b_ptr + n64[None, :] * R + rr[:, None],
                         mask=rmask[:, None] & nmask[None, :], other=0.0)        # Bᵀ chunk [R_BLOCK, BN]
            if LORA_DOT:
                acc = tl.dot(t, bt, acc)
            else:
                acc += tl.sum(t.to(tl.float32)[:, :, None] * bt.to(tl.float32)[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + m64[:, None] * stride_ym + offs_n[None, :]
    ymask = mmask[:, None] & nmask[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=ymask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


# =============================================================================================
# 1. Tiled kernel (large M)
# =============================================================================================
@triton.jit
def _lora_matmul_kernel(
    x_ptr, w_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr,
    t_ptr, b_ptr, bias_ptr, s_ptr, y_ptr,
    M, N, K, KH, KB, R, s_scalar,
    stride_xm, stride_wn, stride_tm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DENSE: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
    LUT: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr,
    HAS_LORA: tl.constexpr, R_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_MODE: tl.constexpr,
):
    # Per program: output tile [BLOCK_M, BLOCK_N]; per K step it reads BLOCK_M*BLOCK_K x elements
    # (2 B) + BLOCK_N*BLOCK_K/2 packed bytes (+ BLOCK_N*max(1, BLOCK_K/BS) absmax codes) and does
    # 2*BLOCK_M*BLOCK_N*BLOCK_K FLOPs on the tensor cores plus ~4 ALU ops per dequantized
    # element (shift/and, LUT, scale, cast).  Arithmetic intensity vs the 4-bit weight:
    # 4*BLOCK_M FLOPs per weight byte -> compute-bound from BLOCK_M ~ 64 up on H100.
    # SWAP_AB computes accᵀ = Ŵ · xᵀ so the register-dequantized Ŵ is the MMA's A operand.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kh = tl.arange(0, BLOCK_K // 2)                # packed-byte columns (NF4)
    mmask = offs_m < M
    nmask = offs_n < N
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    x_ptrs = x_ptr + m64[:, None] * stride_xm + offs_k[None, :]
    if DENSE:
        w_ptrs = w_ptr + n64[:, None] * stride_wn + offs_k[None, :]
    else:
        w_ptrs = w_ptr + n64[:, None] * KH + offs_kh[None, :]

    if SWAP_AB:
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mmask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=mmask[:, None] & (k0 + offs_k[None, :] < K), other=0.0)
        w = _weight_tile(w_ptrs, n64, nmask, k0, K, KH, KB, offs_k, offs_kh,
                         absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr,
                         BLOCK_N, BLOCK_K, BS, NESTED, NBS, LUT, DENSE, EVEN_K).to(x_ptr.dtype.element_ty)
        if DENSE:
            w_ptrs += BLOCK_K
        else:
            w_ptrs += BLOCK_K // 2
        if SWAP_AB:
            acc_t = tl.dot(w, tl.trans(x), acc_t)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
    if SWAP_AB:
        acc = tl.trans(acc_t)
    _epilogue(acc, offs_m, offs_n, M, N, R, s_scalar, t_ptr, b_ptr, bias_ptr, s_ptr, y_ptr,
              stride_tm, stride_ym, HAS_LORA, R_BLOCK, True, HAS_BIAS, SCALE_MODE, False)


# =============================================================================================
# 2. GEMV / split-K kernel (M <= 16)
# =============================================================================================
@triton.jit
def _lora_gemv_kernel(
    x_ptr, w_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr,
    t_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, KH, KB, R, K_PER_SPLIT,
    stride_xm, stride_wn, stride_tm, stride_ym,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DENSE: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr,
    LUT: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr, SPLIT: tl.constexpr,
    HAS_LORA: tl.constexpr, R_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # Grid (cdiv(N, BLOCK_N), SPLIT_K).  Program (i, j) streams the packed rows
    # [i*BLOCK_N, (i+1)*BLOCK_N) over the K slice [j*K_PER_SPLIT, (j+1)*K_PER_SPLIT):
    # BLOCK_N*K_PER_SPLIT/2 weight bytes (+ 1 B absmax code per block), the M x rows of the
    # slice (L2-resident, shared by all N tiles), 2*M*BLOCK_N*K_PER_SPLIT FLOPs.
    # USE_DOT: x padded to M_PAD = 16 rows, tl.dot on the tensor cores (the dequantized tile
    # goes through shared memory once); else M_PAD (<= 2 or so) FMA passes over the fp32 tile
    # (M FMAs per weight element: cheaper than the smem round trip for M = 1).
    # SPLIT: fp32 atomic add of the partial [M, BLOCK_N] into a zeroed workspace y_ptr (the
    # launcher then passes HAS_LORA = HAS_BIAS = False: the finish kernel adds them); else the
    # epilogue (LoRA + bias + cast) runs here.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, M_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kh = tl.arange(0, BLOCK_K // 2)                # packed-byte columns (NF4)
    mmask = offs_m < M
    nmask = offs_n < N
    n64 = offs_n.to(tl.int64)
    k_start = pid_k * K_PER_SPLIT
    k_stop = tl.minimum(K, k_start + K_PER_SPLIT)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_start + offs_k)[None, :]
    if DENSE:
        w_ptrs = w_ptr + n64[:, None] * stride_wn + (k_start + offs_k)[None, :]
    else:
        w_ptrs = w_ptr + n64[:, None] * KH + (k_start // 2 + offs_kh)[None, :]

    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        if EVEN_K:
            xmask = mmask[:, None]
        else:
            xmask = mmask[:, None] & (k0 + offs_k[None, :] < K)
        x = tl.load(x_ptrs, mask=xmask, other=0.0)
        w = _weight_tile(w_ptrs, n64, nmask, k0, K, KH, KB, offs_k, offs_kh,
                         absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr,
                         BLOCK_N, BLOCK_K, BS, NESTED, NBS, LUT, DENSE, EVEN_K)
        if DENSE:
            w_ptrs += BLOCK_K
        else:
            w_ptrs += BLOCK_K // 2
        if USE_DOT:
            acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
        else:
            wf = w.to(tl.float32)
            xf = x.to(tl.float32)
            for m in tl.static_range(M_PAD):
                xm = tl.sum(tl.where(offs_m[:, None] == m, xf, 0.0), axis=0)      # row m [BLOCK_K]
                part = tl.sum(wf * xm[None, :], axis=1)                          # [BLOCK_N]
                acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)
        x_ptrs += BLOCK_K
    _epilogue(acc, offs_m, offs_n, M, N, R, 1.0, t_ptr, b_ptr, bias_ptr, bias_ptr, y_ptr,
              stride_tm, stride_ym, HAS_LORA, R_BLOCK, USE_DOT, HAS_BIAS, 0, SPLIT)


@triton.jit
def _lora_gemv_finish_kernel(
    ws_ptr, t_ptr, b_ptr, bias_ptr, y_ptr, M, N, R, stride_tm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LORA: tl.constexpr, R_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # Per program: reads the fp32 partial sums [M, BLOCK_N] (M <= 16), the T rows [M, r] and
    # B[cols, :r]; writes y [M, BLOCK_N] in x's dtype.  2*16*BLOCK_N*r FLOPs on the tensor cores.
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ws = tl.load(ws_ptr + offs_m[:, None] * N + offs_n[None, :],
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
    _epilogue(ws, offs_m, offs_n, M, N, R, 1.0, t_ptr, b_ptr, bias_ptr, bias_ptr, y_ptr,
              stride_tm, stride_ym, HAS_LORA, R_BLOCK, True, HAS_BIAS, 0, False)


# =============================================================================================
# Configs
# =============================================================================================
_TILED_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "SWAP_AB", "LUT",
               "R_BLOCK", "fp_fusion"}
_GEMV_KEYS = {"BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages", "USE_DOT", "LUT", "R_BLOCK",
              "fp_fusion"}

# (max M, config).  Defaults to be swept on the H100 (see candidate_configs).  SWAP_AB for small M
# puts the dequantized Ŵ in the MMA's M slot (wgmma needs M >= 64 per warpgroup) and x's few
# rows in its N slot.
_HOPPER_TILED = (
    (64, dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, SWAP_AB=True)),
    (256, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, SWAP_AB=False)),
    (None, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, SWAP_AB=False)),
)
_AMPERE_TILED = (
    (64, dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, SWAP_AB=False)),
    (256, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, SWAP_AB=False)),
    (None, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, SWAP_AB=False)),
)
_TILED_COMMON = dict(LUT="gather", R_BLOCK=64, fp_fusion=False)
# num_stages: with LUT="gather", Triton's software pipeliner stages the LUT gathers themselves
# through shared memory once the tile feeds tl.dot (sm_90 compile, BLOCK_N=64, BLOCK_K=256, dot
# path: 41 KB smem at 1 stage, 76 KB at 2, 143 KB at 3; LUT="select": 41-45 KB).  The gemv hides
# latency with >= 4 programs per SM instead, so it defaults to 1 stage.  Tiled kernel, 128x128x64,
# sm_90: gather 67/100/134 KB at 2/3/4 stages, select 34-36 KB.
_GEMV_DEFAULT = dict(BLOCK_N=64, BLOCK_K=256, SPLIT_K=None, num_warps=4, num_stages=1, USE_DOT=None,
                     LUT="gather", R_BLOCK=64, fp_fusion=True)
_GEMV_FMA_MAX_M = 2          # USE_DOT=None: FMA passes for M <= 2, tl.dot (M padded to 16) above


def pick_route(M: int, N: int, K: int) -> str:
    """"gemv" for M <= 16 (decode; memory-bound on the 4-bit weight), else "tiled"."""
    return "gemv" if M <= GEMV_MAX_M else "tiled"


def _device_capability(device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return (9, 0)  # the interpreter: any table works


_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def _auto_split_k(M: int, N: int, K: int, block_n: int, block_k: int, num_sms: int) -> int:
    """Smallest power of two giving >= 4 programs per SM (N tiles x K slices), each slice at least
    two BLOCK_K steps long (fewer, longer slices keep the atomics traffic M*N*4*SPLIT_K small)."""
    n_tiles = triton.cdiv(N, block_n)
    k_steps = triton.cdiv(K, block_k)
    split = 1
    while n_tiles * split < 4 * num_sms and split * 2 * 2 <= k_steps:
        split *= 2
    return split


def default_config(M: int, N: int, K: int, capability: tuple[int, int] = (9, 0), route: str | None = None) -> dict:
    """The config ``lora_matmul`` uses for this shape, route and compute capability (before any
    ``config=`` override; SPLIT_K/USE_DOT may be None = decided at launch)."""
    route = route or pick_route(M, N, K)
    if route == "gemv":
        return dict(_GEMV_DEFAULT)
    table = _HOPPER_TILED if capability[0] >= 9 else _AMPERE_TILED
    for max_m, cfg in table:
        if max_m is None or M <= max_m:
            return {**cfg, **_TILED_COMMON}
    raise AssertionError("unreachable")


def candidate_configs(M: int, N: int, K: int, capability: tuple[int, int] = (9, 0),
                      route: str | None = None) -> list[dict]:
    """~8 configs worth sweeping for this shape (the default first), for ``route`` (default:
    ``pick_route(M, N, K)``).  Each is a complete dict accepted by ``lora_matmul(config=...)``."""
    route = route or pick_route(M, N, K)
    base = default_config(M, N, K, capability, route)
    out = [base]
    if route == "gemv":
        use_dot = M > _GEMV_FMA_MAX_M
        variants = [
            dict(BLOCK_N=32, BLOCK_K=256), dict(BLOCK_N=128, BLOCK_K=128), dict(BLOCK_N=64, BLOCK_K=512),
            dict(num_warps=8), dict(LUT="select"), dict(USE_DOT=not use_dot),
            dict(SPLIT_K=1), dict(BLOCK_N=32, BLOCK_K=512, num_warps=8), dict(num_stages=2),
        ]
    else:
        variants = [
            dict(BLOCK_K=128, num_stages=3), dict(BLOCK_N=256, num_warps=8, num_stages=3),
            dict(SWAP_AB=not base["SWAP_AB"]), dict(LUT="select"),
            dict(num_warps=4 if base["num_warps"] == 8 else 8), dict(num_stages=base["num_stages"] + 1),
            dict(GROUP_M=16), dict(BLOCK_M=max(32, base["BLOCK_M"] // 2), BLOCK_N=256, num_warps=8),
        ]
        if M > 256:
            variants.append(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3))
    for v in variants:
        c = {**base, **v}
        if c not in out:
            out.append(c)
    return out


def _is_pow2(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and (v & (v - 1)) == 0


def _resolve_config(route: str, M: int, N: int, K: int, device: torch.device, override: dict | None) -> dict:
    cfg = default_config(M, N, K, _device_capability(device), route)
    if override:
        keys = _TILED_KEYS if route == "tiled" else _GEMV_KEYS
        bad = set(override) - keys
        if bad:
            raise ValueError(f"lora_matmul: unknown config key(s) {sorted(bad)} for route {route!r}; "
                             f"expected a subset of {sorted(keys)}")
        cfg.update(override)
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K") if route == "tiled" else ("BLOCK_N", "BLOCK_K")
    for name in names:
        if not _is_pow2(cfg[name]) or cfg[name] < 16:
            raise ValueError(f"lora_matmul: config {name} must be a power of two >= 16, got {cfg[name]!r}")
    if cfg["BLOCK_K"] < 32:
        raise ValueError(f"lora_matmul: config BLOCK_K must be >= 32, got {cfg['BLOCK_K']}")
    if not _is_pow2(cfg["R_BLOCK"]) or cfg["R_BLOCK"] < 16:
        raise ValueError(f"lora_matmul: config R_BLOCK must be a power of two >= 16, got {cfg['R_BLOCK']!r}")
    if cfg["LUT"] not in _LUT_MODES:
        raise ValueError(f"lora_matmul: config LUT must be one of {sorted(_LUT_MODES)}, got {cfg['LUT']!r}")
    if route == "tiled" and (not isinstance(cfg["GROUP_M"], int) or cfg["GROUP_M"] < 1):
        raise ValueError(f"lora_matmul: config GROUP_M must be a positive int, got {cfg['GROUP_M']!r}")
    if route == "gemv" and cfg["SPLIT_K"] is not None and (not isinstance(cfg["SPLIT_K"], int) or cfg["SPLIT_K"] < 1):
        raise ValueError(f"lora_matmul: config SPLIT_K must be a positive int or None, got {cfg['SPLIT_K']!r}")
    return cfg


# =============================================================================================
# Launcher
# =============================================================================================
def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _check_device(device: torch.device, op: str = "lora_matmul") -> None:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(f"{op}: tensors must be on a CUDA device (or on the CPU with TRITON_INTERPRET=1), "
                     f"got {device}")


def _lora_t(x: torch.Tensor, a: torch.Tensor, s_scalar: float, s_vec: torch.Tensor | None) -> torch.Tensor:
    """T = (x · Aᵀ) ⊙ s, [M, r] in x's dtype (fp32 accumulate and scale, one rounding), with the
    tiled kernel (dense weight = A, column-scale epilogue, no LoRA term)."""
    M, K = x.shape
    r = a.shape[0]
    t = torch.empty((M, r), dtype=x.dtype, device=x.device)
    bm = 16 if M <= 16 else 64
    bn = min(64, max(16, _next_pow2(r)))
    bk = 64
    grid = (triton.cdiv(M, bm) * triton.cdiv(r, bn),)
    _lora_matmul_kernel[grid](
        x, a, a, a, a, a, a,
        t, t, t, s_vec if s_vec is not None else t, t,
        M, r, K, 0, 0, r, float(s_scalar),
        x.stride(0), a.stride(0), 0, t.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        DENSE=True, NESTED=False, BS=64, NBS=NESTED_BLOCKSIZE, LUT=0, EVEN_K=K % bk == 0, SWAP_AB=False,
        HAS_LORA=False, R_BLOCK=16, HAS_BIAS=False, SCALE_MODE=2 if s_vec is not None else 1,
        num_warps=4, num_stages=3,
    )
    return t


def lora_matmul(
    x2d: torch.Tensor,
    weight: NF4Weight | torch.Tensor,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: float | torch.Tensor = 1.0,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
    route: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] = x2d · Ŵᵀ + ((x2d · lora_aᵀ) ⊙ scale) · lora_bᵀ + bias, fp32 accumulation, in x2d's dtype.

    x2d: [M, K] bf16/fp16 (made contiguous); weight: NF4Weight (N, K) with K % blocksize == 0, or a
    dense [N, K] tensor of x2d's dtype; lora_a: [r, K], lora_b: [N, r] of x2d's dtype, 1 <= r <= 256
    (lora_a=None: no low-rank term); scale: float or fp32 [r] (or 0-d tensor); bias: [N] of x2d's
    dtype or fp32, or None.  route: None (``pick_route``), "tiled" or "gemv" (M <= 16 only).
    config: a (partial) dict overriding ``default_config`` (keys: see ``candidate_configs``).
    out: optional contiguous [M, N] tensor of x2d's dtype to write into.
    The T = (x · Aᵀ) ⊙ s [M, r] term is computed first by the tiled kernel (one small launch).
    """
    # ------------------------------------------------------------------ checks
    if not isinstance(x2d, torch.Tensor) or x2d.dim() != 2:
        raise ValueError(f"lora_matmul: x2d must be a 2-D tensor [M, K] (flatten leading dims first), "
                         f"got {getattr(x2d, 'shape', type(x2d).__name__)}")
    if x2d.dtype not in _X_DTYPES:
        raise ValueError(f"lora_matmul: x2d must be bfloat16 or float16, got {x2d.dtype}")
    device = x2d.device
    _check_device(device)
    M, K = x2d.shape
    dtype = x2d.dtype

    if isinstance(weight, NF4Weight):
        dense = False
        if len(weight.shape) != 2:
            raise ValueError(f"lora_matmul: the NF4 weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
        N, Kw = weight.shape
        if weight.device != device:
            raise ValueError(f"lora_matmul: weight is on {weight.device} but x2d is on {device}")
        bs = weight.blocksize
        if Kw % bs != 0:
            raise ValueError(f"lora_matmul: K={Kw} is not a multiple of the NF4 blocksize {bs}; the fused kernel "
                             f"needs whole blocks per row -- the caller must use the fallback "
                             f"(dequantize + matmul, e.g. lora_kernels.reference.lora_linear_reference)")
    elif isinstance(weight, torch.Tensor):
        dense = True
        if weight.dim() != 2:
            raise ValueError(f"lora_matmul: a dense weight must be 2-D [N, K], got {tuple(weight.shape)}")
        if weight.dtype != dtype:
            raise ValueError(f"lora_matmul: a dense weight must have x2d's dtype {dtype}, got {weight.dtype}")
        if weight.device != device:
            raise ValueError(f"lora_matmul: weight is on {weight.device} but x2d is on {device}")
        N, Kw = weight.shape
        bs = 64
    else:
        raise ValueError(f"lora_matmul: weight must be an NF4Weight or a dense tensor, got {type(weight).__name__}")
    if Kw != K:
        raise ValueError(f"lora_matmul: x2d has K={K} columns but the weight has shape {(N, Kw)} (expected [N, {K}])")
    if K < 1 or N < 1:
        raise ValueError(f"lora_matmul: empty weight shape {(N, Kw)}")

    has_lora = lora_a is not None
    r = 0
    s_scalar, s_vec = 1.0, None
    if has_lora:
        if lora_b is None:
            raise ValueError("lora_matmul: lora_a is given but lora_b is None")
        for name, t_ in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not isinstance(t_, torch.Tensor) or t_.dim() != 2:
                raise ValueError(f"lora_matmul: {name} must be a 2-D tensor, got {getattr(t_, 'shape', t_)}")
            if t_.dtype != dtype:
                raise ValueError(f"lora_matmul: {name} must have x2d's dtype {dtype}, got {t_.dtype}")
            if t_.device != device:
                raise ValueError(f"lora_matmul: {name} is on {t_.device} but x2d is on {device}")
        r = lora_a.shape[0]
        if lora_a.shape[1] != K:
            raise ValueError(f"lora_matmul: lora_a must be [r, K={K}], got {tuple(lora_a.shape)}")
        if tuple(lora_b.shape) != (N, r):
            raise ValueError(f"lora_matmul: lora_b must be [N={N}, r={r}], got {tuple(lora_b.shape)}")
        if not 1 <= r <= MAX_RANK:
            raise ValueError(f"lora_matmul: rank r={r} must be in 1..{MAX_RANK}")
        lora_a = lora_a.contiguous()
        lora_b = lora_b.contiguous()
        if isinstance(scale, torch.Tensor):
            if scale.device != device:
                raise ValueError(f"lora_matmul: scale is on {scale.device} but x2d is on {device}")
            if not scale.is_floating_point():
                raise ValueError(f"lora_matmul: scale must be a float tensor, got {scale.dtype}")
            if scale.dim() == 0 or (scale.dim() == 1 and scale.numel() == r):
                s_vec = scale.reshape(-1).float().expand(r).contiguous()
            else:
                raise ValueError(f"lora_matmul: scale must be a float, a 0-d tensor or an [r={r}] vector, "
                                 f"got shape {tuple(scale.shape)}")
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
            s_scalar = float(scale)
        else:
            raise ValueError(f"lora_matmul: scale must be a float or a tensor, got {type(scale).__name__}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,):
            raise ValueError(f"lora_matmul: bias must be [N={N}], got {getattr(bias, 'shape', bias)}")
        if bias.dtype not in (dtype, torch.float32):
            raise ValueError(f"lora_matmul: bias must be {dtype} or float32, got {bias.dtype}")
        if bias.device != device:
            raise ValueError(f"lora_matmul: bias is on {bias.device} but x2d is on {device}")
        bias = bias.contiguous()
    if route is None:
        route = pick_route(M, N, K)
    if route not in ("tiled", "gemv"):
        raise ValueError(f"lora_matmul: route must be None, 'tiled' or 'gemv', got {route!r}")
    if route == "gemv" and M > GEMV_MAX_M:
        raise ValueError(f"lora_matmul: route 'gemv' needs M <= {GEMV_MAX_M}, got M={M}")
    if out is not None:
        if (not isinstance(out, torch.Tensor) or tuple(out.shape) != (M, N) or out.dtype != dtype
                or out.device != device or not out.is_contiguous()):
            raise ValueError(f"lora_matmul: out must be a contiguous [{M}, {N}] {dtype} tensor on {device}")
    else:
        out = torch.empty((M, N), dtype=dtype, device=device)
    if M == 0:
        return out
    cfg = _resolve_config(route, M, N, K, device, config)

    # ------------------------------------------------------------------ operands
    x = x2d.contiguous()
    if dense:
        w = weight if weight.stride(1) == 1 else weight.contiguous()
        absmax = nested = ncode = offset = code = w
        nested_flag = False
        KH = KB = 0
        stride_wn = w.stride(0)
    else:
        w = weight.packed.reshape(-1)
        if not w.is_contiguous():
            raise ValueError("lora_matmul: NF4 packed data must be contiguous")
        code = weight.code
        absmax = weight.absmax
        nested_flag = weight.double_quant
        nested = weight.nested_absmax if nested_flag else code
        ncode = weight.nested_code if nested_flag else code
        offset = weight.offset if nested_flag else code
        KH, KB = K // 2, K // bs
        stride_wn = 0
    with device_guard(x):             # Triton launches on the current device: make it x's
        t = _lora_t(x, lora_a, s_scalar, s_vec) if has_lora else out
        b_arg = lora_b if has_lora else out
        bias_arg = bias if bias is not None else out
        r_block = min(cfg["R_BLOCK"], max(16, _next_pow2(r))) if has_lora else 16
        lut = _LUT_MODES[cfg["LUT"]]
        common = dict(DENSE=dense, NESTED=nested_flag, BS=bs, NBS=NESTED_BLOCKSIZE, LUT=lut,
                      HAS_LORA=has_lora, R_BLOCK=r_block, HAS_BIAS=bias is not None,
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=cfg["fp_fusion"])

        if route == "tiled":
            bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
            _lora_matmul_kernel[grid](
                x, w, absmax, nested, ncode, offset, code,
                t, b_arg, bias_arg, out, out,
                M, N, K, KH, KB, r, 1.0,
                x.stride(0), stride_wn, t.stride(0), out.stride(0),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
                EVEN_K=K % bk == 0, SWAP_AB=bool(cfg["SWAP_AB"]), SCALE_MODE=0, **common,
            )
            return out

        # gemv / split-K
        bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
        use_dot = cfg["USE_DOT"] if cfg["USE_DOT"] is not None else M > _GEMV_FMA_MAX_M
        m_pad = 16 if use_dot else _next_pow2(M)
        split = cfg["SPLIT_K"] or _auto_split_k(M, N, K, bn, bk, _num_sms(device))
        k_steps = triton.cdiv(K, bk)
        split = max(1, min(split, k_steps))
        k_per = triton.cdiv(k_steps, split) * bk
        split = triton.cdiv(K, k_per)                                    # no empty K slices
        is_split = split > 1
        ws = torch.zeros((M, N), dtype=torch.float32, device=device) if is_split else out
        common.update(HAS_LORA=has_lora and not is_split, HAS_BIAS=bias is not None and not is_split)
        _lora_gemv_kernel[(triton.cdiv(N, bn), split)](
            x, w, absmax, nested, ncode, offset, code,
            t, b_arg, bias_arg, ws,
            M, N, K, KH, KB, r, k_per,
            x.stride(0), stride_wn, t.stride(0), ws.stride(0),
            M_PAD=m_pad, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0, USE_DOT=bool(use_dot), SPLIT=is_split,
            **common,
        )
        if is_split:
            fbn = 64
            _lora_gemv_finish_kernel[(triton.cdiv(N, fbn),)](
                ws, t, b_arg, bias_arg, out, M, N, r, t.stride(0), out.stride(0),
                BLOCK_M=16, BLOCK_N=fbn, HAS_LORA=has_lora, R_BLOCK=r_block, HAS_BIAS=bias is not None,
                num_warps=4,
            )
        return out
