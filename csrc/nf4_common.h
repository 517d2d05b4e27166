// Shared constants and scalar helpers of the NF4 (+ double quantization) format, used by the
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda).  No torch headers here: the CUDA
// sources include this file and must compile with a bare nvcc.
//
// Definitions mirror lora_kernels/codes.py and lora_kernels/reference.py bit for bit:
//   * kCode: the 16 NF4 levels (fp32, sorted).
//   * kThresholds: fl(fl(kCode[i] + kCode[i+1]) * 0.5f), i = 0..14 (codes.nf4_thresholds()),
//     used on the CPU; kThresholdsCuda: bitsandbytes' CUDA values, used on the GPU (see below).
//   * NF4 index of a scaled value s: #{t in kThresholds : s > t}  (an exact tie -> lower index).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define NF4_HD __host__ __device__ __forceinline__
#else
#define NF4_HD inline
#endif

namespace lora_kernels {
namespace nf4 {

constexpr int kNumCodes = 16;
constexpr int kNumThresholds = 15;
constexpr int kNestedBlocksize = 256;   // absmax values per nested (double-quant) block
constexpr int kDynamicCodeSize = 256;   // entries of the nested 8-bit dynamic code
constexpr float kMinAbsmax = 1e-38f;    // clamp of the divisor: an all-zero block -> level 0.0
constexpr uint8_t kPadNibble = 7;       // low nibble of the last byte for odd n (the 0.0 level)
constexpr int kMinBlocksize = 32;
constexpr int kMaxBlocksize = 4096;

// Exact fp32 values (hex literals) of codes.NF4_CODE and codes.nf4_thresholds().
#define LORA_NF4_CODE_VALUES                                                                 \
  -0x1p+0f, -0x1.647362p-1f, -0x1.0cd66p-1f, -0x1.94654p-2f, -0x1.23449ap-2f,                \
      -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0p+0f, 0x1.45f5fep-4f, 0x1.4995c6p-3f,             \
      0x1.f809bap-3f, 0x1.5a0674p-2f, 0x1.c3497p-2f, 0x1.200f56p-1f, 0x1.722766p-1f, 0x1p+0f
#define LORA_NF4_THRESHOLD_VALUES                                                            \
  -0x1.b239bp-1f, -0x1.38a4ep-1f, -0x1.d709p-2f, -0x1.5bd4ecp-2f, -0x1.e079d8p-3f,           \
      -0x1.1a7178p-3f, -0x1.74f0e2p-5f, 0x1.45f5fep-5f, 0x1.ec90c4p-4f, 0x1.a0cfcp-3f,       \
      0x1.2b05a8p-2f, 0x1.8ea7f2p-2f, 0x1.00da08p-1f, 0x1.491b5ep-1f, 0x1.b913b4p-1f

// bitsandbytes' CUDA kernel compares against decimal literals that nvcc rounds straight to fp32;
// four of them (indices 0, 8, 12, 14) land one ulp away from the fp32 midpoints above (read off
// the FSETP immediates of its kQuantizeBlockwise SASS; codes.NF4_THRESHOLDS_CUDA).  Our CUDA
// kernels use these so their bytes equal bitsandbytes' CUDA bytes.
#define LORA_NF4_THRESHOLD_VALUES_CUDA                                                       \
  -0x1.b239b2p-1f, -0x1.38a4ep-1f, -0x1.d709p-2f, -0x1.5bd4ecp-2f, -0x1.e079d8p-3f,          \
      -0x1.1a7178p-3f, -0x1.74f0e2p-5f, 0x1.45f5fep-5f, 0x1.ec90c6p-4f, 0x1.a0cfcp-3f,       \
      0x1.2b05a8p-2f, 0x1.8ea7f2p-2f, 0x1.00da06p-1f, 0x1.491b5ep-1f, 0x1.b913b2p-1f

constexpr float kCode[kNumCodes] = {LORA_NF4_CODE_VALUES};
constexpr float kThresholds[kNumThresholds] = {LORA_NF4_THRESHOLD_VALUES};
constexpr float kThresholdsCuda[kNumThresholds] = {LORA_NF4_THRESHOLD_VALUES_CUDA};

constexpr bool is_valid_blocksize(int64_t b) {
  return b == 32 || b == 64 || b == 128 || b == 256 || b == 512 || b == 1024 || b == 2048 ||
         b == 4096;
}

// log2 of a valid blocksize (the shift the kernels use instead of dividing by it).
constexpr int log2_blocksize(int64_t b) {
  int l = 0;
  while ((int64_t{1} << l) < b) ++l;
  return l;
}
static_assert(log2_blocksize(64) == 6 && log2_blocksize(4096) == 12, "log2_blocksize");

// ---------------------------------------------------------------------------------------------
// NF4 index by table lookup (used by both the CPU and the CUDA quantizer).
//
// cell(s) = clamp(RNE(16 * s) + 16, 0, 32).  Cell c (0 < c < 32) holds exactly the s with
// 16*s in [c - 16.5, c - 15.5], i.e. s in [lo_c, hi_c] = [(c - 16.5)/16, (c - 15.5)/16]; cell 0
// extends to -inf, cell 32 to +inf.  The thresholds are more than 1/16 apart, so each closed
// cell holds at most one threshold (checked at compile time below), hence
//   #{t : s > t} = base[c] + (s > thr[c]),
// base[c] = #{t < lo_c}, thr[c] = the threshold inside [lo_c, hi_c] or +inf if none.
// RNE(16 s) + 16 is computed as the bits of fl(fl(16 s) + (1.5 * 2^23 + 16)) minus the bits of
// 1.5 * 2^23: exact for |16 s| < 2^22; larger s saturate to cell 0 / 32, which is
// also correct (no threshold lies beyond +-1).  NaN gives some in-range cell (no OOB read).
// ---------------------------------------------------------------------------------------------
constexpr int kLutScale = 16;
constexpr int kLutCells = 2 * kLutScale + 1;  // 33
constexpr float kLutMagic = 12582912.0f + 16.0f;  // 1.5 * 2^23 + kLutScale
constexpr int32_t kLutBaseBits = 0x4B400000;      // bit pattern of 1.5 * 2^23

struct alignas(8) LutEntry {
  float thr;
  int32_t base;
};
struct QuantLut {
  LutEntry e[kLutCells];
  bool ok;  // every cell holds at most one threshold, none on a cell edge
};

constexpr QuantLut make_quant_lut(const float* thresholds = kThresholds) {
  QuantLut lut{};
  lut.ok = true;
  const float inf = __builtin_huge_valf();
  for (int c = 0; c < kLutCells; ++c) {
    const float lo = c == 0 ? -inf : (static_cast<float>(c) - 16.5f) / 16.0f;
    const float hi = c == kLutCells - 1 ? inf : (static_cast<float>(c) - 15.5f) / 16.0f;
    int base = 0, inside = 0;
    float thr = inf;
    for (int k = 0; k < kNumThresholds; ++k) {
      const float t = thresholds[k];
      if (t < lo) {
        ++base;
      } else if (t <= hi) {
        ++inside;
        thr = t;
        if (t == lo || t == hi) lut.ok = false;
      }
    }
    if (inside > 1) lut.ok = false;
    lut.e[c].thr = thr;
    lut.e[c].base = base;
  }
  return lut;
}
static_assert(make_quant_lut().ok, "NF4 lookup table: a cell holds more than one threshold");
static_assert(make_quant_lut(kThresholdsCuda).ok, "NF4 lookup table (CUDA thresholds): a cell holds two");

NF4_HD int32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
#endif
}

NF4_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // CPU sources build with -ffp-contract=off
#endif
}

NF4_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Cell of s in the lookup table (0..kLutCells-1), see above.
NF4_HD int32_t lut_cell(float s) {
  const int32_t bits = float_bits(add_rn(mul_rn(s, static_cast<float>(kLutScale)), kLutMagic));
  // fl(16 s + 1.5*2^23 + 16) lies in [2^23, 2^24) (ulp 1) for |16 s| < 2^22, where its bits
  // minus the bits of 1.5*2^23 equal RNE(16 s) + 16; below that (s < -1) clamp to 0.
  const int32_t c = (bits > kLutBaseBits ? bits : kLutBaseBits) - kLutBaseBits;
  return c < kLutCells - 1 ? c : kLutCells - 1;
}

// NF4 index (0..15) of the scaled value s = fl(x * inv): #{t in kThresholds : s > t}.
NF4_HD uint32_t nf4_index(float s, const LutEntry* lut) {
  const LutEntry e = lut[lut_cell(s)];
  return static_cast<uint32_t>(e.base) + (s > e.thr ? 1u : 0u);
}

// Branch-free lower bound over the 255 midpoints of the sorted dynamic code, padded to 256 with
// +inf at index 255: returns #{j : bounds[j] < s} in 0..255, then an exact tie on an odd
// count moves to the even index above (reference.nearest_dynamic_index).  The comparison is
// written as torch.searchsorted's (!(bound >= s)), so a NaN s (e.g. an offset that overflowed
// to inf) gives 255 like the reference.  Only indices <= 254 are read by the search.
NF4_HD uint32_t nearest_dynamic_index(float s, const float* bounds256) {
  uint32_t pos = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (uint32_t step = 128; step > 0; step >>= 1) {
    pos += !(bounds256[pos + step - 1] >= s) ? step : 0u;  // a NaN s goes to the end (255)
  }
  if ((pos & 1u) && pos < 255u && bounds256[pos] == s) ++pos;
  return pos;
}

}  // namespace nf4
}  // namespace lora_kernels
