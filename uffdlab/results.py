# SPDX-License-Identifier: MIT
"""results.store(RunResult) --SQLite--> pandas DataFrames.

The results database is one SQLite file (the `results` path of `lab.yml`):

* `runs`: one row per run: provenance (lab, vm, image hash, kernel, accel,
  guest-tools version), the scenario and its parameters (JSON), status,
  duration, exit code, error, and the summary's main metrics as real columns;
  the full `summary` and `config` records are kept as JSON next to them,
  and so are the guest's `floors` (uffd-bench, measured right after the run).
* `latency_hist` (run_id, bound_us, count): the fault latency histogram.
* `faults` (run_id, process, faults): snapshot faults per writer process.
* `mismatches` (run_id, cause, pages): mismatched pages by cause.
* `logs` (run_id, jsonl, stderr, serial_log): one row for every run with the
  raw JSON Lines and stderr; `serial_log` is whatever the runner captured,
  which is the guest console tail of failed and timed-out runs (NULL for
  runs that ended normally).

Writes are atomic: `store()` writes a run and all its rows in one
`BEGIN IMMEDIATE ... COMMIT` transaction, so a crash or kill mid-write leaves
no trace of that run. The database runs in WAL mode (readers never block the
writer, nor see its uncommitted rows). `PRAGMA user_version` holds the schema
version; `MIGRATIONS` is the ordered list of steps, and opening an older
database upgrades it in place, in one transaction.

A run id is stored once: storing the same run id again raises
`DuplicateRunError`, unless `store(result, replace=True)` is asked for, which
replaces the whole run (all its rows) in the same single transaction.

Opening for writing refuses a SQLite file that is not a results database (other
tables, or an unknown `user_version`) before changing anything in it; a missing
or empty file becomes a new results database. `ResultsDB(path, readonly=True)`
(used by `uffdlab results` and `load()`) opens the file with a `mode=ro` URI:
it never creates the file or its directory, never switches the journal mode
and never migrates (an older schema is read as it is, missing columns as NULL).

A busy database is waited for `BUSY_TIMEOUT_S` seconds, then reported as
`DatabaseLockedError` naming the file. A row whose params/summary/config JSON
is unreadable is still listed: that field becomes `{"_unreadable": ...}` and
the row gets `unreadable` {field: problem}.

The spool: `store_run(db_path, result)` never loses a finished run. When the
database cannot take it (locked, disk full, unusable) the run is written
atomically as JSON to `<db dir>/spool/<run_id>.json`, and `import_spool(db)`
(run by the next successful `store_run` and by `uffdlab results`) stores
spooled runs, deleting each file only once its run is committed (or already
in the database). A spool file that cannot be read is left in place and
reported. If the spool cannot be written either, `RunNotStoredError` says so.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .model import Judgement, RunResult, Status, format_number, judge

if TYPE_CHECKING:                      # pandas is imported only when frames are asked for
    import pandas as pd

    from .config import Lab

STATUSES = tuple(Status)

# How long to wait for a database another process holds before giving up (read
# at open time, so tests can shorten it).
BUSY_TIMEOUT_S = 10.0
SPOOL_DIR = "spool"                    # next to the database file
_SPOOL_FORMAT = "uffdlab-spooled-run"
INT64_MAX = 2**63 - 1                 # SQLite's largest integer (LIMIT)

# Test hook (the atomicity test): with UFFDLAB_TEST_STORE_PAUSE=runs (or
# =logs) store() announces itself on stderr and sleeps inside its transaction
# right after inserting the runs row (or the logs row, the last one) so a test
# can SIGKILL it mid-write.
_PAUSE_ENV = "UFFDLAB_TEST_STORE_PAUSE"


class ResultsError(Exception):
    """A results database that cannot be used, or a request it cannot answer."""


class DuplicateRunError(ResultsError):
    """store() of a run id that is already in the database (without replace=True)."""


class RunNotFoundError(ResultsError, LookupError):
    """get() of a run id (or prefix) that matches no run."""


class NoResultsDatabaseError(ResultsError, FileNotFoundError):
    """A read-only open of a database that does not exist yet (or is empty)."""


class NotResultsDatabaseError(ResultsError):
    """A file that is not a uffd-lab results database (left untouched)."""


class DatabaseLockedError(ResultsError):
    """Another process held the database longer than BUSY_TIMEOUT_S."""


class RunNotStoredError(ResultsError):
    """store_run() could neither store nor spool a run; `.result` still holds it."""

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


# -- schema -------------------------------------------------------------------

# Summary metrics kept as real columns of `runs` in schema v1:
# column -> path of keys in uffd-snapshot's summary record.
_V1_METRICS: dict[str, tuple[str, ...]] = {
    "pages": ("pages",),
    "bytes": ("bytes",),
    "snapshot_ms": ("snapshot_ms",),
    "throughput_mb_s": ("throughput_mb_s",),
    "pause_ms": ("pause_ms",),
    "faults_total": ("faults_total",),
    "lat_p50_us": ("fault_latency_us", "p50"),
    "lat_p90_us": ("fault_latency_us", "p90"),
    "lat_p99_us": ("fault_latency_us", "p99"),
    "lat_p999_us": ("fault_latency_us", "p999"),
    "lat_max_us": ("fault_latency_us", "max"),
    "stall_max_ms": ("writer_stall_max_ms",),
    "stall_total_ms": ("writer_stall_total_ms",),
    "ops_before": ("writer_ops_per_s_before",),
    "ops_during": ("writer_ops_per_s_during",),
    "pages_populated": ("pages_populated",),
    "rss_kb_delta": ("rss_kb_delta",),
    "vmpte_kb_delta": ("vmpte_kb_delta",),
    "mismatched_pages": ("mismatched_pages",),
}
# Added by the v2 migration (backfilled from the stored summary JSON).
_V2_METRICS: dict[str, tuple[str, ...]] = {
    "copy_ms": ("copy_ms",),
    "populate_ms": ("populate_ms",),
    "lat_mean_us": ("fault_latency_us", "mean"),
}
METRICS = {**_V1_METRICS, **_V2_METRICS}
_INTEGER_METRICS = {"pages", "bytes", "faults_total", "pages_populated", "rss_kb_delta",
                    "vmpte_kb_delta", "mismatched_pages"}


def _metric_ddl(metrics: Mapping[str, tuple[str, ...]]) -> str:
    return ",\n    ".join(f"{c} {'INTEGER' if c in _INTEGER_METRICS else 'REAL'}"
                          for c in metrics)


_V1 = [
    f"""CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    started REAL NOT NULL,
    lab TEXT, vm TEXT, image TEXT, image_key TEXT, kernel TEXT, accel TEXT,
    tools_version TEXT,
    scenario TEXT NOT NULL, scenario_name TEXT,
    params TEXT NOT NULL DEFAULT '{{}}',
    command TEXT,
    status TEXT NOT NULL,
    duration_s REAL, exit_code INTEGER, error TEXT,
    expect_consistent INTEGER, consistent INTEGER,
    {_metric_ddl(_V1_METRICS)},
    summary TEXT, config TEXT)""",
    """CREATE TABLE latency_hist (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    bound_us REAL NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (run_id, bound_us))""",
    """CREATE TABLE faults (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    process INTEGER NOT NULL, faults INTEGER NOT NULL,
    PRIMARY KEY (run_id, process))""",
    """CREATE TABLE mismatches (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    cause TEXT NOT NULL, pages INTEGER NOT NULL,
    PRIMARY KEY (run_id, cause))""",
    """CREATE TABLE logs (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id) ON DELETE CASCADE,
    jsonl TEXT, stderr TEXT, serial_log TEXT)""",
]


def _json_path(path: tuple[str, ...]) -> str:
    return "$." + ".".join(path)


# v2: more summary metrics as columns (backfilled from the summary JSON of the
# runs already stored) and indexes for the usual filters (newest first, by
# scenario, by VM).
_V2 = [
    *(f"ALTER TABLE runs ADD COLUMN {c} {'INTEGER' if c in _INTEGER_METRICS else 'REAL'}"
      for c in _V2_METRICS),
    "UPDATE runs SET " + ", ".join(f"{c} = json_extract(summary, '{_json_path(p)}')"
                                   for c, p in _V2_METRICS.items())
    + " WHERE summary IS NOT NULL AND json_valid(summary)",
    "CREATE INDEX IF NOT EXISTS runs_started ON runs(started)",
    "CREATE INDEX IF NOT EXISTS runs_scenario ON runs(scenario, started)",
    "CREATE INDEX IF NOT EXISTS runs_scenario_name ON runs(scenario_name, started)",
    "CREATE INDEX IF NOT EXISTS runs_vm ON runs(vm, started)",
]

# v3: what reproduces a run (lab.lock's digest, the image's content hash, the
# guest tools' digest, the QEMU version) and the run it repeats (`rerun`).
_V3_FIELDS = ("lock_hash", "image_content", "tools_digest", "qemu", "rerun_of")
_V3 = [
    *(f"ALTER TABLE runs ADD COLUMN {c} TEXT" for c in _V3_FIELDS),
    "CREATE INDEX IF NOT EXISTS runs_rerun_of ON runs(rerun_of)",
]

# v4: the guest's floors measured right after the run (uffd-bench's record,
# JSON), which the run's figures are compared with.
_V4_FIELDS = ("floors",)
_V4 = [f"ALTER TABLE runs ADD COLUMN {c} TEXT" for c in _V4_FIELDS]

# MIGRATIONS[i] upgrades a database at schema version i to version i + 1.
MIGRATIONS: list[list[str]] = [_V1, _V2, _V3, _V4]
SCHEMA_VERSION = len(MIGRATIONS)

_RUN_FIELDS = ("run_id", "started", "lab", "vm", "image", "image_key", "kernel", "accel",
               "tools_version", "scenario", "scenario_name", "params", "command", "status",
               "duration_s", "exit_code", "error", "expect_consistent", "consistent",
               *METRICS, *_V3_FIELDS, "summary", "config", *_V4_FIELDS)
# What runs() returns: everything in `runs` but the bulky JSON records.
_LIST_FIELDS = tuple(f for f in _RUN_FIELDS if f not in ("summary", "config", "floors"))
_TABLES = ("runs", "latency_hist", "faults", "mismatches", "logs")
# The `runs` columns a database at schema v1 must have (v2 adds _V2_METRICS,
# v3 _V3_FIELDS, v4 floors).
_V3_COLUMNS = frozenset(_RUN_FIELDS) - set(_V4_FIELDS)
_V2_COLUMNS = _V3_COLUMNS - set(_V3_FIELDS)
_V1_COLUMNS = _V2_COLUMNS - set(_V2_METRICS)


# -- helpers ------------------------------------------------------------------

def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (SQLite's JSON functions reject them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _dumps(obj: Any) -> str | None:
    return None if obj is None else json.dumps(_clean(obj), allow_nan=False,
                                                separators=(",", ":"), default=str)


def _num(v: Any) -> int | float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if isinstance(v, int) or math.isfinite(v) else None


def _dig(d: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(key)
    return d


def _tri(v: Any) -> int | None:
    return None if v is None else int(bool(v))


def _as_fields(result: Any) -> dict[str, Any]:
    if isinstance(result, Mapping):
        return dict(result)
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if is_dataclass(result):
        return asdict(result)
    raise TypeError(f"store: expected a RunResult, got {type(result).__name__}")


def _rows_for(fields: dict[str, Any]) -> tuple[dict, list, list, list, tuple]:
    """Validate one run and split it into the rows of every table."""
    run_id = fields.get("run_id")
    if not isinstance(run_id, str) or not run_id.strip():
        raise ValueError(f"run_id: expected a non-empty string, got {run_id!r}")
    status = fields.get("status")
    if status not in STATUSES:
        raise ValueError(f"status: expected one of {', '.join(STATUSES)}, got {status!r}")
    if not fields.get("scenario"):
        raise ValueError(f"scenario: expected a scenario id like S3, got "
                         f"{fields.get('scenario')!r}")
    started = _num(fields.get("started"))
    if started is None:
        raise ValueError(f"started: expected a Unix time in seconds, got "
                         f"{fields.get('started')!r}")
    summary = fields.get("summary")
    if summary is not None and not isinstance(summary, Mapping):
        raise ValueError(f"summary: expected the summary record (a dict) or None, got "
                         f"{type(summary).__name__}")
    params = fields.get("params") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"params: expected a dict, got {type(params).__name__}")
    summary = summary or None
    floors = fields.get("floors")
    if floors is not None and not isinstance(floors, Mapping):
        raise ValueError(f"floors: expected uffd-bench's record (a dict) or None, got "
                         f"{type(floors).__name__}")

    run = {k: fields.get(k) for k in ("run_id", "lab", "vm", "image", "image_key", "kernel",
                                      "accel", "tools_version", "scenario", "scenario_name",
                                      "command", "status", "error", *_V3_FIELDS)}
    run.update(started=started, params=_dumps(params),
               duration_s=_num(fields.get("duration_s")),
               exit_code=_num(fields.get("exit_code")),
               expect_consistent=_tri(fields.get("expect_consistent")),
               consistent=_tri(summary.get("consistent")) if summary else None,
               summary=_dumps(summary), config=_dumps(fields.get("config")),
               floors=_dumps(floors or None))
    for col, path in METRICS.items():
        run[col] = _num(_dig(summary, path))

    # Child rows. The summary is kept whole as JSON, so a malformed part of
    # it is skipped here rather than losing the run.
    hist: dict[float, int] = {}
    h = _dig(summary, ("fault_latency_hist",))
    if isinstance(h, Mapping) and isinstance(h.get("bounds_us"), list) \
            and isinstance(h.get("counts"), list):
        for b, c in zip(h["bounds_us"], h["counts"]):
            if _num(b) is not None and _num(c) is not None:
                hist[float(b)] = hist.get(float(b), 0) + int(c)
    latency = [(run_id, b, c) for b, c in sorted(hist.items())]
    fpp = _dig(summary, ("faults_per_process",))
    faults = [(run_id, i, int(n)) for i, n in enumerate(fpp if isinstance(fpp, list) else [])
              if _num(n) is not None]
    mbc = _dig(summary, ("mismatches_by_cause",))
    mism = [(run_id, str(c), int(n)) for c, n in (mbc.items() if isinstance(mbc, Mapping)
                                                  else []) if _num(n) is not None]
    logs = (run_id, fields.get("jsonl") or "", fields.get("stderr") or "",
            fields.get("serial_log"))
    return run, latency, faults, mism, logs


def _test_pause(stage: str, run_id: str) -> None:
    if os.environ.get(_PAUSE_ENV) == stage:
        sys.stderr.write(f"store-paused {stage} {run_id}\n")
        sys.stderr.flush()
        time.sleep(120)


def _bool_or_none(v: Any) -> bool | None:
    return None if v is None else bool(v)


def _decode_json(name: str, raw: Any) -> tuple[Any, str | None]:
    """A stored JSON object (params, summary, config) and, when it cannot be
    read, a note: the value is then {"_unreadable": note}."""
    if raw is None:
        return ({} if name == "params" else None), None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError) as e:
        problem = f"invalid JSON ({e})"
    else:
        if isinstance(value, dict):
            return value, None
        if value is None:
            return ({} if name == "params" else None), None
        problem = f"expected a JSON object, got {type(value).__name__}"
    text = raw if isinstance(raw, str) else repr(raw)
    problem += f": {text[:60]!r}{'...' if len(text) > 60 else ''}"
    return {"_unreadable": problem}, problem


# Where a kernel release may be cut for --kernel: 6.1 is a prefix of
# 6.1.0-37-amd64 and 6.12.38 of 6.12.38+deb13-cloud-amd64, but 6.1 is not one of 6.12.
KERNEL_BOUNDARIES = ".-+"


def _kernel_clause(kernel: str) -> str:
    if not isinstance(kernel, str) or not kernel.strip():
        raise ValueError(f"kernel: expected a kernel release or a prefix of one, got "
                         f"{kernel!r}")
    if kernel[-1] in KERNEL_BOUNDARIES:     # the caller drew the boundary already
        return "substr(kernel, 1, ?) = ?"
    # substr, not LIKE: a release's '_' or '%' must not act as a wildcard, and the
    # comparison stays case-sensitive.
    return ("(kernel = ? OR (substr(kernel, 1, ?) = ? AND substr(kernel, ?, 1) IN ("
            + ", ".join(f"'{c}'" for c in KERNEL_BOUNDARIES) + ")))")


def _kernel_args(kernel: str) -> list:
    n = len(kernel)
    return [n, kernel] if kernel[-1] in KERNEL_BOUNDARIES else [kernel, n, kernel, n + 1]


# -- the database -------------------------------------------------------------

class ResultsDB:
    """The results database at `path`.

    For writing (the default) it is created, with its parent directories, when
    missing, and upgraded in place when its schema is older. `readonly=True`
    only reads: see the module docstring. `timeout`: seconds to wait for a
    database another process holds (BUSY_TIMEOUT_S by default).
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False,
                 timeout: float | None = None):
        self.path = Path(path).expanduser()
        self.readonly = readonly
        self.timeout = BUSY_TIMEOUT_S if timeout is None else float(timeout)
        self._lock = threading.RLock()
        if readonly:
            if not self.path.exists():
                raise NoResultsDatabaseError(f"no results database at {self.path} yet "
                                             f"(no run stored)")
            if not self.path.is_file():
                raise NotResultsDatabaseError(f"{self.path}: not a results database "
                                              f"(not a file)")
            target, uri = f"file:{quote(str(self.path.absolute()))}?mode=ro", True
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            target, uri = str(self.path), False
        try:
            self._conn = sqlite3.connect(target, timeout=self.timeout, isolation_level=None,
                                         check_same_thread=False, uri=uri)
        except sqlite3.Error as e:
            raise ResultsError(f"{self.path}: cannot open the results database: {e}") from e
        self._conn.row_factory = sqlite3.Row
        try:
            with self._guard():
                version = self._inspect()
                if readonly:
                    if version == 0:
                        raise NoResultsDatabaseError(f"no results database at {self.path} "
                                                     f"yet (an empty file, no run stored)")
                else:
                    mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    if mode.lower() != "wal":
                        raise ResultsError(f"{self.path}: cannot switch the results database "
                                           f"to WAL mode (journal mode is {mode})")
                    self._conn.execute("PRAGMA synchronous=FULL")
                    self._conn.execute("PRAGMA foreign_keys=ON")
                    self._migrate()
                # A read-only v1 database lacks the v2 columns: they read as NULL.
                self._columns = {r[1] for r in self._conn.execute("PRAGMA table_info(runs)")}
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise NotResultsDatabaseError(f"{self.path}: not a usable results database: "
                                          f"{e}") from e
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite's 'database is locked' as a DatabaseLockedError naming the file."""
        try:
            yield
        except sqlite3.OperationalError as e:
            code = getattr(e, "sqlite_errorcode", None)
            if (code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)) \
                    or "database is locked" in str(e):
                raise DatabaseLockedError(
                    f"{self.path}: another process holds the results database (gave up "
                    f"after {self.timeout:g} s); let that run or notebook finish, or stop "
                    f"it, then retry") from e
            raise

    def _foreign(self, what: str) -> NotResultsDatabaseError:
        return NotResultsDatabaseError(
            f"{self.path}: not a uffd-lab results database ({what}); left unchanged: "
            f"point `results:` in lab.yml at another file")

    def _inspect(self) -> int:
        """The file's schema version, after checking (reads only) that it is
        ours: 0 for an empty file, else a `runs` table and the other tables of
        its version."""
        conn = self._conn
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE "
                                             "type = 'table' AND name NOT LIKE 'sqlite%'")}
        if not names and version == 0:
            return 0
        if not tables or "runs" in tables and version > 0:
            self._check_version_value(version)     # a newer uffdlab's database
        if "runs" not in tables or version == 0:
            shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise self._foreign(f"tables: {shown or 'none'}; user_version {version}")
        missing = [t for t in _TABLES if t not in tables]
        columns = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
        need = (_V1_COLUMNS if version < 2 else _V2_COLUMNS if version < 3
                else _V3_COLUMNS if version < 4 else frozenset(_RUN_FIELDS))
        missing += sorted(f"runs.{c}" for c in need - columns)
        if missing:
            raise self._foreign(f"schema v{version} without {', '.join(missing[:5])}"
                                f"{', ...' if len(missing) > 5 else ''}")
        return version

    # -- schema --
    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        if self._check_version() == SCHEMA_VERSION:
            return
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")       # one upgrader at a time; re-read inside
        try:
            start = self._check_version()
            for version in range(start, SCHEMA_VERSION):
                try:
                    for stmt in MIGRATIONS[version]:
                        conn.execute(stmt)
                except sqlite3.Error as e:
                    raise ResultsError(f"{self.path}: cannot upgrade the results database "
                                       f"from schema v{version} to v{version + 1}: {e}") from e
                conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _check_version(self) -> int:
        return self._check_version_value(self.schema_version)

    def _check_version_value(self, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise ResultsError(f"{self.path}: results database schema v{v} is newer than "
                               f"this uffdlab understands (v{SCHEMA_VERSION}); upgrade uffdlab")
        return v

    def _select_list(self, fields: Iterable[str]) -> str:
        return ", ".join(f if f in self._columns else f"NULL AS {f}" for f in fields)

    def has_run(self, run_id: str) -> bool:
        with self._lock, self._guard():
            return self._conn.execute("SELECT 1 FROM runs WHERE run_id = ?",
                                      (run_id,)).fetchone() is not None

    # -- writing --
    def store(self, result: RunResult | Mapping[str, Any], *, replace: bool = False) -> str:
        """Write one run and all its rows in a single transaction; returns its id.

        A run id already stored is a `DuplicateRunError`, unless `replace`,
        which swaps the old run for this one (in the same transaction).
        """
        run, latency, faults, mism, logs = _rows_for(_as_fields(result))
        run_id = run["run_id"]
        if self.readonly:
            raise ResultsError(f"{self.path}: opened read-only; cannot store run {run_id}")
        cols = ", ".join(run)
        marks = ", ".join(f":{c}" for c in run)
        with self._lock, self._guard():
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                if replace:
                    for table in ("latency_hist", "faults", "mismatches", "logs", "runs"):
                        conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
                try:
                    conn.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", run)
                except sqlite3.IntegrityError as e:
                    raise DuplicateRunError(f"run {run_id} is already in {self.path}; "
                                            f"store(..., replace=True) replaces it") from e
                _test_pause("runs", run_id)
                conn.executemany("INSERT INTO latency_hist (run_id, bound_us, count) "
                                 "VALUES (?, ?, ?)", latency)
                conn.executemany("INSERT INTO faults (run_id, process, faults) "
                                 "VALUES (?, ?, ?)", faults)
                conn.executemany("INSERT INTO mismatches (run_id, cause, pages) "
                                 "VALUES (?, ?, ?)", mism)
                conn.execute("INSERT INTO logs (run_id, jsonl, stderr, serial_log) "
                             "VALUES (?, ?, ?, ?)", logs)
                _test_pause("logs", run_id)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return run_id

    # -- reading --
    @staticmethod
    def _filters(scenario: str | None = None, status: str | None = None,
                 vm: str | None = None, kernel: str | None = None,
                 since: float | None = None) -> tuple[str, list]:
        where, args = [], []
        if scenario is not None:
            where.append("(scenario = ? COLLATE NOCASE OR scenario_name = ? COLLATE NOCASE)")
            args += [scenario, scenario]
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"status: expected one of {', '.join(STATUSES)}, "
                                 f"got {status!r}")
            where.append("status = ?")
            args.append(status)
        if vm is not None:
            where.append("vm = ?")
            args.append(vm)
        if kernel is not None:
            where.append(_kernel_clause(kernel))
            args += _kernel_args(kernel)
        if since is not None:
            if _num(since) is None:
                raise ValueError(f"since: expected a Unix time in seconds, got {since!r}")
            where.append("started >= ?")
            args.append(since)
        return (" WHERE " + " AND ".join(where)) if where else "", args

    @staticmethod
    def _limit(last: int | None) -> tuple[str, list]:
        if last is None:
            return "", []
        if isinstance(last, bool) or not isinstance(last, int) or not 0 < last <= INT64_MAX:
            raise ValueError(f"last: expected a positive number of runs (1 to {INT64_MAX}), "
                             f"got {last!r}")
        return " LIMIT ?", [last]

    def _select_ids(self, last, scenario, status, vm, kernel=None,
                    since=None) -> tuple[str, list]:
        """SQL selecting the matching run ids (newest `last` of them)."""
        where, args = self._filters(scenario, status, vm, kernel, since)
        limit, largs = self._limit(last)
        return (f"SELECT run_id FROM runs{where} ORDER BY started DESC, rowid DESC{limit}",
                args + largs)

    def runs(self, last: int | None = None, scenario: str | None = None,
             status: str | None = None, vm: str | None = None, *,
             kernel: str | None = None, since: float | None = None) -> list[dict]:
        """Matching runs, oldest first (`last`: only the newest N of them).

        `scenario` is an id (S3) or a readable name (multi-writer), any case.
        `kernel` is a release or a prefix of one ending where the release has
        a '.', '-' or '+' (6.1 matches 6.1.0-37-amd64, not 6.12.38);
        `since` a Unix time: runs started then or later.
        Each dict has the `runs` columns but the summary/config JSON (see
        get()), with `params` decoded and the consistency columns as bools.
        """
        ids, args = self._select_ids(last, scenario, status, vm, kernel, since)
        with self._lock, self._guard():
            rows = self._conn.execute(
                f"SELECT {self._select_list(_LIST_FIELDS)} FROM runs WHERE run_id IN ({ids}) "
                f"ORDER BY started, rowid", args).fetchall()
        return [self._decode(r) for r in rows]

    @staticmethod
    def _decode(row: sqlite3.Row) -> dict:
        d = dict(row)
        unreadable = {}
        for k in ("params", "summary", "config", "floors"):
            if k in d:
                d[k], problem = _decode_json(k, d[k])
                if problem:
                    unreadable[k] = problem
        if unreadable:                 # one bad row must not hide the others
            d["unreadable"] = unreadable
        for k in ("expect_consistent", "consistent"):
            d[k] = _bool_or_none(d.get(k))
        return d

    def _resolve_id(self, run_id: str) -> str:
        conn = self._conn
        if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
            return run_id
        escaped = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        found = [r[0] for r in conn.execute(
            "SELECT run_id FROM runs WHERE run_id LIKE ? ESCAPE '\\' LIMIT 5",
            (escaped + "%",)).fetchall()] if run_id else []
        if len(found) == 1:
            return found[0]
        if not found:
            raise RunNotFoundError(f"no run {run_id!r} in {self.path}")
        raise RunNotFoundError(f"run id {run_id!r} is ambiguous in {self.path}: it starts "
                               f"{', '.join(found)}{'...' if len(found) == 5 else ''}")

    def get(self, run_id: str) -> dict:
        """Everything stored for one run (an id, or a unique prefix of one).

        The `runs` columns with params/summary/config decoded, plus
        `latency_hist` [{bound_us, count}], `faults_per_process` [int],
        `mismatches_by_cause` {cause: pages}, and `jsonl`, `stderr`,
        `serial_log` from `logs`. A JSON field that cannot be read is
        {"_unreadable": note}, and `unreadable` maps it to the note.
        """
        with self._lock, self._guard():
            conn = self._conn
            conn.execute("BEGIN")                # one consistent snapshot
            try:
                rid = self._resolve_id(run_id)
                d = self._decode(conn.execute("SELECT * FROM runs WHERE run_id = ?",
                                              (rid,)).fetchone())
                d["latency_hist"] = [dict(r) for r in conn.execute(
                    "SELECT bound_us, count FROM latency_hist WHERE run_id = ? "
                    "ORDER BY bound_us", (rid,))]
                d["faults_per_process"] = [r[0] for r in conn.execute(
                    "SELECT faults FROM faults WHERE run_id = ? ORDER BY process", (rid,))]
                d["mismatches_by_cause"] = {r[0]: r[1] for r in conn.execute(
                    "SELECT cause, pages FROM mismatches WHERE run_id = ? ORDER BY cause",
                    (rid,))}
                log = conn.execute("SELECT jsonl, stderr, serial_log FROM logs "
                                   "WHERE run_id = ?", (rid,)).fetchone()
                d.update(dict(log) if log else {"jsonl": "", "stderr": "",
                                                 "serial_log": None})
            finally:
                conn.execute("COMMIT")
        return d

    def get_result(self, run_id: str) -> RunResult:
        """The stored run as a RunResult again."""
        from dataclasses import fields

        d = self.get(run_id)
        res = RunResult(**{f.name: d[f.name] for f in fields(RunResult) if f.name in d})
        res.status = Status(res.status)
        return res

    def frames(self, last: int | None = None, *, scenario: str | None = None,
               vm: str | None = None, status: str | None = None, kernel: str | None = None,
               since: float | None = None) -> Frames:
        """Matching runs (filters as in runs()) as tidy DataFrames: see Frames."""
        import pandas as pd

        ids, args = self._select_ids(last, scenario, status, vm, kernel, since)
        with self._lock, self._guard():
            conn = self._conn
            conn.execute("BEGIN")                # all frames from one snapshot
            try:
                runs = pd.read_sql_query(
                    f"SELECT {self._select_list(_LIST_FIELDS)} FROM runs "
                    f"WHERE run_id IN ({ids}) ORDER BY started, rowid", conn, params=args)

                def child(table: str, cols: str, order: str) -> pd.DataFrame:
                    return pd.read_sql_query(
                        f"SELECT {cols} FROM {table} c JOIN runs r USING (run_id) "
                        f"WHERE c.run_id IN ({ids}) ORDER BY r.started, r.rowid, {order}",
                        conn, params=args)

                latency = child("latency_hist", "c.run_id, c.bound_us, c.count", "c.bound_us")
                faults = child("faults", "c.run_id, c.process, c.faults", "c.process")
                mism = child("mismatches", "c.run_id, c.cause, c.pages", "c.cause")
            finally:
                conn.execute("COMMIT")
        return _tidy_frames(runs, latency, faults, mism)

    # -- lifetime --
    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ResultsDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultsDB({str(self.path)!r})"


# -- store_run and the spool --------------------------------------------------

@dataclass
class StoreOutcome:
    """Where store_run() put a run: in the database (`stored`), or in the
    spool file `spooled_to`; `message` says which and why, in one line."""

    run_id: str
    stored: bool
    spooled_to: Path | None
    message: str
    # Spooled runs the same call imported, and spool files it could not.
    imported: list[str] = field(default_factory=list)
    spool_problems: list[str] = field(default_factory=list)


@dataclass
class SpoolReport:
    """What import_spool() did."""

    imported: list[str] = field(default_factory=list)   # run ids now stored
    dropped: list[str] = field(default_factory=list)    # already stored: file removed
    problems: list[str] = field(default_factory=list)   # one line per file left in place


def spool_dir(db_path: str | os.PathLike) -> Path:
    return Path(db_path).expanduser().parent / SPOOL_DIR


def spooled_files(db_path: str | os.PathLike) -> list[Path]:
    """Spool files waiting next to the database at `db_path` (oldest name first)."""
    d = spool_dir(db_path)
    try:
        return sorted(p for p in d.glob("*.json") if not p.name.startswith("."))
    except OSError:
        return []


def _spool_name(run_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", run_id)[:80]
    if safe != run_id:                 # keep two odd ids from sharing a file
        safe += "-" + hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return safe + ".json"


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str, durable: bool = True) -> None:
    """tmp + rename: the file is whole or absent. `durable` adds the fsyncs
    that make it survive a power cut, not only a killed process."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def spool_run(db_path: str | os.PathLike, result: Any, reason: str = "",
              durable: bool = True) -> Path:
    """Write one run (validated as for store()) to the spool; returns the file.
    A write-ahead copy (durable=False) guards against a killed process only:
    the database's own commit is what survives a power cut."""
    fields = _as_fields(result)
    _rows_for(fields)
    d = spool_dir(db_path)
    d.mkdir(parents=True, exist_ok=True)
    path = d / _spool_name(fields["run_id"])
    doc = {"format": _SPOOL_FORMAT, "version": 1, "db": str(db_path), "reason": reason,
           "spooled_at": time.time(), "run": _clean(fields)}
    _write_atomic(path, json.dumps(doc, allow_nan=False, default=str), durable)
    return path


def _read_spooled(path: Path) -> dict[str, Any]:
    """The run in a spool file; ValueError (the reason) when it is unusable."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != _SPOOL_FORMAT \
            or not isinstance(doc.get("run"), dict):
        raise ValueError(f"not a spooled run (expected a {_SPOOL_FORMAT} record)")
    _rows_for(doc["run"])              # a field that store() would refuse
    return doc["run"]


def _reason(e: BaseException) -> str:
    return str(e) if isinstance(e, ResultsError) else f"{type(e).__name__}: {e}"


def import_spool(db: ResultsDB) -> SpoolReport:
    """Store the runs spooled next to `db` (opened for writing). A file is
    removed only after its run is committed, or when the database already
    has that run; an unreadable file is left in place and reported; when the
    database itself fails, the remaining files wait for the next time."""
    report = SpoolReport()
    files = spooled_files(db.path)
    for i, path in enumerate(files):
        try:
            fields = _read_spooled(path)
        except FileNotFoundError:
            continue                     # another process imported it meanwhile
        except (OSError, ValueError) as e:
            report.problems.append(f"{path}: cannot be imported: {e}; left in place")
            continue
        run_id = fields["run_id"]
        try:
            if db.has_run(run_id):
                report.dropped.append(run_id)
            else:
                db.store(fields)
                report.imported.append(run_id)
        except DuplicateRunError:         # stored by a concurrent import
            report.dropped.append(run_id)
        except Exception as e:            # the database fails: try again next time
            left = len(files) - i
            report.problems.append(f"{path}: not imported yet ({_reason(e)}); {left} "
                                   f"spooled run{'s' if left > 1 else ''} left for later")
            break
        path.unlink(missing_ok=True)
    return report


def store_run(db_path: Path, result: Any) -> StoreOutcome:
    """Store a finished run in the database at `db_path`, or, when the
    database cannot take it, in the spool next to it; then import what an
    earlier call spooled. Raises ValueError for a malformed run,
    DuplicateRunError for a run id already stored, and RunNotStoredError
    when the spool cannot be written either.

    The run is spooled before the database is touched and the spool file
    removed once the run is committed, so even a SIGKILL mid-store leaves
    the run in one place or the other."""
    fields = _as_fields(result)
    _rows_for(fields)                  # a malformed run is the caller's bug, not a spool case
    run_id = fields["run_id"]
    db_path = Path(db_path).expanduser()
    try:
        ahead: Path | None = spool_run(db_path, fields, "stored next (write-ahead copy)",
                                       durable=False)
    except Exception:
        ahead = None                   # the database may still take it
    try:
        db = ResultsDB(db_path)
    except Exception as e:
        return _spool_or_raise(db_path, fields, result, e, ahead)
    with db:
        try:
            db.store(fields)
        except DuplicateRunError:
            if ahead is None or ahead.exists():   # else: another process imported our copy
                _drop_ahead(ahead)
                raise
        except Exception as e:
            return _spool_or_raise(db_path, fields, result, e, ahead)
        _drop_ahead(ahead)
        outcome = StoreOutcome(run_id, True, None, f"run {run_id} stored in {db_path}")
        try:
            report = import_spool(db)
        except Exception as e:            # the run is stored; the spool waits
            report = SpoolReport(problems=[f"{spool_dir(db_path)}: not imported: "
                                           f"{_reason(e)}"])
    outcome.imported = report.imported
    outcome.spool_problems = report.problems
    if report.imported:
        outcome.message += f"; imported {len(report.imported)} spooled run(s)"
    return outcome


def store_once(db_path: str | os.PathLike, run: Any) -> bool:
    """Store a run unless its id is already stored (a run handed over twice,
    or a resumed sweep's journal): True when it was stored now."""
    try:
        store_run(Path(db_path), run)
    except DuplicateRunError:
        return False
    return True


def _drop_ahead(ahead: Path | None) -> None:
    """Remove a write-ahead copy once the database has the run (and the
    spool directory, if that leaves it empty)."""
    if ahead is None:
        return
    ahead.unlink(missing_ok=True)
    try:
        ahead.parent.rmdir()
    except OSError:
        pass                            # other spooled runs wait there


def _spool_or_raise(db_path: Path, fields: dict, result: Any,
                    error: BaseException, ahead: Path | None = None) -> StoreOutcome:
    reason = _reason(error)
    try:
        path = spool_run(db_path, fields, reason)
    except Exception as e:
        raise RunNotStoredError(
            f"run {fields['run_id']} could not be stored nor spooled: storing in {db_path}: "
            f"{reason}; spooling to {spool_dir(db_path)}: {_reason(e)}", result) from error
    return StoreOutcome(fields["run_id"], False, path,
                        f"run {fields['run_id']} spooled to {path} ({reason}); the next "
                        f"store or `uffdlab results` imports it")


# -- pandas -------------------------------------------------------------------

@dataclass
class Frames:
    """Tidy DataFrames for notebooks (all restricted to the same runs).

    runs: one row per run, oldest first: the `runs` columns, `started_at`
      (UTC datetime), `as_expected`, and each parameter as `param_<name>`.
    latency: run_id, bound_us, count, cdf (per run, rising to 1).
    faults: run_id, process, faults.
    mismatches: run_id, cause, pages.
    """

    runs: pd.DataFrame
    latency: pd.DataFrame
    faults: pd.DataFrame
    mismatches: pd.DataFrame

    def __repr__(self) -> str:
        return (f"Frames(runs={len(self.runs)}, latency={len(self.latency)}, "
                f"faults={len(self.faults)}, mismatches={len(self.mismatches)})")


def _path_of(source: str | os.PathLike | Lab) -> Path:
    p = getattr(source, "results_path", None)
    return Path(p if p is not None else source).expanduser()


def load(source: str | os.PathLike | Lab, last: int | None = None,
         scenario: str | None = None, vm: str | None = None,
         status: str | None = None) -> Frames:
    """Runs from the results database at `source` (a path, or a Lab: its
    `results_path`) as tidy DataFrames; filters as in ResultsDB.runs()."""
    with ResultsDB(_path_of(source), readonly=True) as db:  # NoResultsDatabaseError if missing
        return db.frames(last, scenario=scenario, vm=vm, status=status)


def _tidy_frames(runs: pd.DataFrame, latency: pd.DataFrame, faults: pd.DataFrame,
                 mism: pd.DataFrame) -> Frames:
    """The raw query results as Frames: typed columns, params flattened, CDFs."""
    import pandas as pd

    for col in ("expect_consistent", "consistent"):
        runs[col] = runs[col].astype("boolean")
    for col in sorted(_INTEGER_METRICS) + ["exit_code"]:    # NULLs would make them float
        runs[col] = runs[col].astype("Int64")
    runs.insert(2, "started_at", pd.to_datetime(runs["started"], unit="s", utc=True))
    runs["as_expected"] = (runs["consistent"] == runs["expect_consistent"]).astype("boolean")
    params = [_decode_json("params", p)[0] for p in runs["params"]]
    names = sorted({k for p in params for k in p})
    flat = pd.DataFrame(
        {f"param_{k}": [(_dumps(p.get(k)) if isinstance(p.get(k), (dict, list))
                         else p.get(k)) for p in params] for k in names},
        index=runs.index)
    runs = pd.concat([runs.drop(columns=["params"]), flat], axis=1)

    latency["count"] = latency["count"].astype("int64")
    totals = latency.groupby("run_id")["count"].transform("sum")
    latency["cdf"] = (latency.groupby("run_id")["count"].cumsum() / totals).astype(float)
    return Frames(runs=runs, latency=latency, faults=faults, mismatches=mism)


# -- text table ---------------------------------------------------------------

LIST_FIELDS = _LIST_FIELDS     # the keys of runs()'s dicts (the CSV columns)
ELLIPSIS = "..."         # ASCII, so a terminal in any locale can print it
ERROR_MAX = 60           # a table's error: its first line, cut here or at the width


def cut(text: str, n: int) -> str:
    """`text` in at most `n` characters, an ellipsis marking the cut."""
    if len(text) <= n:
        return text
    return text[:max(n, 0)] if n <= len(ELLIPSIS) else text[:n - len(ELLIPSIS)] + ELLIPSIS


def first_line(text: Any) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def _local_time(started: Any, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    if started is None:
        return "-"
    try:
        return time.strftime(fmt, time.localtime(started))
    except (TypeError, ValueError, OverflowError, OSError):   # a damaged row still lists
        return str(started)


def _unexpected(r: Mapping[str, Any]) -> bool:
    """A consistency verdict that differs from the scenario's expectation."""
    c, e = r.get("consistent"), r.get("expect_consistent")
    return c is not None and e is not None and bool(c) != bool(e)


@dataclass
class _Style:
    """How format_table draws its columns; the fitting steps change it."""

    dropped: set[str] = field(default_factory=set)
    time_format: str = "%Y-%m-%d %H:%M:%S"
    kernel_max: int = 10**6
    scenario_ids_only: bool = False
    short_heads: bool = False
    gap: int = 2


@dataclass(frozen=True)
class _Column:
    key: str
    head: str
    cell: Any                  # (row, style) -> text
    right: bool = False        # numbers line up on the right
    short_head: str | None = None


def _scenario_cell(r: Mapping[str, Any], s: _Style) -> str:
    parts = (r.get("scenario"),) if s.scenario_ids_only else (r.get("scenario"),
                                                               r.get("scenario_name"))
    return " ".join(str(x) for x in parts if x) or "-"


def _metric(name: str, head: str, short: str | None = None) -> _Column:
    return _Column(name, head, lambda r, s: format_number(r.get(name)), True, short)


_COLUMNS = (
    _Column("id", "id", lambda r, s: str(r.get("run_id") or "")
            + (" (?)" if r.get("unreadable") else "")),
    _Column("time", "time", lambda r, s: _local_time(r.get("started"), s.time_format)),
    _Column("vm", "vm", lambda r, s: str(r.get("vm") or "-")),
    _Column("kernel", "kernel", lambda r, s: cut(str(r.get("kernel") or "-"), s.kernel_max)),
    _Column("accel", "accel", lambda r, s: str(r.get("accel") or "-")),
    _Column("scenario", "scenario", _scenario_cell),
    _Column("status", "status", lambda r, s: str(r.get("status") or "-")
            + (" (!)" if _unexpected(r) else "")),
    _metric("snapshot_ms", "snapshot ms", "snap ms"),
    _metric("lat_p99_us", "p99 us"),
    _metric("stall_max_ms", "max stall ms", "stall ms"),
    _metric("faults_total", "faults"),
    _metric("mismatched_pages", "mismatched", "mism"),
)


def _drop(key: str):
    return lambda s: s.dropped.add(key)


# What gives way, in this order, when a table is wider than format_table's
# `width`: shortening before dropping, the least telling first. The id (what
# `uffdlab results show` takes), the status and the mismatched pages stay.
# Errors take what the width leaves after the status. Past the last step,
# lines are cut at the width.
FIT_STEPS: tuple[tuple[str, Any], ...] = (
    ("kernel releases cut to 16 characters", lambda s: setattr(s, "kernel_max", 16)),
    ("accel dropped", _drop("accel")),
    ("time without the year and seconds", lambda s: setattr(s, "time_format", "%m-%d %H:%M")),
    ("metric headers shortened", lambda s: setattr(s, "short_heads", True)),
    ("scenario names dropped (ids only)", lambda s: setattr(s, "scenario_ids_only", True)),
    ("faults dropped", _drop("faults_total")),
    ("max stall dropped", _drop("stall_max_ms")),
    ("kernel dropped", _drop("kernel")),
    ("vm dropped", _drop("vm")),
    ("time dropped", _drop("time")),
    ("one space between columns", lambda s: setattr(s, "gap", 1)),
    ("p99 dropped", _drop("lat_p99_us")),
    ("snapshot ms dropped", _drop("snapshot_ms")),
)


def _render(rows: list[Mapping[str, Any]], style: _Style, width: int | None) -> list[str] | None:
    """The table's lines drawn in `style`, or None when wider than `width`.

    A run with an error shows its first line after the status, over the
    metric columns (a failed run has no metrics), in whatever the width
    leaves: the error never makes the other runs lose a column."""
    cols = [c for c in _COLUMNS if c.key not in style.dropped]
    heads = [(c.short_head or c.head) if style.short_heads else c.head for c in cols]
    cells = [[c.cell(r, style) for c in cols] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    if width is not None and sum(widths) + style.gap * (len(widths) - 1) > width:
        return None
    gap = " " * style.gap
    n_text = 1 + max(i for i, c in enumerate(cols) if not c.right)  # through status

    def line(values: list[str]) -> str:
        return gap.join(v.rjust(w) if c.right else v.ljust(w)
                        for v, w, c in zip(values, widths, cols)).rstrip()

    out = [line(heads), line(["-" * w for w in widths])]
    for r, row in zip(rows, cells):
        error = first_line(r.get("error"))
        if not error:
            out.append(line(row))
            continue
        metrics = any(v != "-" for v in row[n_text:])
        start = line(row) if metrics else line(row[:n_text] + [""] * (len(row) - n_text))
        start = start.ljust(sum(widths[:n_text]) + style.gap * n_text) if not metrics \
            else start + gap
        room = ERROR_MAX if width is None else width - len(start)
        out.append((start + cut(error, room)).rstrip())
    return out


def format_table(rows: Iterable[Mapping[str, Any]], width: int | None = None) -> str:
    """A compact text table of runs (the dicts of ResultsDB.runs()) for
    `uffdlab results`. A status marked (!) is a consistency verdict that
    differs from what the scenario expects on a correct kernel; an id marked
    (?) has a stored field that cannot be read (explained under the table);
    a run with an error shows its first line after its status.

    `width`: no line is longer; columns shrink or go in FIT_STEPS order.
    None draws every column in full."""
    import textwrap

    if width is not None and (isinstance(width, bool) or not isinstance(width, int)
                              or width < 1):
        raise ValueError(f"width: expected a positive number of characters, got {width!r}")
    rows = list(rows)
    if not rows:
        return "no runs"
    style = _Style()
    out = _render(rows, style, width)
    for _, step in FIT_STEPS:
        if out is not None:
            break
        step(style)
        out = _render(rows, style, width)
    if out is None:                    # narrower than the id and status: cut lines
        out = [cut(line, width) for line in _render(rows, style, None) or []]
    notes = []
    if any(_unexpected(r) for r in rows):
        notes.append("(!) consistency differs from the scenario's expectation")
    for r in rows:
        for name, problem in (r.get("unreadable") or {}).items():
            notes.append(f"(?) {r.get('run_id')}: {name} unreadable: {problem}")
    for note in notes:                 # wrapped, not cut: the note is the explanation
        out += textwrap.wrap(note, width, subsequent_indent="    ") if width else [note]
    return "\n".join(out)


# -- one run in full ------------------------------------------------------------

SERIAL_TAIL_LINES = 30
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


def _printable(line: str) -> str:
    """A console line without escape sequences or control characters, which
    would redraw the reader's terminal."""
    return _CONTROL.sub("", line)


def verdict(run: Mapping[str, Any]) -> str:
    """The run's status and its consistency verdict against the scenario's
    expectation, in one line."""
    status = str(run.get("status") or "-")
    e = run.get("expect_consistent")
    return {
        Judgement.UNFINISHED: f"{status}: no verdict (the run did not finish)",
        Judgement.UNVERIFIED: f"{status} (no consistency verdict in the summary: "
                              f"verification off?)",
        Judgement.UNSPECIFIED: f"{status} (the scenario expects no particular verdict)",
        Judgement.EXPECTED: f"{status}, as the scenario expects",
        Judgement.UNEXPECTED: f"{status} (!): on a correct kernel the scenario expects "
                              f"{'a consistent' if e else 'an inconsistent'} snapshot",
    }[judge(status, run.get("consistent"), e)]


def _measures(parts: Iterable[tuple[str, Any, str]]) -> str:
    """'label value unit' for the values that are present, comma separated."""
    return ", ".join(f"{label} {format_number(v, grouped=True)}{unit}".strip()
                     for label, v, unit in parts if _num(v) is not None)


def _metric_lines(run: Mapping[str, Any]) -> list[tuple[str, str]]:
    g = run.get
    out = []
    snap = _measures([("", g("snapshot_ms"), " ms"), ("copy", g("copy_ms"), " ms"),
                      ("pause", g("pause_ms"), " ms"),
                      ("throughput", g("throughput_mb_s"), " MB/s")])
    if snap:
        size = _measures([("", g("pages"), " pages"), ("", g("bytes"), " bytes")])
        out.append(("snapshot", snap + (f" ({size})" if size else "")))
    if _num(g("faults_total")) is not None:
        per = " ".join(str(n) for n in g("faults_per_process") or [])
        out.append(("faults", format_number(g("faults_total"), grouped=True)
                    + (f" (per writer process: {per})" if per else "")))
    lat = _measures([(label, g(f"lat_{k}_us"), " us") for k, label in (
        ("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9"), ("max", "max"),
        ("mean", "mean"))])
    if lat:
        out.append(("latency", lat))
    stall = _measures([("max", g("stall_max_ms"), " ms"), ("total", g("stall_total_ms"), " ms"),
                       ("ops/s before", g("ops_before"), ""),
                       ("during", g("ops_during"), "")])
    if stall:
        out.append(("writer stall", stall))
    if g("pages_populated"):
        out.append(("populated", _measures([("", g("pages_populated"), " pages"),
                                            ("in", g("populate_ms"), " ms")])))
    mem = _measures([("rss", g("rss_kb_delta"), " kB"), ("page tables", g("vmpte_kb_delta"),
                                                         " kB")])
    if mem:
        out.append(("memory delta", mem))
    if _num(g("mismatched_pages")) is not None:
        causes = ", ".join(f"{c} {format_number(n, grouped=True)}"
                           for c, n in (g("mismatches_by_cause") or {}).items())
        out.append(("mismatched", f"{format_number(g('mismatched_pages'), grouped=True)} "
                    f"pages" + (f" ({causes})" if causes else "")))
    return out


def _tail(text: str, n: int) -> tuple[list[str], int]:
    lines = text.splitlines()
    return [_printable(x) for x in lines[-n:]], len(lines)


def format_run(run: Mapping[str, Any], notebook: str | os.PathLike | None = None,
               serial_lines: int = SERIAL_TAIL_LINES) -> str:
    """One run for people (a dict of ResultsDB.get()): what ran where and
    what reproduces it (image content, tools digest, QEMU, lab.lock, the run
    it repeats), its verdict and error, the main metrics, where its notebook is (`notebook`,
    None: unknown), and the tails of its stderr and serial console."""
    g = run.get
    rid = g("run_id")
    out = [f"run {rid}: {_scenario_cell(run, _Style())} on {g('vm') or '-'}"]

    def item(label: str, text: Any) -> None:
        lines = str(text).splitlines() or [""]
        out.append(f"  {label:<13}{lines[0]}".rstrip())
        out.extend(f"  {'':<13}{x}".rstrip() for x in lines[1:])

    item("status", verdict(run))
    if g("error"):
        item("error", g("error"))
    took = f", took {format_number(g('duration_s'))} s" if _num(g("duration_s")) else ""
    exit_code = g("exit_code")
    item("started", f"{_local_time(g('started'))} (local time){took}, exit code "
         f"{'-' if exit_code is None else exit_code}")
    item("kernel", f"{g('kernel') or '-'} ({g('accel') or '-'})")
    item("image", f"{g('image') or '-'} (recipe {g('image_key') or '-'}), guest tools "
         f"{g('tools_version') or '-'}, lab {g('lab') or '-'}")
    # what `uffdlab rerun` holds a repeat to; runs stored before v3 have none
    item("content", f"image {g('image_content') or '-'}, guest tools digest "
         f"{g('tools_digest') or '-'}")
    item("QEMU", g("qemu") or "-")
    item("lab.lock", g("lock_hash") or "none (no lab.lock when it ran, or not recorded)")
    item("rerun of", g("rerun_of") or "-")
    params = g("params") or {}
    item("params", " ".join(f"{k}={v}" for k, v in params.items()) or "(defaults)")
    item("command", g("command") or "-")
    item("notebook", notebook if notebook is not None else
         "unknown (no sweep index or demo result next to the database names this run)")
    metrics = _metric_lines(run)
    for label, text in metrics:
        item(label, text)
    if not metrics:
        item("metrics", "none (no summary record)")
    floors = g("floors")
    if isinstance(floors, Mapping) and "_unreadable" not in floors:
        rt = floors.get("round_trip_us")
        item("floors", f"guest memcpy {format_number(floors.get('memcpy_gb_s'))} GB/s, "
             f"fault round trip p50 "
             f"{format_number(rt.get('p50') if isinstance(rt, Mapping) else None)} us "
             f"(uffd-bench after the run)")
    for name, problem in (g("unreadable") or {}).items():
        item("(?)", f"{name} unreadable: {problem}")
    stderr = g("stderr") or ""
    if stderr.strip():
        lines, total = _tail(stderr, 10)
        out.append(f"  stderr (last {len(lines)} of {total} lines):")
        out.extend(f"    | {x}".rstrip() for x in lines)
    serial = g("serial_log")
    if serial is None:
        out.append("  serial console: not kept (the lab keeps it for runs that did not "
                   "finish)")
    elif not serial.strip():
        out.append("  serial console: empty")
    else:
        lines, total = _tail(serial, serial_lines)
        out.append(f"  serial console (last {len(lines)} of {total} lines kept):")
        out.extend(f"    | {x}".rstrip() for x in lines)
    return "\n".join(out)


def find_notebook(db_path: str | os.PathLike, run_id: str) -> Path | None:
    """The executed notebook that stored `run_id`, when a record next to the
    database names it: a sweep's `sweeps/*/index.json` or a `uffdlab demo`
    result, `notebooks/*.result.json`. None when none does (`uffdlab run`, a
    notebook of one's own). Unreadable records are skipped."""
    root = Path(db_path).expanduser().parent

    def read(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    for index in sorted(root.glob("sweeps/*/index.json")):
        doc = read(index)
        points = doc.get("points") if isinstance(doc, dict) else None
        for point in points if isinstance(points, list) else []:
            if isinstance(point, dict) and point.get("run_id") == run_id \
                    and isinstance(point.get("notebook"), str):
                return index.parent / point["notebook"]
    suffix = ".result.json"
    for result in sorted(root.glob(f"notebooks/*{suffix}")):
        doc = read(result)
        if isinstance(doc, dict) and doc.get("run_id") == run_id:
            return result.with_name(result.name[:-len(suffix)] + ".ipynb")
    return None
