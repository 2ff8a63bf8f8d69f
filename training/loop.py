"""The training loop the three trainers share (VAE, latent diffusion, UNet baseline).

A trainer is a :class:`TrainingTask`: its networks, one :class:`GradientStep` per optimiser, a
``train_micro_batch`` (forward and ``backward`` through its gradient steps) and a ``validate``.
:func:`run_training` does the rest:

- seeding (Python, NumPy, torch) and exact resumption: ``RUN_DIR/<task>_state.pt`` holds the
  networks, optimisers, gradient scalers, LR schedules, EMA weights, step and every RNG state; the
  batches come from :class:`StepBatchSampler`, a function of (seed, step), and each item's patch and
  augmentation from (seed, epoch, index) (the data set's ``set_epoch``), so a resumed run trains on
  the batches the uninterrupted run would have had;
- automatic mixed precision on CUDA (bf16 where supported, else fp16 with a ``GradScaler``), float32
  on the CPU; gradient accumulation over ``accumulate`` micro-batches; gradient clipping; a step
  whose gradients are not finite is skipped (and training stops after too many in a row);
- validation every ``val_every`` steps and at the end, the state every ``checkpoint_every`` steps
  and at the end (written atomically);
- a tqdm progress bar, ``RUN_DIR/metrics.csv`` (one row per step, rows after the resumed step
  dropped on ``--resume`` so that no step appears twice) and TensorBoard scalars when installed.
"""

from __future__ import annotations

import abc
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm import tqdm

from sct_model.sampler import resolve_device

log = logging.getLogger(__name__)

STATE_FORMAT = "sct-node/training-state"
STATE_FORMAT_VERSION = 1
LR_SCHEDULES = ("constant", "cosine")
MAX_SKIPPED_STEPS_IN_A_ROW = 20


class TrainingError(RuntimeError):
    """Training cannot start or go on (bad options, a run directory in the way, diverged losses)."""


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """The options every trainer shares (the ``sct-train`` training flags)."""

    steps: int = 1000  # optimiser steps in total (a resumed run goes on to this step)
    batch_size: int = 2
    accumulate: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4
    lr_schedule: str = "cosine"  # constant | cosine (to lr_min_fraction * lr at the last step)
    lr_min_fraction: float = 0.1
    warmup_steps: int = 0
    patch_zyx: tuple[int, int, int] = (32, 32, 32)
    val_every: int = 0  # 0: validate at the end only
    checkpoint_every: int = 500
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA; ignored on the CPU
    max_grad_norm: float | None = 1.0
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.accumulate < 1:
            raise ValueError("steps, batch_size and accumulate must be >= 1")
        if not self.lr > 0 or not 0 <= self.lr_min_fraction <= 1:
            raise ValueError("lr must be > 0 and lr_min_fraction in [0, 1]")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.val_every < 0 or self.checkpoint_every < 0 or self.warmup_steps < 0 or self.num_workers < 0:
            raise ValueError("val_every, checkpoint_every, warmup_steps and num_workers must be >= 0")
        if len(self.patch_zyx) != 3 or any(int(n) < 1 for n in self.patch_zyx):
            raise ValueError(f"patch_zyx must be three positive sizes, got {self.patch_zyx}")
        object.__setattr__(self, "patch_zyx", tuple(int(n) for n in self.patch_zyx))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- seeding and RNG state ----------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as plain types and tensors (loadable with ``weights_only=True``)."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(numpy_state["state"]["key"], dtype=np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- devices and precision ----------------------------------------------------------------------------


def training_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (an error when CUDA is asked for and missing)."""
    try:
        return resolve_device(name)
    except RuntimeError as exc:
        raise TrainingError(str(exc)) from exc


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype on ``device`` (None: float32, as on the CPU)."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_lambda(options: LoopOptions) -> Any:
    """The LR multiplier per step: linear warm-up, then constant or cosine down to ``lr_min_fraction``."""

    def multiplier(step: int) -> float:
        if step < options.warmup_steps:
            return (step + 1) / options.warmup_steps
        if options.lr_schedule == "constant":
            return 1.0
        span = max(1, options.steps - options.warmup_steps)
        progress = min(1.0, (step - options.warmup_steps) / span)
        low = options.lr_min_fraction
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


class GradientStep:
    """One optimiser with its gradient scaler (fp16 only), LR schedule, accumulation and clipping."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        options: LoopOptions,
        *,
        fp16: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.accumulate = options.accumulate
        self.max_grad_norm = options.max_grad_norm
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(options))
        self.skipped_in_a_row = 0
        self.last_grad_norm = float("nan")

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (one micro-batch of ``accumulate``)."""
        self.scaler.scale(loss / self.accumulate).backward()

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def step(self) -> bool:
        """Apply the accumulated gradients; False when there were none or they were not finite."""
        parameters = self._parameters()
        stepped = False
        if parameters:
            self.scaler.unscale_(self.optimizer)
            max_norm = self.max_grad_norm if self.max_grad_norm else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
            self.last_grad_norm = grad_norm
            if math.isfinite(grad_norm) or self.scaler.is_enabled():
                self.scaler.step(self.optimizer)  # the fp16 scaler skips non-finite steps itself
                stepped = math.isfinite(grad_norm)
            self.scaler.update()
            if not math.isfinite(grad_norm):
                self.skipped_in_a_row += 1
                log.warning("non-finite gradients (norm %s): step skipped", grad_norm)
                if self.skipped_in_a_row >= MAX_SKIPPED_STEPS_IN_A_ROW and not self.scaler.is_enabled():
                    raise TrainingError(
                        f"{self.skipped_in_a_row} steps in a row with non-finite gradients: training "
                        "diverged (lower --lr, or check the data)"
                    )
            else:
                self.skipped_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step (no gradients yet) still advances the schedule
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            self.schedule.step()
        return stepped

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])


class EMA:
    """Exponential moving average of a module's floating-point state (``decay`` warmed up as
    ``min(decay, (1 + n) / (10 + n))``); the diffusion model is validated and saved with it."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in module.state_dict().items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.lerp_(value.detach(), 1.0 - decay)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


# -- batches ------------------------------------------------------------------------------------------


class StepBatchSampler(Sampler[list[int]]):
    """Batch ``k`` of an endless stream: positions ``k*B .. k*B+B-1`` in the concatenation of one
    permutation of the data set per epoch, each seeded by (seed, epoch). A resumed run starts at
    ``start_batch`` and gets exactly the batches the uninterrupted run would have had.

    Each item is yielded as ``epoch * length + index`` for :class:`EpochIndexed`, which tells the data
    set the epoch, so that a data set whose randomness is a function of (seed, epoch, index) (a
    ``set_epoch`` method) draws the same patches however many workers load it and wherever a run resumed.
    """

    def __init__(self, length: int, batch_size: int, seed: int, start_batch: int = 0) -> None:
        if length < 1:
            raise TrainingError("the training data set is empty")
        self.length, self.batch_size, self.seed, self.start_batch = length, batch_size, seed, start_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.length)

    def batch(self, index: int) -> list[int]:
        positions = range(index * self.batch_size, (index + 1) * self.batch_size)
        cache: dict[int, np.ndarray] = {}
        out = []
        for position in positions:
            epoch, offset = divmod(position, self.length)
            if epoch not in cache:
                cache[epoch] = self._permutation(epoch)
            out.append(epoch * self.length + int(cache[epoch][offset]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        index = self.start_batch
        while True:
            yield self.batch(index)
            index += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len()
        return 2**62


class EpochIndexed(Dataset[Any]):
    """``dataset`` indexed by ``epoch * len(dataset) + index``: calls ``dataset.set_epoch(epoch)`` (when it
    has one) before ``dataset[index]``."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset
        self.length = len(dataset)  # type: ignore[arg-type]
        self._epoch: int | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: int) -> Any:
        epoch, index = divmod(int(key), self.length)
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None and epoch != self._epoch:
            set_epoch(epoch)
            self._epoch = epoch
        return self.dataset[index]


def batch_stream(
    dataset: Dataset[Any], options: LoopOptions, device: torch.device, start_step: int
) -> Iterator[dict[str, Any]]:
    """Micro-batches for the optimiser steps after ``start_step``, on ``device``."""
    indexed = EpochIndexed(dataset)
    sampler = StepBatchSampler(
        len(indexed), options.batch_size, options.seed, start_batch=start_step * options.accumulate
    )
    loader = DataLoader(
        indexed,
        batch_sampler=sampler,
        num_workers=options.num_workers,
        collate_fn=default_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=options.num_workers > 0,
        generator=torch.Generator().manual_seed(options.seed),  # worker seeds: not from the global RNG
    )
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# -- metrics --------------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.csv`` (one row per step) and TensorBoard scalars (when ``tensorboard`` is installed).

    A fresh run starts a new file; a resumed run keeps the rows up to ``keep_through_step`` and drops the
    later ones (written after the state it resumes from), so that every step appears once.
    """

    def __init__(self, run_dir: Path, columns: Sequence[str], *, keep_through_step: int | None) -> None:
        self.path = run_dir / "metrics.csv"
        self.columns = ["step", *[c for c in columns if c != "step"]]
        rows: list[dict[str, str]] = []
        if keep_through_step is not None and self.path.is_file():
            with open(self.path, newline="") as handle:
                reader = csv.DictReader(handle)
                old_columns = list(reader.fieldnames or [])
                seen: set[int] = set()
                for row in reader:
                    step = int(row["step"])
                    if step <= keep_through_step and step not in seen:
                        seen.add(step)
                        rows.append(row)
            self.columns += [c for c in old_columns if c not in self.columns]
        self._handle = open(self.path, "w", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.DictWriter(self._handle, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        self._writer.writeheader()
        self._writer.writerows(rows)
        self._handle.flush()
        self._tensorboard = _tensorboard_writer(run_dir / "tensorboard")

    def write(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ValueError(f"metrics without a column: {sorted(unknown)}")
        self._writer.writerow({k: _format(v) for k, v in row.items()})
        self._handle.flush()
        if self._tensorboard is not None:
            step = int(row["step"])
            for name, value in row.items():
                if name != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        self._handle.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _tensorboard_writer(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        log.debug("tensorboard is not installed: metrics go to metrics.csv only")
        return None
    return SummaryWriter(log_dir=str(directory))


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv``."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# -- training state files ---------------------------------------------------------------------------------


def save_state(path: Path, payload: Mapping[str, Any]) -> None:
    """``torch.save`` of plain types and tensors, written atomically (temporary file, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        torch.save(dict(payload), temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_state(path: Path, task_name: str) -> dict[str, Any]:
    """A training state written by :func:`run_training` for ``task_name`` (loaded with ``weights_only``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file trips over
        raise TrainingError(f"{path}: not a readable training state: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path}: not an sct-train training state")
    if state.get("task") != task_name:
        raise TrainingError(f"{path}: a {state.get('task')!r} state, not {task_name!r}")
    return state


def write_json(path: Path, values: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


# -- the loop -----------------------------------------------------------------------------------------------


class TrainingTask(abc.ABC):
    """What a trainer supplies to :func:`run_training`."""

    name: str  # the state file is RUN_DIR/<name>_state.pt
    train_columns: tuple[str, ...]  # the keys train_micro_batch returns
    val_columns: tuple[str, ...]  # the keys validate returns

    @abc.abstractmethod
    def gradient_steps(self) -> Mapping[str, GradientStep]: ...

    @abc.abstractmethod
    def train_mode(self) -> None:
        """Put the trained networks in train mode (validation may leave them in eval mode)."""

    @abc.abstractmethod
    def train_micro_batch(self, batch: Mapping[str, Any], step: int) -> dict[str, float]:
        """Forward and ``backward`` for one micro-batch of optimiser step ``step`` (1-based)."""

    def after_step(self, step: int) -> None:  # noqa: B027 - optional hook
        """After the optimiser steps of ``step`` (EMA updates)."""

    @abc.abstractmethod
    def validate(self, step: int) -> dict[str, float]: ...

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Networks, EMA and anything else to resume (the gradient steps are saved by the loop)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopResult:
    step: int
    elapsed_s: float
    state_path: Path
    last_validation: dict[str, float]


def state_path_for(run_dir: Path, task_name: str) -> Path:
    return run_dir / f"{task_name}_state.pt"


def prepare_run_dir(run_dir: Path, task_name: str, resume: bool) -> dict[str, Any] | None:
    """Create ``run_dir``; the state to resume from (None for a fresh run). A fresh run refuses to
    overwrite an existing state, and ``--resume`` without a state is an error."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = state_path_for(run_dir, task_name)
    if resume:
        if not path.is_file():
            raise TrainingError(f"--resume: no {path.name} in {run_dir}")
        return load_state(path, task_name)
    if path.exists():
        raise TrainingError(f"{path} exists: pass --resume to continue that run, or choose another --out")
    return None


def run_training(
    task: TrainingTask,
    dataset: Dataset[Any],
    options: LoopOptions,
    run_dir: Path,
    device: torch.device,
    *,
    resume_state: Mapping[str, Any] | None,
    extra_state: Mapping[str, Any] | None = None,
) -> LoopResult:
    """Train ``task`` to ``options.steps``, from ``resume_state`` when given (see the module docstring)."""
    path = state_path_for(run_dir, task.name)
    start_step, elapsed_before_s = 0, 0.0
    if resume_state is not None:
        task.load_state_dict(resume_state["task_state"])
        for name, gradient_step in task.gradient_steps().items():
            gradient_step.load_state_dict(resume_state["gradient_steps"][name])
        start_step = int(resume_state["step"])
        elapsed_before_s = float(resume_state["elapsed_s"])
        set_rng_state(resume_state["rng"])
        log.info("resuming %s at step %d of %d", task.name, start_step, options.steps)
    columns = ["lr", "elapsed_s", *task.train_columns, *task.val_columns]
    metrics = MetricsLog(run_dir, columns, keep_through_step=start_step if resume_state is not None else None)
    last_validation: dict[str, float] = {}
    started = time.perf_counter()

    def elapsed_s() -> float:
        return elapsed_before_s + time.perf_counter() - started

    def save(step: int) -> None:
        payload = {
            "format": STATE_FORMAT,
            "format_version": STATE_FORMAT_VERSION,
            "task": task.name,
            "step": step,
            "elapsed_s": elapsed_s(),
            "options": options.to_dict(),
            "rng": rng_state(),
            "task_state": task.state_dict(),
            "gradient_steps": {k: v.state_dict() for k, v in task.gradient_steps().items()},
            **(extra_state or {}),
        }
        save_state(path, payload)
        log.debug("saved %s at step %d", path, step)

    if start_step >= options.steps:
        log.warning("%s is already at step %d (--steps %d): nothing to train", task.name, start_step, options.steps)
        metrics.close()
        return LoopResult(start_step, elapsed_before_s, path, {})
    stream = batch_stream(dataset, options, device, start_step)
    progress = tqdm(total=options.steps, initial=start_step, desc=f"train {task.name}", unit="step", dynamic_ncols=True)
    step = start_step
    try:
        for step in range(start_step + 1, options.steps + 1):
            task.train_mode()
            sums: dict[str, float] = {}
            for _ in range(options.accumulate):
                values = task.train_micro_batch(next(stream), step)
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + float(value) / options.accumulate
            lrs = {name: g.lr for name, g in task.gradient_steps().items()}
            for gradient_step in task.gradient_steps().values():
                gradient_step.step()
            task.after_step(step)
            row: dict[str, Any] = {"step": step, "lr": next(iter(lrs.values())), **sums}
            if (options.val_every and step % options.val_every == 0) or step == options.steps:
                last_validation = task.validate(step)
                row.update(last_validation)
                if last_validation:
                    progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_validation.items()))
            row["elapsed_s"] = elapsed_s()
            metrics.write(row)
            if (options.checkpoint_every and step % options.checkpoint_every == 0) or step == options.steps:
                save(step)
            progress.set_postfix({k: f"{v:.4g}" for k, v in list(sums.items())[:3]}, refresh=False)
            progress.update(1)
    finally:
        progress.close()
        metrics.close()
    return LoopResult(step, elapsed_s(), path, last_validation)


# -- small array helpers the trainers share ---------------------------------------------------------


def pad_to_multiple(
    array: np.ndarray, multiple: int, value: float, minimum_zyx: Sequence[int] = (1, 1, 1)
) -> tuple[np.ndarray, tuple[Any, ...]]:
    """``array`` (..., z, y, x) padded at the end of each spatial axis with ``value`` to a multiple of
    ``multiple`` (and at least ``minimum_zyx``); the slices that crop the result back."""
    spatial = array.shape[-3:]
    target = [max(int(m), n) for n, m in zip(spatial, minimum_zyx, strict=True)]
    target = [int(math.ceil(n / multiple) * multiple) for n in target]
    pad = [(0, 0)] * (array.ndim - 3) + [(0, t - n) for n, t in zip(spatial, target, strict=True)]
    padded = np.pad(array, pad, mode="constant", constant_values=value)
    crop = (Ellipsis, *(slice(0, n) for n in spatial))
    return padded, crop


# -- data sets and splits -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Where the cases are and how they are split (the same defaults in every command, so that the
    test cases held out from ``vae``, ``ldm`` and ``baseline-unet`` are the ones ``evaluate`` uses)."""

    root: Path
    split_file: Path | None = None  # read when it exists, else written with the seeded split
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    regions: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class DataSplit:
    train: list[Any]
    val: list[Any]
    test: list[Any]

    def describe(self) -> dict[str, Any]:
        """A JSON description (counts per region, case ids) for metadata and reports."""

        def ids(cases: list[Any]) -> list[str]:
            return [f"{case.region}/{case.case_id}" for case in cases]

        regions: dict[str, int] = {}
        for case in self.train:
            regions[case.region] = regions.get(case.region, 0) + 1
        return {
            "train_cases": len(self.train),
            "val_cases": len(self.val),
            "test_cases": len(self.test),
            "train_regions": dict(sorted(regions.items())),
            "train_ids": ids(self.train),
            "val_ids": ids(self.val),
            "test_ids": ids(self.test),
        }


def spread_over_regions(cases: Sequence[Any], n: int) -> list[Any]:
    """Up to ``n`` of ``cases``, taken from each region in turn (validation on every region, not the
    first region's cases only)."""
    by_region: dict[str, list[Any]] = {}
    for case in cases:
        by_region.setdefault(case.region, []).append(case)
    picked: list[Any] = []
    queues = [list(members) for _, members in sorted(by_region.items())]
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def load_split(options: DataOptions) -> DataSplit:
    """The cases under ``options.root`` split into train, validation and test."""
    from training.data import DataError, find_cases, split_cases, write_split

    split_file = options.split_file
    try:
        cases = find_cases(options.root, regions=options.regions)
        split = split_cases(
            cases,
            val_fraction=options.val_fraction,
            test_fraction=options.test_fraction,
            seed=options.split_seed,
            split_file=split_file if split_file is not None and split_file.is_file() else None,
        )
        if split_file is not None and not split_file.is_file():
            write_split(split, split_file)
            log.info("wrote the split to %s", split_file)
    except DataError as exc:
        raise TrainingError(str(exc)) from exc
    result = DataSplit(train=list(split["train"]), val=list(split["val"]), test=list(split["test"]))
    if not result.train:
        raise TrainingError(f"no training cases in {options.root}")
    log.info(
        "%d cases in %s: %d train, %d validation, %d test",
        len(cases),
        options.root,
        len(result.train),
        len(result.val),
        len(result.test),
    )
    return result
