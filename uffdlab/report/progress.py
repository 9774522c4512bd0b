# SPDX-License-Identifier: MIT
"""NotebookProgress: lifecycle events as a few readable lines."""
from __future__ import annotations

import sys
import time
from typing import Any

from ..events import Event
from ..model import Kind


class NotebookProgress:
    """A listener for `vm_for(..., listener=NotebookProgress())`.

    Lifecycle events become one line each (time, VM, kind, message);
    Ansible tasks and a run's `progress` records update one line in place
    (a display that is updated in a notebook, a carriage return in a
    terminal), so a long step shows where it is without flooding the cell.
    Failed tasks and failures are always printed in full.
    """

    def __init__(self, show_tasks: bool = False, stream: Any = None):
        self.show_tasks = show_tasks
        self.stream = stream
        self._handle = None
        self._live_kind: str | None = None
        self._tasks = 0
        self._ipython = self._in_ipython()

    @staticmethod
    def _in_ipython() -> bool:
        try:
            from IPython import get_ipython
            return get_ipython() is not None
        except ImportError:
            return False

    def _live(self, kind: str, text: str) -> None:
        """One line, updated in place."""
        if self._ipython and self.stream is None:
            from IPython.display import display, update_display
            if self._handle is None or self._live_kind != kind:
                self._handle = display({"text/plain": text}, raw=True, display_id=True)
                self._live_kind = kind
            else:
                update_display({"text/plain": text}, raw=True,
                               display_id=self._handle.display_id)
        else:
            out = self.stream or sys.stdout
            out.write("\r" + text[:150].ljust(150))
            out.flush()
            self._live_kind = kind

    def _line(self, text: str) -> None:
        if not self._ipython and self._live_kind is not None:
            (self.stream or sys.stdout).write("\n")     # end the line updated in place
        self._live_kind = None
        self._handle = None
        print(text, file=self.stream or sys.stdout, flush=True)

    def __call__(self, event: Event) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
        head = f"{stamp} [{event.subject}]"
        if event.kind == Kind.PROGRESS:
            d = event.data
            done, total = d.get("done") or 0, d.get("total") or 0
            bar = "#" * int((done / total if total else 0.0) * 30)
            self._live("progress", f"{head} {d.get('phase') or 'run':>14} "
                       f"[{bar:<30}] {done}/{total} pages, {d.get('faults', 0)} faults")
        elif event.kind == Kind.TASK:
            self._tasks += 1
            if event.data.get("state") == "failed" or self.show_tasks:
                self._line(f"{head} task: {event.message}")
            else:
                self._live("task", f"{head} ansible task {self._tasks}: {event.message}")
        else:
            self._line(f"{head} {event.kind}: {event.message}" if event.message
                       else f"{head} {event.kind}")
