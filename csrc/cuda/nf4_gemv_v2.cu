// Fused QLoRA decode, variant 2 (lora_gemv(..., variant=2); lora_kernels reads
// LORA_KERNELS_GEMV_VARIANT): y = x · Ŵᵀ + ((x · Aᵀ) ⊙ s) · Bᵀ + bias for M <= 16 in ONE launch.
// Same math and rounding contract as variant 1 (csrc/cuda/nf4_gemv.cu): products dtype(code) · x
// summed in fp32 per 64-element chunk by the tensor cores, times the fp32 block absmax, summed in
// fp32; the LoRA term (fp32) and the bias added in the epilogue; one rounding to dtype at the end.
//
// Why (variant 1 on an H100, 4096 -> 14336, M = 1: 34.9 us against a 10 us memory floor): its
// inner loop issues ~106 instructions per 8 packed bytes per lane (5 per table lookup, 4 register
// moves per mma to interleave the x fragment, 64-bit absmax address math per chunk), i.e. 2.4 bytes
// of weight per warp instruction; at the ~2.4 warp instructions / cycle / SM it reaches that is
// ~1.35 TB/s, which is what it measures.  Its 448 short-lived CTAs (1.7 waves) each rebuild a 32 KB
// table and run 2 load rounds without overlap; the T kernel adds ~4.5 us.
//
// What this variant does instead:
//  * Persistent grid: one 512-thread CTA per SM (grid = min(#SMs, #16-row tiles)), each owning a
//    contiguous range of 16-row tiles (ranges differ by at most one tile): the table is built once
//    per SM, there is no wave tail.
//  * The weight is the mma's A operand (m16n8k16: 16 weight rows x 16 k per mma, the x rows are
//    the n8 columns): one mma covers twice the weight of variant 1 for M <= 8, and the B operand
//    (x) is two consecutive 32-bit words of a 16-byte load (no register moves).
//  * Lookup: the byte -> dtype-pair table sits at a 64 KB-aligned shared address, entry v of lane l
//    at byte 256 v + 4 l (bank = l: conflict-free), so a lookup's shared address is ONE byte
//    permute of the packed word and the lane's base: prmt + lds per packed byte (variant 1: 5).
//  * Loads: each warp streams its (tile, K range) in batches of UB 64-element units (UB = 5 for
//    M <= 8, 4 for M <= 16), the next batch (16 B per unit per lane + the raw block absmax)
//    requested before the current one is used: 64-80 B per lane, 32-40 KB per SM always in flight.
//    Offsets are 32-bit and set once per group.  The block absmax is decoded once per (unit, row)
//    by the lane quad of that row and exchanged through shared memory (one lds.64 per unit).
//  * Work split inside the CTA: a group of up to WM tiles is processed by all 16 warps, the warps
//    of a tile splitting its K range; partial sums go through shared memory once per group (double
//    buffered, one barrier per group), summed in a fixed order.
//  * LoRA in the same launch: every CTA (up to P) first computes x·Aᵀ over a one- or two-unit
//    slice of K (its loads overlap the first weight batch); the last one to finish sums the P
//    partials in a fixed order (deterministic), scales by s and publishes T.  Every CTA keeps its
//    base results (fp32) in the workspace and adds Σ_j T[m,j] B[n,j] + bias for its rows at its very
//    end, so the wait for T is normally long over.  The flags carry a per-call epoch and the last
//    CTA resets them (CUDA-graph replays start clean); a wait longer than 20 ms (never expected)
//    computes T locally instead of hanging.
#include "cuda/nf4_gemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdlib>

#include "nf4_common.h"
#include "cuda/nf4_gemv_common.cuh"
#include "cuda/spin_wait.cuh"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
// 64-element units per batch per warp: kUB<NB> (register budget: two batches in flight)
template <int NB> struct UBOf { static constexpr int value = NB == 1 ? 5 : 4; };
constexpr uint32_t kLutBytes = 65536;    // 256 entries x 256 B (32 lanes x 4 B used, 128 B gap)
constexpr int kMaxWM = 4;                // tiles per group at most
constexpr unsigned long long kWaitNs = 20ull * 1000 * 1000;  // T wait before computing it locally
// Largest dynamic shared memory any launch asks for (M = 16): 64 KB table + 2 x extras.
constexpr int kMaxSmemRequest = 65536 + 2 * (1024 + kWarps * 4 * 16 * 4 + 2 * kWarps * 16 * 4 * kGemvMaxM);

// ---- small PTX helpers ---------------------------------------------------------------------------
__device__ __forceinline__ uint2 ld_weight(const uint8_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];\n"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t lds_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts_v4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d)
               : "memory");
}
// Shared address of table entry `byte k of w` for this lane: {lane*4, w.byte[k], lut.hi16}.
template <int k>
__device__ __forceinline__ uint32_t lut_addr(uint32_t w, uint32_t lane_base) {
  return __byte_perm(w, lane_base, 0x7604 | (k << 4));
}
// CTA barrier that may be reached from different code locations by different warps.
__device__ __forceinline__ void barrier_any() { asm volatile("barrier.sync 0;\n" ::: "memory"); }
// Epoch-tagged counter {epoch: hi 32 bits, count: lo 32}: a word tagged with another epoch counts
// as 0.  Returns the count after the increment.
__device__ __forceinline__ uint32_t epoch_inc(unsigned long long* w, uint32_t epoch) {
  unsigned long long cur = *reinterpret_cast<volatile unsigned long long*>(w);
  while (true) {
    const uint32_t hi = static_cast<uint32_t>(cur >> 32), lo = static_cast<uint32_t>(cur);
    const unsigned long long nv =
        (static_cast<unsigned long long>(epoch) << 32) | static_cast<unsigned long long>((hi == epoch ? lo : 0u) + 1u);
    const unsigned long long prev = atomicCAS(w, cur, nv);
    if (prev == cur) return static_cast<uint32_t>(nv);
    cur = prev;
  }
}

// ---------------------------------------------------------------------------------------------
struct V2Params {
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
  int log2_cpb;   // log2(blocksize / 64): 64-element units per quantization block
  int KU;         // K / 64
  int KB;         // K / blocksize
  int nmt;        // ceil(N / 16)
  int WM;         // tiles per group (1..kMaxWM)
  uint32_t extras_bytes;
  // LoRA (lora_a == nullptr: none); workspace pointers valid only with LoRA
  const void* lora_a;
  const void* lora_b;
  int r;
  float scale;
  const float* scale_vec;
  float* ybase;                  // [M, N] fp32 base results
  float* tpart;                  // [P, M, r] partial x·Aᵀ
  float* tfinal;                 // [M, r] T = (x·Aᵀ) ⊙ s
  unsigned long long* sync;      // [0]: T state, [1]: CTAs done
  int P;
  uint32_t epoch;
  // bias [N] (nullptr: none), of dtype or fp32
  const void* bias;
  bool bias_f32;
};

// Partial x·Aᵀ over units [u0, u1) (64 elements each): out[m * r + j] (unscaled).  Eight lanes per
// (m, j) item, lane e of the eight taking 16-byte vectors e, e + 8, ... of the slice (one or two
// units: one vector each; all of K only in the timeout fallback), then a 3-step shuffle sum: one
// load latency per pass of 64 items.  Called by all threads of the CTA (the pass loop is uniform).
template <typename T>
__device__ __forceinline__ void t_partial(const V2Params& p, int u0, int u1, float* out) {
  const T* x = static_cast<const T*>(p.x);
  const T* A = static_cast<const T*>(p.lora_a);
  const int K = p.K, r = p.r, nv = (u1 - u0) * 8, items = p.M * r;
  const int sub = threadIdx.x & 7, grp = threadIdx.x >> 3;
  for (int base = 0; base < items; base += kThreads / 8) {
    const int item = base + grp;
    float acc = 0.f;
    if (item < items) {
      const int m = item / r, j = item - m * r;
      const uint4* xr = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * K) + u0 * 8;
      const uint4* ar = reinterpret_cast<const uint4*>(A + static_cast<int64_t>(j) * K) + u0 * 8;
#pragma unroll 2
      for (int v = sub; v < nv; v += 8) {
        const uint4 xv = __ldg(xr + v), av = __ldg(ar + v);
        const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w}, aw[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 xf = Num<T>::unpack(xw[i]), af = Num<T>::unpack(aw[i]);
          acc = __fmaf_rn(xf.x, af.x, acc);
          acc = __fmaf_rn(xf.y, af.y, acc);
        }
      }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    acc += __shfl_xor_sync(0xffffffffu, acc, 4);
    if (item < items && sub == 0) out[item] = acc;
  }
}

// The lines of producer c's slice of x and A, requested into L2 at kernel start.
__device__ __forceinline__ void prefetch_t_slice(const V2Params& p, int c) {
  const int u0 = c * p.KU / p.P, u1 = (c + 1) * p.KU / p.P, nu = u1 - u0;
  const int lines = (p.M + p.r) * nu;
  for (int i = threadIdx.x; i < lines; i += kThreads) {
    const int row = i / nu, u = u0 + (i - row * nu);
    const char* base = row < p.M ? static_cast<const char*>(p.x) + static_cast<int64_t>(row) * p.K * 2
                                 : static_cast<const char*>(p.lora_a) + static_cast<int64_t>(row - p.M) * p.K * 2;
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(base + static_cast<int64_t>(u) * 128));
  }
}

__device__ __forceinline__ float lora_scale(const V2Params& p, int j) {
  return p.scale_vec != nullptr ? __ldg(p.scale_vec + j) : p.scale;
}

// One batch of up to kUB units of one warp: the lane's packed bytes (rows g and g + 8 of the tile,
// bytes [8q, 8q + 8) of each unit's 32) and the raw block absmax of the units it decodes.
template <int UB>
struct Batch {
  static constexpr int kDec = (UB + 3) / 4;   // units whose block absmax one lane decodes
  uint2 w0[UB], w1[UB];
  float s0[kDec], s1[kDec];       // fp32 absmax, or the nested absmax (double quant)
  uint32_t q0[kDec], q1[kDec];    // 8-bit absmax codes (double quant)
};

struct Desc {
  int g;       // group index within the CTA
  int mt;      // tile (16 rows) of this warp in group g, -1: idle in this group
  int ub;      // first unit of the batch
  int cnt;     // units in the batch (0..UB)
  bool last;   // last batch of this warp in group g
};

// Where the next batch of this warp comes from.  Offsets are 32-bit (the launcher checks
// N * K / 2 < 2^31): only the group change recomputes them.
struct Stream {
  int g, mt;              // group, tile (-1: idle in this group)
  int ub, ue;             // next batch's first unit, end of the warp's unit range
  uint32_t woff0, woff1;  // byte offset of (row g, row g + 8) + 8q in the packed weight, unit 0
  uint32_t ab0, ab1;      // row * KB: first block of the two rows
};

__device__ __forceinline__ void stream_group(const V2Params& p, int t0, int t1, int g, int warp, int lane,
                                             Stream& st) {
  const int mbeg = t0 + g * p.WM;
  const int mc = min(p.WM, t1 - mbeg);
  const int wke = kWarps / mc;
  const int slot = warp / wke, kp = warp - slot * wke;
  st.g = g;
  if (slot >= mc) {
    st.mt = -1; st.ub = 0; st.ue = 0;
    st.woff0 = st.woff1 = st.ab0 = st.ab1 = 0;
    return;
  }
  st.mt = mbeg + slot;
  st.ub = kp * p.KU / wke;
  st.ue = (kp + 1) * p.KU / wke;
  const int gr = lane >> 2, q = lane & 3;
  const uint32_t r0 = static_cast<uint32_t>(min(st.mt * 16 + gr, p.N - 1));
  const uint32_t r1 = static_cast<uint32_t>(min(st.mt * 16 + gr + 8, p.N - 1));
  const uint32_t kh = static_cast<uint32_t>(p.K / 2);
  st.woff0 = r0 * kh + static_cast<uint32_t>(q * 8);
  st.woff1 = r1 * kh + static_cast<uint32_t>(q * 8);
  st.ab0 = r0 * static_cast<uint32_t>(p.KB);
  st.ab1 = r1 * static_cast<uint32_t>(p.KB);
}

template <int UB>
__device__ __forceinline__ Desc stream_desc(const Stream& st) {
  Desc d;
  d.g = st.g;
  d.mt = st.mt;
  d.ub = st.ub;
  d.cnt = st.mt < 0 ? 0 : min(UB, st.ue - st.ub);
  d.last = st.ub + UB >= st.ue;
  return d;
}

template <int UB>
__device__ __forceinline__ void stream_advance(const V2Params& p, int t0, int t1, int ngroups, int warp,
                                               int lane, Stream& st) {
  if (st.ub + UB < st.ue) {
    st.ub += UB;
  } else if (st.g + 1 < ngroups) {
    stream_group(p, t0, t1, st.g + 1, warp, lane, st);
  } else {
    st.g = ngroups;  // done
  }
}

template <bool kNested, int UB>
__device__ __forceinline__ void issue_batch(const V2Params& p, const Stream& st, int cnt, int lane, Batch<UB>& b) {
  constexpr int kDec = Batch<UB>::kDec;
  if (cnt <= 0) return;
  const int q = lane & 3;
  const uint32_t ub32 = static_cast<uint32_t>(st.ub) * 32u;
  const uint8_t* wp0 = p.packed + (st.woff0 + ub32);
  const uint8_t* wp1 = p.packed + (st.woff1 + ub32);
  if (cnt == UB) {
#pragma unroll
    for (int i = 0; i < UB; ++i) {
      b.w0[i] = ld_weight(wp0 + i * 32);
      b.w1[i] = ld_weight(wp1 + i * 32);
    }
  } else {
#pragma unroll
    for (int i = 0; i < UB; ++i) {
      if (i < cnt) {
        b.w0[i] = ld_weight(wp0 + i * 32);
        b.w1[i] = ld_weight(wp1 + i * 32);
      }
    }
  }
#pragma unroll
  for (int h = 0; h < kDec; ++h) {
    const uint32_t blk = static_cast<uint32_t>(st.ub + min(q + 4 * h, cnt - 1)) >> p.log2_cpb;
    const uint32_t i0 = st.ab0 + blk, i1 = st.ab1 + blk;
    if (kNested) {
      b.q0[h] = __ldg(p.absmax_q + i0);
      b.q1[h] = __ldg(p.absmax_q + i1);
      b.s0[h] = __ldg(p.nested_absmax + (i0 >> 8));
      b.s1[h] = __ldg(p.nested_absmax + (i1 >> 8));
    } else {
      b.s0[h] = __ldg(p.absmax_f32 + i0);
      b.s1[h] = __ldg(p.absmax_f32 + i1);
    }
  }
}

// One 64-element unit: 16 lookups, 4 mma per x tile, scaled into acc.  xr: this lane's x row
// (clamped to a valid row: columns of x rows >= M only feed outputs that are never stored).
template <typename T, int NB>
__device__ __forceinline__ void compute_unit(const uint4* const (&xr)[NB], int i, uint2 w0, uint2 w1,
                                             float2 sc, uint32_t lane_base, float (&acc)[NB][4]) {
  uint32_t xb[NB][8];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const uint4 u = __ldg(xr[nb] + i * 8), v = __ldg(xr[nb] + i * 8 + 1);
    xb[nb][0] = u.x; xb[nb][1] = u.y; xb[nb][2] = u.z; xb[nb][3] = u.w;
    xb[nb][4] = v.x; xb[nb][5] = v.y; xb[nb][6] = v.z; xb[nb][7] = v.w;
  }
  // MMA step s uses bytes 2s, 2s + 1 of the lane's 8 (row g: a0, a2; row g + 8: a1, a3), i.e.
  // real k = 16q + 4s + {0, 1} (a0/a1, low/high half) and 16q + 4s + {2, 3} (a2/a3); the x
  // operand uses the same k: b0 = x[16q + 4s + {0,1}], b1 = x[16q + 4s + {2,3}].
  const uint32_t wa = w0.x, wb = w0.y, wc = w1.x, wd = w1.y;
  uint32_t a[4][4];
  a[0][0] = lds_u32(lut_addr<0>(wa, lane_base));
  a[0][1] = lds_u32(lut_addr<0>(wc, lane_base));
  a[0][2] = lds_u32(lut_addr<1>(wa, lane_base));
  a[0][3] = lds_u32(lut_addr<1>(wc, lane_base));
  a[1][0] = lds_u32(lut_addr<2>(wa, lane_base));
  a[1][1] = lds_u32(lut_addr<2>(wc, lane_base));
  a[1][2] = lds_u32(lut_addr<3>(wa, lane_base));
  a[1][3] = lds_u32(lut_addr<3>(wc, lane_base));
  a[2][0] = lds_u32(lut_addr<0>(wb, lane_base));
  a[2][1] = lds_u32(lut_addr<0>(wd, lane_base));
  a[2][2] = lds_u32(lut_addr<1>(wb, lane_base));
  a[2][3] = lds_u32(lut_addr<1>(wd, lane_base));
  a[3][0] = lds_u32(lut_addr<2>(wb, lane_base));
  a[3][1] = lds_u32(lut_addr<2>(wd, lane_base));
  a[3][2] = lds_u32(lut_addr<3>(wb, lane_base));
  a[3][3] = lds_u32(lut_addr<3>(wd, lane_base));
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const float zero[4] = {0.f, 0.f, 0.f, 0.f};
    float cb[4];
    Num<T>::mma(cb, a[0][0], a[0][1], a[0][2], a[0][3], xb[nb][0], xb[nb][1], zero);
    Num<T>::mma(cb, a[1][0], a[1][1], a[1][2], a[1][3], xb[nb][2], xb[nb][3], cb);
    Num<T>::mma(cb, a[2][0], a[2][1], a[2][2], a[2][3], xb[nb][4], xb[nb][5], cb);
    Num<T>::mma(cb, a[3][0], a[3][1], a[3][2], a[3][3], xb[nb][6], xb[nb][7], cb);
    // c0, c1: weight row g (x rows 2q, 2q + 1 of tile nb); c2, c3: weight row g + 8.
    acc[nb][0] = __fmaf_rn(cb[0], sc.x, acc[nb][0]);
    acc[nb][1] = __fmaf_rn(cb[1], sc.x, acc[nb][1]);
    acc[nb][2] = __fmaf_rn(cb[2], sc.y, acc[nb][2]);
    acc[nb][3] = __fmaf_rn(cb[3], sc.y, acc[nb][3]);
  }
}

// One batch.  The block absmax: lane (g, q) decodes units q + 4h for rows g and g + 8 into the
// warp's slot sc_w[unit][g] = {row g, row g + 8}; every lane then reads its pair with one lds.64.
template <typename T, int NB, bool kNested, int UB>
__device__ __forceinline__ void compute_batch(const V2Params& p, const Desc& d, const Batch<UB>& b, int lane,
                                              uint32_t lane_base, const float* ncode_s, float offset,
                                              float2* sc_w, float (&acc)[NB][4]) {
  constexpr int kDec = Batch<UB>::kDec;
  if (d.cnt <= 0) return;
  const int g = lane >> 2, q = lane & 3;
  __syncwarp();
#pragma unroll
  for (int h = 0; h < kDec; ++h) {
    float s0, s1;
    if (kNested) {
      s0 = __fadd_rn(__fmul_rn(ncode_s[b.q0[h]], b.s0[h]), offset);
      s1 = __fadd_rn(__fmul_rn(ncode_s[b.q1[h]], b.s1[h]), offset);
    } else {
      s0 = b.s0[h];
      s1 = b.s1[h];
    }
    if (q + 4 * h < UB) sc_w[(q + 4 * h) * 8 + g] = make_float2(s0, s1);
  }
  __syncwarp();
  const T* x = static_cast<const T*>(p.x);
  const uint4* xr[NB];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const uint32_t row = static_cast<uint32_t>(min(g + 8 * nb, p.M - 1));
    xr[nb] = reinterpret_cast<const uint4*>(x + (row * static_cast<uint32_t>(p.K) + static_cast<uint32_t>(q * 16) +
                                                 static_cast<uint32_t>(d.ub) * 64u));
  }
  if (d.cnt == UB) {
#pragma unroll
    for (int i = 0; i < UB; ++i) compute_unit<T, NB>(xr, i, b.w0[i], b.w1[i], sc_w[i * 8 + g], lane_base, acc);
  } else {
#pragma unroll
    for (int i = 0; i < UB; ++i) {
      if (i < d.cnt) compute_unit<T, NB>(xr, i, b.w0[i], b.w1[i], sc_w[i * 8 + g], lane_base, acc);
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_out(const V2Params& p, int n, int m, float v) {
  if (p.bias != nullptr) {
    const float bv = p.bias_f32 ? __ldg(static_cast<const float*>(p.bias) + n)
                                : Num<T>::to_float(static_cast<const T*>(p.bias)[n]);
    v = __fadd_rn(v, bv);
  }
  static_cast<T*>(p.y)[static_cast<int64_t>(m) * p.N + n] = Num<T>::from_float(v);
}

// End of group g: partial sums -> shared memory, one barrier, fixed-order sum over the K slices,
// then the output (no LoRA) or the fp32 base result (LoRA, finished at the end of the kernel).
template <typename T, int NB>
__device__ __forceinline__ void flush_group(const V2Params& p, int t0, int t1, int g, int mt, int warp,
                                            int lane, float* red, float (&acc)[NB][4]) {
  const int M = p.M;
  float* buf = red + (g & 1) * (kWarps * 16 * M);
  if (mt >= 0) {
    const int gr = lane >> 2, q = lane & 3;
    float* wb = buf + warp * 16 * M;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const int m0 = 8 * nb + 2 * q;
      if (m0 < M) {
        wb[gr * M + m0] = acc[nb][0];
        wb[(gr + 8) * M + m0] = acc[nb][2];
      }
      if (m0 + 1 < M) {
        wb[gr * M + m0 + 1] = acc[nb][1];
        wb[(gr + 8) * M + m0 + 1] = acc[nb][3];
      }
    }
  }
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
  barrier_any();
  const int mbeg = t0 + g * p.WM;
  const int mc = min(p.WM, t1 - mbeg);
  const int wke = kWarps / mc;
  const int per_tile = 16 * M;
  for (int o = threadIdx.x; o < mc * per_tile; o += kThreads) {
    const int slot = o / per_tile;
    const int rem = o - slot * per_tile;
    const int row = rem / M, m = rem - row * M;
    const int n = (mbeg + slot) * 16 + row;
    if (n >= p.N) continue;
    const float* src = buf + (slot * wke) * per_tile + rem;
    float v = 0.f;
    for (int kp = 0; kp < wke; ++kp) v += src[kp * per_tile];
    if (p.lora_a != nullptr) {
      p.ybase[static_cast<int64_t>(m) * p.N + n] = v;
    } else {
      store_out<T>(p, n, m, v);
    }
  }
}

// Producer c: partial T over its K slice -> tpart[c]; the producer whose arrival completes the count
// sums the P partials in order, scales by s, writes T and publishes it (state = {epoch, P + 1}).
template <typename T>
__device__ __forceinline__ void produce_t(const V2Params& p, int c, int* flag_s) {
  const int tid = threadIdx.x;
  const int u0 = c * p.KU / p.P, u1 = (c + 1) * p.KU / p.P;
  const int MR = p.M * p.r;
  t_partial<T>(p, u0, u1, p.tpart + static_cast<int64_t>(c) * MR);
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const uint32_t cnt = epoch_inc(p.sync, p.epoch);
    *flag_s = cnt == static_cast<uint32_t>(p.P);
    __threadfence();
  }
  __syncthreads();
  if (*flag_s) {
    for (int idx = tid; idx < MR; idx += kThreads) {
      float s = 0.f;
      for (int pp = 0; pp < p.P; ++pp) s += __ldcg(p.tpart + static_cast<int64_t>(pp) * MR + idx);
      p.tfinal[idx] = s * lora_scale(p, idx % p.r);
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      atomicExch(p.sync, (static_cast<unsigned long long>(p.epoch) << 32) | static_cast<unsigned long long>(p.P + 1));
    }
  }
  __syncthreads();  // flag_s is reused
}

template <typename T, int NB, bool kNested>
__global__ void __launch_bounds__(kThreads, 1) nf4_gemv_v2_kernel(const V2Params p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int flag_s;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = gridDim.x, c = blockIdx.x;
  const bool has_lora = p.lora_a != nullptr;

  // Shared memory: the table at the first 64 KB-aligned address, the rest (nested code, partial
  // sums) before it when the gap is large enough, else after it (the launcher sizes for both).
  const uint32_t s0 = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t lut = (s0 + 0xFFFFu) & ~0xFFFFu;
  const uint32_t ext = (lut - s0 >= p.extras_bytes) ? s0 : lut + kLutBytes;
  float* ext_ptr = reinterpret_cast<float*>(smem_raw + (ext - s0));
  constexpr int kUB = UBOf<NB>::value;
  float* ncode_s = ext_ptr;                                             // 256 floats
  float2* sc_w = reinterpret_cast<float2*>(ext_ptr + 256) + warp * kUB * 8;  // [kWarps][kUB][8]
  float* red = ext_ptr + 256 + kWarps * kUB * 16;                       // [2][kWarps][16][M]
  const uint32_t lane_base = lut | static_cast<uint32_t>(lane * 4);

  // This CTA's tiles [t0, t1): balanced, the larger share on the last CTAs (the T producers are
  // the first ones).
  const int base = p.nmt / G, rem = p.nmt - (p.nmt / G) * G;
  const int t0 = c * base + max(0, c - (G - rem));
  const int t1 = t0 + base + (c >= G - rem ? 1 : 0);
  const int ngroups = (t1 - t0 + p.WM - 1) / p.WM;

  // ---- the T slice into L2, then the first two batches requested before the table is built
  if (has_lora && c < p.P) prefetch_t_slice(p, c);
  Batch<kUB> b0, b1;
  Stream st;
  stream_group(p, t0, t1, 0, warp, lane, st);
  Desc d0 = stream_desc<kUB>(st), d1;
  issue_batch<kNested, kUB>(p, st, d0.cnt, lane, b0);
  stream_advance<kUB>(p, t0, t1, ngroups, warp, lane, st);
  bool has1 = st.g < ngroups;
  if (has1) {
    d1 = stream_desc<kUB>(st);
    issue_batch<kNested, kUB>(p, st, d1.cnt, lane, b1);
    stream_advance<kUB>(p, t0, t1, ngroups, warp, lane, st);
  }

  // ---- table: entry v (dtype pair {code[v >> 4], code[v & 15]}) for lane l at lut + 256 v + 4 l
  for (int i = tid; i < 256 * 8; i += kThreads) {
    const int v = i >> 3, l4 = (i & 7) * 4;
    const uint32_t w = Num<T>::pack(__ldg(p.code + (v >> 4)), __ldg(p.code + (v & 15)));
    sts_v4(lut + static_cast<uint32_t>(v) * 256u + static_cast<uint32_t>(l4) * 4u, w, w, w, w);
  }
  if (kNested) {
    for (int i = tid; i < 256; i += kThreads) ncode_s[i] = __ldg(p.nested_code + i);
  }
  const float offset = kNested ? __ldg(p.offset) : 0.f;
  __syncthreads();

  // ---- LoRA producers (CTAs 0..P-1, normally all): partial T over a slice of K (its lines already
  // in L2, both weight batches in flight meanwhile); the last producer to finish sums the partials.
  if (has_lora && c < p.P) produce_t<T>(p, c, &flag_s);

  float acc[NB][4];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;

  // ---- main loop: while one register batch is used the other is in flight (unrolled by two so
  // both stay in registers)
  while (true) {
    compute_batch<T, NB, kNested, kUB>(p, d0, b0, lane, lane_base, ncode_s, offset, sc_w, acc);
    if (d0.last) flush_group<T, NB>(p, t0, t1, d0.g, d0.mt, warp, lane, red, acc);
    if (!has1) break;
    const bool has2 = st.g < ngroups;
    if (has2) {
      d0 = stream_desc<kUB>(st);
      issue_batch<kNested, kUB>(p, st, d0.cnt, lane, b0);
      stream_advance<kUB>(p, t0, t1, ngroups, warp, lane, st);
    }
    compute_batch<T, NB, kNested, kUB>(p, d1, b1, lane, lane_base, ncode_s, offset, sc_w, acc);
    if (d1.last) flush_group<T, NB>(p, t0, t1, d1.g, d1.mt, warp, lane, red, acc);
    if (!has2) break;
    has1 = st.g < ngroups;
    if (has1) {
      d1 = stream_desc<kUB>(st);
      issue_batch<kNested, kUB>(p, st, d1.cnt, lane, b1);
      stream_advance<kUB>(p, t0, t1, ngroups, warp, lane, st);
    }
  }

  if (!has_lora) return;

  // ---- LoRA: wait for T (normally published long ago), then y = base + T·Bᵀ + bias for our rows.
  __syncthreads();
  if (tid == 0) {
    const unsigned long long target =
        (static_cast<unsigned long long>(p.epoch) << 32) | static_cast<unsigned long long>(p.P + 1);
    flag_s = spin_until([&] { return ld_acquire_u64(p.sync) == target; }, kWaitNs, 200);
  }
  __syncthreads();
  const int MR = p.M * p.r;
  float* ts = red;  // M * r floats (fits: r <= 256 < 2 * kWarps * 16)
  if (flag_s) {
    for (int idx = tid; idx < MR; idx += kThreads) ts[idx] = __ldcg(p.tfinal + idx);
  } else {
    t_partial<T>(p, 0, p.KU, ts);
    __syncthreads();
    for (int idx = tid; idx < MR; idx += kThreads) ts[idx] = ts[idx] * lora_scale(p, idx % p.r);
  }
  __syncthreads();
  if (tid == 0) {
    if (epoch_inc(p.sync + 1, p.epoch) == static_cast<uint32_t>(G)) {
      atomicExch(p.sync, 0ull);        // every CTA has read T: clean flags for the next call
      atomicExch(p.sync + 1, 0ull);
    }
  }
  const int n0 = t0 * 16, n1 = min(t1 * 16, p.N), nrows = n1 - n0;
  const T* lb = static_cast<const T*>(p.lora_b);
  const int r = p.r;
  for (int idx = tid; idx < nrows * p.M; idx += kThreads) {
    const int m = idx / nrows, n = n0 + (idx - m * nrows);
    float v = __ldcg(p.ybase + static_cast<int64_t>(m) * p.N + n);
    const float* tr = ts + m * r;
    const T* br = lb + static_cast<int64_t>(n) * r;
    float lora = 0.f;
    for (int j = 0; j < r; ++j) lora = __fmaf_rn(tr[j], Num<T>::to_float(br[j]), lora);
    v = __fadd_rn(v, lora);
    store_out<T>(p, n, m, v);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
struct V2Config {
  bool ok = false;
  int grid = 0, NB = 1, WM = 1, P = 0, smem_optin = 0;
  uint32_t extras = 0, smem = 0;
  size_t ws_bytes = 0;
  size_t off_tfinal = 0, off_tpart = 0, off_ybase = 0;
};

V2Config v2_config(const GemvArgs& a) {
  V2Config c;
  if (a.M < 1 || a.M > kGemvMaxM || a.N < 1 || a.K < kGemvKChunk || a.K % kGemvKChunk != 0) return c;
  if (!nf4::is_valid_blocksize(a.blocksize) || a.blocksize < kGemvKChunk || a.K % a.blocksize != 0) return c;
  if (a.dtype != DType::kBFloat16 && a.dtype != DType::kFloat16) return c;
  // 32-bit offsets in the kernel: packed bytes, absmax blocks and x elements
  if (static_cast<int64_t>(a.N) * a.K / 2 >= (int64_t{1} << 31) ||
      static_cast<int64_t>(a.M) * a.K >= (int64_t{1} << 31))
    return c;
  const DevInfo d = dev_info();
  if (d.major < 8) return c;
  const int KU = a.K / 64;
  const int nmt = (a.N + 15) / 16;
  c.NB = a.M <= 8 ? 1 : 2;
  if (c.NB == 2) {
    c.WM = kMaxWM;  // more tiles per pass over x (x traffic ~ M / (4 tiles) of the weight's)
  } else {
    c.WM = 128 / KU;  // about 8 units per warp per group
    c.WM = c.WM < 1 ? 1 : (c.WM > kMaxWM ? kMaxWM : c.WM);
  }
  c.grid = nmt < d.sms ? nmt : d.sms;
  const uint32_t ub = c.NB == 1 ? UBOf<1>::value : UBOf<2>::value;
  c.extras = 1024u + kWarps * ub * 16u * 4u + 2u * kWarps * 16u * 4u * static_cast<uint32_t>(a.M);
  c.smem = kLutBytes + (2 * c.extras > kLutBytes ? 2 * c.extras : kLutBytes);
  if (static_cast<int>(c.smem) > d.smem_optin) return c;
  c.smem_optin = d.smem_optin;
  if (a.lora_a != nullptr) {
    if (a.r < 1 || a.r > kGemvMaxRank || a.lora_b == nullptr) return c;
    // T = x·Aᵀ is split over K between up to all CTAs (a unit or two each: one load latency at
    // the start of each CTA, hidden behind its first weight batch); fewer slices when M·r is large
    // so that summing the P partials (one CTA, at the end of its own slice) stays cheap.
    const int by_mr = 32768 / (a.M * a.r);
    int P = c.grid < KU ? c.grid : KU;
    if (P > by_mr) P = by_mr;
    c.P = P < 1 ? 1 : P;
    const size_t MR = static_cast<size_t>(a.M) * a.r;
    c.off_tfinal = 16;
    c.off_tpart = align_up(c.off_tfinal + MR * 4, 16);
    c.off_ybase = align_up(c.off_tpart + static_cast<size_t>(c.P) * MR * 4, 16);
    c.ws_bytes = c.off_ybase + static_cast<size_t>(a.M) * a.N * 4;
  }
  c.ok = true;
  return c;
}

std::atomic<uint32_t> g_epoch{0};

template <typename T, int NB, bool kNested>
cudaError_t launch_v2(const V2Params& p, const V2Config& c, cudaStream_t stream) {
  auto kern = nf4_gemv_v2_kernel<T, NB, kNested>;
  // The dynamic shared memory limit is raised once per device (the largest size this kernel asks
  // for is always set: the size only depends on M).
  static std::atomic<int> smem_set[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
  if (smem_set[dev].load(std::memory_order_acquire) < static_cast<int>(c.smem)) {
    const int want = static_cast<int>(c.smem) > kMaxSmemRequest ? static_cast<int>(c.smem) : kMaxSmemRequest;
    const int req = want <= c.smem_optin ? want : static_cast<int>(c.smem);
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, req);
    if (err != cudaSuccess) return err;
    smem_set[dev].store(req, std::memory_order_release);
  }
  kern<<<c.grid, kThreads, c.smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_v2_typed(const V2Params& p, const V2Config& c, cudaStream_t stream) {
  const bool nested = p.absmax_q != nullptr;
  if (c.NB == 1) {
    return nested ? launch_v2<T, 1, true>(p, c, stream) : launch_v2<T, 1, false>(p, c, stream);
  }
  return nested ? launch_v2<T, 2, true>(p, c, stream) : launch_v2<T, 2, false>(p, c, stream);
}

}  // namespace

bool nf4_lora_gemv_v2_config(const GemvArgs& a, size_t* workspace_bytes) {
  const V2Config c = v2_config(a);
  if (workspace_bytes != nullptr) *workspace_bytes = c.ok ? c.ws_bytes : 0;
  return c.ok;
}

cudaError_t launch_nf4_lora_gemv_v2(const GemvArgs& a, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream) {
  const V2Config c = v2_config(a);
  if (!c.ok) return cudaErrorInvalidValue;
  if (a.lora_a != nullptr && (workspace == nullptr || workspace_bytes < c.ws_bytes)) return cudaErrorInvalidValue;
  const int log2_bs = nf4::log2_blocksize(a.blocksize);
  V2Params p;
  p.x = a.x; p.y = a.y; p.M = a.M; p.N = a.N; p.K = a.K;
  p.packed = a.packed; p.absmax_f32 = a.absmax_f32; p.absmax_q = a.absmax_q;
  p.nested_absmax = a.nested_absmax; p.nested_code = a.nested_code; p.offset = a.offset; p.code = a.code;
  p.log2_cpb = log2_bs - 6;
  p.KU = a.K / 64;
  p.KB = a.K / a.blocksize;
  p.nmt = (a.N + 15) / 16;
  p.WM = c.WM;
  p.extras_bytes = c.extras;
  p.lora_a = a.lora_a; p.lora_b = a.lora_b; p.r = a.lora_a != nullptr ? a.r : 0;
  p.scale = a.scale; p.scale_vec = a.scale_vec;
  p.ybase = nullptr; p.tpart = nullptr; p.tfinal = nullptr; p.sync = nullptr; p.P = 0; p.epoch = 0;
  if (a.lora_a != nullptr) {
    unsigned char* ws = static_cast<unsigned char*>(workspace);
    p.sync = reinterpret_cast<unsigned long long*>(ws);
    p.tfinal = reinterpret_cast<float*>(ws + c.off_tfinal);
    p.tpart = reinterpret_cast<float*>(ws + c.off_tpart);
    p.ybase = reinterpret_cast<float*>(ws + c.off_ybase);
    p.P = c.P;
    uint32_t e = g_epoch.fetch_add(1, std::memory_order_relaxed) + 1;
    if (e == 0) e = g_epoch.fetch_add(1, std::memory_order_relaxed) + 1;
    p.epoch = e;
  }
  p.bias = a.bias; p.bias_f32 = a.bias_f32;
  switch (a.dtype) {
    case DType::kBFloat16: return launch_v2_typed<__nv_bfloat16>(p, c, stream);
    case DType::kFloat16: return launch_v2_typed<__half>(p, c, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lora_kernels
