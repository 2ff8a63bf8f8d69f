"""Geometry, body mask, intensity mappings and post-processing of sct_model.preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from sct_model.preprocessing import (
    PreprocessingConfig,
    PreprocessingError,
    body_mask,
    finish_hu,
    finish_std,
    fov_mask,
    hu_to_unit,
    model_grid_for,
    normalize_mr,
    output_masks,
    prepare_mr,
    resample_to_grid,
    unit_to_hu,
)
from sct_model.result import HU_AIR, HU_MAX, HU_MIN
from sct_model.volume import Grid, Volume, axial_grid_covering
from tests.sct_model.phantom import (
    HEAD_CENTRE_LPS,
    grid_around,
    head_mr,
    lps_points,
    rotation,
    true_body,
)

SPHERE_LPS = HEAD_CENTRE_LPS + np.array([11.0, -7.0, 5.0])
OBLIQUE = rotation("z", 25.0) @ rotation("x", 35.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def sphere_volume(grid: Grid, centre: np.ndarray, radius_mm: float) -> Volume:
    inside = np.linalg.norm(lps_points(grid) - centre, axis=-1) < radius_mm
    return Volume(np.where(inside, 1000.0, 0.0).astype(np.float32), grid)


def centroid_lps(volume: Volume, threshold: float) -> np.ndarray:
    weights = np.clip(volume.array - threshold, 0.0, None).astype(float)
    return (lps_points(volume.grid) * weights[..., None]).reshape(-1, 3).sum(0) / weights.sum()


# -- geometry -------------------------------------------------------------------------------------


def test_model_grid_is_axial_covers_the_oblique_mr_and_has_multiple_sizes():
    mr_grid = grid_around(HEAD_CENTRE_LPS, (40, 36, 20), (1.5, 1.5, 4.0), OBLIQUE)
    grid = model_grid_for(mr_grid, (2.0, 2.5, 3.0), size_multiple=8)
    assert grid.is_axial()
    assert grid.spacing_mm == (2.0, 2.5, 3.0)
    assert all(n % 8 == 0 for n in grid.size)
    corners = mr_grid.corner_points()
    low = np.asarray(grid.origin_mm) - np.asarray(grid.spacing_mm) / 2
    high = low + np.asarray(grid.size) * np.asarray(grid.spacing_mm)
    assert np.all(corners >= low - 1e-6) and np.all(corners <= high + 1e-6)
    # centred on the MR's extent: the padding is the same on both sides (to a voxel)
    centre = (corners.min(0) + corners.max(0)) / 2
    np.testing.assert_allclose((low + high) / 2, centre, atol=1e-6)


def test_a_bright_sphere_in_an_oblique_mr_stays_at_its_lps_point_on_the_model_grid():
    mr_grid = grid_around(HEAD_CENTRE_LPS, (48, 44, 28), (1.2, 1.2, 3.0), OBLIQUE)
    mr = sphere_volume(mr_grid, SPHERE_LPS, radius_mm=9.0)
    np.testing.assert_allclose(centroid_lps(mr, 500.0), SPHERE_LPS, atol=0.6)  # the phantom itself
    grid = model_grid_for(mr_grid, (2.0, 2.0, 2.0), size_multiple=4)
    resampled = resample_to_grid(mr, grid, linear=True)
    assert resampled.grid == grid and resampled.array.dtype == np.float32
    np.testing.assert_allclose(centroid_lps(resampled, 100.0), SPHERE_LPS, atol=1.0)


def test_round_trip_oblique_to_axial_and_back_keeps_the_image():
    mr_grid = grid_around(HEAD_CENTRE_LPS, (40, 40, 24), (2.0, 2.0, 2.0), OBLIQUE)
    mr = sphere_volume(mr_grid, SPHERE_LPS, radius_mm=12.0)
    axial = resample_to_grid(mr, model_grid_for(mr_grid, (1.0, 1.0, 1.0)), linear=True)
    back = resample_to_grid(axial, mr_grid, linear=True)
    assert back.grid == mr_grid
    np.testing.assert_allclose(centroid_lps(back, 500.0), SPHERE_LPS, atol=0.5)
    interior = np.linalg.norm(lps_points(mr_grid) - SPHERE_LPS, axis=-1) < 6.0  # 3 voxels from the edge
    np.testing.assert_allclose(back.array[interior], 1000.0, atol=1.0)


def test_antialiasing_smooths_only_when_the_target_is_coarser():
    grid = grid_around(HEAD_CENTRE_LPS, (32, 32, 32), (1.0, 1.0, 1.0))
    rng = np.random.default_rng(1)
    noise = Volume(rng.normal(0, 100, grid.shape_zyx).astype(np.float32), grid)
    same = resample_to_grid(noise, grid, linear=True)
    np.testing.assert_allclose(same.array, noise.array, atol=1e-3)  # same grid: untouched
    coarse = model_grid_for(grid, (4.0, 4.0, 4.0))
    smoothed = resample_to_grid(noise, coarse, linear=True).array.std()
    aliased = resample_to_grid(noise, coarse, linear=True, antialias=False).array.std()
    assert smoothed < 0.5 * aliased


def test_fov_mask_marks_the_mr_field_of_view():
    mr_grid = grid_around(HEAD_CENTRE_LPS, (20, 20, 10), (2.0, 2.0, 2.0), OBLIQUE)
    target = axial_grid_covering(mr_grid)
    fov = fov_mask(mr_grid, target).array.astype(bool)
    assert fov.any() and not fov.all()  # an oblique box does not fill its axial bounding box
    # every target voxel whose centre maps inside the MR's index range is in the FOV
    index = (lps_points(target) - np.asarray(mr_grid.origin_mm)) @ mr_grid.direction_matrix
    index = index / np.asarray(mr_grid.spacing_mm)
    inside = np.all((index > -0.5 + 1e-3) & (index < np.asarray(mr_grid.size) - 0.5 - 1e-3), axis=-1)
    outside = np.all((index < -0.5 - 1e-3) | (index > np.asarray(mr_grid.size) - 0.5 + 1e-3), axis=-1)
    assert fov[inside].all()
    assert not fov[outside].any()


# -- body mask --------------------------------------------------------------------------------------


def test_body_mask_of_a_synthetic_head_matches_the_head_and_fills_its_holes():
    grid = grid_around(HEAD_CENTRE_LPS, (40, 44, 40), (2.5, 2.5, 2.5))
    mr = head_mr(grid)
    # a bright blob outside the head (a marker, a coil) must not become body
    marker = np.linalg.norm(lps_points(grid) - (HEAD_CENTRE_LPS + [38.0, 44.0, 38.0]), axis=-1) < 4.0
    mr = Volume(np.where(marker, 900.0, mr.array).astype(np.float32), grid)
    mask = body_mask(mr).array
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    truth = true_body(grid)
    assert dice(mask, truth) > 0.97
    assert not mask[marker].any()
    # the dark skull and dark ventricles are inside the outline: no holes in the body
    depth_ok = np.linalg.norm((lps_points(grid) - HEAD_CENTRE_LPS) / [30, 38, 34], axis=-1) < 1
    assert mask[depth_ok].all()


def test_body_mask_refuses_a_constant_image():
    grid = grid_around(HEAD_CENTRE_LPS, (16, 16, 16), (2.0, 2.0, 2.0))
    with pytest.raises(PreprocessingError, match="constant"):
        body_mask(Volume(np.full(grid.shape_zyx, 7.0, np.float32), grid))


def test_output_masks_on_a_large_grid_use_a_coarser_mask_with_a_close_outline():
    grid = grid_around(HEAD_CENTRE_LPS, (48, 56, 48), (2.0, 2.0, 2.0))
    mr = head_mr(grid)
    fine = output_masks(mr, grid).body.array
    coarse = output_masks(mr, grid, max_mask_voxels=20_000).body.array  # about 3x coarser
    assert dice(fine, coarse) > 0.97
    assert dice(coarse, true_body(grid)) > 0.95


# -- intensities ------------------------------------------------------------------------------------


def test_normalize_mr_maps_body_percentiles_to_the_range_and_masks_the_background():
    config = PreprocessingConfig(mr_lower_percentile=10.0, mr_upper_percentile=90.0, mr_output_range=(-1.0, 1.0))
    rng = np.random.default_rng(3)
    mr = rng.uniform(100.0, 200.0, (8, 8, 8)).astype(np.float32)
    body = np.zeros(mr.shape, bool)
    body[2:6, 2:6, 2:6] = True
    normalised, (low, high) = normalize_mr(mr, body, config)
    np.testing.assert_allclose([low, high], np.percentile(mr[body], [10.0, 90.0]), rtol=1e-6)
    expected = np.clip((mr - low) / (high - low), 0, 1) * 2 - 1
    np.testing.assert_allclose(normalised[body], expected[body], atol=1e-6)
    assert np.all(normalised[~body] == -1.0)
    assert normalised.min() >= -1.0 and normalised.max() <= 1.0


def test_normalize_mr_refuses_an_empty_body():
    with pytest.raises(PreprocessingError, match="empty"):
        normalize_mr(np.ones((4, 4, 4)), np.zeros((4, 4, 4), bool), PreprocessingConfig())


def test_hu_mapping_round_trips_and_clips():
    config = PreprocessingConfig(hu_range=(-1024.0, 3071.0), ct_output_range=(-1.0, 1.0))
    hu = np.array([-2000.0, -1024.0, -1000.0, 0.0, 1023.5, 3071.0, 5000.0])
    unit = hu_to_unit(hu, config)
    np.testing.assert_allclose(unit[[0, 1, 5, 6]], [-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(unit[4], 0.0, atol=1e-6)
    np.testing.assert_allclose(unit_to_hu(unit, config), np.clip(hu, -1024, 3071), atol=1e-3)


def test_prepare_mr_gives_the_normalised_mr_on_the_model_grid():
    mr_grid = grid_around(HEAD_CENTRE_LPS, (36, 36, 20), (2.5, 2.5, 4.5), OBLIQUE)
    config = PreprocessingConfig(spacing_mm=(4.0, 4.0, 4.0))
    prepared = prepare_mr(head_mr(mr_grid), config, size_multiple=8)
    grid = prepared.mr_unit.grid
    assert grid.is_axial() and grid.spacing_mm == (4.0, 4.0, 4.0) and all(n % 8 == 0 for n in grid.size)
    assert prepared.mr_unit.array.dtype == np.float32
    assert prepared.mr_unit.array.min() >= -1.0 and prepared.mr_unit.array.max() <= 1.0
    assert dice(prepared.body_mask.array, true_body(grid)) > 0.9


# -- post-processing ------------------------------------------------------------------------------


def test_finish_hu_resamples_clips_and_sets_air_and_out_of_view_values():
    mr_grid = grid_around(HEAD_CENTRE_LPS, (28, 28, 16), (3.0, 3.0, 5.0), OBLIQUE)
    mr = head_mr(mr_grid)
    model_grid = model_grid_for(mr_grid, (4.0, 4.0, 4.0), size_multiple=4)
    # a linear HU ramp along L (linear interpolation reproduces it exactly), with values beyond the range
    ramp = 80.0 * (lps_points(model_grid)[..., 0] - HEAD_CENTRE_LPS[0])
    hu_model = Volume((ramp + 500.0).astype(np.float32), model_grid)
    output_grid = axial_grid_covering(mr_grid)
    masks = output_masks(mr, output_grid)
    hu = finish_hu(hu_model, masks).array
    body, fov = masks.body.array.astype(bool), masks.fov.array.astype(bool)
    assert body.any() and (fov & ~body).any() and (~fov).any()
    assert not (body & ~fov).any()
    expected = np.clip(80.0 * (lps_points(output_grid)[..., 0] - HEAD_CENTRE_LPS[0]) + 500.0, HU_MIN, HU_MAX)
    np.testing.assert_allclose(hu[body], expected[body], atol=0.05)
    assert np.all(hu[fov & ~body] == HU_AIR)
    assert np.all(hu[~fov] == HU_MIN)
    assert hu.min() >= HU_MIN and hu.max() <= HU_MAX and hu.max() == HU_MAX  # the ramp does get clipped
    std = finish_std(Volume(np.full(model_grid.shape_zyx, 25.0, np.float32), model_grid), masks).array
    np.testing.assert_allclose(std[body], 25.0, atol=1e-3)
    assert np.all(std[~body] == 0.0)
