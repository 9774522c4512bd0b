# SPDX-License-Identifier: MIT
"""The run layer's own logic, with the layers below it faked: how Ansible
events become VM events and errors, how uffd-snapshot output becomes a
status, and the scenario catalogue's parameter checks."""
from __future__ import annotations

import json

import pytest

from uffdlab import scenarios
from uffdlab.model import RunResult
from uffdlab.provision import _EventCollector
from uffdlab.runner import _finish, measure_floors
from uffdlab.scenarios import ScenarioError
from uffdlab.tools import sources_tarball


class FakeVM:
    def __init__(self):
        self.events = []

    def emit(self, kind, message="", **data):
        self.events.append((kind, message, data))


def ansible_event(kind, task, res=None, host="guest"):
    return {"event": kind, "event_data": {"task": task, "host": host, "res": res or {}}}


def test_ansible_failure_names_task_host_and_module_message():
    vm = FakeVM()
    ev = _EventCollector(vm)
    ev(ansible_event("runner_on_ok", "Write the lab's kernel settings", {"changed": True}))
    ev(ansible_event("runner_on_failed", "Build the guest tools",
                     {"msg": "non-zero return code", "stderr": "cc: error"}))
    assert ev.changed == ["Write the lab's kernel settings"]
    assert ev.failure == ("task 'Build the guest tools' failed on guest: non-zero return code")
    assert [e[1] for e in vm.events] == ["changed: Write the lab's kernel settings",
                                         "failed: Build the guest tools"]


def test_unreachable_host_is_said_so():
    ev = _EventCollector(FakeVM())
    ev(ansible_event("runner_on_unreachable", "Read what the guest already has",
                     {"msg": "Connection refused"}))
    assert "(unreachable): Connection refused" in ev.failure


def test_probe_fact_is_collected():
    ev = _EventCollector(FakeVM())
    ev(ansible_event("runner_on_ok", "Report the probe",
                     {"ansible_facts": {"uffd_probe": {"kernel": "6.12.1"}}}))
    assert ev.probe == {"kernel": "6.12.1"}


def test_sources_tarball_is_reproducible(tmp_path):
    a = sources_tarball(tmp_path / "a.tar").read_bytes()
    b = sources_tarball(tmp_path / "b.tar").read_bytes()
    assert a == b and len(a) > 10_000


def _result():
    return RunResult("r1", 0.0, "lab", "vm", "trixie", "k", "6.12", "tcg", "abc", "S3",
                     "multi-writer", {}, "uffd-snapshot ...")


@pytest.mark.parametrize("records,exit_code,status", [
    ([{"type": "summary", "consistent": True}], 0, "ok"),
    ([{"type": "summary", "consistent": False}], 0, "inconsistent"),
    ([{"type": "error", "message": "timed out after 3.01 s (--timeout 3.01) while copying"}],
     3, "timeout"),
    ([{"type": "error", "message": "UFFDIO_WRITEPROTECT: Invalid argument"}], 3, "failed"),
    ([], 0, "failed"),
])
def test_status_from_the_tool_output(records, exit_code, status):
    res = _result()
    res.exit_code = exit_code
    _finish(res, ["not json"] + [json.dumps(r) for r in records])
    assert res.status == status
    if status in ("failed", "timeout"):
        assert res.error.startswith(f"uffd-snapshot exited {exit_code}")


def test_scenarios_by_id_and_name():
    assert scenarios.get("s3") is scenarios.get("multi-writer") is scenarios.get("S3")
    with pytest.raises(ScenarioError, match="did you mean"):
        scenarios.get("multi-writr")


def test_scenario_command_merges_parameters():
    sc = scenarios.get("S5")
    argv = scenarios.command(sc, scenarios.resolve(sc, {"writers": "3", "unregistered": 2}),
                             "/opt/uffdlab", 60)
    assert argv[:1] == ["/opt/uffdlab/bin/uffd-snapshot"]
    assert argv[argv.index("--writers") + 1] == "3"
    assert argv[argv.index("--unregistered") + 1] == "2"


def test_feature_check_names_the_first_kernel():
    sc = scenarios.get("S10")
    probe = {"kernel": "6.1.0", "features": {"WP_ASYNC": False, "WP_HUGETLBFS_SHMEM": True},
             "pagemap_scan": False}
    with pytest.raises(scenarios.MissingFeature, match=r"6.1.0 lacks UFFD_FEATURE_WP_ASYNC "
                                                       r"\(first in Linux 6.7\)") as err:
        scenarios.check_against(sc, scenarios.resolve(sc, {}), 2 << 30, probe)
    assert (err.value.feature, err.value.first_kernel, err.value.kernel) == \
        ("UFFD_FEATURE_WP_ASYNC", "6.7", "6.1.0")


def test_min_kernel_derives_from_the_feature_table():
    assert scenarios.get("S1").min_kernel == "any"          # no userfaultfd at all
    assert scenarios.get("S3").min_kernel == "5.19"         # PTE markers
    assert scenarios.get("S10").min_kernel == "6.7"         # WP_ASYNC, PAGEMAP_SCAN
    sparse_anon = scenarios.resolve(scenarios.get("S9"), {"backing": "anon", "populate": "no",
                                                          "prefill": "no"})
    assert scenarios.min_kernel(sparse_anon) == "6.4"       # WP_UNPOPULATED


def test_readme_scenario_table_matches_the_catalogue():
    """README's scenario table: every catalogue id with its derived minimum kernel."""
    import re

    from uffdlab.paths import REPO
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Scenarios"):]
    rows = {m[1]: m[2] for m in re.finditer(r"^\| (S\d+(?:-\w+)?) \|[^|]*\|[^|]*\| ([^|]+) \|",
                                            section, re.M)}
    for sc in scenarios.CATALOGUE:
        assert sc.id in rows, f"README lacks {sc.id}"
        assert rows[sc.id].split()[0] == sc.min_kernel, (sc.id, rows[sc.id])


def test_anonymous_sparse_needs_wp_unpopulated():
    sc = scenarios.get("S9")
    params = scenarios.resolve(sc, {"backing": "anon", "populate": "no", "prefill": "no"})
    probe = {"kernel": "6.1.0", "features": {"WP_HUGETLBFS_SHMEM": True,
                                             "WP_UNPOPULATED": False},
             "feature_min_kernel": {"WP_UNPOPULATED": "6.4"}}
    with pytest.raises(scenarios.MissingFeature, match="WP_UNPOPULATED"):
        scenarios.check_against(sc, params, 2 << 30, probe)


class _SizedVM:
    """prepare() reads only the VM's spec: no SSH, no QEMU."""

    class spec:
        memory = 1536 << 20


@pytest.mark.parametrize("params,timeout,message", [
    ({"duration": "0.04"}, None, "duration: expected seconds from 0.05 to 86400, got '0.04'"),
    ({"duration": "nan"}, None, "duration: expected seconds from 0.05"),
    ({"rate": "1000000001"}, None, "rate: expected page writes per second, a whole number "
                                   "from 1 to 1000000000, or 'max', got '1000000001'"),
    ({"rate": "1e-300"}, None, "rate: expected page writes per second"),
    ({"pattern": "hot:0.0"}, None, "pattern: expected uniform, sequential or hot:FRACTION "
                                   "with 0 < FRACTION <= 1, got 'hot:0.0'"),
    ({"pattern": "hot:1.5"}, None, "got 'hot:1.5'"),
    ({"writers": 2, "unregistered": 3}, None, "unregistered: expected at most writers (2), "
                                              "got 3"),
    ({}, float("inf"), "timeout: expected seconds from 0.1 to 86400, got inf"),
    ({}, float("nan"), "timeout: expected seconds from 0.1 to 86400, got nan"),
    ({}, 1e308, "timeout: expected seconds from 0.1 to 86400, got 1e+308"),
])
def test_preflight_uses_the_guest_tools_limits(params, timeout, message):
    from uffdlab.runner import prepare
    with pytest.raises(ScenarioError) as err:
        prepare(_SizedVM(), "S5", params, timeout)
    assert message in str(err.value)


def test_limits_come_from_the_guest_tools_header():
    """The bounds the pre-flight check enforces are limits.h's, at both ends."""
    from uffdlab.runner import prepare
    lim = scenarios.tool_limits()
    lo, hi = lim["duration"]
    prepare(_SizedVM(), "S3", {"duration": lo})
    with pytest.raises(ScenarioError):
        prepare(_SizedVM(), "S3", {"duration": lo * 0.99})
    w_lo, w_hi = map(int, lim["writers"])
    scenarios.resolve(scenarios.get("S3"), {"writers": w_hi})
    with pytest.raises(ScenarioError):
        scenarios.resolve(scenarios.get("S3"), {"writers": w_hi + 1})
    assert lim["rate"] == (1, 1e9) and lim["hot_fraction"] == (0, 1)


@pytest.mark.parametrize("status,consistent,expect,judgement", [
    ("failed", None, True, "unfinished"), ("timeout", True, True, "unfinished"),
    ("ok", None, True, "unverified"), ("ok", True, None, "unspecified"),
    ("ok", True, True, "expected"), ("inconsistent", False, False, "expected"),
    ("inconsistent", False, True, "unexpected"), ("ok", True, False, "unexpected"),
])
def test_one_judgement_behind_every_verdict_text(status, consistent, expect, judgement):
    from uffdlab import report, results
    from uffdlab.model import judge
    assert judge(status, consistent, expect) == judgement
    run = {"status": status, "consistent": consistent, "expect_consistent": expect,
           "error": "boom"}
    flagged = {"unexpected": ("(!)", "UNEXPECTED")}.get(judgement)
    if flagged:                       # each renderer marks an unexpected verdict
        assert flagged[0] in results.verdict(run)
        assert flagged[1] in report.verdict(run)


# -- the guest's floors after a run (the SSH session below is faked) ----------

class _Out:
    def __init__(self, stdout="", exit_status=0, stderr=""):
        self.stdout, self.exit_status, self.stderr = stdout, exit_status, stderr


class _FloorVM(FakeVM):
    """A VM whose shared session answers uffd-bench with `answer` (an _Out, or
    an exception to raise)."""

    def __init__(self, answer):
        super().__init__()
        self.answer, self.commands, self.dropped = answer, [], False
        self.lab = type("Lab", (), {"provision": type("P", (), {"tools_dir": "/opt/t"})()})()

    def shared_session(self):
        return self

    def run(self, command, timeout=None):
        self.commands.append(command)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def drop_session(self):
        self.dropped = True


def test_floors_are_uffd_benchs_record_over_the_runs_size():
    record = {"type": "bench", "memcpy_gb_s": 0.45, "round_trip_us": {"p50": 111.0}}
    vm = _FloorVM(_Out("noise\n" + json.dumps(record) + "\n"))
    assert measure_floors(vm, "64M") == record
    assert vm.commands == ["/opt/t/bin/uffd-bench --memcpy-size 64M --round-trips 1000"]
    assert "floors: memcpy 0.45 GB/s, fault round trip p50 111.0 us" in vm.events[-1][1]


@pytest.mark.parametrize("answer, said", [
    (_Out("", 2, "uffd-bench: --memcpy-size: got '512K', expected a size >= 1M\n"),
     "uffd-bench exited 2: uffd-bench: --memcpy-size: got '512K'"),
    (_Out('{"type": "summary"}\n'), "uffd-bench exited 0: no bench record"),
    (TimeoutError("no answer in 120 s"), "TimeoutError: no answer in 120 s"),
])
def test_floors_that_cannot_be_measured_are_none_and_said(answer, said):
    vm = _FloorVM(answer)
    assert measure_floors(vm, "512K") is None
    assert vm.events[-1][1].startswith("floors not measured: ")
    assert said in vm.events[-1][1]
    assert vm.dropped == isinstance(answer, Exception)     # a broken session is not reused
