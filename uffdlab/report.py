"""What notebooks show: a progress listener, tables and plots of runs.

Everything here takes what the rest of the package produces (a RunResult,
a dict from `ResultsDB.get()`, a row of `results.load(...).runs`, or the
`Frames` themselves) and returns a pandas DataFrame, a matplotlib Figure or
a string, so notebooks stay a few lines per step. Figures are made with
`matplotlib.figure.Figure` (not pyplot): a notebook shows the returned
figure once, and nothing is left open in pyplot's global state.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from .events import Event

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

# -- reading any kind of result ----------------------------------------------


def _get(r: Any, key: str, default: Any = None) -> Any:
    """A field of a RunResult, a dict or a pandas row, else `default`."""
    if r is None:
        return default
    if isinstance(r, Mapping):
        v = r.get(key, default)
    elif hasattr(r, "index") and hasattr(r, "get") and not hasattr(r, "summary"):
        v = r.get(key, default)             # a pandas Series
    else:
        v = getattr(r, key, default)
    if isinstance(v, float) and math.isnan(v):
        return default
    try:                                     # pandas NA
        import pandas as pd
        if v is pd.NA:
            return default
    except ImportError:
        pass
    return v


def _summary(r: Any) -> dict:
    s = _get(r, "summary")
    if isinstance(s, str):
        try:
            s = json.loads(s)
        except ValueError:
            s = None
    return s if isinstance(s, Mapping) else {}


def _metric(r: Any, summary_key: str, column: str | None = None) -> Any:
    """A summary metric, from the summary record or the runs column."""
    s = _summary(r)
    if summary_key in s:
        return s[summary_key]
    return _get(r, column or summary_key)


def _consistent(r: Any) -> bool | None:
    s = _summary(r)
    if "consistent" in s:
        return None if s["consistent"] is None else bool(s["consistent"])
    v = _get(r, "consistent")
    return None if v is None else bool(v)


def _label(r: Any) -> str:
    sc = _get(r, "scenario", "?")
    params = _get(r, "params") or {}
    strategy = params.get("strategy") if isinstance(params, Mapping) else None
    strategy = strategy or _get(r, "param_strategy") or _summary(r).get("strategy")
    name = _get(r, "scenario_name")
    return f"{sc} {strategy or name or ''}".strip()


def _labelled(results: Any) -> list[tuple[str, Any]]:
    """(label, result) pairs from one result, a list of them, or {label: result}."""
    if isinstance(results, Mapping) and not _looks_like_result(results):
        return [(str(k), v) for k, v in results.items()]
    if _looks_like_result(results):
        return [(_label(results), results)]
    if hasattr(results, "iterrows"):          # a runs DataFrame
        return [(_label(row), row) for _, row in results.iterrows()]
    return [(_label(r), r) for r in results]


def _looks_like_result(x: Any) -> bool:
    if isinstance(x, Mapping):
        return "run_id" in x or "summary" in x
    return hasattr(x, "run_id") or (hasattr(x, "get") and hasattr(x, "index")
                                    and not hasattr(x, "iterrows") and "run_id" in x.index)


# -- progress -----------------------------------------------------------------


class NotebookProgress:
    """A listener for `vm_for(..., listener=NotebookProgress())`.

    Lifecycle events become one line each (time, VM, kind, message);
    Ansible tasks and a run's `progress` records update one line in place
    (a display that is updated in a notebook, a carriage return in a
    terminal), so a long step shows where it is without flooding the cell.
    Failed tasks and failures are always printed in full.
    """

    def __init__(self, show_tasks: bool = False, stream: Any = None):
        self.show_tasks = show_tasks
        self.stream = stream
        self._handle = None
        self._live_kind: str | None = None
        self._tasks = 0
        self._ipython = self._in_ipython()

    @staticmethod
    def _in_ipython() -> bool:
        try:
            from IPython import get_ipython
            return get_ipython() is not None
        except ImportError:
            return False

    # one line, updated in place
    def _live(self, kind: str, text: str) -> None:
        if self._ipython and self.stream is None:
            from IPython.display import display, update_display
            if self._handle is None or self._live_kind != kind:
                self._handle = display({"text/plain": text}, raw=True, display_id=True)
                self._live_kind = kind
            else:
                update_display({"text/plain": text}, raw=True,
                               display_id=self._handle.display_id)
        else:
            out = self.stream or sys.stdout
            out.write("\r" + text[:150].ljust(150))
            out.flush()
            self._live_kind = kind

    def _line(self, text: str) -> None:
        if not self._ipython and self._live_kind is not None:
            (self.stream or sys.stdout).write("\n")
        self._live_kind = None
        self._handle = None
        print(text, file=self.stream or sys.stdout, flush=True)

    def __call__(self, event: Event) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
        head = f"{stamp} [{event.subject}]"
        if event.kind == "progress":
            d = event.data
            done, total = d.get("done") or 0, d.get("total") or 0
            frac = done / total if total else 0.0
            bar = "#" * int(frac * 30)
            self._live("progress", f"{head} {d.get('phase') or 'run':>14} "
                       f"[{bar:<30}] {done}/{total} pages, {d.get('faults', 0)} faults")
        elif event.kind == "task":
            self._tasks += 1
            state = event.data.get("state")
            if state == "failed" or self.show_tasks:
                self._line(f"{head} task: {event.message}")
            else:
                self._live("task", f"{head} ansible task {self._tasks}: {event.message}")
        else:
            self._line(f"{head} {event.kind}: {event.message}" if event.message
                       else f"{head} {event.kind}")


# -- tables -------------------------------------------------------------------

# What uffd-probe checks besides the feature bits: (label, probe key, first kernel)
_PROBE_EXTRAS = (
    ("WP register on memfd", ("wp_register", "memfd"), "5.19"),
    ("WP register on shmem file", ("wp_register", "shmem"), "5.19"),
    ("WP register on hugetlbfs", ("wp_register", "hugetlbfs"), "5.19"),
    ("WP register on anonymous", ("wp_register", "anon"), "5.7"),
    ("UFFD_USER_MODE_ONLY", ("user_mode_only",), "5.11"),
    ("/dev/userfaultfd", ("dev_userfaultfd",), "6.1"),
    ("PAGEMAP_SCAN ioctl", ("pagemap_scan",), "6.7"),
)
# Feature bits the snapshot scenarios depend on, and why.
FEATURE_NOTES = {
    "PAGEFAULT_FLAG_WP": "write-protect faults reported (anonymous WP)",
    "EVENT_FORK": "a fork child's mm gets its own uffd",
    "EXACT_ADDRESS": "fault address not rounded to the page",
    "WP_HUGETLBFS_SHMEM": "uffd-wp on shared memory: PTE markers",
    "WP_UNPOPULATED": "empty anonymous PTEs protected too",
    "WP_ASYNC": "kernel resolves WP faults itself (dirty tracking)",
    "MOVE": "UFFDIO_MOVE",
}


def _is_probe(d: Any) -> bool:
    return isinstance(d, Mapping) and ("features" in d or d.get("type") == "probe")


def _mark(v: Any) -> str:
    return "✓" if v is True else "✗" if v is False else "–"


def _version_key(v: Any) -> tuple:
    try:
        return tuple(int(x) for x in str(v).split("."))
    except ValueError:
        return (99,)


def feature_table(probe_or_probes: Mapping[str, Any]) -> "pd.DataFrame":
    """The kernel's uffd features as uffd-probe found them.

    One probe (the `facts['probe']` dict) gives one column; a dict
    {label: probe} (e.g. {'bookworm': ..., 'trixie': ...}) gives them side
    by side, headed 'label (kernel)'. Rows: each feature bit and the other
    probe checks, with the first Linux release that has it; ordered by that
    release. ✓ offered, ✗ not offered, – could not be tried.
    """
    import pandas as pd

    probes = ({"guest": probe_or_probes} if _is_probe(probe_or_probes)
              else dict(probe_or_probes))
    if not probes:
        raise ValueError("feature_table: expected a probe dict or {label: probe}, got none")
    first: dict[str, str] = {}
    names: list[str] = []
    for p in probes.values():
        for name in (p or {}).get("features", {}):
            if name not in names:
                names.append(name)
        first.update((p or {}).get("feature_min_kernel", {}))
    rows = []
    for name in names:
        rows.append({"feature": f"UFFD_FEATURE_{name}", "first kernel": first.get(name, "?"),
                     "what for": FEATURE_NOTES.get(name, ""),
                     **{_col(lbl, p): _mark((p or {}).get("features", {}).get(name))
                        for lbl, p in probes.items()}})
    for label, path, kernel in _PROBE_EXTRAS:
        cells = {}
        for lbl, p in probes.items():
            v: Any = p or {}
            for k in path:
                v = v.get(k) if isinstance(v, Mapping) else None
            cells[_col(lbl, p)] = _mark(v)
        rows.append({"feature": label, "first kernel": kernel, "what for": "", **cells})
    df = pd.DataFrame(rows)
    df = df.iloc[sorted(range(len(df)), key=lambda i: _version_key(df["first kernel"][i]))]
    return df.set_index("feature")


def _col(label: str, probe: Any) -> str:
    k = (probe or {}).get("kernel")
    return f"{label} ({k})" if k and k != label else label


_SUMMARY_ROWS = (  # label, summary key or (key, subkey), unit
    ("strategy", "strategy", ""),
    ("backing", "backing", ""),
    ("writers", "writers", "processes"),
    ("RAM", "bytes", "MiB"),
    ("snapshot duration", "snapshot_ms", "ms"),
    ("copy after the instant", "copy_ms", "ms"),
    ("arming (protect)", "arm_ms", "ms"),
    ("pause", "pause_ms", "ms"),
    ("copy throughput", "throughput_mb_s", "MB/s"),
    ("faults (snapshot)", "faults_total", ""),
    ("faults per process", "faults_per_process", ""),
    ("fault latency p50", ("fault_latency_us", "p50"), "us"),
    ("fault latency p99", ("fault_latency_us", "p99"), "us"),
    ("fault latency max", ("fault_latency_us", "max"), "us"),
    ("writer stall max", "writer_stall_max_ms", "ms"),
    ("writer stall total", "writer_stall_total_ms", "ms"),
    ("writer ops/s before", "writer_ops_per_s_before", "ops/s"),
    ("writer ops/s during", "writer_ops_per_s_during", "ops/s"),
    ("pages populated", "pages_populated", "pages"),
    ("page tables delta", "vmpte_kb_delta", "kB"),
    ("consistent", "consistent", ""),
    ("mismatched pages", "mismatched_pages", "pages"),
    ("mismatches by cause", "mismatches_by_cause", ""),
)
_COLUMN_OF = {"fault_latency_us.p50": "lat_p50_us", "fault_latency_us.p99": "lat_p99_us",
              "fault_latency_us.max": "lat_max_us", "writer_stall_max_ms": "stall_max_ms",
              "writer_stall_total_ms": "stall_total_ms",
              "writer_ops_per_s_before": "ops_before", "writer_ops_per_s_during": "ops_during"}


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        a = abs(v)
        return f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items()) or "none"
    if isinstance(v, (list, tuple)):
        return " / ".join(_fmt(x) for x in v)
    return str(v)


def summary_table(result: Any) -> "pd.DataFrame":
    """The run's main figures, one per row (metric, value, unit)."""
    import pandas as pd

    s = _summary(result)
    rows = [{"metric": "scenario", "value": f"{_get(result, 'scenario', '?')} "
             f"{_get(result, 'scenario_name', '') or ''}".strip(), "unit": ""},
            {"metric": "status", "value": str(_get(result, "status", "?")), "unit": ""}]
    for label, key, unit in _SUMMARY_ROWS:
        if isinstance(key, tuple):
            v = (s.get(key[0]) or {}).get(key[1]) if s else None
            flat = ".".join(key)
        else:
            v, flat = s.get(key) if s else None, key
        if v is None and not s:
            v = _get(result, _COLUMN_OF.get(flat, flat))
        if v is None and key in ("mismatches_by_cause", "faults_per_process"):
            v = _get(result, key)
        if v is None and label in ("pages populated", "page tables delta", "copy after "
                                   "the instant", "arming (protect)", "faults per process"):
            continue
        if unit == "MiB" and isinstance(v, (int, float)):
            v = v / 2**20
        rows.append({"metric": label, "value": _fmt(v), "unit": unit})
    if _get(result, "error"):
        rows.append({"metric": "error", "value": str(_get(result, "error")), "unit": ""})
    return pd.DataFrame(rows).set_index("metric")


def provenance(result: Any) -> "pd.DataFrame":
    """Where a number came from: run id, kernel, accel, tools, image, command."""
    import pandas as pd

    started = _get(result, "started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started)))
            if started is not None else "–")
    rows = [("run id", _get(result, "run_id")), ("started", when),
            ("scenario", f"{_get(result, 'scenario', '')} {_get(result, 'scenario_name', '')}"),
            ("vm", _get(result, "vm")), ("image", _get(result, "image")),
            ("image key", _get(result, "image_key")), ("kernel", _get(result, "kernel")),
            ("accel", _get(result, "accel")),
            ("guest tools version", _get(result, "tools_version")),
            ("command", _get(result, "command"))]
    df = pd.DataFrame([{"": k, "value": "–" if v is None else str(v)} for k, v in rows])
    return df.set_index("")


def verdict(result: Any) -> str:
    """One line: the consistency verdict against what the scenario expects."""
    status = _get(result, "status")
    if status in ("failed", "timeout"):
        err = str(_get(result, "error") or "no error message").strip().splitlines()
        return f"{status.upper()}: {err[0] if err else ''}"
    consistent = _consistent(result)
    expect = _get(result, "expect_consistent")
    if consistent is None:
        return "not verified"
    tail = "" if expect is None else (" (expected)" if bool(expect) == consistent
                                      else " (UNEXPECTED)")
    if consistent:
        ok = "✓" if expect is not False else "✗"
        return ("consistent ✓ as expected" if expect is True
                else f"consistent {ok}{tail}")
    pages = _metric(result, "mismatched_pages")
    causes = _summary(result).get("mismatches_by_cause") or _get(result,
                                                                "mismatches_by_cause") or {}
    if causes:
        top = sorted(causes.items(), key=lambda kv: -kv[1])
        cause = ("cause " + top[0][0] if len(top) == 1 else
                 "causes " + ", ".join(f"{c} ({n})" for c, n in top))
    else:
        cause = "cause unknown"
    n = f"{int(pages):,} pages" if pages is not None else "pages unknown"
    return f"INCONSISTENT: {n}, {cause}{tail}"


def failure_text(result: Any, serial_lines: int = 40) -> str:
    """A failed run's error, stderr and the guest console tail, for printing."""
    parts = [f"{_get(result, 'status', '?')}: {_get(result, 'error') or 'no error message'}"]
    if _get(result, "stderr"):
        parts += ["--- stderr ---", str(_get(result, "stderr")).strip()[-3000:]]
    serial = _get(result, "serial_log")
    if serial:
        parts += [f"--- guest serial console (last {serial_lines} lines) ---",
                  "\n".join(str(serial).splitlines()[-serial_lines:])]
    return "\n".join(parts)


def result_line(result: Any) -> str:
    """`RESULT {...}`: the machine-readable last line of a scenario notebook."""
    out = {"run_id": _get(result, "run_id"), "status": _get(result, "status"),
           "consistent": _consistent(result)}
    if _get(result, "error"):
        out["error"] = str(_get(result, "error")).strip().splitlines()[0][:500]
    return "RESULT " + json.dumps(out)


def support(vm: Any, scenario_key: str, params: Mapping[str, Any] | None,
            probe: Mapping | None) -> tuple[bool, str]:
    """Whether this VM's kernel can run a scenario, without running it:
    (True, '') or (False, 'not supported (needs WP_ASYNC, Linux 6.7)')."""
    import re

    from . import runner, scenarios
    try:
        prep = runner.prepare(vm, scenario_key, dict(params or {}))
        scenarios.check_against(prep.scenario, prep.params, vm.spec.memory, probe)
    except scenarios.ScenarioError as e:
        m = re.search(r"UFFD_FEATURE_(\w+) \(first in Linux ([\d.?]+)\)", str(e))
        if m:
            return False, f"not supported (needs {m.group(1)}, Linux {m.group(2)})"
        return False, f"not supported ({e})"
    return True, ""


# -- plots --------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 3.6, ncols: int = 1):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _hist_of(r: Any) -> tuple[list[float], list[int]]:
    h = _summary(r).get("fault_latency_hist") or {}
    if h.get("bounds_us"):
        return list(map(float, h["bounds_us"])), list(map(int, h["counts"]))
    lh = _get(r, "latency_hist")
    if lh:
        return [float(x["bound_us"]) for x in lh], [int(x["count"]) for x in lh]
    return [], []


def plot_latency_cdf(source: Any, title: str = "fault-to-resolve latency") -> "Figure":
    """CDF of fault latency (log x), one line per run.

    `source`: `Frames` (its `latency` table, runs labelled from `runs`), one
    result, a list of results, or {label: result}. The histogram buckets are
    powers of two, so the CDF is a step at each bucket's upper bound.
    """
    fig, (ax,) = _figure()
    lines: list[tuple[str, list[float], list[float]]] = []
    if hasattr(source, "latency") and hasattr(source, "runs"):
        runs = source.runs
        vary = [c for c in runs.columns if c.startswith("param_") and c != "param_strategy"
                and runs[c].astype(str).nunique() > 1]
        labels = {row["run_id"]: " ".join([_label(row), *(f"{c.removeprefix('param_')}="
                                                           f"{row[c]}" for c in vary)])
                  if vary else f"{_label(row)} {row['run_id'][:6]}"
                  for _, row in runs.iterrows()}
        for rid, g in source.latency.groupby("run_id", sort=False):
            lines.append((labels.get(rid, rid), list(g["bound_us"]), list(g["cdf"])))
    else:
        for label, r in _labelled(source):
            bounds, counts = _hist_of(r)
            total = sum(counts)
            if total:
                acc, cdf = 0, []
                for c in counts:
                    acc += c
                    cdf.append(acc / total)
                lines.append((f"{label} ({total:,} faults)", bounds, cdf))
    for label, x, y in lines:
        ax.step([x[0] / 2] + x, [0.0] + y, where="post", label=label)
    if lines:
        from matplotlib.ticker import FuncFormatter
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.axhline(0.99, color="grey", lw=0.6, ls=":")
        ax.text(ax.get_xlim()[0], 0.99, " p99", va="bottom", fontsize=8, color="grey")
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no write-protect faults in these runs", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("latency bucket upper bound (us)")
    ax.set_ylabel("fraction of faults")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def _bar_labels(ax, bars, fmt="{:.1f}") -> None:
    for b in bars:
        h = b.get_height()
        if h == h:          # not NaN
            ax.annotate(fmt.format(h), (b.get_x() + b.get_width() / 2, h), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")


def plot_stall_vs_duration(results: Any) -> "Figure":
    """Per run: snapshot duration next to the longest writer stall.

    Stop-the-world stalls writers for the whole copy; uffd-wp keeps the
    stall to the pause plus single faults, at the price of a longer snapshot.
    """
    import numpy as np

    items = _labelled(results)
    fig, axes = _figure(width=max(6.5, 2.2 * len(items) + 3), height=3.8, ncols=2)
    labels = [lbl for lbl, _ in items]
    x = np.arange(len(items))
    dur = [float(_metric(r, "snapshot_ms") or np.nan) for _, r in items]
    pause = [float(_metric(r, "pause_ms") or np.nan) for _, r in items]
    stall = [float(_metric(r, "writer_stall_max_ms", "stall_max_ms") or np.nan)
             for _, r in items]
    ax = axes[0]
    _bar_labels(ax, ax.bar(x, dur, color="tab:blue"))
    ax.set_title("snapshot duration (start to last page copied)")
    ax.set_ylabel("ms")
    ax = axes[1]
    w = 0.38
    _bar_labels(ax, ax.bar(x - w / 2, stall, w, label="longest writer stall",
                           color="tab:red"), "{:.2f}")
    _bar_labels(ax, ax.bar(x + w / 2, pause, w, label="pause of all writers",
                           color="tab:orange"), "{:.2f}")
    ax.set_title("what writers feel")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    return fig


def plot_throughput(result: Any) -> "Figure":
    """Writer page writes/s in the warm-up and during the snapshot."""
    import numpy as np

    items = _labelled(result)
    fig, (ax,) = _figure(width=max(5.0, 1.8 * len(items) + 3))
    x = np.arange(len(items))
    w = 0.38
    before = [float(_metric(r, "writer_ops_per_s_before", "ops_before") or np.nan)
              for _, r in items]
    during = [float(_metric(r, "writer_ops_per_s_during", "ops_during") or np.nan)
              for _, r in items]
    _bar_labels(ax, ax.bar(x - w / 2, before, w, label="before (warm-up)", color="tab:green"),
                "{:,.0f}")
    _bar_labels(ax, ax.bar(x + w / 2, during, w, label="during the snapshot",
                           color="tab:purple"), "{:,.0f}")
    rate = _get(items[0][1], "params") or {}
    target = rate.get("rate") if isinstance(rate, Mapping) else _get(items[0][1], "param_rate")
    if target not in (None, "max"):
        ax.axhline(float(target), color="grey", ls=":", lw=1)
        ax.text(ax.get_xlim()[0], float(target), f" requested {float(target):,.0f}/s",
                va="bottom", fontsize=8, color="grey")
    ax.set_xticks(x, [lbl for lbl, _ in items], fontsize=8)
    ax.set_ylabel("page writes/s (all writers)")
    ax.set_title("writer throughput")
    ax.legend(fontsize=8, loc="upper right")
    ax.margins(y=0.25)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _sort_key(v: Any) -> Any:
    from .config import parse_size
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


def plot_sweep(runs: "pd.DataFrame", x: str = "param_writers",
               y: str | Sequence[str] = ("snapshot_ms", "lat_p99_us"),
               by: str | Sequence[str] | None = "param_strategy") -> "Figure":
    """Metrics against one parameter, a line per group (`by`: one column or
    several, joined in the legend). Repeated points are averaged; runs
    without the metric (failed ones) are left out. Sizes sort by bytes."""

    ys = [y] if isinstance(y, str) else list(y)
    bys = [] if by is None else [by] if isinstance(by, str) else list(by)
    fig, axes = _figure(width=5.0 * len(ys), height=3.8, ncols=len(ys))
    missing = [c for c in [x, *bys, *ys] if c not in runs.columns]
    if missing or runs.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no runs to plot" if runs.empty else
                    f"no column {missing[0]!r}", ha="center", va="center",
                    transform=ax.transAxes)
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


def runs_table(runs: "pd.DataFrame", columns: Iterable[str] | None = None) -> "pd.DataFrame":
    """A compact view of a runs DataFrame: parameters that vary, status,
    verdict and the main metrics."""
    if runs.empty:
        return runs
    params = [c for c in runs.columns if c.startswith("param_")
              and runs[c].astype(str).nunique() > 1]
    cols = list(columns) if columns is not None else (
        ["run_id", "scenario", *params, "status", "snapshot_ms", "pause_ms", "stall_max_ms",
         "lat_p99_us", "faults_total", "mismatched_pages"])
    out = runs[[c for c in cols if c in runs.columns]].copy()
    out["verdict"] = [verdict(row) for _, row in runs.iterrows()]
    return out.reset_index(drop=True)


__all__ = ["NotebookProgress", "feature_table", "summary_table", "provenance", "verdict",
           "failure_text", "result_line", "support", "plot_latency_cdf",
           "plot_stall_vs_duration", "plot_throughput", "plot_sweep", "runs_table",
           "FEATURE_NOTES", "subset", "explain_matrix"]


# -- sweeps and kernel matrices ---------------------------------------------


def subset(frames: Any, run_ids: Iterable[str]) -> Any:
    """The same Frames restricted to these run ids (order of `frames.runs`)."""
    from dataclasses import replace
    ids = {r for r in run_ids if r}
    keep = lambda df: df[df["run_id"].isin(ids)].reset_index(drop=True)  # noqa: E731
    return replace(frames, runs=keep(frames.runs), latency=keep(frames.latency),
                   faults=keep(frames.faults), mismatches=keep(frames.mismatches))


def explain_matrix(table: "pd.DataFrame", probes: Mapping[str, Mapping]) -> str:
    """Markdown: where a kernel matrix differs and which kernel changed it.

    `table` has one row per (kernel, scenario): columns `kernel` (the image
    label), `scenario` (a label), `status` ('not supported' for refused
    runs), `verdict` and `reason`. `probes` maps the same labels to probes.
    """
    lines: list[str] = []
    labels = list(probes)
    release = {k: (probes[k] or {}).get("kernel", "?") for k in labels}
    first = {}
    for p in probes.values():
        first.update((p or {}).get("feature_min_kernel", {}))
    # features that differ
    names = sorted({n for p in probes.values() for n in (p or {}).get("features", {})},
                   key=lambda n: _version_key(first.get(n, "99")))
    diff = []
    for n in names:
        have = [k for k in labels if (probes[k] or {}).get("features", {}).get(n)]
        if have and len(have) < len(labels):
            lack = [k for k in labels if k not in have]
            diff.append(f"* `UFFD_FEATURE_{n}` (first in Linux {first.get(n, '?')}): offered by "
                        f"{', '.join(f'{k} ({release[k]})' for k in have)}, not by "
                        f"{', '.join(f'{k} ({release[k]})' for k in lack)}")
    lines.append("**Features that differ**" if diff else
                 "**All kernels offer the same uffd features.**")
    lines += diff
    # scenarios whose outcome differs
    lines.append("")
    changed = []
    for sc, g in table.groupby("scenario", sort=False):
        outcomes = {row.kernel: row for row in g.itertuples()}
        kinds = {_outcome_kind(r) for r in outcomes.values()}
        if len(kinds) <= 1:
            continue
        parts = []
        for k, r in outcomes.items():
            what = (r.reason if r.status == "not supported" else r.verdict)
            parts.append(f"{k} ({release.get(k, '?')}): {what}")
        changed.append(f"* **{sc}**: " + "; ".join(parts) + ". " + _why(outcomes, first))
    if changed:
        lines.append("**Scenarios whose outcome differs**")
        lines += changed
    else:
        lines.append("**Every scenario had the same outcome on every kernel** (timings aside).")
    return "\n".join(lines)


def _outcome_kind(row: Any) -> str:
    if row.status == "not supported":
        return "unsupported"
    if row.status in ("failed", "timeout", "vm failed"):
        return "failed"
    return "consistent" if str(row.verdict).startswith("consistent") else "inconsistent"


def _why(outcomes: Mapping[str, Any], first: Mapping[str, str]) -> str:
    import re
    refused = [r for r in outcomes.values() if r.status == "not supported"]
    for r in refused:
        m = re.search(r"needs (\w+), Linux ([\d.]+)", str(r.reason))
        if m:
            ran = [k for k, x in outcomes.items() if x.status != "not supported"]
            no = [k for k, x in outcomes.items() if x.status == "not supported"]
            return (f"The difference is `UFFD_FEATURE_{m.group(1)}`, which arrived in Linux "
                    f"{m.group(2)}: " + (f"{', '.join(ran)} ha{'s' if len(ran) == 1 else 've'} "
                                         f"it; on {', '.join(no)} the lab refuses the scenario "
                                         f"before it runs." if ran else
                                         "no kernel here has it."))
    if any(_outcome_kind(r) == "failed" for r in outcomes.values()):
        return "A run failed on one kernel: see its error in the table above."
    return ("Both ran but the verifier disagrees: a kernel behaviour change (or a bug) "
            "worth a closer look at the runs' mismatch causes.")
