"""Tamper evidence: `sct-node audit verify` on the database of a real run, then after edits by SQL.

A real node run (two series, one delivered, one quarantined, a restart in between) writes its
audit events; `audit verify` says OK. Then, each on a fresh copy of that database, someone edits
an event's message, edits a job-state event to hide a failure, deletes an event in the middle,
deletes the newest events, and inserts a forged event: `audit verify` must exit 1 and name the
event for every one of them.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from dicom_node.audit import JobRow, JobState, SeriesRow, SeriesState
from dicom_node.synthetic_mr import generate_mr_series
from tests.integration.harness import VENV_BIN, NodeProcess, node_config, storescu, wait_for


def _verify(config_path: Path, database: Path) -> subprocess.CompletedProcess[str]:
    text = config_path.read_text().replace(str(config_path.parent / "node" / "audit.sqlite"), str(database))
    copy_config = database.with_suffix(".toml")
    copy_config.write_text(text)
    return subprocess.run(
        [str(VENV_BIN / "sct-node"), "audit", "verify", "--config", str(copy_config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _edit_message(db: sqlite3.Connection) -> int:
    (event_id,) = db.execute("SELECT id FROM events WHERE kind = 'job_state' ORDER BY id LIMIT 1").fetchone()
    db.execute("UPDATE events SET message = message || ' (checked by Dr X)' WHERE id = ?", (event_id,))
    return event_id


def _hide_a_state(db: sqlite3.Connection) -> int:
    (event_id,) = db.execute("SELECT id FROM events WHERE to_state != '' ORDER BY id DESC LIMIT 1").fetchone()
    db.execute("UPDATE events SET to_state = 'DONE', from_state = 'RUNNING' WHERE id = ?", (event_id,))
    return event_id


def _delete_middle(db: sqlite3.Connection) -> int:
    (count,) = db.execute("SELECT count(*) FROM events").fetchone()
    (event_id,) = db.execute("SELECT id FROM events ORDER BY id LIMIT 1 OFFSET ?", (count // 2,)).fetchone()
    db.execute("DELETE FROM events WHERE id = ?", (event_id,))
    return event_id


def _truncate(db: sqlite3.Connection) -> int:
    (newest,) = db.execute("SELECT max(id) FROM events").fetchone()
    db.execute("DELETE FROM events WHERE id > ?", (newest - 3,))
    return newest - 2


def _forge(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT at, kind, seq, prev_hash, row_hash FROM events ORDER BY id DESC LIMIT 1").fetchone()
    cursor = db.execute(
        "INSERT INTO events (at, kind, from_state, to_state, message, detail, seq, prev_hash, row_hash) "
        "VALUES (?, 'job_state', 'FAILED', 'DONE', 'delivered', '{}', ?, ?, ?)",
        (row[0], row[2] + 1, row[4], "0" * 64),
    )
    return int(cursor.lastrowid or 0)


TAMPERING: dict[str, Callable[[sqlite3.Connection], int]] = {
    "message edited": _edit_message,
    "state change rewritten": _hide_a_state,
    "middle event deleted": _delete_middle,
    "newest events deleted": _truncate,
    "forged event inserted": _forge,
}


def test_audit_verify_detects_every_edit_of_a_real_runs_trail(orthanc, tmp_path, report):
    config = node_config(tmp_path, pacs_port=orthanc.dicom_port, model={"method": "bulk_density"})
    node = NodeProcess(config).start()
    db = node.db()
    try:
        good = generate_mr_series(tmp_path / "good", slices=12, rows=40, columns=40, patient_id="A")
        assert storescu(node.port, good[0].parent).returncode == 0
        wait_for(lambda: _job_state(db) == JobState.DONE, 120, "the first job delivered")
        node.stop()
        node = NodeProcess(config).start()  # a restart between the two series
        bad = generate_mr_series(tmp_path / "bad", slices=12, rows=40, columns=40, patient_id="B", drop_slices=[5])
        assert storescu(node.port, bad[0].parent).returncode == 0
        wait_for(lambda: _quarantined(db), 60, "the second series quarantined")
    finally:
        db.dispose()
        node.stop()

    database = tmp_path / "node" / "audit.sqlite"
    intact = _verify(config, database)
    assert intact.returncode == 0 and intact.stdout.startswith("OK"), intact.stdout + intact.stderr
    events = int(intact.stdout.split(" events")[0].rsplit(" ", 1)[1])

    found: dict[str, str] = {}
    for name, tamper in TAMPERING.items():
        copy = tmp_path / f"copy_{name.replace(' ', '_')}.sqlite"
        shutil.copy(database, copy)
        with sqlite3.connect(copy) as connection:
            touched_id = tamper(connection)
        result = _verify(config, copy)
        assert result.returncode == 1, f"{name}: not detected\n{result.stdout}"
        assert result.stdout.startswith("BROKEN"), result.stdout
        problems = [line.strip() for line in result.stdout.splitlines()[1:]]
        assert problems, result.stdout
        assert name != "message edited" or str(touched_id) in result.stdout, result.stdout
        found[name] = problems[0]

    report(
        did=(
            f"a real run's audit trail ({events} events: one series delivered, one quarantined, one restart); "
            f"{len(TAMPERING)} kinds of tampering by SQL on copies: {', '.join(TAMPERING)}"
        ),
        result=(
            "`sct-node audit verify` said OK on the untouched trail and exited 1 on each tampered copy, naming the "
            f"event (e.g. {next(iter(found.values()))!r})"
        ),
        events=events,
        tamperings=len(TAMPERING),
    )


def _job_state(db) -> str | None:
    with db.session() as session:
        job = session.scalars(select(JobRow)).first()
        return job.state if job is not None else None


def _quarantined(db) -> bool:
    with db.session() as session:
        return SeriesState.QUARANTINED in set(session.scalars(select(SeriesRow.state)))
