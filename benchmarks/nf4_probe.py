"""Where the time of NF4 quantize / dequantize goes on the GPU (issue 2 diagnostics; not a result).

1. Per-kernel device times of ``quantize_nf4(w, check_finite=False)`` (CUDA backend) from the
   torch profiler: the block pass, torch's mean, the nested pass, table copies.
2. quantize_nf4's two double-quantization routes by CUDA-graph replay (two launches, torch.mean's
   order replayed / three kernels with torch's mean).
3. The Triton dequantize kernel under other launch shapes (elements per program x warps), by
   CUDA-graph replay over enough weights to defeat the L2, beside a torch copy of the same bytes.

    python -m benchmarks.nf4_probe [--shapes 4096x4096,8192x28672]
"""

from __future__ import annotations

import argparse
import collections

import torch

from benchmarks import harness


def _profile_quantize(w: torch.Tensor, reps: int = 20) -> None:
    import lora_kernels as lk
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        lk.quantize_nf4(w, check_finite=False, backend="cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            lk.quantize_nf4(w, check_finite=False, backend="cuda")
        torch.cuda.synchronize()
    tot: dict[str, float] = collections.defaultdict(float)
    cnt: dict[str, int] = collections.defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            cnt[ev.name] += 1
    print(f"  quantize_nf4 {tuple(w.shape)} per call, by kernel (device µs):")
    for name, t in sorted(tot.items(), key=lambda kv: -kv[1]):
        print(f"    {t / reps:8.2f} µs  x{cnt[name] / reps:.0f}  {name[:110]}")


def _quantize_ab(shape: tuple[int, int], copy_bw: float) -> None:
    """quantize_nf4 (CUDA backend, double quant, no finite check) by CUDA-graph replay: the two-launch
    route (torch.mean's order replayed, library.FUSED_DOUBLE_QUANT) against the three-kernel one."""
    import lora_kernels as lk
    from benchmarks.bench_nf4 import quant_bytes
    from lora_kernels import library

    n = shape[0] * shape[1]
    floor_ms = quant_bytes(n) / copy_bw * 1e3                       # the bench's floor
    sets = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(harness.sets_for_l2(2 * n))]

    def q(w):
        lk.quantize_nf4(w, check_finite=False, backend="cuda")

    res = {}
    for fused in (True, False, True):
        library.FUSED_DOUBLE_QUANT = fused
        try:
            t = harness.time_cuda(q, sets, use_graph=True)["median_ms"]
        finally:
            library.FUSED_DOUBLE_QUANT = True
        res.setdefault(fused, []).append(t)
    print(f"  torch.mean replay orders found (shfl_up per (device, nb)): {library._mean_replay_orders}")
    for fused, ts in res.items():
        name = "two launches (replayed mean)" if fused else "three kernels (torch mean)"
        print(f"  {shape} quantize {name:>30}: " + " / ".join(f"{t * 1e3:7.2f} µs frac {floor_ms / t:.3f}" for t in ts))


def _dequant_sweep(shape: tuple[int, int], copy_bw: float) -> None:
    import lora_kernels as lk
    from lora_kernels.triton import nf4_quant

    n = shape[0] * shape[1]
    floor_ms = (n // 2 + n // 64 + 2 * n) / copy_bw * 1e3
    sets_n = harness.sets_for_l2(n // 2 + 2 * n)
    qs = [lk.quantize_nf4(torch.randn(shape, device="cuda", dtype=torch.bfloat16), backend="cuda")
          for _ in range(sets_n)]
    outs = [torch.empty(n, device="cuda", dtype=torch.bfloat16) for _ in range(sets_n)]
    sets = list(zip(qs, outs))

    def tri(q, o):
        nf4_quant.dequantize(q.packed.view(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code,
                             n, 64, torch.bfloat16, out=o)

    def cud(q, o):
        lk.dequantize_nf4(q, backend="cuda", out=o)

    srcs = [torch.empty(n // 2 + n // 64 + 2 * n, dtype=torch.uint8, device="cuda") for _ in range(sets_n)]
    dsts = [torch.empty_like(s) for s in srcs]

    def cp(s, d):
        d.copy_(s)

    base = {"copy": harness.time_cuda(cp, list(zip(srcs, dsts)), use_graph=True)["median_ms"],
            "cuda": harness.time_cuda(cud, sets, use_graph=True)["median_ms"]}
    for k, v in base.items():
        print(f"  {shape} {k:>22}: {v * 1e3:7.2f} µs  frac {floor_ms / v:.3f}")
    e0, w0 = nf4_quant._DEQUANT_ELEMS, nf4_quant._DEQUANT_WARPS
    try:
        for elems in (2048, 4096, 8192, 16384, 32768):
            for warps in (4, 8, 16):
                if elems // (32 * warps) < 8:
                    continue
                nf4_quant._DEQUANT_ELEMS, nf4_quant._DEQUANT_WARPS = elems, warps
                try:
                    t = harness.time_cuda(tri, sets, use_graph=True)["median_ms"]
                    ok = torch.equal(outs[0], lk.dequantize_nf4(qs[0], backend="cuda").view(-1))
                    print(f"  {shape} triton e{elems:>5} w{warps:>2}: {t * 1e3:7.2f} µs  frac {floor_ms / t:.3f}"
                          f"  exact={ok}")
                except Exception as e:  # noqa: BLE001
                    print(f"  {shape} triton e{elems} w{warps}: {harness.short_error(e)}")
    finally:
        nf4_quant._DEQUANT_ELEMS, nf4_quant._DEQUANT_WARPS = e0, w0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,4096x14336,8192x28672")
    ap.add_argument("--no-sweep", action="store_true", help="skip the Triton dequantize launch-shape sweep")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    copy_bw = harness.measure_copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    for shape in shapes:
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        _profile_quantize(w)
        del w
        _quantize_ab(shape, copy_bw)
        if not args.no_sweep:
            _dequant_sweep(shape, copy_bw)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
