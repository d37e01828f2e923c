"""An analytic IMRT-like dose on a grid twice as coarse as the CT in-plane (same slices), and its RTDOSE
(PS3.3 A.18, PLAN sum, PHYSICAL, GY, 16-bit with Dose Grid Scaling, with an RT DVH module).

The model is not a dose calculation; it reproduces what DVH-based review sees in a real simultaneous
integrated boost plan: near-uniform dose in each PTV, a penumbra-like fall-off outside it, a low-dose bath,
and organ sparing that the "planner" dials per patient. For a distance d (mm, > 0 outside) from a PTV with
prescription R,

    D(d) = R * [(1 - b) * erfc((d - delta) / (sqrt(2) sigma)) / 2 + b * exp(-max(d, 0) / L)]

(sigma 4 mm, delta 1.8 sigma: the PTV surface receives about 96 %), the maximum over PTV_70 and PTV_56, times
(1 + 1.2 % smooth noise), normalised so that PTV_70 D95 equals the intended value. Sparing scales the dose by
(1 - s w) where w is about 1 in and a few mm around an organ and about 0 within 3 mm of a PTV; s is solved per
organ so that its mean (parotids) or maximum (cord, brainstem) reaches the intended value where the geometry
allows it; a maximum above what the geometry gives (a planted cord overdose) is reached by adding a hot streak
a * w instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from scipy.ndimage import gaussian_filter
from scipy.special import erfc, expit

from rtqa_node.synth.anatomy import Phantom
from rtqa_node.synth.dcm import (
    RT_DOSE_STORAGE,
    RT_PLAN_STORAGE,
    RT_STRUCTURE_SET_STORAGE,
    StudyContext,
    base_dataset,
    ds_str,
    synth_uid,
)
from rtqa_node.synth.grid import Grid

PENUMBRA_SIGMA_MM = 4.0
PENUMBRA_SHIFT_MM = 1.8 * PENUMBRA_SIGMA_MM
GUARD_MM = 3.0  # no sparing this close to a PTV


@dataclass(frozen=True, slots=True)
class DoseIntent:
    """What the synthetic planner aims for; the realised values are measured afterwards."""

    ptv70_d95_gy: float
    ptv70_rx_gy: float
    ptv56_rx_gy: float
    parotid_mean_gy: dict[str, float]  # {"Parotid_L": ..., "Parotid_R": ...}
    cord_max_gy: float
    brainstem_max_gy: float
    constrictor_sparing: float  # 0..1
    low_dose_fraction: float  # b
    low_dose_length_mm: float  # L


def _profile(d_mm: np.ndarray, b: float, length_mm: float) -> np.ndarray:
    edge = 0.5 * erfc((d_mm - PENUMBRA_SHIFT_MM) / (np.sqrt(2.0) * PENUMBRA_SIGMA_MM))
    return (1.0 - b) * edge + b * np.exp(-np.clip(d_mm, 0.0, None) / length_mm)


def _points(grid: Grid):
    return grid.z_mm[:, None, None], grid.y_mm[None, :, None], grid.x_mm[None, None, :]


def _phi(shape, grid: Grid) -> np.ndarray:
    z, y, x = _points(grid)
    return np.broadcast_to(shape.phi(x, y, z), grid.shape).astype(np.float32)


def percentile_dose(dose_gy: np.ndarray, volume_pct: float) -> float:
    """D_v: the minimum dose to the hottest volume_pct % of the points (values are equal-volume voxels)."""
    if dose_gy.size == 0:
        return float("nan")
    return float(np.percentile(dose_gy, 100.0 - volume_pct))


def compute_dose(phantom: Phantom, grid: Grid, rng: np.random.Generator, intent: DoseIntent) -> np.ndarray:
    """Dose in Gy on ``grid``, float32 (slices, rows, columns)."""
    s = phantom.structures
    phi70 = _phi(s["PTV_70"].shape, grid)
    phi56 = _phi(s["PTV_56"].shape, grid)
    phi_body = _phi(s["External"].shape, grid)
    b, length = intent.low_dose_fraction, intent.low_dose_length_mm
    dose = np.maximum(intent.ptv70_rx_gy * _profile(phi70, b, length), intent.ptv56_rx_gy * _profile(phi56, b, length))
    noise = gaussian_filter(rng.standard_normal(grid.shape).astype(np.float32), sigma=(1.5, 4.0, 4.0))
    noise /= max(float(noise.std()), 1e-6)
    dose *= 1.0 + 0.012 * noise
    dose *= expit(-phi_body / 0.7)  # no dose in air
    in70 = phi70 < 0

    def normalise() -> None:
        nonlocal dose
        dose *= intent.ptv70_d95_gy / percentile_dose(dose[in70], 95.0)

    normalise()
    guard = expit((np.minimum(phi70, phi56) - GUARD_MM) / 1.5)

    def weight(name: str, ring_mm: float) -> tuple[np.ndarray, np.ndarray]:
        phi = _phi(s[name].shape, grid)
        return phi < 0, expit(-(phi - ring_mm) / 2.0) * guard

    for name, target in intent.parotid_mean_gy.items():
        inside, w = weight(name, 4.0)
        if not inside.any():
            continue
        d_in, dw_in = dose[inside], (dose * w)[inside]
        strength = np.clip((d_in.mean() - target) / max(dw_in.mean(), 1e-6), 0.0, 0.92)
        dose *= 1.0 - strength * w

    _, w = weight("Musc_Constrict", 2.0)
    dose *= 1.0 - intent.constrictor_sparing * w
    # Cord last: its maximum is graded by the protocol, and the brainstem's ring reaches the top of the cord.
    for name, target in (("Brainstem", intent.brainstem_max_gy), ("SpinalCord", intent.cord_max_gy)):
        inside, w = weight(name, 5.0)
        if not inside.any():
            continue
        d_in, w_in = dose[inside], w[inside]
        if float(d_in.max()) > target:  # spare: scale down around the organ
            lo, hi = 0.0, 0.95
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if float(np.max(d_in * (1.0 - mid * w_in))) > target else (lo, mid)
            dose *= 1.0 - 0.5 * (lo + hi) * w
        else:  # a hotter plan than the geometry alone gives (e.g. a planted cord overdose): add a hot streak
            lo, hi = 0.0, target
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if float(np.max(d_in + mid * w_in)) < target else (lo, mid)
            dose += 0.5 * (lo + hi) * w

    normalise()
    return dose.astype(np.float32)


def quantise(dose_gy: np.ndarray) -> tuple[np.ndarray, float]:
    """(uint16 pixels, Dose Grid Scaling in Gy): pixels * scaling is the dose."""
    scaling = float(f"{max(float(dose_gy.max()), 1e-3) / 65000.0:.6e}")
    pixels = np.clip(np.rint(dose_gy / scaling), 0, 65535).astype(np.uint16)
    return pixels, scaling


def _dvh_item(name: str, roi_number: int, dose_gy: np.ndarray, voxel_cc: float, bin_gy: float = 0.5) -> Dataset:
    values = dose_gy.astype(np.float64)
    edges = np.arange(0.0, float(values.max()) + 2 * bin_gy, bin_gy)
    counts, _ = np.histogram(values, bins=edges)
    cumulative = counts[::-1].cumsum()[::-1] * voxel_cc  # volume receiving >= lower edge of each bin
    item = Dataset()
    roi_ref = Dataset()
    roi_ref.ReferencedROINumber = roi_number
    roi_ref.DVHROIContributionType = "INCLUDED"
    item.DVHReferencedROISequence = Sequence([roi_ref])
    item.DVHType = "CUMULATIVE"
    item.DoseUnits = "GY"
    item.DoseType = "PHYSICAL"
    item.DVHDoseScaling = "1"
    item.DVHVolumeUnits = "CM3"
    item.DVHNumberOfBins = len(cumulative)
    data = np.empty(2 * len(cumulative))
    data[0::2] = bin_gy
    data[1::2] = cumulative
    item.DVHData = [ds_str(v, 4) for v in data]
    item.DVHMinimumDose = ds_str(values.min(), 3)
    item.DVHMaximumDose = ds_str(values.max(), 3)
    item.DVHMeanDose = ds_str(values.mean(), 3)
    return item


def dose_dataset(pixels: np.ndarray, scaling_gy: float, grid: Grid, ctx: StudyContext, *, uid_key: str,
                 rtplan_uid: str, rtstruct_uid: str, dvh_doses_gy: dict[str, np.ndarray],
                 roi_numbers: dict[str, int]) -> Dataset:
    """The RTDOSE data set: 16-bit multi-frame, GridFrameOffsetVector relative to the first frame (0, dz, ...),
    referencing the RTPLAN (RT Dose module) and the RTSTRUCT (RT DVH module)."""
    ds = base_dataset(
        ctx, sop_class_uid=RT_DOSE_STORAGE, sop_instance_uid=synth_uid(uid_key, "rtdose"), modality="RTDOSE",
        series_instance_uid=synth_uid(uid_key, "rtdose-series"), series_number=4,
        series_description="Plan dose (synthetic)",
    )
    ds.InstanceNumber = 1
    ds.ContentDate = ctx.study_date
    ds.ContentTime = ctx.study_time
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [ds_str(v) for v in (grid.x_mm[0], grid.y_mm[0], grid.z_mm[0])]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [ds_str(grid.pixel_spacing_mm), ds_str(grid.pixel_spacing_mm)]
    ds.SliceThickness = ds_str(grid.slice_spacing_mm)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = grid.slices
    ds.FrameIncrementPointer = (0x3004, 0x000C)
    ds.Rows = grid.rows
    ds.Columns = grid.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseComment = "Synthetic analytic dose (rtqa synth), not a dose calculation"
    ds.DoseSummationType = "PLAN"
    ds.GridFrameOffsetVector = [ds_str(k * grid.slice_spacing_mm) for k in range(grid.slices)]
    ds.DoseGridScaling = f"{scaling_gy:.6e}"
    ds.TissueHeterogeneityCorrection = "IMAGE"
    plan_ref = Dataset()
    plan_ref.ReferencedSOPClassUID = RT_PLAN_STORAGE
    plan_ref.ReferencedSOPInstanceUID = rtplan_uid
    ds.ReferencedRTPlanSequence = Sequence([plan_ref])
    ss_ref = Dataset()
    ss_ref.ReferencedSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ss_ref.ReferencedSOPInstanceUID = rtstruct_uid
    ds.ReferencedStructureSetSequence = Sequence([ss_ref])
    ds.DVHNormalizationDoseValue = "70"
    ds.DVHSequence = Sequence(
        [
            _dvh_item(name, roi_numbers[name], values, grid.voxel_volume_cc)
            for name, values in dvh_doses_gy.items()
            if name in roi_numbers and values.size
        ]
    )
    ds.PixelData = pixels.tobytes()
    return ds
