#!/usr/bin/env python3
"""Build small DeepSeek-V4 models with HF transformers, randomize every parameter, save them with
save_pretrained and record float32 reference logits computed on CUDA with one full forward.

Run on the GPU box (see docs/convert.md):
    python3 tools/reference/make_fixtures.py --out $OUT/fixtures

Why each choice:
  * every parameter and persistent buffer is drawn at random (HF's init leaves norms at 1, sinks, compressor
    position bias, HC base and router bias at 0 and tid2eid all zero, which would hide indexing bugs);
  * scales keep activations O(1): linear weights ~ N(0, 1/in), norm weights in [0.6, 1.4], HC projections
    normalized by their input width;
  * the reference is a full forward without cache (use_cache=False) on CUDA in fp32 with TF32 off: HF's CPU
    cached decode is known to disagree with itself, its CUDA path does not;
  * QAT simulations: HF's modeling_deepseek_v4 has none (no FP8 KV round trip, no indexer Hadamard/FP4), so
    these references are "QAT off" by construction; the engine must be run with --no-qat-sim against them;
  * the script also runs cached decode and chunked prefill (7, 13, rest) through HF's own DynamicCache and
    reloads the saved directory, and records the max |diff| of each against the full forward in meta.json:
    this proves the saved files carry every parameter (tid2eid, router bias) and gives the HF self-noise floor.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

import transformers
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"

YARN = {
    "rope_type": "yarn",
    "factor": 16.0,
    "original_max_position_embeddings": 65536,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "attention_factor": 1.0,
}

# name -> (config kwargs, sequence lengths, save shard size or None)
CONFIGS = {
    # Flash-like schedule: 2 sliding layers then CSA/HCA alternating, ending on CSA; 3 hash layers.
    "flash_w8": (
        dict(hidden_size=64, num_hidden_layers=7, layer_types=[S, S, C, H, C, H, C], num_attention_heads=4,
             head_dim=64, partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=16,
             n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, mlp_layer_types=None,
             num_hash_layers=3, sliding_window=8, compress_rates={C: 4, H: 16}, index_n_heads=4,
             index_head_dim=32, index_topk=4, routed_scaling_factor=1.5),
        [80, 37], None),
    # Wider window / larger HCA ratio, one hash layer, top-k 3 of 6 experts.
    "mixed_w16": (
        dict(hidden_size=64, num_hidden_layers=4, layer_types=[S, C, H, C], num_attention_heads=4,
             head_dim=32, partial_rotary_factor=0.5, q_lora_rank=32, o_groups=2, o_lora_rank=16,
             n_routed_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, num_hash_layers=1,
             sliding_window=16, compress_rates={C: 4, H: 32}, index_n_heads=2, index_head_dim=32,
             index_topk=6, routed_scaling_factor=1.5),
        [100], None),
    # Pro-style: no sliding-only layers (HCA, HCA, then CSA/HCA), scaling 2.5; saved sharded with an index.
    "pro_w8": (
        dict(hidden_size=64, num_hidden_layers=5, layer_types=[H, H, C, H, C], num_attention_heads=8,
             head_dim=32, partial_rotary_factor=0.5, q_lora_rank=32, o_groups=4, o_lora_rank=8,
             n_routed_experts=12, num_experts_per_tok=3, moe_intermediate_size=16, num_hash_layers=2,
             sliding_window=8, compress_rates={C: 4, H: 16}, index_n_heads=4, index_head_dim=32,
             index_topk=3, routed_scaling_factor=2.5),
        [70, 20], "400KB"),
}

COMMON = dict(vocab_size=512, num_key_value_heads=1, n_shared_experts=1, scoring_func="sqrtsoftplus",
              norm_topk_prob=True, max_position_embeddings=1048576, rope_theta=10000.0,
              compress_rope_theta=160000.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=10.0,
              num_nextn_predict_layers=0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0,
              eos_token_id=1)


def make_config(kw):
    kw = dict(COMMON, **kw)
    kw.pop("mlp_layer_types", None)
    n_hash = kw.pop("num_hash_layers")
    n = kw["num_hidden_layers"]
    kw["mlp_layer_types"] = ["hash_moe"] * n_hash + ["moe"] * (n - n_hash)
    prf = kw["partial_rotary_factor"]
    kw["rope_parameters"] = {
        "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": prf},
        "compress": dict(YARN, rope_theta=160000.0, partial_rotary_factor=prf),
    }
    cfg = DeepseekV4Config(**kw)
    try:  # plain per-expert loop: deterministic fp32, no grouped-GEMM kernel choices
        cfg._experts_implementation = "eager"
    except Exception:
        pass
    return cfg


@torch.no_grad()
def randomize(model, cfg, gen):
    def randn(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    def unif(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float32)

    seen = []
    items = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in items:
        if "inv_freq" in name:
            continue  # rotary tables are derived from the config, not weights
        shape = tuple(t.shape)
        if name.endswith("tid2eid"):
            v, k = shape
            perm = torch.rand((v, cfg.n_routed_experts), generator=gen).argsort(dim=-1)[:, :k]
            t.copy_(perm.to(t.dtype))
        elif name.endswith("e_score_correction_bias"):
            t.copy_(randn(shape, 0.5))
        elif name.endswith("sinks"):
            t.copy_(randn(shape, 1.0))
        elif name.endswith("position_bias"):
            t.copy_(randn(shape, 0.7))
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t.copy_(unif(shape, 0.6, 1.4))
        elif name.endswith("_hc.fn") or name.endswith("hc_head.hc_fn"):
            t.copy_(randn(shape, 2.0 / math.sqrt(shape[1])))
        elif name.endswith("_hc.base") or name.endswith("hc_head.hc_base"):
            t.copy_(randn(shape, 0.5))
        elif name.endswith("_hc.scale") or name.endswith("hc_head.hc_scale"):
            t.copy_(unif(shape, 0.5, 1.5))
        elif name.endswith("embed_tokens.weight"):
            t.copy_(randn(shape, 1.0))
        elif name.endswith("experts.gate_up_proj"):
            # 2.5x the O(1) scale so a few gate/up pre-activations reach the swiglu clamp at 10
            t.copy_(randn(shape, 2.5 / math.sqrt(shape[2])))
        elif name.endswith("experts.down_proj"):
            t.copy_(randn(shape, 1.0 / math.sqrt(shape[2])))
        elif name.endswith("mlp.gate.weight"):
            t.copy_(randn(shape, 2.0 / math.sqrt(shape[1])))
        elif t.dim() == 2 and t.is_floating_point():
            t.copy_(randn(shape, 1.0 / math.sqrt(shape[1])))
        else:
            raise SystemExit(f"randomize: no rule for {name} {shape} {t.dtype}")
        seen.append(name)
    return seen


def logits_full(model, toks):
    ids = torch.tensor([toks], device="cuda")
    return model(input_ids=ids, use_cache=False).logits[0].float().cpu()


def logits_chunked(model, toks, chunks):
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    out, pos = [], 0
    for n in chunks:
        ids = torch.tensor([toks[pos:pos + n]], device="cuda")
        r = model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache = r.past_key_values
        out.append(r.logits[0].float().cpu())
        pos += n
    return torch.cat(out, 0)


def chunk_plan(n, first):
    plan, left = [], n
    for c in first:
        if left <= 0:
            break
        plan.append(min(c, left))
        left -= plan[-1]
    if left > 0:
        plan.append(left)
    return plan


def safetensors_names(d):
    from safetensors import safe_open
    names = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    names[k] = (f, str(sl.get_dtype()), list(sl.get_shape()))
    return names


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    os.makedirs(args.out, exist_ok=True)
    print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
    for ci, (name, (kw, lens, shard)) in enumerate(CONFIGS.items()):
        if args.only and name != args.only:
            continue
        cfg = make_config(kw)
        torch.manual_seed(1000 + ci)
        model = DeepseekV4ForCausalLM(cfg).float()
        gen = torch.Generator().manual_seed(2026 + ci)
        randomize(model, cfg, gen)
        model = model.cuda().eval()
        d = os.path.join(args.out, name)
        os.makedirs(d, exist_ok=True)
        meta = {"name": name, "torch": torch.__version__, "transformers": transformers.__version__,
                "device": torch.cuda.get_device_name(), "dtype": "float32", "tf32": False,
                "qat_sim": "off (HF modeling_deepseek_v4 implements no FP8/FP4 QAT simulation)",
                "reference": "one full forward, use_cache=False, CUDA fp32", "sequences": []}
        rng = np.random.default_rng(77 + ci)
        for si, n in enumerate(lens):
            toks = [int(x) for x in rng.integers(2, cfg.vocab_size, size=n)]
            toks[0] = 0  # bos, as a real prompt starts
            with torch.no_grad():
                full = logits_full(model, toks)
                ref_max = float(full.abs().max())
                diffs = {}
                for label, plan in (("decode", [1] * n), ("chunks_7_13", chunk_plan(n, [7, 13]))):
                    try:
                        other = logits_chunked(model, toks, plan)
                        diffs[label] = float((other - full).abs().max()) / ref_max
                    except Exception as e:  # recorded, not fatal: the full forward is the reference
                        diffs[label] = f"error: {type(e).__name__}: {e}"
            fn = f"logits_{si}.f32"
            full.numpy().astype("<f4").tofile(os.path.join(d, fn))
            meta["sequences"].append({"tokens": toks, "logits": fn, "rows": n, "vocab": cfg.vocab_size,
                                      "max_abs_ref": ref_max, "argmax": full.argmax(-1).tolist(),
                                      "hf_self_rel_diff": diffs})
            print(f"{name} seq{si} n={n} max|ref|={ref_max:.4f} self-diff={diffs}")
        model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        # Reload through from_pretrained: proves the files alone reproduce the reference.
        re = DeepseekV4ForCausalLM.from_pretrained(d, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            for s in meta["sequences"]:
                r = logits_full(re, s["tokens"])
                ref = torch.from_numpy(np.fromfile(os.path.join(d, s["logits"]), dtype="<f4")).view(s["rows"], -1)
                s["reload_rel_diff"] = float((r - ref).abs().max()) / s["max_abs_ref"]
                print(f"{name} reload rel diff {s['reload_rel_diff']:.3e}")
        names = safetensors_names(d)
        meta["tensors"] = {k: {"file": f, "dtype": dt, "shape": sh} for k, (f, dt, sh) in names.items()}
        print(f"== {name}: {len(names)} tensors written by save_pretrained")
        for k, (f, dt, sh) in names.items():
            print(f"   {k} {dt} {sh} [{f}]")
        with open(os.path.join(d, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        del model, re
        torch.cuda.empty_cache()
    print("done")


if __name__ == "__main__":
    sys.exit(main())
