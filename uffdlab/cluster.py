# SPDX-License-Identifier: MIT
"""sweep points --Dask distributed--> workers, each running a point whole
--PointOutcome--> the client, which alone stores runs and writes files.

A point runs entirely on its worker: the image (built once per host and
cached there), a fresh VM restored from the shape's template, papermill and
the run. The notebook stores the run in a scratch database of its own; the
worker reads it back and returns it with the executed notebook. The client
then keeps a journal entry (`point-NNN.run.json`), stores the run in the
lab's one database (once: a run id already there is not stored again), and
records the point in index.json. A resumed sweep adopts journalled points
instead of running them again.

Scheduling is Dask's: every point asks for one `vm_slots` resource, so a
worker never runs more VMs than it advertises. A point whose worker dies is
rescheduled by the scheduler (up to its `distributed.scheduler.allowed-failures`,
which the clusters started here set from `cluster.retries`); a point that
fails for a reason of its own comes back as a failed PointResult and is
never retried. Workers report what they do as events on the topic
`uffdlab`; the client renders them, with points done, running and failed
per host.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ClusterSpec, Lab, load_lab
from .events import Emitter, Event, Listener
from .model import Kind, Status
from .owned import process_scratch, reap_scratch

if TYPE_CHECKING:
    from distributed import Client

    from .sweep import Grid, PointResult, SweepIndex, SweepResult

TOPIC = "uffdlab"                       # workers' events, rendered by the client
SCRATCH_PREFIX = "uffdlab-point-"
RESOURCE = "vm_slots"


class ClusterError(Exception):
    pass


# -- what travels between client and worker --------------------------------------


@dataclass(frozen=True)
class PointJob:
    """Everything a worker needs to run one point, by value: a remote host
    has no access to the client's files."""

    sweep_id: str
    index: int
    notebook: str                       # a notebook in notebooks/ (same checkout version)
    params: dict[str, Any]              # fixed + the point's values
    fresh: bool
    lab_path: str                       # where the lab file is on the client
    lab_text: str                       # and what it says
    lock_text: str | None               # lab.lock next to it, if any

    @property
    def key(self) -> str:
        """The Dask key: one per point of a sweep (a resubmitted point is the
        same task, so Dask never runs it twice at once)."""
        return f"uffdlab-{self.sweep_id}-point-{self.index:03d}"


@dataclass
class PointOutcome:
    """What a worker hands back: the point's result, its stored run (None
    when the point failed before storing one) and the executed notebook."""

    index: int
    result: PointResult
    run: dict | None
    notebook: bytes
    host: str
    worker: str
    seconds: float


# -- on the worker -----------------------------------------------------------------


def execute_job(job: PointJob) -> PointOutcome:
    """Run one point on this worker (Dask calls this in a worker thread)."""
    from .paths import NOTEBOOKS
    from .sweep import PointResult, _run_point, _start_bringup, notebook_parameters

    started = time.monotonic()
    host, worker = socket.gethostname(), _worker_name()
    report = _WorkerEvents(job, host, worker)
    report.emit(Kind.PROGRESS, "started", state="running")
    lab = worker_lab(job)
    reap_scratch(SCRATCH_PREFIX)       # those of workers killed mid-point
    with process_scratch(SCRATCH_PREFIX) as tmp:
        tmp = Path(tmp)
        result_file, db_path = tmp / "result.json", tmp / "results.sqlite"
        nb_out = tmp / "point.ipynb"
        params = {**job.params, "lab_path": str(lab.source), "sweep_id": job.sweep_id,
                  "teardown": False, "result_path": str(result_file), "fresh": job.fresh,
                  "results_db": str(db_path)}
        resolved = {**notebook_parameters(NOTEBOOKS / job.notebook), **params}
        ev = Emitter(f"point {job.index}", report)
        shape = (str(lab.source), *(str(resolved.get(k)) for k in ("image", "vm_memory",
                                                                   "vm_cpus")))
        bringup = SPARES.claim(shape, ev) if job.fresh else None
        if bringup is None:
            bringup = _start_bringup(lab, resolved, job.fresh, ev)
        after = None
        if job.fresh and bringup is not None:
            # this point's VM is stopped: while its notebook draws its plots,
            # restore a VM for the next point of this shape Dask gives us
            def after() -> None:
                SPARES.add(shape, lambda: _start_bringup(lab, resolved, True,
                                                         Emitter("spare")))
        result = _run_point(job.fresh, NOTEBOOKS / job.notebook, nb_out, params, bringup,
                            result_file, ev, after)
        run = _stored_run(db_path, result.run_id) if result.run_id else None
        if result.run_id and run is None:
            result = PointResult(None, Status.FAILED, None,
                                 f"run {result.run_id} is not in the point's database")
        notebook = nb_out.read_bytes() if nb_out.exists() else b""
    report.emit(Kind.PROGRESS, str(result), state=str(result.status))
    return PointOutcome(job.index, result, run, notebook, host, worker,
                        round(time.monotonic() - started, 1))


SPARE_SECONDS = 60.0          # a spare VM that no point claims in this long is stopped


class _Spares:
    """Fresh VMs a worker restores ahead, one per point that just finished,
    for the next point of the same shape (as the local loop does between its
    points). Unclaimed, a spare stops after SPARE_SECONDS, or when the sweep
    ends (drop_spares); it dies with the worker like any fresh VM."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items: dict[tuple, list] = {}

    def claim(self, shape: tuple, ev: Emitter):
        """A spare of this shape that is coming or came up, or None; its
        events go to `ev` from now on."""
        while True:
            with self.lock:
                waiting = self.items.get(shape) or []
                if not waiting:
                    return None
                bringup, timer = waiting.pop(0)
            timer.cancel()
            if bringup.failed:            # it did not come up: try the next, or boot
                bringup.discard()
                continue
            bringup.vm.listener = ev.listener
            ev.emit(Kind.TEMPLATE, f"using {bringup.vm.name}, restored while the last point "
                    f"drew its plots")
            return bringup

    def add(self, shape: tuple, start) -> None:
        bringup = start()
        if bringup is None:
            return
        timer = threading.Timer(SPARE_SECONDS, self._expire, (shape, bringup))
        timer.daemon = True
        with self.lock:
            self.items.setdefault(shape, []).append((bringup, timer))
        timer.start()

    def _expire(self, shape: tuple, bringup) -> None:
        with self.lock:
            waiting = self.items.get(shape, [])
            mine = [item for item in waiting if item[0] is bringup]
            for item in mine:
                waiting.remove(item)
        if mine:
            bringup.discard()

    def drop_all(self) -> int:
        with self.lock:
            items = [item for waiting in self.items.values() for item in waiting]
            self.items.clear()
        for bringup, timer in items:
            timer.cancel()
            bringup.discard()
        return len(items)


SPARES = _Spares()


def drop_spares() -> None:
    """Run on each worker (in its event loop) when a sweep ends: stop its
    spare VMs, in a thread, since a spare may still be restoring."""
    threading.Thread(target=SPARES.drop_all, name="uffdlab-drop-spares").start()


def worker_lab(job: PointJob) -> Lab:
    """The lab file as the client has it. Where the client's path holds the
    same text (this machine, a shared file system), that file, so relative
    paths and lab.lock resolve as for the client; elsewhere a copy with its
    lock, written once per content under the temporary directory."""
    here = Path(job.lab_path)
    try:
        if here.read_text() == job.lab_text:
            return load_lab(here)
    except OSError:
        pass
    digest = hashlib.sha256(job.lab_text.encode() + (job.lock_text or "").encode())
    d = Path(tempfile.gettempdir()) / f"uffdlab-labs-{os.getuid()}" / digest.hexdigest()[:16]
    d.mkdir(parents=True, exist_ok=True)
    path = d / here.name
    if not path.exists():
        if job.lock_text is not None:
            _write_new(d / "lab.lock", job.lock_text)
        _write_new(path, job.lab_text)
    return load_lab(path)


def _write_new(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _stored_run(db_path: Path, run_id: str) -> dict | None:
    from .results import ResultsDB
    if not db_path.exists():
        return None
    with ResultsDB(db_path) as db:
        if not db.has_run(run_id):
            return None
        return db.get_result(run_id).to_dict()


def _worker_name() -> str:
    try:
        from distributed import get_worker
        w = get_worker()
        return str(w.name if w.name is not None else w.address)
    except ValueError:                  # not inside a worker (a direct call)
        return f"pid {os.getpid()}"


class _WorkerEvents:
    """A listener that sends the point's events to the client (the topic
    `uffdlab`), tagged with the point, the host and the worker."""

    def __init__(self, job: PointJob, host: str, worker: str):
        # not "worker": the scheduler sets that key to the worker's address
        self.base = {"sweep": job.sweep_id, "point": job.index, "host": host,
                     "worker_name": worker}
        # found now, in the task's thread: the VM's events come from others
        # (log_event itself may be called from any thread)
        try:
            from distributed import get_worker
            self.worker = get_worker()
        except ValueError:                # not inside a worker (a direct call)
            self.worker = None

    def __call__(self, ev: Event) -> None:
        if self.worker is None:
            return
        msg = {**self.base, "kind": str(ev.kind), "subject": ev.subject, "message": ev.message,
               **{k: v for k, v in ev.data.items() if k in ("state", "seconds")}}
        self.worker.log_event(TOPIC, msg)

    def emit(self, kind: Kind, message: str, **data: Any) -> None:
        self(Event(kind, f"point {self.base['point']}", message, data))


# -- on the client -----------------------------------------------------------------


@dataclass
class HostTally:
    running: set[int] = field(default_factory=set)
    done: int = 0
    failed: int = 0

    def __str__(self) -> str:
        return f"{self.done} done, {len(self.running)} running, {self.failed} failed"


class Progress:
    """Points done, running and failed, overall and per host, from the
    workers' events and the client's completions."""

    def __init__(self, total: int, done: int, ev: Emitter):
        self.total, self.done, self.failed, self.ev = total, done, 0, ev
        self.hosts: dict[str, HostTally] = {}
        self.lock = threading.Lock()

    def started(self, host: str, worker: str, point: int) -> None:
        with self.lock:
            for tally in self.hosts.values():     # rescheduled after its worker died
                tally.running.discard(point)
            self.hosts.setdefault(host, HostTally()).running.add(point)
        self.show(f"point {point} started on {host} ({worker})", point=point, host=host,
                  worker=worker)

    def finished(self, host: str | None, point: int, ok: bool) -> None:
        with self.lock:
            self.done += 1
            self.failed += not ok
            for tally in self.hosts.values():
                tally.running.discard(point)
            if host is not None:
                tally = self.hosts.setdefault(host, HostTally())
                tally.done += ok
                tally.failed += not ok
        self.show(f"point {point} {'done' if ok else 'failed'}"
                  + (f" on {host}" if host else ""))

    def show(self, what: str, **data: Any) -> None:
        with self.lock:
            running = sum(len(t.running) for t in self.hosts.values())
            per_host = "; ".join(f"{h}: {t}" for h, t in sorted(self.hosts.items()))
            self.ev.emit(Kind.PROGRESS, f"{self.done}/{self.total} points, {running} running, "
                         f"{self.failed} failed ({what})" + (f" [{per_host}]" if per_host else ""),
                         done=self.done, total=self.total, running=running, failed=self.failed,
                         hosts={h: str(t) for h, t in self.hosts.items()}, **data)


def slots_here(vm_cpus: int) -> int:
    """VM slots of this machine: its cores over a VM's CPUs, at least 1."""
    return max(1, (os.cpu_count() or 1) // max(1, vm_cpus))


@contextmanager
def connect(lab: Lab, vm_cpus: int, ev: Emitter):
    """A Dask client for the lab's cluster: its scheduler, a cluster started
    over SSH on its hosts, or a local one; closed (and a cluster started
    here stopped) on leaving."""
    from distributed import Client, LocalCluster

    spec = lab.cluster
    retries = spec.retries if spec is not None else 1
    cluster = None
    if spec is not None and spec.scheduler:
        try:
            client = Client(spec.scheduler, timeout="20s")
        except OSError as e:
            raise ClusterError(f"{lab.source}: cluster.scheduler: no Dask scheduler "
                               f"answers at {spec.scheduler} ({e}); 'uffdlab cluster up "
                               f"HOSTS.yml' starts one") from e
    elif spec is not None and spec.hosts:
        cluster = ssh_cluster(spec, retries)
        client = Client(cluster)
    else:
        slots = spec.vm_slots if spec is not None and spec.vm_slots else slots_here(vm_cpus)
        cluster = LocalCluster(n_workers=1, threads_per_worker=slots, processes=True,
                               resources={RESOURCE: slots}, dashboard_address=":0",
                               silence_logs=40,
                               scheduler_kwargs={"allowed_failures": retries})
        client = Client(cluster)
    try:
        _check_cluster(client, retries, ev)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def ssh_cluster(spec: ClusterSpec, retries: int):
    """The lab's hosts, prepared by playbooks/lab-host.yml (`uffdlab cluster
    up`): the first runs the scheduler, each runs a worker from the venv the
    playbook made, with the host's VM slots (cluster.vm_slots, else 1)."""
    from distributed import SSHCluster

    from .labhost import DEFAULT_DIR
    slots = spec.vm_slots or 1
    hosts = [h.split("@", 1)[-1] for h in spec.hosts]
    users = [h.split("@", 1)[0] if "@" in h else None for h in spec.hosts]
    return SSHCluster([hosts[0], *hosts],
                      connect_options=[{"username": u} if u else {}
                                       for u in [users[0], *users]],
                      worker_options={"nthreads": slots, "resources": {RESOURCE: slots}},
                      scheduler_options={"dashboard_address": ":8787",
                                         "allowed_failures": retries},
                      remote_python=f"{DEFAULT_DIR}/venv/bin/python")


def _check_cluster(client: Client, retries: int, ev: Emitter) -> None:
    """Say where the dashboard is; refuse a cluster where no worker has VM
    slots (points would wait forever); say when the scheduler retries
    points another number of times than lab.yml asks."""
    info = client.scheduler_info()
    workers = info.get("workers", {})
    slots = {w.get("name") or a: w.get("resources", {}).get(RESOURCE, 0)
             for a, w in workers.items()}
    if not any(slots.values()):
        raise ClusterError(f"no worker of the scheduler at {info.get('address')} offers "
                           f"{RESOURCE} (workers: {slots or 'none'}); start workers with "
                           f"'--resources {RESOURCE}=N' ('uffdlab cluster up' does)")
    ev.emit(Kind.PROGRESS, f"cluster {info.get('address')}: {len(workers)} workers, "
            f"{sum(slots.values()):g} VM slots; dashboard {client.dashboard_link}",
            dashboard=client.dashboard_link, slots=slots)
    try:
        allowed = client.run_on_scheduler(_allowed_failures)
    except Exception:                     # a scheduler that runs no client code
        return
    if allowed != retries:
        ev.emit(Kind.PROGRESS, f"the scheduler retries a point whose worker died {allowed} "
                f"times (its distributed.scheduler.allowed-failures), not cluster.retries "
                f"{retries}")


def _allowed_failures(dask_scheduler=None) -> int:
    """Run on the scheduler: how often it retries a task whose worker died."""
    return int(dask_scheduler.allowed_failures)


def run_sweep(lab: Lab, grid: Grid, listener: Listener | None = None,
              out_root: Path | None = None, *, cluster: bool | None = None,
              resume: SweepIndex | None = None) -> SweepResult:
    """sweep.run_sweep on Dask workers when `cluster` says so (default:
    when lab.yml has a cluster section), else one point after another here."""
    from . import sweep
    on_cluster = lab.cluster is not None if cluster is None else cluster
    return sweep.run_sweep(lab, grid, listener, out_root, resume=resume,
                           run_points=run_points if on_cluster else None)


def resume_sweep(lab: Lab, sweep_id: str, listener: Listener | None = None, *,
                 cluster: bool | None = None) -> SweepResult:
    """sweep.resume_sweep, on the cluster as run_sweep decides."""
    from . import sweep
    on_cluster = lab.cluster is not None if cluster is None else cluster
    return sweep.resume_sweep(lab, sweep_id, listener,
                              run_points=run_points if on_cluster else None)


def run_points(lab: Lab, grid: Grid, index: SweepIndex, todo: list[int], ev: Emitter) -> None:
    """Run the points `todo` on the cluster, recording each in `index` as
    it completes (in whatever order)."""
    from distributed import as_completed

    from .sweep import needs_parameters
    needs_parameters(grid, ("result_path", "results_db"), "on a cluster")
    points = grid.points()
    lock = lab.source.parent / "lab.lock"
    lab_text, lock_text = lab.source.read_text(), lock.read_text() if lock.is_file() else None
    jobs = {i: PointJob(index.sweep_id, i, grid.notebook, {**grid.fixed, **points[i]},
                        grid.fresh, str(lab.source.resolve()), lab_text, lock_text)
            for i in todo}
    vm_cpus = max(int(j.params.get("vm_cpus", 2)) for j in jobs.values()) if jobs else 2
    progress = Progress(len(grid.points()), len(index.points), ev)
    with connect(lab, vm_cpus, ev) as client:
        def on_event(event) -> None:
            _, msg = event
            if msg.get("sweep") != index.sweep_id:
                return
            if msg.get("state") == "running":
                progress.started(msg["host"], msg["worker_name"], msg["point"])
            elif msg.get("kind") in (str(Kind.FAILED), str(Kind.BOOTING), str(Kind.SSH_READY),
                                     str(Kind.TEMPLATE)):
                ev.emit(Kind(msg["kind"]), f"{msg['host']}/{msg['worker_name']} point "
                        f"{msg['point']}: {msg['message']}", host=msg["host"],
                        worker=msg["worker_name"], point=msg["point"])

        client.subscribe_topic(TOPIC, on_event)
        futures = {client.submit(execute_job, jobs[i], key=jobs[i].key, pure=False,
                                 resources={RESOURCE: 1}): i for i in todo}
        try:
            for future in as_completed(futures):
                i = futures.pop(future)
                outcome = _outcome_of(future, i)
                record_outcome(lab, index, jobs[i], outcome)
                # recorded: Dask must not run it again if its worker dies now
                future.release()
                progress.finished(outcome.host or None, i,
                                  outcome.result.status != Status.FAILED)
        finally:
            try:
                client.run(drop_spares)
            except Exception as e:        # a worker gone: its spares went with it
                ev.emit(Kind.PROGRESS, f"stopping the workers' spare VMs: {e}")


def _outcome_of(future, i: int) -> PointOutcome:
    """The worker's outcome, or a failed one saying why there is none."""
    from distributed import KilledWorker

    from .sweep import PointResult, _first_line
    try:
        return future.result()
    except KilledWorker as e:
        last = getattr(e.last_worker, "address", e.last_worker)
        why = (f"its worker died while running it, on {e.allowed_failures + 1} workers (the "
               f"last {last}); a point is tried again cluster.retries times")
    except Exception as e:                # the task itself raised: a bug or a broken host
        why = f"{type(e).__name__}: {_first_line(e)}"
    return PointOutcome(i, PointResult(None, Status.FAILED, None, why), None, b"", "", "", 0.0)


def record_outcome(lab: Lab, index: SweepIndex, job: PointJob, outcome: PointOutcome) -> None:
    """Journal, store, index: in that order, so a client killed anywhere in
    between leaves a point that `sweep --resume` adopts, never one stored
    twice."""
    from .results import store_once
    from .sweep import SweepPoint, _write_atomic, point_files
    files = point_files(index.directory, job.index)
    if outcome.notebook:
        files.notebook.write_bytes(outcome.notebook)
    if outcome.run is not None:
        _write_atomic(files.run, json.dumps(outcome.run) + "\n")
        store_once(lab.results_path, outcome.run)
    outcome.result.write(files.result)
    index.record(SweepPoint(index=job.index, params=job_point(index, job),
                            notebook=files.notebook.name, status=outcome.result.status,
                            run_id=outcome.result.run_id, error=outcome.result.error,
                            seconds=outcome.seconds, host=outcome.host or None,
                            worker=outcome.worker or None))


def job_point(index: SweepIndex, job: PointJob) -> dict[str, Any]:
    """The grid's values of a job's point (without the fixed parameters)."""
    return {k: job.params[k] for k in index.grid}
