# SPDX-License-Identifier: MIT
"""`uffdlab doctor`: can this machine run a lab, and how to fix it if not."""
from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass

from . import accel
from .config import Lab

PY_MODULES = ("pydantic", "yaml", "paramiko", "qemu.qmp", "ansible_runner", "papermill",
              "pandas", "matplotlib")
MIN_FREE_GB = 8


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def run_checks(lab: Lab | None) -> list[Check]:
    checks = [_tool("qemu-system-x86_64", "qemu-system-x86"), _tool("qemu-img", "qemu-utils"),
              _tool("mmdebstrap", "mmdebstrap"), _tool("mkfs.ext4", "e2fsprogs"),
              _tool("ssh-keygen", "openssh-client"), _python_modules()]
    if lab is not None:
        checks += [_disk(lab), _kvm(lab)]
    return checks


def _tool(cmd: str, package: str) -> Check:
    path = shutil.which(cmd)
    return Check(cmd, path is not None, path or "not found", f"apt-get install -y {package}")


def _python_modules() -> Check:
    missing = []
    for mod in PY_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    return Check("python dependencies", not missing,
                 "all importable" if not missing else "missing: " + ", ".join(missing),
                 "pip install -e . (inside the project venv)")


def _disk(lab: Lab) -> Check:
    path = lab.cache_path
    probe = path
    while not probe.exists():
        probe = probe.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    return Check("cache disk", free_gb >= MIN_FREE_GB, f"{free_gb:.0f} GB free at {path}",
                 f"free space or set cache_dir in {lab.source.name} (images need about "
                 f"1 GB each, plus overlays)")


def _kvm(lab: Lab) -> Check:
    from .images import ImageStore
    usable, why_not = accel.kvm_status()
    if not usable and why_not == "missing":
        return Check("accel", True, "/dev/kvm is missing: VMs will run under TCG "
                     "(slow, but every scenario works)", required=False)
    if not usable:
        return Check("accel", False, f"/dev/kvm exists but cannot be opened ({why_not}): "
                     "VMs will run under TCG, many times slower",
                     "add yourself to the kvm group (sudo usermod -aG kvm $USER), then log "
                     "in again; or set accel: tcg to silence this", required=False)
    store = ImageStore(lab)
    built = [img for img in map(store.image, lab.images) if img.built or img.spec.kernel.is_local]
    if not built:
        return Check("accel", True, "/dev/kvm opens; whether guests run under it is "
                     "checked at the first 'uffdlab up'", required=False)
    img = built[0]
    ok, why = accel.probe_kvm(img.vmlinuz, img.initrd)
    if ok:
        return Check("accel", True, f"KVM works ({why})")
    return Check("accel", True, f"KVM does not run guests here ({why}); "
                 "accel: auto falls back to TCG", required=False)
