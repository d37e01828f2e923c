"""The review on synthetic head-and-neck patients (rtqa synth): planted deviations are found with the generator's
severity, clean plans get no major deviation, and contour problems planted in modified copies are found."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from rtqa_node.checks import contours
from rtqa_node.checks.pipeline import review_plan_study
from rtqa_node.checks.protocol import get_protocol, select_protocol
from rtqa_node.review import Severity, Verdict
from rtqa_node.rt.plan_study import Contour, load_folder
from rtqa_node.synth.cohort import CohortConfig, generate_cohort, simulate_patient, write_patient

SYNTH_PROTOCOL = "HN-SYNTH-SIB-70-56"
#: the generator's deviation code -> (finding code, constraint id or structure the finding names, None: any)
CODE_MAP = {
    "wrong_prescription": ("protocol.prescription_dose", None),
    "fractionation": ("protocol.fractionation", None),
    "missing_oar": ("contour.required_structure_missing", None),
    "swapped_laterality": ("contour.laterality_swapped", None),
    "frame_of_reference_mismatch": ("integrity.frame_of_reference_mismatch", None),
    "dose_grid_truncated": ("integrity.dose_grid_coverage", None),
    "ptv70_underdose": ("protocol.target_coverage", "ptv70_d95"),
    "ctv70_cold_spot": ("protocol.target_coverage", "ctv70_d98"),
    "cord_overdose": ("protocol.oar_constraint", "cord_dmax"),
    "brainstem_overdose": ("protocol.oar_constraint", "brainstem_dmax"),
    "oar_constraint": ("protocol.oar_constraint", "parotid_best_mean"),
}
#: dose thresholds of the synthetic protocol, for "too close to call" (the generator grades on dose-grid voxels,
#: the review on the sub-voxel DVH; they agree within ~0.3 Gy)
BORDER_GY = 0.5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = generate_cohort(out, CohortConfig(patients=3, seed=3, slices=48, deviation_rate=0.6))
    protocol = get_protocol(SYNTH_PROTOCOL)
    studies, reviews = {}, {}
    for p in manifest["patients"]:
        studies[p["folder"]] = load_folder(out / p["folder"])
        reviews[p["folder"]] = review_plan_study(studies[p["folder"]], protocol=protocol)
    return manifest, studies, reviews


def _near_threshold(review, constraint_id: str) -> bool:
    protocol = get_protocol(SYNTH_PROTOCOL)
    c = next(c for c in protocol.constraints if c.id == constraint_id)
    result = next(r for r in review.constraints if r.constraint_id == constraint_id)
    limits = [c.per_protocol] + ([c.minor] if c.minor is not None else [])
    return result.value is not None and min(abs(result.value - lim) for lim in limits) < BORDER_GY


def test_synthetic_plans_select_their_protocol_by_plan_label(cohort):
    manifest, studies, _ = cohort
    label = studies[manifest["patients"][0]["folder"]].plans[0].label
    assert select_protocol(plan_label=label).protocol.id == SYNTH_PROTOCOL
    assert select_protocol(plan_label="something else").protocol is None


def test_every_planted_deviation_is_found_with_the_generators_severity(cohort):
    manifest, _, reviews = cohort
    checked = 0
    for p in manifest["patients"]:
        review = reviews[p["folder"]]
        for dev in p["deviations"]:
            code, constraint_id = CODE_MAP[dev["code"]]
            hits = [f for f in review.findings if f.code == code
                    and (constraint_id is None or f.values.get("constraint_id") == constraint_id)]
            if constraint_id is not None and _near_threshold(review, constraint_id):
                assert hits or any(r.constraint_id == constraint_id for r in review.constraints)
                continue
            assert hits, f"{p['folder']}: {dev['code']} ({dev['message']}) not found"
            assert Severity(dev["severity"]) in {f.severity for f in hits}, (p["folder"], dev, hits)
            checked += 1
    assert checked >= 2  # the cohort (seed 3) carries several planted deviations away from the thresholds


def test_constraints_without_a_planted_deviation_are_per_protocol(cohort):
    manifest, _, reviews = cohort
    for p in manifest["patients"]:
        review = reviews[p["folder"]]
        flagged = {CODE_MAP[d["code"]][1] for d in p["deviations"]}
        for result in review.constraints:
            if result.constraint_id in flagged or _near_threshold(review, result.constraint_id):
                continue
            assert result.category is None, (p["folder"], result)


def test_clean_synthetic_plans_have_no_major_deviation(cohort):
    manifest, _, reviews = cohort
    clean = [p for p in manifest["patients"] if p["true_verdict"] == "per_protocol"]
    assert clean
    for p in clean:
        review = reviews[p["folder"]]
        assert review.verdict in (Verdict.PER_PROTOCOL, Verdict.MINOR), [
            f.to_json() for f in review.findings if f.severity is not Severity.INFO]
    for p in manifest["patients"]:  # the verdict is never milder than the truth
        order = ["per_protocol", "minor", "major", "not_evaluable"]
        assert order.index(reviews[p["folder"]].verdict.value) >= order.index(p["true_verdict"]), p["folder"]


def test_review_json_is_serialisable_and_holds_the_numbers(cohort):
    manifest, _, reviews = cohort
    doc = json.loads(json.dumps(reviews[manifest["patients"][0]["folder"]].to_json()))
    assert {"verdict", "findings", "protocol", "metrics", "predictions", "constraints"} <= set(doc)
    assert doc["protocol"] == SYNTH_PROTOCOL
    ptv = doc["metrics"]["structures"]["PTV_70"]
    truth = manifest["patients"][0]["organs"]["PTV_70"]
    assert abs(ptv["d95_gy"] - truth["d95_gy"]) < 0.6
    assert doc["metrics"]["target_enclosure"]["CTV_70"]["outside_pct"] < 2.0


# -- planted contour and integrity problems on a clean patient ----------------------------------------------


def _clean(cohort):
    manifest, studies, reviews = cohort
    p = next(p for p in manifest["patients"] if p["true_verdict"] == "per_protocol")
    return studies[p["folder"]], reviews[p["folder"]]


def _with_structures(study, change):
    ss = study.structure_sets[0]
    new = tuple(s2 for s in ss.structures for s2 in change(s))
    return dataclasses.replace(study, structure_sets=(dataclasses.replace(ss, structures=new),))


def _moved(s, dx_mm=0.0, scale=None):
    items = []
    for c in s.contours:
        pts = c.points_mm.copy()
        if scale is not None:
            centre = pts.mean(axis=0)
            pts[:, :2] = centre[:2] + (pts[:, :2] - centre[:2]) * scale
        pts[:, 0] += dx_mm
        items.append(Contour(pts, c.geometric_type))
    return dataclasses.replace(s, contours=tuple(items))


def _codes(review):
    return {(f.code, f.severity, f.structure) for f in review.findings}


def test_removed_renamed_shifted_and_shrunk_structures_are_found(cohort):
    study, _ = _clean(cohort)

    def change(s):
        if s.name == "SpinalCord":
            return []  # removed
        if s.name == "Larynx_SG":
            return [dataclasses.replace(s, name="Zorglub")]  # renamed to something unknown
        if s.name == "CTV_70":
            return [_moved(s, dx_mm=15.0)]  # no longer inside PTV_70
        if s.name == "Cavity_Oral":
            return [_moved(s, scale=0.15)]  # implausibly small
        if s.name == "Glnd_Submand_L":
            return [_moved(s, dx_mm=150.0)]  # drawn beside the patient
        return [s]

    review = review_plan_study(_with_structures(study, change), protocol=get_protocol(SYNTH_PROTOCOL))
    found = _codes(review)
    assert ("contour.required_structure_missing", Severity.MAJOR, "SpinalCord") in found
    assert ("contour.required_structure_missing", Severity.MINOR, "Larynx_SG") in found
    assert ("names.unknown_structure", Severity.INFO, "Zorglub") in found
    assert ("contour.target_not_enclosed", Severity.MAJOR, "CTV_70") in found
    assert ("contour.implausible_volume", Severity.MINOR, "Cavity_Oral") in found
    assert ("contour.outside_body", Severity.MINOR, "Glnd_Submand_L") in found
    assert any(c == "contour.outside_ct" for c, _, _ in found)  # 150 mm off: past the CT's edge too
    cord = next(c for c in review.constraints if c.constraint_id == "cord_dmax")
    assert cord.value is None and cord.category is Severity.NOT_EVALUABLE
    assert review.verdict is Verdict.MAJOR


def test_flipped_laterality_frame_of_reference_scaled_and_cropped_dose_are_found(cohort):
    study, clean_review = _clean(cohort)
    # scale the dose so that the cord maximum lands 3 Gy above the protocol's major-deviation threshold (48 Gy),
    # whatever the generator's sparing gave this patient
    cord = next(c for c in clean_review.constraints if c.constraint_id == "cord_dmax")
    scale = max(1.25, (48.0 + 3.0) / cord.value)
    swap = {"Parotid_L": "Parotid_R", "Parotid_R": "Parotid_L"}
    study = _with_structures(study, lambda s: [dataclasses.replace(s, name=swap.get(s.name, s.name))])
    dose = study.doses[0]
    ptv = next(s for s in study.structure_sets[0].structures if s.name == "PTV_70")
    x_mid = float(np.median(np.concatenate([c.points_mm[:, 0] for c in ptv.closed_planar])))
    g = dose.geometry
    cut = int((x_mid - g.origin_mm[0]) / g.spacing_mm[0])  # the column through the PTV's middle
    # keep the half of the grid towards the midline (the cord and brainstem stay inside), cut the PTV in two
    lo, hi = (cut, g.shape[2]) if x_mid < 0 else (0, cut)
    origin = (g.origin_mm[0] + lo * g.spacing_mm[0], g.origin_mm[1], g.origin_mm[2])
    cropped_geometry = dataclasses.replace(g, origin_mm=origin, shape=(g.shape[0], g.shape[1], hi - lo))
    modified = dataclasses.replace(dose, dose=np.ascontiguousarray(dose.dose[:, :, lo:hi] * scale),
                                   geometry=cropped_geometry, frame_of_reference_uid="2.25.1234")
    study = dataclasses.replace(study, doses=(modified,))
    review = review_plan_study(study, protocol=get_protocol(SYNTH_PROTOCOL))
    found = _codes(review)
    assert ("contour.laterality_swapped", Severity.MAJOR, "Parotid_L/Parotid_R") in found
    assert any(c == "integrity.frame_of_reference_mismatch" and s is Severity.MAJOR for c, s, _ in found)
    assert ("integrity.dose_grid_coverage", Severity.MAJOR, "PTV_70") in found
    # the scaled dose breaks the cord limit: a major deviation
    assert any(c == "protocol.oar_constraint" and s is Severity.MAJOR for c, s, _ in found), found


def test_reference_contours_agree_with_themselves_and_a_shift_is_measured(cohort):
    study, _ = _clean(cohort)
    parotid = next(s for s in study.structure_sets[0].structures if s.name == "Parotid_L")
    same = contours.agreement(parotid, parotid, name="Parotid_L")
    assert same.dice == pytest.approx(1.0) and same.hd95_mm == 0.0 and same.surface_dice == 1.0
    assert same.added_path_length_mm == 0.0
    shifted = contours.agreement(_moved(parotid, dx_mm=4.0), parotid, name="Parotid_L", tolerance_mm=2.0)
    assert 0.5 < shifted.dice < 0.95
    assert 3.0 <= shifted.hd95_mm <= 5.0
    assert shifted.surface_dice < 1.0 and shifted.added_path_length_mm > 0.0
    results, findings = contours.compare_structure_sets({"Parotid_L": _moved(parotid, dx_mm=12.0)},
                                                        {"Parotid_L": parotid, "Brainstem": parotid})
    assert results[0].dice < 0.7
    assert {f.code for f in findings} == {"contour.reference_disagreement", "contour.reference_structure_missing"}


# -- export errors planted by the generator itself --------------------------------------------------------------


def _written(tmp_path, config, plant):
    patient = simulate_patient(config, 0, plant=plant)
    write_patient(config, patient, tmp_path)
    return load_folder(tmp_path), patient.truth


def test_export_errors_planted_by_the_generator_are_all_found_as_major(tmp_path):
    plant = (("frame_of_reference_mismatch", "major"), ("dose_grid_truncated", "major"), ("missing_oar", "major"),
             ("swapped_laterality", "major"), ("wrong_prescription", "major"))
    study, truth = _written(tmp_path, CohortConfig(patients=1, seed=11, slices=30), plant)
    assert {d["code"] for d in truth["deviations"]} >= {code for code, _ in plant}
    review = review_plan_study(study, protocol=get_protocol(SYNTH_PROTOCOL))
    for dev in truth["deviations"]:
        code, constraint_id = CODE_MAP[dev["code"]]
        hits = [f for f in review.findings if f.code == code
                and (constraint_id is None or f.values.get("constraint_id") == constraint_id)]
        assert Severity(dev["severity"]) in {f.severity for f in hits}, (dev, [f.to_json() for f in hits])
    assert review.verdict is Verdict.MAJOR


def test_a_clean_synthetic_proton_plan_is_read_in_gy_rbe_without_major_findings(tmp_path):
    study, truth = _written(tmp_path, CohortConfig(patients=1, seed=7, slices=30, modality="proton"), None)
    assert truth["true_verdict"] == "per_protocol"
    selection = select_protocol(plan_label=study.plans[0].label)
    assert selection.protocol is not None and selection.protocol.id == SYNTH_PROTOCOL
    review = review_plan_study(study, protocol=selection.protocol)
    assert review.metrics["plan"]["is_ion_plan"] and review.metrics["dose"]["unit"] == "Gy(RBE)"
    assert not [f for f in review.findings if f.code.startswith("integrity.") and f.severity is not Severity.INFO]
    assert review.verdict in (Verdict.PER_PROTOCOL, Verdict.MINOR)
