# SPDX-License-Identifier: MIT
"""The client side of sweeps on Dask without a cluster: what a worker's
outcome becomes (journal, one stored run, the index), what a resumed sweep
adopts instead of running again, the lab a worker reads, and the errors of
`sweep --resume` and the cluster section."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from distributed import KilledWorker

from uffdlab import cluster
from uffdlab.cli import main
from uffdlab.config import ClusterSpec, ConfigError, load_lab
from uffdlab.events import Emitter
from uffdlab.model import Kind, Status
from uffdlab.results import ResultsDB, store_once
from uffdlab.sweep import (
    PointResult,
    SweepError,
    SweepIndex,
    _adopt_finished,
    _new_index,
    load_grid,
    point_files,
    resume_sweep,
)

from .labs import MINIMAL_LAB
from .test_results import make_result


@pytest.fixture
def lab(tmp_path):
    path = tmp_path / "lab.yml"
    path.write_text(MINIMAL_LAB)
    (tmp_path / "lab.lock").write_text("lock: 1\n")
    return load_lab(path)


@pytest.fixture
def grid(tmp_path):
    path = tmp_path / "grid.yml"
    path.write_text("fixed:\n  image: trixie\ngrid:\n  writers: [1, 2, 3]\n")
    return load_grid(path)


def job_for(lab, index: SweepIndex, i: int, writers: int) -> cluster.PointJob:
    return cluster.PointJob(index.sweep_id, i, index.notebook,
                            {"image": "trixie", "writers": writers}, True,
                            str(lab.source), lab.source.read_text(), None)


def outcome(i: int, run_id: str | None, status=Status.OK) -> cluster.PointOutcome:
    run = make_result(run_id).to_dict() if run_id else None
    return cluster.PointOutcome(i, PointResult(run_id, status, True if run_id else None,
                                               None if run_id else "bad parameters"),
                                run, b'{"cells": []}', "host-a", "w1", 12.5)


def stored_ids(lab) -> list[str]:
    with ResultsDB(lab.results_path) as db:
        return [r["run_id"] for r in db.runs()]


def test_an_outcome_is_journalled_stored_once_and_indexed(lab, grid, tmp_path):
    index = _new_index(lab, grid, tmp_path / "sweeps")
    job = job_for(lab, index, 1, 2)
    cluster.record_outcome(lab, index, job, outcome(1, "run-b"))
    cluster.record_outcome(lab, index, job, outcome(1, "run-b"))   # delivered twice
    assert stored_ids(lab) == ["run-b"]
    files = point_files(index.directory, 1)
    assert json.loads(files.run.read_text())["run_id"] == "run-b"
    assert files.notebook.read_bytes() == b'{"cells": []}'
    (point,) = SweepIndex.load(index.directory).points
    assert (point.index, point.params, point.run_id, point.host, point.worker) == \
        (1, {"writers": 2}, "run-b", "host-a", "w1")


def test_a_point_that_failed_by_itself_is_indexed_without_a_run(lab, grid, tmp_path):
    index = _new_index(lab, grid, tmp_path / "sweeps")
    cluster.record_outcome(lab, index, job_for(lab, index, 0, 1),
                           outcome(0, None, Status.FAILED))
    (point,) = SweepIndex.load(index.directory).points
    assert point.status == Status.FAILED and point.error == "bad parameters"
    assert not point_files(index.directory, 0).run.exists()


def test_a_resumed_sweep_adopts_journalled_points_and_stores_them_once(lab, grid, tmp_path):
    """The client died after the journal (and, for point 1, after storing)
    but before the index: resuming stores what is missing and reruns nothing
    that finished."""
    index = _new_index(lab, grid, tmp_path / "sweeps")
    for i, run_id in ((0, "run-a"), (1, "run-b")):
        files = point_files(index.directory, i)
        files.run.write_text(json.dumps(make_result(run_id).to_dict()))
        PointResult(run_id, Status.OK, True).write(files.result)
    store_once(lab.results_path, make_result("run-b").to_dict())
    # point 2: a result naming a run that was never stored nor journalled
    PointResult("run-c", Status.OK, True).write(point_files(index.directory, 2).result)
    seen = []
    _adopt_finished(lab, index, grid.points(), Emitter("sweep", seen.append))
    assert sorted(stored_ids(lab)) == ["run-a", "run-b"]
    assert [(p.index, p.run_id) for p in SweepIndex.load(index.directory).points] == \
        [(0, "run-a"), (1, "run-b")]                # point 2 runs again
    assert sum("had finished" in e.message for e in seen) == 2


def test_a_dead_worker_becomes_a_failed_point_saying_so():
    class Future:
        def result(self):
            raise KilledWorker("uffdlab-x-point-002", SimpleNamespace(address="tcp://h:1"), 1)
    out = cluster._outcome_of(Future(), 2)
    assert out.result.status == Status.FAILED and out.run is None
    assert "worker died while running it, on 2 workers (the last tcp://h:1)" in \
        out.result.error


def test_a_worker_uses_the_clients_lab_file_when_it_sees_the_same_one(lab, tmp_path,
                                                                      monkeypatch):
    job = cluster.PointJob("s", 0, "10-snapshot.ipynb", {}, True, str(lab.source),
                           lab.source.read_text(), "lock: 1\n")
    assert cluster.worker_lab(job).source == lab.source
    monkeypatch.setattr(cluster.tempfile, "gettempdir", lambda: str(tmp_path / "elsewhere"))
    other = cluster.PointJob("s", 0, "10-snapshot.ipynb", {}, True, "/nowhere/lab.yml",
                             lab.source.read_text() + "# changed\n", "lock: 1\n")
    copy = cluster.worker_lab(other)             # another host: a copy with its lock
    assert copy.source.parent.parent.parent == tmp_path / "elsewhere"
    assert copy.source.read_text().endswith("# changed\n")
    assert (copy.source.parent / "lab.lock").read_text() == "lock: 1\n"


def test_progress_counts_points_per_host_and_a_retried_point_once():
    seen = []
    p = cluster.Progress(4, 0, Emitter("sweep", seen.append))
    p.started("a", "w1", 0)
    p.started("b", "w2", 1)
    p.started("a", "w1", 1)                       # b's worker died: retried on a
    p.finished("a", 1, True)
    p.finished(None, 0, False)                    # no outcome at all
    assert str(p.hosts["a"]) == "1 done, 0 running, 0 failed"
    assert str(p.hosts["b"]) == "0 done, 0 running, 0 failed"
    last = seen[-1]
    assert last.kind == Kind.PROGRESS and (last.data["done"], last.data["failed"]) == (2, 1)
    assert "2/4 points" in last.message


def test_resume_names_the_sweeps_it_knows(lab, grid, tmp_path):
    index = _new_index(lab, grid, None)
    with pytest.raises(SweepError, match=f"got 'nope' \\(known: {index.sweep_id}\\)"):
        resume_sweep(lab, "nope")


def test_resume_refuses_another_lab(lab, grid, tmp_path):
    index = _new_index(lab, grid, None)
    other = tmp_path / "other" / "lab.yml"
    other.parent.mkdir()
    other.write_text(MINIMAL_LAB)
    with pytest.raises(SweepError, match="was run with .*pass --lab"):
        resume_sweep(load_lab(other), str(index.directory))


def test_sweep_wants_a_grid_or_resume(lab, capsys):
    assert main(["sweep", "--lab", str(lab.source)]) == 2
    assert "expected GRID.yml or --resume ID" in capsys.readouterr().err


@pytest.mark.parametrize("section, message", [
    ("cluster:\n  scheduler: 8786\n", "cluster.scheduler: expected a Dask scheduler address"),
    ("cluster:\n  hosts: [a, 'b c']\n", "cluster.hosts.1: expected a host name"),
    ("cluster:\n  scheduler: tcp://a:1\n  hosts: [b]\n", "expected either scheduler or hosts"),
    ("cluster:\n  retries: -1\n", "cluster.retries"),
    ("cluster:\n  slots: 2\n", "cluster.slots"),
])
def test_cluster_section_errors_name_the_field(tmp_path, section, message):
    path = tmp_path / "lab.yml"
    path.write_text(MINIMAL_LAB + section)
    with pytest.raises(ConfigError) as e:
        load_lab(path)
    assert message in str(e.value)


def test_local_slots_are_cores_over_vm_cpus(monkeypatch):
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 8)
    assert (cluster.slots_here(2), cluster.slots_here(3), cluster.slots_here(16)) == (4, 2, 1)


def test_every_job_is_a_separate_dask_key(lab, grid, tmp_path):
    index = _new_index(lab, grid, tmp_path / "sweeps")
    keys = {job_for(lab, index, i, i + 1).key for i in range(3)}
    assert len(keys) == 3 and all(index.sweep_id in k for k in keys)


def test_hosts_start_an_ssh_cluster_with_slots_users_and_retries(monkeypatch):
    """The arguments handed to Dask's SSHCluster (the layer below: faked)."""
    import distributed
    made = {}
    monkeypatch.setattr(distributed, "SSHCluster", lambda hosts, **kw: made.update(
        hosts=hosts, **kw) or "cluster")
    spec = ClusterSpec(hosts=["root@lab1", "lab2"], vm_slots=3, retries=2)
    assert cluster.ssh_cluster(spec, spec.retries) == "cluster"
    assert made["hosts"] == ["lab1", "lab1", "lab2"]          # lab1 runs the scheduler too
    assert made["connect_options"] == [{"username": "root"}, {"username": "root"}, {}]
    assert made["worker_options"] == {"nthreads": 3, "resources": {"vm_slots": 3}}
    assert made["scheduler_options"]["allowed_failures"] == 2
    assert made["remote_python"] == "/opt/uffdlab-host/venv/bin/python"


class FakeBringup:
    def __init__(self, name: str, failed: bool = False):
        self.vm = SimpleNamespace(name=name, listener=None)
        self.failed = [RuntimeError("no SSH")] if failed else []
        self.discarded = 0

    def discard(self):
        self.discarded += 1


def test_a_spare_vm_goes_to_the_next_point_of_its_shape_or_stops(monkeypatch):
    spares = cluster._Spares()
    seen = []
    ev = Emitter("point 3", seen.append)
    first = FakeBringup("nb-a")
    spares.add(("lab", "trixie", "1536M", "2"), lambda: first)
    assert spares.claim(("lab", "bookworm", "1536M", "2"), ev) is None   # another shape
    assert spares.claim(("lab", "trixie", "1536M", "2"), ev) is first
    assert first.vm.listener == ev.listener and "using nb-a" in seen[0].message
    assert spares.claim(("lab", "trixie", "1536M", "2"), ev) is None     # taken
    broken, good = FakeBringup("nb-b", failed=True), FakeBringup("nb-c")
    spares.add(("s",), lambda: broken)
    spares.add(("s",), lambda: good)
    assert spares.claim(("s",), ev) is good and broken.discarded == 1   # never a dead one
    monkeypatch.setattr(cluster, "SPARE_SECONDS", 0.05)
    idle = FakeBringup("nb-d")
    spares.add(("s",), lambda: idle)
    deadline = time.monotonic() + 5
    while not idle.discarded and time.monotonic() < deadline:
        time.sleep(0.01)
    assert idle.discarded == 1 and spares.claim(("s",), ev) is None      # unclaimed: stopped
    monkeypatch.setattr(cluster, "SPARE_SECONDS", 60)
    left = FakeBringup("nb-e")
    spares.add(("s",), lambda: left)
    spares.drop_all()
    assert left.discarded == 1
