"""Assembly: from stored instances to plan studies that are ready for review, by the RT reference chain.

A plan study is keyed by what its plan references, never by PatientID (RayStation exports carry different
patient IDs on the plan and on its structure set and dose):

- key ``(rtstruct, <uid>, <RTPlanLabel>)``: every RTPLAN / RT Ion Plan whose ReferencedStructureSetSequence
  names that structure set and that carries that plan label. The latest plan received is the current one; a
  new plan SOP instance with the same label on the same structure set is a new *revision* of the same plan
  study, and its result supersedes the earlier one (issue 4, "Revisions"). The label keeps different plans
  on one structure set apart (Eclipse exports ``1_SOBP_2Gy`` and ``2_mono_2Gy`` on one structure set).
- key ``(plan, <uid>, "")``: a plan that references no structure set stands alone.

Members of a plan study (PS3.3 C.8.8.5, C.8.8.9, C.8.8.3): the current plan, the structure set, the images the
structure set references (ContourImageSequence, or its RT Referenced Series when it lists no images), and every
RTDOSE whose ReferencedRTPlanSequence names the current plan (PLAN or BEAM summation alike: a study whose only
dose is a BEAM dose is complete). For each SOP instance the latest stored *version* is used.

Readiness: complete (every member present) -> ready at once; otherwise ready ``stable_age_s`` after the last
related object (an apscheduler date trigger), with the reasons recorded. Each ready state is a revision,
identified by a content key over the members' (role, SOP Instance UID, content digest): an identical re-send
changes nothing, a new version of any member gives a new revision and a new review job
(UNIQUE(plan_study_id, content_key) and UNIQUE(plan_study_id, revision, kind) make both idempotent).

Nothing lives only in memory: :meth:`Assembler.start` re-evaluates every plan study from the index and
re-arms the timers, so a node killed between acknowledging an object and assembling it catches up.
"""

from __future__ import annotations

import hashlib
import logging
import queue as queue_module
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from apscheduler.schedulers.background import BackgroundScheduler

from rtqa_node.queue import JobKind, enqueue
from rtqa_node.store.describe import RefKind
from rtqa_node.store.index import Index

log = logging.getLogger(__name__)

RT_PLAN_CLASSES = ("1.2.840.10008.5.1.4.1.1.481.5", "1.2.840.10008.5.1.4.1.1.481.8")
RT_STRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
RT_DOSE_CLASS = "1.2.840.10008.5.1.4.1.1.481.2"
_RT_CLASSES = (*RT_PLAN_CLASSES, RT_STRUCT_CLASS, RT_DOSE_CLASS)

#: Review jobs are leased after dispatch jobs (finished results go out first); later: predicted risk.
REVIEW_PRIORITY = 0
#: Review retries: 5 s, 10 s, 20 s, ... (dispatch has its own setting, dispatch_retry_base_s).
REVIEW_RETRY_BASE_S = 5.0


class PlanStudyState:
    WAITING = "waiting"
    READY = "ready"


class Trigger:
    COMPLETE = "complete"
    STABLE_AGE = "stable_age"


Key = tuple[str, str, str]  # (key_kind, key_uid, key_label)


def plan_study_id(key: Key) -> str:
    """Stable id of a plan study: no UID text, same on every node and every restart."""
    text = "\x1f".join(key).encode("utf-8", "replace")
    return "ps-" + hashlib.sha256(text).hexdigest()[:12]


def short_uid(uid: str) -> str:
    """The distinctive tail of a UID for messages a person reads: '…' + the last two components."""
    parts = uid.split(".")
    return uid if len(parts) <= 3 else "…" + ".".join(parts[-2:])


@dataclass(frozen=True, slots=True)
class Member:
    instance_id: int
    role: str  # plan | rtstruct | image | dose
    sop_instance_uid: str
    content_sha256: str
    received_at_s: float


@dataclass(frozen=True, slots=True)
class Assessment:
    """What the index holds for one plan study right now. Pure data, computed by :func:`assess`."""

    plan_study_id: str
    key: Key
    plan_sop_instance_uid: str
    calling_ae: str
    members: tuple[Member, ...]
    #: why it is not complete; empty when complete
    reasons: tuple[str, ...]
    first_object_at_s: float
    last_object_at_s: float
    content_key: str = field(default="")

    @property
    def is_complete(self) -> bool:
        return not self.reasons


def _latest_versions(rows) -> list:
    """Of several rows for one SOP Instance UID, keep the highest version."""
    best: dict[str, object] = {}
    for row in rows:
        current = best.get(row["sop_instance_uid"])
        if current is None or row["version"] > current["version"]:
            best[row["sop_instance_uid"]] = row
    return list(best.values())


def plan_label(conn, instance_id: int) -> str:
    """RTPlanLabel of a stored plan, read from its file once and cached in ``plan_labels``."""
    row = conn.execute("SELECT rt_plan_label FROM plan_labels WHERE instance_id = ?", (instance_id,)).fetchone()
    if row is not None:
        return row[0]
    (path,) = conn.execute("SELECT path FROM instances WHERE id = ?", (instance_id,)).fetchone()
    data_dir = Path(conn.execute("PRAGMA database_list").fetchone()["file"]).parent
    try:
        ds = pydicom.dcmread(data_dir / path, stop_before_pixels=True, specific_tags=["RTPlanLabel"])
        label = str(ds.get("RTPlanLabel", "") or "").strip()
    except Exception:  # the store validated it; an unreadable label groups with the unlabelled plans
        label = ""
    try:
        conn.execute("INSERT OR REPLACE INTO plan_labels (instance_id, rt_plan_label) VALUES (?, ?)",
                     (instance_id, label))
    except sqlite3.OperationalError as exc:
        # Called inside the assembler's read snapshot: when an ingest has committed since the snapshot began,
        # SQLite refuses to upgrade it to a write at once (SQLITE_BUSY_SNAPSHOT; no busy timeout helps). The
        # label is right either way, only the cache entry waits for a later call: failing here failed the
        # whole assembly batch, and its plan studies were not evaluated until the next object arrived.
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise
    return label


def plan_key(conn, instance_id: int, sop_instance_uid: str) -> Key:
    rows = conn.execute("SELECT uid FROM refs WHERE instance_id = ? AND kind = ? ORDER BY uid",
                        (instance_id, RefKind.RTSTRUCT)).fetchall()
    if not rows:
        return ("plan", sop_instance_uid, "")
    return ("rtstruct", rows[0][0], plan_label(conn, instance_id))


_COLS = "i.id, i.sop_instance_uid, i.sop_class_uid, i.modality, i.version, i.content_sha256, i.received_at_s, i.calling_ae"


def assess(conn, key: Key) -> Assessment | None:
    """Evaluate the chain of the plan study with this key; None when no plan with this key is stored."""
    key_kind, key_uid, _ = key
    if key_kind == "rtstruct":
        candidates = conn.execute(
            f"SELECT {_COLS} FROM refs r JOIN instances i ON i.id = r.instance_id WHERE r.kind = ? AND r.uid = ?"
            f" AND i.sop_class_uid IN (?, ?)", (RefKind.RTSTRUCT, key_uid, *RT_PLAN_CLASSES)).fetchall()
        # a plan that names several structure sets belongs to the first (sorted) one only
        plans = [p for p in candidates if plan_key(conn, p["id"], p["sop_instance_uid"]) == key]
    else:
        plans = conn.execute(f"SELECT {_COLS} FROM instances i WHERE i.sop_instance_uid = ? AND i.sop_class_uid IN"
                             " (?, ?)", (key_uid, *RT_PLAN_CLASSES)).fetchall()
    if not plans:
        return None
    plan = max(plans, key=lambda r: r["id"])  # the latest received plan (or plan version) is current
    members = [Member(plan["id"], "plan", plan["sop_instance_uid"], plan["content_sha256"], plan["received_at_s"])]
    reasons: list[str] = []
    times = [p["received_at_s"] for p in plans]

    if key_kind == "rtstruct":
        structure_sets = _latest_versions(conn.execute(
            f"SELECT {_COLS} FROM instances i WHERE i.sop_instance_uid = ? AND i.sop_class_uid = ?",
            (key_uid, RT_STRUCT_CLASS)).fetchall())
        if not structure_sets:
            reasons.append(f"RTSTRUCT {key_uid} not received")
        else:
            rs = structure_sets[0]
            members.append(Member(rs["id"], "rtstruct", rs["sop_instance_uid"], rs["content_sha256"],
                                  rs["received_at_s"]))
            reasons.extend(_images(conn, rs["id"], members))
    else:
        reasons.append("plan references no RTSTRUCT")

    doses = _latest_versions(conn.execute(
        f"SELECT {_COLS} FROM refs r JOIN instances i ON i.id = r.instance_id"
        " WHERE r.kind = ? AND r.uid = ? AND i.sop_class_uid = ?",
        (RefKind.RTPLAN, plan["sop_instance_uid"], RT_DOSE_CLASS)).fetchall())
    for dose in sorted(doses, key=lambda r: r["sop_instance_uid"]):
        members.append(Member(dose["id"], "dose", dose["sop_instance_uid"], dose["content_sha256"],
                              dose["received_at_s"]))
    if not doses:
        reasons.append(f"waiting for RTDOSE referencing plan {short_uid(plan['sop_instance_uid'])}")

    times.extend(m.received_at_s for m in members)
    digest = hashlib.sha256()
    for m in sorted(members, key=lambda m: (m.role, m.sop_instance_uid)):
        digest.update(f"{m.role}:{m.sop_instance_uid}:{m.content_sha256}\n".encode("ascii", "replace"))
    return Assessment(
        plan_study_id=plan_study_id(key), key=key,
        plan_sop_instance_uid=plan["sop_instance_uid"], calling_ae=plan["calling_ae"], members=tuple(members),
        reasons=tuple(reasons), first_object_at_s=min(times), last_object_at_s=max(times),
        content_key=digest.hexdigest(),
    )


def _images(conn, rtstruct_id: int, members: list[Member]) -> list[str]:
    """Add the referenced images present to ``members``; return the reason when some are missing."""
    expected = {row[0] for row in conn.execute(
        "SELECT uid FROM refs WHERE instance_id = ? AND kind = ?", (rtstruct_id, RefKind.IMAGE))}
    if expected:
        present = _latest_versions(conn.execute(
            f"SELECT {_COLS} FROM refs r JOIN instances i ON i.sop_instance_uid = r.uid"
            " WHERE r.instance_id = ? AND r.kind = ? AND i.sop_class_uid NOT IN (?, ?, ?, ?)",
            (rtstruct_id, RefKind.IMAGE, *_RT_CLASSES)).fetchall())
    else:
        # no image list: take the referenced series as it is (its size cannot be checked)
        present = _latest_versions(conn.execute(
            f"SELECT {_COLS} FROM refs r JOIN instances i ON i.series_instance_uid = r.uid"
            " WHERE r.instance_id = ? AND r.kind = ? AND i.sop_class_uid NOT IN (?, ?, ?, ?)",
            (rtstruct_id, RefKind.IMAGE_SERIES, *_RT_CLASSES)).fetchall())
    for row in sorted(present, key=lambda r: r["sop_instance_uid"]):
        members.append(Member(row["id"], "image", row["sop_instance_uid"], row["content_sha256"],
                              row["received_at_s"]))
    modality = present[0]["modality"] if present else "CT"
    if expected and len(present) < len(expected):
        return [f"{modality} series has {len(present)} of {len(expected)} slices"]
    if not expected and not present:
        return ["RTSTRUCT references no images that were received"]
    return []


@dataclass(frozen=True, slots=True)
class Decision:
    plan_study_id: str
    state: str
    revision: int
    #: a new revision (and review job) was created by this evaluation
    new_revision: bool
    ready_due_at_s: float | None


def evaluate(conn, key: Key, *, stable_age_s: float, job_max_attempts: int,
             now_s: float | None = None) -> Decision | None:
    """Inside the caller's transaction: assess the plan study, record its state and reasons, and when it is
    ready with content not seen before, add a revision, its members and a review job."""
    now_s = time.time() if now_s is None else now_s
    a = assess(conn, key)
    if a is None:
        return None
    row = conn.execute("SELECT * FROM plan_studies WHERE id = ?", (a.plan_study_id,)).fetchone()
    first_at = min(a.first_object_at_s, row["first_object_at_s"]) if row else a.first_object_at_s
    revision = row["revision"] if row else 0
    reason = "; ".join(a.reasons)
    known = conn.execute("SELECT revision FROM plan_study_revisions WHERE plan_study_id = ? AND content_key = ?",
                         (a.plan_study_id, a.content_key)).fetchone()
    due = a.last_object_at_s + stable_age_s
    trigger = Trigger.COMPLETE if a.is_complete else (Trigger.STABLE_AGE if now_s >= due else None)
    new_revision = known is None and trigger is not None
    if known is not None or new_revision:
        state, ready_due = PlanStudyState.READY, None
    else:
        state, ready_due = PlanStudyState.WAITING, due
    if new_revision:
        revision += 1
    conn.execute(
        "INSERT INTO plan_studies (id, key_kind, key_uid, key_label, state, reason, plan_sop_instance_uid,"
        " calling_ae, first_object_at_s, last_object_at_s, ready_due_at_s, revision, updated_at_s)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET state = excluded.state,"
        " reason = excluded.reason, plan_sop_instance_uid = excluded.plan_sop_instance_uid,"
        " calling_ae = excluded.calling_ae, first_object_at_s = excluded.first_object_at_s,"
        " last_object_at_s = excluded.last_object_at_s, ready_due_at_s = excluded.ready_due_at_s,"
        " revision = excluded.revision, updated_at_s = excluded.updated_at_s",
        (a.plan_study_id, *key, state, reason, a.plan_sop_instance_uid, a.calling_ae, first_at,
         a.last_object_at_s, ready_due, revision, now_s),
    )
    if new_revision:
        conn.execute(
            "INSERT INTO plan_study_revisions (plan_study_id, revision, content_key, plan_sop_instance_uid,"
            " trigger, reason, calling_ae, ready_at_s) VALUES (?,?,?,?,?,?,?,?)",
            (a.plan_study_id, revision, a.content_key, a.plan_sop_instance_uid, trigger, reason, a.calling_ae,
             now_s),
        )
        conn.executemany(
            "INSERT INTO plan_study_members (plan_study_id, revision, instance_id, role) VALUES (?,?,?,?)",
            [(a.plan_study_id, revision, m.instance_id, m.role) for m in a.members],
        )
        previous = conn.execute(
            "SELECT id FROM jobs WHERE plan_study_id = ? AND kind = ? AND revision < ? ORDER BY revision DESC"
            " LIMIT 1", (a.plan_study_id, str(JobKind.REVIEW), revision)).fetchone()
        enqueue(conn, plan_study_id=a.plan_study_id, revision=revision, kind=JobKind.REVIEW,
                max_attempts=job_max_attempts, retry_base_s=REVIEW_RETRY_BASE_S, priority=REVIEW_PRIORITY,
                supersedes=previous[0] if previous else None, now_s=now_s)
    return Decision(a.plan_study_id, state, revision, new_revision, ready_due)


def affected_keys(conn, instance_id: int) -> set[Key]:
    """The plan-study keys an instance can change: its own plan, plans on a structure set, the plan a dose
    references, the structure sets that reference an image."""
    row = conn.execute("SELECT sop_instance_uid, sop_class_uid, series_instance_uid FROM instances WHERE id = ?",
                       (instance_id,)).fetchone()
    if row is None:
        return set()
    sop, sop_class = row["sop_instance_uid"], row["sop_class_uid"]
    if sop_class in RT_PLAN_CLASSES:
        return {plan_key(conn, instance_id, sop)}
    if sop_class == RT_STRUCT_CLASS:
        return _keys_on_structure_sets(conn, [sop])
    if sop_class == RT_DOSE_CLASS:
        keys = set()
        for plan in conn.execute(
                "SELECT i.id, i.sop_instance_uid FROM refs r JOIN instances i ON i.sop_instance_uid = r.uid"
                " WHERE r.instance_id = ? AND r.kind = ? AND i.sop_class_uid IN (?, ?)",
                (instance_id, RefKind.RTPLAN, *RT_PLAN_CLASSES)):
            keys.add(plan_key(conn, plan["id"], plan["sop_instance_uid"]))
        return keys
    structure_sets = conn.execute(
        "SELECT DISTINCT i.sop_instance_uid FROM refs r JOIN instances i ON i.id = r.instance_id"
        " WHERE ((r.kind = ? AND r.uid = ?) OR (r.kind = ? AND r.uid = ?)) AND i.sop_class_uid = ?",
        (RefKind.IMAGE, sop, RefKind.IMAGE_SERIES, row["series_instance_uid"], RT_STRUCT_CLASS)).fetchall()
    return _keys_on_structure_sets(conn, [r[0] for r in structure_sets])


def _keys_on_structure_sets(conn, structure_set_uids) -> set[Key]:
    keys: set[Key] = set()
    for uid in structure_set_uids:
        for plan in conn.execute(
                "SELECT i.id, i.sop_instance_uid FROM refs r JOIN instances i ON i.id = r.instance_id"
                " WHERE r.kind = ? AND r.uid = ? AND i.sop_class_uid IN (?, ?)",
                (RefKind.RTSTRUCT, uid, *RT_PLAN_CLASSES)).fetchall():
            keys.add(plan_key(conn, plan["id"], plan["sop_instance_uid"]))
    return keys


def all_keys(conn) -> set[Key]:
    marks = ",".join("?" * len(RT_PLAN_CLASSES))
    rows = conn.execute(f"SELECT id, sop_instance_uid FROM instances WHERE sop_class_uid IN ({marks})",
                        RT_PLAN_CLASSES).fetchall()
    return {plan_key(conn, r["id"], r["sop_instance_uid"]) for r in rows}


class Assembler:
    """Runs assembly beside the SCP: :meth:`notify` (called by the store after each durable ingest) only
    queues the instance id, so the C-STORE response never waits for assembly; one thread evaluates, with its
    own index connection; apscheduler fires the stable-age timers."""

    def __init__(self, index_path, *, stable_age_s: float, job_max_attempts: int) -> None:
        self.index = Index(index_path)
        self.stable_age_s = stable_age_s
        self.job_max_attempts = job_max_attempts
        self._inbox: queue_module.Queue = queue_module.Queue()
        self._thread = threading.Thread(target=self._run, name="assembler", daemon=True)
        self._scheduler = BackgroundScheduler(timezone=UTC)
        self._stopping = threading.Event()
        self._timers: dict[str, float] = {}  # stable-age job id -> due time armed (s since the epoch)

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._scheduler.start()
        self._inbox.put(("rescan", None))
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)
        self._scheduler.shutdown(wait=False)
        self.index.close()

    # -- inputs ----------------------------------------------------------------------------------------

    def notify(self, result) -> None:
        """Store hook: an object was stored (or received again). Cheap and never raises into the SCP."""
        self._inbox.put(("instance", result.instance_id))

    def _timer_fired(self, key: Key) -> None:
        self._inbox.put(("key", key))

    # -- the assembly thread ---------------------------------------------------------------------------

    #: After the first notification, gather more for this long before evaluating: a CT series arrives a few
    #: milliseconds per slice, and evaluating (and re-arming the stable-age timer) once per slice took a
    #: fifth of the node's CPU during ingest (benchmarks/ingest.py, py-spy --gil).
    GATHER_S = 0.05

    #: A batch that failed (a transient SQLite error, a bug met by one plan study) is retried after this delay,
    #: doubled on each consecutive failure up to the cap: its objects are stored and acknowledged, so dropping
    #: the batch would leave their plan study unreviewed until some other object arrived for it.
    RETRY_S = (0.5, 60.0)

    def _run(self) -> None:
        failures = 0
        while True:
            batch = [self._inbox.get()]
            deadline = time.monotonic() + self.GATHER_S
            while batch[-1][0] != "stop":  # 98 CT slices arriving together need one evaluation, not 98
                try:
                    batch.append(self._inbox.get(timeout=max(deadline - time.monotonic(), 0.0)))
                except queue_module.Empty:
                    break
            if any(kind == "stop" for kind, _ in batch):
                return
            try:
                retry = self._process(batch)
            except Exception:  # the reads failed: retry the whole batch
                log.exception("assembly_failed", extra={"items": len(batch)})
                retry = batch
            finally:
                for _ in batch:
                    self._inbox.task_done()
            failures = failures + 1 if retry else 0
            if retry:
                self._retry_later(retry, failures)

    def _retry_later(self, items: list, failures: int) -> None:
        first, cap = self.RETRY_S
        delay = min(first * 2 ** (failures - 1), cap)
        log.warning("assembly_retry", extra={"items": len(items), "in_s": delay, "failures": failures})
        self._scheduler.add_job(self._requeue, "date", args=[items],
                                run_date=datetime.fromtimestamp(time.time() + delay, tz=UTC),
                                misfire_grace_time=None)

    def _requeue(self, items: list) -> None:
        for item in items:
            self._inbox.put(item)

    def _process(self, batch) -> list:
        """Evaluate the plan studies the batch touches; return the ("key", key) items whose evaluation failed
        (one failing plan study does not hold up the others)."""
        keys: set[Key] = set()
        with self.index.snapshot() as conn:  # reads only: ingests keep the write lock to themselves meanwhile
            for kind, value in batch:
                if kind == "rescan":
                    keys |= all_keys(conn)
                elif kind == "instance":
                    keys |= affected_keys(conn, value)
                elif kind == "key":
                    keys.add(value)
        failed = []
        for key in sorted(keys):
            try:
                with self.index.transaction() as conn:
                    decision = evaluate(conn, key, stable_age_s=self.stable_age_s,
                                        job_max_attempts=self.job_max_attempts)
            except Exception:
                log.exception("assembly_failed", extra={"plan_study_id": plan_study_id(key)})
                failed.append(("key", key))
                continue
            if decision is not None:
                self._after(key, decision)
        return failed

    def _after(self, key: Key, decision: Decision) -> None:
        job_id = f"stable-age:{decision.plan_study_id}"
        if decision.ready_due_at_s is not None:
            if self._timers.get(job_id) == decision.ready_due_at_s and self._scheduler.get_job(job_id) is not None:
                return self._log_decision(decision)  # the same timer is armed: re-arming it costs apscheduler work
            self._timers[job_id] = decision.ready_due_at_s
            self._scheduler.add_job(
                self._timer_fired, "date", args=[key], id=job_id, replace_existing=True,
                run_date=datetime.fromtimestamp(decision.ready_due_at_s + 0.01, tz=UTC),
                misfire_grace_time=None,
            )
        elif self._scheduler.get_job(job_id) is not None:
            self._timers.pop(job_id, None)
            self._scheduler.remove_job(job_id)
        self._log_decision(decision)

    @staticmethod
    def _log_decision(decision: Decision) -> None:
        if decision.new_revision:
            log.info("plan_study_ready", extra={"plan_study_id": decision.plan_study_id,
                                                "revision": decision.revision})
        else:
            log.debug("plan_study_assessed", extra={"plan_study_id": decision.plan_study_id,
                                                    "state": decision.state})

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """For tests: wait until every queued notification has been processed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._inbox.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

