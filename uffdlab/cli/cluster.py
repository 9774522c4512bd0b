# SPDX-License-Identifier: MIT
"""Commands for lab hosts: cluster up|down HOSTS.yml, cluster status."""
from __future__ import annotations

import sys

from .common import EXIT_FAIL, EXIT_OK, Renderer, lab_of, table


def cmd_cluster_up(args) -> int:
    from ..labhost import cluster_up, load_hosts
    hosts = load_hosts(args.hosts)            # checked before the lab file is needed
    lab = lab_of(args)
    res = cluster_up(hosts, lab, Renderer(), join_timeout=args.timeout)
    table(["worker", "address", "vm_slots"],
          [[name, w["address"], _slots(w)] for name, w in res.workers.items()])
    if res.started_scheduler:
        print(f"started a dask scheduler here: {res.scheduler} ('uffdlab cluster down "
              f"{args.hosts}' stops it)")
    print(f"dashboard: {res.dashboard or _no_dashboard()}")
    print("to run sweeps on these hosts, put this in the lab file:")
    print(f"  cluster: {{scheduler: {res.scheduler}}}")
    return EXIT_OK


def cmd_cluster_down(args) -> int:
    from ..labhost import cluster_down, load_hosts
    hosts = load_hosts(args.hosts)
    res = cluster_down(hosts, lab_of(args), Renderer())
    if res.stopped:
        print(f"worker stopped and disabled on: {', '.join(res.stopped)}")
    if res.not_running:
        print(f"not running (no worker to stop): {', '.join(res.not_running)}")
    if res.scheduler is not None:
        print(f"stopped the dask scheduler this lab started ({res.scheduler.address}, "
              f"pid {res.scheduler.process.pid})")
    return EXIT_OK


def cmd_cluster_status(args) -> int:
    from ..labhost import LabHostError, cluster_status, default_scheduler
    address = args.scheduler or default_scheduler(lab_of(args))
    if address is None:
        print("uffdlab: no scheduler to ask: the lab file has no cluster.scheduler and "
              "'uffdlab cluster up' started none here; give --scheduler tcp://HOST:8786",
              file=sys.stderr)
        return EXIT_FAIL
    try:
        rows, dashboard = cluster_status(address)
    except LabHostError as e:
        print(f"uffdlab: {e}", file=sys.stderr)
        return EXIT_FAIL
    print(f"scheduler: {address}, {len(rows)} worker(s)")
    table(["worker", "host", "vm_slots", "processing"],
          [[r.name, r.host, f"{r.vm_slots:g}", str(r.processing)] for r in rows])
    print(f"dashboard: {dashboard or _no_dashboard()}")
    return EXIT_OK


def _slots(worker: dict) -> str:
    return f"{(worker.get('resources') or {}).get('vm_slots', 0):g}"


def _no_dashboard() -> str:
    return "none (the scheduler serves one when the bokeh package is installed next to it)"


def _scheduler_flag(value: str) -> str:
    import argparse

    from ..config import _scheduler_address
    try:
        return _scheduler_address(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--scheduler: {e}") from None


def _seconds(value: str) -> float:
    import argparse
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds above 0 and at most 86400, "
                                         f"got {value!r}")
    return seconds


def register(sub) -> None:
    c = sub.add_parser("cluster", help="lab hosts running Dask workers for sweeps")
    csub = c.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = csub.add_parser("up", help="prepare the hosts of HOSTS.yml and start their workers")
    up.add_argument("hosts", metavar="HOSTS.yml")
    up.add_argument("--timeout", type=_seconds, default=600, metavar="SECONDS",
                    help="how long to wait for the workers to join (default 600)")
    up.set_defaults(func=cmd_cluster_up)
    down = csub.add_parser("down", help="stop the workers of HOSTS.yml (and the scheduler "
                           "'up' started)")
    down.add_argument("hosts", metavar="HOSTS.yml")
    down.set_defaults(func=cmd_cluster_down)
    st = csub.add_parser("status", help="the scheduler's workers and dashboard")
    st.add_argument("--scheduler", type=_scheduler_flag, metavar="ADDR",
                    help="tcp://HOST:PORT (default: the lab file's cluster.scheduler, else "
                    "the one 'cluster up' started here)")
    st.set_defaults(func=cmd_cluster_status)
