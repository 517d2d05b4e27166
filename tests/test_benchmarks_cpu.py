"""The benchmark suite's CPU paths (harness, result files, report, bench_nf4 CPU mode), plus one small
GPU check of the CUDA timer (``-m gpu``)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from benchmarks import bench_nf4, harness, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lora_kernels_api():
    import lora_kernels as lk  # the package exists: a broken import must fail these tests

    return lk


def _fake_rows():
    rows = []
    for shape in ("64x128", "128x256"):
        for method, ms in (("ours-cuda", 0.5), ("bnb", 1.0)):
            rows.append(bench_nf4.new_row(bench="nf4", device="cuda", shape=shape, op="dequantize", method=method,
                                          variant="out", median_ms=ms, bytes_moved=10**6, check="exact"))
    bench_nf4._fill_derived(rows, bw=3e12)
    return rows


def test_env_info_names_machine_without_hostname():
    env = harness.env_info()
    for key in ("python", "torch", "cuda", "triton", "bitsandbytes", "peft", "device", "key", "cpu_model", "cpu_cores"):
        assert key in env
    if torch.cuda.is_available():
        assert env["device"] == "cuda" and env["gpu"] and env["sm_count"] > 0
    else:
        assert env["device"] == "cpu" and env["key"] == "cpu" and env["gpu"] is None
        assert "CPU-only" in env["note"]
    host = socket.gethostname()
    if len(host) >= 6:
        assert host not in json.dumps(env)
    assert "Machine:" in harness.env_header(env)


def test_time_cpu_quantiles_are_ordered():
    t = harness.time_cpu(lambda x: x.sum(), reps=7, warmup=1, inputs_sets=[(torch.ones(1000),), (torch.ones(10),)])
    assert set(harness.TIMING_KEYS) <= set(t)
    assert t["n_reps"] == 7 and t["n_sets"] == 2 and t["graph"] is False
    assert 0 < t["min_ms"] <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]


def test_write_results_json_and_markdown(tmp_path):
    env, rows = harness.env_info(), _fake_rows()
    jpath, mpath = harness.write_results("nf4_test", rows, env, str(tmp_path), meta={"copy_bw_gbps": 3000.0},
                                         columns=bench_nf4.MD_COLUMNS, notes=["a note"])
    doc = json.loads(open(jpath).read())
    assert doc["name"] == "nf4_test" and doc["env"]["torch"] == torch.__version__
    assert [list(r) for r in doc["rows"]] == [list(bench_nf4.ROW_KEYS)] * len(rows)  # stable keys, in order
    assert doc["rows"][0]["ratio_vs_bnb"] == pytest.approx(0.5)
    assert doc["rows"][0]["frac_copy_bw"] == pytest.approx(1e6 / 3e12 * 1e3 / 0.5)
    md = open(mpath).read()
    assert md.startswith("# nf4_test") and "**Machine:**" in md and "- a note" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(bench_nf4.MD_COLUMNS) + " |"
    assert len(table) == 2 + len(rows)
    assert harness.load_results(jpath)["rows"] == doc["rows"]


@pytest.mark.parametrize("with_matplotlib", [True, False], ids=["matplotlib", "no-matplotlib"])
def test_report_summary_and_plots(tmp_path, monkeypatch, with_matplotlib):
    if with_matplotlib:
        pytest.importorskip("matplotlib")
    else:
        monkeypatch.setattr(report, "_matplotlib", lambda: (None, "ImportError: no matplotlib"))
    harness.write_results("nf4_fake", _fake_rows(), harness.env_info(), str(tmp_path), meta={"copy_bw_gbps": 3000.0})
    (tmp_path / "broken.json").write_text("{not json")
    res = report.main(["--results", str(tmp_path)])
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "## nf4_fake" in summary and "broken.json: skipped" in summary
    if with_matplotlib:
        assert res["plots"] == [str(tmp_path / "nf4_fake.png")] and (tmp_path / "nf4_fake.png").stat().st_size > 0
    else:
        assert res["plots"] == [] and "matplotlib unavailable" in summary


def test_storage_bytes_matches_nf4weight():
    lk = _lora_kernels_api()
    for shape in [(64, 128), (3, 1000)]:
        q = lk.quantize_nf4(torch.randn(shape), blocksize=64, double_quant=True, backend="reference")
        assert bench_nf4.storage_bytes(shape[0] * shape[1]) == q.nbytes()


def test_parse_shapes():
    assert bench_nf4.parse_shapes("4096x4096, 64X128") == [(4096, 4096), (64, 128)]


def test_bench_nf4_cpu_mode_end_to_end(tmp_path):
    _lora_kernels_api()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), LORA_KERNELS_QUIET="1")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_nf4", "--cpu", "--shapes", "64x128,33x100",
                          "--reps", "2", "--backends", "reference", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "no GPU" in res.stdout or "CPU mode" in res.stdout
    assert "== short table" in res.stdout
    doc = json.loads((tmp_path / "nf4_cpu.json").read_text())
    assert doc["env"]["device"] == "cpu"
    methods = {(r["shape"], r["method"]) for r in doc["rows"]}
    assert ("64x128", "ours-reference") in methods and ("33x100", "ours-reference") in methods
    for r in doc["rows"]:
        assert list(r) == list(bench_nf4.ROW_KEYS)
        assert r["median_ms"] > 0 and r["bytes_moved"] == bench_nf4.quant_bytes(r["numel"])
    if bench_nf4.bnb_functional(torch.device("cpu"))[0] is not None:
        assert ("64x128", "bnb-cpu") in methods
        ours = [r for r in doc["rows"] if r["method"] == "ours-reference"]
        # bitsandbytes' CPU path may differ by one 8-bit code on a few absmax values (see nf4-format.md)
        assert all(isinstance(r["mismatch_packed"], int) and r["check"] != "error" for r in ours)
        assert all(r["ratio_vs_bnb"] > 0 for r in ours)
    assert (tmp_path / "nf4_cpu.md").read_text().count("| 64x128 |") >= 1


@pytest.mark.gpu
def test_time_cuda_rotation_graph_and_peak_memory():
    """The CUDA timer on a tiny op: plain and graph-replayed, and the memory/bandwidth helpers."""
    xs = [(torch.randn(1 << 20, device="cuda"),) for _ in range(3)]
    for use_graph in (False, True):
        t = harness.time_cuda(lambda x: x.mul(2.0), xs, warmup_ms=5, rep_ms=20, use_graph=use_graph)
        assert t["graph"] is use_graph and t["n_sets"] == 3 and t["n_reps"] >= 10
        assert 0 < t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] < 50
    assert harness.peak_memory(lambda: torch.empty(64 << 20, dtype=torch.uint8, device="cuda")) >= 64 << 20
    assert harness.sets_for_l2(1 << 20) >= 2
    assert harness.measure_copy_bandwidth(nbytes=256 << 20, rep_ms=20) > 1e11  # > 100 GB/s on any datacenter GPU


def test_bench_finetune_cpu_code_path(tmp_path):
    """bench_finetune's two arms on the CPU (demo model, two steps): same losses within bf16 noise."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from benchmarks import bench_finetune

    rows = bench_finetune.main(["--model", "demo", "--steps", "2", "--warmup", "1", "--cpu", "--batch", "2",
                                "--seq", "32", "--out", str(tmp_path)])
    by = {r["arm"]: r for r in rows}
    assert set(by) == {"peft_bnb", "ours"} and not by["ours"]["note"], rows
    assert by["ours"]["patched"] > 0 and by["ours"]["tokens_per_s"] > 0
    assert by["ours"]["max_rel_loss_diff"] < 1e-2, by["ours"]
    assert (tmp_path / "finetune_cpu_demo.json").exists()
