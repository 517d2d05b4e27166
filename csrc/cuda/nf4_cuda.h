// Launchers of the NF4 CUDA kernels (csrc/cuda/nf4_cuda.cu).  Plain CUDA: raw device pointers
// and a cudaStream_t, no torch headers, so the .cu compiles with a bare nvcc.  Input validation
// is done by the caller (csrc/bindings_cuda.cpp); every launcher returns the launch error.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace lora_kernels {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// w: [n] of dtype (n >= 1); packed: uint8 [(n + 1) / 2]; absmax: fp32 [ceil(n / blocksize)].
// zero_word (optional): a word CTA 0 sets to 0 (the barrier counter of launch_absmax_mean_nested).
cudaError_t launch_quantize_blocks(const void* w, DType dtype, int64_t n, int blocksize,
                                   uint8_t* packed, float* absmax, cudaStream_t stream,
                                   uint32_t* zero_word = nullptr);

// absmax: fp32 [nb] (nb >= 1); offset: fp32 [1] (device); code: fp32 [256] sorted (device);
// q: uint8 [nb]; nested_absmax: fp32 [ceil(nb / 256)].
cudaError_t launch_quantize_absmax_nested(const float* absmax, int64_t nb, const float* offset,
                                          const float* code, uint8_t* q, float* nested_absmax,
                                          cudaStream_t stream);

// The double quantization's second half in one launch: offset = torch.mean(absmax) in the exact
// order of torch's CUDA reduction (shfl_up: the warp-shuffle order of torch < 2.13), then q /
// nested_absmax as launch_quantize_absmax_nested, and fresh copies of the tables (code_out [16]
// from nf4_code, dyn_code_out [256] from dyn_code; both may be nullptr).  q == nullptr: the
// offset only.  absmax: fp32 [nb], nb >= 2048, 16-byte aligned; offset: fp32 [1];
// ctas: torch's CTA count for nb values on the current device, from absmax_mean_workspace, which is
// also the size of staging (fp32 [ctas]); *arrived must be 0 at launch.  wait_ns: how long a
// CTA waits at the grid barrier before computing its peers' partials itself (< 0: 2 ms).
cudaError_t absmax_mean_workspace(int64_t nb, int* ctas);
cudaError_t launch_absmax_mean_nested(const float* absmax, int64_t nb, int ctas, bool shfl_up,
                                      float* staging, uint32_t* arrived, float* offset,
                                      const float* dyn_code, uint8_t* q, float* nested_absmax,
                                      const float* nf4_code, float* code_out, float* dyn_code_out,
                                      cudaStream_t stream, int64_t wait_ns = -1);

// Double quant when absmax_q != nullptr (then nested_absmax [ceil(nb/256)], nested_code [256]
// and offset [1] are used and absmax_f32 is ignored); else absmax_f32 [nb].
// packed: uint8 [(n + 1) / 2]; code: fp32 [16]; out: [n] of out_dtype.
cudaError_t launch_dequantize(const uint8_t* packed, const float* absmax_f32,
                              const uint8_t* absmax_q, const float* nested_absmax,
                              const float* nested_code, const float* offset, const float* code,
                              int64_t n, int blocksize, DType out_dtype, void* out,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_kernels
