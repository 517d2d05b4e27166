"""Rotary position embedding of q and k in one launch (forward and backward).

The math of transformers' Llama ``apply_rotary_pos_emb`` (``rotate_half`` splits the head dim D into
halves x1 = x[..., :D/2], x2 = x[..., D/2:]; c = cos, s = sin of the token, halves c1 c2, s1 s2):

    forward   y1 = x1·c1 − x2·s1            y2 = x2·c2 + x1·s2
    backward  dx1 = g1·c1 + g2·s2           dx2 = g2·c2 − g1·s1      (g = dL/dy)

i.e. ``dx = g·cos + rotate_half_T(g·sin)`` with ``rotate_half_T(v) = cat(v2, −v1)``.  Both directions
are the same kernel with the sin multipliers (−s1, s2) swapped to (s2, −s1).  Loads are upcast to
fp32, the two products and the sum are fp32, and each output is rounded once to its dtype.

Shapes and dtypes:

==========  ==================================  =================================================
q           [B, Hq, S, D] (unsqueeze_dim=1) or  fp32/bf16/fp16, any strides (the transposed
            [B, S, Hq, D] (unsqueeze_dim=2)     ``view(B, S, H, D).transpose(1, 2)`` of HF: no copy)
k           as q with Hk heads                  fp32/bf16/fp16 (may differ from q's), any strides
cos, sin    [B or 1, S or 1, D]                 fp32/bf16/fp16, any strides (broadcast dims get
                                                stride 0; HF computes them in fp32, casts to q's)
q_out       q's shape, any strides              default dtype promote(q, cos, sin) (what HF's ops
k_out       k's shape, any strides              give); default layout ``empty_like(q / k)``'s: a
                                                dense permuted layout is kept, as HF's outputs do
==========  ==================================  =================================================

Kernel: one program per token (b, s), grid B·S.  It loads the token's cos and sin rows once (4 half
vectors, fp32) and then rotates all Hq heads of q and all Hk heads of k in [BLOCK_H, D/2] tiles
(x1 and x2 tiles loaded separately).  With HF's layout a token's heads are one contiguous
Hq·D-element row of the q_proj output, so every load is coalesced.  Offsets are int64.

Bytes per call (e = bytes per element of the dtype; same for forward and backward):
read q, k (or the two incoming grads): (Hq + Hk)·D·e per token; write the same;
cos and sin: 2·D·e per token (cos/sin of [1, S, D] are re-read per batch row, from L2).
Benchmark size B=32, S=1024, Hq=32, Hk=4, D=64, bf16: 151.0 MB read + 151.0 MB written
+ 8.4 MB cos/sin = 310.4 MB per forward, the same per backward (103 µs at 3.0 TB/s); D=128: 620.8 MB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model_ops.rope import KERNEL_DTYPES, check_rotary_args
from .launch import CachedLauncher
from .nf4_lora_matmul import _next_pow2

__all__ = ["rotary_forward", "rotary_backward", "rotary_launch"]

#: elements of one [BLOCK_H, BLOCK_HALF] tile at most (heads are walked in blocks of BLOCK_H)
_MAX_TILE = 4096


# =============================================================================================
# Kernel
# =============================================================================================
@triton.jit
def _rotate_heads(x_row, o_row, H, HALF, sx_h, sx_d, so_h, so_d, c1, c2, m1, m2, dmask,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # out1 = x1·c1 + x2·m1, out2 = x2·c2 + x1·m2 for the H heads of one token.
    # x_row / o_row point at (b, s, head 0, d 0); c1 c2 m1 m2: fp32 [BLOCK_HALF] vectors.
    offs_h = tl.arange(0, BLOCK_H)
    d64 = tl.arange(0, BLOCK_HALF).to(tl.int64)
    x_d1 = d64[None, :] * sx_d
    x_d2 = (d64[None, :] + HALF) * sx_d
    o_d1 = d64[None, :] * so_d
    o_d2 = (d64[None, :] + HALF) * so_d
    for h0 in range(0, H, BLOCK_H):
        h = h0 + offs_h
        mask = (h < H)[:, None] & dmask[None, :]
        h64 = h.to(tl.int64)[:, None]
        xp = x_row + h64 * sx_h
        x1 = tl.load(xp + x_d1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + x_d2, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1[None, :] + x2 * m1[None, :]
        y2 = x2 * c2[None, :] + x1 * m2[None, :]
        op = o_row + h64 * so_h
        tl.store(op + o_d1, y1.to(o_row.dtype.element_ty), mask=mask)
        tl.store(op + o_d2, y2.to(o_row.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    S, HQ, HK, HALF,
    sq_b, sq_s, sq_h, sq_d,
    sk_b, sk_s, sk_h, sk_d,
    sqo_b, sqo_s, sqo_h, sqo_d,
    sko_b, sko_s, sko_h, sko_d,
    sc_b, sc_s, sc_d,
    ss_b, ss_s, ss_d,
    HAS_Q: tl.constexpr, HAS_K: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # One token (b, s) per program.  All strides are in (b, s, h, d) order, whatever the layout.
    tok = tl.program_id(0)
    b = (tok // S).to(tl.int64)
    s = (tok % S).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    dmask = offs_d < HALF
    d64 = offs_d.to(tl.int64)
    c_row = cos_ptr + b * sc_b + s * sc_s
    s_row = sin_ptr + b * ss_b + s * ss_s
    c1 = tl.load(c_row + d64 * sc_d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + (d64 + HALF) * sc_d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + d64 * ss_d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + (d64 + HALF) * ss_d, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        m1 = s2          # dx1 = g1·c1 + g2·s2
        m2 = -s1         # dx2 = g2·c2 − g1·s1
    else:
        m1 = -s1         # y1 = x1·c1 − x2·s1
        m2 = s2          # y2 = x2·c2 + x1·s2
    if HAS_Q:
        _rotate_heads(q_ptr + b * sq_b + s * sq_s, qo_ptr + b * sqo_b + s * sqo_s, HQ, HALF,
                      sq_h, sq_d, sqo_h, sqo_d, c1, c2, m1, m2, dmask, BLOCK_HQ, BLOCK_HALF)
    if HAS_K:
        _rotate_heads(k_ptr + b * sk_b + s * sk_s, ko_ptr + b * sko_b + s * sko_s, HK, HALF,
                      sk_h, sk_d, sko_h, sko_d, c1, c2, m1, m2, dmask, BLOCK_HK, BLOCK_HALF)


# =============================================================================================
# Launchers
# =============================================================================================
_launch_rotary = CachedLauncher(_rotary_kernel)


def _bshd_strides(t: torch.Tensor, unsqueeze_dim: int) -> tuple[int, int, int, int]:
    st = t.stride()
    return (st[0], st[2], st[1], st[3]) if unsqueeze_dim == 1 else tuple(st)


def rotary_launch(x_q: torch.Tensor | None, x_k: torch.Tensor | None,
                  out_q: torch.Tensor | None, out_k: torch.Tensor | None,
                  cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int, backward: bool = False) -> None:
    """Launch only (no argument checks: the caller has made them, as ``rotary_forward`` does).

    Writes ``out_q`` from ``x_q`` and ``out_k`` from ``x_k`` (the forward rotation, or with
    ``backward=True`` the transposed one, applied to incoming grads).  ``x_q``/``out_q`` (or the k
    pair) may both be None: that half is skipped.  ``unsqueeze_dim`` is 1 or 2 (normalised).
    """
    has_q = x_q is not None and x_q.numel() > 0
    has_k = x_k is not None and x_k.numel() > 0
    if not (has_q or has_k):
        return
    x = x_q if has_q else x_k
    h_axis, s_axis = (1, 2) if unsqueeze_dim == 1 else (2, 1)
    B, S, D = x.shape[0], x.shape[s_axis], x.shape[3]
    half = D // 2
    cos_e = cos.expand(B, S, D)           # broadcast batch / sequence: stride 0, no copy
    sin_e = sin.expand(B, S, D)
    hq = x_q.shape[h_axis] if has_q else 0
    hk = x_k.shape[h_axis] if has_k else 0
    block_half = max(2, _next_pow2(half))
    cap = max(1, _MAX_TILE // block_half)
    block_hq = min(_next_pow2(max(hq, 1)), cap)
    block_hk = min(_next_pow2(max(hk, 1)), cap)
    tile = max(block_hq if has_q else 1, block_hk if has_k else 1) * block_half
    num_warps = 2 if tile <= 256 else 4 if tile <= 1024 else 8
    # absent halves: any tensor of a valid dtype, never dereferenced (HAS_Q / HAS_K are constexpr)
    qx, qo = (x_q, out_q) if has_q else (x_k, out_k)
    kx, ko = (x_k, out_k) if has_k else (x_q, out_q)
    zero4 = (0, 0, 0, 0)
    _launch_rotary(
        B * S,
        (qx, kx, qo, ko, cos_e, sin_e, S, hq, hk, half,
         *(_bshd_strides(x_q, unsqueeze_dim) if has_q else zero4),
         *(_bshd_strides(x_k, unsqueeze_dim) if has_k else zero4),
         *(_bshd_strides(out_q, unsqueeze_dim) if has_q else zero4),
         *(_bshd_strides(out_k, unsqueeze_dim) if has_k else zero4),
         *cos_e.stride(), *sin_e.stride()),
        dict(HAS_Q=has_q, HAS_K=has_k, BACKWARD=bool(backward),
             BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half),
        dict(num_warps=num_warps),
    )


def _check_out(op: str, name: str, out, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if out is None:
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"{op}: the {name} dtype must be float32, bfloat16 or float16, got {dtype}")
        return torch.empty_like(like, dtype=dtype)        # keeps a dense permuted layout
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != like.shape or out.device != like.device or out.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{op}: {name} must be a float32/bfloat16/float16 tensor of shape "
                         f"{tuple(like.shape)} on {like.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def _check_kernel_dtypes(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16 for the kernel, got {t.dtype}")


def rotary_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   unsqueeze_dim: int = 1, *, q_out: torch.Tensor | None = None,
                   k_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_embed, k_embed) = (q·cos + rotate_half(q)·sin, same for k), fp32 math, one rounding.

    Shapes as in the module docstring; q or k may be None (its output is then None).  Output
    dtype: ``promote_types(x, cos, sin)`` (what HF's ops give), or ``q_out``/``k_out``'s dtype.
    """
    op = "rotary_forward"
    unsqueeze_dim = check_rotary_args(op, q, k, cos, sin, unsqueeze_dim, allow_none=True)
    _check_kernel_dtypes(op, q=q, k=k, cos=cos, sin=sin)
    cs = torch.promote_types(cos.dtype, sin.dtype)
    q_out = None if q is None else _check_out(op, "q_out", q_out, q, torch.promote_types(q.dtype, cs))
    k_out = None if k is None else _check_out(op, "k_out", k_out, k, torch.promote_types(k.dtype, cs))
    rotary_launch(q, k, q_out, k_out, cos, sin, unsqueeze_dim, backward=False)
    return q_out, k_out


def rotary_backward(grad_q_embed: torch.Tensor | None, grad_k_embed: torch.Tensor | None,
                    cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1, *,
                    q_dtype: torch.dtype | None = None, k_dtype: torch.dtype | None = None,
                    dq_out: torch.Tensor | None = None, dk_out: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk) = (g·cos + rotate_half_T(g·sin)) for g = grad_q_embed / grad_k_embed, where
    ``rotate_half_T(v) = cat(v2, −v1)``; fp32 math, one rounding.  A None grad gives a None result.
    Output dtype: ``q_dtype``/``k_dtype`` (default: the grad's), or ``dq_out``/``dk_out``'s dtype."""
    op = "rotary_backward"
    unsqueeze_dim = check_rotary_args(op, grad_q_embed, grad_k_embed, cos, sin, unsqueeze_dim,
                                      allow_none=True, names=("grad_q_embed", "grad_k_embed"))
    _check_kernel_dtypes(op, grad_q_embed=grad_q_embed, grad_k_embed=grad_k_embed, cos=cos, sin=sin)
    dq = dk = None
    if grad_q_embed is not None:
        dq = _check_out(op, "dq_out", dq_out, grad_q_embed, q_dtype or grad_q_embed.dtype)
    if grad_k_embed is not None:
        dk = _check_out(op, "dk_out", dk_out, grad_k_embed, k_dtype or grad_k_embed.dtype)
    rotary_launch(grad_q_embed, grad_k_embed, dq, dk, cos, sin, unsqueeze_dim, backward=True)
    return dq, dk
