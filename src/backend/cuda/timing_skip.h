// DSV4_CUDA_SKIP: a MEASUREMENT tool, not a feature. A comma-separated list of keys naming one-token (decode) ops
// whose launches the CUDA backend leaves out, so `dsv4 bench` measures what each op costs on the critical path of
// a decode token as the graphs run it (decode t/s with and without it; a profile with events cannot show this:
// it serializes every op and removes the programmatic-launch overlap). THE OUTPUTS ARE WRONG while it is set (the
// skipped op's output buffer keeps stale values; token ids stay valid, so the run completes); `dsv4 bench` prints
// a warning. Keys: op names as DSV4_CUDA_PROFILE prints them (hc_post_pre_norm, head_prep, head_prep_batch,
// compressor_step, compressor_step_pair, indexer_topk, sink_attention, moe_route, moe_ffn.routed,
// moe_ffn.routed_down, moe_ffn.shared; hc_sinkhorn: the Sinkhorn rounds inside the HC launches) or a projection's
// weight name without "blk.N." and ".weight" (attn_q_a, attn_q_b, attn_output_a, attn_output_b, ...). Unset:
// nothing is skipped (one getenv, cached).
#pragma once

#include <string_view>

namespace dsv4::cuda {

// Whether the decode op `key` is to be left out (always false for T != 1 and when DSV4_CUDA_SKIP is unset).
bool timing_skip(std::string_view key, int T);
// timing_skip for a projection, keyed by its weight's short name ("blk.3.attn_q_b.weight" -> "attn_q_b").
bool timing_skip_weight(const char* weight_name, int T);
// Whether any op is skipped at all (the bench's warning).
bool timing_skip_active();

}  // namespace dsv4::cuda
