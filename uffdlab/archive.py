# SPDX-License-Identifier: MIT
"""A built image --export--> one self-describing tar --import--> the same
image in another lab's cache.

The archive is a plain tar, reproducible (members sorted, owner root,
mtime SOURCE_DATE_EPOCH or 0). Its first member, uffdlab-image.json, names
every other member with its size and SHA-256 and gives the image's content
hash (images.content_hash). Import streams each member into a scratch
directory while hashing it, and installs the image only when every member
is there, named, unchanged and the content hash matches: a tampered,
truncated or padded archive is refused with what is wrong and installs
nothing. The image carries no lab key (the guest reads the lab's key from
the kernel command line), so it boots in the importer's lab as it did in
the exporter's, with the same pinned host key. When the importer's lab.lock
locks an image of the archive's recipe at another content hash, import says
so (lock_mismatches), and with `locked` refuses.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

from .config import Lab
from .digest import file_digest
from .events import Emitter, Listener
from .images import CONTENT_FILES, ImageError, ImageStore, content_hash, locked_image
from .lock import lock_path, read_lock
from .model import Kind

FORMAT = "uffdlab-image/1"
DESCRIPTOR = "uffdlab-image.json"
CARRIED = (*CONTENT_FILES, "meta.json")      # build.log stays behind
REQUIRED = {"base.qcow2", "manifest.tsv", "meta.json", "ssh_host_ed25519_key.pub"}
MAX_DESCRIPTOR = 1 << 20


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def export_image(store: ImageStore, name: str, dest: Path,
                 listener: Listener | None = None) -> Path:
    """Write image `name` as one archive at `dest` (atomically)."""
    img = store.image(name)
    if not img.built:
        raise ImageError(f"image {name} is not built; 'uffdlab image build {name}' first")
    ev = Emitter(name, listener)
    files = {f: {"size": (img.dir / f).stat().st_size, "sha256": file_digest(img.dir / f)}
             for f in CARRIED if (img.dir / f).exists()}
    descriptor = {"format": FORMAT, "name": name, "key": img.key,
                  "content_hash": img.content_hash, "suite": img.spec.suite,
                  "kernel_release": img.meta["kernel_release"],
                  "lock": locked_image(img).model_dump(), "files": files}
    blob = (json.dumps(descriptor, indent=1, sort_keys=True) + "\n").encode()
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_member(DESCRIPTOR, len(blob), mtime), io.BytesIO(blob))
            for f in sorted(files):
                ev.emit(Kind.BUILDING, f"exporting {f} ({files[f]['size'] >> 20} MiB)")
                with open(img.dir / f, "rb") as src:
                    tar.addfile(_member(f, files[f]["size"], mtime), src)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    ev.emit(Kind.BUILDING, f"exported to {dest}: content {img.content_hash}",
            content_hash=img.content_hash)
    return dest


def lock_mismatches(lab: Lab, desc: dict) -> list[str]:
    """How the archive (its descriptor) differs from the lab's lab.lock: one
    line for each locked image of the archive's recipe whose content hash is
    another; none without a lock or an entry of that recipe."""
    lock = read_lock(lab.source)
    if lock is None:
        return []
    return [f"content {desc['content_hash']}, but {lock_path(lab.source).name} locks image "
            f"{name} (recipe {entry.recipe_key}) at content {entry.content_hash}"
            for name, entry in sorted(lock.images.items())
            if entry.recipe_key == desc["key"] and entry.content_hash != desc["content_hash"]]


def _check_lock(lab: Lab, desc: dict, locked: bool, ev: Emitter) -> None:
    """Refuse (locked) or warn about an archive that is not what lab.lock locks."""
    problems = lock_mismatches(lab, desc)
    if not locked:
        for p in problems:
            ev.emit(Kind.BUILDING, f"warning: {p}; runs on it are not the locked image's",
                    lock_mismatch=p)
        return
    lock = read_lock(lab.source)
    if lock is None or not any(e.recipe_key == desc["key"] for e in lock.images.values()):
        raise _Refused(f"--locked, but {lock_path(lab.source)} locks no image of recipe "
                       f"{desc['key']} ('uffdlab lock' writes one)")
    if problems:
        raise _Refused("--locked: " + "; ".join(problems))


def import_image(lab: Lab, archive: Path, force: bool = False,
                 listener: Listener | None = None, locked: bool = False) -> tuple[dict, Path]:
    """Verify `archive` and install its image into the lab's cache. Returns
    the descriptor and the installed directory. An image whose content is
    not what lab.lock locks for its recipe is said (an event), and refused
    with `locked`, as is one of a recipe the lock does not hold."""
    store = ImageStore(lab, listener)
    archive = Path(archive)
    ev = Emitter(archive.name, listener)
    store.root.mkdir(parents=True, exist_ok=True)
    scratch = store.root / f".import-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        desc = _unpack_verified(archive, scratch, ev)
        try:
            _check_lock(lab, desc, locked, ev)       # before anything is installed
        except _Refused as e:
            raise ImageError(f"{archive}: refused, nothing installed: {e}") from None
        dest = store.root / desc["key"]
        with open(store.root / f".{desc['key']}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)          # not while a build of it runs
            return _install(scratch, dest, desc, archive, force, ev)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _install(scratch: Path, dest: Path, desc: dict, archive: Path, force: bool,
             ev: Emitter) -> tuple[dict, Path]:
    """Move the verified image into place, unless the same one is there."""
    if (dest / "meta.json").exists():
        have = content_hash(dest)
        if have == desc["content_hash"]:
            ev.emit(Kind.BUILDING, f"image {desc['key']} is already in the cache")
            return desc, dest
        if not force:
            raise ImageError(f"{archive}: the cache holds another build of this recipe "
                             f"({desc['key']}, content {have}, the archive's is "
                             f"{desc['content_hash']}); --force replaces it")
        shutil.rmtree(dest)
    os.rename(scratch, dest)
    ev.emit(Kind.BUILDING, f"imported {desc['name']} ({desc['suite']}, kernel "
            f"{desc['kernel_release']}) as {desc['key']}, content {desc['content_hash']}")
    return desc, dest


class _Refused(ImageError):
    pass


def _unpack_verified(archive: Path, scratch: Path, ev: Emitter) -> dict:
    """Every member into `scratch`, each checked against the descriptor."""
    try:
        try:
            tar = tarfile.open(archive, "r:")
        except (OSError, tarfile.TarError) as e:
            raise _Refused(f"not an image archive ({e})") from None
        with tar:
            try:
                desc = _descriptor(tar)
                files, seen = desc["files"], set()
                while (member := tar.next()) is not None:   # after the descriptor
                    if member.name not in files or member.name in seen or not member.isfile():
                        raise _Refused(f"unexpected member {member.name!r} (not in "
                                       f"{DESCRIPTOR}, a duplicate, or not a regular file)")
                    _copy_checked(tar, member, files[member.name], scratch, ev)
                    seen.add(member.name)
            except (tarfile.TarError, EOFError, OSError) as e:
                raise _Refused(f"the archive is damaged or truncated ({e})") from None
        if seen != set(files):
            raise _Refused(f"missing {sorted(set(files) - seen)} (a truncated archive?)")
        if content_hash(scratch) != desc["content_hash"]:
            raise _Refused(f"content hash {content_hash(scratch)} is not the descriptor's "
                           f"{desc['content_hash']}")
        meta = json.loads((scratch / "meta.json").read_text())
        if (meta.get("key"), meta.get("content_hash")) != (desc["key"], desc["content_hash"]):
            raise _Refused("meta.json names another image than the descriptor")
        return desc
    except _Refused as e:
        raise ImageError(f"{archive}: refused, nothing installed: {e}") from None


def _descriptor(tar: tarfile.TarFile) -> dict:
    """The first member, checked to describe an image."""
    first = tar.next()
    if first is None or first.name != DESCRIPTOR or not first.isfile() \
            or first.size > MAX_DESCRIPTOR:
        raise _Refused(f"expected {DESCRIPTOR} as the first member, got "
                       f"{first.name if first else 'an empty archive'!r}")
    try:
        desc = json.loads(tar.extractfile(first).read())
        ok = desc.get("format") == FORMAT and isinstance(desc["files"], dict) and all(
            isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in desc["files"].values()) and all(
            isinstance(desc[k], str) for k in ("key", "content_hash", "name", "suite",
                                               "kernel_release"))
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise _Refused(f"{DESCRIPTOR} is not a {FORMAT} descriptor")
    files = desc["files"]
    if not set(files) <= set(CARRIED):
        raise _Refused(f"{DESCRIPTOR} names files an image does not have: "
                       f"{sorted(set(files) - set(CARRIED))}")
    if not REQUIRED <= set(files):
        raise _Refused(f"{DESCRIPTOR} lacks files every image has: "
                       f"{sorted(REQUIRED - set(files))}")
    if not desc["key"].isalnum():
        raise _Refused(f"key: expected a recipe hash, got {desc['key']!r}")
    return desc


def _copy_checked(tar: tarfile.TarFile, member: tarfile.TarInfo, want: dict,
                  scratch: Path, ev: Emitter) -> None:
    if member.size != want["size"]:
        raise _Refused(f"{member.name}: {member.size} bytes, the descriptor says "
                       f"{want['size']}")
    ev.emit(Kind.BUILDING, f"verifying {member.name} ({member.size >> 20} MiB)")
    h = hashlib.sha256()
    with tar.extractfile(member) as src, open(scratch / member.name, "wb") as out:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != want["sha256"]:
        raise _Refused(f"{member.name}: its SHA-256 is not the one it was exported with "
                       f"(the archive was changed)")
