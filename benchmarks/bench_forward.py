"""Fused QLoRA forward benchmark: ``lk.lora_linear`` against bitsandbytes + PEFT and the bf16 cuBLAS floor.

y = x·Ŵᵀ + ((x·Aᵀ)⊙s)·Bᵀ (no bias), x [M, K] bf16, Ŵ NF4 (N, K) with double quantization, r = 16,
s = alpha / r = 2.0.  Layer shapes are written K x N (in -> out, as ``nn.Linear(K, N)``).

GPU mode, per layer shape, rank and M (rows keyed shape, M, r, method, variant):
  ours_layer      ``QLoRALinear(q, None, r, 2r, lora_A=A, lora_B=B)(x)`` under no_grad: the drop-in
                  layer's call, timed like PEFT's layer (same variants as ``ours``)
  ours            ``lk.lora_linear(x, q, A, B, 2.0)`` under no_grad, "eager" and, for M <= 16,
                  "graph" (CUDA-graph replay: the kernels' time without Python / launch overhead);
                  ``route`` = ``lk.forward_route(M, q, x.dtype, x.device)``
  bnb_peft        bitsandbytes ``Linear4bit`` (nf4, compress_statistics, bf16 compute) quantized by
                  ``.cuda()``, wrapped by ``peft.get_peft_model`` (LoraConfig r, alpha 2r, dropout 0)
                  as a transformers-loaded 4-bit model is (``is_loaded_in_4bit``: PEFT's
                  ``lora.bnb.Linear4bit``); the wrapped layer's forward is timed, eager and graph
  bf16_linear     ``F.linear(x, W_bf16)``, no LoRA: the cuBLAS floor; eager and graph for M <= 16
  bf16_lora_peft  PEFT LoRA on a plain bf16 ``nn.Linear`` (same LoraConfig), eager
  ours-sweep      (``--sweep``) every ``candidate_configs(...)`` config through ``config=``; graph
                  for M <= 16, eager otherwise; variant = compact config string
  floor_ms        max(FLOPs / measured bf16 matmul rate, bytes / measured copy bandwidth), FLOPs =
                  2·M·K·N (+ 2·M·r·(K+N) with LoRA), bytes = weight (``q.nbytes()``, 4.127 bits/param,
                  or 2·N·K for bf16) + x + y (+ the bf16 adapters 2·r·(K+N) with LoRA);
                  ``frac_floor`` = floor / median
  check           once per (shape, M, r), before timing: ``rel_err`` = ‖y - ref‖_F / ‖ref‖_F against
                  the float32 reference on the same dequantized weight, beside ``rel_err_bf16_torch``
                  (PyTorch computing the same formula in bf16) and their ratio (the design's
                  tolerance: <= 2); recorded, never fails the run
Input sets rotate (``harness.sets_for_l2``) so the L2 never holds a call's inputs; a weight
larger than 2x the L2 is not replicated (one weight, only x rotates; a note says so).
CPU mode (no GPU): ``ours`` through the "reference" route on one tiny shape, to exercise the code.

Run time on one H100 (an estimate from the per-row budget, not a measured total): each timed row
costs ~0.1-0.3 s (warm-up 10 ms + 50 ms of repetitions + peak-memory call + first-call compile),
about 7 rows per (shape, M), plus ~5-20 s per shape for quantizing the rotated weights and building
the two PEFT stacks.  Default M list 1, 16, 256, 1024, 4096, 16384 (6 values, was 4) and 8 shapes
(was 5): ``--quick`` (2 shapes) ~1-2 min, the full run ~5-10 min, ``--sweep`` adds minutes per
shape; the full run has grown ~2.5x with the Qwen2 shapes and the two extra M, so give it a
10-minute budget or split it with ``--shapes``.

    python -m benchmarks.bench_forward [--quick] [--sweep] [--out DIR] [--shapes 4096x4096,...]
                                       [--ms 1,16,4096] [--ranks 16] [--methods ours,bnb_peft,...] [--tag NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import time
import traceback

import torch
import torch.nn.functional as F

from . import harness

#: Layer shapes (K_in, N_out): Llama-3-8B q/o, k/v, gate/up, down (Mistral-7B has the same four:
#: 4096->4096 q/o, 4096->1024 k/v, 4096->14336 gate/up, 14336->4096 down); Llama-3-70B gate/up;
#: Qwen2-7B q/o, gate/up, down.
GPU_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (8192, 28672),
              (3584, 3584), (3584, 18944), (18944, 3584)]
QUICK_SHAPES = [GPU_SHAPES[0], GPU_SHAPES[2]]
GPU_MS = [1, 16, 256, 1024, 4096, 16384]
CPU_SHAPES = [(128, 72)]
CPU_MS = [1, 33]
RANKS = [16]
SCALE = 2.0                      # alpha / r with alpha = 2 r (r = 16, alpha = 32)
GRAPH_MAX_M = 16
DTYPE = torch.bfloat16
METHODS = ("ours", "ours_layer", "bnb_peft", "bf16_linear", "bf16_lora_peft")
LORA_METHODS = ("ours", "ours_layer", "ours-sweep", "bnb_peft", "bf16_lora_peft")
NF4_METHODS = ("ours", "ours_layer", "ours-sweep", "bnb_peft")

#: Every row has exactly these keys (None where not applicable), in this order.
ROW_KEYS = (
    "bench", "device", "shape", "K", "N", "M", "r", "method", "variant", "route",
    "median_ms", "p20_ms", "p80_ms", "n_reps", "n_sets", "n_weights", "graph",
    "flops", "bytes", "floor_ms", "frac_floor", "tflops", "gbps",
    "ratio_vs_bf16_linear", "ratio_vs_bnb_peft", "peak_mem_mb",
    "rel_err", "rel_err_bf16_torch", "err_ratio", "config", "note",
)
MD_COLUMNS = ("shape", "M", "r", "method", "variant", "route", "median_ms", "p20_ms", "p80_ms", "floor_ms",
              "frac_floor", "tflops", "gbps", "ratio_vs_bf16_linear", "ratio_vs_bnb_peft", "peak_mem_mb",
              "rel_err", "rel_err_bf16_torch", "n_sets", "n_weights", "note")
SHORT_COLUMNS = ("shape", "M", "method", "variant", "route", "median_ms", "frac_floor", "ratio_vs_bf16_linear",
                 "ratio_vs_bnb_peft", "err_ratio")
SHORT_HEADERS = ("KxN", "M", "method", "var", "route", "ms", "/floor", "/bf16", "/bnb", "err/bf16")


# ------------------------------------------------------------------------------------ arithmetic
def forward_flops(M: int, K: int, N: int, r: int | None) -> int:
    """2·M·K·N, plus 2·M·r·(K+N) for the low-rank term when r is given."""
    return 2 * M * K * N + (2 * M * r * (K + N) if r else 0)


def forward_bytes(M: int, K: int, N: int, r: int | None, weight_bytes: int, itemsize: int = 2) -> int:
    """Least bytes a forward moves: the weight as stored (``q.nbytes()`` or 2·N·K), x read, y
    written, plus the bf16 adapters A [r, K] and B [N, r] when r is given."""
    return weight_bytes + itemsize * (M * K + M * N) + (itemsize * r * (K + N) if r else 0)


def floor_ms(flops: float, nbytes: float, matmul_rate: float | None, copy_bw: float | None) -> float | None:
    """max(flops / matmul_rate, bytes / copy_bw) in milliseconds (rates in FLOP/s and bytes/s)."""
    parts = []
    if matmul_rate:
        parts.append(flops / matmul_rate)
    if copy_bw:
        parts.append(nbytes / copy_bw)
    return max(parts) * 1e3 if parts else None


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ‖y - ref‖_F / ‖ref‖_F, in float32."""
    ref = ref.float()
    den = float(torch.linalg.vector_norm(ref))
    num = float(torch.linalg.vector_norm(y.float() - ref))
    return num / den if den > 0 else num


def config_str(cfg: dict) -> str:
    """A compact config name: {'BLOCK_N': 64, 'BLOCK_K': 256, 'num_warps': 4, ...} -> 'n64-k256-w4-...'."""
    abbr = (("BLOCK_M", "m"), ("BLOCK_N", "n"), ("BLOCK_K", "k"), ("GROUP_M", "g"), ("SPLIT_K", "sk"),
            ("num_warps", "w"), ("num_stages", "s"), ("SWAP_AB", "swap"), ("USE_DOT", "dot"), ("LUT", ""),
            ("R_BLOCK", "r"), ("fp_fusion", "ff"))
    val = lambda v: "*" if v is None else (str(int(v)) if isinstance(v, bool) else str(v))  # noqa: E731
    parts = [f"{a}{val(cfg[k])}" for k, a in abbr if k in cfg]
    parts += [f"{k}={val(v)}" for k, v in cfg.items() if k not in dict(abbr)]
    return "-".join(parts)


# ------------------------------------------------------------------------------------ rows
def new_row(**kw) -> dict:
    return harness.make_row(ROW_KEYS, **kw)


_short_error = harness.short_error


def _add_note(row: dict, text: str) -> None:
    row["note"] = f"{row['note']}; {text}" if row.get("note") else text


def fill_derived(rows: list[dict], matmul_rate: float | None, copy_bw: float | None) -> None:
    """floor_ms, frac_floor, tflops, gbps, and the ratios to bf16_linear / bnb_peft rows of the
    same (shape, M) [and r for bnb_peft] with the same timing mode (eager vs eager, graph vs graph)."""
    for r in rows:
        if r["flops"] is not None and r["bytes"] is not None:
            r["floor_ms"] = floor_ms(r["flops"], r["bytes"], matmul_rate, copy_bw)
        if r["median_ms"]:
            if r["floor_ms"]:
                r["frac_floor"] = r["floor_ms"] / r["median_ms"]
            if r["flops"]:
                r["tflops"] = r["flops"] / (r["median_ms"] * 1e-3) / 1e12
            if r["bytes"]:
                r["gbps"] = r["bytes"] / (r["median_ms"] * 1e-3) / 1e9
    bf16 = {(r["shape"], r["M"], bool(r["graph"])): r for r in rows
            if r["method"] == "bf16_linear" and r["median_ms"]}
    bnb = {(r["shape"], r["M"], r["r"], bool(r["graph"])): r for r in rows
           if r["method"] == "bnb_peft" and r["median_ms"]}
    for r in rows:
        if not r["median_ms"]:
            continue
        ref = bf16.get((r["shape"], r["M"], bool(r["graph"])))
        if ref is not None and r["method"] != "bf16_linear":
            r["ratio_vs_bf16_linear"] = r["median_ms"] / ref["median_ms"]
        ref = bnb.get((r["shape"], r["M"], r["r"], bool(r["graph"])))
        if ref is not None and r["method"] != "bnb_peft":
            r["ratio_vs_bnb_peft"] = r["median_ms"] / ref["median_ms"]


# ------------------------------------------------------------------------------------ helpers
def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x14336,8192x28672' -> [(4096, 14336), (8192, 28672)]  (K_in x N_out)."""
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            try:
                a, b = part.split("x")
                shapes.append((int(a), int(b)))
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad shape {part!r}; expected KxN, e.g. 4096x14336") from None
    if not shapes:
        raise argparse.ArgumentTypeError(f"no shapes in {text!r}; expected e.g. 4096x4096,4096x14336")
    return shapes


def parse_ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def parse_methods(text: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in METHODS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; expected a subset of {list(METHODS)}")
    return vals


def parse_tag(text: str) -> str:
    if not text or not all(c.isalnum() or c in "-_" for c in text):
        raise argparse.ArgumentTypeError(f"a tag is letters, digits, '-' and '_', got {text!r}")
    return text


def _elapsed(t0: float) -> str:
    return f"[{time.perf_counter() - t0:6.1f}s]"


def _fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _randn(shape, gen, device, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(DTYPE)


# ------------------------------------------------------------------------------------ PEFT models
class _Proj(torch.nn.Module):
    """The smallest model PEFT wraps: one linear layer named ``proj``."""

    def __init__(self, proj: torch.nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


class _Stack(torch.nn.Module):
    """n independent ``_Proj`` layers (one per rotated input set), wrapped by one get_peft_model."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        return self.layers[0](x)


@contextlib.contextmanager
def _no_linear_init():
    """Skip nn.Linear's random init (as transformers does when loading): the weight is replaced
    right after; a 8192x28672 fp32 init costs seconds of CPU time."""
    orig = torch.nn.Linear.reset_parameters
    torch.nn.Linear.reset_parameters = lambda self: None
    try:
        yield
    finally:
        torch.nn.Linear.reset_parameters = orig


def _bnb_linear4bit(bnb, W: torch.Tensor) -> torch.nn.Module:
    """bitsandbytes Linear4bit holding W (N, K) bf16, quantized by ``.cuda()`` as users do."""
    N, K = W.shape
    with _no_linear_init():
        lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=DTYPE, quant_type="nf4", compress_statistics=True)
    lin.weight.data = W.detach()
    return lin.to(W.device)  # Params4bit.to(cuda): quantize_4bit(nf4, blocksize 64, double quant)


def _bf16_linear(W: torch.Tensor) -> torch.nn.Module:
    N, K = W.shape
    lin = torch.nn.Linear(K, N, bias=False, dtype=DTYPE, device="meta")
    lin.weight = torch.nn.Parameter(W.detach(), requires_grad=False)  # shares W's storage
    return lin


def peft_stack(kind: str, Ws, As, Bs, r: int):
    """(peft_model, [wrapped layers]) for kind "bnb" (4-bit) or "bf16"; adapters set to As[i], Bs[i]."""
    from peft import LoraConfig, get_peft_model

    if kind == "bnb":
        import bitsandbytes as bnb

        base = [_Proj(_bnb_linear4bit(bnb, W)) for W in Ws]
    else:
        base = [_Proj(_bf16_linear(W)) for W in Ws]
    model = _Stack(base)
    if kind == "bnb":
        model.is_loaded_in_4bit = True  # what transformers sets: PEFT then uses lora.bnb.Linear4bit
    cfg = LoraConfig(r=r, lora_alpha=int(round(SCALE * r)), lora_dropout=0.0, target_modules=["proj"])
    pm = get_peft_model(model, cfg)
    pm.eval()
    layers = [layer.proj for layer in pm.base_model.model.layers]
    with torch.no_grad():
        for layer, A, B in zip(layers, As, Bs):
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
    return pm, layers


def bnb_peft_available(device) -> str:
    """"" when bitsandbytes' CUDA path and peft both work here, else why not."""
    try:
        import bitsandbytes as bnb  # noqa: F401
    except Exception as e:
        return f"bitsandbytes not importable ({_short_error(e)})"
    try:
        import peft  # noqa: F401
    except Exception as e:
        return f"peft not importable ({_short_error(e)})"
    try:
        W = torch.randn(64, 128, device=device).to(DTYPE)
        lin = _bnb_linear4bit(bnb, W)
        with torch.no_grad():
            lin(torch.randn(2, 128, device=device, dtype=DTYPE))
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:
        return f"bitsandbytes has no working {device.type} Linear4bit ({_short_error(e)})"
    return ""


def peft_adapter_dtype(layers) -> str | None:
    try:
        return str(layers[0].lora_A["default"].weight.dtype).replace("torch.", "")
    except Exception:
        return None


# ------------------------------------------------------------------------------------ GPU mode
def _time_row(base: dict, fn, sets, args, use_graph=False, peak=True, **extra) -> dict:
    """Time ``fn`` over ``sets`` into a row; an exception becomes the row's note (the run goes on)."""
    row = new_row(**{**base, **extra})
    try:
        t = harness.time_cuda(fn, sets, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, use_graph=use_graph)
        for k in ("median_ms", "p20_ms", "p80_ms", "n_reps", "n_sets", "graph"):
            row[k] = t[k]
        if peak and not use_graph:
            row["peak_mem_mb"] = harness.peak_memory(fn, *sets[0]) / 2**20
    except Exception as e:
        row["graph"] = use_graph
        _add_note(row, ("graph capture failed: " if use_graph else "") + _short_error(e))
        print(f"    ! {row['shape']} M={row['M']} {row['method']} {row['variant']}: {row['note']}", flush=True)
        if os.environ.get("BENCH_TRACEBACK") == "1":
            traceback.print_exc()
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
    return row


def _progress(t0: float, row: dict) -> None:
    extra = f" route={row['route']}" if row.get("route") else ""
    print(f"  {_elapsed(t0)} {row['shape']} M={row['M']} r={row['r']} {row['method']} {row['variant']}{extra}: "
          f"{_fmt_ms(row['median_ms'])} ms", flush=True)


def _n_sets(per_set_bytes: int, weight_bytes: int) -> tuple[int, bool]:
    """(input sets to rotate, whether the weight is replicated): one weight when it alone exceeds
    2x the L2 (then only x rotates)."""
    big = weight_bytes > harness.L2_MARGIN * harness.l2_bytes()
    return harness.sets_for_l2(per_set_bytes), not big


def correctness(lk, reference, x, q, A, B) -> dict:
    """rel_err of ours and of bf16 PyTorch against the fp32 reference on the same dequantized weight."""
    out: dict = {}
    try:
        with torch.no_grad():
            ref = reference.lora_linear_reference(x.float(), q.dequantize(torch.float32), A.float(), B.float(), SCALE)
            y = lk.lora_linear(x, q, A, B, SCALE)
            out["rel_err"] = rel_err(y, ref)
            del y
            Wd = q.dequantize(DTYPE)
            y_bf16 = F.linear(x, Wd) + ((x @ A.t()) * SCALE) @ B.t()
            del Wd
            out["rel_err_bf16_torch"] = rel_err(y_bf16, ref)
            del y_bf16
        if out["rel_err_bf16_torch"] > 0:
            out["err_ratio"] = out["rel_err"] / out["rel_err_bf16_torch"]
        out["_ref"] = ref
    except Exception as e:
        out["note"] = f"check failed: {_short_error(e)}"
    return out


def run_gpu(args, lk, env, t0: float, device: str = "cuda") -> tuple[list[dict], dict, list[str]]:
    """The GPU benchmark.  ``device="cpu"`` is a dry run of the same code for the CPU test (with
    harness.time_cuda / peak_memory / measure_* replaced by fakes there)."""
    from lora_kernels import reference

    dev = torch.device(device)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else GPU_SHAPES)
    ms = sorted(args.ms or GPU_MS)
    ranks = args.ranks or RANKS
    methods = args.methods or list(METHODS)
    cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (9, 0)
    notes: list[str] = []
    l2 = harness.l2_bytes()

    if any(m in methods for m in ("bnb_peft", "bf16_lora_peft")):
        print(f"{_elapsed(t0)} importing bitsandbytes / peft ...", flush=True)
    why_bnb = bnb_peft_available(dev) if "bnb_peft" in methods else ""
    if why_bnb:
        notes.append(f"bnb_peft skipped: {why_bnb}")
        methods = [m for m in methods if m != "bnb_peft"]
    if "bf16_lora_peft" in methods:
        try:
            import peft  # noqa: F401
        except Exception as e:
            notes.append(f"bf16_lora_peft skipped: peft not importable ({_short_error(e)})")
            methods = [m for m in methods if m != "bf16_lora_peft"]

    print(f"{_elapsed(t0)} measuring floors (copy bandwidth, bf16 matmul) ...", flush=True)
    bw = harness.measure_copy_bandwidth(rep_ms=100.0)
    mm = harness.measure_bf16_matmul_rate(rep_ms=100.0)
    print(f"  copy {bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s, L2 {l2 / 2**20:.0f} MiB", flush=True)
    meta = {"mode": ("quick" if args.quick else "full") + ("+sweep" if args.sweep else ""), "dtype": "bfloat16",
            "scale": SCALE, "ranks": ",".join(map(str, ranks)), "ms": ",".join(map(str, ms)),
            "copy_bw_gbps": bw / 1e9, "bf16_matmul_tflops": mm / 1e12, "l2_bytes": l2,
            "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms}
    from lora_kernels.library import gemv_variant_override
    if (forced := gemv_variant_override()) is not None:   # an opt-in decode kernel forced for this run
        meta["gemv_variant_forced"] = forced
    notes += [
        "shape = K x N (in -> out); no bias; x, A, B, y bf16; Ŵ NF4 blocksize 64 with double quantization",
        "eager = each call timed with its own CUDA events (Python + launch overhead included); graph = CUDA-graph "
        "replay of one call per input set, divided by the sets (kernel time)",
        "floor = max(FLOPs / bf16 matmul rate, bytes / copy bandwidth), both measured in this run; FLOPs = 2MKN "
        "(+2Mr(K+N) with LoRA); bytes = weight as stored (q.nbytes(), or 2NK bf16) + x + y (+ bf16 A, B with LoRA)",
        "ratio_vs_bf16_linear / ratio_vs_bnb_peft = median / that method's median at the same M, same timing mode "
        "(< 1: faster)",
        "rel_err = ||y - ref||_F / ||ref||_F, ref = fp32 reference on the same dequantized weight; "
        "rel_err_bf16_torch = the same for F.linear(x, Ŵ_bf16) + ((x Aᵀ)·s) Bᵀ in bf16; err_ratio = ours / that "
        "(tolerance rule <= 2); bnb_peft's rel_err uses the same reference (its weight was quantized by "
        "bitsandbytes from the same bf16 W)",
        "bnb_peft / bf16_lora_peft time PEFT's wrapped layer forward (lora.bnb.Linear4bit / lora.Linear): "
        "bitsandbytes' matmul_4bit + clone + the LoRA path in the adapters' dtype (PEFT default "
        "autocast_adapter_dtype=True keeps them in fp32: x is cast to fp32, the LoRA output back to bf16)",
    ]
    rows: list[dict] = []
    best_lines: list[str] = []
    pdtype_noted = set()

    with torch.no_grad():
        for (K, N) in shapes:
            shape = f"{K}x{N}"
            print(f"{_elapsed(t0)} shape {shape} (K={K} -> N={N}) ...", flush=True)
            gen = torch.Generator(device=dev)
            m0 = ms[0]
            try:
                # --- weights: enough copies that the rotated sets exceed 2x L2 at the smallest M
                W0 = _randn((N, K), gen.manual_seed(1), dev, 0.02)
                q0 = lk.quantize_nf4(W0)
                qbytes = q0.nbytes()
                wbytes16 = 2 * N * K
                ad_bytes = 2 * max(ranks) * (K + N)
                n_q, rep_q = _n_sets(qbytes + ad_bytes + 2 * m0 * (K + N), qbytes)
                n_b, rep_b = _n_sets(wbytes16 + 2 * m0 * (K + N), wbytes16)
                nw_q = n_q if rep_q else 1
                nw_b = n_b if rep_b else 1
                if not rep_q and any(m in methods for m in NF4_METHODS):
                    notes.append(f"{shape}: the NF4 weight ({qbytes / 1e6:.0f} MB) alone exceeds 2x L2 "
                                 f"({2 * l2 / 1e6:.0f} MB): one weight, only x rotates (ours, bnb_peft)")
                if not rep_b and any(m in methods for m in ("bf16_linear", "bf16_lora_peft")):
                    notes.append(f"{shape}: the bf16 weight ({wbytes16 / 1e6:.0f} MB) alone exceeds 2x L2: "
                                 f"one weight, only x rotates (bf16_linear, bf16_lora_peft)")
                Ws = [W0] + [_randn((N, K), gen.manual_seed(1 + i), dev, 0.02) for i in range(1, max(nw_q, nw_b))]
                qs = [q0] + [lk.quantize_nf4(W) for W in Ws[1:nw_q]]
                print(f"  {_elapsed(t0)} {len(Ws)} bf16 weights, {len(qs)} NF4 weights "
                      f"({qbytes / 1e6:.1f} MB each, {8 * qbytes / (N * K):.3f} bits/param)", flush=True)
            except Exception as e:
                rows.append(new_row(bench="forward", device=dev.type, shape=shape, K=K, N=N, method="-", variant="-",
                                    note=f"setup failed: {_short_error(e)}"))
                print(f"  ! {shape}: setup failed: {_short_error(e)}", flush=True)
                _free()
                continue

            for ri, r in enumerate(ranks):
                gen.manual_seed(10_000 + r)
                As = [_randn((r, K), gen, dev, 1.0 / math.sqrt(K)) for _ in range(max(nw_q, nw_b))]
                Bs = [_randn((N, r), gen, dev, 0.02) for _ in range(max(nw_q, nw_b))]
                bnb_layers = lora_layers = None
                pm_bnb = pm_lora = None
                if "bnb_peft" in methods:
                    try:
                        pm_bnb, bnb_layers = peft_stack("bnb", Ws[:nw_q], As, Bs, r)
                        print(f"  {_elapsed(t0)} bnb+peft: {len(bnb_layers)} layers "
                              f"({type(bnb_layers[0]).__module__}.{type(bnb_layers[0]).__name__}, adapters "
                              f"{peft_adapter_dtype(bnb_layers)})", flush=True)
                        if "bnb" not in pdtype_noted:
                            pdtype_noted.add("bnb")
                            notes.append(f"bnb_peft layer: {type(bnb_layers[0]).__module__}."
                                         f"{type(bnb_layers[0]).__name__}, adapters {peft_adapter_dtype(bnb_layers)}")
                    except Exception as e:
                        rows.append(new_row(bench="forward", device=dev.type, shape=shape, K=K, N=N, r=r,
                                            method="bnb_peft", variant="-", note=f"setup failed: {_short_error(e)}"))
                        print(f"  ! bnb_peft setup failed: {_short_error(e)}", flush=True)
                if "bf16_lora_peft" in methods:
                    try:
                        pm_lora, lora_layers = peft_stack("bf16", Ws[:nw_b], As, Bs, r)
                        if "bf16" not in pdtype_noted:
                            pdtype_noted.add("bf16")
                            notes.append(f"bf16_lora_peft layer: {type(lora_layers[0]).__module__}."
                                         f"{type(lora_layers[0]).__name__}, adapters {peft_adapter_dtype(lora_layers)}")
                    except Exception as e:
                        rows.append(new_row(bench="forward", device=dev.type, shape=shape, K=K, N=N, r=r,
                                            method="bf16_lora_peft", variant="-",
                                            note=f"setup failed: {_short_error(e)}"))
                        print(f"  ! bf16_lora_peft setup failed: {_short_error(e)}", flush=True)

                for M in ms:
                    try:
                        rows += _run_shape_m(args, lk, reference, t0, shape, K, N, M, r, ri == 0, methods, cap,
                                             Ws, qs, As, Bs, nw_q, nw_b, bnb_layers, lora_layers, gen, best_lines)
                    except Exception as e:  # e.g. OOM allocating x
                        rows.append(new_row(bench="forward", device=dev.type, shape=shape, K=K, N=N, M=M, r=r,
                                            method="-", variant="-", note=f"failed: {_short_error(e)}"))
                        print(f"  ! {shape} M={M}: {_short_error(e)}", flush=True)
                        if os.environ.get("BENCH_TRACEBACK") == "1":
                            traceback.print_exc()
                    _free()
                del pm_bnb, pm_lora, bnb_layers, lora_layers, As, Bs
                _free()
            del Ws, qs, W0, q0
            _free()
            fill_derived(rows, mm, bw)
            _write(args, env, rows, meta, notes)  # after every shape: a timeout still leaves results
    return rows, meta, notes + best_lines


def _run_shape_m(args, lk, reference, t0, shape, K, N, M, r, first_rank, methods, cap,
                 Ws, qs, As, Bs, nw_q, nw_b, bnb_layers, lora_layers, gen, best_lines) -> list[dict]:
    rows: list[dict] = []
    dev = Ws[0].device
    xy = 2 * M * (K + N)
    qbytes = qs[0].nbytes()
    ad = 2 * r * (K + N)
    n_q = min(harness.sets_for_l2(qbytes + ad + xy), len(qs)) if nw_q > 1 else harness.sets_for_l2(xy + ad)
    n_b = min(harness.sets_for_l2(2 * N * K + xy), nw_b) if nw_b > 1 else harness.sets_for_l2(xy)
    n_q, n_b = max(2, n_q), max(2, n_b)
    n_x = max(n_q, n_b)
    gen.manual_seed(20_000 + M)
    xs = [_randn((M, K), gen, dev) for _ in range(n_x)]
    base = dict(bench="forward", device=dev.type, shape=shape, K=K, N=N, M=M)
    use_graph = M <= GRAPH_MAX_M
    route = lk.forward_route(M, qs[0], DTYPE, dev)
    if route == "cuda-gemv":           # which decode kernel runs (asked for, or variant 1 where it falls back)
        route += f" v{lk.library.gemv_variant_ran(M, N, K, r > 0)}"
    lora_base = dict(base, r=r, flops=forward_flops(M, K, N, r), bytes=forward_bytes(M, K, N, r, qbytes))
    q_sets = [(xs[i], qs[i % nw_q], As[i % nw_q], Bs[i % nw_q]) for i in range(n_q)]
    nwq_used = min(n_q, nw_q)

    # ---- correctness, once per (shape, M, r), before timing
    chk = correctness(lk, reference, xs[0], qs[0], As[0], Bs[0])
    ref = chk.pop("_ref", None)
    if "note" not in chk:
        print(f"  {_elapsed(t0)} {shape} M={M} r={r} check: rel_err ours {chk['rel_err']:.3e}, "
              f"bf16 torch {chk['rel_err_bf16_torch']:.3e} (ratio {chk.get('err_ratio', float('nan')):.2f})",
              flush=True)
    else:
        print(f"  ! {shape} M={M}: {chk['note']}", flush=True)

    def ours(x, q, A, B):
        return lk.lora_linear(x, q, A, B, SCALE)

    if "ours" in methods:
        for variant, g in (("eager", False),) + ((("graph", True),) if use_graph else ()):
            row = _time_row(lora_base, ours, q_sets, args, use_graph=g, method="ours", variant=variant, route=route,
                            n_weights=nwq_used, **chk)
            rows.append(row)
            _progress(t0, row)

    if "ours_layer" in methods:
        # The drop-in layer (QLoRALinear.forward under no_grad, adapters in bf16): what a model
        # calls, to compare with PEFT's wrapped layer (bnb_peft) call for call.
        from lora_kernels import QLoRALinear

        layers = {}
        for i in range(nwq_used):
            q, A, B = q_sets[i][1:]
            layers[id(q)] = QLoRALinear(q, None, r, SCALE * r, lora_A=torch.nn.Parameter(A), lora_B=torch.nn.Parameter(B))
        ql_sets = [(layers[id(q)], x) for (x, q, A, B) in q_sets]
        for variant, g in (("eager", False),) + ((("graph", True),) if use_graph else ()):
            row = _time_row(lora_base, lambda layer, x: layer(x), ql_sets, args, use_graph=g, method="ours_layer",
                            variant=variant, route=route, n_weights=nwq_used, **chk)
            rows.append(row)
            _progress(t0, row)
        del layers, ql_sets

    if bnb_layers is not None:
        bchk: dict = {}
        if ref is not None:
            try:
                bchk["rel_err"] = rel_err(bnb_layers[0](xs[0]), ref)
                if chk.get("rel_err_bf16_torch"):
                    bchk["rel_err_bf16_torch"] = chk["rel_err_bf16_torch"]
                    bchk["err_ratio"] = bchk["rel_err"] / chk["rel_err_bf16_torch"]
            except Exception as e:
                bchk["note"] = f"check failed: {_short_error(e)}"
        b_sets = [(bnb_layers[i % nw_q], xs[i]) for i in range(n_q)]
        for variant, g in (("eager", False),) + ((("graph", True),) if use_graph else ()):
            row = _time_row(lora_base, lambda layer, x: layer(x), b_sets, args, use_graph=g, method="bnb_peft",
                            variant=variant, n_weights=nwq_used, **bchk)
            rows.append(row)
            _progress(t0, row)
    del ref

    if "bf16_linear" in methods and first_rank:
        bf_base = dict(base, flops=forward_flops(M, K, N, None), bytes=forward_bytes(M, K, N, None, 2 * N * K))
        l_sets = [(xs[i], Ws[i % nw_b]) for i in range(n_b)]
        for variant, g in (("eager", False),) + ((("graph", True),) if use_graph else ()):
            row = _time_row(bf_base, F.linear, l_sets, args, use_graph=g, method="bf16_linear", variant=variant,
                            n_weights=min(n_b, nw_b))
            rows.append(row)
            _progress(t0, row)

    if lora_layers is not None:
        p_base = dict(base, r=r, flops=forward_flops(M, K, N, r), bytes=forward_bytes(M, K, N, r, 2 * N * K))
        p_sets = [(lora_layers[i % nw_b], xs[i]) for i in range(n_b)]
        row = _time_row(p_base, lambda layer, x: layer(x), p_sets, args, method="bf16_lora_peft", variant="eager",
                        n_weights=min(n_b, nw_b))
        rows.append(row)
        _progress(t0, row)

    if args.sweep and "ours" in methods:
        rows += _sweep(args, lk, t0, lora_base, q_sets, M, N, K, cap, route, use_graph, nwq_used, best_lines)
    del xs, q_sets
    return rows


def _sweep(args, lk, t0, lora_base, q_sets, M, N, K, cap, route, use_graph, nwq_used, best_lines) -> list[dict]:
    from lora_kernels.triton.nf4_lora_matmul import candidate_configs

    rows: list[dict] = []
    shape = lora_base["shape"]
    if not route.startswith("triton-"):
        rows.append(new_row(**lora_base, method="ours-sweep", variant="-", route=route,
                            note=f"no sweep: route {route} has no Triton configs"))
        return rows
    try:
        cfgs = candidate_configs(M, N, K, cap, route[len("triton-"):])
    except Exception as e:
        rows.append(new_row(**lora_base, method="ours-sweep", variant="-", route=route,
                            note=f"candidate_configs failed: {_short_error(e)}"))
        return rows
    print(f"  {_elapsed(t0)} sweep {shape} M={M}: {len(cfgs)} configs ({'graph' if use_graph else 'eager'})",
          flush=True)
    for i, cfg in enumerate(cfgs):
        fn = lambda x, q, A, B, cfg=cfg: lk.lora_linear(x, q, A, B, SCALE, config=cfg)  # noqa: E731
        row = _time_row(lora_base, fn, q_sets, args, use_graph=use_graph, peak=False, method="ours-sweep",
                        variant=config_str(cfg), route=route, config=dict(cfg), n_weights=nwq_used)
        if row["median_ms"] is None:
            row["note"] = f"config failed: {row['note']}"
        if i == 0:
            row["note"] = "default" + (f"; {row['note']}" if row["note"] else "")
        rows.append(row)
        print(f"    {config_str(cfg):<58} {_fmt_ms(row['median_ms'])} ms{'  (default)' if i == 0 else ''}", flush=True)
    ok = [r for r in rows if r["median_ms"]]
    if ok:
        best = min(ok, key=lambda r: r["median_ms"])
        dflt = rows[0]
        diff = {k: v for k, v in best["config"].items() if dflt["config"].get(k) != v}
        gain = f"{dflt['median_ms'] / best['median_ms']:.2f}x vs default" if dflt["median_ms"] else "default failed"
        mode = "graph" if use_graph else "eager"
        line = (f"best config {shape} M={M} ({route}, {mode}): {best['median_ms']:.4f} ms, {gain}; "
                f"{'= default' if not diff else 'change ' + repr(diff)}")
        best_lines.append(line)
        print(f"  {line}", flush=True)
    return rows


# ------------------------------------------------------------------------------------ CPU mode
def measure_cpu_matmul_rate(n: int = 256, reps: int = 5) -> float:
    """FLOP/s of an n^3 fp32 CPU matmul (the CPU mode's compute ceiling), median."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = harness.time_cpu(lambda: a @ b, reps=reps, warmup=1)
    return 2.0 * n**3 / (t["median_ms"] * 1e-3)


def run_cpu(args, lk, env, t0: float) -> tuple[list[dict], dict, list[str]]:
    from lora_kernels import reference

    shapes = args.shapes or CPU_SHAPES
    ms = args.ms or CPU_MS
    ranks = args.ranks or RANKS
    bw = harness.measure_cpu_copy_bandwidth(nbytes=32 * 1024**2, reps=3)
    mm = measure_cpu_matmul_rate()
    meta = {"mode": "cpu", "dtype": "bfloat16", "scale": SCALE, "ranks": ",".join(map(str, ranks)),
            "ms": ",".join(map(str, ms)), "copy_bw_gbps": bw / 1e9, "cpu_fp32_matmul_gflops": mm / 1e9,
            "reps": args.reps, "threads": torch.get_num_threads()}
    notes = ["no GPU: only `ours` through the reference route on a tiny shape (exercises the code path; the "
             "timings mean nothing for the GPU kernels)",
             "shape = K x N (in -> out); floor uses the CPU copy bandwidth and an fp32 CPU matmul rate"]
    rows: list[dict] = []
    dev = torch.device("cpu")
    for (K, N) in shapes:
        shape = f"{K}x{N}"
        gen = torch.Generator().manual_seed(1)
        W = _randn((N, K), gen, dev, 0.02)
        q = lk.quantize_nf4(W)
        for r in ranks:
            A = _randn((r, K), gen, dev, 1.0 / math.sqrt(K))
            B = _randn((N, r), gen, dev, 0.02)
            for M in ms:
                x = _randn((M, K), gen, dev)
                route = lk.forward_route(M, q, x.dtype, x.device)
                chk = correctness(lk, reference, x, q, A, B)
                chk.pop("_ref", None)
                row = new_row(bench="forward", device="cpu", shape=shape, K=K, N=N, M=M, r=r, method="ours",
                              variant="eager", route=route, n_weights=1, flops=forward_flops(M, K, N, r),
                              bytes=forward_bytes(M, K, N, r, q.nbytes()), **chk)
                try:
                    with torch.no_grad():
                        t = harness.time_cpu(lambda: lk.lora_linear(x, q, A, B, SCALE, route=route),
                                             reps=args.reps, warmup=1)
                    for k in ("median_ms", "p20_ms", "p80_ms", "n_reps", "n_sets", "graph"):
                        row[k] = t[k]
                except Exception as e:
                    _add_note(row, _short_error(e))
                rows.append(row)
                print(f"  {_elapsed(t0)} {shape} M={M} r={r} ours ({route}): {_fmt_ms(row['median_ms'])} ms, "
                      f"rel_err {row['rel_err']}", flush=True)
        fill_derived(rows, mm, bw)
        _write(args, env, rows, meta, notes)
    return rows, meta, notes


# ------------------------------------------------------------------------------------ output
def result_name(env: dict, quick: bool, sweep: bool, tag: str | None = None) -> str:
    return (f"forward_{env.get('key', 'unknown')}" + ("_quick" if quick else "") + ("_sweep" if sweep else "")
            + (f"_{tag}" if tag else ""))


def _write(args, env, rows, meta, notes):
    return harness.write_results(result_name(env, args.quick, args.sweep, getattr(args, "tag", None)), rows, env,
                                 args.out, meta=meta, columns=MD_COLUMNS, notes=notes)


def short_table(rows: list[dict]) -> str:
    """One line per (shape, M, method, variant); of the sweep only the best config per (shape, M, r)."""
    keep, best = [], {}
    for r in rows:
        if r["method"] == "ours-sweep":
            key = (r["shape"], r["M"], r["r"])
            if r["median_ms"] and (key not in best or r["median_ms"] < best[key]["median_ms"]):
                best[key] = r
        else:
            keep.append(r)
    for r in best.values():
        keep.append(dict(r, method="sweep-best", variant="graph" if r["graph"] else "eager"))
    order = {m: i for i, m in enumerate(("ours", "sweep-best", "bnb_peft", "bf16_linear", "bf16_lora_peft"))}
    keep.sort(key=lambda r: (r["K"] or 0, r["N"] or 0, r["M"] or 0, order.get(r["method"], 9), r["r"] or 0,
                             r["variant"] or ""))
    sig = lambda v, n: None if v is None else f"{v:.{n}g}"  # noqa: E731
    keep = [dict(r, route=(r["route"] or "").replace("triton-", ""), median_ms=sig(r["median_ms"], 4),
                 frac_floor=sig(r["frac_floor"], 2), ratio_vs_bf16_linear=sig(r["ratio_vs_bf16_linear"], 3),
                 ratio_vs_bnb_peft=sig(r["ratio_vs_bnb_peft"], 3), err_ratio=sig(r["err_ratio"], 2)) for r in keep]
    return harness.text_table(keep, SHORT_COLUMNS, SHORT_HEADERS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_forward", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shapes 4096x4096 and 4096x14336 only")
    p.add_argument("--sweep", action="store_true", help="also time every candidate_configs() config (ours-sweep)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="result folder")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="layer shapes K_in x N_out, e.g. 4096x4096,8192x28672 (overrides --quick)")
    p.add_argument("--ms", type=parse_ints, default=None, help=f"rows of x (default {GPU_MS}; CPU {CPU_MS})")
    p.add_argument("--ranks", type=parse_ints, default=None, help=f"LoRA ranks (default {RANKS}); alpha = 2r")
    p.add_argument("--methods", type=parse_methods, default=None, help=f"subset of {','.join(METHODS)}")
    p.add_argument("--tag", type=parse_tag, default=None, help="appended to the result file name: forward_<gpu>_TAG")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=50.0)
    p.add_argument("--reps", type=int, default=3, help="CPU mode: timed repetitions")
    p.add_argument("--cpu", action="store_true", help="CPU mode even when a GPU is present")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    t0 = time.perf_counter()
    args = build_parser().parse_args(argv)
    os.environ.setdefault("LORA_KERNELS_QUIET", "1")
    lk, env, gpu = harness.start("bench_forward", ("quantize_nf4", "lora_linear", "forward_route"), args.cpu,
                                 "ours vs the reference on a tiny shape only")
    rows, meta, notes = (run_gpu if gpu else run_cpu)(args, lk, env, t0)
    jpath, mpath = _write(args, env, rows, meta, notes)
    print(f"\n{_elapsed(t0)} wrote {jpath} and {mpath}")
    ceil = f"copy {meta['copy_bw_gbps']:.0f} GB/s"
    if "bf16_matmul_tflops" in meta:
        ceil += f", bf16 mm {meta['bf16_matmul_tflops']:.0f} TFLOP/s"
    print(f"\n== short table: forward on {env.get('gpu') or 'CPU'} ({ceil}); ms = median; /floor = floor/ms; "
          f"/bf16, /bnb = ms ratio (same mode); err/bf16 = rel err / bf16 torch's")
    for note in notes:
        if not gpu or note.startswith(("best config", "bnb_peft skipped", "bf16_lora_peft skipped")):
            print(f"note: {note}")
    print(short_table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
