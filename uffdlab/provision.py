# SPDX-License-Identifier: MIT
"""provision(vm) --ansible-runner, playbooks/provision.yml--> a configured
guest with the guest tools built, and its uffd-probe facts.

The inventory is made from the running VM (address, port, lab key, pinned
host key); Ansible's task events become the VM's lifecycle events.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .events import every
from .model import Kind
from .owned import process_scratch, reap_scratch
from .paths import PLAYBOOKS
from .tools import sources_tarball, tools_digest, tools_version
from .vm import VM, VMError


class ProvisionError(Exception):
    pass


@dataclass
class ProvisionResult:
    vm: str
    ok: int
    changed: int
    changed_tasks: list[str]
    probe: dict
    tools_version: str
    seconds: float


def inventory(vm: VM, known_hosts: Path, control_dir: Path) -> dict:
    st = vm.state()
    if st is None or not st.ssh_ready:
        raise VMError(f"VM {vm.name!r} is not running; 'uffdlab up {vm.name}' first")
    known_hosts.write_text(f"[127.0.0.1]:{st.ssh_port} {st.host_pubkey}\n")
    ssh_args = (f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes "
                f"-o IdentitiesOnly=yes -o ControlMaster=auto -o ControlPersist=60s "
                f"-o ControlPath={control_dir}/%C")
    return {"all": {"hosts": {vm.name: {
        "ansible_host": "127.0.0.1", "ansible_port": st.ssh_port, "ansible_user": "root",
        "ansible_ssh_private_key_file": str(vm.key_path),
        "ansible_ssh_common_args": ssh_args,
        "ansible_python_interpreter": "/usr/bin/python3",
    }}}}


def provision(vm: VM, playbook: str = "provision.yml") -> ProvisionResult:
    """Run the playbook on a running VM and record its probe in the VM state."""
    import ansible_runner

    started = time.monotonic()
    vm.emit(Kind.PROVISIONING, f"{playbook} on {vm.name}")
    _wait_for_sshd(vm)
    events = _EventCollector(vm)
    # A short private path: ssh control sockets must fit in 108 bytes. Its
    # name carries this process's identity, so a later provisioning can
    # remove it if this process is killed before it can.
    reap_scratch_dirs()
    with process_scratch(SCRATCH_PREFIX) as tmp:
        tmp = Path(tmp)
        tarball = sources_tarball(tmp / "guest-tools.tar", _kernel_headers(vm))
        (tmp / "cp").mkdir()
        (tmp / "runner").mkdir()
        lab_vars = vm.lab.provision.model_dump()
        bin_dir = str(Path(sys.executable).parent)
        # ansible-runner calls the handler only on events: a thread says, every
        # few seconds, which task is running (the guest build takes minutes)
        with events.heartbeats(HEARTBEAT_SECONDS, since=started):
            runner = ansible_runner.run(
                private_data_dir=str(tmp / "runner"),
                project_dir=str(PLAYBOOKS),
                playbook=playbook,
                inventory=inventory(vm, tmp / "known_hosts", tmp / "cp"),
                extravars={"lab": lab_vars, "guest_tools_tar": str(tarball),
                           "guest_tools_sha256":
                               hashlib.sha256(tarball.read_bytes()).hexdigest()},
                envvars={"ANSIBLE_PIPELINING": "True", "ANSIBLE_HOST_KEY_CHECKING": "True",
                         "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "False",
                         "ANSIBLE_SSH_RETRIES": "5", "ANSIBLE_LOCAL_TEMP": str(tmp / "at"),
                         "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")},
                event_handler=events,
                quiet=True,
                suppress_env_files=True,
            )
        if runner.status != "successful" or events.failure:
            raise ProvisionError(events.failure or
                                 f"ansible-runner ended {runner.status} (rc {runner.rc}): "
                                 + _tail(runner.stdout.read() if runner.stdout else ""))
    if not events.probe:
        raise ProvisionError("the playbook ran but returned no uffd-probe output")
    version = tools_version()
    vm.update_state(facts={"probe": events.probe, "tools_digest": tools_digest(),
                           "tools_version": version, "provisioned_at": time.time()})
    res = ProvisionResult(vm.name, events.ok, len(events.changed), events.changed,
                          events.probe, version, round(time.monotonic() - started, 1))
    vm.emit(Kind.PROVISIONING, f"done in {res.seconds} s: {res.ok} ok, {res.changed} changed",
            changed=res.changed, seconds=res.seconds)
    return res


def _kernel_headers(vm: VM) -> Path | None:
    """The UAPI headers of the VM's kernel when the lab built it from a tree."""
    spec = vm.lab.image_spec(vm.spec.image).kernel
    if not spec.is_tree:
        return None
    from .kernel import KernelStore
    return KernelStore(vm.lab).current(vm.spec.image).headers_tar


SCRATCH_PREFIX = "uffdlab-ans-"


def reap_scratch_dirs() -> list[Path]:
    """Remove the scratch directories of provisioners that were killed."""
    return reap_scratch(SCRATCH_PREFIX)


def _wait_for_sshd(vm: VM, seconds: float = 120) -> None:
    """The play's first task is a raw round trip with no retries of its own,
    and a guest's sshd may be briefly gone just after boot (QEMU's user
    network then accepts and drops the connection). Wait until a command
    runs; the connection is kept for the runs that follow."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            vm.shared_session().run("true", timeout=30, check=True)
            return
        except Exception as e:
            vm.drop_session()
            if time.monotonic() > deadline:
                raise ProvisionError(f"{vm.name}: no SSH command ran in {seconds:.0f} s: "
                                     f"{e}") from e
            time.sleep(1)


def ensure_provisioned(vm: VM) -> dict:
    """Provision unless this VM already has these exact guest tools (a VM
    restored from a template has them), then save the VM as its shape's
    template if there is none yet. A lock in the VM's directory keeps two
    processes from provisioning it at once."""
    st = vm.state()
    if st is not None and st.facts.get("tools_digest") == tools_digest():
        return st.facts
    with open(vm.dir / "provision.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        st = vm.state()                       # someone may have just done it
        if st is None or st.facts.get("tools_digest") != tools_digest():
            provision(vm)
            vm.save_template()
    return vm.state().facts


# Seconds between provisioning heartbeats.
HEARTBEAT_SECONDS = 5.0

# The events that say a task begins: one per task, then one per host.
_TASK_START = ("playbook_on_task_start", "playbook_on_handler_task_start", "runner_on_start")
_TASK_END = ("runner_on_ok", "runner_on_skipped", "runner_on_failed", "runner_on_unreachable")


class _EventCollector:
    """ansible-runner event handler: tally, forward as VM events, keep the probe.
    A task is announced when it starts (once, whichever start event comes
    first) and again when it ends; heartbeats() says which one is running."""

    def __init__(self, vm: VM):
        self.vm = vm
        self.ok = 0
        self.changed: list[str] = []
        self.failure: str | None = None
        self.probe: dict | None = None
        self.task = ""                        # the running task, "" between tasks
        self.task_started = time.monotonic()
        self._announced: set[str] = set()
        # the handler and the heartbeat thread both emit: one at a time
        self._lock = threading.Lock()

    def _emit(self, kind: Kind, message: str, **data) -> None:
        with self._lock:
            self.vm.emit(kind, message, **data)

    def __call__(self, event: dict) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data", {})
        task = data.get("task", "")
        host = data.get("host", "")
        res = data.get("res", {}) or {}
        if kind in _TASK_END and task == self.task:
            self.task = ""                    # it ended: nothing runs until the next start
        if kind in _TASK_START:
            key = data.get("task_uuid") or task
            if key not in self._announced:
                self._announced.add(key)
                self.task, self.task_started = task, time.monotonic()
                self._emit(Kind.TASK, f"started: {task}", task=task, host=host,
                           state="started")
        elif kind == "runner_on_ok":
            self.ok += 1
            state = "changed" if res.get("changed") else "ok"
            if res.get("changed"):
                self.changed.append(task)
            if "uffd_probe" in res.get("ansible_facts", {}):
                self.probe = res["ansible_facts"]["uffd_probe"]
            self._emit(Kind.TASK, f"{state}: {task}", task=task, host=host, state=state)
        elif kind == "runner_on_skipped":
            self._emit(Kind.TASK, f"skipped: {task}", task=task, host=host, state="skipped")
        elif kind in ("runner_on_failed", "runner_on_unreachable"):
            if kind == "runner_on_failed" and data.get("ignore_errors"):
                return True
            msg = res.get("msg") or res.get("stderr") or res.get("stdout") or json.dumps(res)
            self.failure = (f"task '{task}' failed on {host}"
                            f"{' (unreachable)' if kind.endswith('unreachable') else ''}: "
                            f"{str(msg).strip()[-1500:]}")
            self._emit(Kind.TASK, f"failed: {task}", task=task, host=host, state="failed")
        return True

    def beat(self, started: float) -> None:
        """One provisioning heartbeat: time since `started`, the running task."""
        now = time.monotonic()
        task, since = self.task, self.task_started
        elapsed, in_task = round(now - started, 1), round(now - since, 1)
        self._emit(Kind.HEARTBEAT, f"provisioning for {elapsed:.0f} s"
                   + (f"; task '{task}' running for {in_task:.0f} s" if task else ""),
                   step="provisioning", elapsed=elapsed, task=task,
                   task_elapsed=in_task if task else None)

    def heartbeats(self, seconds: float, since: float | None = None):
        """beat() every `seconds` while the block runs (elapsed counts from
        `since`, a monotonic time, or now)."""
        started = time.monotonic() if since is None else since
        return every(seconds, lambda: self.beat(started), f"heartbeat-{self.vm.name}")


def _tail(text: str, n: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-n:])
