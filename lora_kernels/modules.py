"""``nn.Module``s over the NF4 format.

``NF4Linear``: a frozen linear layer whose weight is an ``NF4Weight``; its state dict uses
``bnb.nn.Linear4bit``'s keys, so checkpoints move both ways.  (The LoRA layers build on it.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .library import dequantize_nf4, quantize_nf4
from .nf4 import _QS_KEY, NF4FormatError, NF4Weight, is_nf4_state_dict

#: the keys of an NF4 weight under its module's prefix (bnb.nn.Linear4bit's, as NF4Weight.state_dict)
_NF4_KEYS = frozenset({"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", f"weight.{_QS_KEY}"})


def _target_device(fn) -> torch.device:
    """The device an ``nn.Module._apply`` function moves tensors to (dtype casts are ignored)."""
    return fn(torch.empty(0)).device


class NF4WeightMixin(nn.Module):
    """For modules whose ``weight`` is an ``NF4Weight``: device moves keep the format's dtypes
    (``model.half()`` leaves the scales fp32), and the state dict holds the weight in
    ``bnb.nn.Linear4bit``'s keys (``weight``, ``weight.absmax``, ...).  ``_nf4_attrs`` names every
    NF4Weight attribute to move (the first one is the saved ``weight``)."""

    _nf4_attrs: tuple[str, ...] = ("weight",)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = _target_device(fn)
        for name in self._nf4_attrs:
            w = getattr(self, name, None)
            if w is not None and device != w.device:
                setattr(self, name, w.to(device))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.weight.state_dict("weight").items():
            destination[prefix + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The NF4 keys are read here; everything else (bias, adapters) by nn.Module.
        sub = {k[len(prefix):]: v for k, v in state_dict.items()
               if k == prefix + "weight" or k.startswith(prefix + "weight.")}
        if not is_nf4_state_dict(sub):
            dense = sub.get("weight")
            if isinstance(dense, torch.Tensor):   # even non-strict: never a silently kept old weight
                error_msgs.append(f"{prefix}weight: the state dict has a {dense.dtype} tensor of shape "
                                  f"{tuple(dense.shape)} without NF4 quant_state entries; this layer holds an "
                                  "NF4 weight (load a quantized checkpoint, or quantize_nf4 the dense weight and "
                                  "assign it)")
            elif strict:
                missing_keys.append(prefix + "weight.quant_state.bitsandbytes__nf4")
        else:
            try:
                w = NF4Weight.from_state_dict(sub, "weight", device=self.weight.device)
            except NF4FormatError as e:
                error_msgs.append(f"{prefix}weight: {e}")
            else:
                if w.shape != self.weight.shape:
                    error_msgs.append(f"{prefix}weight: shape {tuple(w.shape)} in the checkpoint, "
                                      f"{tuple(self.weight.shape)} in the model")
                else:
                    self.weight = w
        consumed = {prefix + k for k in sub if k in _NF4_KEYS}    # any other weight.* key: unexpected
        rest = {k: v for k, v in state_dict.items() if k not in consumed}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class NF4Linear(NF4WeightMixin, nn.Module):
    """y = x · dequant(W)ᵀ + bias, W [out_features, in_features] stored as NF4 (frozen).

    x: [..., in_features] (fp32/bf16/fp16; computed in ``compute_dtype`` if set, else x's dtype).
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"NF4Linear: weight must be an NF4Weight (quantize_nf4 a dense one, or use "
                            f"NF4Linear.from_linear), got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        if compute_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"NF4Linear: compute_dtype must be float32, bfloat16, float16 or None, got {compute_dtype}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
                                 or not bias.is_floating_point()):
            raise ValueError(f"NF4Linear: bias must be a floating-point [N={weight.shape[0]}] tensor, got "
                             f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    device: torch.device | str | None = None, compute_dtype: torch.dtype | None = None,
                    backend: str | None = None) -> "NF4Linear":
        """Quantize ``linear.weight`` (on ``device`` if given: only this layer's copy goes there)."""
        w = linear.weight.detach()
        if device is not None:
            w = w.to(device)
        q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant, backend=backend)
        bias = linear.bias.detach().to(q.device) if linear.bias is not None else None
        return cls(q, bias, compute_dtype=compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"NF4Linear: x must be a tensor [..., in_features={self.in_features}]")
        if not x.is_floating_point():
            raise TypeError(f"NF4Linear: x must be a floating-point tensor, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"NF4Linear: x's last dim is {x.shape[-1]}, expected in_features={self.in_features}")
        if x.device != self.weight.device:
            raise ValueError(f"NF4Linear: x is on {x.device} but the weight is on {self.weight.device}")
        dtype = self.compute_dtype or x.dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"NF4Linear: x must be float32, bfloat16 or float16 (or set compute_dtype), got {dtype}")
        w = dequantize_nf4(self.weight, dtype=dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(x.to(dtype), w, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.weight!r}")
