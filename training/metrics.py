"""Image similarity of an sCT to its CT inside a mask, as the SynthRAD challenges compute it.

All functions take numpy arrays of one shape (HU; the mask nonzero inside) and first clip both
images to [HU_MIN, HU_MAX] = [-1024, 3071] HU, the SynthRAD2025 range (``data_range`` 4095).

- :func:`mae_hu`: mean absolute error over the mask voxels.
- :func:`psnr_db`: 10 log10(data_range^2 / MSE) with the MSE over the mask voxels; ``inf`` when
  the images agree exactly inside the mask (as skimage, which SynthRAD uses, returns).
- :func:`ssim`: SynthRAD2023's masked SSIM (its ``image_metrics.ssim``): outside the mask both
  images are set to HU_MIN, shifted by -HU_MIN to [0, 4095], the SSIM map computed as skimage's
  ``structural_similarity`` does by default (a 7x7x7 uniform window, sample covariance, K1 0.01,
  K2 0.03, reflecting borders), cropped by 3 voxels at every border, and averaged over the mask
  voxels left. ``window="gaussian"`` gives Wang et al.'s Gaussian window instead (sigma 1.5
  voxels, 11 voxels wide, population covariance, crop 5): not what SynthRAD computes, for
  comparison with papers that use it.
- :func:`ms_ssim`: SynthRAD2025's masked MS-SSIM (its evaluation ``image_metrics.ms_ssim``): the
  same masking and shift, images padded (edge values) to at least 97 voxels per axis, five scales
  weighted (0.0448, 0.2856, 0.3001, 0.2363, 0.1333); at each scale the map
  max(0, l)^w max(0, c)^w max(0, s)^w with the 7x7x7 uniform window (the reference code applies each
  scale's weight to all three terms), averaged over the mask inside the 3-voxel crop; then a 2x2x2
  mean (scipy ``fftconvolve(..., "same")`` of a box kernel, reproduced here exactly without the
  FFT) and every second voxel, the mask by every second voxel; the result is the product over the
  scales of the masked means, each clipped to [0, 1]. The padding is the reference code's own way
  to handle small volumes, so any size works; where the mask leaves no voxel inside the crop at a
  coarse scale (a tiny mask), that scale's mean is taken over the whole cropped map instead.
  MONAI's ``MultiScaleSSIMMetric`` has no mask and a different window and downsampling, so it is
  not used.

The SSIM maps are computed in slabs along the first axis, so memory stays a few times one image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from functools import partial

import numpy as np
from scipy import ndimage

from sct_model.result import HU_MAX, HU_MIN

log = logging.getLogger(__name__)

DATA_RANGE_HU = HU_MAX - HU_MIN  # 4095
K1, K2 = 0.01, 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MIN_SIZE = 97
_SLAB = 32  # slices per slab of the SSIM map
# (mean x, mean y, variance x, variance y, covariance, C1, C2) -> the map
Combine = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float], np.ndarray]


def _prepare(sct: np.ndarray, ct: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sct, ct, inside = np.asarray(sct), np.asarray(ct), np.asarray(mask) > 0
    if not (sct.shape == ct.shape == inside.shape):
        raise ValueError(f"shapes differ: sCT {sct.shape}, CT {ct.shape}, mask {inside.shape}")
    if not inside.any():
        raise ValueError("the mask is empty")
    return np.clip(sct, HU_MIN, HU_MAX), np.clip(ct, HU_MIN, HU_MAX), inside


def mae_hu(sct: np.ndarray, ct: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error (HU) inside the mask, both images clipped to [HU_MIN, HU_MAX]."""
    sct, ct, inside = _prepare(sct, ct, mask)
    return float(np.mean(np.abs(sct[inside].astype(np.float64) - ct[inside])))


def psnr_db(sct: np.ndarray, ct: np.ndarray, mask: np.ndarray, data_range: float = DATA_RANGE_HU) -> float:
    """Peak signal-to-noise ratio (dB) from the MSE inside the mask; ``inf`` for identical images there."""
    sct, ct, inside = _prepare(sct, ct, mask)
    mse = float(np.mean((sct[inside].astype(np.float64) - ct[inside]) ** 2))
    return math.inf if mse == 0.0 else float(10.0 * np.log10(data_range**2 / mse))


def _masked_and_shifted(sct: np.ndarray, ct: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both images HU_MIN outside the mask, then shifted by -HU_MIN (so within [0, 4095])."""
    return (
        np.where(inside, sct, HU_MIN).astype(np.float32) - HU_MIN,
        np.where(inside, ct, HU_MIN).astype(np.float32) - HU_MIN,
    )


def _ssim_map_slabs(
    x: np.ndarray,
    y: np.ndarray,
    *,
    data_range: float,
    window: str,
    combine: Combine,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (z_start, z_stop, map slab) of an SSIM-like map over x and y (float64 arithmetic), slab by slab.

    The local statistics are those of a filter with reflecting borders over the whole volume: each
    slab is filtered with a halo of the filter radius taken from the volume, padded by reflection
    (numpy "symmetric" = scipy "reflect") at the volume's ends.
    """
    if window == "uniform":
        radius, n_points = 3, 7**x.ndim
        filter_slab: Callable[[np.ndarray], np.ndarray] = partial(ndimage.uniform_filter, size=7, mode="reflect")
        cov_norm = n_points / (n_points - 1.0)
    elif window == "gaussian":
        radius = int(3.5 * 1.5 + 0.5)
        filter_slab = partial(ndimage.gaussian_filter, sigma=1.5, truncate=3.5, mode="reflect")
        cov_norm = 1.0
    else:
        raise ValueError(f"window must be 'uniform' or 'gaussian', got {window!r}")
    if min(x.shape) < 2 * radius + 1:
        raise ValueError(f"SSIM needs at least {2 * radius + 1} voxels per axis, got shape {x.shape}")
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    nz = x.shape[0]
    padded_x = np.pad(x, [(radius, radius)] + [(0, 0)] * (x.ndim - 1), mode="symmetric")
    padded_y = np.pad(y, [(radius, radius)] + [(0, 0)] * (x.ndim - 1), mode="symmetric")
    for start in range(0, nz, _SLAB):
        stop = min(start + _SLAB, nz)
        xs = padded_x[start : stop + 2 * radius].astype(np.float64)
        ys = padded_y[start : stop + 2 * radius].astype(np.float64)
        ux, uy = filter_slab(xs), filter_slab(ys)
        vx = cov_norm * (filter_slab(xs * xs) - ux * ux)
        vy = cov_norm * (filter_slab(ys * ys) - uy * uy)
        vxy = cov_norm * (filter_slab(xs * ys) - ux * uy)
        inner = slice(radius, radius + stop - start)
        yield start, stop, combine(ux[inner], uy[inner], vx[inner], vy[inner], vxy[inner], c1, c2)


def _plain_ssim(
    ux: np.ndarray, uy: np.ndarray, vx: np.ndarray, vy: np.ndarray, vxy: np.ndarray, c1: float, c2: float
) -> np.ndarray:
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def _masked_mean(
    slabs: Iterable[tuple[int, int, np.ndarray]],
    inside: np.ndarray,
    crop: int,
    *,
    fallback_to_full: bool = False,
) -> float:
    """Mean of the map over ``inside`` within ``crop`` voxels of every border (the skimage crop)."""
    total, count, total_all, count_all = 0.0, 0, 0.0, 0
    keep = tuple(slice(crop, n - crop) for n in inside.shape[1:])
    for start, stop, values in slabs:
        z0, z1 = max(start, crop), min(stop, inside.shape[0] - crop)
        if z1 <= z0:
            continue
        block = values[(slice(z0 - start, z1 - start), *keep)]
        where = inside[(slice(z0, z1), *keep)]
        total += float(block[where].sum(dtype=np.float64))
        count += int(where.sum())
        total_all += float(block.sum(dtype=np.float64))
        count_all += block.size
    if count == 0:
        if not fallback_to_full or count_all == 0:
            raise ValueError(f"no mask voxel lies more than {crop} voxels inside the border")
        log.debug("no mask voxel inside the crop at this scale: mean over the whole cropped map")
        return total_all / count_all
    return total / count


def ssim(
    sct: np.ndarray,
    ct: np.ndarray,
    mask: np.ndarray,
    data_range: float = DATA_RANGE_HU,
    *,
    window: str = "uniform",
) -> float:
    """SynthRAD2023's masked SSIM (see the module doc); ``window="gaussian"`` for Wang et al.'s window."""
    sct, ct, inside = _prepare(sct, ct, mask)
    x, y = _masked_and_shifted(sct, ct, inside)
    slabs = _ssim_map_slabs(x, y, data_range=data_range, window=window, combine=_plain_ssim)
    return float(_masked_mean(slabs, inside, 3 if window == "uniform" else 5))


def _weighted_lcs(weight: float) -> Combine:
    def combine(
        ux: np.ndarray, uy: np.ndarray, vx: np.ndarray, vy: np.ndarray, vxy: np.ndarray, c1: float, c2: float
    ) -> np.ndarray:
        c3 = c2 / 2.0
        sx, sy = np.sqrt(np.clip(vx, 0.0, None)), np.sqrt(np.clip(vy, 0.0, None))
        luminance = np.clip((2 * ux * uy + c1) / (ux * ux + uy * uy + c1), 0.0, None)
        contrast = np.clip((2 * sx * sy + c2) / (vx + vy + c2), 0.0, None)
        structure = np.clip((vxy + c3) / (sx * sy + c3), 0.0, None)
        return (luminance * contrast * structure) ** weight

    return combine


def _box_downsample(image: np.ndarray) -> np.ndarray:
    """scipy ``fftconvolve(image, ones((2,) * ndim) / 2**ndim, mode="same")[::2, ::2, ...]``, exactly.

    That "same" convolution is out[i] = (in[i] + in[i - 1]) / 2 per axis with in[-1] = 0 (the first
    plane averages with zero), so the kept samples are the means of the pairs (2j - 1, 2j).
    """
    padded = np.pad(image.astype(np.float64), [(1, 0)] * image.ndim)
    total = np.zeros(tuple((n + 1) // 2 for n in image.shape), dtype=np.float64)
    for offsets in np.ndindex(*(2,) * image.ndim):
        total += padded[tuple(slice(1 - o, 1 - o + n, 2) for o, n in zip(offsets, image.shape, strict=True))]
    return total / 2**image.ndim


def ms_ssim(sct: np.ndarray, ct: np.ndarray, mask: np.ndarray, data_range: float = DATA_RANGE_HU) -> float:
    """SynthRAD2025's masked multi-scale SSIM (see the module doc)."""
    sct, ct, inside = _prepare(sct, ct, mask)
    x, y = _masked_and_shifted(sct, ct, inside)
    pads = [
        (
            (max(0, MS_SSIM_MIN_SIZE - n) // 2),
            max(0, MS_SSIM_MIN_SIZE - n) - max(0, MS_SSIM_MIN_SIZE - n) // 2,
        )
        for n in x.shape
    ]
    x, y = np.pad(x, pads, mode="edge"), np.pad(y, pads, mode="edge")
    level_mask = np.pad(inside, pads, mode="edge")
    values = []
    for level, weight in enumerate(MS_SSIM_WEIGHTS):
        slabs = _ssim_map_slabs(x, y, data_range=data_range, window="uniform", combine=_weighted_lcs(weight))
        values.append(_masked_mean(slabs, level_mask, 3, fallback_to_full=True))
        if level < len(MS_SSIM_WEIGHTS) - 1:
            x, y = _box_downsample(x), _box_downsample(y)
            level_mask = level_mask[::2, ::2, ::2]
    return float(np.prod(np.clip(values, 0.0, 1.0)))
