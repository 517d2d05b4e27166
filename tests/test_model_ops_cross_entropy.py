"""Cross-entropy over LM logits (lora_kernels.model_ops.cross_entropy, lora_kernels.triton.cross_entropy).

Ground truth: the reference (transformers' ForCausalLMLoss / fixed_cross_entropy numerics) evaluated
on the *same* low-precision logits upcast to float64, gradients by autograd through it.  Tolerance:
max |got - want| <= 2 * max |ref - want| + a tiny slack, where ref is the PyTorch reference run as
transformers runs it (fp32 upcast; its gradient rounded back to the logits' dtype), its error
measured here against the same float64 result.  Outputs of the launchers are poisoned (NaN-filled
``out=`` buffers) so an unwritten element fails.  Without CUDA the kernels run under the Triton
interpreter (fp16/fp32, small shapes); the ``gpu`` tests (bf16, the real [32, 1024, 32000] and
[4, 1024, 128256] sizes) run with ``pytest -m gpu``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import lora_kernels.triton.cross_entropy as ce_kernels  # noqa: E402
from lora_kernels.model_ops.cross_entropy import (  # noqa: E402
    CrossEntropyFunction,
    causal_lm_loss,
    causal_lm_loss_reference,
    cross_entropy,
    cross_entropy_reference,
)
from lora_kernels.triton.cross_entropy import cross_entropy_backward, cross_entropy_forward  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"               # where the non-parametrized tests run
NAN = float("nan")
IGN = -100

CPU_DTYPES = [torch.float16, torch.float32]          # the interpreter gets bf16 wrong


def _devices_dtypes():
    """(device, dtype) cases: CPU interpreter fp16/fp32, GPU bf16/fp16/fp32 (gpu-marked)."""
    cases = [pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}") for dt in CPU_DTYPES]
    cases += [pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=pytest.mark.gpu)
              for dt in (torch.bfloat16, torch.float16, torch.float32)]
    return cases


def _dev(device):
    # the "cpu" cases run on the GPU where there is one (the interpreter is only set up without CUDA)
    return "cuda" if HAS_CUDA else device


def _logits(shape, dtype, g, device, scale=3.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype=dtype, device=device)


def _targets(shape, V, g, device, ignore_frac=0.2, ignore_index=IGN):
    t = torch.randint(0, V, shape, generator=g)
    t[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    return t.to(device)


def _maxerr(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _grad_of(fn, logits, grad_out):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x)
    loss.backward(grad_out.to(loss.dtype))
    return loss.detach(), x.grad


def _check_vs_float64(fn, logits, grad_out, msg, loss_slack=1e-6):
    """got = fn(logits); ref = the same math by the reference in fp32; want = reference in float64."""
    got, got_grad = _grad_of(lambda x: fn(x, False), logits, grad_out)
    ref, ref_grad = _grad_of(lambda x: fn(x, True), logits, grad_out)
    want, want_grad = _grad_of(lambda x: fn(x, True), logits.double(), grad_out)
    assert got.dtype == ref.dtype and got.shape == ref.shape == torch.Size([]), msg
    assert got_grad.dtype == logits.dtype and got_grad.shape == logits.shape, msg
    if math.isnan(want.item()):
        assert math.isnan(got.item()), f"{msg}: loss {got.item()} want NaN"
    else:
        err, ref_err = abs(got.item() - want.item()), abs(ref.item() - want.item())
        assert err <= 2 * ref_err + loss_slack * max(1.0, abs(want.item())), \
            f"{msg}: loss {got.item()} want {want.item()} err {err:.3g} (reference err {ref_err:.3g})"
    assert torch.isfinite(got_grad).all(), msg
    g_err, g_ref_err = _maxerr(got_grad, want_grad), _maxerr(ref_grad, want_grad)
    slack = 2.0**-20 * want_grad.abs().max().item() if want_grad.numel() else 0.0
    assert g_err <= 2 * g_ref_err + slack, f"{msg}: grad err {g_err:.3g} (reference err {g_ref_err:.3g})"
    return got, got_grad


# =============================================================================================
# 2-D core vs float64
# =============================================================================================
@pytest.mark.parametrize("device,dtype", _devices_dtypes())
@pytest.mark.parametrize("T,V", [(1, 1), (7, 37), (33, 1000), (3, 5003)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_matches_float64(device, dtype, T, V, reduction, rng):
    device = _dev(device)
    logits = _logits((T, V), dtype, rng, device)
    target = _targets((T,), V, rng, device)
    target[0] = torch.randint(0, V, (), generator=rng).item()      # at least one counted row
    grad_out = torch.randn((), generator=rng).to(device)

    def fn(x, reference):
        f = cross_entropy_reference if reference else cross_entropy
        return f(x, target, IGN, reduction)

    _check_vs_float64(fn, logits, grad_out, f"{device} {dtype} T={T} V={V} {reduction}")


@pytest.mark.parametrize("device,dtype", _devices_dtypes())
def test_launchers_poisoned_outputs_multi_chunk(device, dtype, rng):
    """Every output element is written (NaN-poisoned buffers); several chunks per row (block_v=16),
    a ragged last chunk (V=37), ignored rows (zeros), a row whose first chunks are -inf."""
    device = _dev(device)
    T, V = 11, 37
    logits = _logits((T, V), dtype, rng, device)
    logits[1, :21] = float("-inf")                    # two whole leading chunks of -inf, target after
    target = _targets((T,), V, rng, device, ignore_frac=0.3)
    target[1] = 30
    target[2] = IGN
    for block_v in (16, 64):
        row_loss = torch.full((T,), NAN, device=device)
        lse = torch.full((T,), NAN, device=device)
        got_loss, got_lse = cross_entropy_forward(logits, target, IGN, row_loss_out=row_loss, lse_out=lse,
                                                  block_v=block_v)
        assert got_loss is row_loss and got_lse is lse
        x64 = logits.double()
        keep = target != IGN
        want_lse = torch.logsumexp(x64, dim=1)
        want_loss = F.cross_entropy(x64, target, ignore_index=IGN, reduction="none")
        ref_loss = F.cross_entropy(logits.float(), target, ignore_index=IGN, reduction="none")
        assert torch.equal(row_loss[~keep], torch.zeros_like(row_loss[~keep]))
        assert torch.equal(lse[~keep], torch.zeros_like(lse[~keep]))
        assert torch.isfinite(row_loss).all() and torch.isfinite(lse).all()
        tol = 2 * _maxerr(ref_loss, want_loss) + 1e-6 * want_loss.abs().max().item()
        assert _maxerr(row_loss, want_loss) <= tol, f"block_v={block_v}"
        assert _maxerr(lse[keep], want_lse[keep]) <= 2e-6 * want_lse[keep].abs().max().item() + 1e-6

        scale = torch.tensor(0.37, device=device)
        grad = torch.full((T, V), NAN, dtype=dtype, device=device)
        got = cross_entropy_backward(logits, target, lse, scale, IGN, out=grad, block_v=block_v)
        assert got is grad
        x = x64.detach().clone().requires_grad_(True)
        F.cross_entropy(x, target, ignore_index=IGN, reduction="sum").mul(0.37).backward()
        xr = logits.float().detach().clone().requires_grad_(True)
        F.cross_entropy(xr, target, ignore_index=IGN, reduction="sum").mul(0.37).backward()
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))
        assert torch.equal(grad[1, :21], torch.zeros_like(grad[1, :21]))
        g_tol = 2 * _maxerr(xr.grad.to(dtype), x.grad) + 2.0**-20
        assert _maxerr(grad, x.grad) <= g_tol, f"block_v={block_v}"


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_row_stride_int32_and_noncontiguous(dtype, rng):
    """Row stride > V with an odd offset, int32 targets, and a last dim without unit stride."""
    T, V = 9, 101
    base = _logits((T, V + 13), dtype, rng, DEVICE)
    target = _targets((T,), V, rng, DEVICE)
    grad_out = torch.randn((), generator=rng).to(DEVICE)

    def on_slice(x, reference):
        # the gradient of the slice flows into a padded base tensor
        big = torch.zeros(T, V + 13, dtype=x.dtype, device=x.device)
        big = big + F.pad(x, (3, 10))
        view = big[:, 3:3 + V]
        assert view.stride(0) == V + 13
        return (cross_entropy_reference if reference else cross_entropy)(view, target.int(), IGN)

    _check_vs_float64(on_slice, base[:, 3:3 + V].contiguous(), grad_out, f"{dtype} strided")

    def on_transposed(x, reference):
        xt = x.t().contiguous().t()                    # same values, column-major: stride(1) != 1
        assert xt.stride(1) != 1
        return (cross_entropy_reference if reference else cross_entropy)(xt, target, IGN, "sum")

    _check_vs_float64(on_transposed, base[:, :V].contiguous(), grad_out, f"{dtype} transposed")

    # the launcher itself reads a strided view in place (no copy), int32 targets
    view = base[:, 3:3 + V]
    row_loss, _ = cross_entropy_forward(view, target.int(), IGN)
    want = F.cross_entropy(view.double(), target, ignore_index=IGN, reduction="none")
    ref = F.cross_entropy(view.float(), target, ignore_index=IGN, reduction="none")
    assert _maxerr(row_loss, want) <= 2 * _maxerr(ref, want) + 1e-6 * want.abs().max().item()


@pytest.mark.parametrize("ignore_index", [-100, 0, 5])
def test_ignore_index_values(ignore_index, rng):
    T, V = 13, 11
    logits = _logits((T, V), torch.float32, rng, DEVICE)
    target = _targets((T,), V, rng, DEVICE, ignore_frac=0.3, ignore_index=ignore_index)
    grad_out = torch.randn((), generator=rng).to(DEVICE)
    for reduction in ("mean", "sum"):
        def fn(x, reference):
            return (cross_entropy_reference if reference else cross_entropy)(x, target, ignore_index, reduction)
        _check_vs_float64(fn, logits, grad_out, f"ignore_index={ignore_index} {reduction}")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_all_rows_ignored(dtype, rng):
    T, V = 6, 37
    logits = _logits((T, V), dtype, rng, DEVICE).requires_grad_(True)
    target = torch.full((T,), IGN, device=DEVICE)
    for reduction, want in (("mean", NAN), ("sum", 0.0)):
        logits.grad = None
        loss = cross_entropy(logits, target, reduction=reduction)
        ref = F.cross_entropy(logits.detach().float(), target, reduction=reduction)
        assert loss.dtype == torch.float32
        if math.isnan(want):
            assert math.isnan(loss.item()) and math.isnan(ref.item())
        else:
            assert loss.item() == want == ref.item()
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits)), reduction


def test_out_of_range_target_gives_nan(rng):
    """A target neither ignore_index nor in [0, V) gives NaN for its row (loss and gradient), reads
    nothing out of bounds, and leaves every other row exact."""
    T, V = 8, 37
    logits = _logits((T, V), torch.float32, rng, DEVICE)
    target = _targets((T,), V, rng, DEVICE, ignore_frac=0.0)
    bad = torch.tensor([2, 5])
    target[2], target[5] = V, -7
    good = torch.ones(T, dtype=torch.bool)
    good[bad] = False
    row_loss, lse = cross_entropy_forward(logits, target)
    assert torch.isnan(row_loss[bad]).all() and torch.isfinite(row_loss[good]).all()
    want = F.cross_entropy(logits[good].double(), target[good], reduction="none")
    assert _maxerr(row_loss[good], want) <= 1e-5
    grad = cross_entropy_backward(logits, target, lse, torch.tensor(1.0, device=DEVICE))
    assert torch.isnan(grad[bad]).all() and torch.isfinite(grad[good]).all()
    x = logits[good].double().requires_grad_(True)
    F.cross_entropy(x, target[good], reduction="sum").backward()
    assert _maxerr(grad[good], x.grad) <= 1e-6
    x = logits.clone().requires_grad_(True)
    assert math.isnan(cross_entropy(x, target).item())
    assert math.isnan(cross_entropy(x, target, reduction="sum").item())


# =============================================================================================
# The causal-LM drop-in
# =============================================================================================
def _transformers_loss():
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    return loss_utils.ForCausalLMLoss


@pytest.mark.parametrize("device,dtype", _devices_dtypes())
@pytest.mark.parametrize("shape", [(2, 9, 37), (3, 2, 5, 64)], ids=["3d", "4d"])
@pytest.mark.parametrize("num_items", [None, "int", "tensor"])
def test_causal_lm_loss_matches_float64(device, dtype, shape, num_items, rng):
    device = _dev(device)
    V = shape[-1]
    logits = _logits(shape, dtype, rng, device)
    labels = _targets(shape[:-1], V, rng, device, ignore_frac=0.1)
    n_valid = int((labels[..., 1:] != IGN).sum())
    n = {None: None, "int": n_valid + 3, "tensor": torch.tensor(n_valid + 3, device=device)}[num_items]
    grad_out = torch.randn((), generator=rng).to(device)

    def fn(x, reference):
        f = causal_lm_loss_reference if reference else causal_lm_loss
        return f(x, labels, V, num_items_in_batch=n, some_extra_kwarg=1)

    got, _ = _check_vs_float64(fn, logits, grad_out, f"{device} {dtype} {shape} num_items={num_items}")
    # the reference is transformers' function, bit for bit
    ForCausalLMLoss = _transformers_loss()
    assert torch.equal(causal_lm_loss_reference(logits, labels, V, n), ForCausalLMLoss(logits, labels, V, n))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_causal_lm_loss_shift_labels_and_int32(dtype, rng):
    B, S, V = 2, 7, 53
    logits = _logits((B, S, V), dtype, rng, DEVICE)
    shift_labels = _targets((B, S), V, rng, DEVICE)
    grad_out = torch.randn((), generator=rng).to(DEVICE)

    def fn(x, reference):
        if reference:
            return causal_lm_loss_reference(x, None, V, shift_labels=shift_labels)
        return causal_lm_loss(x, None, V, shift_labels=shift_labels.int())

    _check_vs_float64(fn, logits, grad_out, f"{dtype} shift_labels")
    ForCausalLMLoss = _transformers_loss()
    assert torch.equal(causal_lm_loss_reference(logits, None, V, shift_labels=shift_labels),
                       ForCausalLMLoss(logits, None, V, shift_labels=shift_labels))


def test_num_items_tensor_promotion(rng):
    """Division by num_items_in_batch follows torch's promotion exactly as transformers does."""
    logits = _logits((2, 5, 17), torch.float32, rng, DEVICE)
    labels = _targets((2, 5), 17, rng, DEVICE)
    for n in (7, 7.5, torch.tensor(7), torch.tensor(7.0, dtype=torch.float64, device=DEVICE), torch.tensor([7])):
        got = causal_lm_loss(logits, labels, 17, num_items_in_batch=n)
        ref = causal_lm_loss_reference(logits, labels, 17, num_items_in_batch=n)
        assert got.dtype == ref.dtype and got.shape == ref.shape, repr(n)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_empty_input():
    for dtype in CPU_DTYPES:
        logits = torch.zeros((0, 37), dtype=dtype, device=DEVICE, requires_grad=True)
        target = torch.zeros((0,), dtype=torch.int64, device=DEVICE)
        loss = cross_entropy(logits, target)
        assert loss.shape == () and math.isnan(loss.item())
        loss = cross_entropy(logits, target, reduction="sum")
        assert loss.item() == 0.0
        loss.backward()
        assert logits.grad.shape == (0, 37) and logits.grad.dtype == dtype
        row_loss, lse = cross_entropy_forward(logits.detach(), target)
        assert row_loss.shape == (0,) and lse.shape == (0,)
        assert cross_entropy_backward(logits.detach(), target, lse, torch.tensor(1.0, device=DEVICE)).shape == (0, 37)
        # no tokens in the sequence: nothing to predict, NaN like transformers
        lg = torch.zeros((2, 0, 37), dtype=dtype, device=DEVICE, requires_grad=True)
        lab = torch.zeros((2, 0), dtype=torch.int64, device=DEVICE)
        assert math.isnan(causal_lm_loss(lg, lab, 37).item())
        assert math.isnan(_transformers_loss()(lg, lab, 37).item())


# =============================================================================================
# Autograd plumbing
# =============================================================================================
def test_gradcheck_reference_float64(rng):
    logits = _logits((2, 4, 7), torch.float64, rng, DEVICE).requires_grad_(True)
    labels = _targets((2, 4), 7, rng, DEVICE, ignore_frac=0.25)
    labels[0, 0] = 3
    assert torch.autograd.gradcheck(lambda x: causal_lm_loss_reference(x, labels, 7), (logits,))
    assert torch.autograd.gradcheck(lambda x: causal_lm_loss_reference(x, labels, 7, num_items_in_batch=5),
                                    (logits,))
    # the public functions route float64 to the reference
    assert torch.autograd.gradcheck(lambda x: causal_lm_loss(x, labels, 7), (logits,))
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x.view(-1, 7), labels.view(-1), reduction="sum"),
                                    (logits,))
    assert causal_lm_loss(logits, labels, 7).dtype == torch.float64


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_under_checkpoint(use_reentrant, rng):
    """Recomputed inside torch.utils.checkpoint: same loss and the same gradients."""
    B, S, D, V = 2, 6, 8, 45
    h = torch.randn(B, S, D, generator=rng).to(DEVICE).requires_grad_(True)
    w = torch.randn(V, D, generator=rng).to(DEVICE).requires_grad_(True)
    labels = _targets((B, S), V, rng, DEVICE)

    def head(h, w):
        return causal_lm_loss(F.linear(h, w).half(), labels, V)

    loss = head(h, w)
    loss.backward()
    want = (loss.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    loss = torch.utils.checkpoint.checkpoint(head, h, w, use_reentrant=use_reentrant)
    loss.backward()
    assert torch.equal(loss.detach(), want[0])
    assert torch.equal(h.grad, want[1]) and torch.equal(w.grad, want[2])


def test_saves_logits_without_copy_and_leaves_them_alone(rng):
    T, V = 5, 37
    logits = _logits((T, V), torch.float16, rng, DEVICE).requires_grad_(True)
    before = logits.detach().clone()
    target = _targets((T,), V, rng, DEVICE)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = cross_entropy(logits, target)
    assert any(t.data_ptr() == logits.data_ptr() and t.dtype == logits.dtype for t in saved)
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != logits.data_ptr())
    assert extra <= T * (8 + 4) + 8                    # target, lse [T] fp32, the row count
    loss.backward()
    assert torch.equal(logits.detach(), before)
    assert logits.grad.data_ptr() != logits.data_ptr()


def test_reference_env_dispatch(monkeypatch, rng):
    """LORA_KERNELS_MODEL_OPS=reference runs the reference: no launch, results identical."""
    logits = _logits((2, 5, 17), torch.float16, rng, DEVICE)
    labels = _targets((2, 5), 17, rng, DEVICE)
    monkeypatch.setenv("LORA_KERNELS_MODEL_OPS", "reference")
    monkeypatch.setattr(ce_kernels, "_launch_forward", _no_launch)
    assert torch.equal(causal_lm_loss(logits, labels, 17), causal_lm_loss_reference(logits, labels, 17))
    assert torch.equal(cross_entropy(logits.view(-1, 17), labels.view(-1)),
                       cross_entropy_reference(logits.view(-1, 17), labels.view(-1)))


def test_function_directly(rng):
    T, V = 4, 29
    logits = _logits((T, V), torch.float32, rng, DEVICE).requires_grad_(True)
    target = _targets((T,), V, rng, DEVICE, ignore_frac=0.0)
    loss = CrossEntropyFunction.apply(logits, target, IGN, False)
    want = F.cross_entropy(logits.detach().double(), target, reduction="sum")
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())


# =============================================================================================
# Bad inputs: each error before any launch
# =============================================================================================
def _no_launch(*args, **kwargs):
    raise AssertionError("a kernel was launched")


@pytest.fixture
def no_launch(monkeypatch):
    monkeypatch.setattr(ce_kernels, "_launch_forward", _no_launch)
    monkeypatch.setattr(ce_kernels, "_launch_backward", _no_launch)


def test_bad_inputs_cross_entropy(no_launch):
    x = torch.randn(4, 7, dtype=torch.float16, device=DEVICE)
    t = torch.tensor([1, 2, IGN, 3], device=DEVICE)
    cases = [
        (TypeError, "logits must be a torch.Tensor", ([[1.0]], t), {}),
        (TypeError, "logits must be float32, bfloat16, float16 or float64", (x.int(), t), {}),
        (ValueError, r"logits must be 2-D \[T, V\]", (x.view(2, 2, 7), t), {}),
        (ValueError, "V >= 1", (torch.randn(4, 0, device=DEVICE), t), {}),
        (TypeError, "target must be a torch.Tensor", (x, [1, 2, 3, 4]), {}),
        (TypeError, "target must be int64 or int32", (x, t.float()), {}),
        (ValueError, r"target must have shape \[T=4\]", (x, t[:3]), {}),
        (ValueError, r"target must have shape \[T=4\]", (x, t.view(2, 2)), {}),
        (ValueError, "target is on meta but logits are on", (x, t.to("meta")), {}),
        (TypeError, "ignore_index must be an int", (x, t), dict(ignore_index=1.5)),
        (TypeError, "ignore_index must be an int", (x, t), dict(ignore_index=True)),
        (ValueError, "reduction must be 'mean' or 'sum'", (x, t), dict(reduction="none")),
        (TypeError, "num_items_in_batch must be None, an int or a 0-d tensor", (x, t),
         dict(reduction="sum", num_items_in_batch="7")),
        (ValueError, "num_items_in_batch must be a 0-d", (x, t),
         dict(reduction="sum", num_items_in_batch=torch.tensor([1, 2]))),
        (TypeError, "num_items_in_batch must be an integer or float tensor", (x, t),
         dict(reduction="sum", num_items_in_batch=torch.tensor(True))),
        (ValueError, "pass reduction='sum'", (x, t), dict(num_items_in_batch=3)),
    ]
    for exc, match, args, kwargs in cases:
        with pytest.raises(exc, match=match):
            cross_entropy(*args, **kwargs)


def test_bad_inputs_causal_lm_loss(no_launch):
    x = torch.randn(2, 3, 7, dtype=torch.float16, device=DEVICE)
    lab = torch.randint(0, 7, (2, 3), device=DEVICE)
    cases = [
        (TypeError, "logits must be a torch.Tensor", (None, lab, 7), {}),
        (TypeError, "logits must be float32", (x.long(), lab, 7), {}),
        (TypeError, "vocab_size must be an int", (x, lab, 7.0), {}),
        (ValueError, "at least 2 dims", (torch.randn(7), lab, 7), {}),
        (ValueError, "last dim must equal vocab_size=8", (x, lab, 8), {}),
        (TypeError, "labels must be a torch.Tensor", (x, None, 7), {}),
        (TypeError, "labels must be int64 or int32", (x, lab.float(), 7), {}),
        (ValueError, r"labels must have logits' leading shape \(2, 3\)", (x, lab[:, :2], 7), {}),
        (ValueError, "shift_labels must have 6 elements", (x, None, 7), dict(shift_labels=lab[:, :2])),
        (TypeError, "shift_labels must be int64 or int32", (x, None, 7), dict(shift_labels=lab.short())),
        (TypeError, "ignore_index must be an int", (x, lab, 7), dict(ignore_index=None)),
        (TypeError, "num_items_in_batch must be None, an int", (x, lab, 7), dict(num_items_in_batch=[3])),
    ]
    for exc, match, args, kwargs in cases:
        with pytest.raises(exc, match=match):
            causal_lm_loss(*args, **kwargs)


def test_bad_inputs_launchers(no_launch):
    x = torch.randn(4, 7, dtype=torch.float16, device=DEVICE)
    t = torch.tensor([1, 2, IGN, 3], device=DEVICE)
    lse = torch.zeros(4, device=DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16"):
        cross_entropy_forward(x.double(), t)
    with pytest.raises(ValueError, match="last dim must have unit stride"):
        cross_entropy_forward(x.t().contiguous().t(), t)
    with pytest.raises(ValueError, match="target must be contiguous"):
        cross_entropy_forward(x, torch.arange(8, device=DEVICE)[::2])
    with pytest.raises(ValueError, match=r"row_loss_out must be a contiguous \[4\] float32"):
        cross_entropy_forward(x, t, row_loss_out=torch.zeros(4, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match=r"lse_out must be a contiguous \[4\] float32"):
        cross_entropy_forward(x, t, lse_out=torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="block_v must be a power of two"):
        cross_entropy_forward(x, t, block_v=24)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        cross_entropy_forward(x, t, num_warps=3)
    with pytest.raises(ValueError, match="scale must be a 1-element float32"):
        cross_entropy_backward(x, t, lse, one.double())
    with pytest.raises(ValueError, match=r"lse must be a contiguous \[4\] float32"):
        cross_entropy_backward(x, t, lse[:3], one)
    with pytest.raises(ValueError, match=r"out must be a contiguous \[4, 7\]"):
        cross_entropy_backward(x, t, lse, one, out=torch.zeros(4, 7, device=DEVICE))
    with pytest.raises(ValueError, match="out must not be the logits"):
        cross_entropy_backward(x, t, lse, one, out=x)


# =============================================================================================
# GPU: the real sizes (bf16), memory, chunked float64 ground truth
# =============================================================================================
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 1024, 32000), (4, 1024, 128256)], ids=["llama2-32k", "llama3-128k"])
def test_gpu_real_size_bf16(shape):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, S, V = shape
    logits = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g).mul_(2.0)
    logits.requires_grad_(True)
    labels = torch.randint(0, V, (B, S), device="cuda", generator=g)
    labels[torch.rand((B, S), device="cuda", generator=g) < 0.05] = IGN
    logits_bytes = logits.numel() * logits.element_size()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = causal_lm_loss(logits, labels, V)
    torch.cuda.synchronize()
    fwd_extra = torch.cuda.max_memory_allocated() - base
    assert fwd_extra < 16 * 2**20, f"forward allocated {fwd_extra / 2**20:.1f} MiB"
    loss.backward()
    torch.cuda.synchronize()
    bwd_extra = torch.cuda.max_memory_allocated() - base
    assert bwd_extra < logits_bytes + 32 * 2**20, f"backward peak {bwd_extra / 2**30:.2f} GiB"
    grad = logits.grad.view(-1, V)
    assert grad.dtype == torch.bfloat16

    x2d = logits.detach().view(-1, V)
    target = F.pad(labels, (0, 1), value=IGN)[:, 1:].reshape(-1)
    count = (target != IGN).sum()
    rows = max(1, 2**25 // V)
    want_sum = torch.zeros((), dtype=torch.float64, device="cuda")
    ref_sum = torch.zeros((), dtype=torch.float32, device="cuda")
    g_err = g_ref_err = g_max = 0.0
    for r0 in range(0, x2d.shape[0], rows):
        x, t = x2d[r0:r0 + rows], target[r0:r0 + rows]
        x64 = x.double().requires_grad_(True)
        w = F.cross_entropy(x64, t, ignore_index=IGN, reduction="sum")
        (want_grad,) = torch.autograd.grad(w / count, x64)
        want_sum += w.detach()
        xr = x.float().requires_grad_(True)
        r = F.cross_entropy(xr, t, ignore_index=IGN, reduction="sum")
        (ref_grad,) = torch.autograd.grad(r / count, xr)
        ref_sum += r.detach()
        g_err = max(g_err, _maxerr(grad[r0:r0 + rows], want_grad))
        g_ref_err = max(g_ref_err, _maxerr(ref_grad.to(torch.bfloat16), want_grad))
        g_max = max(g_max, want_grad.abs().max().item())
        del x64, want_grad, xr, ref_grad
    want = (want_sum / count).item()
    ref = (ref_sum / count).item()
    err, ref_err = abs(loss.item() - want), abs(ref - want)
    assert err <= 2 * ref_err + 1e-6 * abs(want), f"seed={seed} loss {loss.item()} want {want} ref {ref}"
    assert g_err <= 2 * g_ref_err + 2.0**-20 * g_max, f"seed={seed} grad err {g_err} ref err {g_ref_err}"
