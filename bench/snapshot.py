#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: uffd-wp background snapshot vs stop-the-world (not a test).

1 GiB memfd guest RAM, 4 writer processes, two load rows: writers at a
combined 200,000 page writes/s, and writers at full speed.  Every figure is
also given as a ratio to a floor measured in the same run by uffd-bench:
memcpy bandwidth, and a single-process handler-thread uffd-wp fault round
trip.  Targets (rate-limited row): uffd-wp throughput >= 0.5x memcpy; max
writer stall <= 1/10 of stop-the-world's; p50 fault-to-resolve <= 1.5x the
single-process round trip.

    python3 bench/snapshot.py [--size 1G] [--writers 4] [--repeat 3]

Stdlib only; builds guest-tools/ if needed.  Prints a table; --json also
dumps the raw summaries.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "guest-tools"
BIN = TOOLS / "bin"


def build() -> None:
    done = subprocess.run(["make", "-C", str(TOOLS), "-j", str(os.cpu_count() or 1)],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"building guest-tools failed:\n{done.stdout}\n{done.stderr}")


def run_json(argv: list[str], kind: str, timeout: float = 600) -> dict:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    found = [r for r in records if r.get("type") == kind]
    if done.returncode or not found:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                 f"{done.stderr[-2000:]}")
    return found[-1]


def floors(size: str) -> dict:
    return run_json([str(BIN / "uffd-bench"), "--memcpy-size", size, "--round-trips", "2000"],
                    "bench")


def snapshot(strategy: str, rate: str, size: str, writers: int, duration: float) -> dict:
    return run_json([str(BIN / "uffd-snapshot"), "--strategy", strategy, "--backing", "memfd",
                     "--size", size, "--writers", str(writers), "--rate", rate,
                     "--duration", str(duration), "--warmup", "1", "--verify"], "summary")


def median_summary(runs: list[dict]) -> dict:
    """Median of each figure over repeats (consistent only if all were)."""
    def med(get):
        vals = [get(r) for r in runs if get(r) is not None]
        return statistics.median(vals) if vals else None
    def lat(k):
        return lambda r: r["fault_latency_us"][k]
    return {
        "snapshot_ms": med(lambda r: r["snapshot_ms"]),
        "copy_ms": med(lambda r: r["copy_ms"]),
        "arm_ms": med(lambda r: r["arm_ms"]),
        "pause_ms": med(lambda r: r["pause_ms"]),
        "bytes": runs[0]["bytes"],
        "faults": med(lambda r: r["faults_total"]),
        "p50": med(lat("p50")), "p90": med(lat("p90")), "p99": med(lat("p99")),
        "p999": med(lat("p999")), "max": med(lat("max")),
        "stall_max_ms": med(lambda r: r["writer_stall_max_ms"]),
        "ops_before": med(lambda r: r["writer_ops_per_s_before"]),
        "ops_during": med(lambda r: r["writer_ops_per_s_during"]),
        "consistent": all(r["consistent"] for r in runs),
    }


def fmt(v, spec=".1f", none="-") -> str:
    return none if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0,
                    help="writer run time per snapshot run, seconds (1 s warm-up included)")
    ap.add_argument("--json", action="store_true", help="also print raw summaries")
    args = ap.parse_args()

    build()
    fl = floors(args.size)
    memcpy_gbs = fl["memcpy_gb_s"]
    rt_p50 = fl["round_trip_us"]["p50"]
    print(f"host {platform.node()}  kernel {platform.release()}  cpus {os.cpu_count()}  "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"floors (same run): memcpy {memcpy_gbs:.2f} GB/s; single-process uffd-wp round trip "
          f"p50 {rt_p50:.1f} us, p99 {fl['round_trip_us']['p99']:.1f} us "
          f"(writer-seen p50 {fl['round_trip_writer_us']['p50']:.1f} us)")
    print(f"{args.size} memfd, {args.writers} writer processes, median of {args.repeat} runs\n")

    rows = [("200k/s", "200000"), ("max", "max")]
    results, raw = {}, []
    for label, rate in rows:
        for strategy in ("stop-the-world", "uffd-wp"):
            runs = [snapshot(strategy, rate, args.size, args.writers, args.duration)
                    for _ in range(args.repeat)]
            raw.extend(runs)
            results[(label, strategy)] = median_summary(runs)

    head = (f"{'load':7} {'strategy':15} {'snap ms':>8} {'GB/s':>6} {'x memcpy':>8} "
            f"{'arm ms':>7} {'pause ms':>8} {'faults':>7} {'p50 us':>7} {'p90':>7} {'p99':>8} "
            f"{'p999':>8} {'max':>8} {'p50/rt':>6} {'stall ms':>8} {'stall/STW':>9} "
            f"{'ops/s before':>12} {'during':>9} {'ok':>3}")
    print(head)
    print("-" * len(head))
    for label, _ in rows:
        stw = results[(label, "stop-the-world")]
        for strategy in ("stop-the-world", "uffd-wp"):
            r = results[(label, strategy)]
            gbs = r["bytes"] / (r["snapshot_ms"] * 1e6)
            p50rt = r["p50"] / rt_p50 if r["p50"] is not None else None
            print(f"{label:7} {strategy:15} {r['snapshot_ms']:8.1f} {gbs:6.2f} "
                  f"{gbs / memcpy_gbs:8.2f} "
                  f"{r['arm_ms']:7.1f} {r['pause_ms']:8.1f} {r['faults']:7.0f} {fmt(r['p50']):>7} "
                  f"{fmt(r['p90']):>7} {fmt(r['p99']):>8} {fmt(r['p999']):>8} {fmt(r['max']):>8} "
                  f"{fmt(p50rt, '.2f'):>6} {r['stall_max_ms']:8.1f} "
                  f"{r['stall_max_ms'] / stw['stall_max_ms']:9.3f} {r['ops_before']:12.0f} "
                  f"{r['ops_during']:9.0f} {'yes' if r['consistent'] else 'NO':>3}")

    wp, stw = results[("200k/s", "uffd-wp")], results[("200k/s", "stop-the-world")]
    gbs = wp["bytes"] / (wp["snapshot_ms"] * 1e6)
    checks = [
        ("uffd-wp throughput >= 0.5x memcpy", gbs / memcpy_gbs, 0.5, ">="),
        ("max writer stall <= 0.1x stop-the-world", wp["stall_max_ms"] / stw["stall_max_ms"],
         0.1, "<="),
        ("p50 fault-to-resolve <= 1.5x round trip", (wp["p50"] or 0) / rt_p50, 1.5, "<="),
    ]
    print("\ntargets, rate-limited row:")
    for name, value, limit, op in checks:
        ok = value >= limit if op == ">=" else value <= limit
        print(f"  {name:42} {value:6.2f}  {'met' if ok else 'MISSED'}")
    if args.json:
        print(json.dumps({"floors": fl, "runs": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
