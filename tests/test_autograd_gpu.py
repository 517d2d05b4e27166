"""Training step on the GPU (``pytest -m gpu``): ``qlora_linear``'s gradients in bf16/fp16 against a
float64 reference on the same dequantized weight, with the design's "at most 2x PyTorch's own
error" rule, and the memory rule of issue 4 (no allocation of N·K·2 bytes in a step).

Reference: y = x·Ŵᵀ + ((x·Aᵀ)⊙s)·Bᵀ + bias in float64; gradients of (y ⊙ g).sum() for x, A, B,
bias (and s when it is a per-rank vector).  PyTorch's own: the same formula in x's dtype through
autograd on the bf16 dense weight.
"""

import pytest
import torch

import lora_kernels as lk

from .conftest import randn

gpu = pytest.mark.gpu


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _step(fn, leaves, g):
    for t in leaves:
        t.grad = None
    y = fn()
    y.backward(g)
    return [y.detach()] + [t.grad.detach().clone() for t in leaves]


def _formula(x, W, A, B, s, b):
    t = x @ A.t()
    t = t * (s.to(t.dtype) if isinstance(s, torch.Tensor) else s)
    y = x @ W.t() + t @ B.t()
    return y if b is None else y + b


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,K,N,r", [(3, 256, 129, 1), (17, 512, 333, 16), (100, 1024, 771, 64),
                                     (4096, 4096, 1024, 16), (333, 2048, 1537, 128)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["nf4-dq", "nf4", "dense"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_training_grads_gpu(rng, dtype, M, K, N, r, kind, bias):
    dev = "cuda"
    W = randn((N, K), torch.float32, rng, device=dev, scale=0.05)
    if kind == "dense":
        weight = W.to(dtype)
        dense = weight.double()
    else:
        weight = lk.quantize_nf4(W, blocksize=64, double_quant=(kind == "nf4-dq"))
        dense = weight.dequantize(torch.float32).double()
    vec = r in (16,)                                      # AdaLoRA-style per-rank scale on some shapes
    x = randn((M, K), dtype, rng, device=dev).requires_grad_()
    A = randn((r, K), dtype, rng, device=dev, scale=0.05).requires_grad_()
    B = randn((N, r), dtype, rng, device=dev, scale=0.05).requires_grad_()
    s = (torch.rand(r, generator=rng) + 0.5).to(dev).requires_grad_() if vec else 2.0
    bb = randn((N,), dtype, rng, device=dev).requires_grad_() if bias else None
    leaves = [t for t in (x, A, B, s, bb) if isinstance(t, torch.Tensor)]
    g = randn((M, N), dtype, rng, device=dev)

    got = _step(lambda: lk.qlora_linear(x, weight, A, B, s, bb), leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rA, rB, *rest = ref_leaves
    rs = rest.pop(0) if vec else 2.0
    rb = rest.pop(0) if bias else None
    ref = _step(lambda: _formula(rx, dense, rA, rB, rs, rb), ref_leaves, g.double())
    torch_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    tx, tA, tB, *trest = torch_leaves
    ts = trest.pop(0) if vec else 2.0
    tb = trest.pop(0) if bias else None
    mine = _step(lambda: _formula(tx, dense.to(dtype), tA, tB, ts, tb), torch_leaves, g)
    names = ["y", "dx", "dA", "dB"] + (["ds"] if vec else []) + (["dbias"] if bias else [])
    for name, a, b, c in zip(names, got, ref, mine):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        assert _rel(a, b) <= 2 * _rel(c, b) + 1e-5, (name, _rel(a, b), _rel(c, b))


@gpu
@pytest.mark.parametrize("K,N", [(4096, 14336), (14336, 4096)], ids=lambda v: str(v))
def test_training_step_never_allocates_the_dense_weight(rng, K, N):
    """Issue 4's memory rule: no single allocation of N·K·2 bytes (or more) in a forward+backward
    step, recorded by the CUDA caching allocator's history; the workspace chunks stay at most
    half the dense weight."""
    from lora_kernels import library

    dev, M, r = "cuda", 512, 16
    W = randn((N, K), torch.float32, rng, device=dev, scale=0.05)
    q = lk.quantize_nf4(W, blocksize=64, double_quant=True)
    del W
    x = randn((M, K), torch.bfloat16, rng, device=dev).requires_grad_()
    A = randn((r, K), torch.bfloat16, rng, device=dev, scale=0.05).requires_grad_()
    B = randn((N, r), torch.bfloat16, rng, device=dev, scale=0.05).requires_grad_()
    g = randn((M, N), torch.bfloat16, rng, device=dev)
    library._workspaces.clear()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(enabled="all", max_entries=100000)
    try:
        y = lk.qlora_linear(x, q, A, B, 2.0)
        y.backward(g)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    sizes = [e["size"] for trace in snap["device_traces"] for e in trace if e["action"] == "alloc"]
    assert sizes, "no allocation recorded (is the history API working?)"
    assert max(sizes) <= N * K, (max(sizes), N * K * 2)
    assert x.grad is not None and A.grad is not None and B.grad is not None


@gpu
@pytest.mark.parametrize("M,K,N,r,dropout", [(2048, 1024, 8192, 16, 0.0), (2049, 512, 8200, 8, 0.1)],
                         ids=lambda v: str(v))
def test_fused_dy_pass_backward(rng, monkeypatch, M, K, N, r, dropout):
    """``LORA_KERNELS_FUSED_DY_PASS``: the backward's U and dB from one read of dY give the gradients
    of the two-GEMM backward within bf16 rounding (fp32 adapters: dB comes back in fp32), and the
    fused kernel is the one that ran."""
    from lora_kernels import library
    from lora_kernels.triton import lora_grad

    dev = "cuda"
    q = lk.quantize_nf4(randn((N, K), torch.float32, rng, device=dev, scale=0.05))
    x = randn((M, K), torch.bfloat16, rng, device=dev).requires_grad_()
    A = randn((r, K), torch.float32, rng, device=dev, scale=0.05).requires_grad_()
    B = randn((N, r), torch.float32, rng, device=dev, scale=0.05).requires_grad_()
    g = randn((M, N), torch.bfloat16, rng, device=dev)
    calls = []
    real = lora_grad.lora_dy_pass
    monkeypatch.setattr(lora_grad, "lora_dy_pass", lambda *a, **k: calls.append(1) or real(*a, **k))

    def grads(fused):
        monkeypatch.setattr(library, "FUSED_DY_PASS", fused)
        torch.manual_seed(7)                                   # the same dropout mask both times
        return _step(lambda: lk.qlora_linear(x, q, A, B, 2.0, dropout=dropout, training=True), [x, A, B], g)

    want = grads(False)
    assert not calls
    got = grads(True)
    assert len(calls) == 1
    assert [t.dtype for t in got] == [t.dtype for t in want]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)          # y: the forward is untouched
    for w, g_ in zip(want[1:], got[1:]):
        err = (g_.float() - w.float()).norm() / w.float().norm()
        assert err <= 8e-3, err


@gpu
@pytest.mark.parametrize("M,K,N,bias", [(300, 2048, 1408, True), (77, 1536, 2560, False)], ids=lambda v: str(v))
def test_overlapped_merge_pipeline_gives_the_in_order_bits(rng, monkeypatch, M, K, N, bias):
    """``LORA_KERNELS_MERGE_OVERLAP``: merging chunk i + 1 on a side stream while cuBLAS multiplies
    chunk i changes the order of launches, not their operands: y and dX (several chunks each, with a
    small workspace, the buffers reused) are bit-equal to the in-order pipeline's, call after call."""
    from lora_kernels import library

    dev, r = "cuda", 16
    q = lk.quantize_nf4(randn((N, K), torch.float32, rng, device=dev, scale=0.05))
    A = randn((r, K), torch.bfloat16, rng, device=dev, scale=0.05)
    B = randn((N, r), torch.bfloat16, rng, device=dev, scale=0.05)
    b = randn((N,), torch.bfloat16, rng, device=dev) if bias else None
    xs = [randn((M, K), torch.bfloat16, rng, device=dev) for _ in range(3)]
    dys = [randn((M, N), torch.bfloat16, rng, device=dev) for _ in range(3)]
    monkeypatch.setattr(library, "WORKSPACE_BYTES", 2 * 256 * max(N, K))   # 256 rows / columns a chunk
    assert library.merge_chunk(N, K, 128, False) < N and library.merge_chunk(K, N, 128, False) < K

    def run():
        library._workspaces.clear()
        out = []
        for x, dy in zip(xs, dys):
            out.append(library._merge_cublas(x, q, A, B, 2.0, b, whole_weight=False))
            out.append(library.dx_2d(dy, q, A, B, 2.0))
        torch.cuda.synchronize()
        return out

    monkeypatch.setattr(library, "MERGE_OVERLAP", False)
    want = run()
    monkeypatch.setattr(library, "MERGE_OVERLAP", True)
    got = run()
    assert len(library._workspaces) == 2          # both buffers of the pipeline were used
    for w, g_ in zip(want, got):
        assert torch.equal(w, g_)
    dense = q.dequantize(torch.float32) + 2.0 * B.float() @ A.float()
    ref = xs[0].float() @ dense.t() + (b.float() if bias else 0)
    assert (got[0].float() - ref).abs().max() <= 0.02 * ref.abs().max()
    library._workspaces.clear()


@gpu
@pytest.mark.parametrize("M,K,N,r", [(17, 512, 333, 16), (2048, 2048, 5632, 16), (100, 1024, 771, 128)],
                         ids=lambda v: str(v))
def test_fp32_adapters_with_bf16_activations_gpu(rng, M, K, N, r):
    """PEFT keeps adapters in fp32 while the base computes in bf16: gradients come back in fp32
    (written by the GEMM in fp32 where torch can, ``autograd._out_dtype_gemm``), at most 2x the
    error of PyTorch's bf16 formula against a float64 reference."""
    from lora_kernels import autograd as ag

    dev = "cuda"
    q = lk.quantize_nf4(randn((N, K), torch.float32, rng, device=dev, scale=0.05))
    dense = q.dequantize(torch.float32).double()
    x = randn((M, K), torch.bfloat16, rng, device=dev).requires_grad_()
    A = randn((r, K), torch.float32, rng, device=dev, scale=0.05).requires_grad_()
    B = randn((N, r), torch.float32, rng, device=dev, scale=0.05).requires_grad_()
    g = randn((M, N), torch.bfloat16, rng, device=dev)
    got = _step(lambda: lk.qlora_linear(x, q, A, B, 2.0), [x, A, B], g)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    ref = _step(lambda: _formula(*ref_leaves[:1], dense, *ref_leaves[1:], 2.0, None), ref_leaves, g.double())
    bf_leaves = [t.detach().to(torch.bfloat16).requires_grad_() for t in (x, A, B)]
    mine = _step(lambda: _formula(bf_leaves[0], dense.to(torch.bfloat16), *bf_leaves[1:], 2.0, None), bf_leaves, g)
    for name, a, b, c in zip(["y", "dx", "dA", "dB"], got, ref, mine):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= 2 * _rel(c, b) + 1e-5, (name, _rel(a, b), _rel(c, b))
    print("addmm out_dtype on cuda:", ag._out_dtype_gemm(torch.device(dev)))


@gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_layer_on_another_gpu(rng):
    """A model split over GPUs (device_map="auto") runs layers whose tensors are not on the current
    device: with cuda:0 current, a layer on cuda:1 gives the bits it gives on cuda:0 -- quantize,
    dequantize, the training step (merge kernel + cuBLAS) and the decode route."""
    M, K, N, r = 512, 1024, 768, 16
    W = randn((N, K), torch.float32, rng, scale=0.05)
    x0 = randn((M, K), torch.bfloat16, rng)
    A0 = randn((r, K), torch.float32, rng, scale=0.05)
    B0 = randn((N, r), torch.float32, rng, scale=0.05)
    g0 = randn((M, N), torch.bfloat16, rng)
    results = []
    for dev in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(0)
        q = lk.quantize_nf4(W.to(dev))
        x = x0.to(dev).requires_grad_()
        A, B = A0.to(dev).requires_grad_(), B0.to(dev).requires_grad_()
        y = lk.qlora_linear(x, q, A, B, 2.0)
        y.backward(g0.to(dev))
        with torch.no_grad():
            y_dec = lk.qlora_linear(x[:4].detach(), q, A, B, 2.0)
        torch.cuda.synchronize(dev)
        results.append([t.detach().cpu() for t in (q.packed, q.absmax, lk.dequantize_nf4(q), y, x.grad, A.grad,
                                                   B.grad, y_dec)])
    for name, a, b in zip(["packed", "absmax", "dequantized", "y", "dx", "dA", "dB", "decode y"], *results):
        assert torch.equal(a, b), name


@gpu
def test_compiled_reduce_overhead_training_step(rng):
    """A QLoRALinear training step under ``torch.compile(mode="reduce-overhead")`` (CUDA-graph
    replay): no tensor of the graphs' private pool kept alive by lora_kernels (the merge workspace
    cache once did: "tensor(s) in the cudagraph pool not tracked as outputs"), and the replayed
    steps give eager's outputs and gradients within bf16 rounding (the same LoRA kernels; inductor
    computes the loss's elementwise part its own way)."""
    from lora_kernels import library

    dev, M, K, N, r = "cuda", 256, 1024, 768, 8
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    base = torch.nn.Linear(K, N, bias=True).to(dev, torch.bfloat16)
    layer = lk.QLoRALinear.from_linear(base, r=r, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    library._workspaces.clear()

    def step(x):
        y = layer(x)
        y.float().square().mean().backward()
        return y

    xs = [randn((M, K), torch.bfloat16, rng, device=dev) for _ in range(4)]
    want = []
    for x in xs:
        layer.zero_grad(set_to_none=True)
        y = step(x)
        want.append((y.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    compiled = torch.compile(step, mode="reduce-overhead")
    for x, (y0, ga0, gb0) in zip(xs, want):
        layer.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        y = compiled(x).clone()
        for got, ref, name in ((y, y0, "y"), (layer.lora_A.grad, ga0, "dA"), (layer.lora_B.grad, gb0, "dB")):
            assert torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item()), name
