"""The RT Structure Set (PS3.3 A.19): every contour references the CT slice it lies on, and the Referenced
Frame of Reference Sequence lists every CT image of the series."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from rtqa_node.synth.anatomy import Phantom
from rtqa_node.synth.contours import SliceContour, trace
from rtqa_node.synth.ct import CtSeries
from rtqa_node.synth.dcm import (
    CT_IMAGE_STORAGE,
    DETACHED_STUDY_MANAGEMENT,
    RT_STRUCTURE_SET_STORAGE,
    StudyContext,
    base_dataset,
    synth_uid,
)
from rtqa_node.synth.grid import Grid

CONTOUR_DATA = Tag(0x3006, 0x0050)


@dataclass(frozen=True, slots=True)
class StructureSet:
    dataset: Dataset
    roi_numbers: dict[str, int]  # TG-263 name -> ROI Number
    volumes_cc: dict[str, float]  # voxel-count volumes on the CT grid


def _image_ref(sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def _contour_item(contour: SliceContour, ct: CtSeries, number: int) -> Dataset:
    item = Dataset()
    item.ContourImageSequence = Sequence([_image_ref(ct.sop_instance_uids[contour.slice_index])])
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(contour.points_mm)
    item.ContourNumber = number
    # Encoded once here: pydicom validating ~10^5 DS values one by one would dominate the generation time.
    text = "\\".join(f"{v:.2f}" for v in contour.points_mm.ravel()).encode("ascii")
    if len(text) % 2:
        text += b" "
    item[CONTOUR_DATA] = RawDataElement(CONTOUR_DATA, "DS", len(text), text, 0, False, True)
    # Declare the item as already in the output encoding (explicit VR little endian, the default character
    # set's codec): otherwise pydicom's writer parses every raw element of it, ~3 s per RTSTRUCT.
    item.set_original_encoding(False, True, item._character_set)
    return item


def structure_set(phantom: Phantom, grid: Grid, ct: CtSeries, ctx: StudyContext, *, uid_key: str,
                  written_names: dict[str, str] | None = None) -> StructureSet:
    """written_names maps the phantom's structure names to the ROI names written (a planted laterality swap);
    a structure absent from it is not written (a planted missing OAR). None writes every structure as named.
    roi_numbers and volumes_cc are keyed by the phantom's names."""
    ds = base_dataset(
        ctx, sop_class_uid=RT_STRUCTURE_SET_STORAGE, sop_instance_uid=synth_uid(uid_key, "rtstruct"),
        modality="RTSTRUCT", series_instance_uid=synth_uid(uid_key, "rtstruct-series"), series_number=2,
        series_description="Structures (synthetic)",
    )
    ds.InstanceNumber = 1
    # The Frame of Reference module is part of the RT Structure Set IOD since 2019 (CP 1823).
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.StructureSetLabel = "HN_SYNTH"
    ds.StructureSetName = "HN_SYNTH"
    ds.StructureSetDate = ctx.study_date
    ds.StructureSetTime = ctx.study_time

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = ct.series_instance_uid
    series_ref.ContourImageSequence = Sequence([_image_ref(uid) for uid in ct.sop_instance_uids])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study_ref.ReferencedSOPInstanceUID = ctx.study_instance_uid
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    for_ref = Dataset()
    for_ref.FrameOfReferenceUID = ctx.frame_of_reference_uid
    for_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([for_ref])

    rois, roi_contours, observations = [], [], []
    roi_numbers: dict[str, int] = {}
    volumes_cc: dict[str, float] = {}
    for number, (name, structure) in enumerate(phantom.structures.items(), start=1):
        written = name if written_names is None else written_names.get(name)
        if written is None:
            continue
        contours, voxels = trace(structure.shape, grid)
        if not contours:
            continue
        roi_numbers[name] = number
        volumes_cc[name] = round(voxels * grid.voxel_volume_cc, 3)
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = ctx.frame_of_reference_uid
        roi.ROIName = written
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(structure.color_rgb)
        roi_contour.ContourSequence = Sequence(
            [_contour_item(c, ct, i) for i, c in enumerate(contours, start=1)]
        )
        roi_contour.ReferencedROINumber = number
        roi_contours.append(roi_contour)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.ROIObservationLabel = written
        obs.RTROIInterpretedType = structure.rt_roi_interpreted_type
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(roi_contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate = ctx.study_date
    ds.ReviewTime = ctx.study_time
    ds.ReviewerName = "SYNTH^PLANNER"
    return StructureSet(ds, roi_numbers, volumes_cc)
