# SPDX-License-Identifier: MIT
"""What every command shares: exit codes, the lab file from --lab, and the
rendering of events and tables. Commands hold no logic of their own: they
parse flags, call the library and render its events."""
from __future__ import annotations

import shutil
import sys
import time

from ..config import Lab, load_lab
from ..events import Event
from ..model import Kind

# 3: `run` finished, but its verdict is not what the scenario expects on a
# correct kernel, so scripts (and `git bisect run`) can tell
EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_UNEXPECTED = 0, 1, 2, 3


def lab_of(args) -> Lab:
    """The lab file named by --lab, or the default one."""
    return load_lab(args.lab)


class Renderer:
    """Prints events on stderr, one line each, stamped with the seconds since
    the command started.

    Heartbeats, Ansible task starts and progress records say a long step is
    still moving. On a terminal they update one line in place (a carriage
    return); the next event's line replaces it (a progress bar is kept).
    Anywhere else (a log file, CI) nothing is overwritten and no '\r' is
    written: every event is a plain line, except that a heartbeat is printed
    only after `quiet` seconds without any line, and a subject's progress at
    most once per `quiet` seconds (its last record always), so logs stay
    readable.
    """

    def __init__(self, stream=None, quiet: float = 10.0, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self.quiet = quiet
        self.clock = clock                  # a parameter so tests can move time
        self.t0 = clock()
        self._live_len = 0                  # the in-place line's width (terminal), 0: none
        self._live_kind: str | None = None
        self._last_line = self.t0           # when a line was last written
        self._last_progress: dict[str, float] = {}

    def __call__(self, ev: Event) -> None:
        now = self.clock()
        stamp = f"{now - self.t0:6.1f}s"
        if ev.kind == Kind.PROGRESS:
            return self._progress(ev, now, stamp)
        if ev.kind == Kind.HEARTBEAT:
            text = f"{stamp} [{ev.subject}] {ev.message}"
            if self.tty:
                self._live(text, "step")
            elif now - self._last_line >= self.quiet:
                self._plain(text, now)
            return
        if ev.kind == Kind.TASK and ev.data.get("state") == "started" and self.tty:
            return self._live(f"{stamp} {ev}", "step")
        self._final(f"{stamp} {ev}", now)

    def _progress(self, ev: Event, now: float, stamp: str) -> None:
        done, total = ev.data.get("done", 0), ev.data.get("total") or 0
        bar = ""
        if total:
            filled = int(30 * min(done, total) / total)
            bar = "[" + "#" * filled + "." * (30 - filled) + f"] {100 * done / total:3.0f}% "
        text = f"{stamp} [{ev.subject}] {bar}{ev.message}"
        last = bool(total) and done >= total
        if self.tty:
            if last:
                self._final(text, now, replace=True)
            else:
                self._live(text, "progress")
        elif last or now - self._last_progress.get(ev.subject, -1e18) >= self.quiet:
            self._last_progress[ev.subject] = now
            self._plain(text, now)

    # -- output ------------------------------------------------------------
    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _plain(self, text: str, now: float) -> None:
        self._write(text + "\n")
        self._last_line = now

    def _end_live(self, keep: bool) -> None:
        """Leave the in-place line (keep) or blank it for what replaces it."""
        if self._live_len:
            self._write("\n" if keep else "\r" + " " * self._live_len + "\r")
        self._live_len, self._live_kind = 0, None

    def _live(self, text: str, kind: str) -> None:
        # a wrapped line cannot be overwritten: cut it to the terminal's width
        text = text[:max(20, shutil.get_terminal_size().columns - 1)]
        self._end_live(keep=self._live_kind == "progress" and kind != "progress")
        self._write(text)
        self._live_len, self._live_kind = len(text), kind

    def _final(self, text: str, now: float, replace: bool = False) -> None:
        self._end_live(keep=self._live_kind == "progress" and not replace)
        self._plain(text, now)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):    # no isatty, or a closed file
        return False


def table(headers: list[str], rows: list[list[str]], stream=None) -> None:
    stream = stream or sys.stdout
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip(), file=stream)
