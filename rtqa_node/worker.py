"""The worker: a separate process that leases jobs from the queue and runs them, one at a time.

- ``review`` jobs: load the revision's member files, run :data:`REVIEW` (a function ``files -> Review``, or the
  placeholder's ``ReviewResult``; the placeholder :func:`review_plan_study` loads every object and counts; the
  real review replaces this one function), write the result objects to the outbox (:mod:`rtqa_node.report`:
  the SR, and the risk maps and PDF that some destination wants), and in one transaction mark the job done,
  record the outbox rows and enqueue the revision's dispatch job.
- ``dispatch`` jobs: see :mod:`rtqa_node.dispatch`.

Each result's SOP Instance UID is ``2.25.<uuid5(plan_study_id, revision, kind, RESULT_VERSION)>``
(:func:`rtqa_node.report.outputs.result_uid`): a re-run after a crash writes objects with the same UIDs, so
duplicates at the receiver are recognisable.

One bad plan never stops the worker: any exception fails that job only (retry with backoff, then dead with
the error). A review that goes dead still answers: an "analysis not performed" result is written and sent.
While a job runs, a heartbeat thread extends its lease; if the lease was lost (the worker stalled past its
lease and another took the job over), the result is not committed.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from rtqa_node.config import Destination, Settings
from rtqa_node.dispatch import dispatch_priority, dispatch_revision, outbox_path
from rtqa_node.errors import InputError, PermanentError, RetryableError
from rtqa_node.queue import Job, JobKind, JobState, LeaseLost, Queue, enqueue
from rtqa_node.report.kinds import KIND_BY_SOP_CLASS
from rtqa_node.report.outputs import RESULT_VERSION, UID_KIND, result_uid
from rtqa_node.review import Finding, Review, Severity
from rtqa_node.store import files as durable
from rtqa_node.store.index import Index

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class ReviewResult:
    """What a review found. The placeholder fills only the counts."""

    objects: int
    size_bytes: int
    by_modality: dict[str, int] = field(default_factory=dict)
    findings: tuple[str, ...] = ()

    def summary(self) -> dict:
        return {"objects": self.objects, "size_bytes": self.size_bytes, "by_modality": self.by_modality,
                "findings": list(self.findings)}

    def to_review(self, revision: int) -> Review:
        """The placeholder as a ``Review`` for the report: it evaluated nothing, and says so."""
        text = (f"Placeholder review of revision {revision}: {self.objects} objects ("
                + ", ".join(f"{m} {n}" for m, n in self.by_modality.items()) + "); the plan was not evaluated")
        return Review(findings=(Finding("placeholder.not_evaluated", Severity.NOT_EVALUABLE, text),),
                      protocol=None, metrics=self.summary(), algorithm_version="placeholder")


def review_plan_study(files: Sequence[Path]) -> ReviewResult:
    """Placeholder review: read every object with pydicom and count them by modality.

    Raises:
        PermanentError: an object cannot be read (retrying will not help).
    """
    by_modality: Counter[str] = Counter()
    size = 0
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise PermanentError(f"cannot read a member object: {type(exc).__name__}") from exc
        by_modality[str(ds.get("Modality", "") or "?")] += 1
        size += path.stat().st_size
    return ReviewResult(objects=len(files), size_bytes=size, by_modality=dict(sorted(by_modality.items())))


def run_review(files: Sequence[Path], *, configured_protocol: str | None = None,
               model: str | None = None) -> Review:
    """The real review (:mod:`rtqa_node.checks`): load the plan study, pick the protocol, run the checks, then
    ``model``'s predictions and attention (:func:`rtqa_node.ml.inference.add_predictions`; the model is loaded
    once per process). A plan study that cannot be loaded gives a not-evaluable Review, not an exception; a
    model that cannot run leaves the rule-based review."""
    from rtqa_node.checks.pipeline import load_and_review

    review = load_and_review(files, configured_protocol=configured_protocol)
    if model is not None:
        from rtqa_node.ml.inference import add_predictions

        review = add_predictions(review, files, model=model)
    return review


#: The review the worker runs; replace this one function (or pass ``review=`` to :class:`Worker`).
REVIEW: Callable[[Sequence[Path]], Review | ReviewResult] = run_review


def build_results(paths: Sequence[Path], review: Review, *, plan_study_id: str, revision: int,
                  kinds: Sequence[str], predecessor: Path | None, with_study: bool = True):
    """The result objects of one revision (``rtqa_node.report.outputs.build_review_outputs``): the plan study is
    loaded for the risk maps and the summary; a study that cannot be loaded gets the SR only. The risk map is
    the model's attention when the review carries one, else the interim OAR-excess map."""
    from rtqa_node.report.outputs import build_review_outputs
    from rtqa_node.report.sr import read_evidence
    from rtqa_node.rt.plan_study import load_plan_study

    study = None
    if with_study and set(kinds) - {"sr"}:
        try:
            study = load_plan_study(paths)
        except InputError as exc:
            log.warning("report_without_study", extra={"plan_study_id": plan_study_id, "error": str(exc)[:200]})
    predecessors = [pydicom.dcmread(predecessor, stop_before_pixels=True)] if predecessor else []
    return build_review_outputs(review, study, read_evidence(paths), plan_study_id=plan_study_id,
                                revision=revision, kinds=kinds, predecessors=predecessors)


def wanted_outputs(settings: Settings) -> tuple[str, ...]:
    """Every output some configured destination takes (the default destination's defaults when none is)."""
    destinations = [*settings.destinations.values(), settings.default_destination]
    kinds = {kind for d in destinations if d is not None for kind in d.outputs}
    return tuple(sorted(kinds or Destination.model_fields["outputs"].default))


def write_result(settings: Settings, dataset: Dataset | bytes, rel_path: Path) -> None:
    """Durably write a data set or bytes (temp file, fsync, rename, directory fsync): a crash never leaves half
    an object."""
    final = settings.data_dir / rel_path
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=final.parent, suffix=".partial")
    os.close(fd)
    try:
        if isinstance(dataset, bytes):
            Path(name).write_bytes(dataset)
        else:
            dataset.save_as(name, enforce_file_format=True)
        durable.fsync_file(Path(name))
        os.replace(name, final)
        durable.fsync_dir(final.parent)
    finally:
        Path(name).unlink(missing_ok=True)


class Worker:
    """Leases and runs jobs until ``stop`` is set. Construct one per process."""

    def __init__(self, settings: Settings, *, review: Callable[[Sequence[Path]], ReviewResult] | None = None,
                 owner: str | None = None, parent_pid: int | None = None) -> None:
        self.settings = settings
        if review is None and REVIEW is run_review:
            review = functools.partial(run_review, configured_protocol=settings.review_protocol,
                                       model=settings.review_model)
        self.review = review or REVIEW
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.parent_pid = parent_pid
        self.index = Index(settings.index_path)
        self.queue = Queue(self.index)
        self.stop = threading.Event()

    def close(self) -> None:
        self.index.close()

    def run(self) -> None:
        log.info("worker_started", extra={"worker": self.owner})
        while not self.stop.is_set():
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("worker_orphaned", extra={"worker": self.owner})
                break
            if self.run_once() is None:
                wait = self.queue.next_available_in_s()
                self.stop.wait(_IDLE_POLL_S if wait is None else min(max(wait, 0.01), _IDLE_POLL_S))
        log.info("worker_stopped", extra={"worker": self.owner})

    def run_once(self) -> Job | None:
        """Lease one job and run it to an outcome; None when no job was available."""
        job = self.queue.lease(self.owner, self.settings.job_lease_s)
        if job is None:
            return None
        extra = {"job_id": job.id, "plan_study_id": job.plan_study_id, "revision": job.revision,
                 "kind": str(job.kind), "attempt": job.attempts, "worker": self.owner}
        log.info("job_leased", extra=extra)
        beat = _Heartbeat(self.queue, job, self.owner, self.settings.job_lease_s)
        beat.start()
        try:
            if job.kind is JobKind.REVIEW:
                self._review(job)
            else:
                self._dispatch(job)
            log.info("job_done", extra=extra)
        except LeaseLost:
            log.warning("job_lease_lost", extra=extra)
        except Exception as exc:  # one bad plan never stops the worker
            permanent = isinstance(exc, PermanentError)
            error = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, (RetryableError, PermanentError)):
                log.exception("job_error", extra=extra)
            try:
                state = self._fail(job, error, permanent=permanent)
                log.warning("job_failed", extra={**extra, "state": str(state), "error": error[:300]})
            except LeaseLost:
                log.warning("job_lease_lost", extra=extra)
        finally:
            beat.stop()
            from rtqa_node.rt.plan_study import forget_loaded

            forget_loaded()  # the revision's study was shared by its review and report; do not hold it idle
        return job

    # -- review ----------------------------------------------------------------------------------------

    def _members(self, job: Job) -> tuple[Path, list[Path]]:
        rows = self.index.query(
            "SELECT m.role, i.path FROM plan_study_members m JOIN instances i ON i.id = m.instance_id"
            " WHERE m.plan_study_id = ? AND m.revision = ? ORDER BY m.role, i.id", (job.plan_study_id, job.revision))
        paths = [self.settings.data_dir / row["path"] for row in rows]
        plan = next(self.settings.data_dir / row["path"] for row in rows if row["role"] == "plan")
        return plan, paths

    def _review(self, job: Job) -> None:
        _, paths = self._members(job)
        result = self.review(paths)
        review = result if isinstance(result, Review) else result.to_review(job.revision)
        summary = result.to_json() if isinstance(result, Review) else result.summary()
        self._publish(job, paths, review, lambda conn: self.queue.complete(
            job, self.owner, result=summary, conn=conn))

    def _publish(self, job: Job, paths: list[Path], review: Review, finish: Callable, *,
                 with_study: bool = True) -> None:
        """Write the result objects, then in one transaction: ``finish(conn)`` (job done or dead), the outbox
        rows, the dispatch job."""
        predecessor = None
        if job.supersedes is not None:  # the SR of the revision this one supersedes
            rows = self.index.query("SELECT path, sop_class_uid FROM outbox WHERE job_id = ?", (job.supersedes,))
            prior = [row["path"] for row in rows if KIND_BY_SOP_CLASS.get(row["sop_class_uid"]) == "sr"]
            predecessor = self.settings.data_dir / prior[0] if prior else None
        outputs = build_results(paths, review, plan_study_id=job.plan_study_id, revision=job.revision,
                                kinds=wanted_outputs(self.settings), predecessor=predecessor, with_study=with_study)
        written = []
        for obj in outputs.objects:
            rel = outbox_path(job.plan_study_id, job.revision, UID_KIND[obj.kind])
            write_result(self.settings, obj.dataset, rel)
            written.append((obj.dataset, rel))
        if outputs.summary is not None:  # for people and the worklist; not sent (the Encapsulated PDF is)
            rel = outbox_path(job.plan_study_id, job.revision, "summary")
            write_result(self.settings, outputs.summary.pdf_bytes, rel.with_suffix(".pdf"))
            write_result(self.settings, outputs.summary.png_bytes, rel.with_suffix(".png"))
        now_s = time.time()
        with self.index.transaction() as conn:
            finish(conn)
            conn.executemany(
                "INSERT OR IGNORE INTO outbox (job_id, plan_study_id, revision, sop_instance_uid, sop_class_uid,"
                " path, created_at_s) VALUES (?,?,?,?,?,?,?)",
                [(job.id, job.plan_study_id, job.revision, str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                  rel.as_posix(), now_s) for ds, rel in written])
            enqueue(conn, plan_study_id=job.plan_study_id, revision=job.revision, kind=JobKind.DISPATCH,
                    max_attempts=self.settings.dispatch_max_attempts,
                    retry_base_s=self.settings.dispatch_retry_base_s, priority=dispatch_priority(review),
                    now_s=now_s)

    def _fail(self, job: Job, error: str, *, permanent: bool) -> JobState:
        last_attempt = permanent or job.attempts >= job.max_attempts
        if job.kind is JobKind.REVIEW and last_attempt:
            # a dead review still answers: "analysis not performed", with the reason
            try:
                from rtqa_node.report.sr import not_performed_review

                _, paths = self._members(job)
                self._publish(job, paths, not_performed_review(error[:500]),
                              lambda conn: self.queue.fail(job, self.owner, error, permanent=True, conn=conn),
                              with_study=False)
                return JobState.DEAD
            except LeaseLost:
                raise
            except Exception:
                log.exception("not_performed_result_failed", extra={"job_id": job.id})
        return self.queue.fail(job, self.owner, error, permanent=permanent)

    # -- dispatch --------------------------------------------------------------------------------------

    def _dispatch(self, job: Job) -> None:
        outcome = dispatch_revision(self.settings, self.index, job.plan_study_id, job.revision)
        self.queue.complete(job, self.owner, result={"destination": outcome.destination,
                                                      "objects": outcome.objects})


class _Heartbeat:
    """Extends a job's lease every third of the lease time while the job runs."""

    def __init__(self, queue: Queue, job: Job, owner: str, lease_s: float) -> None:
        self.queue, self.job, self.owner, self.lease_s = queue, job, owner, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.queue.heartbeat(self.job, self.owner, self.lease_s)
            except LeaseLost:
                return
            except Exception:
                log.exception("heartbeat_failed", extra={"job_id": self.job.id})


def run_worker(settings: Settings, *, parent_pid: int | None = None) -> int:
    """``rtqa worker``: run until SIGTERM/SIGINT (the current job is finished first)."""
    worker = Worker(settings, parent_pid=parent_pid)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stop.set())
    try:
        worker.run()
    finally:
        worker.close()
    return 0


def worker_process_main(settings: Settings, log_level: str, parent_pid: int) -> None:
    """Entry point of a worker child started by ``rtqa serve --workers N`` (multiprocessing, spawn)."""
    from rtqa_node.log import configure

    configure(log_level)
    raise SystemExit(run_worker(settings, parent_pid=parent_pid))


__all__ = ["RESULT_VERSION", "REVIEW", "ReviewResult", "Worker", "build_results", "result_uid", "review_plan_study",
           "run_review", "run_worker", "wanted_outputs"]


class WorkerPool:
    """The worker child processes of ``rtqa serve --workers N``: started, restarted when one dies (a crash
    or kill -9 must not leave the queue without workers), stopped with SIGTERM (then SIGKILL) on shutdown."""

    def __init__(self, settings: Settings, count: int) -> None:
        import multiprocessing

        self.settings = settings
        self.count = count
        # spawn, not fork: the parent runs pynetdicom and apscheduler threads, which fork would copy mid-state
        self._context = multiprocessing.get_context("spawn")
        self._processes: list = []

    def _spawn(self):
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        process = self._context.Process(target=worker_process_main, args=(self.settings, level, os.getpid()),
                                        name="rtqa-worker", daemon=False)
        process.start()
        log.info("worker_process_started", extra={"pid": process.pid})
        return process

    def start(self) -> None:
        self._processes = [self._spawn() for _ in range(self.count)]

    def supervise(self) -> None:
        for i, process in enumerate(self._processes):
            if not process.is_alive():
                log.warning("worker_process_exited", extra={"pid": process.pid, "exitcode": process.exitcode})
                self._processes[i] = self._spawn()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def stop(self, timeout_s: float = 30.0) -> None:
        for process in self._processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + timeout_s
        for process in self._processes:
            process.join(max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                process.kill()
                process.join(5)
