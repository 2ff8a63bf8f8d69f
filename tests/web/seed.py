"""An audit database with jobs in the states the review page shows, made through the node's own
state machine (``jobs.create_job``, ``jobs.transition``): a HELD job with its QA results and a real
QA report folder, a FAILED job, a DONE job with its sends, and series without jobs."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from dicom_node import jobs
from dicom_node.audit import (
    AuditDB,
    JobRow,
    QAResultRow,
    SendInstanceRow,
    SendRow,
    SeriesRow,
    SeriesState,
    add_event,
    utcnow,
)
from dicom_node.config import Config
from dicom_node.qa.report import extract_planes, write_report
from tests.qa.test_report import report_data, volumes

PATIENT_NAME = "Zebedee^Quintus"
PATIENT_ID = "PID-7734-WEB"


@dataclasses.dataclass(frozen=True)
class Seeded:
    held: int
    failed: int
    done: int
    not_routed_series: int


def add_series(db: AuditDB, uid: str, *, state: str = SeriesState.ROUTED, description: str = "T1 MPRAGE 3D",
               patient_name: str = PATIENT_NAME, patient_id: str = PATIENT_ID, reason: str = "") -> int:  # fmt: skip
    now = utcnow()
    with db.session() as session:
        series = SeriesRow(
            series_instance_uid=uid, study_instance_uid=uid + ".9", patient_id=patient_id, patient_name=patient_name,
            modality="MR", series_description=description, calling_aet="MR_SIMULATOR", first_received_at=now,
            last_received_at=now, instance_count=176, state=state, reason=reason, closed_at=now,
        )  # fmt: skip
        session.add(series)
        session.flush()
        add_event(session, "series_state", f"-> {state}", series_id=series.id, to_state=state)
        return series.id


def add_job(db: AuditDB, config: Config, series_id: int, path: list[str], *, qa_dir: Path | None = None,
            created: dt.datetime | None = None) -> int:  # fmt: skip
    """A job of ``series_id`` moved through the states of ``path`` (after QUEUED)."""
    route = config.routes[0]
    with db.session() as session:
        series = session.get(SeriesRow, series_id)
        assert series is not None
        job = jobs.create_job(
            session, series, route_name=route.name, destinations=route.destinations, model=config.model,
            uid_root=config.node.uid_root, qa_policy="hold", send_qa_report=False, send_uncertainty=False,
        )  # fmt: skip
        if created is not None:
            job.created_at = created
        for state in path:
            jobs.transition(session, job, state, f"test: -> {state}")
        job.sct_instance_count = 40
        if qa_dir is not None:
            job.qa_dir = str(qa_dir)
        return job.id


def write_qa_folder(folder: Path) -> None:
    """A real QA folder (report.json, planes, PDF and PNG pages) of the synthetic report of tests/qa."""
    write_report(folder, report_data(), extract_planes(*volumes()), pages=True)


def add_qa_results(db: AuditDB, job_id: int, verdict: str) -> None:
    outcome = report_data().outcome
    with db.session() as session:
        job = session.get(JobRow, job_id)
        assert job is not None
        job.qa_verdict = verdict
        for m in outcome.measurements:
            session.add(
                QAResultRow(
                    job_id=job_id, check=m.check, quantity=m.quantity, value=m.value, unit=m.unit, warn_at=m.warn_at,
                    fail_at=m.fail_at, worse=m.worse, verdict=m.verdict, note=m.note, measured_at=utcnow(),
                )
            )  # fmt: skip


def add_send(db: AuditDB, job_id: int, destination: str, *, ok: bool, attempt: int = 1, message: str = "") -> None:
    """A send of 40 instances: all stored, or the first refused (0xA700), one unanswered, the rest stored."""
    now = utcnow()
    with db.session() as session:
        send = SendRow(
            job_id=job_id, destination=destination, attempt=attempt, started_at=now, finished_at=now, ok=ok,
            instances_sent=40 if ok else 38, instances_failed=0 if ok else 2, message=message,
        )  # fmt: skip
        session.add(send)
        session.flush()
        statuses = [0] * 40 if ok else [0xA700, None, *([0] * 38)]
        session.add_all(
            SendInstanceRow(send_id=send.id, sop_instance_uid=f"1.2.826.0.1.77.{job_id}.{i}", status=status)
            for i, status in enumerate(statuses)
        )


def seed(db: AuditDB, config: Config, folder: Path) -> Seeded:
    from dicom_node.audit import JobState

    qa_dir = folder / "job_qa"
    write_qa_folder(qa_dir)
    destination = config.routes[0].destinations[0]
    done = add_job(db, config, add_series(db, "1.2.826.0.1.1"), [JobState.RUNNING, JobState.SENDING, JobState.DONE])
    add_send(db, done, destination, ok=True, message=f"{destination}: 40 instance(s) stored")
    failed = add_job(db, config, add_series(db, "1.2.826.0.1.2"), [JobState.RUNNING, JobState.SENDING, JobState.FAILED])
    add_send(db, failed, destination, ok=False, attempt=3, message="association rejected")
    porcine = add_series(db, "1.2.826.0.1.3", description="T2 PORCINE")
    held = add_job(db, config, porcine, [JobState.RUNNING, JobState.HELD], qa_dir=qa_dir)
    add_qa_results(db, held, "fail")
    not_routed = add_series(db, "1.2.826.0.1.4", state=SeriesState.QUARANTINED, description="LOCALIZER",
                            reason="fewer than 4 slices")  # fmt: skip
    return Seeded(held=held, failed=failed, done=done, not_routed_series=not_routed)
