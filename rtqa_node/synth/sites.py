"""Institutions of a synthetic cohort and their systematic differences (the "site effect" a federated model
has to live with): contouring margins and habits, beam arrangements, how hard parotids are spared, how often
protocol deviations happen, how strict the local QA reviewers are, CT calibration and pixel size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SITE_STREAM = 7_301  # rng stream id for site profiles (patients use other ids; see cohort.py)


@dataclass(frozen=True, slots=True)
class SiteProfile:
    site_index: int  # 0-based
    site_id: str  # "SITE01"
    ptv_margin_mm: float  # CTV -> PTV expansion
    oar_contour_bias_mm: float  # organs at risk drawn this much larger (+) or tighter (-) than the phantom's truth
    beam_count: int  # static IMRT fields, equispaced gantry angles
    parotid_sparing_offset_gy: float  # added to every patient's intended mean parotid dose
    deviation_rate: float  # probability that a plan carries at least one protocol deviation
    rater_upgrade_pct: float  # chance that this site's reviewer grades one step more severe than the truth
    rater_downgrade_pct: float  # ... one step less severe
    pixel_spacing_mm: float  # CT in-plane pixel size
    hu_offset: float  # CT number calibration offset of the site's scanner
    treatment_machine_name: str

    def __post_init__(self) -> None:
        if self.ptv_margin_mm < 0 or not 0.0 <= self.deviation_rate <= 1.0 or self.pixel_spacing_mm <= 0:
            raise ValueError(f"invalid site profile {self.site_id}")


def make_site(seed: int, site_index: int, *, deviation_rate: float) -> SiteProfile:
    """The profile of site ``site_index`` of a cohort: a pure function of (seed, site_index, deviation_rate)."""
    rng = np.random.default_rng([seed, SITE_STREAM, site_index])
    return SiteProfile(
        site_index=site_index,
        site_id=f"SITE{site_index + 1:02d}",
        ptv_margin_mm=float(rng.choice([3.0, 4.0, 5.0])),
        oar_contour_bias_mm=round(float(np.clip(rng.normal(0.0, 0.8), -1.5, 1.5)), 2),
        beam_count=int(rng.choice([7, 9])),
        parotid_sparing_offset_gy=round(float(rng.uniform(-5.0, 6.0)), 2),
        deviation_rate=round(float(np.clip(deviation_rate * rng.uniform(0.5, 1.5), 0.0, 1.0)), 3),
        rater_upgrade_pct=round(float(rng.uniform(2.0, 12.0)), 1),
        rater_downgrade_pct=round(float(rng.uniform(2.0, 12.0)), 1),
        pixel_spacing_mm=float(rng.choice([1.0, 1.1, 1.17])),
        hu_offset=round(float(rng.normal(0.0, 4.0)), 1),
        treatment_machine_name=f"SYNLINAC{site_index + 1}",
    )
