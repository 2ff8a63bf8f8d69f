"""The bulk-density baseline: exact values, geometry, the optional bone class, the predictor contract."""

from __future__ import annotations

import numpy as np
import pytest

import sct_model
from sct_model.baseline import BulkDensityBaseline
from sct_model.preprocessing import output_masks
from sct_model.result import HU_AIR, HU_MIN, HU_WATER, PredictorInfo
from sct_model.volume import axial_grid_covering
from tests.sct_model.phantom import (
    BONE_CENTRE_LPS,
    HEAD_CENTRE_LPS,
    grid_around,
    head_mr,
    lps_points,
    rotation,
    true_body,
)


def test_water_inside_air_outside_min_outside_the_field_of_view():
    mr_grid = grid_around(HEAD_CENTRE_LPS, (36, 40, 18), (2.5, 2.5, 4.0), rotation("x", 20.0))
    mr = head_mr(mr_grid)
    result = BulkDensityBaseline().predict(mr, steps=1, samples=1, seed=0)
    grid = axial_grid_covering(mr_grid)
    assert result.hu.grid == grid and result.body_mask is not None and result.body_mask.grid == grid
    hu, body = result.hu.array, result.body_mask.array.astype(bool)
    assert hu.dtype == np.float32
    masks = output_masks(mr, grid)
    fov = masks.fov.array.astype(bool)
    np.testing.assert_array_equal(body, masks.body.array.astype(bool))
    truth = true_body(grid) & fov  # the head reaches beyond the slab the MR covers
    assert 2 * (body & truth).sum() / (body.sum() + truth.sum()) > 0.95  # Dice: the head, where it is
    assert np.all(hu[body] == HU_WATER)
    assert np.all(hu[fov & ~body] == HU_AIR)
    assert np.all(hu[~fov] == HU_MIN)
    assert set(np.unique(hu)) == {HU_WATER, HU_AIR, HU_MIN}


def test_explicit_output_grid_and_determinism():
    mr = head_mr(grid_around(HEAD_CENTRE_LPS, (32, 32, 32), (3.0, 3.0, 3.0)))
    output_grid = grid_around(HEAD_CENTRE_LPS + [5.0, 0.0, 0.0], (50, 46, 30), (2.0, 2.0, 3.0))
    baseline = BulkDensityBaseline()
    first = baseline.predict(mr, steps=3, samples=2, seed=11, output_grid=output_grid)
    second = baseline.predict(mr, steps=3, samples=2, seed=11, output_grid=output_grid)
    assert first.hu.grid == output_grid
    np.testing.assert_array_equal(first.hu.array, second.hu.array)
    assert first.std_hu is None
    assert first.seeds == (11, 12)
    assert {"preprocess", "assign", "total"} <= set(first.timings_s)
    assert first.info == PredictorInfo(
        method="bulk_density",
        model_name="bulk-density",
        model_version=sct_model.__version__,
        checkpoint_sha256="",
        sampler="none",
        device="cpu",
    )


def test_bone_class_marks_dark_voxels_deep_inside_the_body_only():
    grid = grid_around(HEAD_CENTRE_LPS, (36, 40, 36), (2.5, 2.5, 2.5))
    mr = head_mr(grid, bone_blob=True)
    plain = BulkDensityBaseline().predict(mr, steps=1, samples=1, seed=0).hu.array
    with_bone = BulkDensityBaseline(bone_hu=700.0).predict(mr, steps=1, samples=1, seed=0).hu.array
    points = lps_points(grid)
    blob_core = np.linalg.norm(points - BONE_CENTRE_LPS, axis=-1) < 4.0
    assert np.all(with_bone[blob_core] == 700.0)
    assert not np.any(plain == 700.0)
    # the dark skull shell lies within 9 mm of the outline: only its deepest part may pass the 5 mm margin
    radius = np.linalg.norm((points - HEAD_CENTRE_LPS) / [40.0, 48.0, 44.0], axis=-1)
    shallow = radius > 1 - 4.5 / 40.0
    assert not np.any(with_bone[shallow] == 700.0)
    changed = with_bone != plain
    assert np.all(plain[changed] == HU_WATER)  # bone only replaces water


@pytest.mark.parametrize(("steps", "samples", "seed"), [(0, 1, 0), (1, 0, 0), (1, 1, -1)])
def test_invalid_settings_are_refused(steps: int, samples: int, seed: int):
    mr = head_mr(grid_around(HEAD_CENTRE_LPS, (16, 16, 16), (6.0, 6.0, 6.0)))
    with pytest.raises(ValueError):
        BulkDensityBaseline().predict(mr, steps=steps, samples=samples, seed=seed)
