"""The lab's own SSH identity: one ed25519 keypair per cache, made once."""
from __future__ import annotations

import os
import subprocess
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

    def ensure(self) -> None:
        if self.private_path.exists() and self.public_path.exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.dir / f".lab_ed25519.{os.getpid()}"
        for p in (tmp, Path(f"{tmp}.pub")):
            p.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "uffdlab",
                        "-f", str(tmp)], check=True, capture_output=True)
        os.chmod(tmp, 0o600)
        os.replace(f"{tmp}.pub", self.public_path)   # public first: private marks done
        os.replace(tmp, self.private_path)

    def public_key(self) -> str:
        self.ensure()
        return " ".join(self.public_path.read_text().split()[:2])
