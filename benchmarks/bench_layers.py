"""pytest-benchmark entry points for the layers: ``QLoRALinear`` / ``LoRALinear`` forward and
forward+backward (grads for x, lora_A, lora_B), bf16, r = 16, alpha = 32.

    pytest benchmarks/bench_layers.py --benchmark-only            # CUDA shapes if a GPU, else the tiny CPU one
    pytest benchmarks/bench_layers.py --benchmark-only -k cpu     # the CPU smoke run only

Not collected by CI (``testpaths = ["tests"]``); the tables of record come from bench_forward.py /
bench_training.py (CUDA events, L2 rotation, floors).  These are wall-clock timings of whole module
calls with a ``torch.cuda.synchronize()`` inside each timed call (launch overhead included), for
spotting regressions between commits with ``--benchmark-compare``.  CUDA cases are skipped without a
GPU; the CPU case (128 -> 72, M = 33) runs the reference route.
"""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
R, ALPHA = 16, 32
#: (K_in, N_out, M): Llama-3-8B q_proj and gate_proj at decode (M = 16) and training (M = 4096) sizes.
CUDA_CASES = [(4096, 4096, 16), (4096, 4096, 4096), (4096, 14336, 16), (4096, 14336, 4096)]
CPU_CASES = [(128, 72, 33)]

CASES = [pytest.param("cpu", *c, id=f"cpu-{c[0]}x{c[1]}-M{c[2]}") for c in CPU_CASES] + [
    pytest.param("cuda", *c, id=f"cuda-{c[0]}x{c[1]}-M{c[2]}",
                 marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")) for c in CUDA_CASES]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _layer(kind: str, device: str, K: int, N: int) -> torch.nn.Module:
    import lora_kernels as lk

    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16, device=device)
    cls = lk.QLoRALinear if kind == "qlora" else lk.LoRALinear
    layer = cls.from_linear(lin, R, ALPHA)
    with torch.no_grad():  # B = 0 at init would make the LoRA path's output trivially zero
        layer.lora_B.normal_(0.0, 0.02)
    return layer


@pytest.mark.parametrize("kind", ["qlora", "lora"])
@pytest.mark.parametrize("device,K,N,M", CASES)
def test_forward(benchmark, kind, device, K, N, M):
    layer = _layer(kind, device, K, N)
    x = torch.randn(M, K, dtype=torch.bfloat16, device=device)

    def step():
        with torch.no_grad():
            y = layer(x)
        _sync(device)
        return y

    y = benchmark(step)
    assert y.shape == (M, N) and torch.isfinite(y).all()


@pytest.mark.parametrize("kind", ["qlora", "lora"])
@pytest.mark.parametrize("device,K,N,M", CASES)
def test_forward_backward(benchmark, kind, device, K, N, M):
    layer = _layer(kind, device, K, N)
    x = torch.randn(M, K, dtype=torch.bfloat16, device=device, requires_grad=True)
    g = torch.randn(M, N, dtype=torch.bfloat16, device=device)
    params = (x, layer.lora_A, layer.lora_B)

    def step():
        y = layer(x)
        grads = torch.autograd.grad(y, params, g)
        _sync(device)
        return grads

    dx, da, db = benchmark(step)
    assert dx.shape == x.shape and da.shape == layer.lora_A.shape and db.shape == layer.lora_B.shape
    assert all(torch.isfinite(t).all() for t in (dx, da, db))
