"""The ground-truth contract of a synthetic cohort (schema version 2): the names other stages (ml/, checks/,
report/) code against. Documented in docs/architecture.md, "Synthetic cohort"; this module holds the names
so that a rename is one edit and a test.

Files in the output folder:
- ``ground_truth.json``: ``{"schema_version": "2", "generator", "generator_version", "config", "protocol",
  "models", "sites", "reviewers", "patients": [PATIENT, ...]}``;
- ``cohort.csv``: one flat row per patient (``CSV_COLUMNS`` in cohort.py; reviewer columns
  ``reviewer_1..reviewer_R`` and ``consensus``);
- ``subregions/HNnnn.npz``: the planted parotid stem-cell sub-region masks of patient HNnnn (arrays below);
- ``HNnnn/``: CT*.dcm, RS.dcm, RP.dcm (RTPLAN or RT Ion Plan), RD.dcm.

PATIENT keys (``PATIENT_KEYS``): see the constants below; probabilities in [0, 1], outcomes 0/1.
"""

from __future__ import annotations

SCHEMA_VERSION = "2"
GROUND_TRUTH_NAME = "ground_truth.json"
COHORT_CSV_NAME = "cohort.csv"
SUBREGION_FOLDER = "subregions"

ENDPOINTS = ("xerostomia", "dysphagia", "local_control")
MODALITIES = ("photon", "proton", "carbon")
TUMOUR_SITES = ("oropharynx", "larynx", "oral_cavity", "hypopharynx")
PERIODS = ("before_guideline", "after_guideline")
VERDICTS = ("per_protocol", "minor", "major")

# Mechanism names in PATIENT["mechanisms"][endpoint] and PATIENT["oracle"][endpoint]["components"].
MECHANISM_PAROTID_MEAN = "parotid_mean_lkb"
MECHANISM_STEM_CELL_REGION = "parotid_stem_cell_region"
MECHANISM_DYSPHAGIA = "constrictor_s_supraglottic_logistic"
MECHANISM_TCP = "ctv70_eud_logistic_tcp"

# Planted error codes (PATIENT["planted_errors"][i]["code"]); severity "minor" | "major".
ERROR_CODES = (
    "wrong_prescription",  # RTPLAN target prescription not the protocol's (dose scaled to match)
    "fractionation",  # number of fractions not the protocol's
    "missing_oar",  # a required OAR absent from the RTSTRUCT (detail: which)
    "swapped_laterality",  # Parotid_L/Parotid_R (and submandibulars) labels swapped in the RTSTRUCT
    "ctv70_cold_spot",  # a cold spot inside CTV_70 (detail: location gtv|ctv_margin, depth)
    "cord_overdose",  # SpinalCord Dmax above the protocol limit
    "brainstem_overdose",  # Brainstem Dmax above the protocol limit
    "dose_grid_truncated",  # the RTDOSE grid does not cover a target (slices cut)
    "frame_of_reference_mismatch",  # RTDOSE in another Frame of Reference than CT/RTSTRUCT/RTPLAN
    "ptv70_underdose",  # protocol deviation: PTV_70 D95 below the acceptable (minor) or the minor limit (major)
    "oar_constraint",  # protocol deviation: a parotid mean above the protocol's objective
)

# PATIENT keys, in the order written.
PATIENT_KEYS = (
    "folder",  # "HN001"
    "patient_id",  # synthetic, no PHI
    "site_id",  # "SITE01"
    "period",  # PERIODS
    "modality",  # MODALITIES
    "dose_type",  # "PHYSICAL" (photon) | "EFFECTIVE" (proton, carbon: Gy(RBE))
    "tumour",  # {"site": TUMOUR_SITES, "laterality": "L"|"R", "gtv_volume_cc", "nodal_stage_positive": bool}
    "uids",  # study, frame of reference, series and SOP instance UIDs of CT/RTSTRUCT/RTPLAN/RTDOSE
    "files",  # {"ct": [...], "rtstruct": ["RS.dcm"], "rtplan": ["RP.dcm"], "rtdose": ["RD.dcm"]}
    "anatomy",  # size factor, neck length, shoulder height, contouring style applied
    "plan",  # fractions, prescriptions, beams, effort, dose grid scaling, rbe model (ions)
    "intent",  # what the simulated planner aimed for (PTV_70 D95, cord/brainstem max, parotid means)
    "organs",  # TG-263 name -> {volume_cc, points, mean_gy, min_gy, max_gy, d98_gy, d95_gy, d50_gy, d2_gy}
    "outcome_doses",  # the outcome models' inputs on the true anatomy: mean_parotids_gy, mean_stem_cell_regions_gy,
    #                   stem_cell_region_mean_gy {L, R}, mean_constrictor_s_gy, mean_supraglottic_gy,
    #                   ctv70_weighted_eud_gy, gross_tumour_volume_cc
    "planted_errors",  # [{"code": ERROR_CODES, "severity": "minor"|"major", "detail": {...}}]
    "deviations",  # graded from the realised plan: [{"code", "severity", "value", "limit", "message"}]
    "true_verdict",  # VERDICTS: the most severe planted error, per_protocol when none
    "reviews",  # {"reviewers": [{"reviewer_id": "R1", "verdict", "codes": [...]}], "consensus", "consensus_rule"};
    #             a reviewer's codes are ERROR_CODES or "other" (a false alarm)
    "oracle",  # endpoint -> {"probability", "components": {mechanism: probability}, "model"}
    "outcomes",  # endpoint -> 0 | 1 (one Bernoulli draw from the oracle probability)
    "mechanisms",  # endpoint -> {"contributing": [mechanism, ...], "cause": mechanism | None (who caused the event)};
    #                xerostomia also "stem_cell_share" (the stem-cell mechanism's share of the oracle probability)
    "subregion",  # {"path": "subregions/HN001.npz", "format": "npz", "labels": {"1": "Parotid_L", "2": "Parotid_R"},
    #               "arrays": {"mask_ct": ..., "mask_dose": ...}, "geometry": {"ct": GRID, "dose": GRID},
    #               "frame_of_reference_uid", "volume_cc": {"Parotid_L", "Parotid_R"},
    #               "mean_gy": {"Parotid_L", "Parotid_R"}}
    #   GRID = {"shape": [slices, rows, columns], "origin_mm": [x, y, z] of voxel (0, 0, 0),
    #           "spacing_mm": [dz, dy, dx]}; arrays uint8 (slices, rows, columns), 0 outside, 1/2 inside.
)
