// `dsv4 synth`: a GGUF with ds4's exact names, metadata and quant mix filled with random but valid weights.
//
// Used where the real 81 GB checkpoint cannot be had: full-shape speed work (flash / pro) and a small model
// for `make run` and CPU smoke tests (tiny: Flash's architecture at toy widths with the real 129,280-token
// vocabulary). Values are drawn with scales that keep activations O(1) through the forward: matrices
// N(0, 1/in) (HC projections a little larger so the mixing is not uniform), norm weights near 1, the rest
// small. Deterministic for a given seed.
//
// Large quantized tensors are assembled from a pool of blocks quantized from real N(0, sigma) rows (each
// output block a random pick from the pool): every block is a valid, sanely scaled block of its type, and a
// Flash file is written at disk speed instead of quantizer speed. --sparse-experts leaves the routed-expert
// stacks as file holes (zeros): speed benchmarks see the same bytes moved, values are not meaningful.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "convert/mix.h"
#include "model/config.h"

namespace dsv4 {

struct SynthOptions {
  std::string shape = "tiny";  // flash | pro | tiny
  Mix mix = Mix::Q2;
  std::string out_path;
  uint64_t seed = 1;
  bool sparse_experts = false;
  std::function<void(const std::string&)> log;
};

struct SynthReport {
  ModelConfig config;
  int n_tensors = 0;
  uint64_t data_bytes = 0;    // tensor data section size (holes included)
  uint64_t hole_bytes = 0;    // bytes left as holes (--sparse-experts)
};

// The config of a named shape; throws for unknown names.
ModelConfig synth_config(const std::string& shape);
SynthReport synth_model(const SynthOptions& options);

}  // namespace dsv4
