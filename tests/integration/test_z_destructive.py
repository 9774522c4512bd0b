# SPDX-License-Identifier: MIT
"""Runs last (pytest orders files by name): it kills the shared VMs, QEMU of
the trixie one mid-run and the keeper of the bookworm one mid-provision."""
from __future__ import annotations

import time

import pytest

from tests.conftest import run_and_strike
from uffdlab.provision import ProvisionError, provision
from uffdlab.results import ResultsDB

pytestmark = pytest.mark.integration


def test_qemu_killed_mid_run_is_a_failed_run_and_leaks_nothing(provisioned, trixie_vm):
    st = trixie_vm.state()
    assert st is not None and st.ssh_ready          # still the session's VM
    res, struck = run_and_strike(trixie_vm, st.qemu_id.kill)
    assert struck
    assert res.status == "failed"
    assert res.error                                      # says what broke
    with ResultsDB(trixie_vm.lab.results_path) as db:
        row = db.get(res.run_id)
    assert row["status"] == "failed" and row["error"] == res.error
    assert row["serial_log"]                              # the guest's last words
    _gone(trixie_vm, st)


def test_keeper_killed_mid_provision_fails_it_and_leaks_nothing(provisioned, bookworm_vm):
    st = bookworm_vm.state()
    assert st is not None and st.ssh_ready
    bookworm_vm.update_state(facts={})              # so provisioning runs again
    listener = bookworm_vm.listener

    def kill_at_first_task(ev):
        if ev.kind == "task" and st.keeper_id.alive():
            st.keeper_id.kill()                      # QEMU follows it (PDEATHSIG)
        listener(ev)

    bookworm_vm.listener = kill_at_first_task
    try:
        with pytest.raises(ProvisionError):
            provision(bookworm_vm)
    finally:
        bookworm_vm.listener = listener
    _gone(bookworm_vm, st)


def _gone(vm, st) -> None:
    """No keeper, no QEMU, no overlay, no state of this VM (after a status-like look)."""
    deadline = time.monotonic() + 20
    while (st.keeper_id.alive() or st.qemu_id.alive()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not st.qemu_id.alive() and not st.keeper_id.alive()
    assert vm.state() is None                        # reaps what the keeper could not
    assert not vm.dir.exists()
