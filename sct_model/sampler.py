"""The diffusion sCT predictor: MR volume in, HU volume (and per-voxel uncertainty) out.

``SCTSampler.from_checkpoint(path, device)`` loads the networks once; ``predict`` then runs

1. preprocessing: the MR onto the model's axial grid, normalised (``preprocessing.prepare_mr``), and
   the body mask and field of view on the output grid;
2. the MR's features for the node's in-distribution check (``features.mr_features``: a pass of the
   small MR encoder over the whole volume, as in training);
3. the MR encoding on the latent grid, once;
4. per sample: Gaussian noise from a CPU ``torch.Generator`` seeded with ``seed + i`` (the same noise on
   every device), then DDIM (``DDIMScheduler``, for a DDPM-trained model) or rectified flow
   (``RFlowScheduler``) for ``steps`` steps;
5. decoding with the autoencoder, HU mapping, and the mean and standard deviation over the samples;
6. post-processing onto the output grid (HU clipped, air outside the body).

Latent grids up to ``InferenceOptions.max_whole_latent_voxels`` are denoised whole. Larger ones use
a sliding window on the latent grid at every step (MONAI ``sliding_window_inference``, Gaussian
blending, ``window_overlap``): the noise and the scheduler step are global, only the network
evaluation is windowed, so there are no seams between windows. The MR encoder and the decoder then
run windowed as well, their Gaussian weights computed at their own output resolution.

On CUDA the networks run under autocast (bf16 where supported, else fp16) and cuDNN is set to
deterministic algorithms; the scheduler arithmetic stays in float32. The same checkpoint, MR, seed
and device give the same sCT.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference
from monai.networks.schedulers import DDIMScheduler

from sct_model import __version__
from sct_model.checkpoint import Checkpoint, load_checkpoint
from sct_model.features import mr_features
from sct_model.preprocessing import finish_hu, finish_std, output_masks, prepare_mr, unit_to_hu
from sct_model.result import PredictorInfo, SCTResult
from sct_model.volume import Grid, Volume, axial_grid_covering

log = logging.getLogger(__name__)

Shape3 = tuple[int, int, int]
_MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How to run a checkpoint on a device (not a property of the model, so not in the checkpoint)."""

    max_whole_latent_voxels: int = 48**3  # larger latent grids use the sliding window (0: always)
    window_latent_shape: Shape3 | None = None  # (z, y, x) on the latent grid; None: the training patch
    window_overlap: float = 0.5
    window_batch_size: int = 1
    mixed_precision: bool = True  # autocast on CUDA; CPU always runs in float32
    ddim_eta: float = 0.0  # 0: deterministic DDIM given the initial noise

    def __post_init__(self) -> None:
        if not 0.0 <= self.window_overlap < 1.0:
            raise ValueError("window_overlap must be in [0, 1)")
        if self.window_batch_size < 1 or self.max_whole_latent_voxels < 0 or self.ddim_eta < 0:
            raise ValueError("window_batch_size >= 1, max_whole_latent_voxels >= 0 and ddim_eta >= 0 are required")


def _shape3(values: Iterable[int]) -> Shape3:
    x, y, z = (int(v) for v in values)
    return (x, y, z)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _make_deterministic(device: torch.device) -> None:
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def ddim_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """``steps`` evenly strided timesteps ending one stride above 0 ("trailing" spacing): the first is
    ``T - 1`` (pure noise), each next one is exactly where MONAI's ``DDIMScheduler.step`` lands
    (``t - T // steps``). The sampler returns the x0 prediction of the last step."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    stride = num_train_timesteps // steps
    return torch.arange(num_train_timesteps - 1, -1, -stride, dtype=torch.long)[:steps]


class SCTSampler:
    """The 3D latent diffusion sCT method (an :class:`~sct_model.result.SCTPredictor`)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        device: str | torch.device = "cpu",
        options: InferenceOptions | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.device = resolve_device(device)
        self.options = options or InferenceOptions()
        _make_deterministic(self.device)
        self.networks = checkpoint.build_networks(device=self.device, use_flash_attention=self.device.type == "cuda")
        self._amp = self.device.type == "cuda" and self.options.mixed_precision
        self._amp_dtype = torch.bfloat16 if self._amp and torch.cuda.is_bf16_supported() else torch.float16
        model = checkpoint.model
        self.latent_factor = model.latent_factor
        self.size_multiple = model.size_multiple
        window = self.options.window_latent_shape or checkpoint.latent_patch_shape
        if any(int(n) < 1 or int(n) % model.unet.downsample_factor for n in window):
            raise ValueError(f"window_latent_shape {window} must be multiples of {model.unet.downsample_factor}")
        self.window_latent_shape = _shape3(window)
        self.info = PredictorInfo(
            method="diffusion",
            model_name=checkpoint.model_name,
            model_version=f"{checkpoint.model_version} (sct_model {__version__})",
            checkpoint_sha256=checkpoint.file_sha256,
            sampler=model.scheduler.sampler_name,
            device=str(self.device),
        )
        log.info(
            "sCT sampler ready: %s %s on %s (%s, sha256 %s)",
            checkpoint.model_name,
            checkpoint.model_version,
            self.device,
            self.info.sampler,
            checkpoint.file_sha256[:12] or "-",
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "auto", options: InferenceOptions | None = None
    ) -> SCTSampler:
        return cls(load_checkpoint(path), device=device, options=options)

    # -- the predictor interface -------------------------------------------------------------------

    def predict(
        self, mr: Volume, *, steps: int, samples: int = 1, seed: int = 0, output_grid: Grid | None = None
    ) -> SCTResult:
        """The sCT of ``mr`` on ``output_grid`` (None: the axial grid covering the MR)."""
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if not 0 <= seed <= _MAX_SEED - samples:
            raise ValueError(f"seed must be in [0, 2**63 - 1 - samples], got {seed}")
        max_steps = self.checkpoint.model.scheduler.num_train_timesteps
        if not 1 <= steps <= max_steps:
            raise ValueError(f"steps must be in [1, {max_steps}], got {steps}")
        config = self.checkpoint.preprocessing
        timings: dict[str, float] = {}
        started = time.perf_counter()
        grid = output_grid if output_grid is not None else axial_grid_covering(mr.grid)
        model_input = prepare_mr(mr, config, self.size_multiple)
        masks = output_masks(mr, grid, config)
        timings["preprocess"] = time.perf_counter() - started
        started = time.perf_counter()
        features = mr_features(self.networks.mr_encoder, model_input, config.mr_output_range, self.device)
        timings["features"] = self._elapsed(started)

        seeds = tuple(seed + i for i in range(samples))
        mean_hu, std_hu, sample_timings = self.sample_hu(model_input.mr_unit.array, steps=steps, seeds=seeds)
        timings.update(sample_timings)

        started = time.perf_counter()
        model_grid = model_input.mr_unit.grid
        hu = finish_hu(Volume(mean_hu, model_grid), masks)
        std = finish_std(Volume(std_hu, model_grid), masks) if std_hu is not None else None
        timings["postprocess"] = time.perf_counter() - started
        timings["total"] = sum(timings.values())
        log.info(
            "sCT done: %d sample(s) x %d %s steps in %.1f s",
            samples,
            steps,
            self.info.sampler,
            timings["total"],
        )
        return SCTResult(
            hu=hu,
            std_hu=std,
            body_mask=masks.body,
            timings_s=timings,
            info=self.info,
            seeds=seeds,
            mr_features=tuple(float(v) for v in features),
            reference=self.checkpoint.qa_reference,
        )

    # -- the model grid ----------------------------------------------------------------------------

    @torch.inference_mode()
    def sample_hu(
        self, mr_unit: np.ndarray, *, steps: int, seeds: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
        """Mean HU, sample standard deviation (ddof 1; None for one sample) and timings, on the model grid.

        ``mr_unit`` is the normalised MR, shape (z, y, x), each a multiple of ``size_multiple``.
        """
        shape = np.asarray(mr_unit.shape)
        if mr_unit.ndim != 3 or np.any(shape % self.size_multiple):
            raise ValueError(f"MR shape {mr_unit.shape} must be 3D with sizes multiple of {self.size_multiple}")
        timings = {"condition": 0.0, "sampling": 0.0, "decode": 0.0}
        started = time.perf_counter()
        mr_tensor = torch.from_numpy(np.ascontiguousarray(mr_unit, dtype=np.float32))[None, None].to(self.device)
        latent_shape = _shape3(int(n) // self.latent_factor for n in mr_unit.shape)
        windowed = int(np.prod(latent_shape)) > self.options.max_whole_latent_voxels
        window = _shape3(min(w, n) for w, n in zip(self.window_latent_shape, latent_shape, strict=True))
        encoding = self._encode_mr(mr_tensor, window if windowed else None)
        timings["condition"] = self._elapsed(started)
        log.debug("latent grid %s, %s", latent_shape, f"window {window}" if windowed else "whole volume")

        count, mean, m2 = 0, np.zeros(mr_unit.shape, np.float64), np.zeros(mr_unit.shape, np.float64)
        for seed in seeds:
            started = time.perf_counter()
            latent = self.sample_latent(encoding, seed=seed, steps=steps, window=window if windowed else None)
            timings["sampling"] += self._elapsed(started)
            started = time.perf_counter()
            ct_unit = self._decode(latent, window if windowed else None)
            hu = unit_to_hu(ct_unit[0, 0].float().cpu().numpy(), self.checkpoint.preprocessing).astype(np.float64)
            count += 1  # Welford's running mean and sum of squared deviations
            delta = hu - mean
            mean += delta / count
            m2 += delta * (hu - mean)
            timings["decode"] += time.perf_counter() - started
        std = np.sqrt(m2 / (count - 1)).astype(np.float32) if count > 1 else None
        return mean.astype(np.float32), std, timings

    @torch.inference_mode()
    def sample_latent(
        self, encoding: torch.Tensor, *, seed: int, steps: int, window: Shape3 | None = None
    ) -> torch.Tensor:
        """One denoised (scaled) latent for the MR ``encoding`` (1, C, z, y, x) from the noise of ``seed``."""
        scheduler_config = self.checkpoint.model.scheduler
        channels = self.checkpoint.model.autoencoder.latent_channels
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn((1, channels, *encoding.shape[2:]), generator=generator, dtype=torch.float32)
        latent = noise.to(self.device)
        scheduler = scheduler_config.build_sampling_scheduler()
        if isinstance(scheduler, DDIMScheduler):
            timesteps = ddim_timesteps(scheduler_config.num_train_timesteps, steps)
            scheduler.set_timesteps(steps)
            scheduler.timesteps = timesteps
            eta = self.options.ddim_eta
            step_generator = torch.Generator(device=self.device).manual_seed(int(seed)) if eta > 0 else None
            predicted_x0 = latent
            for t in timesteps:
                output = self._denoise(latent, t, encoding, window)
                latent, predicted_x0 = scheduler.step(output, int(t), latent, eta, step_generator)
            return predicted_x0
        scheduler.set_timesteps(steps, input_img_size_numel=int(np.prod(encoding.shape[2:])))
        timesteps = scheduler.timesteps.to("cpu")
        next_timesteps = torch.cat([timesteps[1:], torch.zeros(1, dtype=timesteps.dtype)])
        for t, t_next in zip(timesteps, next_timesteps, strict=True):
            velocity = self._denoise(latent, t, encoding, window)
            latent, _ = scheduler.step(velocity, t, latent, t_next)
        return latent

    # -- network evaluations (whole or windowed) ----------------------------------------------------

    def _elapsed(self, started: float) -> float:
        """Seconds since ``started``, after the device has finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _run(self, module: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device.type, dtype=self._amp_dtype, enabled=self._amp):
            return module(*(a.contiguous() for a in args)).float()

    def _encode_mr(self, mr_tensor: torch.Tensor, window: Shape3 | None) -> torch.Tensor:
        encoder = self.networks.mr_encoder
        if window is None:
            return self._run(encoder, mr_tensor)
        image_window = tuple(n * self.latent_factor for n in window)
        return self._sliding(mr_tensor, lambda x: self._run(encoder, x), image_window, window)  # type: ignore[arg-type]

    def _denoise(
        self, latent: torch.Tensor, t: torch.Tensor, encoding: torch.Tensor, window: Shape3 | None
    ) -> torch.Tensor:
        timestep = t.to(device=self.device, dtype=torch.long if not t.is_floating_point() else torch.float32)
        unet = self.networks.unet

        def evaluate(x: torch.Tensor) -> torch.Tensor:
            return self._run(unet, x, timestep.reshape(1).expand(x.shape[0]))

        inputs = torch.cat([latent, encoding], dim=1)
        return evaluate(inputs) if window is None else self._sliding(inputs, evaluate, window, window)

    def _decode(self, latent: torch.Tensor, window: Shape3 | None) -> torch.Tensor:
        scale_factor = self.checkpoint.scale_factor
        decoder = self.networks.autoencoder.decode
        if window is None:
            return self._run(decoder, latent / scale_factor)
        image_window = tuple(n * self.latent_factor for n in window)
        return self._sliding(latent / scale_factor, lambda z: self._run(decoder, z), window, image_window)  # type: ignore[arg-type]

    def _sliding(
        self,
        inputs: torch.Tensor,
        function: Callable[[torch.Tensor], torch.Tensor],
        window_in: Shape3,
        window_out: Shape3,
    ) -> torch.Tensor:
        """``function`` over windows of ``inputs`` with Gaussian blending at the output's own resolution."""
        weight = compute_importance_map(
            window_out, mode="gaussian", sigma_scale=0.125, device=self.device, dtype=torch.float32
        )[None, None]

        def output_weight(outputs: object, _window: torch.Tensor, _weight: torch.Tensor) -> tuple[object, torch.Tensor]:
            return outputs, weight

        return sliding_window_inference(  # type: ignore[return-value]
            inputs,
            roi_size=window_in,
            sw_batch_size=self.options.window_batch_size,
            predictor=function,
            overlap=self.options.window_overlap,
            mode="gaussian",
            sw_device=self.device,
            device=self.device,
            process_fn=output_weight,
        )
