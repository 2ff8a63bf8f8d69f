"""MR in, model input out; model output in, sCT on the requested grid out.

Everything here works in patient space (DICOM LPS, millimetres) with SimpleITK, on the
serialisable :class:`~sct_model.volume.Volume`:

- :func:`model_grid_for`: the axial grid at the model's voxel spacing that covers the MR, its size a
  multiple of the networks' total downsampling factor.
- :func:`resample_to_grid`: SimpleITK resampling with Gaussian anti-aliasing when the target is coarser.
- :func:`body_mask`: Otsu threshold, closing, largest connected component, 3D and slice-wise hole filling.
- :func:`normalize_mr`: robust percentile normalisation inside the body.
- :func:`hu_to_unit` / :func:`unit_to_hu`: the CT intensity mapping the autoencoder was trained with.
- :func:`prepare_mr` and :func:`finish_hu`: the two ends of the inference pipeline.

The training code calls the same functions, so that the model sees at inference exactly what it
saw in training; their settings travel in the checkpoint as :class:`PreprocessingConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import SimpleITK as sitk  # noqa: N813
from scipy import ndimage

from sct_model.result import HU_AIR, HU_MAX, HU_MIN
from sct_model.volume import AXIAL_DIRECTION, Grid, Vec3, Volume

log = logging.getLogger(__name__)

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


class PreprocessingError(ValueError):
    """The MR cannot be turned into a model input (empty, constant, no body found); the message says why."""


@dataclasses.dataclass(frozen=True)
class PreprocessingConfig:
    """How an MR becomes the model's input and the model's output becomes HU (stored in the checkpoint)."""

    spacing_mm: Vec3 = (1.0, 1.0, 1.0)  # the model's voxel spacing (x, y, z) on an axial grid
    mr_lower_percentile: float = 0.5  # inside the body; maps to mr_output_range[0]
    mr_upper_percentile: float = 99.5  # inside the body; maps to mr_output_range[1]
    mr_output_range: tuple[float, float] = (-1.0, 1.0)
    mask_mr_background: bool = True  # MR outside the body set to mr_output_range[0]
    hu_range: tuple[float, float] = (HU_MIN, HU_MAX)  # CT clipped to this range before training
    ct_output_range: tuple[float, float] = (-1.0, 1.0)  # hu_range maps linearly onto this range
    body_smoothing_mm: float = 2.0  # Gaussian sigma before the body threshold
    body_closing_mm: float = 4.0  # radius of the morphological closing of the body mask

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in self.spacing_mm)
        if len(spacing) != 3 or not all(s > 0 for s in spacing):
            raise ValueError(f"spacing_mm must be three positive numbers, got {self.spacing_mm}")
        if not 0.0 <= self.mr_lower_percentile < self.mr_upper_percentile <= 100.0:
            raise ValueError("need 0 <= mr_lower_percentile < mr_upper_percentile <= 100")
        for name in ("mr_output_range", "hu_range", "ct_output_range"):
            low, high = (float(v) for v in getattr(self, name))
            if not low < high:
                raise ValueError(f"{name} must be (low, high) with low < high")
            object.__setattr__(self, name, (low, high))
        if self.body_smoothing_mm < 0 or self.body_closing_mm < 0:
            raise ValueError("body_smoothing_mm and body_closing_mm must be >= 0")
        object.__setattr__(self, "spacing_mm", spacing)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PreprocessingConfig:
        names = {field.name for field in dataclasses.fields(cls)}
        unknown, missing = set(values) - names, names - set(values)
        if unknown or missing:
            raise ValueError(f"preprocessing settings: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """The MR on the model's grid, normalised, with its body mask (both on ``mr_unit.grid``)."""

    mr_unit: Volume  # float32 in config.mr_output_range
    body_mask: Volume  # uint8
    percentiles: tuple[float, float]  # the MR intensities that mapped to the ends of the range


# -- geometry -------------------------------------------------------------------------------------


def model_grid_for(grid: Grid, spacing_mm: Vec3, size_multiple: int = 1) -> Grid:
    """The axial grid at ``spacing_mm`` covering ``grid``'s extent, each size a multiple of ``size_multiple``.

    The grid is centred on the centre of the axis-aligned bounding box of ``grid``'s outer corners,
    so an oblique or sagittal MR lies entirely inside it (the same frame of reference, in LPS mm).
    """
    if size_multiple < 1:
        raise ValueError("size_multiple must be >= 1")
    spacing = np.asarray(spacing_mm, dtype=float)
    corners = grid.corner_points()
    low, high = corners.min(axis=0), corners.max(axis=0)
    size = np.maximum(1, np.ceil((high - low) / spacing - 1e-6)).astype(int)
    size = (np.ceil(size / size_multiple) * size_multiple).astype(int)
    centre = (low + high) / 2.0
    origin = centre - size * spacing / 2.0 + spacing / 2.0
    return Grid(
        size=tuple(int(n) for n in size),  # type: ignore[arg-type]
        spacing_mm=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin_mm=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=AXIAL_DIRECTION,
    )


def _antialias_sigma_mm(source: Grid, target: Grid) -> list[float]:
    """Per source axis, the Gaussian sigma (mm) that takes the source resolution down to the target's."""
    target_matrix = np.abs(target.direction_matrix)
    sigmas = []
    for axis in range(3):
        along = source.direction_matrix[:, axis]  # unit vector of this source axis in LPS
        # spacing of the target grid along this direction (weighted by how the axes line up)
        target_spacing = float(np.abs(along) @ target_matrix @ np.asarray(target.spacing_mm))
        source_spacing = source.spacing_mm[axis]
        excess = target_spacing**2 - source_spacing**2
        sigmas.append(math.sqrt(excess) / _FWHM_PER_SIGMA if excess > 1e-6 else 0.0)
    return sigmas


def resample_to_grid(
    volume: Volume, grid: Grid, *, linear: bool = True, default_value: float = 0.0, antialias: bool = True
) -> Volume:
    """``volume`` on ``grid`` (float32 when linear), Gaussian-smoothed first where ``grid`` is coarser."""
    image = volume.to_image()
    if linear:
        image = sitk.Cast(image, sitk.sitkFloat32)
        if antialias:
            sigmas = _antialias_sigma_mm(volume.grid, grid)
            if max(sigmas) > 0:
                image = sitk.DiscreteGaussian(image, [s * s for s in sigmas], 32, 0.01, True)
    resampled = sitk.Resample(
        image,
        grid.reference_image(),
        sitk.Transform(),
        sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
        float(default_value),
        image.GetPixelID(),
    )
    return Volume.of_image(resampled)


def fov_mask(source: Grid, grid: Grid) -> Volume:
    """uint8 mask on ``grid``: 1 where the point lies inside ``source``'s field of view."""
    ones = sitk.Image([int(n) for n in source.size], sitk.sitkUInt8) + 1
    ones.SetSpacing(source.spacing_mm)
    ones.SetOrigin(source.origin_mm)
    ones.SetDirection(source.direction)
    resampled = sitk.Resample(ones, grid.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    return Volume.of_image(resampled)


# -- body mask and intensities ----------------------------------------------------------------------


def body_mask(mr: Volume, *, smoothing_mm: float = 2.0, closing_mm: float = 4.0) -> Volume:
    """The patient's body on ``mr.grid`` (uint8): Otsu, closing, largest component, holes filled.

    Intensities are clipped at the 99.5th percentile before the Otsu threshold so that a few very
    bright voxels (fat, vessels, artefacts) do not pull the threshold up. Holes are filled in 3D and
    then slice by slice along the grid's third axis (on an axial grid: the body outline of each
    slice, with the airways and sinuses inside it, as radiotherapy draws the external contour).
    Raises :class:`PreprocessingError` when no body is found.
    """
    array = np.asarray(mr.array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.any():
        raise PreprocessingError("the MR has no finite voxel")
    array = np.where(finite, array, 0.0).astype(np.float32)
    high = float(np.percentile(array, 99.5))
    if not high > float(array.min()):
        raise PreprocessingError("the MR is constant: no body can be found")
    image = sitk.GetImageFromArray(np.minimum(array, high))
    image.CopyInformation(mr.to_image())
    if smoothing_mm > 0:
        image = sitk.SmoothingRecursiveGaussian(image, float(smoothing_mm))
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(image)
    mask = sitk.Cast(image > otsu.GetThreshold(), sitk.sitkUInt8)
    if closing_mm > 0:
        radius = [max(1, int(round(closing_mm / s))) for s in mr.grid.spacing_mm]
        mask = sitk.BinaryMorphologicalClosing(mask, radius, sitk.sitkBall, 1)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    largest = sitk.GetArrayFromImage(components) == 1
    if not largest.any():
        raise PreprocessingError("no body found in the MR (nothing above the Otsu threshold)")
    filled = ndimage.binary_fill_holes(largest)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    filled = ndimage.binary_fill_holes(filled, structure=in_plane)
    return Volume(array=filled.astype(np.uint8), grid=mr.grid)


def normalize_mr(
    mr_array: np.ndarray, body: np.ndarray, config: PreprocessingConfig
) -> tuple[np.ndarray, tuple[float, float]]:
    """MR intensities mapped to ``config.mr_output_range`` by percentiles inside ``body``, clipped.

    Returns the normalised float32 array and the two intensities (low, high) that were used.
    """
    inside = np.asarray(body, dtype=bool)
    values = np.asarray(mr_array, dtype=np.float32)[inside]
    if values.size == 0:
        raise PreprocessingError("the body mask is empty: the MR cannot be normalised")
    low, high = (float(v) for v in np.percentile(values, [config.mr_lower_percentile, config.mr_upper_percentile]))
    if not high > low:
        raise PreprocessingError(f"the MR intensities inside the body are constant ({low}): cannot normalise")
    unit = np.clip((np.asarray(mr_array, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    out_low, out_high = config.mr_output_range
    normalised = (out_low + unit * (out_high - out_low)).astype(np.float32)
    if config.mask_mr_background:
        normalised[~inside] = out_low
    return normalised, (low, high)


def hu_to_unit(hu: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """CT in HU, clipped to ``config.hu_range``, mapped linearly onto ``config.ct_output_range`` (float32)."""
    hu_low, hu_high = config.hu_range
    out_low, out_high = config.ct_output_range
    unit = (np.clip(np.asarray(hu, dtype=np.float32), hu_low, hu_high) - hu_low) / (hu_high - hu_low)
    return (out_low + unit * (out_high - out_low)).astype(np.float32)


def unit_to_hu(unit: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """The inverse of :func:`hu_to_unit`, clipped to ``config.hu_range`` (float32)."""
    hu_low, hu_high = config.hu_range
    out_low, out_high = config.ct_output_range
    hu = hu_low + (np.asarray(unit, dtype=np.float32) - out_low) / (out_high - out_low) * (hu_high - hu_low)
    return np.clip(hu, hu_low, hu_high).astype(np.float32)


# -- the two ends of inference -----------------------------------------------------------------------


def prepare_mr(mr: Volume, config: PreprocessingConfig, size_multiple: int = 1) -> ModelInput:
    """The MR on the model's axial grid at ``config.spacing_mm``, normalised, with its body mask."""
    grid = model_grid_for(mr.grid, config.spacing_mm, size_multiple)
    resampled = resample_to_grid(mr, grid, linear=True, default_value=0.0)
    if not np.isfinite(resampled.array).all():
        log.warning("the MR has non-finite voxels; they are set to 0")
        resampled = Volume(np.nan_to_num(resampled.array, nan=0.0, posinf=0.0, neginf=0.0), grid)
    body = body_mask(resampled, smoothing_mm=config.body_smoothing_mm, closing_mm=config.body_closing_mm)
    normalised, percentiles = normalize_mr(resampled.array, body.array, config)
    log.debug("model grid %s at %s mm; MR percentiles %s", grid.size, grid.spacing_mm, percentiles)
    return ModelInput(mr_unit=Volume(normalised, grid), body_mask=body, percentiles=percentiles)


@dataclasses.dataclass(frozen=True)
class OutputMasks:
    """Where the sCT is body, and where the MR saw anything at all, on the output grid (uint8 each)."""

    body: Volume
    fov: Volume


def output_masks(
    mr: Volume, grid: Grid, config: PreprocessingConfig | None = None, *, max_mask_voxels: int = 16_000_000
) -> OutputMasks:
    """The body mask and the MR's field of view on the output ``grid`` (the body lies inside the FOV).

    The body mask is computed on ``grid`` itself, or, for grids of more than ``max_mask_voxels``
    voxels (a 0.5 mm MR), on a coarser grid over the same extent whose mask is brought back by
    linear interpolation and a 0.5 threshold (a smooth outline, within half a coarse voxel).
    """
    config = config or PreprocessingConfig()
    fov = fov_mask(mr.grid, grid)
    voxels = int(np.prod(grid.size))
    mask_grid = grid
    if voxels > max_mask_voxels:
        factor = (voxels / max_mask_voxels) ** (1.0 / 3.0)
        spacing: Vec3 = (
            grid.spacing_mm[0] * factor,
            grid.spacing_mm[1] * factor,
            grid.spacing_mm[2] * factor,
        )
        mask_grid = model_grid_for(grid, spacing)
    mr_on_grid = resample_to_grid(mr, mask_grid, linear=True, default_value=0.0)
    body = body_mask(mr_on_grid, smoothing_mm=config.body_smoothing_mm, closing_mm=config.body_closing_mm)
    if mask_grid is not grid:
        soft = Volume(body.array.astype(np.float32), mask_grid)
        body = Volume((resample_to_grid(soft, grid, antialias=False).array >= 0.5).astype(np.uint8), grid)
    body_array = (body.array.astype(bool) & fov.array.astype(bool)).astype(np.uint8)
    return OutputMasks(body=Volume(body_array, grid), fov=fov)


def finish_hu(hu_model: Volume, masks: OutputMasks) -> Volume:
    """The model's HU volume on the output grid: linear resampling, clipped to [HU_MIN, HU_MAX], air
    (HU_AIR) outside the body inside the MR's field of view, HU_MIN outside the field of view."""
    grid = masks.body.grid
    hu = resample_to_grid(hu_model, grid, linear=True, default_value=HU_MIN).array
    hu = np.clip(hu, HU_MIN, HU_MAX).astype(np.float32)
    hu[masks.body.array == 0] = HU_AIR
    hu[masks.fov.array == 0] = HU_MIN
    return Volume(hu, grid)


def finish_std(std_model: Volume, masks: OutputMasks) -> Volume:
    """The per-voxel standard deviation on the output grid: zero where :func:`finish_hu` set a fixed value."""
    std = resample_to_grid(std_model, masks.body.grid, linear=True, default_value=0.0).array
    std = np.maximum(std, 0.0).astype(np.float32)
    std[masks.body.array == 0] = 0.0
    return Volume(std, masks.body.grid)
