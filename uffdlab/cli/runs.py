# SPDX-License-Identifier: MIT
"""Commands for provisioning, runs and results: provision, run, results."""
from __future__ import annotations

import argparse
import json
import sys

from .common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, EXIT_UNEXPECTED, Renderer, lab_of, table


def parse_params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--param: expected key=value, got {pair!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def cmd_provision(args) -> int:
    from ..provision import provision
    from ..vm import VM
    vm = VM(lab_of(args), args.vm, Renderer())
    vm.up(reuse=True)
    res = provision(vm)
    print(f"{vm.name}: provisioned in {res.seconds} s ({res.changed} changed), tools "
          f"{res.tools_version}, kernel {res.probe.get('kernel')}")
    feats = res.probe.get("features", {})
    print("uffd features: " + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in feats.items()))
    return EXIT_OK


def cmd_run(args) -> int:
    from .. import scenarios
    if args.list:
        rows = []
        for s in scenarios.CATALOGUE:
            own = ", ".join(f"{k}={v}" for k, v in s.defaults().items()
                            if k not in scenarios.COMMON or k in s.flags)
            rows.append([s.id, s.name, s.min_kernel,
                         {True: "consistent", False: "inconsistent", None: "?"}[
                             s.expect_consistent], s.title, own])
        table(["id", "name", "kernel", "expected", "what", "scenario parameters"], rows)
        print("\ncommon parameters (--param k=v): " + ", ".join(
            f"{p.name} ({p.default})" for p in scenarios.COMMON.values()))
        return EXIT_OK
    if args.bisect:
        return _run_bisect(args)
    if not args.scenario:
        raise scenarios.ScenarioError("run: expected a scenario id or name (see --list)")
    from .. import api
    from ..runner import prepare
    _check_vm_choice(args)
    vm = _run_vm(args, lab_of(args), fresh=False)
    params = parse_params(args.param)
    prepare(vm, args.scenario, params, args.timeout)     # fail before booting anything
    res = api.run_and_store(vm, args.scenario, params, args.timeout,   # says where it went
                            floors=args.floors)
    _print_run(res)
    if not res.status.ran:
        return EXIT_FAIL
    if res.as_expected is False:
        print(f"  verdict differs from the scenario's expectation "
              f"({'consistent' if res.expect_consistent else 'inconsistent'} on a correct "
              f"kernel)", file=sys.stderr)
        return EXIT_UNEXPECTED
    return EXIT_OK


def _print_run(res) -> None:
    s = res.summary or {}
    lat = s.get("fault_latency_us", {})
    print(f"run {res.run_id}: {res.scenario} ({res.scenario_name}) on {res.vm}, kernel "
          f"{res.kernel}, {res.accel}: {res.status.upper()}")
    if s:
        print(f"  snapshot {s.get('snapshot_ms')} ms, faults {s.get('faults_total')}, "
              f"latency p50 {lat.get('p50')} us p99 {lat.get('p99')} us, max stall "
              f"{s.get('writer_stall_max_ms')} ms, mismatched pages "
              f"{s.get('mismatched_pages')} {s.get('mismatches_by_cause') or ''}")
    from ..report.tables import floor_rows  # no pandas: rows are tuples
    for label, v, unit in floor_rows(res):
        print(f"  {label}: {v:g} {unit}")
    if res.error:
        print(f"  error: {res.error}", file=sys.stderr)


def _check_vm_choice(args) -> None:
    """--image and --vm both name what to run on: one or the other."""
    if args.image is not None and args.vm is not None:
        raise argparse.ArgumentTypeError(
            f"run: --image and --vm are mutually exclusive (a VM of that image, or that VM "
            f"of the lab file); got --image {args.image} and --vm {args.vm}")


def image_shape(lab, image: str) -> tuple[int, int]:
    """(memory, cpus) of a VM of `image`: those of the lab file's first VM
    that boots it, else a VM's defaults."""
    from ..config import VMSpec
    spec = next((v for v in lab.vms.values() if v.image == image), None)
    if spec is None:
        return VMSpec.model_fields["memory"].default, VMSpec.model_fields["cpus"].default
    return spec.memory, spec.cpus


def _run_vm(args, lab, fresh: bool):
    """The VM `run` uses: one of --image's shape (with `fresh`, a VM of its
    own, which the caller stops), else --vm or the lab file's first VM."""
    from ..vm import VM
    if args.image is None:
        return VM(lab, args.vm, Renderer())
    memory, cpus = image_shape(lab, args.image)
    return VM.for_shape(lab, args.image, memory, cpus, listener=Renderer(), fresh=fresh)


# -- run --bisect: exit codes as `git bisect run` reads them ---------------------------
# 0 good; 1 to 127 except 125 bad; 125 skip (this commit cannot be tested);
# 128 and above stop the bisection (git bisect run aborts).
EXIT_BISECT_GOOD = 0
EXIT_BISECT_BAD = 1
EXIT_BISECT_SKIP = 125
EXIT_BISECT_ABORT = 128
BISECT_WORDS = {EXIT_BISECT_GOOD: "good", EXIT_BISECT_BAD: "bad",
                EXIT_BISECT_SKIP: "skip", EXIT_BISECT_ABORT: "abort"}


def bisect_exit(outcome) -> tuple[int, str]:
    """How `git bisect run` is to read one `uffdlab run --bisect`: (exit
    code, why). `outcome` is the run's result (a RunResult), or the
    exception that ended the command before there was one.

    good  (0)   the run finished with the verdict its scenario expects on a
                correct kernel
    bad   (1)   it finished with the other verdict, or it failed or timed
                out on this kernel (a crash, a hang, the tool failing in the
                guest)
    skip  (125) this commit cannot be tested: its kernel or the image did
                not build, the VM did not boot (a panic at boot included) or
                could not be provisioned, the kernel lacks a feature the
                scenario needs, or the run finished without a consistency
                verdict (nothing to judge, so never good)
    abort (128) the command line or the lab file is wrong (unknown scenario
                or image, a bad --param, a lab file error), the scenario
                expects no particular verdict, or uffdlab or this host failed
                some other way: not this commit's doing, so no other commit
                would fare better, and every step would be marked wrongly
    """
    if isinstance(outcome, BaseException):
        return _bisect_error(outcome)
    from ..model import Judgement, judge
    res = outcome
    what = f"{res.scenario} on kernel {res.kernel}"
    j = judge(res.status, res.consistent, res.expect_consistent)
    if j == Judgement.EXPECTED:
        return EXIT_BISECT_GOOD, f"{what}: {_verdict(res.consistent)}, as on a correct kernel"
    if j == Judgement.UNEXPECTED:
        return EXIT_BISECT_BAD, (f"{what}: {_verdict(res.consistent)}, expected "
                                 f"{_verdict(res.expect_consistent)} on a correct kernel")
    if j == Judgement.UNFINISHED:
        return EXIT_BISECT_BAD, (f"{what}: the run {res.status}"
                                 + (f": {_first_line(res.error)}" if res.error else ""))
    if j == Judgement.UNVERIFIED:
        return EXIT_BISECT_SKIP, f"{what}: the run finished without a consistency verdict"
    return EXIT_BISECT_ABORT, (f"{res.scenario} expects no particular verdict on a correct "
                               f"kernel: nothing tells good from bad")


def _bisect_error(e: BaseException) -> tuple[int, str]:
    from ..config import ConfigError
    from ..images import ImageError
    from ..kernel import KernelError
    from ..provision import ProvisionError
    from ..scenarios import MissingFeature, ScenarioError
    from ..ssh import SSHError
    from ..template import TemplateError
    from ..vm import VMError
    untestable = ((KernelError, "kernel build failed"), (ImageError, "image build failed"),
                  (VMError, "boot failed"), (SSHError, "SSH to the VM failed"),
                  (ProvisionError, "provisioning failed"), (TemplateError, "template failed"),
                  (MissingFeature, "the kernel cannot run the scenario"))
    for cls, what in untestable:
        if isinstance(e, cls):
            return EXIT_BISECT_SKIP, f"{what}: {_first_line(e)}"
    if isinstance(e, ConfigError):
        problems = getattr(e, "problems", None) or [e]
        return EXIT_BISECT_ABORT, f"lab file error: {_first_line(problems[0])}"
    if isinstance(e, (ScenarioError, argparse.ArgumentTypeError)):
        return EXIT_BISECT_ABORT, f"bad input: {_first_line(e)}"
    return EXIT_BISECT_ABORT, (f"{type(e).__name__}: {_first_line(e)} (uffdlab or this host "
                               f"failed, not this commit: fix that, then git bisect run again)")


def _verdict(consistent) -> str:
    return "consistent" if consistent else "inconsistent"


def _first_line(text) -> str:
    """A message's first line; one that ends in ':' with the line it announces."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else ""


def _report_error(e: BaseException) -> None:
    """An error on stderr, as main() prints it."""
    import os
    import traceback

    from ..config import ConfigError
    from ..scenarios import ScenarioError
    if isinstance(e, ConfigError):
        print("\n".join(e.problems), file=sys.stderr)
    elif isinstance(e, (ScenarioError, argparse.ArgumentTypeError)):
        print(f"uffdlab: {e}", file=sys.stderr)
    else:
        if os.environ.get("UFFDLAB_DEBUG"):
            traceback.print_exception(e, file=sys.stderr)
        print(f"uffdlab: {type(e).__name__}: {e}", file=sys.stderr)


def _run_bisect(args) -> int:
    """`run --bisect`, one step of `git bisect run`: a fresh VM of --image
    boots the kernel built from its tree as it is now (this commit), runs
    the scenario, and is stopped whatever happened. The exit code is
    bisect_exit's; the last line on stderr says which it is and why."""
    from .. import api
    from ..runner import prepare
    from ..scenarios import ScenarioError
    vm = None
    try:
        try:
            if not args.scenario:
                raise ScenarioError("run: expected a scenario id or name (see --list)")
            if args.image is None:
                raise argparse.ArgumentTypeError(
                    "run --bisect: expected --image NAME, the image whose kernel tree is "
                    "being bisected (each step boots a fresh VM of it)")
            _check_vm_choice(args)
            lab = lab_of(args)
            vm = _run_vm(args, lab, fresh=True)
            params = parse_params(args.param)
            prep = prepare(vm, args.scenario, params, args.timeout)   # before building
            if prep.scenario.expect_consistent is None:
                raise ScenarioError(f"run --bisect: {prep.scenario.id} expects no particular "
                                    f"verdict on a correct kernel, so no run of it is good "
                                    f"or bad; bisect a scenario that expects one (see --list)")
            if not lab.image_spec(args.image).kernel.is_local:
                print(f"bisect: note: image {args.image} boots a packaged kernel, the same "
                      f"at every step; a kernel to bisect is a tree (kernel.tree)",
                      file=sys.stderr)
            # Build (the tree's kernel at this commit), boot and provision first:
            # their failures mean this commit cannot be tested, not that it is bad.
            api.ready(vm)
            outcome = api.run_and_store(vm, args.scenario, params, args.timeout)
            _print_run(outcome)
        except Exception as e:            # KeyboardInterrupt goes on: main() exits 130
            _report_error(e)
            outcome = e
    finally:
        if vm is not None:
            _stop(vm)
    code, why = bisect_exit(outcome)
    print(f"bisect: {BISECT_WORDS[code]} ({code}): {why}", file=sys.stderr)
    return code


def _stop(vm) -> None:
    """Stop the step's own VM; a VM that will not stop is said, not fatal
    (the verdict stands)."""
    try:
        vm.down()
    except Exception as e:
        print(f"uffdlab: could not stop VM {vm.name}: {type(e).__name__}: {e} "
              f"('uffdlab down --all' stops it)", file=sys.stderr)


def _last_arg(text: str) -> int:
    """--last N: a run count SQLite can take (argparse names the flag)."""
    from ..results import INT64_MAX
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of runs, got {text!r}") \
            from None
    if not 0 < n <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"expected a number of runs from 1 to {INT64_MAX}, "
                                         f"got {text!r}")
    return n


def _status_arg(text: str) -> str:
    """--status: one of the stored statuses, any case."""
    from ..model import Status
    value = text.strip().lower()
    if value not in {str(s) for s in Status}:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(Status)}, got {text!r}")
    return value


def _vm_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a VM name (as in lab.yml), got {text!r}")
    return text.strip()


def _scenario_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a scenario id or name (S3, multi-writer), "
                                         f"got {text!r}")
    return text.strip()


def _kernel_arg(text: str) -> str:
    value = text.strip()
    if not value or any(c.isspace() for c in value):
        raise argparse.ArgumentTypeError(
            f"expected a kernel release, or its start up to a '.', '-' or '+' (6.1 matches "
            f"6.1.0-37-amd64, not 6.12.38), got {text!r}")
    return value


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SINCE_EXPECTED = ("expected an ISO date or date and time (2026-11-30, 2026-11-30T04:00; "
                   "local time unless it ends in Z or +HH:MM) or an age (30m, 2h, 3d, 1w)")


def _since_arg(text: str) -> float:
    """--since: the Unix time from which runs are listed."""
    import datetime
    import re
    import time
    value = text.strip()
    # At most 12 digits: any age the clock can hold, and int() never refuses it.
    age = re.fullmatch(r"(\d{1,12})\s*([smhdw])", value.lower())
    if age:
        seconds = int(age[1]) * _AGE_UNITS[age[2]]
        if seconds == 0:
            raise argparse.ArgumentTypeError(f"{_SINCE_EXPECTED}; an age above zero, "
                                             f"got {text!r}")
        return max(time.time() - seconds, 0.0)
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except (ValueError, OverflowError, OSError):   # not ISO, or out of the clock's range
        raise argparse.ArgumentTypeError(f"{_SINCE_EXPECTED}, got {text!r}") from None


def _import_spooled(path) -> None:
    """Store the runs an earlier store could not put in the database."""
    from ..results import NotResultsDatabaseError, ResultsDB, ResultsError, import_spool
    try:
        with ResultsDB(path) as db:
            report = import_spool(db)
    except NotResultsDatabaseError:
        raise                          # not ours to write: the caller says so
    except (ResultsError, OSError) as e:
        print(f"uffdlab: spooled runs not imported: {e}", file=sys.stderr)
        return
    if report.imported:
        print(f"imported {len(report.imported)} spooled run(s) into {path}", file=sys.stderr)
    for problem in report.problems:
        print(f"uffdlab: spool: {problem}", file=sys.stderr)


def _query(path, read):
    """read(db) on the results database at `path` (read-only, after importing
    spooled runs): (its value, None), or (None, exit code) once the reason is
    on stderr. A missing database raises NoResultsDatabaseError."""
    import sqlite3

    from ..results import (
        NoResultsDatabaseError,
        NotResultsDatabaseError,
        ResultsDB,
        ResultsError,
        RunNotFoundError,
        spooled_files,
    )
    try:
        if spooled_files(path):
            _import_spooled(path)
        with ResultsDB(path, readonly=True) as db:
            return read(db), None
    except NoResultsDatabaseError:
        raise
    except (NotResultsDatabaseError, RunNotFoundError) as e:   # the user's input to change
        print(f"uffdlab: {e}", file=sys.stderr)
        return None, EXIT_CONFIG
    except ResultsError as e:
        print(f"uffdlab: {e}", file=sys.stderr)
        return None, EXIT_FAIL
    except sqlite3.Error as e:         # a damaged file: name it
        print(f"uffdlab: {path}: cannot read the results database: {e}", file=sys.stderr)
        return None, EXIT_FAIL


def _table_width() -> int:
    """The terminal's width; COLUMNS wins, and output that is not a terminal
    (a pipe, a file) gets 100 columns."""
    import os
    import shutil
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size((100, 24)).columns
    return 100


# The listing's filters, by flag: they select runs, so `results show` refuses them.
_FILTERS = {"--last": "last", "--scenario": "scenario", "--status": "status", "--vm": "vm",
            "--kernel": "kernel", "--since": "since"}


def _emit(text: str) -> None:
    """Print to stdout; a reader that stopped reading (| head) is no error."""
    import os
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Else Python's final flush of stdout fails again, noisily, at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):    # params, unreadable: one JSON cell
        return json.dumps(v, separators=(",", ":"), default=str)
    return v


def _print_runs(rows: list[dict], fmt: str) -> None:
    """Runs as a JSON array or CSV (header + rows) on stdout, for scripts."""
    import csv
    import io

    from ..results import LIST_FIELDS
    if fmt == "json":
        _emit(json.dumps(rows, indent=2, default=str))
        return
    fields = [*LIST_FIELDS, "unreadable"]
    text = io.StringIO()
    out = csv.writer(text, lineterminator="\n")
    out.writerow(fields)
    for r in rows:
        out.writerow([_csv_value(r.get(f)) for f in fields])
    _emit(text.getvalue().rstrip("\n"))


def _list_runs(args) -> int:
    from ..results import NoResultsDatabaseError, format_table, spooled_files
    path = lab_of(args).results_path
    fmt = "json" if args.json else "csv" if args.csv else None
    filters = {key: getattr(args, key) for key in _FILTERS.values()}
    try:
        rows, code = _query(path, lambda db: db.runs(**filters))
    except NoResultsDatabaseError as e:
        if fmt:                        # scripts still get a valid, empty document
            _print_runs([], fmt)
        print(e, file=sys.stderr if fmt else sys.stdout)
        rows, code = None, None
    if code is not None:
        return code
    if rows is not None:
        if fmt:
            _print_runs(rows, fmt)
        elif rows:
            _emit(format_table(rows, width=_table_width()))
        else:
            some = any(v is not None for v in filters.values())
            print(f"no runs in {path}" + (" match these filters" if some else ""))
    waiting = spooled_files(path)
    if waiting:
        print(f"{len(waiting)} spooled run(s) in {waiting[0].parent} are not in the "
              f"database yet (not listed)", file=sys.stderr)
    return EXIT_OK


def _show_run(args) -> int:
    from ..results import NoResultsDatabaseError, find_notebook, format_run
    if args.action != "show":
        print(f"uffdlab: results: expected `show RUN` or no argument, got {args.action!r}",
              file=sys.stderr)
        return EXIT_CONFIG
    if not args.run or not args.run.strip():
        print(f"uffdlab: results show: expected a run id or a unique prefix of one (as "
              f"listed by `uffdlab results`), got {args.run or ''!r}", file=sys.stderr)
        return EXIT_CONFIG
    given = [flag for flag, key in _FILTERS.items() if getattr(args, key) is not None]
    if args.csv:
        given.append("--csv")
    if given:
        print(f"uffdlab: results show: {', '.join(given)} "
              f"{'is' if len(given) == 1 else 'are'} for the listing; show takes one RUN "
              f"and --json", file=sys.stderr)
        return EXIT_CONFIG
    path = lab_of(args).results_path
    try:
        run, code = _query(path, lambda db: db.get(args.run.strip()))
    except NoResultsDatabaseError as e:
        print(f"uffdlab: {e}; no run {args.run!r}", file=sys.stderr)
        return EXIT_CONFIG
    if code is not None:
        return code
    notebook = find_notebook(path, run["run_id"])
    if args.json:                      # everything stored, for scripts
        _emit(json.dumps({**run, "notebook": None if notebook is None else str(notebook)},
                         indent=2, default=str))
    else:
        _emit(format_run(run, notebook))
    return EXIT_OK


def cmd_results(args) -> int:
    return _list_runs(args) if args.action is None else _show_run(args)


def _times_arg(text: str) -> int:
    """--times N (argparse names the flag)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of repeats, "
                                         f"got {text!r}") from None
    if not 1 <= n <= 100:
        raise argparse.ArgumentTypeError(f"expected 1 to 100 repeats, got {text!r}")
    return n


def cmd_rerun(args) -> int:
    from ..rerun import rerun
    from ..results import NoResultsDatabaseError, RunNotFoundError
    try:
        cmp = rerun(lab_of(args), args.run_id, args.times, Renderer())
    except (RunNotFoundError, NoResultsDatabaseError) as e:    # RUN_ID to change: bad input
        print(f"uffdlab: rerun: {e}", file=sys.stderr)
        return EXIT_CONFIG
    rows = cmp.table().reset_index().values.tolist()
    table(["metric", "original", "repeats", "spread", "original within"],
          [["–" if v is None or v != v else v for v in row] for row in rows])
    print(cmp.summary())
    print("repeats stored: " + " ".join(r.run_id for r in cmp.runs))
    if not cmp.all_ran:
        return EXIT_FAIL
    return EXIT_OK if cmp.same_verdict else EXIT_UNEXPECTED


def register(sub) -> None:
    rr = sub.add_parser("rerun", help="run a stored run again, as it was, and compare")
    rr.add_argument("run_id", metavar="RUN_ID")
    rr.add_argument("--times", type=_times_arg, default=3, metavar="N",
                    help="repeats, 1 to 100 (default 3); the spread the original is held "
                    "against needs at least 2")
    rr.set_defaults(func=cmd_rerun)

    p = sub.add_parser("provision", help="provision a VM with Ansible (boots it if needed)")
    p.add_argument("vm", nargs="?")
    p.set_defaults(func=cmd_provision)

    r = sub.add_parser("run", help="run a catalogue scenario (S1..S10 or its name)")
    r.add_argument("scenario", nargs="?")
    r.add_argument("--vm", help="VM to run on (the first in lab.yml by default)")
    r.add_argument("--image", metavar="NAME",
                   help="run on a VM of this image instead, shaped like lab.yml's first VM "
                   "of it (not with --vm)")
    r.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="scenario parameter, repeatable (see --list)")
    r.add_argument("--timeout", type=float, help="seconds (default: duration + 90)")
    r.add_argument("--list", action="store_true", help="print the catalogue")
    r.add_argument("--floors", action="store_true",
                   help="then measure the guest's memcpy and fault round trip (uffd-bench, "
                   "about 2 s under TCG), store them with the run and print its figures as "
                   "ratios to them")
    r.add_argument("--bisect", action="store_true",
                   help="for `git bisect run`: a fresh VM of --image, stopped after; exit 0 "
                   "verdict as expected, 1 not (or the run failed), 125 the kernel or image "
                   "did not build, boot or provision (skip), 128 bad input (abort)")
    r.set_defaults(func=cmd_run)

    q = sub.add_parser("results", help="stored runs: a table, or one run in full (show RUN)")
    q.add_argument("action", nargs="?", metavar="show", help="show one run in full")
    q.add_argument("run", nargs="?", metavar="RUN", help="a run id, or a unique prefix of one")
    q.add_argument("--last", type=_last_arg, metavar="N", help="only the newest N runs")
    q.add_argument("--scenario", type=_scenario_arg, metavar="S",
                   help="a scenario id or name (S3, multi-writer)")
    q.add_argument("--status", type=_status_arg, metavar="STATUS",
                   help="ok, inconsistent, failed or timeout")
    q.add_argument("--vm", type=_vm_arg, metavar="NAME")
    q.add_argument("--kernel", type=_kernel_arg, metavar="RELEASE",
                   help="a release or its start: 6.1 matches 6.1.0-37-amd64, not 6.12.38")
    q.add_argument("--since", type=_since_arg, metavar="WHEN",
                   help="runs started since WHEN: 2026-11-30, 2026-11-30T04:00 (local "
                   "time), or an age: 30m, 2h, 3d, 1w")
    out = q.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="a JSON array of the runs (with show: everything stored)")
    out.add_argument("--csv", action="store_true", help="CSV: a header, then one run a row")
    q.set_defaults(func=cmd_results)
