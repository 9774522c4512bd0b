# SPDX-License-Identifier: MIT
"""The lab's own SSH identity: one ed25519 keypair per cache, made once.

Several processes may ask for it at once (a sweep's notebooks, two `up`s), so
it is made under a lock and each half is renamed into place from a scratch
directory: no reader ever sees one process's public key beside another's
private key.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


class LabKeys:
    def __init__(self, directory: Path):
        self.dir = directory

    @property
    def private_path(self) -> Path:
        return self.dir / "lab_ed25519"

    @property
    def public_path(self) -> Path:
        return self.dir / "lab_ed25519.pub"

    @contextlib.contextmanager
    def _locked(self, mode: int):
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock, mode)
            yield

    def _complete(self) -> bool:
        return self.private_path.is_file() and self.public_path.is_file()

    def ensure(self) -> None:
        with self._locked(fcntl.LOCK_SH):
            if self._complete():
                return
        with self._locked(fcntl.LOCK_EX):
            if not self._complete():        # another process may have made it meanwhile
                self._make()

    def _make(self) -> None:
        scratch = Path(tempfile.mkdtemp(prefix=".new-", dir=self.dir))
        try:
            tmp = scratch / "key"
            if self.private_path.is_file():
                # only the public half is missing: derive it, keep the identity
                pub = subprocess.run(["ssh-keygen", "-y", "-f", str(self.private_path)],
                                     check=True, capture_output=True, text=True).stdout
                Path(f"{tmp}.pub").write_text(pub.strip() + " uffdlab\n")
                os.replace(f"{tmp}.pub", self.public_path)
                return
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "uffdlab",
                            "-f", str(tmp)], check=True, capture_output=True)
            os.chmod(tmp, 0o600)
            os.replace(f"{tmp}.pub", self.public_path)  # public first: private marks done
            os.replace(tmp, self.private_path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def public_key(self) -> str:
        """'ssh-ed25519 AAAA...': always the half of the private key on disk."""
        self.ensure()
        with self._locked(fcntl.LOCK_SH):
            return " ".join(self.public_path.read_text().split()[:2])
