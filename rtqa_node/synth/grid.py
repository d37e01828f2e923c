"""The CT and dose grids of a synthetic plan study, and sampling of implicit shapes on them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from rtqa_node.synth.shapes import Shape


@dataclass(frozen=True)
class Grid:
    """A regular axial grid in DICOM patient coordinates, rows along +y, columns along +x, slices along +z.

    origin_mm is the centre of voxel (slice 0, row 0, column 0), i.e. the Image Position (Patient) of the
    first (most inferior) slice. Arrays on this grid have shape (slices, rows, columns).
    """

    columns: int
    rows: int
    slices: int
    pixel_spacing_mm: float
    slice_spacing_mm: float
    origin_mm: tuple[float, float, float]

    def __post_init__(self) -> None:
        if min(self.columns, self.rows, self.slices) < 1:
            raise ValueError(f"grid dimensions must be positive, got {self.shape}")
        if self.pixel_spacing_mm <= 0 or self.slice_spacing_mm <= 0:
            raise ValueError("pixel_spacing_mm and slice_spacing_mm must be > 0")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.slices, self.rows, self.columns

    @cached_property
    def x_mm(self) -> np.ndarray:
        return self.origin_mm[0] + self.pixel_spacing_mm * np.arange(self.columns)

    @cached_property
    def y_mm(self) -> np.ndarray:
        return self.origin_mm[1] + self.pixel_spacing_mm * np.arange(self.rows)

    @cached_property
    def z_mm(self) -> np.ndarray:
        return self.origin_mm[2] + self.slice_spacing_mm * np.arange(self.slices)

    @property
    def voxel_volume_cc(self) -> float:
        return self.pixel_spacing_mm**2 * self.slice_spacing_mm / 1000.0

    def coarsened(self, factor: int) -> Grid:
        """Every factor-th row and column (same slices): the dose grid. Its voxel centres are CT voxel centres."""
        return Grid(
            columns=(self.columns + factor - 1) // factor,
            rows=(self.rows + factor - 1) // factor,
            slices=self.slices,
            pixel_spacing_mm=self.pixel_spacing_mm * factor,
            slice_spacing_mm=self.slice_spacing_mm,
            origin_mm=self.origin_mm,
        )

    def window(self, shape: Shape, pad_voxels: int = 2) -> tuple[slice, slice, slice]:
        """Index ranges (z, y, x) covering the shape's bounding box plus pad_voxels; may be empty."""
        lo, hi = shape.bounds
        out = []
        for axis_mm, spacing, l, h in (
            (self.z_mm, self.slice_spacing_mm, lo[2], hi[2]),
            (self.y_mm, self.pixel_spacing_mm, lo[1], hi[1]),
            (self.x_mm, self.pixel_spacing_mm, lo[0], hi[0]),
        ):
            i0 = int(np.searchsorted(axis_mm, l - pad_voxels * spacing))
            i1 = int(np.searchsorted(axis_mm, h + pad_voxels * spacing, side="right"))
            out.append(slice(i0, max(i0, i1)))
        return tuple(out)

    def sample(self, shape: Shape, pad_voxels: int = 2) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """phi of the shape on its window of this grid: (window, phi) with phi of shape (z, y, x), float32."""
        win = self.window(shape, pad_voxels)
        z = self.z_mm[win[0]][:, None, None]
        y = self.y_mm[win[1]][None, :, None]
        x = self.x_mm[win[2]][None, None, :]
        phi = np.broadcast_to(shape.phi(x, y, z), (len(z), y.shape[1], x.shape[2]))
        return win, phi.astype(np.float32)

    def mask(self, shape: Shape) -> np.ndarray:
        """Boolean (slices, rows, columns): voxel centres inside the shape."""
        out = np.zeros(self.shape, dtype=bool)
        win, phi = self.sample(shape, pad_voxels=0)
        out[win] = phi < 0
        return out
