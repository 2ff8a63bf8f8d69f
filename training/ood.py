"""MR volumes a phantom-trained checkpoint has never seen the like of: the QA benchmark's and tests' inputs.

Each kind is what a node in a hospital can meet and what a QA check must catch (the check that
should catch it in brackets):

- ``inverted``: the phantom's contrast turned upside down inside the body (a T2-like or inverted
  acquisition: fat dark, bone and air bright) [in_distribution];
- ``block``: a homogeneous block of tissue with no anatomy (a test object, a QA phantom) [in_distribution];
- ``unseen_anatomy``: a lump of muscle with fat marbling and a fat cap, no bone, no air (the
  porcine phantom a hospital tried: a piece of meat) [in_distribution];
- ``noise``: noise only, no object (an empty scan, a failed reconstruction) [in_distribution];
- ``t2``: the phantom's anatomy with T2-weighted contrast (fluid bright, muscle dark) [in_distribution];
- ``truncated``: the phantom with its field of view narrowed so that the body is cut on both
  sides (a patient wider than the MR's field of view) [field_of_view].

All are volumes on the phantom's grid (or a crop of it), MR intensities in arbitrary units with
Rician noise, like :func:`training.phantoms.make_phantom`'s.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from sct_model.preprocessing import body_mask
from sct_model.volume import Grid, Volume
from training.phantoms import LABELS, Phantom

KINDS = ("inverted", "block", "unseen_anatomy", "noise", "t2", "truncated")

# T2-weighted-like signal per tissue (arbitrary units): fluid bright, fat intermediate, muscle dark.
T2_SIGNAL = {
    "air": 0.0,
    "fat": 600.0,
    "muscle": 150.0,
    "soft": 300.0,
    "liver": 200.0,
    "spleen": 350.0,
    "kidney": 500.0,
    "blood": 100.0,
    "heart": 150.0,
    "lung": 20.0,
    "cavity": 5.0,
    "cortical": 20.0,
    "marrow": 450.0,
    "disc": 700.0,
    "csf": 1500.0,
    "cord": 400.0,
    "grey": 650.0,
    "white": 450.0,
    "vitreous": 1500.0,
}


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imaginary = rng.normal(0.0, sigma, signal.shape)
    return np.sqrt(real**2 + imaginary**2).astype(np.float32)


def _unit_coordinates(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, y, x) in [-1, 1] over the grid, numpy order."""
    nz, ny, nx = grid.shape_zyx
    return np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")


def inverted(phantom: Phantom, rng: np.random.Generator) -> Volume:
    """The MR's intensities mirrored inside the body (its 99.5th percentile minus the value)."""
    mr = phantom.mr.array
    body = body_mask(phantom.mr).array > 0
    top = float(np.percentile(mr[body], 99.5))
    out = np.where(body, np.clip(top - mr, 0.0, None), mr) * rng.uniform(0.8, 1.2)
    return Volume(out.astype(np.float32), phantom.mr.grid)


def block(grid: Grid, rng: np.random.Generator) -> Volume:
    """A rectangular block of one tissue, filling most of the field of view."""
    z, y, x = _unit_coordinates(grid)
    half = rng.uniform(0.45, 0.8, size=3)
    inside = (np.abs(z) < half[0]) & (np.abs(y) < half[1]) & (np.abs(x) < half[2])
    signal = np.where(inside, rng.uniform(250.0, 900.0), 0.0)
    return Volume(_rician(ndimage.gaussian_filter(signal, 0.5), rng.uniform(5.0, 20.0), rng), grid)


def unseen_anatomy(grid: Grid, rng: np.random.Generator) -> Volume:
    """A lump of meat: muscle with fat marbling and a fat cap, an irregular outline, no bone and no air."""
    z, y, x = _unit_coordinates(grid)
    radius = np.sqrt(
        (x / rng.uniform(0.5, 0.8)) ** 2 + (y / rng.uniform(0.35, 0.6)) ** 2 + (z / rng.uniform(0.4, 0.8)) ** 2
    )
    radius = radius + 0.3 * ndimage.gaussian_filter(rng.standard_normal(radius.shape), 4.0)
    meat = radius < 1.0
    cap = meat & (radius > rng.uniform(0.8, 0.9))
    marbling = meat & (ndimage.gaussian_filter(rng.standard_normal(radius.shape), 1.5) > rng.uniform(0.15, 0.3))
    signal = np.where(meat, 330.0, 0.0)
    signal[cap | marbling] = 900.0
    signal = ndimage.gaussian_filter(signal, 0.5) * rng.uniform(0.5, 2.0)
    return Volume(_rician(signal, 0.02 * 900.0, rng), grid)


def noise(grid: Grid, rng: np.random.Generator) -> Volume:
    """Rician noise over the whole field of view, nothing else."""
    return Volume(_rician(np.zeros(grid.shape_zyx), rng.uniform(5.0, 50.0), rng), grid)


def t2(phantom: Phantom, rng: np.random.Generator) -> Volume:
    """The phantom's anatomy (its label map) with T2-weighted-like contrast."""
    lookup = np.zeros(len(LABELS), np.float32)
    for tissue, value in T2_SIGNAL.items():
        lookup[LABELS[tissue]] = value
    signal = ndimage.gaussian_filter(lookup[phantom.labels.array], 0.4) * rng.uniform(0.5, 2.0)
    return Volume(_rician(signal, 15.0, rng), phantom.mr.grid)


def truncated(phantom: Phantom, rng: np.random.Generator) -> Volume:
    """The phantom's MR on a field of view narrowed left-right so that the body is cut on both sides."""
    mr = phantom.mr
    body = phantom.mask.array > 0
    columns = np.flatnonzero(body.any(axis=(0, 1)))
    width = int(columns[-1] - columns[0] + 1)
    keep = max(4, int(round(width * rng.uniform(0.55, 0.75))))
    start = int(columns[0] + (width - keep) // 2)
    grid = mr.grid
    origin = grid.index_to_point(np.array([[float(start), 0.0, 0.0]]))[0]
    cropped = Grid(
        size=(keep, grid.size[1], grid.size[2]),
        spacing_mm=grid.spacing_mm,
        origin_mm=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=grid.direction,
    )
    return Volume(np.ascontiguousarray(mr.array[:, :, start : start + keep]), cropped)


def make_ood(kind: str, phantom: Phantom, rng: np.random.Generator) -> Volume:
    """An MR of ``kind`` (see :data:`KINDS`), made from ``phantom`` or on its grid."""
    grid = phantom.mr.grid
    makers = {
        "inverted": lambda: inverted(phantom, rng),
        "block": lambda: block(grid, rng),
        "unseen_anatomy": lambda: unseen_anatomy(grid, rng),
        "noise": lambda: noise(grid, rng),
        "t2": lambda: t2(phantom, rng),
        "truncated": lambda: truncated(phantom, rng),
    }
    if kind not in makers:
        raise ValueError(f"unknown out-of-distribution kind {kind!r}; known: {', '.join(KINDS)}")
    return makers[kind]()
