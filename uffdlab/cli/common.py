# SPDX-License-Identifier: MIT
"""What every command shares: exit codes, the lab file from --lab, and the
rendering of events and tables. Commands hold no logic of their own: they
parse flags, call the library and render its events."""
from __future__ import annotations

import sys
import time

from ..config import Lab, load_lab
from ..events import Event
from ..model import Kind

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def lab_of(args) -> Lab:
    """The lab file named by --lab, or the default one."""
    return load_lab(args.lab)


class Renderer:
    """Prints events as one line each on stderr, with elapsed time."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.t0 = time.monotonic()

    def __call__(self, ev: Event) -> None:
        if ev.kind == Kind.PROGRESS:
            return self._progress(ev)
        print(f"{time.monotonic() - self.t0:6.1f}s {ev}", file=self.stream, flush=True)

    def _progress(self, ev: Event) -> None:
        done, total = ev.data.get("done", 0), ev.data.get("total") or 0
        bar = ""
        if total:
            filled = int(30 * min(done, total) / total)
            bar = "[" + "#" * filled + "." * (30 - filled) + f"] {100 * done / total:3.0f}% "
        end = "\n" if total and done >= total else "\r"
        print(f"{time.monotonic() - self.t0:6.1f}s [{ev.subject}] {bar}{ev.message}",
              end=end, file=self.stream, flush=True)


def table(headers: list[str], rows: list[list[str]], stream=None) -> None:
    stream = stream or sys.stdout
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip(), file=stream)
