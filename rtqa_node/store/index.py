"""The SQLite index: one row per stored SOP instance version, its references, and (later stages) plan studies,
jobs and dispatches.

SQLite in WAL mode with ``synchronous=FULL``: a committed transaction survives power loss, readers (the
worklist, ``rtqa status``) never block the writer. The store commits its instance rows with
``transaction(durable=False)`` where the files carry what rebuilds them (see ``store.py``). Schema changes go through :data:`MIGRATIONS`, applied in
order and recorded in ``PRAGMA user_version``, so an index written by an older node opens in a newer one.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

MIGRATIONS: list[str] = [
    # 1: instances and their reference edges
    """
    CREATE TABLE instances (
        id INTEGER PRIMARY KEY,
        sop_instance_uid TEXT NOT NULL,
        sop_class_uid TEXT NOT NULL,
        modality TEXT NOT NULL,
        patient_id TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        frame_of_reference_uid TEXT NOT NULL,
        instance_number INTEGER,
        transfer_syntax_uid TEXT NOT NULL,
        -- 1 for the first content received under this SOP Instance UID, 2 for different content later, ...
        version INTEGER NOT NULL,
        calling_ae TEXT NOT NULL,
        called_ae TEXT NOT NULL,
        peer_address TEXT NOT NULL,
        peer_port INTEGER NOT NULL,
        received_at_s REAL NOT NULL,          -- Unix time, UTC
        path TEXT NOT NULL UNIQUE,             -- relative to the data directory
        size_bytes INTEGER NOT NULL,           -- whole Part 10 file
        dataset_offset_bytes INTEGER NOT NULL, -- where the data set starts in the file (after the file meta)
        -- SHA-256 over the data set's tags and values whatever their encoding (implicit/explicit VR, deflate,
        -- sequence length style): same value = same object, and what an integrity check recomputes
        content_sha256 TEXT NOT NULL,
        receive_count INTEGER NOT NULL DEFAULT 1,
        UNIQUE (sop_instance_uid, content_sha256),
        UNIQUE (sop_instance_uid, version)
    );
    CREATE INDEX instances_study ON instances (study_instance_uid);
    CREATE INDEX instances_series ON instances (series_instance_uid);
    CREATE INDEX instances_for ON instances (frame_of_reference_uid);
    CREATE TABLE refs (
        instance_id INTEGER NOT NULL REFERENCES instances (id),
        kind TEXT NOT NULL,
        uid TEXT NOT NULL,
        PRIMARY KEY (instance_id, kind, uid)
    ) WITHOUT ROWID;
    CREATE INDEX refs_target ON refs (kind, uid);
    """,
    # 2: plan studies (assembly), their revisions and members; the job queue with its event log; the outbox
    """
    CREATE TABLE plan_studies (
        id TEXT PRIMARY KEY,                   -- 'ps-' + 12 hex digits of SHA-256 over the key
        key_kind TEXT NOT NULL,                -- 'rtstruct' (plans sharing a structure set and label) or 'plan'
        key_uid TEXT NOT NULL,
        key_label TEXT NOT NULL,               -- RTPlanLabel ('' for key_kind 'plan')
        state TEXT NOT NULL,                   -- waiting | ready
        reason TEXT NOT NULL DEFAULT '',       -- why not complete ('' when complete)
        plan_sop_instance_uid TEXT NOT NULL,   -- the current (latest) plan
        calling_ae TEXT NOT NULL,              -- who sent the current plan: results go back there
        first_object_at_s REAL NOT NULL,
        last_object_at_s REAL NOT NULL,
        ready_due_at_s REAL,                   -- when the stable-age fallback fires while waiting
        revision INTEGER NOT NULL DEFAULT 0,   -- latest revision made ready (0: none yet)
        updated_at_s REAL NOT NULL,
        UNIQUE (key_kind, key_uid, key_label)
    );
    CREATE TABLE plan_labels (
        instance_id INTEGER PRIMARY KEY REFERENCES instances (id),
        rt_plan_label TEXT NOT NULL
    );
    CREATE TABLE plan_study_revisions (
        plan_study_id TEXT NOT NULL REFERENCES plan_studies (id),
        revision INTEGER NOT NULL,
        content_key TEXT NOT NULL,             -- SHA-256 over the members' (role, SOP UID, content digest)
        plan_sop_instance_uid TEXT NOT NULL,
        trigger TEXT NOT NULL,                 -- complete | stable_age
        reason TEXT NOT NULL,
        calling_ae TEXT NOT NULL,
        ready_at_s REAL NOT NULL,
        PRIMARY KEY (plan_study_id, revision),
        UNIQUE (plan_study_id, content_key)
    );
    CREATE TABLE plan_study_members (
        plan_study_id TEXT NOT NULL,
        revision INTEGER NOT NULL,
        instance_id INTEGER NOT NULL REFERENCES instances (id),
        role TEXT NOT NULL,                    -- plan | rtstruct | image | dose
        PRIMARY KEY (plan_study_id, revision, instance_id)
    ) WITHOUT ROWID;
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        plan_study_id TEXT NOT NULL REFERENCES plan_studies (id),
        revision INTEGER NOT NULL,
        kind TEXT NOT NULL,                    -- review | dispatch
        state TEXT NOT NULL,                   -- queued | leased | done | failed | dead
        priority INTEGER NOT NULL DEFAULT 0,   -- higher first
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        retry_base_s REAL NOT NULL,
        available_at_s REAL NOT NULL,          -- not leased before this (retry backoff)
        lease_owner TEXT,
        lease_expires_at_s REAL,
        last_error TEXT,
        supersedes INTEGER REFERENCES jobs (id),
        result TEXT,                           -- JSON summary written by the worker
        created_at_s REAL NOT NULL,
        first_leased_at_s REAL,
        leased_at_s REAL,
        finished_at_s REAL,
        updated_at_s REAL NOT NULL,
        UNIQUE (plan_study_id, revision, kind)
    );
    CREATE INDEX jobs_state_available ON jobs (state, available_at_s);
    CREATE INDEX jobs_state_lease ON jobs (state, lease_expires_at_s);
    CREATE TABLE job_events (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        from_state TEXT,
        to_state TEXT NOT NULL,
        owner TEXT,
        at_s REAL NOT NULL,
        detail TEXT
    );
    CREATE INDEX job_events_job ON job_events (job_id);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        plan_study_id TEXT NOT NULL,
        revision INTEGER NOT NULL,
        sop_instance_uid TEXT NOT NULL UNIQUE,  -- deterministic (uuid5): a re-run writes the same object
        sop_class_uid TEXT NOT NULL,
        path TEXT NOT NULL,                     -- relative to the data directory
        created_at_s REAL NOT NULL,
        sent_at_s REAL,
        send_count INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX outbox_job ON outbox (plan_study_id, revision);
    """,
]


def connect(path: Path) -> sqlite3.Connection:
    """Open (and create or migrate) the index. The connection may be used from any thread, one at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), never implicit.
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    _migrate(conn)
    return conn


def _statements(script: str) -> list[str]:
    """Split a migration into statements (a ';' inside a comment or string does not end one)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current)
            current = ""
    if current.strip():
        statements.append(current)
    return statements


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class Index:
    """A thread-safe handle on the index: one connection, one writer at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = connect(path)
        self.db = sqlite_utils.Database(self.conn)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error), holding the writer lock.

        ``durable=False`` commits with ``synchronous=NORMAL``: no fsync of the WAL, so the transaction survives a
        crash of the process but may roll back on power loss (until the next durable commit or checkpoint of
        any connection syncs the WAL, which covers every earlier transaction: the WAL is a log). Only for rows
        that can be rebuilt from durable data: the store's instance rows (``Store.recover``).
        """
        with self._lock:
            if not durable:
                self.conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._begin_immediate()
                try:
                    yield self.conn
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
                self.conn.execute("COMMIT")
            finally:
                if not durable:
                    self.conn.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction (``BEGIN DEFERRED``): one consistent view without taking the write lock, so
        writers (the store's ingest) never wait for it (WAL readers and the writer do not block each other)."""
        with self._lock:
            self.conn.execute("BEGIN DEFERRED")
            try:
                yield self.conn
            finally:
                self.conn.execute("COMMIT")

    #: waits between attempts to take the write lock (s); the last one repeats until ``BUSY_TIMEOUT_S``
    _BEGIN_WAITS_S = (0.0001, 0.0002, 0.0005, 0.001)
    BUSY_TIMEOUT_S = 30.0

    def _begin_immediate(self) -> None:
        """``BEGIN IMMEDIATE``, polling for the write lock every 0.1-1 ms. SQLite's own busy handler sleeps 1, 2,
        5, 10 ... ms, while another connection holds the lock for a fraction of a millisecond (a commit): an
        ingest waited milliseconds for the assembler's commits (``benchmarks/ingest.py --profile``)."""
        conn = self.conn
        conn.execute("PRAGMA busy_timeout=0")
        try:
            deadline = time.monotonic() + self.BUSY_TIMEOUT_S
            attempt = 0
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                        raise
                time.sleep(self._BEGIN_WAITS_S[min(attempt, len(self._BEGIN_WAITS_S) - 1)])
                attempt += 1
        finally:
            conn.execute("PRAGMA busy_timeout=30000")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def counts(self) -> dict[str, int]:
        """Read-side summary through sqlite-utils (the hot write path uses guarded SQL transactions instead)."""
        with self._lock:
            return next(self.db.query(
                "SELECT COUNT(*) AS instances, COUNT(DISTINCT sop_instance_uid) AS sop_instances, "
                "COUNT(DISTINCT study_instance_uid) AS studies, COUNT(DISTINCT series_instance_uid) AS series, "
                "COALESCE(SUM(size_bytes), 0) AS bytes FROM instances"
            ))

    def table_counts(self) -> dict[str, int]:
        """Rows per table, for ``rtqa status`` and diagnostics."""
        with self._lock:
            return {name: self.db[name].count for name in self.db.table_names()}
