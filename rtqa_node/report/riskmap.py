"""Risk maps: where in the patient the review sees risk, as objects every RT and radiology viewer can show.

Until the spatial MIL model (issue 9) provides an attention-derived map, the map is an explicit per-voxel
quantity, labelled as such everywhere it appears (:data:`OAR_EXCESS_QUANTITY`):

    r(x) = clip((D(x) - T_s) / T_s, 0, 1)  for x inside organ at risk s (occupancy >= 0.5), else 0,

with D the plan dose on the dose grid (Gy) and T_s the tightest upper dose limit that applies to s: the smallest
"<= X Gy" / "< X Gy" per-protocol limit among the review's constraints on s (TG-263 names resolved to the plan's
structures through ``review.metrics["names"]``; a limit on "A+B" applies to both), or, without a protocol, the
plan's own Organ at Risk Maximum Dose / Delivery Maximum Dose (RT Prescription module, PS3.3 C.8.8.10). Where
several organs overlap the larger value counts. 0 = at or below the limit, 1 = 100 % or more above it.

Two encodings, both on the plan's frame of reference and the dose grid, both referencing the plan study:

- :func:`riskmap_rtdose`: an RT Dose object (PS3.3 A.18), which every TPS and RT viewer overlays on the CT.
  Its unit is not dose: DoseUnits RELATIVE, DoseType ERROR (PS3.3 C.8.8.3.1: a difference from a desired
  dose), and DoseComment / SeriesDescription / ImageComments say so. 16-bit unsigned with DoseGridScaling 1e-4
  (dciodvfy aborts on 32-bit uncompressed RT Dose). It references the RTPLAN (RT Dose module).
- :func:`riskmap_parametric_map`: a Parametric Map (PS3.3 A.75, float32 pixels, highdicom) for radiology
  viewers, derived from the CT images (source image sequence), with a Real World Value Mapping that names the
  quantity and the unit "no units".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

import rtqa_node
from rtqa_node.errors import InputError
from rtqa_node.report import codes
from rtqa_node.report.header import result_dataset
from rtqa_node.review import Review
from rtqa_node.rt.geometry import rasterise_to_grid
from rtqa_node.rt.plan_study import RT_DOSE_STORAGE, GridGeometry, PlanStudy, Structure, plan_dose

OAR_EXCESS_QUANTITY = ("OAR dose excess over the tightest applicable limit, (D - T)/T clipped to [0, 1]; "
                       "not dose (no spatial model yet)")
RISKMAP_SERIES_NUMBER = 9902
PARAMETRIC_MAP_SERIES_NUMBER = 9903
DOSE_GRID_SCALING = 1e-4  # r in [0, 1] -> 0..10000
_UPPER_LIMIT = re.compile(r"^\s*(<=|<|≤)\s*([0-9]+(?:\.[0-9]*)?)\s*Gy\s*$")


@dataclass(frozen=True)
class RiskMap:
    """A per-voxel risk quantity on a grid of the plan's frame of reference.

    ``values``: float32 (frames, rows, columns) in [0, 1]; ``kind``: "oar_excess" (the interim quantity) or
    "attention" (a spatial model's); ``quantity``: what the values are, in words (written into the objects);
    ``limits_gy``: for "oar_excess", the organ -> limit pairs used.
    """

    values: np.ndarray
    geometry: GridGeometry
    frame_of_reference_uid: str
    quantity: str
    limits_gy: tuple[tuple[str, float], ...] = ()
    kind: str = "oar_excess"

    def __post_init__(self) -> None:
        if self.values.shape != self.geometry.shape:
            raise ValueError(f"values shape {self.values.shape} != grid shape {self.geometry.shape}")
        if self.values.size and (float(self.values.min()) < 0 or float(self.values.max()) > 1):
            raise ValueError("risk map values must lie in [0, 1]")
        if self.kind not in codes.RISK_MAP_QUANTITIES:
            raise ValueError(f"kind must be one of {sorted(codes.RISK_MAP_QUANTITIES)}, got {self.kind!r}")

    @property
    def caption(self) -> str:
        """One line for people (the summary page, the Parametric Map's LUT explanation)."""
        if self.kind == "attention":
            return "Risk map (not dose): spatial model attention, 0-1 of its maximum"
        return "Risk map (not dose): OAR dose excess over its tightest limit, 0-1"


def upper_limit_gy(text: str) -> float | None:
    """``"<= 45 Gy"`` -> 45.0; anything that is not an upper dose limit in Gy -> None."""
    match = _UPPER_LIMIT.match(text or "")
    return float(match.group(2)) if match else None


def applicable_limits_gy(review: Review, study: PlanStudy) -> dict[str, float]:
    """Tightest upper dose limit per organ: from the review's constraints, else the plan's OAR dose references."""
    limits: dict[str, float] = {}
    for c in review.constraints:
        limit = upper_limit_gy(c.per_protocol) if c.unit in ("Gy", "Gy(RBE)") else None
        if limit is not None and limit > 0:
            limits[c.structure] = min(limit, limits.get(c.structure, limit))
    if limits or not study.plans or not study.structure_sets:
        return limits
    plan_ds = pydicom.dcmread(study.plans[0].file, stop_before_pixels=True, force=True)
    names = {s.roi_number: s.name for s in study.structure_sets[0].structures}
    for item in plan_ds.get("DoseReferenceSequence", []):
        if str(item.get("DoseReferenceType", "")) != "ORGAN_AT_RISK" or "ReferencedROINumber" not in item:
            continue
        value = item.get("OrganAtRiskMaximumDose") or item.get("DeliveryMaximumDose")
        name = names.get(int(item.ReferencedROINumber))
        if value is not None and name is not None and float(value) > 0:
            limits[name] = min(float(value), limits.get(name, float(value)))
    return limits


def plan_structures(review: Review, structures: Sequence[Structure], name: str) -> list[Structure]:
    """The plan's structures a review names: constraints use TG-263 names (``Lung_L``), joined with "+" for
    combined organs (``Parotid_L+Parotid_R``); ``review.metrics["names"]`` maps each plan name to its TG-263
    name (rtqa_node/checks). A plan name that is itself the name given matches too."""
    standard = {plan_name: (m or {}).get("standard") for plan_name, m in review.metrics.get("names", {}).items()}
    wanted = set(name.split("+"))
    return [s for s in structures if s.has_volume and (s.name in wanted or standard.get(s.name) in wanted)]


def oar_excess_risk_map(review: Review, study: PlanStudy) -> RiskMap | None:
    """The interim risk map (module docstring). None when it does not apply: no dose in Gy, no structure set,
    no organ with an upper dose limit, or a non-axial dose grid."""
    if not study.doses or not study.structure_sets:
        return None
    try:
        dose = plan_dose(study)
        dose.require_gy()
    except InputError:
        return None
    if not dose.geometry.is_axial or not dose.frame_of_reference_uid:
        return None
    limits = applicable_limits_gy(review, study)
    structure_set = study.structure_set_for(dose)
    values = np.zeros(dose.geometry.shape, dtype=np.float32)
    used = []
    for name, limit_gy in sorted(limits.items()):
        structures = plan_structures(review, structure_set.structures, name)
        for structure in structures:
            inside = rasterise_to_grid(structure, dose.geometry) >= 0.5
            excess = np.clip((dose.dose - limit_gy) / limit_gy, 0.0, 1.0).astype(np.float32)
            np.maximum(values, np.where(inside, excess, 0.0), out=values)
        if structures:
            used.append((name, limit_gy))
    if not used:
        return None
    return RiskMap(values, dose.geometry, dose.frame_of_reference_uid, OAR_EXCESS_QUANTITY, tuple(used))


def attention_risk_map(attention: np.ndarray, study: PlanStudy, *, model: str, model_version: str) -> RiskMap:
    """A spatial model's voxel attention (``rtqa_node.ml.inference.MlResult.risk_map``: (Z, Y, X) on the plan
    dose grid, attention mass) as a risk map, normalised to its maximum. Use it instead of the interim map
    (``build_review_outputs(..., risk=...)``) once a spatial model has run.

    Raises:
        ValueError: the array is not on the plan dose's grid, or has negative values.
        InputError: the plan study has no dose.
    """
    dose = plan_dose(study)
    values = np.asarray(attention, dtype=np.float32)
    if values.shape != dose.geometry.shape:
        raise ValueError(f"attention shape {values.shape} != plan dose grid {dose.geometry.shape}")
    if values.size and float(values.min()) < 0:
        raise ValueError("attention must be >= 0")
    top = float(values.max()) if values.size else 0.0
    normalised = values / top if top > 0 else values
    quantity = (f"spatial MIL attention of {model} {model_version} (xerostomia branch), normalised to its "
                "maximum; not dose")
    return RiskMap(np.clip(normalised, 0.0, 1.0), dose.geometry, dose.frame_of_reference_uid or "", quantity,
                   kind="attention")


def _ds(value: float) -> str:
    return f"{value:.6g}"


def _first_frame_origin(g: GridGeometry) -> np.ndarray:
    return np.asarray(g.origin_mm, dtype=np.float64) + g.z_offsets_mm[0] * g.normal


def riskmap_rtdose(risk: RiskMap, plan: Dataset, *, sop_instance_uid: str,
                   series_instance_uid: str, instance_number: int) -> Dataset:
    """The risk map as an RT Dose object (module docstring).

    Parameters:
        plan: the reviewed RTPLAN's header (patient, study, SOP UIDs), referenced in ReferencedRTPlanSequence.
        The RTSTRUCT is not referenced: ReferencedStructureSetSequence would make the RT DVH module (and a DVH
        of a quantity that is not dose) mandatory.
    """
    g = risk.geometry
    ds = result_dataset(plan, sop_class_uid=RT_DOSE_STORAGE, sop_instance_uid=sop_instance_uid, modality="RTDOSE",
                        series_instance_uid=series_instance_uid, series_number=RISKMAP_SERIES_NUMBER,
                        series_description="RTQA risk map - NOT DOSE (relative, 0-1)",
                        instance_number=instance_number)
    ds.OperatorsName = ""
    ds.ManufacturerModelName = "rtqa-node plan review"
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.FrameOfReferenceUID = risk.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    origin = _first_frame_origin(g)
    offsets = np.asarray(g.z_offsets_mm, dtype=np.float64) - g.z_offsets_mm[0]
    ds.ImagePositionPatient = [_ds(v) for v in origin]
    ds.ImageOrientationPatient = [_ds(v) for v in (*g.row_direction, *g.column_direction)]
    ds.PixelSpacing = [_ds(g.spacing_mm[1]), _ds(g.spacing_mm[0])]  # row spacing \ column spacing
    ds.SliceThickness = _ds(g.spacing_mm[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = g.shape[0]
    ds.FrameIncrementPointer = (0x3004, 0x000C)
    ds.Rows, ds.Columns = g.shape[1], g.shape[2]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.DoseUnits = "RELATIVE"
    ds.DoseType = "ERROR"
    ds.DoseComment = "RTQA RISK MAP - NOT DOSE: relative, 0-1"  # LO, 64 characters at most
    limits = ", ".join(f"{n} {v:g} Gy" for n, v in risk.limits_gy)
    ds.ImageComments = ("RTQA risk map, not dose. " + risk.quantity + (f". Limits: {limits}" if limits else ""))[:10240]
    ds.DoseSummationType = "PLAN"
    ds.GridFrameOffsetVector = [_ds(v) for v in offsets]
    ds.DoseGridScaling = _ds(DOSE_GRID_SCALING)
    plan_ref = Dataset()
    plan_ref.ReferencedSOPClassUID = plan.SOPClassUID
    plan_ref.ReferencedSOPInstanceUID = plan.SOPInstanceUID
    ds.ReferencedRTPlanSequence = DicomSequence([plan_ref])
    pixels = np.rint(risk.values / DOSE_GRID_SCALING).astype("<u2")
    ds.PixelData = pixels.tobytes()
    return ds


def riskmap_parametric_map(risk: RiskMap, source_images: Sequence[Dataset], *, sop_instance_uid: str,
                           series_instance_uid: str, instance_number: int) -> hd.pm.ParametricMap:
    """The risk map as a float Parametric Map on the risk map's grid, derived from the CT (``source_images``:
    the CT headers, same frame of reference).

    Raises:
        ValueError: no source image, or the images are on another frame of reference.
    """
    if not source_images:
        raise ValueError('Argument "source_images" is empty: a Parametric Map is derived from the CT')
    if any(str(s.get("FrameOfReferenceUID", "")) != risk.frame_of_reference_uid for s in source_images):
        raise ValueError("source images are not on the risk map's frame of reference")
    g = risk.geometry
    origin = _first_frame_origin(g)
    offsets = np.asarray(g.z_offsets_mm, dtype=np.float64) - g.z_offsets_mm[0]
    thickness = float(np.median(np.diff(offsets))) if len(offsets) > 1 else float(g.spacing_mm[2])
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="RTQA_RISK",
        lut_explanation=risk.caption[:64],
        unit=codes.unit("1"),
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=codes.RISK_MAP_QUANTITIES[risk.kind],
    )
    pm = hd.pm.ParametricMap(
        source_images=list(source_images),
        pixel_array=np.ascontiguousarray(risk.values, dtype=np.float32),
        series_instance_uid=series_instance_uid,
        series_number=PARAMETRIC_MAP_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer="rtqa-node",
        manufacturer_model_name="rtqa-node plan review",
        software_versions=rtqa_node.__version__,
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_description=risk.quantity[:64],
        content_label="RTQA_RISK",
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=(g.spacing_mm[1], g.spacing_mm[0]),
                                                slice_thickness=thickness),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system="PATIENT", image_orientation=(*g.row_direction, *g.column_direction)),
        plane_positions=[hd.PlanePositionSequence(coordinate_system="PATIENT",
                                                  image_position=tuple(origin + dz * g.normal))
                         for dz in offsets],
        series_description="RTQA risk map (parametric, not dose)",
    )
    # General Series: Laterality is Type 2C for paired body parts (PS3.3 C.7.3.1); a map of the whole
    # head and neck has none, so it is present and empty (dciodvfy cannot evaluate the condition otherwise)
    pm.Laterality = ""
    return pm
