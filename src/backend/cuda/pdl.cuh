// Programmatic dependent launch (PDL) for the kernel chain of a pass. Included only by .cu files.
//
// Why: a decode token is ~1400 small dependent kernels. Launched normally, each one starts only after its
// predecessor has fully drained, so every boundary costs launch latency plus CTA ramp-up (measured: the PDL
// variant of the dense GEMV alone took decode from 97.4 to 100.6 t/s, H200, session 9). Launched with
// programmatic stream serialization, a kernel's CTAs may become resident while the previous kernel still runs
// and wait on the device instead.
//
// The contract every kernel launched through launch_pdl() keeps:
//   1. pdl_wait() before its first read of anything an earlier kernel wrote and before its first global write.
//      griddepcontrol.wait returns once every prerequisite grid has completed and its memory is visible, so the
//      kernel then sees exactly what a normal launch would (and, by induction, everything before that).
//      Only data no kernel writes (weights, tables, kernel arguments) may be read before it.
//   2. pdl_trigger() as early as it likes (typically first): it lets the *next* kernel's CTAs be scheduled.
//      Triggering early is safe because of rule 1 in the next kernel.
// Both instructions are no-ops when the kernel was launched without the attribute (DSV4_CUDA_PDL=0, or a plain
// <<<>>> launch), so a kernel obeying the contract works either way. Stream capture turns the attribute into
// programmatic edges of the recorded graph (CUDA >= 12.3). Needs sm_90 (the project builds 90a).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "backend/cuda/cuda_util.h"

namespace dsv4::cuda {

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// DSV4_CUDA_PDL=0 turns the attribute off (every launch_pdl becomes a plain launch): A/B checks. Read once.
// declared in cuda_util.h (host): bool pdl_enabled();

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization (when enabled); `what`
// names the kernel in the error message of a failed launch.
template <class... Params, class... Args>
void launch_pdl(const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  check(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...), what);
}

}  // namespace dsv4::cuda
