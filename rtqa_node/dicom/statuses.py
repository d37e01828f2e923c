"""DICOM statuses the node answers with, named after PS3.4 Annex B (Storage Service Class) and PS3.7 C.

One table, so that the same failure always gets the same status (see STYLE.md, "Errors").
"""

from __future__ import annotations

import enum

from pydicom.dataset import Dataset

from rtqa_node.store import Refusal


class Status(enum.IntEnum):
    SUCCESS = 0x0000
    #: Refused: Out of Resources (PS3.4 B.2.3): disk full, storage unwritable, object over the size limit
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class (PS3.4 B.2.3)
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: Cannot understand (PS3.4 B.2.3, 0xCxxx): the data set cannot be parsed
    CANNOT_UNDERSTAND = 0xC000
    #: Error: Cannot understand, sub-code for an identifying UID that is not a valid UID (PS3.5 9.1)
    CANNOT_UNDERSTAND_INVALID_UID = 0xC001
    #: Failure: Processing failure (PS3.7 C.4.2): a bug in the node; logged with a traceback
    PROCESSING_FAILURE = 0x0110


_BY_REFUSAL = {
    Refusal.TOO_LARGE: Status.OUT_OF_RESOURCES,
    Refusal.NO_SPACE: Status.OUT_OF_RESOURCES,
    Refusal.UNWRITABLE: Status.OUT_OF_RESOURCES,
    Refusal.UNPARSEABLE: Status.CANNOT_UNDERSTAND,
    Refusal.SOP_CLASS_MISMATCH: Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    Refusal.MISSING_ATTRIBUTE: Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    Refusal.INVALID_UID: Status.CANNOT_UNDERSTAND_INVALID_UID,
}


def status_for(refusal: Refusal) -> Status:
    return _BY_REFUSAL[refusal]


def status_dataset(status: Status, comment: str | None = None) -> Dataset:
    """A C-STORE response status with an Error Comment (0000,0902), LO: at most 64 characters."""
    ds = Dataset()
    ds.Status = int(status)
    if comment:
        ds.ErrorComment = comment.encode("ascii", "replace").decode("ascii")[:64]
    return ds
