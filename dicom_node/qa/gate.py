"""The QA gate of one job: the checks, the report, the DICOM objects for the PACS, the policy's decision.

``run_gate`` runs after the sCT is written and before anything is sent. Everything it makes goes
into the job's QA folder (``outbox/job_<N>_qa/``), written atomically, so that a job run again
after a crash writes the same files, and a person's later decision can redraw the report without
the volumes:

- ``report.json``, ``report-planes.npz``: what the report shows (``report_data``);
- ``report.pdf``, ``report-page-<k>.png``: the report (``report``), the PNGs for the review page
  (drawn after the job has moved on: ``draw_report_pages``);
- ``report-dicom.json``, ``mr-header.dcm``: the UIDs, the referenced instances and the MR's patient
  and study attributes, to rebuild ``report.dcm`` with the reviewer's decision;
- ``report.dcm``: the report as an Encapsulated PDF (when the route sends it);
- ``uncertainty.dcm``: the uncertainty as a Parametric Map (``samples > 1``, when the route sends it).

UIDs are derived from the sCT's Series Instance UID (fixed when the job was created), so a re-run
writes the same objects and a destination never receives one twice under different UIDs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, PYDICOM_ROOT_UID, ExplicitVRLittleEndian, generate_uid

from dicom_node.config import QAConfig
from dicom_node.qa.checks import QAInputs, mr_body_on_sct, run_checks
from dicom_node.qa.dicom_outputs import build_report_document, build_uncertainty_map, write_dataset
from dicom_node.qa.layout import MR_HEADER_DCM, REPORT_DCM, REPORT_DICOM_JSON, UNCERTAINTY_DCM, deliverables
from dicom_node.qa.policy import DECISION_TEXT, decide
from dicom_node.qa.report import draw_pages, extract_planes, redraw_report, write_report
from dicom_node.qa.report_data import Histogram, Provenance, ReportData, Review, TissueRow, write_atomically
from dicom_node.qa.results import QAOutcome
from dicom_node.sct_writer import MAX_IS, PATIENT_LEVEL_KEYWORDS, SCTSeries, sop_instance_uid
from sct_model.reference import HU_HISTOGRAM_EDGES, TISSUE_CLASSES, hu_histogram, tissue_fractions
from sct_model.result import SCTResult
from sct_model.volume import Volume

REPORT_TITLE = "QA report of a synthetic CT (sct-node)"
_MR_HEADER_KEYWORDS = (*PATIENT_LEVEL_KEYWORDS, "SpecificCharacterSet", "SeriesInstanceUID", "Modality")


@dataclasses.dataclass(frozen=True)
class GateJob:
    """What the gate needs to know of the job (from its audit row and the node's configuration)."""

    job_id: int
    route: str
    qa_policy: str
    send_qa_report: bool
    send_uncertainty: bool
    sct_series_uid: str
    uid_root: str
    created: dt.datetime  # the job's creation time, local and aware: the objects' creation time
    steps: int
    samples: int
    seed: int
    ae_title: str  # the node's: the Parametric Map's device serial number


@dataclasses.dataclass(frozen=True)
class GateResult:
    outcome: QAOutcome
    decision: str  # policy.SEND, HOLD or REJECT
    deliverables: tuple[str, ...]  # the files of the QA folder that go to the destinations with the sCT
    timings_s: dict[str, float]  # "qa" (the checks), "qa_outputs" (report and DICOM objects), "qa.<check>"


def derived_uid(sct_series_uid: str, what: str, uid_root: str) -> str:
    """A UID of an object that goes with the sCT, fixed by the sCT's series UID and ``what`` it is."""
    return str(generate_uid(prefix=uid_root or PYDICOM_ROOT_UID, entropy_srcs=[sct_series_uid, "|", what]))


def run_gate(
    job: GateJob,
    *,
    mr: Volume,
    mr_headers: Sequence[Dataset],
    result: SCTResult,
    sct_series: SCTSeries,
    qa: QAConfig,
    folder: Path,
) -> GateResult:
    """Check the job's sCT, write its QA folder, and say what the route's policy makes of the verdicts."""
    started = time.perf_counter()
    body = mr_body_on_sct(mr, result)  # full resolution: the checks may look at every n-th voxel
    inputs = QAInputs.of(mr, result, job.samples, body)
    outcome, check_seconds = run_checks(inputs, qa)
    decision = decide(job.qa_policy, outcome.verdict)
    checked = time.perf_counter()

    folder.mkdir(parents=True, exist_ok=True)
    data = _report_data(job, mr_headers, result, sct_series, outcome, inputs, DECISION_TEXT[decision])
    planes = extract_planes(mr, result.hu, result.std_hu, body)
    rendered = write_report(folder, data, planes, pages=False)  # the PNG pages later: draw_pages
    series_number = int(sct_series.dataset(0).SeriesNumber)
    sources = [(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in _unique(mr_headers)] + [
        (sct_series.dataset(0).SOPClassUID, str(sop_instance_uid(job.sct_series_uid, i, job.uid_root)))
        for i in range(len(sct_series))
    ]
    _save_report_sources(folder, job, sources, min(series_number + 1, MAX_IS))
    _save_mr_header(folder, mr_headers[0])
    if job.send_qa_report:
        _write_report_document(folder, rendered.pdf, job.created)
    if job.send_uncertainty and result.std_hu is not None:
        uncertainty = build_uncertainty_map(
            result.std_hu,
            [sct_series.dataset(i) for i in range(len(sct_series))],
            mr_series_reference=(str(mr_headers[0].StudyInstanceUID), str(mr_headers[0].SeriesInstanceUID)),
            series_instance_uid=derived_uid(job.sct_series_uid, "uncertainty-series", job.uid_root),
            sop_instance_uid=derived_uid(job.sct_series_uid, "uncertainty", job.uid_root),
            series_number=min(series_number + 2, MAX_IS),
            created=job.created,
            device_serial_number=job.ae_title,
        )
        write_dataset(uncertainty, folder / UNCERTAINTY_DCM)
    finished = time.perf_counter()
    timings = {"qa": checked - started, "qa_outputs": finished - checked}
    timings.update({f"qa.{name}": seconds for name, seconds in check_seconds.items()})
    sent = deliverables(
        folder, send_qa_report=job.send_qa_report, send_uncertainty=job.send_uncertainty, samples=job.samples
    )
    return GateResult(outcome, decision, tuple(path.name for path in sent), timings)


def draw_report_pages(folder: Path) -> None:
    """The report's PNG pages for the review page, once the job is on its way (not on the sCT's path)."""
    if (folder / REPORT_DICOM_JSON).is_file():
        draw_pages(folder)


def record_review(folder: Path, review: Review, *, rebuild_document: bool) -> None:
    """Draw the report again with a person's decision, and (``rebuild_document``: the job is released and
    its route sends the report) rebuild report.dcm from it."""
    rendered = redraw_report(folder, review)
    if rebuild_document:
        created = dt.datetime.fromisoformat(json.loads((folder / REPORT_DICOM_JSON).read_text())["created"])
        _write_report_document(folder, rendered.pdf, created)


def _write_report_document(folder: Path, pdf: bytes, created: dt.datetime) -> None:
    parameters = json.loads((folder / REPORT_DICOM_JSON).read_text(encoding="utf-8"))
    document = build_report_document(
        pdf,
        mr_header=pydicom.dcmread(folder / MR_HEADER_DCM),
        sources=[(cls, uid) for cls, uid in parameters["sources"]],
        series_instance_uid=parameters["series_instance_uid"],
        sop_instance_uid=parameters["sop_instance_uid"],
        series_number=int(parameters["series_number"]),
        created=created,
        title=REPORT_TITLE,
    )
    write_dataset(document, folder / REPORT_DCM)


def _save_report_sources(folder: Path, job: GateJob, sources: list[tuple[str, str]], series_number: int) -> None:
    parameters = {
        "series_instance_uid": derived_uid(job.sct_series_uid, "qa-report-series", job.uid_root),
        "sop_instance_uid": derived_uid(job.sct_series_uid, "qa-report", job.uid_root),
        "series_number": series_number,
        "created": job.created.isoformat(),
        "sources": [list(source) for source in sources],
    }
    write_atomically(folder / REPORT_DICOM_JSON, json.dumps(parameters).encode())


def _save_mr_header(folder: Path, header: Dataset) -> None:
    """The MR's patient and study attributes (what the report document copies), nothing else."""
    kept = Dataset()
    for keyword in _MR_HEADER_KEYWORDS:
        if keyword in header:
            kept[keyword] = header[keyword]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = header.SOPClassUID
    meta.MediaStorageSOPInstanceUID = header.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    kept.SOPClassUID, kept.SOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
    dataset = FileDataset("", kept, file_meta=meta, preamble=b"\0" * 128)
    write_dataset(dataset, folder / MR_HEADER_DCM)


def _unique(headers: Sequence[Dataset]) -> list[Dataset]:
    seen: set[str] = set()
    unique = []
    for header in headers:
        uid = str(header.SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            unique.append(header)
    return unique


def _report_data(
    job: GateJob,
    mr_headers: Sequence[Dataset],
    result: SCTResult,
    sct_series: SCTSeries,
    outcome: QAOutcome,
    inputs: QAInputs,
    decision_text: str,
) -> ReportData:
    mr = mr_headers[0]
    info = result.info
    scanner = " ".join(str(mr.get(k, "") or "") for k in ("Manufacturer", "ManufacturerModelName")).strip()
    provenance = Provenance(
        job_id=job.job_id,
        patient_name=str(mr.get("PatientName", "") or ""),
        patient_id=str(mr.get("PatientID", "") or ""),
        study_instance_uid=str(mr.StudyInstanceUID),
        mr_series_uid=str(mr.SeriesInstanceUID),
        mr_series_description=str(mr.get("SeriesDescription", "") or ""),
        mr_instances=len(_unique(mr_headers)),
        mr_scanner=scanner,
        sct_series_uid=job.sct_series_uid,
        sct_slices=len(sct_series),
        method=info.method,
        model_name=info.model_name,
        model_version=info.model_version,
        checkpoint_sha256=info.checkpoint_sha256,
        sampler=info.sampler,
        device=info.device,
        steps=job.steps,
        samples=job.samples,
        seed=job.seed,
        route=job.route,
        qa_policy=job.qa_policy,
        computed_at_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    # The voxels the checks looked at (every n-th on a large grid): the table and histogram show the
    # shares hu_plausibility judged.
    hu, inside = inputs.sct.array, inputs.mr_body.array.astype(bool)
    shares = tissue_fractions(hu, inside)
    stats = result.reference.tissues if result.reference is not None else None
    tissues = tuple(
        TissueRow(
            name=tissue.name,
            low_hu=tissue.low_hu,
            high_hu=tissue.high_hu,
            sct_percent=100.0 * float(shares[i]),
            training_min_percent=100.0 * stats.ct_fraction_min[i] if stats is not None else None,
            training_max_percent=100.0 * stats.ct_fraction_max[i] if stats is not None else None,
            usual_min_percent=100.0 * stats.sct_fraction_min[i] if stats is not None else None,
            usual_max_percent=100.0 * stats.sct_fraction_max[i] if stats is not None else None,
        )
        for i, tissue in enumerate(TISSUE_CLASSES)
    )
    histogram = Histogram(
        edges_hu=HU_HISTOGRAM_EDGES,
        sct_percent=tuple(100.0 * float(v) for v in hu_histogram(hu, inside)),
        training_percent=tuple(100.0 * v for v in stats.ct_histogram_mean) if stats is not None else None,
        usual_percent=tuple(100.0 * v for v in stats.sct_histogram_mean) if stats is not None else None,
    )
    return ReportData(provenance, outcome, tissues, histogram, decision_text)
