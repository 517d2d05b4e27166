"""Host cost of launching our Triton kernels, and where a training step's host time goes.

Three things, GPU only, printed as plain text:

1. host µs per call of a trivial Triton kernel (through ``kernel[grid](...)`` and through the
   compiled kernel's own ``run``, the launcher the JIT ends in) and of ``nf4_merge.merge_window`` on
   tiny tensors with the plain launch and with ``triton/launch.py``'s cached launch; a tiny
   ``torch.mm`` for scale;
2. a cProfile of eager QLoRA training steps (forward + ``torch.autograd.grad``), by own time;
3. the installed triton's ``JITFunction.run`` source, so the launch path measured is on record.

    python -m benchmarks.launch_probe [--shape 4096x4096] [--m 1024] [--steps 30]
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import os
import pstats

import torch
import triton
import triton.language as tl

from benchmarks.overhead_probe import per_call_us, print_host_costs


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


def _direct(kernel, grid, args):
    """Launch a compiled kernel through its launcher only (what JITFunction.run ends with)."""
    stream = torch.cuda.current_stream().cuda_stream
    kernel.run(grid, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *args)


def launch_costs() -> None:
    from lora_kernels import quantize_nf4
    from lora_kernels.triton import nf4_merge

    dev, bf = "cuda", torch.bfloat16
    src = torch.randn(1024, device=dev)
    dst = torch.empty_like(src)
    ck = _copy_kernel[(1,)](src, dst, 1024, BLOCK=1024)
    rows = [("torch.mm 32x256x256", lambda a=torch.randn(32, 256, device=dev, dtype=bf),
             b=torch.randn(256, 256, device=dev, dtype=bf): torch.mm(a, b)),
            ("triton trivial kernel[grid](3 args)", lambda: _copy_kernel[(1,)](src, dst, 1024, BLOCK=1024)),
            ("triton trivial kernel.run direct", lambda: _direct(ck, 1, (src, dst, 1024, 1024)))]

    K, N, r = 256, 256, 16
    q = quantize_nf4(torch.randn(N, K, device=dev, dtype=bf))
    A = torch.randn(r, K, device=dev, dtype=bf) * 0.05
    B = torch.randn(N, r, device=dev, dtype=bf) * 0.05
    out = torch.empty(N, K, device=dev, dtype=bf)

    def merge():
        nf4_merge.merge_window(out, q, A, B, 2.0, None, (0, N), (0, K))
    print_host_costs(rows)
    for fast, name in (("0", "merge_window, plain kernel[grid] launch"),
                       ("1", "merge_window, cached launch (launch.py)")):
        os.environ["LORA_KERNELS_TRITON_FAST_LAUNCH"] = fast
        print(f"{name:45s} {per_call_us(merge):12.1f}", flush=True)
    os.environ.pop("LORA_KERNELS_TRITON_FAST_LAUNCH", None)


def profile_step(shape: str, m: int, steps: int) -> None:
    import lora_kernels as lk

    dev, bf, r = "cuda", torch.bfloat16, 16
    K, N = (int(v) for v in shape.split("x"))
    q = lk.quantize_nf4(torch.randn(N, K, device=dev, dtype=bf) * 0.02)
    A = (torch.randn(r, K, device=dev, dtype=bf) * 0.02).requires_grad_()
    B = (torch.randn(N, r, device=dev, dtype=bf) * 0.02).requires_grad_()
    x = torch.randn(m, K, device=dev, dtype=bf, requires_grad=True)
    g = torch.randn(m, N, device=dev, dtype=bf)

    W = torch.randn(N, K, device=dev, dtype=bf) * 0.02

    def step():
        return torch.autograd.grad(lk.qlora_linear(x, q, A, B, 2.0), (x, A, B), g)
    y_kept = lk.qlora_linear(x, q, A, B, 2.0)
    pieces = [("qlora_linear step (fwd + grad)", step),
              ("qlora_linear forward (recording)", lambda: lk.qlora_linear(x, q, A, B, 2.0)),
              ("its backward (grad, retained graph)", lambda: torch.autograd.grad(y_kept, (x, A, B), g,
                                                                                  retain_graph=True)),
              ("bf16 F.linear + LoRA step (autograd)", lambda: torch.autograd.grad(
                  torch.nn.functional.linear(x, W) + (x @ A.t() * 2.0) @ B.t(), (x, A, B), g))]
    print(f"\nhost us per call, {shape} M={m} r={r} (no sync inside):")
    print_host_costs(pieces, steps, header=False)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(35)
    st.sort_stats("cumulative").print_stats(35)
    print(s.getvalue())


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--m", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("launch_probe: needs a CUDA GPU (it measures host time around GPU launches); nothing to do")
        return
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    launch_costs()
    profile_step(args.shape, args.m, args.steps)
    from triton.runtime.jit import JITFunction
    print(inspect.getsource(JITFunction.run))


if __name__ == "__main__":
    main()
