# SPDX-License-Identifier: MIT
"""The lab foundation on real QEMU: images with Debian kernels boot, answer
SSH with their pinned host key, and leave nothing behind when stopped or
killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import paramiko
import pytest

from tests.conftest import REPO, wait_for, write_lab
from uffdlab.config import load_lab
from uffdlab.images import ImageError, ImageStore
from uffdlab.ssh import Session
from uffdlab.vm import VM, VMError, _dir_alive

pytestmark = pytest.mark.integration

# The Debian release each suite ships, as the kernel's major.minor.
EXPECTED_SERIES = {"trixie": "6.12.", "bookworm": "6.1."}


@pytest.mark.parametrize("name", ["trixie", "bookworm"])
def test_guest_runs_the_image_kernel(running_vms, name):
    vm = running_vms[name]
    img = vm.image()
    with vm.session() as s:
        release = s.run("uname -r", check=True).stdout.strip()
    assert release == img.meta["kernel_release"]
    assert release.startswith(EXPECTED_SERIES[img.spec.suite])
    assert release.endswith("-cloud-amd64")          # the default kernel package


def test_two_vms_run_at_once(running_vms):
    states = [vm.state() for vm in running_vms.values()]
    assert all(st is not None and st.ssh_ready for st in states)
    assert len({st.ssh_port for st in states}) == len(states)
    assert len({st.qemu_pid for st in states}) == len(states)


def test_state_records_accel_and_kernel(trixie_vm):
    st = trixie_vm.state()
    assert st.accel in ("kvm", "tcg")
    assert st.kernel_release == trixie_vm.image().kernel_release
    assert st.boot_seconds > 0


def test_wrong_host_key_is_refused(trixie_vm, tmp_path):
    st = trixie_vm.state()
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    with pytest.raises(paramiko.BadHostKeyException):
        Session(st.ssh_port, wrong, trixie_vm.key_path)


def test_unchanged_recipe_is_not_rebuilt(test_lab, running_vms):
    store = ImageStore(test_lab)
    img = store.image("trixie")
    before = img.meta["built_at"]
    events = []
    store.listener = events.append
    again = store.build("trixie")
    assert again.dir == img.dir and again.meta["built_at"] == before
    assert events == []                                # no mmdebstrap step ran


def test_failed_build_leaves_nothing(session_dir):
    lab = load_lab(write_lab(session_dir / "badpkg.yml",
                             {"v": {"image": "broken"}},
                             images={"broken": {"suite": "trixie",
                                                "packages": ["uffdlab-no-such-package"]}}))
    store = ImageStore(lab)
    img = store.image("broken")
    with pytest.raises(ImageError, match="mmdebstrap failed"):
        store.build("broken")
    assert not img.dir.exists()
    assert not list(store.root.glob(f".build-{img.key}-*"))


def test_kernel_panic_fails_fast_with_serial_tail(session_dir):
    lab = load_lab(write_lab(session_dir / "panic.yml",
                             {"t-panic": {"image": "trixie", "memory": "512M", "cpus": 1,
                                          "cmdline": "init=/bin/false"}}))
    vm = VM(lab, "t-panic")
    with pytest.raises(VMError, match="panicked") as err:
        vm.up()
    assert "Kernel panic" in str(err.value)
    assert not vm.dir.exists()
    assert not _qemu_running(lab.source, "t-panic")


@pytest.mark.parametrize("victim", ["cli", "keeper", "qemu"])
def test_kill_9_mid_boot_leaves_nothing(session_dir, victim):
    """kill -9 the CLI, the keeper or QEMU while the guest boots: no QEMU, no
    overlay, no file of the VM is left, and a surviving CLI says what broke."""
    path = write_lab(session_dir / f"kill-{victim}.yml",
                     {"t-kill": {"image": "trixie", "memory": "512M", "cpus": 1}})
    vm = VM(load_lab(path), "t-kill")
    cli = subprocess.Popen([sys.executable, "-m", "uffdlab", "--lab", str(path), "up"],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    try:
        wait_for(lambda: _qemu_running(path, "t-kill") and vm.state() is not None, 60,
                  "QEMU to start")
        assert (vm.dir / "overlay.qcow2").exists()
        st = vm.state()
        target = {"cli": cli.pid, "keeper": st.keeper_pid, "qemu": st.qemu_pid}[victim]
        os.kill(target, signal.SIGKILL)
        err = cli.communicate(timeout=60)[1] if victim != "cli" else ""
        wait_for(lambda: not _qemu_running(path, "t-kill"), 30, "QEMU to stop")
        wait_for(lambda: not vm.dir.exists(), 15, "the VM directory to go")
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.wait()
        vm.down()
    assert vm.state() is None
    if victim != "cli":
        assert cli.returncode == 1 and "QEMU exited during boot" in err
    # only the last serial log (and the boot lock) stay, next to where the directory was
    assert {p.name for p in vm.dir.parent.iterdir()} <= {"t-kill.serial.log", ".t-kill.lock"}


def test_down_all_cleans_up_a_vm_whose_keeper_was_killed(session_dir, running_vms):
    path = write_lab(session_dir / "sweep.yml",
                     {"t-sweep": {"image": "trixie", "memory": "512M", "cpus": 1}})
    lab = load_lab(path)
    vm = VM(lab, "t-sweep")
    st = vm.up()
    os.kill(st.keeper_pid, signal.SIGKILL)             # QEMU dies with it (PDEATHSIG)
    wait_for(lambda: not st.qemu_id.alive(), 10, "QEMU to follow its keeper")
    assert (vm.dir / "overlay.qcow2").exists()         # nobody was left to clean
    from uffdlab.cli import main
    assert main(["--lab", str(path), "down", "--all"]) == 0
    assert not vm.dir.exists()
    # the session's VMs belong to another lab file: not this lab's to stop
    assert all(_dir_alive(v.dir) for v in running_vms.values())


def _qemu_running(lab_path, vm_name: str) -> bool:
    """A QEMU of this lab's VM: its QMP socket path is in its command line."""
    qmp = VM(load_lab(lab_path), vm_name).dir / "qmp.sock"
    out = subprocess.run(["pgrep", "-f", "--", f"unix:{qmp},"],
                         capture_output=True, text=True).stdout
    return bool(out.strip())
