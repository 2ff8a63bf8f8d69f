"""An audit database made by an earlier version (without the QA columns) is upgraded in place when the
node opens it: the new columns are added with their defaults, nothing else changes, the chain verifies."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import select

from dicom_node.audit import AuditDB, JobRow, JobState, SeriesRow, add_event, utcnow
from dicom_node.audit.db import add_missing_columns
from dicom_node.audit.verify import verify_chain

NEW_JOB_COLUMNS = (
    "qa_policy",
    "send_qa_report",
    "send_uncertainty",
    "qa_verdict",
    "qa_dir",
    "review_decision",
    "reviewed_by",
    "review_reason",
    "reviewed_at",
)


def test_an_older_database_gets_the_new_columns_with_their_defaults(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    db = AuditDB(f"sqlite:///{path}")
    now = utcnow()
    with db.session() as session:
        series = SeriesRow(
            series_instance_uid="1.2.3", study_instance_uid="1.2", first_received_at=now, last_received_at=now
        )
        session.add(series)
        session.flush()
        session.add(
            JobRow(
                series_id=series.id,
                state=JobState.DONE,
                route_name="r",
                destinations=["pacs"],
                created_at=now,
                updated_at=now,
                method="bulk_density",
                steps=1,
                samples=1,
                seed=0,
                sct_series_uid="1.2.3.4",
                timings_s={},
            )
        )
        add_event(session, "test", "before the upgrade")
    db.dispose()
    with sqlite3.connect(path) as connection:  # what a database of the previous version looks like
        connection.execute("DROP INDEX ix_jobs_qa_verdict")
        for column in NEW_JOB_COLUMNS:
            connection.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
        connection.execute("DROP TABLE qa_results")
    upgraded = AuditDB(f"sqlite:///{path}")
    with sqlite3.connect(path) as connection:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(jobs)")}
        indexes = {row[1] for row in connection.execute("PRAGMA index_list(jobs)")}
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert set(NEW_JOB_COLUMNS) <= columns and "ix_jobs_qa_verdict" in indexes and "qa_results" in tables
    with upgraded.session() as session:
        job = session.scalars(select(JobRow)).one()
        assert (job.qa_policy, job.send_qa_report, job.qa_verdict, job.reviewed_at) == ("hold", True, "", None)
        add_event(session, "test", "after the upgrade")
    assert verify_chain(upgraded).ok
    assert add_missing_columns(upgraded.engine) == []  # once only
