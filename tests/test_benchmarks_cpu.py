"""The benchmark suite's CPU paths (harness, result files, report, bench_nf4 CPU mode; benchmarks.suite: its
CPU path, its plans against issue 6, the stage time bookkeeping), plus one small GPU check of the CUDA
timer (``-m gpu``)."""

import json
import os
import socket
import subprocess
import sys
import time

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
    """bench_finetune's three arms on the CPU (demo model, two steps): same losses within bf16 noise."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from benchmarks import bench_finetune

    rows = bench_finetune.main(["--model", "demo", "--steps", "2", "--warmup", "1", "--cpu", "--batch", "2",
                                "--seq", "32", "--out", str(tmp_path)])
    by = {r["arm"]: r for r in rows}
    assert set(by) == {"peft_bnb", "ours", "ours_fused"} and not by["ours"]["note"], rows
    assert not by["ours_fused"]["note"], rows
    for arm in ("ours", "ours_fused"):
        assert by[arm]["patched"] > 0 and by[arm]["tokens_per_s"] > 0
        assert by[arm]["max_rel_loss_diff"] < 1e-2, by[arm]
    assert by["ours_fused"]["model_kernels"].startswith("rms_norm:"), by["ours_fused"]
    assert (tmp_path / "finetune_cpu_demo.json").exists()


def test_bench_finetune_compiled_cpu_code_path(tmp_path):
    """--compile: our arm traced by torch.compile (the aot_eager backend here: dynamo + AOT autograd
    through the registered ops, no code generation) trains with the eager arm's losses, with the fused
    AdamW and reduce-overhead's per-step bookkeeping too."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from benchmarks import bench_finetune

    common = ["--model", "demo", "--steps", "2", "--warmup", "1", "--cpu", "--batch", "2", "--seq", "32",
              "--arms", "ours"]
    eager = bench_finetune.main(common + ["--out", str(tmp_path / "eager")])[0]
    # the graph-replay step's bookkeeping (step marker, loss copied out) and the fused AdamW run here too;
    # aot_eager ignores the mode (no CUDA graphs on the CPU)
    compiled = bench_finetune.main(common + ["--compile", "aot_eager", "--compile-mode", "reduce-overhead",
                                             "--optim", "fused", "--out", str(tmp_path)])[0]
    assert not compiled["note"] and compiled["compiled"] == "aot_eager/reduce-overhead", compiled
    assert compiled["optim"] == "fused" and eager["optim"] == "foreach", (compiled, eager)
    assert max(abs(a - b) / abs(b) for a, b in zip(compiled["losses"], eager["losses"])) < 1e-2, (compiled, eager)
    assert (tmp_path / "finetune_cpu_demo_compiled_reduce_overhead_fusedadamw.json").exists()


def test_bench_finetune_writes_each_arm_as_it_finishes(tmp_path, monkeypatch):
    """A run cut short (the device's per-command time limit, here a KeyboardInterrupt in the second
    arm) leaves a results file with the arms that finished, marked partial."""
    pytest.importorskip("transformers")
    from benchmarks import bench_finetune

    def fake_arm(arm, cfg, vocab, batches, args, device):
        if arm == "peft_bnb":
            raise KeyboardInterrupt
        return dict(bench="finetune", model=args.model, arm=arm, tokens_per_s=123.0, peak_mem_mb=None,
                    losses=[3.0, 2.5], loss_first=3.0, loss_last=2.5, warmup_s=0.5)

    monkeypatch.setattr(bench_finetune, "run_arm", fake_arm)
    with pytest.raises(KeyboardInterrupt):
        bench_finetune.main(["--model", "demo", "--steps", "2", "--warmup", "1", "--cpu", "--arms", "ours,peft_bnb",
                             "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "finetune_cpu_demo.json").read_text())
    assert [(r["arm"], r["tokens_per_s"], r["warmup_s"]) for r in doc["rows"]] == [("ours", 123.0, 0.5)], doc["rows"]
    text = (tmp_path / "finetune_cpu_demo.md").read_text()
    assert "partial: 1 of the 2 arms requested (ours,peft_bnb)" in text, text


# ------------------------------------------------------------------------------------ the suite (issue 6)
def test_suite_cpu_path_runs_and_exits_0(tmp_path, monkeypatch, capsys):
    """Without a GPU (or with --cpu) the suite says so, runs only the CPU quantizer bench, writes
    suite_cpu.json/.md/.log with the stage's wall time, and exits 0."""
    from benchmarks import suite

    _lora_kernels_api()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the stage runs as it would from a shell
    argv = ["--cpu-shapes", "64x128", "--out", str(tmp_path)] + (["--cpu"] if torch.cuda.is_available() else [])
    rc = suite.main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out + (tmp_path / "suite_cpu.log").read_text()[-3000:]
    assert "no CUDA GPU found" in out or "CPU mode requested" in out
    assert "only the CPU quantizer bench" in out
    doc = json.loads((tmp_path / "suite_cpu.json").read_text())
    assert [(r["stage"], r["status"]) for r in doc["rows"]] == [("nf4_cpu", "ok")]
    assert all(r["wall_s"] > 0 and r["allowance_s"] >= r["wall_s"] for r in doc["rows"])
    assert doc["meta"]["mode"] == "cpu" and doc["meta"]["within_budget"] is True and doc["meta"]["wall_s"] > 0
    assert doc["rows"][0]["files"] == "nf4_cpu_quick.json"
    assert (tmp_path / "nf4_cpu_quick.json").exists() and (tmp_path / "nf4_cpu_quick.md").exists()
    md = (tmp_path / "suite_cpu.md").read_text()
    assert "| nf4_cpu |" in md and "## NF4 quantize / dequantize" in md and "| 64×128 | quantize |" in md
    assert "=== suite: stage nf4_cpu ok" in (tmp_path / "suite_cpu.log").read_text()


_CPU_ENV = {"device": "cpu", "gpu": None, "key": "cpu", "cpu_model": "test", "cpu_cores": 1, "torch_threads": 1,
            "torch": torch.__version__, "time_utc": "2026-11-23T12:00:00Z"}


def _suite_stages(quick):
    from benchmarks import suite

    return {s.name: s for s in suite.gpu_plan(quick)}


def test_suite_full_plan_covers_the_issue():
    from benchmarks import suite

    st = _suite_stages(False)
    assert list(st) == ["nf4", "forward", "training", "forward_ranks", "training_ranks", "report"]
    llama8b = {(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)}
    qwen = {(3584, 3584), (3584, 512), (3584, 18944), (18944, 3584)}
    llama70b = {(8192, 28672), (28672, 8192)}
    assert set(suite.MISTRAL_7B.values()) == llama8b  # Mistral-7B is not re-timed: said in the output
    assert "Mistral-7B" in suite.MISTRAL_NOTE and "not timed twice" in suite.MISTRAL_NOTE
    assert suite.model_of(4096, 1024) == "Llama-3-8B/Mistral-7B k_proj/v_proj"
    for name in ("forward", "training"):
        assert set(st[name].spec["shapes"]) == llama8b | qwen | llama70b, name
        assert st[name].spec["ranks"] == [16]
    fwd, tr = st["forward"].spec, st["training"].spec
    assert fwd["ms"][0] == 1 and fwd["ms"][-1] == 16384 and len(fwd["ms"]) >= 5
    assert set(fwd["methods"]) == {"ours", "bnb_peft", "bf16_linear", "bf16_lora_peft"}
    assert set(tr["methods"]) == {"ours", "bnb_peft", "bf16_lora_peft", "cublas_floor"}
    assert set(tr["directions"]) == {"step", "fwd", "bwd"} and max(tr["ms"]) == 16384
    ranks = {r for s in st.values() for r in s.spec.get("ranks") or ()}
    assert ranks == {8, 16, 64}
    assert set(st["training_ranks"].spec["directions"]) == {"step", "fwd", "bwd"}
    # nf4: every distinct weight size of those layers (N x K; a transposed weight moves the same bytes)
    sizes = {k * n for k, n in llama8b | qwen | llama70b}
    assert {n * k for n, k in st["nf4"].spec["shapes"]} == sizes
    # it fits: the estimate leaves room in the 540 s budget, and every stage's command parses
    total = sum(s.est_s for s in st.values())
    assert total <= suite.FULL_BUDGET_S - suite.MARGIN_S, total
    _check_argv_parse(st.values())


def test_suite_quick_plan_is_small_and_fits():
    from benchmarks import suite

    st = _suite_stages(True)
    assert list(st) == ["nf4", "forward", "training", "report"]
    assert st["nf4"].spec["shapes"] == [(4096, 4096)]
    assert st["forward"].spec["ms"] == [1, 4096] and st["training"].spec["ms"] == [4096]
    for name in ("forward", "training"):
        assert st[name].spec["shapes"] == [(4096, 4096)]
        assert st[name].spec["ranks"] == [16] and "--quick" in st[name].argv
    assert set(st["training"].spec["directions"]) == {"step", "fwd", "bwd"}
    assert sum(s.est_s for s in st.values()) <= suite.QUICK_BUDGET_S - suite.MARGIN_S
    _check_argv_parse(st.values())


def _check_argv_parse(stages):
    from benchmarks import bench_forward, bench_training

    parsers = {"benchmarks.bench_nf4": bench_nf4.build_parser(),
               "benchmarks.bench_forward": bench_forward.build_parser(),
               "benchmarks.bench_training": bench_training.build_parser()}
    for s in stages:
        assert s.argv[:2] == [sys.executable, "-m"]
        if s.argv[2] in parsers:
            args = parsers[s.argv[2]].parse_args(s.argv[3:])
            if s.spec.get("tag"):
                assert args.tag == s.spec["tag"]
        else:
            assert s.argv[2] == "benchmarks.report"


def test_suite_cuts_a_stage_that_overruns(tmp_path):
    """A fake stage that sleeps past its allowance is stopped (with its process group) and noted; the next runs."""
    from benchmarks import suite

    assert suite.allowance(100.0, 10.0, 30.0) == 20.0           # capped at 2x its estimate
    assert suite.allowance(25.0, 10.0, 10.0) == 15.0            # the later stages' reserve is held back
    assert suite.allowance(5.0, 10.0, 10.0) == 0.0
    marker = tmp_path / "child_still_running"
    (tmp_path / "child.py").write_text(f"import time\ntime.sleep(2.5)\nopen({str(marker)!r}, 'w').close()\n")
    (tmp_path / "sleeper.py").write_text("import subprocess, sys, time\n"
                                         f"subprocess.Popen([sys.executable, {str(tmp_path / 'child.py')!r}])\n"
                                         "time.sleep(30)\n")
    stages = [suite.Stage("sleepy", "sleeps 30 s", [sys.executable, str(tmp_path / "sleeper.py")], est_s=0.5),
              suite.Stage("quick", "exits at once", [sys.executable, "-c", "print('fine')"], est_s=1.0)]
    said = []
    t0 = time.monotonic()
    with open(tmp_path / "suite.log", "w") as log:
        rows = suite.run_stages(stages, budget_s=20.0, out=str(tmp_path), log=log, min_stage_s=0.5, margin_s=0.0,
                                say=said.append)
    took = time.monotonic() - t0
    assert [r["status"] for r in rows] == ["cut", "ok"], rows
    assert rows[0]["allowance_s"] == pytest.approx(1.0, abs=0.05) and 0.9 < rows[0]["wall_s"] < 7.0
    assert "cut at its 1 s allowance" in rows[0]["note"] and took < 10
    text = (tmp_path / "suite.log").read_text()
    assert "stage sleepy CUT after" in text and "fine" in text and any("sleepy: cut" in s for s in said)
    time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))
    assert not marker.exists()  # the stage's own child went with it (its process group was stopped)
    # a stage left with less than min_stage_s is skipped, not started
    with open(tmp_path / "suite2.log", "w") as log:
        rows = suite.run_stages(stages[1:], budget_s=0.2, out=str(tmp_path), log=log, min_stage_s=0.5, margin_s=0.0,
                                say=said.append)
    assert rows[0]["status"] == "skipped" and rows[0]["wall_s"] == 0.0


def test_suite_staged_results_are_renamed(tmp_path):
    from benchmarks import suite

    staging = tmp_path / ".staging_nf4"
    harness.write_results("nf4_fake-gpu", _fake_rows(), dict(_CPU_ENV, key="fake-gpu"), str(staging))
    (tmp_path / "nf4_fake-gpu.json").write_text("{\"kept\": true}")  # a hand-run file of the same name stays
    got = suite.collect_staged(str(staging), str(tmp_path), {"nf4_fake-gpu": "nf4_fake-gpu_suite"})
    assert got == ["nf4_fake-gpu_suite.json"] and not staging.exists()
    assert json.loads((tmp_path / "nf4_fake-gpu_suite.json").read_text())["name"] == "nf4_fake-gpu_suite"
    assert (tmp_path / "nf4_fake-gpu_suite.md").read_text().startswith("# nf4_fake-gpu_suite\n")
    assert json.loads((tmp_path / "nf4_fake-gpu.json").read_text()) == {"kept": True}


def _fwd_train_docs():
    from benchmarks import bench_forward as bf
    from benchmarks import bench_training as bt

    fwd, tr = [], []
    for r in (8, 16):
        for M in (1, 4096):
            for method in ("ours", "bnb_peft", "bf16_linear", "bf16_lora_peft"):
                for variant in (("graph", "eager") if M == 1 and method != "bf16_lora_peft" else ("eager",)):
                    if method == "bf16_linear" and r != 8:
                        continue
                    fwd.append(bf.new_row(bench="forward", device="cuda", shape="4096x1024", K=4096, N=1024, M=M,
                                          r=None if method == "bf16_linear" else r, method=method, variant=variant,
                                          graph=variant == "graph", median_ms=0.01 * M ** 0.5 + 0.02,
                                          floor_ms=0.003 * M ** 0.5,
                                          route=(("cuda-gemv" if M == 1 else "merge-cublas") if method == "ours"
                                                 else None)))
            for d in ("fwd+bwd", "fwd", "bwd"):
                for method in ("ours", "bnb_peft", "bf16_lora_peft", "cublas_floor"):
                    if method == "cublas_floor" and r != 8:
                        continue
                    tr.append(bt.new_row(bench="training", device="cuda", shape="4096x1024", K=4096, N=1024, M=M,
                                         r=None if method == "cublas_floor" else r, method=method, variant="eager",
                                         direction=d, median_ms=0.1 * M ** 0.5 + 1, floor_ms=0.05 * M ** 0.5,
                                         route="merge-cublas" if method == "ours" else None))
    bt.fill_derived(tr, 8e14, 3e12)
    env = {"device": "cuda", "gpu": "Fake GPU", "key": "fake-gpu", "compute_capability": "9.0", "sm_count": 132,
           "gpu_memory_gb": 80.0, "driver": "1", "torch": "2.99", "time_utc": "2026-11-23T12:00:00Z"}
    return ({"name": "forward_fake-gpu_suite", "env": env, "meta": {"mode": "full"}, "rows": fwd},
            {"name": "training_fake-gpu_suite", "env": env, "meta": {"mode": "full"}, "rows": tr})


def test_suite_side_by_side_tables():
    from benchmarks import suite

    fwd, tr = _fwd_train_docs()
    f = suite.forward_table([fwd])
    assert f[0].startswith("| layer K→N | model | M | r | timing | ours | bnb+PEFT | bf16 cuBLAS")
    # per rank: M = 1 graph + eager, M = 4096 eager; the rank-free F.linear appears on every rank's line
    assert len(f) == 2 + 2 * 3
    line = next(x for x in f if x.startswith("| 4096→1024 | Llama-3-8B/Mistral-7B k_proj/v_proj | 1 | 16 | graph |"))
    assert line.count("30.0 µs") == 3 and "cuda-gemv" in line  # ours, bnb, F.linear at M = 1
    t = suite.training_table([tr])
    assert len(t) == 2 + 2 * 2 * 3
    line = next(x for x in t if "| 4096 | 16 | bwd |" in x)
    assert "merge-cublas" in line and line.count("7.4 ms") == 4 and line.endswith("| 1.00× | 1.00× | 1.00× |")


def test_report_plots_training_directions_and_forward_ranks(tmp_path):
    pytest.importorskip("matplotlib")
    fwd, tr = _fwd_train_docs()
    for d in (fwd, tr):
        harness.write_results(d["name"], d["rows"], d["env"], str(tmp_path), meta=d["meta"])
    res = report.make_report(str(tmp_path), plots=True)
    names = sorted(os.path.basename(p) for p in res["plots"])
    assert names == ["forward_fake-gpu_suite_4096x1024.png", "training_fake-gpu_suite_4096x1024.png"]
    # the README block: the training table keeps to the whole step (fwd+bwd), the forward table to r = 16
    block = report.readme_block(str(tmp_path))
    assert block.count("| 4096→1024 | 4096 | 8 |") == 1 and block.count("| 4096→1024 | 4096 | 16 |") == 1
    assert block.count("| 4096→1024 | 4096 | merge-cublas | eager |") == 1


def _fake_gpu_timers(monkeypatch, fake_time_cuda):
    """bench_training's GPU mode on the CPU: ``fake_time_cuda`` for harness.time_cuda, each memory probe
    runs the step once and reports 1 MiB, fixed bandwidth / matmul rate / L2 size."""
    monkeypatch.setattr(harness, "time_cuda", fake_time_cuda)
    monkeypatch.setattr(harness, "peak_memory", lambda fn, *a: (fn(*a), 2**20)[1])
    monkeypatch.setattr(harness, "largest_allocation", lambda fn, *a: (fn(*a), 2**20)[1])
    monkeypatch.setattr(harness, "measure_copy_bandwidth", lambda **k: 3e12)
    monkeypatch.setattr(harness, "measure_bf16_matmul_rate", lambda **k: 8e14)
    monkeypatch.setattr(harness, "l2_bytes", lambda device=None: 16 * 1024)


def test_bench_training_directions_dry_run(tmp_path, monkeypatch):
    """bench_training --directions step,fwd,bwd on the CPU (timers faked): each method gets three rows; the
    backward row times autograd.grad(retain_graph=True) on a stored forward; the cuBLAS pair is timed once."""
    import time as _time

    import lora_kernels as lk
    from benchmarks import bench_training as bt

    timed = []

    def fake_time_cuda(fn, inputs_sets, warmup_ms=0.0, rep_ms=0.0, use_graph=False, **_):
        sets = [tuple(s) for s in inputs_sets]
        t = []
        for s in sets + sets:  # each stored forward differentiated twice: needs retain_graph
            t0 = _time.perf_counter()
            fn(*s)
            t.append((_time.perf_counter() - t0) * 1e3)
        timed.append(fn)
        return harness._summary(t, len(sets), use_graph)

    _fake_gpu_timers(monkeypatch, fake_time_cuda)
    args = bt.build_parser().parse_args(["--shapes", "128x64", "--ms", "32", "--ranks", "16,8", "--directions",
                                         "step,fwd,bwd", "--methods", "ours,cublas_floor", "--tag", "dry",
                                         "--out", str(tmp_path)])
    rows, meta, notes = bt.run_gpu(args, lk, dict(_CPU_ENV, key="dryrun"), _time.perf_counter(), device="cpu")
    by = {(r["method"], r["r"], r["direction"]): r for r in rows}
    assert set(by) == {("ours", r, d) for r in (16, 8) for d in ("fwd+bwd", "fwd", "bwd")} | \
        {("cublas_floor", None, d) for d in ("fwd+bwd", "fwd", "bwd")}
    assert sum(fn is bt.grad_retained for fn in timed) == 2 and bt.cublas_bwd in timed
    M, K, N, r = 32, 128, 64, 16
    o = {d: by["ours", r, d] for d in ("fwd+bwd", "fwd", "bwd")}
    assert o["fwd"]["flops"] + o["bwd"]["flops"] == o["fwd+bwd"]["flops"] == bt.training_flops(M, K, N, r)
    assert o["fwd"]["bytes"] + o["bwd"]["bytes"] == o["fwd+bwd"]["bytes"]
    assert o["fwd"]["route"] == "reference" and o["bwd"]["route"] == "reference"
    assert o["bwd"]["err_ratio"] is not None and o["fwd"]["err_ratio"] is None
    for d in ("fwd", "bwd"):  # each direction is compared with the cuBLAS matmul of that direction
        cub = by["cublas_floor", None, d]
        assert o[d]["ratio_vs_cublas_floor"] == pytest.approx(o[d]["median_ms"] / cub["median_ms"])
    assert by["ours", 8, "bwd"]["ratio_vs_cublas_floor"] is not None
    assert (tmp_path / "training_dryrun_dry.json").exists() and meta["directions"] == "fwd+bwd,fwd,bwd"


def test_bench_training_graph_mode_dry_run(tmp_path, monkeypatch):
    """bench_training --graph: every row is timed with use_graph=True; a row whose capture fails is
    re-timed eagerly and says so (graph False, a note); the meta and the first note name the mode, and
    the README table says "CUDA-graph replay" and marks the eager row."""
    import time as _time

    import lora_kernels as lk
    from benchmarks import bench_training as bt
    from benchmarks import report

    calls = []

    def fake_time_cuda(fn, inputs_sets, warmup_ms=0.0, rep_ms=0.0, use_graph=False, **_):
        calls.append((fn, use_graph))
        if use_graph and fn is bt.cublas_bwd:
            raise RuntimeError("operation not permitted when stream is capturing")
        sets = [tuple(s) for s in inputs_sets]
        for s in sets:
            fn(*s)
        return harness._summary([1.0, 1.0, 1.0], len(sets), use_graph)

    _fake_gpu_timers(monkeypatch, fake_time_cuda)
    args = bt.build_parser().parse_args(["--shapes", "128x64", "--ms", "32", "--ranks", "16", "--directions",
                                         "step,bwd", "--methods", "ours,cublas_floor", "--graph", "--tag", "g",
                                         "--out", str(tmp_path)])
    rows, meta, notes = bt.run_gpu(args, lk, dict(_CPU_ENV, key="dryrun"), _time.perf_counter(), device="cpu")
    assert meta["timing"] == "graph" and "CUDA-graph replay" in notes[0]
    by = {(r["method"], r["direction"]): r for r in rows}
    failed = by["cublas_floor", "bwd"]
    assert failed["graph"] is False and "capture failed" in failed["note"] and failed["median_ms"] == 1.0
    assert all(r["graph"] is True for k, r in by.items() if k != ("cublas_floor", "bwd"))
    assert (bt.cublas_bwd, True) in calls and (bt.cublas_bwd, False) in calls
    assert all(g for fn, g in calls if fn is not bt.cublas_bwd)
    doc = {"name": "training_dryrun_g", "env": {"gpu": "dry"}, "meta": meta, "rows": rows}
    table = "\n".join(report.training_table(doc))
    assert "; CUDA-graph replay) on dry" in table and "(eager: no capture)" not in table
    rows[[i for i, r in enumerate(rows) if r["method"] == "ours" and r["direction"] == "fwd+bwd"][0]]["graph"] = False
    table = "\n".join(report.training_table(doc))
    assert "(eager: no capture)" in table and "Timed eagerly" in table and "ours on 128→64 M = 32" in table
    meta["timing"] = "eager"
    assert "; eager) on dry" in "\n".join(report.training_table(doc))
