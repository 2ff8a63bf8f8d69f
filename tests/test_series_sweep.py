"""The quiet period counts only time the node was listening (a restart does not close a series early)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from dicom_node import series
from dicom_node.audit import AuditDB, SeriesRow, SeriesState, record_instances, utcnow
from tests.test_jobs import _instance


@pytest.fixture
def db(tmp_path):
    database = AuditDB(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    yield database
    database.dispose()


def _receive(db: AuditDB, received_at: dt.datetime, uid: str = "1.2.3.4") -> int:
    instance = dataclasses.replace(_instance(uid + ".1", uid), received_at=received_at)
    with db.session() as session:
        record_instances(session, [instance])
        return session.query(SeriesRow.id).filter(SeriesRow.series_instance_uid == uid).one()[0]


def test_a_series_quiet_for_longer_than_the_period_is_complete(db):
    now = utcnow()
    series_id = _receive(db, now - dt.timedelta(seconds=30))
    with db.session() as session:
        assert series.quiet_series_ids(session, 10.0, now=now) == [series_id]
        assert series.quiet_series_ids(session, 10.0, now=now, listening_since=now - dt.timedelta(seconds=11)) == [
            series_id
        ]


def test_time_the_node_was_not_listening_does_not_count_as_quiet(db):
    """A series received 30 s ago, before a crash, by a node that has listened again for 4 s only:
    its scanner could not send the rest while the node was down, so it is not complete yet."""
    now = utcnow()
    _receive(db, now - dt.timedelta(seconds=30))
    with db.session() as session:
        assert series.quiet_series_ids(session, 10.0, now=now, listening_since=now - dt.timedelta(seconds=4)) == []
        assert session.query(SeriesRow.state).one()[0] == SeriesState.RECEIVING
