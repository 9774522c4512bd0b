# SPDX-License-Identifier: MIT
"""QEMU command lines, image recipes and cache keys, accel choice, dry-run.

Nothing here boots a VM or runs mmdebstrap; ssh-keygen (the lab key) is the
only program run, into a tmp_path cache.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from uffdlab import accel, cli, images
from uffdlab.accel import AccelChoice
from uffdlab.config import ImageSpec, KernelSpec, load_lab
from uffdlab.images import ImageStore, bzimage_release, mmdebstrap_argv, recipe, recipe_key
from uffdlab.qemu import QemuCommand
from uffdlab.vm import VM

from .labs import guest_lab

PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForUnitTestsOnly uffdlab"

LAB = """\
accel: {accel}
cache_dir: cache
images:
  trixie:
    suite: trixie
  mine:
    suite: trixie
    kernel: {{vmlinuz: kernels/bzImage, initrd: null, cmdline: "nokaslr"}}
vms:
  guest:
    image: trixie
    memory: 1G
    cpus: 3
    cmdline: "loglevel=7"
  dev:
    image: mine
"""


@pytest.fixture
def lab_file(tmp_path):
    def make(accel_name: str = "tcg") -> Path:
        (tmp_path / "kernels").mkdir(exist_ok=True)
        fake_bzimage(tmp_path / "kernels" / "bzImage", "6.13.0-rc1-uffd+")
        path = tmp_path / "lab.yml"
        path.write_text(LAB.format(accel=accel_name))
        return path
    return make


def fake_bzimage(path: Path, release: str) -> Path:
    """A file with just enough of the x86 boot protocol header for bzimage_release."""
    data = bytearray(0x5000)
    data[0x202:0x206] = b"HdrS"
    version_offset = 0x3000                      # kernel_version is relative to 0x200
    struct.pack_into("<H", data, 0x20E, version_offset)
    text = f"{release} (dev@host) #1 SMP PREEMPT_DYNAMIC".encode() + b"\0"
    data[version_offset + 0x200:version_offset + 0x200 + len(text)] = text
    path.write_bytes(bytes(data))
    return path


def cmd(**over) -> QemuCommand:
    base = dict(name="guest", accel="tcg", memory_mb=2048, cpus=2,
                vmlinuz=Path("/c/img/vmlinuz"), initrd=Path("/c/img/initrd.img"),
                disk=Path("/c/vms/guest/overlay.qcow2"), ssh_port=40022,
                serial_log=Path("/c/vms/guest/serial.log"),
                qmp_socket=Path("/c/vms/guest/qmp.sock"))
    base.update(over)
    return QemuCommand(**base)


def after(argv: list[str], flag: str) -> list[str]:
    """Every value that follows `flag` in argv."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


# -- QemuCommand ----------------------------------------------------------
def test_tcg_accel_args():
    argv = cmd(accel="tcg").argv()
    assert after(argv, "-accel") == ["tcg,thread=multi"]
    assert after(argv, "-cpu") == ["max"]
    assert "kvm" not in " ".join(argv)


def test_kvm_accel_args():
    argv = cmd(accel="kvm").argv()
    assert after(argv, "-accel") == ["kvm"]
    assert after(argv, "-cpu") == ["host"]


def test_memory_cpus_kernel_disk():
    argv = cmd(memory_mb=1536, cpus=4).argv()
    assert argv[0] == "qemu-system-x86_64"
    assert after(argv, "-m") == ["1536M"]
    assert after(argv, "-smp") == ["4"]
    assert after(argv, "-kernel") == ["/c/img/vmlinuz"]
    assert after(argv, "-initrd") == ["/c/img/initrd.img"]
    (drive,) = after(argv, "-drive")
    assert drive.startswith("file=/c/vms/guest/overlay.qcow2,")
    assert "if=virtio" in drive and "format=qcow2" in drive


def test_hostfwd_bound_to_localhost_with_the_port():
    argv = cmd(ssh_port=45678).argv()
    (netdev,) = after(argv, "-netdev")
    assert "hostfwd=tcp:127.0.0.1:45678-:22" in netdev
    assert netdev.startswith("user,")
    assert "hostfwd=tcp::" not in netdev        # never every interface


def test_serial_to_file_and_qmp_socket():
    argv = cmd().argv()
    assert after(argv, "-serial") == ["file:/c/vms/guest/serial.log"]
    (qmp,) = after(argv, "-qmp")
    assert qmp.startswith("unix:/c/vms/guest/qmp.sock,")
    assert "server=on" in qmp and "wait=off" in qmp
    assert "-qmp" not in cmd(qmp_socket=None).argv()


def test_a_restore_appends_to_the_serial_log_it_was_seeded_with():
    argv = cmd(incoming=Path("/c/templates/k/state")).argv()
    assert after(argv, "-serial") == ["chardev:serial0"]
    assert after(argv, "-chardev") == ["file,id=serial0,append=on,path=/c/vms/guest/serial.log"]
    assert after(argv, "-incoming") == ["exec:cat /c/templates/k/state"]
    evil = cmd(incoming=Path("/c/s"), serial_log=Path("/c/x,path=/etc/passwd")).argv()
    assert after(evil, "-chardev") == ["file,id=serial0,append=on,path=/c/x,,path=/etc/passwd"]


def test_commas_in_paths_cannot_add_qemu_options():
    """QEMU reads -drive and -qmp as key=value lists where ',,' is a literal
    comma; -serial file: takes the rest verbatim (checked against QEMU 7.2)."""
    evil = Path("/c/x,file=/etc/passwd")
    argv = cmd(disk=evil / "overlay.qcow2", serial_log=evil / "serial.log",
               qmp_socket=evil / "qmp.sock").argv()
    (drive,) = after(argv, "-drive")
    assert drive.startswith("file=/c/x,,file=/etc/passwd/overlay.qcow2,if=virtio,")
    keys = [kv.split("=", 1)[0] for kv in drive.replace(",,", "\0").split(",")]
    assert keys.count("file") == 1
    (qmp,) = after(argv, "-qmp")
    assert qmp == "unix:/c/x,,file=/etc/passwd/qmp.sock,server=on,wait=off"
    assert after(argv, "-serial") == ["file:/c/x,file=/etc/passwd/serial.log"]


def test_cache_dir_with_a_comma_gives_one_drive_file(lab_file):
    path = lab_file("tcg")
    path.write_text(path.read_text().replace("cache_dir: cache",
                                             "cache_dir: 'x,file=/etc/passwd'"))
    argv = VM(load_lab(path), "guest").command("tcg", ssh_port=40000).argv()
    (drive,) = after(argv, "-drive")
    keys = [kv.split("=", 1)[0] for kv in drive.replace(",,", "\0").split(",")]
    assert keys.count("file") == 1
    assert drive.startswith(f"file={path.parent}/x,,file=/etc/passwd/")


def test_initrd_omitted_when_none():
    argv = cmd(initrd=None).argv()
    assert "-initrd" not in argv
    assert after(argv, "-kernel") == ["/c/img/vmlinuz"]


def test_extra_cmdline_appended():
    (plain,) = after(cmd().argv(), "-append")
    (extra,) = after(cmd(cmdline="nokaslr loglevel=7").argv(), "-append")
    assert "root=/dev/vda" in plain and "console=ttyS0" in plain
    assert extra == plain + " nokaslr loglevel=7"
    assert not plain.endswith(" ")


def test_extra_args_go_last_and_shell_quotes():
    c = cmd(extra=("-device", "virtio-balloon"), cmdline="a b")
    assert c.argv()[-2:] == ["-device", "virtio-balloon"]
    assert "'root=/dev/vda rw console=ttyS0" in c.shell()


# -- recipes and keys -----------------------------------------------------
def spec(**over) -> ImageSpec:
    return ImageSpec(**{"suite": "trixie", **over})


def key(s: ImageSpec) -> str:
    return recipe_key(recipe(s))


def test_recipe_key_stable():
    assert key(spec()) == key(spec())
    assert key(spec(packages=["strace", "gdb"])) == key(spec(packages=["gdb", "strace"]))
    assert len(key(spec())) == 16


@pytest.mark.parametrize("other", [
    spec(suite="bookworm"),
    spec(packages=["strace"]),
    spec(disk_size="8G"),
    spec(kernel=KernelSpec(package="linux-image-amd64")),
])
def test_recipe_key_changes_with_the_rootfs(other):
    assert key(other) != key(spec())


def test_recipe_key_does_not_depend_on_the_lab_key(tmp_path):
    """The lab's key reaches the guest on the kernel command line: one image
    serves every lab, so an exported image boots in a colleague's lab."""
    def store(name: str) -> ImageStore:
        path = tmp_path / name / "lab.yml"
        path.parent.mkdir()
        path.write_text(guest_lab(tmp_path / name / "cache"))
        return ImageStore(load_lab(path))
    a, b = store("a"), store("b")
    assert a.keys.public_key() != b.keys.public_key()
    assert a.image("trixie").key == b.image("trixie").key


def test_recipe_key_changes_with_customize_script(tmp_path, monkeypatch):
    script = tmp_path / "customize.sh"
    script.write_text("#!/bin/sh\necho one\n")
    monkeypatch.setattr(images, "CUSTOMIZE", script)
    first = key(spec())
    assert key(spec()) == first
    script.write_text("#!/bin/sh\necho two\n")
    assert key(spec()) != first


def test_recipe_key_ignores_a_local_kernel_path():
    a = spec(kernel=KernelSpec(vmlinuz=Path("/home/me/linux/arch/x86/boot/bzImage")))
    b = spec(kernel=KernelSpec(vmlinuz=Path("/elsewhere/bzImage"), initrd=Path("/x/initrd"),
                               cmdline="nokaslr"))
    assert key(a) == key(b) == key(spec())     # the same rootfs boots them all


def test_mmdebstrap_argv_names_no_mirror_and_has_the_kernel(tmp_path):
    rec = recipe(spec(packages=["strace"]))
    argv = mmdebstrap_argv(rec)
    assert argv[0] == "mmdebstrap"
    joined = " ".join(argv)
    assert "://" not in joined and "deb.debian.org" not in joined
    (include,) = [a for a in argv if a.startswith("--include=")]
    pkgs = include.split("=", 1)[1].split(",")
    assert "linux-image-cloud-amd64" in pkgs
    for p in ("openssh-server", "python3", "gcc", "make", "libc6-dev", "linux-libc-dev",
              "strace"):
        assert p in pkgs
    # suite, then the target: nothing after them could be a mirror
    assert argv[-2:] == ["trixie", "/dev/null"]
    assert [a for a in argv if not a.startswith("-")] == ["mmdebstrap", "trixie", "/dev/null"]


def test_mmdebstrap_hook_names_no_path(tmp_path):
    """Paths reach the customize hook through the environment: the hook text
    is a constant, whatever the cache directory is called."""
    rec = recipe(spec())
    out = tmp_path / "x;touch PWNED;#" / "with space"
    argv = mmdebstrap_argv(rec, pinned=True)
    (hook,) = [a.split("=", 1)[1] for a in argv if a.startswith("--customize-hook=")]
    (pin_hook,) = [a.split("=", 1)[1] for a in argv if a.startswith("--setup-hook=")]
    assert hook == images.CUSTOMIZE_HOOK and pin_hook == images.PIN_HOOK
    assert "PWNED" not in hook and "space" not in hook and str(tmp_path) not in hook
    env = images.mmdebstrap_env(rec, out, out / "hostkey", out / "pins")
    assert env == {"UFFDLAB_CUSTOMIZE": str(images.CUSTOMIZE), "UFFDLAB_OUT": str(out),
                   "UFFDLAB_HOSTKEY": str(out / "hostkey"), "UFFDLAB_DISK_SIZE": "4096M",
                   "UFFDLAB_PINS": str(out / "pins")}
    assert not [a for a in mmdebstrap_argv(rec) if a.startswith("--setup-hook")]


def test_mmdebstrap_argv_other_kernel_package(tmp_path):
    rec = recipe(spec(suite="bookworm", kernel=KernelSpec(package="linux-image-amd64")))
    argv = mmdebstrap_argv(rec)
    (include,) = [a for a in argv if a.startswith("--include=")]
    assert "linux-image-amd64" in include.split("=", 1)[1].split(",")
    assert "linux-image-cloud-amd64" not in include
    assert argv[-2] == "bookworm"


# -- bzImage --------------------------------------------------------------
def test_bzimage_release(tmp_path):
    p = fake_bzimage(tmp_path / "bzImage", "6.12.0-uffd-wp+")
    assert bzimage_release(p) == "6.12.0-uffd-wp+"


def test_bzimage_release_not_a_bzimage(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(b"\x7fELF" + bytes(0x1000))
    assert bzimage_release(p) is None
    assert bzimage_release(tmp_path / "absent") is None
    short = tmp_path / "short"
    short.write_bytes(b"\0" * 0x100)
    assert bzimage_release(short) is None


# -- the image store (no build) -------------------------------------------
def test_store_local_kernel_shares_the_packaged_rootfs(lab_file):
    path = lab_file()
    store = ImageStore(load_lab(path))
    packaged, local = store.image("trixie"), store.image("mine")
    assert local.key == packaged.key and local.dir == packaged.dir
    assert local.vmlinuz == path.parent / "kernels" / "bzImage"
    assert local.initrd is None
    assert local.kernel_cmdline == "nokaslr"
    assert local.kernel_release == "6.13.0-rc1-uffd+"
    assert packaged.vmlinuz == packaged.dir / "vmlinuz"
    assert packaged.dir.parent == path.parent / "cache" / "images"
    assert not packaged.built


def _no_bzimage(d: Path, text: str) -> str:
    (d / "kernels" / "bzImage").unlink()
    return text


def _passwd(d: Path, text: str) -> str:
    return text.replace("vmlinuz: kernels/bzImage", "vmlinuz: /etc/passwd")


def _initrd_dir(d: Path, text: str) -> str:
    (d / "kernels" / "initrd.d").mkdir()
    return text.replace("initrd: null", "initrd: kernels/initrd.d")


@pytest.mark.parametrize("change,problem", [
    (_no_bzimage, "kernel.vmlinuz: expected an existing file, got '{d}/kernels/bzImage'"),
    (_passwd, "kernel.vmlinuz: expected an x86 bzImage (arch/x86/boot/bzImage: no 'HdrS' "
              "at offset 0x202), got '/etc/passwd'"),
    (_initrd_dir, "kernel.initrd: expected an existing file, got '{d}/kernels/initrd.d'"),
])
def test_store_refuses_a_local_kernel_that_is_not_one(lab_file, change, problem):
    path = lab_file()
    path.write_text(change(path.parent, path.read_text()))
    with pytest.raises(images.ConfigError) as exc:
        ImageStore(load_lab(path)).image("mine")
    assert exc.value.problems == [f"{path}:8: images.mine.{problem.format(d=path.parent)}"]


def test_store_build_of_a_cached_recipe_is_a_no_op(lab_file, monkeypatch):
    store = ImageStore(load_lab(lab_file()))
    img = store.image("trixie")
    img.dir.mkdir(parents=True)
    (img.dir / "meta.json").write_text(json.dumps({"kernel_release": "6.12.38+deb13-cloud-amd64",
                                                   "size": 1}))

    def no_build(*a, **k):
        raise AssertionError("an unchanged recipe must not be rebuilt")

    monkeypatch.setattr(ImageStore, "_build_locked", no_build)
    assert store.build("trixie").dir == img.dir
    assert store.build("trixie").kernel_release == "6.12.38+deb13-cloud-amd64"


# -- accel ----------------------------------------------------------------
def test_accel_requested_tcg_and_kvm(monkeypatch, tmp_path):
    monkeypatch.setattr(accel, "_probe", lambda *a, **k: pytest.fail("no probe"))
    monkeypatch.setattr(accel, "kvm_status", lambda: pytest.fail("no /dev/kvm check"))
    assert accel.choose("tcg", Path("vmlinuz"), None, tmp_path / "a.json") == \
        AccelChoice("tcg", "requested in lab.yml", False)
    assert accel.choose("kvm", Path("vmlinuz"), None, tmp_path / "a.json").accel == "kvm"


def test_accel_auto_without_dev_kvm(monkeypatch, tmp_path):
    monkeypatch.setattr(accel, "kvm_status", lambda: (False, "missing"))
    monkeypatch.setattr(accel, "_probe", lambda *a, **k: pytest.fail("no probe"))
    choice = accel.choose("auto", Path("vmlinuz"), None, tmp_path / "a.json")
    assert choice.accel == "tcg" and not choice.fell_back
    assert "/dev/kvm" in choice.reason


@pytest.fixture
def counted_probe(monkeypatch):
    calls = []

    def probe(vmlinuz, initrd=None, seconds=0):
        calls.append(vmlinuz)
        return False, "KVM internal error", True

    monkeypatch.setattr(accel, "kvm_status", lambda: (True, ""))
    monkeypatch.setattr(accel, "qemu_version", lambda: "QEMU emulator version 9.2.0")
    monkeypatch.setattr(accel, "_probe", probe)
    return calls


def test_accel_auto_falls_back_and_caches(counted_probe, tmp_path):
    cache = tmp_path / "cache" / "accel.json"
    first = accel.choose("auto", Path("vmlinuz"), None, cache)
    assert first.accel == "tcg" and first.fell_back
    assert "KVM internal error" in first.reason
    assert cache.is_file()
    second = accel.choose("auto", Path("vmlinuz"), None, cache)
    assert second == first
    assert len(counted_probe) == 1                # the second call hit the cache


def test_accel_auto_kvm_works_is_cached_too(monkeypatch, counted_probe, tmp_path):
    monkeypatch.setattr(accel, "_probe",
                        lambda *a, **k: counted_probe.append(1) or (True, "booted", True))
    cache = tmp_path / "accel.json"
    assert accel.choose("auto", Path("v"), None, cache) == AccelChoice("kvm", "booted", False)
    assert accel.choose("auto", Path("v"), None, cache).accel == "kvm"
    assert len(counted_probe) == 1


def test_accel_cache_keyed_by_qemu_version(monkeypatch, counted_probe, tmp_path):
    cache = tmp_path / "accel.json"
    accel.choose("auto", Path("v"), None, cache)
    monkeypatch.setattr(accel, "qemu_version", lambda: "QEMU emulator version 10.0.0")
    accel.choose("auto", Path("v"), None, cache)
    assert len(counted_probe) == 2


def test_accel_no_cache_file_probes_each_time(counted_probe):
    accel.choose("auto", Path("v"), None, None)
    accel.choose("auto", Path("v"), None, None)
    assert len(counted_probe) == 2


def test_accel_corrupt_cache_is_ignored(counted_probe, tmp_path):
    cache = tmp_path / "accel.json"
    cache.write_text("{not json")
    assert accel.choose("auto", Path("v"), None, cache).accel == "tcg"
    assert len(counted_probe) == 1


# -- dry run --------------------------------------------------------------
def test_vm_dry_run_without_a_built_image(lab_file):
    path = lab_file("tcg")
    vm = VM(load_lab(path), "guest")
    line = vm.dry_run()
    cache = path.parent / "cache"
    assert f"file={vm.dir}/overlay.qcow2" in line
    assert vm.dir.parent.parent == cache / "vms"        # one directory per lab file
    assert "-accel tcg,thread=multi -cpu max" in line
    assert "-m 1024M" in line and "-smp 3" in line
    assert "loglevel=7" in line
    assert "hostfwd=tcp:127.0.0.1:" in line
    assert not vm.dir.exists()                         # a dry run leaves no VM behind
    assert vm.state() is None


def test_vm_dry_run_local_kernel(lab_file):
    path = lab_file("tcg")
    line = VM(load_lab(path), "dev").dry_run()
    assert f"-kernel {path.parent}/kernels/bzImage" in line
    assert "-initrd" not in line
    assert "nokaslr" in line


def test_cli_up_dry_run_auto_uses_the_chosen_accel(lab_file, monkeypatch, capsys):
    path = lab_file("auto")
    monkeypatch.setattr(accel, "choose", lambda *a, **k: AccelChoice("tcg", "test", True))
    assert cli.main(["--lab", str(path), "up", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0
    assert out.startswith("qemu-system-x86_64 ")
    vm = VM(load_lab(path), "guest")
    assert f"{vm.dir}/overlay.qcow2" in out
    assert "-accel tcg,thread=multi" in out
    assert not vm.dir.exists()


def test_cli_up_dry_run_unknown_vm(lab_file, capsys):
    path = lab_file("tcg")
    assert cli.main(["--lab", str(path), "up", "gust", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == "lab.yml: no VM named 'gust' (did you mean 'guest'?)"


def test_lab_key_made_once_mode_0600(lab_file):
    store = ImageStore(load_lab(lab_file()))
    first = store.keys.public_key()
    assert store.keys.private_path.stat().st_mode & 0o777 == 0o600
    assert ImageStore(load_lab(lab_file())).keys.public_key() == first
