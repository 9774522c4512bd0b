# SPDX-License-Identifier: MIT
"""kill -9 in each phase on the session's shared VMs, without destroying them:
the CLI mid-provision, mid-run and mid-store, and the guest's coordinator
mid-run. Nothing leaks, the VM stays usable, and a finished run is never
lost silently. (Killing the keeper or QEMU destroys a VM: those cases are in
test_vms.py for boot and test_z_destructive.py for provisioning and runs.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED, run_and_strike, wait_for
from uffdlab.api import run_and_store
from uffdlab.cli import main as cli
from uffdlab.provision import SCRATCH_PREFIX, provision
from uffdlab.results import ResultsDB

pytestmark = pytest.mark.integration


def tool_pattern(vm) -> str:
    """pgrep's pattern for uffd-snapshot itself: anchored at the start of the
    command line, so the runner's `bash -c '... | tee'` wrapper and pgrep's
    own shell do not match."""
    return f"^{vm.lab.provision.tools_dir}/bin/uffd-snapshot "


def start_cli(lab, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "uffdlab", "--lab", str(lab.source), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def kill_when(proc: subprocess.Popen, marker: str, seconds: float = 300) -> str:
    """SIGKILL `proc` once its stderr shows `marker`; returns what it said."""
    seen: list[str] = []
    timer = threading.Timer(seconds, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:                    # \r-ended progress lines count too
            seen.append(line)
            if marker in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        timer.cancel()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-2000:]
    return "".join(seen)


def guest_tools_running(vm) -> str:
    return vm.shared_session().run(f"pgrep -af '{tool_pattern(vm)}' || true",
                                   timeout=30).stdout.strip()


def test_coordinator_killed_mid_run_is_a_failed_run(provisioned, trixie_vm):
    """The guest's coordinator dies by SIGKILL: the run is stored as failed,
    and its writers do not outlive it."""
    def kill_coordinator():
        with trixie_vm.session() as s:              # the oldest one is the coordinator
            s.run(f"pkill -KILL -o -f '{tool_pattern(trixie_vm)}'", timeout=30, check=True)

    res, struck = run_and_strike(trixie_vm, kill_coordinator, params={"size": "16M",
                                                                      "duration": 20})
    assert struck
    assert res.status == "failed" and res.error
    with ResultsDB(trixie_vm.lab.results_path) as db:
        assert db.get(res.run_id)["status"] == "failed"
    wait_for(lambda: not guest_tools_running(trixie_vm), 30, "the writers to go")
    assert trixie_vm.state().ssh_ready


def test_cli_killed_mid_provision_leaves_the_vm_usable(provisioned, trixie_vm, test_lab):
    proc = start_cli(test_lab, "provision", SHARED["trixie"])
    kill_when(proc, "task")
    assert trixie_vm.state() is not None            # a running VM is not the CLI's to stop
    # its Ansible finishes on its own; then the next provisioning cleans its scratch
    # (its command line names the killed CLI's scratch directory)
    wait_for(lambda: subprocess.run(["pgrep", "-f", f"{SCRATCH_PREFIX}{proc.pid}\\."],
                                    capture_output=True).returncode != 0, 120,
             "the orphaned ansible-playbook to finish")
    again = provision(trixie_vm)
    assert again.changed == 0
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    assert not list(tmp.glob(f"{SCRATCH_PREFIX}{proc.pid}.*"))


def test_cli_killed_mid_run_leaves_the_vm_usable(provisioned, trixie_vm, test_lab):
    proc = start_cli(test_lab, "run", "S3", "--vm", SHARED["trixie"],
                     "--param", "size=16M", "--param", "duration=20")
    kill_when(proc, "pages")                        # a progress line: the run is under way
    # the guest's tool loses its output pipe and ends; the VM runs on
    wait_for(lambda: not guest_tools_running(trixie_vm), 60, "the guest tool to end")
    assert run_and_store(trixie_vm, "S1", {"size": "16M", "duration": 0.5}).status == "ok"


def test_cli_killed_mid_store_loses_no_run(provisioned, trixie_vm, test_lab, capsys):
    """SIGKILL inside the database transaction: the run was spooled first,
    so the next `results` stores it."""
    proc = start_cli(test_lab, "run", "S1", "--vm", SHARED["trixie"],
                     "--param", "size=16M", "--param", "duration=0.5",
                     env={"UFFDLAB_TEST_STORE_PAUSE": "runs"})
    said = kill_when(proc, "store-paused runs")
    run_id = said.split("store-paused runs ", 1)[1].split()[0]
    spool = test_lab.results_path.parent / "spool" / f"{run_id}.json"
    assert spool.is_file()
    assert cli(["--lab", str(test_lab.source), "results", "--last", "5"]) == 0
    assert run_id in capsys.readouterr().out
    with ResultsDB(test_lab.results_path) as db:
        assert db.get(run_id)["status"] == "ok"
    assert not spool.exists()
