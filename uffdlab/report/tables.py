# SPDX-License-Identifier: MIT
"""Tables and one-line texts about runs and kernels, for notebooks.

Each function takes what `runs.as_run`/`as_runs` accept and returns a pandas
DataFrame or a string.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .. import scenarios
from ..model import Judgement, judge
from ..results import _INTEGER_METRICS, METRICS, format_number
from .runs import RunView, as_run, as_runs

if TYPE_CHECKING:
    import pandas as pd

# -- the kernel's features ------------------------------------------------------

# What uffd-probe checks besides the feature bits: (label, probe key path,
# the features.h entry whose release brought it).
_PROBE_EXTRAS = (
    ("WP register on memfd", ("wp_register", "memfd"), "WP_HUGETLBFS_SHMEM"),
    ("WP register on shmem file", ("wp_register", "shmem"), "WP_HUGETLBFS_SHMEM"),
    ("WP register on hugetlbfs", ("wp_register", "hugetlbfs"), "WP_HUGETLBFS_SHMEM"),
    ("WP register on anonymous", ("wp_register", "anon"), "PAGEFAULT_FLAG_WP"),
    ("UFFD_USER_MODE_ONLY", ("user_mode_only",), "USER_MODE_ONLY"),
    ("/dev/userfaultfd", ("dev_userfaultfd",), "DEV_USERFAULTFD"),
    ("PAGEMAP_SCAN ioctl", ("pagemap_scan",), "PAGEMAP_SCAN"),
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


def version_key(release: Any) -> tuple:
    """'6.12' -> (6, 12), for ordering releases; anything else sorts last."""
    try:
        return tuple(int(x) for x in str(release).split("."))
    except ValueError:
        return (99,)


def feature_releases(probes: Iterable[Mapping | None]) -> dict[str, str]:
    """The first Linux release of each feature: features.h, as the probes saw it."""
    first = dict(scenarios.first_kernels())
    for p in probes:
        first.update((p or {}).get("feature_min_kernel", {}))
    return first


def probe_column(label: str, probe: Mapping | None) -> str:
    """'bookworm (6.1.0-37-cloud-amd64)': an image label with its kernel."""
    k = (probe or {}).get("kernel")
    return f"{label} ({k})" if k and k != label else label


def _mark(v: Any) -> str:
    return "✓" if v is True else "✗" if v is False else "–"


def feature_table(probe_or_probes: Mapping[str, Any]) -> pd.DataFrame:
    """The kernel's uffd features as uffd-probe found them.

    One probe (the `facts['probe']` dict) gives one column; a dict
    {label: probe} (e.g. {'bookworm': ..., 'trixie': ...}) gives them side
    by side, headed 'label (kernel)'. Rows: each feature bit and the other
    probe checks, with the first Linux release that has it; ordered by that
    release. ✓ offered, ✗ not offered, – could not be tried.
    """
    import pandas as pd

    one = "features" in probe_or_probes or probe_or_probes.get("type") == "probe"
    probes = {"guest": probe_or_probes} if one else dict(probe_or_probes)
    if not probes:
        raise ValueError("feature_table: expected a probe dict or {label: probe}, got none")
    first = feature_releases(probes.values())
    names = list(dict.fromkeys(n for p in probes.values() for n in (p or {}).get("features", {})))
    rows = [{"feature": f"UFFD_FEATURE_{name}", "first kernel": first.get(name, "?"),
             "what for": FEATURE_NOTES.get(name, ""),
             **{probe_column(lbl, p): _mark((p or {}).get("features", {}).get(name))
                for lbl, p in probes.items()}} for name in names]
    for label, path, entry in _PROBE_EXTRAS:
        cells = {}
        for lbl, p in probes.items():
            v: Any = p or {}
            for key in path:
                v = v.get(key) if isinstance(v, Mapping) else None
            cells[probe_column(lbl, p)] = _mark(v)
        rows.append({"feature": label, "first kernel": first.get(entry, "?"), "what for": "",
                     **cells})
    rows.sort(key=lambda r: version_key(r["first kernel"]))     # stable: probe order kept
    return pd.DataFrame(rows).set_index("feature")


# -- one run ----------------------------------------------------------------------

# (label, what to read, unit): a results.METRICS column, else a key of the
# summary record (with the run's parameters, or the stored child rows, when
# the summary is not at hand).
_SUMMARY_ROWS = (
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
    ("fault latency p50", "lat_p50_us", "us"),
    ("fault latency p99", "lat_p99_us", "us"),
    ("fault latency max", "lat_max_us", "us"),
    ("writer stall max", "stall_max_ms", "ms"),
    ("writer stall total", "stall_total_ms", "ms"),
    ("writer ops/s before", "ops_before", "ops/s"),
    ("writer ops/s during", "ops_during", "ops/s"),
    ("pages populated", "pages_populated", "pages"),
    ("page tables delta", "vmpte_kb_delta", "kB"),
    ("consistent", "consistent", ""),
    ("mismatched pages", "mismatched_pages", "pages"),
    ("mismatches by cause", "mismatches_by_cause", ""),
)
# Rows left out when the run has no value for them (older tools, stored rows).
_OPTIONAL_ROWS = {"copy_ms", "arm_ms", "faults_per_process", "pages_populated",
                  "vmpte_kb_delta"}


def _value(run: RunView, key: str) -> Any:
    if key in METRICS:
        return run.metric(key)
    if key in ("consistent", "faults_per_process", "mismatches_by_cause"):
        return getattr(run, key)
    return run.setting(key)


def format_value(v: Any) -> str:
    """A value of a summary for people: numbers as results.format_number
    (with thousands separators), yes/no, 'cause n, ...' for a mapping."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None or isinstance(v, (int, float)):
        return format_number(v, missing="–", grouped=True)
    if isinstance(v, Mapping):
        return ", ".join(f"{k} {format_value(x)}" for k, x in v.items()) or "none"
    if isinstance(v, (list, tuple)):
        return " / ".join(format_value(x) for x in v)
    return str(v)


def summary_table(result: Any) -> pd.DataFrame:
    """The run's main figures, one per row (metric, value, unit)."""
    import pandas as pd

    run = as_run(result)
    rows = [{"metric": "scenario", "value": f"{run.scenario or '?'} "
             f"{run.scenario_name or ''}".strip(), "unit": ""},
            {"metric": "status", "value": str(run.status or "?"), "unit": ""}]
    for label, key, unit in _SUMMARY_ROWS:
        v = _value(run, key)
        if v is None and key in _OPTIONAL_ROWS:
            continue
        if unit == "MiB" and isinstance(v, (int, float)):
            v = v / 2**20
        rows.append({"metric": label, "value": format_value(v), "unit": unit})
    rows += [{"metric": label, "value": format_value(v), "unit": unit}
             for label, v, unit in floor_rows(run)]
    if run.error:
        rows.append({"metric": "error", "value": str(run.error), "unit": ""})
    return pd.DataFrame(rows).set_index("metric")


def floor_rows(result: Any) -> list[tuple[str, float, str]]:
    """The run against its guest's own floors (uffd-bench right after the
    run, in the same VM), as bench/snapshot.py compares on the host: the
    snapshot's throughput and, for stop-the-world, its paused copy over
    memcpy; the p50 fault-to-resolve over the single-process round trip.
    Ratios, so TCG and KVM runs read alike. [] without floors."""
    run = as_run(result)
    fl = run.floors or {}
    memcpy = fl.get("memcpy_gb_s")
    rt = (fl.get("round_trip_us") or {}).get("p50")
    if not memcpy and not rt:
        return []
    rows: list[tuple[str, float, str]] = []
    size = _value(run, "bytes")

    def gb_s(ms: Any) -> float | None:      # bytes per ns == GB/s
        return size / (ms * 1e6) if isinstance(size, (int, float)) and ms else None

    if memcpy:
        rows.append(("guest memcpy (floor)", memcpy, "GB/s"))
        for label, ms in (("snapshot throughput", run.metric("snapshot_ms")),
                          ("paused copy" if run.setting("strategy") == "stop-the-world"
                           else None, run.metric("copy_ms"))):
            if label and gb_s(ms) is not None:
                rows.append((f"{label} vs guest memcpy", round(gb_s(ms) / memcpy, 3),
                             "x memcpy"))
    p50 = run.metric("lat_p50_us")
    if rt:
        rows.append(("guest fault round trip p50 (floor)", rt, "us"))
        if p50 and (run.metric("faults_total") or 0) > 0:
            rows.append(("fault p50 vs guest round trip", round(p50 / rt, 2), "x round trip"))
    return rows


def provenance(result: Any) -> pd.DataFrame:
    """Where a number came from: run id, kernel, accel, tools, image, command."""
    import pandas as pd

    run = as_run(result)
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(run.started)))
            if run.started is not None else None)
    rows = [("run id", run.run_id), ("started", when),
            ("scenario", f"{run.scenario or ''} {run.scenario_name or ''}"),
            ("vm", run.vm), ("image", run.image), ("image key", run.image_key),
            ("kernel", run.kernel), ("accel", run.accel),
            ("guest tools version", run.tools_version),
            ("guest tools digest", run.tools_digest), ("image content", run.image_content),
            ("lab.lock", run.lock_hash or "none ('uffdlab lock' writes one)"),
            ("QEMU", run.qemu), ("rerun of", run.rerun_of), ("command", run.command)]
    return pd.DataFrame([{"": k, "value": "–" if v is None else str(v)}
                         for k, v in rows]).set_index("")


def verdict(result: Any) -> str:
    """One line: the consistency verdict against what the scenario expects."""
    run = as_run(result)
    consistent, expect = run.consistent, run.expect_consistent
    j = judge(run.status, consistent, expect)
    if j == Judgement.UNFINISHED:
        err = str(run.error or "no error message").strip().splitlines()
        return f"{str(run.status).upper()}: {err[0] if err else ''}"
    if j == Judgement.UNVERIFIED:
        return "not verified"
    tail = {Judgement.UNSPECIFIED: "", Judgement.EXPECTED: " (expected)",
            Judgement.UNEXPECTED: " (UNEXPECTED)"}[j]
    if consistent:
        return ("consistent ✓ as expected" if expect is True
                else f"consistent {'✓' if expect is not False else '✗'}{tail}")
    pages = run.metric("mismatched_pages")
    causes = run.mismatches_by_cause or {}
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
    run = as_run(result)
    parts = [f"{run.status or '?'}: {run.error or 'no error message'}"]
    if run.stderr:
        parts += ["--- stderr ---", run.stderr.strip()[-3000:]]
    if run.serial_log:
        parts += [f"--- guest serial console (last {serial_lines} lines) ---",
                  "\n".join(run.serial_log.splitlines()[-serial_lines:])]
    return "\n".join(parts)


# -- many runs ----------------------------------------------------------------------

def runs_table(runs: pd.DataFrame, columns: Iterable[str] | None = None) -> pd.DataFrame:
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
    # A table to read, not to compute with: metrics as text with the decimals
    # their size deserves (the DataFrame given keeps the numbers).
    import pandas as pd

    def missing(v: Any) -> bool:                 # None, NaN, and the NA of Int64 columns
        return pd.api.types.is_scalar(v) and bool(pd.isna(v))

    for c in out.columns:
        if c in METRICS:
            out[c] = [_metric_text(None if missing(v) else v, integer=c in _INTEGER_METRICS)
                      for v in out[c]]
    out["verdict"] = [verdict(run) for run in as_runs(runs)]
    return out.reset_index(drop=True)


def _metric_text(v: Any, integer: bool) -> str:
    """A cell of a metric column: numpy scalars as Python numbers, whole
    counts without decimals (a column with a gap holds them as floats)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and integer and v.is_integer():
        v = int(v)
    return format_value(v) if v is None or isinstance(v, (int, float)) else str(v)


def verdicts_table(results: Iterable[Any]) -> pd.DataFrame:
    """A row per run: which scenario, how many writers, the mismatched pages
    by cause and the verdict: what a reader checks first after broken runs."""
    import pandas as pd

    rows = [{"scenario": f"{run.scenario} {run.scenario_name}",
             "writers": (run.params or {}).get("writers"),
             "mismatched pages": run.summary.get("mismatched_pages"),
             "causes": run.summary.get("mismatches_by_cause"),
             "verdict": verdict(run)} for run in as_runs(list(results))]
    return pd.DataFrame(rows).set_index("scenario")


def explain_stw_vs_wp(stw: Any, wp: Any) -> str:
    """Markdown: what a stop-the-world run and a uffd-wp run of the same RAM
    cost the writers, read from their numbers (not assumed)."""
    def m(run: RunView, key: str) -> float:
        return run.summary.get(key) or 0.0

    s, w = as_run(stw), as_run(wp)
    stall_s, stall_w = m(s, "writer_stall_max_ms"), m(w, "writer_stall_max_ms")
    text = (f"Stop-the-world paused all writers for **{m(s, 'pause_ms'):.1f} ms**, the whole "
            f"copy. uffd-wp paused them for **{m(w, 'pause_ms'):.1f} ms**, just long enough "
            f"to arm. ")
    if stall_w < stall_s:
        text += (f"The longest stall any writer saw went from **{stall_s:.1f} ms** to "
                 f"**{stall_w:.1f} ms**. ")
    else:
        text += (f"In this run the longest single stall was not shorter with uffd-wp "
                 f"(**{stall_w:.1f} ms** vs **{stall_s:.1f} ms**). Under TCG on a busy host, "
                 f"a writer's vCPU can be descheduled while its fault waits, and that adds to "
                 f"the stall. The pause is the part that grows with RAM size. ")
    return text + (f"In exchange, the uffd-wp snapshot took **{m(w, 'snapshot_ms'):.0f} ms** "
                   f"instead of **{m(s, 'snapshot_ms'):.0f} ms**: faults are served one by one "
                   f"while writers keep running, and the copy shares the CPUs with them.")
