# SPDX-License-Identifier: MIT
"""SSH into a lab guest with paramiko: the lab's key, the image's pinned
host key, nothing else accepted."""
from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko


class SSHError(Exception):
    pass


@dataclass
class CommandResult:
    command: str
    exit_status: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> CommandResult:
        if self.exit_status != 0:
            raise SSHError(f"'{self.command}' exited {self.exit_status}: "
                           f"{(self.stderr or self.stdout).strip()[-2000:]}")
        return self


def host_key_from_line(line: str) -> paramiko.PKey:
    kind, b64 = line.split()[:2]
    if kind != "ssh-ed25519":
        raise SSHError(f"expected an ssh-ed25519 host key, got {kind}")
    return paramiko.Ed25519Key(data=base64.b64decode(b64))


class Session:
    """One authenticated SSH connection to a guest."""

    def __init__(self, port: int, host_pubkey: str, key_path: Path,
                 host: str = "127.0.0.1", user: str = "root", timeout: float = 10):
        self.host, self.port, self.user = host, port, user
        self.client = paramiko.SSHClient()
        # Only the key recorded when the image was built is trusted.
        self.client.get_host_keys().add(f"[{host}]:{port}", "ssh-ed25519",
                                        host_key_from_line(host_pubkey))
        self.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            self.client.connect(host, port=port, username=user, key_filename=str(key_path),
                                timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                                allow_agent=False, look_for_keys=False)
        except BaseException:
            self.client.close()
            raise

    def run(self, command: str, timeout: float | None = None,
            on_line: Callable[[str], None] | None = None, check: bool = False,
            reply: Callable[[str], str | None] | None = None) -> CommandResult:
        """Run a command; stream stdout lines to `on_line` as they arrive.
        `reply` answers a line the command prints with text sent to its
        stdin (None: no answer), for values that must be fresh when read."""
        start = time.monotonic()
        chan = self.client.get_transport().open_session()
        try:
            chan.exec_command(command)
            if reply is not None:
                def on_line(line, _show=on_line):
                    answer = reply(line)
                    if answer is not None:
                        chan.sendall(answer.encode())
                    if _show:
                        _show(line)
            out, err = self._collect(chan, timeout, on_line, command)
            status = chan.recv_exit_status()
        finally:
            chan.close()
        res = CommandResult(command, status, out, err, time.monotonic() - start)
        return res.check() if check else res

    @staticmethod
    def _collect(chan, timeout, on_line, command) -> tuple[str, str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        out, err, partial = [], [], ""
        chan.settimeout(0.2)
        while True:
            if chan.recv_ready():
                chunk = chan.recv(65536).decode(errors="replace")
                out.append(chunk)
                if on_line:
                    partial += chunk
                    *lines, partial = partial.split("\n")
                    for line in lines:
                        on_line(line)
            elif chan.recv_stderr_ready():
                err.append(chan.recv_stderr(65536).decode(errors="replace"))
            elif chan.exit_status_ready() and not chan.recv_ready() \
                    and not chan.recv_stderr_ready():
                break
            elif chan.closed or (chan.eof_received and not chan.recv_ready()):
                if chan.exit_status_ready():
                    break
                time.sleep(0.01)
            else:
                transport = chan.get_transport()
                if transport is None or not transport.is_active():
                    raise SSHError(f"the SSH connection dropped while '{command[:80]}' ran "
                                   f"(the VM stopped?)")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"'{command}' still running after {timeout:.0f} s")
                time.sleep(0.005)
        if on_line and partial:
            on_line(partial)
        return "".join(out), "".join(err)

    def put(self, local: Path, remote: str) -> None:
        with self.client.open_sftp() as sftp:
            sftp.put(str(local), remote)

    def get(self, remote: str, local: Path, remove: bool = False) -> None:
        """Fetch a file by SFTP, and delete it in the guest if asked."""
        with self.client.open_sftp() as sftp:
            sftp.get(remote, str(local))
            if remove:
                sftp.remove(remote)

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.settimeout(2)
            return s.recv(4).startswith(b"SSH")
    except OSError:
        return False
