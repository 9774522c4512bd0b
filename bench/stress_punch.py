# SPDX-License-Identifier: MIT
"""Stress the --punch-hole injection of uffd-snapshot and collect odd verdicts.

A punch-hole run (writer 0 punches 16 pages of guest RAM right after the
snapshot's instant) must report mismatches of exactly one cause,
"punch-hole".  This driver runs that injection many times with varying
seeds and engine settings, optionally under synthetic CPU load, prints a
table of the cause sets it saw and saves the full JSON Lines of every run
whose causes are not exactly {punch-hole} (or that failed) for analysis.

    python3 bench/stress_punch.py                       # 300 runs, 2 at a time
    python3 bench/stress_punch.py --runs 600 --load 6   # 6 busy loops besides
    python3 bench/stress_punch.py --minutes 5 --jobs 3 --out /tmp/punch

--reader adds, to every run, a process that maps guest RAM through
/proc/PID/fd (a second mapping of the memfd, not registered with uffd, as
QEMU's own mapping of guest RAM is) and reads one byte of every page in a
loop while the run lasts.

--load K starts K busy-loop processes at the default priority (nice 0: the
point is contention, not politeness) and kills them at the end.  --jobs J
runs J tool runs at once.  --minutes caps the wall time: the driver stops
starting runs once it has passed.  Every run uses the arguments of
tests/guest_tools (--writers 2 --punch-hole --verify --rate 100000
--duration 0.4, 16 MiB of RAM) plus one engine setting from --settings, in
turn, and seed = --seed-base + run number.  Only the standard library is
used.  Exit code: 0 if every run gave {punch-hole}, 1 otherwise.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "guest-tools" / "bin" / "uffd-snapshot"
SIZE_BYTES = 16 << 20
BASE_ARGS = ("--size", str(SIZE_BYTES), "--writers", "2", "--punch-hole", "--verify",
             "--rate", "100000", "--duration", "0.4")
# engine settings cycled through: the defaults, the window the defaults had
# before fair rounds (16), then those the campaign used
DEFAULT_SETTINGS = ("", "--copy-ahead 16", "--copy-run 1", "--copy-ahead 1",
                    "--copy-ahead 64 --copy-run 1", "--copy-ahead 512",
                    "--copy-ahead 64 --unprotect faulting", "--release end --copy-ahead 32")
EXPECTED = frozenset({"punch-hole"})
MEMFD_LINK = "/memfd:uffd-lab-guest-ram"     # setup.c's RAM_NAME
# --reader: map the tool's guest RAM through its fd and read every page, forever
READER = r"""
import mmap, os, sys, time
pid, size = int(sys.argv[1]), int(sys.argv[2])
path, end = None, time.monotonic() + 30
while path is None and time.monotonic() < end:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(sys.argv[3]):
                    path = f"/proc/{pid}/fd/{fd}"
                    break
            except OSError:
                pass
    except OSError:
        sys.exit(0)
    time.sleep(0.0005)
if path is None:
    sys.exit(0)
with open(path, "rb") as f:
    m = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
v = memoryview(m)
while True:
    v[::4096].tobytes()
"""


def start_load(k: int) -> list[subprocess.Popen]:
    """K busy-loop processes at nice 0 (the caller's priority)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(k)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def parse_records(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"type": "unparsable", "line": line})
    return out


def run_one(tool: Path, n: int, seed: int, setting: str, timeout: float,
            reader: bool = False) -> dict:
    argv = [str(tool), *BASE_ARGS, "--seed", str(seed), *shlex.split(setting)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rd = None
    if reader:
        rd = subprocess.Popen([sys.executable, "-c", READER, str(proc.pid),
                               str(SIZE_BYTES), MEMFD_LINK],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        rc = -999
    finally:
        if rd is not None:
            rd.kill()
            rd.wait()
    records = parse_records(stdout)
    summary = next((r for r in records if r.get("type") == "summary"), None)
    if rc == 0 and summary is not None:
        causes = frozenset(summary.get("mismatches_by_cause") or {})
        verdict = ",".join(sorted(causes)) or "(consistent)"
    else:
        causes = None
        verdict = f"exit {rc}"
    return {"n": n, "seed": seed, "setting": setting, "argv": argv, "rc": rc,
            "stdout": stdout, "stderr": stderr, "records": records, "summary": summary,
            "causes": causes, "verdict": verdict, "wall_s": time.monotonic() - t0,
            "loadavg": os.getloadavg()[0]}


def describe_odd(r: dict) -> str:
    """One line per odd run: where its mismatches are, relative to the hole."""
    s = r["summary"]
    if s is None:
        err = next((x for x in r["records"] if x.get("type") == "error"), {})
        return f"run {r['n']} seed {r['seed']} [{r['setting']}]: {r['verdict']} " \
               f"{err.get('message', r['stderr'][-200:])}"
    hole = (s.get("injections") or {}).get("punch_hole") or {}
    first, pages = hole.get("first_page", 0), hole.get("pages", 0)
    parts = []
    for m in s.get("mismatch_samples") or []:
        where = "in hole" if first <= m["page"] < first + pages else "OUTSIDE hole"
        word = m.get("word")
        snap = m.get("snapshot") or {}
        parts.append(f"page {m['page']} {m['cause']} ({where}, zero={m['zero']}, word={word}, "
                     f"epoch={snap.get('epoch')}, seq={snap.get('seq')})")
    bad = s.get("first_mismatched_pages") or []
    inside = all(first <= p < first + pages for p in bad) and s["mismatched_pages"] <= pages
    where = "all in the hole" if inside else "some OUTSIDE the hole"
    return (f"run {r['n']} seed {r['seed']} [{r['setting'] or 'defaults'}] "
            f"{dict(s['mismatches_by_cause'])} ({s['mismatched_pages']} pages, {where}) "
            f"hole {first}+{pages}: " + "; ".join(parts))


def save(outdir: Path, r: dict) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"run{r['n']:05d}-seed{r['seed']}.jsonl"
    meta = {"type": "stress_punch", "run": r["n"], "seed": r["seed"], "setting": r["setting"],
            "argv": r["argv"], "rc": r["rc"], "verdict": r["verdict"],
            "loadavg1": r["loadavg"], "stderr": r["stderr"][-4000:]}
    with path.open("w") as f:
        f.write(json.dumps(meta) + "\n")
        f.write(r["stdout"] if r["stdout"].endswith("\n") or not r["stdout"]
                else r["stdout"] + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=300, help="tool runs (300)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (2)")
    ap.add_argument("--load", type=int, default=0,
                    help="busy-loop processes at nice 0 during the runs (0)")
    ap.add_argument("--reader", action="store_true",
                    help="a second, unregistered mapping of guest RAM reads every page "
                         "during each run")
    ap.add_argument("--minutes", type=float, default=0,
                    help="stop starting runs after this wall time (0: no cap)")
    ap.add_argument("--seed-base", type=int, default=1000, help="seed of run 0 (1000)")
    ap.add_argument("--settings", action="append",
                    help="engine arguments cycled through, e.g. '--copy-ahead 64' "
                         "(repeatable; '' = defaults; default: a built-in list)")
    ap.add_argument("--tool", type=Path, default=TOOL, help=f"uffd-snapshot ({TOOL})")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for odd runs' JSON Lines "
                         "(/tmp/stress_punch-<time>)")
    ap.add_argument("--timeout", type=float, default=60, help="seconds per run (60)")
    a = ap.parse_args(argv)

    if not a.tool.exists():
        ap.error(f"{a.tool} missing: run make -C guest-tools")
    settings = a.settings if a.settings else list(DEFAULT_SETTINGS)
    outdir = a.out or Path(f"/tmp/stress_punch-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    deadline = time.monotonic() + a.minutes * 60 if a.minutes > 0 else None
    table: collections.Counter = collections.Counter()
    by_setting: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    odd: list[dict] = []
    loads: list[float] = []
    done_runs = 0
    t0 = time.monotonic()
    print(f"stress_punch: {a.runs} runs, {a.jobs} at once, load {a.load}, "
          f"loadavg {os.getloadavg()[0]:.2f}, odd runs to {outdir}", flush=True)
    load = start_load(a.load)
    try:
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            pending = set()
            n = 0
            while n < a.runs or pending:
                while n < a.runs and len(pending) < a.jobs and \
                        (deadline is None or time.monotonic() < deadline):
                    pending.add(pool.submit(run_one, a.tool, n, a.seed_base + n,
                                            settings[n % len(settings)], a.timeout, a.reader))
                    n += 1
                if deadline is not None and time.monotonic() >= deadline:
                    n = a.runs          # start no more
                if not pending:
                    break
                fin = [f for f in pending if f.done()]
                if not fin:
                    time.sleep(0.02)
                    continue
                for f in fin:
                    pending.discard(f)
                    r = f.result()
                    done_runs += 1
                    loads.append(r["loadavg"])
                    table[r["verdict"]] += 1
                    by_setting[r["setting"] or "defaults"][r["verdict"]] += 1
                    if r["causes"] != EXPECTED:
                        path = save(outdir, r)
                        odd.append(r)
                        print(f"  ODD: {describe_odd(r)} -> {path}", flush=True)
                    if done_runs % 50 == 0:
                        print(f"  {done_runs} runs, {time.monotonic() - t0:.0f} s, "
                              f"loadavg {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        stop_load(load)

    wall = time.monotonic() - t0
    median = sorted(loads)[len(loads) // 2] if loads else 0.0
    print(f"\n{done_runs} runs in {wall:.0f} s; loadavg (1 min) during runs: "
          f"min {min(loads, default=0):.2f} median {median:.2f} max {max(loads, default=0):.2f}")
    print(f"\n{'causes':40} {'runs':>6}")
    for verdict, count in table.most_common():
        print(f"{verdict:40} {count:6}")
    print(f"\n{'setting':40} {'runs':>6} {'odd':>5}")
    for setting, cnt in sorted(by_setting.items()):
        total = sum(cnt.values())
        print(f"{setting:40} {total:6} {total - cnt['punch-hole']:5}")
    if odd:
        print(f"\n{len(odd)} odd run(s), saved in {outdir}:")
        for r in odd:
            print("  " + describe_odd(r))
    return 1 if odd else 0


if __name__ == "__main__":
    sys.exit(main())
