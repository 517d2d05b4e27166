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

import functools
import importlib
import math
import numbers
import os
import types

import torch

from . import _ext, reference
from .codes import VALID_BLOCKSIZES, dynamic_code, nf4_code, shared_table
from .nf4 import NF4Weight

BACKENDS = ("cuda", "triton", "cpp", "reference")
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: the dtypes the LoRA linears accept for x and their tensor operands (float64: gradcheck and references)
_OPERAND_DTYPES = _FLOAT_DTYPES + (torch.float64,)

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


def _backend_env() -> str | None:
    """$LORA_KERNELS_BACKEND, stripped; None when unset or blank."""
    return (os.environ.get("LORA_KERNELS_BACKEND") or "").strip() or None


def select_backend(device: torch.device | str, requested: str | None = None) -> str:
    """Pick the backend for a call on ``device``: ``requested``, else $LORA_KERNELS_BACKEND, else the
    first available in the device's preference list."""
    device = torch.device(device)
    if requested is not None and not (isinstance(requested, str) and requested):
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {requested!r}")
    from_env = requested is None
    if from_env:
        requested = _backend_env()
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}{' (from $LORA_KERNELS_BACKEND)' if from_env else ''}; "
                             f"expected one of {BACKENDS}")
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
    double_quant, quant_type="nf4")`` on CUDA tensors (its CUDA kernels).  On CPU tensors the packed
    bytes and fp32 absmax match its CPU path; with double quantization that path picks the 8-bit
    absmax codes through a lookup-table approximation that can land one code away near a midpoint
    (``tests/test_nf4_format.py``; ours picks the nearest code).  A
    non-contiguous ``w`` is read in its logical row-major order.  NaN/inf raise ValueError (pass
    ``check_finite=False`` to skip that scan).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_nf4: w must be float32, bfloat16 or float16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: w is empty (shape {tuple(w.shape)})")
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral):
        raise TypeError(f"quantize_nf4: blocksize must be an int, got {blocksize!r}")
    blocksize = int(blocksize)
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    if w.device.type not in ("cpu", "cuda"):
        raise ValueError(f"quantize_nf4: w must be on a CPU or CUDA device, got {w.device}")
    if check_finite:
        _check_finite(w)
    impl = backend_module(select_backend(w.device, backend))
    flat = w.detach().reshape(-1).contiguous()
    if double_quant:
        shfl_up = _fused_double_quant_order(impl, flat, blocksize)
        if shfl_up is not None:
            return _quantize_nf4_fused(impl, flat, w, blocksize, shfl_up, check_finite)
    packed, absmax = impl.quantize_blocks(flat, blocksize)
    nested_absmax = nested_code = offset = None
    if double_quant:
        # bitsandbytes' offset is torch's mean: keep it for bit-identical results.
        offset = absmax.mean()
        if check_finite and not bool(torch.isfinite(offset)):
            raise ValueError(_OFFSET_OVERFLOW)
        nested_code = dynamic_code(w.device)
        absmax, nested_absmax = impl.quantize_absmax_nested(absmax, offset, nested_code)
    return NF4Weight(packed=packed.reshape(-1, 1), absmax=absmax, code=nf4_code(w.device), shape=w.shape,
                     dtype=w.dtype, blocksize=blocksize, nested_absmax=nested_absmax,
                     nested_code=nested_code, offset=offset, check_tables=False)


_OFFSET_OVERFLOW = ("quantize_nf4: the double quantization's offset (the mean of the block absmaxes) "
                    "overflows float32 for weights this large; pass double_quant=False")
#: quantize_nf4's two-launch double quantization on CUDA (the block pass, then one kernel that
#: replays torch.mean's reduction order for the offset and runs the nested pass; see
#: csrc/cuda/nf4_cuda.cu).  False: the block pass, torch's own mean and the nested pass (benchmarks
#: flip it to compare).
FUSED_DOUBLE_QUANT = True
#: values from which torch's mean of an fp32 vector runs 512-thread vectorized CTAs (the replay's domain)
_MEAN_REPLAY_MIN = 2048
#: (device, number of values) -> the replay's warp-shuffle order that gave torch.mean's bits
#: (False: offsets 16..1, torch >= 2.13; True: 1..16), or None where neither did
_mean_replay_orders: dict[tuple[torch.device, int], bool | None] = {}


def _fused_double_quant_order(impl, flat: torch.Tensor, blocksize: int) -> bool | None:
    """The ``shfl_up`` argument of ``impl.quantize_nf4_double`` when that route may take ``flat``, else
    None (another backend, an extension built before it, fewer than 2048 blocks, the route switched
    off, or a replay that does not reproduce torch.mean here)."""
    if not (FUSED_DOUBLE_QUANT and flat.is_cuda and hasattr(impl, "quantize_nf4_double")):
        return None
    nb = -(-flat.numel() // blocksize)
    if nb < _MEAN_REPLAY_MIN:
        return None
    return mean_replay_order(impl, flat.device, nb)


def mean_replay_order(ext, device: torch.device, nb: int) -> bool | None:
    """Which warp-shuffle order of ``ext.torch_order_mean`` reproduces ``torch.mean``'s bits for fp32
    vectors of ``nb`` values on ``device`` (None: neither).  Checked once per (device, nb) on three
    random vectors whose values span 2^-24..2^8 (any other summation order changes their sums'
    low bits); costs one sync.  While a CUDA graph is being captured an unchecked size answers None
    (no sync possible) and stays unchecked."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, nb)
    if key in _mean_replay_orders:
        return _mean_replay_orders[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    g = torch.Generator(device=device).manual_seed(0x5EED + nb)
    xs = [torch.rand(nb, device=device, generator=g)
          * torch.exp2(torch.randint(-24, 9, (nb,), device=device, generator=g).float()) for _ in range(3)]
    ref = torch.stack([x.mean() for x in xs]).view(torch.int32)
    found = None
    for shfl_up in (False, True):
        ours = torch.stack([ext.torch_order_mean(x, shfl_up) for x in xs]).view(torch.int32)
        if torch.equal(ours, ref):
            found = shfl_up
            break
    _mean_replay_orders[key] = found
    return found


def _quantize_nf4_fused(impl, flat: torch.Tensor, w: torch.Tensor, blocksize: int, shfl_up: bool,
                        check_finite: bool) -> NF4Weight:
    packed, absmax_q, nested_absmax, offset, code, nested_code = impl.quantize_nf4_double(
        flat, blocksize, shared_table("nf4", flat.device), shared_table("dynamic", flat.device), shfl_up)
    if check_finite and not bool(torch.isfinite(offset)):
        raise ValueError(_OFFSET_OVERFLOW)
    return NF4Weight(packed=packed.reshape(-1, 1), absmax=absmax_q, code=code, shape=w.shape, dtype=w.dtype,
                     blocksize=blocksize, nested_absmax=nested_absmax, nested_code=nested_code, offset=offset,
                     check_tables=False)


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
    impl = backend_module(_dequantize_backend(q.device, q.numel, backend))
    res = impl.dequantize(q.packed.view(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code,
                          q.numel, q.blocksize, dtype, out=out)
    return res.view(q.shape)


#: From this many elements up, ``dequantize_nf4`` on CUDA prefers the Triton kernel to the CUDA
#: one: it streams ~9 % faster on an H100 (0.95 vs 0.87 of copy bandwidth at 8192x28672), and its
#: longer Python launch (~30 us more host time) is hidden behind a >= 150 us kernel; below, the two
#: run within noise on the GPU and the CUDA kernel's lower host latency wins
#: (benchmarks/results/nf4_nvidia-h100-80gb-hbm3.md).
TRITON_DEQUANTIZE_MIN_NUMEL = 1 << 27


def _dequantize_backend(device: torch.device, numel: int, requested: str | None) -> str:
    name = select_backend(device, requested)
    if (name == "cuda" and numel >= TRITON_DEQUANTIZE_MIN_NUMEL and requested is None
            and _backend_env() is None and _triton_on(device)):
        return "triton"
    return name


# ---------------------------------------------------------------------------------------------
# The fused LoRA / QLoRA linear (forward)
#
# Routes (benchmarks/results/forward_*.md name the route every row was measured on):
#   "cuda-gemv"      M <= 16 on CUDA, NF4 weight with blocksize >= 64, K % 64 == 0, bf16/fp16 x:
#                    csrc/cuda/nf4_gemv.cu -- tensor-core GEMV reading the 4-bit weight once,
#                    low-rank term and bias in its epilogue (decode); nf4_gemv_v3.cu /
#                    nf4_gemv_v2.cu at M = 1 (gemv_variant)
#   "triton-gemv"    M <= 16 on CUDA otherwise (dense base weight, blocksize 32, no CUDA ext):
#                    split-K GEMV in Triton
#   "merge-cublas"   M > 16 on CUDA: a memory-bound Triton pass writes the merged weight
#                    W_eff = Ŵ + B·diag(s)·A in x's dtype (triton/nf4_merge.py) for a chunk of
#                    rows into a reused workspace, then cuBLAS computes y[:, rows] = x · W_effᵀ
#                    + bias; the LoRA term costs no pass over y.  A chunk holds at most
#                    WORKSPACE_BYTES (LORA_KERNELS_WORKSPACE_MB; 0 = one chunk) and, on the
#                    training path (whole_weight=False), at most half the weight
#   "triton-tiled"   tiled GEMM dequantizing weight tiles in registers (never writes the dense
#                    weight).  NOT chosen automatically: measured 7-30x slower than cuBLAS on an
#                    H100 (benchmarks/results/forward_*_quick*.md); reachable with route=
#   "dequant-cublas" the fallback: K not a multiple of the blocksize, fp32 activations, no Triton
#   "reference"      CPU (and anything else): reference.lora_linear_reference in fp32
FORWARD_ROUTES = ("cuda-gemv", "triton-gemv", "merge-cublas", "triton-tiled", "dequant-cublas", "reference")
GEMV_MAX_M = 16


def _cuda_gemv_ok(weight) -> bool:
    if not isinstance(weight, NF4Weight):
        return False
    K = weight.shape[1]
    if weight.blocksize < 64 or K % 64 != 0 or K % weight.blocksize != 0:
        return False
    ext = _ext.cuda_ext()
    return ext is not None and hasattr(ext, "lora_gemv")


def _fallback_route(weight, dtype: torch.dtype, device: torch.device) -> str | None:
    """What both directions take before any kernel choice: "reference" off CUDA, "dequant-cublas"
    for fp32/float64 activations or an NF4 weight whose K is not a multiple of its blocksize, else None."""
    if isinstance(device, str):
        device = torch.device(device)
    if device.type != "cuda":
        return "reference"
    if dtype not in (torch.bfloat16, torch.float16):
        return "dequant-cublas"
    if isinstance(weight, NF4Weight) and weight.shape[1] % weight.blocksize != 0:
        return "dequant-cublas"
    return None


def forward_route(M: int, weight, x_dtype: torch.dtype, device: torch.device) -> str:
    """The route ``lora_linear`` takes for M rows of x on ``device`` -- one visible decision."""
    route = _fallback_route(weight, x_dtype, device)
    if route is not None:
        return route
    if M <= GEMV_MAX_M:
        if _cuda_gemv_ok(weight):
            return "cuda-gemv"
        return "triton-gemv" if _ext.triton_available() else "dequant-cublas"
    return "merge-cublas" if _ext.triton_available() else "dequant-cublas"


def _cuda_gemv(x2d, weight: NF4Weight, lora_a, lora_b, scale, bias) -> torch.Tensor:
    dt = x2d.dtype
    x2d = x2d.contiguous()             # (the extension copies an x or A that is not 16-byte aligned)
    scale_vec, s = None, 1.0
    if lora_a is not None:
        lora_a = lora_a.to(dt).contiguous()
        lora_b = lora_b.to(dt).contiguous()
        if isinstance(scale, torch.Tensor):
            scale_vec = scale.detach().to(device=x2d.device, dtype=torch.float32).reshape(-1)
            scale_vec = scale_vec.expand(lora_a.shape[0]).contiguous()
        else:
            s = float(scale)
    if bias is not None and bias.dtype not in (dt, torch.float32):
        bias = bias.to(dt)
    return _ext_lora_gemv(_ext.cuda_ext(), x2d, x2d.shape[0], weight, lora_a, lora_b, s, scale_vec,
                          None if bias is None else bias.contiguous())


def _ext_lora_gemv(ext, x, M: int, q: NF4Weight, lora_a, lora_b, s: float, scale_vec, bias) -> torch.Tensor:
    """One call of the extension's lora_gemv on x [..., K] (M rows) with the decode variant
    ``gemv_variant_chosen`` picks; the operands already of x's dtype (bias: or fp32)."""
    N, K = q.shape
    nested = q.nested_absmax is not None
    variant = gemv_variant_chosen(M, N, K, lora_a is not None, q.blocksize, nested)
    return ext.lora_gemv(x, q.packed, q.absmax, q.nested_absmax, q.nested_code if nested else None,
                         q.offset if nested else None, q.code, N, q.blocksize, lora_a, lora_b, s, scale_vec,
                         bias, variant)


_GEMV_VARIANT_ENV = "LORA_KERNELS_GEMV_VARIANT"
# os.environ.get costs ~0.6 us (it encodes the key on every call); the decode hot path reads the
# variable straight from os.environ's backing dict, which setenv / monkeypatch keep current (CPython
# on POSIX and Windows; anything else falls back to os.environ.get).
try:
    _ENV_DATA, _GEMV_VARIANT_KEY = os.environ._data, os.environ.encodekey(_GEMV_VARIANT_ENV)
except AttributeError:  # pragma: no cover - not CPython
    _ENV_DATA, _GEMV_VARIANT_KEY = None, None


def _gemv_variant_env() -> str | None:
    if _ENV_DATA is None:  # pragma: no cover
        return os.environ.get(_GEMV_VARIANT_ENV)
    v = _ENV_DATA.get(_GEMV_VARIANT_KEY)
    return os.environ.decodevalue(v) if v is not None else None


def gemv_variant_override() -> int | None:
    """$LORA_KERNELS_GEMV_VARIANT as an int (1-5; tests and A/B runs force a decode kernel with it), or None."""
    v = _gemv_variant_env()
    return _parse_gemv_variant(v) if v else None


@functools.lru_cache(maxsize=8)
def _parse_gemv_variant(v: str) -> int:
    if v.strip() not in ("1", "2", "3", "4", "5"):
        raise ValueError(f"${_GEMV_VARIANT_ENV}={v!r} must be a decode kernel variant, 1 to 5")
    return int(v)


def gemv_variant_chosen(M: int, N: int, K: int, has_lora: bool, blocksize: int = 64,
                        double_quant: bool = True) -> int:
    """The decode kernel variant the cuda-gemv route asks the extension for: ``gemv_variant_override``
    when set, else ``gemv_variant`` (told whether variant 5 takes these sizes, ``gemv_v5_takes``).
    The extension falls back to variant 1 where the asked variant cannot take the sizes
    (``lora_gemv_v2_workspace``, ``lora_gemv_v{3,4}_supported`` and ``lora_gemv_v5_slices`` say when)."""
    forced = _gemv_variant_env()    # gemv_variant_override, inlined (decode hot path)
    if forced:
        return _parse_gemv_variant(forced)
    return _gemv_variant_default(M, N, K, has_lora, blocksize, double_quant)


@functools.lru_cache(maxsize=4096)
def _gemv_variant_default(M: int, N: int, K: int, has_lora: bool, blocksize: int, double_quant: bool) -> int:
    """``gemv_variant_chosen`` without the override, cached per sizes (one lookup per decode call)."""
    return gemv_variant(M, N, K, has_lora, gemv_v5_takes(M, N, K, blocksize, has_lora, double_quant))


#: decode variant -> its planner in _C_cuda and what of the planner's answer means "runs the sizes itself"
#: (else the extension runs variant 1); variant 5's planner also takes double_quant.
_GEMV_PLANNERS = {2: ("lora_gemv_v2_workspace", lambda got: got >= 0),
                  3: ("lora_gemv_v3_supported", bool),
                  4: ("lora_gemv_v4_supported", bool),
                  5: ("lora_gemv_v5_slices", lambda got: got > 0)}


def gemv_variant_built(v: int) -> bool:
    """Whether the CUDA extension has decode variant v (1: always, where the extension exists)."""
    ext = _ext.cuda_ext()
    return ext is not None and (v == 1 or (v in _GEMV_PLANNERS and hasattr(ext, _GEMV_PLANNERS[v][0])))


def gemv_variant_runs(v: int, M: int, N: int, K: int, blocksize: int = 64, r: int = 0,
                      double_quant: bool = True) -> bool | None:
    """Whether decode variant v runs these sizes itself on the current CUDA device (its planner; r = 0:
    no low-rank term), or None where no CUDA build with that planner can tell.  Variant 1: True."""
    if v == 1:
        return True
    if not gemv_variant_built(v) or not torch.cuda.is_available():
        return None
    name, runs = _GEMV_PLANNERS[v]
    args = (M, N, K, blocksize, r) + ((double_quant,) if v == 5 else ())
    return bool(runs(getattr(_ext.cuda_ext(), name)(*args)))


def gemv_variant_ran(M: int, N: int, K: int, has_lora: bool, blocksize: int = 64, double_quant: bool = True) -> int:
    """The decode kernel variant that actually runs for these sizes (benchmark route labels):
    ``gemv_variant_chosen``, or 1 where ``gemv_variant_runs`` says the chosen variant falls back.
    Without a CUDA build that can tell, the chosen variant."""
    v = gemv_variant_chosen(M, N, K, has_lora, blocksize, double_quant)
    return 1 if gemv_variant_runs(v, M, N, K, blocksize, 16 if has_lora else 0, double_quant) is False else v


def gemv_v5_takes(M: int, N: int, K: int, blocksize: int, has_lora: bool, double_quant: bool) -> bool:
    """Whether variant 5 runs these sizes itself, in either of its modes (``lora_gemv_v5_mode`` 1: all
    of x in shared memory; 2: x staged per K slice, M = 9..16 or M >= 4 at K = 14336), False where it
    cannot tell (``_gemv_variant_default`` caches the decision per sizes: the first device's answer;
    the extension still falls back to variant 1 where it does not fit)."""
    return gemv_variant_runs(5, M, N, K, blocksize, 16 if has_lora else 0, double_quant) is True


def gemv_variant(M: int, N: int, K: int, has_lora: bool, v5_takes: bool = False) -> int:
    """Which decode kernel the cuda-gemv route runs (``gemv_variant_chosen`` lets
    $LORA_KERNELS_GEMV_VARIANT override it), from the H100 A/B of variants 1, 2, 3 and 5
    (benchmarks/results/gemv_variants_nvidia-h100-80gb-hbm3_session15{,b,16}.md, CUDA-graph replay,
    M = 1..16).  Weights of < 2^25 elements: 2 (nf4_gemv_v2.cu, one persistent launch) without LoRA,
    M <= 8 (4096x4096: 9.7-10.3 us against 10.7-11.9 for variants 1 and 5), else 1 (nf4_gemv.cu; with
    LoRA 13.1-13.8 us against variant 5's 14.0-15.7, whose T pieces inside the GEMV are not hidden on a
    small weight).  Larger weights: 5 (nf4_gemv_v5.cu: tensor cores fed from a cp.async ring, T inside
    the GEMV) wherever it takes the sizes (``v5_takes``, either x mode), e.g. 4096x14336 M = 1
    18.2-19.4 / 20.5-21.1 us (r = 0 / 16) against variant 3's 21.1 / 22.3-22.6, M = 16 24.5 / 35.0
    against variant 1's 32.9 / 38.1, 8192x28672 M = 1 55.5-58.4 / 58.7-61.0 against 60.0-60.8 /
    61.5-61.7, M = 8 (x per K slice) 73.4 / 81.7 against 100.5 / 107.5 -- except M = 9..16 with LoRA at
    K > 8192, where variant 5's low-rank term costs more than its GEMV saves (14336x4096 M = 16,
    r = 16: 38.8 us against variant 1's 35.6; session 16).  On 14336x4096 at M = 1 with LoRA
    variant 3 was 0.3-1.2 us faster (22.9-23.1 against 23.2-24.1) but launches three kernels to variant
    5's two, which costs more than that in an eager call; 5 stays.  Where 5 does not take the sizes: 3
    (nf4_gemv_v3.cu, CUDA cores) for M = 1, 1 (nf4_gemv.cu, tensor cores) otherwise.  A variant that
    cannot take the arguments falls back to 1 inside the extension."""
    if N * K < 1 << 25:
        return 2 if not has_lora and M <= 8 else 1
    if v5_takes and (M <= 8 or not has_lora or K <= 8192):
        return 5
    return 3 if M == 1 else 1


def decode_linear(x: torch.Tensor, weight, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
                  scale: float, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``lora_linear`` for inference callers on the decode hot path: the ``cuda-gemv`` route with
    the Python argument checks left to the extension (which checks every argument and raises a
    ValueError naming it).  Returns None, having done nothing, wherever ``forward_route`` would not
    take ``cuda-gemv`` (CPU, M > GEMV_MAX_M, fp32 x, a dense weight, ...), ``scale`` is a tensor,
    or an operand is mis-shaped or not contiguous; the caller then takes the general path, whose
    checks name the problem.  Same kernel and arguments as ``lora_linear``, so the same bits.  No
    autograd: call it only where no gradient is wanted.

    Every step here costs host time on the decode path (benchmarks/NOTES.md, session 15: a Python
    tensor method is ~0.3-1 us on the H100 host): x goes to the extension as [..., K] (it returns
    [..., N]) and the packed weight in its stored shape, with no reshape, view or alignment copy."""
    if (not isinstance(weight, NF4Weight) or not x.is_cuda or x.dtype not in _GEMV_DTYPES
            or isinstance(scale, torch.Tensor)):
        return None
    xs, ws = x.shape, weight.shape
    bs = weight.blocksize
    if not xs or len(ws) != 2 or not ws[1] or xs[-1] != ws[1] or bs < 64 or ws[1] % bs:
        return None
    N, K = ws
    M = x.numel() // K
    if not 1 <= M <= GEMV_MAX_M or not x.is_contiguous():
        return None
    ext = _ext.cuda_ext()
    if ext is None or not hasattr(ext, "lora_gemv"):
        return None
    dt = x.dtype
    s = 1.0
    if lora_a is not None:
        if (lora_b is None or lora_a.dim() != 2 or lora_a.shape[1] != K or lora_b.shape != (N, lora_a.shape[0])
                or lora_a.shape[0] < 1):
            return None                    # lora_linear's checks name the problem
        if lora_a.dtype != dt:
            lora_a = lora_a.to(dt)
        if lora_b.dtype != dt:
            lora_b = lora_b.to(dt)
        if not (lora_a.is_contiguous() and lora_b.is_contiguous()):
            return None
        s = float(scale)
    if bias is not None:
        if bias.shape != (N,):
            return None
        if bias.dtype != dt and bias.dtype != torch.float32:
            bias = bias.to(dt)
        if not bias.is_contiguous():
            return None
    try:
        return _ext_lora_gemv(ext, x, M, weight, lora_a, lora_b, s, None, bias)
    except RuntimeError as e:          # the extension's argument checks: a ValueError, like lora_linear's
        if str(e).startswith("lora_gemv:"):
            raise ValueError(str(e).split("\n")[0]) from None
        raise


_GEMV_DTYPES = (torch.bfloat16, torch.float16)


#: LORA_KERNELS_WORKSPACE_MB (default 64): the most bytes of merged weight one chunk of the
#: merge-cublas route may hold.  On the training path a chunk is also at most half the weight, so
#: the dense [N, K] weight never exists whole (issue 4: no N·K·2 allocation in a training step);
#: inference merges a weight that fits whole.  0 = one chunk holding the whole merged weight (a
#: fresh [N, K] tensor per call, bitsandbytes' way).
WORKSPACE_BYTES = int(_ext.env_number("LORA_KERNELS_WORKSPACE_MB", 64.0, float, minimum=0) * 2**20)
_workspaces: dict = {}


def _on_default_stream(device: torch.device) -> bool:
    return device.type == "cuda" and torch._C._cuda_getCurrentRawStream(device.index) == 0  # legacy default


def _workspace(device: torch.device, dtype: torch.dtype, numel: int, slot: int = 0) -> torch.Tensor:
    """A flat scratch tensor of >= ``numel`` elements, cached per (device, dtype, slot) and reused by
    every layer (grown when a larger chunk is asked for) while kernels run on the device's default
    stream (slot 1: the second buffer of the overlapped pipeline).  A fresh tensor on any other
    stream -- CUDA-graph capture and torch.compile's cudagraph warm-up run on side streams and
    allocate from a private pool that must not keep a cached tensor alive --, off CUDA, or with
    WORKSPACE_BYTES == 0."""
    if WORKSPACE_BYTES <= 0 or not _on_default_stream(device):
        return torch.empty(numel, dtype=dtype, device=device)
    key = (device, dtype) if slot == 0 else (device, dtype, slot)
    ws = _workspaces.get(key)
    if ws is None or ws.numel() < numel:
        _workspaces.pop(key, None)                 # free the smaller one before allocating
        ws = _workspaces[key] = torch.empty(numel, dtype=dtype, device=device)
    return ws


def workspace_nbytes() -> int:
    """Bytes the cached merge workspaces hold now (all devices, dtypes and streams)."""
    return sum(t.numel() * t.element_size() for t in _workspaces.values())


#: LORA_KERNELS_MERGE_OVERLAP=1 (opt-in): the streamed routes merge chunk i + 1 on a side stream
#: into a second workspace while cuBLAS multiplies chunk i (the merge is memory-bound, the GEMM
#: compute-bound); two chunks of workspace instead of one.  Off the default stream (graph capture,
#: torch.compile's cudagraphs) the chunks run in order as without it.  Session 18 (H100, M = 4096 and
#: 16384 training steps): no difference from the in-order pipeline beyond the runs' spread.
MERGE_OVERLAP = os.environ.get("LORA_KERNELS_MERGE_OVERLAP", "0") == "1"
_merge_streams: dict = {}


def _run_chunks(device: torch.device, dtype: torch.dtype, numel: int, bounds, merge, gemm) -> None:
    """For each ``(a, b)`` of ``bounds``: ``merge(ws, a, b)`` writes a chunk of W_eff into the
    workspace ``ws`` (>= ``numel`` elements), then ``gemm(ws, a, b)`` consumes it.  In order on the
    current stream, or with MERGE_OVERLAP the merges on a side stream, double-buffered: merge i + 1
    waits only for GEMM i - 1 (the last reader of its buffer), GEMM i for merge i."""
    if not (MERGE_OVERLAP and len(bounds) > 1 and _on_default_stream(device)):   # WORKSPACE_BYTES <= 0: one chunk
        ws = _workspace(device, dtype, numel)
        for a, b in bounds:
            merge(ws, a, b)
            gemm(ws, a, b)
        return
    main = torch.cuda.current_stream(device)
    side = _merge_streams.get(device)
    if side is None:
        side = _merge_streams[device] = torch.cuda.Stream(device)
    bufs = (_workspace(device, dtype, numel), _workspace(device, dtype, numel, slot=1))
    side.wait_stream(main)                  # the inputs, and the previous call's GEMMs on these buffers
    freed = [None, None]
    for i, (a, b) in enumerate(bounds):
        ws = bufs[i & 1]
        with torch.cuda.stream(side):
            if freed[i & 1] is not None:
                side.wait_event(freed[i & 1])
            merge(ws, a, b)
            merged = torch.cuda.Event()
            merged.record(side)
        main.wait_event(merged)
        gemm(ws, a, b)
        freed[i & 1] = torch.cuda.Event()
        freed[i & 1].record(main)


#: LORA_KERNELS_FUSED_DY_PASS=1 (opt-in): the eager backward takes U = dY·B and dB = s·dYᵀ·T from
#: one read of dY (triton/lora_grad.py) instead of two cuBLAS GEMMs.  Session 18 (H100, M = 4096,
#: r = 16): 31 µs less than cuBLAS's pair on 8192→28672, 9 µs more on 14336→4096; not visible in the
#: step beyond the runs' spread.
FUSED_DY_PASS = os.environ.get("LORA_KERNELS_FUSED_DY_PASS", "0") == "1"


def fused_dy_pass_takes(dy: torch.Tensor, r: int, scale) -> bool:
    """Whether the backward computes (U, dB) with ``lora_grad.lora_dy_pass``: FUSED_DY_PASS on, a
    CUDA dY not being traced, a float scale, and a size where it pays (``lora_grad.worth_it``)."""
    if not (FUSED_DY_PASS and dy.is_cuda and isinstance(scale, float) and _ext.triton_available()
            and dy.dtype in _GEMV_DTYPES and not torch.compiler.is_compiling()):
        return False
    return _triton_module("lora_grad").worth_it(dy.shape[0], dy.shape[1], r)


def lora_dy_pass(dy: torch.Tensor, lora_b: torch.Tensor, t: torch.Tensor, scale: float, db_dtype: torch.dtype):
    """(U, dB) = (dY · B, scale · dYᵀ · T) by ``triton/lora_grad.lora_dy_pass`` (where
    ``fused_dy_pass_takes``)."""
    return _triton_module("lora_grad").lora_dy_pass(dy, lora_b, t, scale, db_dtype=db_dtype)


def merge_chunk(length: int, other: int, unit: int, whole_weight: bool = True) -> int:
    """Chunk length along a weight dimension of ``length`` (the other one has ``other`` elements):
    a multiple of ``unit`` holding at most WORKSPACE_BYTES of bf16, and with ``whole_weight=False``
    at most half of ``length``.  A result >= ``length`` means one chunk (WORKSPACE_BYTES == 0, a
    small weight, or a dimension shorter than two units)."""
    if WORKSPACE_BYTES <= 0:
        return length
    size = max(unit, WORKSPACE_BYTES // (2 * other) // unit * unit)
    if not whole_weight:
        half = -(-length // 2)
        size = min(size, -(-half // unit) * unit)        # half the length, rounded up to the unit
    return size


_TRITON_MODULES: dict = {}


def _triton_module(name: str):
    """``lora_kernels.triton.<name>``, imported on first use (Triton is optional at import time) and
    kept: the training path calls into these modules several times per layer, where an import
    statement costs µs."""
    mod = _TRITON_MODULES.get(name)
    if mod is None:
        mod = _TRITON_MODULES[name] = importlib.import_module(f"{__package__}.triton.{name}")
    return mod


def _merge_module():
    return _triton_module("nf4_merge")


def _merge_args(weight, lora_a, lora_b, scale, dt):
    """(base, A, B, s_scalar, s_vec) for ``nf4_merge.merge_window``.  A and B stay in their own
    float dtype (the kernel rounds them to the output dtype itself: no cast launches per call)."""
    s_scalar, s_vec = 1.0, None
    if lora_a is not None:
        s_scalar, s_vec = _merge_module().scale_operands(scale, lora_a.shape[0], lora_a.device)
    base = weight if isinstance(weight, NF4Weight) else weight.to(dt)
    return base, lora_a, lora_b, s_scalar, s_vec


def _merge_cublas(x2d, weight, lora_a, lora_b, scale, bias, whole_weight: bool = True) -> torch.Tensor:
    """y = x·W_effᵀ + bias, W_eff = Ŵ + (B⊙s)·A merged in row chunks through the workspace."""
    dt = x2d.dtype
    if bias is not None:
        bias = bias.to(dt)
    if lora_a is None and not isinstance(weight, NF4Weight):
        return torch.nn.functional.linear(x2d, weight.to(dt), bias)
    merge_window = _merge_module().merge_window

    base, lora_a, lora_b, s_scalar, s_vec = _merge_args(weight, lora_a, lora_b, scale, dt)
    N, K = base.shape
    rows = min(N, merge_chunk(N, K, 128, whole_weight))
    if rows == N:       # one chunk (inference, a weight that fits): no output slices
        ws = _workspace(x2d.device, dt, rows * K)
        merge_window(ws, base, lora_a, lora_b, s_scalar, s_vec, (0, N), (0, K))
        w_eff_t = ws.as_strided((K, N), (1, K))
        return torch.mm(x2d, w_eff_t) if bias is None else torch.addmm(bias, x2d, w_eff_t)
    y = torch.empty((x2d.shape[0], N), dtype=dt, device=x2d.device)

    def merge(ws, n0, n1):                                       # ws[:n·K] = W_eff[n0:n1]
        merge_window(ws, base, lora_a, lora_b, s_scalar, s_vec, (n0, n1), (0, K))

    def gemm(ws, n0, n1):
        w_eff_t = ws.as_strided((K, n1 - n0), (1, K))            # W_eff[n0:n1]ᵀ, one view op
        if bias is None:                                         # cuBLAS writes the column slice in place
            torch.mm(x2d, w_eff_t, out=y.narrow(1, n0, n1 - n0))
        else:
            torch.addmm(bias.narrow(0, n0, n1 - n0), x2d, w_eff_t, out=y.narrow(1, n0, n1 - n0))
    _run_chunks(x2d.device, dt, rows * K, [(n0, min(N, n0 + rows)) for n0 in range(0, N, rows)], merge, gemm)
    return y


def backward_route(weight, dy_dtype: torch.dtype, device: torch.device) -> str:
    """The route ``lora_linear_dx`` takes (one of BACKWARD_ROUTES)."""
    return _fallback_route(weight, dy_dtype, device) or ("merge-cublas" if _ext.triton_available()
                                                         else "dequant-cublas")


BACKWARD_ROUTES = ("merge-cublas", "dequant-cublas", "reference")


def lora_linear_dx(dy: torch.Tensor, weight, lora_a: torch.Tensor | None = None,
                   lora_b: torch.Tensor | None = None, scale: float | torch.Tensor = 1.0, *,
                   route: str | None = None, whole_weight: bool = False) -> torch.Tensor:
    """dx = dy · (Ŵ + (B ⊙ s) · A): the input gradient of ``lora_linear`` (no dropout on the path).

    dy: [M, N] fp32/bf16/fp16/float64; weight: ``NF4Weight`` (N, K) or dense [N, K]; lora_a [r, K],
    lora_b [N, r] or both None; scale: float or an fp32/float64 tensor, 0-d or [r].  Returns [M, K]
    in dy's dtype.  Routes (``backward_route``): "merge-cublas" merges W_eff in column chunks
    through the workspace and lets cuBLAS write dx[:, chunk] = dy · W_eff[:, chunk] (the low-rank
    term is inside W_eff; a chunk is at most half the weight unless ``whole_weight``, so the dense
    weight never exists whole in a training step); "dequant-cublas" / "reference" dequantize the
    whole weight and add ((dy · B) ⊙ s) · A with a second GEMM.
    """
    if not isinstance(dy, torch.Tensor) or dy.dim() != 2:
        raise ValueError(f"lora_linear_dx: dy must be a 2-D tensor [M, N], got {getattr(dy, 'shape', dy)}")
    if not (isinstance(weight, NF4Weight) or (isinstance(weight, torch.Tensor) and weight.dim() == 2)):
        raise TypeError("lora_linear_dx: weight must be an NF4Weight or a 2-D tensor [N, K]")
    N, K = weight.shape
    if dy.shape[1] != N:
        raise ValueError(f"lora_linear_dx: dy must be [M, N={N}], got {tuple(dy.shape)}")
    if dy.device != weight.device:
        raise ValueError(f"lora_linear_dx: dy is on {dy.device} but the weight is on {weight.device}")
    _check_adapters("lora_linear_dx", lora_a, lora_b, N, K)
    check_operand_dtypes("lora_linear_dx", dy, weight, lora_a, lora_b, None, scale, x_name="dy")
    return dx_2d(dy, weight, lora_a, lora_b, scale, route=route, whole_weight=whole_weight)


def dx_2d(dy: torch.Tensor, weight, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
          scale: float | torch.Tensor, *, route: str | None = None, whole_weight: bool = False) -> torch.Tensor:
    """``lora_linear_dx`` without its argument checks (for callers that have made them: itself, and
    the eager autograd Functions); the route is still picked here, by ``backward_route``."""
    N, K = weight.shape
    forced = route is not None
    route = route or backward_route(weight, dy.dtype, dy.device)
    if route not in BACKWARD_ROUTES:
        raise ValueError(f"lora_linear_dx: unknown route {route!r}; expected one of {BACKWARD_ROUTES}")
    dt = dy.dtype
    dy = dy.contiguous()
    if route == "merge-cublas":
        if forced:                          # backward_route picks it only where it runs
            _check_triton_route("lora_linear_dx", route, weight, dy.device)
        if lora_a is None and not isinstance(weight, NF4Weight):
            return dy @ weight.to(dt)
        merge_window = _merge_module().merge_window

        base, lora_a, lora_b, s_scalar, s_vec = _merge_args(weight, lora_a, lora_b, scale, dt)
        # column windows start at multiples of the merge tile's width and of the blocksize
        unit = _merge_module().window_col_unit(base.blocksize if isinstance(base, NF4Weight) else 1)
        cols = min(K, merge_chunk(K, N, unit, whole_weight))
        dx = torch.empty((dy.shape[0], K), dtype=dt, device=dy.device)

        def merge(ws, k0, k1):                                   # ws[:N·k] = W_eff[:, k0:k1]
            merge_window(ws, base, lora_a, lora_b, s_scalar, s_vec, (0, N), (k0, k1))

        def gemm(ws, k0, k1):
            torch.mm(dy, ws.as_strided((N, k1 - k0), (k1 - k0, 1)), out=dx.narrow(1, k0, k1 - k0))
        _run_chunks(dy.device, dt, N * cols, [(k0, min(K, k0 + cols)) for k0 in range(0, K, cols)], merge, gemm)
        return dx
    if isinstance(weight, NF4Weight):
        dense = weight.dequantize(dt if dt in _FLOAT_DTYPES else torch.float32).to(dt)
    else:
        dense = weight.to(dt)
    dx = dy @ dense
    if lora_a is not None:
        acc = torch.float64 if dt == torch.float64 else torch.float32
        s = scale.to(acc) if isinstance(scale, torch.Tensor) else float(scale)
        su = ((dy @ lora_b.to(dt)).to(acc) * s).to(dt)
        dx.addmm_(su, lora_a.to(dt))
    return dx


def _check_triton_route(fn: str, route: str, weight, device: torch.device) -> None:
    """A forced route built on Triton kernels (merge-cublas, triton-*): ValueError unless
    Triton can run on ``device`` and an NF4 weight's K is a multiple of its blocksize (the kernels
    read whole blocks; ``forward_route`` / ``backward_route`` send other K to dequant-cublas)."""
    if not _triton_on(device):
        raise ValueError(f"{fn}: route {route!r} runs Triton kernels, which need a CUDA device (or "
                         f"TRITON_INTERPRET=1 on the CPU); x is on {device}")
    if isinstance(weight, NF4Weight) and weight.shape[1] % weight.blocksize != 0:
        raise ValueError(f"{fn}: route {route!r} needs K % blocksize == 0, got K={weight.shape[1]} and "
                         f"blocksize {weight.blocksize}; route 'dequant-cublas' (the default for this K) "
                         f"handles it")


def _check_adapters(fn: str, lora_a, lora_b, N: int, K: int, device: torch.device | None = None) -> None:
    """The adapter checks ``lora_linear`` and ``lora_linear_dx`` share: both or neither, tensors,
    lora_a [r, K] and lora_b [N, r] with r >= 1, and (``device`` given) both on ``device``."""
    if (lora_a is None) != (lora_b is None):
        raise ValueError(f"{fn}: give both lora_a and lora_b, or neither")
    if lora_a is None:
        return
    if not isinstance(lora_a, torch.Tensor) or not isinstance(lora_b, torch.Tensor):
        raise TypeError(f"{fn}: lora_a and lora_b must be tensors, got {type(lora_a).__name__} and "
                        f"{type(lora_b).__name__}")
    r = lora_a.shape[0] if lora_a.dim() == 2 else -1
    if lora_a.dim() != 2 or lora_a.shape[1] != K or lora_b.dim() != 2 or tuple(lora_b.shape) != (N, r):
        raise ValueError(f"{fn}: lora_a must be [r, K={K}] and lora_b [N={N}, r], got "
                         f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if r < 1:
        raise ValueError(f"{fn}: the rank r must be >= 1 (lora_a has 0 rows)")
    if device is not None and (lora_a.device != device or lora_b.device != device):
        raise ValueError(f"{fn}: lora_a/lora_b must be on the weight's device {device}")


_FP32_MAX = torch.finfo(torch.float32).max


def check_operand_dtypes(fn: str, x: torch.Tensor, weight, lora_a, lora_b, bias, scale, x_name: str = "x") -> None:
    """The dtype checks ``lora_linear``, ``lora_linear_dx`` and ``qlora_linear`` share: x, a dense
    weight, the adapters and bias floating point; scale a number finite in fp32, or a floating-point
    tensor of shape [] or [r].  Raises TypeError / ValueError naming ``fn`` and the operand (an
    integer tensor would otherwise be cast silently, a [M, 1] scale broadcast over rows)."""
    if x.dtype not in _OPERAND_DTYPES:
        raise TypeError(f"{fn}: {x_name} must be float32, bfloat16 or float16 (float64 for checks), got {x.dtype}")
    for name, t in (("weight", None if isinstance(weight, NF4Weight) else weight), ("lora_a", lora_a),
                    ("lora_b", lora_b), ("bias", bias)):
        if isinstance(t, torch.Tensor) and t.dtype not in _OPERAND_DTYPES:
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"{fn}: a scale tensor must be floating point, got {scale.dtype}")
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: scale must be a float or a tensor, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be finite, got {scale}")
    elif abs(scale) > _FP32_MAX:
        raise ValueError(f"{fn}: scale must be finite in float32 (|scale| <= {_FP32_MAX:.4g}), got {scale}")
    if isinstance(scale, torch.Tensor) and isinstance(lora_a, torch.Tensor) and lora_a.dim() == 2 and not (
            scale.dim() == 0 or (scale.dim() == 1 and scale.shape[0] == lora_a.shape[0])):
        raise ValueError(f"{fn}: scale must be a float, a 0-d tensor or an [r={lora_a.shape[0]}] "
                         f"vector, got shape {tuple(scale.shape)}")


def lora_linear(x: torch.Tensor, weight, lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                scale: float | torch.Tensor = 1.0, bias: torch.Tensor | None = None, *,
                route: str | None = None, config: dict | None = None, whole_weight: bool = True) -> torch.Tensor:
    """y = x · Ŵᵀ + ((x · Aᵀ) ⊙ s) · Bᵀ + bias.

    x: [..., K] bf16/fp16 (fp32 takes the fallback route); weight: ``NF4Weight`` (N, K) or a dense
    [N, K] tensor; lora_a: [r, K] and lora_b: [N, r] (x's dtype), or None for no low-rank term;
    scale: float (alpha / r) or an fp32 [r] vector (AdaLoRA); bias: [N] or None.  Returns
    [..., N] in x's dtype.  ``route``: one of FORWARD_ROUTES to force; default ``forward_route``.
    ``config``: a Triton config override (triton-* routes only).  ``whole_weight=False`` (the
    training path): merge-cublas never merges more than half the weight at once.
    """
    if route is None and config is None and isinstance(x, torch.Tensor) and x.is_cuda:
        y = decode_linear(x, weight, lora_a, lora_b, scale, bias)   # decode: straight to the kernel
        if y is not None:
            return y
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
    _check_adapters("lora_linear", lora_a, lora_b, N, K, wdev)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,) or bias.device != wdev):
        raise ValueError(f"lora_linear: bias must be a [N={N}] tensor on {wdev}, got "
                         f"{getattr(bias, 'shape', type(bias).__name__)}")
    check_operand_dtypes("lora_linear", x, weight, lora_a, lora_b, bias, scale)
    y = forward_2d(x.reshape(-1, K), weight, lora_a, lora_b, scale, bias, route=route, config=config,
                   whole_weight=whole_weight)
    return y.reshape(*x.shape[:-1], N)


def forward_2d(x2d: torch.Tensor, weight, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
               scale: float | torch.Tensor, bias: torch.Tensor | None, *, route: str | None = None,
               config: dict | None = None, whole_weight: bool = True) -> torch.Tensor:
    """``lora_linear`` for a 2-D x [M, K], without its argument checks: y [M, N].  For callers
    that have made them (``lora_linear`` itself, and the eager autograd Functions after
    ``qlora_linear``'s); the route is still picked here, by ``forward_route``."""
    M = x2d.shape[0]
    forced = route is not None
    route = route or forward_route(M, weight, x2d.dtype, x2d.device)
    if route not in FORWARD_ROUTES:
        raise ValueError(f"lora_linear: unknown route {route!r}; expected one of {FORWARD_ROUTES}")
    if route == "cuda-gemv":
        # forward_route only picks it when these hold; a forced route is checked here
        if M < 1 or (forced and (not _cuda_gemv_ok(weight) or M > GEMV_MAX_M
                                 or x2d.dtype not in (torch.bfloat16, torch.float16))):
            raise ValueError("lora_linear: route 'cuda-gemv' needs the CUDA extension, an NF4 weight with "
                             f"blocksize >= 64 and K % 64 == 0, bf16/fp16 x and 1 <= M <= {GEMV_MAX_M}")
        return _cuda_gemv(x2d, weight, lora_a, lora_b, scale, bias)
    if forced and (route == "merge-cublas" or route.startswith("triton-")):
        _check_triton_route("lora_linear", route, weight, x2d.device)
    if route == "merge-cublas":
        return _merge_cublas(x2d, weight, lora_a, lora_b, scale, bias, whole_weight)
    dt = x2d.dtype
    if route.startswith("triton-"):
        from .triton.nf4_lora_matmul import lora_matmul

        if lora_a is not None:
            lora_a, lora_b = lora_a.to(dt), lora_b.to(dt)
        if bias is not None and bias.dtype not in (dt, torch.float32):
            bias = bias.to(dt)
        return lora_matmul(x2d, weight, lora_a, lora_b, scale, bias, route=route[len("triton-"):], config=config)
    dense = weight.dequantize(dt) if isinstance(weight, NF4Weight) else weight
    if route == "reference":
        return reference.lora_linear_reference(x2d, dense, lora_a, lora_b, scale, bias)
    # dequant-cublas: base GEMM, then the low-rank GEMM accumulated into y in place
    y = torch.nn.functional.linear(x2d, dense.to(dt), None if bias is None else bias.to(dt))
    if lora_a is not None:
        t = x2d @ lora_a.to(dt).t()
        t = t.mul_(scale.to(t.dtype) if isinstance(scale, torch.Tensor) else scale)
        y.addmm_(t, lora_b.to(dt).t())
    return y
