"""What the review page shows, read from the audit database: one function per page, no HTML.

The worklist reads one page of jobs with their series in one query (indexed on state and creation
time) and the latest send result per destination of those jobs in a second; it never loads the
whole table, so 10,000 jobs cost what 100 do (benchmarks/web.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from dicom_node.audit import (
    EventRow,
    JobRow,
    JobState,
    QAResultRow,
    SendInstanceRow,
    SendRow,
    SeriesRow,
    SeriesState,
)
from dicom_node.qa.layout import PAGE_PNG

PAGE_SIZE = 100
JOB_STATES = (
    JobState.HELD, JobState.QUEUED, JobState.RUNNING, JobState.SENDING, JobState.DONE, JobState.FAILED,
    JobState.REJECTED, JobState.QUARANTINED,
)  # fmt: skip
VERDICTS = ("pass", "warn", "fail")
SERIES_STATES = (SeriesState.RECEIVING, SeriesState.ROUTED, SeriesState.NOT_ROUTED, SeriesState.QUARANTINED)


@dataclasses.dataclass(frozen=True)
class WorklistFilter:
    """The worklist's filters, from the query string (every one optional)."""

    state: str = ""
    verdict: str = ""
    route: str = ""
    day: dt.date | None = None  # jobs created on this UTC day
    page: int = 1

    def query_string(self, **changes: object) -> str:
        values = dataclasses.asdict(dataclasses.replace(self, **changes))  # type: ignore[arg-type]
        pairs = [(k, str(v)) for k, v in values.items() if v not in ("", None) and not (k == "page" and v == 1)]
        return "&".join(f"{k}={v}" for k, v in pairs)


@dataclasses.dataclass(frozen=True)
class SendStatus:
    destination: str
    ok: bool | None  # None: not tried yet
    attempt: int
    message: str
    at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class WorklistRow:
    job: JobRow
    series: SeriesRow
    sends: tuple[SendStatus, ...]


@dataclasses.dataclass(frozen=True)
class Worklist:
    rows: tuple[WorklistRow, ...]
    total: int
    held: int
    routes: tuple[str, ...]
    page: int
    pages: int


def worklist(session: Session, wanted: WorklistFilter) -> Worklist:
    """One page of jobs: HELD first, then newest first; with each job's series and latest sends."""
    query = select(JobRow, SeriesRow).join(SeriesRow, JobRow.series_id == SeriesRow.id)
    conditions = []
    if wanted.state:
        conditions.append(JobRow.state == wanted.state)
    if wanted.verdict:
        conditions.append(JobRow.qa_verdict == wanted.verdict)
    if wanted.route:
        conditions.append(JobRow.route_name == wanted.route)
    if wanted.day is not None:
        start = dt.datetime.combine(wanted.day, dt.time())
        conditions.append(and_(JobRow.created_at >= start, JobRow.created_at < start + dt.timedelta(days=1)))
    if conditions:
        query = query.where(*conditions)
    total = session.scalar(select(func.count()).select_from(JobRow).where(*conditions)) or 0
    pages = max(1, -(-total // PAGE_SIZE))
    page = min(max(1, wanted.page), pages)
    held_first = case((JobRow.state == JobState.HELD, 0), else_=1)
    found = session.execute(
        query.order_by(held_first, JobRow.created_at.desc(), JobRow.id.desc())
        .limit(PAGE_SIZE)
        .offset((page - 1) * PAGE_SIZE)
    ).all()
    sends = latest_sends(session, [job.id for job, _ in found])
    rows = tuple(
        WorklistRow(
            job, series, tuple(sends.get((job.id, d)) or SendStatus(d, None, 0, "", None) for d in job.destinations)
        )
        for job, series in found
    )
    held = session.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == JobState.HELD)) or 0
    routes = tuple(session.scalars(select(JobRow.route_name).distinct().order_by(JobRow.route_name)))
    return Worklist(rows, total, held, routes, page, pages)


def latest_sends(session: Session, job_ids: list[int]) -> dict[tuple[int, str], SendStatus]:
    """The latest send attempt of each (job, destination) among ``job_ids``."""
    if not job_ids:
        return {}
    newest = (
        select(SendRow.job_id, SendRow.destination, func.max(SendRow.id).label("id"))
        .where(SendRow.job_id.in_(job_ids))
        .group_by(SendRow.job_id, SendRow.destination)
        .subquery()
    )
    rows = session.scalars(select(SendRow).join(newest, SendRow.id == newest.c.id)).all()
    return {
        (r.job_id, r.destination): SendStatus(r.destination, r.ok, r.attempt, r.message, r.finished_at) for r in rows
    }


@dataclasses.dataclass(frozen=True)
class JobPage:
    job: JobRow
    series: SeriesRow
    qa_results: tuple[QAResultRow, ...]
    sends: tuple[SendRow, ...]
    events: tuple[EventRow, ...]
    report_pages: tuple[int, ...]  # the numbers of the report's PNG pages that exist
    instances: dict[int, tuple[SendInstanceRow, ...]]  # each send's per-instance answers, refused first


def job_page(session: Session, job_id: int) -> JobPage | None:
    job = session.get(JobRow, job_id)
    if job is None:
        return None
    series = session.get(SeriesRow, job.series_id)
    assert series is not None
    qa_results = tuple(
        session.scalars(select(QAResultRow).where(QAResultRow.job_id == job_id).order_by(QAResultRow.id))
    )
    sends = tuple(session.scalars(select(SendRow).where(SendRow.job_id == job_id).order_by(SendRow.id)))
    events = tuple(
        session.scalars(
            select(EventRow)
            .where(or_(EventRow.job_id == job_id, and_(EventRow.series_id == job.series_id, EventRow.job_id.is_(None))))
            .order_by(EventRow.seq, EventRow.id)
        )
    )
    instances: dict[int, list[SendInstanceRow]] = {}
    if sends:
        for row in session.scalars(
            select(SendInstanceRow).where(SendInstanceRow.send_id.in_([send.id for send in sends]))
            .order_by(SendInstanceRow.id)
        ):  # fmt: skip
            instances.setdefault(row.send_id, []).append(row)
    refused_first = {k: tuple(sorted(v, key=lambda r: r.status == 0)) for k, v in instances.items()}
    return JobPage(job, series, qa_results, sends, events, report_page_numbers(job), refused_first)


def report_page_numbers(job: JobRow) -> tuple[int, ...]:
    if not job.qa_dir:
        return ()
    folder = Path(job.qa_dir)
    numbers = []
    for number in range(1, 10):
        if not (folder / PAGE_PNG.format(number)).is_file():
            break
        numbers.append(number)
    return tuple(numbers)


@dataclasses.dataclass(frozen=True)
class SeriesListRow:
    series: SeriesRow
    job_ids: tuple[int, ...]


def series_list(session: Session, *, state: str = "", page: int = 1) -> tuple[tuple[SeriesListRow, ...], int, int]:
    """One page of every series received (newest first), with its jobs; the page and the page count."""
    conditions = [SeriesRow.state == state] if state else []
    total = session.scalar(select(func.count()).select_from(SeriesRow).where(*conditions)) or 0
    pages = max(1, -(-total // PAGE_SIZE))
    page = min(max(1, page), pages)
    found = session.scalars(
        select(SeriesRow).where(*conditions).order_by(SeriesRow.last_received_at.desc(), SeriesRow.id.desc())
        .limit(PAGE_SIZE).offset((page - 1) * PAGE_SIZE)
    ).all()  # fmt: skip
    jobs: dict[int, list[int]] = {}
    if found:
        for job_id, series_id in session.execute(
            select(JobRow.id, JobRow.series_id).where(JobRow.series_id.in_([s.id for s in found])).order_by(JobRow.id)
        ):
            jobs.setdefault(series_id, []).append(job_id)
    return tuple(SeriesListRow(s, tuple(jobs.get(s.id, ()))) for s in found), page, pages
