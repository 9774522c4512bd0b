#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: what the safety checks cost (not a test).

Each figure is a ratio to a baseline measured in the same run:

* refusing a YAML alias bomb, against loading the shipped lab.yml
  (target: well under a second; the ratio shows it costs about a load);
* storing a run through store_run (a write-ahead spool copy, then the
  database) against opening, storing and closing as before (target: <= 1.5x);
* ProcessId.alive() (start time and command line from /proc) against
  os.kill(pid, 0), the check it replaced (target: well under a millisecond).

    .venv/bin/python bench/safety.py [--repeat 200]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from uffdlab.config import ConfigError, load_lab  # noqa: E402
from uffdlab.owned import ProcessId  # noqa: E402
from uffdlab.results import ResultsDB, store_run  # noqa: E402

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi")) + "images: *i\n"


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_fields(i: int) -> dict:
    return {"run_id": f"bench{i:06d}", "started": time.time(), "scenario": "S3",
            "status": "ok", "params": {"size": "16M"},
            "summary": {"consistent": True, "pages": 4096, "snapshot_ms": 12.5,
                        "fault_latency_us": {"p50": 60, "p99": 200},
                        "fault_latency_hist": {"bounds_us": [10, 100, 1000],
                                               "counts": [5, 50, 2]},
                        "faults_per_process": [10, 12, 9, 11]},
            "jsonl": "{}\n" * 50}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=200)
    n = ap.parse_args().repeat

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bomb = tmp / "bomb.yml"
        bomb.write_text(BOMB)

        def refuse():
            try:
                load_lab(bomb)
            except ConfigError:
                return
            raise SystemExit("the alias bomb was accepted")

        load = timed(lambda: load_lab(REPO / "lab.yml"), n)
        rows.append(("refuse an alias bomb (10^9 values)", timed(refuse, n), "load lab.yml",
                     load))

        counter = iter(range(10 ** 9))

        def plain():                 # how a run was stored before the spool
            with ResultsDB(tmp / "plain.sqlite") as db:
                db.store(run_fields(next(counter)))

        rows.append(("store_run (write-ahead copy, then the database)",
                     timed(lambda: store_run(tmp / "safe.sqlite", run_fields(next(counter))),
                           n), "open, store, close", timed(plain, n)))

        me = ProcessId.of(os.getpid(), "")
        rows.append(("ProcessId.alive()", timed(me.alive, n * 10), "os.kill(pid, 0)",
                     timed(lambda: os.kill(os.getpid(), 0), n * 10)))

    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'median':>10}  {'baseline':<24} {'median':>10}  ratio")
    for name, t, base_name, base in rows:
        print(f"{name:<{width}}  {t * 1e3:8.3f}ms  {base_name:<24} {base * 1e3:8.3f}ms  "
              f"{t / base:5.2f}x")


if __name__ == "__main__":
    main()
