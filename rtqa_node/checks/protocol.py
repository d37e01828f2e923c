"""Machine-readable trial protocols (``protocols/*.yaml``) and their evaluation on a plan.

A protocol file holds: an ``id``; ``sources`` (key -> citation); ``match`` (how a plan selects it: Clinical
Trial Protocol IDs, regular expressions on the RT Plan Label); ``prescription`` (dose levels per target, number of
fractions and dose per fraction, each with per-protocol and minor-deviation ranges); ``structures`` (required
structures by TG-263 name and the severity when one is missing); ``constraints`` (target coverage and organ
limits: metric, direction, per-protocol and minor-deviation thresholds; beyond the minor threshold a deviation is
major). Every threshold names a ``source`` key that must exist in ``sources``.

The schema is checked at load (pydantic, unknown keys refused); errors name the file and the field, e.g.
``gortec.yaml: constraints.3.per_protocol: Input should be a valid number``.

Metrics (``metric``): ``Dmean``, ``Dmax`` (the DVH engine's maximum), ``Dmin``, ``D<x>%`` and ``D<x>cc`` (minimum
dose to the hottest x % / x cc), ``V<x>Gy`` (% of the volume receiving >= x Gy) and ``V<x>Gy_cc``. A constraint
may name several structures with ``combine``: ``min`` (e.g. "at least one parotid"), ``max``, or ``volume_mean``
(Dmean of the structures taken together).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rtqa_node.errors import InputError
from rtqa_node.review import ConstraintResult, Finding, Severity

PROTOCOL_DIR = Path(str(resources.files("rtqa_node.checks") / "protocols"))

_METRIC = re.compile(r"^(Dmean|Dmax|Dmin|D(?P<dpct>\d+(?:\.\d+)?)%|D(?P<dcc>\d+(?:\.\d+)?)cc|"
                     r"V(?P<vgy>\d+(?:\.\d+)?)Gy(?P<vcc>_cc)?)$")


class ProtocolError(InputError):
    """A protocol file does not validate (exit code 2); the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Strict):
    clinical_trial_protocol_ids: tuple[str, ...] = ()
    plan_label_patterns: tuple[str, ...] = ()

    @field_validator("plan_label_patterns")
    @classmethod
    def _regex(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {pattern!r} ({exc})") from exc
        return value


class Range(_Strict):
    """A closed interval [min, max]; either end may be open (None)."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _order(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        return self

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min - 1e-9) and (self.max is None or value <= self.max + 1e-9)

    def text(self, unit: str = "") -> str:
        u = f" {unit}" if unit else ""
        if self.min is not None and self.max is not None:
            return f"{self.min:g}-{self.max:g}{u}" if self.min != self.max else f"{self.min:g}{u}"
        return f">= {self.min:g}{u}" if self.min is not None else f"<= {self.max:g}{u}"


class Graded(_Strict):
    """A quantity with a per-protocol range and a wider minor-deviation range; outside both: major."""

    per_protocol: Range
    minor: Range | None = None
    source: str

    @model_validator(mode="after")
    def _nested(self) -> Graded:
        if self.minor is not None:
            p, m = self.per_protocol, self.minor
            if (m.min is not None and (p.min is None or p.min < m.min)) or \
                    (m.max is not None and (p.max is None or p.max > m.max)):
                raise ValueError("minor range must contain the per_protocol range")
        return self

    def grade(self, value: float) -> Severity | None:
        if self.per_protocol.contains(value):
            return None
        if self.minor is not None and self.minor.contains(value):
            return Severity.MINOR
        return Severity.MAJOR


class DoseLevel(_Strict):
    target: str = Field(min_length=1)  # TG-263 target name, e.g. PTV_70
    dose_gy: float = Field(gt=0)
    source: str


class Prescription(_Strict):
    levels: tuple[DoseLevel, ...] = ()
    fractions: Graded | None = None
    dose_per_fraction_gy: Graded | None = None  # of the highest dose level
    total_dose: Graded | None = None  # plan's highest TargetPrescriptionDose in % of the highest level


class RequiredStructure(_Strict):
    name: str = Field(min_length=1)
    if_missing: Literal["info", "minor", "major", "not_evaluable"] = "major"
    source: str


class Constraint(_Strict):
    id: str = Field(min_length=1)
    structures: tuple[str, ...] = Field(min_length=1)
    combine: Literal["min", "max", "volume_mean"] | None = None
    metric: str
    direction: Literal["max", "min"]  # "max": value must stay at or below the thresholds; "min": at or above
    per_protocol: float
    minor: float | None = None  # the minor-deviation limit; past it: major. None: any violation is major
    #: the worst grade this constraint can give; "minor" for advisory limits (a QUANTEC limit without a
    #: second, clearly worse level)
    max_severity: Literal["minor", "major"] = "major"
    source: str
    note: str = ""

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if not _METRIC.match(value):
            raise ValueError(f"unknown metric {value!r} (Dmean, Dmax, Dmin, D<x>%, D<x>cc, V<x>Gy, V<x>Gy_cc)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Constraint:
        if len(self.structures) > 1 and self.combine is None:
            raise ValueError("several structures need 'combine' (min, max or volume_mean)")
        if self.combine == "volume_mean" and self.metric != "Dmean":
            raise ValueError("combine: volume_mean works with metric Dmean only")
        if self.minor is not None:
            if self.direction == "max" and self.minor < self.per_protocol:
                raise ValueError(f"direction max: minor ({self.minor}) must be >= per_protocol ({self.per_protocol})")
            if self.direction == "min" and self.minor > self.per_protocol:
                raise ValueError(f"direction min: minor ({self.minor}) must be <= per_protocol ({self.per_protocol})")
        return self

    @property
    def unit(self) -> str:
        m = _METRIC.match(self.metric)
        if m.group("vgy"):
            return "cc" if m.group("vcc") else "%"
        return "Gy"

    def grade(self, value: float) -> Severity | None:
        sign = 1.0 if self.direction == "max" else -1.0
        if sign * (value - self.per_protocol) <= 1e-9:
            return None
        if self.minor is not None and sign * (value - self.minor) <= 1e-9:
            return Severity.MINOR
        return Severity.MAJOR if self.max_severity == "major" else Severity.MINOR

    def thresholds_text(self) -> tuple[str, str | None]:
        op = "<=" if self.direction == "max" else ">="
        per = f"{op} {self.per_protocol:g} {self.unit}"
        if self.minor is None:
            return per, None
        return per, f"{op} {self.minor:g} {self.unit}"


class Protocol(_Strict):
    """One trial protocol (see the module docstring)."""

    id: str = Field(min_length=1)
    title: str
    version: str
    site: str
    sources: dict[str, str] = Field(min_length=1)
    match: Match = Match()
    prescription: Prescription = Prescription()
    structures: tuple[RequiredStructure, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    #: expected CTV-to-PTV margin; reported against the measured margin (contour checks)
    ptv_margin_mm: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _sources_exist(self) -> Protocol:
        def check(where: str, key: str) -> None:
            if key not in self.sources:
                raise ValueError(f"{where}: source {key!r} is not listed under 'sources'")
        for i, lvl in enumerate(self.prescription.levels):
            check(f"prescription.levels.{i}", lvl.source)
        for name in ("fractions", "dose_per_fraction_gy", "total_dose"):
            graded = getattr(self.prescription, name)
            if graded is not None:
                check(f"prescription.{name}", graded.source)
        for i, s in enumerate(self.structures):
            check(f"structures.{i}", s.source)
        ids = set()
        for i, c in enumerate(self.constraints):
            check(f"constraints.{i} ({c.id})", c.source)
            if c.id in ids:
                raise ValueError(f"constraints.{i}: duplicate id {c.id!r}")
            ids.add(c.id)
        for key, text in self.sources.items():
            if not text.strip():
                raise ValueError(f"sources.{key}: empty citation")
        return self

    @property
    def top_level(self) -> DoseLevel | None:
        return max(self.prescription.levels, key=lambda lv: lv.dose_gy) if self.prescription.levels else None


# -- loading ----------------------------------------------------------------------------------------------------


def load_protocol_file(path: Path) -> Protocol:
    """Read and validate one protocol file. Raises ProtocolError naming the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ProtocolError(f"{path.name}: cannot read protocol: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"{path.name}: a protocol file must be a mapping, got {type(data).__name__}")
    try:
        return Protocol(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                             for e in exc.errors())
        raise ProtocolError(f"{path.name}: {problems}") from None


def protocol_files(directory: Path = PROTOCOL_DIR) -> list[Path]:
    return sorted(Path(directory).glob("*.yaml"))


def load_protocols(directory: Path = PROTOCOL_DIR) -> dict[str, Protocol]:
    """Every protocol in ``directory`` by id. Raises ProtocolError for an invalid file or a duplicate id."""
    out: dict[str, Protocol] = {}
    for path in protocol_files(directory):
        p = load_protocol_file(path)
        if p.id in out:
            raise ProtocolError(f"{path.name}: protocol id {p.id!r} is used by another file too")
        out[p.id] = p
    return out


def get_protocol(name: str, directory: Path = PROTOCOL_DIR) -> Protocol:
    """A protocol by id (case-insensitive) or by file path. Raises ProtocolError naming the known ids."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return load_protocol_file(candidate)
    protocols = load_protocols(directory)
    for pid, p in protocols.items():
        if pid.lower() == name.lower():
            return p
    raise ProtocolError(f"unknown protocol {name!r}; known: {', '.join(sorted(protocols))}")


@dataclass(frozen=True)
class Selection:
    protocol: Protocol | None
    how: str  # "explicit", "config", "clinical_trial_protocol_id", "plan_label", "none"


def select_protocol(*, explicit: str | None = None, configured: str | None = None,
                    clinical_trial_protocol_id: str | None = None, plan_label: str | None = None,
                    directory: Path = PROTOCOL_DIR) -> Selection:
    """Which protocol applies: an explicit name, else the configured one, else the protocol whose
    ``match.clinical_trial_protocol_ids`` lists the plan's Clinical Trial Protocol ID (0012,0020), else the first
    (by id) whose ``match.plan_label_patterns`` matches the RT Plan Label; none: generic checks only."""
    if explicit:
        return Selection(get_protocol(explicit, directory), "explicit")
    if configured:
        return Selection(get_protocol(configured, directory), "config")
    protocols = load_protocols(directory)
    if clinical_trial_protocol_id:
        for pid in sorted(protocols):
            if clinical_trial_protocol_id.strip() in protocols[pid].match.clinical_trial_protocol_ids:
                return Selection(protocols[pid], "clinical_trial_protocol_id")
    if plan_label:
        for pid in sorted(protocols):
            if any(re.fullmatch(p, plan_label.strip()) for p in protocols[pid].match.plan_label_patterns):
                return Selection(protocols[pid], "plan_label")
    return Selection(None, "none")


# -- evaluation -------------------------------------------------------------------------------------------------


def metric_value(metric: str, dvh_metrics, dvh) -> float:
    """One metric from a structure's DvhMetrics and cumulative Dvh (rtqa_node.rt.dvh)."""
    m = _METRIC.match(metric)
    if metric == "Dmean":
        return dvh_metrics.mean_gy
    if metric == "Dmax":
        return dvh_metrics.max_gy
    if metric == "Dmin":
        return dvh_metrics.min_gy
    if m.group("dpct"):
        return dvh.dose_at_volume_pct(float(m.group("dpct")))
    if m.group("dcc"):
        cc = float(m.group("dcc"))
        return dvh.dose_at_volume_cc(cc) if dvh.total_cc >= cc else dvh_metrics.max_gy
    dose = float(m.group("vgy"))
    return dvh.volume_at_dose_cc(dose) if m.group("vcc") else dvh.volume_at_dose_pct(dose)


def evaluate_constraints(protocol: Protocol, dvhs: dict) -> tuple[list[ConstraintResult], list[Finding]]:
    """Grade every constraint. ``dvhs``: TG-263 name -> rtqa_node.rt.dvh.StructureDvh (missing names: the
    constraint is not evaluable; the missing structure itself is reported by the contour checks)."""
    results, findings = [], []
    for c in protocol.constraints:
        per_text, minor_text = c.thresholds_text()
        present = [s for s in c.structures if s in dvhs]
        label = "+".join(c.structures)
        if not present or (c.combine is None and len(present) != len(c.structures)):
            results.append(ConstraintResult(c.id, label, c.metric, None, c.unit, per_text, minor_text,
                                            Severity.NOT_EVALUABLE, protocol.sources[c.source]))
            findings.append(Finding("protocol.constraint_not_evaluable", Severity.INFO,
                                    f"{c.id}: {label} {c.metric} not evaluated: structure not found",
                                    {"constraint_id": c.id}, label))
            continue
        values = {s: metric_value(c.metric, dvhs[s].metrics, dvhs[s].dvh) for s in present}
        if c.combine == "volume_mean":
            vols = {s: dvhs[s].dvh.total_cc for s in present}
            total = sum(vols.values())
            value = sum(values[s] * vols[s] for s in present) / total if total > 0 else float("nan")
        elif c.combine == "min":
            value = min(values.values())
        elif c.combine == "max":
            value = max(values.values())
        else:
            value = values[present[0]]
        if not math.isfinite(value):
            category = Severity.NOT_EVALUABLE
        else:
            category = c.grade(value)
        results.append(ConstraintResult(c.id, label, c.metric, round(value, 3) if math.isfinite(value) else None,
                                        c.unit, per_text, minor_text, category, protocol.sources[c.source]))
        if category in (Severity.MINOR, Severity.MAJOR):
            kind = "target_coverage" if c.direction == "min" else "oar_constraint"
            findings.append(Finding(
                f"protocol.{kind}", category,
                f"{label} {c.metric} {value:.2f} {c.unit}: per protocol {per_text}"
                + (f", minor deviation {minor_text}" if minor_text else "") + f" ({protocol.id})",
                {"constraint_id": c.id, "metric": c.metric, "value": round(value, 3), "unit": c.unit,
                 "per_protocol": per_text, "minor": minor_text, "source": protocol.sources[c.source]},
                label))
    return results, findings


def evaluate_prescription(protocol: Protocol, *, fractions: int | None, prescription_gy: float | None
                          ) -> list[Finding]:
    """Fractionation, dose per fraction and total dose against the protocol."""
    out = []
    rx = protocol.prescription
    top = protocol.top_level
    if rx.fractions is not None:
        if fractions is None:
            out.append(Finding("protocol.fractionation", Severity.MINOR,
                               "the plan states no number of fractions; fractionation cannot be checked"))
        else:
            sev = rx.fractions.grade(fractions)
            if sev is not None:
                out.append(Finding("protocol.fractionation", sev,
                                   f"{fractions} fractions planned; protocol {rx.fractions.per_protocol.text()}"
                                   f" ({protocol.id})",
                                   {"fractions": fractions, "per_protocol": rx.fractions.per_protocol.text(),
                                    "minor": rx.fractions.minor.text() if rx.fractions.minor else None,
                                    "source": protocol.sources[rx.fractions.source]}))
    plan_top = prescription_gy if prescription_gy else (top.dose_gy if top else None)
    if rx.dose_per_fraction_gy is not None and fractions and plan_top:
        dpf = plan_top / fractions
        sev = rx.dose_per_fraction_gy.grade(dpf)
        if sev is not None:
            out.append(Finding("protocol.dose_per_fraction", sev,
                               f"{dpf:.3f} Gy per fraction; protocol {rx.dose_per_fraction_gy.per_protocol.text('Gy')}",
                               {"dose_per_fraction_gy": round(dpf, 4),
                                "per_protocol": rx.dose_per_fraction_gy.per_protocol.text("Gy"),
                                "source": protocol.sources[rx.dose_per_fraction_gy.source]}))
    if rx.total_dose is not None and top is not None and prescription_gy:
        pct = prescription_gy / top.dose_gy * 100.0
        sev = rx.total_dose.grade(pct)
        if sev is not None:
            out.append(Finding("protocol.prescription_dose", sev,
                               f"plan prescribes {prescription_gy:g} Gy, protocol {top.dose_gy:g} Gy to {top.target}"
                               f" ({pct:.1f} %)",
                               {"prescription_gy": prescription_gy, "protocol_gy": top.dose_gy,
                                "source": protocol.sources[rx.total_dose.source]}))
    return out
