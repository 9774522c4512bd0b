# SPDX-License-Identifier: MIT
"""GRID.yml --papermill, one execution of 10-snapshot per point--> executed
notebooks, a result file per point and index.json under the results directory.

Every point asks for its VM by shape (image, memory, cpus), so points share
one running, provisioned VM per image and cost only their own run. A failed
point is recorded in the index and the sweep goes on.

The pieces hand each other typed records, never printed text:

* `Grid`: the sweep file, checked like lab.yml (`grid.yml:LINE: path: ...`).
* `PointResult`: what a point notebook writes to its `result_path` parameter.
* `SweepIndex` (of `SweepPoint`s): the sweep's index.json, saved after every
  point and read back by 20-sweep.ipynb.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .config import (
    ConfigError,
    FieldProblem,
    Lab,
    describe_error,
    did_you_mean,
    parse_yaml,
    read_text,
    short,
)
from .events import Emitter, Listener
from .jupyter import KERNEL_NAME
from .model import Kind, RunResult, Status
from .paths import NOTEBOOKS

if TYPE_CHECKING:

    from .results import Frames

POINT_NOTEBOOK = "10-snapshot.ipynb"
SWEEP_NOTEBOOK = "20-sweep.ipynb"
KERNEL = KERNEL_NAME                # "uffdlab", the kernel the notebooks name
INDEX_FILE = "index.json"
MAX_POINTS = 10_000


# -- the grid file -------------------------------------------------------------


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The names and defaults in a notebook's `parameters` cell."""
    import ast

    import papermill

    def value(src: str) -> Any:
        try:
            return ast.literal_eval(src)
        except (ValueError, SyntaxError):
            return src                      # an expression: keep its source
    return {name: value(spec["default"]) for name, spec in
            papermill.inspect_notebook(str(path)).items()}


def _notebook_name(value: Any) -> Any:
    why = _notebook_problem(value)
    if why:
        raise ValueError(why)
    return value


def _parameters(info: ValidationInfo) -> dict[str, Any] | None:
    """The parameters of the grid's notebook (None when the notebook itself is
    wrong: that is reported on its own line). Read once per validation."""
    notebook = info.data.get("notebook")
    if notebook is None:
        return None
    cache = info.context if isinstance(info.context, dict) else {}
    if ("parameters", notebook) not in cache:
        cache["parameters", notebook] = notebook_parameters(NOTEBOOKS / notebook)
    return cache["parameters", notebook]


# Point-notebook parameters run_sweep fills in for every point.
SET_BY_SWEEP = ("lab_path", "sweep_id", "teardown", "result_path", "fresh", "vm_name",
                "results_db")


def _parameter_key(section: str) -> Any:
    """A key of `fixed` or `grid`: a parameter of the grid's notebook."""
    def check(key: Any, info: ValidationInfo) -> str:
        loc = (section, str(key))
        if not isinstance(key, str):
            raise FieldProblem(loc, key, "a parameter name")
        if key in SET_BY_SWEEP:
            raise FieldProblem(loc, key, "a parameter the sweep does not set itself (it sets "
                               f"{', '.join(SET_BY_SWEEP)} for every point)")
        valid = _parameters(info)
        if valid and key not in valid:        # a notebook without parameters takes any
            raise FieldProblem(loc, key, f"a parameter of {info.data['notebook']} "
                                f"({', '.join(sorted(valid))})",
                                hint=did_you_mean("", key, valid).strip())
        return key
    return Annotated[str, BeforeValidator(check)]


def _mapping_of(what: str, empty_ok: bool) -> Any:
    def check(value: Any) -> Any:
        if value is None and empty_ok:        # `fixed:` with every entry commented out
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of {what}, got {short(value)}")
        return value
    return BeforeValidator(check)


def _axis(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list, got {short(value)}")
    return value


FixedKey = _parameter_key("fixed")
GridKey = _parameter_key("grid")
Axis = Annotated[list[Any], BeforeValidator(_axis)]


class Grid(BaseModel):
    """A sweep file: fixed parameters plus axes whose product is the points."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # first, so the keys of fixed and grid are checked against its parameters
    notebook: Annotated[str, BeforeValidator(_notebook_name)] = Field(
        POINT_NOTEBOOK, description="The notebook in notebooks/ executed per point.")
    fixed: Annotated[dict[FixedKey, Any], _mapping_of("parameter: value", empty_ok=True)] = Field(
        default_factory=dict, description="Parameters every point gets.")
    grid: Annotated[dict[GridKey, Axis],
                    _mapping_of("parameter: [values]", empty_ok=False)] = Field(
        description="Axes: a list of values per parameter; the points are their product.")
    teardown: StrictBool = Field(True, description="Stop the points' VMs at the end.")
    fresh: StrictBool = Field(True, description="Give every point a pristine VM of its own, "
                              "restored from its shape's template, instead of one VM that "
                              "all points share.")

    @field_validator("grid")
    @classmethod
    def _some_points_not_too_many(cls, axes: dict[str, list]) -> dict[str, list]:
        if not axes:
            raise ValueError("expected at least one parameter: [values], got {}")
        n = math.prod(len(values) for values in axes.values())   # without building them
        if n > MAX_POINTS:
            raise ValueError(f"expected at most {MAX_POINTS} points, got {n}")
        return axes

    @property
    def axes(self) -> dict[str, list[Any]]:
        """The `grid` section: parameter -> values."""
        return self.grid

    @property
    def size(self) -> int:
        """The number of points."""
        return math.prod(len(values) for values in self.grid.values())

    def points(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, combo, strict=True))
                for combo in itertools.product(*self.grid.values())]


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and check a sweep file; every problem names the line and the key."""
    path = Path(path)
    label = str(path)
    data, lines = parse_yaml(read_text(path, label, "sweep file"), label)
    if not isinstance(data, dict):
        raise ConfigError([f"{label}: expected a mapping with 'grid' (and optionally "
                           f"'fixed', 'notebook', 'teardown', 'fresh'), got {short(data)}"])
    try:
        return Grid.model_validate(data, context={})
    except ValidationError as e:
        raise ConfigError([describe_error(err, label, lines, Grid) for err in e.errors()]) from None


def _notebook_problem(notebook: Any) -> str:
    """Why `notebook` is not a notebook in notebooks/, or ''."""
    expected = "expected the name of a notebook in notebooks/"
    if not isinstance(notebook, str) or "/" in notebook or notebook.startswith("."):
        return f"{expected}, got {short(notebook)}"
    nb_path = NOTEBOOKS / notebook
    if not nb_path.is_file():
        return f"{expected}, got {notebook!r}"
    try:
        nb = json.loads(nb_path.read_bytes())
    except OSError as e:
        return f"expected a readable notebook, got {notebook!r} ({e.strerror})"
    except json.JSONDecodeError as e:
        return (f"expected a Jupyter notebook (.ipynb JSON), got {notebook!r} (not JSON: "
                f"{e.msg} at line {e.lineno}, column {e.colno})")
    except ValueError as e:                 # bytes that are not UTF-8/16/32
        return (f"expected a Jupyter notebook (.ipynb JSON), got {notebook!r} "
                f"(not JSON: {short(str(e))})")
    if not (isinstance(nb, dict) and isinstance(nb.get("cells"), list)
            and isinstance(nb.get("nbformat"), int)):
        return (f"expected a Jupyter notebook (.ipynb JSON), got {notebook!r} "
                f"(no nbformat or cells)")
    return ""


# -- what a point notebook hands its sweep ----------------------------------------


@dataclass(frozen=True)
class PointResult:
    """The outcome of one point: the run it stored and how that run ended.
    Written by the point notebook to its `result_path`, read by the sweep."""

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)   # what read() accepts

    run_id: str | None
    status: Status
    consistent: bool | None = None
    error: str | None = None            # the first line of the run's error

    @classmethod
    def of(cls, result: RunResult) -> PointResult:
        lines = str(result.error or "").strip().splitlines()
        return cls(result.run_id, Status(result.status), result.consistent,
                   lines[0][:500] if lines else None)

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically: the file is whole or absent, never half written."""
        path = Path(path)
        _write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> PointResult:
        """The result at `path`; OSError if unreadable, ValueError if not a result."""
        raw = Path(path).read_bytes()
        try:
            return _POINT_RESULT.validate_json(raw)
        except ValidationError as e:
            raise ValueError(f"{path}: expected a point result, {_first_error(e)}") from None

    def __str__(self) -> str:
        text = f"run {self.run_id or '(none)'}: {self.status}"
        if self.consistent is not None:
            text += f", snapshot {'consistent' if self.consistent else 'inconsistent'}"
        return f"{text}: {self.error}" if self.error else text


_POINT_RESULT = TypeAdapter(PointResult)


# -- the sweep's index -------------------------------------------------------------


class SweepPoint(BaseModel):
    """One point of a sweep, as index.json keeps it."""

    index: int
    params: dict[str, Any]               # the grid's values for this point
    notebook: str                        # the executed notebook, in the sweep directory
    status: Status = Status.FAILED
    run_id: str | None = None
    error: str | None = None
    seconds: float = 0.0
    host: str | None = None              # where it ran (a cluster worker's host)
    worker: str | None = None


class SweepIndex(BaseModel):
    """A sweep: its grid and every point done so far (index.json)."""

    sweep_id: str
    lab: str                             # the lab file
    notebook: str                        # the point notebook
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    fresh: bool = True
    teardown: bool = True
    points: list[SweepPoint] = Field(default_factory=list)
    # where it is saved (not saved itself: a moved directory still loads)
    directory: Path | None = Field(None, exclude=True)

    # -- files --------------------------------------------------------------
    def save(self, directory: str | os.PathLike | None = None) -> Path:
        """Write index.json atomically into `directory` (default: its own)."""
        directory = Path(directory) if directory is not None else self.directory
        if directory is None:
            raise ValueError(f"sweep {self.sweep_id}: no directory to save the index in")
        path = Path(directory) / INDEX_FILE
        _write_atomic(path, self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SweepIndex:
        """The index in a sweep directory; OSError if absent, ValueError if not an index."""
        path = Path(directory) / INDEX_FILE
        text = path.read_text()
        try:
            index = cls.model_validate_json(text)
        except ValidationError as e:
            raise ValueError(f"{path}: expected a sweep index, {_first_error(e)}") from None
        index.directory = Path(directory)
        return index

    @classmethod
    def latest(cls, root: str | os.PathLike) -> SweepIndex:
        """The newest sweep (last written index) under `root`, a directory of sweeps."""
        found = sorted(Path(root).glob(f"*/{INDEX_FILE}"),
                       key=lambda p: (p.stat().st_mtime, p.parent.name))
        if not found:
            raise FileNotFoundError(f"no sweep under {root}; run 'uffdlab sweep GRID.yml' "
                                    f"or pass sweep_dir")
        return cls.load(found[-1].parent)

    @classmethod
    def find(cls, lab: Lab, sweep_dir: str | os.PathLike | None = None) -> SweepIndex:
        """The sweep in `sweep_dir`, or the lab's newest one when it is None."""
        return cls.load(sweep_dir) if sweep_dir else cls.latest(sweeps_root(lab))

    def record(self, point: SweepPoint) -> None:
        """Add (or replace) a point and save: the index is on disk after
        every point, in grid order whatever order points finish in."""
        self.points = sorted([p for p in self.points if p.index != point.index] + [point],
                             key=lambda p: p.index)
        self.save()

    # -- contents -----------------------------------------------------------
    @property
    def failed(self) -> list[SweepPoint]:
        return [p for p in self.points if p.status == Status.FAILED]

    @property
    def run_ids(self) -> list[str]:
        return [p.run_id for p in self.points if p.run_id]

    def summary(self) -> str:
        """`sweep ID: N points, 2 ok, 1 failed` and the grid, for a reader."""
        counts: dict[str, int] = {}
        for p in self.points:
            counts[str(p.status)] = counts.get(str(p.status), 0) + 1
        return (f"sweep {self.sweep_id}: {len(self.points)} points"
                + "".join(f", {n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
                + f"\ngrid: {self.grid}")

    # -- with the stored runs -------------------------------------------------
    def frames(self, source: Any) -> Frames:
        """The stored runs of this sweep's points, from the results database at
        `source` (a Lab or a path), as results.load() gives them."""
        from . import report, results
        return report.subset(results.load(source), self.run_ids)


def sweeps_root(lab: Lab) -> Path:
    """Where a lab's sweeps go: results/sweeps/<sweep id>/ next to its database."""
    return lab.results_path.parent / "sweeps"


# -- running a sweep ---------------------------------------------------------------


@dataclass
class SweepResult:
    index: SweepIndex
    report: Path | None = None           # the executed 20-sweep notebook

    @property
    def directory(self) -> Path:
        return self.index.directory

    @property
    def points(self) -> list[SweepPoint]:
        return self.index.points

    @property
    def failed(self) -> list[SweepPoint]:
        return self.index.failed


@dataclass(frozen=True)
class PointFiles:
    """A point's files in its sweep's directory."""

    notebook: Path           # the executed point notebook
    result: Path             # its PointResult
    run: Path                # a cluster point's run as the worker returned it: the
                             # journal a resumed sweep stores from


def point_files(directory: Path, i: int) -> PointFiles:
    stem = Path(directory) / f"point-{i:03d}"
    return PointFiles(stem.with_suffix(".ipynb"), stem.with_suffix(".result.json"),
                      stem.with_suffix(".run.json"))


class SweepError(Exception):
    pass


# Runs the points `todo` of a sweep and records each in the index as it ends:
# (lab, grid, index, todo, emitter). The default runs them here, one after
# another; cluster.run_points runs them on Dask workers.
PointsRunner = Callable[[Lab, Grid, "SweepIndex", list[int], Emitter], None]


def run_sweep(lab: Lab, grid: Grid, listener: Listener | None = None,
              out_root: Path | None = None, *, run_points: PointsRunner | None = None,
              resume: SweepIndex | None = None) -> SweepResult:
    """Run every point of `grid` (with `resume`, an interrupted sweep's
    index: only its missing points) with `run_points` (default: here, one
    after another), then render the sweep report. cluster.run_sweep chooses
    the runner from lab.yml's cluster section."""
    ev = Emitter("sweep", listener)
    points = grid.points()
    index = resume if resume is not None else _new_index(lab, grid, out_root)
    _adopt_finished(lab, index, points, ev)
    done = {p.index for p in index.points}
    todo = [i for i in range(len(points)) if i not in done]
    ev.emit(Kind.PROGRESS, f"{len(done)}/{len(points)} points"
            + (f" (resuming sweep {index.sweep_id}: {len(todo)} to run)" if resume else ""),
            done=len(done), total=len(points))
    if todo:
        (run_points or _run_here)(lab, grid, index, todo, ev)
    if grid.teardown and not grid.fresh and run_points is None:   # fresh VMs stop themselves
        _teardown(lab, grid, points, ev)
    return SweepResult(index, _render_report(index.directory, lab, ev))


def resume_sweep(lab: Lab, sweep: str, listener: Listener | None = None, *,
                 run_points: PointsRunner | None = None) -> SweepResult:
    """Run the points an interrupted sweep (an id under results/sweeps/, or
    its directory) did not finish, with the grid it was started with."""
    directory = Path(sweep) if Path(sweep).is_dir() else sweeps_root(lab) / sweep
    try:
        index = SweepIndex.load(directory)
    except OSError:
        known = sorted(p.parent.name for p in sweeps_root(lab).glob(f"*/{INDEX_FILE}"))
        raise SweepError(f"--resume: expected a sweep id under {sweeps_root(lab)} or a sweep "
                         f"directory, got {sweep!r}"
                         + (f" (known: {', '.join(known[-5:])})" if known else "")) from None
    if Path(index.lab).resolve() != lab.source.resolve():
        raise SweepError(f"--resume: sweep {index.sweep_id} was run with {index.lab}, not "
                         f"{lab.source}; pass --lab {index.lab}")
    grid = Grid.model_validate({"notebook": index.notebook, "fixed": index.fixed,
                                "grid": index.grid, "fresh": index.fresh,
                                "teardown": index.teardown}, context={})
    return run_sweep(lab, grid, listener, run_points=run_points, resume=index)


def _new_index(lab: Lab, grid: Grid, out_root: Path | None) -> SweepIndex:
    digest = hashlib.sha256(json.dumps([grid.fixed, grid.grid], sort_keys=True,
                                       default=str).encode()).hexdigest()[:6]
    sweep_id = time.strftime("%Y%m%d-%H%M%S-") + digest
    out = (out_root or sweeps_root(lab)) / sweep_id
    out.mkdir(parents=True, exist_ok=True)
    index = SweepIndex(sweep_id=sweep_id, lab=str(lab.source), notebook=grid.notebook,
                       fixed=grid.fixed, grid=grid.grid, fresh=grid.fresh,
                       teardown=grid.teardown, directory=out)
    index.save()                 # from the start: an interrupted sweep can be resumed
    return index


def needs_parameters(grid: Grid, names: tuple[str, ...], why: str) -> None:
    have = notebook_parameters(NOTEBOOKS / grid.notebook)
    missing = [n for n in names if n not in have]
    if missing:
        raise SweepError(f"notebook: {grid.notebook} has no parameter {', '.join(missing)}, "
                         f"which a point {why} needs (10-snapshot.ipynb has them)")


def _adopt_finished(lab: Lab, index: SweepIndex, points: list[dict[str, Any]],
                    ev: Emitter) -> None:
    """Points an interrupted sweep finished but did not index: a result
    file whose run is stored (or stored now from its journal) is the point's
    outcome; anything less and the point runs again."""
    from .results import ResultsDB, store_once
    done = {p.index for p in index.points}
    for i, point in enumerate(points):
        files = point_files(index.directory, i)
        if i in done or not files.result.exists():
            continue
        try:
            result = PointResult.read(files.result)
            if files.run.exists():
                store_once(lab.results_path, json.loads(files.run.read_text()))
        except (OSError, ValueError) as e:
            ev.emit(Kind.PROGRESS, f"point {i} runs again: {e}")
            continue
        if result.run_id is not None:
            if not lab.results_path.exists():
                continue
            with ResultsDB(lab.results_path) as db:
                if not db.has_run(result.run_id):
                    continue
        index.record(SweepPoint(index=i, params=point,
                                notebook=files.notebook.name, status=result.status,
                                run_id=result.run_id, error=result.error))
        ev.emit(Kind.PROGRESS, f"point {i} had finished: {result}")


def _run_here(lab: Lab, grid: Grid, index: SweepIndex, todo: list[int], ev: Emitter) -> None:
    """The points `todo`, one after another on this machine: while a fresh
    point's notebook draws its plots, the next point's VM comes up."""
    points = grid.points()
    defaults = notebook_parameters(NOTEBOOKS / grid.notebook)
    runs = {}
    for i in todo:
        files = point_files(index.directory, i)
        params = {**grid.fixed, **points[i],      # then SET_BY_SWEEP:
                  "lab_path": str(lab.source.resolve()), "sweep_id": index.sweep_id,
                  "teardown": False, "result_path": str(files.result), "fresh": grid.fresh}
        runs[i] = (params, {**defaults, **params}, files)
    ahead: list[_Bringup | None] = [None]   # the next point's VM, started early
    try:
        for n, i in enumerate(todo):
            params, resolved, files = runs[i]
            bringup = ahead[0] or _start_bringup(lab, resolved, grid.fresh, ev)
            ahead[0] = None
            after = None
            if grid.fresh and n + 1 < len(todo):
                def after(nxt=runs[todo[n + 1]][1]):   # noqa: E306 (bound per point)
                    ahead[0] = _start_bringup(lab, nxt, True, ev)
            t0 = time.monotonic()
            outcome = _run_point(grid.fresh, NOTEBOOKS / grid.notebook, files.notebook,
                                 params, bringup, files.result, ev, after)
            index.record(SweepPoint(index=i, params=points[i], notebook=files.notebook.name,
                                    status=outcome.status, run_id=outcome.run_id,
                                    error=outcome.error,
                                    seconds=round(time.monotonic() - t0, 1)))
            ev.emit(Kind.PROGRESS, f"{len(index.points)}/{len(points)} points; last "
                    f"{outcome.status} ({_describe_point(points[i])})",
                    done=len(index.points), total=len(points))
    finally:
        if ahead[0] is not None:                  # interrupted after the early start
            ahead[0].discard()


class _Bringup:
    """A point's VM coming up (booted or restored, then provisioned) in a
    thread, while the notebook's kernel starts or, for fresh VMs, while the
    previous point's notebook draws its plots. Errors are kept: the notebook
    then tries itself and says why it could not."""

    def __init__(self, vm, fresh: bool):
        self.vm, self.fresh = vm, fresh
        self.failed: list[BaseException] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._up, daemon=True)
        self._thread.start()

    def _up(self) -> None:
        from .provision import ensure_provisioned  # not api: it imports this module
        try:
            self.vm.up(reuse=True)
            ensure_provisioned(self.vm)
            self.vm.drop_session()      # the notebook opens its own connections
        except BaseException as e:
            self.failed.append(e)

    def join(self) -> BaseException | None:
        self._thread.join()
        return self.failed[0] if self.failed else None

    def discard(self) -> None:
        """Wait for it, then stop a fresh VM (once): nobody will use it."""
        self.join()
        if self.fresh and not self._stopped:
            self._stopped = True
            self.vm.down()


def _start_bringup(lab: Lab, p: dict[str, Any], fresh: bool, ev: Emitter) -> _Bringup | None:
    """Start bringing up the VM a point asks for by shape (image, memory,
    cpus): with `fresh`, a new one of its own; else the shape's shared VM.
    None for a notebook without those parameters."""
    if not {"vm_name", "image", "vm_memory", "vm_cpus"} <= set(p):
        return None
    from .vm import VM
    vm = VM.for_shape(lab, p["image"], p["vm_memory"], int(p["vm_cpus"]),
                      listener=ev.listener, fresh=fresh)
    return _Bringup(vm, fresh)


def _run_point(fresh: bool, notebook: Path, nb_out: Path, params: dict[str, Any],
               bringup: _Bringup | None, result_file: Path, ev: Emitter,
               after: Callable[[], None] | None = None) -> PointResult:
    """Execute a point's notebook on the VM `bringup` brings up (here, where
    the sweep's listener shows the boot and the Ansible tasks; inside the
    notebook they are only papermill's silence). The notebook gets the VM by
    name (`vm_name`) and waits for it at its first use, so nothing it
    measures runs beside the boot. A fresh VM is stopped as soon as the
    notebook has written its result, and `after` is called then (it starts
    the next point's VM while this notebook draws its plots); whatever the
    notebook did, the VM is stopped at the end."""
    try:
        if bringup is None:
            return _execute_point(notebook, nb_out, params, result_file)
        params = {**params, "vm_name": bringup.vm.name}

        def finished_run() -> None:
            try:
                if fresh:
                    bringup.discard()     # a no-op when the notebook stopped it first
                if after is not None:
                    after()
            except Exception as e:        # the main loop meets it again, and stops
                ev.emit(Kind.FAILED, f"after {nb_out.stem}: {_first_line(e)}")

        with _on_file(result_file, finished_run):
            result = _execute_point(notebook, nb_out, params, result_file)
        failed = bringup.join()
        if failed is not None and result.status == Status.FAILED:
            why = f"the point's VM did not come up: {_first_line(failed)}"
            ev.emit(Kind.FAILED, why)
            return PointResult(None, Status.FAILED, None, why)
        return result
    finally:
        if bringup is not None and fresh:
            try:
                bringup.discard()     # False when the notebook already stopped it
            except Exception as e:
                ev.emit(Kind.FAILED, f"stopping {bringup.vm.name}: {_first_line(e)}")


@contextmanager
def _on_file(path: Path, action: Callable[[], None], poll: float = 0.1):
    """Call `action` once, in a thread, when `path` appears (files written
    with _write_atomic appear whole) while the block runs. On leaving, the
    watcher stops; an action under way is waited for."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if path.exists():
                action()
                return
            stop.wait(poll)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _execute_point(notebook: Path, nb_out: Path, params: dict[str, Any],
                   result_file: Path) -> PointResult:
    """Execute one point's notebook and read the result it wrote; a notebook
    that raised, or wrote nothing usable, is a failed point saying why."""
    import papermill
    try:
        papermill.execute_notebook(str(notebook), str(nb_out), parameters=params,
                                   kernel_name=KERNEL, progress_bar=False, cwd=str(NOTEBOOKS))
    except Exception as e:               # a failed point is data, not the end
        return PointResult(None, Status.FAILED, None, _first_line(e))
    try:
        return PointResult.read(result_file)
    except FileNotFoundError:
        why = f"the notebook wrote no result file ({result_file.name})"
    except OSError as e:
        why = f"cannot read {result_file.name}: {e.strerror}"
    except ValueError as e:
        why = str(e)
    return PointResult(None, Status.FAILED, None, why)


def _render_report(out: Path, lab: Lab, ev: Emitter) -> Path | None:
    import papermill
    report = out / "sweep.ipynb"
    try:
        papermill.execute_notebook(str(NOTEBOOKS / SWEEP_NOTEBOOK), str(report),
                                   parameters={"lab_path": str(lab.source.resolve()),
                                               "sweep_dir": str(out)},
                                   kernel_name=KERNEL, progress_bar=False, cwd=str(NOTEBOOKS))
        return report
    except Exception as e:
        ev.emit(Kind.FAILED, f"the sweep report notebook failed: {_first_line(e)}")
        return None


def _teardown(lab: Lab, grid: Grid, points: list[dict], ev: Emitter) -> None:
    """Stop the VMs the points used (each shape once)."""
    from .vm import VM
    defaults = notebook_parameters(NOTEBOOKS / grid.notebook)
    shapes = set()
    for point in points:
        p = {**defaults, **grid.fixed, **point}
        if {"image", "vm_memory", "vm_cpus"} <= set(p):
            shapes.add((p["image"], str(p["vm_memory"]), int(p["vm_cpus"])))
    for image, memory, cpus in sorted(shapes):
        try:
            vm = VM.for_shape(lab, image, memory, cpus, listener=ev.listener)
            vm.down()
        except Exception as e:
            ev.emit(Kind.FAILED, f"teardown of {image}: {_first_line(e)}")


# -- helpers -------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file next to `path`, then rename it over `path`:
    readers see the old file or the new one, and a failure leaves no trace."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(map(str, err["loc"]))
    return f"{where + ': ' if where else ''}{err['msg'][0].lower()}{err['msg'][1:]}"


def _describe_point(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    # papermill's error carries the cell's traceback; its last line says why
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:500]
