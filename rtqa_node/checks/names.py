"""Structure names to TG-263 standard names (AAPM Report 263, Mayo et al., Int J Radiat Oncol Biol Phys
2018;100:1057-1066).

Matching, in order: the name as written is a TG-263 name (case-insensitive) -> a target name (GTV/CTV/ITV/PTV
with an optional qualifier and dose level) -> an organ synonym after normalisation. Normalisation: lower case,
accents dropped, ``_ - . , /`` and spaces as separators, laterality taken out wherever it stands (``L R Lt Rt
Left Right Gauche Droit(e)`` and ``G D`` as French centres write them, e.g. ``Parotide_G``), a PRV margin
(``PRV``, ``PRV5``, ``PRV05``) kept. Paired organs get TG-263's ``_L``/``_R`` suffix.

Target dose levels are normalised to Gy: ``PTV70``, ``PTV_70Gy``, ``PTV 7000`` (cGy: values >= 1000),
``PTV_70.0`` -> ``PTV_70``; ``PTV_54.25`` keeps its decimals. TG-263 allows either cGy without unit or Gy with a
decimal point; this project writes Gy without unit, as the synthetic cohort and GORTEC protocols do.

A name that matches nothing is returned with ``standard=None``: the caller reports it (never drops it).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

#: TG-263 base name -> (is paired, synonyms after normalisation: lower case, single spaces, laterality removed)
_ORGANS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "External": (False, ("external", "body", "outline", "skin", "ext", "contour externe", "patient", "peau",
                         "contour", "corps", "body contour")),
    "SpinalCord": (False, ("spinalcord", "spinal cord", "cord", "moelle", "moelle epiniere", "medulla spinalis",
                           "sc", "myelon")),
    "SpinalCanal": (False, ("spinalcanal", "spinal canal", "canal medullaire", "canal rachidien")),
    "Brainstem": (False, ("brainstem", "brain stem", "tronc cerebral", "tronc", "truncus cerebri", "bs")),
    "Brain": (False, ("brain", "cerveau", "encephale")),
    "Parotid": (True, ("parotid", "parotids", "parotid gland", "parotide", "glande parotide", "parotis", "par")),
    "Glnd_Submand": (True, ("glnd submand", "glnd_submand", "submandibular", "submandibular gland", "submand",
                            "smg", "sous mandibulaire", "glande sous mandibulaire", "glande submandibulaire")),
    "Glnd_Thyroid": (False, ("glnd thyroid", "thyroid", "thyroide", "thyroid gland")),
    "Larynx": (False, ("larynx", "larynx glottic")),
    "Larynx_SG": (False, ("larynx sg", "supraglottic larynx", "larynx supraglottic", "supraglottis",
                          "larynx supraglottique")),
    "Glottis": (False, ("glottis", "glotte")),
    "Musc_Constrict_S": (False, ("musc constrict s", "superior constrictor", "constricteur superieur", "spcm")),
    "Musc_Constrict_M": (False, ("musc constrict m", "middle constrictor", "constricteur moyen", "mpcm")),
    "Musc_Constrict_I": (False, ("musc constrict i", "inferior constrictor", "constricteur inferieur", "ipcm")),
    "Musc_Constrict": (False, ("musc constrict", "constrictors", "constrictor", "pharyngeal constrictors",
                               "pharyngeal constrictor", "pcm", "constricteurs", "constricteurs pharynges",
                               "muscles constricteurs")),
    "Cavity_Oral": (False, ("cavity oral", "oral cavity", "oralcavity", "cavite buccale", "cavite orale",
                            "bouche")),
    "Bone_Mandible": (False, ("bone mandible", "mandible", "mandibule", "mandibula", "mand")),
    "Lips": (False, ("lips", "levres", "lip")),
    "Esophagus": (False, ("esophagus", "oesophagus", "oesophage", "esophage")),
    "Esophagus_Cerv": (False, ("esophagus cerv", "cervical esophagus", "oesophage cervical")),
    "OpticNrv": (True, ("opticnrv", "optic nrv", "optic nerve", "nerf optique", "no")),
    "OpticChiasm": (False, ("opticchiasm", "optic chiasm", "chiasm", "chiasma")),
    "Cochlea": (True, ("cochlea", "cochlee", "oreille interne", "inner ear")),
    "Eye": (True, ("eye", "globe", "oeil", "globe oculaire")),
    "Lens": (True, ("lens", "cristallin")),
    "Pituitary": (False, ("pituitary", "hypophyse")),
    "BrachialPlex": (True, ("brachialplex", "brachial plexus", "brachial plex", "plexus brachial", "bp")),
    "Glnd_Lacrimal": (True, ("glnd lacrimal", "lacrimal gland", "glande lacrymale")),
    "Lobe_Temporal": (True, ("lobe temporal", "temporal lobe", "lobe temporal", "temporal")),
    "Lung": (True, ("lung", "poumon")),
    "Lungs": (False, ("lungs", "both lungs", "poumons", "lung total", "total lung", "lungs total")),
    "Heart": (False, ("heart", "coeur", "cor")),
    "Breast": (True, ("breast", "sein")),
    "Liver": (False, ("liver", "foie")),
    "Kidney": (True, ("kidney", "rein")),
    "Bladder": (False, ("bladder", "vessie")),
    "Rectum": (False, ("rectum",)),
}

_LEFT = {"l", "lt", "left", "g", "gauche", "gche", "links", "sin"}
_RIGHT = {"r", "rt", "right", "d", "droit", "droite", "dte", "rechts", "dx"}
_SINGLE_LETTER = {"l", "r", "g", "d"}

_TARGET = re.compile(
    r"^(?P<kind>gtv|ctv|itv|ptv)(?P<qual>[a-z]*?)[ ]?(?P<dose>\d+(?:[.,]\d+)?)?[ ]?(?P<unit>gy|cgy)?$")
_PRV = re.compile(r"\bprv ?(\d{1,2})?\b")

_STANDARD_BY_LOWER: dict[str, str] = {}
for _base, (_paired, _syns) in _ORGANS.items():
    if _paired:
        _STANDARD_BY_LOWER[f"{_base}_L".lower()] = f"{_base}_L"
        _STANDARD_BY_LOWER[f"{_base}_R".lower()] = f"{_base}_R"
    else:
        _STANDARD_BY_LOWER[_base.lower()] = _base
_SYNONYMS: dict[str, str] = {}
for _base, (_paired, _syns) in _ORGANS.items():
    for _s in (_base.lower().replace("_", " "), *_syns):
        _SYNONYMS.setdefault(_s, _base)
        _SYNONYMS.setdefault(_s.replace(" ", ""), _base)


@dataclass(frozen=True)
class NameMatch:
    """How one structure name was understood.

    ``standard`` is the TG-263 name (``Parotid_L``, ``PTV_70``) or None when nothing matched; ``how`` is
    ``exact``, ``target``, ``synonym`` or ``unknown``; ``laterality`` ``L``/``R``/None; ``dose_gy`` the target
    dose level if the name carries one.
    """

    name: str
    standard: str | None
    how: str
    laterality: str | None = None
    dose_gy: float | None = None

    @property
    def is_target(self) -> bool:
        return self.standard is not None and self.standard[:3] in ("GTV", "CTV", "ITV", "PTV")


def _normalise(name: str) -> str:
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[_\-.,/()\[\]+]+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _dose_text(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


def match_name(name: str) -> NameMatch:
    """Match one structure name to TG-263 (see the module docstring for the rules)."""
    raw = name.strip()
    exact = _STANDARD_BY_LOWER.get(raw.lower())
    if exact is not None:
        side = exact[-1] if exact.endswith(("_L", "_R")) else None
        return NameMatch(name, exact, "exact", side)
    norm = _normalise(raw)
    # targets: keep '.' for the dose (PTV_54.25): normalise without turning the decimal point into a separator
    target_text = re.sub(r"(?<=\d)[.,](?=\d)", "#", unicodedata.normalize("NFKD", raw).lower())
    target_text = re.sub(r"[_\-\s]+", " ", target_text).replace("#", ".").strip()
    m = _TARGET.match(target_text) or _TARGET.match(target_text.replace(" ", ""))
    if m:
        kind = m.group("kind").upper()
        qual = m.group("qual")
        dose = float(m.group("dose").replace(",", ".")) if m.group("dose") else None
        if dose is not None and (m.group("unit") == "cgy" or (m.group("unit") is None and dose >= 1000)):
            dose = dose / 100.0
        standard = kind + (qual.lower() if qual in ("n", "p") else ("_" + qual.capitalize() if qual else ""))
        if dose is not None:
            standard += f"_{_dose_text(round(dose, 2))}"
        return NameMatch(name, standard, "target", None, dose)
    tokens = norm.split(" ")
    prv = _PRV.search(norm)
    prv_suffix = None
    if prv:
        prv_suffix = f"_PRV{int(prv.group(1)):02d}" if prv.group(1) else "_PRV"
        tokens = _normalise(_PRV.sub(" ", norm)).split(" ")
    side = None
    rest = []
    for tok in tokens:
        if tok in _LEFT or tok in _RIGHT:
            side = "L" if tok in _LEFT else "R"
            continue
        # glued laterality: "parotidl" is too ambiguous; "lparotid"/"rparotid" and "parotid_lt" are handled above
        rest.append(tok)
    base_text = " ".join(t for t in rest if t)
    base = _SYNONYMS.get(base_text) or _SYNONYMS.get(base_text.replace(" ", ""))
    if base is None and len(rest) == 1 and len(rest[0]) > 2 and rest[0][0] in "lr" and side is None:
        base = _SYNONYMS.get(rest[0][1:])  # LParotid, RLung
        if base is not None:
            side = "L" if rest[0][0] == "l" else "R"
    if base is None:
        return NameMatch(name, None, "unknown", side)
    paired = _ORGANS[base][0]
    if not paired:
        if side is not None and len(base_text) <= 2:
            return NameMatch(name, None, "unknown", side)
        standard = base
        side_out = None
    elif side is None:
        standard = base  # a paired organ without side (e.g. "Breast"): the TG-263 base name, side unknown
        side_out = None
    else:
        standard = f"{base}_{side}"
        side_out = side
    if prv_suffix:
        standard += prv_suffix
    return NameMatch(name, standard, "synonym", side_out)


def match_names(names: list[str]) -> dict[str, NameMatch]:
    """Match every name; two structures mapping to the same standard name keep both matches (the caller
    uses the first and reports the duplicate)."""
    return {n: match_name(n) for n in names}
