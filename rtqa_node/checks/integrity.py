"""Plan integrity: is the plan study complete and consistent enough to be reviewed, and is the plan itself
coherent (frame of reference, dose grid coverage, prescription vs dose and fractions, approval, machine,
radiation type, ion-specific fields)?

Each check returns :class:`rtqa_node.review.Finding` objects with codes ``integrity.*``. Severities:

- ``not_evaluable``: nothing to review against (no dose, no structure set, dose not in Gy).
- ``major``: data that make the reviewed numbers wrong or the plan undeliverable as stated (frames of reference
  that differ between CT, structures and dose; a target partly outside the dose grid; a delivered dose far from
  the prescription; a REJECTED plan).
- ``minor``: inconsistencies a physicist must look at (beam doses that do not add up to the prescription per
  fraction, a protocol organ partly outside the dose grid, missing machine or radiation type, proton dose not
  RBE-weighted).
- ``info``: worth knowing (plan not yet approved, no CT in the study).

Thresholds (documented here, not in a protocol): the target D50 should lie within 5 % of the prescription
(ICRU 83 reports D50 as the dose closest to the prescription for a homogeneous IMRT target), 5-10 % is minor,
more is major; beam doses per fraction should add up to the prescription per fraction within 5 % (10 % minor).
"""

from __future__ import annotations

import math

import numpy as np

from rtqa_node.review import Finding, Severity
from rtqa_node.rt.plan_study import DoseGrid, Plan, PlanStudy, Structure, StructureSet

RX_D50_PER_PROTOCOL_PCT = 5.0
RX_D50_MINOR_PCT = 10.0
BEAM_DOSE_PER_PROTOCOL_PCT = 5.0
BEAM_DOSE_MINOR_PCT = 10.0
#: a target counts as "outside the dose grid" beyond this fraction of its volume (or 0.05 cc, whichever larger)
TARGET_OUTSIDE_PCT = 0.5
OAR_OUTSIDE_PCT = 5.0
#: dose grid extent tolerance for contour points (mm): half a voxel is already part of the grid
GRID_TOLERANCE_MM = 1.0


def frame_of_reference(study: PlanStudy, plan: Plan | None, structure_set: StructureSet | None,
                       dose: DoseGrid | None) -> list[Finding]:
    """CT, RTSTRUCT, RTPLAN and RTDOSE must share one Frame of Reference UID (PS3.3 C.7.4.1)."""
    uids = {}
    if study.ct is not None and study.ct.frame_of_reference_uid:
        uids["CT"] = study.ct.frame_of_reference_uid
    if structure_set is not None and structure_set.frame_of_reference_uid:
        uids["RTSTRUCT"] = structure_set.frame_of_reference_uid
    if plan is not None and plan.frame_of_reference_uid:
        uids["RTPLAN"] = plan.frame_of_reference_uid
    if dose is not None and dose.frame_of_reference_uid:
        uids["RTDOSE"] = dose.frame_of_reference_uid
    if len(set(uids.values())) <= 1:
        return []
    groups: dict[str, list[str]] = {}
    for modality, uid in uids.items():
        groups.setdefault(uid, []).append(modality)
    parts = " vs ".join("+".join(m) for m in groups.values())
    return [Finding("integrity.frame_of_reference_mismatch", Severity.MAJOR,
                    f"objects are in different frames of reference ({parts}): structures and dose may not be "
                    "registered; dose-volume values are unreliable",
                    {"groups": [sorted(m) for m in groups.values()]})]


def components(study: PlanStudy, plan: Plan | None, structure_set: StructureSet | None,
               dose: DoseGrid | None, dose_error: str | None) -> list[Finding]:
    out = []
    if structure_set is None:
        out.append(Finding("integrity.no_structure_set", Severity.NOT_EVALUABLE,
                           "no RTSTRUCT in the plan study: no dose-volume review possible"))
    if dose is None:
        out.append(Finding("integrity.no_dose", Severity.NOT_EVALUABLE,
                           f"no usable RTDOSE: {dose_error or 'none in the plan study'}"))
    elif dose.dose_units != "GY":
        out.append(Finding("integrity.dose_units", Severity.NOT_EVALUABLE,
                           f"dose units {dose.dose_units or '(none)'}, not GY: metrics in Gy cannot be computed",
                           {"dose_units": dose.dose_units}))
    if plan is None:
        out.append(Finding("integrity.no_plan", Severity.MAJOR,
                           "no RTPLAN in the plan study: prescription and fractionation cannot be checked"))
    if study.ct is None:
        out.append(Finding("integrity.no_ct", Severity.INFO,
                           "no CT in the plan study: contours are not checked against the images"))
    if len(study.plans) > 1:
        out.append(Finding("integrity.several_plans", Severity.INFO,
                           f"{len(study.plans)} plans in the study; the first ({plan.label if plan else ''}) "
                           "was reviewed", {"plans": len(study.plans)}))
    return out


def _points_outside_grid_mm(points_mm: np.ndarray, dose: DoseGrid) -> np.ndarray:
    """Distance (mm, 0 inside) of each point past the dose grid's extent (voxel centres +- half a voxel)."""
    g = dose.geometry
    idx = g.to_index(points_mm)
    shape = np.asarray(g.shape, dtype=np.float64)
    spacing = np.asarray([g.spacing_mm[2], g.spacing_mm[1], g.spacing_mm[0]])
    below = np.clip(-0.5 - idx, 0, None)
    above = np.clip(idx - (shape - 0.5), 0, None)
    return np.sqrt(np.sum(((below + above) * spacing) ** 2, axis=1))


def dose_coverage(dose: DoseGrid | None, structures: dict[str, Structure], dvhs: dict, *, targets: set[str],
                  protocol_oars: set[str]) -> list[Finding]:
    """The dose grid must cover every target (major) and every protocol organ at risk (minor).

    ``structures``: display name -> Structure; ``dvhs``: display name -> StructureDvh (volume outside the grid
    from the DVH engine); structures without a DVH are checked by their contour points.
    """
    if dose is None:
        return []
    out = []
    for name in sorted(targets | protocol_oars):
        s = structures.get(name)
        if s is None or not s.has_volume:
            continue
        is_target = name in targets
        if name in dvhs:
            m = dvhs[name].metrics
            outside_cc, volume_cc = m.volume_outside_dose_cc, m.volume_cc
            pct = outside_cc / volume_cc * 100 if volume_cc > 0 else 0.0
        else:
            pts = np.concatenate([c.points_mm for c in s.closed_planar])
            far = _points_outside_grid_mm(pts, dose) > GRID_TOLERANCE_MM
            pct, outside_cc, volume_cc = float(far.mean() * 100), float("nan"), float("nan")
        limit = TARGET_OUTSIDE_PCT if is_target else OAR_OUTSIDE_PCT
        if pct > limit and (not math.isfinite(outside_cc) or outside_cc > 0.05):
            sev = Severity.MAJOR if is_target else Severity.MINOR
            out.append(Finding(
                "integrity.dose_grid_coverage", sev,
                f"{name}: {pct:.1f} % of the {'target' if is_target else 'organ'} lies outside the dose grid; "
                "its dose there is unknown",
                {"outside_pct": round(pct, 2), "outside_cc": round(outside_cc, 3) if math.isfinite(outside_cc)
                 else None}, name))
    return out


def prescription(plan: Plan | None, *, target_name: str | None, target_dvh, rx_gy: float | None) -> list[Finding]:
    """Prescription vs dose (target D50) and vs fractions (sum of beam doses per fraction)."""
    if plan is None:
        return []
    out = []
    n = plan.number_of_fractions
    if rx_gy is None:
        out.append(Finding("integrity.no_prescription", Severity.INFO,
                           "the plan states no target prescription dose (DoseReferenceSequence)"))
    if not n:
        out.append(Finding("integrity.no_fractions", Severity.MINOR,
                           "the plan states no number of fractions (FractionGroupSequence)"))
    if rx_gy and target_dvh is not None:
        d50 = target_dvh.metrics.d50_gy
        if math.isfinite(d50):
            dev_pct = (d50 / rx_gy - 1.0) * 100.0
            if abs(dev_pct) > RX_D50_PER_PROTOCOL_PCT:
                sev = Severity.MINOR if abs(dev_pct) <= RX_D50_MINOR_PCT else Severity.MAJOR
                out.append(Finding(
                    "integrity.prescription_vs_dose", sev,
                    f"{target_name} D50 {d50:.2f} Gy is {dev_pct:+.1f} % from the prescription {rx_gy:g} Gy",
                    {"d50_gy": round(d50, 3), "prescription_gy": rx_gy, "deviation_pct": round(dev_pct, 2)},
                    target_name))
    if rx_gy and n:
        beam_doses = [b.beam_dose_gy for b in plan.beams if b.beam_dose_gy is not None]
        if beam_doses and len(beam_doses) == len(plan.beams):
            per_fraction = sum(beam_doses)
            expected = rx_gy / n
            dev_pct = (per_fraction / expected - 1.0) * 100.0
            if abs(dev_pct) > BEAM_DOSE_PER_PROTOCOL_PCT:
                sev = Severity.MINOR if abs(dev_pct) <= BEAM_DOSE_MINOR_PCT else Severity.MAJOR
                out.append(Finding(
                    "integrity.fraction_dose_inconsistent", sev,
                    f"beam doses add up to {per_fraction:.3f} Gy per fraction; prescription {rx_gy:g} Gy in {n} "
                    f"fractions is {expected:.3f} Gy per fraction ({dev_pct:+.1f} %)",
                    {"beam_dose_sum_gy": round(per_fraction, 4), "expected_gy": round(expected, 4),
                     "fractions": n}))
    return out


def plan_fields(plan: Plan | None, dose: DoseGrid | None) -> list[Finding]:
    """Approval, machine, radiation type; for ion plans the RBE convention and ion-specific beam fields."""
    if plan is None:
        return []
    out = []
    status = (plan.approval_status or "").upper()
    if status == "REJECTED":
        out.append(Finding("integrity.approval_status", Severity.MAJOR, "the plan is REJECTED",
                           {"approval_status": status}))
    elif status != "APPROVED":
        out.append(Finding("integrity.approval_status", Severity.INFO,
                           f"the plan is {status or 'without approval status'} (not yet approved)",
                           {"approval_status": status}))
    if not plan.beams:
        out.append(Finding("integrity.no_beams", Severity.MAJOR, "the plan has no beams"))
        return out
    no_machine = [b.beam_name or str(b.beam_number) for b in plan.beams if not b.treatment_machine_name]
    if no_machine:
        out.append(Finding("integrity.treatment_machine_missing", Severity.MINOR,
                           f"no TreatmentMachineName on beam(s) {', '.join(no_machine)}", {"beams": no_machine}))
    if len(plan.machines) > 1:
        out.append(Finding("integrity.several_machines", Severity.MINOR,
                           f"beams on {len(plan.machines)} different machines", {"machines": list(plan.machines)}))
    no_type = [b.beam_name or str(b.beam_number) for b in plan.beams if not b.radiation_type]
    if no_type:
        out.append(Finding("integrity.radiation_type_missing", Severity.MINOR,
                           f"no RadiationType on beam(s) {', '.join(no_type)}", {"beams": no_type}))
    types = set(plan.radiation_types) - {""}
    if len(types) > 1:
        out.append(Finding("integrity.mixed_radiation_types", Severity.INFO,
                           f"beams of several radiation types: {', '.join(sorted(types))}"))
    ion_types = {"PROTON", "ION"}
    if plan.is_ion_plan:
        wrong = types - ion_types
        if wrong:
            out.append(Finding("integrity.ion_radiation_type", Severity.MAJOR,
                               f"RT Ion Plan with radiation type(s) {', '.join(sorted(wrong))}"))
        if dose is not None and dose.dose_type != "EFFECTIVE":
            out.append(Finding("integrity.rbe_convention", Severity.MINOR,
                               f"ion plan dose has DoseType {dose.dose_type or '(none)'}, not EFFECTIVE: constraints "
                               "in Gy(RBE) need RBE-weighted dose (RBE 1.1 for protons, ICRU 78)",
                               {"dose_type": dose.dose_type}))
        no_energy = [b.beam_name or str(b.beam_number) for b in plan.beams if not b.nominal_energy]
        if no_energy:
            out.append(Finding("integrity.ion_energy_missing", Severity.MINOR,
                               f"no NominalBeamEnergy in the first control point of beam(s) {', '.join(no_energy)}"))
        no_meterset = [b.beam_name or str(b.beam_number) for b in plan.beams if not b.beam_meterset]
        if no_meterset:
            out.append(Finding("integrity.ion_meterset_missing", Severity.MINOR,
                               f"no BeamMeterset for beam(s) {', '.join(no_meterset)}"))
        odd = [b.beam_name or str(b.beam_number) for b in plan.beams if b.number_of_control_points < 2]
        if odd:
            out.append(Finding("integrity.ion_control_points", Severity.MINOR,
                               f"fewer than 2 ion control points on beam(s) {', '.join(odd)}"))
    else:
        if types & ion_types:
            out.append(Finding("integrity.radiation_type_sop_class", Severity.MINOR,
                               "PROTON/ION beams in an RT Plan (not RT Ion Plan) object"))
        if dose is not None and dose.dose_type == "EFFECTIVE" and not types & ion_types:
            out.append(Finding("integrity.rbe_convention", Severity.MINOR,
                               "photon plan with an EFFECTIVE (RBE-weighted) dose", {"dose_type": dose.dose_type}))
    return out


def hotspot(dose: DoseGrid | None, rx_gy: float | None, external_dvh) -> list[Finding]:
    """Global maximum (D0.03cc of the External when present, else the grid maximum) vs the prescription."""
    if dose is None or not rx_gy or dose.dose_units != "GY":
        return []
    dmax = external_dvh.metrics.d0_03cc_gy if external_dvh is not None else dose.max_gy
    pct = dmax / rx_gy * 100
    if pct <= 115:
        return []
    sev = Severity.MINOR if pct <= 125 else Severity.MAJOR
    return [Finding("integrity.hotspot", sev, f"maximum dose {dmax:.2f} Gy is {pct:.0f} % of the prescription",
                    {"dmax_gy": round(dmax, 3), "prescription_gy": rx_gy, "pct": round(pct, 1)})]
