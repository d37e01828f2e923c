"""The README's first command ends in `rtqa demo`: it must run end to end on a machine without public data."""

from __future__ import annotations

import os
import re
import subprocess

import pydicom

from conftest import REPO, rtqa_command


def test_demo_sends_a_synthetic_plan_study_and_shows_the_returned_sr(tmp_path):
    env = {**os.environ, "RTQA_TEST_DATA": str(tmp_path / "no-public-data-here")}
    result = subprocess.run([*rtqa_command(), "demo", "--data-dir", str(tmp_path / "demo")], capture_output=True,
                            text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "83 of 83 objects acknowledged" in result.stdout
    assert "result received by the TPS" in result.stdout
    assert "Comprehensive 3D SR Document" in result.stdout  # dsrdump read the SR
    received = {str(ds.Modality): ds for ds in map(pydicom.dcmread, (tmp_path / "demo" / "tps").iterdir())}
    # the TPS's default outputs: the SR and the risk map as RT Dose (the synthetic plan limits SpinalCord)
    assert sorted(received) == ["RTDOSE", "SR"]
    sr, risk_map = received["SR"], received["RTDOSE"]
    assert sr.SOPClassUID in ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34")
    assert sr.PatientName == "SYNTH^HN001" and risk_map.PatientName == "SYNTH^HN001"
    assert risk_map.DoseUnits == "RELATIVE" and "NOT DOSE" in risk_map.DoseComment
    # the shipped model ran in the node's worker: its predictions are in the SR, its attention is the risk map
    shown = dict(re.findall(r"^   (\w+) +probability ([0-9.]+)$", result.stdout, flags=re.M))
    assert set(shown) == {"qa_major", "xerostomia_severe", "dysphagia_severe", "local_control"}, result.stdout
    assert all(0.0 <= float(p) <= 1.0 for p in shown.values())
    assert "attention of fused" in risk_map.ImageComments
