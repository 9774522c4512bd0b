"""GRID.yml --papermill, one execution of 10-snapshot per point--> executed
notebooks + index.json under the results directory.

Every point asks for its VM by shape (image, memory, cpus), so points share
one running, provisioned VM per image and cost only their own run. A failed
point is recorded in the index and the sweep goes on.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, Lab, parse_yaml, read_text
from .events import Emitter, Listener
from .model import Kind
from .paths import NOTEBOOKS
POINT_NOTEBOOK = "10-snapshot.ipynb"
SWEEP_NOTEBOOK = "20-sweep.ipynb"
KERNEL = "python3"
RESULT_RE = re.compile(r"^RESULT (\{.*\})\s*$", re.M)


@dataclass
class Grid:
    """A sweep file: fixed parameters plus axes whose product is the points."""

    source: Path
    fixed: dict[str, Any]
    axes: dict[str, list[Any]]
    notebook: str = POINT_NOTEBOOK
    teardown: bool = True

    def points(self) -> list[dict[str, Any]]:
        keys = list(self.axes)
        return [dict(zip(keys, combo)) for combo in itertools.product(*self.axes.values())]


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


MAX_POINTS = 10_000


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and check a sweep file; every problem names the line and the key."""
    path = Path(path)
    label = str(path)
    data, lines = parse_yaml(read_text(path, label, "sweep file"), label)
    if not isinstance(data, dict):
        raise ConfigError([f"{label}: expected a mapping with 'grid' (and optionally "
                           f"'fixed', 'notebook', 'teardown')"])

    def at(*loc) -> str:
        line = (lines.get(loc + ("<key>",)) or lines.get(loc)) if loc else None
        return f"{label}:{line}" if line else label

    problems = []
    unknown = set(data) - {"grid", "fixed", "notebook", "teardown"}
    problems += [f"{at(k)}: {k}: unknown key; expected grid, fixed, notebook or teardown"
                 for k in sorted(unknown, key=str)]
    notebook = data.get("notebook", POINT_NOTEBOOK)
    valid: dict[str, Any] = {}
    why = _notebook_problem(notebook)
    if why:
        problems.append(f"{at('notebook')}: notebook: {why}")
    else:
        valid = notebook_parameters(NOTEBOOKS / notebook)
    grid, fixed = data.get("grid"), data.get("fixed") or {}
    if not isinstance(grid, dict) or not grid:
        problems.append(f"{at('grid')}: grid: expected a mapping of parameter: [values], "
                        f"got {_short(grid)}")
        grid = {}
    if not isinstance(fixed, dict):
        problems.append(f"{at('fixed')}: fixed: expected a mapping of parameter: value, "
                        f"got {_short(fixed)}")
        fixed = {}
    teardown = data.get("teardown", True)
    if not isinstance(teardown, bool):
        problems.append(f"{at('teardown')}: teardown: expected true or false, "
                        f"got {_short(teardown)}")
    for section, entries in (("grid", grid), ("fixed", fixed)):
        for key, value in entries.items():
            if valid and key not in valid:
                problems.append(f"{at(section, key)}: {section}.{key}: not a parameter of "
                                f"{notebook}; expected one of {', '.join(sorted(valid))}")
            if section == "grid" and (not isinstance(value, list) or not value):
                problems.append(f"{at(section, key)}: grid.{key}: expected a non-empty list, "
                                f"got {_short(value)}")
    # the product's size from the axis lengths, without building it
    npoints = 1
    for value in grid.values():
        npoints *= len(value) if isinstance(value, list) and value else 1
    if npoints > MAX_POINTS:
        problems.append(f"{at('grid')}: grid: {npoints} points, expected at most {MAX_POINTS}")
    if problems:
        raise ConfigError(problems)
    return Grid(path, fixed, grid, notebook, teardown)


def _notebook_problem(notebook: Any) -> str:
    """Why `notebook` is not a notebook in notebooks/, or ''."""
    expected = "expected the name of a notebook in notebooks/"
    if not isinstance(notebook, str) or "/" in notebook or notebook.startswith("."):
        return f"{expected}, got {_short(notebook)}"
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
                f"(not JSON: {_short(str(e))})")
    if not (isinstance(nb, dict) and isinstance(nb.get("cells"), list)
            and isinstance(nb.get("nbformat"), int)):
        return (f"expected a Jupyter notebook (.ipynb JSON), got {notebook!r} "
                f"(no nbformat or cells)")
    return ""


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class SweepResult:
    sweep_id: str
    directory: Path
    points: list[dict] = field(default_factory=list)
    report: Path | None = None

    @property
    def failed(self) -> list[dict]:
        return [p for p in self.points if p["status"] == "failed"]


def run_sweep(lab: Lab, grid: Grid, listener: Listener | None = None,
              out_root: Path | None = None) -> SweepResult:
    import papermill

    ev = Emitter("sweep", listener)
    points = grid.points()
    digest = hashlib.sha256(json.dumps([grid.fixed, grid.axes], sort_keys=True,
                                       default=str).encode()).hexdigest()[:6]
    sweep_id = time.strftime("%Y%m%d-%H%M%S-") + digest
    out = (out_root or lab.results_path.parent / "sweeps") / sweep_id
    out.mkdir(parents=True, exist_ok=True)
    result = SweepResult(sweep_id, out)
    index = {"sweep_id": sweep_id, "lab": str(lab.source), "notebook": grid.notebook,
             "fixed": grid.fixed, "grid": grid.axes, "points": result.points}
    ev.emit(Kind.PROGRESS, f"0/{len(points)} points", done=0, total=len(points))
    for i, point in enumerate(points):
        params = {**grid.fixed, **point, "lab_path": str(lab.source.resolve()),
                  "sweep_id": sweep_id, "teardown": False}
        nb_out = out / f"point-{i:03d}.ipynb"
        t0 = time.monotonic()
        entry = {"index": i, "params": point, "notebook": nb_out.name, "status": "failed",
                 "run_id": None, "error": None, "seconds": 0.0}
        try:
            papermill.execute_notebook(str(NOTEBOOKS / grid.notebook), str(nb_out),
                                       parameters=params, kernel_name=KERNEL,
                                       progress_bar=False, cwd=str(NOTEBOOKS))
            found = result_line(nb_out)
            if found is None:
                entry["error"] = "the notebook printed no RESULT line"
            else:
                entry.update(run_id=found.get("run_id"), status=found.get("status", "failed"),
                             error=found.get("error"))
        except Exception as e:               # a failed point is data, not the end
            entry["error"] = _first_line(e)
        entry["seconds"] = round(time.monotonic() - t0, 1)
        result.points.append(entry)
        _write_json(out / "index.json", index)
        ev.emit(Kind.PROGRESS, f"{i + 1}/{len(points)} points; last {entry['status']} "
                f"({_describe(point)})", done=i + 1, total=len(points))
    if grid.teardown:
        _teardown(lab, grid, points, ev)
    result.report = _render_report(out, lab, ev)
    return result


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


def result_line(nb_path: Path) -> dict | None:
    nb = json.loads(nb_path.read_text())
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            text = output.get("text", "")
            text = "".join(text) if isinstance(text, list) else text
            m = RESULT_RE.search(text)
            if m:
                return json.loads(m.group(1))
    return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _describe(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    # papermill's error carries the cell's traceback; its last line says why
    lines = [l for l in text.splitlines() if l.strip()]
    return (lines[-1] if lines else type(e).__name__)[:500]
