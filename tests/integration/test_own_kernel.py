# SPDX-License-Identifier: MIT
"""A contributor's own kernel, from a real tree to a verdict: Debian's
linux-source-6.12 (fetched through apt once, cached), built with the lab's
small config, booted without an initrd, probed, and run S3 and S5; then
the no-op rebuild, git bisect's exit codes, and a kernel that cannot boot."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import papermill
import pytest

from uffdlab.api import ready, run_and_store, vm_for
from uffdlab.config import load_lab
from uffdlab.images import ImageStore, is_bzimage
from uffdlab.kernel import KernelStore, read_config
from uffdlab.model import Kind, Status
from uffdlab.paths import NOTEBOOKS
from uffdlab.sweep import KERNEL
from uffdlab.vm import VM, VMError

from ..conftest import VM_CPUS, VM_MEMORY

pytestmark = pytest.mark.integration
RUN = {"size": "16M", "duration": "1"}


@pytest.fixture(scope="module")
def kernel_lab(session_dir, test_lab, early_kernel_build):
    """The session's kernel lab (conftest.write_kernel_lab), once the early
    build has finished; the rootfs (the shared trixie one) built too."""
    proc, log = early_kernel_build
    if proc.wait() != 0:
        pytest.fail(f"the early kernel build failed (exit {proc.returncode}):\n"
                    + log.read_text()[-3000:])
    lab = load_lab(session_dir / "kernel-lab.yml")
    ImageStore(lab).build("mine")            # the rootfs; the kernel is a no-op now
    return lab


@pytest.fixture(scope="module")
def built(kernel_lab):
    return KernelStore(kernel_lab).current("mine")


def test_the_tree_is_built_with_the_lab_config_and_headers(built):
    assert is_bzimage(built.bzimage)
    assert built.meta["release"].startswith("6.12")
    config = read_config(built.config)
    assert config["PTE_MARKER_UFFD_WP"] == "y" and config["USERFAULTFD"] == "y"
    with tarfile.open(built.headers_tar) as tar:
        assert "include/linux/userfaultfd.h" in tar.getnames()


def test_a_second_build_is_a_no_op(kernel_lab, built):
    events = []
    units = KernelStore(kernel_lab).build_dir("mine") / ".uffdlab-units"
    before = units.stat().st_mtime_ns
    again = KernelStore(kernel_lab, events.append).build("mine")
    assert again.dir == built.dir
    assert [e.data.get("cached") for e in events] == [True]       # make did not run
    assert not [e for e in events if e.kind == Kind.PROGRESS]
    assert units.stat().st_mtime_ns == before


def test_the_tree_kernel_boots_probes_and_runs(kernel_lab, built):
    vm = vm_for(kernel_lab, "mine", VM_MEMORY, VM_CPUS)
    try:
        st = ready(vm)
        assert st.kernel_release == built.meta["release"]
        features = st.facts["probe"]["features"]
        assert features["PAGEFAULT_FLAG_WP"] and features["WP_UNPOPULATED"]
        # the guest tools were built against this kernel's own headers
        out = vm.shared_session().run(
            f"test -f {kernel_lab.provision.tools_dir}/kernel-headers/include/linux/"
            f"userfaultfd.h && echo present", check=True)
        assert out.stdout.strip() == "present"
        s3 = run_and_store(vm, "S3", RUN)
        assert (s3.status, s3.as_expected) == (Status.OK, True), s3.error
        s5 = run_and_store(vm, "S5", RUN)
        assert (s5.status, s5.as_expected) == (Status.INCONSISTENT, True), s5.error
    finally:
        vm.down()


def bisect(lab, scenario: str, image: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uffdlab", "--lab", str(lab.source), "run",
                           scenario, "--image", image, "--bisect",
                           *[f"--param={k}={v}" for k, v in RUN.items()]],
                          capture_output=True, text=True, timeout=900)


def test_bisect_says_good_and_skip(kernel_lab, built):
    """0: the verdict is what S5 expects (inconsistent); 125: this commit
    cannot be tested because its config drops an option the lab needs."""
    good = bisect(kernel_lab, "S5", "mine")
    assert good.returncode == 0, good.stderr[-2000:]
    skip = bisect(kernel_lab, "S3", "broken")
    assert skip.returncode == 125, skip.stderr[-2000:]
    assert "CONFIG_USERFAULTFD is not set: no userfaultfd(2)" in skip.stderr
    assert not KernelStore(kernel_lab).current("broken").dir.exists()      # nothing cached


def test_a_kernel_without_its_root_device_fails_fast_with_the_console_line(kernel_lab, built):
    vm = VM.for_shape(kernel_lab, "noroot", "512M", 1)
    try:
        with pytest.raises(VMError, match="panicked") as err:
            vm.up()
        assert "VFS: Unable to mount root fs" in str(err.value)
    finally:
        vm.down()
    assert vm.state() is None


def test_my_kernel_notebook_compares_the_tree_with_debian(kernel_lab, built, tmp_path):
    out = tmp_path / "40.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / "40-my-kernel.ipynb"), str(out), kernel_name=KERNEL,
        progress_bar=False, cwd=str(NOTEBOOKS),
        parameters={"lab_path": str(kernel_lab.source), "tree": built.meta["tree"],
                    "scenarios": ["S3", "S5"], "size": "16M", "duration": 1.0})
    nb = json.loads(out.read_text())
    shown = "\n".join("".join(o.get("text", "")) + "".join(
        "".join(o.get("data", {}).get(m, "")) for m in ("text/html", "text/markdown"))
        for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))
    assert f"kernel {built.meta['release']}:" in shown          # the build cell: cached
    assert "consistent" in shown and "inconsistent" in shown     # the side-by-side table
    assert "WP_ASYNC" in shown                                   # the feature table
