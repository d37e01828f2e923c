"""Everything the node sends back for one reviewed plan study revision, built from a ``Review``.

Output kinds (``Destination.outputs`` in the settings picks which ones a receiver gets):

- ``sr``: the Comprehensive 3D SR (:mod:`rtqa_node.report.sr`), always built;
- ``riskmap_rtdose``: the risk map as RT Dose (TPS and RT viewers), when a risk map applies;
- ``parametric_map``: the risk map as a float Parametric Map (radiology viewers), when a risk map applies and
  the CT is present;
- ``pdf``: the one-page summary as an Encapsulated PDF; the PDF and PNG files are written beside it.

UIDs are deterministic: ``2.25.<uuid5(plan_study_id/revision/kind/RESULT_VERSION)>`` (:func:`result_uid`); the SR
keeps the kind ``review`` it always had, so a re-run after a crash writes the same objects and a receiver sees
duplicates as such. Bump :data:`RESULT_VERSION` whenever the content changes meaning (a new review algorithm or
model version included): the new results then get new UIDs and replace the old ones as predecessors.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from rtqa_node.errors import InputError
from rtqa_node.report import render, riskmap, sr
from rtqa_node.report.kinds import OUTPUT_KINDS, PARAMETRIC_MAP, PDF, RISKMAP_RTDOSE, SR
from rtqa_node.review import Review
from rtqa_node.rt.plan_study import PlanStudy

log = logging.getLogger(__name__)

#: Part of the result UIDs: bump when the result content changes meaning, so new results get new UIDs.
#: report-2: the model's predictions and its attention as the risk map, by default (Settings.review_model)
RESULT_VERSION = "report-2"
_UID_NAMESPACE = uuid.UUID("6f1c8a52-63c0-4b7e-9d5e-0a3c1f2b7e41")

#: the result kind in the UID (and outbox file name) of each output; the SR keeps the job kind "review"
UID_KIND = {SR: "review", RISKMAP_RTDOSE: "riskmap_rtdose", PARAMETRIC_MAP: "parametric_map", PDF: "pdf"}


def result_uid(plan_study_id: str, revision: int, kind: str, version: str | None = None) -> str:
    """Deterministic UID of a result object (PS3.5 B.2: 2.25 + the UUID as an integer); ``version`` defaults
    to :data:`RESULT_VERSION`."""
    name = f"{plan_study_id}/{revision}/{kind}/{RESULT_VERSION if version is None else version}"
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


@dataclass(frozen=True)
class ReportObject:
    kind: str  # one of OUTPUT_KINDS
    dataset: Dataset


@dataclass(frozen=True)
class ReviewOutputs:
    objects: tuple[ReportObject, ...]
    summary: render.Summary | None


def study_files(study: PlanStudy) -> list[Path]:
    files = [p.file for p in study.plans] + [s.file for s in study.structure_sets] + [d.file for d in study.doses]
    if study.ct is not None:
        files += list(study.ct.files)
    return list(dict.fromkeys(files))


def _plan_header(evidence: Sequence[Dataset]) -> Dataset:
    return next((e for e in evidence if str(e.get("Modality", "")) == "RTPLAN"), evidence[0])


def build_review_outputs(review: Review, study: PlanStudy | None, evidence: Sequence[Dataset], *,
                         plan_study_id: str, revision: int, kinds: Iterable[str] = OUTPUT_KINDS,
                         predecessors: Sequence[Dataset] = (), risk: riskmap.RiskMap | None = None) -> ReviewOutputs:
    """Build the requested outputs (the SR always). ``study`` None (nothing loadable): the SR only.
    ``risk``: the risk map to send; without it, the model's attention when the review carries one
    (:func:`model_risk_map`), else the interim OAR-excess map (:func:`rtqa_node.report.riskmap.oar_excess_risk_map`).

    Raises:
        ValueError: an unknown output kind, or no evidence.
    """
    kinds = set(kinds)
    unknown = kinds - set(OUTPUT_KINDS)
    if unknown:
        raise ValueError(f"unknown output kinds {sorted(unknown)}; known: {OUTPUT_KINDS}")
    with sr.quiet_identity_validation():
        return _build(review, study, evidence, plan_study_id=plan_study_id, revision=revision, kinds=kinds,
                      predecessors=predecessors, risk=risk)


def _build(review: Review, study: PlanStudy | None, evidence: Sequence[Dataset], *, plan_study_id: str,
           revision: int, kinds: set[str], predecessors: Sequence[Dataset],
           risk: riskmap.RiskMap | None) -> ReviewOutputs:
    plan = _plan_header(evidence)

    def uids(kind: str) -> dict:
        return {"sop_instance_uid": result_uid(plan_study_id, revision, UID_KIND[kind]),
                "series_instance_uid": result_uid(plan_study_id, 0, "series" if kind == SR else f"series-{kind}"),
                "instance_number": revision}

    objects = [ReportObject(SR, sr.build_review_sr(review, evidence, predecessors=predecessors, **uids(SR)))]
    if risk is None and study is not None and kinds & {RISKMAP_RTDOSE, PARAMETRIC_MAP, PDF}:
        risk = model_risk_map(review, study) or riskmap.oar_excess_risk_map(review, study)
    if risk is not None and RISKMAP_RTDOSE in kinds:
        objects.append(ReportObject(RISKMAP_RTDOSE, riskmap.riskmap_rtdose(risk, plan, **uids(RISKMAP_RTDOSE))))
    if risk is not None and PARAMETRIC_MAP in kinds and study is not None and study.ct is not None \
            and study.ct.frame_of_reference_uid == risk.frame_of_reference_uid:
        ct = [pydicom.dcmread(f, stop_before_pixels=True, force=True) for f in study.ct.files]
        for header in ct:  # highdicom copies the patient and study from the CT
            sr.sanitise_identity(header)
        objects.append(ReportObject(PARAMETRIC_MAP, riskmap.riskmap_parametric_map(risk, ct, **uids(PARAMETRIC_MAP))))
    summary = None
    if PDF in kinds:
        label = study.plans[0].label if study is not None and study.plans else ""
        title = f"RTQA plan review: {label or 'plan'} (revision {revision})"
        summary = render.render_summary(review, study, risk, title=title)
        objects.append(ReportObject(PDF, render.encapsulated_pdf(summary.pdf_bytes, plan, document_title=title,
                                                                 **uids(PDF))))
    return ReviewOutputs(tuple(objects), summary)


def model_risk_map(review: Review, study: PlanStudy) -> riskmap.RiskMap | None:
    """The review's model attention (``Review.attention``) as a risk map on the plan dose grid; None without one,
    or when it does not fit this study's dose grid (logged: the interim map is sent instead)."""
    if review.attention is None:
        return None
    a = review.attention
    try:
        return riskmap.attention_risk_map(a.mass, study, model=a.model, model_version=a.model_version)
    except (ValueError, InputError) as exc:
        log.warning("attention_risk_map_unusable", extra={"model": a.model, "error": str(exc)[:200]})
        return None


def file_stem(plan_study_id: str, revision: int) -> str:
    return f"{plan_study_id}-r{revision}"


def write_review_outputs(review: Review, study: PlanStudy, out_dir: Path, *, plan_study_id: str,
                         revision: int, kinds: Iterable[str] = OUTPUT_KINDS) -> list[Path]:
    """``rtqa review --out DIR``: write every output the node would send, plus the summary's PDF and PNG.

    Files: ``<plan_study_id>-r<revision>-<kind>.dcm`` (kind: sr, riskmap_rtdose, parametric_map, pdf),
    ``...-summary.pdf``, ``...-summary.png``. An SR already in ``out_dir`` for the same plan study (an earlier
    revision, or this revision written by an earlier RESULT_VERSION) becomes the new SR's predecessor.
    Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    new_uid = result_uid(plan_study_id, revision, UID_KIND[SR])
    predecessors = []
    for path in sorted(out_dir.glob(f"{plan_study_id}-r*-{SR}.dcm")):
        try:
            earlier = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError) as exc:
            log.warning("earlier_sr_unreadable", extra={"file": path.name, "error": type(exc).__name__})
            continue
        if str(earlier.SOPInstanceUID) != new_uid and int(earlier.get("InstanceNumber", 0) or 0) <= revision:
            predecessors.append(earlier)
    evidence = sr.read_evidence(study_files(study))
    outputs = build_review_outputs(review, study, evidence, plan_study_id=plan_study_id, revision=revision,
                                   kinds=kinds, predecessors=predecessors[-1:])
    stem = file_stem(plan_study_id, revision)
    written = []
    for obj in outputs.objects:
        path = out_dir / f"{stem}-{obj.kind}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        written.append(path)
    if outputs.summary is not None:
        for suffix, data in (("pdf", outputs.summary.pdf_bytes), ("png", outputs.summary.png_bytes)):
            path = out_dir / f"{stem}-summary.{suffix}"
            path.write_bytes(data)
            written.append(path)
    return written
