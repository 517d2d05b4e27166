"""benchmarks/report.py on fake result files: SUMMARY.md, the plots (nf4 bars, time vs M per shape for
forward and training), and ``--readme`` rewriting only the marked block of a README copy."""

import os

import pytest

from benchmarks import harness, report

ENV = {"device": "cuda", "gpu": "Fake GPU 80GB", "key": "fake-gpu", "compute_capability": "9.0", "sm_count": 132,
       "gpu_memory_gb": 79.2, "driver": "999.1", "torch": "2.99", "cuda": "13.0", "triton": "3.6.0",
       "bitsandbytes": "0.50.2", "peft": "0.21.0", "python": "3.12", "time_utc": "2026-11-23T12:00:00Z"}


def _nf4_rows():
    rows = []
    for shape in ("4096x4096", "8192x28672"):
        for op, method, variant, ms, frac in (
                ("dequantize", "ours-cuda", "out_graph", 0.0196, 0.71), ("dequantize", "ours-triton", "out_graph", 0.0187, 0.75),
                ("dequantize", "bnb", "out_graph", 0.0264, 0.53), ("quantize", "ours-cuda", "no_check_graph", 0.0332, 0.42),
                ("quantize", "ours-triton", "no_check_graph", 0.0599, 0.23), ("quantize", "bnb", "default", 0.297, 0.05),
                ("quantize", "bnb", "graph", None, None)):
            rows.append({"bench": "nf4", "shape": shape, "op": op, "method": method, "variant": variant,
                         "median_ms": ms, "gbps": None if ms is None else 1000.0, "frac_copy_bw": frac,
                         "graph": variant.endswith("graph") if ms else None,
                         "note": None if ms else "RuntimeError: Cannot copy between CPU and CUDA tensors"})
    return rows


def _forward_rows():
    rows = []
    for M, variant in ((1, "graph"), (16, "graph"), (4096, "eager"), (16384, "eager")):
        for method, ms in (("ours", 0.5 * M / 1000 + 0.031), ("bnb_peft", 0.04 + M / 1000), ("bf16_linear", 0.02 + M / 4000)):
            rows.append({"bench": "forward", "device": "cuda", "shape": "4096x4096", "M": M, "r": 16, "method": method,
                         "variant": variant, "median_ms": ms, "floor_ms": 0.003 + M / 20000,
                         "route": ("triton-gemv" if M <= 16 else "dequant-cublas") if method == "ours" else None,
                         "ratio_vs_bf16_linear": 1.234 if method == "ours" else None,
                         "ratio_vs_bnb_peft": 0.567 if method == "ours" else None})
    return rows


def _training_rows():
    rows = []
    for M in (4096, 16384):
        for method, ms in (("ours", 1.0 * M / 4096), ("bnb_peft", 2.0 * M / 4096), ("bf16_lora_peft", 0.8 * M / 4096),
                           ("cublas_floor", 0.5 * M / 4096)):
            rows.append({"bench": "training", "device": "cuda", "shape": "4096x14336", "M": M, "r": 16,
                         "method": method, "variant": "eager", "median_ms": ms, "floor_ms": 0.4 * M / 4096,
                         "ratio_vs_cublas_floor": 2.0 if method == "ours" else None,
                         "ratio_vs_bf16_lora": 1.25 if method == "ours" else None,
                         "ratio_vs_bnb_peft": 0.5 if method == "ours" else None,
                         "peak_mem_mb": 321.0 if method == "ours" else None,
                         "total_mem_mb": {"ours": 400.0, "bf16_lora_peft": 900.0}.get(method)})
    return rows


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    harness.write_results("nf4_fake-gpu", _nf4_rows(), ENV, str(d), meta={"mode": "full", "copy_bw_gbps": 3026.0})
    harness.write_results("forward_fake-gpu_quick", _forward_rows(), ENV, str(d), meta={"mode": "quick"})
    harness.write_results("training_fake-gpu", _training_rows(), ENV, str(d), meta={"mode": "full"})
    harness.write_results("training_cpu", [dict(_training_rows()[0], device="cpu", median_ms=99.0)],
                          dict(ENV, device="cpu", gpu=None, key="cpu", cpu_model="x"), str(d), meta={"mode": "cpu"})
    return d


def test_summary_and_plots(results, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    res = report.main(["--results", str(results), "--out", str(out)])
    summary = (out / "SUMMARY.md").read_text()
    for name in ("nf4_fake-gpu", "forward_fake-gpu_quick", "training_fake-gpu", "training_cpu"):
        assert f"## {name}" in summary
    names = sorted(os.path.basename(p) for p in res["plots"])
    assert "nf4_fake-gpu.png" in names
    assert "forward_fake-gpu_quick_4096x4096.png" in names
    assert "training_fake-gpu_4096x14336.png" in names
    assert "training_cpu_4096x14336.png" in names
    for p in res["plots"]:
        assert os.path.getsize(p) > 1000 and open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"]({os.path.basename(p)})" in summary


def test_summary_without_plots(results, tmp_path):
    res = report.make_report(str(results), str(tmp_path / "o"), plots=False)
    assert res["plots"] == [] and os.path.exists(res["summary"])


README = """# proj

intro text

## Benchmarks
hand-written text stays
<!-- benchmarks:start -->
stale numbers 1.0 2.0
<!-- benchmarks:end -->
after the block
"""


def test_readme_rewrites_only_the_marked_block(results, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    report.main(["--results", str(results), "--readme", str(readme)])
    text = readme.read_text()
    head, rest = text.split("<!-- benchmarks:start -->\n")
    block, tail = rest.split("<!-- benchmarks:end -->\n")
    assert head == README.split("<!-- benchmarks:start -->\n")[0]
    assert tail == "after the block\n"
    assert "stale numbers" not in block
    # NF4 headline: graph times with the copy-bandwidth fraction; bitsandbytes' quantize eager
    assert "| 4096×4096 | 19.6 µs (0.71) | 18.7 µs (0.75) | 26.4 µs (0.53) | 33.2 µs (0.42) | 59.9 µs (0.23) " \
           "| 297 µs eager |" in block
    assert "3026 GB/s" in block
    # forward: M = 1/16 graph, M = 4096/16384 eager, ratios from the file
    assert "| 4096→4096 | 1 | triton-gemv | graph | 31.5 µs | 1.23× | 0.57× |" in block
    assert "| 4096→4096 | 16384 | dequant-cublas | eager | 8.22 ms | 1.23× | 0.57× |" in block
    # training
    assert "| 4096→14336 | 4096 | 16 | 1 ms | 2.00× | 1.25× | 0.50× | 400 vs 900 |" in block
    # one line per GPU result file; the CPU file is left out
    assert "- `nf4_fake-gpu`: Fake GPU 80GB, driver 999.1; torch 2.99" in block and "2026-11-23T12:00:00Z" in block
    assert "training_cpu" not in block
    # idempotent
    report.main(["--results", str(results), "--readme", str(readme)])
    assert readme.read_text() == text
    assert "no change" in capsys.readouterr().out


@pytest.mark.parametrize("body", ["# no markers\n", "<!-- benchmarks:end -->\n<!-- benchmarks:start -->\n",
                                  "<!-- benchmarks:start -->\n"])
def test_readme_without_markers_fails_clearly(results, tmp_path, capsys, body):
    readme = tmp_path / "README.md"
    readme.write_text(body)
    with pytest.raises(SystemExit) as e:
        report.main(["--results", str(results), "--readme", str(readme)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "<!-- benchmarks:start -->" in err and "<!-- benchmarks:end -->" in err
    assert readme.read_text() == body


def test_forward_table_names_a_forced_decode_variant():
    # a run made with LORA_KERNELS_GEMV_VARIANT set is an A/B of an opt-in kernel; the caption must say so
    doc = {"name": "forward_fake-gpu_decode_v9", "env": ENV, "rows": _forward_rows(), "meta": {"mode": "full"}}
    plain = report.forward_table(doc)[0]
    assert "forced" not in plain
    doc["meta"]["gemv_variant_forced"] = "4"
    forced = report.forward_table(doc)[0]
    assert "forced with LORA_KERNELS_GEMV_VARIANT=4" in forced and "not what the package picks by default" in forced
