"""``in_distribution``: how far the MR lies from the checkpoint's training MRs, in the model's own
feature space (``sct_model.reference``: Mahalanobis distance of the MR encoder's features, in units
of the training cases' own spread; 1.0 is the one-in-twenty most unusual training case).

A learnt model asked about an MR unlike its training data still answers with a plausible-looking CT
(a piece of meat came back with a skull): this is the check that says the model does not know.
A checkpoint without training statistics fails it (the score cannot be computed; ``sct-train
qa-reference`` adds them). The bulk-density method learnt nothing and has no distribution: the
check does not apply to it and passes with that note.
"""

from __future__ import annotations

from collections.abc import Sequence

from dicom_node.config import QAConfig
from dicom_node.qa.results import ABOVE, FAIL, PASS, CheckResult, Measurement, judge
from sct_model.reference import FEATURE_SET, TrainingReference

NAME = "in_distribution"
UNTRAINED_METHODS = ("bulk_density",)


def check_in_distribution(
    features: Sequence[float] | None, reference: TrainingReference | None, method: str, qa: QAConfig
) -> CheckResult:
    if method in UNTRAINED_METHODS:
        note = f"not applicable: the {method} method has no training data"
        return CheckResult(NAME, (Measurement.unmeasured(NAME, "score", PASS, note),), note)
    problem = _why_not_measurable(features, reference)
    if problem is not None:
        return CheckResult(NAME, (Measurement.unmeasured(NAME, "score", FAIL, problem),), problem)
    assert features is not None and reference is not None
    distribution = reference.features
    score = distribution.score(features)
    note = ""
    if judge(score, qa.in_distribution_warn, qa.in_distribution_fail, ABOVE) != PASS:
        furthest = ", ".join(f"{name} {z:+.1f} sd" for name, z in distribution.largest_deviations(features, 2))
        note = f"furthest from training: {furthest}"
    measurement = Measurement.judged(
        NAME,
        "score",
        score,
        "",
        warn_at=qa.in_distribution_warn,
        fail_at=qa.in_distribution_fail,
        worse=ABOVE,
        note=note,
    )
    most_unusual = max(distribution.training_scores)
    summary = (
        f"MR feature distance {score:.2f} (1.0 = 95th percentile of the {reference.cases} training cases, "
        f"the most unusual of them {most_unusual:.2f})"
    )
    return CheckResult(NAME, (measurement,), summary)


def _why_not_measurable(features: Sequence[float] | None, reference: TrainingReference | None) -> str | None:
    if reference is None:
        return (
            "the checkpoint carries no statistics of its training data, so the MR cannot be compared with it "
            "(add them without retraining: sct-train qa-reference --checkpoint FILE --data TRAINING_DATA)"
        )
    if features is None:
        return "the sCT method gave no MR features to compare with its training data"
    if reference.features.feature_set != FEATURE_SET or len(features) != len(reference.features.names):
        return (
            f"the checkpoint's training statistics are of feature set {reference.features.feature_set!r} "
            f"({len(reference.features.names)} features), this node computes {FEATURE_SET!r} ({len(features)}): "
            "recompute them with sct-train qa-reference"
        )
    return None
