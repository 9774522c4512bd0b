# SPDX-License-Identifier: MIT
# PYTHON_ARGCOMPLETE_OK (argcomplete's global completion looks for this marker here)
"""The `uffdlab` command: every subcommand, registered explicitly.

Each command module registers its parsers with a one-line `help`; the
description and examples every `--help` shows are in HELP below, applied to
all subcommands in one place, as is the `--lab` option that may come after
the command as well as before it.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Iterator

from .. import __version__
from ..config import ConfigError
from ..scenarios import ScenarioError
from . import cluster, notebooks, runs, vms
from .common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, Renderer, table

__all__ = ["main", "build_parser", "Renderer", "table", "EXIT_OK", "EXIT_FAIL", "EXIT_CONFIG",
           "HELP"]

LAB_HELP = "lab file (default: $UFFDLAB_LAB, else ./lab.yml, else the repository's)"

EPILOG = """\
common workflows:
  uffdlab doctor                    check this machine (--kvm also probes KVM)
  uffdlab demo                      the main job: image, VM, one run in a notebook
  uffdlab image build               build the lab file's images (cached)
  uffdlab up && uffdlab ssh guest   boot the first VM, open a shell in it
  uffdlab run --list                the scenario catalogue
  uffdlab run S3 --param writers=8  run a scenario; the run is stored
  uffdlab results --last 5          the newest stored runs
  uffdlab lab                       JupyterLab on notebooks/
  uffdlab down --all                stop every VM of this lab file

--lab PATH may be given before or after the command.
'uffdlab COMMAND --help' describes a command, with examples.

exit status: 0 done, 1 failed, 2 bad input or lab file, 3 a run finished
but its verdict is not the one its scenario expects on a correct kernel

shell completion (bash, zsh):
  eval "$(register-python-argcomplete uffdlab)"
"""

# command path -> (description, examples). Descriptions are refilled to the
# terminal's width; examples are kept line for line.
HELP: dict[str, tuple[str, str]] = {
    "image": (
        "Guest images: built once with mmdebstrap from the recipes in the lab file and "
        "kept in the cache; an unchanged recipe is not built again.",
        "uffdlab image build\nuffdlab image list"),
    "image build": (
        "Build the named images, or every image of the lab file. All names are checked "
        "before anything is built; an image whose recipe is unchanged is kept unless "
        "--force.",
        "uffdlab image build\nuffdlab image build --force bookworm"),
    "image export": (
        "Write a built image as one archive (a reproducible tar): disk, kernel, initrd, "
        "pinned host key, package manifest and meta, described by a first member that "
        "gives each file's SHA-256 and the image's content hash.",
        "uffdlab image export trixie trixie.uffdlab.tar"),
    "image import": (
        "Verify an exported image and install it into this lab's cache, so a colleague "
        "runs the exact same guest. A tampered, truncated or padded archive is refused and "
        "installs nothing. The image carries no lab key: it boots with yours.",
        "uffdlab image import trixie.uffdlab.tar"),
    "lock": (
        "Write lab.lock next to the lab file: for each image (built if needed) its suite, "
        "kernel release, content hash and every package's exact version, the guest tools' "
        "digest and the lab's Python environment. Image builds pin the locked versions and "
        "name what drifted; commit the file.",
        "uffdlab lock\nuffdlab image build --locked"),
    "image list": (
        "Each image of the lab file: suite, kernel release, size, recipe hash and whether "
        "it is built.",
        "uffdlab image list\nuffdlab image list --lab other.yml"),
    "kernel": (
        "Kernels built from a source tree (images.NAME.kernel.tree): out of tree under the "
        "cache dir, with the lab's config fragments merged in. 'up', 'run' and "
        "'image build' build them too; an unchanged tree is not built again.",
        "uffdlab kernel build mine\nuffdlab kernel list"),
    "kernel build": (
        "Build the named images' kernels, or every tree kernel of the lab file: base "
        "config, kvm_guest.config, images/local-kernel.config and the image's fragments, "
        "merged, then olddefconfig, then bzImage and headers_install. Options the lab "
        "needs that did not survive are named, with what each breaks. The build "
        "directory persists, so a changed file rebuilds only what depends on it.",
        "uffdlab kernel build mine\nuffdlab kernel build --force mine"),
    "kernel source": (
        "Unpack Debian's linux-source-SERIES package into the cache dir (once) and print "
        "its path: a real kernel tree to try the loop on without a checkout of your own. "
        "Copy it elsewhere before patching it.",
        "uffdlab kernel source\nuffdlab kernel source 6.1"),
    "kernel list": (
        "Each tree kernel of the lab file: its tree, base config, release, cache key and "
        "whether the tree's current state is built.",
        "uffdlab kernel list"),
    "up": (
        "Boot a VM (the first of the lab file by default) and wait until SSH answers. With "
        "accel: auto, KVM is tried first and TCG used when KVM does not run guests; the "
        "verdict is cached.",
        "uffdlab up\nuffdlab up guest --reuse\nuffdlab up --dry-run"),
    "ssh": (
        "An interactive shell in a running VM (OpenSSH, with the pinned host key), or one "
        "command run there, exiting with its status. Everything after the VM name goes to "
        "the guest, so give uffdlab's own options (--lab) before the VM name.",
        "uffdlab ssh guest\nuffdlab ssh guest -- uname -r"),
    "status": (
        "The lab file's VMs: state, kernel, accel, SSH port, uptime, and whether each was "
        "restored from a template. Leftovers of VMs whose processes are gone are cleaned "
        "up.",
        "uffdlab status\nuffdlab status --lab other.yml"),
    "template": (
        "Templates: a booted, provisioned VM saved to disk, which later VMs of the same "
        "shape restore from in seconds instead of booting.",
        "uffdlab template list\nuffdlab template build guest"),
    "template list": (
        "The saved templates: key, kernel, memory, cpus, accel, size and when each was "
        "saved.",
        "uffdlab template list"),
    "template build": (
        "Boot (or reuse) a VM, provision it and save its template. A VM this command "
        "booted is stopped again.",
        "uffdlab template build\nuffdlab template build guest"),
    "template rm": (
        "Delete templates by key (see 'uffdlab template list'), or all of them.",
        "uffdlab template rm 3f9a0c1d2e4b\nuffdlab template rm --all"),
    "down": (
        "Stop a VM and delete its overlay. --all stops every VM this lab file started "
        "(the notebooks' too) and cleans up dead ones; other lab files' VMs are never "
        "touched.",
        "uffdlab down guest\nuffdlab down --all"),
    "doctor": (
        "Check that this machine can run a lab: QEMU, mmdebstrap and its privileges, "
        "the SSH client, the Python dependencies, JupyterLab and the 'uffdlab' Jupyter "
        "kernel, free space in the cache, and KVM. Each problem comes with its fix. "
        "KVM is reported from the cached verdict; --kvm boots a kernel under KVM to find "
        "out (a few seconds). Exits 0 when a lab can run (warnings allowed), else 1.",
        "uffdlab doctor\nuffdlab doctor --kvm"),
    "provision": (
        "Provision a VM with the Ansible playbook (booting it first if needed): guest "
        "tools built, sysctls set; then print the kernel's userfaultfd features.",
        "uffdlab provision\nuffdlab provision guest"),
    "run": (
        "Run a catalogue scenario (an id like S3 or a name like multi-writer) on a VM, "
        "booting and provisioning it when needed, and store the run in the results "
        "database. Parameters are checked before anything boots. --image NAME runs on a "
        "VM of that image (shaped like the lab file's first VM of it) instead of --vm. "
        "Exit status: 0 the run finished with the verdict its scenario expects, 1 it "
        "failed or timed out, 2 bad input, 3 it finished with an unexpected verdict. "
        "--bisect is for 'git bisect run': each step boots a fresh VM of --image with the "
        "kernel built from its tree as it is now, and stops it after; it exits 0 good "
        "(the expected verdict), 1 bad (the other verdict, or the run failed or timed "
        "out), 125 skip (the kernel or image did not build, the VM did not boot or "
        "provision, or the run gave no verdict) or 128 abort (bad input).",
        "uffdlab run --list\nuffdlab run S3 --param writers=8 --param size=256M\n"
        "uffdlab run multi-writer --vm guest --timeout 300\n"
        "uffdlab run S3 --image mine\n"
        "git bisect run uffdlab run S3 --image mine --bisect"),
    "rerun": (
        "Run a stored run again as it was: its scenario, parameters and VM shape, in a fresh "
        "VM, with the same image content, kernel build, guest tools, QEMU and accelerator "
        "(it refuses to start when any of them changed since). The repeats (3 by default) "
        "are stored linked to the original. It prints whether the verdict is the same and "
        "whether each metric of the original lies within the spread of the repeats. "
        "Exit status: 0 same verdict, "
        "1 a repeat failed, 2 bad input, 3 a different verdict.",
        "uffdlab rerun 3f2a9c\nuffdlab rerun 3f2a9c --times 5"),
    "results": (
        "List the stored runs (the filters combine), or show one run in full with "
        "'uffdlab results show RUN'. In the table, a status marked (!) is a verdict other "
        "than the one the scenario expects on a correct kernel. --json and --csv are for "
        "scripts.",
        "uffdlab results --last 10\nuffdlab results --scenario S3 --since 2h\n"
        "uffdlab results --status inconsistent --csv > runs.csv\n"
        "uffdlab results show 1a2b3c"),
    "sweep": (
        "Execute notebooks/10-snapshot.ipynb with papermill for every point of a grid "
        "file; the executed notebooks, index.json and a report notebook go under "
        "results/sweeps/.",
        "uffdlab sweep notebooks/sweep-example.yml"),
    "cluster": (
        "Lab hosts: machines, or running lab VMs, prepared by playbooks/lab-host.yml to run "
        "a Dask worker that offers vm_slots, so sweeps spread over them. HOSTS.yml lists "
        "them (docs/cluster.md).",
        "uffdlab cluster up hosts.yml\nuffdlab cluster status"),
    "cluster up": (
        "Prepare every host of HOSTS.yml (apt packages, this checkout in a venv with this "
        "machine's Dask, the lab file, the listed images) and start its worker service; "
        "when HOSTS.yml names no scheduler, start one here first. Waits until every worker "
        "has joined, then prints the dashboard link and the line for the lab file.",
        "uffdlab cluster up hosts.yml\nuffdlab cluster up hosts.yml --timeout 1800"),
    "cluster down": (
        "Stop and disable the worker service of every host of HOSTS.yml, then stop the "
        "scheduler 'cluster up' started here, if it still runs (never another process).",
        "uffdlab cluster down hosts.yml"),
    "cluster status": (
        "The scheduler's workers: name, host, VM slots and tasks in progress, and the "
        "dashboard link. Asks --scheduler, else the lab file's cluster.scheduler, else the "
        "scheduler 'cluster up' started here.",
        "uffdlab cluster status\nuffdlab cluster status --scheduler tcp://10.0.0.5:8786"),
    "demo": (
        "The main job: build the default image, then execute 10-snapshot.ipynb (boot, "
        "provision, one run), leaving the executed notebook and the run in the results "
        "database.",
        "uffdlab demo\nuffdlab demo --keep --verbose"),
    "lab": (
        "Start JupyterLab on notebooks/ with the 'uffdlab' kernel (registered first if "
        "needed) and print the URL to open, with the SSH port forward to use when this "
        "host is remote.",
        "uffdlab lab\nuffdlab lab --ip 0.0.0.0 --port 8899"),
    "jupyter": (
        "The project's Jupyter kernel 'uffdlab', which the notebooks, papermill and "
        "'uffdlab lab' use: it runs this environment's Python, so notebooks import the "
        "same uffdlab as this command.",
        "uffdlab jupyter install\nuffdlab jupyter install --user"),
    "jupyter install": (
        "Register the kernel 'uffdlab' running this environment's Python: in this venv "
        "(default), or with --user for every JupyterLab or VS Code of yours. Installing "
        "again replaces it.",
        "uffdlab jupyter install\nuffdlab jupyter install --user"),
}


def subcommands(parser: argparse.ArgumentParser,
                prefix: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) of every subcommand below `parser`, nested ones
    included ('image build')."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:                  # an alias of one already given
                    continue
                seen.add(id(sub))
                path = f"{prefix} {name}".strip()
                yield path, sub
                yield from subcommands(sub, path)


def _finish_subcommand(path: str, sub: argparse.ArgumentParser) -> None:
    description, examples = HELP.get(path, (None, None))
    sub.formatter_class = argparse.RawDescriptionHelpFormatter
    if description:
        sub.description = textwrap.fill(description, width=78)
    if examples:
        sub.epilog = "examples:\n" + textwrap.indent(examples, "  ")
    # SUPPRESS: when --lab is not given here, the value (or default) given
    # before the command stays; when it is, it wins.
    if not any("--lab" in a.option_strings for a in sub._actions):
        sub.add_argument("--lab", metavar="PATH", default=argparse.SUPPRESS, help=LAB_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uffdlab", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="uffd-wp lab: kernel test VMs, guest tools, snapshot scenarios, results.",
        epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"uffdlab {__version__}")
    p.add_argument("--lab", metavar="PATH", help=LAB_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    vms.register(sub)
    runs.register(sub)
    notebooks.register(sub)
    cluster.register(sub)
    for path, parser in subcommands(p):
        _finish_subcommand(path, parser)
    return p


def _autocomplete(parser: argparse.ArgumentParser) -> None:
    """Answer a shell's completion request and exit, when this is one.
    argcomplete marks one with _ARGCOMPLETE; checking it first spares every
    other invocation the import."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:        # completion is optional: the command still works
        return
    argcomplete.autocomplete(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _autocomplete(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # a mistyped flag under `git bisect run` must stop the bisection, not
        # mark every commit bad (bisect reads 2 as bad; 128 and up abort it)
        bisecting = "--bisect" in (sys.argv[1:] if argv is None else argv)
        if e.code == 2 and bisecting:
            from .runs import EXIT_BISECT_ABORT
            return EXIT_BISECT_ABORT
        raise
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
