// CPU kernels of the NF4 (+ double quantization) format, bit-exact with
// lora_kernels/reference.py.  Built with -ffp-contract=off (no FMA contraction): every fp32
// product/sum is rounded separately, as in the reference.  Parallel over quantization blocks
// with at::parallel_for; the inner loops are plain arrays the compiler vectorizes (conversion,
// max |x| on the bit patterns, scaling); the NF4 index uses the same lookup table as the CUDA
// kernel (nf4_common.h), so CPU tests also exercise the CUDA index logic.

#include "cpu/nf4_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "nf4_common.h"

namespace lora_kernels {
namespace cpu {
namespace {

using nf4::LutEntry;
using nf4::QuantLut;

constexpr QuantLut kLut = nf4::make_quant_lut();
constexpr uint32_t kAbsMask = 0x7fffffffu;
// Parallel grain: at least this many elements per task.
constexpr int64_t kGrainElems = 1 << 15;

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Convert len elements to fp32 (exact for all three types).
inline void to_float(const float* src, int64_t len, float* dst) {
  std::memcpy(dst, src, static_cast<size_t>(len) * sizeof(float));
}
inline void to_float(const c10::BFloat16* src, int64_t len, float* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < len; ++i) dst[i] = float_of(static_cast<uint32_t>(s[i]) << 16);
}
inline void to_float(const c10::Half* src, int64_t len, float* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < len; ++i) dst[i] = c10::detail::fp16_ieee_to_fp32_value(s[i]);
}

// max |x| over len floats, compared as bit patterns of |x| (same order as the floats for
// non-NaN values; a NaN wins, as in torch.amax).  Integer max vectorizes without -ffast-math.
inline float max_abs(const float* x, int64_t len) {
  uint32_t m = 0;
  for (int64_t i = 0; i < len; ++i) m = std::max(m, bits_of(x[i]) & kAbsMask);
  return float_of(m);
}

// fl(1 / max(absmax, 1e-38)); NaN stays NaN (as torch's clamp).
inline float inv_scale(float amax) {
  return 1.0f / (amax < nf4::kMinAbsmax ? nf4::kMinAbsmax : amax);
}

template <typename T>
void quantize_blocks_impl(const T* w, int64_t n, int64_t bs, uint8_t* packed, float* absmax) {
  const int64_t nblocks = (n + bs - 1) / bs;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / bs);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    alignas(64) float x[nf4::kMaxBlocksize];
    alignas(64) float s[nf4::kMaxBlocksize];
    alignas(64) uint8_t idx[nf4::kMaxBlocksize + 2];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * bs;  // even: bs is
      const int64_t len = std::min(bs, n - start);
      to_float(w + start, len, x);
      const float amax = max_abs(x, len);
      absmax[b] = amax;
      const float inv = inv_scale(amax);
      for (int64_t i = 0; i < len; ++i) s[i] = x[i] * inv;
      for (int64_t i = 0; i < len; ++i) idx[i] = static_cast<uint8_t>(nf4::nf4_index(s[i], kLut.e));
      idx[len] = nf4::kPadNibble;  // only read when len is odd (the last block of an odd n)
      uint8_t* dst = packed + start / 2;
      const int64_t nbytes = (len + 1) / 2;
      for (int64_t j = 0; j < nbytes; ++j)
        dst[j] = static_cast<uint8_t>((idx[2 * j] << 4) | idx[2 * j + 1]);
    }
  });
}

template <typename Out>
inline Out from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float v) {
  return c10::BFloat16(v);  // round to nearest even
}
template <>
inline c10::Half from_float<c10::Half>(float v) {
  return c10::Half(v);  // round to nearest even
}

template <typename Out>
void dequantize_impl(const uint8_t* packed, const float* absmax_f32, const uint8_t* absmax_q,
                     const float* nested_absmax, const float* nested_code, float offset,
                     const float* code, int64_t n, int64_t bs, Out* out) {
  const int64_t nblocks = (n + bs - 1) / bs;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / bs);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float a;
      if (absmax_q != nullptr) {
        const float prod = nested_code[absmax_q[b]] * nested_absmax[b / nf4::kNestedBlocksize];
        a = prod + offset;  // two roundings (-ffp-contract=off)
      } else {
        a = absmax_f32[b];
      }
      // The block takes only 16 distinct values: fl(code[k] * a) in the output dtype.
      Out table[nf4::kNumCodes];
      for (int k = 0; k < nf4::kNumCodes; ++k) table[k] = from_float<Out>(code[k] * a);
      const int64_t start = b * bs;
      const int64_t len = std::min(bs, n - start);
      const uint8_t* src = packed + start / 2;
      Out* dst = out + start;
      const int64_t pairs = len / 2;
      for (int64_t j = 0; j < pairs; ++j) {
        const uint8_t byte = src[j];
        dst[2 * j] = table[byte >> 4];
        dst[2 * j + 1] = table[byte & 15];
      }
      if (len & 1) dst[len - 1] = table[src[pairs] >> 4];
    }
  });
}

}  // namespace

void quantize_blocks(const void* w, c10::ScalarType w_dtype, int64_t n, int64_t blocksize,
                     uint8_t* packed, float* absmax) {
  switch (w_dtype) {
    case c10::ScalarType::Float:
      return quantize_blocks_impl(static_cast<const float*>(w), n, blocksize, packed, absmax);
    case c10::ScalarType::BFloat16:
      return quantize_blocks_impl(static_cast<const c10::BFloat16*>(w), n, blocksize, packed,
                                  absmax);
    case c10::ScalarType::Half:
      return quantize_blocks_impl(static_cast<const c10::Half*>(w), n, blocksize, packed, absmax);
    default:
      TORCH_CHECK(false, "quantize_blocks: unsupported dtype ", w_dtype);
  }
}

void quantize_absmax_nested(const float* absmax, int64_t nb, float offset, const float* code,
                            uint8_t* q, float* nested_absmax) {
  // midpoints of neighbouring code entries, fl(fl(a + b) * 0.5); +inf pad (never read).
  alignas(64) float bounds[nf4::kDynamicCodeSize];
  for (int j = 0; j + 1 < nf4::kDynamicCodeSize; ++j) bounds[j] = (code[j] + code[j + 1]) * 0.5f;
  bounds[nf4::kDynamicCodeSize - 1] = std::numeric_limits<float>::infinity();
  constexpr int64_t kB = nf4::kNestedBlocksize;
  const int64_t nnb = (nb + kB - 1) / kB;
  at::parallel_for(0, nnb, std::max<int64_t>(1, kGrainElems / kB), [&](int64_t j0, int64_t j1) {
    alignas(64) float d[kB];
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t start = j * kB;
      const int64_t len = std::min(kB, nb - start);
      for (int64_t i = 0; i < len; ++i) d[i] = absmax[start + i] - offset;
      const float m = max_abs(d, len);
      nested_absmax[j] = m;
      if (m == 0.0f) {  // all values equal the offset: index 0 (bitsandbytes' convention)
        std::memset(q + start, 0, static_cast<size_t>(len));
        continue;
      }
      const float inv = inv_scale(m);
      for (int64_t i = 0; i < len; ++i)
        q[start + i] = static_cast<uint8_t>(nf4::nearest_dynamic_index(d[i] * inv, bounds));
    }
  });
}

void dequantize(const uint8_t* packed, const float* absmax_f32, const uint8_t* absmax_q,
                const float* nested_absmax, const float* nested_code, float offset,
                const float* code, int64_t n, int64_t blocksize, c10::ScalarType out_dtype,
                void* out) {
  switch (out_dtype) {
    case c10::ScalarType::Float:
      return dequantize_impl(packed, absmax_f32, absmax_q, nested_absmax, nested_code, offset,
                             code, n, blocksize, static_cast<float*>(out));
    case c10::ScalarType::BFloat16:
      return dequantize_impl(packed, absmax_f32, absmax_q, nested_absmax, nested_code, offset,
                             code, n, blocksize, static_cast<c10::BFloat16*>(out));
    case c10::ScalarType::Half:
      return dequantize_impl(packed, absmax_f32, absmax_q, nested_absmax, nested_code, offset,
                             code, n, blocksize, static_cast<c10::Half*>(out));
    default:
      TORCH_CHECK(false, "dequantize: unsupported dtype ", out_dtype);
  }
}

}  // namespace cpu
}  // namespace lora_kernels
