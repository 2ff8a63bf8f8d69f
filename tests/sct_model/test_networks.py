"""Model configs, presets and the shapes through the three networks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sct_model.networks import (
    PRESETS,
    AutoencoderConfig,
    DiffusionUNetConfig,
    ModelConfig,
    MREncoderConfig,
    SchedulerConfig,
    preset,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_consistent_and_round_trip_through_plain_dicts(name: str):
    config = preset(name)
    assert config.mr_encoder.downsample_factor == config.autoencoder.downsample_factor == config.latent_factor
    assert config.size_multiple == config.latent_factor * config.unet.downsample_factor
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_tiny_shapes_through_encoder_unet_and_decoder():
    config = preset("tiny")
    networks = config.build().eval()
    f, c = config.latent_factor, config.autoencoder.latent_channels
    mr = torch.randn(2, 1, 32, 24, 16)
    with torch.inference_mode():
        encoding = networks.encode_mr(mr)
        assert encoding.shape == (2, config.mr_encoder.out_channels, 32 // f, 24 // f, 16 // f)
        latent = networks.encode_ct(torch.randn(2, 1, 32, 24, 16))
        assert latent.shape == (2, c, 32 // f, 24 // f, 16 // f)
        prediction = networks.denoise(latent, torch.tensor([10, 900]), encoding)
        assert prediction.shape == latent.shape
        assert networks.decode(latent).shape == (2, 1, 32, 24, 16)


def test_inconsistent_configs_are_refused():
    tiny = preset("tiny")
    with pytest.raises(ValueError, match="latent grid"):
        dataclasses.replace(tiny, mr_encoder=MREncoderConfig(channels=(8, 16), out_channels=4, norm_num_groups=4))
    with pytest.raises(ValueError, match="multiple of norm_num_groups"):
        AutoencoderConfig(channels=(12, 32, 32), norm_num_groups=8)
    with pytest.raises(ValueError, match="one entry per level"):
        DiffusionUNetConfig(
            channels=(32, 64),
            attention_levels=(False,),
            num_res_blocks=(1, 1),
            num_head_channels=(0, 32),
            norm_num_groups=8,
        )
    with pytest.raises(ValueError, match="v_prediction"):
        SchedulerConfig(kind="rflow", prediction_type="epsilon")
    with pytest.raises(ValueError, match="kind"):
        SchedulerConfig(kind="euler")
    with pytest.raises(ValueError, match="unknown keys"):
        SchedulerConfig.from_dict({**SchedulerConfig().to_dict(), "eta": 0.0})
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")


def test_schedulers_are_monai_components():
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

    ddpm = SchedulerConfig()
    assert isinstance(ddpm.build_training_scheduler(), DDPMScheduler)
    sampling = ddpm.build_sampling_scheduler()
    assert isinstance(sampling, DDIMScheduler) and not sampling.clip_sample
    assert ddpm.sampler_name == "DDIM"
    rflow = SchedulerConfig(kind="rflow", prediction_type="v_prediction")
    assert isinstance(rflow.build_training_scheduler(), RFlowScheduler)
    assert isinstance(rflow.build_sampling_scheduler(), RFlowScheduler) and rflow.sampler_name == "RFlow"
