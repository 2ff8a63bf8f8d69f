"""Stage 1: the KL autoencoder (MONAI ``AutoencoderKL``) trained on CT patches.

Loss: L1 reconstruction + ``kl_weight`` x KL divergence, optionally + ``adversarial_weight`` x a
least-squares patch-adversarial loss (MONAI ``PatchDiscriminator``, from ``adversarial_start_step``).
Perceptual losses are left out: MONAI's need downloaded network weights.

Validation reconstructs whole validation volumes from the latent mean and reports the MAE in HU
inside the body mask. At the end, the latent scale factor (1 / std of the latent means of the
training volumes, as in MONAI's latent diffusion tutorials) is added to ``RUN_DIR/vae_state.pt``,
which the latent diffusion trainer reads (``sct-train ldm --vae RUN_DIR``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from sct_model.networks import AutoencoderConfig, preset
from sct_model.preprocessing import PreprocessingConfig, unit_to_hu
from training.loop import (
    DataOptions,
    DataSplit,
    GradientStep,
    LoopOptions,
    TrainingError,
    TrainingTask,
    amp_dtype,
    autocast,
    load_split,
    load_state,
    pad_to_multiple,
    prepare_run_dir,
    run_training,
    save_state,
    seed_everything,
    spread_over_regions,
    state_path_for,
    training_device,
    write_json,
)

log = logging.getLogger(__name__)

TASK_NAME = "vae"
MAX_WHOLE_VOXELS = 128**3  # larger volumes are encoded and reconstructed with a sliding window


@dataclasses.dataclass(frozen=True)
class VAEOptions:
    preset: str = "tiny"
    latent_channels: int | None = None  # None: the preset's
    spacing_mm: float = 1.0  # the model's isotropic voxel spacing
    kl_weight: float = 1e-6
    adversarial_weight: float = 0.0  # 0: no discriminator
    adversarial_start_step: int = 0  # the adversarial loss joins after this step
    samples_per_case: int = 4  # patches per case per pass over the data
    val_cases: int = 4  # validation volumes reconstructed at each validation
    scale_cases: int = 16  # training volumes whose latents give the scale factor


@dataclasses.dataclass(frozen=True)
class CaseArrays:
    """One case on the model grid, padded to the networks' size multiple: (1, z, y, x) arrays."""

    case_id: str
    region: str
    mr: np.ndarray
    ct: np.ndarray
    mask: np.ndarray


def model_arrays(
    case: Any, preprocessing: PreprocessingConfig, multiple: int, minimum_zyx: Sequence[int] = (1, 1, 1)
) -> CaseArrays:
    """``case`` on the model grid as the sampler sees it (``training.transforms.case_to_model_arrays``,
    sizes a multiple of ``multiple``), padded at the end of each axis with background (MR and CT at the
    low end of their ranges, mask 0) where it is smaller than ``minimum_zyx``."""
    from training.transforms import case_to_model_arrays

    arrays = case_to_model_arrays(case, preprocessing, size_multiple=multiple)
    mr, _ = pad_to_multiple(arrays["mr"], multiple, preprocessing.mr_output_range[0], minimum_zyx)
    ct, _ = pad_to_multiple(arrays["ct"], multiple, preprocessing.ct_output_range[0], minimum_zyx)
    mask, _ = pad_to_multiple(arrays["mask"], multiple, 0, minimum_zyx)
    return CaseArrays(
        case.case_id,
        case.region,
        mr.astype(np.float32),
        ct.astype(np.float32),
        mask.astype(np.uint8),
    )


def mae_hu_in_mask(ct_unit: np.ndarray, reference_unit: np.ndarray, mask: np.ndarray, config: Any) -> float:
    """Mean absolute error in HU inside ``mask`` between two CTs in the model's unit range."""
    inside = np.asarray(mask, dtype=bool)
    difference = unit_to_hu(ct_unit, config) - unit_to_hu(reference_unit, config)
    return float(np.abs(difference[inside]).mean())


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over the latent, averaged over the batch."""
    variance = z_sigma.float().pow(2)
    kl = 0.5 * torch.sum(z_mu.float().pow(2) + variance - torch.log(variance) - 1.0, dim=(1, 2, 3, 4))
    return kl.mean()


@torch.no_grad()
def encode_volume(autoencoder: AutoencoderKL, ct_unit: torch.Tensor, window_zyx: Sequence[int]) -> torch.Tensor:
    """The latent mean of a whole volume (N, 1, z, y, x), sliding-window for large volumes."""
    if ct_unit[0, 0].numel() <= MAX_WHOLE_VOXELS:
        return autoencoder.encode(ct_unit)[0]
    return sliding_window_inference(  # type: ignore[return-value]
        ct_unit, list(window_zyx), 1, lambda x: autoencoder.encode(x)[0], overlap=0.25, mode="gaussian"
    )


@torch.no_grad()
def reconstruct_volume(autoencoder: AutoencoderKL, ct_unit: torch.Tensor, window_zyx: Sequence[int]) -> torch.Tensor:
    """Decode(encode mean) of a whole volume, sliding-window for large volumes."""

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return autoencoder.decode(autoencoder.encode(x)[0])

    if ct_unit[0, 0].numel() <= MAX_WHOLE_VOXELS:
        return reconstruct(ct_unit)
    return sliding_window_inference(  # type: ignore[return-value]
        ct_unit, list(window_zyx), 1, reconstruct, overlap=0.25, mode="gaussian"
    )


def discriminator_layers(patch_zyx: Sequence[int], most: int = 3) -> int:
    """Stride-2 layers of the patch discriminator: up to ``most``, leaving at least 4 voxels per axis."""
    smallest = min(patch_zyx)
    layers = most
    while layers > 1 and smallest // 2**layers < 4:
        layers -= 1
    return layers


class VAETask(TrainingTask):
    name = TASK_NAME
    val_columns = ("val_mae_hu",)

    def __init__(
        self,
        config: AutoencoderConfig,
        preprocessing: PreprocessingConfig,
        options: VAEOptions,
        loop: LoopOptions,
        device: torch.device,
        val_arrays: Sequence[CaseArrays],
    ) -> None:
        self.options, self.loop, self.device, self.preprocessing = options, loop, device, preprocessing
        self.autoencoder = config.build().to(device)
        self.dtype = amp_dtype(device, loop.amp)
        fp16 = self.dtype == torch.float16
        self._steps = {
            "autoencoder": GradientStep(torch.optim.Adam(self.autoencoder.parameters(), lr=loop.lr), loop, fp16=fp16)
        }
        self.discriminator: PatchDiscriminator | None = None
        if options.adversarial_weight > 0:
            self.discriminator = PatchDiscriminator(
                spatial_dims=3,
                num_layers_d=discriminator_layers(loop.patch_zyx),
                channels=config.channels[0],
                in_channels=1,
                out_channels=1,
                norm="INSTANCE",
            ).to(device)
            self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")
            self._steps["discriminator"] = GradientStep(
                torch.optim.Adam(self.discriminator.parameters(), lr=loop.lr), loop, fp16=fp16
            )
        self.train_columns = ("loss", "l1", "kl") + (
            ("adversarial_g", "adversarial_d") if self.discriminator is not None else ()
        )
        self.val_arrays = list(val_arrays)

    def gradient_steps(self) -> Mapping[str, GradientStep]:
        return self._steps

    def train_mode(self) -> None:
        self.autoencoder.train()
        if self.discriminator is not None:
            self.discriminator.train()

    def train_micro_batch(self, batch: Mapping[str, Any], step: int) -> dict[str, float]:
        ct = batch["ct"]
        adversarial = self.discriminator is not None and step > self.options.adversarial_start_step
        with autocast(self.device, self.dtype):
            reconstruction, z_mu, z_sigma = self.autoencoder(ct)
            l1 = torch.nn.functional.l1_loss(reconstruction.float(), ct.float())
            kl = kl_divergence(z_mu, z_sigma)
            loss = l1 + self.options.kl_weight * kl
            values = {"l1": float(l1.detach()), "kl": float(kl.detach())}
            if self.discriminator is not None:
                values.update(adversarial_g=float("nan"), adversarial_d=float("nan"))
            if adversarial:
                assert self.discriminator is not None
                self.discriminator.requires_grad_(False)
                logits_fake = self.discriminator(reconstruction.contiguous())[-1]
                generator_loss = self.adversarial_loss(logits_fake, target_is_real=True, for_discriminator=False)
                self.discriminator.requires_grad_(True)
                loss = loss + self.options.adversarial_weight * generator_loss
                values["adversarial_g"] = float(generator_loss.detach())
        self._steps["autoencoder"].backward(loss)
        values["loss"] = float(loss.detach())
        if adversarial:
            assert self.discriminator is not None
            with autocast(self.device, self.dtype):
                fake = self.discriminator(reconstruction.detach().contiguous())[-1]
                real = self.discriminator(ct.contiguous())[-1]
                discriminator_loss = 0.5 * (
                    self.adversarial_loss(fake, target_is_real=False, for_discriminator=True)
                    + self.adversarial_loss(real, target_is_real=True, for_discriminator=True)
                )
            self._steps["discriminator"].backward(self.options.adversarial_weight * discriminator_loss)
            values["adversarial_d"] = float(discriminator_loss.detach())
        return values

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        if not self.val_arrays:
            return {}
        self.autoencoder.eval()
        errors = []
        for case in self.val_arrays:
            ct = torch.from_numpy(case.ct)[None].to(self.device)
            with autocast(self.device, self.dtype):
                reconstruction = reconstruct_volume(self.autoencoder, ct, self.loop.patch_zyx)
            errors.append(
                mae_hu_in_mask(reconstruction[0].float().cpu().numpy(), case.ct, case.mask, self.preprocessing)
            )
        return {"val_mae_hu": float(np.mean(errors))}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"autoencoder": self.autoencoder.state_dict()}
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.autoencoder.load_state_dict(state["autoencoder"])
        if self.discriminator is not None:
            if "discriminator" not in state:
                raise TrainingError("the saved VAE run has no discriminator: resume without --adversarial-weight")
            self.discriminator.load_state_dict(state["discriminator"])


@torch.no_grad()
def latent_std(
    autoencoder: AutoencoderKL, volumes: Sequence[CaseArrays], device: torch.device, window_zyx: Sequence[int]
) -> float:
    """The standard deviation of the latent means of ``volumes`` (over every latent voxel and channel)."""
    autoencoder.eval()
    count, total, total_sq = 0, 0.0, 0.0
    for case in volumes:
        z_mu = encode_volume(autoencoder, torch.from_numpy(case.ct)[None].to(device), window_zyx).double()
        count += z_mu.numel()
        total += float(z_mu.sum())
        total_sq += float(z_mu.pow(2).sum())
    mean = total / count
    return float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))


@dataclasses.dataclass(frozen=True)
class VAEResult:
    state_path: Path
    step: int
    scale_factor: float
    last_validation: dict[str, float]


def train_vae(data: DataOptions, run_dir: Path, loop: LoopOptions, options: VAEOptions) -> VAEResult:
    """Train (or, with ``loop.resume``, go on training) the autoencoder; see the module docstring."""
    from training.data import write_split
    from training.transforms import make_dataset

    run_dir = Path(run_dir)
    resume_state = prepare_run_dir(run_dir, TASK_NAME, loop.resume)
    if resume_state is not None:
        preprocessing = PreprocessingConfig.from_dict(resume_state["preprocessing"])
        config = AutoencoderConfig.from_dict(resume_state["autoencoder_config"])
        saved = VAEOptions(**resume_state["vae_options"])
        resumed = dataclasses.replace(saved, val_cases=options.val_cases, scale_cases=options.scale_cases)
        if dataclasses.replace(options, latent_channels=saved.latent_channels) != resumed:
            log.warning("--resume: keeping the run's own VAE settings %s", dataclasses.asdict(saved))
        options = resumed
    else:
        preprocessing = PreprocessingConfig(spacing_mm=(options.spacing_mm,) * 3)
        config = preset(options.preset).autoencoder
        if options.latent_channels is not None:
            config = dataclasses.replace(config, latent_channels=options.latent_channels)
    multiple = config.downsample_factor
    if any(n % multiple for n in loop.patch_zyx):
        raise TrainingError(f"--patch {loop.patch_zyx}: each size must be a multiple of {multiple}")
    device = training_device(loop.device)
    seed_everything(loop.seed)
    split: DataSplit = load_split(data)
    write_split({"train": split.train, "val": split.val, "test": split.test}, run_dir / "split.json")
    log.info("loading %d validation case(s) on the model grid", min(options.val_cases, len(split.val)))
    val_arrays = [
        model_arrays(case, preprocessing, multiple) for case in spread_over_regions(split.val, options.val_cases)
    ]
    dataset = make_dataset(
        split.train,
        preprocessing=preprocessing,
        patch_size_zyx=loop.patch_zyx,
        train=True,
        samples_per_case=options.samples_per_case,
        cache=True,
        seed=loop.seed,
    )
    task = VAETask(config, preprocessing, options, loop, device, val_arrays)
    description = {"data_root": str(data.root), **split.describe()}
    extra = {
        "preset": options.preset,
        "preprocessing": preprocessing.to_dict(),
        "autoencoder_config": config.to_dict(),
        "vae_options": dataclasses.asdict(options),
        "data": description,
        "scale_factor": None,
    }
    result = run_training(task, dataset, loop, run_dir, device, resume_state=resume_state, extra_state=extra)

    log.info(
        "computing the latent scale factor on %d training volume(s)",
        min(options.scale_cases, len(split.train)),
    )
    scale_volumes = [
        model_arrays(case, preprocessing, multiple) for case in spread_over_regions(split.train, options.scale_cases)
    ]
    std = latent_std(task.autoencoder, scale_volumes, device, loop.patch_zyx)
    if not std > 0:
        raise TrainingError("the latents have zero spread: the autoencoder collapsed")
    scale_factor = 1.0 / std
    state = load_state(result.state_path, TASK_NAME)
    state.update(scale_factor=scale_factor, latent_std=std)
    save_state(result.state_path, state)
    write_json(
        run_dir / "vae_summary.json",
        {
            "step": result.step,
            "elapsed_s": round(result.elapsed_s, 1),
            "scale_factor": scale_factor,
            "latent_std": std,
            "last_validation": result.last_validation,
            "preset": options.preset,
            "spacing_mm": list(preprocessing.spacing_mm),
            "train_cases": len(split.train),
        },
    )
    log.info("VAE done at step %d: latent std %.4g, scale factor %.4g", result.step, std, scale_factor)
    return VAEResult(result.state_path, result.step, scale_factor, result.last_validation)


@dataclasses.dataclass(frozen=True)
class TrainedVAE:
    """What the latent diffusion trainer needs from a finished VAE run."""

    config: AutoencoderConfig
    state: dict[str, torch.Tensor]
    preprocessing: PreprocessingConfig
    scale_factor: float
    step: int
    description: dict[str, Any]
    path: Path


def load_vae(path: Path) -> TrainedVAE:
    """A finished VAE run (its directory or its ``vae_state.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = state_path_for(path, TASK_NAME)
    if not path.is_file():
        raise TrainingError(f"no VAE state at {path}")
    state = load_state(path, TASK_NAME)
    if state.get("scale_factor") is None:
        raise TrainingError(f"{path}: the VAE run has not finished (no latent scale factor yet)")
    return TrainedVAE(
        config=AutoencoderConfig.from_dict(state["autoencoder_config"]),
        state=dict(state["task_state"]["autoencoder"]),
        preprocessing=PreprocessingConfig.from_dict(state["preprocessing"]),
        scale_factor=float(state["scale_factor"]),
        step=int(state["step"]),
        description={
            "steps": int(state["step"]),
            "preset": state["preset"],
            "scale_factor": state["scale_factor"],
        },
        path=path,
    )
