"""Implicit solids for the phantom: each shape has a function phi(x, y, z) in mm, negative inside, that
approximates the signed distance to its surface, and an axis-aligned bounding box.

Working with distance-like functions instead of voxel masks makes margins exact-ish and cheap (a PTV is its
CTV's phi minus the margin, no distance transform), lets contours be traced on a smooth field (sub-voxel
polygons), and lets the same solid be sampled on the CT grid and on the coarser dose grid.

Coordinates are DICOM patient coordinates (PS3.3 C.7.6.2.1.1): +x towards the patient's left, +y posterior,
+z superior. Arguments x, y, z broadcast (typically x[None, None, :], y[None, :, None], z[:, None, None]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Bounds = tuple[tuple[float, float, float], tuple[float, float, float]]


def _ellipse_phi(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an ellipse with semi-axes (a, b) (Quilez's first-order estimate)."""
    k0 = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    k1 = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = k0 * (k0 - 1.0) / k1
    return np.where(k1 > 1e-9, phi, -min(a, b))


class Shape:
    bounds: Bounds

    def phi(self, x, y, z) -> np.ndarray:
        raise NotImplementedError

    def __or__(self, other: Shape) -> Shape:
        return Union((self, other))

    def __sub__(self, other: Shape) -> Shape:
        return Subtract(self, other)

    def __and__(self, other: Shape) -> Shape:
        return Intersect(self, other)

    def grow(self, margin_mm: float) -> Shape:
        return Offset(self, margin_mm)


@dataclass(frozen=True)
class Ellipsoid(Shape):
    center_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]

    @property
    def bounds(self) -> Bounds:
        c, a = np.array(self.center_mm), np.array(self.semi_axes_mm)
        return tuple(c - a), tuple(c + a)

    def phi(self, x, y, z):
        (cx, cy, cz), (a, b, c) = self.center_mm, self.semi_axes_mm
        u, v, w = x - cx, y - cy, z - cz
        k0 = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
        k1 = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2 + (w / c**2) ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            phi = k0 * (k0 - 1.0) / k1
        return np.where(k1 > 1e-9, phi, -min(a, b, c))


@dataclass(frozen=True)
class EllipticCylinder(Shape):
    """An elliptic cylinder along z between z_lo_mm and z_hi_mm, flat caps."""

    center_xy_mm: tuple[float, float]
    semi_axes_xy_mm: tuple[float, float]
    z_lo_mm: float
    z_hi_mm: float

    @property
    def bounds(self) -> Bounds:
        (cx, cy), (a, b) = self.center_xy_mm, self.semi_axes_xy_mm
        return (cx - a, cy - b, self.z_lo_mm), (cx + a, cy + b, self.z_hi_mm)

    def phi(self, x, y, z):
        (cx, cy), (a, b) = self.center_xy_mm, self.semi_axes_xy_mm
        radial = _ellipse_phi(x - cx, y - cy, a, b)
        return np.maximum(radial, np.maximum(self.z_lo_mm - z, z - self.z_hi_mm))


@dataclass(frozen=True)
class TaperedNeck(Shape):
    """The neck and shoulders: an elliptic cylinder whose semi-axes widen below z_shoulder_mm."""

    center_xy_mm: tuple[float, float]
    semi_axes_xy_mm: tuple[float, float]
    z_shoulder_mm: float
    max_half_width_mm: float
    z_lo_mm: float
    z_hi_mm: float

    @property
    def bounds(self) -> Bounds:
        (cx, cy), (_, b) = self.center_xy_mm, self.semi_axes_xy_mm
        w = self.max_half_width_mm
        return (cx - w, cy - b - 25.0, self.z_lo_mm), (cx + w, cy + b + 25.0, self.z_hi_mm)

    def phi(self, x, y, z):
        (cx, cy), (a, b) = self.center_xy_mm, self.semi_axes_xy_mm
        below = np.clip(self.z_shoulder_mm - z, 0.0, None)
        a_z = np.minimum(a + 1.6 * below, self.max_half_width_mm)
        b_z = np.minimum(b + 0.3 * below, b + 25.0)
        u, v = x - cx, y - cy
        k0 = np.sqrt((u / a_z) ** 2 + (v / b_z) ** 2)
        k1 = np.sqrt((u / a_z**2) ** 2 + (v / b_z**2) ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            radial = np.where(k1 > 1e-9, k0 * (k0 - 1.0) / k1, -np.minimum(a_z, b_z))
        return np.maximum(radial, np.maximum(self.z_lo_mm - z, z - self.z_hi_mm))


@dataclass(frozen=True)
class ArcTube(Shape):
    """The anterior part (y < y_cut_mm) of an elliptic ring of given thickness, between two z planes:
    the mandibular body."""

    center_xy_mm: tuple[float, float]
    semi_axes_xy_mm: tuple[float, float]
    thickness_mm: float
    y_cut_mm: float
    z_lo_mm: float
    z_hi_mm: float

    @property
    def bounds(self) -> Bounds:
        (cx, cy), (a, b) = self.center_xy_mm, self.semi_axes_xy_mm
        t = self.thickness_mm
        return (cx - a - t, cy - b - t, self.z_lo_mm), (cx + a + t, self.y_cut_mm, self.z_hi_mm)

    def phi(self, x, y, z):
        (cx, cy), (a, b) = self.center_xy_mm, self.semi_axes_xy_mm
        ring = np.abs(_ellipse_phi(x - cx, y - cy, a, b)) - self.thickness_mm / 2
        ring = np.maximum(ring, y - self.y_cut_mm)
        return np.maximum(ring, np.maximum(self.z_lo_mm - z, z - self.z_hi_mm))


@dataclass(frozen=True)
class Union(Shape):
    parts: tuple[Shape, ...]

    @property
    def bounds(self) -> Bounds:
        lo = np.min([p.bounds[0] for p in self.parts], axis=0)
        hi = np.max([p.bounds[1] for p in self.parts], axis=0)
        return tuple(lo), tuple(hi)

    def phi(self, x, y, z):
        out = self.parts[0].phi(x, y, z)
        for part in self.parts[1:]:
            out = np.minimum(out, part.phi(x, y, z))
        return out


@dataclass(frozen=True)
class Intersect(Shape):
    a: Shape
    b: Shape

    @property
    def bounds(self) -> Bounds:
        (alo, ahi), (blo, bhi) = self.a.bounds, self.b.bounds
        return tuple(np.maximum(alo, blo)), tuple(np.minimum(ahi, bhi))

    def phi(self, x, y, z):
        return np.maximum(self.a.phi(x, y, z), self.b.phi(x, y, z))


@dataclass(frozen=True)
class Subtract(Shape):
    a: Shape
    b: Shape

    @property
    def bounds(self) -> Bounds:
        return self.a.bounds

    def phi(self, x, y, z):
        return np.maximum(self.a.phi(x, y, z), -self.b.phi(x, y, z))


@dataclass(frozen=True)
class Offset(Shape):
    """The shape grown (margin > 0) or shrunk (margin < 0) by margin_mm."""

    base: Shape
    margin_mm: float

    @property
    def bounds(self) -> Bounds:
        lo, hi = self.base.bounds
        m = max(self.margin_mm, 0.0)
        return tuple(np.asarray(lo) - m), tuple(np.asarray(hi) + m)

    def phi(self, x, y, z):
        return self.base.phi(x, y, z) - self.margin_mm


@dataclass(frozen=True)
class Translate(Shape):
    """The shape moved by offset_mm (x, y, z): a systematic contouring shift."""

    base: Shape
    offset_mm: tuple[float, float, float]

    @property
    def bounds(self) -> Bounds:
        lo, hi = self.base.bounds
        o = np.asarray(self.offset_mm)
        return tuple(np.asarray(lo) + o), tuple(np.asarray(hi) + o)

    def phi(self, x, y, z):
        ox, oy, oz = self.offset_mm
        return self.base.phi(x - ox, y - oy, z - oz)
