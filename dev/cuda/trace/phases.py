#!/usr/bin/env python3
"""One decode token of a Flash trace (summarize.py --timeline CSV) cut into the layer's phases by kernel name, on
every stream (side-stream ids differ per graph, so phases are read off the kernels that end them):
HC (tail end), attention in-projections (up to the head prep), the eager attention core (to the last sink-attention
kernel), output projections (the second dense Q8 GEMV after the core: o_b), router, MoE (routed down+sum end), and
the final head. Kernel names are the summarize.py short names of this tree's kernels."""
import collections
import csv
import sys


def main(path):
    rows = list(csv.DictReader(open(path)))
    for r in rows:  # names contain commas (template arguments): csv puts the rest under the None key
        r["s"], r["e"] = float(r["start_us"]), float(r["end_us"])
        r["n"] = r["name"] + ("," + ",".join(r[None]) if r.get(None) else "")
    rows.sort(key=lambda r: r["s"])
    end = max(r["e"] for r in rows)
    ph, cnt = collections.defaultdict(float), collections.Counter()
    last, state, seen = rows[0]["s"], "start", 0

    def close(label, t):
        nonlocal last
        ph[label] += t - last
        cnt[label] += 1
        last = t

    for k, r in enumerate(rows):
        nm = r["n"]
        if nm.startswith("hc_mix_split_tail"):
            close("HC post+pre+norm (part kernel + cluster tail; 2 per layer)", r["e"])
            state = "hc"
        elif nm.startswith("row_finish_batch"):
            close("attention in-projections (q_a+kv, q_a norm, q_b; compressor/indexer F16 on the side line)",
                  max(x["e"] for x in rows[:k]))
            state = "core"
        elif nm.startswith("quantize_q8_0_split") and r["grid"] == "128" and state == "core":
            close("attention core, eager (head prep, compressors, indexer top-k, sink attention + combine)",
                  max(x["e"] for x in rows[:k] if x["n"].startswith("sink_attn")))
            state, seen = "out", 0
        elif state == "out" and nm.startswith("gemv_v2_kernel<UnitSplit"):
            seen += 1
            if seen == 2:
                close("output projections (graph boundary, quantize, o_a grouped, quantize, o_b)", r["e"])
                state = "ffn"
        elif nm.startswith("moe_route_fused"):
            close("router (fused projection + top-k)", r["e"])
        elif nm.startswith("moe_v2_down"):
            close("MoE (routed gate+up || shared expert gate+up, down; Q8_K quantize; routed down+sum)", r["e"])
    close("final HC + output head + argmax", end)
    print("one decode token: %.1f us from its first kernel to its last" % (end - rows[0]["s"]))
    for k, v in sorted(ph.items(), key=lambda kv: -kv[1]):
        print("  %-100s %7.1f us  %5.1f us x %d" % (k, v, v / cnt[k], cnt[k]))


if __name__ == "__main__":
    main(sys.argv[1])
