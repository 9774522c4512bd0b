# SPDX-License-Identifier: MIT
"""lab.yml: the typed description of a lab, and the errors a bad one earns.

Every option is declared once here, with its help text. The provisioning
variables go to Ansible unchanged (see `ProvisionVars`), so a playbook and
the README never restate a default.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .paths import default_lab_file

DEFAULT_KERNEL_PACKAGE = "linux-image-cloud-amd64"
MAX_DISK = 16 << 40
MAX_BOOT_TIMEOUT = 86400
# A lab or grid file is small: more values than this after alias expansion is
# an alias bomb, not a lab.
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 64
MAX_FILE_BYTES = 1 << 20
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(Exception):
    """A lab file that cannot be used; one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def parse_size(value: Any) -> int:
    """'2G', '512M', '4096K' or a whole number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 2G, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"expected a positive size like 2G, got {value!r}")
        return value
    m = _SIZE_RE.match(str(value)) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"expected a size like 2G, got {value!r}")
    size = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if size <= 0:
        raise ValueError(f"expected a positive size like 2G, got {value!r}")
    return size


def format_size(nbytes: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if nbytes % _UNITS[unit] == 0:
            return f"{nbytes // _UNITS[unit]}{unit}"
    return str(nbytes)


Size = Annotated[int, BeforeValidator(parse_size)]
# YAML reads yes/no/on/off as booleans, and pydantic would take them as 1/0.
Count = Annotated[int, Strict()]
Seconds = Annotated[float, Strict()]


def _one_line(v: str) -> str:
    """Kernel command lines and paths reach QEMU and tools as one argument."""
    bad = next((c for c in v if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"expected text without control characters or line breaks, "
                         f"got {v!r}")
    return v


OneLine = Annotated[str, AfterValidator(_one_line)]


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expected 0 or 1, got {v!r}")
    return v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _package_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name):
        raise ValueError(f"expected a Debian package name like linux-perf "
                         f"(lowercase letters, digits, + - .), got {name!r}")
    return name


PackageName = Annotated[str, AfterValidator(_package_name)]


MAKE_ARG = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=[^\s'\"`$;&|<>\\]*")
# Variables the lab sets itself: a build of its own needs them to be its own.
RESERVED_MAKE_VARS = ("O", "ARCH", "INSTALL_HDR_PATH", "KCONFIG_CONFIG")


def _make_arg(v: Any) -> Any:
    if isinstance(v, str):
        if not MAKE_ARG.fullmatch(v):
            raise ValueError(f"expected a make variable assignment like 'KCFLAGS=-O2' "
                             f"(no spaces, quotes or shell characters), got {v!r}")
        if v.split("=", 1)[0] in RESERVED_MAKE_VARS:
            raise ValueError(f"expected a variable the lab does not set itself "
                             f"({', '.join(RESERVED_MAKE_VARS)} are), got {v!r}")
    return v


MakeArg = Annotated[str, AfterValidator(_make_arg)]


class KernelSpec(_Model):
    """Which kernel boots: a Debian package installed into the image, a
    contributor's own bzImage, or a kernel tree the lab builds."""

    package: PackageName | None = Field(
        None, description="Debian kernel package to install (default "
        f"{DEFAULT_KERNEL_PACKAGE}); its vmlinuz and initrd boot the VM.")
    vmlinuz: Path | None = Field(
        None, description="A local bzImage to boot instead of a packaged kernel.")
    initrd: Path | None = Field(
        None, description="The local kernel's initrd, or null when the kernel "
        "has virtio and ext4 built in (see images/local-kernel.config).")
    tree: Path | None = Field(
        None, description="A kernel source tree (git checkout or not) that the lab "
        "builds out of tree (O= under the cache dir) and boots without an initrd; "
        "'uffdlab kernel build IMAGE'.")
    base: Literal["defconfig", "small"] = Field(
        "defconfig", description="The tree's base config: 'defconfig' "
        "(x86_64_defconfig) or 'small' (tinyconfig plus images/kernel-small.config: "
        "what the lab's rootfs and scenarios need, about 3x faster to build).")
    config: list[Path] = Field(
        default_factory=list, description="Config fragments merged last, after the "
        "base, kvm_guest.config and images/local-kernel.config (tree only).")
    make_args: list[MakeArg] = Field(
        default_factory=list, description="Extra make variables for a tree build, "
        "like 'KCFLAGS=-Og' or 'LLVM=1'.")
    cmdline: OneLine = Field("", description="Extra kernel command line for this kernel.")

    @model_validator(mode="after")
    def _one_source(self) -> KernelSpec:
        named = [f"{k} {_shown(getattr(self, k))}" for k in ("package", "vmlinuz", "tree")
                 if getattr(self, k)]
        if len(named) > 1:
            raise ValueError(f"expected one of 'package', 'vmlinuz' or 'tree', got "
                             f"{' and '.join(named)}")
        if self.initrd and not self.vmlinuz:
            raise ValueError(f"expected 'initrd' only with a local 'vmlinuz', got initrd "
                             f"'{self.initrd}' and no vmlinuz (a packaged kernel brings "
                             f"its own initrd; a tree's kernel boots without one)")
        tree_only = [k for k in ("config", "make_args") if getattr(self, k)]
        if "base" in self.model_fields_set:
            tree_only.insert(0, "base")
        if tree_only and not self.tree:
            raise ValueError(f"expected {', '.join(map(repr, tree_only))} only with "
                             f"'tree', a kernel source tree to build")
        return self

    @property
    def is_local(self) -> bool:
        """Booted directly from a file (a bzImage of one's own, or built from a
        tree), not installed into the image from a package."""
        return self.vmlinuz is not None or self.tree is not None

    @property
    def is_tree(self) -> bool:
        return self.tree is not None

    @property
    def package_name(self) -> str | None:
        return None if self.is_local else (self.package or DEFAULT_KERNEL_PACKAGE)


def _shown(v: Any) -> str:
    return repr(v) if isinstance(v, str) else f"'{v}'"


def _octal_mode(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        raise ValueError(f"expected a quoted octal mode like '0666', got {v!r} "
                         f"(YAML reads an unquoted 0666 as the number 438: quote it)")
    if isinstance(v, str) and not re.fullmatch(r"0[0-7]{3}", v):
        raise ValueError(f"expected an octal mode of 4 digits like '0666', got {v!r}")
    return v


class ImageSpec(_Model):
    """A guest image: a Debian rootfs plus the kernel that boots it."""

    suite: str = Field(description="Debian suite: bookworm (kernel 6.1), trixie (6.12), ...")
    kernel: KernelSpec = Field(default_factory=KernelSpec,
                               description="Packaged or local kernel.")
    packages: list[PackageName] = Field(default_factory=list,
                                description="Extra Debian packages for the rootfs.")
    disk_size: Size = Field(parse_size("4G"), description="Size of the root disk.")

    @field_validator("suite")
    @classmethod
    def _suite_name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", v):
            raise ValueError(f"expected a Debian suite name like trixie, got {v!r}")
        return v

    @field_validator("disk_size")
    @classmethod
    def _disk_big_enough(cls, v: int) -> int:
        if v < parse_size("2G"):
            raise ValueError(f"expected at least 2G for the root disk, got {format_size(v)}")
        if v > MAX_DISK:
            raise ValueError(f"expected at most {format_size(MAX_DISK)} for the root disk, "
                             f"got {format_size(v)}")
        return v


class VMSpec(_Model):
    """A disposable VM: an image booted with this much memory and CPU."""

    image: str = Field(description="Name of an entry under 'images'.")
    memory: Size = Field(parse_size("2G"), description="Guest RAM.")
    cpus: Count = Field(2, ge=1, le=64, description="Virtual CPUs.")
    cmdline: OneLine = Field("", description="Extra kernel command line.")
    boot_timeout: Seconds = Field(300, gt=0, le=MAX_BOOT_TIMEOUT, allow_inf_nan=False,
                                  description="Seconds to wait for SSH.")

    @field_validator("memory")
    @classmethod
    def _memory_range(cls, v: int) -> int:
        if not parse_size("256M") <= v <= parse_size("1T"):
            raise ValueError(f"expected between 256M and 1T of memory, got {format_size(v)}")
        return v


# The playbook runs `rm -rf TOOLS_DIR`: never one of these dirs, nor inside
# the trees below them.
_SYSTEM_DIRS = {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64",
                "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys",
                "/tmp", "/usr", "/var", "/usr/bin", "/usr/lib", "/usr/local", "/usr/sbin",
                "/usr/share", "/usr/src", "/var/lib", "/var/log", "/var/tmp", "/var/cache"}
_SYSTEM_TREES = ("/boot/", "/dev/", "/etc/", "/proc/", "/sys/")


def _tools_dir(v: str) -> str:
    if (v.rstrip("/") or "/") in _SYSTEM_DIRS or v.startswith(_SYSTEM_TREES):
        raise ValueError(f"expected a directory of the lab's own (the playbook empties "
                         f"it), not a system directory, got {v!r}")
    if not re.fullmatch(r"/[A-Za-z0-9._/-]{1,200}", v):
        raise ValueError(f"expected an absolute path of letters, digits and . _ - / "
                         f"like /opt/uffdlab, got {v!r}")
    if "//" in v or v.endswith("/") or any(p in (".", "..") for p in v.split("/")):
        raise ValueError(f"expected a plain absolute path (no '.', '..', '//' or "
                         f"trailing '/'), got {v!r}")
    return v


class ProvisionVars(_Model):
    """Guest settings handed to Ansible as the variable `lab` unchanged."""

    unprivileged_userfaultfd: Annotated[Literal[0, 1], BeforeValidator(_not_bool)] = Field(
        1, description="vm.unprivileged_userfaultfd in the guest (1 lets the "
        "non-root lab user create uffds with the syscall).")
    dev_userfaultfd_mode: Annotated[str, BeforeValidator(_octal_mode)] = Field(
        "0666",
        description="Permissions of /dev/userfaultfd (kernel 6.1+).")
    hugepages: Count = Field(0, ge=0, le=65536,
                             description="2M huge pages to reserve (hugetlbfs backing).")
    tools_dir: Annotated[str, AfterValidator(_tools_dir)] = Field(
        "/opt/uffdlab", description="Where guest-tools are copied and built (an "
        "absolute path of letters, digits and . _ - /; emptied on every build).")


def _scheduler_address(v: Any) -> Any:
    if not isinstance(v, str) or not re.fullmatch(r"(tcp|tls)://[A-Za-z0-9.\-\[\]:]+:\d{1,5}", v):
        raise ValueError(f"expected a Dask scheduler address like tcp://HOST:8786, got "
                         f"{short(v)}")
    return v


def _ssh_host(v: Any) -> Any:
    if not isinstance(v, str) or not re.fullmatch(r"([A-Za-z0-9._-]+@)?[A-Za-z0-9.\-]+", v):
        raise ValueError(f"expected a host name or address (optionally user@host), "
                         f"got {short(v)}")
    return v


class ClusterSpec(_Model):
    """Where sweep points run: one of an existing Dask scheduler, hosts to
    start a cluster on over SSH, or (neither) a local cluster here."""

    scheduler: Annotated[str | None, BeforeValidator(
        lambda v: v if v is None else _scheduler_address(v))] = Field(
        None, description="Use this running Dask scheduler (tcp://HOST:8786), e.g. one "
        "'uffdlab cluster up' started.")
    hosts: list[Annotated[str, BeforeValidator(_ssh_host)]] = Field(
        default_factory=list, description="Start a cluster over SSH on these lab hosts "
        "(the first one also runs the scheduler).")
    vm_slots: Count | None = Field(None, ge=1, le=256, description="VMs one worker runs at "
                                   "once; default: its cores // the VM's cpus, at least 1.")
    retries: Count = Field(1, ge=0, le=10, description="How often a point whose worker died "
                           "is tried again on another worker (a point that failed for a "
                           "reason of its own is not).")

    @model_validator(mode="after")
    def _one_kind(self) -> ClusterSpec:
        if self.scheduler and self.hosts:
            raise ValueError(f"expected either scheduler or hosts, got both "
                             f"(scheduler {self.scheduler!r}, hosts {self.hosts})")
        return self


def _one_line_path(p: Path) -> Path:
    _one_line(str(p))
    return p


class Lab(_Model):
    """The whole lab file."""

    name: str = Field("uffd-lab", description="Recorded with every result.")
    accel: Literal["auto", "kvm", "tcg"] = Field(
        "auto", description="auto uses KVM only when a guest really runs under it.")
    cache_dir: Annotated[Path, AfterValidator(_one_line_path)] = Field(
        Path("~/.cache/uffdlab"), description="Images, keys and VM state (never in git).")
    results: Path = Field(Path("results/lab.sqlite"),
                          description="Results database, relative to lab.yml.")
    templates: StrictBool = Field(
        True, description="Save a booted, provisioned VM as a template, and restore later "
        "VMs of the same shape from it in seconds instead of booting and provisioning.")
    images: dict[str, ImageSpec] = Field(description="Image recipes by name.")
    vms: dict[str, VMSpec] = Field(description="VMs by name.")
    provision: ProvisionVars = Field(default_factory=ProvisionVars,
                                     description="Guest settings for Ansible.")
    cluster: ClusterSpec | None = Field(None, description="Run sweep points on Dask "
                                        "workers (absent: one after another, here).")
    # Where the file was read from; relative paths resolve against it.
    source: Path = Field(Path("lab.yml"), exclude=True)
    # YAML path -> line, for problems found after loading (kernel files, cache)
    _lines: dict = PrivateAttr(default_factory=dict)

    @field_validator("images", "vms")
    @classmethod
    def _names(cls, v: dict, info: ValidationInfo) -> dict:
        what = "image" if info.field_name == "images" else "VM"
        if not v:
            raise ValueError(f"expected at least one {what}, got none")
        for name in v:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", str(name)):
                raise FieldProblem((info.field_name, name), name,
                                    f"a short {what} name (lowercase letters, digits, "
                                    f"_ and -, up to 32 characters)")
        return v

    @model_validator(mode="after")
    def _vm_images_exist(self) -> Lab:
        problems = _missing_images(self.images, self.vms)
        if problems:
            raise problems[0]       # lab_from_dict reports every one of them
        return self

    # -- resolved paths -------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return self.source.resolve().parent

    @property
    def cache_path(self) -> Path:
        return self._resolve(self.cache_dir)

    @property
    def results_path(self) -> Path:
        return self._resolve(self.results)

    def _resolve(self, p: Path) -> Path:
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else self.base_dir / p

    def kernel_path(self, p: Path) -> Path:
        return self._resolve(p)

    def problem(self, loc: tuple, message: str) -> str:
        """One problem line, `file:LINE: a.b.c: message`, for a checked field."""
        line = self._lines.get(loc + ("<key>",)) or self._lines.get(loc)
        where = f"{self.source}:{line}" if line else str(self.source)
        return f"{where}: {'.'.join(map(str, loc))}: {message}"

    def vm_spec(self, name: str | None) -> tuple[str, VMSpec]:
        """The named VM, or the first one when no name is given."""
        name = name or next(iter(self.vms))
        if name not in self.vms:
            raise ConfigError([did_you_mean(f"{self.source.name}: no VM named {name!r}",
                                             name, self.vms)])
        return name, self.vms[name]

    def image_spec(self, name: str) -> ImageSpec:
        if name not in self.images:
            raise ConfigError([did_you_mean(f"{self.source.name}: no image named {name!r}",
                                             name, self.images)])
        return self.images[name]


class FieldProblem(ValueError):
    """A cross-field problem that knows the path it belongs to."""

    def __init__(self, loc: tuple, value: Any, expected: str, hint: str = ""):
        self.loc, self.value, self.expected = loc, value, expected
        super().__init__(" ".join(p for p in (f"expected {expected}, got {value!r}", hint) if p))


def _missing_images(images: Any, vms: Any) -> list[FieldProblem]:
    """VMs naming an image that is not defined, from models or raw YAML data."""
    if not isinstance(images, dict) or not isinstance(vms, dict):
        return []
    problems = []
    for vm_name, vm in vms.items():
        image = vm.get("image") if isinstance(vm, dict) else getattr(vm, "image", None)
        if isinstance(image, str) and images and image not in images:
            problems.append(FieldProblem(
                ("vms", vm_name, "image"), image,
                f"the name of an image ({', '.join(map(str, images))})",
                hint=did_you_mean("", image, images).strip()))
    return problems


def did_you_mean(msg: str, word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"{msg} (did you mean {close[0]!r}?)" if close else msg


def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The model class whose fields are valid at a location, for suggestions."""
    model: Any = root
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            # a dict key (image or VM name): the value type is the next model
            continue
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif args and isinstance(args[-1], type) and issubclass(args[-1], BaseModel):
            model = args[-1]
        else:
            model = None
    return model


def _line_map(root: yaml.Node | None) -> dict[tuple, int]:
    """YAML path -> 1-based line, so errors can say where a value came from."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                walk(v, path + (k.value,))
                lines[path + (k.value, "<key>")] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    if root is not None:
        walk(root, ())       # bounded: parse_yaml refused cycles and alias bombs
    return lines


class _Refused(Exception):
    def __init__(self, mark, path: list[str], message: str):
        self.line, self.message = mark.line + 1, message
        self.path = ".".join(path) or "(top level)"
        super().__init__(message)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts every value as it would be after alias expansion,
    and refuses a cycle, a bomb or absurd nesting before anything is built."""

    def __init__(self, text: str):
        super().__init__(text)
        self._sizes: dict[int, int] = {}    # id(node) -> expanded size
        self._open: set[str] = set()        # anchors whose node is being composed
        self._total = 0
        self._path: list[str] = []

    def _count(self, n: int, event) -> None:
        self._total += n
        if self._total > MAX_YAML_NODES:
            raise _Refused(event.start_mark, self._path,
                           f"expected at most {MAX_YAML_NODES} values after expanding "
                           f"aliases, got more by alias *{event.anchor} (a YAML alias bomb?)"
                           if isinstance(event, yaml.AliasEvent) else
                           f"expected at most {MAX_YAML_NODES} values, got more")

    def compose_node(self, parent, index):
        part = (index.value if isinstance(index, yaml.ScalarNode)
                else str(index) if isinstance(index, int) else None)
        if part is not None:
            self._path.append(str(part))
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:          # an undefined alias: PyYAML says so
                if event.anchor in self._open:
                    raise _Refused(event.start_mark, self._path,
                                   f"expected an alias to a finished node, got "
                                   f"*{event.anchor} inside its own anchor (a cycle)")
                self._count(self._sizes[id(target)], event)
            node = super().compose_node(parent, index)
        else:
            if len(self._path) > MAX_YAML_DEPTH:
                raise _Refused(event.start_mark, self._path[:3],
                               f"expected at most {MAX_YAML_DEPTH} levels of nesting, "
                               f"got more")
            before = self._total
            self._count(1, event)
            if event.anchor is not None:
                self._open.add(event.anchor)
            node = super().compose_node(parent, index)
            self._open.discard(event.anchor)
            self._sizes[id(node)] = self._total - before
        if part is not None:
            self._path.pop()
        return node


def _duplicate_keys(root: yaml.Node, label: str) -> list[str]:
    """PyYAML keeps the last of two equal keys; a lab file must not lose one."""
    problems: list[str] = []
    seen: set[int] = set()

    def walk(node, path):
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    line = k.start_mark.line + 1
                    if (k.tag, k.value) in first:
                        where = ".".join(path + (k.value,))
                        problems.append(f"{label}:{line}: {where}: duplicate key "
                                        f"{k.value!r} (first at line {first[k.tag, k.value]})")
                    else:
                        first[k.tag, k.value] = line
                walk(v, path + (str(k.value),))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (str(i),))

    walk(root, ())
    return problems


def _yaml_problem(label: str, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"{label}:{mark.line + 1}" if mark is not None else label
    what = " ".join(str(x) for x in (getattr(e, "context", None),
                                     getattr(e, "problem", None)) if x) or str(e)
    col = f" (column {mark.column + 1})" if mark is not None else ""
    return f"{where}: not valid YAML: {' '.join(what.split())}{col}"


def read_text(path: Path, label: str, what: str = "lab file") -> str:
    """A file's text, or a ConfigError saying why it cannot be had."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"{label}: cannot read the {what}: {e.strerror}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError([f"{label}: expected a {what} of at most "
                           f"{format_size(MAX_FILE_BYTES)}, got more"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{label}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                           f"offset {e.start})"]) from None


def parse_yaml(text: str, label: str) -> tuple[Any, dict[tuple, int]]:
    """(data, YAML path -> line) from untrusted YAML text, with aliases bounded,
    cycles and duplicate keys refused; every problem is a ConfigError."""
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {}
        problems = _duplicate_keys(root, label)
        if problems:
            raise ConfigError(problems)
        try:
            data = loader.construct_document(root)
        except yaml.YAMLError:
            raise
        except Exception as e:   # PyYAML's constructors raise anything on odd tags
            raise ConfigError([f"{label}: not valid YAML: {type(e).__name__}: "
                               f"{' '.join(str(e).split())}"]) from None
        return data, _line_map(root)
    except _Refused as e:
        raise ConfigError([f"{label}:{e.line}: {e.path}: {e.message}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_problem(label, e)]) from None
    finally:
        loader.dispose()


# pydantic error type -> what was expected, in the lab's words
_EXPECTED = {
    "int_parsing": "a whole number", "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number",
    "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list",
    "dict_type": "a mapping of names to entries",
    "model_type": "a mapping of settings", "model_attributes_type": "a mapping of settings",
    "greater_than_equal": "a number of at least {ge}",
    "less_than_equal": "a number of at most {le}",
    "greater_than": "a number greater than {gt}", "less_than": "a number less than {lt}",
    "string_pattern_mismatch": "text matching {pattern}",
    "path_type": "a file path", "finite_number": "a finite number",
}


def describe_error(err: dict, label: str, lines: dict[tuple, int],
                   root: type[BaseModel] | None = None) -> str:
    """One pydantic error of a YAML file as `file:LINE: a.b: expected X, got Y`;
    `root` is the file's model (Lab by default), for "did you mean" hints."""
    loc = tuple(p for p in err["loc"] if not str(p).startswith(("function-", "constrained-")))
    ctx_err = (err.get("ctx") or {}).get("error")
    value = err.get("input")
    if isinstance(ctx_err, FieldProblem):
        loc, value = ctx_err.loc, ctx_err.value
        msg = str(ctx_err)
    elif err["type"] == "extra_forbidden":
        model = _model_at(loc[:-1], root or Lab)
        msg = f"unknown key {loc[-1]!r}"
        if model is not None:
            msg = did_you_mean(msg, loc[-1], model.model_fields)
    elif err["type"] == "missing":
        msg = "required, but missing"
        if loc[:-1] and len(loc) > 1:
            msg += f" from {'.'.join(map(str, loc[:-1]))}"
    elif err["type"] == "value_error":
        msg = str(ctx_err) if ctx_err else err["msg"]
    elif err["type"] == "literal_error":
        msg = f"expected {err['ctx']['expected']}, got {value!r}"
    elif err["type"] in _EXPECTED:
        # a float bound of 86400.0 reads better as 86400
        ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v
               for k, v in (err.get("ctx") or {}).items()}
        msg = f"expected {_EXPECTED[err['type']].format(**ctx)}, got {value!r}"
    else:
        msg = f"{err['msg'][0].lower()}{err['msg'][1:]}, got {value!r}"
    path = ".".join(str(p) for p in loc) or "(top level)"
    line = lines.get(loc + ("<key>",)) or lines.get(loc)
    if line is None and err["type"] == "missing":    # point at the entry that lacks it
        line = lines.get(loc[:-1] + ("<key>",)) or lines.get(loc[:-1])
    where = f"{label}:{line}" if line else label
    return f"{where}: {path}: {msg}"


def load_lab(path: str | os.PathLike | None = None) -> Lab:
    """Read and validate a lab file; raises ConfigError listing every problem."""
    path = Path(path) if path else default_lab_file()
    data, lines = parse_yaml(read_text(path, str(path)), str(path))
    return _validate(data, path, lines)


def lab_from_dict(data: Any, source: Path = Path("lab.yml"), text: str = "") -> Lab:
    """Validate already-parsed data; `text`, when given, supplies line numbers."""
    lines = parse_yaml(text, str(source))[1] if text else {}
    return _validate(data, source, lines)


def _validate(data: Any, source: Path, lines: dict[tuple, int]) -> Lab:
    label = str(source)
    if data is None:
        raise ConfigError([f"{label}: expected a mapping of lab settings "
                           f"(images, vms, ...), got an empty file"])
    if not isinstance(data, dict):
        raise ConfigError([f"{label}: expected a mapping of lab settings "
                           f"(images, vms, ...), got a {type(data).__name__}: "
                           f"{short(data)}"])
    if "source" in data:
        raise ConfigError([f"{label}: source: unknown key 'source'"])
    try:
        lab = Lab.model_validate({**data, "source": source})
    except ValidationError as e:
        problems = [describe_error(err, label, lines) for err in e.errors()]
        # a VM naming a missing image is checked only once every field is valid;
        # say it now too, so one run lists every problem
        for fp in _missing_images(data.get("images"), data.get("vms")):
            msg = describe_error({"type": "value_error", "loc": fp.loc, "input": fp.value,
                             "ctx": {"error": fp}, "msg": str(fp)}, label, lines)
            if msg not in problems:
                problems.append(msg)
        raise ConfigError(problems) from None
    lab._lines = lines
    return lab


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_cache_dir(lab: Lab) -> Path:
    """The cache directory, or a ConfigError saying why it cannot be one. Called
    when a command first needs the cache, not at load (`results` never does)."""
    path = lab.cache_path
    probe = path
    try:
        while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
            probe = probe.parent
        why = ""
        if probe == path and not path.is_dir():
            why = "it is not a directory"
        elif probe != path and not probe.is_dir():
            why = f"'{probe}' is not a directory"
        elif not os.access(probe, os.W_OK | os.X_OK):
            why = ("it is not writable" if probe == path else
                   f"it does not exist and '{probe}' is not writable")
    except OSError as e:                    # e.g. a parent this user cannot search
        why = f"'{e.filename or probe}': {e.strerror}"
    if why:
        raise ConfigError([lab.problem(("cache_dir",), f"expected a writable directory, "
                                       f"got '{path}' ({why})")])
    return path


def option_help() -> list[tuple[str, str, str]]:
    """(key path, default, help) for every lab.yml option: the README table."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            if name == "source":
                continue
            ann = field.annotation
            args = getattr(ann, "__args__", ())
            # a model, a dict of models, or an optional model (`X | None`)
            models = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
            sub = models[0] if models else None
            key = f"{prefix}{name}"
            if sub is not None and "dict" in str(ann):
                key += ".<name>"
            default = "" if field.is_required() or field.default_factory else repr(field.default)
            rows.append((key, default, field.description or ""))
            if sub is not None:
                walk(sub, key + ".")

    walk(Lab, "")
    return rows
