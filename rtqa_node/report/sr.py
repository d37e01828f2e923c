"""The review as a Comprehensive 3D SR: TID 1500 Measurement Report composed with highdicom templates.

In the spirit of the IHE AI Results profile (AIR): the document names its algorithm (TID 4019 Algorithm
Identification in every measurement group), the evidence it was derived from, and whether it replaces an
earlier result.

Content tree (PS3.16 TID 1500, each measurement group a TID 1501 "Measurement Group"):

- TID 1500 root "Imaging Measurement Report", procedure reported (codes.PROCEDURE_REPORTED), device observer
  (TID 1004) ``rtqa-node``.
- Group "Radiotherapy plan review": algorithm name and version, qualitative evaluation *Plan review verdict*
  (per protocol / minor deviation / major deviation / not evaluated), TEXT *Protocol*.
- One group per finding: finding type = the check's code (99RTQA), qualitative evaluation *Severity*, TEXT
  *Comment* (the message for a physicist), TEXT *Structure*, and a numeric measurement (TID 300) for every
  number behind the finding, the unit taken from the key's suffix (``_gy`` -> Gy).
- One group per protocol constraint: finding type *Protocol constraint* + the constraint id, a TID 300
  measurement named by the metric (Dmax -> DCM 130004) with its UCUM unit, the per-protocol and minor-deviation
  limits as numbers (NUM) and as text with their direction (TEXT "D95% >= 68.6 Gy"), qualitative evaluation
  *Protocol constraint category*, the structure.
- One group per model prediction: algorithm = model and model version, finding type = the target (SCT where one
  exists), measurement *Probability* (DCM 122157, no units) and one *Attention weight* per top contributing
  instance, each with a tracking identifier naming the instance (organ, metric).

The reviewed RTPLAN, RTSTRUCT, RTDOSE and CT are referenced at document level (Current Requested Procedure
Evidence Sequence, PS3.3 C.17.2.3; Pertinent Other Evidence for another study): highdicom refuses RT objects as
image sources of measurements. The patient and study are the plan's (its header comes first in ``evidence``).
An earlier SR for the same plan study goes into the Predecessor Documents Sequence (PS3.3 C.17.2.3).

TEXT items inside a TID 1501 group are appended to the highdicom group: highdicom's template class takes coded
qualitative evaluations only, while TID 1501 also allows them as TEXT.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import uuid
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

import rtqa_node
from rtqa_node.report import codes
from rtqa_node.review import Finding, Review, Severity

log = logging.getLogger(__name__)

ALGORITHM_NAME = "rtqa-node plan review"
MANUFACTURER = "rtqa-node"
#: Series number of every result object written by the node (one series per plan study per kind)
SR_SERIES_NUMBER = 9901
_UID_NAMESPACE = uuid.UUID("4a0f7d0e-2b52-4c1e-8c6a-8f3b9e5d2c17")

#: header attributes read from each member for the evidence and the patient/study modules
EVIDENCE_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "PatientID",
    "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "SpecificCharacterSet", "FrameOfReferenceUID",
)
_MODALITY_ORDER = {"RTPLAN": 0, "RTSTRUCT": 1, "RTDOSE": 2}


def derived_uid(*parts: object) -> str:
    """A deterministic UID (PS3.5 B.2: 2.25 + a name-based UUID as an integer)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(str(p) for p in parts)).int}"


_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def _valid_date(value: str) -> bool:
    try:
        return bool(_DA.match(value)) and datetime.strptime(value, "%Y%m%d").year >= 1
    except ValueError:
        return False


@contextlib.contextmanager
def quiet_identity_validation():
    """pydicom and highdicom warn about invalid values by quoting them (a birth date, a patient name), and pydicom
    logs the warning too: no PHI may reach the logs, so value validation is off while result objects are built
    from the reviewed objects' identity (``sanitise_identity`` does the checking that matters here)."""
    settings = pydicom.config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"The string .* person name", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"Invalid value for VR", category=UserWarning)
            yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved


def sanitise_identity(ds: Dataset) -> list[str]:
    """Blank patient/study attributes whose values are not valid for their VR (a birth date "0001", a sex
    "N/A"): highdicom refuses to copy them, and every result must still be written. They are Type 2, so empty
    is allowed; identity rests on Patient ID and Study Instance UID. Returns the keywords blanked (no values).
    """
    blanked = []
    checks = {"StudyDate": _valid_date, "PatientBirthDate": _valid_date, "StudyTime": lambda v: bool(_TM.match(v)),
              "PatientSex": lambda v: v in ("M", "F", "O")}
    for keyword, is_valid in checks.items():
        element = ds.get(keyword)
        value = str(element).strip() if element is not None else ""
        if value and not is_valid(value):
            setattr(ds, keyword, "")
            blanked.append(keyword)
    return blanked


def read_evidence(paths: Sequence[Path]) -> list[Dataset]:
    """Headers of the reviewed objects, plan first (its patient/study become the SR's), then RTSTRUCT, RTDOSE,
    images. Files that are not DICOM or have no SOP Instance UID are left out."""
    with quiet_identity_validation():
        return _read_evidence(paths)


def _read_evidence(paths: Sequence[Path]) -> list[Dataset]:
    out = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=list(EVIDENCE_KEYWORDS))
        except (OSError, InvalidDicomError):  # not a DICOM file: not evidence
            continue
        if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
            continue
        header = Dataset()
        for keyword in EVIDENCE_KEYWORDS:
            value = ds.get(keyword)
            if keyword == "SpecificCharacterSet":
                if value:
                    header.SpecificCharacterSet = value
                continue
            setattr(header, keyword, value if value is not None else "")
        blanked = sanitise_identity(header)
        if blanked:
            log.warning("invalid_identity_attributes_blanked", extra={"attributes": blanked})
        out.append(header)
    out.sort(key=lambda d: (_MODALITY_ORDER.get(str(d.Modality), 3), str(d.SeriesInstanceUID),
                            str(d.SOPInstanceUID)))
    return out


def not_performed_review(reason: str) -> Review:
    """The review of a plan that could not be analysed: one NOT_EVALUABLE finding that says why."""
    return Review(findings=(Finding("analysis.not_performed", Severity.NOT_EVALUABLE,
                                    f"Analysis not performed: {reason}"),),
                  protocol=None, algorithm_version=rtqa_node.__version__)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _tracking(sop_instance_uid: str, label: str, i: int) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(identifier=label[:64], uid=derived_uid(sop_instance_uid, "group", i))


def _text(name, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _with_text(group, items: Sequence[hd.sr.TextContentItem]):
    """Append TEXT qualitative evaluations to a TID 1501 group (see the module docstring)."""
    if items:
        group[0].ContentSequence.extend(items)
    return group


def _algorithm(review: Review) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME,
                                         version=review.algorithm_version or rtqa_node.__version__)


def _verdict_group(review: Review, uid: str):
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(uid, "Review verdict", 0),
        finding_type=codes.REVIEW_VERDICT_GROUP,
        algorithm_id=_algorithm(review),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.VERDICT, codes.VERDICT_VALUES[review.verdict])],
    )
    return _with_text(group, [_text(codes.PROTOCOL, review.protocol or "none (generic checks only)")])


def _finding_group(review: Review, finding: Finding, uid: str, i: int):
    measurements = [hd.sr.Measurement(name=codes.value_key(key), value=float(value), unit=codes.unit_for_key(key))
                    for key, value in finding.values.items() if _finite(value)]
    label = f"Finding {i}: {finding.code}" + (f" {finding.structure}" if finding.structure else "")
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(uid, label, 1000 + i),
        finding_type=codes.finding(finding.code),
        algorithm_id=_algorithm(review),
        measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.SEVERITY, codes.SEVERITY_VALUES[finding.severity])],
    )
    texts = [_text(codes.COMMENT, finding.message or finding.code)]
    if finding.structure:
        texts.append(_text(codes.STRUCTURE, finding.structure))
    return _with_text(group, texts)


_LIMIT = re.compile(r"^\s*(<=|>=|<|>|≤|≥)\s*(-?[0-9]+(?:\.[0-9]*)?)\s*(\S+)\s*$")


def _limit_value(text: str | None) -> tuple[float, str] | None:
    """``"<= 26 Gy"`` -> (26.0, "Gy"); None when the text is not one bound with a unit known to codes.unit."""
    match = _LIMIT.match(text or "")
    if not match:
        return None
    try:
        codes.unit(match.group(3))
    except ValueError:
        return None
    return float(match.group(2)), match.group(3)


def _constraint_group(review: Review, c, uid: str, i: int):
    measurements = []
    if c.value is not None and _finite(c.value):
        measurements.append(hd.sr.Measurement(name=codes.metric(c.metric), value=float(c.value),
                                              unit=codes.unit(c.unit)))
    for name, text in ((codes.PER_PROTOCOL_LIMIT_VALUE, c.per_protocol),
                       (codes.MINOR_DEVIATION_LIMIT_VALUE, c.minor)):
        limit = _limit_value(text)
        if limit is not None:
            measurements.append(hd.sr.Measurement(name=name, value=limit[0], unit=codes.unit(limit[1])))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(uid, f"Constraint {c.constraint_id}: {c.structure} {c.metric}", 2000 + i),
        finding_type=codes.constraint(c.constraint_id),
        finding_category=codes.PROTOCOL_CONSTRAINT,
        algorithm_id=_algorithm(review),
        measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.CONSTRAINT_CATEGORY,
                                                             codes.CATEGORY_VALUES[c.category])],
    )
    texts = [_text(codes.STRUCTURE, c.structure), _text(codes.PER_PROTOCOL_LIMIT, f"{c.metric} {c.per_protocol}")]
    if c.minor:
        texts.append(_text(codes.MINOR_DEVIATION_LIMIT, f"{c.metric} {c.minor}"))
    if c.source:
        texts.append(_text(codes.COMMENT, f"source: {c.source}"))
    return _with_text(group, texts)


def _prediction_group(p, uid: str, i: int):
    measurements = [hd.sr.Measurement(name=codes.PROBABILITY, value=float(p.probability), unit=codes.unit("1"))]
    for k, (name, weight) in enumerate(p.top_instances):
        measurements.append(hd.sr.Measurement(
            name=codes.ATTENTION_WEIGHT, value=float(weight), unit=codes.unit("1"),
            tracking_identifier=hd.sr.TrackingIdentifier(identifier=str(name)[:64],
                                                         uid=derived_uid(uid, "instance", i, k))))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(uid, f"Prediction: {p.target}", 3000 + i),
        finding_type=codes.target(p.target),
        finding_category=codes.MODEL_PREDICTION,
        algorithm_id=hd.sr.AlgorithmIdentification(name=p.model, version=p.model_version or "unversioned"),
        measurements=measurements,
    )


def build_review_sr(review: Review, evidence: Sequence[Dataset], *, sop_instance_uid: str,
                    series_instance_uid: str, instance_number: int,
                    predecessors: Sequence[Dataset] = ()) -> hd.sr.Comprehensive3DSR:
    """The review as a Comprehensive 3D SR (TID 1500).

    Parameters:
        review: what the review concluded (``Review``; :func:`not_performed_review` for a failed analysis).
        evidence: headers of the reviewed objects (:func:`read_evidence`), the plan first.
        sop_instance_uid, series_instance_uid: deterministic UIDs chosen by the caller.
        instance_number: the plan study revision.
        predecessors: earlier SRs this one replaces (their headers): Predecessor Documents Sequence.

    Raises:
        ValueError: no evidence (nothing reviewed to refer to), or a constraint unit without a UCUM concept.
    """
    if not evidence:
        raise ValueError('Argument "evidence" is empty: an SR must reference the plan study it reviews')
    observer = hd.sr.ObserverContext(
        observer_type=pydicom.sr.codedict.codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", MANUFACTURER), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
            model_name=ALGORITHM_NAME))
    groups = [_verdict_group(review, sop_instance_uid)]
    groups += [_finding_group(review, f, sop_instance_uid, i) for i, f in enumerate(review.findings, start=1)]
    groups += [_constraint_group(review, c, sop_instance_uid, i) for i, c in enumerate(review.constraints, start=1)]
    groups += [_prediction_group(p, sop_instance_uid, i) for i, p in enumerate(review.predictions, start=1)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=list(codes.PROCEDURE_REPORTED),
        imaging_measurements=groups,
        title=codes.TITLE,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        previous_versions=list(predecessors) or None,
        software_versions=rtqa_node.__version__,
        series_description="RTQA plan review",
    )
    sr.CodingSchemeIdentificationSequence = [codes.rtqa_scheme_identification()]
    return sr
