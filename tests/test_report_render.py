"""The one-page summary: the PDF renders to a non-empty page (pdftoppm), its findings and verdict are the SR's
(pdftotext), and the Encapsulated PDF object is valid and carries the same PDF."""

from __future__ import annotations

import re
import subprocess

import matplotlib.image
import numpy as np
import pydicom
import pytest
from report_helpers import dciodvfy_errors, hn_review, synth_plan_study

from rtqa_node.report.outputs import write_review_outputs
from rtqa_node.rt.plan_study import load_folder


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = synth_plan_study(tmp_path_factory.mktemp("synth"))
    out = tmp_path_factory.mktemp("out")
    paths = write_review_outputs(hn_review(), load_folder(folder), out, plan_study_id="ps-render", revision=1,
                                 kinds=("sr", "pdf"))
    return folder, {p.name.removeprefix("ps-render-r1-"): p for p in paths}


def _content_items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_pdf_renders_to_one_non_empty_page(written, tmp_path):
    _, paths = written
    subprocess.run(["pdftoppm", "-png", "-r", "40", str(paths["summary.pdf"]), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page*.png"))
    assert len(pages) == 1
    image = matplotlib.image.imread(pages[0])[..., :3]
    assert image.shape[0] > image.shape[1] > 200  # A4 portrait at 40 dpi
    ink = np.mean(np.any(image < 0.9, axis=-1))
    assert 0.05 < ink < 0.9  # text, table, plot and CT slices; not blank, not a black page
    png = matplotlib.image.imread(paths["summary.png"])
    assert png.shape[0] > 1000 and np.mean(np.any(png[..., :3] < 0.9, axis=-1)) > 0.05


def test_findings_and_verdict_in_the_pdf_match_the_sr(written):
    _, paths = written
    text = subprocess.run(["pdftotext", "-layout", str(paths["summary.pdf"]), "-"], capture_output=True,
                          text=True, check=True).stdout
    flat = re.sub(r"\s+", " ", text)
    sr = pydicom.dcmread(paths["sr.dcm"])
    items = list(_content_items(sr))
    (verdict,) = [i.ConceptCodeSequence[0].CodeMeaning for i in items if i.ValueType == "CODE"
                  and i.ConceptNameCodeSequence[0].CodeMeaning == "Plan review verdict"]
    assert f"Verdict: {verdict.upper()}" in flat
    comments = [i.TextValue for i in items if i.ValueType == "TEXT"
                and i.ConceptNameCodeSequence[0].CodeMeaning == "Comment" and not i.TextValue.startswith("source:")]
    codes = [(i.get("ConceptCodeSequence") or [None])[0] for i in items if i.ValueType == "CODE"
             and i.ConceptNameCodeSequence[0].CodeMeaning == "Finding"]
    finding_codes = [c.get("LongCodeValue") or c.CodeValue for c in codes if c.CodingSchemeDesignator == "99RTQA"
                     and "." in (c.get("LongCodeValue") or c.CodeValue)]
    assert len(comments) == len(finding_codes) == len(hn_review().findings)
    for message, code in zip(comments, finding_codes):
        assert message in flat and code in flat
    assert f"Findings ({len(comments)})" in flat


def test_encapsulated_pdf_is_valid_and_holds_the_same_pdf(written):
    folder, paths = written
    assert dciodvfy_errors(paths["pdf.dcm"]) == []
    ds = pydicom.dcmread(paths["pdf.dcm"])
    pdf = paths["summary.pdf"].read_bytes()
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength] == pdf and pdf.startswith(b"%PDF")
    plan = pydicom.dcmread(folder / "RP.dcm", stop_before_pixels=True)
    assert (ds.PatientID, ds.StudyInstanceUID) == (plan.PatientID, plan.StudyInstanceUID)
