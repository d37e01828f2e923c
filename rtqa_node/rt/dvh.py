"""Dose-volume histograms and dose metrics from a structure and a dose grid.

Method. A structure is voxelised (``geometry.voxelise``) into thin slabs on a lattice a few times finer than the
dose grid (finer still for small structures). The dose is interpolated trilinearly at every covered lattice pixel
(separably for axial grids: linear in z between frames, then a bilinear matrix product per slab). Each sample
carries its volume (coverage x pixel area x slab thickness) and, so that a finite lattice does not turn a smooth
dose into a comb of values, a dose *interval*: uniform, of width sqrt(sum (g_i h_i)^2) from the local gradient g
and the sample's extent h (the same variance as the dose over the sample's box). A partly covered pixel is
sampled at the centre of its covered part: (1 - c)/2 pixels inward along the coverage gradient, extent c pixels
along it. The cumulative DVH is the exact
sum of these ramps on a fine dose axis (built by a second-order difference accumulation, O(N)).

- Dmin/Dmax: over samples at least half inside and over the boundary points (contour vertices on their planes and
  on the end-cap faces), where a linear dose takes its extremes.
- Dx% / Dxcc: the largest dose D with V(>= D) >= x, linear between the fine DVH's edges.
- Volume outside the dose grid (a BODY reaching past it) is clipped from the DVH and reported.

Units: Gy (Gy(RBE) for EFFECTIVE doses; ``unit`` says which), cc, percent of the structure's volume in the grid.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from rtqa_node.rt.geometry import RasterSettings, Voxelisation, voxelise
from rtqa_node.rt.plan_study import DoseGrid, GridGeometry, Structure

log = logging.getLogger(__name__)

MAX_BINS = 40_000


@dataclass(frozen=True)
class Dvh:
    """A cumulative DVH: ``volume_cc[m]`` receives at least ``dose_gy[m]``; ``dose_gy`` ascending, from 0."""

    dose_gy: np.ndarray = field(repr=False)
    volume_cc: np.ndarray = field(repr=False)
    total_cc: float

    def __post_init__(self) -> None:
        if self.total_cc < 0:
            raise ValueError(f"total_cc must be >= 0, got {self.total_cc}")
        if len(self.dose_gy) != len(self.volume_cc):
            raise ValueError("dose_gy and volume_cc differ in length")

    @property
    def volume_pct(self) -> np.ndarray:
        return self.volume_cc / self.total_cc * 100.0 if self.total_cc > 0 else np.zeros_like(self.volume_cc)

    def differential(self) -> tuple[np.ndarray, np.ndarray]:
        """(bin centres in Gy, volume in cc per bin)."""
        return 0.5 * (self.dose_gy[1:] + self.dose_gy[:-1]), -np.diff(self.volume_cc)

    def dose_at_volume_cc(self, volume_cc: float) -> float:
        """Minimum dose to the hottest ``volume_cc`` (Gy): the largest D with V(>= D) >= volume_cc."""
        if self.total_cc <= 0:
            return float("nan")
        target = min(max(volume_cc, 0.0), self.total_cc)
        v = self.volume_cc
        above = np.nonzero(v >= target)[0]
        m = int(above[-1]) if len(above) else 0
        if m >= len(v) - 1 or v[m] == v[m + 1]:
            return float(self.dose_gy[m])
        frac = (v[m] - target) / (v[m] - v[m + 1])
        return float(self.dose_gy[m] + frac * (self.dose_gy[m + 1] - self.dose_gy[m]))

    def dose_at_volume_pct(self, pct: float) -> float:
        return self.dose_at_volume_cc(pct / 100.0 * self.total_cc)

    def volume_at_dose_cc(self, dose_gy: float) -> float:
        """V(>= dose_gy) in cc."""
        return float(np.interp(dose_gy, self.dose_gy, self.volume_cc, right=0.0))

    def volume_at_dose_pct(self, dose_gy: float) -> float:
        return self.volume_at_dose_cc(dose_gy) / self.total_cc * 100.0 if self.total_cc > 0 else float("nan")

    def geud_gy(self, a: float) -> float:
        """Generalised EUD (Niemierko 1999): (sum v_i D_i^a)^(1/a), v_i fractional volumes. a != 0."""
        if a == 0:
            raise ValueError("gEUD parameter a must be non-zero")
        centres, vol = self.differential()
        total = vol.sum()
        if total <= 0:
            return float("nan")
        centres = np.maximum(centres, 1e-9)
        return float((np.sum(vol / total * centres ** a)) ** (1.0 / a))

    def resampled(self, step_gy: float) -> tuple[np.ndarray, np.ndarray]:
        """(dose_gy, volume_pct) at a regular step from 0 to past the maximum, for reports."""
        top = float(self.dose_gy[-1])
        doses = np.arange(0.0, top + step_gy, step_gy)
        return doses, np.interp(doses, self.dose_gy, self.volume_pct, right=0.0)


@dataclass(frozen=True)
class DvhMetrics:
    structure: str
    roi_number: int
    unit: str  # "Gy" or "Gy(RBE)"
    volume_cc: float  # geometric volume of the structure (end caps per the settings)
    volume_outside_dose_cc: float  # part of it outside the dose grid, not in the DVH
    min_gy: float
    mean_gy: float
    max_gy: float
    d99_gy: float
    d98_gy: float
    d95_gy: float
    d50_gy: float
    d5_gy: float
    d2_gy: float
    d1_gy: float
    d0_03cc_gy: float
    homogeneity_index: float  # ICRU 83: (D2% - D98%) / D50%

    def __post_init__(self) -> None:
        if self.volume_cc < 0 or self.volume_outside_dose_cc < 0:
            raise ValueError(f"{self.structure}: volumes must be >= 0")


@dataclass(frozen=True)
class StructureDvh:
    metrics: DvhMetrics
    dvh: Dvh


# -- dose sampling ----------------------------------------------------------------------------------------------


def _axis_weights(coords_mm: np.ndarray, origin_mm: float, spacing_mm: float, n: int):
    """Linear-interpolation matrix (len(coords), n) and an inside mask; half a voxel past the ends is clamped."""
    u = (coords_mm - origin_mm) / spacing_mm
    inside = (u >= -0.5) & (u <= n - 0.5)
    u = np.clip(u, 0, n - 1)
    i0 = np.minimum(np.floor(u).astype(np.int64), max(n - 2, 0))
    f = u - i0 if n > 1 else np.zeros_like(u)
    w = np.zeros((len(coords_mm), n), dtype=np.float64)
    rows = np.arange(len(coords_mm))
    w[rows, i0] += 1.0 - f
    if n > 1:
        w[rows, i0 + 1] += f
    w[~inside] = 0.0
    return w, inside


@dataclass(frozen=True)
class _Samples:
    dose_gy: np.ndarray
    weight_mm3: np.ndarray
    width_gy: np.ndarray
    solid: np.ndarray  # coverage >= 0.5: counts for Dmin / Dmax
    outside_mm3: float
    # dose range at the grid nodes inside interior blocks (whose samples sit at block centres): Dmin / Dmax
    node_range_gy: tuple[float, float] | None = None


def _slab_groups(vox: Voxelisation, target_mm: float) -> np.ndarray:
    """Group index per slab: runs of contiguous slabs, each run at most ``target_mm`` thick (at least one slab)."""
    z_lo = vox.z_mm - vox.thickness_mm / 2
    z_hi = vox.z_mm + vox.thickness_mm / 2
    group = np.zeros(len(vox.z_mm), dtype=np.int64)
    g, acc = 0, 0.0
    for k in range(len(vox.z_mm)):
        contiguous = k > 0 and abs(z_lo[k] - z_hi[k - 1]) < 1e-6
        if k > 0 and (not contiguous or acc + vox.thickness_mm[k] > target_mm + 1e-6):
            g += 1
            acc = 0.0
        group[k] = g
        acc += vox.thickness_mm[k]
    return group


def _z_cells(z_mm: np.ndarray, g: GridGeometry):
    """Frame cell (k0, k1), fraction and frame spacing (mm) at each z of an axial grid, clamped at the ends."""
    zc = g.z_positions_mm
    nf = len(zc)
    if nf == 1:
        zero = np.zeros(len(z_mm), dtype=np.int64)
        return zero, zero, np.zeros(len(z_mm)), np.full(len(z_mm), float(g.spacing_mm[2]))
    u = np.interp(z_mm, zc, np.arange(nf, dtype=np.float64))
    k0 = np.minimum(np.floor(u).astype(np.int64), nf - 2)
    return k0, k0 + 1, u - k0, zc[k0 + 1] - zc[k0]


def _interior_blocks(full_g: np.ndarray, max_block: int) -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
    """Split the full pixels of each slab group (G, ny, nx) into aligned square blocks of side max_block, ...,
    2, 1 lattice pixels, each pixel in the largest full block containing it.

    Returns: [(side, (g, by, bx) block index arrays)] and the (G, ny, nx) mask of the pixels so covered.
    """
    _, ny, nx = full_g.shape
    pad_y, pad_x = -ny % max_block, -nx % max_block
    pyramid = [np.pad(full_g, ((0, 0), (0, pad_y), (0, pad_x)))]  # pyramid[i]: blocks of side 2**i all full
    while (1 << len(pyramid)) <= max_block:
        q = pyramid[-1]
        pyramid.append(q[:, 0::2, 0::2] & q[:, 1::2, 0::2] & q[:, 0::2, 1::2] & q[:, 1::2, 1::2])
    out = []
    taken = np.zeros_like(pyramid[-1])
    for level in range(len(pyramid) - 1, -1, -1):
        if level < len(pyramid) - 1:  # taken by larger blocks, at this level's resolution
            g_, by, bx = taken.shape
            up = np.empty((g_, by, 2, bx, 2), dtype=bool)
            up[:] = taken[:, :, None, :, None]
            taken = up.reshape(g_, 2 * by, 2 * bx)
        pick = pyramid[level] & ~taken
        flat = np.flatnonzero(pick)  # flat indices: much faster than a 3-D nonzero
        if len(flat):
            out.append((1 << level, np.unravel_index(flat, pick.shape)))
            taken |= pick
    return out, taken[:, :ny, :nx]


def _axis_cells(coords_mm: np.ndarray, origin_mm: float, spacing_mm: float, n: int):
    """Interpolation cell (i0, i1) and fraction along one axis of a grid, clamped at the outer nodes."""
    u = np.clip((coords_mm - origin_mm) / spacing_mm, 0, n - 1)
    i0 = np.minimum(np.floor(u).astype(np.int64), max(n - 2, 0))
    f = u - i0 if n > 1 else np.zeros_like(u)
    return i0, np.minimum(i0 + 1, n - 1), f


def _trilinear_gradient(dose: np.ndarray, z_cells, y_cells, x_cells):
    """Trilinear dose and its gradient (Gy/mm, within the interpolation cell) at N points, from per-point cells:
    ``z_cells`` = (k0, k1, fz, dz_mm), ``y_cells`` = (r0, r1, fy, dy_mm), ``x_cells`` = (c0, c1, fx, dx_mm)."""
    _, nr, nc = dose.shape
    flat = dose.reshape(-1)
    k0, k1, fz, dz = z_cells
    r0, r1, fy, dy = y_cells
    c0, c1, fx, dx = x_cells
    fx, fy, fz = (np.asarray(v, dtype=np.float32) for v in (fx, fy, fz))
    a = []  # a[kk][rr]: value interpolated along x at (k, r); e[kk][rr]: its x-difference
    e = []
    for k in (k0, k1):
        a_k, e_k = [], []
        for r in (r0, r1):
            base = (k * nr + r) * nc
            v0, v1 = flat[base + c0], flat[base + c1]
            a_k.append(v0 + fx * (v1 - v0))
            e_k.append(v1 - v0)
        a.append(a_k)
        e.append(e_k)
    b0 = a[0][0] + fy * (a[0][1] - a[0][0])
    b1 = a[1][0] + fy * (a[1][1] - a[1][0])
    value = b0 + fz * (b1 - b0)
    gx = ((1 - fz) * ((1 - fy) * e[0][0] + fy * e[0][1]) + fz * ((1 - fy) * e[1][0] + fy * e[1][1])) / dx
    gy = ((1 - fz) * (a[0][1] - a[0][0]) + fz * (a[1][1] - a[1][0])) / dy
    gz = np.where(k0 == k1, 0.0, (b1 - b0) / dz)
    return value.astype(np.float64), gx, gy, gz


def _sample_axial(vox: Voxelisation, dose: DoseGrid, *, block_mm: float | None = None) -> _Samples:
    """Adaptive sampling on an axial grid.

    Slabs are grouped into runs about one dose frame spacing thick. Pixels inside the structure throughout a
    run (coverage 1 in every slab, inside the grid) are gathered into aligned square blocks (up to ``block_mm``
    across, default two dose voxels); each block is one sample at its centre with the dose interval that the
    local gradient spans across the box. Only the remaining pixels (the boundary band) are sampled per slab on
    the fine lattice. Dose and gradient are trilinear gathers from the 8 nodes of each sample's cell.
    """
    g = dose.geometry
    lat = vox.lattice
    nf, nr, nc = g.shape
    d_mm = lat.delta_mm
    wx, in_x = _axis_weights(lat.xs_mm, g.origin_mm[0], g.spacing_mm[0], nc)
    wy, in_y = _axis_weights(lat.ys_mm, g.origin_mm[1], g.spacing_mm[1], nr)
    cols = np.nonzero(wx.any(axis=0))[0]
    rows = np.nonzero(wy.any(axis=0))[0]
    pix = d_mm ** 2
    empty = np.zeros(0)
    zc = g.z_positions_mm
    if nf == 1:
        valid = np.abs(vox.z_mm - zc[0]) <= g.spacing_mm[2] / 2
    else:
        valid = (vox.z_mm >= zc[0] - (zc[1] - zc[0]) / 2) & (vox.z_mm <= zc[-1] + (zc[-1] - zc[-2]) / 2)
    valid &= (len(cols) > 0) & (len(rows) > 0)
    if block_mm is None:
        block_mm = 2.0 * max(g.spacing_mm[0], g.spacing_mm[1])
    max_block = 1 << max(0, int(math.floor(math.log2(max(block_mm / d_mm, 1.0)))))

    # -- interior blocks
    cov_all = vox.coverage
    group = _slab_groups(vox, float(g.spacing_mm[2]))
    n_groups = int(group[-1]) + 1 if len(group) else 0
    starts = np.searchsorted(group, np.arange(n_groups))
    full = cov_all >= 1.0
    if not valid.all():
        full &= valid[:, None, None]
    if not (in_y.all() and in_x.all()):
        full &= in_y[None, :, None] & in_x[None, None, :]
    if n_groups == len(group):
        full_g = full
    else:
        full_g = np.logical_and.reduceat(full, starts, axis=0) if n_groups else np.zeros((0, lat.ny, lat.nx), bool)
    blocks, taken = _interior_blocks(full_g, max_block) if n_groups else ([], full_g)
    t_g = np.add.reduceat(vox.thickness_mm, starts) if n_groups else empty
    zc_g = np.add.reduceat(vox.z_mm * vox.thickness_mm, starts) / t_g if n_groups else empty
    b_dose, b_weight, b_width = [], [], []
    for side, idx in blocks:
        gi, by, bx = idx
        h = side * d_mm
        x = lat.x0_mm + (bx * side + (side - 1) / 2) * d_mm
        y = lat.y0_mm + (by * side + (side - 1) / 2) * d_mm
        z, hz = zc_g[gi], t_g[gi]
        value, gx, gy, gz = _trilinear_gradient(
            dose.dose, _z_cells(z, g), (*_axis_cells(y, g.origin_mm[1], g.spacing_mm[1], nr), g.spacing_mm[1]),
            (*_axis_cells(x, g.origin_mm[0], g.spacing_mm[0], nc), g.spacing_mm[0]))
        b_dose.append(value)
        b_width.append(np.sqrt((gx * h) ** 2 + (gy * h) ** 2 + (gz * hz) ** 2))
        b_weight.append(np.full(len(gi), h * h) * hz)
    node_range = None
    if blocks:
        node_range = _node_range_in(taken, group, vox, dose, lat)

    # -- boundary band: fine lattice, per slab
    fine = (cov_all > 0) & ~(taken if n_groups == len(group) else taken[group])
    ks, ys, xs = np.unravel_index(np.flatnonzero(fine), fine.shape)
    cov = cov_all[ks, ys, xs].astype(np.float64)
    weight = cov * (pix * vox.thickness_mm)[ks]
    keep = valid[ks] & in_y[ys] & in_x[xs]
    outside = float(weight[~keep].sum())
    ks, ys, xs, cov, weight = ks[keep], ys[keep], xs[keep], cov[keep], weight[keep]
    f_dose, f_width = empty, empty
    if len(ks):
        k0, k1, t, dz = _z_cells(vox.z_mm, g)
        x_mm, y_mm, h_n, nx_, ny_ = _covered_part_centres(cov_all, ks, ys, xs, cov, lat)
        f_dose, gxs, gys, gzs = _trilinear_gradient(
            dose.dose, (k0[ks], k1[ks], t[ks], dz[ks]),
            (*_axis_cells(y_mm, g.origin_mm[1], g.spacing_mm[1], nr), g.spacing_mm[1]),
            (*_axis_cells(x_mm, g.origin_mm[0], g.spacing_mm[0], nc), g.spacing_mm[0]))
        # extent of the covered part: h_n along the inward normal, the pixel across it
        g_n = gxs * nx_ + gys * ny_
        g_t = gys * nx_ - gxs * ny_
        f_width = np.sqrt((g_n * h_n) ** 2 + (g_t * d_mm) ** 2 + (gzs * vox.thickness_mm[ks]) ** 2)
    if not len(ks) and not blocks:
        return _Samples(empty, empty, empty, np.zeros(0, bool), outside)
    n_blocks = sum(len(b) for b in b_dose)
    return _Samples(
        np.concatenate(b_dose + [f_dose]).astype(np.float64),
        np.concatenate(b_weight + [weight]),
        np.concatenate(b_width + [f_width]).astype(np.float64),
        np.concatenate([np.ones(n_blocks, bool), cov >= 0.5]),
        outside,
        node_range,
    )


def _covered_part_centres(cov_all: np.ndarray, ks, ys, xs, cov: np.ndarray, lat):
    """Where the covered part of each band pixel lies: (x_mm, y_mm) of its centre, its extent (mm) along the
    inward normal, and that normal (nx, ny).

    The normal is the in-plane coverage gradient (central differences); for a straight edge the covered part of
    a pixel with coverage c is a strip c pixels deep whose centre lies (1 - c)/2 pixels inward of the pixel's
    centre (exact for an edge along a lattice axis, 0.24 against 0.25 pixels for c = 1/2 on a diagonal). A fully
    covered pixel, or one without a gradient, keeps its centre and full extent.
    """
    _, ny, nx = cov_all.shape
    d = lat.delta_mm
    xl, xr = np.maximum(xs - 1, 0), np.minimum(xs + 1, nx - 1)
    yl, yr = np.maximum(ys - 1, 0), np.minimum(ys + 1, ny - 1)
    gx = cov_all[ks, ys, xr].astype(np.float64) - cov_all[ks, ys, xl]
    gy = cov_all[ks, yr, xs].astype(np.float64) - cov_all[ks, yl, xs]
    norm = np.hypot(gx, gy)
    part = (cov < 1.0) & (norm > 1e-6)
    safe = np.where(part, norm, 1.0)
    n_x = np.where(part, gx / safe, 1.0)
    n_y = np.where(part, gy / safe, 0.0)
    shift = np.where(part, 0.5 * (1.0 - cov) * d, 0.0)
    x_mm = lat.x0_mm + xs * d + shift * n_x
    y_mm = lat.y0_mm + ys * d + shift * n_y
    h_n = np.where(part, cov * d, d)
    return x_mm, y_mm, h_n, n_x, n_y


def _node_range_in(taken: np.ndarray, group: np.ndarray, vox: Voxelisation, dose: DoseGrid,
                   lat) -> tuple[float, float] | None:
    """(min, max) dose at the grid nodes that lie in interior blocks: a trilinear dose takes its extremes over
    a box at nodes or on the box's faces, so block centres alone would miss an interior hot spot."""
    g = dose.geometry
    _, nr, nc = g.shape
    z_lo = vox.z_mm - vox.thickness_mm / 2
    z_hi = vox.z_mm + vox.thickness_mm / 2
    zc = g.z_positions_mm
    slab = np.minimum(np.searchsorted(z_hi, zc, side="right"), len(vox.z_mm) - 1)  # first slab above the node
    frames = np.nonzero((z_lo[slab] <= zc) & (zc <= z_hi[slab]))[0]
    i = np.rint((g.origin_mm[0] + g.spacing_mm[0] * np.arange(nc) - lat.x0_mm) / lat.delta_mm).astype(np.int64)
    j = np.rint((g.origin_mm[1] + g.spacing_mm[1] * np.arange(nr) - lat.y0_mm) / lat.delta_mm).astype(np.int64)
    ci = np.nonzero((i >= 0) & (i < lat.nx))[0]
    rj = np.nonzero((j >= 0) & (j < lat.ny))[0]
    if not len(frames) or not len(ci) or not len(rj):
        return None
    def index(v: np.ndarray):  # a slice where the indices are consecutive (always at the grid resolution)
        return slice(int(v[0]), int(v[-1]) + 1) if np.all(np.diff(v) == 1) else v

    mask = taken[group[slab[frames]]][:, index(j[rj])][:, :, index(i[ci])]  # (F, R, C)
    if not mask.any():
        return None
    values = dose.dose[index(frames)][:, index(rj)][:, :, index(ci)]  # views where the indices run on
    return (float(np.min(values, where=mask, initial=np.inf)),
            float(np.max(values, where=mask, initial=-np.inf)))


def _sample_general(vox: Voxelisation, dose: DoseGrid) -> _Samples:
    """Any grid orientation: trilinear gathers (scipy map_coordinates); no gradient spreading."""
    lat = vox.lattice
    xx, yy = np.meshgrid(lat.xs_mm, lat.ys_mm)
    d_out, w_out, solid_out = [], [], []
    outside = 0.0
    for k in range(len(vox.z_mm)):
        cov = vox.coverage[k]
        m = cov > 0
        if not m.any():
            continue
        pts = np.column_stack([xx[m], yy[m], np.full(int(m.sum()), vox.z_mm[k])])
        values, inside = dose_at_points(dose, pts)
        w = cov[m].astype(np.float64) * lat.delta_mm ** 2 * vox.thickness_mm[k]
        outside += float(w[~inside].sum())
        d_out.append(values[inside]); w_out.append(w[inside]); solid_out.append(cov[m][inside] >= 0.5)
    if not d_out:
        return _Samples(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, bool), outside)
    d = np.concatenate(d_out)
    return _Samples(d, np.concatenate(w_out), np.zeros_like(d), np.concatenate(solid_out), outside)


def dose_at_points(dose: DoseGrid, points_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear dose (Gy) at points (N, 3) and whether each lies in the grid (within half a voxel of it)."""
    idx = dose.geometry.to_index(points_mm)
    shape = np.asarray(dose.geometry.shape)
    inside = np.all((idx >= -0.5) & (idx <= shape - 0.5), axis=1)
    clamped = np.clip(idx, 0, shape - 1)
    values = ndimage.map_coordinates(dose.dose, clamped.T, order=1, mode="nearest")
    return values.astype(np.float64), inside


def _dose_at_points_axial(dose: DoseGrid, points_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`dose_at_points` for an axial grid: the same trilinear dose and inside test, by direct gathers
    (no matrix products, no map_coordinates)."""
    g = dose.geometry
    nf, nr, nc = g.shape
    p = np.asarray(points_mm, dtype=np.float64)
    u = (p[:, 0] - g.origin_mm[0]) / g.spacing_mm[0]
    v = (p[:, 1] - g.origin_mm[1]) / g.spacing_mm[1]
    zc = g.z_positions_mm
    if nf == 1:
        w = (p[:, 2] - zc[0]) / max(g.spacing_mm[2], 1e-9)
    else:
        w = np.interp(p[:, 2], zc, np.arange(nf, dtype=np.float64))
        lo, hi = p[:, 2] < zc[0], p[:, 2] > zc[-1]
        w[lo] = (p[lo, 2] - zc[0]) / (zc[1] - zc[0])
        w[hi] = nf - 1 + (p[hi, 2] - zc[-1]) / (zc[-1] - zc[-2])
    inside = ((u >= -0.5) & (u <= nc - 0.5) & (v >= -0.5) & (v <= nr - 0.5) & (w >= -0.5) & (w <= nf - 0.5))
    wz = np.clip(w, 0, nf - 1)
    k0 = np.minimum(np.floor(wz).astype(np.int64), max(nf - 2, 0))
    fz = wz - k0 if nf > 1 else np.zeros_like(wz)
    value = _trilinear_gradient(
        dose.dose, (k0, np.minimum(k0 + 1, nf - 1), fz, 1.0),
        (*_axis_cells(p[:, 1], g.origin_mm[1], g.spacing_mm[1], nr), g.spacing_mm[1]),
        (*_axis_cells(p[:, 0], g.origin_mm[0], g.spacing_mm[0], nc), g.spacing_mm[0]))[0]
    return value, inside


# -- histogram --------------------------------------------------------------------------------------------------


def _cumulative(samples: _Samples, bin_gy: float | None) -> Dvh:
    total = float(samples.weight_mm3.sum())
    if total <= 0:
        return Dvh(np.array([0.0, 1e-6]), np.array([0.0, 0.0]), 0.0)
    d, wt = samples.dose_gy, samples.weight_mm3
    top = float((d + samples.width_gy / 2).max())
    if bin_gy is None:
        bin_gy = max(top / 20_000, 1e-6)
    width = np.maximum(samples.width_gy, bin_gy)
    a = np.maximum(d - width / 2, 0.0)
    c = a + width
    n_bins = min(int(np.ceil(top / bin_gy)) + 2, MAX_BINS)
    bin_gy = max(bin_gy, (c.max() * (1 + 1e-9)) / (n_bins - 1))
    q = np.zeros(n_bins + 3)
    slope = wt / width * bin_gy  # each sample: a ramp of height wt from a to c; hinge spikes split linearly

    def spikes(x, s):
        u = x / bin_gy
        j = np.floor(u).astype(np.int64)
        f = u - j
        q[:] += np.bincount(j + 1, weights=s * (1 - f), minlength=n_bins + 3)[: n_bins + 3]
        q[:] += np.bincount(j + 2, weights=s * f, minlength=n_bins + 3)[: n_bins + 3]

    spikes(a, slope)
    spikes(c, -slope)
    below = np.cumsum(np.cumsum(q))[: n_bins + 1]  # volume below each edge
    edges = np.arange(n_bins + 1) * bin_gy
    cum = np.clip(total - below, 0.0, total)
    cum = np.minimum.accumulate(cum)  # monotone against float round-off
    cum[0] = total
    return Dvh(edges, cum / 1000.0, total / 1000.0)


def structure_dvh(structure: Structure, dose: DoseGrid, settings: RasterSettings = RasterSettings(), *,
                  voxelisation: Voxelisation | None = None) -> StructureDvh:
    """DVH and metrics of one structure. Raises InputError for non-GY doses, ValueError without contours."""
    dose.require_gy()
    vox = voxelisation if voxelisation is not None else voxelise(structure, dose.geometry, settings)
    samples = _sample_axial(vox, dose) if dose.geometry.is_axial else _sample_general(vox, dose)
    dvh = _cumulative(samples, None)
    volume_cc = vox.volume_cc
    if samples.weight_mm3.size:
        solid = samples.solid if samples.solid.any() else np.ones_like(samples.solid)
        b_dose, b_in = (_dose_at_points_axial(dose, vox.boundary_points_mm) if dose.geometry.is_axial
                        else dose_at_points(dose, vox.boundary_points_mm))
        lo = [samples.dose_gy[solid].min()] + ([b_dose[b_in].min()] if b_in.any() else [])
        hi = [samples.dose_gy[solid].max()] + ([b_dose[b_in].max()] if b_in.any() else [])
        if samples.node_range_gy is not None:
            lo.append(samples.node_range_gy[0])
            hi.append(samples.node_range_gy[1])
        dmin, dmax = float(min(lo)), float(max(hi))
        # a plain sum: BLAS dot products of this length run threaded, which costs more than it saves on a
        # loaded machine
        dmean = float((samples.dose_gy * samples.weight_mm3).sum() / samples.weight_mm3.sum())
    else:
        dmin = dmax = dmean = float("nan")
    if samples.outside_mm3 > 1e-6 * max(volume_cc * 1000, 1e-9):
        log.warning("structure_outside_dose_grid", extra={"roi_number": structure.roi_number,
                                                          "outside_cc": round(samples.outside_mm3 / 1000, 4)})
    def clamp(value: float) -> float:  # the dose ramps reach half a sample's spread past the extremes
        return float(min(max(value, dmin), dmax)) if math.isfinite(dmin) else value

    dx = {x: clamp(dvh.dose_at_volume_pct(x)) for x in (99, 98, 95, 50, 5, 2, 1)}
    hi_index = (dx[2] - dx[98]) / dx[50] if dx[50] and dx[50] > 0 else float("nan")
    metrics = DvhMetrics(
        structure=structure.name, roi_number=structure.roi_number, unit=dose.unit_label,
        volume_cc=volume_cc, volume_outside_dose_cc=samples.outside_mm3 / 1000.0,
        min_gy=dmin, mean_gy=dmean, max_gy=dmax,
        d99_gy=dx[99], d98_gy=dx[98], d95_gy=dx[95], d50_gy=dx[50], d5_gy=dx[5], d2_gy=dx[2], d1_gy=dx[1],
        d0_03cc_gy=clamp(dvh.dose_at_volume_cc(0.03)) if dvh.total_cc >= 0.03 else dmax,
        homogeneity_index=hi_index,
    )
    return StructureDvh(metrics, dvh)


def prescription_isodose_volume_cc(dose: DoseGrid, prescription_gy: float) -> float:
    """Volume (cc) of the dose grid receiving at least ``prescription_gy`` (voxel counting)."""
    dose.require_gy()
    return float(np.count_nonzero(dose.dose >= prescription_gy) * dose.geometry.voxel_volume_mm3() / 1000.0)


def paddick_conformity_index(target: Dvh, prescription_gy: float, piv_cc: float) -> float:
    """Paddick CI (J Neurosurg 2000): TV_PIV^2 / (TV * PIV); 1 is perfect conformity."""
    tv_piv = target.volume_at_dose_cc(prescription_gy)
    if target.total_cc <= 0 or piv_cc <= 0:
        return float("nan")
    return tv_piv ** 2 / (target.total_cc * piv_cc)
