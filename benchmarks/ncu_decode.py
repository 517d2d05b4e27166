"""Driver for profiling one decode kernel under Nsight Compute (GPU): quantizes a random K x N weight
(bf16, blocksize 64, double quantization), then calls _C_cuda.lora_gemv 12 times with the given
variant, so that `ncu --launch-skip 6 --launch-count 1 -k regex:nf4_gemv_vV_kernel` profiles a warm call.

    ncu ... python benchmarks/ncu_decode.py K N M r variant
"""

import sys

import torch

import lora_kernels as lk
from lora_kernels import _ext


def main(argv) -> int:
    if len(argv) != 5:
        print(__doc__)
        return 2
    K, N, M, r, v = (int(a) for a in argv)
    ext = _ext.cuda_ext()
    if not torch.cuda.is_available() or ext is None or not hasattr(ext, "lora_gemv"):
        print("ncu_decode: needs a CUDA GPU and lora_kernels._C_cuda with lora_gemv")
        return 1
    q = lk.quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(r, K, device="cuda", dtype=torch.bfloat16) * 0.02 if r else None
    B = torch.randn(N, r, device="cuda", dtype=torch.bfloat16) * 0.02 if r else None
    args = (x, q.packed.view(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, N, q.blocksize, A, B,
            2.0, None, None)
    for _ in range(12):
        ext.lora_gemv(*args, variant=v)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
