"""A person's decision on a job the QA held: ``sct-node review list | show | release | reject``.

Releasing sends the held sCT (and what goes with it) exactly once: the job moves from HELD to
SENDING in one transaction that locks it, so a second release finds it SENDING and is refused.
Rejecting moves it to REJECTED, which is final. Either way the report is drawn again with the
decision (who, when, why), the released report is rebuilt as the DICOM object the PACS receives,
and the decision is a hash-chained audit event naming the person and the reason. The decision is
taken in the audit database, so it works the same whether the node is running (it picks a released
job up within seconds) or not.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sqlalchemy import select

from dicom_node import jobs
from dicom_node.audit import AuditDB, JobRow, JobState, QAResultRow, SeriesRow, add_event, utcnow
from dicom_node.audit.report import open_existing, qa_table_lines, table
from dicom_node.config import Config
from dicom_node.errors import JobStateError
from dicom_node.qa.gate import draw_report_pages, record_review
from dicom_node.qa.layout import PAGE_PNG, REPORT_PDF
from dicom_node.qa.report_data import Review
from dicom_node.text_safety import escape_controls

RELEASED, REJECTED = "released", "rejected"
MAX_NAME_CHARS = 64
MAX_REASON_CHARS = 1024


class ReviewError(JobStateError):
    """A decision that cannot be taken (no such job, not HELD, no name or reason); the message says why."""


def _checked(by: str, reason: str) -> tuple[str, str]:
    by, reason = escape_controls(by.strip(), keep_newlines=False), escape_controls(reason.strip(), keep_newlines=False)
    if not by:
        raise ReviewError("--by: the name of the person who decides is required")
    if len(by) > MAX_NAME_CHARS:
        raise ReviewError(f"--by: at most {MAX_NAME_CHARS} characters")
    if not reason:
        raise ReviewError("--reason: the reason for the decision is required")
    if len(reason) > MAX_REASON_CHARS:
        raise ReviewError(f"--reason: at most {MAX_REASON_CHARS} characters")
    return by, reason


def take_decision(db: AuditDB, job_id: int, decision: str, *, by: str, reason: str) -> str:
    """Release (``RELEASED``) or reject (``REJECTED``) the HELD job ``job_id``; returns its new state.

    Raises ReviewError when the job does not exist or is not HELD, or the name or reason is missing.
    """
    if decision not in (RELEASED, REJECTED):
        raise ValueError(f"decision must be {RELEASED!r} or {REJECTED!r}")
    by, reason = _checked(by, reason)
    with db.session() as session:
        job = session.get(JobRow, job_id, with_for_update=True)
        if job is None:
            raise ReviewError(f"no job {job_id}")
        if job.state != JobState.HELD:
            raise ReviewError(f"job {job_id} is {job.state}: only a HELD job can be released or rejected")
        now = utcnow()
        review = Review(decision, by, reason, now.isoformat(timespec="seconds") + "+00:00")
        record_review(Path(job.qa_dir), review, rebuild_document=decision == RELEASED and job.send_qa_report)
        job.review_decision, job.reviewed_by, job.review_reason, job.reviewed_at = decision, by, reason, now
        add_event(
            session,
            "review",
            f"{decision} by {by}: {reason}",
            job_id=job.id,
            series_id=job.series_id,
            detail={"decision": decision, "by": by, "reason": reason, "qa_verdict": job.qa_verdict},
        )
        if decision == RELEASED:
            job.send_attempts, job.next_send_at, job.error = 0, None, ""
            jobs.transition(session, job, JobState.SENDING, f"released by {by}: {reason}")
        else:
            job.error = f"rejected by {by}: {reason}"
            jobs.transition(session, job, JobState.REJECTED, job.error)
        return job.state


# --- the command line -------------------------------------------------------------------------------


def print_list(config: Config, *, include_decided: bool = False, limit: int = 50) -> int:
    db = open_existing(config)
    if db is None:
        return 1
    with db.reading() as session:
        query = select(JobRow, SeriesRow).join(SeriesRow, JobRow.series_id == SeriesRow.id)
        if include_decided:
            query = query.where((JobRow.state == JobState.HELD) | (JobRow.review_decision != ""))
        else:
            query = query.where(JobRow.state == JobState.HELD)
        found = session.execute(query.order_by(JobRow.id.desc()).limit(limit)).all()
        rows = []
        for job, series in found:
            flagged = session.scalars(
                select(QAResultRow)
                .where(QAResultRow.job_id == job.id, QAResultRow.verdict != "pass")
                .order_by(QAResultRow.id)
            ).all()
            why = ", ".join(sorted({f"{r.check} {r.verdict}" for r in flagged})) or "-"
            decided = f"{job.review_decision} by {job.reviewed_by}" if job.review_decision else ""
            rows.append(
                (
                    job.id,
                    job.state,
                    series.patient_id,
                    series.series_description[:32],
                    job.qa_verdict or "-",
                    why[:60],
                    f"{job.updated_at:%Y-%m-%d %H:%M}",
                    decided,
                )
            )
    db.dispose()
    if not rows:
        print("no job is held for review" if not include_decided else "no job was held for review")
        return 0
    print(table(("job", "state", "patient", "series", "QA", "why", "since (UTC)", "decision"), rows))
    if any(row[1] == JobState.HELD for row in rows):
        print(
            "\nsct-node review show JOB: the checks and the report; "
            "then sct-node review release | reject JOB --by NAME --reason TEXT"
        )
    return 0


def print_show(config: Config, job_id: int) -> int:
    db = open_existing(config)
    if db is None:
        return 1
    with db.reading() as session:
        job = session.get(JobRow, job_id)
        if job is None:
            print(f"sct-node review show: no job {job_id}", file=sys.stderr)
            return 1
        series = job.series
        lines = [
            f"job {job.id}: {job.state}, QA {job.qa_verdict or 'not run'} "
            f"(route {job.route_name}, policy {job.qa_policy})",
            f"  patient         {series.patient_name} ({series.patient_id})",
            f"  MR series       {series.series_description!r}, {series.instance_count} instances "
            f"from {series.calling_aet}",
            f"  model           {job.method} {job.model_name} {job.model_version}, checkpoint sha256 "
            f"{job.checkpoint_sha256 or '-'}",
            f"  sCT             {job.sct_instance_count} slices in {job.output_dir or '-'}",
            *qa_table_lines(session, job.id),
        ]
        if job.qa_dir:
            folder = Path(job.qa_dir)
            if folder.is_dir():
                draw_report_pages(folder)  # when the node stopped before it drew them
            pages = sorted(folder.glob(PAGE_PNG.format("*")))
            lines.append(
                f"  report          {folder / REPORT_PDF}" + (f" ({len(pages)} page PNGs beside it)" if pages else "")
            )
        if job.review_decision:
            when = f"{job.reviewed_at:%Y-%m-%d %H:%M:%S}" if job.reviewed_at else "-"
            lines.append(
                f"  decision        {job.review_decision} by {job.reviewed_by} at {when} UTC: {job.review_reason}"
            )
        held = job.state == JobState.HELD
    db.dispose()
    print("\n".join(escape_controls(line, keep_newlines=False) for line in lines))
    if held:
        source = f" --config {config.source}" if config.source else ""
        print(
            f"\nrelease (send it, once): sct-node review release {job_id} --by NAME --reason TEXT{source}\n"
            f"reject (never sent):     sct-node review reject {job_id} --by NAME --reason TEXT{source}"
        )
    return 0


def run_decision(config: Config, job_id: int, decision: str, *, by: str, reason: str) -> int:
    db = open_existing(config)
    if db is None:
        return 1
    command = "release" if decision == RELEASED else "reject"
    try:
        state = take_decision(db, job_id, decision, by=by, reason=reason)
    except (ReviewError, FileNotFoundError, ValueError) as exc:
        print(f"sct-node review {command}: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    if state == JobState.SENDING:
        print(f"job {job_id}: released by {by}; SENDING (a running node sends it within seconds, once)")
    else:
        print(f"job {job_id}: REJECTED by {by}; it will never be sent")
    return 0
