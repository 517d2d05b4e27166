"""Decode-kernel A/B (GPU): _C_cuda.lora_gemv variant 1 (csrc/cuda/nf4_gemv.cu: a T = x·Aᵀ kernel,
then the GEMV) against variant 2 (csrc/cuda/nf4_gemv_v2.cu: one persistent launch) and variant 3
(csrc/cuda/nf4_gemv_v3.cu: CUDA-core GEMV for small M), variant 4 (csrc/cuda/nf4_gemv_v4.cu: tensor
cores with the weight as the MMA's A operand, persistent grid) and variant 5 (csrc/cuda/nf4_gemv_v5.cu:
variant 4's MMA fed from a per-warp cp.async ring), kernel time by CUDA-graph replay, against the
memory floor = NF4 weight bytes as stored / device-to-device copy bandwidth (measured here), and
whether the variants agree (max |y1 - yv| for v = 2..5).

Shapes K x N (in -> out): 4096x14336, 14336x4096, 8192x28672, 4096x4096; M in {1, 16}; r in {0, 16}
(bf16, blocksize 64, double quantization, no bias).  Several weights are rotated so that the 4-bit
weight is not L2-resident between calls.  About a minute on an H100.

    python -m benchmarks.gemv_variants [--quick] [--reps N] [--ms 1,4,8,16] [--json PATH] [--variants 1,2,3]
                                       [--v5-deep] [--v5-light] [--v5-env NAME=VALUE[,NAME=VALUE...]]
    python -m benchmarks.gemv_variants --diagnose 5 [--ms 1,16]

"v2 ran" is "no" where variant 2 would fall back to variant 1 (lora_gemv_v2_workspace == -1); "v3 ran"
likewise (lora_gemv_v3_supported; by default variant 3 takes M <= 4, LORA_KERNELS_GEMV_V3_MAX_M
moves that); "v4 ran" likewise (lora_gemv_v4_supported); "v5 ran" likewise (lora_gemv_v5_slices > 0;
the JSON also records the K slices it used).  Without variant 3, 4 or 5 in the build (or left out by
--variants) their columns are NaN."""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from benchmarks.gemv_probe import graph_time

SHAPES = ((4096, 14336), (14336, 4096), (8192, 28672), (4096, 4096))
MS = (1, 16)
RANKS = (0, 16)


def graph_time_us(fn, calls_per_graph: int, reps: int) -> float:
    """Median time of one of the ``calls_per_graph`` calls fn() makes, in µs (gemv_probe.graph_time:
    `reps` calls of fn captured in one CUDA graph, replayed 5 times)."""
    return graph_time(fn, reps) / calls_per_graph


def _args(x, q, A, B):
    nested = q.double_quant
    return (x, q.packed.view(-1), q.absmax, q.nested_absmax if nested else None, q.nested_code if nested else None,
            q.offset if nested else None, q.code, q.shape[0], q.blocksize, A, B, 2.0, None, None)


COLUMNS = ("shape", "M", "r", "v1_us", "v2_us", "v3_us", "v4_us", "v5_us", "floor_us", "v1_over_floor",
           "v2_over_floor", "v3_over_floor", "v4_over_floor", "v5_over_floor", "v2_ran", "v3_ran", "v4_ran", "v5_ran",
           "v5_slices", "v5_mode", "v5_stages", "v5deep_us", "v5deep_over_floor", "v5deep_stages", "v5light_us",
           "v5light_over_floor", "v5light_same_bits", "rel_diff", "v3_rel_diff", "v4_rel_diff", "v5_rel_diff",
           "v5deep_rel_diff") + tuple(f"v5env{i}{k}" for i in range(4) for k in ("", "_us", "_over_floor", "_same_bits"))


def write_json_md(json_path: str, rows, env: dict, bw: float, l2: int, reps: int):
    """The rows as ``harness.write_results`` files beside ``json_path`` (name = its stem): JSON with
    the machine and versions, and a markdown table of the variants that ran (columns all NaN / n/a,
    i.e. variants left out of this run, are dropped)."""
    from benchmarks import harness

    outdir, name = os.path.dirname(json_path) or ".", os.path.splitext(os.path.basename(json_path))[0]
    cols = [c for c in COLUMNS
            if any(r.get(c) is not None and r.get(c) == r.get(c) and r.get(c) != "n/a" for r in rows)]
    meta = {"copy_bw_gbps": bw / 1e9, "l2_mib": l2 / 2**20, "graph_calls": reps,
            "timing": "CUDA-graph replay of the calls over rotated weights, median of 5 replays"}
    notes = ["floor = NF4 weight bytes as stored / copy bandwidth measured in the same run; bf16, blocksize 64, "
             "double quantization, no bias",
             "vN ran = no: that variant does not take these sizes and the extension ran variant 1 instead",
             "rel_diff columns: max |y1 - yv| / max |y1| (variant v against variant 1, same inputs)"]
    return harness.write_results(name, rows, env, outdir, meta=meta, columns=cols, notes=notes)


def diagnose(ext, v: int, ms) -> int:
    """Variant v against variant 1, call by call (synchronised), on small shapes; prints the error's pattern.
    Returns 0 when every case agrees within bf16 rounding, 1 otherwise."""
    import lora_kernels as lk
    torch.manual_seed(0)
    bad = 0
    for K, N in ((64, 16), (128, 64), (256, 48), (4096, 512), (4096, 14336)):
        q = lk.quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            for r in (0, 16):
                A = torch.randn(r, K, device="cuda", dtype=torch.bfloat16) * 0.02 if r else None
                B = torch.randn(N, r, device="cuda", dtype=torch.bfloat16) * 0.02 if r else None
                a = _args(x, q, A, B)
                try:
                    y1 = ext.lora_gemv(*a, variant=1).float()
                    yv = ext.lora_gemv(*a, variant=v).float()
                    torch.cuda.synchronize()
                except RuntimeError as e:
                    print(f"{K}x{N} M={M} r={r}: variant {v} raised {str(e)[:200]}")
                    return 1
                err = (yv - y1).abs()
                tol = 1e-2 * max(y1.abs().max().item(), 1e-30)
                wrong = (err > tol) | ~torch.isfinite(yv)
                line = (f"{K}x{N} M={M} r={r}: max|y{v}-y1| = {err.max().item():.3e} (tol {tol:.1e}), "
                        f"{int(wrong.sum())} of {wrong.numel()} wrong")
                if wrong.any():
                    bad += 1
                    rows = wrong.any(0).nonzero().flatten()
                    cols = wrong.any(1).nonzero().flatten()
                    ref = y1[wrong]
                    ratio = yv[wrong] / ref.where(ref != 0, torch.ones_like(ref))
                    line += (f"; rows n: {rows.numel()} (n mod 16 seen {sorted(set((rows % 16).tolist()))}, "
                             f"first {rows[:8].tolist()}); cols m: {cols.tolist()[:16]}; NaN/inf "
                             f"{int((~torch.isfinite(yv)).sum())}; zeros {int((yv[wrong] == 0).sum())}; "
                             f"y{v}/y1 median {ratio.median().item():.3g}")
                print(line, flush=True)
    print(f"diagnose variant {v}: {'all agree' if not bad else f'{bad} case(s) differ'}")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="first two shapes only")
    ap.add_argument("--reps", type=int, default=20, help="calls of the weight rotation per graph (default 20)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--ms", default=",".join(map(str, MS)),
                    help="rows of x to time, comma-separated, each 1..16 (default 1,16; e.g. 1,4,8,16)")
    ap.add_argument("--variants", default="1,2,3,4,5",
                    help="variants to time, comma-separated, 1 and 2 always included (default 1,2,3,4,5; "
                         "leave out one whose tests failed, so a fault in it cannot end the run)")
    ap.add_argument("--v5-deep", action="store_true",
                    help="also time variant 5 with $LORA_KERNELS_GEMV_V5_STAGES=6 (its 6-stage ring where x fits "
                         "beside it; column v5deep, and v5deep_stages says which ring ran)")
    ap.add_argument("--v5-light", action="store_true",
                    help="also time variant 5 with $LORA_KERNELS_GEMV_V5_PIECES=light (with x per K slice and a "
                         "low-rank term: the T pieces to the light warps first; column v5light, and "
                         "v5light_same_bits whether y has the same bits as the default piece map's)")
    ap.add_argument("--v5-env", default="", metavar="NAME=VALUE[,...]",
                    help="also time variant 5 with each of these environment settings in turn (at most 4; e.g. "
                         "LORA_KERNELS_GEMV_V5_PIECES=slot,LORA_KERNELS_GEMV_V5_FINISH=plain: the A/B switches "
                         "against the default; columns v5env<i>_us and v5env<i>_same_bits, whether y has the "
                         "same bits as the default's)")
    ap.add_argument("--diagnose", type=int, default=0, metavar="V",
                    help="instead of timing, compare variant V with variant 1 on small shapes, one call at a time, "
                         "and print where they differ (rows n mod 16, columns m, NaN/inf, zeros)")
    args = ap.parse_args(argv)
    wanted = {int(v) for v in args.variants.split(",") if v.strip()} | {1, 2}
    v5_envs = [e.strip().split("=", 1) for e in args.v5_env.split(",") if e.strip()]
    if len(v5_envs) > 4 or any(len(e) != 2 or not e[0].startswith("LORA_KERNELS_") for e in v5_envs):
        ap.error(f"--v5-env: at most 4 NAME=VALUE pairs, each NAME a LORA_KERNELS_ switch, got {args.v5_env!r}")
    # variant 5 timed again under each A/B setting: (column prefix, variable, value)
    v5_alts = ([("v5light", "LORA_KERNELS_GEMV_V5_PIECES", "light")] if args.v5_light else []) + \
        [(f"v5env{i}", name, value) for i, (name, value) in enumerate(v5_envs)]
    if not wanted <= {1, 2, 3, 4, 5}:
        ap.error(f"--variants: each must be 1..5, got {args.variants!r}")
    if args.diagnose not in (0, 2, 3, 4, 5):
        ap.error(f"--diagnose: a variant 2..5 to compare with variant 1, got {args.diagnose}")
    ms = [int(v) for v in args.ms.split(",") if v.strip()]
    if not ms or any(m < 1 or m > 16 for m in ms):
        ap.error(f"--ms: rows of x must be in 1..16, got {args.ms!r}")
    if not torch.cuda.is_available():
        print("gemv_variants: needs a CUDA GPU (nothing measured)")
        return 0
    import lora_kernels as lk
    from lora_kernels import _ext

    from benchmarks import harness

    ext = _ext.cuda_ext()
    if ext is None or not hasattr(ext, "lora_gemv"):
        print("gemv_variants: lora_kernels._C_cuda with lora_gemv is not built "
              "(LORA_KERNELS_BUILD_CUDA=1 python setup.py build_ext --inplace)")
        return 1
    if args.diagnose:
        return diagnose(ext, args.diagnose, ms)
    extra = tuple(v for v in (3, 4, 5) if v in wanted and lk.library.gemv_variant_built(v))
    variants = (1, 2) + extra

    def ran(v, M, N, K, r):   # "yes" / "no" (falls back to variant 1) / "?" (the build cannot tell)
        got = lk.library.gemv_variant_runs(v, M, N, K, 64, r)
        return "?" if got is None else ("yes" if got else "no")

    torch.manual_seed(0)
    bw = harness.measure_copy_bandwidth(nbytes=1024**3, rep_ms=100.0)
    l2 = harness.l2_bytes()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, "
          f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write), torch {torch.__version__}")
    rows = []
    shapes = SHAPES[:2] if args.quick else SHAPES
    hdr = (f"{'K x N':>12} {'M':>3} {'r':>3} | {'v1 us':>7} {'v2 us':>7} {'v3 us':>7} {'v4 us':>7} {'v5 us':>7} "
           f"{'floor':>7} | {'v1/fl':>6} {'v2/fl':>6} {'v3/fl':>6} {'v4/fl':>6} {'v5/fl':>6} {'v1/v2':>6} | "
           f"{'max|dy|':>9} {'rel':>8} {'rel v3':>8} {'rel v4':>8} {'rel v5':>8} {'v2 ran':>6} {'v3 ran':>6} "
           f"{'v4 ran':>6} {'v5 ran':>6}")
    print(hdr)
    print("-" * len(hdr))
    for K, N in shapes:
        probe = lk.quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
        wbytes = probe.nbytes()
        n_w = min(16, max(2, math.ceil(2.2 * l2 / wbytes)))   # rotated weights: > 2x L2 in total
        qs = [probe] + [lk.quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
                        for _ in range(n_w - 1)]
        floor_us = wbytes / bw * 1e6
        A16 = torch.randn(16, K, device="cuda", dtype=torch.bfloat16) * 0.02
        B16 = torch.randn(N, 16, device="cuda", dtype=torch.bfloat16) * 0.02
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            for r in RANKS:
                A, B = (A16, B16) if r else (None, None)
                per_q = [_args(x, q, A, B) for q in qs]
                us, outs = {}, {}
                for v in variants:
                    us[v] = graph_time_us(lambda v=v: [ext.lora_gemv(*a, variant=v) for a in per_q], n_w, args.reps)
                    outs[v] = ext.lora_gemv(*per_q[0], variant=v).float()
                torch.cuda.synchronize()
                diff = (outs[1] - outs[2]).abs().max().item()
                rel = diff / max(outs[1].abs().max().item(), 1e-30)
                ran2 = ran(2, M, N, K, r)
                row = dict(shape=f"{K}x{N}", M=M, r=r, v1_us=us[1], v2_us=us[2], floor_us=floor_us,
                           v1_over_floor=us[1] / floor_us, v2_over_floor=us[2] / floor_us, v1_over_v2=us[1] / us[2],
                           max_abs_diff=diff, rel_diff=rel, v2_ran=ran2, weights_rotated=n_w,
                           weight_bytes=wbytes, copy_bw_gbps=bw / 1e9)
                for v in (3, 4, 5):
                    if v in extra:
                        dv = (outs[1] - outs[v]).abs().max().item()
                        row.update({f"v{v}_us": us[v], f"v{v}_max_abs_diff": dv,
                                    f"v{v}_rel_diff": dv / max(outs[1].abs().max().item(), 1e-30),
                                    f"v{v}_ran": ran(v, M, N, K, r)})
                    else:
                        row.update({f"v{v}_us": float("nan"), f"v{v}_max_abs_diff": float("nan"),
                                    f"v{v}_rel_diff": float("nan"), f"v{v}_ran": "n/a"})
                    row[f"v{v}_over_floor"] = row[f"v{v}_us"] / floor_us
                if 5 in extra:
                    row["v5_slices"] = ext.lora_gemv_v5_slices(M, N, K, 64, r)
                    if hasattr(ext, "lora_gemv_v5_stages"):
                        row["v5_stages"] = ext.lora_gemv_v5_stages(M, N, K, 64, r)
                    if hasattr(ext, "lora_gemv_v5_mode"):   # 1: all of x in shared memory, 2: x per K slice
                        row["v5_mode"] = ext.lora_gemv_v5_mode(M, N, K, 64, r)
                def v5_with_env(name, value):
                    """Variant 5's time and output with $name=value (an A/B switch read per call)."""
                    os.environ[name] = value
                    try:
                        t = graph_time_us(lambda: [ext.lora_gemv(*a, variant=5) for a in per_q], n_w, args.reps)
                        out = ext.lora_gemv(*per_q[0], variant=5).float()
                        torch.cuda.synchronize()
                        stages = ext.lora_gemv_v5_stages(M, N, K, 64, r) if hasattr(ext, "lora_gemv_v5_stages") else 0
                    finally:
                        del os.environ[name]
                    return t, out, stages

                if 5 in extra and args.v5_deep:
                    t, out, stages = v5_with_env("LORA_KERNELS_GEMV_V5_STAGES", "6")
                    dv = (outs[1] - out).abs().max().item()
                    row.update(v5deep_us=t, v5deep_over_floor=t / floor_us, v5deep_stages=stages,
                               v5deep_rel_diff=dv / max(outs[1].abs().max().item(), 1e-30))
                    print(f"{'':>12} {'':>3} {'':>3}   v5 with $LORA_KERNELS_GEMV_V5_STAGES=6: {t:7.1f} us "
                          f"({t / floor_us:.2f}x floor, {stages} stages ran; rel diff {row['v5deep_rel_diff']:.1e})",
                          flush=True)
                for col, name, value in (v5_alts if 5 in extra else []):
                    t, out, _ = v5_with_env(name, value)
                    same = "yes" if torch.equal(out, outs[5]) else "NO"
                    row.update({f"{col}_us": t, f"{col}_over_floor": t / floor_us, f"{col}_same_bits": same})
                    if col.startswith("v5env"):
                        row[col] = f"{name[len('LORA_KERNELS_'):]}={value}"
                    print(f"{'':>12} {'':>3} {'':>3}   v5 with ${name}={value}: {t:7.1f} us "
                          f"({t / floor_us:.2f}x floor; same bits as the default: {same})", flush=True)
                rows.append(row)
                print(f"{row['shape']:>12} {M:>3} {r:>3} | {us[1]:7.1f} {us[2]:7.1f} {row['v3_us']:7.1f} "
                      f"{row['v4_us']:7.1f} {row['v5_us']:7.1f} {floor_us:7.1f} | {row['v1_over_floor']:6.2f} "
                      f"{row['v2_over_floor']:6.2f} {row['v3_over_floor']:6.2f} {row['v4_over_floor']:6.2f} "
                      f"{row['v5_over_floor']:6.2f} {row['v1_over_v2']:6.2f} | {diff:9.2e} {rel:8.1e} "
                      f"{row['v3_rel_diff']:8.1e} {row['v4_rel_diff']:8.1e} {row['v5_rel_diff']:8.1e} {ran2:>6} "
                      f"{row['v3_ran']:>6} {row['v4_ran']:>6} {row['v5_ran']:>6}", flush=True)
        del qs, probe
        torch.cuda.empty_cache()
    worst = max([r["rel_diff"] for r in rows]
                + [r[k] for r in rows for k in ("v3_rel_diff", "v4_rel_diff", "v5_rel_diff", "v5deep_rel_diff")
                   if k in r and r[k] == r[k]])
    print(f"variants agree: max relative |y1 - yv| / max|y1| over v = 2..5 = {worst:.2e} "
          f"({'OK' if worst < 1e-2 else 'MISMATCH'}; bf16 output rounding alone is ~4e-3 at most)")
    if args.json:
        jpath, mpath = write_json_md(args.json, rows, harness.env_info(), bw, l2, args.reps)
        print(f"wrote {jpath} and {mpath}")
    return 0 if worst < 1e-2 else 2


if __name__ == "__main__":
    sys.exit(main())
