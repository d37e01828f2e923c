"""Output kinds and their SOP classes: a light module, so dispatch can pick a destination's outputs without
importing highdicom or matplotlib."""

from __future__ import annotations

SR, RISKMAP_RTDOSE, PARAMETRIC_MAP, PDF = "sr", "riskmap_rtdose", "parametric_map", "pdf"
OUTPUT_KINDS = (SR, RISKMAP_RTDOSE, PARAMETRIC_MAP, PDF)
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
#: output kind by SOP Class UID (dispatch picks a destination's outputs from the outbox by SOP class)
KIND_BY_SOP_CLASS = {
    "1.2.840.10008.5.1.4.1.1.88.34": SR,  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.33": SR,  # Comprehensive SR (results written before report-1)
    RT_DOSE_STORAGE: RISKMAP_RTDOSE,
    PARAMETRIC_MAP_STORAGE: PARAMETRIC_MAP,
    ENCAPSULATED_PDF_STORAGE: PDF,
}
