"""The review as a Comprehensive 3D SR (TID 1500): valid (dciodvfy), readable by DCMTK (dsrdump, dsr2html) with
the verdict and every finding, the reviewed objects referenced, deterministic UIDs, predecessors, and an SR
for a plan that could not be analysed."""

from __future__ import annotations

import logging
import re
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from conftest import dicom_files
from report_helpers import dciodvfy_errors, dsrdump, groups_from_dsrdump, hn_review, synth_plan_study

from rtqa_node.report import outputs
from rtqa_node.report.outputs import build_review_outputs, result_uid, write_review_outputs
from rtqa_node.report.sr import not_performed_review, read_evidence
from rtqa_node.review import ConstraintResult, Finding, Review, Severity
from rtqa_node.rt.plan_study import load_folder


@pytest.fixture(scope="module")
def synth_study(tmp_path_factory) -> Path:
    return synth_plan_study(tmp_path_factory.mktemp("synth"))


def test_sr_is_valid_and_dsrdump_reads_back_the_verdict_and_every_finding(synth_study, tmp_path):
    review = hn_review()
    (path,) = write_review_outputs(review, load_folder(synth_study), tmp_path, plan_study_id="ps-test",
                                   revision=1, kinds=("sr",))
    assert dciodvfy_errors(path) == []
    assert pydicom.dcmread(path).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    groups = groups_from_dsrdump(dsrdump(path))
    assert groups[0]["verdict"] == "Major deviation"
    expected_severity = {Severity.MAJOR: "Major", Severity.MINOR: "Minor", Severity.INFO: "Information"}
    findings = [g for g in groups if "severity" in g]
    assert [(g["finding"], g["severity"], g["comment"]) for g in findings] == [
        (f.code, expected_severity[f.severity], f.message) for f in review.findings]


def test_dsr2html_renders_the_sr(synth_study, tmp_path):
    review = hn_review()
    (path,) = write_review_outputs(review, load_folder(synth_study), tmp_path, plan_study_id="ps-test",
                                   revision=1, kinds=("sr",))
    html = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, check=True).stdout
    assert "Major deviation" in html
    for finding in review.findings:
        assert finding.message in html


def test_sr_round_trips_through_highdicom_with_constraints_predictions_and_versions(synth_study, tmp_path):
    review = hn_review()
    (path,) = write_review_outputs(review, load_folder(synth_study), tmp_path, plan_study_id="ps-test",
                                   revision=1, kinds=("sr",))
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    report = sr.content  # highdicom parses the root back into a TID 1500 MeasurementReport
    assert isinstance(report, hd.sr.MeasurementReport)
    (observer,) = report.get_observer_contexts()
    assert observer.observer_type.value == "121007"  # a device
    groups = report.get_image_measurement_groups()
    # verdict, 3 findings, 4 constraints, 2 predictions
    assert len(groups) == 1 + len(review.findings) + len(review.constraints) + len(review.predictions)
    assert groups[0].finding_type.meaning == "Radiotherapy plan review"
    cord = next(g for g in groups if g.finding_type.value == "RTQA-C-oar_cord_max")
    value, per_protocol, minor = cord.get_measurements()
    assert value.value == pytest.approx(38.2) and value.unit.value == "Gy" and value.name.value == "RTQA-M-D0.03cc"
    assert (per_protocol.value, minor.value) == (pytest.approx(30.0), pytest.approx(35.0))
    text = dsrdump(path)
    # every computable constraint value with its UCUM unit, every category, the limits
    assert 'NUM:(,,"D0.03cc")="38.2" (Gy,UCUM,"Gy")' in text
    assert 'NUM:(,,"Dmean")="27.5" (Gy,UCUM,"Gy")' in text
    assert 'TEXT:(,,"Per protocol limit")="D95% >= 68.6 Gy"' in text
    assert 'NUM:(,,"Per protocol limit value")="68.6" (Gy,UCUM,"Gy")' in text
    assert 'NUM:(,,"Minor deviation limit value")="66.5" (Gy,UCUM,"Gy")' in text
    categories = re.findall(r'"Protocol constraint category"\)=\([^,]+,[^,]+,"([^"]+)"\)', text)
    assert categories == ["Major deviation", "Minor deviation", "Per protocol", "Not Evaluated"]
    # model predictions: probability, top instances with attention weights, model name and version
    assert 'NUM:(,,"Probability")="0.81" (1,UCUM,"no units")' in text
    assert 'TEXT:(,,"Tracking Identifier")="SpinalCord D0.03cc"' in text
    assert 'NUM:(,,"Attention weight")="0.52"' in text
    assert 'TEXT:(,,"Algorithm Name")="mil-att-fused"' in text and 'TEXT:(,,"Algorithm Version")="0.3.1"' in text
    assert 'TEXT:(,,"Algorithm Version")="checks-test-1"' in text
    assert "(87715008,SCT,\"Xerostomia\")" in text
    # the private coding scheme is declared
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99RTQA"


def test_sr_references_every_reviewed_object_of_the_real_chain_at_document_level(rt_data, tmp_path):
    folder = rt_data / "eclipse-breast-boost-fullct-weasis"
    study = load_folder(folder)
    review = Review(findings=(Finding("protocol.oar_constraint", Severity.MINOR, "Heart Dmax 2.6 Gy > 2 Gy",
                                      {"dmax_gy": 2.6}, structure="Heart"),),
                    protocol="TEST-BREAST",
                    constraints=(ConstraintResult("heart_max", "Heart", "Dmax", 2.6, "Gy", "<= 2 Gy", "<= 3 Gy",
                                                  Severity.MINOR),))
    (path,) = write_review_outputs(review, study, tmp_path, plan_study_id="ps-eclipse", revision=1, kinds=("sr",))
    assert dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    members = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in dicom_files(folder)}
    referenced = {str(i.ReferencedSOPInstanceUID)
                  for study_item in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in study_item.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    referenced |= {str(i.ReferencedSOPInstanceUID)
                   for study_item in sr.get("PertinentOtherEvidenceSequence", [])
                   for series in study_item.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert referenced == members and len(members) == 101  # RTPLAN, RTSTRUCT, RTDOSE, 98 CT
    plan = pydicom.dcmread(study.plans[0].file, stop_before_pixels=True)
    assert sr.StudyInstanceUID == plan.StudyInstanceUID and sr.PatientID == plan.PatientID
    assert sr.SOPInstanceUID == result_uid("ps-eclipse", 1, "review")


def test_uids_are_deterministic_and_a_new_review_references_the_earlier_sr(synth_study, tmp_path, monkeypatch):
    study = load_folder(synth_study)
    (first,) = write_review_outputs(hn_review(), study, tmp_path, plan_study_id="ps-x", revision=1, kinds=("sr",))
    uid_1 = pydicom.dcmread(first).SOPInstanceUID
    (again,) = write_review_outputs(hn_review(), study, tmp_path, plan_study_id="ps-x", revision=1, kinds=("sr",))
    assert pydicom.dcmread(again).SOPInstanceUID == uid_1  # a re-run is the same document
    assert "PredecessorDocumentsSequence" not in pydicom.dcmread(again)
    # a new review of the same plan revision (a new algorithm version) replaces the earlier SR and says so
    monkeypatch.setattr(outputs, "RESULT_VERSION", "report-test-next")
    (newer,) = write_review_outputs(hn_review(), study, tmp_path, plan_study_id="ps-x", revision=1, kinds=("sr",))
    sr = pydicom.dcmread(newer)
    assert sr.SOPInstanceUID != uid_1
    (pre,) = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert pre.ReferencedSOPInstanceUID == uid_1
    assert dciodvfy_errors(newer) == []
    # and a review of the next revision references that one
    (next_rev,) = write_review_outputs(hn_review(), study, tmp_path, plan_study_id="ps-x", revision=2,
                                       kinds=("sr",))
    (pre,) = pydicom.dcmread(next_rev).PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]\
        .ReferencedSOPSequence
    assert pre.ReferencedSOPInstanceUID == sr.SOPInstanceUID


def test_a_plan_that_could_not_be_analysed_gets_an_sr_that_says_so_and_why(synth_study, tmp_path):
    review = not_performed_review("PermanentError: no RTDOSE referencing the plan")
    result = build_review_outputs(review, None, read_evidence(sorted(synth_study.iterdir())),
                                  plan_study_id="ps-dead", revision=3)
    assert [o.kind for o in result.objects] == ["sr", "pdf"]  # no risk map without a loaded plan study
    path = tmp_path / "sr.dcm"
    result.objects[0].dataset.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    groups = groups_from_dsrdump(dsrdump(path))
    assert groups[0]["verdict"] == "Not Evaluated"
    assert groups[1] == {"finding": "analysis.not_performed", "severity": "Not Evaluated",
                         "comment": "Analysis not performed: PermanentError: no RTDOSE referencing the plan"}


def test_invalid_identity_values_give_a_valid_sr_and_reach_no_log(rt_data, tmp_path, caplog):
    # this chain's plan holds a birth date "0001" and a sex "N/A": highdicom refuses to copy such values, and
    # pydicom's warnings about them quote the value (a birth date is PHI)
    folder = rt_data / "geant4-topas-for-mismatch"
    study = load_folder(folder)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (path,) = write_review_outputs(not_performed_review("frame of reference mismatch"), study, tmp_path,
                                       plan_study_id="ps-g4", revision=1, kinds=("sr",))
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert not [m for m in said if "0001" in m or "N/A" in m], said
    assert "invalid_identity_attributes_blanked" in [r.getMessage() for r in caplog.records]
    assert dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    plan = pydicom.dcmread(study.plans[0].file, stop_before_pixels=True, force=True)
    assert (sr.PatientID, sr.StudyInstanceUID) == (plan.PatientID, plan.StudyInstanceUID)
