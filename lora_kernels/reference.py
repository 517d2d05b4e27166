"""Plain-PyTorch reference: the readable definition of every kernel, the CPU fallback and the
test oracle.  Kernels are tested against these functions, never against each other.

Storage format (bitsandbytes' NF4 with double quantization), for a weight flattened row-major
into ``n`` elements and cut into blocks of ``blocksize`` consecutive elements (the last block
may be partial):

* ``absmax[b] = max |x|`` over block b (fp32).
* ``idx = #{t in NF4 thresholds : x * (1 / max(absmax[b], 1e-38)) > t}`` -- the nearest NF4
  level, an exact tie going to the lower index (the scale is a multiply by the fp32
  reciprocal, as bitsandbytes' CUDA kernel does).
* Two indices a byte, the first element in the high nibble; for odd ``n`` the missing last
  nibble is 7 (the 0.0 level).  ``packed``: uint8 [(n + 1) // 2].
* Double quantization: ``offset = absmax.mean()`` (torch's fp32 mean on the tensor's device),
  ``d = absmax - offset``, blocks of 256: ``nested_absmax[j] = max |d|``,
  ``q = nearest dynamic-code entry of d * (1 / max(nested_absmax[j], 1e-38))`` with an exact
  tie going to the even index (bitsandbytes' CUDA binary search); a nested block whose
  values all equal the offset (``nested_absmax == 0``) stores index 0, as bitsandbytes does
  (it decodes to ``offset`` all the same).
* Dequantize: ``absmax[b] = fl(fl(dyn[q[b]] * nested_absmax[b // 256]) + offset)`` (two
  roundings, never a fused multiply-add), then ``out[i] = dtype(fl(NF4[idx[i]] * absmax[b]))``.

The GPU flavour.  bitsandbytes' CUDA kernels differ from this definition (and from its own CPU
path) in two last-ulp details: the block scale is the hardware's approximate reciprocal
(``rcp.approx.ftz.f32``), and four of the 15 NF4 thresholds are one ulp off the midpoints
(``codes.NF4_THRESHOLDS_CUDA``).  Our CUDA and Triton quantizers reproduce those on the GPU, so
their bytes equal bitsandbytes' CUDA bytes; they can differ from this reference by one level
only where a scaled value sits within an ulp or two of a threshold (about one element in ten
million for random fp32 weights).  Dequantization is the same everywhere.
"""

from __future__ import annotations

import torch

from .codes import MIN_ABSMAX, NESTED_BLOCKSIZE, dynamic_code, nf4_code, nf4_thresholds


def _blockwise_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per-block max |x| of a flat fp32 tensor; the last block may be partial."""
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = torch.zeros(nblocks * blocksize, dtype=torch.float32, device=x.device)
    padded[:n] = x
    return padded.view(nblocks, blocksize).abs().amax(dim=1)


def quantize_blocks_reference(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize a flat weight.

    w: [n] fp32/bf16/fp16.  Returns (packed uint8 [(n + 1) // 2], absmax fp32 [ceil(n / blocksize)]).
    """
    x = w.reshape(-1).float()
    n = x.numel()
    absmax = _blockwise_absmax(x, blocksize)
    inv = 1.0 / absmax.clamp(min=MIN_ABSMAX)
    scaled = x * inv.repeat_interleave(blocksize)[:n]
    idx = torch.bucketize(scaled, nf4_thresholds(x.device), right=False).to(torch.uint8)
    if n % 2:
        idx = torch.cat([idx, torch.full((1,), 7, dtype=torch.uint8, device=x.device)])
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed, absmax


def nearest_dynamic_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted 256-entry ``code``; exact ties go to the even index."""
    bounds = (code[:-1] + code[1:]) * 0.5
    q = torch.searchsorted(bounds, scaled.contiguous(), right=False)  # #bounds strictly below x
    at_bound = q < bounds.numel()
    tie = at_bound & (scaled == bounds[q.clamp(max=bounds.numel() - 1)]) & (q % 2 == 1)
    return (q + tie.long()).to(torch.uint8)


def quantize_absmax_nested_reference(
    absmax: torch.Tensor, offset: torch.Tensor, code: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-level (8-bit) quantization of ``absmax - offset`` in blocks of 256.

    absmax: fp32 [nb]; offset: fp32 0-d; code: fp32 [256] sorted.
    Returns (q uint8 [nb], nested_absmax fp32 [ceil(nb / 256)]).
    """
    d = absmax.float() - offset.float()
    nested_absmax = _blockwise_absmax(d, NESTED_BLOCKSIZE)
    per_value = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: d.numel()]
    scaled = d * (1.0 / per_value.clamp(min=MIN_ABSMAX))
    q = nearest_dynamic_index(scaled, code.float())
    return torch.where(per_value == 0, torch.zeros_like(q), q), nested_absmax


def absmax_from_nested(
    q: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """Recover fp32 absmax [nb] from the 8-bit codes: fl(fl(code[q] * nested_absmax) + offset)."""
    scale = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: q.numel()]
    prod = nested_code[q.long()] * scale  # separate ops: two roundings, no FMA
    return prod + offset


def dequantize_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    code: torch.Tensor,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize to a flat [n] tensor of ``dtype`` (absmax is uint8 when nested, else fp32)."""
    if nested_absmax is not None:
        absmax = absmax_from_nested(absmax, nested_absmax, nested_code, offset)
    b = packed.reshape(-1)
    idx = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()
    vals = code.float()[idx]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (vals * scale).to(dtype)


def quantize_reference(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> dict:
    """The whole quantization, as the pieces of the format (see module docstring)."""
    packed, absmax = quantize_blocks_reference(w, blocksize)
    out = {"packed": packed, "absmax": absmax, "nested_absmax": None, "nested_code": None, "offset": None}
    if double_quant:
        offset = absmax.mean()
        code = dynamic_code(w.device)
        q, nested_absmax = quantize_absmax_nested_reference(absmax, offset, code)
        out.update(absmax=q, nested_absmax=nested_absmax, nested_code=code, offset=offset)
    out["code"] = nf4_code(w.device)
    return out


# ------------------------------------------------------------------------------------------
# LoRA / QLoRA linear
def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float | torch.Tensor = 1.0,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y = x · Wᵀ + ((x · Aᵀ) ⊙ s) · Bᵀ + bias, computed in ``compute_dtype``, returned in x's dtype.

    x: [..., K]; weight: dense [N, K] (dequantize an NF4 weight first); lora_a: [r, K];
    lora_b: [N, r]; scale: a float (alpha / r, or alpha / sqrt(r) for rsLoRA) or an [r] vector
    (AdaLoRA: E ⊙ mask · scaling); bias: [N] or None.  No LoRA term when lora_a is None.
    """
    xc = x.to(compute_dtype)
    y = xc @ weight.to(compute_dtype).t()
    if lora_a is not None:
        t = xc @ lora_a.to(compute_dtype).t()
        s = scale.to(compute_dtype) if isinstance(scale, torch.Tensor) else scale
        y = y + (t * s) @ lora_b.to(compute_dtype).t()
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(x.dtype)
