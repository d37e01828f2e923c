"""DVHs and plan-study loading on the vendor chains of ../shared/data/rt, the CLI, and DVH properties."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from rtqa_node.errors import InputError
from rtqa_node.rt.dvh import structure_dvh, _cumulative, _Samples
from rtqa_node.rt.dvh_report import compute_study_dvhs
from rtqa_node.rt.geometry import EndCap, Interpolation, RasterSettings, rasterise_plane, Lattice, voxelise
from rtqa_node.rt.plan_study import (Contour, DoseGrid, GridGeometry, Structure, dicom_files, load_folder,
                                     load_plan_study, plan_dose)


@pytest.fixture(scope="module")
def breast(rt_data):
    return load_folder(rt_data / "eclipse-breast-boost-dicompyler")


def test_breast_plan_is_parsed(breast):
    plan = breast.plan
    assert plan.target_prescription_dose_gy == 14.0 and plan.number_of_fractions == 7
    assert plan.approval_status == "UNAPPROVED" and plan.radiation_types == ("PHOTON",)
    assert [b.beam_dose_gy for b in plan.beams] == [0.5] * 4
    dose = breast.doses[0]
    assert dose.summation_type == "PLAN" and dose.dose.shape == (98, 129, 194)
    assert abs(dose.max_gy - 14.68) < 0.01


def test_every_structure_gets_a_dvh_and_volumes_agree_with_eclipse(breast):
    dose = breast.doses[0]
    vendor = {v.referenced_roi_number: v for v in dose.dvh_sequence}
    assert len(vendor) == 9
    results = {r.metrics.roi_number: r for r in
               compute_study_dvhs(breast, RasterSettings(end_cap=EndCap.NONE))[0].structures}
    with_contours = {s.roi_number for s in breast.structure_set.structures if s.has_volume}
    assert set(results) == with_contours and len(results) == 9  # Areola has no contours
    for number, r in results.items():
        tps_cc = vendor[number].volume[0]
        planes = len(breast.structure_set.by_number(number).planes())
        rel = abs(r.metrics.volume_cc / tps_cc - 1)
        if number == 1:
            # BODY: 5.6 % above Eclipse's DVH volume. Not geometry: our volume is the polygons' own (trapezoidal
            # sum of the contour areas 14736 cc vs 14731 cc), the nested contours are < 0.1 % of it (XOR or union
            # makes no difference), no BODY point lies outside the dose grid of this chain. The whole excess sits
            # in the volume receiving < 0.1 Gy: at every dose level from 0.5 Gy to 14 Gy the two DVHs agree within 4 cc
            # (test_body_dvh_agrees_with_eclipse_above_the_low_dose_tail), so Eclipse leaves out part of the
            # (nearly) unirradiated BODY, e.g. outside its dose calculation volume, which the RTDOSE does not show.
            assert rel < 0.06
        elif planes >= 10:  # Eclipse does not cap the ends (Nelms' ReadMe): EndCap.NONE, within 1.5 %
            assert rel < 0.015, (r.metrics.structure, r.metrics.volume_cc, tps_cc)
        elif r.metrics.structure == "Scar":
            # 6 planes of a thin band displaced by more than its width from plane to plane. SMOOTH keeps the
            # cross-section area between planes (0.515 cc; the slab stack 0.493 cc); Eclipse's 0.343 cc is what
            # plain distance interpolation gives (LINEAR 0.319 cc, checked below), whose cross-section collapses
            # where two planes' shapes do not overlap. Until SMOOTH solved its iso-level exactly (Newton steps
            # on the area) it fell 9 % short of its own area target here and met the 0.4 below by that error.
            assert 0.45 < rel < 0.55, (r.metrics.structure, r.metrics.volume_cc, tps_cc)
            scar = breast.structure_set.by_number(number)
            linear = structure_dvh(scar, dose, RasterSettings(end_cap=EndCap.NONE,
                                                              interpolation=Interpolation.LINEAR))
            assert abs(linear.metrics.volume_cc / tps_cc - 1) < 0.08
        else:  # 2-4 contour planes: shape interpolation conventions dominate
            assert rel < 0.4, (r.metrics.structure, r.metrics.volume_cc, tps_cc)


def test_dvh_agrees_with_eclipse_dvh_sequence_curves(breast):
    """Vendor reference: the curve (bins of 0.01 Gy, in Gy). Not DVHMinimum/Maximum/MeanDose: those are % of Rx."""
    dose = breast.doses[0]
    results = {r.metrics.roi_number: r for r in
               compute_study_dvhs(breast, RasterSettings(end_cap=EndCap.NONE))[0].structures}
    for v in dose.dvh_sequence:
        assert v.dose_units == "GY" and v.dvh_type == "CUMULATIVE"
        ours = results[v.referenced_roi_number].dvh
        edges = v.bin_edges_gy[:-1]
        vendor_cc = v.volume
        ours_cc = np.interp(edges, ours.dose_gy, ours.volume_cc)
        if len(breast.structure_set.by_number(v.referenced_roi_number).planes()) >= 10:
            # in absolute volume (BODY totals differ, see above): the dose to the vendor's hottest 50 % and 2 %
            # within 2 % of the vendor's (or 0.1 Gy in the low-dose tail)
            for pct in (50, 2):
                target_cc = vendor_cc[0] * pct / 100
                vendor_d = float(np.interp(-target_cc, -vendor_cc, edges))
                ours_d = ours.dose_at_volume_cc(target_cc)
                assert abs(ours_d - vendor_d) <= max(0.02 * vendor_d, 0.1), (v.referenced_roi_number, pct)
            assert np.max(np.abs(ours_cc - vendor_cc)) / vendor_cc[0] < 0.12
        # the DVH max is the grid max for BODY, and the % summary trap: DVHMaximumDose is 104.86 (% of 14 Gy)
    body = results[1].metrics
    assert abs(body.max_gy - dose.max_gy) < 0.01


def test_body_dvh_agrees_with_eclipse_above_the_low_dose_tail(breast):
    """The BODY volume differs from Eclipse's only below 0.1 Gy (see the volume test): V(D) in cc agrees within
    0.5 % of V(D), or 4 cc, at every 0.1 Gy step from 0.5 Gy to the prescription (14 Gy); that is 0.03 % of
    the BODY, against the 787 cc (5.6 %) by which the totals differ."""
    dose = breast.doses[0]
    vendor = next(v for v in dose.dvh_sequence if v.referenced_roi_number == 1)
    body = compute_study_dvhs(breast, RasterSettings(end_cap=EndCap.NONE))[0].structures[0]
    assert body.metrics.roi_number == 1
    edges = vendor.bin_edges_gy[:-1]
    for d_gy in np.arange(0.5, 14.05, 0.1):
        vendor_cc = float(np.interp(d_gy, edges, vendor.volume))
        ours_cc = body.dvh.volume_at_dose_cc(float(d_gy))
        assert abs(ours_cc - vendor_cc) <= max(0.005 * vendor_cc, 4.0), (round(float(d_gy), 1), ours_cc, vendor_cc)


def test_full_ct_chain_loads_jpeg2000_ct(rt_data):
    study = load_folder(rt_data / "eclipse-breast-boost-fullct-weasis")
    assert study.ct.geometry.shape == (98, 512, 512)
    hu = study.ct.hu
    assert hu.dtype == np.float32 and -1100 < hu.min() < -900 and hu.max() > 1000
    z = study.ct.geometry.z_positions_mm
    assert abs(z[0] + 122.4407) < 1e-3 and np.allclose(np.diff(z), 3.0)


def test_beam_doses_sum_to_plan_dose_and_effective_is_gy_rbe(rt_data):
    study = load_folder(rt_data / "raystation-proton-ramp-aptg")
    plan = [d for d in study.doses if d.summation_type == "PLAN"][0]
    beams = [d for d in study.doses if d.summation_type == "BEAM"]
    assert len(beams) == 2 and sorted(b.referenced_beam_numbers for b in beams) == [(1,), (2,)]
    assert float(np.abs(beams[0].dose + beams[1].dose - plan.dose).max()) < 1e-4
    assert plan_dose(study) is plan  # the PLAN sum is used once, beams are not added to it
    assert plan.unit_label == "Gy(RBE)"
    assert study.plan.is_ion_plan and study.plan.radiation_types == ("PROTON",)
    only_beams = load_folder(rt_data / "raystation-proton-beamdose-aptg")
    composed = plan_dose(only_beams)
    assert composed.summation_type == "PLAN" and np.array_equal(composed.dose, only_beams.doses[0].dose)
    ptv = study.structure_set.by_name("Cube101010")
    m = structure_dvh(ptv, plan).metrics
    assert m.unit == "Gy(RBE)" and 0 < m.mean_gy < 2.3


def _pydicom_rt_files_but_truncated(rt_data):
    folder = rt_data / "pydicom-rt-testfiles"
    return [p for p in dicom_files(folder) if p.name != "rtplan_truncated.dcm"]


def test_truncated_part10_file_is_refused_with_the_tag_and_offset(rt_data):
    """pydicom reads rtplan_truncated.dcm (cut inside the control points) without complaint; the loader runs the
    store's structural check and refuses it, naming the file and the element; alone or within its folder."""
    truncated = rt_data / "pydicom-rt-testfiles" / "rtplan_truncated.dcm"
    with pytest.raises(InputError, match=r"rtplan_truncated\.dcm: malformed DICOM file: truncated: \(300A,"):
        load_plan_study([truncated])
    with pytest.raises(InputError, match="rtplan_truncated.dcm: malformed"):
        load_folder(rt_data / "pydicom-rt-testfiles")
    # the intact plan and an unused malformed object (a Spatial Registration without a transfer syntax) still load
    study = load_plan_study([rt_data / "pydicom-rt-testfiles" / "rtplan.dcm",
                             rt_data / "reg-malformed-onkodicom" / "spatial_reg.dcm"])
    assert study.plan.beams and [p.name for p, _ in study.skipped_files] == ["spatial_reg.dcm"]


def test_relative_dose_is_refused_for_gy_metrics(rt_data):
    study = load_plan_study(_pydicom_rt_files_but_truncated(rt_data))
    assert {d.dose_units for d in study.doses} == {"RELATIVE"}
    # four files share one SOP Instance UID; all decode to the same values, the 1-frame file to its one frame
    full = [d for d in study.doses if d.dose.shape[0] == 15]
    assert len(full) == 3 and all(np.array_equal(full[0].dose, d.dose) for d in full)
    with pytest.raises(InputError, match="RELATIVE"):
        compute_study_dvhs(study)


def test_nelms_32bit_unsigned_dose_is_read_without_overflow(rt_data):
    study = load_folder(rt_data / "dvh-analytic" / "dose" / "Linear_AntPost_3mm_Aligned.dcm")
    d = study.doses[0]
    assert d.dose.min() >= 0 and abs(d.max_gy - 40.0) < 1e-3


def test_cli_dvh_json_contract_and_exit_codes(rt_data, tmp_path):
    png = tmp_path / "dvh.png"
    run = subprocess.run([sys.executable, "-m", "rtqa_node", "dvh", str(rt_data / "eclipse-breast-boost-dicompyler"),
                          "--json", "--png", str(png)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    keys = {"structure", "volume_cc", "min_gy", "mean_gy", "max_gy", "d99_gy", "d98_gy", "d95_gy", "d50_gy",
            "d5_gy", "d2_gy", "d1_gy", "d0_03cc_gy", "dvh"}
    assert len(doc) == 9 and all(set(r) == keys for r in doc)
    assert len(doc[0]["dvh"]["dose_gy"]) == len(doc[0]["dvh"]["volume_pct"]) > 100
    assert png.stat().st_size > 10_000
    assert "boost" not in run.stderr.lower()  # no patient name in the logs
    several = subprocess.run([sys.executable, "-m", "rtqa_node", "dvh", str(rt_data / "raystation-proton-ramp-aptg"),
                              "--json"], capture_output=True, text=True, timeout=120)
    assert several.returncode == 0, several.stderr
    doc = json.loads(several.stdout)
    assert len(doc) == 3 and {d["dose"]["summation_type"] for d in doc} == {"PLAN", "BEAM"}
    assert all(set(d["dose"]) == {"sop_instance_uid", "file", "summation_type"} for d in doc)
    relative = tmp_path / "relative"
    relative.mkdir()
    for p in _pydicom_rt_files_but_truncated(rt_data):
        shutil.copy(p, relative / p.name)
    bad = subprocess.run([sys.executable, "-m", "rtqa_node", "dvh", str(relative), "--json"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == "" and "RELATIVE" in bad.stderr
    truncated = subprocess.run([sys.executable, "-m", "rtqa_node", "dvh", str(rt_data / "pydicom-rt-testfiles")],
                               check=False, capture_output=True, text=True, timeout=60)
    assert truncated.returncode == 2 and truncated.stdout == ""
    assert "rtplan_truncated.dcm: malformed" in truncated.stderr
    missing = subprocess.run([sys.executable, "-m", "rtqa_node", "dvh", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# -- geometry on synthetic shapes --------------------------------------------------------------------------------


def _square(cx, cy, half):
    return np.array([[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half], [cx - half, cy + half]])


def _structure(planes: dict[float, list[np.ndarray]]) -> Structure:
    contours = tuple(Contour(np.column_stack([p, np.full(len(p), z)]), "CLOSED_PLANAR")
                     for z, ps in planes.items() for p in ps)
    return Structure(1, "box", "ORGAN", None, contours)


def _uniform_dose(value_gy: float, origin=(-50.0, -50.0, -50.0), n=41, spacing=2.5) -> DoseGrid:
    geom = GridGeometry(origin, (1, 0, 0), (0, 1, 0), (spacing, spacing, spacing), (n, n, n),
                        tuple(np.arange(n) * spacing))
    return DoseGrid("1.2.3", __import__("pathlib").Path("synthetic"), None, "PLAN", "PHYSICAL", "GY", geom,
                    np.full((n, n, n), value_gy, np.float32))


def test_even_odd_hole_and_exact_partial_coverage():
    lattice = Lattice(-10.0, -10.0, 1.0, 21, 21)
    outer, hole = _square(0.3, 0.0, 6.0), _square(0.3, 0.0, 2.0)
    cov = rasterise_plane([outer, hole], lattice, row_samples=4)
    assert abs(cov.sum() - (12 * 12 - 4 * 4)) < 1e-6  # XOR: the inner contour is a hole, area exact
    assert cov[10, 10] == 0.0 and cov[10, 6] == 1.0
    assert abs(cov[10, 4] - 0.2) < 1e-6  # the edge x = -5.7 leaves 0.2 mm of pixel [-6.5, -5.5] inside
    assert abs(cov[4, 6] - 0.5) < 1e-6  # the edge y = -6 halves row 4 (centre y = -6)


def test_end_cap_convention_is_configurable():
    planes = {z: [_square(0, 0, 5)] for z in (0.0, 2.0, 4.0)}
    s = _structure(planes)
    half = voxelise(s, None, RasterSettings(end_cap=EndCap.HALF_SLICE)).volume_cc
    none = voxelise(s, None, RasterSettings(end_cap=EndCap.NONE)).volume_cc
    assert abs(half - 0.1 * 6) < 1e-3 and abs(none - 0.1 * 4) < 1e-3  # 100 mm^2 x 6 mm / 4 mm


def test_structure_partly_outside_dose_grid_is_clipped_not_failed():
    s = _structure({z: [_square(48.0, 0, 6)] for z in (0.0, 2.0, 4.0)})  # grid spans x up to 51.25 mm
    r = structure_dvh(s, _uniform_dose(2.0))
    assert r.metrics.volume_outside_dose_cc > 0 and abs(r.metrics.mean_gy - 2.0) < 1e-6
    inside_cc = r.metrics.volume_cc - r.metrics.volume_outside_dose_cc
    assert abs(r.dvh.total_cc - inside_cc) < 1e-6 and abs(inside_cc / r.metrics.volume_cc - 9.25 / 12) < 0.01


@hsettings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 80), st.floats(0.001, 5), st.floats(0, 3)), min_size=1, max_size=200))
def test_cumulative_dvh_is_monotone_non_increasing(samples):
    d, w, s = (np.array(v, dtype=np.float64) for v in zip(*samples))
    dvh = _cumulative(_Samples(d, w, s, np.ones(len(d), bool), 0.0), None)
    assert np.all(np.diff(dvh.volume_cc) <= 1e-12)
    assert abs(dvh.volume_cc[0] - w.sum() / 1000) < 1e-9 * max(1, w.sum())
    assert dvh.volume_cc[-1] <= 1e-9 * w.sum()
    mean = float(np.dot(d, w) / w.sum())
    centres, vol = dvh.differential()
    # each sample is spread over its dose interval (clipped at 0 Gy): the mean moves by at most half a spread
    assert abs(float(np.dot(centres, vol) / vol.sum()) - mean) < 0.05 + 0.01 * mean + s.max() / 2


def test_an_unchanged_study_is_read_once_and_a_changed_file_is_read_again(rt_data, tmp_path):
    import os

    folder = tmp_path / "study"
    shutil.copytree(rt_data / "eclipse-breast-boost-dicompyler", folder)
    files = dicom_files(folder)
    first = load_plan_study(files)
    assert load_plan_study(list(reversed(files))) is first  # same files, any order: the kept study
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = load_plan_study(files)
    assert again is not first
    assert [s.name for s in again.structure_set.structures] == [s.name for s in first.structure_set.structures]
    files[-1].unlink()  # a missing file is reported as before (skipped as unreadable), not hidden by the cache
    partial = load_plan_study(files)
    assert partial is not again and any(p == files[-1] for p, _ in partial.skipped_files)
    from rtqa_node.rt.plan_study import forget_loaded

    forget_loaded()  # what the worker does after each job
    assert load_plan_study(files) is not partial
