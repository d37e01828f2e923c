"""DICOM plumbing shared by the synthetic CT, RTSTRUCT, RTPLAN and RTDOSE writers: deterministic UIDs,
the patient / study / equipment modules, and byte-reproducible file writing."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from rtqa_node import __version__

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://rtqa-node.invalid/synth")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_ION_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.8"
# PS3.3 C.8.8.3: RT Referenced Study Sequence items name the (retired) Detached Study Management SOP Class.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

MANUFACTURER = "rtqa-node synthetic"


def synth_uid(*parts: object) -> str:
    """A UID under 2.25 (PS3.5 B.2) from a name-based UUID: the same parts always give the same UID.

    pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and returns a random UUID,
    so it cannot make reproducible UIDs under 2.25.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(str(p) for p in parts)).int}"


@dataclass(frozen=True, slots=True)
class StudyContext:
    """Identity shared by every object of one synthetic plan study (no PHI: synthetic names and ids)."""

    patient_name: str  # "SYNTH^HN001"
    patient_id: str
    patient_birth_date: str  # DA
    patient_sex: str  # "M" | "F"
    study_instance_uid: str
    study_id: str
    accession_number: str
    study_date: str  # DA
    study_time: str  # TM
    frame_of_reference_uid: str
    institution_name: str
    station_name: str


def base_dataset(ctx: StudyContext, *, sop_class_uid: str, sop_instance_uid: str, modality: str,
                 series_instance_uid: str, series_number: int, series_description: str) -> Dataset:
    """A data set with the SOP Common, Patient, General Study, (RT) Series and General Equipment modules."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = ctx.study_date
    ds.InstanceCreationTime = ctx.study_time
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ctx.study_date
    ds.StudyTime = ctx.study_time
    ds.AccessionNumber = ctx.accession_number
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = ctx.institution_name
    ds.ReferringPhysicianName = ""
    ds.StationName = ctx.station_name
    ds.StudyDescription = "Synthetic head and neck RT plan study"
    ds.SeriesDescription = series_description
    ds.OperatorsName = ""
    ds.ManufacturerModelName = "rtqa synth"
    ds.PatientName = ctx.patient_name
    ds.PatientID = ctx.patient_id
    ds.PatientBirthDate = ctx.patient_birth_date
    ds.PatientSex = ctx.patient_sex
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic data: no real patient"
    ds.SoftwareVersions = f"rtqa-node {__version__}"
    ds.StudyInstanceUID = ctx.study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = ctx.study_id
    ds.SeriesNumber = series_number
    ds.SeriesDate = ctx.study_date
    ds.SeriesTime = ctx.study_time
    return ds


def write(ds: Dataset, path: Path) -> None:
    """Write a Part 10 file. Bytes depend only on the data set (no clock, no random UID in the meta)."""
    ds.save_as(path, enforce_file_format=True)


def ds_str(value: float, decimals: int = 3) -> str:
    """A DS value string of at most 16 characters (PS3.5 6.2)."""
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        raise ValueError(f"DS value {value!r} does not fit 16 characters at {decimals} decimals")
    return text
