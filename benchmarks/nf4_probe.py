"""Where the time of NF4 quantize / dequantize goes on the GPU (issue 2 diagnostics; not a result).

1. Per-kernel device times of ``quantize_nf4(w, check_finite=False)`` (CUDA backend) from the
   torch profiler: the block pass, torch's mean, the nested pass, table copies.
2. quantize_nf4's two double-quantization routes by CUDA-graph replay (two launches, torch.mean's
   order replayed, in each $LORA_KERNELS_DQ_VARIANT / three kernels with torch's mean), and
   dequantize_nf4 (CUDA, Triton) with and without $LORA_KERNELS_DEQUANT_PDL=1; ``--choose FILE``
   writes the best of each as shell exports for a bench run in the same device call.
3. The Triton dequantize kernel under other launch shapes (elements per program x warps), by
   CUDA-graph replay over enough weights to defeat the L2, beside a torch copy of the same bytes.

    python -m benchmarks.nf4_probe [--shapes 4096x4096,8192x28672]
"""

from __future__ import annotations

import argparse
import collections
import os

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


DQ_VARIANTS = {"0": "v1", "1": "v1+pdl", "2": "v2", "3": "v2+pdl", "7": "v2+pdl2"}  # $LORA_KERNELS_DQ_VARIANT
# (pdl: the second kernel a programmatic dependent of the block pass; pdl2: the block pass one of
# the kernel before it, too)


def _quantize_ab(shape: tuple[int, int], copy_bw: float, results: dict) -> None:
    """quantize_nf4 (CUDA backend, double quant, no finite check) by CUDA-graph replay: the two-launch
    route (torch.mean's order replayed, library.FUSED_DOUBLE_QUANT) in each $LORA_KERNELS_DQ_VARIANT,
    interleaved twice, against the three-kernel one; every variant's fields checked against the
    three-kernel route's."""
    import lora_kernels as lk
    from benchmarks.bench_nf4 import quant_bytes
    from lora_kernels import library

    n = shape[0] * shape[1]
    floor_ms = quant_bytes(n) / copy_bw * 1e3                       # the bench's floor
    sets = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(harness.sets_for_l2(2 * n))]

    def q(w):
        lk.quantize_nf4(w, check_finite=False, backend="cuda")

    library.FUSED_DOUBLE_QUANT = False
    ref = lk.quantize_nf4(sets[0], check_finite=False, backend="cuda")
    res = {"three kernels": [harness.time_cuda(q, sets, use_graph=True)["median_ms"]]}
    library.FUSED_DOUBLE_QUANT = True
    exact = {}
    try:
        for _ in range(2):
            for var, name in DQ_VARIANTS.items():
                os.environ["LORA_KERNELS_DQ_VARIANT"] = var
                res.setdefault(name, []).append(harness.time_cuda(q, sets, use_graph=True)["median_ms"])
                o = lk.quantize_nf4(sets[0], check_finite=False, backend="cuda")
                exact[name] = exact.get(name, True) and all(
                    torch.equal(a, b) for a, b in ((o.packed, ref.packed), (o.absmax, ref.absmax),
                                                   (o.nested_absmax, ref.nested_absmax), (o.offset, ref.offset)))
    finally:
        os.environ.pop("LORA_KERNELS_DQ_VARIANT", None)
    print(f"  torch.mean replay orders found (shfl_up per (device, nb)): {library._mean_replay_orders}")
    for name, ts in res.items():
        print(f"  {shape} quantize {name:>14}: " + " / ".join(f"{t * 1e3:7.2f} µs frac {floor_ms / t:.3f}" for t in ts)
              + (f"  exact={exact[name]}" if name in exact else ""))
        results.setdefault(("quantize", name), []).append((min(ts) / floor_ms, exact.get(name, True)))


def _dequant_pdl_ab(shape: tuple[int, int], copy_bw: float, results: dict) -> None:
    """dequantize_nf4 (bf16 out, graph replay) on the CUDA and Triton backends with and without
    $LORA_KERNELS_DEQUANT_PDL=1, interleaved twice, beside a copy of the same bytes; values checked
    against the plain launch."""
    import lora_kernels as lk
    from benchmarks.bench_nf4 import dequant_bytes

    n = shape[0] * shape[1]
    floor_ms = dequant_bytes(n) / copy_bw * 1e3
    sets_n = harness.sets_for_l2(n // 2 + 2 * n)
    qs = [lk.quantize_nf4(torch.randn(shape, device="cuda", dtype=torch.bfloat16), backend="cuda")
          for _ in range(sets_n)]
    outs = [torch.empty(shape, device="cuda", dtype=torch.bfloat16) for _ in range(sets_n)]
    sets = list(zip(qs, outs))
    srcs = [torch.empty(n // 2 + n // 64 + 2 * n, dtype=torch.uint8, device="cuda") for _ in range(sets_n)]
    dsts = [torch.empty_like(s) for s in srcs]
    t = harness.time_cuda(lambda s, d: d.copy_(s), list(zip(srcs, dsts)), use_graph=True)["median_ms"]
    print(f"  {shape} dequantize {'copy of the same bytes':>22}: {t * 1e3:7.2f} µs  frac {floor_ms / t:.3f}")
    try:
        for backend in ("cuda", "triton"):
            os.environ.pop("LORA_KERNELS_DEQUANT_PDL", None)
            plain = lk.dequantize_nf4(qs[0], backend=backend)
            for _ in range(2):
                for pdl in ("0", "1"):
                    os.environ["LORA_KERNELS_DEQUANT_PDL"] = pdl
                    name = f"{backend}{'+pdl' if pdl == '1' else ''}"
                    try:
                        t = harness.time_cuda(lambda q, o, b=backend: lk.dequantize_nf4(q, backend=b, out=o), sets,
                                              use_graph=True)["median_ms"]
                        ok = torch.equal(outs[0], plain)  # the graph's last replay wrote set 0's too
                        print(f"  {shape} dequantize {name:>22}: {t * 1e3:7.2f} µs  frac {floor_ms / t:.3f}  exact={ok}")
                        results.setdefault(("dequantize", name), []).append((floor_ms / t, ok))
                    except Exception as e:  # noqa: BLE001
                        print(f"  {shape} dequantize {name:>22}: {harness.short_error(e)}")
                        results.setdefault(("dequantize", name), []).append((0.0, False))
    finally:
        os.environ.pop("LORA_KERNELS_DEQUANT_PDL", None)


def _choose(results: dict, path: str) -> None:
    """Write the launch switches that measured best here as shell exports (for the bench that follows
    in the same device call): the quantize variant and the dequantize PDL flag with the best mean
    fraction of copy bandwidth over the shapes, among those exact on every shape."""
    lines = []
    for op, env, names in (("quantize", "LORA_KERNELS_DQ_VARIANT", {v: k for k, v in DQ_VARIANTS.items()}),
                           ("dequantize", "LORA_KERNELS_DEQUANT_PDL", None)):
        scores = {}
        for (o, name), vals in results.items():
            if o != op or name == "three kernels" or not all(ok for _, ok in vals):
                continue
            if op == "quantize":
                scores[names[name]] = sum(1.0 / r for r, _ in vals) / len(vals)  # fraction of copy bw
            else:  # both backends' PDL runs together: best of the two backends per flag
                flag = "1" if name.endswith("+pdl") else "0"
                scores.setdefault(flag, {}).setdefault(name.split("+")[0], []).extend(r for r, _ in vals)
        if op == "dequantize":
            scores = {f: max(sum(v) / len(v) for v in per_backend.values()) for f, per_backend in scores.items()}
        if scores:
            best = max(scores, key=scores.get)
            lines.append(f"export {env}={best}  # {op}: " + ", ".join(f"{k}: {v:.4f}" for k, v in sorted(scores.items())))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("chosen:\n" + "\n".join(lines))


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
    ap.add_argument("--choose", metavar="FILE", help="write the best launch switches as shell exports to FILE")
    args = ap.parse_args()
    results: dict = {}
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    copy_bw = harness.measure_copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    for shape in shapes:
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        for var in ("0", "2"):  # per-kernel device times of the v1 and v2 second kernels (plain launches)
            os.environ["LORA_KERNELS_DQ_VARIANT"] = var
            print(f"  LORA_KERNELS_DQ_VARIANT={var}")
            _profile_quantize(w)
        os.environ.pop("LORA_KERNELS_DQ_VARIANT", None)
        del w
        _quantize_ab(shape, copy_bw, results)
        _dequant_pdl_ab(shape, copy_bw, results)
        if not args.no_sweep:
            _dequant_sweep(shape, copy_bw)
        torch.cuda.empty_cache()
    if args.choose:
        _choose(results, args.choose)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
