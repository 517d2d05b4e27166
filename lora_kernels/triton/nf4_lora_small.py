"""Fused LoRA / QLoRA linear for small layers: the forward and the input gradient, one launch each.

Where a layer's GEMMs are too small to keep the GPU busy (K and N of a few hundred, a few thousand
rows: the embedded demo model, small adapters' layers), a step is bound by the host's cost per
launch, not by the arithmetic.  The merge-cublas routes launch four kernels per direction there
(T, two merge chunks, two GEMMs); these kernels do each direction in one:

=======  ======================================================  ==============================
kernel   computes                                                also writes
=======  ======================================================  ==============================
forward  y [M, N] = x·Ŵᵀ + ((x·Aᵀ) ⊙ s)·Bᵀ + bias                T = x·Aᵀ [M, r] (for dB, ds)
dx       dx [M, K] = dy·Ŵ + ((dy·B) ⊙ s)·A                        U = dy·B [M, r] (for dA, ds)
=======  ======================================================  ==============================

x, dy: [M, K] / [M, N] bf16 or fp16, contiguous; Ŵ: an ``NF4Weight`` (N, K) with K % blocksize
== 0, or a dense [N, K] tensor of x's dtype (contiguous rows); A [r, K], B [N, r] contiguous in x's
dtype (``library`` casts PEFT's fp32 adapters first: fed fp32 adapters, the first version of the dx
kernel went wrong on the H100 under triton 3.6), 1 <= r <= ``library.SMALL_MAX_RANK``; s a float or
an fp32 [r] vector (AdaLoRA); bias [N] (x's dtype or fp32) or None.  fp32 accumulation; y, dx, T and U in x's dtype.

Status: the forward kernel matched the float64 reference on the H100 (bf16 and fp16); the dx
kernel as written here (its second version) has run under the CPU interpreter only -- which is why
``library`` leaves the route off unless ``LORA_KERNELS_SMALL_MAX_MNK`` is set.

The rank term rides in the base GEMM's loop: a forward program loads each x tile once and feeds it
to both x·Ŵᵀ and x·Aᵀ (r more columns); a dx program does the same with dy, Ŵ and B.  Ŵ is
dequantized tile by tile in registers (the 4-bit weight is read; the dense weight is never
written).  The programs of the first output column tile write T (U).  The r-wide product is
recomputed by every column tile: r / BLOCK_N more FLOPs, which is why ``library`` routes here only
small layers (``SMALL_MAX_MNK``) with r <= ``SMALL_MAX_RANK`` (64: T / U live in registers as
[BLOCK_M, next_pow2(r)] fp32).

Launchers: :func:`small_forward`, :func:`small_dx` (no argument checks: ``library`` and the
autograd Functions have made them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codes import NESTED_BLOCKSIZE
from ..nf4 import NF4Weight
from .launch import CachedLauncher
from .nf4_lora_matmul import _absmax_of, _next_pow2, _weight_tile

__all__ = ["small_forward", "small_dx", "CONFIG"]

#: tile shape and launch options of both kernels (tiles of 64 divide every NF4 blocksize >= 64)
CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)


@triton.jit
def _small_forward_kernel(
    x_ptr, w_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr,
    a_ptr, b_ptr, s_ptr, bias_ptr, y_ptr, t_ptr,
    M, N, K, KH, KB, R, s_scalar, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    DENSE: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SCALE_VEC: tl.constexpr,
):
    # Program: y tile [BLOCK_M, BLOCK_N].  Per K step: x [BLOCK_M, BLOCK_K], the weight tile
    # [BLOCK_N, BLOCK_K] (packed bytes + absmax codes), A [R_PAD, BLOCK_K]; two tl.dot.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    dt = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kh = tl.arange(0, BLOCK_K // 2)
    offs_r = tl.arange(0, R_PAD)
    mmask = offs_m < M
    nmask = offs_n < N
    rmask = offs_r < R
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    x_ptrs = x_ptr + m64[:, None] * K + offs_k[None, :]
    a_ptrs = a_ptr + offs_r[:, None] * K + offs_k[None, :]
    if DENSE:
        w_ptrs = w_ptr + n64[:, None] * stride_wn + offs_k[None, :]
    else:
        w_ptrs = w_ptr + n64[:, None] * KH + offs_kh[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    t_acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = _weight_tile(w_ptrs, n64, nmask, k0, K, KH, KB, offs_k, offs_kh,
                         absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr,
                         BLOCK_N, BLOCK_K, BS, NESTED, NBS, 0, DENSE, EVEN_K).to(dt)
        acc = tl.dot(x, tl.trans(w), acc)
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0).to(dt)
        t_acc = tl.dot(x, tl.trans(a), t_acc)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        if DENSE:
            w_ptrs += BLOCK_K
        else:
            w_ptrs += BLOCK_K // 2
    if pid_n == 0:
        tl.store(t_ptr + m64[:, None] * R + offs_r[None, :], t_acc.to(dt), mask=mmask[:, None] & rmask[None, :])
    if SCALE_VEC:
        ts = t_acc * tl.load(s_ptr + offs_r, mask=rmask, other=0.0)[None, :]
    else:
        ts = t_acc * s_scalar
    b = tl.load(b_ptr + n64[:, None] * R + offs_r[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
    acc = tl.dot(ts.to(dt), tl.trans(b.to(dt)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m64[:, None] * N + offs_n[None, :], acc.to(dt), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _small_dx_kernel(
    dy_ptr, w_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr,
    a_ptr, b_ptr, s_ptr, dx_ptr, u_ptr,
    M, N, K, KH, KB, R, s_scalar, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    DENSE: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr, SCALE_VEC: tl.constexpr,
):
    # Program: dx tile [BLOCK_M, BLOCK_K] at columns k0, kept as its even and its odd columns
    # ([BLOCK_M, BLOCK_K / 2] each): an NF4 byte holds column k0 + 2j (high nibble) and k0 + 2j + 1
    # (low nibble), so each half is a plain [BLOCK_N, BLOCK_K / 2] weight tile feeding tl.dot as is
    # -- no nibble interleave (tl.join + reshape) in front of the dot.  That interleave, fed to the
    # dot untransposed, gave wrong dx and illegal addresses on the H100 under triton 3.6 (session 8;
    # the forward's transposed use of it is fine).  Per N step: dy [BLOCK_M, BLOCK_N], the packed
    # tile [BLOCK_N, BLOCK_K / 2] and its absmax, B [BLOCK_N, R_PAD]; three tl.dot.
    pid = tl.program_id(0)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid // num_pid_k
    pid_k = pid % num_pid_k
    dt = dy_ptr.dtype.element_ty
    k0 = pid_k * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K // 2)
    offs_r = tl.arange(0, R_PAD)
    col_e = k0 + 2 * offs_j                  # the even columns of this tile; col_e + 1 the odd ones
    emask = col_e < K
    omask = (col_e + 1) < K
    mmask = offs_m < M
    rmask = offs_r < R
    m64 = offs_m.to(tl.int64)
    acc_e = tl.zeros([BLOCK_M, BLOCK_K // 2], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_K // 2], dtype=tl.float32)
    u_acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        nmask = rows < N
        n64 = rows.to(tl.int64)
        g = tl.load(dy_ptr + m64[:, None] * N + n64[None, :], mask=mmask[:, None] & nmask[None, :], other=0.0)
        if DENSE:
            wrow = w_ptr + n64[:, None] * stride_wn
            w_e = tl.load(wrow + col_e[None, :], mask=nmask[:, None] & emask[None, :], other=0.0)
            w_o = tl.load(wrow + (col_e + 1)[None, :], mask=nmask[:, None] & omask[None, :], other=0.0)
        else:
            # K % BS == 0 and BS is even: both columns of a byte lie in block n * KB + col_e // BS
            wmask = nmask[:, None] & emask[None, :]
            byte = tl.load(w_ptr + n64[:, None] * KH + (k0 // 2 + offs_j)[None, :], mask=wmask, other=0).to(tl.int32)
            amax = _absmax_of(n64[:, None] * KB + (col_e // BS)[None, :], wmask,
                              absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, NESTED, NBS)
            w_e = tl.load(code_ptr + (byte >> 4)) * amax
            w_o = tl.load(code_ptr + (byte & 15)) * amax
        acc_e = tl.dot(g, w_e.to(dt), acc_e)
        acc_o = tl.dot(g, w_o.to(dt), acc_o)
        b = tl.load(b_ptr + n64[:, None] * R + offs_r[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
        u_acc = tl.dot(g, b.to(dt), u_acc)
    if pid_k == 0:
        tl.store(u_ptr + m64[:, None] * R + offs_r[None, :], u_acc.to(dt), mask=mmask[:, None] & rmask[None, :])
    if SCALE_VEC:
        us = (u_acc * tl.load(s_ptr + offs_r, mask=rmask, other=0.0)[None, :]).to(dt)
    else:
        us = (u_acc * s_scalar).to(dt)
    arow = a_ptr + offs_r[:, None] * K
    a_e = tl.load(arow + col_e[None, :], mask=rmask[:, None] & emask[None, :], other=0.0)
    a_o = tl.load(arow + (col_e + 1)[None, :], mask=rmask[:, None] & omask[None, :], other=0.0)
    acc_e = tl.dot(us, a_e.to(dt), acc_e)
    acc_o = tl.dot(us, a_o.to(dt), acc_o)
    drow = dx_ptr + m64[:, None] * K
    tl.store(drow + col_e[None, :], acc_e.to(dt), mask=mmask[:, None] & emask[None, :])
    tl.store(drow + (col_e + 1)[None, :], acc_o.to(dt), mask=mmask[:, None] & omask[None, :])


_launch_forward = CachedLauncher(_small_forward_kernel)
_launch_dx = CachedLauncher(_small_dx_kernel)
_META: dict = {}


def _weight_args(weight):
    """(w, absmax, nested, ncode, offset, code, KH, KB, stride_wn, dense, nested_flag, bs)."""
    if not isinstance(weight, NF4Weight):
        return (weight,) * 6 + (0, 0, weight.stride(0), True, False, 64)
    nested_flag = weight.nested_absmax is not None
    code = weight.code
    K = weight.shape[1]
    bs = weight.blocksize
    return (weight.packed, weight.absmax, weight.nested_absmax if nested_flag else code,
            weight.nested_code if nested_flag else code, weight.offset if nested_flag else code, code,
            K // 2, K // bs, 0, False, nested_flag, bs)


def _meta(kind: str, dense: bool, nested_flag: bool, bs: int, even_k: bool, r: int, vec: bool, bias: bool):
    key = (kind, dense, nested_flag, bs, even_k, r, vec, bias)
    meta = _META.get(key)
    if meta is None:
        c = CONFIG
        constexprs = dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                          R_PAD=max(16, _next_pow2(r)), DENSE=dense, NESTED=nested_flag, BS=bs,
                          NBS=NESTED_BLOCKSIZE)
        if kind == "forward":               # the dx kernel masks its columns itself
            constexprs.update(EVEN_K=even_k, HAS_BIAS=bias)
        constexprs["SCALE_VEC"] = vec
        meta = _META[key] = (constexprs, dict(num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return meta


def small_forward(x: torch.Tensor, weight, lora_a: torch.Tensor, lora_b: torch.Tensor, s_scalar: float,
                  s_vec: torch.Tensor | None, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N], T [M, r]) in x's dtype: y = x·Ŵᵀ + ((x·Aᵀ) ⊙ s)·Bᵀ + bias, T = x·Aᵀ, one launch.
    x [M, K] contiguous bf16/fp16; lora_a [r, K], lora_b [N, r] contiguous; s_vec an fp32 [r]
    vector or None (then ``s_scalar``)."""
    M, K = x.shape
    N = weight.shape[0]
    r = lora_a.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    t = torch.empty((M, r), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, t
    w, absmax, nested, ncode, offset, code, KH, KB, stride_wn, dense, nested_flag, bs = _weight_args(weight)
    meta = _meta("forward", dense, nested_flag, bs, K % CONFIG["BLOCK_K"] == 0, r, s_vec is not None,
                 bias is not None)
    bm, bn = CONFIG["BLOCK_M"], CONFIG["BLOCK_N"]
    _launch_forward(
        -(-M // bm) * -(-N // bn),
        (x, w, absmax, nested, ncode, offset, code, lora_a, lora_b, s_vec if s_vec is not None else y,
         bias if bias is not None else y, y, t, M, N, K, KH, KB, r, float(s_scalar), stride_wn),
        *meta,
    )
    return y, t


def small_dx(dy: torch.Tensor, weight, lora_a: torch.Tensor, lora_b: torch.Tensor, s_scalar: float,
             s_vec: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [M, K], U [M, r]) in dy's dtype: dx = dy·Ŵ + ((dy·B) ⊙ s)·A, U = dy·B, one launch.
    dy [M, N] contiguous bf16/fp16; lora_a [r, K], lora_b [N, r] contiguous."""
    M, N = dy.shape
    K = weight.shape[1]
    r = lora_a.shape[0]
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    u = torch.empty((M, r), dtype=dy.dtype, device=dy.device)
    if M == 0:
        return dx, u
    w, absmax, nested, ncode, offset, code, KH, KB, stride_wn, dense, nested_flag, bs = _weight_args(weight)
    meta = _meta("dx", dense, nested_flag, bs, False, r, s_vec is not None, False)
    bm, bk = CONFIG["BLOCK_M"], CONFIG["BLOCK_K"]
    _launch_dx(
        -(-M // bm) * -(-K // bk),
        (dy, w, absmax, nested, ncode, offset, code, lora_a, lora_b, s_vec if s_vec is not None else dx,
         dx, u, M, N, K, KH, KB, r, float(s_scalar), stride_wn),
        *meta,
    )
    return dx, u
