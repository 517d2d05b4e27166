"""The op boundary: input checks, and the ONE place that picks an implementation.

Backends (each exposes ``quantize_blocks``, ``quantize_absmax_nested``, ``dequantize`` with the
same signatures; see ``reference.py`` for the math):

=========== ================================ =====================================
name        implementation                   used for
=========== ================================ =====================================
"cuda"      lora_kernels._C_cuda (csrc/cuda)  CUDA tensors, first choice
"triton"    lora_kernels/triton/nf4_quant.py  CUDA tensors when the CUDA ext is missing
"cpp"       lora_kernels._C (csrc/cpu)        CPU tensors, first choice
"reference" lora_kernels/reference.py         everything else; the test oracle
=========== ================================ =====================================

``LORA_KERNELS_BACKEND=<name>`` forces a backend for every call (tests and benchmarks pass
``backend=`` instead).
"""

from __future__ import annotations

import os
import types

import torch

from . import _ext, reference
from .codes import VALID_BLOCKSIZES, dynamic_code, nf4_code
from .nf4 import NF4Weight

BACKENDS = ("cuda", "triton", "cpp", "reference")
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_reference_backend = types.SimpleNamespace(
    quantize_blocks=reference.quantize_blocks_reference,
    quantize_absmax_nested=reference.quantize_absmax_nested_reference,
    dequantize=lambda *a, out=None: _fill(out, reference.dequantize_reference(*a)),
)


def _fill(out: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if out is None:
        return value
    out.copy_(value)
    return out


def _triton_on(device: torch.device) -> bool:
    # Triton runs CUDA tensors on the GPU, or CPU tensors only through its interpreter.
    if device.type == "cuda":
        return _ext.triton_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _ext.triton_available()


def backend_module(name: str):
    """The module implementing backend ``name`` (raises if it is not available here)."""
    if name == "reference":
        return _reference_backend
    if name == "cpp":
        mod = _ext.cpu_ext()
    elif name == "cuda":
        mod = _ext.cuda_ext()
    elif name == "triton":
        mod = _ext.triton_kernels()
    else:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if mod is None:
        raise RuntimeError(f"backend {name!r} is not available in this installation")
    return mod


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device``, best first."""
    device = torch.device(device)
    out = []
    for name in BACKENDS:
        if name == "reference":
            ok = True
        elif name == "cpp":
            ok = device.type == "cpu" and _ext.cpu_ext() is not None
        elif name == "cuda":
            ok = device.type == "cuda" and _ext.cuda_ext() is not None
        else:
            ok = _triton_on(device)
        if ok:
            out.append(name)
    prefs = _PREFERENCE.get(device.type, ("reference",))
    return sorted(out, key=lambda b: prefs.index(b) if b in prefs else len(prefs))


def select_backend(device: torch.device, requested: str | None = None) -> str:
    """Pick the backend for a call on ``device``: ``requested``, else $LORA_KERNELS_BACKEND, else the
    first available in the device's preference list."""
    requested = requested or os.environ.get("LORA_KERNELS_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; expected one of {BACKENDS}")
        if requested not in available_backends(device):
            raise RuntimeError(f"backend {requested!r} cannot run on {device} here "
                               f"(available: {available_backends(device)})")
        return requested
    for name in _PREFERENCE.get(device.type, ("reference",)):
        if name in available_backends(device):
            return name
    return "reference"


# ---------------------------------------------------------------------------------------------
def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *,
                 backend: str | None = None, check_finite: bool = True) -> NF4Weight:
    """Quantize ``w`` (any shape, fp32/bf16/fp16, at least one element) to NF4.

    Bit-identical to ``bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=
    double_quant, quant_type="nf4")`` on the same device: its CUDA kernels for CUDA tensors, its CPU
    path for CPU tensors (the two differ in the last ulp; see ``reference``'s "GPU flavour").  A
    non-contiguous ``w`` is read in its logical row-major order.  NaN/inf raise ValueError (pass
    ``check_finite=False`` to skip that scan).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_nf4: w must be float32, bfloat16 or float16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: w is empty (shape {tuple(w.shape)})")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    if w.device.type not in ("cpu", "cuda"):
        raise ValueError(f"quantize_nf4: w must be on a CPU or CUDA device, got {w.device}")
    if check_finite:
        _check_finite(w)
    impl = backend_module(select_backend(w.device, backend))
    flat = w.detach().reshape(-1).contiguous()
    packed, absmax = impl.quantize_blocks(flat, blocksize)
    nested_absmax = nested_code = offset = None
    if double_quant:
        # bitsandbytes' offset is torch's mean: keep it for bit-identical results.
        offset = absmax.mean()
        nested_code = dynamic_code(w.device)
        absmax, nested_absmax = impl.quantize_absmax_nested(absmax, offset, nested_code)
    return NF4Weight(packed=packed.reshape(-1, 1), absmax=absmax, code=nf4_code(w.device), shape=w.shape,
                     dtype=w.dtype, blocksize=blocksize, nested_absmax=nested_absmax,
                     nested_code=nested_code, offset=offset, check_tables=False)


def _check_finite(w: torch.Tensor) -> None:
    """ValueError if ``w`` holds NaN/inf.  A finite fp32 sum proves every element finite (NaN and
    inf propagate through addition) without a weight-sized temporary; only a non-finite sum
    (a bad element, or an overflow of huge finite values) pays for the exact count."""
    if bool(torch.isfinite(w.sum(dtype=torch.float32))):
        return
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise ValueError(f"quantize_nf4: w has {bad} NaN/inf element(s); NF4 cannot represent them")


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None, *, backend: str | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense weight of shape ``q.shape`` in ``dtype`` (default: the weight's original dtype).

    Bit-identical to ``bitsandbytes.functional.dequantize_4bit``.  ``out``, if given, must be a
    contiguous tensor of ``q.numel`` elements of ``dtype`` on ``q``'s device; it is filled and returned
    (viewed as ``q.shape``).
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"dequantize_nf4: q must be an NF4Weight, got {type(q).__name__}")
    dtype = dtype or q.dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize_nf4: dtype must be float32, bfloat16 or float16, got {dtype}")
    if out is not None:
        if out.dtype != dtype or out.numel() != q.numel or out.device != q.device or not out.is_contiguous():
            raise ValueError(f"dequantize_nf4: out must be a contiguous {dtype} tensor of {q.numel} elements on "
                             f"{q.device}, got {out.dtype} {tuple(out.shape)} on {out.device} "
                             f"(contiguous={out.is_contiguous()})")
        out = out.view(-1)
    impl = backend_module(select_backend(q.device, backend))
    res = impl.dequantize(q.packed.view(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code,
                          q.numel, q.blocksize, dtype, out=out)
    return res.view(q.shape)


# ---------------------------------------------------------------------------------------------
# The fused LoRA / QLoRA linear (forward)
#
# Routes:
#   "triton-gemv"    M <= 16 on CUDA: split-K GEMV streaming the 4-bit weight (decode)
#   "triton-tiled"   tiled GEMM dequantizing weight tiles in registers (never writes the dense
#                    weight).  NOT chosen automatically yet: measured on an H100 it is 7-30x
#                    slower than dequantize + cuBLAS (benchmarks/results/forward_*_quick*.md);
#                    reachable with route="triton-tiled" until it is fixed
#   "dequant-cublas" M > 16 on CUDA (measured faster, see above), and the fallback for K not a
#                    multiple of the blocksize or fp32 activations; materializes the dense
#                    weight for the duration of the call
#   "reference"      CPU (and anything else): reference.lora_linear_reference in fp32
FORWARD_ROUTES = ("triton-gemv", "triton-tiled", "dequant-cublas", "reference")


def forward_route(M: int, weight, x_dtype: torch.dtype, device: torch.device) -> str:
    """The route ``lora_linear`` takes for M rows of x on ``device`` (one visible decision)."""
    if device.type != "cuda":
        return "reference"
    if x_dtype not in (torch.bfloat16, torch.float16) or not _ext.triton_available():
        return "dequant-cublas"
    if isinstance(weight, NF4Weight) and weight.shape[1] % weight.blocksize != 0:
        return "dequant-cublas"
    from .triton.nf4_lora_matmul import GEMV_MAX_M

    return "triton-gemv" if M <= GEMV_MAX_M else "dequant-cublas"


def lora_linear(x: torch.Tensor, weight, lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                scale: float | torch.Tensor = 1.0, bias: torch.Tensor | None = None, *,
                route: str | None = None, config: dict | None = None) -> torch.Tensor:
    """y = x · Ŵᵀ + ((x · Aᵀ) ⊙ s) · Bᵀ + bias.

    x: [..., K] bf16/fp16 (fp32 takes the fallback route); weight: ``NF4Weight`` (N, K) or a dense
    [N, K] tensor; lora_a: [r, K] and lora_b: [N, r] (x's dtype), or None for no low-rank term;
    scale: float (alpha / r) or an fp32 [r] vector (AdaLoRA); bias: [N] or None.  Returns
    [..., N] in x's dtype.  ``route``: one of FORWARD_ROUTES to force; default ``forward_route``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError("lora_linear: x must be a tensor [..., K]")
    if isinstance(weight, NF4Weight):
        if len(weight.shape) != 2:
            raise ValueError(f"lora_linear: weight must be 2-D (N, K), got {tuple(weight.shape)}")
        N, K = weight.shape
        wdev = weight.device
    elif isinstance(weight, torch.Tensor) and weight.dim() == 2:
        N, K = weight.shape
        wdev = weight.device
    else:
        raise TypeError("lora_linear: weight must be an NF4Weight or a 2-D tensor [N, K]")
    if x.shape[-1] != K:
        raise ValueError(f"lora_linear: x's last dim is {x.shape[-1]}, the weight expects K={K}")
    if x.device != wdev:
        raise ValueError(f"lora_linear: x is on {x.device} but the weight is on {wdev}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_linear: give both lora_a and lora_b, or neither")
    x2d = x.reshape(-1, K)
    route = route or forward_route(x2d.shape[0], weight, x.dtype, x.device)
    if route not in FORWARD_ROUTES:
        raise ValueError(f"lora_linear: unknown route {route!r}; expected one of {FORWARD_ROUTES}")
    if route.startswith("triton-"):
        from .triton.nf4_lora_matmul import lora_matmul

        y = lora_matmul(x2d, weight, lora_a, lora_b, scale, bias, route=route[len("triton-"):], config=config)
    else:
        dense = weight.dequantize(x.dtype) if isinstance(weight, NF4Weight) else weight
        if route == "reference":
            y = reference.lora_linear_reference(x2d, dense, lora_a, lora_b, scale, bias)
        else:  # dequant-cublas: base GEMM, then the low-rank GEMM accumulated into y in place
            y = torch.nn.functional.linear(x2d, dense.to(x.dtype), None if bias is None else bias.to(x.dtype))
            if lora_a is not None:
                t = x2d @ lora_a.to(x.dtype).t()
                t = t.mul_(scale.to(t.dtype) if isinstance(scale, torch.Tensor) else scale)
                y.addmm_(t, lora_b.to(x.dtype).t())
    return y.reshape(*x.shape[:-1], N)
