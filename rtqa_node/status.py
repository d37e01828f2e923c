"""``rtqa status``: what the node holds, as a JSON document and as text for a person. Read-only."""

from __future__ import annotations

import time

from rtqa_node.config import MODEL_WEIGHTS_NAME, Settings, model_folder
from rtqa_node.store.index import Index


def collect_status(settings: Settings) -> dict:
    index = Index(settings.index_path)
    try:
        counts = index.counts()
        modalities = {row["modality"] or "?": row["n"] for row in index.query(
            "SELECT modality, COUNT(*) AS n FROM instances GROUP BY modality ORDER BY modality")}
        studies = [dict(row) for row in index.query(
            "SELECT study_instance_uid, COUNT(*) AS instances, GROUP_CONCAT(DISTINCT modality) AS modalities,"
            " MIN(received_at_s) AS first_received_at_s, MAX(received_at_s) AS last_received_at_s"
            " FROM instances GROUP BY study_instance_uid ORDER BY first_received_at_s")]
        versions = index.query("SELECT COUNT(*) FROM instances WHERE version > 1")[0][0]
        plan_studies = _plan_studies(index)
        jobs = {row[0]: row[1] for row in index.query(
            "SELECT state, COUNT(*) FROM jobs GROUP BY state ORDER BY state")}
        jobs_by_kind: dict[str, dict[str, int]] = {}
        for row in index.query("SELECT kind, state, COUNT(*) AS n FROM jobs GROUP BY kind, state"):
            jobs_by_kind.setdefault(row["kind"], {})[row["state"]] = row["n"]
        dead_letters = [dict(row) for row in index.query(
            "SELECT id AS job_id, kind, plan_study_id, revision, attempts, last_error, finished_at_s"
            " FROM jobs WHERE state = 'dead' ORDER BY id")]
        outbox = dict(index.query("SELECT COUNT(*) AS results, COUNT(sent_at_s) AS sent FROM outbox")[0])
        tables = index.table_counts()
    finally:
        index.close()
    return {
        "data_dir": str(settings.data_dir),
        "instances": counts["instances"],
        "sop_instances": counts["sop_instances"],
        "studies": counts["studies"],
        "series": counts["series"],
        "bytes": counts["bytes"],
        "conflicting_versions": versions,
        "modalities": modalities,
        "study_list": studies,
        "plan_studies": plan_studies,
        "jobs": jobs,
        "jobs_by_kind": jobs_by_kind,
        "dead_letters": dead_letters,
        "outbox": outbox,
        "index_tables": tables,
        "review_model": _review_model(settings),
    }


def _review_model(settings: Settings) -> dict | None:
    """The configured review model and whether its weights are there (without loading torch)."""
    if settings.review_model is None:
        return None
    folder = model_folder(settings.review_model)
    return {"name": settings.review_model, "folder": str(folder), "present": (folder / MODEL_WEIGHTS_NAME).is_file()}


def _plan_studies(index: Index) -> list[dict]:
    """Per plan study: id, state, reason and the timeline of its latest revision.

    ``state`` is the assembly state while waiting, else the furthest stage of the latest revision:
    ready (job queued) -> reviewing (leased) -> reviewed (done) -> dispatched, or review_retrying / failed
    (dead review) / dispatch_retrying / dispatch_failed.
    """
    rows = index.query(
        "SELECT p.id, p.state, p.reason, p.revision, p.calling_ae, p.first_object_at_s, p.last_object_at_s,"
        " p.ready_due_at_s, r.trigger, r.ready_at_s,"
        " rv.state AS review_state, rv.first_leased_at_s AS leased_at_s, rv.finished_at_s AS reviewed_at_s,"
        " rv.last_error AS review_error, rv.supersedes,"
        " d.state AS dispatch_state, d.finished_at_s AS dispatch_finished_at_s, d.last_error AS dispatch_error"
        " FROM plan_studies p"
        " LEFT JOIN plan_study_revisions r ON r.plan_study_id = p.id AND r.revision = p.revision"
        " LEFT JOIN jobs rv ON rv.plan_study_id = p.id AND rv.revision = p.revision AND rv.kind = 'review'"
        " LEFT JOIN jobs d ON d.plan_study_id = p.id AND d.revision = p.revision AND d.kind = 'dispatch'"
        " ORDER BY p.first_object_at_s, p.id")
    result = []
    for row in rows:
        state = row["state"]
        if state == "ready":
            state = _stage(row["review_state"], row["dispatch_state"])
        result.append({
            "id": row["id"],
            "state": state,
            "reason": row["reason"],
            "revision": row["revision"],
            "ready_by": row["trigger"],
            "calling_ae": row["calling_ae"],
            "ready_due_at_s": row["ready_due_at_s"],
            "supersedes_job": row["supersedes"],
            "errors": [e for e in (row["review_error"], row["dispatch_error"]) if e],
            "timeline": {
                "first_object_at_s": row["first_object_at_s"],
                "last_object_at_s": row["last_object_at_s"],
                "ready_at_s": row["ready_at_s"],
                "leased_at_s": row["leased_at_s"],
                "done_at_s": row["reviewed_at_s"],
                "dispatched_at_s": row["dispatch_finished_at_s"] if row["dispatch_state"] == "done" else None,
            },
        })
    return result


def _stage(review: str | None, dispatch: str | None) -> str:
    if dispatch == "done":
        return "dispatched"
    if dispatch == "dead":
        return "dispatch_failed"
    if dispatch == "failed":
        return "dispatch_retrying"
    if review == "dead":
        return "failed"
    if review == "done":
        return "reviewed"
    return {"leased": "reviewing", "failed": "review_retrying"}.get(review or "", "ready")


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def format_status(doc: dict) -> str:
    lines = [
        f"rtqa node data in {doc['data_dir']}",
        f"  objects: {doc['instances']} ({doc['bytes'] / 1e6:.1f} MB) in {doc['series']} series, "
        f"{doc['studies']} studies",
        "  by modality: " + (", ".join(f"{m} {n}" for m, n in doc["modalities"].items()) or "none"),
    ]
    model = doc.get("review_model")
    if model is None:
        lines.append("  review model: none (rule-based review only)")
    else:
        state = "" if model["present"] else " MISSING: reviews get no predictions (set RTQA_MODELS_DIR)"
        lines.append(f"  review model: {model['name']} ({model['folder']}){state}")
    if doc["conflicting_versions"]:
        lines.append(f"  objects re-sent with different content (kept as new versions): {doc['conflicting_versions']}")
    for study in doc["study_list"]:
        lines.append(
            f"  study {study['study_instance_uid']}: {study['instances']} objects ({study['modalities']}), "
            f"received {_when(study['first_received_at_s'])} .. {_when(study['last_received_at_s'])}"
        )
    lines.append(f"  plan studies: {len(doc['plan_studies'])}")
    for ps in doc["plan_studies"]:
        reason = f" ({ps['reason']})" if ps.get("reason") else ""
        revision = f" r{ps['revision']}" if ps.get("revision") else ""
        lines.append(f"    {ps['id']}{revision}: {ps['state']}{reason}")
        timeline = ps.get("timeline") or {}
        steps = [(name[: -len("_at_s")], timeline.get(name)) for name in
                 ("first_object_at_s", "ready_at_s", "leased_at_s", "done_at_s", "dispatched_at_s")]
        lines.append("      " + "  ".join(f"{name.replace('_', ' ')} {_when(at)}" for name, at in steps))
    if doc["jobs"]:
        lines.append("  jobs: " + ", ".join(f"{state} {n}" for state, n in doc["jobs"].items()))
    for dead in doc.get("dead_letters", []):
        lines.append(f"  dead letter: job {dead['job_id']} ({dead['kind']}, {dead['plan_study_id']} "
                     f"r{dead['revision']}, {dead['attempts']} attempts): {dead['last_error']}")
    return "\n".join(lines) + "\n"
