# SPDX-License-Identifier: MIT
"""Which accelerator a guest really runs under.

/dev/kvm opening proves little: under nested virtualization QEMU may abort
setting MSRs, stop with "KVM internal error", or spin without the guest
printing a line. So `auto` boots the image's kernel under KVM for a few
seconds and takes KVM only if the kernel's first console line appears.
The verdict is cached per host kernel and QEMU version.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .images import is_bzimage
from .qemu import QEMU

PROBE_SECONDS = 8.0     # a KVM guest prints its banner in well under a second


@dataclass(frozen=True)
class AccelChoice:
    accel: str          # "kvm" or "tcg"
    reason: str
    fell_back: bool     # asked for auto, KVM was there but did not work
    unprobed: bool = False  # auto, but nothing was booted to decide (dry run)


@functools.cache
def qemu_version() -> str:
    """QEMU's version line (asked once per process: it is part of every
    template key and accel verdict, and a subprocess costs tens of ms)."""
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.splitlines()[0] if out else ""


def kvm_status() -> tuple[bool, str]:
    """(usable, why not): whether this user can open /dev/kvm."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, "missing"
    except OSError as e:
        return False, e.strerror or str(e)
    os.close(fd)
    return True, ""


def kvm_openable() -> bool:
    return kvm_status()[0]


# What QEMU says when KVM itself is the problem (not the kernel or the files).
_KVM_FAILURES = ("kvm", "msr", "internal error", "vmx", "svm")


def probe_kvm(vmlinuz: Path, initrd: Path | None = None,
              seconds: float = PROBE_SECONDS) -> tuple[bool, str]:
    """Boot `vmlinuz` under KVM; True only when the guest kernel prints."""
    ok, why, _ = _probe(vmlinuz, initrd, seconds)
    return ok, why


def _probe(vmlinuz: Path, initrd: Path | None, seconds: float) -> tuple[bool, str, bool]:
    """(works, why, conclusive)."""
    if not is_bzimage(vmlinuz):
        return False, f"{vmlinuz} is not a kernel image, so KVM was not probed", False
    with tempfile.TemporaryDirectory(prefix="uffdlab-kvm-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = [QEMU, "-accel", "kvm", "-cpu", "host", "-m", "256M", "-nodefaults",
                "-display", "none", "-no-reboot", "-kernel", str(vmlinuz),
                "-append", "console=ttyS0 panic=-1", "-serial", f"file:{serial}"]
        if initrd is not None:
            argv += ["-initrd", str(initrd)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                if serial.exists() and b"Linux version" in serial.read_bytes():
                    return True, "the guest kernel booted under KVM", True
                if proc.poll() is not None:
                    err = (proc.stderr.read() or "").strip().splitlines()
                    last = err[-1] if err else f"exit {proc.returncode}"
                    return (False, f"QEMU stopped under KVM: {last}",
                            any(w in "\n".join(err).lower() for w in _KVM_FAILURES))
                time.sleep(0.05)
            text = serial.read_bytes() if serial.exists() else b""
            if b"internal error" in text.lower():
                return False, "KVM internal error", True
            return False, f"the guest printed nothing under KVM in {seconds:.0f} s", True
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def choose(requested: str, vmlinuz: Path, initrd: Path | None,
           cache_file: Path | None, probe: bool = True) -> AccelChoice:
    """Resolve lab.yml's accel (auto|kvm|tcg) to what QEMU will use. With
    probe=False (a dry run) nothing is booted: an uncached auto shows KVM,
    the accel a real `up` would try first."""
    if requested == "tcg":
        return AccelChoice("tcg", "requested in lab.yml", False)
    if requested == "kvm":
        return AccelChoice("kvm", "requested in lab.yml", False)
    usable, why_not = kvm_status()
    if not usable:
        return AccelChoice("tcg", f"/dev/kvm: {why_not}", False)
    key = f"{os.uname().release}|{qemu_version()}"
    cached = _read_cache(cache_file, key)
    if cached is not None:
        return cached
    if not probe:
        return AccelChoice("kvm", "auto: KVM not probed yet; 'uffdlab up' boots the kernel "
                           "under KVM first and falls back to TCG if it does not run",
                           False, unprobed=True)
    ok, why, conclusive = _probe(vmlinuz, initrd, PROBE_SECONDS)
    choice = AccelChoice("kvm", why, False) if ok else AccelChoice(
        "tcg", f"KVM does not run guests here ({why}); using TCG", True)
    if conclusive:
        _write_cache(cache_file, key, choice)
    return choice


def _read_cache(path: Path | None, key: str) -> AccelChoice | None:
    try:
        data = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return None
    entry = data.get(key) if isinstance(data, dict) else None
    try:
        return AccelChoice(**entry) if entry else None
    except TypeError:
        return None


def _write_cache(path: Path | None, key: str, choice: AccelChoice) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = asdict(choice)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
