#!/usr/bin/env python3
"""How long the loaded node's engine threads waited for a CPU, and who had it.

  schedwait.py TIMEHIST_TXT LOADED_PID LABEL=PID [LABEL=PID ...]

Reads `perf sched timehist` output (one line per time a thread left a CPU, with its
scheduling delay: from its wakeup to when it ran). For the threads of LOADED_PID whose
names start with "sluice-ring" (the engine threads that answer public requests), prints the
scheduling delay's percentiles and, for every delay of 1 ms or more, what ran on that CPU
just before the thread got it, by process label (A, B, C, the load generator, other) and
thread name, with the delay each accounts for; then the CPU time each thread ran in the
record, by node and thread (what each part of the work costs). Threads whose names say they
work for replication run in the idle scheduling class (docs/replication.md); the rest are
normal.
"""
import collections
import re
import sys

LONG_MS = 1.0
LINE = re.compile(r"^\s*([\d.]+)\s+\[(\d+)\]\s+(.+?)\[(\d+)(?:/(\d+))?\]\s+"
                  r"([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def main():
    path, loaded = sys.argv[1], sys.argv[2]
    labels = dict(reversed(a.split("=", 1)) for a in sys.argv[3:])
    before = {}  # cpu -> (label, thread) that ran last
    delays = []
    ran_ms = collections.Counter()
    first = last = None
    blame = collections.Counter()
    blame_ms = collections.Counter()
    for line in open(path, errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        t, cpu, name, tid, pid, _wait, sch, run = m.groups()
        pid = pid or tid
        name = name.strip()
        who = (labels.get(pid, "other"), name)
        first = first if first is not None else float(t)
        last = float(t)
        if not name.startswith(":"):  # idle (swapper) shows as :0
            ran_ms[who] += float(run)
        if pid == loaded and name.startswith("sluice-ring"):
            d = float(sch)
            delays.append(d)
            if d >= LONG_MS:
                prev = before.get(cpu, ("?", "?"))
                blame[prev] += 1
                blame_ms[prev] += d
        before[cpu] = who
    if not delays:
        print("no runs of the loaded node's engine threads in the record")
        return
    delays.sort()
    n = len(delays)

    def q(p):
        return delays[min(n - 1, int(p * n))]

    long = sum(1 for d in delays if d >= LONG_MS)
    print(f"engine threads of the loaded node: {n} runs; scheduling delay p50 {q(.5):.3f} "
          f"p90 {q(.9):.3f} p99 {q(.99):.3f} p99.9 {q(.999):.3f} max {delays[-1]:.3f} ms; "
          f"{long} runs ({100.0 * long / n:.2f} %) waited {LONG_MS:.0f} ms or more")
    total = sum(blame_ms.values()) or 1.0
    for (label, thread), count in blame.most_common(15):
        ms = blame_ms[(label, thread)]
        print(f"  ran before a long wait: {label:6s} {thread:28s} {count:5d} times "
              f"{ms:8.1f} ms ({100.0 * ms / total:4.1f} %)")
    span_s = max((last or 0) - (first or 0), 1e-9)
    by_label = collections.Counter()
    for (label, _thread), ms in ran_ms.items():
        by_label[label] += ms
    print(f"CPU over the {span_s:.1f} s recorded, in cores: " + ", ".join(
        f"{label} {ms / 1000 / span_s:.2f}" for label, ms in by_label.most_common()))
    for (label, thread), ms in ran_ms.most_common(15):
        print(f"  ran: {label:6s} {thread:28s} {ms / 1000 / span_s:5.2f} cores")


if __name__ == "__main__":
    main()
