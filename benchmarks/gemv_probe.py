"""Decode-kernel probe (GPU): CUDA-graph time of the cuda-gemv route per rows-per-CTA choice
(LORA_KERNELS_GEMV_NT) and of its two launches apart, against the memory floor.  A development
tool: the reported numbers come from bench_forward.  Usage: python -m benchmarks.gemv_probe"""

import os
import sys

import torch

import lora_kernels as lk
from benchmarks import harness

SHAPES = ((4096, 14336), (14336, 4096), (8192, 28672), (4096, 4096))


def graph_time(fn, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        t.append(a.elapsed_time(b) / reps * 1e3)
    return sorted(t)[2]


def main():
    bw = harness.measure_copy_bandwidth(rep_ms=50.0)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    for K, N in SHAPES:
        # 4 weights rotated so the 4-bit weight is not L2-resident between calls
        qs = [lk.quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(4)]
        A = torch.randn(16, K, device="cuda", dtype=torch.bfloat16) * 0.02
        B = torch.randn(N, 16, device="cuda", dtype=torch.bfloat16) * 0.02
        floor_us = qs[0].nbytes() / bw * 1e6
        for M in (1, 16):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            line = [f"{K}x{N} M={M:2d} floor {floor_us:6.1f} us:"]
            for nt in ("1", "2", "4", ""):
                os.environ["LORA_KERNELS_GEMV_NT"] = nt
                us = graph_time(lambda: [lk.lora_linear(x, q, A, B, 2.0, route="cuda-gemv") for q in qs]) / 4
                line.append(f"NT={nt or 'auto'} {us:6.1f} ({us / floor_us:.2f}x)")
            os.environ["LORA_KERNELS_GEMV_NT"] = ""
            us = graph_time(lambda: [lk.lora_linear(x, q, route="cuda-gemv") for q in qs]) / 4
            line.append(f"no-LoRA {us:6.1f} ({us / floor_us:.2f}x)")
            print("  ".join(line), flush=True)
        del qs
    return 0


if __name__ == "__main__":
    sys.exit(main())
