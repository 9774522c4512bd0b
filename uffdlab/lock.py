# SPDX-License-Identifier: MIT
"""Built images + guest tools + this Python --uffdlab lock--> lab.lock, and
lab.lock + a fresh build --> the packages that drifted.

lab.lock sits next to lab.yml (`other.yml` has `other.lock`) and is meant to
be committed. It records what a result depends on that lab.yml does not pin:

* per image: the suite, the recipe key, the kernel release, the image's
  content hash and the exact version of every installed package;
* the guest tools' source digest;
* the lab's Python environment (every installed distribution's version);
* the SOURCE_DATE_EPOCH image builds run with (`source_date_epoch`).

Image builds read it: the locked versions are pinned for apt (a version
the mirror no longer has cannot be pinned), and the built image's packages
are compared with the lock, so what changed is named, from what to what.
`uffdlab lock --check` compares all of it with what is here now (check()).
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
# The SOURCE_DATE_EPOCH of builds whose lock records none (2024-01-01 00:00
# UTC): a fixed value, so two builds clamp timestamps alike. New locks record
# it; edit `source_date_epoch` in lab.lock to build with another.
DEFAULT_SOURCE_DATE_EPOCH = 1704067200


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
    source_date_epoch: int | None = Field(None, ge=0)

    def text(self) -> str:
        # exclude_none: a lock written before source_date_epoch existed keeps
        # its text, so the digest runs recorded still names it
        return json.dumps(self.model_dump(exclude_none=True), indent=1, sort_keys=True) + "\n"

    @property
    def build_epoch(self) -> int:
        """The SOURCE_DATE_EPOCH image builds run with."""
        return DEFAULT_SOURCE_DATE_EPOCH if self.source_date_epoch is None \
            else self.source_date_epoch

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


def check(lock: Lock, recipes: dict[str, str], built: dict[str, LockedImage],
          guest_tools: str, python: dict[str, str]) -> list[str]:
    """What differs between the lock and this lab now, one line each (none:
    nothing drifted). `recipes` maps each image of the lab file to its recipe
    key now, `built` the built ones to what the lock would record of them."""
    out = []
    for name in sorted(set(lock.images) | set(recipes)):
        locked, now, where = lock.images.get(name), built.get(name), f"image {name}"
        if name not in recipes:
            out.append(f"{where}: locked, but the lab file has no such image")
        elif locked is None:
            out.append(f"{where}: not in the lock ('uffdlab lock' adds it)")
        elif locked.recipe_key != recipes[name]:
            out.append(f"{where}: recipe {recipes[name]}, the lock's is {locked.recipe_key} "
                       f"(its entry under 'images' changed)")
        elif now is None:
            out.append(f"{where}: not built, nothing to compare ('uffdlab image build "
                       f"--locked {name}')")
        else:
            if now.kernel_release != locked.kernel_release:
                out.append(f"{where}: kernel: locked {locked.kernel_release}, built "
                           f"{now.kernel_release}")
            if now.content_hash != locked.content_hash:
                # even the same packages differ in content (a new host key):
                # the locked image itself comes by 'uffdlab image import'
                out.append(f"{where}: content: locked {locked.content_hash}, built "
                           f"{now.content_hash} (another build)")
            out += [f"{where}: package {d}" for d in drift(locked.packages, now.packages)]
    if guest_tools != lock.guest_tools:
        out.append(f"guest tools: locked {lock.guest_tools or '(none)'}, now {guest_tools}")
    for name in sorted(set(lock.python) | set(python)):
        was, now_v = lock.python.get(name), python.get(name)
        if was != now_v:
            out.append(f"python: {name}: " + (f"not locked, installed {now_v}" if was is None
                       else f"locked {was}, not installed now" if now_v is None
                       else f"{was} -> {now_v}"))
    return out
