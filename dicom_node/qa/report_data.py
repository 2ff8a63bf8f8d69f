"""What the QA report shows, kept next to the job so that it can be drawn again without the volumes.

The report is drawn when the checks run and again when a physicist releases or rejects a held job
(the report then says who decided and why), possibly in another process (``sct-node review``,
the review page). So everything it shows is stored in the job's QA folder:

- ``report.json``: provenance, every check's measurements, the tissue table, the HU histograms and
  what the policy decided (plain JSON);
- ``report-planes.npz``: the MR, the sCT, the uncertainty (if any) and the body outline at three
  orthogonal planes through the body, on an isotropic display grid (a few hundred kB).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dicom_node.qa.results import CheckResult, Measurement, QAOutcome

REPORT_JSON = "report.json"
PLANES_NPZ = "report-planes.npz"
PLANE_NAMES = ("axial", "coronal", "sagittal")
REPORT_DATA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where the sCT came from: patient, MR series, model and sampling settings, route and policy."""

    job_id: int
    patient_name: str
    patient_id: str
    study_instance_uid: str
    mr_series_uid: str
    mr_series_description: str
    mr_instances: int
    mr_scanner: str  # manufacturer and model of the MR scanner ("" when the MR does not say)
    sct_series_uid: str
    sct_slices: int
    method: str
    model_name: str
    model_version: str
    checkpoint_sha256: str
    sampler: str
    device: str
    steps: int
    samples: int
    seed: int
    route: str
    qa_policy: str
    computed_at_utc: str  # ISO 8601, when the checks ran


@dataclasses.dataclass(frozen=True)
class TissueRow:
    """One tissue class of the HU plausibility check: its HU range and how much of the body it fills."""

    name: str
    low_hu: float  # the class is [low_hu, high_hu)
    high_hu: float
    sct_percent: float  # of the MR's body, in the sCT
    training_min_percent: float | None  # the smallest and largest share seen in the training CTs
    training_max_percent: float | None
    usual_min_percent: float | None = None  # ... in this model's sCTs of its training MRs (what the check judges by)
    usual_max_percent: float | None = None


@dataclasses.dataclass(frozen=True)
class Histogram:
    """The sCT's HU histogram inside the body, and the training CTs' (mean over cases), in percent per bin."""

    edges_hu: tuple[float, ...]
    sct_percent: tuple[float, ...]
    training_percent: tuple[float, ...] | None
    usual_percent: tuple[float, ...] | None = None  # this model's sCTs of its training MRs (mean over cases)


@dataclasses.dataclass(frozen=True)
class Review:
    """A physicist's decision on a held job."""

    decision: str  # "released" or "rejected"
    by: str
    reason: str
    at_utc: str  # ISO 8601


@dataclasses.dataclass(frozen=True)
class ReportData:
    """Everything the report shows except the pictures (``Planes``) and the review (drawn in later)."""

    provenance: Provenance
    outcome: QAOutcome
    tissues: tuple[TissueRow, ...]
    histogram: Histogram
    decision: str  # what the policy did: "sent", "held for review", "rejected (block policy)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": REPORT_DATA_VERSION,
            "provenance": dataclasses.asdict(self.provenance),
            "checks": [
                {"name": c.name, "summary": c.summary, "measurements": [m.to_dict() for m in c.measurements]}
                for c in self.outcome.checks
            ],
            "tissues": [dataclasses.asdict(t) for t in self.tissues],
            "histogram": dataclasses.asdict(self.histogram),
            "decision": self.decision,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ReportData:
        if values.get("version") != REPORT_DATA_VERSION:
            raise ValueError(f"report data version {values.get('version')!r} is not {REPORT_DATA_VERSION}")
        checks = tuple(
            CheckResult(c["name"], tuple(Measurement.from_dict(m) for m in c["measurements"]), c["summary"])
            for c in values["checks"]
        )
        histogram = values["histogram"]
        return cls(
            provenance=Provenance(**values["provenance"]),
            outcome=QAOutcome(checks),
            tissues=tuple(TissueRow(**t) for t in values["tissues"]),
            histogram=Histogram(
                edges_hu=tuple(histogram["edges_hu"]),
                sct_percent=tuple(histogram["sct_percent"]),
                training_percent=tuple(histogram["training_percent"]) if histogram["training_percent"] else None,
                usual_percent=tuple(histogram["usual_percent"]) if histogram.get("usual_percent") else None,
            ),
            decision=values["decision"],
        )

    def save(self, folder: Path) -> Path:
        path = Path(folder) / REPORT_JSON
        write_atomically(path, json.dumps(self.to_dict(), indent=1, allow_nan=False).encode())
        return path

    @classmethod
    def load(cls, folder: Path) -> ReportData:
        return cls.from_dict(json.loads((Path(folder) / REPORT_JSON).read_text(encoding="utf-8")))


@dataclasses.dataclass(frozen=True)
class Planes:
    """Three orthogonal planes (axial, coronal, sagittal) through the body, ready to draw.

    Each array is 2D, rows top to bottom as a radiologist looks at the plane (axial: anterior up,
    seen from the feet; coronal and sagittal: head up), on square pixels of ``pixel_mm``.
    """

    pixel_mm: float
    mr: tuple[np.ndarray, np.ndarray, np.ndarray]  # MR intensities (float32)
    sct: tuple[np.ndarray, np.ndarray, np.ndarray]  # HU (float32)
    std: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # HU (float32), samples > 1 only
    body: tuple[np.ndarray, np.ndarray, np.ndarray]  # the MR's body (bool)
    mr_window: tuple[float, float]  # display range of the MR (its 1st and 99.5th percentile in the body)

    def save(self, folder: Path) -> Path:
        arrays: dict[str, np.ndarray] = {"pixel_mm": np.asarray(self.pixel_mm), "mr_window": np.asarray(self.mr_window)}
        for name, planes in (("mr", self.mr), ("sct", self.sct), ("std", self.std), ("body", self.body)):
            if planes is not None:
                for plane_name, plane in zip(PLANE_NAMES, planes, strict=True):
                    arrays[f"{name}_{plane_name}"] = plane
        return write_atomically(Path(folder) / PLANES_NPZ, lambda stream: np.savez_compressed(stream, **arrays))  # type: ignore[arg-type]

    @classmethod
    def load(cls, folder: Path) -> Planes:
        with np.load(Path(folder) / PLANES_NPZ) as data:

            def three(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
                if f"{name}_axial" not in data:
                    return None
                a, c, s = (np.asarray(data[f"{name}_{p}"]) for p in PLANE_NAMES)
                return a, c, s

            mr, sct, body = three("mr"), three("sct"), three("body")
            if mr is None or sct is None or body is None:
                raise ValueError(f"{folder / PLANES_NPZ} lacks the MR, sCT or body planes")
            low, high = (float(v) for v in data["mr_window"])
            return cls(float(data["pixel_mm"]), mr, sct, three("std"), body, (low, high))


def write_atomically(path: Path, content: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``content`` (bytes, or a function that writes to the stream it is given) to ``path``
    through a temporary file in the same folder, fsynced, then renamed over ``path``; the folder is
    fsynced too, so that the new name survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            if isinstance(content, bytes):
                stream.write(content)
            else:
                content(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path
