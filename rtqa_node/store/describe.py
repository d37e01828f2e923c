"""What the index records about one DICOM object: identity, modality, and its RT references.

Pure functions from a pydicom Dataset to a frozen :class:`ObjectDescription`. The references are the edges of
the RT chain that assembly follows (PS3.3 C.8.8.5, C.8.8.9, C.8.8.3):

- RTPLAN / RT Ion Plan -> RTSTRUCT (ReferencedStructureSetSequence), -> earlier plan (ReferencedRTPlanSequence)
- RTDOSE -> RTPLAN (ReferencedRTPlanSequence), -> RTSTRUCT (ReferencedStructureSetSequence, DVH module)
- RTSTRUCT -> image series and instances (ReferencedFrameOfReferenceSequence / RTReferencedStudySequence /
  RTReferencedSeriesSequence / ContourImageSequence, and the ContourImageSequence of each contour)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydicom.charset import decode_bytes
from pydicom.dataset import Dataset
from pydicom.uid import UID

from rtqa_node.errors import RtqaError

# A DICOM UID: dot-separated components of digits, no leading zero in a multi-digit component,
# at most 64 characters (PS3.5 9.1).
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.match(value) is not None


class DescriptionError(RtqaError):
    """The data set lacks an attribute the node needs, or holds an invalid identifying UID."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        #: "missing" (a required attribute is absent) or "invalid" (present but not a valid UID)
        self.kind = kind


class RefKind:
    """Kinds of reference edges kept in the index's ``refs`` table."""

    RTSTRUCT = "rtstruct"
    RTPLAN = "rtplan"
    IMAGE_SERIES = "image_series"
    IMAGE = "image"
    FRAME_OF_REFERENCE = "frame_of_reference"


@dataclass(frozen=True, slots=True)
class ObjectDescription:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    patient_id: str
    frame_of_reference_uid: str
    instance_number: int | None
    #: (kind, uid) edges to other objects, see :class:`RefKind`
    references: tuple[tuple[str, str], ...] = field(default=())


_IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def describe(ds: Dataset) -> ObjectDescription:
    """Read identity and references from ``ds``.

    Raises:
        DescriptionError: an identifying UID (SOP Class/Instance, Study, Series) is missing or invalid.
    """
    return _description(
        ds.get,
        frame_of_reference_uid=frame_of_reference(ds),
        references=tuple(sorted(set(_references(ds)))),
    )


#: Top-level attributes enough to describe an image that references nothing (see :func:`describe_image`).
IMAGE_TAGS: dict[str, int] = {
    "SpecificCharacterSet": 0x00080005,
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "Modality": 0x00080060,
    "PatientID": 0x00100020,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "InstanceNumber": 0x00200013,
    "FrameOfReferenceUID": 0x00200052,
}
#: Image SOP classes the node reads no references from: described from raw values, without pydicom.
_PLAIN_IMAGE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",   # CT, Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1",   # MR, Enhanced MR
    "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130",  # PET, Enhanced PET
})


def describe_image(values: dict[int, bytes]) -> ObjectDescription | None:
    """Describe a CT, MR or PET image from the raw top-level values captured while walking its encoding.

    Returns None when the object is not such an image; :func:`describe` must then read it with pydicom.

    Raises:
        DescriptionError: as :func:`describe`.
    """
    sop_class = values.get(IMAGE_TAGS["SOPClassUID"], b"").strip(b"\x00 ").decode("ascii", "replace")
    if sop_class not in _PLAIN_IMAGE_CLASSES:
        return None
    get = _raw_getter(values)
    return _description(get, frame_of_reference_uid=get("FrameOfReferenceUID", ""), references=())


def _raw_getter(values: dict[int, bytes]):
    charset = values.get(IMAGE_TAGS["SpecificCharacterSet"], b"").decode("ascii", "replace").strip("\x00 ")
    encodings = [e.strip() for e in charset.split("\\")] if charset else ["ISO_IR 6"]

    def get(keyword: str, default=None):
        raw = values.get(IMAGE_TAGS[keyword])
        if raw is None:
            return default
        if keyword == "PatientID":
            return decode_bytes(raw, encodings, {0x00100020}).strip("\x00 ")
        return raw.decode("ascii", "replace").strip("\x00 ")

    return get


#: Where the references of :func:`_references` (and the RTSTRUCT frame of reference fallbacks of
#: :func:`frame_of_reference`) sit, as a ``nested`` tree for ``encoding.walk_dataset``.
REFERENCE_PATHS: dict = {
    0x300C0060: {0x00081155: RefKind.RTSTRUCT},              # ReferencedStructureSetSequence
    0x300C0002: {0x00081155: RefKind.RTPLAN},                # ReferencedRTPlanSequence
    0x30060010: {                                            # ReferencedFrameOfReferenceSequence
        0x00200052: RefKind.FRAME_OF_REFERENCE,
        0x30060012: {0x30060014: {                           # RTReferencedStudy / RTReferencedSeries
            0x0020000E: RefKind.IMAGE_SERIES,
            0x30060016: {0x00081155: RefKind.IMAGE},         # ContourImageSequence
        }},
    },
    0x30060039: {0x30060040: {0x30060016: {0x00081155: RefKind.IMAGE}}},  # ROIContour / Contour / ContourImage
    0x30060020: {0x30060024: "roi_frame_of_reference"},      # StructureSetROISequence
}
_REF_ORDER = (RefKind.RTSTRUCT, RefKind.RTPLAN, RefKind.FRAME_OF_REFERENCE, RefKind.IMAGE_SERIES, RefKind.IMAGE)


def describe_walked(values: dict[int, bytes], nested: dict[str, list[bytes]]) -> ObjectDescription | None:
    """Describe any object from what the encoding walk captured: the top-level :data:`IMAGE_TAGS` and the
    :data:`REFERENCE_PATHS`, as :func:`describe` does from a pydicom parse (an RTSTRUCT's parse cost 35 ms).

    Returns None when a value is one the raw path does not interpret as pydicom would (several values, bytes
    outside ASCII): :func:`describe` must then read the object.

    Raises:
        DescriptionError: as :func:`describe`.
    """
    for raw in (*(values.get(IMAGE_TAGS[k], b"") for k in (*_IDENTIFYING, "Modality", "FrameOfReferenceUID")),
                *(v for found in nested.values() for v in found)):
        if b"\\" in raw or not raw.isascii():
            return None
    get = _raw_getter(values)

    def uids(label: str):
        for raw in nested.get(label, ()):
            value = raw.decode("ascii").strip("\x00 ")
            if value:
                yield value

    frame = get("FrameOfReferenceUID", "") or next(uids(RefKind.FRAME_OF_REFERENCE), "") \
        or next(uids("roi_frame_of_reference"), "")
    references = {(kind, uid) for kind in _REF_ORDER for uid in uids(kind)}
    return _description(get, frame_of_reference_uid=frame, references=tuple(sorted(references)))


def _description(get, *, frame_of_reference_uid: str, references: tuple) -> ObjectDescription:
    values = {}
    for keyword in _IDENTIFYING:
        value = get(keyword)
        if value is None or str(value).strip() == "":
            raise DescriptionError(f"required attribute {keyword} is missing or empty", kind="missing")
        value = str(value).strip("\x00 ")
        if not is_valid_uid(value):
            raise DescriptionError(
                f"{keyword} is not a valid DICOM UID ({len(value)} characters; "
                "digits and dots, no leading zeros, at most 64)",
                kind="invalid",
            )
        values[keyword] = value
    instance_number = get("InstanceNumber")
    try:
        instance_number = int(str(instance_number).strip()) if instance_number not in (None, "") else None
    except (TypeError, ValueError):
        instance_number = None
    return ObjectDescription(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        modality=str(get("Modality", "") or ""),
        patient_id=str(get("PatientID", "") or ""),
        frame_of_reference_uid=frame_of_reference_uid,
        instance_number=instance_number,
        references=references,
    )


def frame_of_reference(ds: Dataset) -> str:
    """Top-level FrameOfReferenceUID, or for RTSTRUCTs that omit it (several TPSs do) the referenced one."""
    uid = str(ds.get("FrameOfReferenceUID", "") or "")
    if uid:
        return uid
    for item in ds.get("ReferencedFrameOfReferenceSequence", []):
        if item.get("FrameOfReferenceUID"):
            return str(item.FrameOfReferenceUID)
    for item in ds.get("StructureSetROISequence", []):
        if item.get("ReferencedFrameOfReferenceUID"):
            return str(item.ReferencedFrameOfReferenceUID)
    return ""


def _uids(items, keyword: str = "ReferencedSOPInstanceUID"):
    for item in items or []:
        value = item.get(keyword)
        if value:
            yield str(value).strip("\x00 ")


def _references(ds: Dataset):
    yield from ((RefKind.RTSTRUCT, u) for u in _uids(ds.get("ReferencedStructureSetSequence")))
    yield from ((RefKind.RTPLAN, u) for u in _uids(ds.get("ReferencedRTPlanSequence")))
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
        if frame.get("FrameOfReferenceUID"):
            yield RefKind.FRAME_OF_REFERENCE, str(frame.FrameOfReferenceUID)
        for study in frame.get("RTReferencedStudySequence", []) or []:
            for series in study.get("RTReferencedSeriesSequence", []) or []:
                if series.get("SeriesInstanceUID"):
                    yield RefKind.IMAGE_SERIES, str(series.SeriesInstanceUID)
                yield from ((RefKind.IMAGE, u) for u in _uids(series.get("ContourImageSequence")))
    for roi in ds.get("ROIContourSequence", []) or []:
        for contour in roi.get("ContourSequence", []) or []:
            yield from ((RefKind.IMAGE, u) for u in _uids(contour.get("ContourImageSequence")))


def expected_modalities(sop_class_uid: str) -> frozenset[str] | None:
    """Modalities a data set of this SOP class may carry, where the standard fixes them; None if it does not."""
    return _MODALITY_BY_CLASS.get(UID(sop_class_uid))


_MODALITY_BY_CLASS = {
    UID("1.2.840.10008.5.1.4.1.1.2"): frozenset({"CT"}),
    UID("1.2.840.10008.5.1.4.1.1.4"): frozenset({"MR"}),
    UID("1.2.840.10008.5.1.4.1.1.128"): frozenset({"PT"}),
    UID("1.2.840.10008.5.1.4.1.1.481.1"): frozenset({"RTIMAGE"}),
    UID("1.2.840.10008.5.1.4.1.1.481.2"): frozenset({"RTDOSE"}),
    UID("1.2.840.10008.5.1.4.1.1.481.3"): frozenset({"RTSTRUCT"}),
    UID("1.2.840.10008.5.1.4.1.1.481.5"): frozenset({"RTPLAN"}),
    UID("1.2.840.10008.5.1.4.1.1.481.8"): frozenset({"RTPLAN"}),
    UID("1.2.840.10008.5.1.4.1.1.66.1"): frozenset({"REG"}),
    UID("1.2.840.10008.5.1.4.1.1.66.3"): frozenset({"REG"}),
}
