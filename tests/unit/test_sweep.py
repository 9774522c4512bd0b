# SPDX-License-Identifier: MIT
"""Sweeps without a VM: the records the pieces hand each other (a point's
result file, the sweep index), the grid file's located errors, and run_sweep
and the sweep/demo commands with papermill replaced by a fake notebook."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import papermill
import pytest

from uffdlab import report, sweep
from uffdlab.cli import notebooks as cli_notebooks
from uffdlab.config import ConfigError, load_lab
from uffdlab.model import RunResult, Status
from uffdlab.results import ResultsDB
from uffdlab.sweep import PointResult, SweepIndex, SweepPoint, load_grid, run_sweep, sweeps_root

from .labs import MINIMAL_LAB

LAB = MINIMAL_LAB


@pytest.fixture
def lab(tmp_path):
    path = tmp_path / "lab.yml"
    path.write_text(LAB)
    return load_lab(path)


def run_result(run_id: str, status: str = "ok", consistent: bool | None = True,
               error: str | None = None, **params) -> RunResult:
    summary = None if consistent is None else {"type": "summary", "consistent": consistent,
                                               "snapshot_ms": 12.5}
    return RunResult(run_id=run_id, started=time.time(), lab="t", vm="nb-trixie-1536m-2c",
                     image="trixie", image_key="k", kernel="6.12.0", accel="tcg",
                     tools_version="v", scenario="S3", scenario_name="multi-writer",
                     params={"strategy": "uffd-wp", "writers": 2, **params}, command="c",
                     status=Status(status), error=error, expect_consistent=True,
                     summary=summary)


# -- PointResult ----------------------------------------------------------------


def test_point_result_of_a_run_and_round_trip(tmp_path):
    res = PointResult.of(run_result("r1", "failed", None,
                                    error="  ssh: connection lost\ntraceback ...\n"))
    assert res == PointResult("r1", Status.FAILED, None, "ssh: connection lost")
    path = res.write(tmp_path / "point.result.json")
    assert json.loads(path.read_text()) == {"run_id": "r1", "status": "failed",
                                            "consistent": None,
                                            "error": "ssh: connection lost"}
    back = PointResult.read(path)
    assert back == res and back.status is Status.FAILED
    ok = PointResult.of(run_result("r2"))
    assert ok == PointResult("r2", Status.OK, True, None)
    assert str(ok) == "run r2: ok, snapshot consistent"
    assert str(res) == "run r1: failed: ssh: connection lost"


def test_point_result_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "point.result.json"
    PointResult("r1", Status.OK, True).write(path)

    def broken(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        PointResult("r2", Status.INCONSISTENT, False).write(path)
    monkeypatch.undo()
    assert PointResult.read(path).run_id == "r1"          # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["point.result.json"]
    with pytest.raises(FileNotFoundError):                # nothing half made
        PointResult("r3", Status.OK).write(tmp_path / "absent" / "x.json")
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("text,why", [
    ("RESULT {", "invalid JSON"),
    ('{"run_id": "r", "status": "great"}', "status: input should be"),
    ('{"run_id": "r", "status": "ok", "extra": 1}', "extra: unexpected keyword argument"),
    ('{"status": "ok"}', "run_id: field required"),
])
def test_point_result_read_refuses_what_is_not_one(tmp_path, text, why):
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(ValueError) as exc:
        PointResult.read(path)
    assert str(exc.value).startswith(f"{path}: expected a point result, ")
    assert why in str(exc.value)


# -- SweepIndex ---------------------------------------------------------------------


def index_of(sweep_id: str, *points: SweepPoint) -> SweepIndex:
    return SweepIndex(sweep_id=sweep_id, lab="lab.yml", notebook="10-snapshot.ipynb",
                      fixed={"image": "trixie"}, grid={"writers": [1, 2]}, points=list(points))


def test_sweep_index_save_load_latest(tmp_path):
    root = tmp_path / "sweeps"
    with pytest.raises(FileNotFoundError, match=f"no sweep under {root}"):
        SweepIndex.latest(root)
    a, b = root / "20250101-000000-aaaaaa", root / "20250102-000000-bbbbbb"
    a.mkdir(parents=True)
    b.mkdir()
    first = index_of("A", SweepPoint(index=0, params={"writers": 1}, notebook="point-000.ipynb",
                                     status=Status.OK, run_id="r1", seconds=3.2))
    first.save(a)
    index_of("B").save(b)
    loaded = SweepIndex.load(a)
    assert loaded == first.model_copy(update={"directory": a})
    assert loaded.points[0].status is Status.OK and loaded.run_ids == ["r1"]
    assert "directory" not in json.loads((a / "index.json").read_text())
    old = time.time() - 100
    os.utime(b / "index.json", (old, old))                # a was written last
    assert SweepIndex.latest(root).sweep_id == "A"
    os.utime(a / "index.json", (old - 100, old - 100))
    assert SweepIndex.latest(root).sweep_id == "B"
    assert SweepIndex.latest(root).directory == b
    (a / "index.json").write_text('{"sweep_id": 5}')
    with pytest.raises(ValueError, match=f"{a / 'index.json'}: expected a sweep index"):
        SweepIndex.load(a)


def test_sweep_index_find_defaults_to_the_labs_newest(lab):
    d = sweeps_root(lab) / "s1"
    d.mkdir(parents=True)
    index_of("s1").save(d)
    assert SweepIndex.find(lab).sweep_id == "s1"
    assert SweepIndex.find(lab, d).directory == d


def test_sweep_index_frames_table_and_notes(lab):
    with ResultsDB(lab.results_path) as db:
        db.store(run_result("r1", writers=1))
        db.store(run_result("r2", "inconsistent", False, writers=2))
        db.store(run_result("other", writers=4))          # not this sweep's
    index = index_of(
        "s", SweepPoint(index=0, params={"writers": 1}, notebook="p0", status="ok", run_id="r1"),
        SweepPoint(index=1, params={"writers": 2}, notebook="p1", status="inconsistent",
                   run_id="r2"),
        SweepPoint(index=2, params={"writers": 4}, notebook="p2", error="no fit"))
    frames = index.frames(lab)
    assert list(frames.runs["run_id"]) == ["r1", "r2"]
    table = report.sweep_table(index, frames)
    assert list(table.index) == [0, 1, 2]
    assert list(table["status"]) == ["ok", "inconsistent", "failed"]
    assert table.loc[2, "verdict"] == "FAILED: no fit"
    assert table.loc[0, "snapshot_ms"] == 12.5
    assert report.sweep_notes(index, frames) == "point 2 failed: no fit  (notebook: p2)"
    assert index.summary().startswith("sweep s: 3 points, 1 ok, 1 inconsistent, 1 failed")


# -- the grid file ------------------------------------------------------------------


def grid_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yml"
    path.write_text(text)
    return path


def test_grid_loads_and_counts_without_expanding(tmp_path):
    grid = load_grid(grid_file(tmp_path, "fixed:\n  image: trixie\ngrid:\n  writers: [1, 2]\n"
                                          "  strategy: [uffd-wp, stop-the-world, async-scan]\n"
                                          "teardown: false\n"))
    assert grid.size == 6 and len(grid.points()) == 6
    assert grid.points()[1] == {"writers": 1, "strategy": "stop-the-world"}
    assert grid.notebook == "10-snapshot.ipynb" and grid.teardown is False
    assert load_grid(sweep.NOTEBOOKS / "sweep-example.yml").size == 6


@pytest.mark.parametrize("text,problem", [
    ("grid:\n  writers: [1]\ngird: 3\n",
     "3: gird: unknown key 'gird' (did you mean 'grid'?)"),
    ("grid:\n  writers: [1]\n  size: []\n", "3: grid.size: expected a non-empty list, got []"),
    ("fixed:\n  result_path: /tmp/x\ngrid:\n  writers: [1]\n",
     "2: fixed.result_path: expected a parameter the sweep does not set itself (it sets "
     "lab_path, sweep_id, teardown, result_path, fresh, vm_name, results_db for every "
     "point), "
     "got 'result_path'"),
    ("grid:\n  writers: 4\n", "2: grid.writers: expected a non-empty list, got 4"),
    ("fixed:\n  image: trixie\n  sizes: 32M\ngrid:\n  writers: [1]\n",
     "3: fixed.sizes: expected a parameter of 10-snapshot.ipynb (backing, duration, "),
    ("grid:\n  writers: [1]\nteardown: 1\n", "3: teardown: expected true or false, got 1"),
    ("grid:\n  writers: [1]\nteardown: 'no'\n",
     "3: teardown: expected true or false, got 'no'"),
    ("grid: {}\n", "1: grid: expected at least one parameter: [values], got {}"),
    ("fixed: [1]\ngrid:\n  writers: [1]\n",
     "1: fixed: expected a mapping of parameter: value, got [1]"),
    ("grid:\n" + "".join(f"  {k}: [{', '.join(map(str, range(10)))}]\n"
                         for k in ("writers", "size", "rate", "duration", "backing")),
     "1: grid: expected at most 10000 points, got 100000"),
])
def test_grid_problems_name_file_line_and_field(tmp_path, text, problem):
    path = grid_file(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_grid(path)
    assert len(exc.value.problems) == 1, exc.value.problems
    assert exc.value.problems[0].startswith(f"{path}:{problem}")


def test_grid_lists_every_problem(tmp_path):
    path = grid_file(tmp_path, "grid:\n  writer: [1]\n  size: []\nteardown: yes please\n")
    with pytest.raises(ConfigError) as exc:
        load_grid(path)
    assert [p.split(": ")[1] for p in exc.value.problems] == [
        "grid.writer", "grid.size", "teardown"]
    assert "(did you mean 'writers'?)" in exc.value.problems[0]


# -- run_sweep with a fake papermill ------------------------------------------------


class FakeNotebook:
    """papermill.execute_notebook as a point notebook would behave: by the
    point's `writers`, write a result, raise, or end without writing one."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, input_path, output_path, parameters=None, **kw):
        params = dict(parameters or {})
        self.calls.append((Path(input_path).name, params))
        Path(output_path).write_text("{}")
        if Path(input_path).name == sweep.SWEEP_NOTEBOOK:
            return
        # the index is saved after every point: the points before this one are in it
        done = SweepIndex.load(Path(output_path).parent).points if len(self.calls) > 1 else []
        assert len(done) == params["writers"] - 1
        result = Path(params["result_path"])
        match params["writers"]:
            case 1:
                PointResult("r1", Status.OK, True).write(result)
            case 2:
                PointResult("r2", Status.INCONSISTENT, False).write(result)
            case 3:
                raise papermill.PapermillExecutionError(
                    4, 1, "ValueError: size", "ValueError: size 999G does not fit",
                    "ValueError", ["Traceback", "ValueError: size 999G does not fit"])
            case 4:
                pass                                      # no result file
            case 5:
                result.write_text("RESULT {")


@pytest.fixture
def fake_papermill(monkeypatch):
    """papermill and the point's VM faked: no notebook kernel, no QEMU."""
    fake = FakeNotebook()
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    monkeypatch.setattr(sweep, "_start_bringup", FakeBringup)
    return fake


class FakeBringup:
    """A point's VM coming up, faked: it logs when it starts and stops."""

    log: list[tuple[str, int]] = []

    def __init__(self, lab, p, fresh, ev):
        self.writers, self.fresh, self.stopped = p["writers"], fresh, False
        self.vm = SimpleNamespace(name=f"nb-fake-{self.writers}")
        self.log.append(("up", self.writers))

    def join(self):
        return None

    def discard(self):
        if self.fresh and not self.stopped:
            self.stopped = True
            self.log.append(("down", self.writers))


def five_points(tmp_path: Path) -> Path:
    return grid_file(tmp_path, "fixed:\n  image: trixie\ngrid:\n  writers: [1, 2, 3, 4, 5]\n"
                               "teardown: false\n")


def test_run_sweep_reads_result_files(lab, tmp_path, fake_papermill):
    res = run_sweep(lab, load_grid(five_points(tmp_path)), out_root=tmp_path / "sweeps")
    index = SweepIndex.load(res.directory)
    assert index == res.index
    assert [(p.status, p.run_id) for p in index.points] == [
        (Status.OK, "r1"), (Status.INCONSISTENT, "r2"), (Status.FAILED, None),
        (Status.FAILED, None), (Status.FAILED, None)]
    errors = [p.error for p in index.points]
    assert errors[:2] == [None, None]
    assert "999G does not fit" in errors[2]
    assert errors[3] == "the notebook wrote no result file (point-003.result.json)"
    assert errors[4].startswith(f"{res.directory / 'point-004.result.json'}: expected a "
                                f"point result, invalid JSON")
    assert [p.index for p in res.failed] == [2, 3, 4]
    assert index.grid == {"writers": [1, 2, 3, 4, 5]} and index.fixed == {"image": "trixie"}
    first = fake_papermill.calls[0][1]
    assert first["result_path"] == str(res.directory / "point-000.result.json")
    assert first["teardown"] is False and first["sweep_id"] == index.sweep_id
    assert first["lab_path"] == str(lab.source.resolve()) and first["image"] == "trixie"
    assert fake_papermill.calls[-1] == (sweep.SWEEP_NOTEBOOK, {
        "lab_path": str(lab.source.resolve()), "sweep_dir": str(res.directory)})
    assert res.report == res.directory / "sweep.ipynb"


def test_fresh_points_start_the_next_vm_once_the_result_is_written(lab, tmp_path, monkeypatch):
    """With a VM per point, the point's VM stops as soon as its notebook has
    written the result, and the next point's VM starts coming up while that
    notebook is still drawing its plots."""
    FakeBringup.log = []
    monkeypatch.setattr(sweep, "_start_bringup", FakeBringup)
    seen_while_running = []

    def notebook(input_path, output_path, parameters=None, **kw):
        Path(output_path).write_text("{}")
        if Path(input_path).name == sweep.SWEEP_NOTEBOOK:
            return
        PointResult(f"r{parameters['writers']}", Status.OK, True).write(parameters["result_path"])
        deadline = time.monotonic() + 10        # the plots: the next VM comes up meanwhile
        while ("up", parameters["writers"] + 1) not in FakeBringup.log \
                and parameters["writers"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen_while_running.append(list(FakeBringup.log))

    monkeypatch.setattr(papermill, "execute_notebook", notebook)
    grid = grid_file(tmp_path, "fixed:\n  image: trixie\ngrid:\n  writers: [1, 2, 3]\n"
                               "fresh: true\n")
    res = run_sweep(lab, load_grid(grid), out_root=tmp_path / "sweeps")
    assert [p.run_id for p in res.points] == ["r1", "r2", "r3"]
    assert seen_while_running[0] == [("up", 1), ("down", 1), ("up", 2)]
    assert FakeBringup.log == [("up", 1), ("down", 1), ("up", 2), ("down", 2), ("up", 3),
                               ("down", 3)]


def test_an_interrupted_fresh_sweep_stops_the_vm_it_started_early(lab, tmp_path, monkeypatch):
    FakeBringup.log = []
    monkeypatch.setattr(sweep, "_start_bringup", FakeBringup)

    def notebook(input_path, output_path, parameters=None, **kw):
        PointResult("r1", Status.OK, True).write(parameters["result_path"])
        while ("up", 2) not in FakeBringup.log:
            time.sleep(0.01)
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", notebook)
    grid = grid_file(tmp_path, "fixed:\n  image: trixie\ngrid:\n  writers: [1, 2]\n")
    with pytest.raises(KeyboardInterrupt):
        run_sweep(lab, load_grid(grid), out_root=tmp_path / "sweeps")
    assert FakeBringup.log == [("up", 1), ("down", 1), ("up", 2), ("down", 2)]


# -- the commands ---------------------------------------------------------------------


def test_cmd_sweep_table_and_exit_code(lab, tmp_path, fake_papermill, capsys):
    args = argparse.Namespace(lab=str(lab.source), grid=str(five_points(tmp_path)),
                              resume=None, cluster=None)
    assert cli_notebooks.cmd_sweep(args) == 1               # some points failed
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:6]]
    assert [(r[0], r[2]) for r in rows] == [("0", "ok"), ("1", "inconsistent"),
                                            ("2", "failed"), ("3", "failed"), ("4", "failed")]
    assert rows[0][3] == "r1"
    assert f"index.json: {sweeps_root(lab)}" in out


@pytest.mark.parametrize("writes,printed", [
    (True, "run r1: ok, snapshot consistent"),
    (False, "no outcome from the notebook"),
])
def test_cmd_demo_reads_the_result_file(lab, monkeypatch, capsys, writes, printed):
    from uffdlab.images import ImageStore
    monkeypatch.setattr(ImageStore, "build", lambda self, name: None)
    calls = []

    def notebook(input_path, output_path, parameters=None, **kw):
        calls.append(parameters)
        Path(output_path).write_text("{}")
        if writes:
            PointResult("r1", Status.OK, True).write(parameters["result_path"])
    monkeypatch.setattr(papermill, "execute_notebook", notebook)
    args = argparse.Namespace(lab=str(lab.source), vm=None, keep=False, verbose=False)
    assert cli_notebooks.cmd_demo(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(printed)
    (params,) = calls
    assert params["result_path"].startswith(str(lab.results_path.parent / "notebooks"))
    assert params["result_path"].endswith(".result.json") and params["teardown"] is True
