# SPDX-License-Identifier: MIT
"""The guest tools' sources depend on each other one way only.

A module is a src/NAME.c with its src/NAME.h.  Module A depends on module B
when A's object file uses a symbol B's defines (nm), and then A.c must
include B.h ("include only what you use": it calls only what its includes
declare).  The dependency graph must have no cycle, and uffd-snapshot's
objects are listed in the Makefile lowest layer first, the order README.md
describes.
"""
from __future__ import annotations

import re
import subprocess
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

from .conftest import TOOLS

pytestmark = pytest.mark.guest_tools

SRC = TOOLS / "src"
OBJ = TOOLS / "obj" / "release"
INCLUDE = re.compile(r'^#include "([\w.]+)"', re.M)
PROGRAMS = {"snapshot_main", "probe", "bench"}      # main() only: no header


def symbols(obj: Path, *flags: str) -> set[str]:
    out = subprocess.run(["nm", "-g", *flags, str(obj)], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def deps(tools) -> dict[str, set[str]]:
    """module -> the modules whose symbols it uses."""
    modules = sorted(p.stem for p in SRC.glob("*.c"))
    defined = {m: symbols(OBJ / f"{m}.o", "--defined-only") for m in modules}
    owner = {}
    for m, syms in defined.items():
        for s in syms - {"main"}:
            assert s not in owner, f"{s} defined in both {owner[s]}.c and {m}.c"
            owner[s] = m
    graph = {}
    for m in modules:
        used = symbols(OBJ / f"{m}.o", "--undefined-only")
        graph[m] = {owner[s] for s in used if s in owner and owner[s] != m}
    return graph


def includes(path: Path) -> set[str]:
    return set(INCLUDE.findall(path.read_text()))


def test_every_module_has_its_header(deps):
    for m in deps:
        if m not in PROGRAMS:
            assert (SRC / f"{m}.h").exists(), f"src/{m}.c has no src/{m}.h"
            assert f"{m}.h" in includes(SRC / f"{m}.c"), f"src/{m}.c does not include {m}.h"


def test_modules_form_a_dag(deps):
    try:
        order = list(TopologicalSorter(deps).static_order())
    except CycleError as e:
        pytest.fail(f"modules call each other in a circle: {' -> '.join(e.args[1])}")
    assert set(order) == set(deps)


def test_headers_form_a_dag():
    graph = {h.name: {i for i in includes(h) if (SRC / i).exists()} for h in SRC.glob("*.h")}
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"headers include each other in a circle: {' -> '.join(e.args[1])}")


def test_include_what_you_use(deps):
    """A.c calls B's functions only with B.h included: no hidden dependency."""
    for m, used in deps.items():
        missing = {f"{u}.h" for u in used} - includes(SRC / f"{m}.c")
        assert not missing, f"src/{m}.c uses {sorted(used)} but does not include {sorted(missing)}"


def snap_order() -> list[str]:
    """uffd-snapshot's modules in the Makefile's order."""
    text = (TOOLS / "Makefile").read_text()
    m = re.search(r"^SNAP_OBJS\s*:=((?:.*\\\n)*.*)$", text, re.M)
    assert m, "no SNAP_OBJS in the Makefile"
    common = re.search(r"^COMMON\s*:=(.*)$", text, re.M).group(1)
    objs = m.group(1).replace("\\\n", " ").replace("$(COMMON)", common).split()
    return [o.removesuffix(".o") for o in objs]


def test_makefile_lists_layers_in_order(deps):
    """SNAP_OBJS names each module after every module it depends on."""
    order = snap_order()
    for i, mod in enumerate(order):
        later = set(order[i + 1:]) & deps[mod]
        assert not later, f"{mod}.o is listed before {sorted(later)}, which it uses"


def test_readme_describes_that_order():
    text = (TOOLS / "README.md").read_text()
    m = re.search(r"^    (util <- .*?)\n\n", text, re.M | re.S)
    assert m, "README.md lacks the 'util <- ...' dependency line"
    assert re.split(r"\s*<-\s*", m.group(1).strip()) == snap_order()
