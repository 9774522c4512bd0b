# SPDX-License-Identifier: MIT
"""The results database: real SQLite in tmp_path, no VMs."""
from __future__ import annotations

import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from uffdlab import results
from uffdlab.model import RunResult
from uffdlab.results import (
    SCHEMA_VERSION,
    DuplicateRunError,
    Frames,
    ResultsDB,
    ResultsError,
    RunNotFoundError,
    format_table,
    load,
)

KERNEL = "6.12.38+deb13-cloud-amd64"

# Shaped after real uffd-snapshot summaries (memfd, 2 writers, TCG-ish figures).
SUMMARY_S3 = {
    "type": "summary", "tool": "uffd-snapshot", "strategy": "uffd-wp", "backing": "memfd",
    "kernel": KERNEL, "uffd_source": "syscall", "features_used": ["WP_HUGETLBFS_SHMEM"],
    "writers": 4, "pages": 65536, "page_size": 4096, "bytes": 268435456,
    "snapshot_ms": 412.733, "copy_ms": 398.101, "throughput_mb_s": 620.24,
    "arm_ms": 6.1, "pause_ms": 7.42, "disarm_ms": 0, "inject_wait_ms": 0,
    "inject_sync_timeout": False, "faults_per_process": [151, 50, 97, 3],
    "faults_total": 301, "prearm_faults_per_process": [1, 1, 0, 0],
    "prearm_faults_total": 2, "faults_after_copy": 0,
    "fault_latency_us": {"count": 301, "p50": 215.871, "p90": 331.743, "p99": 918.783,
                         "p999": 1638.399, "max": 1640.147, "mean": 254.716},
    "fault_latency_hist": {"bounds_us": [131.072, 262.144, 524.288, 1048.576, 2097.152],
                           "counts": [40, 150, 90, 18, 3]},
    "writer_stall_max_ms": 2.385, "writer_stall_total_ms": 45.393,
    "writer_stall_max_ms_per_writer": [1.603, 2.385, 1.1, 0.9],
    "writer_ops_per_s_before": 1680684.188, "writer_ops_per_s_during": 132478.992,
    "writer_ops_total": 1442927, "pages_populated": 0, "populate_ms": 0,
    "populate_rss_kb_delta": 0, "populate_vmpte_kb_delta": 0,
    "rss_kb_delta": 1048610, "vmpte_kb_delta": 2114, "snapshot_rss_kb_delta": 0,
    "snapshot_vmpte_kb_delta": 0, "injections": {}, "verify": "stamp",
    "consistent": True, "mismatched_pages": 0, "mismatches_by_cause": {},
    "verify_ms": 30.2, "verify_ref_ms": 0, "elapsed_ms": 10250.61,
}

SUMMARY_S5 = {
    **copy.deepcopy(SUMMARY_S3),
    "writers": 4, "faults_per_process": [39, 12, 8, 0], "faults_total": 59,
    "fault_latency_us": {"count": 59, "p50": 209.727, "p90": 313.823, "p99": 559.091,
                         "p999": 559.091, "max": 559.091, "mean": 231.946},
    "fault_latency_hist": {"bounds_us": [262.144, 1048.576], "counts": [50, 9]},
    "injections": {"unregistered_writers": 1},
    "consistent": False, "mismatched_pages": 2048,
    "mismatches_by_cause": {"unregistered": 2040, "stale": 8},
    "first_mismatched_pages": [0, 1, 2, 3, 4, 5, 6, 7],
    "mismatch_samples": [{"page": 0, "cause": "unregistered", "zero": False, "word": 1,
                          "snapshot": {"raw": "0xe9e57900000dd749", "epoch": 1, "how": 1,
                                       "seq": 907081}}],
}


def make_result(run_id: str, scenario="S3", name="multi-writer", summary=SUMMARY_S3,
                started=1_750_000_000.0, vm="t-trixie", status=None, params=None,
                expect_consistent=True, **kw) -> RunResult:
    summary = copy.deepcopy(summary)
    if status is None:
        status = ("failed" if summary is None
                  else "ok" if summary.get("consistent") else "inconsistent")
    params = params if params is not None else {
        "size": "256M", "writers": 4, "backing": "memfd", "duration": 10, "rate": "max",
        "verify": "stamp"}
    config = None if summary is None else {"type": "config", "tool": "uffd-snapshot",
                                           "version": 1, "kernel": KERNEL,
                                           "writer_pids": [5880, 5881]}
    lines = [json.dumps(config)] if config else []
    lines += [json.dumps({"type": "progress", "phase": "copy", "pages_copied": i * 1000,
                          "pages_total": 65536, "faults": i, "writer_ops": 10 * i,
                          "elapsed_ms": 100 * i}) for i in range(3)]
    if summary:
        lines.append(json.dumps(summary))
    fields = dict(
        run_id=run_id, started=started, lab="uffd-lab-tests", vm=vm, image="trixie",
        image_key="3f9a0c1d2e4b", kernel=KERNEL, accel="tcg",
        tools_version="bfcf273+dirty", scenario=scenario, scenario_name=name, params=params,
        command="/opt/uffdlab/bin/uffd-snapshot --strategy uffd-wp --writers 4 --verify",
        status=status, duration_s=14.25, exit_code=0 if summary else None, error=None,
        expect_consistent=expect_consistent, config=config, summary=summary,
        jsonl="\n".join(lines), stderr="", serial_log=None)
    fields.update(kw)
    return RunResult(**fields)


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "nested" / "dir" / "lab.sqlite"


@pytest.fixture
def db(db_path):
    with ResultsDB(db_path) as d:
        yield d


def raw(path) -> sqlite3.Connection:
    return sqlite3.connect(path)


# -- store and read back --------------------------------------------------------

def test_creates_parents_wal_and_schema_version(db, db_path):
    assert db_path.is_file()
    c = raw(db_path)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "latency_hist", "faults", "mismatches", "logs"} <= tables
    assert db.schema_version == SCHEMA_VERSION


def test_store_and_read_back_full_result(db, db_path):
    r = make_result("a1b2c3d4e5f6")
    assert db.store(r) == "a1b2c3d4e5f6"

    assert db.get_result("a1b2c3d4e5f6") == r              # every field round-trips
    got = db.get("a1b2c3d4e5f6")
    assert got["status"] == "ok" and got["consistent"] is True
    assert got["expect_consistent"] is True
    assert got["summary"] == SUMMARY_S3 and got["params"]["writers"] == 4
    assert got["latency_hist"] == [{"bound_us": b, "count": c} for b, c in zip(
        SUMMARY_S3["fault_latency_hist"]["bounds_us"], SUMMARY_S3["fault_latency_hist"]["counts"])]
    assert got["faults_per_process"] == [151, 50, 97, 3]
    assert got["mismatches_by_cause"] == {}
    # the metrics are real columns
    row = raw(db_path).execute(
        "SELECT pages, bytes, snapshot_ms, throughput_mb_s, pause_ms, faults_total, "
        "lat_p50_us, lat_p90_us, lat_p99_us, lat_p999_us, lat_max_us, stall_max_ms, "
        "stall_total_ms, ops_before, ops_during, pages_populated, rss_kb_delta, "
        "vmpte_kb_delta, mismatched_pages, consistent, copy_ms, populate_ms, lat_mean_us "
        "FROM runs").fetchone()
    s, lat = SUMMARY_S3, SUMMARY_S3["fault_latency_us"]
    assert row == (s["pages"], s["bytes"], s["snapshot_ms"], s["throughput_mb_s"],
                   s["pause_ms"], s["faults_total"], lat["p50"], lat["p90"], lat["p99"],
                   lat["p999"], lat["max"], s["writer_stall_max_ms"],
                   s["writer_stall_total_ms"], s["writer_ops_per_s_before"],
                   s["writer_ops_per_s_during"], 0, s["rss_kb_delta"], s["vmpte_kb_delta"],
                   0, 1, s["copy_ms"], 0, lat["mean"])


def test_inconsistent_run_keeps_mismatches_by_cause(db):
    db.store(make_result("s5run", "S5", "unregistered-writer", SUMMARY_S5,
                         expect_consistent=False))
    got = db.get("s5run")
    assert got["status"] == "inconsistent" and got["consistent"] is False
    assert got["mismatched_pages"] == 2048
    assert got["mismatches_by_cause"] == {"stale": 8, "unregistered": 2040}
    assert got["summary"]["mismatch_samples"][0]["cause"] == "unregistered"


def test_failed_run_without_summary_is_stored_with_logs(db):
    r = make_result("failedrun01", summary=None, status="failed",
                    error="ConnectionResetError: qemu died", stderr="Killed\n",
                    serial_log="[  12.3] Out of memory: Killed process 812\n")
    db.store(r)
    got = db.get("failedrun01")
    assert got["status"] == "failed" and got["summary"] is None and got["consistent"] is None
    assert got["error"] == "ConnectionResetError: qemu died"
    assert got["serial_log"].startswith("[  12.3] Out of memory")
    assert got["stderr"] == "Killed\n" and '"phase": "copy"' in got["jsonl"]
    assert got["snapshot_ms"] is None and got["latency_hist"] == []
    assert got["faults_per_process"] == [] and got["mismatches_by_cause"] == {}
    assert db.get_result("failedrun01") == r


def test_null_metrics_verify_off_and_no_faults(db):
    s = copy.deepcopy(SUMMARY_S3)
    s.update(consistent=None, mismatched_pages=None, mismatches_by_cause=None, verify="off",
             faults_per_process=[0, 0], faults_total=0,
             fault_latency_us={k: None for k in ("p50", "p90", "p99", "p999", "max", "mean")}
             | {"count": 0},
             fault_latency_hist={"bounds_us": [], "counts": []},
             throughput_mb_s=float("nan"))
    db.store(make_result("nofaults", summary=s, status="ok"))
    got = db.get("nofaults")
    assert got["consistent"] is None and got["lat_p99_us"] is None
    assert got["throughput_mb_s"] is None and got["summary"]["throughput_mb_s"] is None
    assert got["faults_per_process"] == [0, 0] and got["latency_hist"] == []


def test_duplicate_run_id_is_an_error_unless_replace(db):
    db.store(make_result("dup"))
    with pytest.raises(DuplicateRunError, match="run dup is already in .*replace=True"):
        db.store(make_result("dup", status="failed", summary=None))
    assert db.get("dup")["status"] == "ok"                 # the first one is intact
    db.store(make_result("dup", "S5", "unregistered-writer", SUMMARY_S5), replace=True)
    got = db.get("dup")
    assert got["scenario"] == "S5" and got["mismatches_by_cause"]["unregistered"] == 2040
    assert got["faults_per_process"] == [39, 12, 8, 0]     # old child rows gone
    assert len(db.runs()) == 1


@pytest.mark.parametrize("field, value, message", [
    ("status", "weird", "status: expected one of ok, inconsistent, failed, timeout"),
    ("run_id", "", "run_id: expected a non-empty string"),
    ("scenario", "", "scenario: expected a scenario id"),
    ("started", None, "started: expected a Unix time"),
])
def test_bad_result_rejected_and_nothing_written(db, field, value, message):
    with pytest.raises(ValueError, match=message):
        r = make_result("bad")
        setattr(r, field, value)
        db.store(r)
    assert db.runs() == []


def test_get_by_prefix_and_unknown(db):
    db.store(make_result("abc111"))
    db.store(make_result("abc222", started=1_750_000_100.0))
    assert db.get("abc1")["run_id"] == "abc111"
    with pytest.raises(RunNotFoundError, match="ambiguous.*abc111"):
        db.get("abc")
    with pytest.raises(RunNotFoundError, match="no run 'zzz'"):
        db.get("zzz")
    with pytest.raises(RunNotFoundError):
        db.get("a%")                                        # LIKE wildcards are literal


# -- filters --------------------------------------------------------------------

@pytest.fixture
def filled(db):
    t = 1_750_000_000.0
    db.store(make_result("r1", "S1", "stop-the-world", started=t + 1))
    db.store(make_result("r2", "S3", "multi-writer", started=t + 2))
    db.store(make_result("r3", "S5", "unregistered-writer", SUMMARY_S5, started=t + 3,
                         expect_consistent=False, vm="t-bookworm"))
    db.store(make_result("r4", "S3", "multi-writer", None, started=t + 4, status="timeout",
                         error="timed out after 100 s", serial_log="console"))
    db.store(make_result("r5", "S3", "multi-writer", started=t + 5, vm="t-bookworm",
                         params={"size": "512M", "writers": 8}))
    return db


def ids(rows):
    return [r["run_id"] for r in rows]


def test_runs_filters(filled):
    db = filled
    assert ids(db.runs()) == ["r1", "r2", "r3", "r4", "r5"]          # oldest first
    assert ids(db.runs(last=2)) == ["r4", "r5"]                       # the newest two
    assert ids(db.runs(scenario="S3")) == ["r2", "r4", "r5"]
    assert ids(db.runs(scenario="multi-writer")) == ids(db.runs(scenario="s3"))
    assert ids(db.runs(scenario="S3", last=1)) == ["r5"]
    assert ids(db.runs(status="timeout")) == ["r4"]
    assert ids(db.runs(scenario="S3", status="ok")) == ["r2", "r5"]
    assert ids(db.runs(vm="t-bookworm")) == ["r3", "r5"]
    assert db.runs(scenario="S9") == []
    row = db.runs(last=1)[0]
    assert "summary" not in row and row["params"] == {"size": "512M", "writers": 8}
    with pytest.raises(ValueError, match="status: expected one of"):
        db.runs(status="OK!")
    with pytest.raises(ValueError, match="last: expected a positive number"):
        db.runs(last=0)


def test_format_table(filled):
    text = format_table(filled.runs())
    lines = text.splitlines()
    head = lines[0]
    for col in ("id", "time", "vm", "kernel", "accel", "scenario", "status", "snapshot ms",
                "p99 us", "max stall ms", "faults", "mismatched"):
        assert col in head
    assert len(lines) == 2 + 5
    r3 = next(line for line in lines if line.startswith("r3"))
    assert "S5 unregistered-writer" in r3 and "inconsistent" in r3 and "(!)" not in r3
    assert r3.rstrip().endswith("2048")
    r4 = next(line for line in lines if line.startswith("r4"))
    # a run with an error shows it after its status, over the metric columns
    assert r4.split("timeout", 1)[1].strip() == "timed out after 100 s"
    r2 = next(line for line in lines if line.startswith("r2"))
    assert "413" in r2 and "919" in r2 and "2.38" in r2 and "301" in r2
    assert format_table([]) == "no runs"


def test_format_table_flags_unexpected_verdict(db):
    db.store(make_result("bad3", "S3", "multi-writer", SUMMARY_S5))   # S3 inconsistent
    text = format_table(db.runs())
    assert "inconsistent (!)" in text and text.splitlines()[-1].startswith("(!)")


# -- pandas frames ----------------------------------------------------------------

def test_load_frames(filled, db_path):
    f = load(db_path)
    assert isinstance(f, Frames)
    assert list(f.runs["run_id"]) == ["r1", "r2", "r3", "r4", "r5"]
    assert f.runs["run_id"].is_unique
    assert {"param_size", "param_writers", "param_backing", "started_at", "snapshot_ms",
            "lat_p99_us", "as_expected"} <= set(f.runs.columns)
    assert "params" not in f.runs.columns and "summary" not in f.runs.columns
    assert f.runs.set_index("run_id").loc["r5", "param_writers"] == 8
    assert pd.isna(f.runs.set_index("run_id").loc["r5", "param_backing"])
    assert str(f.runs["started_at"].dt.tz) == "UTC"
    assert str(f.runs["faults_total"].dtype) == "Int64" and pd.isna(f.runs["faults_total"][3])
    assert str(f.runs["consistent"].dtype) == "boolean"
    assert list(f.runs["as_expected"].astype(object).where(f.runs["as_expected"].notna(),
                                                           None)) == [True, True, True,
                                                                      None, True]
    assert list(f.latency.columns) == ["run_id", "bound_us", "count", "cdf"]
    assert list(f.faults.columns) == ["run_id", "process", "faults"]
    assert list(f.mismatches.columns) == ["run_id", "cause", "pages"]
    # 4 runs with summaries: r1, r2, r5 (5 buckets, 4 writers) and r3 (2 buckets)
    assert len(f.latency) == 5 + 5 + 2 + 5 and len(f.faults) == 4 * 4
    assert f.mismatches.to_dict("records") == [
        {"run_id": "r3", "cause": "stale", "pages": 8},
        {"run_id": "r3", "cause": "unregistered", "pages": 2040}]
    for _, g in f.latency.groupby("run_id"):
        assert g["bound_us"].is_monotonic_increasing
        assert g["cdf"].is_monotonic_increasing
        assert g["cdf"].iloc[-1] == pytest.approx(1.0)
        assert (g["cdf"] > 0).all()
    r2 = f.latency[f.latency.run_id == "r2"]
    assert list(r2["cdf"]) == pytest.approx([40 / 301, 190 / 301, 280 / 301, 298 / 301, 1])


def test_load_filters_and_lab(filled, db_path):
    f = load(db_path, scenario="multi-writer", last=2)
    assert list(f.runs["run_id"]) == ["r4", "r5"]
    assert set(f.latency["run_id"]) == {"r5"} and set(f.faults["run_id"]) == {"r5"}
    f = load(str(db_path), vm="t-bookworm")
    assert list(f.runs["run_id"]) == ["r3", "r5"]
    assert set(f.mismatches["run_id"]) == {"r3"}

    class FakeLab:                 # uffdlab.config.Lab exposes results_path
        results_path = db_path
    assert list(load(FakeLab(), scenario="S1").runs["run_id"]) == ["r1"]
    f = load(db_path, scenario="S9")
    assert f.runs.empty and f.latency.empty and "cdf" in f.latency.columns


def test_load_with_a_real_lab(tmp_path):
    from uffdlab.config import lab_from_dict
    lab = lab_from_dict({"results": "out/results.sqlite", "images": {"trixie": {"suite": "trixie"}},
                         "vms": {"guest": {"image": "trixie", "memory": "1G"}}},
                        source=tmp_path / "lab.yml")
    with ResultsDB(lab.results_path) as db:
        db.store(make_result("labrun"))
    assert (tmp_path / "out" / "results.sqlite").is_file()
    assert list(load(lab).runs["run_id"]) == ["labrun"]


def test_load_missing_database(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results database"):
        load(tmp_path / "nope.sqlite")
    assert not (tmp_path / "nope.sqlite").exists()


# -- schema versions ----------------------------------------------------------------

# The v1 schema, written out by hand as the first release created it.
V1_SCHEMA = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, started REAL NOT NULL,
    lab TEXT, vm TEXT, image TEXT, image_key TEXT, kernel TEXT, accel TEXT,
    tools_version TEXT, scenario TEXT NOT NULL, scenario_name TEXT,
    params TEXT NOT NULL DEFAULT '{}', command TEXT, status TEXT NOT NULL,
    duration_s REAL, exit_code INTEGER, error TEXT,
    expect_consistent INTEGER, consistent INTEGER,
    pages INTEGER, bytes INTEGER, snapshot_ms REAL, throughput_mb_s REAL, pause_ms REAL,
    faults_total INTEGER, lat_p50_us REAL, lat_p90_us REAL, lat_p99_us REAL,
    lat_p999_us REAL, lat_max_us REAL, stall_max_ms REAL, stall_total_ms REAL,
    ops_before REAL, ops_during REAL, pages_populated INTEGER, rss_kb_delta INTEGER,
    vmpte_kb_delta INTEGER, mismatched_pages INTEGER,
    summary TEXT, config TEXT);
CREATE TABLE latency_hist (run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    bound_us REAL NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (run_id, bound_us));
CREATE TABLE faults (run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    process INTEGER NOT NULL, faults INTEGER NOT NULL, PRIMARY KEY (run_id, process));
CREATE TABLE mismatches (run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    cause TEXT NOT NULL, pages INTEGER NOT NULL, PRIMARY KEY (run_id, cause));
CREATE TABLE logs (run_id TEXT PRIMARY KEY REFERENCES runs(run_id) ON DELETE CASCADE,
    jsonl TEXT, stderr TEXT, serial_log TEXT);
"""


def make_v1(path: Path) -> None:
    c = sqlite3.connect(path)
    c.executescript(V1_SCHEMA)
    c.execute("INSERT INTO runs (run_id, started, vm, kernel, accel, scenario, scenario_name, "
              "params, status, consistent, expect_consistent, snapshot_ms, lat_p99_us, "
              "faults_total, summary) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
              ("oldrun", 1_700_000_000.0, "t-trixie", KERNEL, "tcg", "S3", "multi-writer",
               '{"writers": 4}', "ok", 1, 1, 412.733, 918.783, 301, json.dumps(SUMMARY_S3)))
    c.execute("INSERT INTO latency_hist VALUES ('oldrun', 131.072, 40), ('oldrun', 262.144, 261)")
    c.execute("INSERT INTO faults VALUES ('oldrun', 0, 301)")
    c.execute("INSERT INTO logs VALUES ('oldrun', '{}', '', NULL)")
    c.execute("PRAGMA user_version = 1")
    c.commit()
    c.close()


def columns(path, table="runs"):
    return [(r[1], r[2]) for r in raw(path).execute(f"PRAGMA table_info({table})")]


def test_v1_database_is_upgraded_in_place(tmp_path):
    old, fresh = tmp_path / "old.sqlite", tmp_path / "fresh.sqlite"
    make_v1(old)
    with ResultsDB(old) as db:
        assert db.schema_version == SCHEMA_VERSION
        got = db.get("oldrun")
        # v2 columns backfilled from the stored summary JSON
        assert got["copy_ms"] == SUMMARY_S3["copy_ms"]
        assert got["lat_mean_us"] == SUMMARY_S3["fault_latency_us"]["mean"]
        assert got["populate_ms"] == 0
        assert got["latency_hist"][-1] == {"bound_us": 262.144, "count": 261}
        db.store(make_result("newrun"))
        assert ids(db.runs(scenario="S3")) == ["oldrun", "newrun"]
    assert raw(old).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw(old).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexes = {r[0] for r in raw(old).execute(
        "SELECT name FROM sqlite_master WHERE type='index' AND name LIKE 'runs_%'")}
    assert {"runs_started", "runs_scenario", "runs_vm"} <= indexes
    # an upgraded database ends up with exactly the schema of a fresh one
    ResultsDB(fresh).close()
    for table in ("runs", "latency_hist", "faults", "mismatches", "logs"):
        assert columns(old, table) == columns(fresh, table)
    # and opening it again is a no-op
    with ResultsDB(old) as db:
        assert ids(db.runs()) == ["oldrun", "newrun"]


def test_a_v2_database_gains_what_reproduces_a_run(tmp_path, monkeypatch):
    """v3 adds the lock digest, the image content, the tools digest, the QEMU
    version and the run a rerun repeats; older runs read them as None."""
    old = tmp_path / "old.sqlite"
    make_v1(old)
    monkeypatch.setattr(results, "MIGRATIONS", results.MIGRATIONS[:2])
    monkeypatch.setattr(results, "SCHEMA_VERSION", 2)
    ResultsDB(old).close()
    assert raw(old).execute("PRAGMA user_version").fetchone()[0] == 2
    monkeypatch.undo()
    with ResultsDB(old) as db:
        assert db.schema_version == SCHEMA_VERSION
        assert db.get("oldrun")["lock_hash"] is None
        db.store(make_result("again", lock_hash="0123abcd", image_content="c0ffee+k1",
                             tools_digest="t00l", qemu="7.2.0", rerun_of="oldrun"))
        got = db.get("again")
        assert (got["lock_hash"], got["image_content"], got["tools_digest"], got["qemu"],
                got["rerun_of"]) == ("0123abcd", "c0ffee+k1", "t00l", "7.2.0", "oldrun")
        assert [r["run_id"] for r in db.runs() if r["rerun_of"] == "oldrun"] == ["again"]


FLOORS = {"type": "bench", "tool": "uffd-bench", "memcpy_bytes": 33554432,
          "memcpy_gb_s": 0.45, "round_trip_us": {"count": 1000, "p50": 111.0}}


def test_a_v3_database_gains_the_floors_column(tmp_path, monkeypatch):
    """v4 keeps the guest's floors (uffd-bench's record) with each run; a run
    stored before reads them as None."""
    old = tmp_path / "old.sqlite"
    make_v1(old)
    monkeypatch.setattr(results, "MIGRATIONS", results.MIGRATIONS[:3])
    monkeypatch.setattr(results, "SCHEMA_VERSION", 3)
    ResultsDB(old).close()
    assert "floors" not in dict(columns(old))
    monkeypatch.undo()
    with ResultsDB(old) as db:
        assert db.schema_version == 4
        assert db.get("oldrun")["floors"] is None
        db.store(make_result("measured", floors=FLOORS))
        assert db.get("measured")["floors"] == FLOORS
        assert "floors" not in db.runs()[0]          # listings leave the JSON records out


def test_floors_that_are_not_a_record_are_refused(db):
    with pytest.raises(ValueError, match="floors: expected uffd-bench's record .* got list"):
        db.store(make_result("bad", floors=[1, 2]))
    assert db.runs() == []


def test_a_v3_database_missing_a_v3_column_is_foreign(tmp_path, monkeypatch):
    p = tmp_path / "odd.sqlite"
    make_v1(p)
    monkeypatch.setattr(results, "MIGRATIONS", results.MIGRATIONS[:3])
    monkeypatch.setattr(results, "SCHEMA_VERSION", 3)
    ResultsDB(p).close()
    c = raw(p)
    c.execute("ALTER TABLE runs DROP COLUMN qemu")
    c.commit()
    c.close()
    monkeypatch.undo()
    with pytest.raises(ResultsError, match="schema v3 without runs.qemu"):
        ResultsDB(p)


def test_failed_upgrade_leaves_v1_untouched(tmp_path, monkeypatch):
    old = tmp_path / "old.sqlite"
    make_v1(old)
    monkeypatch.setattr(results, "MIGRATIONS",
                        [results.MIGRATIONS[0], results.MIGRATIONS[1] + ["NOT SQL"]])
    with pytest.raises(ResultsError, match="cannot upgrade the results database from "
                                           "schema v1 to v2"):
        ResultsDB(old)
    assert raw(old).execute("PRAGMA user_version").fetchone()[0] == 1
    assert "copy_ms" not in dict(columns(old))


def test_newer_schema_is_refused(tmp_path):
    p = tmp_path / "future.sqlite"
    c = sqlite3.connect(p)
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(ResultsError, match=f"schema v{SCHEMA_VERSION + 1} is newer"):
        ResultsDB(p)


def test_not_a_database(tmp_path):
    p = tmp_path / "junk.sqlite"
    p.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(ResultsError, match="not a usable results database"):
        ResultsDB(p)


# -- atomicity ----------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys
    from uffdlab.results import ResultsDB
    fields = json.load(open(sys.argv[2]))      # RunResult.to_dict(); store() takes either
    with ResultsDB(sys.argv[1]) as db:
        db.store(fields)
""")


@pytest.mark.parametrize("stage", ["runs", "logs"])
def test_kill_during_store_leaves_no_half_run(tmp_path, stage):
    path = tmp_path / "lab.sqlite"
    with ResultsDB(path) as db:
        db.store(make_result("before"))
    # A big raw log so, at the "logs" stage, pages have spilled into the WAL
    # before the kill; they must not count.
    victim = make_result("victim", jsonl="x" * (4 << 20), serial_log="console\n" * 1000)
    spec = tmp_path / "victim.json"
    spec.write_text(json.dumps(victim.to_dict()))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "UFFDLAB_TEST_STORE_PAUSE": stage}
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(spec)],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert line.strip() == f"store-paused {stage} victim", line
        # inside the open transaction: a reader (WAL) sees the old state only
        with ResultsDB(path) as reader:
            assert ids(reader.runs()) == ["before"]
        if stage == "logs":                      # uncommitted pages really are in the WAL
            assert Path(f"{path}-wal").stat().st_size > (1 << 20)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    c = raw(path)
    assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for table in ("runs", "latency_hist", "faults", "mismatches", "logs"):
        assert c.execute(f"SELECT count(*) FROM {table} WHERE run_id = 'victim'"
                         ).fetchone()[0] == 0, table
    c.close()
    with ResultsDB(path) as db:
        assert ids(db.runs()) == ["before"]
        db.store(victim)                         # the same run can be stored afterwards
        assert db.get("victim")["jsonl"] == victim.jsonl
        assert ids(db.runs()) == ["before", "victim"]
    assert len(load(path).runs) == 2


def test_exception_mid_store_rolls_back(db, monkeypatch):
    db.store(make_result("keep"))
    real = results._test_pause

    def boom(stage, run_id):
        real(stage, run_id)
        if stage == "logs":
            raise RuntimeError("boom")
    monkeypatch.setattr(results, "_test_pause", boom)
    with pytest.raises(RuntimeError, match="boom"):
        db.store(make_result("gone"))
    monkeypatch.setattr(results, "_test_pause", real)
    assert ids(db.runs()) == ["keep"]
    db.store(make_result("gone"))
    assert ids(db.runs()) == ["keep", "gone"]


def test_closed_database(db_path):
    db = ResultsDB(db_path)
    db.close()
    with pytest.raises(sqlite3.ProgrammingError):
        db.runs()
