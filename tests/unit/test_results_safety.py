# SPDX-License-Identifier: MIT
"""Results are never lost or damaged: the spool, busy databases, read-only
listing, foreign SQLite files, unreadable rows, --last bounds. No VMs."""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from uffdlab import cli, results
from uffdlab.model import RunResult
from uffdlab.results import (
    DatabaseLockedError,
    DuplicateRunError,
    NoResultsDatabaseError,
    NotResultsDatabaseError,
    ResultsDB,
    ResultsError,
    RunNotStoredError,
    StoreOutcome,
    format_table,
    import_spool,
    load,
    spool_dir,
    spool_run,
    spooled_files,
    store_run,
)

SUMMARY = {"type": "summary", "pages": 1024, "snapshot_ms": 12.5, "faults_total": 7,
           "fault_latency_us": {"p50": 100.0, "p99": 900.0},
           "fault_latency_hist": {"bounds_us": [128.0, 1024.0], "counts": [5, 2]},
           "faults_per_process": [4, 3], "consistent": True, "mismatched_pages": 0,
           "mismatches_by_cause": {}}


def make_result(run_id: str, started: float = 1_750_000_000.0, **kw) -> RunResult:
    fields = dict(run_id=run_id, started=started, lab="safety", vm="t-trixie", image="trixie",
                  image_key="k", kernel="6.12", accel="tcg", tools_version="v1",
                  scenario="S3", scenario_name="multi-writer", params={"writers": 2},
                  command="uffd-snapshot", status="ok", duration_s=1.5, exit_code=0,
                  expect_consistent=True, config={"type": "config"}, summary=dict(SUMMARY),
                  jsonl='{"type": "summary"}', stderr="")
    fields.update(kw)
    return RunResult(**fields)


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "res" / "lab.sqlite"


@pytest.fixture
def short_busy(monkeypatch):
    monkeypatch.setattr(results, "BUSY_TIMEOUT_S", 0.2)


def stored_ids(path) -> list[str]:
    with ResultsDB(path, readonly=True) as db:
        return [r["run_id"] for r in db.runs()]


def hold_exclusive(path) -> sqlite3.Connection:
    """Another process's writer in the middle of a long transaction."""
    c = sqlite3.connect(path, isolation_level=None, timeout=0)
    c.execute("BEGIN EXCLUSIVE")
    return c


def write_lab(tmp_path: Path, results_path: Path) -> Path:
    lab = tmp_path / "lab.yml"
    lab.write_text("accel: auto\ncache_dir: cache\nimages:\n  trixie:\n    suite: trixie\n"
                   "vms:\n  guest:\n    image: trixie\n    memory: 2G\n    cpus: 2\n"
                   f"results: {results_path}\n")
    return lab


def results_cli(tmp_path, db_path, capsys, *extra) -> tuple[int, str, str]:
    code = cli.main(["--lab", str(write_lab(tmp_path, db_path)), "results", *extra])
    out, err = capsys.readouterr()
    return code, out, err


# -- store_run and the spool ------------------------------------------------------

def test_store_run_stores(db_path):
    out = store_run(db_path, make_result("a1"))
    assert out == StoreOutcome("a1", True, None, f"run a1 stored in {db_path}")
    assert stored_ids(db_path) == ["a1"]
    assert not spool_dir(db_path).exists()


def test_locked_database_spools_and_next_store_imports(db_path, short_busy):
    store_run(db_path, make_result("first"))
    waiting = make_result("waiting", started=1_750_000_001.0, params={"writers": 8})
    holder = hold_exclusive(db_path)
    try:
        t = time.monotonic()
        out = store_run(db_path, waiting)
        assert time.monotonic() - t < 2            # bounded wait, not 30 s
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not out.stored and out.run_id == "waiting"
    assert out.spooled_to == spool_dir(db_path) / "waiting.json" and out.spooled_to.is_file()
    assert "another process holds the results database" in out.message
    assert str(db_path) in out.message and str(out.spooled_to) in out.message
    assert json.loads(out.spooled_to.read_text())["run"]["params"] == {"writers": 8}
    assert stored_ids(db_path) == ["first"]

    later = store_run(db_path, make_result("later", started=1_750_000_002.0))
    assert later.stored and later.imported == ["waiting"] and later.spool_problems == []
    assert stored_ids(db_path) == ["first", "waiting", "later"]
    assert spooled_files(db_path) == [] and list(spool_dir(db_path).iterdir()) == []
    with ResultsDB(db_path) as db:
        assert db.get_result("waiting") == waiting          # nothing lost on the way


def test_locked_database_is_one_clear_line(db_path):
    ResultsDB(db_path).close()
    holder = hold_exclusive(db_path)
    try:
        with ResultsDB(db_path, timeout=0.1) as db:
            with pytest.raises(DatabaseLockedError) as e:
                db.store(make_result("x"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    msg = str(e.value)
    assert msg.startswith(f"{db_path}: another process holds") and "\n" not in msg
    assert "gave up after 0.1 s" in msg and "retry" in msg
    assert results.BUSY_TIMEOUT_S == 10.0


def test_disk_full_spools_and_results_imports(tmp_path, db_path, monkeypatch, capsys):
    store_run(db_path, make_result("before"))
    real = ResultsDB.store

    def full(self, result, **kw):
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(ResultsDB, "store", full)
    out = store_run(db_path, make_result("full", started=1_750_000_001.0))
    assert not out.stored and out.spooled_to.is_file()
    assert "OperationalError: database or disk is full" in out.message
    monkeypatch.setattr(ResultsDB, "store", real)

    code, text, err = results_cli(tmp_path, db_path, capsys)
    assert code == 0
    assert "imported 1 spooled run(s)" in err
    assert [line.split()[0] for line in text.splitlines()[2:]] == ["before", "full"]
    assert spooled_files(db_path) == []


def test_neither_stored_nor_spooled_says_both_reasons(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the results directory should be")
    db_path = blocker / "lab.sqlite"
    run = make_result("lost1", jsonl="x" * 100_000)
    with pytest.raises(RunNotStoredError) as e:
        store_run(db_path, run)
    msg = str(e.value)
    assert msg.startswith(f"run lost1 could not be stored nor spooled: storing in {db_path}:")
    assert f"spooling to {blocker / 'spool'}:" in msg
    assert "FileExistsError" in msg and "NotADirectoryError" in msg   # both reasons
    assert len(msg) < 1000 and "xxxx" not in msg            # not the whole run
    assert e.value.result is run                             # the caller still has it


def test_spool_write_is_atomic(db_path, monkeypatch):
    def crash(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(results.os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        spool_run(db_path, make_result("half"))
    assert list(spool_dir(db_path).iterdir()) == []         # no partial or temporary file


def test_spool_write_failure_after_store_failure(db_path, monkeypatch):
    def full(self, result, **kw):
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(ResultsDB, "store", full)
    def no_space(path, text, durable=True):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(results, "_write_atomic", no_space)
    with pytest.raises(RunNotStoredError, match=r"run r9 could not be stored nor spooled: "
                       r".*database or disk is full; spooling to .*No space left on device"):
        store_run(db_path, make_result("r9"))


def test_import_spool_corrupt_file_left_and_reported(tmp_path, db_path, capsys):
    store_run(db_path, make_result("in-db"))
    good = spool_run(db_path, make_result("spooled", started=1_750_000_001.0))
    d = spool_dir(db_path)
    (d / "broken.json").write_text('{"format": "uffdlab-spooled-run", "run": {')
    (d / "other.json").write_text('{"something": "else"}')
    bad_field = json.loads(good.read_text())
    bad_field["run"].update(run_id="badstatus", status="great")
    (d / "badstatus.json").write_text(json.dumps(bad_field))

    code, text, err = results_cli(tmp_path, db_path, capsys)
    assert code == 0
    assert [line.split()[0] for line in text.splitlines()[2:]] == ["in-db", "spooled"]
    assert f"{d / 'broken.json'}: cannot be imported: invalid JSON" in err
    assert f"{d / 'other.json'}: cannot be imported: not a spooled run" in err
    assert "badstatus.json: cannot be imported: status: expected one of" in err
    assert "left in place" in err and "3 spooled run(s)" in err
    assert not good.exists()
    assert sorted(p.name for p in spooled_files(db_path)) == [
        "badstatus.json", "broken.json", "other.json"]


def test_spool_file_of_a_stored_run_is_removed(db_path):
    run = make_result("twice")
    store_run(db_path, run)
    spool_run(db_path, run)
    with ResultsDB(db_path) as db:
        report = import_spool(db)
    assert report.dropped == ["twice"] and report.imported == [] and report.problems == []
    assert spooled_files(db_path) == [] and stored_ids(db_path) == ["twice"]


def test_spool_file_kept_until_its_run_commits(db_path, monkeypatch):
    ResultsDB(db_path).close()
    spool_run(db_path, make_result("s1"))
    spool_run(db_path, make_result("s2"))
    calls = []

    def fail(self, result, **kw):
        calls.append(result["run_id"])
        raise sqlite3.OperationalError("disk I/O error")
    monkeypatch.setattr(ResultsDB, "store", fail)
    with ResultsDB(db_path) as db:
        report = import_spool(db)
    assert calls == ["s1"]                        # a failing database: stop, retry later
    assert report.imported == [] and "2 spooled runs left for later" in report.problems[0]
    assert [p.name for p in spooled_files(db_path)] == ["s1.json", "s2.json"]


def test_store_run_refuses_bad_and_duplicate_runs_without_spooling(db_path):
    with pytest.raises(ValueError, match="status: expected one of"):
        store_run(db_path, make_result("bad", status="great"))
    store_run(db_path, make_result("dup"))
    with pytest.raises(DuplicateRunError, match="run dup is already in"):
        store_run(db_path, make_result("dup", status="failed"))
    assert not spool_dir(db_path).exists() and stored_ids(db_path) == ["dup"]


def test_odd_run_id_gets_a_safe_spool_name(db_path):
    p = spool_run(db_path, make_result("../../etc/x"))
    assert p.parent == spool_dir(db_path) and p.name.startswith("______etc_x-")
    assert json.loads(p.read_text())["run"]["run_id"] == "../../etc/x"


# -- read-only listing --------------------------------------------------------------

def test_results_on_missing_database_creates_nothing(tmp_path, capsys):
    db_path = tmp_path / "never" / "made" / "lab.sqlite"
    with pytest.raises(NoResultsDatabaseError, match="no results database at"):
        ResultsDB(db_path, readonly=True)
    code, text, err = results_cli(tmp_path, db_path, capsys)
    assert code == 0
    assert text.strip() == f"no results database at {db_path} yet (no run stored)"
    assert not (tmp_path / "never").exists()
    with pytest.raises(FileNotFoundError, match="no results database"):
        load(db_path)


def test_readonly_does_not_store_or_migrate(tmp_path):
    p = tmp_path / "v1.sqlite"
    with ResultsDB(p) as db:
        db.store(make_result("r1"))
    c = sqlite3.connect(p)                          # make it look like a v1 database
    c.execute("PRAGMA user_version = 1")
    c.commit()
    c.close()
    with ResultsDB(p, readonly=True) as db:
        assert [r["run_id"] for r in db.runs()] == ["r1"]
        with pytest.raises(ResultsError, match="opened read-only"):
            db.store(make_result("r2"))
    assert sqlite3.connect(p).execute("PRAGMA user_version").fetchone()[0] == 1


def make_foreign(path: Path, ddl: str, version: int = 0) -> bytes:
    c = sqlite3.connect(path)
    c.executescript(ddl)
    c.execute(f"PRAGMA user_version = {version}")
    c.commit()
    c.close()
    return path.read_bytes()


FOREIGN = [
    ("CREATE TABLE users (id INTEGER, name TEXT); INSERT INTO users VALUES (1, 'ada');", 0,
     "tables: users; user_version 0"),
    ("CREATE TABLE runs (id INTEGER, name TEXT); INSERT INTO runs VALUES (1, 'x');", 0,
     "tables: runs; user_version 0"),
    ("CREATE TABLE runs (run_id TEXT, started REAL);", 2, "schema v2 without latency_hist"),
]


@pytest.mark.parametrize("ddl, version, why", FOREIGN)
def test_foreign_sqlite_file_is_left_unchanged(tmp_path, capsys, ddl, version, why):
    p = tmp_path / "someone-else.sqlite"
    before = make_foreign(p, ddl, version)

    code, text, err = results_cli(tmp_path, p, capsys)
    assert code == 2 and text == ""
    assert err.strip().startswith(f"uffdlab: {p}: not a uffd-lab results database")
    assert why in err and len(err.strip().splitlines()) == 1
    with pytest.raises(NotResultsDatabaseError, match=f"{p}: not a uffd-lab results"):
        ResultsDB(p)                                  # writing refuses it too
    out = store_run(p, make_result("mine"))           # ... and the run goes to the spool
    assert not out.stored and out.spooled_to.is_file()

    assert p.read_bytes() == before
    assert sqlite3.connect(p).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not Path(f"{p}-wal").exists() and not Path(f"{p}-shm").exists()


def test_not_sqlite_at_all_exits_2(tmp_path, capsys):
    p = tmp_path / "notes.txt"
    p.write_bytes(b"plain text, not a database " * 100)
    code, _, err = results_cli(tmp_path, p, capsys)
    assert code == 2 and f"{p}: not a usable results database" in err
    assert p.read_bytes() == b"plain text, not a database " * 100


def test_empty_file_is_fine_for_writing(tmp_path, capsys):
    p = tmp_path / "empty.sqlite"
    p.touch()
    code, text, _ = results_cli(tmp_path, p, capsys)
    assert code == 0 and "no run stored" in text and p.stat().st_size == 0
    assert store_run(p, make_result("first")).stored and stored_ids(p) == ["first"]


# -- unreadable rows ----------------------------------------------------------------

def test_bad_json_row_keeps_the_listing(tmp_path, db_path, capsys):
    for i, rid in enumerate(["r1", "r2", "r3"]):
        store_run(db_path, make_result(rid, started=1_750_000_000.0 + i))
    c = sqlite3.connect(db_path)
    c.execute("UPDATE runs SET params = '{\"writers\": ' WHERE run_id = 'r2'")
    c.execute("UPDATE runs SET summary = '[1, 2]', config = 'nope' WHERE run_id = 'r3'")
    c.commit()
    c.close()
    with ResultsDB(db_path, readonly=True) as db:
        rows = db.runs()
        assert [r["run_id"] for r in rows] == ["r1", "r2", "r3"]
        assert rows[0]["params"] == {"writers": 2} and "unreadable" not in rows[0]
        assert rows[1]["params"]["_unreadable"].startswith("invalid JSON")
        assert list(rows[1]["unreadable"]) == ["params"]
        got = db.get("r3")
        assert set(got["unreadable"]) == {"summary", "config"}
        assert got["summary"] == {"_unreadable": "expected a JSON object, got list: '[1, 2]'"}
        assert got["params"] == {"writers": 2} and got["faults_per_process"] == [4, 3]
        assert db.get("r2")["unreadable"]["params"].startswith("invalid JSON")
    table = format_table(rows)
    assert "r2 (?)" in table and "(?) r2: params unreadable: invalid JSON" in table
    code, text, _ = results_cli(tmp_path, db_path, capsys)
    assert code == 0 and all(f"\n{rid} " in text for rid in ("r1", "r2 (?)", "r3"))
    assert "r3 (?)" not in text            # the listing does not read summary/config
    assert list(load(db_path).runs["run_id"]) == ["r1", "r2", "r3"]


# -- --last ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["99999999999999999999", "0", "-3", "many"])
def test_last_out_of_range_exits_2(tmp_path, db_path, capsys, value):
    store_run(db_path, make_result("r1"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--lab", str(write_lab(tmp_path, db_path)), "results", "--last", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --last: expected a" in err and repr(value) in err
    if value != "many":
        assert "from 1 to 9223372036854775807" in err


def test_last_bounds_in_the_library(db_path):
    store_run(db_path, make_result("r1"))
    with ResultsDB(db_path, readonly=True) as db:
        for bad in (2**64, 0, -1, True):
            with pytest.raises(ValueError, match=r"last: expected a positive number of runs "
                                                 r"\(1 to 9223372036854775807\)"):
                db.runs(last=bad)
        assert len(db.runs(last=2**63 - 1)) == 1


def test_results_cli_end_to_end(tmp_path, db_path, capsys):
    for i, rid in enumerate(["old", "mid", "new"]):
        store_run(db_path, make_result(rid, started=1_750_000_000.0 + i,
                                       scenario="S1" if rid == "mid" else "S3"))
    code, text, err = results_cli(tmp_path, db_path, capsys, "--last", "2")
    assert code == 0 and err == ""
    lines = text.splitlines()
    assert lines[0].startswith("id") and [line.split()[0] for line in lines[2:]] == ["mid", "new"]
    code, text, _ = results_cli(tmp_path, db_path, capsys, "--scenario", "S1")
    assert code == 0 and [line.split()[0] for line in text.splitlines()[2:]] == ["mid"]
