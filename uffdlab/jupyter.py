# SPDX-License-Identifier: MIT
"""The project's Jupyter kernel and how JupyterLab is reached.

One kernel name everywhere: the notebooks' metadata, papermill and
`uffdlab lab` all say KERNEL_NAME, and the kernelspec runs the Python of the
environment uffdlab is installed in (the venv), so a notebook imports the
same uffdlab as the command line."""
from __future__ import annotations

import argparse
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

KERNEL_NAME = "uffdlab"
KERNEL_DISPLAY_NAME = "uffd-lab (venv)"

# Addresses that mean "every interface": the browser still reaches them on loopback.
_WILDCARDS = {"", "0.0.0.0", "::", "*"}


def kernelspec_dir(user: bool, prefix: Path | None = None) -> Path:
    """Where ipykernel puts the kernelspec: the user's Jupyter data dir
    (JUPYTER_DATA_DIR honoured), else PREFIX/share/jupyter (sys.prefix)."""
    if user:
        from jupyter_core.paths import jupyter_data_dir
        return Path(jupyter_data_dir()) / "kernels" / KERNEL_NAME
    return Path(prefix or sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME


def install_kernel(user: bool, prefix: Path | None = None) -> Path:
    """Register the kernel, running this environment's Python, for the user
    (every JupyterLab and VS Code of theirs sees it) or in this environment
    (sys.prefix, or PREFIX). Installing again replaces it. Returns its directory."""
    if user and prefix is not None:
        raise ValueError("install_kernel: user=True and a prefix exclude each other")
    where = ["--user"] if user else ["--prefix", str(prefix)] if prefix else ["--sys-prefix"]
    # sys.executable unresolved: the venv's bin/python, not the interpreter it links to
    argv = [sys.executable, "-m", "ipykernel", "install", "--name", KERNEL_NAME,
            "--display-name", KERNEL_DISPLAY_NAME, *where]
    proc = subprocess.run(argv, capture_output=True, text=True)
    dest = kernelspec_dir(user, prefix)
    if proc.returncode != 0 or not (dest / "kernel.json").is_file():
        out = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"{' '.join(argv[1:])} exited {proc.returncode} without writing "
                           f"{dest / 'kernel.json'}: {out[-1] if out else 'no output'}")
    return dest


def kernel_is_installed(dest: Path) -> bool:
    """A kernelspec at DEST that names this environment's Python."""
    try:
        spec = json.loads((dest / "kernel.json").read_text())
    except (OSError, ValueError):
        return False
    python = spec.get("argv", [None])[0]
    # this venv's bin/: the console script runs bin/python3, the kernelspec names bin/python
    return isinstance(python, str) and Path(python).parent == Path(sys.executable).parent \
        and spec.get("display_name") == KERNEL_DISPLAY_NAME


def ensure_kernel() -> Path:
    """The kernel in this environment (where `uffdlab lab` looks), installed if missing."""
    dest = kernelspec_dir(user=False)
    return dest if kernel_is_installed(dest) else install_kernel(user=False)


def port_number(text: str) -> int:
    """An argparse type: a TCP port a server can listen on."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return port


def _url_host(ip: str) -> str:
    if ip in _WILDCARDS:
        return "127.0.0.1"
    try:
        return f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    except ValueError:                    # a host name
        return ip


def lab_instructions(ip: str, port: int, token: str, ssh_connection: str | None,
                     user: str) -> str:
    """What `uffdlab lab` prints: the URL to open and, on a host reached by
    SSH (SSH_CONNECTION set), the port forward that makes it work from the
    user's own machine."""
    host = _url_host(ip)
    url = f"http://{host}:{port}/lab?token={token}"
    lines = ["JupyterLab on notebooks/, kernel " + repr(KERNEL_DISPLAY_NAME) + "; open:",
             f"  {url}"]
    fields = (ssh_connection or "").split()
    if len(fields) == 4:                  # client-ip client-port server-ip server-port
        server, sshd_port = fields[2], fields[3]
        target = "127.0.0.1" if ip in _WILDCARDS else host
        port_opt = "" if sshd_port == "22" else f"-p {sshd_port} "
        lines += ["this host is remote (SSH_CONNECTION): forward the port first, on your "
                  "own machine:", f"  ssh -L {port}:{target}:{port} {port_opt}{user}@{server}"]
        if host != "127.0.0.1":           # through the forward, the URL is a loopback one
            lines.append(f"then open http://127.0.0.1:{port}/lab?token={token} there")
    return "\n".join(lines)
