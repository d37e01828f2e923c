"""The job state machine: guarded transitions, leases, backoff, dead letters, concurrent worker processes."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from rtqa_node.queue import (
    TRANSITIONS,
    IllegalTransition,
    JobKind,
    JobState,
    LeaseLost,
    Queue,
    _check,
    backoff_s,
    enqueue,
)
from rtqa_node.store.index import Index

T0 = 1_000_000.0


def _plan_study(conn, ps_id: str = "ps-test") -> None:
    conn.execute(
        "INSERT OR IGNORE INTO plan_studies (id, key_kind, key_uid, key_label, state, plan_sop_instance_uid,"
        " calling_ae, first_object_at_s, last_object_at_s, updated_at_s) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (ps_id, "plan", ps_id, "", "ready", "1.2.3", "TPS", T0, T0, T0))


def add_jobs(index: Index, n: int, *, max_attempts: int = 3, retry_base_s: float = 1.0, priority=lambda i: 0):
    with index.transaction() as conn:
        _plan_study(conn)
        return [enqueue(conn, plan_study_id="ps-test", revision=i + 1, kind=JobKind.REVIEW,
                        max_attempts=max_attempts, retry_base_s=retry_base_s, priority=priority(i), now_s=T0)
                for i in range(n)]


@pytest.fixture
def index(tmp_path):
    idx = Index(tmp_path / "index.sqlite")
    yield idx
    idx.close()


def test_enqueue_is_idempotent_per_plan_study_revision_and_kind(index):
    with index.transaction() as conn:
        _plan_study(conn)
        first = enqueue(conn, plan_study_id="ps-test", revision=1, kind=JobKind.REVIEW, max_attempts=3,
                        retry_base_s=1, now_s=T0)
        again = enqueue(conn, plan_study_id="ps-test", revision=1, kind=JobKind.REVIEW, max_attempts=3,
                        retry_base_s=1, now_s=T0)
        other_kind = enqueue(conn, plan_study_id="ps-test", revision=1, kind=JobKind.DISPATCH, max_attempts=3,
                             retry_base_s=1, now_s=T0)
    assert first is not None and again is None and other_kind is not None


def test_a_leased_job_is_not_leased_again_and_only_its_owner_can_finish_it(index):
    queue = Queue(index)
    add_jobs(index, 1)
    job = queue.lease("w1", 10, now_s=T0)
    assert job.state is JobState.LEASED and job.lease_owner == "w1" and job.attempts == 1
    assert queue.lease("w2", 10, now_s=T0 + 1) is None
    with pytest.raises(LeaseLost):
        queue.complete(job, "w2", now_s=T0 + 1)
    queue.complete(job, "w1", result={"ok": 1}, now_s=T0 + 2)
    assert queue.get(job.id).state is JobState.DONE
    with pytest.raises(LeaseLost):  # done exactly once
        queue.complete(job, "w1", now_s=T0 + 3)


def test_higher_priority_first_then_oldest(index):
    queue = Queue(index)
    ids = add_jobs(index, 3, priority=lambda i: [0, 5, 0][i])
    order = [queue.lease("w", 10, now_s=T0).id for _ in range(3)]
    assert order == [ids[1], ids[0], ids[2]]


def test_expired_lease_returns_to_queued_and_the_old_owner_loses_it(index):
    queue = Queue(index)
    add_jobs(index, 1)
    stale = queue.lease("w1", 5, now_s=T0)
    queue.heartbeat(stale, "w1", 5, now_s=T0 + 4)  # extended to T0 + 9
    assert queue.lease("w2", 5, now_s=T0 + 8) is None
    fresh = queue.lease("w2", 5, now_s=T0 + 10)
    assert fresh.id == stale.id and fresh.lease_owner == "w2" and fresh.attempts == 2
    with pytest.raises(LeaseLost):
        queue.complete(stale, "w1", now_s=T0 + 11)
    with pytest.raises(LeaseLost):
        queue.heartbeat(stale, "w1", 5, now_s=T0 + 11)
    queue.complete(fresh, "w2", now_s=T0 + 11)
    events = index.query("SELECT from_state, to_state, owner FROM job_events WHERE job_id = ? ORDER BY id",
                         (fresh.id,))
    assert [tuple(e) for e in events] == [
        (None, "queued", None), (None, "leased", "w1"), ("leased", "queued", "w1"), (None, "leased", "w2"),
        ("leased", "done", "w2")]


def test_failures_back_off_exponentially_then_the_job_is_dead_with_its_error(index):
    queue = Queue(index)
    add_jobs(index, 1, max_attempts=3, retry_base_s=2.0)
    now = T0
    delays = []
    for attempt in (1, 2, 3):
        job = queue.lease("w", 10, now_s=now)
        assert job is not None and job.attempts == attempt
        state = queue.fail(job, "w", f"boom {attempt}", now_s=now)
        row = index.query("SELECT available_at_s, last_error FROM jobs WHERE id = ?", (job.id,))[0]
        if attempt < 3:
            assert state is JobState.FAILED
            assert queue.lease("w", 10, now_s=row[0] - 0.01) is None  # not before the backoff
            delays.append(row[0] - now)
            now = row[0]
    assert delays == [2.0, 4.0]
    assert state is JobState.DEAD and row[1] == "boom 3"
    assert queue.lease("w", 10, now_s=now + 1e6) is None
    assert backoff_s(2.0, 30) == 3600.0


def test_permanent_error_dead_letters_at_once(index):
    queue = Queue(index)
    add_jobs(index, 1, max_attempts=5)
    job = queue.lease("w", 10, now_s=T0)
    assert queue.fail(job, "w", "no destination", permanent=True, now_s=T0) is JobState.DEAD


def test_a_job_whose_worker_dies_on_every_attempt_ends_dead(index):
    queue = Queue(index)
    add_jobs(index, 1, max_attempts=2)
    queue.lease("w1", 1, now_s=T0)
    queue.lease("w2", 1, now_s=T0 + 2)
    assert queue.lease("w3", 1, now_s=T0 + 4) is None
    row = index.query("SELECT state, last_error FROM jobs")[0]
    assert row[0] == "dead" and "expired" in row[1]


def test_only_transitions_in_the_table_are_allowed():
    assert (JobState.DONE, JobState.QUEUED) not in TRANSITIONS
    with pytest.raises(IllegalTransition):
        _check(JobState.DONE, JobState.LEASED)
    with pytest.raises(IllegalTransition):
        _check(JobState.DEAD, JobState.QUEUED)


def _drain(path: str, owner: str, out) -> None:
    idx = Index(Path(path))
    queue = Queue(idx)
    done = []
    while (job := queue.lease(owner, 60)) is not None:
        queue.complete(job, owner)
        done.append(job.id)
    idx.close()
    out.put(done)


def test_concurrent_worker_processes_never_claim_the_same_job(index):
    ids = add_jobs(index, 300)
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_drain, args=(str(index.path), f"w{i}", out)) for i in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    claimed = [job_id for r in results for job_id in r]
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    done_events = index.query("SELECT job_id, COUNT(*) FROM job_events WHERE to_state = 'done' GROUP BY job_id")
    assert len(done_events) == 300 and all(n == 1 for _, n in done_events)
