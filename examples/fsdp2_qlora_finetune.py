"""QLoRA fine-tune of a small Llama on N processes with FSDP2, the 4-bit base sharded as bytes.

    torchrun --nproc_per_node 2 examples/fsdp2_qlora_finetune.py --device cpu --steps 10
    torchrun --nproc_per_node 8 examples/fsdp2_qlora_finetune.py --device cuda --bf16

The model is the ``demo`` command's (lora_kernels/finetune.py): transformers' LlamaForCausalLM
built from a config (random weights, fixed seed, nothing downloaded) over a char-level tokenizer
of an embedded text; its decoder's linear layers quantized to NF4 (``quantize_base``), PEFT LoRA
on all of them (``peft.get_peft_model``), routed through lora_kernels (``patch_peft_model``).
Every rank builds the same model, then ``prepare_fsdp2`` turns each NF4 base into one uint8
parameter and applies ``fully_shard`` to each decoder layer and the root.  Each step takes one
global batch (the same generator on every rank) and gives each rank its slice, so the run is
the single-process run on the global batch.  Printed per step (rank 0): the loss (mean over
ranks), the bytes all-gathered for the NF4 bases (measured on FSDP2's all-gathers) in bits per
base parameter, and at the end tokens/s.  gloo on the CPU, nccl on CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

try:
    import lora_kernels  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences), split evenly over the ranks")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=352)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true",
                   help="MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); the uint8 NF4 storage is not cast")
    p.add_argument("--save", default=None, help="write a sharded checkpoint (torch.distributed.checkpoint) here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import peft
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lora_kernels import finetune
    from lora_kernels.distributed import attach_all_gather_meter, nf4_all_gather_bytes, prepare_fsdp2
    from lora_kernels.integrations.peft import patch_peft_model

    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        if args.batch % world:
            raise SystemExit(f"--batch {args.batch} must be a multiple of the number of processes ({world})")
        cfg = finetune.DemoConfig(steps=args.steps, device=str(device), hidden=args.hidden, layers=args.layers,
                                  intermediate=args.intermediate, seq_len=args.seq_len, batch=args.batch, lr=args.lr,
                                  r=args.r, alpha=args.alpha, seed=args.seed)
        tok = finetune.CharTokenizer(finetune.TEXT)
        ids = torch.tensor(tok.encode(finetune.TEXT))

        base, n_quant = finetune.quantize_base(finetune.build_base(cfg, len(tok)), device)
        # build_base seeded the generator: get_peft_model draws the same LoRA init on every rank,
        # and the same as the demo command's (`python -m lora_kernels demo`)
        model = peft.get_peft_model(base, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                          target_modules=finetune.TARGETS))
        report = patch_peft_model(model)
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
        prepare_fsdp2(model, mp_policy=mp_policy)
        stats = nf4_all_gather_bytes(model)
        meter = attach_all_gather_meter(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in trainable)  # sharded DTensors: numel is the global size
        log(f"{world} process(es), {dist.get_backend()} on {device.type}; LlamaForCausalLM hidden {cfg.hidden}, "
            f"{cfg.layers} layers, {n_quant} linear layers in NF4; LoRA r={cfg.r} on {', '.join(finetune.TARGETS)}: "
            f"{n_train:,} trainable parameters; {len(report.patched)} PEFT layers patched; "
            f"mixed precision: {'bf16 params, fp32 reduce' if args.bf16 else 'none (fp32)'}")
        log(str(stats))
        # all-gathers of each base per step (FSDP2 does not communicate on one process)
        gathers = stats.bytes_per_step / stats.gathered_bytes if stats.gathered_bytes else 0

        opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
        batches = finetune._batches(ids, cfg, torch.Generator().manual_seed(cfg.seed + 1))
        local = cfg.batch // world
        model.train()
        t0 = None
        for step in range(1, cfg.steps + 1):
            if step == 2:  # the first step (lazy init, allocations) is not timed
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
            x = next(batches)[rank * local:(rank + 1) * local].to(device)
            meter.reset()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            mean /= world
            bits = 8 * meter.base_bytes / (stats.params * gathers) if gathers else 0.0
            log(f"step {step:>4}  loss {mean.item():.4f}  all-gathered for the NF4 base {meter.base_bytes / 2**20:.3f} "
                f"MiB ({gathers:g} all-gathers x {bits:.3f} bits/param), all parameters {meter.total_bytes / 2**20:.3f} "
                f"MiB in {meter.calls} all-gathers")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if t0 is not None:
            dt = time.perf_counter() - t0
            tokens = (cfg.steps - 1) * cfg.batch * cfg.seq_len
            log(f"{tokens / dt:,.0f} tokens/s over steps 2..{cfg.steps} (global batch {cfg.batch} x {cfg.seq_len} "
                f"tokens, {world} process(es))")
        if args.save:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            dcp.save(get_model_state_dict(model), checkpoint_id=args.save)
            log(f"saved a sharded checkpoint (NF4 bases as uint8 shards, LoRA, layouts) to {args.save}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
