"""The audit database: SQLAlchemy 2.0 typed models and the few operations the node needs.

Files carry the data (spool, outbox); this database carries the state and the history that a
medical physicist reviews: every instance received, every series and the decision taken on it,
every job with its state changes, model, checkpoint hash, seed, timings and send results.
Only portable SQLAlchemy is used, so the same code runs on SQLite (default) and PostgreSQL.

The events form a hash chain (tamper evidence, not tamper proofing): each event row carries its
position ``seq``, the hash of the event before it (``prev_hash``) and ``row_hash`` = SHA-256 over
``prev_hash`` and its own content (see ``event_hash``). A one-row table, ``audit_chain_head``, holds
the newest ``seq`` and hash and is updated in the same transaction as every event insert, so the
deletion of the newest events (truncation) is caught as well: the head then names events that are
no longer there. ``dicom_node.audit_chain.verify_chain`` walks and checks it all.

Appends are serialised by the database, not only within one process: on PostgreSQL the head row
is read ``FOR UPDATE`` (a row lock held to the commit); on SQLite every write transaction starts
with ``BEGIN IMMEDIATE`` (SQLAlchemy's pysqlite recipe, see ``_sqlite_begin``), which takes the
database's single write lock before the head is read. Two writers (threads of the node, or the
``sct-node resend`` CLI in another process) therefore never chain onto the same previous hash; the
unique index on ``seq`` would refuse such a fork even if they did. An event and the state change it
records are written in one transaction, so neither exists without the other.

Limits, stated plainly: the hash has no secret key. Someone with write access who recomputes every
hash after the row they changed, and the head too, produces a chain that verifies. What the chain
gives is that any edit, deletion, insertion or reordering made with SQL (or by a program that does
not know the chain) is detected. To extend that to a determined forger, record the head hash that
``sct-node audit verify`` prints somewhere else (a ticket, the QA log): a later chain must still
contain that hash at that position.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from dicom_node.errors import AuditChainError

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64  # the prev_hash of the first event
CHAIN_HEAD_ID = 1  # the one row of audit_chain_head


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
    # The hash chain (see the module docstring): position, the previous event's hash, this one's.
    seq: Mapped[int] = mapped_column(Integer, unique=True, index=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64), index=True)  # indexed: the verifier looks links up


class ChainHeadRow(Base):
    """The newest link of the events' hash chain: one row, updated in each event's transaction.

    It makes truncation visible (the newest events deleted) and is the row that appends lock.
    """

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    head_hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)


def event_hash(
    prev_hash: str,
    *,
    at: dt.datetime,
    kind: str,
    series_id: int | None,
    job_id: int | None,
    from_state: str,
    to_state: str,
    message: str,
    detail: Any,
) -> str:
    """SHA-256 (hex) of an event: canonical JSON (sorted keys, no spaces, ASCII) of the previous
    hash and every content field. ``seq`` and ``id`` are not hashed: the order is carried by
    ``prev_hash`` itself, and the verifier checks that ``seq`` and ``id`` follow it."""
    document = {
        "v": 1,
        "prev_hash": prev_hash,
        "at": at.isoformat(timespec="microseconds"),
        "kind": kind,
        "series_id": series_id,
        "job_id": job_id,
        "from_state": from_state,
        "to_state": to_state,
        "message": message,
        "detail": detail,
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def row_content_hash(row: Any, prev_hash: str | None = None) -> str:
    """``event_hash`` of a stored event (an EventRow or a result row with the same columns), from
    its own ``prev_hash`` or the ``prev_hash`` given (when the chain is being built)."""
    return event_hash(
        (row.prev_hash or "") if prev_hash is None else prev_hash,
        at=row.at,
        kind=row.kind,
        series_id=row.series_id,
        job_id=row.job_id,
        from_state=row.from_state,
        to_state=row.to_state,
        message=row.message,
        detail=row.detail,
    )


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
    """Append an event to the chain, in ``session``'s transaction (with the change it records).

    The head row is read with a lock (``FOR UPDATE`` on PostgreSQL; on SQLite the transaction
    already holds the write lock, see ``_sqlite_begin``) and moved on in the same transaction, so
    concurrent writers queue here instead of forking the chain. On PostgreSQL a transaction that
    waits here may hold row locks another one needs after its own append; PostgreSQL's deadlock
    detector then rolls one of them back whole (an error, never a half-written or forked chain).
    """
    if session.info.get("read_only"):
        raise AuditChainError("AuditDB.reading() is read-only: events are added in AuditDB.session()")
    # Stored exactly as hashed: what JSON makes of it (tuples become lists, keys strings).
    stored_detail = json.loads(json.dumps(detail or {}))
    head = session.execute(
        select(ChainHeadRow.seq, ChainHeadRow.head_hash).where(ChainHeadRow.id == CHAIN_HEAD_ID).with_for_update()
    ).one_or_none()
    if head is None:
        raise AuditChainError(
            "the audit chain head (table audit_chain_head) is missing, so no event can be chained; "
            "the audit trail may have been tampered with: run `sct-node audit verify`"
        )
    row = EventRow(
        at=utcnow(),  # taken under the lock: times follow the chain order
        kind=kind,
        series_id=series_id,
        job_id=job_id,
        from_state=from_state,
        to_state=to_state,
        message=message,
        detail=stored_detail,
        seq=head.seq + 1,
        prev_hash=head.head_hash,
    )
    row.row_hash = row_content_hash(row)
    session.add(row)
    session.execute(
        update(ChainHeadRow)
        .where(ChainHeadRow.id == CHAIN_HEAD_ID)
        .values(seq=row.seq, head_hash=row.row_hash, updated_at=row.at)
        .execution_options(synchronize_session=False)
    )
    return row


class AuditDB:
    """The engine and session factory of the audit database; creates the tables on first use.

    A new SQLite file is created mode 0600 whatever the umask (the CLI runs with the user's); SQLite
    gives its -wal and -shm files the database file's mode. A database from before the hash chain
    is migrated once (see ``dicom_node.audit_chain.ensure_chain``).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            database = self.engine.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                _create_private_file(Path(database))
            event.listen(self.engine, "connect", _sqlite_driver_transactions_off)
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        Base.metadata.create_all(self.engine)
        from dicom_node.audit_chain import ensure_chain  # it imports this module

        ensure_chain(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # One snapshot per reading session: SQLite's deferred BEGIN gives it (see _sqlite_begin);
        # PostgreSQL's default READ COMMITTED would let a long report see rows committed meanwhile.
        snapshot = {} if self.engine.dialect.name == "sqlite" else {"isolation_level": "REPEATABLE READ"}
        self._readers = sessionmaker(
            self.engine.execution_options(sct_read_only=True, **snapshot),
            expire_on_commit=False,
            info={"read_only": True},
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed when the block ends, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only session for reports: one consistent snapshot that never holds the write lock
        (a plain ``BEGIN`` on SQLite, so WAL readers do not hold up the node; REPEATABLE READ on
        PostgreSQL). Writes are refused."""
        with self._readers() as session:
            event.listen(session, "before_flush", _refuse_flush)
            try:
                yield session
            finally:
                session.rollback()

    def dispose(self) -> None:
        self.engine.dispose()


def _create_private_file(path: Path) -> None:
    """Create an empty SQLite file readable by its owner only, unless it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask took away
    finally:
        os.close(fd)


def _refuse_flush(session: Session, _context: Any, _instances: Any) -> None:
    raise AuditChainError("AuditDB.reading() is read-only: write in AuditDB.session()")


def _sqlite_driver_transactions_off(dbapi_connection: Any, _record: Any) -> None:
    """SQLAlchemy's pysqlite recipe, part 1: the driver emits no BEGIN of its own (its legacy mode
    begins only before DML, so a SELECT before the first write would run outside the transaction)."""
    dbapi_connection.isolation_level = None


def _sqlite_begin(connection: Connection) -> None:
    """The recipe, part 2: every transaction takes SQLite's write lock at BEGIN (IMMEDIATE), so that
    what it reads (the chain head above all) cannot change before it commits. Waiting writers queue
    on ``busy_timeout``; a lock taken at BEGIN cannot deadlock (no transaction upgrades from read to
    write). ``AuditDB.reading`` sessions begin DEFERRED: a snapshot that holds no lock."""
    read_only = connection.get_execution_options().get("sct_read_only", False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


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
