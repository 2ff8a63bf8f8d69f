"""SynthRAD Task 1 data: find the paired MR/CT cases, split them, load them as sct_model Volumes.

Layouts (Task 1 is MR to CT)::

    SynthRAD2025:  <root>/Task1/<HN|TH|AB>/<case>/{mr,ct,mask}.mha          (case ids like 1HNA001)
    SynthRAD2023:  <root>/Task1/<brain|pelvis>/<case>/{mr,ct,mask}.nii.gz   (case ids like 1BA001)

``root`` may also be the ``Task1`` folder itself. Each region folder of the challenge data also
holds an ``overview`` folder (spreadsheets of acquisition parameters): it is not a case and is
skipped, as are hidden folders. A case folder that lacks one of the three images raises
:class:`DataError` naming the case and the file.

The CT is clipped to [HU_MIN, HU_MAX] = [-1024, 3071] HU on loading (the range SynthRAD2025
evaluates in); the mask is the challenge's body mask (uint8, 0/1) on the CT grid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813

from sct_model.result import HU_MAX, HU_MIN
from sct_model.volume import Grid, Volume

log = logging.getLogger(__name__)

REGIONS_2025 = ("HN", "TH", "AB")
REGIONS_2023 = ("brain", "pelvis")
LAYOUTS = ("auto", "synthrad2025", "synthrad2023")
SPLIT_NAMES = ("train", "val", "test")
IMAGE_NAMES = ("mr", "ct", "mask")
# preferred extension first: the layout's own, then the other formats SimpleITK reads
_EXTENSIONS = {
    "synthrad2025": (".mha", ".nii.gz", ".nii"),
    "synthrad2023": (".nii.gz", ".nii", ".mha"),
}
_REGIONS = {"synthrad2025": REGIONS_2025, "synthrad2023": REGIONS_2023}
_SKIPPED_FOLDERS = {"overview"}
# grids of the three images of a case must agree to within this (mm, and direction cosines)
_GRID_TOLERANCE = 1e-3


class DataError(Exception):
    """The data cannot be used as it is: a missing or bad file, layout or split; the message says where."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One paired case: its id (the folder name), region and the paths of its three images."""

    case_id: str
    region: str
    mr_path: Path
    ct_path: Path
    mask_path: Path


# -- finding cases ----------------------------------------------------------------------------------


def _task_folder(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    task = root / "Task1"
    return task if task.is_dir() else root


def _region_folders(task: Path) -> dict[str, Path]:
    """Region folders present under ``task``, by their canonical name (case-insensitive match)."""
    canonical = {name.lower(): name for name in (*REGIONS_2025, *REGIONS_2023)}
    found: dict[str, Path] = {}
    for child in sorted(task.iterdir()):
        name = canonical.get(child.name.lower())
        if name is not None and child.is_dir():
            found[name] = child
    return found


def detect_layout(root: Path) -> str:
    """``"synthrad2025"`` or ``"synthrad2023"``, from the region folders under ``root`` or ``root/Task1``."""
    task = _task_folder(root)
    present = _region_folders(task)
    has_2025 = any(region in present for region in REGIONS_2025)
    has_2023 = any(region in present for region in REGIONS_2023)
    if has_2025 and has_2023:
        raise DataError(f"{task} holds region folders of both SynthRAD2023 and SynthRAD2025; pass layout=")
    if has_2025:
        return "synthrad2025"
    if has_2023:
        return "synthrad2023"
    raise DataError(f"no SynthRAD Task 1 region folder ({', '.join(REGIONS_2025 + REGIONS_2023)}) under {task}")


def _find_image(folder: Path, name: str, extensions: Sequence[str]) -> Path | None:
    for extension in extensions:
        path = folder / f"{name}{extension}"
        if path.is_file():
            return path
    return None


def _normalise_regions(regions: Iterable[str], layout: str) -> list[str]:
    allowed = {name.lower(): name for name in _REGIONS[layout]}
    selected = []
    for region in regions:
        name = allowed.get(str(region).lower())
        if name is None:
            raise DataError(f"unknown region {region!r} for {layout}; known: {', '.join(_REGIONS[layout])}")
        if name not in selected:
            selected.append(name)
    return selected


def find_cases(root: Path, *, layout: str = "auto", regions: Sequence[str] | None = None) -> list[Case]:
    """The cases under ``root`` (the data root or its ``Task1`` folder), sorted by region then case id.

    ``layout``: ``"auto"`` (detected from the region folders), ``"synthrad2025"`` or
    ``"synthrad2023"``. ``regions``: only these regions (case-insensitive names of the layout's
    regions); a requested region without a folder raises :class:`DataError`. Every case folder must
    hold ``mr``, ``ct`` and ``mask`` images (the layout's extension preferred, ``.mha``, ``.nii.gz``
    and ``.nii`` accepted); case ids must be unique across regions.
    """
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    task = _task_folder(root)
    if layout == "auto":
        layout = detect_layout(root)
    present = _region_folders(task)
    wanted = _normalise_regions(regions if regions is not None else _REGIONS[layout], layout)
    if regions is not None:
        missing = [region for region in wanted if region not in present]
        if missing:
            raise DataError(f"region folder(s) {', '.join(missing)} not found under {task}")
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for region in sorted(region for region in wanted if region in present):
        for folder in sorted(present[region].iterdir()):
            if not folder.is_dir() or folder.name.startswith((".", "_")) or folder.name.lower() in _SKIPPED_FOLDERS:
                continue
            paths = {}
            for name in IMAGE_NAMES:
                path = _find_image(folder, name, _EXTENSIONS[layout])
                if path is None:
                    raise DataError(
                        f"case {folder.name} ({region}): missing {name}{_EXTENSIONS[layout][0]} in {folder}"
                    )
                paths[name] = path
            if folder.name in seen:
                raise DataError(f"case id {folder.name} appears in regions {seen[folder.name]} and {region}")
            seen[folder.name] = region
            cases.append(Case(folder.name, region, paths["mr"], paths["ct"], paths["mask"]))
    if not cases:
        raise DataError(f"no cases found under {task} (layout {layout}, regions {', '.join(wanted)})")
    log.info("found %d case(s) under %s (%s)", len(cases), task, layout)
    return cases


# -- splits -------------------------------------------------------------------------------------------


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) for ``n`` cases of one region, leaving at least one training case when n >= 1."""
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    while n_val + n_test > max(n - 1, 0):
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def read_split(path: Path) -> dict[str, list[str]]:
    """A split file: JSON ``{"train": [ids], "val": [ids], "test": [ids]}`` (a missing key is empty)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"split file {path}: cannot read it as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"split file {path}: expected a JSON object with keys {', '.join(SPLIT_NAMES)}")
    unknown = sorted(set(data) - set(SPLIT_NAMES))
    if unknown:
        raise DataError(f"split file {path}: unknown key(s) {', '.join(unknown)}")
    split: dict[str, list[str]] = {}
    for name in SPLIT_NAMES:
        ids = data.get(name, [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DataError(f"split file {path}: {name!r} must be a list of case ids (strings)")
        split[name] = list(ids)
    return split


def split_cases(
    cases: Sequence[Case],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    split_file: Path | None = None,
) -> dict[str, list[Case]]:
    """The cases split into ``"train"``, ``"val"`` and ``"test"`` (each sorted like :func:`find_cases`).

    Without ``split_file``: stratified by region; within a region the cases are shuffled with a
    generator seeded by (``seed``, region), so a region's split depends neither on the other regions
    nor on the order of ``cases``; round(n * fraction) cases go to test and to val, and every region
    with cases keeps at least one training case. With ``split_file`` (see :func:`read_split`) the
    file decides: an id it names that is not among ``cases`` or that it lists twice raises
    :class:`DataError`; cases it does not name are left out (logged).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("need 0 <= val_fraction, test_fraction and val_fraction + test_fraction < 1")
    by_id = {case.case_id: case for case in cases}
    if len(by_id) != len(cases):
        raise DataError("case ids are not unique")
    order = {case.case_id: index for index, case in enumerate(sorted(cases, key=lambda c: (c.region, c.case_id)))}
    if split_file is not None:
        listed = read_split(split_file)
        names_of: dict[str, list[str]] = {}
        for name, ids in listed.items():
            for case_id in ids:
                names_of.setdefault(case_id, []).append(name)
        twice = sorted(case_id for case_id, names in names_of.items() if len(names) > 1)
        if twice:
            raise DataError(f"split file {split_file}: case(s) listed more than once: {', '.join(twice)}")
        unknown = sorted(set(names_of) - set(by_id))
        if unknown:
            raise DataError(f"split file {split_file}: case(s) not found in the data: {', '.join(unknown)}")
        left_out = sorted(set(by_id) - set(names_of))
        if left_out:
            log.warning("split file %s leaves out %d case(s): %s", split_file, len(left_out), ", ".join(left_out))
        return {name: sorted((by_id[i] for i in ids), key=lambda c: order[c.case_id]) for name, ids in listed.items()}
    split: dict[str, list[Case]] = {name: [] for name in SPLIT_NAMES}
    for region in sorted({case.region for case in cases}):
        members = sorted((case for case in cases if case.region == region), key=lambda c: c.case_id)
        random.Random(f"{seed}:{region}").shuffle(members)
        n_val, n_test = _split_sizes(len(members), val_fraction, test_fraction)
        split["test"].extend(members[:n_test])
        split["val"].extend(members[n_test : n_test + n_val])
        split["train"].extend(members[n_test + n_val :])
    return {name: sorted(members, key=lambda c: order[c.case_id]) for name, members in split.items()}


def write_split(split: Mapping[str, Sequence[Case]], path: Path) -> Path:
    """Write ``split`` as a split file (case ids, in the split's order), atomically; returns the path."""
    unknown = sorted(set(split) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"unknown split name(s) {', '.join(unknown)}")
    data = {name: [case.case_id for case in split.get(name, [])] for name in SPLIT_NAMES}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# -- loading ----------------------------------------------------------------------------------------


def _read(case: Case, name: str, path: Path, pixel_type: int) -> Volume:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(f"case {case.case_id}: cannot read {name} image {path}: {exc}") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"case {case.case_id}: {name} image {path} is not a 3D scalar image "
            f"({image.GetDimension()}D, {image.GetNumberOfComponentsPerPixel()} component(s))"
        )
    volume = Volume.of_image(sitk.Cast(image, pixel_type))
    if not np.isfinite(volume.array).all():
        raise DataError(f"case {case.case_id}: {name} image {path} has non-finite voxels")
    return volume


def same_grid(a: Grid, b: Grid) -> bool:
    return (
        a.size == b.size
        and np.allclose(a.spacing_mm, b.spacing_mm, atol=_GRID_TOLERANCE)
        and np.allclose(a.origin_mm, b.origin_mm, atol=_GRID_TOLERANCE)
        and np.allclose(a.direction, b.direction, atol=_GRID_TOLERANCE)
    )


def load_case(case: Case) -> tuple[Volume, Volume, Volume]:
    """(MR float32, CT float32 in HU clipped to [HU_MIN, HU_MAX], mask uint8 0/1), all on one grid.

    The three images must share their grid (SynthRAD registers the MR to the CT and resamples it
    onto the CT grid); a mismatch, an unreadable file, a non-3D image, non-finite voxels or an empty
    mask raise :class:`DataError` naming the case and the file.
    """
    mr = _read(case, "mr", case.mr_path, sitk.sitkFloat32)
    ct = _read(case, "ct", case.ct_path, sitk.sitkFloat32)
    mask = _read(case, "mask", case.mask_path, sitk.sitkFloat32)
    for name, volume, path in (("ct", ct, case.ct_path), ("mask", mask, case.mask_path)):
        if not same_grid(volume.grid, mr.grid):
            raise DataError(
                f"case {case.case_id}: {name} image {path} is not on the MR's grid ({volume.grid} vs {mr.grid})"
            )
    ct = Volume(np.clip(ct.array, HU_MIN, HU_MAX).astype(np.float32), mr.grid)
    mask = Volume((mask.array > 0).astype(np.uint8), mr.grid)
    if not mask.array.any():
        raise DataError(f"case {case.case_id}: mask image {case.mask_path} is empty")
    return mr, ct, mask
