// Pieces shared by the decode kernels (nf4_gemv.cu, nf4_gemv_v2.cu, nf4_gemv_v3.cu, nf4_gemv_v4.cu):
// the bf16 / fp16 conversions and tensor-core MMA behind one ``Num<T>``, the cached device
// attributes the launch planners read, the LoRA + bias store of an output (v1, v3, v4), and
// (v3, v4) the T kernel, the slice-sum finish kernel and the host-side launch chain.  Internal linkage (an anonymous namespace): each kernel
// file gets its own copy, as when they were written out in each file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "cuda/nf4_gemv.h"
#include "cuda/pdl.cuh"
#include "nf4_common.h"

namespace lora_kernels {
namespace cuda {
namespace {

// Num<T>: T = __nv_bfloat16 or __half.
//   pack(lo, hi)        two floats rounded to nearest into one 32-bit pair (lo in the low half)
//   unpack(w)           the pair as float2 (exact);  unpack(w, lo, hi): the same into two floats
//   to_float / from_float
//   mma(c, a0..a3, b0, b1)        c += A(16x16, row) · B(16x8, col), fp32 accumulators in place
//   mma(d, a0..a3, b0, b1, c)     d = A · B + c
template <typename T>
struct Num;

template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t w) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
  }
  static __device__ __forceinline__ void unpack(uint32_t w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);   // a bf16 is the top half of its fp32
    hi = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ void mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void mma(float* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1, const float* c) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
};

template <>
struct Num<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t w) {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
  static __device__ __forceinline__ void unpack(uint32_t w, float& lo, float& hi) {
    const float2 f = unpack(w);
    lo = f.x;
    hi = f.y;
  }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ void mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void mma(float* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1, const float* c) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
};

// The current device's SM count, opt-in shared memory per block and compute capability major,
// read once per device switch (the planners call this on every launch).
struct DevInfo {
  int sms = 1, smem_optin = 0, major = 0;
};

inline DevInfo dev_info() {
  static std::atomic<int> cached_dev{-1};
  static DevInfo cached;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = 0;
  if (cached_dev.load(std::memory_order_acquire) == dev) return cached;
  DevInfo d;
  if (cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || d.sms < 1) d.sms = 1;
  if (cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    d.smem_optin = 0;
  if (cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) d.major = 0;
  cached = d;
  cached_dev.store(dev, std::memory_order_release);
  return d;
}

inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// ---------------------------------------------------------------------------------------------
// Pieces of the decode kernels that run the low-rank term as T = (x · Aᵀ) ⊙ s first and the GEMV
// as its programmatic dependent (nf4_gemv_v3.cu, nf4_gemv_v4.cu)
// ---------------------------------------------------------------------------------------------
// Programmatic dependent launch: griddep_wait / griddep_launch_dependents / launch_maybe_pdl (cuda/pdl.cuh).

// T[m, j] = s_j · Σ_k x[m, k] A[j, k]  (grid (r, M), kThreads threads; K % 8 == 0, 16-byte rows);
// s_j = scale_vec[j] when given, else scale.  Lets its dependent grid start at once.
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
lora_t_pdl_kernel(const T* __restrict__ x, const T* __restrict__ a, int K, int r, float scale,
                  const float* __restrict__ scale_vec, float* __restrict__ t) {
  griddep_launch_dependents();  // the GEMV (launched after this as a dependent) may start now
  const int j = blockIdx.x, m = blockIdx.y;
  const uint4* xr = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * K);
  const uint4* ar = reinterpret_cast<const uint4*>(a + static_cast<int64_t>(j) * K);
  float acc = 0.f;
  const int nv = K / 8;
#pragma unroll 4
  for (int v = threadIdx.x; v < nv; v += kThreads) {
    const uint4 xv = __ldg(xr + v), av = __ldg(ar + v);
    const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w}, aw[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float x0, x1, a0, a1;
      Num<T>::unpack(xw[i], x0, x1);
      Num<T>::unpack(aw[i], a0, a1);
      acc = __fmaf_rn(x0, a0, acc);
      acc = __fmaf_rn(x1, a1, acc);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, o));
  __shared__ float part[kThreads / 32];
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total = __fadd_rn(total, part[w]);
    t[static_cast<int64_t>(m) * r + j] = __fmul_rn(total, scale_vec != nullptr ? scale_vec[j] : scale);
  }
}

// bias[n] as fp32 (the bias of dtype or fp32; p.bias not nullptr).
template <typename T, typename P>
__device__ __forceinline__ float bias_at(const P& p, int n) {
  return p.bias_f32 ? static_cast<const float*>(p.bias)[n] : Num<T>::to_float(static_cast<const T*>(p.bias)[n]);
}

// Row n of B read 8 entries per 16-byte load (r % 8 == 0 and B 16-byte aligned).
template <typename P>
__device__ __forceinline__ bool lora_b_vec8(const P& p) {
  return (p.r & 7) == 0 && (reinterpret_cast<uintptr_t>(p.lora_b) & 15) == 0;
}

// y[m, n] = dtype(v + Σ_j tr[j] B[n, j] + bias[n]) (fp32 sums in that order; tr: row m of T, or
// nullptr: no low-rank term; bias of dtype or fp32).  P: a kernel's parameter struct with y, N, r,
// lora_b, bias, bias_f32.  Row n of B is read 8 entries per 16-byte load where r % 8 == 0 and B is
// 16-byte aligned (session 16: with one 2-byte load per entry, the 32 lanes of a warp -- 32 rows of
// B, 2r bytes apart -- made r loads of 32 sectors each per output, which grows with M), else one
// entry per load; the same fma order either way, so the same bits.
template <typename T, typename P>
__device__ __forceinline__ void store_lora_bias_t(const P& p, const float* tr, int m, int n, float v) {
  if (tr != nullptr) {
    const T* br = static_cast<const T*>(p.lora_b) + static_cast<int64_t>(n) * p.r;
    float lora = 0.f;
    if (lora_b_vec8(p)) {
      for (int j0 = 0; j0 < p.r; j0 += 8) {
        const uint4 w = __ldg(reinterpret_cast<const uint4*>(br + j0));
        const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float b0, b1;
          Num<T>::unpack(ws[e], b0, b1);  // entries j0 + 2e, j0 + 2e + 1
          lora = __fmaf_rn(tr[j0 + 2 * e], b0, lora);
          lora = __fmaf_rn(tr[j0 + 2 * e + 1], b1, lora);
        }
      }
    } else {
#pragma unroll 8
      for (int j = 0; j < p.r; ++j) lora = __fmaf_rn(tr[j], Num<T>::to_float(br[j]), lora);
    }
    v = __fadd_rn(v, lora);
  }
  if (p.bias != nullptr) v = __fadd_rn(v, bias_at<T>(p, n));
  static_cast<T*>(p.y)[static_cast<int64_t>(m) * p.N + n] = Num<T>::from_float(v);
}

// store_lora_bias_t with T from the chain's T kernel: p.t [M, r] (nullptr: no low-rank term).
template <typename T, typename P>
__device__ __forceinline__ void store_lora_bias(const P& p, int m, int n, float v) {
  store_lora_bias_t<T>(p, p.t != nullptr ? p.t + static_cast<int64_t>(m) * p.r : nullptr, m, n, v);
}

// K split into S slices: y[m, n] from the fp32 partials part[S][M][N] summed in slice order, then
// store_lora_bias.  One thread per output, kThreads per CTA; a programmatic dependent of the GEMV.
template <typename T, typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) slices_finish_kernel(const P p) {
  griddep_wait();  // the GEMV (and through it the T kernel) complete and visible
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t MN = static_cast<int64_t>(p.M) * p.N;
  if (idx >= MN) return;
  const int m = static_cast<int>(idx / p.N), n = static_cast<int>(idx - static_cast<int64_t>(m) * p.N);
  float v = p.part[idx];
  for (int s = 1; s < p.S; ++s) v = __fadd_rn(v, p.part[s * MN + idx]);
  store_lora_bias<T>(p, m, n, v);
}

// Host side of the T -> GEMV -> finish chain (v3, v4) -------------------------------------------------

// The fields every chain's parameter struct P shares, from the call's arguments (t_ws: T [M, r] or
// nullptr; part: the fp32 slice partials or nullptr).
template <typename P>
void fill_chain_params(P& p, const GemvArgs& a, float* t_ws, float* part) {
  p.x = a.x; p.y = a.y; p.M = a.M; p.N = a.N; p.K = a.K;
  p.packed = a.packed; p.absmax_f32 = a.absmax_f32; p.absmax_q = a.absmax_q;
  p.nested_absmax = a.nested_absmax; p.nested_code = a.nested_code; p.offset = a.offset; p.code = a.code;
  p.log2_bs = nf4::log2_blocksize(a.blocksize);
  p.lora_b = a.lora_b;
  p.r = a.lora_a != nullptr ? a.r : 0;
  p.t = t_ws;
  p.bias = a.bias;
  p.bias_f32 = a.bias_f32;
  p.part = part;
}

// T = (x · Aᵀ) ⊙ s (with a low-rank term), then launch_gemv(pdl_gemv) -- a programmatic dependent
// of the T kernel only (which waited for everything before it: x is complete); without a T kernel
// it is launched plainly (it reads x at once) -- then, with S > 1 slices, the finish kernel.
template <typename T, typename P, int kTThreads, int kFinishThreads, typename LaunchGemv>
cudaError_t launch_chain(const GemvArgs& a, const P& p, int S, bool pdl, cudaStream_t stream,
                         LaunchGemv launch_gemv) {
  if (a.lora_a != nullptr) {
    lora_t_pdl_kernel<T, kTThreads><<<dim3(a.r, a.M), kTThreads, 0, stream>>>(
        static_cast<const T*>(a.x), static_cast<const T*>(a.lora_a), a.K, a.r, a.scale, a.scale_vec,
        const_cast<float*>(p.t));  // the workspace fill_chain_params put there
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const cudaError_t err = launch_gemv(pdl && a.lora_a != nullptr);
  if (err != cudaSuccess || S == 1) return err;
  const int64_t MN = static_cast<int64_t>(a.M) * a.N;
  const int grid = static_cast<int>((MN + kFinishThreads - 1) / kFinishThreads);
  return launch_maybe_pdl(slices_finish_kernel<T, P, kFinishThreads>, dim3(grid), dim3(kFinishThreads), 0,
                          stream, pdl, p);
}

}  // namespace
}  // namespace cuda
}  // namespace lora_kernels
