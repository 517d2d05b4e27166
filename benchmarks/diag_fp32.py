"""Diagnostic (GPU): where do our fp32 NF4 bytes differ from bitsandbytes' CUDA kernel?"""
import torch
import bitsandbytes.functional as F
import lora_kernels as lk
from lora_kernels.codes import nf4_thresholds

torch.manual_seed(0)
for backend in ("cuda", "triton"):
    for dt in (torch.float32, torch.bfloat16):
        tot = 0
        for trial in range(4):
            w = (torch.randn(4096, 4096, device="cuda") * (0.01 + trial)).to(dt)
            q = lk.quantize_nf4(w, 64, False, backend=backend)
            qb, sb = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
            diff = (q.packed != qb).reshape(-1).nonzero().flatten()
            tot += diff.numel()
            am_eq = torch.equal(q.absmax, sb.absmax)
            for j in diff[:3].tolist():
                for e in (2 * j, 2 * j + 1):
                    x = w.reshape(-1)[e].float()
                    a = q.absmax[e // 64]
                    s_ieee = x * (1.0 / a)
                    print(f"  {backend} {dt} byte {j} elem {e}: ours {int(q.packed.reshape(-1)[j]):02x} bnb {int(qb.reshape(-1)[j]):02x} "
                          f"x={x.item()!r} absmax={a.item()!r} x*(1/a)={s_ieee.item()!r} x/a={(x / a).item()!r} absmax_equal={am_eq}")
        print(f"{backend} {dt}: {tot} differing bytes over 4 x 16.8M elements")
th = nf4_thresholds("cuda")
print("thresholds", th.tolist())
