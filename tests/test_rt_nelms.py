"""The Nelms et al. 2015 analytic DVH suite: every usable row of dvh-analytic/reference.csv against analytic truth.

Paper's criterion: within 3 % of the analytic value (dose metrics relative to the local analytic dose). Bounds
asserted here are that, or the tighter bound this engine achieves (measured, with margin). The error table is
printed (run pytest with -s) and written to the test report via record_property.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from rtqa_node.rt.dvh import structure_dvh
from rtqa_node.rt.geometry import EndCap, RasterSettings
from rtqa_node.rt.plan_study import read_dose, read_structure_set

METRICS = [  # (reference column, DvhMetrics attribute)
    ("volume_cc", "volume_cc"), ("dmin_gy", "min_gy"), ("dmax_gy", "max_gy"), ("dmean_gy", "mean_gy"),
    ("d99_gy", "d99_gy"), ("d95_gy", "d95_gy"), ("d5_gy", "d5_gy"), ("d1_gy", "d1_gy"),
    ("d0_03cc_gy", "d0_03cc_gy"),
]
PAPER_TOLERANCE_PCT = 3.0
# Tighter bounds achieved (measured maximum |error| in %, plus margin), per test group and metric.
# Test 1: 0.2 mm contours (end caps and interpolation hardly matter) with 1/2/3 mm dose grids.
TEST1_BOUND_PCT = {"volume_cc": 0.6, "dmin_gy": 0.05, "dmax_gy": 0.05, "dmean_gy": 0.15, "d99_gy": 1.0,
                   "d95_gy": 1.0, "d5_gy": 0.15, "d1_gy": 0.15, "d0_03cc_gy": 0.15}
# Test 2, 1 mm contours: everything well inside the paper's 3 %.
TEST2_1MM_BOUND_PCT = {"volume_cc": 0.5, "dmin_gy": 0.05, "dmax_gy": 0.05, "dmean_gy": 0.8, "d99_gy": 1.0,
                       "d95_gy": 1.0, "d5_gy": 0.6, "d1_gy": 1.0, "d0_03cc_gy": 0.8}
# Test 2, 2-3 mm contours: the paper's 3 % for every row and metric. The last to get there was RtCone (a cone
# lying across the planes, apex at y = +6 mm on the plane z = 6 mm through its axis) at 3 mm, AP gradient, D99:
# its coldest 1 % is the 36 mm^3 tip (y > 0.8 mm) around that one plane, which the planes 3 mm either side do not
# reach. Plain distance interpolation retreated that tip too early (+4.7 %); the peak-plane tangent (the plane
# through the axis is the widest and contains both neighbours, so the contour leaves it with zero speed in z and
# the distance blend is quadratic in z away from it; RasterSettings.peak_tangent) gives -0.02 % (D95 +1.5 ->
# +0.2 %, Dmean +0.18 -> +0.01 %; 2 mm D99 +2.3 -> +0.5 %; test_rtcone_tip_needs_the_peak_plane_tangent).


@pytest.fixture(scope="module")
def nelms_results(rt_data):
    root = rt_data / "dvh-analytic"
    rows = [r for r in csv.DictReader(open(root / "reference.csv")) if r["files_present"] == "yes"]
    doses, structure_sets, out = {}, {}, []
    for r in rows:
        if r["rtdose"] not in doses:
            doses[r["rtdose"]] = read_dose(pydicom.dcmread(root / r["rtdose"]), Path(r["rtdose"]))
        if r["rtstruct"] not in structure_sets:
            structure_sets[r["rtstruct"]] = read_structure_set(pydicom.dcmread(root / r["rtstruct"]),
                                                               Path(r["rtstruct"]))
        structure = structure_sets[r["rtstruct"]].by_number(int(r["roi_number"]))
        metrics = structure_dvh(structure, doses[r["rtdose"]], RasterSettings(end_cap=EndCap.HALF_SLICE)).metrics
        errors = {ref: (getattr(metrics, attr) / float(r[ref]) - 1.0) * 100.0 for ref, attr in METRICS}
        out.append((r, errors))
    return out


def _table(results) -> str:
    head = f"{'case':<34}" + "".join(f"{ref.replace('_gy', '').replace('_cc', ''):>9}" for ref, _ in METRICS)
    lines = [head]
    for r, e in results:
        lines.append(f"{r['case_id']:<34}" + "".join(f"{e[ref]:>9.3f}" for ref, _ in METRICS))
    errs = np.abs(np.array([[e[ref] for ref, _ in METRICS] for _, e in results]))
    lines.append(f"{'mean |error| %':<34}" + "".join(f"{v:>9.3f}" for v in errs.mean(axis=0)))
    lines.append(f"{'max |error| %':<34}" + "".join(f"{v:>9.3f}" for v in errs.max(axis=0)))
    return "\n".join(lines)


def test_nelms_suite_has_all_80_usable_rows(nelms_results):
    assert len(nelms_results) == 80


def test_nelms_every_row_within_paper_tolerance_or_tighter(nelms_results, record_property):
    table = _table(nelms_results)
    print("\nNelms analytic DVH suite, signed error in % of the analytic value:\n" + table)
    record_property("nelms_error_table", table)
    failures = []
    for r, errors in nelms_results:
        spacing = float(r["contour_spacing_mm"])
        for ref, _ in METRICS:
            if r["test"] == "1":
                bound = TEST1_BOUND_PCT[ref]
            elif spacing <= 1.0:
                bound = TEST2_1MM_BOUND_PCT[ref]
            else:
                bound = PAPER_TOLERANCE_PCT
            if abs(errors[ref]) > bound:
                failures.append(f"{r['case_id']} {ref}: {errors[ref]:+.3f} % (bound {bound} %)")
    assert not failures, "\n".join(failures)


def test_nelms_overall_mean_error_is_small(nelms_results):
    errs = np.abs(np.array([[e[ref] for ref, _ in METRICS] for _, e in nelms_results]))
    mean = dict(zip([ref for ref, _ in METRICS], errs.mean(axis=0)))
    assert mean["volume_cc"] < 0.15 and mean["dmean_gy"] < 0.03
    assert mean["dmin_gy"] < 0.05 and mean["dmax_gy"] < 0.05
    assert max(mean["d99_gy"], mean["d95_gy"]) < 0.4
    assert max(mean["d5_gy"], mean["d1_gy"], mean["d0_03cc_gy"]) < 0.1
    # all 720 (row, metric) values meet the paper's 3 % criterion
    assert (errs <= PAPER_TOLERANCE_PCT).all()


def test_rtcone_tip_needs_the_peak_plane_tangent(rt_data):
    """RtCone 3 mm, AP gradient, D99 (analytic 9.17 Gy): within 3 % with the peak-plane tangent (default),
    +4.7 % with plain linear distance blending between the plane through the cone's axis and its neighbours."""
    root = rt_data / "dvh-analytic"
    dose = read_dose(pydicom.dcmread(root / "dose/Linear_AntPost_3mm_Aligned.dcm"), Path("ap3"))
    structure = read_structure_set(pydicom.dcmread(root / "structures/3mm/RtCone_30_0.dcm"),
                                   Path("rtcone30")).by_number(2)
    errors = {}
    for peak in (True, False):
        settings = RasterSettings(end_cap=EndCap.HALF_SLICE, peak_tangent=peak)
        errors[peak] = (structure_dvh(structure, dose, settings).metrics.d99_gy / 9.17 - 1.0) * 100.0
    assert abs(errors[True]) < 0.5 and errors[False] > 4.0, errors
