# SPDX-License-Identifier: MIT
"""Templates on real QEMU: VMs restored from the trixie VM the session saved
after provisioning are independent, have the host's time and their own
randomness, run scenarios, and a damaged template means a cold boot."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, VM_CPUS, VM_MEMORY, _parallel, wait_for, write_lab
from uffdlab.config import load_lab
from uffdlab.model import Kind
from uffdlab.runner import run_and_store
from uffdlab.vm import VM

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def template(provisioned, trixie_vm):
    tmpl, _ = trixie_vm.template_for(trixie_vm.state().accel)
    assert tmpl.exists, "the session's provisioned trixie VM was saved as a template"
    return tmpl


def fresh(test_lab, events=None) -> VM:
    return VM.for_shape(test_lab, "trixie", VM_MEMORY, VM_CPUS, fresh=True,
                        listener=events.append if events is not None else None)


def test_two_restored_vms_are_independent_and_on_time(test_lab, template):
    events: list = []
    vms = [fresh(test_lab, events), fresh(test_lab, events)]
    try:
        states = _parallel(lambda vm: vm.up(), vms)
        assert [st.template for st in states] == [template.key] * 2
        assert all(st.facts == template.meta["facts"] for st in states)
        restored = [e for e in events if e.kind == Kind.SSH_READY]
        assert all(e.data["template"] == template.key for e in restored)
        a, b = (vm.session() for vm in vms)
        a.run("echo mine > /root/only-in-a", check=True)
        assert b.run("test -e /root/only-in-a; echo $?").stdout.strip() == "1"
        rng = [s.run("head -c 32 /dev/urandom | od -An -tx1").stdout for s in (a, b)]
        assert rng[0] != rng[1]
        for s in (a, b):
            before = time.time()
            guest = float(s.run("date +%s.%N").stdout)
            assert before - 1 <= guest <= time.time() + 1       # corrected to the host's
            s.close()
        res = run_and_store(vms[0], "S3", {"size": "16M", "duration": 1})
        assert res.status == "ok" and res.summary["consistent"] is True
    finally:
        for vm in vms:
            vm.down()


def test_killed_cli_mid_restore_leaves_nothing(session_dir, template, trixie_vm):
    """Another lab file, a VM of the same shape: it restores from the same
    template. kill -9 of the CLI while it does: the keeper cleans up."""
    path = write_lab(session_dir / "restore-kill.yml",
                     {"t-restore": {"image": "trixie", "memory": VM_MEMORY, "cpus": VM_CPUS}})
    vm = VM(load_lab(path), "t-restore")
    assert vm.template_for(trixie_vm.state().accel)[0].key == template.key
    cli = subprocess.Popen([sys.executable, "-m", "uffdlab", "--lab", str(path), "up",
                            "t-restore"], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: vm.state() is not None, 60, "the restore to start")
        cli.send_signal(signal.SIGKILL)
        cli.wait()
        wait_for(lambda: not vm.dir.exists(), 30, "the VM directory to go")
    finally:
        if cli.poll() is None:
            cli.kill()
        vm.down()
    assert vm.state() is None
    assert template.exists                               # the template is untouched


def test_truncated_state_falls_back_to_a_cold_boot(test_lab, template, tmp_path):
    """The check happens before QEMU loads anything. The session's template
    is put back afterwards, so later sessions still restore from it."""
    backup = tmp_path / "template"
    shutil.copytree(template.dir, backup)
    with open(template.state, "r+b") as f:
        f.truncate(template.state.stat().st_size // 2)
    events: list = []
    vm = fresh(test_lab, events)
    try:
        st = vm.up()
        assert st.template is None                           # booted cold
        said = [e.message for e in events if e.kind == Kind.TEMPLATE]
        assert said and "truncated" in said[0] and "booting cold" in said[0]
        assert not template.exists                           # a bad template is not kept
    finally:
        vm.down()
        if not template.exists:
            backup.rename(template.dir)
