"""Triton kernels for NF4 (de)quantization with double quantization, bit-exact with
:mod:`lora_kernels.reference` (the readable definition of the format).

Three launchers, one kernel launch each:

* :func:`quantize_blocks`        w [n] -> packed uint8 [(n + 1) // 2], absmax fp32 [ceil(n / bs)]
* :func:`quantize_absmax_nested` absmax fp32 [nb] -> q uint8 [nb], nested_absmax fp32 [ceil(nb / 256)]
* :func:`dequantize`             packed (+ absmax, nested) -> [n] of dtype

Every program works on a 2-D tile of ``ROWS`` whole quantization blocks (``ROWS * blocksize``
elements, a fixed size chosen by blocksize -- no autotuning), so the per-block absmax is a row
reduction / a row broadcast and no element needs an integer division.

Exactness notes (each one matters for torch.equal against the reference):
* The block scale ``1 / absmax`` (``_block_reciprocal``): on the GPU the hardware's approximate
  reciprocal ``rcp.approx.ftz.f32`` for normal absmax -- the instruction bitsandbytes' CUDA
  kernels use (its library is built with fast math), so our bytes equal its bytes there; it
  differs from the reference's IEEE ``1 / x`` by at most an ulp (an index moves by one level
  only where the scaled value sits on a threshold).  Under the interpreter, and for zero or
  subnormal absmax, ``tl.math.div_rn`` (IEEE, like torch and the reference).
* Every launch passes ``enable_fp_fusion=False``: the nested absmax decode
  ``fl(fl(code[q] * nested_absmax) + offset)`` must not become an FMA.
* Thresholds are the fp32 midpoints of the NF4 levels (``codes.nf4_thresholds``) under the
  interpreter and bitsandbytes' CUDA values (``codes.NF4_THRESHOLDS_CUDA``) on the GPU; the
  dynamic-code midpoints ``(code[i] + code[i + 1]) * 0.5`` are formed in fp32, as the reference
  forms them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..codes import NESTED_BLOCKSIZE, VALID_BLOCKSIZES, nf4_thresholds, nf4_thresholds_cuda
from .launch import device_guard

try:  # programmatic dependent launch (sm_90): grid dependency control, triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAVE_GDC = True
except ImportError:  # pragma: no cover - older triton
    _HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

__all__ = ["quantize_blocks", "quantize_absmax_nested", "dequantize"]

# ---------------------------------------------------------------------------------------------
# Fixed launch configurations (elements per program, warps).  A program handles
# ELEMS // blocksize whole blocks (at least one block), i.e. a [ROWS, blocksize] tile.
#   quantize:   8192 elements -> bf16: 16 KiB read + 4 KiB packed + absmax written per program
#   dequantize: 8192 elements -> 4 KiB packed read, 16 KiB (bf16/fp16) / 32 KiB (fp32) written
#   nested:     16 nested blocks = 4096 absmax -> 16 KiB read, 4 KiB written
# Quantize: 8 warps x 32 lanes = 256 threads, so each thread owns 32 elements: one or two 16-byte
# vector loads/stores per operand, enough bytes in flight per SM without spilling registers.
# Dequantize: 4 warps (64 elements per thread): measured on an H100 (benchmarks/nf4_probe.py),
# 0.767 vs 0.747 of copy bandwidth at 4096x4096 for 8 warps, equal (0.95) at 8192x28672.
# ---------------------------------------------------------------------------------------------
_QUANT_ELEMS = 8192
_QUANT_WARPS = 8
_DEQUANT_ELEMS = 8192
_DEQUANT_WARPS = 4
_NESTED_ROWS = 16
_NESTED_WARPS = 4

_MIN_ABSMAX: tl.constexpr = tl.constexpr(1e-38)
_FLT_MIN: tl.constexpr = tl.constexpr(1.1754943508222875e-38)  # smallest normal fp32


@triton.jit
def _block_reciprocal(a, APPROX_RCP: tl.constexpr):
    """1 / a for block scales (fp32 [ROWS]); see the module docstring for the two modes."""
    # triton 3.6 types a subnormal Python float as fp64: build the clamp as an fp32 tensor
    ieee = tl.math.div_rn(tl.full(a.shape, 1.0, tl.float32),
                          tl.maximum(a, tl.full(a.shape, _MIN_ABSMAX, tl.float32)))
    if APPROX_RCP:
        approx = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [a], dtype=tl.float32,
                                           is_pure=True, pack=1)
        return tl.where(a >= _FLT_MIN, approx, ieee)
    return ieee

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_THRESHOLDS: dict[torch.device, torch.Tensor] = {}


def _thresholds(device: torch.device) -> torch.Tensor:
    """The 15 fp32 NF4 decision thresholds on ``device`` (cached; padded to 16)."""
    t = _THRESHOLDS.get(device)
    if t is None:
        t = torch.zeros(16, dtype=torch.float32, device=device)
        # GPU: bitsandbytes' CUDA thresholds (codes.NF4_THRESHOLDS_CUDA); interpreter: the midpoints
        t[:15] = nf4_thresholds_cuda(device) if device.type == "cuda" else nf4_thresholds(device)
        _THRESHOLDS[device] = t
    return t


def _rows(elems: int, blocksize: int) -> int:
    return max(1, elems // blocksize)


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")


# ---------------------------------------------------------------------------------------------
# 1. Blockwise NF4 quantization
# ---------------------------------------------------------------------------------------------
@triton.jit
def _nf4_quantize_kernel(
    w_ptr, packed_ptr, absmax_ptr, thr_ptr, n, nbytes, nblocks,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, VEC: tl.constexpr, APPROX_RCP: tl.constexpr,
):
    # Bytes moved per program: ROWS*BLOCKSIZE*w.itemsize read, ROWS*BLOCKSIZE/2 + 4*ROWS written
    # (bf16, 8192 elements: 16 KiB in, 4 KiB + absmax out).
    TILE: tl.constexpr = ROWS * BLOCKSIZE
    HALF: tl.constexpr = BLOCKSIZE // 2
    pid = tl.program_id(0)
    ebase = pid.to(tl.int64) * TILE                      # int64: n may approach 2**31
    bbase = pid.to(tl.int64) * (TILE // 2)
    erem = tl.minimum(n - ebase, TILE).to(tl.int32)      # valid elements in this tile (> 0)
    brem = tl.minimum(nbytes - bbase, TILE // 2).to(tl.int32)
    rows = tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(w_ptr + ebase + offs, mask=offs < erem, other=0.0).to(tl.float32)

    amax = tl.max(tl.abs(x), axis=1)                     # [ROWS]; padding is 0, never wins
    blk = pid * ROWS + rows
    tl.store(absmax_ptr + blk, amax, mask=blk < nblocks)
    inv = _block_reciprocal(amax, APPROX_RCP)
    s = x * inv[:, None]

    # idx = #{t in thresholds : s > t} by a 4-level select tree (ties go to the lower index).
    t0 = tl.load(thr_ptr + 0)
    t1 = tl.load(thr_ptr + 1)
    t2 = tl.load(thr_ptr + 2)
    t3 = tl.load(thr_ptr + 3)
    t4 = tl.load(thr_ptr + 4)
    t5 = tl.load(thr_ptr + 5)
    t6 = tl.load(thr_ptr + 6)
    t7 = tl.load(thr_ptr + 7)
    t8 = tl.load(thr_ptr + 8)
    t9 = tl.load(thr_ptr + 9)
    t10 = tl.load(thr_ptr + 10)
    t11 = tl.load(thr_ptr + 11)
    t12 = tl.load(thr_ptr + 12)
    t13 = tl.load(thr_ptr + 13)
    t14 = tl.load(thr_ptr + 14)
    b3 = s > t7
    b2 = s > tl.where(b3, t11, t3)
    b1 = s > tl.where(b3, tl.where(b2, t13, t9), tl.where(b2, t5, t1))
    t_last = tl.where(
        b3,
        tl.where(b2, tl.where(b1, t14, t12), tl.where(b1, t10, t8)),
        tl.where(b2, tl.where(b1, t6, t4), tl.where(b1, t2, t0)),
    )
    b0 = s > t_last
    idx = (b3.to(tl.int32) << 3) | (b2.to(tl.int32) << 2) | (b1.to(tl.int32) << 1) | b0.to(tl.int32)

    # Pack: element 2j -> high nibble, 2j+1 -> low nibble.  A missing last element of odd n was
    # loaded as 0.0 and quantizes to 7, the reference's filler nibble.
    hi, lo = tl.split(tl.reshape(idx, [ROWS, HALF, 2]))
    byte = ((hi << 4) | lo).to(tl.uint8)
    # VEC bytes per thread: the layout the 16-byte loads leave the nibbles in, so the store
    # needs no shared-memory layout conversion (a warp still writes 128 contiguous bytes).
    bcols = tl.max_contiguous(tl.multiple_of(tl.arange(0, HALF), VEC), VEC)
    boffs = rows[:, None] * HALF + bcols[None, :]
    tl.store(packed_ptr + bbase + boffs, byte, mask=boffs < brem)


def quantize_blocks(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize a flat weight in one launch.

    w: [n] contiguous fp32/bf16/fp16, n >= 1.  blocksize: 32..4096, a power of two.
    Returns (packed uint8 [(n + 1) // 2], absmax fp32 [ceil(n / blocksize)]) with
    absmax[b] = max |w| over block b and idx = #{NF4 thresholds < w * fl(1 / max(absmax, 1e-38))}.
    """
    _check_blocksize(blocksize)
    if w.dim() != 1 or not w.is_contiguous():
        raise ValueError(f"w must be a 1-D contiguous tensor, got shape {tuple(w.shape)}")
    if w.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"w must be fp32/bf16/fp16, got {w.dtype}")
    n = w.numel()
    if n < 1:
        raise ValueError("w must have at least one element")
    nblocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=w.device)
    rows = _rows(_QUANT_ELEMS, blocksize)
    grid = (triton.cdiv(nblocks, rows),)
    with device_guard(w):
        _nf4_quantize_kernel[grid](
            w, packed, absmax, _thresholds(w.device), n, (n + 1) // 2, nblocks,
            BLOCKSIZE=blocksize, ROWS=rows, VEC=8 // w.element_size(), APPROX_RCP=w.is_cuda,
            num_warps=_QUANT_WARPS, enable_fp_fusion=False,
        )
    return packed, absmax


# ---------------------------------------------------------------------------------------------
# 2. Nested (8-bit dynamic code) quantization of absmax - offset
# ---------------------------------------------------------------------------------------------
@triton.jit
def _absmax_nested_quantize_kernel(
    absmax_ptr, offset_ptr, code_ptr, q_ptr, nested_ptr, nb, nnested,
    ROWS: tl.constexpr, NBS: tl.constexpr, APPROX_RCP: tl.constexpr,
):
    # Bytes moved per program: ROWS*NBS*4 read, ROWS*NBS + ROWS*4 written (16 KiB / 4 KiB),
    # plus 18 L1-resident gathers per value from the 1 KiB code table.
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)               # nested block ids (int32: nb < 2**31)
    offs = rows[:, None] * NBS + tl.arange(0, NBS)[None, :]
    m = offs < nb
    a = tl.load(absmax_ptr + offs, mask=m, other=0.0)
    off = tl.load(offset_ptr)
    d = tl.where(m, a - off, 0.0)
    nabs = tl.max(tl.abs(d), axis=1)
    tl.store(nested_ptr + rows, nabs, mask=rows < nnested)
    inv = _block_reciprocal(nabs, APPROX_RCP)
    s = d * inv[:, None]

    # q = #{i in 0..254 : bound[i] < s}, bound[i] = (code[i] + code[i+1]) * 0.5; 8-step search.
    q = tl.zeros([ROWS, NBS], dtype=tl.int32)
    for k in tl.static_range(8):                         # step = 128 >> k
        j = q + ((128 >> k) - 1)                         # <= 254 always
        bound = (tl.load(code_ptr + j) + tl.load(code_ptr + j + 1)) * 0.5
        q = tl.where(bound < s, q + (128 >> k), q)
    # Exact tie with bound[q] goes to the even neighbour (bitsandbytes' CUDA search).
    qc = tl.minimum(q, 254)
    bq = (tl.load(code_ptr + qc) + tl.load(code_ptr + qc + 1)) * 0.5
    tie = (q < 255) & (s == bq) & ((q & 1) == 1)
    q = q + tie.to(tl.int32)
    q = tl.where(nabs[:, None] == 0.0, 0, q)
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=m)


def quantize_absmax_nested(
    absmax: torch.Tensor, offset: torch.Tensor, code: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``absmax - offset`` to 8 bits in nested blocks of 256 (one launch).

    absmax: fp32 [nb] contiguous; offset: fp32 0-d (read inside the kernel, no host sync);
    code: fp32 [256] sorted.  Returns (q uint8 [nb], nested_absmax fp32 [ceil(nb / 256)]):
    nested_absmax[j] = max |d| over block j, q = nearest code entry of
    d * fl(1 / max(nested_absmax, 1e-38)) (exact ties to the even index), 0 where nested_absmax == 0.
    """
    if absmax.dim() != 1 or absmax.dtype != torch.float32 or not absmax.is_contiguous():
        raise ValueError(f"absmax must be 1-D contiguous fp32, got {absmax.dtype} {tuple(absmax.shape)}")
    if absmax.numel() < 1:
        raise ValueError("absmax must have at least one element")
    if offset.dim() != 0 or offset.dtype != torch.float32:
        raise ValueError(f"offset must be a 0-d fp32 tensor, got {offset.dtype} {tuple(offset.shape)}")
    if code.shape != (256,) or code.dtype != torch.float32 or not code.is_contiguous():
        raise ValueError(f"code must be contiguous fp32 [256], got {code.dtype} {tuple(code.shape)}")
    if offset.device != absmax.device or code.device != absmax.device:
        raise ValueError("absmax, offset and code must be on the same device")
    nb = absmax.numel()
    nnested = triton.cdiv(nb, NESTED_BLOCKSIZE)
    q = torch.empty(nb, dtype=torch.uint8, device=absmax.device)
    nested = torch.empty(nnested, dtype=torch.float32, device=absmax.device)
    grid = (triton.cdiv(nnested, _NESTED_ROWS),)
    with device_guard(absmax):
        _absmax_nested_quantize_kernel[grid](
            absmax, offset, code, q, nested, nb, nnested,
            ROWS=_NESTED_ROWS, NBS=NESTED_BLOCKSIZE, APPROX_RCP=absmax.is_cuda, num_warps=_NESTED_WARPS,
            enable_fp_fusion=False,
        )
    return q, nested


# ---------------------------------------------------------------------------------------------
# 3. Dequantization (nested absmax decoded in the same launch)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, offset_ptr, code_ptr, out_ptr, n, nbytes, nblocks,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, NESTED: tl.constexpr, NBS: tl.constexpr,
    VEC: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # launched as a programmatic dependent: the inputs may be the previous kernel's
        gdc_wait()
        gdc_launch_dependents()
    # Bytes moved per program: ROWS*BLOCKSIZE/2 packed + ROWS absmax (1 or 4 B) read,
    # ROWS*BLOCKSIZE*out.itemsize written (8192 elements: 4 KiB in, 16 KiB bf16 out).
    HALF: tl.constexpr = BLOCKSIZE // 2
    TILE: tl.constexpr = ROWS * BLOCKSIZE
    pid = tl.program_id(0)
    bbase = pid.to(tl.int64) * (TILE // 2)
    ebase = pid.to(tl.int64) * TILE
    erem = tl.minimum(n - ebase, TILE).to(tl.int32)          # valid elements here (> 0)
    brem = tl.minimum(nbytes - bbase, TILE // 2).to(tl.int32)  # valid packed bytes here
    rows = tl.arange(0, ROWS)
    # VEC contiguous bytes per thread (2*VEC outputs = 16 B): the joined values then already sit
    # in the store's coalesced layout, so no shared-memory layout conversion is needed.
    bcols = tl.max_contiguous(tl.multiple_of(tl.arange(0, HALF), VEC), VEC)
    boffs = rows[:, None] * HALF + bcols[None, :]
    byte = tl.load(packed_ptr + bbase + boffs, mask=boffs < brem, other=0)

    blk = pid * ROWS + rows
    bmask = blk < nblocks
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=bmask, other=0).to(tl.int32)
        prod = tl.load(ncode_ptr + q) * tl.load(nested_ptr + blk // NBS, mask=bmask, other=0.0)
        amax = prod + tl.load(offset_ptr)                # two roundings: launched without fusion
    else:
        amax = tl.load(absmax_ptr + blk, mask=bmask, other=0.0)

    b = byte.to(tl.int32)
    v_hi = (tl.load(code_ptr + (b >> 4)) * amax[:, None]).to(out_ptr.dtype.element_ty)
    v_lo = (tl.load(code_ptr + (b & 15)) * amax[:, None]).to(out_ptr.dtype.element_ty)
    v = tl.reshape(tl.join(v_hi, v_lo), [ROWS, BLOCKSIZE])   # element 2j = high nibble
    eoffs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + ebase + eoffs, v, mask=eoffs < erem)


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    code: torch.Tensor,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    *,
    _fp_fusion: bool = False,
) -> torch.Tensor:
    """Dequantize NF4 to a flat [n] tensor of ``dtype`` in one launch.

    packed: uint8 [>= (n + 1) // 2]; code: fp32 [16].  Without double quantization absmax is
    fp32 [>= nb] and nested_absmax/nested_code/offset are None; with it absmax is uint8 [>= nb],
    nested_absmax fp32 [>= ceil(nb / 256)], nested_code fp32 [256], offset fp32 0-d, and
    absmax_eff[b] = fl(fl(nested_code[absmax[b]] * nested_absmax[b // 256]) + offset).
    out[i] = dtype(fl(code[idx_i] * absmax_eff[i // blocksize])), idx_2j = high nibble of byte j.
    ``out`` (contiguous [n] of ``dtype``) is filled and returned when given.
    ``_fp_fusion`` exists only for the test that shows an FMA would break exactness.
    """
    _check_blocksize(blocksize)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"dtype must be fp32/bf16/fp16, got {dtype}")
    nblocks = triton.cdiv(n, blocksize)
    if packed.dtype != torch.uint8 or not packed.is_contiguous() or packed.numel() < (n + 1) // 2:
        raise ValueError(f"packed must be contiguous uint8 with >= {(n + 1) // 2} elements")
    if code.dtype != torch.float32 or code.numel() != 16 or not code.is_contiguous():
        raise ValueError("code must be contiguous fp32 [16]")
    if not absmax.is_contiguous() or absmax.numel() < nblocks:
        raise ValueError(f"absmax must be contiguous with >= {nblocks} elements")
    nested = nested_absmax is not None
    if nested:
        if nested_code is None or offset is None:
            raise ValueError("nested_absmax needs nested_code and offset")
        if absmax.dtype != torch.uint8:
            raise ValueError(f"absmax must be uint8 with double quantization, got {absmax.dtype}")
        if (nested_absmax.dtype != torch.float32 or not nested_absmax.is_contiguous()
                or nested_absmax.numel() < triton.cdiv(nblocks, NESTED_BLOCKSIZE)):
            raise ValueError("nested_absmax must be contiguous fp32 [ceil(nblocks / 256)]")
        if nested_code.dtype != torch.float32 or nested_code.numel() != 256 or not nested_code.is_contiguous():
            raise ValueError("nested_code must be contiguous fp32 [256]")
        if offset.numel() != 1 or offset.dtype != torch.float32:
            raise ValueError("offset must be a 0-d fp32 tensor")
    elif absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be fp32 without double quantization, got {absmax.dtype}")
    if out is None:
        out = torch.empty(n, dtype=dtype, device=packed.device)
    elif out.dtype != dtype or out.numel() != n or not out.is_contiguous() or out.device != packed.device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of {n} elements on {packed.device}")
    rows = _rows(_DEQUANT_ELEMS, blocksize)
    grid = (triton.cdiv(nblocks, rows),)
    with device_guard(packed):
        _nf4_dequantize_kernel[grid](
            packed, absmax,
            nested_absmax if nested else absmax,
            nested_code if nested else code,
            offset if nested else code,
            code, out, n, (n + 1) // 2, nblocks,
            BLOCKSIZE=blocksize, ROWS=rows, NESTED=nested, NBS=NESTED_BLOCKSIZE,
            VEC=8 // out.element_size(),
            num_warps=_DEQUANT_WARPS, enable_fp_fusion=_fp_fusion, **_pdl_kwargs(packed),
        )
    return out


def _pdl_kwargs(t: torch.Tensor) -> dict:
    """Launch options for a programmatic dependent launch (the kernel's launch and CTA placement
    overlap the previous kernel's tail; it waits for that kernel before reading), when
    $LORA_KERNELS_DEQUANT_PDL=1 (an A/B switch until the GPU measures it) on sm_90+ with a triton
    that has grid dependency control; else none."""
    if (not _HAVE_GDC or os.environ.get("LORA_KERNELS_DEQUANT_PDL") != "1" or t.device.type != "cuda"
            or os.environ.get("TRITON_INTERPRET") == "1"
            or torch.cuda.get_device_capability(t.device)[0] < 9):
        return {}
    return {"PDL": True, "launch_pdl": True}
