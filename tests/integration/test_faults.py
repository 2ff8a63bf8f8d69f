"""Faults: the destination down at first; kill -9 of the node while a job runs."""

from __future__ import annotations

import time

from sqlalchemy import select

from dicom_node.audit import EventRow, JobRow, JobState, SendRow
from dicom_node.peers import Orthanc, free_port
from dicom_node.synthetic_mr import generate_mr_series
from tests.integration.harness import (
    NodeProcess,
    node_config,
    require_binary,
    shared_series,
    storescu,
    wait_for,
)


def _job(db):
    with db.session() as session:
        return session.scalars(select(JobRow)).first()


def _ct_series(pacs: Orthanc) -> list[dict]:
    return [s for s in pacs.series() if s["MainDicomTags"].get("Modality") == "CT"]


def test_destination_down_at_first_then_up_gets_the_sct_after_a_retry(tmp_path):
    require_binary("Orthanc", "orthanc")
    pacs_port = free_port()
    node = NodeProcess(node_config(tmp_path, pacs_port=pacs_port, sender={"max_attempts": 10})).start()
    try:
        generate_mr_series(tmp_path / "mr", slices=24, rows=48, columns=48)
        assert storescu(node.port, tmp_path / "mr").returncode == 0
        db = node.db()

        def failed_attempt():
            with db.session() as session:
                return session.scalars(select(SendRow).where(SendRow.ok.is_(False))).first()

        first = wait_for(failed_attempt, 120, "a failed send attempt while the PACS is down")
        assert "cannot connect" in first.message or "association" in first.message
        assert _job(db).state == JobState.SENDING
        with Orthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
            wait_for(lambda: _job(db).state == JobState.DONE, 60, "delivery after the PACS came up")
            job = _job(db)
            assert job.send_attempts >= 2
            series = wait_for(lambda: _ct_series(pacs), 20, "the sCT in Orthanc")
            assert len(series) == 1 and len(series[0]["Instances"]) == job.sct_instance_count
        with db.session() as session:
            retries = session.scalars(select(EventRow).where(EventRow.kind == "send_retry")).all()
            assert retries
    finally:
        node.stop()


def test_kill_9_while_a_job_runs_then_restart_delivers_exactly_one_series(orthanc, tmp_path):
    config = node_config(tmp_path, pacs_port=orthanc.dicom_port)
    node = NodeProcess(config).start()
    mr_dir = shared_series("philips_mprage_sagittal")
    assert storescu(node.port, mr_dir).returncode == 0
    db = node.db()
    wait_for(
        lambda: (job := _job(db)) is not None and job.state == JobState.RUNNING,
        120,
        "the job to run",
        interval_s=0.02,
    )
    node.kill9()
    assert _job(db).state == JobState.RUNNING  # the database says what was happening when the node died
    restarted = NodeProcess(config).start()
    try:
        wait_for(lambda: _job(db).state == JobState.DONE, 300, "the job to finish after the restart")
        job = _job(db)
        assert job.run_attempts == 2
        time.sleep(1.0)
        series = _ct_series(orthanc)
        assert len(series) == 1, series
        assert len(series[0]["Instances"]) == job.sct_instance_count
        with db.session() as session:
            messages = session.scalars(select(EventRow.message).where(EventRow.job_id == job.id)).all()
            assert any("restarted while the job was running" in m for m in messages)
        outbox = config.parent / "node" / "outbox"
        assert not list(outbox.glob(".*.tmp-*")), "a partial sCT write was left behind"
    finally:
        restarted.stop()
