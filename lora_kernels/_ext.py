"""Optional compiled extensions.  Importing this never raises: a missing or broken extension is
logged once (one line) and reported as None, and the dispatcher falls back."""

from __future__ import annotations

import importlib
import logging
import os

logger = logging.getLogger("lora_kernels")


def env_number(name: str, default, cast=int, minimum=None):
    """$``name`` parsed by ``cast`` (int or float); ``default`` when unset or blank.  A value that
    does not parse, is not finite, or is below ``minimum`` raises ValueError naming the variable
    (never a bare int()/float() error at import time)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        v = cast(raw)
    except ValueError:
        raise ValueError(f"${name}={raw!r} is not {'an integer' if cast is int else 'a number'}") from None
    if v != v or v in (float("inf"), float("-inf")) or (minimum is not None and v < minimum):
        raise ValueError(f"${name}={raw!r} must be a finite number"
                         f"{'' if minimum is None else f' >= {minimum}'}")
    return v

_cache: dict[str, object] = {}


def _load(name: str, what: str):
    if name not in _cache:
        try:
            _cache[name] = importlib.import_module(f"lora_kernels.{name}")
        except Exception as e:  # ImportError, or an undefined symbol from an ABI mismatch
            _cache[name] = None
            if os.environ.get("LORA_KERNELS_QUIET") != "1":
                logger.warning("lora_kernels: %s extension unavailable (%s: %s); using the fallback",
                               what, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return _cache[name]


def cpu_ext():
    """``lora_kernels._C`` (C++ CPU kernels) or None."""
    return _load("_C", "C++ CPU")


def cuda_ext():
    """``lora_kernels._C_cuda`` (CUDA C++ kernels) or None."""
    return _load("_C_cuda", "CUDA C++")


def triton_kernels():
    """``lora_kernels.triton.nf4_quant`` (needs triton) or None."""
    return _load("triton.nf4_quant", "Triton")


def triton_available() -> bool:
    return triton_kernels() is not None
