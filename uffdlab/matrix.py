# SPDX-License-Identifier: MIT
"""The same scenarios on several kernels, and why their outcomes differ.

`run_matrix` brings up one VM per image (a VM by shape, reused when it is
already running), provisions it and keeps its uffd probe. For each scenario
it asks the catalogue first whether that kernel can run it: a kernel that
lacks a feature gets an UNSUPPORTED cell carrying the feature and the first
Linux release that has it (typed, from scenarios.MissingFeature), and the
scenario is not run there. The others are run and stored as any run is.
A VM that does not come up turns its row into VM_FAILED cells and the
matrix goes on with the next image. Kernels run side by side when this
machine has a VM slot for each (its cores over the VM's cpus), else one
after another.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from . import provision, report, runner
from . import scenarios as catalogue
from .config import Lab, parse_size
from .events import Listener
from .model import RunResult, Status
from .report.runs import as_run
from .report.tables import feature_releases, probe_column, version_key
from .results import METRICS
from .vm import VM

if TYPE_CHECKING:
    import pandas as pd


class Outcome(StrEnum):
    """What one scenario did on one kernel."""

    CONSISTENT = "consistent"        # ran; the snapshot matched RAM at the instant
    INCONSISTENT = "inconsistent"    # ran; the verifier found pages that differ
    FAILED = "failed"                # did not finish (error, timeout, VM gone)
    UNSUPPORTED = "unsupported"      # refused before running: the kernel cannot
    VM_FAILED = "vm failed"          # the image's VM did not boot or provision


_OUTCOME_OF_STATUS = {Status.OK: Outcome.CONSISTENT, Status.INCONSISTENT: Outcome.INCONSISTENT,
                      Status.FAILED: Outcome.FAILED, Status.TIMEOUT: Outcome.FAILED}


@dataclass(frozen=True)
class Case:
    """One row of the matrix: a catalogue scenario with its own parameters."""

    label: str                       # how tables and explanations name it
    scenario: str                    # catalogue key: S3, multi-writer...
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Missing:
    """What a kernel lacks for a scenario, and the first release that has it."""

    feature: str                     # as the kernel headers spell it: UFFD_FEATURE_WP_ASYNC
    first_kernel: str                # 6.7

    @classmethod
    def of(cls, error: catalogue.MissingFeature) -> Missing:
        return cls(error.feature, error.first_kernel)


@dataclass(frozen=True)
class Cell:
    """One scenario on one image's kernel."""

    image: str
    kernel: str | None               # release (uname -r); None when the VM failed
    scenario: str                    # the Case label
    outcome: Outcome
    run_id: str | None = None        # the stored run, when it ran
    status: Status | None = None
    missing: Missing | None = None   # why it is UNSUPPORTED, when a feature is missing
    error: str | None = None         # why it failed, or a refusal that is not a feature


@dataclass
class MatrixResult:
    """Every cell of a matrix, with the probes and kernels of its images and
    the runs it stored; tables and the explanation are computed from them."""

    cases: list[Case]
    images: list[str]
    cells: list[Cell]
    probes: dict[str, dict] = field(default_factory=dict)       # images whose VM came up
    kernels: dict[str, str | None] = field(default_factory=dict)
    results: dict[str, RunResult] = field(default_factory=dict)  # by run id

    def cell(self, image: str, scenario: str) -> Cell:
        """The cell of an image and a Case label."""
        for c in self.cells:
            if c.image == image and c.scenario == scenario:
                return c
        raise KeyError((image, scenario))

    def describe(self, cell: Cell) -> str:
        """A cell in a few words: the run's verdict, or why it did not run."""
        if cell.outcome == Outcome.UNSUPPORTED:
            return (f"not supported (needs {cell.missing.feature}, Linux "
                    f"{cell.missing.first_kernel})" if cell.missing
                    else f"not supported ({cell.error})")
        if cell.outcome == Outcome.VM_FAILED:
            return f"VM failed: {_first_line(cell.error)}"
        if cell.run_id in self.results:
            return report.verdict(self.results[cell.run_id])
        return f"FAILED: {_first_line(cell.error)}"

    def table(self, values: str = "verdict") -> pd.DataFrame:
        """Scenarios down, images across (headed 'image (kernel)').

        `values`: 'verdict' (the run's verdict or why it did not run),
        'outcome', or a metric column of results.METRICS (snapshot_ms,
        lat_p99_us, stall_max_ms...; empty where the scenario did not run)."""
        import pandas as pd

        if values not in ("verdict", "outcome") and values not in METRICS:
            raise ValueError(f"values: expected verdict, outcome or one of "
                             f"{', '.join(METRICS)}, got {values!r}")

        def value(c: Cell) -> Any:
            if values == "verdict":
                return self.describe(c)
            if values == "outcome":
                return str(c.outcome)
            run = self.results.get(c.run_id) if c.run_id else None
            return None if run is None else as_run(run).metric(values)

        columns = {image: self._with_kernel(image) for image in self.images}
        grid = {columns[c.image]: {} for c in self.cells}
        for c in self.cells:
            grid[columns[c.image]][c.scenario] = value(c)
        frame = pd.DataFrame(grid, index=[case.label for case in self.cases],
                             columns=list(columns.values()))
        frame.index.name = "scenario"
        return frame

    def differences(self) -> list[str]:
        """Case labels whose outcome differs between the kernels that came up
        (a VM that failed is no kernel's answer: explain() names it apart)."""
        return [case.label for case in self.cases
                if len({c.outcome for c in self._answers(case.label)}) > 1]

    def runs(self, *scenarios: str) -> dict[str, RunResult]:
        """{'image S1': result} of the runs of these Cases (label or catalogue
        key; all when none is given), for report.plot_* functions."""
        keys = [c.scenario for c in self.cases]
        wanted = [case for case in self.cases
                  if not scenarios or case.label in scenarios or case.scenario in scenarios]
        out = {}
        for case in wanted:
            name = case.scenario if keys.count(case.scenario) == 1 else case.label
            for c in self.cells:
                if c.scenario == case.label and c.run_id in self.results:
                    out[f"{c.image} {name}"] = self.results[c.run_id]
        return out

    def explain(self) -> str:
        """Markdown: which VMs failed, which uffd features differ between the
        kernels, and for each scenario whose outcome differs, why."""
        sections = []
        failed = self._vm_failures()
        if failed:
            sections.append("\n".join(f"**{image}: the VM failed** ({_first_line(err)}); "
                                      f"its scenarios did not run."
                                      for image, err in failed.items()))
        features = self._feature_lines()
        if features:
            sections.append("\n".join(features))
        differ = self.differences()
        if differ:
            lines = ["**Scenarios whose outcome differs**"]
            for label in differ:
                cells = self._answers(label)
                parts = "; ".join(f"{self._with_kernel(c.image)}: {self.describe(c)}"
                                  for c in cells)
                lines.append(f"* **{label}**: {parts}. {self._why(cells)}")
            sections.append("\n".join(lines))
        else:
            sections.append("**Every scenario had the same outcome on every kernel** "
                            "(timings aside).")
        return "\n\n".join(sections)

    # -- helpers ---------------------------------------------------------------
    def _with_kernel(self, image: str) -> str:
        """'bookworm (6.1.0-37-cloud-amd64)', as the feature table heads it."""
        return probe_column(image, {"kernel": self.kernels.get(image)})

    def _answers(self, label: str) -> list[Cell]:
        """The cells of a Case on the kernels that came up."""
        return [c for c in self.cells if c.scenario == label and c.outcome != Outcome.VM_FAILED]

    def _vm_failures(self) -> dict[str, str | None]:
        return {c.image: c.error for c in self.cells if c.outcome == Outcome.VM_FAILED}

    def _feature_lines(self) -> list[str]:
        probes = self.probes
        if len(probes) < 2:
            return []
        first = feature_releases(probes.values())
        names = sorted({n for p in probes.values() for n in (p or {}).get("features", {})},
                       key=lambda n: version_key(first.get(n, "99")))
        out = []
        for n in names:
            have = [i for i in probes if (probes[i] or {}).get("features", {}).get(n)]
            if have and len(have) < len(probes):
                lack = [i for i in probes if i not in have]
                out.append(f"* `UFFD_FEATURE_{n}` (first in Linux {first.get(n, '?')}): "
                           f"offered by {', '.join(map(self._with_kernel, have))}, not by "
                           f"{', '.join(map(self._with_kernel, lack))}")
        return (["**Features that differ**", *out] if out
                else ["**All kernels offer the same uffd features.**"])

    def _why(self, cells: list[Cell]) -> str:
        refused = [c for c in cells if c.outcome == Outcome.UNSUPPORTED]
        ran = [c.image for c in cells if c.outcome != Outcome.UNSUPPORTED]
        reasons = []
        for missing in dict.fromkeys(c.missing for c in refused if c.missing):
            lack = [c.image for c in refused if c.missing == missing]
            reasons.append(
                f"The difference is `{missing.feature}`, which arrived in Linux "
                f"{missing.first_kernel}: " + (
                    f"{', '.join(ran)} ha{'s' if len(ran) == 1 else 've'} it; on "
                    f"{', '.join(lack)} the lab refuses the scenario before it runs."
                    if ran else "no kernel here has it."))
        for c in refused:
            if c.missing is None:
                reasons.append(f"On {c.image} the lab refuses it: {_first_line(c.error)}.")
        for c in cells:
            if c.outcome == Outcome.FAILED:
                where = (f"run {c.run_id}; report.failure_text of it shows the rest"
                         if c.run_id else "no run stored")
                reasons.append(f"It failed on {c.image}: {_first_line(c.error)} ({where}).")
        if reasons:
            return " ".join(reasons)
        return ("Both ran but the verifier disagrees: a kernel behaviour change (or a bug) "
                "worth a closer look at the runs' mismatch causes.")


def _first_line(text: Any) -> str:
    lines = str(text or "no error message").strip().splitlines()
    return lines[0] if lines else "no error message"


@dataclass(frozen=True)
class _Planned:
    case: Case
    scenario: catalogue.Scenario
    resolved: dict[str, Any]


def _plan(cases: Iterable[str | Case | tuple], params: Mapping[str, Any],
          vm_memory: int) -> list[_Planned]:
    """Each case resolved and checked against the VM size, before any VM boots:
    a parameter that no kernel could take is an error now, not a row of
    refusals later."""
    planned, seen = [], set()
    for item in cases:
        if isinstance(item, str):
            sc = catalogue.get(item)
            case = Case(f"{sc.id} {sc.name}", item)
        else:
            case = item if isinstance(item, Case) else Case(*item)
            sc = catalogue.get(case.scenario)
        if case.label in seen:
            raise ValueError(f"scenarios: two cases are labelled {case.label!r}")
        seen.add(case.label)
        merged = {**params, **case.params}
        case = Case(case.label, case.scenario, merged)
        resolved = catalogue.resolve(sc, merged)
        catalogue.check_against(sc, resolved, vm_memory, None)
        planned.append(_Planned(case, sc, resolved))
    return planned


def local_kernel_images(lab: Lab) -> list[str]:
    """The images of lab.yml whose kernel is a local build: kernel.vmlinuz, or
    kernel.tree (built when its VM comes up)."""
    return [name for name, spec in lab.images.items() if spec.kernel.is_local]


def run_matrix(lab: Lab, images: Sequence[str], scenarios: Iterable[str | Case | tuple],
               params: Mapping[str, Any] | None = None, listener: Listener | None = None,
               vm_memory: str | int = "1536M", vm_cpus: int = 2,
               teardown: bool = False, include_local: bool = False) -> MatrixResult:
    """Run every case on every image's kernel; see the module docstring.

    `scenarios`: catalogue keys ('S3'), Case(label, scenario, params) or
    (label, scenario, params) tuples. `params` apply to every case (a case's
    own override them). `teardown`: stop the VMs this call started (a VM that
    was already running is left running). `include_local`: add the lab's
    images that boot a local kernel build.
    """
    if include_local:
        images = [*images, *local_kernel_images(lab)]
    planned = _plan(scenarios, dict(params or {}), parse_size(vm_memory))
    vms = {image: VM.for_shape(lab, image, vm_memory, vm_cpus, listener=listener)
           for image in dict.fromkeys(images)}             # unknown image: error before booting
    result = MatrixResult([p.case for p in planned], list(vms), [])
    started: list[VM] = []

    def one_kernel(image: str, vm: VM) -> tuple[dict | None, list[Cell], dict]:
        """Bring up one kernel's VM and run every case on it: (its probe or
        None, its cells, its runs)."""
        if vm.state() is None:
            started.append(vm)
        try:
            vm.up(reuse=True)
            probe = provision.ensure_provisioned(vm)["probe"]
        except Exception as e:          # this kernel is out; the others go on
            if vm in started:
                vm.down()               # do not leave a half-booted VM behind
            return None, [Cell(image, None, p.case.label, Outcome.VM_FAILED,
                               error=f"{type(e).__name__}: {e}") for p in planned], {}
        runs: dict[str, RunResult] = {}
        cells = [_run_case(vm, image, probe, p, runs) for p in planned]
        if teardown and vm in started:
            vm.down()
        return probe, cells, runs

    # kernels side by side when this machine has VM slots for them
    slots = min(len(vms), max(1, (os.cpu_count() or 1) // max(1, vm_cpus)))
    try:
        with ThreadPoolExecutor(slots) as pool:
            done = list(pool.map(lambda item: one_kernel(*item), vms.items()))
        for image, (probe, cells, runs) in zip(vms, done):
            result.kernels[image] = probe.get("kernel") if probe else None
            if probe is not None:
                result.probes[image] = probe
            result.cells += cells
            result.results.update(runs)
    finally:
        if teardown:                        # interrupted: stop what this call started
            for vm in started:
                if vm.state() is not None:
                    vm.down()
    return result


def _run_case(vm: VM, image: str, probe: dict, p: _Planned,
              results: dict[str, RunResult]) -> Cell:
    kernel = probe.get("kernel")
    try:
        catalogue.check_against(p.scenario, p.resolved, vm.spec.memory, probe)
    except catalogue.MissingFeature as e:
        return Cell(image, kernel, p.case.label, Outcome.UNSUPPORTED, missing=Missing.of(e))
    except catalogue.ScenarioError as e:   # e.g. hugetlbfs without huge pages
        return Cell(image, kernel, p.case.label, Outcome.UNSUPPORTED, error=str(e))
    try:
        res = runner.run_and_store(vm, p.case.scenario, dict(p.case.params))
    except Exception as e:                 # the VM or the results store gave out
        return Cell(image, kernel, p.case.label, Outcome.FAILED,
                    error=f"{type(e).__name__}: {e}")
    results[res.run_id] = res
    status = Status(res.status)
    return Cell(image, res.kernel or kernel, p.case.label, _OUTCOME_OF_STATUS[status],
                res.run_id, status, error=res.error)
