"""The RT Plan (PS3.3 A.20): 6 MV static IMRT fields (7 or 9, equispaced), simultaneous integrated boost
PTV_70 70 Gy / PTV_56 56 Gy in 35 fractions, Dose Reference items for both PTVs and the cord limit, MLC
apertures conformed to the targets' beam's-eye-view projection (divergence ignored)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from rtqa_node.synth.dcm import (
    RT_ION_PLAN_STORAGE,
    RT_PLAN_STORAGE,
    RT_STRUCTURE_SET_STORAGE,
    StudyContext,
    base_dataset,
    ds_str,
    synth_uid,
)

# Varian Millennium 120 MLC: 60 leaf pairs, 10 x 10 mm outer, 40 x 5 mm central (boundaries in mm at isocentre).
LEAF_BOUNDARIES_MM = np.concatenate([np.arange(-200, -100, 10), np.arange(-100, 100, 5), np.arange(100, 201, 10)])
MU_PER_GY = 100.0  # calibration: 1 cGy/MU at reference conditions


@dataclass(frozen=True, slots=True)
class PlanSpec:
    fractions: int
    ptv70_rx_gy: float
    ptv56_rx_gy: float
    cord_limit_gy: float
    gantry_angles_deg: tuple[float, ...]
    modulation_factor: float  # MU relative to an open field delivering the same dose
    isocenter_mm: tuple[float, float, float]
    approved: bool
    machine_name: str
    modality: str = "photon"  # "photon" | "proton" | "carbon"


def _bev(points_mm: np.ndarray, isocenter: np.ndarray, gantry_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(u, v): beam's-eye-view coordinates at the isocentre plane, u along the leaf motion, v along z."""
    t = np.deg2rad(gantry_deg)
    rel = points_mm - isocenter
    return rel[:, 0] * np.cos(t) + rel[:, 1] * np.sin(t), rel[:, 2]


def _aperture(u: np.ndarray, v: np.ndarray, margin_mm: float = 5.0) -> tuple[list[float], list[float], list[float]]:
    x_jaw = [float(np.floor(u.min() - margin_mm)), float(np.ceil(u.max() + margin_mm))]
    y_jaw = [float(np.floor(v.min() - margin_mm)), float(np.ceil(v.max() + margin_mm))]
    x_jaw = [max(x_jaw[0], -200.0), min(x_jaw[1], 200.0)]
    y_jaw = [max(y_jaw[0], -200.0), min(y_jaw[1], 200.0)]
    bank_a, bank_b = [], []
    for lo, hi in itertools.pairwise(LEAF_BOUNDARIES_MM):
        band = (v >= lo - margin_mm) & (v < hi + margin_mm)
        if band.any():
            a = max(float(np.floor(u[band].min() - margin_mm)), x_jaw[0])
            b = min(float(np.ceil(u[band].max() + margin_mm)), x_jaw[1])
        else:  # closed pair parked under the X1 jaw
            a = b = x_jaw[0]
        bank_a.append(a)
        bank_b.append(b)
    return x_jaw, y_jaw, bank_a + bank_b


def _device(kind: str, pairs: int, boundaries: np.ndarray | None = None) -> Dataset:
    item = Dataset()
    item.RTBeamLimitingDeviceType = kind
    item.NumberOfLeafJawPairs = pairs
    if boundaries is not None:
        item.LeafPositionBoundaries = [ds_str(v) for v in boundaries]
    return item


def _positions(kind: str, values: list[float]) -> Dataset:
    item = Dataset()
    item.RTBeamLimitingDeviceType = kind
    item.LeafJawPositions = [ds_str(v) for v in values]
    return item


def plan_dataset(spec: PlanSpec, ctx: StudyContext, *, uid_key: str, rtstruct_uid: str,
                 roi_numbers: dict[str, int], target_points_mm: np.ndarray) -> Dataset:
    """The RTPLAN (photon) or RT Ion Plan (proton, carbon) data set. target_points_mm (N, 3): PTV points used
    to shape the apertures or place the spots."""
    if spec.modality != "photon":
        return ion_plan_dataset(spec, ctx, uid_key=uid_key, rtstruct_uid=rtstruct_uid, roi_numbers=roi_numbers,
                                target_points_mm=target_points_mm)
    ds = base_dataset(
        ctx, sop_class_uid=RT_PLAN_STORAGE, sop_instance_uid=synth_uid(uid_key, "rtplan"), modality="RTPLAN",
        series_instance_uid=synth_uid(uid_key, "rtplan-series"), series_number=3,
        series_description="Plan (synthetic)",
    )
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.RTPlanLabel = "HN_SIB_70_56"
    ds.RTPlanName = "HN SIB 70/56"
    ds.RTPlanDescription = f"{spec.ptv70_rx_gy:g} Gy / {spec.ptv56_rx_gy:g} Gy in {spec.fractions} fractions (synthetic)"
    ds.RTPlanDate = ctx.study_date
    ds.RTPlanTime = ctx.study_time
    ds.PlanIntent = "CURATIVE"
    ds.RTPlanGeometry = "PATIENT"

    ds.PrescriptionDescription = (
        f"SIB: PTV_70 {spec.ptv70_rx_gy:g} Gy, PTV_56 {spec.ptv56_rx_gy:g} Gy, {spec.fractions} fractions"
    )
    _add_references_and_setup(ds, spec, roi_numbers, uid_key, rtstruct_uid)

    iso = np.asarray(spec.isocenter_mm)
    n_beams = len(spec.gantry_angles_deg)
    beam_dose_gy = spec.ptv70_rx_gy / spec.fractions / n_beams
    beams, ref_beams = [], []
    for number, gantry in enumerate(spec.gantry_angles_deg, start=1):
        u, v = _bev(target_points_mm, iso, gantry)
        x_jaw, y_jaw, leaves = _aperture(u, v)
        beam = Dataset()
        beam.BeamNumber = number
        beam.BeamName = f"G{round(gantry):03d}"
        beam.BeamDescription = f"IMRT field {number} of {n_beams}"
        beam.BeamType = "STATIC"
        beam.RadiationType = "PHOTON"
        beam.TreatmentMachineName = spec.machine_name
        beam.PrimaryDosimeterUnit = "MU"
        beam.SourceAxisDistance = "1000"
        beam.BeamLimitingDeviceSequence = Sequence(
            [_device("ASYMX", 1), _device("ASYMY", 1), _device("MLCX", 60, LEAF_BOUNDARIES_MM)]
        )
        beam.ReferencedPatientSetupNumber = 1
        beam.TreatmentDeliveryType = "TREATMENT"
        beam.NumberOfWedges = 0
        beam.NumberOfCompensators = 0
        beam.NumberOfBoli = 0
        beam.NumberOfBlocks = 0
        beam.FinalCumulativeMetersetWeight = "1"
        beam.NumberOfControlPoints = 2
        cp0 = Dataset()
        cp0.ControlPointIndex = 0
        cp0.NominalBeamEnergy = "6"
        cp0.DoseRateSet = "600"
        cp0.BeamLimitingDevicePositionSequence = Sequence(
            [_positions("ASYMX", x_jaw), _positions("ASYMY", y_jaw), _positions("MLCX", leaves)]
        )
        cp0.GantryAngle = ds_str(gantry, 1)
        cp0.GantryRotationDirection = "NONE"
        cp0.BeamLimitingDeviceAngle = "0"
        cp0.BeamLimitingDeviceRotationDirection = "NONE"
        cp0.PatientSupportAngle = "0"
        cp0.PatientSupportRotationDirection = "NONE"
        cp0.TableTopEccentricAngle = "0"
        cp0.TableTopEccentricRotationDirection = "NONE"
        cp0.TableTopVerticalPosition = ""
        cp0.TableTopLongitudinalPosition = ""
        cp0.TableTopLateralPosition = ""
        cp0.IsocenterPosition = [ds_str(c, 1) for c in iso]
        cp0.CumulativeMetersetWeight = "0"
        cp1 = Dataset()
        cp1.ControlPointIndex = 1
        cp1.CumulativeMetersetWeight = "1"
        beam.ControlPointSequence = Sequence([cp0, cp1])
        beams.append(beam)
        ref = Dataset()
        ref.ReferencedBeamNumber = number
        ref.BeamDose = ds_str(beam_dose_gy, 4)
        ref.BeamMeterset = ds_str(beam_dose_gy * MU_PER_GY * spec.modulation_factor, 2)
        ref_beams.append(ref)

    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = spec.fractions
    group.NumberOfBeams = n_beams
    group.NumberOfBrachyApplicationSetups = 0
    group.ReferencedBeamSequence = Sequence(ref_beams)
    ds.FractionGroupSequence = Sequence([group])
    ds.BeamSequence = Sequence(beams)
    ds.ApprovalStatus = "APPROVED" if spec.approved else "UNAPPROVED"
    if spec.approved:
        ds.ReviewDate = ctx.study_date
        ds.ReviewTime = ctx.study_time
        ds.ReviewerName = "SYNTH^PHYSICIAN"
    return ds


def _common_plan_modules(ds: Dataset, spec: PlanSpec, ctx: StudyContext, *, uid_key: str, rtstruct_uid: str,
                         roi_numbers: dict[str, int], label: str) -> None:
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.RTPlanLabel = label
    ds.RTPlanName = label.replace("_", " ")
    ds.RTPlanDescription = (f"{spec.ptv70_rx_gy:g} Gy(RBE) / {spec.ptv56_rx_gy:g} Gy(RBE) in {spec.fractions} "
                            f"fractions, {spec.modality} (synthetic)")
    ds.RTPlanDate = ctx.study_date
    ds.RTPlanTime = ctx.study_time
    ds.PlanIntent = "CURATIVE"
    ds.RTPlanGeometry = "PATIENT"
    ds.PrescriptionDescription = (
        f"SIB: PTV_70 {spec.ptv70_rx_gy:g} Gy(RBE), PTV_56 {spec.ptv56_rx_gy:g} Gy(RBE), {spec.fractions} fractions"
    )
    _add_references_and_setup(ds, spec, roi_numbers, uid_key, rtstruct_uid)


# Ion beams: (RadiationType, mass number, atomic number, charge state, nominal energies in MeV or MeV/u)
ION_KINDS = {"proton": ("PROTON", None, None, None, (150.0, 130.0)),
             "carbon": ("ION", 12, 6, 6, (280.0, 250.0))}
SPOT_SPACING_MM = 10.0


def ion_plan_dataset(spec: PlanSpec, ctx: StudyContext, *, uid_key: str, rtstruct_uid: str,
                     roi_numbers: dict[str, int], target_points_mm: np.ndarray) -> Dataset:
    """RT Ion Plan (PS3.3 A.49): pencil-beam scanning, 3 fields (gantry 0, 60, 300 for HFS H&N), two energy
    layers per field, spots on a 10 mm grid over the targets' beam's-eye view (a schematic plan: the dose
    object is the analytic model, not computed from these spots)."""
    radiation, mass, atomic, charge, energies = ION_KINDS[spec.modality]
    ds = base_dataset(
        ctx, sop_class_uid=RT_ION_PLAN_STORAGE, sop_instance_uid=synth_uid(uid_key, "rtplan"), modality="RTPLAN",
        series_instance_uid=synth_uid(uid_key, "rtplan-series"), series_number=3,
        series_description=f"Ion plan, {spec.modality} (synthetic)",
    )
    _common_plan_modules(ds, spec, ctx, uid_key=uid_key, rtstruct_uid=rtstruct_uid, roi_numbers=roi_numbers,
                         label="HN_SIB_ION" if spec.modality == "carbon" else "HN_SIB_PROTON")
    iso = np.asarray(spec.isocenter_mm)
    gantries = (0.0, 60.0, 300.0)
    beam_dose_gy = spec.ptv70_rx_gy / spec.fractions / len(gantries)
    beams, ref_beams = [], []
    for number, gantry in enumerate(gantries, start=1):
        u, v = _bev(target_points_mm, iso, gantry)
        us = np.arange(np.floor(u.min() / SPOT_SPACING_MM), np.ceil(u.max() / SPOT_SPACING_MM) + 1) * SPOT_SPACING_MM
        vs = np.arange(np.floor(v.min() / SPOT_SPACING_MM), np.ceil(v.max() / SPOT_SPACING_MM) + 1) * SPOT_SPACING_MM
        grid_u, grid_v = np.meshgrid(us, vs)
        spots = np.column_stack([grid_u.ravel(), grid_v.ravel()])
        meterset = round(beam_dose_gy * MU_PER_GY * spec.modulation_factor, 2)
        beam = Dataset()
        beam.BeamNumber = number
        beam.BeamName = f"G{round(gantry):03d}"
        beam.BeamDescription = f"PBS field {number} of {len(gantries)}"
        beam.BeamType = "STATIC"
        beam.RadiationType = radiation
        if mass is not None:
            beam.RadiationMassNumber = mass
            beam.RadiationAtomicNumber = atomic
            beam.RadiationChargeState = charge
        beam.TreatmentMachineName = spec.machine_name
        beam.PrimaryDosimeterUnit = "MU"
        beam.TreatmentDeliveryType = "TREATMENT"
        beam.NumberOfWedges = 0
        beam.NumberOfCompensators = 0
        beam.NumberOfBoli = 0
        beam.NumberOfBlocks = 0
        beam.ScanMode = "MODULATED"
        beam.ModulatedScanModeType = "STATIONARY"  # spot scanning (step and shoot)
        beam.VirtualSourceAxisDistances = [2000.0, 2500.0]
        beam.NumberOfRangeShifters = 0
        beam.NumberOfLateralSpreadingDevices = 0
        beam.NumberOfRangeModulators = 0
        beam.PatientSupportType = "TABLE"
        beam.ReferencedPatientSetupNumber = 1
        beam.FinalCumulativeMetersetWeight = ds_str(2.0 * len(spots), 1)
        cps = []
        cumulative = 0.0
        for layer, energy in enumerate(energies):
            for k, weight_before in enumerate((cumulative, cumulative + len(spots))):
                cp = Dataset()
                cp.ControlPointIndex = 2 * layer + k
                cp.NominalBeamEnergy = ds_str(energy, 1)
                cp.CumulativeMetersetWeight = ds_str(weight_before, 1)
                if layer == 0 and k == 0:
                    cp.GantryAngle = ds_str(gantry, 1)
                    cp.GantryRotationDirection = "NONE"
                    cp.BeamLimitingDeviceAngle = "0"
                    cp.BeamLimitingDeviceRotationDirection = "NONE"
                    cp.PatientSupportAngle = "0"
                    cp.PatientSupportRotationDirection = "NONE"
                    cp.TableTopPitchAngle = 0.0
                    cp.TableTopPitchRotationDirection = "NONE"
                    cp.TableTopRollAngle = 0.0
                    cp.TableTopRollRotationDirection = "NONE"
                    cp.IsocenterPosition = [ds_str(c, 1) for c in iso]
                    cp.SnoutPosition = 300.0
                cp.ScanSpotTuneID = "SYN1"
                cp.NumberOfScanSpotPositions = len(spots)
                cp.ScanSpotPositionMap = [float(x) for x in spots.ravel()]
                cp.ScanSpotMetersetWeights = [1.0 if k == 0 else 0.0] * len(spots)
                cp.ScanningSpotSize = [6.0, 6.0] if spec.modality == "proton" else [4.0, 4.0]
                cp.NumberOfPaintings = 1
                cps.append(cp)
            cumulative += len(spots)
        beam.NumberOfControlPoints = len(cps)
        beam.IonControlPointSequence = Sequence(cps)
        beams.append(beam)
        ref = Dataset()
        ref.ReferencedBeamNumber = number
        ref.BeamDose = ds_str(beam_dose_gy, 4)
        ref.BeamMeterset = ds_str(meterset, 2)
        ref_beams.append(ref)
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = spec.fractions
    group.NumberOfBeams = len(beams)
    group.NumberOfBrachyApplicationSetups = 0
    group.ReferencedBeamSequence = Sequence(ref_beams)
    ds.FractionGroupSequence = Sequence([group])
    ds.IonBeamSequence = Sequence(beams)
    ds.ApprovalStatus = "APPROVED" if spec.approved else "UNAPPROVED"
    if spec.approved:
        ds.ReviewDate = ctx.study_date
        ds.ReviewTime = ctx.study_time
        ds.ReviewerName = "SYNTH^PHYSICIAN"
    return ds


def _add_references_and_setup(ds: Dataset, spec, roi_numbers: dict, uid_key, rtstruct_uid: str) -> None:
    """The structure set reference, DoseReferenceSequence (the two target prescriptions and the cord limit,
    each for a structure that is present: a planted missing OAR drops its reference) and a head-first-supine
    isocentric setup: what photon and ion plans share."""
    ss_ref = Dataset()
    ss_ref.ReferencedSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ss_ref.ReferencedSOPInstanceUID = rtstruct_uid
    ds.ReferencedStructureSetSequence = Sequence([ss_ref])
    refs = []
    for number, (roi, kind, dose_gy) in enumerate(
        (("PTV_70", "TARGET", spec.ptv70_rx_gy), ("PTV_56", "TARGET", spec.ptv56_rx_gy),
         ("SpinalCord", "ORGAN_AT_RISK", spec.cord_limit_gy)), start=1
    ):
        if roi not in roi_numbers:
            continue
        item = Dataset()
        item.DoseReferenceNumber = number
        item.DoseReferenceUID = synth_uid(uid_key, "dose-reference", number)
        item.DoseReferenceStructureType = "VOLUME"
        item.DoseReferenceDescription = roi
        item.ReferencedROINumber = roi_numbers[roi]
        item.DoseReferenceType = kind
        if kind == "TARGET":
            item.TargetPrescriptionDose = ds_str(dose_gy)
        else:
            item.OrganAtRiskMaximumDose = ds_str(dose_gy)
        refs.append(item)
    ds.DoseReferenceSequence = Sequence(refs)
    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = "HFS"
    setup.SetupTechnique = "ISOCENTRIC"
    ds.PatientSetupSequence = Sequence([setup])
