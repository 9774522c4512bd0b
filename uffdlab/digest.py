# SPDX-License-Identifier: MIT
"""A file's SHA-256, read in chunks: what images, kernels, templates and
archives are identified by."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of the file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
