# SPDX-License-Identifier: MIT
"""Every notebook executed by papermill with its smallest parameters on the
session's real VMs; assertions on what the notebooks show."""
from __future__ import annotations

import json
from pathlib import Path

import papermill
import pytest
import yaml

from tests.conftest import REPO, VM_CPUS, VM_MEMORY
from uffdlab.model import Status
from uffdlab.results import ResultsDB
from uffdlab.sweep import KERNEL, PointResult, SweepIndex, load_grid, run_sweep

pytestmark = pytest.mark.integration
NOTEBOOKS = REPO / "notebooks"


def execute(name: str, out: Path, **params) -> dict:
    papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=params,
                               kernel_name=KERNEL, progress_bar=False, cwd=str(NOTEBOOKS))
    return json.loads(out.read_text())


def outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def text_of(nb: dict) -> str:
    parts = []
    for o in outputs(nb):
        parts.append("".join(o.get("text", "")))
        for mime in ("text/plain", "text/html", "text/markdown"):
            parts.append("".join(o.get("data", {}).get(mime, "")))
    return "\n".join(parts)


def pngs(nb: dict) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


@pytest.fixture(scope="module")
def lab_path(test_lab, provisioned) -> str:
    return str(test_lab.source)


def small(lab_path: str, **extra) -> dict:
    return {"lab_path": lab_path, "image": "trixie", "vm_memory": VM_MEMORY,
            "vm_cpus": VM_CPUS, "size": "16M", "writers": 2, "duration": 1.0,
            "teardown": False, **extra}


@pytest.mark.parametrize("inject,status", [("none", "ok"), ("fd-writes", "inconsistent")])
def test_snapshot_notebook(lab_path, test_lab, tmp_path, inject, status):
    result_path = tmp_path / "result.json"
    nb = execute("10-snapshot.ipynb", tmp_path / "out.ipynb",
                 **small(lab_path, inject=inject, result_path=str(result_path)))
    res = PointResult.read(result_path)
    assert res.status == status
    assert pngs(nb) >= 1                                  # latency CDF / throughput
    text = text_of(nb)
    assert "<table" in text                               # provenance and summary tables
    with ResultsDB(test_lab.results_path) as db:
        row = db.get(res.run_id)
    assert row["status"] == status and row["accel"] in text
    # the guest's own floors, measured in the same VM after the run, stored
    # with it and compared with it in the summary
    assert row["floors"]["memcpy_gb_s"] > 0 and row["floors"]["round_trip_us"]["p50"] > 0
    assert "guest memcpy (floor)" in text and "snapshot throughput vs guest memcpy" in text


def test_onboarding_notebook(lab_path, tmp_path):
    nb = execute("01-onboarding.ipynb", tmp_path / "out.ipynb", lab_path=lab_path,
                 image="trixie", memory=VM_MEMORY, cpus=VM_CPUS, size="16M", duration=1.0,
                 teardown=False)
    assert pngs(nb) >= 1
    done = [line for line in text_of(nb).splitlines() if line.startswith("done: ")]
    assert done, "the notebook's last cell printed no summary line"
    statuses = dict(item.split("=") for item in done[-1][len("done: "):].split(", "))
    assert statuses == {"S1": "ok", "S3": "ok", "S5": "inconsistent", "S6": "inconsistent"}


def test_sweep_of_three_points_records_the_failing_one(lab_path, test_lab, tmp_path):
    grid_file = tmp_path / "grid.yml"
    grid_file.write_text(yaml.safe_dump({
        "fixed": {"image": "trixie", "vm_memory": VM_MEMORY, "vm_cpus": VM_CPUS,
                  "writers": 2, "duration": 1.0},
        # 999G cannot fit the VM: that point fails before it runs
        "grid": {"size": ["16M", "32M", "999G"]},
        "teardown": False}))
    res = run_sweep(test_lab, load_grid(grid_file), out_root=tmp_path / "sweeps")
    assert [p.status for p in res.points] == [Status.OK, Status.OK, Status.FAILED]
    assert "999G" in res.points[2].error or "does not fit" in res.points[2].error
    index = SweepIndex.load(res.directory)
    assert [p.status for p in index.points] == [Status.OK, Status.OK, Status.FAILED]
    assert index.points[0].run_id and index.points[2].run_id is None
    with ResultsDB(test_lab.results_path) as db:          # sweep points skip the floors
        assert db.get(index.points[0].run_id)["floors"] is None
    assert all((res.directory / p.notebook).exists() for p in index.points)
    assert res.report is not None
    report = json.loads(res.report.read_text())
    assert pngs(report) >= 1


def test_kernel_matrix_notebook(lab_path, tmp_path):
    nb = execute("30-kernel-matrix.ipynb", tmp_path / "out.ipynb", lab_path=lab_path,
                 images=["bookworm", "trixie"], size="16M", duration=1.0, teardown=False)
    text = text_of(nb)
    assert pngs(nb) >= 1 or "<table" in text
    assert "WP_ASYNC" in text and "6.7" in text           # why S10 differs on 6.1
    assert "6.1." in text and "6.12." in text             # both kernels ran
