"""Every QA check of one sCT, in order (``results.CHECK_NAMES``), each timed.

The checks look at the sCT grid. A grid of more than ``MAX_CHECK_VOXELS`` (a 0.5 mm MR gives
tens of millions) is looked at on every n-th voxel along each axis, n the smallest that brings it
under: the same voxel centres, n times the spacing. Shares (tissue classes, Dice, the uncertainty's
mean and percentile) are estimated from an eighth or fewer of the voxels, which changes them in the
third decimal; distances (HD95) and outlines are measured at the coarser spacing, so within one
coarse voxel. It keeps the checks a small fraction of the sampling time (benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np

from dicom_node.config import QAConfig
from dicom_node.qa.body_agreement import check_body_agreement
from dicom_node.qa.field_of_view import check_field_of_view
from dicom_node.qa.hu_plausibility import check_hu_plausibility
from dicom_node.qa.in_distribution import check_in_distribution
from dicom_node.qa.results import CHECK_NAMES, CheckResult, QAOutcome
from dicom_node.qa.uncertainty import check_uncertainty
from sct_model.preprocessing import output_masks
from sct_model.reference import TrainingReference
from sct_model.result import SCTResult
from sct_model.volume import Grid, Volume


@dataclasses.dataclass(frozen=True)
class QAInputs:
    """What the checks look at: the sCT, the MR's body and (if any) the uncertainty on the sCT grid,
    the MR's own grid (its field of view), and the model's view of the MR and of its training data."""

    mr_grid: Grid
    sct: Volume
    mr_body: Volume
    std: Volume | None
    features: tuple[float, ...] | None
    reference: TrainingReference | None
    method: str
    samples: int

    @classmethod
    def of(cls, mr: Volume, result: SCTResult, samples: int, body: Volume | None = None) -> QAInputs:
        """From a predictor's result; ``body``: the MR's body on the sCT grid (default: ``mr_body_on_sct``)."""
        body = body if body is not None else mr_body_on_sct(mr, result)
        step = stride_for(result.hu.grid)
        return cls(
            mr_grid=mr.grid,
            sct=every(result.hu, step),
            mr_body=every(body, step),
            std=every(result.std_hu, step) if result.std_hu is not None else None,
            features=result.mr_features,
            reference=result.reference,
            method=result.info.method,
            samples=samples,
        )


MAX_CHECK_VOXELS = 8_000_000


def mr_body_on_sct(mr: Volume, result: SCTResult) -> Volume:
    """The MR's body on the sCT grid: the predictor's, or computed from the MR when it gave none."""
    return result.body_mask if result.body_mask is not None else output_masks(mr, result.hu.grid).body


def stride_for(grid: Grid, max_voxels: int | None = None) -> int:
    """The smallest n for which every n-th voxel along each axis of ``grid`` are at most ``max_voxels``
    (default ``MAX_CHECK_VOXELS``)."""
    max_voxels = MAX_CHECK_VOXELS if max_voxels is None else max_voxels
    step = 1
    while math.prod(math.ceil(n / step) for n in grid.size) > max_voxels:
        step += 1
    return step


def every(volume: Volume, step: int) -> Volume:
    """Every ``step``-th voxel of ``volume`` along each axis, on the grid of those voxels."""
    if step == 1:
        return volume
    grid = volume.grid
    array = np.ascontiguousarray(volume.array[::step, ::step, ::step])
    size = (array.shape[2], array.shape[1], array.shape[0])
    spacing = tuple(s * step for s in grid.spacing_mm)
    return Volume(array, Grid(size=size, spacing_mm=spacing, origin_mm=grid.origin_mm, direction=grid.direction))  # type: ignore[arg-type]


def run_checks(inputs: QAInputs, qa: QAConfig) -> tuple[QAOutcome, dict[str, float]]:
    """The outcome of every check, and the seconds each took (keyed by check name)."""
    checks: dict[str, Callable[[], CheckResult]] = {
        "in_distribution": lambda: check_in_distribution(inputs.features, inputs.reference, inputs.method, qa),
        "body_agreement": lambda: check_body_agreement(inputs.sct, inputs.mr_body, qa),
        "hu_plausibility": lambda: check_hu_plausibility(
            inputs.sct, inputs.mr_body, inputs.reference, inputs.method, qa
        ),
        "uncertainty": lambda: check_uncertainty(inputs.std, inputs.mr_body, inputs.samples, qa),
        "field_of_view": lambda: check_field_of_view(inputs.mr_grid, inputs.mr_body, qa),
    }
    results, seconds = [], {}
    for name in CHECK_NAMES:
        started = time.perf_counter()
        results.append(checks[name]())
        seconds[name] = time.perf_counter() - started
    return QAOutcome(tuple(results)), seconds
