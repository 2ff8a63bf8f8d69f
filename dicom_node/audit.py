"""The audit database: SQLAlchemy 2.0 typed models and the few operations the node needs.

Files carry the data (spool, outbox); this database carries the state and the history that a
medical physicist reviews: every instance received, every series and the decision taken on it,
every job with its state changes, model, checkpoint hash, seed, timings and send results.
Only portable SQLAlchemy is used, so the same code runs on SQLite (default) and PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

log = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    """Naive UTC timestamps everywhere (SQLite keeps no time zone; PostgreSQL then agrees)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SeriesState:
    RECEIVING = "RECEIVING"  # instances arriving; not yet quiet for quiet_period_s
    ROUTED = "ROUTED"  # complete, checked, a job was created
    NOT_ROUTED = "NOT_ROUTED"  # complete and valid, but no routing rule wants an sCT of it
    QUARANTINED = "QUARANTINED"  # failed the checks; its files are in quarantine/


class JobState:
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SENDING = "SENDING"
    DONE = "DONE"
    FAILED = "FAILED"
    QUARANTINED = "QUARANTINED"

    UNFINISHED = (QUEUED, RUNNING, SENDING)


class InstanceRow(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_aet: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    # True when this SOP Instance UID had already been received in the series (a re-send).
    duplicate: Mapped[bool] = mapped_column(Boolean, default=False)
    # True when the instance arrived after its series was closed (checked and routed or quarantined).
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    # True when the row was rebuilt from the spool at start-up (the node had died before writing it).
    recovered: Mapped[bool] = mapped_column(Boolean, default=False)

    series: Mapped[SeriesRow] = relationship(back_populates="instances")


class SeriesRow(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    protocol_name: Mapped[str] = mapped_column(String(64), default="")
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING, index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # When retention deleted the series' spooled files (never before its sCT was delivered).
    cleaned_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    instances: Mapped[list[InstanceRow]] = relationship(back_populates="series")
    jobs: Mapped[list[JobRow]] = relationship(back_populates="series")


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    route_name: Mapped[str] = mapped_column(String(64))
    destinations: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # The model settings the job runs with (copied from the config when the job is created).
    method: Mapped[str] = mapped_column(String(32))
    checkpoint_path: Mapped[str] = mapped_column(Text, default="")
    checkpoint_sha256: Mapped[str] = mapped_column(String(64), default="")
    model_name: Mapped[str] = mapped_column(String(64), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    device: Mapped[str] = mapped_column(String(16), default="")
    steps: Mapped[int] = mapped_column(Integer)
    samples: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    # Fixed when the job is created, so that a re-run after a crash writes the same UIDs and a
    # destination never receives the same sCT twice under different UIDs.
    sct_series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sct_instance_count: Mapped[int] = mapped_column(Integer, default=0)
    output_dir: Mapped[str] = mapped_column(Text, default="")
    uncertainty_path: Mapped[str] = mapped_column(Text, default="")
    uncertainty_mean_hu: Mapped[float | None] = mapped_column(Float, nullable=True)
    uncertainty_p95_hu: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Seconds per stage: load, sampling, writing, sending (and quiet period, measured).
    timings_s: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    send_attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_send_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    run_attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    # When retention deleted the outbox (the sCT files) after delivery.
    cleaned_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    series: Mapped[SeriesRow] = relationship(back_populates="jobs")
    sends: Mapped[list[SendRow]] = relationship(back_populates="job", order_by="SendRow.id")


class SendRow(Base):
    """One attempt to deliver a job's sCT series to one destination."""

    __tablename__ = "sends"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime)
    ok: Mapped[bool] = mapped_column(Boolean)
    instances_sent: Mapped[int] = mapped_column(Integer)
    instances_failed: Mapped[int] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text, default="")

    job: Mapped[JobRow] = relationship(back_populates="sends")


class EventRow(Base):
    """Every state change and notable event, in order: the history `sct-node audit show` prints."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id"), nullable=True, index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    from_state: Mapped[str] = mapped_column(String(16), default="")
    to_state: Mapped[str] = mapped_column(String(16), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


def add_event(
    session: Session,
    kind: str,
    message: str = "",
    *,
    series_id: int | None = None,
    job_id: int | None = None,
    from_state: str = "",
    to_state: str = "",
    detail: dict[str, Any] | None = None,
) -> EventRow:
    row = EventRow(
        at=utcnow(),
        kind=kind,
        series_id=series_id,
        job_id=job_id,
        from_state=from_state,
        to_state=to_state,
        message=message,
        detail=detail or {},
    )
    session.add(row)
    return row


class AuditDB:
    """The engine and session factory of the audit database; creates the tables on first use."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            database = self.engine.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed when the block ends, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (the CLI) never block the node
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each WAL checkpoint; safe against kill -9
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@dataclasses.dataclass(frozen=True)
class ReceivedInstance:
    """What the SCP learnt about one stored instance: enough to audit it and to find its series."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    patient_name: str
    modality: str
    series_description: str
    protocol_name: str
    calling_aet: str
    path: str
    size_bytes: int
    received_at: dt.datetime
    recovered: bool = False


def record_instances(session: Session, instances: Sequence[ReceivedInstance]) -> None:
    """Write instance rows and create or update their series rows, in one transaction."""
    by_series: dict[str, list[ReceivedInstance]] = {}
    for instance in instances:
        by_series.setdefault(instance.series_instance_uid, []).append(instance)
    existing = {
        row.series_instance_uid: row
        for row in session.scalars(select(SeriesRow).where(SeriesRow.series_instance_uid.in_(list(by_series))))
    }
    for series_uid, group in by_series.items():
        series = existing.get(series_uid)
        if series is None:
            first = group[0]
            series = SeriesRow(
                series_instance_uid=series_uid,
                study_instance_uid=first.study_instance_uid,
                patient_id=first.patient_id,
                patient_name=first.patient_name,
                modality=first.modality,
                series_description=first.series_description,
                protocol_name=first.protocol_name,
                calling_aet=first.calling_aet,
                first_received_at=min(i.received_at for i in group),
                last_received_at=max(i.received_at for i in group),
                instance_count=0,
                state=SeriesState.RECEIVING,
            )
            session.add(series)
            session.flush()
            add_event(
                session,
                "series_started",
                f"first instance from {first.calling_aet}",
                series_id=series.id,
                to_state=SeriesState.RECEIVING,
            )
            known: set[str] = set()
        else:
            known = set(session.scalars(select(InstanceRow.sop_instance_uid).where(InstanceRow.series_id == series.id)))
        late = series.state != SeriesState.RECEIVING
        new_count = 0
        for instance in group:
            duplicate = instance.sop_instance_uid in known
            known.add(instance.sop_instance_uid)
            new_count += 0 if duplicate else 1
            session.add(
                InstanceRow(
                    series_id=series.id,
                    sop_instance_uid=instance.sop_instance_uid,
                    sop_class_uid=instance.sop_class_uid,
                    transfer_syntax_uid=instance.transfer_syntax_uid,
                    calling_aet=instance.calling_aet,
                    received_at=instance.received_at,
                    path=instance.path,
                    size_bytes=instance.size_bytes,
                    duplicate=duplicate,
                    late=late,
                    recovered=instance.recovered,
                )
            )
        series.instance_count += new_count
        series.last_received_at = max(series.last_received_at, max(i.received_at for i in group))
        if late:
            add_event(
                session,
                "late_instances",
                f"{len(group)} instance(s) ({new_count} new) arrived after the series was closed as {series.state}; "
                "kept in the spool, not processed",
                series_id=series.id,
            )
        if any(i.recovered for i in group):
            add_event(
                session,
                "recovered",
                f"{len(group)} spooled instance(s) had no audit row; rebuilt at start-up",
                series_id=series.id,
            )


class InstanceRecorder:
    """Writes instance rows in batches from a background thread.

    The SCP answers a C-STORE as soon as the file is safely in the spool; the audit rows follow
    within ``flush_interval_s``. Should the node die in between, the spool scan at start-up
    rebuilds the missing rows (``recovered``), so batching loses nothing.
    """

    def __init__(self, db: AuditDB, *, flush_interval_s: float = 0.2, max_batch: int = 500) -> None:
        self.db = db
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self._queue: queue.Queue[ReceivedInstance | None] = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="audit-instance-writer", daemon=True)
        self._thread.start()

    def record(self, instance: ReceivedInstance) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(instance)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every recorded instance is in the database; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            deadline = time.monotonic() + self.flush_interval_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            try:
                self._write(batch)
            except Exception:  # the writer thread must outlive any single batch
                log.exception("audit writer: unexpected error; %d rows left to the start-up spool scan", len(batch))

    def _write(self, batch: list[ReceivedInstance]) -> None:
        try:
            if not self._try_write(batch, attempts=5):
                # One bad row must not cost the others theirs: write the batch row by row.
                for instance in batch:
                    if not self._try_write([instance], attempts=2):
                        log.error(
                            "the audit row of instance %s could not be written; it will be rebuilt from "
                            "the spool at the next start",
                            instance.sop_instance_uid,
                        )
        finally:
            with self._idle:
                self._pending -= len(batch)
                self._idle.notify_all()

    def _try_write(self, batch: list[ReceivedInstance], attempts: int) -> bool:
        for attempt in range(1, attempts + 1):
            try:
                with self.db.session() as session:
                    record_instances(session, batch)
                return True
            except Exception:  # the database is briefly locked or gone: retry
                log.exception("writing %d instance rows failed (attempt %d of %d)", len(batch), attempt, attempts)
                time.sleep(0.2 * attempt)
        return False
