"""Re-launching a compiled Triton kernel without ``JITFunction.run``'s per-call work.

``kernel[grid](*args)`` binds every argument, specialises it (pointer alignment, integer == 1 or
% 16), builds a cache key string and reads the runtime knobs on every call.  On the H100 machine's
host (``benchmarks/launch_probe.py``, results/launch_probe_nvidia-h100-80gb-hbm3.txt) a whole
``merge_window`` call costs 50 µs of host time that way and 34 µs through this cache (a bare
``torch.mm`` costs 17 µs there); a training step launches it four times per layer.
``CachedLauncher`` compiles and launches through ``kernel[grid]`` the first time
it sees an argument signature, keeps the compiled kernel, and afterwards calls the compiled
kernel's own launcher with the same arguments ``JITFunction.run`` would pass it.

The signature key is exact, not a re-implementation of Triton's specialisation rules: tensors by
(dtype, data_ptr % 16 == 0), integers and bools by value, floats by type, constexprs and launch
options by value, plus the current device.  Two calls with equal keys specialise identically, so
they may share a compiled kernel.

Falls back to the plain ``kernel[grid](...)`` path (same results, the usual cost) under the Triton
interpreter, when launch hooks are installed (profilers), when the installed Triton does not
expose what this needs, or with ``LORA_KERNELS_TRITON_FAST_LAUNCH=0``.

Devices: Triton launches on the *current* CUDA device and its current stream, while a model split
over GPUs (``device_map="auto"``) runs layers whose tensors live on other devices.  Both paths here
launch on the device of the first argument (a tensor in every kernel of the package), switching the
current device around the launch when it differs; ``device_guard`` does the same for the package's
direct ``kernel[grid]`` launches.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # the launcher protocol used below is the one triton 3.x's JITFunction.run ends in
    from triton import knobs as _knobs
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # pragma: no cover - older triton
    _knobs = _JITFunction = None

__all__ = ["CachedLauncher", "device_guard"]

Tensor = torch.Tensor
_FLOAT = (float,)

#: at most this many argument signatures are remembered per kernel (each entry refers to a
#: compiled kernel Triton caches anyway; a model has a few per layer shape and chunk)
_MAX_KEYS = 4096


def _enabled() -> bool:
    return os.environ.get("LORA_KERNELS_TRITON_FAST_LAUNCH", "1") != "0"


_SAME_DEVICE = contextlib.nullcontext()


def device_guard(t: Tensor):
    """A context manager making ``t``'s CUDA device current for a Triton launch; a no-op when it
    already is, or when ``t`` is not on a CUDA device (the interpreter's CPU tensors)."""
    idx = t.get_device()
    if idx >= 0 and idx != torch.cuda.current_device():
        return torch.cuda.device(idx)
    return _SAME_DEVICE


def _hook_set(hook) -> bool:
    # triton >= 3.5 keeps launch hooks as (normally empty) HookChain objects, older ones as None
    return hook is not None and bool(getattr(hook, "calls", True))


class CachedLauncher:
    """``launcher(grid, args, constexprs, options)`` launches ``fn`` on a 1-D grid.

    ``args``: the kernel's runtime arguments in declaration order; ``constexprs``: a dict of the
    constexpr parameters, which must all follow the runtime ones, in declaration order;
    ``options``: ``num_warps`` etc.  ``args[0]`` must be a tensor: its device is the launch's.  Not
    thread-safe beyond what a dict gives (a race compiles twice).
    """

    def __init__(self, fn):
        self.fn = fn
        self.compiled: dict = {}
        self.usable = (_JITFunction is not None and isinstance(fn, _JITFunction)
                       and hasattr(_knobs, "runtime"))

    def __call__(self, grid: int, args: tuple, constexprs: dict, options: dict) -> None:
        idx = args[0].get_device()
        if idx >= 0 and idx != torch.cuda.current_device():   # the tensors live on another GPU: launch there
            with torch.cuda.device(idx):
                self(grid, args, constexprs, options)
            return
        rt = _knobs.runtime if self.usable else None
        if rt is None or not _enabled() or _hook_set(rt.launch_enter_hook) or _hook_set(rt.launch_exit_hook):
            self.fn[(grid,)](*args, **constexprs, **options)
            return
        device = idx if idx >= 0 else torch.cuda.current_device()   # idx is the current device here
        # one pass over the arguments, the cheapest tests first (a launch's key is built per call)
        key = (device, tuple(constexprs.values()), tuple(options.items()),
               *[(a.dtype, not a.data_ptr() & 15) if isinstance(a, Tensor) else
                 _FLOAT if a.__class__ is float else (a.__class__, a) for a in args])
        kernel = self.compiled.get(key)
        if kernel is None:
            if len(self.compiled) >= _MAX_KEYS:    # many distinct shapes / windows: start over
                self.compiled.clear()
            kernel = self.fn[(grid,)](*args, **constexprs, **options)
            names = self.fn.arg_names
            if (names[len(args):] == list(constexprs) and getattr(kernel, "function", None) is not None
                    and callable(getattr(kernel, "run", None)) and hasattr(kernel, "packed_metadata")):
                self.compiled[key] = kernel
            else:                      # not the protocol this relies on: always the plain path
                self.usable = False
            return
        kernel.run(grid, 1, 1, torch._C._cuda_getCurrentRawStream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *constexprs.values())

