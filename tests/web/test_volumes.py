"""The viewer's volumes (dicom_node.web.volumes): NIfTI files in the right place of the patient, the
values the viewer must show, large grids shown on a coarser grid covering the same box."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicom_node.web.volumes import VIEWER_FILES, available, viewer_grid, write_viewer_volumes
from sct_model.volume import Grid, Volume


def ramp(grid: Grid, scale: float) -> Volume:
    """Values that grow with the LPS x coordinate (so that a flip or shift would show)."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in grid.shape_zyx), indexing="ij")
    points = grid.index_to_point(np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1))
    return Volume((points[:, 0] * scale).reshape(grid.shape_zyx).astype(np.float32), grid)


def test_the_files_hold_the_sct_the_mr_on_its_grid_and_the_uncertainty(tmp_path: Path) -> None:
    sct_grid = Grid(size=(30, 20, 10), spacing_mm=(2.0, 2.0, 3.0), origin_mm=(-29.0, -19.0, -13.5))
    mr_grid = Grid(size=(40, 30, 20), spacing_mm=(1.5, 1.5, 1.5), origin_mm=(-29.25, -21.75, -14.25))
    write_viewer_volumes(tmp_path, ramp(mr_grid, 10.0), ramp(sct_grid, 20.0), ramp(sct_grid, 0.37))
    assert set(available(tmp_path)) == {"mr", "sct", "std"}
    sct = sitk.ReadImage(str(tmp_path / VIEWER_FILES["sct"]))
    assert sct.GetSize() == sct_grid.size and np.allclose(sct.GetOrigin(), sct_grid.origin_mm)  # LPS kept
    assert sct.GetPixelID() == sitk.sitkInt16
    expected = ramp(sct_grid, 20.0).array
    np.testing.assert_allclose(sitk.GetArrayFromImage(sct), np.rint(expected), atol=0.5)
    mr = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / VIEWER_FILES["mr"])))
    inside = (slice(2, -2), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(mr[inside], ramp(sct_grid, 10.0).array[inside], atol=1.0)  # resampled, not shifted
    std = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / VIEWER_FILES["std"]), sitk.sitkFloat32))
    np.testing.assert_allclose(std, ramp(sct_grid, 0.37).array, atol=0.051)  # 0.1 HU steps, scl_slope applied


def test_a_large_grid_is_shown_coarser_over_the_same_box() -> None:
    grid = Grid(size=(285, 347, 300), spacing_mm=(0.9375, 0.9375, 0.6), origin_mm=(-130.0, -160.0, -90.0))
    coarse = viewer_grid(grid, max_voxels=4_000_000)
    assert math.prod(coarse.size) <= 4_000_000 < math.prod(grid.size)

    def box(g):
        return (
            g.index_to_point(np.asarray([[-0.5] * 3]))[0],
            g.index_to_point(np.asarray([[n - 0.5 for n in g.size]]))[0],
        )

    for a, b in zip(box(grid), box(coarse), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert viewer_grid(coarse, max_voxels=4_000_000) == coarse
