# SPDX-License-Identifier: MIT
"""The C guest tools on the host kernel: probe, snapshot strategies, the
verifier, fault injections, usage errors and robustness.

Sizes are small (16-32M) and runs short so the module stays fast on two
cores.  Every "inconsistent" case is deterministic: the tool waits, before
copying, until the injected write has landed after the instant.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import TOOLS, parse_lines

pytestmark = pytest.mark.guest_tools

LOAD = ("--rate", "100000", "--duration", "0.4")     # combined page writes/s


def assert_consistent(s: dict) -> None:
    assert s["verify"] != "off"
    assert s["consistent"] is True, \
        f"mismatches: {s['mismatches_by_cause']} pages {s['first_mismatched_pages']}"
    assert s["mismatched_pages"] == 0


def assert_flagged(s: dict, cause: str) -> None:
    assert s["consistent"] is False, f"expected inconsistency ({cause}), summary: {s}"
    assert s["mismatches_by_cause"].get(cause, 0) > 0, s["mismatches_by_cause"]
    assert s["inject_sync_timeout"] is False


def proc_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever inherited it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_dead(pids, seconds=5.0) -> list[int]:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        alive = [p for p in pids if not proc_dead(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if not proc_dead(p)]


# ---- uffd-probe ----

def test_probe_schema(probe):
    assert probe["tool"] == "uffd-probe"
    assert probe["kernel"] == platform.release()
    for key in ("syscall_userfaultfd", "user_mode_only", "dev_userfaultfd",
                "dev_userfaultfd_present", "api", "pagemap_scan", "uffdio_move"):
        assert isinstance(probe[key], bool), key
    assert set(probe["wp_register"]) == {"memfd", "shmem", "hugetlbfs", "anon"}
    for name, value in probe["wp_register"].items():
        assert value in (True, False, None)
        if value is not True:
            assert probe["wp_register_reason"][name]
    expected = {"PAGEFAULT_FLAG_WP", "EVENT_FORK", "EXACT_ADDRESS", "WP_HUGETLBFS_SHMEM",
                "WP_UNPOPULATED", "WP_ASYNC", "MOVE", "THREAD_ID"}
    assert expected <= set(probe["features"])
    assert all(isinstance(v, bool) for v in probe["features"].values())
    assert probe["feature_min_kernel"]["WP_ASYNC"] == "6.7"


def test_probe_matches_the_system(probe):
    assert probe["dev_userfaultfd_present"] == os.path.exists("/dev/userfaultfd")
    sysctl = Path("/proc/sys/vm/unprivileged_userfaultfd")
    if sysctl.exists():
        assert probe["unprivileged_userfaultfd"] == int(sysctl.read_text())
    else:
        assert probe["unprivileged_userfaultfd"] is None
    raw = int(probe["features_raw"], 16)
    for i, (name, offered) in enumerate(probe["features"].items()):
        assert offered == bool(raw & (1 << i)), name
    free = probe["hugepages_free"]
    if free <= 0:
        assert probe["wp_register"]["hugetlbfs"] is None


def test_probe_matches_what_runs(probe, run_snapshot):
    """What the probe claims is what uffd-snapshot can actually do."""
    memfd = run_snapshot("--strategy", "uffd-wp", "--duration", "0.2", "--rate", "10000")
    assert (memfd.rc == 0) == bool(probe["wp_register"]["memfd"]), memfd.describe()
    anon = run_snapshot("--strategy", "uffd-wp", "--backing", "anon", "--duration", "0.2",
                        "--rate", "10000")
    assert (anon.rc == 0) == bool(probe["wp_register"]["anon"]), anon.describe()
    scan = run_snapshot("--strategy", "async-scan", "--duration", "0.2", "--rate", "10000")
    can_scan = probe["features"]["WP_ASYNC"] and probe["pagemap_scan"]
    assert scan.rc == (0 if can_scan else 2), scan.describe()
    dev = run_snapshot("--uffd-source", "devuserfaultfd", "--duration", "0.2", "--rate", "10000")
    assert (dev.rc == 0) == probe["dev_userfaultfd"], dev.describe()


# ---- consistent strategies ----

@pytest.mark.parametrize("writers", [1, 4])
@pytest.mark.parametrize("strategy", ["stop-the-world", "uffd-wp"])
def test_consistent_under_load(run_snapshot, require, strategy, writers):
    if strategy == "uffd-wp":
        require("WP_HUGETLBFS_SHMEM")
    for _ in range(3):
        run = run_snapshot("--strategy", strategy, "--writers", str(writers), "--size", "32M",
                           "--rate", "max", "--duration", "0.4", "--verify")
        s = run.summary
        assert_consistent(s)
        # on a busy host a lone writer may get no CPU during the few ms of copy
        if strategy != "uffd-wp" or s["faults_total"] > 0:
            break
    assert s["strategy"] == strategy
    assert s["pages"] == 32 * 256 and s["bytes"] == 32 << 20
    assert len(s["faults_per_process"]) == writers
    assert s["writer_ops_per_s_before"] > 0
    if strategy == "uffd-wp":
        # under load writers hit protected pages: the snapshot was really tested
        assert s["faults_total"] > 0
        assert s["fault_latency_us"]["count"] > 0
        assert s["fault_latency_us"]["p50"] <= s["fault_latency_us"]["max"]
        assert sum(s["fault_latency_hist"]["counts"]) == s["fault_latency_us"]["count"]
    else:
        assert s["faults_total"] == 0
        assert s["writer_stall_max_ms"] >= s["copy_ms"] * 0.5   # writers wait for the copy
    progress = run.of_type("progress")
    assert progress and progress[-1]["pages_total"] == s["pages"]


@pytest.mark.parametrize("populate", ["yes", "no"])
def test_populate_both_consistent_on_memfd(run_snapshot, require, populate):
    require("WP_HUGETLBFS_SHMEM")
    s = run_snapshot("--strategy", "uffd-wp", "--writers", "2", "--populate", populate,
                     "--verify", *LOAD).summary
    assert_consistent(s)
    if populate == "yes":
        assert s["pages_populated"] == 2 * s["pages"]
        assert s["populate_rss_kb_delta"] > 0
    else:
        assert s["pages_populated"] == 0


def test_sparse_ram_consistent(run_snapshot, require):
    """--prefill no: never-written pages must stay zero in the snapshot."""
    require("WP_HUGETLBFS_SHMEM")
    assert_consistent(run_snapshot("--writers", "2", "--prefill", "no", "--verify", *LOAD).summary)


def test_anon_control_consistent(run_snapshot, require):
    require("PAGEFAULT_FLAG_WP", "THREAD_ID")
    s = run_snapshot("--backing", "anon", "--writers", "2", "--verify", *LOAD).summary
    assert_consistent(s)
    assert len(s["faults_per_process"]) == 1       # one process: writers are threads


def test_shmem_file_consistent(run_snapshot, require, probe):
    require("WP_HUGETLBFS_SHMEM")
    if probe["wp_register"]["shmem"] is None:
        pytest.skip(probe["wp_register_reason"]["shmem"])
    assert_consistent(run_snapshot("--backing", "shmem", "--writers", "2", "--verify",
                                   *LOAD).summary)


def test_zap_after_arm_marker_survives(run_snapshot, require):
    require("WP_HUGETLBFS_SHMEM")
    s = run_snapshot("--writers", "2", "--zap-after-arm", "--verify", *LOAD).summary
    assert_consistent(s)
    zap = s["injections"]["zap"]
    assert zap["pages"] == 16
    assert zap["wp_bit_before"] == 16 and zap["wp_bit_after"] == 16   # PTE markers


def test_async_scan(run_snapshot, require):
    require("WP_ASYNC", "PAGEMAP_SCAN")
    s = run_snapshot("--strategy", "async-scan", "--writers", "2", "--verify", *LOAD).summary
    assert_consistent(s)
    assert s["verify"] == "copy"           # copies precede the instant: bytes decide
    assert s["faults_total"] == 0          # the kernel resolves WP_ASYNC faults itself
    assert s["async"]["rounds"] >= 1


# ---- injected faults: flagged, deterministically ----

@pytest.mark.parametrize("flags, cause", [
    (("--strategy", "uffd-wp-staggered", "--writers", "2"), "staggered"),
    (("--writers", "3", "--unregistered", "1"), "unregistered"),
    (("--writers", "2", "--fd-writes"), "fd-write"),
    (("--writers", "2", "--punch-hole"), "punch-hole"),
    (("--writers", "1", "--fork-child"), "fork-child"),
], ids=["staggered", "unregistered", "fd-writes", "punch-hole", "fork-child"])
def test_injected_fault_flagged(run_snapshot, require, flags, cause):
    require("WP_HUGETLBFS_SHMEM")
    s = run_snapshot(*flags, "--verify", *LOAD).summary
    assert_flagged(s, cause)
    assert set(s["mismatches_by_cause"]) == {cause}


def test_unregistered_flagged_by_reference_copy_too(run_snapshot, require):
    """The byte-exact reference verifier agrees with the stamp verifier."""
    require("WP_HUGETLBFS_SHMEM")
    s = run_snapshot("--writers", "3", "--unregistered", "1", "--verify=copy", *LOAD).summary
    assert s["verify"] == "copy"
    assert_flagged(s, "unregistered")


def test_kernel_writes_user_mode_only_efault(run_snapshot, require):
    require("WP_HUGETLBFS_SHMEM", "user_mode_only")
    s = run_snapshot("--writers", "1", "--kernel-writes", "read",
                     "--uffd-source", "syscall-user-only", "--verify", *LOAD).summary
    kw = s["injections"]["kernel_writes"]
    assert kw["efault"] > 0                # refused, not delivered
    assert_consistent(s)


def test_kernel_writes_caught_via_dev_userfaultfd(run_snapshot, require):
    require("WP_HUGETLBFS_SHMEM", "dev_userfaultfd")
    s = run_snapshot("--writers", "1", "--kernel-writes", "process_vm_writev",
                     "--uffd-source", "devuserfaultfd", "--verify", *LOAD).summary
    kw = s["injections"]["kernel_writes"]
    assert kw["efault"] == 0 and kw["ok"] == kw["attempted"] > 0
    assert s["faults_total"] > 0
    assert_consistent(s)


# ---- the verifier checks itself ----

def test_self_test(run_tool):
    run = run_tool("uffd-snapshot", "--self-test")
    assert run.rc == 0, run.describe()
    assert run.one("self-test")["failed"] == 0


@pytest.mark.parametrize("mode", ["stamp", "copy"])
def test_verifier_catches_corruption(run_snapshot, require, mode):
    require("WP_HUGETLBFS_SHMEM")
    s = run_snapshot("--writers", "2", f"--verify={mode}", "--corrupt-snapshot", "5", *LOAD).summary
    assert s["consistent"] is False
    assert s["mismatched_pages"] == 5
    assert s["mismatches_by_cause"] == {"invalid-content": 5}


# ---- usage errors and exit codes ----

@pytest.mark.parametrize("args, flag", [
    (("--writers", "0"), "--writers"),
    (("--writers", "65"), "--writers"),
    (("--size", "12Q"), "--size"),
    (("--size", "4K"), "--size"),
    (("--rate", "-1"), "--rate"),
    (("--strategy", "snapshot-please"), "--strategy"),
    (("--pattern", "hot:0"), "--pattern"),
    (("--populate", "maybe"), "--populate"),
    (("--writers", "2", "--unregistered", "3"), "--unregistered"),
    (("--backing", "anon", "--fork-child"), "--fork-child"),
    (("--corrupt-snapshot", "2"), "--corrupt-snapshot"),
    (("--duration", "3", "--timeout", "2"), "--timeout"),
    (("--no-such-flag",), "--no-such-flag"),
    (("--size",), "--size"),
])
def test_usage_errors(run_snapshot, args, flag):
    run = run_snapshot(*args)
    assert run.rc == 1, run.describe()
    err = run.error
    assert err["kind"] == "usage" and err["flag"] == flag
    assert flag in run.stderr
    assert not run.of_type("summary")


def test_usage_message_names_value_and_expectation(run_snapshot):
    run = run_snapshot("--writers", "0")
    assert "'0'" in run.stderr and "1 to 64" in run.stderr


@pytest.mark.parametrize("rate", ["1e-300", "0", "0.5", "-1", "inf", "nan", "1e10"])
def test_rate_outside_limits_refused(run_snapshot, rate):
    run = run_snapshot("--rate", rate, "--duration", "0.2")
    assert run.rc == 1, run.describe()
    assert run.error["flag"] == "--rate"
    msg = run.error["message"]
    assert f"'{rate}'" in msg and "max" in msg and "1 to 1e9" in msg
    assert not run.of_type("config")


def test_slowest_rate_is_honoured(run_snapshot, require):
    require("WP_HUGETLBFS_SHMEM")
    run = run_snapshot("--rate", "1", "--duration", "0.3")
    assert run.config["rate"] == 1
    # one write at the start, the next one due after a second: not millions
    assert 1 <= run.summary["writer_ops_total"] <= 2


def test_stagger_that_cannot_fit_the_timeout_is_refused(run_snapshot):
    run = run_snapshot("--strategy", "uffd-wp-staggered", "--writers", "2",
                       "--stagger-ms", "10000", "--timeout", "3")
    assert run.rc == 1, run.describe()
    assert run.error["flag"] == "--timeout"
    assert "--stagger-ms 10000" in run.error["message"] and "--timeout" in run.error["message"]
    # the same flags are fine where nothing staggers
    run = run_snapshot("--strategy", "stop-the-world", "--stagger-ms", "10000", "--timeout", "3",
                       "--duration", "0.2", "--rate", "1000")
    assert run.rc == 0, run.describe()


def test_default_timeout_covers_the_stagger(run_snapshot, require):
    require("WP_HUGETLBFS_SHMEM")
    run = run_snapshot("--strategy", "uffd-wp-staggered", "--writers", "2", "--stagger-ms", "100",
                       "--duration", "0.3", "--rate", "10000")
    assert run.config["timeout_s"] == pytest.approx(0.3 + 2 * 0.1 + 60)
    assert run.rc == 0, run.describe()


def test_staggered_arming_honours_timeout(run_snapshot, require):
    """--rate 1 shared by 2 writers: each writes every 2 s, so writer 0's first
    write after the instant comes at ~2 s and the 1 s stagger after it spans
    the deadline (2.5 s), which must end the run inside that sleep."""
    require("WP_HUGETLBFS_SHMEM")
    t0 = time.monotonic()
    run = run_snapshot("--strategy", "uffd-wp-staggered", "--writers", "2", "--rate", "1",
                       "--stagger-ms", "1000", "--duration", "0.2", "--timeout", "2.5")
    wall = time.monotonic() - t0
    assert run.rc == 3, run.describe()
    assert "timed out" in run.error["message"] and "arming" in run.error["message"]
    assert wall < 2.5 + 0.4, f"ran {wall:.2f} s with --timeout 2.5"


def test_timeout_bounds_a_slow_setup(run_snapshot):
    """Filling 2G takes longer than --timeout 0.1 + the 0.5 s alarm grace:
    whichever check fires, the run ends within the bound, with one record."""
    t0 = time.monotonic()
    run = run_snapshot("--size", "2G", "--duration", "0.05", "--timeout", "0.1")
    wall = time.monotonic() - t0
    if run.rc == 1 and run.error["flag"] == "--size":
        pytest.skip(run.error["message"])          # not enough memory here
    assert run.rc == 3, run.describe()
    assert re.search(r"timed out|hard timeout", run.error["message"])
    assert wall < 0.1 + 0.5 + 0.5, f"ran {wall:.2f} s with --timeout 0.1"


# ---- limits.h: one source for the parser and the host's pre-flight checks ----

LIMIT_RE = re.compile(r"^#define\s+LIM_([A-Z0-9_]+)_(MIN|MAX)\s+(\S+)", re.M)
# name -> (flag, value format, integer?)
LIMIT_FLAGS = {
    "DURATION": ("--duration", "{}", False),
    "RATE": ("--rate", "{}", False),
    "TIMEOUT": ("--timeout", "{}", False),
    "WARMUP": ("--warmup", "{}", False),
    "WRITERS": ("--writers", "{}", True),
    "UNREGISTERED": ("--unregistered", "{}", True),
    "STAGGER_MS": ("--stagger-ms", "{}", False),
    "HOT_FRACTION": ("--pattern", "hot:{}", False),
    "SEED": ("--seed", "{}", True),
    "CORRUPT_SNAPSHOT": ("--corrupt-snapshot", "{}", True),
    "PROGRESS_MS": ("--progress-ms", "{}", True),
    "SCAN_ROUNDS": ("--scan-rounds", "{}", True),
    "COPY_AHEAD": ("--copy-ahead", "{}", True),
    "COPY_RUN": ("--copy-run", "{}", True),
    "RELEASE_MB": ("--release-mb", "{}", True),
    "SIZE_PAGES": ("--size", None, True),       # checked after parsing: own test
}


def read_limits() -> dict[str, dict[str, str]]:
    limits: dict[str, dict[str, str]] = {}
    for name, end, value in LIMIT_RE.findall((TOOLS / "src" / "limits.h").read_text()):
        assert end not in limits.setdefault(name, {}), f"LIM_{name}_{end} defined twice"
        limits[name][end] = value
    return limits


def test_limits_file_is_plain_literals():
    limits = read_limits()
    assert set(limits) == set(LIMIT_FLAGS)
    expected = {"DURATION": ("0.05", "86400"), "RATE": ("1", "1e9"), "TIMEOUT": ("0.1", "86400"),
                "WRITERS": ("1", "64"), "STAGGER_MS": ("0", "10000"), "HOT_FRACTION": ("0", "1"),
                "SEED": ("0", "2147483647")}
    for name, (lo, hi) in expected.items():
        assert (limits[name]["MIN"], limits[name]["MAX"]) == (lo, hi), name
    for name, ends in limits.items():
        assert set(ends) == {"MIN", "MAX"}, name
        for value in ends.values():
            assert re.fullmatch(r"[0-9]+(\.[0-9]+)?(e[0-9]+)?", value), (name, value)
            assert float(value) >= 0
        assert float(ends["MIN"]) < float(ends["MAX"])
        if LIMIT_FLAGS[name][2]:
            assert int(ends["MIN"]) >= 0 and "." not in ends["MAX"] + ends["MIN"]


def beyond(value: str, integer: bool, direction: int) -> str:
    """A well-formed number just outside the limit `value`."""
    if integer:
        return str(int(value) + direction)
    x = float(value)
    step = max(abs(x) * 1e-6, 1e-6)
    return repr(x + direction * step)


@pytest.mark.parametrize("name", sorted(set(LIMIT_FLAGS) - {"SIZE_PAGES"}))
def test_parser_enforces_limits_h(run_snapshot, name):
    """At each limit the value parses (the run then fails on a later unknown
    flag instead); just outside it, the flag is refused."""
    flag, fmt, integer = LIMIT_FLAGS[name]
    lim = read_limits()[name]
    exclusive_min = name == "HOT_FRACTION"
    accepted = [lim["MAX"]] + ([beyond(lim["MIN"], integer, +1)] if exclusive_min else [lim["MIN"]])
    refused = [beyond(lim["MIN"], integer, -1), beyond(lim["MAX"], integer, +1)]
    if exclusive_min:
        refused.append(lim["MIN"])
    for value in accepted:
        run = run_snapshot(flag, fmt.format(value), "--no-such-flag")
        assert run.rc == 1 and run.error["flag"] == "--no-such-flag", run.describe()
    for value in refused:
        run = run_snapshot(flag, fmt.format(value), "--no-such-flag")
        assert run.rc == 1 and run.error["flag"] == flag, run.describe()
        assert f"'{fmt.format(value)}'" in run.error["message"]


def test_duration_minimum_from_limits_h(run_snapshot, require):
    require("WP_HUGETLBFS_SHMEM")
    lo = read_limits()["DURATION"]["MIN"]
    below = repr(math.nextafter(float(lo), 0))
    run = run_snapshot("--duration", below, "--rate", "1000")
    assert run.rc == 1 and run.error["flag"] == "--duration", run.describe()
    run = run_snapshot("--duration", lo, "--rate", "1000")
    assert run.summary["writer_ops_total"] > 0
    assert run.config["duration_s"] == float(lo)


def test_size_minimum_from_limits_h(run_snapshot):
    pages = int(read_limits()["SIZE_PAGES"]["MIN"])
    psz = os.sysconf("SC_PAGESIZE")
    run = run_snapshot("--size", str((pages - 1) * psz), "--strategy", "stop-the-world")
    assert run.rc == 1 and run.error["flag"] == "--size", run.describe()
    assert f"at least {pages} pages" in run.error["message"]
    run = run_snapshot("--size", str(pages * psz), "--strategy", "stop-the-world",
                       "--duration", "0.2", "--rate", "1000", "--verify")
    assert run.summary["pages"] == pages


def test_timeout_ends_the_run(run_snapshot):
    run = run_snapshot("--size", "256M", "--duration", "2", "--timeout", "2.01", "--rate", "1000")
    assert run.rc == 3, run.describe()
    assert "timed out" in run.error["message"]


# ---- robustness: processes never outlive a failure ----

def start_snapshot(tools: Path, *args: str, **popen) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([str(tools / "uffd-snapshot"), "--size", "16M", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return proc, json.loads(line)


def test_killed_coordinator_leaves_no_writer(tools, require):
    require("WP_HUGETLBFS_SHMEM")
    proc, config = start_snapshot(tools, "--writers", "3", "--fork-child", "--rate", "20000",
                                  "--duration", "30")
    pids = config["writer_pids"] + [config["fork_child_pid"]]
    assert all(p > 0 for p in pids)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()
    assert wait_dead(pids) == []


@pytest.mark.parametrize("sig,index", [(signal.SIGKILL, 1), (signal.SIGTERM, 2)])
def test_killed_writer_is_named_and_run_ends(tools, require, sig, index):
    """The writer that died, and by which signal, not the coordinator."""
    require("WP_HUGETLBFS_SHMEM")
    proc, config = start_snapshot(tools, "--writers", "3", "--rate", "20000", "--duration", "30")
    victim = config["writer_pids"][index]
    time.sleep(0.3)
    os.kill(victim, sig)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 3
    errors = [r for r in parse_lines(out) if r["type"] == "error"]
    assert len(errors) == 1, out
    name = signal.Signals(sig).name
    assert f"writer {index} (pid {victim}) was killed by {name} (signal {int(sig)})" \
        in errors[0]["message"]
    assert "coordinator" not in errors[0]["message"]
    assert f"was killed by {name}" in err
    assert wait_dead(config["writer_pids"]) == []


def test_terminated_coordinator_kills_writers(tools, require):
    require("WP_HUGETLBFS_SHMEM")
    proc, config = start_snapshot(tools, "--writers", "2", "--rate", "20000", "--duration", "30")
    time.sleep(0.2)
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 3
    records = parse_lines(out)
    assert records[-1]["type"] == "error"
    assert [r["type"] for r in records].count("error") == 1
    assert records[-1]["message"].startswith("coordinator interrupted by SIGTERM")
    assert wait_dead(config["writer_pids"]) == []


def test_sigint_to_process_group_gives_one_error(tools, require):
    """Ctrl-C: the terminal sends SIGINT to the coordinator and every writer at
    once; writers die silently and the coordinator alone reports."""
    require("WP_HUGETLBFS_SHMEM")
    proc, config = start_snapshot(tools, "--writers", "3", "--fork-child", "--rate", "20000",
                                  "--duration", "30", start_new_session=True)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 3, out + err
    errors = [r for r in parse_lines(out) if r["type"] == "error"]
    assert len(errors) == 1, out
    assert errors[0]["exit_code"] == 3
    assert "interrupted by SIGINT" in errors[0]["message"]
    assert err.count("uffd-snapshot") == 1, err     # no writer said anything either
    assert wait_dead(config["writer_pids"] + [config["fork_child_pid"]]) == []


def test_make_check_passes(tools):
    """ASan/UBSan build plus the tools' own checks (slowest test: ~15 s)."""
    done = subprocess.run(["make", "-C", str(TOOLS), "check"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "make check: all passed" in done.stdout
