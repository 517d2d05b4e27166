// Fused QLoRA decode (M <= 16): y = x · Ŵᵀ + ((x · Aᵀ) ⊙ s) · Bᵀ + bias with the NF4 weight read
// as 4 bits and dequantized in registers.  Memory-bound on the packed weight; sm_80+ (mma.sync).
//
// Kernel 1, lora_t_kernel: T[m, j] = s_j · Σ_k x[m, k] A[j, k] in fp32, one CTA per (j, m).
// Kernel 2, nf4_gemv_kernel: the tensor-core GEMV.
//   * The MMA is mma.sync m16n8k16 (fp32 accumulate): its M = 16 rows of x (rows >= M are
//     zeros), its N = 8 weight rows, its K = 16.  A CTA owns 8*NT weight rows; its WARPS warps
//     split K into contiguous ranges of 64-element chunks (one chunk = one quantization block
//     or part of one: the blocksize is a multiple of 64) and add their partial sums through
//     shared memory at the end.
//   * Per chunk a lane (g = lane / 4, q = lane % 4) loads 8 packed bytes of weight row g of
//     each n8 tile: bytes [8q, 8q + 8) of the row's 32-byte chunk = k in [16q, 16q + 16).
//     The MMA's k order is permuted (the sum over k does not care): MMA step s (0..3), fragment
//     register j (0, 1), half h (0, 1) of lane q hold real k = 16q + 4s + 2j + h, i.e. byte
//     2s + j of the lane's 8 (high nibble = even k = low half).  The x (A operand) fragment
//     uses the same map, so lane q reads x[row][16q .. 16q + 16) as 8 contiguous 32-bit words.
//   * Dequantization: one 32-bit lookup per packed byte in a 256-entry table of dtype pairs
//     {code[byte >> 4], code[byte & 15]} -- exactly the MMA's B register.  The table is
//     replicated once per lane (entry v of lane l at word 32 v + l: bank l), so the warp-wide
//     random lookups never conflict (32 KB of shared memory per CTA).
//   * The block scale is applied after the MMA: each chunk's 4 MMAs accumulate into a fresh
//     fp32 fragment that is then scaled by its row's absmax (fp32, decoded in place when
//     double-quantized) and added to the running sum -- one multiply per 64 products.
//   * Epilogue (after the cross-warp sum): + Σ_j T[m, j] B[n, j] (fp32) + bias, cast, store.
// Numerics: the products are dtype(code) · x, summed in fp32, times the fp32 absmax; the
// reference rounds dtype(code · absmax) instead: both differ from the exact product by at most
// half an ulp of dtype per weight.

#include "cuda/nf4_gemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdlib>

#include "nf4_common.h"
#include "cuda/nf4_gemv_common.cuh"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr int kWarps = 8;                 // warps per CTA (K split)
constexpr int kThreads = kWarps * 32;
constexpr int kLutWords = 256 * 32;       // replicated byte table
constexpr int kTThreads = 128;            // lora_t_kernel

// Streaming load of the packed weight: read once, keep it out of L1 (x lives there).
__device__ __forceinline__ uint2 load_stream_u2(const uint8_t* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Kernel 1: T[m, j] = s_j · Σ_k x[m, k] A[j, k]  (grid (r, M), K % 8 == 0, 16-byte aligned rows)
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kTThreads)
lora_t_kernel(const T* __restrict__ x, const T* __restrict__ a, int K, int r, float scale,
              const float* __restrict__ scale_vec, float* __restrict__ t) {
  const int j = blockIdx.x, m = blockIdx.y;
  const uint4* xr = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * K);
  const uint4* ar = reinterpret_cast<const uint4*>(a + static_cast<int64_t>(j) * K);
  float acc = 0.f;
  for (int v = threadIdx.x; v < K / 8; v += kTThreads) {
    const uint4 xv = __ldg(xr + v), av = __ldg(ar + v);
    const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w}, aw[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 xf = Num<T>::unpack(xw[i]), af = Num<T>::unpack(aw[i]);
      acc = __fmaf_rn(xf.x, af.x, acc);
      acc = __fmaf_rn(xf.y, af.y, acc);
    }
  }
  __shared__ float part[kTThreads / 32];
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kTThreads / 32; ++w) total += part[w];
    t[static_cast<int64_t>(m) * r + j] = total * (scale_vec != nullptr ? scale_vec[j] : scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: the GEMV (grid ceil(N / (8 NT)), kThreads threads, kSmemBytes dynamic... static)
// ---------------------------------------------------------------------------------------------
struct GemvParams {
  const void* x;
  void* y;
  int M, N, K;
  const uint8_t* packed;
  const float* absmax_f32;
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  const float* offset;
  const float* code;
  int log2_bs;
  const void* lora_b;
  int r;
  const float* t;
  const void* bias;
  bool bias_f32;
};

template <bool kNested>
__device__ __forceinline__ float block_absmax(const GemvParams& p, const float* ncode_s, int64_t blk) {
  if (kNested) {
    const float prod = __fmul_rn(ncode_s[__ldg(p.absmax_q + blk)],
                                 __ldg(p.nested_absmax + (blk >> 8)));  // 256 absmax per nested block
    return __fadd_rn(prod, __ldg(p.offset));
  }
  return __ldg(p.absmax_f32 + blk);
}

template <typename T, int NT, bool kNested>
__global__ void __launch_bounds__(kThreads, 2)
nf4_gemv_kernel(const GemvParams p) {
  __shared__ uint32_t lut[kLutWords];        // reused for the cross-warp sum after the K loop
  __shared__ float ncode_s[256];
  static_assert(kWarps * NT * 4 * 32 <= kLutWords, "reduction buffer fits in the table");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int i = tid; i < kLutWords; i += kThreads) {
    const int v = i >> 5;
    lut[i] = Num<T>::pack(__ldg(p.code + (v >> 4)), __ldg(p.code + (v & 15)));
  }
  if (kNested) {
    for (int i = tid; i < 256; i += kThreads) ncode_s[i] = __ldg(p.nested_code + i);
  }
  __syncthreads();

  const int g = lane >> 2, q = lane & 3;
  const int M = p.M, N = p.N, K = p.K;
  const int64_t KH = K / 2;
  const int64_t KB = K >> p.log2_bs;
  const int n_cta = blockIdx.x * (8 * NT);
  const int chunks = K / kGemvKChunk;
  const int c_begin = static_cast<int>(static_cast<int64_t>(chunks) * warp / kWarps);
  const int c_end = static_cast<int>(static_cast<int64_t>(chunks) * (warp + 1) / kWarps);
  const int chunk_log2_per_block = p.log2_bs - 6;  // chunks per quantization block (log2)

  // Rows past N are clamped: they only feed output columns that are never stored.
  const uint8_t* wrow[NT];
  int64_t arow0[NT], arow1[NT];   // absmax rows of this lane's two output columns, times KB
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int n = min(n_cta + 8 * t + g, N - 1);
    wrow[t] = p.packed + static_cast<int64_t>(n) * KH + q * 8;
    arow0[t] = static_cast<int64_t>(min(n_cta + 8 * t + 2 * q, N - 1)) * KB;
    arow1[t] = static_cast<int64_t>(min(n_cta + 8 * t + 2 * q + 1, N - 1)) * KB;
  }
  const T* x = static_cast<const T*>(p.x);
  const bool has_row0 = g < M, has_row1 = g + 8 < M;
  const uint4* xr0 = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(has_row0 ? g : 0) * K + q * 16);
  const uint4* xr1 = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(has_row1 ? g + 8 : 0) * K + q * 16);

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

  const uint32_t* lut_lane = lut + lane;
  // The weight of kDepth consecutive chunks is requested before any of them is used: per row a
  // warp then has kDepth * 32 contiguous bytes (a whole 128-byte line) in flight, and each SM
  // ~16 warps x 32 lanes x kDepth * NT * 8 bytes -- enough to cover HBM latency.  x (shared by
  // all CTAs, L1/L2-resident) is loaded per chunk.
  constexpr int kDepth = 4;
  for (int c0 = c_begin; c0 < c_end; c0 += kDepth) {
    uint2 wv[kDepth][NT];
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        wv[d][t] = (c0 + d < c_end) ? load_stream_u2(wrow[t] + static_cast<int64_t>(c0 + d) * 32)
                                    : make_uint2(0u, 0u);
      }
    }
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const int c = c0 + d;
      if (c >= c_end) break;
      uint32_t x0[8], x1[8];
      {
        uint4 u = make_uint4(0u, 0u, 0u, 0u), v = u;
        if (has_row0) { u = __ldg(xr0 + c * 8); v = __ldg(xr0 + c * 8 + 1); }
        x0[0] = u.x; x0[1] = u.y; x0[2] = u.z; x0[3] = u.w; x0[4] = v.x; x0[5] = v.y; x0[6] = v.z; x0[7] = v.w;
        u = make_uint4(0u, 0u, 0u, 0u); v = u;
        if (has_row1) { u = __ldg(xr1 + c * 8); v = __ldg(xr1 + c * 8 + 1); }
        x1[0] = u.x; x1[1] = u.y; x1[2] = u.z; x1[3] = u.w; x1[4] = v.x; x1[5] = v.y; x1[6] = v.z; x1[7] = v.w;
      }
      const int64_t kb = c >> chunk_log2_per_block;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const float s0 = block_absmax<kNested>(p, ncode_s, arow0[t] + kb);
        const float s1 = block_absmax<kNested>(p, ncode_s, arow1[t] + kb);
        float cb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const uint32_t word = (s < 2) ? wv[d][t].x : wv[d][t].y;
          const int shift = (s & 1) * 16;
          const uint32_t b0 = lut_lane[((word >> shift) & 0xffu) * 32];
          const uint32_t b1 = lut_lane[((word >> (shift + 8)) & 0xffu) * 32];
          Num<T>::mma(cb, x0[2 * s], x1[2 * s], x0[2 * s + 1], x1[2 * s + 1], b0, b1);
        }
        acc[t][0] = __fmaf_rn(cb[0], s0, acc[t][0]);
        acc[t][1] = __fmaf_rn(cb[1], s1, acc[t][1]);
        acc[t][2] = __fmaf_rn(cb[2], s0, acc[t][2]);
        acc[t][3] = __fmaf_rn(cb[3], s1, acc[t][3]);
      }
    }
  }

  // Cross-warp sum through the (now free) table memory: red[warp][i][lane], i = 4 t + e.
  __syncthreads();
  float* red = reinterpret_cast<float*>(lut);
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) red[(warp * NT * 4 + t * 4 + e) * 32 + lane] = acc[t][e];
  }
  __syncthreads();

  for (int idx = tid; idx < NT * 4 * 32; idx += kThreads) {
    const int i = idx >> 5, l = idx & 31;
    const int t = i >> 2, e = i & 3;
    const int m = (l >> 2) + ((e & 2) ? 8 : 0);
    const int n = n_cta + 8 * t + 2 * (l & 3) + (e & 1);
    if (m >= M || n >= N) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[(w * NT * 4 + i) * 32 + l];
    store_lora_bias<T>(p, m, n, v);
  }
}

int sm_count() {
  static std::atomic<int> cached{0};
  int v = cached.load(std::memory_order_relaxed);
  if (v == 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v < 1) {
      v = 132;
    }
    cached.store(v, std::memory_order_relaxed);
  }
  return v;
}

template <typename T, int NT>
cudaError_t launch_gemv_nt(const GemvParams& p, cudaStream_t stream) {
  const int grid = (p.N + 8 * NT - 1) / (8 * NT);
  if (p.absmax_q != nullptr) {
    nf4_gemv_kernel<T, NT, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    nf4_gemv_kernel<T, NT, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const GemvArgs& a, int log2_bs, cudaStream_t stream) {
  if (a.lora_a != nullptr) {
    lora_t_kernel<T><<<dim3(a.r, a.M), kTThreads, 0, stream>>>(
        static_cast<const T*>(a.x), static_cast<const T*>(a.lora_a), a.K, a.r, a.scale,
        a.scale_vec, a.t_ws);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  GemvParams p{a.x, a.y, a.M, a.N, a.K, a.packed, a.absmax_f32, a.absmax_q, a.nested_absmax,
               a.nested_code, a.offset, a.code, log2_bs, a.lora_b, a.r,
               a.lora_a != nullptr ? a.t_ws : nullptr, a.bias, a.bias_f32};
  // Rows per CTA: as many as keep >= ~2 CTAs per SM busy (two fit per SM: registers); more rows
  // per CTA share each x fragment over more weight rows.
  // LORA_KERNELS_GEMV_NT=1|2|4 forces the rows per CTA / 8 (benchmark sweeps).
  const char* forced = std::getenv("LORA_KERNELS_GEMV_NT");
  if (forced != nullptr && forced[0] != '\0') {
    switch (std::atoi(forced)) {
      case 1: return launch_gemv_nt<T, 1>(p, stream);
      case 2: return launch_gemv_nt<T, 2>(p, stream);
      case 4: return launch_gemv_nt<T, 4>(p, stream);
      default: break;
    }
  }
  const int target = (2 * sm_count() * 9) / 10;
  if ((p.N + 31) / 32 >= target) return launch_gemv_nt<T, 4>(p, stream);
  if ((p.N + 15) / 16 >= target) return launch_gemv_nt<T, 2>(p, stream);
  return launch_gemv_nt<T, 1>(p, stream);
}

}  // namespace

cudaError_t launch_nf4_lora_gemv(const GemvArgs& a, cudaStream_t stream) {
  if (a.M < 1 || a.M > kGemvMaxM || a.N < 1 || a.K < kGemvKChunk || a.K % kGemvKChunk != 0)
    return cudaErrorInvalidValue;
  if (!nf4::is_valid_blocksize(a.blocksize) || a.blocksize < kGemvKChunk || a.K % a.blocksize != 0)
    return cudaErrorInvalidValue;
  if (a.lora_a != nullptr && (a.r < 1 || a.r > kGemvMaxRank || a.lora_b == nullptr || a.t_ws == nullptr))
    return cudaErrorInvalidValue;
  const int log2_bs = nf4::log2_blocksize(a.blocksize);
  switch (a.dtype) {
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(a, log2_bs, stream);
    case DType::kFloat16: return launch_typed<__half>(a, log2_bs, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lora_kernels
