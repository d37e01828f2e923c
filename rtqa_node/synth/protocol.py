"""The synthetic cohort's trial protocol ("HN-SYNTH SIB 70/56", modelled on head-and-neck SIB trials such as
RTOG 0522 / NRG HN001 in spirit, not in letter) and the grading of a plan against it.

Grading works on ``PlanFacts``: what a reviewer can read from the exported objects (the plan's prescription
and fractions, which ROIs exist and where, whether the dose grid covers the targets and shares the Frame of
Reference, and dose metrics on the drawn structures). ``tolerance_pct`` loosens (> 0) or tightens (< 0) every
dose limit: the simulated reviewers' own thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_NAME = "HN-SYNTH-SIB-70-56"
PROTOCOL_VERSION = "2"
FRACTIONS = 35
PTV70_RX_GY = 70.0
PTV56_RX_GY = 56.0
PTV70_D95_PER_PROTOCOL_GY = 0.98 * PTV70_RX_GY  # D95 >= 68.6 Gy
PTV70_D95_MINOR_GY = 0.95 * PTV70_RX_GY  # 66.5 <= D95 < 68.6: minor; below: major
CTV70_D98_PER_PROTOCOL_GY = 0.95 * PTV70_RX_GY  # CTV_70 D98 >= 66.5 Gy
CTV70_D98_MINOR_GY = 0.90 * PTV70_RX_GY  # 63 <= D98 < 66.5: minor; below: major
CORD_MAX_PER_PROTOCOL_GY = 45.0
CORD_MAX_MINOR_GY = 48.0  # 45 < Dmax <= 48: minor; above: major
BRAINSTEM_MAX_PER_PROTOCOL_GY = 54.0
BRAINSTEM_MAX_MINOR_GY = 57.0
# The better-spared parotid's mean: the planning objective is < 26 Gy (QUANTEC, Deasy et al. IJROBP 2010); as
# a deviation the protocol grades above 30 Gy (minor up to 36 Gy), a protocol-style choice of ours.
PAROTID_MEAN_PER_PROTOCOL_GY = 30.0
PAROTID_MEAN_MINOR_GY = 36.0
REQUIRED_OARS = ("SpinalCord", "Brainstem", "Parotid_L", "Parotid_R", "Musc_Constrict_S", "Larynx_SG")
CRITICAL_OARS = ("SpinalCord", "Brainstem")  # missing one of these is a major deviation
MIN_TARGET_COVERAGE_PCT = 99.0
SEVERITIES = ("per_protocol", "minor", "major")


@dataclass(frozen=True, slots=True)
class Deviation:
    code: str  # schema.ERROR_CODES
    severity: str  # "minor" | "major"
    value: float
    limit: float
    message: str

    def as_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "value": self.value, "limit": self.limit,
                "message": self.message}


@dataclass(frozen=True, slots=True)
class PlanFacts:
    """What the exported plan study shows a reviewer."""

    fractions: int
    ptv70_rx_gy: float  # the RTPLAN's PTV_70 target prescription dose
    ptv70_d95_gy: float
    ctv70_d98_gy: float
    cord_max_gy: float
    brainstem_max_gy: float
    parotid_min_mean_gy: float  # the lower of the two parotid means
    written_rois: frozenset  # ROI names in the RTSTRUCT
    parotid_l_x_mm: float  # centroid x of the ROI named Parotid_L (+x is the patient's left)
    parotid_r_x_mm: float
    target_coverage_pct: float  # the lower of PTV_70 / PTV_56: % of their points inside the dose grid
    frame_of_reference_match: bool


def _graded(code: str, value: float, per_protocol: float, minor: float, *, higher_is_worse: bool,
            unit_message: str) -> Deviation | None:
    bad = value > per_protocol if higher_is_worse else value < per_protocol
    if not bad:
        return None
    is_minor = value <= minor if higher_is_worse else value >= minor
    return Deviation(code, "minor" if is_minor else "major", round(value, 2), round(per_protocol, 2), unit_message)


def grade(facts: PlanFacts, *, tolerance_pct: float = 0.0) -> list[Deviation]:
    """Deviations of a plan from the protocol. tolerance_pct scales every dose limit towards leniency."""
    up, down = 1.0 + tolerance_pct / 100.0, 1.0 - tolerance_pct / 100.0
    out: list[Deviation] = []
    if abs(facts.ptv70_rx_gy - PTV70_RX_GY) > 0.01:
        out.append(Deviation("wrong_prescription", "major", facts.ptv70_rx_gy, PTV70_RX_GY,
                             f"PTV_70 prescribed {facts.ptv70_rx_gy:g} Gy, protocol {PTV70_RX_GY:g} Gy"))
    if facts.fractions != FRACTIONS:
        out.append(Deviation("fractionation", "minor" if abs(facts.fractions - FRACTIONS) <= 2 else "major",
                             float(facts.fractions), float(FRACTIONS),
                             f"{facts.fractions} fractions planned, protocol {FRACTIONS}"))
    missing = [name for name in REQUIRED_OARS if name not in facts.written_rois]
    if missing:
        severity = "major" if any(m in CRITICAL_OARS for m in missing) else "minor"
        out.append(Deviation("missing_oar", severity, float(len(missing)), 0.0,
                             f"required OAR(s) not contoured: {', '.join(missing)}"))
    if "Parotid_L" in facts.written_rois and "Parotid_R" in facts.written_rois \
            and facts.parotid_l_x_mm < facts.parotid_r_x_mm:
        out.append(Deviation("swapped_laterality", "major", round(facts.parotid_l_x_mm, 1),
                             round(facts.parotid_r_x_mm, 1), "Parotid_L lies on the patient's right"))
    if not facts.frame_of_reference_match:
        out.append(Deviation("frame_of_reference_mismatch", "major", 0.0, 1.0,
                             "RTDOSE Frame of Reference differs from the CT's"))
    if facts.target_coverage_pct < MIN_TARGET_COVERAGE_PCT:
        out.append(Deviation("dose_grid_truncated", "major", round(facts.target_coverage_pct, 1),
                             MIN_TARGET_COVERAGE_PCT, f"dose grid covers {facts.target_coverage_pct:.1f} % of a PTV"))
    checks = (
        _graded("ptv70_underdose", facts.ptv70_d95_gy, PTV70_D95_PER_PROTOCOL_GY * down, PTV70_D95_MINOR_GY * down,
                higher_is_worse=False, unit_message=f"PTV_70 D95 {facts.ptv70_d95_gy:.1f} Gy < "
                f"{PTV70_D95_PER_PROTOCOL_GY * down:.1f} Gy"),
        _graded("ctv70_cold_spot", facts.ctv70_d98_gy, CTV70_D98_PER_PROTOCOL_GY * down, CTV70_D98_MINOR_GY * down,
                higher_is_worse=False, unit_message=f"CTV_70 D98 {facts.ctv70_d98_gy:.1f} Gy < "
                f"{CTV70_D98_PER_PROTOCOL_GY * down:.1f} Gy"),
        _graded("cord_overdose", facts.cord_max_gy, CORD_MAX_PER_PROTOCOL_GY * up, CORD_MAX_MINOR_GY * up,
                higher_is_worse=True, unit_message=f"SpinalCord Dmax {facts.cord_max_gy:.1f} Gy > "
                f"{CORD_MAX_PER_PROTOCOL_GY * up:.0f} Gy"),
        _graded("brainstem_overdose", facts.brainstem_max_gy, BRAINSTEM_MAX_PER_PROTOCOL_GY * up,
                BRAINSTEM_MAX_MINOR_GY * up, higher_is_worse=True,
                unit_message=f"Brainstem Dmax {facts.brainstem_max_gy:.1f} Gy > {BRAINSTEM_MAX_PER_PROTOCOL_GY * up:.0f} Gy"),
        _graded("oar_constraint", facts.parotid_min_mean_gy, PAROTID_MEAN_PER_PROTOCOL_GY * up,
                PAROTID_MEAN_MINOR_GY * up, higher_is_worse=True,
                unit_message=f"better parotid mean {facts.parotid_min_mean_gy:.1f} Gy > "
                f"{PAROTID_MEAN_PER_PROTOCOL_GY * up:.0f} Gy"),
    )
    out.extend(d for d in checks if d is not None)
    return out


def verdict(deviations: list[Deviation]) -> str:
    """The most severe deviation's severity, or per_protocol."""
    return SEVERITIES[max((SEVERITIES.index(d.severity) for d in deviations), default=0)]
