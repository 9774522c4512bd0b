# SPDX-License-Identifier: MIT
"""lab.yml image recipe --mmdebstrap + Debian kernel--> cached base image.

An image lives in `<cache>/images/<key>/`, where the key is a hash of the
recipe: base.qcow2, vmlinuz, initrd.img, the pinned SSH host key and
meta.json. Building an unchanged recipe is a lookup. A build happens in a
scratch directory renamed into place at the end, so a failed or interrupted
build leaves nothing half-made in the cache. The build's log (mmdebstrap's
output) stays in the image directory as build.log; a failed build's log is
moved to `<cache>/images/failed-<image>-<time>.log`, which its error names
(the last KEEP_FAILED_LOGS per image are kept).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, ImageSpec, Lab, check_cache_dir, format_size
from .digest import file_digest
from .events import Emitter, Listener
from .keys import LabKeys
from .lock import (
    DEFAULT_SOURCE_DATE_EPOCH,
    Lock,
    LockedImage,
    apt_pins,
    drift,
    lock_path,
    python_environment,
    read_lock,
    read_manifest,
)
from .model import Kind
from .paths import IMAGES as IMAGES_DIR
from .tools import tools_digest

CUSTOMIZE = IMAGES_DIR / "customize.sh"
# Bump when the way images are built changes, so caches rebuild.
# 2: the lab's SSH key comes on the kernel command line, not baked in.
RECIPE_VERSION = 2
# The files whose content is the image: content_hash() covers them all.
CONTENT_FILES = ("base.qcow2", "vmlinuz", "initrd.img", "ssh_host_ed25519_key.pub",
                 "manifest.tsv")
BASE_PACKAGES = ("systemd-sysv", "udev", "kmod", "procps", "iproute2",
                 "openssh-server", "python3", "gcc", "make", "libc6-dev",
                 "linux-libc-dev", "initramfs-tools")
# Documentation and translations are the bulk of a rootfs and unused here.
DPKG_OPTS = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/doc/*",
             "path-include=/usr/share/doc/*/copyright",
             "path-exclude=/usr/share/locale/*")


class ImageError(Exception):
    pass


# A failed build's log is kept as <cache>/images/failed-<image>-<time>.log;
# this many per image, the older ones (of that naming only) deleted.
KEEP_FAILED_LOGS = 3
_STAMP = "%Y%m%d-%H%M%S"


@dataclass(frozen=True)
class Image:
    """A built (or buildable) image and what boots it."""

    name: str
    spec: ImageSpec
    key: str
    dir: Path
    vmlinuz: Path
    initrd: Path | None
    kernel_cmdline: str

    @property
    def base(self) -> Path:
        return self.dir / "base.qcow2"

    @property
    def built(self) -> bool:
        return (self.dir / "meta.json").is_file()

    @property
    def meta(self) -> dict:
        return json.loads((self.dir / "meta.json").read_text())

    @property
    def host_pubkey(self) -> str:
        """'ssh-ed25519 AAAA...' baked into the image at build time."""
        return " ".join((self.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2])

    @property
    def packages(self) -> dict[str, str]:
        """Every installed package and its version (manifest.tsv)."""
        return read_manifest(self.dir / "manifest.tsv")

    @property
    def content_hash(self) -> str:
        return self.meta.get("content_hash") or content_hash(self.dir)

    @property
    def kernel_release(self) -> str:
        if self.spec.kernel.is_local:
            return bzimage_release(self.vmlinuz) or (
                "not built" if self.spec.kernel.is_tree else "unknown")
        return self.meta["kernel_release"]


def is_bzimage(path: Path) -> bool:
    """Whether the file carries the x86 boot protocol's header magic."""
    try:
        with open(path, "rb") as f:
            f.seek(0x202)
            return f.read(4) == b"HdrS"
    except OSError:
        return False


def bzimage_release(path: Path) -> str | None:
    """The release string a bzImage carries in its setup header."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x4000)
            if head[0x202:0x206] != b"HdrS":
                return None
            (offset,) = struct.unpack_from("<H", head, 0x20E)
            f.seek(offset + 0x200)
            text = f.read(256).split(b"\0")[0].decode(errors="replace")
    except (OSError, struct.error):
        return None
    return text.split(" ")[0] or None


def recipe(spec: ImageSpec) -> dict:
    """Everything that decides the rootfs's content. A local kernel does not
    change the rootfs: it boots the packaged image's disk. Neither does the
    lab's SSH key (the guest reads it from the kernel command line), so an
    image can be carried to another lab (`uffdlab image export`)."""
    return {
        "version": RECIPE_VERSION,
        "suite": spec.suite,
        "kernel_package": spec.kernel.package_name or "linux-image-cloud-amd64",
        "packages": sorted(set(BASE_PACKAGES) | set(spec.packages)),
        "disk_size": spec.disk_size,
        "dpkg_opts": list(DPKG_OPTS),
        "customize_sha256": hashlib.sha256(CUSTOMIZE.read_bytes()).hexdigest(),
    }


def recipe_key(rec: dict) -> str:
    blob = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# mmdebstrap runs a hook as `env MMDEBSTRAP_... sh -c HOOK exec ROOT`, so the
# caller's environment reaches it: paths travel as variables, so the hook text is a constant
# and no path is ever parsed by a shell.
CUSTOMIZE_HOOK = ('sh "$UFFDLAB_CUSTOMIZE" "$1" "$UFFDLAB_OUT" "$UFFDLAB_HOSTKEY" '
                  '"$UFFDLAB_DISK_SIZE"')
# With a lab.lock, its versions are pinned for apt before anything is installed.
PIN_HOOK = ('mkdir -p "$1/etc/apt/preferences.d" && '
            'cp "$UFFDLAB_PINS" "$1/etc/apt/preferences.d/uffdlab-lock"')


def mmdebstrap_env(rec: dict, out: Path, hostkey: Path, pins: Path | None = None,
                   source_date_epoch: int | None = None) -> dict[str, str]:
    """The variables the hooks read, to add to mmdebstrap's environment.
    With `source_date_epoch`, SOURCE_DATE_EPOCH too: mmdebstrap, and the
    tools it and the hooks run that honour the convention, clamp the
    timestamps they write to it. It is not part of the recipe: the same
    recipe built at another epoch installs the same packages."""
    env = {"UFFDLAB_CUSTOMIZE": str(CUSTOMIZE), "UFFDLAB_OUT": str(out),
           "UFFDLAB_HOSTKEY": str(hostkey),
           "UFFDLAB_DISK_SIZE": f'{int(rec["disk_size"]) // (1 << 20)}M'}
    if pins is not None:
        env["UFFDLAB_PINS"] = str(pins)
    if source_date_epoch is not None:
        env["SOURCE_DATE_EPOCH"] = str(source_date_epoch)
    return env


def mmdebstrap_argv(rec: dict, pinned: bool = False) -> list[str]:
    """The whole build is one mmdebstrap call; no mirror is named, so it uses
    Debian's default. Run it with mmdebstrap_env() added to the environment."""
    argv = ["mmdebstrap", "--variant=apt", "--mode=auto", "--format=null",
            "--include=" + ",".join(rec["packages"] + [rec["kernel_package"]])]
    argv += [f"--dpkgopt={o}" for o in rec["dpkg_opts"]]
    if pinned:
        argv.append(f"--setup-hook={PIN_HOOK}")
    argv += [f"--customize-hook={CUSTOMIZE_HOOK}", rec["suite"], "/dev/null"]
    return argv


def content_hash(directory: Path) -> str:
    """The image's identity: a hash over its CONTENT_FILES (names and
    contents). Two caches holding the same image agree on it."""
    h = hashlib.sha256()
    for name in CONTENT_FILES:
        path = directory / name
        if path.exists():
            h.update(f"{name}\0{file_digest(path)}\n".encode())
    return h.hexdigest()[:32]



class ImageStore:
    """The cache of built images for one lab."""

    def __init__(self, lab: Lab, listener: Listener | None = None):
        self.lab = lab
        check_cache_dir(lab)               # a clear error before anything writes there
        self.root = lab.cache_path / "images"
        self.keys = LabKeys(lab.cache_path / "keys")
        self.listener = listener

    def image(self, name: str) -> Image:
        spec = self.lab.image_spec(name)
        key = recipe_key(recipe(spec))
        d = self.root / key
        if spec.kernel.is_tree:                  # built on demand: see build()
            from .kernel import KernelStore
            vmlinuz, initrd = KernelStore(self.lab).current(name).bzimage, None
        elif spec.kernel.is_local:
            vmlinuz = self.lab.kernel_path(spec.kernel.vmlinuz)
            initrd = self.lab.kernel_path(spec.kernel.initrd) if spec.kernel.initrd else None
            for field, p in (("vmlinuz", vmlinuz), ("initrd", initrd)):
                if p is not None and not p.is_file():
                    raise ConfigError([self.lab.problem(
                        ("images", name, "kernel", field), f"expected an existing file, "
                        f"got '{p}'")])
            if not is_bzimage(vmlinuz):
                raise ConfigError([self.lab.problem(
                    ("images", name, "kernel", "vmlinuz"),
                    f"expected an x86 bzImage (arch/x86/boot/bzImage: no 'HdrS' "
                    f"at offset 0x202), got '{vmlinuz}'")])
        else:
            vmlinuz, initrd = d / "vmlinuz", d / "initrd.img"
        return Image(name, spec, key, d, vmlinuz, initrd, spec.kernel.cmdline)

    def build(self, name: str, force: bool = False, locked: bool = False) -> Image:
        """Build the image unless an identical recipe is already cached, and
        the kernel of a tree unless its sources and config are. With a
        lab.lock, its versions are pinned and what drifted is reported;
        `locked` makes drift an error that caches nothing."""
        img = self._build_rootfs(name, force, locked)
        if img.spec.kernel.is_tree:
            from .kernel import KernelStore
            KernelStore(self.lab, self.listener).build(name, force)
        return img

    def _epoch(self) -> int:
        """SOURCE_DATE_EPOCH for a build: lab.lock's, else the fixed default
        (which a lock written by this build then records)."""
        lock = read_lock(self.lab.source)
        return lock.build_epoch if lock else DEFAULT_SOURCE_DATE_EPOCH

    def _pins(self, name: str) -> dict[str, str] | None:
        """The package versions lab.lock holds for this image, if any."""
        lock = read_lock(self.lab.source)
        entry = lock.images.get(name) if lock else None
        return entry.packages if entry else None

    def _fits(self, img: Image, pins: dict[str, str] | None, locked: bool) -> bool:
        """Whether the cached image is what the lock asks for: its packages,
        or (not `locked`) the closest build to them, one built against
        exactly these pins."""
        if pins is None or img.packages == pins:
            return True
        return not locked and img.meta.get("pins") == _pins_digest(pins)

    def _build_rootfs(self, name: str, force: bool, locked: bool) -> Image:
        img = self.image(name)
        ev = Emitter(name, self.listener)
        pins = self._pins(name)
        if locked and pins is None:
            raise ImageError(f"image {name}: --locked, but {lock_path(self.lab.source)} has "
                             f"no entry for it ('uffdlab lock' writes one)")
        if img.built and not force and self._fits(img, pins, locked):
            return img
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{img.key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)      # a concurrent builder finishes first
            if not (img.built and not force and self._fits(img, pins, locked)):
                self._build_locked(img, ev, pins, locked)
        self._record_in_lock(img)
        return img

    def _record_in_lock(self, img: Image) -> None:
        """A build without a lock writes one; a lock without this image gains it."""
        path = lock_path(self.lab.source)
        lock = read_lock(self.lab.source) or Lock(guest_tools=tools_digest(),
                                                  python=python_environment())
        if img.name not in lock.images:
            lock.images[img.name] = locked_image(img)
            # the epoch its builds ran with (a lock from before it records none)
            lock.source_date_epoch = lock.build_epoch
            lock.save(path)

    def _build_locked(self, img: Image, ev: Emitter, pins: dict[str, str] | None,
                      locked: bool) -> None:
        rec = recipe(img.spec)
        scratch = self.root / f".build-{img.key}-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        log = scratch / "build.log"         # kept in the image dir, or as failed-*.log
        started = time.monotonic()
        try:
            log.write_text(f"uffdlab: building image {img.name} (recipe {img.key}) at "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n")
            hostkey = scratch / "ssh_host_ed25519_key"
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                  f"uffdlab-{img.name}", "-f", str(hostkey)], "ssh-keygen")
            pin_file = None
            if pins is not None:
                pin_file = scratch / "apt-pins"
                pin_file.write_text(apt_pins(pins))
            argv = mmdebstrap_argv(rec, pinned=pin_file is not None)
            epoch = self._epoch()
            env = {**os.environ, **mmdebstrap_env(rec, scratch, hostkey, pin_file, epoch)}
            ev.emit(Kind.BUILDING, f"mmdebstrap {rec['suite']} with {rec['kernel_package']}"
                    + (f", {len(pins)} package versions pinned by lab.lock" if pins else ""))
            self._mmdebstrap(argv, log, ev, env)
            if pin_file is not None:
                pin_file.unlink()
            drifted = drift(pins, read_manifest(scratch / "manifest.tsv")) if pins else []
            if drifted and locked:
                raise ImageError(f"image {img.name}: {len(drifted)} packages differ from "
                                 f"{lock_path(self.lab.source).name} (--locked):\n  "
                                 + "\n  ".join(map(str, drifted)))
            if drifted:
                ev.emit(Kind.BUILDING, f"{len(drifted)} packages drifted from "
                        f"{lock_path(self.lab.source).name}: "
                        + "; ".join(map(str, drifted[:10]))
                        + (" ..." if len(drifted) > 10 else ""),
                        drift=[str(d) for d in drifted])
            ev.emit(Kind.BUILDING, "converting to qcow2")
            _run(["qemu-img", "convert", "-O", "qcow2", str(scratch / "rootfs.raw"),
                  str(scratch / "base.qcow2")], "qemu-img convert")
            (scratch / "rootfs.raw").unlink()
            hostkey.unlink()                      # the guest keeps the only copy
            meta = {
                "name": img.name, "key": img.key, "recipe": rec,
                "suite": rec["suite"], "kernel_package": rec["kernel_package"],
                "kernel_release": (scratch / "kernel-release").read_text().strip(),
                "linux_libc_dev": _read(scratch / "linux-libc-dev-version"),
                "content_hash": content_hash(scratch),
                "pins": _pins_digest(pins) if pins is not None else None,
                "drift": [str(d) for d in drifted],
                "source_date_epoch": epoch,
                "built_at": time.time(),
                "build_seconds": round(time.monotonic() - started, 1),
            }
            meta["size"] = sum(p.stat().st_size for p in scratch.iterdir())
            (scratch / "meta.json").write_text(json.dumps(meta, indent=2))
            if img.dir.exists():                  # --force: replace the old one
                shutil.rmtree(img.dir)
            scratch.rename(img.dir)
        except BaseException as e:
            kept = self._keep_failed_log(img.name, log, e)
            shutil.rmtree(scratch, ignore_errors=True)
            if not isinstance(e, Exception):     # interrupted: the log is kept all the same
                raise
            what = str(e) if isinstance(e, ImageError) else (
                f"image {img.name}: build failed: {type(e).__name__}: {e}")
            raise ImageError(f"{what}\n{kept}") from e
        ev.emit(Kind.BUILDING, f"done in {meta['build_seconds']} s, kernel "
                f"{meta['kernel_release']}, {format_size_mb(meta['size'])}",
                seconds=meta["build_seconds"])

    def _mmdebstrap(self, argv: list[str], log: Path, ev: Emitter,
                    env: dict[str, str] | None = None) -> None:
        if shutil.which("mmdebstrap") is None:
            raise ImageError("mmdebstrap is not installed (apt-get install mmdebstrap); "
                             "run 'uffdlab doctor'")
        # Appended to the build's log, line-buffered so our copy of stderr
        # and mmdebstrap's stdout stay in order.
        with open(log, "a", buffering=1) as logf:
            logf.write("$ " + " ".join(argv) + "\n")
            logf.flush()
            proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.PIPE, text=True,
                                    env=env)
            try:
                tail: list[str] = []
                for line in proc.stderr:
                    logf.write(line)
                    tail = (tail + [line.rstrip()])[-30:]
                    if line.startswith("I: "):   # mmdebstrap's own step messages
                        ev.emit(Kind.BUILDING, line[3:].strip())
                proc.wait()
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
        if proc.returncode != 0:
            raise ImageError(f"mmdebstrap failed (exit {proc.returncode}); last lines:\n"
                             + "\n".join(tail))

    def _keep_failed_log(self, name: str, log: Path, error: BaseException) -> str:
        """Move a failed build's log out of the scratch directory (which
        goes) to failed-<name>-<time>.log, the error at its end; prune the
        image's older ones. Returns the line that says where it is."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        try:
            with open(log, "a") as f:
                f.write(f"uffdlab: build failed: {type(error).__name__}: {error}\n")
            stamp = time.strftime(_STAMP)
            dest = self.root / f"failed-{safe}-{stamp}.log"
            n = 1
            while dest.exists():               # two failures in one second
                n += 1
                dest = self.root / f"failed-{safe}-{stamp}-{n}.log"
            os.replace(log, dest)
        except OSError as e:
            return f"(the build log could not be kept: {e})"
        try:
            self._prune_failed_logs(safe)
        except OSError:
            pass                                # old logs stay; this one is kept
        return f"full build log: {dest}"

    def _prune_failed_logs(self, safe: str) -> None:
        pattern = re.compile(rf"failed-{re.escape(safe)}-(\d{{8}}-\d{{6}})(?:-(\d+))?\.log")
        found = []
        for p in self.root.iterdir():
            m = pattern.fullmatch(p.name)
            if m:                               # not another image's: the name ends here
                found.append(((m[1], int(m[2] or 1)), p))
        for _, p in sorted(found)[:-KEEP_FAILED_LOGS]:
            p.unlink(missing_ok=True)

    def list(self) -> list[dict]:
        """Every lab image with whether it is built, and its facts if so."""
        rows = []
        for name in self.lab.images:
            img = self.image(name)
            row = {"name": name, "suite": img.spec.suite, "key": img.key,
                   "built": img.built, "kernel": "", "size": ""}
            if img.built:
                row["kernel"] = img.kernel_release
                row["size"] = format_size_mb(img.meta["size"])
            elif img.spec.kernel.is_local:
                row["kernel"] = img.kernel_release
            if img.spec.kernel.is_local:
                row["kernel"] += " (tree)" if img.spec.kernel.is_tree else " (local)"
            rows.append(row)
        return rows


def format_size_mb(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.0f} MiB" if nbytes < (1 << 30) else format_size(nbytes)


def _pins_digest(pins: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(pins, sort_keys=True).encode()).hexdigest()[:16]


def locked_image(img: Image) -> LockedImage:
    """What lab.lock keeps of a built image."""
    meta = img.meta
    return LockedImage(suite=img.spec.suite, recipe_key=img.key,
                       kernel_release=meta["kernel_release"],
                       content_hash=meta.get("content_hash") or content_hash(img.dir),
                       packages=img.packages)


def _read(p: Path) -> str:
    return p.read_text().strip() if p.exists() else ""


def _run(argv: list[str], what: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise ImageError(f"{what} failed (exit {r.returncode}): {r.stderr.strip()}")
