"""LoRA on a plain model with our own layers, and adapter files in PEFT's format.

``add_lora(model, target_modules, r, lora_alpha, ...)`` replaces the matching ``nn.Linear`` /
``NF4Linear`` layers by ``LoRALinear`` / ``QLoRALinear`` and freezes everything else (what
``peft.get_peft_model`` does, without PEFT's wrappers).  ``save_adapter`` writes
``adapter_model.safetensors`` + ``adapter_config.json`` exactly as PEFT lays them out, so
``peft.PeftModel.from_pretrained(base, path)`` loads them; ``load_adapter`` reads an adapter that
PEFT (or we) saved into such a model, with clear errors on a mismatch.

PEFT's key for a layer at module path ``P`` of the base model:
``base_model.model.P.lora_A.weight`` [r, K] and ``base_model.model.P.lora_B.weight`` [N, r].
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import torch
from torch import nn

from ..lora_modules import LoRALinear, QLoRALinear
from ..modules import NF4Linear

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."

#: adapter_config.json fields whose non-default values change the math in ways these layers do not
#: implement; an adapter using them is refused with the field named.
_UNSUPPORTED = {
    "use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "layer_replication": None,
    "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "trainable_token_indices": None,
    # PEFT variants whose forward differs from y = base(x) + s·B·A·x (activated LoRA, LoRA on bare
    # parameters, routed adapters, QA-LoRA's pooled input, ...): refused rather than loaded as plain LoRA
    "alora_invocation_tokens": None, "target_parameters": None, "arrow_config": None, "use_bdlora": None,
    "velora_config": None, "kasa_config": None, "monteclora_config": None, "use_qalora": False,
}


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nn.Module, target_modules: Iterable[str], r: int, lora_alpha: float,
             lora_dropout: float = 0.0, use_rslora: bool = False,
             init_lora_weights: bool = True) -> list[str]:
    """Put LoRA on every ``nn.Linear`` (→ LoRALinear) or ``NF4Linear`` (→ QLoRALinear) whose name
    ends with one of ``target_modules`` (a module name, or an iterable of them); freeze all other
    parameters.  Returns the layer names.  Every new layer is built before the model is touched, so
    a bad ``r`` / ``lora_alpha`` / ``lora_dropout`` raises with the model unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_lora: model must be an nn.Module, got {type(model).__name__}")
    targets = [target_modules] if isinstance(target_modules, str) else (   # one name, not its characters
        list(target_modules) if isinstance(target_modules, Iterable) else None)
    if targets is None or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"add_lora: target_modules must be a module name or an iterable of names, got "
                        f"{target_modules!r}")
    names = [n for n, m in model.named_modules()
             if (type(m) is nn.Linear or isinstance(m, NF4Linear)) and _matches(n, targets)]
    if not names:
        raise ValueError(f"add_lora: no nn.Linear or NF4Linear matches target_modules={targets}")
    new_layers = {}
    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, NF4Linear):
            new_layers[name] = QLoRALinear(old.weight, old.bias, r, lora_alpha, lora_dropout, use_rslora,
                                           init_lora_weights=init_lora_weights, compute_dtype=old.compute_dtype)
        else:
            new_layers[name] = LoRALinear(old.weight, old.bias, r, lora_alpha, lora_dropout, use_rslora,
                                          init_lora_weights=init_lora_weights)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, new in new_layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return names


def _config_dict(layers: dict[str, LoRALinear], base_model_name_or_path: str | None) -> dict:
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if (layer.r, layer.lora_alpha, layer.use_rslora, layer.lora_dropout) != (
                first.r, first.lora_alpha, first.use_rslora, first.lora_dropout):
            raise ValueError(f"save_adapter: layer {name} has r/alpha/rslora/dropout {layer.r}/{layer.lora_alpha}/"
                             f"{layer.use_rslora}/{layer.lora_dropout}, others {first.r}/{first.lora_alpha}/"
                             f"{first.use_rslora}/{first.lora_dropout}; one adapter config holds one setting")
        if layer.lora_E is not None:
            raise ValueError(f"save_adapter: layer {name} is AdaLoRA-shaped (lora_E); save it with PEFT")
    kwargs = dict(r=first.r, lora_alpha=first.lora_alpha, lora_dropout=first.lora_dropout,
                  use_rslora=first.use_rslora, target_modules=sorted({n.rpartition(".")[2] for n in layers}),
                  base_model_name_or_path=base_model_name_or_path, inference_mode=True)
    try:
        from peft import LoraConfig
    except ImportError:  # the same fields PEFT would write for them
        return {"peft_type": "LORA", "task_type": None, "bias": "none", "fan_in_fan_out": False,
                "init_lora_weights": True, **kwargs}
    d = LoraConfig(**kwargs).to_dict()
    return {k: (sorted(v) if isinstance(v, set) else getattr(v, "value", v)) for k, v in d.items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write the model's LoRALinear/QLoRALinear adapters to ``path`` in PEFT's format."""
    from safetensors.torch import save_file

    layers = _lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRALinear / QLoRALinear layer")
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"save_adapter: layer {name} is merged; unmerge() it first")
        for k, v in layer.adapter_state_dict().items():
            tensors[f"{_PREFIX}{name}.{k}"] = v.detach().contiguous().cpu()
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(_config_dict(layers, base_model_name_or_path), f, indent=2, sort_keys=True)


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of a PEFT LoRA adapter folder; errors name what is wrong."""
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"read_adapter: {p} does not exist")
    with open(cfg_path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"read_adapter: {cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"read_adapter: {cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") not in ("LORA", None):
        raise ValueError(f"read_adapter: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, default in _UNSUPPORTED.items():
        if cfg.get(key, default) not in (default, None, False, {}, []):
            raise ValueError(f"read_adapter: {ADAPTER_CONFIG} sets {key}={cfg[key]!r}, which these layers "
                             f"do not implement (load it with PEFT and use patch_peft_model instead)")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)):
            raise ValueError(f"read_adapter: {ADAPTER_CONFIG} has no numeric {key!r}")
    from safetensors import SafetensorError

    try:
        tensors = load_file(w_path)
    except SafetensorError as e:
        raise ValueError(f"read_adapter: {w_path} is not a readable safetensors file: {e}") from None
    return cfg, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a PEFT-format LoRA adapter into the model's LoRALinear/QLoRALinear layers (in place).
    Every layer must be covered by the file and every tensor must land on a layer, with matching
    r, alpha and rsLoRA; errors name the key or the layer.  Returns the loaded layer names."""
    cfg, tensors = read_adapter(path)
    layers = _lora_layers(model)
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"load_adapter: unexpected tensor {key!r} in {ADAPTER_WEIGHTS}")
        name, _, leaf = key[len(_PREFIX):].rpartition(".lora_")
        if name not in layers:
            raise ValueError(f"load_adapter: {key!r} names layer {name!r}, which is not a LoRA layer of this model")
        by_layer.setdefault(name, {})["lora_" + leaf] = value
    missing = sorted(set(layers) - set(by_layer))
    if missing:
        raise ValueError(f"load_adapter: the adapter has no tensors for layers {missing}")
    for name, layer in layers.items():       # every layer checked before any is changed
        if (layer.lora_alpha, layer.use_rslora) != (cfg["lora_alpha"], bool(cfg.get("use_rslora", False))):
            raise ValueError(f"load_adapter: layer {name} has lora_alpha={layer.lora_alpha}, "
                             f"use_rslora={layer.use_rslora}; the adapter has lora_alpha={cfg['lora_alpha']}, "
                             f"use_rslora={cfg.get('use_rslora', False)}")
        layer.check_adapter_state_dict(by_layer[name])
        if layer.r != cfg["r"]:            # the tensors fit the layer, the config says another rank
            raise ValueError(f"load_adapter: layer {name} has r={layer.r} (as the file's tensors); the adapter's "
                             f"config has r={cfg['r']}")
    for name, layer in layers.items():
        layer.load_adapter_state_dict(by_layer[name])
    return sorted(layers)
