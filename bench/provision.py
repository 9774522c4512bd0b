#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Provisioning and per-run overhead, next to baselines measured in the same
run on the same VM:

  fresh provisioning      vs  copying the sources and running make by hand over SSH
  no-change re-run        vs  one bare SSH command round trip
  `uffdlab run` overhead  (wall time minus the scenario's own elapsed_ms)
                          vs  the same uffd-snapshot command over a bare SSH session

Usage: .venv/bin/python bench/provision.py [--lab lab.yml] [--image trixie] [--runs 3]
Boots a VM of its own (bench-<image>) and stops it at the end. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from uffdlab import scenarios  # noqa: E402
from uffdlab.api import open_lab  # noqa: E402
from uffdlab.provision import provision  # noqa: E402
from uffdlab.results import ResultsDB  # noqa: E402
from uffdlab.runner import prepare, run  # noqa: E402
from uffdlab.tools import sources_tarball  # noqa: E402
from uffdlab.vm import VM  # noqa: E402

TARGETS = {"fresh": 30.0, "rerun": 10.0, "overhead": 2.0}


def timed(fn):
    t = time.monotonic()
    out = fn()
    return time.monotonic() - t, out


def bare_build(vm) -> float:
    """The floor of provisioning: push the tarball and make, nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        tar = sources_tarball(Path(tmp) / "src.tar")
        t = time.monotonic()
        with vm.session() as s:
            s.put(tar, "/tmp/bench-src.tar")
            s.run("rm -rf /tmp/bench-src && mkdir /tmp/bench-src && "
                  "tar -xf /tmp/bench-src.tar -C /tmp/bench-src && make -s -C /tmp/bench-src -j2",
                  check=True)
        return time.monotonic() - t


def bench_lab(base_lab, image: str, tmp: Path):
    """A lab file with one VM of the bench's own, so the CLI can name it."""
    import yaml
    data = yaml.safe_load(base_lab.source.read_text())
    data.update(cache_dir=str(base_lab.cache_path), results=str(tmp / "bench.sqlite"),
                vms={f"bench-{image}": {"image": image, "memory": "1536M", "cpus": 2}})
    path = tmp / "lab.yml"
    path.write_text(yaml.safe_dump(data))
    return open_lab(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lab", default=None)
    ap.add_argument("--image", default="trixie")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="uffdlab-bench-"))
    lab = bench_lab(open_lab(args.lab), args.image, tmp)
    vm = VM(lab, f"bench-{args.image}")
    print(f"booting {vm.name} ...", file=sys.stderr)
    try:
        st = vm.up()
        rows = []
        t_bare_build = bare_build(vm)
        t_fresh, fresh = timed(lambda: provision(vm))
        t_rerun = statistics.median(timed(lambda: provision(vm))[0] for _ in range(2))
        ssh_rt = statistics.median(timed(lambda: vm.session().run("true"))[0] for _ in range(3))

        params = {"size": "16M", "duration": 0.5}
        prep = prepare(vm, "S1", params)
        cmd = shlex.join(scenarios.command(prep.scenario, prep.params,
                                           lab.provision.tools_dir, prep.timeout))
        api_over, bare_over, cli_over = [], [], []
        for _ in range(args.runs):
            t, res = timed(lambda: run(vm, "S1", params))
            api_over.append(t - res.summary["elapsed_ms"] / 1000)
            t, out = timed(lambda: vm.session().run(cmd))
            summary = [json.loads(line) for line in out.stdout.splitlines()
                       if '"summary"' in line][-1]
            bare_over.append(t - summary["elapsed_ms"] / 1000)
            t, p = timed(lambda: subprocess.run(
                [sys.executable, "-m", "uffdlab", "--lab", str(lab.source), "run", "S1",
                 "--vm", vm.name, "--param", "size=16M", "--param", "duration=0.5"],
                capture_output=True, text=True, cwd=REPO))
            with ResultsDB(lab.results_path) as db:
                last = db.runs(last=1)[0]
            cli_over.append(t - db_elapsed(lab, last["run_id"]))
        med = statistics.median
        rows.append(("fresh provisioning", t_fresh, "bare copy + make", t_bare_build,
                     TARGETS["fresh"]))
        rows.append(("no-change re-run", t_rerun, "one SSH round trip", ssh_rt,
                     TARGETS["rerun"]))
        rows.append(("run overhead (API)", med(api_over), "bare SSH exec overhead",
                     med(bare_over), TARGETS["overhead"]))
        rows.append(("run overhead (CLI)", med(cli_over), "bare SSH exec overhead",
                     med(bare_over), TARGETS["overhead"]))
        print(f"\nprovisioning: image {args.image} (kernel {st.kernel_release}), accel "
              f"{st.accel}, load {os.getloadavg()[0]:.2f}; fresh run changed "
              f"{fresh.changed} tasks")
        print(f"{'figure':24} {'seconds':>8}  {'baseline':24} {'seconds':>8} {'ratio':>6} "
              f"{'target':>7}  verdict")
        for name, value, base_name, base, target in rows:
            ratio = value / base if base else float("nan")
            verdict = "ok" if value <= target else "MISSED"
            print(f"{name:24} {value:8.2f}  {base_name:24} {base:8.2f} {ratio:6.2f}x "
                  f"{'<' + str(target):>7}  {verdict}")
    finally:
        vm.down()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def db_elapsed(lab, run_id: str) -> float:
    with ResultsDB(lab.results_path) as db:
        return db.get(run_id)["summary"]["elapsed_ms"] / 1000


if __name__ == "__main__":
    sys.exit(main())
