"""Protocol files validate, every threshold cites a source, schema errors name the field; protocol selection;
TG-263 name matching (synonyms, case, spacing, laterality incl. _G/_D, PTV dose levels; unknown names kept)."""

from __future__ import annotations

import pytest
import yaml

from rtqa_node.checks.names import match_name
from rtqa_node.checks.protocol import (
    PROTOCOL_DIR,
    ProtocolError,
    evaluate_constraints,
    evaluate_prescription,
    get_protocol,
    load_protocol_file,
    load_protocols,
    protocol_files,
    select_protocol,
)
from rtqa_node.review import Severity

# -- protocol files ----------------------------------------------------------------------------------------------


def test_the_protocol_files_validate_and_include_the_three_published_families():
    protocols = load_protocols()
    assert {"GORTEC-STYLE-70-56", "NRG-RTOG-STYLE-HN", "QUANTEC-HN", "HN-SYNTH-SIB-70-56"} <= set(protocols)
    gortec = protocols["GORTEC-STYLE-70-56"]
    assert {(lv.target, lv.dose_gy) for lv in gortec.prescription.levels} == {("PTV_70", 70), ("PTV_56", 56)}
    assert gortec.prescription.fractions.per_protocol.min == 35


def _thresholds(raw: dict):
    """Every item of a raw protocol document that carries a threshold, with where it is."""
    rx = raw.get("prescription", {})
    for i, level in enumerate(rx.get("levels", [])):
        yield f"prescription.levels.{i}", level
    for key in ("fractions", "dose_per_fraction_gy", "total_dose"):
        if key in rx:
            yield f"prescription.{key}", rx[key]
    for i, item in enumerate(raw.get("structures", [])):
        yield f"structures.{i}", item
    for i, item in enumerate(raw.get("constraints", [])):
        yield f"constraints.{i}", item


@pytest.mark.parametrize("path", protocol_files(), ids=lambda p: p.name)
def test_every_threshold_has_a_source_with_a_citation(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    sources = raw["sources"]
    items = list(_thresholds(raw))
    assert items
    for where, item in items:
        assert item.get("source") in sources, f"{path.name}: {where} has no known source"
        citation = sources[item["source"]]
        assert len(citation) > 20, f"{path.name}: source {item['source']!r} is not a citation"
    published = [k for k in sources if not k.startswith("synth")]
    if raw["id"] != "HN-SYNTH-SIB-70-56":
        assert all(any(ch.isdigit() for ch in sources[k]) for k in published)  # year / volume / pages


def _write(tmp_path, text: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_schema_errors_name_the_file_and_the_field(tmp_path):
    base = (PROTOCOL_DIR / "hn-synth-sib-70-56.yaml").read_text(encoding="utf-8")
    with pytest.raises(ProtocolError, match=r"bad\.yaml: constraints\.0\.per_protocol"):
        load_protocol_file(_write(tmp_path, base.replace("per_protocol: 68.6", "per_protocol: lots")))
    with pytest.raises(ProtocolError, match=r"source 'nowhere' is not listed"):
        load_protocol_file(_write(tmp_path, base.replace("minor: 66.5,\n     source: synth",
                                                         "minor: 66.5,\n     source: nowhere")))
    with pytest.raises(ProtocolError, match=r"unknown metric"):
        load_protocol_file(_write(tmp_path, base.replace("metric: D95%", "metric: D95")))
    with pytest.raises(ProtocolError, match=r"minor .* must be"):
        load_protocol_file(_write(tmp_path, base.replace("per_protocol: 68.6, minor: 66.5",
                                                         "per_protocol: 68.6, minor: 70.0")))
    with pytest.raises(ProtocolError, match=r"colour: Extra inputs are not permitted"):
        load_protocol_file(_write(tmp_path, base + "colour: red\n"))
    with pytest.raises(ProtocolError, match="cannot read protocol"):
        load_protocol_file(_write(tmp_path, "id: [unclosed"))


def test_protocol_selection_order():
    assert select_protocol(explicit="gortec-style-70-56").how == "explicit"
    assert select_protocol(configured="QUANTEC-HN", plan_label="HN_SIB_70_56").protocol.id == "QUANTEC-HN"
    chosen = select_protocol(clinical_trial_protocol_id="RTOG 0522", plan_label="HN_SIB_70_56")
    assert (chosen.protocol.id, chosen.how) == ("NRG-RTOG-STYLE-HN", "clinical_trial_protocol_id")
    assert select_protocol(plan_label="HN_SIB_70_56").protocol.id == "HN-SYNTH-SIB-70-56"
    assert select_protocol(plan_label="GORTEC_ORL_1").protocol.id == "GORTEC-STYLE-70-56"
    none = select_protocol(plan_label="B1")
    assert none.protocol is None and none.how == "none"
    with pytest.raises(ProtocolError, match="unknown protocol 'NOPE'; known: GORTEC"):
        get_protocol("NOPE")


class _M:  # the two attributes of DvhMetrics that metric_value reads for Dmax/Dmean
    def __init__(self, mean, maximum):
        self.mean_gy, self.max_gy, self.min_gy = mean, maximum, 0.0


class _D:
    total_cc = 10.0

    def dose_at_volume_pct(self, pct):
        return 70.0 - pct / 100

    def dose_at_volume_cc(self, cc):
        return 71.0

    def volume_at_dose_pct(self, dose):
        return 10.0

    def volume_at_dose_cc(self, dose):
        return 1.0


class _S:
    def __init__(self, mean=10.0, maximum=20.0):
        self.metrics, self.dvh = _M(mean, maximum), _D()


def test_constraint_grading_per_protocol_minor_major_and_combinations():
    p = get_protocol("GORTEC-STYLE-70-56")
    dvhs = {"PTV_70": _S(), "PTV_56": _S(), "SpinalCord": _S(), "Brainstem": _S(),
            "Parotid_L": _S(mean=35.0), "Parotid_R": _S(mean=28.0), "Bone_Mandible": _S(),
            "Larynx": _S(mean=60.0), "Musc_Constrict": _S(mean=40.0)}
    results, findings = evaluate_constraints(p, dvhs)
    by_id = {r.constraint_id: r for r in results}
    assert by_id["parotid_best_mean"].value == 28.0 and by_id["parotid_best_mean"].category is Severity.MINOR
    assert by_id["larynx_mean"].category is Severity.MAJOR
    assert by_id["constrictors_mean"].category is None
    assert by_id["ptv70_d95"].value == pytest.approx(69.05) and by_id["ptv70_d95"].category is None
    assert all(r.source for r in results)
    assert {f.code for f in findings} == {"protocol.oar_constraint"}
    missing, notes = evaluate_constraints(p, {})
    assert all(r.category is Severity.NOT_EVALUABLE for r in missing)
    assert {f.severity for f in notes} == {Severity.INFO}
    quantec = get_protocol("QUANTEC-HN")
    cochlea = next(c for c in quantec.constraints if c.id == "cochlea_l_mean")
    assert cochlea.grade(80.0) is Severity.MINOR  # advisory limit: never more than minor


def test_prescription_grading():
    p = get_protocol("GORTEC-STYLE-70-56")
    assert evaluate_prescription(p, fractions=35, prescription_gy=70.0) == []
    sev = {f.code: f.severity for f in evaluate_prescription(p, fractions=33, prescription_gy=68.0)}
    assert sev == {"protocol.fractionation": Severity.MAJOR, "protocol.prescription_dose": Severity.MINOR,
                   "protocol.dose_per_fraction": Severity.MINOR}  # 68 Gy / 33 = 2.06 Gy
    sev = {f.code: f.severity for f in evaluate_prescription(p, fractions=30, prescription_gy=70.0)}
    assert sev == {"protocol.fractionation": Severity.MAJOR, "protocol.dose_per_fraction": Severity.MAJOR}


# -- TG-263 names ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, standard", [
    ("Parotid_L", "Parotid_L"), ("parotid l", "Parotid_L"), ("PAROTID LT", "Parotid_L"), ("Lt Parotid", "Parotid_L"),
    ("Left parotid", "Parotid_L"), ("Parotide_G", "Parotid_L"), ("Parotide D", "Parotid_R"), ("LParotid", "Parotid_L"),
    ("Rt_Parotid", "Parotid_R"), ("Sous-mandibulaire G", "Glnd_Submand_L"), ("submandibular right", "Glnd_Submand_R"),
    ("Lt Lung", "Lung_L"), ("BODY", "External"), ("Contour externe", "External"), ("Moelle", "SpinalCord"),
    ("spinal  cord", "SpinalCord"), ("Cord PRV5", "SpinalCord_PRV05"), ("Tronc cérébral", "Brainstem"),
    ("Brain Stem", "Brainstem"), ("Oral Cavity", "Cavity_Oral"), ("Mandibule", "Bone_Mandible"),
    ("Constricteurs", "Musc_Constrict"), ("Nerf optique G", "OpticNrv_L"), ("Chiasma", "OpticChiasm"),
    ("PTV70", "PTV_70"), ("PTV_70Gy", "PTV_70"), ("ptv 7000", "PTV_70"), ("PTV_56", "PTV_56"),
    ("PTV 54.25", "PTV_54.25"), ("CTV_7000cGy", "CTV_70"), ("GTVp", "GTVp"), ("PTVn_56", "PTVn_56"),
])
def test_names_match_tg263(name, standard):
    assert match_name(name).standard == standard


def test_target_dose_levels_and_laterality_are_reported():
    m = match_name("PTV 7000")
    assert m.is_target and m.dose_gy == 70.0 and m.how == "target"
    m = match_name("Parotide_G")
    assert m.laterality == "L" and m.how == "synonym"


@pytest.mark.parametrize("name", ["Tumor Bed", "Areola", "Cube101010", "LoPo", "Scar", "xyz_G"])
def test_unknown_names_are_returned_not_dropped(name):
    m = match_name(name)
    assert m.standard is None and m.how == "unknown" and m.name == name
