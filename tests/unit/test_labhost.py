# SPDX-License-Identifier: MIT
"""Lab hosts without a network: HOSTS.yml checking, the inventory and the
variables the playbook gets, the playbook's modules, the worker's unit, the
wheelhouse a kind of host needs, and what `cluster` does with no scheduler."""
from __future__ import annotations

import json
import os
import tarfile
from importlib.metadata import version
from pathlib import Path

import jinja2
import pytest
import yaml

from tests.unit.labs import MINIMAL_LAB
from uffdlab import cli
from uffdlab.config import ConfigError, load_lab
from uffdlab.events import Emitter, Event
from uffdlab.labhost import (
    DEFAULT_APT_PACKAGES,
    LabHostError,
    LocalScheduler,
    VMHost,
    WheelTarget,
    WorkerPorts,
    _PlaybookEvents,
    cluster_dir,
    extravars,
    hosts_from_dict,
    inventory,
    load_hosts,
    recorded_scheduler,
    scheduler_for_vm,
    source_tarball,
    stop_scheduler,
)
from uffdlab.model import Kind
from uffdlab.owned import ProcessId
from uffdlab.paths import PLAYBOOKS
from uffdlab.vm import free_port

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBNp1aJvQ0b8xkKx2cWm2rT2j5cR5mY0nL0r1k9gQ0lS"


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "hosts.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_hosts(path)
    return [p.replace(str(path), "hosts.yml") for p in e.value.problems]


# -- HOSTS.yml -------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("hosts:\n  - address: lab1.example\n    port: 70000\n",
     "hosts.yml:3: hosts.0.port: expected a number of at most 65535, got 70000"),
    ("hosts:\n  - address: lab1.example\n    port: '22'\n",
     "hosts.yml:3: hosts.0.port: expected a whole number, got '22'"),
    ("hosts:\n  - address: lab1.example\n    hots_key: x\n",
     "hosts.yml:3: hosts.0.hots_key: unknown key 'hots_key' (did you mean 'host_key'?)"),
    ("schedular: tcp://a:8786\nhosts:\n  - vm: guest\n",
     "hosts.yml:1: schedular: unknown key 'schedular' (did you mean 'scheduler'?)"),
    ("hosts:\n  - address: lab1.example\n    vm: guest\n",
     "hosts.yml:2: hosts.0: expected either 'address' or 'vm', got both "
     "(address 'lab1.example', vm 'guest')"),
    ("hosts:\n  - user: lab\n",
     "hosts.yml:2: hosts.0: expected either 'address' or 'vm', got neither"),
    ("hosts:\n  - vm: guest\n    port: 2222\n",
     "hosts.yml:2: hosts.0: expected no 'port' with 'vm' (a lab VM's SSH settings come "
     "from its state), got port 2222"),
    ("scheduler: tcp://10.0.0.5:8786\n",
     "hosts.yml:1: hosts: required, but missing"),
    ("hosts: []\n",
     "hosts.yml:1: hosts: expected at least one host (address: or vm:), got none"),
    ("hosts:\n  - vm: a\n  - vm: a\n",
     "hosts.yml:3: hosts.1: expected each host once, got 'a' (also hosts.0)"),
    ("scheduler: udp://x\nhosts:\n  - vm: a\n",
     "hosts.yml:1: scheduler: expected a Dask scheduler address like tcp://HOST:8786, "
     "got 'udp://x'"),
    ("dir: /opt\nhosts:\n  - vm: a\n",
     "hosts.yml:1: dir: expected a directory of the lab's own below a system one "
     "(like /opt/uffdlab-host), got '/opt'"),
    ("dir: /opt/../etc\nhosts:\n  - vm: a\n",
     "hosts.yml:1: dir: expected a plain absolute path of letters, digits and . _ - / like "
     "/opt/uffdlab-host, got '/opt/../etc'"),
    ("apt_packages: [qemu, 'Bad Name']\nhosts:\n  - vm: a\n",
     "hosts.yml:1: apt_packages.1: expected a Debian package name like linux-perf "
     "(lowercase letters, digits, + - .), got 'Bad Name'"),
    ("hosts:\n  - address: 'bad host'\n",
     "hosts.yml:2: hosts.0.address: expected a host name or IP address like lab1.example or "
     "10.0.0.7, got 'bad host'"),
    ("hosts:\n  - address: a.example\n    host_key: AAAA\n",
     "hosts.yml:3: hosts.0.host_key: expected a public host key like 'ssh-ed25519 AAAA...' "
     "(type and base64, as in known_hosts without the host name), got 'AAAA'"),
    ("hosts:\n  - address: a.example\n    vm_slots: 0\n",
     "hosts.yml:3: hosts.0.vm_slots: expected a number of at least 1, got 0"),
    ("- vm: a\n",
     "hosts.yml: expected a mapping with 'hosts' (a list of lab hosts), got a list: "
     "[{'vm': 'a'}]"),
])
def test_bad_hosts_file_exact_messages(tmp_path, text, expected):
    assert expected in problems(tmp_path, text)


def test_every_problem_is_listed_at_once(tmp_path):
    found = problems(tmp_path, "hosts:\n  - address: a.example\n    port: 0\n"
                               "  - vm: b\n    user: lab\n")
    assert [p.split(":")[1] for p in found] == ["3", "4"]


def test_defaults_and_values_as_written(tmp_path):
    path = tmp_path / "hosts.yml"
    path.write_text(f"hosts:\n  - address: lab1.example\n    user: lab\n    port: 2222\n"
                    f"    key: keys/id\n    host_key: {KEY}\n    vm_slots: 3\n  - vm: guest\n")
    hosts = load_hosts(path)
    assert hosts.scheduler is None and hosts.dir == "/opt/uffdlab-host"
    assert hosts.apt_packages == list(DEFAULT_APT_PACKAGES) and hosts.images == []
    first, second = hosts.hosts
    assert (first.name, first.user, first.port, first.vm_slots) == ("lab1.example", "lab",
                                                                    2222, 3)
    assert (second.name, second.user, second.port, second.vm_slots) == ("guest", "root",
                                                                       22, None)


def test_a_list_of_apt_packages_replaces_the_default():
    hosts = hosts_from_dict({"apt_packages": ["python3-venv"], "hosts": [{"vm": "a"}]})
    assert hosts.apt_packages == ["python3-venv"]


def test_images_must_be_the_lab_files(tmp_path):
    lab_path = tmp_path / "lab.yml"
    lab_path.write_text(MINIMAL_LAB)
    path = tmp_path / "hosts.yml"
    path.write_text("images: [trixie, trixy]\nhosts:\n  - vm: guest\n")
    with pytest.raises(ConfigError) as e:
        load_hosts(path).check_against(load_lab(lab_path))
    assert e.value.problems == [f"{path}:1: images.1: expected the name of an image of "
                                f"lab.yml (trixie), got 'trixy'"]


def test_cli_exits_2_on_a_bad_hosts_file(tmp_path, capsys):
    path = tmp_path / "hosts.yml"
    path.write_text("hosts:\n  - address: a.example\n    prot: 22\n")
    assert cli.main(["cluster", "up", str(path)]) == 2
    assert f"{path}:3: hosts.0.prot: unknown key 'prot' (did you mean 'port'?)" \
        in capsys.readouterr().err
    assert cli.main(["cluster", "down", str(tmp_path / "missing.yml")]) == 2
    assert "cannot read the hosts file" in capsys.readouterr().err


# -- where workers dial the scheduler ---------------------------------------------

@pytest.mark.parametrize("address, dialled", [
    ("tcp://127.0.0.1:8786", "tcp://10.0.2.2:8786"),
    ("tcp://localhost:9000", "tcp://10.0.2.2:9000"),
    ("tcp://[::1]:8786", "tcp://10.0.2.2:8786"),
    ("tcp://me.example:8786", "tcp://10.0.2.2:8786"),        # this machine's own name
    ("tcp://10.0.0.5:8786", "tcp://10.0.0.5:8786"),          # another machine: as it is
])
def test_a_vm_dials_a_scheduler_on_this_machine_through_qemus_gateway(address, dialled):
    assert scheduler_for_vm(address, names={"me.example", "192.0.2.1"}) == dialled


# -- the inventory and the variables ------------------------------------------------

def test_inventory_of_an_address_host_and_a_vm(tmp_path):
    hosts = hosts_from_dict({"scheduler": "tcp://10.0.0.5:8786", "hosts": [
        {"address": "lab1.example", "user": "lab", "port": 2222, "key": "~/.ssh/id_lab",
         "host_key": KEY, "vm_slots": 3},
        {"address": "lab2.example"},
        {"vm": "guest"}]}, tmp_path / "hosts.yml")
    vm = VMHost("guest", 40022, "ssh-ed25519 AAAAvm", Path("/cache/keys/lab_ed25519"),
                Path("/cache/vms/x/guest/qmp.sock"), {})
    dial = {"lab1.example": "tcp://10.0.0.5:8786", "lab2.example": "tcp://10.0.0.5:8786",
            "guest": "tcp://10.0.2.2:8786"}
    inv = inventory(hosts, dial, {"guest": vm}, {"guest": WorkerPorts(41000)}, tmp_path)
    lab1, lab2, guest = (inv["all"]["hosts"][n] for n in ("lab1.example", "lab2.example",
                                                          "guest"))
    assert (lab1["ansible_host"], lab1["ansible_port"], lab1["ansible_user"]) == \
        ("lab1.example", 2222, "lab")
    assert lab1["ansible_ssh_private_key_file"] == os.path.expanduser("~/.ssh/id_lab")
    assert lab1["ansible_become"] is True
    assert (tmp_path / "known_hosts-lab1.example").read_text() == \
        f"[lab1.example]:2222 {KEY}\n"
    assert f"UserKnownHostsFile={tmp_path}/known_hosts-lab1.example" in \
        lab1["ansible_ssh_common_args"]
    assert (lab1["worker_vm_slots"], lab1["worker_port"]) == (3, 0)
    # no pinned key: the user's known_hosts, still checked strictly
    assert "UserKnownHostsFile" not in lab2["ansible_ssh_common_args"]
    assert "StrictHostKeyChecking=yes" in lab2["ansible_ssh_common_args"]
    assert "ansible_become" not in lab2 and "ansible_ssh_private_key_file" not in lab2
    assert lab2["worker_vm_slots"] == 0                       # computed on the host
    assert (guest["ansible_host"], guest["ansible_port"], guest["ansible_user"]) == \
        ("127.0.0.1", 40022, "root")
    assert guest["ansible_ssh_private_key_file"] == "/cache/keys/lab_ed25519"
    assert (tmp_path / "known_hosts-guest").read_text() == \
        "[127.0.0.1]:40022 ssh-ed25519 AAAAvm\n"
    assert (guest["worker_name"], guest["worker_scheduler"], guest["worker_port"]) == \
        ("guest", "tcp://10.0.2.2:8786", 41000)


def test_extravars_carry_the_hosts_file_unchanged(tmp_path):
    lab_path = tmp_path / "lab.yml"
    lab_path.write_text(MINIMAL_LAB)
    lab = load_lab(lab_path)
    hosts = hosts_from_dict({"dir": "/srv/lab-host", "apt_packages": ["python3-venv", "gcc"],
                             "images": ["trixie"], "hosts": [{"vm": "guest"}]})
    tar = tmp_path / "src.tar"
    v = extravars(hosts, lab, tar, tmp_path / "wheels", "started")
    assert (v["lab_host_dir"], v["apt_packages"], v["images"]) == \
        ("/srv/lab-host", ["python3-venv", "gcc"], ["trixie"])
    assert v["dask_requirements"] == [f"distributed=={version('distributed')}",
                                      f"dask=={version('dask')}"]
    assert (v["lab_host_state"], v["source_tar"], v["wheelhouse_dir"]) == \
        ("started", str(tar), str(tmp_path / "wheels"))
    assert (v["lab_file"], v["lab_lock"]) == (str(lab_path.resolve()), "")
    (tmp_path / "lab.lock").write_text("{}")
    assert extravars(hosts, lab, tar, tmp_path, "stopped")["lab_lock"] == \
        str(tmp_path / "lab.lock")


# -- the playbook and the worker's unit -----------------------------------------------

TASK_KEYWORDS = {"name", "when", "register", "loop", "loop_control", "vars", "become",
                 "changed_when", "failed_when", "delegate_to", "run_once", "tags", "notify",
                 "ignore_errors", "environment", "no_log", "retries", "delay", "until",
                 "block", "rescue", "always"}


def _tasks(tasks: list[dict]):
    for task in tasks:
        yield task
        for part in ("block", "rescue", "always"):
            yield from _tasks(task.get(part, []))


def test_the_playbook_uses_ansible_builtin_modules_only():
    plays = yaml.safe_load((PLAYBOOKS / "lab-host.yml").read_text())
    modules = []
    for play in plays:
        for task in _tasks(play["tasks"]):
            if "block" in task:
                continue
            module = [k for k in task if k not in TASK_KEYWORDS]
            assert len(module) == 1, task
            modules.append(module[0])
    assert len(modules) > 10
    assert all(m.startswith("ansible.builtin.") for m in modules), modules
    assert {"ansible.builtin.apt", "ansible.builtin.pip", "ansible.builtin.template",
            "ansible.builtin.systemd_service"} <= set(modules)


def _unit(**hostvars) -> str:
    # Ansible's template module renders with trim_blocks
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined)
    text = (PLAYBOOKS / "templates" / "uffdlab-worker.service.j2").read_text()
    return env.from_string(text).render(
        lab_host_dir="/opt/uffdlab-host", venv="/opt/uffdlab-host/venv", slots=2,
        worker_name="lab1", worker_scheduler="tcp://10.0.0.5:8786", **hostvars)


def test_the_worker_unit_offers_its_vm_slots():
    exec_start = [line for line in _unit(worker_port=0).splitlines()
                  if line.startswith("ExecStart=")]
    assert exec_start == ["ExecStart=/opt/uffdlab-host/venv/bin/dask worker "
                          "tcp://10.0.0.5:8786 --nworkers 1 --nthreads 2 "
                          "--resources vm_slots=2 --name lab1 "
                          "--local-directory /opt/uffdlab-host/worker"]
    assert "Restart=on-failure" in _unit(worker_port=0).splitlines()


def test_a_vm_hosts_worker_is_reached_through_its_forwarded_port():
    line = next(x for x in _unit(worker_port=41000).splitlines() if x.startswith("ExecStart"))
    assert line.endswith(" --no-nanny --listen-address tcp://0.0.0.0:41000 "
                         "--contact-address tcp://127.0.0.1:41000")


# -- what a host installs ---------------------------------------------------------

def test_a_wheel_target_names_the_manylinux_tags_its_glibc_runs():
    target = WheelTarget.parse("3.13-2.41-x86_64")
    tags = target.platforms()
    assert (target.python, tags[0], tags[-4]) == ("3.13", "manylinux_2_41_x86_64",
                                                  "manylinux_2_5_x86_64")
    assert tags[-3:] == ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    assert "manylinux2014_x86_64" not in WheelTarget.parse("3.11-2.12-x86_64").platforms()


@pytest.mark.parametrize("text", ["3.13--x86_64", "3.13-2.41", "2.7-2.41-x86_64",
                                  "3.13-2.41-x86_64; rm -rf /"])
def test_a_bad_wheel_target_is_refused(text):
    with pytest.raises(LabHostError, match="expected a host kind like 3.13-2.41-x86_64"):
        WheelTarget.parse(text)


def test_the_checkout_tarball_is_reproducible_and_has_only_the_checkouts_files(tmp_path):
    a = source_tarball(tmp_path / "a.tar")
    b = source_tarball(tmp_path / "b.tar")
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        names = set(tar.getnames())
        assert {tar.getmember(n).mtime for n in names} == {0}
    assert {"pyproject.toml", "uffdlab/labhost.py", "playbooks/lab-host.yml",
            "images/customize.sh"} <= names
    assert not any(n.startswith((".venv/", ".git/", "results/")) for n in names)


# -- progress ---------------------------------------------------------------------

def test_playbook_events_announce_each_task_and_name_the_failing_host():
    seen: list[Event] = []
    events = _PlaybookEvents(Emitter("cluster", seen.append))
    events({"event": "playbook_on_task_start", "event_data": {"task": "Install the apt"}})
    events({"event": "runner_on_ok", "event_data": {"task": "Install the apt", "host": "a",
                                                   "res": {"changed": True}}})
    events({"event": "runner_on_skipped", "event_data": {"task": "Build the images",
                                                        "host": "a"}})
    events({"event": "runner_on_unreachable", "event_data": {
        "task": "Install the apt", "host": "b", "res": {"msg": "no route"}}})
    assert [(e.kind, e.subject, e.message) for e in seen] == [
        (Kind.TASK, "cluster", "started: Install the apt"),
        (Kind.TASK, "a", "changed: Install the apt"),
        (Kind.TASK, "a", "skipped: Build the images"),
        (Kind.TASK, "b", "failed: Install the apt")]
    assert events.failures == {"b": "task 'Install the apt' failed (unreachable): no route"}
    assert events.changed == {"a": ["Install the apt"]}


# -- the local scheduler and status --------------------------------------------------

def _lab(tmp_path):
    path = tmp_path / "lab.yml"
    path.write_text(MINIMAL_LAB)
    return load_lab(path)


def test_a_recorded_scheduler_that_is_not_ours_is_never_signalled(tmp_path):
    lab = _lab(tmp_path)
    cluster_dir(lab).mkdir(parents=True)
    # this very process, but with another start time: a reused PID
    rec = LocalScheduler(ProcessId(os.getpid(), 1, "scheduler-info.json"),
                         "tcp://127.0.0.1:8786", "127.0.0.1", 8786, "log")
    (cluster_dir(lab) / "scheduler.json").write_text(json.dumps(rec.to_dict()))
    assert recorded_scheduler(lab) is None
    assert stop_scheduler(lab) is None                       # and we are still here
    assert not (cluster_dir(lab) / "scheduler.json").exists()


def test_down_with_a_vm_that_is_gone_runs_nothing_and_says_so(tmp_path, capsys):
    lab = tmp_path / "lab.yml"
    lab.write_text(MINIMAL_LAB)
    hosts = tmp_path / "hosts.yml"
    hosts.write_text("hosts:\n  - vm: ghost\n")
    assert cli.main(["--lab", str(lab), "cluster", "down", str(hosts)]) == 0
    out, err = capsys.readouterr()
    assert "not running (no worker to stop): ghost" in out
    assert "vm ghost is not running" in err and "worker stopped" not in out


def test_up_names_the_line_of_a_vm_that_is_not_running(tmp_path, capsys):
    lab = tmp_path / "lab.yml"
    lab.write_text(MINIMAL_LAB)
    hosts = tmp_path / "hosts.yml"
    hosts.write_text("scheduler: tcp://127.0.0.1:8786\nhosts:\n  - vm: ghost\n")
    assert cli.main(["--lab", str(lab), "cluster", "up", str(hosts)]) == 1
    assert f"{hosts}:3: hosts.0.vm: expected a running VM of lab.yml ('uffdlab status' " \
        f"lists them), got 'ghost', which is not running" in capsys.readouterr().err


def test_status_with_no_scheduler_says_so(tmp_path, capsys):
    lab = tmp_path / "lab.yml"
    lab.write_text(MINIMAL_LAB)
    assert cli.main(["--lab", str(lab), "cluster", "status"]) == 1
    assert "no scheduler to ask" in capsys.readouterr().err
    address = f"tcp://127.0.0.1:{free_port()}"
    assert cli.main(["--lab", str(lab), "cluster", "status", "--scheduler", address]) == 1
    assert f"no Dask scheduler answers at {address}" in capsys.readouterr().err


def test_status_refuses_a_bad_scheduler_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["cluster", "status", "--scheduler", "10.0.0.5"])
    assert e.value.code == 2
    assert "--scheduler: expected a Dask scheduler address like tcp://HOST:8786, got " \
        "'10.0.0.5'" in capsys.readouterr().err
