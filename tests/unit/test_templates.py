# SPDX-License-Identifier: MIT
"""Template keys and checks without a VM: what invalidates a template, and
what makes a saved one unusable before QEMU loads it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from uffdlab import accel, template
from uffdlab import vm as vm_mod
from uffdlab.config import load_lab
from uffdlab.template import MARKER, TEMPLATE_VERSION, Template, all_templates, file_digest
from uffdlab.vm import VM

from .labs import guest_lab


def key_for(tmp_path: Path, memory="1536M", cpus=2, cmdline="", hugepages=0) -> str:
    path = tmp_path / "lab.yml"
    path.write_text(guest_lab(tmp_path / "cache", memory=memory, cpus=cpus, cmdline=cmdline,
                              hugepages=hugepages))
    tmpl, _ = VM(load_lab(path), "guest").template_for("tcg")
    return tmpl.key


@pytest.fixture
def fixed_qemu(monkeypatch):
    monkeypatch.setattr(accel, "qemu_version", lambda: "QEMU emulator version 7.2.22")


def test_everything_a_saved_machine_depends_on_changes_the_key(tmp_path, fixed_qemu,
                                                                 monkeypatch):
    base = key_for(tmp_path)
    assert key_for(tmp_path) == base                          # stable
    assert key_for(tmp_path, memory="2G") != base
    assert key_for(tmp_path, cpus=1) != base
    assert key_for(tmp_path, cmdline="loglevel=7") != base
    assert key_for(tmp_path, hugepages=8) != base             # provisioning inputs
    monkeypatch.setattr(vm_mod, "tools_digest", lambda: "0123456789abcdef")
    assert key_for(tmp_path) != base                          # other guest tools
    monkeypatch.undo()
    monkeypatch.setattr(accel, "qemu_version", lambda: "QEMU emulator version 9.2.0")
    assert key_for(tmp_path) != base                          # another QEMU


def test_the_accel_is_part_of_the_key(tmp_path, fixed_qemu):
    key_for(tmp_path)
    vm = VM(load_lab(tmp_path / "lab.yml"), "guest")
    assert vm.template_for("tcg")[0].key != vm.template_for("kvm")[0].key


def fake_template(root: Path, state: bytes = b"state" * 100) -> Template:
    t = Template("k1", root / "k1")
    t.dir.mkdir(parents=True)
    (t.dir / MARKER).write_text("")
    t.state.write_bytes(state)
    t.disk.write_bytes(b"qcow")
    (t.dir / "meta.json").write_text(json.dumps({
        "version": TEMPLATE_VERSION, "state_bytes": len(state),
        "state_sha256": file_digest(t.state), "image_built_at": 100.0,
        "inputs": {"machine": ["-m", "1536M"]}, "facts": {}, "saved_at": 0}))
    return t


def test_a_sound_template_has_no_problem(tmp_path):
    assert fake_template(tmp_path).problem(100.0) is None


@pytest.mark.parametrize("damage,problem", [
    (lambda t: t.state.write_bytes(t.state.read_bytes()[:100]), "truncated?"),
    (lambda t: t.state.write_bytes(b"X" * t.state.stat().st_size), "does not match the checksum"),
    (lambda t: t.disk.unlink(), "its disk is missing"),
    (lambda t: t.state.unlink(), "its state file is missing"),
    (lambda t: (t.dir / "meta.json").write_text("{"), "unreadable meta.json"),
])
def test_damage_is_found_before_qemu_loads_anything(tmp_path, damage, problem):
    t = fake_template(tmp_path)
    damage(t)
    assert problem in t.problem(100.0)


def test_a_rebuilt_image_makes_the_template_stale(tmp_path):
    assert "the image was rebuilt" in fake_template(tmp_path).problem(200.0)


def test_only_marked_template_directories_are_listed_or_removed(tmp_path):
    t = fake_template(tmp_path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "meta.json").write_text("{}")
    assert [x.key for x in all_templates(tmp_path)] == ["k1"]
    Template("notes", other).remove()
    assert other.exists()
    t.remove()
    assert not t.dir.exists()


def test_a_failed_save_leaves_no_template(tmp_path, monkeypatch):
    """The migration fails (a full disk, QEMU gone): no template, no scratch."""
    calls = []

    def qmp(sock, command, timeout=5.0, **args):
        calls.append(command)
        if command == "query-migrate":
            return {"status": "failed", "error-desc": "No space left on device"}
        return {}

    monkeypatch.setattr(template, "qmp", qmp)
    t = Template("k2", tmp_path / "templates" / "k2")
    overlay = tmp_path / "overlay.qcow2"
    overlay.write_bytes(b"qcow")
    with pytest.raises(template.TemplateError, match="No space left on device"):
        template.save(t, tmp_path / "qmp.sock", overlay, tmp_path / "serial.log", {}, {}, 1.0)
    assert not t.exists and not t.dir.exists()
    assert [p.name for p in t.dir.parent.iterdir()] == [".k2.lock"]
    assert calls[-1] == "cont"                 # the VM runs on after a failed save


def test_a_state_rewritten_after_its_check_is_checked_again(tmp_path):
    t = fake_template(tmp_path)
    assert t.problem(100.0) is None                 # checked once, remembered
    data = t.state.read_bytes()
    t.state.write_bytes(b"Y" * len(data))           # same size, rewritten in place
    assert "does not match the checksum" in t.problem(100.0)


def test_a_saved_template_keeps_the_boot_log_and_a_restore_starts_with_it(tmp_path,
                                                                          monkeypatch):
    """The restored guest prints nothing before it fails: its log must still
    say something (the template's boot, and where the restore began)."""
    def qmp(sock, command, timeout=5.0, **args):
        if command == "migrate":
            Path(args["uri"].split("> ", 1)[1].strip("'")).write_bytes(b"RAM")
        return {"status": "completed"} if command == "query-migrate" else {}

    monkeypatch.setattr(template, "qmp", qmp)
    t = Template("k3", tmp_path / "templates" / "k3")
    overlay, boot = tmp_path / "overlay.qcow2", tmp_path / "serial.log"
    overlay.write_bytes(b"qcow")
    boot.write_text("Linux version 6.12\nDebian GNU/Linux login:")   # no final newline
    template.save(t, tmp_path / "qmp.sock", overlay, boot, {}, {}, 1.0)
    assert t.exists and t.serial_log.read_text() == boot.read_text()
    log = tmp_path / "vm" / "serial.log"
    log.parent.mkdir()
    vm_mod.seed_serial_log(log, t)
    lines = log.read_text().splitlines()
    assert lines[:2] == ["Linux version 6.12", "Debian GNU/Linux login:"]
    assert lines[2].startswith("[uffdlab] restored from template k3 at ")
    t.serial_log.unlink()                            # a template saved without one
    vm_mod.seed_serial_log(log, t)
    assert log.read_text().startswith("[uffdlab] restored from template k3")
