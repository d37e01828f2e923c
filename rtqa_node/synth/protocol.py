"""The synthetic cohort's trial protocol ("HN-SYNTH SIB 70/56", modelled on head-and-neck SIB trials such as
RTOG 0522 / NRG HN001 in spirit, not in letter) and the grading of a plan against it."""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_NAME = "HN-SYNTH-SIB-70-56"
PROTOCOL_VERSION = "1"
FRACTIONS = 35
PTV70_RX_GY = 70.0
PTV56_RX_GY = 56.0
PTV70_D95_PER_PROTOCOL_GY = 0.98 * PTV70_RX_GY  # D95 >= 68.6 Gy
PTV70_D95_MINOR_GY = 0.95 * PTV70_RX_GY  # 66.5 <= D95 < 68.6: minor; below: major
CORD_MAX_PER_PROTOCOL_GY = 45.0
CORD_MAX_MINOR_GY = 48.0  # 45 < Dmax <= 48: minor; above: major
SEVERITIES = ("per_protocol", "minor", "major")


@dataclass(frozen=True, slots=True)
class Deviation:
    code: str  # "fractionation" | "ptv70_underdose" | "cord_overdose"
    severity: str  # "minor" | "major"
    value: float
    limit: float
    message: str

    def as_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "value": self.value, "limit": self.limit,
                "message": self.message}


def grade(*, fractions: int, ptv70_d95_gy: float, cord_max_gy: float) -> list[Deviation]:
    """Deviations of a plan from the protocol, from its realised metrics."""
    out = []
    if fractions != FRACTIONS:
        out.append(Deviation("fractionation", "minor" if abs(fractions - FRACTIONS) <= 2 else "major",
                             float(fractions), float(FRACTIONS),
                             f"{fractions} fractions planned, protocol {FRACTIONS}"))
    if ptv70_d95_gy < PTV70_D95_PER_PROTOCOL_GY:
        out.append(Deviation("ptv70_underdose", "minor" if ptv70_d95_gy >= PTV70_D95_MINOR_GY else "major",
                             round(ptv70_d95_gy, 2), PTV70_D95_PER_PROTOCOL_GY,
                             f"PTV_70 D95 {ptv70_d95_gy:.1f} Gy < {PTV70_D95_PER_PROTOCOL_GY:.1f} Gy"))
    if cord_max_gy > CORD_MAX_PER_PROTOCOL_GY:
        out.append(Deviation("cord_overdose", "minor" if cord_max_gy <= CORD_MAX_MINOR_GY else "major",
                             round(cord_max_gy, 2), CORD_MAX_PER_PROTOCOL_GY,
                             f"SpinalCord Dmax {cord_max_gy:.1f} Gy > {CORD_MAX_PER_PROTOCOL_GY:.0f} Gy"))
    return out


def verdict(deviations: list[Deviation]) -> str:
    """The most severe deviation's severity, or per_protocol."""
    return SEVERITIES[max((SEVERITIES.index(d.severity) for d in deviations), default=0)]
