"""Dispatch: deliver a revision's result objects from the outbox to whoever sent the plan.

Dispatch is a job kind in the same queue as the review (``kind = 'dispatch'``, one per plan study revision,
UNIQUE(plan_study_id, revision, kind)), created in the transaction that completes the review, and run by the
same worker processes. So it inherits leases, retries with exponential backoff (``dispatch_retry_base_s``),
dead-lettering after ``dispatch_max_attempts`` with the last error, and survival across kill -9. Dispatch jobs
have a higher priority than reviews: finished results go out before new reviews start.

Where to: ``destinations[calling AE of the current plan]``, else ``default_destination``, and of the revision's
outbox objects only the destination's ``outputs`` (SR, risk map RT Dose, Parametric Map, PDF; told apart by SOP
class); none configured is a permanent error (dead letter, visible in ``rtqa status``). ``shadow_mode`` keeps
results in the outbox and completes the job without sending. Delivery is at least once: a worker killed after the C-STORE and before
its COMMIT sends again; the receiver sees the same SOP Instance UID (deterministic, see ``worker.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from rtqa_node.config import Destination, Settings
from rtqa_node.dicom.scu import SendTimeouts, send_files
from rtqa_node.errors import PermanentError
from rtqa_node.report.kinds import KIND_BY_SOP_CLASS
from rtqa_node.review import Review, Verdict

log = logging.getLogger(__name__)

DISPATCH_PRIORITY = 100
#: targets whose probability is a risk; local control is a good outcome, so its risk is 1 - p
_ADVERSE = {"qa_major": False, "xerostomia_severe": False, "dysphagia_severe": False, "local_control": True}
#: without predictions, the rule verdict orders delivery
_VERDICT_RISK = {Verdict.MAJOR: 1.0, Verdict.NOT_EVALUABLE: 0.75, Verdict.MINOR: 0.5, Verdict.PER_PROTOCOL: 0.0}


def review_risk(review: Review) -> float:
    """The plan's risk in [0, 1]: the highest adverse probability among the model's predictions (the QA verdict
    being major, severe toxicity, local failure); without predictions, the rule verdict's severity."""
    risks = [1.0 - p.probability if _ADVERSE[p.target] else p.probability
             for p in review.predictions if p.target in _ADVERSE]
    return max(risks) if risks else _VERDICT_RISK[review.verdict]


def dispatch_priority(review: Review) -> int:
    """Queue priority of a revision's delivery: riskier plans are sent (and reach the TPS and worklist) first.
    Always above every review job's priority, so finished results never wait behind new reviews."""
    return DISPATCH_PRIORITY + round(100 * review_risk(review))


@dataclass(frozen=True, slots=True)
class DispatchOutcome:
    destination: str  # "AE@host:port", or "shadow"
    objects: int


def destination_for(settings: Settings, calling_ae: str) -> Destination:
    """Raises PermanentError when neither a per-AE nor a default destination is configured."""
    destination = settings.destinations.get(calling_ae) or settings.default_destination
    if destination is None:
        raise PermanentError(f"no destination configured for calling AE {calling_ae!r} and no default_destination")
    return destination


def dispatch_revision(settings: Settings, index, plan_study_id: str, revision: int) -> DispatchOutcome:
    """Send the outbox objects of one revision. Does not touch the job (the worker does, with the outcome).

    Raises:
        RetryableError: the destination is down or busy (see ``dicom.scu``).
        PermanentError: nothing to send to, or the destination refuses the objects.
    """
    rows = index.query("SELECT id, path, sop_class_uid FROM outbox WHERE plan_study_id = ? AND revision = ?"
                       " ORDER BY id", (plan_study_id, revision))
    if not rows:
        raise PermanentError(f"outbox holds no result for {plan_study_id} revision {revision}")
    if settings.shadow_mode:
        return DispatchOutcome("shadow", len(rows))
    (calling_ae,) = index.query("SELECT calling_ae FROM plan_study_revisions WHERE plan_study_id = ? AND"
                                " revision = ?", (plan_study_id, revision))[0]
    destination = destination_for(settings, calling_ae)
    # the destination's outputs (config: Destination.outputs), told apart by SOP class
    rows = [row for row in rows if KIND_BY_SOP_CLASS.get(row["sop_class_uid"]) in destination.outputs]
    if not rows:
        log.info("results_not_wanted", extra={"plan_study_id": plan_study_id, "revision": revision})
        return DispatchOutcome(f"{destination.ae_title}@{destination.host}:{destination.port}", 0)
    paths = [settings.data_dir / row["path"] for row in rows]
    timeouts = SendTimeouts(acse_s=settings.acse_timeout_s, dimse_s=settings.dimse_timeout_s,
                            network_s=settings.network_timeout_s)
    send_files(destination, paths, calling_ae=settings.ae_title, timeouts=timeouts)
    now_s = time.time()
    with index.transaction() as conn:
        conn.executemany("UPDATE outbox SET sent_at_s = ?, send_count = send_count + 1 WHERE id = ?",
                         [(now_s, row["id"]) for row in rows])
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    log.info("results_sent", extra={"plan_study_id": plan_study_id, "revision": revision, "objects": len(rows),
                                    "destination": where})
    return DispatchOutcome(where, len(rows))


def outbox_path(plan_study_id: str, revision: int, kind: str) -> Path:
    """Relative to the data directory: ``outbox/<plan study id>/r<revision>-<kind>.dcm`` (no UID text)."""
    return Path("outbox") / plan_study_id / f"r{revision}-{kind}.dcm"
