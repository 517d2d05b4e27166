"""Rotary position embedding: the reference, the autograd Function over the Triton kernel, and
:func:`apply_rotary`, a drop-in for transformers' Llama ``apply_rotary_pos_emb``.

Math (halves x1 = x[..., :D/2], x2 = x[..., D/2:] of each head; cos/sin of the token):
``x_embed = x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = cat(−x2, x1)``; the backward is
``dx = g·cos + rotate_half_T(g·sin)`` with ``rotate_half_T(v) = cat(v2, −v1)``.

Shapes: q [B, Hq, S, D] and k [B, Hk, S, D] with unsqueeze_dim=1 (HF's layout: transposed views of
[B, S, H, D] projections), or [B, S, H, D] with unsqueeze_dim=2; cos, sin [B or 1, S, D].
Kernel bytes per call: see ``lora_kernels/triton/rope.py``.
"""

from __future__ import annotations

import torch

from . import KERNEL_DTYPES, _reference_under_compile, refuse_double_backward, use_triton

__all__ = ["apply_rotary", "apply_rotary_reference", "RotaryFunction", "check_rotary_args", "KERNEL_DTYPES"]

#: dtypes the kernel takes (q, k, cos, sin each; mixed is fine); others run the reference


# =============================================================================================
# Reference (transformers' numerics)
# =============================================================================================
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb``, op for op (each op rounds to the promoted dtype)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (_rotate_half(q) * sin)
    k_embed = (k * cos) + (_rotate_half(k) * sin)
    return q_embed, k_embed


# =============================================================================================
# Argument checks (shared with the launchers in lora_kernels/triton/rope.py)
# =============================================================================================
def check_rotary_args(op: str, q, k, cos, sin, unsqueeze_dim, *, allow_none: bool = False,
                      names: tuple[str, str] = ("q", "k")) -> int:
    """Raise TypeError/ValueError naming the bad argument; return unsqueeze_dim normalised to 1 or 2.
    ``allow_none``: q or k (not both) may be None (the launchers)."""
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, int):
        raise TypeError(f"{op}: unsqueeze_dim must be an int, got {type(unsqueeze_dim).__name__}")
    if unsqueeze_dim not in (1, 2, -3, -2):
        raise ValueError(f"{op}: unsqueeze_dim must be 1 (q, k as [B, H, S, D]) or 2 ([B, S, H, D]) "
                         f"(or -3 / -2), got {unsqueeze_dim}")
    unsqueeze_dim = unsqueeze_dim % 4
    layout = "[B, H, S, D]" if unsqueeze_dim == 1 else "[B, S, H, D]"
    heads = [(n, t) for n, t in zip(names, (q, k)) if not (allow_none and t is None)]
    if not heads:
        raise ValueError(f"{op}: {names[0]} and {names[1]} are both None")
    for name, t in (*heads, ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    for name, t in heads:
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D {layout} (unsqueeze_dim={unsqueeze_dim}), "
                             f"got shape {tuple(t.shape)}")
    for name in ("cos", "sin"):
        t = cos if name == "cos" else sin
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be 3-D [B or 1, S, D], got shape {tuple(t.shape)}")
    device = heads[0][1].device
    for name, t in (*heads[1:], ("cos", cos), ("sin", sin)):
        if t.device != device:
            raise ValueError(f"{op}: all tensors must be on one device: {heads[0][0]} is on {device}, "
                             f"{name} is on {t.device}")
    s_axis = 2 if unsqueeze_dim == 1 else 1
    first, x = heads[0]
    B, S, D = x.shape[0], x.shape[s_axis], x.shape[3]
    if D % 2:
        raise ValueError(f"{op}: the head dim D (last dim of {first}) must be even, got {D}")
    for name, t in heads[1:]:
        if t.shape[0] != B or t.shape[s_axis] != S or t.shape[3] != D:
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must match {first} {tuple(x.shape)} in batch, "
                             f"sequence and head dim ({layout}, unsqueeze_dim={unsqueeze_dim})")
    for name in ("cos", "sin"):
        t = cos if name == "cos" else sin
        if t.shape[0] not in (1, B) or t.shape[1] not in (1, S) or t.shape[2] != D:
            raise ValueError(f"{op}: {name} must be [B or 1, S or 1, D] = [{B} or 1, {S} or 1, {D}] "
                             f"to broadcast against {first} {tuple(x.shape)}, got {tuple(t.shape)}")
    return unsqueeze_dim


# =============================================================================================
# autograd Function
# =============================================================================================
class RotaryFunction(torch.autograd.Function):
    """(q_embed, k_embed) through one Triton launch; backward one launch for the grads needed.

    Saves cos and sin only (``save_for_backward``); q's and k's dtype and output strides are kept
    as plain attributes, so dq / dk get q's / k's dtype and (when q, k are dense, e.g. HF's
    transposed views) their layout.  An incoming None grad (output unused) gives a None grad.
    Arguments must have passed :func:`check_rotary_args` (unsqueeze_dim normalised to 1 or 2)
    and have dtypes in ``KERNEL_DTYPES``.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        from ..triton.rope import rotary_launch
        cs = torch.promote_types(cos.dtype, sin.dtype)
        q_embed = torch.empty_like(q, dtype=torch.promote_types(q.dtype, cs))   # q's layout if dense
        k_embed = torch.empty_like(k, dtype=torch.promote_types(k.dtype, cs))
        rotary_launch(q, k, q_embed, k_embed, cos, sin, unsqueeze_dim, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        ctx.q_grad_meta = (q.dtype, q_embed.stride())
        ctx.k_grad_meta = (k.dtype, k_embed.stride())
        ctx.set_materialize_grads(False)
        return q_embed, k_embed

    @staticmethod
    def backward(ctx, grad_q_embed, grad_k_embed):
        refuse_double_backward("apply_rotary_pos_emb")
        cos, sin = ctx.saved_tensors
        need_q = ctx.needs_input_grad[0] and grad_q_embed is not None
        need_k = ctx.needs_input_grad[1] and grad_k_embed is not None
        dq = dk = None
        if need_q:
            dtype, stride = ctx.q_grad_meta
            dq = torch.empty_strided(grad_q_embed.shape, stride, dtype=dtype, device=grad_q_embed.device)
        if need_k:
            dtype, stride = ctx.k_grad_meta
            dk = torch.empty_strided(grad_k_embed.shape, stride, dtype=dtype, device=grad_k_embed.device)
        if need_q or need_k:
            from ..triton.rope import rotary_launch
            rotary_launch(grad_q_embed if need_q else None, grad_k_embed if need_k else None, dq, dk,
                          cos, sin, ctx.unsqueeze_dim, backward=True)
        return dq, dk, None, None, None


# =============================================================================================
# Public function
# =============================================================================================
@_reference_under_compile(apply_rotary_reference)
def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``.

    q [B, Hq, S, D], k [B, Hk, S, D] (unsqueeze_dim=1 or -3) or [B, S, H, D] (unsqueeze_dim=2 or
    -2), any strides (never copied); cos, sin [B or 1, S or 1, D]; D even.  Returns
    (q_embed, k_embed) in ``promote_types(x, cos, sin)`` (q's / k's dtype when cos and sin have it,
    as in HF), laid out like q / k when those are dense, computed in fp32 with one rounding (HF
    rounds after each op: results differ by a few ulps).

    Runs :class:`RotaryFunction` (the Triton kernel) when ``use_triton(q)``; the reference
    (:func:`apply_rotary_reference`) instead when cos or sin requires grad (with grad mode on),
    when any dtype is not fp32/bf16/fp16 (e.g. float64), or on devices Triton does not run.
    """
    unsq = check_rotary_args("apply_rotary", q, k, cos, sin, unsqueeze_dim)
    if (q.dtype not in KERNEL_DTYPES or k.dtype not in KERNEL_DTYPES or cos.dtype not in KERNEL_DTYPES
            or sin.dtype not in KERNEL_DTYPES
            or (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
            or not use_triton(q)):
        return apply_rotary_reference(q, k, cos, sin, unsqueeze_dim)
    return RotaryFunction.apply(q, k, cos, sin, unsq)
