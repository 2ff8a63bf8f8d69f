"""training.data (SynthRAD layouts, splits, loading) and training.transforms (model arrays, patches)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import torch

from sct_model.preprocessing import PreprocessingConfig, hu_to_unit, prepare_mr
from training.data import (
    Case,
    DataError,
    detect_layout,
    find_cases,
    load_case,
    read_split,
    split_cases,
    write_split,
)
from training.phantoms import generate_phantoms
from training.transforms import case_to_model_arrays, make_dataset

MODEL_CONFIG = PreprocessingConfig(spacing_mm=(3.0, 3.0, 3.0))


def write_case(folder: Path, extension: str, *, names=("mr", "ct", "mask"), seed: int = 0, ct_offset=0.0) -> None:
    """A small paired case: a bright box (body) in an MR, its CT and mask, on one grid."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    body = np.zeros((12, 14, 16), dtype=bool)
    body[2:10, 3:11, 3:13] = True
    images = {
        "mr": np.where(body, 500.0, 5.0) + rng.normal(0, 5, body.shape),
        "ct": np.where(body, 40.0, -1000.0) + ct_offset,
        "mask": body.astype(np.uint8),
    }
    for name in names:
        image = sitk.GetImageFromArray(images[name].astype(np.uint8 if name == "mask" else np.float32))
        image.SetSpacing((1.5, 1.5, 3.0))
        image.SetOrigin((-10.0, 20.0, 5.0))
        sitk.WriteImage(image, str(folder / f"{name}{extension}"))


@pytest.fixture
def root_2025(tmp_path: Path) -> Path:
    for region, ids in {
        "HN": ["1HNA001", "1HNC002"],
        "TH": ["1THB001"],
        "AB": ["1ABA003", "1ABA001"],
    }.items():
        for case_id in ids:
            write_case(tmp_path / "Task1" / region / case_id, ".mha")
        (tmp_path / "Task1" / region / "overview").mkdir()
    return tmp_path


@pytest.fixture
def root_2023(tmp_path: Path) -> Path:
    for region, ids in {"brain": ["1BA001", "1BC005"], "pelvis": ["1PA004"]}.items():
        for case_id in ids:
            write_case(tmp_path / "Task1" / region / case_id, ".nii.gz")
    return tmp_path


def test_finds_2025_layout_sorted(root_2025: Path) -> None:
    cases = find_cases(root_2025)
    assert [(c.region, c.case_id) for c in cases] == [
        ("AB", "1ABA001"),
        ("AB", "1ABA003"),
        ("HN", "1HNA001"),
        ("HN", "1HNC002"),
        ("TH", "1THB001"),
    ]
    assert cases[0].mr_path == root_2025 / "Task1" / "AB" / "1ABA001" / "mr.mha"
    assert detect_layout(root_2025) == "synthrad2025"
    # the Task1 folder itself works too, and gives the same cases
    assert find_cases(root_2025 / "Task1") == cases


def test_finds_2023_layout(root_2023: Path) -> None:
    cases = find_cases(root_2023)
    assert detect_layout(root_2023) == "synthrad2023"
    assert [(c.region, c.case_id) for c in cases] == [
        ("brain", "1BA001"),
        ("brain", "1BC005"),
        ("pelvis", "1PA004"),
    ]
    assert cases[2].ct_path.name == "ct.nii.gz" and cases[2].mask_path.name == "mask.nii.gz"
    mr, ct, mask = load_case(cases[0])
    assert mr.grid == ct.grid == mask.grid and mr.grid.spacing_mm == (1.5, 1.5, 3.0)


def test_regions_filter(root_2025: Path) -> None:
    assert {c.region for c in find_cases(root_2025, regions=["th", "AB"])} == {"TH", "AB"}
    with pytest.raises(DataError, match="brain"):
        find_cases(root_2025, regions=["brain"])
    with pytest.raises(DataError, match="layout"):
        find_cases(root_2025, layout="synthrad2023")


def test_missing_file_names_case_and_file(root_2025: Path) -> None:
    write_case(root_2025 / "Task1" / "TH" / "1THA009", ".mha", names=("mr", "mask"))
    with pytest.raises(DataError, match=r"1THA009.*ct\.mha"):
        find_cases(root_2025)
    # the other regions are still usable on their own
    assert len(find_cases(root_2025, regions=["HN"])) == 2


def test_no_cases_and_bad_root(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        find_cases(tmp_path / "absent")
    (tmp_path / "Task1" / "other").mkdir(parents=True)
    with pytest.raises(DataError, match="region"):
        find_cases(tmp_path)


def test_load_case_clips_ct_and_binarises_mask(tmp_path: Path) -> None:
    write_case(tmp_path / "Task1" / "AB" / "1ABA001", ".mha", ct_offset=5000.0)
    (case,) = find_cases(tmp_path)
    mr, ct, mask = load_case(case)
    assert ct.array.dtype == np.float32 and float(ct.array.max()) == 3071.0
    assert mask.array.dtype == np.uint8 and set(np.unique(mask.array)) == {0, 1}
    assert mr.array.dtype == np.float32


def test_load_case_rejects_grid_mismatch(tmp_path: Path) -> None:
    folder = tmp_path / "Task1" / "AB" / "1ABA001"
    write_case(folder, ".mha")
    image = sitk.ReadImage(str(folder / "ct.mha"))
    image.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(image, str(folder / "ct.mha"))
    (case,) = find_cases(tmp_path)
    with pytest.raises(DataError, match=r"1ABA001.*ct"):
        load_case(case)


def many_cases() -> list[Case]:
    cases = []
    for region, n in (("AB", 20), ("HN", 10), ("TH", 5)):
        for i in range(n):
            path = Path(f"/nowhere/{region}{i}")
            cases.append(Case(f"1{region}A{i:03d}", region, path, path, path))
    return cases


def test_split_is_deterministic_and_stratified() -> None:
    cases = many_cases()
    split = split_cases(cases, val_fraction=0.1, test_fraction=0.2, seed=3)
    again = split_cases(list(reversed(cases)), val_fraction=0.1, test_fraction=0.2, seed=3)
    assert split == again
    ids = [c.case_id for name in ("train", "val", "test") for c in split[name]]
    assert sorted(ids) == sorted(c.case_id for c in cases)  # a partition
    for region, n in (("AB", 20), ("HN", 10), ("TH", 5)):
        count = {name: sum(c.region == region for c in split[name]) for name in split}
        assert count["test"] == round(n * 0.2) and count["val"] == round(n * 0.1)
    other = split_cases(cases, val_fraction=0.1, test_fraction=0.2, seed=4)
    assert other["test"] != split["test"]


def test_split_keeps_a_training_case_per_region() -> None:
    cases = [c for c in many_cases() if c.region == "TH"][:2]
    split = split_cases(cases, val_fraction=0.4, test_fraction=0.5)
    assert len(split["train"]) == 1 and len(split["train"]) + len(split["val"]) + len(split["test"]) == 2


def test_split_file_round_trip(tmp_path: Path) -> None:
    cases = many_cases()
    split = split_cases(cases, seed=1)
    path = write_split(split, tmp_path / "split.json")
    assert json.loads(path.read_text())["test"] == [c.case_id for c in split["test"]]
    assert split_cases(cases, seed=99, split_file=path) == split
    assert read_split(path)["val"] == [c.case_id for c in split["val"]]


def test_split_file_errors(tmp_path: Path) -> None:
    cases = many_cases()
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["1ABA000", "nope"], "test": []}))
    with pytest.raises(DataError, match="nope"):
        split_cases(cases, split_file=path)
    path.write_text(json.dumps({"train": ["1ABA000"], "test": ["1ABA000"]}))
    with pytest.raises(DataError, match="more than once"):
        split_cases(cases, split_file=path)
    path.write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match="unknown key"):
        split_cases(cases, split_file=path)
    path.write_text(json.dumps({"train": ["1ABA000"], "test": ["1HNA001"]}))
    partial = split_cases(cases, split_file=path)  # the others are left out
    assert [c.case_id for c in partial["train"]] == ["1ABA000"] and partial["val"] == []


# -- transforms ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    return generate_phantoms(tmp_path_factory.mktemp("phantoms"), 3, seed=5, shape_zyx=(40, 40, 40))


def test_model_arrays_match_the_sampler_preprocessing(phantom_cases: list[Case]) -> None:
    case = phantom_cases[0]
    arrays = case_to_model_arrays(case, MODEL_CONFIG, size_multiple=4)
    mr, ct, mask = load_case(case)
    expected = prepare_mr(mr, MODEL_CONFIG, 4)
    assert arrays["mr"].shape == (1, *expected.mr_unit.grid.shape_zyx)
    assert all(n % 4 == 0 for n in arrays["mr"].shape[1:])
    np.testing.assert_array_equal(arrays["mr"][0], expected.mr_unit.array)
    assert arrays["ct"].dtype == np.float32 and arrays["mask"].dtype == np.uint8
    low, high = MODEL_CONFIG.ct_output_range
    assert low <= arrays["ct"].min() and arrays["ct"].max() <= high
    # CT in unit range inverts to plausible HU: air outside, bone inside
    assert arrays["ct"][0][arrays["mask"][0] == 0].mean() < float(hu_to_unit(np.array(-900.0), MODEL_CONFIG))
    assert arrays["ct"].max() > float(hu_to_unit(np.array(500.0), MODEL_CONFIG))
    # the mask follows the data set's mask (not the MR's Otsu body): same volume to within 15 %
    volume_mm3 = mask.array.sum() * np.prod(mask.grid.spacing_mm)
    assert abs(arrays["mask"].sum() * 27.0 / volume_mm3 - 1.0) < 0.15


def test_training_patches(phantom_cases: list[Case]) -> None:
    dataset = make_dataset(
        phantom_cases,
        preprocessing=MODEL_CONFIG,
        patch_size_zyx=(16, 12, 20),
        train=True,
        samples_per_case=3,
        seed=1,
    )
    assert len(dataset) == 9
    dataset.set_epoch(0)
    items = [dataset[i] for i in range(len(dataset))]
    for item in items:
        assert set(item) == {"mr", "ct", "mask"}
        assert all(tuple(t.shape) == (1, 16, 12, 20) for t in item.values())
        assert item["mr"].dtype == torch.float32 and item["mask"].dtype == torch.uint8
        assert float(item["mr"].min()) >= -1.0 and float(item["mr"].max()) <= 1.0
        assert float(item["ct"].min()) >= -1.0 and float(item["ct"].max()) <= 1.0
    # mostly inside the body
    assert np.mean([float(item["mask"].float().mean()) for item in items]) > 0.5
    # deterministic per (seed, epoch, index), different across epochs and indices
    assert torch.equal(dataset[4]["mr"], items[4]["mr"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[4]["mr"], items[4]["mr"])
    assert not torch.equal(items[0]["mr"], items[1]["mr"])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert tuple(batch["ct"].shape) == (4, 1, 16, 12, 20)


def test_validation_patches_are_fixed_and_unaugmented(phantom_cases: list[Case]) -> None:
    kwargs: dict[str, Any] = {
        "preprocessing": MODEL_CONFIG,
        "patch_size_zyx": (48, 16, 16),
        "train": False,
        "samples_per_case": 2,
    }
    dataset = make_dataset(phantom_cases, **kwargs)
    again = make_dataset(phantom_cases, **kwargs, cache=False)
    item = dataset[3]
    assert torch.equal(item["mr"], again[3]["mr"])
    # padded along z (the volume has 27 slices at 3 mm): the padding is background
    assert tuple(item["mr"].shape) == (1, 48, 16, 16)
    assert float(item["mr"][0, 0].max()) == -1.0 and float(item["ct"][0, 0].max()) == -1.0
    # an unaugmented patch is a crop of the model arrays
    arrays = case_to_model_arrays(phantom_cases[1], MODEL_CONFIG)
    values = set(np.round(arrays["mr"].ravel(), 5))
    assert set(np.round(item["mr"].numpy().ravel(), 5)) <= values
    assert bool(item["mask"].any())
