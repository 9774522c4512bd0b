# SPDX-License-Identifier: MIT
"""The `uffdlab` command: every subcommand, registered explicitly."""
from __future__ import annotations

import argparse
import os
import sys

from ..config import ConfigError
from ..scenarios import ScenarioError
from . import notebooks, runs, vms
from .common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, Renderer, table

__all__ = ["main", "build_parser", "Renderer", "table", "EXIT_OK", "EXIT_FAIL", "EXIT_CONFIG"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uffdlab", description="uffd-wp lab: kernel test VMs, "
                                "guest tools, snapshot scenarios, results.")
    p.add_argument("--lab", metavar="PATH",
                   help="lab file (default: $UFFDLAB_LAB, else ./lab.yml, else the "
                   "repository's)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    vms.register(sub)
    runs.register(sub)
    notebooks.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return EXIT_CONFIG
    except (ScenarioError, argparse.ArgumentTypeError) as e:
        print(f"uffdlab: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("interrupted; VMs that were booting have been stopped", file=sys.stderr)
        return 130
    except Exception as e:                 # every library error is a one-line story
        if os.environ.get("UFFDLAB_DEBUG"):
            raise
        print(f"uffdlab: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAIL

