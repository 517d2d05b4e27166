"""``torch.library`` custom ops for the LoRA / QLoRA linear (namespace ``lora_kernels``), so
``torch.compile(fullgraph=True)`` traces ``autograd.py``'s Functions without graph breaks.

Every op takes 2-D activations (the Functions flatten leading dims) and returns fresh tensors.
The NF4 weight travels as its tensors (``packed``, ``absmax``, ``nested_absmax``, ``nested_code``,
``offset``, ``code``) plus ``N, K, blocksize``; the ops rebuild an ``NF4Weight`` view of them.

================================  =============================================================
op                                result
================================  =============================================================
``nf4_lora_forward``              (y [M, N], t [M, r]):  y = x · Ŵᵀ + ((x_lora · Aᵀ) ⊙ s) · Bᵀ + bias,
``dense_lora_forward``            t = x_lora · Aᵀ unscaled (x_lora = x when not given), x's dtype;
                                  t is [M, 0] without a LoRA term
``nf4_lora_backward_dx``          dx [M, K] = dy · (Ŵ + (B ⊙ s) · A)   (``library.lora_linear_dx``:
``dense_lora_backward_dx``        merged in column chunks, never the whole dense weight)
================================  =============================================================

Dtypes: x / dy fp32, bf16, fp16 or float64 (float64 is for gradcheck: the NF4 weight is
dequantized to fp32, which is exact, then widened, and everything is computed in float64).
A, B and bias are expected in x's dtype; ``scale`` is an fp32 tensor (float64 with float64 x),
0-d or [r].  The forward
picks its route through ``library.lora_linear`` (``route=None``: ``library.forward_route``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import library, reference
from .nf4 import NF4Weight

_NF4_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _nf4_view(packed, absmax, nested_absmax, nested_code, offset, code, N, K, blocksize, dtype,
              checked: bool = True) -> NF4Weight:
    """The NF4Weight (N, K) these tensors describe; ``checked=False`` (the eager Functions, whose
    tensors come from an NF4Weight that ``qlora_linear`` received) skips ``validate``."""
    dtype = dtype if dtype in _NF4_DTYPES else torch.float32
    if not checked:
        return NF4Weight.unchecked(packed, absmax, code, (N, K), dtype, blocksize, nested_absmax, nested_code, offset)
    return NF4Weight(packed=packed, absmax=absmax, code=code, shape=(N, K), dtype=dtype, blocksize=blocksize,
                     nested_absmax=nested_absmax, nested_code=nested_code, offset=offset, check_tables=False)


def _dense_weight(weight, dtype: torch.dtype) -> Tensor:
    """The base weight as a dense [N, K] tensor of ``dtype`` (float64 via an exact fp32 dequantize)."""
    if isinstance(weight, NF4Weight):
        if dtype in _NF4_DTYPES:
            return weight.dequantize(dtype)
        return weight.dequantize(torch.float32).to(dtype)
    return weight.to(dtype)


def _check_2d(name: str, op: str, t: Tensor, cols: int) -> None:
    if t.dim() != 2 or t.shape[1] != cols:
        raise ValueError(f"{op}: {name} must be 2-D [M, {cols}], got shape {tuple(t.shape)}")


def _forward_impl(x: Tensor, weight, lora_a, lora_b, scale, bias, x_lora, route, checked: bool = True,
                  want_t: bool = True):
    """(y, t) for ``nf4_lora_forward`` / ``dense_lora_forward`` (also called directly by the eager
    autograd Functions, with ``scale`` a float or a tensor, and ``checked=False``: ``qlora_linear``
    has checked their arguments, so they skip ``library.lora_linear``'s checks).  ``want_t=False``
    (the eager Functions, no dropout): t is None, not computed."""
    forward = library.lora_linear if checked else library.forward_2d
    M = x.shape[0]
    has_lora = lora_a is not None
    lin = x if x_lora is None else x_lora
    # t is computed here with its own matmul (the fused forward keeps it in registers only).
    if not has_lora:
        t = x.new_empty(M, 0)
    else:
        # (the float64 and dropout forms below add the low-rank term with t itself)
        need_t = want_t or x_lora is not None or x.dtype == torch.float64
        t = lin @ lora_a.to(x.dtype).t() if need_t else None
    if x.dtype == torch.float64:
        dense = _dense_weight(weight, torch.float64)
        y = reference.lora_linear_reference(x, dense, None, None, 1.0, bias, compute_dtype=torch.float64)
        cdt = torch.float64
    elif x_lora is None:
        return forward(x, weight, lora_a, lora_b, scale, bias, route=route, whole_weight=False), t
    else:  # dropout: the base sees x, the low-rank term sees x_lora
        y = forward(x, weight, None, None, 1.0, bias, route=route, whole_weight=False)
        cdt = torch.float32
    if has_lora:
        sc = scale.to(cdt) if isinstance(scale, Tensor) else scale
        y = y + ((t.to(cdt) * sc) @ lora_b.to(cdt).t()).to(x.dtype)
    return y, t


def _forward_fake(x, N, lora_a):
    return x.new_empty(x.shape[0], N), x.new_empty(x.shape[0], 0 if lora_a is None else lora_a.shape[0])


def _check_forward(op, x, N, K, lora_a, lora_b, x_lora):
    _check_2d("x", op, x, K)
    library._check_adapters(op, lora_a, lora_b, N, K)       # before t = x·Aᵀ, which needs A's shape
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(f"{op}: x_lora must have x's shape {tuple(x.shape)}, got {tuple(x_lora.shape)}")


# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lora_kernels::nf4_lora_forward", mutates_args=())
def nf4_lora_forward(x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                     nested_code: Optional[Tensor], offset: Optional[Tensor], code: Tensor, N: int, K: int,
                     blocksize: int, lora_a: Optional[Tensor], lora_b: Optional[Tensor], scale: Tensor,
                     bias: Optional[Tensor], x_lora: Optional[Tensor] = None,
                     route: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(y [M, N], t [M, r]) with an NF4 base weight (N, K); see the module docstring."""
    _check_forward("nf4_lora_forward", x, N, K, lora_a, lora_b, x_lora)
    w = _nf4_view(packed, absmax, nested_absmax, nested_code, offset, code, N, K, blocksize, x.dtype)
    return _forward_impl(x, w, lora_a, lora_b, scale, bias, x_lora, route)


@nf4_lora_forward.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, code, N, K, blocksize, lora_a, lora_b, scale,
      bias, x_lora=None, route=None):
    return _forward_fake(x, N, lora_a)


@torch.library.custom_op("lora_kernels::dense_lora_forward", mutates_args=())
def dense_lora_forward(x: Tensor, weight: Tensor, lora_a: Optional[Tensor], lora_b: Optional[Tensor],
                       scale: Tensor, bias: Optional[Tensor], x_lora: Optional[Tensor] = None,
                       route: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(y [M, N], t [M, r]) with a dense base weight [N, K]; see the module docstring."""
    _check_forward("dense_lora_forward", x, weight.shape[0], weight.shape[1], lora_a, lora_b, x_lora)
    return _forward_impl(x, weight, lora_a, lora_b, scale, bias, x_lora, route)


@dense_lora_forward.register_fake
def _(x, weight, lora_a, lora_b, scale, bias, x_lora=None, route=None):
    return _forward_fake(x, weight.shape[0], lora_a)


# ---------------------------------------------------------------------------------------------
def _check_dx(op, dy, N, K, lora_a, lora_b):
    _check_2d("dy", op, dy, N)
    library._check_adapters(op, lora_a, lora_b, N, K)


@torch.library.custom_op("lora_kernels::nf4_lora_backward_dx", mutates_args=())
def nf4_lora_backward_dx(dy: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                         nested_code: Optional[Tensor], offset: Optional[Tensor], code: Tensor, N: int, K: int,
                         blocksize: int, lora_a: Optional[Tensor], lora_b: Optional[Tensor],
                         scale: Optional[Tensor]) -> Tensor:
    """dx [M, K] = dy [M, N] · (Ŵ + (lora_b ⊙ scale) · lora_a), in dy's dtype."""
    _check_dx("nf4_lora_backward_dx", dy, N, K, lora_a, lora_b)
    w = _nf4_view(packed, absmax, nested_absmax, nested_code, offset, code, N, K, blocksize, dy.dtype)
    return library.lora_linear_dx(dy, w, lora_a, lora_b, 1.0 if scale is None else scale)


@nf4_lora_backward_dx.register_fake
def _(dy, packed, absmax, nested_absmax, nested_code, offset, code, N, K, blocksize, lora_a, lora_b, scale):
    return dy.new_empty(dy.shape[0], K)


@torch.library.custom_op("lora_kernels::dense_lora_backward_dx", mutates_args=())
def dense_lora_backward_dx(dy: Tensor, weight: Tensor, lora_a: Optional[Tensor], lora_b: Optional[Tensor],
                           scale: Optional[Tensor]) -> Tensor:
    """dx [M, K] = dy [M, N] · (weight [N, K] + (lora_b ⊙ scale) · lora_a), in dy's dtype."""
    _check_dx("dense_lora_backward_dx", dy, weight.shape[0], weight.shape[1], lora_a, lora_b)
    return library.lora_linear_dx(dy, weight, lora_a, lora_b, 1.0 if scale is None else scale)


@dense_lora_backward_dx.register_fake
def _(dy, weight, lora_a, lora_b, scale):
    return dy.new_empty(dy.shape[0], weight.shape[1])


__all__ = ["nf4_lora_forward", "dense_lora_forward", "nf4_lora_backward_dx", "dense_lora_backward_dx"]
