"""Where the ``triton-small`` route (one launch per direction, ``triton/nf4_lora_small.py``) beats
``merge-cublas`` (T, merge chunks, cuBLAS) for a training step -- the data behind
``library.SMALL_MAX_MNK``.

Per shape (M, K -> N; K a multiple of the blocksize -- the demo's 352 -> 128 layer takes the
dequantize fallback on both paths, so 384 stands in for it), NF4 double quant, bf16 x, fp32 adapters (PEFT's default), r = 16, one
``qlora_linear`` forward + backward for x, A and B per step, both routes on the same inputs:
- ``eager_us``: a loop of eager steps divided by their count, synchronised once at the end: what a
  training loop sees (the larger of the host's cost and the GPU's time per step);
- ``gpu_us``: one step captured in a CUDA graph and replayed: the GPU's time alone.
``ratio`` = small / merge-cublas (< 1: the small route is faster).

    python -m benchmarks.bench_small_route [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from . import harness

ROW_KEYS = ("M", "K", "N", "r", "mnk", "route", "eager_us", "gpu_us", "ratio_eager", "ratio_gpu", "max_rel_diff",
            "note")
SHAPES = [(512, 128, 128), (512, 128, 352), (512, 384, 128), (2048, 512, 512), (2048, 1024, 1024),
          (4096, 1024, 1024), (2048, 2048, 256), (8192, 2048, 256), (2048, 2048, 2048), (8192, 1024, 1024),
          (4096, 2048, 2048), (8192, 2048, 2048)]
QUICK = [(512, 128, 352), (2048, 1024, 1024), (8192, 2048, 256), (4096, 2048, 2048)]


def _step_fn(lk, x, q, A, B, g):
    def step():
        y = lk.qlora_linear(x, q, A, B, 2.0)
        return torch.autograd.grad(y, (x, A, B), g)
    return step


def _eager_us(step, n: int) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def _graph_us(step, n: int) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--r", type=int, default=16)
    args = p.parse_args(argv)
    lk, env, gpu = harness.start("bench_small_route", ("qlora_linear",), False, "nothing to measure")
    if not gpu:
        return
    from lora_kernels import library

    dev, bf, r = "cuda", torch.bfloat16, args.r
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    saved = library.SMALL_MAX_MNK
    try:
        for M, K, N in (QUICK if args.quick else SHAPES):
            q = lk.quantize_nf4(torch.randn(N, K, device=dev, generator=gen) * 0.05)
            x = torch.randn(M, K, device=dev, dtype=bf, generator=gen).requires_grad_()
            A = (torch.randn(r, K, device=dev, generator=gen) * 0.05).requires_grad_()
            B = (torch.randn(N, r, device=dev, generator=gen) * 0.05).requires_grad_()
            g = torch.randn(M, N, device=dev, dtype=bf, generator=gen)
            n = max(20, min(400, int(2e10 / (M * N * K))))
            res = {}
            for route, limit in (("merge-cublas", 0), ("triton-small", 1 << 62)):
                library.SMALL_MAX_MNK = limit
                if library.forward_route(M, q, bf, x.device, r) != route:
                    raise SystemExit(f"bench_small_route: {route} not taken at M={M} {K}->{N}")
                step = _step_fn(lk, x, q, A, B, g)
                out = [t.float() for t in step()]
                row = harness.make_row(ROW_KEYS, M=M, K=K, N=N, r=r, mnk=M * N * K, route=route)
                try:
                    row["eager_us"] = _eager_us(step, n)
                    row["gpu_us"] = _graph_us(step, n)
                except Exception as e:  # noqa: BLE001  (a failed measurement is a row note, not a crash)
                    row["note"] = harness.short_error(e)
                res[route] = (row, out)
            (mrow, mout), (srow, sout) = res["merge-cublas"], res["triton-small"]
            srow["max_rel_diff"] = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(sout, mout))
            for key in ("eager", "gpu"):
                if srow.get(f"{key}_us") and mrow.get(f"{key}_us"):
                    srow[f"ratio_{key}"] = srow[f"{key}_us"] / mrow[f"{key}_us"]
            rows += [mrow, srow]
            print(f"M={M:5d} {K:5d}->{N:<5d} merge {mrow.get('eager_us', 0):8.1f} / {mrow.get('gpu_us', 0):8.1f} us"
                  f"   small {srow.get('eager_us', 0):8.1f} / {srow.get('gpu_us', 0):8.1f} us"
                  f"   (eager / graph), rel diff {srow['max_rel_diff']:.2e}", flush=True)
    finally:
        library.SMALL_MAX_MNK = saved
    name = f"small_route_{harness.slug(env['gpu'])}" + ("_quick" if args.quick else "")
    notes = ["one qlora_linear forward + backward (grads of x, A, B) per step; NF4 double quant, bf16 x, fp32 "
             "adapters, r = %d" % r,
             "eager_us: a loop of eager steps / their count (host and GPU overlapped); gpu_us: CUDA-graph replay of "
             "one step (the GPU's time alone)",
             "ratio_* = triton-small / merge-cublas at the same shape (< 1: the small route is faster); "
             "max_rel_diff: largest relative Frobenius difference of y's gradients (dx, dA, dB) between the routes"]
    print("\n".join(harness.write_results(name, rows, env, args.out, meta={"r": r}, notes=notes)))


if __name__ == "__main__":
    main()
