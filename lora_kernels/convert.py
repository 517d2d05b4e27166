"""Whole-model conversion: replace ``nn.Linear`` layers by ``NF4Linear``, one layer at a time."""

from __future__ import annotations

import fnmatch
import sys
from typing import Callable, Iterable

import torch
from torch import nn

from .modules import NF4Linear


def _progress(items: list, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a plain counter on stderr
        def gen():
            for i, item in enumerate(items, 1):
                print(f"\r{desc}: {i}/{len(items)}", end="" if i < len(items) else "\n", file=sys.stderr)
                yield item
        return gen()
    return tqdm(items, desc=desc, unit="layer", file=sys.stderr)


def quantize_model(model: nn.Module, *, blocksize: int = 64, double_quant: bool = True,
                   device: torch.device | str | None = None, compute_dtype: torch.dtype | None = None,
                   skip: Iterable[str] = ("lm_head", "*.lm_head"),
                   filter_fn: Callable[[str, nn.Linear], bool] | None = None,
                   backend: str | None = None, progress: bool = True) -> dict[str, NF4Linear]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an ``NF4Linear``.

    Layers are converted one at a time: the bf16 weight of one layer is copied to ``device`` (the
    GPU, say, while the model stays on the CPU), quantized, and the original layer is dropped
    before the next one, so at most one layer's dense copy exists beyond the model itself.
    ``skip``: an fnmatch pattern or patterns of module names to leave alone; ``filter_fn(name, linear)`` may veto
    more.  Returns {name: new layer}.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: model must be an nn.Module, got {type(model).__name__}")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)     # one pattern, not its characters
    # A layer used at several places (weight tying by module) is one layer: converted once, swapped
    # at every name; if any of its names is skipped, it stays dense everywhere.
    aliases: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if type(mod) is nn.Linear:
            aliases.setdefault(id(mod), []).append(name)
    linears = {name: mod for name, mod in model.named_modules()
               if type(mod) is nn.Linear
               and not any(fnmatch.fnmatch(a, p) for a in aliases[id(mod)] for p in skip)
               and (filter_fn is None or filter_fn(name, mod))}
    names = list(linears)
    # what would fail midway is refused before the first layer changes
    bad = [f"{n} ({m.weight.dtype})" for n, m in linears.items()
           if m.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16)]
    if bad:
        raise TypeError(f"quantize_model: weights must be float32, bfloat16 or float16; {', '.join(bad[:5])}"
                        f"{' ...' if len(bad) > 5 else ''} (skip them, or cast the model first); nothing was converted")
    converted: dict[str, NF4Linear] = {}
    for name in _progress(names, progress, "quantizing to NF4"):
        linear = model.get_submodule(name)
        new = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant, device=device,
                                    compute_dtype=compute_dtype, backend=backend)
        for alias in aliases[id(linear)]:
            parent_name, _, child = alias.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        # Free the dense weight now, even if someone still holds the old module.
        linear.weight = None
        del linear
        converted[name] = new
    return converted
