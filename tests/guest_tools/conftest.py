# SPDX-License-Identifier: MIT
"""Fixtures for the C guest tools, run on the host kernel.

The tools are built once per session with `make -C guest-tools`; `run_snapshot`
runs uffd-snapshot and parses its JSON Lines; `probe` is uffd-probe's answer,
which decides the only skips allowed: when the kernel lacks a feature.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "guest-tools"
BIN = TOOLS / "bin"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "guest_tools: builds and runs the C guest tools on the host kernel")


@dataclass
class Run:
    """One tool run: exit code, parsed JSON records, raw streams."""
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    records: list[dict] = field(default_factory=list)

    def of_type(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("type") == kind]

    def one(self, kind: str) -> dict:
        found = self.of_type(kind)
        assert len(found) == 1, f"expected one {kind!r} record, got {len(found)}\n{self.describe()}"
        return found[0]

    @property
    def summary(self) -> dict:
        assert self.rc == 0, f"run failed\n{self.describe()}"
        return self.one("summary")

    @property
    def config(self) -> dict:
        return self.one("config")

    @property
    def error(self) -> dict:
        return self.one("error")

    def describe(self) -> str:
        return (f"args: {' '.join(self.args)}\nexit code: {self.rc}\n"
                f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}")


def parse_lines(text: str) -> list[dict]:
    """Every stdout line must be one JSON object."""
    records = []
    for line in text.splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


@pytest.fixture(scope="session")
def tools() -> Path:
    """Build the tools once (incremental, so cheap when up to date)."""
    nproc = str(os.cpu_count() or 1)
    done = subprocess.run(["make", "-C", str(TOOLS), "-j", nproc], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"make failed:\n{done.stdout}\n{done.stderr}"
    return BIN


@pytest.fixture(scope="session")
def run_tool(tools):
    def run(name: str, *args: str, timeout: float = 60) -> Run:
        argv = [str(tools / name), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return Run(argv, done.returncode, done.stdout, done.stderr, parse_lines(done.stdout))
    return run


@pytest.fixture(scope="session")
def run_snapshot(run_tool):
    """run_snapshot("--strategy", "uffd-wp", ...) -> Run (small RAM by default)."""
    def run(*args: str, timeout: float = 60) -> Run:
        if not any(a.startswith("--size") for a in args):
            args = ("--size", "16M", *args)
        return run_tool("uffd-snapshot", *args, timeout=timeout)
    return run


@pytest.fixture(scope="session")
def probe(run_tool) -> dict:
    done = run_tool("uffd-probe")
    assert done.rc == 0, done.describe()
    return done.one("probe")


def first_releases() -> dict[str, str]:
    """Every feature and capability of src/features.h with its first release."""
    text = (TOOLS / "src" / "features.h").read_text()
    return dict(re.findall(r'X\((\w+),(?:\s*\w+,)?\s*"([\d.]+)"\)', text))


@pytest.fixture(scope="session")
def require(probe):
    """require("WP_ASYNC"): skip, naming the feature and kernel, if it is missing."""
    first_of = first_releases()

    def need(*features: str) -> None:
        for feat in features:
            if feat == "PAGEMAP_SCAN":
                ok, first = probe["pagemap_scan"], first_of["PAGEMAP_SCAN"]
            elif feat == "dev_userfaultfd":
                ok, first = probe["dev_userfaultfd"], first_of["DEV_USERFAULTFD"]
            elif feat == "user_mode_only":
                ok, first = probe["user_mode_only"], first_of["USER_MODE_ONLY"]
            else:
                ok, first = probe["features"][feat], probe["feature_min_kernel"][feat]
            if not ok:
                pytest.skip(f"kernel {probe['kernel']} lacks {feat} (first in Linux {first})")
    return need
