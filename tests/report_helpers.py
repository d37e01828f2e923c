"""Shared by the report tests: a synthetic plan study made once per session, reviews built by hand (the checks
and models that produce them live in other modules), and the DICOM validators."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from rtqa_node.review import ConstraintResult, Finding, Prediction, Review, Severity


def synth_plan_study(out: Path) -> Path:
    """One synthetic head-and-neck patient (CT 40 slices, RTSTRUCT, RTPLAN, RTDOSE); returns its folder."""
    from rtqa_node.synth.cohort import CohortConfig, generate_cohort

    generate_cohort(out, CohortConfig(patients=1, seed=8, slices=40))
    (plan,) = out.glob("*/RP*.dcm")  # HN001/RP.dcm
    return plan.parent


def hn_review() -> Review:
    """A major deviation on the synthetic head-and-neck plan: limits tight enough that the cord and the left
    parotid carry dose above them (so the risk map is not empty)."""
    return Review(
        findings=(
            Finding("protocol.oar_constraint", Severity.MAJOR,
                    "SpinalCord D0.03cc above the minor-deviation limit of 35 Gy", {"d0_03cc_gy": 38.2,
                                                                                 "threshold_gy": 35.0},
                    structure="SpinalCord"),
            Finding("protocol.fractionation", Severity.MINOR, "34 fractions planned; protocol 35 (33-34 minor)",
                    {"fractions": 34}),
            Finding("integrity.approval_status", Severity.INFO, "Plan approval status is APPROVED"),
        ),
        protocol="TEST-HN-70-56",
        constraints=(
            ConstraintResult("oar_cord_max", "SpinalCord", "D0.03cc", 38.2, "Gy", "<= 30 Gy", "<= 35 Gy",
                             Severity.MAJOR, "test limit"),
            ConstraintResult("oar_parotid_l_mean", "Parotid_L", "Dmean", 27.5, "Gy", "<= 26 Gy", "<= 30 Gy",
                             Severity.MINOR, "QUANTEC (test)"),
            ConstraintResult("ptv70_d95", "PTV_70", "D95%", 68.9, "Gy", ">= 68.6 Gy", ">= 66.5 Gy", None, "test"),
            ConstraintResult("larynx_mean", "Larynx", "Dmean", None, "Gy", "<= 44 Gy", None,
                             Severity.NOT_EVALUABLE, "test"),
        ),
        predictions=(
            Prediction("qa_major", 0.81, "mil-att-tabular", "0.3.1", (("SpinalCord D0.03cc", 0.52),
                                                                     ("Parotid_L Dmean", 0.21))),
            Prediction("xerostomia_severe", 0.34, "mil-att-fused", "0.3.1", (("Parotid_L", 0.61),)),
        ),
        algorithm_version="checks-test-1",
    )


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines; a non-zero exit (1 for an unreadable file, 134 when it aborts) is an error too."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    if result.returncode != 0:
        errors.append(f"dciodvfy exited with {result.returncode}")
    return errors


def dsrdump(path: Path) -> str:
    result = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True, check=True)
    return result.stdout


def groups_from_dsrdump(text: str) -> list[dict]:
    """Each TID 1501 measurement group as dsrdump prints it: its Finding code, Severity, Comment, verdict."""
    groups: list[dict] = []
    for line in text.splitlines():
        if '"Measurement Group")' in line:
            groups.append({})
        elif groups:
            for key, pattern in (("finding", r'CODE:\(,,"Finding"\)=\(([^,]+),99RTQA'),
                                 ("severity", r'CODE:\(,,"Severity"\)=\([^,]+,[^,]+,"([^"]+)"\)'),
                                 ("comment", r'TEXT:\(,,"Comment"\)="(.*)">$'),
                                 ("verdict", r'CODE:\(,,"Plan review verdict"\)=\([^,]+,[^,]+,"([^"]+)"\)')):
                match = re.search(pattern, line)
                if match and key not in groups[-1]:
                    groups[-1][key] = match.group(1)
    return groups
