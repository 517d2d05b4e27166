// CPU kernels of the NF4 format (csrc/cpu/nf4_cpu.cpp).  Raw pointers, no checks: the caller
// (csrc/bindings_cpu.cpp) validates shapes/dtypes and allocates the outputs.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace lora_kernels {
namespace cpu {

// w: [n] of w_dtype (fp32/bf16/fp16); packed: uint8 [(n + 1) / 2]; absmax: fp32 [ceil(n / bs)].
void quantize_blocks(const void* w, c10::ScalarType w_dtype, int64_t n, int64_t blocksize,
                     uint8_t* packed, float* absmax);

// absmax: fp32 [nb]; offset: one fp32; code: fp32 [256]; q: uint8 [nb];
// nested_absmax: fp32 [ceil(nb / 256)].
void quantize_absmax_nested(const float* absmax, int64_t nb, float offset, const float* code,
                            uint8_t* q, float* nested_absmax);

// absmax_q != nullptr: double quant (nested_absmax, nested_code, offset used), else absmax_f32.
void dequantize(const uint8_t* packed, const float* absmax_f32, const uint8_t* absmax_q,
                const float* nested_absmax, const float* nested_code, float offset,
                const float* code, int64_t n, int64_t blocksize, c10::ScalarType out_dtype,
                void* out);

}  // namespace cpu
}  // namespace lora_kernels
