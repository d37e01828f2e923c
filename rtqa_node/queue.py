"""The job queue: an explicit state machine in the SQLite index, safe across processes and kill -9.

States and the only allowed transitions (:data:`TRANSITIONS`)::

    queued --lease--> leased --complete--> done
    failed --lease--> leased --fail--> failed (available again after exponential backoff)
                      leased --fail--> dead   (attempts exhausted, or a PermanentError)
                      leased --expire--> queued (the lease ran out: the worker died or hung)
                      leased --expire--> dead   (... and that was the last attempt)
                      leased --heartbeat--> leased (lease extended)

Every UPDATE is guarded by ``WHERE id=? AND state=? AND lease_owner=?``; when it changes no row the caller no
longer holds the job and gets :class:`LeaseLost` (litequeue claims the same way; mercure's marker files stay
behind after kill -9). Leasing is one ``BEGIN IMMEDIATE`` transaction: return expired leases to ``queued``,
then one ``UPDATE ... RETURNING`` picks the highest-priority available job. Two workers therefore never hold
the same job, and nothing about a job lives only in a process's memory. Every transition is appended to
``job_events`` (who, when, from, to), which also proves "done exactly once".

Functions take an explicit ``now_s`` (Unix time) so tests can drive the clock; the default is ``time.time()``.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from rtqa_node.errors import RtqaError

#: Upper bound of one backoff step, however many attempts have failed.
MAX_BACKOFF_S = 3600.0


class JobState(enum.StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"


class JobKind(enum.StrEnum):
    REVIEW = "review"
    DISPATCH = "dispatch"


#: (from, to) -> the operation that performs it. Nothing else may change a job's state.
TRANSITIONS: dict[tuple[JobState, JobState], str] = {
    (JobState.QUEUED, JobState.LEASED): "lease",
    (JobState.FAILED, JobState.LEASED): "lease",
    (JobState.LEASED, JobState.LEASED): "heartbeat",
    (JobState.LEASED, JobState.DONE): "complete",
    (JobState.LEASED, JobState.FAILED): "fail",
    (JobState.LEASED, JobState.DEAD): "fail",
    (JobState.LEASED, JobState.QUEUED): "expire",
}
LEASABLE = (JobState.QUEUED, JobState.FAILED)
TERMINAL = frozenset({JobState.DONE, JobState.DEAD})


class LeaseLost(RtqaError):
    """The caller no longer holds the job's lease (it expired and was requeued, or another worker has it)."""


class IllegalTransition(RtqaError):
    """A state change not in :data:`TRANSITIONS` (a bug)."""


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    plan_study_id: str
    revision: int
    kind: JobKind
    state: JobState
    priority: int
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at_s: float | None
    supersedes: int | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"], plan_study_id=row["plan_study_id"], revision=row["revision"],
            kind=JobKind(row["kind"]), state=JobState(row["state"]), priority=row["priority"],
            attempts=row["attempts"], max_attempts=row["max_attempts"], lease_owner=row["lease_owner"],
            lease_expires_at_s=row["lease_expires_at_s"], supersedes=row["supersedes"],
        )


def _check(from_state: JobState, to_state: JobState) -> None:
    if (from_state, to_state) not in TRANSITIONS:
        raise IllegalTransition(f"job state change {from_state} -> {to_state} is not allowed")


def _event(conn: sqlite3.Connection, job_id: int, from_state: JobState | None, to_state: JobState,
           owner: str | None, now_s: float, detail: str | None = None) -> None:
    conn.execute(
        "INSERT INTO job_events (job_id, from_state, to_state, owner, at_s, detail) VALUES (?,?,?,?,?,?)",
        (job_id, from_state and str(from_state), str(to_state), owner, now_s, detail),
    )


def backoff_s(retry_base_s: float, attempts: int) -> float:
    """Delay before attempt ``attempts + 1``: base, 2 base, 4 base, ... capped at :data:`MAX_BACKOFF_S`."""
    return min(retry_base_s * 2 ** max(attempts - 1, 0), MAX_BACKOFF_S)


def enqueue(conn: sqlite3.Connection, *, plan_study_id: str, revision: int, kind: JobKind, max_attempts: int,
            retry_base_s: float, priority: int = 0, supersedes: int | None = None,
            now_s: float | None = None) -> int | None:
    """Add a job inside the caller's transaction. Idempotent: UNIQUE(plan_study_id, revision, kind) makes a
    second call a no-op that returns None; otherwise the new job's id."""
    now_s = time.time() if now_s is None else now_s
    cursor = conn.execute(
        "INSERT OR IGNORE INTO jobs (plan_study_id, revision, kind, state, priority, max_attempts, retry_base_s,"
        " available_at_s, supersedes, created_at_s, updated_at_s) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (plan_study_id, revision, str(kind), str(JobState.QUEUED), priority, max_attempts, retry_base_s, now_s,
         supersedes, now_s, now_s),
    )
    if cursor.rowcount == 0:
        return None
    job_id = cursor.lastrowid
    _event(conn, job_id, None, JobState.QUEUED, None, now_s)
    return job_id


def expire_leases(conn: sqlite3.Connection, now_s: float) -> int:
    """Inside the caller's transaction: leases past their expiry go back to ``queued`` (or ``dead`` when that
    was the last attempt, so a plan that kills its worker every time cannot loop forever)."""
    rows = conn.execute(
        "SELECT id, lease_owner, attempts, max_attempts FROM jobs WHERE state = ? AND lease_expires_at_s < ?",
        (str(JobState.LEASED), now_s),
    ).fetchall()
    for row in rows:
        to_state = JobState.DEAD if row["attempts"] >= row["max_attempts"] else JobState.QUEUED
        _check(JobState.LEASED, to_state)
        error = f"lease of {row['lease_owner']} expired (attempt {row['attempts']} of {row['max_attempts']})"
        changed = conn.execute(
            "UPDATE jobs SET state = ?, lease_owner = NULL, lease_expires_at_s = NULL, last_error = ?,"
            " available_at_s = ?, finished_at_s = CASE WHEN ? = 'dead' THEN ? END, updated_at_s = ?"
            " WHERE id = ? AND state = ? AND lease_owner = ?",
            (str(to_state), error, now_s, str(to_state), now_s, now_s, row["id"], str(JobState.LEASED),
             row["lease_owner"]),
        ).rowcount
        if changed:
            _event(conn, row["id"], JobState.LEASED, to_state, row["lease_owner"], now_s, "lease expired")
    return len(rows)


class Queue:
    """Operations on the ``jobs`` table through one :class:`rtqa_node.store.index.Index` connection."""

    def __init__(self, index) -> None:
        self.index = index

    def lease(self, owner: str, lease_s: float, *, kinds: Iterable[JobKind] = tuple(JobKind),
              now_s: float | None = None) -> Job | None:
        """Lease the best available job (priority, then oldest available), or None when there is none."""
        now_s = time.time() if now_s is None else now_s
        kinds = [str(k) for k in kinds]
        marks = ",".join("?" * len(kinds))
        with self.index.transaction() as conn:
            expire_leases(conn, now_s)
            row = conn.execute(
                "UPDATE jobs SET state = 'leased', lease_owner = ?, lease_expires_at_s = ?,"
                " attempts = attempts + 1, leased_at_s = ?, first_leased_at_s = COALESCE(first_leased_at_s, ?),"
                " updated_at_s = ?"
                " WHERE id = (SELECT id FROM jobs WHERE state IN ('queued', 'failed') AND available_at_s <= ?"
                f"   AND kind IN ({marks}) ORDER BY priority DESC, available_at_s, id LIMIT 1)"
                " RETURNING *",
                (owner, now_s + lease_s, now_s, now_s, now_s, now_s, *kinds),
            ).fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            _event(conn, job.id, None, JobState.LEASED, owner, now_s, f"attempt {job.attempts}")
        return job

    def _guarded(self, conn: sqlite3.Connection, job: Job, owner: str, to_state: JobState, sets: str,
                 params: tuple, now_s: float, detail: str | None = None) -> None:
        _check(JobState.LEASED, to_state)
        changed = conn.execute(
            f"UPDATE jobs SET state = ?, {sets}, updated_at_s = ? WHERE id = ? AND state = ? AND lease_owner = ?",
            (str(to_state), *params, now_s, job.id, str(JobState.LEASED), owner),
        ).rowcount
        if changed == 0:
            raise LeaseLost(f"job {job.id} is no longer leased by {owner}")
        if to_state is not JobState.LEASED:
            _event(conn, job.id, JobState.LEASED, to_state, owner, now_s, detail)

    def heartbeat(self, job: Job, owner: str, lease_s: float, *, now_s: float | None = None) -> None:
        """Extend the lease. Raises LeaseLost when it was already taken away."""
        now_s = time.time() if now_s is None else now_s
        with self.index.transaction() as conn:
            self._guarded(conn, job, owner, JobState.LEASED, "lease_expires_at_s = ?", (now_s + lease_s,), now_s)

    def complete(self, job: Job, owner: str, *, result: dict | None = None, now_s: float | None = None,
                 conn: sqlite3.Connection | None = None) -> None:
        """leased -> done. With ``conn`` it runs inside the caller's transaction (so the job's outputs and its
        completion commit together). Raises LeaseLost."""
        now_s = time.time() if now_s is None else now_s
        sets = "lease_expires_at_s = NULL, result = ?, finished_at_s = ?, last_error = NULL"
        params = (json.dumps(result) if result is not None else None, now_s)
        if conn is not None:
            self._guarded(conn, job, owner, JobState.DONE, sets, params, now_s)
            return
        with self.index.transaction() as tx:
            self._guarded(tx, job, owner, JobState.DONE, sets, params, now_s)

    def fail(self, job: Job, owner: str, error: str, *, permanent: bool = False, now_s: float | None = None,
             conn: sqlite3.Connection | None = None) -> JobState:
        """leased -> failed (retry after backoff) or dead (attempts used up, or ``permanent``).
        Returns the new state. With ``conn``, inside the caller's transaction. Raises LeaseLost."""
        now_s = time.time() if now_s is None else now_s
        if conn is not None:
            return self._fail(conn, job, owner, error, permanent, now_s)
        with self.index.transaction() as tx:
            return self._fail(tx, job, owner, error, permanent, now_s)

    def _fail(self, conn, job: Job, owner: str, error: str, permanent: bool, now_s: float) -> JobState:
        row = conn.execute("SELECT attempts, max_attempts, retry_base_s FROM jobs WHERE id = ?",
                           (job.id,)).fetchone()
        dead = permanent or row["attempts"] >= row["max_attempts"]
        to_state = JobState.DEAD if dead else JobState.FAILED
        available = now_s + (0.0 if dead else backoff_s(row["retry_base_s"], row["attempts"]))
        self._guarded(
            conn, job, owner, to_state,
            "lease_expires_at_s = NULL, last_error = ?, available_at_s = ?,"
            " finished_at_s = CASE WHEN ? THEN ? END",
            (error[:2000], available, dead, now_s), now_s, error[:200],
        )
        return to_state

    # -- read-only -------------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        return Job.from_row(self.index.query("SELECT * FROM jobs WHERE id = ?", (job_id,))[0])

    def counts(self) -> dict[str, int]:
        return {row[0]: row[1] for row in self.index.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")}

    def next_available_in_s(self, *, now_s: float | None = None) -> float | None:
        """Seconds until the earliest leasable job becomes available (0 if one is now), None if there is none."""
        now_s = time.time() if now_s is None else now_s
        row = self.index.query(
            "SELECT MIN(available_at_s) FROM jobs WHERE state IN ('queued', 'failed')")[0]
        return None if row[0] is None else max(row[0] - now_s, 0.0)
