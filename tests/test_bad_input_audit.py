"""Bad inputs found by the session-20 audit of the public API (CPU): each used to return a silently
wrong result, corrupt state, or fail with an error that did not name the problem."""

import functools
import json
import os

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.lora_modules import LoRALinear
from lora_kernels.nf4 import NF4FormatError

from .conftest import edit_quant_state


class _Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.o, self.p = nn.Linear(64, 16), nn.Linear(16, 64), nn.Linear(64, 64)


def test_add_lora_takes_a_str_target_as_one_name():
    m = _Three()
    assert lk.add_lora(m, "q_proj", 4, 8) == ["q_proj"]
    assert isinstance(m.q_proj, LoRALinear) and type(m.o) is nn.Linear and type(m.p) is nn.Linear
    with pytest.raises(TypeError, match="target_modules must be a module name or an iterable of names"):
        lk.add_lora(_Three(), None, 4, 8)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lk.add_lora(None, ["q_proj"], 4, 8)


@pytest.mark.parametrize("kw", [dict(r=0, lora_alpha=8), dict(r=4, lora_alpha=8, lora_dropout=2.0),
                                dict(r=4, lora_alpha=float("nan"))])
def test_add_lora_bad_settings_leave_the_model_untouched(kw):
    m = _Three()
    with pytest.raises(ValueError):
        lk.add_lora(m, ["q_proj", "o"], **kw)
    assert all(p.requires_grad for p in m.parameters())
    assert type(m.q_proj) is nn.Linear and type(m.o) is nn.Linear


def test_quantize_model_takes_a_str_skip_as_one_pattern_and_converts_a_shared_layer_once():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.lm_head = nn.Linear(64, 64), nn.Linear(64, 64)
    m = M()
    assert sorted(lk.quantize_model(m, skip="lm_head", progress=False)) == ["a"]
    assert type(m.lm_head) is nn.Linear and isinstance(m.a, lk.NF4Linear)

    lin = nn.Linear(64, 64)
    seq = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(3, 64)
    assert list(lk.quantize_model(seq, progress=False)) == ["0"]
    assert seq[0] is seq[2] and isinstance(seq[2], lk.NF4Linear)
    assert seq(x).shape == (3, 64)
    # a shared layer skipped under any of its names stays dense at all of them
    lin2 = nn.Linear(64, 64)
    seq2 = nn.Sequential(lin2, nn.ReLU(), lin2)
    assert lk.quantize_model(seq2, skip=["2"], progress=False) == {}
    assert seq2[0] is lin2 and seq2[2] is lin2 and lin2.weight is not None


@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("K,bs", [(100, 64), (192, 128)])
def test_forced_triton_routes_refuse_k_not_a_multiple_of_the_blocksize(interpret, K, bs):
    q = lk.quantize_nf4(torch.randn(32, K), blocksize=bs)
    a, b = torch.randn(4, K) * 0.1, torch.randn(32, 4) * 0.1
    with pytest.raises(ValueError, match=rf"route 'merge-cublas' needs K % blocksize == 0, got K={K}"):
        lk.lora_linear(torch.randn(20, K), q, a, b, 0.5, route="merge-cublas")
    with pytest.raises(ValueError, match=rf"route 'merge-cublas' needs K % blocksize == 0, got K={K}"):
        lk.lora_linear_dx(torch.randn(20, 32), q, a, b, 0.5, route="merge-cublas")
    # the default route handles it, exactly as the dense computation
    x = torch.randn(20, K)
    y = lk.lora_linear(x, q, a, b, 0.5)
    ref = x @ q.dequantize(torch.float32).t() + ((x @ a.t()) * 0.5) @ b.t()
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5


def test_forced_triton_route_off_cuda_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = lk.quantize_nf4(torch.randn(32, 64))
    with pytest.raises(ValueError, match="runs Triton kernels, which need a CUDA device"):
        lk.lora_linear(torch.randn(4, 64), q, route="merge-cublas")
    with pytest.raises(ValueError, match="runs Triton kernels, which need a CUDA device"):
        lk.lora_linear(torch.randn(4, 64), q, route="triton-tiled")


@pytest.mark.parametrize("shape", [(4, 1), (4, 4), (1, 4), (1,), (32,), (5,)])
def test_scale_tensor_must_be_0d_or_r(shape):
    q = lk.quantize_nf4(torch.randn(32, 64))
    a, b = torch.randn(4, 64), torch.randn(32, 4)
    s = torch.rand(shape)
    for call in (lambda: lk.lora_linear(torch.randn(4, 64), q, a, b, s),
                 lambda: lk.lora_linear_dx(torch.randn(4, 32), q, a, b, s),
                 lambda: lk.qlora_linear(torch.randn(4, 64), q, a, b, s)):
        with pytest.raises(ValueError, match=r"scale must be a float, a 0-d tensor or an \[r=4\] vector"):
            call()


def test_scale_beyond_fp32_range():
    q = lk.quantize_nf4(torch.randn(32, 64))
    a, b = torch.randn(4, 64), torch.randn(32, 4)
    for fn in (lk.lora_linear, lk.qlora_linear):
        with pytest.raises(ValueError, match="scale must be finite in float32"):
            fn(torch.randn(4, 64), q, a, b, 1e300)


def _saved_adapter(tmp_path, r=4):
    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(64, 16), nn.Linear(64, 16)
    m = T()
    lk.add_lora(m, ["q_proj", "v_proj"], r, 8, init_lora_weights=False)
    lk.save_adapter(m, str(tmp_path))
    fresh = T()
    lk.add_lora(fresh, ["q_proj", "v_proj"], r, 8, init_lora_weights=False)
    return m, fresh


def test_load_adapter_refuses_a_merged_layer(tmp_path):
    _, m2 = _saved_adapter(tmp_path)
    w0 = m2.q_proj.weight.detach().clone()
    m2.q_proj.merge()
    with pytest.raises(ValueError, match="the layer is merged; unmerge"):
        lk.load_adapter(m2, str(tmp_path))
    m2.q_proj.unmerge()
    assert (m2.q_proj.weight - w0).abs().max().item() < 1e-6


def test_load_adapter_checks_every_layer_before_changing_any(tmp_path):
    from safetensors.torch import load_file, save_file
    _, m2 = _saved_adapter(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    t = load_file(path)
    key = next(k for k in t if "v_proj" in k and "lora_A" in k)
    t[key] = torch.randn(8, 64)
    save_file(t, path)
    before = {n: p.detach().clone() for n, p in m2.named_parameters()}
    with pytest.raises(ValueError, match="rank 8 in the state dict, r=4 in the layer"):
        lk.load_adapter(m2, str(tmp_path))
    assert all(torch.equal(p, before[n]) for n, p in m2.named_parameters())


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(r=64), "the adapter's config has r=64"),
    (lambda c: c.update(alora_invocation_tokens=[1, 2, 3]), "alora_invocation_tokens"),
    (lambda c: c.update(use_qalora=True), "use_qalora"),
])
def test_load_adapter_config_mismatches(tmp_path, edit, match):
    _, m2 = _saved_adapter(tmp_path)
    path = os.path.join(tmp_path, "adapter_config.json")
    cfg = json.load(open(path))
    edit(cfg)
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ValueError, match=match):
        lk.load_adapter(m2, str(tmp_path))


def test_load_adapter_config_not_an_object_and_non_tensor_values(tmp_path):
    m, m2 = _saved_adapter(tmp_path)
    json.dump([1, 2], open(os.path.join(tmp_path, "adapter_config.json"), "w"))
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        lk.load_adapter(m2, str(tmp_path))
    sd = m.q_proj.adapter_state_dict()
    sd["lora_A.weight"] = [[0.0]]
    with pytest.raises(TypeError, match="lora_A.weight must be a tensor, got list"):
        m2.q_proj.load_adapter_state_dict(sd)
    sd["lora_A.weight"] = torch.full((4, 64), float("nan"))
    with pytest.raises(ValueError, match="lora_A.weight has NaN/inf values"):
        m2.q_proj.load_adapter_state_dict(sd)


def test_lora_linear_non_finite_alpha_and_merge_overflow_leave_the_weight_alone():
    for alpha in (float("nan"), 1e308):
        with pytest.raises(ValueError, match="lora_alpha must be finite in float32"):
            LoRALinear.from_linear(nn.Linear(64, 16), 4, alpha)
    lin = nn.Linear(64, 16).half()
    m = LoRALinear.from_linear(lin, 4, 8.0)
    with torch.no_grad():
        m.lora_A.fill_(300.0)
        m.lora_B.fill_(300.0)          # scaling 2 x (4 x 300 x 300) = 720000 > fp16's 65504
    w0 = lin.weight.detach().clone()
    with pytest.raises(ValueError, match=r"merge\(\): W \+ scaling·B·A has NaN/inf values"):
        m.merge()
    assert torch.equal(lin.weight, w0) and not m.merged


def _dq_state_dict(double_quant=True):
    return lk.quantize_nf4(torch.randn(32, 128), double_quant=double_quant).state_dict()


_edit_meta = functools.partial(edit_quant_state, none_deletes=False)     # None: written as JSON null


@pytest.mark.parametrize("corrupt,match", [
    (lambda sd: sd.update({"weight.absmax": -sd["weight.absmax"]}), "absmax has negative values"),
    (lambda sd: sd["weight.absmax"].__setitem__(0, float("nan")), "absmax has NaN/inf"),
])
def test_from_state_dict_refuses_corrupt_scales_single_quant(corrupt, match):
    sd = _dq_state_dict(double_quant=False)
    corrupt(sd)
    with pytest.raises(NF4FormatError, match=match):
        lk.NF4Weight.from_state_dict(sd)


@pytest.mark.parametrize("corrupt,match", [
    (lambda sd: sd.update({"weight.nested_absmax": -sd["weight.nested_absmax"]}), "nested_absmax has negative"),
    (lambda sd: sd.update({"weight.nested_absmax": sd["weight.nested_absmax"] * float("nan")}),
     "nested_absmax has NaN/inf"),
    (lambda sd: _edit_meta(sd, nested_offset=float("nan")), "offset has NaN/inf"),
    (lambda sd: _edit_meta(sd, nested_offset=float("inf")), "offset has NaN/inf"),
    (lambda sd: sd.update({"weight.nested_quant_map": torch.zeros(256)}), "8-bit dynamic table"),
    (lambda sd: _edit_meta(sd, nested_offset="abc"), "nested_offset must be a number"),
    (lambda sd: _edit_meta(sd, nested_dtype="bfloat16"), "nested_dtype is bfloat16, only float32"),
    (lambda sd: _edit_meta(sd, nested_dtype="float16"), "nested_dtype is float16, only float32"),
    (lambda sd: _edit_meta(sd, nested_dtype="int8"), "nested_dtype: unsupported dtype"),
    (lambda sd: _edit_meta(sd, blocksize=None), "blocksize must be an int"),
    (lambda sd: _edit_meta(sd, blocksize=64.0), "blocksize must be an int"),
    (lambda sd: _edit_meta(sd, shape=[32.9, 128]), "shape must be a list of ints"),
    (lambda sd: _edit_meta(sd, shape=[-32, -128]), "must have positive dimensions"),
    (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4":
                           sd["weight.quant_state.bitsandbytes__nf4"][:-1].reshape(-1, 1)}), "1-D tensor"),
    (lambda sd: sd.update({"weight.absmax": [1.0]}), "are not tensors"),
])
def test_from_state_dict_refuses_corrupt_scales_and_fields(corrupt, match):
    sd = _dq_state_dict()
    corrupt(sd)
    with pytest.raises(NF4FormatError, match=match):
        lk.NF4Weight.from_state_dict(sd)


def test_strict_load_reports_unknown_weight_keys():
    m = lk.QLoRALinear(lk.quantize_nf4(torch.randn(32, 128)), torch.randn(32), 4, 8)
    sd = m.state_dict()
    sd["weight.typo_absmax"] = torch.ones(3)
    with pytest.raises(RuntimeError, match="weight.typo_absmax"):
        m.load_state_dict(sd, strict=True)
    assert m.load_state_dict(sd, strict=False).unexpected_keys == ["weight.typo_absmax"]


def test_nf4linear_checks_bias_x_and_compute_dtype():
    q = lk.quantize_nf4(torch.randn(32, 128))
    for bias in (torch.tensor([5.0]), torch.randn(1, 32), torch.randn(33), torch.ones(32, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"bias must be a floating-point \[N=32\] tensor"):
            lk.NF4Linear(q, bias)
    with pytest.raises(TypeError, match="weight must be an NF4Weight"):
        lk.NF4Linear(torch.randn(32, 128))
    with pytest.raises(TypeError, match="compute_dtype must be float32, bfloat16, float16 or None"):
        lk.NF4Linear(q, compute_dtype=torch.int8)
    layer = lk.NF4Linear(q)
    with pytest.raises(TypeError, match=r"x must be a tensor \[..., in_features=128\]"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        layer(torch.ones(2, 128, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        lk.NF4Linear(q, compute_dtype=torch.bfloat16)(torch.ones(2, 128, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        lk.QLoRALinear(q, None, 4, 8, compute_dtype=torch.bfloat16)(torch.ones(2, 128, dtype=torch.int64))


def test_quantize_nf4_blocksize_type_and_routes_take_a_device_string():
    with pytest.raises(TypeError, match="blocksize must be an int, got 64.0"):
        lk.quantize_nf4(torch.randn(4, 64), blocksize=64.0)
    import numpy as np
    q = lk.quantize_nf4(torch.randn(4, 64), blocksize=np.int64(64))
    assert type(q.blocksize) is int and json.loads(bytes(q.state_dict()["weight.quant_state.bitsandbytes__nf4"]
                                                          .tolist()))["blocksize"] == 64
    assert lk.forward_route(4, q, torch.float16, "cpu") == "reference"
    assert lk.backward_route(q, torch.float16, "cpu") == "reference"
    assert lk.select_backend("cpu") in lk.available_backends("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        lk.select_backend("cpu", "")


def test_from_bnb_rejects_a_non_quant_state():
    with pytest.raises(NF4FormatError, match="quant_state must be a bitsandbytes QuantState, got object"):
        lk.NF4Weight.from_bnb(torch.zeros(8, dtype=torch.uint8), quant_state=object())


def test_from_bnb_rejects_a_non_fp32_nested_state():
    q = lk.quantize_nf4(torch.randn(32, 128))
    qs = q.to_bnb_quant_state()
    assert lk.NF4Weight.from_bnb(q.packed, quant_state=qs).dequantize().equal(q.dequantize())
    qs.state2.dtype = torch.bfloat16
    with pytest.raises(NF4FormatError, match="state2.dtype is bfloat16, only float32"):
        lk.NF4Weight.from_bnb(q.packed, quant_state=qs)


def test_patch_peft_model_type_and_double_quant_offset_overflow():
    with pytest.raises(TypeError, match="patch_peft_model: model must be an nn.Module"):
        lk.patch_peft_model(None)
    w = torch.randn(4096, 64) * 1e36          # every absmax finite, their fp32 mean is not
    with pytest.raises(ValueError, match="offset .* overflows float32"):
        lk.quantize_nf4(w)
    q = lk.quantize_nf4(w, double_quant=False)
    assert bool(torch.isfinite(q.dequantize()).all())


# ---------------------------------------------------------------------------------------- round 2
def test_merged_layer_state_dict_warns_and_a_merged_layer_refuses_load_state_dict():
    m = LoRALinear.from_linear(nn.Linear(40, 24), 4, 8)
    nn.init.normal_(m.lora_B, std=0.5)
    x = torch.randn(5, 40)
    y = m(x)
    m.merge()
    with pytest.warns(UserWarning, match="applies the adapter twice"):
        sd = {k: v.clone() for k, v in m.state_dict().items()}     # the weight's storage is the layer's
    with pytest.raises(RuntimeError, match="is merged; unmerge"):
        m.load_state_dict(sd)
    q = lk.QLoRALinear(lk.quantize_nf4(torch.randn(24, 64)), None, 4, 8)
    q.merge()
    w_merged = q.weight
    with pytest.warns(UserWarning, match="applies the adapter twice"):
        qsd = q.state_dict()
    with pytest.raises(RuntimeError, match="is merged; unmerge"):
        q.load_state_dict(qsd)
    assert q.weight is w_merged                 # NF4WeightMixin did not swap the weight in first
    m.unmerge()
    m.load_state_dict(sd)                        # unmerged: loads (here: the merged base + the adapter)
    assert not torch.allclose(m(x), y)           # which is why saving warned


@pytest.mark.parametrize("op", ["rms_norm", "cross_entropy", "silu_mul", "rope"])
def test_kernel_backwards_refuse_double_backward(interpret, op):
    from lora_kernels.model_ops.cross_entropy import cross_entropy
    from lora_kernels.model_ops.rms_norm import rms_norm
    from lora_kernels.model_ops.rope import apply_rotary
    from lora_kernels.model_ops.swiglu import silu_mul
    x = torch.randn(6, 16, requires_grad=True)
    if op == "rms_norm":
        out = rms_norm(x, torch.ones(16), 1e-6).square().sum()
    elif op == "cross_entropy":
        out = cross_entropy(x, torch.randint(0, 16, (6,)))
    elif op == "silu_mul":
        out = silu_mul(x, torch.randn(6, 16)).square().sum()
    else:
        q = x.view(1, 2, 3, 16)
        qe, ke = apply_rotary(q, torch.randn(1, 2, 3, 16), torch.randn(1, 3, 16), torch.randn(1, 3, 16))
        out = qe.square().sum()
    with pytest.raises(RuntimeError, match="backward cannot be differentiated again"):
        torch.autograd.grad(out, x, create_graph=True)
    (g,) = torch.autograd.grad(out, x)                  # a plain backward still works
    assert g.shape == x.shape


def test_cross_entropy_int32_targets_with_an_ignore_index_beyond_int32(interpret):
    from lora_kernels.model_ops.cross_entropy import cross_entropy
    x = torch.randn(6, 9)
    t = torch.tensor([0, 2, 0, 4, 5, 6], dtype=torch.int32)
    got = cross_entropy(x, t, ignore_index=2**40)
    ref = torch.nn.functional.cross_entropy(x, t.long(), ignore_index=2**40)
    assert torch.allclose(got, ref, atol=1e-5)


def test_size_config_flags_must_be_booleans_and_unreadable_files(tmp_path, capsys):
    from lora_kernels.cli import main
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 10, "tie_word_embeddings": "false"}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["size", str(tmp_path / "c.json"), "--r", "4"]) == 2
    assert "'tie_word_embeddings' must be true or false, got 'false'" in capsys.readouterr().err
    assert main(["size", str(tmp_path), "--r", "4"]) == 2
    assert "cannot be read" in capsys.readouterr().err
    (tmp_path / "latin1.json").write_bytes(b'{"model_type": "ll\xe9ma"}')
    assert main(["size", str(tmp_path / "latin1.json"), "--r", "4"]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    cfg["tie_word_embeddings"] = False
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    for alpha in ("nan", "inf", "-8", "0"):
        assert main(["size", str(tmp_path / "c.json"), "--r", "4", "--alpha", alpha]) == 2
        assert "alpha must be a positive finite number" in capsys.readouterr().err


def test_patch_model_kernels_argument_types():
    with pytest.raises(TypeError, match="patch_model_kernels: model must be an nn.Module"):
        lk.patch_model_kernels(None)
    with pytest.raises(TypeError, match="unpatch_model_kernels: model must be an nn.Module"):
        lk.unpatch_model_kernels(None)
    with pytest.raises(TypeError, match="kinds must be a kind or an iterable"):
        lk.patch_model_kernels(nn.Linear(2, 2), None)
    report = lk.patch_model_kernels(nn.Sequential(nn.Linear(2, 2)), "rms_norm")   # one kind, not letters
    assert not any(report.patched.values())


def test_adalora_e_shape_and_merged_weight_dtype():
    m = LoRALinear.from_linear(nn.Linear(40, 24), 4, 8)
    m.lora_E = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"lora_E must be \[r=4\] or \[r, 1\]"):
        m(torch.randn(3, 40))
    m.lora_E = nn.Parameter(torch.ones(4, 1))
    assert m(torch.randn(3, 40)).shape == (3, 24)
    for bad in (torch.int8, "float32"):
        with pytest.raises(TypeError, match="merged_weight: dtype must be a floating-point torch.dtype"):
            m.merged_weight(bad)


def test_quantize_model_refuses_an_unsupported_layer_before_converting_any():
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64).double())
    with pytest.raises(TypeError, match=r"2 \(torch.float64\).*nothing was converted"):
        lk.quantize_model(m, progress=False)
    assert type(m[0]) is nn.Linear and m[0].weight is not None


# ---------------------------------------------------------------------------------------- round 3
@pytest.mark.parametrize("layer", ["lora", "qlora"])
def test_compile_fullgraph_under_autocast(layer):
    torch.manual_seed(0)
    lin = nn.Linear(128, 32)
    m = LoRALinear.from_linear(lin, 4, 8) if layer == "lora" else lk.QLoRALinear.from_linear(lin, 4, 8)
    nn.init.normal_(m.lora_B, std=0.1)
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_eager, y_comp = m(x), cm(x)
    assert y_comp.dtype == y_eager.dtype == torch.bfloat16
    assert torch.equal(y_comp, y_eager)


def test_layers_run_on_meta():
    m = LoRALinear.from_linear(nn.Linear(100, 3), 2, 4).to("meta")
    assert m(torch.randn(2, 100, device="meta")).shape == (2, 3)
    q = lk.quantize_nf4(torch.randn(32, 64)).to("meta")
    assert "offset on meta" in repr(q)


def test_nf4weight_equality_is_identity():
    a = lk.quantize_nf4(torch.randn(8, 64))
    b = lk.NF4Weight.from_state_dict(a.state_dict())
    assert a == a and a != b and a in [a] and b not in [a]
    assert len({a, b}) == 2


@pytest.mark.parametrize("var,value,match", [
    ("LORA_KERNELS_WORKSPACE_MB", "abc", r"\$LORA_KERNELS_WORKSPACE_MB='abc' is not a number"),
    ("LORA_KERNELS_WORKSPACE_MB", "nan", r"\$LORA_KERNELS_WORKSPACE_MB='nan' must be a finite number >= 0"),
    ("LORA_KERNELS_WORKSPACE_MB", "-5", r"must be a finite number >= 0"),
    ("LORA_KERNELS_MERGE_SMALL_RANK_MAX", "1.5", r"\$LORA_KERNELS_MERGE_SMALL_RANK_MAX='1.5' is not an integer"),
])
def test_bad_environment_numbers_name_the_variable(var, value, match):
    import subprocess
    import sys
    mod = "lora_kernels.triton.nf4_merge" if "MERGE" in var else "lora_kernels"
    env = dict(os.environ, **{var: value})
    r = subprocess.run([sys.executable, "-c", f"import {mod}"], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert r.returncode != 0 and "ValueError" in r.stderr
    import re
    assert re.search(match, r.stderr), r.stderr[-500:]


def test_bad_gemv_variant_and_backend_variables(monkeypatch):
    from lora_kernels import library
    monkeypatch.setenv("LORA_KERNELS_GEMV_VARIANT", "abc")
    with pytest.raises(ValueError, match=r"\$LORA_KERNELS_GEMV_VARIANT='abc' must be a decode kernel variant, 1 to 5"):
        library.gemv_variant_override()
    with pytest.raises(ValueError, match="1 to 5"):
        library.gemv_variant_chosen(1, 64, 64, False)
    monkeypatch.setenv("LORA_KERNELS_GEMV_VARIANT", "99")
    with pytest.raises(ValueError, match="1 to 5"):
        library.gemv_variant_override()
    monkeypatch.delenv("LORA_KERNELS_GEMV_VARIANT")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"unknown backend 'nope' \(from \$LORA_KERNELS_BACKEND\)"):
        lk.select_backend("cpu")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", " reference ")
    assert lk.select_backend("cpu") == "reference"


@pytest.mark.parametrize("argv,message", [
    (["quantize-demo", "--layers", "100000000"], "must be at most 1024"),
    (["quantize-demo", "--device", "cpu:1"], "the CPU is device 'cpu'"),
    (["demo", "--lr", "nan"], "must be a positive finite number"),
    (["demo", "--lr", "-1"], "must be a positive finite number"),
    (["demo", "--seed", "99999999999999999999999"], "must be in [0, 2**63)"),
])
def test_demo_argument_errors(argv, message, capsys):
    from lora_kernels.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_demo_out_must_be_a_folder(tmp_path, capsys):
    pytest.importorskip("peft")
    from lora_kernels.cli import main
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["demo", "--tiny", "--steps", "1", "--device", "cpu", "--out", str(f)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_adapter_size_library_arguments():
    from lora_kernels.adapter_size import ConfigError, adapter_size, load_config, nf4_nbytes
    cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs",
                       "llama-3-8b.json")
    shape = load_config(cfg)
    for kw, match in ((dict(targets=123), "targets must be"), (dict(alpha="8"), "alpha must be"),
                      (dict(dtype=["bf16"]), "dtype must be a string")):
        with pytest.raises(ConfigError, match=match):
            adapter_size(shape, 8, **kw)
    with pytest.raises(ConfigError, match="shape must be a ModelShape"):
        adapter_size(None, 8)
    with pytest.raises(ConfigError, match="config path must be a str or a path"):
        load_config(None)
    for args in ((-10,), (10.5,), (64, 0)):
        with pytest.raises(ConfigError, match="must be a positive int"):
            nf4_nbytes(*args)


def test_torch_save_of_a_patched_model_loads_back_patched():
    import io
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    lk.patch_model_kernels(m)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lk.patch_peft_model(pm)
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        ref = pm(ids).logits
    buf = io.BytesIO()
    torch.save(pm, buf)
    from lora_kernels.integrations import model_kernels, peft as lk_peft
    saved = dict(model_kernels._PATCHED), dict(lk_peft._PATCHED)
    model_kernels._PATCHED.clear()          # as in a fresh process: the classes are rebuilt from their names
    lk_peft._PATCHED.clear()
    try:
        buf.seek(0)
        pm2 = torch.load(buf, weights_only=False)
    finally:
        model_kernels._PATCHED.update(saved[0])
        lk_peft._PATCHED.update(saved[1])
    attn = pm2.base_model.model.model.layers[0].self_attn
    assert type(attn).__name__ == "LoraKernelsLlamaAttention" and type(attn.q_proj).__name__ == "LoraKernelsLinear"
    with torch.no_grad():
        assert torch.equal(pm2(ids).logits, ref)
    assert lk.unpatch_model_kernels(pm2) > 0


def test_registered_ops_name_mismatched_adapters():
    """Session 21: the torch.library ops (what a compiled graph calls) check the adapters' shapes
    before t = x·Aᵀ, so a mismatched lora_a is named instead of failing inside a matmul (or, on the
    dropout path, being multiplied before any check)."""
    ops = torch.ops.lora_kernels
    g = torch.Generator().manual_seed(0)
    q = lk.quantize_nf4(torch.randn(32, 64, generator=g))
    nf4 = (q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, 32, 64, 64)
    x, dy, s = torch.randn(3, 64, generator=g), torch.randn(3, 32, generator=g), torch.tensor(1.0)
    bad = (torch.randn(4, 63, generator=g), torch.randn(32, 4, generator=g))      # lora_a [r, 63], K = 64
    short_b = (torch.randn(4, 64, generator=g), torch.randn(31, 4, generator=g))  # lora_b [31, r], N = 32
    for a, b in (bad, short_b):
        msg = r"lora_a must be \[r, K=64\] and lora_b \[N=32, r\]"
        with pytest.raises(ValueError, match=msg):
            ops.nf4_lora_forward(x, *nf4, a, b, s, None)
        with pytest.raises(ValueError, match=msg):
            ops.nf4_lora_forward(x, *nf4, a, b, s, None, x_lora=x.clone())
        with pytest.raises(ValueError, match=msg):
            ops.dense_lora_forward(x, torch.randn(32, 64, generator=g), a, b, s, None)
        with pytest.raises(ValueError, match=msg):
            ops.nf4_lora_backward_dx(dy, *nf4, a, b, None)
        with pytest.raises(ValueError, match=msg):
            ops.dense_lora_backward_dx(dy, torch.randn(32, 64, generator=g), a, b, None)
    with pytest.raises(ValueError, match="give both lora_a and lora_b, or neither"):
        ops.nf4_lora_forward(x, *nf4, bad[0], None, s, None)
    y, t = ops.nf4_lora_forward(x, *nf4, short_b[0], torch.randn(32, 4, generator=g), s, None)
    assert y.shape == (3, 32) and t.shape == (3, 4)
