// Fused QLoRA decode, variant 3 (lora_gemv(..., variant=3)): a CUDA-core, bandwidth-first GEMV for
// few rows of x:  y = x · Ŵᵀ + ((x · Aᵀ) ⊙ s) · Bᵀ + bias.  Taken for M <= 4 by default
// ($LORA_KERNELS_GEMV_V3_MAX_M = 1..8 moves the limit; the kernel is built for M <= kV3MaxM = 8);
// beyond it nf4_lora_gemv_v3_config says no and the binding runs variant 1 (CUDA-core FMAs grow
// with M: at M = 8 this kernel is issue-bound near variant 1's time, see the estimate below).
//
// Layout
//  * CTA = 8 warps = 32 weight rows x one K slice [k0, k0 + KS) (grid (ceil(N / 32), S)).  Warp w
//    owns rows 4w .. 4w+3 of the tile; lane = 8 rr + g works on row rr and, in step t, on the
//    32-element chunk 8t + g of the slice (16 packed bytes: one ld.global.nc.L1::no_allocate.v4).
//    One warp step = 4 rows x 128 contiguous bytes (whole lines, whole 32-B sectors per request).
//    Steps are requested in batches of kU = 4, double-buffered (the next batch is requested before
//    the current one is used): 4-8 x 16 B per lane in flight, 16-32 KB per CTA, 2 CTAs per SM
//    (128 registers x 256 threads; ~111 KB of shared memory each).
//  * Lookup: byte v -> the dtype pair {code[v >> 4], code[v & 15]} (variant 1's table), 32 replicas:
//    entry v of lane l at byte 256 v + 4 l (bank l: conflict-free; bytes 128..255 of each entry are
//    unused), so the table offset of packed byte b is ONE prmt of the packed word and 4·lane; one
//    lds.32 gives 2 weights; bf16 -> fp32 is a shift / a mask (fp16: two cvt).
//  * x: the slice of x for the M rows, fp32 in shared memory, padded by 4 words every 32 (element k
//    at k + 4 (k >> 5)): the 8 lanes of a row read 8 distinct float4 covering all 32 banks and the
//    4 rows of the warp read the same addresses (broadcast): one wavefront per lds.128.
//  * Per step and x row m the lane sums x · dtype(code) over its 32 elements in fp32 (two chains),
//    then acc[m] += partial · absmax (fp32 absmax decoded in place when double-quantized: one
//    multiply per 32 products).  The 8 lanes of a row are then summed by shuffles.
//  * S (K slices): 1 when x fits (M · K · 4.5 B <= 46 KB) and N gives >= 3 CTAs per SM; else the
//    CTAs write fp32 partials [S][M][N] into the workspace and a finish kernel sums them in slice
//    order (deterministic) and adds the LoRA term and the bias.
//  * LoRA: T = (x · Aᵀ) ⊙ s (fp32 [M, r], in the workspace) by a small kernel launched first; the
//    GEMV follows it as a programmatic dependent launch (sm_90; $LORA_KERNELS_GEMV_V3_PDL=0 turns
//    it off) so its weight stream overlaps the T kernel, and waits (griddepcontrol.wait) only
//    before reading T in its epilogue.  The finish kernel is a programmatic dependent of the GEMV.
//    Epilogue: v = base + Σ_j T[m, j] B[n, j] (fp32) + bias, rounded once to dtype (variant 1's
//    order of the three terms; the fp32 sums are grouped differently).
// Numerics: the products of variant 1 (dtype(code) · x, fp32), the block scale applied per 32
// products instead of per 64, another fp32 summation order.
//
// Cost, read off the sm_90 SASS (cuobjdump, --fmad=false as setup.py builds; bf16, double quant; the
// unguarded batch path; per step = per 16 packed bytes per lane = 512 B per warp):
//    M = 1: 130 instructions = 16 PRMT + 16 LDS (table) + 16 + 16 bf16->fp32 (IMAD.U32/SHF, LOP3)
//           + 8 LDS.128 (x) + 33 FFMA + 1 FADD + ~24 (3 LDG incl. the LDG.E.NA.128, 32-bit absmax
//           index math, absmax decode, loop);
//    M = 2: 173, M = 4: 258, M = 8: 428 (+ 32 FFMA, 8 LDS.128, ~3 per extra row).
//  Issue bound (4 warp-instr / cycle / SM, 132 SMs, ~1.755 GHz under load): M = 1 3.6 TB/s,
//  M = 2 2.7, M = 4 1.8, M = 8 1.1 TB/s.  Shared memory (1 wavefront / cycle / SM): 16 + 8 M + 1
//  wavefronts per step: M = 1 4.9 TB/s, M = 4 2.9 TB/s.  So M = 1-2 should be memory-bound
//  (~2.6-2.8 TB/s reachable of the 3.0 TB/s copy bandwidth), M >= 4 issue-bound.
// Predicted kernel time (H100 SXM, CUDA-graph replay; ~1.5 us of launch/ramp/tail added; r = 16
// adds ~0.5-1 us: the T kernel overlaps the GEMV, B rows and T are read in the epilogue):
//    4096x14336  M=1: ~12.5 us r=0 / ~13.5 us r=16 (floor 10.1);  M=4: ~22 us
//    14336x4096  M=1: ~13.5 / ~14 us (S = 4 + finish kernel);     M=4: ~23 us
//    8192x28672  M=1: ~46 / ~47 us (floor 40.3);                  M=4: ~83 us
//    M = 16 (and M > 4 by default): variant 1 (33 / 31 / 105 us measured).
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

constexpr int kV3Warps = 8;
constexpr int kV3Threads = kV3Warps * 32;
constexpr int kV3Rows = 4 * kV3Warps;       // weight rows per CTA
constexpr int kU = 4;                       // steps per batch (16 B per lane each)
constexpr int kV3LutBytes = 256 * 256;      // byte -> dtype-pair table, 32 replicas, 256-B stride
// x slice in shared memory (fp32, padded): with the table, 2 CTAs (~113 KB each) fit in an SM
constexpr int kXMaxBytes = 46 * 1024;
constexpr int kTThreads3 = 256;
constexpr int kFinishThreads = 256;

// Streaming 16-byte load of the packed weight (read once: no L1 allocation).
__device__ __forceinline__ uint4 ldg_stream_v4(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// ---------------------------------------------------------------------------------------------
// The GEMV
// ---------------------------------------------------------------------------------------------
struct V3Params {
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
  int KS;          // slice length (multiple of 256); slice s = [s KS, min(K, (s + 1) KS))
  int S;           // slices (gridDim.y)
  const void* lora_b;
  int r;
  const float* t;  // T [M, r] fp32 (nullptr: no low-rank term)
  const void* bias;
  bool bias_f32;
  float* part;     // S > 1: fp32 partial sums [S][M][N]
};

template <bool kNested, int U>
struct Batch {
  uint4 w[U];
  uint32_t q[U];   // nested: the 8-bit absmax code
  float a[U];      // nested: nested_absmax of the block; else the fp32 absmax
};

// What a lane needs to address its weight chunks and their absmax.
struct LaneCtx {
  const uint8_t* wrow;  // packed bytes of its row at chunk g of the slice (step t: + 128 t)
  uint32_t blk_row;     // first absmax block of its row (N·K / blocksize < 2^31: config)
  int kg;               // row element of its chunk at step 0
  int g, nchunks, log2_bs;
};

// Requests steps t0 .. t0 + kU - 1 (16 B of weight + the block's absmax each).  kFull: every chunk
// of these steps lies in the slice (no per-step check).
template <bool kNested, bool kFull>
__device__ __forceinline__ void issue_batch(const V3Params& p, const LaneCtx& L, Batch<kNested, kU>& b, int t0) {
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int t = t0 + u;
    if (kFull || t * 8 + L.g < L.nchunks) {
      b.w[u] = ldg_stream_v4(L.wrow + t * 128);
      const uint32_t blk = L.blk_row + static_cast<uint32_t>((L.kg + t * 256) >> L.log2_bs);
      if (kNested) {
        b.q[u] = __ldg(p.absmax_q + blk);
        b.a[u] = __ldg(p.nested_absmax + (blk >> 8));  // 256 absmax per nested block
      } else {
        b.q[u] = 0u;
        b.a[u] = __ldg(p.absmax_f32 + blk);
      }
    } else {
      b.w[u] = make_uint4(0u, 0u, 0u, 0u);
      b.q[u] = 0u;
      b.a[u] = 0.f;
    }
  }
}

// acc[m] += absmax · Σ_{32 elements of the chunk} x[m, k] · dtype(code[idx_k]) for each step.
template <typename T, int MM, bool kNested, bool kFull>
__device__ __forceinline__ void compute_batch(const LaneCtx& L, const Batch<kNested, kU>& b, int t0,
                                              const char* lut_c, uint32_t lane4, const float* xsm, int XS,
                                              const float* ncode_s, float offset, float* acc) {
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int c = (t0 + u) * 8 + L.g;  // chunk of the slice
    if (kFull || c < L.nchunks) {
      const float amax = kNested ? __fadd_rn(__fmul_rn(ncode_s[b.q[u]], b.a[u]), offset) : b.a[u];
      const float4* xs = reinterpret_cast<const float4*>(xsm + c * 36);
      float pe[MM], po[MM];
#pragma unroll
      for (int m = 0; m < MM; ++m) pe[m] = po[m] = 0.f;
      const uint32_t words[4] = {b.w[u].x, b.w[u].y, b.w[u].z, b.w[u].w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float f[8];  // f[2 bb] = element 8q + 2bb (the high nibble), f[2 bb + 1] = the next one
#pragma unroll
        for (int bb = 0; bb < 4; ++bb) {
          // byte bb of the word -> table byte offset 256 · byte + 4 · lane: one prmt
          const uint32_t off = __byte_perm(words[q], lane4, 0x5504u + 16u * bb);
          Num<T>::unpack(*reinterpret_cast<const uint32_t*>(lut_c + off), f[2 * bb], f[2 * bb + 1]);
        }
#pragma unroll
        for (int m = 0; m < MM; ++m) {
          const float4 xa = xs[m * (XS / 4) + 2 * q];
          const float4 xb = xs[m * (XS / 4) + 2 * q + 1];
          pe[m] = __fmaf_rn(xa.x, f[0], pe[m]);
          po[m] = __fmaf_rn(xa.y, f[1], po[m]);
          pe[m] = __fmaf_rn(xa.z, f[2], pe[m]);
          po[m] = __fmaf_rn(xa.w, f[3], po[m]);
          pe[m] = __fmaf_rn(xb.x, f[4], pe[m]);
          po[m] = __fmaf_rn(xb.y, f[5], po[m]);
          pe[m] = __fmaf_rn(xb.z, f[6], pe[m]);
          po[m] = __fmaf_rn(xb.w, f[7], po[m]);
        }
      }
#pragma unroll
      for (int m = 0; m < MM; ++m) acc[m] = __fmaf_rn(__fadd_rn(pe[m], po[m]), amax, acc[m]);
    }
  }
}

template <typename T, int MM, bool kNested>
__global__ void __launch_bounds__(kV3Threads, 2) nf4_gemv_v3_kernel(const V3Params p) {
  // Dynamic shared memory: the table (64 KB: entry v of lane l = the dtype pair {code[v >> 4],
  // code[v & 15]} at byte 256 v + 4 l, so that its offset is one byte permute of the packed word and
  // 4 · lane), the x slice [MM][XS] (padded fp32), the nested code [256].
  extern __shared__ __align__(16) unsigned char smem_v3[];
  float* dsm = reinterpret_cast<float*>(smem_v3 + kV3LutBytes);

  // Dependents (the finish kernel) may be scheduled once every CTA of this grid has started; they
  // wait for this grid's completion before reading anything it writes.
  griddep_launch_dependents();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane & 7, rr = lane >> 3;
  const int s = blockIdx.y;
  const int K = p.K;
  const int k0 = s * p.KS;
  const int KSa = min(p.KS, K - k0);             // a multiple of 64
  const int XS = (p.KS >> 5) * 36;               // padded x row stride (floats)
  const int n_raw = blockIdx.x * kV3Rows + warp * 4 + rr;
  const int n = min(n_raw, p.N - 1);             // rows past N: clamped loads, never stored

  LaneCtx L;
  L.wrow = p.packed + static_cast<int64_t>(n) * (K / 2) + k0 / 2 + g * 16;
  L.blk_row = static_cast<uint32_t>(n) * static_cast<uint32_t>(K >> p.log2_bs);
  L.kg = k0 + g * 32;
  L.g = g;
  L.nchunks = KSa >> 5;                          // 32-element chunks of the slice (even)
  L.log2_bs = p.log2_bs;
  const int NS = (KSa + 255) >> 8;               // steps (8 chunks per row each)
  const int full_steps = L.nchunks >> 3;         // steps whose 8 chunks all lie in the slice

  // The first batch is requested before the table and x are staged (its latency overlaps them).
  Batch<kNested, kU> b0, b1;
  if (kU <= full_steps) issue_batch<kNested, true>(p, L, b0, 0);
  else issue_batch<kNested, false>(p, L, b0, 0);

  // ---- table, x slice, nested code
  {
    for (int i = tid; i < 256 * 8; i += kV3Threads) {
      const int v = i >> 3, j = i & 7;  // entry v, lanes 4j .. 4j + 3 (bytes 128 .. 255 unused)
      const uint32_t w = Num<T>::pack(__ldg(p.code + (v >> 4)), __ldg(p.code + (v & 15)));
      *reinterpret_cast<uint4*>(smem_v3 + v * 256 + j * 16) = make_uint4(w, w, w, w);
    }
    const T* x = static_cast<const T*>(p.x);
    const int vpr = KSa >> 3;  // 16-byte vectors per row of the slice
    for (int i = tid; i < MM * vpr; i += kV3Threads) {
      const int m = i / vpr, kk = (i - m * vpr) * 8;
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * K + k0 + kk));
      float f[8];
      Num<T>::unpack(v.x, f[0], f[1]);
      Num<T>::unpack(v.y, f[2], f[3]);
      Num<T>::unpack(v.z, f[4], f[5]);
      Num<T>::unpack(v.w, f[6], f[7]);
      float4* dst = reinterpret_cast<float4*>(dsm + m * XS + kk + 4 * (kk >> 5));
      dst[0] = make_float4(f[0], f[1], f[2], f[3]);
      dst[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
    if (kNested) {
      for (int i = tid; i < 256; i += kV3Threads) dsm[MM * XS + i] = __ldg(p.nested_code + i);
    }
  }
  const float offset = kNested ? __ldg(p.offset) : 0.f;
  const float* ncode_s = dsm + MM * XS;
  __syncthreads();

  const uint32_t lane4 = static_cast<uint32_t>(lane) * 4u;
  const char* lut_c = reinterpret_cast<const char*>(smem_v3);
  float acc[MM];
#pragma unroll
  for (int m = 0; m < MM; ++m) acc[m] = 0.f;

  // ---- main loop: one batch in use while the next is in flight
  for (int t0 = 0; t0 < NS; t0 += 2 * kU) {
    if (t0 + 2 * kU <= full_steps) {
      issue_batch<kNested, true>(p, L, b1, t0 + kU);
      compute_batch<T, MM, kNested, true>(L, b0, t0, lut_c, lane4, dsm, XS, ncode_s, offset, acc);
    } else {
      issue_batch<kNested, false>(p, L, b1, t0 + kU);
      compute_batch<T, MM, kNested, false>(L, b0, t0, lut_c, lane4, dsm, XS, ncode_s, offset, acc);
    }
    if (t0 + 3 * kU <= full_steps) {
      issue_batch<kNested, true>(p, L, b0, t0 + 2 * kU);
      compute_batch<T, MM, kNested, true>(L, b1, t0 + kU, lut_c, lane4, dsm, XS, ncode_s, offset, acc);
    } else {
      issue_batch<kNested, false>(p, L, b0, t0 + 2 * kU);
      compute_batch<T, MM, kNested, false>(L, b1, t0 + kU, lut_c, lane4, dsm, XS, ncode_s, offset, acc);
    }
  }

  // ---- sum the 8 lanes of each row (every lane ends with the row's sum)
#pragma unroll
  for (int m = 0; m < MM; ++m) {
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) acc[m] = __fadd_rn(acc[m], __shfl_xor_sync(0xffffffffu, acc[m], o));
  }

  if (p.S > 1) {
    // partial sums of this slice; the finish kernel adds the slices, the LoRA term and the bias
    if (n_raw < p.N) {
#pragma unroll
      for (int m = 0; m < MM; ++m) {
        if (m == g) p.part[(static_cast<int64_t>(s) * MM + m) * p.N + n_raw] = acc[m];
      }
    }
    griddep_wait();  // T (if any) complete before this grid completes: the finish kernel reads it
    return;
  }

  float lora[MM];
#pragma unroll
  for (int m = 0; m < MM; ++m) lora[m] = 0.f;
  if (p.t != nullptr) {
    griddep_wait();  // T written by the kernel this one was launched after
    const T* br = static_cast<const T*>(p.lora_b) + static_cast<int64_t>(n) * p.r;
    for (int j = g; j < p.r; j += 8) {
      const float bj = Num<T>::to_float(br[j]);
#pragma unroll
      for (int m = 0; m < MM; ++m) lora[m] = __fmaf_rn(p.t[m * p.r + j], bj, lora[m]);
    }
#pragma unroll
    for (int m = 0; m < MM; ++m) {
#pragma unroll
      for (int o = 1; o < 8; o <<= 1) lora[m] = __fadd_rn(lora[m], __shfl_xor_sync(0xffffffffu, lora[m], o));
    }
  }
  if (n_raw < p.N) {
    float bias = 0.f;
    if (p.bias != nullptr) {
      bias = p.bias_f32 ? static_cast<const float*>(p.bias)[n_raw]
                        : Num<T>::to_float(static_cast<const T*>(p.bias)[n_raw]);
    }
    T* y = static_cast<T*>(p.y);
#pragma unroll
    for (int m = 0; m < MM; ++m) {
      if (m == g) {
        float v = acc[m];
        if (p.t != nullptr) v = __fadd_rn(v, lora[m]);
        if (p.bias != nullptr) v = __fadd_rn(v, bias);
        y[static_cast<int64_t>(m) * p.N + n_raw] = Num<T>::from_float(v);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
struct V3Config {
  bool ok = false;
  int S = 1, KS = 0, tiles = 0;
  int smem_dyn = 0;
  size_t ws_bytes = 0, off_part = 0;
  int major = 0;
};

// Longest slice (elements, a multiple of 256) whose x fits: M · KS · 36/32 floats <= kXMaxBytes.
constexpr int max_slice_elems(int M) { return (kXMaxBytes * 8 / (M * 36)) / 256 * 256; }
constexpr int smem_dyn_bytes(int M, int KS) { return kV3LutBytes + M * (KS / 32) * 36 * 4 + 256 * 4; }

// Largest M variant 3 takes: $LORA_KERNELS_GEMV_V3_MAX_M (1..kV3MaxM), default kV3DefaultMaxM.
int v3_max_m() {
  const char* e = std::getenv("LORA_KERNELS_GEMV_V3_MAX_M");
  if (e == nullptr || e[0] == '\0') return kV3DefaultMaxM;
  const int v = std::atoi(e);
  return v < 1 ? 1 : (v > kV3MaxM ? kV3MaxM : v);
}

V3Config v3_config(const GemvArgs& a) {
  V3Config c;
  if (a.M < 1 || a.M > v3_max_m() || a.N < 1 || a.K < kGemvKChunk || a.K % kGemvKChunk != 0) return c;
  if (!nf4::is_valid_blocksize(a.blocksize) || a.blocksize < kGemvKChunk || a.K % a.blocksize != 0) return c;
  if (a.dtype != DType::kBFloat16 && a.dtype != DType::kFloat16) return c;
  if (a.lora_a != nullptr && (a.r < 1 || a.r > kGemvMaxRank || a.lora_b == nullptr)) return c;
  if (static_cast<int64_t>(a.M) * a.K >= (int64_t{1} << 31)) return c;
  if (static_cast<int64_t>(a.N) * (a.K / a.blocksize) >= (int64_t{1} << 31)) return c;  // 32-bit blocks
  if (reinterpret_cast<uintptr_t>(a.packed) % 16 != 0) return c;  // 16-byte weight loads (x, lora_a:
                                                                  // 16-byte aligned by the caller)
  const DevInfo d = dev_info();
  if (d.major < 8) return c;
  c.major = d.major;
  c.tiles = (a.N + kV3Rows - 1) / kV3Rows;
  // Slice length: x of the slice must fit (M · KS · 4.5 B <= kXMaxBytes), and small N is split over
  // K until there are >= 3 CTAs per SM (slices of >= 1024 elements).
  const int64_t ksteps = (a.K + 255) / 256;                 // 256-element steps in K
  const int64_t ks_fit = max_slice_elems(a.M) / 256;        // steps of x that fit
  if (ks_fit < 1) return c;
  int64_t S = (ksteps + ks_fit - 1) / ks_fit;
  const int64_t want = 3 * static_cast<int64_t>(d.sms);
  if (static_cast<int64_t>(c.tiles) * S < want) {
    int64_t S_par = (want + c.tiles - 1) / c.tiles;
    const int64_t S_max = (ksteps + 3) / 4;                  // slices of >= 4 steps
    if (S_par > S_max) S_par = S_max;
    if (S_par > S) S = S_par;
  }
  if (S < 1) S = 1;
  const int64_t steps_per = (ksteps + S - 1) / S;
  c.KS = static_cast<int>(steps_per * 256);
  c.S = static_cast<int>((a.K + c.KS - 1) / c.KS);
  if (c.S > 65535) return c;
  c.smem_dyn = smem_dyn_bytes(a.M, c.KS);
  if (c.smem_dyn > d.smem_optin) return c;
  size_t off = 0;
  if (a.lora_a != nullptr) off = align_up(static_cast<size_t>(a.M) * a.r * 4, 256);
  c.off_part = off;
  if (c.S > 1) off += static_cast<size_t>(c.S) * a.M * a.N * 4;
  c.ws_bytes = off;
  c.ok = true;
  return c;
}

bool use_pdl(const V3Config& c) {
  if (c.major < 9) return false;
  const char* e = std::getenv("LORA_KERNELS_GEMV_V3_PDL");
  return !(e != nullptr && e[0] == '0');
}

template <typename T, int MM, bool kNested>
cudaError_t launch_gemv3(const V3Params& p, const V3Config& c, bool pdl, cudaStream_t stream) {
  auto kern = nf4_gemv_v3_kernel<T, MM, kNested>;
  static std::atomic<int> smem_set[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
  if (smem_set[dev].load(std::memory_order_acquire) < c.smem_dyn) {
    // the largest dynamic size this instantiation can ask for, once per device
    int want = smem_dyn_bytes(MM, max_slice_elems(MM));
    if (want < c.smem_dyn) want = c.smem_dyn;
    const cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, want);
    if (err != cudaSuccess) return err;
    // a hint: the largest shared-memory carveout, so that two CTAs (~111 KB each) fit in an SM
    (void)cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    (void)cudaGetLastError();
    smem_set[dev].store(want, std::memory_order_release);
  }
  return launch_maybe_pdl(kern, dim3(c.tiles, c.S), dim3(kV3Threads), static_cast<size_t>(c.smem_dyn), stream,
                          pdl, p);
}

template <typename T, bool kNested>
cudaError_t launch_gemv3_m(const V3Params& p, const V3Config& c, bool pdl, cudaStream_t stream) {
  switch (p.M) {
    case 1: return launch_gemv3<T, 1, kNested>(p, c, pdl, stream);
    case 2: return launch_gemv3<T, 2, kNested>(p, c, pdl, stream);
    case 3: return launch_gemv3<T, 3, kNested>(p, c, pdl, stream);
    case 4: return launch_gemv3<T, 4, kNested>(p, c, pdl, stream);
    case 5: return launch_gemv3<T, 5, kNested>(p, c, pdl, stream);
    case 6: return launch_gemv3<T, 6, kNested>(p, c, pdl, stream);
    case 7: return launch_gemv3<T, 7, kNested>(p, c, pdl, stream);
    case 8: return launch_gemv3<T, 8, kNested>(p, c, pdl, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_v3_typed(const GemvArgs& a, const V3Params& p, const V3Config& c, cudaStream_t stream) {
  return launch_chain<T, V3Params, kTThreads3, kFinishThreads>(a, p, c.S, use_pdl(c), stream, [&](bool pdl_gemv) {
    return p.absmax_q != nullptr ? launch_gemv3_m<T, true>(p, c, pdl_gemv, stream)
                                 : launch_gemv3_m<T, false>(p, c, pdl_gemv, stream);
  });
}

}  // namespace

bool nf4_lora_gemv_v3_config(const GemvArgs& a, size_t* workspace_bytes) {
  const V3Config c = v3_config(a);
  if (workspace_bytes != nullptr) *workspace_bytes = c.ok ? c.ws_bytes : 0;
  return c.ok;
}

cudaError_t launch_nf4_lora_gemv_v3(const GemvArgs& a, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream) {
  const V3Config c = v3_config(a);
  if (!c.ok) return cudaErrorInvalidValue;
  if (c.ws_bytes > 0 && (workspace == nullptr || workspace_bytes < c.ws_bytes)) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  V3Params p;
  fill_chain_params(p, a, a.lora_a != nullptr ? reinterpret_cast<float*>(ws) : nullptr,
                    c.S > 1 ? reinterpret_cast<float*>(ws + c.off_part) : nullptr);
  p.KS = c.KS;
  p.S = c.S;
  switch (a.dtype) {
    case DType::kBFloat16: return launch_v3_typed<__nv_bfloat16>(a, p, c, stream);
    case DType::kFloat16: return launch_v3_typed<__half>(a, p, c, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lora_kernels
