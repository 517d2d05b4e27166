// Waiting on a flag or counter another CTA of the same grid publishes (the double quantization's
// grid barrier in nf4_cuda.cu, variant 2's T handoff in nf4_gemv_v2.cu): GPU-scope acquire loads, the
// global nanosecond timer, and one bounded spin loop whose caller falls back to its own work when
// the wait times out (a CTA that never becomes resident must not hang the grid).
#pragma once

#include <cstdint>

namespace lora_kernels {
namespace cuda {
namespace {

__device__ __forceinline__ uint32_t ld_acquire_u32(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long ld_acquire_u64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];\n" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

// Spins (sleeping sleep_ns between polls) until ready() holds: true, or false once wait_ns have
// passed without it.
template <typename Ready>
__device__ __forceinline__ bool spin_until(Ready ready, unsigned long long wait_ns, unsigned sleep_ns) {
  const unsigned long long t0 = global_timer_ns();
  while (!ready()) {
    if (global_timer_ns() - t0 > wait_ns) return false;
    __nanosleep(sleep_ns);
  }
  return true;
}

}  // namespace
}  // namespace cuda
}  // namespace lora_kernels
