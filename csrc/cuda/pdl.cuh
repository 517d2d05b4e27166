// Programmatic dependent launch (sm_90): a kernel launched with programmatic stream serialization
// may start while the previous kernel on the stream is still running; it must griddep_wait() before
// reading anything that kernel writes.  The previous kernel may griddep_launch_dependents() to let it
// start before its own CTAs exit.  Both are no-ops below sm_90, and the wait returns at once when the
// grid was not launched as a dependent.  Used by the decode chains (nf4_gemv_*.cu) and the double
// quantization (nf4_cuda.cu).
#pragma once

#include <cuda_runtime.h>

namespace lora_kernels {
namespace cuda {
namespace {

__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// A plain launch, or (pdl) one that may start before the previous kernel on the stream completes
// (programmatic stream serialization: the kernel must griddep_wait before reading its output).
template <typename Kern, typename... Args>
cudaError_t launch_maybe_pdl(Kern kern, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                             Args... args) {
  if (!pdl) {
    kern<<<grid, block, smem, stream>>>(args...);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kern, args...);
}

}  // namespace
}  // namespace cuda
}  // namespace lora_kernels
