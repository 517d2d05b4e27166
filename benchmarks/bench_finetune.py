"""QLoRA fine-tune, end to end: the same PEFT model trained through bitsandbytes + PEFT and through
lora_kernels (``patch_peft_model``), same seed, same data, same optimizer.  Issue 5's GPU check.

Model presets (transformers ``LlamaForCausalLM``, random init from a fixed seed, no download):
  demo   the README's embedded small Llama (``lora_kernels.finetune.DemoConfig``), char-level
         tokens of the embedded text
  1b     a TinyLlama-1.1B-shaped model: hidden 2048, 22 layers, 32 heads (4 kv), MLP 5632,
         vocab 32000; random token ids as data
Both: decoder linear layers quantized to NF4 (``quantize_nf4`` -> bitsandbytes ``Linear4bit``,
double quantization, bf16 compute), the rest bf16, PEFT LoRA on every decoder linear layer
(r, alpha = 2r, no dropout; PEFT keeps adapters in fp32), AdamW (lr 1e-4 for 1b, 3e-3 for demo).

Arms (each built fresh from the same seed):
  peft_bnb  PEFT LoRA over bitsandbytes Linear4bit, as PEFT runs it
  ours      the same PEFT model after ``lora_kernels.patch_peft_model`` (the same Parameters)
  ours_fused  ``ours`` plus ``lora_kernels.patch_model_kernels``: the model's RMSNorms, SwiGLU
            MLPs, rotary embeddings and loss through the fused model ops as well
Per arm: the loss of every step, tokens/s over the timed steps (after ``--warmup`` steps),
the memory the prepared model holds before the first step (``model_mem_mb``) and the peak memory
of the training steps (``torch.cuda.max_memory_allocated`` from the first step on: model,
optimizer state and activations; building the model in fp32 and quantizing it, the same in every
arm, is not counted).
Gradient checkpointing (non-reentrant) on with ``--grad-ckpt``.

    python -m benchmarks.bench_finetune [--model demo|1b] [--steps 12] [--warmup 2] [--batch 8]
                                        [--seq 1024] [--r 16] [--grad-ckpt] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch

from . import harness

ROW_KEYS = ("bench", "model", "params_m", "arm", "batch", "seq", "r", "grad_ckpt", "steps", "tokens_per_s",
            "speedup_vs_peft_bnb", "peak_mem_mb", "mem_ratio_vs_peft_bnb", "loss_first", "loss_last",
            "max_abs_loss_diff", "max_rel_loss_diff", "patched", "skipped", "model_kernels", "compiled", "optim",
            "warmup_s", "model_mem_mb", "note")
ARMS = ("peft_bnb", "ours", "ours_fused")


def _config(name: str):
    from lora_kernels.finetune import DemoConfig

    if name == "demo":
        return DemoConfig(), None
    if name == "1b":
        cfg = DemoConfig(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, seq_len=1024,
                         batch=8, lr=1e-4)
        return cfg, 32000
    raise SystemExit(f"unknown model preset {name!r} (demo or 1b)")


def _data(cfg, vocab, steps: int, device):
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    if vocab is None:
        from lora_kernels.finetune import TEXT, CharTokenizer, _batches

        tok = CharTokenizer(TEXT)
        it = _batches(torch.tensor(tok.encode(TEXT)), cfg, gen)
        return len(tok), [next(it).to(device) for _ in range(steps)]
    return vocab, [torch.randint(0, vocab, (cfg.batch, cfg.seq_len), generator=gen).to(device) for _ in range(steps)]


#: kernel-name fragments -> the group a GPU kernel's time is reported under by ``--profile``
_KERNEL_GROUPS = (("gemm (cuBLAS)", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
                  ("NF4 merge (ours)", ("_merge_kernel",)),
                  ("model ops (ours)", ("_rms_norm", "_swiglu", "_silu_mul", "_rope", "_rotary", "_cross_entropy",
                                        "_ce_")), ("NF4 dequantize (bnb)", ("dequantize", "kDequant")),
                  ("attention", ("flash", "fmha", "attention", "sdpa")),
                  ("optimizer", ("multi_tensor", "adam", "foreach")),
                  ("casts / copies", ("copy_kernel", "direct_copy", "memcpy")),
                  ("elementwise / reductions", ("elementwise_kernel", "reduce_kernel", "softmax", "norm")))


def _train_step(model, opt, x, graphs: bool = False):
    """One optimizer step on the causal-LM loss of ``x`` (its own labels); returns the loss.
    ``graphs``: the model replays CUDA graphs (compile mode reduce-overhead): the step is marked as
    new and the loss copied out of the graph's output buffer, which the next replay overwrites."""
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()
    loss = model(input_ids=x, labels=x).loss
    kept = loss.detach().clone() if graphs else loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return kept


def _profile_step(arm: str, model, opt, x, graphs: bool = False) -> None:
    """One more training step under torch.profiler: GPU time by kernel group, the step's wall time,
    and the top kernels (where an arm's step goes; printed, not stored)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        _train_step(model, opt, x, graphs)   # graphs: replayed like the timed steps
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    groups: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA:   # kernels and copies only: CPU ops' device totals repeat them
            continue
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        if us <= 0:
            continue
        name = e.key.lower()
        group = next((g for g, frags in _KERNEL_GROUPS if any(f.lower() in name for f in frags)), "other")
        groups[group] = groups.get(group, 0.0) + us
        kernels.append((us, e.count, e.key[:90]))
    total = sum(groups.values())
    print(f"  profile {arm}: step wall {wall * 1e3:.1f} ms (under the profiler), GPU kernel time {total / 1e3:.1f} ms")
    for g, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"    {g:24s} {us / 1e3:9.1f} ms  {us / total:6.1%}")
    for us, n, name in sorted(kernels, reverse=True)[:25]:
        print(f"      {us / 1e3:8.2f} ms  x{n:<5d} {name}")


def _host_profile_step(arm: str, model, opt, x, device, graphs: bool = False) -> None:
    """Two more training steps under cProfile: the host (Python) time by function, top entries by
    own time and the package's functions by cumulative time (printed, not stored)."""
    import cProfile
    import io
    import pstats

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(2):
        _train_step(model, opt, x, graphs)
    prof.disable()
    host = (time.perf_counter() - t) / 2
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t) / 2
    print(f"  host profile {arm}: {host * 1e3:.1f} ms host / {wall * 1e3:.1f} ms wall per step (under cProfile)")
    for key, limit, restrict in (("tottime", 30, ()), ("cumulative", 25, ("lora_kernels",))):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(*restrict, limit)
        print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:6000])


def run_arm(arm: str, cfg, vocab: int, batches, args, device) -> dict:
    import peft
    import transformers

    from lora_kernels.finetune import TARGETS, _llama_config, quantize_base
    from lora_kernels.integrations.model_kernels import patch_model_kernels
    from lora_kernels.integrations.peft import patch_peft_model

    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):
        base = transformers.LlamaForCausalLM(_llama_config(cfg, vocab))
    base.config.use_cache = False   # training: no KV cache (and no "incompatible with checkpointing" warning,
    #                                 a graph break per trace under --compile)
    params = sum(p.numel() for p in base.parameters())         # before packing two weights a byte
    base, _ = quantize_base(base, device, compute_dtype=torch.bfloat16)
    base = base.to(torch.bfloat16)
    torch.manual_seed(cfg.seed + 2)
    model = peft.get_peft_model(base, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                      target_modules=TARGETS))
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    row = dict(bench="finetune", model=args.model, arm=arm, batch=cfg.batch, seq=cfg.seq_len, r=args.r,
               grad_ckpt=bool(args.grad_ckpt), steps=len(batches))
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r} (expected one of {ARMS})")
    if arm in ("ours", "ours_fused"):
        rep = patch_peft_model(model)
        row["patched"], row["skipped"] = len(rep.patched), len(rep.skipped)
    if arm == "ours_fused":
        mk = patch_model_kernels(model)
        row["model_kernels"] = " ".join(f"{k}:{len(v)}" for k, v in mk.patched.items())
        if mk.skipped:
            row["model_kernels"] += f" skipped:{len(mk.skipped)}"
    model.train()
    # foreach (torch's default) or fused (one kernel per step; transformers' Trainer default); every arm alike
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0,
                            **({"fused": True} if args.optim == "fused" else {}))
    row["optim"] = args.optim
    if args.compile:   # every arm alike; the first (warm-up) step compiles
        model = torch.compile(model, backend=args.compile, mode=args.compile_mode)
        row["compiled"] = args.compile + (f"/{args.compile_mode}" if args.compile_mode else "")
    if cuda:   # peak memory of training, not of building the model (its fp32 init is the same in every arm)
        torch.cuda.synchronize(device)
        row["model_mem_mb"] = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    graphs = bool(args.compile) and args.compile_mode == "reduce-overhead"
    losses = []
    t0 = None
    t_start = time.perf_counter()
    for i, x in enumerate(batches):
        if i == args.warmup:
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            row["warmup_s"] = t0 - t_start     # the warm-up steps' wall time, compilation included
        losses.append(_train_step(model, opt, x, graphs).detach())
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    if args.profile and cuda:
        _profile_step(arm, model, opt, batches[-1], graphs)
    if args.host_profile:
        _host_profile_step(arm, model, opt, batches[-1], device, graphs)
    row["losses"] = [float(v) for v in losses]
    row["tokens_per_s"] = (len(batches) - args.warmup) * cfg.batch * cfg.seq_len / dt
    row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    row["params_m"] = params / 1e6
    row["loss_first"], row["loss_last"] = row["losses"][0], row["losses"][-1]
    del model, base, opt, losses
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _write(rows: list[dict], arms: list[str], args, cfg, vocab: int, env: dict):
    """Ratios against peft_bnb (where it ran), then the JSON and markdown files of the arms run so
    far.  Returns (rows as written, json path, markdown path)."""
    rows = [dict(r) for r in rows]
    ref = next((r for r in rows if r["arm"] == "peft_bnb" and "losses" in r), None)
    for r in rows:
        if ref is not None and r is not ref and "losses" in r:
            d = [abs(a - b) for a, b in zip(r["losses"], ref["losses"])]
            r["max_abs_loss_diff"] = max(d)
            r["max_rel_loss_diff"] = max(x / abs(b) for x, b in zip(d, ref["losses"]))
            r["speedup_vs_peft_bnb"] = r["tokens_per_s"] / ref["tokens_per_s"]
            if r["peak_mem_mb"] and ref["peak_mem_mb"]:
                r["mem_ratio_vs_peft_bnb"] = r["peak_mem_mb"] / ref["peak_mem_mb"]
    out = [harness.make_row(ROW_KEYS + ("losses",), **r) for r in rows]
    tag = f"finetune_{env['key']}_{args.model}{'_ckpt' if args.grad_ckpt else ''}{'_compiled' if args.compile else ''}"
    tag += f"_{args.compile_mode.replace('-', '_')}" if args.compile and args.compile_mode else ""
    tag += "_fusedadamw" if args.optim == "fused" else ""
    notes = [f"model {args.model}: LlamaForCausalLM random init (seed {cfg.seed}), hidden {cfg.hidden}, {cfg.layers} "
             f"layers, MLP {cfg.intermediate}, vocab {vocab}; NF4 (double quant) decoder linears, bf16 elsewhere",
             f"LoRA r={args.r} alpha={2 * args.r} on all decoder linears; AdamW ({args.optim}) lr {cfg.lr}; "
             f"batch {cfg.batch} x seq "
             f"{cfg.seq_len}; {args.steps} steps, tokens/s over the last {args.steps - args.warmup}",
             "loss diffs: per step against peft_bnb (same init, same batches)",
             "peak_mem_mb: torch.cuda.max_memory_allocated over the training steps (model, optimizer state and "
             "activations; peak stats reset after the model was built, quantized, wrapped and patched); "
             "model_mem_mb: memory allocated before the first step"]
    if args.compile:
        notes.append(f"compiled: every arm's model through torch.compile(backend={args.compile!r}, "
                     f"mode={args.compile_mode!r}) after wrapping "
                     "and patching; compilation happens in the warm-up steps (not timed)")
    if len(rows) < len(arms):
        notes.append(f"partial: {len(rows)} of the {len(arms)} arms requested ({','.join(arms)}) had run when "
                     "this file was written")
    jpath, mpath = harness.write_results(tag, out, env, args.out, meta={"model": args.model}, columns=ROW_KEYS,
                                         notes=notes)
    return out, jpath, mpath


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_finetune", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1b", choices=("demo", "1b"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--arms", default="peft_bnb,ours,ours_fused", help=f"comma-separated, of {ARMS}")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--profile", action="store_true", help="after timing, profile one more step per arm and print "
                   "its GPU time by kernel group (not stored)")
    p.add_argument("--host-profile", action="store_true", help="after timing, run two more steps per arm under "
                   "cProfile and print where the host time goes (not stored)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile each arm's model (default backend inductor) after wrapping and patching: "
                        "how much of the eager step's host cost compiling removes, for every arm alike; "
                        "compilation happens in the warm-up steps")
    p.add_argument("--optim", default="foreach", choices=("foreach", "fused"),
                   help="AdamW implementation for every arm: foreach (torch's default, this bench's default) or fused "
                        "(transformers' Trainer default, adamw_torch_fused)")
    p.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode with --compile (reduce-overhead replays the compiled step as CUDA graphs)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU anyway (a check of the code path; fp32 "
                   "adapters, bf16 base compute)")
    args = p.parse_args(argv)
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    if args.compile_mode and not args.compile:
        p.error("--compile-mode needs --compile")
    os.environ.setdefault("LORA_KERNELS_QUIET", "1")
    lk, env, gpu = harness.start("bench_finetune", ("patch_peft_model",), args.cpu,
                                 "runs only with --cpu (a slow check of the code path)")
    if not gpu and not args.cpu:
        return []
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        from lora_kernels.integrations.bnb_cpu import use_portable_bnb_cpu_paths

        if use_portable_bnb_cpu_paths():
            print("bench_finetune: bitsandbytes' native CPU NF4 dequantize is wrong on this CPU; its portable "
                  "implementation is used (lora_kernels/integrations/bnb_cpu.py)")
    cfg, vocab = _config(args.model)
    if args.batch:
        cfg.batch = args.batch
    if args.seq:
        cfg.seq_len = args.seq
    vocab, batches = _data(cfg, vocab, args.steps, device)
    arms = args.arms.split(",")
    rows = []
    for arm in arms:
        print(f"arm {arm} ...", flush=True)
        try:
            rows.append(run_arm(arm, cfg, vocab, batches, args, device))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(bench="finetune", model=args.model, arm=arm, note=f"failed: {harness.short_error(e)}"))
        r = rows[-1]
        print(f"  {arm}: {r.get('tokens_per_s') or float('nan'):,.0f} tokens/s, peak {r.get('peak_mem_mb') or 0:,.0f} MiB, "
              f"warm-up {r.get('warmup_s') or float('nan'):.1f} s, losses {[round(v, 4) for v in r.get('losses', [])]} "
              f"{r.get('note', '')}", flush=True)
        # written after every arm (the same files, rewritten): a run cut short keeps the arms it finished
        out, jpath, mpath = _write(rows, arms, args, cfg, vocab, env)
    print(f"wrote {jpath} and {mpath}")
    print(harness.markdown_table(out, ("arm", "tokens_per_s", "speedup_vs_peft_bnb", "peak_mem_mb",
                                       "mem_ratio_vs_peft_bnb", "loss_first", "loss_last", "max_abs_loss_diff",
                                       "max_rel_loss_diff", "note")))
    return out


if __name__ == "__main__":
    main()
