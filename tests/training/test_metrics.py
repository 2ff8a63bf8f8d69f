"""training.metrics: MAE, PSNR, SSIM and MS-SSIM inside a mask, as SynthRAD computes them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, signal

from training import metrics
from training.metrics import mae_hu, ms_ssim, psnr_db, ssim


@pytest.fixture
def volumes() -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (air, soft tissue, a bone block, noise) and its body mask."""
    rng = np.random.default_rng(0)
    ct = np.full((20, 24, 28), -1000.0)
    mask = np.zeros(ct.shape, dtype=np.uint8)
    mask[3:17, 4:20, 4:24] = 1
    ct[mask > 0] = 40.0
    ct[8:12, 10:14, 10:18] = 1200.0
    ct += rng.normal(0, 20, ct.shape)
    return ct, mask


def test_constant_offset(volumes) -> None:
    ct, mask = volumes
    for offset in (5.0, 37.5, 200.0):
        sct = ct + offset
        assert mae_hu(sct, ct, mask) == pytest.approx(offset)
        assert psnr_db(sct, ct, mask) == pytest.approx(20 * math.log10(4095.0 / offset))
    # PSNR from the MSE: an error of +d on half the voxels and 0 elsewhere
    sct = ct.copy()
    inside = np.flatnonzero(mask)
    sct.flat[inside[::2]] += 100.0
    fraction = len(inside[::2]) / len(inside)
    assert psnr_db(sct, ct, mask) == pytest.approx(10 * math.log10(4095.0**2 / (fraction * 100.0**2)))
    assert psnr_db(sct, ct, mask, data_range=1000.0) == pytest.approx(10 * math.log10(1000.0**2 / (fraction * 1e4)))


def test_identical_volumes(volumes) -> None:
    ct, mask = volumes
    assert mae_hu(ct, ct, mask) == 0.0
    assert psnr_db(ct, ct, mask) == math.inf
    assert ssim(ct, ct, mask) == pytest.approx(1.0)
    assert ssim(ct, ct, mask, window="gaussian") == pytest.approx(1.0)
    assert ms_ssim(ct, ct, mask) == pytest.approx(1.0)


def test_errors_outside_the_mask_are_ignored(volumes) -> None:
    ct, mask = volumes
    sct = ct.copy()
    sct[mask == 0] = 2000.0
    assert mae_hu(sct, ct, mask) == 0.0 and psnr_db(sct, ct, mask) == math.inf
    # SSIM sets both images to HU_MIN outside the mask, so the outside does not matter there either
    assert ssim(sct, ct, mask) == pytest.approx(1.0)
    assert ms_ssim(sct, ct, mask) == pytest.approx(1.0)


def test_clipping(volumes) -> None:
    ct, mask = volumes
    ct = ct.copy()
    ct[9, 11, 11] = 3071.0
    ct[5, 5, 5] = -1024.0
    sct = ct.copy()
    sct[9, 11, 11] = 6000.0  # clipped to 3071: no error
    sct[5, 5, 5] = -3000.0  # clipped to -1024: no error
    assert mae_hu(sct, ct, mask) == 0.0
    assert ssim(sct, ct, mask) == pytest.approx(1.0)
    sct[9, 11, 11] = 3000.0
    assert mae_hu(sct, ct, mask) == pytest.approx(71.0 / mask.sum())


def test_ssim_decreases_with_error(volumes) -> None:
    ct, mask = volumes
    rng = np.random.default_rng(1)
    small = ct + rng.normal(0, 30, ct.shape)
    large = ct + rng.normal(0, 300, ct.shape)
    assert 1.0 > ssim(small, ct, mask) > ssim(large, ct, mask) > 0.0
    assert 1.0 > ms_ssim(small, ct, mask) > ms_ssim(large, ct, mask) > 0.0
    blurred = ndimage.gaussian_filter(ct, 1.5)
    assert ms_ssim(blurred, ct, mask) < 0.999


def reference_ssim(sct: np.ndarray, ct: np.ndarray, mask: np.ndarray) -> float:
    """skimage's structural_similarity (7-voxel uniform window, sample covariance) the straightforward way."""
    inside = mask > 0
    x = np.where(inside, np.clip(sct, -1024, 3071), -1024.0) + 1024.0
    y = np.where(inside, np.clip(ct, -1024, 3071), -1024.0) + 1024.0
    f = lambda a: ndimage.uniform_filter(a, size=7)  # noqa: E731
    ux, uy = f(x), f(y)
    norm = 343 / 342
    vx, vy, vxy = norm * (f(x * x) - ux * ux), norm * (f(y * y) - uy * uy), norm * (f(x * y) - ux * uy)
    c1, c2 = (0.01 * 4095) ** 2, (0.03 * 4095) ** 2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    crop = (slice(3, -3),) * 3
    return float(ssim_map[crop][inside[crop]].mean())


def test_ssim_matches_the_reference_across_slabs(volumes, monkeypatch: pytest.MonkeyPatch) -> None:
    ct, mask = volumes
    sct = ct + np.random.default_rng(2).normal(0, 80, ct.shape)
    expected = reference_ssim(sct, ct, mask)
    assert ssim(sct, ct, mask) == pytest.approx(expected, rel=1e-9)
    monkeypatch.setattr(metrics, "_SLAB", 3)  # many slabs, with halos at every boundary
    assert ssim(sct, ct, mask) == pytest.approx(expected, rel=1e-9)


def test_box_downsample_is_the_reference_fftconvolve() -> None:
    image = np.random.default_rng(3).uniform(0, 4095, (9, 12, 7))
    expected = signal.fftconvolve(image, np.ones((2, 2, 2)) / 8, mode="same")[::2, ::2, ::2]
    np.testing.assert_allclose(metrics._box_downsample(image), expected, atol=1e-8)


def test_small_volumes_and_tiny_masks() -> None:
    rng = np.random.default_rng(4)
    ct = rng.normal(40, 50, (10, 12, 9))
    mask = np.zeros(ct.shape, dtype=np.uint8)
    mask[4:6, 5:7, 4:6] = 1
    value = ms_ssim(ct + rng.normal(0, 50, ct.shape), ct, mask)  # padded to 97 voxels per axis
    assert 0.0 < value < 1.0
    with pytest.raises(ValueError, match="voxels per axis"):
        ssim(ct[:5], ct[:5], mask[:5])
    with pytest.raises(ValueError, match="empty"):
        mae_hu(ct, ct, np.zeros_like(mask))
    with pytest.raises(ValueError, match="shapes"):
        psnr_db(ct, ct[1:], mask)


def reference_ms_ssim(sct: np.ndarray, ct: np.ndarray, mask: np.ndarray) -> float:
    """SynthRAD2025's masked MS-SSIM written the straightforward way (whole arrays, scipy fftconvolve)."""
    inside = mask > 0
    x = np.where(inside, np.clip(sct, -1024, 3071), -1024.0) + 1024.0
    y = np.where(inside, np.clip(ct, -1024, 3071), -1024.0) + 1024.0
    pads = [((97 - n) // 2, 97 - n - (97 - n) // 2) if n < 97 else (0, 0) for n in x.shape]
    x, y, m = np.pad(x, pads, mode="edge"), np.pad(y, pads, mode="edge"), np.pad(inside, pads, mode="edge")
    c1, c2 = (0.01 * 4095) ** 2, (0.03 * 4095) ** 2
    c3 = c2 / 2
    values = []
    for weight in (0.0448, 0.2856, 0.3001, 0.2363, 0.1333):
        f = lambda a: ndimage.uniform_filter(a, size=7)  # noqa: E731
        ux, uy = f(x), f(y)
        norm = 343 / 342
        vx, vy, vxy = norm * (f(x * x) - ux * ux), norm * (f(y * y) - uy * uy), norm * (f(x * y) - ux * uy)
        sx, sy = np.sqrt(np.clip(vx, 0, None)), np.sqrt(np.clip(vy, 0, None))
        lum = np.clip((2 * ux * uy + c1) / (ux**2 + uy**2 + c1), 0, None)
        con = np.clip((2 * sx * sy + c2) / (vx + vy + c2), 0, None)
        struct = np.clip((vxy + c3) / (sx * sy + c3), 0, None)
        ssim_map = lum**weight * con**weight * struct**weight
        crop = (slice(3, -3),) * 3
        values.append(ssim_map[crop][m[crop]].mean())
        box = np.ones((2, 2, 2)) / 8
        x, y = (signal.fftconvolve(a, box, mode="same")[::2, ::2, ::2] for a in (x, y))
        m = m[::2, ::2, ::2]
    return float(np.prod(np.clip(values, 0, 1)))


def test_ms_ssim_matches_the_reference(volumes) -> None:
    ct, mask = volumes
    sct = ndimage.gaussian_filter(ct, 1.0) + np.random.default_rng(5).normal(0, 60, ct.shape)
    expected = reference_ms_ssim(sct, ct, mask)
    assert 0.0 < expected < 1.0
    assert ms_ssim(sct, ct, mask) == pytest.approx(expected, rel=1e-7)
