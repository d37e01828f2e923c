"""Generate a synthetic cohort: per patient a complete plan study (CT series, RTSTRUCT, RTPLAN, RTDOSE) in
its own folder, plus a manifest with the ground truth (planted and realised protocol deviations, organ doses,
outcomes, reviewer labels) and a flat CSV of it.

Everything is a pure function of (seed, generator version, slices, sites, deviation rate, patient index):
the same arguments give the same UIDs and the same bytes, and patient i is the same whatever the cohort size.
Random streams are separate per purpose (anatomy, CT noise, plan, dose, outcomes, raters), so a change in one
part of the generator does not reshuffle the others.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rtqa_node.errors import InputError
from rtqa_node.synth import protocol
from rtqa_node.synth.anatomy import Phantom, make_phantom
from rtqa_node.synth.ct import ct_numbers, ct_series
from rtqa_node.synth.dcm import StudyContext, synth_uid, write
from rtqa_node.synth.dose import DoseIntent, compute_dose, dose_dataset, percentile_dose, quantise
from rtqa_node.synth.grid import Grid
from rtqa_node.synth.outcomes import draw_outcomes, reviewer_labels
from rtqa_node.synth.plan import PlanSpec, plan_dataset
from rtqa_node.synth.rtstruct import structure_set
from rtqa_node.synth.sites import SiteProfile, make_site

log = logging.getLogger(__name__)

GENERATOR = "rtqa synth"
GENERATOR_VERSION = "1"
MANIFEST_NAME = "manifest.json"
CSV_NAME = "ground_truth.csv"
REPORT_NAME = "report.md"
CT_COLUMNS = 256
SLICE_SPACING_MM = 3.0
DOSE_GRID_FACTOR = 2
MIN_SLICES, MAX_SLICES = 30, 400

# rng stream ids (first two entropy words are the seed and the stream)
_CONTEXT, _ANATOMY, _CT_NOISE, _PLAN, _DOSE, _OUTCOMES, _RATERS = range(1, 8)
_PATIENT_FOLDER = re.compile(r"HN[0-9]{3,4}")
DEVIATION_CODES = ("fractionation", "ptv70_underdose", "cord_overdose")


@dataclass(frozen=True, slots=True)
class CohortConfig:
    patients: int
    sites: int = 1
    seed: int = 0
    slices: int = 80
    deviation_rate: float = 0.3  # mean chance that a plan carries a planted deviation (sites vary around it)

    def __post_init__(self) -> None:
        if self.patients < 1 or self.patients > 9999:
            raise InputError(f"--patients must be between 1 and 9999, got {self.patients}")
        if self.sites < 1 or self.sites > self.patients:
            raise InputError(f"--sites must be between 1 and --patients ({self.patients}), got {self.sites}")
        if self.seed < 0:
            raise InputError(f"--seed must be >= 0, got {self.seed}")
        if not MIN_SLICES <= self.slices <= MAX_SLICES:
            raise InputError(f"--slices must be between {MIN_SLICES} and {MAX_SLICES}, got {self.slices}")
        if not 0.0 <= self.deviation_rate <= 1.0:
            raise InputError(f"--deviation-rate must be in [0, 1], got {self.deviation_rate}")

    def uid_key(self, index: int) -> str:
        return (f"v{GENERATOR_VERSION}/seed{self.seed}/sites{self.sites}/slices{self.slices}/"
                f"dev{self.deviation_rate:g}/p{index}")

    def site_profiles(self) -> list[SiteProfile]:
        return [make_site(self.seed, k, deviation_rate=self.deviation_rate) for k in range(self.sites)]


@dataclass(frozen=True)
class SyntheticPatient:
    """One simulated patient before anything is written: geometry, dose and ground truth."""

    index: int
    folder: str
    site: SiteProfile
    context: StudyContext
    phantom: Phantom
    ct_grid: Grid
    dose_grid: Grid
    dose_pixels: np.ndarray  # uint16 (slices, rows, columns) on dose_grid
    dose_grid_scaling_gy: float
    dose_gy: np.ndarray  # dose_pixels * scaling, float32
    plan: PlanSpec
    target_points_mm: np.ndarray  # (N, 3) dose-grid points inside PTV_70 or PTV_56
    structure_points: dict[str, np.ndarray]  # TG-263 name -> bool mask on dose_grid
    truth: dict  # JSON-ready ground truth


def _rng(config: CohortConfig, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, stream, index])


def _context(config: CohortConfig, index: int, site: SiteProfile) -> StudyContext:
    rng = _rng(config, _CONTEXT, index)
    key = config.uid_key(index)
    day = np.datetime64("2024-01-01") + int(rng.integers(0, 365))
    seconds = int(rng.integers(7 * 3600, 18 * 3600))
    return StudyContext(
        patient_name=f"SYNTH^HN{index + 1:03d}",
        patient_id=f"SYN{config.seed}-HN{index + 1:03d}",
        patient_birth_date=f"{int(rng.integers(1940, 1976))}0101",
        patient_sex="M" if rng.random() < 0.75 else "F",  # H&N cancer is about 3:1 male
        study_instance_uid=synth_uid(key, "study"),
        study_id=f"S{index + 1:04d}",
        accession_number=f"SYN{config.seed % 10**6:06d}{index + 1:04d}",
        study_date=str(day).replace("-", ""),
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        frame_of_reference_uid=synth_uid(key, "frame-of-reference"),
        institution_name=f"Synthetic {site.site_id}",
        station_name=f"SYNTPS{site.site_index + 1}",
    )


def _ct_grid(config: CohortConfig, site: SiteProfile) -> Grid:
    ps = site.pixel_spacing_mm
    return Grid(
        columns=CT_COLUMNS, rows=CT_COLUMNS, slices=config.slices, pixel_spacing_mm=ps,
        slice_spacing_mm=SLICE_SPACING_MM,
        origin_mm=(round(-(CT_COLUMNS - 1) / 2 * ps, 3), round(-(CT_COLUMNS - 1) / 2 * ps + 10.0, 3),
                   round(-(config.slices - 1) / 2 * SLICE_SPACING_MM, 3)),
    )


def _plant(rng: np.random.Generator, site: SiteProfile) -> list[dict]:
    if rng.random() >= site.deviation_rate:
        return []
    count = 2 if rng.random() < 0.2 else 1
    codes = rng.choice(len(DEVIATION_CODES), size=count, replace=False)
    return [{"code": DEVIATION_CODES[int(c)], "severity": "major" if rng.random() < 0.4 else "minor"}
            for c in sorted(codes)]


def _intent(rng: np.random.Generator, planted: list[dict], site: SiteProfile, tumour_side: str) -> tuple[DoseIntent, int]:
    by_code = {p["code"]: p["severity"] for p in planted}
    fractions = protocol.FRACTIONS
    if "fractionation" in by_code:
        fractions = int(rng.choice([33, 34])) if by_code["fractionation"] == "minor" else 30
    d95_rel = float(np.clip(rng.normal(1.0, 0.006), 0.988, 1.015))
    if "ptv70_underdose" in by_code:
        d95_rel = float(rng.uniform(0.958, 0.975) if by_code["ptv70_underdose"] == "minor" else rng.uniform(0.88, 0.935))
    cord = float(rng.uniform(34.0, 43.0))
    if "cord_overdose" in by_code:
        cord = float(rng.uniform(45.8, 47.3) if by_code["cord_overdose"] == "minor" else rng.uniform(49.5, 54.0))
    contra = float(rng.uniform(12.0, 30.0)) + site.parotid_sparing_offset_gy
    ipsi = float(rng.uniform(22.0, 44.0)) + site.parotid_sparing_offset_gy
    parotids = {"Parotid_L": ipsi, "Parotid_R": contra} if tumour_side == "L" else {"Parotid_L": contra, "Parotid_R": ipsi}
    return DoseIntent(
        ptv70_d95_gy=protocol.PTV70_RX_GY * d95_rel,
        ptv70_rx_gy=protocol.PTV70_RX_GY,
        ptv56_rx_gy=protocol.PTV56_RX_GY,
        parotid_mean_gy={k: float(np.clip(v, 5.0, 60.0)) for k, v in parotids.items()},
        cord_max_gy=cord,
        brainstem_max_gy=float(rng.uniform(36.0, 50.0)),
        constrictor_sparing=float(rng.uniform(0.0, 0.3)),
        low_dose_fraction=float(np.clip((0.45 if site.beam_count == 7 else 0.40) + rng.normal(0, 0.03), 0.3, 0.55)),
        low_dose_length_mm=float(rng.uniform(30.0, 45.0)),
    ), fractions


def _organ_metrics(dose_gy: np.ndarray, inside: np.ndarray, volume_cc: float) -> dict:
    values = dose_gy[inside]
    if values.size == 0:
        return {"volume_cc": volume_cc, "points": 0}
    return {
        "volume_cc": volume_cc,
        "points": int(values.size),
        "mean_gy": round(float(values.mean()), 3),
        "min_gy": round(float(values.min()), 3),
        "max_gy": round(float(values.max()), 3),
        "d98_gy": round(percentile_dose(values, 98.0), 3),
        "d95_gy": round(percentile_dose(values, 95.0), 3),
        "d50_gy": round(percentile_dose(values, 50.0), 3),
        "d2_gy": round(percentile_dose(values, 2.0), 3),
    }


def simulate_patient(config: CohortConfig, index: int, sites: list[SiteProfile] | None = None) -> SyntheticPatient:
    """Everything about patient ``index`` (0-based) except the CT pixels and the files."""
    sites = sites or config.site_profiles()
    site = sites[index % config.sites]
    context = _context(config, index, site)
    phantom = make_phantom(_rng(config, _ANATOMY, index), site)
    ct_grid = _ct_grid(config, site)
    dose_grid = ct_grid.coarsened(DOSE_GRID_FACTOR)

    plan_rng = _rng(config, _PLAN, index)
    planted = _plant(plan_rng, site)
    intent, fractions = _intent(plan_rng, planted, site, phantom.tumour_side)
    dose = compute_dose(phantom, dose_grid, _rng(config, _DOSE, index), intent)
    pixels, scaling = quantise(dose)
    dose_gy = pixels.astype(np.float32) * np.float32(scaling)

    masks = {name: dose_grid.mask(s.shape) for name, s in phantom.structures.items()}
    organs = {}
    for name, structure in phantom.structures.items():
        win, phi = ct_grid.sample(structure.shape, pad_voxels=0)
        volume_cc = round(int(np.count_nonzero(phi < 0)) * ct_grid.voxel_volume_cc, 3)
        organs[name] = _organ_metrics(dose_gy, masks[name], volume_cc)
    targets = masks["PTV_70"] | masks["PTV_56"]
    zz, yy, xx = np.nonzero(targets)
    target_points = np.column_stack([dose_grid.x_mm[xx], dose_grid.y_mm[yy], dose_grid.z_mm[zz]])
    isocenter = tuple(round(float(v), 1) for v in target_points.mean(axis=0))
    step = 360.0 / site.beam_count
    spec = PlanSpec(
        fractions=fractions, ptv70_rx_gy=protocol.PTV70_RX_GY, ptv56_rx_gy=protocol.PTV56_RX_GY,
        cord_limit_gy=protocol.CORD_MAX_PER_PROTOCOL_GY,
        gantry_angles_deg=tuple(round(k * step, 1) for k in range(site.beam_count)),
        modulation_factor=round(float(plan_rng.uniform(2.5, 3.5)), 3), isocenter_mm=isocenter, approved=True,
        machine_name=site.treatment_machine_name,
    )

    deviations = protocol.grade(fractions=fractions, ptv70_d95_gy=organs["PTV_70"]["d95_gy"],
                                cord_max_gy=organs["SpinalCord"]["max_gy"])
    true_verdict = protocol.verdict(deviations)
    par_l, par_r = organs["Parotid_L"], organs["Parotid_R"]
    mean_parotids = (par_l["mean_gy"] * par_l["points"] + par_r["mean_gy"] * par_r["points"]) / (
        par_l["points"] + par_r["points"])
    outcomes = draw_outcomes(
        _rng(config, _OUTCOMES, index), mean_parotids_gy=mean_parotids,
        mean_constrictor_gy=organs["Musc_Constrict"]["mean_gy"], ptv70_d95_gy=organs["PTV_70"]["d95_gy"],
        gtv_volume_cc=organs["GTV_70"]["volume_cc"],
    )
    labels = reviewer_labels(_rng(config, _RATERS, index), true_verdict, upgrade_pct=site.rater_upgrade_pct,
                             downgrade_pct=site.rater_downgrade_pct)
    key = config.uid_key(index)
    folder = f"HN{index + 1:03d}"
    truth = {
        "patient_id": context.patient_id,
        "patient_name": context.patient_name,
        "folder": folder,
        "site_id": site.site_id,
        "protocol": f"{protocol.PROTOCOL_NAME} v{protocol.PROTOCOL_VERSION}",
        "uids": {
            "study_instance_uid": context.study_instance_uid,
            "frame_of_reference_uid": context.frame_of_reference_uid,
            "ct_series_instance_uid": synth_uid(key, "ct-series"),
            "rtstruct_sop_instance_uid": synth_uid(key, "rtstruct"),
            "rtplan_sop_instance_uid": synth_uid(key, "rtplan"),
            "rtdose_sop_instance_uid": synth_uid(key, "rtdose"),
        },
        "anatomy": {"tumour_side": phantom.tumour_side, "size_factor": round(phantom.size_factor, 4),
                    "gtv_radius_mm": round(phantom.gtv_radius_mm, 2), "ptv_margin_mm": site.ptv_margin_mm,
                    "oar_contour_bias_mm": site.oar_contour_bias_mm},
        "plan": {"fractions": fractions, "ptv70_rx_gy": spec.ptv70_rx_gy, "ptv56_rx_gy": spec.ptv56_rx_gy,
                 "beams": site.beam_count, "gantry_angles_deg": list(spec.gantry_angles_deg),
                 "isocenter_mm": list(isocenter), "dose_grid_scaling_gy": scaling},
        "intent": {"ptv70_d95_gy": round(intent.ptv70_d95_gy, 3), "cord_max_gy": round(intent.cord_max_gy, 3),
                   "parotid_mean_gy": {k: round(v, 3) for k, v in intent.parotid_mean_gy.items()}},
        "planted_deviations": planted,
        "deviations": [d.as_dict() for d in deviations],
        "true_verdict": true_verdict,
        "reviewer_labels": labels,
        "mean_parotids_gy": round(mean_parotids, 3),
        "organs": organs,
        "outcomes": outcomes,
    }
    return SyntheticPatient(
        index=index, folder=folder, site=site, context=context, phantom=phantom, ct_grid=ct_grid,
        dose_grid=dose_grid, dose_pixels=pixels, dose_grid_scaling_gy=scaling, dose_gy=dose_gy, plan=spec,
        target_points_mm=target_points, structure_points=masks, truth=truth,
    )


def write_patient(config: CohortConfig, patient: SyntheticPatient, folder: Path) -> dict[str, list[str]]:
    """Write CT001.dcm..., RS.dcm, RP.dcm, RD.dcm into ``folder`` (which must exist). Returns file names."""
    key = config.uid_key(patient.index)
    hu = ct_numbers(patient.phantom, patient.ct_grid, _rng(config, _CT_NOISE, patient.index),
                    hu_offset=patient.site.hu_offset)
    ct = ct_series(hu, patient.ct_grid, patient.context, uid_key=key)
    ct_names = []
    for k, ds in enumerate(ct.datasets, start=1):
        name = f"CT{k:03d}.dcm"
        write(ds, folder / name)
        ct_names.append(name)
    ss = structure_set(patient.phantom, patient.ct_grid, ct, patient.context, uid_key=key)
    write(ss.dataset, folder / "RS.dcm")
    rp = plan_dataset(patient.plan, patient.context, uid_key=key, rtstruct_uid=ss.dataset.SOPInstanceUID,
                      roi_numbers=ss.roi_numbers, target_points_mm=patient.target_points_mm)
    write(rp, folder / "RP.dcm")
    dvh_rois = ("PTV_70", "PTV_56", "SpinalCord", "Brainstem", "Parotid_L", "Parotid_R", "Musc_Constrict", "Larynx")
    rd = dose_dataset(
        patient.dose_pixels, patient.dose_grid_scaling_gy, patient.dose_grid, patient.context, uid_key=key,
        rtplan_uid=rp.SOPInstanceUID, rtstruct_uid=ss.dataset.SOPInstanceUID,
        dvh_doses_gy={n: patient.dose_gy[patient.structure_points[n]] for n in dvh_rois},
        roi_numbers=ss.roi_numbers,
    )
    write(rd, folder / "RD.dcm")
    return {"ct": ct_names, "rtstruct": ["RS.dcm"], "rtplan": ["RP.dcm"], "rtdose": ["RD.dcm"]}


def _check_out_dir(out_dir: Path) -> list[str]:
    """Refuse a non-empty folder that is not an earlier synth output; return the earlier output's folders."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        try:
            earlier = json.loads((out_dir / MANIFEST_NAME).read_text())
        except (OSError, ValueError):
            earlier = {}
        if not isinstance(earlier, dict) or earlier.get("generator") != GENERATOR:
            raise InputError(f"--out {out_dir} is not empty and holds no {MANIFEST_NAME} of an earlier "
                             "`rtqa synth`; choose an empty or new folder")
        return [str(p.get("folder")) for p in earlier.get("patients", []) if isinstance(p, dict)]
    return []


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


CSV_COLUMNS = (
    "patient_id", "folder", "site_id", "fractions", "true_verdict", "site_reviewer", "consensus",
    "deviation_codes", "ptv70_d95_gy", "ptv56_d95_gy", "cord_max_gy", "brainstem_max_gy", "parotid_l_mean_gy",
    "parotid_r_mean_gy", "mean_parotids_gy", "constrictor_mean_gy", "larynx_mean_gy", "oral_cavity_mean_gy",
    "gtv_volume_cc", "xerostomia_p", "xerostomia", "dysphagia_p", "dysphagia", "local_control_p",
    "local_control",
)


def _csv_row(t: dict) -> dict:
    o, out = t["organs"], t["outcomes"]
    return {
        "patient_id": t["patient_id"], "folder": t["folder"], "site_id": t["site_id"],
        "fractions": t["plan"]["fractions"], "true_verdict": t["true_verdict"],
        "site_reviewer": t["reviewer_labels"]["site_reviewer"], "consensus": t["reviewer_labels"]["consensus"],
        "deviation_codes": ";".join(d["code"] for d in t["deviations"]),
        "ptv70_d95_gy": o["PTV_70"]["d95_gy"], "ptv56_d95_gy": o["PTV_56"]["d95_gy"],
        "cord_max_gy": o["SpinalCord"]["max_gy"], "brainstem_max_gy": o["Brainstem"]["max_gy"],
        "parotid_l_mean_gy": o["Parotid_L"]["mean_gy"], "parotid_r_mean_gy": o["Parotid_R"]["mean_gy"],
        "mean_parotids_gy": t["mean_parotids_gy"], "constrictor_mean_gy": o["Musc_Constrict"]["mean_gy"],
        "larynx_mean_gy": o["Larynx"].get("mean_gy", ""), "oral_cavity_mean_gy": o["Cavity_Oral"].get("mean_gy", ""),
        "gtv_volume_cc": o["GTV_70"]["volume_cc"],
        "xerostomia_p": out["xerostomia"]["probability"], "xerostomia": int(out["xerostomia"]["event"]),
        "dysphagia_p": out["dysphagia"]["probability"], "dysphagia": int(out["dysphagia"]["event"]),
        "local_control_p": out["local_control"]["probability"], "local_control": int(out["local_control"]["event"]),
    }


def _report(manifest: dict) -> str:
    rows = [_csv_row(t) for t in manifest["patients"]]
    n = len(rows)
    lines = [f"# Synthetic cohort: {n} patients, {manifest['config']['sites']} site(s), seed {manifest['config']['seed']}", ""]
    verdicts = {v: sum(r["true_verdict"] == v for r in rows) for v in protocol.SEVERITIES}
    lines.append("Protocol verdicts (truth): " + ", ".join(f"{k} {v}" for k, v in verdicts.items()))
    agree = sum(r["site_reviewer"] == r["true_verdict"] for r in rows)
    lines.append(f"Site reviewer agrees with truth: {agree}/{n}")
    for name, key, outcome in (("mean parotids", "mean_parotids_gy", "xerostomia"),
                               ("constrictor mean", "constrictor_mean_gy", "dysphagia"),
                               ("PTV_70 D95", "ptv70_d95_gy", "local_control")):
        values = np.array([float(r[key]) for r in rows])
        events = np.array([r[outcome] for r in rows])
        median = float(np.median(values))
        low, high = events[values <= median], events[values > median]
        lines.append(
            f"{outcome}: {events.mean():.0%} overall; {name} <= {median:.1f} Gy: "
            f"{low.mean() if low.size else float('nan'):.0%} of {low.size}, above: "
            f"{high.mean() if high.size else float('nan'):.0%} of {high.size}"
        )
    lines += ["", "| patient | site | verdict | reviewer | PTV_70 D95 | cord max | parotids mean | constrictor mean |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['folder']} | {r['site_id']} | {r['true_verdict']} | {r['site_reviewer']} | "
                     f"{r['ptv70_d95_gy']:.1f} | {r['cord_max_gy']:.1f} | {r['mean_parotids_gy']:.1f} | "
                     f"{r['constrictor_mean_gy']:.1f} |")
    return "\n".join(lines) + "\n"


def generate_cohort(out_dir: Path, config: CohortConfig, *, report: bool = False) -> dict:
    """Write the cohort to ``out_dir`` and return the manifest (also written as manifest.json).

    Each patient folder is written under a hidden temporary name and renamed when complete; the manifest
    and CSV are written last, so an interrupted run leaves no half-written patient and no manifest that
    lists one. Raises InputError when out_dir is a file or a non-empty folder not made by this command.
    """
    out_dir = Path(out_dir)
    earlier_folders = _check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sites = config.site_profiles()
    patients = []
    started = time.monotonic()
    for index in range(config.patients):
        t0 = time.monotonic()
        patient = simulate_patient(config, index, sites)
        final = out_dir / patient.folder
        tmp = out_dir / f".{patient.folder}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = write_patient(config, patient, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        truth = dict(patient.truth, files=files)
        patients.append(truth)
        log.info("synth_patient_written", extra={"patient": patient.folder, "site": patient.site.site_id,
                                                  "elapsed_s": round(time.monotonic() - t0, 2)})
    manifest = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        "protocol": {
            "name": protocol.PROTOCOL_NAME, "version": protocol.PROTOCOL_VERSION, "fractions": protocol.FRACTIONS,
            "ptv70_rx_gy": protocol.PTV70_RX_GY, "ptv56_rx_gy": protocol.PTV56_RX_GY,
            "ptv70_d95_per_protocol_gy": protocol.PTV70_D95_PER_PROTOCOL_GY,
            "ptv70_d95_minor_gy": protocol.PTV70_D95_MINOR_GY,
            "cord_max_per_protocol_gy": protocol.CORD_MAX_PER_PROTOCOL_GY,
            "cord_max_minor_gy": protocol.CORD_MAX_MINOR_GY,
        },
        "sites": [asdict(s) for s in sites],
        "patients": patients,
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for t in patients:
        writer.writerow(_csv_row(t))
    _write_atomic(out_dir / CSV_NAME, buffer.getvalue())
    if report:
        _write_atomic(out_dir / REPORT_NAME, _report(manifest))
    else:
        (out_dir / REPORT_NAME).unlink(missing_ok=True)
    _write_atomic(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    current = {p["folder"] for p in patients}
    for folder in earlier_folders:  # an earlier, larger cohort's patients: only names that manifest listed
        if folder not in current and _PATIENT_FOLDER.fullmatch(folder):
            shutil.rmtree(out_dir / folder, ignore_errors=True)
    log.info("synth_cohort_written", extra={"patients": config.patients, "sites": config.sites,
                                             "elapsed_s": round(time.monotonic() - started, 2)})
    return manifest


def summarise(manifest: dict, out_dir: Path) -> dict:
    """What `rtqa synth` prints: a JSON-ready summary with a ``text`` rendering."""
    out_dir = Path(out_dir)
    patients = manifest["patients"]
    verdicts = {v: sum(p["true_verdict"] == v for p in patients) for v in protocol.SEVERITIES}
    rates = {k: round(sum(p["outcomes"][k]["event"] for p in patients) / len(patients), 4)
             for k in ("xerostomia", "dysphagia", "local_control")}
    rows = [
        {"folder": p["folder"], "patient_id": p["patient_id"], "site_id": p["site_id"],
         "files": sum(len(v) for v in p["files"].values()), "true_verdict": p["true_verdict"],
         "deviations": [d["code"] for d in p["deviations"]],
         "ptv70_d95_gy": p["organs"]["PTV_70"]["d95_gy"], "mean_parotids_gy": p["mean_parotids_gy"]}
        for p in patients
    ]
    size = sum(f.stat().st_size for p in patients for f in (out_dir / p["folder"]).iterdir())
    lines = [f"{'patient':8} {'site':7} {'files':>5} {'verdict':13} {'PTV70 D95':>9} {'parotids':>8}  deviations"]
    for r in rows:
        lines.append(f"{r['folder']:8} {r['site_id']:7} {r['files']:5d} {r['true_verdict']:13} "
                     f"{r['ptv70_d95_gy']:9.1f} {r['mean_parotids_gy']:8.1f}  {','.join(r['deviations']) or '-'}")
    lines.append(
        f"{len(rows)} patients, {manifest['config']['sites']} site(s), seed {manifest['config']['seed']}: "
        + ", ".join(f"{k} {v}" for k, v in verdicts.items())
        + f"; {size / 1e6:.1f} MB in {out_dir}"
    )
    lines.append(f"ground truth: {out_dir / MANIFEST_NAME}, {out_dir / CSV_NAME}")
    return {
        "out": str(out_dir), "manifest": str(out_dir / MANIFEST_NAME), "csv": str(out_dir / CSV_NAME),
        "patients": rows, "verdicts": verdicts, "outcome_rates": rates, "bytes": size,
        "text": "\n".join(lines) + "\n",
    }
