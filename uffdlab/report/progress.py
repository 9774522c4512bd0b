# SPDX-License-Identifier: MIT
"""NotebookProgress: lifecycle events as a few readable lines."""
from __future__ import annotations

import sys
import time
from typing import Any

from ..events import Event
from ..model import Kind

# The width the plain-text live line is padded to, so a shorter one hides it.
_WIDTH = 150


class NotebookProgress:
    """A listener for `vm_for(..., listener=NotebookProgress())`.

    Lifecycle events become one line each (time, VM, kind, message). What
    says a long step is still moving updates one line in place (a display
    that is updated in a notebook, a carriage return in a terminal), so the
    cell shows where it is without flooding: heartbeats (seconds so far and
    the console's latest line while booting, the running task while
    provisioning), Ansible tasks, and a run's `progress` records. The next
    lifecycle line (ssh-ready, provisioning done, failed) takes the place of
    a heartbeat or task line and stays; a progress bar stays as it ended.
    Failed tasks and failures are always printed in full.
    """

    def __init__(self, show_tasks: bool = False, stream: Any = None):
        self.show_tasks = show_tasks
        self.stream = stream
        self._handle = None
        self._live_kind: str | None = None
        self._tasks = 0
        self._open_task: str | None = None     # started and not yet ended
        self._ipython = self._in_ipython()

    @staticmethod
    def _in_ipython() -> bool:
        try:
            from IPython import get_ipython
            return get_ipython() is not None
        except ImportError:
            return False

    @property
    def _displays(self) -> bool:
        return self._ipython and self.stream is None

    def _out(self):
        return self.stream or sys.stdout

    def _live(self, kind: str, text: str) -> None:
        """One line, updated in place."""
        if self._displays:
            from IPython.display import display, update_display
            if self._handle is None or self._live_kind != kind:
                self._handle = display({"text/plain": text}, raw=True, display_id=True)
            else:
                update_display({"text/plain": text}, raw=True,
                               display_id=self._handle.display_id)
        else:
            out = self._out()
            if self._live_kind is not None and self._live_kind != kind:
                out.write("\n")                  # a different live line starts below
            out.write("\r" + text[:_WIDTH].ljust(_WIDTH))
            out.flush()
        self._live_kind = kind

    def _line(self, text: str) -> None:
        """A line that stays. It replaces a heartbeat or task line (they
        only said "still going"); a progress bar is left as it ended."""
        replace = self._live_kind == "step"
        if self._displays:
            if replace and self._handle is not None:
                from IPython.display import update_display
                update_display({"text/plain": text}, raw=True,
                               display_id=self._handle.display_id)
            else:
                print(text, flush=True)
        else:
            out = self._out()
            if self._live_kind is not None:
                out.write("\r" + " " * _WIDTH + "\r" if replace else "\n")
            print(text, file=out, flush=True)
        self._live_kind = None
        self._handle = None

    def __call__(self, event: Event) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
        head = f"{stamp} [{event.subject}]"
        d = event.data
        if event.kind == Kind.PROGRESS and "dashboard" in d:
            self._line(f"{head} {event.message}")        # the link stays in sight
        elif event.kind == Kind.PROGRESS and event.subject == "sweep":
            self._live("sweep", f"{head} {event.message}")   # points, per host
        elif event.kind == Kind.PROGRESS:
            done, total = d.get("done") or 0, d.get("total") or 0
            bar = "#" * int((done / total if total else 0.0) * 30)
            self._live("progress", f"{head} {d.get('phase') or 'run':>14} "
                       f"[{bar:<30}] {done}/{total} pages, {d.get('faults', 0)} faults")
        elif event.kind == Kind.HEARTBEAT:
            self._live("step", f"{head} {event.message}")
        elif event.kind == Kind.TASK:
            self._task(head, event)
        else:
            self._line(f"{head} {event.kind}: {event.message}" if event.message
                       else f"{head} {event.kind}")

    def _task(self, head: str, event: Event) -> None:
        task, state = event.data.get("task", event.message), event.data.get("state")
        if state == "started":
            self._tasks += 1
            self._open_task = task
        elif self._open_task != task:            # an end whose start was not seen
            self._tasks += 1
            self._open_task = None
        else:
            self._open_task = None
        if state == "failed" or (self.show_tasks and state != "started"):
            self._line(f"{head} task: {event.message}")
        else:
            self._live("step", f"{head} ansible task {self._tasks}: {event.message}")
