"""benchmarks/bench_training.py without a GPU: the CPU mode writes valid result files; the training
step's floor arithmetic on a hand-computed example; the ratios; the GPU code path as a dry run on the
CPU (timers and floors faked) so its bookkeeping is tested too."""

import json
import time

import pytest
import torch

from benchmarks import bench_training as bt
from benchmarks import harness


def test_training_floor_arithmetic_hand_computed():
    # Llama-3-8B q_proj, M = 4096, r = 16
    M, K, N, r = 4096, 4096, 4096, 16
    # forward x·Wᵀ + backward dY·W: 2 x 2·4096³ = 274 877 906 944
    assert bt.training_flops(M, K, N, None) == 4 * 4096**3 == 274_877_906_944
    # LoRA: forward x·Aᵀ (2MrK), ·Bᵀ (2MrN); backward dB (2MNr), dY·B (2MNr), dA (2MrK), dX += ·A (2MrK)
    lora = 2 * M * r * K + 2 * M * r * N + 2 * M * N * r + 2 * M * N * r + 2 * M * r * K + 2 * M * r * K
    assert lora == 6 * M * r * (K + N) == 3_221_225_472
    assert bt.training_flops(M, K, N, r) == 274_877_906_944 + 3_221_225_472 == 278_099_132_416
    # bytes: NF4 weight read twice (8 655 940 B each) + x, y, g, dX bf16 (4 x 32 MiB)
    # + A [16, 4096] and B [4096, 16] read and dA, dB written, bf16: 2 x 2 x 16 x 8192
    q_bytes = 8_655_940
    act = 4 * 2 * 4096 * 4096
    ad = 2 * 2 * 16 * 8192
    assert act == 134_217_728 and ad == 524_288
    assert bt.training_bytes(M, K, N, r, q_bytes) == 2 * q_bytes + act + ad == 152_053_896
    assert bt.training_bytes(M, K, N, None, 2 * K * N) == 2 * 33_554_432 + act == 201_326_592
    # at 800 TFLOP/s and 3.0 TB/s the FLOPs win: 278 099 132 416 / 8e14 s = 347.6 us
    assert bt.bf.floor_ms(bt.training_flops(M, K, N, r), 152_053_896, 8e14, 3e12) == pytest.approx(0.34762391552)
    # M = 16 (not a training size, but the byte floor wins there): 2 x 8 655 940 + 4·2·16·4096 + ad
    b16 = bt.training_bytes(16, K, N, r, q_bytes)
    assert b16 == 17_311_880 + 524_288 + 524_288 == 18_360_456
    assert bt.bf.floor_ms(bt.training_flops(16, K, N, r), b16, 8e14, 3e12) == pytest.approx(18_360_456 / 3e12 * 1e3)


def test_fill_derived_ratios_same_shape_m_r():
    rows = [bt.new_row(shape="64x64", K=64, N=64, M=4096, r=16, method=m, median_ms=ms, flops=8e11, bytes=3e9)
            for m, ms in (("ours", 2.0), ("bnb_peft", 4.0), ("bf16_lora_peft", 1.0), ("cublas_floor", 0.5))]
    rows.append(bt.new_row(shape="64x64", K=64, N=64, M=16384, r=16, method="ours", median_ms=3.0, flops=1, bytes=1))
    bt.fill_derived(rows, matmul_rate=8e14, copy_bw=3e12)
    ours = rows[0]
    assert ours["ratio_vs_cublas_floor"] == pytest.approx(4.0)
    assert ours["ratio_vs_bf16_lora"] == pytest.approx(2.0)
    assert ours["ratio_vs_bnb_peft"] == pytest.approx(0.5)
    assert ours["floor_ms"] == pytest.approx(1.0) and ours["frac_floor"] == pytest.approx(0.5)  # 3e9 B / 3e12
    assert rows[3]["ratio_vs_cublas_floor"] is None and rows[1]["ratio_vs_bnb_peft"] is None
    assert rows[4]["ratio_vs_cublas_floor"] is None  # no cublas row at M = 16384


def test_cpu_mode_writes_json_and_markdown(tmp_path, capsys):
    import lora_kernels  # noqa: F401  (a broken import must fail this test)

    rows = bt.main(["--cpu", "--out", str(tmp_path), "--reps", "2"])
    out = capsys.readouterr().out
    assert "no GPU" in out or "CPU mode" in out
    doc = json.loads((tmp_path / "training_cpu.json").read_text())
    assert doc["env"]["key"] == "cpu" and doc["meta"]["mode"] == "cpu" and len(doc["rows"]) == len(rows) == 1
    r = doc["rows"][0]
    assert list(r) == list(bt.ROW_KEYS)
    assert r["bench"] == "training" and r["method"] == "ours" and r["median_ms"] > 0 and r["floor_ms"] > 0
    assert r["rel_err_dx"] < 2e-2 and r["err_ratio"] is not None and r["within_2x"] is True, r
    assert (tmp_path / "training_cpu.md").read_text().startswith("# training_cpu")


def _fake_time_cuda(fn, inputs_sets, warmup_ms=0.0, rep_ms=0.0, use_graph=False, **_):
    sets = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in inputs_sets]
    t = []
    for s in sets:
        t0 = time.perf_counter()
        fn(*s)
        t.append((time.perf_counter() - t0) * 1e3)
    return harness._summary(t, len(sets), use_graph)


def test_gpu_code_path_dry_run_on_cpu(tmp_path, monkeypatch):
    import lora_kernels as lk

    monkeypatch.setattr(harness, "time_cuda", _fake_time_cuda)
    monkeypatch.setattr(harness, "peak_memory", lambda fn, *a: (fn(*a), 2**20)[1])
    monkeypatch.setattr(harness, "largest_allocation", lambda fn, *a: (fn(*a), 3 * 2**20)[1])
    monkeypatch.setattr(harness, "measure_copy_bandwidth", lambda **k: 3e12)
    monkeypatch.setattr(harness, "measure_bf16_matmul_rate", lambda **k: 8e14)
    monkeypatch.setattr(harness, "l2_bytes", lambda device=None: 16 * 1024)
    args = bt.build_parser().parse_args(["--shapes", "128x64", "--ms", "8,32", "--out", str(tmp_path)])
    env = dict(harness.env_info(), key="dryrun")
    rows, meta, notes = bt.run_gpu(args, lk, env, time.perf_counter(), device="cpu")
    assert all(list(r) == list(bt.ROW_KEYS) for r in rows)
    by = {(r["M"], r["method"]): r for r in rows}
    for M in (8, 32):
        ours, cub = by[M, "ours"], by[M, "cublas_floor"]
        assert ours["median_ms"] and cub["median_ms"] and ours["peak_mem_mb"] == 1.0
        assert ours["max_alloc_mb"] == 3.0 and ours["dense_weight_mb"] == 2 * 128 * 64 / 2**20
        assert ours["total_mem_mb"] == pytest.approx(ours["resident_mb"] + 1.0) and ours["resident_mb"] > 0
        assert ours["err_ratio"] is not None and ours["rel_err_da"] < 2e-2, ours
        assert ours["ratio_vs_cublas_floor"] == pytest.approx(ours["median_ms"] / cub["median_ms"])
        assert ours["flops"] == bt.training_flops(M, 128, 64, 16) and cub["flops"] == bt.training_flops(M, 128, 64, None)
        assert ours["n_sets"] >= 2
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        have = True
    except Exception:
        have = False
    if have:
        assert by[32, "bnb_peft"]["median_ms"] and by[32, "bf16_lora_peft"]["median_ms"], rows
        assert by[32, "ours"]["ratio_vs_bnb_peft"] is not None and by[32, "ours"]["ratio_vs_bf16_lora"] is not None
    doc = json.loads((tmp_path / "training_dryrun.json").read_text())
    assert len(doc["rows"]) == len(rows) and doc["meta"]["mode"] == "full"
    assert len(bt.short_table(rows).splitlines()) == 2 + len(rows)
    assert torch.is_grad_enabled()
