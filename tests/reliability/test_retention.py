"""Retention in a running node: delivered series are cleaned after their time, undelivered ones never.

Two scanners route to two destinations: SCANNER_A's series goes to Orthanc (up), SCANNER_B's to a
PACS that is down. With a retention time of a few seconds, the node deletes series A's spool
folder and sCT outbox once A is DONE and its time has passed, while B's files stay for as long as
B is undelivered, however old they get. When B's PACS comes up, B is delivered and its files go
after their own retention time. The audit rows stay, with an event for each cleaning.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import select

from dicom_node.audit import EventRow, JobRow, JobState, SeriesRow
from dicom_node.peers import FileStoreSCP, free_port
from dicom_node.synthetic_mr import generate_mr_series
from tests.integration.harness import NodeProcess, node_config, storescu, wait_for
from tests.reliability.conftest import scale

RETENTION_S = scale(6.0, 30.0)
HELD_FOR_S = scale(3 * 6.0, 2 * 60.0)  # how long past its retention time the undelivered series is watched


def _route(name: str, calling_aet: str, destination: str) -> dict:
    return {
        "name": name,
        "description_pattern": ".*",
        "exclude_pattern": "(?!x)x",
        "calling_aet_pattern": calling_aet,
        "destinations": [destination],
    }


def _destination(name: str, port: int) -> dict:
    return {"name": name, "ae_title": "PLANNING", "host": "127.0.0.1", "port": port, "tls": False, "associations": 1}


def _job_for(db, calling_aet: str) -> JobRow | None:
    with db.session() as session:
        return session.scalars(
            select(JobRow).join(SeriesRow, JobRow.series_id == SeriesRow.id).where(SeriesRow.calling_aet == calling_aet)
        ).first()


def _series_files(root: Path, job: JobRow, series_uid: str) -> dict[str, bool]:
    return {"spool": (root / "spool" / series_uid).exists(), "outbox": Path(job.output_dir).exists()}


def test_only_delivered_series_are_cleaned_and_only_after_their_time(orthanc, tmp_path, report):
    down_port = free_port()
    config = node_config(
        tmp_path,
        pacs_port=orthanc.dicom_port,
        destination=[_destination("pacs_up", orthanc.dicom_port), _destination("pacs_down", down_port)],
        route=[_route("a", "SCANNER_A", "pacs_up"), _route("b", "SCANNER_B", "pacs_down")],
        jobs={"retention_days": RETENTION_S / 86400.0},
        sender={"max_attempts": 1000, "first_retry_s": 1.0, "max_retry_s": 2.0},
        model={"method": "bulk_density"},
    )
    root = tmp_path / "node"
    node = NodeProcess(config).start()
    db = node.db()
    try:
        for scanner, seed in (("SCANNER_A", 1), ("SCANNER_B", 2)):
            folder = tmp_path / f"mr_{scanner}"
            generate_mr_series(folder, slices=12, rows=40, columns=40, patient_id=scanner, seed=seed)
            assert storescu(node.port, folder, calling_aet=scanner).returncode == 0

        job_a = wait_for(lambda: (j := _job_for(db, "SCANNER_A")) and j.state == JobState.DONE and j, 120, "A DONE")
        job_b = wait_for(lambda: (j := _job_for(db, "SCANNER_B")) and j.state == JobState.SENDING and j, 120, "B")
        uid_a = _series_uid(db, job_a)
        uid_b = _series_uid(db, job_b)
        assert _series_files(root, job_a, uid_a) == {"spool": True, "outbox": True}  # not before its time

        wait_for(lambda: not any(_series_files(root, job_a, uid_a).values()), RETENTION_S + 30, "A cleaned")
        cleaned_a_after_s = (_cleaned_at(db, job_a) - _job(db, job_a.id).finished_at).total_seconds()
        assert cleaned_a_after_s >= RETENTION_S

        # B is undelivered: however long past its retention time, nothing of it goes.
        deadline = time.monotonic() + HELD_FOR_S
        while time.monotonic() < deadline:
            assert _series_files(root, job_b, uid_b) == {"spool": True, "outbox": True}, "undelivered files deleted"
            time.sleep(0.5)
        assert _job(db, job_b.id).state == JobState.SENDING and _job(db, job_b.id).send_attempts >= 3

        with FileStoreSCP(tmp_path / "pacs_down", port=down_port) as late_pacs:
            wait_for(lambda: _job(db, job_b.id).state == JobState.DONE, 60, "B delivered when its PACS came up")
            assert len(list(late_pacs.folder.glob("*.dcm"))) == job_b.sct_instance_count
            wait_for(lambda: not any(_series_files(root, job_b, uid_b).values()), RETENTION_S + 30, "B cleaned")
        with db.session() as session:
            events = session.scalars(select(EventRow).where(EventRow.kind == "retention")).all()
            assert len(events) == 2
            assert session.scalars(select(SeriesRow)).all()  # the audit rows stay
        ct = [s for s in orthanc.series() if s["MainDicomTags"].get("Modality") == "CT"]
        assert len(ct) == 1 and len(ct[0]["Instances"]) == job_a.sct_instance_count
    finally:
        db.dispose()
        node.stop()

    report(
        did=(
            f"retention time {RETENTION_S:.0f} s; series A delivered, series B routed to a PACS that was down and "
            f"watched for {HELD_FOR_S:.0f} s past its retention time, then the PACS came up"
        ),
        result=(
            f"A's spool and outbox deleted {cleaned_a_after_s:.1f} s after delivery (not before); B's files kept "
            f"while undelivered ({_job(db, job_b.id).send_attempts} send attempts), deleted only after its delivery "
            "and retention time; audit rows kept, one retention event per series"
        ),
        retention_s=RETENTION_S,
        undelivered_watched_s=HELD_FOR_S,
    )


def _job(db, job_id: int) -> JobRow:
    with db.session() as session:
        job = session.get(JobRow, job_id)
        assert job is not None
        return job


def _series_uid(db, job: JobRow) -> str:
    with db.session() as session:
        series = session.get(SeriesRow, job.series_id)
        assert series is not None
        return series.series_instance_uid


def _cleaned_at(db, job: JobRow):
    with db.session() as session:
        series = session.get(SeriesRow, job.series_id)
        assert series is not None and series.cleaned_at is not None
        return series.cleaned_at
