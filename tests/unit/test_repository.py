# SPDX-License-Identifier: MIT
"""Habits the repository keeps: notebooks stored without outputs, nothing
cited from outside the repository, modules that import one way."""
from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from uffdlab.paths import NOTEBOOKS, REPO


def tracked(*patterns: str) -> list[str]:
    return subprocess.run(["git", "ls-files", "--", *patterns], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.split()


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebooks_are_stored_without_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{name} has outputs"
            assert cell.get("execution_count") is None, f"{name} has execution counts"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one 'parameters' cell"


def test_nothing_cites_files_outside_the_repository():
    # the needles are split so this file does not cite them itself
    needles = ("../" + "shared", "shared/" + "reference", "DESIGN" + ".md")
    found = []
    for path in tracked():
        p = REPO / path
        if not p.is_file() or p.suffix in (".png", ".qcow2"):
            continue
        text = p.read_text(errors="replace")
        found += [f"{path}: {n}" for n in needles if n in text]
    assert not found, "\n".join(found)


def test_package_modules_do_not_import_each_other_in_a_circle():
    mods = {}
    for path in tracked("uffdlab/*.py", "uffdlab/**/*.py"):
        parts = path[:-3].split("/")
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = (REPO / path, parts[-1] == "__init__")
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        pkg = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
                for target in [base] + [f"{base}.{a.name}" for a in node.names]:
                    while target and target not in mods:
                        target = target.rpartition(".")[0]
                    if target and target != mod and target != "uffdlab" \
                            and not mod.startswith(target + "."):
                        graph[mod].add(target)
    circles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a in graph.get(b, ()))
    assert not circles, circles


def test_readme_lab_yml_reference_lists_every_option():
    """Every option is declared once, in config.py: the README table follows it."""
    import re

    from uffdlab.config import option_help
    text = (REPO / "README.md").read_text()
    section = text[text.index("## lab.yml reference"):]
    section = section[:section.index("\n## ", 3)]
    documented = set(re.findall(r"^\| `([^`]+)` \|", section, re.M))
    # leaves only: a section (images.<name>, provision) is documented by its keys
    declared = {key for key, _, _ in option_help()}
    leaves = {k for k in declared if not any(o.startswith(k + ".") for o in declared)}
    assert documented == leaves, (sorted(leaves - documented), sorted(documented - leaves))


def test_the_report_layer_stays_light():
    """Notebooks and reports import without SSH or Ansible."""
    code = ("import sys, uffdlab.report, uffdlab.results, uffdlab.model; "
            "print(sorted(m for m in ('paramiko', 'ansible_runner') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]"


def test_every_source_file_carries_an_spdx_tag():
    sources = tracked("*.py", "*.c", "*.h", "*.sh", "guest-tools/Makefile", "lab", ".ci/run",
                      "playbooks/*.yml")
    untagged = [p for p in sources
                if "SPDX-License-Identifier: MIT" not in "".join(
                    (REPO / p).read_text().splitlines(keepends=True)[:3])]
    assert not untagged, untagged
