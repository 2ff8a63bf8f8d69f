"""Cases to network inputs: the sampler's own preprocessing, then patches and augmentation (MONAI).

:func:`case_to_model_arrays` puts a case on the model grid exactly as the sampler does at
inference (:func:`sct_model.preprocessing.prepare_mr`: the axial grid at the model's spacing,
the body mask found on the MR, percentile normalisation inside it), and the CT on the same grid in
the autoencoder's unit range (:func:`~sct_model.preprocessing.hu_to_unit`).

:func:`make_dataset` serves patches of those arrays: ``len(cases) * samples_per_case`` items, item
``i`` a patch of case ``i // samples_per_case``, a dict of tensors ``"mr"``, ``"ct"`` (float32)
and ``"mask"`` (uint8), each (1, pz, py, px); the default collate batches them. Patch centres lie
inside the mask with probability ``pos_fraction``. With ``train=True`` a patch is augmented: a
left-right flip, a small rotation and scaling (MONAI ``RandAffined``, jointly on MR, CT and mask,
from a larger crop so that no padding enters the patch), and on the MR alone a bias field, a gamma
change, a gain change and noise inside the body, all applied on the MR's [0, 1] scale and clipped
back to the normalised range (the CT is not touched beyond the joint spatial transform and stays
in its range). The randomness of item ``i`` comes from (``seed``, epoch, ``i``) once
:meth:`PatchDataset.set_epoch` has been called, so it does not depend on the number of data
loader workers; before that, from torch's global generator (which the DataLoader seeds per worker
and per epoch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from monai.data import Dataset as MonaiDataset
from monai.transforms import (
    Compose,
    MapTransform,
    RandAffined,
    RandBiasField,
    RandFlipd,
    Randomizable,
    RandomizableTransform,
)
from torch.utils.data import Dataset

from sct_model.preprocessing import (
    PreprocessingConfig,
    PreprocessingError,
    hu_to_unit,
    prepare_mr,
    resample_to_grid,
)
from sct_model.result import HU_MIN
from sct_model.volume import Volume
from training.data import Case, DataError, load_case

log = logging.getLogger(__name__)

KEYS = ("mr", "ct", "mask")
MAX_ROTATION_RAD = (math.radians(10.0), math.radians(5.0), math.radians(5.0))  # about z (in-plane), y, x
MAX_SCALE = 0.1
_CROP_MARGIN = 1.3  # a rotated and scaled patch samples at most this much of the crop, per axis
_MAX_FG_INDICES = 2_000_000  # patch centres are drawn from at most about this many mask voxels


def case_to_model_arrays(
    case: Case, preprocessing: PreprocessingConfig, *, size_multiple: int = 1
) -> dict[str, np.ndarray]:
    """The case on the model grid: ``"mr"`` float32 normalised like the sampler's input, ``"ct"`` float32
    in ``preprocessing.ct_output_range``, ``"mask"`` uint8 (the data set's mask); each (1, z, y, x).

    The model grid is :func:`~sct_model.preprocessing.model_grid_for` the MR at
    ``preprocessing.spacing_mm`` (sizes a multiple of ``size_multiple``). The CT is resampled
    linearly (Gaussian anti-aliasing when the model grid is coarser, HU_MIN outside the CT) and
    clipped to ``preprocessing.hu_range``; the mask is resampled like an intensity and thresholded
    at 0.5.
    """
    mr, ct, mask = load_case(case)
    try:
        model_input = prepare_mr(mr, preprocessing, size_multiple)
    except PreprocessingError as exc:
        raise DataError(f"case {case.case_id}: MR {case.mr_path} cannot be preprocessed: {exc}") from exc
    grid = model_input.mr_unit.grid
    ct_model = resample_to_grid(ct, grid, linear=True, default_value=HU_MIN)
    mask_model = resample_to_grid(Volume(mask.array.astype(np.float32), mask.grid), grid, default_value=0.0)
    return {
        "mr": model_input.mr_unit.array.astype(np.float32)[None],
        "ct": hu_to_unit(ct_model.array, preprocessing)[None],
        "mask": (mask_model.array >= 0.5).astype(np.uint8)[None],
    }


def _pad_to(array: np.ndarray, shape_zyx: Sequence[int], value: float) -> np.ndarray:
    """``array`` (1, z, y, x) padded symmetrically with ``value`` to at least ``shape_zyx``."""
    pads = [(0, 0)]
    for have, need in zip(array.shape[1:], shape_zyx, strict=True):
        extra = max(0, int(need) - have)
        pads.append((extra // 2, extra - extra // 2))
    if all(p == (0, 0) for p in pads):
        return array
    return np.pad(array, pads, mode="constant", constant_values=value)


class LoadCaseArraysd(MapTransform):
    """``{"case": Case}`` to the model arrays, padded to at least ``min_shape_zyx``, with the flat indices
    of (a regular subset of) the mask voxels under ``"fg_indices"``; deterministic, so a cache keeps it."""

    def __init__(
        self, preprocessing: PreprocessingConfig, min_shape_zyx: Sequence[int], size_multiple: int = 1
    ) -> None:
        super().__init__(keys=("case",))
        self.preprocessing = preprocessing
        self.min_shape_zyx = tuple(int(n) for n in min_shape_zyx)
        self.size_multiple = size_multiple

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        case: Case = data["case"]
        arrays = case_to_model_arrays(case, self.preprocessing, size_multiple=self.size_multiple)
        backgrounds = {
            "mr": self.preprocessing.mr_output_range[0],
            "ct": self.preprocessing.ct_output_range[0],
        }
        out: dict[str, Any] = {key: _pad_to(arrays[key], self.min_shape_zyx, backgrounds.get(key, 0)) for key in KEYS}
        mask = out["mask"][0]
        stride = max(1, math.ceil((int(mask.sum()) / _MAX_FG_INDICES) ** (1.0 / 3.0)))
        subset = np.zeros(mask.shape, dtype=bool)
        subset[::stride, ::stride, ::stride] = mask[::stride, ::stride, ::stride] > 0
        out["fg_indices"] = np.flatnonzero(subset)
        out["case_id"] = case.case_id
        return out


class BodyPatchd(Randomizable, MapTransform):
    """A ``crop_size_zyx`` crop of the keys, centred on a mask voxel with probability ``pos_fraction``
    (drawn from ``"fg_indices"``) and anywhere otherwise; the crop stays inside the (padded) volume."""

    def __init__(self, crop_size_zyx: Sequence[int], pos_fraction: float) -> None:
        MapTransform.__init__(self, keys=KEYS)
        self.crop_size_zyx = tuple(int(n) for n in crop_size_zyx)
        self.pos_fraction = float(pos_fraction)
        self._centre: tuple[int, ...] = ()

    def randomize(self, data: Mapping[Hashable, Any]) -> None:
        shape = data["mr"].shape[1:]
        fg = data["fg_indices"]
        if len(fg) and self.R.rand() < self.pos_fraction:
            self._centre = tuple(int(i) for i in np.unravel_index(int(fg[self.R.randint(len(fg))]), shape))
        else:
            self._centre = tuple(int(self.R.randint(n)) for n in shape)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize(data)
        shape = data["mr"].shape[1:]
        slices = [slice(None)]
        for centre, size, n in zip(self._centre, self.crop_size_zyx, shape, strict=True):
            start = min(max(centre - size // 2, 0), n - size)
            slices.append(slice(start, start + size))
        return {key: np.ascontiguousarray(data[key][tuple(slices)]) for key in self.keys}


class MRIntensityAugmentd(RandomizableTransform, MapTransform):
    """MR-only intensity augmentation on the MR's [0, 1] scale (background stays at the low end).

    With probability ``prob`` each: a smooth multiplicative bias field (MONAI ``RandBiasField``),
    a gamma change, a gain change, Gaussian noise inside the mask. Clipped back to ``mr_range``.
    """

    def __init__(
        self,
        mr_range: tuple[float, float],
        *,
        prob: float = 0.3,
        bias_coefficient: float = 0.15,
        max_log_gamma: float = 0.3,
        max_gain: float = 0.1,
        max_noise_std: float = 0.03,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys=("mr",))
        self.low, self.high = (float(v) for v in mr_range)
        self.prob = float(prob)
        self.max_log_gamma, self.max_gain, self.max_noise_std = max_log_gamma, max_gain, max_noise_std
        self.bias = RandBiasField(degree=3, coeff_range=(-bias_coefficient, bias_coefficient), prob=1.0)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> Randomizable:
        super().set_random_state(seed, state)
        self.bias.set_random_state(seed=int(self.R.randint(2**31)))
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        unit = (np.asarray(data["mr"], dtype=np.float32) - self.low) / (self.high - self.low)
        if self.R.rand() < self.prob:
            unit = np.asarray(self.bias(unit), dtype=np.float32)
        if self.R.rand() < self.prob:
            unit = np.clip(unit, 0.0, None) ** float(np.exp(self.R.uniform(-self.max_log_gamma, self.max_log_gamma)))
        if self.R.rand() < self.prob:
            unit = unit * float(1.0 + self.R.uniform(-self.max_gain, self.max_gain))
        if self.R.rand() < self.prob:
            std = self.R.uniform(0.0, self.max_noise_std)
            unit = unit + self.R.normal(0.0, std, size=unit.shape).astype(np.float32) * (np.asarray(data["mask"]) > 0)
        out["mr"] = (self.low + np.clip(unit, 0.0, 1.0) * (self.high - self.low)).astype(np.float32)
        return out


def _patch_transform(
    patch_size_zyx: tuple[int, int, int],
    crop_size_zyx: tuple[int, int, int],
    train: bool,
    pos_fraction: float,
    preprocessing: PreprocessingConfig,
) -> Compose:
    transforms: list[Any] = [BodyPatchd(crop_size_zyx, pos_fraction)]
    if train:
        transforms += [
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),  # x: left-right
            RandAffined(
                keys=KEYS,
                spatial_size=patch_size_zyx,
                prob=0.5,
                rotate_range=MAX_ROTATION_RAD,
                scale_range=(MAX_SCALE,) * 3,
                mode=("bilinear", "bilinear", "nearest"),
                padding_mode="border",
            ),
            MRIntensityAugmentd(preprocessing.mr_output_range),
        ]
    return Compose(transforms, map_items=False)


class PatchDataset(Dataset):
    """``samples_per_case`` patches per case of a (cached) data set of model arrays; see the module doc."""

    def __init__(
        self,
        cases: Sequence[Case],
        arrays: Dataset,
        transform: Compose,
        *,
        samples_per_case: int,
        preprocessing: PreprocessingConfig,
        seed: int,
    ) -> None:
        self.cases = list(cases)
        self.arrays = arrays
        self.transform = transform
        self.samples_per_case = samples_per_case
        self.preprocessing = preprocessing
        self.seed = int(seed)
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Make the patches and augmentation of every item a function of (seed, ``epoch``, index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_case

    def _item_seed(self, index: int) -> int:
        epoch = self.epoch if self.epoch is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
        entropy = [self.seed, epoch, index, 0 if self.epoch is not None else 1]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} patches")
        data = self.arrays[index // self.samples_per_case]
        self.transform.set_random_state(seed=self._item_seed(index))
        patch = self.transform(data)
        mr_low, mr_high = self.preprocessing.mr_output_range
        ct_low, ct_high = self.preprocessing.ct_output_range
        return {
            "mr": torch.as_tensor(np.asarray(patch["mr"]), dtype=torch.float32).clamp(mr_low, mr_high).contiguous(),
            "ct": torch.as_tensor(np.asarray(patch["ct"]), dtype=torch.float32).clamp(ct_low, ct_high).contiguous(),
            "mask": (torch.as_tensor(np.asarray(patch["mask"])) > 0.5).to(torch.uint8).contiguous(),
        }


def make_dataset(
    cases: Sequence[Case],
    *,
    preprocessing: PreprocessingConfig,
    patch_size_zyx: tuple[int, int, int],
    train: bool,
    samples_per_case: int = 4,
    cache: bool = True,
    seed: int = 0,
    pos_fraction: float | None = None,
    size_multiple: int = 1,
    cache_workers: int = 1,
) -> PatchDataset:
    """Patches of ``cases`` for training (``train=True``: augmented) or validation (fixed patches).

    ``cache``: keep every case's model arrays in memory (MONAI ``CacheDataset``, filled here with
    ``cache_workers`` threads); otherwise each item loads and preprocesses its case again.
    ``pos_fraction``: the probability that a patch is centred inside the mask (None: 0.9 when
    training, 1.0 otherwise). Validation patches depend on (``seed``, index) only: the same every
    epoch.
    """
    patch = tuple(int(n) for n in patch_size_zyx)
    if len(patch) != 3 or any(n < 1 for n in patch):
        raise ValueError(f"patch_size_zyx must be three positive integers, got {patch_size_zyx}")
    if samples_per_case < 1:
        raise ValueError("samples_per_case must be >= 1")
    if not cases:
        raise ValueError("no cases")
    fraction = (0.9 if train else 1.0) if pos_fraction is None else float(pos_fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("pos_fraction must be in [0, 1]")
    crop = tuple(math.ceil(n * _CROP_MARGIN) + 2 for n in patch) if train else patch
    loader = LoadCaseArraysd(preprocessing, crop, size_multiple)
    items = [{"case": case} for case in cases]
    arrays: Dataset
    if cache:
        arrays = CacheDataset(items, transform=loader, num_workers=cache_workers, progress=False, copy_cache=False)
    else:
        arrays = MonaiDataset(items, transform=loader)
    transform = _patch_transform(patch, crop, train, fraction, preprocessing)  # type: ignore[arg-type]
    dataset = PatchDataset(
        cases, arrays, transform, samples_per_case=samples_per_case, preprocessing=preprocessing, seed=seed
    )
    if not train:
        dataset.set_epoch(0)
    return dataset
