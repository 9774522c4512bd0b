# SPDX-License-Identifier: MIT
"""Lab hosts: machines (or running lab VMs) prepared by playbooks/lab-host.yml
to run a Dask worker that offers `vm_slots`, and the scheduler they join.

HOSTS.yml --load_hosts--> HostsFile --inventory, extravars--> ansible-runner
(playbooks/lab-host.yml) --> a `uffdlab-worker` systemd service on each host,
joined to the scheduler (one `cluster up` may start here, recorded under the
lab's cache in cluster/scheduler.json, and the only one `cluster down` stops).

A host gets the checkout itself, not a wheel: uffdlab runs from its
repository (paths.checkout()), and image builds and sweep points need its
images/, playbooks/, guest-tools/ and notebooks/. So the playbook installs a
reproducible tarball of this checkout's files in editable mode, plus the
controller's exact `distributed` and `dask`, so client and workers match.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .config import (
    ConfigError,
    Count,
    FieldProblem,
    Lab,
    PackageName,
    _Model,
    _scheduler_address,
    describe_error,
    parse_yaml,
    read_text,
    short,
)
from .events import Emitter, Event, Listener, every
from .model import Kind
from .owned import ProcessId, process_scratch, reap_scratch
from .paths import PLAYBOOKS, REPO, checkout

SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
# Inside a VM on QEMU's user network, this address reaches the host's loopback.
QEMU_HOST_GATEWAY = "10.0.2.2"
# What a lab host needs to build images and run VMs (README: the apt packages).
DEFAULT_APT_PACKAGES = ("qemu-system-x86", "qemu-utils", "mmdebstrap", "e2fsprogs",
                        "openssh-client", "gcc", "make", "libc6-dev", "python3-venv")
DEFAULT_DIR = "/opt/uffdlab-host"
WORKER_SERVICE = "uffdlab-worker"
SCRATCH_PREFIX = "uffdlab-host-"
# Seconds between heartbeats while the playbook runs.
HEARTBEAT_SECONDS = 5.0


class LabHostError(Exception):
    pass


# -- HOSTS.yml ------------------------------------------------------------------

def _address(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})", v):
        with contextlib.suppress(ValueError):
            return str(ipaddress.IPv6Address(v))
        raise ValueError(f"expected a host name or IP address like lab1.example or "
                         f"10.0.0.7, got {short(v)}")
    return v


def _user(v: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", v):
        raise ValueError(f"expected a login name like root or lab, got {short(v)}")
    return v


def _host_key(v: str) -> str:
    if not re.fullmatch(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|"
                        r"sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)"
                        r" [A-Za-z0-9+/]+={0,3}", v.strip()):
        raise ValueError(f"expected a public host key like 'ssh-ed25519 AAAA...' (type and "
                         f"base64, as in known_hosts without the host name), got {short(v)}")
    return v.strip()


def _vm_name(v: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", v):
        raise ValueError(f"expected the name of a running lab VM (see 'uffdlab status'), "
                         f"got {short(v)}")
    return v


def _host_dir(v: str) -> str:
    if not re.fullmatch(r"/[A-Za-z0-9._/-]{1,200}", v) or "//" in v or v.endswith("/") \
            or any(p in (".", "..") for p in v.split("/")):
        raise ValueError(f"expected a plain absolute path of letters, digits and . _ - / "
                         f"like {DEFAULT_DIR}, got {short(v)}")
    if v.count("/") < 2:
        raise ValueError(f"expected a directory of the lab's own below a system one "
                         f"(like {DEFAULT_DIR}), got {v!r}")
    return v


def _image_name(v: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", v):
        raise ValueError(f"expected the name of an image of the lab file, got {short(v)}")
    return v


class HostEntry(_Model):
    """One lab host: a machine reached over SSH, or a running lab VM."""

    address: Annotated[str, AfterValidator(_address)] | None = Field(
        None, description="Host name or IP address to reach over SSH.")
    vm: Annotated[str, AfterValidator(_vm_name)] | None = Field(
        None, description="A running lab VM as the host (address, port, key and host key "
        "come from its state).")
    user: Annotated[str, AfterValidator(_user)] = Field(
        "root", description="SSH login (it needs root or password-less sudo).")
    port: Count = Field(22, ge=1, le=65535, description="SSH port.")
    key: Path | None = Field(None, description="SSH private key (default: your SSH "
                             "configuration's).")
    host_key: Annotated[str, AfterValidator(_host_key)] | None = Field(
        None, description="The host's public key, pinned (default: your known_hosts).")
    vm_slots: Count | None = Field(None, ge=1, le=256, description="VMs the host runs at "
                                   "once (default: its cores // 2, at least 1).")

    @model_validator(mode="after")
    def _one_kind(self) -> HostEntry:
        if (self.address is None) == (self.vm is None):
            got = (f"both (address {self.address!r}, vm {self.vm!r})" if self.address
                   else "neither")
            raise ValueError(f"expected either 'address' or 'vm', got {got}")
        if self.vm is not None:
            ssh = [k for k in ("user", "port", "key", "host_key") if k in self.model_fields_set]
            if ssh:
                raise ValueError(f"expected no {', '.join(map(repr, ssh))} with 'vm' (a lab "
                                 f"VM's SSH settings come from its state), got "
                                 f"{', '.join(f'{k} {getattr(self, k)!r}' for k in ssh)}")
        return self

    @property
    def name(self) -> str:
        """The inventory name, which is also the worker's name."""
        return self.address or self.vm or ""


class HostsFile(_Model):
    """HOSTS.yml: the lab hosts and what the playbook gives each of them."""

    scheduler: Annotated[str | None, AfterValidator(
        lambda v: v if v is None else _scheduler_address(v))] = Field(
        None, description="The Dask scheduler workers join (tcp://HOST:8786); default: "
        "'cluster up' starts one on this machine.")
    dir: Annotated[str, AfterValidator(_host_dir)] = Field(
        DEFAULT_DIR, description="Where the checkout, its venv and the lab file go on "
        "each host.")
    apt_packages: list[PackageName] = Field(
        default_factory=lambda: list(DEFAULT_APT_PACKAGES),
        description="Debian packages to install (a list replaces the default: what a "
        "lab host needs to build images and run VMs).")
    images: list[Annotated[str, AfterValidator(_image_name)]] = Field(
        default_factory=list, description="Images of the lab file to build on each host.")
    hosts: list[HostEntry] = Field(description="The lab hosts.")
    source: Path = Field(Path("hosts.yml"), exclude=True)
    _lines: dict = PrivateAttr(default_factory=dict)

    @field_validator("hosts")
    @classmethod
    def _some_hosts(cls, v: list) -> list:
        if not v:
            raise ValueError("expected at least one host (address: or vm:), got none")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> HostsFile:
        first: dict[str, int] = {}
        for i, entry in enumerate(self.hosts):
            if entry.name in first:
                raise FieldProblem(("hosts", i), entry.name, "each host once",
                                   hint=f"(also hosts.{first[entry.name]})")
            first[entry.name] = i
        return self

    def problem(self, loc: tuple, message: str) -> str:
        line = self._lines.get(loc + ("<key>",)) or self._lines.get(loc)
        where = f"{self.source}:{line}" if line else str(self.source)
        return f"{where}: {'.'.join(map(str, loc))}: {message}"

    def check_against(self, lab: Lab) -> None:
        """Every image named must be one of the lab file's."""
        problems = [self.problem(("images", i), f"expected the name of an image of "
                                 f"{lab.source.name} ({', '.join(lab.images)}), got {name!r}")
                    for i, name in enumerate(self.images) if name not in lab.images]
        if problems:
            raise ConfigError(problems)


def load_hosts(path: str | os.PathLike) -> HostsFile:
    """Read and check HOSTS.yml; a ConfigError lists every problem, each as
    `FILE:LINE: a.b: expected ..., got ...`."""
    path = Path(path)
    label = str(path)
    data, lines = parse_yaml(read_text(path, label, "hosts file"), label)
    return hosts_from_dict(data, path, lines)


def hosts_from_dict(data: Any, source: Path = Path("hosts.yml"),
                    lines: dict | None = None) -> HostsFile:
    label = str(source)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}: {short(data)}"
        raise ConfigError([f"{label}: expected a mapping with 'hosts' (a list of "
                           f"lab hosts), got {got}"])
    if "source" in data:
        raise ConfigError([f"{label}: source: unknown key 'source'"])
    try:
        hosts = HostsFile.model_validate({**data, "source": source})
    except ValidationError as e:
        raise ConfigError([describe_error(err, label, lines or {}, root=HostsFile)
                           for err in e.errors()]) from None
    hosts._lines = lines or {}
    return hosts


# -- where each host finds the scheduler --------------------------------------

def split_address(address: str) -> tuple[str, str, int]:
    """tcp://HOST:PORT -> (protocol, host, port); an IPv6 host loses its brackets."""
    proto, rest = address.split("://", 1)
    host, port = rest.rsplit(":", 1)
    return proto, host.strip("[]"), int(port)


def this_machine_names() -> set[str]:
    """The names and addresses by which this machine knows itself."""
    names = {"localhost", socket.gethostname(), socket.getfqdn()}
    for name in list(names):
        with contextlib.suppress(OSError):
            names |= {info[4][0] for info in socket.getaddrinfo(name, None)}
    return names


def is_this_machine(host: str, names: set[str] | None = None) -> bool:
    if host.lower() == "localhost":
        return True
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return True
    return host in (names if names is not None else this_machine_names())


def scheduler_for_vm(address: str, names: set[str] | None = None) -> str:
    """The scheduler address as a worker inside a lab VM must dial it: one on
    this machine is reached through QEMU's user-network gateway."""
    proto, host, port = split_address(address)
    return f"{proto}://{QEMU_HOST_GATEWAY}:{port}" if is_this_machine(host, names) \
        else address


def route_source(host: str, port: int = 22) -> str:
    """This machine's address on the route to `host` (a routing lookup:
    connecting a UDP socket sends nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


# -- the inventory and variables the playbook gets ----------------------------

@dataclass
class VMHost:
    """What a `vm:` entry resolves to: the VM's SSH endpoint and lab key."""

    name: str
    ssh_port: int
    host_pubkey: str
    key_path: Path
    qmp_socket: Path
    qemu: dict


@dataclass
class WorkerPorts:
    """A VM host's worker listens on `port` in the guest; QEMU forwards
    127.0.0.1:port on this machine to it, so the scheduler can call back."""

    port: int


def resolve_vm(lab: Lab, name: str) -> VMHost:
    """A running VM of this lab file, named in lab.yml or not (the nb-* VMs
    of notebooks and tests)."""
    from .images import ImageStore
    from .vm import VM, VMError, lab_vms_dir, other_running
    if name in lab.vms:
        st = VM(lab, name).state()
    else:
        st = next((s for d, s in other_running(lab) if d.name == name), None)
    if st is None or not st.ssh_ready:
        raise VMError(f"expected a running VM of {lab.source.name} ('uffdlab status' lists "
                      f"them), got {name!r}, which is not running")
    return VMHost(name, st.ssh_port, st.host_pubkey, ImageStore(lab).keys.private_path,
                  lab_vms_dir(lab) / name / "qmp.sock", st.qemu)


def _ssh_args(known_hosts: Path | None, control_dir: Path) -> str:
    pinned = (f"-o UserKnownHostsFile={known_hosts} " if known_hosts else "")
    return (f"{pinned}-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes "
            f"-o ControlMaster=auto -o ControlPersist=60s -o ControlPath={control_dir}/%C")


def inventory(hosts: HostsFile, scheduler: dict[str, str], vms: dict[str, VMHost],
              forwards: dict[str, WorkerPorts], scratch: Path) -> dict:
    """The ansible-runner inventory: one host per entry, with its SSH settings
    and the worker's settings as host variables. `scheduler` maps each entry's
    name to the address its worker dials; pinned host keys are written to
    known_hosts files in `scratch`."""
    control = scratch / "cp"
    control.mkdir(exist_ok=True)
    out: dict[str, dict] = {}
    for entry in hosts.hosts:
        worker = {"worker_name": entry.name, "worker_scheduler": scheduler[entry.name],
                  "worker_vm_slots": entry.vm_slots or 0, "worker_port": 0}
        if entry.vm is not None:
            vm = vms[entry.vm]
            known = scratch / f"known_hosts-{entry.name}"
            known.write_text(f"[127.0.0.1]:{vm.ssh_port} {vm.host_pubkey}\n")
            ssh = {"ansible_host": "127.0.0.1", "ansible_port": vm.ssh_port,
                   "ansible_user": "root", "ansible_ssh_private_key_file": str(vm.key_path),
                   "ansible_ssh_common_args": _ssh_args(known, control)}
            if entry.name in forwards:
                worker["worker_port"] = forwards[entry.name].port
        else:
            known = None
            if entry.host_key:
                known = scratch / f"known_hosts-{entry.name}"
                where = entry.name if entry.port == 22 else f"[{entry.name}]:{entry.port}"
                known.write_text(f"{where} {entry.host_key}\n")
            ssh = {"ansible_host": entry.name, "ansible_port": entry.port,
                   "ansible_user": entry.user,
                   "ansible_ssh_common_args": _ssh_args(known, control)}
            if entry.key is not None:
                ssh["ansible_ssh_private_key_file"] = str(_expand(entry.key, hosts.source))
            if entry.user != "root":
                ssh["ansible_become"] = True
        out[entry.name] = {**ssh, "ansible_python_interpreter": "/usr/bin/python3", **worker}
    return {"all": {"hosts": out}}


def _expand(p: Path, relative_to: Path) -> Path:
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else relative_to.resolve().parent / p


def lock_file(lab: Lab) -> Path | None:
    from .lock import lock_path
    p = lock_path(lab.source)
    return p if p.is_file() else None


def dask_requirements() -> list[str]:
    """The controller's exact Dask: client and workers must match."""
    return [f"distributed=={installed_version('distributed')}",
            f"dask=={installed_version('dask')}"]


def extravars(hosts: HostsFile, lab: Lab, source_tar: Path, wheelhouse_dir: Path,
              state: str) -> dict:
    """The playbook's variables: HOSTS.yml's values unchanged, the checkout's
    tarball, where the wheelhouses go, the lab file, and the Dask versions
    the workers must match."""
    lock = lock_file(lab)
    return {
        "lab_host_state": state,
        "lab_host_dir": hosts.dir,
        "apt_packages": list(hosts.apt_packages),
        "images": list(hosts.images),
        "source_tar": str(source_tar),
        "dask_requirements": dask_requirements(),
        "controller_python": sys.executable,
        "wheelhouse_dir": str(wheelhouse_dir),
        "lab_file": str(lab.source.resolve()),
        "lab_lock": str(lock) if lock else "",
        "worker_service": WORKER_SERVICE,
    }


# -- the wheelhouse a kind of host installs from -----------------------------

@dataclass(frozen=True)
class WheelTarget:
    """A kind of host, as pip sees it: `3.13-2.41-x86_64` (Python, glibc, machine)."""

    python: str
    glibc: str
    machine: str

    @classmethod
    def parse(cls, text: str) -> WheelTarget:
        m = re.fullmatch(r"(3\.\d{1,2})-2\.(\d{1,3})-(x86_64|aarch64|ppc64le|s390x|i686)",
                         text)
        if not m:
            raise LabHostError(f"expected a host kind like 3.13-2.41-x86_64 (Python, glibc, "
                               f"machine; a lab host needs glibc), got {text!r}")
        return cls(m[1], f"2.{m[2]}", m[3])

    def platforms(self) -> list[str]:
        """The manylinux tags this glibc runs, newest first (pip download
        takes no range), with the old names of 2.17, 2.12 and 2.5."""
        minor = int(self.glibc.split(".")[1])
        tags = [f"manylinux_2_{m}_{self.machine}" for m in range(minor, 4, -1)]
        tags += [f"{old}_{self.machine}" for old, since in
                 (("manylinux2014", 17), ("manylinux2010", 12), ("manylinux1", 5))
                 if minor >= since]
        return tags


def project_requirements(repo: Path = REPO) -> list[str]:
    """The checkout's own dependencies, from pyproject.toml."""
    import tomllib
    with open(repo / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def wheelhouse_command(target: WheelTarget, dest: Path) -> list[str]:
    """pip download of every wheel the checkout needs on such a host: its
    dependencies, this Dask, setuptools to install the checkout itself, and
    pip, which installs them all (binary wheels only: a host builds nothing)."""
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
            "--python-version", target.python, "--implementation", "cp", "--dest", str(dest)]
    for tag in target.platforms():
        argv += ["--platform", tag]
    return argv + project_requirements() + dask_requirements() + ["setuptools>=64", "wheel",
                                                                   "pip"]


def build_wheelhouse(target: WheelTarget, dest_tar: Path) -> Path:
    """Download the wheels into a directory next to `dest_tar` and pack them
    as a reproducible tar (the same wheels give the same bytes, so a host
    copies it again only when they change)."""
    wheels = dest_tar.with_suffix(".d")
    wheels.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(wheelhouse_command(target, wheels), capture_output=True, text=True)
    if res.returncode != 0:
        raise LabHostError(f"pip download for Python {target.python}, glibc {target.glibc}, "
                           f"{target.machine} failed: {res.stderr.strip()[-1500:]}")
    tmp = dest_tar.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for whl in sorted(wheels.glob("*.whl")):
            tar.add(whl, arcname=whl.name, filter=_normalized)
    os.replace(tmp, dest_tar)
    return dest_tar


def checkout_files(repo: Path = REPO) -> list[str]:
    """The checkout's files as git sees them: tracked or untracked but not
    ignored (so .venv, results and build products stay home), existing."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached",
                              "--others", "--exclude-standard"],
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LabHostError(f"cannot list the checkout's files with git in {repo}: "
                           f"{getattr(e, 'stderr', b'') or e}") from None
    names = sorted({n for n in out.decode().split("\0") if n})
    return [n for n in names if (repo / n).is_file() and not (repo / n).is_symlink()]


def source_tarball(dest: Path, repo: Path = REPO) -> Path:
    """This checkout as a byte-for-byte reproducible tar: unchanged files give
    the same checksum, so hosts reinstall only after a change."""
    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in checkout_files(repo):
            tar.add(repo / name, arcname=name, filter=_normalized)
    return dest


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    info.mode = 0o755 if info.mode & 0o100 else 0o644
    return info


# -- the local scheduler -------------------------------------------------------

@dataclass
class LocalScheduler:
    """A `dask scheduler` that `cluster up` started on this machine."""

    process: ProcessId
    address: str            # how this machine's clients reach it
    bind: str               # the interface it listens on
    port: int
    log: str
    started: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {"process": self.process.to_dict(), "address": self.address,
                "bind": self.bind, "port": self.port, "log": self.log,
                "started": self.started}

    @classmethod
    def from_dict(cls, d: dict) -> LocalScheduler | None:
        proc = ProcessId.from_dict(d.get("process"))
        try:
            return None if proc is None else cls(proc, str(d["address"]), str(d["bind"]),
                                                  int(d["port"]), str(d["log"]),
                                                  float(d["started"]))
        except (KeyError, TypeError, ValueError):
            return None


def cluster_dir(lab: Lab) -> Path:
    return lab.cache_path / "cluster"


def recorded_scheduler(lab: Lab) -> LocalScheduler | None:
    """The scheduler `cluster up` started, if it still runs (a dead or
    reused PID is not it)."""
    try:
        rec = LocalScheduler.from_dict(json.loads(
            (cluster_dir(lab) / "scheduler.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return None
    return rec if rec is not None and rec.process.alive() else None


def dask_command() -> str:
    """The `dask` command of the environment uffdlab runs in."""
    return str(Path(sys.executable).parent / "dask")


def start_scheduler(lab: Lab, bind: str, port: int = SCHEDULER_PORT,
                    dashboard_port: int = DASHBOARD_PORT, timeout: float = 60) -> LocalScheduler:
    """Start `dask scheduler` detached from this process (it outlives the
    command), record it, and wait until it answers."""
    d = cluster_dir(lab)
    d.mkdir(parents=True, exist_ok=True)
    info_file = d / "scheduler-info.json"       # its path in argv identifies the process
    info_file.unlink(missing_ok=True)
    log = d / "scheduler.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [dask_command(), "scheduler", "--host", bind, "--port", str(port),
             "--dashboard-address", f"{bind}:{dashboard_port}",
             "--scheduler-file", str(info_file)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=d)
    rec = LocalScheduler(ProcessId.of(proc.pid, str(info_file)), "", bind, port, str(log))
    rec.address = f"tcp://{'127.0.0.1' if bind in ('0.0.0.0', '127.0.0.1') else bind}:{port}"
    deadline = time.monotonic() + timeout
    while not _answers(rec.address):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                rec.process.signal(signal.SIGKILL)
            proc.wait()
            raise LabHostError(f"the local dask scheduler did not start on {bind}:{port} "
                               f"(exit {proc.returncode}); its log {log} ends:\n"
                               f"{_tail(log)}")
        time.sleep(0.3)
    tmp = d / "scheduler.json.tmp"
    tmp.write_text(json.dumps(rec.to_dict(), indent=2))
    os.replace(tmp, d / "scheduler.json")
    return rec


def stop_scheduler(lab: Lab, timeout: float = 15) -> LocalScheduler | None:
    """Stop the scheduler `cluster up` started, only if the recorded process
    is still that one; returns what was stopped (None: nothing was running)."""
    rec = recorded_scheduler(lab)
    if rec is None:
        (cluster_dir(lab) / "scheduler.json").unlink(missing_ok=True)
        return None
    rec.process.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while rec.process.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    if rec.process.alive():
        rec.process.kill()
    (cluster_dir(lab) / "scheduler.json").unlink(missing_ok=True)
    return rec


def _answers(address: str, timeout: float = 1.0) -> bool:
    _, host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- a VM host's worker port ----------------------------------------------------

def forward_worker_port(vm: VMHost) -> WorkerPorts:
    """Have QEMU forward a free port of this machine's loopback to the same
    port in the guest, where the VM's worker listens: the scheduler calls
    workers back (to gather results), and a VM on QEMU's user network is
    otherwise unreachable. The forward lasts as long as the VM."""
    from .qmp import qmp
    from .vm import free_port
    for _ in range(5):
        port = free_port()
        reply = qmp(vm.qmp_socket, "human-monitor-command",
                    **{"command-line": f"hostfwd_add net0 tcp:127.0.0.1:{port}-:{port}"})
        if not str(reply).strip():           # HMP says nothing when it worked
            return WorkerPorts(port)
    raise LabHostError(f"vm {vm.name}: QEMU refused to forward a worker port: {reply}")


def worker_forwards(lab: Lab, vms: dict[str, VMHost]) -> dict[str, WorkerPorts]:
    """Each VM host's worker port: the one recorded for this very QEMU
    process when there is one (its forward is still in place), else a new one."""
    path = cluster_dir(lab) / "forwards.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    # keyed by the VM's directory: two lab files may both have a VM "guest"
    known = {d: rec for d, rec in known.items()
             if (p := ProcessId.from_dict(rec.get("qemu"))) is not None and p.alive()}
    out = {}
    for name, vm in vms.items():
        key = str(vm.qmp_socket.parent)
        rec = known.get(key) or {}
        if rec.get("qemu") == vm.qemu:
            out[name] = WorkerPorts(int(rec["port"]))
        else:
            out[name] = forward_worker_port(vm)
            known[key] = {"qemu": vm.qemu, "port": out[name].port}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=2))
    os.replace(tmp, path)
    return out


# -- running the playbook -----------------------------------------------------

_TASK_START = ("playbook_on_task_start", "playbook_on_handler_task_start")


class _PlaybookEvents:
    """ansible-runner event handler: each task is announced as it starts,
    each host's outcome as it ends; failures are kept per host."""

    def __init__(self, emitter: Emitter):
        self.emitter = emitter
        self.failures: dict[str, str] = {}
        self.changed: dict[str, list[str]] = {}
        self.task = ""
        self.task_started = time.monotonic()
        self._lock = threading.Lock()

    def _emit(self, kind: Kind, message: str, subject: str | None = None, **data) -> None:
        with self._lock:
            self.emitter.listener(Event(kind, subject or self.emitter.subject, message, data))

    def __call__(self, event: dict) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data", {})
        task, host = data.get("task", ""), data.get("host", "")
        res = data.get("res", {}) or {}
        if kind in _TASK_START:
            self.task, self.task_started = task, time.monotonic()
            self._emit(Kind.TASK, f"started: {task}", task=task, host="", state="started")
        elif kind == "runner_on_ok":
            state = "changed" if res.get("changed") else "ok"
            if res.get("changed"):
                self.changed.setdefault(host, []).append(task)
            self._emit(Kind.TASK, f"{state}: {task}", host, task=task, host=host, state=state)
        elif kind == "runner_on_skipped":
            self._emit(Kind.TASK, f"skipped: {task}", host, task=task, host=host,
                       state="skipped")
        elif kind in ("runner_on_failed", "runner_on_unreachable"):
            if kind == "runner_on_failed" and data.get("ignore_errors"):
                return True
            # a command's own words say more than Ansible's "non-zero return code"
            msg = " ".join(str(x).strip() for x in (res.get("msg"), res.get("stderr"))
                           if x) or res.get("stdout") or json.dumps(res)
            unreachable = " (unreachable)" if kind.endswith("unreachable") else ""
            self.failures[host] = (f"task '{task}' failed{unreachable}: "
                                   f"{str(msg).strip()[-1500:]}")
            self._emit(Kind.TASK, f"failed: {task}", host, task=task, host=host,
                       state="failed")
        return True

    def heartbeats(self, seconds: float):
        started = time.monotonic()

        def beat() -> None:
            now = time.monotonic()
            self._emit(Kind.HEARTBEAT, f"playbook running for {now - started:.0f} s; task "
                       f"'{self.task}' for {now - self.task_started:.0f} s",
                       step="lab-host", elapsed=round(now - started, 1),
                       task=self.task, task_elapsed=round(now - self.task_started, 1))
        return every(seconds, beat, "lab-host-heartbeat")


def run_playbook(inventory_: dict, variables: dict, scratch: Path, emitter: Emitter,
                 playbook: str = "lab-host.yml") -> _PlaybookEvents:
    """Run the playbook on every host at once; a LabHostError names each
    host that failed and why."""
    import ansible_runner
    events = _PlaybookEvents(emitter)
    (scratch / "runner").mkdir(exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)
    with events.heartbeats(HEARTBEAT_SECONDS):
        runner = ansible_runner.run(
            private_data_dir=str(scratch / "runner"), project_dir=str(PLAYBOOKS),
            playbook=playbook, inventory=inventory_, extravars=variables,
            envvars={"ANSIBLE_PIPELINING": "True", "ANSIBLE_HOST_KEY_CHECKING": "True",
                     "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "False",
                     "ANSIBLE_SSH_RETRIES": "5", "ANSIBLE_LOCAL_TEMP": str(scratch / "at"),
                     "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")},
            event_handler=events, quiet=True, suppress_env_files=True)
    if events.failures:
        raise LabHostError("; ".join(f"{h}: {m}" for h, m in sorted(events.failures.items())))
    if runner.status != "successful":
        out = runner.stdout.read() if runner.stdout else ""
        raise LabHostError(f"ansible-runner ended {runner.status} (rc {runner.rc}): "
                           + "\n".join(out.strip().splitlines()[-20:]))
    return events


# -- up, down, status ---------------------------------------------------------

@dataclass
class ClusterUp:
    scheduler: str                   # the address this machine's clients use
    started_scheduler: bool
    workers: dict[str, dict]         # worker name -> scheduler_info entry
    dashboard: str | None
    seconds: float


def _plan(hosts: HostsFile, lab: Lab,
          local: LocalScheduler | None) -> tuple[dict[str, str], dict[str, VMHost]]:
    """Each entry's scheduler address as its worker dials it, and the VMs."""
    from .vm import VMError
    names = this_machine_names()
    vms = {}
    for i, entry in enumerate(hosts.hosts):
        if entry.vm is not None:
            try:
                vms[entry.vm] = resolve_vm(lab, entry.vm)
            except VMError as e:
                raise LabHostError(hosts.problem(("hosts", i, "vm"), str(e))) from None
    dial = {}
    for entry in hosts.hosts:
        if local is None:
            scheduler = hosts.scheduler or ""
            dial[entry.name] = scheduler_for_vm(scheduler, names) if entry.vm else scheduler
        else:               # ours, here: a host dials this machine's address on its route
            host = QEMU_HOST_GATEWAY if entry.vm else route_source(entry.name, entry.port)
            dial[entry.name] = f"tcp://{host}:{local.port}"
    return dial, vms


def cluster_up(hosts: HostsFile, lab: Lab, listener: Listener | None = None,
               join_timeout: float = 600, port: int = SCHEDULER_PORT) -> ClusterUp:
    """Prepare every host and start its worker; start a local scheduler when
    HOSTS.yml names none; wait until each host's worker has joined."""
    started = time.monotonic()
    checkout()
    hosts.check_against(lab)
    emitter = Emitter("cluster", listener)
    started_scheduler = False
    if hosts.scheduler is not None:
        client_address = hosts.scheduler
        local = None
    else:
        local = recorded_scheduler(lab)
        if local is None:
            bind = "127.0.0.1" if all(e.vm for e in hosts.hosts) else "0.0.0.0"
            emitter.emit(Kind.BOOTING, f"starting a dask scheduler on {bind}:{port}")
            local = start_scheduler(lab, bind, port)
            started_scheduler = True
        client_address = local.address
    dial, vms = _plan(hosts, lab, local)
    forwards = worker_forwards(lab, vms)
    emitter.emit(Kind.PROVISIONING, f"lab-host.yml on {len(hosts.hosts)} host(s): "
                 + ", ".join(e.name for e in hosts.hosts))
    reap_scratch(SCRATCH_PREFIX)
    with process_scratch(SCRATCH_PREFIX) as tmp:
        scratch = Path(tmp)
        tar = source_tarball(scratch / "uffdlab-src.tar")
        run_playbook(inventory(hosts, dial, vms, forwards, scratch),
                     extravars(hosts, lab, tar, scratch / "wheels", "started"), scratch,
                     emitter)
    workers = wait_for_workers(client_address, [e.name for e in hosts.hosts],
                               join_timeout, emitter)
    return ClusterUp(client_address, started_scheduler, workers,
                     dashboard_link(client_address), round(time.monotonic() - started, 1))


@dataclass
class ClusterDown:
    stopped: list[str]               # hosts whose worker service was stopped and disabled
    not_running: list[str]           # VM hosts that are gone (and their workers with them)
    scheduler: LocalScheduler | None   # the local scheduler stopped, if any


def cluster_down(hosts: HostsFile, lab: Lab, listener: Listener | None = None,
                 stop_local: bool = True) -> ClusterDown:
    """Stop and disable every host's worker; then stop the scheduler `up`
    started here (when HOSTS.yml names none and it still runs)."""
    from .vm import VMError
    emitter = Emitter("cluster", listener)
    vms, gone = {}, []
    for entry in hosts.hosts:
        if entry.vm is not None:
            try:
                vms[entry.vm] = resolve_vm(lab, entry.vm)
            except VMError:
                gone.append(entry)      # a stopped VM took its worker with it
                emitter.emit(Kind.STOPPED, f"vm {entry.vm} is not running: no worker to stop")
    left = hosts.model_copy(update={"hosts": [e for e in hosts.hosts if e not in gone]})
    dial = {e.name: hosts.scheduler or "" for e in left.hosts}
    if left.hosts:
        emitter.emit(Kind.PROVISIONING, f"stopping the workers of {len(left.hosts)} host(s)")
        reap_scratch(SCRATCH_PREFIX)
        with process_scratch(SCRATCH_PREFIX) as tmp:
            scratch = Path(tmp)
            run_playbook(inventory(left, dial, vms, {}, scratch),
                         extravars(left, lab, scratch / "unused.tar", scratch / "wheels",
                                   "stopped"), scratch, emitter)
    stopped = stop_scheduler(lab) if hosts.scheduler is None and stop_local else None
    return ClusterDown([e.name for e in left.hosts], [e.name for e in gone], stopped)


def _client(address: str, timeout: float = 10):
    from distributed import Client
    return Client(address, timeout=timeout, set_as_default=False)


def workers_by_name(address: str, timeout: float = 10) -> dict[str, dict]:
    """The scheduler's workers by name (an OSError when nothing answers)."""
    with _client(address, timeout) as client:
        info = client.scheduler_info(n_workers=-1)
    return {str(w.get("name")): {**w, "address": a} for a, w in info["workers"].items()}


def wait_for_workers(address: str, names: list[str], timeout: float,
                     emitter: Emitter) -> dict[str, dict]:
    """Wait until a worker of each name has joined the scheduler."""
    deadline = time.monotonic() + timeout
    with _client(address) as client:
        while True:
            info = client.scheduler_info(n_workers=-1)
            joined = {str(w.get("name")): {**w, "address": a}
                      for a, w in info["workers"].items()}
            have = [n for n in names if n in joined]
            emitter.emit(Kind.PROGRESS, f"{len(have)} of {len(names)} workers joined",
                         done=len(have), total=len(names))
            if len(have) == len(names):
                return {n: joined[n] for n in names}
            if time.monotonic() > deadline:
                missing = ", ".join(n for n in names if n not in joined)
                raise LabHostError(f"no worker of {missing} joined {address} within "
                                   f"{timeout:.0f} s ('journalctl -u {WORKER_SERVICE}' on "
                                   f"the host says why)")
            time.sleep(1)


def dashboard_link(address: str) -> str | None:
    """The scheduler's dashboard URL, or None when it serves none (the
    dashboard needs the bokeh package next to the scheduler)."""
    try:
        with _client(address) as client:
            port = client.scheduler_info(n_workers=0).get("services", {}).get("dashboard")
    except (OSError, TimeoutError):
        return None
    if not port:
        return None
    _, host, _ = split_address(address)
    return f"http://{host}:{port}/status"


@dataclass
class WorkerRow:
    name: str
    host: str
    vm_slots: float
    processing: int


def cluster_status(address: str, timeout: float = 10) -> tuple[list[WorkerRow], str | None]:
    """The scheduler's workers and its dashboard link; a LabHostError says
    that nothing answers at `address`."""
    nothing = (f"no Dask scheduler answers at {address}; 'uffdlab cluster up HOSTS.yml' "
               f"starts one")
    if not _answers(address, timeout=min(timeout, 5)):
        raise LabHostError(nothing)         # at once, not after the client's retries
    try:
        with _client(address, timeout) as client:
            info = client.scheduler_info(n_workers=-1)
            processing = client.processing()
    except (OSError, TimeoutError) as e:
        raise LabHostError(f"{nothing} ({e})") from None
    rows = [WorkerRow(str(w.get("name")), str(w.get("host", "")),
                      float((w.get("resources") or {}).get("vm_slots", 0)),
                      len(processing.get(a, ())))
            for a, w in info["workers"].items()]
    port = info.get("services", {}).get("dashboard")
    _, host, _ = split_address(address)
    return sorted(rows, key=lambda r: r.name), (f"http://{host}:{port}/status"
                                                if port else None)


def default_scheduler(lab: Lab) -> str | None:
    """lab.yml's cluster.scheduler, else the one `cluster up` started here."""
    if lab.cluster is not None and lab.cluster.scheduler:
        return lab.cluster.scheduler
    rec = recorded_scheduler(lab)
    return rec.address if rec else None


def main(argv: list[str]) -> int:
    """`python -m uffdlab.labhost wheelhouse KIND DEST.tar`: what the
    playbook's controller-side task runs for each kind of host."""
    if len(argv) != 3 or argv[0] != "wheelhouse":
        print("usage: python -m uffdlab.labhost wheelhouse 3.13-2.41-x86_64 DEST.tar",
              file=sys.stderr)
        return 2
    try:
        build_wheelhouse(WheelTarget.parse(argv[1]), Path(argv[2]))
    except LabHostError as e:
        print(f"uffdlab: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
