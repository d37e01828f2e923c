"""Contour QA: required structures present and non-empty, contours inside the body and the CT, left/right not
swapped, volumes plausible, targets enclosed by their PTV, no overlaps between organs that cannot overlap; and,
given a reference contour set, agreement metrics (Dice, 95 % Hausdorff distance, surface Dice, added path length).

Conventions:

- Laterality: DICOM patient coordinates (PS3.3 C.7.6.2.1.1) have +x towards the patient's *left* whatever the
  patient position, so a ``_L`` organ's centroid must lie at larger x than the midline (the External's centroid,
  or its ``_R`` partner). Beyond ``LATERALITY_TOLERANCE_MM`` on the wrong side: major (a swapped label sends the
  dose limits to the wrong organ).
- Enclosure: each CTV/GTV of dose level d must lie inside the union of the PTVs of level >= d (all PTVs when
  names carry no levels); measured as the fraction of its volume outside, on the dose grid with sub-voxel
  occupancy (``rtqa_node.rt.geometry.rasterise_to_grid``). The CTV-to-PTV margin (5th percentile of the distance
  from the CTV to the PTV's outside) is reported.
- Overlaps: organs at risk that are anatomically disjoint (TG-263 names; pairs where one contains the other,
  e.g. Lungs/Lung_L, SpinalCanal/SpinalCord, Larynx/Glottis, are exempt) overlapping by more than
  ``OVERLAP_INFO_PCT`` of the smaller one: info (small overlaps at organ interfaces, e.g. parotid and mandible,
  are common in clinical contours and harmless for the DVH), more than ``OVERLAP_MINOR_PCT``: minor (a
  duplicated or mislabelled contour).
- Plausible volumes: broad adult ranges (``PLAUSIBLE_VOLUME_CC``); outside: minor (a wrong unit, a stray
  contour on a far slice, or a structure contoured on a few slices only).
- Reference comparison (``compare_structure_sets``): masks on a common 1 mm in-plane grid over both structures;
  Dice; surfaces are the boundary voxels; HD95 is the larger of the two directed 95th percentiles of the
  surface distances; surface Dice at tolerance tau (Nikolov et al., J Med Internet Res 2021;23:e26151);
  added path length = length of the reference contour, slice by slice, farther than tau from the test contour
  (Vaassen et al., Phys Imaging Radiat Oncol 2020;13:1-6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from matplotlib.path import Path as MplPath
from scipy import ndimage

from rtqa_node.checks.names import NameMatch
from rtqa_node.review import Finding, Severity
from rtqa_node.rt.geometry import RasterSettings, rasterise_to_grid
from rtqa_node.rt.plan_study import CtVolume, GridGeometry, Structure, StructureSet

LATERALITY_TOLERANCE_MM = 5.0
OUTSIDE_BODY_TOLERANCE_MM = 3.0
OUTSIDE_BODY_PCT = 5.0
OUTSIDE_CT_TOLERANCE_MM = 1.0
ENCLOSURE_MINOR_PCT = 2.0
ENCLOSURE_MAJOR_PCT = 10.0
OVERLAP_INFO_PCT = 10.0
OVERLAP_MINOR_PCT = 50.0
REFERENCE_DICE_MINOR = 0.7

#: broad adult volume ranges (cc): around 3x the spread of typical volumes in contouring studies; a warning only
PLAUSIBLE_VOLUME_CC: dict[str, tuple[float, float]] = {
    "Parotid": (4.0, 90.0), "Glnd_Submand": (1.5, 30.0), "Brainstem": (8.0, 50.0), "Larynx": (4.0, 80.0),
    "Bone_Mandible": (15.0, 150.0), "Cavity_Oral": (10.0, 250.0), "Musc_Constrict": (3.0, 60.0),
    "Eye": (3.0, 15.0), "Lens": (0.05, 0.8), "OpticChiasm": (0.05, 3.0), "OpticNrv": (0.1, 3.0),
    "Cochlea": (0.01, 1.5), "Glnd_Thyroid": (3.0, 80.0), "Heart": (250.0, 1500.0), "Lung": (400.0, 5000.0),
    "Lungs": (1000.0, 9000.0), "Brain": (900.0, 2000.0), "Pituitary": (0.1, 2.5), "Liver": (700.0, 3500.0),
    "Kidney": (60.0, 400.0),
}

#: organ pairs allowed to overlap (one contains or abuts the other by definition)
_NESTED = {frozenset(p) for p in [("Lungs", "Lung_L"), ("Lungs", "Lung_R"), ("SpinalCanal", "SpinalCord"),
                                   ("Larynx", "Glottis"), ("Larynx", "Larynx_SG"), ("Esophagus", "Esophagus_Cerv"),
                                   ("Musc_Constrict", "Musc_Constrict_S"), ("Musc_Constrict", "Musc_Constrict_M"),
                                   ("Musc_Constrict", "Musc_Constrict_I"), ("Brain", "Brainstem"),
                                   ("Musc_Constrict", "Larynx"), ("Musc_Constrict_I", "Larynx"),
                                   ("Cavity_Oral", "Lips"), ("Brain", "Lobe_Temporal_L"),
                                   ("Brain", "Lobe_Temporal_R"), ("Brain", "Pituitary")]}


def _base(standard: str) -> str:
    return standard[:-2] if standard.endswith(("_L", "_R")) else standard


def _centroid_mm(s: Structure) -> np.ndarray | None:
    """Area-weighted centroid of the closed planar contours (even-odd areas not resolved: holes are rare)."""
    total, acc = 0.0, np.zeros(3)
    for c in s.closed_planar:
        x, y = c.points_mm[:, 0], c.points_mm[:, 1]
        cross = x * np.roll(y, -1) - np.roll(x, -1) * y
        area = cross.sum() / 2.0
        if abs(area) < 1e-9:
            continue
        cx = ((x + np.roll(x, -1)) * cross).sum() / (6 * area)
        cy = ((y + np.roll(y, -1)) * cross).sum() / (6 * area)
        total += abs(area)
        acc += abs(area) * np.array([cx, cy, c.z_mm])
    return acc / total if total > 0 else None


def _planar_volume_cc(s: Structure) -> float:
    planes = s.planes()
    if not planes:
        return 0.0
    zs = np.array([z for z, _ in planes])
    gap = float(np.median(np.diff(zs))) if len(zs) > 1 else 3.0
    area = 0.0
    for _, polys in planes:
        for xy in polys:
            x, y = xy[:, 0], xy[:, 1]
            area += abs((x * np.roll(y, -1) - np.roll(x, -1) * y).sum() / 2.0)
    return area * gap / 1000.0


def required_structures(required, by_standard: dict[str, Structure], protocol_id: str) -> list[Finding]:
    """Protocol structures missing or empty; ``required``: protocol RequiredStructure items."""
    out = []
    for item in required:
        s = by_standard.get(item.name)
        if s is not None and s.has_volume:
            continue
        sev = Severity(item.if_missing)
        what = "missing" if s is None else "empty (no closed contour)"
        out.append(Finding("contour.required_structure_missing" if s is None else "contour.required_structure_empty",
                           sev, f"{item.name} required by {protocol_id} is {what}", {"protocol": protocol_id},
                           item.name))
    return out


def empty_structures(structure_set: StructureSet) -> list[Finding]:
    return [Finding("contour.empty_structure", Severity.INFO, f"{s.name}: no closed planar contour", {}, s.name)
            for s in structure_set.structures if not s.has_volume and s.interpreted_type not in ("MARKER",
                                                                                                  "ISOCENTER")
            and not any(c.geometric_type == "POINT" for c in s.contours)]


def unknown_names(matches: dict[str, NameMatch]) -> list[Finding]:
    """Names that match no TG-263 name: reported, never dropped (their DVHs are still computed)."""
    out = []
    for name, m in matches.items():
        if m.standard is None:
            out.append(Finding("names.unknown_structure", Severity.INFO,
                               f"{name!r} matches no TG-263 standard name", {"name": name}, name))
    seen: dict[str, str] = {}
    for name, m in matches.items():
        if m.standard is None:
            continue
        if m.standard in seen:
            out.append(Finding("names.duplicate_standard_name", Severity.MINOR,
                               f"{seen[m.standard]!r} and {name!r} both read as {m.standard}; the first is used",
                               {"names": [seen[m.standard], name]}, m.standard))
        else:
            seen[m.standard] = name
    return out


def _inside_mask(points_xy: np.ndarray, polygons: list[np.ndarray]) -> np.ndarray:
    inside = np.zeros(len(points_xy), dtype=bool)
    for poly in polygons:
        inside ^= MplPath(poly).contains_points(points_xy)
    return inside


def _distance_to_polygons(points_xy: np.ndarray, polygons: list[np.ndarray]) -> np.ndarray:
    best = np.full(len(points_xy), np.inf)
    for poly in polygons:
        a = poly
        b = np.roll(poly, -1, axis=0)
        ab = b - a  # (M, 2)
        denom = np.maximum((ab ** 2).sum(axis=1), 1e-12)
        ap = points_xy[:, None, :] - a[None]  # (N, M, 2)
        t = np.clip((ap * ab[None]).sum(axis=2) / denom[None], 0, 1)
        closest = a[None] + t[..., None] * ab[None]
        d = np.sqrt(((points_xy[:, None, :] - closest) ** 2).sum(axis=2)).min(axis=1)
        best = np.minimum(best, d)
    return best


def outside_body(by_display: dict[str, Structure], external: Structure | None,
                 matches: dict[str, NameMatch]) -> list[Finding]:
    """Contour points more than 3 mm outside the External on the same plane (targets: major, others: minor)."""
    if external is None or not external.has_volume:
        return []
    body_planes = external.planes()
    body_z = np.array([z for z, _ in body_planes])
    half = (float(np.median(np.diff(body_z))) / 2 if len(body_z) > 1 else 1.5) + 0.01
    out = []
    for name, s in by_display.items():
        if s is external or not s.has_volume:
            continue
        n_total = n_out = 0
        for z, polys in s.planes():
            pts = np.concatenate(polys)
            n_total += len(pts)
            k = int(np.argmin(np.abs(body_z - z)))
            if abs(body_z[k] - z) > half:
                n_out += len(pts)  # a plane beyond the body's first/last contour
                continue
            inside = _inside_mask(pts, body_planes[k][1])
            if (~inside).any():
                far = _distance_to_polygons(pts[~inside], body_planes[k][1]) > OUTSIDE_BODY_TOLERANCE_MM
                n_out += int(far.sum())
        pct = n_out / n_total * 100 if n_total else 0.0
        if pct > OUTSIDE_BODY_PCT:
            is_target = matches.get(name) is not None and matches[name].is_target
            out.append(Finding("contour.outside_body", Severity.MAJOR if is_target else Severity.MINOR,
                               f"{name}: {pct:.0f} % of its contour points lie more than "
                               f"{OUTSIDE_BODY_TOLERANCE_MM:g} mm outside the External",
                               {"outside_pct": round(pct, 1)}, name))
    return out


def outside_ct(by_display: dict[str, Structure], ct: CtVolume | None) -> list[Finding]:
    """Contour points beyond the CT volume (a structure drawn where there is no image)."""
    if ct is None:
        return []
    g = ct.geometry
    shape = np.asarray(g.shape, dtype=np.float64)
    spacing = np.asarray([g.spacing_mm[2], g.spacing_mm[1], g.spacing_mm[0]])
    outside: dict[str, float] = {}
    for name, s in by_display.items():
        if not s.has_volume:
            continue
        pts = np.concatenate([c.points_mm for c in s.closed_planar])
        idx = g.to_index(pts)
        past = (np.clip(-0.5 - idx, 0, None) + np.clip(idx - (shape - 0.5), 0, None)) * spacing
        far = np.sqrt((past ** 2).sum(axis=1)) > OUTSIDE_CT_TOLERANCE_MM
        if far.any():
            outside[name] = round(float(far.mean() * 100), 2)
    if not outside:
        return []
    listed = ", ".join(f"{n} {p:.0f} %" for n, p in sorted(outside.items()))
    return [Finding("contour.outside_ct", Severity.MINOR,
                    f"contour points outside the CT volume ({g.shape[0]} slices): {listed}",
                    {"outside_pct": outside}, None if len(outside) > 1 else next(iter(outside)))]


def laterality(by_standard: dict[str, Structure], external: Structure | None) -> list[Finding]:
    """``_L``/``_R`` organs on the wrong side of the midline (see the module docstring)."""
    midline_x = None
    if external is not None and external.has_volume:
        c = _centroid_mm(external)
        midline_x = float(c[0]) if c is not None else None
    out = []
    bases = sorted({_base(n) for n in by_standard if n.endswith(("_L", "_R"))})
    for base in bases:
        left, right = by_standard.get(f"{base}_L"), by_standard.get(f"{base}_R")
        cl = _centroid_mm(left) if left is not None and left.has_volume else None
        cr = _centroid_mm(right) if right is not None and right.has_volume else None
        if cl is not None and cr is not None:
            mid = midline_x if midline_x is not None else (cl[0] + cr[0]) / 2
            swapped = cl[0] < cr[0] - LATERALITY_TOLERANCE_MM
            wrong = [(f"{base}_L", cl) for _ in [0] if cl[0] < mid - LATERALITY_TOLERANCE_MM] + \
                    [(f"{base}_R", cr) for _ in [0] if cr[0] > mid + LATERALITY_TOLERANCE_MM]
            if swapped or wrong:
                out.append(Finding(
                    "contour.laterality_swapped", Severity.MAJOR,
                    f"{base}_L (x {cl[0]:.1f} mm) and {base}_R (x {cr[0]:.1f} mm) are on the wrong sides "
                    f"(patient left is +x; midline x {mid:.1f} mm)" if swapped else
                    f"{', '.join(n for n, _ in wrong)} on the wrong side of the midline (x {mid:.1f} mm)",
                    {"left_x_mm": round(float(cl[0]), 1), "right_x_mm": round(float(cr[0]), 1),
                     "midline_x_mm": round(float(mid), 1)}, f"{base}_L/{base}_R"))
        elif midline_x is not None:
            for name, c, sign in ((f"{base}_L", cl, 1), (f"{base}_R", cr, -1)):
                if c is not None and sign * (c[0] - midline_x) < -LATERALITY_TOLERANCE_MM:
                    out.append(Finding("contour.laterality_swapped", Severity.MAJOR,
                                       f"{name} centroid x {c[0]:.1f} mm is on the wrong side of the midline "
                                       f"(x {midline_x:.1f} mm; patient left is +x)",
                                       {"x_mm": round(float(c[0]), 1), "midline_x_mm": round(midline_x, 1)}, name))
    return out


def volumes(by_standard: dict[str, Structure], volume_cc: dict[str, float]) -> list[Finding]:
    """Volumes outside the plausible adult range (``volume_cc``: standard name -> cc, e.g. from the DVHs)."""
    out = []
    for name, s in by_standard.items():
        base = _base(name)
        if base not in PLAUSIBLE_VOLUME_CC or not s.has_volume:
            continue
        v = volume_cc.get(name)
        if v is None or not math.isfinite(v):
            v = _planar_volume_cc(s)
        lo, hi = PLAUSIBLE_VOLUME_CC[base]
        if not lo <= v <= hi:
            out.append(Finding("contour.implausible_volume", Severity.MINOR,
                               f"{name}: {v:.2f} cc, outside the plausible range {lo:g}-{hi:g} cc",
                               {"volume_cc": round(v, 3), "range_cc": [lo, hi]}, name))
    return out


# -- masks on a shared grid -------------------------------------------------------------------------------------


def _bbox(structures: list[Structure]) -> tuple[np.ndarray, np.ndarray]:
    pts = np.concatenate([c.points_mm for s in structures for c in s.closed_planar])
    return pts.min(axis=0), pts.max(axis=0)


def subgrid(grid: GridGeometry, lo_mm: np.ndarray, hi_mm: np.ndarray, margin_mm: float = 6.0) -> GridGeometry:
    """The part of an axial grid around a box (+ margin); the same voxel centres, fewer of them."""
    idx = np.stack([grid.to_index(np.asarray([lo_mm - margin_mm])), grid.to_index(np.asarray([hi_mm + margin_mm]))])
    idx = idx[:, 0, :]
    k0, j0, i0 = np.floor(np.nanmin(idx, axis=0)).astype(int)
    k1, j1, i1 = np.ceil(np.nanmax(idx, axis=0)).astype(int)
    nf, nr, nc = grid.shape
    k0, j0, i0 = max(k0, 0), max(j0, 0), max(i0, 0)
    k1, j1, i1 = min(k1, nf - 1), min(j1, nr - 1), min(i1, nc - 1)
    k1, j1, i1 = max(k1, k0), max(j1, j0), max(i1, i0)
    origin = (np.asarray(grid.origin_mm) + i0 * grid.spacing_mm[0] * np.asarray(grid.row_direction)
              + j0 * grid.spacing_mm[1] * np.asarray(grid.column_direction)
              + grid.z_offsets_mm[k0] * grid.normal)
    offsets = tuple(float(z - grid.z_offsets_mm[k0]) for z in grid.z_offsets_mm[k0:k1 + 1])
    return GridGeometry(tuple(float(v) for v in origin), grid.row_direction, grid.column_direction,
                        grid.spacing_mm, (k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1), offsets)


def _padded_grid(lo_mm: np.ndarray, hi_mm: np.ndarray, spacing_mm: tuple[float, float, float],
                 margin_mm: float = 6.0) -> GridGeometry:
    lo, hi = lo_mm - margin_mm, hi_mm + margin_mm
    n = np.maximum(np.ceil((hi - lo) / np.asarray(spacing_mm)).astype(int) + 1, 1)
    return GridGeometry(tuple(float(v) for v in lo), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), spacing_mm,
                        (int(n[2]), int(n[1]), int(n[0])), tuple(float(k * spacing_mm[2]) for k in range(n[2])))


#: masks for QA geometry (enclosure, overlap) need not be DVH-accurate: a coarser lattice, ~10x faster
QA_RASTER = RasterSettings(min_samples_across=24, max_subdivision=4)


class _Masks:
    """Occupancy of structures on one axial grid, each computed once on its own window of that grid (the
    window's voxel offset kept), so that pairs are compared on the overlap of their windows."""

    def __init__(self, grid: GridGeometry) -> None:
        self.grid = grid
        self._cache: dict[int, tuple[tuple[int, int, int], np.ndarray]] = {}

    def _window(self, s: Structure) -> tuple[tuple[int, int, int], np.ndarray]:
        key = id(s)
        if key not in self._cache:
            lo, hi = _bbox([s])
            g = subgrid(self.grid, lo, hi, margin_mm=3.0)
            idx = self.grid.to_index(np.asarray([g.origin_mm]))[0]
            offset = tuple(round(float(v)) for v in idx)
            self._cache[key] = (offset, rasterise_to_grid(s, g, QA_RASTER))
        return self._cache[key]

    def on_common(self, structures: list[Structure]) -> tuple[GridGeometry, list[np.ndarray]]:
        """Occupancies of the structures on the bounding window of all of them (zeros outside each)."""
        wins = [self._window(s) for s in structures]
        lo = np.min([w[0] for w in wins], axis=0)
        hi = np.max([np.asarray(w[0]) + np.asarray(w[1].shape) for w in wins], axis=0)
        out = []
        for (off, occ) in wins:
            full = np.zeros(tuple(hi - lo), dtype=np.float32)
            a = np.asarray(off) - lo
            full[a[0]:a[0] + occ.shape[0], a[1]:a[1] + occ.shape[1], a[2]:a[2] + occ.shape[2]] = occ
            out.append(full)
        g = self.grid
        origin = (np.asarray(g.origin_mm) + lo[2] * g.spacing_mm[0] * np.asarray(g.row_direction)
                  + lo[1] * g.spacing_mm[1] * np.asarray(g.column_direction) + g.z_offsets_mm[lo[0]] * g.normal)
        offsets = tuple(float(z - g.z_offsets_mm[lo[0]]) for z in g.z_offsets_mm[lo[0]:hi[0]])
        common = GridGeometry(tuple(float(v) for v in origin), g.row_direction, g.column_direction, g.spacing_mm,
                              tuple(int(v) for v in hi - lo), offsets)
        return common, out

    def overlap(self, a: Structure, b: Structure) -> tuple[float, float, float]:
        """(intersection, occupancy of a, occupancy of b) in voxels, on the overlap of their windows."""
        (oa_off, oa), (ob_off, ob) = self._window(a), self._window(b)
        lo = np.maximum(oa_off, ob_off)
        hi = np.minimum(np.asarray(oa_off) + oa.shape, np.asarray(ob_off) + ob.shape)
        total_a, total_b = float(oa.sum()), float(ob.sum())
        if np.any(hi <= lo):
            return 0.0, total_a, total_b
        sa = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, oa_off))
        sb = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, ob_off))
        return float(np.minimum(oa[sa], ob[sb]).sum()), total_a, total_b


def _level(m: NameMatch) -> float | None:
    return m.dose_gy


def enclosure(by_display: dict[str, Structure], matches: dict[str, NameMatch], grid: GridGeometry | None,
              *, expected_margin_mm: float | None = None) -> tuple[list[Finding], dict]:
    """CTVs/GTVs inside their PTVs (see the module docstring); returns findings and margins per CTV/GTV."""
    if grid is None or not grid.is_axial:
        return [], {}
    ptvs = [(n, s, matches[n]) for n, s in by_display.items()
            if matches.get(n) and matches[n].standard and matches[n].standard.startswith("PTV") and s.has_volume]
    inner = [(n, s, matches[n]) for n, s in by_display.items()
             if matches.get(n) and matches[n].standard and matches[n].standard[:3] in ("CTV", "GTV")
             and s.has_volume]
    if not ptvs or not inner:
        return [], {}
    masks = _Masks(grid)
    out, margins = [], {}
    for name, s, m in inner:
        level = _level(m)
        if level is not None and any(_level(pm) is not None for _, _, pm in ptvs):
            enclosing = [(pn, ps) for pn, ps, pm in ptvs if _level(pm) is not None and _level(pm) >= level - 1e-6]
        else:
            enclosing = [(pn, ps) for pn, ps, _ in ptvs]
        if not enclosing:
            continue
        g, occ = masks.on_common([s] + [ps for _, ps in enclosing])
        inner_occ = occ[0]
        union = np.clip(np.sum(occ[1:], axis=0), 0, 1)
        total = float(inner_occ.sum())
        if total <= 0:
            continue
        outside_pct = float(np.clip(inner_occ - union, 0, None).sum() / total * 100)
        # margin: distance from the inner structure's voxels to the outside of the PTV union
        inside_ptv = union >= 0.5
        sampling = (g.spacing_mm[2], g.spacing_mm[1], g.spacing_mm[0])
        dist = ndimage.distance_transform_edt(inside_ptv, sampling=sampling)
        surface = (inner_occ >= 0.5) & ~ndimage.binary_erosion(inner_occ >= 0.5)
        margin_p5 = float(np.percentile(dist[surface], 5)) if surface.any() else float("nan")
        margins[name] = {"enclosed_by": [pn for pn, _ in enclosing], "outside_pct": round(outside_pct, 2),
                         "margin_p5_mm": round(margin_p5, 2) if math.isfinite(margin_p5) else None}
        if outside_pct > ENCLOSURE_MINOR_PCT:
            sev = Severity.MAJOR if outside_pct > ENCLOSURE_MAJOR_PCT else Severity.MINOR
            out.append(Finding("contour.target_not_enclosed", sev,
                               f"{name}: {outside_pct:.1f} % of its volume lies outside "
                               f"{' + '.join(pn for pn, _ in enclosing)}",
                               {"outside_pct": round(outside_pct, 2), "enclosed_by": [pn for pn, _ in enclosing],
                                "margin_p5_mm": margins[name]["margin_p5_mm"]}, name))
        elif (expected_margin_mm is not None and math.isfinite(margin_p5) and m.standard.startswith("CTV")
              and margin_p5 < expected_margin_mm - max(g.spacing_mm[0], g.spacing_mm[1])):
            out.append(Finding("contour.ptv_margin", Severity.INFO,
                               f"{name}: CTV-to-PTV margin (5th percentile) {margin_p5:.1f} mm, protocol "
                               f"{expected_margin_mm:g} mm (voxel size {g.spacing_mm[0]:.1f} mm)",
                               {"margin_p5_mm": round(margin_p5, 2), "expected_mm": expected_margin_mm}, name))
    return out, margins


def overlaps(by_standard: dict[str, Structure], grid: GridGeometry | None) -> list[Finding]:
    """Organs at risk that overlap although anatomically disjoint (see the module docstring)."""
    if grid is None or not grid.is_axial:
        return []
    oars = {n: s for n, s in by_standard.items()
            if s.has_volume and n != "External" and n[:3] not in ("GTV", "CTV", "ITV", "PTV") and "_PRV" not in n}
    names = sorted(oars)
    boxes = {n: _bbox([oars[n]]) for n in names}
    masks = _Masks(grid)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if frozenset((a, b)) in _NESTED:
                continue
            (alo, ahi), (blo, bhi) = boxes[a], boxes[b]
            if np.any(np.minimum(ahi, bhi) < np.maximum(alo, blo)):
                continue
            inter, va, vb = masks.overlap(oars[a], oars[b])
            smaller = min(va, vb)
            if smaller <= 0:
                continue
            pct = inter / smaller * 100
            if pct > OVERLAP_INFO_PCT:
                cc = inter * grid.voxel_volume_mm3() / 1000
                sev = Severity.MINOR if pct > OVERLAP_MINOR_PCT else Severity.INFO
                out.append(Finding("contour.unexpected_overlap", sev,
                                   f"{a} and {b} overlap by {cc:.2f} cc ({pct:.0f} % of the smaller)",
                                   {"overlap_cc": round(cc, 3), "overlap_pct": round(pct, 1)}, f"{a}/{b}"))
    return out


# -- reference comparison ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """Test contour vs reference contour of one structure (units in the names)."""

    structure: str
    dice: float
    hd95_mm: float
    surface_dice: float
    tolerance_mm: float
    added_path_length_mm: float
    volume_cc: float
    reference_volume_cc: float

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                for k, v in self.__dict__.items()}


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def agreement(test: Structure, reference: Structure, *, name: str, tolerance_mm: float = 2.0,
              in_plane_mm: float = 1.0) -> Agreement:
    """Dice, HD95, surface Dice and added path length of two contours of one structure (module docstring)."""
    lo, hi = _bbox([test, reference])
    zs = sorted({round(z, 3) for s in (test, reference) for z, _ in s.planes()})
    dz = float(np.median(np.diff(zs))) if len(zs) > 1 else 3.0
    grid = _padded_grid(lo, hi, (in_plane_mm, in_plane_mm, dz), margin_mm=max(2 * dz, 4.0))
    a = rasterise_to_grid(test, grid) >= 0.5
    b = rasterise_to_grid(reference, grid) >= 0.5
    voxel_cc = grid.voxel_volume_mm3() / 1000
    na, nb = int(a.sum()), int(b.sum())
    dice = 2 * int((a & b).sum()) / (na + nb) if na + nb else float("nan")
    sampling = (dz, in_plane_mm, in_plane_mm)
    sa, sb = _surface(a), _surface(b)
    if not sa.any() or not sb.any():
        return Agreement(name, dice, float("nan"), float("nan"), tolerance_mm, float("nan"), na * voxel_cc,
                         nb * voxel_cc)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=sampling)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=sampling)
    d_ab, d_ba = dist_to_b[sa], dist_to_a[sb]
    hd95 = float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))
    sdice = float(((d_ab <= tolerance_mm).sum() + (d_ba <= tolerance_mm).sum()) / (len(d_ab) + len(d_ba)))
    apl = 0.0
    for k in range(grid.shape[0]):
        ref2 = b[k] & ~ndimage.binary_erosion(b[k], border_value=0)
        if not ref2.any():
            continue
        test2 = a[k] & ~ndimage.binary_erosion(a[k], border_value=0)
        if not test2.any():
            apl += float(ref2.sum()) * in_plane_mm
            continue
        d2 = ndimage.distance_transform_edt(~test2, sampling=(in_plane_mm, in_plane_mm))
        apl += float((d2[ref2] > tolerance_mm).sum()) * in_plane_mm
    return Agreement(name, dice, hd95, sdice, tolerance_mm, apl, na * voxel_cc, nb * voxel_cc)


def compare_structure_sets(test: dict[str, Structure], reference: dict[str, Structure], *,
                           tolerance_mm: float = 2.0) -> tuple[list[Agreement], list[Finding]]:
    """Agreement for every TG-263 name present in both (``test``/``reference``: standard name -> Structure)."""
    results, findings = [], []
    for name in sorted(set(test) & set(reference)):
        t, r = test[name], reference[name]
        if not (t.has_volume and r.has_volume) or name == "External":
            continue
        ag = agreement(t, r, name=name, tolerance_mm=tolerance_mm)
        results.append(ag)
        if math.isfinite(ag.dice) and ag.dice < REFERENCE_DICE_MINOR:
            findings.append(Finding("contour.reference_disagreement", Severity.MINOR,
                                    f"{name}: Dice {ag.dice:.2f} with the reference contour (HD95 {ag.hd95_mm:.1f} mm,"
                                    f" surface Dice {ag.surface_dice:.2f} at {tolerance_mm:g} mm)",
                                    ag.to_json(), name))
    for name in sorted(set(reference) - set(test)):
        if reference[name].has_volume and name != "External":
            findings.append(Finding("contour.reference_structure_missing", Severity.INFO,
                                    f"{name} is in the reference structure set but not in the plan's", {}, name))
    return results, findings
