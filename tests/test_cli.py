"""The command line: ``size`` against hand-computed numbers, ``demo`` (a tiny QLoRA fine-tune) and
``quantize-demo``."""

import json
from pathlib import Path

import pytest
import torch

from lora_kernels.adapter_size import ConfigError, adapter_size, load_config, nf4_nbytes, parse_config
from lora_kernels.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
LLAMA = str(CONFIGS / "llama-3-8b.json")
CHATGLM = str(CONFIGS / "chatglm-6b.json")


def _size_json(capsys, *argv):
    assert main(["size", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_size_llama_3_8b_by_hand(capsys):
    rep = _size_json(capsys, LLAMA, "--r", "16", "--alpha", "32",
                     "--target", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    h, ff, kv, L, r = 4096, 14336, 1024, 32, 16
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 3 * (h + ff))
    assert per_layer * L == 41_943_040 == rep["total"]["lora_params"]
    assert rep["total"]["bytes"] == 2 * 41_943_040
    rows = {row["module"]: row for row in rep["targets"]}
    assert (rows["k_proj"]["in"], rows["k_proj"]["out"], rows["k_proj"]["count"]) == (4096, 1024, 32)
    assert rows["down_proj"]["lora_params_per_layer"] == 16 * (14336 + 4096)
    # public parameter count of Llama-3-8B: embeddings + lm_head untied, RMSNorms
    assert rep["base"]["params"] == 8_030_261_248
    assert abs(rep["total"]["percent_of_base"] - 100 * 41_943_040 / 8_030_261_248) < 1e-9
    linear = L * (2 * h * h + 2 * h * kv + 3 * h * ff)
    assert rep["base"]["linear_params"] == linear
    assert rep["base"]["nf4_linear_bytes"] == L * (2 * nf4_nbytes(h * h) + 2 * nf4_nbytes(h * kv) + 3 * nf4_nbytes(h * ff))
    assert abs(rep["base"]["nf4_linear_bits_per_param"] - 4.127) < 1e-3
    assert rep["base"]["bf16_bytes"] == 2 * 8_030_261_248
    # q,v only: the classic LoRA setting
    qv = _size_json(capsys, LLAMA, "--r", "8", "--target", "q_proj,v_proj", "--dtype", "fp32")
    assert qv["total"]["lora_params"] == 32 * 8 * ((h + h) + (h + kv)) == 3_407_872
    assert qv["total"]["bytes"] == 4 * 3_407_872


def test_size_chatglm_6b_by_hand(capsys):
    rep = _size_json(capsys, CHATGLM, "--r", "8", "--target", "all-linear")
    h, ff, L, r = 4096, 16384, 28, 8
    rows = {row["module"]: (row["in"], row["out"]) for row in rep["targets"]}
    assert rows == {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, ff),
                    "dense_4h_to_h": (ff, h)}
    assert rep["total"]["lora_params"] == L * r * ((h + 3 * h) + (h + h) + 2 * (h + ff)) == 14_680_064
    text = main(["size", CHATGLM, "--r", "8", "--target", "all-linear"])
    assert text == 0 and "dense_h_to_4h" in capsys.readouterr().out


def test_size_chatglm2_schema_is_gated_and_multi_query():
    cfg = {"model_type": "chatglm", "hidden_size": 4096, "ffn_hidden_size": 13696, "num_layers": 28,
           "num_attention_heads": 32, "kv_channels": 128, "multi_query_attention": True,
           "multi_query_group_num": 2, "padded_vocab_size": 65024, "add_qkv_bias": True, "add_bias_linear": False}
    shape = parse_config(cfg)
    dims = {s.name: (s.in_features, s.out_features) for s in shape.linears}
    assert dims == {"query_key_value": (4096, 4096 + 2 * 2 * 128), "dense": (4096, 4096),
                    "dense_h_to_4h": (4096, 2 * 13696), "dense_4h_to_h": (13696, 4096)}
    rep = adapter_size(shape, 4, "dense_h_to_4h")
    assert rep["total"]["lora_params"] == 28 * 4 * (4096 + 2 * 13696)


def test_nf4_size_formula_matches_quantize_nf4():
    from lora_kernels import quantize_nf4

    for n in (64 * 300, 1000, 64 * 256 * 2 + 1):
        q = quantize_nf4(torch.randn(n))
        assert nf4_nbytes(n) == q.nbytes() - q.code.nbytes - q.nested_code.nbytes


@pytest.mark.parametrize("cfg, words", [
    ({"model_type": "gpt2", "n_embd": 768}, ["unsupported model_type", "gpt2"]),
    ({"hidden_size": 8}, ["model_type"]),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "vocab_size": 10}, ["intermediate_size"]),
    ({"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "vocab_size": 10, "num_local_experts": 8}, ["num_local_experts", "mixture of experts"]),
    ({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "vocab_size": 10, "frobnicate_dim": 3}, ["frobnicate_dim", "--ignore-unknown"]),
    ({"model_type": "llama", "hidden_size": 64, "intermediate_size": "128", "num_hidden_layers": 2,
      "num_attention_heads": 4, "vocab_size": 10}, ["intermediate_size", "positive integer"]),
    ({"model_type": "chatglm", "hidden_size": 64, "ffn_hidden_size": 128, "num_layers": 2,
      "num_attention_heads": 4, "multi_query_attention": True, "padded_vocab_size": 10}, ["multi_query_group_num"]),
], ids=["model-type", "no-model-type", "missing-field", "moe", "unknown-field", "not-int", "chatglm-mqa"])
def test_size_bad_configs_error_clearly(cfg, words, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert main(["size", str(path), "--r", "8"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and words[0] in err


def test_size_bad_arguments(tmp_path, capsys):
    assert main(["size", LLAMA, "--r", "8", "--target", "query_key_value"]) == 2
    assert "query_key_value" in capsys.readouterr().err
    assert main(["size", str(tmp_path / "nope.json"), "--r", "8"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["size", str(tmp_path / "bad.json"), "--r", "8"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["size", LLAMA, "--r", "0"]) == 2
    # unknown fields can be skipped on request
    cfg = json.loads(open(LLAMA).read()) | {"frobnicate_dim": 3}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["size", str(tmp_path / "c.json"), "--r", "16", "--ignore-unknown"]) == 0


def test_demo_tiny_finetune_saves_reloads_and_merges(tmp_path, capsys):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "adapter"
    assert main(["demo", "--tiny", "--steps", "6", "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    losses = [float(line.split("loss")[1]) for line in text.splitlines() if line.startswith("step")]
    assert len(losses) >= 2 and losses[-1] < losses[0], text
    assert "patched 14 PEFT layer(s), left 0" in text
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert "reloaded with plain PEFT" in text and "tokens/s" in text and "peak memory" in text
    assert text.rstrip().endswith("OK")


def test_quantize_demo_still_runs(capsys):
    assert main(["quantize-demo", "--layers", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "quantized 7 linear layers" in out and "relative output error" in out


@pytest.mark.parametrize("argv,message", [
    (["quantize-demo", "--layers", "0"], "argument --layers: must be at least 1, got 0"),
    (["quantize-demo", "--blocksize", "17"], "argument --blocksize: invalid choice: 17"),
    (["quantize-demo", "--device", "tpu"], "argument --device: unknown device 'tpu'"),
    (["quantize-demo", "--device", "meta"], "argument --device: device 'meta': only cpu and cuda"),
    (["demo", "--device", "cuda:99", "--steps", "1"], "argument --device: device 'cuda:99'"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    """Bad options end in argparse's usage error (exit code 2) naming the option, not a traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
