# SPDX-License-Identifier: MIT
"""The report layer: tables, verdicts and figures from fixture runs, no VM.

Runs are the ones test_results.py stores (real uffd-snapshot summaries), read
back in each shape notebooks hand to reports."""
from __future__ import annotations

import io

import pandas as pd
import pytest

from tests.unit.test_results import FLOORS, SUMMARY_S3, SUMMARY_S5, make_result
from uffdlab import report, scenarios
from uffdlab.events import Event
from uffdlab.model import Kind
from uffdlab.report.runs import RunView
from uffdlab.results import ResultsDB

T0 = 1_750_000_000.0


def s3(run_id="r1", **kw):
    return make_result(run_id, started=T0 + 1, **kw)


def s5(run_id="r2", **kw):
    return make_result(run_id, "S5", "unregistered-writer", SUMMARY_S5, started=T0 + 2,
                       expect_consistent=False, **kw)


def timed_out(run_id="r3"):
    return make_result(run_id, "S3", "multi-writer", None, started=T0 + 3, status="timeout",
                       error="timed out after 100 s\nsecond line", stderr="tool said no",
                       serial_log="\n".join(f"console {i}" for i in range(100)))


@pytest.fixture
def stored(tmp_path):
    """The same three runs as ResultsDB keeps them: get() dicts and Frames."""
    with ResultsDB(tmp_path / "results.sqlite") as db:
        for r in (s3(), s5(), timed_out()):
            db.store(r)
        yield {rid: db.get(rid) for rid in ("r1", "r2", "r3")}, db.frames(), db.runs()


def probe_for(release: str) -> dict:
    """A uffd-probe record of a kernel that has everything features.h dates
    at or before `release`."""
    have = lambda first: report.tables.version_key(first) <= report.tables.version_key(  # noqa: E731
        ".".join(release.split(".")[:2]))
    bits = {n: f for n, f in scenarios.first_kernels().items()
            if n not in ("USER_MODE_ONLY", "DEV_USERFAULTFD", "PAGEMAP_SCAN")}
    return {"type": "probe", "kernel": release,
            "features": {n: have(f) for n, f in bits.items()},
            "feature_min_kernel": bits,
            "user_mode_only": True, "dev_userfaultfd": have("6.1"),
            "pagemap_scan": have("6.7"),
            "wp_register": {"memfd": True, "shmem": True, "hugetlbfs": None, "anon": True}}


BOOKWORM, TRIXIE = probe_for("6.1.0-37-cloud-amd64"), probe_for("6.12.38+deb13-cloud-amd64")


# -- the one input adapter ---------------------------------------------------------

def test_every_shape_reads_as_the_same_run(stored):
    got, frames, rows = stored
    shapes = {"RunResult": s3(), "get() dict": got["r1"], "runs() dict": rows[0],
              "load() row": frames.runs.iloc[0],
              "indexed row": frames.runs.set_index("run_id").loc["r1"]}
    for shape, source in shapes.items():
        run = report.as_run(source)
        assert isinstance(run, RunView), shape
        assert run.run_id == "r1" and run.status == "ok", shape
        assert run.metric("lat_p99_us") == pytest.approx(918.783), shape
        assert run.metric("stall_max_ms") == pytest.approx(2.385), shape
        assert run.consistent is True and run.expect_consistent is True, shape
        assert run.params["writers"] == 4, shape
    with_hist = [report.as_run(s3()), report.as_run(got["r1"]), report.as_runs(frames)[0]]
    assert all(len(v.latency) == 5 and sum(c for _, c in v.latency) == 301 for v in with_hist)
    with pytest.raises(TypeError, match="expected one run"):
        report.as_run(42)


def test_as_runs_labels(stored):
    _, frames, _ = stored
    views = report.as_runs(frames)
    assert [v.run_id for v in views] == ["r1", "r2", "r3"]
    # r1 and r3 are both "S3 multi-writer" with the same parameters: the run id tells them apart
    assert [v.label for v in views] == ["S3 multi-writer r1", "S5 unregistered-writer r2",
                                        "S3 multi-writer r3"]
    assert views[1].mismatches_by_cause == {"stale": 8, "unregistered": 2040}
    assert [v.label for v in report.as_runs({"mine": s3()})] == ["mine"]
    a, b = s3("a", params={"writers": 2}), s3("b", params={"writers": 8})
    assert [v.label for v in report.as_runs([a, b])] == ["S3 uffd-wp writers=2",
                                                          "S3 uffd-wp writers=8"]
    assert len(report.as_runs(frames.runs)) == 3 and len(report.as_runs(s3())) == 1


def test_results_frames_api_is_what_load_returns(stored, tmp_path):
    from uffdlab.results import load
    _, frames, _ = stored
    loaded = load(tmp_path / "results.sqlite")
    pd.testing.assert_frame_equal(frames.runs, loaded.runs)
    pd.testing.assert_frame_equal(frames.latency, loaded.latency)
    with ResultsDB(tmp_path / "results.sqlite", readonly=True) as db:
        part = db.frames(scenario="S3", status="timeout")
    assert list(part.runs["run_id"]) == ["r3"] and part.latency.empty


def test_subset_keeps_only_those_runs(stored):
    _, frames, _ = stored
    part = report.subset(frames, ["r2", None])
    assert list(part.runs["run_id"]) == ["r2"]
    assert set(part.latency["run_id"]) == {"r2"} and set(part.mismatches["run_id"]) == {"r2"}


# -- tables -------------------------------------------------------------------------

def test_summary_table_figures(stored):
    got, frames, _ = stored
    for source in (s3(), got["r1"], frames.runs.iloc[0]):
        t = report.summary_table(source)
        assert t.loc["fault latency p99", "value"] == "919"
        assert t.loc["fault latency p99", "unit"] == "us"
        assert t.loc["RAM", "value"] == "256" and t.loc["RAM", "unit"] == "MiB"
        assert t.loc["writer ops/s before", "value"] == "1,680,684"
        assert t.loc["writer stall max", "value"] == "2.38"
        assert t.loc["consistent", "value"] == "yes"
        assert t.loc["scenario", "value"] == "S3 multi-writer"
    assert report.summary_table(s3()).loc["faults per process", "value"] == "151 / 50 / 97 / 3"
    t5 = report.summary_table(s5())
    assert t5.loc["mismatches by cause", "value"] == "unregistered 2,040, stale 8"
    assert t5.loc["consistent", "value"] == "no"
    failed = report.summary_table(timed_out())
    assert failed.loc["status", "value"] == "timeout"
    assert failed.loc["fault latency p99", "value"] == "–"
    assert "arming (protect)" not in failed.index           # optional rows left out
    assert failed.loc["error", "value"].startswith("timed out after 100 s")


def test_summary_compares_the_run_with_its_guests_floors(tmp_path):
    """With floors, the summary's last rows are bench/snapshot.py's ratios
    for this run; stored and read back, they are the same."""
    run = s3(floors=FLOORS)
    with ResultsDB(tmp_path / "r.sqlite") as db:
        db.store(run)
        stored = db.get("r1")
    for source in (run, stored):
        t = report.summary_table(source)
        assert t.loc["guest memcpy (floor)", ["value", "unit"]].tolist() == ["0.45", "GB/s"]
        # 256 MiB in 412.733 ms is 0.650 GB/s, over 0.45 GB/s
        assert t.loc["snapshot throughput vs guest memcpy", "value"] == "1.45"
        assert t.loc["fault p50 vs guest round trip", "value"] == "1.94"   # 215.871 / 111
        assert "paused copy vs guest memcpy" not in t.index      # stop-the-world only
    assert report.floor_rows(s3()) == []
    assert "guest memcpy (floor)" not in report.summary_table(s3()).index


def test_floor_rows_of_a_stop_the_world_run_have_the_paused_copy():
    stw = dict(SUMMARY_S3, strategy="stop-the-world", faults_total=0, copy_ms=268.435456)
    rows = {label: (v, unit) for label, v, unit in
            report.floor_rows(make_result("w", "S1", summary=stw, floors=FLOORS))}
    assert rows["paused copy vs guest memcpy"] == (round(1.0 / 0.45, 3), "x memcpy")
    assert "fault p50 vs guest round trip" not in rows          # no faults to compare


def test_provenance():
    t = report.provenance(s3())
    assert t.loc["run id", "value"] == "r1"
    assert t.loc["kernel", "value"] == "6.12.38+deb13-cloud-amd64"
    assert t.loc["accel", "value"] == "tcg"
    assert t.loc["command", "value"].startswith("/opt/uffdlab/bin/uffd-snapshot")
    assert t.loc["started", "value"].startswith("2025-06-")
    # what a rerun is held to; a run without them says so, not blank
    assert t.loc["lab.lock", "value"] == "none ('uffdlab lock' writes one)"
    assert [t.loc[k, "value"] for k in ("image content", "guest tools digest", "QEMU",
                                        "rerun of")] == ["–"] * 4
    again = report.provenance(s3("r9", lock_hash="0123abcd", image_content="c0ffee+k1",
                                 tools_digest="t00l", qemu="QEMU emulator version 7.2.0",
                                 rerun_of="r1"))
    assert [again.loc[k, "value"] for k in ("lab.lock", "image content", "guest tools digest",
                                            "QEMU", "rerun of")] == [
        "0123abcd", "c0ffee+k1", "t00l", "QEMU emulator version 7.2.0", "r1"]


def test_verdicts(stored):
    got, frames, _ = stored
    assert report.verdict(s3()) == "consistent ✓ as expected"
    assert report.verdict(s5()) == ("INCONSISTENT: 2,048 pages, causes unregistered (2040), "
                                    "stale (8) (expected)")
    assert report.verdict(got["r2"]) == report.verdict(s5())
    assert report.verdict(report.as_runs(frames)[1]) == report.verdict(s5())
    # a load() row has no mismatch rows of its own
    assert report.verdict(frames.runs.iloc[1]) == ("INCONSISTENT: 2,048 pages, cause unknown "
                                                   "(expected)")
    assert report.verdict(make_result("x", summary=SUMMARY_S5)) == (
        "INCONSISTENT: 2,048 pages, causes unregistered (2040), stale (8) (UNEXPECTED)")
    assert report.verdict(make_result("y", expect_consistent=False)) == "consistent ✗ (UNEXPECTED)"
    assert report.verdict(make_result("z", expect_consistent=None)) == "consistent ✓"
    assert report.verdict(timed_out()) == "TIMEOUT: timed out after 100 s"
    assert report.verdict(make_result("f", summary=None, error=None)) == "FAILED: no error message"
    assert report.verdict({**got["r1"], "summary": None, "consistent": None}) == "not verified"


def test_failure_text():
    text = report.failure_text(timed_out(), serial_lines=3)
    assert text.startswith("timeout: timed out after 100 s")
    assert "--- stderr ---\ntool said no" in text
    assert text.endswith("console 97\nconsole 98\nconsole 99")
    assert "console 96" not in text


def test_feature_table_side_by_side():
    t = report.feature_table({"bookworm": BOOKWORM, "trixie": TRIXIE})
    bw, tx = "bookworm (6.1.0-37-cloud-amd64)", "trixie (6.12.38+deb13-cloud-amd64)"
    assert list(t.columns) == ["first kernel", "what for", bw, tx]
    assert t.loc["UFFD_FEATURE_WP_ASYNC", "first kernel"] == "6.7"
    assert (t.loc["UFFD_FEATURE_WP_ASYNC", bw], t.loc["UFFD_FEATURE_WP_ASYNC", tx]) == ("✗", "✓")
    assert t.loc["UFFD_FEATURE_WP_HUGETLBFS_SHMEM", bw] == "✓"
    assert t.loc["/dev/userfaultfd", "first kernel"] == "6.1"     # features.h, not a copy
    assert t.loc["PAGEMAP_SCAN ioctl", bw] == "✗"
    assert t.loc["WP register on hugetlbfs", tx] == "–"
    firsts = [report.tables.version_key(v) for v in t["first kernel"]]
    assert firsts == sorted(firsts)                                # ordered by release
    one = report.feature_table(TRIXIE)
    assert list(one.columns)[-1] == "guest (6.12.38+deb13-cloud-amd64)"
    with pytest.raises(ValueError):
        report.feature_table({})


def test_runs_table(stored):
    _, frames, _ = stored
    t = report.runs_table(frames.runs)
    assert list(t["run_id"]) == ["r1", "r2", "r3"]
    assert t["verdict"].iloc[0] == "consistent ✓ as expected"
    assert t["verdict"].iloc[2] == "TIMEOUT: timed out after 100 s"
    assert "param_writers" not in t.columns                # the same in every run
    assert report.runs_table(frames.runs.iloc[0:0]).empty


# -- figures ---------------------------------------------------------------------------

def labelled_lines(fig):
    return [ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]


def test_plot_latency_cdf(stored):
    _, frames, _ = stored
    fig = report.plot_latency_cdf({"S3": s3(), "S5": s5()})
    lines = labelled_lines(fig)
    assert [ln.get_label() for ln in lines] == ["S3 (301 faults)", "S5 (59 faults)"]
    assert lines[0].get_ydata()[-1] == pytest.approx(1.0)
    # Frames: r3 timed out without faults, so two lines
    assert len(labelled_lines(report.plot_latency_cdf(frames))) == 2
    empty = report.plot_latency_cdf([timed_out()])
    assert not labelled_lines(empty)
    assert "no write-protect faults" in empty.axes[0].texts[0].get_text()


def test_plot_stall_vs_duration():
    fig = report.plot_stall_vs_duration({"S3": s3(), "S5": s5()})
    left, right = fig.axes
    assert [b.get_height() for b in left.patches] == pytest.approx([412.733, 412.733])
    assert len(right.patches) == 4                         # stall and pause per run
    assert [t.get_text() for t in left.get_xticklabels()] == ["S3", "S5"]
    assert "no runs" in report.plot_stall_vs_duration([]).axes[0].texts[0].get_text()


def test_plot_throughput():
    fig = report.plot_throughput({"S3": s3(params={"rate": "200000"})})
    ax = fig.axes[0]
    assert [b.get_height() for b in ax.patches] == pytest.approx([1680684.188, 132478.992])
    assert any("requested 200,000/s" in t.get_text() for t in ax.texts)


def test_plot_sweep():
    rows = [dict(run_id=f"r{i}", param_writers=w, param_strategy=s, snapshot_ms=float(w * k),
                 lat_p99_us=float(w))
            for i, (w, s, k) in enumerate([(1, "uffd-wp", 10), (2, "uffd-wp", 10),
                                           (1, "stop-the-world", 20), (2, "stop-the-world", 20)])]
    fig = report.plot_sweep(pd.DataFrame(rows))
    assert len(fig.axes) == 2
    lines = fig.axes[0].get_lines()
    assert sorted(ln.get_label() for ln in lines) == ["stop-the-world", "uffd-wp"]
    assert list(next(ln for ln in lines if ln.get_label() == "uffd-wp").get_ydata()) == [10, 20]
    assert "no column" in report.plot_sweep(pd.DataFrame(rows), x="param_size").axes[0] \
        .texts[0].get_text()


# -- progress ------------------------------------------------------------------------

def test_notebook_progress_lines_and_live_line():
    out = io.StringIO()
    progress = report.NotebookProgress(stream=out)
    progress(Event(Kind.BOOTING, "vm1", "booting trixie", time=T0))
    progress(Event(Kind.PROGRESS, "vm1", "", {"done": 5, "total": 10, "faults": 2,
                                              "phase": "copy"}, time=T0))
    progress(Event(Kind.TASK, "vm1", "install tools", {"state": "ok"}, time=T0))
    progress(Event(Kind.TASK, "vm1", "build tools", {"state": "failed"}, time=T0))
    text = out.getvalue()
    assert "[vm1] booting: booting trixie\n" in text
    assert "\r" in text and "5/10 pages, 2 faults" in text
    assert "ansible task 1: install tools" in text          # live line
    assert text.endswith("[vm1] task: build tools\n")       # a failure in full


def test_verdicts_table_and_the_stw_vs_wp_story():
    stw = s3()
    stw.summary = {**stw.summary, "pause_ms": 120.0, "writer_stall_max_ms": 120.0,
                   "snapshot_ms": 118.0}
    wp = s3()
    wp.summary = {**wp.summary, "pause_ms": 0.4, "writer_stall_max_ms": 2.5,
                  "snapshot_ms": 300.0}
    text = report.explain_stw_vs_wp(stw, wp)
    assert "**120.0 ms**, the whole copy" in text and "**0.4 ms**" in text
    assert "went from **120.0 ms** to **2.5 ms**" in text
    assert "took **300 ms** instead of **118 ms**" in text
    slower = s3()
    slower.summary = {**slower.summary, "writer_stall_max_ms": 500.0}
    assert "was not shorter with uffd-wp" in report.explain_stw_vs_wp(stw, slower)
    table = report.verdicts_table([stw, timed_out()])
    assert list(table.columns) == ["writers", "mismatched pages", "causes", "verdict"]
    assert table["verdict"].tolist()[1] == "TIMEOUT: timed out after 100 s"
    assert table["writers"].tolist()[0] == stw.params["writers"]
