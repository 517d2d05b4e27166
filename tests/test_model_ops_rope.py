"""Rotary embedding (lora_kernels.model_ops.rope / lora_kernels.triton.rope) against float64.

Want: ``apply_rotary_reference`` (HF's ops) evaluated in float64 on the very low-precision inputs the
kernel got (exact up to one float64 rounding).  Tolerance on the max abs error of every output and
gradient: 2 x the max error of the same reference run in the low precision (HF rounds after each
op) + half an ulp at the largest |want| (the kernel's single rounding is within that).
Outputs are NaN-poisoned ``out=`` buffers where the launchers are called directly, so an unwritten
element fails.  Inputs are fresh random data from the ``rng`` fixture (its seed is printed on
failure); cos and sin are random (not HF's cat(freqs, freqs)) unless said, so mixing the halves of
cos/sin fails too.  CPU: the Triton interpreter, fp16/fp32, small odd shapes; ``gpu``: bf16/fp16,
the real size B=32, S=1024, Hq=32, Hk=4, D=64/128 with HF's transposed-view layout.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from lora_kernels.model_ops.rope import apply_rotary, apply_rotary_reference  # noqa: E402
from lora_kernels.triton import rope as tr  # noqa: E402
from lora_kernels.triton.rope import rotary_backward, rotary_forward  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
CPU_DTYPES = [torch.float16, torch.float32]


# =============================================================================================
# helpers
# =============================================================================================
def _rn(shape, dtype, g, device=DEVICE):
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)


def _heads(B, S, H, D, dtype, unsq, layout, g, device=DEVICE):
    """A q/k-like tensor of logical shape [B, H, S, D] (unsq=1) or [B, S, H, D] (unsq=2).
    layout "hf": a view of a [B, S, H*D] projection (transposed for unsq=1: non-contiguous, dense);
    "contig": contiguous in its logical shape; "strided": a non-dense view (a slice of a fused
    projection, every other element of D)."""
    if layout == "hf":
        x = _rn((B, S, H * D), dtype, g, device).view(B, S, H, D)
    elif layout == "contig":
        x = _rn((B, H, S, D) if unsq == 1 else (B, S, H, D), dtype, g, device)
        return x
    else:
        x = _rn((B, S, H + 1, 2 * D), dtype, g, device)[:, :, 1:, ::2]
    return x.transpose(1, 2) if unsq == 1 else x


def _cos_sin(B, S, D, dtype, g, *, batch=True, kind="random", device=DEVICE):
    b = B if batch else 1
    if kind == "hf":        # LlamaRotaryEmbedding: fp32 angles, cat(freqs, freqs), cast
        inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        pos = torch.randint(0, 4096, (b, S), generator=g).float()
        emb = torch.cat([pos[..., None] * inv, pos[..., None] * inv], dim=-1)
        return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)
    if kind == "strided":   # [S, b, D] memory, transposed
        c = _rn((S, b, D), dtype, g, device).transpose(0, 1)
        s = _rn((S, b, D), dtype, g, device).transpose(0, 1)
        return c, s
    return _rn((b, S, D), dtype, g, device), _rn((b, S, D), dtype, g, device)


def _check(got, want64, ref_lp, what):
    """max |got - want| <= 2 * max |ref_lp - want| + half an ulp at max |want|."""
    assert got.shape == want64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want64.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten / poisoned elements)"
    if want64.numel() == 0:
        return
    err = (got.double() - want64).abs().max().item()
    ref_err = (ref_lp.double() - want64).abs().max().item()
    slack = 0.5 * torch.finfo(got.dtype).eps * want64.abs().max().item()
    assert err <= 2 * ref_err + slack, f"{what}: max err {err:.3e} > 2 * ref err {ref_err:.3e} + {slack:.3e}"


def _check_vjp(g, got, cos, sin, unsq, dtype, what):
    """A rotary backward result ``got`` for the gradient ``g``: the reference's vector-Jacobian
    product in float64 (want) and in ``dtype`` (PyTorch's own error), through ``_check``."""
    x64 = torch.zeros(g.shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    xl = torch.zeros(g.shape, dtype=dtype, device=DEVICE, requires_grad=True)
    (want,) = torch.autograd.grad(apply_rotary_reference(x64, x64, cos.double(), sin.double(), unsq)[0], x64,
                                  g.double())
    (ref,) = torch.autograd.grad(apply_rotary_reference(xl, xl, cos, sin, unsq)[0], xl, g)
    _check(got, want, ref, what)


def _strides(t):
    """The layout: strides of the dims of size > 1 (a size-1 dim's stride means nothing)."""
    return tuple(st if n > 1 else None for n, st in zip(t.shape, t.stride()))


def _ref64(q, k, cos, sin, unsq):
    return apply_rotary_reference(q.double(), k.double(), cos.double(), sin.double(), unsq)


class _Count:
    """Wraps the kernel launcher and counts launches (also used to check "no launch at all")."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, grid, args, constexprs, options):
        self.calls.append(dict(constexprs))
        return self.inner(grid, args, constexprs, options)


@pytest.fixture
def launches(monkeypatch):
    counter = _Count(tr._launch_rotary)
    monkeypatch.setattr(tr, "_launch_rotary", counter)
    return counter.calls


# =============================================================================================
# reference = transformers' code
# =============================================================================================
def test_reference_is_transformers_bitwise(rng):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    for unsq in (1, 2):
        q = _heads(3, 7, 5, 16, torch.float16, unsq, "hf", rng, "cpu")
        k = _heads(3, 7, 1, 16, torch.float16, unsq, "hf", rng, "cpu")
        cos, sin = _cos_sin(3, 7, 16, torch.float16, rng, kind="hf", device="cpu")
        for a, b in zip(apply_rotary_reference(q, k, cos, sin, unsq), llama.apply_rotary_pos_emb(q, k, cos, sin, unsq)):
            assert torch.equal(a, b) and a.stride() == b.stride()


def test_backward_formula_matches_autograd(rng):
    """dx1 = g1·c1 + g2·s2, dx2 = g2·c2 − g1·s1 (what the kernel computes) is autograd's answer."""
    B, S, H, D = 2, 5, 3, 8
    q = torch.randn(B, H, S, D, generator=rng, dtype=torch.float64, requires_grad=True)
    cos, sin = (torch.randn(B, S, D, generator=rng, dtype=torch.float64) for _ in range(2))
    g = torch.randn(B, H, S, D, generator=rng, dtype=torch.float64)
    (want,) = torch.autograd.grad(apply_rotary_reference(q, q.detach(), cos, sin, 1)[0], q, g)
    h = D // 2
    c, s = cos[:, None], sin[:, None]
    dx1 = g[..., :h] * c[..., :h] + g[..., h:] * s[..., h:]
    dx2 = g[..., h:] * c[..., h:] - g[..., :h] * s[..., :h]
    torch.testing.assert_close(torch.cat([dx1, dx2], -1), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("unsq", [1, 2])
def test_gradcheck_reference(unsq, rng):
    B, S, D = 2, 3, 4
    q = _heads(B, S, 3, D, torch.float64, unsq, "hf", rng, "cpu").detach().requires_grad_()
    k = _heads(B, S, 1, D, torch.float64, unsq, "hf", rng, "cpu").detach().requires_grad_()
    cos, sin = (t.requires_grad_() for t in _cos_sin(B, S, D, torch.float64, rng, batch=False, device="cpu"))
    assert torch.autograd.gradcheck(lambda *a: apply_rotary_reference(*a, unsq), (q, k, cos, sin))
    # float64 goes to the reference through the public function too
    assert torch.autograd.gradcheck(lambda *a: apply_rotary(*a, unsq), (q, k, cos, sin))


# =============================================================================================
# forward
# =============================================================================================
@pytest.mark.parametrize("D", [2, 8, 64])
@pytest.mark.parametrize("unsq", [1, 2])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("layout", ["hf", "contig", "strided"])
def test_forward_launcher(layout, dtype, unsq, D, rng):
    B, S, Hq, Hk = 3, 5, 7, 3
    q = _heads(B, S, Hq, D, dtype, unsq, layout, rng)
    k = _heads(B, S, Hk, D, dtype, unsq, layout, rng)
    cos, sin = _cos_sin(B, S, D, dtype, rng, batch=(D != 8), kind="strided" if layout == "strided" else "random")
    q_out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)        # contiguous, any layout of q
    k_out = torch.full(k.shape, float("nan"), dtype=dtype, device=DEVICE).transpose(0, 1).contiguous().transpose(0, 1)
    qe, ke = rotary_forward(q, k, cos, sin, unsq, q_out=q_out, k_out=k_out)
    assert qe is q_out and ke is k_out
    w64, ref = _ref64(q, k, cos, sin, unsq), apply_rotary_reference(q, k, cos, sin, unsq)
    _check(qe, w64[0], ref[0], "q_embed")
    _check(ke, w64[1], ref[1], "k_embed")


@pytest.mark.parametrize("unsq", [1, 2])
def test_head_blocks_loop(unsq, rng, launches, monkeypatch):
    """More heads than one tile holds: the kernel walks them in blocks (tail block masked)."""
    monkeypatch.setattr(tr, "_MAX_TILE", 8)              # D=8: [2 heads, 4] tiles, 4 blocks for 7 heads
    dtype = torch.float32
    B, S, Hq, Hk, D = 3, 5, 7, 3, 8
    q = _heads(B, S, Hq, D, dtype, unsq, "hf", rng)
    k = _heads(B, S, Hk, D, dtype, unsq, "strided", rng)
    cos, sin = _cos_sin(B, S, D, dtype, rng)
    qe, ke = rotary_forward(q, k, cos, sin, unsq, q_out=torch.full_like(q, float("nan")),
                            k_out=torch.full_like(k, float("nan")))
    assert launches[-1]["BLOCK_HQ"] == 2 and launches[-1]["BLOCK_HK"] == 2
    for g, r, w, name in zip((qe, ke), apply_rotary_reference(q, k, cos, sin, unsq), _ref64(q, k, cos, sin, unsq),
                             ("q_embed", "k_embed")):
        _check(g, w, r, name)
    dq, dk = rotary_backward(q, k, cos, sin, unsq, dq_out=torch.full_like(q, float("nan")),
                             dk_out=torch.full_like(k, float("nan")))
    for g, got, name in ((q, dq, "dq"), (k, dk, "dk")):
        x64 = torch.zeros(g.shape, dtype=torch.float64, requires_grad=True, device=DEVICE)
        (want,) = torch.autograd.grad(apply_rotary_reference(x64, x64, cos.double(), sin.double(), unsq)[0], x64,
                                      g.double())
        x32 = torch.zeros(g.shape, dtype=dtype, requires_grad=True, device=DEVICE)
        (ref,) = torch.autograd.grad(apply_rotary_reference(x32, x32, cos, sin, unsq)[0], x32, g)
        _check(got, want, ref, name)


@pytest.mark.parametrize("unsq", [1, 2, -3, -2])
def test_public_forward_layout_and_values(unsq, rng, launches):
    """Outputs have the reference's dtype and strides (HF's transposed view: q's own layout)."""
    dtype = torch.float16
    B, S, Hq, Hk, D = 3, 7, 5, 1, 16
    q = _heads(B, S, Hq, D, dtype, unsq % 4, "hf", rng)
    k = _heads(B, S, Hk, D, dtype, unsq % 4, "hf", rng)
    cos, sin = _cos_sin(B, S, D, dtype, rng, kind="hf")
    got = apply_rotary(q, k, cos, sin, unsq)
    ref = apply_rotary_reference(q, k, cos, sin, unsq)
    w64 = _ref64(q, k, cos, sin, unsq)
    assert len(launches) == 1 and launches[0]["HAS_Q"] and launches[0]["HAS_K"]
    for name, x, g, r, w in zip(("q_embed", "k_embed"), (q, k), got, ref, w64):
        assert g.dtype == r.dtype and _strides(g) == _strides(r) == _strides(x), name
        _check(g, w, r, name)


@pytest.mark.parametrize("q_dtype,k_dtype,cs_dtype", [
    (torch.float16, torch.float16, torch.float32),       # fp32 cos/sin: outputs fp32, as HF's promotion
    (torch.float32, torch.float16, torch.float16),
    (torch.float16, torch.float32, torch.float32),
])
def test_mixed_dtypes_follow_promotion(q_dtype, k_dtype, cs_dtype, rng, launches):
    B, S, D = 2, 3, 8
    q = _heads(B, S, 3, D, q_dtype, 1, "hf", rng)
    k = _heads(B, S, 1, D, k_dtype, 1, "hf", rng)
    cos, sin = _cos_sin(B, S, D, cs_dtype, rng)
    got = apply_rotary(q, k, cos, sin)
    ref = apply_rotary_reference(q, k, cos, sin)
    assert len(launches) == 1
    for g, r, w, name in zip(got, ref, _ref64(q, k, cos, sin, 1), ("q_embed", "k_embed")):
        assert g.dtype == r.dtype, name
        _check(g, w, r, name)


def test_broadcast_sequence_dim(rng):
    """cos/sin of [1, 1, D] (one position for every token) broadcast like HF's."""
    q = _heads(3, 5, 3, 8, torch.float32, 2, "hf", rng)
    k = _heads(3, 5, 2, 8, torch.float32, 2, "contig", rng)
    cos, sin = _rn((1, 1, 8), torch.float32, rng), _rn((1, 1, 8), torch.float32, rng)
    got = apply_rotary(q, k, cos, sin, 2)
    for g, r, w in zip(got, apply_rotary_reference(q, k, cos, sin, 2), _ref64(q, k, cos, sin, 2)):
        _check(g, w, r, "embed")


# =============================================================================================
# backward
# =============================================================================================
def _leaf_views(B, S, Hq, Hk, D, dtype, unsq, g):
    """Leaf projections [B, S, H*D] and HF's q / k views of them (plus float64 twins)."""
    qb = _rn((B, S, Hq * D), dtype, g).requires_grad_()
    kb = _rn((B, S, Hk * D), dtype, g).requires_grad_()

    def view(t, H):
        v = t.view(B, S, H, D)
        return v.transpose(1, 2) if unsq == 1 else v
    return qb, kb, view


@pytest.mark.parametrize("D", [2, 8, 64])
@pytest.mark.parametrize("unsq", [1, 2])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_backward_public(dtype, unsq, D, rng, launches):
    B, S, Hq, Hk = 3, 5, 5, 3
    qb, kb, view = _leaf_views(B, S, Hq, Hk, D, dtype, unsq, rng)
    cos, sin = _cos_sin(B, S, D, dtype, rng, batch=(D != 8))
    q, k = view(qb, Hq), view(kb, Hk)
    dq_seen = []
    q.register_hook(lambda gr: dq_seen.append(_strides(gr)))
    qe, ke = apply_rotary(q, k, cos, sin, unsq)
    # incoming grads with a layout of their own (contiguous [B, D, ...] permuted back)
    gq = _rn(qe.shape[:1] + qe.shape[-1:] + qe.shape[1:3], dtype, rng).permute(0, 2, 3, 1)
    gk = _rn(ke.shape, dtype, rng)
    dqb, dkb = torch.autograd.grad((qe, ke), (qb, kb), (gq, gk))
    assert len(launches) == 2 and launches[1]["BACKWARD"] and launches[1]["HAS_Q"] and launches[1]["HAS_K"]
    assert dq_seen == [_strides(q)], "dq should be laid out like q (so the view's backward is free)"

    qb64, kb64 = qb.detach().double().requires_grad_(), kb.detach().double().requires_grad_()
    w = _ref64(view(qb64, Hq), view(kb64, Hk), cos, sin, unsq)
    want = torch.autograd.grad(w, (qb64, kb64), (gq.double(), gk.double()))
    qbl, kbl = qb.detach().requires_grad_(), kb.detach().requires_grad_()
    r = apply_rotary_reference(view(qbl, Hq), view(kbl, Hk), cos, sin, unsq)
    ref = torch.autograd.grad(r, (qbl, kbl), (gq, gk))
    _check(dqb, want[0], ref[0], "dq")
    _check(dkb, want[1], ref[1], "dk")


@pytest.mark.parametrize("unsq", [1, 2])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_backward_launcher_poisoned(dtype, unsq, rng):
    B, S, Hq, Hk, D = 3, 5, 3, 1, 8
    gq = _heads(B, S, Hq, D, dtype, unsq, "strided", rng)
    gk = _heads(B, S, Hk, D, dtype, unsq, "hf", rng)
    cos, sin = _cos_sin(B, S, D, dtype, rng, batch=False, kind="strided")
    dq_out = torch.full(gq.shape, float("nan"), dtype=dtype, device=DEVICE)
    dk_out = torch.full(gk.shape, float("nan"), dtype=dtype, device=DEVICE)
    dq, dk = rotary_backward(gq, gk, cos, sin, unsq, dq_out=dq_out, dk_out=dk_out)
    assert dq is dq_out and dk is dk_out
    # want: the vector-Jacobian product of the reference in float64 / in the low precision
    for g, got, name in ((gq, dq, "dq"), (gk, dk, "dk")):
        _check_vjp(g, got, cos, sin, unsq, dtype, name)
    # one grad only: the other result is None; an fp32 output from low-precision grads
    dq2, dk2 = rotary_backward(gq, None, cos, sin, unsq, q_dtype=torch.float32)
    assert dk2 is None and dq2.dtype == torch.float32
    x64 = torch.zeros(gq.shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    x32 = torch.zeros(gq.shape, dtype=torch.float32, device=DEVICE, requires_grad=True)
    (want,) = torch.autograd.grad(apply_rotary_reference(x64, x64, cos.double(), sin.double(), unsq)[0], x64, gq.double())
    (ref,) = torch.autograd.grad(apply_rotary_reference(x32, x32, cos.float(), sin.float(), unsq)[0], x32, gq.float())
    _check(dq2, want, ref, "dq (fp32 output)")


def test_none_and_partial_grads(rng, launches):
    """An unused output (None incoming grad), inputs that need no grad, expanded (stride-0) grads."""
    dtype = torch.float32
    B, S, Hq, Hk, D = 3, 5, 3, 1, 8
    qb, kb, view = _leaf_views(B, S, Hq, Hk, D, dtype, 1, rng)
    cos, sin = _cos_sin(B, S, D, dtype, rng)
    # only q_embed used: k gets no grad, one backward launch for q only
    qe, ke = apply_rotary(view(qb, Hq), view(kb, Hk), cos, sin)
    dqb, dkb = torch.autograd.grad(qe.sum(), (qb, kb), allow_unused=True)
    assert dkb is None
    assert launches[-1]["BACKWARD"] and launches[-1]["HAS_Q"] and not launches[-1]["HAS_K"]
    qb64 = qb.detach().double().requires_grad_()
    w = _ref64(view(qb64, Hq), view(kb, Hk), cos, sin, 1)[0]
    (want,) = torch.autograd.grad(w.sum(), qb64)
    qbl = qb.detach().requires_grad_()
    (ref,) = torch.autograd.grad(apply_rotary_reference(view(qbl, Hq), view(kb, Hk), cos, sin)[0].sum(), qbl)
    _check(dqb, want, ref, "dq (k_embed unused)")
    # k needs grad, q does not: the backward launch computes dk only
    n = len(launches)
    qe, ke = apply_rotary(view(qb.detach(), Hq), view(kb, Hk), cos, sin)
    (qe.sum() + ke.sum()).backward()
    assert len(launches) == n + 2 and not launches[-1]["HAS_Q"] and launches[-1]["HAS_K"]
    assert kb.grad is not None and torch.isfinite(kb.grad).all()


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint(reentrant, rng):
    from torch.utils.checkpoint import checkpoint
    dtype = torch.float32
    B, S, Hq, Hk, D = 3, 5, 3, 1, 8
    qb, kb, view = _leaf_views(B, S, Hq, Hk, D, dtype, 1, rng)
    cos, sin = _cos_sin(B, S, D, dtype, rng)
    w1 = _rn((Hq * D, Hq * D), dtype, rng)

    def block(qb, kb):
        qe, ke = apply_rotary(view(qb @ w1, Hq), view(kb, Hk), cos, sin)
        return (qe.float() ** 2).sum() + (ke * 1.5).sum()

    g_plain = torch.autograd.grad(block(qb, kb), (qb, kb))
    loss = checkpoint(block, qb, kb, use_reentrant=reentrant)
    if reentrant:
        loss.backward()
        g_ckpt = (qb.grad, kb.grad)
    else:
        g_ckpt = torch.autograd.grad(loss, (qb, kb))
    for a, b in zip(g_plain, g_ckpt):
        assert torch.equal(a, b)


# =============================================================================================
# routing and fallbacks
# =============================================================================================
def test_fallback_when_cos_requires_grad(rng, launches):
    q = _heads(2, 3, 2, 8, torch.float32, 1, "hf", rng).requires_grad_()
    k = _heads(2, 3, 1, 8, torch.float32, 1, "hf", rng)
    cos, sin = (t.requires_grad_() for t in _cos_sin(2, 3, 8, torch.float32, rng))
    qe, ke = apply_rotary(q, k, cos, sin)
    assert not launches
    (qe.sum() + ke.sum()).backward()
    assert cos.grad is not None and sin.grad is not None
    with torch.no_grad():          # grad mode off: the kernel runs
        apply_rotary(q, k, cos, sin)
    assert len(launches) == 1


def test_fallback_float64_and_env(rng, launches, monkeypatch):
    q = _heads(2, 3, 2, 8, torch.float64, 1, "hf", rng)
    k = _heads(2, 3, 1, 8, torch.float64, 1, "hf", rng)
    cos, sin = _cos_sin(2, 3, 8, torch.float64, rng)
    for a, b in zip(apply_rotary(q, k, cos, sin), apply_rotary_reference(q, k, cos, sin)):
        assert torch.equal(a, b)
    monkeypatch.setenv("LORA_KERNELS_MODEL_OPS", "reference")
    qh, kh = q.half(), k.half()
    for a, b in zip(apply_rotary(qh, kh, cos.half(), sin.half()), apply_rotary_reference(qh, kh, cos.half(), sin.half())):
        assert torch.equal(a, b)
    assert not launches


def test_empty_inputs(launches):
    for B, S, Hq, Hk in ((0, 5, 3, 1), (2, 0, 3, 1), (2, 5, 0, 1)):
        qb = torch.zeros(B, S, Hq * 8, device=DEVICE, requires_grad=True)
        kb = torch.zeros(B, S, Hk * 8, device=DEVICE, requires_grad=True)
        q, k = qb.view(B, S, Hq, 8).transpose(1, 2), kb.view(B, S, Hk, 8).transpose(1, 2)
        cos = sin = torch.zeros(max(B, 1), S, 8, device=DEVICE)
        qe, ke = apply_rotary(q, k, cos, sin)
        r = apply_rotary_reference(q, k, cos, sin)
        assert qe.shape == r[0].shape and ke.shape == r[1].shape
        (qe.sum() + ke.sum()).backward()
        assert qb.grad.shape == qb.shape
        if B == 0 or S == 0:
            assert not launches


# =============================================================================================
# bad inputs: clear errors, raised before any launch
# =============================================================================================
def _good(unsq=1):
    q = torch.zeros(2, 4, 3, 8, device=DEVICE)      # [B, H, S, D]
    k = torch.zeros(2, 1, 3, 8, device=DEVICE)
    cos = sin = torch.zeros(2, 3, 8, device=DEVICE)
    return dict(q=q, k=k, cos=cos, sin=sin, unsqueeze_dim=unsq)


_BAD = [
    ("q_list", dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("q_int", dict(q=torch.zeros(2, 4, 3, 8, dtype=torch.int32, device=DEVICE)), TypeError, "q must be a floating"),
    ("sin_int", dict(sin=torch.zeros(2, 3, 8, dtype=torch.int64, device=DEVICE)), TypeError, "sin must be a floating"),
    ("q_3d", dict(q=torch.zeros(2, 3, 8, device=DEVICE)), ValueError, r"q must be 4-D \[B, H, S, D\]"),
    ("cos_4d", dict(cos=torch.zeros(2, 1, 3, 8, device=DEVICE)), ValueError, r"cos must be 3-D"),
    ("odd_D", dict(q=torch.zeros(2, 4, 3, 7, device=DEVICE), k=torch.zeros(2, 1, 3, 7, device=DEVICE),
                   cos=torch.zeros(2, 3, 7, device=DEVICE), sin=torch.zeros(2, 3, 7, device=DEVICE)),
     ValueError, "must be even, got 7"),
    ("k_seq", dict(k=torch.zeros(2, 1, 4, 8, device=DEVICE)), ValueError, "k .* must match q"),
    ("k_D", dict(k=torch.zeros(2, 1, 3, 16, device=DEVICE)), ValueError, "k .* must match q"),
    ("cos_S", dict(cos=torch.zeros(2, 5, 8, device=DEVICE)), ValueError, r"cos must be \[B or 1, S or 1, D\]"),
    ("sin_B", dict(sin=torch.zeros(3, 3, 8, device=DEVICE)), ValueError, r"sin must be \[B or 1, S or 1, D\]"),
    ("unsq_0", dict(unsqueeze_dim=0), ValueError, "unsqueeze_dim must be 1"),
    ("unsq_str", dict(unsqueeze_dim="1"), TypeError, "unsqueeze_dim must be an int"),
    ("device", dict(cos=torch.zeros(2, 3, 8, device="meta")), ValueError, "cos is on meta"),
]


@pytest.mark.parametrize("name,change,exc,match", _BAD, ids=[b[0] for b in _BAD])
def test_bad_inputs(name, change, exc, match, launches):
    args = {**_good(), **change}
    with pytest.raises(exc, match=match):
        apply_rotary(**args)
    with pytest.raises(exc, match=match):
        rotary_forward(**args)
    assert not launches


def test_bad_launcher_outputs(launches):
    a = _good()
    with pytest.raises(ValueError, match="q_out must be a float32/bfloat16/float16 tensor of shape"):
        rotary_forward(**a, q_out=torch.empty(2, 4, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="k_out must be"):
        rotary_forward(**a, k_out=torch.empty(2, 1, 3, 8, dtype=torch.float64, device=DEVICE))
    with pytest.raises(TypeError, match="q must be float32, bfloat16 or float16 for the kernel"):
        rotary_forward(a["q"].double(), a["k"], a["cos"], a["sin"])
    with pytest.raises(ValueError, match="grad_q_embed and grad_k_embed are both None"):
        rotary_backward(None, None, a["cos"], a["sin"])
    with pytest.raises(TypeError, match="dq_out dtype must be"):
        rotary_backward(a["q"], None, a["cos"], a["sin"], q_dtype=torch.int8)
    assert not launches


# =============================================================================================
# GPU: bf16, the real size
# =============================================================================================
REAL = dict(B=32, S=1024, Hq=32, Hk=4)


def _gpu_case(D, dtype, unsq, g):
    B, S, Hq, Hk = REAL["B"], REAL["S"], REAL["Hq"], REAL["Hk"]
    qb = _rn((B, S, Hq * D), dtype, g).requires_grad_()
    kb = _rn((B, S, Hk * D), dtype, g).requires_grad_()

    def view(t, H):
        v = t.view(B, S, H, D)
        return v.transpose(1, 2) if unsq == 1 else v
    cos, sin = _cos_sin(B, S, D, dtype, g, kind="hf")
    return qb, kb, view, cos, sin


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_size(D, dtype, rng):
    unsq = 1
    qb, kb, view, cos, sin = _gpu_case(D, dtype, unsq, rng)
    Hq, Hk = REAL["Hq"], REAL["Hk"]
    q, k = view(qb, Hq), view(kb, Hk)
    # forward through the launcher into poisoned buffers, and through the public function
    q_out = torch.full_like(q, float("nan"))
    k_out = torch.full_like(k, float("nan"))
    rotary_forward(q.detach(), k.detach(), cos, sin, unsq, q_out=q_out, k_out=k_out)
    qe, ke = apply_rotary(q, k, cos, sin, unsq)
    with torch.no_grad():
        w64 = _ref64(q, k, cos, sin, unsq)
        ref = apply_rotary_reference(q, k, cos, sin, unsq)
    for got, w, r, name in ((q_out, w64[0], ref[0], "q_out"), (k_out, w64[1], ref[1], "k_out"),
                            (qe, w64[0], ref[0], "q_embed"), (ke, w64[1], ref[1], "k_embed")):
        _check(got, w, r, name)
    assert _strides(qe) == _strides(ref[0]) and _strides(ke) == _strides(ref[1])
    del w64, ref
    gq, gk = _rn(qe.shape, dtype, rng), _rn(ke.shape, dtype, rng)    # contiguous: not q's layout
    dqb, dkb = torch.autograd.grad((qe, ke), (qb, kb), (gq, gk))
    qb64, kb64 = qb.detach().double().requires_grad_(), kb.detach().double().requires_grad_()
    want = torch.autograd.grad(_ref64(view(qb64, Hq), view(kb64, Hk), cos, sin, unsq), (qb64, kb64),
                               (gq.double(), gk.double()))
    del qb64, kb64
    qbl, kbl = qb.detach().requires_grad_(), kb.detach().requires_grad_()
    ref = torch.autograd.grad(apply_rotary_reference(view(qbl, Hq), view(kbl, Hk), cos, sin, unsq), (qbl, kbl), (gq, gk))
    _check(dqb, want[0], ref[0], "dq")
    _check(dkb, want[1], ref[1], "dk")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("unsq", [1, 2])
@pytest.mark.parametrize("layout", ["hf", "contig", "strided"])
def test_gpu_layouts_bf16(layout, unsq, rng):
    dtype = torch.bfloat16
    B, S, Hq, Hk, D = 5, 333, 12, 3, 80      # odd sizes, D/2 = 40 not a power of two
    q = _heads(B, S, Hq, D, dtype, unsq, layout, rng)
    k = _heads(B, S, Hk, D, dtype, unsq, layout, rng)
    cos, sin = _cos_sin(B, S, D, dtype, rng, batch=False, kind="strided")
    q_out, k_out = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    rotary_forward(q, k, cos, sin, unsq, q_out=q_out, k_out=k_out)
    w64, ref = _ref64(q, k, cos, sin, unsq), apply_rotary_reference(q, k, cos, sin, unsq)
    _check(q_out, w64[0], ref[0], "q_embed")
    _check(k_out, w64[1], ref[1], "k_embed")
    dq, dk = rotary_backward(q, k, cos, sin, unsq, dq_out=torch.full_like(q, float("nan")),
                             dk_out=torch.full_like(k, float("nan")))
    for g, got, name in ((q, dq, "dq"), (k, dk, "dk")):
        _check_vjp(g, got, cos, sin, unsq, dtype, name)
