"""The audit events' hash chain: appending (``add_event``), set-up and migration (``ensure_chain``).

The events form a hash chain (tamper evidence, not tamper proofing): each event row carries its
position ``seq``, the hash of the event before it (``prev_hash``) and ``row_hash`` = SHA-256 over
``prev_hash`` and its own content (see ``event_hash``). A one-row table, ``audit_chain_head``, holds
the newest ``seq`` and hash and is updated in the same transaction as every event insert, so the
deletion of the newest events (truncation) is caught as well: the head then names events that are
no longer there. ``verify_chain`` walks and checks it all.

Appends are serialised by the database, not only within one process: on PostgreSQL the head row
is read ``FOR UPDATE`` (a row lock held to the commit); on SQLite every write transaction starts
with ``BEGIN IMMEDIATE`` (SQLAlchemy's pysqlite recipe, see ``dicom_node.audit.db``), which takes the
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

Verification and repair: ``dicom_node.audit.verify``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, inspect, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from dicom_node.audit.models import CHAIN_HEAD_ID, GENESIS_HASH, ChainHeadRow, EventRow, utcnow
from dicom_node.errors import AuditChainError

log = logging.getLogger(__name__)


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


CHAIN_COLUMNS = ("seq", "prev_hash", "row_hash")
SEALED_KIND = "audit_chain_sealed"


# Set-up and migration -------------------------------------------------------------------------


def ensure_chain(engine: Engine) -> None:
    """Give a new database its chain head; migrate a database from before the chain, once.

    Migration adds the three chain columns and their indexes, chains the existing events as they
    are found, in id order, and appends an ``audit_chain_sealed`` event that says so: the chain then
    proves those events unchanged since the migration, not before it. It runs in one transaction
    that holds the write lock (``BEGIN IMMEDIATE`` on SQLite, a table lock on PostgreSQL), so two
    processes opening an old database at once migrate it once.
    """
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE"))
        columns = {column["name"] for column in inspect(connection).get_columns("events")}
        missing = [name for name in CHAIN_COLUMNS if name not in columns]
        if missing and len(missing) < len(CHAIN_COLUMNS):
            raise AuditChainError(
                f"the events table has only part of the hash chain's columns (missing {', '.join(missing)}); "
                "this schema was not made by sct-node: restore the audit database from a backup"
            )
        if missing:
            _seal_existing_events(connection)
            return
        has_head = connection.execute(select(ChainHeadRow.id).where(ChainHeadRow.id == CHAIN_HEAD_ID)).first()
        if has_head is None and connection.execute(select(func.count()).select_from(EventRow)).scalar_one() == 0:
            connection.execute(
                insert(ChainHeadRow).values(id=CHAIN_HEAD_ID, seq=0, head_hash=GENESIS_HASH, updated_at=utcnow())
            )
        # A head missing while events exist is left alone: add_event refuses and verify reports it.


def _seal_existing_events(connection: Connection) -> None:
    events = cast(Table, EventRow.__table__)
    for name, sql_type in (("seq", "INTEGER"), ("prev_hash", "VARCHAR(64)"), ("row_hash", "VARCHAR(64)")):
        connection.execute(text(f"ALTER TABLE events ADD COLUMN {name} {sql_type}"))
    content = [events.c[name] for name in ("id", "at", "kind", "series_id", "job_id", "from_state", "to_state")]
    rows = connection.execute(select(*content, events.c.message, events.c.detail).order_by(events.c.id)).all()
    prev_hash, updates = GENESIS_HASH, []
    for seq, row in enumerate(rows, start=1):
        row_hash = row_content_hash(row, prev_hash)
        updates.append({"b_id": row.id, "b_seq": seq, "b_prev": prev_hash, "b_hash": row_hash})
        prev_hash = row_hash
    if updates:
        connection.execute(
            events.update()
            .where(events.c.id == bindparam("b_id"))
            .values(seq=bindparam("b_seq"), prev_hash=bindparam("b_prev"), row_hash=bindparam("b_hash")),
            updates,
        )
    for index in events.indexes:
        if {column.name for column in index.columns} & set(CHAIN_COLUMNS):
            index.create(connection)
    connection.execute(delete(ChainHeadRow))
    connection.execute(
        insert(ChainHeadRow).values(id=CHAIN_HEAD_ID, seq=len(rows), head_hash=prev_hash, updated_at=utcnow())
    )
    first_id, last_id = (rows[0].id, rows[-1].id) if rows else (None, None)
    with Session(bind=connection) as session:
        add_event(
            session,
            SEALED_KIND,
            f"hash chain introduced: the {len(rows)} earlier event(s) were chained as found now; the chain "
            "proves them unchanged from this moment on, not before it",
            detail={"sealed_events": len(rows), "first_id": first_id, "last_id": last_id},
        )
        session.flush()
    log.warning("audit database migrated to the hash chain: %d earlier event(s) sealed as found", len(rows))
