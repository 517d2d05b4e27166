"""One benchmark harness for every kernel family: environment, timing, memory, floors, result files.

GPU timing (``time_cuda``) uses CUDA events around each call, rotates among several input sets
whose total size exceeds the L2 cache (so a kernel never re-reads inputs that the previous call
left in L2), and can capture the calls in a CUDA graph and replay it (no launch overhead: for
small decode-sized problems).  Floors' denominators (``measure_copy_bandwidth``,
``measure_bf16_matmul_rate``) are measured in the same process as the kernels.

Result files: ``write_results(name, rows, env, outdir)`` writes ``<name>.json`` (env, meta, rows)
and ``<name>.md`` (a table under a header naming the machine and versions).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import torch

#: L2 size used when the device does not report one (H100: 50 MB).
DEFAULT_L2_BYTES = 50 * 1024 * 1024
#: Input sets are rotated until their total size is at least this many times the L2 size.
L2_MARGIN = 2.0

TIMING_KEYS = ("median_ms", "p20_ms", "p80_ms", "mean_ms", "min_ms", "n_reps", "n_sets", "graph")


# ------------------------------------------------------------------------------------ environment
def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception as e:  # not installed, or broken (e.g. a missing native library)
        return None if isinstance(e, ImportError) else f"import failed: {type(e).__name__}"
    return getattr(mod, "__version__", "unknown")


def _nvidia_smi(fields: Sequence[str]) -> dict[str, str]:
    try:
        res = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=20)
    except Exception:
        return {}
    if res.returncode != 0 or not res.stdout.strip():
        return {}
    values = [v.strip() for v in res.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields, values)) if len(values) == len(fields) else {}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        head = res.stdout.strip() or None if res.returncode == 0 else None
        if head is None:
            return None
        # A tree that differs from HEAD (e.g. the device's copy of a working tree whose git metadata
        # lags, seen in session 17) says so, instead of naming a commit it does not match.
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                            capture_output=True, text=True, timeout=10)
        changed = len(st.stdout.splitlines()) if st.returncode == 0 else 0
        return f"{head}+{changed} changed files" if changed else head
    except Exception:
        return None


def slug(text: str) -> str:
    """A file-name-safe lower-case key: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def env_info() -> dict[str, Any]:
    """The machine and versions (no hostname).  ``key`` names the machine in result file names."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "lora_kernels": _version("lora_kernels"),
        "git_commit": _git_commit(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # the package's own switches in force (launch variants under A/B, quiet, ...)
        "lora_kernels_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LORA_KERNELS_")},
    }
    if not torch.cuda.is_available():
        env.update(device="cpu", gpu=None, key="cpu",
                   note=f"no CUDA GPU: CPU-only mode ({env['cpu_model']}, {env['cpu_cores']} cores)")
        return env
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    smi = _nvidia_smi(["driver_version", "clocks.max.sm", "clocks.max.mem", "power.limit",
                       "persistence_mode"])
    driver = smi.get("driver_version")
    if driver is None:
        try:  # the CUDA driver API version (e.g. 13000), when nvidia-smi is missing
            driver = f"cuda-driver-api {torch._C._cuda_getDriverVersion()}"
        except Exception:
            driver = None
    env.update(
        device="cuda",
        gpu=props.name,
        key=slug(props.name),
        compute_capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        gpu_memory_gb=round(props.total_memory / 2**30, 1),
        l2_bytes=getattr(props, "L2_cache_size", None),
        driver=driver,
        sm_clock_max_mhz=smi.get("clocks.max.sm"),
        mem_clock_max_mhz=smi.get("clocks.max.mem"),
        power_limit_w=smi.get("power.limit"),
        persistence_mode=smi.get("persistence_mode"),
        cudnn=torch.backends.cudnn.version(),
    )
    return env


def env_header(env: dict[str, Any]) -> str:
    """One markdown line naming the machine and versions."""
    if env.get("device") == "cuda":
        machine = (f"{env['gpu']} (sm_{env['compute_capability'].replace('.', '')}, {env['sm_count']} SMs, "
                   f"{env['gpu_memory_gb']} GB, driver {env.get('driver')})")
    else:
        machine = f"CPU only: {env.get('cpu_model')} ({env.get('cpu_cores')} cores, {env.get('torch_threads')} threads)"
    versions = ", ".join(f"{k} {env.get(k)}" for k in
                         ("torch", "cuda", "triton", "bitsandbytes", "peft", "python") if env.get(k) is not None)
    commit = f", lora_kernels {env.get('lora_kernels')} @ {env.get('git_commit')}" if env.get("git_commit") else ""
    return f"**Machine:** {machine}  \n**Versions:** {versions}{commit}  \n**Run:** {env.get('time_utc')}"


# ------------------------------------------------------------------------------------ timing
def make_row(row_keys: Sequence[str], **kw) -> dict[str, Any]:
    """A result row with exactly ``row_keys`` (missing ones None); an unknown key is a bug."""
    unknown = set(kw) - set(row_keys)
    if unknown:
        raise KeyError(f"unknown row keys {sorted(unknown)}")
    return {k: kw.get(k) for k in row_keys}


def short_error(e: BaseException) -> str:
    """'Type: first line of the message', at most 160 characters (a row's note)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:160]


def _summary(times_ms: Sequence[float], n_sets: int, graph: bool) -> dict[str, Any]:
    t = sorted(times_ms)
    q = lambda p: t[min(len(t) - 1, max(0, int(round(p * (len(t) - 1)))))]  # noqa: E731
    return {"median_ms": statistics.median(t), "p20_ms": q(0.2), "p80_ms": q(0.8),
            "mean_ms": statistics.fmean(t), "min_ms": t[0], "n_reps": len(t), "n_sets": n_sets, "graph": graph}


def l2_bytes(device: int | None = None) -> int:
    """The GPU's L2 size in bytes (50 MB if it does not say)."""
    if not torch.cuda.is_available():
        return DEFAULT_L2_BYTES
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def sets_for_l2(bytes_per_set: int, margin: float = L2_MARGIN, min_sets: int = 2, max_sets: int = 64) -> int:
    """How many input sets of ``bytes_per_set`` to rotate among so they total > margin x L2."""
    need = math.ceil(margin * l2_bytes() / max(1, bytes_per_set))
    return int(min(max_sets, max(min_sets, need)))


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) tuple/list/dict, or in an object's tensor attributes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v) for v in vars(obj).values())
    return 0


def time_cuda(fn: Callable, inputs_sets: Iterable, warmup_ms: float = 25.0, rep_ms: float = 100.0,
              use_graph: bool = False, min_reps: int = 10, max_reps: int = 1000) -> dict[str, Any]:
    """Time ``fn(*inputs)`` on the GPU; returns {median_ms, p20_ms, p80_ms, mean_ms, min_ms, n_reps, ...}.

    Call i uses ``inputs_sets[i % len(inputs_sets)]`` (each set a tuple of args, or one arg): give
    enough sets that they total more than the L2 (``sets_for_l2``), so no call finds its inputs
    cached.  Without a graph every call is bracketed by its own pair of CUDA events (the events are
    read after one final synchronize, so the CPU keeps running ahead); the first calls compile /
    autotune and are not timed.  With ``use_graph`` one call per input set is captured into a CUDA
    graph (after a warm-up on a side stream), and each timed sample is one replay divided by the
    number of sets: launch overhead disappears, which is what small decode-sized problems need.
    """
    sets = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in inputs_sets] or [()]
    k = len(sets)
    for s in sets:  # first call per set: Triton JIT / autotune, allocator warm-up
        fn(*s)
    torch.cuda.synchronize()

    graph = None
    if use_graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                for s in sets:
                    fn(*s)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for s in sets:
                fn(*s)
        torch.cuda.synchronize()
        per_step = k

        def step(_i):
            graph.replay()
    else:
        per_step = 1

        def step(i):
            fn(*sets[i % k])

    # Estimate the time of one step from a short burst, then size warm-up and repetitions.
    n_est = max(k, 5) if graph is None else 3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(n_est):
        step(i)
    end.record()
    torch.cuda.synchronize()
    est_ms = max(start.elapsed_time(end) / n_est, 1e-4)
    n_warm = max(1, int(warmup_ms / est_ms))
    n_rep = int(min(max_reps, max(min_reps, rep_ms / est_ms)))

    for i in range(n_warm):
        step(i)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        starts[i].record()
        step(n_warm + i)
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / per_step for s, e in zip(starts, ends)]
    del graph
    return _summary(times, k, use_graph)


def time_cpu(fn: Callable, reps: int = 5, warmup: int = 1, inputs_sets: Iterable | None = None) -> dict[str, Any]:
    """Wall-clock time of ``fn(*inputs)`` on the CPU (perf_counter); same keys as ``time_cuda``."""
    sets = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in (inputs_sets or [()])] or [()]
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    times = []
    for i in range(max(1, reps)):
        t0 = time.perf_counter()
        fn(*sets[i % len(sets)])
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times, len(sets), False)


# ------------------------------------------------------------------------------------ memory, floors
def peak_memory(fn: Callable, *args) -> int:
    """Peak bytes allocated on the GPU during ``fn(*args)``, above what was allocated before (result included)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def largest_allocation(fn: Callable, *args) -> int:
    """Bytes of the largest single CUDA caching-allocator allocation made during ``fn(*args)``
    (read from the allocator's recorded history)."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(enabled="all", max_entries=1_000_000)
    try:
        out = fn(*args)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    del out
    return max((e["size"] for trace in snap["device_traces"] for e in trace if e["action"] == "alloc"), default=0)


def measure_copy_bandwidth(nbytes: int = 2 * 1024**3, rep_ms: float = 200.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written (2 x nbytes), median."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), [()], warmup_ms=50.0, rep_ms=rep_ms, min_reps=5)
    del src, dst
    torch.cuda.empty_cache()
    return 2.0 * nbytes / (t["median_ms"] * 1e-3)


def measure_bf16_matmul_rate(n: int = 8192, rep_ms: float = 200.0) -> float:
    """FLOP/s (2 n^3 per call) of an n x n x n bf16 matmul on random data, median."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_cuda(lambda: torch.mm(a, b, out=c), [()], warmup_ms=100.0, rep_ms=rep_ms, min_reps=5)
    del a, b, c
    torch.cuda.empty_cache()
    return 2.0 * n**3 / (t["median_ms"] * 1e-3)


def measure_cpu_copy_bandwidth(nbytes: int = 256 * 1024**2, reps: int = 5) -> float:
    """CPU memory copy bandwidth in bytes/s (read + written), median of ``reps``."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = time_cpu(lambda: dst.copy_(src), reps=reps, warmup=1)
    return 2.0 * nbytes / (t["median_ms"] * 1e-3)


# ------------------------------------------------------------------------------------ result files
def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        a = abs(v)
        return f"{v:.4g}" if 1e-3 <= a < 1e6 else f"{v:.3e}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` (columns: given, else every key in first-seen order)."""
    if not rows:
        return "_(no rows)_\n"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def text_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A plain fixed-width table for terminal output."""
    headers = list(headers or columns)
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    fmt_line = lambda vals: "  ".join(v.rjust(w) if i > 0 else v.ljust(w)  # noqa: E731
                                      for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([fmt_line(headers), fmt_line(["-" * w for w in widths])] + [fmt_line(c) for c in cells])


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return str(v)


def write_results(name: str, rows: Sequence[dict], env: dict, outdir: str, meta: dict | None = None,
                  columns: Sequence[str] | None = None, notes: Sequence[str] = ()) -> tuple[str, str]:
    """Write ``<outdir>/<name>.json`` ({name, env, meta, rows}) and ``<outdir>/<name>.md``; return both paths.

    ``columns`` picks the markdown table's columns (the JSON keeps every key); ``meta`` holds
    run-level numbers (floors, mode); ``notes`` are printed as bullets under the header.
    """
    os.makedirs(outdir, exist_ok=True)
    jpath, mpath = os.path.join(outdir, f"{name}.json"), os.path.join(outdir, f"{name}.md")
    doc = {"name": name, "env": _jsonable(env), "meta": _jsonable(meta or {}), "rows": _jsonable(list(rows))}
    with open(jpath + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(jpath + ".tmp", jpath)
    parts = [f"# {name}\n", env_header(env) + "\n"]
    if meta:
        parts.append("**Meta:** " + ", ".join(f"{k} = {_fmt(v)}" for k, v in meta.items()) + "\n")
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes) + "\n")
    parts.append(markdown_table(doc["rows"], columns))
    with open(mpath, "w") as f:
        f.write("\n".join(parts))
    return jpath, mpath


def load_results(path: str) -> dict:
    """Read one result JSON written by ``write_results``."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "rows" not in doc or "env" not in doc:
        raise ValueError(f"{path}: not a benchmark result (needs 'env' and 'rows')")
    return doc


def main() -> None:  # pragma: no cover - a quick look at the machine
    print(json.dumps(env_info(), indent=1))
    if torch.cuda.is_available():
        print(f"copy bandwidth: {measure_copy_bandwidth() / 1e9:.1f} GB/s")
        print(f"bf16 matmul:    {measure_bf16_matmul_rate() / 1e12:.1f} TFLOP/s")
    else:
        print(f"CPU copy bandwidth: {measure_cpu_copy_bandwidth() / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()


def start(prog: str, required: tuple[str, ...], cpu_only: bool, cpu_what: str):
    """Common start of a benchmark's main(): import lora_kernels (exit 2 naming what is missing),
    read the environment, decide GPU or CPU mode and print one header line.
    Returns (lora_kernels module, env, gpu: bool); in CPU mode env is keyed "cpu"."""
    try:
        import lora_kernels as lk
        missing = [a for a in required if not hasattr(lk, a)]
        if missing:
            raise ImportError(f"lora_kernels lacks {missing}")
    except ImportError as e:
        print(f"{prog}: cannot run without the lora_kernels API: {e}", file=sys.stderr)
        raise SystemExit(2)
    env = env_info()
    gpu = torch.cuda.is_available() and not cpu_only
    if not gpu:
        print(f"{prog}: no GPU ({env.get('note') or 'CPU mode requested'}): {cpu_what}", flush=True)
        return lk, dict(env, device="cpu", key="cpu"), False
    print(f"{prog}: {env['gpu']} sm_{env['compute_capability']}, torch {env['torch']}, triton {env['triton']}, "
          f"bitsandbytes {env['bitsandbytes']}, peft {env['peft']}", flush=True)
    return lk, env, True
