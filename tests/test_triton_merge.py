"""Merged LoRA weight (lora_kernels.triton.nf4_merge.dequantize_merge) against a float64 reference.

Reference: W_exact = the NF4 weight dequantized to fp32 by ``reference.dequantize_reference``
(exact: every Ŵ value is an fp32 number) or the dense weight, as float64; LR = (B ⊙ s) · A in
float64 from the very operands the kernel got; want = W_exact + LR.

Tolerance, elementwise (``_tolerance``):
|got - want| <= eps_out * |want| + eps_op * S + (r + 2) * 2**-24 * (S + |W|) + tiny, where
* eps_out * |want| (eps_out = finfo(out dtype).eps, one ulp at the bottom of |want|'s binade): the
  single final rounding costs half an ulp; the other half is slack;
* S = Σ_j |B[n, j] s_j A[j, k]|; each dot operand is rounded at most once to the dot's dtype (the
  output dtype): fl32(B * s), and A when given in a wider dtype, relative finfo(op).eps / 2 each,
  so eps_op = finfo(out dtype).eps;
* the low-rank products are accumulated in fp32 into the Ŵ tile (Ŵ is the dot's accumulator):
  r + 2 roundings of partial sums bounded by S + |W| (the GPU's fp32 "ieee" dot is an FMA chain,
  so this term is what bounds an fp32 output);
* tiny = one subnormal ulp of the output dtype (values that round into the subnormal range).
fp16/bf16 outputs are also held to max error <= eps * max |W_eff| (the brief's criterion).
The test is not vacuous about "one rounding": ``test_single_rounding`` checks that nearly every
fp16 output equals the correctly rounded value of Ŵ + (the kernel's dot operands' exact product),
which a kernel rounding Ŵ to fp16 before adding the low-rank term fails (shown on the same data).

Outputs are poisoned with NaN first (``out=``), so an unwritten element fails.  Without CUDA the
kernel runs under the Triton interpreter (fp16 / fp32 only: the interpreter gets bf16 wrong) on
small shapes; ``gpu`` cases (bf16 + fp16, 4096-wide) run with ``pytest -m gpu``.  Each test draws
fresh data from a seed taken from os.urandom; the seed is in every assertion message.
"""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import lora_kernels as lk  # noqa: E402
from lora_kernels.nf4 import NF4FormatError  # noqa: E402
from lora_kernels.triton.nf4_merge import DEFAULT_CONFIG, dequantize_merge  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
NAN = float("nan")
_LAST_LORA = None          # (a, b, s) of the last _run, for the single-rounding checks


def _gen() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed), seed


def _make(N, K, r, *, kind, g, blocksize=64, lora_dtype=torch.float16, scale="scalar", wdtype=torch.float32):
    """kind: "nf4dq" (double quant), "nf4" (single), "dense" (a ``wdtype`` tensor).
    scale: "scalar" (python float), "vector" ([r] fp32 with some zeros) or "tensor0" (0-d fp32).
    Rows of W span 2**-2 .. 2**2 of 1/sqrt(K); the low-rank term is about as large as W."""
    w = torch.randn(N, K, generator=g) * (1.0 / K**0.5)
    w *= torch.exp2(torch.randint(-2, 3, (N, 1), generator=g).float())
    if kind == "dense":
        weight = w.to(wdtype).to(DEVICE)
        w_exact = weight.double()
    else:
        weight = lk.quantize_nf4(w.to(wdtype).to(DEVICE), blocksize, double_quant=(kind == "nf4dq"))
        w_exact = weight.dequantize(torch.float32, backend="reference").double()
    a = b = s = None
    if r:
        a = (torch.randn(r, K, generator=g) / K**0.5).to(lora_dtype).to(DEVICE)
        b = torch.randn(N, r, generator=g).to(lora_dtype).to(DEVICE)
        if scale == "scalar":
            s = 1.0 / r**0.5 * 1.37
        elif scale == "vector":
            s = (torch.rand(r, generator=g) * 2 / r**0.5).to(DEVICE)
            s[torch.rand(r, generator=g) < 0.25] = 0.0        # AdaLoRA-style pruned ranks
        else:
            s = torch.tensor(0.75 / r**0.5, device=DEVICE)
    return weight, w_exact, a, b, s


def _reference(w_exact, a, b, s):
    """(want, S) in float64: want = W + (B ⊙ s) · A, S = |B ⊙ s| · |A| (the low-rank term's abs-sum)."""
    if a is None:
        return w_exact, torch.zeros_like(w_exact)
    s64 = s.double().reshape(-1) if isinstance(s, torch.Tensor) else torch.tensor([s], dtype=torch.float64)
    bs = b.double() * s64.to(b.device)[None, :]
    return w_exact + bs @ a.double(), bs.abs() @ a.double().abs()


def _tolerance(want, S, w_exact, out_dtype, r):
    """See the module docstring (dot operands are in the output dtype)."""
    fo = torch.finfo(out_dtype)
    tiny = fo.smallest_normal * fo.eps
    return fo.eps * want.abs() + fo.eps * S + (r + 2) * 2.0**-24 * (S + w_exact.abs()) + tiny


def _check(got, want, S, w_exact, out_dtype, r, msg):
    assert got.dtype == out_dtype, f"{msg}: dtype {got.dtype}"
    assert not torch.isnan(got).any(), f"{msg}: NaN left in the output (unwritten elements?)"
    err = (got.double() - want).abs()
    tol = _tolerance(want, S, w_exact, out_dtype, r)
    # fp16/bf16 also globally: within eps * max |W_eff| (1-2 ulps of the largest element).  Not for
    # fp32, where the fp32 accumulation error of the low-rank sum (~ sqrt(r) * 2**-24 * S) is
    # itself of the output's ulp size and S can exceed max |W_eff| (seen at r = 256).
    if out_dtype != torch.float32:
        bound = torch.finfo(out_dtype).eps * want.abs().max().item()
        assert err.max().item() <= bound, f"{msg}: max error {err.max().item():.3g} > eps * max|W_eff| = {bound:.3g}"
    bad = err > tol
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(f"{msg}: {int(bad.sum())} elements off; first flat index {i}: got "
                             f"{got.reshape(-1)[i].item()!r} want {want.reshape(-1)[i].item()!r} "
                             f"(err {err.reshape(-1)[i].item():.3g} > tol {tol.reshape(-1)[i].item():.3g})")


def _run(N, K, r, *, dtype, kind="nf4dq", blocksize=64, scale="scalar", lora_dtype=None, config=None,
         wdtype=torch.float32):
    g, seed = _gen()
    lora_dtype = lora_dtype or dtype
    weight, w_exact, a, b, s = _make(N, K, r, kind=kind, g=g, blocksize=blocksize, lora_dtype=lora_dtype,
                                     scale=scale, wdtype=wdtype)
    msg = (f"seed={seed} N={N} K={K} r={r} out={dtype} {kind} bs={blocksize} scale={scale} "
           f"lora={lora_dtype} config={config}")
    out = torch.full((N, K), NAN, dtype=dtype, device=DEVICE)
    got = dequantize_merge(weight, a, b, s if r else 1.0, dtype, out=out, config=config)
    assert got is out, msg
    want, S = _reference(w_exact, a, b, s)
    _check(got, want, S, w_exact, dtype, r, msg)
    global _LAST_LORA
    _LAST_LORA = (a, b, s)
    return got, want, weight


# ------------------------------------------------------------------------------------------------
# Interpreter-sized cases (fp16, fp32)
SMALL = dict(BLOCK_N=16, BLOCK_K=64, R_BLOCK=16)       # several K tiles and rank chunks
CASES = [
    # id, (N, K, r), kwargs
    ("dq-bs64-r1-oddN", (37, 192, 1), dict(kind="nf4dq", blocksize=64)),
    ("single-bs64-r8-vec", (5, 64, 8), dict(kind="nf4", blocksize=64, scale="vector")),
    ("dq-bs128-r16-vec", (37, 256, 16), dict(kind="nf4dq", blocksize=128, scale="vector")),
    ("single-bs128-r33", (5, 256, 33), dict(kind="nf4", blocksize=128)),
    ("dq-bs256-r33-tensor0", (37, 256, 33), dict(kind="nf4dq", blocksize=256, scale="tensor0")),
    ("single-bs256-r16", (5, 256, 16), dict(kind="nf4", blocksize=256)),
    ("dq-bs64-r33-vec-small", (37, 256, 33), dict(kind="nf4dq", scale="vector", config=SMALL)),
    ("single-bs128-r16-small", (37, 256, 16), dict(kind="nf4", blocksize=128, config=SMALL)),
    ("dq-bs256-r8-small", (5, 256, 8), dict(kind="nf4dq", blocksize=256, scale="vector", config=SMALL)),
    ("single-bs64-r1-oddK-small", (37, 192, 1), dict(kind="nf4", config=SMALL)),
    # 296 blocks > 256: two nested absmax blocks; 8 quantization blocks per 256-wide tile
    ("dq-bs32-r16-2nested", (37, 256, 16), dict(kind="nf4dq", blocksize=32)),
    ("dq-r8-lora-fp32", (37, 192, 8), dict(kind="nf4dq", lora_dtype=torch.float32, scale="vector")),
    ("dense-r8", (37, 192, 8), dict(kind="dense")),
    ("dense-r33-vec-small", (5, 256, 33), dict(kind="dense", scale="vector", config=SMALL)),
    ("dense-fp16-r16", (37, 64, 16), dict(kind="dense", wdtype=torch.float16)),
    ("dq-r16-rblock32", (37, 256, 33), dict(kind="nf4dq", config=dict(R_BLOCK=32, BLOCK_K=128, num_stages=1))),
]
DTYPES_CPU = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]


@pytest.mark.parametrize("dtype", DTYPES_CPU)
@pytest.mark.parametrize("shape,kw", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_merge_small(shape, kw, dtype):
    _run(*shape, dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES_CPU)
@pytest.mark.parametrize("kind", ["nf4dq", "nf4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_no_lora_is_dequantize_nf4(kind, blocksize, dtype):
    g, seed = _gen()
    weight, *_ = _make(37, 256, 0, kind=kind, blocksize=blocksize, g=g)
    out = torch.full((37, 256), NAN, dtype=dtype, device=DEVICE)
    got = dequantize_merge(weight, None, None, 1.0, dtype, out=out)
    assert got is out
    assert torch.equal(got, lk.dequantize_nf4(weight, dtype)), f"seed={seed} {kind} bs={blocksize} {dtype}"
    # small tiles: BLOCK_K below and above the blocksize
    got = dequantize_merge(weight, None, None, dtype=dtype, config=SMALL)
    assert torch.equal(got, lk.dequantize_nf4(weight, dtype)), f"seed={seed} {kind} bs={blocksize} {dtype} SMALL"
    for cfg in (dict(K_FASTEST=True), dict(SMALL, K_FASTEST=True)):
        got = dequantize_merge(weight, None, None, dtype=dtype, config=cfg)
        assert torch.equal(got, lk.dequantize_nf4(weight, dtype)), f"seed={seed} {kind} bs={blocksize} {dtype} {cfg}"


def test_default_dtype_and_dense_no_lora():
    g, seed = _gen()
    w16 = torch.randn(5, 128, generator=g).half().to(DEVICE)
    q = lk.quantize_nf4(w16, 64)
    got = dequantize_merge(q, None, None)
    assert got.dtype == torch.float16 and got.shape == (5, 128)
    assert torch.equal(got, lk.dequantize_nf4(q)), f"seed={seed}"
    assert torch.equal(dequantize_merge(w16, None, None), w16)
    assert torch.equal(dequantize_merge(w16, None, None, dtype=torch.float32), w16.float())
    # a dense weight with a row stride (a slice of a wider tensor): rows contiguous is enough
    wide = torch.randn(5, 256, generator=g).to(DEVICE)
    assert torch.equal(dequantize_merge(wide[:, :128], None, None, dtype=torch.float16), wide[:, :128].half())
    # default dtype with LoRA: the weight's dtype (fp32 here), lora operands in fp16
    wf = torch.randn(5, 64, generator=g).to(DEVICE)
    a = torch.randn(2, 64, generator=g).half().to(DEVICE)
    b = torch.randn(5, 2, generator=g).half().to(DEVICE)
    assert dequantize_merge(wf, a, b, 0.5).dtype == torch.float32


def _modeled(w_exact, a, b, s, op_dtype):
    """float64 W + bs·A with the kernel's dot operands: bs = op_dtype(fl32(B * s)), A in op_dtype."""
    sf = s.float().reshape(-1) if isinstance(s, torch.Tensor) else torch.tensor([s], dtype=torch.float32)
    bs = (b.float() * sf.to(b.device)[None, :]).to(op_dtype)
    return w_exact + bs.double() @ a.to(op_dtype).double()


@pytest.mark.parametrize("scale", ["scalar", "vector"])
def test_single_rounding(scale):
    """fp16 out: given the dot operands (``_modeled``), the fp32 sum Ŵ + bs·A is within ~2**-20
    relative of exact, so at most a tiny fraction of outputs may differ from the correctly rounded
    value.  Rounding Ŵ to fp16 before adding the low-rank term changes a large fraction of them."""
    got, want, weight = _run(64, 256, 16, dtype=torch.float16, kind="nf4dq", scale=scale)
    w_exact = weight.dequantize(torch.float32, backend="reference").double()
    a, b, s = _LAST_LORA
    exact = _modeled(w_exact, a, b, s, torch.float16)
    # torch rounds float64 -> fp16 through fp32: a double rounding only within 2**-24 of a tie
    frac = (got != exact.to(torch.float16)).double().mean().item()
    assert frac < 0.01, f"{frac:.2%} of outputs are not the correctly rounded value"
    twice = (lk.dequantize_nf4(weight, torch.float16).double() + (exact - w_exact)).to(torch.float16)
    assert (twice != exact.to(torch.float16)).double().mean().item() > 0.05   # the check above catches it


# ------------------------------------------------------------------------------------------------
# Bad input
def test_bad_input(monkeypatch):
    g, _ = _gen()
    N, K, r = 8, 128, 4
    weight, _, a, b, s = _make(N, K, r, kind="nf4dq", g=g)
    dm = dequantize_merge
    f16 = dict(dtype=torch.float16, device=DEVICE)

    def raises(exc, match, *args, **kw):
        with pytest.raises(exc, match=match):
            dm(*args, **kw)

    # weight
    w96 = lk.quantize_nf4(torch.randn(4, 96, generator=g).to(DEVICE), 64)
    raises(ValueError, r"K=96 is not a multiple of the NF4 blocksize 64", w96, None, None)
    raises(ValueError, "2-D", lk.quantize_nf4(torch.randn(2, 4, 64, generator=g).to(DEVICE), 64), None, None)
    raises(TypeError, "NF4Weight or a dense tensor", [[1.0]], None, None)
    raises(TypeError, "dense weight must be float32", torch.zeros(N, K, dtype=torch.int32, device=DEVICE), None, None)
    raises(ValueError, "dense weight must be 2-D", torch.zeros(2, N, K, device=DEVICE), None, None)
    raises(ValueError, "contiguous rows", torch.zeros(K, N, device=DEVICE).t(), None, None)
    strided = torch.zeros(weight.packed.numel(), 2, dtype=torch.uint8, device=DEVICE)[:, :1]
    strided.copy_(weight.packed)
    assert not strided.is_contiguous()
    with pytest.raises(NF4FormatError, match="packed must be contiguous"):   # refused when built ...
        dataclasses.replace(weight, packed=strided, check_tables=False)
    strided_after = dataclasses.replace(weight, check_tables=False)
    strided_after.packed = strided                          # ... and when made so afterwards
    raises(ValueError, "packed must be contiguous", strided_after, None, None)
    broken = dataclasses.replace(weight, check_tables=False)
    broken.absmax = broken.absmax[:-1]                      # corrupted after construction
    raises(NF4FormatError, "absmax", broken, None, None)
    # dtype
    raises(TypeError, "dtype must be", weight, a, b, s, torch.int8)
    raises(TypeError, "dtype must be", weight, a, b, s, torch.float64)
    # LoRA factors
    raises(ValueError, "both be given", weight, a, None, s)
    raises(ValueError, "both be given", weight, None, b, s)
    raises(TypeError, "lora_a must be float32", weight, a.double(), b, s)
    raises(TypeError, "lora_b must be float32", weight, a, b.to(torch.int32), s)
    raises(TypeError, "lora_a must be a torch.Tensor", weight, a.tolist(), b, s)
    raises(ValueError, "lora_a must be 2-D", weight, a[0], b, s)
    raises(ValueError, r"lora_a must be \[r, K=128\]", weight, a[:, :64], b, s)
    raises(ValueError, r"lora_b must be \[N=8, r=4\]", weight, a, b[:, :3], s)
    raises(ValueError, r"lora_b must be \[N=8, r=4\]", weight, a, b[:5], s)
    raises(ValueError, "rank r=0", weight, torch.zeros(0, K, **f16), torch.zeros(N, 0, **f16), 1.0)
    raises(ValueError, "rank r=257", weight, torch.zeros(257, K, **f16), torch.zeros(N, 257, **f16), 1.0)
    # scale
    raises(ValueError, r"shape \[\] or \[r=4\]", weight, a, b, torch.ones(5, device=DEVICE))
    raises(ValueError, r"shape \[\] or \[r=4\]", weight, a, b, torch.ones(1, 4, device=DEVICE))
    raises(TypeError, "float tensor", weight, a, b, torch.ones(4, dtype=torch.int64, device=DEVICE))
    raises(TypeError, "scale must be a float", weight, a, b, "0.5")
    raises(TypeError, "scale must be a float", weight, a, b, True)
    # out
    raises(ValueError, "out must be", weight, a, b, s, torch.float16, out=torch.empty(N, K + 1, **f16))
    raises(ValueError, "out must be", weight, a, b, s, torch.float16, out=torch.empty(N, K, device=DEVICE))
    raises(ValueError, "out must be", weight, a, b, s, torch.float16, out=torch.empty(K, N, **f16).t())
    raises(TypeError, "out must be a torch.Tensor", weight, a, b, s, out=[0.0])
    # config
    raises(ValueError, "unknown config key", weight, a, b, s, config=dict(BLOCK_M=64))
    raises(ValueError, "BLOCK_N must be a power of two >= 16", weight, a, b, s, config=dict(BLOCK_N=24))
    raises(ValueError, "BLOCK_N must be a power of two >= 16", weight, a, b, s, config=dict(BLOCK_N=8))
    raises(ValueError, "BLOCK_K must be a power of two >= 32", weight, a, b, s, config=dict(BLOCK_K=16))
    raises(ValueError, "R_BLOCK must be a power of two >= 16", weight, a, b, s, config=dict(R_BLOCK=8))
    raises(ValueError, "BLOCK_N \\* BLOCK_K", weight, a, b, s, config=dict(BLOCK_N=256, BLOCK_K=512))
    raises(ValueError, "num_warps", weight, a, b, s, config=dict(num_warps=3))
    raises(ValueError, "num_stages", weight, a, b, s, config=dict(num_stages=0))
    raises(TypeError, "config must be a dict", weight, a, b, s, config=[("BLOCK_N", 64)])
    # devices
    raises(ValueError, "lora_a is on meta", weight, a.to("meta"), b, s)
    raises(ValueError, "scale is on meta", weight, a, b, torch.ones(4, device="meta"))
    raises(ValueError, "CUDA device", torch.zeros(N, K, device="meta"), None, None)
    raises(ValueError, "unknown config key", weight, a, b, s, config=dict(LORA_FMA=True))
    raises(ValueError, "K_FASTEST must be a bool", weight, a, b, s, config=dict(K_FASTEST=None))
    if HAS_CUDA:
        raises(ValueError, "is on cpu", weight, a, b.cpu(), s)
        raises(ValueError, "CUDA device", weight.to("cpu"), None, None)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        raises(ValueError, "CUDA device", weight, a, b, s)
    assert set(DEFAULT_CONFIG) == {"BLOCK_N", "BLOCK_K", "R_BLOCK", "num_warps", "num_stages", "K_FASTEST"}


# ------------------------------------------------------------------------------------------------
# The K_FASTEST tile order and the default config by rank
K_FASTEST_CASES = [c for c in CASES if c[0] in ("dq-bs64-r1-oddN", "single-bs64-r8-vec", "dq-bs128-r16-vec",
                                                  "dq-bs64-r33-vec-small", "dq-bs32-r16-2nested",
                                                  "dq-r8-lora-fp32", "dense-r8")]


def _k_fastest_check(shape, kw, dtype):
    """The float64 bound (``_run``), and K_FASTEST changes only which program computes a tile, not
    how: bit-equal to the same config without it."""
    kw = dict(kw)
    base = dict(kw.pop("config", None) or {})
    got, _, weight = _run(*shape, dtype=dtype, config=dict(base, K_FASTEST=True), **kw)
    a, b, s = _LAST_LORA
    plain = dequantize_merge(weight, a, b, s, dtype, config=dict(base, K_FASTEST=False))
    assert torch.equal(got, plain), f"{shape} {kw}: K_FASTEST changed the values"


def test_default_config_by_rank(monkeypatch):
    """Launches without a config take the small-rank tile up to SMALL_RANK_MAX (no LoRA included),
    DEFAULT_CONFIG above it; an explicit config overrides either; column windows of default
    launches are aligned to every default tile."""
    from lora_kernels.triton import nf4_merge

    for r in (1, nf4_merge.SMALL_RANK_MAX):
        assert nf4_merge.default_config(r) == dict(DEFAULT_CONFIG, **nf4_merge.SMALL_RANK_TILE)
    assert nf4_merge.default_config(0) == dict(DEFAULT_CONFIG, **nf4_merge.SMALL_RANK_TILE, K_FASTEST=True)
    assert nf4_merge.default_config(nf4_merge.SMALL_RANK_MAX + 1) is DEFAULT_CONFIG
    assert nf4_merge._resolve_config(dict(BLOCK_N=32), 4)["BLOCK_N"] == 32
    assert nf4_merge._resolve_config(None, 64)["BLOCK_K"] == DEFAULT_CONFIG["BLOCK_K"]
    unit = nf4_merge.window_col_unit(64)
    assert unit % DEFAULT_CONFIG["BLOCK_K"] == 0 and unit % nf4_merge.SMALL_RANK_TILE["BLOCK_K"] == 0
    assert nf4_merge.window_col_unit(1024) == 1024
    # the tile is really used: a window start that only DEFAULT_CONFIG's BLOCK_K divides is refused at
    # r = 4 (small tile, BLOCK_K 256) and accepted at r = 17
    g, seed = _gen()
    for r, ok in ((4, False), (17, True)):
        weight, _, a, b, s = _make(37, 512, r, kind="nf4dq", g=g)
        if ok:
            dequantize_merge(weight, a, b, s, torch.float16, cols=(128, 512))
        else:
            with pytest.raises(ValueError, match="multiple of 256"):
                dequantize_merge(weight, a, b, s, torch.float16, cols=(128, 512))
    monkeypatch.setattr(nf4_merge, "SMALL_RANK_MAX", -1)                  # the switch turns it off
    assert nf4_merge.default_config(0) is DEFAULT_CONFIG


@pytest.mark.parametrize("dtype", DTYPES_CPU)
@pytest.mark.parametrize("shape,kw", [c[1:] for c in K_FASTEST_CASES], ids=[c[0] for c in K_FASTEST_CASES])
def test_k_fastest(shape, kw, dtype):
    _k_fastest_check(shape, kw, dtype)


def test_k_fastest_windows():
    """K_FASTEST on windows (the streamed routes' row and column chunks, odd ends included) equals
    the same window of the whole merge."""
    g, seed = _gen()
    weight, _, a, b, s = _make(37, 384, 8, kind="nf4dq", g=g)
    cfg = dict(BLOCK_N=16, BLOCK_K=64)
    full = dequantize_merge(weight, a, b, s, torch.float16, config=cfg)
    for rows, cols in (((3, 37), (128, 384)), ((0, 17), (64, 191)), ((36, 37), (320, 321))):
        win = dequantize_merge(weight, a, b, s, torch.float16, rows=rows, cols=cols, config=dict(cfg, K_FASTEST=True))
        assert torch.equal(win, full[rows[0]:rows[1], cols[0]:cols[1]]), f"seed={seed} {rows} {cols}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_k_fastest_and_small_rank_tile(dtype):
    """K_FASTEST bit-equal to the N-first order; the small-rank tile (default at r <= 16) and the
    64x128 one within the float64 bound at ranks on both sides of SMALL_RANK_MAX."""
    for r, scale, extra in ((16, "scalar", {}), (4, "vector", dict(BLOCK_N=32, BLOCK_K=256)),
                            (33, "tensor0", dict(BLOCK_N=64, BLOCK_K=256, num_warps=8))):
        _k_fastest_check((1000, 4096, r), dict(kind="nf4dq", scale=scale, config=extra), dtype)
    for r in (1, 16, 17, 64):
        _run(1000, 4096, r, dtype=dtype, kind="nf4dq")                              # default by rank
        _run(1000, 4096, r, dtype=dtype, kind="nf4dq", config=dict(BLOCK_N=16, BLOCK_K=256, num_warps=2))


def test_cached_launcher_falls_back_where_it_cannot_be_used(monkeypatch):
    """triton/launch.py only takes its fast path for compiled (not interpreted) kernels, with no
    launch hooks installed and LORA_KERNELS_TRITON_FAST_LAUNCH not 0; otherwise every call is the
    plain ``kernel[grid]`` launch (the CPU merge tests above run that way under the interpreter)."""
    from lora_kernels.triton import launch, nf4_merge

    assert not launch._hook_set(None)
    assert launch._hook_set(lambda *a: None)
    chain = type("Chain", (), {"calls": []})()          # triton >= 3.5's empty HookChain
    assert not launch._hook_set(chain)
    chain.calls.append(print)
    assert launch._hook_set(chain)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert not nf4_merge._launch_merge.usable and not nf4_merge._launch_merge.compiled

    calls = []

    class FakeKernel:                                     # records the plain-path launches
        arg_names = ["x", "BLOCK"]

        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k))
    fl = launch.CachedLauncher(FakeKernel())
    assert not fl.usable                                  # not a JITFunction: never the fast path
    x = torch.zeros(4)
    fl(3, (x,), {"BLOCK": 4}, {"num_warps": 4})
    assert calls == [((3,), (x,), {"BLOCK": 4, "num_warps": 4})] and not fl.compiled


# ------------------------------------------------------------------------------------------------
# GPU cases (bf16 + fp16, real sizes)
DTYPES_GPU = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES_GPU)
@pytest.mark.parametrize("r", [16, 64, 128, 256])
@pytest.mark.parametrize("NK", [(4096, 4096), (1000, 4096)], ids=["4096x4096", "1000x4096"])
@pytest.mark.parametrize("kind", ["nf4dq", "nf4", "dense"])
def test_gpu_merge(kind, NK, r, dtype):
    _run(*NK, r, dtype=dtype, kind=kind, scale="vector" if r in (64, 256) else "scalar",
         wdtype=dtype if kind == "dense" else torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind,r,scale", [("nf4dq", 16, "vector"), ("nf4", 256, "scalar"), ("dense", 64, "tensor0")])
def test_gpu_fp32(kind, r, scale):
    """fp32 output: fp32 dot operands with input_precision="ieee" (tf32 would fail the tolerance)."""
    _run(1000, 1024, r, dtype=torch.float32, kind=kind, scale=scale, lora_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES_GPU)
@pytest.mark.parametrize("blocksize", [64, 128, 256, 1024])
def test_gpu_no_lora_is_dequantize_nf4(blocksize, dtype):
    g, seed = _gen()
    weight, *_ = _make(1000, 4096, 0, kind="nf4dq", blocksize=blocksize, g=g)
    want = lk.dequantize_nf4(weight, dtype)
    for cfg in (None, dict(BLOCK_N=128, BLOCK_K=128), dict(BLOCK_N=32, BLOCK_K=512, num_warps=8),
                dict(BLOCK_N=16, BLOCK_K=256, num_warps=2, K_FASTEST=True)):
        got = dequantize_merge(weight, None, None, dtype=dtype, config=cfg)
        assert torch.equal(got, want), f"seed={seed} bs={blocksize} {dtype} {cfg}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES_GPU)
def test_gpu_single_rounding_and_configs(dtype):
    """Nearly every output is the correctly rounded value (see test_single_rounding), every config."""
    for cfg in (None, dict(BLOCK_N=128, BLOCK_K=128), dict(BLOCK_N=32, BLOCK_K=512, R_BLOCK=32, num_warps=8),
                dict(BLOCK_N=16, BLOCK_K=64, R_BLOCK=128, num_stages=1)):
        got, _, weight = _run(1000, 4096, 128, dtype=dtype, kind="nf4dq", blocksize=128, config=cfg,
                              scale="vector")
        w_exact = weight.dequantize(torch.float32, backend="reference").double()
        frac = (got != _modeled(w_exact, *_LAST_LORA, dtype).to(dtype)).double().mean().item()
        assert frac < 0.01, f"{cfg}: {frac:.2%} of outputs are not the correctly rounded value"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_forward_route():
    """F.linear(x, W_eff) is the LoRA forward x·Ŵᵀ + ((x·Aᵀ) ⊙ s)·Bᵀ (float64 reference)."""
    from lora_kernels.reference import lora_linear_reference

    g, seed = _gen()
    weight, w_exact, a, b, s = _make(1000, 4096, 64, kind="nf4dq", g=g, lora_dtype=torch.bfloat16, scale="vector")
    x = torch.randn(512, 4096, generator=g).bfloat16().cuda()
    y = torch.nn.functional.linear(x, dequantize_merge(weight, a, b, s, torch.bfloat16))
    ref = lora_linear_reference(x.double(), w_exact, a.double(), b.double(), s.double(), None, torch.float64)
    err = (y.double() - ref).norm() / ref.norm()
    assert err < 1e-2, f"seed={seed}: relative Frobenius error {err:.3g}"


def _launch_module():
    """triton/launch.py, or a skip where the installed Triton lacks what its fast path relies on."""
    from lora_kernels.triton import launch

    if launch._JITFunction is None or not hasattr(launch._knobs, "runtime"):
        pytest.skip("this triton has no launcher protocol to test")
    return launch


def _stand_in_kernel(launch, arg_names, on_plain, on_run):
    """A JITFunction stand-in (no source to compile): ``kernel[grid](*a, **k)`` calls
    ``on_plain(grid, a, k)`` and returns a compiled stand-in whose ``run(*a)`` calls ``on_run(a)``."""
    class FakeCompiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *a):
            on_run(a)

    class FakeJIT(launch._JITFunction):
        def __init__(self):
            self.arg_names = arg_names

        def __getitem__(self, grid):
            return lambda *a, **k: on_plain(grid, a, k) or FakeCompiled()

    return FakeJIT()


def test_cached_launcher_key_and_fast_path(monkeypatch):
    """The fast path's bookkeeping, on the CPU with a stand-in compiled kernel (the real one runs
    only on a GPU): the first call of a signature goes through ``kernel[grid]`` and keeps the
    kernel; equal signatures then call its launcher with JITFunction.run's arguments; a float may
    change without a new entry, while an int's value, a tensor's dtype or 16-byte alignment, or a
    constexpr value make a new one; hooks or LORA_KERNELS_TRITON_FAST_LAUNCH=0 give the plain path."""
    launch = _launch_module()
    plain, runs = [], []
    fake = _stand_in_kernel(launch, ["p", "q", "n", "s", "BLOCK"],
                            on_plain=lambda grid, a, k: plain.append((grid, a, k)), on_run=runs.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda d: 77, raising=False)
    monkeypatch.delenv("LORA_KERNELS_TRITON_FAST_LAUNCH", raising=False)
    cl = launch.CachedLauncher(fake)
    assert cl.usable
    t, u = torch.zeros(64, dtype=torch.float16), torch.zeros(64, dtype=torch.uint8)
    assert t.data_ptr() % 16 == 0 and u.data_ptr() % 16 == 0
    cl(2, (t, u, 5, 1.5), {"BLOCK": 16}, {"num_warps": 4})          # new signature: plain launch
    assert plain == [((2,), (t, u, 5, 1.5), {"BLOCK": 16, "num_warps": 4})] and not runs
    cl(3, (t, u, 5, 2.5), {"BLOCK": 16}, {"num_warps": 4})          # fresh dicts, another float: cached
    assert len(plain) == 1 and len(runs) == 1
    assert runs[0][:9] == (3, 1, 1, 77, "function", "metadata", None, None, None)
    assert runs[0][9:13] == (t, u, 5, 2.5) and runs[0][13:] == (16,)
    misses = [((t, u, 6, 1.5), {"BLOCK": 16}),                        # an int's value
              ((t.float(), u, 5, 1.5), {"BLOCK": 16}),                # a tensor's dtype
              ((t, u[1:], 5, 1.5), {"BLOCK": 16}),                    # alignment (data_ptr % 16 == 1)
              ((t, u, 5, 1.5), {"BLOCK": 32})]                        # a constexpr
    for i, (args, cexpr) in enumerate(misses):
        cl(1, args, cexpr, {"num_warps": 4})
        assert len(plain) == 2 + i and len(runs) == 1 + i, i
        cl(1, args, cexpr, {"num_warps": 4})                          # now cached
        assert len(plain) == 2 + i and len(runs) == 2 + i, i
    assert len(cl.compiled) == 1 + len(misses)
    monkeypatch.setenv("LORA_KERNELS_TRITON_FAST_LAUNCH", "0")
    cl(2, (t, u, 5, 1.5), {"BLOCK": 16}, {"num_warps": 4})
    assert len(plain) == 2 + len(misses) and len(runs) == 1 + len(misses)
    monkeypatch.setenv("LORA_KERNELS_TRITON_FAST_LAUNCH", "1")
    monkeypatch.setattr(launch, "_hook_set", lambda h: True)          # a profiler's launch hook
    cl(2, (t, u, 5, 1.5), {"BLOCK": 16}, {"num_warps": 4})
    assert len(plain) == 3 + len(misses) and len(runs) == 1 + len(misses)


def test_launches_go_to_the_tensors_device(monkeypatch):
    """A model split over GPUs calls layers whose tensors are not on the current device; Triton
    launches on the current one.  The cached launcher (both its first, plain launch and its fast
    path) and ``device_guard`` switch to the first tensor's device around the launch and back --
    checked on the CPU with stand-ins for the device calls and a tensor that says it is on GPU 1."""
    launch = _launch_module()
    current = [0]
    seen = []

    class device:                                          # torch.cuda.device's protocol
        def __init__(self, idx):
            self.idx = idx

        def __enter__(self):
            self.prev, current[0] = current[0], self.idx

        def __exit__(self, *exc):
            current[0] = self.prev
            return False

    class OnGPU1(torch.Tensor):
        def get_device(self):
            return 1

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda d: 77, raising=False)
    monkeypatch.delenv("LORA_KERNELS_TRITON_FAST_LAUNCH", raising=False)
    t1 = torch.zeros(64).as_subclass(OnGPU1)
    cl = launch.CachedLauncher(_stand_in_kernel(launch, ["p", "n", "BLOCK"],
                                                on_plain=lambda grid, a, k: seen.append(("plain", current[0])),
                                                on_run=lambda a: seen.append(("fast", current[0]))))
    cl(1, (t1, 5), {"BLOCK": 16}, {"num_warps": 4})
    cl(1, (t1, 5), {"BLOCK": 16}, {"num_warps": 4})
    assert seen == [("plain", 1), ("fast", 1)] and current[0] == 0, seen
    t0 = torch.zeros(64)                                   # a CPU tensor (get_device() == -1): no switch
    cl(1, (t0, 5), {"BLOCK": 16}, {"num_warps": 4})
    assert seen[-1] == ("plain", 0)
    monkeypatch.setenv("LORA_KERNELS_TRITON_FAST_LAUNCH", "0")  # the plain path switches too
    cl(1, (t1, 5), {"BLOCK": 16}, {"num_warps": 4})
    assert seen[-1] == ("plain", 1) and current[0] == 0
    with launch.device_guard(t1):
        assert current[0] == 1
    assert current[0] == 0
    with launch.device_guard(t0):
        assert current[0] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_cached_launch_matches_plain_launch(monkeypatch):
    """The cached launcher (triton/launch.py) gives the plain ``kernel[grid]`` path's bits on every
    call: repeated calls, windows, other dtypes, a 2-byte-aligned A (a different specialisation
    that must not reuse the aligned kernel), a float scale that changes between calls."""
    from lora_kernels.triton import nf4_merge

    g, seed = _gen()
    weight, _, a, b, _ = _make(1000, 1024, 24, kind="nf4dq", g=g, lora_dtype=torch.bfloat16)
    a_buf = torch.empty(a.numel() + 1, dtype=a.dtype, device=a.device)
    a_odd = a_buf[1:].view(a.shape).copy_(a)                 # same values, data_ptr % 16 == 2
    assert a_odd.data_ptr() % 16 != 0
    cases = [(a, b, 2.0, torch.bfloat16, None, None), (a, b, 0.37, torch.bfloat16, (128, 640), (256, 768)),
             (a_odd, b, 2.0, torch.bfloat16, None, None), (a, b, 2.0, torch.float16, (0, 999), None),
             (a.float(), b.float(), 1.5, torch.bfloat16, None, (512, 1024)), (None, None, 1.0, torch.bfloat16, None, None)]
    launcher = nf4_merge._launch_merge
    for aa, bb, s, dt, rows, cols in cases:
        monkeypatch.setenv("LORA_KERNELS_TRITON_FAST_LAUNCH", "0")
        want = dequantize_merge(weight, aa, bb, s, dt, rows=rows, cols=cols)
        monkeypatch.setenv("LORA_KERNELS_TRITON_FAST_LAUNCH", "1")
        for _ in range(3):                                    # first call compiles / caches, then cached
            got = dequantize_merge(weight, aa, bb, s, dt, rows=rows, cols=cols, out=torch.full_like(want, float("nan")))
            assert torch.equal(got, want), f"seed={seed} {dt} rows={rows} cols={cols} s={s}"
    assert launcher.usable, "the installed triton's launcher protocol was not recognised (fast path off)"
    assert len(launcher.compiled) >= len(cases) - 1
