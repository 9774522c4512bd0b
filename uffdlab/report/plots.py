# SPDX-License-Identifier: MIT
"""Figures of runs: latency CDFs, stall against snapshot duration, writer
throughput, and sweeps.

Figures are made with `matplotlib.figure.Figure` (not pyplot): a notebook
shows the returned figure once, and nothing is left open in pyplot's global
state.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..config import parse_size
from ..results import Frames
from .runs import RunView, as_runs

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def _figure(width: float = 7.0, height: float = 3.6, ncols: int = 1):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _say(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _bar_labels(ax, bars, fmt="{:.1f}") -> None:
    for b in bars:
        h = b.get_height()
        if h == h:          # not NaN
            ax.annotate(fmt.format(h), (b.get_x() + b.get_width() / 2, h), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")


def _floats(runs: list[RunView], column: str) -> list[float]:
    """A metric per run, NaN where missing (matplotlib leaves a gap)."""
    return [float("nan") if (v := r.metric(column)) is None else float(v) for r in runs]


def plot_latency_cdf(source: Any, title: str = "fault-to-resolve latency") -> Figure:
    """CDF of fault latency (log x), one line per run.

    `source`: anything `as_runs` takes (Frames, a runs table, one result, a
    list, {label: result}). The histogram buckets are powers of two, so the
    CDF is a step at each bucket's upper bound.
    """
    fig, (ax,) = _figure()
    drawn = 0
    for run in as_runs(source):
        bounds = [b for b, _ in run.latency]
        counts = [c for _, c in run.latency]
        total = sum(counts)
        if not total:
            continue
        acc, cdf = 0, []
        for c in counts:
            acc += c
            cdf.append(acc / total)
        ax.step([bounds[0] / 2] + bounds, [0.0] + cdf, where="post",
                label=f"{run.label} ({total:,} faults)")
        drawn += 1
    if drawn:
        from matplotlib.ticker import FuncFormatter
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.axhline(0.99, color="grey", lw=0.6, ls=":")
        ax.text(ax.get_xlim()[0], 0.99, " p99", va="bottom", fontsize=8, color="grey")
        ax.legend(fontsize=8, loc="lower right")
    else:
        _say(ax, "no write-protect faults in these runs")
    ax.set_xlabel("latency bucket upper bound (us)")
    ax.set_ylabel("fraction of faults")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def plot_stall_vs_duration(results: Any) -> Figure:
    """Per run: snapshot duration next to the longest writer stall.

    Stop-the-world stalls writers for the whole copy; uffd-wp keeps the
    stall to the pause plus single faults, at the price of a longer snapshot.
    """
    import numpy as np

    runs = as_runs(results)
    fig, axes = _figure(width=max(6.5, 2.2 * len(runs) + 3), height=3.8, ncols=2)
    if not runs:
        for ax in axes:
            _say(ax, "no runs to plot")
        return fig
    x = np.arange(len(runs))
    ax = axes[0]
    _bar_labels(ax, ax.bar(x, _floats(runs, "snapshot_ms"), color="tab:blue"))
    ax.set_title("snapshot duration (start to last page copied)")
    ax.set_ylabel("ms")
    ax = axes[1]
    w = 0.38
    _bar_labels(ax, ax.bar(x - w / 2, _floats(runs, "stall_max_ms"), w,
                           label="longest writer stall", color="tab:red"), "{:.2f}")
    _bar_labels(ax, ax.bar(x + w / 2, _floats(runs, "pause_ms"), w,
                           label="pause of all writers", color="tab:orange"), "{:.2f}")
    ax.set_title("what writers feel")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, [r.label for r in runs], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    return fig


def plot_throughput(result: Any) -> Figure:
    """Writer page writes/s in the warm-up and during the snapshot."""
    import numpy as np

    runs = as_runs(result)
    fig, (ax,) = _figure(width=max(5.0, 1.8 * len(runs) + 3))
    if not runs:
        _say(ax, "no runs to plot")
        return fig
    x = np.arange(len(runs))
    w = 0.38
    _bar_labels(ax, ax.bar(x - w / 2, _floats(runs, "ops_before"), w,
                           label="before (warm-up)", color="tab:green"), "{:,.0f}")
    _bar_labels(ax, ax.bar(x + w / 2, _floats(runs, "ops_during"), w,
                           label="during the snapshot", color="tab:purple"), "{:,.0f}")
    target = runs[0].params.get("rate")
    if target not in (None, "max"):
        ax.axhline(float(target), color="grey", ls=":", lw=1)
        ax.text(ax.get_xlim()[0], float(target), f" requested {float(target):,.0f}/s",
                va="bottom", fontsize=8, color="grey")
    ax.set_xticks(x, [r.label for r in runs], fontsize=8)
    ax.set_ylabel("page writes/s (all writers)")
    ax.set_title("writer throughput")
    ax.legend(fontsize=8, loc="upper right")
    ax.margins(y=0.25)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_rerun(comparison: Any) -> Figure:
    """A rerun (rerun.Comparison): per metric, the repeats as points and their
    spread as a bar, the original as a diamond; each metric on its own axis,
    scaled to the original."""
    rows = [m for m in comparison.rows if m.original is not None or any(
        v is not None for v in m.repeats)]
    fig, (ax,) = _figure(width=max(5.0, 1.2 * len(rows) + 2))
    if not rows:
        _say(ax, "nothing to compare")
        return fig
    for i, m in enumerate(rows):
        scale = m.original if m.original not in (None, 0) else (
            max((abs(v) for v in m.repeats if v is not None), default=1) or 1)
        reps = [v / scale for v in m.repeats if v is not None]
        if len(reps) > 1:
            ax.plot([i, i], [min(reps), max(reps)], color="tab:blue", lw=6, alpha=0.3,
                    label="spread of the repeats" if i == 0 else None)
        ax.scatter([i] * len(reps), reps, color="tab:blue", s=18, zorder=3,
                   label="repeats" if i == 0 else None)
        if m.original is not None:
            ax.scatter([i], [m.original / scale], marker="D", s=50, zorder=4,
                       color="tab:red" if m.within is False else "black",
                       label="original" if i == 0 else None)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(rows)), [_NICE.get(m.metric, m.metric) for m in rows],
                  fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("relative to the original")
    ax.set_title(f"rerun of {comparison.original.get('run_id')}: "
                 f"{'same' if comparison.same_verdict else 'DIFFERENT'} verdict")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _sort_key(v: Any) -> Any:
    """Numbers as numbers, sizes ('16M') by bytes, the rest as text."""
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(parse_size(v))
    except (ValueError, TypeError):
        return str(v)


_NICE = {"snapshot_ms": "snapshot duration (ms)", "lat_p99_us": "fault latency p99 (us)",
         "lat_p50_us": "fault latency p50 (us)", "stall_max_ms": "longest writer stall (ms)",
         "param_writers": "writers", "param_size": "guest RAM size",
         "param_strategy": "strategy", "pause_ms": "pause (ms)"}


def plot_sweep(runs: pd.DataFrame, x: str = "param_writers",
               y: str | Sequence[str] = ("snapshot_ms", "lat_p99_us"),
               by: str | Sequence[str] | None = "param_strategy") -> Figure:
    """Metrics against one parameter, a line per group (`by`: one column or
    several, joined in the legend). Repeated points are averaged; runs
    without the metric (failed ones) are left out. Sizes sort by bytes.

    `runs` is the runs table of `results.load(...)` (or of its Frames): a
    sweep groups and averages columns, so it works on the table itself."""
    if isinstance(runs, Frames):
        runs = runs.runs
    ys = [y] if isinstance(y, str) else list(y)
    bys = [] if by is None else [by] if isinstance(by, str) else list(by)
    fig, axes = _figure(width=5.0 * len(ys), height=3.8, ncols=len(ys))
    missing = [c for c in [x, *bys, *ys] if c not in runs.columns]
    if missing or runs.empty:
        for ax in axes:
            _say(ax, "no runs to plot" if runs.empty else f"no column {missing[0]!r}")
        return fig
    xs = sorted(runs[x].dropna().unique(), key=_sort_key)
    pos = {v: i for i, v in enumerate(xs)}
    groups = (sorted(runs.groupby(bys, dropna=False),
                     key=lambda kv: tuple(map(_sort_key, kv[0] if isinstance(kv[0], tuple)
                                              else (kv[0],))))
              if bys else [((), runs)])
    for ax, metric in zip(axes, ys):
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            g = g.dropna(subset=[metric])
            if g.empty:
                continue
            m = g.groupby(x)[metric].mean()
            m = m.iloc[sorted(range(len(m)), key=lambda i: _sort_key(m.index[i]))]
            label = ", ".join(str(v) if i == 0 else f"{b.removeprefix('param_')}={v}"
                              for i, (b, v) in enumerate(zip(bys, key))) or metric
            ax.plot([pos[v] for v in m.index], m.values, marker="o", label=label)
        ax.set_xticks(range(len(xs)), [str(v) for v in xs])
        ax.set_xlabel(_NICE.get(x, x.removeprefix("param_")))
        ax.set_ylabel(_NICE.get(metric, metric))
        ax.set_title(f"{_NICE.get(metric, metric)} vs {_NICE.get(x, x)}", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig
