"""Every coded concept the report uses, in one place.

Standard codes come first: DCM (PS3.16 Annex D), SCT (SNOMED CT, via PS3.16) and UCM (UCUM units). Where no
standard concept exists (the review verdict, RTQA check codes, DVH metrics as the protocols name them, model
targets), the private coding scheme ``99RTQA`` is used. PS3.16 8.2 (Coding Scheme Designators): a designator
starting with "99" is private; its Coding Scheme Identification Sequence (PS3.3 C.12.1.1.3) is written into
every SR so that a receiver can tell what it means (:data:`RTQA_SCHEME`).

Check codes (``Finding.code``, e.g. ``protocol.oar_constraint``) are defined by ``rtqa_node/checks``; they are
used verbatim as 99RTQA code values (code values longer than 16 characters go to Long Code Value (0008,0119),
which highdicom selects by itself).
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from rtqa_node.review import Severity, Verdict

SCHEME = "99RTQA"
SCHEME_NAME = "rtqa-node radiotherapy plan QA concepts"


def _rtqa(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


def rtqa_scheme_identification() -> Dataset:
    """One item of the Coding Scheme Identification Sequence (0008,0110) for 99RTQA (PS3.3 C.12.1.1.3)."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "rtqa-node project"
    item.CodingSchemeVersion = "1"
    return item


# -- document ---------------------------------------------------------------------------------------------------

#: TID 1500 document title (CID 7021): DCM 126000 "Imaging Measurement Report"
TITLE = codes.DCM.ImagingMeasurementReport
#: TID 1500 row 4 "Procedure reported": SCT 108290001 "Radiation oncology AND/OR radiotherapy" and DCM 128204
#: "For Plan Quality Assurance" (a purpose-of-reference concept, the closest standard one for a plan review)
PROCEDURE_REPORTED = (
    CodedConcept(value="108290001", scheme_designator="SCT", meaning="Radiation oncology AND/OR radiotherapy"),
    CodedConcept(value="128204", scheme_designator="DCM", meaning="For Plan Quality Assurance"),
)

# -- measurement groups (TID 1501) ------------------------------------------------------------------------------

#: finding type of the overall group
REVIEW_VERDICT_GROUP = _rtqa("RTQA-REVIEW", "Radiotherapy plan review")
#: qualitative evaluation name: the overall verdict
VERDICT = _rtqa("RTQA-VERDICT", "Plan review verdict")
#: qualitative evaluation name: severity of one finding (SCT 246112005 "Severity")
SEVERITY = CodedConcept(value="246112005", scheme_designator="SCT", meaning="Severity")
#: qualitative evaluation name: category of a protocol constraint result
CONSTRAINT_CATEGORY = _rtqa("RTQA-CATEGORY", "Protocol constraint category")
#: finding type of a constraint group
PROTOCOL_CONSTRAINT = _rtqa("RTQA-CONSTRAINT", "Protocol constraint")
#: finding type of a prediction group
MODEL_PREDICTION = _rtqa("RTQA-PREDICTION", "Model prediction")
#: TEXT items
COMMENT = codes.DCM.Comment  # DCM 121106, the finding's message for a physicist
PROTOCOL = _rtqa("RTQA-PROTOCOL", "Protocol")
STRUCTURE = _rtqa("RTQA-STRUCTURE", "Structure name (TG-263)")
PER_PROTOCOL_LIMIT = _rtqa("RTQA-LIMIT-PP", "Per protocol limit")
MINOR_DEVIATION_LIMIT = _rtqa("RTQA-LIMIT-MINOR", "Minor deviation limit")
#: the same limits as numbers (NUM), the direction being in the TEXT items above
PER_PROTOCOL_LIMIT_VALUE = _rtqa("RTQA-LIMIT-PP-V", "Per protocol limit value")
MINOR_DEVIATION_LIMIT_VALUE = _rtqa("RTQA-LIMIT-MINOR-V", "Minor deviation limit value")
CONTRIBUTING_INSTANCE = _rtqa("RTQA-INSTANCE", "Contributing instance")
#: measurement names
PROBABILITY = codes.DCM.Probability  # DCM 122157 "Probability"
ATTENTION_WEIGHT = _rtqa("RTQA-ATTENTION", "Attention weight")

# -- values -----------------------------------------------------------------------------------------------------

NOT_EVALUATED = CodedConcept(value="373121007", scheme_designator="SCT", meaning="Not Evaluated")

VERDICT_VALUES: dict[Verdict, CodedConcept] = {
    Verdict.PER_PROTOCOL: _rtqa("RTQA-PP", "Per protocol"),
    Verdict.MINOR: _rtqa("RTQA-MINOR-DEV", "Minor deviation"),
    Verdict.MAJOR: _rtqa("RTQA-MAJOR-DEV", "Major deviation"),
    Verdict.NOT_EVALUABLE: NOT_EVALUATED,
}

SEVERITY_VALUES: dict[Severity, CodedConcept] = {
    Severity.INFO: _rtqa("RTQA-INFO", "Information"),
    Severity.MINOR: CodedConcept(value="255606000", scheme_designator="SCT", meaning="Minor"),
    Severity.MAJOR: CodedConcept(value="255603008", scheme_designator="SCT", meaning="Major"),
    Severity.NOT_EVALUABLE: NOT_EVALUATED,
}

#: constraint category (``ConstraintResult.category``; None means per protocol)
CATEGORY_VALUES: dict[Severity | None, CodedConcept] = {
    None: VERDICT_VALUES[Verdict.PER_PROTOCOL],
    Severity.INFO: VERDICT_VALUES[Verdict.PER_PROTOCOL],
    Severity.MINOR: VERDICT_VALUES[Verdict.MINOR],
    Severity.MAJOR: VERDICT_VALUES[Verdict.MAJOR],
    Severity.NOT_EVALUABLE: NOT_EVALUATED,
}

#: DVH metrics with a standard concept (DCM, PS3.16 CID 9535-range RT dose concepts)
_METRICS = {
    "dmax": CodedConcept(value="130004", scheme_designator="DCM", meaning="Maximum Radiation Dose"),
}

#: model targets with a standard concept
_TARGETS = {
    "xerostomia_severe": CodedConcept(value="87715008", scheme_designator="SCT", meaning="Xerostomia"),
    "dysphagia_severe": CodedConcept(value="40739000", scheme_designator="SCT", meaning="Dysphagia"),
}

# -- units (UCUM) -----------------------------------------------------------------------------------------------

_UNITS = {
    "Gy": CodedConcept(value="Gy", scheme_designator="UCUM", meaning="Gy"),
    "Gy(RBE)": CodedConcept(value="Gy", scheme_designator="UCUM", meaning="Gy"),
    "%": codes.UCUM.Percent,
    "cc": codes.UCUM.CubicCentimeter,
    "cm3": codes.UCUM.CubicCentimeter,
    "mm": codes.UCUM.Millimeter,
    "s": codes.UCUM.Second,
    "1": codes.UCUM.NoUnits,
    "": codes.UCUM.NoUnits,
}
#: unit by the suffix of a ``Finding.values`` key (units in names, STYLE.md)
_SUFFIX_UNITS = {"_gy": "Gy", "_pct": "%", "_cc": "cc", "_mm": "mm", "_s": "s"}


def unit(text: str) -> CodedConcept:
    """UCUM concept for a unit as the review writes it ("Gy", "%", "cc"); unknown units are refused.

    Raises:
        ValueError: the unit has no UCUM concept here.
    """
    try:
        return _UNITS[text]
    except KeyError:
        raise ValueError(f'unit {text!r} has no UCUM concept in report/codes.py') from None


def unit_for_key(key: str) -> CodedConcept:
    """UCUM concept for a ``Finding.values`` key by its unit suffix (``d95_gy`` -> Gy); no suffix: no units."""
    for suffix, text in _SUFFIX_UNITS.items():
        if key.endswith(suffix):
            return _UNITS[text]
    return _UNITS["1"]


def finding(code: str) -> CodedConcept:
    """A check's finding code (``protocol.oar_constraint``) as a 99RTQA concept."""
    return _rtqa(code, code)


def metric(name: str) -> CodedConcept:
    """A DVH metric as a protocol names it (``Dmax``, ``D95%``, ``V30Gy``): DCM where one exists, else 99RTQA."""
    return _METRICS.get(name.lower()) or _rtqa(f"RTQA-M-{name}", f"{name}")


def value_key(key: str) -> CodedConcept:
    """A numeric value behind a finding (``d95_gy``) as a 99RTQA measurement name."""
    return _rtqa(f"RTQA-V-{key}", key)


def target(name: str) -> CodedConcept:
    """A model target (``xerostomia_severe``, ``qa_major``): SCT where one exists, else 99RTQA."""
    return _TARGETS.get(name) or _rtqa(f"RTQA-T-{name}", name)


def constraint(constraint_id: str) -> CodedConcept:
    return _rtqa(f"RTQA-C-{constraint_id}", constraint_id)


#: Real World Value Mapping quantity of each kind of risk map (report/riskmap.py, RiskMap.kind)
RISK_MAP_QUANTITIES = {
    "oar_excess": _rtqa("RTQA-RISK-OAR", "OAR dose excess over limit, fraction of limit"),
    "attention": _rtqa("RTQA-RISK-ATTN", "Spatial MIL attention, fraction of its maximum"),
}
