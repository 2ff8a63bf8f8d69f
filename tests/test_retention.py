from __future__ import annotations

import datetime as dt

from dicom_node import jobs, retention
from dicom_node.audit import AuditDB, JobRow, JobState, SeriesRow, SeriesState, utcnow
from dicom_node.config import load_config, with_overrides


def _setup(tmp_path, state: str, finished_days_ago: float):
    config = with_overrides(load_config(), storage={"root": tmp_path}, jobs={"retention_days": 30})
    db = AuditDB(f"sqlite:///{tmp_path / 'a.sqlite'}")
    uid = f"1.2.3.{int(finished_days_ago)}.{len(state)}"
    spool = config.storage.spool / uid
    spool.mkdir(parents=True)
    (spool / "x.dcm").write_bytes(b"mr")
    outbox = config.storage.outbox / f"job_{uid}"
    outbox.mkdir(parents=True)
    (outbox / "CT_0001.dcm").write_bytes(b"ct")
    when = utcnow() - dt.timedelta(days=finished_days_ago)
    with db.session() as session:
        series = SeriesRow(
            series_instance_uid=uid,
            study_instance_uid="1.2",
            first_received_at=when,
            last_received_at=when,
            closed_at=when,
            state=SeriesState.ROUTED,
        )
        session.add(series)
        session.flush()
        job = jobs.create_job(
            session, series, route_name="r", destinations=["planning_pacs"], model=config.model, uid_root=""
        )
        job.state, job.finished_at, job.output_dir = state, when, str(outbox)
    return config, db, spool, outbox


def test_delivered_series_are_deleted_after_retention(tmp_path):
    config, db, spool, outbox = _setup(tmp_path, JobState.DONE, 40)
    assert retention.clean(config, db) == 1
    assert not spool.exists() and not outbox.exists()
    with db.session() as session:
        assert session.query(JobRow).one().cleaned_at is not None
    assert retention.clean(config, db) == 0


def test_nothing_is_deleted_before_delivery_or_before_its_time(tmp_path):
    for index, (state, days) in enumerate([(JobState.FAILED, 40), (JobState.SENDING, 40), (JobState.DONE, 5)]):
        config, db, spool, outbox = _setup(tmp_path / str(index), state, days)
        assert retention.clean(config, db) == 0
        assert spool.exists() and outbox.exists()


def test_a_held_job_is_never_cleaned_and_a_rejected_one_is_after_its_time(tmp_path):
    # HELD: waiting for a person, however long (finished_at is not set for a HELD job; set here to be sure
    # the state alone protects it)
    config, db, spool, outbox = _setup(tmp_path / "held", JobState.HELD, 400)
    qa_dir = outbox.with_name(outbox.name + "_qa")
    qa_dir.mkdir()
    (qa_dir / "report.pdf").write_bytes(b"%PDF-")
    with db.session() as session:
        session.query(JobRow).one().qa_dir = str(qa_dir)
    assert retention.clean(config, db) == 0
    assert spool.exists() and outbox.exists() and qa_dir.exists()
    config, db, spool, outbox = _setup(tmp_path / "rejected", JobState.REJECTED, 40)
    qa_dir = outbox.with_name(outbox.name + "_qa")
    qa_dir.mkdir()
    with db.session() as session:
        session.query(JobRow).one().qa_dir = str(qa_dir)
    assert retention.clean(config, db) == 1
    assert not spool.exists() and not outbox.exists() and not qa_dir.exists()


def test_retention_zero_keeps_everything(tmp_path):
    config, db, spool, outbox = _setup(tmp_path, JobState.DONE, 400)
    config = with_overrides(config, jobs={"retention_days": 0})
    assert retention.clean(config, db) == 0
    assert spool.exists()


def test_retention_runs_hourly_or_ten_times_per_retention_time_when_shorter():
    from dicom_node.scheduler import RETENTION_INTERVAL_S, retention_interval_s

    assert retention_interval_s(30) == RETENTION_INTERVAL_S
    assert retention_interval_s(0) == RETENTION_INTERVAL_S  # retention off: the task finds nothing anyway
    assert retention_interval_s(60 / 86400) == 6.0
    assert retention_interval_s(1 / 86400) == 1.0  # never more than once a second
