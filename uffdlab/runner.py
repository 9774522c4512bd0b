# SPDX-License-Identifier: MIT
"""run(vm, scenario, params) --paramiko exec--> JSON Lines --> RunResult.

Parameters are checked before any SSH command runs; the run streams its
progress records as events, is bounded by a timeout, and always returns a
result (failed or timed out ones included) so it can be stored.
"""
from __future__ import annotations

import json
import shlex
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import accel, scenarios
from .lock import read_lock
from .model import Kind, RunResult, Status
from .provision import ensure_provisioned
from .results import store_run
from .vm import VM

# Time the guest may need beyond the writers' own duration (verify, teardown;
# TCG is slow).
SLACK_SECONDS = 90.0
# uffd-bench's fault round trips for a run's floors: enough for a steady p50,
# about a second under TCG.
FLOOR_ROUND_TRIPS = 1000


@dataclass
class Prepared:
    """A validated run, ready to execute on a provisioned VM."""

    scenario: scenarios.Scenario
    params: dict[str, Any]
    timeout: float


def prepare(vm: VM, scenario_key: str, params: dict[str, Any] | None = None,
            timeout: float | None = None) -> Prepared:
    """Check the scenario and parameters against the VM's spec, no SSH."""
    sc = scenarios.get(scenario_key)
    resolved = scenarios.resolve(sc, params or {})
    scenarios.check_against(sc, resolved, vm.spec.memory, None)
    limit = min(resolved["duration"] + SLACK_SECONDS, scenarios.limit("timeout")[1]) \
        if timeout is None else scenarios.seconds("timeout", timeout, "timeout")
    if limit <= resolved["duration"]:
        raise scenarios.ScenarioError(f"timeout: expected more seconds than duration "
                                      f"({resolved['duration']:g}), got {limit!r}")
    return Prepared(sc, resolved, limit)


def run(vm: VM, scenario_key: str, params: dict[str, Any] | None = None,
        timeout: float | None = None, rerun_of: str | None = None,
        floors: bool = False) -> RunResult:
    """Bring the VM up and provision it if needed, then run one scenario.
    `floors`: then measure the guest's own floors (see measure_floors)."""
    prep = prepare(vm, scenario_key, params, timeout)
    lock = read_lock(vm.lab.source)          # a broken lab.lock is refused before boot
    vm.up(reuse=True)
    facts = ensure_provisioned(vm)
    scenarios.check_against(prep.scenario, prep.params, vm.spec.memory, facts["probe"])
    res = execute(vm, prep, facts)
    res.lock_hash, res.rerun_of = (lock.digest if lock else None), rerun_of
    if floors and res.status.ran:
        res.floors = measure_floors(vm, prep.params["size"])
    return res


def measure_floors(vm: VM, size: str) -> dict | None:
    """The guest's own floors, measured now by uffd-bench in the same VM:
    memcpy bandwidth over `size` (the run's RAM) and the single-process
    uffd-wp fault round trip. A run's figures as ratios to these compare
    across accels and machines, as bench/snapshot.py does on the host.
    None, with an event saying why, when they could not be measured: the
    run itself stands without them."""
    argv = [f"{vm.lab.provision.tools_dir}/bin/uffd-bench", "--memcpy-size", str(size),
            "--round-trips", str(FLOOR_ROUND_TRIPS)]
    try:
        out = vm.shared_session().run(shlex.join(argv), timeout=120)
    except Exception as e:                   # reported; the run stands without floors
        vm.drop_session()
        vm.emit(Kind.RUNNING, f"floors not measured: {type(e).__name__}: {e}")
        return None
    record = next((r for r in map(_parse, out.stdout.splitlines())
                   if r and r.get("type") == "bench"), None)
    if out.exit_status or record is None:
        why = (out.stderr.strip().splitlines() or ["no bench record"])[-1]
        vm.emit(Kind.RUNNING, f"floors not measured: uffd-bench exited "
                              f"{out.exit_status}: {why}")
        return None
    vm.emit(Kind.RUNNING, f"floors: memcpy {record.get('memcpy_gb_s')} GB/s, fault round "
                          f"trip p50 {(record.get('round_trip_us') or {}).get('p50')} us")
    return record


def reproduction(vm: VM) -> dict[str, str | None]:
    """What a rerun must find unchanged: the image's content (and the
    kernel's, for a local or tree kernel), the guest tools, QEMU."""
    img, st = vm.image(), vm.state()
    content = img.content_hash if img.built else None
    if content and st is not None and st.kernel:
        content = f"{content}+{st.kernel}"
    return {"image_content": content,
            "tools_digest": (st.facts.get("tools_digest") if st else None),
            "qemu": accel.qemu_version()}


def execute(vm: VM, prep: Prepared, facts: dict) -> RunResult:
    st = vm.state()
    tools_dir = vm.lab.provision.tools_dir
    # The guest tool's own --timeout fires first; the SSH one is the backstop.
    argv = scenarios.command(prep.scenario, prep.params, tools_dir, prep.timeout)
    cmd = shlex.join(argv)
    res = RunResult(
        run_id=uuid.uuid4().hex[:12], started=time.time(), lab=vm.lab.name, vm=vm.name,
        image=st.image, image_key=st.image_key, kernel=st.kernel_release, accel=st.accel,
        tools_version=facts.get("tools_version", "unknown"), scenario=prep.scenario.id,
        scenario_name=prep.scenario.name, params=prep.params, command=cmd,
        expect_consistent=prep.scenario.expect_consistent, **reproduction(vm))
    vm.emit(Kind.RUNNING, f"{prep.scenario.id} ({prep.scenario.name}): {cmd}",
            run_id=res.run_id)
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        rec = _parse(line)
        if rec and rec.get("type") == "progress":
            vm.emit(Kind.PROGRESS, f"{rec.get('phase', '')}: {rec.get('pages_copied', 0)}/"
                    f"{rec.get('pages_total', 0)} pages, {rec.get('faults', 0)} faults",
                    done=rec.get("pages_copied", 0), total=rec.get("pages_total", 0),
                    faults=rec.get("faults", 0), phase=rec.get("phase"))

    # The guest keeps its own copy of the JSON Lines: the live stream drives
    # progress, the file fetched afterwards is the record (complete even if
    # the stream was cut short).
    remote = f"/tmp/uffdlab-run-{res.run_id}.jsonl"
    guest_cmd = "bash -o pipefail -c " + shlex.quote(f"{cmd} | tee {remote}")
    t0 = time.monotonic()
    try:
        s = vm.shared_session()
        out = s.run(guest_cmd, timeout=prep.timeout + 30, on_line=on_line)
        res.exit_code, res.stderr = out.exit_status, out.stderr
        lines = _fetch_record(s, remote) or lines
        _finish(res, lines)
    except TimeoutError as e:
        vm.drop_session()
        res.status, res.error = Status.TIMEOUT, str(e)
    except Exception as e:                   # VM died, SSH broke: a failed run
        vm.drop_session()
        res.status, res.error = Status.FAILED, f"{type(e).__name__}: {e}"
    res.duration_s = round(time.monotonic() - t0, 3)
    res.jsonl = "\n".join(lines)
    if not res.status.ran:
        res.serial_log = vm.serial_tail(200)
    vm.emit(Kind.RUNNING, f"{res.scenario}: {res.status} in {res.duration_s:.1f} s",
            status=res.status, run_id=res.run_id)
    return res


def _fetch_record(s, remote: str) -> list[str] | None:
    """The run's JSON Lines file from the guest, by SFTP; removed after."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "run.jsonl"
        try:
            s.get(remote, local, remove=True)
        except OSError:
            return None
        return local.read_text().splitlines()


def _finish(res: RunResult, lines: list[str]) -> None:
    records = [r for r in map(_parse, lines) if r]
    res.config = next((r for r in records if r.get("type") == "config"), None)
    res.summary = next((r for r in records if r.get("type") == "summary"), None)
    error = next((r for r in records if r.get("type") == "error"), None)
    if res.exit_code == 0 and res.summary is not None:
        res.status = Status.INCONSISTENT if res.summary.get("consistent") is False \
            else Status.OK
        return
    message = (error or {}).get("message") or res.stderr.strip() or "no summary record"
    timed_out = res.exit_code == 3 and ("timed out" in message or "timeout" in message)
    res.status = Status.TIMEOUT if timed_out else Status.FAILED
    res.error = f"uffd-snapshot exited {res.exit_code}: {message}"


def _parse(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        return json.loads(line)
    except ValueError:
        return None


def run_and_store(vm: VM, scenario: str, params: dict[str, Any] | None = None,
                  timeout: float | None = None, rerun_of: str | None = None,
                  floors: bool = False) -> RunResult:
    """Run a scenario (booting and provisioning as needed) and store it. A
    database that cannot take the run gets it later: it waits in the spool
    next to the database, and the event says where. `rerun_of` links it to
    the stored run it repeats; `floors` measures the guest's floors after it."""
    res = run(vm, scenario, params, timeout, rerun_of, floors)
    outcome = store_run(vm.lab.results_path, res)
    vm.emit(Kind.STORED, "; ".join([outcome.message, *outcome.spool_problems]),
            run_id=res.run_id, stored=outcome.stored,
            spooled_to=str(outcome.spooled_to or ""), imported=outcome.imported)
    return res
