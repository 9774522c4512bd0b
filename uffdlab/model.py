# SPDX-License-Identifier: MIT
"""The records every layer shares: a run's status, the kinds of lifecycle
event, and a run's result. Light on purpose (stdlib only), so the database,
the reports and the notebooks can import it without SSH or Ansible."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """How a run ended. A StrEnum: it is stored, compared and printed as text."""

    OK = "ok"                      # ran; the snapshot matched RAM at the arming instant
    INCONSISTENT = "inconsistent"  # ran; the verifier found pages that differ
    FAILED = "failed"              # did not finish: tool error, VM or SSH gone
    TIMEOUT = "timeout"            # did not finish in its time limit

    @property
    def ran(self) -> bool:
        """The run finished and was verified, whatever the verdict."""
        return self in (Status.OK, Status.INCONSISTENT)


class Judgement(StrEnum):
    """What a run says about the kernel, against what its scenario expects on
    a correct one: the one decision every verdict text is written from."""

    UNFINISHED = "unfinished"      # failed or timed out: nothing to judge
    UNVERIFIED = "unverified"      # finished, but no consistency verdict
    UNSPECIFIED = "unspecified"    # verified; the scenario expects nothing particular
    EXPECTED = "expected"          # the verdict a correct kernel gives
    UNEXPECTED = "unexpected"      # the other one: worth a look


def judge(status: Any, consistent: bool | None, expect: bool | None) -> Judgement:
    if str(status) not in (Status.OK, Status.INCONSISTENT):
        return Judgement.UNFINISHED
    if consistent is None:
        return Judgement.UNVERIFIED
    if expect is None:
        return Judgement.UNSPECIFIED
    return Judgement.EXPECTED if bool(consistent) == bool(expect) else Judgement.UNEXPECTED


def format_number(v: Any, missing: str = "-", grouped: bool = False) -> str:
    """A metric for people: whole numbers as they are, others with the
    decimals their size deserves (0, 1 or 2); `grouped` adds thousands
    separators; None, NaN and inf are `missing`."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) \
            or (isinstance(v, float) and not math.isfinite(v)):
        return missing
    if isinstance(v, int):
        return f"{v:,}" if grouped else str(v)
    a, sep = abs(v), "," if grouped else ""
    return f"{v:{sep}.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


class Kind(StrEnum):
    """What an Event says. Its `data` carries, by kind:

    BUILDING       image build step; `seconds` when done
    BOOTING        a VM starts: `accel`, `kernel`
    ACCEL          auto fell back to TCG: `accel`
    SSH_READY      SSH answers: `port`, `seconds`, `template` (its key, or None
                   for a cold boot), `steps` (seconds spent starting, loading the
                   saved state, reaching SSH, fixing clock and RNG)
    PROVISIONING   playbook started / finished: `changed`, `seconds` when done
    TASK           one Ansible task started or ended: `task`, `host` (may be empty
                   for a start), `state` (started, ok, changed, skipped, failed)
    RUNNING        a run starts (`run_id`) or ends (`run_id`, `status`)
    PROGRESS       `done`, `total`; runs add `faults`, `phase`
    STORED         a run is in the database or the spool: `run_id`, `stored`,
                   `spooled_to`
    TEMPLATE       a template was saved (`key`, `seconds` paused, `bytes`), a VM
                   restored from one (`key`, `seconds` to SSH), or one found
                   unusable and replaced (`key`, `problem`)
    STOPPED        the VM is down and its overlay deleted
    FAILED         a step failed; the message says which and why
    HEARTBEAT      a long step is still going (every few seconds): `step` (booting,
                   restoring, provisioning), `elapsed` seconds since the step began;
                   booting and restoring add `line`, the console's latest non-empty
                   line (escape sequences removed, at most 100 characters);
                   provisioning adds `task` (the running Ansible task, "" between
                   tasks) and `task_elapsed` (None without a task). Renderers show
                   it in place of the last heartbeat; it is never a result.
    """

    BUILDING = "building"
    BOOTING = "booting"
    ACCEL = "accel"
    SSH_READY = "ssh-ready"
    PROVISIONING = "provisioning"
    TASK = "task"
    RUNNING = "running"
    PROGRESS = "progress"
    STORED = "stored"
    TEMPLATE = "template"
    STOPPED = "stopped"
    FAILED = "failed"
    HEARTBEAT = "heartbeat"


@dataclass
class RunResult:
    """One scenario run with its provenance; what the results database keeps."""

    run_id: str
    started: float
    lab: str
    vm: str
    image: str
    image_key: str
    kernel: str
    accel: str
    tools_version: str
    scenario: str
    scenario_name: str
    params: dict[str, Any]
    command: str
    status: Status = Status.FAILED
    duration_s: float = 0.0
    exit_code: int | None = None
    error: str | None = None
    expect_consistent: bool | None = None
    config: dict | None = None
    summary: dict | None = None
    jsonl: str = ""                 # the raw JSON Lines
    stderr: str = ""
    serial_log: str | None = None   # kept for failed runs
    # what reproduces it: lab.lock's digest (None without a lock), the image's
    # content hash (+ the kernel's digest for a local or tree kernel), the
    # guest tools' digest, the QEMU version; and the run it repeats
    lock_hash: str | None = None
    image_content: str | None = None
    tools_digest: str | None = None
    qemu: str | None = None
    rerun_of: str | None = None
    # the guest's own floors, measured by uffd-bench right after the run in
    # the same VM (memcpy bandwidth, single-process fault round trip): the
    # run's figures as ratios to these compare across accels and machines
    floors: dict | None = None

    @property
    def consistent(self) -> bool | None:
        return None if self.summary is None else self.summary.get("consistent")

    @property
    def as_expected(self) -> bool | None:
        if self.consistent is None or self.expect_consistent is None:
            return None
        return self.consistent == self.expect_consistent

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = str(self.status)
        return d

    # -- display: a notebook shows _repr_html_, print() and logs __repr__; the
    # generated dataclass repr printed every field, the raw JSON Lines too.

    # (label, key path in the summary, unit) of the figures _repr_html_ shows;
    # the paths are those of results.METRICS (this module imports no other).
    _DISPLAY_METRICS = (("snapshot", ("snapshot_ms",), "ms"), ("pause", ("pause_ms",), "ms"),
                        ("copy throughput", ("throughput_mb_s",), "MB/s"),
                        ("faults", ("faults_total",), ""),
                        ("fault latency p50", ("fault_latency_us", "p50"), "us"),
                        ("fault latency p99", ("fault_latency_us", "p99"), "us"),
                        ("writer stall max", ("writer_stall_max_ms",), "ms"),
                        ("mismatched pages", ("mismatched_pages",), ""))

    def _metric(self, *path: str) -> str | None:
        """A summary figure as text (format_number, grouped), None if absent."""
        v: Any = self.summary or {}
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        text = format_number(v, missing="", grouped=True)
        return text or None

    @staticmethod
    def _clip(text: Any, limit: int) -> str:
        """One line of at most `limit` characters."""
        s = " ".join(str(text).split())
        return s if len(s) <= limit else s[:limit - 1] + "…"

    def _verdict(self, error_limit: int = 48) -> str:
        """'ok, consistent', 'inconsistent, 2,048 mismatched pages (expected)',
        'timeout: <first line of the error>'."""
        status = str(self.status)
        j = judge(status, self.consistent, self.expect_consistent)
        if j == Judgement.UNFINISHED:
            first = (self.error or "").strip().splitlines()
            return f"{status}: {self._clip(first[0], error_limit)}" if first else status
        if j == Judgement.UNVERIFIED:
            return f"{status}, not verified"
        pages = self._metric("mismatched_pages")
        text = "consistent" if self.consistent else (
            f"{pages} mismatched pages" if pages else "inconsistent")
        if j == Judgement.UNEXPECTED:
            return f"{status}, {text} (UNEXPECTED)"
        return f"{status}, {text}" + ("" if self.consistent or j == Judgement.UNSPECIFIED
                                      else " (expected)")

    def __repr__(self) -> str:
        c = self._clip
        parts = [self._verdict()]
        for label, path, unit in (("snapshot", ("snapshot_ms",), "ms"),
                                  ("p99", ("fault_latency_us", "p99"), "us")):
            v = self._metric(*path)
            if v is not None:
                parts.append(f"{label} {v} {unit}")
        parts.append(f"run {c(self.run_id, 16)}")
        return (f"RunResult({c(self.scenario, 12)} {c(self.scenario_name, 24)} on "
                f"{c(self.vm, 24)}, {c(self.kernel, 32)}, {c(self.accel, 8)}: "
                + ", ".join(parts) + ")")

    def _repr_html_(self) -> str:
        import html
        import time

        def row(label: str, value: Any, pre: bool = False) -> str:
            v = html.escape(str(value))
            v = f"<pre style='margin:0'>{v}</pre>" if pre else v
            return f"<tr><th style='text-align:left'>{html.escape(label)}</th><td " \
                   f"style='text-align:left'>{v}</td></tr>"

        rows = [row("verdict", self._verdict(error_limit=200))]
        if self.error:
            err = self.error.strip()
            rows.append(row("error", err if len(err) <= 1000 else err[:1000] + "\n… "
                            "(report.failure_text(result) shows all)", pre=True))
        for label, path, unit in self._DISPLAY_METRICS:
            v = self._metric(*path)
            if v is not None:
                rows.append(row(label, f"{v} {unit}".strip()))
        causes = (self.summary or {}).get("mismatches_by_cause")
        if causes and isinstance(causes, dict):
            rows.append(row("mismatches by cause", ", ".join(f"{k} {n}"
                                                             for k, n in causes.items())))
        if self.params:
            rows.append(row("parameters", ", ".join(f"{k}={v}" for k, v in self.params.items())))
        try:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(self.started)))
        except (TypeError, ValueError, OverflowError, OSError):
            started = str(self.started)
        rows += [row("vm", self.vm), row("image", f"{self.image} ({self.image_key})"),
                 row("kernel", self.kernel), row("accel", self.accel),
                 row("guest tools", self.tools_version), row("run id", self.run_id),
                 row("started", started), row("duration", f"{self.duration_s:.1f} s"
                                       if isinstance(self.duration_s, (int, float)) else "–")]
        title = html.escape(f"{self.scenario} {self.scenario_name}")
        return (f"<table><caption style='text-align:left'><b>{title}</b></caption>"
                + "".join(rows) + "</table>")
