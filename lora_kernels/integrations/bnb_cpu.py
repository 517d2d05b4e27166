"""Keep bitsandbytes' CPU path correct on CPUs where its native NF4 kernels are not (0.50.x).

Found on an AVX512-BF16 / AMX host (this project's CI kind, 2026-12): bitsandbytes 0.50.2's native CPU
``dequantize_4bit`` indexes the absmax per row, so it returns wrong values whenever a row's length
is not a multiple of the blocksize (e.g. [33, 64] with blocksize 128: errors of ~1.0 on unit-scale
weights; its own quantize -> dequantize round trip fails).  Its portable implementation
(``bitsandbytes.backends.default.ops._dequantize_4bit_compute``) and its CUDA kernels are right and
agree with ours.  On the same hosts ``Linear4bit`` in eval mode repacks its weight in place into a
CPU-only layout (``packing_format_for_cpu``) that fails on such shapes and is no longer the NF4
storage format.

``use_portable_bnb_cpu_paths()`` probes the native kernel once and, only if it is wrong, registers
the portable implementation as bitsandbytes' CPU kernel for ``bitsandbytes::dequantize_4bit`` and
turns the eval-mode repacking off for ``Linear4bit`` modules created afterwards.  The demo, the
CPU mode of ``bench_finetune`` and the tests call it; nothing in ``import lora_kernels`` does.
"""

from __future__ import annotations

import warnings

import torch

_APPLIED: bool | None = None


def _portable_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    code = F.get_4bit_type(quant_type, device=A.device)
    return _dequantize_4bit_compute(A.view(torch.uint8).reshape(-1), absmax, code, blocksize, shape, dtype)


def bnb_cpu_dequantize_is_wrong() -> bool:
    """Whether bitsandbytes' native CPU ``dequantize_4bit`` disagrees with its portable one on a
    [3, 96] weight with blocksize 64 (a row length that is not a multiple of the blocksize)."""
    import bitsandbytes.functional as F

    # bitsandbytes wraps its portable CPU ops in torch.compile: run them eagerly here, or this probe
    # compiles them with inductor first (~12 s on a cold cache on this project's CPU machine, and on
    # every fresh GPU machine before its first test), for a [3, 96] weight.
    with _eager():
        w = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
        q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        try:
            native = F.dequantize_4bit(q, state)
        except Exception:  # noqa: BLE001 - a crash is as wrong as a wrong value
            return True
        portable = _portable_dequantize_4bit(q, state.absmax, 64, "nf4", (3, 96), torch.float32)
    return not torch.equal(native, portable)


def _eager():
    """A context in which torch.compile'd functions run as plain eager code."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is not None:
        return set_stance("force_eager")
    return torch._dynamo.config.patch(disable=True)


def use_portable_bnb_cpu_paths() -> bool:
    """Route bitsandbytes' CPU NF4 dequantize through its portable implementation if (and only if)
    the native one is wrong here; returns whether it did.  Idempotent; a no-op without
    bitsandbytes."""
    global _APPLIED
    if _APPLIED is not None:
        return _APPLIED
    try:
        import bitsandbytes.nn.modules as bnb_modules
    except Exception:  # noqa: BLE001 - not installed or broken: nothing to fix
        _APPLIED = False
        return False
    _APPLIED = bnb_cpu_dequantize_is_wrong()
    if _APPLIED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch warns that a registered kernel is overridden
            torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", _portable_dequantize_4bit)
        if hasattr(bnb_modules, "has_avx512bf16"):
            bnb_modules.has_avx512bf16 = lambda: False
    return _APPLIED
