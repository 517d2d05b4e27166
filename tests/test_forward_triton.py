"""Fused LoRA / QLoRA forward (lora_kernels.triton.nf4_lora_matmul) against the float64 reference.

Criterion (design.md): the kernel's max-abs and relative-Frobenius errors against
``lora_linear_reference`` in float64 (on the exactly dequantized weight) are at most 2x the errors
of plain PyTorch computing the same formula in x's dtype (+ a tiny absolute epsilon).  Outputs
are poisoned with NaN first (``out=``), so an element the kernel never writes fails.

Without CUDA the kernels run under the Triton interpreter (fp16 only: the interpreter gets bf16
wrong), on small shapes with small tiles; ``gpu`` cases (bf16 + fp16, real sizes, every candidate
config) run on the GPU machine with ``pytest -m gpu``.  Each test draws fresh data from a seed
taken from os.urandom; the seed is printed and is in every assertion message.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import lora_kernels as lk  # noqa: E402
from lora_kernels.reference import lora_linear_reference  # noqa: E402
from lora_kernels.triton import nf4_lora_matmul as F  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _gen() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed), seed


def _make(M, N, K, r, *, dtype, kind, blocksize=64, bias=None, scale="scalar", g, device=DEVICE):
    """Random problem.  kind: "nf4dq" (double quant), "nf4" (single), "dense".  bias: None, "same"
    (x's dtype) or "fp32".  scale: "scalar", "vector" ([r] fp32) or "tensor0" (0-d fp32)."""
    w = torch.randn(N, K, generator=g) * (1.0 / K**0.5)
    w *= torch.exp2(torch.randint(-2, 3, (N, 1), generator=g).float())      # rows of varied scale
    if kind == "dense":
        weight = w.to(dtype).to(device)
        w_exact = weight.double()
    else:
        weight = lk.quantize_nf4(w.to(device), blocksize, double_quant=(kind == "nf4dq"))
        w_exact = weight.dequantize(torch.float32, backend="reference").double()
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    a = b = s = None
    if r:
        a = (torch.randn(r, K, generator=g) / K**0.5).to(dtype).to(device)
        b = (torch.randn(N, r, generator=g) * 0.5).to(dtype).to(device)
        if scale == "scalar":
            s = 2.0 / r
        elif scale == "vector":
            s = (torch.rand(r, generator=g) * 2).to(device)
            s[torch.rand(r, generator=g) < 0.25] = 0.0        # AdaLoRA-style pruned ranks
        else:
            s = torch.tensor(0.75, device=device)
    bt = None
    if bias is not None:
        bt = (torch.randn(N, generator=g) * 0.1).to(torch.float32 if bias == "fp32" else dtype).to(device)
    return x, weight, w_exact, a, b, s, bt


def _errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (y.double() - ref).reshape(-1)
    return d.abs().max().item(), (d.norm() / ref.reshape(-1).norm().clamp_min(1e-300)).item()


def _check(y, x, weight, w_exact, a, b, s, bias, msg):
    """y vs the float64 reference, against 2x plain PyTorch's own error in x's dtype."""
    assert not torch.isnan(y).any(), f"{msg}: NaN left in the output (unwritten elements?)"
    s64 = s.double() if isinstance(s, torch.Tensor) else s
    ref = lora_linear_reference(x.double(), w_exact, None if a is None else a.double(),
                                None if b is None else b.double(), s64,
                                None if bias is None else bias.double(), compute_dtype=torch.float64)
    w_low = weight if isinstance(weight, torch.Tensor) else weight.dequantize(x.dtype)
    base = lora_linear_reference(x, w_low, a, b, s, bias, compute_dtype=x.dtype)
    k_max, k_fro = _errors(y, ref)
    b_max, b_fro = _errors(base, ref)
    eps = 1e-6 * max(1.0, ref.abs().max().item())
    # plus one unit in the last place of y's dtype at the output's largest magnitude: both results
    # are rounded to that dtype at the end, and over a few hundred outputs the maximum is a noisy
    # statistic (one seed in thousands put ours at 2.1x PyTorch's 1-ulp maximum: 2 ulps vs 1)
    ulp = torch.finfo(y.dtype).eps * 2.0 ** math.floor(math.log2(max(ref.abs().max().item(), 1e-30)))
    assert k_max <= 2 * b_max + max(eps, ulp), f"{msg}: max-abs error {k_max:.3g} > 2 x PyTorch's {b_max:.3g}"
    assert k_fro <= 2 * b_fro + 1e-7, f"{msg}: rel-Frobenius error {k_fro:.3g} > 2 x PyTorch's {b_fro:.3g}"


def _run(M, N, K, r, *, dtype=torch.float16, kind="nf4dq", blocksize=64, bias=None, scale="scalar",
         route=None, config=None):
    g, seed = _gen()
    x, weight, w_exact, a, b, s, bt = _make(M, N, K, r, dtype=dtype, kind=kind, blocksize=blocksize,
                                            bias=bias, scale=scale, g=g)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    y = F.lora_matmul(x, weight, a, b, s if r else 1.0, bt, route=route, config=config, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype and y.shape == (M, N)
    msg = (f"seed={seed} M={M} N={N} K={K} r={r} {dtype} {kind} bs={blocksize} bias={bias} scale={scale} "
           f"route={route} config={config}")
    _check(y, x, weight, w_exact, a, b, s, bt, msg)


# ------------------------------------------------------------------------------------------------
# CPU / interpreter cases (fp16, small shapes, small tiles)
T16 = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
CASES = [
    # id, (M, N, K, r), kwargs
    ("tiled-M17-dq-bias", (17, 40, 128, 8), dict(route="tiled", bias="same", config=T16)),
    ("tiled-M33-single-vec-oddK", (33, 73, 192, 16),
     dict(route="tiled", kind="nf4", scale="vector", config=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128))),
    ("tiled-M3-dense-fp32bias-r1", (3, 40, 64, 1), dict(route="tiled", kind="dense", bias="fp32", config=T16)),
    ("tiled-M16-bs128-swap-select-r64", (16, 72, 128, 64),
     dict(route="tiled", blocksize=128, scale="vector",
          config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SWAP_AB=True, LUT="select", R_BLOCK=16))),
    ("tiled-M33-bs32-nolora", (33, 40, 192, 0),
     dict(route="tiled", blocksize=32, bias="same", config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128))),
    ("tiled-M17-default-config", (17, 40, 128, 8), dict(route="tiled", scale="tensor0")),
    ("gemv-M1-default-config", (1, 40, 128, 8), dict(route="gemv", bias="same")),
    ("gemv-M3-single-split3-vec", (3, 73, 192, 16),
     dict(route="gemv", kind="nf4", scale="vector", config=dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=3))),
    ("gemv-M16-dense-split2-r64", (16, 40, 64, 64),
     dict(route="gemv", kind="dense", bias="fp32", config=dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, R_BLOCK=16))),
    ("gemv-M1-fma-select-r1", (1, 72, 192, 1),
     dict(route="gemv", config=dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, USE_DOT=False, LUT="select"))),
    ("gemv-M2-fma-split2-bs32", (2, 40, 128, 16),
     dict(route="gemv", blocksize=32, bias="same", config=dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=2))),
    ("gemv-M16-fma-nosplit-r8", (16, 40, 128, 8),
     dict(route="gemv", bias="same", config=dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=1, USE_DOT=False))),
    ("gemv-M3-dot-nosplit-bs128-nolora", (3, 41, 128, 0),
     dict(route="gemv", blocksize=128, bias="same", config=dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=1, USE_DOT=True))),
    ("tiled-M65-group2-r256", (65, 40, 64, 256),
     dict(route="tiled", scale="vector", config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2))),
    ("gemv-M1-r256-split2", (1, 40, 128, 256), dict(route="gemv", config=dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2))),
    ("auto-M17-tiled", (17, 40, 64, 16), dict(kind="nf4", config=T16)),
    ("auto-M1-gemv", (1, 40, 64, 16), dict(kind="dense", config=dict(BLOCK_N=16, BLOCK_K=32))),
]


@pytest.mark.parametrize("shape,kw", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forward_small(shape, kw):
    _run(*shape, **kw)


@pytest.mark.parametrize("route", ["tiled", "gemv"])
def test_three_d_and_non_contiguous_x(route):
    g, seed = _gen()
    B_, S, N, K, r = 2, 3, 40, 128, 8
    _, weight, w_exact, a, b, s, bt = _make(6, N, K, r, dtype=torch.float16, kind="nf4dq", bias="same", g=g)
    cfg = T16 if route == "tiled" else dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)
    # 3-D x, flattened by the caller.
    x3 = torch.randn(B_, S, K, generator=g).half().to(DEVICE)
    y = F.lora_matmul(x3.reshape(-1, K), weight, a, b, s, bt, route=route, config=cfg).reshape(B_, S, N)
    _check(y, x3, weight, w_exact, a, b, s, bt, f"seed={seed} 3-D route={route}")
    # Non-contiguous x (every other column of a wider tensor, and a transposed view).
    wide = torch.randn(6, 2 * K, generator=g).half().to(DEVICE)
    xv = wide[:, ::2]
    assert not xv.is_contiguous()
    out = torch.full((6, N), float("nan"), dtype=torch.float16, device=DEVICE)
    y = F.lora_matmul(xv, weight, a, b, s, bt, route=route, config=cfg, out=out)
    _check(y, xv, weight, w_exact, a, b, s, bt, f"seed={seed} strided x route={route}")
    xt = torch.randn(K, 6, generator=g).half().to(DEVICE).t()
    y = F.lora_matmul(xt, weight, a, b, s, bt, route=route, config=cfg)
    _check(y, xt, weight, w_exact, a, b, s, bt, f"seed={seed} transposed x route={route}")


def test_empty_m():
    g, _ = _gen()
    x, weight, _, a, b, s, bt = _make(0, 40, 64, 8, dtype=torch.float16, kind="nf4dq", bias="same", g=g)
    assert F.lora_matmul(x, weight, a, b, s, bt).shape == (0, 40)


def test_routes_and_configs():
    assert F.pick_route(1, 4096, 4096) == "gemv" and F.pick_route(16, 64, 64) == "gemv"
    assert F.pick_route(17, 64, 64) == "tiled" and F.pick_route(4096, 4096, 4096) == "tiled"
    dev = torch.device("cuda") if HAS_CUDA else torch.device("cpu")
    for cap in ((8, 0), (8, 9), (9, 0)):
        for M, N, K in ((1, 4096, 4096), (16, 14336, 4096), (17, 4096, 4096), (100, 4096, 4096),
                        (4096, 4096, 14336)):
            cands = F.candidate_configs(M, N, K, cap)
            assert 6 <= len(cands) <= 10 and cands[0] == F.default_config(M, N, K, cap)
            assert len({tuple(sorted(c.items())) for c in cands}) == len(cands)
            route = F.pick_route(M, N, K)
            for c in cands:
                F._resolve_config(route, M, N, K, dev, c)      # every candidate is a valid override
    # >= 4 programs per SM for the decode shapes on an H100 (132 SMs).
    for N, K in ((4096, 4096), (14336, 4096), (4096, 14336)):
        split = F._auto_split_k(1, N, K, 64, 256, 132)
        assert triton.cdiv(N, 64) * split >= 2 * 132, (N, K, split)


def test_bad_input():
    g, _ = _gen()
    x, weight, _, a, b, s, bt = _make(4, 40, 128, 8, dtype=torch.float16, kind="nf4dq", bias="same", g=g)
    mm = F.lora_matmul
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mm(x.float(), weight, a, b, s, bt)
    with pytest.raises(ValueError, match="2-D"):
        mm(x[None], weight, a, b, s, bt)
    with pytest.raises(ValueError, match="lora_a must have"):
        mm(x, weight, a.float(), b, s, bt)
    with pytest.raises(ValueError, match="lora_b must have"):
        mm(x, weight, a, b.bfloat16(), s, bt)
    with pytest.raises(ValueError, match=r"lora_a must be \[r, K"):
        mm(x, weight, a[:, :64], b, s, bt)
    with pytest.raises(ValueError, match=r"lora_b must be \[N"):
        mm(x, weight, a, b[:, :4], s, bt)
    with pytest.raises(ValueError, match="lora_b is None"):
        mm(x, weight, a, None, s, bt)
    big_a = torch.zeros(257, 128, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="rank"):
        mm(x, weight, big_a, torch.zeros(40, 257, dtype=torch.float16, device=DEVICE), s, bt)
    with pytest.raises(ValueError, match="bias must be"):
        mm(x, weight, a, b, s, bt[:8])
    with pytest.raises(ValueError, match="bias must be"):
        mm(x, weight, a, b, s, bt.double())
    with pytest.raises(ValueError, match="scale must be"):
        mm(x, weight, a, b, torch.ones(3, device=DEVICE), bt)
    with pytest.raises(ValueError, match="K=64 columns"):
        mm(x[:, :64], weight, a, b, s, bt)
    with pytest.raises(ValueError, match="dtype"):
        mm(x, torch.zeros(40, 128, dtype=torch.bfloat16, device=DEVICE), a, b, s, bt)
    with pytest.raises(ValueError, match="route 'gemv' needs M <= 16"):
        mm(torch.zeros(17, 128, dtype=torch.float16, device=DEVICE), weight, a, b, s, bt, route="gemv")
    with pytest.raises(ValueError, match="route must be"):
        mm(x, weight, a, b, s, bt, route="fast")
    with pytest.raises(ValueError, match="unknown config key"):
        mm(x, weight, a, b, s, bt, route="tiled", config=dict(BLOCK_X=4))
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        mm(x, weight, a, b, s, bt, route="gemv", config=dict(BLOCK_N=24))
    with pytest.raises(ValueError, match="out must be"):
        mm(x, weight, a, b, s, bt, out=torch.empty(4, 41, dtype=torch.float16, device=DEVICE))
    # K not a multiple of the blocksize: the caller must use the fallback.
    w96 = lk.quantize_nf4(torch.randn(8, 96, generator=g).to(DEVICE), 64)
    with pytest.raises(ValueError, match="fallback"):
        mm(torch.zeros(2, 96, dtype=torch.float16, device=DEVICE), w96, None, None, 1.0, None)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="is on"):
            mm(x, weight, a.cpu(), b, s, bt)
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            os.environ["TRITON_INTERPRET"] = "0"
            try:
                mm(x, weight, a, b, s, bt)
            finally:
                os.environ["TRITON_INTERPRET"] = "1"


# ------------------------------------------------------------------------------------------------
# GPU cases
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
RANKS = (1, 8, 16, 64, 128, 256)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,route", [(M, route) for M in (1, 3, 16, 17, 100, 4096)
                                     for route in ("auto", "tiled", "gemv")
                                     if route != "gemv" or M <= F.GEMV_MAX_M])  # gemv: M <= 16 only
@pytest.mark.parametrize("NK", [(4096, 4096), (1000, 768)], ids=["4096x4096", "1000x768"])
def test_gpu_forward(dtype, M, route, NK):
    N, K = NK
    r = RANKS[(M + len(route)) % len(RANKS)]
    _run(M, N, K, r, dtype=dtype, kind="nf4dq", bias="same", scale="vector" if M % 2 else "scalar",
         route=None if route == "auto" else route)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("M", [3, 100])
@pytest.mark.parametrize("kind", ["nf4dq", "nf4", "dense"])
def test_gpu_ranks_and_kinds(dtype, r, M, kind):
    _run(M, 2048, 1024, r, dtype=dtype, kind=kind, bias="fp32" if r > 64 else None,
         scale="vector" if r % 2 == 0 else "scalar")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 16, 4096])
@pytest.mark.parametrize("NK", [(14336, 4096), (4096, 14336)], ids=["4096to14336", "14336to4096"])
def test_gpu_mlp_shapes(dtype, M, NK):
    _run(M, NK[0], NK[1], 16, dtype=dtype, kind="nf4dq", bias=None)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 16, 100, 2048])
def test_gpu_every_candidate_config(M):
    N, K = 4096, 4096
    cap = torch.cuda.get_device_capability()
    for cfg in F.candidate_configs(M, N, K, cap):
        _run(M, N, K, 64, dtype=torch.bfloat16, kind="nf4dq", bias="same", scale="vector",
             route=F.pick_route(M, N, K), config=cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [16, 512])
def test_gpu_dense_weight_never_materialized(M):
    """Peak extra memory of one call stays far below the dense bf16 weight (N*K*2 bytes)."""
    g, seed = _gen()
    N, K = 14336, 4096
    x, weight, _, a, b, s, bt = _make(M, N, K, 16, dtype=torch.bfloat16, kind="nf4dq", g=g)
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    F.lora_matmul(x, weight, a, b, s, bt, out=out)          # warm up (compile)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    F.lora_matmul(x, weight, a, b, s, bt, out=out)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < N * K * 2 // 16, f"seed={seed}: {extra} extra bytes (dense weight would be {N * K * 2})"
