# SPDX-License-Identifier: MIT
"""What a shell user and a JupyterLab user expect: every --help with a
description and examples, --lab before or after the command, --version,
shell completion; a RunResult and runs_table that read well in a notebook."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.unit.labs import MINIMAL_LAB
from tests.unit.test_results import SUMMARY_S5, make_result
from uffdlab import __version__, cli, report
from uffdlab.cli import HELP, build_parser, subcommands
from uffdlab.results import ResultsDB

PATHS = [path for path, _ in subcommands(build_parser())]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:             # argparse's own exits: --help, --version, errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# -- --help ------------------------------------------------------------------------

def test_every_command_has_an_entry_in_the_help_table():
    assert {"image build", "template rm", "run", "results", "sweep", "demo", "lab",
            "doctor"} <= set(PATHS)
    assert set(HELP) == set(PATHS)          # nothing without help, nothing stale


@pytest.mark.parametrize("path", PATHS)
def test_help_of_every_command_has_a_description_and_an_example(capsys, path):
    code, out, _ = run_cli(capsys, *path.split(), "--help")
    assert code == 0
    usage, _, rest = out.partition("\n\n")
    assert usage.startswith(f"usage: uffdlab {path}")
    description = rest.split("\n\n")[0]
    assert HELP[path][0].split()[0] in description      # the description comes first
    examples = out.split("examples:\n", 1)[1].splitlines()
    assert any(line.startswith(f"  uffdlab {path}") for line in examples)
    assert "--lab PATH" in out


def test_top_level_help_lists_workflows_exit_status_and_completion(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert "common workflows:" in out and "  uffdlab run --list" in out
    assert "exit status:" in out
    assert 'eval "$(register-python-argcomplete uffdlab)"' in out


# -- --lab, --version, bad input ------------------------------------------------------

@pytest.mark.parametrize("argv, lab", [
    (["--lab", "a.yml", "status"], "a.yml"),
    (["status", "--lab", "b.yml"], "b.yml"),
    (["--lab", "a.yml", "status", "--lab", "b.yml"], "b.yml"),      # the later one wins
    (["status"], None),
    (["image", "build", "trixie", "--lab", "b.yml"], "b.yml"),
    (["--lab", "a.yml", "image", "list"], "a.yml"),
    (["run", "S3", "--lab", "b.yml", "--param", "writers=2"], "b.yml"),
    (["template", "rm", "--all", "--lab", "b.yml"], "b.yml"),
])
def test_lab_before_or_after_the_command(argv, lab):
    assert build_parser().parse_args(argv).lab == lab


def test_lab_after_the_command_is_the_one_loaded(tmp_path, capsys):
    good = tmp_path / "lab.yml"
    good.write_text(MINIMAL_LAB)
    code, out, err = run_cli(capsys, "--lab", str(tmp_path / "missing.yml"), "template",
                             "list", "--lab", str(good))
    assert code == 0, err
    assert out.startswith("template")
    code, _, err = run_cli(capsys, "status", "--lab", str(tmp_path / "missing.yml"))
    assert code == 2 and "missing.yml" in err


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out == f"uffdlab {__version__}\n" and __version__ == "0.1.0"


def test_bad_flag_value_is_one_line_naming_the_flag(capsys):
    code, _, err = run_cli(capsys, "run", "S3", "--timeout", "soon")
    assert code == 2
    assert err.splitlines()[-1] == ("uffdlab run: error: argument --timeout: invalid float "
                                    "value: 'soon'")


# -- shell completion ------------------------------------------------------------------

def test_completion_marker_is_where_argcomplete_looks():
    init = Path(cli.__file__).read_text()[:1024]
    assert init.startswith("# SPDX-License-Identifier: MIT\n")
    assert "PYTHON_ARGCOMPLETE_OK" in init


def test_main_hands_a_completion_request_to_argcomplete(monkeypatch, capsys):
    argcomplete = pytest.importorskip("argcomplete")
    seen = []
    monkeypatch.setattr(argcomplete, "autocomplete", lambda parser: seen.append(parser.prog))
    monkeypatch.setenv("_ARGCOMPLETE", "1")
    assert run_cli(capsys, "--version")[0] == 0
    assert seen == ["uffdlab"]


def test_completion_without_argcomplete_is_skipped(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "argcomplete", None)      # import raises ImportError
    monkeypatch.setenv("_ARGCOMPLETE", "1")
    assert run_cli(capsys, "--version") == (0, f"uffdlab {__version__}\n", "")


def test_completion_offers_subcommands(monkeypatch):
    argcomplete = pytest.importorskip("argcomplete")
    import io
    line = "uffdlab image b"
    monkeypatch.setenv("_ARGCOMPLETE", "1")
    monkeypatch.setenv("_ARGCOMPLETE_IFS", " ")
    monkeypatch.setenv("COMP_LINE", line)
    monkeypatch.setenv("COMP_POINT", str(len(line)))
    out = io.StringIO()
    exits = []
    argcomplete.autocomplete(build_parser(), output_stream=out, exit_method=exits.append)
    assert exits == [0] and out.getvalue().split() == ["build"]


# -- a RunResult in a notebook ---------------------------------------------------------

def test_run_result_repr_is_one_short_line():
    text = repr(make_result("1a2b3c4d5e6f"))
    assert "\n" not in text and len(text) < 200
    assert text == ("RunResult(S3 multi-writer on t-trixie, 6.12.38+deb13-cloud-amd64, tcg: "
                    "ok, consistent, snapshot 413 ms, p99 919 us, run 1a2b3c4d5e6f)")


def test_run_result_figures_are_the_results_tables_numbers():
    """One number formatter for the repr, the tables and the CLI."""
    from uffdlab import model, results
    assert results.format_number is model.format_number
    for _, path, _ in model.RunResult._DISPLAY_METRICS:
        assert path in results.METRICS.values()
    assert make_result("r", summary={"snapshot_ms": 12345.6})._metric("snapshot_ms") == "12,346"
    assert make_result("r", summary={"snapshot_ms": float("nan")})._metric("snapshot_ms") is None


def test_run_result_repr_of_inconsistent_and_failed_runs():
    s5 = make_result("r2", "S5", "unregistered-writer", SUMMARY_S5, expect_consistent=False)
    assert "S5 unregistered-writer" in repr(s5)
    assert "inconsistent, 2,048 mismatched pages (expected)" in repr(s5)
    unexpected = make_result("r4", summary=SUMMARY_S5)            # S3 expects consistent
    assert "(UNEXPECTED)" in repr(unexpected)
    failed = make_result("r3", summary=None, status="timeout",
                         error="timed out after 100 s\n" + "x" * 5000, vm="v" * 300)
    text = repr(failed)
    assert "\n" not in text and len(text) < 200
    assert "timeout: timed out after 100 s" in text and "run r3" in text


def test_run_result_html_escapes_every_string():
    evil = "<script>alert('x')</script>"
    res = make_result("<b>r1</b>", error=f"tool said {evil}\nand & more", vm=evil,
                      params={"note": evil})
    page = res._repr_html_()
    assert "<script>" not in page and "<b>r1</b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "and &amp; more" in page
    for row in ("verdict", "snapshot", "fault latency p99", "vm", "kernel", "accel",
                "guest tools", "run id", "started"):
        assert f">{row}</th>" in page
    assert len(page) < 4096


def test_runs_table_formats_the_metrics(tmp_path):
    with ResultsDB(tmp_path / "results.sqlite") as db:
        db.store(make_result("r1", started=1.0))
        db.store(make_result("r2", "S5", "unregistered-writer", SUMMARY_S5, started=2.0,
                             expect_consistent=False))
        db.store(make_result("r3", summary=None, status="timeout", started=3.0,
                             error="timed out after 100 s"))
        runs = db.frames().runs
    t = report.runs_table(runs)
    assert list(t["snapshot_ms"]) == ["413", "413", "–"]
    assert list(t["pause_ms"]) == ["7.42", "7.42", "–"]
    assert list(t["faults_total"]) == ["301", "59", "–"]
    assert list(t["mismatched_pages"]) == ["0", "2,048", "–"]
    assert t["verdict"].iloc[0] == "consistent ✓ as expected"
    assert runs["snapshot_ms"].dtype.kind == "f"                 # the input keeps numbers
