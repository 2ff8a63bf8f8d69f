"""Test data for sct_model: a synthetic T1-like head on any grid, tiny randomly initialised checkpoints."""

from __future__ import annotations

import numpy as np
import torch

from sct_model.checkpoint import Checkpoint
from sct_model.networks import SchedulerConfig, preset
from sct_model.preprocessing import PreprocessingConfig
from sct_model.volume import Grid, Volume

HEAD_CENTRE_LPS = np.array([3.0, -5.0, 8.0])
HEAD_SEMI_AXES_MM = np.array([40.0, 48.0, 44.0])
SKULL_INSET_MM = (4.0, 9.0)  # the dark skull shell lies between these depths (fraction of the semi-axes)
BONE_CENTRE_LPS = HEAD_CENTRE_LPS + np.array([0.0, 0.0, -14.0])  # a dark "bone" blob deep inside
BONE_RADIUS_MM = 7.0
SCALP, SKULL, BRAIN, VENTRICLE, BACKGROUND = 520.0, 40.0, 600.0, 150.0, 8.0
MODEL_SPACING_MM = (4.0, 4.0, 4.0)


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def grid_around(
    centre: np.ndarray,
    size: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    direction: np.ndarray | None = None,
) -> Grid:
    """A grid of ``size`` voxels centred at ``centre`` (LPS), its axes the columns of ``direction``."""
    direction = np.eye(3) if direction is None else direction
    half = (np.asarray(size) - 1) / 2.0 * np.asarray(spacing_mm)
    origin = centre - direction @ half
    return Grid(
        size=size,
        spacing_mm=spacing_mm,
        origin_mm=tuple(origin),
        direction=tuple(direction.reshape(-1)),
    )


def lps_points(grid: Grid) -> np.ndarray:
    """LPS coordinates of every voxel centre, shape (z, y, x, 3)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.shape_zyx), indexing="ij")
    index = np.stack([i, j, k], axis=-1).reshape(-1, 3)
    return grid.index_to_point(index).reshape(*grid.shape_zyx, 3)


def head_depth(points: np.ndarray) -> np.ndarray:
    """Approximate depth (mm) below the surface of the ellipsoidal head (negative outside)."""
    radius = np.linalg.norm((points - HEAD_CENTRE_LPS) / HEAD_SEMI_AXES_MM, axis=-1)
    return (1.0 - radius) * HEAD_SEMI_AXES_MM.min()


def head_mr(grid: Grid, *, noise: float = 6.0, seed: int = 0, bone_blob: bool = False) -> Volume:
    """A T1-like head on ``grid``: scalp, dark skull, brain, dark ventricles, a smooth bias field, noise."""
    points = lps_points(grid)
    depth = head_depth(points)
    signal = np.full(depth.shape, BACKGROUND, dtype=np.float32)
    signal[depth >= 0] = SCALP
    signal[(depth >= SKULL_INSET_MM[0]) & (depth < SKULL_INSET_MM[1])] = SKULL
    signal[depth >= SKULL_INSET_MM[1]] = BRAIN
    ventricles = np.linalg.norm((points - HEAD_CENTRE_LPS) / np.array([8.0, 14.0, 8.0]), axis=-1) < 1
    signal[ventricles] = VENTRICLE
    if bone_blob:
        signal[np.linalg.norm(points - BONE_CENTRE_LPS, axis=-1) < BONE_RADIUS_MM] = SKULL
    bias = 1.0 + 0.15 * (points[..., 0] - HEAD_CENTRE_LPS[0]) / HEAD_SEMI_AXES_MM[0]
    rng = np.random.default_rng(seed)
    signal = signal * bias + rng.normal(0.0, noise, signal.shape)
    return Volume(np.abs(signal).astype(np.float32), grid)


def true_body(grid: Grid) -> np.ndarray:
    return head_depth(lps_points(grid)) >= 0


def tiny_checkpoint(
    scheduler: SchedulerConfig | None = None,
    *,
    seed: int = 0,
    latent_patch_shape: tuple[int, int, int] = (4, 4, 4),
) -> Checkpoint:
    """A randomly initialised tiny model. MONAI zero-initialises the UNet's output convolution; it is
    randomised here too, so that the UNet's output matters."""
    torch.manual_seed(seed)
    networks = preset("tiny", scheduler=scheduler).build()
    for parameter in networks.unet.out.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    return Checkpoint.from_networks(
        networks,
        scale_factor=1.0,
        preprocessing=PreprocessingConfig(spacing_mm=MODEL_SPACING_MM),
        latent_patch_shape=latent_patch_shape,
        model_name="sct-ldm-test",
        model_version="test-1",
        intended_use="tests only",
        training_data={"source": "none: random weights", "cases": 0},
    )
