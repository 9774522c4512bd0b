# SPDX-License-Identifier: MIT
"""A booted, provisioned VM saved once and restored in seconds.

A template is `<cache>/templates/<key>/`:

    disk.qcow2  the VM's overlay at the instant of the save, frozen: it is the
                backing file of every VM restored from the template (and is
                itself backed by the image's base.qcow2)
    state       RAM and device state, written by QMP `migrate` (`exec:`: QEMU
                7.2 has no `file:` URI)
    serial.log  the console up to the save: a restored VM's log starts with it
    meta.json   what the key was made of, the guest facts (uffd-probe, tools
                version), the state's size and SHA-256, the image build time

The key covers everything a saved machine depends on: the image, the
provisioning inputs, the guest-tools digest, the QEMU version and the QEMU
arguments that shape the machine (memory, cpus, machine type, accel, kernel
and its command line). A template is written in a scratch directory and
renamed into place, so it is whole or absent; a directory without the
marker is never read nor deleted.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .digest import file_digest
from .qmp import qmp

MARKER = ".uffdlab-template"
TEMPLATE_VERSION = 1
MIGRATE_SECONDS = 300          # a 64G guest under TCG still saves well within this


class TemplateError(Exception):
    pass


def key_of(inputs: dict) -> str:
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Template:
    """One template directory (it may not exist yet)."""

    key: str
    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    @property
    def exists(self) -> bool:
        return (self.dir / MARKER).is_file() and (self.dir / "meta.json").is_file()

    @property
    def meta(self) -> dict:
        return json.loads((self.dir / "meta.json").read_text())

    def problem(self, image_built_at: float | None) -> str | None:
        """Why this template cannot be restored, or None. Checked before
        QEMU loads anything: a truncated or altered state, a missing disk, an
        image rebuilt under the same key since the save."""
        try:
            meta = self.meta
        except (OSError, ValueError) as e:
            return f"unreadable meta.json ({e})"
        if meta.get("version") != TEMPLATE_VERSION:
            return f"made by template format {meta.get('version')}, not {TEMPLATE_VERSION}"
        if not self.disk.is_file():
            return "its disk is missing"
        try:
            size = self.state.stat().st_size
        except OSError:
            return "its state file is missing"
        if size != meta.get("state_bytes"):
            return (f"its state file has {size} bytes, {meta.get('state_bytes')} were "
                    f"saved (truncated?)")
        if image_built_at is not None and meta.get("image_built_at") != image_built_at:
            return "the image was rebuilt since the template was saved"
        # hashing a few hundred MiB costs a few tenths of a second: once per
        # state file, as long as nothing has rewritten it since
        stat = self.state.stat()
        seen = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
        stamp = self.dir / ".verified"
        if stamp.is_file() and stamp.read_text() == seen:
            return None
        if file_digest(self.state) != meta.get("state_sha256"):
            return "its state file does not match the checksum saved with it"
        stamp.write_text(seen)
        return None

    def remove(self) -> None:
        """Delete the template, only if the lab made it."""
        if (self.dir / MARKER).is_file():
            shutil.rmtree(self.dir, ignore_errors=True)


def all_templates(root: Path) -> list[Template]:
    if not root.is_dir():
        return []
    return [Template(d.name, d) for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and (d / MARKER).is_file()]


def save(tmpl: Template, qmp_socket: Path, overlay: Path, serial_log: Path, inputs: dict,
         facts: dict, image_built_at: float | None) -> float:
    """Save the running VM behind `qmp_socket` as `tmpl` and let it run on;
    returns the seconds the guest was paused. A concurrent save of the same
    key wins once; a failed save leaves nothing behind."""
    root = tmpl.dir.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{tmpl.key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tmpl.exists:
            return 0.0
        scratch = root / f".save-{tmpl.key}-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        paused = time.monotonic()
        try:
            (scratch / MARKER).write_text("")
            _migrate(qmp_socket, scratch / "state")
            # migration flushed and handed off the disk: copy it while paused
            subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(overlay),
                            str(scratch / "disk.qcow2")], check=True, capture_output=True)
            if serial_log.is_file():
                shutil.copyfile(serial_log, scratch / "serial.log")
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            _resume(qmp_socket)
            raise
        _resume(qmp_socket)
        paused = time.monotonic() - paused
        try:
            meta = {"version": TEMPLATE_VERSION, "key": tmpl.key, "inputs": inputs,
                    "facts": facts, "image_built_at": image_built_at,
                    "state_bytes": (scratch / "state").stat().st_size,
                    "state_sha256": file_digest(scratch / "state"),
                    "saved_at": time.time(), "paused_seconds": round(paused, 2)}
            (scratch / "meta.json").write_text(json.dumps(meta, indent=1))
            for p in scratch.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            scratch.rename(tmpl.dir)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return paused


def _migrate(qmp_socket: Path, dest: Path) -> None:
    qmp(qmp_socket, "stop", 10)
    qmp(qmp_socket, "migrate", 10, uri=f"exec:cat > {shlex.quote(str(dest))}")
    deadline = time.monotonic() + MIGRATE_SECONDS
    while True:
        info = qmp(qmp_socket, "query-migrate", 10)
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise TemplateError(f"saving the VM state failed: {info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            qmp(qmp_socket, "migrate_cancel", 10)
            raise TemplateError(f"saving the VM state took over {MIGRATE_SECONDS} s")
        time.sleep(0.05)


def _resume(qmp_socket: Path) -> None:
    """Let the saved VM run on (QMP `cont` takes its disk back after a
    completed migration)."""
    try:
        qmp(qmp_socket, "cont", 10)
    except Exception:                  # QEMU gone: the caller finds out on its own
        pass
