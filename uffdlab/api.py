# SPDX-License-Identifier: MIT
"""The calls notebooks make: a lab, a VM sized by parameters, a ready
(booted, provisioned) VM, a run that is stored, the stored runs. Notebooks
import only this module and `report`; everything here composes the modules
of the data flow."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .cluster import resume_sweep, run_sweep
from .config import Lab, lab_from_dict, load_lab
from .events import Listener
from .kernel import KernelBuild, KernelStore, debian_source
from .matrix import run_matrix
from .provision import ensure_provisioned
from .rerun import Comparison, plan_rerun, rerun
from .runner import Prepared, prepare, run_and_store
from .scenarios import for_strategy
from .sweep import PointResult, SweepIndex, load_grid
from .vm import VM, VMState

__all__ = ["open_lab", "vm_for", "ready", "plan_run", "run_and_store", "run_matrix",
           "with_tree_kernel", "build_kernel", "kernel_source", "plan_rerun", "rerun",
           "compare_runs", "PointResult", "SweepIndex", "load_grid", "run_sweep",
           "resume_sweep"]


def open_lab(path: str | Path | None = None, results: str | Path | None = None) -> Lab:
    """lab.yml from the given path, or the default one (see paths.default_lab_file);
    with `results`, runs are stored in that database instead of lab.yml's."""
    lab = load_lab(path)
    return lab if results is None else lab.model_copy(update={"results": Path(results)})


def with_tree_kernel(lab: Lab, tree: str | Path, name: str = "mine", suite: str = "trixie",
                     base: str = "small", config: list[str | Path] | None = None,
                     make_args: list[str] | None = None) -> Lab:
    """The lab with one more image, `name`: `suite`'s rootfs booting the
    kernel the lab builds from `tree`, as if lab.yml said so (and checked
    as lab.yml is: a bad value is a ConfigError naming images.NAME...)."""
    data = lab.model_dump(mode="json", exclude_unset=True)
    kernel = {"tree": str(tree), "base": base, "config": [str(c) for c in config or []],
              "make_args": list(make_args or [])}
    data["images"] = {**data.get("images", {}), name: {"suite": suite, "kernel": kernel}}
    return lab_from_dict(data, lab.source)


def build_kernel(lab: Lab, image: str, listener: Listener | None = None) -> KernelBuild:
    """Build the image's kernel from its tree (a no-op when the tree and
    config are unchanged); `up` does this too."""
    return KernelStore(lab, listener).build(image)


def compare_runs(original: dict, repeats: list) -> Comparison:
    """A stored run (plan_rerun's) against its repeats: verdict and spread."""
    return Comparison(original, list(repeats))


# Debian's linux-source-SERIES unpacked under the cache dir: a real tree.
kernel_source = debian_source


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
