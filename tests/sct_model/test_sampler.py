"""The diffusion sampler: the predictor contract, determinism, uncertainty, schedulers, sliding window."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import sct_model
from sct_model.checkpoint import Checkpoint
from sct_model.networks import SchedulerConfig
from sct_model.preprocessing import output_masks, unit_to_hu
from sct_model.result import HU_AIR, HU_MAX, HU_MIN
from sct_model.sampler import InferenceOptions, SCTSampler, ddim_timesteps
from sct_model.volume import axial_grid_covering
from tests.sct_model.phantom import HEAD_CENTRE_LPS, grid_around, head_mr, rotation, tiny_checkpoint


@pytest.fixture(scope="module")
def sampler(checkpoint_path: Path) -> SCTSampler:
    return SCTSampler.from_checkpoint(checkpoint_path, device="cpu")


@pytest.fixture(scope="module")
def oblique_head():
    return head_mr(grid_around(HEAD_CENTRE_LPS, (30, 32, 16), (3.0, 3.0, 5.0), rotation("x", 15.0)))


def test_predict_gives_hu_on_the_axial_grid_covering_the_mr(sampler: SCTSampler, oblique_head):
    result = sampler.predict(oblique_head, steps=2, samples=1, seed=5)
    grid = axial_grid_covering(oblique_head.grid)
    assert result.hu.grid == grid and result.hu.array.dtype == np.float32
    assert result.std_hu is None and result.seeds == (5,)
    hu = result.hu.array
    assert hu.min() >= HU_MIN and hu.max() <= HU_MAX
    masks = output_masks(oblique_head, grid)
    body, fov = masks.body.array.astype(bool), masks.fov.array.astype(bool)
    assert result.body_mask is not None
    np.testing.assert_array_equal(result.body_mask.array.astype(bool), body)
    assert np.all(hu[fov & ~body] == HU_AIR) and np.all(hu[~fov] == HU_MIN)
    assert np.unique(hu[body]).size > 100  # the model's values, not a constant
    assert {"preprocess", "condition", "sampling", "decode", "postprocess", "total"} <= set(result.timings_s)
    info = result.info
    assert (info.method, info.model_name, info.sampler, info.device) == (
        "diffusion",
        "sct-ldm-test",
        "DDIM",
        "cpu",
    )
    assert info.checkpoint_sha256 == sampler.checkpoint.file_sha256 and len(info.checkpoint_sha256) == 64
    assert "test-1" in info.model_version and sct_model.__version__ in info.model_version


def test_explicit_output_grid(sampler: SCTSampler, axial_head):
    output_grid = grid_around(HEAD_CENTRE_LPS, (20, 24, 18), (4.5, 4.0, 5.0))
    result = sampler.predict(axial_head, steps=1, samples=1, seed=0, output_grid=output_grid)
    assert result.hu.grid == output_grid and result.body_mask is not None
    assert result.body_mask.grid == output_grid


def test_same_seed_same_sct_and_other_seed_other_sct(sampler: SCTSampler, checkpoint_path: Path, axial_head):
    first = sampler.predict(axial_head, steps=2, samples=1, seed=7).hu.array
    again = sampler.predict(axial_head, steps=2, samples=1, seed=7).hu.array
    reloaded = SCTSampler.from_checkpoint(checkpoint_path, device="cpu")
    fresh = reloaded.predict(axial_head, steps=2, samples=1, seed=7).hu.array
    other = sampler.predict(axial_head, steps=2, samples=1, seed=8).hu.array
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, fresh)
    assert np.abs(first - other).mean() > 10.0


def test_samples_give_their_mean_and_standard_deviation(sampler: SCTSampler, axial_head):
    result = sampler.predict(axial_head, steps=2, samples=2, seed=3)
    assert result.seeds == (3, 4) and result.std_hu is not None
    assert result.std_hu.grid == result.hu.grid
    body = result.body_mask.array.astype(bool)  # type: ignore[union-attr]
    std = result.std_hu.array
    assert np.all(std >= 0) and np.all(std[~body] == 0.0) and std[body].mean() > 1.0
    # on the model grid: mean and sample standard deviation (ddof 1) of the single samples
    prepared = sct_model.preprocessing.prepare_mr(axial_head, sampler.checkpoint.preprocessing, sampler.size_multiple)
    mr_unit = prepared.mr_unit.array
    mean, std2, _ = sampler.sample_hu(mr_unit, steps=2, seeds=(3, 4))
    one, _, _ = sampler.sample_hu(mr_unit, steps=2, seeds=(3,))
    two, _, _ = sampler.sample_hu(mr_unit, steps=2, seeds=(4,))
    np.testing.assert_allclose(mean, (one + two) / 2, atol=1e-3)
    assert std2 is not None
    np.testing.assert_allclose(std2, np.abs(one - two) / np.sqrt(2), atol=1e-3)


def test_rectified_flow_checkpoint(rflow_checkpoint_path: Path, axial_head):
    rflow = SCTSampler.from_checkpoint(rflow_checkpoint_path, device="cpu")
    assert rflow.info.sampler == "RFlow"
    first = rflow.predict(axial_head, steps=3, samples=1, seed=1).hu.array
    again = rflow.predict(axial_head, steps=3, samples=1, seed=1).hu.array
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize(("steps", "samples", "seed"), [(0, 1, 0), (1001, 1, 0), (2, 0, 0), (2, 1, -1)])
def test_invalid_settings_are_refused(sampler: SCTSampler, axial_head, steps: int, samples: int, seed: int):
    with pytest.raises(ValueError):
        sampler.predict(axial_head, steps=steps, samples=samples, seed=seed)


def test_device_auto_is_the_cpu_without_cuda(checkpoint_path: Path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert SCTSampler.from_checkpoint(checkpoint_path, device="auto").info.device == "cpu"


# -- schedulers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 50, 1000])
def test_ddim_timesteps_follow_the_monai_step_rule(steps: int):
    timesteps = ddim_timesteps(1000, steps).tolist()
    assert len(timesteps) == steps and timesteps[0] == 999
    stride = 1000 // steps  # DDIMScheduler.step goes from t to t - T // steps
    assert all(a - b == stride for a, b in zip(timesteps, timesteps[1:], strict=False))
    assert timesteps[-1] == stride - 1 + 1000 % steps  # the final jump, to x0, is one stride too


class OracleUNet(nn.Module):
    """Predicts, from the noisy latent and its timestep, exactly what leads to the constant ``target``."""

    def __init__(self, config: SchedulerConfig, target: float, latent_channels: int) -> None:
        super().__init__()
        self.config, self.target, self.latent_channels = config, target, latent_channels
        self.alphas_cumprod = config.build_training_scheduler().alphas_cumprod if config.kind == "ddpm" else None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        latent = x[:, : self.latent_channels]
        t = timesteps.reshape(-1, 1, 1, 1, 1)
        if self.config.kind == "rflow":  # x_t = (1 - t/T) x0 + (t/T) noise, v = x0 - noise
            return (self.target - latent) / (t.float() / self.config.num_train_timesteps)
        alpha = self.alphas_cumprod[t.long()]  # type: ignore[index]
        return (latent - alpha.sqrt() * self.target) / (1 - alpha).sqrt()  # epsilon


class ChannelZeroDecoder(nn.Module):
    """Decodes a latent to its first channel, repeated over each 4x4x4 block (the tiny model's factor)."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return F.interpolate(latent[:, :1], scale_factor=4, mode="nearest")


@pytest.mark.parametrize("kind", ["ddpm", "rflow"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_scheduler_wiring_recovers_the_oracle_latent(kind: str, steps: int):
    scheduler = SchedulerConfig(kind=kind, prediction_type="epsilon" if kind == "ddpm" else "v_prediction")
    checkpoint = dataclasses.replace(tiny_checkpoint(scheduler), scale_factor=2.0)
    sampler = SCTSampler(checkpoint, device="cpu")
    sampler.networks.unet = OracleUNet(scheduler, target=0.25, latent_channels=3)  # type: ignore[assignment]
    sampler.networks.autoencoder = ChannelZeroDecoder()  # type: ignore[assignment]
    mean, _, _ = sampler.sample_hu(np.zeros((16, 16, 16), np.float32), steps=steps, seeds=(0,))
    # latent 0.25 -> decoder input 0.25 / scale_factor -> CT unit 0.125 -> HU
    expected = float(unit_to_hu(np.array(0.125), checkpoint.preprocessing))
    np.testing.assert_allclose(mean, expected, atol=0.05)


# -- sliding window --------------------------------------------------------------------------------------


class PointwiseUNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * (1.0 + timesteps.float().reshape(-1, 1, 1, 1, 1) / 1000.0)


class PointwiseDecoder(nn.Module):
    def __init__(self, latent_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(latent_channels, 1, 1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.interpolate(self.conv(latent), scale_factor=4, mode="nearest"))


def windowed(sampler: SCTSampler, window: tuple[int, int, int], batch: int = 1) -> SCTSampler:
    other = SCTSampler.__new__(SCTSampler)
    other.__dict__.update(sampler.__dict__)
    other.options = InferenceOptions(max_whole_latent_voxels=0, window_overlap=0.5, window_batch_size=batch)
    other.window_latent_shape = window
    return other


@pytest.mark.parametrize("kind", ["ddpm", "rflow"])
def test_sliding_window_machinery_is_exact_for_local_networks(kind: str):
    """With networks whose output at a voxel depends on that voxel only, blending must reproduce the
    whole-volume result to float precision: no seams, offsets or scaling errors from the windowing."""
    torch.manual_seed(1)
    # x0 prediction for DDIM: an epsilon-predicting random network would blow the latent up to saturation
    scheduler = SchedulerConfig(kind=kind, prediction_type="sample" if kind == "ddpm" else "v_prediction")
    whole = SCTSampler(tiny_checkpoint(scheduler), device="cpu")
    whole.networks.unet = PointwiseUNet(3 + 4, 3)  # type: ignore[assignment]
    whole.networks.mr_encoder = nn.Sequential(nn.AvgPool3d(4), nn.Conv3d(1, 4, 1))  # type: ignore[assignment]
    whole.networks.autoencoder = PointwiseDecoder(3)  # type: ignore[assignment]
    mr_unit = np.random.default_rng(2).uniform(-1, 1, (48, 40, 32)).astype(np.float32)
    reference, _, _ = whole.sample_hu(mr_unit, steps=3, seeds=(4,))
    assert reference.std() > 50.0
    for window, batch in (((4, 4, 4), 1), ((6, 4, 8), 3)):
        result, _, _ = windowed(whole, window, batch).sample_hu(mr_unit, steps=3, seeds=(4,))
        np.testing.assert_allclose(result, reference, atol=0.02)


def test_sliding_window_matches_whole_volume_inference_of_the_tiny_model(sampler: SCTSampler):
    """The real tiny networks (GroupNorm, attention, zero padding) are not local, so the windows see
    less context than the whole volume. Stated tolerance: on average over the body, the difference
    between windowed and whole-volume inference is under a tenth of the difference between two seeds.
    (The machinery itself is exact: see the test above.)"""
    head = head_mr(grid_around(HEAD_CENTRE_LPS, (32, 32, 32), (4.0, 4.0, 4.0)))
    prepared = sct_model.preprocessing.prepare_mr(head, sampler.checkpoint.preprocessing, sampler.size_multiple)
    mr_unit, body = prepared.mr_unit.array, prepared.body_mask.array.astype(bool)
    latent_shape = tuple(n // sampler.latent_factor for n in mr_unit.shape)
    assert latent_shape == (8, 8, 8)
    window = (6, 6, 6)  # 8 windows, overlapping by 4 latent voxels
    whole, _, _ = sampler.sample_hu(mr_unit, steps=2, seeds=(1,))
    other_seed, _, _ = sampler.sample_hu(mr_unit, steps=2, seeds=(2,))
    result, _, _ = windowed(sampler, window, batch=4).sample_hu(mr_unit, steps=2, seeds=(1,))
    window_error = np.abs(result - whole)[body].mean()
    seed_difference = np.abs(other_seed - whole)[body].mean()
    assert window_error > 0.0  # the windowed path did run
    assert window_error < 0.1 * seed_difference, (window_error, seed_difference)


def test_checkpoint_fixture_sanity(checkpoint_path: Path):
    assert isinstance(sct_model.checkpoint.load_checkpoint(checkpoint_path), Checkpoint)
