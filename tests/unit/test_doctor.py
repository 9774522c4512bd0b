# SPDX-License-Identifier: MIT
"""`uffdlab doctor`'s checks, each with the layer below it faked: PATH
lookups, module lookups, the effective uid, /proc switches, the Jupyter
kernelspecs and the accel cache. Nothing is booted and nothing imported."""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from tests.unit.labs import MINIMAL_LAB
from uffdlab import accel, cli, doctor
from uffdlab.config import load_lab


@pytest.fixture
def lab(tmp_path):
    path = tmp_path / "lab.yml"
    path.write_text(MINIMAL_LAB)
    return load_lab(path)


@pytest.fixture
def no_probe(monkeypatch):
    """Booting a kernel is what made doctor slow: any attempt fails the test."""
    def boom(*a, **k):
        raise AssertionError("doctor booted a kernel without --kvm")
    monkeypatch.setattr(accel, "probe_kvm", boom)


def fake_which(monkeypatch, missing=()):
    monkeypatch.setattr(doctor.shutil, "which",
                        lambda cmd: None if cmd in missing else f"/usr/bin/{cmd}")


# -- host tools ----------------------------------------------------------------------

def test_missing_tool_fails_with_its_package(monkeypatch):
    fake_which(monkeypatch, missing={"qemu-img"})
    check = doctor._tool("qemu-img", "qemu-utils")
    assert not check.ok and check.required
    assert check.detail == "not found" and check.fix == "apt-get install -y qemu-utils"


def test_ssh_client_is_checked_but_only_warns(monkeypatch):
    fake_which(monkeypatch, missing={"ssh"})
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    ssh = {c.name: c for c in doctor.run_checks(None)}["ssh"]
    assert not ssh.ok and not ssh.required
    assert "uffdlab ssh" in ssh.detail and "openssh-client" in ssh.fix


# -- what building a kernel from a tree needs ---------------------------------------------

TREE_LAB = """\
cache_dir: cache
images:
  trixie:
    suite: trixie
  mine:
    suite: trixie
    kernel:
      tree: linux
vms:
  guest:
    image: trixie
"""

KERNEL_CHECKS = ["make", "gcc", "flex", "bison", "bc", "cpio", "libelf headers",
                 "openssl headers"]


@pytest.fixture
def tree_lab(tmp_path):
    path = tmp_path / "tree.yml"
    path.write_text(TREE_LAB)
    return load_lab(path)


@pytest.fixture
def headers(monkeypatch, tmp_path):
    """An include dir with both headers; pkg-config asked about nothing."""
    inc = tmp_path / "include"
    (inc / "openssl").mkdir(parents=True)
    (inc / "gelf.h").write_text("")
    (inc / "openssl" / "ssl.h").write_text("")
    monkeypatch.setattr(doctor, "INCLUDE_DIR", inc)
    asked = []
    monkeypatch.setattr(doctor, "_pkg_config_exists", lambda m: asked.append(m) or False)
    return types.SimpleNamespace(dir=inc, asked=asked)


def kernel_checks(lab) -> dict[str, doctor.Check]:
    return {c.name: c for c in doctor._kernel_build(lab)}


def test_kernel_build_dependencies_all_there(lab, tree_lab, monkeypatch, headers):
    fake_which(monkeypatch)
    for which in (None, lab, tree_lab):
        checks = kernel_checks(which)
        assert list(checks) == KERNEL_CHECKS
        assert all(c.ok for c in checks.values())
    assert checks["flex"].detail == "/usr/bin/flex"
    assert checks["libelf headers"].detail == str(headers.dir / "gelf.h")
    assert headers.asked == []                  # the header was enough


def test_kernel_build_dependencies_only_warn_without_a_tree(lab, monkeypatch, headers):
    fake_which(monkeypatch, missing={"flex", "bc"})
    (headers.dir / "gelf.h").unlink()
    for which in (lab, None):                   # no tree, or no lab file to tell
        checks = kernel_checks(which)
        for name, package in (("flex", "flex"), ("bc", "bc"), ("libelf headers", "libelf-dev")):
            check = checks[name]
            assert not check.ok and not check.required
            assert "needed only to build kernels from a tree" in check.detail
            assert check.fix == f"apt-get install -y {package}"
        assert checks["bison"].ok and checks["openssl headers"].ok


def test_kernel_build_dependencies_are_required_with_a_tree(tree_lab, monkeypatch, headers):
    fake_which(monkeypatch, missing={"bison", "cpio"})
    (headers.dir / "openssl" / "ssl.h").unlink()
    checks = kernel_checks(tree_lab)
    failed = {name: c for name, c in checks.items() if not c.ok}
    assert list(failed) == ["bison", "cpio", "openssl headers"]
    for check in failed.values():
        assert check.required
        assert "image mine builds its kernel from a tree" in check.detail
    assert failed["bison"].fix == "apt-get install -y bison"
    assert failed["cpio"].fix == "apt-get install -y cpio"
    assert failed["openssl headers"].fix == "apt-get install -y libssl-dev"
    assert "ssl.h" in failed["openssl headers"].detail
    assert "libcrypto" in failed["openssl headers"].detail
    assert headers.asked == ["libcrypto"]       # pkg-config, when the header is not there


def test_kernel_headers_found_by_pkg_config(tree_lab, monkeypatch, headers):
    fake_which(monkeypatch)
    (headers.dir / "gelf.h").unlink()
    monkeypatch.setattr(doctor, "_pkg_config_exists", lambda m: m == "libelf")
    check = kernel_checks(tree_lab)["libelf headers"]
    assert check.ok and check.detail == "pkg-config libelf"


def test_pkg_config_missing_or_not_knowing(monkeypatch):
    def missing(*a, **k):
        raise FileNotFoundError("pkg-config")
    monkeypatch.setattr(doctor.subprocess, "run", missing)
    assert doctor._pkg_config_exists("libelf") is False
    seen = []

    def run(argv, **k):
        seen.append(argv)
        return types.SimpleNamespace(returncode=1)
    monkeypatch.setattr(doctor.subprocess, "run", run)
    assert doctor._pkg_config_exists("libcrypto") is False
    assert seen == [["pkg-config", "--exists", "libcrypto"]]


def test_doctor_fails_for_a_missing_bison_only_with_a_tree(lab, tree_lab, monkeypatch,
                                                           headers, kvm_opens, no_probe,
                                                           capsys):
    fake_which(monkeypatch, missing={"bison"})
    fake_find_spec(monkeypatch)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(doctor, "_disk", lambda lab: doctor.Check("cache disk", True, "ok"))
    assert cli.main(["doctor", "--lab", str(lab.source)]) == 0
    out = capsys.readouterr().out
    assert "[warn] bison: not found (needed only to build kernels from a tree" in out
    assert cli.main(["doctor", "--lab", str(tree_lab.source)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] bison: not found (image mine builds its kernel from a tree)\n" \
           "       fix: apt-get install -y bison" in out


# -- Python modules, JupyterLab, the kernel --------------------------------------------

def fake_find_spec(monkeypatch, missing=()):
    def find_spec(name, *a):
        if name.split(".")[0] not in missing:
            return object()
        if "." in name:                     # as find_spec does for a missing parent
            raise ModuleNotFoundError(name)
        return None
    monkeypatch.setattr(doctor.importlib.util, "find_spec", find_spec)
    return find_spec


def test_python_modules_are_looked_up_not_imported(monkeypatch):
    fake_find_spec(monkeypatch, missing={"pandas", "qemu"})
    check = doctor._python_modules()
    assert not check.ok and check.detail == "missing: qemu.qmp, pandas"
    assert "pip install -e ." in check.fix


def test_python_modules_all_there(monkeypatch):
    fake_find_spec(monkeypatch)
    assert doctor._python_modules().ok


def test_jupyterlab_missing_is_a_warning_with_the_fix(monkeypatch):
    fake_find_spec(monkeypatch, missing={"jupyterlab"})
    check = doctor._jupyterlab()
    assert not check.ok and not check.required and "./lab setup" in check.fix


class FakeSpecs:
    """jupyter_client's KernelSpecManager over a dict {name: argv[0]}."""

    kernels: dict[str, str] = {}

    def find_kernel_specs(self):
        return {name: f"/share/jupyter/kernels/{name}" for name in self.kernels}

    def get_kernel_spec(self, name):
        return type("Spec", (), {"argv": [self.kernels[name], "-m", "ipykernel_launcher"]})


@pytest.fixture
def kernelspecs(monkeypatch):
    kernelspec = pytest.importorskip("jupyter_client.kernelspec")
    monkeypatch.setattr(kernelspec, "KernelSpecManager", FakeSpecs)
    monkeypatch.setattr(FakeSpecs, "kernels", {})
    return FakeSpecs.kernels


def test_kernel_not_registered_warns_with_the_fix(kernelspecs):
    kernelspecs["python3"] = sys.executable
    check = doctor._jupyter_kernel()
    assert not check.ok and not check.required
    assert "not registered" in check.detail
    assert "./lab setup" in check.fix and "uffdlab jupyter install" in check.fix


def test_kernel_of_this_environment_is_ok(kernelspecs):
    # python or python3: the same venv's bin/ either way
    kernelspecs["uffdlab"] = str(Path(sys.executable).parent / "python")
    check = doctor._jupyter_kernel()
    assert check.ok and check.detail == "/share/jupyter/kernels/uffdlab"


def test_kernel_of_another_environment_warns(kernelspecs):
    kernelspecs["uffdlab"] = "/opt/other-venv/bin/python"
    check = doctor._jupyter_kernel()
    assert not check.ok and not check.required
    assert "/opt/other-venv/bin/python" in check.detail and check.fix == doctor.KERNEL_FIX


def test_kernel_check_without_jupyter_client(monkeypatch):
    monkeypatch.setitem(sys.modules, "jupyter_client.kernelspec", None)
    check = doctor._jupyter_kernel()
    assert not check.ok and not check.required and "jupyter_client" in check.detail


# -- mmdebstrap's privileges -------------------------------------------------------------

@pytest.fixture
def unprivileged(monkeypatch, tmp_path):
    """A user (uid 1000, 'alice') with a subordinate id range, the switch files absent."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(doctor, "_user_name", lambda: "alice")
    monkeypatch.setattr(doctor, "USERNS_CLONE", tmp_path / "unprivileged_userns_clone")
    monkeypatch.setattr(doctor, "MAX_USER_NS", tmp_path / "max_user_namespaces")
    subuid = tmp_path / "subuid"
    subuid.write_text("alice:100000:65536\n")
    monkeypatch.setattr(doctor, "SUBUID", subuid)
    fake_which(monkeypatch)
    return tmp_path


def test_root_builds_images(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    check = doctor._mmdebstrap_privileges()
    assert check.ok and check.detail == "root"


def test_unshare_mode_when_the_kernel_and_newuidmap_allow(unprivileged):
    check = doctor._mmdebstrap_privileges()         # no switch file: namespaces allowed
    assert check.ok and "unshare" in check.detail
    (unprivileged / "unprivileged_userns_clone").write_text("1\n")
    assert doctor._mmdebstrap_privileges().ok


def test_user_namespaces_switched_off(unprivileged):
    (unprivileged / "unprivileged_userns_clone").write_text("0\n")
    check = doctor._mmdebstrap_privileges()
    assert not check.ok and not check.required
    assert "unprivileged_userns_clone is 0" in check.detail
    assert "sysctl -w kernel.unprivileged_userns_clone=1" in check.fix


def test_newuidmap_and_subuid_missing(unprivileged, monkeypatch):
    fake_which(monkeypatch, missing={"newuidmap"})
    (unprivileged / "subuid").write_text("bob:100000:65536\n")
    check = doctor._mmdebstrap_privileges()
    assert not check.ok
    assert "newuidmap not found" in check.detail and "no range for alice" in check.detail
    assert "apt-get install -y uidmap" in check.fix and "--add-subuids" in check.fix


# -- KVM: the cached verdict unless --kvm ---------------------------------------------

@pytest.fixture
def kvm_opens(monkeypatch):
    monkeypatch.setattr(accel, "kvm_status", lambda: (True, ""))
    monkeypatch.setattr(accel, "qemu_version", lambda: "QEMU emulator version 9.2.0")


def write_verdict(lab, choice: str, reason: str) -> Path:
    cache = lab.cache_path / "accel.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    key = f"{os.uname().release}|QEMU emulator version 9.2.0"
    cache.write_text(json.dumps({key: {"accel": choice, "reason": reason,
                                       "fell_back": choice == "tcg"}}))
    return cache


def test_kvm_verdict_not_cached_yet(lab, kvm_opens, no_probe):
    check = doctor._kvm(lab)
    assert check.ok and "doctor --kvm" in check.detail


def test_kvm_verdict_from_the_cache(lab, kvm_opens, no_probe):
    cache = write_verdict(lab, "kvm", "the guest kernel booted under KVM")
    check = doctor._kvm(lab)
    assert check.ok and check.required
    assert check.detail.startswith("KVM works: the guest kernel booted") and str(cache) in \
        check.detail


def test_kvm_fallback_from_the_cache(lab, kvm_opens, no_probe):
    write_verdict(lab, "tcg", "KVM does not run guests here (KVM internal error); using TCG")
    check = doctor._kvm(lab)
    assert check.ok and not check.required and "internal error" in check.detail


def test_kvm_probe_only_when_asked(lab, kvm_opens, monkeypatch):
    monkeypatch.setattr(doctor, "_kvm_probe", lambda lab: doctor.Check("accel", True, "probed"))
    assert doctor.run_checks(lab, kvm=True)[-1].detail == "probed"
    assert doctor.run_checks(lab)[-1].detail != "probed"


def test_accel_tcg_in_the_lab_file_is_not_probed(tmp_path, kvm_opens, no_probe):
    path = tmp_path / "lab.yml"
    path.write_text("accel: tcg\n" + MINIMAL_LAB)
    check = doctor._kvm(load_lab(path), probe=True)
    assert check.ok and check.detail.startswith("tcg, as lab.yml asks")


# -- the command ------------------------------------------------------------------------

def test_doctor_command_exit_status_and_fixes(lab, monkeypatch, capsys):
    seen = []

    def checks(lab, kvm=False):
        seen.append(kvm)
        return [doctor.Check("ssh", False, "not found", "apt-get install -y openssh-client",
                             required=False), doctor.Check("qemu-img", True, "/usr/bin/qemu-img")]
    monkeypatch.setattr(doctor, "run_checks", checks)
    assert cli.main(["doctor", "--lab", str(lab.source)]) == 0        # a warning is fine
    out = capsys.readouterr().out
    assert "[warn] ssh: not found\n       fix: apt-get install -y openssh-client" in out
    assert "[ok  ] qemu-img" in out

    def failing(lab, kvm=False):
        seen.append(kvm)
        return [doctor.Check("mmdebstrap", False, "not found", "apt-get install -y mmdebstrap")]
    monkeypatch.setattr(doctor, "run_checks", failing)
    assert cli.main(["--lab", str(lab.source), "doctor", "--kvm"]) == 1
    assert "[FAIL] mmdebstrap" in capsys.readouterr().out
    assert seen == [False, True]


def test_run_checks_names(lab, monkeypatch, kvm_opens, no_probe):
    fake_which(monkeypatch)
    fake_find_spec(monkeypatch)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    names = [c.name for c in doctor.run_checks(lab)]
    assert names == ["qemu-system-x86_64", "qemu-img", "mmdebstrap", "mmdebstrap privileges",
                     "mkfs.ext4", "ssh-keygen", "ssh", "make", "gcc", "flex", "bison", "bc",
                     "cpio", "libelf headers", "openssl headers", "python dependencies",
                     "jupyterlab", "jupyter kernel 'uffdlab'", "cache disk", "accel"]
