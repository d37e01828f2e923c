"""Synthetic outcomes: the planted signal that models are trained and tested against (the "oracle").

Models (doses in Gy or Gy(RBE), probabilities in [0, 1]); parameters in ``MODELS`` (also written to
ground_truth.json):
- xerostomia (salivary flow < 25 % of baseline at 1 year), a mixture of two mechanisms,
  p = (1 - lambda) p_mean + lambda p_stem, lambda = 0.5 (the planted share, illustrative):
  * p_mean: LKB on the mean dose to both parotids, TD50 = 39.9 Gy, m = 0.40, n = 1 (Dijkema et al., IJROBP
    2010;78:449, combined Michigan-Utrecht parotid data);
  * p_stem: logistic on the mean dose to the parotid stem-cell regions (both glands), D50 = 35 Gy, gamma50 =
    2.0 (illustrative; the mechanism follows van Luijk et al., Sci Transl Med 2015;7:305ra147, where dose to
    the region containing the stem/progenitor cells, not the whole-gland mean, predicted saliva loss). This is
    the spatial mechanism a whole-organ DVH model cannot see.
- dysphagia (physician-rated swallowing dysfunction at 6 months): logistic, S = -6.09 + 0.057
  Dmean(Musc_Constrict_S) + 0.037 Dmean(Larynx_SG), p = 1 / (1 + exp(-S)) (Christianen et al., Radiother
  Oncol 2012;105:107);

What was checked against published text (issue 7; stored copies of public pages, no paywalled full text):
- Dijkema 2010, verified against the PubMed abstract (PMID 20056347; Int J Radiat Oncol Biol Phys 2010 Oct 1;
  78(2):449-53): "Combined NTCP analysis based on mean dose resulted in a TD(50) ... of 39.9 Gy and m ... of
  0.40"; complication = stimulated parotid flow ratio < 25 % of pretreatment 1 year after RT; LKB fit on 384
  glands. n = 1 is implied by "based on mean dose" (not stated as a number). Note: the published model is per
  GLAND (each gland's own mean dose and flow); applying it to the mean of both parotids as a patient-level
  endpoint is our adaptation.
- Christianen 2012: the three coefficients match a secondary source only (medicalalgorithms.com, "Models of
  Christianen et al for swallowing dysfunction ...": X = 0.057 * mean dose superior PCM + 0.037 * mean dose
  supraglottic larynx - 6.09, physician-rated swallowing dysfunction at 6 months, AUC 0.80). The paper itself
  (abstract or full text) was not found, so the volume/pages (105:107-114) and the endpoint's grading (RTOG
  grade >= 2, the primary endpoint of the same group's earlier model, Langendijk et al., Radiother Oncol
  2009;90:189-195) are NOT verified here.
- van Luijk 2015 (Sci Transl Med 7(305):305ra147, doi 10.1126/scitranslmed.aac4441), from the publisher's
  summary: "stem and progenitor cells reside in the region of the parotid gland containing the major ducts",
  and in patients the dose to that region predicted gland function one year after radiotherapy. The exact
  position we give the region (medial-anterior-cranial, ~5 % of the gland, anatomy.py) and D50 / gamma50 are
  NOT from the paper's text (not seen); they are illustrative.
- local control at 2 years: logistic TCP on a clonogen-weighted gEUD of CTV_70 (a = -10; weights 1 in the GTV,
  0.3 in the CTV margin, so that a cold spot costs more in the gross tumour than in the margin),
  TCD50 = 62 Gy x (GTV / 15 cc)^0.15, gamma50 = 2.5 (illustrative; about 80 % control at 70 Gy, in the range
  of 2-year local control after (chemo)radiotherapy for head-and-neck cancer).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from rtqa_node.synth import schema

STEM_SHARE = 0.5
MODELS = {
    "xerostomia": {
        "form": "p = (1 - lambda) * LKB(mean parotids) + lambda * logistic(mean stem-cell regions)",
        "lambda": STEM_SHARE,
        schema.MECHANISM_PAROTID_MEAN: {"td50_gy": 39.9, "m": 0.40, "n": 1.0,
                                        "citation": "Dijkema et al., Int J Radiat Oncol Biol Phys 2010;78:449-453 "
                                                    "(TD50 and m checked against the PubMed abstract; a per-gland "
                                                    "model, applied here to the mean of both glands)"},
        schema.MECHANISM_STEM_CELL_REGION: {"d50_gy": 35.0, "gamma50": 2.0, "illustrative": True,
                                            "citation": "mechanism after van Luijk et al., Sci Transl Med "
                                                        "2015;7:305ra147; parameters illustrative"},
    },
    "dysphagia": {
        "form": "p = 1 / (1 + exp(-S)), S = b0 + b_pcms * Dmean(Musc_Constrict_S) + b_sgl * Dmean(Larynx_SG)",
        schema.MECHANISM_DYSPHAGIA: {"b0": -6.09, "b_pcms_per_gy": 0.057, "b_sgl_per_gy": 0.037,
                                     "citation": "Christianen et al., Radiother Oncol 2012;105:107-114 "
                                                 "(coefficients checked against a secondary source only, "
                                                 "not the paper; see outcomes.py)"},
    },
    "local_control": {
        "form": "p = 1 / (1 + (TCD50 / gEUD)^(4 gamma50)), TCD50 = 62 Gy * (GTV / 15 cc)^0.15",
        schema.MECHANISM_TCP: {"tcd50_gy": 62.0, "volume_exponent": 0.15, "gamma50": 2.5, "eud_a": -10.0,
                               "weight_gtv": 1.0, "weight_ctv_margin": 0.3, "illustrative": True},
    },
}


def lkb_ntcp(mean_dose_gy: float, *, td50_gy: float, m: float) -> float:
    """Lyman-Kutcher-Burman NTCP with n = 1 (the gEUD is the mean dose)."""
    return float(norm.cdf((mean_dose_gy - td50_gy) / (m * td50_gy)))


def logistic_response(dose_gy: float, *, d50_gy: float, gamma50: float) -> float:
    """1 / (1 + (D50 / D)^(4 gamma50)): response probability with slope gamma50 at D50."""
    if dose_gy <= 0:
        return 0.0
    return 1.0 / (1.0 + (d50_gy / dose_gy) ** (4.0 * gamma50))


def xerostomia_ntcp(mean_parotids_gy: float) -> float:
    """The whole-gland (DVH) mechanism alone."""
    p = MODELS["xerostomia"][schema.MECHANISM_PAROTID_MEAN]
    return lkb_ntcp(mean_parotids_gy, td50_gy=p["td50_gy"], m=p["m"])


def stem_cell_ntcp(mean_stem_gy: float) -> float:
    """The planted spatial mechanism alone."""
    p = MODELS["xerostomia"][schema.MECHANISM_STEM_CELL_REGION]
    return logistic_response(mean_stem_gy, d50_gy=p["d50_gy"], gamma50=p["gamma50"])


def xerostomia_probability(mean_parotids_gy: float, mean_stem_gy: float) -> float:
    return (1.0 - STEM_SHARE) * xerostomia_ntcp(mean_parotids_gy) + STEM_SHARE * stem_cell_ntcp(mean_stem_gy)


def dysphagia_ntcp(mean_constrictor_s_gy: float, mean_supraglottic_gy: float) -> float:
    p = MODELS["dysphagia"][schema.MECHANISM_DYSPHAGIA]
    s = p["b0"] + p["b_pcms_per_gy"] * mean_constrictor_s_gy + p["b_sgl_per_gy"] * mean_supraglottic_gy
    return float(1.0 / (1.0 + np.exp(-s)))


def weighted_geud(dose_gy: np.ndarray, weights: np.ndarray, a: float) -> float:
    """(sum w D^a / sum w)^(1/a); a < 0 makes cold voxels dominate."""
    d = np.maximum(np.asarray(dose_gy, dtype=np.float64), 0.1)
    w = np.asarray(weights, dtype=np.float64)
    return float((np.sum(w * d**a) / np.sum(w)) ** (1.0 / a))


def local_control_tcp(eud_gy: float, gtv_volume_cc: float) -> float:
    p = MODELS["local_control"][schema.MECHANISM_TCP]
    tcd50 = p["tcd50_gy"] * (max(gtv_volume_cc, 0.5) / 15.0) ** p["volume_exponent"]
    return logistic_response(eud_gy, d50_gy=tcd50, gamma50=p["gamma50"])


def draw_outcomes(rng: np.random.Generator, *, mean_parotids_gy: float, mean_stem_gy: float,
                  mean_constrictor_s_gy: float, mean_supraglottic_gy: float, ctv70_eud_gy: float,
                  gtv_volume_cc: float) -> dict:
    """Oracle probabilities, one Bernoulli draw per endpoint (uniforms in a fixed order, so a draw is monotone
    in risk) and, for xerostomia, which mechanism caused an event (drawn from its posterior share)."""
    p_mean, p_stem = xerostomia_ntcp(mean_parotids_gy), stem_cell_ntcp(mean_stem_gy)
    p_xer = (1.0 - STEM_SHARE) * p_mean + STEM_SHARE * p_stem
    p_dys = dysphagia_ntcp(mean_constrictor_s_gy, mean_supraglottic_gy)
    p_lc = local_control_tcp(ctv70_eud_gy, gtv_volume_cc)
    oracle = {
        "xerostomia": {"probability": round(p_xer, 6), "model": MODELS["xerostomia"]["form"],
                       "components": {schema.MECHANISM_PAROTID_MEAN: round(p_mean, 6),
                                      schema.MECHANISM_STEM_CELL_REGION: round(p_stem, 6)}},
        "dysphagia": {"probability": round(p_dys, 6), "model": MODELS["dysphagia"]["form"],
                      "components": {schema.MECHANISM_DYSPHAGIA: round(p_dys, 6)}},
        "local_control": {"probability": round(p_lc, 6), "model": MODELS["local_control"]["form"],
                          "components": {schema.MECHANISM_TCP: round(p_lc, 6)}},
    }
    outcomes, mechanisms = {}, {}
    for name in schema.ENDPOINTS:
        u = float(rng.random())
        outcomes[name] = int(u < oracle[name]["probability"])
    u_cause = float(rng.random())
    share_stem = STEM_SHARE * p_stem / p_xer if p_xer > 0 else 0.0
    mechanisms["xerostomia"] = {
        "contributing": [schema.MECHANISM_PAROTID_MEAN, schema.MECHANISM_STEM_CELL_REGION],
        "stem_cell_share": round(share_stem, 6),
        "cause": (schema.MECHANISM_STEM_CELL_REGION if u_cause < share_stem else schema.MECHANISM_PAROTID_MEAN)
        if outcomes["xerostomia"] else None,
    }
    mechanisms["dysphagia"] = {"contributing": [schema.MECHANISM_DYSPHAGIA],
                               "cause": schema.MECHANISM_DYSPHAGIA if outcomes["dysphagia"] else None}
    mechanisms["local_control"] = {"contributing": [schema.MECHANISM_TCP], "cause": None}
    return {"oracle": oracle, "outcomes": outcomes, "mechanisms": mechanisms}
