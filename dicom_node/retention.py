"""Retention: delete the files of a series once they are no longer needed, never before delivery.

- A ROUTED series: its spool folder and its job's outbox (the sCT, its uncertainty volume and its QA
  folder) go ``retention_days`` after the job is DONE (delivered to every destination) or REJECTED
  (a person or the block policy decided it is never sent). A FAILED, HELD or unfinished job keeps
  everything: a held job waits for a person, however long.
- A NOT_ROUTED series: its spool folder goes ``retention_days`` after it was closed.
- QUARANTINED series are kept for a person to look at.
The audit rows stay; ``cleaned_at`` and an event say when the files went.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

from sqlalchemy import select

from dicom_node.audit import AuditDB, JobState, SeriesRow, SeriesState, add_event, utcnow
from dicom_node.config import Config

log = logging.getLogger(__name__)

# Jobs whose files have served their purpose: delivered, or never to be sent. Never HELD.
RETIRED_STATES = (JobState.DONE, JobState.REJECTED)


def clean(config: Config, db: AuditDB, now: dt.datetime | None = None) -> int:
    """Delete what is past its retention time; returns the number of series cleaned."""
    if config.jobs.retention_days <= 0:
        return 0
    cutoff = (now or utcnow()) - dt.timedelta(days=config.jobs.retention_days)
    cleaned = 0
    with db.session() as session:
        series_rows = session.scalars(
            select(SeriesRow).where(
                SeriesRow.cleaned_at.is_(None),
                SeriesRow.closed_at.is_not(None),
                SeriesRow.closed_at <= cutoff,
                SeriesRow.state.in_([SeriesState.ROUTED, SeriesState.NOT_ROUTED]),
            )
        ).all()
        for series in series_rows:
            series_jobs = list(series.jobs)
            if series.state == SeriesState.ROUTED and not series_jobs:
                continue
            if any(
                job.state not in RETIRED_STATES or job.finished_at is None or job.finished_at > cutoff
                for job in series_jobs
            ):
                continue  # not delivered (or rejected) yet, or too recently
            removed = [config.storage.spool / series.series_instance_uid]
            for job in series_jobs:
                if job.output_dir:
                    removed.append(Path(job.output_dir))
                if job.uncertainty_path:
                    removed.append(Path(job.uncertainty_path))
                if job.qa_dir:
                    removed.append(Path(job.qa_dir))
                job.cleaned_at = utcnow()
            for path in removed:
                _remove(path)
            series.cleaned_at = utcnow()
            add_event(
                session,
                "retention",
                f"files deleted after {config.jobs.retention_days:g} days of retention",
                series_id=series.id,
                detail={"paths": [str(p) for p in removed]},
            )
            cleaned += 1
    if cleaned:
        log.info("retention: cleaned %d series", cleaned)
    return cleaned


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink(missing_ok=True)
