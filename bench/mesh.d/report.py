#!/usr/bin/env python3
"""bench/mesh's table and timeline plot, from the files its runs leave in OUT.

    report.py OUT TOTAL_BYTES COUNT EACH_BYTES RATE SECS LIMIT TARGET ARGS REPEATS SCENARIOS

Per scenario: a Markdown table (medians [ranges] over the rounds) with the goal check, and an
SVG timeline of the first round's run 2 (public p99 per second, the limiter's rate and the
replication rate, CPU and I/O pressure per 100 ms).
"""
import csv
import json
import math
import statistics
import sys

(out, total, count, each, rate, secs, limit, target, args, repeats, scenarios) = sys.argv[1:12]
repeats = int(repeats)
total = int(total)

SCENARIO_TEXT = {
    "a": "public load on A, the node sending replication",
    "b": "public load on B, a node receiving replication",
}


def lat(n):
    return json.load(open(f"{out}/run{n}.json"))["latency"]


def repl(n):
    parts = [("" if p == "-" else p) for p in open(f"{out}/run{n}-replication").read().split()]
    return (parts + ["", "", "", ""])[:4]


def load(n):
    return float(open(f"{out}/run{n}-load").read())


def med(values):
    return (statistics.median(values), min(values), max(values))


def fmt(t, digits=3, unit=""):
    m, lo, hi = t
    if repeats == 1:
        return f"{m:.{digits}f}{unit}"
    return f"{m:.{digits}f}{unit} [{lo:.{digits}f}–{hi:.{digits}f}]"


def signals(n):
    try:
        with open(f"{out}/run{n}-signals.csv") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def seconds(n):
    try:
        with open(f"{out}/run{n}.seconds.csv") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def table(sc):
    host = json.load(open(f"{out}/run{sc}1r1.json"))["host"]
    rows = {}
    for k, label in [(1, "alone"), (2, "replicating, limiter on"), (3, "replicating, limiter off")]:
        ns = [f"{sc}{k}r{r}" for r in range(1, repeats + 1)]
        lats = [lat(n) for n in ns]
        reps = [repl(n) for n in ns]
        row = {
            "label": label,
            "p50": med([l["p50_ms"] for l in lats]),
            "p90": med([l.get("p90_ms", 0.0) for l in lats]),
            "p99": med([l["p99_ms"] for l in lats]),
            "p999": med([l["p99_9_ms"] for l in lats]),
            "load": med([load(n) for n in ns]),
            "outlasted": any(r[2] == "yes" for r in reps),
        }
        if reps[0][0]:
            row["mbs"] = med([float(r[1]) for r in reps])
            row["secs"] = med([float(r[0]) for r in reps])
            rec = [float(r[3]) for r in reps if r[3] not in ("", "none")]
            row["recover"] = med(rec) if rec else None
        rows[k] = row
    p99_1, p99_2 = rows[1]["p99"][0], rows[2]["p99"][0]
    bound = 1.25 * p99_1 + 1.0
    share = rows[2]["mbs"][0] / rows[3]["mbs"][0] if rows[3]["mbs"][0] else float("inf")
    met = p99_2 <= bound and share >= 0.5
    lines = []
    lines.append(f"Scenario {sc.upper()}: {SCENARIO_TEXT[sc]}.")
    lines.append("")
    lines.append("| run | public p50 ms | public p90 ms | public p99 ms | public p99.9 ms | replication MB/s into B + C, under the public load | B and C hold everything after | limiter back at its rate after the load, s | load average at start |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for k in (1, 2, 3):
        r = rows[k]
        mbs = fmt(r["mbs"], 0) if "mbs" in r else "–"
        t = (fmt(r["secs"], 1, " s") + (" (outlasted the public window)" if r["outlasted"] else "")) if "secs" in r else "–"
        rec = fmt(r["recover"], 1) if r.get("recover") else "–"
        lines.append(f"| {k}. {r['label']} | {fmt(r['p50'])} | {fmt(r['p90'])} | {fmt(r['p99'])} | {fmt(r['p999'])} | {mbs} | {t} | {rec} | {fmt(r['load'], 1)} |")
    verdict = "**met**" if met else "**not met**"
    lines.append(f"| goal: run 2 p99 ≤ 1.25 × run 1 + 1 ms ({bound:.3f} ms), run 2 MB/s ≥ ½ × run 3 | | | {p99_2 / p99_1:.2f} × run 1 | | {share:.2f} × run 3 | {verdict} | | |")
    return host, lines


def svg_timeline(sc, path):
    n = f"{sc}2r1"
    sig = signals(n)
    sec = seconds(n)
    if not sig:
        return False
    # The load generator's seconds start after its 1 s warm-up; the monitor's clock starts
    # with the load generator (the script starts both together).
    W, H, L, R = 900, 620, 70, 70
    panels = [(40, 190), (250, 180), (450, 140)]
    t_max = max(float(s["t"]) for s in sig)
    t_max = max(t_max, len(sec) + 1.0)
    x = lambda t: L + (W - L - R) * t / t_max
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W/2}" y="18" text-anchor="middle" font-size="13">bench/mesh scenario {sc.upper()} ({SCENARIO_TEXT[sc]}), run 2, round 1</text>']

    def axes(top, h, label, ticks, ylab):
        o.append(f'<rect x="{L}" y="{top}" width="{W-L-R}" height="{h}" fill="none" stroke="#888"/>')
        o.append(f'<text x="14" y="{top + h/2}" transform="rotate(-90 14 {top + h/2})" text-anchor="middle">{label}</text>')
        for v, yy in ticks:
            o.append(f'<line x1="{L-4}" y1="{yy}" x2="{L}" y2="{yy}" stroke="#888"/>')
            o.append(f'<text x="{L-6}" y="{yy+4}" text-anchor="end">{ylab(v)}</text>')
        for s in range(0, int(t_max) + 1, 5):
            o.append(f'<line x1="{x(s)}" y1="{top+h}" x2="{x(s)}" y2="{top+h+4}" stroke="#888"/>')
            o.append(f'<text x="{x(s)}" y="{top+h+15}" text-anchor="middle">{s}</text>')

    def line(points, color, dash=""):
        if not points:
            return
        d = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        o.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.5"{extra}/>')

    def legend(top, items):
        xx = L + 10
        for text, color in items:
            o.append(f'<line x1="{xx}" y1="{top+12}" x2="{xx+18}" y2="{top+12}" stroke="{color}" stroke-width="2"/>')
            o.append(f'<text x="{xx+22}" y="{top+16}">{text}</text>')
            xx += 30 + 6.2 * len(text)

    # Panel 1: latency, log scale 0.1 ms .. 3 s.
    top, h = panels[0]
    lo, hi = math.log10(0.1), math.log10(3000)
    y = lambda ms: top + h - h * (math.log10(max(ms, 0.1)) - lo) / (hi - lo)
    axes(top, h, "latency, ms (log)", [(v, y(v)) for v in (0.1, 1, 10, 100, 1000)], lambda v: f"{v:g}")
    line([(x(int(s["second"]) + 1.5), y(float(s["p99_ms"]))) for s in sec], "#c00")
    line([(x(float(s["t"])), y(1000 * float(s["latency_p99_s"]))) for s in sig if float(s["latency_p99_s"]) > 0], "#06c")
    line([(x(float(s["t"])), y(1000 * float(s["ttfb_p99_s"]))) for s in sig if float(s["ttfb_p99_s"]) > 0], "#999", "3,2")
    legend(top, [("client p99 per second", "#c00"), ("server p99 from arrival, 100 ms", "#06c"), ("server TTFB p99", "#999")])
    # Panel 2: rates, MB/s.
    top, h = panels[1]
    rates = []
    prev = None
    for s in sig:
        t, got = float(s["t"]), int(s["received_b"]) + int(s["received_c"])
        if prev is not None and t > prev[0]:
            rates.append((t, (got - prev[1]) / (t - prev[0]) / 1e6))
        prev = (t, got)
    # Smooth the received rate over 0.5 s (5 samples) so the plot shows the trend.
    sm = []
    for i in range(len(rates)):
        w = rates[max(0, i - 4): i + 1]
        sm.append((rates[i][0], sum(r for _, r in w) / len(w)))
    eff = [(float(s["t"]), int(s["effective_bps"]) / 1e6) for s in sig]
    top_rate = max([r for _, r in sm] + [r for _, r in eff] + [1.0])
    top_rate = 10 ** math.ceil(math.log10(top_rate)) if top_rate > 0 else 1
    yr = lambda v: top + h - h * min(v, top_rate) / top_rate
    axes(top, h, "MB/s", [(v, yr(v)) for v in (0, top_rate / 4, top_rate / 2, 3 * top_rate / 4, top_rate)], lambda v: f"{v:.0f}")
    line([(x(t), yr(v)) for t, v in eff], "#06c")
    line([(x(t), yr(v)) for t, v in sm], "#090")
    legend(top, [("A's limiter rate", "#06c"), ("received by B + C (0.5 s mean)", "#090")])
    # Panel 3: pressure.
    top, h = panels[2]
    yp = lambda v: top + h - h * min(max(v, 0.0), 1.0)
    axes(top, h, "PSI some, share", [(v, yp(v)) for v in (0, 0.25, 0.5, 0.75, 1)], lambda v: f"{v:.2f}")
    line([(x(float(s["t"])), yp(float(s["cpu_pressure"]))) for s in sig], "#c60")
    line([(x(float(s["t"])), yp(float(s["io_pressure"]))) for s in sig], "#609")
    legend(top, [("CPU pressure (loaded node's view)", "#c60"), ("I/O pressure", "#609")])
    o.append(f'<text x="{W/2}" y="{H-8}" text-anchor="middle">seconds since the public load started (1 s warm-up, replication from about 2 s)</text>')
    o.append("</svg>")
    open(path, "w").write("\n".join(o))
    return True


print_lines = []
first = True
for sc in scenarios.split(","):
    host, lines = table(sc)
    if first:
        print_lines.append(f"Machine: {host['cpu_model']}, {host['cores']} cores, kernel {host['kernel']}; "
                           f"three nodes and the load generator on the same host, data on tmpfs, fsync = never.")
        print_lines.append(f"Command: `{('bench/mesh ' + args).strip()}`" + (f" ({repeats} rounds; median [range])" if repeats > 1 else ""))
        print_lines.append(f"Public load: GET of one 4 KiB artifact, open loop at {rate}/s over 4 connections, {secs} s per run. "
                           f"Replication: {count} artifacts of {int(each) >> 20} MiB ({total / 1e9:.2f} GB) written to A before the window, "
                           f"replicating to B and C during it. Limiter in run 2: rate {limit}, latency target {target} ms.")
        first = False
    print_lines.append("")
    print_lines.extend(lines)
    if svg_timeline(sc, f"{out}/timeline-{sc}.svg"):
        print_lines.append("")
        print_lines.append(f"Timeline of run 2, round 1: `timeline-{sc}.svg`.")
print("\n".join(print_lines))
