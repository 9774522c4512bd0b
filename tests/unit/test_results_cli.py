# SPDX-License-Identifier: MIT
"""`uffdlab results` at the shell: show RUN, filters, --json/--csv, tables
that fit the terminal; and a failed image build keeping its log. Real
SQLite in tmp_path, no VMs; mmdebstrap is a fake script on PATH."""
from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import pytest

from uffdlab import cli
from uffdlab.config import load_lab
from uffdlab.images import KEEP_FAILED_LOGS, ImageError, ImageStore
from uffdlab.model import RunResult
from uffdlab.results import ResultsDB, find_notebook, format_run, format_table

NOW = time.time()
HOUR = 3600.0
SUMMARY = {"type": "summary", "pages": 65536, "bytes": 268435456, "snapshot_ms": 412.7,
           "copy_ms": 398.1, "pause_ms": 7.42, "throughput_mb_s": 620.2, "faults_total": 301,
           "faults_per_process": [151, 150],
           "fault_latency_us": {"p50": 215.9, "p90": 331.7, "p99": 918.8, "max": 1640.1},
           "writer_stall_max_ms": 2.385, "consistent": True, "mismatched_pages": 0,
           "mismatches_by_cause": {}}
BAD_SUMMARY = {**SUMMARY, "consistent": False, "mismatched_pages": 2048,
               "mismatches_by_cause": {"unregistered": 2040, "stale": 8}}
LONG_ERROR = ("uffd-snapshot exited 1: UFFDIO_WRITEPROTECT failed on range 0x7f3a00000000"
              "-0x7f3a10000000: Invalid argument; the kernel lacks WP_HUGETLBFS_SHMEM\n"
              "second line of the error")
SERIAL = "\n".join(f"[ {i:4d}.000000] console line {i}" for i in range(200))


def make_run(run_id: str, started: float, *, kernel="6.12.38+deb13-cloud-amd64",
             vm="t-trixie", scenario="S3", name="multi-writer", status="ok",
             summary=SUMMARY, **kw) -> RunResult:
    fields = dict(run_id=run_id, started=started, lab="cli-tests", vm=vm, image="trixie",
                  image_key="3f9a0c1d2e4b", kernel=kernel, accel="tcg", tools_version="v1",
                  scenario=scenario, scenario_name=name,
                  params={"size": "256M", "writers": 2}, command="uffd-snapshot --writers 2",
                  status=status, duration_s=14.25, exit_code=0, expect_consistent=True,
                  summary=dict(summary) if summary else None, jsonl="{}", stderr="")
    fields.update(kw)
    return RunResult(**fields)


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "results" / "lab.sqlite"


@pytest.fixture
def lab(tmp_path, db_path) -> Path:
    path = tmp_path / "lab.yml"
    path.write_text("cache_dir: cache\nimages:\n  trixie:\n    suite: trixie\nvms:\n"
                    f"  guest:\n    image: trixie\nresults: {db_path}\n")
    return path


@pytest.fixture
def filled(db_path):
    """Five runs over two kernels, two VMs and four statuses, hours apart."""
    with ResultsDB(db_path) as db:
        db.store(make_run("aa01", NOW - 50 * HOUR, kernel="6.1.0-37-cloud-amd64",
                          vm="t-bookworm", scenario="S1", name="stop-the-world"))
        db.store(make_run("aa02", NOW - 5 * HOUR, status="inconsistent", summary=BAD_SUMMARY))
        db.store(make_run("bb03", NOW - 3 * HOUR, status="failed", summary=None,
                          exit_code=1, error=LONG_ERROR, serial_log=SERIAL,
                          stderr="boom\nbang"))
        db.store(make_run("bb04", NOW - 1 * HOUR, kernel="6.12.0-rc1-uffd+",
                          status="timeout", summary=None, error="timed out after 100 s"))
        db.store(make_run("cc05", NOW - 0.1 * HOUR, vm="t-bookworm",
                          kernel="6.1.0-37-cloud-amd64"))
    return db_path


@pytest.fixture(autouse=True)
def no_columns(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)   # captured stdout is not a TTY: 100


def results(lab, capsys, *extra) -> tuple[int, str, str]:
    code = cli.main(["--lab", str(lab), "results", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def listed(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines()[2:] if line and line[0] != "("]


# -- results show RUN ----------------------------------------------------------------

def test_show_a_failed_run(lab, filled, capsys):
    code, out, err = results(lab, capsys, "show", "bb0")   # a unique prefix... of two
    assert code == 2 and out == "" and "ambiguous" in err
    code, out, err = results(lab, capsys, "show", "bb03")
    assert code == 0 and err == ""
    assert out.startswith("run bb03: S3 multi-writer on t-trixie\n")
    assert "failed: no verdict (the run did not finish)" in out
    assert "UFFDIO_WRITEPROTECT failed" in out and "second line of the error" in out
    assert "size=256M writers=2" in out and "uffd-snapshot --writers 2" in out
    assert "6.12.38+deb13-cloud-amd64 (tcg)" in out
    assert "notebook     unknown" in out
    assert "metrics      none (no summary record)" in out
    assert "stderr (last 2 of 2 lines)" in out and "| bang" in out
    assert "serial console (last 30 of 200 lines kept):" in out
    assert "console line 199" in out and "console line 170" in out
    assert "console line 169" not in out


def test_show_metrics_verdict_and_sweep_notebook(lab, filled, db_path, capsys):
    sweep = db_path.parent / "sweeps" / "20261130-040000-abcdef"
    sweep.mkdir(parents=True)
    (sweep / "index.json").write_text(json.dumps({"sweep_id": "x", "points": [
        {"index": 0, "params": {}, "notebook": "point-000.ipynb", "run_id": "aa02"}]}))
    broken = db_path.parent / "sweeps" / "broken"
    broken.mkdir()
    (broken / "index.json").write_text("{not json")          # skipped, not fatal
    code, out, _ = results(lab, capsys, "show", "aa02")
    assert code == 0
    assert "inconsistent (!): on a correct kernel the scenario expects a consistent" in out
    assert f"notebook     {sweep / 'point-000.ipynb'}" in out
    assert "snapshot     413 ms, copy 398 ms, pause 7.42 ms" in out
    assert "p99 919 us" in out and "301 (per writer process: 151 150)" in out
    assert "2,048 pages (stale 8, unregistered 2,040)" in out
    assert "serial console: not kept" in out
    code, out, _ = results(lab, capsys, "show", "aa01")
    assert "ok, as the scenario expects" in out


def test_show_finds_a_demo_notebook(filled, db_path):
    nbs = db_path.parent / "notebooks"
    nbs.mkdir()
    (nbs / "10-snapshot-20261130-040000.result.json").write_text(
        json.dumps({"run_id": "cc05", "status": "ok", "consistent": True, "error": None}))
    assert find_notebook(db_path, "cc05") == nbs / "10-snapshot-20261130-040000.ipynb"
    assert find_notebook(db_path, "aa01") is None


def test_show_json_has_everything(lab, filled, capsys):
    code, out, _ = results(lab, capsys, "show", "bb03", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["run_id"] == "bb03" and doc["serial_log"] == SERIAL
    assert doc["error"] == LONG_ERROR and doc["notebook"] is None
    assert doc["params"] == {"size": "256M", "writers": 2}


@pytest.mark.parametrize("argv, message", [
    (["show", "zz"], "no run 'zz' in "),
    (["show", "a"], "run id 'a' is ambiguous in "),
    (["show"], "results show: expected a run id or a unique prefix"),
    (["shwo", "aa01"], "results: expected `show RUN` or no argument, got 'shwo'"),
    (["--status", "ok", "show", "aa01"], "results show: --status is for the listing"),
    (["--csv", "--last", "2", "show", "aa01"], "--last, --csv are for the listing"),
])
def test_show_bad_input_exits_2(lab, filled, capsys, argv, message):
    code, out, err = results(lab, capsys, *argv)
    assert code == 2 and out == "" and message in err and len(err.splitlines()) == 1


def test_show_without_a_database(lab, db_path, capsys):
    code, out, err = results(lab, capsys, "show", "aa01")
    assert code == 2 and "no results database at" in err and not db_path.exists()


def test_format_run_strips_console_escapes():
    run = {**make_run("x1", NOW, status="failed", summary=None).to_dict(),
           "serial_log": "\x1b[1;31mred\x1b[0m text\x07\r"}
    text = format_run(run)
    assert "| red text" in text and "\x1b" not in text and "\x07" not in text


# -- filters ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, ids", [
    (["--status", "ok"], ["aa01", "cc05"]),
    (["--status", "TIMEOUT"], ["bb04"]),
    (["--vm", "t-bookworm"], ["aa01", "cc05"]),
    (["--kernel", "6.1"], ["aa01", "cc05"]),                 # not 6.12.*
    (["--kernel", "6.12"], ["aa02", "bb03", "bb04"]),
    (["--kernel", "6.12.38"], ["aa02", "bb03"]),             # up to the '+'
    (["--kernel", "6.12.0-rc1-uffd+"], ["bb04"]),            # a whole release
    (["--kernel", "6.1.0-3"], []),                           # not at a boundary
    (["--kernel", "6.1."], ["aa01", "cc05"]),                # the user drew the boundary
    (["--since", "2h"], ["bb04", "cc05"]),
    (["--since", "240m"], ["bb03", "bb04", "cc05"]),
    (["--since", "1d", "--status", "ok"], ["cc05"]),
    (["--since", time.strftime("%Y-%m-%dT%H:%M", time.localtime(NOW - 4 * HOUR))],
     ["bb03", "bb04", "cc05"]),
    (["--since", "1w", "--last", "2"], ["bb04", "cc05"]),
    (["--kernel", "6.12", "--scenario", "s3", "--last", "1"], ["bb04"]),
])
def test_filters(lab, filled, capsys, argv, ids):
    code, out, err = results(lab, capsys, "--json", *argv)
    assert code == 0 and [r["run_id"] for r in json.loads(out)] == ids
    if ids:
        code, out, _ = results(lab, capsys, *argv)
        assert code == 0 and listed(out) == ids
    else:
        assert results(lab, capsys, *argv)[1].endswith("match these filters\n")


def test_since_as_an_iso_date_and_a_zone(filled, lab, capsys):
    day = time.strftime("%Y-%m-%d", time.localtime(NOW + 86400))
    assert json.loads(results(lab, capsys, "--json", "--since", day)[1]) == []
    code, out, _ = results(lab, capsys, "--json", "--since", "2000-01-01T00:00Z")
    assert code == 0 and len(json.loads(out)) == 5


@pytest.mark.parametrize("flag, value, expected", [
    ("--status", "done", "expected one of ok, inconsistent, failed, timeout"),
    ("--vm", " ", "expected a VM name"),
    ("--kernel", "", "expected a kernel release"),
    ("--kernel", "6.1 6.2", "expected a kernel release"),
    ("--scenario", "", "expected a scenario id or name"),
    ("--since", "yesterday", "expected an ISO date or date and time"),
    ("--since", "2026-13-01", "expected an ISO date or date and time"),
    ("--since", "0h", "an age above zero"),
    ("--since", "3y", "or an age (30m, 2h, 3d, 1w)"),
    ("--last", "0", "expected a number of runs from 1 to"),
])
def test_bad_values_exit_2_naming_the_flag(lab, filled, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as e:
        cli.main(["--lab", str(lab), "results", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    line = err.splitlines()[-1]
    assert f"argument {flag}: " in line and expected in line and repr(value) in line


def test_library_filters_refuse_bad_values(filled):
    with ResultsDB(filled, readonly=True) as db:
        with pytest.raises(ValueError, match="kernel: expected"):
            db.runs(kernel="")
        with pytest.raises(ValueError, match="since: expected a Unix time"):
            db.runs(since="yesterday")
        assert [r["run_id"] for r in db.runs(kernel="6.1", since=NOW - HOUR)] == ["cc05"]


# -- --json and --csv ---------------------------------------------------------------------

def test_json_is_what_runs_returns(lab, filled, capsys):
    code, out, err = results(lab, capsys, "--json")
    with ResultsDB(filled, readonly=True) as db:
        assert code == 0 and err == "" and json.loads(out) == db.runs()


def test_csv_has_a_header_and_a_row_per_run(lab, filled, capsys):
    code, out, _ = results(lab, capsys, "--csv", "--status", "failed")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["run_id"] for r in rows] == ["bb03"]
    r = rows[0]
    assert r["error"] == LONG_ERROR and r["kernel"] == "6.12.38+deb13-cloud-amd64"
    assert json.loads(r["params"]) == {"size": "256M", "writers": 2}
    assert r["expect_consistent"] == "true" and r["consistent"] == "" and r["exit_code"] == "1"


def test_json_and_csv_are_exclusive(lab, filled, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--lab", str(lab), "results", "--json", "--csv"])
    assert e.value.code == 2
    assert "argument --csv: not allowed with argument --json" in capsys.readouterr().err


def test_json_and_csv_without_a_database(lab, db_path, capsys):
    code, out, err = results(lab, capsys, "--json")
    assert code == 0 and json.loads(out) == [] and "no results database" in err
    code, out, err = results(lab, capsys, "--csv")
    assert code == 0 and out.startswith("run_id,started,") and len(out.splitlines()) == 1
    assert not db_path.exists()


# -- the table --------------------------------------------------------------------------

def test_failed_rows_show_their_error(lab, filled, capsys):
    code, out, _ = results(lab, capsys)
    bb03 = next(line for line in out.splitlines() if line.startswith("bb03"))
    assert "failed            uffd-snapshot exited" in bb03       # after the status
    assert bb03.endswith("...") and len(bb03) == 100             # cut at the width
    bb04 = next(line for line in out.splitlines() if line.startswith("bb04"))
    assert bb04.endswith("timeout           timed out after 100 s")
    with ResultsDB(filled, readonly=True) as db:
        wide = format_table(db.runs(status="failed"), width=300)
    assert LONG_ERROR.splitlines()[0] in wide and "second line" not in wide


@pytest.mark.parametrize("columns", ["80", "120"])
def test_table_fits_the_terminal(lab, filled, capsys, monkeypatch, columns):
    with ResultsDB(filled) as db:                  # a real id, long names, an error
        db.store(make_run("3f9a0c1d2e4b", NOW, vm="t-bookworm-hugepages", scenario="S5",
                          name="unregistered-writer", status="inconsistent",
                          summary=BAD_SUMMARY, error="E" * 300))
    monkeypatch.setenv("COLUMNS", columns)
    code, out, _ = results(lab, capsys)
    lines = out.splitlines()
    assert code == 0 and listed(out) == ["aa01", "aa02", "bb03", "bb04", "cc05",
                                         "3f9a0c1d2e4b"]
    assert max(map(len, lines)) <= int(columns)
    assert "status" in lines[0] and "mism" in lines[0]
    if columns == "120":
        assert "kernel" in lines[0] and "time" in lines[0]


def test_not_a_terminal_is_100_columns(lab, filled, capsys):
    code, out, _ = results(lab, capsys)
    assert max(map(len, out.splitlines())) <= 100
    with ResultsDB(filled, readonly=True) as db:
        full = format_table(db.runs())
    assert max(map(len, full.splitlines())) > 100          # so something gave way


def test_every_width_is_respected(filled):
    with ResultsDB(filled, readonly=True) as db:
        rows = db.runs()
    rows[0]["unreadable"] = {"params": "invalid JSON (Expecting value): " + "x" * 80}
    for width in range(20, 221, 7):
        text = format_table(rows, width=width)
        assert max(map(len, text.splitlines())) <= width, width
        assert "(?) aa01: params unreadable" in " ".join(text.split())
    with pytest.raises(ValueError, match="width: expected a positive number"):
        format_table(rows, width=0)


# -- a failed image build keeps its log ------------------------------------------------

def test_failed_build_keeps_its_log(tmp_path, lab, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "mmdebstrap"
    script.write_text("#!/bin/sh\necho 'I: fake mmdebstrap starting'\n"
                      "echo 'E: fake mirror unreachable' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    store = ImageStore(load_lab(lab))
    images = store.root
    images.mkdir(parents=True)
    old = [images / f"failed-trixie-2020010{i}-000000.log" for i in range(1, 5)]
    other = images / "failed-trixie-dev-20200101-000000.log"     # another image's
    for p in [*old, other]:
        p.write_text("old\n")

    with pytest.raises(ImageError) as e:
        store.build("trixie")
    message = str(e.value)
    assert message.startswith("mmdebstrap failed (exit 1)")
    assert "E: fake mirror unreachable" in message
    kept = Path(message.splitlines()[-1].removeprefix("full build log: "))
    assert kept.parent == images and kept.name.startswith("failed-trixie-")
    log = kept.read_text()
    assert "I: fake mmdebstrap starting" in log and "E: fake mirror unreachable" in log
    assert "$ mmdebstrap --variant=apt" in log and "uffdlab: build failed:" in log
    assert not list(images.glob(".build-*"))                     # no scratch left
    left = sorted(p.name for p in images.glob("failed-trixie-2*.log"))
    assert len(left) == KEEP_FAILED_LOGS and kept.name in left
    assert left[:-1] == [p.name for p in old[-(KEEP_FAILED_LOGS - 1):]]
    assert other.exists()


def test_show_names_the_guests_floors(tmp_path):
    from tests.unit.test_results import FLOORS, make_result
    with ResultsDB(tmp_path / "r.sqlite") as db:
        db.store(make_result("fl01", floors=FLOORS))
        db.store(make_result("fl02"))
        with_floors, without = db.get("fl01"), db.get("fl02")
    assert ("floors       guest memcpy 0.45 GB/s, fault round trip p50 111 us"
            in format_run(with_floors))
    assert "floors" not in format_run(without)


def test_run_floors_flag_prints_the_ratios(capsys):
    from tests.unit.test_results import FLOORS, make_result
    from uffdlab.cli.runs import _print_run
    _print_run(make_result("fl03", floors=FLOORS))
    out = capsys.readouterr().out
    assert "snapshot throughput vs guest memcpy: 1.445 x memcpy" in out
    assert "fault p50 vs guest round trip: 1.94 x round trip" in out
    args = cli.build_parser().parse_args(["run", "S3", "--floors"])
    assert args.floors is True
