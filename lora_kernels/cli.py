"""``lora-kernels`` / ``python -m lora_kernels``: the package's command line.

  demo           a QLoRA fine-tune end to end, nothing downloaded: a small transformers Llama over
                 an embedded text, NF4 base (bitsandbytes Linear4bit from quantize_nf4), PEFT LoRA
                 patched onto lora_kernels, AdamW, save in PEFT's format, reload with plain PEFT,
                 merge (see finetune.py).
  quantize-demo  quantize an embedded small Llama-style model's linear layers to NF4 and report
                 sizes, weight and output error, and which backend ran.
  size           a LoRA adapter's size (and the NF4 base's) for a Hugging Face config.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch
from torch import nn

from .codes import VALID_BLOCKSIZES


def _device_arg(text: str) -> str:
    """argparse type of --device: cpu, cuda or cuda:N, and a CUDA device only where there is one."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r}: only cpu and cuda are supported")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise argparse.ArgumentTypeError(f"device {text!r}: the CPU is device 'cpu' (no index)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: this machine has no CUDA GPU (torch sees none)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device {text!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def _positive_int(text: str, most: int | None = None) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if most is not None and value > most:
        raise argparse.ArgumentTypeError(f"must be at most {most}, got {value}")
    return value


def _layers_arg(text: str) -> int:
    """--layers of quantize-demo: each layer is a real block quantized in memory."""
    return _positive_int(text, most=1024)


def _lr_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _seed_arg(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


class _TinyBlock(nn.Module):
    """A Llama-style block without attention's softmax details: q/k/v/o and a SwiGLU MLP."""

    def __init__(self, d: int, ff: int, kv: int):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, kv, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, kv, bias=False), nn.Linear(d, d, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        h = self.norm1(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        rep = q.shape[-1] // k.shape[-1]
        att = torch.softmax(q @ k.repeat_interleave(rep, -1).transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        x = x + self.o_proj(att @ v.repeat_interleave(rep, -1))
        h = self.norm2(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def tiny_llama(d: int = 512, ff: int = 1408, kv: int = 128, layers: int = 4, vocab: int = 2048,
               dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """An embedded small Llama-shaped model (random weights, fixed seed)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(vocab, d), *[_TinyBlock(d, ff, kv) for _ in range(layers)],
                          nn.LayerNorm(d))
    model.lm_head = nn.Linear(d, vocab, bias=False)
    return model.to(dtype)


def _bytes(model: nn.Module) -> int:
    from .modules import NF4Linear

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(m.weight.nbytes() for m in model.modules() if isinstance(m, NF4Linear))
    return total


def cmd_quantize_demo(args) -> int:
    from . import available_backends, quantize_model, select_backend
    from .modules import NF4Linear

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = tiny_llama(layers=args.layers)
    tokens = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(1))
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n != "lm_head"}
    with torch.no_grad():
        y_ref = model(tokens).float()
    before = _bytes(model)
    print(f"device {device}; backends here: {available_backends(device)}; using "
          f"'{select_backend(device)}'")
    t0 = time.perf_counter()
    converted = quantize_model(model, device=device, blocksize=args.blocksize, double_quant=not args.no_double_quant)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    model.to(device)
    print(f"\n{'layer':<22}{'shape':>14}{'bf16 KiB':>10}{'NF4 KiB':>9}{'bits/w':>8}{'rel. err':>10}")
    for name, layer in converted.items():
        w = dense[name].to(device).float()
        err = ((layer.weight.dequantize(torch.float32) - w).norm() / w.norm()).item()
        print(f"{name:<22}{str(tuple(layer.weight.shape)):>14}{w.numel() * 2 / 1024:>10.0f}"
              f"{layer.weight.nbytes() / 1024:>9.1f}{layer.weight.bits_per_param:>8.3f}{err:>10.4f}")
    with torch.no_grad():
        y = model(tokens.to(device)).float().cpu()
    out_err = ((y - y_ref).norm() / y_ref.norm()).item()
    after = _bytes(model)
    n_lin = sum(isinstance(m, NF4Linear) for m in model.modules())
    print(f"\nquantized {n_lin} linear layers in {dt * 1e3:.0f} ms "
          f"(blocksize {args.blocksize}, double quant {not args.no_double_quant})")
    print(f"model size: {before / 2**20:.2f} MiB bf16 -> {after / 2**20:.2f} MiB "
          f"({before / after:.2f}x smaller; lm_head and embeddings stay bf16)")
    print(f"relative output error of the NF4 model vs bf16: {out_err:.4f}")
    return 0


def cmd_demo(args) -> int:
    from .finetune import DemoConfig, run_demo

    missing = [m for m in ("transformers", "peft", "bitsandbytes") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"lora-kernels demo: error: needs {', '.join(missing)} (pip install 'lora_kernels[compat]', or "
              "scripts/setup-env); `lora-kernels quantize-demo` runs without them", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DemoConfig(steps=args.steps, device=device, out=args.out, lr=args.lr, seed=args.seed)
    if args.tiny:  # a smaller model for the tests
        cfg.hidden, cfg.layers, cfg.intermediate, cfg.seq_len, cfg.batch, cfg.log_every = 64, 2, 160, 32, 4, 2
    if cfg.steps < 1:
        print("lora-kernels demo: error: --steps must be at least 1", file=sys.stderr)
        return 2
    if cfg.out is not None and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        print(f"lora-kernels demo: error: --out {cfg.out!r} exists and is not a folder", file=sys.stderr)
        return 2
    res = run_demo(cfg)
    ok = res.losses[-1][1] < res.losses[0][1] and res.reload_max_diff < 1e-4 and res.merge_max_diff < 1e-3
    print(f"\nloss {res.losses[0][1]:.4f} -> {res.losses[-1][1]:.4f}; reload diff {res.reload_max_diff:.2e}; "
          f"merge diff {res.merge_max_diff:.2e}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def cmd_size(args) -> int:
    from .adapter_size import ConfigError, adapter_size, format_report, load_config, report_json

    try:
        shape = load_config(args.config, ignore_unknown=args.ignore_unknown)
        rep = adapter_size(shape, args.r, args.target, alpha=args.alpha, dtype=args.dtype)
    except ConfigError as e:
        print(f"lora-kernels size: error: {e}", file=sys.stderr)
        return 2
    print(report_json(rep) if args.json else format_report(rep))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    demo = sub.add_parser("demo", help="QLoRA fine-tune a small embedded Llama, save, reload and merge the adapter")
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--device", type=_device_arg, default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--out", default=None, help="where to save the adapter (default: a new temporary folder)")
    demo.add_argument("--lr", type=_lr_arg, default=3e-3)
    demo.add_argument("--seed", type=_seed_arg, default=0)
    demo.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)

    qdemo = sub.add_parser("quantize-demo", help="quantize an embedded small model and report size and error")
    qdemo.add_argument("--device", type=_device_arg, default=None, help="cpu or cuda (default: cuda if available)")
    qdemo.add_argument("--layers", type=_layers_arg, default=4, help="1 to 1024")
    qdemo.add_argument("--blocksize", type=int, default=64, choices=VALID_BLOCKSIZES)
    qdemo.add_argument("--no-double-quant", action="store_true")
    qdemo.set_defaults(func=cmd_quantize_demo)

    size = sub.add_parser("size", help="a LoRA adapter's size for a Hugging Face config.json")
    size.add_argument("config", help="path to a config.json (Llama/Mistral/Qwen2 or ChatGLM style)")
    size.add_argument("--r", type=int, required=True, help="LoRA rank")
    size.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2*r; only reported)")
    size.add_argument("--target", default="all-linear",
                      help="comma-separated module names (e.g. q_proj,v_proj), or all-linear (the default: every "
                           "linear layer of the decoder, not lm_head)")
    size.add_argument("--dtype", default="bf16", help="adapter dtype: bf16, fp16 or fp32")
    size.add_argument("--json", action="store_true", help="print JSON")
    size.add_argument("--ignore-unknown", action="store_true", help="skip config fields this tool does not know")
    size.set_defaults(func=cmd_size)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
