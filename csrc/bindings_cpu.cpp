// Python bindings of the CPU kernels: module lora_kernels._C.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "cpu/nf4_cpu.h"
#include "nf4_checks.h"
#include "nf4_common.h"
#include "nf4_docs.h"
#include "nf4_module.h"

namespace lora_kernels {
namespace {

constexpr c10::DeviceType kDev = c10::DeviceType::CPU;

std::tuple<at::Tensor, at::Tensor> quantize_blocks(const at::Tensor& w, int64_t blocksize) {
  checks::check_quantize_blocks(w, blocksize, kDev);
  const int64_t n = w.numel();
  auto packed = at::empty({(n + 1) / 2}, w.options().dtype(at::kByte));
  auto absmax = at::empty({checks::ceil_div(n, blocksize)}, w.options().dtype(at::kFloat));
  cpu::quantize_blocks(w.data_ptr(), w.scalar_type(), n, blocksize, packed.data_ptr<uint8_t>(),
                       absmax.data_ptr<float>());
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> quantize_absmax_nested(const at::Tensor& absmax,
                                                          const at::Tensor& offset,
                                                          const at::Tensor& code) {
  checks::check_quantize_absmax_nested(absmax, offset, code, kDev);
  const int64_t nb = absmax.numel();
  auto q = at::empty({nb}, absmax.options().dtype(at::kByte));
  auto nested = at::empty({checks::ceil_div(nb, nf4::kNestedBlocksize)}, absmax.options());
  cpu::quantize_absmax_nested(absmax.data_ptr<float>(), nb, *offset.data_ptr<float>(),
                              code.data_ptr<float>(), q.data_ptr<uint8_t>(),
                              nested.data_ptr<float>());
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
  const bool nested = nested_absmax.has_value() && nested_absmax->defined();
  at::Tensor result = (out.has_value() && out->defined())
                          ? *out
                          : at::empty({n}, packed.options().dtype(dtype));
  cpu::dequantize(packed.data_ptr<uint8_t>(), nested ? nullptr : absmax.data_ptr<float>(),
                  nested ? absmax.data_ptr<uint8_t>() : nullptr,
                  nested ? nested_absmax->data_ptr<float>() : nullptr,
                  nested ? nested_code->data_ptr<float>() : nullptr,
                  nested ? *offset->data_ptr<float>() : 0.0f, code.data_ptr<float>(), n,
                  blocksize, dtype, result.data_ptr());
  return result;
}

}  // namespace
}  // namespace lora_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  lora_kernels::define_nf4_module(
      m, "lora_kernels CPU kernels: NF4 quantize / nested absmax quantize / dequantize",
      &lora_kernels::quantize_blocks, &lora_kernels::quantize_absmax_nested, &lora_kernels::dequantize);
}
