"""Route the non-LoRA parts of a transformers decoder through lora_kernels' fused model ops.

``patch_model_kernels(model)`` swaps, in place, for every supported module of a Llama-family model
(Llama, Mistral, Qwen2, Qwen3; found inside a PEFT wrapper too):

==============  ==========================================  ========================================
kind            module                                      now computed by
==============  ==========================================  ========================================
``rms_norm``    ``<Family>RMSNorm``                         ``model_ops.rms_norm``: one pass fwd/bwd
``swiglu``      ``<Family>MLP`` with a SiLU activation      ``down(silu_mul(gate(x), up(x)))``
``rope``        ``<Family>Attention``                       ``model_ops.apply_rotary`` for its
                                                            module's ``apply_rotary_pos_emb``
``loss``        ``<Family>ForCausalLM`` (ForCausalLM loss)  ``model_ops.causal_lm_loss``: no fp32
                                                            copy of the logits
==============  ==========================================  ========================================

Like ``patch_peft_model``, a swap changes only the module's class (to a subclass overriding
``forward``) or, for the loss, sets the model's ``loss_function``: Parameters, state-dict keys and
``save_pretrained`` are untouched, and ``unpatch_model_kernels`` restores everything.  The rotary
swap is scoped to the patched attention modules: their forward runs with the defining module's
``apply_rotary_pos_emb`` pointing at the fused op and restores it on return, so other models in the
process keep transformers' function.

Under ``torch.compile`` each model op traces its plain-PyTorch reference (transformers' numerics),
which inductor fuses like the unpatched model's code: the Triton kernels serve eager steps, and a
patched model compiles as one graph (``fullgraph=True`` works).

Numerics: each op computes in fp32 and rounds once, where transformers rounds after every
elementwise op in bf16/fp16 — results agree within the low-precision rounding, not bit for bit (the
references in ``lora_kernels.model_ops`` reproduce transformers exactly and are what runs where
Triton cannot: see ``model_ops.use_triton``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model_ops.cross_entropy import causal_lm_loss
from ..model_ops.rms_norm import rms_norm
from ..model_ops.rope import apply_rotary
from ..model_ops.swiglu import silu_mul
from . import _classes

KINDS = ("rms_norm", "swiglu", "rope", "loss")
#: model families whose modules have Llama's RMSNorm / MLP / rotary code (transformers 5)
FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")

_PATCHED: dict[type, type] = {}
_ORIGINAL = "_lk_model_kernels_original"   # not patch_peft_model's attribute: the two unpatch apart


@dataclass
class ModelKernelReport:
    """What ``patch_model_kernels`` did: module names by kind, and the skipped ones with the reason."""

    patched: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        counts = ", ".join(f"{len(v)} {k}" for k, v in self.patched.items())
        lines = [f"lora_kernels: fused model kernels on {counts}; {len(self.skipped)} module(s) left as they were"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _fused_rope(q, k, cos, sin, unsqueeze_dim=1):
    return apply_rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def _attention_forward(self, *args, **kwargs):
    original = getattr(type(self), _ORIGINAL)   # (not type(self).__dict__: dynamo breaks on mappingproxy reads)
    if torch.compiler.is_compiling():
        # traced, the fused op would trace transformers' own function (model_ops' references), and
        # swapping a module global inside a traced frame is a graph break: run the original as it is
        return original.forward(self, *args, **kwargs)
    module = sys.modules[original.__module__]
    previous = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = _fused_rope
    try:
        return original.forward(self, *args, **kwargs)
    finally:
        module.apply_rotary_pos_emb = previous


_FORWARDS = {"rms_norm": _rms_norm_forward, "swiglu": _mlp_forward, "rope": _attention_forward}


def _family_kind(cls: type) -> str | None:
    name = cls.__name__
    for fam in FAMILIES:
        if name == f"{fam}RMSNorm":
            return "rms_norm"
        if name == f"{fam}MLP":
            return "swiglu"
        if name == f"{fam}Attention":
            return "rope"
    return None


def _skip_reason(kind: str, module: nn.Module) -> str | None:
    if kind == "rms_norm":
        w = getattr(module, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 1 or not hasattr(module, "variance_epsilon"):
            return "not the Llama RMSNorm layout (weight [H], variance_epsilon)"
    elif kind == "swiglu":
        if not all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return "no gate_proj / up_proj / down_proj"
        act = getattr(module, "act_fn", None)
        if type(act).__name__ not in ("SiLU", "SiLUActivation"):
            return f"activation {type(act).__name__} is not SiLU"
    elif kind == "rope":
        mod = sys.modules.get(type(module).__module__)
        if mod is None or not callable(getattr(mod, "apply_rotary_pos_emb", None)):
            return f"{type(module).__module__} has no apply_rotary_pos_emb"
    return None


def _patched_class(cls: type, kind: str) -> type:
    if cls not in _PATCHED:
        _PATCHED[cls] = type(f"LoraKernels{cls.__name__}", (cls,),
                             {"forward": _FORWARDS[kind], _ORIGINAL: cls, "__module__": __name__,
                              "__qualname__": _classes.qualname_for(cls, kind)})
    return _PATCHED[cls]


def __getattr__(name: str) -> type:
    """The patched classes by their qualified names (what ``torch.save(model)`` pickles)."""
    return _classes.resolve(name, _patched_class)


def _is_causal_lm(module: nn.Module) -> bool:
    name = type(module).__name__
    return (name.endswith("ForCausalLM") and any(name.startswith(f) for f in FAMILIES)
            and hasattr(type(module), "loss_function"))


def patch_model_kernels(model: nn.Module, kinds=KINDS) -> ModelKernelReport:
    """Route ``model``'s RMSNorms, SwiGLU MLPs, rotary embeddings and causal-LM loss (``kinds``, any
    subset of ``KINDS``) through the fused model ops, in place.  Returns a ModelKernelReport.
    Calling it twice is harmless."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model_kernels: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(kinds, str):
        kinds = (kinds,)                                  # one kind, not its characters
    try:
        kinds = tuple(kinds)
    except TypeError:
        raise TypeError(f"patch_model_kernels: kinds must be a kind or an iterable of kinds from {KINDS}, "
                        f"got {kinds!r}") from None
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"patch_model_kernels: unknown kind(s) {bad}; expected a subset of {KINDS}")
    report = ModelKernelReport()
    for name, module in model.named_modules():
        cls = type(module)
        original = cls.__dict__.get(_ORIGINAL)
        kind = _family_kind(original or cls)
        if kind is not None and kind in kinds:
            if original is None:
                why = _skip_reason(kind, module)
                if why is not None:
                    report.skipped[name] = why
                    continue
                module.__class__ = _patched_class(cls, kind)
            report.patched[kind].append(name)
        if "loss" in kinds and _is_causal_lm(module):
            if getattr(module, "loss_type", None) not in (None, "ForCausalLM"):
                report.skipped[name or "<model>"] = "loss_type is not ForCausalLM"
                continue
            if module.__dict__.get("_loss_function") is not causal_lm_loss:
                module.__dict__["_lk_previous_loss"] = module.__dict__.get("_loss_function")
                module.loss_function = causal_lm_loss
            report.patched["loss"].append(name or "<model>")
    return report


def unpatch_model_kernels(model: nn.Module) -> int:
    """Undo ``patch_model_kernels``; returns how many modules were restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_model_kernels: model must be an nn.Module, got {type(model).__name__}")
    n = 0
    for module in model.modules():
        original = type(module).__dict__.get(_ORIGINAL)
        if original is not None:
            module.__class__ = original
            n += 1
        if module.__dict__.get("_loss_function") is causal_lm_loss:
            previous = module.__dict__.pop("_lk_previous_loss", None)
            if previous is None:
                del module.__dict__["_loss_function"]
            else:
                module.__dict__["_loss_function"] = previous
            n += 1
    return n
