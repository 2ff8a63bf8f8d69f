import datetime as dt

import pytest
from sqlalchemy import select

from dicom_node import jobs
from dicom_node.audit import (
    AuditDB,
    EventRow,
    JobRow,
    JobState,
    ReceivedInstance,
    SeriesRow,
    record_instances,
    utcnow,
)
from dicom_node.config import load_config
from dicom_node.errors import JobStateError


@pytest.fixture
def db(tmp_path):
    database = AuditDB(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    yield database
    database.dispose()


def _instance(sop_instance_uid: str, series_instance_uid: str = "1.2.3.4", path: str | None = "/x") -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        series_instance_uid=series_instance_uid,
        study_instance_uid="1.2.3",
        patient_id="P1",
        patient_name="Doe^Jane",
        modality="MR",
        series_description="T1",
        protocol_name="",
        calling_aet="SCANNER",
        path=path,  # type: ignore[arg-type]  # None: a row the database refuses
        size_bytes=1,
        received_at=utcnow(),
    )


def _series(db: AuditDB, uid: str = "1.2.3.4") -> int:
    instance = _instance(uid + ".1", uid)
    with db.session() as session:
        record_instances(session, [instance])
        return session.scalars(select(SeriesRow.id).where(SeriesRow.series_instance_uid == uid)).one()


def _job(db: AuditDB, series_uid: str = "1.2.3.4") -> int:
    series_id = _series(db, series_uid)
    with db.session() as session:
        series = session.get(SeriesRow, series_id)
        job = jobs.create_job(
            session, series, route_name="r", destinations=["pacs"], model=load_config().model, uid_root=""
        )
        return job.id


def test_create_job_fixes_a_deterministic_sct_series_uid(db, tmp_path):
    job_id = _job(db)
    with db.session() as session:
        job = session.get(JobRow, job_id)
        assert job.state == JobState.QUEUED
        first_uid = job.sct_series_uid
    other = AuditDB(f"sqlite:///{tmp_path / 'other.sqlite'}")
    with other.session() as session:
        pass
    again = _job(other)
    with other.session() as session:
        assert session.get(JobRow, again).sct_series_uid == first_uid  # derived from the MR series UID
    assert first_uid.startswith("1.2.826.0.1.3680043.8.498.")


def test_state_machine_allows_the_documented_path_and_refuses_others(db):
    job_id = _job(db)
    with db.session() as session:
        job = session.get(JobRow, job_id)
        with pytest.raises(JobStateError, match="QUEUED -> DONE is not allowed"):
            jobs.transition(session, job, JobState.DONE, "skip")
    with db.session() as session:
        claimed = jobs.claim_next_queued(session)
        assert claimed is not None and claimed.id == job_id and claimed.state == JobState.RUNNING
        assert jobs.claim_next_queued(session) is None
        jobs.transition(session, claimed, JobState.SENDING, "written")
        jobs.transition(session, claimed, JobState.DONE, "sent")
        assert claimed.finished_at is not None
    with db.session() as session:
        changes = session.execute(
            select(EventRow.from_state, EventRow.to_state).where(EventRow.job_id == job_id).order_by(EventRow.id)
        ).all()
    assert [tuple(c) for c in changes] == [
        ("", "QUEUED"),
        ("QUEUED", "RUNNING"),
        ("RUNNING", "SENDING"),
        ("SENDING", "DONE"),
    ]


def test_recover_after_restart_requeues_running_and_resumes_sending(db):
    running, sending = _job(db, "1.2.3.10"), _job(db, "1.2.3.11")
    with db.session() as session:
        jobs.claim_next_queued(session)
        job = jobs.claim_next_queued(session)
        jobs.transition(session, job, JobState.SENDING, "written")
        job.next_send_at = utcnow() + dt.timedelta(hours=1)
    with db.session() as session:
        counts = jobs.recover_after_restart(session)
    assert counts == {"requeued": 1, "resumed_sending": 1}
    with db.session() as session:
        assert session.get(JobRow, running).state == JobState.QUEUED
        assert session.get(JobRow, sending).next_send_at is None
        assert jobs.jobs_due_for_sending(session) == [sending]


def test_resend_of_failed_job_requeues_when_outbox_is_gone_and_sends_when_present(db, tmp_path):
    job_id = _job(db)
    with db.session() as session:
        job = jobs.claim_next_queued(session)
        jobs.transition(session, job, JobState.FAILED, "boom")
        job.error = "boom"
    with db.session() as session:
        assert jobs.request_resend(session, job_id) == JobState.QUEUED
    outbox = tmp_path / "job"
    outbox.mkdir()
    (outbox / "CT_0001.dcm").write_bytes(b"x")
    qa_dir = tmp_path / "job_qa"
    qa_dir.mkdir()
    with db.session() as session:  # the sCT written, but the QA never finished: computed again, QA included
        job = jobs.claim_next_queued(session)
        job.output_dir, job.sct_instance_count, job.qa_dir = str(outbox), 1, str(qa_dir)
        jobs.transition(session, job, JobState.FAILED, "QA crashed")
    with db.session() as session:
        assert jobs.request_resend(session, job_id) == JobState.QUEUED
    with db.session() as session:  # cleared by its QA, failed in sending; its report is missing: recompute
        job = jobs.claim_next_queued(session)
        job.qa_verdict, job.qa_decision, job.qa_deliverables = "pass", "send", ["report.dcm"]
        jobs.transition(session, job, JobState.FAILED, "send failed")
    with db.session() as session:
        assert jobs.request_resend(session, job_id) == JobState.QUEUED
    (qa_dir / "report.dcm").write_bytes(b"x")
    with db.session() as session:  # everything there: sent again
        job = jobs.claim_next_queued(session)
        jobs.transition(session, job, JobState.FAILED, "send failed")
    with db.session() as session:
        assert jobs.request_resend(session, job_id) == JobState.SENDING
        assert session.get(JobRow, job_id).send_attempts == 0
    with db.session() as session, pytest.raises(JobStateError, match="still being processed"):
        jobs.request_resend(session, job_id)
    with db.session() as session, pytest.raises(JobStateError, match="no job 999"):
        jobs.request_resend(session, 999)


def test_instances_duplicates_and_late_arrivals_are_recorded(db):
    series_id = _series(db)
    with db.session() as session:
        series = session.get(SeriesRow, series_id)
        assert series.instance_count == 1
    with db.session() as session:
        record_instances(
            session,
            [
                _instance("1.2.3.4.1"),
                _instance("1.2.3.4.2"),
            ],
        )
    with db.session() as session:
        series = session.get(SeriesRow, series_id)
        assert series.instance_count == 2  # one duplicate, one new
        series.state = "ROUTED"
    with db.session() as session:
        record_instances(session, [_instance("1.2.3.4.3")])
    with db.session() as session:
        kinds = session.scalars(select(EventRow.kind).where(EventRow.series_id == series_id)).all()
        assert "late_instances" in kinds


def test_recorder_writes_the_good_rows_of_a_batch_with_a_bad_one(db):
    from dicom_node.audit import InstanceRecorder, InstanceRow

    recorder = InstanceRecorder(db, flush_interval_s=0.5)
    recorder.record(_instance("1.2.3.9.1", "1.2.3.9", path="/a"))
    recorder.record(_instance("1.2.3.9.2", "1.2.3.9", path=None))  # NOT NULL violated
    recorder.record(_instance("1.2.3.9.3", "1.2.3.9", path="/c"))
    assert recorder.flush(timeout_s=30)
    recorder.close()
    with db.session() as session:
        assert sorted(session.scalars(select(InstanceRow.sop_instance_uid))) == ["1.2.3.9.1", "1.2.3.9.3"]
