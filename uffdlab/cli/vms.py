# SPDX-License-Identifier: MIT
"""Commands for images and VMs: image build|list, up, ssh, status, down, doctor."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from ..config import ConfigError
from .common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, Renderer, lab_of, table


# -- image ----------------------------------------------------------------
def cmd_image_build(args) -> int:
    from ..images import ImageStore
    from ..lock import Lock, drift, read_lock
    lab = lab_of(args)
    store = ImageStore(lab, Renderer())
    names = args.names or list(lab.images)
    for name in names:
        lab.image_spec(name)                      # every name checked before any build
    for name in names:
        t = time.monotonic()
        img = store.build(name, force=args.force, locked=args.locked)
        print(f"{name}: {img.dir} (kernel {img.kernel_release}, content "
              f"{img.content_hash}, {time.monotonic() - t:.1f} s)")
        entry = (read_lock(lab.source) or Lock()).images.get(name)
        for d in drift(entry.packages, img.packages) if entry else []:
            print(f"  drifted from the lock: {d}")
    return EXIT_OK


def cmd_image_export(args) -> int:
    from ..archive import export_image
    from ..images import ImageStore
    lab = lab_of(args)
    lab.image_spec(args.name)
    dest = export_image(ImageStore(lab), args.name, Path(args.file), Renderer())
    print(f"{args.name}: exported to {dest} ({dest.stat().st_size >> 20} MiB)")
    return EXIT_OK


def cmd_image_import(args) -> int:
    from ..archive import import_image, lock_mismatches
    from ..images import ImageStore
    lab = lab_of(args)
    desc, dest = import_image(lab, Path(args.file), force=args.force, listener=Renderer(),
                              locked=args.locked)
    store = ImageStore(lab)
    users = [n for n in lab.images if store.image(n).key == desc["key"]]
    print(f"imported {desc['name']} ({desc['suite']}, kernel {desc['kernel_release']}, "
          f"content {desc['content_hash']}) into {dest}")
    if users:
        print(f"{lab.source.name} images that boot it now: {', '.join(users)}")
    else:
        print(f"no image of {lab.source.name} has its recipe yet; add the exporter's entry "
              f"(suite {desc['suite']}) under 'images', named as you like")
    for problem in lock_mismatches(lab, desc):       # only without --locked: it refuses
        print(f"warning: {problem}; runs on it are not the locked image's ('--locked' "
              f"refuses such an archive)")
    return EXIT_OK


def cmd_lock(args) -> int:
    from ..images import ImageStore, locked_image
    from ..lock import Lock, lock_path, python_environment, read_lock
    from ..tools import tools_digest
    lab = lab_of(args)
    if args.check:
        return _check_lock(lab)
    store = ImageStore(lab, Renderer())
    old = read_lock(lab.source)
    # the images were built with the old lock's epoch: keep recording it
    lock = Lock(guest_tools=tools_digest(), python=python_environment(),
                source_date_epoch=(old or Lock()).build_epoch)
    for name in lab.images:
        lock.images[name] = locked_image(store.build(name))
    path = lock.save(lock_path(lab.source))
    print(f"{path}: {len(lock.images)} images, "
          f"{sum(len(i.packages) for i in lock.images.values())} package versions, "
          f"{len(lock.python)} Python distributions; lock {lock.digest}")
    return EXIT_OK


def _check_lock(lab) -> int:
    """lock --check: lab.lock against the built images, the guest tools and
    this Python; builds nothing and writes nothing."""
    from ..images import ImageStore, locked_image
    from ..lock import check, lock_path, python_environment, read_lock
    from ..tools import tools_digest
    lock = read_lock(lab.source)
    path = lock_path(lab.source)
    if lock is None:
        print(f"uffdlab: lock --check: expected a lock at {path}, found none ('uffdlab lock' "
              f"writes one)", file=sys.stderr)
        return EXIT_CONFIG
    store = ImageStore(lab)
    images = {name: store.image(name) for name in lab.images}
    differences = check(lock, {n: img.key for n, img in images.items()},
                        {n: locked_image(img) for n, img in images.items() if img.built},
                        tools_digest(), python_environment())
    if not differences:
        print(f"{path}: nothing drifted ({len(lock.images)} images, guest tools "
              f"{lock.guest_tools}, {len(lock.python)} Python distributions; lock "
              f"{lock.digest})")
        return EXIT_OK
    print(f"{path}: {len(differences)} differences from what is here now:")
    for d in differences:
        print(f"  {d}")
    return EXIT_FAIL


def cmd_image_list(args) -> int:
    from ..images import ImageStore
    rows = ImageStore(lab_of(args)).list()
    table(["name", "suite", "kernel", "size", "hash", "built"],
          [[r["name"], r["suite"], r["kernel"], r["size"], r["key"],
            "yes" if r["built"] else "no"] for r in rows])
    return EXIT_OK


# -- kernel ----------------------------------------------------------------
def cmd_kernel_build(args) -> int:
    from ..kernel import KernelStore
    lab = lab_of(args)
    store = KernelStore(lab, Renderer())
    names = args.names or [n for n, s in lab.images.items() if s.kernel.is_tree]
    if not names:
        raise ConfigError([f"{lab.source}: images: no image has a kernel 'tree' to build "
                           f"(images.NAME.kernel.tree: PATH)"])
    for name in names:
        store.tree(name)                          # every name checked before any build
    for name in names:
        t = time.monotonic()
        built = store.build(name, force=args.force)
        print(f"{name}: {built.bzimage} (kernel {built.meta['release']}, "
              f"{time.monotonic() - t:.1f} s)")
    return EXIT_OK


def cmd_kernel_list(args) -> int:
    from ..kernel import KernelStore
    lab = lab_of(args)
    store = KernelStore(lab)
    rows = []
    for name, spec in lab.images.items():
        if spec.kernel.is_tree:
            built = store.current(name)
            done = built.bzimage.is_file()
            rows.append([name, str(store.tree(name)), spec.kernel.base,
                         built.meta["release"] if done else "", built.dir.name,
                         "yes" if done else "no"])
    table(["image", "tree", "base", "release", "key", "built"], rows)
    return EXIT_OK


def cmd_kernel_source(args) -> int:
    from ..kernel import debian_source
    print(debian_source(lab_of(args), args.series, Renderer()))
    return EXIT_OK


# -- VMs ------------------------------------------------------------------
def cmd_up(args) -> int:
    from ..vm import VM
    vm = VM(lab_of(args), args.vm, Renderer())
    if args.dry_run:
        print(vm.dry_run())
        return EXIT_OK
    st = vm.up(reuse=args.reuse)
    print(f"{vm.name}: up, kernel {st.kernel_release}, {st.accel}, "
          f"ssh port {st.ssh_port} ('uffdlab ssh {vm.name}')")
    return EXIT_OK


def cmd_ssh(args) -> int:
    from ..vm import VM, VMError
    vm = VM(lab_of(args), args.vm)
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
    from ..vm import all_vms, other_running, reap_dir, stale_dirs
    lab = lab_of(args)
    for d in stale_dirs(lab):
        reap_dir(d)
    def row(name: str, st) -> list[str]:
        return [name, st.image, "up" if st.ssh_ready else "booting", st.kernel_release,
                st.accel, str(st.ssh_port), f"{time.time() - st.started:.0f} s",
                f"template {st.template}" if st.template else "cold boot"]

    rows = []
    for vm in all_vms(lab):
        st = vm.state()
        rows.append(row(vm.name, st) if st else [vm.name, vm.spec.image, "stopped"] + [""] * 5)
    rows += [row(d.name, st) for d, st in other_running(lab)]
    table(["vm", "image", "state", "kernel", "accel", "ssh port", "uptime", "from"], rows)
    return EXIT_OK


# -- templates ------------------------------------------------------------
def cmd_template_list(args) -> int:
    from ..template import all_templates
    lab = lab_of(args)
    rows = []
    for t in all_templates(lab.cache_path / "templates"):
        try:
            meta = t.meta
        except (OSError, ValueError):
            rows.append([t.key, "(unreadable)"] + [""] * 5)
            continue
        machine = meta["inputs"]["machine"]
        probe = meta["facts"].get("probe", {})
        size = sum(p.stat().st_size for p in (t.state, t.disk) if p.exists())
        rows.append([t.key, probe.get("kernel", "?"), _arg(machine, "-m"), _arg(machine, "-smp"),
                     _arg(machine, "-accel").split(",")[0], f"{size >> 20} MiB",
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(meta["saved_at"]))])
    table(["template", "kernel", "memory", "cpus", "accel", "size", "saved"], rows)
    return EXIT_OK


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv else "?"


def cmd_template_build(args) -> int:
    """Boot (or reuse), provision and save a VM's template; a VM this
    command booted is stopped again."""
    from ..provision import ensure_provisioned
    from ..vm import VM
    vm = VM(lab_of(args), args.vm, Renderer())
    started = vm.state() is None
    try:
        vm.up(reuse=True)
        ensure_provisioned(vm)
        tmpl = vm.save_template()
    finally:
        if started:
            vm.down()
    if tmpl is None:                  # off, or not saved (the event above said why)
        print(f"{vm.name}: no template saved"
              + ("" if vm.lab.templates else
                 f": templates are off in {vm.lab.source.name} (templates: false)"))
        return EXIT_FAIL
    print(f"{vm.name}: template {tmpl.key} in {tmpl.dir}")
    return EXIT_OK


def cmd_template_rm(args) -> int:
    from ..template import all_templates
    lab = lab_of(args)
    found = {t.key: t for t in all_templates(lab.cache_path / "templates")}
    keys = list(found) if args.all else args.keys
    if not keys:
        raise argparse.ArgumentTypeError("template rm: expected KEY... or --all")
    unknown = [k for k in keys if k not in found]
    if unknown:
        raise argparse.ArgumentTypeError(f"template rm: no template {unknown[0]!r} (see "
                                         f"'uffdlab template list')")
    for k in keys:
        found[k].remove()
        print(f"{k}: removed")
    return EXIT_OK


def cmd_down(args) -> int:
    from ..vm import VM, all_vms, other_running, reap_dir, stale_dirs, stop_dir
    lab = lab_of(args)
    if args.all:
        for d in stale_dirs(lab):
            reap_dir(d)
            print(f"{d.name}: cleaned up (its processes were gone)")
        for d, _ in other_running(lab):          # only this lab file's VMs
            stop_dir(d)
            print(f"{d.name}: stopped")
        vms = all_vms(lab, Renderer())
    elif args.vm in lab.vms:
        vms = [VM(lab, args.vm, Renderer())]
    else:                         # a notebook's or sweep's VM (nb-*), as status lists it
        running = {d.name: d for d, _ in other_running(lab)}
        if args.vm not in running:
            raise argparse.ArgumentTypeError(
                f"down: no VM {args.vm!r} in {lab.source.name} or running from it; "
                f"expected one of {', '.join(sorted({*lab.vms, *running})) or 'none'}")
        stop_dir(running[args.vm])
        print(f"{args.vm}: stopped")
        return EXIT_OK
    for vm in vms:
        print(f"{vm.name}: {'stopped' if vm.down() else 'was not running'}")
    return EXIT_OK


def cmd_doctor(args) -> int:
    from ..doctor import run_checks
    lab = None
    try:
        lab = lab_of(args)
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
    ok = True
    for check in run_checks(lab, kvm=args.kvm):
        mark = "ok  " if check.ok else ("warn" if not check.required else "FAIL")
        print(f"[{mark}] {check.name}: {check.detail}")
        if not check.ok and check.fix:
            print(f"       fix: {check.fix}")
        ok &= check.ok or not check.required
    return EXIT_OK if ok and lab is not None else EXIT_FAIL


def register(sub) -> None:
    img = sub.add_parser("image", help="build and list guest images")
    isub = img.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="build images (all when no name is given)")
    b.add_argument("names", nargs="*", metavar="NAME")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--locked", action="store_true",
                   help="a package version that differs from lab.lock is an error")
    b.set_defaults(func=cmd_image_build)
    ex = isub.add_parser("export", help="write a built image as one verifiable archive")
    ex.add_argument("name", metavar="NAME")
    ex.add_argument("file", metavar="FILE")
    ex.set_defaults(func=cmd_image_export)
    im = isub.add_parser("import", help="verify an exported image and install it")
    im.add_argument("file", metavar="FILE")
    im.add_argument("--force", action="store_true",
                    help="replace another build of the same recipe in the cache")
    im.add_argument("--locked", action="store_true",
                    help="refuse an image whose content is not the one lab.lock locks for "
                    "its recipe (without: a warning)")
    im.set_defaults(func=cmd_image_import)
    lk = sub.add_parser("lock", help="write lab.lock: package versions, tools, Python")
    lk.add_argument("--check", action="store_true",
                    help="write nothing: compare lab.lock with the built images, the guest "
                    "tools and this Python; exit 1 and name what drifted")
    lk.set_defaults(func=cmd_lock)
    isub.add_parser("list", help="images with suite, kernel, size, hash").set_defaults(
        func=cmd_image_list)

    ker = sub.add_parser("kernel", help="build kernels from source trees (kernel.tree)")
    ksub = ker.add_subparsers(dest="kernel_command", required=True, metavar="ACTION")
    kb = ksub.add_parser("build", help="build tree kernels (all when no image is given)")
    kb.add_argument("names", nargs="*", metavar="IMAGE")
    kb.add_argument("--force", action="store_true", help="rebuild even if cached")
    kb.set_defaults(func=cmd_kernel_build)
    ksub.add_parser("list", help="tree kernels with base, release, key").set_defaults(
        func=cmd_kernel_list)
    ks = ksub.add_parser("source", help="unpack Debian's linux-source package as a tree")
    ks.add_argument("series", nargs="?", default="6.12", help="kernel series (default 6.12)")
    ks.set_defaults(func=cmd_kernel_source)

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

    tpl = sub.add_parser("template", help="saved VMs that later VMs restore from")
    tsub = tpl.add_subparsers(dest="template_command", required=True, metavar="ACTION")
    tsub.add_parser("list", help="templates with kernel, shape, size").set_defaults(
        func=cmd_template_list)
    tb = tsub.add_parser("build", help="boot, provision and save a VM's template")
    tb.add_argument("vm", nargs="?")
    tb.set_defaults(func=cmd_template_build)
    tr = tsub.add_parser("rm", help="delete templates")
    tr.add_argument("keys", nargs="*", metavar="KEY")
    tr.add_argument("--all", action="store_true", help="every template in the cache")
    tr.set_defaults(func=cmd_template_rm)

    down = sub.add_parser("down", help="stop a VM and delete its overlay")
    down.add_argument("vm", nargs="?")
    down.add_argument("--all", action="store_true", help="every VM, stale ones included")
    down.set_defaults(func=cmd_down)

    doc = sub.add_parser("doctor", help="check that this machine can run a lab")
    doc.add_argument("--kvm", action="store_true",
                     help="boot a built image's kernel under KVM to see whether guests run "
                     "(a few seconds); without it the cached verdict is shown")
    doc.set_defaults(func=cmd_doctor)
