"""The calls notebooks and sweeps make: a lab, a VM sized by parameters,
a run that is stored. Everything here composes the modules of the data flow."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .config import Lab, VMSpec, format_size, load_lab, parse_size
from .events import Listener
from .runner import RunResult, run
from .vm import VM

REPO = Path(__file__).resolve().parent.parent


def open_lab(path: str | Path | None = None) -> Lab:
    """lab.yml from the given path, $UFFDLAB_LAB, or the repository's own."""
    import os
    return load_lab(path or os.environ.get("UFFDLAB_LAB") or REPO / "lab.yml")


def vm_for(lab: Lab, image: str, memory: str | int = "1536M", cpus: int = 2,
           name: str | None = None, listener: Listener | None = None) -> VM:
    """A VM of `image` with this memory and CPU count. VMs are named after
    their shape (nb-trixie-1536m-2c), so notebooks and sweep points that ask
    for the same shape reuse one running, provisioned VM."""
    lab.image_spec(image)                                  # a clear error if unknown
    size = parse_size(memory)
    if name is None:
        name = re.sub(r"[^a-z0-9-]", "-", f"nb-{image}-{format_size(size)}-{cpus}c".lower())
    spec = VMSpec(image=image, memory=size, cpus=cpus)
    derived = lab.model_copy(update={"vms": {**lab.vms, name: spec}})
    return VM(derived, name, listener)


def run_and_store(vm: VM, scenario: str, params: dict[str, Any] | None = None,
                  timeout: float | None = None) -> RunResult:
    """Run a scenario (booting and provisioning as needed) and store it. A
    database that cannot take the run gets it later: it waits in the spool
    next to the database, and the event says where."""
    from .results import store_run
    res = run(vm, scenario, params, timeout)
    outcome = store_run(vm.lab.results_path, res)
    vm.emit("stored", outcome.message, run_id=res.run_id, stored=outcome.stored,
            spooled_to=str(outcome.spooled_to or ""))
    return res
