# SPDX-License-Identifier: MIT
"""Hostile input: shell metacharacters in paths, YAML bombs, bad bytes, an
unusable cache, a grid too big to run, and processes racing for the lab key.
No VM boots; the shell scripts run against scratch directories."""
from __future__ import annotations

import multiprocessing
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from uffdlab import cli, config, images, sweep
from uffdlab.config import ConfigError, check_cache_dir, load_lab
from uffdlab.images import CUSTOMIZE_HOOK, ImageStore, mmdebstrap_env, recipe
from uffdlab.keys import LabKeys

from .labs import MINIMAL_LAB

REPO = Path(__file__).resolve().parents[2]
LAB = MINIMAL_LAB
HOSTILE = "x;touch PWNED;#"
# The classic "billion laughs": 9 levels of 9 aliases, a few hundred bytes.
BOMB = ('a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
        + "".join(f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]\n"
                  for p, c in zip("abcdefgh", "bcdefghi")))


def _write(tmp_path: Path, text: str | bytes, name: str = "lab.yml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _problems(path: Path, load=load_lab) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load(path)
    return exc.value.problems


# -- host shell: the image build's customize hook ----------------------------
def _hostile_dirs(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / HOSTILE / "out dir"
    keys = tmp_path / "k $(touch PWNED) `touch PWNED`"
    out.mkdir(parents=True)
    keys.mkdir()
    return out, keys


def _run_hook(tmp_path: Path, root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # as mmdebstrap does: sh -c HOOK exec ROOT, with the caller's environment
    return subprocess.run(["sh", "-c", CUSTOMIZE_HOOK, "exec", str(root)], cwd=tmp_path,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
                          capture_output=True, text=True)


def test_hook_passes_hostile_paths_intact_and_runs_nothing(tmp_path):
    out, keys = _hostile_dirs(tmp_path)
    stub = tmp_path / "stub; touch PWNED" / "customize.sh"
    stub.parent.mkdir()
    record = tmp_path / "args"
    stub.write_text(f'for a; do printf "%s\\n" "$a"; done > "{record}"\n')
    env = mmdebstrap_env(recipe(images.ImageSpec(suite="trixie")), out, keys / "hostkey")
    r = _run_hook(tmp_path, tmp_path / "root dir;#", {**env, "UFFDLAB_CUSTOMIZE": str(stub)})
    assert r.returncode == 0, r.stderr
    assert record.read_text().splitlines() == [
        str(tmp_path / "root dir;#"), str(out), str(keys / "hostkey"), "4096M"]
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="needs mkfs.ext4 (e2fsprogs)")
def test_customize_script_quotes_every_path(tmp_path):
    """The real customize.sh, on a skeleton rootfs, with hostile directory names."""
    out, keys = _hostile_dirs(tmp_path)
    root = tmp_path / "root; touch PWNED"
    for d in ("etc/systemd/system/multi-user.target.wants", "etc/ssh/sshd_config.d"):
        (root / d).mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(keys / "hostkey")], check=True)
    rec = {**recipe(images.ImageSpec(suite="trixie")), "disk_size": 16 << 20}
    r = _run_hook(tmp_path, root, mmdebstrap_env(rec, out, keys / "hostkey"))
    assert r.returncode == 0, r.stderr
    assert not (root / "root/.ssh/authorized_keys").exists()    # it comes at boot
    assert (root / "etc/systemd/system/ssh.service.wants/uffdlab-authkey.service").is_symlink()
    assert (out / "rootfs.raw").stat().st_size == 16 << 20
    assert not list(tmp_path.rglob("PWNED"))


def _authkey_script(tmp_path: Path) -> Path:
    """The guest's uffdlab-authkey, as customize.sh writes it."""
    text = (REPO / "images/customize.sh").read_text()
    body = text.split("<<'AUTHKEY'\n", 1)[1].split("\nAUTHKEY\n", 1)[0]
    script = tmp_path / "uffdlab-authkey"
    script.write_text(body.replace("/proc/cmdline", '"$CMDLINE"')
                      .replace("/root/.ssh", '"$SSHDIR"') + "\n")
    return script


@pytest.mark.parametrize("cmdline,installed", [
    ("root=/dev/vda uffdlab.authkey=AAAAC3Nz+/= quiet", "ssh-ed25519 AAAAC3Nz+/= uffdlab\n"),
    ("root=/dev/vda uffdlab.authkey=$(touch${IFS}PWNED) quiet", None),
    ("root=/dev/vda uffdlab.authkey=AAAA;touch${IFS}PWNED", None),
    ("root=/dev/vda quiet", None),
])
def test_the_guest_takes_only_a_base64_key_from_the_command_line(tmp_path, cmdline,
                                                                  installed):
    """The lab's key reaches the guest on the kernel command line; anything
    but base64 there installs nothing and runs nothing."""
    script = _authkey_script(tmp_path)
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    (tmp_path / "ssh").mkdir()
    r = subprocess.run(["sh", str(script)], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "CMDLINE": str(tmp_path / "cmdline"),
                            "SSHDIR": str(tmp_path / "ssh")})
    assert r.returncode == 0, r.stderr
    keys = tmp_path / "ssh" / "authorized_keys"
    assert (keys.read_text() if keys.exists() else None) == installed
    assert not list(tmp_path.rglob("PWNED"))


# -- guest shell: the provisioning playbook ----------------------------------
def _shell_tasks(playbook: Path):
    def walk(tasks):
        for task in tasks:
            yield from walk(task.get("block", []))
            for module in ("ansible.builtin.raw", "ansible.builtin.shell",
                           "ansible.builtin.command"):
                if module in task:
                    yield task["name"], task[module]
    (play,) = yaml.safe_load(playbook.read_text())
    return play["vars"], list(walk(play["tasks"]))


def test_playbook_quotes_lab_values_in_every_shell_task():
    play_vars, tasks = _shell_tasks(REPO / "playbooks" / "provision.yml")
    assert len(tasks) >= 5
    for name, script in tasks:
        for expr in re.findall(r"\{\{(.*?)\}\}", script):
            if "lab." in expr or "_file" in expr:
                assert expr.rstrip().endswith("| quote"), (name, expr)


def test_playbook_shell_runs_a_hostile_tools_dir_as_one_path(tmp_path):
    """Render the build and probe tasks as Ansible would (its own `quote`
    filter) for a tools_dir lab.yml refuses, and run them with sh."""
    jinja2 = pytest.importorskip("jinja2")
    core = pytest.importorskip("ansible.plugins.filter.core")
    play_vars, tasks = _shell_tasks(REPO / "playbooks" / "provision.yml")
    env = jinja2.Environment()
    env.filters.update(core.FilterModule().filters())
    tools = tmp_path / "t $(touch PWNED);touch PWNED"
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "Makefile").write_text("all:\n\tprintf '#!/bin/sh\\necho probed\\n' > bin/uffd-probe"
                                  " && chmod +x bin/uffd-probe\n")
    subprocess.run(["tar", "-cf", f"{tools}.tar", "-C", str(src), "."], check=True)
    lab = {"tools_dir": str(tools), "dev_userfaultfd_mode": "0666"}
    scripts = {name: env.from_string(script).render(lab=lab, **play_vars)
               for name, script in tasks}
    build = scripts["Build the guest tools against this kernel's headers"]
    r = subprocess.run(["sh", "-c", build], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    probe = scripts["Probe the kernel's userfaultfd features"]
    r = subprocess.run(["sh", "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert r.stdout == "probed\n", r.stderr
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("value", ["/*", "/opt/x;rm -rf /", "$(reboot)", "`reboot`",
                                   "relative/path", "/opt/../etc", "/", "/opt/x\n"])
def test_tools_dir_refused(tmp_path, value):
    path = _write(tmp_path, LAB + "provision:\n  tools_dir: " + yaml.safe_dump(value))
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}:9: provision.tools_dir: expected ")
    assert problem.endswith(f"got {value!r}")


# -- YAML bombs, cycles, bytes ------------------------------------------------
def test_alias_bomb_refused_fast(tmp_path):
    assert len(BOMB) < 1000 and BOMB.count('*') == 72
    path = _write(tmp_path, BOMB)
    t0 = time.monotonic()
    problems = _problems(path)
    assert time.monotonic() - t0 < 0.5
    assert problems == [f"{path}:5: e.0: expected at most 10000 values after expanding "
                        f"aliases, got more by alias *d (a YAML alias bomb?)"]


def test_self_referencing_alias_refused(tmp_path):
    path = _write(tmp_path, "images: &i\n  trixie: *i\n")
    assert _problems(path) == [f"{path}:2: images.trixie: expected an alias to a finished "
                               f"node, got *i inside its own anchor (a cycle)"]


def test_deep_nesting_refused(tmp_path):
    path = _write(tmp_path, "images: " + "[" * 2000 + "]" * 2000 + "\n")
    assert _problems(path) == [f"{path}:1: images.0.0: expected at most 64 levels of "
                               f"nesting, got more"]


def test_huge_file_refused(tmp_path):
    path = _write(tmp_path, LAB + "#" * (1 << 20))
    assert _problems(path) == [f"{path}: expected a lab file of at most 1M, got more"]


def test_modest_aliases_still_work(tmp_path):
    path = _write(tmp_path, LAB + "  other: &vm\n    image: trixie\n    cpus: 1\n"
                             "  third: *vm\n")
    assert load_lab(path).vms["third"].cpus == 1


def test_not_utf8(tmp_path, capsys):
    path = _write(tmp_path, LAB.encode() + b"name: caf\xe9\n")
    offset = len(LAB) + len("name: caf")
    expected = [f"{path}: not UTF-8 text (byte 0xe9 at offset {offset})"]
    assert _problems(path) == expected
    assert cli.main(["--lab", str(path), "status"]) == 2
    assert capsys.readouterr().err.splitlines() == expected


# -- the cache directory -------------------------------------------------------
def test_cache_dir_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    path = _write(tmp_path, LAB.replace("cache_dir: cache", "cache_dir: afile/cache"))
    lab = load_lab(path)                   # commands that never touch the cache still work
    expected = [f"{path}:1: cache_dir: expected a writable directory, got "
                f"'{tmp_path}/afile/cache' ('{tmp_path}/afile' is not a directory)"]
    assert _problems(lab, check_cache_dir) == expected
    assert _problems(lab, ImageStore) == expected
    assert cli.main(["--lab", str(path), "image", "list"]) == 2
    assert capsys.readouterr().err.splitlines() == expected


def test_cache_dir_is_a_regular_file(tmp_path):
    (tmp_path / "cache").write_text("")
    lab = load_lab(_write(tmp_path, LAB))
    assert _problems(lab, check_cache_dir) == [
        f"{lab.source}:1: cache_dir: expected a writable directory, got "
        f"'{tmp_path}/cache' (it is not a directory)"]


def test_cache_dir_unwritable(tmp_path, monkeypatch):
    # root may write anywhere, so ask os.access what an ordinary user would hear
    monkeypatch.setattr(config.os, "access", lambda p, mode: Path(p) != tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    lab = load_lab(_write(tmp_path, LAB.replace("cache_dir: cache", "cache_dir: ro")))
    assert _problems(lab, check_cache_dir) == [
        f"{lab.source}:1: cache_dir: expected a writable directory, got "
        f"'{tmp_path}/ro' (it is not writable)"]
    lab = load_lab(_write(tmp_path, LAB.replace("cache_dir: cache", "cache_dir: ro/c")))
    assert _problems(lab, check_cache_dir) == [
        f"{lab.source}:1: cache_dir: expected a writable directory, got "
        f"'{tmp_path}/ro/c' (it does not exist and '{tmp_path}/ro' is not writable)"]


def test_cache_dir_fine_when_missing_under_a_writable_dir(tmp_path):
    lab = load_lab(_write(tmp_path, LAB))
    assert check_cache_dir(lab) == tmp_path / "cache"
    assert not (tmp_path / "cache").exists()


# -- sweep grids -------------------------------------------------------------
GRID = "fixed:\n  image: trixie\ngrid:\n  writers: [1, 2, 4]\n"


def test_grid_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "notebook_parameters", lambda p: {"image": "", "writers": 1})
    grid = sweep.load_grid(_write(tmp_path, GRID, "grid.yml"))
    assert grid.axes == {"writers": [1, 2, 4]} and len(grid.points()) == 3


def test_grid_too_many_points(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "notebook_parameters", lambda p: {})
    axes = "".join(f"  p{i}: [{', '.join(map(str, range(10)))}]\n" for i in range(6))
    path = _write(tmp_path, "grid:\n" + axes, "grid.yml")
    t0 = time.monotonic()
    assert _problems(path, sweep.load_grid) == [
        f"{path}:1: grid: expected at most 10000 points, got 1000000"]
    assert time.monotonic() - t0 < 0.5


def test_grid_bomb_and_duplicates(tmp_path):
    path = _write(tmp_path, BOMB, "grid.yml")
    (problem,) = _problems(path, sweep.load_grid)
    assert problem.startswith(f"{path}:5: e.0: expected at most 10000 values")
    path = _write(tmp_path, GRID + "grid:\n  writers: [8]\n", "grid.yml")
    assert _problems(path, sweep.load_grid) == [
        f"{path}:5: grid: duplicate key 'grid' (first at line 3)"]


def test_grid_not_utf8(tmp_path):
    path = _write(tmp_path, b"grid:\n  writers: [\xff]\n", "grid.yml")
    assert _problems(path, sweep.load_grid) == [
        f"{path}: not UTF-8 text (byte 0xff at offset 18)"]


@pytest.mark.parametrize("content,why", [
    ("{not json", "not JSON: Expecting property name enclosed in double quotes at line 1, "
                  "column 2"),
    ('{"cells": "no"}', "no nbformat or cells"),
])
def test_grid_notebook_not_a_notebook(tmp_path, monkeypatch, content, why):
    monkeypatch.setattr(sweep, "NOTEBOOKS", tmp_path)
    (tmp_path / "bad.ipynb").write_text(content)
    path = _write(tmp_path, "notebook: bad.ipynb\n" + GRID, "grid.yml")
    assert _problems(path, sweep.load_grid) == [
        f"{path}:1: notebook: expected a Jupyter notebook (.ipynb JSON), got "
        f"'bad.ipynb' ({why})"]


@pytest.mark.parametrize("notebook", ["../lab.yml", 5, "absent.ipynb"])
def test_grid_notebook_outside_notebooks(tmp_path, notebook):
    path = _write(tmp_path, f"notebook: {notebook}\n" + GRID, "grid.yml")
    assert _problems(path, sweep.load_grid) == [
        f"{path}:1: notebook: expected the name of a notebook in notebooks/, "
        f"got {notebook!r}"]


# -- the lab key -------------------------------------------------------------
def _take_key(directory: str, barrier, results) -> None:
    barrier.wait()
    results.put(LabKeys(Path(directory)).public_key())


@pytest.mark.parametrize("nproc", [3, 8])
def test_lab_key_race(tmp_path, nproc):
    ctx = multiprocessing.get_context("fork")
    for rnd in range(10):
        keys = tmp_path / f"round{rnd}" / "keys"
        barrier, results = ctx.Barrier(nproc), ctx.Queue()
        procs = [ctx.Process(target=_take_key, args=(str(keys), barrier, results))
                 for _ in range(nproc)]
        for p in procs:
            p.start()
        seen = {results.get(timeout=30) for _ in procs}
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        derived = subprocess.run(["ssh-keygen", "-y", "-f", str(keys / "lab_ed25519")],
                                 check=True, capture_output=True, text=True).stdout
        assert seen == {" ".join(derived.split()[:2])}, f"round {rnd}"
        assert sorted(p.name for p in keys.iterdir()) == [".lock", "lab_ed25519",
                                                         "lab_ed25519.pub"]


def test_lab_key_public_half_restored_from_the_private(tmp_path):
    keys = LabKeys(tmp_path / "keys")
    first = keys.public_key()
    keys.public_path.unlink()
    assert keys.public_key() == first
