"""training.phantoms: paired MR/CT phantoms with anatomy in the SynthRAD2025 layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from training.data import find_cases, load_case
from training.phantoms import LABELS, generate_phantoms, make_phantom

SHAPE = (48, 48, 48)


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(root, 4, seed=2, shape_zyx=SHAPE, spacing_mm=(2.5, 2.5, 2.5))
    return root


def test_layout_and_grids(phantom_root: Path) -> None:
    cases = find_cases(phantom_root)
    assert [(c.region, c.case_id) for c in cases] == [
        ("AB", "1ABA001"),
        ("HN", "1HNA001"),
        ("HN", "1HNA002"),
        ("TH", "1THA001"),
    ]
    for case in cases:
        assert case.mr_path == phantom_root / "Task1" / case.region / case.case_id / "mr.mha"
        mr, ct, mask = load_case(case)
        assert mr.grid == ct.grid == mask.grid
        assert mr.grid.shape_zyx == SHAPE and mr.grid.spacing_mm == (2.5, 2.5, 2.5) and mr.grid.is_axial()
        assert ct.array.min() >= -1024.0 and ct.array.max() <= 3071.0
        assert float(ct.array.min()) < -900.0  # air around the body
        assert 0.05 < mask.array.mean() < 0.8


@pytest.mark.parametrize("region", ["HN", "TH", "AB"])
def test_tissue_values(region: str) -> None:
    phantom = make_phantom(region, seed=7, shape_zyx=SHAPE)
    labels, ct, mr = phantom.labels.array, phantom.ct.array.astype(float), phantom.mr.array
    body = phantom.mask.array.astype(bool)
    np.testing.assert_array_equal(body, labels != LABELS["air"])  # the mask is the body

    def median_hu(tissue: str) -> float:
        # away from edges where the tissue is thick enough: partial volume mixes tissues at edges
        where = labels == LABELS[tissue]
        core = ndimage.binary_erosion(where)
        return float(np.median(ct[core if core.sum() >= 20 else where]))

    assert -160 < median_hu("fat") < -40
    assert 20 < median_hu("muscle") < 80
    assert median_hu("cortical") > 700
    assert 100 < median_hu("marrow") < 600
    assert median_hu("air") < -950
    if region == "TH":
        assert -900 < median_hu("lung") < -700
    if region == "AB":
        assert 40 < median_hu("liver") < 80
    if region == "HN":
        assert 15 < median_hu("white") < 50

    def median_mr(tissue: str) -> float:
        return float(np.median(mr[labels == LABELS[tissue]]))

    # T1-like contrast: fat bright, muscle mid, cortical bone and air cavities dark
    assert median_mr("fat") > 1.5 * median_mr("muscle") > 3 * median_mr("cortical")
    assert median_mr("cavity") < 0.3 * median_mr("muscle")


@pytest.mark.parametrize("region", ["HN", "TH", "AB"])
def test_mr_is_not_a_function_of_ct(region: str) -> None:
    """Dark MR voxels inside the body include both bone (CT > 500) and air or lung (CT < -500)."""
    phantom = make_phantom(region, seed=3, shape_zyx=SHAPE)
    ct, mr = phantom.ct.array.astype(float), phantom.mr.array
    body = phantom.mask.array.astype(bool)
    dark = body & (mr < np.percentile(mr[body], 10))
    assert (ct[dark] > 500).sum() > 10 and (ct[dark] < -500).sum() > 10


def test_mr_has_bias_field_and_noise() -> None:
    phantom = make_phantom("AB", seed=11, shape_zyx=SHAPE)
    labels, mr = phantom.labels.array, phantom.mr.array
    fat = mr[labels == LABELS["fat"]]
    assert fat.std() / fat.mean() > 0.03  # bias and noise spread one tissue's intensities
    background = mr[labels == LABELS["air"]]
    assert background.min() >= 0.0 and background.mean() > 0.0  # Rician: positive noise floor


def test_seeds(tmp_path: Path) -> None:
    first = make_phantom("TH", seed=1, shape_zyx=SHAPE)
    again = make_phantom("TH", seed=1, shape_zyx=SHAPE)
    other = make_phantom("TH", seed=2, shape_zyx=SHAPE)
    np.testing.assert_array_equal(first.ct.array, again.ct.array)
    np.testing.assert_array_equal(first.mr.array, again.mr.array)
    # different anatomy, not only different noise
    assert (first.labels.array != other.labels.array).mean() > 0.02
    # case k of a region does not depend on how many cases are generated
    few = generate_phantoms(tmp_path / "few", 1, seed=4, regions=("AB",), shape_zyx=(24, 24, 24))
    many = generate_phantoms(tmp_path / "many", 3, seed=4, regions=("AB", "HN"), shape_zyx=(24, 24, 24))
    assert few[0].case_id == many[0].case_id == "1ABA001"
    np.testing.assert_array_equal(load_case(few[0])[1].array, load_case(many[0])[1].array)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_phantom("brain")
    with pytest.raises(ValueError):
        generate_phantoms(tmp_path, 0)
