"""The review stage's result: typed, frozen, free of I/O. ``PlanStudy -> Review`` is built in ``checks/``
(rule-based findings and the protocol verdict) and ``ml/`` (predictions); ``report/`` turns it into DICOM.

Severity and verdict follow trial QA practice (e.g. the RTOG/NRG and GORTEC review categories): a plan is
*per protocol*, has a *minor* (acceptable variation) or a *major* (unacceptable) deviation, or cannot be
evaluated (essential data missing).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Severity(enum.Enum):
    INFO = "info"
    MINOR = "minor"
    MAJOR = "major"
    #: the finding makes the plan impossible to evaluate (e.g. no dose, no structure set)
    NOT_EVALUABLE = "not_evaluable"


class Verdict(enum.Enum):
    PER_PROTOCOL = "per_protocol"
    MINOR = "minor"
    MAJOR = "major"
    NOT_EVALUABLE = "not_evaluable"


_VERDICT_BY_WORST = {
    None: Verdict.PER_PROTOCOL,
    Severity.INFO: Verdict.PER_PROTOCOL,
    Severity.MINOR: Verdict.MINOR,
    Severity.MAJOR: Verdict.MAJOR,
    Severity.NOT_EVALUABLE: Verdict.NOT_EVALUABLE,
}
_RANK = {Severity.INFO: 0, Severity.MINOR: 1, Severity.MAJOR: 2, Severity.NOT_EVALUABLE: 3}


@dataclass(frozen=True)
class Finding:
    """One thing a reviewer would write down.

    ``code`` is stable and machine-readable (``integrity.frame_of_reference_mismatch``,
    ``protocol.oar_constraint``, ``contour.laterality_swapped``); ``message`` is for a physicist; ``values``
    holds the numbers behind it, with units in the keys (``{"d95_gy": 64.1, "threshold_gy": 66.5}``).
    ``structure`` names the structure concerned (TG-263 name where matched), if any.
    """

    code: str
    severity: Severity
    message: str
    values: dict = field(default_factory=dict)
    structure: str | None = None

    def __post_init__(self) -> None:
        if not self.code or not isinstance(self.severity, Severity):
            raise ValueError("Finding needs a code and a Severity")

    def to_json(self) -> dict:
        out = {"code": self.code, "severity": self.severity.value, "message": self.message, **self.values}
        if self.structure is not None:
            out["structure"] = self.structure
        return out


@dataclass(frozen=True)
class ConstraintResult:
    """A protocol constraint evaluated on the plan: value, thresholds, and the category it falls in."""

    constraint_id: str
    structure: str
    metric: str  # e.g. "Dmean", "D95%", "D0.03cc", "V30Gy"
    value: float | None
    unit: str  # "Gy", "%", "cc"
    per_protocol: str  # human-readable thresholds, e.g. "<= 26 Gy"
    minor: str | None
    category: Severity | None  # None: per protocol; MINOR/MAJOR deviation; NOT_EVALUABLE if not computable
    source: str = ""

    def to_json(self) -> dict:
        return {
            "constraint_id": self.constraint_id, "structure": self.structure, "metric": self.metric,
            "value": self.value, "unit": self.unit, "per_protocol": self.per_protocol, "minor": self.minor,
            "category": self.category.value if self.category else "per_protocol", "source": self.source,
        }


@dataclass(frozen=True)
class Prediction:
    """A model's output: a calibrated probability and what drove it (attention weights per instance)."""

    target: str  # "qa_major", "xerostomia_severe", "dysphagia_severe", "local_control"
    probability: float
    model: str
    model_version: str
    top_instances: tuple[tuple[str, float], ...] = ()  # (instance name, attention weight), largest first

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")

    def to_json(self) -> dict:
        return {"target": self.target, "probability": self.probability, "model": self.model,
                "model_version": self.model_version,
                "top_instances": [{"name": n, "weight": w} for n, w in self.top_instances]}


@dataclass(frozen=True)
class AttentionMap:
    """A spatial model's voxel attention on the plan dose grid (``mass``: (Z, Y, X) float32, >= 0): where in the
    patient the prediction of ``target`` looked. ``report/`` draws it as the risk map."""

    mass: object  # numpy array; kept untyped so that this module stays free of numpy
    model: str
    model_version: str
    target: str = "xerostomia_severe"


@dataclass(frozen=True)
class Review:
    """Everything the review concluded about one plan study revision."""

    findings: tuple[Finding, ...]
    protocol: str | None  # protocol id, None when no protocol applied (generic checks only)
    constraints: tuple[ConstraintResult, ...] = ()
    #: numbers behind the verdict: per structure DVH metrics etc., JSON-serialisable, units in keys
    metrics: dict = field(default_factory=dict)
    predictions: tuple[Prediction, ...] = ()
    algorithm_version: str = ""
    #: the risk map behind the predictions, when a spatial model ran; an array, so not in :meth:`to_json`
    #: (the risk map objects carry it)
    attention: AttentionMap | None = field(default=None, compare=False, repr=False)

    @property
    def verdict(self) -> Verdict:
        severities = [f.severity for f in self.findings]
        worst = max(severities, key=_RANK.__getitem__) if severities else None
        return _VERDICT_BY_WORST[worst]

    def to_json(self) -> dict:
        """The ``rtqa review --json`` document (docs/architecture.md, command-line contract)."""
        return {
            "verdict": self.verdict.value,
            "findings": [f.to_json() for f in self.findings],
            "protocol": self.protocol,
            "constraints": [c.to_json() for c in self.constraints],
            "metrics": self.metrics,
            "predictions": [p.to_json() for p in self.predictions],
            "algorithm_version": self.algorithm_version,
        }
