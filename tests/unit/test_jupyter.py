# SPDX-License-Identifier: MIT
"""The Jupyter side without a browser: the kernelspec `uffdlab jupyter
install` writes (into temporary Jupyter dirs, never the user's), the kernel
name the notebooks carry, the nbstripout filter git applies to them, and
what `uffdlab lab` checks and prints before it hands over to JupyterLab."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uffdlab import jupyter
from uffdlab.cli import main
from uffdlab.jupyter import KERNEL_DISPLAY_NAME, KERNEL_NAME, install_kernel, lab_instructions
from uffdlab.paths import NOTEBOOKS, REPO

NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """A Jupyter data dir of the test's own: --user installs land here."""
    d = tmp_path / "jupyter-data"
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(d))
    return d


def _spec(dest: Path) -> dict:
    return json.loads((dest / "kernel.json").read_text())


def test_user_install_writes_a_kernelspec_that_runs_this_venvs_python(data_dir):
    dest = install_kernel(user=True)
    assert dest == data_dir / "kernels" / KERNEL_NAME
    spec = _spec(dest)
    assert spec["display_name"] == KERNEL_DISPLAY_NAME and spec["language"] == "python"
    # the venv's bin/python as invoked, not the system interpreter it links to
    assert spec["argv"][0] == sys.executable
    assert Path(spec["argv"][0]).parent == Path(sys.prefix) / "bin"
    assert "ipykernel_launcher" in spec["argv"]
    assert jupyter.kernel_is_installed(dest)


def test_installing_again_replaces_the_kernelspec_in_place(data_dir):
    first = install_kernel(user=True)
    (first / "kernel.json").write_text(json.dumps({"argv": ["/usr/bin/python3"],
                                                   "display_name": "stale"}))
    assert not jupyter.kernel_is_installed(first)
    assert install_kernel(user=True) == first
    assert jupyter.kernel_is_installed(first)
    assert sorted(p.name for p in (data_dir / "kernels").iterdir()) == [KERNEL_NAME]


def test_prefix_install_goes_under_the_prefix(tmp_path, data_dir):
    dest = install_kernel(user=False, prefix=tmp_path / "env")
    assert dest == tmp_path / "env" / "share" / "jupyter" / "kernels" / KERNEL_NAME
    assert _spec(dest)["argv"][0] == sys.executable
    assert not (data_dir / "kernels").exists()


def test_user_and_prefix_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="user=True and a prefix"):
        install_kernel(user=True, prefix=tmp_path)


def test_the_command_installs_for_the_user_and_says_where(data_dir, capsys):
    assert main(["jupyter", "install", "--user"]) == 0
    out = capsys.readouterr().out
    assert str(data_dir / "kernels" / KERNEL_NAME) in out and KERNEL_DISPLAY_NAME in out


def test_jupyter_needs_an_action(capsys):
    with pytest.raises(SystemExit) as e:
        main(["jupyter"])
    assert e.value.code == 2 and "ACTION" in capsys.readouterr().err


@pytest.mark.parametrize("name", NAMES)
def test_every_notebook_names_the_project_kernel(name):
    spec = json.loads((NOTEBOOKS / name).read_text())["metadata"]["kernelspec"]
    assert spec == {"name": KERNEL_NAME, "display_name": KERNEL_DISPLAY_NAME,
                    "language": "python"}, f"{name}: kernelspec {spec}"


@pytest.mark.parametrize("attr, value", [("filter", "nbstripout"), ("diff", "ipynb")])
def test_git_strips_notebooks_on_the_way_in(attr, value):
    out = subprocess.run(["git", "check-attr", attr, "--", "notebooks/10-snapshot.ipynb"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"notebooks/10-snapshot.ipynb: {attr}: {value}", out


@pytest.mark.parametrize("port", ["0", "70000", "-1", "http"])
def test_lab_rejects_a_port_out_of_range(port, capsys):
    with pytest.raises(SystemExit) as e:
        main(["lab", "--port", port])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "--port" in err and "1-65535" in err and repr(port) in err, err


def test_lab_prints_a_local_url():
    assert lab_instructions("127.0.0.1", 8888, "tok", None, "alice").splitlines()[1:] == [
        "  http://127.0.0.1:8888/lab?token=tok"]


def test_lab_on_a_remote_host_prints_the_port_forward():
    text = lab_instructions("127.0.0.1", 8890, "tok", "1.2.3.4 5 10.0.0.2 22", "alice")
    assert text.splitlines()[1:] == [
        "  http://127.0.0.1:8890/lab?token=tok",
        "this host is remote (SSH_CONNECTION): forward the port first, on your own machine:",
        "  ssh -L 8890:127.0.0.1:8890 alice@10.0.0.2"]


def test_port_forward_names_a_non_default_sshd_port_and_the_bound_address():
    text = lab_instructions("10.0.0.2", 9000, "t", "1.2.3.4 5 10.0.0.2 2222", "bob")
    assert "  http://10.0.0.2:9000/lab?token=t" in text.splitlines()
    assert "  ssh -L 9000:10.0.0.2:9000 -p 2222 bob@10.0.0.2" in text.splitlines()
    assert text.splitlines()[-1] == "then open http://127.0.0.1:9000/lab?token=t there"


def test_lab_listening_everywhere_is_opened_on_loopback():
    assert "http://127.0.0.1:8888/lab" in lab_instructions("0.0.0.0", 8888, "t", None, "u")
    assert "http://[::1]:8888/lab" in lab_instructions("::1", 8888, "t", None, "u")


def test_lab_hands_jupyterlab_our_token_outside_its_argv(monkeypatch, capsys):
    """What cmd_lab execs: JupyterLab on notebooks/, on exactly the port asked
    for, with the token it printed (by environment: argv is public in ps)."""
    ensured, execs = [], []
    monkeypatch.setattr(jupyter, "ensure_kernel", lambda: ensured.append(1))
    monkeypatch.setenv("SSH_CONNECTION", "1.2.3.4 5 10.0.0.2 22")

    def fake_execve(path, argv, env):
        execs.append((path, argv, env))
        raise SystemExit(0)
    monkeypatch.setattr(os, "execve", fake_execve)
    with pytest.raises(SystemExit):
        main(["lab", "--port", "8891"])
    out = capsys.readouterr().out
    (path, argv, env), = execs
    token = env["JUPYTER_TOKEN"]
    assert ensured and len(token) >= 32
    assert argv[:3] == [sys.executable, "-m", "jupyterlab"] and path == sys.executable
    assert {"--port=8891", "--ServerApp.port_retries=0", "--no-browser",
            f"--ServerApp.root_dir={NOTEBOOKS}"} <= set(argv)
    assert not any(token in a for a in argv)
    assert f"  http://127.0.0.1:8891/lab?token={token}" in out.splitlines()
    assert "ssh -L 8891:127.0.0.1:8891 " in out
