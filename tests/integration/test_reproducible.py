# SPDX-License-Identifier: MIT
"""Reproducible sessions on real images: lab.lock records every package,
a rebuild from it installs the same versions and names one the mirror
lacks; an exported image imported into a fresh lab with a cache of its
own boots there with that lab's own key and the same content; a tampered
archive is refused; a stored S3 run repeated as it was gives the same
verdict."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import VM_CPUS, VM_MEMORY, write_lab
from uffdlab.archive import export_image, import_image
from uffdlab.config import load_lab
from uffdlab.images import ImageError, ImageStore
from uffdlab.lock import Lock, lock_path
from uffdlab.model import Status
from uffdlab.rerun import rerun
from uffdlab.results import ResultsDB
from uffdlab.runner import run_and_store
from uffdlab.vm import VM

pytestmark = pytest.mark.integration


def cli(lab, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uffdlab", "--lab", str(lab.source), *args],
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def session_lock(test_lab):
    """`uffdlab lock` on the session's lab: every image with its packages."""
    r = cli(test_lab, "lock")
    assert r.returncode == 0, r.stderr[-2000:]
    return Lock.load(lock_path(test_lab.source))


@pytest.fixture(scope="module")
def other_lab(session_dir):
    """A lab of a colleague: its own cache dir (so its own SSH key) and a
    trixie image of the same recipe."""
    lab_file = session_dir / "colleague" / "lab.yml"
    lab_file.parent.mkdir()
    path = write_lab(lab_file, {"guest": {"image": "trixie", "memory": VM_MEMORY,
                                          "cpus": VM_CPUS}},
                     images={"trixie": {"suite": "trixie"}},
                     cache_dir=str(session_dir / "colleague" / "cache"))
    return load_lab(path)


@pytest.fixture(scope="module")
def archive(test_lab, session_dir):
    """The session's trixie image, exported once (no test depends on another's)."""
    ImageStore(test_lab).build("trixie")                 # cached: a lookup
    return export_image(ImageStore(test_lab), "trixie", session_dir / "trixie.uffdlab.tar")


def test_the_lock_records_every_package_of_every_image(test_lab, session_lock):
    trixie = session_lock.images["trixie"]
    img = ImageStore(test_lab).image("trixie")
    assert trixie.packages == img.packages and len(trixie.packages) > 100
    assert trixie.packages["openssh-server"] and trixie.kernel_release == img.kernel_release
    assert trixie.content_hash == img.content_hash
    assert session_lock.python["pydantic"] and session_lock.guest_tools


def test_a_rebuild_from_the_lock_has_the_same_packages_and_names_what_drifted(
        test_lab, session_lock, other_lab):
    """The colleague's lab, with the session's lock and one version the
    mirror cannot have: a real build pins the rest and names that one."""
    lock = session_lock.model_copy(deep=True)
    lock.images = {"trixie": lock.images["trixie"]}
    wanted = dict(lock.images["trixie"].packages)
    lock.images["trixie"].packages["openssh-server"] = "1:0.1-uffdlab-test"
    lock.save(lock_path(other_lab.source))
    events = []
    img = ImageStore(other_lab, events.append).build("trixie")
    assert img.meta["drift"] == [f"openssh-server: 1:0.1-uffdlab-test -> "
                                 f"{wanted['openssh-server']}"]
    assert img.packages == wanted                       # every other version as locked
    assert any(e.data.get("drift") for e in events)


def test_an_exported_image_boots_in_a_fresh_lab_with_the_same_content(
        test_lab, archive, session_dir, running_vms):
    """Imported into a lab of its own (its own lab dir, cache and so SSH key,
    nothing built there), the image boots as it was exported."""
    mine = ImageStore(test_lab).image("trixie")
    # under the short session dir: the VM's QMP socket path must fit in 108 bytes
    home = session_dir / "fresh"
    home.mkdir()
    fresh = load_lab(write_lab(home / "lab.yml",
                               {"guest": {"image": "trixie", "memory": VM_MEMORY,
                                          "cpus": VM_CPUS}},
                               images={"trixie": {"suite": "trixie"}},
                               cache_dir=str(home / "cache"), templates=False))
    assert not list((fresh.cache_path / "images").glob("*"))   # a genuinely empty cache
    desc, dest = import_image(fresh, archive)
    assert desc["content_hash"] == mine.content_hash
    theirs = ImageStore(fresh).image("trixie")
    assert theirs.dir == dest and theirs.content_hash == mine.content_hash
    assert ImageStore(fresh).keys.public_key() != ImageStore(test_lab).keys.public_key()
    vm = VM(fresh, "guest")
    try:
        st = vm.up()                                     # their key, on the command line
        assert st.image_key == mine.key and st.kernel_release == mine.kernel_release
        assert vm.session().run("cat /etc/hostname", check=True).stdout.strip() == "uffdlab"
    finally:
        vm.down()
    assert ImageStore(fresh).image("trixie").content_hash == mine.content_hash  # not rebuilt


def test_a_tampered_archive_is_refused_and_installs_nothing(session_dir, archive, other_lab):
    bad = session_dir / "tampered.tar"
    shutil.copy(archive, bad)
    with open(bad, "r+b") as f:                          # one byte inside the disk image
        f.seek(archive.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    fresh = other_lab.model_copy(update={"cache_dir": session_dir / "third-cache"})
    with pytest.raises(ImageError, match="refused, nothing installed: .*SHA-256"):
        import_image(fresh, bad)
    assert not any((session_dir / "third-cache" / "images").iterdir())


def test_rerun_of_a_stored_s3_run_gives_the_same_verdict_linked(test_lab, provisioned,
                                                                trixie_vm):
    first = run_and_store(trixie_vm, "S3", {"size": "16M", "duration": 1})
    assert first.status == Status.OK and first.image_content and first.qemu
    cmp = rerun(test_lab, first.run_id, times=2)
    assert cmp.same_verdict and [r.status for r in cmp.runs] == [Status.OK] * 2
    with ResultsDB(test_lab.results_path, readonly=True) as db:
        linked = [r["run_id"] for r in db.runs() if r["rerun_of"] == first.run_id]
    assert sorted(linked) == sorted(r.run_id for r in cmp.runs)
    assert json.dumps(cmp.table().to_dict())                 # a table a notebook shows


def test_the_snapshot_notebook_reruns_a_stored_run_and_plots_it(test_lab, provisioned,
                                                                trixie_vm, tmp_path):
    import papermill

    from uffdlab.paths import NOTEBOOKS
    from uffdlab.sweep import KERNEL

    first = run_and_store(trixie_vm, "S5", {"size": "16M", "duration": 1})
    out = tmp_path / "rerun.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / "10-snapshot.ipynb"), str(out),
                               kernel_name=KERNEL, progress_bar=False, cwd=str(NOTEBOOKS),
                               parameters={"lab_path": str(test_lab.source),
                                           "rerun_of": first.run_id, "rerun_times": 2})
    nb = json.loads(out.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    text = "".join("".join(o.get("text", "")) for o in outputs)
    assert f"rerun of {first.run_id} (S5 on " in text and "2 repeats, the same verdict" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4   # plots + comparison
    with ResultsDB(test_lab.results_path, readonly=True) as db:
        assert len([r for r in db.runs() if r["rerun_of"] == first.run_id]) == 2
