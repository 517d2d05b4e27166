"""The forward op at the library boundary: route choice, shapes, bad input, and (on the GPU) every
route against a float64 reference with the "at most 2x PyTorch's own error" rule.
Kernel-level cases (configs, interpreter) live in test_forward_triton.py."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels.reference import lora_linear_reference

from .conftest import HAS_CUDA, bad_dtype_cases, randn


def _err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def _setup(M, K, N, r, dtype, gen, device="cpu", nf4=True, bias=True, vec_scale=False):
    W = randn((N, K), torch.float32, gen, scale=0.05)
    weight = lk.quantize_nf4(W.to(device)) if nf4 else W.to(dtype).to(device)
    x = randn((M, K), dtype, gen, device=device)
    A = randn((r, K), dtype, gen, device=device, scale=0.05)
    B = randn((N, r), dtype, gen, device=device, scale=0.05)
    s = torch.rand(r, generator=gen).to(device) + 0.5 if vec_scale else 2.0
    b = randn((N,), dtype, gen, device=device) if bias else None
    return x, weight, A, B, s, b


def _check_against_reference(x, weight, A, B, s, b, route=None):
    dense = weight.dequantize(torch.float32) if isinstance(weight, lk.NF4Weight) else weight.float()
    ref = lora_linear_reference(x.double(), dense.double(), A.double(), B.double(),
                                s.double() if isinstance(s, torch.Tensor) else s,
                                None if b is None else b.double(), torch.float64).double()
    y = lk.lora_linear(x, weight, A, B, s, b, route=route)
    assert y.dtype == x.dtype and y.shape == ref.shape and torch.isfinite(y).all()
    # PyTorch computing the same formula in x's dtype
    dq = dense.to(x.dtype)
    t = (x @ A.t()) * (s.to(x.dtype) if isinstance(s, torch.Tensor) else s)
    torch_y = torch.nn.functional.linear(x, dq, b) + t @ B.t()
    assert _err(y, ref) <= 2 * _err(torch_y, ref) + 1e-6, (_err(y, ref), _err(torch_y, ref))


def test_cpu_route_is_reference(rng):
    x, w, A, B, s, b = _setup(5, 128, 40, 8, torch.float32, rng)
    assert lk.forward_route(5, w, torch.float32, torch.device("cpu")) == "reference"
    y = lk.lora_linear(x, w, A, B, s, b)
    ref = lora_linear_reference(x, w.dequantize(torch.float32), A, B, s, b)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)], ids=["1d", "2d", "3d"])
def test_leading_dims_and_non_contiguous(lead, rng):
    x, w, A, B, s, b = _setup(1, 64, 24, 4, torch.float32, rng)
    xx = randn((*lead, 64 * 2), torch.float32, rng)[..., ::2]  # non-contiguous last dim
    y = lk.lora_linear(xx, w, A, B, s, b)
    assert y.shape == (*lead, 24)
    ref = lora_linear_reference(xx.contiguous(), w.dequantize(torch.float32), A, B, s, b)
    torch.testing.assert_close(y, ref)


def test_no_lora_term_and_vector_scale(rng):
    x, w, A, B, s, b = _setup(3, 64, 24, 4, torch.float32, rng, vec_scale=True)
    torch.testing.assert_close(lk.lora_linear(x, w), x @ w.dequantize(torch.float32).t())
    ref = lora_linear_reference(x, w.dequantize(torch.float32), A, B, s, b)
    torch.testing.assert_close(lk.lora_linear(x, w, A, B, s, b), ref)


def test_bad_input(rng):
    x, w, A, B, s, b = _setup(3, 64, 24, 4, torch.float32, rng)
    with pytest.raises(ValueError, match="K=64"):
        lk.lora_linear(x[:, :63], w, A, B)
    with pytest.raises(ValueError, match="both lora_a and lora_b"):
        lk.lora_linear(x, w, A, None)
    with pytest.raises(ValueError, match="unknown route"):
        lk.lora_linear(x, w, A, B, route="fast")
    with pytest.raises(TypeError, match="NF4Weight or a 2-D"):
        lk.lora_linear(x, torch.randn(24), A, B)
    with pytest.raises(ValueError, match="meta"):
        lk.lora_linear(x.to("meta"), w, A, B)
    for args, kw, err, msg in bad_dtype_cases(x, w, w.dequantize(torch.float32), A, B):
        with pytest.raises(err, match=f"lora_linear: {msg}"):
            lk.lora_linear(*args, **kw)


# ----------------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 100, 4096])
def test_gpu_routes_against_reference(M, dtype, rng):
    for K, N in ((4096, 4096 + 8 + 3), (1024, 4096 + 1)):
        for r, nf4, bias, vec in ((1, True, True, False), (16, True, False, True), (128, True, True, False),
                                  (64, False, True, False)):
            x, w, A, B, s, b = _setup(M, K, N, r, dtype, rng, "cuda", nf4=nf4, bias=bias, vec_scale=vec)
            route = lk.forward_route(M, w, dtype, x.device)
            assert route == (("cuda-gemv" if nf4 else "triton-gemv") if M <= 16 else "merge-cublas")
            _check_against_reference(x, w, A, B, s, b)
            # every other route that can take this shape
            others = ["triton-gemv"] if M <= 16 and nf4 else []
            if M > 16:  # the fused tiled kernel is not auto-selected (see library.forward_route)
                others += ["triton-tiled", "dequant-cublas"]
            for other in others:
                _check_against_reference(x, w, A, B, s, b, route=other)


@gpu
def test_gpu_fallback_routes(rng):
    # K not a multiple of the blocksize -> dequant-cublas; fp32 x -> dequant-cublas
    x, w, A, B, s, b = _setup(7, 96, 40, 8, torch.bfloat16, rng, "cuda")
    assert lk.forward_route(7, w, torch.bfloat16, x.device) == "dequant-cublas"
    _check_against_reference(x, w, A, B, s, b)
    x, w, A, B, s, b = _setup(7, 128, 40, 8, torch.float32, rng, "cuda")
    assert lk.forward_route(7, w, torch.float32, x.device) == "dequant-cublas"
    _check_against_reference(x, w, A, B, s, b)


@gpu
def test_gpu_3d_noncontiguous_bf16(rng):
    x, w, A, B, s, b = _setup(1, 4096, 1024, 16, torch.bfloat16, rng, "cuda")
    xx = randn((4, 33, 4096 * 2), torch.bfloat16, rng, device="cuda")[..., ::2]
    y = lk.lora_linear(xx, w, A, B, s, b)
    y2 = lk.lora_linear(xx.contiguous(), w, A, B, s, b)
    assert y.shape == (4, 33, 1024) and torch.equal(y, y2)


@pytest.mark.parametrize("vec_scale", [False, True], ids=["scalar", "per-rank"])
def test_dequant_cublas_route_on_cpu(vec_scale, rng):
    """The dequantize + matmul route is plain torch: forced here so CI exercises it."""
    x, w, A, B, s, b = _setup(9, 128, 40, 8, torch.float32, rng, vec_scale=vec_scale)
    y = lk.lora_linear(x, w, A, B, s, b, route="dequant-cublas")
    ref = lora_linear_reference(x, w.dequantize(torch.float32), A, B, s, b)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(lk.lora_linear(x, w, route="dequant-cublas"), x @ w.dequantize(torch.float32).t())


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("vec_scale", [False, True], ids=["scalar", "per-rank"])
def test_merge_route_chunks_under_interpreter(nf4, bs, vec_scale, rng, monkeypatch):
    """merge-cublas forward (row chunks) and dX (column chunks) with a tiny workspace forcing
    several chunks (the last one short) equal the float64 reference; fp16 under the interpreter
    (mm on the CPU).  No chunk of the merged weight is ever more than half of it."""
    import os

    from lora_kernels import library

    if os.environ.get("TRITON_INTERPRET") != "1" and not HAS_CUDA:
        pytest.skip("needs the Triton interpreter or a GPU")
    monkeypatch.setattr(library, "WORKSPACE_BYTES", 1)
    dev = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.float16
    N, K, r = 300, 768, 8
    W = randn((N, K), torch.float32, rng, scale=0.05)
    weight = lk.quantize_nf4(W.to(dev), blocksize=bs) if nf4 else W.to(dtype).to(dev)
    assert library.merge_chunk(N, K, 128) == 128 and library.merge_chunk(K, N, 128) == 128
    assert library.merge_chunk(100, K, 128, whole_weight=False) >= 100    # shorter than two units: one chunk
    monkeypatch.setattr(library, "WORKSPACE_BYTES", 2**30)
    assert library.merge_chunk(N, K, 128) >= N                            # inference: whole, in the workspace
    assert library.merge_chunk(N, K, 128, whole_weight=False) == 256      # training: at most half (rounded up)
    monkeypatch.setattr(library, "WORKSPACE_BYTES", 1)
    x = randn((5, K), dtype, rng, device=dev)
    A = randn((r, K), dtype, rng, device=dev, scale=0.05)
    B = randn((N, r), dtype, rng, device=dev, scale=0.05)
    b = randn((N,), dtype, rng, device=dev)
    s = (torch.rand(r, generator=rng) + 0.5).to(dev) if vec_scale else 2.0
    s64 = s.double() if vec_scale else s
    dense = (weight.dequantize(torch.float32) if nf4 else weight.float()).double()

    seen = []
    real_merge = __import__("lora_kernels.triton.nf4_merge", fromlist=["merge_window"]).merge_window

    def spy(*args, **kw):
        out = real_merge(*args, **kw)
        seen.append(out.numel())
        return out
    monkeypatch.setattr("lora_kernels.triton.nf4_merge.merge_window", spy)

    y = lk.lora_linear(x, weight, A, B, s, b, route="merge-cublas")
    ref = lora_linear_reference(x.double(), dense, A.double(), B.double(), s64, b.double(), torch.float64)
    assert y.shape == (5, N) and torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-3
    assert len(seen) == 3 and max(seen) <= N * K // 2

    seen.clear()
    dy = randn((5, N), dtype, rng, device=dev)
    dx = lk.lora_linear_dx(dy, weight, A, B, s, route="merge-cublas")
    eff = dense + (B.double() * (s64 if not vec_scale else s64[None, :])) @ A.double()
    ref_dx = dy.double() @ eff
    assert dx.shape == (5, K) and dx.dtype == dtype
    assert ((dx.double() - ref_dx).norm() / ref_dx.norm()).item() < 2e-3
    # column windows: one per multiple of the merge's column unit (every default tile's BLOCK_K)
    from lora_kernels.triton.nf4_merge import window_col_unit
    unit = window_col_unit(bs if nf4 else 1)
    assert len(seen) == -(-K // unit) > 1 and max(seen) <= N * K // 2
    # without LoRA: dy · Ŵ (dense: no merge at all)
    dx0 = lk.lora_linear_dx(dy, weight, route="merge-cublas")
    ref0 = dy.double() @ dense
    assert ((dx0.double() - ref0).norm() / ref0.norm()).item() < 2e-3


def test_lora_linear_dx_bad_input(rng):
    x, w, A, B, s, b = _setup(3, 128, 40, 8, torch.float32, rng)
    dy = torch.zeros(3, 40)
    with pytest.raises(ValueError, match=r"dy must be \[M, N=40\]"):
        lk.lora_linear_dx(dy[:, :7], w, A, B, s)
    with pytest.raises(ValueError, match="dy must be a 2-D tensor"):
        lk.lora_linear_dx(dy[0], w, A, B, s)
    with pytest.raises(ValueError, match="give both lora_a and lora_b"):
        lk.lora_linear_dx(dy, w, A, None, s)
    with pytest.raises(ValueError, match=r"lora_a must be \[r, K=128\]"):
        lk.lora_linear_dx(dy, w, A[:, :64], B, s)
    with pytest.raises(ValueError, match="unknown route"):
        lk.lora_linear_dx(dy, w, A, B, s, route="nope")
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        lk.lora_linear_dx(dy, w, A[:0], B[:, :0], s)
    with pytest.raises(TypeError, match="weight must be an NF4Weight or a 2-D tensor"):
        lk.lora_linear_dx(dy, "w", A, B, s)
    with pytest.raises(TypeError, match="dy must be float32, bfloat16 or float16"):
        lk.lora_linear_dx(dy.long(), w, A, B, s)
    with pytest.raises(TypeError, match="lora_b must be a floating-point tensor"):
        lk.lora_linear_dx(dy, w, A, B.int(), s)
    with pytest.raises(ValueError, match="scale must be finite"):
        lk.lora_linear_dx(dy, w, A, B, float("inf"))
    with pytest.raises(TypeError, match="lora_a and lora_b must be tensors"):
        lk.lora_linear_dx(dy, w, A.tolist(), B, s)
    ref = lk.lora_linear_dx(dy + 1, w, A, B, s)
    torch.testing.assert_close(ref, (dy + 1) @ w.dequantize(torch.float32) + (((dy + 1) @ B) * s) @ A)
