"""Bad input gets a clear Python error naming the problem (or a documented, defined result)."""

import functools

import pytest
import torch

import lora_kernels as lk
from lora_kernels.nf4 import NF4FormatError

from .conftest import edit_quant_state, randn

BACKENDS = lk.available_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_rejected(backend, bad):
    w = torch.randn(4, 64)
    w[2, 3] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        lk.quantize_nf4(w, backend=backend)


def test_empty_and_wrong_dtype_and_blocksize():
    with pytest.raises(ValueError, match="empty"):
        lk.quantize_nf4(torch.empty(0, 64))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        lk.quantize_nf4(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        lk.quantize_nf4(torch.ones(4, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        lk.quantize_nf4([[1.0, 2.0]])
    for bs in (0, 16, 48, 100, 8192):
        with pytest.raises(ValueError, match="blocksize"):
            lk.quantize_nf4(torch.ones(4, 64), blocksize=bs)
    with pytest.raises(TypeError, match="quantize_model: model must be an nn.Module, got str"):
        lk.quantize_model("model", progress=False)
    with pytest.raises(TypeError, match="NF4Weight.to: takes a device, got the dtype torch.float16"):
        lk.quantize_nf4(torch.ones(4, 64)).to(torch.float16)


def test_wrong_device_rejected():
    with pytest.raises(ValueError, match="CPU or CUDA"):
        lk.quantize_nf4(torch.ones(4, 64, device="meta"))


def test_unknown_or_unavailable_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        lk.quantize_nf4(torch.ones(4, 64), backend="nope")
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        lk.quantize_nf4(torch.ones(4, 64), backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_weight_is_read_in_logical_order(backend, rng):
    w = randn((96, 64), torch.float32, rng)
    wt = w.t()  # non-contiguous view
    assert not wt.is_contiguous()
    a = lk.quantize_nf4(wt, backend=backend)
    b = lk.quantize_nf4(wt.contiguous(), backend="reference")
    assert a.shape == wt.shape
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)


def test_dequantize_bad_dtype_and_out():
    q = lk.quantize_nf4(torch.randn(8, 64))
    with pytest.raises(TypeError, match="dtype"):
        lk.dequantize_nf4(q, torch.int8)
    with pytest.raises(ValueError, match="out must be"):
        lk.dequantize_nf4(q, torch.float32, out=torch.empty(10))
    with pytest.raises(ValueError, match="out must be"):
        lk.dequantize_nf4(q, torch.float32, out=torch.empty(8 * 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        lk.dequantize_nf4(q, torch.float32, out=torch.empty(64, 16).t())
    with pytest.raises(TypeError, match="NF4Weight"):
        lk.dequantize_nf4(torch.randn(8, 64))


# ----------------------------------------------------------------------------- state dicts
def _sd():
    return lk.quantize_nf4(torch.randn(16, 128), 64, True).state_dict()


_with_meta = functools.partial(edit_quant_state, none_deletes=True)      # None: the field removed


@pytest.mark.parametrize("corrupt,match", [
    (lambda sd: sd.pop("weight"), "no 'weight'"),
    (lambda sd: sd.pop("weight.absmax"), "weight.absmax"),
    (lambda sd: sd.pop("weight.quant_state.bitsandbytes__nf4"), "quant_state"),
    (lambda sd: sd.pop("weight.nested_quant_map"), "nested_quant_map"),
    (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", torch.tensor([1, 2, 255], dtype=torch.uint8)), "JSON"),
    (lambda sd: _with_meta(sd, quant_type="fp4"), "nf4"),
    (lambda sd: _with_meta(sd, blocksize=48), "blocksize"),
    (lambda sd: _with_meta(sd, dtype="int8"), "dtype"),
    (lambda sd: _with_meta(sd, shape=[16, 127]), "packed must be"),
    (lambda sd: _with_meta(sd, shape="16x128"), "shape"),
    (lambda sd: _with_meta(sd, surprise=1), "unknown fields"),
    (lambda sd: _with_meta(sd, nested_offset=None), "nested_offset"),
    (lambda sd: _with_meta(sd, nested_blocksize=128), "nested_blocksize"),
    (lambda sd: sd.__setitem__("weight.absmax", sd["weight.absmax"][:-1]), "absmax must be"),
    (lambda sd: sd.__setitem__("weight.absmax", sd["weight.absmax"].float()), "absmax must be"),
    (lambda sd: sd.__setitem__("weight.nested_absmax", torch.ones(3)), "nested_absmax must be"),
    (lambda sd: sd.__setitem__("weight.quant_map", torch.linspace(-1, 1, 16)), "not the NF4 table"),
    (lambda sd: sd.__setitem__("weight.quant_map", torch.zeros(15)), "quant_map"),
    (lambda sd: sd.__setitem__("weight.nested_quant_map", torch.zeros(255)), "nested_quant_map"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_corrupted_state_dict(corrupt, match):
    sd = _sd()
    corrupt(sd)
    with pytest.raises(NF4FormatError, match=match):
        lk.NF4Weight.from_state_dict(sd)


def test_load_mismatched_shape_into_layer():
    layer = lk.NF4Linear(lk.quantize_nf4(torch.randn(16, 128)))
    other = lk.NF4Linear(lk.quantize_nf4(torch.randn(32, 64)))
    with pytest.raises(RuntimeError, match="shape"):
        layer.load_state_dict(other.state_dict())


def test_layer_input_checks():
    layer = lk.NF4Linear(lk.quantize_nf4(torch.randn(16, 128)))
    with pytest.raises(ValueError, match="in_features=128"):
        layer(torch.randn(3, 127))
    with pytest.raises(ValueError, match="2-D"):
        lk.NF4Linear(lk.quantize_nf4(torch.randn(4, 4, 64)))
