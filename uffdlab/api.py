# SPDX-License-Identifier: MIT
"""The calls notebooks make: a lab, a VM sized by parameters, a ready
(booted, provisioned) VM, a run that is stored, the stored runs. Notebooks
import only this module and `report`; everything here composes the modules
of the data flow."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Lab, load_lab
from .matrix import run_matrix
from .provision import ensure_provisioned
from .runner import Prepared, prepare, run_and_store
from .scenarios import for_strategy
from .sweep import PointResult, SweepIndex
from .vm import VM, VMState

__all__ = ["open_lab", "vm_for", "ready", "plan_run", "run_and_store", "run_matrix",
           "PointResult", "SweepIndex"]


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
