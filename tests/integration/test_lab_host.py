# SPDX-License-Identifier: MIT
"""A lab VM as a lab host: playbooks/lab-host.yml prepares a disposable VM,
its `dask worker` service joins a real `dask scheduler` running on this
machine (through QEMU's gateway), runs a task that imports uffdlab from the
copied checkout, and leaves again with `cluster down`.

The VM is asked for apt package python3 only (which it has, so apt is
checked and not run) and no images: apt's list refresh alone takes minutes
inside a TCG guest (measured: 5.5 min to add python3-venv), installing QEMU
and building an image far longer than CI allows. What is under test here is
the playbook, the worker service and the way back to the scheduler, which
are the same on a real host."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import VM_CPUS, VM_MEMORY, wait_for
from uffdlab import cli, paths
from uffdlab.labhost import WORKER_SERVICE, cluster_status, dask_command, workers_by_name
from uffdlab.vm import VM, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def scheduler(tmp_path):
    """A real `dask scheduler` on this machine's loopback, killed at the end."""
    port = free_port()
    log = open(tmp_path / "scheduler.log", "wb")
    proc = subprocess.Popen([dask_command(), "scheduler", "--host", "127.0.0.1", "--port",
                             str(port), "--no-dashboard"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = f"tcp://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return proc.poll() is not None      # dead: fail below, not by timeout
        wait_for(answers, 60, "the dask scheduler to listen")
        assert proc.poll() is None, (tmp_path / "scheduler.log").read_text()
        yield address
    finally:
        proc.kill()
        proc.wait()
        log.close()


def test_a_lab_vm_becomes_a_lab_host_and_leaves(test_lab, scheduler, tmp_path, capsys):
    started = time.monotonic()
    vm = VM.for_shape(test_lab, "trixie", VM_MEMORY, VM_CPUS, fresh=True)
    try:
        # a host needs no guest tools: up, not api.ready (it restores from the
        # shape's template when there is one, and boots cold otherwise)
        vm.up()
        hosts = tmp_path / "hosts.yml"
        hosts.write_text(yaml.safe_dump({
            "scheduler": scheduler, "apt_packages": ["python3"], "images": [],
            "hosts": [{"vm": vm.name}]}))
        lab_args = ["--lab", str(test_lab.source)]

        code = cli.main([*lab_args, "cluster", "up", str(hosts), "--timeout", "600"])
        out, err = capsys.readouterr()
        sys.stderr.write(err[-3000:])               # the playbook's progress, on failure
        assert code == 0, err[-2000:]
        assert "started: Install the wheelhouse" in err     # progress names each task
        assert f"cluster: {{scheduler: {scheduler}}}" in out
        up_seconds = time.monotonic() - started

        worker = workers_by_name(scheduler)[vm.name]
        assert worker["resources"] == {"vm_slots": 1}       # 2 cores // 2
        with vm.session() as s:
            unit = s.run(f"cat /etc/systemd/system/{WORKER_SERVICE}.service").stdout
        port = scheduler.rsplit(":", 1)[1]
        assert f"dask worker tcp://10.0.2.2:{port} " in unit  # the host's loopback, via QEMU

        # the scheduler calls the worker back (through the forwarded port) for
        # the result of a task that ran in the VM with the copied checkout. The
        # guest's Python (3.13) pickles a Path in a way 3.11 cannot read: only
        # its text comes back.
        from distributed import Client
        with Client(scheduler, timeout=30, set_as_default=False) as client:
            repo = client.submit(paths.checkout, resources={"vm_slots": 1}, pure=False)
            where = client.submit(str, repo, resources={"vm_slots": 1}).result(timeout=300)
        assert where == "/opt/uffdlab-host/src"

        rows, _ = cluster_status(scheduler)
        assert [(r.name, r.vm_slots) for r in rows] == [(vm.name, 1)]

        assert cli.main([*lab_args, "cluster", "down", str(hosts)]) == 0
        wait_for(lambda: vm.name not in workers_by_name(scheduler), 120,
                 "the worker to leave the scheduler")
        with vm.session() as s:
            state = s.run(f"systemctl is-enabled {WORKER_SERVICE}").stdout.strip()
        assert state == "disabled"
        print(f"lab host test: cluster up {up_seconds:.0f} s, in all "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    finally:
        vm.down()


def test_the_scheduler_cluster_up_starts_is_found_and_stopped(tmp_path, capsys):
    """`cluster up` with no scheduler in HOSTS.yml starts one here, detached;
    status finds it through its record, and only that process is stopped."""
    from tests.unit.labs import MINIMAL_LAB
    from uffdlab.config import load_lab
    from uffdlab.labhost import (
        default_scheduler,
        recorded_scheduler,
        start_scheduler,
        stop_scheduler,
    )
    path = tmp_path / "lab.yml"
    path.write_text(MINIMAL_LAB)
    lab = load_lab(path)
    rec = start_scheduler(lab, "127.0.0.1", free_port(), free_port())
    try:
        assert recorded_scheduler(lab) == rec and rec.process.alive()
        assert default_scheduler(lab) == rec.address
        assert cli.main(["--lab", str(path), "cluster", "status"]) == 0
        assert f"scheduler: {rec.address}, 0 worker(s)" in capsys.readouterr().out
        assert stop_scheduler(lab) == rec
        assert not rec.process.alive() and recorded_scheduler(lab) is None
        assert stop_scheduler(lab) is None                   # nothing left to stop
    finally:
        rec.process.kill()
