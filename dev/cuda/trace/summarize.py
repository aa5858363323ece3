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
import subprocess
import sys


def demangle_all(names):
    """c++filt over the distinct mangled names (left as they are when c++filt is missing)."""
    uniq = sorted(set(names))
    try:
        out = subprocess.run(["c++filt"], input="\n".join(uniq), capture_output=True, text=True, check=True).stdout
        return dict(zip(uniq, out.split("\n")))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in uniq}


def short(name):
    name = name.replace("(anonymous namespace)::", "")
    if name.endswith(")"):  # drop the argument list: the parenthesis matching the last one
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"dsv4::(cuda::)?", "", name)
    return name[:70]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--max-ms", type=float, default=30.0)
    ap.add_argument("--skip", type=int, default=8)
    ap.add_argument("--timeline", default="")
    args = ap.parse_args()
    recs = []
    host = []  # "#M" copies and "#R" runtime calls (DSV4_TRACE_HOST)
    for line in open(args.trace):
        if line.startswith("#M,") or line.startswith("#R,"):
            host.append(line.rstrip("\n").split(","))
            continue
        if line.startswith("#"):
            print(line.strip())
            continue
        parts = line.rstrip("\n").split(",", 6)
        if len(parts) < 7:
            continue
        recs.append((int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4]), int(parts[5]),
                     parts[6]))
    names = demangle_all(r[6] for r in recs)
    recs = [r[:6] + (short(names[r[6]]),) for r in recs]
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
    # Critical-path increments: main-stream kernels in start order, each charged with how far it moves the latest
    # end time (under PDL a kernel starts early and waits, so its own duration overstates what it costs).
    incs = collections.defaultdict(lambda: [0, 0])
    for a, b in toks:
        last = None
        for r in recs[a:b]:
            if r[2] != main_stream:
                continue
            key = "%s /%d" % (r[6], r[4])
            inc = r[1] - r[0] if last is None else max(0, r[1] - last)
            last = r[1] if last is None else max(last, r[1])
            incs[key][0] += 1
            incs[key][1] += inc
    print("critical path (main stream): %-48s %5s %9s %9s" % ("kernel /grid", "n/tok", "us/launch", "us/token"))
    for key, (cnt, tot) in sorted(incs.items(), key=lambda kv: -kv[1][1]):
        print("  %-74s %5.1f %9.2f %9.1f" % (key, cnt / n, tot / cnt / 1e3, tot / n / 1e3))
    if host:
        # What fills the gap between two decode tokens: from the end of a token's last kernel to the next
        # token's first, the copies and the host's runtime calls (time spent inside each API, by name).
        gap_api = collections.defaultdict(lambda: [0, 0])
        gap_total_ns = 0
        for (a, b) in toks:
            g0 = max(r[1] for r in recs[a:b])
            g1 = recs[b][0]
            gap_total_ns += g1 - g0
            for h in host:
                s0, s1 = int(h[1]), int(h[2])
                if s1 < g0 or s0 > g1:
                    continue
                key = ("copy kind %s src %s dst %s %s B" % (h[4], h[5], h[6], h[7])) if h[0] == "#M" else h[4]
                gap_api[key][0] += 1
                gap_api[key][1] += min(s1, g1) - max(s0, g0)
        print("gap between tokens (last kernel end -> next first kernel): %.1f us per token; inside it:"
              % (gap_total_ns / n / 1e3))
        for key, (cnt, tot) in sorted(gap_api.items(), key=lambda kv: -kv[1][1])[:25]:
            print("  %-60s %6.1f per token %8.1f us per token" % (key, cnt / n, tot / n / 1e3))
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
