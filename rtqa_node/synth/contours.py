"""Planar contours of implicit shapes on the CT slices: the zero level of phi traced by contourpy (the
marching-squares engine behind matplotlib's ``contour``), so polygons are sub-voxel and closed."""

from __future__ import annotations

from dataclasses import dataclass

import contourpy
import numpy as np

from rtqa_node.synth.grid import Grid
from rtqa_node.synth.shapes import Shape


@dataclass(frozen=True)
class SliceContour:
    slice_index: int
    points_mm: np.ndarray  # (N, 3): x, y, z in patient coordinates, N >= 3, not repeating the first point


def trace(shape: Shape, grid: Grid, *, min_points: int = 3) -> tuple[list[SliceContour], int]:
    """Closed planar polygons of the shape on every CT slice it crosses, and its voxel count on the grid.

    Holes (e.g. the pharyngeal lumen inside Musc_Constrict) come out as separate inner polygons, which
    readers combine by the even-odd rule, as TPSs write them.
    """
    win, phi = grid.sample(shape, pad_voxels=2)
    if phi.size == 0:
        return [], 0
    voxels = int(np.count_nonzero(phi < 0))
    # A positive border guarantees closed polygons where a shape meets the edge of the grid.
    phi = np.pad(phi, ((0, 0), (1, 1), (1, 1)), constant_values=1.0)
    ps = grid.pixel_spacing_mm
    y = np.concatenate(([grid.y_mm[win[1]][0] - ps], grid.y_mm[win[1]], [grid.y_mm[win[1]][-1] + ps]))
    x = np.concatenate(([grid.x_mm[win[2]][0] - ps], grid.x_mm[win[2]], [grid.x_mm[win[2]][-1] + ps]))
    out: list[SliceContour] = []
    for k, slice_phi in enumerate(phi):
        if not (slice_phi < 0).any():
            continue
        z_index = win[0].start + k
        generator = contourpy.contour_generator(x, y, slice_phi, line_type=contourpy.LineType.Separate)
        for line in generator.lines(0.0):
            if len(line) > 1 and np.allclose(line[0], line[-1]):
                line = line[:-1]
            if len(line) < min_points:
                continue
            points = np.column_stack([line, np.full(len(line), grid.z_mm[z_index])])
            out.append(SliceContour(z_index, points))
    return out, voxels
