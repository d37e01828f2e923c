"""``rtqa status``: what the node holds, as a JSON document and as text for a person. Read-only."""

from __future__ import annotations

import time

from rtqa_node.config import Settings
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
        "plan_studies": [],
        "jobs": {},
    }


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def format_status(doc: dict) -> str:
    lines = [
        f"rtqa node data in {doc['data_dir']}",
        f"  objects: {doc['instances']} ({doc['bytes'] / 1e6:.1f} MB) in {doc['series']} series, "
        f"{doc['studies']} studies",
        "  by modality: " + (", ".join(f"{m} {n}" for m, n in doc["modalities"].items()) or "none"),
    ]
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
        lines.append(f"    {ps['id']}: {ps['state']}{reason}")
    if doc["jobs"]:
        lines.append("  jobs: " + ", ".join(f"{state} {n}" for state, n in doc["jobs"].items()))
    return "\n".join(lines) + "\n"
