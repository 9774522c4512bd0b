# SPDX-License-Identifier: MIT
"""The one place that knows QEMU's command line."""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

QEMU = "qemu-system-x86_64"
GUEST_CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1"


def opt_value(value: object) -> str:
    """A value inside QEMU's key=value,key=value option syntax: a literal comma
    is written ',,' (else `x,file=/etc/passwd` would add a second key)."""
    return str(value).replace(",", ",,")


@dataclass(frozen=True)
class QemuCommand:
    """Everything that decides how one VM boots."""

    name: str
    accel: str                      # "kvm" or "tcg": auto is resolved before this
    memory_mb: int
    cpus: int
    vmlinuz: Path
    initrd: Path | None
    disk: Path                      # the VM's own qcow2 overlay
    ssh_port: int
    serial_log: Path
    qmp_socket: Path | None
    cmdline: str = ""
    extra: tuple[str, ...] = field(default_factory=tuple)
    incoming: Path | None = None    # a saved state to load instead of booting

    def shape(self) -> list[str]:
        """The arguments that decide the machine a saved state fits: the
        command line without what differs from one VM of a shape to the next
        (name, disk, port, log and socket paths)."""
        return replace(self, name="", disk=Path("DISK"), ssh_port=0,
                       serial_log=Path("SERIAL"), qmp_socket=Path("QMP"),
                       incoming=None).argv()

    def accel_args(self) -> list[str]:
        if self.accel == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        # thread=multi: one host thread per vCPU; -cpu max exposes everything
        # TCG can emulate (PKU, LA57...), so the guest kernel sees a modern CPU.
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]

    def kernel_cmdline(self) -> str:
        return " ".join(p for p in (GUEST_CMDLINE, self.cmdline) if p)

    def argv(self) -> list[str]:
        args = [QEMU, "-name", opt_value(f"uffdlab-{self.name}"), "-machine", "q35",
                *self.accel_args(), "-smp", str(self.cpus), "-m", f"{self.memory_mb}M",
                "-nodefaults", "-display", "none", "-no-reboot",
                "-kernel", str(self.vmlinuz)]
        if self.initrd is not None:
            args += ["-initrd", str(self.initrd)]
        args += ["-append", self.kernel_cmdline(),
                 # cache=unsafe: the overlay is thrown away, so flushes buy nothing
                 "-drive", f"file={opt_value(self.disk)},if=virtio,format=qcow2,"
                           "cache=unsafe,discard=unmap",
                 "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                 "-device", "virtio-net-pci,netdev=net0",
                 "-device", "virtio-rng-pci"]     # sshd and the CRNG need entropy now
        if self.incoming is None:
            # `file:` takes the rest verbatim (checked with QEMU 7.2): no escaping
            args += ["-serial", f"file:{self.serial_log}"]
        else:
            # append: the log already holds the template's boot, so a restored
            # guest that dies early still leaves its last words behind
            args += ["-chardev", f"file,id=serial0,append=on,path={opt_value(self.serial_log)}",
                     "-serial", "chardev:serial0"]
        if self.qmp_socket is not None:
            args += ["-qmp", f"unix:{opt_value(self.qmp_socket)},server=on,wait=off"]
        if self.incoming is not None:
            # QEMU 7.2 has no file: migration URI; exec: runs through /bin/sh
            args += ["-incoming", f"exec:cat {shlex.quote(str(self.incoming))}"]
        return args + list(self.extra)

    def shell(self) -> str:
        return shlex.join(self.argv())
