"""Series assembly: decide when a series is complete, check it, route it or quarantine it.

DICOM has no end-of-series signal: a series is complete when no instance arrived for
``quiet_period_s`` (as mercure, Orthanc and MONAI Deploy do it). The sweep then checks the series
(DESIGN.md §3, in ``mr_series.check_series``) and applies the routing rules. A series that fails
the checks is moved to quarantine/ with its reason in the audit database, never half-processed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node import jobs, routing
from dicom_node.audit import AuditDB, InstanceRow, JobRow, SeriesRow, SeriesState, add_event, utcnow
from dicom_node.config import Config
from dicom_node.errors import LoadError, SeriesCheckError
from dicom_node.mr_series import CheckedSeries, check_series, load_mr_volume, read_headers
from sct_model.volume import Volume

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckedFiles:
    """The headers and check result of one series, valid for exactly these files."""

    paths: tuple[Path, ...]
    headers: tuple[Dataset, ...]
    checked: CheckedSeries
    received_until: dt.datetime | None = None  # the series' last_received_at when the files were read
    volume: Volume | None = None  # the MR voxels, loaded ahead for a series that will be routed


class CheckedSeriesCache:
    """What the sweep learnt about the series it just routed, handed to the job runner once.

    Reading and checking 300 headers takes about 0.6 s; without this the runner would read the
    same headers the sweep has just read. Process-local and best effort: after a restart, or when
    the files differ from those the sweep checked, the runner reads and checks them again (the
    spool and the database stay the only truth). Bounded: the oldest entries are dropped.
    """

    def __init__(self, max_series: int = 8, max_volumes: int = 2) -> None:
        self._entries: OrderedDict[int, CheckedFiles] = OrderedDict()
        self._failed: OrderedDict[int, dt.datetime] = OrderedDict()  # prechecks that failed, per last_received_at
        self._lock = threading.Lock()
        self._max_series = max_series
        self.max_volumes = max_volumes  # MR volumes held at once (a 300 x 256 x 256 series: 79 MB)

    def volumes_held(self) -> int:
        with self._lock:
            return sum(1 for entry in self._entries.values() if entry.volume is not None)

    def discard(self, series_id: int) -> None:
        with self._lock:
            self._entries.pop(series_id, None)

    def mark_failed(self, series_id: int, received_until: dt.datetime) -> None:
        with self._lock:
            self._failed[series_id] = received_until
            while len(self._failed) > 4 * self._max_series:
                self._failed.popitem(last=False)

    def failed(self, series_id: int, received_until: dt.datetime) -> bool:
        with self._lock:
            return self._failed.get(series_id) == received_until

    def put(self, series_id: int, entry: CheckedFiles) -> None:
        with self._lock:
            self._entries[series_id] = entry
            while len(self._entries) > self._max_series:
                self._entries.popitem(last=False)

    def take(self, series_id: int, paths: Sequence[Path]) -> CheckedFiles | None:
        """The entry of ``series_id`` (removed) if it was made from exactly ``paths``."""
        with self._lock:
            entry = self._entries.pop(series_id, None)
        return entry if entry is not None and entry.paths == tuple(paths) else None

    def peek(self, series_id: int, paths: Sequence[Path], received_until: dt.datetime) -> CheckedFiles | None:
        """The entry of ``series_id`` (kept) if it was read from exactly ``paths`` when the series'
        last instance was the one received at ``received_until`` (any store since changes it)."""
        with self._lock:
            entry = self._entries.get(series_id)
        if entry is None or entry.paths != tuple(paths) or entry.received_until != received_until:
            return None
        return entry

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def series_instance_paths(session: Session, series_id: int) -> list[Path]:
    """The files of a series as received before it was closed: one per SOP instance (the latest copy)."""
    rows = session.execute(
        select(InstanceRow.sop_instance_uid, InstanceRow.path)
        .where(InstanceRow.series_id == series_id, InstanceRow.late.is_(False))
        .order_by(InstanceRow.id)
    ).all()
    latest = {sop_uid: path for sop_uid, path in rows}
    return [Path(p) for p in latest.values()]


def quiet_series_ids(
    session: Session,
    quiet_period_s: float,
    now: dt.datetime | None = None,
    listening_since: dt.datetime | None = None,
) -> list[int]:
    """The RECEIVING series that no instance reached for ``quiet_period_s``.

    ``listening_since``: when the node (re)started listening. The time it was down was not quiet
    (a scanner could not send the rest of a series), so no series is complete before the node has
    listened for a whole quiet period; otherwise a series cut short by a crash or a stop would be
    closed at the restart with only the slices received before it.
    """
    cutoff = (now or utcnow()) - dt.timedelta(seconds=quiet_period_s)
    if listening_since is not None and listening_since > cutoff:
        return []
    return list(
        session.scalars(
            select(SeriesRow.id)
            .where(SeriesRow.state == SeriesState.RECEIVING, SeriesRow.last_received_at <= cutoff)
            .order_by(SeriesRow.last_received_at)
        )
    )


def sweep(
    config: Config,
    db: AuditDB,
    cache: CheckedSeriesCache | None = None,
    listening_since: dt.datetime | None = None,
) -> list[int]:
    """Close every quiet series; return the ids of the jobs created (their checked headers go to ``cache``).
    ``listening_since``: see :func:`quiet_series_ids`."""
    with db.session() as session:
        candidates = quiet_series_ids(session, config.series.quiet_period_s, listening_since=listening_since)
    created: list[int] = []
    for series_id in candidates:
        try:
            job_id = close_series(config, db, series_id, cache)
        except Exception:  # one bad series must never stop the sweep of the others
            log.exception("closing series %d failed; it stays RECEIVING and is tried again", series_id)
            continue
        if job_id is not None:
            created.append(job_id)
    if cache is not None:
        precheck(config, db, cache, exclude=set(candidates))
    return created


def precheck(config: Config, db: AuditDB, cache: CheckedSeriesCache, exclude: set[int] | None = None) -> int:
    """Read and check the series that have been quiet for half their quiet period, ahead of time.

    The quiet period is idle time: reading 300 headers there (about 0.6 s), and for a series the
    routes will send on, its voxels (about 0.8 s; at most ``cache.max_volumes`` held), takes the
    check and the load off the path from the last instance to the sCT. Nothing is decided here:
    the result waits in ``cache`` and is used only if no instance arrived since (otherwise the
    files are read again). A series that fails is simply read again at its close, which gives the
    reason. Returns the number of series read.
    """
    with db.session() as session:
        due = [
            (
                series_id,
                series_instance_paths(session, series_id),
                last_received_at,
                routing.decide(
                    config.routes,
                    series_description=description,
                    protocol_name=protocol,
                    calling_aet=calling_aet,
                ).routed,
            )
            for series_id, last_received_at, description, protocol, calling_aet in session.execute(
                select(
                    SeriesRow.id,
                    SeriesRow.last_received_at,
                    SeriesRow.series_description,
                    SeriesRow.protocol_name,
                    SeriesRow.calling_aet,
                ).where(
                    SeriesRow.state == SeriesState.RECEIVING,
                    SeriesRow.last_received_at <= utcnow() - dt.timedelta(seconds=config.series.quiet_period_s / 2),
                )
            ).all()
            if series_id not in (exclude or set())
        ]
    read = 0
    for series_id, paths, last_received_at, routed in due:
        if not paths or cache.peek(series_id, paths, last_received_at) or cache.failed(series_id, last_received_at):
            continue
        try:
            headers = read_headers(paths)
            checked = check_series(headers, paths)
            volume = load_mr_volume(checked) if routed and cache.volumes_held() < cache.max_volumes else None
        except (SeriesCheckError, LoadError):
            cache.mark_failed(series_id, last_received_at)  # decided (and quarantined) at the close, with the reason
            continue
        cache.put(series_id, CheckedFiles(tuple(paths), tuple(headers), checked, last_received_at, volume))
        read += 1
    return read


def close_series(config: Config, db: AuditDB, series_id: int, cache: CheckedSeriesCache | None = None) -> int | None:
    """Check and route one quiet series. Returns the new job's id, or None."""
    with db.session() as session:
        series = session.get(SeriesRow, series_id)
        if series is None or series.state != SeriesState.RECEIVING:
            return None
        seen_count, seen_last = series.instance_count, series.last_received_at
        paths = series_instance_paths(session, series_id)

    # Reading headers is the slow part: do it outside any transaction so that reception goes on.
    problem: str | None = None
    check_started_at, started = utcnow(), time.perf_counter()
    checked_files = cache.peek(series_id, paths, seen_last) if cache is not None else None  # read in the quiet period
    if checked_files is None:
        try:
            headers = read_headers(paths)
            checked_files = CheckedFiles(tuple(paths), tuple(headers), check_series(headers, paths), seen_last)
        except (SeriesCheckError, LoadError) as exc:
            problem = str(exc)
    check_s = time.perf_counter() - started

    quarantine_move: tuple[Path, Path] | None = None
    job_id: int | None = None
    with db.session() as session:
        series = session.get(SeriesRow, series_id)
        if series is None or series.state != SeriesState.RECEIVING:
            return None
        if (series.instance_count, series.last_received_at) != (seen_count, seen_last):
            return None  # instances arrived meanwhile: not quiet after all, look again later
        series.closed_at = utcnow()
        if problem is not None:
            quarantine_move = _quarantine_rows(session, config, series, problem)
        else:
            job_id = _route(session, config, series)
            if job_id is not None:
                job = session.get(JobRow, job_id)
                assert job is not None
                quiet_s = (check_started_at - series.last_received_at).total_seconds()
                job.timings_s = {"quiet_period": round(quiet_s, 3), "check": round(check_s, 3)}
    if cache is not None:
        if job_id is not None and checked_files is not None:
            cache.put(series_id, checked_files)
        else:
            cache.discard(series_id)  # not routed or quarantined: nothing will ask for it
    if quarantine_move is not None:
        move_to_quarantine(*quarantine_move, reason=problem or "")  # after the commit (see _quarantine_rows)
    return job_id


def _route(session: Session, config: Config, series: SeriesRow) -> int | None:
    decision = routing.decide(
        config.routes,
        series_description=series.series_description,
        protocol_name=series.protocol_name,
        calling_aet=series.calling_aet,
    )
    if not decision.routed:
        _set_series_state(session, series, SeriesState.NOT_ROUTED, decision.reason)
        log.info("series %d (%d instances) not routed: %s", series.id, series.instance_count, decision.reason)
        return None
    _set_series_state(session, series, SeriesState.ROUTED, decision.reason)
    route = config.route(decision.route_name or "")
    job = jobs.create_job(
        session,
        series,
        route_name=route.name,
        destinations=decision.destinations,
        model=config.model,
        uid_root=config.node.uid_root,
        qa_policy=route.qa_policy,
        send_qa_report=route.send_qa_report,
        send_uncertainty=route.send_uncertainty,
    )
    log.info("series %d complete (%d instances): job %d queued", series.id, series.instance_count, job.id)
    return job.id


def _set_series_state(session: Session, series: SeriesRow, state: str, reason: str) -> None:
    from_state, series.state, series.reason = series.state, state, reason
    add_event(
        session,
        "series_state",
        reason,
        series_id=series.id,
        from_state=from_state,
        to_state=state,
        detail={"instances": series.instance_count},
    )


def _quarantine_rows(session: Session, config: Config, series: SeriesRow, reason: str) -> tuple[Path, Path]:
    """Mark the series QUARANTINED and point its instance rows at quarantine/; the files follow.

    The database is committed first and the folder moved after: should the node die in between,
    ``finish_quarantine_moves`` at start-up moves what is left in the spool.
    """
    _set_series_state(session, series, SeriesState.QUARANTINED, reason)
    spool_dir = config.storage.spool / series.series_instance_uid
    target = config.storage.quarantine / series.series_instance_uid
    for row in session.scalars(select(InstanceRow).where(InstanceRow.series_id == series.id)):
        path = Path(row.path)
        if path.parent == spool_dir:
            row.path = str(target / path.name)
    log.warning("series %d quarantined: %s", series.id, reason)
    return spool_dir, target


def move_to_quarantine(spool_dir: Path, target: Path, reason: str) -> None:
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    if spool_dir.is_dir():
        for path in spool_dir.iterdir():
            path.replace(target / path.name)
        shutil.rmtree(spool_dir, ignore_errors=True)
    (target / "QUARANTINE_REASON.txt").write_text(reason + "\n", encoding="utf-8")


def finish_quarantine_moves(config: Config, db: AuditDB) -> int:
    """Move the spool folders of QUARANTINED series that are still there (a crash, or late instances)."""
    moved = 0
    with db.session() as session:
        rows = session.execute(
            select(SeriesRow.series_instance_uid, SeriesRow.reason).where(SeriesRow.state == SeriesState.QUARANTINED)
        ).all()
    for series_uid, reason in rows:
        spool_dir = config.storage.spool / series_uid
        if spool_dir.is_dir():
            move_to_quarantine(spool_dir, config.storage.quarantine / series_uid, reason)
            moved += 1
    return moved
