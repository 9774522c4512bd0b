"""The calls notebooks make: a lab, a VM sized by parameters, a ready
(booted, provisioned) VM, a run that is stored, the stored runs. Notebooks
import only this module and `report`; everything here composes the modules
of the data flow."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Lab, load_lab
from .model import Kind, RunResult
from .results import store_run
from .provision import ensure_provisioned
from .runner import Prepared, prepare, run
from .scenarios import for_strategy
from .sweep import PointResult, SweepIndex
from .vm import VM, VMState

__all__ = ["open_lab", "vm_for", "ready", "plan_run", "run_and_store", "PointResult",
           "SweepIndex"]


def open_lab(path: str | Path | None = None) -> Lab:
    """lab.yml from the given path, or the default one (see paths.default_lab_file)."""
    return load_lab(path)


# A VM by shape (image, memory, cpus), named after it: see VM.for_shape.
vm_for = VM.for_shape


def ready(vm: VM) -> VMState:
    """Boot the VM if needed and provision it unless it already has these
    guest tools; its state, with the kernel's uffd facts in `.facts`."""
    vm.up(reuse=True)
    ensure_provisioned(vm)
    return vm.state()


def plan_run(vm: VM, strategy: str, inject: str = "none", **params: Any) -> Prepared:
    """The catalogue scenario that a snapshot strategy with an injected fault
    runs (scenarios.for_strategy), its parameters checked against the VM's
    shape before anything boots."""
    scenario = for_strategy(strategy, inject)
    return prepare(vm, scenario.id, {**params, "strategy": strategy})


def run_and_store(vm: VM, scenario: str, params: dict[str, Any] | None = None,
                  timeout: float | None = None) -> RunResult:
    """Run a scenario (booting and provisioning as needed) and store it. A
    database that cannot take the run gets it later: it waits in the spool
    next to the database, and the event says where."""
    res = run(vm, scenario, params, timeout)
    outcome = store_run(vm.lab.results_path, res)
    vm.emit(Kind.STORED, "; ".join([outcome.message, *outcome.spool_problems]),
            run_id=res.run_id, stored=outcome.stored,
            spooled_to=str(outcome.spooled_to or ""), imported=outcome.imported)
    return res
