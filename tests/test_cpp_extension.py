"""lora_kernels._C (C++ CPU kernels, csrc/) against the plain-PyTorch reference.

* bit-exact parity (torch.equal) of quantize_blocks / quantize_absmax_nested / dequantize with
  lora_kernels.reference over fresh random inputs (the seed is printed on failure);
* every argument check raises an error whose message names the argument;
* every csrc/cuda/*.cu compiles with the machine's nvcc (skipped without nvcc).
* csrc/bindings_cuda.cpp parses against torch's and the CUDA toolkit's headers (skipped without them).
The CPU quantizer uses the same NF4 index function as the CUDA kernel (csrc/nf4_common.h), so
the parity and boundary tests here also cover that part of the CUDA path.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

from lora_kernels import reference as ref
from lora_kernels.codes import VALID_BLOCKSIZES, dynamic_code, nf4_code, nf4_thresholds

try:
    import lora_kernels._C as C

    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the build
    C = None
    _IMPORT_ERROR = exc

needs_c = pytest.mark.skipif(
    C is None,
    reason=f"lora_kernels._C cannot be imported ({_IMPORT_ERROR}); build it with "
    "`pip install --no-build-isolation -e .`",
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEED = int.from_bytes(os.urandom(4), "little")


def _gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, except that NaN matches NaN (in the same places)."""
    if torch.equal(a, b):
        return True
    if a.dtype != b.dtype or a.shape != b.shape or not a.is_floating_point():
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])


def _check_all(w: torch.Tensor, blocksize: int, what: str = "") -> None:
    """quantize -> nested -> dequantize (plain and nested, 3 dtypes, also into out=)."""
    tag = f"seed={SEED} dtype={w.dtype} blocksize={blocksize} n={w.numel()} {what}"
    packed, absmax = C.quantize_blocks(w, blocksize)
    packed_r, absmax_r = ref.quantize_blocks_reference(w, blocksize)
    assert torch.equal(absmax, absmax_r), f"absmax differs: {tag}"
    assert torch.equal(packed, packed_r), f"packed differs: {tag}"

    offset = absmax_r.mean()
    code8 = dynamic_code()
    q, nested = C.quantize_absmax_nested(absmax, offset, code8)
    q_r, nested_r = ref.quantize_absmax_nested_reference(absmax_r, offset, code8)
    assert _same(nested, nested_r), f"nested_absmax differs: {tag}"
    assert torch.equal(q, q_r), f"q differs: {tag}"

    n = w.numel()
    code = nf4_code()
    for dtype in DTYPES:
        out = C.dequantize(packed, absmax, None, None, None, code, n, blocksize, dtype)
        exp = ref.dequantize_reference(packed_r, absmax_r, None, None, None, code, n, blocksize, dtype)
        assert _same(out, exp), f"dequantize differs: {tag} out={dtype}"
        out = C.dequantize(packed, q, nested, code8, offset, code, n, blocksize, dtype)
        exp = ref.dequantize_reference(packed_r, q_r, nested_r, code8, offset, code, n, blocksize, dtype)
        assert _same(out, exp), f"nested dequantize differs: {tag} out={dtype}"


# ------------------------------------------------------------------------------------ parity


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
def test_parity_random(dtype, blocksize):
    g = _gen(VALID_BLOCKSIZES.index(blocksize) * 7 + DTYPES.index(dtype))
    sizes = [1, 2, 3, 5, blocksize - 1, blocksize, blocksize + 1, 3 * blocksize + 17]
    sizes += [int(torch.randint(1, 40_000, (1,), generator=g)) for _ in range(2)]
    for n in sizes:
        if n < 1:
            continue
        w = (torch.randn(n, generator=g) * float(torch.rand((), generator=g) * 4 + 0.01)).to(dtype)
        _check_all(w, blocksize)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_shapes_and_special_blocks(dtype):
    g = _gen(100 + DTYPES.index(dtype))
    for (rows, cols) in [(7, 33), (129, 65), (3, 4097), (64, 1000)]:
        w = torch.randn(rows, cols, generator=g).to(dtype)
        w[1] = 0  # all-zero blocks (absmax 0 -> divisor 1e-38)
        w[2, : cols // 2] = -0.0
        flat = w.reshape(-1).contiguous()
        for bs in (32, 64, 256, 4096):
            _check_all(flat, bs, f"shape=({rows},{cols})")
    # every element equal (and equal magnitudes): all absmax equal -> d == 0 -> nested_absmax 0
    for n in (1, 2, 3, 64 * 300 + 5):
        for val in (0.0, 1.5, -2.0):
            _check_all(torch.full((n,), val, dtype=dtype), 64, f"constant {val}")
    signs = torch.where(torch.rand(64 * 600, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    _check_all(signs, 64, "+-1 weights")


@needs_c
@pytest.mark.parametrize("scale", [1e-30, 1e-38, 1e-42, 1e30, 1e36])
def test_parity_extreme_magnitudes_fp32(scale):
    g = _gen(200)
    w = torch.randn(5000, generator=g) * scale
    w[100:200] = float(torch.finfo(torch.float32).tiny) / 8  # subnormal block
    for bs in (32, 64, 1024):
        _check_all(w, bs, f"scale={scale}")


@needs_c
def test_parity_extreme_magnitudes_half_bf16():
    g = _gen(300)
    for dtype, big, tiny in [(torch.float16, 6e4, 6e-8), (torch.bfloat16, 3e38, 1e-39)]:
        w = torch.randn(3000, generator=g)
        w[:1000] = (w[:1000] * big).clamp(-big, big)  # large but finite in dtype
        w[1000:2000] *= tiny  # subnormal in dtype
        _check_all(w.to(dtype), 64, f"extremes {dtype}")
    # fp32 weights whose dequantized values overflow fp16 (-> inf in both)
    _check_all(torch.randn(999, generator=g) * 1e6, 64, "fp16 overflow")


@needs_c
def test_nf4_index_at_every_boundary():
    """All fp32 values within +-2048 ulps of every NF4 threshold and every lookup-table cell edge
    (k + 0.5) / 16, quantized with inv == 1 (each 4096-block holds a 1.0): idx == bucketize."""
    thr = nf4_thresholds()
    edges = (torch.arange(-17, 17, dtype=torch.float32) + 0.5) / 16
    centers = torch.cat([thr, edges, torch.tensor([0.0, -1.0, 1.0])]).view(torch.int32).long()
    offs = torch.arange(-2048, 2049)
    bits = (centers[:, None] + offs[None, :]).reshape(-1)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[x.abs() <= 1.0]
    x = torch.cat([x, -x, torch.tensor([0.0, -0.0, 1e-45, -1e-45])])
    m = x.numel()
    nb = -(-m // 4095)
    buf = torch.zeros(nb, 4096)
    buf[:, 0] = 1.0
    flat = torch.zeros(nb * 4095)
    flat[:m] = x
    buf[:, 1:] = flat.view(nb, 4095)
    packed, absmax = C.quantize_blocks(buf.reshape(-1), 4096)
    assert torch.equal(absmax, torch.ones(nb))
    idx = torch.stack([packed >> 4, packed & 15], 1).reshape(nb, 4096)[:, 1:].reshape(-1)[:m]
    assert torch.equal(idx.long(), torch.bucketize(x, thr, right=False))


@needs_c
def test_nested_ties_and_bounds():
    """Values exactly on the midpoints of the dynamic code (ties -> even index), around them,
    a zero-spread block, and a partial last block."""
    code8 = dynamic_code()
    bounds = (code8[:-1] + code8[1:]) * 0.5
    near = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)),
                      torch.nextafter(bounds, torch.tensor(-2.0)), code8])
    vals = torch.cat([torch.ones(1), near])  # max |d| == 1 -> inv == 1, scaled == d exactly
    n_blocks = -(-vals.numel() // 255)
    blocks = []
    for j in range(n_blocks):
        chunk = vals[j * 255:(j + 1) * 255]
        chunk = torch.cat([chunk, torch.zeros(255 - chunk.numel())])  # whole blocks of 256
        blocks.append(torch.cat([torch.ones(1), chunk]))
    absmax = torch.cat(blocks + [torch.full((256,), 3.0), torch.tensor([0.5, 0.25, 1.0])])
    zero = torch.zeros(())
    q, nested = C.quantize_absmax_nested(absmax, zero, code8)
    q_r, nested_r = ref.quantize_absmax_nested_reference(absmax, zero, code8)
    assert torch.equal(nested, nested_r) and torch.equal(q, q_r)
    # same values with an offset that makes one block all-equal (nested_absmax == 0 -> q == 0)
    off = torch.tensor(3.0)
    q, nested = C.quantize_absmax_nested(absmax, off, code8)
    q_r, nested_r = ref.quantize_absmax_nested_reference(absmax, off, code8)
    assert torch.equal(nested, nested_r) and torch.equal(q, q_r)
    assert (nested == 0).any()
    g = _gen(400)
    for nb in (1, 2, 255, 256, 257, 5000):
        a = torch.rand(nb, generator=g) * 3
        off = a.mean()
        q, nested = C.quantize_absmax_nested(a, off, code8)
        q_r, nested_r = ref.quantize_absmax_nested_reference(a, off, code8)
        assert torch.equal(nested, nested_r) and torch.equal(q, q_r), f"seed={SEED} nb={nb}"


@needs_c
def test_dequantize_out_and_offsets():
    g = _gen(500)
    w = torch.randn(3 * 64 + 7, generator=g)
    n = w.numel()
    st = ref.quantize_reference(w, 64, double_quant=True)
    args = (st["packed"], st["absmax"], st["nested_absmax"], st["nested_code"], st["offset"], st["code"])
    for dtype in DTYPES:
        exp = ref.dequantize_reference(*args, n, 64, dtype)
        out = torch.empty(n, dtype=dtype)
        res = C.dequantize(*args, n, 64, dtype, out)
        assert res.data_ptr() == out.data_ptr() and torch.equal(out, exp)
        storage = torch.zeros(n + 1, dtype=dtype)  # misaligned out (storage offset 1)
        C.dequantize(*args, n, 64, dtype, out=storage[1:])
        assert torch.equal(storage[1:], exp) and storage[0] == 0
        # offset given as a 1-element 1-D tensor is accepted too
        res = C.dequantize(*args[:4], st["offset"].reshape(1), st["code"], n, 64, dtype)
        assert torch.equal(res, exp)
    # inputs that start at an odd storage offset
    buf = torch.randn(n + 1, generator=g).to(torch.bfloat16)
    p, a = C.quantize_blocks(buf[1:], 64)
    p_r, a_r = ref.quantize_blocks_reference(buf[1:], 64)
    assert torch.equal(p, p_r) and torch.equal(a, a_r)


# ------------------------------------------------------------------------------------ checks


def _raises(fn, *names):
    with pytest.raises((RuntimeError, ValueError)) as info:
        fn()
    msg = str(info.value)
    for name in names:
        assert name in msg, f"message does not name {name!r}: {msg}"


@needs_c
def test_quantize_blocks_checks():
    w = torch.randn(256)
    _raises(lambda: C.quantize_blocks(w.double(), 64), "w", "float32")
    _raises(lambda: C.quantize_blocks(w.to(torch.int32), 64), "w")
    _raises(lambda: C.quantize_blocks(w.view(16, 16), 64), "w", "1-D")
    _raises(lambda: C.quantize_blocks(w[::2], 64), "w", "contiguous")
    _raises(lambda: C.quantize_blocks(w[:0], 64), "w")
    for bs in (0, 16, 48, 100, 8192, -64):
        _raises(lambda: C.quantize_blocks(w, bs), "blocksize")
    _raises(lambda: C.quantize_blocks(w.to("meta"), 64), "w", "CPU")


@needs_c
def test_quantize_absmax_nested_checks():
    a, off, code8 = torch.rand(300), torch.tensor(0.5), dynamic_code()
    _raises(lambda: C.quantize_absmax_nested(a.double(), off, code8), "absmax", "Float")
    _raises(lambda: C.quantize_absmax_nested(a.view(3, 100), off, code8), "absmax", "1-D")
    _raises(lambda: C.quantize_absmax_nested(a[::2], off, code8), "absmax", "contiguous")
    _raises(lambda: C.quantize_absmax_nested(a[:0], off, code8), "absmax")
    _raises(lambda: C.quantize_absmax_nested(a, off.double(), code8), "offset")
    _raises(lambda: C.quantize_absmax_nested(a, torch.zeros(2), code8), "offset", "0-d")
    _raises(lambda: C.quantize_absmax_nested(a, off, code8[:255]), "code", "256")
    _raises(lambda: C.quantize_absmax_nested(a, off, code8.half()), "code")
    _raises(lambda: C.quantize_absmax_nested(a, off, code8.view(16, 16)), "code", "1-D")


@needs_c
def test_dequantize_checks():
    n, bs = 1000, 64
    st = ref.quantize_reference(torch.randn(n), bs, double_quant=True)
    p, q, na, c8, off, code = (st[k] for k in ("packed", "absmax", "nested_absmax", "nested_code", "offset", "code"))
    _, a32 = ref.quantize_blocks_reference(torch.randn(n), bs)
    bf = torch.bfloat16

    def deq(**kw):
        args = dict(packed=p, absmax=q, nested_absmax=na, nested_code=c8, offset=off, code=code,
                    n=n, blocksize=bs, dtype=bf, out=None)
        args.update(kw)
        return C.dequantize(**args)

    deq()  # sanity: the defaults are valid
    deq(absmax=a32, nested_absmax=None, nested_code=None, offset=None)
    _raises(lambda: deq(packed=p.to(torch.int8)), "packed", "Byte")
    _raises(lambda: deq(packed=p[:-1]), "packed", str((n + 1) // 2))
    _raises(lambda: deq(packed=p.view(-1, 4)), "packed", "1-D")
    _raises(lambda: deq(packed=torch.zeros(2 * p.numel(), dtype=torch.uint8)[::2]), "packed", "contiguous")
    _raises(lambda: deq(absmax=q[:-1]), "absmax", "ceil(n / blocksize)")
    _raises(lambda: deq(absmax=a32), "absmax", "Byte")  # fp32 absmax with double quant
    _raises(lambda: deq(absmax=q, nested_absmax=None, nested_code=None, offset=None), "absmax", "Float")
    _raises(lambda: deq(absmax=a32[:-1], nested_absmax=None, nested_code=None, offset=None), "absmax")
    _raises(lambda: deq(nested_code=None), "nested_code")
    _raises(lambda: deq(offset=None), "offset")
    _raises(lambda: deq(nested_absmax=None), "nested_absmax")
    _raises(lambda: deq(nested_absmax=torch.zeros(2)), "nested_absmax", "256")
    _raises(lambda: deq(nested_absmax=na.double()), "nested_absmax", "Float")
    _raises(lambda: deq(nested_code=c8[:-1]), "nested_code", "256")
    _raises(lambda: deq(offset=torch.zeros(3)), "offset", "0-d")
    _raises(lambda: deq(offset=off.double()), "offset", "Float")
    _raises(lambda: deq(code=code[:15]), "code", "16")
    _raises(lambda: deq(code=code.double()), "code", "Float")
    _raises(lambda: deq(code=code.view(4, 4)), "code", "1-D")
    _raises(lambda: deq(blocksize=48), "blocksize")
    _raises(lambda: deq(n=0), "n")
    _raises(lambda: deq(n=n + 2), "packed")
    _raises(lambda: deq(dtype=torch.float64), "dtype")
    _raises(lambda: deq(out=torch.empty(n, dtype=torch.float16)), "out", "BFloat16")
    _raises(lambda: deq(out=torch.empty(n - 1, dtype=bf)), "out", str(n))
    _raises(lambda: deq(out=torch.empty(n, 2, dtype=bf)[:, 0]), "out")
    _raises(lambda: deq(out=torch.empty(2, n // 2, dtype=bf)), "out", "1-D")
    _raises(lambda: deq(packed=p.to("meta")), "packed", "CPU")


# ------------------------------------------------------------- CUDA index-math emulation
# The CUDA kernels cannot run here; these numpy functions replay their thread -> element
# mapping (tiles, 16-byte units, lanes, the three block-max reduction shapes, the vector and
# the bounds-checked paths, packing and the nibble shifts) and check that every output is
# written exactly once with the reference's value.  Keep in sync with csrc/cuda/nf4_cuda.cu.

def _emu_cuda_quantize(w, bs, vec_ok=True):
    size = w.element_size(); n = w.numel()
    x_all = w.float().numpy()
    E = 16 // size; K = 16 // E; kRow = 32 * E; WT = K * kRow; TILE = 8 * WT; U = bs // E
    assert TILE == 4096
    ntiles = -(-n // TILE)
    packed = np.full((n + 1) // 2, -1, np.int32); absmax = np.full(-(-n // bs), np.nan, np.float32)
    writes = np.zeros((n + 1) // 2, np.int32); awrites = np.zeros(absmax.shape, np.int32)
    thr = nf4_thresholds().numpy()
    for tile in range(ntiles):
        fast = vec_ok and (tile + 1) * TILE <= n
        wv, kv, lv, ev = np.meshgrid(np.arange(8), np.arange(K), np.arange(32), np.arange(E), indexing="ij")
        s = tile * TILE + wv * WT + kv * kRow + lv * E   # [8,K,32,E] unit starts
        i = s + ev
        if fast: assert (i < n).all()
        x = np.where(i < n, x_all[np.minimum(i, n - 1)], 0.0).astype(np.float32)
        m = np.abs(x).max(-1)   # [8,K,32]
        if U <= 32:
            g = m.reshape(8, K, 32 // U, U).max(-1, keepdims=True)
            m = np.broadcast_to(g, (8, K, 32 // U, U)).reshape(8, K, 32)
        elif U <= 32 * K:
            R = U // 32
            g = m.reshape(8, K // R, R, 32).max(axis=(2, 3), keepdims=True)
            m = np.broadcast_to(g, (8, K // R, R, 32)).reshape(8, K, 32)
        else:
            W = bs // WT
            g = m.reshape(8 // W, W, K, 32).max(axis=(1, 2, 3), keepdims=True)
            m = np.broadcast_to(g, (8 // W, W, K, 32)).reshape(8, K, 32)
        s0 = s[..., 0]
        sel = (s0 < n) & (s0 % bs == 0)
        absmax[s0[sel] // bs] = m[sel]; np.add.at(awrites, s0[sel] // bs, 1)
        inv = (np.float32(1.0) / np.maximum(m, np.float32(1e-38))).astype(np.float32)
        sc = (x * inv[..., None]).astype(np.float32)
        idx = (sc[..., None] > thr).sum(-1)
        for p in range(E // 2):
            ii = s0 + 2 * p
            ok = np.ones_like(ii, bool) if fast else ii < n
            lo = np.where(ii + 1 < n, idx[..., 2 * p + 1], 7) if not fast else idx[..., 2 * p + 1]
            byte = (idx[..., 2 * p] << 4) | lo
            packed[ii[ok] // 2] = byte[ok]; np.add.at(writes, ii[ok] // 2, 1)
    assert (writes == 1).all() and (awrites == 1).all()
    return torch.from_numpy(packed.astype(np.uint8)), torch.from_numpy(absmax)

def _emu_cuda_dequantize(packed, absmax_eff, n, bs, dtype, vec_ok=True):
    size = torch.empty((), dtype=dtype).element_size()
    E = 16 // size; P = E // 2; K = 4; kRow = 32 * E; WT = K * kRow
    code = nf4_code().numpy(); pk = packed.numpy().astype(np.uint32); a = absmax_eff.numpy()
    out = np.full(n, np.nan, np.float32); writes = np.zeros(n, np.int32)
    lg = bs.bit_length() - 1
    for tile in range(-(-n // WT)):
        kv, lv = np.meshgrid(np.arange(K), np.arange(32), indexing="ij")
        s = tile * WT + lv * E + kv * kRow
        if vec_ok and (tile + 1) * WT <= n:
            word = sum(pk[s // 2 + j] << (8 * j) for j in range(P))
            for e in range(E):
                shift = 8 * (e // 2) + (0 if e & 1 else 4)
                v = (code[(word >> shift) & 15] * a[s >> lg]).astype(np.float32)
                out[s + e] = v; np.add.at(writes, s + e, 1)
        else:
            for e in range(E):
                i = s + e; ok = (s < n) & (i < n); i = i[ok]
                byte = pk[i >> 1]; nib = np.where(i & 1, byte & 15, byte >> 4)
                out[i] = (code[nib] * a[i >> lg]).astype(np.float32); np.add.at(writes, i, 1)
    assert (writes == 1).all()
    return torch.from_numpy(out).to(dtype)


@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
def test_cuda_index_math_emulation(blocksize):
    g = _gen(600 + blocksize)
    for dtype in DTYPES:
        for n in (3, 4096, 2 * 4096 + 1001):
            w = torch.randn(n, generator=g).to(dtype)
            p_r, a_r = ref.quantize_blocks_reference(w, blocksize)
            for vec in (True, False):
                p, a = _emu_cuda_quantize(w, blocksize, vec)
                assert torch.equal(p, p_r) and torch.equal(a, a_r), (dtype, n, vec)
            out_dtype = DTYPES[(DTYPES.index(dtype) + 1) % 3]
            for odt in (dtype, out_dtype):
                exp = ref.dequantize_reference(p_r, a_r, None, None, None, nf4_code(), n, blocksize, odt)
                for vec in (True, False):
                    got = _emu_cuda_dequantize(p_r, a_r, n, blocksize, odt, vec)
                    assert torch.equal(got, exp), (dtype, n, odt, vec)


# ------------------------------------------------------------------------------------ nvcc


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_sources_compile_with_nvcc(cu, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    cmd = [nvcc, "-c", "-O3", "--fmad=false", "-std=c++17",
           "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80",
           f"-I{ROOT / 'csrc'}", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
    assert (tmp_path / (cu.stem + ".o")).stat().st_size > 0


def test_cuda_bindings_parse_against_torch_headers(tmp_path):
    """csrc/bindings_cuda.cpp (pybind11 + ATen + c10/cuda) type-checks with the host compiler against
    the installed torch's headers and the CUDA toolkit's: a wrong ATen or launcher call fails here, on
    the CPU, instead of in a GPU session's build.  A CPU-only torch lacks one generated CUDA header
    (c10/cuda/impl/cuda_cmake_macros.h); an empty stand-in is enough for parsing."""
    nvcc = _nvcc()
    cxx = shutil.which("g++") or shutil.which("c++")
    if nvcc is None or cxx is None:
        pytest.skip("needs nvcc (for the CUDA headers) and a C++ compiler")
    cuda_inc = pathlib.Path(os.path.realpath(nvcc)).parent.parent / "include"
    if not (cuda_inc / "cuda_runtime_api.h").exists():
        found = [p for p in pathlib.Path("/usr/local").glob("cuda*/include/cuda_runtime_api.h")]
        if not found:
            pytest.skip("CUDA headers not found beside nvcc or under /usr/local/cuda*")
        cuda_inc = found[0].parent
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", f"-I{ROOT / 'csrc'}", *(f"-I{p}" for p in include_paths()),
           f"-I{tmp_path}", f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}",
           "-DTORCH_EXTENSION_NAME=_C_cuda", str(ROOT / "csrc" / "bindings_cuda.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
