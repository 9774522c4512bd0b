# SPDX-License-Identifier: MIT
"""Lifecycle events. The library emits them; the CLI and notebooks render
them. Nothing in the library prints."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .model import Kind


@dataclass(frozen=True)
class Event:
    kind: Kind              # what the data carries is documented with each Kind
    subject: str            # a VM or image name
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def __str__(self) -> str:
        return f"[{self.subject}] {self.kind}: {self.message}" if self.message \
            else f"[{self.subject}] {self.kind}"


Listener = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """The default listener: events go nowhere."""


class Emitter:
    """Something that can tell listeners what it is doing."""

    def __init__(self, subject: str, listener: Listener | None = None):
        self.subject = subject
        self.listener: Listener = listener or ignore

    def emit(self, kind: Kind, message: str = "", **data: Any) -> None:
        self.listener(Event(Kind(kind), self.subject, message, data))


@contextmanager
def every(seconds: float, action: Callable[[], None], name: str) -> Iterator[None]:
    """Call `action` every `seconds`, in a daemon thread, while the block
    runs (heartbeats of a long step); an action that raises is skipped (a
    broken listener must not stop the work). Stopped and joined however the
    block ends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            try:
                action()
            except Exception:
                pass

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
