"""Which accelerator a guest really runs under.

/dev/kvm opening proves little: under nested virtualization QEMU may abort
setting MSRs, stop with "KVM internal error", or spin without the guest
printing a line. So `auto` boots the image's kernel under KVM for a few
seconds and takes KVM only if the kernel's first console line appears.
The verdict is cached per host kernel and QEMU version.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .qemu import QEMU

PROBE_SECONDS = 8.0     # a KVM guest prints its banner in well under a second


@dataclass(frozen=True)
class AccelChoice:
    accel: str          # "kvm" or "tcg"
    reason: str
    fell_back: bool     # asked for auto, KVM was there but did not work


def qemu_version() -> str:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.splitlines()[0] if out else ""


def kvm_openable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def probe_kvm(vmlinuz: Path, initrd: Path | None = None,
              seconds: float = PROBE_SECONDS) -> tuple[bool, str]:
    """Boot `vmlinuz` under KVM; True only when the guest kernel prints."""
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
                    return True, "the guest kernel booted under KVM"
                if proc.poll() is not None:
                    err = (proc.stderr.read() or "").strip().splitlines()
                    return False, "QEMU stopped under KVM: " + (err[-1] if err else
                                                               f"exit {proc.returncode}")
                time.sleep(0.05)
            text = serial.read_bytes() if serial.exists() else b""
            if b"internal error" in text.lower():
                return False, "KVM internal error"
            return False, f"the guest printed nothing under KVM in {seconds:.0f} s"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def choose(requested: str, vmlinuz: Path, initrd: Path | None,
           cache_file: Path | None) -> AccelChoice:
    """Resolve lab.yml's accel (auto|kvm|tcg) to what QEMU will use."""
    if requested == "tcg":
        return AccelChoice("tcg", "requested in lab.yml", False)
    if requested == "kvm":
        return AccelChoice("kvm", "requested in lab.yml", False)
    if not kvm_openable():
        return AccelChoice("tcg", "/dev/kvm is missing or not accessible", False)
    key = f"{os.uname().release}|{qemu_version()}"
    cached = _read_cache(cache_file, key)
    if cached is not None:
        return cached
    ok, why = probe_kvm(vmlinuz, initrd)
    choice = AccelChoice("kvm", why, False) if ok else AccelChoice(
        "tcg", f"KVM does not run guests here ({why}); using TCG", True)
    _write_cache(cache_file, key, choice)
    return choice


def _read_cache(path: Path | None, key: str) -> AccelChoice | None:
    try:
        data = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return None
    entry = data.get(key)
    return AccelChoice(**entry) if entry else None


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
