"""Triton NF4 kernels (lora_kernels.triton.nf4_quant) against lora_kernels.reference, bit-exact.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1 is set below, before
triton is imported).  The interpreter gets bf16 wrong, so bf16 cases and the large sizes are
marked ``gpu`` and skipped without CUDA.  Every test draws fresh data from a generator seeded
from os.urandom; the seed is in the test's assertion messages.
"""

from __future__ import annotations

import os

if not os.environ.get("TRITON_INTERPRET") and not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import fractions
import struct

import pytest
import torch

triton = pytest.importorskip("triton")

from lora_kernels import reference as ref  # noqa: E402
from lora_kernels.codes import VALID_BLOCKSIZES, dynamic_code, nf4_code  # noqa: E402
from lora_kernels.triton import nf4_quant as K  # noqa: E402
from .nf4_checks import assert_nested_matches_reference, assert_packed_matches_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
gpu = [pytest.mark.gpu, needs_cuda]


def _gen() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g, seed


def _weight(n: int, dtype: torch.dtype, g: torch.Generator, blocksize: int = 64) -> torch.Tensor:
    """randn with per-block scales over many octaves, a few all-zero blocks, on DEVICE."""
    nb = -(-n // blocksize)
    scale = torch.exp2(torch.randint(-12, 6, (nb,), generator=g).float())
    scale[torch.rand(nb, generator=g) < 0.1] = 0.0  # all-zero blocks
    w = torch.randn(n, generator=g) * scale.repeat_interleave(blocksize)[:n]
    return w.to(dtype).to(DEVICE)


def _check_roundtrip(w: torch.Tensor, bs: int, seed: int, out_dtypes) -> None:
    n = w.numel()
    msg = f"seed={seed} n={n} bs={bs} dtype={w.dtype}"
    packed, absmax = K.quantize_blocks(w, bs)
    p_ref, a_ref = ref.quantize_blocks_reference(w, bs)
    assert torch.equal(absmax, a_ref), msg
    offset = absmax.mean()
    dyn = dynamic_code(w.device)
    q, nested = K.quantize_absmax_nested(absmax, offset, dyn)
    if w.is_cuda:  # the GPU's block reciprocal is bitsandbytes' approximate one (see tests/nf4_checks.py)
        assert_packed_matches_reference(packed, w, bs, msg)
        assert_nested_matches_reference(q, nested, absmax, offset, dyn, msg)
    else:
        assert torch.equal(packed, p_ref), msg
        q_ref, nested_ref = ref.quantize_absmax_nested_reference(absmax, offset, dyn)
        assert torch.equal(nested, nested_ref), msg
        assert torch.equal(q, q_ref), msg

    code = nf4_code(w.device)
    for dt in out_dtypes:
        for args in ((absmax, None, None, None), (q, nested, dyn, offset)):
            out = torch.full((n,), float("nan"), dtype=dt, device=w.device)  # poisoned
            got = K.dequantize(packed, *args, code, n, bs, dt, out=out)
            want = ref.dequantize_reference(packed, *args, code, n, bs, dt)
            assert got is out
            assert torch.equal(got, want), f"{msg} out={dt} nested={args[1] is not None}"


# ---------------------------------------------------------------------------------------------
# Interpreter-sized cases (fp32 / fp16)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", VALID_BLOCKSIZES, ids=lambda b: f"bs{b}")
def test_roundtrip_every_blocksize(bs):
    g, seed = _gen()
    for n in (1, 2, 3, bs - 1, bs + 1, 3 * bs + 5, 8192 + 17):
        if n < 1:
            continue
        for dtype in (torch.float32, torch.float16):
            _check_roundtrip(_weight(n, dtype, g, bs), bs, seed, (torch.float32, torch.float16))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 63, 64, 65, 127, 129, 1001])
def test_roundtrip_small_n(n):
    g, seed = _gen()
    _check_roundtrip(_weight(n, torch.float32, g), 64, seed, (torch.float32,))


def test_many_nested_blocks_multiple_programs():
    # 300 000 elements / 32 = 9375 absmax -> 37 nested blocks (3 nested programs, partial last).
    g, seed = _gen()
    _check_roundtrip(_weight(300_001, torch.float16, g, 32), 32, seed, (torch.float16,))


def test_quantize_zero_and_ties():
    """All-zero weight, exact NF4 levels and exact midpoints (ties go to the lower index)."""
    code = nf4_code()
    thr = (code[:-1] + code[1:]) * 0.5
    for w in (torch.zeros(257), torch.cat([code, thr, -thr, torch.zeros(3)]).repeat(5)):
        for bs in (32, 64):
            packed, absmax = K.quantize_blocks(w.to(DEVICE), bs)
            p_ref, a_ref = ref.quantize_blocks_reference(w.to(DEVICE), bs)
            assert torch.equal(packed, p_ref) and torch.equal(absmax, a_ref)


def test_nested_block_all_equal_to_offset():
    g, seed = _gen()
    nb = 256 * 3 + 40
    absmax = torch.rand(nb, generator=g) * 0.1
    absmax[256:512] = 0.25  # one full nested block equal to the offset
    offset = torch.tensor(0.25)
    dyn = dynamic_code()
    q, nested = K.quantize_absmax_nested(absmax.to(DEVICE), offset.to(DEVICE), dyn.to(DEVICE))
    q_ref, nested_ref = ref.quantize_absmax_nested_reference(absmax, offset, dyn)
    assert nested[1].item() == 0.0 and torch.all(q[256:512] == 0)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(nested.cpu(), nested_ref), f"seed={seed}"


def test_nested_exact_ties_go_to_even_index():
    """Values exactly on the dynamic-code midpoints (scale 1.0: nested_absmax == 1)."""
    dyn = dynamic_code()
    bounds = (dyn[:-1] + dyn[1:]) * 0.5
    d = torch.cat([torch.tensor([1.0]), bounds, dyn, torch.tensor([-0.5, 0.0])])
    offset = torch.tensor(0.0)
    q, nested = K.quantize_absmax_nested(d.to(DEVICE), offset.to(DEVICE), dyn.to(DEVICE))
    q_ref, nested_ref = ref.quantize_absmax_nested_reference(d, offset, dyn)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(nested.cpu(), nested_ref)
    # the tie rule is really exercised: some midpoint rounds up, some down
    assert (q_ref[1:256].long() - torch.arange(255)).unique().tolist() == [0, 1]


def test_dequantize_writes_every_element_and_nothing_else():
    g, seed = _gen()
    for n in (1, 3, 4097, 8192 * 2 + 1):
        w = _weight(n, torch.float32, g)
        packed, absmax = K.quantize_blocks(w, 64)
        buf = torch.full((n + 64,), float("nan"), dtype=torch.float16, device=DEVICE)
        got = K.dequantize(packed, absmax, None, None, None, nf4_code(DEVICE), n, 64, torch.float16, out=buf[:n])
        assert not torch.isnan(got).any(), f"seed={seed} n={n}"
        assert torch.isnan(buf[n:]).all(), f"seed={seed} n={n}: wrote past the end"


def _fma_f32(a: float, b: float, c: float) -> float:
    """fl32(a*b + c) with one rounding, exactly (Fraction arithmetic, ties to even)."""
    exact = fractions.Fraction(a) * fractions.Fraction(b) + fractions.Fraction(c)
    r = torch.tensor(float(exact), dtype=torch.float32)  # within one fp32 ulp of the answer
    cands = [r, torch.nextafter(r, torch.tensor(float("inf"))), torch.nextafter(r, torch.tensor(float("-inf")))]

    def key(t):
        err = abs(fractions.Fraction(t.item()) - exact)
        odd = struct.unpack("<I", struct.pack("<f", t.item()))[0] & 1
        return (err, odd)

    return min(cands, key=key).item()


def test_nested_decode_is_not_fused_and_fma_would_differ():
    """The nested absmax decode rounds twice; an FMA would change the output on these inputs."""
    g, seed = _gen()
    n, bs = 64 * 700, 64  # 700 blocks -> 3 nested blocks
    w = _weight(n, torch.float32, g, bs)
    qd = ref.quantize_reference(w.cpu(), bs, double_quant=True)
    q, nested, dyn, off, code = qd["absmax"], qd["nested_absmax"], qd["nested_code"], qd["offset"], qd["code"]
    want = ref.dequantize_reference(qd["packed"], q, nested, dyn, off, code, n, bs, torch.float32)
    got = K.dequantize(qd["packed"].to(DEVICE), q.to(DEVICE), nested.to(DEVICE), dyn.to(DEVICE),
                       off.to(DEVICE), code.to(DEVICE), n, bs, torch.float32)
    assert torch.equal(got.cpu(), want), f"seed={seed}"
    # What a fused multiply-add would have produced:
    sc = nested.repeat_interleave(256)[: q.numel()]
    fused = torch.tensor([_fma_f32(dyn[qi].item(), s.item(), off.item()) for qi, s in zip(q.long(), sc)])
    two_roundings = ref.absmax_from_nested(q, nested, dyn, off)
    assert (fused != two_roundings).sum() > 0, f"seed={seed}: no FMA-sensitive absmax in the data"
    want_fused = ref.dequantize_reference(qd["packed"], fused, None, None, None, code, n, bs, torch.float32)
    assert not torch.equal(want_fused, want), f"seed={seed}: the test could not detect an FMA"


def test_bad_inputs_raise():
    w = torch.randn(64, device=DEVICE)
    with pytest.raises(ValueError):
        K.quantize_blocks(w, 48)
    with pytest.raises(ValueError):
        K.quantize_blocks(w.view(8, 8), 64)
    with pytest.raises(ValueError):
        K.quantize_blocks(w.double(), 64)
    a = torch.rand(10, device=DEVICE)
    with pytest.raises(ValueError):
        K.quantize_absmax_nested(a, a.mean().reshape(1), dynamic_code(DEVICE))
    with pytest.raises(ValueError):
        K.quantize_absmax_nested(a, a.mean(), dynamic_code(DEVICE)[:255])
    p, am = K.quantize_blocks(w, 64)
    with pytest.raises(ValueError):
        K.dequantize(p, am, None, None, None, nf4_code(DEVICE), 65, 64, torch.float32)  # too few bytes
    with pytest.raises(ValueError):
        K.dequantize(p, am.to(torch.uint8), None, None, None, nf4_code(DEVICE), 64, 64, torch.float32)
    with pytest.raises(ValueError):
        K.dequantize(p, am, None, None, None, nf4_code(DEVICE), 64, 64, torch.float32,
                     out=torch.empty(64, dtype=torch.float16, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# GPU: bf16 and large sizes (run with `pytest -m gpu` on the device machine)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bs", VALID_BLOCKSIZES, ids=lambda b: f"bs{b}")
def test_gpu_bf16_every_blocksize(bs):
    g, seed = _gen()
    for n in (1, 3, bs + 1, 8192 * 3 + 7, 1_000_003):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            _check_roundtrip(_weight(n, dtype, g, bs), bs, seed, (torch.bfloat16, torch.float16, torch.float32))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 14336), (8192, 28672)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_large_bf16(shape):
    g, seed = _gen()
    n = shape[0] * shape[1]
    w = _weight(n, torch.bfloat16, g, 64)
    _check_roundtrip(w, 64, seed, (torch.bfloat16,))


@pytest.mark.gpu
@needs_cuda
def test_gpu_fma_guard_matters():
    """Compiled with fp fusion on, the nested decode becomes an FMA and results change."""
    g, seed = _gen()
    n, bs = 64 * 5000, 64
    w = _weight(n, torch.bfloat16, g, bs)
    qd = ref.quantize_reference(w, bs, double_quant=True)
    args = (qd["packed"], qd["absmax"], qd["nested_absmax"], qd["nested_code"], qd["offset"], qd["code"], n, bs,
            torch.float32)
    want = ref.dequantize_reference(*args)
    assert torch.equal(K.dequantize(*args), want), f"seed={seed}"
    fused = K.dequantize(*args, _fp_fusion=True)
    assert not torch.equal(fused, want), f"seed={seed}: fusion on did not change results (no FMA emitted?)"


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_90 (no GPU needed), in a subprocess without the interpreter: the
# interpreter accepts code the compiler rejects, and only real PTX shows whether the nested
# decode became an FMA.
# ---------------------------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_kernels.triton import nf4_quant as K

def ptx(kernel, sig, consts, **opts):
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items())
             if v.startswith("*") or k == "n"}
    src = ASTSource(fn=kernel, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

bs = int(sys.argv[1])
rows = max(1, 8192 // bs)
deq = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_ptr": "*fp32", "ncode_ptr": "*fp32",
       "offset_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": "*bf16", "n": "i32", "nbytes": "i32", "nblocks": "i32"}
dc = {"BLOCKSIZE": bs, "ROWS": rows, "NESTED": True, "NBS": 256, "VEC": 4, "PDL": False}
q = {"w_ptr": "*bf16", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "thr_ptr": "*fp32", "n": "i32",
     "nbytes": "i32", "nblocks": "i32"}
nq = {"absmax_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32", "q_ptr": "*u8",
      "nested_ptr": "*fp32", "nb": "i32", "nnested": "i32"}
print(json.dumps({
    "deq": ptx(K._nf4_dequantize_kernel, deq, dc, num_warps=8, enable_fp_fusion=False),
    "deq_fused": ptx(K._nf4_dequantize_kernel, deq, dc, num_warps=8, enable_fp_fusion=True),
    "deq_pdl": ptx(K._nf4_dequantize_kernel, deq, {**dc, "PDL": True}, num_warps=8, enable_fp_fusion=False),
    "quant": ptx(K._nf4_quantize_kernel, q, {"BLOCKSIZE": bs, "ROWS": rows, "VEC": 4, "APPROX_RCP": True},
                 num_warps=8,
                 enable_fp_fusion=False),
    "nested": ptx(K._absmax_nested_quantize_kernel, nq, {"ROWS": 16, "NBS": 256, "APPROX_RCP": True}, num_warps=4,
                  enable_fp_fusion=False),
}))
"""


@pytest.mark.parametrize("bs", [32, 4096], ids=lambda b: f"bs{b}")
def test_sm90_ptx_compiles_vectorized_and_fma_free(bs):
    import json
    import pathlib
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(bs)], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode != 0 and "ptxas" in r.stderr.lower() and "CompilationError" not in r.stderr:
        pytest.skip(f"no sm_90 toolchain here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads(r.stdout.strip().splitlines()[-1])
    assert "fma.rn.f32" not in p["deq"]
    # 16-byte stores; the output tile is not shuffled through shared memory (a per-row absmax
    # vector may be: at most a couple of st.shared)
    assert "st.global.v4.b32" in p["deq"] and p["deq"].count("st.shared") <= 2
    assert "fma.rn.f32" in p["deq_fused"]  # the fusion guard is what keeps the FMA out
    # the programmatic-dependent variant waits for the previous grid (and lets the next one launch);
    # the plain one has neither instruction
    assert "griddepcontrol.wait" in p["deq_pdl"] and "griddepcontrol.launch_dependents" in p["deq_pdl"]
    assert "griddepcontrol" not in p["deq"]
    # block scales: bitsandbytes' approximate reciprocal for normal absmax, IEEE division otherwise
    assert "rcp.approx.ftz.f32" in p["quant"] and "div.rn.f32" in p["quant"] and "ld.global.v4.b32" in p["quant"]
    assert "rcp.approx.ftz.f32" in p["nested"] and "fma.rn.f32" not in p["nested"]
