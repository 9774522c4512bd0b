"""Runs last (pytest orders files by name): it kills the shared trixie VM."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from uffdlab.api import run_and_store
from uffdlab.results import ResultsDB
from uffdlab.vm import pid_alive

pytestmark = pytest.mark.integration


def test_qemu_killed_mid_run_is_a_failed_run_and_leaks_nothing(provisioned, trixie_vm):
    st = trixie_vm.state()
    assert st is not None and st.ssh_ready          # still the session's VM
    started = threading.Event()
    listener = trixie_vm.listener

    def watch(ev):
        if ev.kind == "progress":
            started.set()
        listener(ev)

    trixie_vm.listener = watch
    killer = threading.Thread(target=lambda: started.wait(120) and
                              os.kill(st.qemu_pid, signal.SIGKILL))
    killer.start()
    try:
        res = run_and_store(trixie_vm, "S3", {"size": "16M", "duration": 30})
    finally:
        trixie_vm.listener = listener
        killer.join()
    assert started.is_set()
    assert res.status == "failed"
    assert res.error                                      # says what broke
    with ResultsDB(trixie_vm.lab.results_path) as db:
        row = db.get(res.run_id)
    assert row["status"] == "failed" and row["error"] == res.error
    assert row["serial_log"]                              # the guest's last words
    deadline = time.monotonic() + 20
    while (pid_alive(st.keeper_pid) or trixie_vm.dir.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(st.qemu_pid) and not pid_alive(st.keeper_pid)
    assert not (trixie_vm.dir / "overlay.qcow2").exists()
    assert trixie_vm.state() is None
