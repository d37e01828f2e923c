"""Hypothesis state machine for the queue: never two live leases on one job; every job ends done or dead."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from rtqa_node.queue import JobKind, JobState, LeaseLost, Queue, enqueue
from rtqa_node.store.index import Index

WORKERS = ("w1", "w2", "w3")
LEASE_S = 10.0
MAX_ATTEMPTS = 3


class QueueMachine(RuleBasedStateMachine):
    @initialize()
    def open(self):
        self._dir = tempfile.TemporaryDirectory()
        self.index = Index(Path(self._dir.name) / "index.sqlite")
        self.queue = Queue(self.index)
        self.now = 1_000_000.0
        self.revision = 0
        #: what each worker believes it holds: worker -> Job as returned by lease()
        self.held: dict[str, object] = {}
        with self.index.transaction() as conn:
            conn.execute(
                "INSERT INTO plan_studies (id, key_kind, key_uid, key_label, state, plan_sop_instance_uid,"
                " calling_ae, first_object_at_s, last_object_at_s, updated_at_s)"
                " VALUES ('ps', 'plan', 'ps', '', 'ready', '1.2', 'TPS', 0, 0, 0)")

    def teardown(self):
        if hasattr(self, "index"):
            self._finish_everything()
            self.index.close()
            self._dir.cleanup()

    @rule(priority=st.integers(0, 3))
    def add_job(self, priority):
        self.revision += 1
        with self.index.transaction() as conn:
            enqueue(conn, plan_study_id="ps", revision=self.revision, kind=JobKind.REVIEW,
                    max_attempts=MAX_ATTEMPTS, retry_base_s=1.0, priority=priority, now_s=self.now)

    @rule(worker=st.sampled_from(WORKERS))
    def lease(self, worker):
        if worker in self.held:
            return
        job = self.queue.lease(worker, LEASE_S, now_s=self.now)
        if job is not None:
            self.held[worker] = job

    @rule(worker=st.sampled_from(WORKERS))
    def complete(self, worker):
        job = self.held.pop(worker, None)
        if job is None:
            return
        try:
            self.queue.complete(job, worker, now_s=self.now)
        except LeaseLost:
            assert self._lease_was_lost(job, worker)

    @rule(worker=st.sampled_from(WORKERS), permanent=st.booleans())
    def fail(self, worker, permanent):
        job = self.held.pop(worker, None)
        if job is None:
            return
        try:
            self.queue.fail(job, worker, "error", permanent=permanent, now_s=self.now)
        except LeaseLost:
            assert self._lease_was_lost(job, worker)

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker):
        job = self.held.get(worker)
        if job is None:
            return
        try:
            self.queue.heartbeat(job, worker, LEASE_S, now_s=self.now)
        except LeaseLost:
            self.held.pop(worker)

    @rule(seconds=st.sampled_from([0.5, 3.0, 11.0, 40.0]))
    def advance_clock(self, seconds):
        self.now += seconds

    @rule(worker=st.sampled_from(WORKERS))
    def crash(self, worker):
        """kill -9: the worker forgets its job; only lease expiry can bring it back."""
        self.held.pop(worker, None)

    def _lease_was_lost(self, job, worker) -> bool:
        row = self.index.query("SELECT state, lease_owner FROM jobs WHERE id = ?", (job.id,))[0]
        return not (row["state"] == "leased" and row["lease_owner"] == worker)

    @invariant()
    def never_two_live_leases(self):
        if not hasattr(self, "index"):
            return
        live: dict[int, list[str]] = {}
        for worker, job in self.held.items():
            row = self.index.query("SELECT state, lease_owner, lease_expires_at_s FROM jobs WHERE id = ?",
                                   (job.id,))[0]
            if row["state"] == "leased" and row["lease_owner"] == worker:
                live.setdefault(job.id, []).append(worker)
        assert all(len(owners) == 1 for owners in live.values())
        leased = self.index.query("SELECT COUNT(*) FROM jobs WHERE state = 'leased' AND lease_owner IS NULL")[0][0]
        assert leased == 0

    @invariant()
    def attempts_never_exceed_the_limit(self):
        if hasattr(self, "index"):
            assert (self.index.query("SELECT MAX(attempts) FROM jobs")[0][0] or 0) <= MAX_ATTEMPTS

    def _finish_everything(self):
        """Let time pass and keep working: every job must end done or dead, none stuck."""
        for _ in range(100):
            self.held.clear()
            self.now += 3600
            job = self.queue.lease("closer", LEASE_S, now_s=self.now)
            while job is not None:
                self.queue.complete(job, "closer", now_s=self.now)
                job = self.queue.lease("closer", LEASE_S, now_s=self.now)
            states = {r[0] for r in self.index.query("SELECT DISTINCT state FROM jobs")}
            if states <= {JobState.DONE, JobState.DEAD}:
                break
        states = {r[0] for r in self.index.query("SELECT DISTINCT state FROM jobs")}
        assert states <= {"done", "dead"}, states
        done_twice = self.index.query(
            "SELECT job_id FROM job_events WHERE to_state IN ('done', 'dead') GROUP BY job_id HAVING COUNT(*) > 1")
        assert done_twice == []


QueueMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestQueueStateMachine = QueueMachine.TestCase
