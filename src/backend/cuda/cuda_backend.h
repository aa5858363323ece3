// The op table (backend/backend.h) implemented with the CUDA kernels of this directory, on device memory.
//
// Memory: alloc() returns device memory (stream-ordered cudaMallocAsync from the device's default pool;
// host_memory() is false). Everything runs on ONE backend-owned non-blocking stream: upload / copy / fill and every
// op's kernels are enqueued there without host synchronization; download() enqueues the copy and waits for the
// stream. So a forward pass issues its whole op sequence asynchronously and the host waits once, for the logits.
// Ops take device pointers directly; the scratch they need internally is grow-only (no allocation in a steady
// decode step). Every op reads its data-dependent inputs (token ids, expert ids, top-k rows) from device memory.
//
// Weights are mirrored on first use and cached by their host address (WeightView::data; the bytes must stay
// valid and unchanged while the backend lives, as the engine's mmap does), so the model reaches the device a
// tensor at a time as layers first run. Device layouts follow gemv.h (preferred_layout: Q8_0 matrices with
// cols % 256 == 0 are repacked to the split layout); the token embedding is mirrored in file layout and gathered
// on the device (Q8_0 / F16 / F32; other encodings decode on the host); the hash layers' tid2eid table is
// validated once on the host (every entry an expert id) and mirrored.
//
// Launch economy (a decode step is launch-bound): a grouped projection is one MoE-mode GEMV launch for up to 2
// tokens; an activation read by several matmuls in the same format is quantized once (the cache is invalidated
// by any write overlapping the input, and by any free); F16/F32 weights read the fp32 activations directly.
//
// Exceptions to "everything on the GPU": matmul on a weight type gemv_cuda lacks (BF16; no tensor of the q2/q4
// mixes) runs the CPU kernel on downloaded activations. DSV4_CUDA_ATTENTION=cpu runs the attention ops on the CPU
// on staged copies (A/B checks of the attention kernels; synchronous). DSV4_CUDA_PROFILE=1 prints a per-op
// time table when the backend is destroyed (profile.h).
#pragma once

#include <memory>

#include "backend/backend.h"

namespace dsv4 {

// Throws dsv4::Error when no CUDA device is present.
std::unique_ptr<Backend> make_cuda_backend();
// True when a CUDA device is present and usable (BackendKind::Auto picks the CUDA backend then).
bool cuda_backend_available();

}  // namespace dsv4
