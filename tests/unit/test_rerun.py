# SPDX-License-Identifier: MIT
"""rerun.py and `uffdlab rerun`: the comparison of a stored run with its
repeats, the refusal to repeat a run whose guest changed, the VM a rerun
gets, and the command's flags and exit codes; with it compare_runs,
plot_rerun and what `results show` says about a run's provenance.

Nothing boots. Images are built by test_archive_lock's FakeDebian; the run
itself (runner.run, what boots, provisions and runs the guest tool) is
replaced by a fake that returns a RunResult, so everything above it (plan,
check, store, compare, print) is the real code. QEMU's version is fixed.
"""
from __future__ import annotations

import copy
import itertools
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from tests.unit.test_archive_lock import FakeDebian, make_lab, run_cli
from tests.unit.test_results import SUMMARY_S3, SUMMARY_S5, make_result
from uffdlab import accel, api, images, report, rerun, runner
from uffdlab.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, EXIT_UNEXPECTED
from uffdlab.config import load_lab, parse_size
from uffdlab.images import ImageStore
from uffdlab.model import RunResult, Status
from uffdlab.rerun import COMPARED, Comparison, MetricRow, RerunError
from uffdlab.results import ResultsDB, format_run
from uffdlab.tools import tools_digest
from uffdlab.vm import VM, kernel_digest

QEMU = "QEMU emulator version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)"
PARAMS = {"size": "16M", "duration": 1}


@pytest.fixture
def debian(monkeypatch, tmp_path) -> FakeDebian:
    deb = FakeDebian(tmp_path / "mmdebstrap-roots")
    monkeypatch.setattr(ImageStore, "_mmdebstrap",
                        lambda self, argv, log, ev, env=None: deb.mmdebstrap(self, argv, log,
                                                                             ev, env))
    monkeypatch.setattr(images, "_run", deb.run)
    monkeypatch.setattr(accel, "qemu_version", lambda: QEMU)
    return deb


@pytest.fixture
def lab_path(tmp_path, debian) -> Path:
    """A TCG lab (VM guest: 512M, 1 cpu, an extra kernel command line) whose
    trixie image is built."""
    path = make_lab(tmp_path)
    path.write_text(path.read_text().replace('cmdline: ""', 'cmdline: "nokaslr"'))
    ImageStore(load_lab(path)).build("trixie")
    return path


def as_now(lab_path: Path, **kw) -> dict:
    """Provenance fields as a run on this lab's guest records them now."""
    img = ImageStore(load_lab(lab_path)).image("trixie")
    content = img.content_hash + (f"+{kernel_digest(img)}" if kernel_digest(img) else "")
    return {"vm": "guest", "image": "trixie", "image_key": img.key, "accel": "tcg",
            "image_content": content, "tools_digest": tools_digest(),
            "qemu": QEMU, "params": dict(PARAMS), **kw}


def store(lab_path: Path, run: RunResult) -> dict:
    """Store `run` in the lab's results database; the dict rerun reads."""
    lab = load_lab(lab_path)
    with ResultsDB(lab.results_path) as db:
        db.store(run)
        return db.get(run.run_id)


def original(lab_path: Path, run_id: str = "orig01", **kw) -> dict:
    return store(lab_path, make_result(run_id, **as_now(lab_path, **kw)))


def repeat(run_id: str, summary=SUMMARY_S3, **kw) -> RunResult:
    return make_result(run_id, summary=summary, **kw)


def with_metric(summary: dict, **values) -> dict:
    s = copy.deepcopy(summary)
    s.update(values)
    return s


# -- MetricRow ---------------------------------------------------------------------
@pytest.mark.parametrize("orig, repeats, spread, within", [
    (10.0, [9.0, 11.0], (9.0, 11.0), True),
    (10.0, [10.0, 10.0, 10.0], (10.0, 10.0), True),          # on the edge is within
    (12.0, [9.0, 11.0, 10.0], (9.0, 11.0), False),
    (8.0, [9.0, 11.0], (9.0, 11.0), False),
    (10.0, [9.0], None, None),                               # one repeat: no spread
    (10.0, [9.0, None], None, None),                         # one value: no spread
    (10.0, [None, None, None], None, None),
    (10.0, [], None, None),
    (None, [9.0, 11.0], (9.0, 11.0), None),                  # nothing to hold against it
])
def test_metric_row_spread_and_within(orig, repeats, spread, within):
    m = MetricRow("snapshot_ms", orig, repeats)
    assert m.spread == spread
    assert m.within is within


# -- Comparison --------------------------------------------------------------------
ORIGINAL = {"run_id": "orig01", "scenario": "S3", "kernel": "6.12.38+deb13-cloud-amd64",
            "status": "ok", "consistent": True, "snapshot_ms": 412.733, "faults_total": 301,
            "lat_p50_us": 215.871, "lat_p99_us": 918.5, "stall_max_ms": 3.1,
            "mismatched_pages": 0}


def test_same_verdict_and_all_ran():
    ok = [repeat("a"), repeat("b")]
    assert Comparison(ORIGINAL, ok).same_verdict and Comparison(ORIGINAL, ok).all_ran
    # an inconsistent repeat of a consistent run: ran, but another verdict
    other = Comparison(ORIGINAL, [repeat("a"), repeat("b", SUMMARY_S5)])
    assert other.runs[1].status == Status.INCONSISTENT
    assert not other.same_verdict and other.all_ran
    failed = Comparison(ORIGINAL, [repeat("a"), repeat("b", None)])
    assert failed.runs[1].status == Status.FAILED
    assert not failed.same_verdict and not failed.all_ran
    timed = Comparison(ORIGINAL, [repeat("a", None, status="timeout")])
    assert not timed.same_verdict and not timed.all_ran
    # the same status with another verdict is another verdict
    odd = Comparison({**ORIGINAL, "consistent": None}, [repeat("a")])
    assert not odd.same_verdict
    # nothing repeated: no verdict to share, nothing that ran
    assert not Comparison(ORIGINAL, []).same_verdict and not Comparison(ORIGINAL).all_ran


def test_an_inconsistent_run_repeated_inconsistent_is_the_same_verdict():
    orig = {**ORIGINAL, "status": "inconsistent", "consistent": False}
    cmp = Comparison(orig, [repeat("a", SUMMARY_S5), repeat("b", SUMMARY_S5)])
    assert cmp.same_verdict and cmp.all_ran


def test_rows_read_each_compared_metric_of_each_repeat():
    runs = [repeat("a", with_metric(SUMMARY_S3, snapshot_ms=400.0)),
            repeat("b", with_metric(SUMMARY_S3, snapshot_ms=420.0)),
            repeat("c", None)]
    rows = {m.metric: m for m in Comparison(ORIGINAL, runs).rows}
    assert list(rows) == list(COMPARED)
    assert rows["snapshot_ms"].repeats == [400.0, 420.0, None]
    assert rows["snapshot_ms"].spread == (400.0, 420.0) and rows["snapshot_ms"].within
    p99 = SUMMARY_S3["fault_latency_us"]["p99"]
    assert rows["lat_p99_us"].repeats == [p99, p99, None]      # a nested key
    assert rows["lat_p99_us"].original == 918.5


def test_table_and_summary():
    runs = [repeat("a", with_metric(SUMMARY_S3, snapshot_ms=400.0)),
            repeat("b", with_metric(SUMMARY_S3, snapshot_ms=405.0))]
    cmp = Comparison(ORIGINAL, runs)
    t = cmp.table()
    assert list(t.index) == list(COMPARED)
    assert list(t.columns) == ["original", "repeats", "spread", "original within"]
    assert t.loc["snapshot_ms", "repeats"] == "400, 405"
    assert t.loc["snapshot_ms", "spread"] == "400 .. 405"
    assert t.loc["snapshot_ms", "original within"] == "NO"
    assert cmp.summary() == ("rerun of orig01 (S3 on 6.12.38+deb13-cloud-amd64): 2 repeats, "
                             "the same verdict; outside the repeats' spread: snapshot_ms, "
                             + ", ".join(m.metric for m in cmp.rows[1:] if m.within is False))
    one = Comparison(ORIGINAL, [repeat("a")])
    assert one.table().loc["snapshot_ms", "spread"] == "–"
    assert one.table().loc["snapshot_ms", "original within"] == "–"
    assert one.summary().endswith("1 repeats, the same verdict; one repeat has no spread "
                                  "(it takes at least 2: --times 3)")
    same = Comparison({**ORIGINAL, **{m.metric: m.repeats[0] for m in one.rows}},
                      [repeat("a"), repeat("b")])
    assert same.summary().endswith("the same verdict; every metric within the repeats' "
                                   "spread")
    assert "a DIFFERENT verdict" in Comparison(ORIGINAL, [repeat("a", SUMMARY_S5)]).summary()


def test_api_compare_runs():
    repeats = (r for r in [repeat("a"), repeat("b")])          # any iterable
    cmp = api.compare_runs(ORIGINAL, repeats)
    assert isinstance(cmp, Comparison)
    assert cmp.original is ORIGINAL and [r.run_id for r in cmp.runs] == ["a", "b"]
    assert cmp.same_verdict


def test_plot_rerun_returns_a_figure():
    cmp = api.compare_runs(ORIGINAL, [repeat("a", with_metric(SUMMARY_S3, snapshot_ms=1.0)),
                                      repeat("b")])
    fig = report.plot_rerun(cmp)
    try:
        assert isinstance(fig, Figure)
        (ax,) = fig.axes
        assert ax.get_title() == "rerun of orig01: same verdict"
        assert len(ax.get_xticklabels()) == len(COMPARED)
    finally:
        plt.close(fig)
    empty = report.plot_rerun(Comparison({"run_id": "x", "status": "failed"}, []))
    try:
        assert isinstance(empty, Figure)
        assert "nothing to compare" in [t.get_text() for t in empty.axes[0].texts]
    finally:
        plt.close(empty)


# -- vm_of: the fresh VM's shape ------------------------------------------------------
def test_vm_of_a_lab_file_vm_keeps_its_whole_spec(lab_path):
    lab = load_lab(lab_path)
    vm = rerun.vm_of(lab, {"vm": "guest", "image": "trixie"})
    assert vm.name.startswith("nb-trixie-512m-1c-") and vm.name != "guest"   # its own VM
    assert (vm.spec.image, vm.spec.memory, vm.spec.cpus) == ("trixie", 512 << 20, 1)
    assert vm.spec.cmdline == "nokaslr" and vm.spec == lab.vms["guest"]
    assert vm.owner is not None                        # it dies with this process


@pytest.mark.parametrize("name, memory, cpus", [
    ("nb-trixie-1536m-2c", "1536M", 2),
    ("nb-trixie-1536m-2c-a1b2c3", "1536M", 2),           # a fresh VM's name
    ("nb-trixie-1g-4c", "1G", 4),
    ("nb-trixie-524288k-1c-0f0f0f", "512M", 1),
    ("nb-bookworm-1g-4c", "1536M", 2),                   # another image's: the default
    ("nb-trixie-1g", "1536M", 2),                        # not a shape name
    ("old-vm", "1536M", 2),                              # gone from lab.yml
    ("", "1536M", 2),
])
def test_vm_of_reads_the_shape_from_a_notebook_vm_name(lab_path, name, memory, cpus):
    vm = rerun.vm_of(load_lab(lab_path), {"vm": name, "image": "trixie"})
    assert (vm.spec.image, vm.spec.memory, vm.spec.cpus) == ("trixie", parse_size(memory), cpus)
    assert vm.owner is not None and vm.spec.cmdline == ""


def test_vm_of_a_lab_vm_that_now_boots_another_image(lab_path):
    """lab.yml's VM of that name boots another image now: the run's image
    is what is repeated, in its default shape."""
    path = lab_path
    path.write_text(path.read_text().replace(
        "images:\n", "images:\n  bookworm:\n    suite: bookworm\n"))
    vm = rerun.vm_of(load_lab(path), {"vm": "guest", "image": "bookworm"})
    assert (vm.spec.image, vm.spec.memory, vm.spec.cpus) == ("bookworm", parse_size("1536M"), 2)


def test_vm_of_matches_the_image_as_for_shape_names_it(lab_path):
    path = lab_path
    path.write_text(path.read_text().replace(
        "images:\n", "images:\n  deb_13:\n    suite: trixie\n"))
    lab = load_lab(path)
    named = VM.for_shape(lab, "deb_13", "1G", 3).name
    assert named == "nb-deb-13-1g-3c"                   # '_' is not in a VM name
    vm = rerun.vm_of(lab, {"vm": named + "-abcdef", "image": "deb_13"})
    assert (vm.spec.image, vm.spec.memory, vm.spec.cpus) == ("deb_13", 1 << 30, 3)


# -- check_unchanged ------------------------------------------------------------------
def fresh_vm(lab_path: Path, stored: dict) -> VM:
    return rerun.vm_of(load_lab(lab_path), stored)


def refusal(lab_path: Path, **then) -> str:
    stored = original(lab_path, **then)
    with pytest.raises(RerunError) as exc:
        rerun.check_unchanged(fresh_vm(lab_path, stored), stored)
    return str(exc.value)


REBUILD = ("rebuild with 'uffdlab image build --locked', or import the image it used "
           "('uffdlab image import')")


def test_check_unchanged_passes_the_same_guest(lab_path):
    stored = original(lab_path)
    assert rerun.check_unchanged(fresh_vm(lab_path, stored), stored) is None


def test_check_unchanged_skips_what_an_older_run_did_not_record(lab_path):
    stored = original(lab_path, image_content=None, tools_digest=None, qemu=None)
    assert stored["qemu"] is None
    rerun.check_unchanged(fresh_vm(lab_path, stored), stored)


def test_check_unchanged_refuses_another_image_content(lab_path):
    now = ImageStore(load_lab(lab_path)).image("trixie").content_hash
    assert refusal(lab_path, image_content="c" * 32) == (
        f"run orig01 cannot be repeated as it was: the image's content (and kernel build): "
        f"{'c' * 32} then, {now} now. To repeat it, {REBUILD}")


def test_check_unchanged_refuses_another_kernel_build(tmp_path, debian):
    """A local kernel: the run recorded its digest with the image's content;
    a rebuilt bzImage at the same path is another guest."""
    bz = tmp_path / "bzImage"
    header = bytearray(0x400)
    header[0x202:0x206] = b"HdrS"
    bz.write_bytes(bytes(header) + b"kernel one")
    path = make_lab(tmp_path)
    path.write_text(path.read_text().replace(
        "suite: trixie\n", f"suite: trixie\n    kernel: {{vmlinuz: {bz}, initrd: null}}\n", 1))
    ImageStore(load_lab(path)).build("trixie")
    stored = original(path)
    then = stored["image_content"]
    vm = fresh_vm(path, stored)
    assert "+" in then                                  # content + kernel digest
    rerun.check_unchanged(vm, stored)
    bz.write_bytes(bytes(header) + b"kernel two")       # rebuilt since
    with pytest.raises(RerunError) as exc:
        rerun.check_unchanged(vm, stored)
    content, _, kernel = then.partition("+")
    msg = str(exc.value)
    assert msg.startswith(f"run orig01 cannot be repeated as it was: the image's content (and "
                          f"kernel build): {then} then, {content}+")
    assert not msg.split(" then, ")[1].startswith(f"{content}+{kernel} ")
    assert msg.endswith(REBUILD)


def test_check_unchanged_refuses_other_guest_tools(lab_path):
    assert refusal(lab_path, tools_digest="0" * 16) == (
        f"run orig01 cannot be repeated as it was: the guest tools: {'0' * 16} then, "
        f"{tools_digest()} now. To repeat it, {REBUILD}")


def test_check_unchanged_refuses_another_qemu(lab_path):
    assert refusal(lab_path, qemu="QEMU emulator version 7.2.0") == (
        f"run orig01 cannot be repeated as it was: QEMU: QEMU emulator version 7.2.0 then, "
        f"{QEMU} now. To repeat it, {REBUILD}")


def test_check_unchanged_refuses_kvm_run_under_tcg(lab_path):
    assert refusal(lab_path, accel="kvm") == (
        "run orig01 cannot be repeated as it was: the accelerator: kvm then, tcg now. To "
        "repeat it, run it under kvm (lab.yml says accel: tcg; requested in lab.yml)")


def test_check_unchanged_refuses_tcg_run_under_kvm(lab_path):
    lab_path.write_text(lab_path.read_text().replace("accel: tcg", "accel: kvm"))
    assert refusal(lab_path, accel="tcg") == (
        "run orig01 cannot be repeated as it was: the accelerator: tcg then, kvm now. To "
        "repeat it, run it under tcg (lab.yml says accel: kvm; requested in lab.yml)")


def test_check_unchanged_names_everything_that_changed(lab_path):
    msg = refusal(lab_path, accel="kvm", qemu="QEMU emulator version 7.2.0")
    assert msg == (f"run orig01 cannot be repeated as it was: QEMU: QEMU emulator version "
                   f"7.2.0 then, {QEMU} now; the accelerator: kvm then, tcg now. To repeat "
                   f"it, {REBUILD}; run it under kvm (lab.yml says accel: tcg; requested in "
                   f"lab.yml)")


# -- uffdlab rerun ------------------------------------------------------------------
class FakeRuns:
    """runner.run: the repeats' RunResults in turn, as a VM would give them."""

    def __init__(self, *summaries):
        self.summaries = itertools.cycle(summaries or [SUMMARY_S3])
        self.calls: list[dict] = []

    def __call__(self, vm, scenario, params=None, timeout=None, rerun_of=None, *more, **kw):
        self.calls.append({"vm": vm.name, "spec": vm.spec, "scenario": scenario,
                           "params": params, "timeout": timeout, "rerun_of": rerun_of})
        return make_result(f"rep{len(self.calls):02d}", summary=next(self.summaries),
                           vm=vm.name, rerun_of=rerun_of, params=params)


@pytest.fixture
def fake_runs(monkeypatch):
    def install(*summaries) -> FakeRuns:
        fake = FakeRuns(*summaries)
        monkeypatch.setattr(runner, "run", fake)
        return fake
    return install


@pytest.fixture
def downs(monkeypatch) -> list[str]:
    """The VMs rerun stops (none is running: nothing booted)."""
    stopped: list[str] = []
    real = VM.down

    def down(self):
        stopped.append(self.name)
        return real(self)
    monkeypatch.setattr(VM, "down", down)
    return stopped


def test_cli_rerun_repeats_three_times_by_default(lab_path, fake_runs, downs, capsys):
    orig = original(lab_path)
    fake = fake_runs()
    code, out, err = run_cli(capsys, "--lab", str(lab_path), "rerun", "orig01")
    assert code == EXIT_OK, err
    assert len(fake.calls) == 3
    (name,) = {c["vm"] for c in fake.calls}
    assert name.startswith("nb-trixie-512m-1c-") and downs == [name]
    assert all(c["scenario"] == "S3" and c["rerun_of"] == "orig01" for c in fake.calls)
    # the stored parameters, resolved as a run resolves them
    assert all(c["params"].items() >= orig["params"].items() for c in fake.calls)
    assert all(c["spec"].cmdline == "nokaslr" for c in fake.calls)
    lines = out.splitlines()
    assert lines[-2].startswith("rerun of orig01 (S3 on 6.12.38+deb13-cloud-amd64): 3 repeats, "
                                "the same verdict")
    assert lines[-1] == "repeats stored: rep01 rep02 rep03"
    assert "original within" in out
    with ResultsDB(load_lab(lab_path).results_path, readonly=True) as db:
        linked = sorted(r["run_id"] for r in db.runs() if r["rerun_of"] == "orig01")
    assert linked == ["rep01", "rep02", "rep03"]


def test_cli_rerun_times(lab_path, fake_runs, downs, capsys):
    original(lab_path)
    fake = fake_runs()
    code, out, _ = run_cli(capsys, "--lab", str(lab_path), "rerun", "orig01", "--times", "1")
    assert code == EXIT_OK and len(fake.calls) == 1
    assert "one repeat has no spread (it takes at least 2: --times 3)" in out


def test_cli_rerun_another_verdict_exits_unexpected(lab_path, fake_runs, downs, capsys):
    original(lab_path)
    fake_runs(SUMMARY_S3, SUMMARY_S5)                    # the second repeat is inconsistent
    code, out, _ = run_cli(capsys, "--lab", str(lab_path), "rerun", "orig01", "--times", "2")
    assert code == EXIT_UNEXPECTED == 3
    assert "2 repeats, a DIFFERENT verdict" in out


def test_cli_rerun_a_failed_repeat_exits_fail(lab_path, fake_runs, downs, capsys):
    original(lab_path)
    fake_runs(SUMMARY_S3, None)                          # no summary: the repeat failed
    code, out, _ = run_cli(capsys, "--lab", str(lab_path), "rerun", "orig01", "--times", "2")
    assert code == EXIT_FAIL == 1
    assert out.splitlines()[-1] == "repeats stored: rep01 rep02"
    assert len(downs) == 1


def test_cli_rerun_refused_runs_nothing(lab_path, fake_runs, downs, capsys):
    original(lab_path, qemu="QEMU emulator version 7.2.0")
    fake = fake_runs()
    code, out, err = run_cli(capsys, "--lab", str(lab_path), "rerun", "orig01")
    assert (code, out, fake.calls) == (EXIT_FAIL, "", [])
    assert err.splitlines()[-1] == (
        f"uffdlab: RerunError: run orig01 cannot be repeated as it was: QEMU: QEMU emulator "
        f"version 7.2.0 then, {QEMU} now. To repeat it, {REBUILD}")


def test_cli_rerun_of_an_unknown_run(lab_path, fake_runs, capsys):
    original(lab_path)
    fake = fake_runs()
    code, out, err = run_cli(capsys, "--lab", str(lab_path), "rerun", "nope")
    assert (code, out, fake.calls) == (EXIT_CONFIG, "", [])
    assert err == f"uffdlab: rerun: no run 'nope' in {load_lab(lab_path).results_path}\n"


def test_cli_rerun_without_a_results_database(lab_path, fake_runs, capsys):
    fake = fake_runs()
    code, out, err = run_cli(capsys, "--lab", str(lab_path), "rerun", "orig01")
    assert (code, out, fake.calls) == (EXIT_CONFIG, "", [])
    assert err.startswith("uffdlab: rerun: ") and "no results database at" in err


@pytest.mark.parametrize("times, message", [
    ("0", "expected 1 to 100 repeats, got '0'"),
    ("101", "expected 1 to 100 repeats, got '101'"),
    ("-3", "expected 1 to 100 repeats, got '-3'"),
    ("x", "expected a whole number of repeats, got 'x'"),
    ("2.5", "expected a whole number of repeats, got '2.5'"),
])
def test_cli_rerun_refuses_bad_times(lab_path, fake_runs, capsys, times, message):
    original(lab_path)
    fake = fake_runs()
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, "--lab", str(lab_path), "rerun", "orig01", f"--times={times}")
    assert exc.value.code == EXIT_CONFIG
    _, err = capsys.readouterr()
    assert err.splitlines()[-1] == f"uffdlab rerun: error: argument --times: {message}"
    assert fake.calls == []


def test_rerun_refuses_bad_times_before_anything(lab_path, fake_runs):
    fake = fake_runs()
    for times in (0, 101):
        with pytest.raises(RerunError, match=f"--times: expected 1 to 100 repeats, got {times}"):
            rerun.rerun(load_lab(lab_path), "orig01", times)
    assert fake.calls == []


def test_cli_rerun_help_gives_the_default_and_the_minimum_for_a_spread(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, "rerun", "--help")
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr()[0].split())
    assert "(default 3)" in help_text and "needs at least 2" in help_text


def test_rerun_defaults_to_three_repeats(lab_path, fake_runs, downs):
    original(lab_path)
    fake = fake_runs()
    cmp = rerun.rerun(load_lab(lab_path), "orig01")
    assert len(cmp.runs) == len(fake.calls) == 3 and cmp.same_verdict and cmp.all_ran


# -- results show: what reproduces a run -----------------------------------------------
def test_results_show_names_what_reproduces_a_run(lab_path):
    orig = original(lab_path, lock_hash="0123abcd01234567")
    again = store(lab_path, make_result("rep01", **as_now(lab_path, rerun_of="orig01")))
    text = format_run(orig)
    lines = text.splitlines()
    assert f"  content      image {orig['image_content']}, guest tools digest " \
           f"{tools_digest()}" in lines
    assert f"  QEMU         {QEMU}" in lines
    assert "  lab.lock     0123abcd01234567" in lines
    assert "  rerun of     -" in lines
    lines = format_run(again).splitlines()
    assert "  rerun of     orig01" in lines
    assert "  lab.lock     none (no lab.lock when it ran, or not recorded)" in lines
    old = format_run({**orig, "image_content": None, "tools_digest": None, "qemu": None})
    assert "  content      image -, guest tools digest -" in old.splitlines()
    assert "  QEMU         -" in old.splitlines()
