#!/usr/bin/env python3
"""Polls the limiter's signals of bench/mesh's nodes every 100 ms into a CSV until STOP exists.

    monitor.py OUT.csv STOP A_PORT LOADED_PORT B_PORT C_PORT

Columns: t (s since start), A's effective limiter rate (bytes/s, 0 = off), A's limiter state,
the loaded node's public latency p99 from arrival and TTFB p99 (s, last 100 ms window), its
public requests in flight, its CPU and I/O pressure ratios, A's CPU pressure ratio, bytes B and C
have received from peers. One process with kept-alive connections, so the polling costs little
of the CPU the nodes share.
"""
import http.client
import os
import sys
import time

out, stop, a, loaded, b, c = sys.argv[1:7]
ports = {"a": int(a), "loaded": int(loaded), "b": int(b), "c": int(c)}
conns = {}


def metrics(port):
    for _ in range(2):
        conn = conns.get(port)
        if conn is None:
            conn = conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/metrics")
            body = conn.getresponse().read().decode()
            values = {}
            for line in body.splitlines():
                if not line or line.startswith("#"):
                    continue
                name, _, value = line.rpartition(" ")
                try:
                    values[name] = float(value)
                except ValueError:
                    pass
            return values
        except OSError:
            conns.pop(port, None)
        except http.client.HTTPException:
            conns.pop(port, None)
    return {}


def summed(values, name):
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def state(values):
    best = None
    for k, v in values.items():
        if k.startswith("sluice_replication_limiter_seconds_total{"):
            if best is None or v > best[1]:
                best = (k.split('"')[1], v)
    return best[0] if best else ""


STATES = ["full", "rising", "holding", "backing_off", "capped", "floor"]
start = time.monotonic()
last_state_secs = {}
with open(out, "w") as f:
    f.write("t,effective_bps,state,latency_p99_s,ttfb_p99_s,in_flight,cpu_pressure,io_pressure,"
            "a_cpu_pressure,received_b,received_c\n")
    while not os.path.exists(stop):
        t = time.monotonic() - start
        va = metrics(ports["a"])
        vl = va if ports["loaded"] == ports["a"] else metrics(ports["loaded"])
        vb = metrics(ports["b"]) if ports["b"] != ports["loaded"] else vl
        vc = metrics(ports["c"])
        # The state the limiter spent the last interval in: the one whose time grew most.
        grown = {}
        for s in STATES:
            k = f'sluice_replication_limiter_seconds_total{{state="{s}"}}'
            if k in va:
                grown[s] = va[k] - last_state_secs.get(s, 0.0)
                last_state_secs[s] = va[k]
        st = max(grown, key=grown.get) if grown and max(grown.values()) > 0 else ""
        f.write(",".join(str(x) for x in [
            f"{t:.2f}",
            int(summed(va, "sluice_replication_effective_bytes_per_second")),
            st,
            summed(vl, "sluice_replication_public_latency_p99_seconds"),
            summed(vl, "sluice_replication_public_ttfb_p99_seconds"),
            int(summed(vl, "sluice_replication_public_in_flight")),
            summed(vl, "sluice_replication_cpu_pressure_ratio"),
            summed(vl, "sluice_replication_io_pressure_ratio"),
            summed(va, "sluice_replication_cpu_pressure_ratio"),
            int(summed(vb, "sluice_replication_received_bytes_total")),
            int(summed(vc, "sluice_replication_received_bytes_total")),
        ]) + "\n")
        f.flush()
        time.sleep(max(0.0, 0.1 - (time.monotonic() - start - t)))
