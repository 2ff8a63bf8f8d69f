"""The QA folder of a job (``outbox/job_<N>_qa/``, beside the sCT's ``outbox/job_<N>/``): its file
names, and which of its objects go to the destinations with the sCT. Light to import (the sender,
the job state machine and the review page use it)."""

from __future__ import annotations

from pathlib import Path

REPORT_DCM = "report.dcm"  # the QA report, Encapsulated PDF
UNCERTAINTY_DCM = "uncertainty.dcm"  # the uncertainty map, Parametric Map (samples > 1)
REPORT_DICOM_JSON = "report-dicom.json"  # UIDs and references to rebuild report.dcm after a review
MR_HEADER_DCM = "mr-header.dcm"  # the MR's patient and study attributes, for the same
REPORT_PDF = "report.pdf"
PAGE_PNG = "report-page-{}.png"


def qa_folder(outbox: Path, job_id: int) -> Path:
    return Path(outbox) / f"job_{job_id}_qa"


def deliverables(folder: Path, *, send_qa_report: bool, send_uncertainty: bool, samples: int) -> list[Path]:
    """The QA objects that go to the destinations with the sCT (they exist once the gate has run)."""
    wanted = [REPORT_DCM] if send_qa_report else []
    if send_uncertainty and samples > 1:
        wanted.append(UNCERTAINTY_DCM)
    return [Path(folder) / name for name in wanted]
