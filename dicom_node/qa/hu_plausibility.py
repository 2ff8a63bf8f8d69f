"""``hu_plausibility``: is the sCT made of what this model's sCTs of known data are made of?

Inside the MR's body, the share of each tissue class (air, lung, fat, soft tissue, bone, by HU:
``sct_model.reference.TISSUE_CLASSES``) against the smallest and largest share this model gives
its training cases (stored in the checkpoint, ``sct_model.reference.TissueStatistics``: what the
model makes of data it knows; the training CTs' own ranges are in the note and the report). The
measured value is how many percentage points the sCT lies outside that range (0 inside it).

Also: bone-density voxels (>= 200 HU) outside the MR's body, in mL (a model that invents a skull
around a piece of meat puts bone where the MR shows none; the node sets air outside the MR's body
itself, so with the shipped methods this stays 0 and guards the method), and the share of the body
outside [-1024, 3071] HU (impossible values; the sCT writer would clip). Without the checkpoint's
statistics the class shares cannot be judged: they fail for a learnt model, and do not apply to
the bulk-density method (which assigns them itself).
"""

from __future__ import annotations

import numpy as np

from dicom_node.config import QAConfig
from dicom_node.qa.in_distribution import UNTRAINED_METHODS
from dicom_node.qa.results import ABOVE, FAIL, PASS, CheckResult, Measurement
from sct_model.reference import BONE_MIN_HU, TISSUE_CLASSES, TrainingReference, tissue_fractions
from sct_model.result import HU_MAX, HU_MIN
from sct_model.volume import Volume

NAME = "hu_plausibility"


def outside_range_pp(fraction: float, low: float, high: float) -> float:
    """Percentage points by which ``fraction`` lies outside [low, high] (all three 0-1); 0 inside."""
    return 100.0 * max(0.0, low - fraction, fraction - high)


def check_hu_plausibility(
    sct: Volume, mr_body: Volume, reference: TrainingReference | None, method: str, qa: QAConfig
) -> CheckResult:
    if sct.grid != mr_body.grid:
        raise ValueError("the sCT and the MR's body mask must lie on the same grid")
    hu = np.asarray(sct.array)
    body = np.asarray(mr_body.array, dtype=bool)
    fractions = tissue_fractions(hu, body, TISSUE_CLASSES)
    measurements: list[Measurement] = []
    flagged: list[str] = []
    if reference is None:
        verdict = PASS if method in UNTRAINED_METHODS else FAIL
        note = (
            f"not applicable: the {method} method has no training data"
            if verdict == PASS
            else "the checkpoint carries no tissue statistics of its training CTs (sct-train qa-reference adds them)"
        )
        measurements += [Measurement.unmeasured(NAME, c.name, verdict, note, unit="pp") for c in TISSUE_CLASSES]
    else:
        stats = reference.tissues
        by_name = {c.name: i for i, c in enumerate(stats.classes)}
        for index, tissue in enumerate(TISSUE_CLASSES):
            if tissue.name not in by_name:
                note = f"the checkpoint's statistics have no class {tissue.name!r}: recompute them"
                measurements.append(Measurement.unmeasured(NAME, tissue.name, FAIL, note, unit="pp"))
                continue
            i = by_name[tissue.name]
            low, high = stats.sct_fraction_min[i], stats.sct_fraction_max[i]
            share = float(fractions[index])
            note = (
                f"{100 * share:.1f} % of the body; usual {100 * low:.1f}-{100 * high:.1f}, "
                f"CTs {100 * stats.ct_fraction_min[i]:.1f}-{100 * stats.ct_fraction_max[i]:.1f}"
            )
            measurement = Measurement.judged(
                NAME,
                tissue.name,
                outside_range_pp(share, low, high),
                "pp",
                warn_at=qa.tissue_outside_training_warn_pp,
                fail_at=qa.tissue_outside_training_fail_pp,
                worse=ABOVE,
                note=note,
            )
            measurements.append(measurement)
            if measurement.verdict != PASS:
                flagged.append(f"{tissue.name} {100 * share:.1f} % (usual {100 * low:.1f}-{100 * high:.1f} %)")
    voxel_ml = float(np.prod(sct.grid.spacing_mm)) / 1000.0
    bone_outside_ml = float(np.count_nonzero((hu >= BONE_MIN_HU) & ~body)) * voxel_ml
    measurements.append(
        Measurement.judged(
            NAME,
            "bone_outside_body",
            bone_outside_ml,
            "mL",
            warn_at=qa.bone_outside_body_warn_ml,
            fail_at=qa.bone_outside_body_fail_ml,
            worse=ABOVE,
        )
    )
    inside = hu[body]
    impossible = int(np.count_nonzero(~np.isfinite(inside) | (inside < HU_MIN) | (inside > HU_MAX)))
    impossible_percent = 100.0 * impossible / inside.size if inside.size else 0.0
    measurements.append(
        Measurement.judged(
            NAME,
            "outside_hu_range",
            impossible_percent,
            "%",
            warn_at=None,
            fail_at=qa.outside_hu_range_fail_percent,
            worse=ABOVE,
            note=f"of the body outside [{HU_MIN:g}, {HU_MAX:g}] HU",
        )
    )
    shares = ", ".join(f"{c.name} {100 * f:.1f} %" for c, f in zip(TISSUE_CLASSES, fractions, strict=True))
    summary = f"body: {shares}" + (f"; outside the training range: {'; '.join(flagged)}" if flagged else "")
    return CheckResult(NAME, tuple(measurements), summary)
