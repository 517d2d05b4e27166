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
    default: TORCH_CHECK(false, checks::fmt("unsupported dtype ", t));
  }
}

void check_launch(cudaError_t err, const char* fn) {
  TORCH_CHECK(err == cudaSuccess, checks::fmt(fn, ": CUDA kernel launch failed: ", cudaGetErrorName(err), " (",
                                               cudaGetErrorString(err), ")"));
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

// Staging floats (one per torch CTA: the returned count) + the barrier counter of
// launch_absmax_mean_nested, in one fp32 buffer.
std::pair<at::Tensor, int> mean_workspace(int64_t nb, const at::TensorOptions& opts, const char* fn) {
  int staging = 0;
  const cudaError_t err = cuda::absmax_mean_workspace(nb, &staging);
  TORCH_CHECK(err == cudaSuccess, checks::fmt(fn, ": torch.mean's reduction layout is not replayed for ",
                                               nb, " values on this device"));
  return {at::empty({staging + 1}, opts.dtype(at::kFloat)), staging};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4_double(
    const at::Tensor& w, int64_t blocksize, const at::Tensor& nf4_code, const at::Tensor& dyn_code,
    bool shfl_up) {
  const char* fn = "quantize_nf4_double";
  checks::check_quantize_blocks(w, blocksize, kDev);
  checks::check_vector(nf4_code, fn, "nf4_code", at::kFloat, kDev);
  checks::check_numel(nf4_code, fn, "nf4_code", nf4::kNumCodes, "the NF4 code");
  checks::check_same_device(nf4_code, fn, "nf4_code", w, "w");
  checks::check_vector(dyn_code, fn, "dyn_code", at::kFloat, kDev);
  checks::check_numel(dyn_code, fn, "dyn_code", nf4::kDynamicCodeSize, "the sorted dynamic 8-bit code");
  checks::check_same_device(dyn_code, fn, "dyn_code", w, "w");
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t n = w.numel();
  const int64_t nb = checks::ceil_div(n, blocksize);
  auto [work, staging] = mean_workspace(nb, w.options(), fn);
  auto packed = at::empty({(n + 1) / 2}, w.options().dtype(at::kByte));
  auto absmax = at::empty({nb}, w.options().dtype(at::kFloat));
  auto q = at::empty({nb}, w.options().dtype(at::kByte));
  auto nested = at::empty({checks::ceil_div(nb, nf4::kNestedBlocksize)}, absmax.options());
  auto offset = at::empty({}, absmax.options());
  auto code = at::empty({nf4::kNumCodes}, absmax.options());
  auto nested_code = at::empty({nf4::kDynamicCodeSize}, absmax.options());
  auto* arrived = reinterpret_cast<uint32_t*>(work.data_ptr<float>() + staging);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(cuda::launch_quantize_blocks(w.data_ptr(), to_dtype(w.scalar_type()), n,
                                            static_cast<int>(blocksize), packed.data_ptr<uint8_t>(),
                                            absmax.data_ptr<float>(), stream, arrived),
               fn);
  check_launch(cuda::launch_absmax_mean_nested(
                   absmax.data_ptr<float>(), nb, staging, shfl_up, work.data_ptr<float>(), arrived,
                   offset.data_ptr<float>(), dyn_code.data_ptr<float>(), q.data_ptr<uint8_t>(),
                   nested.data_ptr<float>(), nf4_code.data_ptr<float>(), code.data_ptr<float>(),
                   nested_code.data_ptr<float>(), stream),
               fn);
  return {packed, q, nested, offset, code, nested_code};
}

at::Tensor torch_order_mean(const at::Tensor& x, bool shfl_up, int64_t wait_ns) {
  const char* fn = "torch_order_mean";
  checks::check_vector(x, fn, "x", at::kFloat, kDev);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, checks::fmt(fn, ": x must be 16-byte aligned"));
  auto [work, staging] = mean_workspace(x.numel(), x.options(), fn);
  work.zero_();
  auto offset = at::empty({}, x.options());
  check_launch(cuda::launch_absmax_mean_nested(
                   x.data_ptr<float>(), x.numel(), staging, shfl_up, work.data_ptr<float>(),
                   reinterpret_cast<uint32_t*>(work.data_ptr<float>() + staging), offset.data_ptr<float>(),
                   nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                   c10::cuda::getCurrentCUDAStream().stream(), wait_ns),
               fn);
  return offset;
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

// ---- lora_gemv argument validation.  Every check runs before anything is allocated, launched or
// guarded, and returns a message instead of throwing; lora_gemv raises once, from one place, with a
// message built without iostreams (checks::fmt, see csrc/nf4_checks.h for why).  Tensors are only
// touched after the checks that make the access valid (defined, device, dtype, dim).
using checks::fmt;

std::string bad_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& x) {
  constexpr const char* fn = "lora_gemv";
  if (!t.defined()) return fmt(fn, ": ", name, " must be a tensor, got an undefined tensor");
  if (t.device().type() != kDev) return fmt(fn, ": ", name, " must be on a CUDA device, got a tensor on ", t.device());
  if (t.device() != x.device())
    return fmt(fn, ": ", name, " must be on the same device as x (", x.device(), "), got ", t.device());
  if (t.scalar_type() != dtype) return fmt(fn, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  if (t.dim() != 1) return fmt(fn, ": ", name, " must be a 1-D tensor, got shape ", t.sizes());
  if (!t.is_contiguous()) return fmt(fn, ": ", name, " must be contiguous (stride 1), got stride ", t.strides());
  return {};
}

std::string bad_numel(const at::Tensor& t, const char* name, int64_t expected, const char* what) {
  if (t.numel() == expected) return {};
  return fmt("lora_gemv: ", name, " must have ", expected, " elements (", what, "), got ", t.numel());
}

// A defined 2-D contiguous tensor [rows, cols] of x's dtype on x's device, 16-byte aligned.
std::string bad_matrix(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t rows, int64_t cols) {
  constexpr const char* fn = "lora_gemv";
  if (!t.defined()) return fmt(fn, ": ", name, " must be a tensor");
  if (t.device() != x.device())
    return fmt(fn, ": ", name, " must be on the same device as x (", x.device(), "), got ", t.device());
  if (t.scalar_type() != x.scalar_type())
    return fmt(fn, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ", t.scalar_type());
  if (t.dim() != 2 || t.size(0) != rows || t.size(1) != cols)
    return fmt(fn, ": ", name, " must have shape [", rows, ", ", cols, "], got ", t.sizes());
  if (!t.is_contiguous()) return fmt(fn, ": ", name, " must be contiguous, got strides ", t.strides());
  if (!aligned_to(t, 16)) return fmt(fn, ": ", name, " must be 16-byte aligned (its data pointer is not)");
  return {};
}

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

std::string validate_lora_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& offset, const at::Tensor& code, int64_t N,
                               int64_t blocksize, const std::optional<at::Tensor>& lora_a,
                               const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& scale_vec,
                               const std::optional<at::Tensor>& bias, int64_t variant) {
  constexpr const char* fn = "lora_gemv";
  std::string e;
  if (variant < 1 || variant > 5) return fmt(fn, ": variant must be 1, 2, 3, 4 or 5, got ", variant);
  if (!x.defined() || x.device().type() != kDev) return fmt(fn, ": x must be a CUDA tensor");
  if (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kHalf)
    return fmt(fn, ": x must be bfloat16 or float16, got ", x.scalar_type());
  if (x.dim() != 2)
    return fmt(fn, ": x must be a contiguous [..., K] tensor with K > 0, got shape ", x.sizes(), " and strides ",
               x.strides());
  const int64_t M = x.size(0), K = x.size(1);
  if (M < 1 || M > cuda::kGemvMaxM) return fmt(fn, ": M (rows of x) must be in 1..", cuda::kGemvMaxM, ", got ", M);
  if (N < 1 || N > 0x7fffffff) return fmt(fn, ": N must be >= 1, got ", N);
  if (K < cuda::kGemvKChunk || K % cuda::kGemvKChunk != 0 || K > 0x7fffffff)
    return fmt(fn, ": K must be a positive multiple of ", cuda::kGemvKChunk, ", got ", K);
  if (!(e = bad_matrix(x, "x", x, M, K)).empty()) return e;
  if (!nf4::is_valid_blocksize(blocksize))
    return fmt(fn, ": blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got ", blocksize);
  if (blocksize < cuda::kGemvKChunk || K % blocksize != 0)
    return fmt(fn, ": the blocksize (", blocksize, ") must be >= ", cuda::kGemvKChunk, " and divide K (", K, ")");
  if (!(e = bad_vector(packed, "packed", at::kByte, x)).empty()) return e;
  if (!(e = bad_numel(packed, "packed", N * K / 2, "N * K / 2 bytes")).empty()) return e;
  if (!aligned_to(packed, 8)) return fmt(fn, ": packed must be 8-byte aligned (its data pointer is not)");
  const bool nested = given(nested_absmax);
  const int64_t nb = N * K / blocksize;
  if (!(e = bad_vector(absmax, "absmax", nested ? at::kByte : at::kFloat, x)).empty()) return e;
  if (!(e = bad_numel(absmax, "absmax", nb, "one per block")).empty()) return e;
  if (nested) {
    if (!given(nested_code) || !given(offset)) return fmt(fn, ": nested_absmax needs nested_code and offset");
    if (!(e = bad_vector(*nested_absmax, "nested_absmax", at::kFloat, x)).empty()) return e;
    if (!(e = bad_numel(*nested_absmax, "nested_absmax", checks::ceil_div(nb, nf4::kNestedBlocksize),
                        "one per 256 blocks")).empty())
      return e;
    if (!(e = bad_vector(*nested_code, "nested_code", at::kFloat, x)).empty()) return e;
    if (!(e = bad_numel(*nested_code, "nested_code", nf4::kDynamicCodeSize, "the 8-bit code")).empty()) return e;
    const at::Tensor& o = *offset;
    if (o.device() != x.device() || o.scalar_type() != at::kFloat || o.numel() != 1 || o.dim() > 1)
      return fmt(fn, ": offset must be a 0-d fp32 tensor on x's device, got ", o.scalar_type(), " of shape ",
                 o.sizes(), " on ", o.device());
  }
  if (!(e = bad_vector(code, "code", at::kFloat, x)).empty()) return e;
  if (!(e = bad_numel(code, "code", nf4::kNumCodes, "the NF4 levels")).empty()) return e;
  const bool has_lora = given(lora_a);
  if (has_lora != given(lora_b)) return fmt(fn, ": give both lora_a and lora_b, or neither");
  if (has_lora) {
    const at::Tensor& a = *lora_a;
    const at::Tensor& b = *lora_b;
    if (a.dim() != 2) return fmt(fn, ": lora_a must have shape [r, ", K, "], got ", a.sizes());
    const int64_t r = a.size(0);
    if (r < 1 || r > cuda::kGemvMaxRank)
      return fmt(fn, ": the rank r must be in 1..", cuda::kGemvMaxRank, ", got ", r);
    if (!(e = bad_matrix(a, "lora_a", x, r, K)).empty()) return e;
    if (b.device() != x.device())
      return fmt(fn, ": lora_b must be on the same device as x (", x.device(), "), got ", b.device());
    if (b.dim() != 2 || b.size(0) != N || b.size(1) != r)
      return fmt(fn, ": lora_b must have shape [", N, ", ", r, "], got ", b.sizes());
    if (b.scalar_type() != x.scalar_type() || !b.is_contiguous())
      return fmt(fn, ": lora_b must be a contiguous tensor of x's dtype");
    if (given(scale_vec)) {
      if (!(e = bad_vector(*scale_vec, "scale_vec", at::kFloat, x)).empty()) return e;
      if (!(e = bad_numel(*scale_vec, "scale_vec", r, "one per rank")).empty()) return e;
    }
  }
  if (given(bias)) {
    const at::ScalarType bt = bias->scalar_type();
    if (bt != x.scalar_type() && bt != at::kFloat)
      return fmt(fn, ": bias must have x's dtype or float32, got ", bt);
    if (!(e = bad_vector(*bias, "bias", bt, x)).empty()) return e;
    if (!(e = bad_numel(*bias, "bias", N, "one per output")).empty()) return e;
  }
  return {};
}

// variant 1: csrc/cuda/nf4_gemv.cu (T kernel + GEMV); variant 2: csrc/cuda/nf4_gemv_v2.cu (one
// persistent launch; falls back to variant 1 where its configuration does not fit the device);
// variant 3: csrc/cuda/nf4_gemv_v3.cu (CUDA-core GEMV for small M; falls back to variant 1 where
// nf4_lora_gemv_v3_config says no, e.g. M above its limit); variant 4: csrc/cuda/nf4_gemv_v4.cu
// (tensor cores, weight as the MMA's A operand, persistent grid; falls back to variant 1 where
// nf4_lora_gemv_v4_config says no); variant 5: csrc/cuda/nf4_gemv_v5.cu (variant 4's MMA fed from a
// per-warp cp.async ring; falls back to variant 1 where nf4_lora_gemv_v5_config says no).
at::Tensor lora_gemv(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& absmax,
                     const std::optional<at::Tensor>& nested_absmax,
                     const std::optional<at::Tensor>& nested_code,
                     const std::optional<at::Tensor>& offset, const at::Tensor& code, int64_t n_out,
                     int64_t blocksize, const std::optional<at::Tensor>& lora_a_in,
                     const std::optional<at::Tensor>& lora_b, double scale,
                     const std::optional<at::Tensor>& scale_vec, const std::optional<at::Tensor>& bias,
                     int64_t variant) {
  constexpr const char* fn = "lora_gemv";
  // x [..., K] is read as [M, K] and y is [..., N]; packed may have any shape (bitsandbytes keeps it
  // [N K / 2, 1]).  Views of contiguous tensors only: a bad one is left to validate_lora_gemv's message.
  const bool flat_x = x_in.defined() && x_in.dim() >= 1 && x_in.dim() != 2 && x_in.is_contiguous() &&
                      x_in.size(-1) > 0;
  at::Tensor x = flat_x ? x_in.view({-1, x_in.size(-1)}) : x_in;
  const at::Tensor packed =
      packed_in.defined() && packed_in.dim() != 1 && packed_in.is_contiguous() ? packed_in.view(-1) : packed_in;
  // 16-byte aligned x and lora_a (the kernels read them in 16-byte vectors): an offset view is copied
  std::optional<at::Tensor> lora_a = lora_a_in;
  if (x.defined() && x.is_contiguous() && x.numel() > 0 && !aligned_to(x, 16)) x = x.clone();
  if (given(lora_a) && lora_a->is_contiguous() && lora_a->numel() > 0 && !aligned_to(*lora_a, 16))
    lora_a = lora_a->clone();
  const std::string err = validate_lora_gemv(x, packed, absmax, nested_absmax, nested_code, offset, code, n_out,
                                             blocksize, lora_a, lora_b, scale_vec, bias, variant);
  TORCH_CHECK(err.empty(), err);

  const int64_t M = x.size(0), K = x.size(1), N = n_out;
  const bool nested = given(nested_absmax);
  const bool has_lora = given(lora_a);
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> y_sizes = x_in.sizes().vec();
  if (!flat_x) y_sizes = {M, N};
  y_sizes.back() = N;
  at::Tensor y;  // variant 5 allocates it after its GEMV is launched (the host time before the launch is
                 // the eager call's latency); the others before they launch
  cuda::GemvArgs a;
  a.x = x.data_ptr();
  a.dtype = x.scalar_type() == at::kBFloat16 ? cuda::DType::kBFloat16 : cuda::DType::kFloat16;
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
  if (has_lora) {
    a.lora_a = lora_a->data_ptr();
    a.lora_b = lora_b->data_ptr();
    a.r = static_cast<int>(lora_a->size(0));
    a.scale = static_cast<float>(scale);
    if (given(scale_vec)) a.scale_vec = scale_vec->data_ptr<float>();
  }
  if (given(bias)) {
    a.bias = bias->data_ptr();
    a.bias_f32 = bias->scalar_type() == at::kFloat;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  size_t ws_bytes = 0;
  if (variant == 5 && cuda::nf4_lora_gemv_v5_config(a, &ws_bytes)) {
    at::Tensor ws;
    if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    struct YCtx {
      at::Tensor* y;
      const std::vector<int64_t>* sizes;
      at::TensorOptions opts;
    } ctx{&y, &y_sizes, x.options()};
    const cuda::YAlloc alloc = [](void* c) -> void* {
      auto* k = static_cast<YCtx*>(c);
      *k->y = at::empty(*k->sizes, k->opts);
      return k->y->data_ptr();
    };
    check_launch(cuda::launch_nf4_lora_gemv_v5(a, ws_bytes > 0 ? ws.data_ptr() : nullptr, ws_bytes, stream, alloc, &ctx),
                 fn);
    return y;
  }
  y = at::empty(y_sizes, x.options());
  a.y = y.data_ptr();
  if (variant == 2 && cuda::nf4_lora_gemv_v2_config(a, &ws_bytes)) {
    at::Tensor ws;
    if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    check_launch(cuda::launch_nf4_lora_gemv_v2(a, ws_bytes > 0 ? ws.data_ptr() : nullptr, ws_bytes, stream), fn);
    return y;
  }
  if (variant == 3 && cuda::nf4_lora_gemv_v3_config(a, &ws_bytes)) {
    at::Tensor ws;
    if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    check_launch(cuda::launch_nf4_lora_gemv_v3(a, ws_bytes > 0 ? ws.data_ptr() : nullptr, ws_bytes, stream), fn);
    return y;
  }
  if (variant == 4 && cuda::nf4_lora_gemv_v4_config(a, &ws_bytes)) {
    at::Tensor ws;
    if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    check_launch(cuda::launch_nf4_lora_gemv_v4(a, ws_bytes > 0 ? ws.data_ptr() : nullptr, ws_bytes, stream), fn);
    return y;
  }
  at::Tensor t_ws;
  if (has_lora) {
    t_ws = at::empty({M, static_cast<int64_t>(a.r)}, x.options().dtype(at::kFloat));
    a.t_ws = t_ws.data_ptr<float>();
  }
  check_launch(cuda::launch_nf4_lora_gemv(a, stream), fn);
  return y;
}

// The GemvArgs the variant planners see for these sizes (bf16; r = 0: no low-rank term; the data
// pointers of A and B only need to be non-null), or false when the sizes are out of range.
bool planner_args(int64_t M, int64_t N, int64_t K, int64_t blocksize, int64_t r, cuda::GemvArgs* a) {
  if (M < 1 || M > cuda::kGemvMaxM || N < 1 || N > 0x7fffffff || K < 1 || K > 0x7fffffff || r < 0 ||
      r > cuda::kGemvMaxRank || !nf4::is_valid_blocksize(blocksize))
    return false;
  static const char dummy = 0;
  a->M = static_cast<int>(M);
  a->N = static_cast<int>(N);
  a->K = static_cast<int>(K);
  a->blocksize = static_cast<int>(blocksize);
  a->dtype = cuda::DType::kBFloat16;
  if (r > 0) {
    a->lora_a = &dummy;
    a->lora_b = &dummy;
    a->r = static_cast<int>(r);
  }
  return true;
}

// Device workspace bytes variant 2 needs for these sizes on the current device (r = 0: no low-rank
// term), or -1 when lora_gemv(..., variant=2) would fall back to variant 1 (tests, benchmarks).
int64_t lora_gemv_v2_workspace(int64_t M, int64_t N, int64_t K, int64_t blocksize, int64_t r) {
  cuda::GemvArgs a;
  size_t ws = 0;
  if (!planner_args(M, N, K, blocksize, r, &a) || !cuda::nf4_lora_gemv_v2_config(a, &ws)) return -1;
  return static_cast<int64_t>(ws);
}

// Whether lora_gemv(..., variant=3) runs variant 3 for these sizes on the current device (r = 0: no
// low-rank term; bf16; the answer does not depend on the dtype or on double quantization), or falls
// back to variant 1 (tests, benchmarks).  Reads $LORA_KERNELS_GEMV_V3_MAX_M like the call does.
bool lora_gemv_v3_supported(int64_t M, int64_t N, int64_t K, int64_t blocksize, int64_t r) {
  cuda::GemvArgs a;
  size_t ws = 0;
  return planner_args(M, N, K, blocksize, r, &a) && cuda::nf4_lora_gemv_v3_config(a, &ws);
}

// Whether lora_gemv(..., variant=4) runs variant 4 for these sizes on the current device (r = 0: no
// low-rank term; bf16, no double quantization: the answer does not depend on either), or falls back
// to variant 1 (tests, benchmarks).
bool lora_gemv_v4_supported(int64_t M, int64_t N, int64_t K, int64_t blocksize, int64_t r) {
  cuda::GemvArgs a;
  size_t ws = 0;
  return planner_args(M, N, K, blocksize, r, &a) && cuda::nf4_lora_gemv_v4_config(a, &ws);
}

// What lora_gemv(..., variant=5) would do for these sizes on the current device (r = 0: no low-rank
// term; bf16; double_quant: absmax stored as 8-bit codes, whose 4-byte words must lie in the tensor);
// all 0 when it falls back to variant 1 (tests, benchmarks).  The three planners below read one field:
// the K slices, the x mode (1 = all of x in shared memory, 2 = x staged per CTA's K slices), the ring
// depth per warp (4, or 6 under $LORA_KERNELS_GEMV_V5_STAGES=6 where x still fits beside it).
cuda::V5Plan v5_plan(int64_t M, int64_t N, int64_t K, int64_t blocksize, int64_t r, bool double_quant) {
  cuda::GemvArgs a;
  if (!planner_args(M, N, K, blocksize, r, &a)) return {};
  static const uint32_t aligned_dummy[4] = {0, 0, 0, 0};
  if (double_quant) a.absmax_q = reinterpret_cast<const uint8_t*>(aligned_dummy);
  return cuda::nf4_lora_gemv_v5_plan(a);
}

int64_t lora_gemv_v5_slices(int64_t M, int64_t N, int64_t K, int64_t blocksize, int64_t r, bool double_quant) {
  return v5_plan(M, N, K, blocksize, r, double_quant).slices;
}

int64_t lora_gemv_v5_mode(int64_t M, int64_t N, int64_t K, int64_t blocksize, int64_t r, bool double_quant) {
  return v5_plan(M, N, K, blocksize, r, double_quant).mode;
}

int64_t lora_gemv_v5_stages(int64_t M, int64_t N, int64_t K, int64_t blocksize, int64_t r, bool double_quant) {
  return v5_plan(M, N, K, blocksize, r, double_quant).stages;
}

}  // namespace
}  // namespace lora_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  lora_kernels::define_nf4_module(
      m, "lora_kernels CUDA kernels: NF4 quantize / nested absmax quantize / dequantize",
      &lora_kernels::quantize_blocks, &lora_kernels::quantize_absmax_nested, &lora_kernels::dequantize);
  namespace py = pybind11;
  static const std::string gemv_doc =
      std::string(lora_kernels::docs::kLoraGemv) +
      "\nvariant: 1 (default) = csrc/cuda/nf4_gemv.cu (a T = x·Aᵀ kernel, then the GEMV);\n"
      "2 = csrc/cuda/nf4_gemv_v2.cu (one persistent launch; same math, falls back to 1 where it\n"
      "does not fit the device); 3 = csrc/cuda/nf4_gemv_v3.cu (CUDA-core GEMV for small M: M <= 4\n"
      "unless LORA_KERNELS_GEMV_V3_MAX_M (<= 8) says otherwise; falls back to 1 beyond that, see\n"
      "lora_gemv_v3_supported); 4 = csrc/cuda/nf4_gemv_v4.cu (tensor cores with the weight as the MMA's A\n"
      "operand, persistent grid, M <= 16; falls back to 1 where it does not fit, see lora_gemv_v4_supported);\n"
      "5 = csrc/cuda/nf4_gemv_v5.cu (variant 4's MMA fed from a per-warp cp.async ring, M <= 16, K % 256 == 0;\n"
      "falls back to 1 where it does not fit, see lora_gemv_v5_slices).\n"
      "lora_kernels reads LORA_KERNELS_GEMV_VARIANT.";
  m.def("quantize_nf4_double", &lora_kernels::quantize_nf4_double,
        "quantize_blocks + torch.mean of the absmax + quantize_absmax_nested in two launches, the mean\n"
        "in the order of torch's CUDA reduction (shfl_up: torch < 2.13's warp-shuffle order; the caller\n"
        "checks the order against torch.mean first, see torch_order_mean).  Needs\n"
        "ceil(numel / blocksize) >= 2048.  Returns (packed, absmax_q, nested_absmax, offset [0-d],\n"
        "code [16], nested_code [256]); the two tables are fresh copies of nf4_code and dyn_code.",
        py::arg("w"), py::arg("blocksize"), py::arg("nf4_code"), py::arg("dyn_code"), py::arg("shfl_up"));
  m.def("torch_order_mean", &lora_kernels::torch_order_mean,
        "x.mean() (x: contiguous fp32 [n], n >= 2048, on the GPU) replayed in the order of torch's CUDA\n"
        "reduction by quantize_nf4_double's kernel; equal to torch's bits only where that order is right.\n"
        "wait_ns: the grid barrier's timeout before a CTA computes its peers' partials itself (-1: 2 ms;\n"
        "0 exercises that path).",
        py::arg("x"), py::arg("shfl_up"), py::arg("wait_ns") = -1);
  m.def("lora_gemv", &lora_kernels::lora_gemv, gemv_doc.c_str(), py::arg("x"), py::arg("packed"),
        py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"), py::arg("code"),
        py::arg("n"), py::arg("blocksize"), py::arg("lora_a") = py::none(), py::arg("lora_b") = py::none(),
        py::arg("scale") = 1.0, py::arg("scale_vec") = py::none(), py::arg("bias") = py::none(),
        py::arg("variant") = 1);
  m.def("lora_gemv_v2_workspace", &lora_kernels::lora_gemv_v2_workspace,
        "lora_gemv_v2_workspace(M, N, K, blocksize, r) -> int\n\nDevice workspace bytes of "
        "lora_gemv(..., variant=2) on the current device (r = 0: no low-rank term), or -1 when it would "
        "fall back to variant 1.",
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("blocksize"), py::arg("r") = 0);
  m.def("lora_gemv_v3_supported", &lora_kernels::lora_gemv_v3_supported,
        "lora_gemv_v3_supported(M, N, K, blocksize, r) -> bool\n\nWhether lora_gemv(..., variant=3) runs "
        "variant 3 for these sizes on the current device (r = 0: no low-rank term); False: it falls back to "
        "variant 1.",
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("blocksize"), py::arg("r") = 0);
  m.def("lora_gemv_v4_supported", &lora_kernels::lora_gemv_v4_supported,
        "lora_gemv_v4_supported(M, N, K, blocksize, r) -> bool\n\nWhether lora_gemv(..., variant=4) runs "
        "variant 4 for these sizes on the current device (r = 0: no low-rank term); False: it falls back to "
        "variant 1.",
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("blocksize"), py::arg("r") = 0);
  m.def("lora_gemv_v5_slices", &lora_kernels::lora_gemv_v5_slices,
        "lora_gemv_v5_slices(M, N, K, blocksize, r=0, double_quant=True) -> int\n\nThe K slices "
        "lora_gemv(..., variant=5) splits these sizes into on the current device (1: no finish kernel), or 0 "
        "when it falls back to variant 1 (r = 0: no low-rank term).",
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("blocksize"), py::arg("r") = 0,
        py::arg("double_quant") = true);
  m.def("lora_gemv_v5_mode", &lora_kernels::lora_gemv_v5_mode,
        "lora_gemv_v5_mode(M, N, K, blocksize, r=0, double_quant=True) -> int\n\nHow lora_gemv(..., variant=5) "
        "holds x for these sizes on the current device: 1 = all of x in shared memory (tile-major units), 2 = "
        "each CTA stages the K slices of its units (slice-major; where all of x does not fit, M up to 16), "
        "0 = it falls back to variant 1.",
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("blocksize"), py::arg("r") = 0,
        py::arg("double_quant") = true);
  m.def("lora_gemv_v5_stages", &lora_kernels::lora_gemv_v5_stages,
        "lora_gemv_v5_stages(M, N, K, blocksize, r=0, double_quant=True) -> int\n\nThe cp.async ring depth "
        "per warp lora_gemv(..., variant=5) uses for these sizes on the current device: 4, or 6 where "
        "LORA_KERNELS_GEMV_V5_STAGES=6 (an A/B switch) and x still fits beside the deeper ring; 0 when it "
        "falls back to variant 1.",
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("blocksize"), py::arg("r") = 0,
        py::arg("double_quant") = true);
}
