"""SwiGLU gating ``h = silu(gate) * up`` (lora_kernels.model_ops.swiglu, lora_kernels/triton/swiglu.py).

CPU: fp16 / fp32 through the Triton interpreter, small and odd shapes.  GPU (``-m gpu``): bf16 too,
the real sizes ([32, 1024, 5632] and [4096, 14336]) and a > 2**31-element case (int64 offsets).
Accuracy rule: the kernel's max error against a float64 evaluation is at most twice the error of
PyTorch's own low-precision ``F.silu(gate) * up`` (forward and autograd backward) plus a slack of
2**-24 (fp32 outputs: 2**-21) times the largest exact value.
"""

import os

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lora_kernels.model_ops.swiglu import SiluMulFunction, silu_mul, silu_mul_reference
from lora_kernels.triton import swiglu as kern
from tests.conftest import HAS_CUDA, randn

#: the small-shape tests run on the GPU when there is one, else on the CPU under the interpreter
DEVICE = "cuda" if HAS_CUDA else "cpu"
CPU_DTYPES = [torch.float16, torch.float32]          # the interpreter gets bf16 wrong
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ODD_SHAPES = [(3, 7, 131), (5, 64), (2, 3, 5, 17), (1,), (kern.BLOCK + 1,), (2, kern.BLOCK + 37)]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _inputs(shape, dtype, gen, device=DEVICE, n=2, scale=2.0):
    """n fresh normal tensors (std ``scale``); on a GPU drawn there, from a seed drawn from ``gen``."""
    if device == "cpu":
        return [randn(shape, dtype, gen, device, scale=scale) for _ in range(n)]
    dev_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return [(torch.randn(shape, device=device, generator=dev_gen) * scale).to(dtype) for _ in range(n)]


def _assert_accurate(got, ref_lowp, exact, what):
    """max|got - exact| <= 2 * max|ref_lowp - exact| + slack * max|exact| (all as float64), slack =
    2**-24 for bf16/fp16 outputs (below their rounding), 2**-21 (4 fp32 ulps) for fp32 outputs: the
    kernel's fp32 math rounds a few times, so with few elements PyTorch's error can be ~0."""
    assert got.shape == exact.shape and got.dtype == ref_lowp.dtype, what
    assert not torch.isnan(got).any(), f"{what}: NaN (unwritten output element?)"
    err = (got.double() - exact).abs().max().item()
    ref_err = (ref_lowp.double() - exact).abs().max().item()
    slack = (2.0 ** -21 if got.dtype == torch.float32 else 2.0 ** -24) * exact.abs().max().item()
    assert err <= 2.0 * ref_err + slack, (
        f"{what}: max error {err:.3e} > 2 * reference error {ref_err:.3e} + {slack:.1e}")


def _exact_and_ref_grads(gate, up, dh):
    """(exact float64 grads, PyTorch low-precision grads) by autograd through the reference."""
    out = []
    for dtype in (torch.float64, gate.dtype):
        g = gate.detach().to(dtype).requires_grad_()
        u = up.detach().to(dtype).requires_grad_()
        silu_mul_reference(g, u).backward(dh.to(dtype))
        out.append((g.grad, u.grad))
    return out


def _poison(like):
    return torch.full_like(like, float("nan"), memory_format=torch.contiguous_format)


def _check_forward(shape, dtype, gen, device):
    gate, up = _inputs(shape, dtype, gen, device)
    out = _poison(gate)
    h = kern.silu_mul_forward(gate, up, out=out)
    assert h is out and h.is_contiguous()
    exact = silu_mul_reference(gate.double(), up.double())
    _assert_accurate(h, silu_mul_reference(gate, up), exact, f"h {dtype} {shape}")


def _check_backward(shape, dtype, gen, device):
    gate, up, dh = _inputs(shape, dtype, gen, device, n=3)
    (eg, eu), (rg, ru) = _exact_and_ref_grads(gate, up, dh)
    # the launcher, into poisoned buffers
    d_gate, d_up = kern.silu_mul_backward(dh, gate, up, d_gate=_poison(gate), d_up=_poison(gate))
    _assert_accurate(d_gate, rg, eg, f"d_gate {dtype} {shape}")
    _assert_accurate(d_up, ru, eu, f"d_up {dtype} {shape}")
    # the Function through autograd
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h = silu_mul(g, u)
    assert type(h.grad_fn).__name__ == SiluMulFunction.__name__ + "Backward"
    h.backward(dh)
    _assert_accurate(g.grad, rg, eg, f"autograd d_gate {dtype} {shape}")
    _assert_accurate(u.grad, ru, eu, f"autograd d_up {dtype} {shape}")


class _NoLaunch:
    """Replaces both launchers: any launch fails the test."""

    def __init__(self, monkeypatch):
        def boom(*a, **k):
            raise AssertionError("a kernel was launched")
        monkeypatch.setattr(kern, "_launch_forward", boom)
        monkeypatch.setattr(kern, "_launch_backward", boom)


# ---------------------------------------------------------------------------------------------
# CPU (Triton interpreter)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_forward_accuracy(shape, dtype, rng):
    _check_forward(shape, dtype, rng, DEVICE)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 131), (2, 3, 5, 17), (kern.BLOCK + 1,)])
def test_backward_accuracy(shape, dtype, rng):
    _check_backward(shape, dtype, rng, DEVICE)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")      # the interpreter's
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # numpy
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_wide_inputs(dtype, rng):
    """Large |gate| (sigmoid saturates, exp(-gate) overflows in the kernel): finite and accurate."""
    big = 10.0 if dtype == torch.float16 else 100.0
    gate = torch.linspace(-big, big, 4099, dtype=torch.float64, device=DEVICE).to(dtype)
    _check_wide(gate, *_inputs(gate.shape, dtype, rng, n=2))


def _check_wide(gate, up, dh):
    """Forward and both gradients of the kernels against the exact values and the reference."""
    exact = silu_mul_reference(gate.double(), up.double())
    _assert_accurate(kern.silu_mul_forward(gate, up), silu_mul_reference(gate, up), exact, "h")
    (eg, eu), (rg, ru) = _exact_and_ref_grads(gate, up, dh)
    d_gate, d_up = kern.silu_mul_backward(dh, gate, up)
    _assert_accurate(d_gate, rg, eg, "d_gate")
    _assert_accurate(d_up, ru, eu, "d_up")


def test_int64_offsets_same_result(rng):
    """The int64-offset variant (used from 2**31 elements on) computes the same bits."""
    gate, up, dh = _inputs((3, kern.BLOCK + 5), torch.float16, rng, n=3)
    assert torch.equal(kern.silu_mul_forward(gate, up, offset_64=True),
                       kern.silu_mul_forward(gate, up, offset_64=False))
    a = kern.silu_mul_backward(dh, gate, up, offset_64=True)
    b = kern.silu_mul_backward(dh, gate, up, offset_64=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert kern._offset_64(2**31 - kern.BLOCK, None) and not kern._offset_64(2**31 - kern.BLOCK - 1, None)


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_backward_launcher_one_gradient(need, rng):
    """A gradient not asked for is None and the other one is still right (up may then be None)."""
    need_d_gate, need_d_up = need
    gate, up, dh = _inputs((4, 77), torch.float32, rng, n=3)
    d_gate, d_up = kern.silu_mul_backward(dh, gate, up if need_d_gate else None,
                                          need_d_gate=need_d_gate, need_d_up=need_d_up,
                                          d_gate=_poison(gate), d_up=_poison(gate))
    full = kern.silu_mul_backward(dh, gate, up)
    if need_d_gate:
        assert d_up is None and torch.equal(d_gate, full[0])
    else:
        assert d_gate is None and torch.equal(d_up, full[1])
    assert kern.silu_mul_backward(dh, gate, None, need_d_gate=False, need_d_up=False) == (None, None)


@pytest.mark.parametrize("requires", [(True, False), (False, True), (True, True)])
def test_needs_input_grad_and_saved_tensors(requires, monkeypatch, rng):
    """Only the needed gradients are computed (one launch); only what backward reads is saved."""
    gate, up, dh = _inputs((6, 129), torch.float32, rng, n=3)
    g = gate.clone().requires_grad_(requires[0])
    u = up.clone().requires_grad_(requires[1])
    calls = []
    real = kern.silu_mul_backward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(kern, "silu_mul_backward", spy)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = silu_mul(g, u)
    assert len(saved) == (2 if requires[0] else 1)
    h.backward(dh)
    assert len(calls) == 1
    assert (calls[0]["need_d_gate"], calls[0]["need_d_up"]) == requires
    full = real(dh, gate, up)
    assert (g.grad is None) != requires[0] and (u.grad is None) != requires[1]
    if requires[0]:
        assert torch.equal(g.grad, full[0])
    if requires[1]:
        assert torch.equal(u.grad, full[1])


def test_no_grad_path_matches_function(rng):
    gate, up = _inputs((5, 33), torch.float16, rng)
    with torch.no_grad():
        h0 = silu_mul(gate.requires_grad_(), up)
    assert h0.grad_fn is None
    h1 = silu_mul(gate, up)
    assert h1.grad_fn is not None and torch.equal(h0, h1.detach())


def test_non_contiguous_inputs(rng):
    """Views of a fused [..., 2I] projection, a transposed tensor and an expanded dh: copied to
    contiguous, results identical to the contiguous inputs'."""
    gate_up, dh_t = _inputs((3, 5, 2 * 67), torch.float32, rng, n=2)
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    h = kern.silu_mul_forward(gate, up)
    assert h.is_contiguous() and torch.equal(h, kern.silu_mul_forward(gate.contiguous(), up.contiguous()))
    gt, ut = gate.transpose(0, 1), up.transpose(0, 1)
    assert torch.equal(silu_mul(gt, ut), kern.silu_mul_forward(gt.contiguous(), ut.contiguous()))
    # backward through the Function: the grads of the views match the contiguous ones
    gu = gate_up.clone().requires_grad_()
    g, u = gu.chunk(2, dim=-1)
    dh = dh_t[..., :67]                                        # a non-contiguous dh
    silu_mul(g, u).backward(dh)
    d_gate, d_up = kern.silu_mul_backward(dh.contiguous(), gate.contiguous(), up.contiguous())
    assert torch.equal(gu.grad, torch.cat([d_gate, d_up], dim=-1))
    # dh with stride 0 (from .sum())
    g2, u2 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    silu_mul(g2, u2).sum().backward()
    ones = torch.ones_like(gate)
    assert torch.equal(g2.grad, kern.silu_mul_backward(ones, gate.contiguous(), up.contiguous())[0])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint(use_reentrant, rng):
    """Under torch.utils.checkpoint (the Function recomputed in backward): the same grads."""
    gate, up, dh = _inputs((4, 3, 45), torch.float32, rng, n=3)
    grads = []
    for ckpt in (False, True):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        h = (checkpoint(silu_mul, g, u, use_reentrant=use_reentrant) if ckpt else silu_mul(g, u))
        (h * dh).sum().backward()
        grads.append((g.grad, u.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_gradcheck_reference_float64(rng):
    gate, up = _inputs((3, 11), torch.float64, rng)
    gate.requires_grad_()
    up.requires_grad_()
    assert torch.autograd.gradcheck(silu_mul_reference, (gate, up))
    assert torch.autograd.gradcheck(silu_mul, (gate, up))        # float64 runs the reference
    assert torch.autograd.gradgradcheck(silu_mul_reference, (gate, up))


def test_reference_is_llama_mlp(rng):
    """silu_mul_reference is exactly transformers' LlamaMLP gating (act_fn(gate) * up), bit for bit."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    cfg = LlamaConfig(hidden_size=32, intermediate_size=88, hidden_act="silu")
    mlp = LlamaMLP(cfg).to(torch.float16)
    x = randn((2, 5, 32), torch.float16, rng)
    with torch.no_grad():
        want = mlp(x)
        got = mlp.down_proj(silu_mul_reference(mlp.gate_proj(x), mlp.up_proj(x)))
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    assert torch.equal(got, want)
    assert torch.equal(mlp.act_fn(gate) * up, silu_mul_reference(gate, up))


def test_dispatch(monkeypatch, rng):
    """TRITON_INTERPRET=1 on the CPU runs the kernels; LORA_KERNELS_MODEL_OPS=reference the reference."""
    gate, up = _inputs((2, 9), torch.float16, rng)
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    assert torch.equal(silu_mul(gate, up), kern.silu_mul_forward(gate, up))
    monkeypatch.setenv("LORA_KERNELS_MODEL_OPS", "reference")
    _NoLaunch(monkeypatch)
    assert torch.equal(silu_mul(gate, up), silu_mul_reference(gate, up))
    g = gate.clone().requires_grad_()
    h = silu_mul(g, up)
    assert type(h.grad_fn).__name__ != SiluMulFunction.__name__ + "Backward"
    h.sum().backward()


@pytest.mark.parametrize("shape", [(0, 131), (2, 0, 7), (0,)])
def test_empty(shape, monkeypatch):
    _NoLaunch(monkeypatch)
    gate = torch.empty(shape, dtype=torch.float16, device=DEVICE)
    up = torch.empty(shape, dtype=torch.float16, device=DEVICE)
    h = silu_mul(gate, up)
    assert h.shape == shape and h.dtype == torch.float16
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = silu_mul(g, u)
    assert out.shape == shape
    out.sum().backward()
    assert g.grad.shape == shape and u.grad.shape == shape
    assert kern.silu_mul_backward(gate, gate, up)[0].shape == shape


def _f16(*shape):
    return torch.zeros(shape, dtype=torch.float16, device=DEVICE)


@pytest.mark.parametrize("gate, up, exc, match", [
    ([1.0], _f16(3), TypeError, "gate must be a torch.Tensor"),
    (_f16(3), None, TypeError, "up must be a torch.Tensor"),
    (torch.zeros(3, dtype=torch.int32, device=DEVICE), torch.zeros(3, dtype=torch.int32, device=DEVICE),
     TypeError, "gate must be float32, bfloat16 or float16"),
    (_f16(3), torch.zeros(3, dtype=torch.complex64, device=DEVICE), TypeError, "up must be float32"),
    (_f16(3), torch.zeros(3, device=DEVICE), TypeError, "same dtype.*float16.*float32"),
    (_f16(4, 8), _f16(4, 9), ValueError, r"same shape.*\(4, 8\).*\(4, 9\)"),
    (_f16(4, 8), _f16(1, 8), ValueError, "same shape .no broadcasting"),
    (_f16(8), torch.zeros(8, dtype=torch.float16, device="meta"), ValueError, "same device.*meta"),
])
def test_bad_input_public(gate, up, exc, match, monkeypatch):
    _NoLaunch(monkeypatch)
    with pytest.raises(exc, match=match):
        silu_mul(gate, up)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(out=_f16(4, 8).t()), ValueError, r"out must be a contiguous \(4, 8\)"),
    (dict(out=torch.zeros(4, 8, device=DEVICE)), ValueError, "out must be a contiguous.*got torch.float32"),
    (dict(out=_f16(4, 9)), ValueError, r"got torch.float16 \(4, 9\)"),
    (dict(out="x"), TypeError, "out must be a torch.Tensor or None"),
    (dict(up=_f16(8, 4)), ValueError, r"up has shape \(8, 4\)"),
    (dict(up=torch.zeros(4, 8, dtype=torch.float64, device=DEVICE)), TypeError, "up must be float32"),
    (dict(gate=torch.zeros(4, 8, device="meta", dtype=torch.float16),
          up=torch.zeros(4, 8, device="meta", dtype=torch.float16)), ValueError, "CUDA device"),
])
def test_bad_input_forward_launcher(kwargs, exc, match, monkeypatch):
    _NoLaunch(monkeypatch)
    args = dict(gate=_f16(4, 8), up=_f16(4, 8))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        kern.silu_mul_forward(args.pop("gate"), args.pop("up"), **args)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(dh=torch.zeros(4, 8, device=DEVICE)), TypeError, "dh has dtype torch.float32"),
    (dict(dh=_f16(8, 4)), ValueError, r"dh has shape \(8, 4\)"),
    (dict(up=None), ValueError, "up is needed for d_gate"),
    (dict(d_up=_f16(4, 8)[:, ::2]), ValueError, "d_up must be a contiguous"),
    (dict(d_gate=torch.zeros(4, 8, device=DEVICE)), ValueError, "d_gate must be a contiguous"),
    (dict(dh=torch.zeros(4, 8, dtype=torch.float16, device="meta")), ValueError, "dh is on meta"),
])
def test_bad_input_backward_launcher(kwargs, exc, match, monkeypatch):
    _NoLaunch(monkeypatch)
    args = dict(dh=_f16(4, 8), gate=_f16(4, 8), up=_f16(4, 8))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        kern.silu_mul_backward(args.pop("dh"), args.pop("gate"), args.pop("up"), **args)


# ---------------------------------------------------------------------------------------------
# GPU: bf16, the real sizes, int64 offsets
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 131), (2, 3, 5, 17), (4096, 14336), (32, 1024, 5632)])
def test_gpu_forward_backward(shape, dtype, rng):
    _check_forward(shape, dtype, rng, "cuda")
    _check_backward(shape, dtype, rng, "cuda")
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_wide_inputs(dtype, rng):
    big = 10.0 if dtype == torch.float16 else 100.0
    gate = torch.linspace(-big, big, 1 << 20, dtype=torch.float64, device="cuda").to(dtype)
    _check_wide(gate, *_inputs(gate.shape, dtype, rng, "cuda", n=2))


@pytest.mark.gpu
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gpu_checkpoint_bf16(use_reentrant, rng):
    gate, up, dh = _inputs((2, 256, 5632), torch.bfloat16, rng, "cuda", n=3)
    grads = []
    for ckpt in (False, True):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        h = (checkpoint(silu_mul, g, u, use_reentrant=use_reentrant) if ckpt else silu_mul(g, u))
        h.backward(dh)
        grads.append((g.grad, u.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.gpu
def test_gpu_over_2_31_elements(rng):
    """numel > 2**31 (int64 offsets): every element of h, d_gate and d_up checked, in chunks."""
    numel = 2**31 + 3 * kern.BLOCK + 17
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~30 GiB of GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    gate, up, dh = (torch.randn(numel, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    h = kern.silu_mul_forward(gate, up, out=torch.full_like(gate, float("nan")))
    d_gate, d_up = kern.silu_mul_backward(dh, gate, up, d_gate=torch.full_like(gate, float("nan")),
                                          d_up=torch.full_like(gate, float("nan")))
    chunk = 2**27
    for s in range(0, numel, chunk):
        sl = slice(s, min(s + chunk, numel))
        g, u, d = gate[sl], up[sl], dh[sl]
        exact = silu_mul_reference(g.double(), u.double())
        _assert_accurate(h[sl], silu_mul_reference(g, u), exact, f"h[{s}:]")
        (eg, eu), (rg, ru) = _exact_and_ref_grads(g, u, d)
        _assert_accurate(d_gate[sl], rg, eg, f"d_gate[{s}:]")
        _assert_accurate(d_up[sl], ru, eu, f"d_up[{s}:]")
