"""QLoRA under PyTorch's own distributed engines: FSDP2 (``fully_shard``) and DDP.

FSDP2 shards and all-gathers *parameters*; a ``QLoRALinear`` / ``NF4Linear`` keeps its frozen NF4
weight outside them (an ``NF4Weight`` attribute), so FSDP2 would never see it.
``nf4_to_parameters(model)`` (which ``prepare_fsdp2`` calls) changes that in place, layer by layer:

* every NF4 tensor of the weight -- packed 4-bit data, absmax (uint8 codes, or fp32 without double
  quantization), nested absmax (fp32), offset (fp32) -- is copied, byte for byte, into ONE frozen
  1-D ``uint8`` ``nn.Parameter`` named ``nf4_data`` (layout below); the original tensors are
  dropped, so the layer holds its weight once;
* the layer's class becomes a subclass (``FlatNF4QLoRALinear``, ``FlatNF4Linear``) whose
  ``weight`` is a read-only property: an ``NF4Weight`` whose tensors are views into whatever
  ``nf4_data`` is *now* -- the unsharded parameter FSDP2 has all-gathered and registered for the
  forward / backward.  The non-tensor quant state (shape, dtype, blocksize, double quantization,
  the byte layout) is Python metadata of the layer, identical on every rank and never
  communicated; the two code tables (NF4 levels, dynamic 8-bit map) are the format's constants,
  checked at conversion and taken from one per-device copy (``codes.py``);
* ``bnb.nn.Linear4bit`` layers (nf4, e.g. the base layers of a PEFT model) are replaced by a
  ``FlatNF4Linear`` over the same bytes (``NF4Weight.from_bnb``), keeping the bias Parameter and
  ``compute_dtype``; ``patch_peft_model``'s fused forward accepts that base (it keeps bitsandbytes'
  ``compute_dtype`` semantics).

So what FSDP2 shards (``Shard(0)`` of the 1-D byte tensor, padded by FSDP2 to a multiple of the
world size when uneven) and all-gathers is the 4-bit format itself: 4.127 bits per weight element
at blocksize 64 with double quantization (plus at most 30 bytes of alignment per layer, 0 for the
usual shapes), never a bf16 copy.  LoRA A/B and the bias stay ordinary parameters and are sharded
like any parameter.  The layer's forward after the all-gather sees exactly the ``NF4Weight`` it
had before sharding (same bytes, same metadata).

Byte layout of ``nf4_data`` (offsets rounded up to 16 bytes so that every section can be viewed as
its dtype and is aligned for vector loads)::

    [packed: ceil(n/2) B][pad][absmax: nb B (uint8) or 4·nb B (fp32)][pad][nested_absmax: 4·ceil(nb/256) B][offset: 4 B]

Mixed precision: ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` casts only floating-point
parameters -- FSDP2 leaves non-floating-point ones in their dtype (``_fsdp_param.py`` clamps
``param_dtype`` to None for them) -- and the NF4 storage, its fp32 scales included, is one uint8
parameter, so none of it is ever cast; LoRA A/B and the bias are all-gathered in bf16, the layer
computes in its input's dtype (bf16 then; the NF4 weight is dequantized to it), and gradients
are reduced in ``reduce_dtype`` (default: ``param_dtype``).  A group mixing the uint8 storage with
float parameters is all-gathered by FSDP2 as one uint8 buffer (byte views); that is FSDP2's own
mechanism for mixed dtypes.

DDP: ``prepare_ddp`` keeps the NF4 weight out of every parameter and buffer (and puts any
bitsandbytes ``Params4bit`` on DDP's ignore list), uses ``broadcast_buffers=False`` and checks
that every rank holds the same base, so only the trainable (LoRA) parameters are all-reduced and
the frozen 4-bit base is never broadcast, neither at construction nor per step.

Public API::

    prepare_fsdp2(model, mesh=None, mp_policy=None, *, reshard_after_forward=True,
                  shard_modules=None, check_base=True) -> model   (fully_shard applied, in place)
    prepare_ddp(model, *, device_ids=None, broadcast_buffers=False, check_base=True, **ddp_kwargs)
        -> DistributedDataParallel
    nf4_to_parameters(model) / nf4_from_parameters(model) -> list of layer names  (no process group)
    nf4_all_gather_bytes(model) -> NF4GatherStats   (bytes of the NF4 bases FSDP2 all-gathers)
    attach_all_gather_meter(model) -> AllGatherMeter (counts what every FSDP2 all-gather moves)
    check_nf4_bases_match(model, group=None)         (raises naming the layers that differ)

Checkpoints: the sharded state dict (``torch.distributed.checkpoint`` with
``get_model_state_dict``) holds ``<layer>.nf4_data`` (uint8 DTensor) and ``<layer>._extra_state``
(the layout, checked on load) instead of bitsandbytes' ``weight``, ``weight.absmax``, ... keys;
``nf4_from_parameters`` on an unsharded model gives back ordinary layers (and those keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .codes import dynamic_code, nf4_code
from .lora_modules import QLoRALinear
from .modules import NF4Linear, NF4WeightMixin
from .nf4 import NF4Weight

__all__ = [
    "AllGatherMeter", "FlatNF4Linear", "FlatNF4QLoRALinear", "NF4DistributedError", "NF4GatherStats",
    "attach_all_gather_meter", "check_nf4_bases_match", "nf4_all_gather_bytes", "nf4_from_parameters",
    "nf4_to_parameters", "prepare_ddp", "prepare_fsdp2",
]

_ALIGN = 16
_FLAT_NAME = "nf4_data"


class NF4DistributedError(RuntimeError):
    """A model, layer or process group that the distributed helpers cannot work with (the message
    says what and how to fix it)."""


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---------------------------------------------------------------------------------------------
# The byte layout of one NF4 weight inside its uint8 parameter
@dataclass(frozen=True)
class NF4FlatLayout:
    """Where each NF4 tensor lives in the flat uint8 parameter, and the weight's metadata."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    double_quant: bool
    packed: tuple[int, int]                 # (byte offset, bytes)
    absmax: tuple[int, int]
    nested_absmax: tuple[int, int] | None
    offset: int | None                      # byte offset of the fp32 offset (4 bytes)
    nbytes: int                             # length of the uint8 parameter

    @classmethod
    def of(cls, w: NF4Weight) -> "NF4FlatLayout":
        pos = 0
        packed = (pos, w.packed.numel())
        pos = _round_up(pos + packed[1], _ALIGN)
        absmax = (pos, w.absmax.numel() * w.absmax.element_size())
        pos += absmax[1]
        nested = off = None
        if w.double_quant:
            pos = _round_up(pos, _ALIGN)
            nested = (pos, w.nested_absmax.numel() * 4)
            pos += nested[1]            # fp32: stays 4-aligned
            off = pos
            pos += 4
        return cls(tuple(int(s) for s in w.shape), w.dtype, int(w.blocksize), w.double_quant, packed, absmax,
                   nested, off, pos)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def storage_bytes(self) -> int:
        """Bytes of the NF4 tensors themselves (packed + absmax + nested absmax + offset): what
        ``NF4Weight.bits_per_param`` counts; ``nbytes`` minus the alignment padding."""
        return self.packed[1] + self.absmax[1] + (self.nested_absmax[1] + 4 if self.double_quant else 0)

    def pack(self, w: NF4Weight) -> torch.Tensor:
        """The uint8 tensor [nbytes] holding ``w``'s bytes (padding zeroed), on ``w``'s device."""
        out = torch.zeros(self.nbytes, dtype=torch.uint8, device=w.device)
        parts = [(self.packed, w.packed), (self.absmax, w.absmax)]
        if self.double_quant:
            parts += [(self.nested_absmax, w.nested_absmax), ((self.offset, 4), w.offset)]
        for (start, n), t in parts:
            out[start:start + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        return out

    def unpack(self, flat: torch.Tensor) -> NF4Weight:
        """An ``NF4Weight`` whose tensors are views into ``flat`` (no copy)."""
        if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.numel() != self.nbytes:
            raise NF4DistributedError(f"flat NF4 storage must be uint8 [{self.nbytes}], got {flat.dtype} "
                                      f"{tuple(flat.shape)}")
        dev = flat.device
        code, nested_code = _tables(dev)

        def sec(start: int, n: int) -> torch.Tensor:
            return flat[start:start + n]

        packed = sec(*self.packed).view(-1, 1)
        absmax = sec(*self.absmax)
        if not self.double_quant:
            absmax = absmax.view(torch.float32)
        nested = offset = None
        if self.double_quant:
            nested = sec(*self.nested_absmax).view(torch.float32)
            offset = sec(self.offset, 4).view(torch.float32).reshape(())
        return NF4Weight(packed=packed, absmax=absmax, code=code, shape=torch.Size(self.shape), dtype=self.dtype,
                         blocksize=self.blocksize, nested_absmax=nested,
                         nested_code=nested_code if self.double_quant else None, offset=offset, check_tables=False)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": str(self.dtype).replace("torch.", ""),
                "blocksize": self.blocksize, "double_quant": self.double_quant, "packed": list(self.packed),
                "absmax": list(self.absmax),
                "nested_absmax": list(self.nested_absmax) if self.nested_absmax else None,
                "offset": self.offset, "nbytes": self.nbytes}


_TABLE_CACHE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The format's two code tables on ``device`` (one shared, read-only copy per device)."""
    device = torch.device(device)
    if device not in _TABLE_CACHE:
        _TABLE_CACHE[device] = (nf4_code(device), dynamic_code(device))
    return _TABLE_CACHE[device]


# ---------------------------------------------------------------------------------------------
# The layers with a flat NF4 parameter
def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


class _FlatNF4Mixin:
    """Mixed in front of an ``NF4WeightMixin`` layer whose NF4 weight lives in the frozen uint8
    Parameter ``nf4_data``; ``weight`` is rebuilt from it (see the module docstring)."""

    _lk_flat_base: type  # the class this one was derived from (restored by nf4_from_parameters)

    @property
    def weight(self) -> NF4Weight:
        flat = self._parameters.get(_FLAT_NAME)
        if flat is None:
            raise NF4DistributedError(f"{type(self).__name__}: no {_FLAT_NAME} parameter (converted incompletely?)")
        if _is_dtensor(flat):
            raise NF4DistributedError(
                f"{type(self).__name__}: the NF4 weight is sharded by FSDP2 (only 1/world_size of its bytes is on "
                "this rank outside forward/backward); call the FSDP module's unshard() first, or read it inside "
                "forward")
        cache = self.__dict__.get("_lk_flat_cache")
        if cache is not None and cache[0] is flat and cache[1] == flat.data_ptr():
            return cache[2]
        w = self._nf4_layout.unpack(flat.detach())
        self.__dict__["_lk_flat_cache"] = (flat, flat.data_ptr(), w)
        return w

    @weight.setter
    def weight(self, value) -> None:
        raise NF4DistributedError(
            f"{type(self).__name__}: the NF4 weight is held as the flat parameter {_FLAT_NAME!r} (for FSDP2) and "
            "cannot be replaced (merge/unmerge, loading bitsandbytes keys); call "
            "lora_kernels.distributed.nf4_from_parameters(model) on an unsharded model first")

    def merge(self):
        raise NF4DistributedError(f"{type(self).__name__}.merge(): not supported while the NF4 weight is a flat "
                                  "(FSDP2) parameter; call nf4_from_parameters(model) on an unsharded model first")

    def unmerge(self):
        raise NF4DistributedError(f"{type(self).__name__}.unmerge(): not supported while the NF4 weight is a flat "
                                  "(FSDP2) parameter")

    # nn.Module's own device moves and state dict: the flat tensor is an ordinary parameter
    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_lk_flat_cache", None)
        return nn.Module._apply(self, fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.__dict__.pop("_lk_flat_cache", None)
        if prefix + "_extra_state" in state_dict:  # refuse another layout before any byte is copied
            self.set_extra_state(state_dict[prefix + "_extra_state"])
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)

    def get_extra_state(self) -> dict[str, Any]:
        return {"nf4_layout": self._nf4_layout.to_json()}

    def set_extra_state(self, state) -> None:
        got = state.get("nf4_layout") if isinstance(state, dict) else None
        want = self._nf4_layout.to_json()
        if got != want:
            raise NF4DistributedError(f"{type(self).__name__}: checkpoint NF4 layout {got} does not match this layer's "
                                      f"{want} (a checkpoint of another model or quantization?)")

    def _layout_repr(self) -> str:
        lay = self._nf4_layout
        bits = 8 * lay.storage_bytes / lay.numel
        return (f"base=NF4 flat {_FLAT_NAME}[{lay.nbytes}] uint8 ({bits:.3f} bits/param, blocksize={lay.blocksize}, "
                f"double_quant={lay.double_quant}, dtype={lay.dtype})")


class FlatNF4QLoRALinear(_FlatNF4Mixin, QLoRALinear):
    """``QLoRALinear`` whose NF4 weight is the flat uint8 Parameter ``nf4_data`` (made by
    ``nf4_to_parameters``; forward and adapters unchanged)."""

    _lk_flat_base = QLoRALinear

    def _base_repr(self) -> str:
        return f"{self._layout_repr()}, compute_dtype={self.compute_dtype}"


class FlatNF4Linear(_FlatNF4Mixin, NF4Linear):
    """``NF4Linear`` whose NF4 weight is the flat uint8 Parameter ``nf4_data``."""

    _lk_flat_base = NF4Linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._layout_repr()}, compute_dtype={self.compute_dtype}")


_FLAT_CLASSES: dict[type, type] = {QLoRALinear: FlatNF4QLoRALinear, NF4Linear: FlatNF4Linear}


def _flat_class(cls: type) -> type:
    if cls not in _FLAT_CLASSES:
        extra = set(getattr(cls, "_nf4_attrs", ("weight",))) - {"weight", "_unmerged_weight"}
        if extra:
            raise NF4DistributedError(f"{cls.__name__} holds more NF4 weights ({sorted(extra)}) than 'weight'; "
                                      "only the layer's own weight can be made a flat parameter")
        _FLAT_CLASSES[cls] = type(f"FlatNF4{cls.__name__}", (_FlatNF4Mixin, cls),
                                  {"_lk_flat_base": cls, "__module__": __name__})
    return _FLAT_CLASSES[cls]


def _is_bnb_4bit(mod: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except Exception:
        return False
    return isinstance(mod, bnb.nn.Linear4bit)


def _check_tables(w: NF4Weight, name: str) -> None:
    code, nested = _tables(torch.device("cpu"))
    if not torch.equal(w.code.detach().cpu(), code):
        raise NF4DistributedError(f"{name}: the NF4 code table (quant_map) is not the format's; cannot flatten")
    if w.double_quant and not torch.equal(w.nested_code.detach().cpu(), nested):
        raise NF4DistributedError(f"{name}: the nested code table (nested_quant_map) is not bitsandbytes' dynamic map; "
                                  "cannot flatten")


def _flatten_layer(mod: nn.Module, name: str) -> None:
    if getattr(mod, "merged", False):
        raise NF4DistributedError(f"{name or type(mod).__name__}: the layer is merged (merge() folded the adapter into "
                                  "its NF4 weight); call unmerge() before preparing it for FSDP2")
    w = mod.weight
    if not isinstance(w, NF4Weight):
        raise NF4DistributedError(f"{name}: weight is {type(w).__name__}, not an NF4Weight")
    if w.device.type == "meta":
        raise NF4DistributedError(f"{name}: the NF4 weight is on the meta device; quantize a real weight (or load the "
                                  "checkpoint) before preparing the model")
    _check_tables(w, name)
    layout = NF4FlatLayout.of(w)
    flat = layout.pack(w)
    back = layout.unpack(flat)
    for k, t in w.tensors().items():
        if not torch.equal(getattr(back, k).reshape(-1), t.reshape(-1)):  # pragma: no cover - a packing bug
            raise NF4DistributedError(f"{name}: flat copy of {k} differs from the weight")
    cls = _flat_class(type(mod))
    mod.__dict__.pop("weight", None)
    mod.__class__ = cls
    mod._nf4_layout = layout
    mod.register_parameter(_FLAT_NAME, nn.Parameter(flat, requires_grad=False))


def _replace_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    parent.__dict__.pop("_lk_nf4", None)  # patch_peft_model's cached view of the old bitsandbytes weight


def nf4_to_parameters(model: nn.Module) -> list[str]:
    """Make every NF4 weight of ``model`` a frozen flat uint8 Parameter ``nf4_data`` (in place).

    ``QLoRALinear`` / ``NF4Linear`` (and subclasses) change class to their ``FlatNF4`` subclass
    (same module object, same bias and LoRA Parameters); bitsandbytes nf4 ``Linear4bit`` layers are
    replaced by a ``FlatNF4Linear`` over the same bytes (bias Parameter and ``compute_dtype``
    kept).  ``model`` may itself be a QLoRALinear / NF4Linear (converted in place, name "").
    Already flat layers are left alone.  Returns the names of the converted layers.  No
    process group is needed; the forward is unchanged (bit for bit).
    """
    if _is_bnb_4bit(model):
        raise NF4DistributedError("nf4_to_parameters: pass the model that contains the bitsandbytes Linear4bit, not "
                                  "the layer itself (it is replaced in its parent)")
    done = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, _FlatNF4Mixin):
            continue
        if isinstance(mod, NF4WeightMixin):
            _flatten_layer(mod, name)
            done.append(name)
        elif _is_bnb_4bit(mod):
            p = mod.weight
            if getattr(p, "quant_state", None) is None or p.device.type == "meta":
                raise NF4DistributedError(f"{name}: bitsandbytes Linear4bit is not quantized yet (move it to a device "
                                          "first, as bitsandbytes quantizes on .to(device))")
            q = NF4Weight.from_bnb(p)
            new = NF4Linear(q, None, compute_dtype=getattr(mod, "compute_dtype", None))
            if mod.bias is not None:
                new.bias = mod.bias  # the same Parameter (optimizers keep working)
            new.train(mod.training)
            _flatten_layer(new, name)
            _replace_child(model, name, new)
            done.append(name)
    return done


def nf4_from_parameters(model: nn.Module) -> list[str]:
    """The inverse of ``nf4_to_parameters`` on an unsharded model: every flat layer gets its
    ``NF4Weight`` attribute back (fresh tensors) and its original class (``NF4Linear`` for layers
    that were bitsandbytes ``Linear4bit``).  Returns the names of the layers restored."""
    done = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, _FlatNF4Mixin):
            continue
        flat = mod._parameters.get(_FLAT_NAME)
        if _is_dtensor(flat):
            raise NF4DistributedError(f"{name}: the NF4 weight is sharded by FSDP2; gather a full state dict into an "
                                      "unsharded model first")
        w = mod.weight
        fresh = NF4Weight(**{k: v.clone() for k, v in w.tensors().items()}, shape=w.shape, dtype=w.dtype,
                          blocksize=w.blocksize, check_tables=False)
        del mod._parameters[_FLAT_NAME]
        for k in ("_nf4_layout", "_lk_flat_cache"):
            mod.__dict__.pop(k, None)
        mod.__class__ = type(mod)._lk_flat_base
        mod.weight = fresh
        done.append(name)
    return done


def _flat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _FlatNF4Mixin)]


# ---------------------------------------------------------------------------------------------
# Same base on every rank
def _nf4_weights(model: nn.Module) -> list[tuple[str, NF4Weight]]:
    """Every NF4 weight of the model (attribute, flat, or bitsandbytes) as an NF4Weight."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, _FlatNF4Mixin):
            if _is_dtensor(mod._parameters.get(_FLAT_NAME)):
                raise NF4DistributedError(f"{name}: already sharded by FSDP2")
            out.append((name, mod.weight))
        elif isinstance(mod, NF4WeightMixin):
            out.append((name, mod.weight))
        elif _is_bnb_4bit(mod) and getattr(mod.weight, "quant_state", None) is not None:
            out.append((name, NF4Weight.from_bnb(mod.weight)))
    return out


def _byte_checksum(t: torch.Tensor, chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of bytes, position-weighted sum of bytes) of ``t``'s bytes, as int64 on its device."""
    b = t.detach().contiguous().reshape(-1).view(torch.uint8)
    s1 = b.sum(dtype=torch.int64)
    s2 = torch.zeros((), dtype=torch.int64, device=b.device)
    for start in range(0, b.numel(), chunk):
        c = b[start:start + chunk].to(torch.int64)
        w = torch.arange(start, start + c.numel(), device=b.device, dtype=torch.int64) % 65521 + 1
        s2 += (c * w).sum()
    return s1, s2


def _weight_checksum(w: NF4Weight) -> torch.Tensor:
    parts = []
    for t in (w.packed, w.absmax, w.nested_absmax, w.offset):
        if t is None:
            parts += [torch.zeros((), dtype=torch.int64, device=w.device)] * 2
        else:
            parts += list(_byte_checksum(t))
    meta = torch.tensor([w.numel, w.shape[0], w.shape[-1], w.blocksize, int(w.double_quant)], dtype=torch.int64,
                        device=w.device)
    return torch.cat([torch.stack(parts), meta])


def _require_dist(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise NF4DistributedError(f"{what}: torch.distributed is not initialized; call "
                                  "torch.distributed.init_process_group() first (e.g. launch with torchrun)")


def check_nf4_bases_match(model: nn.Module, group=None) -> int:
    """Raise ``NF4DistributedError`` unless every rank of ``group`` holds the same NF4 layers with the
    same bytes (packed data, absmax, nested absmax, offset) and metadata.  FSDP2 would otherwise
    assemble a weight from different ranks' bytes, and DDP (which never broadcasts the base) would
    train different models.  One pass over the bytes on their device, one small all-gather.
    Returns the number of NF4 layers checked."""
    _require_dist("check_nf4_bases_match")
    weights = _nf4_weights(model)
    dev = weights[0][1].device if weights else torch.device("cpu")
    if dist.get_backend(group) == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    ws = dist.get_world_size(group)
    count = torch.tensor([len(weights)], dtype=torch.int64, device=dev)
    counts = [torch.empty_like(count) for _ in range(ws)]
    dist.all_gather(counts, count, group=group)
    if len({int(c) for c in counts}) != 1:
        raise NF4DistributedError(f"ranks hold different numbers of NF4 layers: {[int(c) for c in counts]}")
    if not weights:
        return 0
    mine = torch.stack([_weight_checksum(w).to(dev) for _, w in weights])
    allr = [torch.empty_like(mine) for _ in range(ws)]
    dist.all_gather(allr, mine, group=group)
    bad = sorted({weights[i][0] for r in range(1, ws) for i in
                  torch.nonzero((allr[r] != allr[0]).any(1)).reshape(-1).tolist()})
    if bad:
        raise NF4DistributedError(f"the NF4 base differs between ranks in {len(bad)} layer(s): {bad[:8]}"
                                  f"{' ...' if len(bad) > 8 else ''}; build and quantize the model identically on "
                                  "every rank (same seed / checkpoint)")
    return len(weights)


# ---------------------------------------------------------------------------------------------
# FSDP2
def _fully_shard():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard  # torch 2.4/2.5
        except ImportError:
            raise NF4DistributedError(f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard); "
                                      "torch >= 2.4 is needed") from None
    return fully_shard, MixedPrecisionPolicy


def _fsdp_module_cls():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule
    return FSDPModule


def _default_shard_modules(model: nn.Module) -> list[nn.Module]:
    """transformers' ``_no_split_modules`` classes (decoder layers) if the model names any, else
    every flat NF4 layer."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    if names:
        blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if blocks:
            return blocks
    return [m for _, m in _flat_layers(model)]


def prepare_fsdp2(model: nn.Module, mesh=None, mp_policy=None, *, reshard_after_forward: bool = True,
                  shard_modules: Iterable[nn.Module] | Callable[[str, nn.Module], bool] | None = None,
                  check_base: bool = True) -> nn.Module:
    """Shard ``model`` with FSDP2 so that its NF4 bases are sharded and all-gathered as 4-bit bytes.

    1. ``nf4_to_parameters(model)``: every NF4 weight (``QLoRALinear``, ``NF4Linear``, bitsandbytes
       nf4 ``Linear4bit``) becomes one frozen uint8 parameter (see the module docstring);
    2. with ``check_base``, ``check_nf4_bases_match``: every rank must hold the same base;
    3. ``fully_shard`` on each of ``shard_modules`` (modules, or a predicate ``(name, module)``;
       default: transformers' decoder layers (``_no_split_modules``) if any, else each NF4 layer)
       with ``reshard_after_forward``, then on ``model`` itself (the root).

    ``mesh``: a 1-D DeviceMesh (default: all ranks, on the NF4 weights' device type);
    ``mp_policy``: an FSDP2 ``MixedPrecisionPolicy`` (default: none; the uint8 storage is never
    cast, see the module docstring).  Returns ``model`` (now an ``FSDPModule``).  Build the
    optimizer afterwards, over ``[p for p in model.parameters() if p.requires_grad]``.
    """
    fully_shard, MixedPrecisionPolicy = _fully_shard()
    _require_dist("prepare_fsdp2")
    FSDPModule = _fsdp_module_cls()
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise NF4DistributedError("prepare_fsdp2: the model already has fully_shard applied")
    nf4_to_parameters(model)
    flats = _flat_layers(model)
    dev_types = {m._parameters[_FLAT_NAME].device.type for _, m in flats}
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        if len(dev_types) == 1:
            dev_type = next(iter(dev_types))
        else:
            dev_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(dev_type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise NF4DistributedError(f"prepare_fsdp2: a 1-D mesh is expected (got {mesh.ndim}-D); pass mesh[...] "
                                  "for the data-parallel dimension")
    wrong = [(n, m._parameters[_FLAT_NAME].device) for n, m in flats
             if m._parameters[_FLAT_NAME].device.type != mesh.device_type]
    if wrong:
        raise NF4DistributedError(
            f"prepare_fsdp2: {len(wrong)} NF4 layer(s) are not on the mesh's device type {mesh.device_type!r}: "
            f"{', '.join(f'{n} on {d}' for n, d in wrong[:4])}{' ...' if len(wrong) > 4 else ''}; quantize or move "
            "the model to that device first")
    if check_base:
        check_nf4_bases_match(model, group=mesh.get_group())
    kw = {"mesh": mesh, "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy()}
    if shard_modules is None:
        blocks = _default_shard_modules(model)
    elif callable(shard_modules):
        blocks = [m for n, m in model.named_modules() if m is not model and shard_modules(n, m)]
    else:
        blocks = list(shard_modules)
    # bottom-up: a block nested in another block is sharded first
    depth = {m: n.count(".") + 1 for n, m in model.named_modules() if n}
    for m in sorted(blocks, key=lambda m: -depth.get(m, 0)):
        fully_shard(m, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, **kw)
    return model


@dataclass
class NF4GatherStats:
    """What FSDP2 all-gathers of the NF4 bases (bytes are those of the all-gather output: the whole
    unsharded tensor, world_size × the shard, FSDP2's dim-0 padding included)."""

    layers: int
    params: int                 # weight elements of the NF4 bases
    storage_bytes: int          # NF4 tensors (packed + absmax + nested absmax + offset)
    flat_bytes: int             # the uint8 parameters (storage + alignment padding)
    world_size: int             # (1: FSDP2 does not all-gather; the byte counts are 0)
    gathered_bytes: int         # one all-gather of every base (one forward)
    bytes_per_step: int         # forward + the backward re-gathers (groups that reshard after forward)
    gathers_per_step: dict[str, int] = field(default_factory=dict)   # per layer

    @property
    def bits_per_param(self) -> float:
        """Bits all-gathered per weight element in one all-gather of the bases."""
        return 8 * self.gathered_bytes / self.params if self.params else 0.0

    @property
    def storage_bits_per_param(self) -> float:
        """``NF4Weight.bits_per_param`` over all bases (4.127 at blocksize 64, double quant)."""
        return 8 * self.storage_bytes / self.params if self.params else 0.0

    def __str__(self) -> str:
        return (f"NF4 bases: {self.layers} layers, {self.params:,} params; all-gathered {self.gathered_bytes:,} B per "
                f"forward ({self.bits_per_param:.3f} bits/param; the format {self.storage_bits_per_param:.3f}), "
                f"{self.bytes_per_step:,} B per training step")


def _fsdp_groups(model: nn.Module) -> list[tuple[nn.Module, bool, list[nn.Parameter]]]:
    """(FSDP module, is_root, the parameters its group manages) for every FSDP module in ``model``."""
    FSDPModule = _fsdp_module_cls()
    fsdp_mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    inner = {id(sub) for m in fsdp_mods for sub in m.modules() if sub is not m and isinstance(sub, FSDPModule)}
    out = []
    for m in fsdp_mods:
        nested = {id(p) for sub in m.modules() if sub is not m and isinstance(sub, FSDPModule) for p in sub.parameters()}
        own = [p for p in m.parameters() if id(p) not in nested]
        out.append((m, id(m) not in inner, own))
    return out


def _gathers_per_step(mod: nn.Module, is_root: bool) -> int:
    """All-gathers of this group in one forward + backward: 2 when it reshards after forward."""
    try:
        state = mod._get_fsdp_state()
        if is_root and getattr(state, "_auto_reshard_after_forward", True):
            return 1  # FSDP2 never reshards the root after forward (unless asked explicitly)
        groups = getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]
        return 2 if groups and groups[0].post_forward_mesh_info is not None else 1
    except AttributeError:  # pragma: no cover - another torch version's internals
        return 1 if is_root else 2


def _padded_bytes(p: torch.Tensor, ws: int) -> int:
    """Bytes of p in the all-gather output: dim 0 padded by FSDP2 to a multiple of the world size."""
    shape = tuple(p.shape)
    rows = _round_up(shape[0], ws) if shape else ws
    return rows * math.prod(shape[1:]) * p.element_size()


def nf4_all_gather_bytes(model: nn.Module) -> NF4GatherStats:
    """Bytes of the NF4 bases that FSDP2 all-gathers for ``model`` (after ``prepare_fsdp2``), per
    forward and per training step (``AllGatherMeter`` measures the same on the real all-gathers)."""
    flats = _flat_layers(model)
    if not flats:
        raise NF4DistributedError("nf4_all_gather_bytes: the model has no flat NF4 layers (call prepare_fsdp2 first)")
    gathers: dict[int, int] = {}
    for mod, is_root, params in _fsdp_groups(model):
        for p in params:
            gathers[id(p)] = _gathers_per_step(mod, is_root)
    stats = NF4GatherStats(0, 0, 0, 0, 1, 0, 0)
    for name, m in flats:
        flat = m._parameters[_FLAT_NAME]
        lay = m._nf4_layout
        if id(flat) not in gathers or not _is_dtensor(flat):
            raise NF4DistributedError(f"nf4_all_gather_bytes: {name} is not sharded by FSDP2 (call prepare_fsdp2)")
        ws = flat.device_mesh.size()
        stats.world_size = ws
        # FSDP2 does not communicate on a world of one
        gathered = _round_up(lay.nbytes, ws) if ws > 1 else 0
        g = gathers[id(flat)] if ws > 1 else 0
        stats.layers += 1
        stats.params += lay.numel
        stats.storage_bytes += lay.storage_bytes
        stats.flat_bytes += lay.nbytes
        stats.gathered_bytes += gathered
        stats.bytes_per_step += g * gathered
        stats.gathers_per_step[name] = g
    return stats


@dataclass
class AllGatherMeter:
    """Counts every all-gather FSDP2 issues for the model (installed by ``attach_all_gather_meter``).

    ``total_bytes``: bytes of the all-gather outputs (every parameter gathered); ``base_bytes``:
    the part of them that is NF4 base storage; ``calls``: collectives.  ``reset()`` between steps.
    """

    calls: int = 0
    total_bytes: int = 0
    base_bytes: int = 0

    def reset(self) -> None:
        self.calls = self.total_bytes = self.base_bytes = 0


def attach_all_gather_meter(model: nn.Module) -> AllGatherMeter:
    """Wrap each FSDP2 group's all-gather (``FSDPModule.set_custom_all_gather``) with a counter;
    the communication itself is the default one, unchanged.  Returns the meter."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather
    except ImportError:
        raise NF4DistributedError(f"attach_all_gather_meter: torch {torch.__version__} has no custom FSDP2 "
                                  "all-gather hook (set_custom_all_gather)") from None
    flat_ids = {id(m._parameters[_FLAT_NAME]) for _, m in _flat_layers(model)}
    meter = AllGatherMeter()

    class _Metered(AllGather):
        def __init__(self, inner, base_bytes: int):
            self.inner, self.base = inner, base_bytes

        def allocate(self, size, *, dtype, device):
            return self.inner.allocate(size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            meter.calls += 1
            meter.total_bytes += output_tensor.numel() * output_tensor.element_size()
            meter.base_bytes += self.base
            return self.inner(output_tensor=output_tensor, input_tensor=input_tensor, group=group, async_op=async_op)

    groups = _fsdp_groups(model)
    if not groups:
        raise NF4DistributedError("attach_all_gather_meter: the model is not sharded by FSDP2 (call prepare_fsdp2)")
    for mod, _, params in groups:
        ws = max((p.device_mesh.size() for p in params if _is_dtensor(p)), default=1)
        base = sum(_padded_bytes(p, ws) for p in params if id(p) in flat_ids)
        inner = DefaultAllGather()
        try:
            inner = mod._get_fsdp_state()._fsdp_param_groups[0]._all_gather_comm
        except (AttributeError, IndexError):
            pass
        if isinstance(inner, _Metered):
            inner = inner.inner
        if params:
            mod.set_custom_all_gather(_Metered(inner, base))
    return meter


# ---------------------------------------------------------------------------------------------
# DDP
def prepare_ddp(model: nn.Module, *, device_ids=None, broadcast_buffers: bool = False, check_base: bool = True,
                **ddp_kwargs) -> nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` so that only its trainable (LoRA) parameters are
    all-reduced and the frozen NF4 base is never communicated.

    NF4 weights stay (or become again, after ``nf4_to_parameters``) plain attributes of their layers
    -- neither parameters nor buffers -- and bitsandbytes ``Params4bit`` are put on DDP's ignore
    list, so DDP neither broadcasts them at construction nor reduces them; ``broadcast_buffers``
    defaults to False (no per-step buffer broadcast); with ``check_base`` every rank must hold the
    same base (``check_nf4_bases_match``).  Other frozen parameters (bias, norms, embeddings) are
    broadcast once at construction, as DDP always does.  ``device_ids`` defaults to the current CUDA
    device for a CUDA model.  Returns the ``DistributedDataParallel`` module.
    """
    _require_dist("prepare_ddp")
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP):
        raise NF4DistributedError("prepare_ddp: the model is already wrapped in DistributedDataParallel")
    if not any(p.requires_grad for p in model.parameters()):
        raise NF4DistributedError("prepare_ddp: the model has no trainable parameter (add LoRA first: add_lora or "
                                  "peft.get_peft_model)")
    nf4_from_parameters(model)
    ignore = [n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"]
    for n, p in model.named_parameters():
        if p.requires_grad and p.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise NF4DistributedError(f"prepare_ddp: trainable parameter {n} has dtype {p.dtype}")
    if ignore:
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    if check_base:
        check_nf4_bases_match(model, group=ddp_kwargs.get("process_group"))
    if device_ids is None:
        devs = {p.device for p in model.parameters()}
        if len(devs) == 1 and next(iter(devs)).type == "cuda":
            device_ids = [next(iter(devs)).index]
    return DDP(model, device_ids=device_ids, broadcast_buffers=broadcast_buffers, **ddp_kwargs)
