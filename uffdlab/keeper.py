# SPDX-License-Identifier: MIT
"""The process that owns one running QEMU.

`VM.up()` starts `python -m uffdlab.keeper STATE_DIR`, which starts QEMU and
stays with it. While the VM boots, the keeper watches a pipe from the caller:
if the caller dies (Ctrl-C, kill -9, a crashed notebook) before it writes
"detach", the keeper stops QEMU. A VM with an owner (a fresh VM of a sweep
point, whose process may be a Dask worker) is stopped when that process
goes, however it goes. Whenever QEMU exits, for whatever reason,
the keeper deletes the overlay and the VM's state. QEMU is tied to the keeper
with PR_SET_PDEATHSIG, so even a killed keeper takes QEMU with it; the
overlay it then leaves is what `uffdlab down --all` sweeps up.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .owned import ProcessId, remove_vm_dir

PR_SET_PDEATHSIG = 1
OWNER_POLL_SECONDS = 1.0


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when its parent goes away."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def cleanup(state_dir: Path) -> None:
    """Remove the lab's files of a stopped VM, keeping its last serial log
    next to the directory (only files the lab names; see owned.py)."""
    remove_vm_dir(state_dir, keep_serial_as=last_serial_log(state_dir))


def last_serial_log(state_dir: Path) -> Path:
    return state_dir.parent / f"{state_dir.name}.serial.log"


def main(state_dir: Path) -> int:
    launch = json.loads((state_dir / "launch.json").read_text())
    with open(state_dir / "qemu.log", "w") as log:
        qemu = subprocess.Popen(launch["argv"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)

    def stop(*_):
        if qemu.poll() is None:
            qemu.terminate()

    try:
        print(qemu.pid, flush=True)
    except BrokenPipeError:             # the caller died before it read the PID
        sys.stdout = open(os.devnull, "w")   # (and Python's exit flush must not fail)
        stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the caller's Ctrl-C is its own

    def watch_caller():
        for line in sys.stdin:
            if line.strip() == "detach":
                return
        stop()                                     # caller gone before the VM was ready

    threading.Thread(target=watch_caller, daemon=True).start()
    owner = ProcessId.from_dict(launch.get("owner"))
    while True:
        try:
            qemu.wait(timeout=OWNER_POLL_SECONDS)
            break
        except subprocess.TimeoutExpired:
            if owner is not None and not owner.alive():
                stop()                             # its owner is gone: nobody will stop it
    cleanup(state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
