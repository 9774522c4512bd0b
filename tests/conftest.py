# SPDX-License-Identifier: MIT
"""Shared test fixtures: a lab file for tests, and lab VMs booted once per
session (real QEMU; TCG on machines without working KVM)."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
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


# The VM shape notebooks default to: tests and notebooks share these VMs.
VM_MEMORY, VM_CPUS = "1536M", 2


# The shared VMs by the names api.vm_for gives their shape, so the CLI can
# address them too (`--vm nb-trixie-1536m-2c`).
SHARED = {image: f"nb-{image}-{VM_MEMORY.lower()}-{VM_CPUS}c" for image in ("trixie", "bookworm")}


@pytest.fixture(scope="session")
def test_lab(session_dir):
    """The shipped images and a lab file of the tests' own."""
    path = write_lab(session_dir / "lab.yml", {
        "t-scratch": {"image": "trixie", "memory": "512M", "cpus": 1},
        **{name: {"image": image, "memory": VM_MEMORY, "cpus": VM_CPUS}
           for image, name in SHARED.items()},
    })
    return load_lab(path)


def _parallel(fn, items):
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        return [f.result() for f in [pool.submit(fn, x) for x in items]]


@pytest.fixture(scope="session")
def running_vms(test_lab):
    """A VM per shipped image, booted in parallel once for the whole session
    and named by shape (api.vm_for), so notebooks under test reuse them."""
    from uffdlab.api import vm_for
    from uffdlab.images import ImageStore

    store = ImageStore(test_lab)
    for name in test_lab.images:          # builds are CPU-bound: one at a time
        store.build(name)
    vms = {img: vm_for(test_lab, img, VM_MEMORY, VM_CPUS) for img in ("trixie", "bookworm")}
    try:
        _parallel(lambda vm: vm.up(reuse=True), list(vms.values()))
        yield vms
    finally:
        for vm in vms.values():
            vm.down()


@pytest.fixture(scope="session")
def provisioned(running_vms):
    """Both VMs provisioned (in parallel) and saved as their shape's template;
    the first provisioning results."""
    from uffdlab.provision import provision

    def provision_and_save(vm):
        res = provision(vm)
        vm.save_template()
        return res
    results = _parallel(provision_and_save, list(running_vms.values()))
    return dict(zip(running_vms, results))


@pytest.fixture(scope="session")
def trixie_vm(running_vms):
    return running_vms["trixie"]


@pytest.fixture(scope="session")
def bookworm_vm(running_vms):
    return running_vms["bookworm"]


def wait_for(cond, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def run_and_strike(vm, strike, scenario: str = "S3", params: dict | None = None):
    """run_and_store with `strike()` called from another thread once the run
    reports progress (the snapshot is under way). Returns (result, whether
    the strike happened)."""
    from uffdlab.api import run_and_store
    started = threading.Event()
    listener = vm.listener

    def watch(ev):
        if ev.kind == "progress":
            started.set()
        listener(ev)

    striker = threading.Thread(target=lambda: started.wait(120) and strike())
    vm.listener = watch
    striker.start()
    try:
        res = run_and_store(vm, scenario, params or {"size": "16M", "duration": 30})
    finally:
        vm.listener = listener
        striker.join()
    return res, started.is_set()


# -- a kernel built from a tree (tests/integration/test_own_kernel.py) -------------

# Debian's linux-source-SERIES, where `uffdlab kernel source` unpacks it in the cache.
KERNEL_TREE = CACHE / "kernel-src" / "linux-source-6.12"


def write_kernel_lab(session_dir: Path) -> Path:
    """Three images of one tree: `mine` (the small config), `broken` (a
    fragment that turns userfaultfd off) and `noroot` (a root device that
    does not exist); and the packaged trixie to compare with."""
    no_uffd = session_dir / "no-uffd.config"
    no_uffd.write_text("# CONFIG_USERFAULTFD is not set\n")
    small = {"tree": str(KERNEL_TREE), "base": "small"}
    return write_lab(session_dir / "kernel-lab.yml",
                     {"mine-vm": {"image": "mine", "memory": VM_MEMORY, "cpus": VM_CPUS}},
                     images={"trixie": {"suite": "trixie"},
                             "mine": {"suite": "trixie", "kernel": small},
                             "broken": {"suite": "trixie",
                                        "kernel": {**small, "config": [str(no_uffd)]}},
                             "noroot": {"suite": "trixie",
                                        "kernel": {**small, "cmdline": "root=/dev/vdz"}}})


@pytest.fixture(scope="session", autouse=True)
def early_kernel_build(request, session_dir):
    """The tree kernel takes minutes to compile. When the session includes
    the own-kernel tests, fetch the tree and start the build as the session
    begins, at the lowest CPU priority, so it uses the cycles the VM tests
    before them leave idle; those tests wait for it (the build is then a
    no-op). Killed with the session if it is still running."""
    if not any("test_own_kernel" in item.nodeid for item in request.session.items):
        yield None
        return
    lab = write_kernel_lab(session_dir)
    log = open(session_dir / "early-kernel-build.log", "w")
    uffdlab = f"{sys.executable} -m uffdlab --lab {lab}"
    proc = subprocess.Popen(["nice", "-n", "19", "sh", "-c",
                             f"{uffdlab} kernel source && exec {uffdlab} kernel build mine"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, session_dir / "early-kernel-build.log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
