# SPDX-License-Identifier: MIT
"""The uffd-wp engine's tunables keep the snapshot exact.

--copy-ahead (a fault copies and un-protects its aligned window), --copy-run
(pages the background copier claims at once) and --release-mb (how often
the copier un-protects what it copied) only change who copies a page when,
and how many ioctls that takes.
Whatever they are set to, the snapshot must equal RAM at the instant, and
every injected fault must still be caught.  No timing is asserted:
bench/snapshot.py measures.
"""
from __future__ import annotations

import mmap
import os
import subprocess
import threading
import time

import pytest

from .conftest import parse_lines
from .test_guest_tools import LOAD, assert_consistent, assert_flagged

pytestmark = pytest.mark.guest_tools

# each setting at an edge of its range, and the combinations worth a run
SETTINGS = {
    "copy-ahead-1": ("--copy-ahead", "1"),
    "copy-ahead-16": ("--copy-ahead", "16"),
    "copy-ahead-max": ("--copy-ahead", "512"),
    "copy-ahead-faulting": ("--copy-ahead", "64", "--unprotect", "faulting"),
    "copy-run-1": ("--copy-run", "1"),
    "copy-run-max": ("--copy-run", "4096"),
    "release-mb-64": ("--release-mb", "64"),
    "release-end-ahead": ("--release", "end", "--copy-ahead", "32"),
}


@pytest.mark.parametrize("setting", list(SETTINGS), ids=list(SETTINGS))
def test_setting_consistent_at_full_speed(run_snapshot, require, setting):
    """Writers at full speed fault on the copier's heels: the snapshot is exact."""
    require("WP_HUGETLBFS_SHMEM")
    run = run_snapshot("--writers", "3", "--size", "32M", "--rate", "max", "--duration", "0.4",
                       "--verify", *SETTINGS[setting])
    s = run.summary
    assert_consistent(s)
    flags = SETTINGS[setting]
    for flag, key in (("--copy-ahead", "copy_ahead"), ("--copy-run", "copy_run"),
                      ("--release-mb", "release_mb")):
        if flag in flags:
            assert run.config[key] == int(flags[flags.index(flag) + 1])


def test_copy_ahead_sparse_and_anon_consistent(run_snapshot, require):
    """Windows over never-written pages (zero in the snapshot) and over one
    uffd shared by writer threads."""
    require("WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "THREAD_ID")
    assert_consistent(run_snapshot("--writers", "2", "--prefill", "no", "--copy-ahead", "512",
                                   "--verify", *LOAD).summary)
    assert_consistent(run_snapshot("--backing", "anon", "--writers", "2", "--copy-ahead", "64",
                                   "--verify", *LOAD).summary)


INJECTIONS = {
    "unregistered": ("--writers", "3", "--unregistered", "1"),
    "punch-hole": ("--writers", "2", "--punch-hole"),
}


@pytest.mark.parametrize("setting", list(SETTINGS), ids=list(SETTINGS))
@pytest.mark.parametrize("cause", list(INJECTIONS))
def test_injected_fault_still_caught(run_snapshot, require, setting, cause):
    """Copying ahead must not hide an injected write: windows are only
    copied once the bulk copy starts, after the injected write landed."""
    require("WP_HUGETLBFS_SHMEM")
    s = run_snapshot(*INJECTIONS[cause], "--verify", *LOAD, *SETTINGS[setting]).summary
    assert_flagged(s, cause)
    assert set(s["mismatches_by_cause"]) == {cause}


def read_guest_ram(pid: int, size: int, stop: threading.Event) -> None:
    """Map pid's guest RAM through its memfd and read every page until stop:
    a second mapping with no uffd, as QEMU's own mapping of guest RAM is."""
    path = None
    while path is None and not stop.is_set():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(
                            "/memfd:uffd-lab-guest-ram"):
                        path = f"/proc/{pid}/fd/{fd}"
                        break
                except OSError:
                    pass
        except OSError:
            return
        time.sleep(0.0005)
    if path is None:
        return
    with open(path, "rb") as f:
        ram = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
    view = memoryview(ram)
    try:
        while not stop.is_set():
            view[::4096].tobytes()          # one byte of every page
    finally:
        view.release()
        ram.close()


def test_punch_hole_unseen_writes_blamed_on_the_punch(tools, require):
    """Regression (docs/snapshot-engine.md, "Punch-hole and wp-missed"):
    truncation drops the uffd-wp marker of a punched page in every process
    when another mapping has the page mapped at that moment, so a writer's
    next write there lands without a fault.  Such a page, copied after the
    punch, is punch-hole, never wp-missed.  A second mapping reading guest
    RAM during the punch triggered it in about 2% of these runs before the
    fix; --self-test checks the rule itself deterministically."""
    require("WP_HUGETLBFS_SHMEM")
    for seed in range(20040, 20052):
        argv = [str(tools / "uffd-snapshot"), "--size", "16M", "--writers", "2",
                "--punch-hole", "--verify", *LOAD, "--seed", str(seed),
                *(("--copy-ahead", "16") if seed % 2 else ())]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        stop = threading.Event()
        reader = threading.Thread(target=read_guest_ram, args=(proc.pid, 16 << 20, stop))
        reader.start()
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            stop.set()
            reader.join()
        assert proc.returncode == 0, f"{argv}\n{out}\n{err}"
        s = next(r for r in parse_lines(out) if r["type"] == "summary")
        assert_flagged(s, "punch-hole")
        assert set(s["mismatches_by_cause"]) == {"punch-hole"}, (seed, s["mismatch_samples"])


def test_every_writer_is_served_while_others_keep_faulting(run_snapshot, require):
    """Regression (docs/snapshot-engine.md, "Fair rounds"): the handler used
    to read one uffd until it was empty, and a writer woken there faults
    again at once, so one or two writers had the handler to themselves
    while the others waited for milliseconds: served faults per writer
    ranged over 10-25x at full speed.  With one read per uffd per round
    each writer is served about as often as it runs: at 512 MiB the fewest
    over the most was 0.45-0.75, against 0.04-0.07 before (256 MiB: 0.24
    at worst under load, against up to 0.47).  The median of three runs
    is judged."""
    require("WP_HUGETLBFS_SHMEM")
    ratios, runs = [], []
    for seed in (1, 2, 3):
        served = run_snapshot("--writers", "4", "--size", "512M", "--rate", "max",
                              "--duration", "0.6", "--seed", str(seed)
                              ).summary["faults_per_process"]
        runs.append(served)
        ratios.append(min(served) / max(served))
    assert sorted(ratios)[1] >= 0.25, runs


@pytest.mark.parametrize("setting", ["copy-ahead-max", "copy-run-1"])
def test_verifier_catches_corruption_with_setting(run_snapshot, require, setting):
    require("WP_HUGETLBFS_SHMEM")
    s = run_snapshot("--writers", "2", "--verify", "--corrupt-snapshot", "4", *LOAD,
                     *SETTINGS[setting]).summary
    assert s["mismatched_pages"] == 4
    assert s["mismatches_by_cause"] == {"invalid-content": 4}


@pytest.mark.parametrize("flag, value, expect", [
    ("--copy-ahead", "0", "1 to 512"), ("--copy-ahead", "513", "1 to 512"),
    ("--copy-run", "0", "1 to 4096"), ("--release-mb", "2048", "1 to 1024"),
])
def test_engine_flags_refused_outside_their_range(run_snapshot, flag, value, expect):
    run = run_snapshot(flag, value)
    assert run.rc == 1, run.describe()
    assert run.error["flag"] == flag
    assert f"'{value}'" in run.error["message"] and expect in run.error["message"]


def test_engine_defaults_in_config_and_help(run_snapshot, tools, require):
    require("WP_HUGETLBFS_SHMEM")
    cfg = run_snapshot("--duration", "0.1", "--rate", "1000").config
    assert {k: cfg[k] for k in ("copy_ahead", "copy_run", "release_mb")} == \
        {"copy_ahead": 64, "copy_run": 32, "release_mb": 2}
    usage = subprocess.run([str(tools / "uffd-snapshot"), "--help"], capture_output=True,
                           text=True, timeout=30, check=True).stdout
    for flag in ("--copy-ahead", "--copy-run", "--release-mb"):
        assert flag in usage
