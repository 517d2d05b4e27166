// NF4 (+ double quantization) CUDA kernels: blockwise quantize, nested absmax quantize,
// dequantize.  Bit-exact with bitsandbytes' CUDA kernels, and with lora_kernels/reference.py up to
// the block-scale reciprocal (see inv_scale): every fp32 product/sum is a separately rounded
// __fmul_rn/__fadd_rn (build with --fmad=false too), conversions to bf16/fp16 are
// round-to-nearest-even.
// No torch headers: this file compiles with a bare nvcc (see csrc/cuda/nf4_cuda.h).
//
// Memory layout of the two big kernels ("unit" = one 16-byte vector of the wide tensor):
//   quantize:   a thread owns 16 input elements per tile as K 16-byte units (K = 4 for fp32,
//               2 for bf16/fp16); unit k of lane l of a warp covers elements
//               [warp_base + k*32*E + l*E, +E) with E = 16/sizeof(T), so each load instruction
//               of a warp reads 512 contiguous bytes and each store writes 32*E/2 contiguous
//               bytes.  CTA = 256 threads = 4096 elements per tile; grid-stride over tiles.
//               Block max: in-thread max over a unit, then xor-shuffles over the lanes/units of
//               one quantization block, through shared memory when a block spans warps
//               (blocksize > 512).  NF4 index: 33-cell lookup table in shared memory
//               (nf4_common.h), one LDS.64 + one compare per element.
//   dequantize: a thread owns K = 4 output units per warp tile (32 fp32 or 16-bit... elements
//               E = 16/sizeof(out) per unit), loads E/2 packed bytes per unit (coalesced), writes
//               one 16-byte vector per unit (a warp writes 512 contiguous bytes per store).
//               The per-block absmax (double quant decoded in place: nested code in shared
//               memory) is computed once per unit.  Single launch in both modes.
// Tiles that are partial (the tail of n) or whose pointers are not aligned for the vector
// path take a scalar path with bounds checks.

#include "cuda/nf4_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cuda/pdl.cuh"
#include "cuda/spin_wait.cuh"
#include "nf4_common.h"

namespace lora_kernels {
namespace cuda {
namespace {

using nf4::LutEntry;
using nf4::QuantLut;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr uint32_t kAbsMask = 0x7fffffffu;

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------
template <DType D>
struct Elem;

template <>
struct Elem<DType::kFloat32> {
  static constexpr int kSize = 4;
  static __device__ __forceinline__ void unpack(const uint4& v, float* x) {
    x[0] = __uint_as_float(v.x);
    x[1] = __uint_as_float(v.y);
    x[2] = __uint_as_float(v.z);
    x[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ float load1(const void* p, int64_t i) {
    return static_cast<const float*>(p)[i];
  }
  static __device__ __forceinline__ uint4 pack(const float* v) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                      __float_as_uint(v[3]));
  }
  static __device__ __forceinline__ void store1(void* p, int64_t i, float v) {
    static_cast<float*>(p)[i] = v;
  }
};

__device__ __forceinline__ uint32_t bf162_bits(__nv_bfloat162 h) {
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}
__device__ __forceinline__ uint32_t half2_bits(__half2 h) {
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

template <>
struct Elem<DType::kBFloat16> {
  static constexpr int kSize = 2;
  static __device__ __forceinline__ void unpack_word(uint32_t w, float* x) {
    x[0] = __uint_as_float(w << 16);          // lower address = first element
    x[1] = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* x) {
    unpack_word(v.x, x + 0);
    unpack_word(v.y, x + 2);
    unpack_word(v.z, x + 4);
    unpack_word(v.w, x + 6);
  }
  static __device__ __forceinline__ float load1(const void* p, int64_t i) {
    return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16);
  }
  static __device__ __forceinline__ uint4 pack(const float* v) {
    return make_uint4(bf162_bits(__floats2bfloat162_rn(v[0], v[1])),
                      bf162_bits(__floats2bfloat162_rn(v[2], v[3])),
                      bf162_bits(__floats2bfloat162_rn(v[4], v[5])),
                      bf162_bits(__floats2bfloat162_rn(v[6], v[7])));
  }
  static __device__ __forceinline__ void store1(void* p, int64_t i, float v) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
};

template <>
struct Elem<DType::kFloat16> {
  static constexpr int kSize = 2;
  static __device__ __forceinline__ float h2f(uint32_t bits16) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
  }
  static __device__ __forceinline__ void unpack_word(uint32_t w, float* x) {
    x[0] = h2f(w & 0xffffu);
    x[1] = h2f(w >> 16);
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* x) {
    unpack_word(v.x, x + 0);
    unpack_word(v.y, x + 2);
    unpack_word(v.z, x + 4);
    unpack_word(v.w, x + 6);
  }
  static __device__ __forceinline__ float load1(const void* p, int64_t i) {
    return h2f(static_cast<const uint16_t*>(p)[i]);
  }
  static __device__ __forceinline__ uint4 pack(const float* v) {
    return make_uint4(half2_bits(__floats2half2_rn(v[0], v[1])),
                      half2_bits(__floats2half2_rn(v[2], v[3])),
                      half2_bits(__floats2half2_rn(v[4], v[5])),
                      half2_bits(__floats2half2_rn(v[6], v[7])));
  }
  static __device__ __forceinline__ void store1(void* p, int64_t i, float v) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  }
};

__device__ __forceinline__ uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }

// The block scale 1 / absmax.  bitsandbytes' CUDA kernels (built with fast math) take it from the
// hardware's approximate reciprocal, MUFU.RCP (rcp.approx.ftz.f32; seen in the SASS of its
// kQuantizeBlockwise): we use the same instruction for every normal absmax so that our bytes equal
// bitsandbytes' bytes on the GPU.  It differs from the IEEE fl(1/x) of the CPU reference by at most
// an ulp, which moves an index by one level only where x * inv sits on a threshold (rare; the
// GPU tests allow exactly that).  Zero or subnormal absmax (an all-zero block) takes the
// reference's clamped IEEE path, so such a block stores the 0.0 level; NaN stays NaN.
__device__ __forceinline__ float inv_scale(float amax) {
  if (amax >= 1.17549435e-38f) {  // FLT_MIN: the ftz instruction is exact only for normal inputs
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(amax));
    return r;
  }
  return __frcp_rn(amax < nf4::kMinAbsmax ? nf4::kMinAbsmax : amax);
}

// ---------------------------------------------------------------------------------------------
// Blockwise NF4 quantization
// ---------------------------------------------------------------------------------------------
template <DType D, int BS>
__global__ void __launch_bounds__(kThreads)
    quantize_blocks_kernel(const void* __restrict__ w, int64_t n, uint8_t* __restrict__ packed,
                           float* __restrict__ absmax, QuantLut lut_in, bool vec_ok,
                           uint32_t* __restrict__ zero_word) {
  using In = Elem<D>;
  constexpr int E = 16 / In::kSize;          // elements per 16-byte unit: 4 (fp32) or 8
  constexpr int K = 16 / E;                  // units per thread per tile: 16 elements
  constexpr int kRow = 32 * E;               // elements of one unit row of a warp
  constexpr int kWarpTile = K * kRow;        // 512
  constexpr int kTile = kWarps * kWarpTile;  // 4096
  constexpr int U = BS / E;                  // units per quantization block
  static_assert(BS % E == 0 && kTile % BS == 0, "blocksize must divide the tile");

  __shared__ LutEntry lut[nf4::kLutCells];
  __shared__ uint32_t red[2][kWarps];
  if (threadIdx.x < nf4::kLutCells) lut[threadIdx.x] = lut_in.e[threadIdx.x];
  griddep_wait();  // when launched as a programmatic dependent: w and zero_word may be the previous kernel's
  if (zero_word != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *zero_word = 0u;  // see launch_absmax_mean_nested
  griddep_launch_dependents();  // the double quantization's second kernel may take the SM slots ours free
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t ntiles = (n + kTile - 1) / kTile;
  int parity = 0;

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t base = tile * kTile + warp * kWarpTile + lane * E;  // unit k: base + k*kRow
    const bool fast = vec_ok && (tile + 1) * kTile <= n;             // uniform per CTA
    float x[K][E];
    if (fast) {
      const uint4* src =
          reinterpret_cast<const uint4*>(static_cast<const char*>(w) + base * In::kSize);
      uint4 v[K];
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] = __ldg(src + k * 32);  // kRow * kSize = 512 bytes
#pragma unroll
      for (int k = 0; k < K; ++k) In::unpack(v[k], x[k]);
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int64_t i = base + k * kRow + e;
          x[k][e] = i < n ? In::load1(w, i) : 0.0f;  // zero padding, as the reference
        }
      }
    }

    // max |x| per unit on the bit patterns (= float order for |x|; NaN propagates like amax).
    uint32_t m[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      m[k] = 0;
#pragma unroll
      for (int e = 0; e < E; ++e) m[k] = umax(m[k], __float_as_uint(x[k][e]) & kAbsMask);
    }
    if constexpr (U <= 32) {
      // a block = U consecutive lanes of one unit row
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int off = U / 2; off > 0; off >>= 1)
          m[k] = umax(m[k], __shfl_xor_sync(kFullMask, m[k], off));
      }
    } else if constexpr (U <= 32 * K) {
      // a block = R whole unit rows of the warp
      constexpr int R = U / 32;
#pragma unroll
      for (int g = 0; g < K / R; ++g) {
        uint32_t mm = m[g * R];
#pragma unroll
        for (int r = 1; r < R; ++r) mm = umax(mm, m[g * R + r]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mm = umax(mm, __shfl_xor_sync(kFullMask, mm, off));
#pragma unroll
        for (int r = 0; r < R; ++r) m[g * R + r] = mm;
      }
    } else {
      // a block = W whole warps of the CTA
      constexpr int W = BS / kWarpTile;
      uint32_t mm = m[0];
#pragma unroll
      for (int k = 1; k < K; ++k) mm = umax(mm, m[k]);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mm = umax(mm, __shfl_xor_sync(kFullMask, mm, off));
      if (lane == 0) red[parity][warp] = mm;
      __syncthreads();  // every thread runs the same number of tiles: uniform
      const int first = (warp / W) * W;
      mm = red[parity][first];
#pragma unroll
      for (int j = 1; j < W; ++j) mm = umax(mm, red[parity][first + j]);
      parity ^= 1;  // double buffer: the next tile's writes cannot race this tile's reads
#pragma unroll
      for (int k = 0; k < K; ++k) m[k] = mm;
    }

#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t s = base + k * kRow;  // first element of the unit
      const float amax = __uint_as_float(m[k]);
      if (s < n && (s % BS) == 0) absmax[s / BS] = amax;
      const float inv = inv_scale(amax);
      uint32_t idx[E];
#pragma unroll
      for (int e = 0; e < E; ++e) idx[e] = nf4::nf4_index(__fmul_rn(x[k][e], inv), lut);
      if (fast) {
        uint32_t word = 0;
#pragma unroll
        for (int p = 0; p < E / 2; ++p) word |= ((idx[2 * p] << 4) | idx[2 * p + 1]) << (8 * p);
        if constexpr (E == 8) {
          *reinterpret_cast<uint32_t*>(packed + s / 2) = word;
        } else {
          *reinterpret_cast<uint16_t*>(packed + s / 2) = static_cast<uint16_t>(word);
        }
      } else {
#pragma unroll
        for (int p = 0; p < E / 2; ++p) {
          const int64_t i = s + 2 * p;
          if (i < n) {
            const uint32_t lo = i + 1 < n ? idx[2 * p + 1] : uint32_t(nf4::kPadNibble);
            packed[i / 2] = static_cast<uint8_t>((idx[2 * p] << 4) | lo);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Nested (double) quantization of absmax - offset, one CTA per block of 256 values
// ---------------------------------------------------------------------------------------------
static_assert(kThreads == nf4::kNestedBlocksize, "one thread per absmax value");

__global__ void __launch_bounds__(kThreads)
    quantize_absmax_nested_kernel(const float* __restrict__ absmax, int64_t nb,
                                  const float* __restrict__ offset,
                                  const float* __restrict__ code, uint8_t* __restrict__ q,
                                  float* __restrict__ nested_absmax) {
  __shared__ float bounds[nf4::kDynamicCodeSize];
  __shared__ uint32_t red[kWarps];
  const int t = threadIdx.x;
  const int lane = t & 31;
  const int warp = t >> 5;
  // midpoints fl(fl(code[j] + code[j+1]) * 0.5), padded with +inf (never read by the search)
  bounds[t] = t < nf4::kDynamicCodeSize - 1 ? __fmul_rn(__fadd_rn(code[t], code[t + 1]), 0.5f)
                                            : __int_as_float(0x7f800000);
  const float off = __ldg(offset);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + t;
  const float d = i < nb ? __fsub_rn(absmax[i], off) : 0.0f;
  uint32_t m = __float_as_uint(d) & kAbsMask;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = umax(m, __shfl_xor_sync(kFullMask, m, o));
  if (lane == 0) red[warp] = m;
  __syncthreads();  // also publishes bounds[]
  m = red[0];
#pragma unroll
  for (int j = 1; j < kWarps; ++j) m = umax(m, red[j]);
  const float am = __uint_as_float(m);
  if (t == 0) nested_absmax[blockIdx.x] = am;
  if (i < nb) {
    uint32_t qi = 0;  // a nested block with max |d| == 0 stores index 0
    if (am != 0.0f) qi = nf4::nearest_dynamic_index(__fmul_rn(d, inv_scale(am)), bounds);
    q[i] = static_cast<uint8_t>(qi);
  }
}

// ---------------------------------------------------------------------------------------------
// Double quantization in one launch: torch.mean's offset, then the nested pass
// ---------------------------------------------------------------------------------------------
// bitsandbytes' offset is torch's `absmax.mean()`, whose bits depend on the order of torch's CUDA
// reduction (ATen/native/cuda/Reduce.cuh).  For a contiguous, 16-byte aligned fp32 vector of
// nb >= 2048 values torch runs `ctas` CTAs of 512 threads (ctas from its setReduceConfig, given
// to this kernel by the host): thread x of torch CTA c adds the float4 vectors x + c*512 +
// j*512*ctas (all fully inside nb) into four accumulators, one per vector lane, starting from
// 0.0f; CTA 0's threads 0..2 add the nb % 4 tail elements to accumulator 0; the thread's value is
// ((a0 + a1) + a2) + a3.  A CTA reduces its 512 values by a shared-memory tree (offsets 256..32)
// then a warp-shuffle tree (shfl_down, offsets 16..1 in torch >= 2.13, 1..16 before: `shfl_up`).
// With ctas > 1, one CTA folds the ctas partials: thread x starts from 0.0f and adds partials
// x, x + 512, ..., then the same CTA tree.  mean = fold * factor, factor = fl(1 / fl(nb)).
// This kernel replays that order with G co-resident CTAs (G <= resident CTAs; CTA g plays torch CTAs g,
// g + G, ...), meets at a grid barrier, and every CTA folds the partials itself (same operations,
// same bits), then quantizes absmax - offset in nested blocks of 256 (as
// quantize_absmax_nested_kernel, two blocks per 512-thread step).  A CTA whose barrier wait
// times out (its peers not resident; 2 ms) computes every partial itself: slower, same bits.
// The host checks the replay against torch.mean once per (device, nb) before using it
// (lora_kernels/library.py), so a torch whose order differs only costs that check.
constexpr int kMeanThreads = 512;
constexpr int kMeanMaxCtas = 1024;
constexpr int64_t kMeanMinValues = 2048;  // from here torch's CTAs are 512 x 1, vectorized
constexpr unsigned long long kMeanWaitNs = 2ull * 1000 * 1000;

// Torch's CTA reduction of one value per thread (512 threads); the sum lands in thread 0.
// `sh` holds 512 floats; the caller must not touch it until the next __syncthreads().
__device__ __forceinline__ float torch_cta_sum(float v, float* sh, bool shfl_up) {
  const int x = threadIdx.x;
  __syncthreads();  // earlier readers of sh are done
  sh[x] = v;
  for (int off = kMeanThreads / 2; off >= 32; off >>= 1) {
    __syncthreads();
    if (x < off) {
      v = __fadd_rn(v, sh[x + off]);
      sh[x] = v;
    }
  }
  __syncthreads();
  if (shfl_up) {
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) v = __fadd_rn(v, __shfl_down_sync(kFullMask, v, off));
  } else {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = __fadd_rn(v, __shfl_down_sync(kFullMask, v, off));
  }
  return v;
}

// Torch CTA c's partial sum of x[0, nb) (valid in thread 0).
__device__ float torch_cta_partial(const float* __restrict__ x, int64_t nb, int c, int ctas,
                                   float* sh, bool shfl_up) {
  const float4* vec = reinterpret_cast<const float4*>(x);
  const int64_t nvec = nb / 4;  // vectors wholly inside nb
  const int64_t stride = static_cast<int64_t>(kMeanThreads) * ctas;
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
  int64_t v = threadIdx.x + static_cast<int64_t>(c) * kMeanThreads;
  for (; v + 3 * stride < nvec; v += 4 * stride) {  // four loads in flight, added in order
    float4 f[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) f[u] = __ldg(vec + v + u * stride);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      a0 = __fadd_rn(a0, f[u].x);
      a1 = __fadd_rn(a1, f[u].y);
      a2 = __fadd_rn(a2, f[u].z);
      a3 = __fadd_rn(a3, f[u].w);
    }
  }
  for (; v < nvec; v += stride) {
    const float4 f = __ldg(vec + v);
    a0 = __fadd_rn(a0, f.x);
    a1 = __fadd_rn(a1, f.y);
    a2 = __fadd_rn(a2, f.z);
    a3 = __fadd_rn(a3, f.w);
  }
  if (c == 0) {
    const int64_t t = nvec * 4 + threadIdx.x;
    if (t < nb) a0 = __fadd_rn(a0, __ldg(x + t));
  }
  return torch_cta_sum(__fadd_rn(__fadd_rn(__fadd_rn(a0, a1), a2), a3), sh, shfl_up);
}

// The replay's grid barrier, then all ctas torch partials in part[] (every thread of the CTA calls
// it).  Thread 0 of an arriving CTA publishes after its own staging writes; the CTA waits until
// `expected` CTAs have arrived, or, after wait_ns, computes every partial itself (same bits).
__device__ void meet_and_gather_partials(const float* __restrict__ absmax, int64_t nb, int ctas, bool shfl_up,
                                         const float* staging, uint32_t* arrived, bool arrive,
                                         uint32_t expected, unsigned long long wait_ns, float* sh,
                                         float* part) {
  __shared__ int ok_s;
  __syncthreads();
  if (threadIdx.x == 0) {
    if (arrive) {
      __threadfence();
      atomicAdd(arrived, 1u);
    }
    ok_s = spin_until([&] { return ld_acquire_u32(arrived) >= expected; }, wait_ns, 64);
  }
  __syncthreads();
  if (ok_s) {
    for (int c = threadIdx.x; c < ctas; c += kMeanThreads) part[c] = __ldcg(staging + c);
  } else {
    for (int c = 0; c < ctas; ++c) {
      const float v = torch_cta_partial(absmax, nb, c, ctas, sh, shfl_up);
      if (threadIdx.x == 0) part[c] = v;
    }
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kMeanThreads)
    absmax_mean_nested_kernel(const float* __restrict__ absmax, int64_t nb, int ctas, bool shfl_up,
                              float factor, float* __restrict__ staging,
                              uint32_t* __restrict__ arrived, float* __restrict__ offset_out,
                              const float* __restrict__ dyn_code, uint8_t* __restrict__ q,
                              float* __restrict__ nested_absmax,
                              const float* __restrict__ nf4_code_in,
                              float* __restrict__ code_out, float* __restrict__ dyn_code_out,
                              unsigned long long wait_ns) {
  __shared__ float sh[kMeanThreads];
  __shared__ float part[kMeanMaxCtas];
  __shared__ float bounds[nf4::kDynamicCodeSize];
  __shared__ uint32_t red[kMeanThreads / 32];
  __shared__ float off_s;
  const int t = threadIdx.x;
  const int G = gridDim.x;
  griddep_wait();  // when launched as the block pass's programmatic dependent

  // 1. torch CTAs blockIdx.x, + G, ...: partial sums to the staging buffer
  for (int c = blockIdx.x; c < ctas; c += G) {
    const float p = torch_cta_partial(absmax, nb, c, ctas, sh, shfl_up);
    if (t == 0) staging[c] = p;
  }
  // 2. grid barrier (or, after a timeout, every partial computed here)
  meet_and_gather_partials(absmax, nb, ctas, shfl_up, staging, arrived, true, static_cast<uint32_t>(G), wait_ns,
                           sh, part);
  // 3. the fold and the offset (every CTA, same bits)
  float total;
  if (ctas == 1) {
    total = part[0];
  } else {
    float v = 0.0f;
    for (int c = t; c < ctas; c += kMeanThreads) v = __fadd_rn(v, part[c]);
    total = torch_cta_sum(v, sh, shfl_up);
  }
  if (t == 0) {
    off_s = __fmul_rn(total, factor);
    if (blockIdx.x == 0) *offset_out = off_s;
  }
  if (blockIdx.x == 0 && code_out != nullptr) {
    if (t < nf4::kNumCodes) code_out[t] = nf4_code_in[t];
    if (t < nf4::kDynamicCodeSize) dyn_code_out[t] = dyn_code[t];
  }
  if (q == nullptr) return;  // mean only
  if (t < nf4::kDynamicCodeSize) {
    bounds[t] = t < nf4::kDynamicCodeSize - 1
                    ? __fmul_rn(__fadd_rn(dyn_code[t], dyn_code[t + 1]), 0.5f)
                    : __int_as_float(0x7f800000);
  }
  __syncthreads();
  const float off = off_s;
  // 4. nested blocks 2p, 2p + 1 per step: the 256 threads of half h take block 2p + h
  const int lane = t & 31;
  const int warp = t >> 5;
  const int half = t >> 8;
  const int64_t nnested = (nb + nf4::kNestedBlocksize - 1) / nf4::kNestedBlocksize;
  for (int64_t pair = blockIdx.x; 2 * pair < nnested; pair += G) {
    const int64_t blk = 2 * pair + half;
    const int64_t i = blk * nf4::kNestedBlocksize + (t & (nf4::kNestedBlocksize - 1));
    const float d = i < nb ? __fsub_rn(__ldg(absmax + i), off) : 0.0f;
    uint32_t m = __float_as_uint(d) & kAbsMask;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = umax(m, __shfl_xor_sync(kFullMask, m, o));
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = red[half * 8];
#pragma unroll
    for (int j = 1; j < 8; ++j) m = umax(m, red[half * 8 + j]);
    __syncthreads();  // red is rewritten by the next step
    const float am = __uint_as_float(m);
    if (blk < nnested) {
      if ((t & (nf4::kNestedBlocksize - 1)) == 0) nested_absmax[blk] = am;
      if (i < nb) {
        uint32_t qi = 0;  // a nested block with max |d| == 0 stores index 0
        if (am != 0.0f) qi = nf4::nearest_dynamic_index(__fmul_rn(d, inv_scale(am)), bounds);
        q[i] = static_cast<uint8_t>(qi);
      }
    }
  }
}

// Variant 2 of the kernel above (same bits; $LORA_KERNELS_DQ_VARIANT picks, see
// launch_absmax_mean_nested).  Differences: (a) the table copies and the bounds table come before
// griddepcontrol.wait, so that they overlap the block pass when this kernel is launched as its
// programmatic dependent; (b) only the CTAs that hold torch partials arrive at the barrier; (c) one
// warp per nested block of 256 (8 values a lane, a shuffle max, no CTA-wide syncs), and each warp's
// first block is requested right after the wait, so that its latency overlaps the partials and the
// barrier; (d) with <= 32 torch CTAs the fold is warp 0's shuffle tree alone (the shared-memory
// levels of torch's tree only add +0.0 there: threads >= ctas hold 0.0f and 0.0f + p is never -0.0).
struct MeanNestedArgs {
  const float* absmax;
  int64_t nb;
  int ctas;
  bool shfl_up;
  float factor;
  float* staging;
  uint32_t* arrived;
  float* offset_out;
  const float* dyn_code;
  uint8_t* q;  // nullptr: the offset only
  float* nested_absmax;
  const float* nf4_code_in;
  float* code_out;  // nullptr: no table copies
  float* dyn_code_out;
  unsigned long long wait_ns;
  bool q_vec;  // q is 8-byte aligned
};

constexpr int kMeanWarps = kMeanThreads / 32;

// absmax[blk * 256 + lane * 8 + e], e < 8 (0.0f past nb)
__device__ __forceinline__ void load_nested8(const float* __restrict__ absmax, int64_t nb, int64_t blk,
                                             int lane, float (&a)[8]) {
  const int64_t i0 = blk * nf4::kNestedBlocksize + lane * 8;
  if (i0 + 8 <= nb) {
    const float4* p = reinterpret_cast<const float4*>(absmax + i0);
    const float4 f0 = __ldcg(p), f1 = __ldcg(p + 1);
    a[0] = f0.x; a[1] = f0.y; a[2] = f0.z; a[3] = f0.w;
    a[4] = f1.x; a[5] = f1.y; a[6] = f1.z; a[7] = f1.w;
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) a[e] = i0 + e < nb ? __ldcg(absmax + i0 + e) : 0.0f;
  }
}

__global__ void __launch_bounds__(kMeanThreads, 4) absmax_mean_nested_v2_kernel(const MeanNestedArgs p) {
  __shared__ float sh[kMeanThreads];
  __shared__ float part[kMeanMaxCtas];
  __shared__ float bounds[nf4::kDynamicCodeSize];
  __shared__ float off_s;
  const int t = threadIdx.x;
  const int lane = t & 31;
  const int warp = t >> 5;
  const int G = gridDim.x;
  const int64_t nnested = (p.nb + nf4::kNestedBlocksize - 1) / nf4::kNestedBlocksize;
  const int64_t warps_total = static_cast<int64_t>(G) * kMeanWarps;
  const int64_t blk0 = static_cast<int64_t>(blockIdx.x) * kMeanWarps + warp;

  // 0. inputs the block pass does not write (they may overlap it: programmatic dependent launch)
  if (blockIdx.x == 0 && p.code_out != nullptr) {
    if (t < nf4::kNumCodes) p.code_out[t] = p.nf4_code_in[t];
    if (t < nf4::kDynamicCodeSize) p.dyn_code_out[t] = p.dyn_code[t];
  }
  if (p.q != nullptr && t < nf4::kDynamicCodeSize) {
    bounds[t] = t < nf4::kDynamicCodeSize - 1
                    ? __fmul_rn(__fadd_rn(p.dyn_code[t], p.dyn_code[t + 1]), 0.5f)
                    : __int_as_float(0x7f800000);
  }
  griddep_wait();  // absmax and *arrived are the block pass's
  float a[8];
  if (p.q != nullptr && blk0 < nnested) load_nested8(p.absmax, p.nb, blk0, lane, a);

  // 1. torch CTAs blockIdx.x, + G, ...: partial sums to the staging buffer; those CTAs arrive
  const int arrivers = G < p.ctas ? G : p.ctas;
  if (static_cast<int>(blockIdx.x) < arrivers) {
    for (int c = blockIdx.x; c < p.ctas; c += G) {
      const float s = torch_cta_partial(p.absmax, p.nb, c, p.ctas, sh, p.shfl_up);
      if (t == 0) p.staging[c] = s;
    }
  }
  // 2. grid barrier among those CTAs (or, after a timeout, every partial computed here)
  meet_and_gather_partials(p.absmax, p.nb, p.ctas, p.shfl_up, p.staging, p.arrived,
                           static_cast<int>(blockIdx.x) < arrivers, static_cast<uint32_t>(arrivers), p.wait_ns,
                           sh, part);
  // 3. the fold and the offset (every CTA, same bits)
  if (p.ctas == 1) {
    if (t == 0) off_s = __fmul_rn(part[0], p.factor);
  } else if (p.ctas <= 32) {
    if (warp == 0) {
      float v = lane < p.ctas ? __fadd_rn(0.0f, part[lane]) : 0.0f;
      if (p.shfl_up) {
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) v = __fadd_rn(v, __shfl_down_sync(kFullMask, v, o));
      } else {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_down_sync(kFullMask, v, o));
      }
      if (lane == 0) off_s = __fmul_rn(v, p.factor);
    }
  } else {
    float v = 0.0f;
    for (int c = t; c < p.ctas; c += kMeanThreads) v = __fadd_rn(v, part[c]);
    v = torch_cta_sum(v, sh, p.shfl_up);
    if (t == 0) off_s = __fmul_rn(v, p.factor);
  }
  __syncthreads();
  const float off = off_s;
  if (blockIdx.x == 0 && t == 0) *p.offset_out = off;
  if (p.q == nullptr) return;  // mean only
  // 4. nested blocks: warp w of the grid takes blocks w, w + warps_total, ...
  for (int64_t blk = blk0; blk < nnested; blk += warps_total) {
    if (blk != blk0) load_nested8(p.absmax, p.nb, blk, lane, a);
    const int64_t i0 = blk * nf4::kNestedBlocksize + lane * 8;
    float d[8];
    uint32_t m = 0u;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      d[e] = i0 + e < p.nb ? __fsub_rn(a[e], off) : 0.0f;
      m = umax(m, __float_as_uint(d[e]) & kAbsMask);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = umax(m, __shfl_xor_sync(kFullMask, m, o));
    const float am = __uint_as_float(m);
    if (lane == 0) p.nested_absmax[blk] = am;
    uint32_t qb[8];
    const float inv = am != 0.0f ? inv_scale(am) : 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      // a nested block with max |d| == 0 stores index 0
      qb[e] = am != 0.0f ? nf4::nearest_dynamic_index(__fmul_rn(d[e], inv), bounds) : 0u;
    }
    if (p.q_vec && i0 + 8 <= p.nb) {
      uint2 w;
      w.x = qb[0] | (qb[1] << 8) | (qb[2] << 16) | (qb[3] << 24);
      w.y = qb[4] | (qb[5] << 8) | (qb[6] << 16) | (qb[7] << 24);
      *reinterpret_cast<uint2*>(p.q + i0) = w;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (i0 + e < p.nb) p.q[i0 + e] = static_cast<uint8_t>(qb[e]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dequantization (one launch, double quant decoded in place)
// ---------------------------------------------------------------------------------------------
template <DType D, bool kNested>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax_f32,
                      const uint8_t* __restrict__ absmax_q,
                      const float* __restrict__ nested_absmax,
                      const float* __restrict__ nested_code, const float* __restrict__ offset,
                      const float* __restrict__ code, int64_t n, int log2_bs,
                      void* __restrict__ out, bool vec_ok) {
  using Out = Elem<D>;
  constexpr int E = 16 / Out::kSize;  // elements per 16-byte output unit: 4 (fp32) or 8
  constexpr int P = E / 2;            // packed bytes per unit
  constexpr int K = 4;                // units per thread per warp tile
  constexpr int kRow = 32 * E;
  constexpr int kWarpTile = K * kRow;  // 512 (fp32) or 1024 elements

  __shared__ float s_code[nf4::kNumCodes];
  __shared__ float s_ncode[kNested ? nf4::kDynamicCodeSize : 1];
  griddep_wait();  // when launched as a programmatic dependent: its inputs may be the previous kernel's
  griddep_launch_dependents();
  if (threadIdx.x < nf4::kNumCodes) s_code[threadIdx.x] = code[threadIdx.x];
  if constexpr (kNested) {
    static_assert(kThreads == nf4::kDynamicCodeSize, "one thread per nested code entry");
    s_ncode[threadIdx.x] = nested_code[threadIdx.x];
  }
  const float off = kNested ? __ldg(offset) : 0.0f;
  __syncthreads();

  // absmax of quantization block b: fl(fl(nested_code[q[b]] * nested_absmax[b / 256]) + offset)
  auto block_absmax = [&](int64_t b) -> float {
    if constexpr (kNested) {
      return __fadd_rn(__fmul_rn(s_ncode[__ldg(absmax_q + b)], __ldg(nested_absmax + (b >> 8))),
                       off);
    } else {
      return __ldg(absmax_f32 + b);
    }
  };

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t ntiles = (n + kWarpTile - 1) / kWarpTile;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;

  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + warp; tile < ntiles;
       tile += stride) {
    const int64_t base = tile * kWarpTile + lane * E;  // unit k: base + k*kRow
    if (vec_ok && (tile + 1) * kWarpTile <= n) {        // uniform per warp
      const uint8_t* pk_ptr = packed + base / 2;
      uint32_t pk[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if constexpr (P == 4) {
          pk[k] = __ldg(reinterpret_cast<const uint32_t*>(pk_ptr + k * (kRow / 2)));
        } else {
          pk[k] = __ldg(reinterpret_cast<const unsigned short*>(pk_ptr + k * (kRow / 2)));
        }
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        // a unit never crosses a block (32 | blocksize, unit <= 8 elements)
        const float a = block_absmax((base + k * kRow) >> log2_bs);
        float v[E];
#pragma unroll
        for (int e = 0; e < E; ++e) {
          // byte p = e/2 sits at bits [8p, 8p+8); the first element is its high nibble
          const int shift = 8 * (e / 2) + ((e & 1) ? 0 : 4);
          v[e] = __fmul_rn(s_code[(pk[k] >> shift) & 15u], a);
        }
        const int64_t s = base + k * kRow;
        *reinterpret_cast<uint4*>(static_cast<char*>(out) + s * Out::kSize) = Out::pack(v);
      }
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t s = base + k * kRow;
        if (s < n) {
          const float a = block_absmax(s >> log2_bs);
#pragma unroll
          for (int e = 0; e < E; ++e) {
            const int64_t i = s + e;
            if (i < n) {
              const uint32_t byte = packed[i >> 1];
              const uint32_t nib = (i & 1) ? (byte & 15u) : (byte >> 4);
              Out::store1(out, i, __fmul_rn(s_code[nib], a));
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------------
bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

// *pdl = asked and the current device launches programmatic dependents (sm_90+); the device is
// queried only when asked, so the plain launch path costs nothing extra.
cudaError_t pdl_when_asked(bool asked, bool* pdl) {
  *pdl = false;
  if (!asked) return cudaSuccess;
  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  *pdl = err == cudaSuccess && major >= 9;
  return err;
}

// CTAs of kKernel (launched with `threads` threads, always the same per kernel) that fill the current
// device once (grid-stride kernels); at least 1.  The occupancy is queried once per kernel
// instantiation and device (the template argument is the kernel itself, not its type: the
// instantiations of one template share a signature but not a register count, e.g. quantize_blocks_kernel
// 40 or 48 by dtype and blocksize).  It only sizes grids, never affects results.
constexpr int kCachedDevices = 16;

template <auto kKernel>
cudaError_t resident_ctas(int* ctas, int threads = kThreads) {
  static std::atomic<int> cached_per_sm[kCachedDevices] = {};
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  const bool cacheable = dev >= 0 && dev < kCachedDevices;
  int per_sm = cacheable ? cached_per_sm[dev].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, threads, 0);
    if (err != cudaSuccess) return err;
    per_sm = per_sm > 0 ? per_sm : 1;
    if (cacheable) cached_per_sm[dev].store(per_sm, std::memory_order_relaxed);
  }
  *ctas = sms * per_sm > 0 ? sms * per_sm : 1;
  return cudaSuccess;
}

int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <DType D, int BS>
cudaError_t quantize_blocks_launch(const void* w, int64_t n, uint8_t* packed, float* absmax,
                                   uint32_t* zero_word, cudaStream_t stream) {
  constexpr int E = 16 / Elem<D>::kSize;
  constexpr int kTile = 4096;
  constexpr QuantLut kLut = nf4::make_quant_lut(nf4::kThresholdsCuda);  // bitsandbytes' CUDA thresholds
  constexpr auto kernel = quantize_blocks_kernel<D, BS>;
  int ctas = 0;
  cudaError_t err = resident_ctas<kernel>(&ctas);
  if (err != cudaSuccess) return err;
  const int64_t ntiles = (n + kTile - 1) / kTile;
  const int grid = static_cast<int>(min64(ntiles, ctas));
  const bool vec_ok = aligned(w, 16) && aligned(packed, E / 2);
  // Bit 2 of $LORA_KERNELS_DQ_VARIANT (see launch_absmax_mean_nested; the two-launch route only):
  // a programmatic dependent of the previous kernel on the stream (sm_90).
  const char* env = zero_word != nullptr ? std::getenv("LORA_KERNELS_DQ_VARIANT") : nullptr;
  bool pdl = false;
  err = pdl_when_asked(env != nullptr && (std::atoi(env) & 4) != 0, &pdl);
  if (err != cudaSuccess) return err;
  return launch_maybe_pdl(kernel, dim3(grid), dim3(kThreads), 0, stream, pdl, w, n, packed, absmax, kLut, vec_ok,
                          zero_word);
}

template <DType D>
cudaError_t quantize_blocks_dispatch_bs(const void* w, int64_t n, int blocksize, uint8_t* packed,
                                        float* absmax, uint32_t* zero_word, cudaStream_t stream) {
  switch (blocksize) {
    case 32: return quantize_blocks_launch<D, 32>(w, n, packed, absmax, zero_word, stream);
    case 64: return quantize_blocks_launch<D, 64>(w, n, packed, absmax, zero_word, stream);
    case 128: return quantize_blocks_launch<D, 128>(w, n, packed, absmax, zero_word, stream);
    case 256: return quantize_blocks_launch<D, 256>(w, n, packed, absmax, zero_word, stream);
    case 512: return quantize_blocks_launch<D, 512>(w, n, packed, absmax, zero_word, stream);
    case 1024: return quantize_blocks_launch<D, 1024>(w, n, packed, absmax, zero_word, stream);
    case 2048: return quantize_blocks_launch<D, 2048>(w, n, packed, absmax, zero_word, stream);
    case 4096: return quantize_blocks_launch<D, 4096>(w, n, packed, absmax, zero_word, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <DType D, bool kNested>
cudaError_t dequantize_launch(const uint8_t* packed, const float* absmax_f32,
                              const uint8_t* absmax_q, const float* nested_absmax,
                              const float* nested_code, const float* offset, const float* code,
                              int64_t n, int log2_bs, void* out, cudaStream_t stream) {
  constexpr int E = 16 / Elem<D>::kSize;
  constexpr int kWarpTile = 4 * 32 * E;
  constexpr auto kernel = dequantize_kernel<D, kNested>;
  int ctas = 0;
  cudaError_t err = resident_ctas<kernel>(&ctas);
  if (err != cudaSuccess) return err;
  const int64_t ntiles = (n + kWarpTile - 1) / kWarpTile;
  const int grid = static_cast<int>(min64((ntiles + kWarps - 1) / kWarps, ctas));
  const bool vec_ok = aligned(packed, E / 2) && aligned(out, 16);
  // $LORA_KERNELS_DEQUANT_PDL=1 (an A/B switch until the GPU measures it): launched as a
  // programmatic dependent of the previous kernel on the stream (sm_90), so that its launch and
  // CTA placement overlap that kernel's tail; it waits for that kernel before reading anything.
  const char* env = std::getenv("LORA_KERNELS_DEQUANT_PDL");
  bool pdl = false;
  err = pdl_when_asked(env != nullptr && env[0] == '1', &pdl);
  if (err != cudaSuccess) return err;
  return launch_maybe_pdl(kernel, dim3(grid), dim3(kThreads), 0, stream, pdl, packed, absmax_f32, absmax_q,
                          nested_absmax, nested_code, offset, code, n, log2_bs, out, vec_ok);
}

template <DType D>
cudaError_t dequantize_dispatch_nested(const uint8_t* packed, const float* absmax_f32,
                                       const uint8_t* absmax_q, const float* nested_absmax,
                                       const float* nested_code, const float* offset,
                                       const float* code, int64_t n, int log2_bs, void* out,
                                       cudaStream_t stream) {
  if (absmax_q != nullptr) {
    return dequantize_launch<D, true>(packed, absmax_f32, absmax_q, nested_absmax, nested_code,
                                      offset, code, n, log2_bs, out, stream);
  }
  return dequantize_launch<D, false>(packed, absmax_f32, absmax_q, nested_absmax, nested_code,
                                     offset, code, n, log2_bs, out, stream);
}

}  // namespace

cudaError_t launch_quantize_blocks(const void* w, DType dtype, int64_t n, int blocksize,
                                   uint8_t* packed, float* absmax, cudaStream_t stream,
                                   uint32_t* zero_word) {
  if (n < 1 || !nf4::is_valid_blocksize(blocksize)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return quantize_blocks_dispatch_bs<DType::kFloat32>(w, n, blocksize, packed, absmax,
                                                          zero_word, stream);
    case DType::kBFloat16:
      return quantize_blocks_dispatch_bs<DType::kBFloat16>(w, n, blocksize, packed, absmax,
                                                           zero_word, stream);
    case DType::kFloat16:
      return quantize_blocks_dispatch_bs<DType::kFloat16>(w, n, blocksize, packed, absmax,
                                                          zero_word, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_quantize_absmax_nested(const float* absmax, int64_t nb, const float* offset,
                                          const float* code, uint8_t* q, float* nested_absmax,
                                          cudaStream_t stream) {
  if (nb < 1) return cudaErrorInvalidValue;
  const int64_t grid = (nb + nf4::kNestedBlocksize - 1) / nf4::kNestedBlocksize;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
  quantize_absmax_nested_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      absmax, nb, offset, code, q, nested_absmax);
  return cudaGetLastError();
}

static int torch_mean_ctas(int64_t nb, int sms, int max_threads_per_sm) {
  // setReduceConfig for one output, a contiguous fp32 input of nb >= 2048 values: vectorized
  // (input_vec_size 4), block 512 x 1, values_per_thread = div_up(nb, 512); the input is split
  // over CTAs when values_per_thread >= 256 (max_values_per_thread), into
  // max(min(target grid, div_up(vpt, 16)), div_up(vpt, 256)) CTAs.
  if (nb < kMeanMinValues) return 0;
  const int64_t vpt = (nb + kMeanThreads - 1) / kMeanThreads;
  if (vpt < 256) return 1;
  const int64_t target = static_cast<int64_t>(sms) * (max_threads_per_sm / kMeanThreads);
  const int64_t c2 = (vpt + 15) / 16, c3 = (vpt + 255) / 256;
  const int64_t c = c2 < target ? c2 : target;
  return static_cast<int>(c > c3 ? c : c3);
}

cudaError_t absmax_mean_workspace(int64_t nb, int* ctas) {
  int dev = 0, sms = 0, mt = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&mt, cudaDevAttrMaxThreadsPerMultiProcessor, dev);
  if (err != cudaSuccess) return err;
  *ctas = torch_mean_ctas(nb, sms, mt);
  return (*ctas < 1 || *ctas > kMeanMaxCtas) ? cudaErrorInvalidValue : cudaSuccess;
}

cudaError_t launch_absmax_mean_nested(const float* absmax, int64_t nb, int ctas, bool shfl_up,
                                      float* staging, uint32_t* arrived, float* offset,
                                      const float* dyn_code, uint8_t* q, float* nested_absmax,
                                      const float* nf4_code, float* code_out, float* dyn_code_out,
                                      cudaStream_t stream, int64_t wait_ns) {
  if (!aligned(absmax, 16) || nb < kMeanMinValues || ctas < 1 || ctas > kMeanMaxCtas) {
    return cudaErrorInvalidValue;  // torch's vector path starts at 0; ctas from absmax_mean_workspace
  }
  // $LORA_KERNELS_DQ_VARIANT (read per launch; an A/B switch until the GPU measures it): bit 1
  // picks absmax_mean_nested_v2_kernel, bit 0 launches the kernel as a programmatic dependent of
  // the block pass (sm_90, with q only: the mean-only call follows a memset), bit 2 the block pass
  // as one of the kernel before it (quantize_blocks_launch).  Same bits either way.
  const char* env = std::getenv("LORA_KERNELS_DQ_VARIANT");
  const int variant = env != nullptr ? std::atoi(env) : 0;
  bool pdl = false;
  cudaError_t err = pdl_when_asked((variant & 1) != 0 && q != nullptr, &pdl);
  if (err != cudaSuccess) return err;
  const float factor = 1.0f / static_cast<float>(nb);  // torch: float(num_outputs) / numel
  const unsigned long long wait = wait_ns < 0 ? kMeanWaitNs : static_cast<unsigned long long>(wait_ns);
  const int64_t nnested = (nb + nf4::kNestedBlocksize - 1) / nf4::kNestedBlocksize;
  int resident = 0;
  if (variant & 2) {
    // One warp per nested block, up to what is resident at once (the barrier's peers)
    err = resident_ctas<absmax_mean_nested_v2_kernel>(&resident, kMeanThreads);
    if (err != cudaSuccess) return err;
    const int64_t cta_blocks = (nnested + kMeanWarps - 1) / kMeanWarps;
    const int64_t want = q == nullptr ? ctas : (cta_blocks > ctas ? cta_blocks : ctas);
    const int grid = static_cast<int>(min64(want, resident));
    const MeanNestedArgs args{absmax, nb, ctas, shfl_up, factor, staging, arrived, offset, dyn_code, q,
                              nested_absmax, nf4_code, code_out, dyn_code_out, wait, aligned(q, 8)};
    return launch_maybe_pdl(absmax_mean_nested_v2_kernel, dim3(grid), dim3(kMeanThreads), 0, stream, pdl,
                            args);
  }
  // As many CTAs as the nested pass has pairs of blocks, up to what is resident at once (the
  // barrier's peers; one that is not resident only costs its waiters the timeout).
  err = resident_ctas<absmax_mean_nested_kernel>(&resident, kMeanThreads);
  if (err != cudaSuccess) return err;
  const int64_t pairs = (nnested + 1) / 2;
  const int64_t want = q == nullptr ? ctas : (pairs > ctas ? pairs : ctas);
  const int grid = static_cast<int>(min64(want, resident));
  return launch_maybe_pdl(absmax_mean_nested_kernel, dim3(grid), dim3(kMeanThreads), 0, stream, pdl,
                          absmax, nb, ctas, shfl_up, factor, staging, arrived, offset, dyn_code, q,
                          nested_absmax, nf4_code, code_out, dyn_code_out, wait);
}

cudaError_t launch_dequantize(const uint8_t* packed, const float* absmax_f32,
                              const uint8_t* absmax_q, const float* nested_absmax,
                              const float* nested_code, const float* offset, const float* code,
                              int64_t n, int blocksize, DType out_dtype, void* out,
                              cudaStream_t stream) {
  if (n < 1 || !nf4::is_valid_blocksize(blocksize)) return cudaErrorInvalidValue;
  const int log2_bs = nf4::log2_blocksize(blocksize);
  switch (out_dtype) {
    case DType::kFloat32:
      return dequantize_dispatch_nested<DType::kFloat32>(packed, absmax_f32, absmax_q,
                                                         nested_absmax, nested_code, offset, code,
                                                         n, log2_bs, out, stream);
    case DType::kBFloat16:
      return dequantize_dispatch_nested<DType::kBFloat16>(packed, absmax_f32, absmax_q,
                                                          nested_absmax, nested_code, offset,
                                                          code, n, log2_bs, out, stream);
    case DType::kFloat16:
      return dequantize_dispatch_nested<DType::kFloat16>(packed, absmax_f32, absmax_q,
                                                         nested_absmax, nested_code, offset, code,
                                                         n, log2_bs, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lora_kernels
