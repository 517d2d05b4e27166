"""Patched subclasses made at run time (``type(...)``), under a ``__qualname__`` pickle can resolve.

``patch_model_kernels`` and ``patch_peft_model`` swap a module's class for a subclass built on the
fly.  ``torch.save(model)`` pickles classes by module and qualified name, so each subclass gets a
qualified name that encodes (kind, the original class's module and qualified name): the defining
module's ``__getattr__`` (``resolve``) rebuilds the same subclass from it, in this process or in a
fresh one that imports the original's module.  The name is ASCII without dots (pickle protocol 2,
torch.save's default, writes names as ASCII and splits them at dots).
"""

from __future__ import annotations

import base64
import importlib
import json
from typing import Callable

_TAG = "_lk_"


def qualname_for(cls: type, kind: str) -> str:
    """``LoraKernels<Name>_lk_<base32 of [kind, module, qualname]>``."""
    blob = json.dumps([kind, cls.__module__, cls.__qualname__]).encode()
    return f"LoraKernels{cls.__name__}{_TAG}{base64.b32encode(blob).decode().rstrip('=')}"


def resolve(name: str, make: Callable[[type, str], type]) -> type:
    """The patched class a ``qualname_for`` name stands for, made by ``make(original, kind)``;
    AttributeError for any other name (a module ``__getattr__``'s contract)."""
    if not name.startswith("LoraKernels") or _TAG not in name:
        raise AttributeError(name)
    code = name.rsplit(_TAG, 1)[1]
    try:
        kind, module, qualname = json.loads(base64.b32decode(code + "=" * (-len(code) % 8)))
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except Exception as e:                         # noqa: BLE001 - any failure is "no such attribute"
        raise AttributeError(f"{name}: cannot rebuild the patched class ({type(e).__name__}: {e})") from None
    return make(cls, kind)
