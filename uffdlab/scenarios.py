# SPDX-License-Identifier: MIT
"""The scenario catalogue: each point of the 2021 linux-mm debate (see
docs/background.md) as a `uffd-snapshot` command line, with its parameters
checked before anything runs."""
from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import format_size, parse_size
from .paths import FEATURES_H, LIMITS_H

# The guest tool's own option limits: one source for C and for the checks
# made here before anything boots.


class ScenarioError(ValueError):
    pass


class MissingFeature(ScenarioError):
    """The guest kernel lacks something a run needs, found before it runs."""

    def __init__(self, scenario: str, feature: str, first_kernel: str, kernel: str):
        self.scenario, self.feature = scenario, feature
        self.first_kernel, self.kernel = first_kernel, kernel
        super().__init__(f"{scenario}: the guest kernel {kernel} lacks {feature} "
                         f"(first in Linux {first_kernel})")


@functools.cache
def first_kernels() -> dict[str, str]:
    """Every uffd feature and capability the tools know, with the first Linux
    release that has it: guest-tools/src/features.h, shared with the C side."""
    return {m[1]: m[2] for m in re.finditer(r'X\((\w+),(?:\s*\w+,)?\s*"([\d.]+)"\)',
                                            FEATURES_H.read_text())}


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def needed_features(resolved: dict[str, Any]) -> frozenset[str]:
    """What a run with these parameters needs from the kernel: uffd feature
    bits by name, plus USER_MODE_ONLY, DEV_USERFAULTFD and PAGEMAP_SCAN.
    uffd-snapshot --dry-run answers the same question from C; a contract
    test holds the two together."""
    if resolved["strategy"] == "stop-the-world":
        return frozenset()                       # no userfaultfd at all
    needs = {"devuserfaultfd": {"DEV_USERFAULTFD"},
             "syscall-user-only": {"USER_MODE_ONLY"}}.get(
        resolved.get("uffd_source", "syscall"), set())
    if resolved["backing"] == "anon":
        needs |= {"PAGEFAULT_FLAG_WP", "THREAD_ID"}
        if resolved.get("prefill", "yes") == "no" and resolved["populate"] == "no":
            needs.add("WP_UNPOPULATED")          # never-touched anonymous pages
    else:
        needs.add("WP_HUGETLBFS_SHMEM")          # PTE markers for shared memory
    if resolved["strategy"] == "async-scan":
        needs |= {"WP_ASYNC", "PAGEMAP_SCAN"}
    return frozenset(needs)


def min_kernel(resolved: dict[str, Any]) -> str:
    """The first Linux release that has everything a run needs."""
    firsts = [first_kernels()[f] for f in needed_features(resolved)]
    return max(firsts, key=_version) if firsts else "any"


# probe fields for the capabilities that are not feature bits
_PROBE_CAPS = {"USER_MODE_ONLY": "user_mode_only", "DEV_USERFAULTFD": "dev_userfaultfd",
               "PAGEMAP_SCAN": "pagemap_scan"}


def has_feature(probe: dict, feature: str) -> bool:
    if feature in _PROBE_CAPS:
        return bool(probe.get(_PROBE_CAPS[feature]))
    return bool(probe.get("features", {}).get(feature))


@functools.cache
def tool_limits() -> dict[str, tuple[float, float]]:
    """{'duration': (0.05, 86400), ...} from guest-tools/src/limits.h."""
    found: dict[str, dict[str, float]] = {}
    for m in re.finditer(r"^#define\s+LIM_([A-Z0-9_]+)_(MIN|MAX)\s+(\S+)",
                         LIMITS_H.read_text(), re.M):
        found.setdefault(m.group(1).lower(), {})[m.group(2)] = float(m.group(3))
    return {k: (v["MIN"], v["MAX"]) for k, v in found.items()}


def limit(name: str) -> tuple[float, float]:
    return tool_limits()[name]


def _num(x: float) -> str:
    return f"{x:g}" if x < 1e6 or x != int(x) else f"{int(x)}"


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    help: str
    parse: Callable[[str, Any], Any]


def _int_range(key: str):
    """A whole number within the tool's limits for `key`."""
    def parse(name: str, v: Any) -> int:
        lo, hi = map(int, limit(key))
        expected = f"{name}: expected a whole number from {lo} to {hi}, got {v!r}"
        if isinstance(v, bool) or isinstance(v, float) and not v.is_integer():
            raise ScenarioError(expected)
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise ScenarioError(expected) from None
        if not lo <= n <= hi:
            raise ScenarioError(expected)
        return n
    return parse


def seconds(name: str, v: Any, key: str) -> float:
    """A finite number of seconds within the tool's limits for `key`."""
    lo, hi = limit(key)
    expected = f"{name}: expected seconds from {_num(lo)} to {_num(hi)}, got {v!r}"
    if isinstance(v, bool):
        raise ScenarioError(expected)
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ScenarioError(expected) from None
    if not (math.isfinite(x) and lo <= x <= hi):
        raise ScenarioError(expected)
    return x


def _seconds(key: str):
    return lambda name, v: seconds(name, v, key)


def _choice(*choices: str):
    def parse(name: str, v: Any) -> str:
        if v not in choices:
            raise ScenarioError(f"{name}: expected one of {', '.join(choices)}, got {v!r}")
        return v
    return parse


def _size(name: str, v: Any) -> str:
    try:
        n = parse_size(v)
    except ValueError as e:
        raise ScenarioError(f"{name}: {e}") from None
    if n < 16 * 4096 or n % 4096:
        raise ScenarioError(f"{name}: expected a multiple of 4K of at least 64K, got {v!r}")
    return format_size(n)


def _rate(name: str, v: Any) -> str:
    if str(v) == "max":
        return "max"
    lo, hi = limit("rate")
    try:
        n = int(v) if not isinstance(v, (bool, float)) else None
    except (TypeError, ValueError):
        n = None
    if n is None or not lo <= n <= hi:
        raise ScenarioError(f"{name}: expected page writes per second, a whole number from "
                            f"{_num(lo)} to {_num(hi)}, or 'max', got {v!r}")
    return str(n)


def _pattern(name: str, v: Any) -> str:
    if v in ("uniform", "sequential"):
        return str(v)
    lo, hi = limit("hot_fraction")
    m = re.fullmatch(r"hot:(\d*\.?\d+)", str(v))
    if m and lo < float(m.group(1)) <= hi:
        return str(v)
    raise ScenarioError(f"{name}: expected uniform, sequential or hot:FRACTION with "
                        f"{_num(lo)} < FRACTION <= {_num(hi)}, got {v!r}")


def _yes_no(name: str, v: Any) -> str:
    if v in (True, "yes", "true", "1", 1):
        return "yes"
    if v in (False, "no", "false", "0", 0):
        return "no"
    raise ScenarioError(f"{name}: expected yes or no, got {v!r}")


STRATEGIES = ("stop-the-world", "uffd-wp", "uffd-wp-staggered", "async-scan")
BACKINGS = ("memfd", "shmem", "hugetlbfs", "anon")

# Parameters every scenario takes; a scenario's own flags add more.
COMMON = {p.name: p for p in (
    Param("size", "32M", "guest RAM size", _size),
    Param("writers", 4, "writer processes (vhost-user-backend role)", _int_range("writers")),
    Param("backing", "memfd", "guest RAM backing: " + "|".join(BACKINGS), _choice(*BACKINGS)),
    Param("strategy", "uffd-wp", "snapshot strategy: " + "|".join(STRATEGIES),
          _choice(*STRATEGIES)),
    Param("pattern", "uniform", "which pages writers hit: uniform|sequential|hot:F", _pattern),
    Param("rate", "200000", "combined page writes/s, or max", _rate),
    Param("duration", 1.0, "seconds the writers run", _seconds("duration")),
    Param("populate", "no", "fault all RAM in before protecting (thread step 1b)", _yes_no),
    Param("seed", 1, "random seed", _int_range("seed")),
)}
# Scenario-specific knobs a user may change, when the scenario uses them.
EXTRA = {p.name: p for p in (
    Param("unregistered", 1, "writers that map RAM but never register (at most writers)",
          _int_range("unregistered")),
    Param("prefill", "yes", "write every page before the snapshot", _yes_no),
    Param("unprotect", "all", "un-protect copied faulted pages in all|faulting", _choice(
        "all", "faulting")),
    Param("kernel_writes", "read", "read|process_vm_writev", _choice("read",
                                                                     "process_vm_writev")),
    Param("uffd_source", "syscall", "syscall|syscall-user-only|devuserfaultfd",
          _choice("syscall", "syscall-user-only", "devuserfaultfd")),
)}
# Flags that are switches in uffd-snapshot.
SWITCHES = ("fd_writes", "punch_hole", "fork_child", "zap_after_arm")
# What only makes sense with a file other processes can map (or write).
SHARED_ONLY = ("unregistered", "fork_child", "fd_writes", "punch_hole")


@dataclass(frozen=True)
class Scenario:
    id: str
    name: str
    title: str
    flags: dict[str, Any]
    expect_consistent: bool | None      # on a correct kernel; None: it depends
    note: str = ""
    extra_params: tuple[str, ...] = field(default_factory=tuple)

    @property
    def params(self) -> dict[str, Param]:
        """What `--param` accepts for this scenario, with its defaults."""
        out = dict(COMMON)
        for key in self.extra_params:
            out[key] = EXTRA[key]
        return out

    def defaults(self) -> dict[str, Any]:
        d = {k: p.default for k, p in self.params.items()}
        d.update({k: v for k, v in self.flags.items() if k in self.params})
        return d

    @property
    def needs(self) -> frozenset[str]:
        """What the scenario needs from the kernel with its default parameters."""
        return needed_features(resolve(self, {}))

    @property
    def min_kernel(self) -> str:
        return min_kernel(resolve(self, {}))


CATALOGUE: tuple[Scenario, ...] = (
    Scenario("S1", "stop-the-world", "pause writers, copy, resume",
             {"strategy": "stop-the-world"}, True,
             note="consistent; the stall is the whole copy"),
    Scenario("S2", "single-writer", "one registered writer (QEMU today)",
             {"strategy": "uffd-wp", "writers": 1}, True),
    Scenario("S3", "multi-writer", "N registered writers, armed while quiesced, "
             "un-protected in all", {"strategy": "uffd-wp", "unprotect": "all"},
             True, "at most one fault per page per process",
             ("unprotect",)),
    Scenario("S4", "staggered-arming", "arming process by process while writers run",
             {"strategy": "uffd-wp-staggered"}, False,
             "writes between two armings are missed"),
    Scenario("S5", "unregistered-writer", "one writer maps RAM but never registers",
             {"strategy": "uffd-wp", "unregistered": 1}, False,
             "its writes are never seen", ("unregistered",)),
    Scenario("S5-fork", "fork-child", "a writer's fork child writes (no EVENT_FORK)",
             {"strategy": "uffd-wp", "writers": 2, "fork_child": True}, False,
             "the child's page tables carry no protection"),
    Scenario("S6", "fd-writes", "a writer writes through pwrite() on the fd",
             {"strategy": "uffd-wp", "writers": 2, "fd_writes": True}, False,
             "writes through the fd bypass every page table"),
    Scenario("S6-punch", "punch-hole", "fallocate(PUNCH_HOLE) on the fd during the snapshot",
             {"strategy": "uffd-wp", "writers": 2, "punch_hole": True}, False),
    Scenario("S7", "kernel-writes", "kernel-mode writes into the mapping (read(2))",
             {"strategy": "uffd-wp", "writers": 1, "kernel_writes": "read",
              "uffd_source": "syscall-user-only"}, True,
             "EFAULT with UFFD_USER_MODE_ONLY; with /dev/userfaultfd they fault",
             ("kernel_writes", "uffd_source")),
    Scenario("S8", "zap-after-arm", "MADV_DONTNEED after arming, then write",
             {"strategy": "uffd-wp", "writers": 2, "zap_after_arm": True}, True,
             "the PTE marker survives the zap; the write faults"),
    Scenario("S9", "populate", "populate before protect vs sparse; anonymous control",
             {"strategy": "uffd-wp", "populate": "yes"}, True,
             "set populate=no prefill=no for sparse; backing=anon needs WP_UNPOPULATED",
             ("prefill",)),
    Scenario("S10", "async-scan", "WP_ASYNC + PAGEMAP_SCAN iterative tracking",
             {"strategy": "async-scan"}, True,
             "no stall but a final pause; fd writes still unreported"),
)
BY_KEY = {s.id.lower(): s for s in CATALOGUE} | {s.name: s for s in CATALOGUE}


def get(key: str) -> Scenario:
    """A scenario by id (S3, s3) or readable name (multi-writer)."""
    s = BY_KEY.get(key.lower())
    if s is None:
        close = difflib.get_close_matches(key.lower(), list(BY_KEY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ScenarioError(f"unknown scenario {key!r}{hint}; 'uffdlab run --list' shows "
                            f"the catalogue")
    return s


def resolve(scenario: Scenario, params: dict[str, Any]) -> dict[str, Any]:
    """Defaults merged with the given parameters, each parsed and checked."""
    valid = scenario.params
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ScenarioError(f"{scenario.id}: unknown parameter {unknown[0]!r}; valid "
                            f"parameters: {', '.join(sorted(valid))}")
    merged = scenario.defaults() | params
    resolved = {k: valid[k].parse(k, v) for k, v in merged.items()}
    if resolved.get("unregistered", 0) > resolved["writers"]:
        raise ScenarioError(f"unregistered: expected at most writers "
                            f"({resolved['writers']}), got {resolved['unregistered']}")
    return resolved


def check_against(scenario: Scenario, resolved: dict[str, Any], vm_memory: int,
                  probe: dict | None) -> None:
    """Refuse, before running, what this VM or its kernel cannot do, and the
    combinations uffd-snapshot itself refuses (held together by a contract
    test against `uffd-snapshot --dry-run`)."""
    flags = {**scenario.flags, **resolved}
    if resolved["backing"] == "anon":
        for key in SHARED_ONLY:
            if flags.get(key):
                raise ScenarioError(f"backing: {scenario.id} ({key.replace('_', '-')}) needs "
                                    f"shared memory (memfd, shmem or hugetlbfs), got anon")
    if resolved["backing"] == "hugetlbfs" and flags.get("fd_writes"):
        raise ScenarioError(f"backing: {scenario.id} writes through the fd, which hugetlbfs "
                            f"files do not support; expected memfd or shmem, got hugetlbfs")
    size = parse_size(resolved["size"])
    if size > vm_memory // 2:
        raise ScenarioError(f"size: {resolved['size']} of guest RAM does not fit a VM with "
                            f"{format_size(vm_memory)} of memory (at most half of it, "
                            f"{format_size(vm_memory // 2)}; the snapshot needs a copy)")
    if probe is None:
        return
    # the newest requirement first: it is the one that explains the refusal
    for feat in sorted(needed_features(resolved), reverse=True,
                       key=lambda f: (_version(first_kernels()[f]), f not in _PROBE_CAPS)):
        if not has_feature(probe, feat):
            raise MissingFeature(scenario.id, feature_label(feat), first_kernels()[feat],
                                 str(probe.get("kernel")))
    if resolved["backing"] == "hugetlbfs" and not probe.get("wp_register", {}).get("hugetlbfs"):
        raise ScenarioError(f"{scenario.id}: hugetlbfs backing needs free huge pages in the "
                            f"guest: set provision.hugepages in lab.yml")


def feature_label(feature: str) -> str:
    """How the kernel's own headers spell it: UFFD_FEATURE_WP_ASYNC, /dev/userfaultfd..."""
    return {"USER_MODE_ONLY": "UFFD_USER_MODE_ONLY", "DEV_USERFAULTFD": "/dev/userfaultfd",
            "PAGEMAP_SCAN": "PAGEMAP_SCAN"}.get(feature, f"UFFD_FEATURE_{feature}")


def command(scenario: Scenario, resolved: dict[str, Any], tools_dir: str,
            timeout: float) -> list[str]:
    """The uffd-snapshot argv for a resolved scenario."""
    argv = [f"{tools_dir}/bin/uffd-snapshot"]
    flags = {**{k: v for k, v in scenario.flags.items() if k not in resolved}, **resolved}
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if key in SWITCHES:
            if value:
                argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv + ["--verify", "--timeout", f"{timeout:g}"]


# Fault injections a notebook or sweep may name, and the scenario each means.
INJECTIONS = {"none": None, "unregistered": "S5", "fork-child": "S5-fork",
              "fd-writes": "S6", "punch-hole": "S6-punch", "kernel-writes": "S7",
              "zap-after-arm": "S8"}
_BY_STRATEGY = {"stop-the-world": "S1", "uffd-wp": "S3", "uffd-wp-staggered": "S4",
                "async-scan": "S10"}


def for_strategy(strategy: str, inject: str = "none") -> Scenario:
    """The catalogue scenario a (strategy, injected fault) pair runs."""
    if inject not in INJECTIONS:
        raise ScenarioError(f"inject: expected one of {', '.join(INJECTIONS)}, got {inject!r}")
    if strategy not in _BY_STRATEGY:
        raise ScenarioError(f"strategy: expected one of {', '.join(_BY_STRATEGY)}, "
                            f"got {strategy!r}")
    return get(INJECTIONS[inject] or _BY_STRATEGY[strategy])
