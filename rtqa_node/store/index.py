"""The SQLite index: one row per stored SOP instance version, its references, and (later stages) plan studies,
jobs and dispatches.

SQLite in WAL mode with ``synchronous=FULL``: a committed transaction survives power loss, readers (the
worklist, ``rtqa status``) never block the writer. Schema changes go through :data:`MIGRATIONS`, applied in
order and recorded in ``PRAGMA user_version``, so an index written by an older node opens in a newer one.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
        sha256 TEXT NOT NULL,                  -- of the data set bytes as received (after the file meta)
        -- of the content whatever its encoding (implicit/explicit VR, deflate): same value = same object
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


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in filter(str.strip, script.split(";")):
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
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error), holding the writer lock."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def counts(self) -> dict[str, int]:
        row = self.query(
            "SELECT COUNT(*) AS instances, COUNT(DISTINCT sop_instance_uid) AS sop_instances, "
            "COUNT(DISTINCT study_instance_uid) AS studies, COUNT(DISTINCT series_instance_uid) AS series, "
            "COALESCE(SUM(size_bytes), 0) AS bytes FROM instances"
        )[0]
        return dict(row)
