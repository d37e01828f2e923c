"""Instance bags for multiple-instance learning: a patient is a bag of tabular instances (one per organ or
target, plus one for the plan's protocol parameters) and a bag of spatial instances (3-D patches of dose and
CT on the dose grid, grouped into regions by the organ they touch most).

One code path for training and for the worker: both build a :class:`StructureMetrics` per structure and masks
on the dose grid, then call :func:`tabular_bag` and :func:`spatial_bag`. Training data come from
``synth.simulate_patient`` (:func:`bags_from_synthetic`, no files); the worker comes from a ``PlanStudy`` and its
per-structure DVH metrics (:func:`bags_from_plan_study`).

Units: dose features are divided by :data:`DOSE_SCALE_GY` (the 70 Gy high-dose prescription), volumes enter as
log(1 + cc), positions in units of :data:`POSITION_SCALE_MM`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

#: bump when the bags' features change: part of the training-data cache key (dataset.py)
BAGS_VERSION = "2"
DOSE_SCALE_GY = 70.0
POSITION_SCALE_MM = 30.0
PROTOCOL_FRACTIONS = 35

#: TG-263 names known to the structure-name embedding; index 0 is "unknown", the last is the plan instance.
STRUCTURE_VOCAB = (
    "<unknown>", "External", "GTV_70", "GTVn_70", "CTV_70", "PTV_70", "CTV_56", "PTV_56", "SpinalCord",
    "Brainstem", "Bone_Mandible", "Parotid_L", "Parotid_R", "Glnd_Submand_L", "Glnd_Submand_R", "Larynx",
    "Larynx_SG", "Glottis", "Musc_Constrict", "Musc_Constrict_S", "Musc_Constrict_M", "Musc_Constrict_I",
    "Esophagus", "Cavity_Oral", "Cochlea_L", "Cochlea_R", "OpticNrv_L", "OpticNrv_R", "OpticChiasm", "<plan>",
)
MAX_TABULAR_INSTANCES = 40
PLAN_INSTANCE = "<plan>"

#: protocol constraints (HN-SYNTH-SIB-70-56 v2, the synthetic cohort's trial protocol; rtqa_node/synth/protocol.py):
#: structure -> (metric, per-protocol limit Gy, minor limit Gy, +1 for an upper limit / -1 for a lower one)
CONSTRAINTS: dict[str, tuple[str, float, float, int]] = {
    "PTV_70": ("d95_gy", 68.6, 66.5, -1),
    "CTV_70": ("d98_gy", 66.5, 63.0, -1),
    "SpinalCord": ("max_gy", 45.0, 48.0, +1),
    "Brainstem": ("max_gy", 54.0, 57.0, +1),
}
#: the better-spared parotid's mean (QUANTEC): per protocol <= 26 Gy, minor <= 30 Gy
PAROTID_SPARED_MEAN_GY = (26.0, 30.0)
REQUIRED_OARS = ("SpinalCord", "Brainstem", "Parotid_L", "Parotid_R", "Musc_Constrict_S", "Larynx_SG")

TABULAR_FEATURES = (
    "log_volume_cc", "min", "mean", "max", "d98", "d95", "d50", "d2",
    "margin_per_protocol", "margin_minor", "is_target", "is_oar", "is_plan", "fraction_deviation",
    "missing_required_oars", "parotid_spared_margin_per_protocol", "parotid_spared_margin_minor",
)

#: organs whose neighbourhood becomes spatial instances; each is one region of the hierarchical model
SPATIAL_ORGANS = ("Parotid_L", "Parotid_R", "Glnd_Submand_L", "Glnd_Submand_R", "Musc_Constrict", "Larynx",
                  "Cavity_Oral")
PATCH_SHAPE = (4, 8, 8)  # (slices, rows, columns) of the dose grid
SPATIAL_CHANNELS = ("dose", "ct", "organ", "z", "y", "lateral")  # position: organ-relative, per voxel
#: per-patch features next to the voxels: organ fractions (one per SPATIAL_ORGANS), organ-relative position
PATCH_FEATURES = tuple(f"frac_{o}" for o in SPATIAL_ORGANS) + ("dz", "dy", "dlateral")
MIN_ORGAN_FRACTION = 0.05
_LOCAL = tuple(np.arange(n, dtype=np.float64) for n in PATCH_SHAPE)
MAX_PATCHES = 96


@dataclass(frozen=True, slots=True)
class StructureMetrics:
    """Whole-structure dose metrics (Gy) and volume (cc): what a DVH gives, whatever computed it."""

    structure: str
    volume_cc: float
    min_gy: float
    mean_gy: float
    max_gy: float
    d98_gy: float
    d95_gy: float
    d50_gy: float
    d2_gy: float

    def __post_init__(self) -> None:
        if self.volume_cc < 0 or self.min_gy < -1e-6:
            raise ValueError(f"{self.structure}: volume_cc and min_gy must be >= 0")


@dataclass(frozen=True)
class Bag:
    """One patient's instances, padded to a fixed count.

    instances: (N, F) float32 (tabular) or (N, C, Z, Y, X) float32 (spatial voxels); mask: (N,) bool, True for
    real instances; names: one per real instance (structure name, or ``"<organ>@z,y,x"`` for a patch).
    ``extra`` holds per-instance side information: tabular ``name_index`` (N,) int64; spatial ``features``
    (N, P) float32, ``region`` (N,) int64 (index into SPATIAL_ORGANS) and ``origin_index`` (N, 3) int64, the
    patch's first voxel on the dose grid.
    """

    instances: np.ndarray
    mask: np.ndarray
    names: tuple[str, ...]
    extra: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        if self.mask.shape != (self.instances.shape[0],):
            raise ValueError(f"mask shape {self.mask.shape} does not match {self.instances.shape[0]} instances")
        if len(self.names) != int(self.mask.sum()):
            raise ValueError(f"{len(self.names)} names for {int(self.mask.sum())} real instances")


def metrics_from_truth(name: str, organ: Mapping) -> StructureMetrics | None:
    """From the synthetic cohort's ground-truth organ record (manifest ``organs``); None when empty."""
    if not organ.get("points"):
        return None
    return StructureMetrics(name, float(organ["volume_cc"]), float(organ["min_gy"]), float(organ["mean_gy"]),
                            float(organ["max_gy"]), float(organ["d98_gy"]), float(organ["d95_gy"]),
                            float(organ["d50_gy"]), float(organ["d2_gy"]))


def metrics_from_dvh(m) -> StructureMetrics:
    """From ``rt.dvh.DvhMetrics``."""
    return StructureMetrics(m.structure, float(m.volume_cc), max(float(m.min_gy), 0.0), float(m.mean_gy),
                            float(m.max_gy), float(m.d98_gy), float(m.d95_gy), float(m.d50_gy), float(m.d2_gy))


def _margins(m: StructureMetrics) -> tuple[float, float]:
    """Signed distance past the per-protocol and minor limits, in units of DOSE_SCALE_GY (> 0: violated)."""
    if m.structure not in CONSTRAINTS:
        return 0.0, 0.0
    metric, per_protocol, minor, sign = CONSTRAINTS[m.structure]
    value = getattr(m, metric)
    return sign * (value - per_protocol) / DOSE_SCALE_GY, sign * (value - minor) / DOSE_SCALE_GY


def tabular_bag(metrics: Mapping[str, StructureMetrics], *, fractions: int | None,
                max_instances: int = MAX_TABULAR_INSTANCES) -> Bag:
    """One instance per structure plus one plan instance (fractionation vs the protocol). Known (TG-263
    vocabulary) names first, then unknown ones, each sorted; unknown names past ``max_instances`` are left out."""
    rows, names, index = [], [], []
    known = sorted(n for n in metrics if n in STRUCTURE_VOCAB)
    unknown = sorted(n for n in metrics if n not in STRUCTURE_VOCAB)
    for name in (known + unknown)[: max_instances - 1]:
        m = metrics[name]
        if name == "External":
            continue  # the body: its dose statistics say nothing a target or an organ does not
        pp, minor = _margins(m)
        is_target = name.startswith(("PTV", "CTV", "GTV"))
        rows.append([np.log1p(m.volume_cc) / 5.0, m.min_gy / DOSE_SCALE_GY, m.mean_gy / DOSE_SCALE_GY,
                     m.max_gy / DOSE_SCALE_GY, m.d98_gy / DOSE_SCALE_GY, m.d95_gy / DOSE_SCALE_GY,
                     m.d50_gy / DOSE_SCALE_GY, m.d2_gy / DOSE_SCALE_GY, pp * 10.0, minor * 10.0,
                     float(is_target), float(not is_target), 0.0, 0.0, 0.0, 0.0, 0.0])
        names.append(name)
        index.append(STRUCTURE_VOCAB.index(name) if name in STRUCTURE_VOCAB else 0)
    deviation = abs((fractions if fractions is not None else PROTOCOL_FRACTIONS) - PROTOCOL_FRACTIONS)
    # protocol: 35 fractions; 33-34 (|dev| <= 2) minor, anything further major
    missing = sum(o not in metrics for o in REQUIRED_OARS)
    parotids = [metrics[p].mean_gy for p in ("Parotid_L", "Parotid_R") if p in metrics]
    spared = min(parotids) if parotids else PAROTID_SPARED_MEAN_GY[1]
    rows.append([0.0] * 8 + [float(deviation > 0) - 0.5, float(deviation > 2) - 0.5, 0.0, 0.0, 1.0,
                             deviation / 5.0, missing / 2.0,
                             (spared - PAROTID_SPARED_MEAN_GY[0]) / DOSE_SCALE_GY * 10.0,
                             (spared - PAROTID_SPARED_MEAN_GY[1]) / DOSE_SCALE_GY * 10.0])
    names.append(PLAN_INSTANCE)
    index.append(STRUCTURE_VOCAB.index(PLAN_INSTANCE))
    x = np.zeros((max_instances, len(TABULAR_FEATURES)), dtype=np.float32)
    x[: len(rows)] = np.asarray(rows, dtype=np.float32)
    mask = np.zeros(max_instances, dtype=bool)
    mask[: len(rows)] = True
    name_index = np.zeros(max_instances, dtype=np.int64)
    name_index[: len(rows)] = index
    return Bag(x, mask, tuple(names), {"name_index": name_index})


def spatial_bag(dose_gy: np.ndarray, ct_hu: np.ndarray, masks: Mapping[str, np.ndarray], *,
                spacing_mm: tuple[float, float, float], max_patches: int = MAX_PATCHES) -> Bag:
    """Tile the dose grid into PATCH_SHAPE patches; keep those where a SPATIAL_ORGANS organ fills at least
    MIN_ORGAN_FRACTION of the voxels (the most-filled first when there are more than ``max_patches``).

    dose_gy, ct_hu: (Z, Y, X) on the dose grid; masks: organ -> (Z, Y, X) occupancy in [0, 1] on the same grid;
    spacing_mm: (slice, row, column) spacing. Channels: dose / 70 Gy, HU / 1000, occupancy of the patch's
    region organ, and each voxel's position relative to that organ's centroid (in POSITION_SCALE_MM, the lateral
    axis mirrored for right-sided organs, so left and right glands share one frame). Patch features: organ
    fractions and the patch centre's organ-relative position.
    """
    pz, py, px = PATCH_SHAPE
    masks = {o: m for o, m in masks.items() if o in SPATIAL_ORGANS}
    # every tile an organ touches lies in this box: work there (the organs are a few % of the dose grid), in the
    # box's own indices, and shift the patch origins back to the grid's at the end
    box = _patch_box(masks, dose_gy.shape) or tuple(slice(0, 0) for _ in PATCH_SHAPE)
    start = np.array([b.start for b in box], dtype=np.int64)
    dose_gy, ct_hu, masks = dose_gy[box], ct_hu[box], {o: m[box] for o, m in masks.items()}
    shape = np.asarray(dose_gy.shape)
    organs = [o for o in SPATIAL_ORGANS if o in masks and np.any(masks[o] > 0)]
    occ = np.zeros((len(SPATIAL_ORGANS),) + tuple(shape), dtype=np.float32)
    centroids = np.zeros((len(SPATIAL_ORGANS), 3))
    for o in organs:
        k = SPATIAL_ORGANS.index(o)
        occ[k] = masks[o]
        idx = np.argwhere(masks[o] > 0.5)
        centroids[k] = idx.mean(axis=0) if len(idx) else np.argwhere(masks[o] > 0).mean(axis=0)
    nz, ny, nx = (int(s) // p for s, p in zip(shape, PATCH_SHAPE))
    tiles = occ[:, : nz * pz, : ny * py, : nx * px].reshape(len(SPATIAL_ORGANS), nz, pz, ny, py, nx, px)
    fractions = tiles.mean(axis=(2, 4, 6))  # (K, nz, ny, nx)
    best = fractions.max(axis=0)
    keep = np.argwhere(best >= MIN_ORGAN_FRACTION)
    order = np.argsort(-best[tuple(keep.T)], kind="stable")[:max_patches]
    keep = keep[np.sort(order)]  # grid order: deterministic and independent of the ranking's ties
    n = len(keep)
    voxels = np.zeros((max_patches, len(SPATIAL_CHANNELS), pz, py, px), dtype=np.float32)
    features = np.zeros((max_patches, len(PATCH_FEATURES)), dtype=np.float32)
    region = np.zeros(max_patches, dtype=np.int64)
    origin = np.zeros((max_patches, 3), dtype=np.int64)
    names = []
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    for i, (a, b, c) in enumerate(keep):
        sl = (slice(a * pz, (a + 1) * pz), slice(b * py, (b + 1) * py), slice(c * px, (c + 1) * px))
        f = fractions[:, a, b, c]
        k = int(np.argmax(f))
        voxels[i, 0] = dose_gy[sl] / DOSE_SCALE_GY
        voxels[i, 1] = ct_hu[sl] / 1000.0
        voxels[i, 2] = occ[k][sl]
        centre = np.array([(a + 0.5) * pz, (b + 0.5) * py, (c + 0.5) * px]) - 0.5
        mirror = -1.0 if SPATIAL_ORGANS[k].endswith("_R") else 1.0
        d = (centre - centroids[k]) * spacing / POSITION_SCALE_MM
        features[i] = np.concatenate([f, [d[0], d[1], d[2] * mirror]])
        voxels[i, 3] = ((a * pz + _LOCAL[0] - centroids[k][0]) * spacing[0] / POSITION_SCALE_MM)[:, None, None]
        voxels[i, 4] = ((b * py + _LOCAL[1] - centroids[k][1]) * spacing[1] / POSITION_SCALE_MM)[None, :, None]
        voxels[i, 5] = ((c * px + _LOCAL[2] - centroids[k][2]) * spacing[2] * mirror / POSITION_SCALE_MM)[None, None, :]
        region[i] = k
        origin[i] = start + (a * pz, b * py, c * px)
        names.append(f"{SPATIAL_ORGANS[k]}@{origin[i][0]},{origin[i][1]},{origin[i][2]}")
    mask = np.zeros(max_patches, dtype=bool)
    mask[:n] = True
    return Bag(voxels, mask, tuple(names), {"features": features, "region": region, "origin_index": origin})


def risk_map(bag: Bag, voxel_attention: np.ndarray, grid_shape: tuple[int, int, int]) -> np.ndarray:
    """Scatter per-voxel attention mass (N, Z, Y, X) of a spatial bag back onto the dose grid (Z, Y, X)."""
    out = np.zeros(grid_shape, dtype=np.float32)
    pz, py, px = PATCH_SHAPE
    for i in np.flatnonzero(bag.mask):
        a, b, c = bag.extra["origin_index"][i]
        out[a:a + pz, b:b + py, c:c + px] += voxel_attention[i]
    return out


def patch_values(bag: Bag, volume: np.ndarray) -> np.ndarray:
    """Cut (N, Z, Y, X) patches of ``volume`` (on the dose grid) at the bag's patch positions (zeros on padding)."""
    pz, py, px = PATCH_SHAPE
    out = np.zeros((bag.mask.shape[0], pz, py, px), dtype=np.float32)
    for i in np.flatnonzero(bag.mask):
        a, b, c = bag.extra["origin_index"][i]
        out[i] = volume[a:a + pz, b:b + py, c:c + px]
    return out


# -- sources ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientBags:
    tabular: Bag
    spatial: Bag
    grid_shape: tuple[int, int, int]


def bags_from_synthetic(patient, config) -> PatientBags:
    """From ``synth.cohort.simulate_patient(config, i)`` output: truth metrics, masks and dose on the dose grid, CT painted
    on the dose grid with the patient's own noise stream (no files)."""
    from rtqa_node.synth.cohort import _CT_NOISE, _rng  # the generator's own CT stream
    from rtqa_node.synth.ct import ct_numbers

    organs = patient.truth["organs"]
    metrics = {n: m for n, o in organs.items() if (m := metrics_from_truth(n, o)) is not None}
    tab = tabular_bag(metrics, fractions=int(patient.truth["plan"]["fractions"]))
    rng = _rng(config, _CT_NOISE, patient.index)
    hu = ct_numbers(patient.phantom, patient.dose_grid, rng, hu_offset=patient.site.hu_offset).astype(np.float32)
    g = patient.dose_grid
    masks = {o: patient.structure_points[o].astype(np.float32) for o in SPATIAL_ORGANS if o in patient.structure_points}
    spa = spatial_bag(patient.dose_gy, hu, masks, spacing_mm=(g.slice_spacing_mm, g.pixel_spacing_mm, g.pixel_spacing_mm))
    return PatientBags(tab, spa, tuple(g.shape))


def bags_from_plan_study(study, metrics: Mapping[str, StructureMetrics] | None = None, *,
                         standard_names: Mapping[str, str] | None = None) -> PatientBags:
    """From a loaded ``PlanStudy`` (the worker's path).

    metrics: TG-263 name -> StructureMetrics when the review already computed the DVHs (``metrics_from_dvh``);
    otherwise they are computed here with the ``rt`` DVH engine. standard_names: structure name in the
    RTSTRUCT -> TG-263 name (the review's name matching); without it names are taken as they are.
    """
    from rtqa_node.rt.dvh import structure_dvh
    from rtqa_node.rt.geometry import rasterise_to_grid
    from rtqa_node.rt.plan_study import plan_dose

    dose = plan_dose(study)
    dose.require_gy()
    ss = study.structure_set_for(dose)
    standard = {s.name: (standard_names or {}).get(s.name) or s.name for s in ss.structures}
    if metrics is None:
        metrics = {}
        for s in ss.structures:
            name = standard[s.name]
            if name in STRUCTURE_VOCAB and name not in metrics and s.closed_planar:
                metrics[name] = metrics_from_dvh(structure_dvh(s, dose).metrics)
    plan = study.plan
    tab = tabular_bag(metrics, fractions=plan.number_of_fractions if plan is not None else None)
    g = dose.geometry
    masks = {}
    for s in ss.structures:
        name = standard[s.name]
        if name in SPATIAL_ORGANS and name not in masks and s.closed_planar:
            masks[name] = rasterise_to_grid(s, g)
    if study.ct is not None:
        hu = np.full(g.shape, -1000.0, dtype=np.float32)
        box = _patch_box(masks, g.shape)
        if box is not None:  # only tiles an organ touches become patches: resample the CT there alone
            hu[box] = _ct_on_grid(study.ct, g, box)
    else:
        hu = np.zeros(g.shape, dtype=np.float32)
    spacing = (float(g.spacing_mm[2]), float(g.spacing_mm[1]), float(g.spacing_mm[0]))
    spa = spatial_bag(dose.dose, hu, masks, spacing_mm=spacing)
    return PatientBags(tab, spa, tuple(g.shape))


def _patch_box(masks: Mapping[str, np.ndarray], shape: tuple[int, int, int]) -> tuple[slice, ...] | None:
    """The PATCH_SHAPE-aligned bounding box of every voxel an organ touches (None when no organ does): every
    patch :func:`spatial_bag` can keep lies inside it, since a kept tile holds some occupancy."""
    touched = None
    for m in masks.values():
        touched = m > 0 if touched is None else touched | (m > 0)
    if touched is None or not touched.any():
        return None
    box = []
    for axis, p in enumerate(PATCH_SHAPE):
        hit = np.flatnonzero(touched.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]) // p * p, min(shape[axis], (int(hit[-1]) // p + 1) * p)))
    return tuple(box)


def _ct_on_grid(ct, g, box: tuple[slice, ...] | None = None) -> np.ndarray:
    """CT HU resampled (trilinear) at the dose grid's voxel centres (within ``box`` of the grid when given);
    -1000 HU outside the CT."""
    from scipy.ndimage import map_coordinates

    box = box or tuple(slice(0, n) for n in g.shape)
    axes = [np.arange(n)[b] for n, b in zip(g.shape, box)]
    k, j, i = (a.reshape(-1, 1) for a in np.meshgrid(*axes, indexing="ij"))
    offsets = np.asarray(g.z_offsets_mm, dtype=np.float64)
    pts = (np.asarray(g.origin_mm)[None] + i * g.spacing_mm[0] * np.asarray(g.row_direction)[None]
           + j * g.spacing_mm[1] * np.asarray(g.column_direction)[None] + offsets[k] * g.normal[None])
    idx = ct.geometry.to_index(pts)
    hu = map_coordinates(ct.hu, idx.T, order=1, mode="constant", cval=-1000.0)
    return hu.reshape(tuple(len(a) for a in axes)).astype(np.float32)
