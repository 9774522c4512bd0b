# SPDX-License-Identifier: MIT
"""Long steps show that they move: boot and provisioning heartbeats, Ansible
task starts, the CLI and notebook renderers (a terminal line updated in place,
plain rate-limited lines elsewhere), and sweeps that bring up each point's VM
themselves. No VM boots: the layers below are fakes."""
from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import ansible_runner
import papermill
import pytest

import uffdlab.vm as vm_mod
from uffdlab import provision as provision_mod
from uffdlab import sweep
from uffdlab.cli.common import Renderer
from uffdlab.config import load_lab
from uffdlab.events import Event
from uffdlab.model import Kind, Status
from uffdlab.report import NotebookProgress
from uffdlab.sweep import PointResult, load_grid, run_sweep
from uffdlab.vm import VM, clean_console_line, last_console_line

from .labs import MINIMAL_LAB


@pytest.fixture
def lab(tmp_path):
    path = tmp_path / "lab.yml"
    path.write_text(MINIMAL_LAB)
    return load_lab(path)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def beat(elapsed: float, line: str = "[  OK  ] Started ssh.service") -> Event:
    return Event(Kind.HEARTBEAT, "vm1", f"booting for {elapsed:.0f} s: {line}",
                 {"step": "booting", "elapsed": elapsed, "line": line})


def progress(done: int, total: int = 10) -> Event:
    return Event(Kind.PROGRESS, "vm1", f"{done}/{total}", {"done": done, "total": total})


# -- the CLI renderer -------------------------------------------------------------------


def test_renderer_off_a_terminal_writes_plain_rate_limited_lines():
    out, clock = io.StringIO(), Clock()
    r = Renderer(out, quiet=10.0, clock=clock)
    r(Event(Kind.BOOTING, "vm1", "6.12 under tcg"))
    for _ in range(12):                      # a heartbeat every 2 s for 24 s
        clock.now += 2
        r(beat(clock.now - 1000))
    r(progress(1))
    clock.now += 1
    r(progress(2))                           # within 10 s of the last progress line: dropped
    r(progress(10))                          # the last one always shows
    r(Event(Kind.TASK, "vm1", "started: build", {"task": "build", "state": "started"}))
    r(Event(Kind.SSH_READY, "vm1", "port 2222 after 24 s"))
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    beats = [ln for ln in lines if "booting for" in ln]
    assert [ln.split()[0] for ln in beats] == ["10.0s", "20.0s"]   # one per 10 s of silence
    assert beats[0].endswith("[vm1] booting for 10 s: [  OK  ] Started ssh.service")
    assert sum("[vm1] [" in ln for ln in lines) == 2             # progress 1 and 10
    assert lines[-2].endswith("[vm1] task: started: build")
    assert lines[-1] == "  25.0s [vm1] ssh-ready: port 2222 after 24 s"


def test_renderer_on_a_terminal_updates_one_line_in_place():
    out, clock = FakeTTY(), Clock()
    r = Renderer(out, clock=clock)
    r(Event(Kind.BOOTING, "vm1", "6.12 under tcg"))
    clock.now += 2
    r(beat(2, "Loading initrd"))
    clock.now += 2
    r(beat(4))
    r(Event(Kind.SSH_READY, "vm1", "port 2222"))
    text = out.getvalue()
    assert text.startswith("   0.0s [vm1] booting: 6.12 under tcg\n")
    # each heartbeat overwrites the one before; the next event's line replaces it
    assert "   2.0s [vm1] booting for 2 s: Loading initrd\r" in text
    assert "\r   4.0s [vm1] booting for 4 s: [  OK  ] Started ssh.service\r" in text
    assert text.endswith("\r   4.0s [vm1] ssh-ready: port 2222\n")
    assert text.count("\n") == 2


def test_renderer_keeps_a_progress_bar_on_a_terminal():
    out = FakeTTY()
    r = Renderer(out, clock=Clock())
    r(progress(4))
    r(progress(5))
    r(Event(Kind.STOPPED, "vm1"))
    bar = "   0.0s [vm1] [" + "#" * 15 + "." * 15 + "]  50% 5/10"
    # the bar is updated in place, then left as it was when another line comes
    assert out.getvalue().endswith("\r" + bar + "\n   0.0s [vm1] stopped\n")


# -- the notebook renderer ----------------------------------------------------------------


def test_notebook_progress_shows_a_sweeps_points_per_host_and_keeps_the_dashboard():
    out = io.StringIO()
    p = NotebookProgress(stream=out)
    p(Event(Kind.PROGRESS, "sweep", "cluster tcp://h:8786: 2 workers, 2 VM slots; dashboard "
            "http://h:8787/status", {"dashboard": "http://h:8787/status"}))
    p(Event(Kind.PROGRESS, "sweep", "0/4 points, 1 running, 0 failed (point 0 started on a) "
            "[a: 0 done, 1 running, 0 failed]", {"done": 0, "total": 4, "hosts": {}}))
    p(Event(Kind.PROGRESS, "sweep", "1/4 points, 0 running, 0 failed (point 0 done on a) "
            "[a: 1 done, 0 running, 0 failed]", {"done": 1, "total": 4, "hosts": {}}))
    lines = out.getvalue().split("\n")
    assert lines[0].endswith("dashboard http://h:8787/status")       # a line that stays
    assert "pages" not in out.getvalue()                             # not a run's bar
    assert lines[1].rstrip().endswith("[a: 1 done, 0 running, 0 failed]")   # updated in place


def test_notebook_progress_heartbeats_share_one_live_line():
    out = io.StringIO()
    p = NotebookProgress(stream=out)
    p(Event(Kind.BOOTING, "vm1", "6.12 under tcg"))
    p(beat(2, "Loading initrd"))
    p(beat(4))
    p(Event(Kind.SSH_READY, "vm1", "port 2222 after 30 s"))
    p(Event(Kind.TASK, "vm1", "started: build tools", {"task": "build tools",
                                                       "state": "started"}))
    p(Event(Kind.HEARTBEAT, "vm1", "provisioning for 70 s; task 'build tools' running "
            "for 60 s", {"step": "provisioning", "elapsed": 70.0, "task": "build tools",
                         "task_elapsed": 60.0}))
    p(Event(Kind.TASK, "vm1", "changed: build tools", {"task": "build tools",
                                                       "state": "changed"}))
    p(Event(Kind.PROVISIONING, "vm1", "done in 80 s", {"seconds": 80.0}))
    text = out.getvalue()
    lines = text.split("\n")
    assert lines[0].endswith("[vm1] booting: 6.12 under tcg")
    # heartbeats update one line; the ssh-ready line takes its place and stays
    assert "booting for 2 s: Loading initrd" in lines[1]
    assert lines[1].endswith("[vm1] ssh-ready: port 2222 after 30 s")
    assert "ansible task 1: started: build tools" in lines[2]
    assert "task 'build tools' running for 60 s" in lines[2]
    assert "ansible task 1: changed: build tools" in lines[2]     # its end: still task 1
    assert lines[2].endswith("[vm1] provisioning: done in 80 s")
    assert lines[3] == ""


# -- boot heartbeats --------------------------------------------------------------------------


def test_clean_console_line():
    assert clean_console_line("\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mssh\x1b[0m.\r") \
        == "OK  ] Started ssh."
    assert clean_console_line("[  *** ] A start job is running\r[  OK  ] Reached target") \
        == "[  OK  ] Reached target"
    assert clean_console_line("\x1b]0;title\x07login: \x1b[?25h\x1b[K") == "login:"
    assert clean_console_line("x" * 300) == "x" * 99 + "\u2026"
    assert last_console_line("first\r\nsecond line\n\x1b[K\r\n\n") == "second line"
    assert last_console_line("") == ""


def test_wait_for_ssh_emits_heartbeats_with_the_console_line(lab, monkeypatch):
    events: list[Event] = []
    vm = VM.for_shape(lab, "trixie", listener=events.append)
    vm.dir.mkdir(parents=True)
    (vm.dir / "serial.log").write_text("Booting\n\x1b[0;32m  OK  \x1b[0m] Started udev\r\n")
    answers = iter([False, False, False, True])
    monkeypatch.setattr(vm_mod, "port_open", lambda port: next(answers))
    monkeypatch.setattr(vm_mod, "Session", lambda *a, **k: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(vm_mod, "HEARTBEAT_SECONDS", 0.0)
    st = SimpleNamespace(qemu_id=SimpleNamespace(alive=lambda: True), accel="tcg",
                         ssh_port=2222, host_pubkey="k", started=time.time() - 5)
    vm._wait_for_ssh(st, SimpleNamespace(poll=lambda: None))
    beats = [e for e in events if e.kind == Kind.HEARTBEAT]
    assert len(beats) == 4
    assert beats[0].data["step"] == "booting" and beats[0].data["elapsed"] >= 5
    assert beats[0].data["line"] == "OK  ] Started udev"
    assert beats[0].message.startswith("booting for ") and "Started udev" in beats[0].message


# -- Ansible task starts and provisioning heartbeats ---------------------------------------


def test_event_collector_announces_a_task_once_when_it_starts():
    events: list[Event] = []
    vm = SimpleNamespace(name="vm1", emit=lambda kind, msg="", **d: events.append(
        Event(Kind(kind), "vm1", msg, d)))
    c = provision_mod._EventCollector(vm)
    c({"event": "playbook_on_task_start", "event_data": {"task": "build", "task_uuid": "u1"}})
    assert c.task == "build"
    c({"event": "runner_on_start", "event_data": {"task": "build", "task_uuid": "u1",
                                                  "host": "vm1"}})
    c({"event": "runner_on_start", "event_data": {"task": "probe", "task_uuid": "u2",
                                                  "host": "vm1"}})   # no playbook event
    c({"event": "runner_on_ok", "event_data": {"task": "probe", "host": "vm1",
                                               "res": {"changed": True}}})
    assert [(e.data["task"], e.data["state"]) for e in events] == [
        ("build", "started"), ("probe", "started"), ("probe", "changed")]
    assert events[0].message == "started: build" and events[1].data["host"] == "vm1"
    assert c.task == ""                           # nothing runs between tasks


class FakeProvisionVM:
    """What provision() uses of a VM, with a lab for its variables."""

    def __init__(self, lab, tmp_path: Path):
        self.name, self.lab, self.events = "vm1", lab, []
        self.spec = lab.vms[next(iter(lab.vms))]
        self.key_path = tmp_path / "key"
        self.facts = None
        self.lock = threading.Lock()

    def emit(self, kind, message="", **data):
        with self.lock:
            self.events.append(Event(Kind(kind), self.name, message, data))

    def shared_session(self):
        return SimpleNamespace(run=lambda *a, **k: None)

    def drop_session(self):
        pass

    def state(self):
        return SimpleNamespace(ssh_ready=True, ssh_port=2222, host_pubkey="ssh-ed25519 AAAA")

    def update_state(self, facts):
        self.facts = facts

    def heartbeats(self) -> list[Event]:
        with self.lock:
            return [e for e in self.events if e.kind == Kind.HEARTBEAT]


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("heartbeat-")]


def test_provision_heartbeats_name_the_running_task_and_stop(lab, tmp_path, monkeypatch):
    vm = FakeProvisionVM(lab, tmp_path)
    seen_during: list[Event] = []

    def run(event_handler, **kw):
        event_handler({"event": "playbook_on_task_start",
                       "event_data": {"task": "build guest tools", "task_uuid": "u1"}})
        time.sleep(0.3)                           # the long compile
        seen_during.extend(vm.heartbeats())
        event_handler({"event": "runner_on_ok", "event_data": {
            "task": "build guest tools", "host": "vm1",
            "res": {"changed": True, "ansible_facts": {"uffd_probe": {"kernel": "6.12"}}}}})
        return SimpleNamespace(status="successful", rc=0, stdout=None)

    monkeypatch.setattr(ansible_runner, "run", run)
    monkeypatch.setattr(provision_mod, "HEARTBEAT_SECONDS", 0.05)
    res = provision_mod.provision(vm)
    assert res.changed_tasks == ["build guest tools"] and vm.facts["probe"] == {"kernel": "6.12"}
    assert len(seen_during) >= 3
    last = seen_during[-1]
    assert last.data["step"] == "provisioning" and last.data["task"] == "build guest tools"
    assert last.data["task_elapsed"] > 0 and last.data["elapsed"] >= last.data["task_elapsed"]
    assert "task 'build guest tools' running for" in last.message
    assert not heartbeat_threads()
    count = len(vm.heartbeats())
    time.sleep(0.2)
    assert len(vm.heartbeats()) == count          # none after the run
    kinds = [(e.kind, e.data.get("state")) for e in vm.events if e.kind != Kind.HEARTBEAT]
    assert kinds == [(Kind.PROVISIONING, None), (Kind.TASK, "started"),
                     (Kind.TASK, "changed"), (Kind.PROVISIONING, None)]


def test_provision_heartbeats_stop_when_the_run_raises(lab, tmp_path, monkeypatch):
    vm = FakeProvisionVM(lab, tmp_path)

    def run(event_handler, **kw):
        time.sleep(0.1)
        raise RuntimeError("ansible-runner broke")

    monkeypatch.setattr(ansible_runner, "run", run)
    monkeypatch.setattr(provision_mod, "HEARTBEAT_SECONDS", 0.02)
    with pytest.raises(RuntimeError, match="ansible-runner broke"):
        provision_mod.provision(vm)
    assert vm.heartbeats() and vm.heartbeats()[0].data["task"] == ""
    assert not heartbeat_threads()


# -- sweeps bring up each point's VM ------------------------------------------------------


class FakeVM:
    """VM.for_shape and what run_sweep uses of a VM to bring it up, logged."""

    log: list[tuple] = []
    made = 0
    fail_up = False
    by_name: dict = {}

    def __init__(self, name: str, fresh: bool):
        self.name, self.fresh, self.running = name, fresh, False
        self.ready = threading.Event()          # booted and provisioned
        FakeVM.by_name[name] = self

    @classmethod
    def for_shape(cls, lab, image, memory="1536M", cpus=2, name=None, listener=None,
                  fresh=False):
        cls.made += 1
        vm = cls(name or (f"nb-{image}-{cls.made}" if fresh else f"nb-{image}"), fresh)
        cls.log.append(("for_shape", vm.name, image, memory, cpus, fresh))
        listener(Event(Kind.BOOTING, vm.name, "fake"))
        return vm

    def up(self, reuse=False):
        self.log.append(("up", self.name, reuse))
        if self.fail_up:
            raise vm_mod.VMError("no SSH after 300 s")
        self.running = True

    def drop_session(self):
        pass

    def state(self):
        return SimpleNamespace(name=self.name) if self.running else None

    def down(self):
        self.log.append(("down", self.name))
        was, self.running = self.running, False
        return was


@pytest.fixture
def fake_vms(monkeypatch):
    FakeVM.log, FakeVM.made, FakeVM.fail_up, FakeVM.by_name = [], 0, False, {}
    monkeypatch.setattr(vm_mod, "VM", FakeVM)

    def provisioned(vm):
        FakeVM.log.append(("provision", vm.name))
        vm.ready.set()
    monkeypatch.setattr(provision_mod, "ensure_provisioned", provisioned)

    def notebook(input_path, output_path, parameters=None, **kw):
        Path(output_path).write_text("{}")
        if Path(input_path).name == sweep.SWEEP_NOTEBOOK:
            return
        # like the real one: its first use of the VM waits until it is up
        if not FakeVM.by_name[parameters["vm_name"]].ready.wait(2):
            raise papermill.PapermillExecutionError(
                3, 1, "VMError: no SSH", "VMError: no SSH", "VMError", ["no SSH"])
        FakeVM.log.append(("notebook", parameters["vm_name"], parameters["writers"]))
        if parameters["writers"] == 2:
            raise papermill.PapermillExecutionError(
                4, 1, "RuntimeError: boom", "RuntimeError: boom", "RuntimeError", ["boom"])
        PointResult("r1", Status.OK, True).write(parameters["result_path"])

    monkeypatch.setattr(papermill, "execute_notebook", notebook)
    return FakeVM


def grid_file(tmp_path: Path, fresh: bool) -> Path:
    path = tmp_path / "grid.yml"
    path.write_text(f"fixed:\n  image: trixie\n  vm_memory: 1G\ngrid:\n  writers: [1, 2, 3]\n"
                    f"teardown: false\nfresh: {'true' if fresh else 'false'}\n")
    return path


def test_run_sweep_brings_up_fresh_vms_and_always_stops_them(lab, tmp_path, fake_vms):
    seen: list[Event] = []
    res = run_sweep(lab, load_grid(grid_file(tmp_path, fresh=True)), seen.append,
                    out_root=tmp_path / "sweeps")
    assert [p.status for p in res.points] == [Status.OK, Status.FAILED, Status.OK]
    assert fake_vms.log == [entry for i in (1, 2, 3) for entry in [
        ("for_shape", f"nb-trixie-{i}", "trixie", "1G", 2, True),
        ("up", f"nb-trixie-{i}", True), ("provision", f"nb-trixie-{i}"),
        ("notebook", f"nb-trixie-{i}", i),
        ("down", f"nb-trixie-{i}")]]               # the raising point's VM too
    assert any(e.kind == Kind.BOOTING for e in seen)   # the sweep's listener saw the boot


def test_run_sweep_readies_the_shared_vm_before_each_point(lab, tmp_path, fake_vms):
    run_sweep(lab, load_grid(grid_file(tmp_path, fresh=False)), out_root=tmp_path / "sweeps")
    assert [e for e in fake_vms.log if e[0] == "notebook"] == [
        ("notebook", "nb-trixie", 1), ("notebook", "nb-trixie", 2), ("notebook", "nb-trixie", 3)]
    assert not [e for e in fake_vms.log if e[0] == "down"]       # shared: left running
    assert fake_vms.log[:3] == [("for_shape", "nb-trixie", "trixie", "1G", 2, False),
                                ("up", "nb-trixie", True), ("provision", "nb-trixie")]


def test_run_sweep_a_vm_that_does_not_come_up_fails_the_point(lab, tmp_path, fake_vms):
    fake_vms.fail_up = True
    res = run_sweep(lab, load_grid(grid_file(tmp_path, fresh=True)), out_root=tmp_path / "s")
    assert [p.status for p in res.points] == [Status.FAILED] * 3
    assert res.points[0].error == "the point's VM did not come up: no SSH after 300 s"
    assert not [e for e in fake_vms.log if e[0] == "notebook"]
    assert [e[0] for e in fake_vms.log[:3]] == ["for_shape", "up", "down"]
