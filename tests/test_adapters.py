"""Adapters in PEFT's format for models built from our own layers: written by us and read by plain
PEFT, written by PEFT and read by us, with clear errors on mismatches."""

import copy
import json

import pytest
import torch

from lora_kernels.integrations.adapters import add_lora, load_adapter, save_adapter
from lora_kernels.lora_modules import LoRALinear, QLoRALinear

from .test_peft_integration import TARGETS, _llama, _peft

peft = pytest.importorskip("peft")


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_add_lora_freezes_the_base_and_targets_layers():
    model = _llama(0)
    names = add_lora(model, TARGETS, r=4, lora_alpha=8)
    assert len(names) == 2 * len(TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(_llama(0), ["nope_proj"], r=4, lora_alpha=8)


def test_ours_saved_loads_in_plain_peft(rng, tmp_path):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    tokens = torch.randint(0, 128, (2, 10), generator=rng)
    ours = _llama(seed)
    add_lora(ours, TARGETS, r=8, lora_alpha=16, init_lora_weights=False)
    save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == sorted(TARGETS)
    plain = peft.PeftModel.from_pretrained(_llama(seed), tmp_path).eval()
    torch.testing.assert_close(_logits(plain, tokens), _logits(ours.eval(), tokens), rtol=1e-4, atol=1e-4)


def test_peft_saved_loads_in_ours_including_nf4_base(rng, tmp_path):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    tokens = torch.randint(0, 128, (2, 10), generator=rng)
    pm = _peft(_llama(seed)).eval()
    pm.save_pretrained(tmp_path)
    ours = _llama(seed)
    add_lora(ours, TARGETS, r=8, lora_alpha=16)  # B = 0: the adapter file must set it
    assert len(load_adapter(ours, tmp_path)) == 2 * len(TARGETS)
    torch.testing.assert_close(_logits(ours.eval(), tokens), _logits(pm, tokens), rtol=1e-4, atol=1e-4)

    # an NF4 base: quantize first, then the same adapter
    import lora_kernels as lk

    q = _llama(seed)
    lk.quantize_model(q, skip=("lm_head",), progress=False)
    # PEFT's reference on the same (dequantized) base weights
    ref = _llama(seed)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, lk.NF4Linear):
                ref.get_submodule(name).weight.copy_(m.weight.dequantize(torch.float32))
    add_lora(q, TARGETS, r=8, lora_alpha=16)
    load_adapter(q, tmp_path)
    layers = [m for m in q.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * len(TARGETS) and all(isinstance(m, QLoRALinear) for m in layers)
    plain = peft.PeftModel.from_pretrained(ref, tmp_path).eval()
    torch.testing.assert_close(_logits(q.eval(), tokens), _logits(plain, tokens), rtol=1e-4, atol=1e-4)


def test_mismatched_adapters_are_refused(rng, tmp_path):
    pm = _peft(_llama(1))
    pm.save_pretrained(tmp_path)
    wrong_rank = _llama(1)
    add_lora(wrong_rank, TARGETS, r=4, lora_alpha=16)
    with pytest.raises(ValueError, match="rank 8 in the state dict, r=4"):
        load_adapter(wrong_rank, tmp_path)
    wrong_alpha = _llama(1)
    add_lora(wrong_alpha, TARGETS, r=8, lora_alpha=32)
    with pytest.raises(ValueError, match="lora_alpha"):
        load_adapter(wrong_alpha, tmp_path)
    fewer = _llama(1)
    add_lora(fewer, ["q_proj"], r=8, lora_alpha=16)
    with pytest.raises(ValueError, match="not a LoRA layer of this model"):
        load_adapter(fewer, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    ok = _llama(1)
    add_lora(ok, TARGETS, r=8, lora_alpha=16)
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(ok, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_adapter(ok, tmp_path / "missing")
    cfg["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_adapter(ok, tmp_path)


def test_save_refuses_merged_layers(tmp_path):
    model = _llama(2)
    add_lora(model, ["q_proj"], r=4, lora_alpha=8)
    model.get_submodule("model.layers.0.self_attn.q_proj").merge()
    with pytest.raises(ValueError, match="merged"):
        save_adapter(model, tmp_path)
