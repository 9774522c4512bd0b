"""Lab.vm(name).up() --qemu overlay, QMP, hostfwd--> a running, SSH-ready VM.

A running VM is a directory `<cache>/vms/<name>/` holding state.json, the
qcow2 overlay, the QMP socket and the serial log, owned by a keeper process
(see keeper.py). `down()` quits QEMU over QMP; the keeper then deletes the
overlay. State on disk lets any later command find, use or sweep a VM.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import paramiko

from . import accel as accel_mod
from .config import Lab
from .events import Emitter, Listener
from .images import Image, ImageStore
from .keeper import cleanup
from .qemu import QemuCommand
from .ssh import Session, port_open

# qemu.qmp logs every refused connect at ERROR; polling a booting VM expects them.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
PANIC_MARKER = "Kernel panic - not syncing"


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
    keeper_pid: int
    qemu_pid: int
    started: float
    host_pubkey: str
    memory: int
    cpus: int
    ssh_ready: bool = False
    boot_seconds: float | None = None
    facts: dict = field(default_factory=dict)   # probe output once provisioned
    lab: str = ""                   # the lab file that started it

    @classmethod
    def load(cls, path: Path) -> "VMState":
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qmp(socket_path: Path, command: str, timeout: float = 5.0, **args) -> dict:
    """One QMP command. Runs in its own thread so it also works inside
    Jupyter, whose event loop is already running."""
    from qemu.qmp import QMPClient

    async def go():
        client = QMPClient("uffdlab")
        await asyncio.wait_for(client.connect(str(socket_path)), timeout)
        try:
            return await asyncio.wait_for(client.execute(command, args or None), timeout)
        finally:
            await client.disconnect()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


class VM(Emitter):
    """One VM of the lab, running or not."""

    def __init__(self, lab: Lab, name: str | None = None, listener: Listener | None = None):
        self.name, self.spec = lab.vm_spec(name)
        super().__init__(self.name, listener)
        self.lab = lab
        self.images = ImageStore(lab, listener)
        self.dir = lab.cache_path / "vms" / self.name

    # -- paths ------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def serial_log(self) -> Path:
        live = self.dir / "serial.log"
        return live if live.exists() else self.dir.parent / f"{self.name}.serial.log"

    @property
    def key_path(self) -> Path:
        return self.images.keys.private_path

    def image(self) -> Image:
        return self.images.image(self.spec.image)

    # -- state ------------------------------------------------------------
    def state(self) -> VMState | None:
        """The running VM's state, or None; sweeps a VM whose processes died.
        (None too while another process is still starting its keeper.)"""
        if not self.dir.exists():
            return None
        if not _dir_alive(self.dir):
            sweep_dir(self.dir)
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
            cmdline=" ".join(p for p in (img.kernel_cmdline, self.spec.cmdline) if p))

    def choose_accel(self) -> accel_mod.AccelChoice:
        img = self.image()
        return accel_mod.choose(self.lab.accel, img.vmlinuz, img.initrd,
                                self.lab.cache_path / "accel.json")

    def dry_run(self) -> str:
        """The exact QEMU command `up` would run (the port is picked at up)."""
        return self.command(self.choose_accel().accel, ssh_port=free_port()).shell()

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
                return st
            raise VMError(f"VM {self.name!r} is already running (ssh port {st.ssh_port}); "
                          f"'uffdlab down {self.name}' first")
        img = self.images.build(self.spec.image)
        choice = self.choose_accel()
        if choice.fell_back:
            self.emit("accel", choice.reason, accel=choice.accel)
        for attempt in range(3):                 # a stolen port is retried
            try:
                return self._boot(img, choice)
            except _PortTaken:
                if attempt == 2:
                    raise VMError("could not bind a free SSH port on 127.0.0.1") from None

    def _boot(self, img: Image, choice: accel_mod.AccelChoice) -> VMState:
        port = free_port()
        cmd = self.command(choice.accel, port)
        self.dir.mkdir(parents=True, exist_ok=True)
        # the previous boot's log must not speak for this one
        (self.dir.parent / f"{self.name}.serial.log").unlink(missing_ok=True)
        started = time.time()
        keeper = None
        try:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(img.base),
                            "-F", "qcow2", str(cmd.disk)], check=True, capture_output=True)
            (self.dir / "launch.json").write_text(json.dumps({"argv": cmd.argv()}))
            self.emit("booting", f"{img.kernel_release} under {choice.accel}, "
                      f"{self.spec.cpus} cpus, {self.spec.memory >> 20} MiB",
                      accel=choice.accel, kernel=img.kernel_release)
            keeper = subprocess.Popen(
                [sys.executable, "-m", "uffdlab.keeper", str(self.dir)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                stderr=open(self.dir / "keeper.log", "w"), start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent)
            (self.dir / "keeper.pid").write_text(str(keeper.pid))
            qemu_pid = int(keeper.stdout.readline() or 0)
            st = VMState(self.name, img.name, img.key, img.kernel_release, choice.accel,
                         choice.reason, port, keeper.pid, qemu_pid, started,
                         img.host_pubkey, self.spec.memory, self.spec.cpus,
                         lab=str(self.lab.source.resolve()))
            st.save(self.state_file)
            self._wait_for_ssh(st, keeper)
            st.ssh_ready = True
            st.boot_seconds = round(time.time() - started, 1)
            st.save(self.state_file)
            keeper.stdin.write("detach\n")
            keeper.stdin.close()
            self.emit("ssh-ready", f"port {port} after {st.boot_seconds} s",
                      port=port, seconds=st.boot_seconds)
            return st
        except BaseException as e:
            if keeper is not None:
                self._stop_keeper(keeper)
            cleanup(self.dir)
            if not isinstance(e, _PortTaken):
                self.emit("failed", str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise

    def _wait_for_ssh(self, st: VMState, keeper: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.spec.boot_timeout
        while True:
            panic = _panic_line(_tail(self.serial_log, 200))
            if panic:
                raise VMError(f"the guest kernel panicked: {panic}\nlast serial lines:\n"
                              f"{self.serial_tail()}")
            if keeper.poll() is not None or not pid_alive(st.qemu_pid):
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
                    Session(st.ssh_port, st.host_pubkey, self.key_path, timeout=10).close()
                    return
                except (paramiko.SSHException, OSError, EOFError):
                    pass            # sshd is starting; keys are pinned, so no BadHostKey retry
            time.sleep(0.5)

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
            if pid_alive(st.keeper_pid):
                os.kill(st.keeper_pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (pid_alive(st.keeper_pid) or
                                               pid_alive(st.qemu_pid)):
            time.sleep(0.05)
        sweep_dir(self.dir)             # whatever the keeper did not finish
        self.emit("stopped", f"overlay deleted after {time.time() - st.started:.0f} s up")
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

    def __enter__(self) -> "VM":
        self.up(reuse=True)
        return self

    def __exit__(self, *exc) -> None:
        self.down()


class _PortTaken(Exception):
    pass


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


def all_vms(lab: Lab, listener: Listener | None = None) -> list[VM]:
    """Every VM lab.yml names, running or not (see other_running for the rest)."""
    return [VM(lab, name, listener) for name in lab.vms]


def stale_dirs(lab: Lab) -> list[Path]:
    """VM directories this lab does not name and whose processes are gone.
    Another lab sharing the cache may own a live one: those are left alone."""
    root = lab.cache_path / "vms"
    if not root.is_dir():
        return []
    return [p for p in root.iterdir()
            if p.is_dir() and p.name not in lab.vms and not _dir_alive(p)]


def _dir_alive(d: Path) -> bool:
    try:
        st = VMState.load(d / "state.json")
        return pid_alive(st.keeper_pid) or pid_alive(st.qemu_pid)
    except (OSError, ValueError, TypeError):
        try:
            return pid_alive(int((d / "keeper.pid").read_text()))
        except (OSError, ValueError):
            return False


def other_running(lab: Lab, own_only: bool = False) -> list[tuple[Path, VMState]]:
    """Live VMs in this cache that lab.yml does not name: the nb-* VMs that
    notebooks derive from it, and (unless own_only) other lab files' VMs."""
    root = lab.cache_path / "vms"
    mine = str(lab.source.resolve())
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.is_dir() and d.name not in lab.vms and _dir_alive(d):
            try:
                st = VMState.load(d / "state.json")
            except (OSError, ValueError, TypeError):
                continue
            if st.lab == mine or not own_only:
                out.append((d, st))
    return out


def stop_dir(d: Path) -> None:
    """Stop a VM known only by its directory: QMP quit, then sweep."""
    try:
        qmp(d / "qmp.sock", "quit", 5)
        deadline = time.monotonic() + 15
        while _dir_alive(d) and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:
        pass
    sweep_dir(d)


def sweep_dir(d: Path) -> None:
    """Stop and remove a VM directory that lab.yml no longer names."""
    try:
        st = VMState.load(d / "state.json")
        for pid in (st.qemu_pid, st.keeper_pid):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, TypeError):
        pass
    cleanup(d)
