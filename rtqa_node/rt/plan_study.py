"""A plan study as typed arrays: CT volume, structure set, plan and dose grids, loaded from DICOM files.

``load_plan_study(paths)`` reads a list of files (``load_folder`` searches a folder recursively). Files are read
with ``dcmread(force=True)`` because real exports come without preamble or file meta (PS3.10 7.1 makes both
mandatory; pydicom's own ``rtstruct.dcm`` has neither). The loader handles the traps listed in the SOURCES.md
files of ``../shared/data/rt``:

- Duplicate SOP Instance UIDs: byte-identical re-sends are read once; files that share a UID but differ in content
  (Nelms' AP and SI dose grids, pydicom's RTDOSE transfer-syntax variants, a lossy re-encoded CT slice) are kept
  apart by file path, never silently merged. Dose objects are therefore identified by ``(sop_instance_uid, file)``.
- Shared Series Instance UIDs: nothing here groups by series.
- 32-bit unsigned dose pixels: read as ``uint32`` (PixelRepresentation 0), scaled in float64 and stored as float32.
- GridFrameOffsetVector relative (first value 0, PS3.3 C.8.8.3.2) or absolute; a one-frame grid without
  NumberOfFrames whose offset vector still lists more frames (``rtdose_1frame.dcm``) uses the frames present.
- DoseUnits RELATIVE: loaded, but :meth:`DoseGrid.require_gy` refuses it for metrics in Gy.

Units: positions and spacings in mm (DICOM patient coordinates, LPS), dose in Gy (Gy(RBE) when DoseType is
EFFECTIVE), CT in HU.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from rtqa_node.errors import InputError
from rtqa_node.log import uid_ref
from rtqa_node.store.describe import frame_of_reference
from rtqa_node.store.encoding import EncodingError, check_dataset_encoding, read_part10_header

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
RT_ION_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.8"

_NOT_DICOM_SUFFIXES = {".md", ".csv", ".json", ".xz", ".txt", ".py", ".png", ".pdf", ".zip", ".gz"}


# -- geometry --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridGeometry:
    """A regular 3-D grid in patient coordinates (PS3.3 C.7.6.2.1.1).

    Voxel (k, j, i) (frame, row, column) lies at ``origin_mm + i*col_spacing*row_dir + j*row_spacing*col_dir
    + z_offsets_mm[k]*normal``. ``spacing_mm`` is (column spacing along x_dir, row spacing along y_dir,
    mean frame spacing); ``z_offsets_mm`` keeps the actual frame offsets (they may be non-uniform).
    """

    origin_mm: tuple[float, float, float]
    row_direction: tuple[float, float, float]  # direction of increasing column index (IOP[0:3])
    column_direction: tuple[float, float, float]  # direction of increasing row index (IOP[3:6])
    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]  # (frames, rows, columns)
    z_offsets_mm: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be 3 positive ints, got {self.shape}")
        if self.spacing_mm[0] <= 0 or self.spacing_mm[1] <= 0:
            raise ValueError(f"spacing_mm must be > 0, got {self.spacing_mm}")
        if len(self.z_offsets_mm) != self.shape[0]:
            raise ValueError(f"z_offsets_mm has {len(self.z_offsets_mm)} values for {self.shape[0]} frames")

    @property
    def normal(self) -> np.ndarray:
        return np.cross(np.asarray(self.row_direction), np.asarray(self.column_direction))

    @property
    def is_axial(self) -> bool:
        """Rows along +x, columns along +y (HFS-style identity orientation), within 1e-6."""
        return bool(np.allclose(self.row_direction, (1, 0, 0), atol=1e-6)
                    and np.allclose(self.column_direction, (0, 1, 0), atol=1e-6))

    @property
    def z_positions_mm(self) -> np.ndarray:
        """Frame positions along the normal, measured from the origin's position along it."""
        return float(np.dot(self.origin_mm, self.normal)) + np.asarray(self.z_offsets_mm, dtype=np.float64)

    def voxel_volume_mm3(self) -> float:
        return float(self.spacing_mm[0] * self.spacing_mm[1] * self.spacing_mm[2])

    def to_index(self, points_mm: np.ndarray) -> np.ndarray:
        """Patient coordinates (N, 3) -> fractional (frame, row, column) indices (N, 3); frames by the offsets."""
        p = np.asarray(points_mm, dtype=np.float64) - np.asarray(self.origin_mm)
        col = p @ np.asarray(self.row_direction) / self.spacing_mm[0]
        row = p @ np.asarray(self.column_direction) / self.spacing_mm[1]
        z = p @ self.normal
        offsets = np.asarray(self.z_offsets_mm, dtype=np.float64)
        if len(offsets) == 1:
            frame = (z - offsets[0]) / max(self.spacing_mm[2], 1e-9)
        else:
            frame = np.interp(z, offsets, np.arange(len(offsets)), left=np.nan, right=np.nan)
            # np.interp clamps; extrapolate linearly by the end spacing so that half a voxel outside is measurable
            lo, hi = z < offsets[0], z > offsets[-1]
            frame[lo] = (z[lo] - offsets[0]) / (offsets[1] - offsets[0])
            frame[hi] = len(offsets) - 1 + (z[hi] - offsets[-1]) / (offsets[-1] - offsets[-2])
        return np.stack([frame, row, col], axis=-1)


# -- CT ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CtVolume:
    """A CT series as a volume. Pixels are decoded on first access of :attr:`hu` (JPEG 2000 needs pylibjpeg)."""

    series_instance_uid: str
    frame_of_reference_uid: str | None
    geometry: GridGeometry
    files: tuple[Path, ...]  # one per frame, in frame order
    rescale: tuple[tuple[float, float], ...] = field(repr=False)  # (slope, intercept) per frame

    @functools.cached_property
    def hu(self) -> np.ndarray:
        """HU volume, float32 (frames, rows, columns)."""
        out = np.empty(self.geometry.shape, dtype=np.float32)
        for k, (path, (slope, intercept)) in enumerate(zip(self.files, self.rescale)):
            ds = pydicom.dcmread(path, force=True)
            try:
                pixels = ds.pixel_array
            except Exception as exc:  # a missing decoder plugin or corrupt fragments
                raise InputError(f"cannot decode CT pixels of {path.name}: {exc}") from exc
            out[k] = pixels.astype(np.float32) * slope + intercept
        return out


# -- structures -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contour:
    """One contour item: points (N, 3) in mm, patient coordinates; ``geometric_type`` per PS3.3 C.8.8.6."""

    points_mm: np.ndarray = field(repr=False)
    geometric_type: str

    @property
    def z_mm(self) -> float:
        return float(np.mean(self.points_mm[:, 2]))


@dataclass(frozen=True)
class Structure:
    roi_number: int
    name: str
    interpreted_type: str
    color_rgb: tuple[int, int, int] | None
    contours: tuple[Contour, ...] = field(repr=False)
    roi_volume_cc: float | None = None  # (3006,002C) as written by the TPS; '0' means "not computed" in practice

    @property
    def closed_planar(self) -> tuple[Contour, ...]:
        return tuple(c for c in self.contours if c.geometric_type == "CLOSED_PLANAR" and len(c.points_mm) >= 3)

    @property
    def has_volume(self) -> bool:
        return bool(self.closed_planar)

    def planes(self, tolerance_mm: float = 0.01) -> list[tuple[float, list[np.ndarray]]]:
        """Closed planar contours grouped by plane: [(z_mm, [(N, 2) xy arrays]), ...], z ascending."""
        items = sorted(((c.z_mm, c.points_mm[:, :2]) for c in self.closed_planar), key=lambda t: t[0])
        planes: list[tuple[float, list[np.ndarray]]] = []
        for z, xy in items:
            if planes and abs(z - planes[-1][0]) <= tolerance_mm:
                planes[-1][1].append(xy)
            else:
                planes.append((z, [xy]))
        return planes


@dataclass(frozen=True)
class StructureSet:
    sop_instance_uid: str
    file: Path
    frame_of_reference_uid: str | None
    label: str
    structures: tuple[Structure, ...]
    referenced_series_uids: tuple[str, ...] = ()

    def by_number(self, roi_number: int) -> Structure:
        for s in self.structures:
            if s.roi_number == roi_number:
                return s
        raise KeyError(f"no ROI number {roi_number} in structure set {uid_ref(self.sop_instance_uid)}")

    def by_name(self, name: str) -> Structure:
        for s in self.structures:
            if s.name == name:
                return s
        raise KeyError(f"no ROI named {name!r}")


# -- plan -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prescription:
    """One DoseReferenceSequence item (PS3.3 C.8.8.10)."""

    dose_reference_number: int
    structure_type: str  # SITE, VOLUME, COORDINATES, POINT
    dose_reference_type: str  # TARGET, ORGAN_AT_RISK
    description: str
    target_prescription_dose_gy: float | None
    delivery_maximum_dose_gy: float | None
    referenced_roi_number: int | None


@dataclass(frozen=True)
class Beam:
    beam_number: int
    beam_name: str
    beam_type: str  # STATIC, DYNAMIC
    radiation_type: str  # PHOTON, PROTON, ION, ELECTRON
    treatment_machine_name: str
    nominal_energy: float | None  # MV for photons, MeV for ions (first control point)
    gantry_angle_deg: float | None
    number_of_control_points: int
    is_ion: bool
    beam_dose_gy: float | None = None  # per fraction, from the fraction group
    beam_meterset: float | None = None


@dataclass(frozen=True)
class FractionGroup:
    fraction_group_number: int
    number_of_fractions_planned: int | None
    referenced_beam_numbers: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    sop_instance_uid: str
    file: Path
    is_ion_plan: bool
    label: str
    name: str
    approval_status: str
    frame_of_reference_uid: str | None
    prescriptions: tuple[Prescription, ...]
    fraction_groups: tuple[FractionGroup, ...]
    beams: tuple[Beam, ...]
    referenced_structure_set_uid: str | None

    @property
    def number_of_fractions(self) -> int | None:
        counts = [fg.number_of_fractions_planned for fg in self.fraction_groups if fg.number_of_fractions_planned]
        return sum(counts) if counts else None

    @property
    def radiation_types(self) -> tuple[str, ...]:
        return tuple(sorted({b.radiation_type for b in self.beams}))

    @property
    def machines(self) -> tuple[str, ...]:
        return tuple(sorted({b.treatment_machine_name for b in self.beams if b.treatment_machine_name}))

    @property
    def target_prescription_dose_gy(self) -> float | None:
        """The highest TargetPrescriptionDose among TARGET dose references that are not points (SITE/VOLUME)."""
        doses = [p.target_prescription_dose_gy for p in self.prescriptions
                 if p.target_prescription_dose_gy and p.dose_reference_type == "TARGET"
                 and p.structure_type not in ("COORDINATES", "POINT")]
        return max(doses) if doses else None


# -- dose -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DoseGrid:
    """An RTDOSE grid with the scaling applied. ``dose`` is float32 (frames, rows, columns) in ``dose_units``."""

    sop_instance_uid: str
    file: Path
    frame_of_reference_uid: str | None
    summation_type: str  # PLAN, MULTI_PLAN, FRACTION, BEAM, BRACHY, FRACTION_SESSION, ...
    dose_type: str  # PHYSICAL, EFFECTIVE, ERROR
    dose_units: str  # GY, RELATIVE
    geometry: GridGeometry
    dose: np.ndarray = field(repr=False)
    referenced_plan_uid: str | None = None
    referenced_beam_numbers: tuple[int, ...] = ()
    referenced_fraction_group_numbers: tuple[int, ...] = ()
    dvh_sequence: tuple["VendorDvh", ...] = field(default=(), repr=False)

    @property
    def unit_label(self) -> str:
        if self.dose_units != "GY":
            return self.dose_units.lower()
        return "Gy(RBE)" if self.dose_type == "EFFECTIVE" else "Gy"

    @property
    def max_gy(self) -> float:
        return float(self.dose.max()) if self.dose.size else 0.0

    def require_gy(self) -> None:
        """Raise InputError unless the grid holds absolute dose (GY); RELATIVE cannot give metrics in Gy."""
        if self.dose_units != "GY":
            raise InputError(
                f"dose object {uid_ref(self.sop_instance_uid)} ({self.file.name}) has DoseUnits "
                f"{self.dose_units!r}, not GY: dose metrics in Gy cannot be computed from relative dose")


@dataclass(frozen=True)
class VendorDvh:
    """One DVHSequence item as the TPS wrote it (PS3.3 C.8.8.4); curve only, summary values left out on purpose:
    Eclipse writes DVHMinimum/Maximum/MeanDose in percent of the prescription under DoseUnits GY."""

    referenced_roi_number: int
    dvh_type: str  # CUMULATIVE, DIFFERENTIAL, NATURAL
    dose_units: str
    volume_units: str
    bin_width_gy: np.ndarray = field(repr=False)
    volume: np.ndarray = field(repr=False)

    @property
    def bin_edges_gy(self) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(self.bin_width_gy)])


@dataclass(frozen=True)
class PlanStudy:
    ct: CtVolume | None
    structure_sets: tuple[StructureSet, ...]
    plans: tuple[Plan, ...]
    doses: tuple[DoseGrid, ...]
    skipped_files: tuple[tuple[Path, str], ...] = ()  # (file, reason) for non-RT or unreadable files

    @property
    def structure_set(self) -> StructureSet:
        if len(self.structure_sets) != 1:
            raise InputError(f"expected one RTSTRUCT, found {len(self.structure_sets)}")
        return self.structure_sets[0]

    @property
    def plan(self) -> Plan | None:
        if len(self.plans) > 1:
            raise InputError(f"expected at most one RTPLAN, found {len(self.plans)}")
        return self.plans[0] if self.plans else None

    def structure_set_for(self, dose: DoseGrid) -> StructureSet:
        """The structure set that belongs with a dose: via its plan's reference, else the one sharing its FoR."""
        if len(self.structure_sets) == 1:
            return self.structure_sets[0]
        plan = next((p for p in self.plans if p.sop_instance_uid == dose.referenced_plan_uid), None)
        if plan is not None:
            for ss in self.structure_sets:
                if ss.sop_instance_uid == plan.referenced_structure_set_uid:
                    return ss
        same_for = [ss for ss in self.structure_sets if ss.frame_of_reference_uid == dose.frame_of_reference_uid]
        if len(same_for) == 1:
            return same_for[0]
        raise InputError(f"cannot tell which of {len(self.structure_sets)} structure sets goes with dose "
                         f"{dose.file.name}")


# -- loading ----------------------------------------------------------------------------------------------------


def _f(value, default=None) -> float | None:
    try:
        return float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _i(value, default=None) -> int | None:
    try:
        return int(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


_CONTOUR_DATA = 0x30060050
_DVH_DATA = 0x30040058


def _ds_array(item: Dataset, tag: int, keyword: str) -> np.ndarray:
    """A multi-valued DS element as float64. The raw bytes are split and converted by numpy: pydicom's per-value
    DS validation took 0.6-1 s for the 264 k ContourData values of a clinical BODY, more than its DVH.

    Raises:
        InputError: a value that is not a decimal string.
    """
    elem = item.get_item(tag)
    raw = elem.value if elem is not None else None
    if isinstance(raw, bytes):
        text = raw.strip(b" \x00")
        try:
            return np.array(text.split(b"\\"), dtype=np.float64) if text else np.zeros(0)
        except ValueError as exc:
            raise InputError(f"{keyword} holds a value that is not a decimal string: {exc}") from exc
    return np.asarray(getattr(item, keyword), dtype=np.float64).ravel()


def _contour_points(item: Dataset) -> np.ndarray:
    """ContourData (N, 3) in mm."""
    return _ds_points(_ds_array(item, _CONTOUR_DATA, "ContourData"))


def _ds_points(contour_data) -> np.ndarray:
    pts = np.asarray(contour_data, dtype=np.float64).ravel()
    if len(pts) % 3:
        raise InputError(f"ContourData has {len(pts)} values, not a multiple of 3")
    return pts.reshape(-1, 3)


def _frame_of_reference(ds: Dataset) -> str | None:
    """As the store reads it (RTSTRUCTs without a top-level one use the referenced one), None when absent."""
    return frame_of_reference(ds) or None


def read_structure_set(ds: Dataset, path: Path) -> StructureSet:
    rois = {int(r.ROINumber): r for r in ds.get("StructureSetROISequence", [])}
    types = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "")
             for o in ds.get("RTROIObservationsSequence", []) if "ReferencedROINumber" in o}
    contours_by_roi: dict[int, tuple[tuple[int, int, int] | None, list[Contour]]] = {}
    for rc in ds.get("ROIContourSequence", []):
        number = int(rc.ReferencedROINumber)
        color = rc.get("ROIDisplayColor")
        color_rgb = tuple(int(v) for v in color) if color and len(color) == 3 else None
        items = []
        for c in rc.get("ContourSequence", []):
            if "ContourData" not in c:
                continue
            items.append(Contour(_contour_points(c), str(c.get("ContourGeometricType", "CLOSED_PLANAR"))))
        contours_by_roi[number] = (color_rgb, items)
    structures = []
    for number in sorted(set(rois) | set(contours_by_roi)):
        roi = rois.get(number)
        color, items = contours_by_roi.get(number, (None, []))
        volume = _f(roi.get("ROIVolume")) if roi is not None else None
        structures.append(Structure(
            roi_number=number,
            name=str(roi.ROIName) if roi is not None and "ROIName" in roi else f"ROI {number}",
            interpreted_type=types.get(number, ""),
            color_rgb=color,
            contours=tuple(items),
            roi_volume_cc=volume if volume else None,
        ))
    series = []
    for fr in ds.get("ReferencedFrameOfReferenceSequence", []):
        for st in fr.get("RTReferencedStudySequence", []):
            for se in st.get("RTReferencedSeriesSequence", []):
                series.append(str(se.SeriesInstanceUID))
    return StructureSet(str(ds.SOPInstanceUID), path, _frame_of_reference(ds),
                        str(ds.get("StructureSetLabel", "")), tuple(structures), tuple(series))


def read_plan(ds: Dataset, path: Path) -> Plan:
    is_ion = str(ds.SOPClassUID) == RT_ION_PLAN_STORAGE or "IonBeamSequence" in ds
    prescriptions = []
    for dr in ds.get("DoseReferenceSequence", []):
        prescriptions.append(Prescription(
            dose_reference_number=_i(dr.get("DoseReferenceNumber"), 0),
            structure_type=str(dr.get("DoseReferenceStructureType", "")),
            dose_reference_type=str(dr.get("DoseReferenceType", "")),
            description=str(dr.get("DoseReferenceDescription", "")),
            target_prescription_dose_gy=_f(dr.get("TargetPrescriptionDose")),
            delivery_maximum_dose_gy=_f(dr.get("DeliveryMaximumDose")),
            referenced_roi_number=_i(dr.get("ReferencedROINumber")),
        ))
    beam_dose: dict[int, tuple[float | None, float | None]] = {}
    groups = []
    for fg in ds.get("FractionGroupSequence", []):
        numbers = []
        for rb in fg.get("ReferencedBeamSequence", []):
            n = _i(rb.get("ReferencedBeamNumber"))
            if n is None:
                continue
            numbers.append(n)
            beam_dose[n] = (_f(rb.get("BeamDose")), _f(rb.get("BeamMeterset")))
        groups.append(FractionGroup(_i(fg.get("FractionGroupNumber"), 0), _i(fg.get("NumberOfFractionsPlanned")),
                                    tuple(numbers)))
    beams = []
    for b in ds.get("IonBeamSequence" if is_ion else "BeamSequence", []):
        cps = b.get("IonControlPointSequence" if is_ion else "ControlPointSequence", [])
        first = cps[0] if len(cps) else Dataset()
        number = _i(b.get("BeamNumber"), 0)
        dose, meterset = beam_dose.get(number, (None, None))
        beams.append(Beam(
            beam_number=number,
            beam_name=str(b.get("BeamName", "")),
            beam_type=str(b.get("BeamType", "")),
            radiation_type=str(b.get("RadiationType", "")),
            treatment_machine_name=str(b.get("TreatmentMachineName", "")),
            nominal_energy=_f(first.get("NominalBeamEnergy")),
            gantry_angle_deg=_f(first.get("GantryAngle")),
            number_of_control_points=len(cps),
            is_ion=is_ion,
            beam_dose_gy=dose,
            beam_meterset=meterset,
        ))
    rss = ds.get("ReferencedStructureSetSequence", [])
    return Plan(
        sop_instance_uid=str(ds.SOPInstanceUID), file=path, is_ion_plan=is_ion,
        label=str(ds.get("RTPlanLabel", "")), name=str(ds.get("RTPlanName", "")),
        approval_status=str(ds.get("ApprovalStatus", "")), frame_of_reference_uid=_frame_of_reference(ds),
        prescriptions=tuple(prescriptions), fraction_groups=tuple(groups), beams=tuple(beams),
        referenced_structure_set_uid=str(rss[0].ReferencedSOPInstanceUID) if len(rss) else None,
    )


def _read_vendor_dvhs(ds: Dataset) -> tuple[VendorDvh, ...]:
    out = []
    for item in ds.get("DVHSequence", []):
        refs = item.get("DVHReferencedROISequence", [])
        if not len(refs) or "DVHData" not in item:
            continue
        data = _ds_array(item, _DVH_DATA, "DVHData").reshape(-1, 2)
        scaling = _f(item.get("DVHDoseScaling"), 1.0)
        out.append(VendorDvh(int(refs[0].ReferencedROINumber), str(item.get("DVHType", "")),
                             str(item.get("DoseUnits", "")), str(item.get("DVHVolumeUnits", "")),
                             data[:, 0] * scaling, data[:, 1]))
    return tuple(out)


def read_dose(ds: Dataset, path: Path) -> DoseGrid:
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise InputError(f"cannot decode RTDOSE pixels of {path.name}: {exc}") from exc
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    # pydicom honours PixelRepresentation: 32-bit unsigned stays uint32 (Nelms' hottest voxels exceed 2**31-1).
    scaling = _f(ds.get("DoseGridScaling"), 1.0)
    dose = (pixels.astype(np.float64) * scaling).astype(np.float32)
    n_frames = dose.shape[0]
    offsets = [float(v) for v in (ds.get("GridFrameOffsetVector") or [0.0])]
    ipp = [float(v) for v in ds.ImagePositionPatient]
    iop = [float(v) for v in (ds.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0])]
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row_dir, col_dir)
    if len(offsets) != n_frames:
        log.warning("dose_frame_count_mismatch", extra={"sop": uid_ref(ds.SOPInstanceUID),
                                                        "frames": n_frames, "offsets": len(offsets)})
        if len(offsets) < n_frames:
            raise InputError(f"{path.name}: GridFrameOffsetVector lists {len(offsets)} offsets for {n_frames} frames")
        offsets = offsets[:n_frames]
    ipp_along_normal = float(np.dot(ipp, normal))
    if offsets[0] != 0.0:
        # Absolute offsets (allowed for axial grids, PS3.3 C.8.8.3.2): the first equals the IPP's z.
        if abs(offsets[0] - ipp_along_normal) > 1e-3:
            raise InputError(f"{path.name}: GridFrameOffsetVector starts at {offsets[0]} mm, neither 0 (relative) "
                             f"nor the first frame's position {ipp_along_normal:.3f} mm (absolute)")
        offsets = [o - offsets[0] for o in offsets]
    if np.any(np.diff(offsets) <= 0) and n_frames > 1:
        raise InputError(f"{path.name}: GridFrameOffsetVector is not strictly increasing")
    spacing = [float(v) for v in ds.PixelSpacing]  # (row spacing, column spacing)
    frame_spacing = float(np.mean(np.diff(offsets))) if n_frames > 1 else float(ds.get("SliceThickness") or 1.0)
    geometry = GridGeometry(
        origin_mm=tuple(ipp), row_direction=tuple(row_dir), column_direction=tuple(col_dir),
        spacing_mm=(spacing[1], spacing[0], frame_spacing), shape=tuple(dose.shape),
        z_offsets_mm=tuple(offsets),
    )
    plan_refs = ds.get("ReferencedRTPlanSequence", [])
    plan_uid = str(plan_refs[0].ReferencedSOPInstanceUID) if len(plan_refs) else None
    beams, groups = [], []
    for pr in plan_refs:
        for fg in pr.get("ReferencedFractionGroupSequence", []):
            if fg.get("ReferencedFractionGroupNumber") is not None:
                groups.append(int(fg.ReferencedFractionGroupNumber))
            for rb in fg.get("ReferencedBeamSequence", []):
                beams.append(int(rb.ReferencedBeamNumber))
    return DoseGrid(
        sop_instance_uid=str(ds.SOPInstanceUID), file=path, frame_of_reference_uid=_frame_of_reference(ds),
        summation_type=str(ds.get("DoseSummationType", "")).upper(), dose_type=str(ds.get("DoseType", "")).upper(),
        dose_units=str(ds.get("DoseUnits", "")).upper(), geometry=geometry, dose=dose,
        referenced_plan_uid=plan_uid, referenced_beam_numbers=tuple(beams),
        referenced_fraction_group_numbers=tuple(groups), dvh_sequence=_read_vendor_dvhs(ds),
    )


def _ct_volume(slices: list[tuple[Path, Dataset]]) -> CtVolume:
    """Stack CT slices (headers only) into a volume; one slice per position, sorted along the normal."""
    first = slices[0][1]
    iop = np.asarray([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    by_position: dict[float, tuple[Path, Dataset]] = {}
    for path, ds in slices:
        z = round(float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)), 3)
        if z in by_position:
            log.warning("ct_duplicate_position", extra={"series": uid_ref(ds.SeriesInstanceUID), "z_mm": z})
            continue
        by_position[z] = (path, ds)
    ordered = [by_position[z] for z in sorted(by_position)]
    zs = np.asarray(sorted(by_position))
    spacing = [float(v) for v in first.PixelSpacing]
    ipp0 = tuple(float(v) for v in ordered[0][1].ImagePositionPatient)
    dz = float(np.mean(np.diff(zs))) if len(zs) > 1 else float(first.get("SliceThickness") or 1.0)
    geometry = GridGeometry(origin_mm=ipp0, row_direction=tuple(iop[:3]), column_direction=tuple(iop[3:]),
                            spacing_mm=(spacing[1], spacing[0], dz),
                            shape=(len(ordered), int(first.Rows), int(first.Columns)),
                            z_offsets_mm=tuple(zs - zs[0]))
    rescale = tuple((_f(ds.get("RescaleSlope"), 1.0), _f(ds.get("RescaleIntercept"), 0.0)) for _, ds in ordered)
    return CtVolume(str(first.SeriesInstanceUID), _frame_of_reference(first), geometry,
                    tuple(p for p, _ in ordered), rescale)


def _digest_and_check(path: Path, *, check: bool) -> str:
    """SHA-256 of the file; with ``check``, for a Part 10 file (``DICM`` after the preamble), also the store's
    structural check (only objects that are read need it: an unused object is skipped whatever its bytes).

    pydicom reads lazily and forgives truncation (pydicom-rt-testfiles/rtplan_truncated.dcm, cut inside the
    control-point sequence, loads without error), so every length, sequence and item delimiter is checked here
    as on ingest. Files without the Part 10 header (real exports, PS3.10 7.1) have no transfer syntax to check
    against and are left to pydicom.

    Raises:
        InputError: a Part 10 file whose data set is malformed (naming the file, tag and byte offset).
    """
    data = path.read_bytes()
    if check and len(data) >= 132 and data[128:132] == b"DICM":
        try:
            header = read_part10_header(data)
            check_dataset_encoding(data, header.dataset_offset, header.transfer_syntax_uid)
        except EncodingError as exc:
            raise InputError(f"{path.name}: malformed DICOM file: {exc}") from exc
    return hashlib.sha256(data).hexdigest()


def dicom_files(folder: Path) -> list[Path]:
    """Candidate DICOM files below ``folder`` (recursive; any extension, none needed)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in _NOT_DICOM_SUFFIXES
                  and p.name != "SHA256SUMS" and not p.name.startswith("."))


def load_plan_study(paths: Iterable[Path]) -> PlanStudy:
    """Read DICOM files into a :class:`PlanStudy` (CT pixels are decoded lazily).

    The last study loaded is kept, keyed by every file's path, device, inode, size and modification time: the
    worker's review, predictions and report of one revision read the files once (0.12 s of 1.6 s per 80-slice
    study with predictions on this VM, three times before). A study is immutable (frozen dataclasses; nothing
    writes into its arrays), so sharing it is safe; a file replaced or touched gives a fresh load.

    Raises:
        InputError: no readable DICOM-RT object among ``paths``, or an object that cannot be used (e.g. a dose
            grid whose frame offsets do not match its frames), or a CT/RT object stored as a Part 10 file whose
            data set fails the store's structural check (truncated, bad length, missing delimiter).
    """
    files = sorted(Path(p) for p in paths)
    try:
        key = tuple((str(p), *_identity(p)) for p in files)
    except OSError:
        return _load_plan_study(files)  # a missing file: no key; the load reports it
    return _load_unchanged(key)


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def forget_loaded() -> None:
    """Drop the kept study (the worker calls this after each job, so an idle worker holds no CT in memory)."""
    _load_unchanged.cache_clear()


@functools.lru_cache(maxsize=1)
def _load_unchanged(key: tuple[tuple[str, int, int, int, int], ...]) -> PlanStudy:
    return _load_plan_study([Path(k[0]) for k in key])


def _load_plan_study(files: list[Path]) -> PlanStudy:
    seen_digests: dict[str, Path] = {}
    seen_uids: dict[str, Path] = {}
    cts: dict[str, list[tuple[Path, Dataset]]] = {}
    structure_sets, plans, doses, skipped = [], [], [], []
    for path in files:
        try:
            header = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            sop_class = str(header.get("SOPClassUID", ""))
            sop_uid = str(header.get("SOPInstanceUID", ""))
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
            skipped.append((path, f"unreadable: {type(exc).__name__}"))
            continue
        if not sop_class or not sop_uid:
            skipped.append((path, "not a DICOM object (no SOP Class / Instance UID)"))
            continue
        used = sop_class in (CT_IMAGE_STORAGE, RT_STRUCTURE_SET_STORAGE, RT_PLAN_STORAGE, RT_ION_PLAN_STORAGE,
                             RT_DOSE_STORAGE)
        digest = _digest_and_check(path, check=used)
        if digest in seen_digests:
            log.info("duplicate_file_skipped", extra={"sop": uid_ref(sop_uid)})
            continue
        seen_digests[digest] = path
        if sop_uid in seen_uids:
            # Same UID, different bytes: kept apart by file (Nelms AP/SI grids; lossy CT re-encodings).
            log.warning("duplicate_sop_instance_uid", extra={"sop": uid_ref(sop_uid), "sop_class": sop_class})
        seen_uids.setdefault(sop_uid, path)
        try:
            if sop_class == CT_IMAGE_STORAGE:
                cts.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
            elif sop_class == RT_STRUCTURE_SET_STORAGE:
                structure_sets.append(read_structure_set(header, path))
            elif sop_class in (RT_PLAN_STORAGE, RT_ION_PLAN_STORAGE):
                plans.append(read_plan(header, path))
            elif sop_class == RT_DOSE_STORAGE:
                doses.append(read_dose(pydicom.dcmread(path, force=True), path))
            else:
                skipped.append((path, f"SOP class {sop_class} not used here"))
        except InputError:
            raise
        except (AttributeError, KeyError, ValueError, TypeError, EOFError) as exc:
            raise InputError(f"{path.name}: malformed {header.get('Modality', 'DICOM')} object "
                             f"({type(exc).__name__}: {exc})") from exc
    if not (structure_sets or plans or doses or cts):
        raise InputError("no DICOM CT, RTSTRUCT, RTPLAN or RTDOSE object found")
    ct = None
    if cts:
        series = max(cts.values(), key=len)  # the series with the most slices
        if len(cts) > 1:
            log.warning("several_ct_series", extra={"series": len(cts)})
        ct = _ct_volume(series)
    log.info("plan_study_loaded", extra={"structure_sets": len(structure_sets), "plans": len(plans),
                                         "doses": len(doses), "ct_slices": ct.geometry.shape[0] if ct else 0})
    return PlanStudy(ct, tuple(structure_sets), tuple(plans), tuple(doses), tuple(skipped))


def load_folder(folder: Path) -> PlanStudy:
    """Load every DICOM file below ``folder`` (or one file). Raises InputError for a missing path."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder} does not exist")
    paths = [folder] if folder.is_file() else dicom_files(folder)
    if not paths:
        raise InputError(f"no files in {folder}")
    return load_plan_study(paths)


def plan_dose(study: PlanStudy, plan: Plan | None = None) -> DoseGrid:
    """The dose of the whole plan, counted once.

    A PLAN (or MULTI_PLAN) sum is used as it is when present. Otherwise the BEAM doses are summed, each beam once
    (a beam with two grids is an error), on the grid of the first beam dose when the grids agree. FRACTION doses of
    distinct fraction groups are summed likewise. Raises InputError when there is nothing to sum or grids differ.
    """
    doses = [d for d in study.doses if plan is None or d.referenced_plan_uid in (None, plan.sop_instance_uid)]
    if not doses:
        raise InputError("no RTDOSE in the plan study")
    plan_sums = [d for d in doses if d.summation_type in ("PLAN", "MULTI_PLAN")]
    if plan_sums:
        if len(plan_sums) > 1:
            log.warning("several_plan_doses", extra={"count": len(plan_sums)})
        return plan_sums[0]
    beams = [d for d in doses if d.summation_type == "BEAM"]
    if beams:
        return sum_doses(beams, key=lambda d: d.referenced_beam_numbers, what="beam")
    fractions = [d for d in doses if d.summation_type == "FRACTION"]
    if len(fractions) > 1:
        return sum_doses(fractions, key=lambda d: d.referenced_fraction_group_numbers, what="fraction group")
    return doses[0]


def sum_doses(doses: list[DoseGrid], *, key, what: str) -> DoseGrid:
    """Sum partial doses on one grid; each partial (beam, fraction group) once. Raises InputError on conflicts."""
    seen: dict[tuple, DoseGrid] = {}
    for d in doses:
        k = tuple(key(d))
        if k and k in seen:
            raise InputError(f"two dose objects for the same {what} {k}: {seen[k].file.name}, {d.file.name}")
        seen[k] = d
    first = doses[0]
    for d in doses[1:]:
        if d.geometry != first.geometry:
            raise InputError(f"{what} doses {first.file.name} and {d.file.name} lie on different grids")
        if d.dose_units != first.dose_units or d.dose_type != first.dose_type:
            raise InputError(f"{what} doses {first.file.name} and {d.file.name} differ in units or dose type")
    total = np.zeros(first.dose.shape, dtype=np.float64)
    for d in doses:
        total += d.dose
    return DoseGrid(
        sop_instance_uid=first.sop_instance_uid, file=first.file, frame_of_reference_uid=first.frame_of_reference_uid,
        summation_type="PLAN", dose_type=first.dose_type, dose_units=first.dose_units, geometry=first.geometry,
        dose=total.astype(np.float32), referenced_plan_uid=first.referenced_plan_uid,
        referenced_beam_numbers=tuple(sorted(b for d in doses for b in d.referenced_beam_numbers)),
    )
