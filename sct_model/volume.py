"""Volumes in patient space: a voxel array and its grid (size, spacing, origin, direction, in LPS mm).

These are the serialisable values that cross the boundary between the DICOM node and the model
(plain numpy arrays and tuples, no live objects), so that the sampler call can later run in
another process or on another machine. SimpleITK does the resampling.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import SimpleITK as sitk

Vec3 = tuple[float, float, float]
AXIAL_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A regular voxel grid in the patient coordinate system (DICOM LPS, millimetres).

    Conventions are SimpleITK's: ``size`` and ``spacing_mm`` are in (x, y, z) = (column, row,
    slice) order, ``origin_mm`` is the centre of voxel (0, 0, 0), ``direction`` is the 3x3 matrix
    in row-major order whose *columns* are the unit vectors of the x, y and z axes.
    """

    size: tuple[int, int, int]
    spacing_mm: Vec3
    origin_mm: Vec3
    direction: tuple[float, ...] = AXIAL_DIRECTION

    def __post_init__(self) -> None:
        if len(self.size) != 3 or any(int(n) < 1 for n in self.size):
            raise ValueError(f"grid size must be three positive integers, got {self.size}")
        if len(self.spacing_mm) != 3 or any(not s > 0 for s in self.spacing_mm):
            raise ValueError(f"grid spacing must be three positive numbers, got {self.spacing_mm}")
        if len(self.direction) != 9:
            raise ValueError("grid direction must have 9 elements")
        matrix = self.direction_matrix
        if not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-4):
            raise ValueError("grid direction must be orthonormal")
        object.__setattr__(self, "size", tuple(int(n) for n in self.size))
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "origin_mm", tuple(float(o) for o in self.origin_mm))
        object.__setattr__(self, "direction", tuple(float(d) for d in self.direction))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """The numpy shape of an array on this grid (SimpleITK's GetArrayFromImage order)."""
        return (self.size[2], self.size[1], self.size[0])

    def index_to_point(self, index_xyz: np.ndarray) -> np.ndarray:
        """LPS points (N, 3) of continuous voxel indices (N, 3) in (x, y, z) order."""
        index = np.atleast_2d(np.asarray(index_xyz, dtype=float))
        return np.asarray(self.origin_mm) + (index * np.asarray(self.spacing_mm)) @ self.direction_matrix.T

    def corner_points(self) -> np.ndarray:
        """The 8 outer corners (voxel edges, not centres) of the grid, as LPS points (8, 3)."""
        lo, hi = -0.5, np.asarray(self.size, dtype=float) - 0.5
        corners = [
            [(lo if bit == 0 else hi[axis]) for axis, bit in enumerate(bits)]
            for bits in itertools.product((0, 1), repeat=3)
        ]
        return self.index_to_point(np.asarray(corners))

    def is_axial(self, tolerance: float = 1e-4) -> bool:
        return bool(np.allclose(self.direction_matrix, np.eye(3), atol=tolerance))

    def reference_image(self) -> sitk.Image:
        image = sitk.Image([int(n) for n in self.size], sitk.sitkUInt8)
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_mm)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def of_image(cls, image: sitk.Image) -> Grid:
        sx, sy, sz = image.GetSize()
        dx, dy, dz = image.GetSpacing()
        ox, oy, oz = image.GetOrigin()
        return cls(
            size=(int(sx), int(sy), int(sz)),
            spacing_mm=(float(dx), float(dy), float(dz)),
            origin_mm=(float(ox), float(oy), float(oz)),
            direction=tuple(image.GetDirection()),
        )


@dataclasses.dataclass(frozen=True)
class Volume:
    """A voxel array of shape ``grid.shape_zyx`` on ``grid``."""

    array: np.ndarray
    grid: Grid

    def __post_init__(self) -> None:
        if self.array.shape != self.grid.shape_zyx:
            raise ValueError(
                f"array shape {self.array.shape} does not match grid shape (z, y, x) {self.grid.shape_zyx}"
            )

    def to_image(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(self.grid.spacing_mm)
        image.SetOrigin(self.grid.origin_mm)
        image.SetDirection(self.grid.direction)
        return image

    @classmethod
    def of_image(cls, image: sitk.Image) -> Volume:
        return cls(array=sitk.GetArrayFromImage(image), grid=Grid.of_image(image))


def axial_grid_covering(grid: Grid) -> Grid:
    """The axial grid (identity direction) in the same frame of reference that covers ``grid``.

    Each patient axis takes the spacing of the input axis closest to it (an oblique axial MR keeps
    its in-plane and slice spacing; a sagittal one gives its slice spacing to the x axis). The
    extent is the axis-aligned bounding box of the input's outer corners, so every MR voxel lies
    inside the output grid.
    """
    matrix = np.abs(grid.direction_matrix)  # [patient axis, image axis]
    spacing = tuple(float(grid.spacing_mm[int(np.argmax(matrix[axis]))]) for axis in range(3))
    corners = grid.corner_points()
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    size = tuple(max(1, int(np.ceil((hi[a] - lo[a]) / spacing[a] - 1e-6))) for a in range(3))
    extent = np.asarray(size) * np.asarray(spacing)
    centre = (lo + hi) / 2.0
    origin = centre - extent / 2.0 + np.asarray(spacing) / 2.0
    return Grid(size=size, spacing_mm=spacing, origin_mm=tuple(origin), direction=AXIAL_DIRECTION)  # type: ignore[arg-type]


def resample(volume: Volume, grid: Grid, *, default_value: float, linear: bool = True) -> Volume:
    """``volume`` resampled onto ``grid`` with SimpleITK (linear or nearest neighbour)."""
    image = volume.to_image()
    resampled = sitk.Resample(
        image,
        grid.reference_image(),
        sitk.Transform(),
        sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
        float(default_value),
        image.GetPixelID(),
    )
    return Volume.of_image(resampled)
