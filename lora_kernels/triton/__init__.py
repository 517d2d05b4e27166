"""Triton kernels (imported lazily by lora_kernels.library; needs `triton`).

Modules: nf4_quant (NF4 quantize / nested absmax quantize / dequantize), nf4_lora_matmul (the
fused LoRA/QLoRA forward: tiled GEMM and split-K GEMV).
"""
