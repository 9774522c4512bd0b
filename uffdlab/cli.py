"""The `uffdlab` command. It parses flags, calls the library, and renders the
library's events; it holds no logic of its own."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from .config import ConfigError, Lab, load_lab
from .events import Event
from .scenarios import ScenarioError

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


class Renderer:
    """Prints events as one line each on stderr, with elapsed time."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.t0 = time.monotonic()

    def __call__(self, ev: Event) -> None:
        if ev.kind == "progress":
            return self._progress(ev)
        print(f"{time.monotonic() - self.t0:6.1f}s {ev}", file=self.stream, flush=True)

    def _progress(self, ev: Event) -> None:
        done, total = ev.data.get("done", 0), ev.data.get("total") or 0
        bar = ""
        if total:
            filled = int(30 * min(done, total) / total)
            bar = "[" + "#" * filled + "." * (30 - filled) + f"] {100 * done / total:3.0f}% "
        end = "\n" if total and done >= total else "\r"
        print(f"{time.monotonic() - self.t0:6.1f}s [{ev.subject}] {bar}{ev.message}",
              end=end, file=self.stream, flush=True)


def _lab(args) -> Lab:
    return load_lab(args.lab)


# -- image ----------------------------------------------------------------
def cmd_image_build(args) -> int:
    from .images import ImageStore
    lab = _lab(args)
    store = ImageStore(lab, Renderer())
    names = args.names or list(lab.images)
    for name in names:
        lab.image_spec(name)                      # every name checked before any build
    for name in names:
        t = time.monotonic()
        img = store.build(name, force=args.force)
        print(f"{name}: {img.dir} (kernel {img.kernel_release}, "
              f"{time.monotonic() - t:.1f} s)")
    return EXIT_OK


def cmd_image_list(args) -> int:
    from .images import ImageStore
    rows = ImageStore(_lab(args)).list()
    table(["name", "suite", "kernel", "size", "hash", "built"],
          [[r["name"], r["suite"], r["kernel"], r["size"], r["key"],
            "yes" if r["built"] else "no"] for r in rows])
    return EXIT_OK


# -- VMs ------------------------------------------------------------------
def cmd_up(args) -> int:
    from .vm import VM
    vm = VM(_lab(args), args.vm, Renderer())
    if args.dry_run:
        print(vm.dry_run())
        return EXIT_OK
    st = vm.up(reuse=args.reuse)
    print(f"{vm.name}: up, kernel {st.kernel_release}, {st.accel}, "
          f"ssh port {st.ssh_port} ('uffdlab ssh {vm.name}')")
    return EXIT_OK


def cmd_ssh(args) -> int:
    from .vm import VM, VMError
    vm = VM(_lab(args), args.vm)
    st = vm.state()
    if st is None:
        raise VMError(f"VM {vm.name!r} is not running; 'uffdlab up {vm.name}' first")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command:
        with vm.session() as s:
            res = s.run(shlex.join(command) if len(command) > 1 else command[0],
                        on_line=print)
            sys.stderr.write(res.stderr)
        return res.exit_status
    # An interactive shell is OpenSSH's job; it gets the same pinned key.
    known = vm.dir / "known_hosts"
    known.write_text(f"[127.0.0.1]:{st.ssh_port} {st.host_pubkey}\n")
    os.execvp("ssh", ["ssh", "-i", str(vm.key_path), "-p", str(st.ssh_port),
                      "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                      "-o", "IdentitiesOnly=yes", "root@127.0.0.1"])


def cmd_status(args) -> int:
    from .vm import all_vms, other_running, reap_dir, stale_dirs
    lab = _lab(args)
    for d in stale_dirs(lab):
        reap_dir(d)
    def row(name: str, st) -> list[str]:
        return [name, st.image, "up" if st.ssh_ready else "booting", st.kernel_release,
                st.accel, str(st.ssh_port), f"{time.time() - st.started:.0f} s"]

    rows = []
    for vm in all_vms(lab):
        st = vm.state()
        rows.append(row(vm.name, st) if st else [vm.name, vm.spec.image, "stopped"] + [""] * 4)
    rows += [row(d.name, st) for d, st in other_running(lab)]
    table(["vm", "image", "state", "kernel", "accel", "ssh port", "uptime"], rows)
    return EXIT_OK


def cmd_down(args) -> int:
    from .vm import VM, all_vms, other_running, reap_dir, stale_dirs, stop_dir
    lab = _lab(args)
    if args.all:
        for d in stale_dirs(lab):
            reap_dir(d)
            print(f"{d.name}: cleaned up (its processes were gone)")
        for d, _ in other_running(lab):          # only this lab file's VMs
            stop_dir(d)
            print(f"{d.name}: stopped")
        vms = all_vms(lab, Renderer())
    else:
        vms = [VM(lab, args.vm, Renderer())]
    for vm in vms:
        print(f"{vm.name}: {'stopped' if vm.down() else 'was not running'}")
    return EXIT_OK


def cmd_doctor(args) -> int:
    from .doctor import run_checks
    lab = None
    try:
        lab = _lab(args)
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
    ok = True
    for check in run_checks(lab):
        mark = "ok  " if check.ok else ("warn" if not check.required else "FAIL")
        print(f"[{mark}] {check.name}: {check.detail}")
        if not check.ok and check.fix:
            print(f"       fix: {check.fix}")
        ok &= check.ok or not check.required
    return EXIT_OK if ok and lab is not None else EXIT_FAIL


# -- helpers --------------------------------------------------------------
def table(headers: list[str], rows: list[list[str]], stream=None) -> None:
    stream = stream or sys.stdout
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip(), file=stream)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uffdlab", description="uffd-wp lab: kernel test VMs, "
                                "guest tools, snapshot scenarios, results.")
    p.add_argument("--lab", metavar="PATH", help="lab file (default: $UFFDLAB_LAB or ./lab.yml)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    img = sub.add_parser("image", help="build and list guest images")
    isub = img.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="build images (all when no name is given)")
    b.add_argument("names", nargs="*", metavar="NAME")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.set_defaults(func=cmd_image_build)
    isub.add_parser("list", help="images with suite, kernel, size, hash").set_defaults(
        func=cmd_image_list)

    up = sub.add_parser("up", help="boot a VM (the first in lab.yml by default)")
    up.add_argument("vm", nargs="?")
    up.add_argument("--dry-run", action="store_true", help="print the qemu command line only")
    up.add_argument("--reuse", action="store_true", help="succeed if it is already up")
    up.set_defaults(func=cmd_up)

    ssh = sub.add_parser("ssh", help="a shell, or a command, in a running VM")
    ssh.add_argument("vm")
    ssh.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ...")
    ssh.set_defaults(func=cmd_ssh)

    sub.add_parser("status", help="running VMs").set_defaults(func=cmd_status)

    down = sub.add_parser("down", help="stop a VM and delete its overlay")
    down.add_argument("vm", nargs="?")
    down.add_argument("--all", action="store_true", help="every VM, stale ones included")
    down.set_defaults(func=cmd_down)

    sub.add_parser("doctor", help="check that this machine can run a lab").set_defaults(
        func=cmd_doctor)
    _extra_commands(sub)
    return p


def _extra_commands(sub) -> None:
    """Commands of the later layers (provision, run, results, sweep, lab)."""
    try:
        from . import cli_runs
    except ImportError:
        return
    cli_runs.register(sub)


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


if __name__ == "__main__":
    sys.exit(main())
