"""Triton kernels (imported lazily by lora_kernels.library; needs `triton`).

Modules: nf4_quant (NF4 quantize / nested absmax quantize / dequantize).
"""
