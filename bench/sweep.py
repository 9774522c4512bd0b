#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: a sweep with a fresh VM per point against the same sweep
sharing one VM (not a test).

    .venv/bin/python bench/sweep.py [--lab lab.yml] [--image trixie] [--points 10]

Both sweeps execute 10-snapshot.ipynb with papermill for every point (S1,
16M, 1 s, a different seed each), exactly as `uffdlab sweep` does; only the
grid's `fresh` differs. The shape's template is made first (not timed), so
a fresh point costs one restore. Target: fresh <= 1.2x shared. Runs go to a
temporary results database; nothing of the lab's is touched but its image
and template cache.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from uffdlab.api import ready, vm_for  # noqa: E402
from uffdlab.config import load_lab  # noqa: E402
from uffdlab.sweep import Grid, run_sweep  # noqa: E402

TARGET = 1.2
MEMORY, CPUS = "1536M", 2


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


def listener(ev) -> None:
    if ev.kind != "heartbeat":
        log(f"{time.monotonic() - T0:7.2f} {ev}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", default=str(REPO / "lab.yml"))
    ap.add_argument("--image", default="trixie")
    ap.add_argument("--points", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="uffdlab-bench-sweep-") as tmp:
        lab = load_lab(args.lab)
        lab = lab.model_copy(update={"results": Path(tmp) / "results.sqlite"})
        log("making sure the shape has a template (not timed)")
        shared = vm_for(lab, args.image, MEMORY, CPUS)
        ready(shared)
        times = {}
        for fresh in (False, True):
            grid = Grid.model_validate(
                {"fixed": {"image": args.image, "vm_memory": MEMORY, "vm_cpus": CPUS,
                           "strategy": "stop-the-world", "size": "16M", "duration": 1.0},
                 "grid": {"rate": [str(1000 + i) for i in range(args.points)]},
                 "teardown": False, "fresh": fresh})
            log(f"{args.points} points, fresh={fresh}")
            t = time.monotonic()
            res = run_sweep(lab, grid, listener, out_root=Path(tmp) / "sweeps")
            times[fresh] = time.monotonic() - t
            failed = [p for p in res.points if p.status not in ("ok", "inconsistent")]
            if failed:
                log(f"  {len(failed)} points failed: {failed[0].error}")
            log(f"  {times[fresh]:.1f} s")
        shared.down()
    ratio = times[True] / times[False]
    print(f"sweep of {args.points} points (S1 16M 1 s, papermill), image {args.image}")
    print(f"{'shared VM':<28} {times[False]:8.1f} s")
    print(f"{'fresh VM per point':<28} {times[True]:8.1f} s")
    print(f"{'ratio fresh / shared':<28} {ratio:8.2f}x   target <= {TARGET}x: "
          f"{'ok' if ratio <= TARGET else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
