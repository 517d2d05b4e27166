// Fused QLoRA decode, variant 5 (lora_gemv(..., variant=5)): tensor cores fed from a per-warp
// cp.async ring in shared memory, for M = 1..16 rows of x:  y = x · Ŵᵀ + ((x · Aᵀ) ⊙ s) · Bᵀ + bias.
//
// Why (benchmarks/NOTES.md, session 13): variant 4 was latency-bound -- its weight loads went to
// registers, each warp waited on a batch soon after requesting it, and ~7.5 KB per SM were in flight
// where ~20-40 KB are needed to stream at the copy bandwidth.  Variant 3 (CUDA cores) spends ~130
// instructions per 16 packed bytes per lane and refills its 64 KB table in each of its ~450 CTAs.
// Here the loads are cp.async copies into shared memory, so the bytes in flight no longer sit in
// registers: each warp keeps kV5Stages - 1 = 3 steps (3 KB) requested ahead, 48 KB per SM.
//
// Layout
//  * Tile = 16 weight rows (the m16n8k16 MMA's A operand: the weight; its n8 columns are the rows of
//    x, M <= 8).  Step = one tile x 128 k = 16 rows x 64 packed bytes = 1 KB, plus the block scales
//    of those rows (nested: the aligned 4-byte word of absmax codes holding the step's blocks and
//    the nested absmax; plain: the aligned fp32 pair).
//  * Work: K is cut into S slices (S divides K / 128; the host picks S so that the busiest warp's
//    step count is near the mean, see v5_config); unit = (tile, slice), units numbered tile-major;
//    warp w of the W = SMs x 16 warps of the persistent grid takes units [w U / W, (w + 1) U / W).
//    Its steps run through consecutive k of a tile, then the next tile.  Each warp works alone
//    after the setup (no CTA barrier in the main loop).  S = 1 without a low-rank term: the warp
//    stores y itself; else fp32 partials [S][M][N] in the workspace, and v5_finish_kernel sums them
//    in slice order (deterministic) and adds the low-rank term and the bias.
//  * Ring: kStages stages of kStageBytes per warp (kV5Stages = 4; $LORA_KERNELS_GEMV_V5_STAGES=6 asks
//    for kV5DeepStages = 6 where x still fits beside the deeper ring -- an A/B switch added in session
//    15 after variant 5 measured latency-bound; measured in session 16 no faster (4096x14336 M = 1:
//    19.6 us against 19.4, ncu 20.6 against 19.2), so off by default; nf4_lora_gemv_v5_stages says
//    which ran).  Lane (g = lane / 4, q = lane % 4) copies the 16-byte piece q of rows g and g + 8
//    (cp.async.cg with an L2 prefetch of the line); lanes 0..15 copy row `lane`'s scales, lanes
//    16..31 row `lane - 16`'s nested absmax.  One commit group per step;
//    cp.async.wait_group(kV5Stages - 1) + __syncwarp before a step is read, __syncwarp after (its
//    stage is refilled next).  Within a stage, row i's 64 bytes lie at 64 i with 16-byte piece
//    j at slot j ^ (i & 2): the 16 lanes of a half warp reading 8 bytes each hit 32 distinct banks.
//  * MMA (variant 4's k-permutation): in 64-k chunk c of a step, lane (g, q) holds packed bytes
//    [32 c + 8 q, 32 c + 8 q + 8) of rows g and g + 8 = elements 16 q .. 16 q + 15 of the chunk;
//    MMA s (0..3) takes bytes 2 s (A registers a0 / a1) and 2 s + 1 (a2 / a3), and as B the x words
//    2 s, 2 s + 1 of x row g at the same 16 elements (lanes g >= M: zeros).  One table lookup per
//    packed byte gives one A register: byte v -> the dtype pair {code[v >> 4], code[v & 15]}, 32
//    replicas (entry v of lane l at byte 256 v + 4 l: one prmt per lookup, conflict-free), built once
//    per CTA.
//  * Block scale after the MMAs: each chunk's 4 MMAs accumulate into a fresh fp32 fragment, then
//    acc += absmax(row, block) · c (fp32 fma; double quant decoded as fl(fl(nested_code[q] ·
//    nested_absmax) + offset), as variants 1-4).  A chunk never straddles a block (blocksize >= 64).
//  * x: all of x [M][K] as dtype in shared memory (row stride 2 K + 16 bytes: the two rows of a
//    quarter warp's 16-byte reads hit disjoint banks), staged once per CTA after the ring's first
//    requests.
//  * LoRA, inside this kernel (no T kernel: two launches at most, session 15): after its main loop
//    a warp takes pieces slot, slot + W, ... of T = x · Aᵀ -- piece (i, j) = row i of A over k in
//    [256 cpp j, 256 cpp (j + 1)), lane l reading elements 8 l .. 8 l + 7 of each 256-k chunk, x from
//    shared memory -- and writes the fp32 partial sums tpart[j][m][i].  Slots 0, 1, ... go first to
//    the warps with one unit fewer (they leave the main loop a unit early; on 4096x14336 at M = 1,
//    320 of the 2112 warps have no unit), then to the others; a warp requests the first chunk of its
//    first piece before the table is built.  With a low-rank term the GEMV always writes partials, and the
//    finish kernel (a programmatic dependent, sm_90; $LORA_KERNELS_GEMV_V5_PDL=0 turns PDL off)
//    sums the slices, T[m, i] = s_i · Σ_j tpart[j][m][i] (j order), then adds Σ_i T[m, i] B[n, i]
//    and the bias, as store_lora_bias does.  It requests B's row and the bias before its wait for the
//    GEMV and the partials before the T sums (session 17; $LORA_KERNELS_GEMV_V5_FINISH=plain: the old
//    order, same bits).  ncu, session 17 (4096x14336, M = 16): the finish kernel 5.3 us at r = 0,
//    9.7 at r = 16 with the old order -- most of the low-rank term's cost at M = 16.  MEASURED (graph
//    replay, r = 16, gemv_variants_*_session17b.md): 0.5-2.5 us less (4096x14336 M = 16 29.0 -> 27.9,
//    8192x28672 M = 16 89.4 -> 86.9, M = 1 0.6-0.8 us).
// Numerics: variant 4's (dtype(code) · x in fp32 through the MMA, times the fp32 absmax per 64
// products; another fp32 summation order than variant 1).
// Two modes for x (session 15; nf4_lora_gemv_v5_mode says which):
//  1. all of x in shared memory (M · (2 K + 16) bytes beside the 143 KB of table, nested code and
//     ring), units numbered tile-major -- the mode measured in sessions 14-15;
//  2. where that does not fit (M >= 4 at K = 14336, M = 9..16): units numbered slice-major (unit =
//     slice · tiles + tile), so a CTA's consecutive units lie in one or two K slices, and each CTA
//     stages x only for those slices (a CTA without units: the slice its position falls in); the host
//     picks S among the slice counts whose slices are whole 256-k chunks and whose widest CTA fits.
//     The T pieces of a slice go to the warps of the CTAs holding that slice's x: their light warps
//     first where K <= kV5LightMaxK (session 17), else in warp order ($LORA_KERNELS_GEMV_V5_PIECES=light
//     or =slot forces one map: an A/B switch).  Measured in
//     session 16 (gemv_variants_*_session16.md): faster than variant 1 at M = 4..16 on the 8B/70B MLP
//     layers, except M = 16 with LoRA at K = 14336 (38.8 us against 35.6; the low-rank term costs
//     +10.5 us there at M = 16, against +1.7-3.6 at M = 1: benchmarks/NOTES.md, session 16).
//  M = 9..16 (either mode): two n8 MMA tiles of x per weight fragment (x rows 0..7 and 8..15).
//  Both walkers (request, compute) set their position at each unit's start (unit_start).
// Limits (else nf4_lora_gemv_v5_config says no and the binding runs variant 1): M <= 16, K % 256 == 0,
// blocksize >= 64, 16-byte aligned packed weight, 4-byte (nested) / 8-byte (plain) aligned absmax,
// nested: N · K / blocksize a multiple of 4 (the last 4-byte word of codes lies inside the tensor),
// and x fitting in one of the two modes.
//
// Cost, estimated from the source before any SASS or run (per 16 packed bytes per lane, M <= 8):
//   16 PRMT + 16 LDS (table) + 2 LDS.64 (weights) + 2 LDS.128 (x) + 4 HMMA + 4 FFMA + ~8 (scales)
//   + ~6 (cp.async issue, ring bookkeeping) ~ 58 instructions: an issue limit of ~7 TB/s, so the
//   kernel should be bound by the bytes in flight and DRAM, not by issue.
// PREDICTED (not measured; H100 SXM, CUDA-graph replay, bf16, bs 64, double quant, r = 16): the
// weight streamed at ~80 % of the copy bandwidth after ~2 us of launch, setup and tail:
//   4096x14336 M = 1: ~14.5 us (floor 10.0; S = 16);  14336x4096 M = 1: ~14.5 us (S = 8);
//   8192x28672 M = 1: ~52 us (floor 40.1; S = 8);  M = 8 within ~10 % of M = 1.
// MEASURED (session 14, H100, benchmarks/results/gemv_variants_nvidia-h100-80gb-hbm3_session14.md):
//   4096x14336 M = 1: 22.5 / 24.3 us (r = 0 / 16; S = 16), M = 8: 20.5 / 26.2 us (S = 2);
//   14336x4096 M = 1: 19.6 / 22.8 us;  8192x28672 M = 1: 57.7 / 59.1 us (1.44 / 1.47x the floor).
//   ncu at 4096x14336, M = 1: 43 % of DRAM bandwidth, ~153 issued instructions per 16 packed bytes
//   per lane (not ~58), 1.02 eligible warps per scheduler: issue- and latency-bound, not DRAM-bound.
//   Since then the epilogue is counted in the slice choice (S = 2 there).
// Session 15: request sources kept per lane and advanced per step, one scale decoded per lane and
//   shared by shuffles (~150 instructions a step, was ~255), T inside the GEMV.  MEASURED (H100,
//   gemv_variants_nvidia-h100-80gb-hbm3_session15{,b}.md): 4096x14336 M = 1 18.2-18.6 / 20.5-20.6 us
//   (r = 0 / 16), 14336x4096 18.8-19.4 / 23.2-24.1, 8192x28672 55.5-56.7 / 58.7-60.5 (1.38-1.51x the
//   floor): 3-6 % faster without LoRA, no faster with it -- latency-bound (~14 steps a warp behind a
//   3-step ring on 4096x14336), not issue-bound (benchmarks/NOTES.md, session 15).
#include "cuda/nf4_gemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "nf4_common.h"
#include "cuda/nf4_gemv_common.cuh"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr int kV5Warps = 16;
constexpr int kV5Threads = kV5Warps * 32;
constexpr int kV5Stages = 4;                       // ring depth per warp: 3 steps requested ahead
constexpr int kV5DeepStages = 6;                   // opt-in ($LORA_KERNELS_GEMV_V5_STAGES=6): 5 ahead
constexpr int kV5StepK = 128;                      // k per step
constexpr int kStageW = 16 * kV5StepK / 2;         // 1024 packed bytes: 16 rows x 64 bytes
constexpr int kStageAbsOff = kStageW;              // 16 rows x 8 bytes: absmax code word / fp32 pair
constexpr int kStageNestOff = kStageW + 128;       // 16 rows x 4 bytes: nested absmax
constexpr int kStageBytes = kStageW + 128 + 64;    // 1216 (a multiple of 16)
constexpr int kV5LutBytes = 256 * 256;             // 32 replicas of the byte -> dtype-pair table
constexpr int kV5NcodeBytes = 256 * 4;
constexpr int kV5RingOff = kV5LutBytes + kV5NcodeBytes;
// x after the rings of kStages stages
__host__ __device__ constexpr int v5_x_off(int stages) { return kV5RingOff + kV5Warps * stages * kStageBytes; }
constexpr int kV5XOff = v5_x_off(kV5Stages);
constexpr int kV5MaxSlices = 64;
constexpr int kFinishThreads5 = 256;
constexpr int kFinishPreB = 4;  // uint4s of B's row n the finish kernel prefetches (8 entries each: r <= 32)
// The light-first piece map is the default up to this K (session 17, H100, graph replay, r = 16, M = 16:
// 4096x14336 33.5 -> 29.6 us, 8192x28672 90.3 -> 86.9; at K = 14336 it was 0.4-0.6 us slower at M = 4..16).
constexpr int kV5LightMaxK = 8192;
static_assert(kStageBytes % 16 == 0 && kV5XOff % 16 == 0 && v5_x_off(kV5DeepStages) % 16 == 0,
              "16-byte aligned stages and x");

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80+)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes, L1 bypassed, the 128-byte line prefetched into L2 (the next step reads its other half).
__device__ __forceinline__ void cp_async16_stream(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ---------------------------------------------------------------------------------------------
// The GEMV
// ---------------------------------------------------------------------------------------------
struct V5Params {
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
  int kst;         // steps in K (K / 128)
  int S;           // slices
  int sst;         // steps per slice (kst / S)
  int64_t units;   // tiles · S
  bool slice_major;  // units numbered slice · tiles + tile (x staged per CTA's slices); else tile · S + slice
  bool light_first;  // slice-major T pieces: the light warps of a slice's CTAs first (default where
                     // K <= kV5LightMaxK; $LORA_KERNELS_GEMV_V5_PIECES=light / slot forces either map)
  bool finish_prefetch;  // finish kernel: B row, bias and partials requested early ($..._V5_FINISH=plain: off)
  int XSB;         // x row stride in shared memory, bytes (2 · the staged k range + 16)
  const void* lora_b;
  int r;
  const float* t;  // unused by variant 5 (fill_chain_params' field; T lives in tpart)
  const void* bias;
  bool bias_f32;
  float* part;     // S > 1 or a low-rank term: fp32 partial sums [S][M][N] (else nullptr: y stored here)
  // the low-rank term: T = x · Aᵀ as fp32 partials over K ranges, summed and scaled by the finish kernel
  const void* lora_a;  // A [r, K] (nullptr: no low-rank term)
  float scale;
  const float* scale_vec;
  int jt;              // K ranges: piece (i, j) = row i of A over k in [j · 256 cpp, (j + 1) · 256 cpp)
  int cpp;             // 256-k chunks per piece (1 or 2)
  float* tpart;        // [jt][M][r]
};

// Byte offset, inside a stage, of piece `piece` (16 bytes) of row `row` (the swizzle above).
__host__ __device__ constexpr int stage_piece_off(int row, int piece) { return 64 * row + 16 * (piece ^ (row & 2)); }

// Table lookup of byte bb of word: the dtype pair {code[v >> 4], code[v & 15]}, v = the byte.
__device__ __forceinline__ uint32_t lut_pair5(const unsigned char* lut, uint32_t word, uint32_t lane4, int bb) {
  return *reinterpret_cast<const uint32_t*>(lut + __byte_perm(word, lane4, 0x5504u + 16u * bb));
}

// The block scale this lane decodes for a step in stage st: row srow = lane & 15 of the tile, block
// b (inside the stage's absmax word / pair).  Each lane decodes one (row, chunk) pair of the step's
// 16 rows x 2 chunks; compute_step gets its four by shuffles.
template <bool kNested>
__device__ __forceinline__ float stage_scale(const unsigned char* st, int srow, uint32_t b, const float* ncode_s,
                                             float offset) {
  if (kNested) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(st + kStageAbsOff + 4 * srow);
    const uint32_t code = __byte_perm(word, 0u, 0x4440u | (b & 3u));
    const float nabs = *reinterpret_cast<const float*>(st + kStageNestOff + 4 * srow);
    return __fadd_rn(__fmul_rn(ncode_s[code], nabs), offset);
  }
  const float2 pr = *reinterpret_cast<const float2*>(st + kStageAbsOff + 8 * srow);
  return (b & 1u) ? pr.y : pr.x;
}

// acc += the step's two chunks: absmax(row, block) · (A_chunk · B_chunk), for kMT n8 tiles of x (rows
// 0..7 and, with kMT = 2, 8..15: the same A fragments, one MMA per tile).  st: the stage; xp: this
// lane's x for the step's chunk 0 (x row g, k = 128 kk + 16 q; chunk 1 at xp + 128; row g + 8 at
// xp + 8 xsb); sc: the scale this lane decoded (row lane & 15, chunk lane >> 4).
template <typename T, int kMT>
__device__ __forceinline__ void compute_step(const unsigned char* st, const unsigned char* lut, uint32_t lane4,
                                             const unsigned char* xp, int xsb, bool has_x0, bool has_x1, int g,
                                             int q, float sc, float (&acc)[4 * kMT]) {
  const float sc_g[2] = {__shfl_sync(0xffffffffu, sc, g), __shfl_sync(0xffffffffu, sc, 16 + g)};
  const float sc_g8[2] = {__shfl_sync(0xffffffffu, sc, g + 8), __shfl_sync(0xffffffffu, sc, 24 + g)};
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int off = stage_piece_off(g, 2 * c + (q >> 1)) + 8 * (q & 1);
    const uint2 wl = *reinterpret_cast<const uint2*>(st + off);           // row g
    const uint2 wh = *reinterpret_cast<const uint2*>(st + off + 64 * 8);  // row g + 8 (same swizzle)
    uint32_t xw[kMT][8];
#pragma unroll
    for (int t = 0; t < kMT; ++t) {
      uint4 xa = make_uint4(0u, 0u, 0u, 0u), xb = xa;
      if (t == 0 ? has_x0 : has_x1) {
        const uint4* px = reinterpret_cast<const uint4*>(xp + t * 8 * xsb + 128 * c);
        xa = px[0];
        xb = px[1];
      }
      xw[t][0] = xa.x; xw[t][1] = xa.y; xw[t][2] = xa.z; xw[t][3] = xa.w;
      xw[t][4] = xb.x; xw[t][5] = xb.y; xw[t][6] = xb.z; xw[t][7] = xb.w;
    }
    float cf[kMT][4];
#pragma unroll
    for (int t = 0; t < kMT; ++t) cf[t][0] = cf[t][1] = cf[t][2] = cf[t][3] = 0.f;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const uint32_t wlw = (s < 2) ? wl.x : wl.y;
      const uint32_t whw = (s < 2) ? wh.x : wh.y;
      const int bb = 2 * (s & 1);
      const uint32_t a0 = lut_pair5(lut, wlw, lane4, bb);      // row g,     k 16q + 4s + {0, 1}
      const uint32_t a1 = lut_pair5(lut, whw, lane4, bb);      // row g + 8, k 16q + 4s + {0, 1}
      const uint32_t a2 = lut_pair5(lut, wlw, lane4, bb + 1);  // row g,     k 16q + 4s + {2, 3}
      const uint32_t a3 = lut_pair5(lut, whw, lane4, bb + 1);  // row g + 8, k 16q + 4s + {2, 3}
#pragma unroll
      for (int t = 0; t < kMT; ++t) Num<T>::mma(cf[t], a0, a1, a2, a3, xw[t][2 * s], xw[t][2 * s + 1]);
    }
#pragma unroll
    for (int t = 0; t < kMT; ++t) {
      acc[4 * t + 0] = __fmaf_rn(cf[t][0], sc_g[c], acc[4 * t + 0]);
      acc[4 * t + 1] = __fmaf_rn(cf[t][1], sc_g[c], acc[4 * t + 1]);
      acc[4 * t + 2] = __fmaf_rn(cf[t][2], sc_g8[c], acc[4 * t + 2]);
      acc[4 * t + 3] = __fmaf_rn(cf[t][3], sc_g8[c], acc[4 * t + 3]);
    }
  }
}

// The first (tile, k step) of unit u, and its slice (returned): slice-major units are u = slice ·
// tiles + tile, tile-major ones u = tile · S + slice; a unit is sst steps of one tile from step
// slice · sst on.
__device__ __forceinline__ int unit_start(const V5Params& p, int64_t u, int& tile, int& kk) {
  int slice;
  if (p.slice_major) {
    slice = static_cast<int>(u / p.tiles);
    tile = static_cast<int>(u - static_cast<int64_t>(slice) * p.tiles);
  } else {
    tile = static_cast<int>(u / p.S);
    slice = static_cast<int>(u - static_cast<int64_t>(tile) * p.S);
  }
  kk = slice * p.sst;
  return slice;
}

// This lane's A words of T piece `piece` (row i = piece / jt of A, K range j = piece % jt): elements
// 8 lane .. 8 lane + 7 of each of the piece's 256-k chunks (the first chunk's address).
template <typename T>
__device__ __forceinline__ const T* t_piece_src(const V5Params& p, int64_t piece, int lane) {
  const int64_t i = piece / p.jt, j = piece % p.jt;
  return static_cast<const T*>(p.lora_a) + i * p.K + j * 256 * p.cpp + 8 * lane;
}

// T piece `piece` (row i = piece / jt of A, chunk j = piece % jt): tpart[j][m][i] = Σ_k x[m, k] A[i, k]
// over the piece's k, x from the staged rows (xs, from k = kx0 on); pre: its first chunk's A words
// were loaded already (apre).  The whole warp runs it.
template <typename T>
__device__ __forceinline__ void t_piece(const V5Params& p, int64_t piece, bool pre, uint4 apre,
                                        const unsigned char* xs, int kx0, int lane) {
  const T* arow = t_piece_src<T>(p, piece, lane);
  const int j = static_cast<int>(piece % p.jt);
  float tacc[kV5MaxM];
#pragma unroll
  for (int m = 0; m < kV5MaxM; ++m) tacc[m] = 0.f;
  for (int c = 0; c < p.cpp; ++c) {
    const uint4 av = (pre && c == 0) ? apre : __ldg(reinterpret_cast<const uint4*>(arow + 256 * c));
    const uint32_t aw[4] = {av.x, av.y, av.z, av.w};
    const int k = j * 256 * p.cpp + 256 * c + 8 * lane;
#pragma unroll
    for (int m = 0; m < kV5MaxM; ++m) {
      if (m < p.M) {
        const uint4 xv = *reinterpret_cast<const uint4*>(xs + m * p.XSB + 2 * (k - kx0));
        const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x0, x1, a0, a1;
          Num<T>::unpack(xw[e], x0, x1);
          Num<T>::unpack(aw[e], a0, a1);
          tacc[m] = __fmaf_rn(x0, a0, tacc[m]);
          tacc[m] = __fmaf_rn(x1, a1, tacc[m]);
        }
      }
    }
  }
  const int i = static_cast<int>(piece / p.jt);
#pragma unroll
  for (int m = 0; m < kV5MaxM; ++m) {
    if (m < p.M) {
      float v = tacc[m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
      if (lane == 0) p.tpart[(static_cast<int64_t>(j) * p.M + m) * p.r + i] = v;
    }
  }
}

template <typename T, bool kNested, int kStages, int kMT>
__global__ void __launch_bounds__(kV5Threads, 1) nf4_gemv_v5_kernel(const V5Params p) {
  // Dynamic shared memory: the table (64 KB), nested code [256], the warps' rings, x [M][XSB bytes].
  extern __shared__ __align__(128) unsigned char smem_v5[];
  const unsigned char* lut = smem_v5;
  float* ncode_s = reinterpret_cast<float*>(smem_v5 + kV5LutBytes);
  unsigned char* xs = smem_v5 + v5_x_off(kStages);

  // Dependents (the finish kernel) may be scheduled now; they wait for this grid's completion.
  griddep_launch_dependents();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int srow = lane & 15;  // the row whose block scales this lane copies and decodes
  const uint32_t KB = static_cast<uint32_t>(p.K >> p.log2_bs);
  const int64_t KH = p.K >> 1;

  // This warp's units and steps; this CTA's units (x is staged for their K slices).
  const int64_t W = static_cast<int64_t>(gridDim.x) * kV5Warps;
  const int64_t wid = static_cast<int64_t>(blockIdx.x) * kV5Warps + warp;
  const int64_t u0 = wid * p.units / W, u1 = (wid + 1) * p.units / W;
  const int nsteps = static_cast<int>((u1 - u0) * p.sst);
  const int64_t cta_u0 = static_cast<int64_t>(blockIdx.x) * kV5Warps * p.units / W;
  const int64_t cta_u1 = static_cast<int64_t>(blockIdx.x + 1) * kV5Warps * p.units / W;
  const int slice_k = p.sst * kV5StepK;  // k per slice
  // staged x: k in [kx0, kx1) -- all of K, or (slice-major) slices s_lo..s_hi: those of this CTA's
  // units; a CTA without units stages the slice its position falls in (it takes T pieces there)
  const int64_t s_lo = cta_u0 / p.tiles, s_hi = cta_u1 > cta_u0 ? (cta_u1 - 1) / p.tiles : s_lo;
  int kx0 = 0, kx1 = p.K;
  if (p.slice_major) {
    kx0 = s_lo < p.S ? static_cast<int>(s_lo) * slice_k : 0;
    kx1 = s_lo < p.S ? static_cast<int>(s_hi + 1) * slice_k : 0;
  }

  unsigned char* ring = smem_v5 + kV5RingOff + warp * (kStages * kStageBytes);
  const uint32_t ring_s = smem_addr(ring);

  // ---- request state: the next step to request is step rj of unit ru, at (it, ik); this lane's
  // sources for it are kept and advanced by 64 bytes a step (recomputed at each unit's start).
  int64_t ru = u0;
  int rj = 0, it = 0, ik = 0;
  const uint8_t* w0;  // row g's 16-byte piece q
  const uint8_t* w1;  // row g + 8's
  uint32_t rq_b;      // first block of row srow of tile it
  auto request_unit = [&]() {
    unit_start(p, ru, it, ik);
    const int nb = it * 16;  // rows past N: clamped, never stored
    w0 = p.packed + static_cast<int64_t>(min(nb + g, p.N - 1)) * KH + 16 * q + static_cast<int64_t>(ik) * (kV5StepK / 2);
    w1 = p.packed + static_cast<int64_t>(min(nb + g + 8, p.N - 1)) * KH + 16 * q + static_cast<int64_t>(ik) * (kV5StepK / 2);
    rq_b = static_cast<uint32_t>(min(nb + srow, p.N - 1)) * KB;
  };
  request_unit();
  const uint32_t d0 = stage_piece_off(g, q), d1 = stage_piece_off(g + 8, q);
  const uint32_t dsc = kNested ? (lane < 16 ? kStageAbsOff + 4 * srow : kStageNestOff + 4 * srow)
                               : kStageAbsOff + 8 * srow;
  // nested: lanes 0..15 copy the aligned word of absmax codes, lanes 16..31 the nested absmax
  const uint8_t* sc_src = (kNested && lane >= 16) ? reinterpret_cast<const uint8_t*>(p.nested_absmax) : p.absmax_q;
  // Requests step (it, ik) into the stage at shared address st (one commit group is made by the caller).
  auto request = [&](uint32_t st) {
    cp_async16_stream(st + d0, w0);
    cp_async16_stream(st + d1, w1);
    const uint32_t b0 = rq_b + ((static_cast<uint32_t>(ik) * kV5StepK) >> p.log2_bs);  // the step's first block
    if (kNested) {  // the word holding the step's codes / the nested absmax (256 codes per nested block)
      cp_async4(st + dsc, sc_src + (lane < 16 ? (b0 & ~3u) : 4u * (b0 >> 8)));
    } else if (lane < 16) {
      cp_async8(st + dsc, p.absmax_f32 + (b0 & ~1u));
    }
    w0 += kV5StepK / 2;
    w1 += kV5StepK / 2;
    ++ik;
    if (++rj == p.sst) {
      rj = 0;
      ++ru;
      request_unit();
    }
  };

  // ---- the first kStages - 1 steps are requested before the table and x are staged
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < nsteps) request(ring_s + i * kStageBytes);
    cp_async_commit();
  }

  // ---- T pieces this warp takes after its main loop (with a low-rank term):
  //  * whole x (tile-major): slots 0, 1, ... go first to the warps with one unit fewer (units / W
  //    rounded down: they leave the main loop a unit early), then to the others; warp takes pieces
  //    slot, slot + W, ...; the first chunk of its first piece is requested now.
  //  * sliced x (slice-major): a slice's r · cps pieces (cps 256-k chunks of a slice, cpp = 1) are
  //    spread over the nw warps of the CTAs whose units lie in that slice (they hold its x): piece
  //    p of slice s goes to the warp at place p mod nw among them -- in warp order, or with
  //    light_first (session 16; the default where K <= kV5LightMaxK since session 17) the light warps
  //    first, as with whole x.  Session 17 (H100, graph replay, r = 16, M = 16): 4096x14336 33.5 ->
  //    29.6 us, 8192x28672 90.3 -> 86.9; 14336x4096 37.7 -> 38.3 (and +0.4-0.5 at M = 4, 8), hence the K bound.
  const bool lora = p.lora_a != nullptr;
  const int64_t npieces = lora ? static_cast<int64_t>(p.r) * p.jt : 0;
  const int64_t base = p.units / W;                 // units of a light warp (a heavy one has base + 1)
  const int64_t heavy_before = u0 - wid * base;     // heavy warps among 0 .. wid - 1
  const int64_t slot = (u1 - u0 == base) ? wid - heavy_before : (W - p.units % W) + heavy_before;
  const int cps = slice_k / 256;                    // 256-k chunks per slice
  uint4 apre = make_uint4(0u, 0u, 0u, 0u);
  if (!p.slice_major && slot < npieces) apre = __ldg(reinterpret_cast<const uint4*>(t_piece_src<T>(p, slot, lane)));

  // ---- table, nested code, x
  for (int i = tid; i < 256 * 8; i += kV5Threads) {
    const int v = i >> 3, j = i & 7;  // entry v, lanes 4j .. 4j + 3
    const uint32_t w = Num<T>::pack(__ldg(p.code + (v >> 4)), __ldg(p.code + (v & 15)));
    *reinterpret_cast<uint4*>(smem_v5 + v * 256 + j * 16) = make_uint4(w, w, w, w);
  }
  if (kNested) {
    for (int i = tid; i < 256; i += kV5Threads) ncode_s[i] = __ldg(p.nested_code + i);
  }
  {
    const int vpr = (kx1 - kx0) >> 3;  // 16-byte vectors per row of staged x
    const uint4* xg = static_cast<const uint4*>(p.x);
    for (int i = tid; i < p.M * vpr; i += kV5Threads) {
      const int m = i / vpr, v = i - m * vpr;
      *reinterpret_cast<uint4*>(xs + m * p.XSB + 16 * v) = __ldg(xg + ((static_cast<int64_t>(m) * p.K + kx0) >> 3) + v);
    }
  }
  const float offset = kNested ? __ldg(p.offset) : 0.f;
  __syncthreads();

  const uint32_t lane4 = static_cast<uint32_t>(lane) * 4u;
  const bool has_x0 = g < p.M, has_x1 = kMT > 1 && g + 8 < p.M;
  const unsigned char* xrow = xs + (has_x0 ? g : 0) * p.XSB + 32 * q;  // x row g at k = kx0 + 16 q
  float acc[4 * kMT];
#pragma unroll
  for (int e = 0; e < 4 * kMT; ++e) acc[e] = 0.f;
  // ---- compute state: step cj of unit cu, at (ct, ck) in slice cs, in stage c_off
  int64_t cu = u0;
  int ct = 0, ck = 0, cs = 0, cj = 0;
  uint32_t c_b = 0;              // first block of row srow of tile ct
  const unsigned char* xp = xrow;  // x at k = 128 ck + 16 q
  auto compute_unit = [&]() {
    cs = unit_start(p, cu, ct, ck);
    c_b = static_cast<uint32_t>(min(ct * 16 + srow, p.N - 1)) * KB;
    xp = xrow + 2 * (kV5StepK * ck - kx0);
  };
  compute_unit();
  const uint32_t chunk_k = 64u * static_cast<uint32_t>(lane >> 4);          // the chunk this lane's scale is for
  uint32_t c_off = 0, r_off = (kStages - 1) * kStageBytes;                  // computed / next requested stage

  for (int i = 0; i < nsteps; ++i) {
    if (i + kStages - 1 < nsteps) request(ring_s + r_off);
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // step i's group complete (this lane's copies)
    __syncwarp();                      // ... and every lane's
    const unsigned char* st = ring + c_off;
    const float sc = stage_scale<kNested>(
        st, srow, c_b + ((static_cast<uint32_t>(ck) * kV5StepK + chunk_k) >> p.log2_bs), ncode_s, offset);
    compute_step<T, kMT>(st, lut, lane4, xp, p.XSB, has_x0, has_x1, g, q, sc, acc);
    __syncwarp();  // the stage is refilled by the next request
    r_off = c_off;  // step i + kStages goes where step i was
    c_off = (c_off == (kStages - 1) * kStageBytes) ? 0u : c_off + kStageBytes;
    ++ck;
    xp += 2 * kV5StepK;
    if (++cj == p.sst) {
      // end of a unit (tile ct, slice cs): y itself (no partials: S = 1, no low-rank term) or the
      // slice's partial sums
#pragma unroll
      for (int e = 0; e < 4 * kMT; ++e) {
        const int m = 8 * (e >> 2) + 2 * q + (e & 1);
        const int n = ct * 16 + g + 8 * ((e >> 1) & 1);
        if (m < p.M && n < p.N) {
          if (p.part == nullptr) store_lora_bias<T>(p, m, n, acc[e]);  // p.t is nullptr: the bias only
          else p.part[(static_cast<int64_t>(cs) * p.M + m) * p.N + n] = acc[e];
        }
        acc[e] = 0.f;
      }
      cj = 0;
      ++cu;
      compute_unit();
    }
  }
  cp_async_wait<0>();

  // ---- T pieces (x from shared memory)
  if (!lora) return;
  if (!p.slice_major) {
    for (int64_t piece = slot; piece < npieces; piece += W) t_piece<T>(p, piece, piece == slot, apre, xs, 0, lane);
  } else if (s_lo < p.S) {
    // the CTAs of slice sl are cta_of(first unit) .. cta_of(last unit); those between without units
    // staged sl too (their position lies in it)
    const int64_t G = gridDim.x;
    auto cta_of = [&](int64_t u) { return ((u + 1) * G + p.units - 1) / p.units - 1; };  // CTA holding unit u
    auto heavy_upto = [&](int64_t w) { return w * p.units / W - w * base; };  // heavy warps among 0 .. w - 1
    for (int64_t sl = s_lo; sl <= s_hi; ++sl) {
      const int64_t cf = cta_of(sl * p.tiles), cl = cta_of((sl + 1) * p.tiles - 1);
      if (blockIdx.x < cf || blockIdx.x > cl) continue;  // (a CTA without units just before slice sl)
      const int64_t nw = (cl - cf + 1) * kV5Warps;        // the warps of slice sl's CTAs
      int64_t first = (blockIdx.x - cf) * kV5Warps + warp;  // this warp's place among them
      if (p.light_first) {  // light warps first, then heavy ones, each in warp order (from slot)
        const int64_t w0 = cf * kV5Warps, h0 = heavy_upto(w0), h1 = heavy_upto(w0 + nw);
        const int64_t n_light = W - p.units % W;  // the grid's light warps: slots 0 .. n_light - 1
        first = slot < n_light ? slot - (w0 - h0) : (nw - (h1 - h0)) + (slot - n_light - h0);
      }
      for (int64_t ps = first; ps < static_cast<int64_t>(p.r) * cps; ps += nw) {
        const int64_t piece = (ps % p.r) * p.jt + sl * cps + ps / p.r;
        t_piece<T>(p, piece, false, apre, xs, kx0, lane);
      }
    }
  }
}

// y[m, n] = dtype(Σ_s part[s][m][n] + Σ_i T[m, i] B[n, i] + bias[n]), T[m, i] = s_i · Σ_j tpart[j][m][i]
// (fp32 sums in those orders; as store_lora_bias, with T reduced into shared memory for the rows of x
// this CTA's outputs lie in).  One thread per output; a programmatic dependent of the GEMV.
template <typename T>
__global__ void __launch_bounds__(kFinishThreads5) v5_finish_kernel(const V5Params p) {
  __shared__ float t_s[kV5MaxM * kGemvMaxRank];  // T of the rows m_lo .. m_hi this CTA's outputs lie in
  const int64_t MN = static_cast<int64_t>(p.M) * p.N;
  const int64_t idx0 = static_cast<int64_t>(blockIdx.x) * kFinishThreads5;
  const int m_lo = static_cast<int>(idx0 / p.N);
  const int m_hi = static_cast<int>(min(MN - 1, idx0 + kFinishThreads5 - 1) / p.N);
  const bool lora = p.lora_a != nullptr;
  const int64_t idx = idx0 + threadIdx.x;
  const bool valid = idx < MN;
  const int m = valid ? static_cast<int>(idx / p.N) : m_lo;
  const int n = valid ? static_cast<int>(idx - static_cast<int64_t>(m) * p.N) : 0;
  // Prefetch (session 17; p.finish_prefetch): row n of B (r <= 8 kFinishPreB, r % 8 == 0, 16-byte
  // aligned) and bias[n] -- inputs the GEMV does not write -- are read before waiting for it, and the
  // slice partials are requested before the T sums, so the chain after the wait is one round of L2
  // reads (partials and T pieces together) and the shared-memory T, not three (T pieces, partials, B).
  const bool pre = p.finish_prefetch && (!lora || (p.r <= 8 * kFinishPreB && lora_b_vec8(p)));
  uint4 bw[kFinishPreB];
  float bias_v = 0.f;
  if (pre && valid) {
    const uint4* br = reinterpret_cast<const uint4*>(static_cast<const T*>(p.lora_b) + static_cast<int64_t>(n) * p.r);
#pragma unroll
    for (int c = 0; c < kFinishPreB; ++c) bw[c] = (lora && 8 * c < p.r) ? __ldg(br + c) : make_uint4(0u, 0u, 0u, 0u);
    if (p.bias != nullptr) bias_v = bias_at<T>(p, n);
  }
  griddep_wait();                          // the GEMV complete and visible
  auto sum_slices = [&]() {                // slice order; unrolled: the reads in flight together
    float sum = p.part[idx];
#pragma unroll 8
    for (int s = 1; s < p.S; ++s) sum = __fadd_rn(sum, p.part[s * MN + idx]);
    return sum;
  };
  float v = (pre && valid) ? sum_slices() : 0.f;
  if (lora) {
    // T entry e = (row m_lo + e / r, rank e % r) is the sum of jt partials.  They are read by a group
    // of G threads (a power of two <= 32, so a group lies in one warp; G = 1 where the entries alone
    // fill the CTA), thread g of the group summing partials g, g + G, ..., then a shuffle tree: the
    // reads are in flight together (a serial chain of jt L2 reads cost ~1-2 us at jt = 16-56) and
    // the order is fixed, so the result is deterministic.
    const int entries = (m_hi - m_lo + 1) * p.r;
    int G = 1;
    while (G < 32 && entries * G * 2 <= kFinishThreads5 && G * 2 <= p.jt) G *= 2;
    for (int base = 0; base < entries * G; base += kFinishThreads5) {  // uniform over the CTA
      const int t = base + static_cast<int>(threadIdx.x);
      const int e = t / G, g = t % G;
      float tv = 0.f;
      if (e < entries) {
        const int mm = m_lo + e / p.r, i = e % p.r;
#pragma unroll 4
        for (int j = g; j < p.jt; j += G) tv = __fadd_rn(tv, p.tpart[(static_cast<int64_t>(j) * p.M + mm) * p.r + i]);
      }
      for (int o = G / 2; o > 0; o >>= 1) tv = __fadd_rn(tv, __shfl_xor_sync(0xffffffffu, tv, o));
      if (e < entries && g == 0) {
        const int i = e % p.r;
        t_s[e] = __fmul_rn(tv, p.scale_vec != nullptr ? p.scale_vec[i] : p.scale);
      }
    }
    __syncthreads();
  }
  if (!valid) return;
  const float* tr = lora ? t_s + (m - m_lo) * p.r : nullptr;
  if (!pre) {  // the plain order ($LORA_KERNELS_GEMV_V5_FINISH=plain, or B not prefetchable)
    v = sum_slices();
    store_lora_bias_t<T>(p, tr, m, n, v);
    return;
  }
  // store_lora_bias_t's operations in its order, on the prefetched B row and bias: the same bits.
  if (lora) {
    float l = 0.f;
#pragma unroll
    for (int c = 0; c < kFinishPreB; ++c) {
      if (8 * c >= p.r) break;
      const uint32_t ws[4] = {bw[c].x, bw[c].y, bw[c].z, bw[c].w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float b0, b1;
        Num<T>::unpack(ws[e], b0, b1);  // entries 8c + 2e, 8c + 2e + 1
        l = __fmaf_rn(tr[8 * c + 2 * e], b0, l);
        l = __fmaf_rn(tr[8 * c + 2 * e + 1], b1, l);
      }
    }
    v = __fadd_rn(v, l);
  }
  if (p.bias != nullptr) v = __fadd_rn(v, bias_v);
  static_cast<T*>(p.y)[idx] = Num<T>::from_float(v);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
struct V5Config {
  bool ok = false;
  int S = 1, sst = 0, kst = 0, tiles = 0, grid = 0;
  int jt = 0, cpp = 1;  // T pieces (low-rank term only)
  int64_t units = 0;
  int smem_dyn = 0;
  size_t ws_bytes = 0, off_part = 0;
  bool partials = false;  // the GEMV writes part[S][M][N] and the finish kernel makes y
  int stages = kV5Stages;
  bool slice_major = false;  // x staged per CTA's K slices (where all of x does not fit)
  int xsb = 0;               // x row stride in shared memory, bytes
  int mt = 1;                // n8 MMA tiles of x: 1 (M <= 8) or 2
  int major = 0;
};

constexpr int smem_dyn_bytes5(int M, int K, int stages) { return v5_x_off(stages) + M * (2 * K + 16); }

// The ring depth asked for: kV5DeepStages with $LORA_KERNELS_GEMV_V5_STAGES=6 (an A/B switch;
// session 16 measured it no faster), else kV5Stages.
int v5_stages_wanted() {
  const char* e = std::getenv("LORA_KERNELS_GEMV_V5_STAGES");
  return (e != nullptr && e[0] == '6' && e[1] == '\0') ? kV5DeepStages : kV5Stages;
}

// The slice count: S divides K / 128 (every unit has sst steps); the busiest warp's cost is smallest
// (ties: the smaller S): its steps, ceil(tiles · S / W) · (kst / S), plus half a step per unit it
// takes (the epilogue; session 14's H100 run: S = 16 on 4096x14336, M = 1, 2 steps per unit, was
// slower than S = 2 at M = 8), plus for S > 1 ~1.5 steps of finish-kernel launch and the partials'
// traffic (with a low-rank term the finish kernel runs at every S: only the partials' traffic differs).
double slice_cost(int tiles, int kst, int M, int N, int64_t W, bool has_lora, int S) {
  const int64_t units = static_cast<int64_t>(tiles) * S;
  const double per_warp = static_cast<double>((units + W - 1) / W);  // units of the busiest warp
  return per_warp * (kst / S) + 0.5 * per_warp +
         (S > 1 || has_lora ? 1.5 + 8.0 * S * M * static_cast<double>(N) / (1024.0 * W) : 0.0);
}

int pick_slices(int tiles, int kst, int M, int N, int64_t W, bool has_lora) {
  int best = 1;
  double best_cost = 0.0;
  for (int S = 1; S <= kst && S <= kV5MaxSlices; ++S) {
    if (kst % S != 0) continue;
    const double cost = slice_cost(tiles, kst, M, N, W, has_lora, S);
    if (S == 1 || cost < best_cost) {
      best = S;
      best_cost = cost;
    }
  }
  return best;
}

// Slice-major units: the most K slices one CTA's units span (grid CTAs of kV5Warps warps; CTA c holds
// units [c kV5Warps U / W, (c + 1) kV5Warps U / W), as the kernel computes them).
int64_t max_cta_slice_span(int64_t units, int tiles, int grid) {
  const int64_t W = static_cast<int64_t>(grid) * kV5Warps;
  int64_t span = 0;
  for (int c = 0; c < grid; ++c) {
    const int64_t cu0 = static_cast<int64_t>(c) * kV5Warps * units / W;
    const int64_t cu1 = static_cast<int64_t>(c + 1) * kV5Warps * units / W;
    if (cu1 > cu0) span = std::max(span, (cu1 - 1) / tiles - cu0 / tiles + 1);
  }
  return span;
}

V5Config v5_config(const GemvArgs& a) {
  V5Config c;
  if (a.M < 1 || a.M > kV5MaxM || a.N < 1 || a.K < 256 || a.K % 256 != 0) return c;
  if (!nf4::is_valid_blocksize(a.blocksize) || a.blocksize < 64 || a.K % a.blocksize != 0) return c;
  if (a.dtype != DType::kBFloat16 && a.dtype != DType::kFloat16) return c;
  if (a.lora_a != nullptr && (a.r < 1 || a.r > kGemvMaxRank || a.lora_b == nullptr)) return c;
  const int64_t blocks = static_cast<int64_t>(a.N) * (a.K / a.blocksize);
  if (blocks >= (int64_t{1} << 31) || static_cast<int64_t>(a.M) * a.K >= (int64_t{1} << 31)) return c;
  if (reinterpret_cast<uintptr_t>(a.packed) % 16 != 0 || reinterpret_cast<uintptr_t>(a.x) % 16 != 0) return c;
  if (a.absmax_q != nullptr) {
    // the step's codes are copied as the aligned 4-byte word holding them: it must lie in the tensor
    if (reinterpret_cast<uintptr_t>(a.absmax_q) % 4 != 0 || blocks % 4 != 0) return c;
  } else if (reinterpret_cast<uintptr_t>(a.absmax_f32) % 8 != 0 || blocks % 2 != 0) {
    return c;
  }
  const DevInfo d = dev_info();
  if (d.major < 8) return c;
  c.major = d.major;
  c.mt = a.M > 8 ? 2 : 1;
  c.grid = d.sms;  // one 512-thread CTA per SM (the shared memory allows no second one)
  c.tiles = (a.N + 15) / 16;
  c.kst = a.K / kV5StepK;
  const int64_t W = static_cast<int64_t>(c.grid) * kV5Warps;
  const bool lora = a.lora_a != nullptr;
  c.stages = v5_stages_wanted();
  if (c.stages != kV5Stages && smem_dyn_bytes5(a.M, a.K, c.stages) > d.smem_optin) c.stages = kV5Stages;
  if (smem_dyn_bytes5(a.M, a.K, c.stages) <= d.smem_optin) {
    // all of x beside the ring (the deep ring only where x still fits beside it); tile-major units
    c.smem_dyn = smem_dyn_bytes5(a.M, a.K, c.stages);
    c.xsb = 2 * a.K + 16;
    c.S = pick_slices(c.tiles, c.kst, a.M, a.N, W, lora);
  } else {
    // x per CTA: slice-major units, each CTA stages the K slices its units lie in; S among those
    // whose slices are whole 256-k chunks and whose widest CTA fits, at the least cost
    bool found = false;
    double best_cost = 0.0;
    for (int S = 1; S <= c.kst && S <= kV5MaxSlices; ++S) {
      if (c.kst % S != 0 || (a.K / S) % 256 != 0) continue;
      const int64_t span = max_cta_slice_span(static_cast<int64_t>(c.tiles) * S, c.tiles, c.grid);
      const int64_t xsb = 2 * span * (a.K / S) + 16;
      const int64_t smem = v5_x_off(kV5Stages) + a.M * xsb;
      if (smem > d.smem_optin) continue;
      const double cost = slice_cost(c.tiles, c.kst, a.M, a.N, W, lora, S);
      if (!found || cost < best_cost) {
        found = true;
        best_cost = cost;
        c.S = S;
        c.xsb = static_cast<int>(xsb);
        c.smem_dyn = static_cast<int>(smem);
      }
    }
    if (!found) return c;
    c.stages = kV5Stages;
    c.slice_major = true;
  }
  c.sst = c.kst / c.S;
  c.units = static_cast<int64_t>(c.tiles) * c.S;
  c.partials = c.S > 1 || lora;
  size_t off = 0;
  if (lora) {
    // T pieces: one 256-k chunk each, two where r · K / 256 pieces would outnumber the warps (whole x
    // only: with sliced x a slice's owner CTA takes its chunks one by one)
    const int kc = a.K / 256;
    c.cpp = (!c.slice_major && kc % 2 == 0 && static_cast<int64_t>(a.r) * kc > W) ? 2 : 1;
    c.jt = kc / c.cpp;
    off = align_up(static_cast<size_t>(c.jt) * a.M * a.r * 4, 256);
  }
  c.off_part = off;
  if (c.partials) off += static_cast<size_t>(c.S) * a.M * a.N * 4;
  c.ws_bytes = off;
  c.ok = true;
  return c;
}

// Slice-major T pieces to the light warps first: by default where K <= kV5LightMaxK;
// $LORA_KERNELS_GEMV_V5_PIECES=light or =slot forces the light-first or the plain warp-order map (A/B).
bool v5_light_first_wanted(int K) {
  const char* e = std::getenv("LORA_KERNELS_GEMV_V5_PIECES");
  if (e != nullptr && std::strcmp(e, "light") == 0) return true;
  if (e != nullptr && std::strcmp(e, "slot") == 0) return false;
  return K <= kV5LightMaxK;
}

// The finish kernel's early requests (B row, bias, partials): on unless $LORA_KERNELS_GEMV_V5_FINISH=plain.
bool v5_finish_prefetch_wanted() {
  const char* e = std::getenv("LORA_KERNELS_GEMV_V5_FINISH");
  return !(e != nullptr && std::strcmp(e, "plain") == 0);
}

bool use_pdl5(const V5Config& c) {
  if (c.major < 9) return false;
  const char* e = std::getenv("LORA_KERNELS_GEMV_V5_PDL");
  return !(e != nullptr && e[0] == '0');
}

template <typename T, bool kNested, int kStages, int kMT>
cudaError_t launch_gemv5(const V5Params& p, const V5Config& c, bool pdl, cudaStream_t stream) {
  auto kern = nf4_gemv_v5_kernel<T, kNested, kStages, kMT>;
  static std::atomic<int> smem_set[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
  if (smem_set[dev].load(std::memory_order_acquire) < c.smem_dyn) {
    const int want = dev_info().smem_optin;  // the most any call can ask for, once per device
    const cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, want);
    if (err != cudaSuccess) return err;
    (void)cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    (void)cudaGetLastError();
    smem_set[dev].store(want, std::memory_order_release);
  }
  return launch_maybe_pdl(kern, dim3(c.grid), dim3(kV5Threads), static_cast<size_t>(c.smem_dyn), stream, pdl, p);
}

template <typename T, int kStages, int kMT>
cudaError_t launch_gemv5_any(const V5Params& p, const V5Config& c, cudaStream_t stream) {
  return p.absmax_q != nullptr ? launch_gemv5<T, true, kStages, kMT>(p, c, false, stream)
                               : launch_gemv5<T, false, kStages, kMT>(p, c, false, stream);
}

// The GEMV (a plain launch: it reads x at once), then with partials the finish kernel as its
// programmatic dependent.  Two launches at most: T is computed inside the GEMV.  y_alloc: see
// launch_nf4_lora_gemv_v5.
template <typename T>
cudaError_t launch_v5_typed(V5Params p, const V5Config& c, cudaStream_t stream, YAlloc y_alloc, void* y_ctx) {
  if (y_alloc != nullptr && !c.partials) p.y = y_alloc(y_ctx);  // the GEMV writes y itself
  const cudaError_t err = c.mt == 2 ? (c.stages == kV5DeepStages ? launch_gemv5_any<T, kV5DeepStages, 2>(p, c, stream)
                                                                  : launch_gemv5_any<T, kV5Stages, 2>(p, c, stream))
                                    : (c.stages == kV5DeepStages ? launch_gemv5_any<T, kV5DeepStages, 1>(p, c, stream)
                                                                  : launch_gemv5_any<T, kV5Stages, 1>(p, c, stream));
  if (err != cudaSuccess || !c.partials) return err;
  if (y_alloc != nullptr) p.y = y_alloc(y_ctx);  // the GEMV is on its way; only the finish kernel writes y
  const int64_t MN = static_cast<int64_t>(p.M) * p.N;
  const int grid = static_cast<int>((MN + kFinishThreads5 - 1) / kFinishThreads5);
  return launch_maybe_pdl(v5_finish_kernel<T>, dim3(grid), dim3(kFinishThreads5), 0, stream, use_pdl5(c), p);
}

}  // namespace

bool nf4_lora_gemv_v5_config(const GemvArgs& a, size_t* workspace_bytes) {
  const V5Config c = v5_config(a);
  if (workspace_bytes != nullptr) *workspace_bytes = c.ok ? c.ws_bytes : 0;
  return c.ok;
}

V5Plan nf4_lora_gemv_v5_plan(const GemvArgs& a) {
  const V5Config c = v5_config(a);
  V5Plan plan;
  if (c.ok) {
    plan.slices = c.S;
    plan.mode = c.slice_major ? 2 : 1;
    plan.stages = c.stages;
  }
  return plan;
}

cudaError_t launch_nf4_lora_gemv_v5(const GemvArgs& a, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream, YAlloc y_alloc, void* y_ctx) {
  const V5Config c = v5_config(a);
  if (!c.ok) return cudaErrorInvalidValue;
  if (c.ws_bytes > 0 && (workspace == nullptr || workspace_bytes < c.ws_bytes)) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  V5Params p;
  fill_chain_params(p, a, nullptr, c.partials ? reinterpret_cast<float*>(ws + c.off_part) : nullptr);
  p.lora_a = a.lora_a;
  p.scale = a.scale;
  p.scale_vec = a.scale_vec;
  p.jt = c.jt;
  p.cpp = c.cpp;
  p.tpart = a.lora_a != nullptr ? reinterpret_cast<float*>(ws) : nullptr;
  p.tiles = c.tiles;
  p.kst = c.kst;
  p.S = c.S;
  p.sst = c.sst;
  p.units = c.units;
  p.slice_major = c.slice_major;
  p.light_first = c.slice_major && a.lora_a != nullptr && v5_light_first_wanted(a.K);
  p.finish_prefetch = v5_finish_prefetch_wanted();
  p.XSB = c.xsb;
  switch (a.dtype) {
    case DType::kBFloat16: return launch_v5_typed<__nv_bfloat16>(p, c, stream, y_alloc, y_ctx);
    case DType::kFloat16: return launch_v5_typed<__half>(p, c, stream, y_alloc, y_ctx);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lora_kernels
