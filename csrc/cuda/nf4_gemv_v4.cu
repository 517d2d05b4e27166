// Fused QLoRA decode, variant 4 (lora_gemv(..., variant=4)): tensor cores with the WEIGHT as the
// MMA's A operand, for M = 1..16 rows of x:  y = x · Ŵᵀ + ((x · Aᵀ) ⊙ s) · Bᵀ + bias.
//
// Layout
//  * MMA: mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: A = 16 weight rows x 16 k (dequantized
//    by table lookup straight into the A registers), B = xᵀ (16 k x 8 rows of x; M <= 8: one n8
//    tile, 9 <= M <= 16: two, rows of x >= M are zeros), C fp32 16 x 8.  Work unit = (16-row tile,
//    64-k chunk) = 512 packed bytes = 16 bytes per lane, 4 MMAs (8 for M > 8).
//  * Lane (g = lane / 4, q = lane % 4) holds the A rows g and g + 8 of the tile (fragment rows), and
//    loads bytes [8q, 8q + 8) of each of those rows' 32-byte chunk: 2 x ld.global.nc.L1::no_allocate
//    .v2 (8 B) per 16 B.  A warp's load = 8 rows x one whole 32-byte sector.
//  * k-permutation (the sum over k is order-free): MMA step s (0..3), A register of fragment column
//    pair j (0: a0/a1, 1: a2/a3), half h hold the real chunk element k = 16 q + 4 s + 2 j + h, i.e.
//    packed byte 2 s + j of the lane's 8 bytes of that row (high nibble = even k = low half).  So
//    one lookup per packed byte gives one A register.  B (x) uses the same map: b0 / b1 of step s
//    are words 2 s / 2 s + 1 of x[m][16 q .. 16 q + 16) (the lane's 32 contiguous bytes of x row
//    m = g, or g + 8 for the second n8 tile).  tests/test_gemv_v4_layout.py checks this map on the
//    CPU against the PTX fragment layouts.
//  * Why 8-byte and not 16-byte weight loads (deviation from the brief's ideal): the block scale
//    is applied per 64-k chunk after the MMAs, so the 16 k of one MMA row must lie in one absmax
//    block; each of the 4 lanes of a row group brings 4 of them, i.e. every lane needs 8 bytes of
//    the same 64-element block per (row, chunk).  A lane's contiguous 16 bytes span 32 elements of
//    one row, so with blocksize 64 the 4 lanes of a group would straddle two blocks inside each MMA.
//    16-byte loads would need blocksize >= 128 (two chunks per absmax) or a shuffle; 8-byte loads
//    still use every 32-byte sector fully per instruction.  Not done: a 16-byte path for bs >= 128.
//  * Lookup table: byte v -> dtype pair {code[v >> 4] (low half), code[v & 15] (high half)}, 32
//    replicas: entry v of lane l at byte 256 v + 4 l (bank l, conflict-free), so the address is ONE
//    prmt of the packed word with a register holding 4 l (variant 3's trick).  Built in shared
//    memory once per CTA from the 16 code values (2048 16-byte stores over the CTA; the grid is
//    persistent, so once per SM).  Bytes 128..255 of each entry are not table: they hold the
//    per-warp partial tiles of the in-CTA reduction (32 KB in 128-byte pieces).
//  * x: the K slice of x for the M rows, as dtype in shared memory, rows padded by 16 bytes (row
//    stride = 16 mod 128 bytes: the two rows of a quarter warp's lds.128 hit disjoint banks).
//    Staged once per (CTA, slice) with 16-byte loads; the first weight batch is requested before.
//  * Grid: persistent, CTAs = SMs x (CTAs per SM from the occupancy API; 1 in practice: 16 warps x
//    <= 128 registers fill the register file).  K is cut into S slices of CS chunks (S = 1 unless x
//    of a slice does not fit shared memory, or a few slices balance the grid better: host cost
//    model in v4_config).  Work items (tile, slice) flattened slice-major; CTA b takes items
//    [b I / G, (b + 1) I / G) (counts differ by at most one: every SM streams the same bytes within
//    one tile's worth).  Inside the CTA the 16 warps split the (tile, chunk) units of each slice
//    segment into 16 equal contiguous ranges (stream-K inside the CTA): a warp that covers a whole
//    tile finishes it itself; tiles shared by several warps are summed in warp order (k order) in
//    shared memory after a barrier.  Deterministic.  S > 1: fp32 partials [S][M][N] in the
//    workspace and variant 3's finish kernel (slice order, then LoRA and bias).
//  * Memory-level parallelism: batches of kD = 4 chunks (8 x 8 B of weight + 2 absmax loads per
//    chunk per lane), double-buffered (the next batch is requested before the current is used):
//    4-8 KB per warp, 32-64 KB per SM in flight.  Streaming (no L1 allocation) weight loads.
//  * Block scale after the MMAs: each chunk's MMAs accumulate into a fresh fp32 fragment, then
//    acc += absmax(row, block) · c (fp32 fma; double quant decoded in place with exactly
//    fl(fl(nested_code[q] · nested_absmax[b >> 8]) + offset)).
//  * LoRA: variant 3's T kernel (T = (x · Aᵀ) ⊙ s, fp32 [M, r]) runs first; the GEMV is its
//    programmatic dependent (sm_90, cudaLaunchKernelEx + programmatic stream serialization;
//    $LORA_KERNELS_GEMV_V4_PDL=0 turns it off; plain launches below sm_90) and waits
//    (griddepcontrol.wait) only before reading T in its epilogue.  Epilogue: v = base +
//    Σ_j T[m, j] B[n, j] (fp32) + bias (dtype or fp32), rounded once to dtype, stored for m < M,
//    n < N.  scale_vec supported (in the T kernel).
// Numerics: variant 1's products (dtype(code) · x in fp32 through the MMA, times the fp32 absmax
// per 64 products); another fp32 summation order.
//
// Resources (nvcc 13.0 -O3 --fmad=false, sm_90 and sm_80): 512 threads, 128 registers, no spills (kD = 4
// spilled 4-12 bytes at NT8 = 1, hence kD = 3); dynamic shared memory 65536 (table + slots) + 1024 +
// M · (CS · 128 + 16) bytes: 75 KB at M = 1, 198 KB at M = 16 (K = 4096); 1 CTA per SM.
// Cost, read off the sm_90 SASS (cuobjdump; bf16, double quant; the full-batch path of the main loop,
// per 16 packed bytes per lane = 512 B per warp): issue block 80 / 3 chunks + compute block 221 / 3
// + ~15 / 3 loop and flush test:
//    M = 1 (one n8 tile):  ~105 instructions = 16 PRMT + 18 LDS (16 table + 2 nested code) + 2 LDS.128
//        (x) + 4 HMMA + 4 FFMA + ~14 IMAD.IADD (the table base added to each prmt result: a next step
//        is to address the table with a zero-based shared-window register) + 2 LDG.64 + 4 absmax LDG
//        + address / loop;
//    M = 16 (two n8 tiles): ~124 (+ 4 HMMA, 2 LDS.128, 4 FFMA per 16 B).
//  Issue bound (4 warp-instr / cycle / SM, 132 SMs, ~1.755 GHz): M = 1 ~4.5 TB/s, M = 16 ~3.8 TB/s, so
//  at ~2.6 TB/s the SMs issue at ~60-70 %: memory-bound on paper, with little slack.
// PREDICTED (not measured; H100 SXM, CUDA-graph replay, bf16, bs 64, double quant, r = 16; ~3 %
// grid imbalance (7 vs 6.8 tiles per SM), ~1.5 us launch / table / x staging / tail, ~0.5 us LoRA):
//    4096x14336  M = 1: ~13.5 us, M = 16: ~15.5 us (S = 1; 128 KB x staging per CTA)  (floor 10.1)
//    8192x28672  M = 1: ~50 us,   M = 16: ~57 us (S = 2: 7.3 MB of partials + finish kernel) (floor 40.3)
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

constexpr int kV4Warps = 16;
constexpr int kV4Threads = kV4Warps * 32;
constexpr int kD = 3;                      // chunks per batch (4 spills a few bytes at NT8 = 1 under the 128-register cap)
constexpr int kLutBytes = 256 * 256;       // 32 replicas at 256-byte stride (bytes 128..255: red)
constexpr int kNcodeBytes = 256 * 4;
constexpr int kXOff = kLutBytes + kNcodeBytes;
constexpr int kTThreads4 = 256;
constexpr int kFinishThreads4 = 256;
static_assert(kV4Warps * 2 * 16 * 16 * 4 <= 256 * 128, "red slots fit in the table's spare bytes");

// Streaming 8-byte load of the packed weight (read once: no L1 allocation).
__device__ __forceinline__ uint2 ldg_stream_v2(const uint8_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// Byte offset of float f of the in-CTA reduction buffer: bytes 128..255 of table entry f / 32.
__device__ __forceinline__ int red_off(int f) { return ((f >> 5) << 8) + 128 + ((f & 31) << 2); }

// ---------------------------------------------------------------------------------------------
// The GEMV
// ---------------------------------------------------------------------------------------------
struct V4Params {
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
  int tiles;       // ceil(N / 16)
  int C;           // 64-element chunks in K
  int CS;          // chunks per slice; slice s = chunks [s CS, min(C, (s + 1) CS))
  int S;           // slices
  int XSB;         // x row stride in shared memory, bytes (CS · 128 + 16)
  const void* lora_b;
  int r;
  const float* t;  // T [M, r] fp32 (nullptr: no low-rank term)
  const void* bias;
  bool bias_f32;
  float* part;     // S > 1: fp32 partial sums [S][M][N]
};

template <bool kNested>
struct Batch {
  uint2 lo[kD], hi[kD];    // 8 packed bytes of fragment rows g and g + 8 per chunk
  uint32_t qlo[kD], qhi[kD];  // nested: 8-bit absmax codes of the two rows' blocks
  float alo[kD], ahi[kD];     // nested: nested_absmax of the blocks; else the fp32 absmax
};

// A batch: chunks [c, c + len) of local tile t of the segment (never crosses a tile boundary).
struct Desc {
  int t, c, len;
};

// What a warp needs for its range of (local tile, chunk) units in the current slice segment.
struct WarpCtx {
  int tile0;   // global tile of local tile 0
  int c0;      // first chunk of the slice (in K)
  int Cs;      // chunks of this slice
  int ua, ub;  // the warp's unit range [ua, ub) (unit = local tile · Cs + chunk)
  int g, q;
};

__device__ __forceinline__ Desc make_desc(const WarpCtx& w, int t, int c) {
  Desc d;
  if (c == w.Cs) { ++t; c = 0; }
  d.t = t;
  d.c = c;
  const int u = t * w.Cs + c;
  d.len = min(min(kD, w.Cs - c), w.ub - u);
  if (d.len < 0) d.len = 0;
  return d;
}

template <bool kNested, bool kFull>
__device__ __forceinline__ void issue(const V4Params& p, const WarpCtx& w, const Desc& d, Batch<kNested>& b) {
  const int tg = w.tile0 + d.t;
  const int n0 = min(tg * 16 + w.g, p.N - 1), n1 = min(tg * 16 + w.g + 8, p.N - 1);  // clamped rows
  const int kc = w.c0 + d.c;  // chunk in K
  const int64_t KH = p.K >> 1;
  const uint8_t* p0 = p.packed + static_cast<int64_t>(n0) * KH + kc * 32 + w.q * 8;
  const uint8_t* p1 = p.packed + static_cast<int64_t>(n1) * KH + kc * 32 + w.q * 8;
  const uint32_t KB = static_cast<uint32_t>(p.K >> p.log2_bs);
  const uint32_t b0 = static_cast<uint32_t>(n0) * KB, b1 = static_cast<uint32_t>(n1) * KB;
  const int sh = p.log2_bs - 6;  // chunks per block (log2)
#pragma unroll
  for (int i = 0; i < kD; ++i) {
    if (kFull || i < d.len) {
      b.lo[i] = ldg_stream_v2(p0 + i * 32);
      b.hi[i] = ldg_stream_v2(p1 + i * 32);
      const uint32_t kb = static_cast<uint32_t>((kc + i) >> sh);
      if (kNested) {
        b.qlo[i] = __ldg(p.absmax_q + b0 + kb);
        b.qhi[i] = __ldg(p.absmax_q + b1 + kb);
        b.alo[i] = __ldg(p.nested_absmax + ((b0 + kb) >> 8));  // 256 absmax per nested block
        b.ahi[i] = __ldg(p.nested_absmax + ((b1 + kb) >> 8));
      } else {
        b.qlo[i] = b.qhi[i] = 0u;
        b.alo[i] = __ldg(p.absmax_f32 + b0 + kb);
        b.ahi[i] = __ldg(p.absmax_f32 + b1 + kb);
      }
    } else {
      b.lo[i] = b.hi[i] = make_uint2(0u, 0u);
      b.qlo[i] = b.qhi[i] = 0u;
      b.alo[i] = b.ahi[i] = 0.f;
    }
  }
}

// Table lookup of byte bb of word: the dtype pair {code[v >> 4], code[v & 15]}, v = the byte.
__device__ __forceinline__ uint32_t lut_pair(const unsigned char* lut, uint32_t word, uint32_t lane4, int bb) {
  return *reinterpret_cast<const uint32_t*>(lut + __byte_perm(word, lane4, 0x5504u + 16u * bb));
}

// acc += absmax · (A_chunk · B_chunk) for each chunk of the batch.
template <typename T, int NT8, bool kNested, bool kFull>
__device__ __forceinline__ void compute(const WarpCtx& w, const Desc& d, const Batch<kNested>& b,
                                        const unsigned char* lut, uint32_t lane4, const unsigned char* xrow0,
                                        const unsigned char* xrow1, bool has0, bool has1, const float* ncode_s,
                                        float offset, float (&acc)[NT8][4]) {
#pragma unroll
  for (int i = 0; i < kD; ++i) {
    if (kFull || i < d.len) {
      const int cs = d.c + i;  // chunk in the slice
      uint4 xa0 = make_uint4(0u, 0u, 0u, 0u), xb0 = xa0, xa1 = xa0, xb1 = xa0;
      if (has0) {
        const uint4* px = reinterpret_cast<const uint4*>(xrow0 + cs * 128);
        xa0 = px[0];
        xb0 = px[1];
      }
      if (NT8 == 2 && has1) {
        const uint4* px = reinterpret_cast<const uint4*>(xrow1 + cs * 128);
        xa1 = px[0];
        xb1 = px[1];
      }
      const uint32_t x0[8] = {xa0.x, xa0.y, xa0.z, xa0.w, xb0.x, xb0.y, xb0.z, xb0.w};
      const uint32_t x1[8] = {xa1.x, xa1.y, xa1.z, xa1.w, xb1.x, xb1.y, xb1.z, xb1.w};
      float c[NT8][4];
#pragma unroll
      for (int j = 0; j < NT8; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const uint32_t wl = (s < 2) ? b.lo[i].x : b.lo[i].y;
        const uint32_t wh = (s < 2) ? b.hi[i].x : b.hi[i].y;
        const int bb = 2 * (s & 1);
        const uint32_t a0 = lut_pair(lut, wl, lane4, bb);      // row g,     k 16q + 4s + {0, 1}
        const uint32_t a1 = lut_pair(lut, wh, lane4, bb);      // row g + 8, k 16q + 4s + {0, 1}
        const uint32_t a2 = lut_pair(lut, wl, lane4, bb + 1);  // row g,     k 16q + 4s + {2, 3}
        const uint32_t a3 = lut_pair(lut, wh, lane4, bb + 1);  // row g + 8, k 16q + 4s + {2, 3}
        Num<T>::mma(c[0], a0, a1, a2, a3, x0[2 * s], x0[2 * s + 1]);
        if (NT8 == 2) Num<T>::mma(c[NT8 - 1], a0, a1, a2, a3, x1[2 * s], x1[2 * s + 1]);
      }
      const float s0 = kNested ? __fadd_rn(__fmul_rn(ncode_s[b.qlo[i]], b.alo[i]), offset) : b.alo[i];
      const float s1 = kNested ? __fadd_rn(__fmul_rn(ncode_s[b.qhi[i]], b.ahi[i]), offset) : b.ahi[i];
#pragma unroll
      for (int j = 0; j < NT8; ++j) {
        acc[j][0] = __fmaf_rn(c[j][0], s0, acc[j][0]);
        acc[j][1] = __fmaf_rn(c[j][1], s0, acc[j][1]);
        acc[j][2] = __fmaf_rn(c[j][2], s1, acc[j][2]);
        acc[j][3] = __fmaf_rn(c[j][3], s1, acc[j][3]);
      }
    }
  }
}

// Final value of y[m, n] (S == 1) or the slice's partial sum (S > 1).
template <typename T>
__device__ __forceinline__ void emit(const V4Params& p, int s, int m, int n, float v) {
  if (p.S > 1) {
    p.part[(static_cast<int64_t>(s) * p.M + m) * p.N + n] = v;
    return;
  }
  store_lora_bias<T>(p, m, n, v);
}

// Warp range of the segment's L units: [warp L / W, (warp + 1) L / W).
__device__ __forceinline__ int range_lo(int warp, int L) {
  return static_cast<int>(static_cast<int64_t>(warp) * L / kV4Warps);
}

// After a batch: when it ends the warp's part of tile d.t, hand the tile's sums on and clear acc.
template <typename T, int NT8>
__device__ __forceinline__ void maybe_flush(const V4Params& p, const WarpCtx& w, const Desc& d, int slice, int warp,
                                            unsigned char* lut, float (&acc)[NT8][4]) {
  const int end = d.t * w.Cs + d.c + d.len;
  if (d.c + d.len != w.Cs && end != w.ub) return;
  const bool owned = w.ua <= d.t * w.Cs && (d.t + 1) * w.Cs <= w.ub;
  if (owned) {
    if (p.S == 1 && p.t != nullptr) griddep_wait();  // T written by the kernel this one depends on
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = 8 * j + 2 * w.q + (e & 1);
        const int n = (w.tile0 + d.t) * 16 + w.g + 8 * (e >> 1);
        if (m < p.M && n < p.N) emit<T>(p, slice, m, n, acc[j][e]);
      }
    }
  } else {
    const int slot = (d.t == w.ua / w.Cs) ? 0 : 1;
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = 8 * j + 2 * w.q + (e & 1);
        const int row = w.g + 8 * (e >> 1);
        const int f = ((warp * 2 + slot) * 16 + row) * 16 + m;
        *reinterpret_cast<float*>(lut + red_off(f)) = acc[j][e];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < NT8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

template <typename T, int NT8, bool kNested>
__global__ void __launch_bounds__(kV4Threads, 1) nf4_gemv_v4_kernel(const V4Params p) {
  // Dynamic shared memory: the table (64 KB; spare bytes: the reduction slots), nested code [256],
  // x slice [M][XSB bytes].
  extern __shared__ __align__(16) unsigned char smem_v4[];
  unsigned char* lut = smem_v4;
  float* ncode_s = reinterpret_cast<float*>(smem_v4 + kLutBytes);
  unsigned char* xs = smem_v4 + kXOff;

  // Dependents (the finish kernel) may be scheduled now; they wait for this grid's completion.
  griddep_launch_dependents();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int M = p.M;

  // ---- table (built from the 16 code values) and nested code, once per CTA
  for (int i = tid; i < 256 * 8; i += kV4Threads) {
    const int v = i >> 3, j = i & 7;  // entry v, lanes 4j .. 4j + 3
    const uint32_t wv = Num<T>::pack(__ldg(p.code + (v >> 4)), __ldg(p.code + (v & 15)));
    *reinterpret_cast<uint4*>(lut + v * 256 + j * 16) = make_uint4(wv, wv, wv, wv);
  }
  if (kNested) {
    for (int i = tid; i < 256; i += kV4Threads) ncode_s[i] = __ldg(p.nested_code + i);
  }
  const float offset = kNested ? __ldg(p.offset) : 0.f;
  const uint32_t lane4 = static_cast<uint32_t>(lane) * 4u;

  const int items = p.tiles * p.S;
  const int ia = static_cast<int>(static_cast<int64_t>(blockIdx.x) * items / gridDim.x);
  const int ib = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * items / gridDim.x);
  const T* x = static_cast<const T*>(p.x);

  for (int item = ia; item < ib;) {
    // ---- segment: tiles [t0, t0 + nt) of slice s
    const int s = item / p.tiles, t0 = item - s * p.tiles;
    const int nt = min(ib - item, p.tiles - t0);
    item += nt;
    WarpCtx w;
    w.tile0 = t0;
    w.c0 = s * p.CS;
    w.Cs = min(p.CS, p.C - w.c0);
    const int L = nt * w.Cs;
    w.ua = range_lo(warp, L);
    w.ub = range_lo(warp + 1, L);
    w.g = g;
    w.q = q;

    __syncthreads();  // the previous segment is done with x and the reduction slots
    // The first batch is requested before x is staged (its latency overlaps the staging).
    Batch<kNested> b0, b1;
    Desc d0 = make_desc(w, w.ua / w.Cs, w.ua % w.Cs);
    if (w.ua >= w.ub) d0.len = 0;
    if (d0.len == kD) issue<kNested, true>(p, w, d0, b0);
    else if (d0.len > 0) issue<kNested, false>(p, w, d0, b0);

    {  // x[:, slice] -> shared memory (dtype, 16-byte vectors)
      const int vpr = w.Cs * 8;  // 16-byte vectors per row
      for (int i = tid; i < M * vpr; i += kV4Threads) {
        const int m = i / vpr, v = i - m * vpr;
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * p.K + w.c0 * 64) + v);
        *reinterpret_cast<uint4*>(xs + m * p.XSB + v * 16) = xv;
      }
    }
    __syncthreads();

    const bool has0 = g < M, has1 = g + 8 < M;
    const unsigned char* xrow0 = xs + (has0 ? g : 0) * p.XSB + q * 32;
    const unsigned char* xrow1 = xs + (has1 ? g + 8 : 0) * p.XSB + q * 32;
    float acc[NT8][4];
#pragma unroll
    for (int j = 0; j < NT8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

    // ---- main loop: one batch in use while the next is in flight
    while (d0.len > 0) {
      const Desc d1 = make_desc(w, d0.t, d0.c + d0.len);
      if (d1.len == kD) issue<kNested, true>(p, w, d1, b1);
      else if (d1.len > 0) issue<kNested, false>(p, w, d1, b1);
      if (d0.len == kD) compute<T, NT8, kNested, true>(w, d0, b0, lut, lane4, xrow0, xrow1, has0, has1, ncode_s, offset, acc);
      else compute<T, NT8, kNested, false>(w, d0, b0, lut, lane4, xrow0, xrow1, has0, has1, ncode_s, offset, acc);
      maybe_flush<T, NT8>(p, w, d0, s, warp, lut, acc);
      if (d1.len == 0) break;
      d0 = make_desc(w, d1.t, d1.c + d1.len);
      if (d0.len == kD) issue<kNested, true>(p, w, d0, b0);
      else if (d0.len > 0) issue<kNested, false>(p, w, d0, b0);
      if (d1.len == kD) compute<T, NT8, kNested, true>(w, d1, b1, lut, lane4, xrow0, xrow1, has0, has1, ncode_s, offset, acc);
      else compute<T, NT8, kNested, false>(w, d1, b1, lut, lane4, xrow0, xrow1, has0, has1, ncode_s, offset, acc);
      maybe_flush<T, NT8>(p, w, d1, s, warp, lut, acc);
    }

    // ---- tiles shared by several warps: sum their slots in warp order (= k order)
    __syncthreads();
    if (p.S == 1 && p.t != nullptr) griddep_wait();
    const int per_tile = 16 * M;
    for (int i = tid; i < nt * per_tile; i += kV4Threads) {
      const int t = i / per_tile, rem = i - t * per_tile;
      const int row = rem / M, m = rem - row * M;
      const int n = (t0 + t) * 16 + row;
      if (n >= p.N) continue;
      const int lo = t * w.Cs, hi = lo + w.Cs;
      bool owned = false, any = false;
      float v = 0.f;
      for (int ww = 0; ww < kV4Warps; ++ww) {
        const int ua = range_lo(ww, L), ub = range_lo(ww + 1, L);
        if (ua >= ub || ua >= hi || ub <= lo) continue;
        if (ua <= lo && hi <= ub) {
          owned = true;
          break;
        }
        const int slot = (t == ua / w.Cs) ? 0 : 1;
        const float part = *reinterpret_cast<const float*>(lut + red_off(((ww * 2 + slot) * 16 + row) * 16 + m));
        v = any ? __fadd_rn(v, part) : part;
        any = true;
      }
      if (!owned && any) emit<T>(p, s, m, n, v);
    }
  }
  if (p.S > 1 && p.t != nullptr) griddep_wait();  // T complete before this grid completes (finish reads it)
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
struct V4Config {
  bool ok = false;
  int S = 1, CS = 0, tiles = 0, C = 0, grid = 0, XSB = 0;
  int smem_dyn = 0;
  size_t ws_bytes = 0, off_part = 0;
  int major = 0;
  void (*kern)(V4Params) = nullptr;
};

using KernFn = void (*)(V4Params);

// CTAs of this instantiation per SM with `smem` dynamic bytes (its max dynamic shared memory
// attribute is raised to the device's opt-in limit once per device), 0 on any error.
template <typename T, int NT8, bool kNested>
int ctas_per_sm_t(int smem, int smem_optin, KernFn* kern_out) {
  const KernFn kern = nf4_gemv_v4_kernel<T, NT8, kNested>;
  *kern_out = kern;
  static std::atomic<int> set[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
  if (set[dev].load(std::memory_order_acquire) != smem_optin) {
    if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    // a hint: the largest shared-memory carveout
    (void)cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    (void)cudaGetLastError();
    set[dev].store(smem_optin, std::memory_order_release);
  }
  int occ = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, kV4Threads, static_cast<size_t>(smem)) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return occ;
}

int ctas_per_sm(DType dt, int M, bool nested, int smem, int smem_optin, KernFn* kern) {
  const bool bf = dt == DType::kBFloat16;
  if (M <= 8) {
    if (bf) return nested ? ctas_per_sm_t<__nv_bfloat16, 1, true>(smem, smem_optin, kern)
                          : ctas_per_sm_t<__nv_bfloat16, 1, false>(smem, smem_optin, kern);
    return nested ? ctas_per_sm_t<__half, 1, true>(smem, smem_optin, kern)
                  : ctas_per_sm_t<__half, 1, false>(smem, smem_optin, kern);
  }
  if (bf) return nested ? ctas_per_sm_t<__nv_bfloat16, 2, true>(smem, smem_optin, kern)
                        : ctas_per_sm_t<__nv_bfloat16, 2, false>(smem, smem_optin, kern);
  return nested ? ctas_per_sm_t<__half, 2, true>(smem, smem_optin, kern)
                : ctas_per_sm_t<__half, 2, false>(smem, smem_optin, kern);
}

int smem_bytes(int M, int CS) { return kXOff + M * (CS * 128 + 16); }

V4Config v4_config(const GemvArgs& a) {
  V4Config c;
  if (a.M < 1 || a.M > kGemvMaxM || a.N < 1 || a.K < kGemvKChunk || a.K % kGemvKChunk != 0) return c;
  if (!nf4::is_valid_blocksize(a.blocksize) || a.blocksize < kGemvKChunk || a.K % a.blocksize != 0) return c;
  if (a.dtype != DType::kBFloat16 && a.dtype != DType::kFloat16) return c;
  if (a.lora_a != nullptr && (a.r < 1 || a.r > kGemvMaxRank || a.lora_b == nullptr)) return c;
  // 32-bit index math: absmax block indices, the rows' first byte and tile · 16 + row
  if (static_cast<int64_t>(a.N) * (a.K / a.blocksize) >= (int64_t{1} << 31)) return c;
  if (static_cast<int64_t>(a.M) * a.K >= (int64_t{1} << 31)) return c;
  if (static_cast<int64_t>(a.N) + 16 >= (int64_t{1} << 31)) return c;
  if (reinterpret_cast<uintptr_t>(a.packed) % 8 != 0) return c;  // 8-byte weight loads
  const DevInfo d = dev_info();
  if (d.major < 8) return c;
  c.major = d.major;
  c.tiles = (a.N + 15) / 16;
  c.C = a.K / kGemvKChunk;
  const int budget = d.smem_optin - kXOff;
  const int cs_max = (budget / a.M - 16) / 128;
  if (cs_max < 1) return c;
  const int S_min = (c.C + cs_max - 1) / cs_max;
  KernFn kern = nullptr;
  const int occ = ctas_per_sm(a.dtype, a.M, a.absmax_q != nullptr, smem_bytes(a.M, (c.C + S_min - 1) / S_min),
                              d.smem_optin, &kern);
  if (occ < 1) return c;
  const int64_t G = static_cast<int64_t>(d.sms) * occ;
  // Slices: the fewest that fit, or a few more when they balance the grid better.  Cost = bytes the
  // busiest CTA streams (items · chunks · 512) + its share of the partial sums (write + read).
  double best = 0.;
  int best_S = 0;
  for (int S = S_min; S <= S_min + 16 && S <= c.C; ++S) {
    const int CS = (c.C + S - 1) / S;
    const int Se = (c.C + CS - 1) / CS;
    if (Se != S) continue;  // would leave an empty slice
    const int64_t items = static_cast<int64_t>(c.tiles) * S;
    if (static_cast<int64_t>(S) * a.M * a.N >= (int64_t{1} << 31) || items >= (int64_t{1} << 31)) break;
    const int64_t per_cta = (items + G - 1) / G;
    double cost = static_cast<double>(per_cta) * CS * 512.;
    if (S > 1) cost += static_cast<double>(S) * a.M * a.N * 8. / static_cast<double>(G);
    if (best_S == 0 || cost < best * 0.995) {
      best = cost;
      best_S = S;
    }
  }
  if (best_S == 0) return c;
  c.S = best_S;
  c.CS = (c.C + c.S - 1) / c.S;
  c.XSB = c.CS * 128 + 16;
  c.smem_dyn = smem_bytes(a.M, c.CS);
  if (c.smem_dyn > d.smem_optin) return c;
  const int64_t items = static_cast<int64_t>(c.tiles) * c.S;
  c.grid = static_cast<int>(items < G ? items : G);
  size_t off = 0;
  if (a.lora_a != nullptr) off = align_up(static_cast<size_t>(a.M) * a.r * 4, 256);
  c.off_part = off;
  if (c.S > 1) off += static_cast<size_t>(c.S) * a.M * a.N * 4;
  c.ws_bytes = off;
  c.kern = kern;
  c.ok = true;
  return c;
}

bool use_pdl(const V4Config& c) {
  if (c.major < 9) return false;
  const char* e = std::getenv("LORA_KERNELS_GEMV_V4_PDL");
  return !(e != nullptr && e[0] == '0');
}

template <typename T>
cudaError_t launch_v4_typed(const GemvArgs& a, const V4Params& p, const V4Config& c, cudaStream_t stream) {
  return launch_chain<T, V4Params, kTThreads4, kFinishThreads4>(a, p, c.S, use_pdl(c), stream, [&](bool pdl_gemv) {
    return launch_maybe_pdl(c.kern, dim3(c.grid), dim3(kV4Threads), static_cast<size_t>(c.smem_dyn), stream,
                            pdl_gemv, p);
  });
}

}  // namespace

bool nf4_lora_gemv_v4_config(const GemvArgs& a, size_t* workspace_bytes) {
  const V4Config c = v4_config(a);
  if (workspace_bytes != nullptr) *workspace_bytes = c.ok ? c.ws_bytes : 0;
  return c.ok;
}

cudaError_t launch_nf4_lora_gemv_v4(const GemvArgs& a, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream) {
  const V4Config c = v4_config(a);
  if (!c.ok) return cudaErrorInvalidValue;
  if (c.ws_bytes > 0 && (workspace == nullptr || workspace_bytes < c.ws_bytes)) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  V4Params p;
  fill_chain_params(p, a, a.lora_a != nullptr ? reinterpret_cast<float*>(ws) : nullptr,
                    c.S > 1 ? reinterpret_cast<float*>(ws + c.off_part) : nullptr);
  p.tiles = c.tiles;
  p.C = c.C;
  p.CS = c.CS;
  p.S = c.S;
  p.XSB = c.XSB;
  switch (a.dtype) {
    case DType::kBFloat16: return launch_v4_typed<__nv_bfloat16>(a, p, c, stream);
    case DType::kFloat16: return launch_v4_typed<__half>(a, p, c, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lora_kernels
