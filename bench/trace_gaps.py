"""Where the GPU sat idle in a profiled stretch: gaps between kernels, and the
host work that was running in them.

    python3 bench/trace_gaps.py throughput_1b_lora_profile0.trace.json.gz [--top 15]

Reads a Chrome trace written by ``torch.profiler`` (``bench/throughput.py
--profile`` writes one per plait case), merges the device's kernel and copy
intervals, and prints the busy share of the span, the idle time in gaps of
each size, the device time of each stream (compute kernels against the span
tells a host-bound step from a device-bound one), the idle time charged to the
host ops that launched the kernel ending each gap (what the device waited
for), and the largest gaps with the outermost CPU ops open at the time.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import Counter


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_events(events) -> list[dict]:
    """The device's kernels, copies and memsets, in start order."""
    return sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                  key=lambda e: e["ts"])


def device_intervals(on_device) -> list[tuple[float, float]]:
    spans = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in on_device]
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def open_cpu_ops(cpu_ops, at: float, limit: int = 3) -> str:
    """The outermost-first CPU ops spanning time ``at``."""
    spanning = [e for e in cpu_ops if e["ts"] <= at <= e["ts"] + e.get("dur", 0)]
    spanning.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
    return " > ".join(e["name"][:40] for e in spanning[:limit]) or "(no op open)"


def launching_ops(events, kernels_after_gaps) -> list[str]:
    """For each kernel, ``"outer > ... > inner"``: the CPU ops open, on its thread,
    when the host launched it (joined through the profiler's correlation ids)."""
    launch_at = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {}):
            launch_at[e["args"]["correlation"]] = (e["ts"], e["tid"])
    queries = []
    for index, kernel in enumerate(kernels_after_gaps):
        found = launch_at.get(kernel.get("args", {}).get("correlation"))
        if found is not None:
            queries.append((found[0], found[1], index))
    names = ["(launch not found)"] * len(kernels_after_gaps)
    ops_by_thread: dict = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            ops_by_thread.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
    for tid, ops in ops_by_thread.items():
        ops.sort(key=lambda op: (op[0], -op[1]))
        mine = sorted(q for q in queries if q[1] == tid)
        stack: list = []
        position = 0
        for at, _, index in mine:
            while position < len(ops) and ops[position][0] <= at:
                stack.append(ops[position])
                position += 1
            stack = [op for op in stack if op[1] >= at]  # ops on one thread nest, so this keeps the open chain
            chain = [op[2] for op in stack if not op[2].startswith("ProfilerStep")]
            if chain:
                names[index] = " > ".join(name[:48] for name in (chain[:1] + chain[-2:] if len(chain) > 3 else chain))
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    events = load(args.trace)
    on_device = device_events(events)
    busy = device_intervals(on_device)
    if not busy:
        raise SystemExit("no device kernels in this trace")
    span = busy[-1][1] - busy[0][0]
    gaps = [(b[0] - a[1], a[1]) for a, b in zip(busy, busy[1:]) if b[0] > a[1]]
    idle = sum(g for g, _ in gaps)
    print(f"span {span / 1e3:.1f} ms, device busy {100 * (1 - idle / span):.1f}%, idle {idle / 1e3:.1f} ms "
          f"in {len(gaps)} gaps")
    buckets = Counter()
    for gap, _ in gaps:
        key = "<10us" if gap < 10 else "10-100us" if gap < 100 else "0.1-1ms" if gap < 1000 else ">=1ms"
        buckets[key] += gap
    for key in ("<10us", "10-100us", "0.1-1ms", ">=1ms"):
        print(f"  gaps {key:>9}: {buckets[key] / 1e3:8.2f} ms")
    streams = Counter()
    for e in on_device:
        streams[(e.get("args", {}).get("stream"), e["cat"])] += e.get("dur", 0)
    print("\ndevice time per stream (a span much longer than the busiest stream's kernels: the host is behind):")
    for (stream, cat), total in sorted(streams.items(), key=lambda item: -item[1]):
        print(f"  stream {stream} {cat:>10}: {total / 1e3:8.1f} ms ({100 * total / span:.0f}% of the span)")
    starts = [e["ts"] for e in on_device]
    after = [on_device[bisect.bisect_left(starts, at + gap - 0.01)] for gap, at in gaps]
    charged = Counter()
    for (gap, _), name in zip(gaps, launching_ops(events, after)):
        charged[name] += gap
    print(f"\nidle time by the host ops that launched the kernel ending the gap (top {args.top}):")
    for name, total in charged.most_common(args.top):
        print(f"  {total / 1e3:8.2f} ms  {name}")
    cpu_ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function", "user_annotation")]
    print(f"\nlargest {args.top} gaps (us, host ops open at the gap's start):")
    for gap, at in sorted(gaps, reverse=True)[:args.top]:
        print(f"  {gap:9.0f}  at +{(at - busy[0][0]) / 1e3:7.2f} ms  {open_cpu_ops(cpu_ops, at + 1)}")


if __name__ == "__main__":
    main()
