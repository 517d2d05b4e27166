// Launcher of the fused QLoRA decode kernel (csrc/cuda/nf4_gemv.cu): for M <= 16 rows of x,
//   y[M, N] = x · Ŵᵀ + ((x · Aᵀ) ⊙ s) · Bᵀ + bias,
// reading the NF4 weight as 4 bits (never written dense).  Plain CUDA, no torch headers; the
// caller (csrc/bindings_cuda.cpp) validates shapes, dtypes, devices and alignment.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/nf4_cuda.h"

namespace lora_kernels {
namespace cuda {

constexpr int kGemvMaxM = 16;      // rows of x one launch handles (the MMA's M)
constexpr int kGemvKChunk = 64;    // K must be a multiple of this, and of the blocksize
constexpr int kGemvMaxRank = 256;

struct GemvArgs {
  // x [M, K] and y [M, N]: dtype (bf16 or fp16), row-major, 16-byte aligned rows.
  const void* x = nullptr;
  void* y = nullptr;
  DType dtype = DType::kBFloat16;
  int M = 0, N = 0, K = 0;
  // The NF4 weight (N, K): packed uint8 [N*K/2] (8-byte aligned), blocksize a multiple of 64.
  // Double quant when absmax_q != nullptr (then nested_absmax, nested_code [256], offset [1]);
  // else absmax_f32 [N*K/blocksize].  code: fp32 [16].
  const uint8_t* packed = nullptr;
  const float* absmax_f32 = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  const float* offset = nullptr;
  const float* code = nullptr;
  int blocksize = 64;
  // Low-rank term (lora_a == nullptr: none): lora_a [r, K] and lora_b [N, r] of dtype, s = the
  // scalar `scale` or scale_vec [r] (fp32) when given; t_ws: fp32 [M, r] scratch for x·Aᵀ ⊙ s.
  const void* lora_a = nullptr;
  const void* lora_b = nullptr;
  int r = 0;
  float scale = 1.f;
  const float* scale_vec = nullptr;
  float* t_ws = nullptr;
  // bias [N] (nullptr: none), of dtype or fp32 (bias_f32).
  const void* bias = nullptr;
  bool bias_f32 = false;
};

// Variant 1 (csrc/cuda/nf4_gemv.cu).  Two launches on `stream`: T = (x · Aᵀ) ⊙ s into t_ws (only
// with a low-rank term), then the GEMV with the low-rank product and bias in its epilogue.
cudaError_t launch_nf4_lora_gemv(const GemvArgs& args, cudaStream_t stream);

// Variant 2 (csrc/cuda/nf4_gemv_v2.cu): one persistent launch, same math and rounding.
// nf4_lora_gemv_v2_config: false when variant 2 cannot run these arguments on the current device
// (shared memory, 32-bit offsets, sm < 80); else *workspace_bytes = the device workspace it needs
// (0 without a low-rank term; with one: T, its partial sums, the fp32 base results and two flag
// words; t_ws is not used).  The workspace needs no initialization and may be reused by the next
// call on the same stream once this one is done (the kernel leaves its flags in a clean state).
bool nf4_lora_gemv_v2_config(const GemvArgs& args, size_t* workspace_bytes);
cudaError_t launch_nf4_lora_gemv_v2(const GemvArgs& args, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream);

// Variant 3 (csrc/cuda/nf4_gemv_v3.cu): CUDA-core GEMV for few rows of x (M <= kV3DefaultMaxM unless
// $LORA_KERNELS_GEMV_V3_MAX_M raises it, up to kV3MaxM), bandwidth-first (16-byte
// streaming loads, byte -> dtype-pair table, x in shared memory as fp32); same math as variant 1,
// the block scale applied per 32 products, another fp32 summation order.
// nf4_lora_gemv_v3_config: false when variant 3 does not take these arguments (M above its limit,
// sm < 80, ...): the caller then runs variant 1; else *workspace_bytes = the device workspace it needs (T =
// x·Aᵀ ⊙ s with a low-rank term; fp32 partial sums when K is split over CTAs; 0 when neither; t_ws is
// not used).  No initialization needed; reusable by the next call on the same stream.
constexpr int kV3MaxM = 8;          // rows of x the kernel is built for
constexpr int kV3DefaultMaxM = 4;   // rows it takes unless $LORA_KERNELS_GEMV_V3_MAX_M says otherwise
bool nf4_lora_gemv_v3_config(const GemvArgs& args, size_t* workspace_bytes);
cudaError_t launch_nf4_lora_gemv_v3(const GemvArgs& args, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream);

// Variant 4 (csrc/cuda/nf4_gemv_v4.cu): tensor-core GEMV for M = 1..16 with the weight as the MMA's
// A operand (16 weight rows per m16n8k16 MMA, rows of x as its n8 columns), a persistent grid (SMs x
// CTAs per SM) splitting the (16-row tile, K slice) work evenly, a byte -> dtype-pair table built
// in shared memory once per CTA, x of the K slice in shared memory; same math as variant 1 (block
// scale per 64 products after the MMA), another fp32 summation order.
// nf4_lora_gemv_v4_config: false when variant 4 does not take these arguments (sm < 80, 32-bit index
// overflow, shared memory, ...): the caller then runs variant 1; else *workspace_bytes = the device
// workspace it needs (T = x·Aᵀ ⊙ s with a low-rank term; fp32 partial sums [S][M][N] when K is split
// into S > 1 slices; 0 when neither; t_ws is not used).  No initialization needed; reusable by the
// next call on the same stream.  $LORA_KERNELS_GEMV_V4_PDL=0 turns programmatic dependent launch off.
bool nf4_lora_gemv_v4_config(const GemvArgs& args, size_t* workspace_bytes);
cudaError_t launch_nf4_lora_gemv_v4(const GemvArgs& args, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream);

// Variant 5 (csrc/cuda/nf4_gemv_v5.cu): tensor-core GEMV for M = 1..kV5MaxM with the weight as the
// MMA's A operand (variant 4's fragment map), fed from a per-warp cp.async ring in shared memory
// (3 steps of 1 KB requested ahead per warp), a persistent grid (one 512-thread CTA per SM) whose
// warps split the (16-row tile, K slice) units evenly, x in shared memory (all of it, or per CTA's K
// slices: nf4_lora_gemv_v5_mode); same math as variant 4.  nf4_lora_gemv_v5_config: false when
// variant 5 does not take these arguments (M > 16,
// K % 256 != 0, blocksize < 64, alignment, shared memory, sm < 80, ...): the caller then runs
// variant 1; else *workspace_bytes = the device workspace it needs (T = x·Aᵀ ⊙ s with a low-rank
// term; fp32 partial sums [S][M][N] when K is split into S > 1 slices; 0 when neither; t_ws is not
// used).  nf4_lora_gemv_v5_plan: what it would do (all 0: it does not take the arguments).
// $LORA_KERNELS_GEMV_V5_PDL=0 turns programmatic dependent launch off.
constexpr int kV5MaxM = 16;  // M = 9..16: two n8 MMA tiles of x per weight fragment
struct V5Plan {
  int slices = 0;  // the K slices S
  int mode = 0;    // 1 = all of x in shared memory (tile-major units), 2 = x staged per CTA's K
                   // slices (slice-major units: where all of x does not fit, e.g. M >= 4 at
                   // K = 14336 or M = 9..16; added in session 15, measured in session 16)
  int stages = 0;  // ring depth per warp: 4; 6 where $LORA_KERNELS_GEMV_V5_STAGES=6 and x still fits
};
bool nf4_lora_gemv_v5_config(const GemvArgs& args, size_t* workspace_bytes);
V5Plan nf4_lora_gemv_v5_plan(const GemvArgs& args);
// y_alloc (optional): makes y and returns its device pointer (args.y is then ignored), called after
// the GEMV's launch where the finish kernel writes y -- the GEMV starts before y is allocated -- and
// before it otherwise.
using YAlloc = void* (*)(void* ctx);
cudaError_t launch_nf4_lora_gemv_v5(const GemvArgs& args, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream, YAlloc y_alloc = nullptr, void* y_ctx = nullptr);

}  // namespace cuda
}  // namespace lora_kernels
