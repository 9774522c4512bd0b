# SPDX-License-Identifier: MIT
"""`uffdlab run --image NAME [--bisect]`: which VM a run gets, and the exit
codes `git bisect run` reads (0 good, 1 bad, 125 skip, 128 abort). The
layer below is faked: the VM class (no QEMU), api.ready (build, boot,
provision) and api.run_and_store (the run); the scenario catalogue and the
parameter checks are the real ones."""
from __future__ import annotations

import dataclasses
import types

import pytest

from uffdlab import api, cli, scenarios
from uffdlab import vm as vm_mod
from uffdlab.cli import runs
from uffdlab.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, EXIT_UNEXPECTED
from uffdlab.config import ConfigError, VMSpec, parse_size
from uffdlab.images import ImageError
from uffdlab.kernel import KernelError
from uffdlab.model import RunResult, Status
from uffdlab.provision import ProvisionError
from uffdlab.scenarios import MissingFeature
from uffdlab.vm import VMError

LAB = """\
name: bisect-tests
accel: tcg
cache_dir: {cache}
results: {results}
images:
  trixie:
    suite: trixie
  mine:
    suite: trixie
    kernel:
      tree: linux
  spare:
    suite: trixie
    kernel:
      tree: linux
vms:
  guest:
    image: trixie
    memory: 1G
    cpus: 1
  first-mine:
    image: mine
    memory: 3G
    cpus: 3
  second-mine:
    image: mine
    memory: 4G
    cpus: 4
"""


def result(status="ok", consistent: bool | None = True, expect: bool | None = True,
           error: str | None = None) -> RunResult:
    """A finished run as run_and_store returns it."""
    summary = None
    if status in ("ok", "inconsistent"):
        summary = {"type": "summary", "snapshot_ms": 400.0, "faults_total": 12,
                   "mismatched_pages": 0 if consistent is not False else 7}
        if consistent is not None:
            summary["consistent"] = consistent
    return RunResult(
        run_id="0123456789ab", started=1_750_000_000.0, lab="bisect-tests",
        vm="nb-mine-3g-3c-abc123", image="mine", image_key="3f9a0c1d2e4b",
        kernel="6.13.0-rc1-00042-gdeadbeef", accel="tcg", tools_version="t1",
        scenario="S3", scenario_name="multi-writer", params={}, command="uffd-snapshot",
        status=Status(status), error=error, expect_consistent=expect, summary=summary)


class FakeVM:
    """vm.VM without QEMU: records how it was made and every down()."""

    made: list[FakeVM] = []

    def __init__(self, lab, name=None, listener=None):
        self.lab, self.listener = lab, listener
        self.name, self.spec = lab.vm_spec(name)
        self.shape = None
        self.downs = 0
        FakeVM.made.append(self)

    @classmethod
    def for_shape(cls, lab, image, memory="1536M", cpus=2, name=None, listener=None,
                  fresh=False):
        lab.image_spec(image)                          # a clear error if unknown, as VM's
        vm = cls.__new__(cls)
        vm.lab, vm.listener = lab, listener
        vm.name = f"nb-{image}-{'fresh' if fresh else 'shared'}"
        vm.spec = VMSpec(image=image, memory=parse_size(memory), cpus=cpus)
        vm.shape = {"image": image, "memory": parse_size(memory), "cpus": cpus,
                    "fresh": fresh}
        vm.downs = 0
        cls.made.append(vm)
        return vm

    def down(self) -> bool:
        self.downs += 1
        return True


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A lab file, the fake VM class, and api.ready / api.run_and_store whose
    behaviour a test sets: `ready` and `run` are an exception to raise or,
    for run, the result to return."""
    path = tmp_path / "lab.yml"
    path.write_text(LAB.format(cache=tmp_path / "cache", results=tmp_path / "runs.sqlite"))
    w = types.SimpleNamespace(lab=path, calls=[], ready=None, run=result())

    def ready(vm):
        w.calls.append(("ready", vm.name))
        if w.ready is not None:
            raise w.ready

    def run_and_store(vm, scenario, params=None, timeout=None, floors=False):
        w.calls.append(("run", vm.name, scenario, params, timeout))
        if isinstance(w.run, BaseException):
            raise w.run
        return w.run

    monkeypatch.setattr(FakeVM, "made", [])
    monkeypatch.setattr(vm_mod, "VM", FakeVM)
    monkeypatch.setattr(api, "ready", ready)
    monkeypatch.setattr(api, "run_and_store", run_and_store)
    w.vms = FakeVM.made
    return w


def run(capsys, world, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--lab", str(world.lab), "run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def bisect(capsys, world, *extra: str) -> tuple[int, str, str]:
    return run(capsys, world, "S3", "--image", "mine", "--bisect", *extra)


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


# -- the codes git bisect run reads ------------------------------------------------------

def test_codes_are_git_bisects():
    assert (runs.EXIT_BISECT_GOOD, runs.EXIT_BISECT_BAD) == (0, 1)
    assert runs.EXIT_BISECT_SKIP == 125 and runs.EXIT_BISECT_ABORT == 128


@pytest.mark.parametrize("outcome, code", [
    (result("ok", True, True), 0),                      # the verdict expected: good
    (result("inconsistent", False, False), 0),          # S4-like: inconsistent is right
    (result("inconsistent", False, True), 1),           # the other verdict: bad
    (result("ok", True, False), 1),
    (result("failed", None, True, "VM died"), 1),       # crashed on this kernel: bad
    (result("timeout", None, True, "timed out"), 1),
    (result("ok", None, True), 125),                    # no verdict: never good
    (result("ok", True, None), 128),                    # nothing expected: nothing to bisect
    (KernelError("make bzImage failed (exit 2)\n  mm/x.c:1: error"), 125),
    (ImageError("mmdebstrap failed"), 125),
    (VMError("the guest kernel panicked: Oops"), 125),
    (ProvisionError("guest tools did not build"), 125),
    (MissingFeature("S10", "PAGEMAP_SCAN", "6.7", "6.6.0"), 125),
    (ConfigError(["lab.yml:3: images.mine.kernel.tree: expected a Linux source tree"]), 128),
    (scenarios.ScenarioError("unknown scenario 'S99'"), 128),
    (RuntimeError("a bug in uffdlab"), 128),
])
def test_bisect_exit_maps_every_outcome(outcome, code):
    got, why = runs.bisect_exit(outcome)
    assert got == code
    assert why and "\n" not in why


def test_bisect_exit_reasons_name_the_verdict_and_the_failure():
    _, why = runs.bisect_exit(result("inconsistent", False, True))
    assert why == ("S3 on kernel 6.13.0-rc1-00042-gdeadbeef: inconsistent, expected "
                   "consistent on a correct kernel")
    _, why = runs.bisect_exit(KernelError("make bzImage failed (exit 2)\n  mm/x.c:1: error"))
    assert why == "kernel build failed: make bzImage failed (exit 2)"
    _, why = runs.bisect_exit(KernelError("make bzImage failed (exit 2) after 9 units:\n"
                                          "  mm/x.c:1: error: y\nfull build log: /l"))
    assert why == ("kernel build failed: make bzImage failed (exit 2) after 9 units: "
                   "mm/x.c:1: error: y")            # the line a ':' announces, too
    _, why = runs.bisect_exit(result("timeout", None, True, "timed out after 100 s"))
    assert why.endswith("the run timeout: timed out after 100 s")


# -- run --bisect, end to end over the fakes ----------------------------------------------

def test_good_step_uses_a_fresh_vm_and_stops_it(capsys, world):
    code, out, err = bisect(capsys, world)
    assert code == 0
    (vm,) = world.vms
    assert vm.shape == {"image": "mine", "memory": parse_size("3G"), "cpus": 3, "fresh": True}
    assert vm.downs == 1
    assert world.calls == [("ready", vm.name), ("run", vm.name, "S3", {}, None)]
    assert "run 0123456789ab: S3 (multi-writer)" in out
    assert last_line(err).startswith("bisect: good (0): S3 on kernel 6.13.0-rc1")


def test_unexpected_verdict_is_bad(capsys, world):
    world.run = result("inconsistent", False, True)
    code, _, err = bisect(capsys, world)
    assert code == 1 and world.vms[0].downs == 1
    assert last_line(err).startswith("bisect: bad (1): ")


@pytest.mark.parametrize("status", ["failed", "timeout"])
def test_a_run_that_did_not_finish_is_bad(capsys, world, status):
    world.run = result(status, None, True, "uffd-snapshot exited 3: the guest hung")
    code, _, err = bisect(capsys, world)
    assert code == 1 and world.vms[0].downs == 1
    assert last_line(err).startswith(f"bisect: bad (1): S3 on kernel 6.13.0-rc1-00042-"
                                     f"gdeadbeef: the run {status}: uffd-snapshot exited 3")


def test_a_run_without_a_verdict_is_skipped_not_good(capsys, world):
    world.run = result("ok", None, True)
    code, _, err = bisect(capsys, world)
    assert code == 125 and world.vms[0].downs == 1
    assert "without a consistency verdict" in last_line(err)


@pytest.mark.parametrize("error, what", [
    (KernelError("make bzImage failed (exit 2) after 812 units:\n  mm/userfaultfd.c: error"),
     "kernel build failed: make bzImage failed (exit 2) after 812 units: "
     "mm/userfaultfd.c: error"),
    (ImageError("mmdebstrap failed"), "image build failed: mmdebstrap failed"),
    (VMError("the guest kernel panicked: VFS: Unable to mount root fs"),
     "boot failed: the guest kernel panicked"),
    (ProvisionError("task 'build guest tools' failed"), "provisioning failed: task"),
])
def test_build_boot_and_provision_failures_skip_the_commit(capsys, world, error, what):
    world.ready = error
    code, _, err = bisect(capsys, world)
    assert code == 125
    assert world.vms[0].downs == 1                          # stopped even so
    assert [c[0] for c in world.calls] == ["ready"]         # no run on it
    assert last_line(err).startswith(f"bisect: skip (125): {what}")
    assert f"uffdlab: {type(error).__name__}: " in err      # the whole error above it


def test_a_kernel_without_the_scenarios_feature_is_skipped(capsys, world):
    world.run = MissingFeature("S3", "UFFD_FEATURE_WP_HUGETLBFS_SHMEM", "5.19", "5.18.0")
    code, _, err = bisect(capsys, world)
    assert code == 125 and world.vms[0].downs == 1
    assert "bisect: skip (125): the kernel cannot run the scenario: S3: the guest kernel " \
           "5.18.0 lacks" in err


def test_the_vm_is_stopped_when_the_run_raises(capsys, world):
    world.run = RuntimeError("results: a bug")
    code, _, err = bisect(capsys, world)
    assert code == 128 and world.vms[0].downs == 1
    assert last_line(err).startswith("bisect: abort (128): RuntimeError: results: a bug")


def test_the_vm_is_stopped_on_interrupt(capsys, world):
    world.run = KeyboardInterrupt()
    code, _, _ = bisect(capsys, world)
    assert code == 130 and world.vms[0].downs == 1          # >= 128: git bisect stops


def test_a_vm_that_will_not_stop_does_not_change_the_verdict(capsys, world, monkeypatch):
    def down(self):
        raise VMError("QMP does not answer")
    monkeypatch.setattr(FakeVM, "down", down)
    code, _, err = bisect(capsys, world)
    assert code == 0
    assert "could not stop VM nb-mine-fresh" in err and last_line(err).startswith(
        "bisect: good (0)")


# -- bad input aborts the bisection, before anything boots --------------------------------

@pytest.mark.parametrize("argv, says", [
    (["S99", "--image", "mine"], "unknown scenario 'S99'"),
    (["S3", "--image", "mine", "--param", "writers"], "--param: expected key=value"),
    (["S3", "--image", "mine", "--param", "writers=lots"], "writers"),
    (["S3", "--image", "nope"], "no image named 'nope'"),
    (["S3"], "expected --image NAME"),
    (["--image", "mine"], "expected a scenario"),
    (["S3", "--image", "mine", "--vm", "guest"], "--image and --vm are mutually exclusive"),
])
def test_bad_input_aborts(capsys, world, argv, says):
    code, _, err = run(capsys, world, *argv, "--bisect")
    assert code == 128
    assert says in err
    assert last_line(err).startswith("bisect: abort (128): ")
    assert world.calls == []                                  # nothing built or booted
    assert all(vm.downs == 1 for vm in world.vms)             # a VM made is still stopped


def test_a_broken_lab_file_aborts(capsys, world):
    world.lab.write_text("images: {}\n")
    code, _, err = bisect(capsys, world)
    assert code == 128 and "bisect: abort (128): lab file error: " in err
    assert world.calls == [] and world.vms == []


def test_a_scenario_without_an_expected_verdict_aborts(capsys, world, monkeypatch):
    s3 = scenarios.get("S3")
    monkeypatch.setitem(scenarios.BY_KEY, "s3", dataclasses.replace(s3, expect_consistent=None))
    code, _, err = bisect(capsys, world)
    assert code == 128 and "expects no particular verdict" in err
    assert world.calls == [] and world.vms[0].downs == 1


def test_a_packaged_kernel_is_noted(capsys, world):
    code, _, err = run(capsys, world, "S3", "--image", "trixie", "--bisect")
    assert code == 0
    assert "bisect: note: image trixie boots a packaged kernel" in err


# -- --image without --bisect; the old exit codes --------------------------------------------

def test_image_runs_on_a_shared_vm_shaped_like_the_first_vm_of_it(capsys, world):
    code, _, _ = run(capsys, world, "S3", "--image", "mine")
    assert code == EXIT_OK
    (vm,) = world.vms
    assert vm.shape == {"image": "mine", "memory": parse_size("3G"), "cpus": 3,
                        "fresh": False}
    assert vm.downs == 0                                    # kept running, as --vm's are
    assert [c[0] for c in world.calls] == ["run"]


def test_image_without_a_vm_gets_a_vms_defaults(capsys, world):
    code, _, _ = run(capsys, world, "S3", "--image", "spare")
    assert code == EXIT_OK
    defaults = VMSpec(image="spare")
    assert world.vms[0].shape == {"image": "spare", "memory": defaults.memory,
                                  "cpus": defaults.cpus, "fresh": False}


def test_image_and_vm_are_refused_together(capsys, world):
    code, _, err = run(capsys, world, "S3", "--image", "mine", "--vm", "guest")
    assert code == EXIT_CONFIG
    assert "--image and --vm are mutually exclusive" in err
    assert "--image mine and --vm guest" in err
    assert world.vms == [] and world.calls == []


@pytest.mark.parametrize("outcome, code", [
    (result("ok", True, True), EXIT_OK),
    (result("inconsistent", False, True), EXIT_UNEXPECTED),
    (result("ok", None, True), EXIT_OK),                  # unchanged: only --bisect minds
    (result("failed", None, True, "VM died"), EXIT_FAIL),
    (result("timeout", None, True, "timed out"), EXIT_FAIL),
])
def test_without_bisect_the_exit_codes_are_unchanged(capsys, world, outcome, code):
    world.run = outcome
    got, _, err = run(capsys, world, "S3", "--vm", "guest")
    assert got == code
    assert "bisect:" not in err
    (vm,) = world.vms
    assert vm.name == "guest" and vm.shape is None and vm.downs == 0


@pytest.mark.parametrize("error, code", [
    (KernelError("make bzImage failed"), EXIT_FAIL),
    (VMError("no SSH after 300 s"), EXIT_FAIL),
    (ConfigError(["lab.yml: images.mine.kernel.tree: expected a Linux source tree"]),
     EXIT_CONFIG),
])
def test_without_bisect_errors_exit_as_before(capsys, world, error, code):
    world.run = error
    got, _, _ = run(capsys, world, "S3")
    assert got == code
    assert world.vms[0].name == "guest" and world.vms[0].downs == 0


def test_without_bisect_bad_input_is_still_2(capsys, world):
    assert run(capsys, world, "S99")[0] == EXIT_CONFIG
    assert run(capsys, world, "S3", "--image", "nope")[0] == EXIT_CONFIG
    assert world.calls == []
