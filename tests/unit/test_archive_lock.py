# SPDX-License-Identifier: MIT
"""lab.lock, builds that pin and report drift (and the SOURCE_DATE_EPOCH they
run with), `lock --check`, and image archives, imported against the lock.

No image is really built: mmdebstrap, ssh-keygen and qemu-img are replaced
by FakeDebian, which writes what images/customize.sh would into the build's
output directory, from a mirror each test controls. The lock's setup hook
(images.PIN_HOOK) does run, with `sh`, into a scratch root: what apt would
read from it is what the fake installs by. Labs and caches live in tmp_path.
"""
from __future__ import annotations

import copy
import importlib.metadata
import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from uffdlab import cli, images
from uffdlab import lock as lockmod
from uffdlab.archive import (
    CARRIED,
    DESCRIPTOR,
    FORMAT,
    MAX_DESCRIPTOR,
    export_image,
    import_image,
    lock_mismatches,
)
from uffdlab.config import load_lab
from uffdlab.digest import file_digest
from uffdlab.events import Event
from uffdlab.images import (
    CONTENT_FILES,
    PIN_HOOK,
    Image,
    ImageError,
    ImageStore,
    content_hash,
    locked_image,
)
from uffdlab.lock import (
    Drift,
    Lock,
    LockedImage,
    LockError,
    apt_pins,
    drift,
    lock_path,
    python_environment,
    read_lock,
    read_manifest,
)
from uffdlab.tools import tools_digest

from .labs import guest_lab

KERNEL = "6.12.38+deb13-cloud-amd64"
# What the fake mirror offers, oldest first: apt installs a pinned version
# when the mirror has it, else the newest.
MIRROR = {
    "bash": ["5.2.15-2", "5.2.37-2"],
    "libc6:i386": ["2.41-12"],                       # not native: named with its arch
    f"linux-image-{KERNEL}": ["6.12.38-1"],
    "linux-libc-dev": ["6.12.38-1"],
    "openssh-server": ["1:10.0p1-7"],
}
NEWEST = {p: versions[-1] for p, versions in MIRROR.items()}
ROOTFS_BYTES = 64 << 10     # big enough that an archive's middle is inside base.qcow2


# -- a fake Debian: mmdebstrap, ssh-keygen and qemu-img ----------------------------
def parse_prefs(text: str) -> dict[str, str]:
    """An apt preferences file as package -> pinned version (priority 1001 only)."""
    pins = {}
    for stanza in filter(None, text.split("\n\n")):
        fields = dict(line.split(": ", 1) for line in stanza.strip().splitlines())
        assert fields["Pin-Priority"] == "1001", stanza
        pins[fields["Package"]] = fields["Pin"].removeprefix("version ")
    return pins


class FakeDebian:
    """mmdebstrap against MIRROR (a copy each test may change), plus the
    ssh-keygen and qemu-img a build runs. Each mmdebstrap call is recorded:
    its argv, whether UFFDLAB_PINS was set, that file's text at the time,
    and the apt preferences the --setup-hooks left in the root."""

    def __init__(self, roots: Path):
        self.roots = roots
        self.mirror = {p: list(v) for p, v in MIRROR.items()}
        self.calls: list[dict] = []

    def mmdebstrap(self, store, argv, log, ev, env=None):
        env = env or {}
        out = Path(env["UFFDLAB_OUT"])
        root = self.roots / f"root-{len(self.calls)}"
        root.mkdir(parents=True)
        pins_path = env.get("UFFDLAB_PINS")
        call = {"argv": list(argv), "env": dict(env), "has_pins": pins_path is not None,
                "pin_file": Path(pins_path).read_text() if pins_path else None}
        for hook in [a.split("=", 1)[1] for a in argv if a.startswith("--setup-hook=")]:
            # as mmdebstrap runs a hook: sh -c HOOK exec ROOT, with the caller's env
            r = subprocess.run(["sh", "-c", hook, "exec", str(root)], env=env,
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        prefs = root / "etc/apt/preferences.d/uffdlab-lock"
        call["apt_preferences"] = prefs.read_text() if prefs.exists() else None
        pins = parse_prefs(call["apt_preferences"] or "")
        installed = {p: pins[p] if pins.get(p) in versions else versions[-1]
                     for p, versions in self.mirror.items()}
        call["installed"] = installed
        self.calls.append(call)
        assert Path(env["UFFDLAB_HOSTKEY"]).is_file()
        manifest = "".join(f"{p}\t{v}\n" for p, v in sorted(installed.items()))
        (out / "manifest.tsv").write_text(manifest)
        (out / "kernel-release").write_text(KERNEL + "\n")
        (out / "linux-libc-dev-version").write_text(installed.get("linux-libc-dev", ""))
        (out / "vmlinuz").write_bytes(b"MZ fake vmlinuz " + KERNEL.encode())
        (out / "initrd.img").write_bytes(b"fake initrd " + KERNEL.encode())
        raw = b"ext4 " + manifest.encode()
        (out / "rootfs.raw").write_bytes(raw + bytes(ROOTFS_BYTES - len(raw)))
        with open(log, "a") as f:
            f.write("$ " + " ".join(argv) + "\nI: fake mmdebstrap done\n")

    def run(self, argv: list[str], what: str) -> None:
        if argv[0] == "ssh-keygen":              # deterministic: builds are reproducible
            key = Path(argv[argv.index("-f") + 1])
            comment = argv[argv.index("-C") + 1]
            key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n")
            key.with_name(key.name + ".pub").write_text(
                f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKey {comment}\n")
        elif argv[:2] == ["qemu-img", "convert"]:
            Path(argv[-1]).write_bytes(b"QFI\xfb" + Path(argv[-2]).read_bytes())
        else:
            raise AssertionError(f"unexpected program: {argv}")


@pytest.fixture
def debian(monkeypatch, tmp_path) -> FakeDebian:
    deb = FakeDebian(tmp_path / "mmdebstrap-roots")

    def fake_mmdebstrap(self, argv, log, ev, env=None):
        deb.mmdebstrap(self, argv, log, ev, env)

    monkeypatch.setattr(ImageStore, "_mmdebstrap", fake_mmdebstrap)
    monkeypatch.setattr(images, "_run", deb.run)
    return deb


def make_lab(tmp_path: Path, name: str = "a", file: str = "lab.yml") -> Path:
    """A lab file (one trixie image, one VM) in its own directory and cache."""
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    path = d / file
    path.write_text(guest_lab(d / "cache"))
    return path


def store_of(path: Path, listener=None) -> ImageStore:
    return ImageStore(load_lab(path), listener)


def write_lock(path: Path, key: str, packages: dict[str, str]) -> Lock:
    """A lab.lock for `path` that locks image trixie to these versions."""
    lock = Lock(images={"trixie": LockedImage(suite="trixie", recipe_key=key,
                                              kernel_release=KERNEL,
                                              content_hash="0" * 32, packages=packages)},
                guest_tools="0123456789abcdef", python={"pydantic": "2.0"})
    lock.save(lock_path(path))
    return lock


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def scratch_dirs(root: Path) -> list[str]:
    return [n for n in names(root) if n.startswith((".build-", ".import-"))]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- lock.py: the file ---------------------------------------------------------------
def sample_lock() -> Lock:
    return Lock(images={"trixie": LockedImage(suite="trixie", recipe_key="a" * 16,
                                              kernel_release=KERNEL, content_hash="c" * 32,
                                              packages=dict(NEWEST))},
                guest_tools="0123456789abcdef", python={"pydantic": "2.9.2", "pytest": "8.3"})


def test_lock_save_load_round_trip(tmp_path):
    lock = sample_lock()
    path = lock.save(tmp_path / "lab.lock")
    assert path == tmp_path / "lab.lock"
    loaded = Lock.load(path)
    assert loaded == lock
    assert loaded.images["trixie"].packages == NEWEST
    assert loaded.text() == path.read_text()
    assert names(tmp_path) == ["lab.lock"]            # the temporary file is gone


def test_lock_save_replaces_the_old_file(tmp_path):
    path = tmp_path / "lab.lock"
    path.write_text("old\n")
    sample_lock().save(path)
    assert Lock.load(path) == sample_lock()
    assert names(tmp_path) == ["lab.lock"]


def test_lock_text_is_sorted_json_one_package_per_line():
    """Sorted keys and one package a line: a version bump is a one-line diff."""
    lock = Lock(images={"trixie": LockedImage(
        suite="trixie", recipe_key="k", kernel_release=KERNEL, content_hash="c",
        packages={"zsh": "5.9-8", "bash": "5.2.37-2", "apt": "3.0.3"})})
    text = lock.text()
    assert text.endswith("}\n")
    assert json.loads(text) == lock.model_dump(exclude_none=True)    # no epoch: no key
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"
    lines = text.splitlines()
    for pkg, version in lock.images["trixie"].packages.items():
        (line,) = [ln for ln in lines if f'"{pkg}"' in ln]
        assert line.strip().rstrip(",") == f'"{pkg}": "{version}"'
    order = [ln.strip().split('"')[1] for ln in lines if '"5.' in ln or '"3.' in ln]
    assert order == ["apt", "bash", "zsh"]
    top = [ln.split('"')[1] for ln in lines if ln.startswith(' "')]
    assert top == sorted(top) == ["guest_tools", "images", "python", "version"]


def test_lock_digest_is_stable_whatever_the_order():
    a = sample_lock()
    b = sample_lock()
    b.images["trixie"].packages = dict(reversed(list(NEWEST.items())))
    b.python = dict(reversed(list(a.python.items())))
    assert a.digest == b.digest == sample_lock().digest
    assert len(a.digest) == 16 and int(a.digest, 16) >= 0


def _bump_package(lock: Lock) -> None:
    lock.images["trixie"].packages["bash"] = "5.2.37-3"


def _add_package(lock: Lock) -> None:
    lock.images["trixie"].packages["strace"] = "6.13"


def _bump_python(lock: Lock) -> None:
    lock.python["pytest"] = "8.4"


def _bump_kernel(lock: Lock) -> None:
    lock.images["trixie"].kernel_release = "6.12.41+deb13-cloud-amd64"


def _bump_tools(lock: Lock) -> None:
    lock.guest_tools = "fedcba9876543210"


def _bump_content(lock: Lock) -> None:
    lock.images["trixie"].content_hash = "d" * 32


@pytest.mark.parametrize("change", [_bump_package, _add_package, _bump_python, _bump_kernel,
                                    _bump_tools, _bump_content])
def test_lock_digest_changes_with_any_version(change):
    lock = sample_lock()
    before = lock.digest
    change(lock)
    assert lock.digest != before


def test_lock_load_refuses_bad_json_naming_the_line(tmp_path):
    path = tmp_path / "lab.lock"
    lines = sample_lock().text().splitlines()
    bash = next(i for i, line in enumerate(lines) if '"bash"' in line)
    lines[bash] = lines[bash].rstrip(",")            # a comma missing after bash's version
    path.write_text("\n".join(lines))
    with pytest.raises(LockError) as exc:
        Lock.load(path)
    # JSON notices on the next line (1-based: bash + 2)
    assert str(exc.value).startswith(f"{path}:{bash + 2}: expected the JSON 'uffdlab lock' "
                                     f"writes: ")
    assert "delimiter" in str(exc.value)


def test_lock_load_refuses_another_version(tmp_path):
    path = tmp_path / "lab.lock"
    path.write_text(json.dumps({**sample_lock().model_dump(), "version": 2}))
    with pytest.raises(LockError) as exc:
        Lock.load(path)
    assert str(exc.value) == (f"{path}: version: expected 1, got 2 "
                              f"(written by another uffd-lab)")


@pytest.mark.parametrize("edit,where", [
    (lambda d: d.update(mirror="x"), "mirror"),
    (lambda d: d["images"]["trixie"].update(arch="amd64"), "images.trixie.arch"),
])
def test_lock_load_refuses_an_unknown_key(tmp_path, edit, where):
    path = tmp_path / "other.lock"
    data = sample_lock().model_dump()
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(LockError) as exc:
        Lock.load(path)
    assert str(exc.value) == f"{path}: {where}: Extra inputs are not permitted"


def test_lock_load_names_a_wrong_type_and_a_missing_field(tmp_path):
    path = tmp_path / "lab.lock"
    data = sample_lock().model_dump()
    data["images"]["trixie"]["packages"]["bash"] = 5
    path.write_text(json.dumps(data))
    with pytest.raises(LockError) as exc:
        Lock.load(path)
    assert str(exc.value).startswith(f"{path}: images.trixie.packages.bash: ")
    del data["images"]["trixie"]["kernel_release"]
    data["images"]["trixie"]["packages"]["bash"] = "5"
    path.write_text(json.dumps(data))
    with pytest.raises(LockError) as exc:
        Lock.load(path)
    assert str(exc.value) == f"{path}: images.trixie.kernel_release: Field required"
    path.write_text("[1, 2]\n")
    with pytest.raises(LockError) as exc:
        Lock.load(path)
    assert str(exc.value).startswith(f"{path}: (top): ")


def test_lock_load_unreadable(tmp_path):
    path = tmp_path / "lab.lock"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(LockError) as exc:
        Lock.load(path)
    assert str(exc.value).startswith(f"{path}: cannot read the lock: ")


def test_lock_path_is_next_to_the_lab_file():
    assert lock_path(Path("/x/lab.yml")) == Path("/x/lab.lock")
    assert lock_path(Path("/x/other.yml")) == Path("/x/other.lock")
    assert lock_path(Path("lab.yml")) == Path("lab.lock")


def test_read_lock(tmp_path):
    lab = tmp_path / "lab.yml"
    assert read_lock(lab) is None                    # no lab.lock: nothing is pinned
    sample_lock().save(tmp_path / "other.lock")
    assert read_lock(lab) is None                    # another lab file's lock
    sample_lock().save(tmp_path / "lab.lock")
    assert read_lock(lab) == sample_lock()


# -- lock.py: drift, pins, environment, manifest ----------------------------------
def test_drift_changed_added_removed():
    locked = {"bash": "5.2.15-2", "gone": "1.0", "same": "1", "zsh": "5.9-7"}
    built = {"bash": "5.2.37-2", "new:i386": "2.0", "same": "1", "zsh": "5.9-8"}
    assert drift(locked, built) == [
        Drift("bash", "5.2.15-2", "5.2.37-2"),
        Drift("gone", "1.0", None),
        Drift("new:i386", None, "2.0"),
        Drift("zsh", "5.9-7", "5.9-8"),
    ]
    assert drift(locked, dict(locked)) == []
    assert drift({}, {}) == []


def test_drift_says_what_changed():
    assert str(Drift("bash", "5.2.15-2", "5.2.37-2")) == "bash: 5.2.15-2 -> 5.2.37-2"
    assert str(Drift("strace", None, "6.13")) == "strace: not locked, built 6.13"
    assert str(Drift("gdb", "16.3", None)) == "gdb: locked 16.3, not installed now"


def test_apt_pins_one_stanza_per_package_sorted():
    text = apt_pins({"zsh": "5.9-8", "bash": "5.2.37-2", "libc6:i386": "2.41-12"})
    assert text == ("Package: bash\nPin: version 5.2.37-2\nPin-Priority: 1001\n"
                    "\n"
                    "Package: libc6:i386\nPin: version 2.41-12\nPin-Priority: 1001\n"
                    "\n"
                    "Package: zsh\nPin: version 5.9-8\nPin-Priority: 1001\n")
    assert parse_prefs(text) == {"bash": "5.2.37-2", "libc6:i386": "2.41-12", "zsh": "5.9-8"}
    assert apt_pins({}) == ""


def test_python_environment_has_the_real_versions():
    env = python_environment()
    assert env["pydantic"] == importlib.metadata.version("pydantic")
    assert env["pytest"] == importlib.metadata.version("pytest")
    assert list(env) == sorted(env)
    assert all(name == name.lower() and "_" not in name for name in env)


@dataclass
class FakeDist:
    metadata: dict
    version: str


# python_environment() records the first distribution of a name on sys.path,
# the one `import` and importlib.metadata.version() take (a stale *.egg-info
# next to the checkout is a second one).
def test_python_environment_records_the_distribution_in_use(monkeypatch):
    dists = [FakeDist({"Name": "Some_Pkg"}, "2.0"),        # first on sys.path: imported
             FakeDist({"Name": "some-pkg"}, "1.0"),        # shadowed
             FakeDist({"Name": None}, "9")]
    monkeypatch.setattr(lockmod.importlib.metadata, "distributions", lambda: iter(dists))
    assert python_environment() == {"some-pkg": "2.0"}


def test_read_manifest(tmp_path):
    path = tmp_path / "manifest.tsv"
    path.write_text("bash\t5.2.37-2\n\nlibc6:i386\t2.41-12\nodd\tver\twith tab\n")
    assert read_manifest(path) == {"bash": "5.2.37-2", "libc6:i386": "2.41-12",
                                   "odd": "ver\twith tab"}


def test_first_build_writes_the_lock_next_to_the_lab_file(tmp_path, debian):
    path = make_lab(tmp_path)
    assert not lock_path(path).exists()
    img = store_of(path).build("trixie")
    lock = Lock.load(tmp_path / "a" / "lab.lock")
    assert lock.images == {"trixie": LockedImage(
        suite="trixie", recipe_key=img.key, kernel_release=KERNEL,
        content_hash=content_hash(img.dir), packages=NEWEST)}
    assert lock.guest_tools == tools_digest()
    assert lock.python == python_environment()
    meta = img.meta
    assert meta["content_hash"] == content_hash(img.dir) == img.content_hash
    assert meta["pins"] is None and meta["drift"] == []
    assert meta["kernel_release"] == KERNEL and meta["linux_libc_dev"] == "6.12.38-1"
    assert img.packages == NEWEST
    (call,) = debian.calls
    assert not call["has_pins"] and call["apt_preferences"] is None
    assert not [a for a in call["argv"] if a.startswith("--setup-hook")]
    # the private host key, the raw disk and the pins never reach the cache
    assert names(img.dir) == sorted([*CONTENT_FILES, "meta.json", "build.log",
                                     "kernel-release", "linux-libc-dev-version"])
    assert scratch_dirs(img.dir.parent) == []


def test_a_cached_build_is_kept_and_the_lock_left_alone(tmp_path, debian):
    path = make_lab(tmp_path)
    store_of(path).build("trixie")
    text = lock_path(path).read_text()
    img = store_of(path).build("trixie")
    assert len(debian.calls) == 1
    assert lock_path(path).read_text() == text
    assert img.packages == NEWEST


def test_other_yml_gets_other_lock(tmp_path, debian):
    path = make_lab(tmp_path, file="other.yml")
    store_of(path).build("trixie")
    assert (tmp_path / "a" / "other.lock").is_file()
    assert not (tmp_path / "a" / "lab.lock").exists()


def test_a_lock_pins_every_locked_version_for_apt(tmp_path, debian):
    path = make_lab(tmp_path)
    store = store_of(path)
    locked = {**NEWEST, "bash": "5.2.15-2"}          # older, but still on the mirror
    lock = write_lock(path, store.image("trixie").key, locked)
    img = store.build("trixie")
    (call,) = debian.calls
    argv = call["argv"]
    assert f"--setup-hook={PIN_HOOK}" in argv
    assert argv.index(f"--setup-hook={PIN_HOOK}") < argv.index(
        f"--customize-hook={images.CUSTOMIZE_HOOK}")
    assert call["has_pins"]
    assert call["pin_file"] == apt_pins(locked)
    assert call["apt_preferences"] == apt_pins(locked)   # the hook put it where apt reads
    assert parse_prefs(call["apt_preferences"]) == locked
    assert img.packages == locked                    # the old bash, not the newest
    assert img.meta["drift"] == [] and img.meta["pins"] is not None
    assert "apt-pins" not in names(img.dir)
    assert lock_path(path).read_text() == lock.text()   # the lock is the input, untouched


def test_a_version_the_mirror_lacks_is_named_as_drift(tmp_path, debian):
    path = make_lab(tmp_path)
    events: list[Event] = []
    store = store_of(path, events.append)
    locked = {**NEWEST, "bash": "5.2.14-1", "gone": "1.0"}
    del locked["libc6:i386"]
    lock = write_lock(path, store.image("trixie").key, locked)
    img = store.build("trixie")
    expected = ["bash: 5.2.14-1 -> 5.2.37-2", "gone: locked 1.0, not installed now",
                "libc6:i386: not locked, built 2.41-12"]
    (ev,) = [e for e in events if "drift" in e.data]
    assert ev.kind == "building" and ev.subject == "trixie"
    assert ev.data["drift"] == expected
    assert ev.message == "3 packages drifted from lab.lock: " + "; ".join(expected)
    assert img.meta["drift"] == expected
    assert img.packages == NEWEST
    assert lock_path(path).read_text() == lock.text()   # drift is reported, not recorded


def test_cli_image_build_prints_the_drift(tmp_path, debian, capsys):
    path = make_lab(tmp_path)
    write_lock(path, store_of(path).image("trixie").key, {**NEWEST, "bash": "5.2.14-1"})
    code, out, err = run_cli(capsys, "--lab", str(path), "image", "build")
    assert code == 0, err
    img = store_of(path).image("trixie")
    lines = out.splitlines()
    assert lines[0].startswith(f"trixie: {img.dir} (kernel {KERNEL}, content "
                               f"{img.content_hash}, ")
    assert lines[1:] == ["  drifted from the lock: bash: 5.2.14-1 -> 5.2.37-2"]
    assert "1 packages drifted from lab.lock: bash: 5.2.14-1 -> 5.2.37-2" in err


def test_locked_build_refuses_drift_and_caches_nothing(tmp_path, debian):
    path = make_lab(tmp_path)
    store = store_of(path)
    lock = write_lock(path, store.image("trixie").key, {**NEWEST, "bash": "5.2.14-1"})
    with pytest.raises(ImageError) as exc:
        store.build("trixie", locked=True)
    msg = str(exc.value)
    assert msg.startswith("image trixie: 1 packages differ from lab.lock (--locked):\n"
                          "  bash: 5.2.14-1 -> 5.2.37-2\nfull build log: ")
    img = store.image("trixie")
    assert not img.dir.exists() and not img.built
    assert scratch_dirs(store.root) == []
    (log,) = [p for p in store.root.iterdir() if p.name.startswith("failed-trixie-")]
    assert msg.endswith(f"full build log: {log}")
    assert "bash: 5.2.14-1 -> 5.2.37-2" in log.read_text().splitlines()[-1]
    assert lock_path(path).read_text() == lock.text()


def test_locked_build_without_drift_succeeds(tmp_path, debian):
    path = make_lab(tmp_path)
    store = store_of(path)
    write_lock(path, store.image("trixie").key, {**NEWEST, "bash": "5.2.15-2"})
    img = store.build("trixie", locked=True)
    assert img.built and img.packages["bash"] == "5.2.15-2" and img.meta["drift"] == []


def test_cli_image_build_locked_fails_with_the_drift(tmp_path, debian, capsys):
    path = make_lab(tmp_path)
    write_lock(path, store_of(path).image("trixie").key, {**NEWEST, "bash": "5.2.14-1"})
    code, out, err = run_cli(capsys, "--lab", str(path), "image", "build", "--locked")
    assert code == 1
    assert out == ""
    assert "uffdlab: ImageError: image trixie: 1 packages differ from lab.lock (--locked):" \
        in err
    assert "  bash: 5.2.14-1 -> 5.2.37-2" in err.splitlines()
    assert not store_of(path).image("trixie").built


def test_a_failed_locked_rebuild_keeps_the_cached_image(tmp_path, debian):
    path = make_lab(tmp_path)
    store = store_of(path)
    first = store.build("trixie")
    before = content_hash(first.dir)
    lock = Lock.load(lock_path(path))
    lock.images["trixie"].packages["bash"] = "5.2.14-1"     # edited by hand
    lock.save(lock_path(path))
    with pytest.raises(ImageError):
        store.build("trixie", locked=True)
    assert len(debian.calls) == 2
    assert first.built and content_hash(first.dir) == before
    assert scratch_dirs(store.root) == []


def test_a_cached_image_is_rebuilt_once_after_the_lock_changes(tmp_path, debian):
    """The cache fits the lock when its packages are the locked ones; a lock
    edited afterwards (an older bash) rebuilds once, then fits again."""
    path = make_lab(tmp_path)
    store = store_of(path)
    store.build("trixie")
    lock = Lock.load(lock_path(path))
    lock.images["trixie"].packages["bash"] = "5.2.15-2"
    lock.save(lock_path(path))
    img = store.build("trixie")
    assert len(debian.calls) == 2
    assert debian.calls[1]["has_pins"]
    assert img.packages == lock.images["trixie"].packages and img.meta["drift"] == []
    store.build("trixie")
    store_of(path).build("trixie")
    assert len(debian.calls) == 2


def test_a_drifted_build_is_kept_for_the_same_pins(tmp_path, debian):
    """Rebuilding against a mirror that lacks a locked version would drift
    the same way: the cache is kept until the pins change."""
    path = make_lab(tmp_path)
    store = store_of(path)
    store.build("trixie")
    lock = Lock.load(lock_path(path))
    lock.images["trixie"].packages["bash"] = "5.2.14-1"
    lock.save(lock_path(path))
    img = store.build("trixie")
    assert len(debian.calls) == 2
    assert img.meta["drift"] == ["bash: 5.2.14-1 -> 5.2.37-2"]
    store.build("trixie")
    store_of(path).build("trixie")
    assert len(debian.calls) == 2                     # no second mmdebstrap for these pins
    lock.images["trixie"].packages["bash"] = "5.2.13-1"
    lock.save(lock_path(path))
    assert store.build("trixie").meta["drift"] == ["bash: 5.2.13-1 -> 5.2.37-2"]
    assert len(debian.calls) == 3
    store.build("trixie", force=True)
    assert len(debian.calls) == 4                     # --force always rebuilds


# A cached image built (without --locked) against these same pins but drifted
# is not good enough for build(locked=True): `image build --locked` refuses it.
def test_locked_refuses_a_cached_drifted_image(tmp_path, debian):
    path = make_lab(tmp_path)
    store = store_of(path)
    write_lock(path, store.image("trixie").key, {**NEWEST, "bash": "5.2.14-1"})
    img = store.build("trixie")
    assert img.meta["drift"] == ["bash: 5.2.14-1 -> 5.2.37-2"]
    with pytest.raises(ImageError) as exc:
        store.build("trixie", locked=True)
    assert "bash: 5.2.14-1 -> 5.2.37-2" in str(exc.value)
    assert img.built                                  # the cached image is kept


# `image build` reports drift against the lock as it is now: after `uffdlab
# lock` records the built versions, nothing has drifted.
def test_cli_reports_no_stale_drift_after_uffdlab_lock(tmp_path, debian, capsys):
    path = make_lab(tmp_path)
    write_lock(path, store_of(path).image("trixie").key, {**NEWEST, "bash": "5.2.14-1"})
    code, out, _ = run_cli(capsys, "--lab", str(path), "image", "build")
    assert code == 0 and "drifted from the lock: bash: 5.2.14-1 -> 5.2.37-2" in out
    assert run_cli(capsys, "--lab", str(path), "lock")[0] == 0
    assert Lock.load(lock_path(path)).images["trixie"].packages == NEWEST
    code, out, _ = run_cli(capsys, "--lab", str(path), "image", "build")
    assert code == 0
    assert len(debian.calls) == 1
    assert "drifted" not in out


@pytest.mark.parametrize("name", CONTENT_FILES)
def test_content_hash_changes_with_every_content_file(tmp_path, debian, name):
    img = store_of(make_lab(tmp_path)).build("trixie")
    before = content_hash(img.dir)
    path = img.dir / name
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert content_hash(img.dir) != before
    path.unlink()
    assert content_hash(img.dir) != before
    path.write_bytes(data)
    assert content_hash(img.dir) == before


def test_content_hash_covers_names_not_only_bytes(tmp_path, debian):
    img = store_of(make_lab(tmp_path)).build("trixie")
    before = content_hash(img.dir)
    a, b = (img.dir / "vmlinuz").read_bytes(), (img.dir / "initrd.img").read_bytes()
    (img.dir / "vmlinuz").write_bytes(b)
    (img.dir / "initrd.img").write_bytes(a)
    assert content_hash(img.dir) != before


def test_content_hash_ignores_meta_and_the_log(tmp_path, debian):
    img = store_of(make_lab(tmp_path)).build("trixie")
    before = content_hash(img.dir)
    meta = img.meta
    (img.dir / "meta.json").write_text(json.dumps({**meta, "built_at": 0}))
    with open(img.dir / "build.log", "a") as f:
        f.write("more\n")
    (img.dir / "kernel-release").write_text("other\n")
    assert content_hash(img.dir) == before
    assert len(before) == 32


def test_image_content_hash_prefers_meta(tmp_path, debian):
    img = store_of(make_lab(tmp_path)).build("trixie")
    computed = content_hash(img.dir)
    meta = img.meta
    (img.dir / "meta.json").write_text(json.dumps({**meta, "content_hash": "f" * 32}))
    assert img.content_hash == "f" * 32
    del meta["content_hash"]
    (img.dir / "meta.json").write_text(json.dumps(meta))
    assert img.content_hash == computed


def test_locked_image_is_what_the_lock_keeps(tmp_path, debian):
    img = store_of(make_lab(tmp_path)).build("trixie")
    assert locked_image(img) == LockedImage(suite="trixie", recipe_key=img.key,
                                            kernel_release=KERNEL,
                                            content_hash=img.content_hash, packages=NEWEST)


def test_two_labs_build_the_same_image(tmp_path, debian):
    """The image does not depend on the lab's key or cache: two labs get one
    recipe key, one mmdebstrap command and (the fakes being reproducible)
    one content hash."""
    a, b = store_of(make_lab(tmp_path, "a")), store_of(make_lab(tmp_path, "b"))
    ia, ib = a.build("trixie"), b.build("trixie")
    assert a.root != b.root
    assert ia.key == ib.key and ia.dir != ib.dir
    assert ia.content_hash == ib.content_hash
    first, second = debian.calls
    assert first["argv"] == second["argv"]
    assert a.keys.public_key() != b.keys.public_key()
    for store, call in ((a, first), (b, second)):
        seen = " ".join(call["argv"] + [v for k, v in call["env"].items()
                                        if k.startswith("UFFDLAB_")])
        assert str(store.keys.private_path.parent) not in seen
        assert store.keys.public_key().split()[1] not in seen


# -- archive.py -------------------------------------------------------------------
@pytest.fixture
def exported(tmp_path, debian, monkeypatch) -> tuple[Image, Path]:
    """Image trixie built in lab a and exported to trixie.uffdlab.tar."""
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    store = store_of(make_lab(tmp_path, "a"))
    img = store.build("trixie")
    return img, export_image(store, "trixie", tmp_path / "trixie.uffdlab.tar")


def read_tar(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else b"")
                for m in tar.getmembers()]


def write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info = copy.copy(info)
            if info.isfile():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def test_export_archive_layout(exported):
    img, archive = exported
    entries = read_tar(archive)
    assert [m.name for m, _ in entries] == [DESCRIPTOR, *sorted(CARRIED)]
    assert "build.log" not in [m.name for m, _ in entries]
    for m, _ in entries:
        assert (m.uid, m.gid, m.uname, m.gname, m.mode, m.mtime) == (0, 0, "", "", 0o644, 0)
        assert m.isfile()
    desc = json.loads(entries[0][1])
    assert desc["format"] == FORMAT
    assert (desc["name"], desc["key"], desc["suite"], desc["kernel_release"]) == \
        ("trixie", img.key, "trixie", KERNEL)
    assert desc["content_hash"] == content_hash(img.dir)
    assert desc["lock"] == locked_image(img).model_dump()
    for m, data in entries[1:]:
        assert data == (img.dir / m.name).read_bytes()
        assert desc["files"][m.name]["size"] == len(data)
        assert desc["files"][m.name]["sha256"] == file_digest(img.dir / m.name)
    assert not [n for n in names(archive.parent) if n.endswith(".tmp")]


def test_export_is_reproducible(exported, tmp_path, monkeypatch):
    img, first = exported
    store = store_of(tmp_path / "a" / "lab.yml")
    again = export_image(store, "trixie", tmp_path / "again.tar")
    assert again.read_bytes() == first.read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = export_image(store, "trixie", tmp_path / "dated.tar")
    dated2 = export_image(store, "trixie", tmp_path / "dated2.tar")
    assert dated.read_bytes() == dated2.read_bytes() != first.read_bytes()
    assert {m.mtime for m, _ in read_tar(dated)} == {1700000000}


def test_export_of_an_image_not_built(tmp_path):
    store = store_of(make_lab(tmp_path))
    with pytest.raises(ImageError) as exc:
        export_image(store, "trixie", tmp_path / "x.tar")
    assert str(exc.value) == "image trixie is not built; 'uffdlab image build trixie' first"
    assert not (tmp_path / "x.tar").exists()


# Imports read the descriptor with tar.next() and the members after it with
# tar.next() too (TarFile.__iter__ would start again at the descriptor).
def test_export_then_import_into_another_lab(exported, tmp_path, debian):
    img, archive = exported
    b = make_lab(tmp_path, "b")
    events: list[Event] = []
    desc, dest = import_image(load_lab(b), archive, listener=events.append)
    store = store_of(b)
    assert dest == store.image("trixie").dir == tmp_path / "b" / "cache" / "images" / img.key
    assert names(dest) == sorted(CARRIED)
    for name in CARRIED:
        assert (dest / name).read_bytes() == (img.dir / name).read_bytes()
    assert content_hash(dest) == img.content_hash == desc["content_hash"]
    assert desc["key"] == img.key and desc["lock"] == locked_image(img).model_dump()
    imported = store.image("trixie")
    assert imported.built and imported.kernel_release == KERNEL
    assert imported.content_hash == img.content_hash and imported.packages == NEWEST
    assert scratch_dirs(store.root) == []
    assert events[-1].message == (f"imported trixie (trixie, kernel {KERNEL}) as {img.key}, "
                                  f"content {img.content_hash}")
    store.build("trixie")                          # the imported image is the build
    assert len(debian.calls) == 1


def test_import_twice_is_a_no_op(exported, tmp_path):
    img, archive = exported
    lab = load_lab(make_lab(tmp_path, "b"))
    _, dest = import_image(lab, archive)
    stat = (dest / "base.qcow2").stat()
    events: list[Event] = []
    desc, again = import_image(lab, archive, listener=events.append)
    assert again == dest
    assert (dest / "base.qcow2").stat().st_ino == stat.st_ino     # not replaced
    assert events[-1].message == f"image {img.key} is already in the cache"
    assert scratch_dirs(dest.parent) == []


def test_import_over_another_build_needs_force(exported, tmp_path, debian):
    img, archive = exported
    b = make_lab(tmp_path, "b")
    debian.mirror["bash"] = ["5.2.40-1"]                # b's mirror moved on
    mine = store_of(b).build("trixie")
    have = content_hash(mine.dir)
    assert have != img.content_hash and mine.key == img.key
    with pytest.raises(ImageError) as exc:
        import_image(load_lab(b), archive)
    assert str(exc.value) == (
        f"{archive}: the cache holds another build of this recipe ({img.key}, content "
        f"{have}, the archive's is {img.content_hash}); --force replaces it")
    assert content_hash(mine.dir) == have and mine.packages["bash"] == "5.2.40-1"
    assert scratch_dirs(mine.dir.parent) == []
    _, dest = import_image(load_lab(b), archive, force=True)
    assert dest == mine.dir
    assert content_hash(dest) == img.content_hash and names(dest) == sorted(CARRIED)
    assert scratch_dirs(dest.parent) == []


# -- archive.py: what import refuses ---------------------------------------------
def _flip_a_byte(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        offset = tar.getmember("base.qcow2").offset_data + 100
    data = bytearray(archive.read_bytes())
    data[offset] ^= 0xFF
    archive.write_bytes(bytes(data))


def _cut_in_the_middle(archive: Path) -> None:
    data = archive.read_bytes()
    with tarfile.open(archive) as tar:
        m = tar.getmember("base.qcow2")
    assert m.offset_data < len(data) // 2 < m.offset_data + m.size
    archive.write_bytes(data[:len(data) // 2])


def _cut_after_a_member(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        m = tar.getmember("base.qcow2")
    end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    archive.write_bytes(archive.read_bytes()[:end])


def _append(name: str) -> Callable[[Path], None]:
    def append(archive: Path) -> None:
        with tarfile.open(archive, "a") as tar:
            data = b"#!/bin/sh\ntouch PWNED\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return append


def _insert(name: str) -> Callable[[Path], None]:
    """A member `name` ({tmp}: the archive's directory) right after the descriptor."""
    def insert(archive: Path) -> None:
        entries = read_tar(archive)
        info = tarfile.TarInfo(name.format(tmp=archive.parent))
        write_tar(archive, [entries[0], (info, b"evil\n"), *entries[1:]])
    return insert


def _descriptor_second(archive: Path) -> None:
    entries = read_tar(archive)
    write_tar(archive, [entries[1], entries[0], *entries[2:]])


def _set_descriptor(blob: bytes) -> Callable[[Path], None]:
    def set_descriptor(archive: Path) -> None:
        entries = read_tar(archive)
        write_tar(archive, [(entries[0][0], blob), *entries[1:]])
    return set_descriptor


def _edit_descriptor(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit_descriptor(archive: Path) -> None:
        entries = read_tar(archive)
        desc = json.loads(entries[0][1])
        edit(desc)
        write_tar(archive, [(entries[0][0], json.dumps(desc).encode()), *entries[1:]])
    return edit_descriptor


def _drop(name: str) -> Callable[[Path], None]:
    def drop(archive: Path) -> None:
        write_tar(archive, [e for e in read_tar(archive) if e[0].name != name])
    return drop


def _symlink_vmlinuz(archive: Path) -> None:
    entries = read_tar(archive)
    link = tarfile.TarInfo("vmlinuz")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    write_tar(archive, [(link, b"") if m.name == "vmlinuz" else (m, d) for m, d in entries])


def _not_a_tar(archive: Path) -> None:
    archive.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(4096))


def _empty(archive: Path) -> None:
    archive.write_bytes(b"")


def _bigger(name: str, by: int) -> Callable[[dict], None]:
    def bigger(desc: dict) -> None:
        desc["files"][name]["size"] += by
    return bigger


NOT_A_DESCRIPTOR = f"{DESCRIPTOR} is not a {FORMAT} descriptor"
UNEXPECTED = " (not in uffdlab-image.json, a duplicate, or not a regular file)"

REFUSED = [
    # damaged, truncated, padded
    ("flipped-byte", _flip_a_byte,
     "base.qcow2: its SHA-256 is not the one it was exported with (the archive was changed)"),
    ("cut-in-the-middle", _cut_in_the_middle, "the archive is damaged or truncated ("),
    ("cut-after-a-member", _cut_after_a_member,
     "missing ['initrd.img', 'manifest.tsv', 'meta.json', 'ssh_host_ed25519_key.pub', "
     "'vmlinuz'] (a truncated archive?)"),
    ("a-member-dropped", _drop("vmlinuz"), "missing ['vmlinuz'] (a truncated archive?)"),
    ("extra-member-appended", _append("extra.sh"), f"unexpected member 'extra.sh'{UNEXPECTED}"),
    ("duplicate-appended", _append("base.qcow2"),
     f"unexpected member 'base.qcow2'{UNEXPECTED}"),
    ("dot-dot-member", _insert("../evil"), f"unexpected member '../evil'{UNEXPECTED}"),
    ("absolute-member", _insert("{tmp}/evil"), f"unexpected member '{{tmp}}/evil'{UNEXPECTED}"),
    ("symlink-member", _symlink_vmlinuz, f"unexpected member 'vmlinuz'{UNEXPECTED}"),
    ("size-mismatch", _edit_descriptor(_bigger("base.qcow2", 1)),
     f"base.qcow2: {ROOTFS_BYTES + 4} bytes, the descriptor says {ROOTFS_BYTES + 5}"),
    ("content-hash-mismatch", _edit_descriptor(lambda d: d.update(content_hash="0" * 32)),
     "content hash "),
    # the descriptor itself
    ("descriptor-not-first", _descriptor_second,
     "expected uffdlab-image.json as the first member, got 'base.qcow2'"),
    ("descriptor-bad-json", _set_descriptor(b'{"format": "uffdlab-image/1",'),
     NOT_A_DESCRIPTOR),
    ("descriptor-not-utf8", _set_descriptor(b"\xff\xfe\x00"), NOT_A_DESCRIPTOR),
    ("descriptor-a-list", _set_descriptor(b"[]"), NOT_A_DESCRIPTOR),
    ("descriptor-wrong-format", _edit_descriptor(lambda d: d.update(format="uffdlab-image/2")),
     NOT_A_DESCRIPTOR),
    ("descriptor-size-not-int", _edit_descriptor(
        lambda d: d["files"]["vmlinuz"].update(size="12")), NOT_A_DESCRIPTOR),
    ("descriptor-no-key", _edit_descriptor(lambda d: d.pop("key")), NOT_A_DESCRIPTOR),
    ("descriptor-names-a-path", _edit_descriptor(
        lambda d: d["files"].update({"../evil": {"size": 1, "sha256": "0"}})),
     f"{DESCRIPTOR} names files an image does not have: ['../evil']"),
    ("descriptor-without-disk", _edit_descriptor(lambda d: d["files"].pop("base.qcow2")),
     f"{DESCRIPTOR} lacks files every image has: ['base.qcow2']"),
    ("descriptor-key-a-path", _edit_descriptor(lambda d: d.update(key="../x")),
     "key: expected a recipe hash, got '../x'"),
    ("descriptor-too-big", _set_descriptor(b" " * (MAX_DESCRIPTOR + 1) + b"{}"),
     "expected uffdlab-image.json as the first member, got 'uffdlab-image.json'"),
    # not an archive at all
    ("not-a-tar", _not_a_tar, "not an image archive ("),
    ("empty-file", _empty, "not an image archive ("),
]


@pytest.mark.parametrize("mutate,problem", [(m, p) for _, m, p in REFUSED],
                         ids=[i for i, _, _ in REFUSED])
def test_import_refuses_and_installs_nothing(exported, tmp_path, mutate, problem):
    _, archive = exported
    mutate(archive)
    lab = load_lab(make_lab(tmp_path, "b"))
    with pytest.raises(ImageError) as exc:
        import_image(lab, archive)
    msg = str(exc.value)
    assert msg.startswith(f"{archive}: refused, nothing installed: ")
    assert problem.format(tmp=tmp_path) in msg
    assert names(lab.cache_path / "images") == []        # no image, no .import-* left
    assert not (tmp_path / "evil").exists()


def test_import_of_a_missing_file(tmp_path):
    lab = load_lab(make_lab(tmp_path, "b"))
    with pytest.raises(ImageError) as exc:
        import_image(lab, tmp_path / "nope.tar")
    assert str(exc.value).startswith(f"{tmp_path / 'nope.tar'}: refused, nothing installed: "
                                     f"not an image archive (")
    assert names(lab.cache_path / "images") == []


# -- the CLI: image export / import, lock -----------------------------------------
def test_cli_image_export_and_import(tmp_path, debian, capsys):
    a, b = make_lab(tmp_path, "a"), make_lab(tmp_path, "b")
    archive = tmp_path / "trixie.uffdlab.tar"
    assert run_cli(capsys, "--lab", str(a), "image", "build")[0] == 0
    code, out, err = run_cli(capsys, "--lab", str(a), "image", "export", "trixie",
                             str(archive))
    assert code == 0, err
    assert out == f"trixie: exported to {archive} (0 MiB)\n"
    img = store_of(a).image("trixie")
    assert f"exported to {archive}: content {img.content_hash}" in err
    code, out, err = run_cli(capsys, "--lab", str(b), "image", "import", str(archive))
    assert code == 0, err
    dest = store_of(b).image("trixie").dir
    assert out.splitlines() == [
        f"imported trixie (trixie, kernel {KERNEL}, content {img.content_hash}) into {dest}",
        "lab.yml images that boot it now: trixie"]
    code, out, err = run_cli(capsys, "--lab", str(b), "image", "import", str(archive))
    assert code == 0 and f"image {img.key} is already in the cache" in err


def test_cli_import_into_a_lab_without_the_recipe(exported, tmp_path, capsys):
    _, archive = exported
    path = tmp_path / "c" / "lab.yml"
    path.parent.mkdir()
    path.write_text(guest_lab(tmp_path / "c" / "cache").replace("suite: trixie",
                                                                "suite: bookworm"))
    code, out, err = run_cli(capsys, "--lab", str(path), "image", "import", str(archive))
    assert code == 0, err
    assert out.splitlines()[-1] == (
        "no image of lab.yml has its recipe yet; add the exporter's entry (suite trixie) "
        "under 'images', named as you like")


# The import command names the lab file as it is called.
def test_cli_import_names_the_lab_file(exported, tmp_path, capsys):
    _, archive = exported
    other = make_lab(tmp_path, "b", file="other.yml")
    code, out, err = run_cli(capsys, "--lab", str(other), "image", "import", str(archive))
    assert code == 0, err
    assert out.splitlines()[-1] == "other.yml images that boot it now: trixie"


def test_cli_export_failures(tmp_path, capsys):
    path = make_lab(tmp_path)
    code, out, err = run_cli(capsys, "--lab", str(path), "image", "export", "trixie",
                             str(tmp_path / "x.tar"))
    assert (code, out) == (1, "")
    assert err == ("uffdlab: ImageError: image trixie is not built; "
                   "'uffdlab image build trixie' first\n")
    code, out, err = run_cli(capsys, "--lab", str(path), "image", "export", "trixy",
                             str(tmp_path / "x.tar"))
    assert (code, out) == (2, "")
    assert err.startswith("lab.yml: no image named 'trixy'")
    assert not (tmp_path / "x.tar").exists()


def test_cli_import_refused(exported, tmp_path, capsys):
    _, archive = exported
    _flip_a_byte(archive)
    b = make_lab(tmp_path, "b")
    code, out, err = run_cli(capsys, "--lab", str(b), "image", "import", str(archive))
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == (
        f"uffdlab: ImageError: {archive}: refused, nothing installed: base.qcow2: its "
        f"SHA-256 is not the one it was exported with (the archive was changed)")
    assert names(tmp_path / "b" / "cache" / "images") == []


def test_cli_import_force(exported, tmp_path, debian, capsys):
    img, archive = exported
    b = make_lab(tmp_path, "b")
    debian.mirror["bash"] = ["5.2.40-1"]
    store_of(b).build("trixie")
    code, out, err = run_cli(capsys, "--lab", str(b), "image", "import", str(archive))
    assert (code, out) == (1, "")
    assert "--force replaces it" in err
    code, out, err = run_cli(capsys, "--lab", str(b), "image", "import", "--force",
                             str(archive))
    assert code == 0, err
    assert content_hash(store_of(b).image("trixie").dir) == img.content_hash


def test_cli_lock_writes_the_lock(tmp_path, debian, capsys):
    path = make_lab(tmp_path)
    code, out, err = run_cli(capsys, "--lab", str(path), "lock")
    assert code == 0, err
    lock = Lock.load(tmp_path / "a" / "lab.lock")
    img = store_of(path).image("trixie")
    assert lock.images == {"trixie": locked_image(img)}
    assert lock.images["trixie"].packages == NEWEST
    assert lock.guest_tools == tools_digest() and lock.python == python_environment()
    assert out == (f"{lock_path(path)}: 1 images, {len(NEWEST)} package versions, "
                   f"{len(lock.python)} Python distributions; lock {lock.digest}\n")
    assert len(debian.calls) == 1
    assert run_cli(capsys, "--lab", str(path), "lock")[0] == 0       # cached: no rebuild
    assert len(debian.calls) == 1
    assert Lock.load(lock_path(path)) == lock


def test_cli_lock_records_what_was_built(tmp_path, debian, capsys):
    """`uffdlab lock` after a drifted build records the versions built."""
    path = make_lab(tmp_path, file="other.yml")
    write_lock(path, store_of(path).image("trixie").key, {**NEWEST, "bash": "5.2.14-1"})
    code, _, err = run_cli(capsys, "--lab", str(path), "lock")
    assert code == 0, err
    assert len(debian.calls) == 1 and debian.calls[0]["has_pins"]
    lock = Lock.load(tmp_path / "a" / "other.lock")
    assert lock.images["trixie"].packages == NEWEST
    assert lock.guest_tools == tools_digest()
    assert not (tmp_path / "a" / "lab.lock").exists()


def test_locked_without_a_lock_entry_is_an_error_naming_the_fix(tmp_path, debian):
    """--locked asks for what the lock holds: with no entry there is nothing
    to hold the build to, so nothing is built and the lock is not written."""
    path = make_lab(tmp_path)
    store = store_of(path)
    with pytest.raises(ImageError, match=r"--locked, but .*lab\.lock has no entry for it "
                                         r"\('uffdlab lock' writes one\)"):
        store.build("trixie", locked=True)
    assert not lock_path(path).exists() and not store.image("trixie").built


# -- SOURCE_DATE_EPOCH: the builds' timestamps -----------------------------------------
def test_a_build_without_a_lock_runs_at_the_default_epoch_and_the_lock_records_it(
        tmp_path, debian, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "5")       # the caller's is not an input
    path = make_lab(tmp_path)
    img = store_of(path).build("trixie")
    (call,) = debian.calls
    assert call["env"]["SOURCE_DATE_EPOCH"] == str(lockmod.DEFAULT_SOURCE_DATE_EPOCH)
    assert img.meta["source_date_epoch"] == lockmod.DEFAULT_SOURCE_DATE_EPOCH
    lock = Lock.load(lock_path(path))
    assert lock.source_date_epoch == lockmod.DEFAULT_SOURCE_DATE_EPOCH == 1704067200
    assert '"source_date_epoch": 1704067200' in lock.text()


def test_a_build_runs_at_the_locks_epoch_under_the_same_recipe_key(tmp_path, debian):
    path = make_lab(tmp_path)
    store = store_of(path)
    key = store.image("trixie").key
    lock = write_lock(path, key, dict(NEWEST))
    lock.source_date_epoch = 1700000000
    lock.save(lock_path(path))
    img = store.build("trixie")
    assert debian.calls[0]["env"]["SOURCE_DATE_EPOCH"] == "1700000000"
    assert img.meta["source_date_epoch"] == 1700000000
    assert img.key == key == images.recipe_key(images.recipe(img.spec))   # not in the key
    assert Lock.load(lock_path(path)) == lock                            # untouched
    lock.source_date_epoch = 1600000000                 # another epoch: the cache stays
    lock.save(lock_path(path))
    assert store.build("trixie").dir == img.dir and len(debian.calls) == 1
    store.build("trixie", force=True)
    assert debian.calls[1]["env"]["SOURCE_DATE_EPOCH"] == "1600000000"


def test_a_lock_from_before_the_epoch_keeps_its_text_and_digest(tmp_path, debian):
    """Runs recorded the digest of a lock without source_date_epoch: reading
    and writing it again changes neither; its builds take the default."""
    path = make_lab(tmp_path)
    lock = write_lock(path, store_of(path).image("trixie").key, dict(NEWEST))
    text = lock_path(path).read_text()
    assert "source_date_epoch" not in text
    loaded = Lock.load(lock_path(path))
    assert loaded.source_date_epoch is None and loaded.text() == text
    assert loaded.digest == lock.digest
    assert loaded.build_epoch == lockmod.DEFAULT_SOURCE_DATE_EPOCH
    store_of(path).build("trixie")
    assert debian.calls[0]["env"]["SOURCE_DATE_EPOCH"] == "1704067200"
    assert lock_path(path).read_text() == text          # its image was there: not rewritten


def test_a_lock_from_before_the_epoch_gaining_an_image_records_the_default(tmp_path, debian):
    path = make_lab(tmp_path)
    lock = write_lock(path, "0" * 16, dict(NEWEST))
    lock.images["old"] = lock.images.pop("trixie")       # no entry for trixie yet
    lock.save(lock_path(path))
    store_of(path).build("trixie")
    after = Lock.load(lock_path(path))
    assert set(after.images) == {"old", "trixie"}
    assert after.source_date_epoch == lockmod.DEFAULT_SOURCE_DATE_EPOCH


def test_cli_lock_keeps_the_locks_epoch(tmp_path, debian, capsys):
    path = make_lab(tmp_path)
    lock = write_lock(path, store_of(path).image("trixie").key, dict(NEWEST))
    lock.source_date_epoch = 1700000000
    lock.save(lock_path(path))
    assert run_cli(capsys, "--lab", str(path), "lock")[0] == 0
    assert Lock.load(lock_path(path)).source_date_epoch == 1700000000
    assert debian.calls[0]["env"]["SOURCE_DATE_EPOCH"] == "1700000000"


def test_mmdebstrap_env_sets_source_date_epoch_only_when_given(tmp_path):
    rec = images.recipe(images.ImageSpec(suite="trixie"))
    assert "SOURCE_DATE_EPOCH" not in images.mmdebstrap_env(rec, tmp_path, tmp_path / "k")
    env = images.mmdebstrap_env(rec, tmp_path, tmp_path / "k", None, 0)
    assert env["SOURCE_DATE_EPOCH"] == "0" and "UFFDLAB_PINS" not in env


def test_lock_load_refuses_a_negative_epoch(tmp_path):
    path = tmp_path / "lab.lock"
    path.write_text(json.dumps({**sample_lock().model_dump(), "source_date_epoch": -1}))
    with pytest.raises(LockError) as exc:
        Lock.load(path)
    assert str(exc.value) == (f"{path}: source_date_epoch: Input should be greater than or "
                              f"equal to 0")


# -- import against the importer's lab.lock ---------------------------------------------
def lock_b_at(tmp_path: Path, img: Image, content: str) -> Path:
    """Lab b, whose lab.lock locks image trixie (img's recipe) at `content`."""
    b = make_lab(tmp_path, "b")
    lock = write_lock(b, img.key, dict(img.packages))
    lock.images["trixie"].content_hash = content
    lock.save(lock_path(b))
    return b


def test_import_warns_when_the_lock_has_another_content(exported, tmp_path):
    img, archive = exported
    b = lock_b_at(tmp_path, img, "0" * 32)
    events: list[Event] = []
    desc, dest = import_image(load_lab(b), archive, listener=events.append)
    assert content_hash(dest) == img.content_hash                 # installed all the same
    problem = (f"content {img.content_hash}, but lab.lock locks image trixie (recipe "
               f"{img.key}) at content {'0' * 32}")
    (warning,) = [e for e in events if "lock_mismatch" in e.data]
    assert warning.data["lock_mismatch"] == problem
    assert warning.message == f"warning: {problem}; runs on it are not the locked image's"
    assert lock_mismatches(load_lab(b), desc) == [problem]


def test_import_locked_refuses_another_content_and_installs_nothing(exported, tmp_path):
    img, archive = exported
    b = lock_b_at(tmp_path, img, "0" * 32)
    lab = load_lab(b)
    with pytest.raises(ImageError) as exc:
        import_image(lab, archive, locked=True)
    assert str(exc.value) == (
        f"{archive}: refused, nothing installed: --locked: content {img.content_hash}, but "
        f"lab.lock locks image trixie (recipe {img.key}) at content {'0' * 32}")
    assert names(lab.cache_path / "images") == []


def test_import_with_the_locked_content_says_nothing(exported, tmp_path):
    img, archive = exported
    b = lock_b_at(tmp_path, img, img.content_hash)
    events: list[Event] = []
    desc, dest = import_image(load_lab(b), archive, listener=events.append, locked=True)
    assert content_hash(dest) == img.content_hash
    assert not [e for e in events if "lock_mismatch" in e.data]


def test_import_ignores_lock_entries_of_other_recipes(exported, tmp_path):
    """An entry of another recipe is another image: the archive does not boot it."""
    img, archive = exported
    b = make_lab(tmp_path, "b")
    write_lock(b, "f" * 16, dict(NEWEST))                  # content "0"*32, other recipe
    events: list[Event] = []
    import_image(load_lab(b), archive, listener=events.append)
    assert not [e for e in events if "lock_mismatch" in e.data]


@pytest.mark.parametrize("with_lock", [False, True])
def test_import_locked_needs_a_lock_entry_of_the_recipe(exported, tmp_path, with_lock):
    img, archive = exported
    b = make_lab(tmp_path, "b")
    if with_lock:
        write_lock(b, "f" * 16, dict(NEWEST))
    lab = load_lab(b)
    with pytest.raises(ImageError) as exc:
        import_image(lab, archive, locked=True)
    assert str(exc.value) == (
        f"{archive}: refused, nothing installed: --locked, but {lock_path(b)} locks no image "
        f"of recipe {img.key} ('uffdlab lock' writes one)")
    assert names(lab.cache_path / "images") == []


def test_cli_import_warns_and_locked_refuses(exported, tmp_path, capsys):
    img, archive = exported
    b = lock_b_at(tmp_path, img, "0" * 32)
    problem = (f"content {img.content_hash}, but lab.lock locks image trixie (recipe "
               f"{img.key}) at content {'0' * 32}")
    code, out, err = run_cli(capsys, "--lab", str(b), "image", "import", "--locked",
                             str(archive))
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == (f"uffdlab: ImageError: {archive}: refused, nothing "
                                    f"installed: --locked: {problem}")
    assert names(tmp_path / "b" / "cache" / "images") == []
    code, out, err = run_cli(capsys, "--lab", str(b), "image", "import", str(archive))
    assert code == 0, err
    assert out.splitlines()[-1] == (f"warning: {problem}; runs on it are not the locked "
                                    f"image's ('--locked' refuses such an archive)")
    assert f"warning: {problem}" in err                # the event, as it happened


def test_cli_import_locked_with_the_locked_content(exported, tmp_path, capsys):
    img, archive = exported
    b = lock_b_at(tmp_path, img, img.content_hash)
    code, out, err = run_cli(capsys, "--lab", str(b), "image", "import", "--locked",
                             str(archive))
    assert code == 0, err
    assert "warning" not in out + err
    assert out.splitlines()[-1] == "lab.yml images that boot it now: trixie"


# -- lock --check ------------------------------------------------------------------------
def test_lock_check_nothing_drifted(tmp_path, debian, capsys):
    path = make_lab(tmp_path)
    assert run_cli(capsys, "--lab", str(path), "lock")[0] == 0
    text = lock_path(path).read_text()
    lock = Lock.load(lock_path(path))
    code, out, err = run_cli(capsys, "--lab", str(path), "lock", "--check")
    assert code == 0, err
    assert out == (f"{lock_path(path)}: nothing drifted (1 images, guest tools "
                   f"{lock.guest_tools}, {len(lock.python)} Python distributions; lock "
                   f"{lock.digest})\n")
    assert lock_path(path).read_text() == text and len(debian.calls) == 1


def test_lock_check_names_what_drifted_and_writes_nothing(tmp_path, debian, capsys):
    path = make_lab(tmp_path)
    img = store_of(path).build("trixie")
    lock = Lock.load(lock_path(path))
    lock.images["trixie"].packages["bash"] = "5.2.15-2"
    lock.images["trixie"].content_hash = "0" * 32
    lock.images["trixie"].kernel_release = "6.12.30+deb13-cloud-amd64"
    lock.images["gone"] = lock.images["trixie"].model_copy()
    lock.guest_tools = "fedcba9876543210"
    lock.python["pydantic"] = "1.0"
    lock.python["left-behind"] = "0.1"
    lock.save(lock_path(path))
    text = lock_path(path).read_text()
    code, out, err = run_cli(capsys, "--lab", str(path), "lock", "--check")
    assert code == 1, err
    have = importlib.metadata.version("pydantic")
    lines = [
        "image gone: locked, but the lab file has no such image",
        "image trixie: kernel: locked 6.12.30+deb13-cloud-amd64, built " + KERNEL,
        f"image trixie: content: locked {'0' * 32}, built {img.content_hash} (another build)",
        "image trixie: package bash: 5.2.15-2 -> 5.2.37-2",
        f"guest tools: locked fedcba9876543210, now {tools_digest()}",
        "python: left-behind: locked 0.1, not installed now",
        f"python: pydantic: 1.0 -> {have}",
    ]
    assert out.splitlines() == [f"{lock_path(path)}: {len(lines)} differences from what is "
                                f"here now:", *(f"  {line}" for line in lines)]
    assert lock_path(path).read_text() == text and len(debian.calls) == 1


def test_lock_check_an_image_not_built_or_of_another_recipe(tmp_path, debian, capsys):
    path = make_lab(tmp_path)
    key = store_of(path).image("trixie").key
    write_lock(path, key, dict(NEWEST))
    code, out, _ = run_cli(capsys, "--lab", str(path), "lock", "--check")
    assert code == 1
    assert ("  image trixie: not built, nothing to compare ('uffdlab image build --locked "
            "trixie')") in out.splitlines()
    assert debian.calls == []                           # --check builds nothing
    write_lock(path, "f" * 16, dict(NEWEST))
    code, out, _ = run_cli(capsys, "--lab", str(path), "lock", "--check")
    assert code == 1
    assert (f"  image trixie: recipe {key}, the lock's is {'f' * 16} (its entry under "
            f"'images' changed)") in out.splitlines()


def test_lock_check_without_a_lock(tmp_path, capsys):
    path = make_lab(tmp_path)
    code, out, err = run_cli(capsys, "--lab", str(path), "lock", "--check")
    assert (code, out) == (2, "")
    assert err == (f"uffdlab: lock --check: expected a lock at {lock_path(path)}, found none "
                   f"('uffdlab lock' writes one)\n")
    assert not lock_path(path).exists()


def test_check_compares_every_part_of_the_lock():
    lock = sample_lock()
    now = lock.images["trixie"].model_copy(deep=True)
    env = dict(lock.python)
    same = lockmod.check(lock, {"trixie": now.recipe_key}, {"trixie": now}, lock.guest_tools,
                         env)
    assert same == []
    now.packages = {**now.packages, "strace": "6.13"}
    del now.packages["bash"]
    got = lockmod.check(lock, {"trixie": now.recipe_key, "new": "1" * 16}, {"trixie": now},
                        lock.guest_tools, {**env, "numpy": "2.1"})
    assert got == ["image new: not in the lock ('uffdlab lock' adds it)",
                   "image trixie: package bash: locked 5.2.37-2, not installed now",
                   "image trixie: package strace: not locked, built 6.13",
                   "python: numpy: not locked, installed 2.1"]
    empty = Lock()
    assert lockmod.check(empty, {}, {}, "abc", {}) == ["guest tools: locked (none), now abc"]
