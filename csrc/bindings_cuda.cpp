// Python bindings of the CUDA kernels: module lora_kernels._C_cuda.  Launches on the current
// torch CUDA stream of the inputs' device; launch errors become RuntimeError.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

#include "cuda/nf4_cuda.h"
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

}  // namespace
}  // namespace lora_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  lora_kernels::define_nf4_module(
      m, "lora_kernels CUDA kernels: NF4 quantize / nested absmax quantize / dequantize",
      &lora_kernels::quantize_blocks, &lora_kernels::quantize_absmax_nested, &lora_kernels::dequantize);
}
