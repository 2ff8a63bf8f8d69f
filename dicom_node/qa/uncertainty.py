"""``uncertainty``: how much the diffusion samples disagree, inside the body (when ``samples > 1``).

The per-voxel standard deviation over the samples (``[model] samples`` of them, different seeds):
its mean and 95th percentile inside the MR's body, in HU. Where the model is unsure, the samples
differ; a high mean says the whole sCT is unsure, a high 95th percentile that some region is (the
uncertainty map in the PACS shows where). With one sample there is no map and nothing to judge.
"""

from __future__ import annotations

import numpy as np

from dicom_node.config import QAConfig
from dicom_node.qa.results import ABOVE, PASS, CheckResult, Measurement
from sct_model.volume import Volume

NAME = "uncertainty"


def check_uncertainty(std: Volume | None, mr_body: Volume, samples: int, qa: QAConfig) -> CheckResult:
    if samples <= 1 or std is None:
        note = "one sample: no uncertainty map ([model] samples > 1 gives one)"
        return CheckResult(NAME, (Measurement.unmeasured(NAME, "std", PASS, note, "HU"),), note)
    if std.grid != mr_body.grid:
        raise ValueError("the uncertainty map and the MR's body mask must lie on the same grid")
    inside = np.asarray(std.array)[np.asarray(mr_body.array, dtype=bool)]
    if inside.size == 0:
        inside = np.asarray(std.array).ravel()
    mean, p95 = float(np.mean(inside)), float(np.percentile(inside, 95))
    measurements = (
        Measurement.judged(
            NAME,
            "mean",
            mean,
            "HU",
            warn_at=qa.uncertainty_mean_warn_hu,
            fail_at=qa.uncertainty_mean_fail_hu,
            worse=ABOVE,
        ),
        Measurement.judged(
            NAME, "p95", p95, "HU", warn_at=qa.uncertainty_p95_warn_hu, fail_at=qa.uncertainty_p95_fail_hu, worse=ABOVE
        ),
    )
    return CheckResult(NAME, measurements, f"{samples} samples: std in the body mean {mean:.1f} HU, p95 {p95:.1f} HU")
