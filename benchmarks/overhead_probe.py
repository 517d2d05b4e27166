"""Host (CPU) cost per call of the pieces of a QLoRA step, on tiny GPU tensors so the GPU never
limits: where an eager step spends its Python / dispatch / launch time.  Then a torch.profiler
summary of one real training step.  GPU only; prints a table.

    python -m benchmarks.overhead_probe [--shape 4096x4096] [--m 4096]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def per_call_us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    cpu = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return cpu


def print_host_costs(rows, n: int = 300, header: bool = True) -> None:
    """Print ``per_call_us`` of each (name, fn) row; a row that raises prints its error instead."""
    if header:
        print(f"{'piece':45s} {'host us/call':>12s}")
    for name, fn in rows:
        try:
            print(f"{name:45s} {per_call_us(fn, n):12.1f}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{name:45s} failed: {type(e).__name__}: {e}"[:200], flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--decode", action="store_true", help="only the decode (M=1, no_grad) layer path, by piece")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("overhead_probe: needs a CUDA GPU (it measures host time around GPU launches); nothing to do")
        return
    if args.decode:
        return decode(args.shape)
    import lora_kernels as lk
    from lora_kernels import library
    from lora_kernels.triton.nf4_merge import dequantize_merge

    dev = "cuda"
    bf = torch.bfloat16
    K, N, r, M = 256, 256, 16, 32
    q = lk.quantize_nf4(torch.randn(N, K, device=dev, dtype=bf))
    A = (torch.randn(r, K, device=dev, dtype=bf) * 0.05).requires_grad_()
    B = (torch.randn(N, r, device=dev, dtype=bf) * 0.05).requires_grad_()
    x = torch.randn(M, K, device=dev, dtype=bf, requires_grad=True)
    g = torch.randn(M, N, device=dev, dtype=bf)
    ws = torch.empty(N, K, device=dev, dtype=bf)
    y = torch.empty(M, N, device=dev, dtype=bf)
    W = torch.randn(N, K, device=dev, dtype=bf)
    Ad, Bd = A.detach(), B.detach()
    wt = (q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, N, K, q.blocksize)
    s = torch.tensor(2.0, device=dev)
    rows = [
        ("torch.mm", lambda: torch.mm(x.detach(), W.t())),
        ("torch.mm out=column slice", lambda: torch.mm(x.detach(), W[:128].t(), out=y[:, :128])),
        ("F.linear", lambda: F.linear(x.detach(), W)),
        ("dequantize_merge (lora, out=)", lambda: dequantize_merge(q, Ad, Bd, 2.0, dtype=bf, out=ws)),
        ("dequantize_merge rows window", lambda: dequantize_merge(q, Ad, Bd, 2.0, dtype=bf, rows=(0, 128),
                                                                  out=ws[:128])),
        ("lk.dequantize_nf4 (cuda ext)", lambda: lk.dequantize_nf4(q, bf, out=ws)),
        ("library.lora_linear M=32 (merge-cublas)", lambda: library.lora_linear(x.detach(), q, Ad, Bd, 2.0)),
        ("library.lora_linear_dx", lambda: library.lora_linear_dx(g, q, Ad, Bd, 2.0)),
        ("op nf4_lora_forward", lambda: torch.ops.lora_kernels.nf4_lora_forward(x.detach(), *wt, Ad, Bd, s, None)),
        ("op nf4_lora_backward_dx", lambda: torch.ops.lora_kernels.nf4_lora_backward_dx(g, *wt, Ad, Bd, s)),
        ("qlora_linear no_grad", lambda: _nograd(lambda: lk.qlora_linear(x, q, Ad, Bd, 2.0))),
        ("qlora_linear fwd+bwd", lambda: torch.autograd.grad(lk.qlora_linear(x, q, A, B, 2.0), (x, A, B), g)),
        ("bf16 F.linear+LoRA fwd+bwd (autograd)",
         lambda: torch.autograd.grad(F.linear(x, W) + (x @ A.t() * 2.0) @ B.t(), (x, A, B), g)),
    ]
    print_host_costs(rows)

    # one real step under the profiler
    Kb, Nb = (int(v) for v in args.shape.split("x"))
    qb = lk.quantize_nf4(torch.randn(Nb, Kb, device=dev, dtype=bf) * 0.02)
    Ab = (torch.randn(r, Kb, device=dev, dtype=bf) * 0.02).requires_grad_()
    Bb = (torch.randn(Nb, r, device=dev, dtype=bf) * 0.02).requires_grad_()
    xb = torch.randn(args.m, Kb, device=dev, dtype=bf, requires_grad=True)
    gb = torch.randn(args.m, Nb, device=dev, dtype=bf)

    def step():
        return torch.autograd.grad(lk.qlora_linear(xb, qb, Ab, Bb, 2.0), (xb, Ab, Bb), gb)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        step()
    host = (time.perf_counter() - t) / 10 * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 10 * 1e3
    print(f"\nstep {args.shape} M={args.m}: host {host:.3f} ms/step, wall {wall:.3f} ms/step")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def decode(shape: str) -> None:
    """Host µs per call of each layer of the decode path (M = 1, no_grad), from the raw extension
    call up to the drop-in layer: where an eager decode step spends its time."""
    import os

    import lora_kernels as lk
    from lora_kernels import _ext, library
    from lora_kernels.lora_modules import QLoRALinear

    dev, bf, r = "cuda", torch.bfloat16, 16
    K, N = (int(v) for v in shape.split("x"))
    lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=bf)
    layer = QLoRALinear.from_linear(lin, r=r, lora_alpha=2 * r).to(dev)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    q, A, B = layer.weight, layer.lora_A.detach().to(bf), layer.lora_B.detach().to(bf)
    x = torch.randn(1, 1, K, device=dev, dtype=bf)
    x2 = x.view(1, K)
    ext = _ext.cuda_ext()
    args = (x2, q.packed.view(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, N, q.blocksize,
            A, B, 2.0, None, None)
    print(f"decode host cost, {shape}, M=1, r={r}, adapters {layer.lora_A.dtype}, "
          f"variant env={os.environ.get('LORA_KERNELS_GEMV_VARIANT')}")
    rows = [
        ("torch.empty(N)", lambda: torch.empty(N, device=dev, dtype=bf)),
        ("torch.mm 1xK KxN (bf16 W)", lambda: torch.mm(x2, lin.weight.t())),
        ("ext.lora_gemv raw", lambda: ext.lora_gemv(*args)),
        ("library._cuda_gemv", lambda: library._cuda_gemv(x2, q, A, B, 2.0, None)),
        ("library.lora_linear", lambda: library.lora_linear(x, q, A, B, 2.0)),
        ("qlora_linear(training=False)", lambda: lk.qlora_linear(x, q, A, B, 2.0, training=False)),
        ("layer(x) eval", lambda: layer.eval()(x)),
    ]
    with torch.no_grad():
        print_host_costs(rows)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(50):
                layer(x)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60))


def _nograd(fn):
    with torch.no_grad():
        return fn()


if __name__ == "__main__":
    main()
