# SPDX-License-Identifier: MIT
"""Lab.vm(name).up() --qemu overlay, QMP, hostfwd--> a running, SSH-ready VM.

A running VM is a directory `<cache>/vms/<lab>/<name>/` holding state.json,
the qcow2 overlay, the QMP socket and the serial log, owned by a keeper
process (see keeper.py). `<lab>` is one directory per lab file, so two labs
sharing a cache never see each other's VMs. `down()` quits QEMU over QMP;
the keeper then deletes the overlay. State on disk lets any later command
find, use or clean up a VM, and owned.py decides what it may touch: only
marked directories, only the lab's file names, only processes whose start
time and command line match what was recorded at launch.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import paramiko

from . import accel as accel_mod
from . import template as template_mod
from .config import Lab, VMSpec, format_size, parse_size
from .events import Emitter, Listener
from .images import Image, ImageStore
from .keeper import cleanup, last_serial_log
from .kernel import KernelStore
from .model import Kind
from .owned import ProcessId, is_vm_dir, make_vm_dir
from .paths import REPO
from .qemu import QemuCommand
from .qmp import qmp
from .ssh import Session, port_open
from .template import TEMPLATE_VERSION, Template, file_digest, key_of
from .tools import tools_digest

PANIC_MARKER = "Kernel panic - not syncing"
# Seconds between HEARTBEAT events while a VM boots or restores.
HEARTBEAT_SECONDS = 2.0


class VMError(Exception):
    pass


@dataclass
class VMState:
    """What is known about a running VM; saved as state.json."""

    name: str
    image: str
    image_key: str
    kernel_release: str
    accel: str
    accel_reason: str
    ssh_port: int
    keeper: dict                    # owned.ProcessId of the keeper, and of QEMU
    qemu: dict
    started: float
    host_pubkey: str
    memory: int
    cpus: int
    cmdline: str = ""               # the guest kernel's extra command line
    kernel: str = ""                # a local or tree kernel's digest ("" packaged)
    template: str | None = None     # the template it was restored from
    ssh_ready: bool = False
    boot_seconds: float | None = None
    facts: dict = field(default_factory=dict)   # probe output once provisioned
    lab: str = ""                   # the lab file that started it

    @classmethod
    def load(cls, path: Path) -> VMState:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def keeper_id(self) -> ProcessId | None:
        return ProcessId.from_dict(self.keeper)

    @property
    def qemu_id(self) -> ProcessId | None:
        return ProcessId.from_dict(self.qemu)

    @property
    def keeper_pid(self) -> int:
        return int(self.keeper.get("pid", 0))

    @property
    def qemu_pid(self) -> int:
        return int(self.qemu.get("pid", 0))

    def alive(self) -> bool:
        """Whether the keeper or QEMU the lab started still runs (a reused
        PID is not them)."""
        return any(p is not None and p.alive() for p in (self.keeper_id, self.qemu_id))

    def shape(self) -> dict:
        return {"image key": self.image_key, "memory": self.memory, "cpus": self.cpus,
                "kernel command line": self.cmdline, "kernel": self.kernel}

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)


# VM and image names become directory names: never a path.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def check_name(name: str, what: str = "VM") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise VMError(f"{what} name: expected lowercase letters, digits, _ and - (up to 32, "
                      f"starting with a letter or digit), got {name!r}")
    return name


def lab_vms_dir(lab: Lab) -> Path:
    """The directory of this lab file's VMs: one per lab file, so labs that
    share a cache (and VM names) never see each other's VMs."""
    source = str(lab.source.resolve())
    slug = re.sub(r"[^a-z0-9-]+", "-", lab.name.lower()).strip("-")[:24] or "lab"
    return lab.cache_path / "vms" / f"{slug}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VM(Emitter):
    """One VM of the lab, running or not."""

    def __init__(self, lab: Lab, name: str | None = None, listener: Listener | None = None):
        if name is not None:
            check_name(name)
        self.name, self.spec = lab.vm_spec(name)
        check_name(self.name)
        check_name(self.spec.image, "image")
        super().__init__(self.name, listener)
        self.lab = lab
        self.images = ImageStore(lab, listener)
        self.dir = lab_vms_dir(lab) / self.name
        # the process whose end stops this VM (its keeper watches it); None:
        # the VM lives until 'uffdlab down'
        self.owner: ProcessId | None = None

    @classmethod
    def for_shape(cls, lab: Lab, image: str, memory: str | int = "1536M", cpus: int = 2,
                  name: str | None = None, listener: Listener | None = None,
                  fresh: bool = False) -> VM:
        """A VM of `image` with this memory and CPU count. VMs are named after
        their shape (nb-trixie-1536m-2c), so notebooks and sweep points that
        ask for the same shape reuse one running, provisioned VM. `fresh`
        gives a VM of its own instead (a unique name; restored from the
        shape's template when there is one), for the caller to stop."""
        lab.image_spec(image)                              # a clear error if unknown
        size = parse_size(memory)
        if name is None:
            name = re.sub(r"[^a-z0-9-]", "-",
                          f"nb-{image}-{format_size(size)}-{cpus}c".lower())[:25]
            if fresh:
                name += "-" + os.urandom(3).hex()
        spec = VMSpec(image=image, memory=size, cpus=cpus)
        vm = cls(lab.model_copy(update={"vms": {**lab.vms, name: spec}}), name, listener)
        if fresh:       # disposable: it must not outlive the process that asked for it
            vm.owner = ProcessId.of(os.getpid(), "")
        return vm

    # -- paths ------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def serial_log(self) -> Path:
        live = self.dir / "serial.log"
        return live if live.exists() else last_serial_log(self.dir)

    @property
    def key_path(self) -> Path:
        return self.images.keys.private_path

    def image(self) -> Image:
        return self.images.image(self.spec.image)

    # -- state ------------------------------------------------------------
    def state(self) -> VMState | None:
        """The running VM's state, or None; sweeps a VM whose processes died.
        (None too while another process is still starting its keeper.)"""
        if not is_vm_dir(self.dir):
            return None
        if not _dir_alive(self.dir):
            reap_dir(self.dir)
            return None
        try:
            return VMState.load(self.state_file)
        except (OSError, ValueError, TypeError):
            return None

    # -- command line -----------------------------------------------------
    def command(self, accel: str, ssh_port: int = 0) -> QemuCommand:
        img = self.image()
        return QemuCommand(
            name=self.name, accel=accel, memory_mb=self.spec.memory >> 20,
            cpus=self.spec.cpus, vmlinuz=img.vmlinuz, initrd=img.initrd,
            disk=self.dir / "overlay.qcow2", ssh_port=ssh_port,
            serial_log=self.dir / "serial.log", qmp_socket=self.dir / "qmp.sock",
            cmdline=self.kernel_cmdline(img))

    def kernel_cmdline(self, img: Image | None = None) -> str:
        """The image's and the VM's extra command line, after the lab's SSH
        key (an image does not carry it: the guest installs it at boot)."""
        img = img or self.image()
        key = f"uffdlab.authkey={self.images.keys.public_key().split()[1]}"
        return " ".join(p for p in (key, img.kernel_cmdline, self.spec.cmdline) if p)

    def choose_accel(self, probe: bool = True) -> accel_mod.AccelChoice:
        img = self.image()
        return accel_mod.choose(self.lab.accel, img.vmlinuz, img.initrd,
                                self.lab.cache_path / "accel.json", probe=probe)

    def dry_run(self) -> str:
        """The exact QEMU command `up` would run (the port is picked at up).
        It starts nothing: with accel auto and no verdict cached yet, it
        shows the accel a probe would try first and says so."""
        choice = self.choose_accel(probe=False)
        cmd = self.command(choice.accel, ssh_port=free_port()).shell()
        return cmd if not choice.unprobed else f"# accel: {choice.reason}\n{cmd}"

    # -- lifecycle --------------------------------------------------------
    def up(self, reuse: bool = False) -> VMState:
        """Boot the VM and wait until SSH answers with the pinned host key.
        Two processes bringing up one VM take turns: the second reuses it."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dir.parent / f".{self.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._up_locked(reuse)

    def _up_locked(self, reuse: bool) -> VMState:
        st = self.state()
        if st is not None:
            if reuse and st.ssh_ready:
                self._check_shape(st)
                return st
            raise VMError(f"VM {self.name!r} is already running (ssh port {st.ssh_port}); "
                          f"'uffdlab down {self.name}' first")
        img = self.images.build(self.spec.image)
        choice = self.choose_accel()
        if choice.fell_back:
            self.emit(Kind.ACCEL, choice.reason, accel=choice.accel)
        tmpl = self._usable_template(img, choice.accel)
        for attempt in range(3):                 # a stolen port is retried
            try:
                return self._boot(img, choice, tmpl)
            except _PortTaken:
                if attempt == 2:
                    raise VMError("could not bind a free SSH port on 127.0.0.1") from None
            except _RestoreFailed as e:          # boot cold; provisioning saves a new one
                self.emit(Kind.TEMPLATE, f"restoring template {tmpl.key} failed ({e}); "
                          f"booting cold, a new template is saved after provisioning",
                          key=tmpl.key, problem=str(e))
                tmpl.remove()
                tmpl = None
        raise VMError("could not boot")           # unreachable: the loop returns or raises

    # -- templates --------------------------------------------------------
    def template_for(self, accel: str, img: Image | None = None) -> tuple[Template, dict]:
        """The template this VM's shape restores from, and its key's inputs."""
        img = img or self.image()
        inputs = {"version": TEMPLATE_VERSION, "image": img.key,
                  "provision": self.lab.provision.model_dump(), "tools": tools_digest(),
                  "qemu": accel_mod.qemu_version(), "machine": self.command(accel).shape(),
                  # a local kernel can change under the same path
                  "kernel": [file_digest(p) for p in (img.vmlinuz, img.initrd)
                             if p is not None] if img.spec.kernel.is_local else None}
        key = key_of(inputs)
        return Template(key, self.lab.cache_path / "templates" / key), inputs

    def _usable_template(self, img: Image, accel: str) -> Template | None:
        if not self.lab.templates:
            return None
        tmpl, _ = self.template_for(accel, img)
        if not tmpl.exists:
            self.emit(Kind.TEMPLATE, f"no template for this shape yet ({tmpl.key}: image, "
                      f"provisioning, guest tools, QEMU and machine arguments as now); "
                      f"booting cold, provisioning saves one", key=tmpl.key)
            return None
        problem = tmpl.problem(img.meta.get("built_at"))
        if problem:
            self.emit(Kind.TEMPLATE, f"template {tmpl.key} cannot be used: {problem}; "
                      f"booting cold, a new template is saved after provisioning",
                      key=tmpl.key, problem=problem)
            tmpl.remove()
            return None
        return tmpl

    def save_template(self) -> Template | None:
        """Save this running, provisioned VM as its shape's template (once);
        the VM runs on. None when the lab turned templates off."""
        st = self.state()
        if not self.lab.templates or st is None or not st.facts:
            return None
        img = self.image()
        if img.spec.kernel.is_local and _digest_or_none(img) != st.kernel:
            # The kernel changed while this VM ran (a tree edited and rebuilt
            # during provisioning): a template keyed by the new build would
            # restore the old one.
            self.emit(Kind.TEMPLATE, f"no template saved: VM {self.name} runs kernel "
                      f"{_show('kernel', st.kernel)}, and the kernel changed while it ran "
                      f"({img.vmlinuz} is another build now)", kernel=st.kernel)
            return None
        tmpl, inputs = self.template_for(st.accel, img)
        if tmpl.exists:
            return tmpl
        self.drop_session()                  # no open SSH connection in the saved guest
        paused = template_mod.save(tmpl, self.dir / "qmp.sock", self.dir / "overlay.qcow2",
                                   self.dir / "serial.log", inputs, st.facts,
                                   img.meta.get("built_at"))
        sync_clock(self.shared_session())    # it stood still while the guest was paused
        size = sum(p.stat().st_size for p in (tmpl.state, tmpl.disk))
        self.emit(Kind.TEMPLATE, f"saved template {tmpl.key} ({size >> 20} MiB; the guest "
                  f"paused {paused:.1f} s)", key=tmpl.key, seconds=paused, bytes=size)
        return tmpl

    def _wait_for_load(self, st: VMState, keeper: subprocess.Popen) -> None:
        """Until QEMU has loaded the saved state, then let the guest run: it
        was saved paused, so it wakes paused."""
        deadline = time.monotonic() + self.spec.boot_timeout
        beat = _Heartbeat(self, "restoring", st.started)
        while True:
            if beat.due():
                beat(_tail(self.serial_log, 20))
            if keeper.poll() is not None or not st.qemu_id.alive():
                raise VMError(f"QEMU exited while loading the saved state:\n"
                              f"{_tail(self.dir / 'qemu.log', 10)}")
            try:
                status = qmp(self.dir / "qmp.sock", "query-status", 5)["status"]
            except Exception:
                status = "starting"
            if status == "paused":
                qmp(self.dir / "qmp.sock", "cont", 5)
                return
            if status == "running":
                return
            if time.monotonic() > deadline:
                raise VMError(f"the saved state did not load in {self.spec.boot_timeout:.0f} s "
                              f"(QEMU says {status!r})")
            time.sleep(0.05)

    def _after_restore(self, st: VMState, tmpl: Template) -> None:
        """A restored guest wakes with the template's clock and random state:
        set the clock, reseed the CRNG with host randomness (so two restored
        VMs do not share it), and check the guest is the one the template's
        facts describe."""
        facts = tmpl.meta["facts"]
        reseed = ("import fcntl, os, sys; fd = os.open('/dev/random', os.O_WRONLY); "
                  "os.write(fd, bytes.fromhex(sys.argv[1])); "
                  "fcntl.ioctl(fd, 0x5207)")     # RNDRESEEDCRNG: use it now, not in 60 s
        tools = self.lab.provision.tools_dir
        # One round trip: the guest asks for the host's time when it is ready to
        # set it (so the value is only a one-way trip old), then reseeds, probes.
        cmd = (f"echo {CLOCK_PROMPT}; read -r t && date -s @$t >/dev/null && "
               f"python3 -c {shlex.quote(reseed)} {os.urandom(64).hex()} && "
               f"{shlex.quote(tools)}/bin/uffd-probe")
        try:
            out = self.shared_session().run(
                cmd, timeout=60, check=True,
                reply=lambda line: f"{time.time() + EXEC_LATENCY:.3f}\n"
                if line == CLOCK_PROMPT else None).stdout
            probe = json.loads(out.split(CLOCK_PROMPT, 1)[1])
        except Exception as e:
            raise _RestoreFailed(f"the restored guest did not answer as provisioned: {e}") \
                from e
        want = facts.get("probe", {})
        for field_name in ("kernel", "features"):
            if probe.get(field_name) != want.get(field_name):
                raise _RestoreFailed(f"the restored guest's {field_name} is "
                                     f"{probe.get(field_name)!r}, the template's "
                                     f"{want.get(field_name)!r}")
        st.facts, st.template = facts, tmpl.key

    def _check_shape(self, st: VMState) -> None:
        """A running VM is reused only if it is the VM that was asked for.
        A tree's kernel is built first, as `up` builds it: the tree may have
        changed since the VM booted, and only a build tells whether the
        kernel did (until then its bzImage does not exist)."""
        img = self.image()
        if img.spec.kernel.is_tree:
            img = replace(img, vmlinuz=KernelStore(self.lab, self.listener)
                          .build(img.name).bzimage)
        wanted = {"image key": img.key, "memory": self.spec.memory, "cpus": self.spec.cpus,
                  "kernel command line": self.kernel_cmdline(img),
                  "kernel": kernel_digest(img)}
        have = st.shape()
        diff = [f"{k} {_show(k, have[k])} (asked for {_show(k, v)})"
                for k, v in wanted.items() if have[k] != v]
        if img.spec.kernel.is_tree and have["kernel"] != wanted["kernel"]:
            tree = self.lab.kernel_path(img.spec.kernel.tree)
            others = [d for d in diff if not d.startswith("kernel ")]
            raise VMError(
                f"VM {self.name!r} runs an older build of its tree kernel "
                f"({_show('kernel', have['kernel'])}; {tree} as it is now is "
                f"{_show('kernel', wanted['kernel'])})"
                + (f", and differs in {'; '.join(others)}" if others else "")
                + f". 'uffdlab down {self.name}' first, then run again to boot the new "
                f"build, or use a fresh VM of its own (as 'uffdlab run --bisect' does)")
        if diff:
            raise VMError(f"VM {self.name!r} is running with a different shape: "
                          f"{'; '.join(diff)}. 'uffdlab down {self.name}' first, "
                          f"or ask for the running shape")

    def _boot(self, img: Image, choice: accel_mod.AccelChoice,
              tmpl: Template | None = None) -> VMState:
        """Boot cold, or restore `tmpl` when given."""
        port = free_port()
        cmd = replace(self.command(choice.accel, port),
                      incoming=tmpl.state if tmpl is not None else None)
        backing = tmpl.disk if tmpl is not None else img.base
        make_vm_dir(self.dir, str(self.lab.source.resolve()))
        # the previous boot's log must not speak for this one
        last_serial_log(self.dir).unlink(missing_ok=True)
        started = time.time()
        keeper = None
        try:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing),
                            "-F", "qcow2", str(cmd.disk)], check=True, capture_output=True)
            if tmpl is not None:
                seed_serial_log(cmd.serial_log, tmpl)
            launch = {"argv": cmd.argv()}
            if self.owner is not None:
                launch["owner"] = self.owner.to_dict()
            (self.dir / "launch.json").write_text(json.dumps(launch))
            self.emit(Kind.BOOTING, f"{img.kernel_release} under {choice.accel}, "
                      f"{self.spec.cpus} cpus, {self.spec.memory >> 20} MiB"
                      + (f", restoring template {tmpl.key}" if tmpl else ""),
                      accel=choice.accel, kernel=img.kernel_release,
                      template=tmpl.key if tmpl else None)
            keeper = subprocess.Popen(
                [sys.executable, "-m", "uffdlab.keeper", str(self.dir)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                stderr=open(self.dir / "keeper.log", "w"), start_new_session=True,
                cwd=REPO)
            keeper_id = ProcessId.of(keeper.pid, str(self.dir))
            (self.dir / "keeper.json").write_text(json.dumps(keeper_id.to_dict()))
            qemu_pid = int(keeper.stdout.readline() or 0)
            qemu_id = ProcessId.of(qemu_pid, str(cmd.qmp_socket))
            st = VMState(self.name, img.name, img.key, img.kernel_release, choice.accel,
                         choice.reason, port, keeper_id.to_dict(), qemu_id.to_dict(),
                         started, img.host_pubkey, self.spec.memory, self.spec.cpus,
                         cmdline=cmd.cmdline, kernel=kernel_digest(img),
                         lab=str(self.lab.source.resolve()))
            st.save(self.state_file)
            steps = {"start": time.time() - started}     # where a restore's seconds go
            try:
                if tmpl is not None:
                    self._wait_for_load(st, keeper)
                    steps["load"] = time.time() - started - sum(steps.values())
                self._wait_for_ssh(st, keeper, restoring=tmpl is not None)
                steps["ssh"] = time.time() - started - sum(steps.values())
                st.ssh_ready = True
                st.save(self.state_file)
                if tmpl is not None:
                    self._after_restore(st, tmpl)
                    steps["fixups"] = time.time() - started - sum(steps.values())
            except VMError as e:
                if tmpl is not None:            # whatever broke, the template is suspect
                    raise _RestoreFailed(str(e).splitlines()[0]) from e
                raise
            st.boot_seconds = round(time.time() - started, 1)
            st.save(self.state_file)
            keeper.stdin.write("detach\n")
            keeper.stdin.close()
            self.emit(Kind.SSH_READY, f"port {port} after {st.boot_seconds} s"
                      + (" (restored: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items())
                         + ")" if tmpl else ""), port=port, seconds=st.boot_seconds,
                      template=tmpl.key if tmpl else None,
                      steps={k: round(v, 2) for k, v in steps.items()})
            return st
        except BaseException as e:
            self.drop_session()                 # a connection to a VM being stopped
            if keeper is not None:
                self._stop_keeper(keeper)
            cleanup(self.dir)
            if not isinstance(e, (_PortTaken, _RestoreFailed)):
                self.emit(Kind.FAILED, str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise

    def _wait_for_ssh(self, st: VMState, keeper: subprocess.Popen,
                      restoring: bool = False) -> None:
        deadline = time.monotonic() + self.spec.boot_timeout
        beat = _Heartbeat(self, "restoring" if restoring else "booting", st.started)
        while True:
            serial = _tail(self.serial_log, 200)
            if beat.due():
                beat(serial)
            panic = _panic_line(serial)
            if panic:
                raise VMError(f"the guest kernel panicked: {panic}\nlast serial lines:\n"
                              f"{self.serial_tail()}")
            if keeper.poll() is not None or not st.qemu_id.alive():
                qlog = _tail(self.dir / "qemu.log", 10)
                if "host forwarding rule" in qlog:
                    raise _PortTaken()
                raise VMError(f"QEMU exited during boot:\n{qlog}\n"
                              f"last serial lines:\n{self.serial_tail()}")
            if st.accel == "kvm" and self._internal_error():
                raise VMError("QEMU reports 'internal-error' (KVM internal error); "
                              "set accel: tcg or auto")
            if time.monotonic() > deadline:
                raise VMError(f"no SSH after {self.spec.boot_timeout:.0f} s; last serial "
                              f"lines:\n{self.serial_tail()}")
            if port_open(st.ssh_port):
                try:
                    # the first good connection is kept: the next command needs one
                    self.drop_session()
                    self._shared = Session(st.ssh_port, st.host_pubkey, self.key_path,
                                           timeout=10)
                    return
                except (paramiko.SSHException, OSError, EOFError):
                    pass            # sshd is starting; keys are pinned, so no BadHostKey retry
            time.sleep(0.1 if restoring else 0.5)     # a restored guest answers in ~1 s

    def _internal_error(self) -> bool:
        if (self.dir / "qmp.sock").exists():
            try:
                return qmp(self.dir / "qmp.sock", "query-status", 2)["status"] == "internal-error"
            except Exception:
                return False
        return False

    def serial_tail(self, n: int = 30) -> str:
        return _tail(self.serial_log, n)

    def _stop_keeper(self, keeper: subprocess.Popen) -> None:
        if keeper.poll() is None:
            keeper.terminate()           # the keeper stops QEMU and cleans up
            try:
                keeper.wait(15)
            except subprocess.TimeoutExpired:
                keeper.kill()
                keeper.wait()

    def down(self) -> bool:
        """Stop the VM and delete its overlay. False if it was not running."""
        self.drop_session()
        st = self.state()
        if st is None:
            return False
        try:
            qmp(self.dir / "qmp.sock", "quit", 5)
        except Exception:
            if st.keeper_id is not None:
                st.keeper_id.signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and st.alive():
            time.sleep(0.05)
        reap_dir(self.dir)              # whatever the keeper did not finish
        self.emit(Kind.STOPPED, f"overlay deleted after {time.time() - st.started:.0f} s up")
        return True

    def session(self, timeout: float = 10) -> Session:
        """A new SSH session to the running VM."""
        st = self.state()
        if st is None:
            raise VMError(f"VM {self.name!r} is not running; 'uffdlab up {self.name}' first")
        return Session(st.ssh_port, st.host_pubkey, self.key_path, timeout=timeout)

    def shared_session(self) -> Session:
        """One SSH connection kept for this VM object and reused by run after
        run: under TCG a new handshake costs about a second of guest CPU."""
        st = self.state()
        shared = getattr(self, "_shared", None)
        if shared is not None and st is not None and shared.port == st.ssh_port \
                and shared.alive():
            return shared
        self.drop_session()
        self._shared = self.session()
        return self._shared

    def drop_session(self) -> None:
        shared = getattr(self, "_shared", None)
        self._shared = None
        if shared is not None:
            shared.close()

    def update_state(self, **changes) -> VMState:
        st = self.state()
        if st is None:
            raise VMError(f"VM {self.name!r} is not running")
        for k, v in changes.items():
            setattr(st, k, v)
        st.save(self.state_file)
        return st

    def __enter__(self) -> VM:
        self.up(reuse=True)
        return self

    def __exit__(self, *exc) -> None:
        self.down()


class _PortTaken(Exception):
    pass


class _RestoreFailed(VMError):
    """A template did not restore: the caller boots cold instead."""


class _Heartbeat:
    """HEARTBEAT for a waiting loop every HEARTBEAT_SECONDS, with the
    console's latest line, so a slow boot (30-120 s under TCG) visibly moves.
    The loop asks due() first: reading the console for every poll is not free."""

    def __init__(self, vm: VM, step: str, started: float):
        self.vm, self.step, self.started = vm, step, started
        self.last = time.monotonic()         # the BOOTING event just said we started

    def due(self) -> bool:
        return time.monotonic() - self.last >= HEARTBEAT_SECONDS

    def __call__(self, serial: str) -> None:
        self.last = time.monotonic()
        line = last_console_line(serial)
        elapsed = round(time.time() - self.started, 1)
        self.vm.emit(Kind.HEARTBEAT, f"{self.step} for {elapsed:.0f} s"
                     + (f": {line}" if line else ""),
                     step=self.step, elapsed=elapsed, line=line)


# CSI (colours, cursor moves), OSC (titles) and the other two-byte escapes
_ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
                      r"|\x1b[@-Z\\-_]")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_console_line(text: str, width: int = 100) -> str:
    """A console line as a reader sees it: escape sequences removed, only what
    the last carriage return left (systemd redraws its status line with CR),
    no other control characters, cut to `width` characters."""
    text = _ANSI_RE.sub("", text)
    parts = [p for p in text.split("\r") if p.strip()]
    text = _CONTROL_RE.sub("", (parts[-1] if parts else "").replace("\t", " ")).strip()
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def seed_serial_log(log: Path, tmpl: Template) -> None:
    """A restored guest prints nothing until something goes wrong: start its
    log with the template's boot, then say where the restore began."""
    try:
        boot = tmpl.serial_log.read_bytes()
    except OSError:
        boot = b""
    if boot and not boot.endswith(b"\n"):
        boot += b"\n"
    log.write_bytes(boot + f"[uffdlab] restored from template {tmpl.key} at "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}; the lines above are the "
                           f"template's boot\n".encode())


def last_console_line(serial: str, width: int = 100) -> str:
    """The last line of console text that is not empty once cleaned."""
    for raw in reversed(serial.split("\n")):
        line = clean_console_line(raw, width)
        if line:
            return line
    return ""


def _panic_line(serial: str) -> str | None:
    for line in serial.splitlines():
        if PANIC_MARKER in line and "end Kernel panic" not in line:
            return line.strip()
    return None


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# About one way of an SSH round trip to a TCG guest (a no-op exec takes
# about 0.12 s there), and how far a guest clock may be from the host's.
EXEC_LATENCY = 0.03
CLOCK_TOLERANCE = 0.25
CLOCK_PROMPT = "uffdlab-clock?"


def sync_clock(s: Session, tolerance: float = CLOCK_TOLERANCE) -> float:
    """Set the guest's clock to the host's, allowing for the SSH latency
    (hundreds of ms under TCG); returns the offset left, in seconds."""
    offset = 0.0
    for _ in range(3):
        t0 = time.time()
        guest = float(s.run("date +%s.%N", timeout=30, check=True).stdout)
        t1 = time.time()
        offset = guest - (t0 + t1) / 2
        if abs(offset) <= tolerance:
            break
        # the command runs about half a round trip after it is sent
        s.run(f"date -s @{time.time() + (t1 - t0) / 2:.3f} >/dev/null", timeout=30,
              check=True)
    return offset


def _show(key: str, value) -> str:
    if key == "kernel":                 # a digest: its start is enough to tell
        return f"build {value[:12]}" if value else "packaged"
    return format_size(value) if key == "memory" else repr(value)


def kernel_digest(img: Image) -> str:
    """What tells one build of a local or tree kernel from the next (a
    rebuilt tree, or a new bzImage at the same path): its content hash.
    A packaged kernel is part of the image key already."""
    if not img.spec.kernel.is_local:
        return ""
    try:
        return file_digest(img.vmlinuz)[:16]
    except FileNotFoundError:
        if not img.spec.kernel.is_tree:
            raise
        # the tree changed since its last build: its current key has no bzImage yet
        raise VMError(f"image {img.name}: its tree kernel is not built for the tree as it "
                      f"is now (expected {img.vmlinuz}); 'uffdlab kernel build {img.name}' "
                      f"builds it") from None


def _digest_or_none(img: Image) -> str | None:
    try:
        return kernel_digest(img)
    except (VMError, OSError):
        return None


def all_vms(lab: Lab, listener: Listener | None = None) -> list[VM]:
    """Every VM lab.yml names, running or not (see other_running for the rest)."""
    return [VM(lab, name, listener) for name in lab.vms]


def _vm_dirs(lab: Lab) -> list[Path]:
    """This lab's VM directories: only those the lab marked as its own."""
    root = lab_vms_dir(lab)
    return sorted(d for d in root.iterdir() if is_vm_dir(d)) if root.is_dir() else []


def stale_dirs(lab: Lab) -> list[Path]:
    """This lab's VM directories whose keeper and QEMU are gone."""
    return [d for d in _vm_dirs(lab) if not _dir_alive(d)]


def _dir_alive(d: Path) -> bool:
    """Whether a process the lab started for this VM directory still runs.
    Before state.json exists, keeper.json names the keeper."""
    try:
        return VMState.load(d / "state.json").alive()
    except (OSError, ValueError, TypeError):
        try:
            keeper = ProcessId.from_dict(json.loads((d / "keeper.json").read_text()))
        except (OSError, ValueError):
            return False
        return keeper is not None and keeper.alive()


def other_running(lab: Lab) -> list[tuple[Path, VMState]]:
    """Live VMs of this lab file that lab.yml does not name: the nb-* VMs
    that notebooks derive from it."""
    out = []
    for d in _vm_dirs(lab):
        if d.name not in lab.vms and _dir_alive(d):
            try:
                out.append((d, VMState.load(d / "state.json")))
            except (OSError, ValueError, TypeError):
                continue
    return out


def stop_dir(d: Path) -> None:
    """Stop a VM known only by its directory: QMP quit, then reap."""
    try:
        qmp(d / "qmp.sock", "quit", 5)
        deadline = time.monotonic() + 15
        while _dir_alive(d) and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:
        pass
    reap_dir(d)


def reap_dir(d: Path) -> None:
    """Kill what is left of a VM's processes (only if they are still the ones
    the lab started) and remove the lab's files from its directory."""
    if not is_vm_dir(d):
        return
    try:
        st = VMState.load(d / "state.json")
        for proc in (st.qemu_id, st.keeper_id):
            if proc is not None:
                proc.kill()
    except (OSError, ValueError, TypeError):
        pass
    cleanup(d)

