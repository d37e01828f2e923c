"""rtqa synth: the files are valid DICOM, the reference chain resolves, bytes are reproducible, and the
dose, deviations and outcomes carry the ground truth the manifest claims."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolygonPath

from rtqa_node.synth import CohortConfig, generate_cohort, simulate_patient
from rtqa_node.synth.outcomes import draw_outcomes, dysphagia_ntcp, local_control_tcp, xerostomia_ntcp

COHORT = CohortConfig(patients=2, sites=2, seed=7, slices=60, deviation_rate=0.3)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    manifest = generate_cohort(out, COHORT, report=True)
    return out, manifest


def _read_folder(folder: Path) -> dict:
    cts = [pydicom.dcmread(p) for p in sorted(folder.glob("CT*.dcm"))]
    return {"ct": cts, "rs": pydicom.dcmread(folder / "RS.dcm"), "rp": pydicom.dcmread(folder / "RP.dcm"),
            "rd": pydicom.dcmread(folder / "RD.dcm")}


def test_every_patient_folder_holds_a_complete_plan_study(cohort):
    out, manifest = cohort
    assert [p["folder"] for p in manifest["patients"]] == ["HN001", "HN002"]
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert (out / "ground_truth.csv").read_text().count("\n") == 3
    assert "Protocol verdicts" in (out / "report.md").read_text()
    for truth in manifest["patients"]:
        objs = _read_folder(out / truth["folder"])
        assert len(objs["ct"]) == COHORT.slices
        assert {ds.Modality for ds in objs["ct"]} == {"CT"}
        assert (objs["rs"].Modality, objs["rp"].Modality, objs["rd"].Modality) == ("RTSTRUCT", "RTPLAN", "RTDOSE")
        assert str(objs["ct"][0].PatientName) == truth["patient_name"]
        assert str(objs["ct"][0].PatientName).startswith("SYNTH^HN")
        hu = objs["ct"][0].pixel_array * float(objs["ct"][0].RescaleSlope) + float(objs["ct"][0].RescaleIntercept)
        assert hu.min() < -900 and hu.max() > 0  # air around a body


def test_reference_chain_resolves_rtdose_to_rtplan_to_rtstruct_to_every_ct_image(cohort):
    out, manifest = cohort
    for truth in manifest["patients"]:
        objs = _read_folder(out / truth["folder"])
        ct_uids = {ds.SOPInstanceUID for ds in objs["ct"]}
        z_of = {ds.SOPInstanceUID: float(ds.ImagePositionPatient[2]) for ds in objs["ct"]}
        rs, rp, rd = objs["rs"], objs["rp"], objs["rd"]
        for_uid = objs["ct"][0].FrameOfReferenceUID
        assert {ds.FrameOfReferenceUID for ds in objs["ct"]} == {for_uid}
        assert rs.FrameOfReferenceUID == rp.FrameOfReferenceUID == rd.FrameOfReferenceUID == for_uid
        assert len({ds.StudyInstanceUID for ds in [*objs["ct"], rs, rp, rd]}) == 1

        (for_ref,) = rs.ReferencedFrameOfReferenceSequence
        assert for_ref.FrameOfReferenceUID == for_uid
        (series_ref,) = for_ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence
        assert series_ref.SeriesInstanceUID == objs["ct"][0].SeriesInstanceUID
        assert {i.ReferencedSOPInstanceUID for i in series_ref.ContourImageSequence} == ct_uids
        roi_numbers = {roi.ROINumber for roi in rs.StructureSetROISequence}
        for roi_contour in rs.ROIContourSequence:
            assert roi_contour.ReferencedROINumber in roi_numbers
            for contour in roi_contour.ContourSequence:
                (image,) = contour.ContourImageSequence
                assert image.ReferencedSOPInstanceUID in ct_uids
                points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
                assert len(points) == contour.NumberOfContourPoints >= 3
                assert np.allclose(points[:, 2], z_of[image.ReferencedSOPInstanceUID], atol=0.01)

        assert rp.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
        assert {d.ReferencedROINumber for d in rp.DoseReferenceSequence} <= roi_numbers
        assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == rp.SOPInstanceUID
        assert rd.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
        assert rd.DoseSummationType == "PLAN" and rd.DoseUnits == "GY" and rd.DoseType == "PHYSICAL"
        offsets = np.asarray(rd.GridFrameOffsetVector, dtype=float)
        assert offsets[0] == 0.0 and np.all(np.diff(offsets) > 0)
        assert truth["uids"]["rtdose_sop_instance_uid"] == rd.SOPInstanceUID


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), f"dciodvfy exited {result.returncode} on {path.name}"
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_reports_no_errors_for_each_modality(cohort):
    out, _ = cohort
    folder = out / "HN001"
    for name in ("CT001.dcm", "RS.dcm", "RP.dcm", "RD.dcm"):
        assert _dciodvfy_errors(folder / name) == [], name


def test_same_seed_gives_identical_bytes_and_another_seed_other_uids(tmp_path):
    config = CohortConfig(patients=1, seed=3, slices=30)
    generate_cohort(tmp_path / "a", config)
    generate_cohort(tmp_path / "b", config)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 30 + 3 + 2
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    generate_cohort(tmp_path / "c", CohortConfig(patients=1, seed=4, slices=30))
    uid_a = pydicom.dcmread(tmp_path / "a" / "HN001" / "RP.dcm").SOPInstanceUID
    uid_c = pydicom.dcmread(tmp_path / "c" / "HN001" / "RP.dcm").SOPInstanceUID
    assert uid_a != uid_c and uid_a.startswith("2.25.")


def test_plan_states_the_prescription_and_fractions(cohort):
    out, manifest = cohort
    for truth in manifest["patients"]:
        rp = pydicom.dcmread(out / truth["folder"] / "RP.dcm")
        rx = {d.DoseReferenceDescription: float(d.TargetPrescriptionDose)
              for d in rp.DoseReferenceSequence if d.DoseReferenceType == "TARGET"}
        assert rx == {"PTV_70": 70.0, "PTV_56": 56.0}
        (group,) = rp.FractionGroupSequence
        assert group.NumberOfFractionsPlanned == truth["plan"]["fractions"]
        planted = {d["code"] for d in truth["planted_deviations"]}
        assert (group.NumberOfFractionsPlanned == 35) == ("fractionation" not in planted)
        assert group.NumberOfBeams == len(rp.BeamSequence) in (7, 9)
        beam_dose = sum(float(b.BeamDose) for b in group.ReferencedBeamSequence)
        assert beam_dose * group.NumberOfFractionsPlanned == pytest.approx(70.0, abs=0.05)
        assert all(float(b.BeamMeterset) > 0 for b in group.ReferencedBeamSequence)
        assert {float(b.ControlPointSequence[0].NominalBeamEnergy) for b in rp.BeamSequence} == {6.0}
        assert rp.ApprovalStatus == "APPROVED"


def _dose_in_roi(rs, rd, name: str) -> np.ndarray:
    """Dose values of RTDOSE voxels whose centres lie inside the ROI's contours (even-odd), read from files."""
    number = next(r.ROINumber for r in rs.StructureSetROISequence if r.ROIName == name)
    contours = next(c for c in rs.ROIContourSequence if c.ReferencedROINumber == number).ContourSequence
    dose = rd.pixel_array.astype(float) * float(rd.DoseGridScaling)
    x0, y0, z0 = (float(v) for v in rd.ImagePositionPatient)
    dy, dx = (float(v) for v in rd.PixelSpacing)
    zs = z0 + np.asarray(rd.GridFrameOffsetVector, dtype=float)
    xx, yy = np.meshgrid(x0 + dx * np.arange(rd.Columns), y0 + dy * np.arange(rd.Rows))
    centres = np.column_stack([xx.ravel(), yy.ravel()])
    inside = np.zeros(dose.shape, dtype=bool)
    for contour in contours:
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        k = int(np.argmin(np.abs(zs - points[0, 2])))
        inside[k] ^= PolygonPath(points[:, :2]).contains_points(centres).reshape(rd.Rows, rd.Columns)
    return dose[inside]


def test_dose_covers_ptv70_and_matches_the_ground_truth(cohort):
    out, manifest = cohort
    for truth in manifest["patients"]:
        objs = _read_folder(out / truth["folder"])
        ptv70 = _dose_in_roi(objs["rs"], objs["rd"], "PTV_70")
        d95 = float(np.percentile(ptv70, 5))
        assert d95 == pytest.approx(truth["organs"]["PTV_70"]["d95_gy"], abs=1.0)
        if "ptv70_underdose" not in {d["code"] for d in truth["planted_deviations"]}:
            assert 68.0 <= d95 <= 72.0
        assert float(ptv70.mean()) == pytest.approx(71.0, abs=2.5)
        for organ in ("Parotid_L", "Parotid_R", "SpinalCord"):
            mean = float(_dose_in_roi(objs["rs"], objs["rd"], organ).mean())
            assert mean == pytest.approx(truth["organs"][organ]["mean_gy"], abs=1.5)
        assert float(objs["rd"].pixel_array.max()) * float(objs["rd"].DoseGridScaling) < 80.0


@pytest.fixture(scope="module")
def simulated():
    config = CohortConfig(patients=10, sites=3, seed=11, slices=40, deviation_rate=0.5)
    sites = config.site_profiles()
    return [simulate_patient(config, i, sites).truth for i in range(config.patients)]


def test_parotid_mean_doses_vary_across_patients(simulated):
    means = np.array([[t["organs"][s]["mean_gy"] for s in ("Parotid_L", "Parotid_R")] for t in simulated]).ravel()
    assert means.min() >= 5.0 and means.max() <= 60.0
    assert means.max() - means.min() >= 15.0
    assert np.std(means) >= 4.0


def test_planted_deviations_are_realised_and_graded(simulated):
    assert any(t["planted_deviations"] for t in simulated)
    assert any(not t["planted_deviations"] for t in simulated)
    for t in simulated:
        planted = {(d["code"], d["severity"]) for d in t["planted_deviations"]}
        realised = {(d["code"], d["severity"]) for d in t["deviations"]}
        assert planted == realised, t["folder"]
        expected = "major" if any(s == "major" for _, s in planted) else "minor" if planted else "per_protocol"
        assert t["true_verdict"] == expected
        cord = t["organs"]["SpinalCord"]["max_gy"]
        assert (cord > 45.0) == any(c == "cord_overdose" for c, _ in planted)


def test_outcome_models_respond_to_dose():
    assert xerostomia_ntcp(10.0) < 0.1 < xerostomia_ntcp(39.9) < xerostomia_ntcp(60.0)
    assert xerostomia_ntcp(39.9) == pytest.approx(0.5)  # TD50
    assert dysphagia_ntcp(40.0) < dysphagia_ntcp(60.0) < dysphagia_ntcp(70.0)
    assert dysphagia_ntcp(60.0) == pytest.approx(0.5)  # D50
    assert local_control_tcp(60.0, 15.0) < local_control_tcp(70.0, 15.0)
    assert local_control_tcp(70.0, 40.0) < local_control_tcp(70.0, 5.0)
    rng = np.random.default_rng(0)
    low = [draw_outcomes(rng, mean_parotids_gy=15, mean_constrictor_gy=40, ptv70_d95_gy=62, gtv_volume_cc=15)
           for _ in range(400)]
    high = [draw_outcomes(rng, mean_parotids_gy=45, mean_constrictor_gy=65, ptv70_d95_gy=70, gtv_volume_cc=15)
            for _ in range(400)]
    for endpoint in ("xerostomia", "dysphagia", "local_control"):
        rate_low = np.mean([o[endpoint]["event"] for o in low])
        rate_high = np.mean([o[endpoint]["event"] for o in high])
        assert rate_high - rate_low > 0.1, endpoint


def test_ground_truth_outcomes_follow_the_realised_doses(simulated):
    for t in simulated:
        assert t["outcomes"]["xerostomia"]["probability"] == pytest.approx(xerostomia_ntcp(t["mean_parotids_gy"]), abs=1e-4)
        assert t["outcomes"]["dysphagia"]["probability"] == pytest.approx(
            dysphagia_ntcp(t["organs"]["Musc_Constrict"]["mean_gy"]), abs=1e-4)
        labels = t["reviewer_labels"]
        assert {labels["site_reviewer"], *labels["central_reviewers"]} <= {"per_protocol", "minor", "major"}


def test_sites_differ_systematically():
    config = CohortConfig(patients=6, sites=3, seed=2)
    sites = config.site_profiles()
    assert len({(s.ptv_margin_mm, s.beam_count, s.pixel_spacing_mm, s.oar_contour_bias_mm) for s in sites}) == 3
    assert [s.site_id for s in sites] == ["SITE01", "SITE02", "SITE03"]
    assert config.site_profiles() == sites  # a pure function of the seed


def _rtqa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtqa_node", *args], capture_output=True, text=True, timeout=120)


def test_cli_writes_a_cohort_and_prints_one_json_document(tmp_path):
    result = _rtqa("synth", "--patients", "2", "--seed", "1", "--slices", "30", "--out", str(tmp_path / "c"),
                   "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [p["folder"] for p in summary["patients"]] == ["HN001", "HN002"]
    assert all(p["files"] == 33 for p in summary["patients"])
    # An earlier synth output may be overwritten; patients it listed beyond the new cohort are removed.
    result = _rtqa("synth", "--patients", "1", "--seed", "1", "--slices", "30", "--out", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    assert "HN001" in result.stdout
    assert not (tmp_path / "c" / "HN002").exists()


def test_cli_refuses_bad_arguments_and_foreign_folders_with_exit_2(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("not ours")
    result = _rtqa("synth", "--patients", "1", "--out", str(tmp_path / "foreign"))
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (tmp_path / "foreign" / "keep.txt").exists()
    result = _rtqa("synth", "--patients", "0", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "--patients" in result.stderr
    result = _rtqa("synth", "--patients", "2", "--sites", "3", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "--sites" in result.stderr
