"""RMSNorm (lora_kernels.model_ops.rms_norm) against a float64 evaluation of the same math.

exact: ``rms_norm_reference`` on float64 copies of the inputs with ``compute_dtype=float64`` (no
intermediate rounding); its gradients by autograd through it.  ref: the same reference in the
inputs' own precision (transformers' numerics, what an unpatched model computes).  Every output
and gradient of the kernels must satisfy max|got - exact| <= 2 * max|ref - exact| + slack, with
slack = a tiny multiple of the magnitude the errors scale with (``_SLACK``, ``_grad_scales``);
max|ref - exact| is taken as at least half an ulp of max|exact| (``_check``).  Outputs are
poisoned (NaN-filled ``out=`` buffers) where the launchers take them, so an unwritten element
fails.  ``test_hf_rounding_of_x_hat`` checks the one thing the float64 comparison cannot see: that
x̂ is rounded to x's dtype as transformers does.

Without CUDA the kernels run under the Triton interpreter: fp32 / fp16 on small odd shapes (the
interpreter gets bf16 wrong); with CUDA those tests run on the GPU.  ``gpu`` tests add bf16 and the real sizes (x [32, 1024, 2048],
H = 4096 / 8192 / 16384); run them with ``pytest -m gpu``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from lora_kernels.model_ops import use_triton  # noqa: E402
from lora_kernels.model_ops.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference  # noqa: E402
from lora_kernels.triton import rms_norm as tri  # noqa: E402

from .conftest import randn  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
#: the kernel tests below run on the GPU where there is one (else the CPU, under the interpreter)
DEVICE = "cuda" if HAS_CUDA else "cpu"
SMALL_DTYPES = [torch.float32, torch.float16]
#: slack relative to the magnitude the errors scale with: a few fp32 ulps, whatever the dtype (the
#: kernels' math is fp32; the dweight of an fp64 weight is accumulated in fp32 too)
_SLACK = 1e-6


# =============================================================================================
# helpers
# =============================================================================================
def _inputs(shape, dtype, wdtype, gen, device):
    """x with rows of varied scale (2**-3 .. 2**3), weight around 1 with spread and signs."""
    x = torch.randn(shape, generator=gen)
    if x.dim() >= 1 and x.numel():
        x = x * torch.exp2(torch.randint(-3, 4, (*shape[:-1], 1), generator=gen).float())
    w = 1.0 + 0.5 * torch.randn(shape[-1], generator=gen)
    return x.to(dtype=dtype, device=device), w.to(dtype=wdtype, device=device)


def _exact(x, w, eps):
    return rms_norm_reference(x.detach().double(), w.detach().double(), eps, compute_dtype=torch.float64)


def _grad_scales(x, w, dy, eps):
    """Magnitudes the gradients' rounding errors scale with (float64): dx: max rstd·|dy·w| (dx is
    a difference of terms that large); dweight: max over columns of Σ_rows |dy·x̂|."""
    x, w, dy = x.detach().double(), w.detach().double(), dy.double()
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    dx_scale = (rstd * (dy * w).abs()).max().item() if x.numel() else 0.0
    dw_scale = (dy * x * rstd).abs().reshape(-1, x.shape[-1]).sum(0).max().item() if x.numel() else 0.0
    return dx_scale, dw_scale


def _check(name, got, ref, exact, scale=None):
    """max|got - exact| <= 2 * max(max|ref - exact|, half_ulp) + slack; dtype and shape of ref;
    all finite.  half_ulp = eps(dtype) / 2 * max|exact|, what the one final rounding may cost: the
    reference's max error is at least about that on any but tiny outputs (a 3-element dweight
    can round luckily).  slack = _SLACK * max(1, scale), scale defaulting to max|exact|."""
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype}, expected {ref.dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = max(1.0, exact.abs().max().item() if scale is None else scale)
    err_ref = (ref.double() - exact).abs().max().item()
    err_got = (got.double() - exact).abs().max().item()
    half_ulp = torch.finfo(got.dtype).eps / 2 * exact.abs().max().item()
    bound = 2 * max(err_ref, half_ulp) + _SLACK * scale
    assert err_got <= bound, f"{name}: max error {err_got:.3e} > bound {bound:.3e} (reference's {err_ref:.3e})"


def _forward_backward(x, w, dy, eps, fn):
    """y and grads (x, weight) of sum(y * dy) through ``fn``; grads None where not required."""
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(w.requires_grad)
    y = fn(x, w, eps)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _run_and_check(shape, dtype, wdtype, gen, device, eps=1e-6, weight_grad=True):
    x, w = _inputs(shape, dtype, wdtype, gen, device)
    w.requires_grad_(weight_grad)
    assert use_triton(x), "the test would compare the reference with itself"
    out_dtype = torch.promote_types(wdtype, dtype)
    dy = randn(shape, out_dtype, gen, device)
    y, dx, dw = _forward_backward(x, w, dy, eps, rms_norm)
    y_ref, dx_ref, dw_ref = _forward_backward(x, w, dy, eps, rms_norm_reference)
    y_ex, dx_ex, dw_ex = _forward_backward(x.double(), w.double().requires_grad_(weight_grad), dy.double(), eps,
                                           lambda a, b, e: rms_norm_reference(a, b, e, compute_dtype=torch.float64))
    dx_scale, dw_scale = _grad_scales(x, w, dy, eps)
    _check("y", y, y_ref, y_ex)
    _check("dx", dx, dx_ref, dx_ex, dx_scale)
    if weight_grad:
        _check("dweight", dw, dw_ref, dw_ex, dw_scale)
    else:
        assert dw is None
    return x, w, y


# =============================================================================================
# reference = transformers
# =============================================================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_transformers_llama_rms_norm(dtype, rng, monkeypatch):
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    H = 48
    module = modeling_llama.LlamaRMSNorm(H, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(1.0 + 0.5 * torch.randn(H, generator=rng))
    x = randn((3, 5, H), dtype, rng).requires_grad_(True)
    dy = randn((3, 5, H), dtype, rng)
    y_hf = module(x)
    y_hf.backward(dy)
    gx_hf, gw_hf = x.grad.clone(), module.weight.grad.clone()
    x.grad = None
    w = module.weight.detach().clone().requires_grad_(True)
    y = rms_norm_reference(x, w, 1e-5)
    y.backward(dy)
    assert torch.equal(y, y_hf) and torch.equal(x.grad, gx_hf) and torch.equal(w.grad, gw_hf)
    # LORA_KERNELS_MODEL_OPS=reference routes the public function to it
    monkeypatch.setenv("LORA_KERNELS_MODEL_OPS", "reference")
    assert torch.equal(rms_norm(x.detach(), w.detach(), 1e-5), y_hf.detach())


def test_gradcheck_reference_float64(rng):
    x = randn((3, 7), torch.float64, rng).requires_grad_(True)
    w = (1.0 + 0.5 * randn((7,), torch.float64, rng)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: rms_norm_reference(a, b, 1e-6, compute_dtype=torch.float64), (x, w))


# =============================================================================================
# kernels, small odd shapes, fp32 / fp16 (on the CPU: the interpreter)
# =============================================================================================
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("shape", [(7, 1000), (2, 3, 40), (2, 2, 3, 3), (5, 1), (300, 40), (21, 1000)])
def test_forward_backward(dtype, shape, rng):
    _run_and_check(shape, dtype, dtype, rng, DEVICE)


@pytest.mark.parametrize("dtype,wdtype", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                          (torch.float32, torch.float64), (torch.float16, torch.float64)])
def test_mixed_weight_dtype(dtype, wdtype, rng):
    x, w, y = _run_and_check((4, 3, 24), dtype, wdtype, rng, DEVICE, eps=1e-5)
    assert y.dtype == torch.promote_types(wdtype, dtype)


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_frozen_weight_and_eps(dtype, rng):
    _run_and_check((6, 5, 33), dtype, dtype, rng, DEVICE, eps=1e-5, weight_grad=False)


def test_zero_rows_and_large_eps(rng):
    x, w = _inputs((9, 50), torch.float32, torch.float32, rng, DEVICE)
    x[3] = 0.0
    y = rms_norm(x, w, 0.5)
    _check("y", y, rms_norm_reference(x, w, 0.5), _exact(x, w, 0.5))
    assert torch.equal(y[3], torch.zeros_like(y[3]))


@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_launchers_fill_poisoned_buffers(dtype, rng):
    R, H, eps = 37, 70, 1e-6          # BLOCK_R = 16: 3 tiles, the last one partial
    x, w = _inputs((R, H), dtype, dtype, rng, DEVICE)
    out = torch.full((R, H), float("nan"), dtype=dtype, device=DEVICE)
    rstd = torch.full((R,), float("nan"), device=DEVICE)
    y, rs = tri.rms_norm_forward(x, w, eps, out=out, rstd=rstd)
    assert y is out and rs is rstd
    _check("y", y, rms_norm_reference(x, w, eps), _exact(x, w, eps))
    rstd_exact = torch.rsqrt(x.double().pow(2).mean(-1) + eps)
    rstd_ref = torch.rsqrt(x.float().pow(2).mean(-1) + eps)
    _check("rstd", rstd, rstd_ref, rstd_exact)

    dy = randn((R, H), dtype, rng, DEVICE)
    for programs in (1, 2, 3):         # grid-stride loop: 3, 2 and 1 tiles per program
        dx_out = torch.full((R, H), float("nan"), dtype=dtype, device=DEVICE)
        partial = torch.full((programs, H), float("nan"), device=DEVICE)
        dx, dw = tri.rms_norm_backward(dy, x, w, rstd, dx_out=dx_out, dweight_partial=partial, programs=programs)
        assert dx is dx_out
        _, dx_ref, dw_ref = _forward_backward(x, w.requires_grad_(True), dy, eps, rms_norm_reference)
        _, dx_ex, dw_ex = _forward_backward(x.double(), w.double().requires_grad_(True), dy.double(), eps,
                                            lambda a, b, e: rms_norm_reference(a, b, e, compute_dtype=torch.float64))
        _check("dx", dx, dx_ref, dx_ex, _grad_scales(x, w, dy, eps)[0])
        _check("dweight", dw, dw_ref, dw_ex, _grad_scales(x, w, dy, eps)[1])
    dx_only, none = tri.rms_norm_backward(dy, x, w, rstd, compute_dweight=False)
    assert none is None and torch.equal(dx_only, dx)
    none, dw_only = tri.rms_norm_backward(dy, x, w, rstd, compute_dx=False, programs=3)
    assert none is None and torch.equal(dw_only, dw)


def test_strided_inputs_and_saved_tensors(rng):
    """A transposed x (last dim not unit-stride), a row-strided slice, a strided weight, an
    expanded (stride-0) dy; the Function saves the input itself (not a copy), weight and rstd, nothing else."""
    H = 24
    base, _ = _inputs((5, 2 * H), torch.float32, torch.float32, rng, DEVICE)
    w = 1.0 + 0.5 * randn((H,), torch.float32, rng, DEVICE)
    x_rows = base[:, :H]                                   # row stride 2H, a view the kernel reads
    xt = randn((H, 6), torch.float32, rng, DEVICE).t()             # columns at stride 6
    for x in (x_rows, xt):
        want = rms_norm(x.contiguous(), w)
        assert torch.equal(rms_norm(x, w), want)
    w_strided = torch.stack([w, torch.full_like(w, float("nan"))], 1).reshape(-1)[::2]   # stride 2
    assert w_strided.stride() == (2,) and torch.equal(rms_norm(x_rows, w_strided), rms_norm(x_rows, w))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    leaf = base.detach().clone().requires_grad_(True)
    x = leaf[:, :H]
    wg = w.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = rms_norm(x, wg)
    assert len(saved) == 3, [tuple(t.shape) for t in saved]
    assert (saved[0].data_ptr(), saved[0].shape, saved[0].stride()) == (x.data_ptr(), x.shape, x.stride())
    assert saved[1].data_ptr() == wg.data_ptr() and saved[1].shape == wg.shape
    assert saved[2].shape == (5,) and saved[2].dtype == torch.float32
    y.sum().backward()                                      # dy: ones expanded, stride 0
    leaf2 = base.detach().clone().requires_grad_(True)
    w2 = w.detach().clone().requires_grad_(True)
    rms_norm(leaf2[:, :H].contiguous(), w2).backward(torch.ones(5, H, device=DEVICE))
    assert torch.equal(leaf.grad, leaf2.grad) and torch.equal(wg.grad, w2.grad)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint(use_reentrant, rng):
    from torch.utils.checkpoint import checkpoint

    x0, w0 = _inputs((3, 4, 40), torch.float32, torch.float32, rng, DEVICE)
    dy = randn((3, 4, 40), torch.float32, rng, DEVICE)

    def grads(ckpt):
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        h = x * 1.5                                       # a non-leaf input, as in a model
        y = checkpoint(rms_norm, h, w, 1e-6, use_reentrant=use_reentrant) if ckpt else rms_norm(h, w, 1e-6)
        if not ckpt:
            assert isinstance(y.grad_fn, RMSNormFunction._backward_cls)
        (y * dy).sum().backward()
        return y.detach(), x.grad, w.grad

    for a, b in zip(grads(False), grads(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 8)])
def test_empty_rows(shape, rng):
    x = torch.empty(shape, dtype=torch.float16, device=DEVICE).requires_grad_(True)
    w = torch.ones(shape[-1], dtype=torch.float32, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.numel() == 0
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
    out, rstd = tri.rms_norm_forward(x.detach().reshape(-1, shape[-1]), w.detach())
    assert out.shape == (0, shape[-1]) and rstd.shape == (0,)


# =============================================================================================
# bad input: a clear error, raised before any launch
# =============================================================================================
@pytest.fixture
def no_launch(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(tri, "_launch_fwd", fail)
    monkeypatch.setattr(tri, "_launch_bwd", fail)


def test_float64_x_runs_the_reference(no_launch):
    # a float64 model patched by patch_model_kernels: LlamaRMSNorm's own numerics, no kernel launch
    x = torch.randn(4, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.rand(8, device=DEVICE, dtype=torch.float64) + 0.5
    y = rms_norm(x, w, 1e-6)
    ref = rms_norm_reference(x.detach(), w, 1e-6)
    assert y.dtype == torch.float64 and torch.equal(y.detach(), ref)
    y.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_bad_input_public(no_launch):
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    cases = [
        ((x.tolist(), w), TypeError, "x must be a torch.Tensor"),
        ((x, 1.0), TypeError, "weight must be a torch.Tensor"),
        ((x.to(torch.int32), w), TypeError, "x must be float32"),
        ((x, w.to(torch.int64)), TypeError, "weight must be float16, bfloat16, float32 or float64"),
        ((torch.tensor(1.0, device=DEVICE), w), ValueError, "H >= 1"),
        ((torch.randn(4, 0, device=DEVICE), torch.ones(0, device=DEVICE)), ValueError, "H >= 1"),
        ((x, torch.ones(7, device=DEVICE)), ValueError, r"weight must have shape \[H=8\]"),
        ((x, torch.ones(1, 8, device=DEVICE)), ValueError, r"weight must have shape \[H=8\]"),
        ((x, torch.ones(8, device="meta")), ValueError, "weight is on meta but x is on " + DEVICE),
        ((x, w, True), TypeError, "eps must be a float"),
        ((x, w, "1e-6"), TypeError, "eps must be a float"),
        ((x, w, -1e-6), ValueError, "eps must be finite and >= 0"),
        ((x, w, float("nan")), ValueError, "eps must be finite and >= 0"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            rms_norm(*args)


def test_bad_input_launchers(no_launch):
    kw = dict(device=DEVICE)
    x = torch.randn(4, 8, dtype=torch.float16, **kw)
    w = torch.ones(8, dtype=torch.float16, **kw)
    rstd = torch.ones(4, **kw)
    dy = torch.randn(4, 8, dtype=torch.float16, **kw)
    fwd, bwd = tri.rms_norm_forward, tri.rms_norm_backward
    cases = [
        (lambda: fwd(x.t(), torch.ones(4, dtype=torch.float16, **kw)), ValueError, "unit-stride columns"),
        (lambda: fwd(x[None], w), ValueError, r"x must be 2-D \[rows, H\]"),
        (lambda: fwd(x, w[::2]), ValueError, r"weight must have shape \[H=8\]"),
        (lambda: fwd(x, torch.ones(16, dtype=torch.float16, **kw)[::2]), ValueError, "weight must be unit-stride"),
        (lambda: fwd(x, w, out=torch.empty(4, 8, **kw)), ValueError,
         r"out must be a contiguous \[4, 8\] torch.float16"),
        (lambda: fwd(x, w, out=torch.empty(8, 4, dtype=torch.float16, **kw).t()), ValueError, "contiguous=False"),
        (lambda: fwd(x, w, rstd=torch.empty(4, dtype=torch.float16, **kw)), ValueError,
         r"rstd must be a contiguous \[4\]"),
        (lambda: fwd(x, w, eps=None), TypeError, "eps must be a float"),
        (lambda: fwd(x, w.to("meta")), ValueError, "weight is on meta but x is on " + DEVICE),
        (lambda: fwd(torch.randn(2, tri.MAX_HIDDEN + 1, dtype=torch.float16, **kw),
                     torch.ones(tri.MAX_HIDDEN + 1, dtype=torch.float16, **kw)), ValueError, "must be in 1..65536"),
        (lambda: bwd(dy.float(), x, w, rstd), TypeError, "dy must be one of torch.float16"),
        (lambda: bwd(dy[:3], x, w, rstd), ValueError, r"dy must have shape \[4, 8\]"),
        (lambda: bwd(dy, x, w, rstd.half()), ValueError, r"rstd must be a contiguous \[4\] torch.float32"),
        (lambda: bwd(dy, x, w, rstd, dx_out=torch.empty(4, 8, **kw)), ValueError, "dx_out must be"),
        (lambda: bwd(dy, x, w, rstd, programs=0), ValueError, "programs must be an int >= 1"),
        (lambda: bwd(dy, x, w, rstd, programs=2, dweight_partial=torch.empty(3, 8, **kw)), ValueError,
         r"dweight_partial must be a contiguous \[2, 8\] torch.float32"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_cpu_without_interpreter_uses_reference(monkeypatch, no_launch, rng):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = _inputs((3, 10), torch.float32, torch.float32, rng, "cpu")
    assert not use_triton(x)
    assert torch.equal(rms_norm(x, w), rms_norm_reference(x, w))


# =============================================================================================
# GPU: bf16, real sizes
# =============================================================================================
@pytest.mark.gpu
@pytest.mark.parametrize("weight_grad", [True, False])
def test_real_size_bf16_gpu(weight_grad, rng):
    _run_and_check((32, 1024, 2048), torch.bfloat16, torch.bfloat16, rng, "cuda", weight_grad=weight_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [4096, 8192, 16384, 1000, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_hidden_sizes_gpu(H, dtype, rng):
    _run_and_check((3, 677, H), dtype, dtype, rng, "cuda", eps=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                          (torch.bfloat16, torch.float64)])
def test_mixed_weight_dtype_gpu(dtype, wdtype, rng):
    _run_and_check((2, 513, 2048), dtype, wdtype, rng, "cuda")


@pytest.mark.gpu
def test_launchers_fill_poisoned_buffers_gpu(rng):
    R, H, eps = 32768, 2048, 1e-6
    x, w = _inputs((R, H), torch.bfloat16, torch.bfloat16, rng, "cuda")
    out = torch.full((R, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    rstd = torch.full((R,), float("nan"), device="cuda")
    for _ in range(2):                 # the second call takes the cached launch path
        y, _ = tri.rms_norm_forward(x, w, eps, out=out, rstd=rstd)
        _check("y", y, rms_norm_reference(x, w, eps), _exact(x, w, eps))
    dy = randn((R, H), torch.bfloat16, rng, "cuda")
    programs = tri.backward_programs(R, H, x.device)
    dx_out = torch.full((R, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    partial = torch.full((programs, H), float("nan"), device="cuda")
    dx, dw = tri.rms_norm_backward(dy, x, w, rstd, dx_out=dx_out, dweight_partial=partial)
    _, dx_ref, dw_ref = _forward_backward(x, w.requires_grad_(True), dy, eps, rms_norm_reference)
    _, dx_ex, dw_ex = _forward_backward(x.double(), w.double().requires_grad_(True), dy.double(), eps,
                                        lambda a, b, e: rms_norm_reference(a, b, e, compute_dtype=torch.float64))
    dx_scale, dw_scale = _grad_scales(x, w, dy, eps)
    _check("dx", dx, dx_ref, dx_ex, dx_scale)
    _check("dweight", dw, dw_ref, dw_ex, dw_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_gpu(use_reentrant, rng):
    from torch.utils.checkpoint import checkpoint

    x0, w0 = _inputs((4, 256, 2048), torch.bfloat16, torch.bfloat16, rng, "cuda")
    dy = randn((4, 256, 2048), torch.bfloat16, rng, "cuda")

    def grads(ckpt):
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        h = x * 1.5
        y = checkpoint(rms_norm, h, w, 1e-6, use_reentrant=use_reentrant) if ckpt else rms_norm(h, w, 1e-6)
        (y.float() * dy.float()).sum().backward()
        return y.detach(), x.grad, w.grad

    for a, b in zip(grads(False), grads(True)):
        assert torch.equal(a, b)


def test_hf_rounding_of_x_hat(rng):
    """fp16 x, fp32 weight: y and dweight are fp32, so they show whether x̂ was rounded to fp16
    as transformers does (in the forward and in the dweight products), which the float64
    comparisons cannot see.  Rare single-ulp differences in x̂ (an rstd one fp32 ulp off flips a
    rounding) are allowed: y must agree to fp32 precision almost everywhere, and dweight must be
    far closer to the reference's than a dweight from the unrounded x̂ is."""
    shape, eps = (64, 4, 96), 1e-6
    x, w = _inputs(shape, torch.float16, torch.float32, rng, DEVICE)
    dy = randn(shape, torch.float32, rng, DEVICE)
    y, _, dw = _forward_backward(x, w.requires_grad_(True), dy, eps, rms_norm)
    y_ref, _, dw_ref = _forward_backward(x, w, dy, eps, rms_norm_reference)
    close = ((y - y_ref).abs() <= 1e-6 * y_ref.abs()).float().mean().item()
    assert close >= 0.99, f"only {close:.4f} of y agree with the reference to fp32 precision"
    rstd = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    dw_unrounded = (dy.double() * x.double() * rstd).reshape(-1, shape[-1]).sum(0)
    err = (dw.double() - dw_ref.double()).abs().mean().item()
    err_unrounded = (dw_unrounded - dw_ref.double()).abs().mean().item()
    assert err <= 0.25 * err_unrounded, (err, err_unrounded)
