"""A small QLoRA fine-tune end to end, with no download: the ``demo`` command.

transformers' LlamaForCausalLM (a small config, random weights, fixed seed) over a char-level
tokenizer built from an embedded text -> its decoder's linear layers quantized to NF4 by
``quantize_nf4`` and handed to bitsandbytes' ``Linear4bit`` -> PEFT LoRA on every linear layer ->
``patch_peft_model`` -> AdamW for N steps -> ``save_pretrained`` (PEFT's files) -> reloaded into a
fresh base with plain PEFT (logits compared) -> merged into a dequantized copy (logits compared).
"""

from __future__ import annotations

import copy
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import model_ops

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TEXT = """\
The lighthouse keeper wrote the same line in the log every evening: lamp lit, sea calm, no ships.
Some evenings the sea was not calm, and he wrote it anyway, because the line was a habit and the
habit was a kind of promise. When the storm came in the autumn, the lamp stayed lit all night, and
in the morning he wrote: lamp lit, sea loud, two ships, both safe.

A small model learns a text the way a child learns a song. First the rhythm, then the common
words, then the odd turns of phrase that make the song its own. It does not know what a ship is,
or a lamp, or a promise; it only knows which letter tends to follow which, and after a while,
which word tends to follow which.

Quantized weights are like a map drawn with a thick pen. The coast is still there, the bays and
the headlands, but the fine lines are gone. The low-rank adapter is a thin pen: it cannot redraw
the map, but it can add the few roads that this one journey needs, and it is small enough to
carry in a pocket.
"""


class CharTokenizer:
    """One id per character of the embedded text (id 0 is kept for unknown characters)."""

    def __init__(self, text: str):
        self.chars = ["\x00"] + sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> list[int]:
        return [self.index.get(c, 0) for c in s]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


@dataclass
class DemoConfig:
    steps: int = 30
    device: str = "cpu"
    out: str | None = None
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 352
    seq_len: int = 64
    batch: int = 8
    lr: float = 3e-3
    r: int = 8
    alpha: int = 16
    seed: int = 0
    log_every: int = 5


@dataclass
class DemoResult:
    losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    peak_memory_bytes: int = 0
    patched: int = 0
    skipped: int = 0
    out_dir: str = ""
    reload_max_diff: float = float("nan")
    merge_max_diff: float = float("nan")
    files: list[str] = field(default_factory=list)


def _llama_config(cfg: DemoConfig, vocab: int):
    import transformers

    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                                    num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                    num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.seq_len,
                                    tie_word_embeddings=False)


def build_base(cfg: DemoConfig, vocab: int):
    """The fp32 base model (random weights from ``cfg.seed``): the same every call."""
    import transformers

    torch.manual_seed(cfg.seed)
    return transformers.LlamaForCausalLM(_llama_config(cfg, vocab)).float().eval()


def _target_linears(model):
    return [(n, m) for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and n.rpartition(".")[2] in TARGETS]


def quantize_base(model, device: torch.device, compute_dtype: torch.dtype = torch.float32):
    """Replace the decoder's linear layers by bitsandbytes nf4 ``Linear4bit`` (``compute_dtype``) whose
    weights come from ``quantize_nf4`` (bit-identical to bitsandbytes' own quantizer)."""
    import bitsandbytes as bnb

    from .library import quantize_nf4

    n = 0
    for name, mod in _target_linears(model):
        q = quantize_nf4(mod.weight.detach().to(device), blocksize=64, double_quant=True)
        new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                device="meta")
        new.weight = q.to_bnb_params()
        if mod.bias is not None:
            new.bias = torch.nn.Parameter(mod.bias.detach().to(device), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        n += 1
    model.is_loaded_in_4bit = True
    return model.to(device), n


def dequantized_copy(model):
    """An fp32 copy of a quantized base where every Linear4bit is an nn.Linear holding its
    dequantized weight (what the NF4 layer computes with): the base to merge an adapter into."""
    import bitsandbytes as bnb

    from .nf4 import NF4Weight

    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, bnb.nn.Linear4bit):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  device=mod.weight.device)
            lin.weight.data = NF4Weight.from_bnb(mod.weight).dequantize(torch.float32)
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, lin)
    out.is_loaded_in_4bit = False
    return out


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _batches(ids: torch.Tensor, cfg: DemoConfig, gen: torch.Generator):
    while True:
        starts = torch.randint(0, ids.numel() - cfg.seq_len, (cfg.batch,), generator=gen)
        yield torch.stack([ids[s:s + cfg.seq_len] for s in starts.tolist()])


@torch.no_grad()
def _greedy(model, tok: CharTokenizer, prompt: str, n: int, device, max_len: int) -> str:
    ids = torch.tensor([tok.encode(prompt)], device=device)
    for _ in range(n):
        logits = model(input_ids=ids[:, -max_len:]).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return tok.decode(ids[0].tolist())


def run_demo(cfg: DemoConfig, log=print) -> DemoResult:
    import peft

    from .integrations.model_kernels import patch_model_kernels
    from .integrations.peft import patch_peft_model

    device = torch.device(cfg.device)
    res = DemoResult()
    if device.type == "cpu":
        from .integrations.bnb_cpu import use_portable_bnb_cpu_paths

        if use_portable_bnb_cpu_paths():
            log("note: bitsandbytes' native CPU NF4 dequantize is wrong on this CPU (rows not a multiple of "
                "the blocksize); its portable implementation is used instead (lora_kernels/integrations/bnb_cpu.py)")
    tok = CharTokenizer(TEXT)
    ids = torch.tensor(tok.encode(TEXT))
    out_dir = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="lora-kernels-demo-"))
    res.out_dir = str(out_dir)

    base, n_quant = quantize_base(build_base(cfg, len(tok)), device)
    n_params = sum(p.numel() for p in base.parameters())
    log(f"model: LlamaForCausalLM hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads ({cfg.kv_heads} kv), "
        f"vocab {len(tok)} (char-level, from the embedded text of {len(TEXT)} chars); {n_quant} linear layers "
        f"quantized to NF4 (quantize_nf4 -> bitsandbytes Linear4bit), device {device}")
    lcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(base, lcfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA r={cfg.r} alpha={cfg.alpha} on {', '.join(TARGETS)}: {n_train:,} trainable parameters "
        f"({100 * n_train / n_params:.2f}% of the base's {n_params:,} stored elements)")
    report = patch_peft_model(model)
    res.patched, res.skipped = len(report.patched), len(report.skipped)
    log(str(report))
    log(str(patch_model_kernels(model)) + ("" if model_ops.use_triton(torch.empty(0, device=device)) else
                                           " (their PyTorch references here: Triton does not run on this device)"))

    prompt = "The lamp"
    model.eval()
    log(f"greedy sample before: {_greedy(model, tok, prompt, 40, device, cfg.seq_len)!r}")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    batches = _batches(ids, cfg, gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x = next(batches).to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step % cfg.log_every == 0 or step == cfg.steps:
            res.losses.append((step, loss.item()))
            log(f"step {step:>4}  loss {loss.item():.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    res.tokens_per_s = cfg.steps * cfg.batch * cfg.seq_len / dt
    res.peak_memory_bytes = _peak_memory(device)
    mem_what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS"
    log(f"trained {cfg.steps} steps in {dt:.1f} s: {res.tokens_per_s:,.0f} tokens/s; peak memory "
        f"{res.peak_memory_bytes / 2**20:.0f} MiB ({mem_what})")
    model.eval()
    log(f"greedy sample after:  {_greedy(model, tok, prompt, 40, device, cfg.seq_len)!r}")

    # ---- save in PEFT's format, reload into a fresh quantized base with plain PEFT
    model.save_pretrained(out_dir)
    res.files = sorted(p.name for p in out_dir.iterdir())
    size = sum((out_dir / f).stat().st_size for f in res.files)
    log(f"saved the adapter to {out_dir}: {', '.join(res.files)} ({size / 1024:.0f} KiB)")
    probe = ids[: cfg.seq_len].unsqueeze(0).to(device)
    with torch.no_grad():
        logits = model(input_ids=probe).logits.float()
        fresh, _ = quantize_base(build_base(cfg, len(tok)), device)
        plain = peft.PeftModel.from_pretrained(fresh, out_dir).eval()
        reload_logits = plain(input_ids=probe).logits.float()
        res.reload_max_diff = (reload_logits - logits).abs().max().item()
        log(f"reloaded with plain PEFT (no lora_kernels) into a fresh NF4 base: max |logits diff| "
            f"{res.reload_max_diff:.2e}")
        # ---- merge: dequantize the NF4 base, load the adapter, merge_and_unload
        # (from_pretrained wrapped ``fresh`` in place: quantize another fresh base to dequantize)
        deq = dequantized_copy(quantize_base(build_base(cfg, len(tok)), device)[0])
        merged = peft.PeftModel.from_pretrained(deq, out_dir).merge_and_unload().eval()
        merged_logits = merged(input_ids=probe).logits.float()
        res.merge_max_diff = (merged_logits - logits).abs().max().item()
        n_lora = sum("lora_" in n for n, _ in merged.named_parameters())
        log(f"merged into the dequantized base (merge_and_unload, {n_lora} LoRA tensors left): max |logits diff| "
            f"vs the adapter model {res.merge_max_diff:.2e}")
    return res
