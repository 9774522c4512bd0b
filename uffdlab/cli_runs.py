"""CLI commands of the run layers: provision, run, results."""
from __future__ import annotations

import argparse
import sys

from .cli import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, Renderer, _lab, table


def parse_params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--param: expected key=value, got {pair!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def cmd_provision(args) -> int:
    from .provision import provision
    from .vm import VM
    vm = VM(_lab(args), args.vm, Renderer())
    vm.up(reuse=True)
    res = provision(vm)
    print(f"{vm.name}: provisioned in {res.seconds} s ({res.changed} changed), tools "
          f"{res.tools_version}, kernel {res.probe.get('kernel')}")
    feats = res.probe.get("features", {})
    print("uffd features: " + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in feats.items()))
    return EXIT_OK


def cmd_run(args) -> int:
    from . import scenarios
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
    from .runner import prepare, run
    from .vm import VM
    lab = _lab(args)
    vm = VM(lab, args.vm, Renderer())
    params = parse_params(args.param)
    prepare(vm, args.scenario, params, args.timeout)     # fail before booting anything
    from .results import store_run
    res = run(vm, args.scenario, params, args.timeout)
    stored = store_run(lab.results_path, res)   # spools rather than lose the run
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
    if stored.stored:
        print(f"  stored in {lab.results_path}")
    else:
        print(f"  NOT in the database: {stored.message}", file=sys.stderr)
    if stored.imported:
        print(f"  also imported {len(stored.imported)} spooled run(s): "
              f"{', '.join(stored.imported)}")
    for problem in stored.spool_problems:
        print(f"  spool: {problem}", file=sys.stderr)
    return EXIT_OK if res.status in ("ok", "inconsistent") else EXIT_FAIL


def _last_arg(text: str) -> int:
    """--last N: a run count SQLite can take (argparse names the flag)."""
    from .results import _INT64_MAX
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of runs, got {text!r}")
    if not 0 < n <= _INT64_MAX:
        raise argparse.ArgumentTypeError(f"expected a number of runs from 1 to {_INT64_MAX}, "
                                         f"got {text!r}")
    return n


def cmd_results(args) -> int:
    import sqlite3

    from .results import (NoResultsDatabaseError, NotResultsDatabaseError, ResultsDB,
                          ResultsError, format_table, import_spool, spooled_files)
    lab = _lab(args)
    path = lab.results_path
    if spooled_files(path):            # runs an earlier store could not put in the database
        try:
            with ResultsDB(path) as db:
                report = import_spool(db)
        except NotResultsDatabaseError as e:
            print(f"uffdlab: {e}", file=sys.stderr)
            return EXIT_CONFIG
        except (ResultsError, OSError) as e:
            print(f"uffdlab: spooled runs not imported: {e}", file=sys.stderr)
        else:
            if report.imported:
                print(f"imported {len(report.imported)} spooled run(s) into {path}",
                      file=sys.stderr)
            for problem in report.problems:
                print(f"uffdlab: spool: {problem}", file=sys.stderr)
    try:
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


def cmd_sweep(args) -> int:
    from .sweep import load_grid, run_sweep
    lab = _lab(args)
    grid = load_grid(args.grid)
    print(f"sweep: {len(grid.points())} points of {grid.notebook}", file=sys.stderr)
    res = run_sweep(lab, grid, Renderer())
    rows = [[str(p["index"]), ", ".join(f"{k}={v}" for k, v in p["params"].items()),
             p["status"], p["run_id"] or "", f"{p['seconds']:.0f} s", (p["error"] or "")[:60]]
            for p in res.points]
    table(["#", "point", "status", "run", "time", "error"], rows)
    print(f"executed notebooks and index.json: {res.directory}")
    if res.report:
        print(f"sweep report: {res.report}")
    return EXIT_OK if not res.failed else EXIT_FAIL


def cmd_demo(args) -> int:
    """The README's main job: the default image, then 10-snapshot executed
    with its defaults, leaving the notebook and the run in the database."""
    import time

    import papermill

    from .images import ImageStore
    from .sweep import KERNEL, NOTEBOOKS, POINT_NOTEBOOK, result_line
    lab = _lab(args)
    name, spec = lab.vm_spec(args.vm)
    ImageStore(lab, Renderer()).build(spec.image)
    out_dir = lab.results_path.parent / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"10-snapshot-{time.strftime('%Y%m%d-%H%M%S')}.ipynb"
    print(f"executing {POINT_NOTEBOOK} (boot, provision, run; several minutes under TCG)",
          file=sys.stderr)
    papermill.execute_notebook(str(NOTEBOOKS / POINT_NOTEBOOK), str(out),
                               parameters={"lab_path": str(lab.source.resolve()),
                                           "image": spec.image,
                                           "teardown": not args.keep},
                               kernel_name=KERNEL, progress_bar=True, cwd=str(NOTEBOOKS),
                               log_output=args.verbose)
    found = result_line(out) or {}
    print(f"run {found.get('run_id')}: {found.get('status')}")
    print(f"executed notebook: {out}")
    print(f"results database:  {lab.results_path} ('uffdlab results')")
    return EXIT_OK


def cmd_lab(args) -> int:
    """JupyterLab on notebooks/ with the project's kernel registered."""
    import os
    import subprocess

    from .sweep import NOTEBOOKS
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name",
                    "uffdlab", "--display-name", "uffd-lab (venv)"], check=True,
                   capture_output=True)
    argv = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ip={args.ip}",
            f"--port={args.port}", f"--notebook-dir={NOTEBOOKS}"]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    print("starting JupyterLab; open the URL it prints (http://...?token=...)", file=sys.stderr)
    os.execv(sys.executable, argv)


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

    w = sub.add_parser("sweep", help="execute 10-snapshot for every point of a grid")
    w.add_argument("grid", metavar="GRID.yml")
    w.set_defaults(func=cmd_sweep)

    d = sub.add_parser("demo", help="the main job: image, then 10-snapshot executed")
    d.add_argument("vm", nargs="?", help="whose image to use (the first VM by default)")
    d.add_argument("--keep", action="store_true", help="leave the VM running")
    d.add_argument("--verbose", action="store_true", help="show the notebook's output")
    d.set_defaults(func=cmd_demo)

    j = sub.add_parser("lab", help="start JupyterLab on notebooks/")
    j.add_argument("--ip", default="127.0.0.1")
    j.add_argument("--port", type=int, default=8888)
    j.set_defaults(func=cmd_lab)
