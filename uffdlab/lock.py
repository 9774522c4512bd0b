# SPDX-License-Identifier: MIT
"""Built images + guest tools + this Python --uffdlab lock--> lab.lock, and
lab.lock + a fresh build --> the packages that drifted.

lab.lock sits next to lab.yml (`other.yml` has `other.lock`) and is meant to
be committed. It records what a result depends on that lab.yml does not pin:

* per image: the suite, the recipe key, the kernel release, the image's
  content hash and the exact version of every installed package;
* the guest tools' source digest;
* the lab's Python environment (every installed distribution's version).

Image builds read it: the locked versions are pinned for apt (a version
the mirror no longer has cannot be pinned), and the built image's packages
are compared with the lock, so what changed is named, from what to what.
The file is JSON with sorted keys, one package per line: diffs stay small.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

LOCK_VERSION = 1


class LockError(Exception):
    pass


class LockedImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    suite: str
    recipe_key: str
    kernel_release: str
    content_hash: str
    packages: dict[str, str]           # dpkg name (with :arch when not native) -> version


class Lock(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = LOCK_VERSION
    images: dict[str, LockedImage] = Field(default_factory=dict)
    guest_tools: str = ""
    python: dict[str, str] = Field(default_factory=dict)

    def text(self) -> str:
        return json.dumps(self.model_dump(), indent=1, sort_keys=True) + "\n"

    @property
    def digest(self) -> str:
        """What runs record: the same lock, the same digest."""
        return hashlib.sha256(self.text().encode()).hexdigest()[:16]

    def save(self, path: Path) -> Path:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(self.text())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Path) -> Lock:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise LockError(f"{path}: cannot read the lock: {e}") from None
        except json.JSONDecodeError as e:
            raise LockError(f"{path}:{e.lineno}: expected the JSON 'uffdlab lock' writes: "
                            f"{e.msg}") from None
        if isinstance(data, dict) and data.get("version") not in (None, LOCK_VERSION):
            raise LockError(f"{path}: version: expected {LOCK_VERSION}, got "
                            f"{data.get('version')!r} (written by another uffd-lab)")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(map(str, err["loc"])) or "(top)"
            raise LockError(f"{path}: {where}: {err['msg']}") from None


def lock_path(lab_source: Path) -> Path:
    """lab.yml -> lab.lock, next to it."""
    return lab_source.with_suffix(".lock")


def read_lock(lab_source: Path) -> Lock | None:
    """The lab's lock, or None when it has none."""
    path = lock_path(lab_source)
    return Lock.load(path) if path.exists() else None


def python_environment() -> dict[str, str]:
    """Every distribution installed in this Python, name -> version."""
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name and name not in out:            # the first on sys.path is imported
            out[name] = dist.version
    return dict(sorted(out.items()))


def read_manifest(path: Path) -> dict[str, str]:
    """An image's manifest.tsv (package TAB version) as a dict."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            name, _, version = line.partition("\t")
            out[name] = version
    return out


@dataclass(frozen=True)
class Drift:
    """One package whose built version is not the locked one."""

    package: str
    locked: str | None           # None: not in the lock (new)
    built: str | None            # None: no longer installed

    def __str__(self) -> str:
        if self.locked is None:
            return f"{self.package}: not locked, built {self.built}"
        if self.built is None:
            return f"{self.package}: locked {self.locked}, not installed now"
        return f"{self.package}: {self.locked} -> {self.built}"


def drift(locked: dict[str, str], built: dict[str, str]) -> list[Drift]:
    """Every package whose version differs between the lock and a build."""
    return [Drift(p, locked.get(p), built.get(p)) for p in sorted(set(locked) | set(built))
            if locked.get(p) != built.get(p)]


def apt_pins(packages: dict[str, str]) -> str:
    """An apt preferences file that pins each package to its locked version
    (apt ignores a pin to a version no source has; drift() then names it)."""
    stanzas = [f"Package: {name}\nPin: version {version}\nPin-Priority: 1001\n"
               for name, version in sorted(packages.items())]
    return "\n".join(stanzas)
