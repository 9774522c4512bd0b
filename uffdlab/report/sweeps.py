# SPDX-License-Identifier: MIT
"""A sweep for a reader: a row per point, the notes not to miss, and how to
group its runs in a plot."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .tables import verdict

if TYPE_CHECKING:
    import pandas as pd

    from ..results import Frames
    from ..sweep import SweepIndex


def sweep_table(index: SweepIndex, frames: Frames) -> pd.DataFrame:
    """A row per point (failed ones too): its parameters, status, time, the
    host that ran it (a sweep on a cluster) and its run's main metrics and
    verdict."""
    import pandas as pd

    hosts = ["host"] if any(p.host for p in index.points) else []
    points = pd.DataFrame(
        [{"point": p.index, **p.params, "status": str(p.status), "run_id": p.run_id,
          "seconds": p.seconds, "host": f"{p.host} ({p.worker})" if p.worker else p.host}
         for p in index.points],
        columns=["point", *index.grid, "status", "run_id", "seconds", *hosts])
    metrics = frames.runs[["run_id", "accel", "snapshot_ms", "pause_ms", "lat_p99_us",
                           "stall_max_ms", "mismatched_pages"]]
    table = points.merge(metrics, on="run_id", how="left")
    by_id = frames.runs.set_index("run_id")
    table["verdict"] = [verdict(by_id.loc[p.run_id])
                        if p.run_id in by_id.index else
                        f"FAILED: {p.error}" if p.error else str(p.status)
                        for p in index.points]
    return table.set_index("point")


def sweep_notes(index: SweepIndex, frames: Frames) -> str:
    """Lines a reader must not miss: failed points, and runs that mix
    accelerators (TCG and KVM numbers are not comparable)."""
    lines = [f"point {p.index} failed: {p.error}  (notebook: {p.notebook})"
             for p in index.failed]
    accels = sorted(set(frames.runs["accel"].dropna()))
    if len(accels) > 1:
        lines.append(f"WARNING: these runs mix accelerators {accels} - compare within "
                     f"one only")
    return "\n".join(lines)


def sweep_groups(runs: pd.DataFrame, x: str) -> list[str]:
    """The `by` columns for plotting a sweep's runs against `x`: a line per
    strategy and per value of every other parameter the runs vary."""
    vary = [c for c in ("param_size", "param_writers", "param_backing", "param_pattern")
            if c in runs and runs[c].nunique() > 1]
    return ["param_strategy"] + [c for c in vary if c != x]
