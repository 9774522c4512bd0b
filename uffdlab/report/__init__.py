# SPDX-License-Identifier: MIT
"""What notebooks show: a progress listener, tables and plots of runs.

Everything here takes what the rest of the package produces (a RunResult,
a dict from `ResultsDB.get()`, a row or the table of `results.load(...).runs`,
or the `Frames` themselves) and returns a pandas DataFrame, a matplotlib
Figure or a string, so notebooks stay a few lines per step.

    runs.py      the one input adapter: any of those -> RunView
    progress.py  NotebookProgress, the listener notebooks pass to VMs
    tables.py    feature, summary and provenance tables; verdicts
    plots.py     latency CDF, stall vs duration, throughput, sweeps
    sweeps.py    a sweep's table of points, its notes, its plot groups

The report layer stays light: pandas and matplotlib, imported when a table
or figure is asked for; no SSH, no Ansible.
"""
from .plots import plot_latency_cdf, plot_rerun, plot_stall_vs_duration, plot_sweep, plot_throughput
from .progress import NotebookProgress
from .runs import RunView, as_run, as_runs, subset
from .sweeps import sweep_groups, sweep_notes, sweep_table
from .tables import (
    FEATURE_NOTES,
    explain_stw_vs_wp,
    failure_text,
    feature_table,
    floor_rows,
    provenance,
    runs_table,
    summary_table,
    verdict,
    verdicts_table,
)

__all__ = ["NotebookProgress", "feature_table", "summary_table", "floor_rows", "provenance",
           "verdict", "failure_text", "plot_latency_cdf", "plot_stall_vs_duration", "plot_rerun",
           "plot_throughput", "plot_sweep", "runs_table", "FEATURE_NOTES", "subset",
           "RunView", "as_run", "as_runs", "sweep_table", "sweep_notes", "sweep_groups",
           "verdicts_table", "explain_stw_vs_wp"]
