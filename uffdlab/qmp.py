# SPDX-License-Identifier: MIT
"""QEMU's machine protocol: one command at a time over the VM's socket."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from pathlib import Path

# qemu.qmp logs every refused connect at ERROR; polling a booting VM expects them.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def qmp(socket_path: Path, command: str, timeout: float = 5.0, **args) -> dict:
    """One QMP command. Runs in its own thread so it also works inside
    Jupyter, whose event loop is already running."""
    from qemu.qmp import QMPClient

    async def go():
        client = QMPClient("uffdlab")
        await asyncio.wait_for(client.connect(str(socket_path)), timeout)
        try:
            return await asyncio.wait_for(client.execute(command, args or None), timeout)
        finally:
            await client.disconnect()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()
