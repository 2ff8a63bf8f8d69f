"""The audit events' hash chain: built under concurrency (threads and processes), every kind of
tampering detected, migration of a database from before the chain, and the file modes."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node import jobs
from dicom_node.__main__ import main
from dicom_node.audit import (
    GENESIS_HASH,
    AuditDB,
    ChainHeadRow,
    EventRow,
    JobRow,
    JobState,
    SeriesRow,
    add_event,
    event_hash,
    utcnow,
)
from dicom_node.audit.verify import verify_chain
from dicom_node.config import DEFAULT_CONFIG_PATH, load_config
from dicom_node.errors import AuditChainError
from tests.integration.harness import dump_toml

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.sqlite"


@pytest.fixture
def db(db_path: Path) -> Iterator[AuditDB]:
    database = AuditDB(f"sqlite:///{db_path}")
    yield database
    database.dispose()


def _append(db: AuditDB, count: int, kind: str = "test") -> list[int]:
    ids = []
    for index in range(count):
        with db.session() as session:
            row = add_event(session, kind, f"{kind} event {index}", detail={"index": index, "pair": (index, -index)})
            session.flush()
            ids.append(row.id)
    return ids


def _raw(db_path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Tamper with the file directly, as someone with sqlite3 and write access would."""
    connection = sqlite3.connect(db_path)
    try:
        with connection:
            for sql, params in statements:
                connection.execute(sql, params)
    finally:
        connection.close()


def _row(db_path: Path, sql: str, params: tuple[object, ...] = ()) -> tuple:
    connection = sqlite3.connect(db_path)
    try:
        return connection.execute(sql, params).fetchone()
    finally:
        connection.close()


def _problems(db: AuditDB) -> list[tuple[str, int | None]]:
    report = verify_chain(db)
    assert not report.ok
    return [(problem.kind, problem.event_id) for problem in report.problems]


# The chain, built concurrently -------------------------------------------------------------------


def test_chain_built_by_eight_threads_is_one_intact_chain(db: AuditDB) -> None:
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            start.wait()
            _append(db, 50, kind=name)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"writer{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    report = verify_chain(db)
    assert report.ok, report.problems
    assert report.events == 400 and report.head_seq == 400
    with db.session() as session:
        rows = session.execute(select(EventRow.seq, EventRow.prev_hash, EventRow.row_hash).order_by(EventRow.seq)).all()
        head = session.get(ChainHeadRow, 1)
    assert [row.seq for row in rows] == list(range(1, 401))
    assert rows[0].prev_hash == GENESIS_HASH
    assert all(later.prev_hash == earlier.row_hash for earlier, later in zip(rows, rows[1:], strict=False))
    assert head is not None and head.head_hash == rows[-1].row_hash == report.head_hash


def test_a_transaction_holds_the_write_lock_from_its_first_read(db: AuditDB, db_path: Path) -> None:
    """BEGIN IMMEDIATE: once a session has read the chain head, no other writer can get in before it commits."""
    other = sqlite3.connect(db_path, timeout=0.2, isolation_level=None)
    try:
        with db.session() as session:
            session.execute(select(ChainHeadRow.seq)).all()
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # free again after the commit
        other.execute("ROLLBACK")
        with db.reading() as session:  # reports take no write lock, but read in a transaction (one snapshot)
            session.execute(select(ChainHeadRow.seq)).all()
            assert session.connection().connection.dbapi_connection.in_transaction
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        other.close()


def test_verify_while_events_are_appended_sees_one_snapshot(db: AuditDB) -> None:
    """The head and the events are read in one snapshot: no false alarm while the node writes."""
    done = threading.Event()

    def writer() -> None:
        try:
            _append(db, 300)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reports = []
    while not done.is_set():
        reports.append(verify_chain(db))
    thread.join()
    assert len(reports) >= 2
    assert all(report.ok for report in reports), [r.problems for r in reports if not r.ok][:1]
    assert sorted({report.events for report in reports})[-1] <= 300 and verify_chain(db).events == 300


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sqlalchemy import func, select
    from dicom_node.audit import AuditDB, EventRow, add_event

    url, name, other, go, count = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])
    db = AuditDB(url)
    while not go.exists():
        time.sleep(0.01)
    for index in range(count):
        with db.session() as session:
            add_event(session, name, f"{name} {index}")
        if index == 0:  # make sure the other process is writing too before going on
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with db.reading() as session:
                    if session.scalar(select(func.count()).where(EventRow.kind == other)):
                        break
                time.sleep(0.01)
    db.dispose()
    """
)


def test_two_processes_appending_at_once_give_one_intact_chain(db: AuditDB, tmp_path: Path) -> None:
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, db.url, name, other, str(go), "150"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, other in (("proc_a", "proc_b"), ("proc_b", "proc_a"))
    ]
    go.touch()
    for writer in writers:
        _, stderr = writer.communicate(timeout=300)
        assert writer.returncode == 0, stderr
    report = verify_chain(db)
    assert report.ok, report.problems
    assert report.events == 300
    with db.reading() as session:
        kinds = list(session.scalars(select(EventRow.kind).order_by(EventRow.seq)))
    assert sorted(set(kinds)) == ["proc_a", "proc_b"] and kinds.count("proc_a") == 150
    switches = sum(a != b for a, b in zip(kinds, kinds[1:], strict=False))
    assert switches >= 2, f"the two writers did not overlap ({switches} switches)"


def test_an_event_and_the_state_change_it_records_share_one_transaction(db: AuditDB) -> None:
    with db.session() as session:
        series = SeriesRow(
            series_instance_uid="1.2.3",
            study_instance_uid="1.2",
            first_received_at=utcnow(),
            last_received_at=utcnow(),
        )
        session.add(series)
        session.flush()
        job_id = jobs.create_job(
            session, series, route_name="r", destinations=["pacs"], model=load_config().model, uid_root=""
        ).id
    with pytest.raises(RuntimeError), db.session() as session:
        job = session.get(JobRow, job_id)
        assert job is not None
        jobs.transition(session, job, JobState.FAILED, "about to be rolled back")
        raise RuntimeError("the transaction fails after the event was added")
    with db.session() as session:
        job = session.get(JobRow, job_id)
        assert job is not None and job.state == JobState.QUEUED
        assert list(session.scalars(select(EventRow.to_state).order_by(EventRow.seq))) == ["QUEUED"]
        jobs.transition(session, job, JobState.FAILED, "this one is kept")
    report = verify_chain(db)
    assert report.ok and report.events == 2 and report.head_seq == 2


# Tampering --------------------------------------------------------------------------------------


def test_an_edited_message_is_detected_and_named(db: AuditDB, db_path: Path) -> None:
    ids = _append(db, 10)
    assert verify_chain(db).ok
    _raw(db_path, ("UPDATE events SET message = 'all fine' WHERE id = ?", (ids[4],)))
    assert _problems(db) == [("edited", ids[4])]


@pytest.mark.parametrize(
    ("column", "value"),
    [("at", "2020-01-01 00:00:00.000000"), ("kind", "other"), ("series_id", 7), ("to_state", "DONE"), ("detail", "{}")],
)
def test_an_edit_of_any_content_field_is_detected(db: AuditDB, db_path: Path, column: str, value: object) -> None:
    ids = _append(db, 3)
    _raw(db_path, (f"UPDATE events SET {column} = ? WHERE id = ?", (value, ids[1])))  # noqa: S608 - test input
    assert _problems(db) == [("edited", ids[1])]


def test_an_edit_with_its_hash_recomputed_is_detected_at_the_next_link(db: AuditDB, db_path: Path) -> None:
    ids = _append(db, 6)
    with db.session() as session:
        row = session.get(EventRow, ids[2])
        assert row is not None
        forged = event_hash(
            row.prev_hash,
            at=row.at,
            kind=row.kind,
            series_id=row.series_id,
            job_id=row.job_id,
            from_state=row.from_state,
            to_state=row.to_state,
            message="rewritten",
            detail=row.detail,
        )
    _raw(db_path, ("UPDATE events SET message = 'rewritten', row_hash = ? WHERE id = ?", (forged, ids[2])))
    assert _problems(db) == [("edited", ids[2])]


def test_a_deleted_middle_event_is_detected(db: AuditDB, db_path: Path) -> None:
    ids = _append(db, 10)
    _raw(db_path, ("DELETE FROM events WHERE id = ?", (ids[4],)))
    report = verify_chain(db)
    assert [(p.kind, p.event_id) for p in report.problems] == [("missing", ids[5])]
    assert "event seq 5 before it is missing" in report.problems[0].message


def test_deleted_newest_events_are_detected_by_the_head(db: AuditDB, db_path: Path) -> None:
    ids = _append(db, 10)
    _raw(db_path, ("DELETE FROM events WHERE id IN (?, ?)", (ids[8], ids[9])))
    report = verify_chain(db)
    assert [(p.kind, p.event_id) for p in report.problems] == [("missing", None)]
    assert "events seq 9..10 are missing" in report.problems[0].message


def test_a_deleted_chain_head_is_detected_and_stops_appends(db: AuditDB, db_path: Path) -> None:
    _append(db, 3)
    _raw(db_path, ("DELETE FROM audit_chain_head", ()))
    assert _problems(db) == [("missing", None)]
    with pytest.raises(AuditChainError, match="head .* is missing"), db.session() as session:
        add_event(session, "test", "cannot be chained")
    reopened = AuditDB(db.url)  # opening does not quietly recreate the head
    try:
        assert _problems(reopened) == [("missing", None)]
    finally:
        reopened.dispose()


def test_a_deleted_chain_head_is_restored_only_when_every_event_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(_config_file(tmp_path))
    db_path = tmp_path / "node" / "audit.sqlite"
    db = AuditDB(f"sqlite:///{db_path}")
    try:
        ids = _append(db, 5)
        assert main(["audit", "restore-head", "--config", config]) == 1  # the head is there
        assert "nothing to restore" in capsys.readouterr().err
        _raw(db_path, ("DELETE FROM audit_chain_head", ()), ("UPDATE events SET message = 'x' WHERE id = ?", (ids[2],)))
        assert main(["audit", "restore-head", "--config", config]) == 1  # an edited event too: a backup's job
        assert "1 event(s) fail verification too" in capsys.readouterr().err
        assert _problems(db) == [("edited", ids[2]), ("missing", None)]

        fresh = tmp_path / "fresh"
        fresh.mkdir()
        fresh_config = str(_config_file(fresh))
        fresh_db = AuditDB(f"sqlite:///{fresh / 'node' / 'audit.sqlite'}")
        _append(fresh_db, 5)
        _raw(fresh / "node" / "audit.sqlite", ("DELETE FROM audit_chain_head", ()))
        assert main(["audit", "restore-head", "--config", fresh_config]) == 0
        assert "audit chain head restored at event seq 5" in capsys.readouterr().out
        with fresh_db.session() as session:  # events can be added again, and the repair is one of them
            add_event(session, "test", "chained again")
        report = verify_chain(fresh_db)
        assert report.ok and report.events == 7 and report.head_seq == 7, report.problems
        with fresh_db.reading() as session:
            kinds = list(session.scalars(select(EventRow.kind).order_by(EventRow.seq)))
        assert kinds[-2:] == ["audit_chain_head_restored", "test"]
        fresh_db.dispose()
    finally:
        db.dispose()


def test_swapped_positions_are_detected_as_reordered(db: AuditDB, db_path: Path) -> None:
    ids = _append(db, 8)
    _raw(
        db_path,
        ("UPDATE events SET seq = -1 WHERE id = ?", (ids[3],)),
        ("UPDATE events SET seq = 4 WHERE id = ?", (ids[4],)),
        ("UPDATE events SET seq = 5 WHERE id = ?", (ids[3],)),
    )
    problems = _problems(db)
    assert {kind for kind, _ in problems} == {"reordered"}
    assert {ids[3], ids[4]} <= {event_id for _, event_id in problems}


def test_swapped_ids_are_detected_as_reordered(db: AuditDB, db_path: Path) -> None:
    """`audit show` lists by id: swapping two rows' ids reorders the history it prints."""
    ids = _append(db, 8)
    _raw(
        db_path,
        ("UPDATE events SET id = -1 WHERE id = ?", (ids[3],)),
        ("UPDATE events SET id = ? WHERE id = ?", (ids[3], ids[4])),
        ("UPDATE events SET id = ? WHERE id = -1", (ids[4],)),
    )
    assert _problems(db) == [("reordered", ids[3])]


def _forge(db: AuditDB, prev_hash: str, message: str) -> tuple[str, str]:
    at = utcnow()
    return at.isoformat(sep=" ", timespec="microseconds"), event_hash(
        prev_hash,
        at=at,
        kind="test",
        series_id=None,
        job_id=None,
        from_state="",
        to_state="",
        message=message,
        detail={},
    )


def test_a_correctly_hashed_event_inserted_in_the_middle_is_detected(db: AuditDB, db_path: Path) -> None:
    ids = _append(db, 8)
    prev_hash = _row(db_path, "SELECT row_hash FROM events WHERE seq = 4")[0]
    at, forged_hash = _forge(db, prev_hash, "forged")
    _raw(
        db_path,
        ("UPDATE events SET seq = -seq WHERE seq > 4", ()),
        ("UPDATE events SET seq = 1 - seq WHERE seq < 0", ()),
        (
            "INSERT INTO events (id, at, kind, series_id, job_id, from_state, to_state, message, detail, seq, "
            "prev_hash, row_hash) VALUES (1000, ?, 'test', NULL, NULL, '', '', 'forged', '{}', 5, ?, ?)",
            (at, prev_hash, forged_hash),
        ),
    )
    problems = _problems(db)
    assert ("inserted", 1000) in problems
    assert {kind for kind, _ in problems} <= {"inserted", "reordered"}  # the forged id is out of order too
    assert ids[4] in {event_id for _, event_id in problems}


def test_a_correctly_hashed_event_appended_behind_the_nodes_back_is_detected(db: AuditDB, db_path: Path) -> None:
    _append(db, 5)
    prev_hash = _row(db_path, "SELECT row_hash FROM events WHERE seq = 5")[0]
    at, forged_hash = _forge(db, prev_hash, "appended")
    _raw(
        db_path,
        (
            "INSERT INTO events (id, at, kind, series_id, job_id, from_state, to_state, message, detail, seq, "
            "prev_hash, row_hash) VALUES (77, ?, 'test', NULL, NULL, '', '', 'appended', '{}', 6, ?, ?)",
            (at, prev_hash, forged_hash),
        ),
    )
    assert _problems(db) == [("inserted", 77)]


# The command line -------------------------------------------------------------------------------


def _config_file(tmp_path: Path) -> Path:
    data = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())
    data["storage"]["root"] = str(tmp_path / "node")
    data["model"]["checkpoint"] = str(load_config().model.checkpoint)
    data["audit"]["url"] = f"sqlite:///{tmp_path / 'node' / 'audit.sqlite'}"
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(data))
    return path


def test_audit_verify_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_config_file(tmp_path))
    assert main(["audit", "verify", "--config", config]) == 1  # no database yet
    assert "no audit database" in capsys.readouterr().err
    db = AuditDB(f"sqlite:///{tmp_path / 'node' / 'audit.sqlite'}")
    ids = _append(db, 12)
    db.dispose()
    assert main(["audit", "verify", "--config", config]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: audit chain intact, 12 events, head seq 12 sha256 ")
    _raw(tmp_path / "node" / "audit.sqlite", ("UPDATE events SET message = 'x' WHERE id = ?", (ids[6],)))
    assert main(["audit", "verify", "--config", config]) == 1
    out = capsys.readouterr().out
    assert out.startswith("BROKEN: 1 problem(s)")
    assert f"event id {ids[6]} (seq 7): edited" in out
    completed = subprocess.run(
        [sys.executable, "-m", "dicom_node", "audit", "verify", "--config", config],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=120,
        check=False,
    )
    assert completed.returncode == 1 and "edited" in completed.stdout


# Migration of a database from before the chain ----------------------------------------------------

_OLD_EVENTS = """
CREATE TABLE events (
    id INTEGER NOT NULL PRIMARY KEY, at DATETIME NOT NULL, kind VARCHAR(32) NOT NULL,
    series_id INTEGER REFERENCES series (id), job_id INTEGER REFERENCES jobs (id),
    from_state VARCHAR(16) NOT NULL, to_state VARCHAR(16) NOT NULL, message TEXT NOT NULL, detail JSON NOT NULL
)
"""


def test_a_database_from_before_the_chain_is_sealed_once(db_path: Path) -> None:
    connection = sqlite3.connect(db_path)
    connection.execute(_OLD_EVENTS)
    for index in range(3):
        connection.execute(
            "INSERT INTO events (at, kind, from_state, to_state, message, detail) VALUES (?, 'old', '', '', ?, ?)",
            (f"2025-01-0{index + 1} 10:00:00.000000", f"old event {index}", f'{{"n": {index}}}'),
        )
    connection.commit()
    connection.close()

    db = AuditDB(f"sqlite:///{db_path}")
    try:
        report = verify_chain(db)
        assert report.ok, report.problems
        assert report.events == 4 and report.sealed_events == 3 and report.sealed_at is not None
        _append(db, 2)
    finally:
        db.dispose()
    again = AuditDB(f"sqlite:///{db_path}")  # a second opening does not migrate again
    try:
        with again.reading() as session:
            kinds = list(session.scalars(select(EventRow.kind).order_by(EventRow.seq)))
        assert kinds == ["old", "old", "old", "audit_chain_sealed", "test", "test"]
        assert verify_chain(again).ok
        _raw(db_path, ("UPDATE events SET message = 'changed' WHERE id = 2", ()))
        assert _problems(again) == [("edited", 2)]
    finally:
        again.dispose()
    indexes = {row[0] for row in sqlite3.connect(db_path).execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"ix_events_seq", "ix_events_row_hash"} <= indexes


def test_a_half_migrated_events_table_is_refused(db_path: Path) -> None:
    connection = sqlite3.connect(db_path)
    connection.execute(_OLD_EVENTS)
    connection.execute("ALTER TABLE events ADD COLUMN seq INTEGER")
    connection.commit()
    connection.close()
    with pytest.raises(AuditChainError, match="missing prev_hash, row_hash"):
        AuditDB(f"sqlite:///{db_path}")


# Sessions and files -----------------------------------------------------------------------------


def test_reading_sessions_refuse_to_write(db: AuditDB) -> None:
    with pytest.raises(AuditChainError, match="read-only"), db.reading() as session:
        add_event(session, "test", "must not be written")
    with pytest.raises(AuditChainError, match="read-only"), db.reading() as session:
        session.add(
            SeriesRow(
                series_instance_uid="9", study_instance_uid="9", first_received_at=utcnow(), last_received_at=utcnow()
            )
        )
        session.flush()
    assert verify_chain(db).events == 0


def test_a_new_sqlite_database_and_its_wal_files_are_private(tmp_path: Path) -> None:
    previous = os.umask(0)  # the CLI runs with the user's umask; even 0 must not widen the files
    try:
        db = AuditDB(f"sqlite:///{tmp_path / 'new' / 'audit.sqlite'}")
        _append(db, 2)
        with db.engine.connect() as connection:  # the pragmas still apply under the BEGIN recipe
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        files = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "new").iterdir()}
        db.dispose()
    finally:
        os.umask(previous)
    assert set(files) >= {"audit.sqlite", "audit.sqlite-wal", "audit.sqlite-shm"}
    assert all(mode == 0o600 for mode in files.values()), {name: oct(mode) for name, mode in files.items()}
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
