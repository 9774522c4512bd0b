# SPDX-License-Identifier: MIT
"""Kernels built from a source tree: lab.yml's kernel.tree, base, config and
make_args, and KernelStore configuring, building, caching and refusing.

Builds run against a fake kernel tree (fake_tree below): a Makefile with the
targets the lab runs, each doing next to nothing, and a merge_config.sh that
concatenates. It mocks the layer below kernel.py; the real tree is the
integration tests'. Every fake make or merge_config.sh run appends a line to
a counter file outside the tree, so a test can tell whether make ran. A fake
gcc and ld first on PATH keep cache keys independent of the host's toolchain.
"""
from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from uffdlab import kernel
from uffdlab.config import ConfigError, KernelSpec, Lab, load_lab
from uffdlab.digest import file_digest
from uffdlab.events import Event
from uffdlab.images import ImageStore, is_bzimage
from uffdlab.kernel import (
    KernelError,
    KernelStore,
    build_env,
    compiler_version,
    content_hash,
    linker_version,
    read_config,
    source_state,
)
from uffdlab.model import Kind
from uffdlab.owned import ProcessId, make_vm_dir
from uffdlab.tools import sources_tarball
from uffdlab.vm import VM, VMError, VMState, kernel_digest

RELEASE = "6.12.0-fake"
GCC_VERSION = "gcc (Fake 13.2.0-1) 13.2.0"
LD_VERSION = "GNU ld (Fake Binutils) 2.99"
COMPILER_ERROR = "mm/foo.c:3:1: error: expected ';' before '}' token"
CONFIG_ERROR = "arch/x86/Kconfig:12: syntax error, unexpected endif"

# Recipe lines start with a tab; a backslash at a line's end joins it to the
# next in this Python string, so make sees one recipe line. $(FAKE_*) come
# from the environment: what a test wants to go wrong (see the fixture `kit`).
FAKE_MAKEFILE = """\
# A fake kernel Makefile: each target uffdlab runs, done cheaply.
ifneq ($(ARCH),x86_64)
$(error expected ARCH=x86_64, got '$(ARCH)')
endif
ifeq ($(O),)
$(error expected O=: the lab builds out of tree)
endif
NEEDED := {needed}
.PHONY: tinyconfig x86_64_defconfig olddefconfig bzImage headers_install kernelrelease

# every needed option =y, but those in FAKE_BASE_DROP; FAKE_CONFIG_ERROR names
# a config step that fails as Kconfig does, after some kbuild progress lines
tinyconfig x86_64_defconfig:
\t@echo "$@" >> "$(FAKE_COUNTER)"
\t@if [ "$(FAKE_CONFIG_ERROR)" = "$@" ]; then echo "  HOSTCC  scripts/kconfig/conf.o"; \
echo "{config_error}" >&2; exit 2; fi
\t@mkdir -p "$(O)"
\t@printf 'CONFIG_%s=y\\n' $(filter-out $(FAKE_BASE_DROP),$(NEEDED)) > "$(O)/.config"
\t@echo 'CONFIG_BASE_TARGET="$@"' >> "$(O)/.config"

# the options in FAKE_DEPENDS_OFF have a dependency that is off: dropped
olddefconfig:
\t@echo "$@" >> "$(FAKE_COUNTER)"
\t@if [ "$(FAKE_CONFIG_ERROR)" = "$@" ]; then echo "  HOSTCC  scripts/kconfig/conf.o"; \
echo "{config_error}" >&2; exit 2; fi
\t@for o in $(FAKE_DEPENDS_OFF); do sed -i "/^CONFIG_$$o=/d" "$(O)/.config"; \
echo "# CONFIG_$$o is not set" >> "$(O)/.config"; done

bzImage:
\t@echo "$@ KCFLAGS=$(KCFLAGS)" >> "$(FAKE_COUNTER)"
\t@echo "  CC      mm/userfaultfd.o"
\t@echo "  CC      mm/memory.o"
\t@echo "  CC [M]  fs/fuse/inode.o"
\t@echo "  LD      vmlinux"
\t@if [ -n "$(FAKE_COMPILE_ERROR)" ]; then echo "{compiler_error}"; \
echo "make[3]: *** [scripts/Makefile.build:229: mm/foo.o] Error 1"; exit 2; fi
\t@mkdir -p "$(O)/arch/x86/boot"
\t@cp fake-bzImage "$(O)/arch/x86/boot/bzImage"

headers_install:
\t@echo "$@" >> "$(FAKE_COUNTER)"
\t@mkdir -p "$(INSTALL_HDR_PATH)/include/linux" "$(INSTALL_HDR_PATH)/include/asm"
\t@echo '#define UFFDIO_API 0x3F' > "$(INSTALL_HDR_PATH)/include/linux/userfaultfd.h"
\t@echo '#define __NR_userfaultfd 323' > "$(INSTALL_HDR_PATH)/include/asm/unistd_64.h"

kernelrelease:
\t@echo {release}
"""

# merge_config.sh -m -O DIR BASE FRAGMENT...: concatenated, so the last
# assignment of an option wins (read_config reads it that way too).
FAKE_MERGE = """\
#!/bin/sh
set -e
[ "$ARCH" = x86_64 ] || { echo "expected ARCH=x86_64 in the environment" >&2; exit 1; }
[ -f Kconfig ] || { echo "expected to run in the tree" >&2; exit 1; }
[ "$1" = -m ] && [ "$2" = -O ] || { echo "expected -m -O DIR" >&2; exit 1; }
out=$3
shift 3
echo "merge_config.sh $*" >> "$FAKE_COUNTER"
if [ "$FAKE_CONFIG_ERROR" = merge_config.sh ]; then
    echo "Using $1 as base"
    echo "{config_error}" >&2
    exit 1
fi
cat "$@" > "$out/.config.merging"
mv "$out/.config.merging" "$out/.config"
"""


def fake_bzimage(release: str) -> bytes:
    """Just enough of the x86 boot header for is_bzimage and bzimage_release."""
    data = bytearray(0x4000)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x20E, 0x1000)      # kernel_version, relative to 0x200
    text = f"{release} (fake@uffdlab) #1 SMP".encode()
    data[0x1200:0x1200 + len(text)] = text
    return bytes(data)


def fake_tree(tree: Path) -> Path:
    """A directory that passes for a kernel tree and builds in milliseconds."""
    files = {
        "Makefile": FAKE_MAKEFILE.replace("{needed}", " ".join(kernel.NEEDED_OPTIONS))
        .replace("{compiler_error}", COMPILER_ERROR).replace("{release}", RELEASE)
        .replace("{config_error}", CONFIG_ERROR),
        "Kconfig": 'mainmenu "Fake Linux"\n',
        "arch/x86/Kconfig": "config X86\n\tdef_bool y\n",
        "kernel/configs/kvm_guest.config": 'CONFIG_KVM_GUEST=y\nCONFIG_LOCALVERSION="-kvm"\n',
        "mm/userfaultfd.c": "int uffd_version = 1;\n",
        "scripts/kconfig/merge_config.sh": FAKE_MERGE.replace("{config_error}", CONFIG_ERROR),
    }
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    (tree / "scripts/kconfig/merge_config.sh").chmod(0o755)
    (tree / "fake-bzImage").write_bytes(fake_bzimage(RELEASE))
    return tree


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


def lab_text(*kernel_lines: str) -> str:
    """A lab whose image `dev` has these lines under `kernel:`, from line 8 on."""
    body = "".join(f"      {line}\n" for line in kernel_lines)
    return ("cache_dir: cache\nimages:\n  trixie:\n    suite: trixie\n"
            "  dev:\n    suite: trixie\n    kernel:\n" + body +
            "vms:\n  guest:\n    image: dev\n")
#  1 cache_dir / 2 images / 3 trixie / 4 suite / 5 dev / 6 suite / 7 kernel /
#  8... the kernel lines


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> tuple[str, list[str]]:
    path = tmp_path / "lab.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_lab(path)
    return str(path), exc.value.problems


def git(repo: Path, *args: str) -> str:
    """git in `repo`, as a user of its own (no global identity or signing needed)."""
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=uffdlab tests",
         "-c", "user.email=tests@uffdlab.invalid", "-c", "commit.gpgsign=false", *args],
        check=True, capture_output=True, text=True).stdout


def log_named_in(error: str) -> Path:
    """The failed build's log that a KernelError's last line names."""
    m = re.search(r"^full build log: (.+)$", error, re.MULTILINE)
    assert m, error
    return Path(m[1])


@dataclass
class Kit:
    """A fake tree at ROOT/linux, a lab file next to it, and what ran."""

    root: Path
    events: list[Event] = field(default_factory=list)

    @property
    def tree(self) -> Path:
        return self.root / "linux"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def lab(self, *kernel_lines: str) -> Lab:
        path = self.root / "lab.yml"
        path.write_text(lab_text("tree: linux", *kernel_lines))
        return load_lab(path)

    def store(self, *kernel_lines: str) -> KernelStore:
        return KernelStore(self.lab(*kernel_lines), self.events.append)

    def runs(self) -> list[str]:
        """Every fake make target or merge_config.sh run, in order."""
        counter = self.root / "make-runs"
        return counter.read_text().splitlines() if counter.exists() else []

    def compiles(self) -> int:
        return sum(r.startswith("bzImage") for r in self.runs())

    def fragment(self, name: str, text: str) -> str:
        (self.root / name).write_text(text)
        return name


@pytest.fixture(autouse=True)
def fresh_states(monkeypatch):
    """source_state remembers a tree's state for STATE_TTL seconds; these tests
    edit trees between calls and must see every edit."""
    monkeypatch.setattr(kernel, "STATE_TTL", 0.0)
    monkeypatch.setattr(kernel, "_states", {})


@pytest.fixture
def bin_dir(tmp_path, monkeypatch) -> Path:
    """A directory first on PATH, with a fake gcc and ld in it, and none of
    the build variables a key depends on in the environment."""
    d = tmp_path / "bin"
    executable(d / "gcc", f'echo "{GCC_VERSION}"\necho "Copyright (C) fake"\n')
    executable(d / "ld", f'echo "{LD_VERSION}"\necho "Copyright (C) fake"\n')
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
    for var in kernel.BUILD_ENV:
        monkeypatch.delenv(var, raising=False)
    return d


@pytest.fixture
def kit(tmp_path, monkeypatch, bin_dir) -> Kit:
    fake_tree(tmp_path / "linux")
    monkeypatch.setenv("FAKE_COUNTER", str(tmp_path / "make-runs"))
    for var in ("FAKE_BASE_DROP", "FAKE_DEPENDS_OFF", "FAKE_COMPILE_ERROR",
                "FAKE_CONFIG_ERROR"):
        monkeypatch.delenv(var, raising=False)
    return Kit(tmp_path)


# -- lab.yml: kernel.tree, base, config, make_args ----------------------------------

SHELLISH = "(no spaces, quotes or shell characters)"

# (id, lines under kernel:, expected problems with {f} for the file)
BAD_KERNEL = [
    ("tree-and-vmlinuz", ["tree: linux", "vmlinuz: k/bzImage"],
     ["{f}:7: images.dev.kernel: expected one of 'package', 'vmlinuz' or 'tree', "
      "got vmlinuz 'k/bzImage' and tree 'linux'"]),
    ("tree-and-package", ["package: linux-image-amd64", "tree: linux"],
     ["{f}:7: images.dev.kernel: expected one of 'package', 'vmlinuz' or 'tree', "
      "got package 'linux-image-amd64' and tree 'linux'"]),
    ("all-three", ["package: linux-image-amd64", "vmlinuz: k/bzImage", "tree: linux"],
     ["{f}:7: images.dev.kernel: expected one of 'package', 'vmlinuz' or 'tree', "
      "got package 'linux-image-amd64' and vmlinuz 'k/bzImage' and tree 'linux'"]),
    ("base-without-tree", ["base: small"],
     ["{f}:7: images.dev.kernel: expected 'base' only with 'tree', "
      "a kernel source tree to build"]),
    ("default-base-named-without-tree", ["package: linux-image-amd64", "base: defconfig"],
     ["{f}:7: images.dev.kernel: expected 'base' only with 'tree', "
      "a kernel source tree to build"]),
    ("config-with-vmlinuz", ["vmlinuz: k/bzImage", "config: [uffd.config]"],
     ["{f}:7: images.dev.kernel: expected 'config' only with 'tree', "
      "a kernel source tree to build"]),
    ("make-args-with-package", ["package: linux-image-amd64", "make_args: [LLVM=1]"],
     ["{f}:7: images.dev.kernel: expected 'make_args' only with 'tree', "
      "a kernel source tree to build"]),
    ("every-tree-option-without-tree",
     ["base: small", "config: [uffd.config]", "make_args: [LLVM=1]"],
     ["{f}:7: images.dev.kernel: expected 'base', 'config', 'make_args' only with "
      "'tree', a kernel source tree to build"]),
    ("initrd-with-tree", ["tree: linux", "initrd: boot/initrd.img"],
     ["{f}:7: images.dev.kernel: expected 'initrd' only with a local 'vmlinuz', got "
      "initrd 'boot/initrd.img' and no vmlinuz (a packaged kernel brings its own "
      "initrd; a tree's kernel boots without one)"]),
    ("unknown-base", ["tree: linux", "base: tiny"],
     ["{f}:9: images.dev.kernel.base: expected 'defconfig' or 'small', got 'tiny'"]),
    ("make-arg-typo", ["tree: linux", "make_arg: [LLVM=1]"],
     ["{f}:9: images.dev.kernel.make_arg: unknown key 'make_arg' "
      "(did you mean 'make_args'?)"]),
    ("make-args-not-a-list", ["tree: linux", "make_args: LLVM=1"],
     ["{f}:9: images.dev.kernel.make_args: expected a list, got 'LLVM=1'"]),
    ("make-arg-a-number", ["tree: linux", "make_args: [1]"],
     ["{f}:9: images.dev.kernel.make_args.0: expected a string, got 1"]),
    ("two-bad-make-args", ["tree: linux", "make_args:", "  - O=/tmp/out", "  - KCFLAGS=-O2 -g"],
     ["{f}:10: images.dev.kernel.make_args.0: expected a variable the lab does not set "
      "itself (O, ARCH, INSTALL_HDR_PATH, KCONFIG_CONFIG are), got 'O=/tmp/out'",
      "{f}:11: images.dev.kernel.make_args.1: expected a make variable assignment like "
      f"'KCFLAGS=-O2' {SHELLISH}, got 'KCFLAGS=-O2 -g'"]),
]


@pytest.mark.parametrize("lines,expected", [(x[1], x[2]) for x in BAD_KERNEL],
                         ids=[x[0] for x in BAD_KERNEL])
def test_bad_kernel_spec_exact_messages(tmp_path, lines, expected):
    """One located problem per mistake, naming every source given at once."""
    f, found = problems(tmp_path, lab_text(*lines))
    assert found == [e.format(f=f) for e in expected]


@pytest.mark.parametrize("arg", [
    "KCFLAGS=-O2 -g", "KCFLAGS=-O2\t-g", "CC=gcc;reboot", "CC=`id`", "CC=$(shell id)",
    "CC=$HOME/cc", "X=a|b", "X=a&b", "X=a>b", "X=a<b", "X='q'", 'X="q"', "X=a\\b",
    "-j8", "V", "=1", "1X=2", "KCFLAGS =-O2",
])
def test_make_args_refuse_what_is_not_one_plain_assignment(tmp_path, arg):
    """make gets each as one argv entry; still no shell text or second argument
    hides in one (they show in logs and in commands users copy)."""
    f, found = problems(tmp_path, lab_text("tree: linux", f"make_args: [{json.dumps(arg)}]"))
    assert found == [f"{f}:9: images.dev.kernel.make_args.0: expected a make variable "
                     f"assignment like 'KCFLAGS=-O2' {SHELLISH}, got {arg!r}"]


@pytest.mark.parametrize("arg", ["O=/tmp/out", "ARCH=arm64", "INSTALL_HDR_PATH=/tmp/h",
                                 "KCONFIG_CONFIG=.other-config"])
def test_make_args_refuse_the_variables_the_lab_sets(tmp_path, arg):
    f, found = problems(tmp_path, lab_text("tree: linux", "make_args:", f"  - {arg}"))
    assert found == [f"{f}:10: images.dev.kernel.make_args.0: expected a variable the lab "
                     f"does not set itself (O, ARCH, INSTALL_HDR_PATH, KCONFIG_CONFIG are), "
                     f"got {arg!r}"]


GOOD_MAKE_ARGS = ["KCFLAGS=-Og", "LLVM=1", "LLVM=-17", "CC=clang-17", "W=1", "V=1",
                  "KCFLAGS=", "CROSS_COMPILE=x86_64-linux-gnu-", "KCFLAGS=-march=native",
                  "LOCALVERSION=-uffd+", "KCFLAGS=-Wl,-z,now", "HOSTCC=/usr/bin/gcc-13"]


def test_a_full_tree_spec_loads(tmp_path):
    path = tmp_path / "lab.yml"
    path.write_text(lab_text("tree: ../src/linux", "base: small",
                             "config: [frags/uffd.config, /abs/debug.config]",
                             f"make_args: {json.dumps(GOOD_MAKE_ARGS)}",
                             "cmdline: nokaslr"))
    spec = load_lab(path).images["dev"].kernel
    assert (spec.tree, spec.base, spec.cmdline) == (Path("../src/linux"), "small", "nokaslr")
    assert spec.config == [Path("frags/uffd.config"), Path("/abs/debug.config")]
    assert spec.make_args == GOOD_MAKE_ARGS
    assert (spec.is_tree, spec.is_local, spec.package_name) == (True, True, None)


def test_tree_spec_defaults_and_other_kernels_are_not_trees():
    tree = KernelSpec(tree=Path("linux"))
    assert (tree.base, tree.config, tree.make_args, tree.initrd) == ("defconfig", [], [], None)
    packaged, local = KernelSpec(), KernelSpec(vmlinuz=Path("k/bzImage"))
    assert not packaged.is_tree and packaged.package_name == "linux-image-cloud-amd64"
    assert not local.is_tree and local.is_local


def test_kernel_paths_resolve_against_the_lab_file(tmp_path):
    path = tmp_path / "sub" / "lab.yml"
    path.parent.mkdir()
    path.write_text(lab_text("tree: ../linux", "config: [uffd.config]"))
    lab = load_lab(path)
    spec = lab.images["dev"].kernel
    assert lab.kernel_path(spec.tree) == tmp_path / "sub" / ".." / "linux"
    assert lab.kernel_path(spec.config[0]) == tmp_path / "sub" / "uffd.config"


# -- KernelStore: which tree, which fragments ----------------------------------------


@pytest.mark.parametrize("missing", ["Makefile", "Kconfig", "arch/x86/Kconfig"])
def test_tree_refuses_a_directory_that_is_not_a_kernel_tree(kit, missing):
    (kit.tree / missing).unlink()
    store = kit.store()
    with pytest.raises(ConfigError) as exc:
        store.tree("dev")
    assert exc.value.problems == [
        f"{kit.root / 'lab.yml'}:8: images.dev.kernel.tree: expected a Linux source tree, "
        f"got '{kit.tree}' (it has no {missing})"]
    with pytest.raises(ConfigError):               # and so does everything built on it
        store.current("dev")


def test_tree_refuses_a_missing_directory(kit):
    store = KernelStore(load_lab(_write(kit.root / "lab.yml", lab_text("tree: nowhere"))))
    with pytest.raises(ConfigError, match=r"lab.yml:8: images.dev.kernel.tree: expected a "
                       r"Linux source tree, got '.*/nowhere' \(it has no Makefile\)$"):
        store.tree("dev")


# A tree without kernel/configs/kvm_guest.config (Linux before 5.10 kept it in
# arch/x86/configs/) is refused by tree() with a located ConfigError, not a
# FileNotFoundError from hashing the missing fragment later.
def test_tree_without_kvm_guest_config_is_a_config_error(kit):
    (kit.tree / "kernel/configs/kvm_guest.config").unlink()
    with pytest.raises(ConfigError, match=r"images.dev.kernel.tree: .*kvm_guest.config"):
        kit.store().current("dev")


def test_fragments_refuse_a_missing_fragment(kit):
    kit.fragment("uffd.config", "CONFIG_USERFAULTFD=y\n")
    store = kit.store("config:", "  - uffd.config", "  - frags/missing.config")
    with pytest.raises(ConfigError) as exc:
        store.fragments("dev")
    assert exc.value.problems == [
        f"{kit.root / 'lab.yml'}:11: images.dev.kernel.config.1: expected an existing "
        f"config fragment, got '{kit.root / 'frags/missing.config'}'"]
    with pytest.raises(ConfigError):               # a key needs every fragment's content
        store.build("dev")
    assert kit.runs() == []


def test_fragments_in_merge_order(kit):
    """kvm_guest.config, then the lab's own, then the user's in lab.yml order:
    the last one to set an option wins."""
    kit.fragment("b.config", "")
    kit.fragment("a.config", "")
    store = kit.store("config: [b.config, a.config]")
    assert store.fragments("dev") == [kit.tree / "kernel/configs/kvm_guest.config",
                                      kernel.LOCAL_CONFIG, kit.root / "b.config",
                                      kit.root / "a.config"]


@pytest.mark.parametrize("kernel_lines,what", [
    ([], "the package linux-image-cloud-amd64"),
    (["kernel: {package: linux-image-rt-amd64}"], "the package linux-image-rt-amd64"),
    (["kernel: {vmlinuz: k/bzImage}"], "the local bzImage 'k/bzImage'"),
])
def test_spec_refuses_an_image_without_a_tree(tmp_path, kernel_lines, what):
    text = lab_text("tree: linux").replace(
        "  trixie:\n    suite: trixie\n",
        "  trixie:\n    suite: trixie\n" + "".join(f"    {x}\n" for x in kernel_lines))
    lab = load_lab(_write(tmp_path / "lab.yml", text))
    with pytest.raises(ConfigError) as exc:
        KernelStore(lab).spec("trixie")
    where = f"{tmp_path / 'lab.yml'}:5" if kernel_lines else str(tmp_path / "lab.yml")
    assert exc.value.problems == [f"{where}: images.trixie.kernel: expected a kernel 'tree' "
                                  f"to build; this image's kernel is {what}"]


# -- KernelStore.build ----------------------------------------------------------------


def test_build_makes_bzimage_config_headers_and_meta(kit):
    frag = kit.fragment("uffd.config", "CONFIG_UFFD_TEST_OPTION=y\n")
    store = kit.store(f"config: [{frag}]")
    out = store.build("dev")
    assert out == store.current("dev")
    assert out.dir.parent == store.tree_dir("dev") / "out"
    assert is_bzimage(out.bzimage)
    assert out.bzimage.read_bytes() == fake_bzimage(RELEASE)
    config = read_config(out.config)
    assert config["USERFAULTFD"] == "y" and config["UFFD_TEST_OPTION"] == "y"
    assert config["BASE_TARGET"] == '"x86_64_defconfig"'
    with tarfile.open(out.headers_tar) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert "include/linux/userfaultfd.h" in members
        assert tar.extractfile("include/linux/userfaultfd.h").read() == \
            b"#define UFFDIO_API 0x3F\n"
    assert all(m.uid == 0 and m.mtime == 0 and m.uname == "" for m in members.values())
    meta = out.meta
    assert (meta["release"], meta["key"], meta["image"], meta["base"]) == \
        (RELEASE, out.dir.name, "dev", "defconfig")
    assert (meta["compiler"], meta["units"], meta["tree"]) == (GCC_VERSION, 3, str(kit.tree))
    assert (meta["linker"], meta["env"]) == (LD_VERSION, {})
    log = (out.dir / "build.log").read_text()
    assert "$ make -C" in log and "  CC      mm/memory.o" in log
    assert sorted(p.name for p in out.dir.iterdir()) == \
        ["build.log", "bzImage", "config", "headers.tar", "meta.json"]
    assert [p.name for p in out.dir.parent.iterdir()] == [out.dir.name]    # no scratch left


def test_build_runs_make_in_order_out_of_tree_with_the_make_args(kit):
    frag = kit.fragment("uffd.config", "")
    store = kit.store(f"config: [{frag}]", "make_args: [KCFLAGS=-Og]")
    store.build("dev")
    bdir = store.build_dir("dev")
    assert kit.runs() == [
        "x86_64_defconfig",
        f"merge_config.sh {bdir / '.config'} {kit.tree / 'kernel/configs/kvm_guest.config'} "
        f"{kernel.LOCAL_CONFIG} {kit.root / frag}",
        "olddefconfig", "bzImage KCFLAGS=-Og", "headers_install"]
    assert (bdir / ".config").is_file()                  # O= is the build dir, kept
    assert not (kit.tree / ".config").exists()           # nothing written into the tree
    assert bdir.parent == store.tree_dir("dev")


def test_the_users_fragment_wins_over_the_lab_fragments(kit):
    """kvm_guest.config sets LOCALVERSION; a user's fragment, merged last, wins."""
    frag = kit.fragment("mine.config", 'CONFIG_LOCALVERSION="-mine"\n')
    assert read_config(kit.store().build("dev").config)["LOCALVERSION"] == '"-kvm"'
    assert read_config(kit.store(f"config: [{frag}]").build("dev").config)[
        "LOCALVERSION"] == '"-mine"'


def test_build_emits_building_and_progress_events(kit):
    kit.store().build("dev")
    assert {e.subject for e in kit.events} == {"dev"}
    building = [e for e in kit.events if e.kind == Kind.BUILDING]
    progress = [e for e in kit.events if e.kind == Kind.PROGRESS]
    assert building[0].message == "configuring linux: defconfig base + 2 fragments"
    assert "installing the UAPI headers" in [e.message for e in building]
    assert building[-1].message.startswith(f"kernel {RELEASE} built: 3 units in ")
    assert building[-1].data["units"] == 3
    # the first unit reports at once, against the estimate for a first build
    assert progress[0].data == {"done": 1, "total": kernel.UNIT_ESTIMATE["defconfig"]}
    assert progress[0].message == f"compiling: 1/~{kernel.UNIT_ESTIMATE['defconfig']} units"


def test_the_next_build_estimates_from_this_build_dirs_count(kit):
    store = kit.store()
    store.build("dev")
    assert (store.build_dir("dev") / ".uffdlab-units").read_text() == "3\n"
    kit.events.clear()
    store.build("dev", force=True)
    progress = [e for e in kit.events if e.kind == Kind.PROGRESS]
    assert progress[0].data == {"done": 1, "total": 3}


def test_a_second_build_is_a_no_op(kit):
    store = kit.store()
    first = store.build("dev")
    runs, built_at = kit.runs(), first.meta["built_at"]
    kit.events.clear()
    again = kit.store().build("dev")                   # a new store: nothing in memory
    assert again == first and kit.runs() == runs       # make did not run at all
    assert again.meta["built_at"] == built_at
    [ev] = kit.events
    assert ev.kind == Kind.BUILDING and ev.data["cached"] is True
    assert ev.message.startswith(f"kernel {RELEASE} is built ({first.dir.name}, checked in ")


def test_a_source_edit_rebuilds_in_the_same_build_dir(kit):
    store = kit.store()
    first, bdir = store.build("dev"), store.build_dir("dev")
    (kit.tree / "mm/userfaultfd.c").write_text("int uffd_version = 2;\n")
    assert store.current("dev") != first
    second = store.build("dev")
    assert second.dir.name != first.dir.name and kit.compiles() == 2
    assert store.build_dir("dev") == bdir              # make rebuilds only what changed
    assert first.bzimage.is_file()                     # the older build is kept too


def test_a_fragment_edit_changes_the_build_dir(kit):
    frag = kit.fragment("uffd.config", "CONFIG_A=y\n")
    store = kit.store(f"config: [{frag}]")
    first, bdir = store.build("dev"), store.build_dir("dev")
    kit.fragment("uffd.config", "CONFIG_A=y\nCONFIG_B=y\n")
    assert store.build_dir("dev") != bdir
    second = store.build("dev")
    assert second.dir.name != first.dir.name and kit.compiles() == 2
    assert read_config(second.config)["B"] == "y"
    assert sorted(p.name for p in store.tree_dir("dev").glob("build-*")) == \
        sorted([bdir.name, store.build_dir("dev").name])


def test_make_args_and_base_are_part_of_the_build_dir(kit):
    dirs = {kit.store().build_dir("dev"), kit.store("make_args: [KCFLAGS=-Og]").build_dir("dev"),
            kit.store("base: defconfig", "make_args: [KCFLAGS=-O1]").build_dir("dev")}
    assert len(dirs) == 3
    assert kit.store("base: defconfig").build_dir("dev") == kit.store().build_dir("dev")


def test_another_compiler_changes_the_key_not_the_build_dir(kit, bin_dir):
    store = kit.store()
    first, bdir = store.build("dev"), store.build_dir("dev")
    executable(bin_dir / "gcc", 'echo "gcc (Fake 14.1.0-1) 14.1.0"\n')
    second = store.build("dev")
    assert second != first and kit.compiles() == 2 and store.build_dir("dev") == bdir
    assert second.meta["compiler"] == "gcc (Fake 14.1.0-1) 14.1.0"


# Flags make reads from the environment (kbuild.rst) change the kernel while
# lab.yml stays as it is: another key, the same build directory.
def test_build_flags_in_the_environment_change_the_key(kit, monkeypatch):
    store = kit.store()
    first, bdir = store.build("dev"), store.build_dir("dev")
    monkeypatch.setenv("KCFLAGS", "-Og")
    assert store.current("dev") != first
    second = store.build("dev")
    assert kit.runs()[-2] == "bzImage KCFLAGS=-Og"            # what make saw
    assert second.meta["env"] == {"KCFLAGS": "-Og"} and store.build_dir("dev") == bdir
    monkeypatch.setenv("KCFLAGS", "-O1")
    assert store.current("dev") not in (first, second)
    monkeypatch.delenv("KCFLAGS")
    assert store.current("dev") == first                       # cached still: no make
    assert kit.compiles() == 2


@pytest.mark.parametrize("var,value", [("KCPPFLAGS", "-DUFFD_DEBUG"), ("KAFLAGS", "-g"),
                                       ("LLVM_IAS", "0"), ("HOSTCC", "gcc-13")])
def test_other_build_variables_in_the_environment_change_the_key(kit, monkeypatch, var, value):
    store = kit.store()
    before = store.key("dev")
    monkeypatch.setenv(var, value)
    assert store.key("dev") != before


def test_the_environment_counts_only_where_make_args_do_not_override_it(kit, monkeypatch):
    """A make_args assignment wins over the environment's (make's command
    line does), so the environment's value does not make another kernel."""
    store = kit.store("make_args: [KCFLAGS=-Og]")
    before = store.key("dev")
    monkeypatch.setenv("KCFLAGS", "-O1")
    monkeypatch.setenv("KBUILD_BUILD_USER", "someone")         # not a build variable
    monkeypatch.setenv("KCPPFLAGS", "")                        # empty: as unset for make
    assert store.key("dev") == before
    assert build_env(["KCFLAGS=-Og"]) == {}
    assert build_env([]) == {"KCFLAGS": "-O1"}


def test_another_linker_changes_the_key(kit, monkeypatch):
    store = kit.store()
    first = store.build("dev")
    monkeypatch.setattr(kernel, "linker_version", lambda make_args: "GNU ld (Fake) 3.0")
    assert store.current("dev") != first
    assert store.build("dev").meta["linker"] == "GNU ld (Fake) 3.0"
    assert kit.compiles() == 2


def test_force_rebuilds_the_same_key(kit):
    store = kit.store()
    first = store.build("dev")
    (first.dir / "marker").write_text("from the first build\n")
    again = store.build("dev", force=True)
    assert again == first and kit.compiles() == 2
    assert not (again.dir / "marker").exists() and is_bzimage(again.bzimage)


def test_only_the_newest_builds_are_kept(kit, monkeypatch):
    monkeypatch.setattr(kernel, "KEEP_BUILDS", 2)
    store = kit.store()
    keys = []
    for n in range(3):
        (kit.tree / "mm/userfaultfd.c").write_text(f"int uffd_version = {n + 10};\n")
        keys.append(store.build("dev").dir.name)
    assert sorted(p.name for p in (store.tree_dir("dev") / "out").iterdir()) == sorted(keys[1:])


def _assert_nothing_cached(kit: Kit, store: KernelStore) -> None:
    assert not store.current("dev").dir.exists()
    out = store.tree_dir("dev") / "out"
    assert not out.exists() or list(out.iterdir()) == []          # no scratch dir left


@pytest.mark.parametrize("env,option", [
    ("FAKE_DEPENDS_OFF", "PTE_MARKER_UFFD_WP"),      # olddefconfig dropped it
    ("FAKE_BASE_DROP", "ADVISE_SYSCALLS"),           # the base lacks it, no fragment adds it
])
def test_a_needed_option_missing_fails_and_caches_nothing(kit, monkeypatch, env, option):
    monkeypatch.setenv(env, option)
    store = kit.store()
    with pytest.raises(KernelError) as exc:
        store.build("dev")
    lines = str(exc.value).splitlines()
    assert lines[0] == ("the merged config of dev lacks options the lab needs (a dependency "
                        "is off, or a fragment turned it off):")
    assert lines[1] == f"  CONFIG_{option} is not set: {kernel.NEEDED_OPTIONS[option]}"
    assert len(lines) == 3
    log = log_named_in(str(exc.value))
    assert log.parent == kit.cache / "kernels" and log.is_file()
    assert re.fullmatch(r"failed-dev-\d{8}-\d{6}\.log", log.name)
    assert "$ make -C" in log.read_text() and "olddefconfig" in log.read_text()
    assert kit.compiles() == 0
    _assert_nothing_cached(kit, store)


def test_a_fragment_turning_a_needed_option_off_fails(kit):
    frag = kit.fragment("nowp.config", "# CONFIG_PTE_MARKER_UFFD_WP is not set\n")
    with pytest.raises(KernelError, match="  CONFIG_PTE_MARKER_UFFD_WP is not set: uffd-wp "
                       "on shmem does not survive zaps\n"):
        kit.store(f"config: [{frag}]").build("dev")
    assert kit.compiles() == 0


def test_a_fragment_option_lost_to_a_dependency_is_reported(kit, monkeypatch):
    """The build goes on (the option is not one the lab needs), but says so."""
    monkeypatch.setenv("FAKE_DEPENDS_OFF", "KCSAN")
    frag = kit.fragment("debug.config", "CONFIG_KCSAN=y\nCONFIG_KASAN=y\n")
    kit.store(f"config: [{frag}]").build("dev")
    [lost] = [e for e in kit.events if e.data.get("dropped")]
    assert lost.kind == Kind.BUILDING and lost.data["dropped"] == ["KCSAN"]
    assert lost.message == ("debug.config: not in the final config (a dependency is off): "
                            "CONFIG_KCSAN=y")


def test_a_compile_failure_shows_the_compiler_line_and_caches_nothing(kit, monkeypatch):
    monkeypatch.setenv("FAKE_COMPILE_ERROR", "1")
    store = kit.store()
    with pytest.raises(KernelError) as exc:
        store.build("dev")
    msg = str(exc.value)
    assert msg.startswith("make bzImage failed (exit 2) after 3 units:\n")
    assert f"\n  {COMPILER_ERROR}\n" in msg
    assert "make[3]: *** [scripts/Makefile.build:229: mm/foo.o] Error 1" in msg
    assert COMPILER_ERROR in log_named_in(msg).read_text()
    _assert_nothing_cached(kit, store)
    # the build dir stays, and the next build after the fix goes through
    monkeypatch.delenv("FAKE_COMPILE_ERROR")
    assert is_bzimage(store.build("dev").bzimage)


@pytest.mark.parametrize("step,what,code", [
    ("x86_64_defconfig", "make x86_64_defconfig", 2),
    ("merge_config.sh", "merge_config.sh", 1),
    ("olddefconfig", "make olddefconfig", 2),
])
def test_a_failed_config_step_shows_what_it_said_and_caches_nothing(kit, monkeypatch, step,
                                                                    what, code):
    """As a compile failure shows the compiler's lines: the step's own last
    lines, without kbuild's progress lines or make's directory changes."""
    monkeypatch.setenv("FAKE_CONFIG_ERROR", step)
    store = kit.store()
    with pytest.raises(KernelError) as exc:
        store.build("dev")
    msg = str(exc.value)
    lines = msg.splitlines()
    assert lines[0] == f"{what} failed (exit {code}):"
    assert f"  {CONFIG_ERROR}" in lines
    if what.startswith("make "):
        assert lines[-2] == f"  make: *** [Makefile:{_rule_line(kit, step)}: {step}] Error 2"
    assert not any("HOSTCC" in line or "directory" in line for line in lines)
    assert lines[-1].startswith("full build log: ")
    log = log_named_in(msg).read_text()
    assert CONFIG_ERROR in log and "HOSTCC" not in msg
    assert kit.compiles() == 0
    _assert_nothing_cached(kit, store)


def _rule_line(kit: Kit, target: str) -> int:
    """The line of the fake Makefile's recipe that fails for `target`."""
    text = (kit.tree / "Makefile").read_text().splitlines()
    rule = next(i for i, line in enumerate(text) if re.match(rf"(\S+ )*{target}( \S+)*:", line))
    return next(i + 1 for i in range(rule, len(text)) if "FAKE_CONFIG_ERROR" in text[i])


def test_a_failed_step_shows_only_its_last_lines(tmp_path):
    with open(tmp_path / "log", "w") as logf, pytest.raises(KernelError) as exc:
        kernel._run(["sh", "-c", "for i in $(seq 30); do echo line $i; echo; done; exit 3"],
                    logf, "the step", show=4)
    assert str(exc.value) == "the step failed (exit 3):\n  line 27\n  line 28\n  line 29\n" \
        "  line 30"
    assert (tmp_path / "log").read_text().count("\nline ") == 30      # all of it in the log
    with open(tmp_path / "log", "w") as logf, pytest.raises(KernelError) as exc:
        kernel._run(["sh", "-c", "exit 4"], logf, "the quiet step", show=4)
    assert str(exc.value) == "the quiet step failed (exit 4):\n  (no output; see the log)"


# The failed log's name has one-second resolution: a second failure within the
# same second gets -2 rather than replacing the log the first error names.
def test_two_failures_in_one_second_keep_both_logs(kit, monkeypatch):
    monkeypatch.setenv("FAKE_COMPILE_ERROR", "1")
    monkeypatch.setattr(kernel.time, "strftime", lambda fmt, *t: "20250101-120000")
    store = kit.store()
    logs = []
    for _ in range(2):
        with pytest.raises(KernelError) as exc:
            store.build("dev")
        logs.append(log_named_in(str(exc.value)))
    assert logs[0] != logs[1]
    assert all(p.is_file() for p in logs)


def test_small_base_is_tinyconfig_plus_the_small_fragment(kit):
    """The small fragment goes after the lab's (so it can turn off what
    kvm_guest.config turns on) and before the user's (who has the last word)."""
    assert kernel.SMALL_CONFIG.is_file(), f"{kernel.SMALL_CONFIG} is missing"
    frag = kit.fragment("uffd.config", "")
    store = kit.store("base: small", f"config: [{frag}]")
    frags = [kit.tree / "kernel/configs/kvm_guest.config", kernel.LOCAL_CONFIG,
             kernel.SMALL_CONFIG, kit.root / frag]
    assert store.fragments("dev") == frags
    out = store.build("dev")
    assert kit.runs()[0] == "tinyconfig"
    assert kit.runs()[1].split()[2:] == [str(f) for f in frags]
    assert out.meta["base"] == "small"
    assert kit.events[0].message == "configuring linux: small base + 4 fragments"


# -- the source state ----------------------------------------------------------------


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git checkout of two committed files and a .gitignore."""
    r = tmp_path / "repo"
    (r / "mm").mkdir(parents=True)
    (r / "mm/userfaultfd.c").write_text("int a;\n")
    (r / ".gitignore").write_text("*.o\n")
    git(r, "init", "-q")
    git(r, "add", ".")
    git(r, "commit", "-q", "-m", "first")
    return r


def test_git_state_is_stable(repo, tmp_path):
    state = source_state(repo, tmp_path / "cache")
    assert set(state) == {"head", "diff", "untracked"}
    assert state["head"] == git(repo, "rev-parse", "HEAD").strip()
    assert source_state(repo, tmp_path / "cache") == state
    assert not (tmp_path / "cache").exists()          # git needs no stat cache of ours


def test_git_state_sees_an_uncommitted_edit(repo, tmp_path):
    before = source_state(repo, tmp_path)
    (repo / "mm/userfaultfd.c").write_text("int b;\n")
    after = source_state(repo, tmp_path)
    assert after["diff"] != before["diff"] and after["head"] == before["head"]


def test_git_state_sees_a_new_untracked_file(repo, tmp_path):
    before = source_state(repo, tmp_path)
    (repo / "mm/new.c").write_text("int c;\n")
    after = source_state(repo, tmp_path)
    assert after["untracked"] != before["untracked"] and after["diff"] == before["diff"]
    (repo / "mm/new.c").write_text("int d;\n")          # its content counts, not its name
    assert source_state(repo, tmp_path)["untracked"] != after["untracked"]


def test_git_state_ignores_ignored_files(repo, tmp_path):
    before = source_state(repo, tmp_path)
    (repo / "mm/userfaultfd.o").write_bytes(b"\x7fELF")
    assert source_state(repo, tmp_path) == before


def test_git_state_sees_a_commit(repo, tmp_path):
    (repo / "mm/userfaultfd.c").write_text("int b;\n")
    dirty = source_state(repo, tmp_path)
    git(repo, "commit", "-q", "-am", "second")
    clean = source_state(repo, tmp_path)
    assert clean["head"] != dirty["head"] and clean["diff"] != dirty["diff"]


def test_git_state_of_a_checkout_without_commits_is_a_kernel_error(tmp_path):
    r = tmp_path / "empty"
    r.mkdir()
    git(r, "init", "-q")
    with pytest.raises(KernelError, match=rf"git rev-parse in {re.escape(str(r))} failed: "):
        source_state(r, tmp_path)


# An untracked symlink that points nowhere (Emacs makes one, .#FILE, for every
# file being edited) is hashed by its target text, not opened.
def test_git_state_survives_an_untracked_dangling_symlink(repo, tmp_path):
    before = source_state(repo, tmp_path)
    (repo / "mm/.#userfaultfd.c").symlink_to("someone@host.1234:1700000000")
    assert source_state(repo, tmp_path)["untracked"] != before["untracked"]


@pytest.fixture
def plain(tmp_path) -> Path:
    """A tree that is not a git checkout."""
    t = tmp_path / "plain"
    (t / "mm").mkdir(parents=True)
    (t / "mm/userfaultfd.c").write_text("int a;\n")
    (t / "Makefile").write_text("all:\n")
    return t


def test_content_hash_is_stable_and_writes_the_stat_cache(plain, tmp_path):
    cache = tmp_path / "cache" / "stat-cache.tsv"
    first = content_hash(plain, cache)
    rows = [line.split("\t") for line in cache.read_text().splitlines()]
    assert [r[0] for r in rows] == ["Makefile", "mm/userfaultfd.c"]
    st = (plain / "Makefile").stat()
    assert rows[0][1] == f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    assert content_hash(plain, cache) == first
    assert source_state(plain, tmp_path / "cache") == {"content": first}


def test_content_hash_sees_a_same_size_edit(plain, tmp_path):
    cache = tmp_path / "stat-cache.tsv"
    first = content_hash(plain, cache)
    f = plain / "mm/userfaultfd.c"
    st = f.stat()
    f.write_text("int b;\n")                            # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert content_hash(plain, cache) != first


def test_content_hash_sees_names_and_ignores_build_products(plain, tmp_path):
    cache = tmp_path / "stat-cache.tsv"
    first = content_hash(plain, cache)
    for name in ("mm/userfaultfd.o", "mm/.userfaultfd.o.cmd", "built-in.a", "modules.order"):
        (plain / name).write_text("x")
    assert content_hash(plain, cache) == first
    (plain / "mm/userfaultfd.c").rename(plain / "mm/uffd.c")     # same content, new name
    assert content_hash(plain, cache) != first


def test_the_stat_cache_trusts_size_mtime_and_inode(plain, tmp_path):
    """The trade-off git's index makes too: a file changed in place with its
    size, mtime and inode as they were (and older than the cache) is not
    read again."""
    f = plain / "mm/userfaultfd.c"
    hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(f, ns=(hour_ago, hour_ago))
    cache = tmp_path / "stat-cache.tsv"
    first = content_hash(plain, cache)
    ino = f.stat().st_ino
    with open(f, "r+") as fh:
        fh.write("int b;\n")
    os.utime(f, ns=(hour_ago, hour_ago))
    assert f.stat().st_ino == ino
    assert content_hash(plain, cache) == first
    assert content_hash(plain, tmp_path / "other.tsv") != first     # read afresh, it differs


# As git does with a "racily clean" file (mtime not older than the index): an
# edit in the same clock tick as the hash leaves size, mtime and inode
# unchanged, so such a file is read again rather than trusted.
def test_the_stat_cache_rereads_a_file_changed_in_the_tick_it_was_hashed(plain, tmp_path):
    f = plain / "mm/userfaultfd.c"
    cache = tmp_path / "stat-cache.tsv"
    first = content_hash(plain, cache)
    st = f.stat()
    os.utime(cache, ns=(st.st_mtime_ns, st.st_mtime_ns))   # all three in one clock tick
    with open(f, "r+") as fh:
        fh.write("int b;\n")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_ino) == (st.st_size, st.st_ino)
    assert content_hash(plain, cache) != first


# A file name that is not UTF-8 (os.scandir gives it surrogate escapes) is
# hashed by its bytes and kept in the stat cache.
def test_content_hash_takes_a_file_name_that_is_not_utf8(plain, tmp_path):
    first = content_hash(plain, tmp_path / "stat-cache.tsv")
    (plain / os.fsdecode(b"latin1-\xe9.c")).write_text("int e;\n")
    assert content_hash(plain, tmp_path / "stat-cache.tsv") != first


def test_a_corrupt_stat_cache_is_rebuilt(plain, tmp_path):
    cache = tmp_path / "stat-cache.tsv"
    first = content_hash(plain, cache)
    cache.write_text("garbage without tabs\n")
    assert content_hash(plain, cache) == first
    assert "garbage" not in cache.read_text()


def test_source_state_is_remembered_for_state_ttl(plain, tmp_path, monkeypatch):
    """One command asks several times; within STATE_TTL the tree is hashed once."""
    monkeypatch.setattr(kernel, "STATE_TTL", 3600.0)
    first = source_state(plain, tmp_path)
    (plain / "mm/userfaultfd.c").write_text("int changed_meanwhile;\n")
    assert source_state(plain, tmp_path) == first
    monkeypatch.setattr(kernel, "STATE_TTL", 0.0)
    assert source_state(plain, tmp_path) != first


# -- the compiler -----------------------------------------------------------------


@pytest.fixture
def compilers(bin_dir) -> Path:
    for name in ("clang", "clang-17", "fakecc"):
        executable(bin_dir / name, f'echo "{name} version 99.0 (fake)"\n')
    return bin_dir


@pytest.mark.parametrize("make_args,first_line", [
    ([], GCC_VERSION),
    (["KCFLAGS=-Og"], GCC_VERSION),
    (["CC=fakecc"], "fakecc version 99.0 (fake)"),
    (["LLVM=1"], "clang version 99.0 (fake)"),
    (["LLVM=-17"], "clang-17 version 99.0 (fake)"),
    (["CC=fakecc", "LLVM=1"], "fakecc version 99.0 (fake)"),   # CC= says which compiler
    (["LLVM=1", "CC=fakecc"], "fakecc version 99.0 (fake)"),
])
def test_compiler_version_of_the_compiler_the_build_uses(compilers, make_args, first_line):
    assert compiler_version(make_args) == first_line


def test_compiler_version_follows_llvm_and_cross_compile_from_the_environment(
        compilers, monkeypatch):
    """kbuild reads LLVM and CROSS_COMPILE from the environment too (it sets
    CC itself, so the environment's CC does not pick the compiler)."""
    monkeypatch.setenv("LLVM", "-17")
    assert compiler_version([]) == "clang-17 version 99.0 (fake)"
    assert compiler_version(["LLVM="]) == GCC_VERSION          # make_args win
    monkeypatch.delenv("LLVM")
    executable(compilers / "x86_64-linux-gnu-gcc", 'echo "cross gcc 12"\n')
    monkeypatch.setenv("CROSS_COMPILE", "x86_64-linux-gnu-")
    assert compiler_version([]) == "cross gcc 12"
    monkeypatch.setenv("CC", "fakecc")
    assert compiler_version([]) == "cross gcc 12"


@pytest.mark.parametrize("make_args,first_line", [
    ([], LD_VERSION),
    (["KCFLAGS=-Og", "CC=fakecc"], LD_VERSION),
    (["LD=fakeld"], "fakeld 1.0"),
    (["LLVM=1"], "ld.lld 99.0 (fake)"),
    (["LLVM=-17"], "ld.lld-17 99.0 (fake)"),
    (["LLVM=1", "LD=fakeld"], "fakeld 1.0"),
    (["CROSS_COMPILE=x86_64-linux-gnu-"], "cross ld 2.41"),
])
def test_linker_version_of_the_linker_the_build_uses(compilers, make_args, first_line):
    executable(compilers / "ld.lld", 'echo "ld.lld 99.0 (fake)"\n')
    executable(compilers / "ld.lld-17", 'echo "ld.lld-17 99.0 (fake)"\n')
    executable(compilers / "fakeld", 'echo "fakeld 1.0"\n')
    executable(compilers / "x86_64-linux-gnu-ld", 'echo "cross ld 2.41"\n')
    assert linker_version(make_args) == first_line


def test_an_unrunnable_linker_is_a_kernel_error(kit):
    with pytest.raises(KernelError, match=r"^the linker 'no-such-ld' does not run: "):
        linker_version(["LD=no-such-ld"])
    with pytest.raises(KernelError, match="the linker 'no-such-ld' does not run"):
        kit.store("make_args: [LD=no-such-ld]").build("dev")
    assert kit.runs() == []


def test_compiler_version_by_path(tmp_path, compilers):
    cc = executable(tmp_path / "opt/cc", 'echo "opt cc 1.0"\n')
    assert compiler_version([f"CC={cc}"]) == "opt cc 1.0"


# LLVM=/path/to/llvm/ is a prefix (Documentation/kbuild/llvm.rst): the build
# uses /path/to/llvm/clang, and so does the cache key.
def test_compiler_version_with_an_llvm_prefix(tmp_path, compilers):
    executable(tmp_path / "llvm/bin/clang", 'echo "prefixed clang 18.0"\n')
    assert compiler_version([f"LLVM={tmp_path}/llvm/bin/"]) == "prefixed clang 18.0"


def test_an_unrunnable_compiler_is_a_kernel_error(compilers, tmp_path):
    with pytest.raises(KernelError, match=r"^the compiler 'no-such-cc-17' does not run: "):
        compiler_version(["CC=no-such-cc-17"])
    with pytest.raises(KernelError, match=r"^the compiler 'clang-4' does not run: "):
        compiler_version(["LLVM=-4"])
    not_exec = tmp_path / "cc.txt"
    not_exec.write_text("not a program\n")
    with pytest.raises(KernelError, match=rf"^the compiler '{re.escape(str(not_exec))}' "
                       r"does not run: Permission denied"):
        compiler_version([f"CC={not_exec}"])


def test_a_build_with_an_unrunnable_compiler_names_it(kit):
    with pytest.raises(KernelError, match="the compiler 'no-such-cc' does not run"):
        kit.store("make_args: [CC=no-such-cc]").build("dev")
    assert kit.runs() == []


# -- reading configs --------------------------------------------------------------


def test_read_config(tmp_path):
    p = tmp_path / ".config"
    p.write_text("#\n# Automatically generated file; DO NOT EDIT.\n#\n"
                 "CONFIG_USERFAULTFD=y\n"
                 'CONFIG_LOCALVERSION="-uffd test"\n'
                 "CONFIG_NR_CPUS=64\n"
                 "CONFIG_FUSE_FS=m\n"
                 "# CONFIG_KASAN is not set\n"
                 "# CONFIG_KCSAN is not set, really\n"
                 "CONFIG_HZ=250\n"
                 "CONFIG_HZ=1000\n"
                 "  CONFIG_INDENTED=y\n")
    assert read_config(p) == {"USERFAULTFD": "y", "LOCALVERSION": '"-uffd test"',
                              "NR_CPUS": "64", "FUSE_FS": "m", "KASAN": "n", "HZ": "1000"}


# -- what the rest of the lab sees ---------------------------------------------------


def test_image_of_a_tree_boots_the_current_build(kit):
    lab = kit.lab()
    img = ImageStore(lab).image("dev")
    assert img.vmlinuz == KernelStore(lab).current("dev").bzimage
    assert img.initrd is None
    assert img.kernel_release == "not built"
    [row] = [r for r in ImageStore(lab).list() if r["name"] == "dev"]
    assert row["kernel"] == "not built (tree)"
    KernelStore(lab).build("dev")
    assert ImageStore(lab).image("dev").kernel_release == RELEASE
    # a tree's kernel does not change the rootfs: it shares the packaged image's
    assert img.key == ImageStore(lab).image("trixie").key


def test_sources_tarball_carries_the_kernel_headers_reproducibly(kit, tmp_path):
    headers = kit.store().build("dev").headers_tar
    a = sources_tarball(tmp_path / "a.tar", kernel_headers=headers)
    time.sleep(0.01)
    b = sources_tarball(tmp_path / "b.tar", kernel_headers=headers)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        names = tar.getnames()
        assert "Makefile" in names                     # the tools' own sources still
        assert "kernel-headers/include/linux/userfaultfd.h" in names
        assert tar.extractfile("kernel-headers/include/linux/userfaultfd.h").read() == \
            b"#define UFFDIO_API 0x3F\n"
        assert all(m.uid == 0 and m.mtime == 0 and m.uname == "root" for m in tar)
    assert sources_tarball(tmp_path / "c.tar").read_bytes() != a.read_bytes()


def test_sources_tarball_skips_header_entries_headers_install_never_makes(tmp_path):
    """Only plain files and directories under include/ travel, never a link
    or a path out of kernel-headers/."""
    hostile = tmp_path / "hostile.tar"
    with tarfile.open(hostile, "w") as tar:
        for name, kind in (("include/linux/ok.h", tarfile.REGTYPE),
                           ("/etc/evil.h", tarfile.REGTYPE),
                           ("include/../../evil.h", tarfile.REGTYPE),
                           ("include/link.h", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 3
                tar.addfile(info, io.BytesIO(b"ok\n"))
    with tarfile.open(sources_tarball(tmp_path / "s.tar", kernel_headers=hostile)) as tar:
        assert [n for n in tar.getnames() if "evil" in n or n.startswith("kernel-headers/")] \
            == ["kernel-headers/include/linux/ok.h"]


# -- a running VM of a tree image ---------------------------------------------------
# No VM boots: a "running VM" is a marked directory whose keeper is a sleeping
# process carrying the directory's path, as in test_ownership.py.


@pytest.fixture
def keeper(sleeper):
    """A stand-in keeper for a VM: a sleeper carrying its directory's path."""
    return lambda vm: sleeper(str(vm.dir))


def running(vm: VM, keeper: subprocess.Popen, kernel_build: str) -> VMState:
    """The state VM.up leaves for a VM booted from the kernel `kernel_build`."""
    make_vm_dir(vm.dir, str(vm.lab.source.resolve()))
    st = VMState(vm.name, vm.spec.image, vm.image().key, RELEASE, "tcg", "test", 2222,
                 ProcessId.of(keeper.pid, str(vm.dir)).to_dict(),
                 {"pid": 0, "start": 0, "tag": "x"}, time.time(), "ssh-ed25519 AAAA",
                 vm.spec.memory, vm.spec.cpus, cmdline=vm.kernel_cmdline(),
                 kernel=kernel_build, ssh_ready=True, lab=str(vm.lab.source.resolve()))
    st.save(vm.state_file)
    return st


def edit_tree(kit: Kit, release: str) -> None:
    """A source edit whose build is another bzImage (a real one differs
    build to build; the fake make copies fake-bzImage)."""
    (kit.tree / "fake-bzImage").write_bytes(fake_bzimage(release))


def test_reuse_builds_the_edited_tree_then_refuses_a_vm_running_an_older_build(kit, keeper):
    """`run` and `up --reuse` on a running VM of a tree image build the
    tree's kernel first (its current state has no bzImage yet), with the
    build's events; the VM running the old build is then refused with what
    to do, never a FileNotFoundError."""
    lab = kit.lab()
    first = KernelStore(lab).build("dev")
    vm = VM(lab, "guest", kit.events.append)
    st = running(vm, keeper(vm), file_digest(first.bzimage)[:16])
    kit.events.clear()
    assert vm.up(reuse=True).kernel == st.kernel              # unchanged tree: reused
    assert kit.compiles() == 1 and kit.events[0].data["cached"] is True
    edit_tree(kit, "6.12.0-fake2")
    assert not KernelStore(lab).current("dev").dir.exists()
    kit.events.clear()
    with pytest.raises(VMError) as exc:
        VM(kit.lab(), "guest", kit.events.append).up(reuse=True)
    assert kit.compiles() == 2                                 # built before comparing
    new = KernelStore(lab).current("dev")
    assert new.bzimage.is_file()
    assert str(exc.value) == (
        f"VM 'guest' runs an older build of its tree kernel (build {st.kernel[:12]}; "
        f"{kit.tree} as it is now is build {file_digest(new.bzimage)[:12]}). 'uffdlab down "
        f"guest' first, then run again to boot the new build, or use a fresh VM of its "
        f"own (as 'uffdlab run --bisect' does)")
    assert [e.subject for e in kit.events] and {e.subject for e in kit.events} == {"dev"}
    assert any(e.kind == Kind.PROGRESS for e in kit.events)
    assert kit.events[-1].message.startswith(f"kernel {RELEASE} built: 3 units")
    # the edit undone: the first build is the tree's again, cached, and the VM runs it
    edit_tree(kit, RELEASE)
    assert vm.up(reuse=True).kernel == st.kernel and kit.compiles() == 2


def test_reuse_names_the_other_differences_too(kit, keeper):
    lab = kit.lab()
    first = KernelStore(lab).build("dev")
    vm = VM(lab, "guest")
    running(vm, keeper(vm), file_digest(first.bzimage)[:16])
    edit_tree(kit, "6.12.0-fake2")
    bigger = (kit.root / "lab.yml").read_text().replace("    image: dev\n",
                                                      "    image: dev\n    cpus: 4\n")
    (kit.root / "lab.yml").write_text(bigger)
    with pytest.raises(VMError, match=r"^VM 'guest' runs an older build of its tree kernel "
                       r"\(.*\), and differs in cpus 2 \(asked for 4\)\. 'uffdlab down guest' "
                       r"first"):
        VM(load_lab(kit.root / "lab.yml"), "guest").up(reuse=True)


def test_reuse_with_a_tree_that_does_not_build_is_the_build_error(kit, keeper, monkeypatch):
    lab = kit.lab()
    first = KernelStore(lab).build("dev")
    vm = VM(lab, "guest")
    st = running(vm, keeper(vm), file_digest(first.bzimage)[:16])
    edit_tree(kit, "6.12.0-fake2")
    monkeypatch.setenv("FAKE_COMPILE_ERROR", "1")
    with pytest.raises(KernelError, match=r"^make bzImage failed \(exit 2\)"):
        vm.up(reuse=True)
    assert vm.state() == st                                    # the VM runs on, untouched


def test_kernel_digest_of_an_unbuilt_tree_says_to_build_it(kit):
    img = ImageStore(kit.lab()).image("dev")
    with pytest.raises(VMError) as exc:
        kernel_digest(img)
    assert str(exc.value) == (f"image dev: its tree kernel is not built for the tree as it "
                              f"is now (expected {img.vmlinuz}); 'uffdlab kernel build dev' "
                              f"builds it")


@pytest.mark.parametrize("rebuilt", [False, True])
def test_no_template_is_saved_when_the_tree_kernel_changed_while_the_vm_ran(kit, keeper,
                                                                            rebuilt):
    """A tree edited during provisioning: a template keyed by the tree's new
    kernel would restore the old one. Nothing is saved (and the new build
    need not exist yet)."""
    lab = kit.lab()
    first = KernelStore(lab).build("dev")
    vm = VM(lab, "guest", kit.events.append)
    st = running(vm, keeper(vm), file_digest(first.bzimage)[:16])
    st.facts = {"tools_digest": "x"}
    st.save(vm.state_file)
    edit_tree(kit, "6.12.0-fake2")
    if rebuilt:
        KernelStore(lab).build("dev")
    kit.events.clear()
    assert lab.templates and vm.save_template() is None
    [ev] = kit.events
    assert ev.kind == Kind.TEMPLATE and ev.message.startswith(
        f"no template saved: VM guest runs kernel build {st.kernel[:12]}, and the kernel "
        f"changed while it ran")
    assert not (kit.cache / "templates").exists()


def test_uffdlab_run_on_a_vm_running_an_older_tree_build_is_a_one_line_error(kit, keeper,
                                                                             capsys):
    """The issue's path: `uffdlab run` after the tree changed under a running
    VM. The kernel build shows on stderr, then the refusal; no traceback."""
    from uffdlab import cli
    lab = kit.lab()
    first = KernelStore(lab).build("dev")
    vm = VM(lab, "guest")
    running(vm, keeper(vm), file_digest(first.bzimage)[:16])
    edit_tree(kit, "6.12.0-fake2")
    capsys.readouterr()
    assert cli.main(["--lab", str(lab.source), "run", "S1", "--vm", "guest"]) == 1
    err = capsys.readouterr().err
    assert f"kernel {RELEASE} built: 3 units" in err
    assert "VM 'guest' runs an older build of its tree kernel" in err
    assert "'uffdlab down guest' first" in err
    assert "Traceback" not in err and "FileNotFoundError" not in err
    assert kit.compiles() == 2
