# SPDX-License-Identifier: MIT
"""One shape for every run a report shows: RunView.

Notebooks hand reports whatever they have: a RunResult, a dict from
`ResultsDB.get()` or `.runs()`, a row or the whole `runs` table of
`results.load(...)`, the Frames themselves, a list of these or
{label: result}. `as_runs` turns any of them into RunViews, and every table
and plot reads RunViews only, so the question "which kind of input is this"
is answered here and nowhere else.
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..model import RunResult
from ..results import METRICS, Frames


@dataclass(frozen=True)
class RunView:
    """What a report may ask of one run, whatever it was read from."""

    label: str                        # how a legend or a column names the run
    run_id: str | None = None
    scenario: str | None = None
    scenario_name: str | None = None
    status: str | None = None
    error: str | None = None
    started: float | None = None
    vm: str | None = None
    image: str | None = None
    image_key: str | None = None
    kernel: str | None = None
    accel: str | None = None
    tools_version: str | None = None
    tools_digest: str | None = None
    image_content: str | None = None
    lock_hash: str | None = None
    qemu: str | None = None
    rerun_of: str | None = None
    command: str | None = None
    expect_consistent: bool | None = None
    consistent: bool | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    summary: Mapping[str, Any] = field(default_factory=dict)  # {}: only stored columns known
    columns: Mapping[str, Any] = field(default_factory=dict)  # stored metric columns
    latency: tuple[tuple[float, int], ...] = ()  # histogram: (bucket upper bound us, count)
    faults_per_process: tuple[int, ...] | None = None
    mismatches_by_cause: Mapping[str, int] | None = None
    stderr: str | None = None
    serial_log: str | None = None
    floors: Mapping[str, Any] = field(default_factory=dict)  # uffd-bench after the run

    def metric(self, column: str) -> Any:
        """A summary metric by its results column name (see results.METRICS):
        from the summary record when the run has one, else the stored column."""
        value: Any = self.summary
        for key in METRICS[column]:
            value = value.get(key) if isinstance(value, Mapping) else None
        return value if value is not None else self.columns.get(column)

    def setting(self, key: str) -> Any:
        """What the tool reported for `key` (strategy, backing, writers...), else
        the parameter the run was given."""
        v = self.summary.get(key)
        return v if v is not None else self.params.get(key)


def as_run(source: Any) -> RunView:
    """One run as a RunView; TypeError for something that is not one run."""
    if isinstance(source, RunView):
        return source
    if isinstance(source, RunResult):
        return _view({f.name: getattr(source, f.name) for f in fields(source)})
    if _is_series(source):
        record = source.to_dict()
        if "run_id" not in record and isinstance(source.name, str):
            record["run_id"] = source.name      # a row of runs.set_index("run_id")
        return _view(record)
    if isinstance(source, Mapping) and _is_record(source):
        return _view(source)
    raise TypeError(f"expected one run (a RunResult, a stored run dict or a row of "
                    f"results.load().runs), got {type(source).__name__}")


def as_runs(source: Any) -> list[RunView]:
    """Every run in `source`, labelled.

    {label: result} keeps its labels; a table, the Frames or a list label
    runs by scenario and strategy, adding the parameters that differ (then
    the run id) where two runs would share a label.
    """
    if isinstance(source, Frames):
        return _distinct(_from_frames(source))
    if _is_dataframe(source):
        return _distinct([as_run(row) for _, row in source.iterrows()])
    if _is_single(source):
        return [as_run(source)]
    if isinstance(source, Mapping):
        return [replace(as_run(r), label=str(label)) for label, r in source.items()]
    return _distinct([as_run(r) for r in source])


def subset(frames: Frames, run_ids: Iterable[str]) -> Frames:
    """The same Frames restricted to these run ids (order of `frames.runs`)."""
    ids = {r for r in run_ids if r}
    keep = lambda df: df[df["run_id"].isin(ids)].reset_index(drop=True)  # noqa: E731
    return replace(frames, runs=keep(frames.runs), latency=keep(frames.latency),
                   faults=keep(frames.faults), mismatches=keep(frames.mismatches))


# -- building views -------------------------------------------------------------

def _is_series(x: Any) -> bool:
    pd = sys.modules.get("pandas")      # not loaded: x cannot be a pandas object
    return pd is not None and isinstance(x, pd.Series)


def _is_dataframe(x: Any) -> bool:
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(x, pd.DataFrame)


def _is_record(m: Mapping) -> bool:
    return any(k in m for k in ("run_id", "summary", "status"))


def _is_single(x: Any) -> bool:
    return isinstance(x, (RunView, RunResult)) or _is_series(x) or (
        isinstance(x, Mapping) and _is_record(x))


def _plain(v: Any) -> Any:
    """None for what pandas and SQLite mean by missing; numpy scalars as Python's."""
    if v is None:
        return None
    pd = sys.modules.get("pandas")
    if pd is not None and (v is pd.NA or v is pd.NaT):
        return None
    if type(v).__module__ == "numpy" and hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _json_object(v: Any) -> dict | None:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return None
    return dict(v) if isinstance(v, Mapping) else None


def _view(record: Mapping[str, Any], latency: Iterable | None = None,
          faults: Iterable | None = None, mismatches: Mapping | None = None) -> RunView:
    r = {k: _plain(v) for k, v in record.items()}
    summary = _json_object(r.get("summary")) or {}
    params = _json_object(r.get("params")) or {}
    params.update({k.removeprefix("param_"): v for k, v in r.items()
                   if k.startswith("param_") and v is not None})   # rows of load().runs
    hist = summary.get("fault_latency_hist") or {}
    if latency is None and isinstance(hist, Mapping) and hist.get("bounds_us"):
        latency = zip(hist["bounds_us"], hist.get("counts") or [])
    elif latency is None:                    # ResultsDB.get(): [{bound_us, count}]
        latency = ((h["bound_us"], h["count"]) for h in r.get("latency_hist") or [])
    fpp = summary.get("faults_per_process", faults if faults is not None
                      else r.get("faults_per_process"))
    mbc = summary.get("mismatches_by_cause", mismatches if mismatches is not None
                      else r.get("mismatches_by_cause"))
    consistent = summary.get("consistent", r.get("consistent"))
    expect = r.get("expect_consistent")
    strategy = params.get("strategy") or summary.get("strategy")
    return RunView(
        label=" ".join(str(x) for x in (r.get("scenario") or "?",
                                        strategy or r.get("scenario_name")) if x),
        run_id=r.get("run_id"), scenario=r.get("scenario"),
        scenario_name=r.get("scenario_name"),
        status=None if r.get("status") is None else str(r["status"]),
        error=r.get("error"), started=r.get("started"), vm=r.get("vm"),
        image=r.get("image"), image_key=r.get("image_key"), kernel=r.get("kernel"),
        accel=r.get("accel"), tools_version=r.get("tools_version"),
        tools_digest=r.get("tools_digest"), image_content=r.get("image_content"),
        lock_hash=r.get("lock_hash"), qemu=r.get("qemu"), rerun_of=r.get("rerun_of"),
        command=r.get("command"),
        expect_consistent=None if expect is None else bool(expect),
        consistent=None if consistent is None else bool(consistent),
        params=params, summary=summary,
        columns={c: r[c] for c in METRICS if r.get(c) is not None},
        latency=tuple((float(b), int(c)) for b, c in latency),
        faults_per_process=None if fpp is None else tuple(int(n) for n in fpp),
        mismatches_by_cause=None if mbc is None else {str(k): int(n)
                                                       for k, n in dict(mbc).items()},
        stderr=r.get("stderr"), serial_log=r.get("serial_log"),
        floors=_json_object(r.get("floors")) or {})


def _from_frames(frames: Frames) -> list[RunView]:
    """One view per row of `frames.runs`, with its rows of the other tables."""
    def by_run(df, *cols):
        return {rid: list(zip(*(g[c] for c in cols))) for rid, g in df.groupby("run_id")}

    latency = by_run(frames.latency, "bound_us", "count")
    faults = by_run(frames.faults, "faults")
    mismatches = by_run(frames.mismatches, "cause", "pages")
    views = []
    for _, row in frames.runs.iterrows():
        rid = row["run_id"]
        views.append(_view(row.to_dict(), latency.get(rid, []),
                           [n for (n,) in faults[rid]] if rid in faults else None,
                           dict(mismatches.get(rid, []))))    # no rows: no mismatch
    return views


def _distinct(views: list[RunView]) -> list[RunView]:
    """Labels that tell runs apart: first the parameters that differ between
    them, then, if two still look the same, the run id."""
    def clashes(vs):
        labels = [v.label for v in vs]
        return len(set(labels)) < len(labels)

    if not clashes(views):
        return views
    shared = set.intersection(*(set(v.params) for v in views)) - {"strategy"}
    vary = sorted(k for k in shared if len({str(v.params[k]) for v in views}) > 1)
    views = [replace(v, label=" ".join([v.label, *(f"{k}={v.params[k]}" for k in vary)]))
             for v in views]
    if clashes(views):
        views = [replace(v, label=f"{v.label} {(v.run_id or '?')[:6]}") for v in views]
    return views
