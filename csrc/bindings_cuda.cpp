// Python bindings of the CUDA kernels: module lora_kernels._C_cuda.  Launches on the current
// torch CUDA stream of the inputs' device; launch errors become RuntimeError.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

#include "cuda/nf4_cuda.h"
#include "cuda/nf4_gemv.h"
#include "nf4_checks.h"
#include "nf4_common.h"
#include "nf4_docs.h"
#include "nf4_module.h"

namespace lora_kernels {
namespace {

constexpr c10::DeviceType kDev = c10::DeviceType::CUDA;

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

void check_launch(cudaError_t err, const char* fn) {
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

std::tuple<at::Tensor, at::Tensor> quantize_blocks(const at::Tensor& w, int64_t blocksize) {
  checks::check_quantize_blocks(w, blocksize, kDev);
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t n = w.numel();
  auto packed = at::empty({(n + 1) / 2}, w.options().dtype(at::kByte));
  auto absmax = at::empty({checks::ceil_div(n, blocksize)}, w.options().dtype(at::kFloat));
  check_launch(cuda::launch_quantize_blocks(w.data_ptr(), to_dtype(w.scalar_type()), n,
                                            static_cast<int>(blocksize),
                                            packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream().stream()),
               "quantize_blocks");
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> quantize_absmax_nested(const at::Tensor& absmax,
                                                          const at::Tensor& offset,
                                                          const at::Tensor& code) {
  checks::check_quantize_absmax_nested(absmax, offset, code, kDev);
  const c10::cuda::CUDAGuard guard(absmax.device());
  const int64_t nb = absmax.numel();
  auto q = at::empty({nb}, absmax.options().dtype(at::kByte));
  auto nested = at::empty({checks::ceil_div(nb, nf4::kNestedBlocksize)}, absmax.options());
  check_launch(cuda::launch_quantize_absmax_nested(
                   absmax.data_ptr<float>(), nb, offset.data_ptr<float>(), code.data_ptr<float>(),
                   q.data_ptr<uint8_t>(), nested.data_ptr<float>(),
                   c10::cuda::getCurrentCUDAStream().stream()),
               "quantize_absmax_nested");
  return {q, nested};
}

at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& absmax,
                      const std::optional<at::Tensor>& nested_absmax,
                      const std::optional<at::Tensor>& nested_code,
                      const std::optional<at::Tensor>& offset, const at::Tensor& code, int64_t n,
                      int64_t blocksize, at::ScalarType dtype,
                      const std::optional<at::Tensor>& out) {
  checks::check_dequantize(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize,
                           dtype, out, kDev);
  const c10::cuda::CUDAGuard guard(packed.device());
  const bool nested = nested_absmax.has_value() && nested_absmax->defined();
  at::Tensor result = (out.has_value() && out->defined())
                          ? *out
                          : at::empty({n}, packed.options().dtype(dtype));
  check_launch(
      cuda::launch_dequantize(packed.data_ptr<uint8_t>(),
                              nested ? nullptr : absmax.data_ptr<float>(),
                              nested ? absmax.data_ptr<uint8_t>() : nullptr,
                              nested ? nested_absmax->data_ptr<float>() : nullptr,
                              nested ? nested_code->data_ptr<float>() : nullptr,
                              nested ? offset->data_ptr<float>() : nullptr, code.data_ptr<float>(),
                              n, static_cast<int>(blocksize), to_dtype(dtype), result.data_ptr(),
                              c10::cuda::getCurrentCUDAStream().stream()),
      "dequantize");
  return result;
}

bool aligned_to(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

// A defined 2-D contiguous tensor [rows, cols] of dtype on x's device, its rows 16-byte aligned.
void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t rows, int64_t cols) {
  constexpr const char* fn = "lora_gemv";
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor");
  checks::check_same_device(t, fn, name, x, "x");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, fn, ": ", name, " must have shape [",
              rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous, got strides ", t.strides());
  TORCH_CHECK(aligned_to(t, 16), fn, ": ", name, " must be 16-byte aligned (its data pointer is not)");
}

at::Tensor lora_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const std::optional<at::Tensor>& nested_absmax,
                     const std::optional<at::Tensor>& nested_code,
                     const std::optional<at::Tensor>& offset, const at::Tensor& code, int64_t n_out,
                     int64_t blocksize, const std::optional<at::Tensor>& lora_a,
                     const std::optional<at::Tensor>& lora_b, double scale,
                     const std::optional<at::Tensor>& scale_vec, const std::optional<at::Tensor>& bias) {
  constexpr const char* fn = "lora_gemv";
  TORCH_CHECK(x.defined() && x.device().type() == kDev, fn, ": x must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, fn,
              ": x must be bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, fn, ": x must be 2-D [M, K], got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = n_out;
  TORCH_CHECK(M >= 1 && M <= cuda::kGemvMaxM, fn, ": M (rows of x) must be in 1..", cuda::kGemvMaxM, ", got ", M);
  TORCH_CHECK(N >= 1 && N <= 0x7fffffff, fn, ": N must be >= 1, got ", N);
  TORCH_CHECK(K >= cuda::kGemvKChunk && K % cuda::kGemvKChunk == 0 && K <= 0x7fffffff, fn,
              ": K must be a positive multiple of ", cuda::kGemvKChunk, ", got ", K);
  check_matrix(x, "x", x, M, K);
  checks::check_blocksize(blocksize, fn);
  TORCH_CHECK(blocksize >= cuda::kGemvKChunk && K % blocksize == 0, fn, ": the blocksize (", blocksize,
              ") must be >= ", cuda::kGemvKChunk, " and divide K (", K, ")");
  checks::check_vector(packed, fn, "packed", at::kByte, kDev);
  checks::check_same_device(packed, fn, "packed", x, "x");
  checks::check_numel(packed, fn, "packed", N * K / 2, "N * K / 2 bytes");
  TORCH_CHECK(aligned_to(packed, 8), fn, ": packed must be 8-byte aligned (its data pointer is not)");
  const bool nested = nested_absmax.has_value() && nested_absmax->defined();
  const int64_t nb = N * K / blocksize;
  checks::check_vector(absmax, fn, "absmax", nested ? at::kByte : at::kFloat, kDev);
  checks::check_same_device(absmax, fn, "absmax", x, "x");
  checks::check_numel(absmax, fn, "absmax", nb, "one per block");
  if (nested) {
    TORCH_CHECK(nested_code.has_value() && offset.has_value(), fn,
                ": nested_absmax needs nested_code and offset");
    checks::check_vector(*nested_absmax, fn, "nested_absmax", at::kFloat, kDev);
    checks::check_numel(*nested_absmax, fn, "nested_absmax", checks::ceil_div(nb, nf4::kNestedBlocksize),
                        "one per 256 blocks");
    checks::check_vector(*nested_code, fn, "nested_code", at::kFloat, kDev);
    checks::check_numel(*nested_code, fn, "nested_code", nf4::kDynamicCodeSize, "the 8-bit code");
    checks::check_scalar(*offset, fn, "offset", kDev);
    for (const at::Tensor* t : {&*nested_absmax, &*nested_code, &*offset})
      checks::check_same_device(*t, fn, "the nested tensors", x, "x");
  }
  checks::check_vector(code, fn, "code", at::kFloat, kDev);
  checks::check_same_device(code, fn, "code", x, "x");
  checks::check_numel(code, fn, "code", nf4::kNumCodes, "the NF4 levels");

  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({M, N}, x.options());
  cuda::GemvArgs a;
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.dtype = to_dtype(x.scalar_type());
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.packed = packed.data_ptr<uint8_t>();
  if (nested) {
    a.absmax_q = absmax.data_ptr<uint8_t>();
    a.nested_absmax = nested_absmax->data_ptr<float>();
    a.nested_code = nested_code->data_ptr<float>();
    a.offset = offset->data_ptr<float>();
  } else {
    a.absmax_f32 = absmax.data_ptr<float>();
  }
  a.code = code.data_ptr<float>();
  a.blocksize = static_cast<int>(blocksize);
  at::Tensor t_ws;
  const bool has_lora = lora_a.has_value() && lora_a->defined();
  TORCH_CHECK(has_lora == (lora_b.has_value() && lora_b->defined()), fn,
              ": give both lora_a and lora_b, or neither");
  if (has_lora) {
    const int64_t r = lora_a->size(0);
    TORCH_CHECK(r >= 1 && r <= cuda::kGemvMaxRank, fn, ": the rank r must be in 1..", cuda::kGemvMaxRank,
                ", got ", r);
    check_matrix(*lora_a, "lora_a", x, r, K);
    TORCH_CHECK(lora_b->dim() == 2 && lora_b->size(0) == N && lora_b->size(1) == r, fn,
                ": lora_b must have shape [", N, ", ", r, "], got ", lora_b->sizes());
    TORCH_CHECK(lora_b->scalar_type() == x.scalar_type() && lora_b->is_contiguous(), fn,
                ": lora_b must be a contiguous tensor of x's dtype");
    checks::check_same_device(*lora_b, fn, "lora_b", x, "x");
    if (scale_vec.has_value() && scale_vec->defined()) {
      checks::check_vector(*scale_vec, fn, "scale_vec", at::kFloat, kDev);
      checks::check_same_device(*scale_vec, fn, "scale_vec", x, "x");
      checks::check_numel(*scale_vec, fn, "scale_vec", r, "one per rank");
      a.scale_vec = scale_vec->data_ptr<float>();
    }
    t_ws = at::empty({M, r}, x.options().dtype(at::kFloat));
    a.lora_a = lora_a->data_ptr();
    a.lora_b = lora_b->data_ptr();
    a.r = static_cast<int>(r);
    a.scale = static_cast<float>(scale);
    a.t_ws = t_ws.data_ptr<float>();
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() || bias->scalar_type() == at::kFloat, fn,
                ": bias must have x's dtype or float32, got ", bias->scalar_type());
    checks::check_vector(*bias, fn, "bias", bias->scalar_type(), kDev);
    checks::check_same_device(*bias, fn, "bias", x, "x");
    checks::check_numel(*bias, fn, "bias", N, "one per output");
    a.bias = bias->data_ptr();
    a.bias_f32 = bias->scalar_type() == at::kFloat;
  }
  check_launch(cuda::launch_nf4_lora_gemv(a, c10::cuda::getCurrentCUDAStream().stream()), fn);
  return y;
}

}  // namespace
}  // namespace lora_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  lora_kernels::define_nf4_module(
      m, "lora_kernels CUDA kernels: NF4 quantize / nested absmax quantize / dequantize",
      &lora_kernels::quantize_blocks, &lora_kernels::quantize_absmax_nested, &lora_kernels::dequantize);
  namespace py = pybind11;
  m.def("lora_gemv", &lora_kernels::lora_gemv, lora_kernels::docs::kLoraGemv, py::arg("x"), py::arg("packed"),
        py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"), py::arg("code"),
        py::arg("n"), py::arg("blocksize"), py::arg("lora_a") = py::none(), py::arg("lora_b") = py::none(),
        py::arg("scale") = 1.0, py::arg("scale_vec") = py::none(), py::arg("bias") = py::none());
}
