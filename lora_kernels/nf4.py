"""``NF4Weight``: a weight stored in bitsandbytes' NF4 format (optionally double-quantized), its
state-dict form (bitsandbytes' keys) and conversions to and from bitsandbytes objects.

Storage (see ``reference.py`` for the math and ``../shared/nf4-format.md``):

=============  ==================================  =======================================
field          dtype / shape                       meaning
=============  ==================================  =======================================
packed         uint8 [(n + 1) // 2, 1]             two 4-bit indices a byte, high nibble first
absmax         fp32 [nb]  or uint8 [nb] (nested)   per-block scale, or its 8-bit code
code           fp32 [16]                           the NF4 levels ("quant_map")
nested_absmax  fp32 [ceil(nb / 256)] or None       scale of each block of 256 absmax values
nested_code    fp32 [256] or None                  the dynamic 8-bit map ("nested_quant_map")
offset         fp32 0-d or None                    mean of the absmax values
shape, dtype   torch.Size, torch.dtype             the original weight's shape and dtype
blocksize      int                                 elements per block (32 .. 4096)
=============  ==================================  =======================================
with ``n = prod(shape)`` and ``nb = ceil(n / blocksize)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import InitVar, dataclass, fields, replace
from typing import Any, Mapping

import torch

from .codes import NESTED_BLOCKSIZE, NF4_CODE, VALID_BLOCKSIZES, dynamic_code, nf4_code

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_QS_KEY = "quant_state.bitsandbytes__nf4"
_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", _QS_KEY)


class NF4FormatError(ValueError):
    """A quantized weight or a state dict does not describe a valid NF4 weight."""


def _dtype_from_name(name: str, what: str) -> torch.dtype:
    for dt, dt_name in _DTYPE_NAMES.items():
        if name == dt_name:
            return dt
    raise NF4FormatError(f"{what}: unsupported dtype {name!r}; expected one of {sorted(_DTYPE_NAMES.values())}")


def _check_nested_dtype(dtype: torch.dtype, what: str) -> None:
    """bitsandbytes recovers the absmax in its nested dtype (dyn[q] * nested_absmax, before the offset)
    and always writes float32 there; ours recover it in float32 only."""
    if dtype != torch.float32:
        raise NF4FormatError(f"{what} is {_DTYPE_NAMES.get(dtype, dtype)!s}, only float32 is supported (what "
                             f"bitsandbytes writes): bitsandbytes would recover this weight's absmax rounded to "
                             f"that dtype, which lora_kernels does not reproduce")


@dataclass(eq=False)      # equality is identity: a field-wise == on tensors has no single truth value
class NF4Weight:
    """A frozen weight in NF4 (see the module docstring for every field)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    #: also compare the code tables with the format's values (a device sync); the quantizer,
    #: which writes those tables itself, skips it
    check_tables: InitVar[bool] = True

    def __post_init__(self, check_tables: bool = True):
        self.shape = torch.Size(self.shape)
        self.validate(check_tables)

    @classmethod
    def unchecked(cls, packed, absmax, code, shape, dtype, blocksize, nested_absmax, nested_code, offset) -> "NF4Weight":
        """A view of tensors taken from a weight that was validated when it was built (the autograd
        Functions rebuild one per call from their saved tensors): no ``validate``, which costs
        ~20 µs of host time per call on a slow host.  Anything else should use the constructor."""
        self = cls.__new__(cls)
        self.__dict__.update(packed=packed, absmax=absmax, code=code, shape=torch.Size(shape), dtype=dtype,
                             blocksize=blocksize, nested_absmax=nested_absmax, nested_code=nested_code,
                             offset=offset)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by field name (None fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        """Bytes of every stored tensor (what the weight costs in memory)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_param(self) -> float:
        """Bits per weight element of packed data + scales (tables excluded)."""
        scale_bytes = self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            scale_bytes += self.nested_absmax.numel() * 4 + 4
        return 8 * (self.packed.numel() + scale_bytes) / self.numel

    # ------------------------------------------------------------------ checks
    def validate(self, check_tables: bool = True) -> None:
        """Raise NF4FormatError naming the first field that is inconsistent (``check_tables``:
        also compare the NF4 table's values, which costs a device sync; skipped while
        ``torch.compile`` traces -- a data-dependent check there is a graph break per layer, and the
        weight was checked when it was quantized or loaded)."""
        check_tables = check_tables and not torch.compiler.is_compiling()
        n = self.numel
        if n < 1 or any(d < 1 for d in self.shape):
            raise NF4FormatError(f"shape {tuple(self.shape)} must have positive dimensions")
        if (isinstance(self.blocksize, bool) or not isinstance(self.blocksize, (int, torch.SymInt))
                or self.blocksize not in VALID_BLOCKSIZES):           # 64.0 would pass the `in`
            raise NF4FormatError(f"blocksize must be an int, one of {VALID_BLOCKSIZES}; got {self.blocksize!r} "
                                 f"({type(self.blocksize).__name__})")
        if self.dtype not in _DTYPE_NAMES:
            raise NF4FormatError(f"dtype {self.dtype} is not one of float32, bfloat16, float16")
        t = self.packed
        if t.dtype != torch.uint8 or t.numel() != (n + 1) // 2:
            raise NF4FormatError(f"packed must be uint8 with {(n + 1) // 2} elements for shape {tuple(self.shape)}, "
                                 f"got {t.dtype} with {t.numel()}")
        nb = self.nblocks
        want = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != nb:
            raise NF4FormatError(f"absmax must be {want} with {nb} elements "
                                 f"({'double-quantized' if self.double_quant else 'not double-quantized'}), "
                                 f"got {self.absmax.dtype} with {self.absmax.numel()}")
        if self.code.dtype != torch.float32 or self.code.numel() != 16:
            raise NF4FormatError(f"code (quant_map) must be fp32 [16], got {self.code.dtype} {tuple(self.code.shape)}")
        if check_tables and not torch.equal(self.code.cpu(), nf4_code()):
            raise NF4FormatError("code (quant_map) is not the NF4 table (an fp4 or corrupted weight?)")
        if not self.packed.is_contiguous():
            raise NF4FormatError("packed must be contiguous")
        if self.double_quant:
            nn_ = -(-nb // NESTED_BLOCKSIZE)
            if self.nested_absmax.dtype != torch.float32 or self.nested_absmax.numel() != nn_:
                raise NF4FormatError(f"nested_absmax must be fp32 with {nn_} elements, got "
                                     f"{self.nested_absmax.dtype} with {self.nested_absmax.numel()}")
            if self.nested_code is None or self.nested_code.dtype != torch.float32 or self.nested_code.numel() != 256:
                raise NF4FormatError("nested_code (nested_quant_map) must be fp32 [256]")
            if self.offset is None or self.offset.dtype != torch.float32 or self.offset.numel() != 1:
                raise NF4FormatError("offset must be an fp32 scalar tensor when double-quantized")
        elif self.nested_code is not None or self.offset is not None:
            raise NF4FormatError("nested_code/offset given without nested_absmax")
        if check_tables:    # the scales' values (one device sync, as the table check above)
            self._check_scale_values()
        devices = {v.device for v in self.tensors().values()}
        if len(devices) != 1:
            raise NF4FormatError(f"all tensors of an NF4Weight must be on one device, got {sorted(map(str, devices))}")

    def _check_scale_values(self) -> None:
        """NF4FormatError for scale values no quantizer writes: a block scale (absmax, nested absmax)
        negative or NaN/inf, a NaN/inf offset, a nested table other than the 8-bit dynamic one.
        (A negative absmax would flip its block's sign on dequantize, silently.)"""
        name, t = ("nested_absmax", self.nested_absmax) if self.double_quant else ("absmax", self.absmax)
        if self.double_quant and not torch.equal(self.nested_code.cpu(), dynamic_code()):
            raise NF4FormatError("nested_code (nested_quant_map) is not bitsandbytes' 8-bit dynamic table "
                                 "(a corrupted weight?)")
        offset = self.offset if self.double_quant else t.new_zeros(())
        finite, nonneg, offset_ok = torch.stack([torch.isfinite(t).all(), (t >= 0).all(),
                                                 torch.isfinite(offset).reshape(())]).tolist()
        if not finite:
            raise NF4FormatError(f"{name} has NaN/inf values (a corrupted weight?)")
        if not offset_ok:
            raise NF4FormatError("offset has NaN/inf values (a corrupted weight?)")
        if not nonneg:
            raise NF4FormatError(f"{name} has negative values; block scales are absolute maxima (a corrupted "
                                 f"weight?)")

    # ------------------------------------------------------------------ conversions
    def to(self, device: torch.device | str) -> "NF4Weight":
        """A copy on ``device`` (dtypes never change: the format is fixed)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"NF4Weight.to: takes a device, got the dtype {device}; the stored format's dtypes are "
                            "fixed (dequantize(dtype) gives a dense weight in any float dtype)")
        return replace(self, **{k: v.to(device) for k, v in self.tensors().items()}, check_tables=False)

    def dequantize(self, dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
        """The weight as a dense tensor of ``self.shape`` (see ``lora_kernels.dequantize_nf4``)."""
        from .library import dequantize_nf4

        return dequantize_nf4(self, dtype=dtype, backend=backend)

    def __repr__(self) -> str:
        dq = "single_quant"
        if self.double_quant:
            dq = ("double_quant (offset on meta)" if self.offset.is_meta
                  else f"double_quant (offset={self.offset.item():.6g})")
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, {dq}, "
                f"device={self.device}, {self.nbytes() / 2**20:.2f} MiB, {self.bits_per_param:.3f} bits/param)")

    # ------------------------------------------------------------------ state dict (bitsandbytes keys)
    def quant_state_json(self) -> dict[str, Any]:
        """The non-tensor items, in bitsandbytes' order, as stored in ``quant_state.bitsandbytes__nf4``."""
        d: dict[str, Any] = {"quant_type": "nf4", "blocksize": self.blocksize,
                             "dtype": _DTYPE_NAMES[self.dtype], "shape": list(self.shape)}
        if self.double_quant:
            d.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                     nested_offset=self.offset.item())
        return d

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """``bnb.nn.Linear4bit``'s keys: ``{prefix}``, ``{prefix}.absmax``, ``{prefix}.quant_map``, ..."""
        qs = json.dumps(self.quant_state_json()).encode("utf-8")
        sd = {prefix: self.packed.reshape(-1, 1), f"{prefix}.absmax": self.absmax,
              f"{prefix}.quant_map": self.code}
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_code
        sd[f"{prefix}.{_QS_KEY}"] = torch.tensor(list(qs), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "weight",
                        device: torch.device | str | None = None) -> "NF4Weight":
        """Read a weight saved by ``state_dict`` or by ``bnb.nn.Linear4bit`` (same keys)."""
        if prefix not in sd:
            raise NF4FormatError(f"state dict has no {prefix!r} entry")
        bad = [k for k, v in sd.items()
               if (k == prefix or k.startswith(prefix + ".")) and not isinstance(v, torch.Tensor)]
        if bad:
            raise NF4FormatError(f"state dict entries {bad} are not tensors")
        qs_keys = [k for k in sd if k.startswith(f"{prefix}.quant_state.")]
        if not qs_keys:
            raise NF4FormatError(f"state dict has no {prefix}.{_QS_KEY} entry (not a 4-bit weight?)")
        if qs_keys != [f"{prefix}.{_QS_KEY}"]:
            raise NF4FormatError(f"expected exactly {prefix}.{_QS_KEY}, found {qs_keys} (fp4 is not supported)")
        blob = sd[qs_keys[0]]
        if blob.dim() != 1:
            raise NF4FormatError(f"{qs_keys[0]} must be a 1-D tensor of JSON bytes, got shape {tuple(blob.shape)}")
        try:
            meta = json.loads(bytes(blob.cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise NF4FormatError(f"{qs_keys[0]} is not valid UTF-8 JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("quant_type") != "nf4":
            raise NF4FormatError(f"{qs_keys[0]}: quant_type must be 'nf4', got {meta.get('quant_type') if isinstance(meta, dict) else meta!r}")
        known = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"}
        if set(meta) - known:
            raise NF4FormatError(f"{qs_keys[0]}: unknown fields {sorted(set(meta) - known)}")
        for k in ("blocksize", "dtype", "shape"):
            if k not in meta:
                raise NF4FormatError(f"{qs_keys[0]}: missing field {k!r}")
        nested = f"{prefix}.nested_absmax" in sd
        for k in [f"{prefix}.absmax", f"{prefix}.quant_map"] + (
                [f"{prefix}.nested_quant_map"] if nested else []):
            if k not in sd:
                raise NF4FormatError(f"state dict has no {k!r} entry")
        if nested:
            if meta.get("nested_blocksize") != NESTED_BLOCKSIZE or "nested_offset" not in meta:
                raise NF4FormatError(f"{qs_keys[0]}: nested_blocksize must be {NESTED_BLOCKSIZE} "
                                     f"and nested_offset present, got {meta}")
            _check_nested_dtype(_dtype_from_name(meta.get("nested_dtype", ""), f"{qs_keys[0]} nested_dtype"),
                                f"{qs_keys[0]}: nested_dtype")
        packed = sd[prefix]
        if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage: same bytes viewed as another dtype
            packed = packed.contiguous().view(torch.uint8)
        ref = packed if device is None else packed.to(device)
        dev = ref.device
        get = lambda k: sd[k].to(dev)
        if not (isinstance(meta["shape"], list) and all(type(d) is int for d in meta["shape"])):
            raise NF4FormatError(f"{qs_keys[0]}: shape must be a list of ints, got {meta['shape']!r}")
        shape = torch.Size(meta["shape"])
        if type(meta["blocksize"]) is not int:
            raise NF4FormatError(f"{qs_keys[0]}: blocksize must be an int, got {meta['blocksize']!r}")
        if nested and (isinstance(meta["nested_offset"], bool) or not isinstance(meta["nested_offset"], (int, float))):
            raise NF4FormatError(f"{qs_keys[0]}: nested_offset must be a number, got {meta['nested_offset']!r}")
        return cls(
            packed=ref.reshape(-1, 1),
            absmax=get(f"{prefix}.absmax"),
            code=get(f"{prefix}.quant_map"),
            shape=shape,
            dtype=_dtype_from_name(meta["dtype"], f"{qs_keys[0]} dtype"),
            blocksize=meta["blocksize"],
            nested_absmax=get(f"{prefix}.nested_absmax") if nested else None,
            nested_code=get(f"{prefix}.nested_quant_map") if nested else None,
            offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=dev) if nested else None,
        )

    # ------------------------------------------------------------------ bitsandbytes objects
    def to_bnb_quant_state(self):
        """A ``bitsandbytes.functional.QuantState`` sharing this weight's tensors."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code,
                                blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
                          quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2)

    def to_bnb_params(self):
        """A ``bitsandbytes.nn.Params4bit`` (nf4) sharing this weight's tensors."""
        import bitsandbytes as bnb

        return bnb.nn.Params4bit.from_prequantized(
            self.packed.reshape(-1, 1), self.to_bnb_quant_state().as_dict(packed=True), device=self.device)

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> "NF4Weight":
        """From a ``Params4bit`` (or packed data + ``QuantState``) quantized as nf4 by bitsandbytes."""
        qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if qs is None:
            raise NF4FormatError("weight has no quant_state: not quantized yet (move the bitsandbytes layer "
                                 "to a device first) or not a bitsandbytes 4-bit weight")
        if not all(hasattr(qs, a) for a in ("quant_type", "absmax", "code", "shape", "dtype", "blocksize")):
            raise NF4FormatError(f"quant_state must be a bitsandbytes QuantState, got {type(qs).__name__}")
        if qs.quant_type != "nf4":
            raise NF4FormatError(f"only nf4 is supported, this weight is {qs.quant_type!r}")
        if getattr(qs, "packing_format_for_cpu", False):
            raise NF4FormatError("bitsandbytes repacked this weight for its AVX512-BF16 CPU kernel (a Linear4bit "
                                 "run in eval mode on the CPU): it is no longer in the NF4 storage format; reload "
                                 "it, or see lora_kernels.integrations.bnb_cpu.use_portable_bnb_cpu_paths")
        data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        if not isinstance(data, torch.Tensor):
            raise NF4FormatError(f"weight must be a Params4bit or a packed tensor, got {type(weight).__name__}")
        if data.dtype != torch.uint8:
            data = data.contiguous().view(torch.uint8)
        nested = getattr(qs, "nested", qs.state2 is not None)
        offset = None
        if nested:
            if qs.state2.blocksize != NESTED_BLOCKSIZE:
                raise NF4FormatError(f"nested blocksize {qs.state2.blocksize} is not {NESTED_BLOCKSIZE}")
            _check_nested_dtype(qs.state2.dtype, "quant_state.state2.dtype")
            offset = torch.as_tensor(qs.offset, dtype=torch.float32).to(data.device).reshape(())
        return cls(packed=data.reshape(-1, 1), absmax=qs.absmax, code=qs.code.float(), shape=qs.shape,
                   dtype=qs.dtype, blocksize=int(qs.blocksize),
                   nested_absmax=qs.state2.absmax if nested else None,
                   nested_code=qs.state2.code if nested else None, offset=offset)


def is_nf4_state_dict(sd: Mapping[str, Any], prefix: str = "weight") -> bool:
    """True when ``sd`` holds a bitsandbytes nf4 weight under ``prefix``."""
    return f"{prefix}.{_QS_KEY}" in sd


__all__ = ["NF4Weight", "NF4FormatError", "is_nf4_state_dict", "NF4_CODE", "dynamic_code", "nf4_code"]
