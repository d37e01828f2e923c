"""The synthetic planning CT: Hounsfield units painted from the phantom's solids, with noise, written as
CT Image Storage (PS3.3 A.3), one file per axial slice, head first supine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from rtqa_node.synth.anatomy import Phantom
from rtqa_node.synth.dcm import CT_IMAGE_STORAGE, StudyContext, base_dataset, ds_str, synth_uid
from rtqa_node.synth.grid import Grid

RESCALE_INTERCEPT = -1024.0

# Approximate CT numbers (HU). Painted in this order; later ones win.
_TISSUE_HU = (
    ("External", 40.0),  # muscle / soft tissue
    ("fat", -90.0),
    ("brain", 35.0),
    ("Cavity_Oral", 50.0),
    ("Parotid_L", -10.0),  # fatty glands
    ("Parotid_R", -10.0),
    ("Glnd_Submand_L", 45.0),
    ("Glnd_Submand_R", 45.0),
    ("Larynx", 60.0),
    ("vertebra", 700.0),
    ("skull", 1100.0),
    ("mandible", 1000.0),
    ("pharynx_lumen", -1000.0),
    ("trachea", -1000.0),
    ("larynx_lumen", -1000.0),
)


def ct_numbers(phantom: Phantom, grid: Grid, rng: np.random.Generator, *, hu_offset: float) -> np.ndarray:
    """HU volume (slices, rows, columns), int16: air -1000, soft tissue ~40, bone 700-1100, noise sd 12 HU."""
    hu = np.full(grid.shape, -1000.0, dtype=np.float32)
    for name, value in _TISSUE_HU:
        # The scanner sees the true anatomy, not the site's contours of it.
        shape = phantom.true_shapes.get(name) or (
            phantom.structures[name].shape if name in phantom.structures else phantom.tissues[name])
        win, phi = grid.sample(shape, pad_voxels=0)
        if phi.size:
            region = hu[win]
            region[phi < 0] = value
    hu += rng.normal(0.0, 12.0, size=grid.shape).astype(np.float32)
    hu += np.float32(hu_offset)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


@dataclass(frozen=True, slots=True)
class CtSeries:
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]  # one per slice, inferior to superior
    datasets: tuple[Dataset, ...]


def ct_series(hu: np.ndarray, grid: Grid, ctx: StudyContext, *, uid_key: str) -> CtSeries:
    """One CT Image Storage data set per slice of ``hu`` (stored unsigned, rescale intercept -1024)."""
    series_uid = synth_uid(uid_key, "ct-series")
    sop_uids = tuple(synth_uid(uid_key, "ct", k) for k in range(grid.slices))
    stored = (hu.astype(np.int32) - int(RESCALE_INTERCEPT)).astype(np.uint16)
    datasets = []
    for k in range(grid.slices):
        ds = base_dataset(
            ctx, sop_class_uid=CT_IMAGE_STORAGE, sop_instance_uid=sop_uids[k], modality="CT",
            series_instance_uid=series_uid, series_number=1, series_description="Planning CT (synthetic)",
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ContentDate = ctx.study_date
        ds.ContentTime = ctx.study_time
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "HEADNECK"
        ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceThickness = ds_str(grid.slice_spacing_mm)
        ds.KVP = "120"
        ds.ImagePositionPatient = [ds_str(grid.x_mm[0]), ds_str(grid.y_mm[0]), ds_str(grid.z_mm[k])]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = ds_str(grid.z_mm[k])
        ds.PixelSpacing = [ds_str(grid.pixel_spacing_mm), ds_str(grid.pixel_spacing_mm)]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = grid.rows
        ds.Columns = grid.columns
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = ds_str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return CtSeries(series_uid, sop_uids, tuple(datasets))
