"""Integrity checks on the real chains (../shared/data/rt) and on modified copies: unmodified plans give no false
major deviation; a changed frame of reference, a cropped dose grid, a scaled dose, a rejected plan, a non-RBE
proton dose and relative dose units are each found with the right severity."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pydicom
import pytest

from rtqa_node.checks.pipeline import load_and_review, review_plan_study
from rtqa_node.checks.protocol import get_protocol
from rtqa_node.review import Severity, Verdict
from rtqa_node.rt.plan_study import dicom_files, load_folder, load_plan_study

BREAST = "eclipse-breast-boost-fullct-weasis"
PROTON = "raystation-proton-ramp-aptg"


@pytest.fixture(scope="module")
def breast(rt_data):
    study = load_folder(rt_data / BREAST)
    return study, review_plan_study(study, protocol=None)


@pytest.fixture(scope="module")
def proton(rt_data):
    return load_folder(rt_data / PROTON)


def _severities(review, code):
    return {f.severity for f in review.findings if f.code == code}


def _scaled(study, factor):
    return dataclasses.replace(study, doses=tuple(dataclasses.replace(d, dose=d.dose * np.float32(factor))
                                                  for d in study.doses))


def test_unmodified_breast_chain_has_no_major_finding(breast):
    _, review = breast
    assert review.verdict in (Verdict.PER_PROTOCOL, Verdict.MINOR)
    assert not [f for f in review.findings if f.severity in (Severity.MAJOR, Severity.NOT_EVALUABLE)]
    # the SITE prescription (14 Gy, 7 fractions, 4 x 0.5 Gy beams) applies to the boost target, whose D50 is ~14 Gy
    assert review.metrics["prescription"] == {"prescription_gy": 14.0, "target": "Tumor Bed", "fractions": 7}
    assert not _severities(review, "integrity.prescription_vs_dose")
    assert not _severities(review, "integrity.fraction_dose_inconsistent")
    assert _severities(review, "integrity.approval_status") == {Severity.INFO}  # UNAPPROVED
    assert {f.structure for f in review.findings if f.code == "names.unknown_structure"} >= {"Tumor Bed", "Areola"}
    assert review.metrics["structures"]["Lt Lung"]["tg263"] == "Lung_L"


def test_unmodified_proton_chain_is_per_protocol_and_reported_in_gy_rbe(proton):
    review = review_plan_study(proton, protocol=None)
    assert review.verdict is Verdict.PER_PROTOCOL, [f.to_json() for f in review.findings]
    assert review.metrics["dose"]["unit"] == "Gy(RBE)" and review.metrics["dose"]["summation_type"] == "PLAN"
    assert _severities(review, "integrity.no_prescription") == {Severity.INFO}


def test_changed_frame_of_reference_is_a_major_finding(rt_data, tmp_path):
    src = rt_data / BREAST
    for path in dicom_files(src):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.Modality == "RTDOSE":
            full = pydicom.dcmread(path)
            full.FrameOfReferenceUID = "2.25.99999999999999999999"
            full.save_as(tmp_path / path.name)
        else:
            (tmp_path / path.name).symlink_to(path)
    review = load_and_review(dicom_files(tmp_path))
    assert _severities(review, "integrity.frame_of_reference_mismatch") == {Severity.MAJOR}
    assert review.verdict is Verdict.MAJOR


def test_cropped_dose_grid_leaves_the_target_uncovered(breast):
    study, _ = breast
    dose = study.doses[0]
    target = next(s for s in study.structure_sets[0].structures if s.name == "Tumor Bed")
    z_mid = float(np.median([c.z_mm for c in target.closed_planar]))
    g = dose.geometry
    keep = int(np.searchsorted(g.z_positions_mm, z_mid))  # frames below the target's middle only
    cropped = dataclasses.replace(dose, dose=np.ascontiguousarray(dose.dose[:keep]),
                                  geometry=dataclasses.replace(g, shape=(keep, *g.shape[1:]),
                                                               z_offsets_mm=g.z_offsets_mm[:keep]))
    review = review_plan_study(dataclasses.replace(study, doses=(cropped,)), protocol=None)
    hits = [f for f in review.findings if f.code == "integrity.dose_grid_coverage"]
    assert any(f.severity is Severity.MAJOR and f.structure == "Tumor Bed" for f in hits), hits
    assert review.verdict is Verdict.MAJOR


@pytest.mark.parametrize("factor, severity", [(0.92, Severity.MINOR), (0.8, Severity.MAJOR)])
def test_scaled_dose_no_longer_matches_the_prescription(breast, factor, severity):
    study, _ = breast
    review = review_plan_study(_scaled(study, factor), protocol=None)
    assert _severities(review, "integrity.prescription_vs_dose") == {severity}


def test_rejected_plan_and_missing_machine_are_found(breast):
    study, _ = breast
    plan = study.plans[0]
    beams = (dataclasses.replace(plan.beams[0], treatment_machine_name=""), *plan.beams[1:])
    changed = dataclasses.replace(study, plans=(dataclasses.replace(plan, approval_status="REJECTED", beams=beams),))
    review = review_plan_study(changed, protocol=None)
    assert _severities(review, "integrity.approval_status") == {Severity.MAJOR}
    assert _severities(review, "integrity.treatment_machine_missing") == {Severity.MINOR}


def test_beam_doses_that_do_not_add_up_to_the_fraction_dose(breast):
    study, _ = breast
    plan = study.plans[0]
    beams = tuple(dataclasses.replace(b, beam_dose_gy=0.6) for b in plan.beams)  # 2.4 Gy vs 14 Gy / 7
    review = review_plan_study(dataclasses.replace(study, plans=(dataclasses.replace(plan, beams=beams),)),
                               protocol=None)
    assert _severities(review, "integrity.fraction_dose_inconsistent") == {Severity.MAJOR}


def test_proton_dose_without_rbe_weighting_is_flagged(proton):
    physical = dataclasses.replace(proton, doses=tuple(dataclasses.replace(d, dose_type="PHYSICAL")
                                                       for d in proton.doses))
    review = review_plan_study(physical, protocol=None)
    assert _severities(review, "integrity.rbe_convention") == {Severity.MINOR}


def test_relative_dose_and_missing_structures_are_not_evaluable(rt_data):
    folder = rt_data / "pydicom-rt-testfiles"
    study = load_plan_study([folder / "rtdose.dcm", folder / "rtstruct.dcm", folder / "rtplan.dcm"])
    review = review_plan_study(study, protocol=None)
    assert _severities(review, "integrity.dose_units") == {Severity.NOT_EVALUABLE}
    assert review.verdict is Verdict.NOT_EVALUABLE
    beam_only = review_plan_study(load_folder(rt_data / "raystation-proton-beamdose-aptg"), protocol=None)
    assert _severities(beam_only, "integrity.no_structure_set") == {Severity.NOT_EVALUABLE}
    assert beam_only.metrics["dose"]["summation_type"] == "PLAN"  # the BEAM dose, summed once


def test_unloadable_files_give_a_not_evaluable_review(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    review = load_and_review([bad])
    assert review.verdict is Verdict.NOT_EVALUABLE
    assert review.findings[0].code == "integrity.unreadable"


def test_a_breast_plan_cannot_be_evaluated_against_a_head_and_neck_protocol(breast):
    study, _ = breast
    review = review_plan_study(study, protocol=get_protocol("GORTEC-STYLE-70-56"))
    missing = {f.structure: f.severity for f in review.findings if f.code == "contour.required_structure_missing"}
    assert missing["PTV_70"] is Severity.NOT_EVALUABLE and missing["SpinalCord"] is Severity.MAJOR
    assert review.verdict is Verdict.NOT_EVALUABLE
    assert all(c.category is Severity.NOT_EVALUABLE for c in review.constraints)
    assert _severities(review, "protocol.fractionation") == {Severity.MAJOR}  # 7 fractions vs 35


def test_copy_of_a_chain_is_not_changed_by_the_review(rt_data, tmp_path):
    folder = tmp_path / "chain"
    shutil.copytree(rt_data / PROTON, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    load_and_review(dicom_files(folder))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_contours_beyond_an_incomplete_ct_are_reported_once(rt_data):
    from rtqa_node.checks import contours

    study = load_folder(rt_data / "eclipse-breast-boost-dicompyler")  # 1 of the 98 CT slices
    structures = {s.name: s for s in study.structure_sets[0].structures if s.has_volume}
    (finding,) = contours.outside_ct(structures, study.ct)
    assert finding.severity is Severity.MINOR and finding.values["outside_pct"]["Heart"] == 100.0
    full = load_folder(rt_data / BREAST)
    assert contours.outside_ct({s.name: s for s in full.structure_sets[0].structures if s.has_volume},
                               full.ct) == []
