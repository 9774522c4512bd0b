# SPDX-License-Identifier: MIT
"""Where the lab's own files are. uffdlab runs from its repository checkout
(an editable install, `pip install -e .`): the playbooks, guest tools,
image recipes and notebooks are files next to the package, not data inside it."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLAYBOOKS = REPO / "playbooks"
GUEST_TOOLS = REPO / "guest-tools"
IMAGES = REPO / "images"
NOTEBOOKS = REPO / "notebooks"
LIMITS_H = GUEST_TOOLS / "src" / "limits.h"
FEATURES_H = GUEST_TOOLS / "src" / "features.h"


class NotACheckoutError(RuntimeError):
    """The package was installed without its repository around it."""


def checkout() -> Path:
    """The repository root, or a clear error if this is not a checkout."""
    missing = [p.name for p in (PLAYBOOKS, GUEST_TOOLS, IMAGES) if not p.is_dir()]
    if missing:
        raise NotACheckoutError(
            f"uffdlab runs from its repository checkout ({', '.join(missing)} not found "
            f"next to {REPO / 'uffdlab'}); clone the repository and 'pip install -e .' it")
    return REPO


def default_lab_file() -> Path:
    """$UFFDLAB_LAB, else ./lab.yml when there is one, else the repository's."""
    env = os.environ.get("UFFDLAB_LAB")
    if env:
        return Path(env)
    here = Path("lab.yml")
    return here if here.is_file() else REPO / "lab.yml"
