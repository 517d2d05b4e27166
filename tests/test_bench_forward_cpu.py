"""benchmarks/bench_forward.py without a GPU: the CPU mode writes valid result files with stable row
keys; the floor arithmetic on a hand-computed example; the GPU code path as a dry run on the CPU
(timers faked, the kernels replaced by the reference route) so its bookkeeping is tested too."""

import json
import math
import time
import types

import pytest
import torch

from benchmarks import bench_forward as bf
from benchmarks import harness


def _lk():
    import lora_kernels as lk  # the package exists: a broken import must fail these tests

    return lk


def test_floor_arithmetic_hand_computed():
    # Llama-3-8B q_proj, M = 16, r = 16
    M, K, N, r = 16, 4096, 4096, 16
    assert bf.forward_flops(M, K, N, None) == 2 * 16 * 4096 * 4096 == 536_870_912
    assert bf.forward_flops(M, K, N, r) == 536_870_912 + 2 * 16 * 16 * 8192 == 541_065_216
    # NF4 4096x4096 with double quant: packed 8 388 608 + absmax 262 144 + nested 1024*4 + code tables
    # 16*4 + 256*4 + offset 4 = 8 655 940 bytes = 4.127 bits/param
    q_bytes = 8_388_608 + 262_144 + 4_096 + 64 + 1_024 + 4
    assert q_bytes == 8_655_940 and round(8 * q_bytes / (K * N), 3) == 4.127
    x_y = 2 * 16 * 4096 * 2                   # x [16, 4096] + y [16, 4096], bf16
    adapters = 2 * 16 * (4096 + 4096)        # A [16, 4096] + B [4096, 16], bf16
    assert bf.forward_bytes(M, K, N, r, q_bytes) == q_bytes + x_y + adapters == 8_655_940 + 262_144 + 262_144
    assert bf.forward_bytes(M, K, N, None, 2 * K * N) == 33_554_432 + 262_144
    # 3.0 TB/s, 800 TFLOP/s: bytes win at M = 16 -> 9 180 228 / 3e12 s = 3.06 us
    assert bf.floor_ms(541_065_216, 9_180_228, 800e12, 3.0e12) == pytest.approx(9_180_228 / 3.0e12 * 1e3)
    assert bf.floor_ms(541_065_216, 9_180_228, 800e12, 3.0e12) == pytest.approx(0.003060076)
    # M = 4096, bf16 linear: FLOPs win -> 137 438 953 472 / 800e12 s = 171.8 us
    fl, by = bf.forward_flops(4096, K, N, None), bf.forward_bytes(4096, K, N, None, 2 * K * N)
    assert fl == 137_438_953_472 and by == 33_554_432 + 2 * 33_554_432
    assert bf.floor_ms(fl, by, 800e12, 3.0e12) == pytest.approx(0.17179869184)
    assert bf.floor_ms(fl, by, None, 3.0e12) == pytest.approx(by / 3.0e12 * 1e3)
    assert bf.floor_ms(fl, by, None, None) is None


def test_nbytes_of_our_nf4_weight_matches_the_floor_example():
    lk = _lk()
    q = lk.quantize_nf4(torch.randn(72, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    # packed 72*128/2 + absmax 144 (uint8) + nested ceil(144/256)=1 fp32 + NF4 code 16 fp32
    # + dynamic code 256 fp32 + offset fp32
    assert q.nbytes() == 4608 + 144 + 4 + 64 + 1024 + 4


def test_fill_derived_ratios_match_same_mode():
    rows = []
    for method, variant, graph, ms in (("ours", "eager", False, 0.2), ("ours", "graph", True, 0.05),
                                       ("bnb_peft", "eager", False, 0.4), ("bnb_peft", "graph", True, 0.1),
                                       ("bf16_linear", "eager", False, 0.1), ("bf16_linear", "graph", True, 0.025)):
        r = None if method == "bf16_linear" else 16
        rows.append(bf.new_row(shape="4096x4096", K=4096, N=4096, M=16, r=r, method=method, variant=variant,
                               graph=graph, median_ms=ms, flops=1e9, bytes=3e9))
    bf.fill_derived(rows, matmul_rate=1e15, copy_bw=3e12)
    by = {(r["method"], r["variant"]): r for r in rows}
    assert by["ours", "eager"]["ratio_vs_bf16_linear"] == pytest.approx(2.0)
    assert by["ours", "graph"]["ratio_vs_bf16_linear"] == pytest.approx(2.0)
    assert by["ours", "eager"]["ratio_vs_bnb_peft"] == pytest.approx(0.5)
    assert by["ours", "graph"]["ratio_vs_bnb_peft"] == pytest.approx(0.5)
    assert by["bf16_linear", "eager"]["ratio_vs_bf16_linear"] is None
    assert by["ours", "eager"]["floor_ms"] == pytest.approx(1.0)  # 3e9 B / 3e12 B/s > 1e9 / 1e15
    assert by["ours", "graph"]["frac_floor"] == pytest.approx(20.0)
    assert by["ours", "eager"]["tflops"] == pytest.approx(1e9 / 0.2e-3 / 1e12)


def test_config_str_is_compact_and_distinct():
    from lora_kernels.triton.nf4_lora_matmul import candidate_configs

    for M in (1, 16, 4096):
        cfgs = candidate_configs(M, 4096, 4096, (9, 0))
        names = [bf.config_str(c) for c in cfgs]
        assert len(set(names)) == len(names) and all(len(n) < 64 and " " not in n for n in names)


def test_cli_parsing():
    args = bf.build_parser().parse_args(["--shapes", "4096x14336,8192x28672", "--ms", "1,16", "--ranks", "8,16",
                                         "--methods", "ours,bf16_linear", "--quick", "--sweep"])
    assert args.shapes == [(4096, 14336), (8192, 28672)] and args.ms == [1, 16] and args.ranks == [8, 16]
    assert args.methods == ["ours", "bf16_linear"] and args.quick and args.sweep
    assert args.warmup_ms == 10.0 and args.rep_ms == 50.0
    assert bf.result_name({"key": "nvidia-h100"}, True, True) == "forward_nvidia-h100_quick_sweep"
    assert bf.result_name({"key": "nvidia-h100"}, False, False) == "forward_nvidia-h100"
    with pytest.raises(SystemExit):
        bf.build_parser().parse_args(["--methods", "ours,cublas"])
    with pytest.raises(SystemExit):
        bf.build_parser().parse_args(["--shapes", "4096"])


def test_cpu_mode_writes_json_and_markdown(tmp_path, capsys):
    _lk()
    rows = bf.main(["--cpu", "--out", str(tmp_path), "--reps", "2"])
    out = capsys.readouterr().out
    assert "no GPU" in out and "short table" in out
    doc = json.loads((tmp_path / "forward_cpu.json").read_text())
    assert doc["name"] == "forward_cpu" and doc["env"]["key"] == "cpu" and doc["meta"]["mode"] == "cpu"
    assert [list(r) for r in doc["rows"]] == [list(bf.ROW_KEYS)] * len(doc["rows"])  # stable keys, in order
    assert [(r["shape"], r["M"], r["method"], r["route"]) for r in doc["rows"]] == \
        [("128x72", 1, "ours", "reference"), ("128x72", 33, "ours", "reference")]
    for r in doc["rows"]:
        assert r["median_ms"] > 0 and r["note"] is None
        assert 0 <= r["rel_err"] < 1e-2 and 0 < r["rel_err_bf16_torch"] < 5e-2
        assert r["floor_ms"] > 0 and r["frac_floor"] == pytest.approx(r["floor_ms"] / r["median_ms"])
        assert r["flops"] == bf.forward_flops(r["M"], 128, 72, 16)
    assert len(rows) == len(doc["rows"])
    md = (tmp_path / "forward_cpu.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert md.startswith("# forward_cpu") and "**Machine:**" in md
    assert table[0] == "| " + " | ".join(bf.MD_COLUMNS) + " |" and len(table) == 2 + len(doc["rows"])


def _fake_time_cuda(fn, inputs_sets, warmup_ms=0.0, rep_ms=0.0, use_graph=False, **_):
    sets = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in inputs_sets]
    t = []
    for s in sets:
        t0 = time.perf_counter()
        fn(*s)
        t.append((time.perf_counter() - t0) * 1e3)
    return harness._summary(t, len(sets), use_graph)


def test_gpu_code_path_dry_run_on_cpu(tmp_path, monkeypatch):
    """run_gpu on the CPU: fake timers and floors, a tiny L2, the kernels routed to the reference
    (forward_route claims the Triton routes so the sweep bookkeeping runs).  bnb_peft /
    bf16_lora_peft run through bitsandbytes' CPU path and PEFT where installed, else are noted."""
    lk = _lk()
    monkeypatch.setattr(harness, "time_cuda", _fake_time_cuda)
    monkeypatch.setattr(harness, "peak_memory", lambda fn, *a: (fn(*a), 1024)[1])
    monkeypatch.setattr(harness, "measure_copy_bandwidth", lambda **k: 3e12)
    monkeypatch.setattr(harness, "measure_bf16_matmul_rate", lambda **k: 8e14)
    monkeypatch.setattr(harness, "l2_bytes", lambda device=None: 16 * 1024)  # 2x L2 = 32 KiB
    fake = types.SimpleNamespace(
        quantize_nf4=lk.quantize_nf4,
        forward_route=lambda M, q, dt, dev, r=0: "triton-gemv" if M <= 16 else "triton-tiled",
        lora_linear=lambda x, q, A, B, s, config=None: lk.lora_linear(x, q, A, B, s, route="reference"),
    )
    args = bf.build_parser().parse_args(["--shapes", "128x64,256x256", "--ms", "1,32", "--sweep",
                                         "--out", str(tmp_path)])
    env = dict(harness.env_info(), key="dryrun")
    rows, meta, notes = bf.run_gpu(args, fake, env, time.perf_counter(), device="cpu")
    assert all(list(r) == list(bf.ROW_KEYS) for r in rows)
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["M"], r["method"]), []).append(r)
    # ours: eager + graph for M <= 16, eager only above; the check on every ours row
    assert [r["variant"] for r in by["128x64", 1, "ours"]] == ["eager", "graph"]
    assert [r["variant"] for r in by["128x64", 32, "ours"]] == ["eager"]
    for r in by["128x64", 1, "ours"] + by["256x256", 32, "ours"]:
        assert r["median_ms"] is not None and r["rel_err"] < 1e-2 and r["err_ratio"] is not None, r
        assert r["route"] in ("triton-gemv", "triton-tiled") and r["floor_ms"] > 0
    # bf16_linear, and the ratios against it
    assert [r["variant"] for r in by["128x64", 1, "bf16_linear"]] == ["eager", "graph"]
    assert by["128x64", 1, "ours"][1]["ratio_vs_bf16_linear"] == pytest.approx(
        by["128x64", 1, "ours"][1]["median_ms"] / by["128x64", 1, "bf16_linear"][1]["median_ms"])
    # rotation: the small weight is replicated, the 256x256 one (bf16 128 KiB, NF4 33 KiB > 32 KiB) is not
    assert by["128x64", 1, "ours"][0]["n_weights"] > 1 and by["128x64", 1, "ours"][0]["n_sets"] > 1
    assert by["256x256", 1, "ours"][0]["n_weights"] == 1 and by["256x256", 1, "bf16_linear"][0]["n_weights"] == 1
    assert any(n.startswith("256x256: the NF4 weight") for n in notes)
    assert any(n.startswith("256x256: the bf16 weight") for n in notes)
    # sweep: one row per candidate config, the first the default, a best-config line per (shape, M)
    sweep = by["128x64", 1, "ours-sweep"]
    assert len(sweep) >= 5 and sweep[0]["note"] == "default" and all(r["config"] for r in sweep)
    assert all(r["graph"] for r in sweep) and not any(r["graph"] for r in by["128x64", 32, "ours-sweep"])
    assert sum(n.startswith("best config") for n in notes) == 4
    # the PEFT baselines: timed where bitsandbytes + peft work here, a note where not
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        have = True
    except Exception:
        have = False
    if have:
        b = by["128x64", 1, "bnb_peft"]
        assert [r["variant"] for r in b] == ["eager", "graph"] and b[0]["median_ms"] is not None, b
        assert b[0]["rel_err"] < 2e-2  # bitsandbytes' CPU path on its own quantization of the same W
        assert by["128x64", 1, "ours"][0]["ratio_vs_bnb_peft"] is not None
        assert by["128x64", 32, "bf16_lora_peft"][0]["median_ms"] is not None
        assert any("lora.bnb" in n or "Linear4bit" in n for n in notes)
    else:
        assert any(n.startswith("bnb_peft skipped") for n in notes)
    # results were written after each shape, and the short table has one line per (shape, M, method, variant)
    doc = json.loads((tmp_path / "forward_dryrun_sweep.json").read_text())
    assert len(doc["rows"]) == len(rows) and doc["meta"]["mode"] == "full+sweep"
    table = bf.short_table(rows).splitlines()
    n_plain = sum(r["method"] != "ours-sweep" for r in rows)
    assert len(table) == 2 + n_plain + 4  # + one sweep-best line per (shape, M)
    assert not any(math.isnan(r["median_ms"]) for r in rows if r["median_ms"] is not None)
