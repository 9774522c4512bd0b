#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: what a sweep's points cost around their own work (not a test).

    .venv/bin/python bench/sweep.py [--lab lab.yml] [--image trixie] [--points 10]
    .venv/bin/python bench/sweep.py --dask [--points 4] [--repeat 2] [--tasks 200]

Default: a sweep with a fresh VM per point against the same sweep sharing
one VM. Both execute 10-snapshot.ipynb with papermill for every point (S1,
16M, 1 s, a different seed each), exactly as `uffdlab sweep` does; only the
grid's `fresh` differs. The shape's template is made first (not timed), so
a fresh point costs one restore. Target: fresh <= 1.2x shared.

--dask: the per-point scheduling overhead of Dask against the local loop.
The same fresh-VM sweep runs both ways, alternately (--repeat times each,
medians), the Dask one on a local cluster of one worker with one VM slot
(so nothing runs in parallel), started once beforehand and timed apart; a
mode's overhead per point is its wall time minus the time its points
themselves took, over the points. The wall times are compared too. Then
the dispatch alone: tasks that do nothing, submitted with a vm_slots
request, against calling them in a loop. Target: Dask's overhead at most
0.5 s per point more than the loop's. Last, a scaling table on paper from
the measured point cost: hosts x slots, points per hour.

Runs go to a temporary results database; nothing of the lab's is touched
but its image and template cache.
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
from uffdlab.cluster import run_sweep  # noqa: E402
from uffdlab.config import ClusterSpec, load_lab  # noqa: E402
from uffdlab.results import ResultsDB  # noqa: E402
from uffdlab.sweep import Grid  # noqa: E402

TARGET = 1.2
DASK_TARGET = 0.5           # s per point more than the local loop
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
    ap.add_argument("--points", type=int, default=None,
                    help="points per sweep (default 10; 4 with --dask)")
    ap.add_argument("--dask", action="store_true", help="Dask against the local loop")
    ap.add_argument("--tasks", type=int, default=200, help="no-op tasks of the dispatch row")
    ap.add_argument("--repeat", type=int, default=2, help="--dask: sweeps per mode")
    args = ap.parse_args()
    if args.dask:
        return dask_overhead(args)
    args.points = args.points or 10
    with tempfile.TemporaryDirectory(prefix="uffdlab-bench-sweep-") as tmp:
        lab = load_lab(args.lab)
        lab = lab.model_copy(update={"results": Path(tmp) / "results.sqlite"})
        log("making sure the shape has a template (not timed)")
        shared = vm_for(lab, args.image, MEMORY, CPUS)
        ready(shared)
        times = {}
        for fresh in (False, True):
            grid = sweep_grid(args.image, args.points, fresh)
            log(f"{args.points} points, fresh={fresh}")
            t = time.monotonic()
            res = run_sweep(lab, grid, listener, out_root=Path(tmp) / "sweeps", cluster=False)
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


def sweep_grid(image: str, points: int, fresh: bool = True) -> Grid:
    return Grid.model_validate(
        {"fixed": {"image": image, "vm_memory": MEMORY, "vm_cpus": CPUS,
                   "strategy": "stop-the-world", "size": "16M", "duration": 1.0},
         "grid": {"rate": [str(1000 + i) for i in range(points)]},
         "teardown": False, "fresh": fresh})


def noop(i: int) -> int:
    return i


def dispatch(tasks: int) -> tuple[float, float, float]:
    """Seconds per task: a plain loop, Dask one at a time (submit, wait),
    and Dask all at once; one worker, one vm_slots."""
    from distributed import Client, LocalCluster, wait

    t = time.perf_counter()
    for i in range(tasks):
        noop(i)
    loop = (time.perf_counter() - t) / tasks
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      resources={"vm_slots": 1}, dashboard_address=":0",
                      silence_logs=40) as cluster, Client(cluster) as client:
        client.submit(noop, -1, pure=False).result()             # warm
        t = time.perf_counter()
        for i in range(tasks):
            client.submit(noop, i, pure=False, resources={"vm_slots": 1}).result()
        serial = (time.perf_counter() - t) / tasks
        t = time.perf_counter()
        wait([client.submit(noop, i, pure=False, resources={"vm_slots": 1})
              for i in range(tasks)])
        batch = (time.perf_counter() - t) / tasks
    return loop, serial, batch


def dask_overhead(args) -> int:
    import statistics

    from distributed import LocalCluster

    points = args.points or 4
    with tempfile.TemporaryDirectory(prefix="uffdlab-bench-sweep-") as tmp:
        log("starting a local Dask cluster: one worker, one VM slot")
        t = time.monotonic()
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                               resources={"vm_slots": 1}, dashboard_address=":0",
                               silence_logs=40, scheduler_kwargs={"allowed_failures": 1})
        cluster_start = time.monotonic() - t
        lab = load_lab(args.lab)
        # one VM slot: the Dask sweep runs its points one at a time, as the loop does
        lab = lab.model_copy(update={"results": Path(tmp) / "results.sqlite",
                                     "cluster": ClusterSpec(scheduler=cluster.scheduler_address)})
        log("making sure the shape has a template (not timed)")
        shared = vm_for(lab, args.image, MEMORY, CPUS)
        ready(shared)
        shared.down()
        samples: dict[str, list[tuple[float, float]]] = {"loop": [], "dask": []}
        try:
            for r in range(args.repeat):          # alternated: both see the same load
                for mode in ("loop", "dask"):
                    log(f"{points} fresh points, {mode} ({r + 1}/{args.repeat})")
                    t = time.monotonic()
                    res = run_sweep(lab, sweep_grid(args.image, points), listener,
                                    out_root=Path(tmp) / "sweeps", cluster=mode == "dask")
                    wall = time.monotonic() - t
                    work = sum(p.seconds for p in res.points)
                    bad = [p for p in res.points if p.status not in ("ok", "inconsistent")]
                    if bad:
                        log(f"  {len(bad)} points failed: {bad[0].error}")
                    samples[mode].append((wall, work))
                    log(f"  {wall:.1f} s, points {work:.1f} s")
        finally:
            cluster.close()
        with ResultsDB(lab.results_path) as db:
            accel = ",".join(sorted({r["accel"] for r in db.runs()})) or "?"
    rows = {mode: (statistics.median(w for w, _ in xs), statistics.median(k for _, k in xs),
                   statistics.median((w - k) / points for w, k in xs))
            for mode, xs in samples.items()}
    log(f"dispatch of {args.tasks} no-op tasks")
    loop_s, serial_s, batch_s = dispatch(args.tasks)
    point_cost = rows["dask"][1] / points

    print(f"sweep of {points} fresh points (S1 16M 1 s, papermill), image {args.image}, "
          f"one VM slot, median of {args.repeat}; the Dask cluster started once in "
          f"{cluster_start:.1f} s (not counted)")
    print(f"{'mode':<14} {'wall s':>8} {'points s':>9} {'overhead s/point':>17}")
    for mode, (wall, work, per) in rows.items():
        print(f"{mode:<14} {wall:8.1f} {work:9.1f} {per:17.2f}")
    extra = rows["dask"][2] - rows["loop"][2]
    print(f"Dask - loop: {extra:+.2f} s per point   target <= {DASK_TARGET} s: "
          f"{'ok' if extra <= DASK_TARGET else 'MISSED'}; wall time Dask / loop "
          f"{rows['dask'][0] / rows['loop'][0]:.2f}x")
    print(f"\ndispatch per task: loop {loop_s * 1e6:.1f} us; Dask one at a time "
          f"{serial_s * 1e3:.2f} ms ({serial_s / max(loop_s, 1e-9):,.0f}x); all at once "
          f"{batch_s * 1e3:.2f} ms")
    print(f"\nscaling on paper: {point_cost:.1f} s per point (measured here, "
          f"{accel}) "
          f"+ {max(rows['dask'][2], 0):.2f} s Dask overhead")
    slots = (1, 2, 4)
    print(f"{'hosts':>5} " + " ".join(f"{f'{s} slot(s)/host':>16}" for s in slots)
          + "   (points per hour)")
    for hosts in (1, 2, 4, 8, 16):
        cells = [hosts * s * 3600 / (point_cost + max(rows["dask"][2], 0)) for s in slots]
        print(f"{hosts:>5} " + " ".join(f"{c:16,.0f}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
