"""NF4Linear and quantize_model."""

import pytest
import torch
from torch import nn

import lora_kernels as lk

from .conftest import randn


def _tiny_model(dtype=torch.float32):
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(),
        nn.Sequential(nn.Linear(128, 96, bias=False), nn.ReLU()),
        nn.Linear(96, 64),
    ).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_matches_dequantized_linear(dtype, rng):
    dense = nn.Linear(96, 40).to(dtype)
    layer = lk.NF4Linear.from_linear(dense)
    x = randn((2, 5, 96), dtype, rng)
    w = layer.weight.dequantize()
    assert torch.equal(layer(x), nn.functional.linear(x, w, dense.bias))
    assert not layer.bias.requires_grad


def test_quantize_model_replaces_linears_and_tracks_output(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = _tiny_model()
    x = randn((4, 64), torch.float32, rng)
    y = model(x)
    converted = lk.quantize_model(model, progress=False)
    assert sorted(converted) == ["0", "2.0", "3"]
    assert all(isinstance(m, lk.NF4Linear) for m in converted.values())
    assert not any(type(m) is nn.Linear for m in model.modules())
    rel = ((model(x) - y).norm() / y.norm()).item()
    assert rel < 0.25, rel  # three NF4 layers deep


def test_quantize_model_skip_and_filter():
    model = _tiny_model()
    converted = lk.quantize_model(model, skip=("3",), filter_fn=lambda name, m: m.bias is not None,
                                  progress=False)
    assert sorted(converted) == ["0"]
    assert type(model[3]) is nn.Linear and type(model[2][0]) is nn.Linear


def test_quantize_model_progress_bar(capsys):
    lk.quantize_model(_tiny_model(), progress=True)
    assert "quantizing to NF4" in capsys.readouterr().err


def test_module_moves_keep_format_dtypes():
    model = _tiny_model()
    lk.quantize_model(model, progress=False)
    model.half()  # a dtype cast must not touch the fp32 scales or the packed bytes
    layer = model[0]
    assert layer.weight.nested_absmax.dtype == torch.float32 and layer.weight.packed.dtype == torch.uint8
    assert layer.bias.dtype == torch.float16
    model.to("cpu")
    assert layer.weight.device.type == "cpu"


def test_state_dict_roundtrip_through_model(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    a, b = _tiny_model(), _tiny_model()
    lk.quantize_model(a, progress=False)
    lk.quantize_model(b, progress=False)
    b.load_state_dict(a.state_dict())
    x = randn((3, 64), torch.float32, rng)
    assert torch.equal(a(x), b(x))
    assert "0.weight.quant_state.bitsandbytes__nf4" in a.state_dict()


def test_dense_weight_in_an_nf4_layers_state_dict_is_an_error(rng):
    """A dense ``weight`` (no quant_state entries) loaded into an NF4 layer is an error even with
    strict=False: never a silently kept old weight."""
    model = _tiny_model()
    dense_sd = {k: v.clone() for k, v in model.state_dict().items()}
    lk.quantize_model(model, progress=False)
    before = model[0].weight.packed.clone()
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"0\.weight: the state dict has a torch.float32 tensor of shape"):
            model.load_state_dict(dense_sd, strict=strict)
    assert torch.equal(model[0].weight.packed, before)
    missing = model.load_state_dict({}, strict=False).missing_keys   # no weight at all: just missing
    assert "0.weight.quant_state.bitsandbytes__nf4" in missing
