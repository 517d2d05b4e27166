"""Combine benchmark result files into one markdown summary and PNG plots.

    python -m benchmarks.report [--results benchmarks/results] [--out DIR]

Reads every ``*.json`` written by ``harness.write_results`` in the results folder, writes
``SUMMARY.md`` there (or in ``--out``) and one PNG per result file whose bench has a plotter
(``PLOTTERS``; nf4: achieved GB/s per shape and method, the copy bandwidth drawn as a line).
Without matplotlib it says so and writes the summary only.
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


#: bench name (rows' "bench" key) -> plotter(doc, png_path, plt); later kernel families add theirs.
PLOTTERS = {"nf4": plot_nf4}
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
                if PLOTTERS[bench](doc, png, plt):
                    written.append(png)
                    parts.append(f"![{doc['name']}]({os.path.basename(png)})\n")
            except Exception as e:
                notes.append(f"{doc['name']}: plot failed ({type(e).__name__}: {e})")
        parts.append(harness.markdown_table(doc["rows"], SUMMARY_COLUMNS.get(bench)))
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    summary = os.path.join(out_dir, "SUMMARY.md")
    with open(summary, "w") as f:
        f.write("\n".join(parts))
    return {"summary": summary, "plots": written, "notes": notes}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join("benchmarks", "results"), help="folder of result JSON files")
    p.add_argument("--out", default=None, help="where SUMMARY.md and PNGs go (default: --results)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if not os.path.isdir(args.results):
        print(f"report: no results folder {args.results}", file=sys.stderr)
        raise SystemExit(1)
    res = make_report(args.results, args.out, plots=not args.no_plots)
    for n in res["notes"]:
        print(f"report: {n}")
    print(f"report: wrote {res['summary']}" + (f" and {len(res['plots'])} plot(s)" if res["plots"] else ""))
    return res


if __name__ == "__main__":
    main()
