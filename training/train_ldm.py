"""Stage 2: the MR-conditioned latent diffusion model on the frozen autoencoder's CT latents.

The trained networks are the MR condition encoder and the ``DiffusionModelUNet`` of
:class:`~sct_model.networks.SCTNetworks`; the autoencoder comes from a finished ``sct-train vae``
run (its weights, its preprocessing and its latent scale factor). Training follows the sampler's
conventions exactly (``SCTNetworks.denoise`` on ``scale_factor x`` the latent mean):

- ``ddpm``: timesteps uniform in [0, 1000), ``DDPMScheduler.add_noise``; the target is the noise
  (``epsilon``), the velocity (``v_prediction``) or the latent (``sample``); sampled with DDIM;
- ``rflow``: ``RFlowScheduler.sample_timesteps`` and ``add_noise`` (x_t = (1 - t/T) x0 + t/T noise); the
  target is the velocity ``x0 - noise`` that ``RFlowScheduler.step`` integrates.

The latents come from whole training volumes encoded once (``--latent-cache``, the default when they
fit in memory: the encoder sees each volume whole, as the decoder does at inference), or from the
frozen encoder on each CT patch. An EMA of the weights is validated and saved. Validation samples
whole validation volumes with :class:`~sct_model.sampler.SCTSampler` (a few DDIM steps) and reports
the MAE in HU inside the body mask. The end result is ``RUN_DIR/checkpoint.pt``, a sampler checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from sct_model.checkpoint import Checkpoint, save_checkpoint
from sct_model.networks import ModelConfig, SchedulerConfig, preset
from sct_model.preprocessing import unit_to_hu
from sct_model.sampler import InferenceOptions, SCTSampler
from training.loop import (
    EMA,
    DataOptions,
    GradientStep,
    LoopOptions,
    TrainingError,
    TrainingTask,
    amp_dtype,
    autocast,
    load_split,
    prepare_run_dir,
    run_training,
    seed_everything,
    spread_over_regions,
    training_device,
    write_json,
)
from training.qa_reference import MIN_REFERENCE_CASES, compute_reference
from training.train_vae import CaseArrays, TrainedVAE, encode_volume, load_vae, model_arrays

log = logging.getLogger(__name__)

TASK_NAME = "ldm"
LATENT_CACHE_CHOICES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class LDMOptions:
    preset: str = "tiny"  # the MR encoder and UNet sizes (the autoencoder is the VAE run's)
    scheduler: str = "ddpm"  # ddpm | rflow
    prediction_type: str = "epsilon"  # ddpm: epsilon | v_prediction | sample; rflow: v_prediction
    ema_decay: float = 0.999  # 0: no EMA (the raw weights are saved)
    samples_per_case: int = 4
    latent_cache: str = "auto"  # auto: on when the training volumes fit in cache_max_bytes
    augment_mr: bool = True  # MR intensity augmentation of the cached latent patches
    cache_max_bytes: int = 4 << 30
    val_cases: int = 2
    val_sampling_steps: int = 10
    name: str = "sct-ldm"
    version: str = "1"
    intended_use: str = "demo, not for clinical use"
    data_note: str = ""  # free text for the checkpoint's training-data description (how the data was made)
    qa_reference_steps: int = 25  # sampling steps of the QA reference's sCTs of the training cases (the node's)

    def __post_init__(self) -> None:
        if self.latent_cache not in LATENT_CACHE_CHOICES:
            raise ValueError(f"latent_cache must be one of {LATENT_CACHE_CHOICES}")

    def scheduler_config(self) -> SchedulerConfig:
        prediction = "v_prediction" if self.scheduler == "rflow" else self.prediction_type
        return SchedulerConfig(kind=self.scheduler, prediction_type=prediction)


def training_timesteps(scheduler: DDPMScheduler | RFlowScheduler, latent: torch.Tensor) -> torch.Tensor:
    """One random training timestep per sample: uniform in [0, T) for DDPM, the scheduler's own
    ``sample_timesteps`` (uniform or logit-normal, optionally shifted) for rectified flow."""
    if isinstance(scheduler, RFlowScheduler):
        return scheduler.sample_timesteps(latent)
    return torch.randint(0, scheduler.num_train_timesteps, (latent.shape[0],), device=latent.device)


def diffusion_target(
    scheduler: DDPMScheduler | RFlowScheduler,
    prediction_type: str,
    latent: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the UNet learns to predict from ``scheduler.add_noise(latent, noise, timesteps)``: the
    quantity the sampler's ``DDIMScheduler.step`` (``prediction_type``) or ``RFlowScheduler.step``
    (the velocity ``latent - noise`` along x_t = (1 - t/T) latent + t/T noise) expects."""
    if isinstance(scheduler, RFlowScheduler):
        return latent - noise
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latent, noise, timesteps)
    if prediction_type == "sample":
        return latent
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


class LatentPatches(Dataset[dict[str, torch.Tensor]]):
    """Random patches of whole-volume latents with the MR patches over the same region.

    A crop starts on the latent grid (the image crop starts at ``factor`` times that), so the MR and
    the latent stay aligned. With ``augment``, the MR patch gets the MR-only intensity augmentation of
    the patch data sets (``training.transforms.MRIntensityAugmentd``: bias field, gamma, gain, noise);
    spatial augmentation is left out, since the latent of a transformed CT is not the transformed
    latent. Item ``index``'s randomness comes from (``seed``, epoch, ``index``) (see ``set_epoch``).
    """

    def __init__(
        self,
        volumes: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
        latent_patch_zyx: Sequence[int],
        factor: int,
        *,
        samples_per_case: int,
        seed: int,
        mr_range: tuple[float, float] | None = None,
    ) -> None:
        self.volumes, self.patch, self.factor = list(volumes), tuple(latent_patch_zyx), factor
        self.samples_per_case, self.seed, self.epoch = samples_per_case, seed, 0
        for mr, latent, mask in self.volumes:
            if any(n < p for n, p in zip(latent.shape[1:], self.patch, strict=True)):
                raise ValueError(f"latent {tuple(latent.shape)} smaller than the patch {self.patch}")
            if mr.shape != mask.shape or tuple(mr.shape[1:]) != tuple(n * factor for n in latent.shape[1:]):
                raise ValueError("MR, mask and latent grids do not match")
        self.augment = None
        if mr_range is not None:
            from training.transforms import MRIntensityAugmentd

            self.augment = MRIntensityAugmentd(mr_range)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.volumes) * self.samples_per_case

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        mr, latent, mask = self.volumes[index // self.samples_per_case]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        starts = [int(rng.integers(0, n - p + 1)) for n, p in zip(latent.shape[1:], self.patch, strict=True)]
        latent_crop = (slice(None), *(slice(s, s + p) for s, p in zip(starts, self.patch, strict=True)))
        image_crop = (
            slice(None),
            *(slice(s * self.factor, (s + p) * self.factor) for s, p in zip(starts, self.patch, strict=True)),
        )
        mr_patch = np.ascontiguousarray(mr[image_crop])
        if self.augment is not None:
            self.augment.set_random_state(seed=int(rng.integers(2**31)))
            mr_patch = self.augment({"mr": mr_patch, "mask": mask[image_crop]})["mr"]
        return {
            "mr": torch.from_numpy(np.ascontiguousarray(mr_patch, dtype=np.float32)),
            "latent": torch.from_numpy(np.ascontiguousarray(latent[latent_crop])),
        }


class LDMTask(TrainingTask):
    name = TASK_NAME
    train_columns = ("loss",)
    val_columns = ("val_mae_hu",)

    def __init__(
        self,
        model: ModelConfig,
        vae: TrainedVAE,
        options: LDMOptions,
        loop: LoopOptions,
        device: torch.device,
        val_arrays: Sequence[CaseArrays],
        latent_patch_zyx: tuple[int, int, int],
        training_data: dict[str, Any],
    ) -> None:
        self.model, self.vae, self.options, self.loop, self.device = model, vae, options, loop, device
        self.latent_patch_zyx, self.training_data = latent_patch_zyx, training_data
        self.networks = model.build().to(device)
        self.networks.autoencoder.load_state_dict(vae.state)
        self.networks.autoencoder.requires_grad_(False).eval()
        self.trained = nn.ModuleDict({"mr_encoder": self.networks.mr_encoder, "unet": self.networks.unet})
        self.ema = EMA(self.trained, options.ema_decay) if options.ema_decay > 0 else None
        self.scheduler = model.scheduler.build_training_scheduler()
        self.dtype = amp_dtype(device, loop.amp)
        optimizer = torch.optim.AdamW(self.trained.parameters(), lr=loop.lr, weight_decay=1e-4)
        self._steps = {"diffusion": GradientStep(optimizer, loop, fp16=self.dtype == torch.float16)}
        self.val_arrays = list(val_arrays)

    def gradient_steps(self) -> Mapping[str, GradientStep]:
        return self._steps

    def train_mode(self) -> None:
        self.trained.train()

    def _latent(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if "latent" in batch:
            return batch["latent"].float() * self.vae.scale_factor
        with torch.no_grad(), autocast(self.device, self.dtype):
            return self.networks.encode_ct(batch["ct"]).float() * self.vae.scale_factor

    def train_micro_batch(self, batch: Mapping[str, Any], step: int) -> dict[str, float]:
        latent = self._latent(batch)
        noise = torch.randn_like(latent)
        timesteps = training_timesteps(self.scheduler, latent)
        noisy = self.scheduler.add_noise(latent, noise, timesteps)
        target = diffusion_target(self.scheduler, self.model.scheduler.prediction_type, latent, noise, timesteps)
        with autocast(self.device, self.dtype):
            prediction = self.networks.denoise(noisy, timesteps, self.networks.encode_mr(batch["mr"]))
        loss = torch.nn.functional.mse_loss(prediction.float(), target)
        self._steps["diffusion"].backward(loss)
        return {"loss": float(loss.detach())}

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.trained)

    def checkpoint(self) -> Checkpoint:
        """The sampler checkpoint of the current (EMA) weights."""
        networks = self.model.build()
        networks.autoencoder.load_state_dict(self.vae.state)
        trained = nn.ModuleDict({"mr_encoder": networks.mr_encoder, "unet": networks.unet})
        trained.load_state_dict(self.ema.shadow if self.ema is not None else self.trained.state_dict())
        return Checkpoint.from_networks(
            networks,
            scale_factor=self.vae.scale_factor,
            preprocessing=self.vae.preprocessing,
            latent_patch_shape=self.latent_patch_zyx,
            model_name=self.options.name,
            model_version=self.options.version,
            intended_use=self.options.intended_use,
            training_data=self.training_data,
        )

    def validate(self, step: int) -> dict[str, float]:
        if not self.val_arrays:
            return {}
        sampler = SCTSampler(self.checkpoint(), device=self.device, options=InferenceOptions())
        errors = []
        for case in self.val_arrays:
            mean_hu, _, _ = sampler.sample_hu(
                case.mr[0], steps=self.options.val_sampling_steps, seeds=(self.loop.seed,)
            )
            reference_hu = unit_to_hu(case.ct[0], self.vae.preprocessing)
            errors.append(float(np.abs(mean_hu - reference_hu)[case.mask[0].astype(bool)].mean()))
        return {"val_mae_hu": float(np.mean(errors))}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"trained": self.trained.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.trained.load_state_dict(state["trained"])
        if self.ema is not None:
            if "ema" not in state:
                raise TrainingError("the saved run has no EMA weights: resume with --ema-decay 0")
            self.ema.load_state_dict(state["ema"])


def _use_cache(options: LDMOptions, first: CaseArrays, n_cases: int, latent_channels: int, factor: int) -> bool:
    if options.latent_cache != "auto":
        return options.latent_cache == "on"
    voxels = first.mr.size
    estimated_bytes = n_cases * voxels * 4 * (1 + latent_channels / factor**3) * 1.5  # size varies per case
    return estimated_bytes <= options.cache_max_bytes


@torch.no_grad()
def encode_training_volumes(
    cases: Sequence[Any], vae: TrainedVAE, model: ModelConfig, device: torch.device, patch_zyx: Sequence[int]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(MR, unscaled latent mean, mask) of every training case: whole volumes on the model grid."""
    autoencoder = model.autoencoder.build().to(device)
    autoencoder.load_state_dict(vae.state)
    autoencoder.eval()
    volumes = []
    for case in tqdm(cases, desc="encode CT", unit="case", dynamic_ncols=True):
        arrays = model_arrays(case, vae.preprocessing, model.size_multiple, minimum_zyx=patch_zyx)
        ct = torch.from_numpy(arrays.ct)[None].to(device)
        latent = encode_volume(autoencoder, ct, patch_zyx)[0].float().cpu().numpy()
        volumes.append((arrays.mr, latent, arrays.mask))
    return volumes


def train_ldm(
    data: DataOptions, vae_path: Path, run_dir: Path, loop: LoopOptions, options: LDMOptions
) -> tuple[Path, str]:
    """Train the latent diffusion model; returns the sampler checkpoint's path and SHA-256."""
    from training.data import write_split
    from training.transforms import make_dataset

    run_dir = Path(run_dir)
    vae = load_vae(vae_path)
    resume_state = prepare_run_dir(run_dir, TASK_NAME, loop.resume)
    base = preset(options.preset, scheduler=options.scheduler_config())
    model = ModelConfig(autoencoder=vae.config, mr_encoder=base.mr_encoder, unet=base.unet, scheduler=base.scheduler)
    if resume_state is not None:
        saved = ModelConfig.from_dict(resume_state["model_config"])
        if saved != model:
            log.warning("--resume: keeping the run's model and scheduler settings")
        model = saved
    if any(n % model.size_multiple for n in loop.patch_zyx):
        raise TrainingError(f"--patch {loop.patch_zyx}: each size must be a multiple of {model.size_multiple}")
    latent_patch: tuple[int, int, int] = tuple(n // model.latent_factor for n in loop.patch_zyx)  # type: ignore[assignment]
    device = training_device(loop.device)
    seed_everything(loop.seed)
    split = load_split(data)
    write_split({"train": split.train, "val": split.val, "test": split.test}, run_dir / "split.json")
    val_arrays = [
        model_arrays(case, vae.preprocessing, model.size_multiple)
        for case in spread_over_regions(split.val, options.val_cases)
    ]
    first = model_arrays(split.train[0], vae.preprocessing, model.size_multiple, loop.patch_zyx)
    dataset: Dataset[Any]
    if _use_cache(options, first, len(split.train), model.autoencoder.latent_channels, model.latent_factor):
        log.info("encoding %d training volume(s) with the frozen autoencoder", len(split.train))
        volumes = encode_training_volumes(split.train, vae, model, device, loop.patch_zyx)
        dataset = LatentPatches(
            volumes,
            latent_patch,
            model.latent_factor,
            samples_per_case=options.samples_per_case,
            seed=loop.seed,
            mr_range=vae.preprocessing.mr_output_range if options.augment_mr else None,
        )
    else:
        dataset = make_dataset(
            split.train,
            preprocessing=vae.preprocessing,
            patch_size_zyx=loop.patch_zyx,
            train=True,
            samples_per_case=options.samples_per_case,
            cache=True,
            seed=loop.seed,
            size_multiple=model.size_multiple,
        )
    training_data = {
        "data_root": str(data.root),
        "layout": "SynthRAD Task1",
        **split.describe(),
        "split_seed": data.split_seed,
        "vae": {"path": str(vae.path), **vae.description},
        "ldm_steps": loop.steps,
        "batch_size": loop.batch_size * loop.accumulate,
        "patch_zyx": list(loop.patch_zyx),
        "seed": loop.seed,
        "scheduler": model.scheduler.kind,
        "prediction_type": model.scheduler.prediction_type,
        **({"note": options.data_note} if options.data_note else {}),
    }
    task = LDMTask(model, vae, options, loop, device, val_arrays, latent_patch, training_data)
    extra = {
        "model_config": model.to_dict(),
        "vae_path": str(vae.path),
        "ldm_options": dataclasses.asdict(options),
        "training_data": training_data,
    }
    result = run_training(task, dataset, loop, run_dir, device, resume_state=resume_state, extra_state=extra)
    path = run_dir / "checkpoint.pt"
    checkpoint = task.checkpoint()
    if len(split.train) >= MIN_REFERENCE_CASES:  # the statistics the node's QA checks compare with
        log.info("QA reference: MR features and tissue composition of the %d training cases", len(split.train))
        reference = compute_reference(
            checkpoint,
            split.train,
            description=f"the {len(split.train)} training cases of {data.root}",
            device=str(device),
            steps=options.qa_reference_steps,
        )
        checkpoint = dataclasses.replace(checkpoint, qa_reference=reference)
    else:
        log.warning(
            "only %d training case(s): too few for the QA reference (at least %d); the node's in_distribution "
            "and hu_plausibility checks will fail this checkpoint's sCTs",
            len(split.train),
            MIN_REFERENCE_CASES,
        )
    sha256 = save_checkpoint(checkpoint, path)
    write_json(
        run_dir / "ldm_summary.json",
        {
            "step": result.step,
            "elapsed_s": round(result.elapsed_s, 1),
            "checkpoint": str(path),
            "checkpoint_sha256": sha256,
            "last_validation": result.last_validation,
        },
    )
    log.info("latent diffusion model done at step %d: %s (sha256 %s)", result.step, path, sha256)
    return path, sha256
