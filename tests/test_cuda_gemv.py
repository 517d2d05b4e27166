"""The CUDA C++ decode kernels (route "cuda-gemv") against a float64 reference: every M in 1..16,
odd N, r from 1 to 256, blocksizes 64..4096, with and without double quantization, bias of x's
dtype / fp32 / none, scalar and per-rank scale, bf16 and fp16.  Every correctness test runs for
kernel variants (the ``variant`` fixture sets LORA_KERNELS_GEMV_VARIANT, read by
lora_kernels.library._cuda_gemv): 1 = csrc/cuda/nf4_gemv.cu, 2 = csrc/cuda/nf4_gemv_v2.cu,
3 = csrc/cuda/nf4_gemv_v3.cu (run with LORA_KERNELS_GEMV_V3_MAX_M=8, so every M it is built for is
tested; larger M falls back to variant 1), 4 = csrc/cuda/nf4_gemv_v4.cu (every M <= 16), 5 = csrc/cuda/nf4_gemv_v5.cu (M <= 16 where K % 256 == 0 and x fits
its shared memory whole or per K slice, see _v5_runs; elsewhere it falls back to variant 1).
Error rule: at most 2x the error of PyTorch computing the same formula in x's dtype.
The output is allocated by the extension, so the caching allocator is first filled with NaN
("poisoned"): an element the kernel fails to write comes back NaN.
GPU only; on the CPU this file checks that the route is never chosen."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import lora_kernels as lk
from lora_kernels import _ext
from lora_kernels.reference import lora_linear_reference

from .conftest import HAS_CUDA, randn

gpu = pytest.mark.gpu


def _ext_or_skip():
    ext = _ext.cuda_ext()
    if ext is None or not hasattr(ext, "lora_gemv"):
        pytest.skip("lora_kernels._C_cuda with lora_gemv is not built")
    return ext


V3_MAX_M = 8   # rows of x variant 3 is built for (csrc/cuda/nf4_gemv.h kV3MaxM); its default limit is 4


@pytest.fixture(params=[1, 2, 3, 4, 5], ids=["v1", "v2", "v3", "v4", "v5"])
def variant(request, monkeypatch):
    """Runs the test once per kernel variant (variants 2-5 must really run where they take the sizes)."""
    ext = _ext.cuda_ext()
    if request.param in (4, 5) and ext is not None and hasattr(ext, "lora_gemv"):
        _require_variant(ext, request.param)
    monkeypatch.setenv("LORA_KERNELS_GEMV_VARIANT", str(request.param))
    if request.param == 3:
        monkeypatch.setenv("LORA_KERNELS_GEMV_V3_MAX_M", str(V3_MAX_M))
    return request.param


def _require_variant(ext, v):
    """setup.py builds every csrc/cuda/*.cu into the extension, so a build of this tree has every
    variant's planner binding; one without it is stale (built from older sources)."""
    assert lk.library.gemv_variant_built(v), \
        f"lora_kernels._C_cuda has no planner binding for variant {v}: a stale build; rebuild it"


V5_MAX_M = 16           # csrc/cuda/nf4_gemv.h kV5MaxM (two n8 MMA tiles of x above 8)
V5_FIXED_SMEM = 65536 + 1024 + 16 * 4 * 1216   # table, nested code, 16 warps x 4 stages (nf4_gemv_v5.cu)


def _device_smem_optin():
    """(the current device's properties, its opt-in shared memory per block); skips where this torch
    does not report the latter."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:
        pytest.skip("this torch does not report the opt-in shared memory per block")
    return props, optin


def _v5_limits(M, K, N, bs, dq):
    """(M <= 16, K % 256 == 0, blocksize >= 64, the absmax words / pairs inside the tensor) and the
    device's opt-in shared memory per block."""
    blocks = N * (K // bs)
    _, optin = _device_smem_optin()
    return (M <= V5_MAX_M and K % 256 == 0 and bs >= 64 and blocks % (4 if dq else 2) == 0), optin


def _v5_whole(M, K, N, bs, dq=True):
    """Whether variant 5 takes these sizes with all of x in shared memory (mode 1:
    M · (2K + 16) bytes of x beside the fixed shared memory)."""
    ok, optin = _v5_limits(M, K, N, bs, dq)
    return ok and V5_FIXED_SMEM + M * (2 * K + 16) <= optin


def _v5_runs(M, K, N, bs, dq=True):
    """Whether variant 5 should take these sizes, from its documented limits (nf4_gemv_v5.cu): all of
    x in shared memory (_v5_whole), else x per CTA's K slices where some slice count fits (its planner,
    mirrored in test_gemv_v5_layout.plan)."""
    from .test_gemv_v5_layout import plan

    ok, optin = _v5_limits(M, K, N, bs, dq)
    if not ok:
        return False
    props, _ = _device_smem_optin()
    return _v5_whole(M, K, N, bs, dq) or plan(M, N, K, props.multi_processor_count, optin) is not None


def _supported(v, M, K, N, r, bs):
    """lora_gemv_v{v}_supported (v = 3 or 4): whether variant v runs these sizes itself."""
    ext = _ext_or_skip()
    _require_variant(ext, v)
    return getattr(ext, f"lora_gemv_v{v}_supported")(M, N, K, bs, r)


def _assert_runs(variant, M, K, N, r, bs, dq=True):
    """Variants 2, 3 and 4 must run these sizes themselves (variant 3 for M <= V3_MAX_M; above that it
    falls back to variant 1 by design, which the v1 cases test; variant 4 for every M <= 16); variant 5
    exactly where _v5_runs says (its planner must agree with its documented limits)."""
    if variant == 2:
        ws = _ext_or_skip().lora_gemv_v2_workspace(M, N, K, bs, r)
        assert ws >= 0, f"variant 2 would fall back to variant 1 for M={M} K={K} N={N} r={r} bs={bs}"
    if variant == 3 and M <= V3_MAX_M:
        assert _supported(3, M, K, N, r, bs), \
            f"variant 3 would fall back to variant 1 for M={M} K={K} N={N} r={r} bs={bs}"
    if variant == 4 and M <= 16:
        assert _supported(4, M, K, N, r, bs), \
            f"variant 4 would fall back to variant 1 for M={M} K={K} N={N} r={r} bs={bs}"
    if variant == 5:
        ext = _ext_or_skip()
        _require_variant(ext, 5)
        assert (ext.lora_gemv_v5_slices(M, N, K, bs, r, dq) > 0) == _v5_runs(M, K, N, bs, dq), \
            f"variant 5's planner disagrees with its limits for M={M} K={K} N={N} r={r} bs={bs} dq={dq}"


def _skip_v3_above_max_m(variant, M):
    if variant == 3 and M > V3_MAX_M:
        pytest.skip(f"variant 3 is built for M <= {V3_MAX_M} (CUDA-core FMAs grow with M); M={M} falls "
                    "back to variant 1, which the v1 case tests")


def _poison_allocator(nbytes: int) -> None:
    blocks = [torch.full((max(nbytes // 2, 1) + 4096,), float("nan"), dtype=torch.bfloat16, device="cuda")
              for _ in range(4)]
    del blocks


def _case(M, K, N, r, dtype, gen, *, bs=64, dq=True, bias="dtype", vec=False, lead=()):
    W = randn((N, K), torch.float32, gen, scale=0.05)
    q = lk.quantize_nf4(W.cuda(), blocksize=bs, double_quant=dq)
    x = randn((*lead, M, K), dtype, gen, device="cuda")
    A = randn((r, K), dtype, gen, device="cuda", scale=0.05) if r else None
    B = randn((N, r), dtype, gen, device="cuda", scale=0.05) if r else None
    s = (torch.rand(r, generator=gen) + 0.5).cuda() if vec and r else 1.7
    b = None if bias is None else randn((N,), dtype if bias == "dtype" else torch.float32, gen, device="cuda")
    return x, q, A, B, s, b


def _check(x, q, A, B, s, b):
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    dense = q.dequantize(torch.float32).double()
    ref = lora_linear_reference(x2.double(), dense, None if A is None else A.double(),
                                None if B is None else B.double(),
                                s.double() if isinstance(s, torch.Tensor) else s,
                                None if b is None else b.double(), torch.float64)
    _poison_allocator(x2.shape[0] * q.shape[0] * 2)
    y = lk.lora_linear(x, q, A, B, s, b, route="cuda-gemv")
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], q.shape[0])
    y2 = y.reshape(-1, q.shape[0]).double()
    assert torch.isfinite(y2).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    dq = q.dequantize(x.dtype)
    torch_y = torch.nn.functional.linear(x2, dq, None if b is None else b.to(x.dtype))
    if A is not None:
        t = (x2 @ A.t()) * (s.to(x.dtype) if isinstance(s, torch.Tensor) else s)
        torch_y = torch_y + t @ B.t()
    err = ((y2 - ref).norm() / ref.norm()).item()
    err_torch = ((torch_y.double() - ref).norm() / ref.norm()).item()
    if y2.numel() < 64:
        # a handful of outputs (session 18: N = 5, M = 1 gave 0.0047 against torch's lucky 0.0020):
        # a norm over so few roundings is noise, so torch's error is floored at one unit roundoff
        err_torch = max(err_torch, torch.finfo(x.dtype).eps / 2)
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)
    return y


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M", list(range(1, 17)))
def test_every_m(M, dtype, variant, rng):
    _ext_or_skip()
    _skip_v3_above_max_m(variant, M)
    for K, N, r in ((4096, 4096 + 8 + 3, 16), (1024, 333, 1), (512, 14336 // 4 + 5, 64)):
        _assert_runs(variant, M, K, N, r, 64)
        _check(*_case(M, K, N, r, dtype, rng))


@gpu
@pytest.mark.parametrize("r", [0, 1, 8, 16, 33, 64, 128, 256])
def test_ranks_bias_scale(r, variant, rng):
    _ext_or_skip()
    _assert_runs(variant, 5, 768, 1000, r, 64)
    for bias, vec in (("dtype", False), ("fp32", True), (None, False)):
        _check(*_case(5, 768, 1000, r, torch.bfloat16, rng, bias=bias, vec=vec))


@gpu
@pytest.mark.parametrize("bs", [64, 128, 256, 512, 1024, 4096])
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "plain"])
def test_blocksizes_and_double_quant(bs, dq, variant, rng):
    _ext_or_skip()
    _assert_runs(variant, 3, 4096, 517, 8, bs, dq)
    _assert_runs(variant, 16, 8192, 64, 8, bs, dq)
    _check(*_case(3, 4096, 517, 8, torch.float16, rng, bs=bs, dq=dq))
    _check(*_case(16, 8192, 64, 8, torch.bfloat16, rng, bs=bs, dq=dq))


@gpu
def test_big_shapes_and_3d(variant, rng):
    _ext_or_skip()
    for K, N in ((4096, 14336), (14336, 4096), (8192, 28672)):
        _assert_runs(variant, 1, K, N, 16, 64)
        _assert_runs(variant, 16, K, N, 16, 64)
        _check(*_case(1, K, N, 16, torch.bfloat16, rng))
        _check(*_case(16, K, N, 16, torch.bfloat16, rng))
        if variant in (3, 4, 5):   # K split over CTAs / slices + the finish kernel (v5: M = 8 fits only K = 4096)
            _assert_runs(variant, 8, K, N, 16, 64)
            _check(*_case(8, K, N, 16, torch.bfloat16, rng))
    _check(*_case(4, 4096, 1024, 16, torch.bfloat16, rng, lead=(2,)))   # x [2, 4, K]: M = 8


@gpu
def test_non_contiguous_and_misaligned_x(variant, rng):
    _ext_or_skip()
    x, q, A, B, s, b = _case(3, 1024, 300, 8, torch.bfloat16, rng)
    wide = randn((3, 2048), torch.bfloat16, rng, device="cuda")
    xs = wide[:, ::2]                                       # non-contiguous
    flat = torch.empty(3 * 1024 + 1, dtype=torch.bfloat16, device="cuda")
    xm = flat[1:].view(3, 1024)                             # contiguous but 2 bytes off alignment
    xm.copy_(x)
    y_ref = lk.lora_linear(x, q, A, B, s, b, route="cuda-gemv")
    assert torch.equal(lk.lora_linear(xm, q, A, B, s, b, route="cuda-gemv"), y_ref)
    _check(xs, q, A, B, s, b)


@gpu
def test_binding_takes_nd_x_stored_packed_and_misaligned_operands(variant, rng):
    """The raw binding reads x [..., K] as [M, K] and returns [..., N], takes the packed weight in
    its stored shape (bitsandbytes' [N K / 2, 1]), and copies an x or A that is not 16-byte aligned
    (the decode fast path passes them as they come), and reads a B that is not 16-byte aligned entry by
    entry: each the same bits as the plain 2-D call."""
    ext = _ext_or_skip()
    K, N = 1024, 300
    x, q, A, B, s, b = _case(4, K, N, 8, torch.bfloat16, rng, lead=(2,))      # x [2, 4, K]: M = 8
    w = (q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, N, 64)
    flat = q.packed.reshape(-1)
    assert q.packed.dim() == 2, "NF4Weight keeps bitsandbytes' [N K / 2, 1] packed shape"
    base = ext.lora_gemv(x.reshape(8, K), flat, *w, A, B, s, None, b, variant)
    y3 = ext.lora_gemv(x, q.packed, *w, A, B, s, None, b, variant)
    assert y3.shape == (2, 4, N) and torch.equal(y3.reshape(8, N), base)
    y1 = ext.lora_gemv(x[0, 0], q.packed, *w, A, B, s, None, b, variant)       # x [K]: y [N]
    assert y1.shape == (N,) and torch.equal(y1, ext.lora_gemv(x[0, :1], flat, *w, A, B, s, None, b, variant)[0])
    xbuf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    xm = xbuf[1:].view_as(x)                                                    # 2 bytes off alignment
    xm.copy_(x)
    abuf = torch.empty(A.numel() + 3, dtype=A.dtype, device="cuda")
    am = abuf[3:].view_as(A)
    am.copy_(A)
    assert xm.data_ptr() % 16 and am.data_ptr() % 16
    assert torch.equal(ext.lora_gemv(xm, q.packed, *w, am, B, s, None, b, variant), y3)
    bbuf = torch.empty(B.numel() + 1, dtype=B.dtype, device="cuda")
    bm = bbuf[1:].view_as(B)       # B not 16-byte aligned: its rows are read one entry per load, not 8
    bm.copy_(B)
    assert bm.data_ptr() % 16 and B.data_ptr() % 16 == 0
    assert torch.equal(ext.lora_gemv(x, q.packed, *w, A, bm, s, None, b, variant), y3)


@gpu
def test_matches_triton_gemv_closely(variant, rng):
    _ext_or_skip()
    x, q, A, B, s, b = _case(7, 4096, 4096, 16, torch.float16, rng)
    y = lk.lora_linear(x, q, A, B, s, b, route="cuda-gemv").float()
    y2 = lk.lora_linear(x, q, A, B, s, b, route="triton-gemv").float()
    assert ((y - y2).norm() / y2.norm()).item() < 2e-3


@gpu
def test_route_choice(rng):
    _ext_or_skip()
    x, q, A, B, s, b = _case(16, 256, 64, 8, torch.bfloat16, rng)
    assert lk.forward_route(16, q, torch.bfloat16, x.device) == "cuda-gemv"
    assert lk.forward_route(17, q, torch.bfloat16, x.device) == "merge-cublas"
    q32 = lk.quantize_nf4(torch.randn(64, 256, device="cuda"), blocksize=32)
    assert lk.forward_route(1, q32, torch.bfloat16, x.device) == "triton-gemv"     # blocksize 32
    assert lk.forward_route(1, q.dequantize(), torch.bfloat16, x.device) == "triton-gemv"   # dense base
    with pytest.raises(ValueError, match="cuda-gemv"):
        lk.lora_linear(x, q32, route="cuda-gemv")
    with pytest.raises(ValueError, match="cuda-gemv"):
        lk.lora_linear(torch.zeros(17, 256, dtype=torch.bfloat16, device="cuda"), q, route="cuda-gemv")


@gpu
@pytest.mark.parametrize("M", [1, 7, 16])
def test_variants_agree(M, rng, monkeypatch):
    """The kernels on the same inputs: same math, only the fp32 summation order differs (variant 3
    for M <= V3_MAX_M; at M = 16 it falls back to variant 1)."""
    ext = _ext_or_skip()
    monkeypatch.setenv("LORA_KERNELS_GEMV_V3_MAX_M", str(V3_MAX_M))
    for K, N, r, bs in ((4096, 14336, 16, 64), (14336, 4096, 16, 64), (2048, 1000, 0, 128)):
        x, q, A, B, s, b = _case(M, K, N, r, torch.bfloat16, rng, bs=bs)
        nested = q.double_quant
        args = (x, q.packed.view(-1), q.absmax, q.nested_absmax if nested else None,
                q.nested_code if nested else None, q.offset if nested else None, q.code, N, q.blocksize, A, B,
                1.7, None, b)
        y1 = ext.lora_gemv(*args, variant=1).float()
        y2 = ext.lora_gemv(*args, variant=2).float()
        assert torch.isfinite(y2).all()
        assert ((y1 - y2).norm() / y1.norm()).item() < 2e-3
        if hasattr(ext, "lora_gemv_v3_supported"):
            if M <= V3_MAX_M:
                assert ext.lora_gemv_v3_supported(M, N, K, bs, r)
            y3 = ext.lora_gemv(*args, variant=3).float()
            assert torch.isfinite(y3).all()
            assert ((y1 - y3).norm() / y1.norm()).item() < 2e-3
        if hasattr(ext, "lora_gemv_v4_supported"):
            assert ext.lora_gemv_v4_supported(M, N, K, bs, r)
            y4 = ext.lora_gemv(*args, variant=4).float()
            assert torch.isfinite(y4).all()
            assert ((y1 - y4).norm() / y1.norm()).item() < 2e-3
        if hasattr(ext, "lora_gemv_v5_slices"):
            assert (ext.lora_gemv_v5_slices(M, N, K, bs, r) > 0) == _v5_runs(M, K, N, bs)
            y5 = ext.lora_gemv(*args, variant=5).float()
            assert torch.isfinite(y5).all()
            assert ((y1 - y5).norm() / y1.norm()).item() < 2e-3


@gpu
def test_v2_repeated_calls_and_graph_replay(rng, monkeypatch):
    """Variant 2 synchronizes its CTAs through flags in its workspace (T = x·Aᵀ is produced by the
    first CTAs and read by all at their end) and leaves them clean for the next call: many eager
    calls, calls of other shapes in between, and CUDA-graph replays (same workspace, same epoch) with
    new inputs must all be right."""
    _ext_or_skip()
    monkeypatch.setenv("LORA_KERNELS_GEMV_VARIANT", "2")
    cases = [_case(1, 4096, 4096, 16, torch.bfloat16, rng), _case(9, 1024, 3000, 64, torch.float16, rng, vec=True)]
    for _ in range(3):
        for c in cases:
            _check(*c)
    _check_graph_replays(cases[0], rng, 4)


def _check_graph_replays(case, rng, replays):
    """Capture one cuda-gemv call in a CUDA graph, replay it on fresh x: equal to the eager call
    (same variant) and right against the reference every time."""
    x, q, A, B, s, b = case
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        lk.lora_linear(static_x, q, A, B, s, b, route="cuda-gemv")  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = lk.lora_linear(static_x, q, A, B, s, b, route="cuda-gemv")
    for _ in range(replays):
        static_x.copy_(randn(tuple(x.shape), x.dtype, rng, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        expect = lk.lora_linear(static_x, q, A, B, s, b, route="cuda-gemv")   # eager, same variant
        assert torch.equal(static_y, expect)
        _check(static_x, q, A, B, s, b)


@gpu
@pytest.mark.parametrize("pdl", ["1", "0"], ids=["pdl", "nopdl"])
def test_v3_repeated_calls_and_graph_replay(pdl, rng, monkeypatch):
    """Variant 3 chains up to three kernels (T = x·Aᵀ, the GEMV as a programmatic dependent launch,
    the finish kernel that sums the K slices): eager calls of several shapes in turn and CUDA-graph
    replays with new inputs must all be right, with and without programmatic dependent launch."""
    _ext_or_skip()
    monkeypatch.setenv("LORA_KERNELS_GEMV_VARIANT", "3")
    monkeypatch.setenv("LORA_KERNELS_GEMV_V3_MAX_M", str(V3_MAX_M))
    monkeypatch.setenv("LORA_KERNELS_GEMV_V3_PDL", pdl)
    cases = [(1, 4096, 4096, 16), (1, 4096, 14336, 0), (3, 14336, 1024, 64), (8, 8192, 300, 8)]
    for M, K, N, r in cases:
        _assert_runs(3, M, K, N, r, 64)
    made = [_case(M, K, N, r, torch.bfloat16, rng, vec=(M == 3)) for M, K, N, r in cases]
    for _ in range(2):
        for c in made:
            _check(*c)
    for case in (made[0], made[2]):
        _check_graph_replays(case, rng, 3)


@gpu
@pytest.mark.parametrize("pdl", ["1", "0"], ids=["pdl", "nopdl"])
def test_v4_repeated_calls_and_graph_replay(pdl, rng, monkeypatch):
    """Variant 4 chains up to three kernels (T = x·Aᵀ, the persistent GEMV as a programmatic dependent
    launch, the finish kernel when K is split into slices: M = 16 with K = 8192 on an H100): eager calls
    of several shapes in turn and CUDA-graph replays with new inputs must all be right, with and without
    programmatic dependent launch."""
    _ext_or_skip()
    monkeypatch.setenv("LORA_KERNELS_GEMV_VARIANT", "4")
    monkeypatch.setenv("LORA_KERNELS_GEMV_V4_PDL", pdl)
    cases = [(1, 4096, 4096, 16), (16, 8192, 1000, 16), (5, 14336, 300, 0), (12, 1024, 333, 64)]
    for M, K, N, r in cases:
        _assert_runs(4, M, K, N, r, 64)
    made = [_case(M, K, N, r, torch.bfloat16, rng, vec=(M == 12)) for M, K, N, r in cases]
    for _ in range(2):
        for c in made:
            _check(*c)
    for case in (made[0], made[1]):
        _check_graph_replays(case, rng, 3)


@gpu
@pytest.mark.parametrize("pdl", ["1", "0"], ids=["pdl", "nopdl"])
def test_v5_repeated_calls_and_graph_replay(pdl, rng, monkeypatch):
    """Variant 5 runs the persistent GEMV (with the pieces of T = x·Aᵀ inside it) and, with partials
    (K split into slices, or a low-rank term), the finish kernel as its programmatic dependent, and
    reuses its shared-memory ring across a warp's units: eager calls of several shapes in turn (one
    slice and several, with and without the low-rank term) and CUDA-graph replays with new inputs must
    all be right, with and without programmatic dependent launch."""
    ext = _ext_or_skip()
    _require_variant(ext, 5)
    monkeypatch.setenv("LORA_KERNELS_GEMV_VARIANT", "5")
    monkeypatch.setenv("LORA_KERNELS_GEMV_V5_PDL", pdl)
    cases = [(2, 256, 80000, 8), (1, 4096, 4096, 16), (1, 4096, 14336, 0), (3, 14336, 1024, 64), (8, 2048, 300, 8),
             (1, 256, 5, 0)]
    for M, K, N, r in cases:
        _assert_runs(5, M, K, N, r, 64)
    assert ext.lora_gemv_v5_slices(1, 5, 256, 64, 0) == 1          # no partials: y stored by the GEMV itself
    assert ext.lora_gemv_v5_slices(2, 80000, 256, 64, 8) == 1      # one slice of partials + T, then the finish
    assert ext.lora_gemv_v5_slices(1, 4096, 4096, 64, 16) > 1      # several slices + T, then the finish
    made = [_case(M, K, N, r, torch.bfloat16, rng, vec=(M == 3)) for M, K, N, r in cases]
    for _ in range(2):
        for c in made:
            _check(*c)
    for case in (made[0], made[1], made[3]):
        _check_graph_replays(case, rng, 3)


def _v5_forced(monkeypatch, switch):
    """The extension (with variant 5); variant 5 forced and its A/B `switch` ($LORA_KERNELS_GEMV_V5_...)
    unset."""
    ext = _ext_or_skip()
    _require_variant(ext, 5)
    monkeypatch.setenv("LORA_KERNELS_GEMV_VARIANT", "5")
    monkeypatch.delenv(switch, raising=False)
    return ext


@gpu
def test_v5_modes_and_sliced_x(rng, monkeypatch):
    """Variant 5 holds all of x in shared memory where it fits (mode 1) and
    otherwise stages each CTA's K slices (mode 2: M >= 4 at K = 14336, M = 9..16): the planner agrees
    with test_gemv_v5_layout.plan, the dispatcher is told variant 5 takes the sizes in either mode, and
    mode 2 is right eagerly and under graph replay."""
    ext = _v5_forced(monkeypatch, "LORA_KERNELS_GEMV_V5_STAGES")
    from lora_kernels.library import gemv_v5_takes

    from .test_gemv_v5_layout import plan

    props, optin = _device_smem_optin()
    cases = [(1, 4096, 14336, 16), (4, 14336, 4096, 16), (16, 4096, 14336, 16), (12, 4096, 1000, 8),
             (16, 14336, 4096, 0), (9, 8192, 600, 64)]
    for M, K, N, r in cases:
        want = plan(M, N, K, props.multi_processor_count, optin, has_lora=r > 0)
        mode = ext.lora_gemv_v5_mode(M, N, K, 64, r)
        assert mode == (0 if want is None else 2 if want["slice_major"] else 1), (M, K, N, r)
        if want is not None:
            assert ext.lora_gemv_v5_slices(M, N, K, 64, r) == want["S"], (M, K, N, r)
        assert gemv_v5_takes(M, N, K, 64, r > 0, True) == (mode > 0)
    made = [_case(M, K, N, r, torch.bfloat16, rng, vec=(M == 12)) for M, K, N, r in cases]
    for c in made:
        _check(*c)
    for case in (made[1], made[2]):
        _check_graph_replays(case, rng, 2)


@gpu
def test_v5_deep_ring_opt_in(rng, monkeypatch):
    """$LORA_KERNELS_GEMV_V5_STAGES=6 (an A/B switch) gives variant 5 a 6-stage ring per warp where x
    still fits beside it, else the default 4 stages: both right, eagerly and under graph replay."""
    ext = _v5_forced(monkeypatch, "LORA_KERNELS_GEMV_V5_STAGES")
    assert ext.lora_gemv_v5_stages(1, 14336, 4096, 64, 16) == 4
    monkeypatch.setenv("LORA_KERNELS_GEMV_V5_STAGES", "6")
    _, optin = _device_smem_optin()
    deep_fixed = 65536 + 1024 + 16 * 6 * 1216
    cases = [(1, 4096, 14336, 16), (5, 4096, 300, 8), (1, 14336, 4096, 0), (8, 4096, 1000, 16), (2, 256, 80000, 8)]
    for M, K, N, r in cases:
        _assert_runs(5, M, K, N, r, 64)
        want = 6 if deep_fixed + M * (2 * K + 16) <= optin else 4
        assert ext.lora_gemv_v5_stages(M, N, K, 64, r) == want, (M, K, N, r)
    made = [_case(M, K, N, r, torch.bfloat16, rng) for M, K, N, r in cases]
    for c in made:
        _check(*c)
    for case in (made[0], made[1]):
        _check_graph_replays(case, rng, 2)


@gpu
def test_v5_piece_maps_same_bits(rng, monkeypatch):
    """Variant 5's two maps of the T pieces with x per K slice -- each slice's CTAs' warps in warp order
    ($LORA_KERNELS_GEMV_V5_PIECES=slot) or their light warps first (=light; the default where K <= 8192)
    -- compute every piece once, by a warp that holds its slice's x, in the same order: y has the same
    bits either way (and is right); whole-x calls and calls without LoRA ignore the switch."""
    _v5_forced(monkeypatch, "LORA_KERNELS_GEMV_V5_PIECES")
    cases = [(4, 14336, 4096, 16), (16, 4096, 14336, 16), (9, 8192, 600, 64), (12, 4096, 1000, 8), (1, 4096, 14336, 16)]
    for M, K, N, r in cases:
        _assert_runs(5, M, K, N, r, 64)
    made = [_case(M, K, N, r, torch.bfloat16, rng, vec=(M == 12)) for M, K, N, r in cases]
    ys = [lk.lora_linear(*c, route="cuda-gemv") for c in made]  # the default map
    for pieces in ("slot", "light"):
        monkeypatch.setenv("LORA_KERNELS_GEMV_V5_PIECES", pieces)
        for (M, K, N, r), c, y in zip(cases, made, ys):
            assert torch.equal(lk.lora_linear(*c, route="cuda-gemv"), y), (pieces, M, K, N, r)
            _check(*c)
    _check_graph_replays(made[1], rng, 2)


@gpu
def test_v5_finish_prefetch_same_bits(rng, monkeypatch):
    """Variant 5's finish kernel requests row n of B (r <= 32, r % 8 == 0, 16-byte aligned B), the bias
    and the slice partials before the T sums; $LORA_KERNELS_GEMV_V5_FINISH=plain reads them in the old
    order.  The same operations in the same order: the same bits, for ranks it prefetches (8, 16, 32)
    and those it does not (12, 40, 64, a misaligned B), bias in the dtype or fp32 or none, M · N not a
    multiple of the finish kernel's 256 threads, and right against the reference."""
    _v5_forced(monkeypatch, "LORA_KERNELS_GEMV_V5_FINISH")
    cases = [(16, 4096, 14336, 16, "dtype"), (1, 4096, 14336, 32, None), (9, 8192, 600, 8, "fp32"),
             (12, 4096, 1000, 12, "dtype"), (3, 4096, 3000, 40, None), (16, 14336, 4096, 64, "dtype"),
             (5, 4096, 1000, 0, "dtype"), (7, 4096, 1000, 16, "misaligned")]
    made = []
    for M, K, N, r, bias in cases:
        _assert_runs(5, M, K, N, r, 64)
        c = list(_case(M, K, N, r, torch.bfloat16, rng, bias=None if bias in (None, "misaligned") else bias))
        if bias == "misaligned":  # B's rows start 2 bytes into a buffer: not 16-byte aligned
            Bm = torch.empty(N * r + 1, dtype=c[3].dtype, device="cuda")[1:].view(N, r)
            Bm.copy_(c[3])
            assert Bm.data_ptr() % 16 != 0
            c[3] = Bm
        made.append(tuple(c))
    ys = [lk.lora_linear(*c, route="cuda-gemv") for c in made]  # prefetching finish (the default)
    monkeypatch.setenv("LORA_KERNELS_GEMV_V5_FINISH", "plain")
    for (M, K, N, r, bias), c, y in zip(cases, made, ys):
        assert torch.equal(lk.lora_linear(*c, route="cuda-gemv"), y), (M, K, N, r, bias)
    monkeypatch.delenv("LORA_KERNELS_GEMV_V5_FINISH")
    for c in made:
        _check(*c)
    _check_graph_replays(made[0], rng, 2)


# ---- raw-binding argument checks, each call in a child process -----------------------------------
# On the H100 (torch 2.11) eight of these calls used to segfault instead of raising (see
# csrc/nf4_checks.h): the calls run in a child process, so a crash fails the case it happened in
# (with the signal) instead of ending the whole pytest session.
_BAD_ARGS = [  # (case id, edit of a valid call, expected message)
    ("x-fp32", dict(xx="float"), "bfloat16 or float16"),
    ("M-18", dict(xx="18rows"), "M"),
    ("K-mismatch", dict(xx="K192"), "packed"),
    ("N-mismatch", dict(n=65), "packed"),
    ("blocksize-mismatch", dict(bs=128), "absmax"),
    ("blocksize-32", dict(bs=32), "blocksize"),
    ("lora_a-shape", dict(a="K128"), "lora_a"),
    ("lora_b-shape", dict(bb="r4"), "lora_b"),
    ("lora_a-dtype", dict(a="half"), "lora_a"),
    ("x-cpu", dict(xx="cpu"), "CUDA"),
    ("variant-6", dict(variant=6), "variant"),
    ("variant-0", dict(variant=0), "variant"),
    ("x-3d-non-contiguous", dict(xx="noncontig3d"), "contiguous [..., K]"),
    ("x-0d", dict(xx="scalar"), "contiguous [..., K]"),
]

_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import lora_kernels as lk
from lora_kernels import _ext
cases = json.loads(sys.argv[2])
ext = _ext.cuda_ext()
gen = torch.Generator().manual_seed(1234)
W = torch.randn(64, 256, generator=gen) * 0.05
q = lk.quantize_nf4(W.cuda(), blocksize=64, double_quant=True)
x = torch.randn(2, 256, generator=gen).to(torch.bfloat16).cuda()
A = (torch.randn(8, 256, generator=gen) * 0.05).to(torch.bfloat16).cuda()
B = (torch.randn(64, 8, generator=gen) * 0.05).to(torch.bfloat16).cuda()
xs = {"float": x.float(), "18rows": x.repeat(9, 1), "K192": x[:, :192].contiguous(), "cpu": x.cpu(),
      "noncontig3d": x.repeat(1, 2).view(1, 2, 512)[..., ::2], "scalar": x[0, 0]}
a_s = {"K128": A[:, :128], "half": A.half()}
for cid, case, variant in cases:
    print("START", json.dumps([cid, variant]), flush=True)
    xx, a = xs.get(case.get("xx"), x), a_s.get(case.get("a"), A)
    bb = B[:, :4] if case.get("bb") == "r4" else B
    args = (xx, q.packed.view(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code,
            case.get("n", 64), case.get("bs", 64), a, bb, 1.0, None, None)
    try:
        ext.lora_gemv(*args, variant=case.get("variant", variant))
        res = ["no error", ""]
    except Exception as e:
        res = [type(e).__name__, str(e).splitlines()[0] if str(e) else ""]
    print("RESULT", json.dumps([cid, variant] + res), flush=True)
"""

_bad_results = {}


def _run_bad_args():
    """{(case id, variant): (exception type or failure, first message line)}, one child process for
    all cases (a new one after each crash)."""
    if _bad_results:
        return _bad_results
    todo = [[cid, case, v] for cid, case, _ in _BAD_ARGS for v in (1, 2, 3, 4, 5)]
    root = str(pathlib.Path(__file__).resolve().parents[1])
    while todo:
        proc = subprocess.run([sys.executable, "-c", _CHILD, root, json.dumps(todo)], capture_output=True,
                              text=True, timeout=600, cwd=root, env=dict(os.environ, LORA_KERNELS_QUIET="1"))
        started, any_started = None, False
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started, any_started = tuple(json.loads(line[6:])), True
            elif line.startswith("RESULT "):
                cid, v, kind, msg = json.loads(line[7:])
                _bad_results[(cid, v)] = (kind, msg)
                started = None
        done = {(c, v) for c, _, v in todo if (c, v) in _bad_results}
        if proc.returncode != 0:
            why = (f"child died with return code {proc.returncode} (signal "
                   f"{-proc.returncode if proc.returncode < 0 else 'none'})",
                   proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "")
            if not any_started:  # the setup itself failed: no case can run
                for c, _, v in todo:
                    _bad_results.setdefault((c, v), why)
                break
            culprit = started or next(((c, v) for c, _, v in todo if (c, v) not in done), None)
            if culprit is None:
                break
            _bad_results[culprit] = why
            done.add(culprit)
        elif len(done) < len(todo):  # exited normally without reporting every case
            for c, _, v in todo:
                _bad_results.setdefault((c, v), ("child exited without a result", proc.stderr.strip()[-300:]))
            break
        todo = [[c, case, v] for c, case, v in todo if (c, v) not in done]
    return _bad_results


@gpu
@pytest.mark.parametrize("variant_arg", [1, 2, 3, 4, 5], ids=["v1", "v2", "v3", "v4", "v5"])
@pytest.mark.parametrize("cid, case, msg", _BAD_ARGS, ids=[c[0] for c in _BAD_ARGS])
def test_extension_rejects_bad_arguments(cid, case, msg, variant_arg):
    _ext_or_skip()
    kind, text = _run_bad_args()[(cid, variant_arg)]
    assert kind == "RuntimeError", f"{cid}: expected RuntimeError matching {msg!r}, got {kind}: {text}"
    assert msg in text, f"{cid}: message {text!r} does not contain {msg!r}"


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check")
def test_never_chosen_on_cpu(rng):
    q = lk.quantize_nf4(torch.randn(64, 256))
    assert lk.forward_route(1, q, torch.bfloat16, torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="cuda-gemv"):
        lk.lora_linear(torch.zeros(1, 256, dtype=torch.bfloat16), q, route="cuda-gemv")


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check")
def test_variants_benchmark_without_gpu(capsys):
    from benchmarks import gemv_variants

    assert gemv_variants.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The inference fast path (library.decode_linear, QLoRALinear._decode): the same kernel and
# arguments as the general path, so bit-identical outputs; None wherever the route differs.
# --------------------------------------------------------------------------------------------
def _layer(K, N, r, gen, *, bias=True, bias_dtype=torch.bfloat16, dtype=torch.bfloat16):
    from lora_kernels.lora_modules import QLoRALinear

    lin = torch.nn.Linear(K, N, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(randn((N, K), torch.float32, gen, scale=0.05))
    layer = QLoRALinear.from_linear(lin, r=r, lora_alpha=2 * r, device="cuda").cuda()
    with torch.no_grad():
        layer.lora_B.copy_(randn(tuple(layer.lora_B.shape), torch.float32, gen, scale=0.05))
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(bias_dtype)
    return layer


@gpu
@pytest.mark.parametrize("M, lead", [(1, ()), (3, ()), (16, ()), (5, (2,))], ids=["m1", "m3", "m16", "3d"])
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32], ids=["nobias", "bias", "bias32"])
def test_decode_fast_path_is_bit_identical(M, lead, bias_dtype, rng):
    _ext_or_skip()
    from lora_kernels.library import decode_linear

    layer = _layer(192, 77, 16, rng, bias=bias_dtype is not None, bias_dtype=bias_dtype or torch.bfloat16).eval()
    x = randn((*lead, M, 192), torch.bfloat16, rng, device="cuda")
    with torch.no_grad():
        fast = layer(x)
        assert layer._decode(x) is not None, "the fast path should have been taken"
    slow = layer(x.clone().requires_grad_())      # grad enabled: the autograd Function path
    assert fast.shape == (*lead, M, 77) and fast.dtype == torch.bfloat16
    assert torch.equal(fast, slow.detach())
    y = decode_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.bias)
    assert torch.equal(y, fast)
    layer.merge()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x.clone().requires_grad_()).detach())


@gpu
def test_decode_fast_path_declines_other_routes(rng):
    _ext_or_skip()
    from lora_kernels.library import decode_linear

    layer = _layer(128, 64, 8, rng)
    q, A, B = layer.weight, layer.lora_A, layer.lora_B
    x17 = randn((17, 128), torch.bfloat16, rng, device="cuda")
    assert decode_linear(x17, q, A, B, 2.0, None) is None                           # M > 16
    assert decode_linear(x17[:1].float(), q, A, B, 2.0, None) is None               # fp32 x
    assert decode_linear(x17[:1].cpu(), q, A, B, 2.0, None) is None                 # CPU x
    assert decode_linear(x17[:1], q, A, B, torch.ones(8, device="cuda"), None) is None  # AdaLoRA vector
    assert decode_linear(x17[:1, :64], q, A, B, 2.0, None) is None                  # wrong K
    assert decode_linear(x17[:1], torch.randn(64, 128, device="cuda", dtype=torch.bfloat16), A, B, 2.0,
                         None) is None                                             # dense base
    with torch.no_grad():
        layer.train()
        layer.lora_dropout = 0.5                  # dropout in training mode: general path
        assert layer._decode(x17[:1]) is None
        layer.eval()
        assert layer._decode(x17[:1]) is not None
        with torch.autocast("cuda", dtype=torch.float16):
            assert layer._decode(x17[:1]) is None
            assert layer(x17[:1]).dtype == torch.float16
    # a mis-shaped adapter is left to lora_linear's checks; one the extension rejects (wrong device)
    # is a ValueError naming it, not a crash
    assert decode_linear(x17[:1], q, A, B[:, :4], 2.0, None) is None
    with pytest.raises(ValueError, match="lora_b"):
        lk.lora_linear(x17[:1], q, A, B[:, :4], 2.0)
    with pytest.raises(ValueError, match="lora_a"):
        decode_linear(x17[:1], q, A.detach().cpu(), B, 2.0, None)
    y = lk.lora_linear(x17[:3], q, A, B, 2.0)               # lora_linear's own fast path, same bits
    assert torch.equal(y, lk.lora_linear(x17[:3], q, A, B, 2.0, route="cuda-gemv"))


def test_decode_fast_path_is_inert_on_cpu(rng):
    from lora_kernels.library import decode_linear
    from lora_kernels.lora_modules import QLoRALinear

    lin = torch.nn.Linear(128, 64, dtype=torch.float16)
    layer = QLoRALinear.from_linear(lin, r=4, lora_alpha=8).eval()
    x = randn((1, 128), torch.float16, rng)
    assert decode_linear(x, layer.weight, layer.lora_A, layer.lora_B, 2.0, None) is None
    with torch.no_grad():
        a = layer(x)
    b = layer(x.clone().requires_grad_()).detach()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gemv_variant_rule():
    """The measured dispatch among the decode kernels (library.gemv_variant): small weights take variant
    2 without LoRA (M <= 8) and variant 1 otherwise; larger ones variant 5 where it takes the sizes,
    except M = 9..16 with LoRA at K > 8192; else 3 at M = 1 and 1 above."""
    from lora_kernels.library import gemv_variant

    for v5 in (True, False):
        assert gemv_variant(1, 4096, 4096, False, v5) == 2 and gemv_variant(8, 4096, 4096, False, v5) == 2
        assert gemv_variant(9, 4096, 4096, False, v5) == 1 and gemv_variant(16, 1024, 4096, False, v5) == 1
        assert gemv_variant(1, 4096, 4096, True, v5) == 1 and gemv_variant(8, 1024, 4096, True, v5) == 1
        assert gemv_variant(16, 4096, 14336, True, v5) == 1 and gemv_variant(9, 4096, 14336, True, v5) == 1
    assert gemv_variant(1, 14336, 4096, True, True) == 5 and gemv_variant(4, 28672, 8192, False, True) == 5
    assert gemv_variant(8, 14336, 4096, True, True) == 5 and gemv_variant(1, 4096, 14336, True, True) == 5
    assert gemv_variant(8, 4096, 14336, True, True) == 5 and gemv_variant(16, 4096, 14336, False, True) == 5
    assert gemv_variant(16, 14336, 4096, True, True) == 5 and gemv_variant(16, 28672, 8192, True, True) == 5
    assert gemv_variant(1, 14336, 4096, True) == 3 and gemv_variant(1, 28672, 8192, False) == 3
    assert gemv_variant(2, 14336, 4096, True) == 1 and gemv_variant(16, 28672, 8192, False) == 1


@gpu
def test_gemv_variant_chosen_asks_variant_5s_planner(monkeypatch):
    """On the GPU the rule is told what variant 5's planner says: 5 on the Llama MLP layers at M = 1 and
    8 (x per K slice at K = 14336) where it fits, else variants 3 and 1."""
    ext = _ext_or_skip()
    _require_variant(ext, 5)
    from lora_kernels.library import gemv_variant_chosen

    monkeypatch.delenv("LORA_KERNELS_GEMV_VARIANT", raising=False)
    assert gemv_variant_chosen(1, 14336, 4096, True) == (5 if _v5_runs(1, 4096, 14336, 64) else 3)
    assert gemv_variant_chosen(8, 4096, 14336, True) == (5 if _v5_runs(8, 14336, 4096, 64) else 1)
    assert gemv_variant_chosen(16, 4096, 14336, True) == 1


def test_gemv_variant_chosen_env_override(monkeypatch):
    """$LORA_KERNELS_GEMV_VARIANT overrides the measured rule; unset, the rule decides."""
    from lora_kernels.library import gemv_v5_takes, gemv_variant, gemv_variant_chosen

    monkeypatch.delenv("LORA_KERNELS_GEMV_VARIANT", raising=False)
    for M, N, K, lora in ((1, 14336, 4096, True), (1, 4096, 4096, False), (16, 28672, 8192, True)):
        assert gemv_variant_chosen(M, N, K, lora) == gemv_variant(M, N, K, lora, gemv_v5_takes(M, N, K, 64, lora, True))
    monkeypatch.setenv("LORA_KERNELS_GEMV_VARIANT", "4")
    assert gemv_variant_chosen(1, 4096, 4096, True) == 4 and gemv_variant_chosen(16, 28672, 8192, False) == 4


def test_gemv_variant_ran_names_the_fallback(monkeypatch):
    """Benchmark labels name the kernel that runs: a forced variant that cannot take the sizes is
    reported as variant 1 (on the GPU, from the planners); without a CUDA build, the chosen variant."""
    from lora_kernels.library import gemv_variant_chosen, gemv_variant_ran

    monkeypatch.setenv("LORA_KERNELS_GEMV_VARIANT", "5")
    ext = _ext.cuda_ext()
    if ext is None or not hasattr(ext, "lora_gemv_v5_slices") or not HAS_CUDA:
        assert gemv_variant_ran(16, 4096, 4096, True) == gemv_variant_chosen(16, 4096, 4096, True) == 5
        return
    assert gemv_variant_ran(16, 4096, 4096, True) == 1                  # M = 16: variant 5 falls back
    assert gemv_variant_ran(1, 4096, 4096, True) == 5
    assert gemv_variant_ran(1, 4096, 4096, True, 64, True) == 5
    monkeypatch.setenv("LORA_KERNELS_GEMV_VARIANT", "3")
    assert gemv_variant_ran(16, 4096, 4096, True) == 1                  # above variant 3's M limit
    monkeypatch.setenv("LORA_KERNELS_GEMV_VARIANT", "1")
    assert gemv_variant_ran(16, 4096, 4096, True) == 1
