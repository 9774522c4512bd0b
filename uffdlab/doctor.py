# SPDX-License-Identifier: MIT
"""`uffdlab doctor`: can this machine run a lab, and how to fix it if not.

Every check is quick: modules are looked up, not imported (pandas and
matplotlib alone take a second and more), and KVM is reported from the
verdict `uffdlab up` cached, unless a probe boot is asked for (run_checks
with kvm=True), which takes seconds.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import accel
from .config import Lab
from .jupyter import KERNEL_NAME

PY_MODULES = ("pydantic", "yaml", "paramiko", "qemu.qmp", "ansible_runner", "papermill",
              "pandas", "matplotlib", "ipykernel", "nbformat")
MIN_FREE_GB = 8
KERNEL_FIX = "./lab setup; or uffdlab jupyter install (--user: for your own Jupyter too)"
USERNS_CLONE = Path("/proc/sys/kernel/unprivileged_userns_clone")  # Debian's switch
MAX_USER_NS = Path("/proc/sys/user/max_user_namespaces")
SUBUID = Path("/etc/subuid")

# What building a kernel from a tree (images.NAME.kernel.tree) needs on the
# host: tools on PATH, (command, apt package) ...
KERNEL_TOOLS = (("make", "make"), ("gcc", "gcc"), ("flex", "flex"), ("bison", "bison"),
                ("bc", "bc"), ("cpio", "cpio"))
# ... and libraries' headers, (check name, header, pkg-config module, apt
# package): objtool (the ORC unwinder) needs libelf, sign-file and
# extract-cert (module signing, trusted keys) need libcrypto.
KERNEL_HEADERS = (("libelf headers", "gelf.h", "libelf", "libelf-dev"),
                  ("openssl headers", "openssl/ssl.h", "libcrypto", "libssl-dev"))
INCLUDE_DIR = Path("/usr/include")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def run_checks(lab: Lab | None, kvm: bool = False) -> list[Check]:
    """The checks in the order doctor prints them; `kvm` boots a kernel
    under KVM instead of reporting the cached verdict."""
    checks = [_tool("qemu-system-x86_64", "qemu-system-x86"), _tool("qemu-img", "qemu-utils"),
              _tool("mmdebstrap", "mmdebstrap"), _mmdebstrap_privileges(),
              _tool("mkfs.ext4", "e2fsprogs"), _tool("ssh-keygen", "openssh-client"),
              _tool("ssh", "openssh-client", required=False,
                    why="only 'uffdlab ssh VM' without a command needs it"),
              *_kernel_build(lab), _python_modules(), _jupyterlab(), _jupyter_kernel()]
    if lab is not None:
        checks += [_disk(lab), _kvm(lab, probe=kvm)]
    return checks


def _tool(cmd: str, package: str, required: bool = True, why: str = "") -> Check:
    path = shutil.which(cmd)
    detail = path or ("not found" + (f" ({why})" if why else ""))
    return Check(cmd, path is not None, detail, f"apt-get install -y {package}", required)


def _kernel_build(lab: Lab | None) -> list[Check]:
    """The kernel build's tools and headers: required when the lab file has
    an image whose kernel is built from a tree, else warnings."""
    trees = [] if lab is None else [name for name, img in lab.images.items()
                                    if img.kernel.is_tree]
    if len(trees) == 1:
        why = f"image {trees[0]} builds its kernel from a tree"
    elif trees:
        why = f"images {', '.join(trees)} build their kernels from trees"
    else:
        why = "needed only to build kernels from a tree, images.NAME.kernel.tree"
    required = bool(trees)
    return ([_tool(cmd, package, required, why) for cmd, package in KERNEL_TOOLS]
            + [_header(name, header, module, package, required, why)
               for name, header, module, package in KERNEL_HEADERS])


def _header(name: str, header: str, module: str, package: str, required: bool,
            why: str) -> Check:
    """A library's development files: its header in /usr/include, else
    pkg-config knowing the library."""
    path = INCLUDE_DIR / header
    if path.is_file():
        return Check(name, True, str(path), required=required)
    if _pkg_config_exists(module):
        return Check(name, True, f"pkg-config {module}", required=required)
    return Check(name, False, f"no {path}, and pkg-config does not know {module} ({why})",
                 f"apt-get install -y {package}", required)


def _pkg_config_exists(module: str) -> bool:
    try:
        return subprocess.run(["pkg-config", "--exists", module], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):      # no pkg-config: nothing known
        return False


def _importable(module: str) -> bool:
    """Whether `module` is installed, without running it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):     # a parent package missing, or a broken one
        return False


def _python_modules() -> Check:
    missing = [mod for mod in PY_MODULES if not _importable(mod)]
    return Check("python dependencies", not missing,
                 "all installed" if not missing else "missing: " + ", ".join(missing),
                 "pip install -e . (inside the project venv)")


def _jupyterlab() -> Check:
    ok = _importable("jupyterlab")
    return Check("jupyterlab", ok, "installed" if ok else "not installed (only the notebooks "
                 "in a browser need it; 'uffdlab demo' and 'sweep' do not)",
                 "./lab setup; or pip install -e '.[lab]' (inside the project venv)",
                 required=False)


def _jupyter_kernel() -> Check:
    name = f"jupyter kernel {KERNEL_NAME!r}"
    try:
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError:
        return Check(name, False, "jupyter_client is not installed", KERNEL_FIX, required=False)
    manager = KernelSpecManager()
    found = manager.find_kernel_specs()
    if KERNEL_NAME not in found:
        return Check(name, False, "not registered: the notebooks and 'uffdlab demo' run on it",
                     KERNEL_FIX, required=False)
    try:
        python = manager.get_kernel_spec(KERNEL_NAME).argv[0]
    except (OSError, ValueError, IndexError, KeyError) as e:
        return Check(name, False, f"registered in {found[KERNEL_NAME]} but unreadable ({e})",
                     KERNEL_FIX, required=False)
    # A kernel left by another venv runs a Python that may lack this uffdlab;
    # python and python3 of one venv share its bin/ (symlinks not resolved:
    # every venv's python links to the same system one).
    here = os.path.dirname(os.path.abspath(sys.executable))
    if os.path.isabs(python) and os.path.dirname(os.path.abspath(python)) != here:
        return Check(name, False, f"registered in {found[KERNEL_NAME]}, but it runs {python}, "
                     f"not this Python ({sys.executable})", KERNEL_FIX, required=False)
    return Check(name, True, found[KERNEL_NAME])


def _mmdebstrap_privileges() -> Check:
    """mmdebstrap --mode=auto builds as root, else in a user namespace
    (unshare mode), which needs the kernel to allow it and newuidmap with
    a subordinate id range."""
    name = "mmdebstrap privileges"
    if os.geteuid() == 0:
        return Check(name, True, "root")
    problems, fixes = [], []
    clone = _read_proc(USERNS_CLONE)
    if clone is not None and clone != "1":
        problems.append(f"{USERNS_CLONE} is {clone}")
        fixes.append("sudo sysctl -w kernel.unprivileged_userns_clone=1")
    if _read_proc(MAX_USER_NS) == "0":
        problems.append(f"{MAX_USER_NS} is 0")
        fixes.append("sudo sysctl -w user.max_user_namespaces=15000")
    if shutil.which("newuidmap") is None:
        problems.append("newuidmap not found")
        fixes.append("apt-get install -y uidmap")
    user = _user_name()
    if not _has_subuid(user):
        problems.append(f"no range for {user} in {SUBUID}")
        fixes.append(f"sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 "
                     f"{user}")
    if problems:
        return Check(name, False, "not root, and unshare mode cannot work: "
                     + "; ".join(problems), "; ".join(fixes) + " (or build images as root)",
                     required=False)
    return Check(name, True, "unshare mode (user namespaces, newuidmap)")


def _read_proc(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None                         # absent: the kernel has no such switch


def _user_name() -> str:
    import pwd
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _has_subuid(user: str) -> bool:
    try:
        lines = SUBUID.read_text().splitlines()
    except OSError:
        return False
    owners = {line.split(":", 1)[0] for line in lines if ":" in line}
    return user in owners or str(os.geteuid()) in owners


def _disk(lab: Lab) -> Check:
    path = lab.cache_path
    probe = path
    while not probe.exists():
        probe = probe.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    return Check("cache disk", free_gb >= MIN_FREE_GB, f"{free_gb:.0f} GB free at {path}",
                 f"free space or set cache_dir in {lab.source.name} (images need about "
                 f"1 GB each, plus overlays)")


def _kvm(lab: Lab, probe: bool = False) -> Check:
    usable, why_not = accel.kvm_status()
    if not usable and why_not == "missing":
        return Check("accel", True, "/dev/kvm is missing: VMs will run under TCG "
                     "(slow, but every scenario works)", required=False)
    if not usable:
        return Check("accel", False, f"/dev/kvm exists but cannot be opened ({why_not}): "
                     "VMs will run under TCG, many times slower",
                     "add yourself to the kvm group (sudo usermod -aG kvm $USER), then log "
                     "in again" + ("" if lab.accel == "tcg" else "; or set accel: tcg in "
                                   f"{lab.source.name} to run under TCG on purpose"),
                     required=False)
    if lab.accel == "tcg":              # KVM would work, but is not asked for
        return Check("accel", True, f"tcg, as {lab.source.name} asks (/dev/kvm opens)",
                     required=False)
    return _kvm_probe(lab) if probe else _kvm_cached(lab)


def _kvm_cached(lab: Lab) -> Check:
    """The verdict `uffdlab up` cached for this host kernel and QEMU."""
    cache = lab.cache_path / "accel.json"
    key = f"{os.uname().release}|{accel.qemu_version()}"   # as accel.choose keys it
    choice = accel._read_cache(cache, key)
    if choice is None:
        return Check("accel", True, "/dev/kvm opens; whether guests run under KVM is not "
                     "known yet: 'uffdlab doctor --kvm' or the first 'uffdlab up' boots a "
                     "kernel to find out", required=False)
    if choice.accel == "kvm":
        return Check("accel", True, f"KVM works: {choice.reason} (cached in {cache})")
    return Check("accel", True, f"TCG: {choice.reason} (cached in {cache}; delete it to "
                 "probe again at the next 'uffdlab up')", required=False)


def _kvm_probe(lab: Lab) -> Check:
    from .images import ImageStore
    store = ImageStore(lab)
    built = [img for img in map(store.image, lab.images) if img.built or img.spec.kernel.is_local]
    if not built:
        return Check("accel", True, "/dev/kvm opens; no image is built to probe KVM with "
                     "('uffdlab image build' first)", required=False)
    img = built[0]
    ok, why = accel.probe_kvm(img.vmlinuz, img.initrd)
    if ok:
        return Check("accel", True, f"KVM works ({why})")
    return Check("accel", True, f"KVM does not run guests here ({why}); "
                 "accel: auto falls back to TCG", required=False)
