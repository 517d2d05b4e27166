"""LoRALinear / QLoRALinear (lora_kernels.lora_modules): forward and gradients against the
reference, constructors, merge/unmerge, adapter and module state dicts, device moves, errors."""

import math

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.lora_modules import LoRALinear, QLoRALinear
from lora_kernels.reference import lora_linear_reference

from .conftest import randn

KINDS = ["lora", "qlora"]


def _seed(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))


def _make(kind, N=48, K=96, r=4, alpha=8.0, dtype=torch.float32, bias=True, rng=None, **kw):
    """A layer with random B (so the LoRA term is not zero) and its dense base weight."""
    lin = nn.Linear(K, N, bias=bias).to(dtype)
    if kind == "lora":
        layer = LoRALinear(lin.weight, lin.bias, r, alpha, init_lora_weights=False, **kw)
        return layer, layer.weight.detach()
    q = lk.quantize_nf4(lin.weight.detach())
    layer = QLoRALinear(q, lin.bias, r, alpha, init_lora_weights=False, **kw)
    return layer, q.dequantize()


def _tol(x, w, a, b, s, bias, dtype):
    """(reference in fp32, tolerance) -- 2x plain PyTorch's error in the low precision."""
    ref = lora_linear_reference(x.double(), w.double(), a.double(), b.double(),
                                s.double() if isinstance(s, torch.Tensor) else s,
                                None if bias is None else bias.double(), compute_dtype=torch.float64)
    plain = lora_linear_reference(x, w, a, b, s, bias, compute_dtype=dtype)
    return ref, max(2 * (plain.double() - ref).abs().max().item(), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_reference(kind, bias, dtype, rng):
    _seed(rng)
    layer, w = _make(kind, dtype=dtype, bias=bias)
    x = randn((2, 5, 96), dtype, rng)
    y = layer(x)
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    ref, tol = _tol(x, w, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling,
                    None if layer.bias is None else layer.bias.detach(), dtype)
    assert (y.double() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_flow_to_adapters_only(kind, rng):
    _seed(rng)
    layer, w = _make(kind)
    layer.train()
    x = randn((7, 96), torch.float32, rng).requires_grad_(True)
    dy = randn((7, 48), torch.float32, rng)
    layer(x).backward(dy)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert layer.bias.grad is None
    if kind == "lora":
        assert layer.weight.grad is None and not layer.weight.requires_grad

    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    lora_linear_reference(xr, w, a, b, layer.scaling, layer.bias.detach()).backward(dy)
    for got, want in ((layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad), (x.grad, xr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_default_init_starts_at_base(rng):
    _seed(rng)
    lin = nn.Linear(64, 32)
    x = randn((4, 64), torch.float32, rng)
    layer = LoRALinear.from_linear(lin, r=8, lora_alpha=16)
    assert torch.equal(layer.lora_B, torch.zeros(32, 8)) and layer.lora_A.abs().max() > 0
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(64) + 1e-6  # kaiming-uniform(a=sqrt(5)) bound
    assert layer.weight.data_ptr() == lin.weight.data_ptr()  # shared storage, no copy
    assert not layer.weight.requires_grad and lin.weight.requires_grad
    torch.testing.assert_close(layer(x), lin(x))

    q = QLoRALinear.from_linear(lin, r=8, lora_alpha=16, blocksize=128, double_quant=False)
    assert q.weight.blocksize == 128 and not q.weight.double_quant
    assert q.lora_A.dtype == torch.float32 and torch.equal(q.lora_B, torch.zeros(32, 8))
    torch.testing.assert_close(q(x), nn.functional.linear(x, q.weight.dequantize(), lin.bias))
    q2 = QLoRALinear.from_linear(lin.to(torch.float16), r=2, lora_alpha=4)
    assert q2.weight.double_quant and q2.weight.dtype == torch.float16 and q2.lora_A.dtype == torch.float16


@pytest.mark.parametrize("kind", KINDS)
def test_passed_parameters_are_held_as_is(kind, rng):
    _seed(rng)
    lin = nn.Linear(40, 24)
    A, B = nn.Parameter(torch.randn(6, 40)), nn.Parameter(torch.randn(24, 6))
    w = lin.weight if kind == "lora" else lk.quantize_nf4(lin.weight.detach())
    cls = LoRALinear if kind == "lora" else QLoRALinear
    layer = cls(w, lin.bias, 6, 12.0, lora_A=A, lora_B=B)
    assert layer.lora_A is A and layer.lora_B is B
    assert layer.r == 6 and layer.in_features == 40 and layer.out_features == 24
    layer.to("cpu")
    assert layer.lora_A is A
    with pytest.raises(ValueError, match=r"lora_A must be \[6, 40\].*got \[5, 40\]"):
        cls(w, lin.bias, 6, 12.0, lora_A=nn.Parameter(torch.randn(5, 40)))
    with pytest.raises(ValueError, match=r"lora_B must be \[24, 6\]"):
        cls(w, lin.bias, 6, 12.0, lora_B=nn.Parameter(torch.randn(6, 24)))
    with pytest.raises(TypeError, match="nn.Parameter"):
        cls(w, lin.bias, 6, 12.0, lora_A=torch.randn(6, 40))


def test_rslora_scaling(rng):
    _seed(rng)
    layer, w = _make("lora", r=16, alpha=8.0, use_rslora=True)
    assert layer.scaling == pytest.approx(8.0 / 4.0)
    assert _make("lora", r=16, alpha=8.0)[0].scaling == pytest.approx(0.5)
    x = randn((3, 96), torch.float32, rng)
    ref = lora_linear_reference(x, w, layer.lora_A.detach(), layer.lora_B.detach(), 2.0, layer.bias.detach())
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_adalora_vector_scale(kind, rng):
    _seed(rng)
    layer, w = _make(kind, r=4, alpha=8.0)
    layer.lora_E = nn.Parameter(torch.randn(4, 1))  # PEFT's AdaLoRA shape [r, 1]
    assert "lora_E" in dict(layer.named_parameters())
    x = randn((5, 96), torch.float32, rng)
    s = layer.lora_E.detach().reshape(-1) * layer.scaling
    ref = lora_linear_reference(x, w, layer.lora_A.detach(), layer.lora_B.detach(), s, layer.bias.detach())
    y = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.lora_E.grad is not None and layer.lora_E.grad.shape == (4, 1)
    # merged_weight uses the vector scale too
    torch.testing.assert_close(nn.functional.linear(x, layer.merged_weight(torch.float32), layer.bias), ref,
                               rtol=1e-4, atol=1e-4)
    assert set(layer.adapter_state_dict()) == {"lora_A.weight", "lora_B.weight", "lora_E"}
    assert layer.num_adapter_params() == 4 * 96 + 48 * 4 + 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_merge_unmerge(dtype, rng):
    _seed(rng)
    layer, _ = _make("lora", dtype=dtype)
    w0 = layer.weight.detach().clone()
    exact = layer.merged_weight(torch.float32)
    ref_w = (w0.float() + layer.scaling * layer.lora_B.detach().float() @ layer.lora_A.detach().float())
    torch.testing.assert_close(exact, ref_w, rtol=1e-6, atol=1e-6)
    x = randn((3, 96), torch.float32, rng).to(dtype)
    y = layer(x)
    assert layer.merge() is None and layer.merged
    assert torch.equal(layer.weight.detach(), ref_w.to(dtype))
    atol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(layer(x).float(), y.float(), rtol=0, atol=atol)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    ulp = torch.finfo(dtype).eps * w0.float().abs().clamp(min=ref_w.abs().max().item())
    assert ((layer.weight.float() - w0.float()).abs() <= 2 * ulp).all()
    if dtype == torch.float32:
        torch.testing.assert_close(layer.weight.detach(), w0, rtol=0, atol=1e-6)


def test_qlora_merge_unmerge(rng):
    _seed(rng)
    layer, w = _make("qlora", N=64, K=128, alpha=4.0)
    with torch.no_grad():
        layer.lora_B.mul_(0.05)
    before = {k: v.clone() for k, v in layer.weight.tensors().items()}
    x = randn((6, 128), torch.float32, rng)
    y = layer(x)
    info = layer.merge()
    assert layer.merged and set(info) == {"rel_error", "max_abs_error", "delta_rel_error"}
    assert 0 < info["rel_error"] < 0.12  # one NF4 rounding of the merged weight
    exact = w.float() + layer._delta()
    err = (layer.weight.dequantize(torch.float32) - exact).norm() / exact.norm()
    assert info["rel_error"] == pytest.approx(err.item(), rel=1e-5)
    assert layer.weight.double_quant and layer.weight.blocksize == 64
    # merged forward = base alone, on the re-quantized weight
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight.dequantize(), layer.bias))
    # merged_weight is the exact merge whether merged or not
    torch.testing.assert_close(layer.merged_weight(torch.float32), exact)
    layer.unmerge()
    assert not layer.merged
    assert all(torch.equal(before[k], v) for k, v in layer.weight.tensors().items())
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_state_dict_roundtrip_and_errors(kind, rng):
    _seed(rng)
    src, _ = _make(kind, r=4)
    dst, _ = _make(kind, r=4)
    sd = src.adapter_state_dict(prefix="model.q.")
    assert set(sd) == {"model.q.lora_A.weight", "model.q.lora_B.weight"}
    A_obj = dst.lora_A
    dst.load_adapter_state_dict(sd, prefix="model.q.")
    assert dst.lora_A is A_obj
    assert torch.equal(dst.lora_A, src.lora_A) and torch.equal(dst.lora_B, src.lora_B)

    other, _ = _make(kind, r=8)
    with pytest.raises(ValueError, match=r"lora_A.weight: shape \[8, 96\] in the state dict, \[4, 96\] in the "
                                         r"layer \(rank 8 in the state dict, r=4 in the layer\)"):
        dst.load_adapter_state_dict(other.adapter_state_dict())
    bad = dict(src.adapter_state_dict())
    bad["lora_B.weight"] = torch.zeros(47, 4)
    with pytest.raises(ValueError, match=r"lora_B.weight: shape \[47, 4\].*\[48, 4\]"):
        dst.load_adapter_state_dict(bad)
    with pytest.raises(KeyError, match="lora_B.weight"):
        dst.load_adapter_state_dict({"lora_A.weight": src.lora_A.detach()})
    with pytest.raises(ValueError, match="unexpected adapter keys"):
        dst.load_adapter_state_dict({**src.adapter_state_dict(), "lora_C.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no lora_E"):
        dst.load_adapter_state_dict({**src.adapter_state_dict(), "lora_E": torch.zeros(4)})
    assert torch.equal(dst.lora_A, src.lora_A)  # failed loads changed nothing

    assert dst.num_adapter_params() == 4 * 96 + 48 * 4
    assert dst.adapter_nbytes() == 4 * dst.num_adapter_params()


@pytest.mark.parametrize("kind", KINDS)
def test_module_state_dict_roundtrip(kind, rng):
    _seed(rng)
    src, _ = _make(kind)
    dst, _ = _make(kind)
    sd = src.state_dict()
    if kind == "qlora":
        assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                           "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
                           "bias", "lora_A", "lora_B"}
    else:
        assert set(sd) == {"weight", "bias", "lora_A", "lora_B"}
    dst.load_state_dict(sd)
    x = randn((3, 96), torch.float32, rng)
    assert torch.equal(dst(x), src(x))
    # nested in a model, with a prefix
    m_src, m_dst = nn.Sequential(src), nn.Sequential(dst)
    assert "0.lora_A" in m_src.state_dict()
    m_dst.load_state_dict(m_src.state_dict())
    if kind == "qlora":
        missing = {k: v for k, v in sd.items() if not k.startswith("weight")}
        with pytest.raises(RuntimeError, match="weight.quant_state"):
            dst.load_state_dict(missing)
        wrong = _make(kind, N=40)[0].state_dict()
        with pytest.raises(RuntimeError, match=r"shape \(40, 96\) in the checkpoint"):
            dst.load_state_dict(wrong)


@pytest.mark.usefixtures("no_dynamo")
def test_from_bnb_linear4bit(rng):
    bnb = pytest.importorskip("bitsandbytes")
    _seed(rng)
    theirs = bnb.nn.Linear4bit(96, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                               compress_statistics=True)
    with pytest.raises(lk.NF4FormatError, match="not quantized yet"):
        QLoRALinear.from_bnb(theirs, r=4, lora_alpha=8)
    theirs = theirs.to("cpu")  # bitsandbytes quantizes on the move (its CPU backend)
    layer = QLoRALinear.from_bnb(theirs, r=4, lora_alpha=8)
    assert layer.weight.double_quant and layer.compute_dtype == torch.float32
    assert layer.weight.packed.data_ptr() == theirs.weight.data.data_ptr()  # shared, not copied
    x = randn((5, 96), torch.float32, rng)
    torch.testing.assert_close(layer(x), theirs(x), rtol=1e-5, atol=1e-5)  # B = 0: the base alone
    w = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(layer.weight.dequantize(), w)

    fp4 = bnb.nn.Linear4bit(96, 48, quant_type="fp4").to("cpu")
    with pytest.raises(lk.NF4FormatError, match="only nf4"):
        QLoRALinear.from_bnb(fp4, r=4, lora_alpha=8)
    with pytest.raises(TypeError, match="from_linear"):
        QLoRALinear.from_bnb(nn.Linear(96, 48), r=4, lora_alpha=8)


def test_compute_dtype_casts_input(rng):
    _seed(rng)
    layer, w = _make("qlora", compute_dtype=torch.float16)
    assert layer.lora_A.dtype == torch.float16
    x = randn((3, 96), torch.float32, rng)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = lora_linear_reference(x, w, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling,
                                layer.bias.detach(), compute_dtype=torch.float16)
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


def test_device_and_dtype_moves_keep_nf4_format():
    layer = QLoRALinear.from_linear(nn.Linear(64, 32), r=4, lora_alpha=8)
    A = layer.lora_A
    layer.half()
    w = layer.weight
    assert w.packed.dtype == torch.uint8 and w.absmax.dtype == torch.uint8
    assert w.nested_absmax.dtype == torch.float32 and w.code.dtype == torch.float32
    assert layer.bias.dtype == torch.float16 and layer.lora_A.dtype == torch.float16 and layer.lora_A is A
    layer.to("cpu")
    assert layer.weight.device.type == "cpu"
    layer.merge()
    layer.to(torch.float32)
    assert layer._unmerged_weight.packed.dtype == torch.uint8


def test_dropout_train_vs_eval(rng):
    _seed(rng)
    layer, w = _make("lora", lora_dropout=0.5)
    assert layer.lora_dropout == 0.5
    x = randn((8, 96), torch.float32, rng)
    ref = lora_linear_reference(x, w, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling,
                                layer.bias.detach())
    layer.eval()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_repr(kind):
    layer, _ = _make(kind, r=4, alpha=8.0)
    s = repr(layer)
    for part in ("in_features=96", "out_features=48", "r=4", "lora_alpha=8.0", "scaling=2",
                 "lora_dropout=0.0", "use_rslora=False", "merged=False"):
        assert part in s, (part, s)
    assert ("bits/param" in s) == (kind == "qlora")


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs(kind):
    layer, _ = _make(kind)
    with pytest.raises(ValueError, match="x's last dim is 95, expected in_features=96"):
        layer(torch.randn(2, 95))
    with pytest.raises(ValueError, match="x is on meta but the weight is on cpu"):
        layer(torch.randn(2, 96, device="meta"))
    cls = LoRALinear if kind == "lora" else QLoRALinear
    w = torch.randn(8, 16) if kind == "lora" else lk.quantize_nf4(torch.randn(8, 16))
    with pytest.raises(ValueError, match="r must be a positive int"):
        cls(w, None, 0, 1.0)
    with pytest.raises(ValueError, match="lora_dropout"):
        cls(w, None, 2, 1.0, lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"bias must be \[N=8\]"):
        cls(w, torch.zeros(9), 2, 1.0)
    wrong = lk.quantize_nf4(torch.randn(8, 16)) if kind == "lora" else torch.randn(8, 16)
    with pytest.raises(TypeError, match="weight must be"):
        cls(wrong, None, 2, 1.0)
