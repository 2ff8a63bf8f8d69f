"""A supervised baseline: a 3D UNet (MONAI ``UNet``) regressing the CT from the MR, L1 loss.

It is trained with the same data code, normalisation and loop as the diffusion model, on MR/CT
patches in the model's unit ranges, and saved in its own small file format (plain types and
tensors, loaded with ``weights_only=True``). :class:`UNetBaselinePredictor` implements the
:class:`~sct_model.result.SCTPredictor` protocol with the sampler's pre- and post-processing, so
that the evaluation treats every method alike. Inference is a Gaussian-blended sliding window of
the training patch size.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from torch import nn

from sct_model import __version__
from sct_model.preprocessing import PreprocessingConfig, finish_hu, output_masks, prepare_mr, unit_to_hu
from sct_model.result import PredictorInfo, SCTResult
from sct_model.sampler import resolve_device
from sct_model.volume import Grid, Volume, axial_grid_covering
from training.loop import (
    DataOptions,
    GradientStep,
    LoopOptions,
    TrainingError,
    TrainingTask,
    amp_dtype,
    autocast,
    load_split,
    pad_to_multiple,
    prepare_run_dir,
    run_training,
    save_state,
    seed_everything,
    spread_over_regions,
    training_device,
    write_json,
)
from training.train_vae import CaseArrays, model_arrays

log = logging.getLogger(__name__)

TASK_NAME = "unet"
FORMAT = "sct-node/unet-baseline"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError("the UNet needs one stride fewer than channels")

    @property
    def size_multiple(self) -> int:
        return int(np.prod(self.strides))

    def build(self) -> nn.Module:
        return UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=self.channels,
            strides=self.strides,
            num_res_units=self.num_res_units,
            norm="INSTANCE",
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> UNetConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class UNetBaselineOptions:
    spacing_mm: float = 1.0
    config: UNetConfig = UNetConfig()
    samples_per_case: int = 4
    val_cases: int = 4
    name: str = "unet-baseline"
    intended_use: str = "baseline for evaluation, not for clinical use"


@torch.no_grad()
def predict_unit(
    network: nn.Module,
    mr_unit: np.ndarray,
    window_zyx: Sequence[int],
    *,
    background: float,
    multiple: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> np.ndarray:
    """The network's CT (unit range) for a normalised MR (z, y, x).

    Always a sliding window of the training patch size (overlap 0.5, Gaussian blending): the instance
    normalisation then sees the statistics of a training patch. The MR is padded with ``background``
    to at least one window and to a multiple of ``multiple``, and the result cropped back.
    """
    padded, crop = pad_to_multiple(mr_unit, multiple, background, minimum_zyx=window_zyx)
    inputs = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))[None, None].to(device)
    with autocast(device, dtype):
        output: torch.Tensor = sliding_window_inference(  # type: ignore[assignment]
            inputs, list(window_zyx), 4, network, overlap=0.5, mode="gaussian"
        )
    return output[0, 0].float().cpu().numpy()[crop]


class UNetTask(TrainingTask):
    name = TASK_NAME
    train_columns = ("loss",)
    val_columns = ("val_mae_hu",)

    def __init__(
        self,
        options: UNetBaselineOptions,
        preprocessing: PreprocessingConfig,
        loop: LoopOptions,
        device: torch.device,
        val_arrays: Sequence[CaseArrays],
    ) -> None:
        self.options, self.preprocessing, self.loop, self.device = options, preprocessing, loop, device
        self.network = options.config.build().to(device)
        self.dtype = amp_dtype(device, loop.amp)
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=loop.lr, weight_decay=1e-4)
        self._steps = {"unet": GradientStep(optimizer, loop, fp16=self.dtype == torch.float16)}
        self.val_arrays = list(val_arrays)

    def gradient_steps(self) -> Mapping[str, GradientStep]:
        return self._steps

    def train_mode(self) -> None:
        self.network.train()

    def train_micro_batch(self, batch: Mapping[str, Any], step: int) -> dict[str, float]:
        with autocast(self.device, self.dtype):
            prediction = self.network(batch["mr"])
        loss = torch.nn.functional.l1_loss(prediction.float(), batch["ct"].float())
        self._steps["unet"].backward(loss)
        return {"loss": float(loss.detach())}

    def validate(self, step: int) -> dict[str, float]:
        if not self.val_arrays:
            return {}
        self.network.eval()
        errors = []
        for case in self.val_arrays:
            unit = predict_unit(
                self.network,
                case.mr[0],
                self.loop.patch_zyx,
                background=self.preprocessing.mr_output_range[0],
                multiple=self.options.config.size_multiple,
                device=self.device,
                dtype=self.dtype,
            )
            difference = unit_to_hu(unit, self.preprocessing) - unit_to_hu(case.ct[0], self.preprocessing)
            errors.append(float(np.abs(difference)[case.mask[0].astype(bool)].mean()))
        return {"val_mae_hu": float(np.mean(errors))}

    def state_dict(self) -> dict[str, Any]:
        return {"unet": self.network.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.network.load_state_dict(state["unet"])


def train_unet_baseline(
    data: DataOptions, run_dir: Path, loop: LoopOptions, options: UNetBaselineOptions
) -> tuple[Path, str]:
    """Train the UNet baseline; returns the path and SHA-256 of ``RUN_DIR/unet_baseline.pt``."""
    from training.data import write_split
    from training.transforms import make_dataset

    run_dir = Path(run_dir)
    resume_state = prepare_run_dir(run_dir, TASK_NAME, loop.resume)
    if resume_state is not None:
        options = dataclasses.replace(
            options,
            spacing_mm=float(resume_state["spacing_mm"]),
            config=UNetConfig.from_dict(resume_state["unet_config"]),
        )
    preprocessing = PreprocessingConfig(spacing_mm=(options.spacing_mm,) * 3)
    if any(n % options.config.size_multiple for n in loop.patch_zyx):
        raise TrainingError(f"--patch {loop.patch_zyx}: each size must be a multiple of {options.config.size_multiple}")
    device = training_device(loop.device)
    seed_everything(loop.seed)
    split = load_split(data)
    write_split({"train": split.train, "val": split.val, "test": split.test}, run_dir / "split.json")
    val_arrays = [
        model_arrays(case, preprocessing, options.config.size_multiple)
        for case in spread_over_regions(split.val, options.val_cases)
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
    task = UNetTask(options, preprocessing, loop, device, val_arrays)
    extra = {"spacing_mm": options.spacing_mm, "unet_config": dataclasses.asdict(options.config)}
    result = run_training(task, dataset, loop, run_dir, device, resume_state=resume_state, extra_state=extra)
    training_data = {
        "data_root": str(data.root),
        **split.describe(),
        "split_seed": data.split_seed,
        "steps": result.step,
        "batch_size": loop.batch_size * loop.accumulate,
        "patch_zyx": list(loop.patch_zyx),
        "seed": loop.seed,
    }
    path = run_dir / "unet_baseline.pt"
    sha256 = save_unet_baseline(path, task.network, options, preprocessing, loop.patch_zyx, training_data)
    write_json(
        run_dir / "unet_summary.json",
        {
            "step": result.step,
            "elapsed_s": round(result.elapsed_s, 1),
            "checkpoint_sha256": sha256,
            "last_validation": result.last_validation,
        },
    )
    return path, sha256


def save_unet_baseline(
    path: Path,
    network: nn.Module,
    options: UNetBaselineOptions,
    preprocessing: PreprocessingConfig,
    patch_zyx: Sequence[int],
    training_data: dict[str, Any],
) -> str:
    """Write the baseline's file (atomically); returns its SHA-256."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": {
            "model_name": options.name,
            "intended_use": options.intended_use,
            "code_version": __version__,
            "created_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "unet": dataclasses.asdict(options.config),
            "preprocessing": preprocessing.to_dict(),
            "patch_zyx": [int(n) for n in patch_zyx],
            "training_data": training_data,
        },
        "state": {k: v.detach().cpu().contiguous().clone() for k, v in network.state_dict().items()},
    }
    save_state(path, payload)
    return hashlib.sha256(path.read_bytes()).hexdigest()


class UNetBaselinePredictor:
    """The UNet baseline as an :class:`~sct_model.result.SCTPredictor` (deterministic: one sample)."""

    def __init__(
        self, payload: Mapping[str, Any], *, device: str | torch.device = "cpu", file_sha256: str = ""
    ) -> None:
        metadata = payload["metadata"]
        self.config = UNetConfig.from_dict(metadata["unet"])
        self.preprocessing = PreprocessingConfig.from_dict(metadata["preprocessing"])
        self.window_zyx = tuple(int(n) for n in metadata["patch_zyx"])
        self.device = resolve_device(device)
        self.network = self.config.build()
        self.network.load_state_dict(payload["state"])
        self.network.to(self.device).eval()
        self.dtype = amp_dtype(self.device, True)
        self.info = PredictorInfo(
            method="unet_regression",
            model_name=str(metadata["model_name"]),
            model_version=f"{metadata['code_version']} (sct_model {__version__})",
            checkpoint_sha256=file_sha256,
            sampler="none",
            device=str(self.device),
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> UNetBaselinePredictor:
        path = Path(path)
        if not path.is_file():
            raise TrainingError(f"UNet baseline file not found: {path}")
        data = path.read_bytes()
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file trips over
            raise TrainingError(f"{path}: not a readable UNet baseline file: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise TrainingError(f"{path}: not a UNet baseline file (no {FORMAT!r} marker)")
        return cls(payload, device=device, file_sha256=hashlib.sha256(data).hexdigest())

    def predict(
        self, mr: Volume, *, steps: int, samples: int = 1, seed: int = 0, output_grid: Grid | None = None
    ) -> SCTResult:
        """The sCT of ``mr`` on ``output_grid``; ``steps``, ``samples`` and ``seed`` are only recorded."""
        if steps < 1 or samples < 1 or seed < 0:
            raise ValueError(f"need steps >= 1, samples >= 1 and seed >= 0, got {steps}, {samples}, {seed}")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        grid = output_grid if output_grid is not None else axial_grid_covering(mr.grid)
        model_input = prepare_mr(mr, self.preprocessing, self.config.size_multiple)
        masks = output_masks(mr, grid, self.preprocessing)
        timings["preprocess"] = time.perf_counter() - started
        started = time.perf_counter()
        unit = predict_unit(
            self.network,
            model_input.mr_unit.array,
            self.window_zyx,
            background=self.preprocessing.mr_output_range[0],
            multiple=self.config.size_multiple,
            device=self.device,
            dtype=self.dtype,
        )
        hu_model = Volume(unit_to_hu(unit, self.preprocessing), model_input.mr_unit.grid)
        timings["inference"] = time.perf_counter() - started
        started = time.perf_counter()
        hu = finish_hu(hu_model, masks)
        timings["postprocess"] = time.perf_counter() - started
        timings["total"] = math.fsum(timings.values())
        return SCTResult(
            hu=hu,
            std_hu=None,
            body_mask=masks.body,
            timings_s=timings,
            info=self.info,
            seeds=tuple(seed + i for i in range(samples)),
        )
