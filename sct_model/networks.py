"""The networks of the 3D latent diffusion model, built from MONAI's generative components.

- Stage 1: :class:`AutoencoderConfig` builds a MONAI ``AutoencoderKL`` for CT (3D KL autoencoder).
- Conditioning: :class:`MREncoderConfig` builds :class:`MRConditionEncoder`, a small convolutional
  encoder (MONAI ``Convolution`` blocks) that takes the normalised MR to the latent grid.
- Stage 2: :class:`DiffusionUNetConfig` builds a MONAI ``DiffusionModelUNet`` whose input is the noisy
  CT latent concatenated with the MR encoding (channels ``latent + condition``), and whose output
  is the noise (or velocity, or sample) on the CT latent.
- :class:`SchedulerConfig` builds MONAI's ``DDPMScheduler`` (training) and ``DDIMScheduler``
  (sampling), or ``RFlowScheduler`` for a model trained with rectified flow.

All sizes live in frozen dataclasses that are stored in the checkpoint (``to_dict``/``from_dict``);
:data:`PRESETS` holds ``tiny`` (tests, CPU demo) and ``paper`` (GPU scale).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from torch import nn

log = logging.getLogger(__name__)

_Config = TypeVar("_Config")


def _config_from_dict(cls: type[_Config], values: Mapping[str, Any], what: str) -> _Config:
    """A config dataclass from a plain dict, refusing unknown and missing keys (lists become tuples)."""
    names = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown, missing = set(values) - names, names - set(values)
    if unknown or missing:
        raise ValueError(f"{what}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _check_groups(channels: tuple[int, ...], groups: int, what: str) -> None:
    if any(c % groups for c in channels):
        raise ValueError(f"{what}: every channel count {channels} must be a multiple of norm_num_groups={groups}")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """MONAI ``AutoencoderKL`` for CT; the latent grid is the image grid divided by ``downsample_factor``."""

    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    attention_levels: tuple[bool, ...] = (False, False, False)
    latent_channels: int = 3
    norm_num_groups: int = 16
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False

    def __post_init__(self) -> None:
        if not len(self.channels) == len(self.num_res_blocks) == len(self.attention_levels):
            raise ValueError("autoencoder: channels, num_res_blocks and attention_levels need one entry per level")
        _check_groups(self.channels, self.norm_num_groups, "autoencoder")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def build(self, *, use_flash_attention: bool = False) -> AutoencoderKL:
        return AutoencoderKL(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=self.channels,
            num_res_blocks=self.num_res_blocks,
            attention_levels=self.attention_levels,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            with_encoder_nonlocal_attn=self.with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=self.with_decoder_nonlocal_attn,
            use_flash_attention=use_flash_attention,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AutoencoderConfig:
        return _config_from_dict(cls, values, "autoencoder config")


@dataclasses.dataclass(frozen=True)
class MREncoderConfig:
    """The MR encoder: one level per entry of ``channels``, a stride-2 convolution between levels."""

    channels: tuple[int, ...] = (16, 32, 32)
    out_channels: int = 4  # conditioning channels concatenated to the noisy latent
    norm_num_groups: int = 8

    def __post_init__(self) -> None:
        if len(self.channels) < 1 or self.out_channels < 1:
            raise ValueError("MR encoder: need at least one level and one output channel")
        _check_groups(self.channels, self.norm_num_groups, "MR encoder")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def build(self) -> MRConditionEncoder:
        return MRConditionEncoder(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MREncoderConfig:
        return _config_from_dict(cls, values, "MR encoder config")


class MRConditionEncoder(nn.Module):
    """Normalised MR (N, 1, X, Y, Z) to its encoding on the latent grid (N, out_channels, X/f, Y/f, Z/f)."""

    def __init__(self, config: MREncoderConfig) -> None:
        super().__init__()

        def block(in_ch: int, out_ch: int, stride: int) -> Convolution:
            return Convolution(
                spatial_dims=3,
                in_channels=in_ch,
                out_channels=out_ch,
                strides=stride,
                kernel_size=3,
                norm=("group", {"num_groups": config.norm_num_groups}),
                act="SWISH",
            )

        layers: list[nn.Module] = [block(1, config.channels[0], 1)]
        for previous, current in zip(config.channels[:-1], config.channels[1:], strict=True):
            layers += [block(previous, current, 2), block(current, current, 1)]
        layers.append(Convolution(3, config.channels[-1], config.out_channels, kernel_size=1, conv_only=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, mr: torch.Tensor) -> torch.Tensor:
        return self.layers(mr)


@dataclasses.dataclass(frozen=True)
class DiffusionUNetConfig:
    """MONAI ``DiffusionModelUNet`` on the latent grid (``num_head_channels`` 0 where no attention)."""

    channels: tuple[int, ...] = (64, 128, 256)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: tuple[int, ...] = (2, 2, 2)
    num_head_channels: tuple[int, ...] = (0, 32, 32)
    norm_num_groups: int = 32
    resblock_updown: bool = False
    transformer_num_layers: int = 1

    def __post_init__(self) -> None:
        levels = len(self.channels)
        if not len(self.attention_levels) == len(self.num_res_blocks) == len(self.num_head_channels) == levels:
            raise ValueError(
                "diffusion UNet: channels, attention_levels, num_res_blocks and num_head_channels "
                "need one entry per level"
            )
        _check_groups(self.channels, self.norm_num_groups, "diffusion UNet")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def build(
        self, latent_channels: int, condition_channels: int, *, use_flash_attention: bool = False
    ) -> DiffusionModelUNet:
        return DiffusionModelUNet(
            spatial_dims=3,
            in_channels=latent_channels + condition_channels,
            out_channels=latent_channels,
            channels=self.channels,
            attention_levels=self.attention_levels,
            num_res_blocks=self.num_res_blocks,
            num_head_channels=self.num_head_channels,
            norm_num_groups=self.norm_num_groups,
            resblock_updown=self.resblock_updown,
            transformer_num_layers=self.transformer_num_layers,
            use_flash_attention=use_flash_attention,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DiffusionUNetConfig:
        return _config_from_dict(cls, values, "diffusion UNet config")


SCHEDULER_KINDS = ("ddpm", "rflow")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """How the diffusion model was trained: ``ddpm`` (sampled with DDIM) or ``rflow`` (rectified flow)."""

    kind: str = "ddpm"
    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"  # a MONAI NoiseSchedules name (ddpm only)
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: str = "epsilon"  # ddpm: epsilon | v_prediction | sample; rflow: v_prediction
    use_discrete_timesteps: bool = True  # rflow only
    sample_method: str = "uniform"  # rflow only: uniform | logit-normal
    use_timestep_transform: bool = False  # rflow only
    base_img_size_numel: int = 32 * 32 * 32  # rflow only, with use_timestep_transform

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULER_KINDS:
            raise ValueError(f"scheduler kind must be one of {SCHEDULER_KINDS}, got {self.kind!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.kind == "rflow" and self.prediction_type != "v_prediction":
            raise ValueError("a rectified-flow model predicts the velocity: prediction_type must be v_prediction")
        if self.num_train_timesteps < 1:
            raise ValueError("num_train_timesteps must be >= 1")

    @property
    def sampler_name(self) -> str:
        return "DDIM" if self.kind == "ddpm" else "RFlow"

    def _schedule_args(self) -> dict[str, Any]:
        if self.schedule == "cosine":
            return {}
        return {"beta_start": self.beta_start, "beta_end": self.beta_end}

    def _rflow(self) -> RFlowScheduler:
        return RFlowScheduler(
            num_train_timesteps=self.num_train_timesteps,
            use_discrete_timesteps=self.use_discrete_timesteps,
            sample_method=self.sample_method,
            use_timestep_transform=self.use_timestep_transform,
            base_img_size_numel=self.base_img_size_numel,
            spatial_dim=3,
        )

    def build_training_scheduler(self) -> DDPMScheduler | RFlowScheduler:
        """The scheduler to train with (``add_noise``; ``sample_timesteps`` for rectified flow)."""
        if self.kind == "rflow":
            return self._rflow()
        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            schedule=self.schedule,
            prediction_type=self.prediction_type,
            clip_sample=False,
            **self._schedule_args(),
        )

    def build_sampling_scheduler(self) -> DDIMScheduler | RFlowScheduler:
        """The scheduler to sample with: DDIM on the DDPM training schedule, or rectified flow."""
        if self.kind == "rflow":
            return self._rflow()
        return DDIMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            schedule=self.schedule,
            prediction_type=self.prediction_type,
            clip_sample=False,  # latents are not bounded to [-1, 1]
            set_alpha_to_one=True,
            **self._schedule_args(),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SchedulerConfig:
        return _config_from_dict(cls, values, "scheduler config")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole model: autoencoder, MR encoder, diffusion UNet and scheduler, checked against each other."""

    autoencoder: AutoencoderConfig
    mr_encoder: MREncoderConfig
    unet: DiffusionUNetConfig
    scheduler: SchedulerConfig

    def __post_init__(self) -> None:
        if self.mr_encoder.downsample_factor != self.autoencoder.downsample_factor:
            raise ValueError(
                f"the MR encoder downsamples by {self.mr_encoder.downsample_factor} but the autoencoder by "
                f"{self.autoencoder.downsample_factor}: the MR encoding must land on the latent grid"
            )

    @property
    def latent_factor(self) -> int:
        """Image voxels per latent voxel along each axis."""
        return self.autoencoder.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this for whole-volume inference."""
        return self.autoencoder.downsample_factor * self.unet.downsample_factor

    def build(self, *, use_flash_attention: bool = False) -> SCTNetworks:
        return SCTNetworks(self, use_flash_attention=use_flash_attention)

    def to_dict(self) -> dict[str, Any]:
        return {
            "autoencoder": self.autoencoder.to_dict(),
            "mr_encoder": self.mr_encoder.to_dict(),
            "unet": self.unet.to_dict(),
            "scheduler": self.scheduler.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        expected = {"autoencoder", "mr_encoder", "unet", "scheduler"}
        if set(values) != expected:
            raise ValueError(f"model config: expected keys {sorted(expected)}, got {sorted(values)}")
        return cls(
            autoencoder=AutoencoderConfig.from_dict(values["autoencoder"]),
            mr_encoder=MREncoderConfig.from_dict(values["mr_encoder"]),
            unet=DiffusionUNetConfig.from_dict(values["unet"]),
            scheduler=SchedulerConfig.from_dict(values["scheduler"]),
        )


class SCTNetworks(nn.Module):
    """The three networks of one model, with the operations training and sampling share."""

    def __init__(self, config: ModelConfig, *, use_flash_attention: bool = False) -> None:
        super().__init__()
        self.config = config
        self.autoencoder = config.autoencoder.build(use_flash_attention=use_flash_attention)
        self.mr_encoder = config.mr_encoder.build()
        self.unet = config.unet.build(
            config.autoencoder.latent_channels,
            config.mr_encoder.out_channels,
            use_flash_attention=use_flash_attention,
        )

    def encode_ct(self, ct_unit: torch.Tensor) -> torch.Tensor:
        """The (unscaled) latent mean of a CT in the model's range (N, 1, X, Y, Z)."""
        z_mu, _ = self.autoencoder.encode(ct_unit)
        return z_mu

    def encode_mr(self, mr_unit: torch.Tensor) -> torch.Tensor:
        """The MR encoding on the latent grid."""
        return self.mr_encoder(mr_unit)

    def denoise(self, noisy_latent: torch.Tensor, timesteps: torch.Tensor, mr_encoding: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for a (scaled) noisy latent, conditioned by concatenating the MR encoding."""
        return self.unet(torch.cat([noisy_latent, mr_encoding], dim=1), timesteps)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """CT in the model's range from an (unscaled) latent."""
        return self.autoencoder.decode(latent)


TINY = ModelConfig(
    autoencoder=AutoencoderConfig(
        channels=(16, 32, 32),
        num_res_blocks=(1, 1, 1),
        attention_levels=(False, False, False),
        latent_channels=3,
        norm_num_groups=8,
    ),
    mr_encoder=MREncoderConfig(channels=(8, 16, 16), out_channels=4, norm_num_groups=4),
    unet=DiffusionUNetConfig(
        channels=(32, 64),
        attention_levels=(False, True),
        num_res_blocks=(1, 1),
        num_head_channels=(0, 32),
        norm_num_groups=8,
    ),
    scheduler=SchedulerConfig(),
)

PAPER = ModelConfig(
    autoencoder=AutoencoderConfig(
        channels=(64, 128, 256),
        num_res_blocks=(2, 2, 2),
        attention_levels=(False, False, False),
        latent_channels=3,
        norm_num_groups=32,
    ),
    mr_encoder=MREncoderConfig(channels=(32, 64, 128), out_channels=8, norm_num_groups=16),
    unet=DiffusionUNetConfig(
        channels=(128, 256, 512),
        attention_levels=(False, True, True),
        num_res_blocks=(2, 2, 2),
        num_head_channels=(0, 64, 64),
        norm_num_groups=32,
    ),
    scheduler=SchedulerConfig(),
)

PRESETS: dict[str, ModelConfig] = {"tiny": TINY, "paper": PAPER}
"""``tiny``: about 2 million parameters (8 MB), a 64³ volume in about a second on a CPU (tests, the demo).
``paper``: GPU scale (about 190 million parameters): 3-channel latent at 4x downsampling as in the paper,
attention at the two coarsest UNet levels; train on latent patches of 32³ or more."""


def preset(name: str, *, scheduler: SchedulerConfig | None = None) -> ModelConfig:
    """A preset model config, optionally with another scheduler (``SchedulerConfig(kind="rflow", ...)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    config = PRESETS[name]
    return dataclasses.replace(config, scheduler=scheduler) if scheduler is not None else config
