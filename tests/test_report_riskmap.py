"""The risk map as RT Dose and as Parametric Map: valid (dciodvfy), on the plan's frame of reference and dose
grid, carrying the labelled quantity (dose above the tightest organ limit, not dose), on synthetic and real
chains."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from report_helpers import dciodvfy_errors, hn_review, synth_plan_study

from rtqa_node.report.outputs import build_review_outputs, write_review_outputs
from rtqa_node.report.riskmap import attention_risk_map, oar_excess_risk_map, upper_limit_gy
from rtqa_node.report.sr import read_evidence
from rtqa_node.review import ConstraintResult, Review, Severity
from rtqa_node.rt.plan_study import load_folder, plan_dose, read_dose

LIMITS_GY = {"SpinalCord": 30.0, "Parotid_L": 26.0, "Larynx": 44.0}  # the "<=" per-protocol limits of hn_review()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = synth_plan_study(tmp_path_factory.mktemp("synth"))
    study = load_folder(folder)
    out = tmp_path_factory.mktemp("out")
    paths = write_review_outputs(hn_review(), study, out, plan_study_id="ps-risk", revision=1,
                                 kinds=("sr", "riskmap_rtdose", "parametric_map"))
    return study, {p.name.split("-r1-")[1].removesuffix(".dcm"): p for p in paths}


def test_upper_limits_are_read_from_per_protocol_thresholds():
    assert upper_limit_gy("<= 45 Gy") == 45.0 and upper_limit_gy("< 26.5 Gy") == 26.5
    assert upper_limit_gy(">= 68.6 Gy") is None and upper_limit_gy("<= 50 %") is None


def test_riskmap_rtdose_is_valid_and_lies_on_the_plan_dose_grid(written):
    study, paths = written
    path = paths["riskmap_rtdose"]
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    dose = plan_dose(study)
    assert ds.Modality == "RTDOSE" and ds.BitsAllocated == 16
    assert ds.DoseUnits == "RELATIVE" and "NOT DOSE" in ds.DoseComment and "NOT DOSE" in ds.SeriesDescription
    assert ds.FrameOfReferenceUID == dose.frame_of_reference_uid == study.ct.frame_of_reference_uid
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == study.plans[0].sop_instance_uid
    assert ds.StudyInstanceUID == pydicom.dcmread(study.plans[0].file).StudyInstanceUID
    loaded = read_dose(ds, path)  # the project's own RTDOSE reader, as for any dose
    g, h = loaded.geometry, dose.geometry
    assert g.shape == h.shape
    np.testing.assert_allclose(g.origin_mm, h.origin_mm, atol=1e-3)
    np.testing.assert_allclose(g.spacing_mm, h.spacing_mm, atol=1e-4)
    np.testing.assert_allclose(g.z_offsets_mm, h.z_offsets_mm, atol=1e-3)
    assert g.row_direction == h.row_direction and g.column_direction == h.column_direction


def test_riskmap_values_are_the_dose_excess_inside_the_limited_organs(written):
    study, paths = written
    risk = read_dose(pydicom.dcmread(paths["riskmap_rtdose"]), paths["riskmap_rtdose"]).dose
    dose = plan_dose(study)
    assert 0.0 <= risk.min() and risk.max() <= 1.0 and risk.max() > 0.05
    hot = risk > 0
    # every non-zero voxel is (D - T) / T for one of the limited organs, to the 1e-4 storage step
    candidates = np.stack([np.clip((dose.dose - t) / t, 0, 1) for t in LIMITS_GY.values()])
    assert np.min(np.abs(candidates[:, hot] - risk[hot]), axis=0).max() < 2e-4
    assert not hot[dose.dose <= min(LIMITS_GY.values())].any()
    # and lies inside the bounding box of the organs' contours (one voxel of slack)
    centres = np.stack(np.meshgrid(*[np.arange(n) for n in dose.geometry.shape], indexing="ij"), -1)[hot]
    g = dose.geometry
    xyz = np.asarray(g.origin_mm) + centres[:, 2:3] * g.spacing_mm[0] * np.asarray(g.row_direction) \
        + centres[:, 1:2] * g.spacing_mm[1] * np.asarray(g.column_direction) \
        + np.asarray(g.z_offsets_mm)[centres[:, 0]][:, None] * g.normal
    inside_any = np.zeros(len(xyz), dtype=bool)
    for name in LIMITS_GY:
        points = np.concatenate([c.points_mm for c in study.structure_set.by_name(name).contours])
        lo, hi = points.min(0) - g.spacing_mm, points.max(0) + g.spacing_mm
        inside_any |= np.all((xyz >= lo) & (xyz <= hi), axis=1)
    assert inside_any.all()


def test_parametric_map_is_float_on_the_same_grid_and_frame_of_reference(written):
    study, paths = written
    path = paths["parametric_map"]
    assert dciodvfy_errors(path) == []
    pm = pydicom.dcmread(path)
    rtdose = pydicom.dcmread(paths["riskmap_rtdose"])
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and "FloatPixelData" in pm
    assert pm.FrameOfReferenceUID == rtdose.FrameOfReferenceUID
    assert (pm.Rows, pm.Columns, pm.NumberOfFrames) == (rtdose.Rows, rtdose.Columns, rtdose.NumberOfFrames)
    origin = np.asarray(rtdose.ImagePositionPatient, dtype=float)
    offsets = np.asarray(rtdose.GridFrameOffsetVector, dtype=float)
    positions = np.asarray([f.PlanePositionSequence[0].ImagePositionPatient
                            for f in pm.PerFrameFunctionalGroupsSequence], dtype=float)
    # highdicom orders the frames of a 3D parametric map along the normal as it sees fit (here descending z):
    # match frames by position, then compare positions and values
    order = np.argsort(positions[:, 2])
    np.testing.assert_allclose(positions[order], origin + offsets[:, None] * np.array([0, 0, 1.0]), atol=1e-3)
    shared = pm.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(shared.PixelMeasuresSequence[0].PixelSpacing, rtdose.PixelSpacing, atol=1e-4)
    values = pm.pixel_array.astype(np.float32)[order]
    np.testing.assert_allclose(values, rtdose.pixel_array * float(rtdose.DoseGridScaling), atol=1e-4)
    mapping = shared.RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "RTQA_RISK" and mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    sources = {str(s.ReferencedSOPInstanceUID) for s in pm.SourceImageSequence}
    assert sources == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in study.ct.files}


def test_riskmap_of_the_real_chain_is_valid_on_its_frame_of_reference(rt_data, tmp_path):
    study = load_folder(rt_data / "eclipse-breast-boost-fullct-weasis")
    review = Review(findings=(), protocol="TEST-BREAST", constraints=(
        ConstraintResult("heart_max", "Heart", "Dmax", 2.6, "Gy", "<= 2 Gy", "<= 3 Gy", Severity.MINOR),))
    paths = write_review_outputs(review, study, tmp_path, plan_study_id="ps-eclipse", revision=1,
                                 kinds=("riskmap_rtdose", "parametric_map"))
    by_kind = {p.name.split("-r1-")[1].removesuffix(".dcm"): p for p in paths}
    for kind in ("riskmap_rtdose", "parametric_map"):
        assert dciodvfy_errors(by_kind[kind]) == [], kind
        ds = pydicom.dcmread(by_kind[kind], stop_before_pixels=True)
        assert ds.FrameOfReferenceUID == study.ct.frame_of_reference_uid
        assert (ds.Rows, ds.Columns, int(ds.NumberOfFrames)) == plan_dose(study).geometry.shape[1:] + (98,)
    risk = pydicom.dcmread(by_kind["riskmap_rtdose"]).pixel_array
    assert risk.max() > 0  # the heart receives more than 2 Gy somewhere


def test_no_risk_map_without_an_organ_limit_or_a_dose(rt_data, tmp_path):
    study = load_folder(rt_data / "eclipse-breast-boost-fullct-weasis")  # its plan names no organ limits
    assert oar_excess_risk_map(Review(findings=(), protocol=None), study) is None
    without_dose = type(study)(study.ct, study.structure_sets, study.plans, ())
    assert oar_excess_risk_map(hn_review(), without_dose) is None
    paths = write_review_outputs(Review(findings=(), protocol=None), study, tmp_path, plan_study_id="ps-e",
                                 revision=1, kinds=("sr", "riskmap_rtdose", "parametric_map"))
    assert [p.name for p in paths] == ["ps-e-r1-sr.dcm"]


def test_riskmap_resolves_the_reviews_tg263_names_to_the_plans_structures(rt_data):
    study = load_folder(rt_data / "eclipse-breast-boost-fullct-weasis")
    # the checks grade "Lung_L"; the plan calls it "Lt Lung" (review.metrics["names"], rtqa_node/checks)
    review = Review(findings=(), protocol="TEST-BREAST",
                    constraints=(ConstraintResult("lung_mean", "Lung_L+Heart", "Dmean", 3.1, "Gy", "<= 1 Gy", None,
                                                  Severity.MAJOR),),
                    metrics={"names": {"Lt Lung": {"standard": "Lung_L", "how": "synonym"},
                                       "Heart": {"standard": "Heart", "how": "exact"}}})
    risk = oar_excess_risk_map(review, study)
    assert risk is not None and risk.limits_gy == (("Lung_L+Heart", 1.0),)
    without_lung = oar_excess_risk_map(Review(findings=(), protocol="T", constraints=(
        ConstraintResult("heart", "Heart", "Dmean", 3.1, "Gy", "<= 1 Gy", None, Severity.MAJOR),)), study)
    assert np.count_nonzero(risk.values) > np.count_nonzero(without_lung.values) > 0


def test_a_spatial_models_attention_map_replaces_the_interim_map(written, tmp_path):
    study, _ = written
    shape = plan_dose(study).geometry.shape
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    mass = np.exp(-((z - shape[0] / 2) ** 2 + (y - shape[1] / 3) ** 2 + (x - shape[2] / 2) ** 2) / 50.0)
    mass /= mass.sum()  # attention mass sums to 1 (rtqa_node.ml.inference.MlResult.risk_map)
    risk = attention_risk_map(mass, study, model="fused", model_version="test-1")
    evidence = read_evidence([study.plans[0].file])
    result = build_review_outputs(hn_review(), study, evidence, plan_study_id="ps-attn", revision=1,
                                  kinds=("riskmap_rtdose", "parametric_map"), risk=risk)
    by_kind = {o.kind: o.dataset for o in result.objects}
    for kind in ("riskmap_rtdose", "parametric_map"):
        path = tmp_path / f"{kind}.dcm"
        by_kind[kind].save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], kind
    rtdose = pydicom.dcmread(tmp_path / "riskmap_rtdose.dcm")
    assert "attention of fused test-1" in rtdose.ImageComments and "Limits" not in rtdose.ImageComments
    values = rtdose.pixel_array * float(rtdose.DoseGridScaling)
    assert values.max() == pytest.approx(1.0) and np.unravel_index(values.argmax(), shape) == \
        np.unravel_index(mass.argmax(), shape)
    pm = pydicom.dcmread(tmp_path / "parametric_map.dcm", stop_before_pixels=True)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "RTQA-RISK-ATTN"
    with pytest.raises(ValueError, match="grid"):
        attention_risk_map(mass[:-1], study, model="fused", model_version="test-1")
