"""The rule-based review: ``review_plan_study(study, protocol=...) -> Review``, a pure function (no I/O).

Order: pick the plan, its structure set and its dose (``plan_dose``: a PLAN sum once, else the sum of BEAM doses);
match structure names to TG-263; DVHs of every structure with contours except the External (the External's
coverage is checked from its contour points); integrity checks; protocol checks (prescription, fractionation,
constraints); contour checks; optionally agreement with a reference structure set. Anything that cannot be
computed becomes a finding, never an exception: a plan study that cannot be evaluated gives a ``not_evaluable``
Review.

I/O lives in :func:`load_and_review` (files -> Review, for the worker and the CLI) and
:func:`plan_protocol_hints` (reads the plan's Clinical Trial Protocol ID for protocol selection).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom

from rtqa_node.checks import contours, integrity
from rtqa_node.checks.names import NameMatch, match_names
from rtqa_node.checks.protocol import (
    Protocol,
    Selection,
    evaluate_constraints,
    evaluate_prescription,
    select_protocol,
)
from rtqa_node.errors import InputError
from rtqa_node.review import Finding, Review, Severity
from rtqa_node.rt.dvh import StructureDvh, structure_dvh
from rtqa_node.rt.plan_study import (
    DoseGrid,
    Plan,
    PlanStudy,
    Structure,
    StructureSet,
    load_plan_study,
    plan_dose,
)

log = logging.getLogger(__name__)

ALGORITHM_VERSION = "rtqa-checks-1"


def _pick(study: PlanStudy) -> tuple[Plan | None, StructureSet | None, DoseGrid | None, str | None, bool]:
    """(plan, structure set, plan dose, why there is no dose, whether the dose references another plan)."""
    plan = study.plans[0] if study.plans else None
    dose, dose_error, foreign = None, None, False
    try:
        dose = plan_dose(study, plan) if study.doses else None
    except InputError as exc:
        dose_error = str(exc)
        if plan is not None and study.doses and not any(
                d.referenced_plan_uid in (None, plan.sop_instance_uid) for d in study.doses):
            try:
                dose, dose_error, foreign = plan_dose(study, None), None, True
            except InputError as exc2:
                dose_error = str(exc2)
    structure_set = None
    if study.structure_sets:
        if plan is not None:
            structure_set = next((ss for ss in study.structure_sets
                                  if ss.sop_instance_uid == plan.referenced_structure_set_uid), None)
        if structure_set is None and dose is not None:
            try:
                structure_set = study.structure_set_for(dose)
            except InputError:
                structure_set = None
        if structure_set is None:
            structure_set = study.structure_sets[0]
    return plan, structure_set, dose, dose_error, foreign


def _rx(plan: Plan | None, matches: dict[str, NameMatch], by_display: dict[str, Structure],
        protocol: Protocol | None) -> tuple[float | None, str | None]:
    """(prescription Gy, display name of the target it applies to)."""
    if plan is None:
        return None, None
    items = [p for p in plan.prescriptions if p.target_prescription_dose_gy and p.dose_reference_type == "TARGET"
             and p.structure_type not in ("COORDINATES", "POINT")]
    if not items:
        return None, None
    top = max(items, key=lambda p: p.target_prescription_dose_gy)
    rx = top.target_prescription_dose_gy
    by_number = {s.roi_number: n for n, s in by_display.items()}
    if top.referenced_roi_number in by_number:  # a VOLUME dose reference names its ROI
        return rx, by_number[top.referenced_roi_number]
    if protocol is not None and protocol.top_level is not None:
        for n, m in matches.items():
            if m.standard == protocol.top_level.target and n in by_display:
                return rx, n
    ptvs = [(abs(m.dose_gy - rx), n) for n, m in matches.items()
            if m.standard and m.standard.startswith("PTV") and m.dose_gy and n in by_display]
    if ptvs:
        return rx, min(ptvs)[1]
    # a SITE dose reference names no ROI (its description is a site, e.g. Eclipse's "Breast" for a tumour-bed
    # boost): the prescription applies to the highest-dose target, PTV before CTV before GTV
    return rx, None


def review_plan_study(study: PlanStudy, *, protocol: Protocol | None = None,
                      reference_structures: StructureSet | None = None) -> Review:
    """Review one plan study (rule-based): findings, constraint results, verdict and the numbers behind it.

    Args:
        study: the loaded plan study.
        protocol: the trial protocol to grade against; None runs the generic checks only.
        reference_structures: a second structure set (e.g. a reviewer's contours) to compare against.
    """
    t0 = time.perf_counter()
    findings: list[Finding] = []
    plan, structure_set, dose, dose_error, foreign = _pick(study)
    findings += integrity.components(study, plan, structure_set, dose, dose_error)
    if foreign:
        findings.append(Finding("integrity.dose_of_another_plan", Severity.MAJOR,
                                "no RTDOSE references the reviewed plan; the dose present references another plan"))
    findings += integrity.frame_of_reference(study, plan, structure_set, dose)
    findings += integrity.plan_fields(plan, dose)
    metrics: dict = {"objects": {"CT": study.ct.geometry.shape[0] if study.ct else 0,
                                 "RTSTRUCT": len(study.structure_sets), "RTPLAN": len(study.plans),
                                 "RTDOSE": len(study.doses)}}
    if plan is not None:
        metrics["plan"] = {"label": plan.label, "is_ion_plan": plan.is_ion_plan, "fractions": plan.number_of_fractions,
                           "approval_status": plan.approval_status, "radiation_types": list(plan.radiation_types),
                           "machines": list(plan.machines), "beams": len(plan.beams)}
    if dose is not None:
        metrics["dose"] = {"summation_type": dose.summation_type, "dose_type": dose.dose_type,
                           "unit": dose.unit_label, "max": round(dose.max_gy, 4),
                           "grid_shape": list(dose.geometry.shape),
                           "grid_spacing_mm": [round(v, 3) for v in dose.geometry.spacing_mm]}
    constraints = []
    if structure_set is None:
        return _finish(findings, protocol, constraints, metrics, t0)

    structures = [s for s in structure_set.structures]
    by_display = {s.name: s for s in structures}
    matches = match_names([s.name for s in structures])
    findings += contours.unknown_names(matches)
    findings += contours.empty_structures(structure_set)
    by_standard: dict[str, Structure] = {}
    display_of: dict[str, str] = {}
    for s in structures:
        m = matches[s.name]
        if m.standard and m.standard not in by_standard:
            by_standard[m.standard] = s
            display_of[m.standard] = s.name
    external = by_standard.get("External") or next(
        (s for s in structures if s.interpreted_type == "EXTERNAL"), None)

    # DVHs: every structure with contours except the External
    dvhs: dict[str, StructureDvh] = {}
    dose_ok = dose is not None and dose.dose_units == "GY"
    if dose_ok:
        for s in structures:
            if not s.has_volume or s is external:
                continue
            try:
                dvhs[s.name] = structure_dvh(s, dose)
            except (ValueError, InputError) as exc:
                findings.append(Finding("integrity.dvh_failed", Severity.MINOR,
                                        f"{s.name}: DVH not computable ({exc})", {}, s.name))
    dvh_by_standard = {std: dvhs[disp] for std, disp in display_of.items() if disp in dvhs}
    metrics["structures"] = {
        name: {"tg263": matches[name].standard, "volume_cc": round(d.metrics.volume_cc, 3),
               "volume_outside_dose_cc": round(d.metrics.volume_outside_dose_cc, 3),
               **{k: (round(getattr(d.metrics, k), 3) if math.isfinite(getattr(d.metrics, k)) else None)
                  for k in ("min_gy", "mean_gy", "max_gy", "d98_gy", "d95_gy", "d50_gy", "d2_gy", "d0_03cc_gy")}}
        for name, d in dvhs.items()}
    metrics["names"] = {n: {"standard": m.standard, "how": m.how} for n, m in matches.items()}

    # targets and prescription
    rx_gy, rx_target = _rx(plan, matches, by_display, protocol)
    targets = {n for n, m in matches.items() if m.is_target and by_display[n].has_volume} | {
        s.name for s in structures if s.interpreted_type in ("PTV", "CTV", "GTV") and s.has_volume}
    if rx_gy and rx_target is None:
        rank = {"PTV": 0, "CTV": 1, "GTV": 2}
        typed = [(rank[s.interpreted_type], -dvhs[s.name].metrics.d50_gy, s.name) for s in structures
                 if s.interpreted_type in rank and s.name in dvhs and math.isfinite(dvhs[s.name].metrics.d50_gy)]
        if typed:
            best_type = min(t[0] for t in typed)
            rx_target = min(t for t in typed if t[0] == best_type)[2]
    if rx_target:
        targets.add(rx_target)
    protocol_oars = set()
    if protocol is not None:
        wanted = {s for c in protocol.constraints for s in c.structures} | {r.name for r in protocol.structures}
        protocol_oars = {display_of[w] for w in wanted if w in display_of} - targets - (
            {external.name} if external is not None else set())
    findings += integrity.dose_coverage(dose if dose_ok else None, by_display, dvhs, targets=targets,
                                        protocol_oars=protocol_oars)
    findings += integrity.prescription(plan, target_name=rx_target, target_dvh=dvhs.get(rx_target),
                                       rx_gy=rx_gy)
    if dose_ok:
        findings += integrity.hotspot(dose, rx_gy, None)
    metrics["prescription"] = {"prescription_gy": rx_gy, "target": rx_target,
                               "fractions": plan.number_of_fractions if plan else None}

    # protocol
    if protocol is not None:
        findings += contours.required_structures(protocol.structures, by_standard, protocol.id)
        if plan is not None:
            findings += evaluate_prescription(protocol, fractions=plan.number_of_fractions, prescription_gy=rx_gy)
        if dose_ok:
            results, cfind = evaluate_constraints(protocol, dvh_by_standard)
            constraints += results
            findings += cfind

    # contours
    by_display_volume = {n: s for n, s in by_display.items() if s.has_volume}
    findings += contours.outside_body(by_display_volume, external, matches)
    findings += contours.outside_ct(by_display_volume, study.ct)
    findings += contours.laterality(by_standard, external)
    findings += contours.volumes(by_standard, {std: dvh_by_standard[std].metrics.volume_cc
                                               for std in dvh_by_standard})
    grid = dose.geometry if dose is not None and dose.geometry.is_axial else (
        study.ct.geometry if study.ct is not None and study.ct.geometry.is_axial else None)
    enc, margins = contours.enclosure(by_display_volume, matches, grid,
                                      expected_margin_mm=protocol.ptv_margin_mm if protocol else None)
    findings += enc
    metrics["target_enclosure"] = margins
    findings += contours.overlaps(by_standard, grid)
    if reference_structures is not None:
        ref_matches = match_names([s.name for s in reference_structures.structures])
        ref_by_standard: dict[str, Structure] = {}
        for s in reference_structures.structures:
            std = ref_matches[s.name].standard
            if std and std not in ref_by_standard:
                ref_by_standard[std] = s
        agreements, rfind = contours.compare_structure_sets(by_standard, ref_by_standard)
        findings += rfind
        metrics["reference_agreement"] = [a.to_json() for a in agreements]
    return _finish(findings, protocol, constraints, metrics, t0)


def _finish(findings, protocol, constraints, metrics, t0) -> Review:
    metrics["review_s"] = round(time.perf_counter() - t0, 3)
    return Review(findings=tuple(findings), protocol=protocol.id if protocol else None,
                  constraints=tuple(constraints), metrics=metrics, algorithm_version=ALGORITHM_VERSION)


def not_evaluable(reason: str, *, protocol: Protocol | None = None) -> Review:
    """A Review for a plan study that could not even be loaded."""
    return Review(findings=(Finding("integrity.unreadable", Severity.NOT_EVALUABLE, reason),),
                  protocol=protocol.id if protocol else None, algorithm_version=ALGORITHM_VERSION)


# -- I/O around the pure review ---------------------------------------------------------------------------------


def plan_protocol_hints(study: PlanStudy) -> tuple[str | None, str | None]:
    """(Clinical Trial Protocol ID (0012,0020) of the plan, RT Plan Label) for protocol selection."""
    plan = study.plans[0] if study.plans else None
    if plan is None:
        return None, None
    try:
        ds = pydicom.dcmread(plan.file, force=True, stop_before_pixels=True,
                             specific_tags=["ClinicalTrialProtocolID"])
        trial = str(ds.get("ClinicalTrialProtocolID", "") or "") or None
    except (OSError, ValueError, TypeError, EOFError, AttributeError):  # read once already: only the hint is lost
        trial = None
    return trial, plan.label or None


def choose_protocol(study: PlanStudy, *, explicit: str | None = None, configured: str | None = None) -> Selection:
    trial, label = plan_protocol_hints(study)
    return select_protocol(explicit=explicit, configured=configured, clinical_trial_protocol_id=trial,
                           plan_label=label)


def load_and_review(files: Sequence[Path], *, explicit_protocol: str | None = None,
                    configured_protocol: str | None = None) -> Review:
    """Files -> Review, for the worker: a plan study that cannot be loaded gives a not-evaluable Review.

    Raises:
        ProtocolError: an explicit or configured protocol name is unknown or its file is invalid.
    """
    try:
        study = load_plan_study(files)
    except InputError as exc:
        # the message may name files (often SOP Instance UIDs): it goes into the Review, not into the log
        log.warning("plan_study_not_loadable", extra={"error_type": type(exc).__name__, "files": len(files)})
        return not_evaluable(f"plan study cannot be loaded: {exc}")
    selection = choose_protocol(study, explicit=explicit_protocol, configured=configured_protocol)
    review = review_plan_study(study, protocol=selection.protocol)
    return review


def review_text(review: Review) -> str:
    """A short text for a physicist: verdict, protocol, the findings that are not info."""
    head = f"Verdict: {review.verdict.value}" + (f" ({review.protocol})" if review.protocol else " (no protocol)")
    lines = [head]
    for f in review.findings:
        if f.severity is not Severity.INFO:
            lines.append(f"[{f.severity.value}] {f.message}")
    info = sum(1 for f in review.findings if f.severity is Severity.INFO)
    if info:
        lines.append(f"{info} informational finding(s)")
    return "\n".join(lines)


def format_review(review: Review) -> str:
    """The human table printed by ``rtqa review`` without --json."""
    out = [f"verdict   {review.verdict.value}", f"protocol  {review.protocol or '(none: generic checks only)'}", ""]
    if review.findings:
        out.append(f"{'severity':<14} {'code':<40} message")
        order = {Severity.NOT_EVALUABLE: 0, Severity.MAJOR: 1, Severity.MINOR: 2, Severity.INFO: 3}
        for f in sorted(review.findings, key=lambda f: order[f.severity]):
            out.append(f"{f.severity.value:<14} {f.code:<40} {f.message}")
    else:
        out.append("no findings")
    if review.constraints:
        out += ["", (f"{'constraint':<22} {'structure':<22} {'metric':<9} {'value':>9}  {'per protocol':<14} "
                     f"{'minor':<14} category")]
        for c in review.constraints:
            value = f"{c.value:.2f}" if c.value is not None else "-"
            out.append(f"{c.constraint_id:<22} {c.structure:<22} {c.metric:<9} {value:>9}  {c.per_protocol:<14} "
                       f"{c.minor or '-':<14} {c.category.value if c.category else 'per_protocol'}")
    structures = review.metrics.get("structures", {})
    if structures:
        out += ["", f"{'structure':<22} {'TG-263':<18} {'cc':>9} {'mean':>8} {'max':>8} {'D95':>8}"]
        for name, m in structures.items():
            def f(v):
                return f"{v:8.2f}" if v is not None else "       -"
            out.append(f"{name:<22} {m['tg263'] or '?':<18} {m['volume_cc']:9.2f} {f(m['mean_gy'])} "
                       f"{f(m['max_gy'])} {f(m['d95_gy'])}")
    if review.predictions:
        p0 = review.predictions[0]
        out += ["", f"predictions ({p0.model} {p0.model_version}; research model, not for clinical decisions)",
                f"{'target':<20} {'probability':>11}  top instances (attention)"]
        for p in review.predictions:
            top = ", ".join(f"{n} {w:.2f}" for n, w in p.top_instances)
            out.append(f"{p.target:<20} {p.probability:11.3f}  {top}")
    elif (ml := review.metrics.get("ml")) is not None:
        out += ["", f"predictions: none ({ml.get('status')})"]
    return "\n".join(out) + "\n"
