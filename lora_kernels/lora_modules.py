"""Drop-in LoRA / QLoRA linear layers over ``qlora_linear`` (the differentiable fused op).

    y = x · Wᵀ + scaling · (dropout(x) · Aᵀ) · Bᵀ + bias

``LoRALinear``: W a frozen dense ``nn.Parameter`` [N, K] (fp32/bf16/fp16).
``QLoRALinear``: W an ``NF4Weight`` (N, K), state dict in ``bnb.nn.Linear4bit``'s keys.

Shapes: x [..., K]; ``lora_A`` [r, K]; ``lora_B`` [N, r]; ``bias`` [N]; ``lora_E`` (AdaLoRA,
optional) [r] (or [r, 1]).  Only ``lora_A``, ``lora_B`` (and ``lora_E``) get gradients.

Key names follow PEFT: ``adapter_state_dict()`` gives ``lora_A.weight`` / ``lora_B.weight`` (as in
PEFT's adapter files); the module's own ``state_dict()`` has ``lora_A`` / ``lora_B`` (plain
parameters) beside the base's keys.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from .autograd import _autocast_on, qlora_linear
from . import library
from .library import dequantize_nf4, quantize_nf4
from .modules import NF4WeightMixin
from .nf4 import NF4FormatError, NF4Weight

__all__ = ["LoRALinear", "QLoRALinear"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    """A frozen Parameter sharing ``t``'s storage (no copy)."""
    if t is None:
        return None
    return nn.Parameter(t.detach(), requires_grad=False)


def _check_export_dtype(name: str, dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{name}.merged_weight: dtype must be a floating-point torch.dtype, got {dtype!r}")


class LoRALinear(nn.Module):
    """y = x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ + bias with a frozen dense W [N, K] (bf16/fp16/fp32).

    Args:
        weight: [N, K] base weight.  Held as a frozen ``nn.Parameter`` that shares ``weight``'s
            storage (no copy): ``merge()`` / ``unmerge()`` change that storage in place.
        bias: [N] or None (held frozen, storage shared).
        r, lora_alpha: rank and alpha; ``scaling`` = alpha / r (alpha / sqrt(r) with ``use_rslora``).
        lora_dropout: dropout probability in [0, 1) on the low-rank path's input (training only).
        lora_A, lora_B: existing ``nn.Parameter``s [r, K] / [N, r]; held as they are (the same
            objects, ``layer.lora_A is lora_A``; never copied or cast).
        init_lora_weights: new adapters are PEFT's default (A kaiming-uniform(a=sqrt(5)) like
            ``nn.Linear``'s weight, B zeros: the layer starts equal to the base); False makes B
            random too (for tests).  New adapters are in the base's compute dtype, on its device.

    ``lora_E`` (default None): set an [r] Parameter for AdaLoRA; the op's scale is then the fp32
    vector ``lora_E.reshape(-1) * scaling`` (and E gets a gradient).

    Compute dtype: x's dtype (under autocast, the autocast dtype); the output is in it.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = False,
                 lora_A: nn.Parameter | None = None, lora_B: nn.Parameter | None = None,
                 init_lora_weights: bool = True):
        super().__init__()
        self._setup(weight, bias, r, lora_alpha, lora_dropout, use_rslora, lora_A, lora_B,
                    init_lora_weights, compute_dtype=None)

    # ------------------------------------------------------------------ construction
    def _set_base(self, weight) -> None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"{type(self).__name__}: weight must be a 2-D tensor [N, K], got "
                            f"{type(weight).__name__}{tuple(weight.shape) if isinstance(weight, torch.Tensor) else ''}")
        if weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}: weight must be float32, bfloat16 or float16, got {weight.dtype}")
        self.weight = _frozen(weight)

    # ------------------------------------------------------------------ state dict and merging
    # A merged layer's base already holds scaling·B·A.  Its state dict (base + adapter, as PEFT's) would
    # apply the adapter twice once loaded into an unmerged layer: saving warns, loading into a merged
    # layer is refused (its unmerge would then subtract the loaded adapter, or restore the old base).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.merged:
            warnings.warn(f"{type(self).__name__} {prefix or '(root)'}: state_dict() of a merged layer holds the "
                          f"merged base and the adapter; loaded into an unmerged layer it applies the adapter "
                          f"twice (unmerge() first, or export merged_weight())", stacklevel=3)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.merged:
            error_msgs.append(f"{prefix or '(root)'}: the {type(self).__name__} is merged; unmerge() it before "
                              f"load_state_dict")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _base_dtype(self) -> torch.dtype:
        """The dtype new adapters are made in (the base's compute dtype)."""
        return self.weight.dtype

    def _setup(self, weight, bias, r, lora_alpha, lora_dropout, use_rslora, lora_A, lora_B,
               init_lora_weights, compute_dtype) -> None:
        name = type(self).__name__
        self.compute_dtype = compute_dtype
        self._set_base(weight)
        self.out_features, self.in_features = (int(s) for s in self.weight.shape)
        N, K = self.out_features, self.in_features
        dev = self.weight.device
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{name}: r must be a positive int, got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
            raise TypeError(f"{name}: lora_alpha must be a number, got {type(lora_alpha).__name__}")
        if not math.isfinite(lora_alpha) or abs(lora_alpha) > library._FP32_MAX:
            raise ValueError(f"{name}: lora_alpha must be finite in float32, got {lora_alpha}")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) \
                or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"{name}: lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != N:
                raise ValueError(f"{name}: bias must be [N={N}], got "
                                 f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
            if bias.device != dev:
                raise ValueError(f"{name}: bias is on {bias.device} but the weight is on {dev}")
        self.bias = _frozen(bias)
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.lora_dropout = float(lora_dropout)
        self.merged = False

        dtype = self._base_dtype()
        for pname, p, shape in (("lora_A", lora_A, (r, K)), ("lora_B", lora_B, (N, r))):
            if p is None:
                continue
            if not isinstance(p, nn.Parameter):
                raise TypeError(f"{name}: {pname} must be an nn.Parameter (it is held as is), got {type(p).__name__}")
            if tuple(p.shape) != shape:
                raise ValueError(f"{name}: {pname} must be {list(shape)} for r={r}, N={N}, K={K}; "
                                 f"got {list(p.shape)}")
            if p.device != dev:
                raise ValueError(f"{name}: {pname} is on {p.device} but the weight is on {dev}")
        if lora_A is None:
            a = torch.empty(r, K, dtype=torch.float32, device=dev)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            lora_A = nn.Parameter(a.to(dtype))
        if lora_B is None:
            b = torch.zeros(N, r, dtype=torch.float32, device=dev)
            if not init_lora_weights:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            lora_B = nn.Parameter(b.to(dtype))
        self.lora_A = lora_A
        self.lora_B = lora_B
        self.register_parameter("lora_E", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> "LoRALinear":
        """Wrap ``linear``'s weight and bias (storage shared, no copy) with new adapters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora)

    # ------------------------------------------------------------------ properties
    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def _scale(self) -> float | torch.Tensor:
        """What the op gets as ``scale``: the float scaling, or the fp32 [r] vector E · scaling."""
        if self.lora_E is None:
            return self.scaling
        if tuple(self.lora_E.shape) not in ((self.r,), (self.r, 1)):
            raise ValueError(f"{type(self).__name__}: lora_E must be [r={self.r}] or [r, 1] (AdaLoRA's), got "
                             f"{tuple(self.lora_E.shape)}")
        e = self.lora_E.reshape(-1)
        return e.float() * self.scaling

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"{name}: x must be a tensor [..., in_features={self.in_features}]")
        if not x.is_floating_point():
            raise TypeError(f"{name}: x must be a floating-point tensor, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{name}: x's last dim is {x.shape[-1]}, expected in_features={self.in_features}")
        if x.device != self.weight.device:
            raise ValueError(f"{name}: x is on {x.device} but the weight is on {self.weight.device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.merged:
            return qlora_linear(x, self.weight, None, None, 1.0, self.bias, dropout=0.0, training=self.training)
        return qlora_linear(x, self.weight, self.lora_A, self.lora_B, self._scale(), self.bias,
                            dropout=self.lora_dropout, training=self.training)

    # ------------------------------------------------------------------ merge / export
    def _delta(self) -> torch.Tensor:
        """scaling · B · A (with AdaLoRA: B · diag(E · scaling) · A) in fp32 [N, K]."""
        s = self._scale()
        a = self.lora_A.detach().float()
        b = self.lora_B.detach().float()
        if isinstance(s, torch.Tensor):
            return (b * s.detach().to(b.device)) @ a
        return (b @ a) * s

    @torch.no_grad()
    def merge(self) -> dict[str, Any] | None:
        """W += scaling · B · A in place (computed in fp32, rounded once to W's dtype); the forward
        then runs the base alone.  Returns None (``QLoRALinear`` returns the merge error)."""
        if self.merged:
            warnings.warn(f"{type(self).__name__}.merge(): already merged, nothing done", stacklevel=2)
            return None
        w = self.weight
        w.copy_(self._checked_sum(w.float() + self._delta(), "merge"))
        self.merged = True
        return None

    def _checked_sum(self, new: torch.Tensor, what: str) -> torch.Tensor:
        """``new`` in the weight's dtype; ValueError (the weight untouched) if it holds NaN/inf -- a
        NaN adapter, or a sum beyond fp16's range -- since the weight is written in place and may be
        a wrapped ``nn.Linear``'s own."""
        new = new.to(self.weight.dtype)
        if not bool(torch.isfinite(new).all()):
            raise ValueError(f"{type(self).__name__}.{what}(): W {'+' if what == 'merge' else '-'} scaling·B·A has "
                             f"NaN/inf values (a non-finite adapter, or beyond {self.weight.dtype}'s range); "
                             f"the weight is left unchanged")
        return new

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= scaling · B · A (the inverse of ``merge``, with the current adapters).  Exact in fp32
        up to one rounding each way; in bf16/fp16 W comes back within a couple of ulps of the
        original (each of merge and unmerge rounds once to W's dtype)."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}.unmerge(): not merged, nothing done", stacklevel=2)
            return
        w = self.weight
        w.copy_(self._checked_sum(w.float() - self._delta(), "unmerge"))
        self.merged = False

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The dense weight with the adapter folded in, [N, K] in ``dtype``; the layer is untouched."""
        _check_export_dtype(type(self).__name__, dtype)
        if self.merged:
            return self.weight.detach().to(dtype, copy=True)
        return (self.weight.float() + self._delta()).to(dtype)

    # ------------------------------------------------------------------ adapter I/O and sizes
    def _adapter_params(self) -> dict[str, nn.Parameter]:
        d = {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
        if self.lora_E is not None:
            d["lora_E"] = self.lora_E
        return d

    def adapter_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``{prefix + "lora_A.weight": A, prefix + "lora_B.weight": B}`` (PEFT's adapter-file key
        names; ``lora_E`` too when set), detached tensors sharing the parameters' storage."""
        return {prefix + k: v.detach() for k, v in self._adapter_params().items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, sd: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """Copy A, B (and E) in place from ``sd`` (keys as ``adapter_state_dict(prefix)``), cast to
        the parameters' dtype.  Raises KeyError for a missing key, ValueError for a shape or rank
        mismatch, an unexpected key under ``prefix`` or a merged layer (``unmerge`` would then subtract
        the new adapter, not the merged one); nothing is copied unless all checks pass."""
        self.check_adapter_state_dict(sd, prefix)
        for k, p in self._adapter_params().items():
            p.copy_(sd[prefix + k].to(device=p.device, dtype=p.dtype))

    def check_adapter_state_dict(self, sd: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """The checks of ``load_adapter_state_dict``, without copying (``load_adapter`` checks every
        layer before it changes any)."""
        name = type(self).__name__
        if self.merged:
            raise ValueError(f"{name}: the layer is merged; unmerge() it before loading another adapter")
        params = self._adapter_params()
        if "lora_E" not in params and prefix + "lora_E" in sd:
            raise ValueError(f"{name}: state dict has {prefix}lora_E (AdaLoRA) but this layer has no lora_E")
        unexpected = sorted(k for k in sd if k.startswith(prefix) and k[len(prefix):] not in params)
        if unexpected:
            raise ValueError(f"{name}: unexpected adapter keys {unexpected}; expected {[prefix + k for k in params]}")
        for k, p in params.items():
            if prefix + k not in sd:
                raise KeyError(f"{name}: adapter state dict has no {prefix + k!r} (keys: {sorted(sd)})")
            v = sd[prefix + k]
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{name}: {prefix + k} must be a tensor, got {type(v).__name__}")
            if not v.is_floating_point():
                raise ValueError(f"{name}: {prefix + k} must be a floating-point tensor, got {v.dtype}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name}: {prefix + k} has NaN/inf values")
            if tuple(v.shape) != tuple(p.shape):
                rank = ""
                if k in ("lora_A.weight", "lora_B.weight") and v.dim() == 2:
                    r_sd = v.shape[0] if k == "lora_A.weight" else v.shape[1]
                    rank = f" (rank {r_sd} in the state dict, r={self.r} in the layer)"
                raise ValueError(f"{name}: {prefix + k}: shape {list(v.shape)} in the state dict, "
                                 f"{list(p.shape)} in the layer{rank}")

    def num_adapter_params(self) -> int:
        """Trainable parameters of the adapter (A, B, and E when set)."""
        return sum(p.numel() for p in self._adapter_params().values())

    def adapter_nbytes(self) -> int:
        """Bytes of the adapter's parameters."""
        return sum(p.numel() * p.element_size() for p in self._adapter_params().values())

    # ------------------------------------------------------------------ repr
    def _base_repr(self) -> str:
        return f"base={self.weight.dtype}"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:.6g}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, {self._base_repr()}, bias={self.bias is not None}, "
                f"adaLoRA={self.lora_E is not None}, merged={self.merged}")


class QLoRALinear(NF4WeightMixin, LoRALinear):
    """Same as ``LoRALinear`` with an ``NF4Weight`` base (double quantization on by default when
    quantizing).

    ``compute_dtype`` (optional, as ``bnb.nn.Linear4bit``'s): x is cast to it for the op and the
    output cast back to x's dtype; None computes in x's dtype.  New adapters are made in
    ``compute_dtype or weight.dtype`` (the weight's original dtype).

    The weight is not a Parameter: ``_apply`` moves it between devices (dtype casts such as
    ``.half()`` never touch the NF4 tensors, only bias and adapters), and the state dict holds it in
    bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``, ...) beside ``bias``,
    ``lora_A``, ``lora_B`` (both from ``NF4WeightMixin``).
    """

    _nf4_attrs = ("weight", "_unmerged_weight")

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = False,
                 lora_A: nn.Parameter | None = None, lora_B: nn.Parameter | None = None,
                 init_lora_weights: bool = True, compute_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # LoRALinear.__init__ would build a dense base
        if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
            raise TypeError(f"QLoRALinear: compute_dtype must be float32, bfloat16, float16 or None, got {compute_dtype}")
        self._unmerged_weight: NF4Weight | None = None
        self._merge_info: dict[str, float] | None = None
        self._setup(weight, bias, r, lora_alpha, lora_dropout, use_rslora, lora_A, lora_B,
                    init_lora_weights, compute_dtype=compute_dtype)

    def _set_base(self, weight) -> None:
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"QLoRALinear: weight must be an NF4Weight (use QLoRALinear.from_linear to quantize "
                            f"a dense layer), got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"QLoRALinear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        self.weight = weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.merged:             # before NF4WeightMixin reads the NF4 keys into the weight
            LoRALinear._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                             unexpected_keys, error_msgs)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _base_dtype(self) -> torch.dtype:
        return self.compute_dtype or self.weight.dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, blocksize: int = 64, double_quant: bool = True,
                    device: torch.device | str | None = None) -> "QLoRALinear":
        """Quantize ``linear.weight`` with ``quantize_nf4`` (on ``device`` if given) and add new adapters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QLoRALinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if device is not None:
            w = w.to(device)
        q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        bias = linear.bias.detach().to(q.device) if linear.bias is not None else None
        return cls(q, bias, r, lora_alpha, lora_dropout, use_rslora)

    @classmethod
    def from_bnb(cls, bnb_linear4bit, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, lora_A: nn.Parameter | None = None,
                 lora_B: nn.Parameter | None = None, init_lora_weights: bool = True,
                 compute_dtype: torch.dtype | None = None) -> "QLoRALinear":
        """From a quantized ``bnb.nn.Linear4bit`` (nf4): its packed data and scales are shared, not
        copied.  ``compute_dtype`` defaults to the bitsandbytes layer's."""
        import bitsandbytes as bnb

        layer = bnb_linear4bit
        if not isinstance(layer, bnb.nn.Linear4bit):
            raise TypeError(f"QLoRALinear.from_bnb: expected a bitsandbytes.nn.Linear4bit, got {type(layer).__name__} "
                            "(use QLoRALinear.from_linear for a dense nn.Linear)")
        p = layer.weight
        qt = getattr(p, "quant_type", None) or getattr(getattr(p, "quant_state", None), "quant_type", None)
        if qt is not None and qt != "nf4":
            raise NF4FormatError(f"QLoRALinear.from_bnb: only nf4 is supported, this layer is {qt!r}")
        if getattr(p, "quant_state", None) is None:
            raise NF4FormatError("QLoRALinear.from_bnb: the layer's weight is not quantized yet (bitsandbytes "
                                 "quantizes when the layer is moved to a device: call .to(device) first)")
        q = NF4Weight.from_bnb(p)
        bias = layer.bias.detach() if layer.bias is not None else None
        if compute_dtype is None:
            compute_dtype = getattr(layer, "compute_dtype", None)
        return cls(q, bias, r, lora_alpha, lora_dropout, use_rslora, lora_A, lora_B, init_lora_weights,
                   compute_dtype=compute_dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.is_cuda:
            y = self._decode(x)
            if y is not None:
                return y
        self._check_input(x)
        in_dtype = x.dtype
        cast = self.compute_dtype is not None and not _autocast_on(x.device.type)
        if cast:
            x = x.to(self.compute_dtype)
        y = super().forward(x)
        return y.to(in_dtype) if cast else y

    def _decode(self, x: torch.Tensor) -> torch.Tensor | None:
        """Inference fast path (no autograd): straight to ``library.decode_linear`` (the decode
        kernel, one extension call) when the general path would take the same route with the same
        arguments; None otherwise.  Skips the per-call Python checks of ``qlora_linear``: on a slow
        host they cost more than the kernel (benchmarks/NOTES.md, sessions 4 and 15; the adapters
        are read from ``_parameters`` directly: ``nn.Module.__getattr__`` costs ~0.5 us a name there)."""
        params = self._parameters
        if ((self.compute_dtype is not None and self.compute_dtype != x.dtype) or params.get("lora_E") is not None
                or (self.training and self.lora_dropout > 0) or torch.is_autocast_enabled("cuda")
                or torch.compiler.is_compiling()):
            return None
        bias = params["bias"] if "bias" in params else self.bias    # (a None bias is a plain attribute)
        if self.merged:
            return library.decode_linear(x, self.weight, None, None, 1.0, bias)
        lora_a, lora_b = params.get("lora_A"), params.get("lora_B")
        if lora_a is None or lora_b is None:
            return None                    # the general path says what is missing
        return library.decode_linear(x, self.weight, lora_a, lora_b, self.scaling, bias)

    # ------------------------------------------------------------------ merge / export
    @torch.no_grad()
    def merge(self) -> dict[str, float]:
        """Fold the adapter into the NF4 base: dequantize → add scaling · B · A (fp32) → re-quantize
        with the same blocksize and double quantization.  The pre-merge ``NF4Weight`` is kept, so
        ``unmerge()`` is exact.  Returns the merge error of the re-quantized weight Ŵ against the
        exact merged weight W* = dequant(W) + ΔW:
        ``rel_error`` = ‖Ŵ − W*‖_F / ‖W*‖_F, ``max_abs_error``, and ``delta_rel_error`` =
        ‖Ŵ − W*‖_F / ‖ΔW‖_F (how much of the adapter's change the NF4 rounding swamps; inf for ΔW = 0).
        """
        if self.merged:
            warnings.warn("QLoRALinear.merge(): already merged, nothing done", stacklevel=2)
            return dict(self._merge_info)
        w = self.weight
        delta = self._delta()
        exact = dequantize_nf4(w, dtype=torch.float32) + delta
        new = quantize_nf4(exact.to(w.dtype), blocksize=w.blocksize, double_quant=w.double_quant)
        err = dequantize_nf4(new, dtype=torch.float32) - exact
        en = err.norm().item()
        dn = delta.norm().item()
        info = {"rel_error": en / max(exact.norm().item(), 1e-30),
                "max_abs_error": err.abs().max().item(),
                "delta_rel_error": en / dn if dn > 0 else (0.0 if en == 0 else math.inf)}
        self._unmerged_weight = w
        self.weight = new
        self._merge_info = info
        self.merged = True
        return dict(info)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the pre-merge NF4 weight (exact: bit-identical to before ``merge``)."""
        if not self.merged:
            warnings.warn("QLoRALinear.unmerge(): not merged, nothing done", stacklevel=2)
            return
        self.weight = self._unmerged_weight
        self._unmerged_weight = None
        self._merge_info = None
        self.merged = False

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Dense dequant(W) + ΔW [N, K] in ``dtype`` (from the pre-merge base when merged, so it is
        the exact merge, not the re-quantized one); the layer is untouched."""
        _check_export_dtype(type(self).__name__, dtype)
        base = self._unmerged_weight if self.merged else self.weight
        return (dequantize_nf4(base, dtype=torch.float32) + self._delta()).to(dtype)

    def _base_repr(self) -> str:
        w = self.weight
        return (f"base=NF4 ({w.bits_per_param:.3f} bits/param, blocksize={w.blocksize}, "
                f"double_quant={w.double_quant}, dtype={w.dtype}), compute_dtype={self.compute_dtype}")
