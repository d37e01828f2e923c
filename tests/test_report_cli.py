"""`rtqa review PATH --out DIR` writes the objects the node would send, from the real review: valid DICOM, and
the SR says what the JSON says."""

from __future__ import annotations

import json
import subprocess

import pydicom
from conftest import REPO, rtqa_command
from report_helpers import dciodvfy_errors, dsrdump, groups_from_dsrdump, synth_plan_study

VERDICT_MEANING = {"per_protocol": "Per protocol", "minor": "Minor deviation", "major": "Major deviation",
                   "not_evaluable": "Not Evaluated"}


def test_review_out_writes_valid_outputs_that_agree_with_the_json(tmp_path):
    folder = synth_plan_study(tmp_path / "synth")
    out = tmp_path / "out"
    result = subprocess.run([*rtqa_command(), "review", str(folder), "--json", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(result.stdout)
    written = {p.name.split("-r1-")[-1]: p for p in out.iterdir()}
    assert {"sr.dcm", "pdf.dcm", "summary.pdf", "summary.png"} <= set(written)
    for name, path in written.items():
        if name.endswith(".dcm"):
            assert dciodvfy_errors(path) == [], name
    groups = groups_from_dsrdump(dsrdump(written["sr.dcm"]))
    assert groups[0]["verdict"] == VERDICT_MEANING[document["verdict"]]
    assert [g["finding"] for g in groups if "severity" in g] == [f["code"] for f in document["findings"]]
    sr = pydicom.dcmread(written["sr.dcm"])
    plan = pydicom.dcmread(folder / "RP.dcm", stop_before_pixels=True)
    assert sr.StudyInstanceUID == plan.StudyInstanceUID
