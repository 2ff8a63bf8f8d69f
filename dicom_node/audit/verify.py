"""Verification of the audit events' hash chain (``verify_chain``, ``sct-node audit verify``) and the
repair of a deleted chain head (``restore_head``). How the chain is built: ``dicom_node.audit.chain``.

Verification walks the events in ``seq`` order and, for each, checks

1. its content against its own ``row_hash`` (a field changed by SQL: *edited*);
2. its ``prev_hash`` against the hash of the event before it. Where that link is broken, the event
   the row *does* chain onto is looked up by hash: none (a gap in ``seq``: *missing*, deleted; no
   gap: the event before it was *edited* and rehashed, or replaced), a later one (*reordered*), an
   earlier one (the events in between were *inserted*);
3. that ``seq`` and ``id`` follow the chain (a renumbered ``seq`` is *edited*, a lower ``id`` than
   the event before it is *reordered*: ``audit show`` lists events by id);
4. that the newest event is the one the head row (``audit_chain_head``) names: events deleted at the
   end are *missing* (truncation), events after the head were *inserted*.

Rows without chain fields (``seq`` NULL, possible only in a migrated database) are *inserted*.
Any change is detected; the label given to it is the likeliest explanation, not a proof.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from dicom_node.audit.chain import SEALED_KIND, add_event, row_content_hash
from dicom_node.audit.db import AuditDB
from dicom_node.audit.models import CHAIN_HEAD_ID, GENESIS_HASH, ChainHeadRow, EventRow, utcnow
from dicom_node.errors import AuditChainError

log = logging.getLogger(__name__)

_PAGE = 2000
EDITED, MISSING, INSERTED, REORDERED = "edited", "missing", "inserted", "reordered"


# Verification ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChainProblem:
    kind: str  # edited | missing | inserted | reordered
    event_id: int | None
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"event id {self.event_id} (seq {self.seq})" if self.event_id is not None else "chain head"
        return f"{where}: {self.kind}: {self.message}"


@dataclasses.dataclass
class ChainReport:
    events: int
    head_seq: int | None
    head_hash: str | None
    problems: list[ChainProblem]
    sealed_events: int = 0  # events from before the chain, sealed at migration
    sealed_at: dt.datetime | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass(frozen=True)
class _Link:
    id: int
    seq: int
    row_hash: str


class _Walker:
    """Checks the events one by one in (seq, id) order; see the module docstring."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.problems: list[ChainProblem] = []
        self.prev: _Link | None = None
        self.expected_prev_hash = GENESIS_HASH
        self.expected_seq = 1
        self.reordered: set[int] = set()  # ids already named in a reordering
        self.recent: collections.deque[_Link] = collections.deque(maxlen=256)
        self.count = 0

    def add(self, kind: str, event_id: int | None, seq: int | None, message: str) -> None:
        self.problems.append(ChainProblem(kind, event_id, seq, message))

    def owner_of(self, row_hash: str) -> _Link | None:
        found = self.session.execute(
            select(EventRow.id, EventRow.seq)
            .where(EventRow.row_hash == row_hash, EventRow.seq.is_not(None))
            .order_by(EventRow.id)
            .limit(1)
        ).first()
        return _Link(found.id, found.seq, row_hash) if found is not None else None

    def step(self, row: Any) -> None:
        self.count += 1
        prev = self.prev
        intact = _content_hash(row) == row.row_hash
        if not intact:
            self.add(
                EDITED, row.id, row.seq, "its content does not match its hash: a field was changed after it was written"
            )
        if prev is not None and row.seq == prev.seq:
            self.add(INSERTED, row.id, row.seq, f"a second event with seq {row.seq} (the other is event id {prev.id})")
        elif row.prev_hash == self.expected_prev_hash:
            if row.seq != self.expected_seq:
                self.add(EDITED, row.id, row.seq, f"its seq was changed: the chain puts it at seq {self.expected_seq}")
        else:
            self._broken_link(row, prev, intact)
        if prev is not None and row.id <= prev.id:
            self.reordered.update((row.id, prev.id))
            self.add(
                REORDERED,
                row.id,
                row.seq,
                f"it follows event id {prev.id} in the chain but has a lower id: rows were swapped or renumbered "
                "(audit show lists events by id)",
            )
        link = _Link(row.id, row.seq, row.row_hash)
        self.prev, self.expected_prev_hash, self.expected_seq = link, row.row_hash, row.seq + 1
        self.recent.append(link)

    def _broken_link(self, row: Any, prev: _Link | None, intact: bool) -> None:
        owner = self.owner_of(row.prev_hash)
        if owner is None:
            if row.seq > self.expected_seq:
                self.add(
                    MISSING,
                    row.id,
                    row.seq,
                    f"{_seq_range(self.expected_seq, row.seq - 1)} before it {_are(self.expected_seq, row.seq - 1)} "
                    "missing (deleted): it chains onto a hash that no event carries",
                )
            elif not intact:
                pass  # already reported as edited: its prev_hash is one of the fields that changed
            elif prev is None:
                self.add(
                    EDITED, row.id, row.seq, "the first event does not chain onto the start of the chain: replaced"
                )
            else:
                self.add(
                    EDITED,
                    prev.id,
                    prev.seq,
                    f"event id {row.id} (seq {row.seq}) after it chains onto a different hash: this event was "
                    "changed and its hash recomputed, or it replaced the original (or the link of the event after "
                    "it was rewritten)",
                )
        elif owner.seq >= row.seq or owner.id in self.reordered or row.id in self.reordered:
            self.reordered.update((owner.id, row.id))
            where = "which comes after it" if owner.seq > row.seq else "not onto the event before it"
            self.add(REORDERED, row.id, row.seq, f"it chains onto event id {owner.id} (seq {owner.seq}), {where}")
        else:
            between = [link for link in self.recent if owner.seq < link.seq < row.seq]
            message = (
                f"not part of the chain: event id {row.id} (seq {row.seq}) chains directly onto event id {owner.id} "
                f"(seq {owner.seq}) before it"
            )
            for link in between:
                self.add(INSERTED, link.id, link.seq, message)
            if not between:
                self.add(INSERTED, row.id, row.seq, f"the event(s) before it back to seq {owner.seq + 1} are {message}")

    def check_head(self, head: Any) -> None:
        if head is None:
            self.add(
                MISSING,
                None,
                None,
                "the chain head (table audit_chain_head) is missing: deletion of the newest events cannot be ruled out",
            )
            return
        last_seq = self.prev.seq if self.prev is not None else 0
        last_hash = self.prev.row_hash if self.prev is not None else GENESIS_HASH
        if head.head_hash == last_hash:
            return  # the newest event is the one the head names (a changed seq is reported by the walk)
        if head.seq > last_seq:
            self.add(
                MISSING,
                None,
                None,
                f"the newest {_seq_range(last_seq + 1, head.seq)} {_are(last_seq + 1, head.seq)} missing (deleted): "
                f"the head records seq {head.seq}, "
                + (f"the last event is seq {last_seq}" if last_seq else "no event is left"),
            )
        elif head.seq < last_seq:
            for link in self.recent:
                if link.seq > head.seq:
                    self.add(
                        INSERTED,
                        link.id,
                        link.seq,
                        f"it comes after the newest event the chain head records (seq {head.seq}): "
                        "appended outside the node",
                    )
        elif head.head_hash != last_hash:
            self.add(
                EDITED,
                self.prev.id if self.prev is not None else None,
                last_seq if self.prev is not None else None,
                "the newest event does not carry the hash the chain head records: changed and rehashed, or replaced",
            )


def _content_hash(row: Any) -> str:
    return row_content_hash(row)


def _seq_range(first: int, last: int) -> str:
    return f"event seq {first}" if first == last else f"events seq {first}..{last}"


def _are(first: int, last: int) -> str:
    return "is" if first == last else "are"


_COLUMNS = (
    EventRow.id,
    EventRow.seq,
    EventRow.prev_hash,
    EventRow.row_hash,
    EventRow.at,
    EventRow.kind,
    EventRow.series_id,
    EventRow.job_id,
    EventRow.from_state,
    EventRow.to_state,
    EventRow.message,
    EventRow.detail,
)


def verify_chain(db: AuditDB) -> ChainReport:
    """Walk the whole chain in one read snapshot (it holds no write lock: the node goes on)."""
    with db.reading() as session:
        head = session.execute(
            select(ChainHeadRow.seq, ChainHeadRow.head_hash).where(ChainHeadRow.id == CHAIN_HEAD_ID)
        ).one_or_none()
        walker = _Walker(session)
        key: tuple[int, int] | None = None
        while True:
            query = select(*_COLUMNS).where(EventRow.seq.is_not(None))
            if key is not None:
                query = query.where(or_(EventRow.seq > key[0], and_(EventRow.seq == key[0], EventRow.id > key[1])))
            page = session.execute(query.order_by(EventRow.seq, EventRow.id).limit(_PAGE)).all()
            for row in page:
                walker.step(row)
            if len(page) < _PAGE:
                break
            key = (page[-1].seq, page[-1].id)
        walker.check_head(head)
        for event_id in session.scalars(select(EventRow.id).where(EventRow.seq.is_(None)).order_by(EventRow.id)):
            walker.count += 1
            walker.add(INSERTED, event_id, None, "it carries no chain fields: written outside the node's chain")
        sealed = session.execute(
            select(EventRow.at, EventRow.detail).where(EventRow.kind == SEALED_KIND).order_by(EventRow.id).limit(1)
        ).first()
    report = ChainReport(
        events=walker.count,
        head_seq=head.seq if head is not None else None,
        head_hash=head.head_hash if head is not None else None,
        problems=walker.problems,
    )
    if sealed is not None:
        report.sealed_events = int(sealed.detail.get("sealed_events", 0)) if isinstance(sealed.detail, dict) else 0
        report.sealed_at = sealed.at
    return report


HEAD_RESTORED_KIND = "audit_chain_head_restored"


def restore_head(db: AuditDB) -> str:
    """Re-create a deleted chain head, when nothing else is wrong: the node cannot add events without it.

    Raises AuditChainError (with verify's findings) unless the head is missing and every event
    still verifies. The new head names the newest event, and an ``audit_chain_head_restored`` event
    records the repair. What this cannot prove: whether events at the end of the chain were deleted
    together with the head; compare with a head hash recorded elsewhere (``audit verify`` prints it).
    """
    report = verify_chain(db)
    if report.head_seq is not None:
        raise AuditChainError("the chain head is present: nothing to restore (run `sct-node audit verify`)")
    others = [problem for problem in report.problems if problem.event_id is not None]
    if others:
        raise AuditChainError(
            f"the chain head is missing and {len(others)} event(s) fail verification too; not restoring "
            "(restore the audit database from a backup). First: " + "; ".join(str(p) for p in others[:3])
        )
    with db.session() as session:
        if session.get(ChainHeadRow, CHAIN_HEAD_ID) is not None:
            raise AuditChainError("the chain head was restored meanwhile by another process")
        newest = session.execute(
            select(EventRow.seq, EventRow.row_hash).where(EventRow.seq.is_not(None)).order_by(EventRow.seq.desc())
        ).first()
        seq, head_hash = (newest.seq, newest.row_hash) if newest is not None else (0, GENESIS_HASH)
        session.add(ChainHeadRow(id=CHAIN_HEAD_ID, seq=seq, head_hash=head_hash, updated_at=utcnow()))
        session.flush()
        message = (
            f"audit chain head restored at event seq {seq} (sha256 {head_hash}) after it was found missing; "
            f"the {report.events} events before it verify, but events deleted from the end of the chain "
            "together with the head cannot be detected: compare with a head hash recorded elsewhere"
        )
        add_event(session, HEAD_RESTORED_KIND, message, detail={"seq": seq, "head_hash": head_hash})
    log.warning("%s", message)
    return message
