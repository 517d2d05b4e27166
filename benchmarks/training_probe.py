"""Where the training step's time goes beyond the two cuBLAS matmuls (issue 4), on the GPU.

For each shape K x N and M, times (CUDA-graph replay: GPU time, no host gaps) every launch family of
our eager step apart, and the step itself both eagerly (CUDA events, as bench_training) and replayed
as a graph, for each merge workspace size in --workspace-mb (the module global is changed in-process;
each size is also capped at half the weight, as on the training path):

    floor      F.linear(x, W) + g @ W in bf16 (the pair no step avoids)
    fwd_merge  the forward's merge launches (W_eff row chunks into the workspace)
    fwd_gemm   the forward's chunk GEMMs y[:, rows] = x · W_eff[rows]ᵀ (on a merged workspace)
    bwd_merge  the backward's merge launches (W_eff column chunks)
    bwd_gemm   the backward's chunk GEMMs dX[:, cols] = dY · W_eff[:, cols]
    lora       T = x·Aᵀ, U = dY·B, dA = s·Uᵀ·x, dB = s·dYᵀ·T (the backward's four skinny GEMMs), and U with
               dB from one read of dY (triton/lora_grad.lora_dy_pass, opt-in candidate)
    step       forward + torch.autograd.grad(y, (x, A, B), g), eager and graph-replayed, and eager under
               the opt-ins (library.MERGE_OVERLAP, library.FUSED_DY_PASS, both; set here in-process)

``--merge-sweep ROUNDS`` instead times the merge kernel over a grid of tiles (SWEEP_TILES x K_FASTEST),
whole-weight and as the step's chunks, then the step with the best against the default.

``--pipes`` instead times each direction's merge + GEMM chunk pipeline alone per chunk size (8-64 MB),
and the SM carveout with the next merge on a side stream (see ``pipes``; session 21).

``--ab ROUNDS`` instead times only the eager step under each of AB_CONFIGS (the opt-ins and the
merge's tile configs), interleaved in rounds, plus the merge kernel alone (whole weight) beside
dequantize_nf4 and over MERGE_SWEEP's tile shapes.  With ``--graph`` the step is timed by CUDA-graph
replay instead (no host gaps; the eager step's ±0.2-0.5 ms spread hides 1-3 % changes) and the
"overlap" config is left out: the side-stream merge only runs on the default stream, never in a capture.

    python -m benchmarks.training_probe --shapes 8192x28672,4096x14336 --ms 4096 --workspace-mb 64,256 \
        --json out.json
    python -m benchmarks.training_probe --ab 3 --shapes 8192x28672 --ms 4096 --json ab.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from benchmarks import bench_forward as bf
from benchmarks import harness

SCALE = 2.0


def _t(fn, sets, graph: bool, rep_ms: float) -> float:
    return harness.time_cuda(fn, sets, warmup_ms=5.0, rep_ms=rep_ms, use_graph=graph)["median_ms"]


def _operands(K: int, N: int, M: int, r: int = 16):
    """(W bf16 [N, K], its NF4 q, A [r, K], B [N, r], x [M, K] (these three requiring grad), g [M, N]),
    drawn as bench_training draws them."""
    import lora_kernels as lk

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev)
    W = bf._randn((N, K), gen.manual_seed(1), dev, 0.02)
    q = lk.quantize_nf4(W)
    A = bf._randn((r, K), gen, dev, 1.0 / math.sqrt(K)).requires_grad_()
    B = bf._randn((N, r), gen, dev, 0.02).requires_grad_()
    x = bf._randn((M, K), gen, dev).requires_grad_()
    g = bf._randn((M, N), gen, dev)
    return W, q, A, B, x, g


def _step(lk, x, q, A, B, g):
    """Our eager training step: forward + torch.autograd.grad for x, A, B (as bench_training's)."""
    y = lk.qlora_linear(x, q, A, B, SCALE)
    return torch.autograd.grad(y, (x, A, B), g)


def probe(K: int, N: int, M: int, ws_mb: list[float], rep_ms: float) -> list[dict]:
    import lora_kernels as lk
    from lora_kernels import autograd as lk_autograd
    from lora_kernels import library
    from lora_kernels.triton import nf4_merge

    W, q, A, B, x, g = _operands(K, N, M)
    r, dev = A.shape[0], x.device
    xd = x.detach()
    sets = [()]
    rows = []
    floor = _t(lambda: (F.linear(xd, W), g @ W), sets, True, rep_ms)
    t_ = xd @ A.detach().t()
    u_ = g @ B.detach()
    parts = {"T": lambda: xd @ A.detach().t(), "U": lambda: g @ B.detach(),
             "dA": lambda: lk_autograd._mm_scaled(u_.t(), xd, SCALE, A.dtype),
             "dB": lambda: lk_autograd._mm_scaled(g.t(), t_, SCALE, B.dtype)}
    lora_ms = _t(lambda: [f() for f in parts.values()], sets, True, rep_ms)   # the four in one graph
    lora_parts = {k: _t(f, sets, True, rep_ms) for k, f in parts.items()}
    try:                                         # U and dB from one read of dY (triton/lora_grad.py)
        from lora_kernels.triton import lora_grad
        lora_parts["U+dB_fused"] = _t(lambda: lora_grad.lora_dy_pass(g, B.detach(), t_, SCALE), sets, True, rep_ms)
        u_f, db_f = lora_grad.lora_dy_pass(g, B.detach(), t_, SCALE)
        db_ref = SCALE * (g.float().t() @ t_.float())
        lora_parts["fused_db_relerr"] = float((db_f.float() - db_ref).norm() / db_ref.norm())
    except Exception as e:                       # noqa: BLE001
        print(f"fused dY pass failed: {harness.short_error(e)}", flush=True)
    s_scalar, s_vec = nf4_merge.scale_operands(SCALE, r, dev)
    for mb in ws_mb:
        library.WORKSPACE_BYTES = int(mb * 2**20)
        library._workspaces.clear()
        torch.cuda.empty_cache()
        rows_c = min(N, library.merge_chunk(N, K, 128, False))
        unit = max(128, q.blocksize)
        cols_c = min(K, library.merge_chunk(K, N, unit, False))
        ws = torch.empty(max(rows_c * K, N * cols_c), dtype=torch.bfloat16, device=dev)
        y = torch.empty((M, N), dtype=torch.bfloat16, device=dev)
        dx = torch.empty((M, K), dtype=torch.bfloat16, device=dev)
        Ad, Bd = A.detach(), B.detach()

        def fwd_merge():
            for n0 in range(0, N, rows_c):
                nf4_merge.merge_window(ws, q, Ad, Bd, s_scalar, s_vec, (n0, min(N, n0 + rows_c)), (0, K))

        def fwd_gemm():
            for n0 in range(0, N, rows_c):
                n1 = min(N, n0 + rows_c)
                torch.mm(xd, ws.as_strided((K, n1 - n0), (1, K)), out=y.narrow(1, n0, n1 - n0))

        def bwd_merge():
            for k0 in range(0, K, cols_c):
                nf4_merge.merge_window(ws, q, Ad, Bd, s_scalar, s_vec, (0, N), (k0, min(K, k0 + cols_c)))

        def bwd_gemm():
            for k0 in range(0, K, cols_c):
                k1 = min(K, k0 + cols_c)
                torch.mm(g, ws.as_strided((N, k1 - k0), (k1 - k0, 1)), out=dx.narrow(1, k0, k1 - k0))

        def step():
            return _step(lk, x, q, A, B, g)

        row = dict(shape=f"{K}x{N}", M=M, r=r, workspace_mb=mb, fwd_rows=rows_c, bwd_cols=cols_c,
                   n_fwd_chunks=-(-N // rows_c), n_bwd_chunks=-(-K // cols_c), floor_ms=floor, lora_ms=lora_ms,
                   **{f"lora_{k}" + ("" if k.endswith("relerr") else "_ms"): v for k, v in lora_parts.items()})
        for name, fn in (("fwd_merge", fwd_merge), ("fwd_gemm", fwd_gemm), ("bwd_merge", bwd_merge),
                         ("bwd_gemm", bwd_gemm)):
            row[f"{name}_ms"] = _t(fn, sets, True, rep_ms)
        del ws
        library._workspaces.clear()
        row["step_eager_ms"] = _t(step, sets, False, rep_ms)
        # the opt-ins: the side-stream merge pipeline (eager only: not under capture), the fused dY pass
        for name, overlap, fused in (("overlap", True, False), ("fused", False, True), ("both", True, True)):
            library.MERGE_OVERLAP, library.FUSED_DY_PASS = overlap, fused
            library._workspaces.clear()
            try:
                row[f"step_{name}_ms"] = _t(step, sets, False, rep_ms)
            except Exception as e:                               # noqa: BLE001
                row[f"step_{name}_ms"] = None
                row["note"] = f"{row.get('note', '')} {name}: {harness.short_error(e)}".strip()
            finally:
                library.MERGE_OVERLAP = library.FUSED_DY_PASS = False
                library._workspaces.clear()
        try:
            row["step_graph_ms"] = _t(step, sets, True, rep_ms)
        except Exception as e:                                   # noqa: BLE001
            row["step_graph_ms"] = None
            row["note"] = f"graph: {harness.short_error(e)}"
        row["parts_sum_ms"] = sum(row[f"{k}_ms"] for k in ("fwd_merge", "fwd_gemm", "bwd_merge", "bwd_gemm", "lora"))
        row["step_over_floor"] = row["step_eager_ms"] / floor
        for name in ("overlap", "fused", "both"):
            v = row[f"step_{name}_ms"]
            row[f"{name}_over_floor"] = v / floor if v else None
        row["graph_over_floor"] = row["step_graph_ms"] / floor if row["step_graph_ms"] else None
        row["gemm_over_floor"] = (row["fwd_gemm_ms"] + row["bwd_gemm_ms"]) / floor
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        del y, dx
        torch.cuda.empty_cache()
    return rows


#: (name, MERGE_OVERLAP, FUSED_DY_PASS, overrides of the merge's DEFAULT_CONFIG; the key SMALL_RANK_MAX
#: sets nf4_merge.SMALL_RANK_MAX instead: -1 = the 64x128 tile at every rank, as before session 19;
#: $AB_CONFIGS (names, comma-separated) picks a subset).
#: Session 21 measured two more here, since removed from the library (the SM-carveout pipeline,
#: LORA_KERNELS_MERGE_CARVEOUT, and an L2-sized forward chunk, LORA_KERNELS_FWD_CHUNK_MB; neither beat
#: the default beyond the spread: results/probe_training_ab_m4096_*_graph_carveout_session21.*).
#: Session 19 measured the merge's FMA low-rank path, its split-halves tile, K_FASTEST and a separate
#: low-rank tile here too (all slower or within the spread; results/probe_training_ab_*_session19*).
AB_CONFIGS = (("default", False, False, {}), ("tile_64x128", False, False, dict(SMALL_RANK_MAX=-1)),
              ("overlap", True, False, {}), ("fused", False, True, {}))


#: merge_window configs timed by ``ab`` beside the default (whole weight, r = 16, graph replay)
MERGE_SWEEP = (dict(BLOCK_N=64, BLOCK_K=128, num_warps=4), dict(BLOCK_N=16, BLOCK_K=256, num_warps=2))


def ab(K: int, N: int, M: int, ws_mb: list[float], rounds: int, rep_ms: float, graph: bool = False) -> list[dict]:
    """The step (eager, CUDA events; ``graph``: CUDA-graph replay) under each of AB_CONFIGS, interleaved
    in ``rounds`` rounds (ABCD ABCD ...: clock and thermal drift spread over all configs), per workspace
    size; and the merge kernel without and with the low-rank term beside dequantize_nf4 (one
    whole-weight window, graph replay): how far the merge is from a dequantize."""
    import lora_kernels as lk
    from lora_kernels import library
    from lora_kernels.triton import nf4_merge

    W, q, A, B, x, g = _operands(K, N, M)
    r, dev = A.shape[0], x.device
    floor = min(_t(lambda: (F.linear(x.detach(), W), g @ W), [()], True, rep_ms) for _ in range(2))
    del W
    out = torch.empty((N, K), dtype=torch.bfloat16, device=dev)
    s_scalar, s_vec = nf4_merge.scale_operands(SCALE, r, dev)
    kern = {}
    nolora = {"merge_nolora_ms": None,                           # the default config at r = 0
              "merge_nolora_64x128_ms": nf4_merge.DEFAULT_CONFIG}
    for name, fn in (("dequantize_ms", lambda: lk.dequantize_nf4(q, torch.bfloat16)),
                     *((nm, lambda c=c: nf4_merge.merge_window(out, q, None, None, 1.0, None, (0, N), (0, K), c))
                       for nm, c in nolora.items()),
                     ("merge_lora_ms", lambda: nf4_merge.merge_window(out, q, A.detach(), B.detach(), s_scalar, s_vec,
                                                                      (0, N), (0, K)))):
        try:
            kern[name] = _t(fn, [()], True, rep_ms)
        except Exception as e:                                   # noqa: BLE001
            print(f"{name}: {harness.short_error(e)}", flush=True)
    for cfg in MERGE_SWEEP:                                      # the merge's tile shapes, both low-rank paths
        name = "merge_" + "_".join(f"{k}{v}" for k, v in cfg.items()) + "_ms"
        full = dict(nf4_merge.DEFAULT_CONFIG, **cfg)
        try:
            kern[name] = _t(lambda full=full: nf4_merge.merge_window(out, q, A.detach(), B.detach(), s_scalar, s_vec,
                                                                     (0, N), (0, K), full), [()], True, rep_ms)
        except Exception as e:                                   # noqa: BLE001
            print(f"{name}: {harness.short_error(e)}", flush=True)
    del out
    torch.cuda.empty_cache()

    def step():
        return _step(lk, x, q, A, B, g)

    default_merge, default_srm = dict(nf4_merge.DEFAULT_CONFIG), nf4_merge.SMALL_RANK_MAX
    configs = [c for c in AB_CONFIGS if not (graph and c[1])]   # MERGE_OVERLAP is a no-op under capture
    pick = os.environ.get("AB_CONFIGS")
    if pick:
        configs = [c for c in configs if c[0] in pick.split(",")]
    rows = []
    for mb in ws_mb:
        library.WORKSPACE_BYTES = int(mb * 2**20)
        times: dict = {c[0]: [] for c in configs}
        for _ in range(rounds):
            for name, overlap, fused, merge_cfg in configs:
                library.MERGE_OVERLAP, library.FUSED_DY_PASS = overlap, fused
                merge_cfg = dict(merge_cfg)
                nf4_merge.SMALL_RANK_MAX = merge_cfg.pop("SMALL_RANK_MAX", default_srm)
                nf4_merge.DEFAULT_CONFIG.update(merge_cfg)        # merge_window's default cfg is this dict
                library._workspaces.clear()
                try:
                    times[name].append(_t(step, [()], graph, rep_ms))
                finally:
                    library.MERGE_OVERLAP = library.FUSED_DY_PASS = False
                    nf4_merge.DEFAULT_CONFIG.update(default_merge)
                    nf4_merge.SMALL_RANK_MAX = default_srm
        library._workspaces.clear()
        row = dict(shape=f"{K}x{N}", M=M, r=r, workspace_mb=mb, floor_ms=floor, rounds=rounds,
                   step_timing="graph" if graph else "eager", **kern)
        for name, ts in times.items():
            ts = sorted(ts)
            row[f"{name}_ms"] = ts[len(ts) // 2]
            row[f"{name}_spread_ms"] = ts[-1] - ts[0]
            row[f"{name}_over_floor"] = row[f"{name}_ms"] / floor
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


#: (BLOCK_N, BLOCK_K, num_warps) of merge_sweep's grid, each with and without K_FASTEST
SWEEP_TILES = ((64, 128, 4), (32, 128, 4), (64, 64, 4), (128, 64, 4), (32, 256, 4), (64, 256, 8), (128, 128, 8),
               (16, 512, 4), (32, 512, 8), (16, 1024, 8), (16, 256, 2))


def merge_sweep(K: int, N: int, M: int, rounds: int, rep_ms: float, r: int = 16) -> list[dict]:
    """The merge kernel at rank ``r`` over SWEEP_TILES x K_FASTEST, graph replay: whole weight
    without / with the low-rank term, and with it as the step launches it at the 64 MB workspace
    (the forward's row windows, the backward's column windows).  Then the eager step with the
    config whose two chunked merges are fastest against the default (``nf4_merge.default_config``:
    the small-rank tile at r <= 16), interleaved in ``rounds``
    (``rounds`` <= 0: no step)."""
    import lora_kernels as lk
    from lora_kernels import library
    from lora_kernels.triton import nf4_merge

    W, q, A, B, x, g = _operands(K, N, M, r)
    dev = x.device
    floor = min(_t(lambda: (F.linear(x.detach(), W), g @ W), [()], True, rep_ms) for _ in range(2))
    del W
    library.WORKSPACE_BYTES = 64 * 2**20
    Ad, Bd = A.detach(), B.detach()
    s_scalar, s_vec = nf4_merge.scale_operands(SCALE, r, dev)
    out = torch.empty((N, K), dtype=torch.bfloat16, device=dev)
    row = dict(shape=f"{K}x{N}", M=M, r=r, workspace_mb=64.0, floor_ms=floor,
               dequantize_ms=_t(lambda: lk.dequantize_nf4(q, torch.bfloat16), [()], True, rep_ms), configs=[])
    best = None
    rows_c = min(N, library.merge_chunk(N, K, 128, False))          # the forward's row windows
    for bn, bk, nw in SWEEP_TILES:
        for kf in (False, True):
            cfg = dict(nf4_merge.DEFAULT_CONFIG, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, K_FASTEST=kf)
            cols_c = min(K, library.merge_chunk(K, N, max(bk, q.blocksize, 128), False))
            rec = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, K_FASTEST=kf)
            try:
                rec["nolora_ms"] = _t(lambda: nf4_merge.merge_window(out, q, None, None, 1.0, None, (0, N), (0, K), cfg),
                                      [()], True, rep_ms)
                rec["lora_ms"] = _t(lambda: nf4_merge.merge_window(out, q, Ad, Bd, s_scalar, s_vec, (0, N), (0, K), cfg),
                                    [()], True, rep_ms)
                rec["fwd_chunks_ms"] = _t(lambda: [nf4_merge.merge_window(out, q, Ad, Bd, s_scalar, s_vec,
                                                                          (n0, min(N, n0 + rows_c)), (0, K), cfg)
                                                   for n0 in range(0, N, rows_c)], [()], True, rep_ms)
                rec["bwd_chunks_ms"] = _t(lambda: [nf4_merge.merge_window(out, q, Ad, Bd, s_scalar, s_vec,
                                                                          (0, N), (k0, min(K, k0 + cols_c)), cfg)
                                                   for k0 in range(0, K, cols_c)], [()], True, rep_ms)
            except Exception as e:                               # noqa: BLE001
                rec["error"] = harness.short_error(e)
            row["configs"].append(rec)
            print(json.dumps(rec), flush=True)
            if "bwd_chunks_ms" in rec and (best is None or rec["fwd_chunks_ms"] + rec["bwd_chunks_ms"]
                                           < best["fwd_chunks_ms"] + best["bwd_chunks_ms"]):
                best = rec
    del out
    torch.cuda.empty_cache()
    row["best"] = best
    if rounds <= 0:
        return [row]
    default_merge, default_srm = dict(nf4_merge.DEFAULT_CONFIG), nf4_merge.SMALL_RANK_MAX
    best_cfg = {k: best[k] for k in ("BLOCK_N", "BLOCK_K", "num_warps", "K_FASTEST")}
    times: dict = {"default": [], "best": []}
    for _ in range(rounds):
        for name, cfg in (("default", {}), ("best", best_cfg)):
            nf4_merge.DEFAULT_CONFIG.update(cfg)
            if cfg:               # the best tile at every rank (not replaced by SMALL_RANK_TILE at r <= 16)
                nf4_merge.SMALL_RANK_MAX = -1
            library._workspaces.clear()
            try:
                times[name].append(_t(lambda: _step(lk, x, q, A, B, g), [()], False, rep_ms))
            finally:
                nf4_merge.DEFAULT_CONFIG.update(default_merge)
                nf4_merge.SMALL_RANK_MAX = default_srm
    library._workspaces.clear()
    for name, ts in times.items():
        ts = sorted(ts)
        row[f"{name}_ms"] = ts[len(ts) // 2]
        row[f"{name}_spread_ms"] = ts[-1] - ts[0]
        row[f"{name}_over_floor"] = row[f"{name}_ms"] / floor
    print(json.dumps({k: v for k, v in row.items() if k != "configs"}), flush=True)
    return [row]


def _time_into(rec: dict, name: str, fn, graph: bool, rep_ms: float) -> None:
    """rec[name] = fn's median time (ms), or None with the error appended to rec["note"]."""
    try:
        rec[name] = _t(fn, [()], graph, rep_ms)
    except Exception as e:                                       # noqa: BLE001
        rec[name] = None
        rec["note"] = f"{rec.get('note', '')} {name}: {harness.short_error(e)}".strip()


#: workspace sizes (MB) ``pipes`` times each direction's chunk pipeline at
PIPE_WS_MB = (8.0, 12.0, 16.0, 24.0, 32.0, 64.0)


def pipes(K: int, N: int, M: int, rep_ms: float, carveouts=(0, 4, 8, 16)) -> list[dict]:
    """Each direction's merge + GEMM chunk pipeline alone (CUDA-graph replay), per chunk size in
    PIPE_WS_MB, beside its one cuBLAS GEMM: does a chunk small enough to stay in the 50 MB L2 make the
    merge's writes (and the GEMM's reads of them) cheaper?  ``fwd`` = y[:, rows] = x · W_eff[rows]ᵀ,
    ``bwd`` = dX[:, cols] = dY · W_eff[:, cols] (the step's two pipelines), ``bwd_rows`` = dX accumulated
    over row chunks (dX += dY[:, rows] · W_eff[rows], beta = 1 in bf16: one more rounding per chunk).
    Then the SM carveout (``torch._C._set_sm_carveout_experimental``) under each cuBLAS backend: the
    GEMM alone, and the forward pipeline with merge i + 1 on a side stream during GEMM i (eager with
    the GEMMs on a high-priority stream; graph-replayed with and without it: torch instantiates graphs
    with cudaGraphInstantiateFlagUseNodePriority, so a captured kernel keeps its stream's priority)."""
    from lora_kernels.triton import nf4_merge

    W, q, A, B, x, g = _operands(K, N, M)
    r, dev = A.shape[0], x.device
    xd, Ad, Bd = x.detach(), A.detach(), B.detach()
    s_scalar, s_vec = nf4_merge.scale_operands(SCALE, r, dev)
    row = dict(shape=f"{K}x{N}", M=M, r=r,
               fwd_floor_ms=_t(lambda: F.linear(xd, W), [()], True, rep_ms),
               bwd_floor_ms=_t(lambda: g @ W, [()], True, rep_ms), sizes=[], carveout=[])
    y = torch.empty((M, N), dtype=torch.bfloat16, device=dev)
    dx = torch.empty((M, K), dtype=torch.bfloat16, device=dev)
    unit_k = max(256, q.blocksize)

    def merge(ws, rws, cls):
        nf4_merge.merge_window(ws, q, Ad, Bd, s_scalar, s_vec, rws, cls)

    def fwd(ws, rc):
        for n0 in range(0, N, rc):
            n1 = min(N, n0 + rc)
            merge(ws, (n0, n1), (0, K))
            torch.mm(xd, ws.as_strided((K, n1 - n0), (1, K)), out=y.narrow(1, n0, n1 - n0))

    def bwd(ws, cc):
        for k0 in range(0, K, cc):
            k1 = min(K, k0 + cc)
            merge(ws, (0, N), (k0, k1))
            torch.mm(g, ws.as_strided((N, k1 - k0), (k1 - k0, 1)), out=dx.narrow(1, k0, k1 - k0))

    def bwd_rows(ws, rc):
        for n0 in range(0, N, rc):
            n1 = min(N, n0 + rc)
            merge(ws, (n0, n1), (0, K))
            w = ws.as_strided((n1 - n0, K), (K, 1))
            if n0 == 0:
                torch.mm(g.narrow(1, n0, n1 - n0), w, out=dx)
            else:
                torch.addmm(dx, g.narrow(1, n0, n1 - n0), w, out=dx)

    for mb in PIPE_WS_MB:
        elems = int(mb * 2**20) // 2
        rc = min(N, max(128, elems // K // 128 * 128))
        cc = min(K, max(unit_k, elems // N // unit_k * unit_k))
        ws = torch.empty(max(rc * K, N * cc), dtype=torch.bfloat16, device=dev)
        rec = dict(workspace_mb=mb, rows=rc, cols=cc)
        for name, fn in (("fwd_ms", lambda: fwd(ws, rc)), ("fwd_merges_ms",
                          lambda: [merge(ws, (n0, min(N, n0 + rc)), (0, K)) for n0 in range(0, N, rc)]),
                         ("bwd_ms", lambda: bwd(ws, cc)), ("bwd_rows_ms", lambda: bwd_rows(ws, rc))):
            _time_into(rec, name, fn, True, rep_ms)
        row["sizes"].append(rec)
        print(json.dumps(rec), flush=True)
        del ws

    # the SM carveout: the GEMM alone, and the forward with the next chunk's merge beside it
    rc = min(N, max(128, (32 * 2**19) // K // 128 * 128))       # two 32 MB buffers
    bufs = [torch.empty(rc * K, dtype=torch.bfloat16, device=dev) for _ in range(2)]
    hi = torch.cuda.Stream(dev, priority=-5)
    side = torch.cuda.Stream(dev, priority=0)

    def fwd_overlap(gemm_stream):
        main = torch.cuda.current_stream()
        gemm_stream.wait_stream(main)
        side.wait_stream(main)
        bounds = [(n0, min(N, n0 + rc)) for n0 in range(0, N, rc)]
        done = [None, None]
        for i, (n0, n1) in enumerate(bounds):
            with torch.cuda.stream(side):
                if done[i & 1] is not None:
                    side.wait_event(done[i & 1])
                merge(bufs[i & 1], (n0, n1), (0, K))
                merged = torch.cuda.Event()
                merged.record(side)
            gemm_stream.wait_event(merged)
            with torch.cuda.stream(gemm_stream):
                torch.mm(xd, bufs[i & 1].as_strided((K, n1 - n0), (1, K)), out=y.narrow(1, n0, n1 - n0))
                done[i & 1] = torch.cuda.Event()
                done[i & 1].record(gemm_stream)
        main.wait_stream(gemm_stream)
        main.wait_stream(side)

    backend0 = torch.backends.cuda.preferred_blas_library()
    try:
        for lib in ("cublas", "cublaslt"):
            for co in carveouts:
                torch.backends.cuda.preferred_blas_library(lib)
                torch._C._set_sm_carveout_experimental(co if co else None)
                rec = dict(blas=lib, carveout=co, fwd_rows=rc)
                for name, fn, graph in (
                        ("chunk_gemm_ms", lambda: torch.mm(xd, bufs[0].as_strided((K, rc), (1, K)),
                                                           out=y.narrow(1, 0, rc)), True),
                        ("full_gemm_ms", lambda: F.linear(xd, W), True),
                        ("fwd_inorder_ms", lambda: fwd(bufs[0], rc), True),
                        ("fwd_overlap_eager_ms", lambda: fwd_overlap(hi), False),
                        ("fwd_overlap_graph_ms", lambda: fwd_overlap(hi), True),
                        ("fwd_overlap_noprio_graph_ms", lambda: fwd_overlap(torch.cuda.current_stream()), True)):
                    _time_into(rec, name, fn, graph, rep_ms)
                row["carveout"].append(rec)
                print(json.dumps(rec), flush=True)
    finally:
        torch.backends.cuda.preferred_blas_library(backend0)
        torch._C._set_sm_carveout_experimental(None)
    return [row]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=bf.parse_shapes, required=True)
    p.add_argument("--ms", type=bf.parse_ints, default=[4096])
    p.add_argument("--workspace-mb", type=lambda s: [float(v) for v in s.split(",")], default=[64.0])
    p.add_argument("--rep-ms", type=float, default=60.0)
    p.add_argument("--json", default=None)
    p.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                   help="instead: the step under each opt-in, interleaved in ROUNDS rounds (see ab())")
    p.add_argument("--graph", action="store_true", help="--ab: time the step by CUDA-graph replay")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (--merge-sweep only)")
    p.add_argument("--pipes", action="store_true",
                   help="instead: each direction's chunk pipeline per chunk size, and the SM carveout (see pipes())")
    p.add_argument("--merge-sweep", type=int, default=None, metavar="ROUNDS",
                   help="instead: the merge kernel over SWEEP_TILES, then the step with the best (see merge_sweep())")
    a = p.parse_args(argv)
    env = harness.env_info()
    out = {"env": env, "rows": []}
    for K, N in a.shapes:
        for M in a.ms:
            if a.pipes:
                out["rows"] += pipes(K, N, M, a.rep_ms)
            elif a.merge_sweep is not None:
                out["rows"] += merge_sweep(K, N, M, a.merge_sweep, a.rep_ms, a.r)
            elif a.ab:
                out["rows"] += ab(K, N, M, a.workspace_mb, a.ab, a.rep_ms, a.graph)
            else:
                out["rows"] += probe(K, N, M, a.workspace_mb, a.rep_ms)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
