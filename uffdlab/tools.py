# SPDX-License-Identifier: MIT
"""The guest tools as the host sees them: their sources, a digest that says
when a guest (or a template) needs them rebuilt, a version for provenance,
and the reproducible tarball provisioning copies into the guest."""
from __future__ import annotations

import hashlib
import subprocess
import tarfile
from pathlib import Path

from .paths import GUEST_TOOLS, REPO

# Only sources travel to the guest; it builds them against its own headers.
SOURCE_GLOBS = ("Makefile", "README.md", "src/*.c", "src/*.h")


def tools_sources() -> list[Path]:
    return sorted(p for g in SOURCE_GLOBS for p in GUEST_TOOLS.glob(g))


def tools_digest() -> str:
    """Content hash of the guest tools' sources: changes mean re-provision."""
    h = hashlib.sha256()
    for p in tools_sources():
        h.update(str(p.relative_to(GUEST_TOOLS)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def tools_version() -> str:
    """git hash of guest-tools plus '-dirty' when its sources differ from HEAD."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
    commit = git("log", "-1", "--format=%h", "--", "guest-tools") or "untracked"
    dirty = git("status", "--porcelain", "--", "guest-tools/src", "guest-tools/Makefile")
    return f"{commit}-dirty" if dirty else commit


def sources_tarball(dest: Path, kernel_headers: Path | None = None) -> Path:
    """The tools' sources as a byte-for-byte reproducible tar: the same
    sources give the same checksum, so Ansible copies and builds only on
    change. `kernel_headers`, a tar of a tree-built kernel's UAPI headers
    (include/...), goes in as kernel-headers/, where the Makefile finds it."""
    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        return info

    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:
        for p in tools_sources():
            tar.add(p, arcname=str(p.relative_to(GUEST_TOOLS)), filter=normalize)
        if kernel_headers is not None:
            with tarfile.open(kernel_headers) as hdr:
                for info in hdr:
                    if not (info.isfile() or info.isdir()) or info.name.startswith("/") \
                            or ".." in info.name.split("/"):
                        continue            # headers_install makes only these
                    data = hdr.extractfile(info) if info.isfile() else None
                    info.name = f"kernel-headers/{info.name}"
                    tar.addfile(normalize(info), data)
    return dest
