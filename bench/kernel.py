#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Kernel benchmark: a tree kernel's build, no-op build and edit-to-SSH loop.

    .venv/bin/python bench/kernel.py [--lab lab.yml] [--tree PATH] [--base small]
                                     [--skip-cold]

Prints one table, each row a ratio against a baseline measured in the same run:

- cold build: `uffdlab kernel build` into an empty build directory, against
  the same compile run by hand (`make O=... bzImage` on the config the lab
  merged). --skip-cold leaves this row out and skips the compile by hand
  (about 4 minutes with the small base on 2 cores), but not the cold build:
  the cache is a new private one each run and the rows below need a build,
  so it is made all the same, untimed;
- no-op build of the unchanged tree (target: under 2 s), against make's own
  no-op (`make O=... bzImage` with nothing to do);
- one changed file in mm/ (a comment appended to mm/userfaultfd.c, restored
  afterwards) to SSH-ready: the incremental build plus a cold boot of the new
  kernel, against a cold boot of the packaged Debian kernel (`--compare`).

Without --tree it uses Debian's linux-source-6.12 unpacked in the cache
(`uffdlab kernel source`). The build directories, VMs and overlays live in a
private temporary cache dir (the lab's images and keys linked in) removed on
the way out; the tree is restored even on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from uffdlab.api import with_tree_kernel  # noqa: E402
from uffdlab.config import load_lab  # noqa: E402
from uffdlab.images import ImageStore  # noqa: E402
from uffdlab.kernel import KernelStore, debian_source  # noqa: E402
from uffdlab.vm import VM  # noqa: E402

NOOP_TARGET = 2.0         # seconds for an unchanged tree
EDITED = "mm/userfaultfd.c"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def listener(ev) -> None:
    if ev.kind not in ("heartbeat", "progress"):
        log(str(ev))


def timed(fn):
    t = time.monotonic()
    out = fn()
    return time.monotonic() - t, out


def make(tree: Path, bdir: Path, *targets: str) -> float:
    """The compile by hand: what the lab runs, without the lab."""
    t = time.monotonic()
    subprocess.run(["make", "-C", str(tree), f"O={bdir}", "ARCH=x86_64",
                    f"-j{os.cpu_count() or 1}", *targets],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def cold_up(lab, image: str, name: str) -> float:
    """`up` of a VM of `image` to SSH-ready, with templates off: a cold boot."""
    spec = next(iter(lab.vms.values())).model_copy(update={"image": image})
    vm = VM(lab.model_copy(update={"vms": {name: spec}, "templates": False}), name, listener)
    try:
        return timed(vm.up)[0]
    finally:
        vm.down()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", default=str(REPO / "lab.yml"))
    ap.add_argument("--tree", help="a kernel tree (default: Debian's linux-source-6.12)")
    ap.add_argument("--base", default="small", choices=["small", "defconfig"])
    ap.add_argument("--compare", default="trixie", help="image with a packaged kernel")
    ap.add_argument("--skip-cold", action="store_true",
                    help="no cold-build row and no compile by hand; the kernel is still "
                    "built once, untimed (the private cache starts empty)")
    args = ap.parse_args()
    lab = load_lab(args.lab)
    tree = Path(args.tree) if args.tree else debian_source(lab, "6.12", listener)
    private = Path(tempfile.mkdtemp(prefix="uffdlab-bench-kernel-"))
    edited = tree / EDITED
    original = edited.read_bytes()
    rows = []
    try:
        for sub in ("images", "keys"):
            (private / sub).symlink_to(lab.cache_path / sub)
        for f in ("accel.json",):
            if (lab.cache_path / f).exists():
                shutil.copy(lab.cache_path / f, private / f)
        blab = with_tree_kernel(lab.model_copy(update={"cache_dir": private}), tree,
                                base=args.base)
        ImageStore(blab).build(args.compare)           # the rootfs, not timed
        store = KernelStore(blab, listener)
        bdir = store.build_dir("mine")
        if not args.skip_cold:
            log("cold build through the lab (about 5 minutes with the small base)")
            t_cold, built = timed(lambda: store.build("mine"))
            log("the same compile by hand, into a copy of the merged config")
            hand = private / "by-hand"
            hand.mkdir()
            shutil.copy(built.config, hand / ".config")
            make(tree, hand, "olddefconfig")
            t_hand = make(tree, hand, "bzImage")
            rows.append(("cold build", t_cold, "make bzImage by hand", t_hand, None))
        else:
            log("cold build, untimed (--skip-cold skips only the compile by hand)")
            store.build("mine")
        t_noop, _ = timed(lambda: KernelStore(blab).build("mine"))
        t_make_noop = make(tree, bdir, "bzImage")
        rows.append(("no-op build", t_noop, "make's own no-op", t_make_noop, NOOP_TARGET))

        t_debian = cold_up(blab, args.compare, "bench-debian")
        edited.write_bytes(original + b"\n/* uffd-lab bench: one changed file */\n")
        from uffdlab import kernel as kernel_mod
        kernel_mod._states.clear()                      # the tree changed just now
        t_inc, _ = timed(lambda: KernelStore(blab, listener).build("mine"))
        t_boot = cold_up(blab, "mine", "bench-mine")
        rows.append((f"{EDITED} changed to SSH-ready", t_inc + t_boot,
                     f"cold boot of {args.compare}", t_debian, None))
        rows.append(("  of which the rebuild", t_inc, "", None, None))
        rows.append(("  of which the boot", t_boot, f"cold boot of {args.compare}", t_debian,
                     None))
    finally:
        edited.write_bytes(original)
        shutil.rmtree(private, ignore_errors=True)

    print(f"\nkernel tree {tree} (base {args.base}), load {os.getloadavg()[0]:.2f}\n")
    print(f"{'measure':<36} {'time':>8}   {'baseline':<26} {'time':>8} {'ratio':>7}")
    for name, t, base, tb, target in rows:
        ratio = f"{t / tb:6.2f}x" if tb else ""
        line = f"{name:<36} {t:7.1f}s   {base:<26} " + (f"{tb:7.1f}s" if tb else " " * 8)
        line += f" {ratio:>7}"
        if target is not None:
            line += f"   target < {target:.0f} s: {'met' if t < target else 'MISSED'}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
