"""Received instances into the audit database: one transaction per batch (``record_instances``),
written from a background thread (``InstanceRecorder``) so that the SCP never waits for the database."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.audit.chain import add_event
from dicom_node.audit.db import AuditDB
from dicom_node.audit.models import InstanceRow, SeriesRow, SeriesState

log = logging.getLogger(__name__)


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
