"""Institutions of a synthetic cohort and their systematic differences (the "site effect" a federated model
has to live with): contouring style (a systematic margin and shift per structure), beam arrangements and
planning style (how hard organs are spared), case mix (tumour sites, ion therapy), how often protocol
deviations happen, CT calibration and pixel size.

A consensus contouring guideline (in the spirit of Brouwer et al., Radiother Oncol 2015, CT-based OAR
delineation in the head and neck) is introduced on ``GUIDELINE_DATE``: plans after it keep each site's
systematic style multiplied by ``GUIDELINE_STYLE_FACTOR`` and per-patient contouring noise multiplied by
``GUIDELINE_NOISE_FACTOR``, so inter-site and intra-site variability both shrink (factors illustrative).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SITE_STREAM = 7_301  # rng stream id for site profiles (patients use other ids; see cohort.py)
GUIDELINE_DATE = "20240701"
GUIDELINE_STYLE_FACTOR = 0.35
GUIDELINE_NOISE_FACTOR = 0.5
CONTOUR_NOISE_MM = 0.8  # per patient, per structure, before the guideline (margin sd; shifts sd x 1.5)
# Structures whose delineation varies between sites (systematic margin in mm, shift in mm per axis).
STYLED_STRUCTURES = ("Parotid_L", "Parotid_R", "Glnd_Submand_L", "Glnd_Submand_R", "SpinalCord", "Brainstem",
                     "Musc_Constrict_S", "Musc_Constrict_M", "Musc_Constrict_I", "Larynx_SG", "Glottis",
                     "Esophagus", "Cavity_Oral", "Bone_Mandible", "CTV_56")
TUMOUR_SITE_WEIGHTS = {"oropharynx": 0.45, "larynx": 0.25, "oral_cavity": 0.15, "hypopharynx": 0.15}


@dataclass(frozen=True, slots=True)
class SiteProfile:
    site_index: int  # 0-based
    site_id: str  # "SITE01"
    ptv_margin_mm: float  # CTV -> PTV expansion
    oar_contour_bias_mm: float  # organs at risk drawn this much larger (+) or tighter (-) than the phantom's truth
    beam_count: int  # static IMRT fields, equispaced gantry angles
    parotid_sparing_offset_gy: float  # added to every patient's intended mean parotid dose
    deviation_rate: float  # probability that a plan carries at least one planted error
    rater_upgrade_pct: float  # chance that this site's own reviewer grades one step more severe than the truth
    rater_downgrade_pct: float  # ... one step less severe
    pixel_spacing_mm: float  # CT in-plane pixel size
    hu_offset: float  # CT number calibration offset of the site's scanner
    treatment_machine_name: str
    effort_mean: float = 0.5  # planning style: mean sparing effort in [0, 1]
    tumour_site_weights: dict = field(default_factory=lambda: dict(TUMOUR_SITE_WEIGHTS))  # case mix
    # contouring style: structure -> (margin_mm, shift_x_mm, shift_y_mm, shift_z_mm), before the guideline
    contour_style: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ptv_margin_mm < 0 or not 0.0 <= self.deviation_rate <= 1.0 or self.pixel_spacing_mm <= 0:
            raise ValueError(f"invalid site profile {self.site_id}")
        if not 0.0 <= self.effort_mean <= 1.0:
            raise ValueError(f"site {self.site_id}: effort_mean must be in [0, 1], got {self.effort_mean}")


def make_site(seed: int, site_index: int, *, deviation_rate: float) -> SiteProfile:
    """The profile of site ``site_index`` of a cohort: a pure function of (seed, site_index, deviation_rate)."""
    rng = np.random.default_rng([seed, SITE_STREAM, site_index])
    profile: dict = {
        "site_index": site_index,
        "site_id": f"SITE{site_index + 1:02d}",
        "ptv_margin_mm": float(rng.choice([3.0, 4.0, 5.0])),
        "oar_contour_bias_mm": round(float(np.clip(rng.normal(0.0, 0.8), -1.5, 1.5)), 2),
        "beam_count": int(rng.choice([7, 9])),
        "parotid_sparing_offset_gy": round(float(rng.uniform(-5.0, 6.0)), 2),
        "deviation_rate": round(float(np.clip(deviation_rate * rng.uniform(0.5, 1.5), 0.0, 1.0)), 3),
        "rater_upgrade_pct": round(float(rng.uniform(2.0, 12.0)), 1),
        "rater_downgrade_pct": round(float(rng.uniform(2.0, 12.0)), 1),
        "pixel_spacing_mm": float(rng.choice([1.0, 1.1, 1.17])),
        "hu_offset": round(float(rng.normal(0.0, 4.0)), 1),
        "treatment_machine_name": f"SYNLINAC{site_index + 1}",
    }
    # Drawn after the fields above so that those stay what they were in generator version 1.
    profile["effort_mean"] = round(float(rng.uniform(0.3, 0.8)), 3)
    weights = rng.dirichlet([8.0 * w for w in TUMOUR_SITE_WEIGHTS.values()])
    profile["tumour_site_weights"] = {k: round(float(w), 4) for k, w in zip(TUMOUR_SITE_WEIGHTS, weights)}
    profile["contour_style"] = {
        name: tuple(round(float(v), 2) for v in (rng.normal(0.0, 1.2), *rng.normal(0.0, 1.5, size=3)))
        for name in STYLED_STRUCTURES
    }
    return SiteProfile(**profile)
