"""``sct-node audit``: the audit database as a physicist reads it, and the hash chain's verdict
(identifiers are shown here, on purpose: this is the reviewer's tool, not a log)."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from dicom_node.audit.db import AuditDB
from dicom_node.audit.models import EventRow, InstanceRow, JobRow, QAResultRow, SendRow, SeriesRow
from dicom_node.audit.verify import restore_head, verify_chain
from dicom_node.config import Config
from dicom_node.errors import AuditChainError
from dicom_node.text_safety import escape_controls

_MAX_PRINTED = 200  # chain problems printed by `audit verify`


def open_existing(config: Config) -> AuditDB | None:
    url = config.audit.url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
        print(
            f"sct-node audit: no audit database at {url} (has the node run with this configuration?)", file=sys.stderr
        )
        return None
    return AuditDB(url)


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[escape_controls(str(c), keep_newlines=False) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def job_rows(db: AuditDB, limit: int) -> list[tuple[object, ...]]:
    with db.reading() as session:
        jobs = session.execute(
            select(JobRow, SeriesRow)
            .join(SeriesRow, JobRow.series_id == SeriesRow.id)
            .order_by(JobRow.id.desc())
            .limit(limit)
        ).all()
        rows: list[tuple[object, ...]] = []
        for job, series in jobs:
            total = sum(v for k, v in job.timings_s.items() if "." not in k)
            rows.append(
                (
                    job.id,
                    job.state,
                    job.qa_verdict or "-",
                    series.patient_id,
                    series.series_description[:32],
                    series.instance_count,
                    job.sct_instance_count or "-",
                    job.method,
                    _when(job.created_at),
                    _when(job.finished_at),
                    f"{total:.1f}",
                )
            )
        return rows


def print_jobs(config: Config, *, limit: int = 50) -> int:
    db = open_existing(config)
    if db is None:
        return 1
    rows = job_rows(db, limit)
    if not rows:
        print("no jobs yet")
        return 0
    print(
        table(
            (
                "job",
                "state",
                "QA",
                "patient",
                "series",
                "MR",
                "sCT",
                "method",
                "created (UTC)",
                "finished (UTC)",
                "seconds",
            ),
            rows,
        )
    )
    return 0


def print_series(config: Config, *, limit: int = 50) -> int:
    db = open_existing(config)
    if db is None:
        return 1
    with db.reading() as session:
        series_list = session.scalars(select(SeriesRow).order_by(SeriesRow.id.desc()).limit(limit)).all()
        rows = [
            (
                s.id,
                s.state,
                s.patient_id,
                s.series_description[:32],
                s.calling_aet,
                s.instance_count,
                _when(s.last_received_at),
                s.reason[:80],
            )
            for s in series_list
        ]
    if not rows:
        print("no series yet")
        return 0
    print(
        table(("series", "state", "patient", "description", "from", "instances", "last received (UTC)", "reason"), rows)
    )
    return 0


def describe_job(db: AuditDB, job_id: int) -> str | None:
    """The whole history of a job, as text (None if there is no such job)."""
    with db.reading() as session:
        job = session.get(JobRow, job_id)
        if job is None:
            return None
        series = job.series
        counts = session.execute(
            select(func.count(), func.sum(case((InstanceRow.duplicate, 1), else_=0))).where(
                InstanceRow.series_id == series.id
            )
        ).one()
        lines = [
            f"job {job.id}: {job.state}" + (f" ({job.error})" if job.error else ""),
            f"  patient         {series.patient_name} ({series.patient_id})",
            f"  study           {series.study_instance_uid}",
            f"  MR series       {series.series_description!r} / {series.protocol_name!r}",
            f"                  {series.series_instance_uid}, {series.instance_count} instances "
            f"({counts[0]} received, {counts[1] or 0} duplicates) from {series.calling_aet}",
            f"  route           {job.route_name} -> {', '.join(job.destinations)}",
            f"  method          {job.method} {job.model_name} {job.model_version} on {job.device or '-'}",
            f"  checkpoint      {job.checkpoint_path or '-'} sha256 {job.checkpoint_sha256 or '-'}",
            f"  sampling        steps {job.steps}, samples {job.samples}, seed {job.seed}",
            f"  sCT series      {job.sct_series_uid}, {job.sct_instance_count} instances in {job.output_dir or '-'}",
        ]
        if job.uncertainty_path:
            lines.append(
                f"  uncertainty     mean {job.uncertainty_mean_hu:.1f} HU, p95 {job.uncertainty_p95_hu:.1f} HU "
                f"(std in the body) in {job.uncertainty_path}"
            )
        lines.append("  timings (s)     " + ", ".join(f"{k} {v:.2f}" for k, v in job.timings_s.items() if "." not in k))
        lines += qa_table_lines(session, job.id)
        if job.qa_dir:
            lines.append(f"  QA report       {job.qa_dir}/report.pdf (policy {job.qa_policy})")
        if job.review_decision:
            when = f"{job.reviewed_at:%Y-%m-%d %H:%M:%S}" if job.reviewed_at else "-"
            lines.append(
                f"  review          {job.review_decision} by {job.reviewed_by} at {when} UTC: {job.review_reason}"
            )
        sends = session.scalars(select(SendRow).where(SendRow.job_id == job_id).order_by(SendRow.id)).all()
        if sends:
            lines.append("  sends")
            for send in sends:
                lines.append(
                    f"    {_when(send.started_at)} attempt {send.attempt} {send.destination}: "
                    f"{'OK' if send.ok else 'FAILED'} {send.instances_sent} sent, "
                    f"{send.instances_failed} failed. {send.message}"
                )
        events = session.scalars(
            select(EventRow)
            .where(or_(EventRow.job_id == job_id, (EventRow.series_id == series.id) & EventRow.job_id.is_(None)))
            .order_by(EventRow.id)
        ).all()
        lines.append("  history (UTC)")
        for event in events:
            change = f"{event.from_state or '·'} -> {event.to_state}" if event.to_state else ""
            lines.append(
                f"    {event.at.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}  {event.kind:<15} {change:<24} {event.message}"
            )
        # One line per fact: text from scanners (names, descriptions, messages) cannot add or hide lines.
        return "\n".join(escape_controls(line, keep_newlines=False) for line in lines)


def qa_table_lines(session: Session, job_id: int) -> list[str]:
    """The job's QA checks as indented lines: check, quantity, value, levels, verdict, note."""
    results = session.scalars(select(QAResultRow).where(QAResultRow.job_id == job_id).order_by(QAResultRow.id)).all()
    if not results:
        return ["  QA              not run"]
    verdicts: dict[str, str] = {}
    for row in results:
        verdicts[row.check] = max(verdicts.get(row.check, "pass"), row.verdict, key=("pass", "warn", "fail").index)
    overall = max(verdicts.values(), key=("pass", "warn", "fail").index)
    rows = []
    for row in results:
        sign = ">" if row.worse == "above" else "<"
        levels = ", ".join(
            f"{name} {sign} {level:g}"
            for name, level in (("warn", row.warn_at), ("fail", row.fail_at))
            if level is not None
        )
        value = "-" if row.value is None else f"{row.value:.3g}{' ' + row.unit if row.unit else ''}"
        rows.append((row.check, row.quantity, value, levels or "-", row.verdict.upper(), row.note))
    text = table(("check", "quantity", "value", "levels", "verdict", "note"), rows)
    return [f"  QA              {overall.upper()} (" + ", ".join(f"{c} {v}" for c, v in verdicts.items()) + ")"] + [
        "    " + line for line in text.splitlines()
    ]


def print_job(config: Config, job_id: int) -> int:
    db = open_existing(config)
    if db is None:
        return 1
    text = describe_job(db, job_id)
    if text is None:
        print(f"sct-node audit show: no job {job_id}", file=sys.stderr)
        return 1
    print(text)
    return 0


def print_verify(config: Config) -> int:
    """``sct-node audit verify``: 0 when the chain is intact, 1 when not (or no database)."""
    db = open_existing(config)
    if db is None:
        return 1
    try:
        report = verify_chain(db)
    finally:
        db.dispose()
    if report.sealed_at is not None:
        print(
            f"note: {report.sealed_events} event(s) from before the hash chain were sealed at migration on "
            f"{report.sealed_at:%Y-%m-%d %H:%M:%S} UTC; the chain covers them from then on only"
        )
    if report.ok:
        print(f"OK: audit chain intact, {report.events} events, head seq {report.head_seq} sha256 {report.head_hash}")
        return 0
    print(
        f"BROKEN: {len(report.problems)} problem(s) in the audit chain of {report.events} events "
        f"(head seq {report.head_seq} sha256 {report.head_hash})",
    )
    for problem in report.problems[:_MAX_PRINTED]:
        print(f"  {problem}")
    if len(report.problems) > _MAX_PRINTED:
        print(f"  ... and {len(report.problems) - _MAX_PRINTED} more")
    return 1


def print_restore_head(config: Config) -> int:
    """``sct-node audit restore-head``: 0 when restored, 1 when not (with why)."""
    db = open_existing(config)
    if db is None:
        return 1
    try:
        print(restore_head(db))
        return 0
    except AuditChainError as exc:
        print(f"sct-node audit restore-head: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
