# SPDX-License-Identifier: MIT
"""A stored run --the same image, kernel, tools and parameters--> N new
runs, stored linked to it (`rerun_of`) --> a comparison: is the verdict the
same, and is each metric of the original within the run-to-run spread of
the repeats?

A rerun refuses to start when what the stored run recorded about its
guest differs from what would run now (the image's content, the kernel
build, the guest tools, QEMU, the accelerator): that would be a new
experiment, not a repetition. It runs in a fresh VM of the original's
shape, restored from the shape's template when there is one, and stopped
afterwards.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from . import accel, runner
from .config import Lab, parse_size
from .events import Listener
from .model import RunResult, Status
from .results import ResultsDB
from .tools import tools_digest
from .vm import VM, kernel_digest

# The metrics a comparison looks at (results columns; see results.METRICS).
COMPARED = ("snapshot_ms", "faults_total", "lat_p50_us", "lat_p99_us", "stall_max_ms",
            "mismatched_pages")
SHAPE_NAME = re.compile(r"nb-(?P<image>.+)-(?P<memory>\d+[kmgt])-(?P<cpus>\d+)c(-[0-9a-f]+)?")


class RerunError(Exception):
    pass


@dataclass
class MetricRow:
    metric: str
    original: float | None
    repeats: list[float | None]

    @property
    def spread(self) -> tuple[float, float] | None:
        """The repeats' (min, max); None with fewer than two values (a
        repeat without the metric, a failed one, does not count): one value
        has no spread."""
        values = [v for v in self.repeats if v is not None]
        return (min(values), max(values)) if len(values) >= 2 else None

    @property
    def within(self) -> bool | None:
        """Whether the original lies within the repeats' range (None without
        an original value or a spread)."""
        spread = self.spread
        if self.original is None or spread is None:
            return None
        return spread[0] <= self.original <= spread[1]


@dataclass
class Comparison:
    original: dict[str, Any]                 # the stored run (ResultsDB.get)
    runs: list[RunResult] = field(default_factory=list)

    @property
    def same_verdict(self) -> bool:
        """Every repeat finished with the original's status and verdict
        (False without repeats: nothing repeated it)."""
        return bool(self.runs) and all(
            str(r.status) == str(self.original["status"])
            and r.consistent == self.original.get("consistent") for r in self.runs)

    @property
    def all_ran(self) -> bool:
        """Every repeat finished with a verdict (none failed or timed out;
        False without repeats)."""
        return bool(self.runs) and all(r.status in (Status.OK, Status.INCONSISTENT)
                                       for r in self.runs)

    @property
    def rows(self) -> list[MetricRow]:
        from .results import METRICS
        out = []
        for col in COMPARED:
            path = METRICS[col]
            values = []
            for r in self.runs:
                v: Any = r.summary or {}
                for key in path:
                    v = v.get(key) if isinstance(v, dict) else None
                values.append(v)
            out.append(MetricRow(col, self.original.get(col), values))
        return out

    def table(self):
        """The comparison as a DataFrame: one row per metric."""
        import pandas as pd

        rows = []
        for m in self.rows:
            spread = m.spread
            rows.append({"metric": m.metric, "original": m.original,
                         "repeats": ", ".join("–" if v is None else f"{v:g}"
                                              for v in m.repeats),
                         "spread": "–" if spread is None else f"{spread[0]:g} .. {spread[1]:g}",
                         "original within": {True: "yes", False: "NO", None: "–"}[m.within]})
        return pd.DataFrame(rows).set_index("metric")

    def summary(self) -> str:
        o = self.original
        verdict = "the same verdict" if self.same_verdict else "a DIFFERENT verdict"
        outside = [m.metric for m in self.rows if m.within is False]
        return (f"rerun of {o['run_id']} ({o['scenario']} on {o['kernel']}): "
                f"{len(self.runs)} repeats, {verdict}"
                + (f"; outside the repeats' spread: {', '.join(outside)}" if outside else
                   "; every metric within the repeats' spread" if len(self.runs) > 1 else
                   "; one repeat has no spread (it takes at least 2: --times 3)"))


def stored_run(lab: Lab, run_id: str) -> dict[str, Any]:
    with ResultsDB(lab.results_path, readonly=True) as db:
        return db.get(run_id)


def vm_of(lab: Lab, stored: dict[str, Any], listener: Listener | None = None) -> VM:
    """A fresh VM of the stored run's shape: its lab.yml VM's (when that
    still boots the run's image), or the shape its notebook name carries
    (nb-IMAGE-MEMORY-CPUSc, see VM.for_shape), else a VM of the image's
    default shape."""
    image = stored["image"]
    spec = lab.vms.get(stored["vm"])
    if spec is not None and spec.image == image:
        vm = VM.for_shape(lab, image, spec.memory, spec.cpus, listener=listener, fresh=True)
        # the lab file's VM may add to the kernel command line: keep its whole spec
        full = VM(vm.lab.model_copy(update={"vms": {**vm.lab.vms, vm.name: spec}}), vm.name,
                  listener)
        full.owner = vm.owner
        return full
    m = SHAPE_NAME.fullmatch(stored["vm"] or "")
    # for_shape names a VM after the image lower-cased, other characters as '-'
    if m and m["image"] == re.sub(r"[^a-z0-9-]", "-", image.lower()):
        return VM.for_shape(lab, image, parse_size(m["memory"].upper()), int(m["cpus"]),
                            listener=listener, fresh=True)
    return VM.for_shape(lab, image, listener=listener, fresh=True)


def check_unchanged(vm: VM, stored: dict[str, Any]) -> None:
    """Refuse when the guest would differ from the one the run recorded.
    What a run did not record (an older run) is not compared."""
    img = vm.images.build(vm.spec.image)
    content = img.content_hash + (f"+{kernel_digest(img)}" if kernel_digest(img) else "")
    # with accel auto this may probe KVM (a few seconds), as the boot would
    choice = vm.choose_accel()
    now = {"image_content": content, "tools_digest": tools_digest(),
           "qemu": accel.qemu_version(), "accel": choice.accel}
    names = {"image_content": "the image's content (and kernel build)",
             "tools_digest": "the guest tools", "qemu": "QEMU", "accel": "the accelerator"}
    changed = [k for k in now if stored.get(k) and stored[k] != now[k]]
    if not changed:
        return
    fixes = []
    if set(changed) - {"accel"}:
        fixes.append("rebuild with 'uffdlab image build --locked', or import the image it "
                     "used ('uffdlab image import')")
    if "accel" in changed:
        # timings under TCG and KVM are not comparable: only the same accel repeats a run
        fixes.append(f"run it under {stored['accel']} ({vm.lab.source.name} says accel: "
                     f"{vm.lab.accel}; {choice.reason})")
    raise RerunError(f"run {stored['run_id']} cannot be repeated as it was: "
                     + "; ".join(f"{names[k]}: {stored[k]} then, {now[k]} now"
                                 for k in changed)
                     + ". To repeat it, " + "; ".join(fixes))


def plan_rerun(lab: Lab, run_id: str, listener: Listener | None = None
               ) -> tuple[VM, dict[str, Any], runner.Prepared]:
    """The fresh VM, the stored run and its scenario and parameters checked
    again, before anything boots."""
    stored = stored_run(lab, run_id)
    vm = vm_of(lab, stored, listener)
    check_unchanged(vm, stored)
    return vm, stored, runner.prepare(vm, stored["scenario"], stored["params"])


def rerun(lab: Lab, run_id: str, times: int = 3,
          listener: Listener | None = None) -> Comparison:
    """Run a stored run again `times` times, store the repeats linked to it,
    and compare (a spread, to hold the original against, takes 2 or more)."""
    if not 1 <= times <= 100:
        raise RerunError(f"--times: expected 1 to 100 repeats, got {times}")
    vm, stored, prep = plan_rerun(lab, run_id, listener)
    cmp = Comparison(stored)
    try:
        for _ in range(times):
            cmp.runs.append(runner.run_and_store(vm, prep.scenario.id, prep.params,
                                                 prep.timeout, rerun_of=stored["run_id"]))
    finally:
        vm.down()
    return cmp
