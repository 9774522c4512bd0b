# SPDX-License-Identifier: MIT
"""JupyterLab as a user meets it: `uffdlab lab` started for real, the
onboarding notebook opened in a real (headless) Chromium, its kernel shown as
the project's, its first two cells run, no error in the browser's console,
and nothing left running afterwards. Needs no VM: those cells only assign
parameters and import."""
from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from uffdlab.jupyter import KERNEL_DISPLAY_NAME

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = "01-onboarding.ipynb"


def _sync_playwright():
    """Playwright's sync API, pip-installed into this venv when missing (the
    browser itself comes from Debian: Playwright's own download is unreachable)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"playwright is not installed and 'pip install playwright' failed: "
                        f"{proc.stderr.strip().splitlines()[-1:]}")
        importlib.invalidate_caches()     # the new package must be found now
        from playwright.sync_api import sync_playwright
    return sync_playwright


def _chromium() -> Path:
    """Debian's chromium, apt-installed when missing (as root)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{CHROMIUM} is missing and this is not root on apt: "
                    f"install Debian's 'chromium' (./lab setup does)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            pytest.skip(f"chromium cannot be installed: {' '.join(argv)} exited "
                        f"{proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: str) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a process, None once it is gone."""
    try:
        fields = (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], fields[19]


def _processes() -> dict[str, tuple[int, str, str]]:
    return {d.name: st for d in Path("/proc").iterdir()
            if d.name.isdigit() and (st := _stat(d.name))}


def _descendants(root: int, others: frozenset[str] = frozenset()) -> set[tuple[str, str]]:
    """Every live process below ROOT, as (pid, start time) so a reused pid is no
    match; not those in OTHERS (processes that ran before the test, such as
    the session's early kernel build), nor anything below them."""
    procs, found, todo = _processes(), set(), [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _state, start) in procs.items():
            if ppid == parent and pid not in others:
                found.add((pid, start))
                todo.append(int(pid))
    return found


def _cmdline(pid: str) -> str:
    try:
        return (Path("/proc") / pid / "cmdline").read_bytes()[:100].replace(b"\0", b" ").decode()
    except OSError:
        return "?"


def _still_running(seen: set[tuple[str, str]], marker: str) -> list[str]:
    """Processes seen below us that still run (zombies are not running), and
    any others carrying MARKER in their environment (a kernel started later).
    Chromium's helpers overwrite their environment, hence both."""
    left = {pid for pid, start in seen if (st := _stat(pid)) and st[2] == start and st[1] != "Z"}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "environ").read_bytes():
                    left.add(d.name)
            except OSError:               # gone meanwhile, or a kernel thread
                pass
    return [f"{pid} {_cmdline(pid)}" for pid in sorted(left)]


def _read_url(proc: subprocess.Popen, seconds: float) -> tuple[str, list[str]]:
    """The URL `uffdlab lab` prints, read from its stdout in a thread so a
    silent process cannot hang the test."""
    lines: list[str] = []
    found = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"^\s+http://\S+/lab\?token=\S+$", line):
                found.set()
    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(seconds):
        raise AssertionError(f"'uffdlab lab' printed no http://...lab?token= URL within "
                             f"{seconds:.0f} s; it printed: {''.join(lines)!r}")
    return next(line.strip() for line in lines if "/lab?token=" in line), lines


def _wait_http(url: str, proc: subprocess.Popen, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited {proc.returncode} before serving {url}; "
                                 f"its log ends: {log.read_text()[-600:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"JupyterLab did not answer {url} within {seconds:.0f} s; "
                                 f"its log ends: {log.read_text()[-600:]}")
        time.sleep(0.3)


def _wait_text(page, locator, want: str | re.Pattern, what: str, seconds: float = 30) -> None:
    """Wait until LOCATOR's text is WANT; else fail saying what was expected and shown."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    try:
        expect = re.compile(f"^{re.escape(want)}$") if isinstance(want, str) else want
        page.wait_for_function("([el, re]) => new RegExp(re).test(el.textContent.trim())",
                               arg=[locator.element_handle(timeout=seconds * 1000),
                                    expect.pattern], timeout=seconds * 1000)
    except PlaywrightTimeout:
        shown = locator.all_text_contents() if locator.count() else "nothing"
        raise AssertionError(f"{what}: expected {want!r} within {seconds:.0f} s, the page "
                             f"shows {shown!r}") from None


def test_onboarding_notebook_runs_in_a_real_browser(tmp_path, monkeypatch):
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed: "
                        "pip install -e '.[lab]' (./lab setup does)")
    sync_playwright = _sync_playwright()
    chromium = _chromium()
    t0 = time.monotonic()

    # Every process started here inherits the marker: that is how leaks are found.
    marker = f"UFFDLAB_BROWSER_TEST={uuid.uuid4().hex}"
    monkeypatch.setenv(*marker.split("="))
    # The user's own Jupyter settings, workspaces and kernels stay out of it.
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("SSH_CONNECTION", raising=False)

    others = frozenset(pid for pid, _ in _descendants(os.getpid()))   # not the test's
    port = _free_port()
    log = tmp_path / "jupyterlab.log"
    with log.open("w") as err:            # the child keeps its own descriptor
        lab = subprocess.Popen([sys.executable, "-m", "uffdlab", "lab", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=err, text=True)
    console_errors: list[str] = []
    try:
        url, printed = _read_url(lab, 30)
        assert url.startswith(f"http://127.0.0.1:{port}/lab?token="), printed
        token = url.split("token=", 1)[1]
        _wait_http(url, lab, 30, log)

        from playwright.sync_api import Error as PlaywrightError
        with sync_playwright() as pw:
            # chromium refuses its sandbox as root; headless: there is no display
            args = ["--no-sandbox"] if os.geteuid() == 0 else []
            try:
                browser = pw.chromium.launch(executable_path=str(chromium), headless=True,
                                             args=args)
            except PlaywrightError as e:
                pytest.skip(f"chromium cannot start here ({chromium}): "
                            f"{str(e).strip().splitlines()[0]}")
            try:
                page = browser.new_page()
                page.on("console", lambda m: m.type == "error" and console_errors.append(
                    f"console: {m.text} ({m.location.get('url', '')})"))
                page.on("pageerror", lambda e: console_errors.append(f"pageerror: {e}"))
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}")

                panel = page.locator(".jp-NotebookPanel").first
                kernel = panel.locator(".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName")
                _wait_text(page, kernel, KERNEL_DISPLAY_NAME, "the notebook toolbar's kernel")

                # The name shows before the kernel runs, and a cell run before it is
                # connected is skipped, not queued: wait for the status bar's "Idle"
                # (the toolbar's indicator says idle from the start).
                _wait_text(page, page.locator(".jp-StatusBar-TextItem[title^='Change kernel']"),
                           f"{KERNEL_DISPLAY_NAME} | Idle", "the status bar's kernel state")

                cells = panel.locator(".jp-Notebook .jp-CodeCell")
                cells.nth(0).locator(".jp-InputPrompt").click()   # select, command mode
                page.keyboard.press("Shift+Enter")                # parameters; moves on
                page.keyboard.press("Shift+Enter")                # imports
                for i, count in ((0, 1), (1, 2)):
                    _wait_text(page, cells.nth(i).locator(".jp-InputPrompt"), f"[{count}]:",
                               f"code cell {i + 1}'s execution count")
                # an exception in a cell still gets its count: its traceback is stderr
                for i in (0, 1):
                    out = cells.nth(i).locator(".jp-OutputArea-output[data-mime-type="
                                               "'application/vnd.jupyter.stderr']")
                    assert out.count() == 0, f"code cell {i + 1} wrote: {out.first.inner_text()}"
                # at its peak: JupyterLab, the kernel, Playwright's driver, chromium's
                seen = _descendants(os.getpid(), others)
                assert any("ipykernel" in _cmdline(p) for p, _ in seen), "no kernel ran"
            finally:
                browser.close()
    finally:
        lab.send_signal(signal.SIGTERM)
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
            lab.wait()
            raise AssertionError("JupyterLab did not stop within 20 s of SIGTERM") from None

    assert not console_errors, "\n".join(console_errors)
    deadline = time.monotonic() + 10      # kernels and chromium's helpers exit just after
    while (leaked := _still_running(seen, marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leaked, "processes left running (jupyter, kernel or chromium):\n" + \
        "\n".join(leaked)
    assert time.monotonic() - t0 < 90, f"took {time.monotonic() - t0:.0f} s, budget 90 s"
