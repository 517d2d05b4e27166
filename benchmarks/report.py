"""Combine benchmark result files into one markdown summary and PNG plots; regenerate the README's block.

    python -m benchmarks.report [--results benchmarks/results] [--out DIR] [--no-plots]
    python -m benchmarks.report --readme README.md [--results benchmarks/results]

Reads every ``*.json`` written by ``harness.write_results`` in the results folder, writes
``SUMMARY.md`` there (or in ``--out``) and the PNGs of every result file whose bench has a plotter
(``PLOTTERS``; nf4: achieved GB/s per shape and method, the copy bandwidth drawn as a line;
forward and training: time vs M per method, log-log, one PNG per shape named
``<result>_<KxN>.png``, the floor of ``ours`` drawn as a dashed line; a panel per rank when a
forward file holds several, a panel per direction — fwd+bwd, fwd, bwd — for training).  Without
matplotlib it says so and writes the summary only.

``--readme PATH`` rewrites only the lines between ``<!-- benchmarks:start -->`` and
``<!-- benchmarks:end -->`` in PATH (no SUMMARY.md, no plots): the NF4 headline table, the forward
and training tables when such result files exist, and one line per GPU result file naming the
machine, versions and date.  Every number comes from a result file; CPU-mode files are left out.
Without the two markers it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import defaultdict

from . import harness

NF4_COLUMNS = ("shape", "op", "method", "variant", "median_ms", "gbps", "frac_copy_bw", "ratio_vs_bnb",
               "peak_mem_mb", "check", "note")


def _matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    return plt, ""


def plot_nf4(doc: dict, path: str, plt) -> str | None:
    """Achieved GB/s per shape for each (method, variant), one panel per op; copy bandwidth as a line."""
    rows = [r for r in doc["rows"] if r.get("gbps")]
    if not rows:
        return None
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(ops), figsize=(6.5 * len(ops), 4.5), squeeze=False)
    bw = (doc.get("meta") or {}).get("copy_bw_gbps")
    for ax, op in zip(axes[0], ops):
        sub = [r for r in rows if r["op"] == op]
        shapes = list(dict.fromkeys(r["shape"] for r in sub))
        series = list(dict.fromkeys(f"{r['method']} {r['variant']}" for r in sub))
        vals = defaultdict(dict)
        for r in sub:
            vals[f"{r['method']} {r['variant']}"][r["shape"]] = r["gbps"]
        width = 0.8 / max(1, len(series))
        for i, s in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(shapes))]
            ax.bar(xs, [vals[s].get(sh, 0.0) for sh in shapes], width, label=s)
        if bw:
            ax.axhline(bw, color="black", linestyle="--", linewidth=1, label=f"copy {bw:.0f} GB/s")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=15)
        ax.set_ylabel("achieved GB/s (least bytes moved / time)")
        ax.set_title(f"NF4 {op}")
        ax.legend(fontsize=7)
    env = doc.get("env", {})
    fig.suptitle(f"{doc.get('name')}: {env.get('gpu') or env.get('cpu_model') or 'CPU'}, torch {env.get('torch')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series_label(r: dict) -> str:
    v = r.get("variant")
    return f"{r['method']} {v}" if v and v != "-" else r["method"]


def _direction(r: dict) -> str:
    """A training row's direction ("fwd+bwd" for files written before the column existed)."""
    return r.get("direction") or "fwd+bwd"


def _plot_panels(doc: dict, path: str, plt, panels_of, label_of, floor_key) -> list[str]:
    """Time vs M, log-log, one PNG per shape (``<path stem>_<KxN>.png``) with one panel per
    ``panels_of(rows)`` entry ``(title, predicate)``; a line per ``label_of(row)``; in each panel the
    floor_ms of ``ours`` (else of the first method with one; rows picked by ``floor_key``) dashed black.
    Sweep rows (``ours-sweep``) are left out.  Returns the paths written."""
    rows = [r for r in doc["rows"] if r.get("median_ms") and r.get("M") and r.get("method") != "ours-sweep"]
    written = []
    stem = os.path.splitext(path)[0]
    env = doc.get("env", {})
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sub = [r for r in rows if r["shape"] == shape]
        panels = panels_of(sub)
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False)
        # one colour per series, the same in every panel
        colors = {lb: f"C{i % 10}" for i, lb in enumerate(dict.fromkeys(label_of(r) for r in sub))}
        for ax, (title, keep) in zip(axes[0], panels):
            psub = [r for r in sub if keep(r)]
            for label in dict.fromkeys(label_of(r) for r in psub):
                pts = sorted((r["M"], r["median_ms"]) for r in psub if label_of(r) == label)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, color=colors[label])
            with_floor = [r for r in doc["rows"] if r.get("shape") == shape and r.get("floor_ms") and r.get("M")
                          and keep(r) and floor_key(r)]
            methods = list(dict.fromkeys(r["method"] for r in with_floor))
            fm = "ours" if "ours" in methods else (methods[0] if methods else None)
            if fm is not None:
                pts = sorted({r["M"]: r["floor_ms"] for r in with_floor if r["method"] == fm}.items())
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color="black", linestyle="--", linewidth=1,
                        label=f"floor ({fm})")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("M (rows of x)")
            ax.set_ylabel("median time (ms)")
            ax.set_title(f"{doc.get('name')}: {shape} (K x N){': ' + title if title else ''}", fontsize=10)
            ax.grid(True, which="both", linewidth=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{env.get('gpu') or env.get('cpu_model') or 'CPU'}, torch {env.get('torch')}", fontsize=8)
        fig.tight_layout()
        out = f"{stem}_{harness.slug(shape)}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def plot_time_vs_m(doc: dict, path: str, plt) -> list[str]:
    """Forward: time vs M per (method, variant), log-log, one PNG per shape (``<path stem>_<KxN>.png``);
    the rows' floor_ms of ``ours`` (else of the first method with one) drawn as a dashed black line.
    A file with several ranks gets one panel per rank (the rank-free bf16_linear in each)."""
    ranks = sorted({r["r"] for r in doc["rows"] if r.get("r") is not None and r.get("median_ms")})
    if len(ranks) <= 1:
        panels_of = lambda sub: [("", lambda r: True)]  # noqa: E731
    else:
        panels_of = lambda sub: [(f"r = {k}", lambda r, k=k: r.get("r") in (k, None))  # noqa: E731
                                 for k in ranks if any(x.get("r") == k for x in sub)]
    return _plot_panels(doc, path, plt, panels_of, _series_label, lambda r: True)


def plot_training(doc: dict, path: str, plt) -> list[str]:
    """Training: time vs M per method, log-log, one PNG per shape (``<path stem>_<KxN>.png``), one panel
    per direction (fwd+bwd, fwd, bwd; files without the column are all fwd+bwd); several ranks in one
    file: a line per (method, r); the floor of ``ours`` (its first rank) dashed."""
    ranks = sorted({r["r"] for r in doc["rows"] if r.get("r") is not None and r.get("median_ms")})
    many = len(ranks) > 1

    def label(r):
        return r["method"] + (f" r{r['r']}" if many and r.get("r") is not None else "")

    def panels_of(sub):
        dirs = [d for d in ("fwd+bwd", "fwd", "bwd") if any(_direction(r) == d for r in sub)]
        return [(d, lambda r, d=d: _direction(r) == d) for d in dirs]

    first = ranks[0] if ranks else None
    return _plot_panels(doc, path, plt, panels_of, label, lambda r: r.get("r") in (first, None))


#: bench name (rows' "bench" key) -> plotter(doc, png_path, plt) returning the path written, a list
#: of paths, or None; later kernel families add theirs.
PLOTTERS = {"nf4": plot_nf4, "forward": plot_time_vs_m, "training": plot_training}
#: bench name -> markdown columns for the summary (default: every key).
SUMMARY_COLUMNS = {"nf4": NF4_COLUMNS}


def load_all(results_dir: str) -> tuple[list[dict], list[str]]:
    """Every readable result document in ``results_dir`` (sorted by name), and the problems met."""
    docs, problems = [], []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            doc = harness.load_results(path)
            doc.setdefault("name", os.path.splitext(os.path.basename(path))[0])
            docs.append(doc)
        except Exception as e:
            problems.append(f"{os.path.basename(path)}: skipped ({type(e).__name__}: {e})")
    return docs, problems


def _bench_of(doc: dict) -> str:
    rows = doc.get("rows") or []
    return rows[0].get("bench", "") if rows and isinstance(rows[0], dict) else ""


def make_report(results_dir: str, out_dir: str | None = None, plots: bool = True) -> dict:
    """Write SUMMARY.md (+ PNGs); returns {"summary": path, "plots": [...], "notes": [...]}."""
    out_dir = out_dir or results_dir
    os.makedirs(out_dir, exist_ok=True)
    docs, notes = load_all(results_dir)
    plt, why = _matplotlib() if plots else (None, "plots disabled")
    if plt is None:
        notes.append(f"matplotlib unavailable ({why}): no plots")
    written = []
    parts = ["# Benchmark summary\n", f"{len(docs)} result file(s) from `{results_dir}`.\n"]
    for doc in docs:
        bench = _bench_of(doc)
        parts.append(f"## {doc['name']}\n")
        parts.append(harness.env_header(doc["env"]) + "\n")
        if doc.get("meta"):
            parts.append("**Meta:** " + ", ".join(f"{k} = {harness._fmt(v)}" for k, v in doc["meta"].items()) + "\n")
        if plt is not None and bench in PLOTTERS:
            png = os.path.join(out_dir, f"{doc['name']}.png")
            try:
                got = PLOTTERS[bench](doc, png, plt)
                for p in ([got] if isinstance(got, str) else (got or [])):
                    written.append(p)
                    parts.append(f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})\n")
            except Exception as e:
                notes.append(f"{doc['name']}: plot failed ({type(e).__name__}: {e})")
        parts.append(harness.markdown_table(doc["rows"], SUMMARY_COLUMNS.get(bench)))
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    summary = os.path.join(out_dir, "SUMMARY.md")
    with open(summary, "w") as f:
        f.write("\n".join(parts))
    return {"summary": summary, "plots": written, "notes": notes}


# ------------------------------------------------------------------------------------ README block
README_START = "<!-- benchmarks:start -->"
README_END = "<!-- benchmarks:end -->"


class ReadmeError(ValueError):
    """The README lacks the markers (or has them out of order)."""


def _us(ms: float | None) -> str:
    """Milliseconds as 3 significant digits: 0.0196 -> '19.6 µs', 0.225 -> '225 µs', 5.533 -> '5.53 ms'."""
    if ms is None:
        return "—"
    v = ms * 1e3
    if v >= 1000:
        return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"
    if v >= 100:
        return f"{v:.0f} µs"
    return f"{v:.1f} µs" if v >= 10 else f"{v:.2f} µs"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _is_gpu(doc: dict) -> bool:
    return (doc.get("env") or {}).get("device") == "cuda"


def _pick(docs: list[dict], bench: str, prefer: tuple[str, ...]) -> dict | None:
    """The GPU result of ``bench`` whose meta mode comes first in ``prefer``; the latest run among equals."""
    cands = [d for d in docs if _bench_of(d) == bench and _is_gpu(d)
             and (d.get("meta") or {}).get("mode") in prefer]
    cands.sort(key=lambda d: d["env"].get("time_utc") or "", reverse=True)
    cands.sort(key=lambda d: prefer.index(d["meta"]["mode"]))  # stable: latest first within a mode
    return cands[0] if cands else None


def _row(rows, **kw) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def env_line(doc: dict) -> str:
    env = doc.get("env") or {}
    machine = env.get("gpu") or f"CPU {env.get('cpu_model')}"
    vers = ", ".join(f"{k} {env[k]}" for k in ("torch", "cuda", "triton", "bitsandbytes", "peft")
                     if env.get(k) is not None)
    commit = f", lora_kernels @ {env['git_commit']}" if env.get("git_commit") else ""
    tree = f" ({env['tree_note']})" if env.get("tree_note") else ""
    return f"- `{doc['name']}`: {machine}, driver {env.get('driver')}; {vers}{commit}{tree}; run {env.get('time_utc')}"


def nf4_table(doc: dict) -> list[str]:
    rows = doc["rows"]
    bw = (doc.get("meta") or {}).get("copy_bw_gbps")

    def cell(sub, op, method, variant, eager_variant=None):
        r = _row(sub, op=op, method=method, variant=variant)
        if r is not None and r.get("median_ms"):
            frac = r.get("frac_copy_bw")
            return _us(r["median_ms"]) + (f" ({frac:.2f})" if frac is not None else "")
        if eager_variant:
            e = _row(sub, op=op, method=method, variant=eager_variant)
            if e is not None and e.get("median_ms"):
                return f"{_us(e['median_ms'])} eager"
        return "—"

    bnb_v = (doc.get("env") or {}).get("bitsandbytes")
    out = [f"NF4 dequantize and quantize (double quantization, bf16, blocksize 64) on {doc['env'].get('gpu')}, "
           f"from `{doc['name']}` (GPU time by CUDA-graph replay; in brackets the fraction of the "
           f"device-to-device copy bandwidth measured in the same run"
           + (f", {bw:.0f} GB/s" if bw else "") + "; ours quantize without the finite check):", "",
           f"| weight | dequantize, ours (CUDA) | dequantize, ours (Triton) | dequantize, bitsandbytes {bnb_v} "
           f"| quantize, ours (CUDA) | quantize, ours (Triton) | quantize, bitsandbytes {bnb_v} |",
           "|---|---|---|---|---|---|---|"]
    bnb_eager = False
    for shape in dict.fromkeys(r["shape"] for r in rows if r.get("op") in ("dequantize", "quantize")):
        sub = [r for r in rows if r.get("shape") == shape]
        q_bnb = cell(sub, "quantize", "bnb", "graph", "default")
        bnb_eager |= q_bnb.endswith("eager")
        out.append(f"| {shape.replace('x', '×')} | {cell(sub, 'dequantize', 'ours-cuda', 'out_graph')} "
                   f"| {cell(sub, 'dequantize', 'ours-triton', 'out_graph')} "
                   f"| {cell(sub, 'dequantize', 'bnb', 'out_graph')} "
                   f"| {cell(sub, 'quantize', 'ours-cuda', 'no_check_graph')} "
                   f"| {cell(sub, 'quantize', 'ours-triton', 'no_check_graph')} | {q_bnb} |")
    if bnb_eager:
        note = (_row(rows, op="quantize", method="bnb", variant="graph") or {}).get("note")
        out += ["", "bitsandbytes' quantize has no graph timing in the file" + (f" ({note.split(':')[0]} at "
                "capture)" if note else "") + ": its column is eager (Python and launch overhead included)."]
    return out


def forward_table(doc: dict) -> list[str]:
    rows = doc["rows"]
    forced = doc.get("meta", {}).get("gemv_variant_forced")
    out = [f"Fused QLoRA forward (r = 16, NF4 double quant, bf16) on {doc['env'].get('gpu')}, from `{doc['name']}`: "
           "median time of `lora_linear` and its ratio to bf16 `F.linear` (no LoRA) and to bitsandbytes + PEFT "
           "in the same timing mode (graph = CUDA-graph replay, eager = per-call events; < 1 is faster); "
           "route = the kernel `forward_route` picked when the file was measured"
           + (f" (decode kernel forced with LORA_KERNELS_GEMV_VARIANT={forced}: an opt-in A/B run, not what the "
              "package picks by default)" if forced else "") + ":", "",
           "| layer K→N | M | route | timing | ours | ours / bf16 F.linear | ours / bnb+PEFT |",
           "|---|---|---|---|---|---|---|"]
    n = 0
    for shape in dict.fromkeys(r["shape"] for r in rows if r.get("method") == "ours"):
        for M, variant in ((1, "graph"), (16, "graph"), (4096, "eager"), (16384, "eager")):
            r = _row(rows, shape=shape, M=M, method="ours", variant=variant, r=16)
            if r is None or not r.get("median_ms"):
                continue
            n += 1
            out.append(f"| {shape.replace('x', '→')} | {M} | {r.get('route') or '?'} | {variant} | {_us(r['median_ms'])} "
                       f"| {_x(r.get('ratio_vs_bf16_linear'))} | {_x(r.get('ratio_vs_bnb_peft'))} |")
    return out if n else []


def training_table(doc: dict) -> list[str]:
    rows = doc["rows"]
    graph = doc.get("meta", {}).get("timing") == "graph"
    how = "CUDA-graph replay" if graph else "eager"
    out = [f"QLoRA training step (forward + backward for x, A, B; {how}) on {doc['env'].get('gpu')}, "
           f"from `{doc['name']}`: ratios of our step's time to the two bf16 cuBLAS matmuls every step needs, "
           "to PEFT LoRA on a bf16 layer and to bitsandbytes + PEFT (< 1 is faster); memory = the frozen base as "
           "held plus the step's peak, ours vs bf16 LoRA:", "",
           "| layer K→N | M | r | ours | ours / cuBLAS floor | ours / bf16 LoRA (PEFT) | ours / bnb+PEFT | memory MB |",
           "|---|---|---|---|---|---|---|---|"]
    n = 0
    for r in rows:
        if r.get("method") == "ours" and r.get("median_ms") and _direction(r) == "fwd+bwd":
            n += 1
            ref = next((x for x in rows if x.get("shape") == r["shape"] and x.get("M") == r["M"]
                        and x.get("r") == r.get("r") and x.get("method") == "bf16_lora_peft"
                        and _direction(x) == "fwd+bwd"), {})
            mine, theirs = r.get("total_mem_mb"), ref.get("total_mem_mb")
            mem = "—" if mine is None else f"{mine:.0f}" + ("" if theirs is None else f" vs {theirs:.0f}")
            eager = " (eager: no capture)" if graph and r.get("graph") is False else ""
            out.append(f"| {r['shape'].replace('x', '→')} | {r['M']} | {r.get('r')} | {r['median_ms']:.3g} ms{eager} "
                       f"| {_x(r.get('ratio_vs_cublas_floor'))} | {_x(r.get('ratio_vs_bf16_lora'))} "
                       f"| {_x(r.get('ratio_vs_bnb_peft'))} | {mem} |")
    if graph:
        eager = sorted({f"{x.get('method')} on {x.get('shape', '').replace('x', '→')} M = {x.get('M')}" for x in rows
                        if x.get("graph") is False and x.get("median_ms") and _direction(x) == "fwd+bwd"})
        if eager:
            out += ["", "Timed eagerly (the step could not be captured; ratios with these rows mix the two modes): "
                    + "; ".join(eager) + "."]
    return out if n else []


def finetune_table(doc: dict) -> list[str]:
    rows = [r for r in doc["rows"] if r.get("tokens_per_s")]
    if not rows:
        return []
    r0 = rows[0]
    how = f", torch.compile {r0['compiled']}" if r0.get("compiled") else ", eager"
    how += f", AdamW {r0['optim']}" if r0.get("optim") else ""
    failed = [r["arm"] for r in doc["rows"] if not r.get("tokens_per_s") and r.get("arm")]
    out = [f"Fine-tune, model `{r0.get('model')}` ({r0.get('params_m') or 0:.0f} M parameters), batch {r0.get('batch')} "
           f"x seq {r0.get('seq')}, r = {r0.get('r')}, gradient checkpointing {'on' if r0.get('grad_ckpt') else 'off'}"
           f"{how}, on {doc['env'].get('gpu')}, from `{doc['name']}`"
           f"{' (not run or failed: ' + ', '.join(failed) + ')' if failed else ''}:", "",
           "| arm | tokens/s | vs bnb+PEFT | peak MB | max rel. loss diff |", "|---|---|---|---|---|"]
    for r in rows:
        diff = r.get("max_rel_loss_diff")
        diff = "—" if diff is None else f"{diff:.1e}"
        out.append(f"| {r['arm']} | {r['tokens_per_s']:,.0f} | {_x(r.get('speedup_vs_peft_bnb'))} "
                   f"| {r.get('peak_mem_mb') or 0:,.0f} | {diff} |")
    return out


def readme_block(results_dir: str, readme_dir: str = ".") -> str:
    """The markdown between the README markers, from the result files in ``results_dir``."""
    docs, _ = load_all(results_dir)
    gpu_docs = [d for d in docs if _is_gpu(d)]
    parts: list[str] = [f"_Generated by `python -m benchmarks.report --readme` from `{os.path.relpath(results_dir, readme_dir)}`; "
                        "every number below is in a result file there._", ""]
    nf4 = _pick(docs, "nf4", ("full", "quick"))
    if nf4 is not None:
        parts += nf4_table(nf4) + [""]
        png = os.path.join(results_dir, f"{nf4['name']}.png")
        if os.path.exists(png):
            parts += [f"![NF4 quantize/dequantize throughput]({os.path.relpath(png, readme_dir)})", ""]
    # Every full forward run (decode and large-M runs are separate files), else the newest quick one.
    fwds = [d for d in docs if d["name"].startswith("forward") and str(d.get("meta", {}).get("mode", "")) == "full"
            and not d["meta"].get("merge_chunk_mb")]  # the chunked variant is kept for reference only
    if not fwds:
        fwd = _pick(docs, "forward", ("full", "quick"))
        fwds = [fwd] if fwd is not None else []
    for fwd in fwds:
        t = forward_table(fwd)
        if t:
            parts += t + [""]
    for tr in [d for d in docs if d["name"].startswith("training") and _is_gpu(d)]:
        t = training_table(tr)
        if t:
            parts += t + [""]
    for ft in [d for d in docs if d["name"].startswith("finetune") and _is_gpu(d)]:
        t = finetune_table(ft)
        if t:
            parts += t + [""]
    if not gpu_docs:
        parts += ["No GPU result files yet.", ""]
    else:
        parts += ["Result files (machine, versions, date):", ""] + [env_line(d) for d in gpu_docs] + [""]
    return "\n".join(parts)


def update_readme(readme: str, results_dir: str) -> bool:
    """Rewrite only the lines between the markers in ``readme``; True if the file changed."""
    with open(readme) as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.strip() == README_START]
    ends = [i for i, ln in enumerate(lines) if ln.strip() == README_END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ReadmeError(f"{readme}: needs exactly one line '{README_START}' followed later by exactly one line "
                          f"'{README_END}' (found {len(starts)} start and {len(ends)} end marker line(s)); "
                          f"insert them where the generated benchmark block belongs")
    block = readme_block(results_dir, os.path.dirname(os.path.abspath(readme)))
    new = "".join(lines[:starts[0] + 1]) + block.rstrip("\n") + "\n" + "".join(lines[ends[0]:])
    if new == text:
        return False
    with open(readme + ".tmp", "w") as f:
        f.write(new)
    os.replace(readme + ".tmp", readme)
    return True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join("benchmarks", "results"), help="folder of result JSON files")
    p.add_argument("--out", default=None, help="where SUMMARY.md and PNGs go (default: --results)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--readme", default=None, metavar="PATH",
                   help=f"only rewrite the block between '{README_START}' and '{README_END}' in PATH")
    args = p.parse_args(argv)
    if not os.path.isdir(args.results):
        print(f"report: no results folder {args.results}", file=sys.stderr)
        raise SystemExit(1)
    if args.readme:
        try:
            changed = update_readme(args.readme, args.results)
        except (ReadmeError, OSError) as e:
            print(f"report: {e}", file=sys.stderr)
            raise SystemExit(2)
        print(f"report: {'updated' if changed else 'no change to'} the benchmark block of {args.readme}")
        return {"readme": args.readme, "changed": changed}
    res = make_report(args.results, args.out, plots=not args.no_plots)
    for n in res["notes"]:
        print(f"report: {n}")
    print(f"report: wrote {res['summary']}" + (f" and {len(res['plots'])} plot(s)" if res["plots"] else ""))
    return res


if __name__ == "__main__":
    main()
