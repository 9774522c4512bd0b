# SPDX-License-Identifier: MIT
"""The lab touches only what is its own: marked VM directories, the file
names it creates, processes whose start time and command line it recorded,
and VMs of its own lab file. No VM boots here: a "running VM" is a marked
directory whose keeper is a real sleeping process carrying the directory's
path in its command line, as the real keeper does."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from uffdlab import accel, cli
from uffdlab.api import vm_for
from uffdlab.config import load_lab
from uffdlab.owned import MARKER, NotOursError, ProcessId, make_vm_dir, remove_vm_dir, start_time
from uffdlab.vm import VM, VMError, VMState, kernel_digest, lab_vms_dir

from .labs import guest_lab


def write_lab(path: Path, cache: Path, name: str = "a", memory: str = "512M") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(guest_lab(cache, name, memory))
    return path


def fake_running(vm: VM, keeper: subprocess.Popen, memory: int | None = None) -> VMState:
    """A state directory like VM.up leaves, with `keeper` as its keeper."""
    make_vm_dir(vm.dir, str(vm.lab.source.resolve()))
    kid = ProcessId.of(keeper.pid, str(vm.dir))
    st = VMState(vm.name, vm.spec.image, vm.image().key, "6.12.0", "tcg", "test", 2222,
                 kid.to_dict(), {"pid": 0, "start": 0, "tag": "x"}, time.time(),
                 "ssh-ed25519 AAAA", memory or vm.spec.memory, vm.spec.cpus,
                 cmdline=vm.kernel_cmdline(), ssh_ready=True,
                 lab=str(vm.lab.source.resolve()))
    st.save(vm.state_file)
    (vm.dir / "overlay.qcow2").write_bytes(b"qcow")
    return st


# -- directories ------------------------------------------------------------------
def test_status_and_down_all_leave_unmarked_directories_alone(tmp_path, capsys):
    lab = load_lab(write_lab(tmp_path / "lab.yml", Path(".")))     # cache_dir: .
    users = tmp_path / "vms" / "photos"
    users.mkdir(parents=True)
    (users / "holiday.jpg").write_bytes(b"jpeg")
    ns = lab_vms_dir(lab)
    ns.mkdir(parents=True)
    foreign = ns / "guest"                          # where the lab's VM would live
    foreign.mkdir()
    (foreign / "state.json").write_text("{}")       # a name the lab uses, but no marker
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(["--lab", str(lab.source), "status"]) == 0
    assert cli.main(["--lab", str(lab.source), "down", "--all"]) == 0
    assert (users / "holiday.jpg").read_bytes() == b"jpeg"
    assert (foreign / "state.json").exists() and (foreign / "notes.txt").exists()


def test_a_marked_directory_loses_only_the_labs_file_names(tmp_path):
    d = tmp_path / "vms" / "guest"
    make_vm_dir(d, "lab.yml")
    for name in ("overlay.qcow2", "state.json", "qemu.log", "my-notes.txt"):
        (d / name).write_text("x")
    remove_vm_dir(d)
    assert sorted(p.name for p in d.iterdir()) == ["my-notes.txt"]


def test_boot_refuses_an_existing_directory_it_did_not_make(tmp_path):
    d = tmp_path / "guest"
    d.mkdir()
    with pytest.raises(NotOursError, match="not made by uffdlab"):
        make_vm_dir(d, "lab.yml")
    assert not (d / MARKER).exists()


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "", "X", "a" * 40, "a b"])
def test_vm_names_are_checked_in_the_api_too(tmp_path, name):
    lab = load_lab(write_lab(tmp_path / "lab.yml", tmp_path / "cache"))
    victim = tmp_path / "x"
    victim.mkdir()
    with pytest.raises(VMError, match="VM name: expected lowercase"):
        vm_for(lab, "trixie", "512M", 1, name=name)
    assert victim.exists()


# -- processes --------------------------------------------------------------------
def test_process_identity_needs_start_time_and_command_line(sleeper):
    p = sleeper("/cache/vms/lab/guest")
    real = ProcessId.of(p.pid, "/cache/vms/lab/guest")
    assert real.alive()
    reused = ProcessId(p.pid, real.start + 1, real.tag)        # same PID, later process
    other = ProcessId(p.pid, real.start, "/cache/vms/lab/other")
    for impostor in (reused, other):
        assert not impostor.alive()
        assert impostor.kill() is False
    assert p.poll() is None                                    # never signalled
    assert real.kill() and p.wait(5) == -signal.SIGKILL


def test_start_time_of_a_gone_process_is_none(sleeper):
    p = sleeper()
    assert start_time(p.pid) is not None
    p.kill()
    p.wait()
    assert start_time(p.pid) is None


def test_down_never_signals_a_reused_pid(tmp_path, sleeper, capsys):
    """state.json names PIDs that now belong to unrelated processes (a reboot,
    a stale directory): down and down --all must leave them running."""
    lab = load_lab(write_lab(tmp_path / "lab.yml", tmp_path / "cache"))
    vm = VM(lab, "guest")
    unrelated = sleeper()                        # its command line lacks the VM dir
    make_vm_dir(vm.dir, str(lab.source))
    stale = {"pid": unrelated.pid, "start": start_time(unrelated.pid), "tag": str(vm.dir)}
    st = VMState("guest", "trixie", "k", "6.12", "tcg", "", 2222, stale, stale,
                 time.time(), "ssh-ed25519 AAAA", 512 << 20, 1)
    st.save(vm.state_file)
    assert cli.main(["--lab", str(lab.source), "down", "guest"]) == 0
    make_vm_dir(vm.dir, str(lab.source))
    st.save(vm.state_file)
    assert cli.main(["--lab", str(lab.source), "down", "--all"]) == 0
    time.sleep(0.1)
    assert unrelated.poll() is None
    assert not vm.dir.exists()                  # the stale directory was the lab's


# -- labs sharing a cache ------------------------------------------------------------
def test_labs_sharing_a_cache_do_not_see_each_others_vms(tmp_path, sleeper, capsys):
    cache = tmp_path / "cache"
    lab_a = load_lab(write_lab(tmp_path / "a" / "lab.yml", cache, "a"))
    lab_b = load_lab(write_lab(tmp_path / "b" / "lab.yml", cache, "b", memory="1G"))
    vm_a, vm_b = VM(lab_a, "guest"), VM(lab_b, "guest")
    assert vm_a.dir != vm_b.dir
    keeper = sleeper(str(vm_a.dir))
    fake_running(vm_a, keeper)
    capsys.readouterr()
    assert cli.main(["--lab", str(lab_b.source), "status"]) == 0
    assert "stopped" in capsys.readouterr().out       # B's guest is not A's
    assert vm_b.state() is None
    assert cli.main(["--lab", str(lab_b.source), "down", "guest"]) == 0
    assert cli.main(["--lab", str(lab_b.source), "down", "--all"]) == 0
    assert keeper.poll() is None and vm_a.state() is not None
    capsys.readouterr()
    assert cli.main(["--lab", str(lab_a.source), "status"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("guest"))
    assert " up " in f" {row} "


def test_reuse_refuses_a_running_vm_of_another_shape(tmp_path, sleeper):
    cache = tmp_path / "cache"
    path = write_lab(tmp_path / "lab.yml", cache, memory="512M")
    small = VM(load_lab(path), "guest")
    fake_running(small, sleeper(str(small.dir)))
    write_lab(path, cache, memory="1G")          # lab.yml edited while it runs
    big = VM(load_lab(path), "guest")
    with pytest.raises(VMError, match=r"memory 512M \(asked for 1G\)"):
        big.up(reuse=True)
    assert small.up(reuse=True).memory == 512 << 20


def test_reuse_refuses_a_vm_running_an_older_build_of_its_local_kernel(tmp_path, sleeper):
    """A rebuilt tree (or a new bzImage at the same path) is a new kernel: the
    VM still running the old one is not silently reused."""
    bzimage = tmp_path / "bzImage"
    bzimage.write_bytes(b"\0" * 0x202 + b"HdrS" + b"build one")
    path = tmp_path / "lab.yml"
    path.write_text(guest_lab(tmp_path / "cache").replace(
        "    suite: trixie\n", f"    suite: trixie\n    kernel: {{vmlinuz: {bzimage}, "
        f"initrd: null}}\n"))
    vm = VM(load_lab(path), "guest")
    st = fake_running(vm, sleeper(str(vm.dir)))
    st.kernel = kernel_digest(vm.image())
    st.save(vm.state_file)
    assert vm.up(reuse=True).kernel == st.kernel            # the same build: reused
    bzimage.write_bytes(b"\0" * 0x202 + b"HdrS" + b"build two")
    with pytest.raises(VMError, match=rf"kernel build {st.kernel[:12]} \(asked for build "):
        VM(load_lab(path), "guest").up(reuse=True)


# -- accel: a dry run starts nothing ----------------------------------------------
def test_dry_run_neither_probes_nor_caches(tmp_path, monkeypatch, capsys):
    lab = load_lab(write_lab(tmp_path / "lab.yml", tmp_path / "cache"))
    lab_auto = tmp_path / "auto.yml"
    lab_auto.write_text(lab.source.read_text().replace("accel: tcg", "accel: auto"))
    monkeypatch.setattr(accel, "kvm_status", lambda: (True, ""))
    monkeypatch.setattr(accel, "_probe", lambda *a: pytest.fail("a dry run probed KVM"))
    assert cli.main(["--lab", str(lab_auto), "up", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "not probed" in out and "-accel kvm" in out
    assert not (tmp_path / "cache" / "accel.json").exists()


def test_probe_of_something_that_is_not_a_kernel_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(accel, "kvm_status", lambda: (True, ""))
    not_kernel = tmp_path / "passwd"
    not_kernel.write_text("root:x:0:0::/root:/bin/sh\n")
    cache = tmp_path / "accel.json"
    choice = accel.choose("auto", not_kernel, None, cache)
    assert choice.accel == "tcg" and "not a kernel image" in choice.reason
    assert not cache.exists()


def test_doctor_warns_when_dev_kvm_is_not_accessible(tmp_path, monkeypatch):
    from uffdlab import doctor
    lab = load_lab(write_lab(tmp_path / "lab.yml", tmp_path / "cache"))
    monkeypatch.setattr(accel, "kvm_status", lambda: (False, "Permission denied"))
    check = doctor._kvm(lab)
    assert not check.ok and not check.required
    assert "Permission denied" in check.detail and "kvm group" in check.fix


# -- the state file --------------------------------------------------------------------
def test_state_of_an_older_lab_version_is_not_trusted(tmp_path):
    lab = load_lab(write_lab(tmp_path / "lab.yml", tmp_path / "cache"))
    vm = VM(lab, "guest")
    make_vm_dir(vm.dir, str(lab.source))
    vm.state_file.write_text(json.dumps({"name": "guest", "keeper_pid": os.getpid()}))
    assert vm.state() is None                       # unreadable: nothing is signalled
    assert vm.down() is False


def test_down_by_name_stops_a_notebooks_vm_that_status_lists(tmp_path, sleeper, capsys):
    """nb-* VMs are not in lab.yml, but status lists them: down NAME stops
    one; an unknown name is refused with the names it could be."""
    lab = load_lab(write_lab(tmp_path / "lab.yml", tmp_path / "cache"))
    nb = vm_for(lab, "trixie", "512M", 1)
    keeper = sleeper(str(nb.dir))
    fake_running(nb, keeper)
    assert cli.main(["--lab", str(lab.source), "down", "nb-typo"]) == 2
    err = capsys.readouterr().err
    assert "no VM 'nb-typo' in lab.yml or running from it" in err
    assert f"expected one of guest, {nb.name}" in err
    assert keeper.poll() is None
    assert cli.main(["--lab", str(lab.source), "down", nb.name]) == 0
    assert f"{nb.name}: stopped" in capsys.readouterr().out
    keeper.wait(10)
    assert not nb.dir.exists()
