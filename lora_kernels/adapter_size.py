"""How big is a LoRA adapter (and an NF4 base) for a model, from its Hugging Face ``config.json``
alone (nothing downloaded).

Supported configs:

* Llama / Mistral / Qwen2 style (``model_type`` llama, mistral, qwen2): hidden_size,
  intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads (default: heads),
  head_dim (default hidden/heads), vocab_size, tie_word_embeddings (default False).  Modules
  q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
* ChatGLM style (``model_type`` chatglm).  Two schemas exist:
  - ChatGLM2/3 (``ffn_hidden_size``): num_layers, multi_query_attention, multi_query_group_num,
    kv_channels, padded_vocab_size; SwiGLU MLP, so dense_h_to_4h is hidden -> 2*ffn_hidden_size.
  - ChatGLM-6B v1 (``inner_hidden_size``): GELU MLP, dense_h_to_4h is hidden -> inner_hidden_size,
    every linear layer has a bias, vocab_size.
  Modules query_key_value, dense, dense_h_to_4h, dense_4h_to_h.

Fields that change shapes in ways not modelled here (mixture of experts, low-rank attention, ...)
and fields this module does not know are errors that name them (``ignore_unknown=True`` skips the
unknown ones); missing required fields are errors that name the field.

NF4 size (bitsandbytes format, blocksize 64, double quantization), per weight of n elements:
``ceil(n/2)`` packed bytes + ``nb = ceil(n/64)`` uint8 absmax + ``ceil(nb/256)*4`` nested absmax +
4 (offset) = 4.127 bits/param for large n.  The code tables (16 + 256 fp32 = 1088 bytes a weight,
identical in every weight) are excluded; the report gives their total separately.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "ModelShape", "LinearSpec", "parse_config", "load_config", "adapter_size",
           "nf4_nbytes", "format_report", "DTYPE_BYTES"]

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
NF4_TABLE_BYTES = 16 * 4 + 256 * 4  # code + nested code (fp32), per quantized weight

LLAMA_TYPES = ("llama", "mistral", "qwen2")
CHATGLM_TYPES = ("chatglm",)

# fields that do not change any parameter shape (tokens ids, rope, norms' eps, dtype, runtime knobs)
_NEUTRAL = {
    "_name_or_path", "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "rope_theta", "rope_scaling",
    "rms_norm_eps", "initializer_range", "hidden_act", "use_cache", "pretraining_tp", "attention_dropout",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "use_mrope", "rope_parameters",
    "partial_rotary_factor", "hidden_dropout", "layernorm_epsilon", "seq_length", "max_sequence_length",
    "rmsnorm", "apply_residual_connection_post_layernorm", "post_layer_norm", "apply_query_key_layer_scaling",
    "attention_softmax_in_fp32", "fp32_residual_connection", "quantization_bit", "pre_seq_len",
    "prefix_projection", "original_rope", "position_encoding_2d", "gmask_token_id", "mask_token_id",
    "num_key_value_heads", "head_dim", "tie_word_embeddings", "is_encoder_decoder", "bias_dropout_fusion",
    "classifier_dropout", "use_return_dict", "output_attentions", "output_hidden_states", "tokenizer_class",
    "rope_ratio", "eos_token_ids",
}
# fields that mean an architecture this module does not model
_UNSUPPORTED = {
    "num_local_experts": "mixture of experts", "num_experts": "mixture of experts",
    "moe_intermediate_size": "mixture of experts", "n_routed_experts": "mixture of experts",
    "shared_expert_intermediate_size": "mixture of experts", "num_experts_per_tok": "mixture of experts",
    "q_lora_rank": "low-rank attention (MLA)", "kv_lora_rank": "low-rank attention (MLA)",
    "vision_config": "a multimodal model", "text_config": "a nested text_config (pass the text model's config)",
}
_BOOL_BIAS = {"attention_bias", "mlp_bias", "add_bias_linear", "add_qkv_bias"}


class ConfigError(ValueError):
    """The config cannot be read as a supported model: the message names the field or type."""


def _flag(cfg: dict[str, Any], key: str, default: bool) -> bool:
    """A boolean field (JSON true/false; absent or null: ``default``).  A string such as "false"
    would read as True through bool(): refused instead."""
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"field {key!r} must be true or false, got {v!r}")
    return v


@dataclass
class LinearSpec:
    name: str
    in_features: int
    out_features: int
    count: int  # how many in the whole model
    bias: bool = False

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ModelShape:
    model_type: str
    layers: int
    linears: list[LinearSpec]  # the per-layer linear modules (LoRA targets)
    other_params: int  # embeddings, lm_head, norms, biases: not quantized, not targeted
    other_desc: str = ""

    @property
    def linear_params(self) -> int:
        return sum(s.numel * s.count for s in self.linears)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params


def _require(cfg: dict, key: str, kind=int):
    if key not in cfg:
        raise ConfigError(f"config is missing the required field {key!r} (model_type {cfg.get('model_type')!r})")
    v = cfg[key]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        raise ConfigError(f"config field {key!r} must be a positive integer, got {v!r}")
    return v


def _opt_int(cfg: dict, key: str, default: int | None) -> int | None:
    v = cfg.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"config field {key!r} must be a positive integer, got {v!r}")
    return v


def _check_fields(cfg: dict, known: set[str], ignore_unknown: bool) -> None:
    bad = {k: why for k, why in _UNSUPPORTED.items() if cfg.get(k) not in (None, 0, False, {})}
    if bad:
        raise ConfigError("unsupported config field(s): " + ", ".join(f"{k} ({why})" for k, why in sorted(bad.items())))
    unknown = sorted(set(cfg) - known - _NEUTRAL - set(_UNSUPPORTED))
    if unknown and not ignore_unknown:
        raise ConfigError(f"unknown config field(s) {unknown} for model_type {cfg.get('model_type')!r}: they may "
                          "change parameter shapes this tool does not model (pass --ignore-unknown to skip them)")


def _llama(cfg: dict, ignore_unknown: bool) -> ModelShape:
    known = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"} | _BOOL_BIAS
    _check_fields(cfg, known, ignore_unknown)
    h = _require(cfg, "hidden_size")
    ff = _require(cfg, "intermediate_size")
    L = _require(cfg, "num_hidden_layers")
    nh = _require(cfg, "num_attention_heads")
    vocab = _require(cfg, "vocab_size")
    nkv = _opt_int(cfg, "num_key_value_heads", nh)
    if nh % nkv:
        raise ConfigError(f"num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")
    if cfg.get("head_dim") is None and h % nh:
        raise ConfigError(f"hidden_size {h} is not a multiple of num_attention_heads {nh} (and no head_dim)")
    hd = _opt_int(cfg, "head_dim", h // nh)
    qkv_bias = _flag(cfg, "attention_bias", cfg.get("model_type") == "qwen2")
    o_bias = _flag(cfg, "attention_bias", False)
    mlp_bias = _flag(cfg, "mlp_bias", False)
    lin = [LinearSpec("q_proj", h, nh * hd, L, qkv_bias), LinearSpec("k_proj", h, nkv * hd, L, qkv_bias),
           LinearSpec("v_proj", h, nkv * hd, L, qkv_bias), LinearSpec("o_proj", nh * hd, h, L, o_bias),
           LinearSpec("gate_proj", h, ff, L, mlp_bias), LinearSpec("up_proj", h, ff, L, mlp_bias),
           LinearSpec("down_proj", ff, h, L, mlp_bias)]
    tied = _flag(cfg, "tie_word_embeddings", False)
    emb = vocab * h * (1 if tied else 2)
    norms = (2 * L + 1) * h
    biases = sum(s.out_features * s.count for s in lin if s.bias)
    desc = (f"embeddings{' (tied with lm_head)' if tied else ' + lm_head'} {emb:,}, norms {norms:,}"
            + (f", biases {biases:,}" if biases else ""))
    return ModelShape(cfg["model_type"], L, lin, emb + norms + biases, desc)


def _chatglm(cfg: dict, ignore_unknown: bool) -> ModelShape:
    v1 = "inner_hidden_size" in cfg and "ffn_hidden_size" not in cfg
    known = {"hidden_size", "num_layers", "num_attention_heads", "kv_channels", "multi_query_attention",
             "multi_query_group_num", "padded_vocab_size", "vocab_size", "ffn_hidden_size", "inner_hidden_size"}
    _check_fields(cfg, known | _BOOL_BIAS, ignore_unknown)
    h = _require(cfg, "hidden_size")
    L = _require(cfg, "num_layers")
    nh = _require(cfg, "num_attention_heads")
    kv_ch = _opt_int(cfg, "kv_channels", None)
    if kv_ch is None:
        if h % nh:
            raise ConfigError(f"hidden_size {h} is not a multiple of num_attention_heads {nh} (and no kv_channels)")
        kv_ch = h // nh
    proj = nh * kv_ch
    if cfg.get("multi_query_attention"):
        groups = _require(cfg, "multi_query_group_num")
        qkv_out = proj + 2 * groups * kv_ch
    else:
        qkv_out = 3 * proj
    if v1:  # ChatGLM-6B: GELU MLP, biases everywhere
        ff = _require(cfg, "inner_hidden_size")
        h_to_4h = ff
        vocab = _require(cfg, "vocab_size")
        qkv_bias = lin_bias = True
    else:  # ChatGLM2/3: SwiGLU (gate and up fused in dense_h_to_4h)
        ff = _require(cfg, "ffn_hidden_size")
        h_to_4h = 2 * ff
        vocab = _require(cfg, "padded_vocab_size")
        lin_bias = _flag(cfg, "add_bias_linear", False)
        qkv_bias = _flag(cfg, "add_qkv_bias", False) or lin_bias
    lin = [LinearSpec("query_key_value", h, qkv_out, L, qkv_bias), LinearSpec("dense", proj, h, L, lin_bias),
           LinearSpec("dense_h_to_4h", h, h_to_4h, L, lin_bias), LinearSpec("dense_4h_to_h", ff, h, L, lin_bias)]
    tied = _flag(cfg, "tie_word_embeddings", False)
    emb = vocab * h * (1 if tied else 2)
    norm_w = 2 if v1 else 1  # LayerNorm (weight + bias) in v1, RMSNorm in v2/3
    norms = (2 * L + 1) * h * norm_w
    biases = sum(s.out_features * s.count for s in lin if s.bias)
    desc = (f"embeddings{' (tied with output layer)' if tied else ' + output layer'} {emb:,}, norms {norms:,}"
            + (f", biases {biases:,}" if biases else "") + ("; ChatGLM-6B v1 schema (GELU MLP)" if v1 else
                                                            "; ChatGLM2/3 schema (SwiGLU: dense_h_to_4h = 2*ffn)"))
    return ModelShape("chatglm", L, lin, emb + norms + biases, desc)


def parse_config(cfg: dict[str, Any], ignore_unknown: bool = False) -> ModelShape:
    """A ModelShape from the fields of a Hugging Face config.json (see the module docstring)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"config must be a JSON object, got {type(cfg).__name__}")
    mt = cfg.get("model_type")
    if mt is None:
        raise ConfigError("config is missing the required field 'model_type' "
                          f"(supported: {', '.join(LLAMA_TYPES + CHATGLM_TYPES)})")
    if mt in LLAMA_TYPES:
        return _llama(cfg, ignore_unknown)
    if mt in CHATGLM_TYPES:
        return _chatglm(cfg, ignore_unknown)
    raise ConfigError(f"unsupported model_type {mt!r} (supported: {', '.join(LLAMA_TYPES + CHATGLM_TYPES)})")


def load_config(path: str | Path, ignore_unknown: bool = False) -> ModelShape:
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"config path must be a str or a path, got {type(path).__name__}")
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
    except OSError as e:                          # a directory, no permission, ...
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror or e}") from None
    return parse_config(cfg, ignore_unknown)


def nf4_nbytes(n: int, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> int:
    """Bytes of an NF4Weight of n elements (packed + absmax + nested absmax + offset; tables excluded),
    the same as ``quantize_nf4(w).nbytes()`` minus the code tables."""
    for name, v in (("n", n), ("blocksize", blocksize)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"nf4_nbytes: {name} must be a positive int, got {v!r}")
    nb = -(-n // blocksize)
    if not double_quant:
        return (n + 1) // 2 + nb * 4
    return (n + 1) // 2 + nb + -(-nb // NESTED_BLOCKSIZE) * 4 + 4


def _resolve_targets(shape: ModelShape, targets: str | list[str]) -> list[LinearSpec]:
    names = [s.name for s in shape.linears]
    if isinstance(targets, str):
        targets = names if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    if not targets:
        raise ConfigError("no target modules given")
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ConfigError(f"unknown target module(s) {unknown} for model_type {shape.model_type!r}; "
                          f"its linear modules are {names} (or 'all-linear')")
    return [s for s in shape.linears if s.name in targets]


def adapter_size(shape: ModelShape, r: int, targets: str | list[str] = "all-linear", alpha: float | None = None,
                 dtype: str = "bf16") -> dict[str, Any]:
    """The adapter's size per target module type and in total, and the base model in bf16 vs NF4."""
    if not isinstance(shape, ModelShape):
        raise ConfigError(f"shape must be a ModelShape (load_config / parse_config), got {type(shape).__name__}")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise ConfigError(f"targets must be 'all-linear', a comma-separated string or a list of names, got {targets!r}")
    if not isinstance(dtype, str):
        raise ConfigError(f"dtype must be a string such as 'bf16', got {dtype!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"r must be a positive integer, got {r!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
        raise ConfigError(f"alpha must be a positive finite number, got {alpha!r}")
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown adapter dtype {dtype!r} (one of {sorted(DTYPE_BYTES)})")
    nbytes = DTYPE_BYTES[dtype]
    total_base = shape.total_params
    rows = []
    for s in _resolve_targets(shape, targets):
        per_layer = r * (s.in_features + s.out_features)
        rows.append({"module": s.name, "count": s.count, "in": s.in_features, "out": s.out_features,
                     "lora_params_per_layer": per_layer, "lora_params": per_layer * s.count,
                     "bytes": per_layer * s.count * nbytes,
                     "percent_of_base": 100.0 * per_layer * s.count / total_base})
    lora = sum(row["lora_params"] for row in rows)
    n_quant = sum(s.count for s in shape.linears)
    nf4_linear = sum(nf4_nbytes(s.numel) * s.count for s in shape.linears)
    other_bf16 = shape.other_params * 2
    return {
        "model_type": shape.model_type, "layers": shape.layers, "r": r,
        "alpha": alpha if alpha is not None else 2 * r, "scaling": (alpha if alpha is not None else 2 * r) / r,
        "dtype": dtype, "targets": rows,
        "total": {"lora_params": lora, "bytes": lora * nbytes, "percent_of_base": 100.0 * lora / total_base},
        "base": {
            "params": total_base, "linear_params": shape.linear_params, "other_params": shape.other_params,
            "other": shape.other_desc, "bf16_bytes": total_base * 2,
            "nf4_linear_bytes": nf4_linear, "nf4_linear_bits_per_param": 8 * nf4_linear / shape.linear_params,
            "nf4_code_tables_bytes": n_quant * NF4_TABLE_BYTES, "quantized_weights": n_quant,
            # QLoRA's layout: the decoder's linear layers in NF4, embeddings/lm_head/norms/biases in bf16
            "qlora_bytes": nf4_linear + other_bf16,
        },
    }


def _fmt_bytes(n: float) -> str:
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} B"


def format_report(rep: dict[str, Any]) -> str:
    base = rep["base"]
    lines = [f"{rep['model_type']}: {base['params']:,} parameters, {rep['layers']} layers; "
             f"LoRA r={rep['r']}, alpha={rep['alpha']:g} (scaling {rep['scaling']:g}), adapter dtype {rep['dtype']}",
             "",
             f"{'module':<16}{'count':>6}{'shape (in->out)':>18}{'params/layer':>14}{'LoRA params':>14}"
             f"{'size':>12}{'% of base':>11}"]
    for row in rep["targets"]:
        lines.append(f"{row['module']:<16}{row['count']:>6}{str(row['in']) + '->' + str(row['out']):>18}"
                     f"{row['lora_params_per_layer']:>14,}{row['lora_params']:>14,}{_fmt_bytes(row['bytes']):>12}"
                     f"{row['percent_of_base']:>10.3f}%")
    t = rep["total"]
    lines.append(f"{'total':<16}{'':>6}{'':>18}{'':>14}{t['lora_params']:>14,}{_fmt_bytes(t['bytes']):>12}"
                 f"{t['percent_of_base']:>10.3f}%")
    lines += ["",
              f"base model in bf16:        {_fmt_bytes(base['bf16_bytes'])}",
              f"base model for QLoRA:      {_fmt_bytes(base['qlora_bytes'])}  ({base['quantized_weights']} linear "
              f"weights in NF4 = {_fmt_bytes(base['nf4_linear_bytes'])} at {base['nf4_linear_bits_per_param']:.3f} "
              f"bits/param, blocksize 64, double quant; the rest in bf16: {base['other']})",
              f"NF4 code tables (excluded above): {_fmt_bytes(base['nf4_code_tables_bytes'])} "
              f"(1088 B a weight, identical everywhere)"]
    return "\n".join(lines)


def report_json(rep: dict[str, Any]) -> str:
    return json.dumps(rep, indent=2)

