"""Shared test fixtures: a lab file for tests, and lab VMs booted once per
session (real QEMU; TCG on machines without working KVM)."""
from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import pytest
import yaml

from uffdlab.config import load_lab

REPO = Path(__file__).resolve().parent.parent
# Tests reuse the user's image cache so images are built once per machine.
CACHE = Path(os.environ.get("UFFDLAB_TEST_CACHE", "~/.cache/uffdlab")).expanduser()


def write_lab(path: Path, vms: dict, images: dict | None = None, **top) -> Path:
    """A lab file for a test: the shipped images, the given VMs."""
    shipped = yaml.safe_load((REPO / "lab.yml").read_text())
    data = {"name": "uffd-lab-tests", "accel": os.environ.get("UFFDLAB_TEST_ACCEL", "auto"),
            "cache_dir": str(CACHE), "results": str(path.parent / "results.sqlite"),
            "images": images or shipped["images"], "vms": vms, **top}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(scope="session")
def test_lab(session_dir):
    """One VM per shipped image, small enough for two at once under TCG."""
    path = write_lab(session_dir / "lab.yml", {
        "t-trixie": {"image": "trixie", "memory": "1536M", "cpus": 2},
        "t-bookworm": {"image": "bookworm", "memory": "1G", "cpus": 1},
    })
    return load_lab(path)


@pytest.fixture(scope="session")
def running_vms(test_lab):
    """Both test VMs, booted in parallel once for the whole session."""
    from uffdlab.images import ImageStore
    from uffdlab.vm import VM

    store = ImageStore(test_lab)
    for name in test_lab.images:          # builds are CPU-bound: one at a time
        store.build(name)
    vms = {name: VM(test_lab, name) for name in test_lab.vms}
    try:
        with concurrent.futures.ThreadPoolExecutor(len(vms)) as pool:
            for fut in [pool.submit(vm.up, True) for vm in vms.values()]:
                fut.result()
        yield vms
    finally:
        for vm in vms.values():
            vm.down()


@pytest.fixture(scope="session")
def trixie_vm(running_vms):
    return running_vms["t-trixie"]


@pytest.fixture(scope="session")
def bookworm_vm(running_vms):
    return running_vms["t-bookworm"]
