"""Comparisons of quantizer outputs with the reference that know about the GPU's reciprocal.

On CUDA, bitsandbytes scales each block by the hardware's approximate reciprocal
(``rcp.approx.ftz.f32``: its library is built with fast math), and our CUDA/Triton kernels use the
same instruction so their bytes equal bitsandbytes'.  The reference (and bitsandbytes' CPU path)
uses the IEEE reciprocal.  The two reciprocals differ by at most an ulp or two, so a quantized
index can differ only where the scaled value sits within a few ulps of a decision threshold, and
then by exactly one level.  These helpers assert exactly that: equal everywhere else.
"""

from __future__ import annotations

import torch

from lora_kernels import reference
from lora_kernels.codes import MIN_ABSMAX, NESTED_BLOCKSIZE, nf4_thresholds


def _near_threshold(scaled: torch.Tensor, thresholds: torch.Tensor, ulps: int = 4) -> torch.Tensor:
    """True where ``scaled`` lies within ``ulps`` ulps (of scaled) of some threshold."""
    s = scaled.float().reshape(-1, 1)
    tol = ulps * torch.finfo(torch.float32).eps * s.abs().clamp(min=1e-30)
    return ((s - thresholds.reshape(1, -1).float()).abs() <= tol).any(dim=1)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    b = packed.reshape(-1)
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()


def assert_packed_matches_reference(packed, w, blocksize, ctx=""):
    """``packed`` equals the reference's, except one-level steps at near-threshold elements."""
    ref_packed, absmax = reference.quantize_blocks_reference(w, blocksize)
    if torch.equal(packed.reshape(-1), ref_packed):
        return
    n = w.numel()
    got, want = _unpack(packed, n), _unpack(ref_packed, n)
    diff = got != want
    x = w.reshape(-1).float()
    inv = (1.0 / absmax.clamp(min=MIN_ABSMAX)).repeat_interleave(blocksize)[:n]
    idx = diff.nonzero().flatten()
    near = _near_threshold(x[idx] * inv[idx], nf4_thresholds(w.device))
    steps = (got[idx] - want[idx]).abs()
    assert bool(near.all()) and int(steps.max()) == 1, (
        f"{ctx}: {int(diff.sum())} indices differ, {int((~near).sum())} of them away from any threshold, "
        f"max step {int(steps.max())}")
    if n % 2:  # the padding nibble is always 7
        assert int(packed.reshape(-1)[-1]) & 0xF == 7, ctx


def assert_nested_matches_reference(q, nested_absmax, absmax, offset, code, ctx=""):
    """Nested 8-bit codes equal the reference's, except one-code steps at near-midpoint values."""
    q_ref, nested_ref = reference.quantize_absmax_nested_reference(absmax, offset, code)
    assert torch.equal(nested_absmax, nested_ref), ctx
    if torch.equal(q, q_ref):
        return
    d = absmax.float() - offset.float()
    inv = (1.0 / nested_ref.clamp(min=MIN_ABSMAX)).repeat_interleave(NESTED_BLOCKSIZE)[: d.numel()]
    diff = q != q_ref
    idx = diff.nonzero().flatten()
    bounds = (code[:-1] + code[1:]) * 0.5
    near = _near_threshold(d[idx] * inv[idx], bounds)
    steps = (q[idx].int() - q_ref[idx].int()).abs()
    assert bool(near.all()) and int(steps.max()) == 1, (
        f"{ctx}: {int(diff.sum())} nested codes differ, {int((~near).sum())} away from any midpoint")
