# SPDX-License-Identifier: MIT
"""Fixtures the unit tests share."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture
def sleeper():
    """Start processes that stand in for a keeper or an unrelated program."""
    procs = []

    def start(*tags: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *tags])
        procs.append(p)
        deadline = time.monotonic() + 5           # until the exec shows in /proc
        while "time.sleep" not in Path(f"/proc/{p.pid}/cmdline").read_text() \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()
