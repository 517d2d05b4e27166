// Docstrings of the three functions, shared by the CPU and CUDA extension modules.
#pragma once

namespace lora_kernels {
namespace docs {

constexpr const char* kQuantizeBlocks =
    "quantize_blocks(w, blocksize) -> (packed, absmax)\n\n"
    "NF4-quantize a flat weight (= reference.quantize_blocks_reference).\n"
    "w: 1-D contiguous fp32/bf16/fp16 [n], n >= 1; blocksize in (32, 64, ..., 4096).\n"
    "Returns packed uint8 [(n + 1) // 2] and absmax fp32 [ceil(n / blocksize)]:\n"
    "absmax[b] = max |x| over block b (x in fp32); inv = fl(1 / max(absmax[b], 1e-38));\n"
    "idx = #{NF4 midpoints t : fl(x * inv) > t}; byte j = idx[2j] << 4 | idx[2j+1], the low\n"
    "nibble of the last byte is 7 for odd n.";

constexpr const char* kQuantizeAbsmaxNested =
    "quantize_absmax_nested(absmax, offset, code) -> (q, nested_absmax)\n\n"
    "8-bit quantization of absmax - offset in blocks of 256\n"
    "(= reference.quantize_absmax_nested_reference).\n"
    "absmax: 1-D contiguous fp32 [nb]; offset: 0-d fp32 (read on the device);\n"
    "code: 1-D contiguous fp32 [256], sorted.\n"
    "Returns q uint8 [nb] and nested_absmax fp32 [ceil(nb / 256)]: d = fl(absmax - offset),\n"
    "nested_absmax[j] = max |d| over block j, q = index of the code entry nearest to\n"
    "fl(d * fl(1 / max(nested_absmax, 1e-38))) (exact ties to the even index); q = 0 for a\n"
    "block with nested_absmax == 0.";

constexpr const char* kDequantize =
    "dequantize(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype,\n"
    "           out=None) -> Tensor\n\n"
    "Dequantize to a flat [n] tensor of dtype (= reference.dequantize_reference).\n"
    "packed: uint8 [(n + 1) // 2]; code: fp32 [16]; dtype: float32/bfloat16/float16.\n"
    "Double quant (nested_absmax, nested_code, offset all given): absmax uint8 [nb],\n"
    "nested_absmax fp32 [ceil(nb / 256)], nested_code fp32 [256], offset 0-d fp32, and\n"
    "absmax_eff[b] = fl(fl(nested_code[absmax[b]] * nested_absmax[b // 256]) + offset)\n"
    "(two roundings, no FMA).  Otherwise (all three None) absmax is fp32 [nb].\n"
    "out[i] = dtype(fl(code[idx[i]] * absmax_eff[i // blocksize])), round to nearest even;\n"
    "nb = ceil(n / blocksize).  out, if given, must be a 1-D contiguous [n] tensor of dtype on\n"
    "the same device; it is filled and returned.  All tensors 1-D contiguous on one device.";

constexpr const char* kLoraGemv =
    "lora_gemv(x, packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize,\n"
    "          lora_a=None, lora_b=None, scale=1.0, scale_vec=None, bias=None) -> Tensor\n\n"
    "CUDA only.  Fused QLoRA decode: y [..., n] = x · Ŵᵀ + ((x · lora_aᵀ) ⊙ s) · lora_bᵀ + bias,\n"
    "fp32 accumulation, in x's dtype.  x: [..., K] bf16/fp16 contiguous, M = x.numel() / K rows,\n"
    "1 <= M <= 16, K % 64 == 0; the NF4 weight (n, K) as in dequantize() (packed: any shape, e.g.\n"
    "bitsandbytes' [n K / 2, 1]), blocksize >= 64 dividing K;\n"
    "lora_a [r, K], lora_b [n, r] of x's dtype (1 <= r <= 256); s = scale_vec [r] (fp32) if\n"
    "given, else scale; bias [n] of x's dtype or fp32.  Ŵ is never written to memory.";

}  // namespace docs
}  // namespace lora_kernels
