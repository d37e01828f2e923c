"""The header every result object shares: file meta, SOP identity, and the reviewed plan's patient and study,
so that a TPS, PACS or viewer files the result beside the plan it reviews."""

from __future__ import annotations

from datetime import UTC, datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

import rtqa_node

#: Patient and study attributes copied from the reviewed RTPLAN (empty when the plan has none).
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                          "StudyID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName")


def result_dataset(plan: Dataset, *, sop_class_uid: str, sop_instance_uid: str, modality: str,
                   series_instance_uid: str, series_number: int, series_description: str,
                   instance_number: int) -> Dataset:
    """A new result object in the plan's patient and study, explicit VR little endian, made by rtqa-node."""
    now = datetime.now(UTC)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if plan.get("SpecificCharacterSet"):
        ds.SpecificCharacterSet = plan.SpecificCharacterSet
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    for keyword in PATIENT_STUDY_KEYWORDS:
        setattr(ds, keyword, plan.get(keyword, "") or "")
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.Manufacturer = "rtqa-node"
    ds.SoftwareVersions = rtqa_node.__version__
    ds.InstanceNumber = instance_number
    return ds
