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
    p.add_argument("--train-ladder", action="store_true",
                   help="only the training path's host cost, piece by piece (fp32 adapters, as PEFT keeps them)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("overhead_probe: needs a CUDA GPU (it measures host time around GPU launches); nothing to do")
        return
    if args.decode:
        return decode(args.shape)
    if args.train_ladder:
        return train_ladder()
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
        ("ext.lora_gemv_v5_slices (pybind, no launch)", lambda: ext.lora_gemv_v5_slices(1, N, K, q.blocksize, r)),
        ("ext.lora_gemv raw v1", lambda: ext.lora_gemv(*args)),
        ("ext.lora_gemv raw v5 r=16", lambda: ext.lora_gemv(*args, 5)),
        ("ext.lora_gemv raw v5 r=0", lambda: ext.lora_gemv(*args[:9], None, None, 1.0, None, None, 5)),
        ("library.gemv_variant_chosen", lambda: library.gemv_variant_chosen(1, N, K, True, q.blocksize, True)),
        ("library.decode_linear", lambda: library.decode_linear(x, q, A, B, 2.0, None)),
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


def train_ladder() -> None:
    """Host µs per call of each piece of a training step's LoRA layer (tiny tensors: the GPU never
    limits; K = N = 256, M = 32, r = 16), from single launches up to the autograd Function and the
    layer, with fp32 adapters (PEFT's default) and bf16 ones: where a fine-tune's per-layer host time
    goes.  The "forward pieces" rows force the merge route (two chunks per pass); the others take
    the default route (merge-cublas too)."""
    import lora_kernels as lk
    from lora_kernels import autograd as ag
    from lora_kernels import library, ops
    from lora_kernels.lora_modules import QLoRALinear
    from lora_kernels.triton.nf4_merge import merge_window

    dev, bf, r, K, N, M = "cuda", torch.bfloat16, 16, 256, 256, 32
    q = lk.quantize_nf4(torch.randn(N, K, device=dev, dtype=bf))
    A32 = (torch.randn(r, K, device=dev) * 0.05).requires_grad_()
    B32 = (torch.randn(N, r, device=dev) * 0.05).requires_grad_()
    A16 = A32.detach().to(bf).requires_grad_()
    B16 = B32.detach().to(bf).requires_grad_()
    x = torch.randn(M, K, device=dev, dtype=bf, requires_grad=True)
    xd = x.detach()
    g = torch.randn(M, N, device=dev, dtype=bf)
    y = torch.empty(M, N, device=dev, dtype=bf)
    ws = torch.empty(N * K, device=dev, dtype=bf)
    u = torch.randn(M, r, device=dev, dtype=bf)
    w = ops._nf4_view(q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, N, K, q.blocksize,
                      bf, checked=False)
    wt = (q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, N, K, q.blocksize)
    layer = QLoRALinear.from_linear(torch.nn.Linear(K, N, bias=False, device=dev, dtype=bf), r=r, lora_alpha=2 * r)
    layer = layer.to(dev).train()
    xl = torch.randn(2, M // 2, K, device=dev, dtype=bf, requires_grad=True)
    gl = torch.randn(2, M // 2, N, device=dev, dtype=bf)
    Ad, Bd = A32.detach(), B32.detach()
    Wd = w.dequantize(bf)

    def mm_out_dtype():
        return torch.mm(u.t(), xd, out_dtype=torch.float32)

    def addmm_out_dtype():
        return torch.addmm(torch.empty(r, K, device=dev), u.t(), xd, out_dtype=torch.float32, beta=0, alpha=2.0)

    def ckpt_step():
        yy = torch.utils.checkpoint.checkpoint(lambda t: lk.qlora_linear(t, q, A32, B32, 2.0), x, use_reentrant=False)
        return torch.autograd.grad(yy, (x, A32, B32), g)

    stored = [lk.qlora_linear(x, q, A32, B32, 2.0) for _ in range(400)]
    it = iter(stored)
    print(f"training-path host cost, K=N={K}, M={M}, r={r}, two merge chunks per pass")
    rows = [
        ("single launches:", None),
        ("  torch.empty(M, N)", lambda: torch.empty(M, N, device=dev, dtype=bf)),
        ("  A fp32 -> bf16 (.to)", lambda: Ad.to(bf)),
        ("  torch.mm x·Aᵀ bf16", lambda: torch.mm(xd, A16.detach().t())),
        ("  torch.mm out=y[:, :128]", lambda: torch.mm(xd, ws[:128 * K].view(128, K).t(), out=y[:, :128])),
        ("  merge_window (128 rows, fp32 A/B)", lambda: merge_window(ws, q, Ad, Bd, 2.0, None, (0, 128), (0, K))),
        ("  _mm_scaled (dA-like)", lambda: ag._mm_scaled(u.t(), xd, 2.0)),
        ("  torch.mm out_dtype=fp32 (dA-like)", mm_out_dtype),
        ("  torch.addmm out_dtype=fp32 beta=0 alpha", addmm_out_dtype),
        ("  grad cast bf16 -> fp32 (.to)", lambda: u.to(torch.float32)),
        ("forward pieces (no autograd):", None),
        ("  library.forward_2d (2 chunks)", lambda: library.forward_2d(xd, w, Ad, Bd, 2.0, None, whole_weight=False,
                                                                                route="merge-cublas")),
        ("  ops._forward_impl unchecked", lambda: ops._forward_impl(xd, w, Ad, Bd, 2.0, None, None, None,
                                                                    checked=False)),
        ("  library.dx_2d (2 chunks)", lambda: library.dx_2d(g, w, Ad, Bd, 2.0, route="merge-cublas")),
        ("autograd (fp32 adapters):", None),
        ("  LoRAFunction.apply fwd (NF4Weight: eager)", lambda: ag.LoRAFunction.apply(x, q, A32, B32, 2.0, None, 0.0,
                                                                                        True)),
        ("  QLoRAFunction.apply fwd (the traced form)",
         lambda: ag.QLoRAFunction.apply(x, *wt, A32, B32, 2.0, None, 0.0, True)),
        ("  qlora_linear fwd", lambda: lk.qlora_linear(x, q, A32, B32, 2.0)),
        ("  qlora_linear bwd only (stored fwd)", lambda: torch.autograd.grad(next(it), (x, A32, B32), g)),
        ("  qlora_linear fwd+bwd", lambda: torch.autograd.grad(lk.qlora_linear(x, q, A32, B32, 2.0), (x, A32, B32), g)),
        ("  same, checkpointed (non-reentrant)", ckpt_step),
        ("  QLoRALinear layer fwd+bwd (3-D x)",
         lambda: torch.autograd.grad(layer(xl), (xl, layer.lora_A, layer.lora_B), gl)),
        ("autograd (bf16 adapters):", None),
        ("  qlora_linear fwd+bwd, bf16 A/B",
         lambda: torch.autograd.grad(lk.qlora_linear(x, q, A16, B16, 2.0), (x, A16, B16), g)),
        ("  bf16 F.linear + LoRA (plain autograd)",
         lambda: torch.autograd.grad(F.linear(x, Wd) + (x @ A16.t() * 2.0) @ B16.t(), (x, A16, B16), g)),
    ]
    print(f"{'piece':45s} {'host us/call':>12s}")
    for name, fn in rows:
        if fn is None:
            print(name)
            continue
        print_host_costs([(name, fn)], n=300 if "stored" not in name else 350, header=False)
    from torch.profiler import ProfilerActivity, profile
    for name, fn in (("addmm out_dtype", addmm_out_dtype), ("mm out_dtype", mm_out_dtype),
                     ("qlora_linear fwd+bwd (fp32 adapters)", dict(rows)["  qlora_linear fwd+bwd"])):
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            kernels = [e.key[:70] for e in prof.events() if e.device_type.name == "CUDA"]
            print(f"kernels of one {name}: {len(kernels)}: {kernels}")
        except Exception as e:  # noqa: BLE001
            print(f"kernels of one {name}: failed: {type(e).__name__}: {e}"[:200])


def _nograd(fn):
    with torch.no_grad():
        return fn()


if __name__ == "__main__":
    main()
