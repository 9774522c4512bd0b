# SPDX-License-Identifier: MIT
"""The keeper with a stand-in for QEMU (`sleep`): a VM with an owner is
stopped, and its directory removed, when the owner process dies."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from uffdlab.owned import ProcessId, make_vm_dir
from uffdlab.paths import REPO


def start_keeper(vm_dir: Path, owner: ProcessId | None) -> tuple[subprocess.Popen, int]:
    make_vm_dir(vm_dir, "lab.yml")
    launch = {"argv": ["sleep", "300"]}
    if owner is not None:
        launch["owner"] = owner.to_dict()
    (vm_dir / "launch.json").write_text(json.dumps(launch))
    keeper = subprocess.Popen([sys.executable, "-m", "uffdlab.keeper", str(vm_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    qemu_pid = int(keeper.stdout.readline())
    keeper.stdin.write("detach\n")              # booted: the caller may go
    keeper.stdin.flush()
    return keeper, qemu_pid


def test_a_vm_whose_owner_dies_is_stopped_and_removed(tmp_path):
    owner_proc = subprocess.Popen(["sleep", "300"])
    owner = ProcessId.of(owner_proc.pid, "sleep")
    keeper, qemu_pid = start_keeper(tmp_path / "vm", owner)
    try:
        time.sleep(1.5)
        assert keeper.poll() is None                  # the owner lives: so does the VM
        owner_proc.kill()
        owner_proc.wait()
        keeper.wait(timeout=20)
        assert not ProcessId.of(qemu_pid, "sleep").alive()
        assert not (tmp_path / "vm").exists()
    finally:
        owner_proc.kill()
        keeper.kill()
        keeper.wait()


def test_a_vm_without_owner_outlives_its_caller(tmp_path):
    keeper, qemu_pid = start_keeper(tmp_path / "vm", None)
    try:
        keeper.stdin.close()                           # the caller has gone
        time.sleep(2.5)
        assert keeper.poll() is None and (tmp_path / "vm" / "launch.json").exists()
    finally:
        keeper.terminate()                             # stops QEMU, then cleans up
        keeper.wait(timeout=20)
    assert not (tmp_path / "vm").exists()


def test_a_caller_that_dies_before_reading_the_pid_leaves_nothing(tmp_path):
    """kill -9 of the caller as the VM starts: the keeper's one line to it
    meets a closed pipe. It must still stop QEMU and remove the VM's files."""
    vm_dir = tmp_path / "vm"
    make_vm_dir(vm_dir, "lab.yml")
    (vm_dir / "launch.json").write_text(json.dumps({"argv": ["sleep", "300"]}))
    keeper = subprocess.Popen([sys.executable, "-m", "uffdlab.keeper", str(vm_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
    keeper.stdout.close()                 # gone before the keeper could say anything
    try:
        assert keeper.wait(timeout=30) == 0
        assert not vm_dir.exists()
    finally:
        keeper.kill()
        keeper.wait()
