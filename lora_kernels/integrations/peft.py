"""Use lora_kernels as the compute backend of an existing PEFT model.

``patch_peft_model(model)`` swaps, in place, the forward of every PEFT LoRA / AdaLoRA layer whose
base is ``bnb.nn.Linear4bit`` (nf4) or ``nn.Linear`` for the fused ``qlora_linear`` op.  The swap
changes only the layer's class (to a subclass of PEFT's own class that overrides ``forward``), so
the module tree, the state-dict keys, ``save_pretrained``, ``merge_and_unload`` and every
Parameter object stay PEFT's: an optimizer built before or after the patch trains the same
tensors, and ``unpatch_peft_model`` restores the original classes.

A patched layer falls back to PEFT's own forward, call by call, whenever the fused op does not
express what PEFT would compute: adapters disabled or merged, more than one active adapter, a
mixed-adapter batch (``adapter_names=``), or a bitsandbytes weight not quantized yet.  Layers that
can never take the fused path are left unpatched and reported with the reason (fp4 base, DoRA or
another LoRA variant, a bias on lora_B, fan_in_fan_out, an unsupported dropout or base layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..autograd import qlora_linear
from ..modules import NF4Linear
from ..nf4 import NF4Weight
from . import _classes

_PATCHED: dict[type, type] = {}


@dataclass
class PatchReport:
    """What ``patch_peft_model`` did: patched layer names, and the others with the reason."""

    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"lora_kernels: patched {len(self.patched)} PEFT layer(s), left {len(self.skipped)} on PEFT's path"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _peft_classes():
    """PEFT layer classes we can patch, with their kind ("lora" / "adalora")."""
    from peft.tuners.adalora.layer import SVDLinear
    from peft.tuners.lora.layer import Linear as LoraLinear

    classes = {LoraLinear: "lora", SVDLinear: "adalora"}
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        classes[LoraLinear4bit] = "lora"
    except ImportError:  # bitsandbytes not installed
        pass
    try:
        from peft.tuners.adalora.bnb import SVDLinear4bit

        classes[SVDLinear4bit] = "adalora"
    except ImportError:
        pass
    return classes


def _is_bnb_4bit(base: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(base, bnb.nn.Linear4bit)


def _static_skip_reason(layer: nn.Module) -> str | None:
    """Why this layer can never take the fused path (None: it can)."""
    base = layer.get_base_layer()
    if _is_bnb_4bit(base):
        if getattr(base.weight, "quant_type", "nf4") != "nf4":
            return f"{base.weight.quant_type} base (only nf4 is supported)"
    elif type(base) is not nn.Linear and not isinstance(base, NF4Linear):
        return f"base layer {type(base).__name__} is not nn.Linear, bnb.nn.Linear4bit or NF4Linear"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    variants = getattr(layer, "lora_variant", {}) or {}
    if variants:
        return f"LoRA variant {sorted(type(v).__name__ for v in variants.values())} (e.g. DoRA)"
    if any(getattr(layer, "use_dora", {}).values()):
        return "DoRA"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "lora_bias=True (a bias on lora_B)"
    for name, drop in layer.lora_dropout.items():
        if not isinstance(drop, (nn.Dropout, nn.Identity)):
            return f"adapter {name!r}: dropout {type(drop).__name__} is not nn.Dropout"
    return None


def _nf4_of(layer: nn.Module, base: nn.Module) -> NF4Weight | None:
    """The bitsandbytes base weight as an NF4Weight sharing its tensors (cached per Parameter,
    quant_state and storage)."""
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None or w.device.type == "meta":
        return None
    cached = layer.__dict__.get("_lk_nf4")
    # traced: keyed by the Parameter and quant_state objects only (dynamo guards on them), not by
    # storage addresses; eager: by both; a new Parameter, quant_state or storage builds a new view
    key = None if torch.compiler.is_compiling() else (w.data_ptr(), qs.absmax.data_ptr(), w.device)
    if cached is not None and cached[2] is w and cached[3] is qs and (key is None or cached[0] == key):
        return cached[1]
    cached = (key, NF4Weight.from_bnb(w), w, qs)
    layer.__dict__["_lk_nf4"] = cached
    return cached[1]


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's forward, computed by lora_kernels' fused op when it expresses the same thing."""
    original = type(self)._lk_original_class.forward
    active = list(self.active_adapters)
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or active[0] not in self.lora_A):
        return original(self, x, *args, **kwargs)
    adapter = active[0]
    base = self.get_base_layer()
    if _is_bnb_4bit(base):
        weight = _nf4_of(self, base)
        if weight is None:
            return original(self, x, *args, **kwargs)
        compute_dtype = base.compute_dtype or x.dtype  # bitsandbytes computes in compute_dtype
    elif isinstance(base, NF4Linear):  # e.g. a Linear4bit that lora_kernels.distributed made FSDP2-shardable
        weight = base.weight
        compute_dtype = base.compute_dtype or x.dtype
    else:
        weight = base.weight
        compute_dtype = x.dtype
    drop = self.lora_dropout[adapter]
    p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
    if type(self)._lk_kind == "adalora":
        a, b = self.lora_A[adapter], self.lora_B[adapter]
        # PEFT: result += dropout(x) @ (A * E).T @ B.T * scaling / (ranknum + 1e-5), a per-rank scale
        scale = self.lora_E[adapter].reshape(-1).float() * (self.scaling[adapter] / (self.ranknum[adapter] + 1e-5))
    else:
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        scale = self.scaling[adapter]
    bias = base.bias
    if torch.is_autocast_enabled(x.device.type):  # qlora_linear casts like nn.Linear does
        return qlora_linear(x, weight, a, b, scale, bias, dropout=p, training=self.training)
    # PEFT keeps adapters in fp32 and casts around them; the fused op runs in the base's compute
    # dtype with fp32 accumulation, reading the fp32 adapters as they are (qlora_linear rounds them
    # where it reads them and returns their gradients in fp32: no cast nodes per call)
    cd = compute_dtype
    if isinstance(weight, torch.Tensor) and weight.dtype != cd:
        weight = weight.to(cd)
    y = qlora_linear(x.to(cd), weight, a, b, scale, None if bias is None else bias.to(cd),
                     dropout=p, training=self.training)
    return y.to(x.dtype)


def _patched_class(cls: type, kind: str) -> type:
    if cls not in _PATCHED:
        _PATCHED[cls] = type(f"LoraKernels{cls.__name__}", (cls,),
                             {"forward": _fused_forward, "_lk_original_class": cls, "_lk_kind": kind,
                              "__module__": __name__, "__qualname__": _classes.qualname_for(cls, kind)})
    return _PATCHED[cls]


def __getattr__(name: str) -> type:
    """The patched classes by their qualified names (what ``torch.save(model)`` pickles)."""
    return _classes.resolve(name, _patched_class)


def patch_peft_model(model: nn.Module) -> PatchReport:
    """Route every supported PEFT LoRA/AdaLoRA layer of ``model`` through lora_kernels, in place.

    Returns a PatchReport naming the patched layers and the skipped ones with the reason.  Calling
    it twice is harmless (already patched layers are counted again as patched).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_peft_model: model must be an nn.Module (a PEFT model), got {type(model).__name__}")
    classes = _peft_classes()
    report = PatchReport()
    patched_originals = {v: k for k, v in _PATCHED.items()}
    for name, module in model.named_modules():
        cls = type(module)
        if cls in patched_originals:
            report.patched.append(name)
            continue
        if cls not in classes:
            base_tuner = getattr(module, "get_base_layer", None)
            if base_tuner is not None and hasattr(module, "lora_A") and name:
                report.skipped[name] = f"PEFT layer type {cls.__name__} is not supported"
            continue
        why = _static_skip_reason(module)
        if why is not None:
            report.skipped[name] = why
            continue
        module.__class__ = _patched_class(cls, classes[cls])
        report.patched.append(name)
    return report


def unpatch_peft_model(model: nn.Module) -> int:
    """Restore PEFT's own classes; returns how many layers were restored."""
    n = 0
    for module in model.modules():
        original = getattr(type(module), "_lk_original_class", None)
        if original is not None:
            module.__class__ = original
            module.__dict__.pop("_lk_nf4", None)
            n += 1
    return n
