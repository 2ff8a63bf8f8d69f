"""What a checkpoint knows of its training data, so that the node can tell an MR it was not trained for.

A generative model always produces something plausible-looking; what it cannot do is say that an
input is unlike anything it learnt from. The checkpoint therefore carries a :class:`TrainingReference`
made from its own training cases (``sct-train qa-reference``, and ``sct-train ldm`` at the end of
training):

- **The MR features' distribution** (:class:`FeatureDistribution`), in the model's own feature
  space: the mean and standard deviation, inside the body, of every channel of the MR encoder's
  first block (full model resolution: local contrast and texture) and of its output (the
  conditioning the diffusion UNet sees, at latent resolution), plus the histogram of the normalised
  MR inside the body (8 bins: the contrast as the model receives it). 32 numbers for the demo
  checkpoint. Their covariance is estimated with Ledoit-Wolf shrinkage (scikit-learn), since there are
  about as many training cases as features, and the distance of an MR from the training set is the
  Mahalanobis distance. Its unit is the training cases' own spread: ``score`` divides the distance by
  the 95th percentile of the training cases' leave-one-out distances, so 1.0 means "as unusual as
  the one-in-twenty most unusual training case". Why this and not the autoencoder's reconstruction
  error: the autoencoder is trained on CT and never sees the MR; the MR encoder is the only part of
  the model that looks at the input. Measured on the demo checkpoint (benchmarks/README.md): held-out
  phantoms score about 0.6-1.1, contrast-inverted, anatomy-free, noise-only and never-seen anatomy
  inputs 3 to 30.
- **The tissue composition** (:class:`TissueStatistics`) of the training CTs and of the model's own
  sCTs of the training MRs: for each tissue class (air, lung, fat, soft tissue, bone, by HU range)
  the smallest and largest share of the body it fills, and the mean HU histogram inside the body.
  The node checks a job's sCT against the model's own envelope: a model that blurs (the demo
  checkpoint, 200 HU mean absolute error) makes more "bone" and less fat than any CT on every case,
  and what a job must be compared with is what this model makes of data it knows; the training
  CTs' ranges and histogram stay in the report, for the physicist to see the model's bias.

Everything here is plain numbers (JSON in the checkpoint's metadata); computing the features needs
torch, checking them does not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FEATURE_SET = "mr-encoder-v1"  # the features below; another definition must get another name
HISTOGRAM_BINS = 8  # of the normalised MR inside the body, over the model's MR range
UNIT_PERCENTILE = 95.0  # the training cases' leave-one-out distance that scores 1.0
HU_HISTOGRAM_EDGES = tuple(float(v) for v in range(-1024, 3072 + 1, 64))  # 64 bins of 64 HU


@dataclasses.dataclass(frozen=True)
class TissueClass:
    """A tissue class by HU: [low_hu, high_hu)."""

    name: str
    low_hu: float
    high_hu: float


# Contiguous from the bottom to the top of the CT range; the edges between lung and fat and between
# soft tissue and bone are the usual bulk-density boundaries (partial-volume voxels fall on either side).
TISSUE_CLASSES = (
    TissueClass("air", -1024.0, -900.0),
    TissueClass("lung", -900.0, -200.0),
    TissueClass("fat", -200.0, -20.0),
    TissueClass("soft_tissue", -20.0, 200.0),
    TissueClass("bone", 200.0, 3072.0),
)
BONE_MIN_HU = 200.0


def tissue_fractions(hu: np.ndarray, body: np.ndarray, classes: Sequence[TissueClass] = TISSUE_CLASSES) -> np.ndarray:
    """The share (0-1) of the ``body`` voxels in each class of ``classes`` (zeros for an empty body)."""
    values = np.asarray(hu)[np.asarray(body, dtype=bool)]
    if values.size == 0:
        return np.zeros(len(classes))
    edges = [classes[0].low_hu] + [c.high_hu for c in classes]
    counts, _ = np.histogram(np.clip(values, edges[0], np.nextafter(edges[-1], -np.inf)), bins=edges)
    return counts / values.size


def hu_histogram(hu: np.ndarray, body: np.ndarray, edges: Sequence[float] = HU_HISTOGRAM_EDGES) -> np.ndarray:
    """The share (0-1) of the ``body`` voxels in each HU bin (values clipped into the outer bins)."""
    values = np.asarray(hu)[np.asarray(body, dtype=bool)]
    if values.size == 0:
        return np.zeros(len(edges) - 1)
    counts, _ = np.histogram(np.clip(values, edges[0], np.nextafter(edges[-1], -np.inf)), bins=list(edges))
    return counts / values.size


@dataclasses.dataclass(frozen=True)
class FeatureDistribution:
    """The training MRs' features: where they lie, how they spread, and the unit of the score."""

    feature_set: str
    names: tuple[str, ...]
    mean: tuple[float, ...]  # per feature, for standardisation
    scale: tuple[float, ...]  # per feature standard deviation (standardisation)
    precision: tuple[tuple[float, ...], ...]  # inverse of the shrunk covariance of the standardised features
    shrinkage: float  # Ledoit-Wolf's shrinkage towards a scaled identity (0-1)
    unit_distance: float  # UNIT_PERCENTILE of the training cases' leave-one-out distances
    training_scores: tuple[float, ...]  # every training case's leave-one-out score (distance / unit_distance)

    def __post_init__(self) -> None:
        n = len(self.names)
        if not (
            len(self.mean) == len(self.scale) == len(self.precision) == n and all(len(r) == n for r in self.precision)
        ):
            raise ValueError("feature distribution: names, mean, scale and precision must have matching sizes")
        if not (self.unit_distance > 0 and math.isfinite(self.unit_distance)):
            raise ValueError("feature distribution: unit_distance must be a positive number")
        if not all(s > 0 for s in self.scale):
            raise ValueError("feature distribution: every scale must be > 0")

    def distance(self, features: Sequence[float]) -> float:
        """The Mahalanobis distance of ``features`` from the training mean (shrunk covariance)."""
        x = np.asarray(features, dtype=np.float64)
        if x.shape != (len(self.names),):
            raise ValueError(f"expected {len(self.names)} features ({self.feature_set}), got {x.shape}")
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return float(math.sqrt(max(0.0, float(z @ np.asarray(self.precision) @ z))))

    def score(self, features: Sequence[float]) -> float:
        """``distance`` in units of the training cases' own spread (1.0: the 95th percentile of theirs)."""
        return self.distance(features) / self.unit_distance

    def largest_deviations(self, features: Sequence[float], count: int = 3) -> list[tuple[str, float]]:
        """The features furthest from the training mean, in training standard deviations (for people)."""
        z = (np.asarray(features, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        order = np.argsort(-np.abs(z))[:count]
        return [(self.names[i], float(z[i])) for i in order]


def fit_feature_distribution(
    rows: np.ndarray, names: Sequence[str], feature_set: str = FEATURE_SET
) -> FeatureDistribution:
    """The distribution of the training cases' feature ``rows`` (cases x features).

    Ledoit-Wolf (scikit-learn) on the standardised features; the unit of the score is the 95th
    percentile of the leave-one-out distances (each case against a fit without it), which is what
    an unseen case from the same distribution scores, not the smaller in-sample distances.
    """
    from sklearn.covariance import LedoitWolf

    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"feature rows must be (cases, {len(names)}), got {x.shape}")
    if x.shape[0] < 5:
        raise ValueError(f"at least 5 training cases are needed for the feature distribution, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("the training features hold non-finite values")

    def fit(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        mean = sample.mean(axis=0)
        scale = sample.std(axis=0)
        scale = np.where(scale > 1e-9, scale, 1.0)  # a constant feature: deviations from it count in its own units
        model = LedoitWolf(store_precision=True, assume_centered=True).fit((sample - mean) / scale)
        return mean, scale, model.precision_, float(model.shrinkage_)

    def distance(x_row: np.ndarray, mean: np.ndarray, scale: np.ndarray, precision: np.ndarray) -> float:
        z = (x_row - mean) / scale
        return float(math.sqrt(max(0.0, float(z @ precision @ z))))

    left_out = np.array([distance(x[i], *fit(np.delete(x, i, axis=0))[:3]) for i in range(x.shape[0])])
    unit = float(np.percentile(left_out, UNIT_PERCENTILE))
    mean, scale, precision, shrinkage = fit(x)
    return FeatureDistribution(
        feature_set=feature_set,
        names=tuple(names),
        mean=tuple(float(v) for v in mean),
        scale=tuple(float(v) for v in scale),
        precision=tuple(tuple(float(v) for v in row) for row in precision),
        shrinkage=shrinkage,
        unit_distance=unit,
        training_scores=tuple(float(d / unit) for d in left_out),
    )


@dataclasses.dataclass(frozen=True)
class TissueStatistics:
    """The tissue composition inside the body of the training CTs, and of this model's own sCTs of the
    training MRs (what the model makes of data it knows: the envelope a job's sCT is checked against;
    a model that blurs bone into the soft tissue has more "bone" than any CT, on every case)."""

    classes: tuple[TissueClass, ...]
    ct_fraction_min: tuple[float, ...]  # per class, 0-1, over the training CTs (inside their mask)
    ct_fraction_max: tuple[float, ...]
    sct_fraction_min: tuple[float, ...]  # per class, 0-1, over the model's sCTs (inside the MR's body)
    sct_fraction_max: tuple[float, ...]
    sct_steps: int  # the sampling steps the model's sCTs were made with
    histogram_edges_hu: tuple[float, ...]
    ct_histogram_mean: tuple[float, ...]  # per bin, 0-1, mean over the training CTs
    sct_histogram_mean: tuple[float, ...]  # per bin, 0-1, mean over the model's sCTs

    def __post_init__(self) -> None:
        n = len(self.classes)
        if not all(
            len(v) == n
            for v in (self.ct_fraction_min, self.ct_fraction_max, self.sct_fraction_min, self.sct_fraction_max)
        ):
            raise ValueError("tissue statistics: one min and max per class")
        bins = len(self.histogram_edges_hu) - 1
        if len(self.ct_histogram_mean) != bins or len(self.sct_histogram_mean) != bins:
            raise ValueError("tissue statistics: one histogram value per bin")


def tissue_statistics(
    ct_fractions: np.ndarray,
    ct_histograms: np.ndarray,
    sct_fractions: np.ndarray,
    sct_histograms: np.ndarray,
    sct_steps: int,
) -> TissueStatistics:
    """From each training case's ``tissue_fractions`` (cases x classes) and ``hu_histogram`` (cases x
    bins), of its CT and of the model's sCT of its MR."""
    rows = {name: np.asarray(v, dtype=np.float64) for name, v in (("ct", ct_fractions), ("sct", sct_fractions))}
    for name, fractions in rows.items():
        if fractions.ndim != 2 or fractions.shape[1] != len(TISSUE_CLASSES) or fractions.shape[0] < 1:
            raise ValueError(f"{name} tissue fractions must be (cases, {len(TISSUE_CLASSES)}), got {fractions.shape}")

    def floats(values: np.ndarray) -> tuple[float, ...]:
        return tuple(float(v) for v in values)

    return TissueStatistics(
        classes=TISSUE_CLASSES,
        ct_fraction_min=floats(rows["ct"].min(axis=0)),
        ct_fraction_max=floats(rows["ct"].max(axis=0)),
        sct_fraction_min=floats(rows["sct"].min(axis=0)),
        sct_fraction_max=floats(rows["sct"].max(axis=0)),
        sct_steps=int(sct_steps),
        histogram_edges_hu=HU_HISTOGRAM_EDGES,
        ct_histogram_mean=floats(np.asarray(ct_histograms, dtype=np.float64).mean(axis=0)),
        sct_histogram_mean=floats(np.asarray(sct_histograms, dtype=np.float64).mean(axis=0)),
    )


@dataclasses.dataclass(frozen=True)
class TrainingReference:
    """The statistics of a checkpoint's training cases that the node's QA checks compare against."""

    cases: int
    description: str  # which cases (e.g. "105 training cases of /data (split seed 0)")
    features: FeatureDistribution
    tissues: TissueStatistics

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingReference:
        """Raises ValueError (or KeyError/TypeError) when ``values`` is not a reference."""
        features = dict(values["features"])
        tissues = dict(values["tissues"])
        return cls(
            cases=int(values["cases"]),
            description=str(values["description"]),
            features=FeatureDistribution(
                feature_set=str(features["feature_set"]),
                names=tuple(str(n) for n in features["names"]),
                mean=tuple(float(v) for v in features["mean"]),
                scale=tuple(float(v) for v in features["scale"]),
                precision=tuple(tuple(float(v) for v in row) for row in features["precision"]),
                shrinkage=float(features["shrinkage"]),
                unit_distance=float(features["unit_distance"]),
                training_scores=tuple(float(v) for v in features["training_scores"]),
            ),
            tissues=TissueStatistics(
                classes=tuple(
                    TissueClass(str(c["name"]), float(c["low_hu"]), float(c["high_hu"])) for c in tissues["classes"]
                ),
                **{key: _floats(tissues[key]) for key in _TISSUE_FLOAT_TUPLES},
                sct_steps=int(tissues["sct_steps"]),
            ),
        )

    def summary(self) -> str:
        scores = self.features.training_scores
        lines = [
            f"QA reference: {self.description}",
            f"  MR features: {len(self.features.names)} ({self.features.feature_set}), Ledoit-Wolf shrinkage "
            f"{self.features.shrinkage:.2f}; training cases' leave-one-out scores: median {np.median(scores):.2f}, "
            f"max {max(scores):.2f} (1.0 = their 95th percentile)",
        ]
        stats = self.tissues
        lines.append(f"  tissue shares of the body, training CTs | this model's sCTs ({stats.sct_steps} steps):")
        for i, tissue in enumerate(stats.classes):
            lines.append(
                f"  {tissue.name:<12} [{tissue.low_hu:g}, {tissue.high_hu:g}) HU: "
                f"{100 * stats.ct_fraction_min[i]:.1f}-{100 * stats.ct_fraction_max[i]:.1f} % | "
                f"{100 * stats.sct_fraction_min[i]:.1f}-{100 * stats.sct_fraction_max[i]:.1f} %"
            )
        return "\n".join(lines)


_TISSUE_FLOAT_TUPLES = (
    "ct_fraction_min",
    "ct_fraction_max",
    "sct_fraction_min",
    "sct_fraction_max",
    "histogram_edges_hu",
    "ct_histogram_mean",
    "sct_histogram_mean",
)


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively (what JSON and the checkpoint's metadata hold)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def feature_names(first_block_channels: int, output_channels: int) -> tuple[str, ...]:
    """The names of the :data:`FEATURE_SET` features, in order."""
    names = []
    for block, channels in (("block1", first_block_channels), ("encoding", output_channels)):
        for channel in range(channels):
            names += [f"{block}.c{channel}.mean", f"{block}.c{channel}.std"]
    edges = np.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1)
    names += [f"mr_histogram[{edges[i]:+.2f},{edges[i + 1]:+.2f})" for i in range(HISTOGRAM_BINS)]
    return tuple(names)


def mr_histogram(mr_unit: np.ndarray, body: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """The share of the body voxels of the normalised MR in each of :data:`HISTOGRAM_BINS` bins of ``value_range``."""
    values = np.asarray(mr_unit)[np.asarray(body, dtype=bool)]
    if values.size == 0:
        return np.zeros(HISTOGRAM_BINS)
    low, high = value_range
    counts, _ = np.histogram(np.clip(values, low, high), bins=HISTOGRAM_BINS, range=(low, high))
    return counts / values.size
