"""The whole benchmark suite in one command (issue 6): NF4 quantize/dequantize, the fused forward and
the training step (forward, backward, forward + backward), then the report, each stage in its own
subprocess with its own time allowance.

    python -m benchmarks.suite [--quick] [--out DIR] [--budget-s N] [--plan] [--only STAGES] [--cpu]

Goal: the full suite inside one 10-minute device command (default budget 540 s: the command also
spends ~40 s installing the bitsandbytes wheel and copying the prebuilt extension), ``--quick`` in
under two minutes (budget 110 s).  ``--plan`` prints the plan and its time estimate and runs nothing.

Stages run in order, most important first, each ``python -m benchmarks.<bench> ...`` under its own
allowance derived from the budget: up to 2x its estimate, as long as every later stage keeps half of
its estimate (the report all of its own) out of the time left — a stage that finishes early leaves
its slack to the later ones, an overrun is paid by the later (less important) ones.  A stage that
runs out is stopped (SIGTERM to its process group, then SIGKILL) with a note in the log; the benches
write their result files after every shape, so what it finished is kept, and the suite goes on.
Wall time, allowance and status of every stage go to
``<out>/suite_<gpu>[_quick].json`` / ``.md`` (with side-by-side tables: ours, bitsandbytes + PEFT,
bf16 cuBLAS, bf16 LoRA through PEFT, the floor and our route per row) and the stages' output to
``suite_<gpu>[_quick].log``.  Result files are tagged ``_suite`` so they never overwrite the
hand-run ones (bench_nf4 has no tag option: it writes into a staging folder, renamed after its stage).

Full plan (layer shapes K→N: Llama-3-8B q/o 4096→4096, k/v 4096→1024, gate/up 4096→14336, down
14336→4096; Llama-3-70B gate/up 8192→28672, down 28672→8192; Qwen2.5-7B q/o 3584→3584, k/v
3584→512, gate/up 3584→18944, down 18944→3584; Mistral-7B's four are Llama-3-8B's: not re-timed,
the output says so):

  stage           what                                                             estimate
  nf4             quantize + dequantize of 7 weights (one per distinct size of the     46 s
                  10 layers): ours (CUDA ext, Triton) vs bitsandbytes, copy floor
  forward         10 shapes x M 1,16,256,1024,4096,16384 x r 16: ours, bnb+PEFT,     143 s
                  bf16 F.linear, bf16 LoRA (PEFT); CUDA graph + eager for M <= 16
  training        10 shapes x M 1024,4096,16384 x r 16 x fwd / bwd / fwd+bwd: ours,  135 s
                  bnb+PEFT, bf16 LoRA (PEFT), the cuBLAS pair
  forward_ranks   r 8 and 64: the 4 Llama-3-8B shapes x M 1,16,4096,16384             72 s
  training_ranks  r 8 and 64: 4096→1024, 4096→14336 x M 4096,16384, 3 directions      39 s
  report          SUMMARY.md + the PNGs (time vs M per method, the floor dashed)       28 s
                                                                          total       462 s
Quick plan (``--quick``): nf4 on 4096x4096; forward 4096→4096 at M 1 and 4096; training 4096→4096
at M 4096 in the three directions; r = 16; the report: 23 + 29 + 23 + 13 = 88 s estimated (the
first H100 run of a 100 s plan cut training and the report: process start-up, 18 s for the
training bench's imports, was under-estimated; M = 1 training dropped, start-ups re-calibrated).
``--plan`` prints these figures from the code.

The estimates come from ``estimate_stage``, a per-row cost model with constants read off the H100
result files in benchmarks/results/: the timed repetitions (rep_ms, or 10 calls when a call is
longer, at most 1000), the warm-up, the first call per input set and the estimate burst, the
peak-memory (and, for training, largest-allocation) calls, graph capture (4 calls per set), the
host time of eager calls (bitsandbytes + PEFT ~0.33 ms, our forward ~0.3 ms, F.linear 0.05 ms, a
training step 1-1.8 ms: this host is slow, a bare torch.mm costs 27 µs), a fixed ~0.15 s of Python
per row, checks, weights and PEFT set-up, ~14 s of process start (imports, CUDA, the floors) and
~10 s of first Triton compiles.  Checked against the three session-3 runs whose durations their
files' start times give: training r16 38 s (model 41 s), training r8/r64 37 s (40 s), forward
large-M 32 s (31 s).  Estimates, not measurements: the suite's JSON records each stage's wall time.

Without a GPU the suite says so, runs only the CPU quantizer bench (quick, one small weight; its
table lands in suite_cpu.md) and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Default budgets (s): the whole device command is limited to 600 s and spends ~40 s on set-up.
FULL_BUDGET_S = 540.0
QUICK_BUDGET_S = 110.0
CPU_BUDGET_S = 300.0
#: Below this allowance a stage is skipped rather than started.
MIN_STAGE_S = 5.0
#: A stage may run to CAP_FACTOR x its estimate, if the later stages keep ``reserve`` x theirs.
CAP_FACTOR = 2.0
RESERVE = 0.5
#: Kept back from the budget for the suite's own bookkeeping and a stopped stage's grace period.
MARGIN_S = 8.0
KILL_GRACE_S = 5.0

# ------------------------------------------------------------------------------------ shapes
#: Layer shapes (K_in, N_out) per model, as nn.Linear(K, N); weights are N x K.
LLAMA3_8B = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (4096, 1024), "gate_proj/up_proj": (4096, 14336),
             "down_proj": (14336, 4096)}
LLAMA3_70B = {"gate_proj/up_proj": (8192, 28672), "down_proj": (28672, 8192)}
QWEN25_7B = {"q_proj/o_proj": (3584, 3584), "k_proj/v_proj": (3584, 512), "gate_proj/up_proj": (3584, 18944),
             "down_proj": (18944, 3584)}
#: Mistral-7B (hidden 4096, 8 KV heads of 128, intermediate 14336) has exactly Llama-3-8B's shapes.
MISTRAL_7B = dict(LLAMA3_8B)
MODELS = {"Llama-3-8B": LLAMA3_8B, "Mistral-7B": MISTRAL_7B, "Llama-3-70B": LLAMA3_70B, "Qwen2.5-7B": QWEN25_7B}
MISTRAL_NOTE = ("Mistral-7B: q/o 4096→4096, k/v 4096→1024, gate/up 4096→14336, down 14336→4096 — exactly "
                "Llama-3-8B's four shapes, so they are not timed twice: read the Llama-3-8B rows")
L8B = list(LLAMA3_8B.values())
L70B = list(LLAMA3_70B.values())
QWEN = list(QWEN25_7B.values())
ALL_LAYERS = L8B + L70B + QWEN                 # the 10 distinct layer shapes (K, N)
M_ALL = [1, 16, 256, 1024, 4096, 16384]        # M from 1 to 16384
RANKS = [8, 16, 64]
#: nf4 weights (N_out, K_in): one per distinct element count among ALL_LAYERS (a transposed weight
#: has the same bytes to move; the nf4 kernels see a flat array of blocks).
NF4_FULL = [(4096, 4096), (1024, 4096), (14336, 4096), (28672, 8192), (3584, 3584), (512, 3584), (18944, 3584)]
FORWARD_METHODS = ("ours", "bnb_peft", "bf16_linear", "bf16_lora_peft")
LORA_METHODS = ("ours", "bnb_peft", "bf16_lora_peft")
TRAINING_METHODS = ("ours", "bnb_peft", "bf16_lora_peft", "cublas_floor")
DIRECTIONS = ("step", "fwd", "bwd")           # bench_training --directions: fwd+bwd, fwd, bwd


def model_of(K: int, N: int) -> str:
    """'Llama-3-8B/Mistral-7B q_proj/o_proj' for (4096, 4096); '' for a shape of no listed model."""
    names = []
    for model, shapes in MODELS.items():
        for proj, s in shapes.items():
            if s == (K, N) and model != "Mistral-7B":
                names.append(f"{model}{'/Mistral-7B' if model == 'Llama-3-8B' else ''} {proj}")
    return "; ".join(names)


def _shapes_arg(shapes) -> str:
    return ",".join(f"{a}x{b}" for a, b in shapes)


# ------------------------------------------------------------------------------------ stages
@dataclasses.dataclass
class Stage:
    """One step of the suite: a command, what it covers (``spec``) and its estimated seconds."""
    name: str
    what: str
    argv: list[str]
    est_s: float
    spec: dict = dataclasses.field(default_factory=dict)
    #: after the stage: rename result files {old base name: new base name} (nf4 has no --tag)
    rename: dict = dataclasses.field(default_factory=dict)
    #: the fraction of its estimate held back for this stage while earlier stages run
    reserve: float = RESERVE


def bench_stage(name: str, what: str, bench: str, spec: dict, quick: bool, extra: Sequence[str] = ()) -> Stage:
    """A stage running ``python -m benchmarks.bench_<bench>`` with the arguments ``spec`` names."""
    args: list[str] = ["--quick"] if quick else []
    if spec.get("shapes"):
        args += ["--shapes", _shapes_arg(spec["shapes"])]
    for key, flag in (("ms", "--ms"), ("ranks", "--ranks"), ("methods", "--methods"),
                      ("directions", "--directions"), ("backends", "--backends")):
        if spec.get(key):
            args += [flag, ",".join(map(str, spec[key]))]
    for key, flag in (("tag", "--tag"), ("warmup_ms", "--warmup-ms"), ("rep_ms", "--rep-ms"), ("reps", "--reps")):
        if spec.get(key) is not None:
            args += [flag, str(spec[key])]
    args += list(extra)
    spec = dict(spec, bench=bench)
    return Stage(name, what, [sys.executable, "-m", f"benchmarks.bench_{bench}"] + args,
                 estimate_stage(spec), spec)


def report_stage(n_pngs: int) -> Stage:
    spec = {"bench": "report", "pngs": n_pngs}
    return Stage("report", "SUMMARY.md and the PNGs over the result folder",
                 [sys.executable, "-m", "benchmarks.report"], estimate_stage(spec), spec, reserve=1.0)


def gpu_plan(quick: bool) -> list[Stage]:
    """The stages of the full (or quick) GPU suite, most important first (a cut hits the last)."""
    if quick:
        sq = [(4096, 4096)]
        stages = [
            bench_stage("nf4", "NF4 quantize/dequantize, 4096x4096, ours (CUDA, Triton) vs bitsandbytes", "nf4",
                        dict(shapes=sq, rep_ms=50.0, warmup_ms=10.0), True),
            bench_stage("forward", "forward 4096→4096, M 1 and 4096, r 16, all methods", "forward",
                        dict(shapes=sq, ms=[1, 4096], ranks=[16], methods=FORWARD_METHODS, tag="suite"), True),
            bench_stage("training", "training 4096→4096, M 4096, r 16, fwd / bwd / fwd+bwd", "training",
                        dict(shapes=sq, ms=[4096], ranks=[16], methods=TRAINING_METHODS, directions=DIRECTIONS,
                             tag="suite", rep_ms=50.0), True),
        ]
    else:
        stages = [
            bench_stage("nf4", "NF4 quantize/dequantize, 7 weights (every distinct size), ours vs bitsandbytes",
                        "nf4", dict(shapes=NF4_FULL, rep_ms=50.0, warmup_ms=10.0), False),
            bench_stage("forward", "forward, 10 shapes x M 1..16384 x r 16, all methods", "forward",
                        dict(shapes=ALL_LAYERS, ms=M_ALL, ranks=[16], methods=FORWARD_METHODS, tag="suite",
                             rep_ms=40.0, warmup_ms=5.0), False),
            bench_stage("training", "training, 10 shapes x M 1024/4096/16384 x r 16, fwd / bwd / fwd+bwd", "training",
                        dict(shapes=ALL_LAYERS, ms=[1024, 4096, 16384], ranks=[16], methods=TRAINING_METHODS,
                             directions=DIRECTIONS, tag="suite", rep_ms=50.0, warmup_ms=5.0), False),
            bench_stage("forward_ranks", "forward, r 8 and 64 on the Llama-3-8B shapes x M 1/16/4096/16384", "forward",
                        dict(shapes=L8B, ms=[1, 16, 4096, 16384], ranks=[8, 64], methods=LORA_METHODS,
                             tag="suite_ranks", rep_ms=40.0, warmup_ms=5.0, first=False), False),
            bench_stage("training_ranks", "training, r 8 and 64 on 4096→1024 and 4096→14336, M 4096/16384",
                        "training", dict(shapes=[(4096, 1024), (4096, 14336)], ms=[4096, 16384], ranks=[8, 64],
                                         methods=LORA_METHODS, directions=DIRECTIONS, tag="suite_ranks",
                                         rep_ms=50.0, warmup_ms=5.0), False),
        ]
    n_png = 1 + sum(len(s.spec["shapes"]) for s in stages if s.spec["bench"] in ("forward", "training"))
    return stages + [report_stage(n_png)]


def cpu_plan(shapes: Sequence[tuple[int, int]]) -> list[Stage]:
    """Without a GPU: only the CPU quantizer bench on ``shapes`` (N x K) — its table is in the suite's
    markdown; the forward and training benches mean nothing for the GPU kernels there."""
    return [bench_stage("nf4_cpu", f"NF4 quantizer on the CPU ({_shapes_arg(shapes)}), ours vs bitsandbytes' CPU "
                        "path", "nf4", dict(shapes=list(shapes), reps=3, cpu=True), True, extra=["--cpu"])]


def result_base(bench: str, key: str, quick: bool, tag: str | None) -> str:
    """The result file base name a bench writes (bench_forward/bench_training ``result_name``)."""
    return f"{bench}_{key}" + ("_quick" if quick else "") + (f"_{tag}" if tag else "")


def attach_renames(stages: list[Stage], key: str, quick: bool) -> None:
    """nf4 has no --tag: it writes into a staging folder, and its files move to ``nf4_<key>[_quick]_suite``."""
    for st in stages:
        if st.spec.get("bench") == "nf4" and not st.spec.get("cpu"):
            st.rename = {result_base("nf4", key, quick, None): result_base("nf4", key, quick, "suite")}


# ------------------------------------------------------------------------------------ cost model
#: H100 rates measured in the result files (bf16 GEMM 659-740 TFLOP/s, copy 3022 GB/s).
GEMM_RATE = 700e12
COPY_BW = 3.0e12
FP32_RATE = 40e12                    # float32 reference checks (no TF32)
L2 = 50 * 2**20
#: Host time of one eager call (ms), from the files: forward at M <= 16 (host-bound), training steps.
HOST_MS = {
    ("forward", "ours"): 0.30, ("forward", "bnb_peft"): 0.33, ("forward", "bf16_linear"): 0.05,
    ("forward", "bf16_lora_peft"): 0.22,
    ("fwd+bwd", "ours"): 1.8, ("fwd+bwd", "bnb_peft"): 1.6, ("fwd+bwd", "bf16_lora_peft"): 1.0,
    ("fwd+bwd", "cublas_floor"): 0.11,
    ("fwd", "ours"): 0.6, ("fwd", "bnb_peft"): 0.5, ("fwd", "bf16_lora_peft"): 0.35, ("fwd", "cublas_floor"): 0.05,
    ("bwd", "ours"): 1.3, ("bwd", "bnb_peft"): 1.1, ("bwd", "bf16_lora_peft"): 0.7, ("bwd", "cublas_floor"): 0.05,
}
#: GPU time / floor, per method: decode (M <= 16, GEMV-like) and GEMM-sized M (from the files).
GPU_FACTOR = {"ours": (3.5, 1.2), "bnb_peft": (4.5, 1.6), "bf16_linear": (1.1, 1.1), "bf16_lora_peft": (1.5, 2.0),
              "cublas_floor": (1.1, 1.1)}
ROW_S = {"eager": 0.15, "graph": 0.30, "training": 0.15, "nf4": 0.10}  # fixed Python cost per row
PROCESS_S = {"forward": 14.0, "training": 19.0, "nf4": 9.0, "report": 10.0}  # imports, CUDA init, floors
#   (training 19 s and report 10 s: measured by the first quick run on the H100, 2026-11-23)
JIT_S = {"nf4": 10.0, "forward": 10.0}   # first compiles of our Triton kernels in a fresh machine
PNG_S = 0.9


def _sets(nbytes: float) -> int:
    return int(min(64, max(2, math.ceil(2 * L2 / max(1.0, nbytes)))))


def _nf4_bytes(N: int, K: int) -> float:
    return N * K * 4.127 / 8


def _eager_row_s(t_ms: float, k: int, rep_ms: float, warm_ms: float, extra_calls: int = 1,
                 fixed: float = ROW_S["eager"]) -> float:
    reps = min(1000 * t_ms, max(10 * t_ms, rep_ms))
    return fixed + (reps + max(t_ms, warm_ms) + (k + max(k, 5) + extra_calls) * t_ms) / 1e3


def _graph_row_s(gpu_ms: float, host_ms: float, k: int, rep_ms: float, warm_ms: float) -> float:
    step = k * gpu_ms
    reps = min(1000 * step, max(10 * step, rep_ms))
    return ROW_S["graph"] + (4 * k * max(host_ms, gpu_ms) + 3 * step + max(step, warm_ms) + reps) / 1e3


def _gpu_ms(method: str, M: int, flops: float, nbytes: float) -> float:
    f = GPU_FACTOR[method][0 if M <= 16 else 1]
    return max(flops / GEMM_RATE, nbytes / COPY_BW) * f * 1e3 + 0.005


def _forward_s(spec: dict) -> float:
    rep, warm = spec.get("rep_ms", 50.0), spec.get("warmup_ms", 10.0)
    methods, ranks, ms = spec["methods"], spec["ranks"], sorted(spec["ms"])
    total = PROCESS_S["forward"] + JIT_S["forward"] * bool(spec.get("first", True))
    for K, N in spec["shapes"]:
        qb, wb = _nf4_bytes(N, K), 2.0 * N * K
        ad = 2 * max(ranks) * (K + N)
        nw_q = _sets(qb + ad + 2 * ms[0] * (K + N)) if qb <= 2 * L2 else 1
        nw_b = _sets(wb + 2 * ms[0] * (K + N)) if wb <= 2 * L2 else 1
        total += 0.3 + 0.01 * max(nw_q, nw_b) + 0.004 * nw_q * (N * K / 2**24)   # weights + quantize
        for ri, r in enumerate(ranks):
            total += 0.6 * ("bnb_peft" in methods) + 0.015 * nw_q + 0.6 * ("bf16_lora_peft" in methods) + 0.015 * nw_b
            for M in ms:
                xy = 2 * M * (K + N)
                n_q = min(_sets(qb + ad + xy), nw_q) if nw_q > 1 else _sets(xy + ad)
                n_b = min(_sets(wb + xy), nw_b) if nw_b > 1 else _sets(xy)
                total += 0.35 + 3 * 2 * M * K * N / FP32_RATE                        # check, x, _free
                fl = 2 * M * K * N + 2 * M * r * (K + N)
                for m in methods:
                    if m == "bf16_linear" and ri > 0:
                        continue
                    nf4 = m in ("ours", "bnb_peft")
                    k = n_q if nf4 else n_b
                    g = _gpu_ms(m, M, fl, (qb if nf4 else wb) + xy)
                    h = HOST_MS[("forward", m)]
                    total += _eager_row_s(max(g, h), k, rep, warm)
                    if M <= 16 and m != "bf16_lora_peft":
                        total += _graph_row_s(g, h, k, rep, warm)
    return total


def _training_s(spec: dict) -> float:
    rep, warm = spec.get("rep_ms", 100.0), spec.get("warmup_ms", 10.0)
    methods, ranks, ms = spec["methods"], spec["ranks"], sorted(spec["ms"])
    dirs = [{"step": "fwd+bwd"}.get(d, d) for d in (spec.get("directions") or ["step"])]
    total = PROCESS_S["training"]
    for K, N in spec["shapes"]:
        qb, wb = _nf4_bytes(N, K), 2.0 * N * K
        total += 0.3
        for ri, r in enumerate(ranks):
            total += 0.5 * sum(m in methods for m in ("bnb_peft", "bf16_lora_peft"))
            for M in ms:
                k = _sets(2 * M * (K + N))
                total += 0.3 + 9 * 2 * M * K * N / FP32_RATE                         # check, x and g, _free
                for m in methods:
                    if m == "cublas_floor" and ri > 0:
                        continue
                    w = wb if m in ("bf16_lora_peft", "cublas_floor") else qb
                    fl_f, fl_b = 2 * M * K * N + 2 * M * r * (K + N), 2 * M * K * N + 4 * M * r * (K + N)
                    by = w + 2 * M * (K + N)
                    t_f = max(_gpu_ms(m, M, fl_f, by), HOST_MS[("fwd", m)])
                    for d in dirs:
                        fl = {"fwd+bwd": fl_f + fl_b, "fwd": fl_f, "bwd": fl_b}[d]
                        t = max(_gpu_ms(m, M, fl, by * (2 if d == "fwd+bwd" else 1)), HOST_MS[(d, m)])
                        total += _eager_row_s(t, k, rep, warm, extra_calls=2, fixed=ROW_S["training"])
                        if d == "bwd":
                            total += k * t_f / 1e3                                    # the stored forwards
    return total


def _nf4_s(spec: dict) -> float:
    rep, warm = spec.get("rep_ms", 100.0), spec.get("warmup_ms", 25.0)
    if spec.get("cpu"):  # not calibrated: a generous guess (the reference quantizer runs ~0.1 s per M elements)
        return 20.0 + sum(1.5e-6 * N * K for N, K in spec["shapes"])
    total = PROCESS_S["nf4"] + JIT_S["nf4"]
    for N, K in spec["shapes"]:
        n = N * K
        dq = _nf4_bytes(N, K) + 2 * n
        k = _sets(dq)
        g_dq, g_q = dq / (0.8 * COPY_BW) * 1e3, dq / (0.6 * COPY_BW) * 1e3
        total += 0.3 + 0.02 * k + 2 * 0.25                                           # weights, two checks
        for host_dq, host_q in ((0.03, 0.15), (0.06, 0.21)):                          # ours-cuda, ours-triton
            total += 2 * _eager_row_s(max(g_dq, host_dq), k, rep, warm, fixed=ROW_S["nf4"])
            total += _graph_row_s(g_dq, host_dq, k, rep, warm) - ROW_S["graph"] + ROW_S["nf4"]
            total += 2 * _eager_row_s(max(g_q, host_q), k, rep, warm, fixed=ROW_S["nf4"])
            total += _graph_row_s(g_q, host_q, k, rep, warm) - ROW_S["graph"] + ROW_S["nf4"]
        t_bq = max(0.3, n * 1.0e-8)                                                  # bitsandbytes quantize (eager)
        total += 2 * _eager_row_s(max(g_dq, 0.06), k, rep, warm, fixed=ROW_S["nf4"])
        total += _graph_row_s(g_dq, 0.06, k, rep, warm) - ROW_S["graph"] + ROW_S["nf4"]
        total += _eager_row_s(t_bq, k, rep, warm, fixed=ROW_S["nf4"]) + 0.2 + k * t_bq / 1e3  # + failed capture
        total += _graph_row_s(dq / COPY_BW * 1e3, 0.02, k, rep, warm) - ROW_S["graph"] + ROW_S["nf4"]
    return total


def estimate_stage(spec: dict) -> float:
    """Estimated wall seconds of one stage on the H100 (see the module docstring)."""
    bench = spec["bench"]
    if bench == "forward":
        return round(_forward_s(spec), 1)
    if bench == "training":
        return round(_training_s(spec), 1)
    if bench == "nf4":
        return round(_nf4_s(spec), 1)
    if bench == "report":
        return round(PROCESS_S["report"] + PNG_S * spec.get("pngs", 1), 1)
    return float(spec.get("est_s", 10.0))


#: The three session-3 runs whose durations their files give (start times 38 / 37 / 32 s apart).
CALIBRATION = [
    ("training_nvidia-h100-80gb-hbm3_r16", 38.0,
     dict(bench="training", shapes=L8B + [(8192, 28672)], ms=[4096, 16384], ranks=[16], methods=TRAINING_METHODS,
          directions=["step"], rep_ms=100.0, warmup_ms=10.0)),
    ("training_nvidia-h100-80gb-hbm3_r8_r64", 37.0,
     dict(bench="training", shapes=[(4096, 14336), (8192, 28672)], ms=[4096, 16384], ranks=[8, 64],
          methods=TRAINING_METHODS, directions=["step"], rep_ms=100.0, warmup_ms=10.0)),
    ("forward_nvidia-h100-80gb-hbm3_largem_session3", 32.0,
     dict(bench="forward", shapes=L8B + [(8192, 28672)], ms=[4096, 16384], ranks=[16],
          methods=("ours", "bnb_peft", "bf16_linear"), rep_ms=50.0, warmup_ms=10.0, first=False)),
]


def calibration() -> list[tuple[str, float, float]]:
    """(result file, measured s, modelled s) for the runs the model was checked against."""
    out = []
    for name, measured, spec in CALIBRATION:
        spec = dict(spec)
        if spec["bench"] == "training":  # those runs timed the cuBLAS pair at every rank
            spec2 = dict(spec, ranks=[spec["ranks"][0]])
            est = sum(estimate_stage(dict(spec2, ranks=[r])) for r in spec["ranks"]) \
                - (len(spec["ranks"]) - 1) * PROCESS_S["training"] \
                - (len(spec["ranks"]) - 1) * 0.3 * len(spec["shapes"])
        else:
            est = estimate_stage(spec)
        out.append((name, measured, round(est, 1)))
    return out


# ------------------------------------------------------------------------------------ running
def allowance(remaining_s: float, est_s: float, held_for_later_s: float, cap: float = CAP_FACTOR) -> float:
    """This stage's allowance: at most ``cap`` x its estimate, and never what the later stages need
    held back (``held_for_later_s``: each later stage's estimate x its ``reserve``)."""
    return max(0.0, min(cap * est_s, remaining_s - held_for_later_s))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's process group (it was started in a session of its own), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(st: Stage, limit_s: float, log, env: dict | None = None, cwd: str = REPO) -> dict:
    """Run one stage under ``limit_s`` seconds, its output appended to ``log`` (an open file).
    Returns {status, rc, wall_s}: status "ok", "failed" or "cut"."""
    log.write(f"\n=== suite: stage {st.name} — {st.what}\n=== allowance {limit_s:.0f} s, estimate {st.est_s:.0f} s\n"
              f"=== $ {' '.join(shlex.quote(a) for a in st.argv)}\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(st.argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=max(0.1, limit_s))
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        _stop(proc)
        rc, status = proc.returncode, "cut"
    except BaseException:  # the suite itself interrupted or terminated: never leave the stage running
        _stop(proc)
        log.write(f"\n=== suite: interrupted during stage {st.name}: stopped it\n")
        log.flush()
        raise
    wall = time.monotonic() - t0
    if status == "cut":
        msg = (f"=== suite: stage {st.name} CUT after {wall:.1f} s: it ran out of its {limit_s:.0f} s allowance; "
               f"its result file keeps every shape finished before the cut; the suite goes on\n")
    else:
        msg = f"=== suite: stage {st.name} {status} (rc {rc}) in {wall:.1f} s\n"
    log.write(msg)
    log.flush()
    return {"status": status, "rc": rc, "wall_s": wall}


def staging_dir(out: str, st: Stage) -> str:
    """Where a stage with a ``rename`` map writes (so it never overwrites a file of the same name in ``out``)."""
    return os.path.join(out, f".staging_{st.name}")


def collect_staged(staging: str, out: str, rename: dict) -> list[str]:
    """Move every file of ``staging`` into ``out``, base names mapped by ``rename`` (a JSON's "name" and a
    markdown's title line too); remove ``staging``.  Returns the JSON files' new names."""
    done = []
    if not os.path.isdir(staging):
        return done
    for fn in sorted(os.listdir(staging)):
        if fn.endswith(".tmp"):  # a write the cut interrupted
            os.remove(os.path.join(staging, fn))
            continue
        base, ext = os.path.splitext(fn)
        new = rename.get(base, base)
        src, dst = os.path.join(staging, fn), os.path.join(out, new + ext)
        if ext == ".json":
            try:
                with open(src) as f:
                    doc = json.load(f)
                doc["name"] = new
                with open(dst + ".tmp", "w") as f:
                    json.dump(doc, f, indent=1)
                os.replace(dst + ".tmp", dst)
                os.remove(src)
            except (OSError, ValueError):
                os.replace(src, dst)
            done.append(new + ext)
        elif ext == ".md":
            with open(src) as f:
                text = f.read()
            if text.startswith(f"# {base}\n"):
                text = f"# {new}\n" + text[len(base) + 3:]
            with open(dst, "w") as f:
                f.write(text)
            os.remove(src)
        else:
            os.replace(src, dst)
    with contextlib.suppress(OSError):
        os.rmdir(staging)
    return done


def _json_mtimes(out: str) -> dict:
    """{result file name: its modification time} of the JSON files in ``out`` (what a stage wrote = what changed)."""
    return {os.path.basename(p): os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "*.json"))}


def run_stages(stages: Sequence[Stage], budget_s: float, out: str, log, env: dict | None = None,
               min_stage_s: float = MIN_STAGE_S, margin_s: float = MARGIN_S, cwd: str = REPO,
               say: Callable[[str], None] = print, before: Callable[[Stage, list], None] | None = None) -> list[dict]:
    """Run ``stages`` in order within ``budget_s`` (minus ``margin_s``); one bookkeeping row per stage.

    Each stage's allowance = ``allowance``: up to CAP_FACTOR x its estimate, as long as every later
    stage keeps its ``reserve`` x its estimate (so slack moves on and an overrun of an early, more
    important stage is paid by the later ones); a stage given less than ``min_stage_s`` is skipped;
    one that overruns its allowance is cut.
    ``before(stage, rows_so_far)`` runs before each stage (the suite writes its JSON before the report)."""
    t0 = time.monotonic()
    rows: list[dict] = []
    for i, st in enumerate(stages):
        if before is not None:
            before(st, rows)
        remaining = budget_s - margin_s - (time.monotonic() - t0)
        allow = allowance(remaining, st.est_s, sum(s.est_s * s.reserve for s in stages[i + 1:]))
        row = {"bench": "suite", "stage": st.name, "what": st.what, "est_s": round(st.est_s, 1),
               "allowance_s": round(allow, 1), "wall_s": None, "status": None, "rc": None, "files": "",
               "note": None, "cmd": " ".join(shlex.quote(a) for a in st.argv[1:])}
        if allow < min_stage_s:
            row.update(status="skipped", wall_s=0.0,
                       note=f"skipped: {max(0.0, remaining):.0f} s left, {allow:.0f} s for this stage")
            log.write(f"\n=== suite: stage {st.name} SKIPPED: only {allow:.1f} s of the budget for it\n")
            log.flush()
            say(f"suite: {st.name}: skipped (no time left)")
            rows.append(row)
            continue
        say(f"suite: {st.name}: {st.what} (allowance {allow:.0f} s, estimate {st.est_s:.0f} s) ...")
        started = time.time()
        before_files = _json_mtimes(out)
        try:
            res = run_stage(st, allow, log, env=env, cwd=cwd)
        except KeyboardInterrupt as e:  # SIGTERM / Ctrl-C: the stage was stopped; no further stage
            row.update(status="interrupted", wall_s=round(time.time() - started, 1),
                       note=f"the suite was interrupted ({e or 'Ctrl-C'}) during this stage; no later stage ran")
            say(f"suite: {st.name}: interrupted")
            rows.append(row)
            break
        row.update(status=res["status"], rc=res["rc"], wall_s=round(res["wall_s"], 1))
        renamed = collect_staged(staging_dir(out, st), out, st.rename) if st.rename else []
        files = sorted({f for f, t in _json_mtimes(out).items() if before_files.get(f) != t} | set(renamed))
        row["files"] = " ".join(f for f in files if not f.startswith("suite_"))
        if res["status"] == "cut":
            row["note"] = (f"cut at its {allow:.0f} s allowance: results up to the last finished shape kept"
                           if row["files"] else f"cut at its {allow:.0f} s allowance before any shape finished")
        elif res["status"] == "failed":
            row["note"] = f"exit status {res['rc']} (see the log)"
        say(f"suite: {st.name}: {res['status']} in {res['wall_s']:.1f} s"
            + (f" — {row['note']}" if row["note"] else ""))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ side-by-side tables
def _ms(v) -> str:
    if v is None:
        return "—"
    return f"{v * 1e3:.1f} µs" if v < 1 else f"{v:.3g} ms"


def _ratio(a, b) -> str:
    return "—" if not a or not b else f"{a / b:.2f}×"


def _find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def forward_table(docs: list[dict]) -> list[str]:
    """One line per (shape, M, r, timing): ours, bnb+PEFT, bf16 F.linear, bf16 LoRA (PEFT), floor, route."""
    rows = [r for d in docs for r in d["rows"] if r.get("median_ms") is not None or r.get("note")]
    if not rows:
        return []
    out = ["| layer K→N | model | M | r | timing | ours | bnb+PEFT | bf16 cuBLAS (F.linear) | bf16 LoRA (PEFT) "
           "| floor | route | ours / bnb+PEFT | ours / bf16 cuBLAS |", "|" + "---|" * 13]
    keys = sorted({(r["K"], r["N"], r["M"], r["r"]) for r in rows if r.get("method") == "ours" and r.get("M")},
                  key=lambda k: (ALL_LAYERS.index((k[0], k[1])) if (k[0], k[1]) in ALL_LAYERS else 99, k[3], k[2]))
    for K, N, M, rk in keys:
        shape = f"{K}x{N}"
        for variant in (("graph", "eager") if M <= 16 else ("eager",)):
            if not any(r.get("shape") == shape and r.get("M") == M and r.get("variant") == variant for r in rows):
                continue
            o = _find(rows, shape=shape, M=M, r=rk, method="ours", variant=variant) or {}
            b = _find(rows, shape=shape, M=M, r=rk, method="bnb_peft", variant=variant) or {}
            c = _find(rows, shape=shape, M=M, method="bf16_linear", variant=variant) or {}
            lo = _find(rows, shape=shape, M=M, r=rk, method="bf16_lora_peft", variant=variant) or {}
            out.append(f"| {K}→{N} | {model_of(K, N)} | {M} | {rk} | {variant} | {_method_cells(o, b, c, lo)} |")
    return out


def _method_cells(o: dict, b: dict, c: dict, lo: dict) -> str:
    """The cells both layer tables share: ours, bnb+PEFT, the bf16 cuBLAS baseline, bf16 LoRA
    (PEFT), floor, route, ours / bnb+PEFT, ours / cuBLAS."""
    return (f"{_ms(o.get('median_ms'))} | {_ms(b.get('median_ms'))} | {_ms(c.get('median_ms'))} "
            f"| {_ms(lo.get('median_ms'))} | {_ms(o.get('floor_ms'))} | {o.get('route') or '—'} "
            f"| {_ratio(o.get('median_ms'), b.get('median_ms'))} | {_ratio(o.get('median_ms'), c.get('median_ms'))}")


def training_table(docs: list[dict]) -> list[str]:
    """One line per (shape, M, r, direction): ours, bnb+PEFT, the cuBLAS pair, bf16 LoRA (PEFT), floor, route."""
    rows = [dict(r, direction=r.get("direction") or "fwd+bwd") for d in docs for r in d["rows"]]
    if not rows:
        return []
    out = ["| layer K→N | model | M | r | direction | ours | bnb+PEFT | bf16 cuBLAS | bf16 LoRA (PEFT) | floor "
           "| route | ours / bnb+PEFT | ours / cuBLAS | ours / bf16 LoRA |", "|" + "---|" * 14]
    dorder = {"fwd+bwd": 0, "fwd": 1, "bwd": 2}
    keys = sorted({(r["K"], r["N"], r["M"], r["r"], r["direction"]) for r in rows
                   if r.get("method") == "ours" and r.get("M")},
                  key=lambda k: (ALL_LAYERS.index((k[0], k[1])) if (k[0], k[1]) in ALL_LAYERS else 99, k[3], k[2],
                                 dorder.get(k[4], 9)))
    for K, N, M, rk, d in keys:
        shape = f"{K}x{N}"
        sel = lambda m, **kw: _find(rows, shape=shape, M=M, method=m, direction=d, **kw) or {}  # noqa: E731
        o, b, lo, c = sel("ours", r=rk), sel("bnb_peft", r=rk), sel("bf16_lora_peft", r=rk), sel("cublas_floor")
        out.append(f"| {K}→{N} | {model_of(K, N)} | {M} | {rk} | {d} | {_method_cells(o, b, c, lo)} "
                   f"| {_ratio(o.get('median_ms'), lo.get('median_ms'))} |")
    return out


def nf4_table(docs: list[dict]) -> list[str]:
    """One line per (weight, op): ours per backend and bitsandbytes (graph replay where there is one), floor."""
    rows = [r for d in docs for r in d["rows"]]
    if not rows:
        return []
    out = ["| weight N×K | op | ours (CUDA ext) | ours (Triton) | ours (CPU C++) | bitsandbytes | copy of the same "
           "bytes | floor | best ours / bnb |", "|" + "---|" * 9]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for op in ("dequantize", "quantize"):
            def pick(method, variants):
                for v in variants:
                    r = _find(rows, shape=shape, op=op, method=method, variant=v)
                    if r and r.get("median_ms"):
                        return r, v
                return None, None
            gv = ("out_graph", "out") if op == "dequantize" else ("no_check_graph", "no_check", "default")
            cells, best = [], None
            for method in ("ours-cuda", "ours-triton", "ours-cpp"):
                r, v = pick(method, gv)
                cells.append("—" if r is None else f"{_ms(r['median_ms'])} ({v})")
                if r is not None and (best is None or r["median_ms"] < best):
                    best = r["median_ms"]
            br, bv = pick("bnb", ("out_graph", "out") if op == "dequantize" else ("graph", "default"))
            if br is None:
                br, bv = pick("bnb-cpu", ("default",))
            cp = _find(rows, shape=shape, op="copy")
            any_row = _find(rows, shape=shape, op=op) or {}
            if not any_row:
                continue
            out.append(f"| {shape.replace('x', '×')} | {op} | {' | '.join(cells)} "
                       f"| {'—' if br is None else _ms(br['median_ms']) + f' ({bv})'} "
                       f"| {_ms((cp or {}).get('median_ms')) if op == 'dequantize' else '—'} "
                       f"| {_ms(any_row.get('floor_ms'))} | {_ratio(best, (br or {}).get('median_ms'))} |")
    return out


# ------------------------------------------------------------------------------------ output
def _load(out: str, names: Sequence[str]) -> list[dict]:
    docs = []
    for n in names:
        try:
            with open(os.path.join(out, n)) as f:
                doc = json.load(f)
            if isinstance(doc, dict) and "rows" in doc:
                docs.append(doc)
        except Exception:
            pass
    return docs


def _bench(doc: dict) -> str:
    rows = doc.get("rows") or []
    return rows[0].get("bench", "") if rows and isinstance(rows[0], dict) else ""


def plan_lines(stages: Sequence[Stage]) -> list[str]:
    lines = ["| stage | what | shapes | M | r | methods / directions | estimate |", "|---|---|---|---|---|---|---|"]
    for st in stages:
        sp = st.spec
        md = ", ".join(map(str, sp.get("methods") or ())) + (
            f"; {', '.join(sp['directions'])}" if sp.get("directions") else "")
        lines.append(f"| {st.name} | {st.what} | {_shapes_arg(sp.get('shapes') or []) or '—'} "
                     f"| {','.join(map(str, sp.get('ms') or [])) or '—'} "
                     f"| {','.join(map(str, sp.get('ranks') or [])) or '—'} "
                     f"| {md or '—'} | {st.est_s:.0f} s |")
    lines.append(f"| total | | | | | | {sum(s.est_s for s in stages):.0f} s |")
    return lines


def write_suite(out: str, name: str, env: dict, meta: dict, rows: list[dict], stages: Sequence[Stage],
                final: bool) -> tuple[str, str]:
    """``<out>/<name>.json`` (the stage rows, report-readable) and ``.md`` (stages, plan, side-by-side tables)."""
    from . import harness

    notes = ([MISTRAL_NOTE] if meta.get("mode") != "cpu" else []) + [
             f"allowance = min({CAP_FACTOR:g} x the stage's estimate, the time left less {RESERVE:g} x the estimates "
             "of the later stages (all of the report's)); a stage over its allowance is cut (its results up to the "
             "last finished shape are kept)",
             "est_s: benchmarks.suite's cost model (calibrated on earlier H100 result files); wall_s: measured here"]
    cols = ("stage", "what", "est_s", "allowance_s", "wall_s", "status", "rc", "files", "note")
    jpath, mpath = harness.write_results(name, rows, env, out, meta=meta, columns=cols, notes=notes)
    if not final:
        return jpath, mpath
    parts = ["", "## Plan", ""] + plan_lines(stages)
    files = [f for r in rows for f in (r.get("files") or "").split()]
    docs = _load(out, files)
    gemm_floor = ("floor = max(FLOPs / bf16 GEMM rate, bytes / copy bandwidth), both measured in the same run "
                  "(the floor of our row); ratios < 1: ours faster")
    for title, bench, fn, how in (
            ("Forward (no_grad): median time per call", "forward", forward_table,
             "graph = CUDA-graph replay (kernel time), eager = per-call events (host overhead included); "
             "bf16 cuBLAS = F.linear without LoRA, bf16 LoRA = PEFT on a bf16 nn.Linear; " + gemm_floor),
            ("Training: forward, backward (timed alone), forward + backward", "training", training_table,
             "eager; bwd = autograd.grad on a stored forward (retain_graph), measured alone; bf16 cuBLAS = "
             "F.linear (fwd), g @ W (bwd), both (fwd+bwd); " + gemm_floor),
            ("NF4 quantize / dequantize", "nf4", nf4_table,
             "median per call, in brackets the variant (graph = CUDA-graph replay); floor = least bytes moved / "
             "the device copy bandwidth measured in the same run")):
        sel = [d for d in docs if _bench(d) == bench]
        lines = fn(sel) if sel else []
        if lines:
            src = ", ".join(f"`{d['name']}`" for d in sel)
            parts += ["", f"## {title}", "", f"From {src}: {how}.", ""] + lines
    with open(mpath, "a") as f:
        f.write("\n".join(parts) + "\n")
    return jpath, mpath


def _existing_pngs(out: str, stages: Sequence[Stage], key: str, quick: bool) -> int:
    """PNGs the report will also draw for result files already in ``out`` that this run does not rewrite."""
    ours = {result_base(st.spec["bench"], key, quick, st.spec.get("tag") or ("suite" if st.rename else None))
            + ".json" for st in stages if st.spec.get("bench") != "report"}
    n = 0
    for path in glob.glob(os.path.join(out, "*.json")):
        if os.path.basename(path) in ours or os.path.basename(path).startswith("suite_"):
            continue
        try:
            with open(path) as f:
                doc = json.load(f)
            bench = _bench(doc)
            n += 1 if bench == "nf4" else len({r.get("shape") for r in doc["rows"]}) if bench in (
                "forward", "training") else 0
        except Exception:
            continue
    return n


def detect(force_cpu: bool) -> tuple[bool, str, str]:
    """(GPU?, result key, what was found): the key as harness.env_info would name the machine."""
    import torch

    from . import harness

    if force_cpu:
        return False, "cpu", "CPU mode requested (--cpu)"
    if not torch.cuda.is_available():
        return False, "cpu", "no CUDA GPU found (torch.cuda.is_available() is False)"
    name = torch.cuda.get_device_name(0)
    return True, harness.slug(name), name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the small representative subset (budget 110 s)")
    p.add_argument("--out", default=None,
                   help="result folder (default benchmarks/results on a GPU; a temporary folder without one)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for all stages (default {FULL_BUDGET_S:.0f} full, {QUICK_BUDGET_S:.0f} quick)")
    p.add_argument("--plan", action="store_true", help="print the plan and its estimate; run nothing")
    p.add_argument("--only", default=None, help="comma list of stage names to run (the report always runs last)")
    p.add_argument("--cpu", action="store_true", help="the CPU path even when a GPU is present")
    p.add_argument("--cpu-shapes", default="1024x4096", help="CPU path: weights N x K for the quantizer bench")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.monotonic()
    if args.plan and not args.cpu:  # the GPU plan, wherever it is printed
        stages = gpu_plan(args.quick)
        budget = args.budget_s or (QUICK_BUDGET_S if args.quick else FULL_BUDGET_S)
        print("\n".join(plan_lines(stages)))
        print(f"\nestimated {sum(s.est_s for s in stages):.0f} s against a budget of {budget:.0f} s "
              f"(less {MARGIN_S:.0f} s kept back; a stage may take up to {CAP_FACTOR:g}x its estimate while the "
              f"later ones keep {RESERVE:g}x theirs)")
        for name, measured, model in calibration():
            print(f"calibration: {name}: measured {measured:.0f} s, model {model:.0f} s")
        return 0
    gpu, key, found = detect(args.cpu)
    if gpu:
        stages = gpu_plan(args.quick)
        attach_renames(stages, key, args.quick)
        budget = args.budget_s or (QUICK_BUDGET_S if args.quick else FULL_BUDGET_S)
        out = args.out or os.path.join(REPO, "benchmarks", "results")
        print(f"suite: GPU {found}: {'quick' if args.quick else 'full'} plan, budget {budget:.0f} s", flush=True)
    else:
        from .bench_nf4 import parse_shapes

        stages = cpu_plan(parse_shapes(args.cpu_shapes))
        budget = args.budget_s or CPU_BUDGET_S
        out = args.out or os.path.join(tempfile.gettempdir(), "lora_kernels_suite_cpu")
        print(f"suite: {found}: only the CPU quantizer bench ({args.cpu_shapes}, quick) runs here; "
              f"the forward, training and GPU nf4 stages need a CUDA GPU", flush=True)
    if args.only:
        want = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = want - {s.name for s in stages}
        if unknown:
            print(f"suite: unknown stage(s) {sorted(unknown)}; stages: {[s.name for s in stages]}", file=sys.stderr)
            return 2
        stages = [s for s in stages if s.name in want or s.name == "report"]
    for st in stages:
        if st.name == "report":
            st.argv = st.argv + ["--results", out]
            extra = _existing_pngs(out, stages, key, args.quick)
            if extra:  # the report plots every result file in the folder, not only this run's
                st.spec["pngs"] += extra
                st.est_s = estimate_stage(st.spec)
        elif "--out" not in st.argv:
            st.argv = st.argv + ["--out", staging_dir(out, st) if st.rename else out]
    est_total = sum(s.est_s for s in stages)
    if args.plan:
        print("\n".join(plan_lines(stages)))
        print(f"\nestimated {est_total:.0f} s against a budget of {budget:.0f} s")
        return 0

    os.makedirs(out, exist_ok=True)
    name = f"suite_{key}" + ("_quick" if args.quick and gpu else "")
    log_path = os.path.join(out, name + ".log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("LORA_KERNELS_QUIET", "1")
    meta = {"mode": ("quick" if args.quick else "full") if gpu else "cpu", "budget_s": budget,
            "estimate_s": round(est_total, 1), "device": found, "out": out}

    def env_of_results(rows) -> dict:
        for r in rows:
            for f in (r.get("files") or "").split():
                docs = _load(out, [f])
                if docs and docs[0].get("env"):
                    return docs[0]["env"]
        from . import harness
        return dict(harness.env_info(), **({"device": "cpu", "key": "cpu"} if not gpu else {}))

    def before(st: Stage, rows: list) -> None:
        if st.name == "report" and rows:  # the report's SUMMARY.md then shows the stage table too
            write_suite(out, name, env_of_results(rows), dict(meta, wall_s=round(time.monotonic() - t_start, 1)),
                        rows, stages, final=False)

    def terminated(signum, frame):  # `timeout` / the device ending the command: stop the stage, then exit
        raise KeyboardInterrupt(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, terminated)
    try:
        with open(log_path, "a") as log:
            log.write(f"=== suite {name}: {len(stages)} stages, budget {budget:.0f} s, estimate {est_total:.0f} s "
                      f"({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})\n")
            rows = run_stages(stages, budget - (time.monotonic() - t_start), out, log, env=env, before=before)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    wall = time.monotonic() - t_start
    meta.update(wall_s=round(wall, 1), within_budget=wall <= budget,
                stages_cut=",".join(r["stage"] for r in rows if r["status"] == "cut"),
                stages_failed=",".join(r["stage"] for r in rows if r["status"] == "failed"),
                stages_skipped=",".join(r["stage"] for r in rows if r["status"] == "skipped"),
                stages_not_run=",".join(st.name for st in stages[len(rows):]))
    jpath, mpath = write_suite(out, name, env_of_results(rows), meta, rows, stages, final=True)
    print(f"\nsuite: {name}: {wall:.1f} s wall against a budget of {budget:.0f} s (estimate {est_total:.0f} s)")
    for r in rows:
        print(f"  {r['stage']:<15} {r['status']:<8} {r['wall_s'] or 0:7.1f} s of {r['allowance_s']:6.1f} s "
              f"(est {r['est_s']:5.0f} s)  {r['files']}{'  ' + r['note'] if r['note'] else ''}")
    print(f"suite: wrote {jpath}, {mpath} and {log_path}")
    if any(r["status"] in ("failed", "interrupted") for r in rows):
        return 1
    if any(r["status"] in ("cut", "skipped") for r in rows):
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
