"""The triton-small route (lora_kernels/triton/nf4_lora_small.py): one launch for the forward
(y and T = x·Aᵀ) and one for the input gradient (dx and U = dy·B), against float64 references.

Criterion (design.md), per output: max-abs and relative-Frobenius errors against the float64
reference on the exactly dequantized weight at most 2x those of plain PyTorch computing the same
formula in x's dtype (+ one output ulp on the max-abs, as in test_forward_triton.py).  Outputs are
allocated NaN-poisoned (``torch.empty`` patched for the call), so an element the kernels never
write fails.  Without CUDA the kernels run under the Triton interpreter (fp16: the interpreter gets
bf16 wrong); the autograd cases route the CPU like a GPU (``library._fallback_route`` patched) so
the Functions take the route end to end.  ``gpu`` cases run bf16 and fp16 with ``pytest -m gpu``.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import lora_kernels as lk  # noqa: E402
from lora_kernels import library  # noqa: E402
from lora_kernels.triton import nf4_lora_small as small  # noqa: E402

from .conftest import randn  # noqa: E402
from .test_forward_triton import _make  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu


def _errors(y, ref):
    d = (y.double() - ref).reshape(-1)
    return d.abs().max().item(), (d.norm() / ref.reshape(-1).norm().clamp_min(1e-300)).item()


def _check(name, got, ref, torch_own, msg):
    """``got`` (the kernel) and ``torch_own`` (PyTorch in the same dtype) against ``ref`` (float64)."""
    assert got.shape == ref.shape, f"{msg}: {name} shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{msg}: NaN left in {name} (unwritten elements?)"
    k_max, k_fro = _errors(got, ref)
    b_max, b_fro = _errors(torch_own, ref)
    top = max(ref.abs().max().item(), 1e-30)
    ulp = torch.finfo(got.dtype).eps * 2.0 ** math.floor(math.log2(top))
    assert k_max <= 2 * b_max + max(1e-6 * max(1.0, top), ulp), f"{msg}: {name} max-abs {k_max:.3g} > 2 x {b_max:.3g}"
    assert k_fro <= 2 * b_fro + 1e-7, f"{msg}: {name} rel-Frobenius {k_fro:.3g} > 2 x {b_fro:.3g}"


def _problem(rng, M, K, N, r, *, dtype, kind, blocksize=64, vec=False, bias=False, adapter_dtype=None):
    """test_forward_triton's random problem (rows of W at varied scales; a per-rank scale vector has
    some zeros), with the adapters in ``adapter_dtype`` if given."""
    x, weight, w_exact, a, b, s, bb = _make(M, N, K, r, dtype=dtype, kind=kind, blocksize=blocksize,
                                            bias="same" if bias else None, scale="vector" if vec else "scalar",
                                            g=rng)
    if adapter_dtype is not None:
        a, b = a.to(adapter_dtype), b.to(adapter_dtype)
    return x, weight, w_exact, a, b, s, bb


@pytest.fixture
def poisoned(monkeypatch):
    """``torch.empty`` hands out NaN-filled float tensors while the test's kernels allocate."""
    orig = torch.empty

    def empty(*args, **kw):
        t = orig(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    return orig


def _run_kernels(rng, M, K, N, r, dtype=torch.float16, **kw):
    x, weight, w_exact, a, b, s, bb = _problem(rng, M, K, N, r, dtype=dtype, **kw)
    s_scalar, s_vec = (1.0, s) if isinstance(s, torch.Tensor) else (s, None)
    y, t = small.small_forward(x, weight, a, b, s_scalar, s_vec, bb)
    g = randn((M, N), dtype, rng, device=DEVICE)
    dx, u = small.small_dx(g, weight, a, b, s_scalar, s_vec)
    msg = f"M={M} K={K} N={N} r={r} {dtype} {kw}"

    a_r, b_r = a.to(dtype), b.to(dtype)                  # the operands the kernels round to x's dtype
    s64 = s.double() if isinstance(s, torch.Tensor) else s
    t64 = x.double() @ a_r.double().t()
    y64 = x.double() @ w_exact.t() + (t64 * s64) @ b_r.double().t() + (0 if bb is None else bb.double())
    u64 = g.double() @ b_r.double()
    dx64 = g.double() @ w_exact + (u64 * s64) @ a_r.double()
    # PyTorch's own: the same formula in x's dtype
    w_low = w_exact.to(dtype)
    s_low = s.to(dtype) if isinstance(s, torch.Tensor) else s
    t_low = x @ a_r.t()
    y_low = x @ w_low.t() + (t_low * s_low) @ b_r.t() + (0 if bb is None else bb)
    u_low = g @ b_r
    dx_low = g @ w_low + (u_low * s_low) @ a_r
    for name, got, ref, own in (("y", y, y64, y_low), ("T", t, t64, t_low), ("dx", dx, dx64, dx_low),
                                ("U", u, u64, u_low)):
        assert got.dtype == dtype, f"{msg}: {name} dtype {got.dtype}"
        _check(name, got, ref, own, msg)


CPU_CASES = [
    # (M, K, N, r), kwargs
    ((37, 128, 45, 8), dict(kind="nf4dq", bias=True)),
    ((70, 192, 130, 16), dict(kind="nf4", vec=True)),
    ((19, 100, 33, 3), dict(kind="dense", bias=True)),              # K not a multiple of the tile
    ((65, 256, 70, 64), dict(kind="nf4dq", blocksize=128, vec=True, bias=True)),
    ((20, 96, 40, 1), dict(kind="nf4", blocksize=32)),              # tile wider than the blocksize
    ((1, 64, 17, 5), dict(kind="nf4dq")),
]


@pytest.mark.parametrize("shape,kw", CPU_CASES, ids=lambda v: str(v))
def test_small_kernels(rng, poisoned, shape, kw):
    _run_kernels(rng, *shape, **kw)


@pytest.fixture
def gpu_like_cpu(monkeypatch):
    """Route the CPU as the GPU is routed (Triton under the interpreter), so the autograd Functions
    take triton-small end to end here; counts the launches of both kernels."""
    calls = {"forward": 0, "dx": 0}
    fwd, dx = small.small_forward, small.small_dx

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    orig = library._fallback_route
    monkeypatch.setattr(library, "SMALL_MAX_MNK", 1 << 40)        # the route is opt-in
    monkeypatch.setattr(library, "_fallback_route",
                        lambda w, dt, dev: None if dev.type == "cpu" and dt in (torch.float16, torch.bfloat16)
                        else orig(w, dt, dev))
    monkeypatch.setattr(small, "small_forward", count("forward", fwd))
    monkeypatch.setattr(small, "small_dx", count("dx", dx))
    return calls


def _grads(fn, leaves, g):
    for t in leaves:
        t.grad = None
    y = fn()
    y.backward(g)
    return [y.detach()] + [t.grad.detach().clone() for t in leaves]


@pytest.mark.parametrize("M,K,N,r,kind,vec,adt,ckpt", [
    (40, 128, 72, 16, "nf4dq", False, torch.float32, False),
    (33, 192, 45, 8, "nf4", True, torch.float16, False),
    (24, 128, 40, 4, "dense", False, torch.float16, True),
], ids=lambda v: str(v))
def test_autograd_takes_small_route(rng, gpu_like_cpu, M, K, N, r, kind, vec, adt, ckpt):
    """qlora_linear's forward + backward through triton-small: one launch per direction, T kept
    from the forward (not recomputed), U from dx's launch; gradients of x, A, B (and a per-rank
    scale) against float64, and (checkpointed case) equal to the un-checkpointed step."""
    dtype = torch.float16
    x, weight, w_exact, a, b, s, _ = _problem(rng, M, K, N, r, dtype=dtype, kind=kind, vec=vec, adapter_dtype=adt)
    assert library.forward_route(M, weight, dtype, x.device, r) == "triton-small"
    assert library.backward_route(weight, dtype, x.device, M, r) == "triton-small"
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    leaves = [x, a, b] + ([s.requires_grad_()] if vec else [])
    g = randn((M, N), dtype, rng, device=DEVICE)

    def fn():
        if ckpt:
            return torch.utils.checkpoint.checkpoint(lambda t: lk.qlora_linear(t, weight, a, b, s), x,
                                                     use_reentrant=False)
        return lk.qlora_linear(x, weight, a, b, s)

    got = _grads(fn, leaves, g)
    assert gpu_like_cpu == {"forward": 2 if ckpt else 1, "dx": 1}, gpu_like_cpu
    assert [t.dtype for t in got[1:]] == [t.dtype for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, ra, rb, *rs = ref_leaves
    s64 = rs[0] if vec else s

    def ref_fn():
        # the adapters as the kernels read them (rounded to x's dtype), with an identity gradient
        ra_r = ra.detach().to(dtype).double() + (ra - ra.detach())
        rb_r = rb.detach().to(dtype).double() + (rb - rb.detach())
        return rx @ w_exact.t() + ((rx @ ra_r.t()) * s64) @ rb_r.t()

    ref = _grads(ref_fn, ref_leaves, g.double())
    names = ["y", "dx", "dA", "dB"] + (["ds"] if vec else [])
    for name, got_t, ref_t in zip(names, got, ref):
        rel = ((got_t.double() - ref_t).norm() / ref_t.norm().clamp_min(1e-30)).item()
        assert rel <= 4e-3, (name, rel)           # fp16 products of O(100) terms: ~1e-3 relative
    if ckpt:
        plain = _grads(lambda: lk.qlora_linear(x, weight, a, b, s), leaves, g)
        for name, p_t, c_t in zip(names, plain, got):
            assert torch.equal(p_t, c_t), name


def test_small_route_is_opt_in(monkeypatch):
    """By default (LORA_KERNELS_SMALL_MAX_MNK unset) no call takes triton-small."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LORA_KERNELS_SMALL_MAX_MNK"}
    out = subprocess.run([sys.executable, "-c", "from lora_kernels import library; print(library.SMALL_MAX_MNK)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "0", out
    monkeypatch.setattr(library, "SMALL_MAX_MNK", 0)
    monkeypatch.setattr(library, "_fallback_route", lambda w, dt, dev: None)
    q = lk.quantize_nf4(torch.randn(48, 128))
    assert library.forward_route(32, q, torch.float16, torch.device("cpu"), 16) == "merge-cublas"
    assert library.backward_route(q, torch.float16, torch.device("cpu"), 32, 16) == "merge-cublas"


def test_small_route_limits(gpu_like_cpu, monkeypatch):
    """Who takes the route (when opted in): a LoRA term of rank 1..64, M·N·K <= SMALL_MAX_MNK, M > 16
    forward (the gemv routes below); a forced route with an unsupported call is a ValueError."""
    q = lk.quantize_nf4(torch.randn(48, 128))
    dev = torch.device("cpu")
    assert library.forward_route(32, q, torch.float16, dev, 16) == "triton-small"
    assert library.forward_route(32, q, torch.float16, dev, 0) != "triton-small"      # no LoRA term
    assert library.forward_route(32, q, torch.float16, dev, 65) != "triton-small"     # rank too large
    assert library.forward_route(8, q, torch.float16, dev, 16) != "triton-small"      # decode
    assert library.backward_route(q, torch.float16, dev, 8, 16) == "triton-small"
    assert library.forward_route(32, q, torch.float32, dev, 16) == "reference"        # fp32: fallback
    monkeypatch.setattr(library, "SMALL_MAX_MNK", 32 * 48 * 128 - 1)
    assert library.forward_route(32, q, torch.float16, dev, 16) == "merge-cublas"
    x = torch.randn(32, 128).half()
    a, b = torch.randn(80, 128).half(), torch.randn(48, 80).half()
    with pytest.raises(ValueError, match="triton-small"):
        library.lora_linear(x, q, a, b, 1.0, route="triton-small")          # r = 80 > 64
    with pytest.raises(ValueError, match="triton-small"):
        library.lora_linear(x, q, route="triton-small")                      # no LoRA term
    with pytest.raises(ValueError, match="triton-small"):
        library.lora_linear_dx(torch.randn(32, 48), q, a[:4], b[:, :4], 1.0, route="triton-small")  # fp32 dy
    monkeypatch.setenv("TRITON_INTERPRET", "0")                    # CPU tensors without the interpreter
    with pytest.raises(ValueError, match="CUDA device"):
        library.lora_linear(x, q, a[:4], b[:, :4], 1.0, route="triton-small")


# ------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape,kw", [
    ((512, 128, 352, 8), dict(kind="nf4dq")),
    ((4096, 1024, 1024, 16), dict(kind="nf4dq", bias=True)),
    ((777, 384, 129, 64), dict(kind="nf4", vec=True)),
    ((300, 2048, 256, 16), dict(kind="dense", bias=True)),
    ((65, 512, 333, 1), dict(kind="nf4dq", blocksize=128)),
], ids=lambda v: str(v))
def test_gpu_small_kernels(rng, poisoned, dtype, shape, kw):
    _run_kernels(rng, *shape, dtype=dtype, **kw)
