# SPDX-License-Identifier: MIT
"""The records every layer shares: a run's status, the kinds of lifecycle
event, and a run's result. Light on purpose (stdlib only), so the database,
the reports and the notebooks can import it without SSH or Ansible."""
from __future__ import annotations

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


class Kind(StrEnum):
    """What an Event says. Its `data` carries, by kind:

    BUILDING       image build step; `seconds` when done
    BOOTING        a VM starts: `accel`, `kernel`
    ACCEL          auto fell back to TCG: `accel`
    SSH_READY      SSH answers: `port`, `seconds`
    PROVISIONING   playbook started / finished: `changed`, `seconds` when done
    TASK           one Ansible task ended: `task`, `host`, `state` (ok, changed,
                   skipped, failed)
    RUNNING        a run starts (`run_id`) or ends (`run_id`, `status`)
    PROGRESS       `done`, `total`; runs add `faults`, `phase`
    STORED         a run is in the database or the spool: `run_id`, `stored`,
                   `spooled_to`
    TEMPLATE       a template was saved (`key`, `seconds` paused, `bytes`), a VM
                   restored from one (`key`, `seconds` to SSH), or one found
                   unusable and replaced (`key`, `problem`)
    STOPPED        the VM is down and its overlay deleted
    FAILED         a step failed; the message says which and why
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
