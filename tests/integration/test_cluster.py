# SPDX-License-Identifier: MIT
"""Sweeps on Dask: a real `dask scheduler` and two `dask worker` processes
on this machine (not an in-process cluster), each worker with one VM slot.
One worker is killed with SIGKILL in the middle of a point: the point is
tried again on the other worker, every point is stored exactly once, and
the killed worker's VM does not outlive it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import VM_CPUS, VM_MEMORY, wait_for
from uffdlab.cluster import run_sweep
from uffdlab.config import ClusterSpec
from uffdlab.model import Kind, Status
from uffdlab.results import ResultsDB
from uffdlab.sweep import SweepIndex, load_grid
from uffdlab.vm import free_port, lab_vms_dir

pytestmark = pytest.mark.integration

DASK = Path(sys.executable).parent / "dask"


@pytest.fixture
def dask_processes(tmp_path):
    """A scheduler and two one-slot workers, without nannies (a killed
    worker stays dead, so its point must move to the other one)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # allowed-failures 1: a point whose worker died is tried once more
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    procs = {}
    log = open(tmp_path / "dask.log", "w")
    try:
        procs["scheduler"] = subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--dashboard-address", ":0"], stdout=log, stderr=subprocess.STDOUT, env=env)
        for name in ("w1", "w2"):
            procs[name] = subprocess.Popen(
                [DASK, "worker", address, "--name", name, "--nthreads", "1", "--no-nanny",
                 "--resources", "vm_slots=1"], stdout=log, stderr=subprocess.STDOUT, env=env)
        from distributed import Client
        with Client(address, timeout="30s") as client:
            wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, 90,
                     "two dask workers joining the scheduler")
        yield address, procs
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
        log.close()


def test_a_sweep_on_two_workers_survives_a_killed_one(dask_processes, provisioned, test_lab,
                                                      tmp_path):
    address, procs = dask_processes
    lab = test_lab.model_copy(update={"cluster": ClusterSpec(scheduler=address)})
    grid_file = tmp_path / "grid.yml"
    grid_file.write_text(yaml.safe_dump({
        "fixed": {"image": "trixie", "vm_memory": VM_MEMORY, "vm_cpus": VM_CPUS,
                  "writers": 2, "duration": 1.0},
        # 999G cannot fit the VM: that point fails for a reason of its own
        "grid": {"size": ["16M", "24M", "32M", "999G"]}}))
    starts: dict[int, list[str]] = {}
    by_worker: dict[str, list[int]] = {}
    killed: list[tuple[str, int]] = []

    def listener(ev):
        point, worker = ev.data.get("point"), ev.data.get("worker")
        if ev.kind == Kind.PROGRESS and "started on" in ev.message:
            starts.setdefault(point, []).append(worker)
            by_worker.setdefault(worker, []).append(point)
            # a worker starting its second point (its first is done: one
            # slot), as its VM comes up (maybe a spare restored during the
            # first one's plots): kill it
            if len(by_worker[worker]) == 2 and not killed:
                procs[worker].send_signal(signal.SIGKILL)
                killed.append((worker, point))

    res = run_sweep(lab, load_grid(grid_file), listener, out_root=tmp_path / "sweeps",
                    cluster=True)
    assert killed, "no worker was killed: the test did not test anything"
    index = SweepIndex.load(res.directory)
    assert [p.status for p in index.points] == [Status.OK] * 3 + [Status.FAILED]
    assert "does not fit" in index.points[3].error or "999G" in index.points[3].error
    (dead, retried), = killed
    assert set(by_worker) == {"w1", "w2"}                              # both took points
    assert len(starts[retried]) == 2 and index.points[retried].worker != dead   # tried again
    # a point's own failure is not retried (only a result the dead worker
    # still held, not yet gathered, is computed again: Dask keeps results on
    # the worker until the client fetches them)
    assert len(starts[3]) == 1 or starts[3][0] == dead
    assert all(p.host for p in index.points)
    run_ids = [p.run_id for p in index.points[:3]]
    assert len(set(run_ids)) == 3
    with ResultsDB(lab.results_path) as db:
        stored = [r["run_id"] for r in db.runs() if r["run_id"] in run_ids]
    assert sorted(stored) == sorted(run_ids)       # each stored, none twice
    for p in index.points:
        assert (res.directory / p.notebook).exists() or p.run_id is None
    assert res.report is not None
    # the killed worker's VM goes with it (its keeper watches the owner)
    vms = lab_vms_dir(lab)
    fresh = lambda: [d.name for d in vms.iterdir()   # noqa: E731
                     if d.is_dir() and d.name.startswith("nb-trixie-1536m-2c-")]
    wait_for(lambda: not fresh(), 30, f"the points' VMs to be gone ({fresh()})")
    qemu = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True)
    assert f"{vms}/nb-trixie-1536m-2c-" not in qemu.stdout      # (other labs' VMs may run)


def test_a_killed_sweep_resumes_with_only_its_missing_points(provisioned, test_lab, tmp_path):
    """`uffdlab sweep` killed with SIGKILL after its first point: `--resume`
    runs the second point only, and the first one's run stays the one run."""
    grid_file = tmp_path / "grid.yml"
    grid_file.write_text(yaml.safe_dump({
        "fixed": {"image": "trixie", "vm_memory": VM_MEMORY, "vm_cpus": VM_CPUS,
                  "writers": 2, "duration": 1.0},
        "grid": {"size": ["16M", "24M"]}}))
    sweeps = test_lab.results_path.parent / "sweeps"
    before = set(sweeps.glob("*")) if sweeps.exists() else set()
    cli = [sys.executable, "-m", "uffdlab", "sweep", "--here", "--lab", str(test_lab.source)]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([*cli, str(grid_file)], stdout=log, stderr=subprocess.STDOUT)
    try:
        def one_point_indexed() -> bool:
            new = [d for d in sweeps.glob("*") if d not in before] if sweeps.exists() else []
            return bool(new) and len(SweepIndex.load(new[0]).points) == 1
        wait_for(one_point_indexed, 300, "the sweep's first point")
        first.kill()
    finally:
        first.kill()
        first.wait()
    (directory,) = [d for d in sweeps.glob("*") if d not in before]
    first_run = SweepIndex.load(directory).points[0].run_id
    done = subprocess.run([*cli, "--resume", directory.name], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming sweep" in done.stderr and "1 to run" in done.stderr
    index = SweepIndex.load(directory)
    assert [p.status for p in index.points] == [Status.OK, Status.OK]
    assert index.points[0].run_id == first_run
    with ResultsDB(test_lab.results_path) as db:
        ids = [r["run_id"] for r in db.runs()]
    assert ids.count(first_run) == 1 and index.points[1].run_id in ids
    vms = lab_vms_dir(test_lab)
    wait_for(lambda: not [d for d in vms.iterdir()
                          if d.is_dir() and d.name.startswith("nb-trixie-1536m-2c-")],
             30, "the killed sweep's VM to be gone")
