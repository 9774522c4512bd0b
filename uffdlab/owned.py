# SPDX-License-Identifier: MIT
"""What the lab may touch: directories it marked, files it names, processes
it started.

Everything the lab deletes or signals it must be able to prove it created:

* a VM directory carries a marker file written when the lab made it, and
  only the file names in `VM_FILES` are ever deleted from it;
* a process is recorded with its start time (field 22 of /proc/PID/stat)
  and a string its command line must contain; a PID that was reused after a
  reboot or by another program matches neither, so it is never signalled.
  Signals go through a pidfd opened before the check, so the process cannot
  be replaced between the check and the signal.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MARKER = ".uffdlab-vm"
# Every file a VM directory may hold; nothing else in it is ever deleted.
VM_FILES = (MARKER, "state.json", "state.tmp", "launch.json", "overlay.qcow2", "qmp.sock",
            "serial.log", "qemu.log", "keeper.log", "keeper.json", "known_hosts",
            "provision.lock")


class NotOursError(Exception):
    """A path or process the lab did not create, so it will not touch it."""


# -- directories ----------------------------------------------------------------

def make_vm_dir(d: Path, lab: str) -> None:
    """Create a VM directory and mark it as the lab's. An existing directory
    must already carry the marker: the lab never adopts a foreign one."""
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        d.mkdir()
    except FileExistsError:
        if not is_vm_dir(d):
            raise NotOursError(f"{d} exists but was not made by uffdlab (no {MARKER} "
                               f"marker); move it away or choose another cache_dir") from None
        return
    tmp = d / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"lab": lab, "created": time.time(), "pid": os.getpid()}))
    os.replace(tmp, d / MARKER)


def is_vm_dir(d: Path) -> bool:
    return d.is_dir() and not d.is_symlink() and (d / MARKER).is_file()


def remove_vm_dir(d: Path, keep_serial_as: Path | None = None) -> None:
    """Delete the lab's own files of a stopped VM, then the directory if it
    is empty. A directory without the marker is left exactly as it is."""
    if not is_vm_dir(d):
        return
    serial = d / "serial.log"
    if keep_serial_as is not None and serial.is_file():
        os.replace(serial, keep_serial_as)
    for name in VM_FILES:
        if name != MARKER:
            _unlink(d / name)
    _unlink(d / MARKER)               # last: a half-removed directory stays ours
    try:
        d.rmdir()
    except OSError:
        pass                          # something else lives there: not ours to delete


def _unlink(p: Path) -> None:
    try:
        if not p.is_dir() or p.is_symlink():
            p.unlink()
    except FileNotFoundError:
        pass


# -- processes ------------------------------------------------------------------

def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is the state (field 3); the start time is field 22
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class ProcessId:
    """One process the lab started: its PID, when it started, and a string
    (a path in the VM's directory) that its command line carries."""

    pid: int
    start: int
    tag: str

    @classmethod
    def of(cls, pid: int, tag: str) -> ProcessId:
        """Record a process the caller has just started."""
        return cls(pid, start_time(pid) or 0, tag)

    def to_dict(self) -> dict:
        return {"pid": self.pid, "start": self.start, "tag": self.tag}

    @classmethod
    def from_dict(cls, d: dict | None) -> ProcessId | None:
        try:
            return cls(int(d["pid"]), int(d["start"]), str(d["tag"]))
        except (TypeError, KeyError, ValueError):
            return None

    def alive(self) -> bool:
        """True only for this very process, still running."""
        if self.pid <= 0 or self.start <= 0:
            return False
        return start_time(self.pid) == self.start and self.tag in _cmdline(self.pid)

    def signal(self, sig: int) -> bool:
        """Send `sig` if this is still the process the lab started; False if
        it is gone or the PID now belongs to something else."""
        try:
            fd = os.pidfd_open(self.pid)
        except (ProcessLookupError, OSError):
            return False
        try:
            if not self.alive():
                return False
            signal.pidfd_send_signal(fd, sig)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(fd)

    def kill(self) -> bool:
        return self.signal(signal.SIGKILL)


# -- scratch directories of a process -----------------------------------------

def process_scratch(prefix: str, root: Path | None = None) -> tempfile.TemporaryDirectory:
    """A temporary directory whose name carries this process's PID and start
    time, so that reap_scratch() can remove it if the process is killed
    before it removes the directory itself."""
    me = ProcessId.of(os.getpid(), "")
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{me.pid}.{me.start}-",
                                       dir=str(root) if root is not None else None)


def reap_scratch(prefix: str, root: Path | None = None) -> list[Path]:
    """Remove the scratch directories (process_scratch's) of processes that
    are gone; a name that does not parse is not the lab's and stays."""
    gone = []
    base = Path(root) if root is not None else Path(tempfile.gettempdir())
    for d in base.glob(f"{prefix}*"):
        m = re.fullmatch(re.escape(prefix) + r"(\d+)\.(\d+)-\w+", d.name)
        if m and d.is_dir() and not d.is_symlink() \
                and not ProcessId(int(m[1]), int(m[2]), "").alive():
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone
