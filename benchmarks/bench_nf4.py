"""NF4 quantize / dequantize benchmark: our backends against bitsandbytes, and against the copy floor.

GPU mode, per bf16 weight shape N_out x K_in (blocksize 64, double quantization):
  dequantize  ours per GPU backend, into a preallocated ``out=`` ("out") and allocating ("alloc"),
              and "out" captured in a CUDA graph ("out_graph": GPU time without the Python and
              launch overhead, which dominates the small shapes' ~15 us floors);
              bitsandbytes' dequantize_4bit on the same weight quantized by bitsandbytes;
  quantize    ours per backend (default call, and with check_finite=False: "no_check");
              bitsandbytes' quantize_4bit(compress_statistics=True, quant_type="nf4");
  floor       bytes that must move / copy bandwidth measured in this run; ``frac_copy_bw`` is
              floor / measured time (1.0 = as fast as a plain copy of the same bytes);
  check       once per shape and backend, before timing: our packed bytes, absmax codes, nested
              absmax, offset and dequantized values against bitsandbytes' (mismatch counts; the run
              never fails on them).
CPU mode (no GPU): only the quantizer, ours ("cpp", "reference") against bitsandbytes' CPU path.

    python -m benchmarks.bench_nf4 [--quick] [--out benchmarks/results] [--backends cuda,triton]
                                   [--shapes 4096x4096,64x128] [--reps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import traceback

import torch

from . import harness

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
CPU_SHAPES = [(4096, 4096), (4096, 14336)]
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
DTYPE = torch.bfloat16

#: Every row has exactly these keys (None where not applicable), in this order.
ROW_KEYS = (
    "bench", "device", "shape", "n_out", "k_in", "numel", "op", "method", "variant",
    "median_ms", "p20_ms", "p80_ms", "n_reps", "n_sets", "graph",
    "bytes_moved", "floor_ms", "gbps", "frac_copy_bw", "ratio_vs_bnb", "peak_mem_mb",
    "mismatch_packed", "mismatch_absmax", "mismatch_nested_absmax", "mismatch_offset",
    "mismatch_dequant", "mismatch_dequant_bnb_storage", "max_abs_diff", "check", "note",
)
MD_COLUMNS = ("shape", "op", "method", "variant", "median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy_bw",
              "floor_ms", "ratio_vs_bnb", "peak_mem_mb", "check", "note")
SHORT_COLUMNS = ("shape", "op", "method", "variant", "median_ms", "gbps", "frac_copy_bw", "ratio_vs_bnb", "check")
SHORT_HEADERS = ("shape", "op", "method", "variant", "ms", "GB/s", "of copy", "/bnb", "check")
CHECK_KEYS = ("mismatch_packed", "mismatch_absmax", "mismatch_nested_absmax", "mismatch_offset",
              "mismatch_dequant", "mismatch_dequant_bnb_storage")


# ------------------------------------------------------------------------------------ bytes
def storage_bytes(n: int, blocksize: int = BLOCKSIZE, double_quant: bool = True) -> int:
    """Bytes of an NF4 weight of n elements: packed + (uint8 absmax + nested absmax + dyn code + offset) + NF4 code."""
    nb = -(-n // blocksize)
    stats = nb + 4 * -(-nb // NESTED_BLOCKSIZE) + 4 * 256 + 4 if double_quant else 4 * nb
    return (n + 1) // 2 + stats + 4 * 16


def dequant_bytes(n: int, out_itemsize: int = 2) -> int:
    """Least bytes a dequantize moves: read the storage, write n outputs."""
    return storage_bytes(n) + n * out_itemsize


def quant_bytes(n: int, in_itemsize: int = 2) -> int:
    """Least bytes a quantize moves: read n inputs, write the storage."""
    return n * in_itemsize + storage_bytes(n)


# ------------------------------------------------------------------------------------ helpers
def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4096,64x128' -> [(4096, 4096), (64, 128)]."""
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            a, b = part.split("x")
            shapes.append((int(a), int(b)))
    if not shapes:
        raise argparse.ArgumentTypeError(f"no shapes in {text!r}; expected e.g. 4096x4096,64x128")
    return shapes


def new_row(**kw) -> dict:
    return harness.make_row(ROW_KEYS, **kw)


_short_error = harness.short_error


def _ne_count(a: torch.Tensor | None, b: torch.Tensor | None) -> int | None:
    """Elements that differ bit for bit (-1: shapes or dtypes differ; None: nothing to compare)."""
    if a is None or b is None:
        return None if a is None and b is None else -1
    a, b = torch.as_tensor(a).reshape(-1), torch.as_tensor(b).reshape(-1)
    if a.numel() != b.numel() or a.element_size() != b.element_size():
        return -1
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    b = b.to(a.device)
    return int((a.contiguous().view(ints) != b.contiguous().view(ints)).sum())


def _check_text(res: dict) -> str:
    counts = {k: res.get(k) for k in CHECK_KEYS if res.get(k) is not None}
    if not counts:
        return "n/a"
    bad = {k.replace("mismatch_", ""): v for k, v in counts.items() if v != 0}
    return "exact" if not bad else " ".join(f"{k}={v}" for k, v in bad.items())


@contextlib.contextmanager
def _no_dynamo():
    """bitsandbytes' CPU dequantize goes through torch.compile: skip compiling for the check."""
    try:
        ctx = torch._dynamo.config.patch(disable=True)
    except Exception:
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def bnb_functional(device: torch.device):
    """(bitsandbytes.functional, "") when bitsandbytes can quantize and dequantize on ``device``, else (None, why)."""
    try:
        import bitsandbytes.functional as F
    except Exception as e:
        return None, f"bitsandbytes not importable ({_short_error(e)})"
    try:
        w = torch.randn(64, 128, device=device, dtype=DTYPE)
        q, st = F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        with _no_dynamo():
            F.dequantize_4bit(q, st)
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:
        return None, f"bitsandbytes has no working {device.type} path ({_short_error(e)})"
    return F, ""


def bnb_quantize(F, w: torch.Tensor):
    return F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")


def check_vs_bnb(lk, F, w: torch.Tensor, backend: str) -> dict:
    """Mismatch counts of our quantize/dequantize (``backend``) against bitsandbytes on weight ``w``."""
    res: dict = {}
    try:
        q = lk.quantize_nf4(w, blocksize=BLOCKSIZE, double_quant=True, backend=backend)
        bq, bst = bnb_quantize(F, w)
        res["mismatch_packed"] = _ne_count(q.packed, bq)
        res["mismatch_absmax"] = _ne_count(q.absmax, bst.absmax)
        res["mismatch_nested_absmax"] = _ne_count(q.nested_absmax, bst.state2.absmax if bst.state2 else None)
        off = torch.as_tensor(bst.offset, dtype=torch.float32)
        res["mismatch_offset"] = _ne_count(torch.as_tensor(q.offset).float().cpu(), off.cpu())
        d = lk.dequantize_nf4(q, dtype=DTYPE, backend=backend)
        with _no_dynamo():
            db = F.dequantize_4bit(bq, bst)
        res["mismatch_dequant"] = _ne_count(d, db)
        if d.shape == db.shape:
            res["max_abs_diff"] = float((d.float() - db.float()).abs().max())
        from_bnb = getattr(getattr(lk, "NF4Weight", None), "from_bnb", None)
        if from_bnb is not None:  # our dequantizer on bitsandbytes' own bytes isolates the dequantizer
            d2 = lk.dequantize_nf4(from_bnb(bq, bst), dtype=DTYPE, backend=backend)
            res["mismatch_dequant_bnb_storage"] = _ne_count(d2, db)
    except Exception as e:
        res["note"] = f"check failed: {_short_error(e)}"
    res["check"] = _check_text(res) if "note" not in res else "error"
    return res


def _supports_check_finite(lk) -> bool:
    import inspect
    try:
        return "check_finite" in inspect.signature(lk.quantize_nf4).parameters
    except (TypeError, ValueError):
        return False


def _fill_derived(rows: list[dict], bw: float | None) -> None:
    """floor_ms, gbps, frac_copy_bw from bytes_moved; ratio_vs_bnb against the matching bitsandbytes row."""
    for r in rows:
        if r["median_ms"] and r["bytes_moved"]:
            r["gbps"] = r["bytes_moved"] / (r["median_ms"] * 1e-3) / 1e9
            if bw:
                r["floor_ms"] = r["bytes_moved"] / bw * 1e3
                r["frac_copy_bw"] = r["floor_ms"] / r["median_ms"]
    bnb = {(r["shape"], r["op"], r["variant"]): r for r in rows if r["method"].startswith("bnb") and r["median_ms"]}
    for r in rows:
        if r["method"].startswith("bnb") or r["op"] == "copy" or not r["median_ms"]:
            continue
        variant = "graph" if r["variant"] == "no_check_graph" else r["variant"]
        ref = bnb.get((r["shape"], r["op"], variant)) or bnb.get((r["shape"], r["op"], "default"))
        if ref:
            r["ratio_vs_bnb"] = r["median_ms"] / ref["median_ms"]


# ------------------------------------------------------------------------------------ GPU mode
def _timed_row(base: dict, fn, sets, args, peak_fn=None, use_graph=False, **extra) -> dict:
    """Time ``fn`` over ``sets`` into a row; an exception becomes the row's note (the run goes on).

    Our default quantize synchronizes (its finite check), which a capture forbids: graph rows of
    quantize use check_finite=False.
    """
    row = new_row(**base, **extra)
    try:
        t = harness.time_cuda(fn, sets, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, use_graph=use_graph)
        for k in ("median_ms", "p20_ms", "p80_ms", "n_reps", "n_sets", "graph"):
            row[k] = t[k]
        if peak_fn is not None:
            row["peak_mem_mb"] = harness.peak_memory(peak_fn) / 2**20
    except Exception as e:
        row["note"] = ((row["note"] + "; ") if row["note"] else "") + _short_error(e)
        print(f"  ! {row['shape']} {row['op']} {row['method']} {row['variant']}: {row['note']}", flush=True)
        if os.environ.get("BENCH_TRACEBACK") == "1":
            traceback.print_exc()
    return row


def run_gpu(args, lk, env, device: str = "cuda") -> tuple[list[dict], dict, list[str]]:
    dev = torch.device(device)
    shapes = args.shapes or (GPU_SHAPES[:2] if args.quick else GPU_SHAPES)
    avail = lk.available_backends(dev)
    backends = args.backends or [b for b in ("cuda", "triton") if b in avail]
    notes = [f"available backends on {dev.type}: {avail}; timed: {backends}"]
    for b in list(backends):
        if b not in avail:
            notes.append(f"backend {b!r} requested but not available on {dev.type}: skipped")
            backends.remove(b)
    F, why = bnb_functional(dev)
    if F is None:
        notes.append(f"bitsandbytes column skipped: {why}")
    print("measuring floors (copy bandwidth, bf16 matmul) ...", flush=True)
    bw = harness.measure_copy_bandwidth()
    mm = harness.measure_bf16_matmul_rate()
    meta = {"mode": "quick" if args.quick else "full", "blocksize": BLOCKSIZE, "double_quant": True,
            "dtype": "bfloat16", "copy_bw_gbps": bw / 1e9, "bf16_matmul_tflops": mm / 1e12,
            "l2_bytes": harness.l2_bytes(), "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms}
    print(f"  copy {bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True)
    has_check_finite = _supports_check_finite(lk)
    rows: list[dict] = []
    for (N, K) in shapes:
        n = N * K
        shape = f"{N}x{K}"
        print(f"shape {shape} ...", flush=True)
        store = storage_bytes(n)
        n_out = harness.sets_for_l2(store + 2 * n)
        n_alloc = harness.sets_for_l2(store)
        n_quant = harness.sets_for_l2(2 * n)
        n_w = max(n_out, n_alloc, n_quant)
        gen = torch.Generator(device=dev)
        ws = []
        for i in range(n_w):
            gen.manual_seed(1000 + i)
            ws.append(torch.randn(N, K, device=dev, dtype=DTYPE, generator=gen))
        outs = [torch.empty(N, K, device=dev, dtype=DTYPE) for _ in range(n_out)]
        base = dict(bench="nf4", device=dev.type, shape=shape, n_out=N, k_in=K, numel=n)
        dq = dict(base, op="dequantize", bytes_moved=dequant_bytes(n))
        qz = dict(base, op="quantize", bytes_moved=quant_bytes(n))

        for b in backends:
            method = f"ours-{b}"
            check = check_vs_bnb(lk, F, ws[0], b) if F is not None else {"check": "n/a (no bnb)"}
            torch.cuda.synchronize()
            try:
                qs = [lk.quantize_nf4(w, blocksize=BLOCKSIZE, double_quant=True, backend=b)
                      for w in ws[:max(n_out, n_alloc)]]
            except Exception as e:
                rows.append(new_row(**dq, **dict(check, method=method, variant="-",
                                                 note=f"quantize failed: {_short_error(e)}")))
                continue
            deq_out = lambda q, o, b=b: lk.dequantize_nf4(q, dtype=DTYPE, backend=b, out=o)  # noqa: E731
            rows.append(_timed_row(dq, deq_out, list(zip(qs[:n_out], outs)), args, method=method, variant="out",
                                   **check))
            rows.append(_timed_row(dq, deq_out, list(zip(qs[:n_out], outs)), args, use_graph=True, method=method,
                                   variant="out_graph", **check))
            rows.append(_timed_row(dq, lambda q, b=b: lk.dequantize_nf4(q, dtype=DTYPE, backend=b),
                                   [(q,) for q in qs[:n_alloc]], args,
                                   peak_fn=lambda q=qs[0], b=b: lk.dequantize_nf4(q, dtype=DTYPE, backend=b),
                                   method=method, variant="alloc", **check))
            del qs
            quant = lambda w, b=b: lk.quantize_nf4(w, blocksize=BLOCKSIZE, double_quant=True, backend=b)  # noqa: E731
            rows.append(_timed_row(qz, quant, ws[:n_quant], args, peak_fn=lambda w=ws[0]: quant(w),
                                   method=method, variant="default", **check))
            if has_check_finite:
                quant_nc = lambda w, b=b: lk.quantize_nf4(w, blocksize=BLOCKSIZE, double_quant=True,  # noqa: E731
                                                          backend=b, check_finite=False)
                rows.append(_timed_row(qz, quant_nc, ws[:n_quant], args, peak_fn=lambda w=ws[0]: quant_nc(w),
                                       method=method, variant="no_check", **check))
                # the GPU time of the three kernels (blocks, torch's mean, nested), no Python overhead
                rows.append(_timed_row(qz, quant_nc, ws[:n_quant], args, use_graph=True, method=method,
                                       variant="no_check_graph", **check))
            torch.cuda.empty_cache()

        if F is not None:
            method = "bnb"
            try:
                bqs = [bnb_quantize(F, w) for w in ws[:max(n_out, n_alloc)]]
            except Exception as e:
                rows.append(new_row(**dq, method=method, variant="-", note=f"bnb quantize failed: {_short_error(e)}"))
                bqs = []
            if bqs:
                bnb_out = lambda bq, st, o: F.dequantize_4bit(bq, st, out=o)  # noqa: E731
                bnb_sets = [(bq, st, o) for (bq, st), o in zip(bqs[:n_out], outs)]
                rows.append(_timed_row(dq, bnb_out, bnb_sets, args, method=method, variant="out"))
                rows.append(_timed_row(dq, bnb_out, bnb_sets, args, use_graph=True, method=method,
                                       variant="out_graph"))
                rows.append(_timed_row(dq, lambda bq, st: F.dequantize_4bit(bq, st), bqs[:n_alloc], args,
                                       peak_fn=lambda p=bqs[0]: F.dequantize_4bit(*p), method=method, variant="alloc"))
            del bqs
            rows.append(_timed_row(qz, lambda w: bnb_quantize(F, w), ws[:n_quant], args,
                                   peak_fn=lambda w=ws[0]: bnb_quantize(F, w), method=method, variant="default"))
            rows.append(_timed_row(qz, lambda w: bnb_quantize(F, w), ws[:n_quant], args, use_graph=True,
                                   method=method, variant="graph"))
        elif why:
            rows.append(new_row(**dq, method="bnb", variant="-", note=why))
        # what a plain device copy of the same number of bytes achieves at this size (read + write
        # = bytes_moved of dequantize): the small shapes' ramp-up and tail cost a copy too
        half = dequant_bytes(n) // 2
        srcs = [torch.empty(half, dtype=torch.uint8, device=dev) for _ in range(n_out)]
        dsts = [torch.empty_like(t) for t in srcs]
        rows.append(_timed_row(dict(dq, op="copy"), lambda a, b: b.copy_(a), list(zip(srcs, dsts)), args,
                               use_graph=True, method="torch", variant="same_bytes_graph"))
        del srcs, dsts
        del ws, outs
        torch.cuda.empty_cache()
        _fill_derived(rows, bw)
        _write(args, env, rows, meta, notes)  # after every shape: a timeout still leaves results
    return rows, meta, notes


# ------------------------------------------------------------------------------------ CPU mode
def run_cpu(args, lk, env) -> tuple[list[dict], dict, list[str]]:
    dev = torch.device("cpu")
    shapes = args.shapes or (CPU_SHAPES[:1] if args.quick else CPU_SHAPES)
    avail = lk.available_backends(dev)
    backends = args.backends or [b for b in ("cpp", "reference") if b in avail]
    notes = [f"no GPU: CPU quantizer only; available backends on cpu: {avail}; timed: {backends}"]
    if "cpp" not in avail:
        notes.append("backend 'cpp' not available (C++ extension lora_kernels._C not built)")
    F, why = bnb_functional(dev)
    if F is None:
        notes.append(f"bitsandbytes column skipped: {why}")
    bw = harness.measure_cpu_copy_bandwidth()
    meta = {"mode": "quick" if args.quick else "full", "blocksize": BLOCKSIZE, "double_quant": True,
            "dtype": "bfloat16", "copy_bw_gbps": bw / 1e9, "reps": args.reps, "threads": torch.get_num_threads()}
    rows: list[dict] = []
    has_check_finite = _supports_check_finite(lk)
    for (N, K) in shapes:
        n, shape = N * K, f"{N}x{K}"
        print(f"shape {shape} ...", flush=True)
        w = torch.randn(N, K, generator=torch.Generator().manual_seed(1000)).to(DTYPE)
        qz = dict(bench="nf4", device="cpu", shape=shape, n_out=N, k_in=K, numel=n, op="quantize",
                  bytes_moved=quant_bytes(n))
        methods = [(f"ours-{b}", b) for b in backends if b in avail] + ([("bnb-cpu", None)] if F else [])
        for method, b in methods:
            check: dict = {}
            if b is None:
                fn = lambda: bnb_quantize(F, w)  # noqa: E731
            else:
                kw = {"check_finite": False} if has_check_finite and args.no_check else {}
                fn = lambda b=b, kw=kw: lk.quantize_nf4(w, blocksize=BLOCKSIZE, double_quant=True,  # noqa: E731
                                                        backend=b, **kw)
                if F is not None:
                    check = check_vs_bnb(lk, F, w, b)
            row = new_row(**qz, method=method, variant="default", **check)
            try:
                t = harness.time_cpu(fn, reps=args.reps, warmup=1)
                for k in ("median_ms", "p20_ms", "p80_ms", "n_reps", "n_sets", "graph"):
                    row[k] = t[k]
            except Exception as e:
                row["note"] = _short_error(e)
            rows.append(row)
        _fill_derived(rows, bw)
        _write(args, env, rows, meta, notes)
    return rows, meta, notes


# ------------------------------------------------------------------------------------ output
def result_name(env: dict, quick: bool) -> str:
    return f"nf4_{env.get('key', 'unknown')}" + ("_quick" if quick else "")


def _write(args, env, rows, meta, notes):
    notes = list(notes) + [
        "frac_copy_bw = floor_ms / median_ms, floor = least bytes moved / device copy bandwidth (read+write)",
        "ratio_vs_bnb = our median time / bitsandbytes' (< 1: faster)",
        "check: bit-exact comparison with bitsandbytes on the same weight (packed, absmax, nested_absmax, "
        "offset, dequantized output, and our dequantizer on bitsandbytes' bytes)",
    ]
    return harness.write_results(result_name(env, args.quick), rows, env, args.out, meta=meta,
                                 columns=MD_COLUMNS, notes=notes)


def short_table(rows: list[dict]) -> str:
    """The compact table printed at the end of a run."""
    return harness.text_table(rows, SHORT_COLUMNS, SHORT_HEADERS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_nf4", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="first two GPU shapes (first CPU shape)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="result folder")
    p.add_argument("--backends", type=lambda s: [b.strip() for b in s.split(",") if b.strip()], default=None,
                   help="comma list of our backends (default: cuda,triton on GPU; cpp,reference on CPU)")
    p.add_argument("--shapes", type=parse_shapes, default=None, help="override shapes, e.g. 4096x4096,64x128")
    p.add_argument("--reps", type=int, default=3, help="CPU mode: timed repetitions")
    p.add_argument("--no-check", action="store_true", help="CPU mode: quantize with check_finite=False")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--cpu", action="store_true", help="CPU mode even when a GPU is present")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("LORA_KERNELS_QUIET", "1")
    lk, env, gpu = harness.start("bench_nf4", ("quantize_nf4", "dequantize_nf4", "available_backends"), args.cpu,
                                 "timing the CPU quantizer only")
    rows, meta, notes = (run_gpu if gpu else run_cpu)(args, lk, env)
    jpath, mpath = _write(args, env, rows, meta, notes)
    print(f"\nwrote {jpath} and {mpath}")
    print(f"\n== short table: nf4 on {env.get('gpu') or 'CPU'} "
          f"(copy {meta['copy_bw_gbps']:.0f} GB/s{', bf16 mm %.0f TFLOP/s' % meta['bf16_matmul_tflops'] if 'bf16_matmul_tflops' in meta else ''})")
    for note in notes:
        print(f"note: {note}")
    print(short_table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
