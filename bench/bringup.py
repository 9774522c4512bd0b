#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Bring-up benchmark: image builds and `VM.up()` against a bare qemu boot.

    .venv/bin/python bench/bringup.py [--lab lab.yml] [--image trixie]
                                      [--repeat N] [--skip-cold]

Prints one table:

- cold image build: a real mmdebstrap build into a temporary cache dir
  (about 80 s; --skip-cold leaves it out),
- warm (no-op) build of the cached image: the library call and the
  `uffdlab image build NAME` command (Python start-up included),
- the same image booted by a bare, hand-written qemu command (same accel,
  memory, cpus, kernel, initrd, kernel command line, a qcow2 overlay, hostfwd)
  until a plain socket reads the SSH banner,
- `VM.up()` to SSH-ready (pinned host key, key authentication),
- a cold boot plus provisioning, which saves the shape's template, then
  `VM.up()` restoring from it (--skip-templates leaves these out): restore
  against the cold `up` and against boot plus provisioning, and the
  template's size against guest RAM,
- the ratio up/bare, from medians of --repeat boots each, alternated so that
  load changes hit both alike.

Figures are measured in the same run (ratios, never absolute times alone);
the load average is printed alongside because TCG boots scale with free CPU.
The benchmark's VMs live in a private temporary cache dir whose `images` and
`keys` link to the lab's, so `uffdlab down --all` run by someone
else cannot sweep them, and nothing of theirs is touched. Every VM, qemu
process and overlay is removed on the way out, Ctrl-C and SIGTERM included.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from uffdlab.config import ConfigError, Lab, VMSpec, load_lab  # noqa: E402
from uffdlab.images import ImageStore  # noqa: E402
from uffdlab.keeper import die_with_parent  # noqa: E402
from uffdlab.qemu import GUEST_CMDLINE, QEMU  # noqa: E402
from uffdlab.template import Template  # noqa: E402
from uffdlab.vm import VM, free_port  # noqa: E402

UP_TARGET = 1.15        # up within 1.15x of the bare boot
RESTORE_TARGET = 5.0    # seconds from `up` of a templated shape to SSH-ready
RESTORE_SPEEDUP = 10.0  # restore at least this many times faster than a cold up
NOOP_TARGET = 1.0       # seconds for an unchanged recipe
BARE_TIMEOUT = 600.0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def listener(ev) -> None:
    if ev.kind != "progress":
        log(str(ev))


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# -- pieces ----------------------------------------------------------------
def cold_build(lab: Lab, image: str) -> float:
    """Build the image from nothing into a temporary cache dir, then drop it."""
    tmp = Path(tempfile.mkdtemp(prefix="uffdlab-bench-cold-"))
    try:
        cold = lab.model_copy(update={"cache_dir": tmp})
        t = time.monotonic()
        ImageStore(cold, listener).build(image)
        return time.monotonic() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def warm_builds(lab: Lab, image: str, n: int = 5) -> list[float]:
    store = ImageStore(lab)
    out = []
    for _ in range(n):
        t = time.monotonic()
        store.build(image)
        out.append(time.monotonic() - t)
    return out


def warm_cli(lab_path: Path, image: str, n: int = 3) -> list[float]:
    out = []
    for _ in range(n):
        t = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "uffdlab", "--lab", str(lab_path),
                            "image", "build", image], cwd=REPO, capture_output=True, text=True)
        out.append(time.monotonic() - t)
        if r.returncode != 0:
            raise RuntimeError(f"uffdlab image build failed: {r.stderr.strip()}")
    return out


def ssh_banner(port: int, timeout: float = 2.0) -> bool:
    """True once the guest's sshd answers. slirp accepts on the forwarded port
    before the guest listens and then closes, so the banner is the test."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


class BareBoot:
    """A hand-written qemu command on a fresh overlay; killed and deleted on exit."""

    def __init__(self, workdir: Path, accel: str, memory_mb: int, cpus: int,
                 vmlinuz: Path, initrd: Path | None, cmdline: str, base: Path):
        self.workdir = workdir
        self.accel, self.memory_mb, self.cpus = accel, memory_mb, cpus
        self.vmlinuz, self.initrd, self.cmdline, self.base = vmlinuz, initrd, cmdline, base
        self.proc: subprocess.Popen | None = None

    def run(self) -> float:
        self.workdir.mkdir(parents=True, exist_ok=True)
        overlay, serial = self.workdir / "overlay.qcow2", self.workdir / "serial.log"
        port = free_port()
        accel = (["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm"
                 else ["-accel", "tcg,thread=multi", "-cpu", "max"])
        argv = [QEMU, "-machine", "q35", *accel, "-smp", str(self.cpus),
                "-m", f"{self.memory_mb}M", "-nodefaults", "-display", "none",
                "-no-reboot", "-kernel", str(self.vmlinuz)]
        if self.initrd is not None:
            argv += ["-initrd", str(self.initrd)]
        argv += ["-append", self.cmdline,
                 "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
                 "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
                 "-device", "virtio-net-pci,netdev=n0",
                 "-device", "virtio-rng-pci",
                 "-serial", f"file:{serial}"]
        t = time.monotonic()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.base),
                        "-F", "qcow2", str(overlay)], check=True, capture_output=True)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=die_with_parent)
        try:
            while not ssh_banner(port):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"bare qemu exited ({self.proc.returncode}): "
                                       f"{self.proc.stderr.read().decode().strip()[-500:]}")
                if time.monotonic() - t > BARE_TIMEOUT:
                    raise RuntimeError(f"bare qemu: no SSH banner after {BARE_TIMEOUT:.0f} s")
                time.sleep(0.2)
            return time.monotonic() - t
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def timed_up(vm: VM) -> float:
    t = time.monotonic()
    try:
        vm.up()
        return time.monotonic() - t
    finally:
        vm.down()


# -- table -------------------------------------------------------------------
def fmt_s(values: list[float] | None) -> str:
    if not values:
        return "skipped"
    v = statistics.median(values)
    return f"{v * 1000:.1f} ms" if v < 0.1 else f"{v:.2f} s" if v < 10 else f"{v:.1f} s"


def runs(values: list[float] | None) -> str:
    return ", ".join(f"{v:.3f}" if v < 0.1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"
                     for v in values or [])


def print_table(rows: list[list[str]]) -> None:
    headers = ["figure", "median", "runs (s)", "target", "verdict"]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- main --------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", default=str(REPO / "lab.yml"), help="lab file (default: lab.yml)")
    ap.add_argument("--image", help="image to build and boot (default: the first VM's)")
    ap.add_argument("--repeat", type=int, default=2, help="boots of each kind (default 2)")
    ap.add_argument("--skip-cold", action="store_true", help="skip the ~80 s cold build")
    ap.add_argument("--skip-templates", action="store_true",
                    help="skip provisioning, saving a template and restoring from it")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat: expected a whole number of at least 1")

    signal.signal(signal.SIGTERM, _sigterm)
    try:
        lab = load_lab(args.lab)
        image = args.image or next(iter(lab.vms.values())).image
        lab.image_spec(image)
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2

    # The VM to boot: the lab's first VM on this image (or the first VM's
    # settings on it), under a private name in a private cache dir.
    spec = next((v for v in lab.vms.values() if v.image == image),
                next(iter(lab.vms.values())))
    spec = VMSpec(**{**spec.model_dump(), "image": image})
    load_before = loadavg()
    cold: list[float] | None = None
    private = Path(tempfile.mkdtemp(prefix="uffdlab-bench-"))
    try:
        if not args.skip_cold:
            log(f"cold build of {image} into a temporary cache (about 80 s)")
            cold = [cold_build(lab, image)]

        store = ImageStore(lab, listener)
        if not store.image(image).built:
            log(f"{image} is not in the cache yet: building it (not timed)")
        img = store.build(image)
        warm = warm_builds(lab, image)
        warm_cmd = warm_cli(Path(args.lab).resolve(), image)

        # private cache: the lab's images and keys, our own vms/ and templates/
        for sub in ("images", "keys"):
            (private / sub).symlink_to(lab.cache_path / sub)
        if (lab.cache_path / "accel.json").exists():
            shutil.copy(lab.cache_path / "accel.json", private / "accel.json")
        vm_name = f"bench{os.getpid()}"[:32]
        bench_lab = lab.model_copy(update={"cache_dir": private, "vms": {vm_name: spec}})
        vm = VM(bench_lab, vm_name, listener)
        choice = vm.choose_accel()
        log(f"accel {choice.accel}: {choice.reason}")
        img = vm.image()
        release = img.kernel_release
        cmdline = " ".join((GUEST_CMDLINE, vm.kernel_cmdline(img)))
        bare_boot = BareBoot(private / "bare", choice.accel, spec.memory >> 20, spec.cpus,
                             img.vmlinuz, img.initrd, cmdline, img.base)

        bare, up = [], []
        for i in range(args.repeat):
            # alternate which goes first, so a load trend hits both alike
            order = ("bare", "up") if i % 2 == 0 else ("up", "bare")
            for kind in order:
                log(f"boot {i + 1}/{args.repeat}: {kind} (load {loadavg()})")
                if kind == "bare":
                    bare.append(bare_boot.run())
                else:
                    up.append(timed_up(vm))
                log(f"  {kind}: {(bare if kind == 'bare' else up)[-1]:.1f} s")
        if not args.skip_templates:
            log("cold boot + provisioning, which saves the template (about 2 min)")
            provisioned, restored, tmpl = templated_ups(vm, args.repeat)
            tmpl_bytes = sum(p.stat().st_size for p in (tmpl.state, tmpl.disk))
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        try:
            if "bare_boot" in locals():
                bare_boot.stop()
            if "vm" in locals():
                vm.down()
        finally:
            shutil.rmtree(private, ignore_errors=True)   # symlinks are unlinked, not followed

    ratio = statistics.median(up) / statistics.median(bare)
    noop = statistics.median(warm)
    noop_cmd = statistics.median(warm_cmd)
    print(f"bring-up: image {image} ({release}), accel {choice.accel}, "
          f"{spec.cpus} cpus, {spec.memory >> 20} MiB, repeat {args.repeat}, "
          f"host cpus {os.cpu_count()}")
    print(f"load average (1/5/15 min): before {load_before}; after {loadavg()}")
    print()
    print_table([
        ["cold image build (mmdebstrap, temp cache)", fmt_s(cold), runs(cold), "", ""],
        ["warm (no-op) build: ImageStore.build()", fmt_s(warm), runs(warm),
         f"< {NOOP_TARGET:.0f} s", "ok" if noop < NOOP_TARGET else "MISSED"],
        ["warm (no-op) build: `uffdlab image build`", fmt_s(warm_cmd), runs(warm_cmd),
         f"< {NOOP_TARGET:.0f} s", "ok" if noop_cmd < NOOP_TARGET else "MISSED"],
        ["bare qemu to SSH banner", fmt_s(bare), runs(bare), "", ""],
        ["VM.up() to SSH-ready", fmt_s(up), runs(up), "", ""],
        ["ratio up / bare", f"{ratio:.2f}x", "", f"<= {UP_TARGET}x",
         "ok" if ratio <= UP_TARGET else "MISSED"],
        *([] if args.skip_templates else template_rows(
            provisioned, restored, up, tmpl_bytes, spec.memory)),
    ])
    return 0


def templated_ups(vm: VM, repeat: int) -> tuple[list[float], list[float], Template]:
    """A cold boot plus provisioning (which saves the shape's template),
    then `repeat` ups that restore from it."""
    from uffdlab.provision import ensure_provisioned
    t = time.monotonic()
    try:
        vm.up()
        ensure_provisioned(vm)                        # saves the template
        provisioned = [time.monotonic() - t]
        tmpl, _ = vm.template_for(vm.state().accel)
    finally:
        vm.down()
    restored = []
    for i in range(repeat):
        log(f"restore {i + 1}/{repeat} (load {loadavg()})")
        restored.append(timed_up(vm))
        log(f"  restore: {restored[-1]:.1f} s")
    return provisioned, restored, tmpl


def template_rows(provisioned: list[float], restored: list[float], up: list[float],
                  tmpl_bytes: int, memory: int) -> list[list[str]]:
    rst = statistics.median(restored)
    speedup = statistics.median(up) / rst
    return [
        ["cold up + provisioning (saves the template)", fmt_s(provisioned),
         runs(provisioned), "", ""],
        ["VM.up() restoring the template, to SSH-ready", fmt_s(restored), runs(restored),
         f"<= {RESTORE_TARGET:.0f} s", "ok" if rst <= RESTORE_TARGET else "MISSED"],
        ["ratio cold up / restore", f"{speedup:.1f}x", "", f">= {RESTORE_SPEEDUP:.0f}x",
         "ok" if speedup >= RESTORE_SPEEDUP else "MISSED"],
        ["ratio (cold up + provisioning) / restore",
         f"{statistics.median(provisioned) / rst:.1f}x", "", "", ""],
        ["template size / guest RAM", f"{tmpl_bytes / memory:.2f}x",
         f"{tmpl_bytes >> 20} MiB / {memory >> 20} MiB", "", ""],
    ]


if __name__ == "__main__":
    sys.exit(main())
