"""What every sCT method returns, and the one interface the node calls (serialisable in and out)."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from sct_model.reference import TrainingReference
from sct_model.volume import Grid, Volume

HU_MIN = -1024.0
HU_MAX = 3071.0
HU_AIR = -1000.0
HU_WATER = 0.0


@dataclasses.dataclass(frozen=True)
class PredictorInfo:
    """Which method made an sCT: written into DerivationDescription and the audit database."""

    method: str  # "diffusion" or "bulk_density"
    model_name: str  # e.g. "sct-ldm-demo", "bulk-density"
    model_version: str  # the code version, and the checkpoint's own version where there is one
    checkpoint_sha256: str  # "" for methods without a checkpoint
    sampler: str  # "DDIM", "RFlow", or "none"
    device: str  # "cpu", "cuda:0"


@dataclasses.dataclass(frozen=True)
class SCTResult:
    hu: Volume  # float32 HU on the requested grid, clipped to [HU_MIN, HU_MAX], air outside the body
    std_hu: Volume | None  # per-voxel standard deviation over the samples (samples > 1), same grid
    body_mask: Volume | None  # uint8 body mask on the same grid
    timings_s: dict[str, float]  # seconds per step: preprocess, sampling, decode, postprocess
    info: PredictorInfo
    seeds: tuple[int, ...]  # the seed of each sample
    # For the node's QA: the MR's features in the model's feature space (reference.FEATURE_SET) and
    # what the checkpoint knows of its training data (None: a method or checkpoint without them).
    mr_features: tuple[float, ...] | None = None
    reference: TrainingReference | None = None


class SCTPredictor(Protocol):
    """An sCT method. ``output_grid`` None means the axial grid covering the MR."""

    info: PredictorInfo

    def predict(
        self, mr: Volume, *, steps: int, samples: int, seed: int, output_grid: Grid | None = None
    ) -> SCTResult: ...
