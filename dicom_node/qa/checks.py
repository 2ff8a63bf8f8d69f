"""Every QA check of one sCT, in order (``results.CHECK_NAMES``), each timed."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

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
    def of(cls, mr: Volume, result: SCTResult, samples: int) -> QAInputs:
        """From a predictor's result; the MR's body on the sCT grid is computed when the method gave none."""
        body = result.body_mask if result.body_mask is not None else output_masks(mr, result.hu.grid).body
        return cls(
            mr_grid=mr.grid,
            sct=result.hu,
            mr_body=body,
            std=result.std_hu,
            features=result.mr_features,
            reference=result.reference,
            method=result.info.method,
            samples=samples,
        )


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
