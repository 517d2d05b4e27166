"""The fused model ops (``lora_kernels.model_ops``) against transformers' own code for the same
math, at the sizes of the 1.1B fine-tune (``bench_finetune --model 1b``, batch 32 x 1024 tokens).

Per op and pass (forward alone; forward + backward through ``torch.autograd.grad``): median GPU time
of ours and of the transformers-numerics reference (the eager PyTorch code transformers runs: the
``*_reference`` functions reproduce it exactly), the memory floor (least bytes moved / copy bandwidth
measured in the same run), the ratios, and the largest difference between the two outputs.

    python -m benchmarks.bench_model_ops [--tokens 32768] [--out DIR]
"""

from __future__ import annotations

import argparse
import os

import torch

from . import harness

ROW_KEYS = ("bench", "op", "shape", "pass", "method", "median_ms", "p20_ms", "p80_ms", "floor_ms",
            "ratio_to_floor", "speedup_vs_transformers", "max_abs_diff_vs_transformers", "note")


def _cases(tokens: int, device):
    """(op, shape text, make_inputs() -> (args, grad_inputs), ours, reference, bytes fwd, bytes fwd+bwd)."""
    from lora_kernels.model_ops import cross_entropy, rms_norm, rope, swiglu

    bf16 = torch.bfloat16
    H, I, V, Hq, Hk, D = 2048, 5632, 32000, 32, 4, 64
    B, S = max(1, tokens // 1024), min(tokens, 1024)
    T = B * S
    g = torch.Generator(device=device).manual_seed(0)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(bf16)

    def norm_inputs():
        x = rn(T, H).requires_grad_()
        return (x, rn(H, scale=0.1) + 1, 1e-5), (x,)

    def mlp_inputs():
        gate, up = rn(T, I).requires_grad_(), rn(T, I).requires_grad_()
        return (gate, up), (gate, up)

    def rope_inputs():
        q = rn(B, S, Hq, D).transpose(1, 2).requires_grad_()
        k = rn(B, S, Hk, D).transpose(1, 2).requires_grad_()
        ang = torch.arange(S, device=device, dtype=torch.float32)[:, None] * torch.rand(D // 2, generator=g,
                                                                                          device=device)
        emb = torch.cat((ang, ang), dim=-1)[None].expand(B, S, D)
        return (q, k, emb.cos().to(bf16), emb.sin().to(bf16)), (q, k)

    def loss_inputs():
        logits = rn(B, S, V, scale=2.0).requires_grad_()
        labels = torch.randint(0, V, (B, S), generator=g, device=device)
        return (logits, labels, V), (logits,)

    n_x, n_mlp, n_qk, n_cs, n_l = T * H, T * I, T * (Hq + Hk) * D, 2 * T * D, T * V
    return [
        ("rms_norm", f"{T}x{H}", norm_inputs, rms_norm.rms_norm, rms_norm.rms_norm_reference,
         2 * n_x * 2, 5 * n_x * 2),
        ("silu_mul", f"{T}x{I}", mlp_inputs, swiglu.silu_mul, swiglu.silu_mul_reference,
         3 * n_mlp * 2, 8 * n_mlp * 2),
        ("rope", f"{B}x{S} q{Hq} k{Hk} d{D}", rope_inputs, rope.apply_rotary, rope.apply_rotary_reference,
         (2 * n_qk + n_cs) * 2, (4 * n_qk + 2 * n_cs) * 2),
        ("causal_lm_loss", f"{T}x{V}", loss_inputs, cross_entropy.causal_lm_loss,
         cross_entropy.causal_lm_loss_reference, n_l * 2, 3 * n_l * 2),
    ]


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def run(tokens: int, rep_ms: float, device) -> tuple[list[dict], float]:
    bw = harness.measure_copy_bandwidth()
    rows = []
    for op, shape, make, ours, ref, bytes_f, bytes_fb in _cases(tokens, device):
        args, wrt = make()
        outs = {}
        for method, fn in (("ours", ours), ("transformers", ref)):
            outs[method] = [o.detach() for o in _outputs(fn(*args))]

            def fwd(fn=fn):
                with torch.no_grad():
                    fn(*args)

            def fwd_bwd(fn=fn):
                o = _outputs(fn(*args))
                torch.autograd.grad(o, wrt, [torch.ones_like(t) if t.dim() == 0 else t.detach() for t in o])

            for pname, f, nbytes in (("fwd", fwd, bytes_f), ("fwd+bwd", fwd_bwd, bytes_fb)):
                try:
                    t = harness.time_cuda(f, [()], warmup_ms=10, rep_ms=rep_ms)
                    note = None
                except Exception as e:  # noqa: BLE001
                    t, note = {}, f"failed: {harness.short_error(e)}"
                floor = nbytes / bw * 1e3
                rows.append(dict(bench="model_ops", op=op, shape=shape, method=method, floor_ms=floor, note=note,
                                 **{"pass": pname}, **{k: t.get(k) for k in ("median_ms", "p20_ms", "p80_ms")}))
                if t:
                    rows[-1]["ratio_to_floor"] = t["median_ms"] / floor
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs["ours"], outs["transformers"]))
        mine = [r for r in rows if r["op"] == op]
        for r in mine:
            if r["method"] == "ours":
                r["max_abs_diff_vs_transformers"] = diff
                other = next(o for o in mine if o["method"] == "transformers" and o["pass"] == r["pass"])
                if r.get("median_ms") and other.get("median_ms"):
                    r["speedup_vs_transformers"] = other["median_ms"] / r["median_ms"]
        del args, wrt, outs
        torch.cuda.empty_cache()
    return rows, bw


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_model_ops", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768, help="tokens per step (batch x 1024)")
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    _, env, gpu = harness.start("bench_model_ops", ("patch_model_kernels",), False, "nothing to measure")
    if not gpu:
        return []
    rows, bw = run(args.tokens, args.rep_ms, torch.device("cuda"))
    out = [harness.make_row(ROW_KEYS, **r) for r in rows]
    notes = ["transformers = the eager PyTorch code transformers' Llama runs for the op (reproduced exactly by the "
             "model_ops *_reference functions); ours = the Triton path of the public function",
             "fwd+bwd = forward, then torch.autograd.grad for the inputs a LoRA step needs (norm weight frozen)",
             "floor_ms = least bytes moved (bf16 in/out, fp32 statistics ignored) / copy bandwidth of this run"]
    jpath, mpath = harness.write_results(f"model_ops_{env['key']}", out, env, args.out,
                                         meta={"tokens": args.tokens, "copy_bw_gbps": bw / 1e9}, columns=ROW_KEYS,
                                         notes=notes)
    print(harness.markdown_table(out, ROW_KEYS[1:]))
    print(f"wrote {jpath} and {mpath}")
    return out


if __name__ == "__main__":
    main()
