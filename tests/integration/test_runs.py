# SPDX-License-Identifier: MIT
"""Provisioning, scenario runs and the results database on real VMs: the
trixie guest (6.12) and the bookworm guest (6.1), shared by the session."""
from __future__ import annotations

import pytest

from uffdlab import scenarios
from uffdlab.api import run_and_store
from uffdlab.cli import main as cli
from uffdlab.provision import provision
from uffdlab.results import ResultsDB
from uffdlab.runner import run
from uffdlab.scenarios import ScenarioError
from uffdlab.tools import tools_version

pytestmark = pytest.mark.integration
SMALL = {"size": "16M", "duration": 1}


def test_provision_reports_the_kernel(provisioned, running_vms):
    for image, res in provisioned.items():
        probe = res.probe
        assert probe["kernel"] == running_vms[image].image().kernel_release
        # PTE markers (5.19) make shmem WP work on both kernels
        assert probe["features"]["WP_HUGETLBFS_SHMEM"] is True
        assert probe["wp_register"]["memfd"] is True
    assert provisioned["trixie"].probe["features"]["WP_ASYNC"] is True       # 6.7+
    assert provisioned["bookworm"].probe["features"]["WP_ASYNC"] is False    # 6.1
    assert provisioned["bookworm"].probe["features"]["WP_UNPOPULATED"] is False


def test_second_provision_changes_nothing(provisioned, trixie_vm):
    if trixie_vm.state().template is None:              # a cold boot: the first run built
        assert provisioned["trixie"].changed >= 1       # the tools (a restored VM had them)
    again = provision(trixie_vm)
    assert again.changed == 0, again.changed_tasks
    assert again.probe == provisioned["trixie"].probe


@pytest.mark.parametrize("scenario", ["S1", "S3"])
def test_consistent_runs_are_stored_with_provenance(provisioned, trixie_vm, scenario):
    res = run_and_store(trixie_vm, scenario, SMALL)
    assert res.status == "ok", res.error
    with ResultsDB(trixie_vm.lab.results_path) as db:
        row = db.get(res.run_id)
    st = trixie_vm.state()
    assert row["status"] == "ok" and row["consistent"]
    assert row["scenario"] == scenario
    assert row["kernel"] == st.kernel_release and row["accel"] == st.accel
    assert row["image_key"] == st.image_key and row["vm"] == trixie_vm.name
    assert row["tools_version"] == tools_version()
    assert row["params"]["size"] == "16M"
    if scenario == "S3":
        assert row["faults_total"] > 0 and row["lat_p50_us"] > 0


@pytest.mark.parametrize("scenario,cause", [("S5", "unregistered"), ("S6", "fd-write")])
def test_broken_snapshots_are_stored_inconsistent(provisioned, trixie_vm, scenario, cause):
    res = run_and_store(trixie_vm, scenario, SMALL)
    assert res.status == "inconsistent"
    assert res.summary["mismatches_by_cause"].get(cause, 0) > 0
    with ResultsDB(trixie_vm.lab.results_path) as db:
        assert db.get(res.run_id)["status"] == "inconsistent"


def test_kernel_without_wp_async_refuses_async_scan_before_running(provisioned, bookworm_vm,
                                                                   monkeypatch):
    _no_ssh(monkeypatch, bookworm_vm)
    with pytest.raises(ScenarioError, match=r"WP_ASYNC \(first in Linux 6.7\)"):
        run(bookworm_vm, "S10", SMALL)


def test_bookworm_runs_the_multi_writer_snapshot(provisioned, bookworm_vm):
    res = run(bookworm_vm, "S3", SMALL)
    assert res.status == "ok", res.error
    assert res.kernel.startswith("6.1.")


@pytest.mark.parametrize("params,message", [
    ({"sise": "16M"}, "unknown parameter 'sise'; valid parameters: backing, duration"),
    ({"size": "8G"}, "does not fit a VM with 1536M"),
    ({"writers": "0"}, "writers: expected a whole number from 1 to 64, got '0'"),
    ({"rate": "fast"}, "rate: expected page writes per second"),
    ({"duration": "5", "timeout": 4}, "timeout: expected more seconds than duration (5)"),
])
def test_bad_parameters_are_rejected_before_any_ssh(trixie_vm, monkeypatch, params, message):
    _no_ssh(monkeypatch, trixie_vm)
    params = dict(params)
    timeout = params.pop("timeout", None)
    with pytest.raises(ScenarioError) as err:
        run(trixie_vm, "S3", params, timeout)
    assert message in str(err.value)


def test_cli_rejects_a_bad_parameter_with_exit_2(test_lab, capsys):
    assert cli(["--lab", str(test_lab.source), "run", "S3", "--param", "bogus=1"]) == 2
    assert "unknown parameter 'bogus'" in capsys.readouterr().err


def test_timeout_is_enforced_and_stored(provisioned, trixie_vm):
    # setting up 16M of RAM and four writers alone takes longer than 10 ms
    res = run_and_store(trixie_vm, "S1", {"size": "16M", "duration": 3}, timeout=3.01)
    assert res.status == "timeout", res.error
    assert "timed out" in res.error
    assert res.duration_s < 30
    with ResultsDB(trixie_vm.lab.results_path) as db:
        row = db.get(res.run_id)
    assert row["status"] == "timeout" and row["error"]


def test_every_catalogue_scenario_is_reachable():
    for sc in scenarios.CATALOGUE:
        argv = scenarios.command(sc, scenarios.resolve(sc, {}), "/opt/uffdlab", 60)
        assert argv[0].endswith("uffd-snapshot") and "--verify" in argv


def _no_ssh(monkeypatch, vm):
    """Any SSH connection from here on fails the test."""
    def refuse(*a, **k):
        raise AssertionError("an SSH session was opened")
    monkeypatch.setattr(type(vm), "session", refuse)
    import uffdlab.provision as prov
    monkeypatch.setattr(prov, "provision", refuse)
