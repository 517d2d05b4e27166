// Argument checks shared by csrc/bindings_cpu.cpp and csrc/bindings_cuda.cpp (torch side only).
// Every message names the function, the argument and what was expected.
//
// Messages are built by checks::fmt (std::string + std::to_string, c10::toString, Device::str),
// never by streaming numbers or shapes into a std::ostream inside the extension, and a failed check
// passes one std::string to TORCH_CHECK (c10::str forwards it untouched: no ostringstream).  Why: on
// the H100 machine (torch 2.11) seven of the eight raw _C_cuda.lora_gemv calls that segfaulted
// instead of raising streamed an integer or a shape into their message, and the two that raised
// streamed none.  Suspected cause (not reproduced off that machine): ostream number formatting goes
// through the stream locale's num_put facet, which crashes when it resolves to another libstdc++
// copy in the process; string insertion uses no facet.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <type_traits>

#include "nf4_common.h"

namespace lora_kernels {
namespace checks {

// ---- message formatting without iostreams
inline void fmt_one(std::string& s, const char* v) { s += v; }
inline void fmt_one(std::string& s, const std::string& v) { s += v; }
inline void fmt_one(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void fmt_one(std::string& s, const c10::Device& v) { s += v.str(); }
inline void fmt_one(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline void fmt_one(std::string& s, T v) {
  s += std::to_string(v);
}
inline void fmt_one(std::string& s, double v) { s += std::to_string(v); }

// fmt("a", 3, " b") -> "a3 b"
template <typename... Args>
std::string fmt(const Args&... args) {
  std::string s;
  (fmt_one(s, args), ...);
  return s;
}

inline const char* device_kind(c10::DeviceType t) {
  return t == c10::DeviceType::CUDA ? "a CUDA" : "a CPU";
}

// t is a defined, 1-D, contiguous tensor of `dtype` on a device of type `dev`.
inline void check_vector(const at::Tensor& t, const char* fn, const char* name,
                         at::ScalarType dtype, c10::DeviceType dev) {
  TORCH_CHECK(t.defined(), fmt(fn, ": ", name, " must be a tensor, got an undefined tensor"));
  TORCH_CHECK(t.device().type() == dev, fmt(fn, ": ", name, " must be on ", device_kind(dev),
                                            " device, got a tensor on ", t.device()));
  TORCH_CHECK(t.scalar_type() == dtype,
              fmt(fn, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type()));
  TORCH_CHECK(t.dim() == 1, fmt(fn, ": ", name, " must be a 1-D tensor, got a ", t.dim(),
                                "-D tensor of shape ", t.sizes()));
  TORCH_CHECK(t.is_contiguous(), fmt(fn, ": ", name, " must be contiguous (stride 1), got stride ",
                                     t.strides()));
}

inline void check_numel(const at::Tensor& t, const char* fn, const char* name, int64_t expected,
                        const char* what) {
  TORCH_CHECK(t.numel() == expected, fmt(fn, ": ", name, " must have ", expected, " elements (",
                                         what, "), got ", t.numel()));
}

// A 0-d fp32 tensor (a 1-element 1-D tensor is accepted too).
inline void check_scalar(const at::Tensor& t, const char* fn, const char* name,
                         c10::DeviceType dev) {
  TORCH_CHECK(t.defined(), fmt(fn, ": ", name, " must be a tensor, got an undefined tensor"));
  TORCH_CHECK(t.device().type() == dev, fmt(fn, ": ", name, " must be on ", device_kind(dev),
                                            " device, got a tensor on ", t.device()));
  TORCH_CHECK(t.scalar_type() == at::kFloat,
              fmt(fn, ": ", name, " must have dtype ", at::kFloat, ", got ", t.scalar_type()));
  TORCH_CHECK(t.dim() == 0 || (t.dim() == 1 && t.numel() == 1),
              fmt(fn, ": ", name, " must be a 0-d tensor (one fp32 value), got shape ", t.sizes()));
}

inline void check_same_device(const at::Tensor& t, const char* fn, const char* name,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), fmt(fn, ": ", name, " must be on the same device as ",
                                              ref_name, " (", ref.device(), "), got ", t.device()));
}

inline void check_blocksize(int64_t blocksize, const char* fn) {
  TORCH_CHECK(nf4::is_valid_blocksize(blocksize),
              fmt(fn, ": blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got ",
                  blocksize));
}

inline void check_float_dtype(at::ScalarType dtype, const char* fn, const char* name) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              fmt(fn, ": ", name, " must be torch.float32, torch.bfloat16 or torch.float16, got ",
                  dtype));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- quantize_blocks(w, blocksize)
inline void check_quantize_blocks(const at::Tensor& w, int64_t blocksize, c10::DeviceType dev) {
  const char* fn = "quantize_blocks";
  TORCH_CHECK(w.defined(), fmt(fn, ": w must be a tensor, got an undefined tensor"));
  check_float_dtype(w.scalar_type(), fn, "w");
  check_vector(w, fn, "w", w.scalar_type(), dev);
  TORCH_CHECK(w.numel() >= 1, fmt(fn, ": w must have at least 1 element, got 0"));
  check_blocksize(blocksize, fn);
}

// ---- quantize_absmax_nested(absmax, offset, code)
inline void check_quantize_absmax_nested(const at::Tensor& absmax, const at::Tensor& offset,
                                         const at::Tensor& code, c10::DeviceType dev) {
  const char* fn = "quantize_absmax_nested";
  check_vector(absmax, fn, "absmax", at::kFloat, dev);
  TORCH_CHECK(absmax.numel() >= 1, fmt(fn, ": absmax must have at least 1 element, got 0"));
  check_scalar(offset, fn, "offset", dev);
  check_same_device(offset, fn, "offset", absmax, "absmax");
  check_vector(code, fn, "code", at::kFloat, dev);
  check_numel(code, fn, "code", nf4::kDynamicCodeSize, "the sorted dynamic 8-bit code");
  check_same_device(code, fn, "code", absmax, "absmax");
}

// ---- dequantize(...)
inline void check_dequantize(const at::Tensor& packed, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& nested_absmax,
                             const std::optional<at::Tensor>& nested_code,
                             const std::optional<at::Tensor>& offset, const at::Tensor& code,
                             int64_t n, int64_t blocksize, at::ScalarType dtype,
                             const std::optional<at::Tensor>& out, c10::DeviceType dev) {
  const char* fn = "dequantize";
  TORCH_CHECK(n >= 1, fmt(fn, ": n must be >= 1, got ", n));
  check_blocksize(blocksize, fn);
  check_float_dtype(dtype, fn, "dtype");
  check_vector(packed, fn, "packed", at::kByte, dev);
  check_numel(packed, fn, "packed", (n + 1) / 2, "(n + 1) // 2 packed bytes");
  const int64_t nb = ceil_div(n, blocksize);
  const bool nested = nested_absmax.has_value() && nested_absmax->defined();
  const bool has_code = nested_code.has_value() && nested_code->defined();
  const bool has_offset = offset.has_value() && offset->defined();
  TORCH_CHECK(nested == has_code && nested == has_offset,
              fmt(fn, ": nested_absmax, nested_code and offset must be given together (double "
                      "quantization) or all be None, got nested_absmax ",
                  nested ? "given" : "None", ", nested_code ", has_code ? "given" : "None",
                  ", offset ", has_offset ? "given" : "None"));
  if (nested) {
    check_vector(absmax, fn, "absmax", at::kByte, dev);  // 8-bit codes under double quant
    check_numel(absmax, fn, "absmax", nb, "ceil(n / blocksize)");
    check_same_device(absmax, fn, "absmax", packed, "packed");
    check_vector(*nested_absmax, fn, "nested_absmax", at::kFloat, dev);
    check_numel(*nested_absmax, fn, "nested_absmax", ceil_div(nb, nf4::kNestedBlocksize),
                "ceil(ceil(n / blocksize) / 256)");
    check_same_device(*nested_absmax, fn, "nested_absmax", packed, "packed");
    check_vector(*nested_code, fn, "nested_code", at::kFloat, dev);
    check_numel(*nested_code, fn, "nested_code", nf4::kDynamicCodeSize, "the dynamic 8-bit code");
    check_same_device(*nested_code, fn, "nested_code", packed, "packed");
    check_scalar(*offset, fn, "offset", dev);
    check_same_device(*offset, fn, "offset", packed, "packed");
  } else {
    check_vector(absmax, fn, "absmax", at::kFloat, dev);
    check_numel(absmax, fn, "absmax", nb, "ceil(n / blocksize)");
    check_same_device(absmax, fn, "absmax", packed, "packed");
  }
  check_vector(code, fn, "code", at::kFloat, dev);
  check_numel(code, fn, "code", nf4::kNumCodes, "the 16 NF4 levels");
  check_same_device(code, fn, "code", packed, "packed");
  if (out.has_value() && out->defined()) {
    check_vector(*out, fn, "out", dtype, dev);
    check_numel(*out, fn, "out", n, "n");
    check_same_device(*out, fn, "out", packed, "packed");
  }
}

}  // namespace checks
}  // namespace lora_kernels
