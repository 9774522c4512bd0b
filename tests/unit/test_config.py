# SPDX-License-Identifier: MIT
"""lab.yml validation: every bad input earns one exact, located message per problem."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from uffdlab import cli
from uffdlab.config import ConfigError, Lab, lab_from_dict, load_lab, option_help, parse_size

REPO = Path(__file__).resolve().parents[2]

# Line numbers below refer to this text (1-based).
BASE = """\
accel: auto
cache_dir: cache
images:
  trixie:
    suite: trixie
vms:
  guest:
    image: trixie
    memory: 2G
    cpus: 2
"""
#  1 accel / 2 cache_dir / 3 images / 4 trixie / 5 suite / 6 vms / 7 guest /
#  8 image / 9 memory / 10 cpus

PROBLEM_LINE = re.compile(r"^(?P<file>[^:]+)(:(?P<line>\d+))?: (?P<rest>.+)$")


def _after_suite(extra: str) -> str:
    """BASE with `extra` (lines of the trixie image) inserted at line 6."""
    return BASE.replace("    suite: trixie\n", "    suite: trixie\n" + extra)


def _problems(tmp_path: Path, text: str) -> tuple[str, list[str]]:
    path = tmp_path / "lab.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_lab(path)
    return str(path), exc.value.problems


# (id, lab text, expected problem lines with {f} for the file)
BAD = [
    ("unknown-top-accell", BASE.replace("accel: auto", "accell: auto"),
     ["{f}:1: accell: unknown key 'accell' (did you mean 'accel'?)"]),
    ("unknown-image-disk_siz", _after_suite("    disk_siz: 4G\n"),
     ["{f}:6: images.trixie.disk_siz: unknown key 'disk_siz' (did you mean 'disk_size'?)"]),
    ("unknown-vm-memroy", BASE.replace("memory: 2G", "memroy: 2G"),
     ["{f}:9: vms.guest.memroy: unknown key 'memroy' (did you mean 'memory'?)"]),
    ("unknown-kernel-pacakge", _after_suite("    kernel: {pacakge: linux-image-amd64}\n"),
     ["{f}:6: images.trixie.kernel.pacakge: unknown key 'pacakge' (did you mean 'package'?)"]),
    ("unknown-provision-hugepage", BASE + "provision:\n  hugepage: 2\n",
     ["{f}:12: provision.hugepage: unknown key 'hugepage' (did you mean 'hugepages'?)"]),
    ("unknown-far-from-any", BASE + "flavour: blue\n",
     ["{f}:11: flavour: unknown key 'flavour'"]),
    ("size-lots", BASE.replace("memory: 2G", "memory: lots"),
     ["{f}:9: vms.guest.memory: expected a size like 2G, got 'lots'"]),
    ("size-negative", BASE.replace("memory: 2G", "memory: -1"),
     ["{f}:9: vms.guest.memory: expected a positive size like 2G, got -1"]),
    ("size-zero", BASE.replace("memory: 2G", "memory: 0"),
     ["{f}:9: vms.guest.memory: expected a positive size like 2G, got 0"]),
    ("size-bad-unit", BASE.replace("memory: 2G", "memory: 2X"),
     ["{f}:9: vms.guest.memory: expected a size like 2G, got '2X'"]),
    ("size-bool", BASE.replace("memory: 2G", "memory: yes"),
     ["{f}:9: vms.guest.memory: expected a size like 2G, got True"]),
    ("disk-size-lots", _after_suite("    disk_size: lots\n"),
     ["{f}:6: images.trixie.disk_size: expected a size like 2G, got 'lots'"]),
    ("cpus-zero", BASE.replace("cpus: 2", "cpus: 0"),
     ["{f}:10: vms.guest.cpus: expected a number of at least 1, got 0"]),
    ("cpus-hundred", BASE.replace("cpus: 2", "cpus: 100"),
     ["{f}:10: vms.guest.cpus: expected a number of at most 64, got 100"]),
    ("cpus-two", BASE.replace("cpus: 2", "cpus: two"),
     ["{f}:10: vms.guest.cpus: expected a whole number, got 'two'"]),
    ("boot-timeout-negative", BASE.replace("cpus: 2", "cpus: 2\n    boot_timeout: -5"),
     ["{f}:11: vms.guest.boot_timeout: expected a number greater than 0, got -5"]),
    # YAML's yes/true and .inf are not numbers a lab means
    ("cpus-yes", BASE.replace("cpus: 2", "cpus: yes"),
     ["{f}:10: vms.guest.cpus: expected a whole number, got True"]),
    ("cpus-float", BASE.replace("cpus: 2", "cpus: 2.5"),
     ["{f}:10: vms.guest.cpus: expected a whole number, got 2.5"]),
    ("hugepages-true", BASE + "provision:\n  hugepages: true\n",
     ["{f}:12: provision.hugepages: expected a whole number, got True"]),
    ("unprivileged-yes", BASE + "provision:\n  unprivileged_userfaultfd: yes\n",
     ["{f}:12: provision.unprivileged_userfaultfd: expected 0 or 1, got True"]),
    ("boot-timeout-inf", BASE.replace("cpus: 2", "cpus: 2\n    boot_timeout: .inf"),
     ["{f}:11: vms.guest.boot_timeout: expected a finite number, got inf"]),
    ("boot-timeout-nan", BASE.replace("cpus: 2", "cpus: 2\n    boot_timeout: .nan"),
     ["{f}:11: vms.guest.boot_timeout: expected a finite number, got nan"]),
    ("boot-timeout-day", BASE.replace("cpus: 2", "cpus: 2\n    boot_timeout: 100000"),
     ["{f}:11: vms.guest.boot_timeout: expected a number of at most 86400, got 100000"]),
    ("boot-timeout-yes", BASE.replace("cpus: 2", "cpus: 2\n    boot_timeout: yes"),
     ["{f}:11: vms.guest.boot_timeout: expected a number, got True"]),
    ("disk-size-huge", _after_suite("    disk_size: 999999999T\n"),
     ["{f}:6: images.trixie.disk_size: expected at most 16T for the root disk, "
      "got 999999999T"]),
    ("kernel-package-injection",
     _after_suite('    kernel: {package: "linux-image-amd64,netcat-openbsd --evil"}\n'),
     ["{f}:6: images.trixie.kernel.package: expected a Debian package name like linux-perf "
      "(lowercase letters, digits, + - .), got 'linux-image-amd64,netcat-openbsd --evil'"]),
    ("kernel-cmdline-newline", _after_suite('    kernel: {cmdline: "quiet\\ninit=/bin/sh"}\n'),
     ["{f}:6: images.trixie.kernel.cmdline: expected text without control characters or "
      "line breaks, got 'quiet\\ninit=/bin/sh'"]),
    ("vm-cmdline-escape", BASE.replace("cpus: 2", 'cpus: 2\n    cmdline: "a\\x1bb"'),
     ["{f}:11: vms.guest.cmdline: expected text without control characters or "
      "line breaks, got 'a\\x1bb'"]),
    ("cache-dir-newline", BASE.replace("cache_dir: cache", 'cache_dir: "ca\\nche"'),
     ["{f}:2: cache_dir: expected text without control characters or line breaks, "
      "got 'ca\\nche'"]),
    ("tools-dir-star", BASE + "provision:\n  tools_dir: '/*'\n",
     ["{f}:12: provision.tools_dir: expected an absolute path of letters, digits and "
      ". _ - / like /opt/uffdlab, got '/*'"]),
    ("tools-dir-semicolon", BASE + "provision:\n  tools_dir: '/opt/x;rm -rf /'\n",
     ["{f}:12: provision.tools_dir: expected an absolute path of letters, digits and "
      ". _ - / like /opt/uffdlab, got '/opt/x;rm -rf /'"]),
    ("tools-dir-dollar", BASE + "provision:\n  tools_dir: '$(reboot)'\n",
     ["{f}:12: provision.tools_dir: expected an absolute path of letters, digits and "
      ". _ - / like /opt/uffdlab, got '$(reboot)'"]),
    ("tools-dir-backticks", BASE + "provision:\n  tools_dir: '/opt/`reboot`'\n",
     ["{f}:12: provision.tools_dir: expected an absolute path of letters, digits and "
      ". _ - / like /opt/uffdlab, got '/opt/`reboot`'"]),
    ("tools-dir-relative", BASE + "provision:\n  tools_dir: relative/path\n",
     ["{f}:12: provision.tools_dir: expected an absolute path of letters, digits and "
      ". _ - / like /opt/uffdlab, got 'relative/path'"]),
    ("tools-dir-space", BASE + "provision:\n  tools_dir: '/opt/a b'\n",
     ["{f}:12: provision.tools_dir: expected an absolute path of letters, digits and "
      ". _ - / like /opt/uffdlab, got '/opt/a b'"]),
    ("tools-dir-dotdot", BASE + "provision:\n  tools_dir: /opt/../etc\n",
     ["{f}:12: provision.tools_dir: expected a plain absolute path (no '.', '..', '//' or "
      "trailing '/'), got '/opt/../etc'"]),
    ("tools-dir-trailing", BASE + "provision:\n  tools_dir: /opt/x/\n",
     ["{f}:12: provision.tools_dir: expected a plain absolute path (no '.', '..', '//' or "
      "trailing '/'), got '/opt/x/'"]),
    ("tools-dir-double", BASE + "provision:\n  tools_dir: /opt//x\n",
     ["{f}:12: provision.tools_dir: expected a plain absolute path (no '.', '..', '//' or "
      "trailing '/'), got '/opt//x'"]),
    ("tools-dir-dot", BASE + "provision:\n  tools_dir: /opt/./x\n",
     ["{f}:12: provision.tools_dir: expected a plain absolute path (no '.', '..', '//' or "
      "trailing '/'), got '/opt/./x'"]),
    ("tools-dir-system-root", BASE + "provision:\n  tools_dir: /\n",
     ["{f}:12: provision.tools_dir: expected a directory of the lab's own (the playbook "
      "empties it), not a system directory, got '/'"]),
    ("tools-dir-system-usr", BASE + "provision:\n  tools_dir: /usr\n",
     ["{f}:12: provision.tools_dir: expected a directory of the lab's own (the playbook "
      "empties it), not a system directory, got '/usr'"]),
    ("tools-dir-system-tmp", BASE + "provision:\n  tools_dir: /tmp/\n",
     ["{f}:12: provision.tools_dir: expected a directory of the lab's own (the playbook "
      "empties it), not a system directory, got '/tmp/'"]),
    ("tools-dir-system-etc-sub", BASE + "provision:\n  tools_dir: /etc/ssh\n",
     ["{f}:12: provision.tools_dir: expected a directory of the lab's own (the playbook "
      "empties it), not a system directory, got '/etc/ssh'"]),
    ("tools-dir-system-opt", BASE + "provision:\n  tools_dir: /opt\n",
     ["{f}:12: provision.tools_dir: expected a directory of the lab's own (the playbook "
      "empties it), not a system directory, got '/opt'"]),
    # PyYAML silently keeps the last of two equal keys; a lab loses nothing
    ("duplicate-top-key", BASE + "vms:\n  other:\n    image: trixie\n",
     ["{f}:11: vms: duplicate key 'vms' (first at line 6)"]),
    ("duplicate-nested-key", BASE.replace("    cpus: 2", "    cpus: 2\n    memory: 4G"),
     ["{f}:11: vms.guest.memory: duplicate key 'memory' (first at line 9)"]),
    ("alias-cycle", BASE + "provision: &p\n  hugepages: *p\n",
     ["{f}:12: provision.hugepages: expected an alias to a finished node, got *p inside "
      "its own anchor (a cycle)"]),
    ("accel-fast", BASE.replace("accel: auto", "accel: fast"),
     ["{f}:1: accel: expected 'auto', 'kvm' or 'tcg', got 'fast'"]),
    ("vm-missing-image", BASE.replace("image: trixie", "image: sid"),
     ["{f}:8: vms.guest.image: expected the name of an image (trixie), got 'sid'"]),
    ("vm-misspelt-image", BASE.replace("image: trixie", "image: trixi"),
     ["{f}:8: vms.guest.image: expected the name of an image (trixie), got 'trixi' "
      "(did you mean 'trixie'?)"]),
    ("images-empty", "images: {}\nvms:\n  guest:\n    image: trixie\n",
     ["{f}:1: images: expected at least one image, got none"]),
    ("vms-empty", BASE.split("vms:")[0] + "vms: {}\n",
     ["{f}:6: vms: expected at least one VM, got none"]),
    ("images-not-mapping", BASE.replace("  trixie:\n    suite: trixie\n", "  - trixie\n"),
     ["{f}:3: images: expected a mapping of names to entries, got ['trixie']"]),
    ("vm-not-mapping", BASE.split("vms:")[0] + "vms:\n  guest: trixie\n",
     ["{f}:7: vms.guest: expected a mapping of settings, got 'trixie'"]),
    ("vm-bad-name", BASE.replace("  guest:", "  Guest VM:"),
     ["{f}:7: vms.Guest VM: expected a short VM name (lowercase letters, digits, _ and -, "
      "up to 32 characters), got 'Guest VM'"]),
    ("suite-missing", BASE.replace("    suite: trixie\n", "    disk_size: 4G\n"),
     ["{f}:4: images.trixie.suite: required, but missing from images.trixie"]),
    ("kernel-package-and-vmlinuz",
     _after_suite("    kernel: {package: linux-image-amd64, vmlinuz: /boot/vmlinuz}\n"),
     ["{f}:6: images.trixie.kernel: expected one of 'package', 'vmlinuz' or 'tree', got "
      "package 'linux-image-amd64' and vmlinuz '/boot/vmlinuz'"]),
    ("kernel-tree-and-package",
     _after_suite("    kernel: {package: linux-image-amd64, tree: ~/src/linux}\n"),
     ["{f}:6: images.trixie.kernel: expected one of 'package', 'vmlinuz' or 'tree', got "
      "package 'linux-image-amd64' and tree '~/src/linux'"]),
    ("kernel-initrd-without-vmlinuz", _after_suite("    kernel: {initrd: /boot/initrd.img}\n"),
     ["{f}:6: images.trixie.kernel: expected 'initrd' only with a local 'vmlinuz', got "
      "initrd '/boot/initrd.img' and no vmlinuz (a packaged kernel brings its own initrd; "
      "a tree's kernel boots without one)"]),
    ("suite-bad-name", BASE.replace("suite: trixie", "suite: Trixie!"),
     ["{f}:5: images.trixie.suite: expected a Debian suite name like trixie, got 'Trixie!'"]),
    ("package-bad-name", _after_suite("    packages:\n      - vim\n      - Bad Name\n"),
     ["{f}:8: images.trixie.packages.1: expected a Debian package name like linux-perf "
      "(lowercase letters, digits, + - .), got 'Bad Name'"]),
    ("disk-under-2G", _after_suite("    disk_size: 1G\n"),
     ["{f}:6: images.trixie.disk_size: expected at least 2G for the root disk, got 1G"]),
    ("memory-under-256M", BASE.replace("memory: 2G", "memory: 128M"),
     ["{f}:9: vms.guest.memory: expected between 256M and 1T of memory, got 128M"]),
    ("provision-unprivileged-2", BASE + "provision:\n  unprivileged_userfaultfd: 2\n",
     ["{f}:12: provision.unprivileged_userfaultfd: expected 0 or 1, got 2"]),
    ("provision-mode-777", BASE + "provision:\n  dev_userfaultfd_mode: '777'\n",
     ["{f}:12: provision.dev_userfaultfd_mode: expected an octal mode of 4 digits like "
      "'0666', got '777'"]),
    ("provision-mode-unquoted", BASE + "provision:\n  dev_userfaultfd_mode: 0666\n",
     ["{f}:12: provision.dev_userfaultfd_mode: expected a quoted octal mode like '0666', "
      "got 438 (YAML reads an unquoted 0666 as the number 438: quote it)"]),
    ("provision-hugepages-negative", BASE + "provision:\n  hugepages: -2\n",
     ["{f}:12: provision.hugepages: expected a number of at least 0, got -2"]),
    ("not-a-mapping", "- images\n- vms\n",
     ["{f}: expected a mapping of lab settings (images, vms, ...), got a list: "
      "['images', 'vms']"]),
    ("empty-file", "# nothing here\n",
     ["{f}: expected a mapping of lab settings (images, vms, ...), got an empty file"]),
    ("invalid-yaml", "images: [\n",
     ["{f}:2: not valid YAML: while parsing a flow node expected the node content, "
      "but found '<stream end>' (column 1)"]),
    ("several-problems-all-reported",
     BASE.replace("accel: auto", "accell: auto").replace("memory: 2G", "memory: lots")
         .replace("cpus: 2", "cpus: 0").replace("image: trixie", "image: sid"),
     ["{f}:9: vms.guest.memory: expected a size like 2G, got 'lots'",
      "{f}:10: vms.guest.cpus: expected a number of at least 1, got 0",
      "{f}:1: accell: unknown key 'accell' (did you mean 'accel'?)",
      "{f}:8: vms.guest.image: expected the name of an image (trixie), got 'sid'"]),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BAD], ids=[i for i, _, _ in BAD])
def test_bad_lab_exact_messages(tmp_path, text, expected):
    f, problems = _problems(tmp_path, text)
    assert problems == [e.format(f=f) for e in expected]
    for line in problems:
        assert "\n" not in line
        m = PROBLEM_LINE.match(line)
        assert m and m["file"] == f, line


@pytest.mark.parametrize("text", [t for _, t, _ in BAD], ids=[i for i, _, _ in BAD])
def test_line_numbers_point_at_the_offending_line(tmp_path, text):
    """Where a line is given, that line holds the key the message names (or, for a
    missing key, the entry that lacks it); for the YAML error, the line past the end."""
    f, problems = _problems(tmp_path, text)
    lines = text.splitlines()
    for problem in problems:
        m = PROBLEM_LINE.match(problem)
        if not m["line"] or "not valid YAML" in problem:
            continue
        path = m["rest"].split(": ", 1)[0].split(".")
        key = path[-1] if not path[-1].isdigit() else None
        source = lines[int(m["line"]) - 1]
        if key is None:                       # a list item
            assert source.lstrip().startswith("- "), (problem, source)
        elif "required, but missing" in problem:
            assert source.strip().startswith(path[-2] + ":"), (problem, source)
        else:
            assert re.search(rf"(^|[{{,]\s*){re.escape(key)}:", source.strip()), \
                (problem, source)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yml"
    with pytest.raises(ConfigError) as exc:
        load_lab(path)
    assert exc.value.problems == [f"{path}: cannot read the lab file: No such file or directory"]


def test_reserved_source_key(tmp_path):
    f, problems = _problems(tmp_path, BASE + "source: elsewhere.yml\n")
    assert problems == [f"{f}: source: unknown key 'source'"]


def test_lab_from_dict_labels_with_source():
    with pytest.raises(ConfigError) as exc:
        lab_from_dict({"images": {}, "vms": {}}, source=Path("my/lab.yml"))
    assert exc.value.problems == ["my/lab.yml: images: expected at least one image, got none",
                                  "my/lab.yml: vms: expected at least one VM, got none"]


@pytest.mark.parametrize("text,nbytes", [("2G", 2 << 30), ("512M", 512 << 20),
                                         ("4096K", 4 << 20), ("1T", 1 << 40),
                                         ("2GiB", 2 << 30), (" 3 g ", 3 << 30), (4096, 4096)])
def test_parse_size_good(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("value", ["lots", "-1", "0", "2X", "", "1.5G", True, 0, -5, None])
def test_parse_size_bad(value):
    with pytest.raises(ValueError, match=r"expected a (positive )?size like 2G, got "):
        parse_size(value)


def test_cli_exits_2_with_one_line_per_problem(tmp_path, capsys):
    text = (BASE.replace("accel: auto", "accell: auto").replace("memory: 2G", "memory: lots")
            .replace("cpus: 2", "cpus: 0"))
    path = tmp_path / "lab.yml"
    path.write_text(text)
    assert cli.main(["--lab", str(path), "status"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}:9: vms.guest.memory: expected a size like 2G, got 'lots'",
        f"{path}:10: vms.guest.cpus: expected a number of at least 1, got 0",
        f"{path}:1: accell: unknown key 'accell' (did you mean 'accel'?)",
    ]


@pytest.mark.parametrize("argv", [["status"], ["up", "--dry-run"], ["down", "--all"],
                                  ["image", "list"], ["image", "build"]])
def test_every_command_exits_2_on_a_bad_lab(tmp_path, capsys, argv):
    path = tmp_path / "lab.yml"
    path.write_text("- not a lab\n")
    assert cli.main(["--lab", str(path), *argv]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: expected a mapping of lab settings (images, vms, ...), got a list: "
        "['not a lab']"]


def test_cli_missing_lab_file(tmp_path, capsys):
    path = tmp_path / "absent.yml"
    assert cli.main(["--lab", str(path), "status"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: cannot read the lab file: No such file or directory"]


def test_shipped_lab_loads():
    lab = load_lab(REPO / "lab.yml")
    assert isinstance(lab, Lab)
    assert set(lab.images) == {"trixie", "bookworm"}
    assert lab.images["trixie"].suite == "trixie"
    assert lab.images["bookworm"].suite == "bookworm"
    assert len(lab.vms) == 1
    name, vm = lab.vm_spec(None)
    assert vm.image in lab.images
    assert lab.accel in ("auto", "kvm", "tcg")


def test_relative_paths_resolve_against_the_lab_file(tmp_path):
    path = tmp_path / "sub" / "lab.yml"
    path.parent.mkdir()
    path.write_text(BASE)
    lab = load_lab(path)
    assert lab.cache_path == path.parent / "cache"
    assert lab.results_path == path.parent / "results" / "lab.sqlite"


def test_unknown_vm_and_image_names_suggest(tmp_path):
    path = tmp_path / "lab.yml"
    path.write_text(BASE)
    lab = load_lab(path)
    with pytest.raises(ConfigError) as exc:
        lab.vm_spec("gest")
    assert exc.value.problems == ["lab.yml: no VM named 'gest' (did you mean 'guest'?)"]
    with pytest.raises(ConfigError) as exc:
        lab.image_spec("trixy")
    assert exc.value.problems == ["lab.yml: no image named 'trixy' (did you mean 'trixie'?)"]


def test_option_help_documents_every_option():
    rows = {key: (default, text) for key, default, text in option_help()}
    for key in ("accel", "cache_dir", "images.<name>.suite", "images.<name>.kernel.vmlinuz",
                "images.<name>.disk_size", "vms.<name>.memory", "vms.<name>.cpus",
                "provision.dev_userfaultfd_mode"):
        assert key in rows and rows[key][1], key
    assert "source" not in rows
