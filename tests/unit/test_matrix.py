# SPDX-License-Identifier: MIT
"""The kernel matrix with a fake VM layer: no VM boots, nothing runs.

What matrix.py calls below itself (VM.for_shape, up/down, ensure_provisioned,
runner.run_and_store) is replaced by fakes; the catalogue's checks against the
probes are the real ones."""
from __future__ import annotations

import ast
import json
import types

import pandas as pd
import pytest

from tests.unit.test_report import BOOKWORM, TRIXIE
from tests.unit.test_results import SUMMARY_S3, SUMMARY_S5, make_result
from uffdlab import api, matrix, provision, runner
from uffdlab.config import parse_size
from uffdlab.matrix import Case, Cell, MatrixResult, Missing, Outcome
from uffdlab.model import Status
from uffdlab.paths import NOTEBOOKS
from uffdlab.scenarios import ScenarioError
from uffdlab.vm import VMError

PROBES = {"bookworm": BOOKWORM, "trixie": TRIXIE}
CASES = [("S1 stop-the-world", "S1", {}), ("S3 uffd-wp", "S3", {}),
         ("S5 unregistered", "S5", {}),
         ("S9 anon sparse", "S9", {"backing": "anon", "populate": "no", "prefill": "no"}),
         ("S10 async-scan", "S10", {})]
COMMON = {"size": "16M", "duration": 1.0}


class FakeLayer:
    """Records what the matrix asked of the VM layer and answers as told."""

    def __init__(self):
        self.boot_fails: set[str] = set()
        self.running: set[str] = set()          # VMs up before the matrix starts
        self.runs: list[tuple[str, str, dict]] = []
        self.stopped: list[str] = []
        self.outcome: dict[tuple[str, str], dict] = {}   # (image, key) -> make_result kw
        self.raises: dict[tuple[str, str], Exception] = {}

    def vm_class(self):
        layer = self

        class FakeVM:
            def __init__(self, image, memory, listener):
                self.image, self.name, self.listener = image, f"nb-{image}", listener
                self.spec = types.SimpleNamespace(memory=parse_size(memory))

            @classmethod
            def for_shape(cls, lab, image, memory="1536M", cpus=2, name=None, listener=None):
                if image not in PROBES:
                    raise ValueError(f"unknown image {image!r}")
                return cls(image, memory, listener)

            def state(self):
                return object() if self.image in layer.running else None

            def up(self, reuse=False):
                if self.image in layer.boot_fails:
                    raise VMError(f"{self.name}: kernel panic - not syncing\nmore")
                layer.running.add(self.image)

            def down(self):
                layer.stopped.append(self.image)
                layer.running.discard(self.image)
                return True

        return FakeVM

    def provisioned(self, vm):
        return {"probe": PROBES[vm.image], "tools_version": "test"}

    def run_and_store(self, vm, key, params=None, timeout=None):
        self.runs.append((vm.image, key, dict(params or {})))
        if (vm.image, key) in self.raises:
            raise self.raises[vm.image, key]
        kw = {"summary": SUMMARY_S5 if key == "S5" else SUMMARY_S3,
              "expect_consistent": key not in ("S5", "S6"),
              **self.outcome.get((vm.image, key), {})}
        return make_result(f"{vm.image[:2]}-{key}", key, key.lower(), params=dict(params or {}),
                           kernel=PROBES[vm.image]["kernel"], vm=vm.name, **kw)


@pytest.fixture
def layer(monkeypatch):
    fake = FakeLayer()
    monkeypatch.setattr(matrix, "VM", fake.vm_class())
    monkeypatch.setattr(provision, "ensure_provisioned", fake.provisioned)
    monkeypatch.setattr(runner, "run_and_store", fake.run_and_store)
    return fake


def run(layer, images=("bookworm", "trixie"), cases=CASES, **kw) -> MatrixResult:
    return matrix.run_matrix(object(), list(images), cases, COMMON, **kw)


def test_unsupported_on_one_kernel_is_refused_before_running_and_explained(layer):
    m = run(layer)
    s10 = m.cell("bookworm", "S10 async-scan")
    assert s10.outcome == Outcome.UNSUPPORTED and s10.run_id is None and s10.status is None
    assert s10.missing == Missing("UFFD_FEATURE_WP_ASYNC", "6.7")   # typed, not parsed
    assert m.cell("bookworm", "S9 anon sparse").missing == Missing("UFFD_FEATURE_WP_UNPOPULATED",
                                                                    "6.4")
    assert ("bookworm", "S10") not in [(i, k) for i, k, _ in layer.runs]
    assert ("trixie", "S10") in [(i, k) for i, k, _ in layer.runs]
    # common parameters with each case's own on top
    assert ("trixie", "S9", {**COMMON, "backing": "anon", "populate": "no",
                             "prefill": "no"}) in layer.runs
    assert m.cell("trixie", "S10 async-scan").outcome == Outcome.CONSISTENT
    assert m.cell("trixie", "S5 unregistered").outcome == Outcome.INCONSISTENT
    assert m.kernels == {"bookworm": BOOKWORM["kernel"], "trixie": TRIXIE["kernel"]}
    assert m.probes == PROBES
    assert m.differences() == ["S9 anon sparse", "S10 async-scan"]
    text = m.explain()
    assert "`UFFD_FEATURE_WP_ASYNC`, which arrived in Linux 6.7" in text
    assert "on bookworm the lab refuses the scenario before it runs" in text
    assert "`UFFD_FEATURE_WP_UNPOPULATED`, which arrived in Linux 6.4" in text
    assert "**Features that differ**" in text and "6.1.0-37" in text and "6.12.38" in text
    assert "S1 stop-the-world" not in text.split("**Scenarios whose outcome differs**")[1]


def test_table_shape_and_values(layer):
    m = run(layer)
    t = m.table()
    bw, tx = f"bookworm ({BOOKWORM['kernel']})", f"trixie ({TRIXIE['kernel']})"
    assert t.shape == (len(CASES), 2)
    assert list(t.index) == [c[0] for c in CASES] and list(t.columns) == [bw, tx]
    assert t.loc["S10 async-scan", bw] == "not supported (needs UFFD_FEATURE_WP_ASYNC, Linux 6.7)"
    assert t.loc["S10 async-scan", tx] == "consistent ✓ as expected"
    assert t.loc["S5 unregistered", tx].startswith("INCONSISTENT: 2,048 pages")
    outcomes = m.table("outcome")
    assert outcomes.loc["S9 anon sparse", bw] == "unsupported"
    times = m.table("snapshot_ms")
    assert times.loc["S1 stop-the-world", bw] == pytest.approx(412.733)
    assert pd.isna(times.loc["S10 async-scan", bw])
    with pytest.raises(ValueError, match="values"):
        m.table("nonsense")
    assert set(m.runs("S1", "S3")) == {"bookworm S1", "bookworm S3", "trixie S1", "trixie S3"}
    assert len(m.runs()) == 2 * len(CASES) - 2                      # two refusals on 6.1


def test_failed_runs_point_at_their_error(layer):
    layer.outcome["trixie", "S3"] = {"summary": None, "status": "failed",
                                     "error": "uffd-snapshot exited 2: UFFDIO_REGISTER: EINVAL"}
    layer.raises["bookworm", "S5"] = OSError("SSH session gone")
    m = run(layer)
    failed = m.cell("trixie", "S3 uffd-wp")
    assert (failed.outcome, failed.status, failed.run_id) == (Outcome.FAILED, Status.FAILED,
                                                              "tr-S3")
    lost = m.cell("bookworm", "S5 unregistered")
    assert lost.outcome == Outcome.FAILED and lost.run_id is None
    assert lost.error == "OSError: SSH session gone"
    assert "S3 uffd-wp" in m.differences() and "S5 unregistered" in m.differences()
    text = m.explain()
    assert "It failed on trixie: uffd-snapshot exited 2: UFFDIO_REGISTER: EINVAL (run tr-S3" in text
    assert "It failed on bookworm: OSError: SSH session gone (no run stored)" in text
    assert m.table().loc["S3 uffd-wp", f"trixie ({TRIXIE['kernel']})"].startswith("FAILED: ")


def test_a_vm_that_does_not_boot_gives_vm_failed_cells(layer):
    layer.boot_fails.add("bookworm")
    m = run(layer)
    cells = [c for c in m.cells if c.image == "bookworm"]
    assert len(cells) == len(CASES)
    assert all(c.outcome == Outcome.VM_FAILED and c.kernel is None for c in cells)
    assert "kernel panic" in cells[0].error
    assert m.kernels["bookworm"] is None and "bookworm" not in m.probes
    assert layer.stopped == ["bookworm"]               # the half-booted VM is not left behind
    assert {i for i, _, _ in layer.runs} == {"trixie"}
    assert m.differences() == []                       # one kernel answered: nothing to compare
    text = m.explain()
    assert "**bookworm: the VM failed** (VMError: nb-bookworm: kernel panic" in text
    assert m.table().shape == (len(CASES), 2)
    assert m.table().iloc[0, 0].startswith("VM failed: VMError")


def test_verifier_disagreement_is_named(layer):
    layer.outcome["bookworm", "S3"] = {"summary": SUMMARY_S5}
    m = run(layer, cases=["S3"])
    assert m.cases == [Case("S3 multi-writer", "S3", COMMON)]
    assert m.differences() == ["S3 multi-writer"]
    assert "the verifier disagrees" in m.explain()
    same = run(layer, images=["trixie"], cases=["S1"])
    assert "same outcome on every kernel" in same.explain()


def test_teardown_stops_only_the_vms_it_started(layer):
    layer.running.add("trixie")                        # already up: someone else's
    run(layer, teardown=True)
    assert layer.stopped == ["bookworm"]
    layer.stopped.clear()
    run(layer, teardown=False)
    assert layer.stopped == []


def test_bad_parameters_fail_before_any_vm_boots(layer):
    with pytest.raises(ScenarioError, match="unknown parameter"):
        run(layer, cases=[("S1", "S1", {"writerz": 2})])
    with pytest.raises(ScenarioError, match="does not fit"):
        run(layer, cases=["S1"], vm_memory="16M")
    with pytest.raises(ScenarioError, match="unknown scenario"):
        run(layer, cases=["S99"])
    with pytest.raises(ValueError, match="unknown image"):
        run(layer, images=["sid"], cases=["S1"])
    with pytest.raises(ValueError, match="two cases"):
        run(layer, cases=["S1", ("S1 stop-the-world", "S1", {})])
    assert layer.runs == [] and layer.running == set()


def test_cells_are_frozen_records():
    c = Cell("trixie", "6.12", "S1", Outcome.CONSISTENT, "r1", Status.OK)
    with pytest.raises(AttributeError):
        c.outcome = Outcome.FAILED                     # type: ignore[misc]
    assert Outcome("vm failed") is Outcome.VM_FAILED and str(Outcome.UNSUPPORTED) == "unsupported"


# -- notebook 30, its code run with the fake layer ------------------------------------

def run_notebook(path, **params) -> list:
    """Execute a notebook's code cells as papermill would (parameters injected
    after the `parameters` cell; magics skipped) and return the value of each
    cell's last expression, which Jupyter would display."""
    nb = json.loads(path.read_text())
    env: dict = {}
    shown = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(line for line in "".join(cell["source"]).splitlines(True)
                         if not line.startswith("%"))
        tree = ast.parse(source)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, path.name, "exec"), env)
        if last is not None:
            shown.append(eval(compile(ast.Expression(last.value), path.name, "eval"), env))
        if "parameters" in cell["metadata"].get("tags", []):
            env.update(params)
    return shown


def test_kernel_matrix_notebook_code_path(layer, monkeypatch):
    monkeypatch.setattr(api, "open_lab", lambda path=None: types.SimpleNamespace(images={}))
    shown = run_notebook(NOTEBOOKS / "30-kernel-matrix.ipynb", lab_path="lab.yml",
                         images=["bookworm", "trixie"], size="16M", duration=1.0,
                         teardown=False)
    features, table, explanation, times, figure = shown
    assert isinstance(features, pd.DataFrame) and features.loc["UFFD_FEATURE_WP_ASYNC"].iloc[-2:] \
        .tolist() == ["✗", "✓"]
    assert isinstance(table, pd.DataFrame) and table.shape == (6, 2)
    text = explanation.data
    assert "WP_ASYNC" in text and "6.7" in text
    html = features.to_html() + table.to_html()
    assert "6.1." in html and "6.12." in html and "<table" in html
    assert times.shape == (6, 2)
    assert len(figure.axes) == 2 and len(figure.axes[0].patches) == 4    # S1, S3 on both
    assert layer.stopped == []                                           # teardown=False
    assert {p["size"] for _, _, p in layer.runs} == {"16M"}
    assert {(i, k) for i, k, _ in layer.runs} >= {("trixie", "S10"), ("bookworm", "S6")}


def test_notebook_30_is_stored_clean():
    nb = json.loads((NOTEBOOKS / "30-kernel-matrix.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    tagged = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1
    names = {t.id for t in ast.walk(ast.parse("".join(tagged[0]["source"])))
             if isinstance(t, ast.Name)}
    assert {"lab_path", "images", "size", "duration", "teardown"} <= names
    assert nb["metadata"]["kernelspec"]["name"] == "uffdlab"


def test_my_kernel_notebook_code_path(layer, monkeypatch):
    """40-my-kernel: the tree becomes image `mine`, is built, then compared
    with a Debian kernel by run_matrix (the layers below faked)."""
    monkeypatch.setitem(PROBES, "mine", TRIXIE)
    lab = types.SimpleNamespace(images={})
    calls = []
    monkeypatch.setattr(api, "open_lab", lambda path=None: lab)
    monkeypatch.setattr(api, "kernel_source", lambda lab, series, listener=None:
                        calls.append(("source", series)) or "/cache/linux-source-6.12")
    monkeypatch.setattr(api, "with_tree_kernel", lambda lab, tree, **kw:
                        calls.append(("tree", tree, kw)) or lab)
    monkeypatch.setattr(api, "build_kernel", lambda lab, image, listener=None: calls.append(
        ("build", image)) or types.SimpleNamespace(meta={
            "release": "6.12.117", "units": 1171, "seconds": 300.0, "compiler": "gcc 12",
            "key": "abc"}))
    shown = run_notebook(NOTEBOOKS / "40-my-kernel.ipynb", lab_path="lab.yml",
                         compare_with="bookworm", fragments=["debug.config"],
                         scenarios=["S3", "S10"], teardown=False)
    *_, features, table, explanation = shown
    assert calls == [("source", "6.12"),
                     ("tree", "/cache/linux-source-6.12",
                      {"name": "mine", "suite": "trixie", "base": "small",
                       "config": ["debug.config"], "make_args": []}),
                     ("build", "mine")]
    assert any("mine" in str(c) for c in features.columns)
    assert table.shape == (2, 2)
    assert "WP_ASYNC" in explanation.data and "6.7" in explanation.data
    assert {i for i, _, _ in layer.runs} == {"bookworm", "mine"}


def test_kernels_run_side_by_side_when_there_are_slots(layer, monkeypatch):
    """With a VM slot per kernel both VMs are up at once (each up() waits
    for the other); the cells still come out in image order."""
    import threading
    both_up = threading.Barrier(2, timeout=10)
    fake_up = layer.vm_class().up

    def up(self, reuse=False):
        fake_up(self, reuse)
        both_up.wait()                      # raises BrokenBarrierError if alone
    monkeypatch.setattr(matrix.VM, "up", up)
    monkeypatch.setattr(matrix.os, "cpu_count", lambda: 4)
    m = run(layer)
    assert all(c.outcome != Outcome.VM_FAILED for c in m.cells)
    assert [c.image for c in m.cells] == ["bookworm"] * len(CASES) + ["trixie"] * len(CASES)


def test_one_slot_runs_kernels_one_after_another(layer, monkeypatch):
    monkeypatch.setattr(matrix.os, "cpu_count", lambda: 2)
    order = []
    fake_up = matrix.VM.up

    def up(self, reuse=False):
        order.append((self.image, len(layer.runs)))
        fake_up(self, reuse)
    monkeypatch.setattr(matrix.VM, "up", up)
    run(layer)
    bookworm_runs = sum(image == "bookworm" for image, _, _ in layer.runs)
    assert order == [("bookworm", 0), ("trixie", bookworm_runs)]   # after all of bookworm's
