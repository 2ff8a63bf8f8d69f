"""The job state machine. The state lives in the audit database; every change is an event row.

    QUEUED ──► RUNNING ──► SENDING ──► DONE
       ▲          │  │        ▲ │  ▲
       │          │  │ (QA)   │ ▼  │ (resend)
       └──────── FAILED ◄─────┼─┘──┘
                  │  │        │ (release)
                  │  └─────► HELD ──► REJECTED (reject; or the block policy, straight from RUNNING)

After the sCT is written, the QA gate (dicom_node.qa) decides: SENDING, HELD (a person releases it:
SENDING, once; or rejects it: REJECTED, never sent) or REJECTED. A job is sent only when its QA
cleared it (``cleared_for_sending``): a resend of a FAILED job whose QA never finished computes it
again, QA included.

A restart after a crash (kill -9) puts RUNNING jobs back to QUEUED: the run is repeated with the
same seed and the same pre-assigned UIDs, and nothing had been sent yet (sending starts only once
the whole sCT series is in the outbox). SENDING jobs simply go on sending: a destination that got
part of the series receives the same SOP instances again, never a second series.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Sequence
from pathlib import Path

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.audit import JobRow, JobState, SeriesRow, add_event, utcnow
from dicom_node.config import ModelConfig
from dicom_node.errors import JobStateError

ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.SENDING, JobState.HELD, JobState.REJECTED, JobState.FAILED, JobState.QUEUED}),
    JobState.SENDING: frozenset({JobState.DONE, JobState.FAILED, JobState.QUEUED}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.SENDING}),
    JobState.DONE: frozenset({JobState.SENDING, JobState.QUEUED}),
    JobState.HELD: frozenset({JobState.SENDING, JobState.REJECTED}),  # a person's release or rejection
    JobState.REJECTED: frozenset(),  # final: a rejected sCT is never sent
}
FINISHED_STATES = (JobState.DONE, JobState.FAILED, JobState.REJECTED)

_claim_lock = threading.Lock()


def transition(session: Session, job: JobRow, to_state: str, message: str, **detail: object) -> None:
    """Move ``job`` to ``to_state`` (if the state machine allows it) and write the event row."""
    if to_state not in ALLOWED_TRANSITIONS.get(job.state, frozenset()):
        raise JobStateError(f"job {job.id}: {job.state} -> {to_state} is not allowed")
    from_state, job.state = job.state, to_state
    job.updated_at = utcnow()
    if to_state in FINISHED_STATES:
        job.finished_at = job.updated_at
    elif job.finished_at is not None:
        job.finished_at = None
    add_event(
        session,
        "job_state",
        message,
        job_id=job.id,
        series_id=job.series_id,
        from_state=from_state,
        to_state=to_state,
        detail=dict(detail),
    )


def create_job(
    session: Session,
    series: SeriesRow,
    *,
    route_name: str,
    destinations: Sequence[str],
    model: ModelConfig,
    uid_root: str,
    qa_policy: str = "hold",
    send_qa_report: bool = True,
    send_uncertainty: bool = True,
) -> JobRow:
    """A QUEUED job for ``series``; its sCT SeriesInstanceUID is fixed now, once and for all, and so
    are the route's QA policy and what goes with the sCT."""
    now = utcnow()
    job = JobRow(
        series_id=series.id,
        state=JobState.QUEUED,
        route_name=route_name,
        destinations=list(destinations),
        created_at=now,
        updated_at=now,
        method=model.method,
        checkpoint_path=str(model.checkpoint) if model.method == "diffusion" else "",
        steps=model.steps,
        samples=model.samples,
        seed=model.seed,
        sct_series_uid=generate_uid(
            prefix=uid_root or PYDICOM_ROOT_UID, entropy_srcs=["sct-series", series.series_instance_uid]
        ),
        timings_s={},
        qa_policy=qa_policy,
        send_qa_report=send_qa_report,
        send_uncertainty=send_uncertainty,
    )
    session.add(job)
    session.flush()
    add_event(
        session,
        "job_state",
        f"job created by route {route_name} for {', '.join(destinations)}",
        job_id=job.id,
        series_id=series.id,
        to_state=JobState.QUEUED,
    )
    return job


def claim_next_queued(session: Session) -> JobRow | None:
    """The oldest QUEUED job, now RUNNING (or None). Safe with several worker threads."""
    with _claim_lock:
        job = session.scalars(
            select(JobRow)
            .where(JobRow.state == JobState.QUEUED)
            .order_by(JobRow.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if job is None:
            return None
        job.run_attempts += 1
        transition(session, job, JobState.RUNNING, f"run attempt {job.run_attempts}")
        return job


def jobs_due_for_sending(session: Session, now: dt.datetime | None = None) -> list[int]:
    now = now or utcnow()
    return list(
        session.scalars(
            select(JobRow.id)
            .where(JobRow.state == JobState.SENDING)
            .where((JobRow.next_send_at.is_(None)) | (JobRow.next_send_at <= now))
            .order_by(JobRow.id)
        )
    )


def recover_after_restart(session: Session) -> dict[str, int]:
    """At start-up: RUNNING jobs go back to QUEUED; SENDING jobs are due now. Returns the counts."""
    running = list(session.scalars(select(JobRow).where(JobRow.state == JobState.RUNNING)))
    for job in running:
        transition(session, job, JobState.QUEUED, "node restarted while the job was running: queued again")
    sending = list(session.scalars(select(JobRow).where(JobRow.state == JobState.SENDING)))
    for job in sending:
        job.next_send_at = None
        add_event(session, "resumed", "node restarted while the job was sending: sending resumes", job_id=job.id)
    return {"requeued": len(running), "resumed_sending": len(sending)}


def request_resend(session: Session, job_id: int) -> str:
    """Manual resend (``sct-node resend JOB``): a FAILED or DONE job is sent again.

    If its sCT is still in the outbox it goes straight to SENDING; otherwise the job is queued to
    be computed again (same seed and UIDs, so the destination sees the same series).
    """
    job = session.get(JobRow, job_id)
    if job is None:
        raise JobStateError(f"no job {job_id}")
    if job.state in JobState.UNFINISHED:
        raise JobStateError(f"job {job_id} is {job.state}: it is still being processed")
    if job.state == JobState.HELD:
        raise JobStateError(f"job {job_id} is HELD by its QA: a person releases it (sct-node review release)")
    if job.state == JobState.REJECTED:
        raise JobStateError(
            f"job {job_id} was REJECTED ({job.review_reason or job.error}): a rejected sCT is never sent"
        )
    job.send_attempts = 0
    job.next_send_at = None
    job.error = ""
    if cleared_for_sending(job) and _outbox_complete(job):
        transition(session, job, JobState.SENDING, "manual resend requested")
        return JobState.SENDING
    why = "the sCT is no longer in the outbox" if cleared_for_sending(job) else "its QA never cleared it"
    transition(session, job, JobState.QUEUED, f"manual resend requested; {why}: recompute")
    return JobState.QUEUED


def cleared_for_sending(job: JobRow) -> bool:
    """Whether the job's QA let its sCT go: the route's policy sent it, or a person released it."""
    return job.qa_decision == "send" or job.review_decision == "released"


def qa_objects(job: JobRow) -> list[Path]:
    """The QA objects that go with the job's sCT (fixed when its checks ran)."""
    return [Path(job.qa_dir) / name for name in job.qa_deliverables or []]


def _outbox_complete(job: JobRow) -> bool:
    folder = Path(job.output_dir) if job.output_dir else None
    if folder is None or not (folder.is_dir() and len(list(folder.glob("*.dcm"))) == job.sct_instance_count > 0):
        return False
    return all(path.is_file() for path in qa_objects(job))
