"""Generate a synthetic cohort: per patient a complete plan study (CT series, RTSTRUCT, RTPLAN or RT Ion
Plan, RTDOSE) in its own folder, plus the ground truth (schema in ``schema.py``): ground_truth.json (planted
errors, graded deviations, reviewer verdicts, organ doses, oracle probabilities, outcomes, mechanisms),
cohort.csv (flat, one row per patient) and the planted parotid stem-cell sub-region masks (subregions/*.npz).

Everything is a pure function of (seed, generator version, slices, sites, deviation rate, modality, patient
index): the same arguments give the same UIDs and the same bytes, and patient i is the same whatever the
cohort size. Random streams are separate per purpose (anatomy, CT noise, plan, dose, outcomes, reviewers,
contouring noise, tumour site, modality), so a change in one part of the generator does not reshuffle the others.
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
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rtqa_node.errors import InputError
from rtqa_node.synth import protocol, schema
from rtqa_node.synth.anatomy import Phantom, make_phantom
from rtqa_node.synth.ct import ct_numbers, ct_series
from rtqa_node.synth.dcm import RT_ION_PLAN_STORAGE, RT_PLAN_STORAGE, StudyContext, synth_uid, write
from rtqa_node.synth.dose import (
    PENUMBRA_BY_MODALITY_MM,
    DoseIntent,
    apply_cold_spot,
    compute_dose,
    dose_dataset,
    percentile_dose,
    quantise,
    rbe_field,
)
from rtqa_node.synth.grid import Grid
from rtqa_node.synth.outcomes import MODELS, draw_outcomes, weighted_geud
from rtqa_node.synth.plan import PlanSpec, plan_dataset
from rtqa_node.synth.reviewers import ReviewerProfile, review_plan, reviewer_profiles
from rtqa_node.synth.rtstruct import structure_set
from rtqa_node.synth.sites import GUIDELINE_DATE, SiteProfile, make_site

log = logging.getLogger(__name__)

GENERATOR = "rtqa synth"
GENERATOR_VERSION = "2"
MANIFEST_NAME = schema.GROUND_TRUTH_NAME
LEGACY_MANIFEST_NAME = "manifest.json"  # generator version 1 wrote this; an output with it may be overwritten
CSV_NAME = schema.COHORT_CSV_NAME
REPORT_NAME = "report.md"
CT_COLUMNS = 256
SLICE_SPACING_MM = 3.0
DOSE_GRID_FACTOR = 2
MIN_SLICES, MAX_SLICES = 30, 400
MODALITY_CHOICES = (*schema.MODALITIES, "mixed")
MIXED_MODALITY_WEIGHTS = {"photon": 0.6, "proton": 0.3, "carbon": 0.1}

# rng stream ids (first two entropy words are the seed and the stream)
_CONTEXT, _ANATOMY, _CT_NOISE, _PLAN, _DOSE, _OUTCOMES, _RATERS, _STYLE, _TUMOUR, _MODALITY = range(1, 11)
_PATIENT_FOLDER = re.compile(r"HN[0-9]{3,4}")
# Plantable errors: code -> severities it can have.
PLANTABLE = {
    "wrong_prescription": ("major",),
    "fractionation": ("minor", "major"),
    "missing_oar": ("minor", "major"),
    "swapped_laterality": ("major",),
    "ctv70_cold_spot": ("minor", "major"),
    "cord_overdose": ("minor", "major"),
    "brainstem_overdose": ("minor", "major"),
    "dose_grid_truncated": ("major",),
    "frame_of_reference_mismatch": ("major",),
    "ptv70_underdose": ("minor", "major"),
    "oar_constraint": ("minor", "major"),
}
DEVIATION_CODES = tuple(PLANTABLE)
# Organs sparing effort acts on besides the parotids (max fraction removed at effort 1) and DVHs in the RTDOSE.
EFFORT_SPARING = {"Musc_Constrict_S": 0.35, "Larynx_SG": 0.35, "Cavity_Oral": 0.3, "Esophagus": 0.3}
DVH_ROIS = ("PTV_70", "PTV_56", "CTV_70", "SpinalCord", "Brainstem", "Parotid_L", "Parotid_R", "Musc_Constrict",
            "Musc_Constrict_S", "Larynx_SG", "Larynx")
OUTCOME_ORGANS = ("Parotid_L", "Parotid_R", "Musc_Constrict_S", "Larynx_SG")


@dataclass(frozen=True, slots=True)
class CohortConfig:
    patients: int
    sites: int = 1
    seed: int = 0
    slices: int = 80
    deviation_rate: float = 0.3  # mean chance that a plan carries a planted error (sites vary around it)
    modality: str = "photon"  # "photon" | "proton" | "carbon" | "mixed" (60/30/10 %)
    reviewers: int = 3  # simulated central reviewers per plan

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
        if self.modality not in MODALITY_CHOICES:
            raise InputError(f"--modality must be one of {', '.join(MODALITY_CHOICES)}, got {self.modality!r}")
        if not 2 <= self.reviewers <= 9:
            raise InputError(f"--reviewers must be between 2 and 9, got {self.reviewers}")

    def uid_key(self, index: int) -> str:
        return (f"v{GENERATOR_VERSION}/seed{self.seed}/sites{self.sites}/slices{self.slices}/"
                f"dev{self.deviation_rate:g}/mod{self.modality}/p{index}")

    def site_profiles(self) -> list[SiteProfile]:
        return [make_site(self.seed, k, deviation_rate=self.deviation_rate) for k in range(self.sites)]

    def reviewer_profiles(self) -> list[ReviewerProfile]:
        return reviewer_profiles(self.seed, self.reviewers)


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
    dose_gy: np.ndarray  # dose_pixels * scaling, float32 (Gy, or Gy(RBE) for ions)
    plan: PlanSpec
    target_points_mm: np.ndarray  # (N, 3) dose-grid points inside PTV_70 or PTV_56
    structure_points: dict[str, np.ndarray]  # TG-263 name -> bool mask on dose_grid (drawn structures)
    truth: dict  # JSON-ready ground truth (schema.PATIENT_KEYS)
    written_names: dict | None = None  # phantom name -> ROI name written (planted swap / missing OAR)
    export_slices: tuple[int, int] = (0, 0)  # dose-grid slices [k0, k1) written to the RTDOSE
    dose_frame_of_reference_uid: str = ""
    subregion_ct: np.ndarray | None = None  # uint8 (slices, rows, columns) on ct_grid: 1 = Parotid_L, 2 = R
    subregion_dose: np.ndarray | None = None  # the same on dose_grid


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


def _modality(config: CohortConfig, index: int) -> str:
    if config.modality != "mixed":
        return config.modality
    u = float(_rng(config, _MODALITY, index).random())
    cumulative = 0.0
    for name, weight in MIXED_MODALITY_WEIGHTS.items():
        cumulative += weight
        if u < cumulative:
            return name
    return "photon"


def _tumour_site(config: CohortConfig, index: int, site: SiteProfile) -> str:
    names = list(site.tumour_site_weights)
    weights = np.asarray([site.tumour_site_weights[n] for n in names])
    return names[int(_rng(config, _TUMOUR, index).choice(len(names), p=weights / weights.sum()))]


def _plant(rng: np.random.Generator, site: SiteProfile) -> list[dict]:
    if rng.random() >= site.deviation_rate:
        return []
    count = 2 if rng.random() < 0.2 else 1
    codes = rng.choice(len(DEVIATION_CODES), size=count, replace=False)
    out = []
    for c in sorted(codes):
        code = DEVIATION_CODES[int(c)]
        allowed = PLANTABLE[code]
        severity = allowed[0] if len(allowed) == 1 else ("major" if rng.random() < 0.4 else "minor")
        out.append({"code": code, "severity": severity, "detail": {}})
    return out


def _intent(rng: np.random.Generator, planted: list[dict], site: SiteProfile, phantom: Phantom, *,
            effort: float, modality: str) -> tuple[DoseIntent, int]:
    by_code = {p["code"]: p["severity"] for p in planted}
    fractions = protocol.FRACTIONS
    if "fractionation" in by_code:
        fractions = int(rng.choice([33, 34, 36, 37])) if by_code["fractionation"] == "minor" else int(rng.choice([30, 40]))
    d95_rel = float(np.clip(rng.normal(1.0, 0.006), 0.988, 1.015))
    if "ptv70_underdose" in by_code:
        d95_rel = float(rng.uniform(0.958, 0.975) if by_code["ptv70_underdose"] == "minor" else rng.uniform(0.88, 0.935))
    cord = float(rng.uniform(34.0, 43.0))
    if "cord_overdose" in by_code:
        cord = float(rng.uniform(45.8, 47.3) if by_code["cord_overdose"] == "minor" else rng.uniform(49.5, 54.0))
    brainstem = float(rng.uniform(36.0, 50.0))
    if "brainstem_overdose" in by_code:
        brainstem = float(rng.uniform(55.2, 56.5) if by_code["brainstem_overdose"] == "minor" else rng.uniform(58.5, 62.0))
    # Effort 0..1 lowers the intended parotid means by up to 8 Gy (ions spare more at the same effort).
    ion_bonus = {"photon": 0.0, "proton": 4.0, "carbon": 5.0}[modality]
    contra = float(rng.uniform(14.0, 27.0)) + site.parotid_sparing_offset_gy - 8.0 * effort - ion_bonus
    ipsi = float(rng.uniform(22.0, 44.0)) + site.parotid_sparing_offset_gy - 8.0 * effort - ion_bonus
    contra = float(np.clip(contra, 5.0, 24.0))
    if "oar_constraint" in by_code:
        contra = float(rng.uniform(31.5, 34.5) if by_code["oar_constraint"] == "minor" else rng.uniform(38.0, 42.0))
        ipsi = max(ipsi, contra + 2.0)
    parotids = ({"Parotid_L": ipsi, "Parotid_R": contra} if phantom.tumour_side == "L"
                else {"Parotid_L": contra, "Parotid_R": ipsi})
    ions = modality != "photon"
    low_dose = (0.45 if site.beam_count == 7 else 0.40) + rng.normal(0, 0.03)
    stem = {name: float(rng.uniform(-0.35, 0.5)) for name in ("Parotid_L", "Parotid_R")}
    hot = float(rng.uniform(2.0, 6.0)) if rng.random() < 0.3 else 0.0
    return DoseIntent(
        ptv70_d95_gy=protocol.PTV70_RX_GY * d95_rel,
        ptv70_rx_gy=protocol.PTV70_RX_GY,
        ptv56_rx_gy=protocol.PTV56_RX_GY,
        parotid_mean_gy={k: float(np.clip(v, 5.0, 60.0)) for k, v in parotids.items()},
        cord_max_gy=cord,
        brainstem_max_gy=brainstem,
        constrictor_sparing=float(rng.uniform(0.0, 0.3)),
        low_dose_fraction=float(np.clip(low_dose * (0.45 if ions else 1.0), 0.1, 0.55)),
        low_dose_length_mm=float(rng.uniform(30.0, 45.0)) * (0.45 if ions else 1.0),
        penumbra_sigma_mm=PENUMBRA_BY_MODALITY_MM[modality],
        extra_sparing={name: round(k * effort, 4) for name, k in EFFORT_SPARING.items()},
        stem_modulation=stem,
        hot_spot_pct=hot,
        raise_to_max=tuple(name for code, name in (("cord_overdose", "SpinalCord"), ("brainstem_overdose", "Brainstem"))
                           if code in by_code),
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


def _grid_json(grid: Grid) -> dict:
    return {"shape": list(grid.shape), "origin_mm": [float(v) for v in grid.origin_mm],
            "spacing_mm": [grid.slice_spacing_mm, grid.pixel_spacing_mm, grid.pixel_spacing_mm]}


def _mean_or_zero(dose: np.ndarray, mask: np.ndarray) -> float:
    return float(dose[mask].mean()) if mask.any() else 0.0


def _pick_point(rng: np.random.Generator, grid: Grid, mask: np.ndarray) -> tuple[float, float, float]:
    zz, yy, xx = np.nonzero(mask)
    k = int(rng.integers(0, len(zz)))
    return float(grid.x_mm[xx[k]]), float(grid.y_mm[yy[k]]), float(grid.z_mm[zz[k]])


_SWAPS = {"Parotid_L": "Parotid_R", "Parotid_R": "Parotid_L", "Glnd_Submand_L": "Glnd_Submand_R",
          "Glnd_Submand_R": "Glnd_Submand_L", "Cochlea_L": "Cochlea_R", "Cochlea_R": "Cochlea_L",
          "OpticNrv_L": "OpticNrv_R", "OpticNrv_R": "OpticNrv_L"}


def simulate_patient(config: CohortConfig, index: int, sites: list[SiteProfile] | None = None,
                     reviewers: list[ReviewerProfile] | None = None, *,
                     plant: tuple[tuple[str, str], ...] | None = None) -> SyntheticPatient:
    """Everything about patient ``index`` (0-based) except the CT pixels and the files.

    plant: (code, severity) pairs to plant instead of the random draw (tests, targeted studies).
    """
    sites = sites or config.site_profiles()
    reviewers = reviewers or config.reviewer_profiles()
    site = sites[index % config.sites]
    context = _context(config, index, site)
    after_guideline = context.study_date >= GUIDELINE_DATE
    modality = _modality(config, index)
    tumour_site = _tumour_site(config, index, site)
    phantom = make_phantom(_rng(config, _ANATOMY, index), site, tumour_site=tumour_site,
                           after_guideline=after_guideline, style_rng=_rng(config, _STYLE, index))
    ct_grid = _ct_grid(config, site)
    dose_grid = ct_grid.coarsened(DOSE_GRID_FACTOR)
    key = config.uid_key(index)

    plan_rng = _rng(config, _PLAN, index)
    planted = _plant(plan_rng, site)
    if plant is not None:
        for code, severity in plant:
            if severity not in PLANTABLE.get(code, ()):
                raise ValueError(f"cannot plant {code!r} at severity {severity!r}")
        planted = [{"code": code, "severity": severity, "detail": {}} for code, severity in plant]
    by_code = {p["code"]: p for p in planted}
    effort = float(np.clip(plan_rng.normal(site.effort_mean, 0.15), 0.0, 1.0))
    intent, fractions = _intent(plan_rng, planted, site, phantom, effort=effort, modality=modality)
    dose = compute_dose(phantom, dose_grid, _rng(config, _DOSE, index), intent)

    masks = {name: dose_grid.mask(s.shape) for name, s in phantom.structures.items()}
    rx70 = protocol.PTV70_RX_GY
    if "wrong_prescription" in by_code:
        rx70 = float(plan_rng.choice([66.0, 74.0]))
        dose *= np.float32(rx70 / protocol.PTV70_RX_GY)
        by_code["wrong_prescription"]["detail"] = {"ptv70_rx_gy": rx70}
    if "oar_constraint" in by_code:  # reach the intended parotid means exactly (boost or spare around each)
        for name, target in intent.parotid_mean_gy.items():
            win, phi = dose_grid.sample(phantom.structures[name].shape, pad_voxels=4)
            inside = phi < 0
            if inside.any():
                w = (1.0 / (1.0 + np.exp(phi / 1.5))).astype(np.float32)
                d = dose[win]
                k = (target - float(d[inside].mean())) / max(float((d * w)[inside].mean()), 1e-6)
                dose[win] *= 1.0 + np.float32(np.clip(k, -0.9, 1.0)) * w
        by_code["oar_constraint"]["detail"] = {"parotid_mean_gy": {k: round(v, 2) for k, v in
                                                                   intent.parotid_mean_gy.items()}}
    if "ctv70_cold_spot" in by_code:
        gross = masks["GTV_70"] | masks.get("GTVn_70", np.zeros_like(masks["GTV_70"]))
        location = "gtv" if plan_rng.random() < 0.5 or not (masks["CTV_70"] & ~gross).any() else "ctv_margin"
        where = gross if location == "gtv" else masks["CTV_70"] & ~gross
        centre = _pick_point(plan_rng, dose_grid, where)
        minor = by_code["ctv70_cold_spot"]["severity"] == "minor"
        target = float(plan_rng.uniform(64.0, 65.8) if minor else plan_rng.uniform(57.0, 61.5))
        depth = apply_cold_spot(dose, dose_grid, masks["CTV_70"], centre_mm=centre, sigma_mm=7.0,
                                target_d98_gy=target)
        by_code["ctv70_cold_spot"]["detail"] = {"location": location, "centre_mm": [round(v, 1) for v in centre],
                                                "sigma_mm": 7.0, "depth": round(depth, 4)}
    pixels, scaling = quantise(dose)
    dose_gy = pixels.astype(np.float32) * np.float32(scaling)

    organs = {}
    for name, structure in phantom.structures.items():
        win, phi = ct_grid.sample(structure.shape, pad_voxels=0)
        volume_cc = round(int(np.count_nonzero(phi < 0)) * ct_grid.voxel_volume_cc, 3)
        organs[name] = _organ_metrics(dose_gy, masks[name], volume_cc)

    # The true anatomy (outcomes) and the planted stem-cell regions.
    true_masks = {name: dose_grid.mask(phantom.true_shapes[name]) for name in OUTCOME_ORGANS}
    stem_masks = {name: dose_grid.mask(shape) for name, shape in phantom.stem_cells.items()}
    subregion_dose = np.zeros(dose_grid.shape, dtype=np.uint8)
    subregion_ct = np.zeros(ct_grid.shape, dtype=np.uint8)
    for label, name in enumerate(("Parotid_L", "Parotid_R"), start=1):
        subregion_dose[stem_masks[name]] = label
        subregion_ct[ct_grid.mask(phantom.stem_cells[name])] = label
    both_parotids = true_masks["Parotid_L"] | true_masks["Parotid_R"]
    both_stem = stem_masks["Parotid_L"] | stem_masks["Parotid_R"]
    gross = masks["GTV_70"] | masks.get("GTVn_70", np.zeros_like(masks["GTV_70"]))
    ctv = masks["CTV_70"] | gross
    weights = np.where(gross[ctv], 1.0, MODELS["local_control"]["ctv70_eud_logistic_tcp"]["weight_ctv_margin"])
    gtv_cc = organs["GTV_70"]["volume_cc"] + (organs["GTVn_70"]["volume_cc"] if "GTVn_70" in organs else 0.0)
    outcome_doses = {
        "mean_parotids_gy": round(_mean_or_zero(dose_gy, both_parotids), 3),
        "mean_stem_cell_regions_gy": round(_mean_or_zero(dose_gy, both_stem), 3),
        "stem_cell_region_mean_gy": {n: round(_mean_or_zero(dose_gy, m), 3) for n, m in stem_masks.items()},
        "mean_constrictor_s_gy": round(_mean_or_zero(dose_gy, true_masks["Musc_Constrict_S"]), 3),
        "mean_supraglottic_gy": round(_mean_or_zero(dose_gy, true_masks["Larynx_SG"]), 3),
        "ctv70_weighted_eud_gy": round(weighted_geud(dose_gy[ctv], weights, a=-10.0), 3) if ctv.any() else 0.0,
        "gross_tumour_volume_cc": round(gtv_cc, 3),
        "note": "doses on the true (unstyled) anatomy; the outcome models' inputs",
    }
    od = outcome_doses
    result = draw_outcomes(
        _rng(config, _OUTCOMES, index), mean_parotids_gy=od["mean_parotids_gy"],
        mean_stem_gy=od["mean_stem_cell_regions_gy"], mean_constrictor_s_gy=od["mean_constrictor_s_gy"],
        mean_supraglottic_gy=od["mean_supraglottic_gy"], ctv70_eud_gy=od["ctv70_weighted_eud_gy"],
        gtv_volume_cc=gtv_cc,
    )

    # What is exported: ROI names, dose grid extent, Frame of Reference.
    written_names = {name: name for name in phantom.structures}
    if "missing_oar" in by_code:
        pool = (("SpinalCord", "Brainstem") if by_code["missing_oar"]["severity"] == "major"
                else ("Parotid_L", "Parotid_R", "Musc_Constrict_S", "Larynx_SG"))
        missing = pool[int(plan_rng.integers(0, len(pool)))]
        del written_names[missing]
        by_code["missing_oar"]["detail"] = {"structure": missing}
    if "swapped_laterality" in by_code:
        written_names = {k: _SWAPS.get(v, v) for k, v in written_names.items()}
        by_code["swapped_laterality"]["detail"] = {"swapped": sorted(k for k in _SWAPS if k.endswith("_L"))}
    k0, k1 = 0, dose_grid.slices
    targets = masks["PTV_70"] | masks["PTV_56"]
    if "dose_grid_truncated" in by_code:
        z_in = np.nonzero(masks["PTV_70"].any(axis=(1, 2)))[0]
        cut = int(plan_rng.integers(2, 5))
        k1 = max(int(z_in[-1]) + 1 - cut, 1) if z_in.size else dose_grid.slices
        by_code["dose_grid_truncated"]["detail"] = {"slices_removed_superior": dose_grid.slices - k1}
    dose_for = context.frame_of_reference_uid
    if "frame_of_reference_mismatch" in by_code:
        dose_for = synth_uid(key, "frame-of-reference", "dose-export")
        by_code["frame_of_reference_mismatch"]["detail"] = {"object": "RTDOSE"}

    def centroid_x(written: str) -> float:
        source = next((k for k, v in written_names.items() if v == written), None)
        if source is None or not masks[source].any():
            return 0.0
        return float(dose_grid.x_mm[np.nonzero(masks[source])[2]].mean())

    coverage = []
    for name in ("PTV_70", "PTV_56"):
        total = int(masks[name].sum())
        kept = int(masks[name][k0:k1].sum())
        coverage.append(100.0 * kept / total if total else 100.0)
    parotid_means = [organs[n].get("mean_gy", 0.0) for n in ("Parotid_L", "Parotid_R")]
    facts = protocol.PlanFacts(
        fractions=fractions, ptv70_rx_gy=rx70, ptv70_d95_gy=organs["PTV_70"]["d95_gy"],
        ctv70_d98_gy=organs["CTV_70"]["d98_gy"], cord_max_gy=organs["SpinalCord"].get("max_gy", 0.0),
        brainstem_max_gy=organs["Brainstem"].get("max_gy", 0.0), parotid_min_mean_gy=min(parotid_means),
        written_rois=frozenset(written_names.values()), parotid_l_x_mm=centroid_x("Parotid_L"),
        parotid_r_x_mm=centroid_x("Parotid_R"), target_coverage_pct=min(coverage),
        frame_of_reference_match=dose_for == context.frame_of_reference_uid,
    )
    deviations = protocol.grade(facts)
    true_verdict = protocol.verdict(deviations)
    reviews = review_plan(_rng(config, _RATERS, index), facts, reviewers)
    reviews.pop("true_verdict")

    zz, yy, xx = np.nonzero(targets)
    target_points = np.column_stack([dose_grid.x_mm[xx], dose_grid.y_mm[yy], dose_grid.z_mm[zz]])
    isocenter = tuple(round(float(v), 1) for v in target_points.mean(axis=0))
    step = 360.0 / site.beam_count
    spec = PlanSpec(
        fractions=fractions, ptv70_rx_gy=rx70, ptv56_rx_gy=protocol.PTV56_RX_GY,
        cord_limit_gy=protocol.CORD_MAX_PER_PROTOCOL_GY,
        gantry_angles_deg=tuple(round(k * step, 1) for k in range(site.beam_count)),
        modulation_factor=round(float(plan_rng.uniform(2.5, 3.5)), 3), isocenter_mm=isocenter, approved=True,
        machine_name=site.treatment_machine_name if modality == "photon" else f"SYN{modality.upper()}{site.site_index + 1}",
        modality=modality,
    )
    rbe_note = None
    if modality != "photon":
        rbe = rbe_field(phantom, dose_grid, modality)
        rbe_note = {"model": "constant 1.1 (ICRU 78)" if modality == "proton" else
                    "RBE(x) = 1.1 + (3.0 - 1.1) / (1 + exp(d_PTV(x) / 4 mm)) (illustrative)",
                    "ptv70_mean_physical_gy": round(float((dose_gy / rbe)[masks["PTV_70"]].mean()), 3)}

    folder = f"HN{index + 1:03d}"
    subregion = {
        "path": f"{schema.SUBREGION_FOLDER}/{folder}.npz", "format": "npz",
        "labels": {"1": "Parotid_L", "2": "Parotid_R"}, "arrays": {"mask_ct": "ct", "mask_dose": "dose"},
        "geometry": {"ct": _grid_json(ct_grid), "dose": _grid_json(dose_grid)},
        "frame_of_reference_uid": context.frame_of_reference_uid,
        "volume_cc": {n: round(int(np.count_nonzero(subregion_ct == k)) * ct_grid.voxel_volume_cc, 3)
                      for k, n in ((1, "Parotid_L"), (2, "Parotid_R"))},
        "mean_gy": outcome_doses["stem_cell_region_mean_gy"],
    }
    truth = {
        "folder": folder,
        "patient_id": context.patient_id,
        "site_id": site.site_id,
        "period": "after_guideline" if after_guideline else "before_guideline",
        "modality": modality,
        "dose_type": "PHYSICAL" if modality == "photon" else "EFFECTIVE",
        "tumour": {"site": tumour_site, "laterality": phantom.tumour_side, "gtv_volume_cc": round(gtv_cc, 3),
                   "nodal_stage_positive": bool(phantom.meta["nodal_stage_positive"])},
        "uids": {
            "study_instance_uid": context.study_instance_uid,
            "frame_of_reference_uid": context.frame_of_reference_uid,
            "ct_series_instance_uid": synth_uid(key, "ct-series"),
            "rtstruct_sop_instance_uid": synth_uid(key, "rtstruct"),
            "rtplan_sop_instance_uid": synth_uid(key, "rtplan"),
            "rtdose_sop_instance_uid": synth_uid(key, "rtdose"),
            "rtdose_frame_of_reference_uid": dose_for,
        },
        "files": {},
        "anatomy": {"size_factor": round(phantom.size_factor, 4), "gtv_radius_mm": round(phantom.gtv_radius_mm, 2),
                    "ptv_margin_mm": site.ptv_margin_mm, "oar_contour_bias_mm": site.oar_contour_bias_mm,
                    **{k: v for k, v in phantom.meta.items() if k not in ("ptv_margin_mm", "oar_contour_bias_mm")},
                    "contouring": phantom.contouring,
                    "drawn_vs_true_volume_ratio": {
                        name: round(float(masks[name].sum()) / max(float(dose_grid.mask(phantom.true_shapes[name]).sum()), 1.0), 4)
                        for name in phantom.contouring if name in phantom.true_shapes and name in masks}},
        "plan": {"fractions": fractions, "ptv70_rx_gy": rx70, "ptv56_rx_gy": spec.ptv56_rx_gy,
                 "modality": modality, "effort": round(effort, 4),
                 "beams": site.beam_count if modality == "photon" else 3,
                 "gantry_angles_deg": list(spec.gantry_angles_deg) if modality == "photon" else [0.0, 60.0, 300.0],
                 "isocenter_mm": list(isocenter), "dose_grid_scaling_gy": scaling,
                 "penumbra_sigma_mm": intent.penumbra_sigma_mm, "hot_spot_pct": round(intent.hot_spot_pct, 3),
                 "stem_modulation": {k: round(v, 4) for k, v in intent.stem_modulation.items()},
                 "rbe": rbe_note},
        "intent": {"ptv70_d95_gy": round(intent.ptv70_d95_gy, 3), "cord_max_gy": round(intent.cord_max_gy, 3),
                   "brainstem_max_gy": round(intent.brainstem_max_gy, 3),
                   "parotid_mean_gy": {k: round(v, 3) for k, v in intent.parotid_mean_gy.items()}},
        "organs": organs,
        "outcome_doses": outcome_doses,
        "planted_errors": planted,
        "deviations": [d.as_dict() for d in deviations],
        "true_verdict": true_verdict,
        "reviews": reviews,
        "oracle": result["oracle"],
        "outcomes": result["outcomes"],
        "mechanisms": result["mechanisms"],
        "subregion": subregion,
    }
    return SyntheticPatient(
        index=index, folder=folder, site=site, context=context, phantom=phantom, ct_grid=ct_grid,
        dose_grid=dose_grid, dose_pixels=pixels, dose_grid_scaling_gy=scaling, dose_gy=dose_gy, plan=spec,
        target_points_mm=target_points, structure_points=masks, truth=truth, written_names=written_names,
        export_slices=(k0, k1), dose_frame_of_reference_uid=dose_for, subregion_ct=subregion_ct,
        subregion_dose=subregion_dose,
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
    ss = structure_set(patient.phantom, patient.ct_grid, ct, patient.context, uid_key=key,
                       written_names=patient.written_names)
    write(ss.dataset, folder / "RS.dcm")
    rp = plan_dataset(patient.plan, patient.context, uid_key=key, rtstruct_uid=ss.dataset.SOPInstanceUID,
                      roi_numbers=ss.roi_numbers, target_points_mm=patient.target_points_mm)
    write(rp, folder / "RP.dcm")
    k0, k1 = patient.export_slices
    grid = patient.dose_grid
    export_grid = Grid(columns=grid.columns, rows=grid.rows, slices=k1 - k0, pixel_spacing_mm=grid.pixel_spacing_mm,
                       slice_spacing_mm=grid.slice_spacing_mm,
                       origin_mm=(grid.origin_mm[0], grid.origin_mm[1], float(grid.z_mm[k0])))
    rd = dose_dataset(
        np.ascontiguousarray(patient.dose_pixels[k0:k1]), patient.dose_grid_scaling_gy, export_grid,
        patient.context, uid_key=key, rtplan_uid=rp.SOPInstanceUID, rtstruct_uid=ss.dataset.SOPInstanceUID,
        dvh_doses_gy={n: patient.dose_gy[k0:k1][patient.structure_points[n][k0:k1]] for n in DVH_ROIS},
        roi_numbers=ss.roi_numbers, dose_type=patient.truth["dose_type"],
        rtplan_class_uid=RT_PLAN_STORAGE if patient.plan.modality == "photon" else RT_ION_PLAN_STORAGE,
        frame_of_reference_uid=patient.dose_frame_of_reference_uid or None,
    )
    write(rd, folder / "RD.dcm")
    return {"ct": ct_names, "rtstruct": ["RS.dcm"], "rtplan": ["RP.dcm"], "rtdose": ["RD.dcm"]}


def _check_out_dir(out_dir: Path) -> list[str]:
    """Refuse a non-empty folder that is not an earlier synth output; return the earlier output's folders."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        earlier: object = {}
        for name in (MANIFEST_NAME, LEGACY_MANIFEST_NAME):
            try:
                earlier = json.loads((out_dir / name).read_text())
                break
            except (OSError, ValueError):
                continue
        if not isinstance(earlier, dict) or earlier.get("generator") != GENERATOR:
            raise InputError(f"--out {out_dir} is not empty and holds no {MANIFEST_NAME} of an earlier "
                             "`rtqa synth`; choose an empty or new folder")
        return [str(p.get("folder")) for p in earlier.get("patients", []) if isinstance(p, dict)]
    return []


def _write_atomic(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A deflated .npz (readable by ``numpy.load``) with fixed zip timestamps: ``np.savez_compressed`` stamps
    each member with the current time, so its bytes differ from run to run."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def csv_columns(reviewers: int) -> tuple[str, ...]:
    return (
        "folder", "patient_id", "site_id", "period", "modality", "tumour_site", "laterality", "fractions",
        "planted_errors", "deviation_codes", "true_verdict",
        *(f"reviewer_{k}" for k in range(1, reviewers + 1)), "consensus",
        "ptv70_d95_gy", "ctv70_d98_gy", "ptv56_d95_gy", "cord_max_gy", "brainstem_max_gy", "parotid_l_mean_gy",
        "parotid_r_mean_gy", "mean_parotids_gy", "mean_stem_cell_regions_gy", "constrictor_s_mean_gy",
        "supraglottic_mean_gy", "ctv70_weighted_eud_gy", "gtv_volume_cc", "effort",
        *(f"p_{e}" for e in schema.ENDPOINTS), *schema.ENDPOINTS, "xerostomia_cause",
    )


def csv_row(t: dict) -> dict:
    o, od = t["organs"], t["outcome_doses"]
    row = {
        "folder": t["folder"], "patient_id": t["patient_id"], "site_id": t["site_id"], "period": t["period"],
        "modality": t["modality"], "tumour_site": t["tumour"]["site"], "laterality": t["tumour"]["laterality"],
        "fractions": t["plan"]["fractions"],
        "planted_errors": ";".join(f"{e['code']}:{e['severity']}" for e in t["planted_errors"]),
        "deviation_codes": ";".join(d["code"] for d in t["deviations"]), "true_verdict": t["true_verdict"],
        "consensus": t["reviews"]["consensus"],
        "ptv70_d95_gy": o["PTV_70"]["d95_gy"], "ctv70_d98_gy": o["CTV_70"]["d98_gy"],
        "ptv56_d95_gy": o["PTV_56"].get("d95_gy", ""), "cord_max_gy": o["SpinalCord"].get("max_gy", ""),
        "brainstem_max_gy": o["Brainstem"].get("max_gy", ""), "parotid_l_mean_gy": o["Parotid_L"].get("mean_gy", ""),
        "parotid_r_mean_gy": o["Parotid_R"].get("mean_gy", ""), "mean_parotids_gy": od["mean_parotids_gy"],
        "mean_stem_cell_regions_gy": od["mean_stem_cell_regions_gy"],
        "constrictor_s_mean_gy": od["mean_constrictor_s_gy"], "supraglottic_mean_gy": od["mean_supraglottic_gy"],
        "ctv70_weighted_eud_gy": od["ctv70_weighted_eud_gy"], "gtv_volume_cc": od["gross_tumour_volume_cc"],
        "effort": t["plan"]["effort"], "xerostomia_cause": t["mechanisms"]["xerostomia"]["cause"] or "",
    }
    for k, r in enumerate(t["reviews"]["reviewers"], start=1):
        row[f"reviewer_{k}"] = r["verdict"]
    for e in schema.ENDPOINTS:
        row[f"p_{e}"] = t["oracle"][e]["probability"]
        row[e] = t["outcomes"][e]
    return row


def _make_patient(task: tuple[CohortConfig, int, str]) -> dict:
    """Simulate and write one patient into out_dir (a pool task); returns its ground truth with file names."""
    config, index, out = task
    out_dir = Path(out)
    t0 = time.monotonic()
    patient = simulate_patient(config, index, config.site_profiles(), config.reviewer_profiles())
    final = out_dir / patient.folder
    tmp = out_dir / f".{patient.folder}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = write_patient(config, patient, tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(out_dir / patient.truth["subregion"]["path"],
                  npz_bytes({"mask_ct": patient.subregion_ct, "mask_dose": patient.subregion_dose}))
    log.info("synth_patient_written", extra={"patient": patient.folder, "site": patient.site.site_id,
                                              "elapsed_s": round(time.monotonic() - t0, 2)})
    return dict(patient.truth, files=files)


def generate_cohort(out_dir: Path, config: CohortConfig, *, report: bool = False, jobs: int = 1) -> dict:
    """Write the cohort to ``out_dir`` and return the ground truth (also written as ground_truth.json).

    Each patient folder is written under a hidden temporary name and renamed when complete; the ground truth
    and CSV are written last, so an interrupted run leaves no half-written patient and no ground truth that
    lists one. With ``report``, report.md and PNG plots (synth/report.py) are written too. ``jobs`` > 1 writes
    patients in that many processes (the output is the same bytes: each patient depends only on its index).
    Raises InputError when out_dir is a file or a non-empty folder not made by this command, or jobs < 1.
    """
    if jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {jobs}")
    out_dir = Path(out_dir)
    earlier_folders = _check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / schema.SUBREGION_FOLDER).mkdir(exist_ok=True)
    sites = config.site_profiles()
    reviewers = config.reviewer_profiles()
    started = time.monotonic()
    tasks = [(config, index, str(out_dir)) for index in range(config.patients)]
    if jobs == 1 or config.patients == 1:
        patients = [_make_patient(task) for task in tasks]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(jobs, config.patients)) as pool:
            patients = list(pool.imap(_make_patient, tasks))
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        "protocol": {
            "name": protocol.PROTOCOL_NAME, "version": protocol.PROTOCOL_VERSION, "fractions": protocol.FRACTIONS,
            "ptv70_rx_gy": protocol.PTV70_RX_GY, "ptv56_rx_gy": protocol.PTV56_RX_GY,
            "ptv70_d95_per_protocol_gy": protocol.PTV70_D95_PER_PROTOCOL_GY,
            "ptv70_d95_minor_gy": protocol.PTV70_D95_MINOR_GY,
            "ctv70_d98_per_protocol_gy": protocol.CTV70_D98_PER_PROTOCOL_GY,
            "ctv70_d98_minor_gy": protocol.CTV70_D98_MINOR_GY,
            "cord_max_per_protocol_gy": protocol.CORD_MAX_PER_PROTOCOL_GY,
            "cord_max_minor_gy": protocol.CORD_MAX_MINOR_GY,
            "brainstem_max_per_protocol_gy": protocol.BRAINSTEM_MAX_PER_PROTOCOL_GY,
            "brainstem_max_minor_gy": protocol.BRAINSTEM_MAX_MINOR_GY,
            "parotid_mean_per_protocol_gy": protocol.PAROTID_MEAN_PER_PROTOCOL_GY,
            "parotid_mean_minor_gy": protocol.PAROTID_MEAN_MINOR_GY,
            "required_oars": list(protocol.REQUIRED_OARS),
        },
        "models": MODELS,
        "sites": [asdict(s) for s in sites],
        "reviewers": [r.as_dict() for r in reviewers],
        "patients": patients,
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(config.reviewers), lineterminator="\n")
    writer.writeheader()
    for t in patients:
        writer.writerow(csv_row(t))
    _write_atomic(out_dir / CSV_NAME, buffer.getvalue())
    if report:
        from rtqa_node.synth.report import write_report

        write_report(manifest, out_dir)
    else:
        from rtqa_node.synth.report import PLOTS

        for name in (REPORT_NAME, *PLOTS):
            (out_dir / name).unlink(missing_ok=True)
    _write_atomic(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    (out_dir / LEGACY_MANIFEST_NAME).unlink(missing_ok=True)
    (out_dir / "ground_truth.csv").unlink(missing_ok=True)
    current = {p["folder"] for p in patients}
    for folder in earlier_folders:  # an earlier, larger cohort's patients: only names that manifest listed
        if folder not in current and _PATIENT_FOLDER.fullmatch(folder):
            shutil.rmtree(out_dir / folder, ignore_errors=True)
            (out_dir / schema.SUBREGION_FOLDER / f"{folder}.npz").unlink(missing_ok=True)
    log.info("synth_cohort_written", extra={"patients": config.patients, "sites": config.sites,
                                             "elapsed_s": round(time.monotonic() - started, 2)})
    return manifest


def summarise(manifest: dict, out_dir: Path) -> dict:
    """What `rtqa synth` prints: a JSON-ready summary with a ``text`` rendering."""
    from rtqa_node.synth.reviewers import agreement

    out_dir = Path(out_dir)
    patients = manifest["patients"]
    verdicts = {v: sum(p["true_verdict"] == v for p in patients) for v in protocol.SEVERITIES}
    rates = {k: round(sum(p["outcomes"][k] for p in patients) / len(patients), 4) for k in schema.ENDPOINTS}
    rows = [
        {"folder": p["folder"], "patient_id": p["patient_id"], "site_id": p["site_id"], "modality": p["modality"],
         "tumour_site": p["tumour"]["site"], "files": sum(len(v) for v in p["files"].values()),
         "true_verdict": p["true_verdict"], "consensus": p["reviews"]["consensus"],
         "planted_errors": [e["code"] for e in p["planted_errors"]],
         "deviations": [d["code"] for d in p["deviations"]],
         "ptv70_d95_gy": p["organs"]["PTV_70"]["d95_gy"], "mean_parotids_gy": p["outcome_doses"]["mean_parotids_gy"]}
        for p in patients
    ]
    size = sum(f.stat().st_size for p in patients for f in (out_dir / p["folder"]).iterdir())
    lines = [(f"{'patient':8} {'site':7} {'modality':8} {'tumour':12} {'files':>5} {'verdict':13} "
              f"{'consensus':13} {'PTV70 D95':>9} {'parotids':>8}  deviations")]
    for r in rows:
        lines.append(f"{r['folder']:8} {r['site_id']:7} {r['modality']:8} {r['tumour_site']:12} {r['files']:5d} "
                     f"{r['true_verdict']:13} {r['consensus']:13} {r['ptv70_d95_gy']:9.1f} "
                     f"{r['mean_parotids_gy']:8.1f}  {','.join(r['deviations']) or '-'}")
    kappas = agreement(patients) if len(patients) >= 2 else None
    lines.append(
        f"{len(rows)} patients, {manifest['config']['sites']} site(s), seed {manifest['config']['seed']}: "
        + ", ".join(f"{k} {v}" for k, v in verdicts.items())
        + f"; {size / 1e6:.1f} MB in {out_dir}"
    )
    if kappas:
        lines.append(f"reviewer agreement: Fleiss kappa {kappas['fleiss']:.2f}, mean Cohen kappa "
                     f"{kappas['cohen_mean']:.2f}")
    lines.append(f"ground truth: {out_dir / MANIFEST_NAME}, {out_dir / CSV_NAME}")
    return {
        "out": str(out_dir), "manifest": str(out_dir / MANIFEST_NAME), "csv": str(out_dir / CSV_NAME),
        "patients": rows, "verdicts": verdicts, "outcome_rates": rates, "bytes": size, "kappa": kappas,
        "text": "\n".join(lines) + "\n",
    }
