# SPDX-License-Identifier: MIT
"""The host and the guest tool agree on what a run needs from the kernel.

uffdlab.scenarios decides, before any VM boots, which uffd features and
capabilities a scenario needs and the first Linux release that has them all;
`uffd-snapshot --dry-run` prints the same decision from C, taken by the code
the real run uses to require them.  These tests hold the two together for
every scenario of the catalogue on every backing, and hold uffd-probe to
features.h, the table both sides read.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from uffdlab import scenarios
from uffdlab.config import parse_size

from .conftest import TOOLS, parse_lines

pytestmark = pytest.mark.guest_tools

FEATURES_H = TOOLS / "src" / "features.h"
# scenarios.first_kernels()'s regex, with the feature bit's group captured:
# rows with a bit are uffd feature bits, rows without one are capabilities
FEATURE_ROW = re.compile(r'X\((\w+),(\s*\w+,)?\s*"([\d.]+)"\)')

UFFD_SOURCES = ("syscall", "syscall-user-only", "devuserfaultfd")
YES_NO = ("yes", "no")
SHARED_ONLY = scenarios.SHARED_ONLY


def variants(sc: scenarios.Scenario) -> list[dict]:
    """The parameters worth crossing with every backing for this scenario."""
    if sc.id == "S9":
        return [{"prefill": pf, "populate": pp} for pf in YES_NO for pp in YES_NO]
    if sc.id == "S7":
        return [{"uffd_source": src} for src in UFFD_SOURCES]
    return [{}]


CASES = [(sc, {"backing": backing, **v}) for sc in scenarios.CATALOGUE
         for backing in scenarios.BACKINGS for v in variants(sc)]


def case_id(case) -> str:
    sc, params = case
    return "-".join([sc.id, *(str(v) for v in params.values())])


def refused_by_tool(sc: scenarios.Scenario, resolved: dict) -> str | None:
    """Why uffd-snapshot refuses these flags (exit 1), or None."""
    flags = {**sc.flags, **resolved}
    if flags["backing"] == "anon":
        for key in SHARED_ONLY:
            if flags.get(key):
                return f"--{key.replace('_', '-')} needs a shared backing"
    if flags["backing"] == "hugetlbfs" and flags.get("fd_writes"):
        return "--fd-writes: hugetlbfs files do not support write(2)"
    return None


def dry_run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*argv, "--dry-run"], capture_output=True, text=True, timeout=30)


def hugepage_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Hugepagesize:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_dry_run_plan_matches_host(tools, case):
    sc, params = case
    resolved = scenarios.resolve(sc, params)
    if resolved["backing"] == "hugetlbfs" and not \
            0 < 16 * hugepage_bytes() <= parse_size(resolved["size"]):
        pytest.skip(f"this host's huge page size does not fit {resolved['size']} x 16")
    argv = scenarios.command(sc, resolved, str(tools.parent), timeout=60)
    assert argv[0] == str(tools / "uffd-snapshot")
    done = dry_run(argv)
    records = parse_lines(done.stdout)
    why = refused_by_tool(sc, resolved)
    if why:
        # both sides refuse: the host before anything boots, the tool with a usage error
        with pytest.raises(scenarios.ScenarioError, match="backing: "):
            scenarios.check_against(sc, resolved, 1 << 40, None)
        assert done.returncode == 1, (why, argv, done.stdout, done.stderr)
        assert [r["kind"] for r in records] == ["usage"], done.stdout
        return
    scenarios.check_against(sc, resolved, 1 << 40, None)       # the host accepts it too
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    assert len(records) == 1, done.stdout
    plan = records[0]
    assert plan["type"] == "plan" and plan["tool"] == "uffd-snapshot"
    assert plan["features"] == sorted(plan["features"])
    assert set(plan["features"]) == scenarios.needed_features(resolved), (argv, plan)
    assert plan["first_kernel"] == scenarios.min_kernel(resolved), (argv, plan)


def test_dry_run_plan_schema(run_snapshot):
    run = run_snapshot("--strategy", "async-scan", "--dry-run")
    assert run.rc == 0, run.describe()
    assert run.records == [{"type": "plan", "tool": "uffd-snapshot", "version": 1,
                            "features": ["PAGEMAP_SCAN", "WP_ASYNC", "WP_HUGETLBFS_SHMEM"],
                            "first_kernel": "6.7"}]
    run = run_snapshot("--strategy", "stop-the-world", "--dry-run")
    assert run.records == [{"type": "plan", "tool": "uffd-snapshot", "version": 1,
                            "features": [], "first_kernel": "any"}]


def test_dry_run_validates_like_a_run(run_snapshot):
    """The same checks as a real run, before anything is planned."""
    run = run_snapshot("--writers", "0", "--dry-run")
    assert run.rc == 1 and run.error["flag"] == "--writers", run.describe()
    run = run_snapshot("--backing", "anon", "--fork-child", "--dry-run")
    assert run.rc == 1 and run.error["flag"] == "--fork-child", run.describe()
    assert not run.of_type("plan")


def test_dry_run_touches_no_userfaultfd_nor_ram(tools):
    """No uffd, no backing, no writers, no big mapping: works on any kernel."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    size = 1 << 30
    done = subprocess.run(
        ["strace", "-f", "-qq", "-e",
         "trace=userfaultfd,memfd_create,openat,open,mmap,clone,clone3,fork,vfork,ioctl",
         str(tools / "uffd-snapshot"), "--size", "1G", "--strategy", "async-scan",
         "--uffd-source", "devuserfaultfd", "--dry-run"],
        capture_output=True, text=True, timeout=30)
    if done.returncode != 0 and "ptrace" in done.stderr:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    assert parse_lines(done.stdout)[0]["type"] == "plan"
    calls = done.stderr
    for banned in ("userfaultfd(", "memfd_create(", "/dev/userfaultfd", "/dev/shm",
                   "pagemap", "clone(", "clone3(", "fork(", "ioctl("):
        assert banned not in calls, f"--dry-run called {banned}:\n{calls}"
    for m in re.finditer(r"mmap\(\w+, (\d+),", calls):
        assert int(m.group(1)) < size // 16, f"--dry-run mapped {m.group(1)} bytes"


# ---- uffd-probe and features.h ----

def features_h() -> tuple[dict[str, str], dict[str, str]]:
    """(feature bits, capabilities) -> first release, as features.h says."""
    bits, caps = {}, {}
    for name, bit, release in FEATURE_ROW.findall(FEATURES_H.read_text()):
        (bits if bit else caps)[name] = release
    return bits, caps


def test_features_h_parsed_like_the_host():
    bits, caps = features_h()
    assert {**bits, **caps} == scenarios.first_kernels()
    assert set(caps) == {"USER_MODE_ONLY", "DEV_USERFAULTFD", "PAGEMAP_SCAN"}
    assert not set(bits) & set(caps)


def test_probe_feature_min_kernel_is_features_h(probe):
    bits, _ = features_h()
    assert probe["feature_min_kernel"] == bits
    assert list(probe["features"]) == list(bits)        # the table's order: bit order


def test_probe_names_the_same_features_as_the_plan(probe, run_snapshot):
    """Every feature a plan can name is one the probe reports (or a capability)."""
    bits, caps = features_h()
    run = run_snapshot("--backing", "anon", "--prefill", "no", "--strategy", "async-scan",
                       "--uffd-source", "syscall-user-only", "--dry-run")
    plan = run.one("plan")
    assert set(plan["features"]) <= set(bits) | set(caps)
    assert set(plan["features"]) - set(caps) <= set(probe["features"])
