"""QLoRA training step benchmark (forward + backward): ``lk.qlora_linear`` against bitsandbytes + PEFT,
bf16 LoRA (PEFT) and the two cuBLAS matmuls the step cannot avoid.

Issue: "QLoRA at the speed of bf16 LoRA".  One step = y = x·Ŵᵀ + ((x·Aᵀ)⊙s)·Bᵀ (no bias), then the
gradients of (y ⊙ g).sum() for x, A and B with a fixed random g, i.e.
``torch.autograd.grad(y, (x, A, B), g)`` (eager; nothing accumulates into ``.grad``).  x [M, K]
bf16, Ŵ NF4 (N, K) with double quantization, r = 16, s = alpha / r = 2.0.  Layer shapes and their
K x N convention (in -> out) are bench_forward's; M ∈ {4096, 16384} (training batch x sequence).

GPU mode, per layer shape, rank and M (rows keyed shape, M, r, method):
  ours            ``lk.qlora_linear(x, q, A, B, 2.0)`` + autograd.grad for x, A, B
  bnb_peft        bitsandbytes ``Linear4bit`` (nf4, double quant, bf16 compute) wrapped by PEFT LoRA,
                  built by ``bench_forward.peft_stack("bnb", ...)``; grads for x, lora_A, lora_B
  bf16_lora_peft  PEFT LoRA on a frozen bf16 ``nn.Linear`` (``peft_stack("bf16", ...)``)
  cublas_floor    ``F.linear(x, W)`` then ``dY·W`` (bf16, cuBLAS): the two big matmuls of any step
  floor_ms        max(FLOPs / measured bf16 matmul rate, bytes / measured copy bandwidth);
                  FLOPs = 4·M·K·N (forward x·Wᵀ and dX = dY·W) + 6·M·r·(K+N) with LoRA (forward x·Aᵀ,
                  ·Bᵀ; backward dB, dY·B, dA, dX += ·A); bytes = 2 x the weight as stored (read by
                  the forward and by the backward) + x + y + g + dX (bf16) + with LoRA A, B read and
                  dA, dB written (bf16)
  ratio_vs_cublas_floor / ratio_vs_bf16_lora / ratio_vs_bnb_peft = median / that method's median at
                  the same (shape, M, r, direction)
  peak_mem_mb     ``harness.peak_memory`` of one step (returned gradients included)
  check           once per (shape, M, r): rel_err of our dX, dA, dB against a float32 reference on the
                  same dequantized weight, beside PyTorch computing the same formula in bf16;
                  ``err_ratio`` = the largest ours/PyTorch ratio of the three, ``within_2x`` = it is
                  <= 2 (the design's rule); recorded, never fails the run
x and g rotate among input sets totalling > 2x the L2 (``harness.sets_for_l2``); one weight and one
pair of adapters per shape (at M >= 4096 the step is compute-bound; a note says so).
Directions (``--directions``, default ``step``; ``direction`` column): ``fwd+bwd`` = the step above;
``fwd`` = the forward alone with autograd recording (what a training forward costs: ours
``qlora_linear``, PEFT's layer call with grad enabled, cuBLAS ``F.linear``); ``bwd`` = the backward
alone, timed on stored forwards: one forward per input set is run once, then each timed call is
``torch.autograd.grad(y, inputs, g, retain_graph=True)`` on it (cuBLAS: ``g @ W``) — measured, not
step minus forward.  Floors split the step's: fwd = bench_forward's forward FLOPs / bytes, bwd =
the rest (dX = dY·W and the LoRA backward).  ``route`` = ``forward_route`` / ``backward_route``.
The cuBLAS pair is rank-free: timed at the first rank only, r empty, matched to every rank.
CPU mode (no GPU): ``ours`` against the reference on one tiny shape, rows keyed ``cpu``.

Run time on one H100 (an estimate from the per-row budget, not a measured total): 4 rows per
(shape, M) at ~0.5-2 s each (the M = 16384 steps of the big shapes take milliseconds each, plus
a float32 reference check per (shape, M)), plus ~5-20 s per shape for weights and the two PEFT
stacks: ``--quick`` (2 shapes x 2 M) ~1 min, full (8 shapes x 2 M) ~3-6 min; ``--directions
step,fwd,bwd`` triples the rows.

    python -m benchmarks.bench_training [--quick] [--out DIR] [--shapes 4096x4096,...] [--ms 4096,16384]
                                        [--ranks 16] [--methods ours,bnb_peft,bf16_lora_peft,cublas_floor]
                                        [--directions step,fwd,bwd] [--tag NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
import traceback

import torch
import torch.nn.functional as F

from . import harness
from . import bench_forward as bf

GPU_SHAPES = bf.GPU_SHAPES
QUICK_SHAPES = bf.QUICK_SHAPES
GPU_MS = [4096, 16384]
CPU_SHAPES = [(128, 72)]
CPU_MS = [33]
RANKS = [16]
SCALE = bf.SCALE
DTYPE = bf.DTYPE
METHODS = ("ours", "bnb_peft", "bf16_lora_peft", "cublas_floor")
#: --directions names -> the ``direction`` column: the whole step, the forward alone, the backward alone
DIRECTIONS = {"step": "fwd+bwd", "fwd": "fwd", "bwd": "bwd"}

ROW_KEYS = (
    "bench", "device", "shape", "K", "N", "M", "r", "method", "variant", "direction", "route",
    "median_ms", "p20_ms", "p80_ms", "n_reps", "n_sets", "graph",
    "flops", "bytes", "floor_ms", "frac_floor", "tflops",
    "ratio_vs_cublas_floor", "ratio_vs_bf16_lora", "ratio_vs_bnb_peft", "peak_mem_mb",
    "resident_mb", "total_mem_mb", "max_alloc_mb", "dense_weight_mb", "rel_err_dx", "rel_err_da", "rel_err_db", "rel_err_dx_bf16_torch", "rel_err_da_bf16_torch",
    "rel_err_db_bf16_torch", "err_ratio", "within_2x", "note",
)
MD_COLUMNS = ("shape", "M", "r", "method", "direction", "route", "median_ms", "p20_ms", "p80_ms", "floor_ms",
              "frac_floor", "tflops",
              "ratio_vs_cublas_floor", "ratio_vs_bf16_lora", "ratio_vs_bnb_peft", "peak_mem_mb", "resident_mb",
              "total_mem_mb", "max_alloc_mb", "dense_weight_mb",
              "rel_err_dx", "rel_err_da", "rel_err_db", "err_ratio", "within_2x", "n_sets", "note")
SHORT_COLUMNS = ("shape", "M", "r", "method", "direction", "median_ms", "frac_floor", "ratio_vs_cublas_floor",
                 "ratio_vs_bf16_lora",
                 "ratio_vs_bnb_peft", "total_mem_mb", "max_alloc_mb", "err_ratio")
SHORT_HEADERS = ("KxN", "M", "r", "method", "dir", "ms", "/floor", "/cublas", "/bf16lora", "/bnb", "MB", "max alloc MB",
                 "err/bf16")


# ------------------------------------------------------------------------------------ arithmetic
def training_flops(M: int, K: int, N: int, r: int | None) -> int:
    """4·M·K·N (x·Wᵀ and dY·W) plus 6·M·r·(K+N) for the low-rank forward and backward when r is given."""
    return 4 * M * K * N + (6 * M * r * (K + N) if r else 0)


def training_bytes(M: int, K: int, N: int, r: int | None, weight_bytes: int, itemsize: int = 2) -> int:
    """Least bytes one step moves: the weight twice (forward and backward), x, y, g, dX, and with
    LoRA A, B read and dA, dB written."""
    return 2 * weight_bytes + itemsize * (2 * M * K + 2 * M * N) + (2 * itemsize * r * (K + N) if r else 0)


def direction_flops(direction: str, M: int, K: int, N: int, r: int | None) -> int:
    """FLOPs of one direction: "fwd+bwd" = ``training_flops``; "fwd" = the forward's (2MKN + 2Mr(K+N));
    "bwd" = the rest (dX = dY·W: 2MKN, + 4Mr(K+N) for dB, dY·B, dA, dX += ·A)."""
    if direction == "fwd+bwd":
        return training_flops(M, K, N, r)
    fwd = bf.forward_flops(M, K, N, r)
    return fwd if direction == "fwd" else training_flops(M, K, N, r) - fwd


def direction_bytes(direction: str, M: int, K: int, N: int, r: int | None, weight_bytes: int) -> int:
    """Least bytes of one direction: "fwd" = bench_forward's (weight, x, y, A, B); "bwd" = the step's
    minus that (weight, g read, dX written, dA and dB written)."""
    if direction == "fwd+bwd":
        return training_bytes(M, K, N, r, weight_bytes)
    fwd = bf.forward_bytes(M, K, N, r, weight_bytes)
    return fwd if direction == "fwd" else training_bytes(M, K, N, r, weight_bytes) - fwd


def new_row(**kw) -> dict:
    return harness.make_row(ROW_KEYS, **kw)


def _add_note(row: dict, text: str) -> None:
    row["note"] = f"{row['note']}; {text}" if row.get("note") else text


def fill_derived(rows: list[dict], matmul_rate: float | None, copy_bw: float | None) -> None:
    """floor_ms, frac_floor, tflops and the three ratios (same shape, M, r and direction; the cuBLAS
    pair has no rank: matched on shape, M and direction only)."""
    for r in rows:
        if r["flops"] is not None and r["bytes"] is not None:
            r["floor_ms"] = bf.floor_ms(r["flops"], r["bytes"], matmul_rate, copy_bw)
        if r["median_ms"]:
            if r["floor_ms"]:
                r["frac_floor"] = r["floor_ms"] / r["median_ms"]
            if r["flops"]:
                r["tflops"] = r["flops"] / (r["median_ms"] * 1e-3) / 1e12

    def key(method, r):
        return (method, r["shape"], r["M"], None if method == "cublas_floor" else r["r"], r.get("direction"))

    refs = {}
    for r in rows:
        if r["median_ms"] and r["method"] in ("cublas_floor", "bf16_lora_peft", "bnb_peft"):
            refs[key(r["method"], r)] = r["median_ms"]
    for r in rows:
        if not r["median_ms"]:
            continue
        for method, name in (("cublas_floor", "ratio_vs_cublas_floor"), ("bf16_lora_peft", "ratio_vs_bf16_lora"),
                             ("bnb_peft", "ratio_vs_bnb_peft")):
            ref = refs.get(key(method, r))
            if ref and r["method"] != method:
                r[name] = r["median_ms"] / ref


# ------------------------------------------------------------------------------------ steps
def ours_step(lk):
    def step(x, q, A, B, g):
        y = lk.qlora_linear(x, q, A, B, SCALE)
        return torch.autograd.grad(y, (x, A, B), g)
    return step


def peft_step(layer, x, g):
    y = layer(x)
    return torch.autograd.grad(y, (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight), g)


def cublas_step(x, W, g):
    y = F.linear(x, W)
    dx = g @ W
    return y, dx


def grad_retained(y, inputs, g):
    """The backward alone on a stored forward: gradients of (y ⊙ g).sum() for ``inputs``, the graph kept
    so the same forward can be differentiated again (the timed call of the "bwd" rows)."""
    return torch.autograd.grad(y, inputs, g, retain_graph=True)


def cublas_bwd(g, W):
    return g @ W


def correctness(lk, reference, x, q, A, B, g) -> dict:
    """rel_err of our dX, dA, dB and of bf16 PyTorch's against a float32 reference (same dequantized weight)."""
    out: dict = {}
    try:
        def grads(fn, *ts):
            leaves = [t.detach().clone().requires_grad_() for t in ts]
            y = fn(*leaves)
            return torch.autograd.grad(y, leaves, g.to(y.dtype))

        Wf = q.dequantize(torch.float32)
        ref = grads(lambda x_, a_, b_: reference.lora_linear_reference(x_, Wf, a_, b_, SCALE),
                    x.float(), A.float(), B.float())
        del Wf
        ours = grads(lambda x_, a_, b_: lk.qlora_linear(x_, q, a_, b_, SCALE), x, A, B)
        Wb = q.dequantize(DTYPE)
        torch_bf16 = grads(lambda x_, a_, b_: F.linear(x_, Wb) + ((x_ @ a_.t()) * SCALE) @ b_.t(), x, A, B)
        del Wb
        ratios = []
        for name, o, t, rf in zip(("dx", "da", "db"), ours, torch_bf16, ref):
            out[f"rel_err_{name}"] = bf.rel_err(o, rf)
            out[f"rel_err_{name}_bf16_torch"] = bf.rel_err(t, rf)
            if out[f"rel_err_{name}_bf16_torch"] > 0:
                ratios.append(out[f"rel_err_{name}"] / out[f"rel_err_{name}_bf16_torch"])
        if ratios:
            out["err_ratio"] = max(ratios)
            out["within_2x"] = out["err_ratio"] <= 2.0
    except Exception as e:
        out = {"note": f"check failed: {bf._short_error(e)}"}
    return out


# ------------------------------------------------------------------------------------ GPU mode
def _time_row(args, base: dict, fn, sets, weight_bytes: int | None = None, **extra) -> dict:
    """Time ``fn`` over ``sets`` into a row (flops and bytes of its direction when ``weight_bytes`` is
    given); an exception becomes the row's note."""
    row = new_row(**{**base, **extra})
    if weight_bytes is not None:
        d, lr = row["direction"] or "fwd+bwd", None if row["method"] == "cublas_floor" else row["r"]
        row["flops"] = direction_flops(d, row["M"], row["K"], row["N"], lr)
        row["bytes"] = direction_bytes(d, row["M"], row["K"], row["N"], lr, weight_bytes)
    try:
        try:
            t = harness.time_cuda(fn, sets, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, use_graph=args.graph)
        except Exception as e:
            if not args.graph:
                raise
            # a method whose step cannot be captured is timed eagerly; its row says so (graph = False)
            _add_note(row, f"CUDA-graph capture failed ({bf._short_error(e)}): timed eagerly")
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
            t = harness.time_cuda(fn, sets, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        for k in ("median_ms", "p20_ms", "p80_ms", "n_reps", "n_sets", "graph"):
            row[k] = t[k]
        row["peak_mem_mb"] = harness.peak_memory(fn, *sets[0]) / 2**20
        if row.get("resident_mb") is not None:
            row["total_mem_mb"] = row["resident_mb"] + row["peak_mem_mb"]
        row["max_alloc_mb"] = harness.largest_allocation(fn, *sets[0]) / 2**20
    except Exception as e:
        _add_note(row, bf._short_error(e))
        print(f"    ! {row['shape']} M={row['M']} {row['method']}: {row['note']}", flush=True)
        if os.environ.get("BENCH_TRACEBACK") == "1":
            traceback.print_exc()
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
    print(f"    {row['shape']} M={row['M']} r={row['r']} {row['method']} {row['direction']}: "
          f"{bf._fmt_ms(row['median_ms'])} ms", flush=True)
    return row


def _route(lk, name: str, *a) -> str | None:
    fn = getattr(lk, name, None)
    try:
        return fn(*a) if fn is not None else None
    except Exception:
        return None


def _time_directions(args, lk, library, methods, directions, layers, base, r, first_rank, q, W, A, B, xs, gs,
                     chk, rows: list[dict]) -> None:
    """Append to ``rows`` the rows of one (shape, M, r): each method in each direction ("fwd+bwd",
    "fwd", "bwd").  "bwd" rows differentiate stored forwards (one per input set, run before timing
    and freed after)."""
    n, M, K, N = len(xs), base["M"], base["K"], base["N"]
    dev = xs[0].device
    fr, br = _route(lk, "forward_route", M, q, DTYPE, dev), _route(lk, "backward_route", q, DTYPE, dev)
    routes = {"fwd+bwd": f"{fr} / {br}" if fr and br else fr, "fwd": fr, "bwd": br}
    lora = dict(base, r=r)

    def run(method, b, weight_bytes, plans, **extra):
        for d in directions:
            fn, make_sets = plans[d]
            try:
                sets = make_sets()
            except Exception as e:
                rows.append(new_row(**b, method=method, direction=d, note=f"setup failed: {bf._short_error(e)}"))
                print(f"    ! {b['shape']} M={M} {method} {d}: {rows[-1]['note']}", flush=True)
                continue
            x = {k: v for k, v in extra.items() if d != "fwd" or not k.startswith(("rel_err", "err_", "within"))}
            rows.append(_time_row(args, b, fn, sets, weight_bytes=weight_bytes, method=method, direction=d, **x))
            del sets

    if "ours" in methods:
        step = ours_step(lk)
        step(xs[0], q, A, B, gs[0])          # the workspace exists from here on
        ws = library.workspace_nbytes()
        fwd = lambda x, q_, a, b: lk.qlora_linear(x, q_, a, b, SCALE)  # noqa: E731
        plans = {"fwd+bwd": (step, lambda: [(xs[i], q, A, B, gs[i]) for i in range(n)]),
                 "fwd": (fwd, lambda: [(xs[i], q, A, B) for i in range(n)]),
                 "bwd": (grad_retained, lambda: [(fwd(xs[i], q, A, B), (xs[i], A, B), gs[i]) for i in range(n)])}
        run_rows = len(rows)
        run("ours", lora, q.nbytes(), plans, resident_mb=(q.nbytes() + ws) / 2**20, **chk)
        for row in rows[run_rows:]:
            row["route"] = routes.get(row["direction"])
    for method in ("bnb_peft", "bf16_lora_peft"):
        if method in layers:
            wb = q.nbytes() if method == "bnb_peft" else 2 * N * K
            layer = layers[method][1]
            ins = lambda x, ly=layer: (x, ly.lora_A["default"].weight, ly.lora_B["default"].weight)  # noqa: E731
            plans = {"fwd+bwd": (peft_step, lambda layer=layer: [(layer, xs[i], gs[i]) for i in range(n)]),
                     "fwd": (lambda layer_, x: layer_(x), lambda layer=layer: [(layer, xs[i]) for i in range(n)]),
                     "bwd": (grad_retained,
                             lambda layer=layer, ins=ins: [(layer(xs[i]), ins(xs[i]), gs[i]) for i in range(n)])}
            run(method, lora, wb, plans, resident_mb=wb / 2**20)
    if "cublas_floor" in methods and first_rank:  # rank-free: once per (shape, M)
        with torch.no_grad():
            plans = {"fwd+bwd": (cublas_step, lambda: [(xs[i].detach(), W, gs[i]) for i in range(n)]),
                     "fwd": (F.linear, lambda: [(xs[i].detach(), W) for i in range(n)]),
                     "bwd": (cublas_bwd, lambda: [(gs[i], W) for i in range(n)])}
            run("cublas_floor", base, 2 * N * K, plans)


def run_gpu(args, lk, env, t0: float, device: str = "cuda") -> tuple[list[dict], dict, list[str]]:
    """The GPU benchmark.  ``device="cpu"`` is a dry run of the same bookkeeping for the CPU test
    (harness.time_cuda / peak_memory / measure_* replaced by fakes there)."""
    from lora_kernels import library, reference

    dev = torch.device(device)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else GPU_SHAPES)
    ms = sorted(args.ms or GPU_MS)
    ranks = args.ranks or RANKS
    methods = list(args.methods or METHODS)
    directions = [DIRECTIONS[d] for d in (args.directions or ["step"])]
    notes: list[str] = []
    why_bnb = bf.bnb_peft_available(dev) if "bnb_peft" in methods else ""
    if why_bnb:
        notes.append(f"bnb_peft skipped: {why_bnb}")
        methods.remove("bnb_peft")
    if "bf16_lora_peft" in methods:
        try:
            import peft  # noqa: F401
        except Exception as e:
            notes.append(f"bf16_lora_peft skipped: peft not importable ({bf._short_error(e)})")
            methods.remove("bf16_lora_peft")

    print(f"{bf._elapsed(t0)} measuring floors (copy bandwidth, bf16 matmul) ...", flush=True)
    bw = harness.measure_copy_bandwidth(rep_ms=100.0)
    mm = harness.measure_bf16_matmul_rate(rep_ms=100.0)
    meta = {"mode": "quick" if args.quick else "full", "dtype": "bfloat16", "scale": SCALE,
            "ranks": ",".join(map(str, ranks)), "ms": ",".join(map(str, ms)), "copy_bw_gbps": bw / 1e9,
            "bf16_matmul_tflops": mm / 1e12, "l2_bytes": harness.l2_bytes(), "warmup_ms": args.warmup_ms,
            "rep_ms": args.rep_ms, "directions": ",".join(directions), "timing": "graph" if args.graph else "eager"}
    notes += [
        "shape = K x N (in -> out); no bias; one step = forward + torch.autograd.grad(y, (x, A, B), g), "
        + ("CUDA-graph replay (--graph: one step per input set captured, each sample one replay / the sets; "
           "no Python or launch overhead; a row with graph = False could not be captured and was timed eagerly)"
           if args.graph else
           "eager (each step timed with its own CUDA events: Python + launch overhead included)"),
        "floor = max(FLOPs / bf16 matmul rate, bytes / copy bandwidth), both measured in this run; FLOPs = 4MKN "
        "(+6Mr(K+N) with LoRA); bytes = 2 x weight as stored + x + y + g + dX (+ A, B, dA, dB with LoRA)",
        "cublas_floor = F.linear(x, W) and g @ W in bf16: the two matmuls no step avoids (fwd: F.linear alone, "
        "bwd: g @ W alone); rank-free: timed at the first rank, r empty",
        "direction: fwd+bwd = the step; fwd = the forward alone with autograd recording; bwd = the backward alone, "
        "torch.autograd.grad(y, inputs, g, retain_graph=True) on a forward stored once per input set (measured, "
        "not step minus forward); floors: fwd = 2MKN (+2Mr(K+N)), weight + x + y (+ A, B); bwd = the step's rest",
        "ratio_vs_* = median / that method's median at the same (shape, M, r, direction) (< 1: faster)",
        "rel_err_d* = ||grad - ref||_F / ||ref||_F, ref = float32 on the same dequantized weight; *_bf16_torch = "
        "the same formula in bf16 PyTorch; err_ratio = max over dX, dA, dB of ours / bf16 torch (rule: <= 2)",
        "one weight and one adapter pair per shape; x and g rotate over sets totalling > 2x L2",
        "peak_mem_mb = peak allocated during one step above what was allocated before it; resident_mb = the "
        "frozen base as held (NF4 bytes, + our merge workspace for ours; 2NK for bf16 LoRA); total_mem_mb = "
        "resident + peak; max_alloc_mb = the largest single allocation in the step (allocator history); "
        "dense_weight_mb = N*K*2 (issue 4: no allocation that large)",
    ]
    rows: list[dict] = []
    for (K, N) in shapes:
        shape = f"{K}x{N}"
        print(f"{bf._elapsed(t0)} shape {shape} ...", flush=True)
        gen = torch.Generator(device=dev)
        try:
            W = bf._randn((N, K), gen.manual_seed(1), dev, 0.02)
            q = lk.quantize_nf4(W)
        except Exception as e:
            rows.append(new_row(bench="training", device=dev.type, shape=shape, K=K, N=N, method="-",
                                note=f"setup failed: {bf._short_error(e)}"))
            bf._free()
            continue
        for ri, r in enumerate(ranks):
            gen.manual_seed(10_000 + r)
            A = bf._randn((r, K), gen, dev, 1.0 / math.sqrt(K)).requires_grad_()
            B = bf._randn((N, r), gen, dev, 0.02).requires_grad_()
            layers = {}
            for method, kind in (("bnb_peft", "bnb"), ("bf16_lora_peft", "bf16")):
                if method in methods:
                    try:
                        with torch.no_grad():
                            pm, lys = bf.peft_stack(kind, [W], [A.detach()], [B.detach()], r)
                        layers[method] = (pm, lys[0])
                    except Exception as e:
                        rows.append(new_row(bench="training", device=dev.type, shape=shape, K=K, N=N, r=r,
                                            method=method, note=f"setup failed: {bf._short_error(e)}"))
            for M in ms:
                try:
                    n = harness.sets_for_l2(2 * M * (K + N))
                    gen.manual_seed(20_000 + M)
                    xs = [bf._randn((M, K), gen, dev).requires_grad_() for _ in range(n)]
                    gs = [bf._randn((M, N), gen, dev) for _ in range(n)]
                    chk = correctness(lk, reference, xs[0], q, A, B, gs[0]) if "ours" in methods else {}
                    if "note" not in chk and chk:
                        print(f"  {bf._elapsed(t0)} {shape} M={M} check: err_ratio {chk['err_ratio']:.2f}", flush=True)
                    base = dict(bench="training", device=dev.type, shape=shape, K=K, N=N, M=M, variant="eager",
                                dense_weight_mb=2 * N * K / 2**20)
                    _time_directions(args, lk, library, methods, directions, layers, base, r, ri == 0,
                                     q, W, A, B, xs, gs, chk, rows)
                    del xs, gs
                except Exception as e:
                    rows.append(new_row(bench="training", device=dev.type, shape=shape, K=K, N=N, M=M, r=r,
                                        method="-", note=f"failed: {bf._short_error(e)}"))
                    print(f"  ! {shape} M={M}: {bf._short_error(e)}", flush=True)
                bf._free()
            del layers, A, B
            bf._free()
        del W, q
        bf._free()
        fill_derived(rows, mm, bw)
        _write(args, env, rows, meta, notes)  # after every shape: a timeout still leaves results
    fill_derived(rows, mm, bw)
    return rows, meta, notes


# ------------------------------------------------------------------------------------ CPU mode
def run_cpu(args, lk, env, t0: float) -> tuple[list[dict], dict, list[str]]:
    from lora_kernels import reference

    shapes = args.shapes or CPU_SHAPES
    ms = args.ms or CPU_MS
    ranks = args.ranks or RANKS
    bw = harness.measure_cpu_copy_bandwidth(nbytes=32 * 1024**2, reps=3)
    mm = bf.measure_cpu_matmul_rate()
    meta = {"mode": "cpu", "dtype": "bfloat16", "scale": SCALE, "ranks": ",".join(map(str, ranks)),
            "ms": ",".join(map(str, ms)), "copy_bw_gbps": bw / 1e9, "cpu_fp32_matmul_gflops": mm / 1e9,
            "reps": args.reps, "threads": torch.get_num_threads()}
    notes = ["no GPU: only `ours` (forward + backward) against the float32 reference on a tiny shape (exercises "
             "the code path; the timings mean nothing for the GPU kernels)",
             "shape = K x N (in -> out); floor uses the CPU copy bandwidth and an fp32 CPU matmul rate"]
    rows: list[dict] = []
    dev = torch.device("cpu")
    step = ours_step(lk)
    for (K, N) in shapes:
        gen = torch.Generator().manual_seed(1)
        q = lk.quantize_nf4(bf._randn((N, K), gen, dev, 0.02))
        for r in ranks:
            A = bf._randn((r, K), gen, dev, 1.0 / math.sqrt(K)).requires_grad_()
            B = bf._randn((N, r), gen, dev, 0.02).requires_grad_()
            for M in ms:
                x = bf._randn((M, K), gen, dev).requires_grad_()
                g = bf._randn((M, N), gen, dev)
                chk = correctness(lk, reference, x, q, A, B, g)
                row = new_row(bench="training", device="cpu", shape=f"{K}x{N}", K=K, N=N, M=M, r=r, method="ours",
                              variant="eager", direction="fwd+bwd", flops=training_flops(M, K, N, r),
                              bytes=training_bytes(M, K, N, r, q.nbytes()), **chk)
                try:
                    t = harness.time_cpu(step, reps=args.reps, warmup=1, inputs_sets=[(x, q, A, B, g)])
                    for k in ("median_ms", "p20_ms", "p80_ms", "n_reps", "n_sets", "graph"):
                        row[k] = t[k]
                except Exception as e:
                    _add_note(row, bf._short_error(e))
                rows.append(row)
                print(f"  {bf._elapsed(t0)} {K}x{N} M={M} r={r} ours: {bf._fmt_ms(row['median_ms'])} ms, "
                      f"err_ratio {row['err_ratio']}", flush=True)
    fill_derived(rows, mm, bw)
    return rows, meta, notes


# ------------------------------------------------------------------------------------ output
def result_name(env: dict, quick: bool, tag: str | None = None) -> str:
    return f"training_{env.get('key', 'unknown')}" + ("_quick" if quick else "") + (f"_{tag}" if tag else "")


def _write(args, env, rows, meta, notes):
    return harness.write_results(result_name(env, args.quick, getattr(args, "tag", None)), rows, env, args.out,
                                 meta=meta, columns=MD_COLUMNS, notes=notes)


def short_table(rows: list[dict]) -> str:
    order = {m: i for i, m in enumerate(METHODS)}
    dorder = {d: i for i, d in enumerate(("fwd+bwd", "fwd", "bwd"))}
    keep = sorted(rows, key=lambda r: (r["K"] or 0, r["N"] or 0, r["M"] or 0, dorder.get(r.get("direction"), 0),
                                       order.get(r["method"], 9)))
    sig = lambda v, n: None if v is None else f"{v:.{n}g}"  # noqa: E731
    keep = [dict(r, **{k: sig(r[k], 3) for k in ("median_ms", "frac_floor", "ratio_vs_cublas_floor",
                                                  "ratio_vs_bf16_lora", "ratio_vs_bnb_peft", "peak_mem_mb",
                                                  "err_ratio")}) for r in keep]
    return harness.text_table(keep, SHORT_COLUMNS, SHORT_HEADERS)


def parse_methods(text: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in METHODS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; expected a subset of {list(METHODS)}")
    return vals


def parse_directions(text: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in DIRECTIONS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown direction(s) {bad}; expected a subset of {list(DIRECTIONS)}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_training", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shapes 4096x4096 and 4096x14336 only")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="result folder")
    p.add_argument("--shapes", type=bf.parse_shapes, default=None,
                   help="layer shapes K_in x N_out, e.g. 4096x4096,8192x28672 (overrides --quick)")
    p.add_argument("--ms", type=bf.parse_ints, default=None, help=f"rows of x (default {GPU_MS}; CPU {CPU_MS})")
    p.add_argument("--ranks", type=bf.parse_ints, default=None, help=f"LoRA ranks (default {RANKS}); alpha = 2r")
    p.add_argument("--methods", type=parse_methods, default=None, help=f"subset of {','.join(METHODS)}")
    p.add_argument("--directions", type=parse_directions, default=None,
                   help="subset of step,fwd,bwd (default step: the forward + backward step only)")
    p.add_argument("--tag", type=bf.parse_tag, default=None,
                   help="appended to the result file name: training_<gpu>_TAG")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--graph", action="store_true",
                   help="time every step as a CUDA-graph replay (GPU-bound time, no host overhead); a method that "
                        "cannot be captured is timed eagerly and its row says graph = False")
    p.add_argument("--reps", type=int, default=3, help="CPU mode: timed repetitions")
    p.add_argument("--cpu", action="store_true", help="CPU mode even when a GPU is present")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    t0 = time.perf_counter()
    args = build_parser().parse_args(argv)
    os.environ.setdefault("LORA_KERNELS_QUIET", "1")
    lk, env, gpu = harness.start("bench_training", ("quantize_nf4", "qlora_linear"), args.cpu,
                                 "ours vs the reference on a tiny shape only")
    rows, meta, notes = (run_gpu if gpu else run_cpu)(args, lk, env, t0)
    jpath, mpath = _write(args, env, rows, meta, notes)
    print(f"\n{bf._elapsed(t0)} wrote {jpath} and {mpath}")
    print(f"\n== short table: training step on {env.get('gpu') or 'CPU'}; ms = median; /floor = floor/ms; "
          f"/cublas, /bf16lora, /bnb = ms ratio; MB = peak memory; err/bf16 = worst grad rel err / bf16 torch's")
    for note in notes:
        if not gpu or note.startswith(("bnb_peft skipped", "bf16_lora_peft skipped")):
            print(f"note: {note}")
    print(short_table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
