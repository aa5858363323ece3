#!/usr/bin/env python3
"""Summarize a cupti_trace.cpp kernel timeline of a dsv4 decode (bench): per-token kernel table and one timeline.

Tokens are cut at embed_kernel launches; only tokens shorter than --max-ms (decode, not the prefill) count, and
the first --skip of those (eager runs, graph captures) are left out. For each kernel name: launches per token,
mean duration, and its share of the token; 'gap' is the main stream's idle time between consecutive kernels (its
end to the next one's start, clipped at 0), i.e. launch latency and dependency waits the kernels do not cover.
"""
import argparse
import collections
import re
import sys


def short(name):
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"dsv4::cuda::(\(anonymous namespace\)::)?", "", name)
    return name[:70]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--max-ms", type=float, default=30.0)
    ap.add_argument("--skip", type=int, default=8)
    ap.add_argument("--timeline", default="")
    args = ap.parse_args()
    recs = []
    for line in open(args.trace):
        if line.startswith("#"):
            print(line.strip())
            continue
        parts = line.rstrip("\n").split(",", 6)
        if len(parts) < 7:
            continue
        recs.append((int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4]), int(parts[5]),
                     short(parts[6])))
    recs.sort()
    if not recs:
        sys.exit("no kernel records")
    starts = [i for i, r in enumerate(recs) if r[6].startswith("embed_kernel")]
    toks = []
    for a, b in zip(starts, starts[1:]):
        dur = recs[b][0] - recs[a][0]
        if dur < args.max_ms * 1e6:
            toks.append((a, b))
    toks = toks[args.skip:]
    if not toks:
        sys.exit("no decode tokens found (%d embed launches)" % len(starts))
    streams = collections.Counter(r[2] for a, b in toks for r in recs[a:b])
    main_stream = streams.most_common(1)[0][0]
    per = collections.defaultdict(lambda: [0, 0])  # name -> [count, total ns]
    gap_total = 0
    busy_total = 0
    tok_total = 0
    for a, b in toks:
        t0, t1 = recs[a][0], recs[b][0]
        tok_total += t1 - t0
        last_end = None
        iv = []
        for r in recs[a:b]:
            per[(r[6], r[2] == main_stream)][0] += 1
            per[(r[6], r[2] == main_stream)][1] += r[1] - r[0]
            iv.append((r[0], r[1]))
            if r[2] == main_stream:
                if last_end is not None and r[0] > last_end:
                    gap_total += r[0] - last_end
                last_end = r[1] if last_end is None else max(last_end, r[1])
        iv.sort()
        cur_s, cur_e = iv[0]
        for s, e in iv[1:]:
            if s > cur_e:
                busy_total += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        busy_total += cur_e - cur_s
    n = len(toks)
    tok_us = tok_total / n / 1e3
    print("decode tokens: %d, %.1f us per token (%.2f t/s); GPU busy (any kernel) %.1f us; main-stream gaps %.1f us; "
          "streams %s (main %d)" % (n, tok_us, 1e6 / tok_us, busy_total / n / 1e3, gap_total / n / 1e3,
                                    dict(streams), main_stream))
    print("%-72s %5s %9s %9s %7s" % ("kernel (side: not on the main stream)", "n/tok", "us/launch", "us/token", "share"))
    for (name, on_main), (cnt, tot) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print("%-72s %5.1f %9.2f %9.1f %6.1f%%" % (name + ("" if on_main else " [side]"), cnt / n, tot / cnt / 1e3,
                                                  tot / n / 1e3, 100.0 * tot / tok_total))
    if args.timeline:
        a, b = toks[len(toks) // 2]
        t0 = recs[a][0]
        with open(args.timeline, "w") as f:
            f.write("start_us,end_us,dur_us,gap_us,stream,grid,block,name\n")
            prev_end = t0
            for r in recs[a:b]:
                gap = (r[0] - prev_end) / 1e3 if r[2] == main_stream else 0.0
                if r[2] == main_stream:
                    prev_end = max(prev_end, r[1])
                f.write("%.2f,%.2f,%.2f,%.2f,%d,%d,%d,%s\n" % ((r[0] - t0) / 1e3, (r[1] - t0) / 1e3,
                                                            (r[1] - r[0]) / 1e3, gap, r[2], r[4], r[5], r[6]))


if __name__ == "__main__":
    main()
