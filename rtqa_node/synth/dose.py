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

Additions in generator version 2:
- planning "effort" (per plan, around the site's style) scales how hard the parotids, superior constrictor,
  supraglottic larynx and oral cavity are spared (``extra_sparing``: organ -> fraction of dose removed near it);
- the stem-cell regions of the parotids get their own modulation (``stem_modulation``, -0.35..+0.5: some
  plans happen to spare them, others push dose into them), which decouples their dose from the gland mean;
- a hot spot (``hot_spot_pct`` above the prescription, in PTV_70) in some plans; a planted cold spot in CTV_70
  is cut after normalisation (``apply_cold_spot``) to reach an intended CTV_70 D98;
- ions: ``penumbra_sigma_mm`` (photon 4 mm, proton 2.5 mm, carbon 2 mm) and a smaller, shorter low-dose bath;
  the dose is RBE-weighted, DoseType EFFECTIVE. Proton: constant RBE 1.1 (ICRU Report 78). Carbon (in silico,
  illustrative): RBE(x) = 1.1 + (3.0 - 1.1) t(x), t = 1 / (1 + exp(d(x) / 4 mm)) with d the signed distance to
  the nearest PTV, i.e. about 3 in the high-LET spread-out Bragg peak inside the targets and falling to 1.1
  (the entrance plateau) within about 1 cm outside; physical dose = effective dose / RBE.
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
PROTON_RBE = 1.1  # ICRU Report 78 (2007): generic proton RBE
CARBON_RBE_TARGET = 3.0  # illustrative RBE in a carbon SOBP
CARBON_RBE_EDGE_MM = 4.0
PENUMBRA_BY_MODALITY_MM = {"photon": 4.0, "proton": 2.5, "carbon": 2.0}
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
    penumbra_sigma_mm: float = PENUMBRA_SIGMA_MM
    extra_sparing: dict | None = None  # organ -> fraction 0..0.6 of dose removed around it (effort)
    stem_modulation: dict | None = None  # "Parotid_L"/"Parotid_R" -> k: dose x (1 - k w_stem)
    hot_spot_pct: float = 0.0  # a smooth hot spot of this height inside PTV_70
    raise_to_max: tuple[str, ...] = ()  # organs whose maximum is raised to the intent if the geometry gives less


def _profile(d_mm: np.ndarray, b: float, length_mm: float, sigma_mm: float = PENUMBRA_SIGMA_MM) -> np.ndarray:
    edge = 0.5 * erfc((d_mm - 1.8 * sigma_mm) / (np.sqrt(2.0) * sigma_mm))
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


def rbe_field(phantom: Phantom, grid: Grid, modality: str) -> np.ndarray:
    """RBE on ``grid`` (float32): 1 for photons, 1.1 for protons, the documented position model for carbon."""
    if modality == "photon":
        return np.ones(grid.shape, dtype=np.float32)
    if modality == "proton":
        return np.full(grid.shape, PROTON_RBE, dtype=np.float32)
    if modality != "carbon":
        raise ValueError(f"modality must be photon, proton or carbon, got {modality!r}")
    d = np.minimum(_phi(phantom.structures["PTV_70"].shape, grid), _phi(phantom.structures["PTV_56"].shape, grid))
    return (PROTON_RBE + (CARBON_RBE_TARGET - PROTON_RBE) * expit(-d / CARBON_RBE_EDGE_MM)).astype(np.float32)


def apply_cold_spot(dose: np.ndarray, grid: Grid, inside: np.ndarray, *, centre_mm: tuple[float, float, float],
                    sigma_mm: float, target_d98_gy: float) -> float:
    """Cut a Gaussian cold spot into ``dose`` (in place) so that the D98 of the ``inside`` points reaches
    target_d98_gy (bisection on the depth, at most 60 %). Returns the depth (fraction of the dose removed
    at the centre)."""
    z, y, x = _points(grid)
    r2 = (x - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (z - centre_mm[2]) ** 2
    blob = np.exp(-r2 / (2.0 * sigma_mm**2)).astype(np.float32)
    d_in, b_in = dose[inside], blob[inside]
    lo, hi = 0.0, 0.6
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if percentile_dose(d_in * (1.0 - mid * b_in), 98.0) > target_d98_gy else (lo, mid)
    depth = 0.5 * (lo + hi)
    dose *= 1.0 - depth * blob
    return depth


def compute_dose(phantom: Phantom, grid: Grid, rng: np.random.Generator, intent: DoseIntent) -> np.ndarray:
    """RBE-weighted dose (Gy; Gy(RBE) for ions) on ``grid``, float32 (slices, rows, columns)."""
    s = phantom.structures
    phi70 = _phi(s["PTV_70"].shape, grid)
    phi56 = _phi(s["PTV_56"].shape, grid)
    phi_body = _phi(s["External"].shape, grid)
    b, length, sigma = intent.low_dose_fraction, intent.low_dose_length_mm, intent.penumbra_sigma_mm
    dose = np.maximum(intent.ptv70_rx_gy * _profile(phi70, b, length, sigma),
                      intent.ptv56_rx_gy * _profile(phi56, b, length, sigma))
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

    def weight(shape, ring_mm: float) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]:
        """(window, inside, w) on the shape's bounding box plus ring + 14 mm (w < 0.003 beyond it)."""
        pad = int(np.ceil((ring_mm + 14.0) / min(grid.pixel_spacing_mm, grid.slice_spacing_mm)))
        win, phi = grid.sample(shape, pad_voxels=pad)
        return win, phi < 0, expit(-(phi - ring_mm) / 2.0) * guard[win]

    for name, target in intent.parotid_mean_gy.items():
        win, inside, w = weight(s[name].shape, 4.0)
        if not inside.any():
            continue
        for _ in range(3):  # the guard keeps the part near a PTV, so one linear step falls short
            d = dose[win]
            d_in, dw_in = d[inside], (d * w)[inside]
            strength = np.clip((d_in.mean() - target) / max(dw_in.mean(), 1e-6), 0.0, 0.92)
            dose[win] *= 1.0 - strength * w

    for name, k in (intent.stem_modulation or {}).items():
        region = phantom.stem_cells.get(name)
        if region is None:
            continue
        win, _, w = weight(region, 2.0)
        dose[win] *= 1.0 - k * w

    win, _, w = weight(s["Musc_Constrict"].shape, 2.0)
    dose[win] *= 1.0 - intent.constrictor_sparing * w
    for name, fraction in (intent.extra_sparing or {}).items():
        if name in s:
            win, _, w = weight(s[name].shape, 3.0)
            dose[win] *= 1.0 - fraction * w
    # Cord last: its maximum is graded by the protocol, and the brainstem's ring reaches the top of the cord.
    for name, target in (("Brainstem", intent.brainstem_max_gy), ("SpinalCord", intent.cord_max_gy)):
        win, inside, w = weight(s[name].shape, 5.0)
        if not inside.any():
            continue
        d_in, w_in = dose[win][inside], w[inside]
        if float(d_in.max()) > target:  # spare: scale down around the organ
            lo, hi = 0.0, 0.95
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if float(np.max(d_in * (1.0 - mid * w_in))) > target else (lo, mid)
            dose[win] *= 1.0 - 0.5 * (lo + hi) * w
        elif name in intent.raise_to_max:  # a planted overdose the geometry alone does not give: a hot streak
            lo, hi = 0.0, target
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if float(np.max(d_in + mid * w_in)) < target else (lo, mid)
            dose[win] += 0.5 * (lo + hi) * w

    normalise()
    if intent.hot_spot_pct > 0:  # a smooth hot spot around the deepest point of PTV_70
        k = np.unravel_index(int(np.argmin(np.where(in70, phi70, np.inf))), grid.shape)
        z, y, x = _points(grid)
        r2 = (x - grid.x_mm[k[2]]) ** 2 + (y - grid.y_mm[k[1]]) ** 2 + (z - grid.z_mm[k[0]]) ** 2
        dose *= 1.0 + intent.hot_spot_pct / 100.0 * np.exp(-r2 / (2.0 * 6.0**2))
    return dose.astype(np.float32)


def quantise(dose_gy: np.ndarray) -> tuple[np.ndarray, float]:
    """(uint16 pixels, Dose Grid Scaling in Gy): pixels * scaling is the dose."""
    scaling = float(f"{max(float(dose_gy.max()), 1e-3) / 65000.0:.6e}")
    pixels = np.clip(np.rint(dose_gy / scaling), 0, 65535).astype(np.uint16)
    return pixels, scaling


def _dvh_item(name: str, roi_number: int, dose_gy: np.ndarray, voxel_cc: float, bin_gy: float = 0.5,
              dose_type: str = "PHYSICAL") -> Dataset:
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
    item.DoseType = dose_type
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
                 roi_numbers: dict[str, int], dose_type: str = "PHYSICAL", rtplan_class_uid: str = RT_PLAN_STORAGE,
                 frame_of_reference_uid: str | None = None) -> Dataset:
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
    ds.FrameOfReferenceUID = frame_of_reference_uid or ctx.frame_of_reference_uid
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
    ds.DoseType = dose_type
    ds.DoseComment = ("Synthetic analytic RBE-weighted dose (rtqa synth)" if dose_type == "EFFECTIVE"
                      else "Synthetic analytic dose (rtqa synth), not a dose calculation")
    ds.DoseSummationType = "PLAN"
    ds.GridFrameOffsetVector = [ds_str(k * grid.slice_spacing_mm) for k in range(grid.slices)]
    ds.DoseGridScaling = f"{scaling_gy:.6e}"
    ds.TissueHeterogeneityCorrection = "IMAGE"
    plan_ref = Dataset()
    plan_ref.ReferencedSOPClassUID = rtplan_class_uid
    plan_ref.ReferencedSOPInstanceUID = rtplan_uid
    ds.ReferencedRTPlanSequence = Sequence([plan_ref])
    ss_ref = Dataset()
    ss_ref.ReferencedSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ss_ref.ReferencedSOPInstanceUID = rtstruct_uid
    ds.ReferencedStructureSetSequence = Sequence([ss_ref])
    ds.DVHNormalizationDoseValue = "70"
    ds.DVHSequence = Sequence(
        [
            _dvh_item(name, roi_numbers[name], values, grid.voxel_volume_cc, dose_type=dose_type)
            for name, values in dvh_doses_gy.items()
            if name in roi_numbers and values.size
        ]
    )
    ds.PixelData = pixels.tobytes()
    return ds
