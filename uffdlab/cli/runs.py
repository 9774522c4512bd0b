# SPDX-License-Identifier: MIT
"""Commands for provisioning, runs and results: provision, run, results."""
from __future__ import annotations

import argparse
import sys

from .common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, Renderer, lab_of, table


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
    if not args.scenario:
        raise scenarios.ScenarioError("run: expected a scenario id or name (see --list)")
    from ..api import run_and_store
    from ..runner import prepare
    from ..vm import VM
    vm = VM(lab_of(args), args.vm, Renderer())
    params = parse_params(args.param)
    prepare(vm, args.scenario, params, args.timeout)     # fail before booting anything
    res = run_and_store(vm, args.scenario, params, args.timeout)   # says where it went
    s = res.summary or {}
    lat = s.get("fault_latency_us", {})
    print(f"run {res.run_id}: {res.scenario} ({res.scenario_name}) on {res.vm}, kernel "
          f"{res.kernel}, {res.accel}: {res.status.upper()}")
    if s:
        print(f"  snapshot {s.get('snapshot_ms')} ms, faults {s.get('faults_total')}, "
              f"latency p50 {lat.get('p50')} us p99 {lat.get('p99')} us, max stall "
              f"{s.get('writer_stall_max_ms')} ms, mismatched pages "
              f"{s.get('mismatched_pages')} {s.get('mismatches_by_cause') or ''}")
    if res.error:
        print(f"  error: {res.error}", file=sys.stderr)
    return EXIT_OK if res.status.ran else EXIT_FAIL


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


def cmd_results(args) -> int:
    import sqlite3

    from ..results import (
        NoResultsDatabaseError,
        NotResultsDatabaseError,
        ResultsDB,
        ResultsError,
        format_table,
        spooled_files,
    )
    path = lab_of(args).results_path
    try:
        if spooled_files(path):
            _import_spooled(path)
        with ResultsDB(path, readonly=True) as db:
            rows = db.runs(last=args.last, scenario=args.scenario)
    except NoResultsDatabaseError as e:
        print(e)
        rows = None
    except NotResultsDatabaseError as e:
        print(f"uffdlab: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ResultsError as e:
        print(f"uffdlab: {e}", file=sys.stderr)
        return EXIT_FAIL
    except sqlite3.Error as e:         # a damaged file: name it
        print(f"uffdlab: {path}: cannot read the results database: {e}", file=sys.stderr)
        return EXIT_FAIL
    if rows is not None:
        print(format_table(rows) if rows else f"no runs in {path}")
    waiting = spooled_files(path)
    if waiting:
        print(f"{len(waiting)} spooled run(s) in {waiting[0].parent} are not in the "
              f"database yet (not listed)", file=sys.stderr)
    return EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("provision", help="provision a VM with Ansible (boots it if needed)")
    p.add_argument("vm", nargs="?")
    p.set_defaults(func=cmd_provision)

    r = sub.add_parser("run", help="run a catalogue scenario (S1..S10 or its name)")
    r.add_argument("scenario", nargs="?")
    r.add_argument("--vm", help="VM to run on (the first in lab.yml by default)")
    r.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="scenario parameter, repeatable (see --list)")
    r.add_argument("--timeout", type=float, help="seconds (default: duration + 90)")
    r.add_argument("--list", action="store_true", help="print the catalogue")
    r.set_defaults(func=cmd_run)

    q = sub.add_parser("results", help="stored runs")
    q.add_argument("--last", type=_last_arg, metavar="N", help="only the newest N runs")
    q.add_argument("--scenario", metavar="S")
    q.set_defaults(func=cmd_results)
