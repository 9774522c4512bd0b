# SPDX-License-Identifier: MIT
"""lab.yml kernel tree + config fragments --make O=--> cached bzImage, .config
and UAPI headers.

Everything for one tree lives in `<cache>/kernels/<tree dir name>-<hash of
its path>/`:

* `build-<config hash>/`: the `O=` directory, one per config recipe (base,
  fragments, make arguments). It persists, so after a change to one file in
  `mm/` make rebuilds only what depends on it.
* `out/<key>/`: a finished build (bzImage, config, headers.tar, build.log,
  meta.json). The key hashes the source state, the config recipe, the
  compiler's and the linker's version lines and the build variables make
  reads from the environment (BUILD_ENV); the merged config follows from
  those. A finished build is a directory renamed into place, so a failed or
  interrupted build caches nothing. A build whose key is there already is a
  no-op: make does not run at all.

The source state of a git checkout is HEAD plus a hash of `git diff HEAD`
and of the untracked sources; of any other tree, a hash of every file's
content (with a stat cache, as git's index keeps one, so an unchanged tree
is hashed in well under a second).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, KernelSpec, Lab, check_cache_dir
from .digest import file_digest
from .events import Emitter, Listener
from .model import Kind
from .paths import IMAGES as IMAGES_DIR

LOCAL_CONFIG = IMAGES_DIR / "local-kernel.config"
SMALL_CONFIG = IMAGES_DIR / "kernel-small.config"
BASE_TARGETS = {"defconfig": "x86_64_defconfig", "small": "tinyconfig"}
# Compile units a first build of each base makes, for progress before this
# build directory has a count of its own (measured on linux 6.12).
UNIT_ESTIMATE = {"defconfig": 2900, "small": 1150}
KEEP_BUILDS = 3                  # finished builds kept per tree, newest first
KEEP_FAILED_LOGS = 3             # failed-<image>-<time>.log kept per image
SHOWN_LINES = 10                 # of a failed config or headers step's output
# Environment variables make reads that change the kernel it builds while
# lab.yml stays as it is (Documentation/kbuild/kbuild.rst, llvm.rst): part of
# the cache key when set, unless a make_args assignment of the same name
# overrides them. kbuild's Makefile sets CC, LD and HOSTCC itself, so the
# environment's reach a build only under `make -e`; they count all the same
# (at worst make runs and finds nothing to redo).
BUILD_ENV = ("KCFLAGS", "KCPPFLAGS", "KAFLAGS", "KRUSTFLAGS", "CFLAGS_KERNEL",
             "AFLAGS_KERNEL", "RUSTFLAGS_KERNEL", "LLVM", "LLVM_IAS", "CROSS_COMPILE",
             "CC", "LD", "HOSTCC")

# Options the lab needs, and what breaks without each. Checked after
# olddefconfig: a fragment can ask for an option whose dependencies are off.
NEEDED_OPTIONS = {
    "USERFAULTFD": "no userfaultfd(2): uffd-probe and every scenario fail",
    "HAVE_ARCH_USERFAULTFD_WP": "no UFFDIO_REGISTER_MODE_WP: no uffd-wp scenario runs",
    "PTE_MARKER_UFFD_WP": "uffd-wp on shmem does not survive zaps",
    "SHMEM": "no shared memory: the memfd and shmem backings fail",
    "TMPFS": "no tmpfs: /dev/shm and the shmem backing fail",
    "MEMFD_CREATE": "no memfd_create(2): the memfd backing fails",
    "HUGETLBFS": "no hugetlbfs: the hugetlbfs backing fails",
    "PROC_PAGE_MONITOR": "no /proc/PID/pagemap: the async-scan scenario fails",
    "ADVISE_SYSCALLS": "no madvise(2): the zap scenarios fail",
    "MULTIUSER": "no users or groups: systemd and sshd do not start",
    "VIRTIO_PCI": "no virtio devices: the root disk and the network are missing",
    "VIRTIO_BLK": "no virtio disk: the kernel cannot find its root device",
    "EXT4_FS": "no ext4: the root file system cannot be mounted",
    "VIRTIO_NET": "no virtio network card: SSH never answers",
    "INET": "no IPv4: SSH never answers",
    "UNIX": "no Unix sockets: systemd does not start",
    "DEVTMPFS": "no devtmpfs: /dev is empty without an initrd",
    "SERIAL_8250_CONSOLE": "no serial console: a failed boot shows nothing",
}


class KernelError(Exception):
    pass


@dataclass(frozen=True)
class KernelBuild:
    """A finished build in the cache."""

    dir: Path

    @property
    def bzimage(self) -> Path:
        return self.dir / "bzImage"

    @property
    def config(self) -> Path:
        return self.dir / "config"

    @property
    def headers_tar(self) -> Path:
        """The UAPI headers (`make headers_install`) as include/... in a tar."""
        return self.dir / "headers.tar"

    @property
    def meta(self) -> dict:
        return json.loads((self.dir / "meta.json").read_text())


class KernelStore:
    """The kernels one lab builds from trees (images with `kernel.tree`)."""

    def __init__(self, lab: Lab, listener: Listener | None = None):
        self.lab = lab
        check_cache_dir(lab)
        self.root = lab.cache_path / "kernels"
        self.listener = listener

    # -- where things are ----------------------------------------------------
    def spec(self, image: str) -> KernelSpec:
        spec = self.lab.image_spec(image).kernel
        if not spec.is_tree:
            raise ConfigError([self.lab.problem(
                ("images", image, "kernel"),
                "expected a kernel 'tree' to build; this image's kernel is "
                + (f"the local bzImage '{spec.vmlinuz}'" if spec.vmlinuz
                   else f"the package {spec.package_name}"))])
        return spec

    def tree(self, image: str) -> Path:
        """The image's kernel tree, checked to be one."""
        tree = self.lab.kernel_path(self.spec(image).tree)
        missing = [p for p in ("Makefile", "Kconfig", "arch/x86/Kconfig",
                               "kernel/configs/kvm_guest.config")
                   if not (tree / p).is_file()]
        if missing:
            raise ConfigError([self.lab.problem(
                ("images", image, "kernel", "tree"),
                f"expected a Linux source tree, got '{tree}' (it has no {missing[0]})")])
        return tree

    def fragments(self, image: str) -> list[Path]:
        """Every config fragment in merge order: kvm_guest.config, the lab's,
        the small base's own (last but the user's, so it can also turn off
        what kvm_guest.config turns on and the lab does not use), then the
        user's."""
        spec, tree = self.spec(image), self.tree(image)
        frags = [tree / "kernel/configs/kvm_guest.config", LOCAL_CONFIG]
        if spec.base == "small":
            frags.append(SMALL_CONFIG)
        for i, f in enumerate(spec.config):
            path = self.lab.kernel_path(f)
            if not path.is_file():
                raise ConfigError([self.lab.problem(
                    ("images", image, "kernel", "config", i),
                    f"expected an existing config fragment, got '{path}'")])
            frags.append(path)
        return frags

    def tree_dir(self, image: str) -> Path:
        tree = self.tree(image).resolve()
        digest = hashlib.sha256(str(tree).encode()).hexdigest()[:10]
        return self.root / f"{_safe(tree.name)}-{digest}"

    def recipe(self, image: str) -> dict:
        """What decides the config and the build, apart from the sources."""
        spec = self.spec(image)
        return {"base": spec.base, "make_args": list(spec.make_args),
                "fragments": [[f.name, file_digest(f)] for f in self.fragments(image)]}

    def build_dir(self, image: str) -> Path:
        """The persistent O= directory for this tree and config recipe."""
        blob = json.dumps(self.recipe(image), sort_keys=True).encode()
        return self.tree_dir(image) / f"build-{hashlib.sha256(blob).hexdigest()[:12]}"

    def key(self, image: str) -> str:
        """The source state, the config recipe and the toolchain: what the
        kernel is made of, known without running make (a no-op build only
        hashes)."""
        spec = self.spec(image)
        parts = {"source": source_state(self.tree(image), self.tree_dir(image)),
                 "recipe": self.recipe(image), **toolchain(spec.make_args)}
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def current(self, image: str) -> KernelBuild:
        """Where the build of the tree's current state is (or would be)."""
        return KernelBuild(self.tree_dir(image) / "out" / self.key(image))

    # -- building --------------------------------------------------------------
    def build(self, image: str, force: bool = False) -> KernelBuild:
        """Build the image's kernel unless its key is cached."""
        ev = Emitter(image, self.listener)
        t0 = time.monotonic()
        out = self.current(image)
        if out.bzimage.is_file() and not force:
            ev.emit(Kind.BUILDING, f"kernel {out.meta.get('release', '?')} is built "
                    f"({out.dir.name}, checked in {time.monotonic() - t0:.1f} s)",
                    cached=True, seconds=round(time.monotonic() - t0, 2))
            return out
        tdir = self.tree_dir(image)
        tdir.mkdir(parents=True, exist_ok=True)
        with open(tdir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)     # one build per tree at a time
            out = self.current(image)           # the tree may have moved on meanwhile
            if out.bzimage.is_file() and not force:
                return out
            self._build_locked(image, out, ev)
        self._prune(tdir / "out")
        return out

    def _build_locked(self, image: str, out: KernelBuild, ev: Emitter) -> None:
        spec, tree, bdir = self.spec(image), self.tree(image), self.build_dir(image)
        bdir.mkdir(parents=True, exist_ok=True)
        scratch = out.dir.with_name(f".{out.dir.name}-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        log = scratch / "build.log"
        t0 = time.monotonic()
        make = ["make", "-C", str(tree), f"O={bdir}", "ARCH=x86_64", *spec.make_args]
        try:
            with open(log, "w") as logf:
                ev.emit(Kind.BUILDING, f"configuring {tree.name}: {spec.base} base + "
                        f"{len(self.fragments(image))} fragments")
                self._configure(image, make, logf, ev)
                estimate = _unit_count(bdir) or UNIT_ESTIMATE[spec.base]
                units = self._make(make + [f"-j{os.cpu_count() or 1}", "bzImage"], logf,
                                   ev, estimate)
                (bdir / ".uffdlab-units").write_text(f"{max(units, _unit_count(bdir))}\n")
                ev.emit(Kind.BUILDING, "installing the UAPI headers")
                _run(make + [f"INSTALL_HDR_PATH={scratch / 'hdr'}", "headers_install"], logf,
                     "make headers_install", show=SHOWN_LINES)
            release = subprocess.run(make + ["-s", "kernelrelease"], capture_output=True,
                                     text=True).stdout.strip()
            shutil.copyfile(bdir / "arch/x86/boot/bzImage", scratch / "bzImage")
            shutil.copyfile(bdir / ".config", scratch / "config")
            _tar_headers(scratch / "hdr", scratch / "headers.tar")
            shutil.rmtree(scratch / "hdr")
            meta = {"image": image, "key": out.dir.name, "tree": str(tree),
                    "release": release, "base": spec.base, **toolchain(spec.make_args),
                    "units": units, "seconds": round(time.monotonic() - t0, 1),
                    "built_at": time.time()}
            (scratch / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            out.dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(out.dir, ignore_errors=True)       # --force
            os.rename(scratch, out.dir)
            ev.emit(Kind.BUILDING, f"kernel {release} built: {units} units in "
                    f"{meta['seconds']:.0f} s", seconds=meta["seconds"], units=units)
        except BaseException as e:
            kept = self._keep_failed_log(log, image)
            shutil.rmtree(scratch, ignore_errors=True)
            if isinstance(e, KernelError):
                raise KernelError(f"{e}\nfull build log: {kept}") from None
            raise

    def _configure(self, image: str, make: list[str], logf, ev: Emitter) -> None:
        """Base config, then the fragments merged by the tree's own
        merge_config.sh, then olddefconfig; then every needed option checked."""
        spec, tree, bdir = self.spec(image), self.tree(image), self.build_dir(image)
        frags = self.fragments(image)
        _run(make + [BASE_TARGETS[spec.base]], logf, f"make {BASE_TARGETS[spec.base]}",
             show=SHOWN_LINES)
        _run([str(tree / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(bdir),
              str(bdir / ".config"), *map(str, frags)], logf, "merge_config.sh",
             show=SHOWN_LINES, cwd=tree, env={**os.environ, "ARCH": "x86_64"})
        _run(make + ["olddefconfig"], logf, "make olddefconfig", show=SHOWN_LINES)
        final = read_config(bdir / ".config")
        dropped = [f"CONFIG_{o} is not set: {why}" for o, why in NEEDED_OPTIONS.items()
                   if final.get(o) != "y"]
        if dropped:
            raise KernelError(f"the merged config of {image} lacks options the lab needs "
                              f"(a dependency is off, or a fragment turned it off):\n  "
                              + "\n  ".join(dropped))
        for frag in self.lab.image_spec(image).kernel.config:
            asked = read_config(self.lab.kernel_path(frag))
            lost = sorted(o for o, v in asked.items() if final.get(o, "n") != v)
            if lost:
                ev.emit(Kind.BUILDING, f"{frag.name}: not in the final config (a dependency "
                        f"is off): " + ", ".join(f"CONFIG_{o}={asked[o]}" for o in lost[:8])
                        + (" ..." if len(lost) > 8 else ""), dropped=lost)

    def _make(self, argv: list[str], logf, ev: Emitter, estimate: int) -> int:
        """Run the compile, emitting progress (units compiled against the
        estimate) every 2 s; on failure, the compiler's error lines."""
        units, last = 0, 0.0
        errors: list[str] = []
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        try:
            for line in proc.stdout:
                logf.write(line)
                if line.startswith("  CC "):
                    units += 1
                    if time.monotonic() - last >= 2:
                        last = time.monotonic()
                        ev.emit(Kind.PROGRESS, f"compiling: {units}/~{max(estimate, units)} "
                                f"units", done=units, total=max(estimate, units))
                elif _is_error_line(line):
                    errors.append(line.rstrip())
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if rc != 0:
            shown = "\n  ".join(errors[:20]) or "(no error line; see the log)"
            raise KernelError(f"make bzImage failed (exit {rc}) after {units} units:\n  "
                              f"{shown}")
        return units

    def _keep_failed_log(self, log: Path, image: str) -> Path | None:
        if not log.exists():
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, n = self.root / f"failed-{_safe(image)}-{stamp}.log", 1
        while dest.exists():                    # two failures in one second
            n += 1
            dest = self.root / f"failed-{_safe(image)}-{stamp}-{n}.log"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.move(log, dest)
        except OSError:
            return None
        own = re.compile(rf"failed-{re.escape(_safe(image))}-\d{{8}}-\d{{6}}(-\d+)?\.log")
        mine = sorted((p for p in self.root.iterdir() if own.fullmatch(p.name)),
                      key=lambda p: p.stat().st_mtime)
        for old in mine[:-KEEP_FAILED_LOGS]:
            old.unlink(missing_ok=True)
        return dest

    def _prune(self, outs: Path) -> None:
        builds = sorted((p for p in outs.iterdir() if (p / "meta.json").is_file()),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for old in builds[KEEP_BUILDS:]:
            shutil.rmtree(old, ignore_errors=True)


# -- a tree to start from -----------------------------------------------------------


def debian_source(lab: Lab, series: str = "6.12", listener: Listener | None = None) -> Path:
    """Debian's linux-source-SERIES package unpacked under the cache dir
    (once): a real kernel tree for trying the loop without a checkout of
    one's own. Needs apt to know the package (Debian 12 has 6.1 and, from
    its security updates, 6.12)."""
    if not re.fullmatch(r"\d+\.\d+", series):
        raise KernelError(f"expected a kernel series like 6.12, got {series!r}")
    ev = Emitter(f"linux-source-{series}", listener)
    root = lab.cache_path / "kernel-src"
    dest = root / f"linux-source-{series}"
    if (dest / "Makefile").is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    scratch = root / f".unpack-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        ev.emit(Kind.BUILDING, f"apt-get download linux-source-{series}")
        with open(scratch / "log", "w") as logf:
            download = ["apt-get", "download", f"linux-source-{series}"]
            try:
                _run(download, logf, " ".join(download), cwd=scratch)
            except KernelError:
                if os.geteuid() != 0:           # apt's lists may just be old or absent
                    raise KernelError(f"{' '.join(download)} failed; is the package known "
                                      f"to apt ('apt-get update')?") from None
                ev.emit(Kind.BUILDING, "apt-get update, then downloading again")
                _run(["apt-get", "update", "-q"], logf, "apt-get update")
                _run(download, logf, " ".join(download), cwd=scratch)
            debs = sorted(scratch.glob("*.deb"))
            _run(["dpkg-deb", "-x", str(debs[0]), str(scratch / "deb")], logf, "dpkg-deb -x")
            ev.emit(Kind.BUILDING, f"unpacking {debs[0].name}")
            tarball = scratch / f"deb/usr/src/linux-source-{series}.tar.xz"
            _run(["tar", "-xf", str(tarball), "-C", str(scratch)], logf, f"tar -xf {tarball.name}")
        os.rename(scratch / f"linux-source-{series}", dest)
        return dest
    except KernelError as e:
        raise KernelError(f"{e}: {_tail(scratch / 'log')}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _tail(log: Path, n: int = 3) -> str:
    try:
        return " / ".join(log.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


# -- the source state -------------------------------------------------------------


# One command asks for an image's kernel several times (build, boot, template
# key) within seconds; the tree is hashed once for all of them.
STATE_TTL = 5.0
_states: dict[Path, tuple[float, dict]] = {}


def source_state(tree: Path, cache_dir: Path) -> dict:
    """What the tree's sources are now: for a git checkout, HEAD plus hashes
    of the diff against it and of the untracked sources; else a content
    hash of every file."""
    seen = _states.get(tree)
    if seen and time.monotonic() - seen[0] < STATE_TTL:
        return seen[1]
    if (tree / ".git").exists():
        state = _git_state(tree)
    else:
        state = {"content": content_hash(tree, cache_dir / "stat-cache.tsv")}
    _states[tree] = (time.monotonic(), state)
    return state


def _git_state(tree: Path) -> dict:
    def git(*args: str) -> bytes:
        r = subprocess.run(["git", "-C", str(tree), *args], capture_output=True)
        if r.returncode != 0:
            raise KernelError(f"git {args[0]} in {tree} failed: "
                              f"{r.stderr.decode(errors='replace').strip()}")
        return r.stdout

    head = git("rev-parse", "HEAD").decode().strip()
    diff = hashlib.sha256(git("diff", "HEAD", "--binary")).hexdigest()
    untracked = hashlib.sha256()
    for rel in sorted(git("ls-files", "--others", "--exclude-standard", "-z").split(b"\0")):
        if rel:
            path = tree / os.fsdecode(rel)
            sha = (hashlib.sha256(os.fsencode(os.readlink(path))).hexdigest()
                   if path.is_symlink() else file_digest(path))   # editors leave dangling ones
            untracked.update(rel + b"\0" + sha.encode())
    return {"head": head, "diff": diff, "untracked": untracked.hexdigest()}


# Build products that are not sources (an in-tree build leaves them; make
# refuses O= builds from such a tree anyway).
_NOT_SOURCE = re.compile(r".*\.(o|a|ko|cmd|mod|mod\.c|order|symvers|d|tmp)$")


def content_hash(tree: Path, stat_cache: Path) -> str:
    """A hash of every file's path and content under `tree`. Files whose
    size, mtime and inode match the stat cache are not read again."""
    cached: dict[str, tuple[str, str]] = {}
    try:
        # as git's index does: a file not older than the cache may have changed
        # in the clock tick the cache was written ("racily clean"): read it again
        racy = stat_cache.stat().st_mtime_ns
        for line in stat_cache.read_text(errors="surrogateescape").splitlines():
            rel, stamp, sha = line.rsplit("\t", 2)
            cached[rel] = (stamp, sha)
    except (OSError, ValueError):
        cached, racy = {}, 0
    total, fresh, changed = hashlib.sha256(), [], False
    for rel, st in _walk(tree):
        stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        hit = cached.get(rel)
        if hit and hit[0] == stamp and st.st_mtime_ns < racy:
            sha = hit[1]
        else:
            sha = file_digest(tree / rel)
            changed = changed or hit != (stamp, sha)
        fresh.append(f"{rel}\t{stamp}\t{sha}")
        total.update(os.fsencode(rel) + f"\0{sha}\n".encode())
    if not changed and len(fresh) == len(cached):
        return total.hexdigest()
    stat_cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = stat_cache.with_name(f".{stat_cache.name}.{os.getpid()}")
    tmp.write_text("\n".join(fresh) + "\n", errors="surrogateescape")
    os.replace(tmp, stat_cache)
    return total.hexdigest()


def _walk(top: Path, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, stat) of every regular file, in a stable order."""
    with os.scandir(top / rel if rel else top) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        path = f"{rel}/{e.name}" if rel else e.name
        if e.is_dir(follow_symlinks=False):
            if e.name != ".git":
                yield from _walk(top, path)
        elif e.is_file(follow_symlinks=False) and not _NOT_SOURCE.match(e.name):
            yield path, e.stat(follow_symlinks=False)


def toolchain(make_args: list[str]) -> dict:
    """What makes another kernel of the same sources and config: the
    compiler's and the linker's version lines, and the build environment."""
    return {"compiler": compiler_version(make_args), "linker": linker_version(make_args),
            "env": build_env(make_args)}


def build_env(make_args: list[str]) -> dict[str, str]:
    """The BUILD_ENV variables set (not empty) in the environment that no
    make_args assignment overrides."""
    given = {arg.partition("=")[0] for arg in make_args}
    return {v: os.environ[v] for v in BUILD_ENV if os.environ.get(v) and v not in given}


def compiler_version(make_args: list[str]) -> str:
    """The first line of `$CC --version` for the compiler the build uses."""
    return _version(_tool(make_args, "CC", "gcc", "clang"), "compiler")


def linker_version(make_args: list[str]) -> str:
    """The first line of `$LD --version` for the linker the build uses."""
    return _version(_tool(make_args, "LD", "ld", "ld.lld"), "linker")


def _tool(make_args: list[str], var: str, gnu: str, llvm_name: str) -> str:
    """The program kbuild runs as `var`: make_args' own, else as its Makefile
    picks one from LLVM (1, /prefix/ or -suffix) or CROSS_COMPILE, which
    make_args or the environment set (make_args win, as on make's command
    line)."""
    given = dict(arg.partition("=")[::2] for arg in make_args)
    if var in given:
        return given[var]
    llvm = given.get("LLVM", os.environ.get("LLVM", ""))
    if llvm:
        return (f"{llvm}{llvm_name}" if llvm.endswith("/")
                else f"{llvm_name}{llvm}" if llvm.startswith("-") else llvm_name)
    return given.get("CROSS_COMPILE", os.environ.get("CROSS_COMPILE", "")) + gnu


def _version(prog: str, what: str) -> str:
    try:
        r = subprocess.run([prog, "--version"], capture_output=True, text=True)
    except OSError as e:
        raise KernelError(f"the {what} {prog!r} does not run: {e.strerror}") from None
    return (r.stdout.splitlines() or [prog])[0]


# -- helpers ----------------------------------------------------------------------


def read_config(path: Path) -> dict[str, str]:
    """A .config or fragment as {OPTION: value}; 'is not set' lines read as 'n'."""
    out: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if m := re.fullmatch(r"CONFIG_(\w+)=(.*)", line):
            out[m[1]] = m[2]
        elif m := re.fullmatch(r"# CONFIG_(\w+) is not set", line):
            out[m[1]] = "n"
    return out


def _is_error_line(line: str) -> bool:
    return " error: " in line or line.startswith(("make[", "make:")) and "Error" in line \
        or "undefined reference" in line


def _unit_count(bdir: Path) -> int:
    try:
        return int((bdir / ".uffdlab-units").read_text())
    except (OSError, ValueError):
        return 0


def _run(argv: list[str], logf, what: str, show: int = 0, **kw) -> None:
    """One step, its output into the log. With `show`, a failure carries the
    last `show` lines of its output that say something (see _NOISE)."""
    logf.write(f"$ {' '.join(argv)}\n")
    logf.flush()
    if not show:
        r = subprocess.run(argv, stdout=logf, stderr=subprocess.STDOUT, **kw)
        if r.returncode != 0:
            raise KernelError(f"{what} failed (exit {r.returncode})")
        return
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    out = r.stdout.decode(errors="replace")
    logf.write(out)
    logf.flush()
    if r.returncode != 0:
        said = [line.rstrip() for line in out.splitlines() if not _NOISE.fullmatch(line)]
        shown = "\n  ".join(said[-show:]) or "(no output; see the log)"
        raise KernelError(f"{what} failed (exit {r.returncode}):\n  {shown}")


# Output lines that never say why a step failed: blank ones, conf's "#"
# frames, kbuild's one-line progress ("  HOSTCC  scripts/kconfig/conf.o"),
# make entering or leaving a directory.
_NOISE = re.compile(r"\s*#?\s*|  [A-Z][A-Z0-9_]*( \[M\])? +\S.*"
                    r"|make(\[\d+\])?: (Entering|Leaving) directory .*")


def _tar_headers(hdr: Path, dest: Path) -> None:
    """include/... sorted, with fixed owners and times: the same headers give
    the same tar, so provisioning sees no change."""
    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = 0
        return ti

    with tarfile.open(dest, "w") as tar:
        for p in sorted(hdr.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(hdr)), recursive=False, filter=clean)



def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:40] or "tree"
