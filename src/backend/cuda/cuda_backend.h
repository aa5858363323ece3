// The op table (backend/backend.h) implemented with the CUDA kernels of this directory.
//
// The table passes activations as host pointers, so every op here uploads its inputs, runs on the GPU and
// downloads its outputs, synchronously: this backend proves op-for-op parity with the CPU oracle and can run the
// forward's non-attention ops on the GPU, but it is not the fast decode path (that needs device-resident activations and a
// captured graph; docs/cuda.md). Weights are uploaded once, on first use, and cached by their host address
// (WeightView::data; the bytes must stay valid and unchanged while the backend lives, as the engine's mmap
// does), so the model reaches the device a tensor at a time as layers first run. Q8_0 matrices with
// cols % 256 == 0 are repacked to the split layout on upload (gemv.h).
// Memory bridge: alloc() returns host memory (host_memory() == true) and the attention ops (matmul_grouped,
// head_prep, compressor_step, indexer_topk, sink_attention, window_store) run the CPU implementation, so the
// forward and session state work unchanged until device memory and attention kernels replace them.
// Exceptions: `embed` gathers on the host (a row copy, no arithmetic), the hash-layer tid2eid lookup is done on
// the host (the table is a host tensor), and matmul on a weight type gemv_cuda lacks (BF16) runs the CPU kernel
// (no tensor of the q2/q4 mixes is BF16).
#pragma once

#include <memory>

#include "backend/backend.h"

namespace dsv4 {

// Throws dsv4::Error when no CUDA device is present.
std::unique_ptr<Backend> make_cuda_backend();

}  // namespace dsv4
