"""The review page on PostgreSQL (the audit database a hospital with several nodes runs): accounts,
the worklist, a job page and a release (its row lock is PostgreSQL's SELECT ... FOR UPDATE)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dicom_node.audit import AuditDB, JobState
from dicom_node.config import load_config, with_overrides
from dicom_node.web import accounts
from dicom_node.web.app import create_app
from tests import postgres
from tests.web.seed import PATIENT_NAME, seed
from tests.web.test_app import HTML, PHYSICIST_PASSWORD, events, job_state, log_in

pytestmark = pytest.mark.integration


def test_the_review_page_on_postgresql(tmp_path: Path) -> None:
    if not postgres.available() or os.geteuid() != 0:
        pytest.fail("needs Debian's postgresql (scripts/ensure-peers.sh installs it) and root to run it as postgres")
    with postgres.postgres(tmp_path / "pg") as url:
        config = with_overrides(load_config(), storage={"root": tmp_path / "node"}, audit={"url": url})
        db = AuditDB(url)
        assert db.engine.dialect.name == "postgresql"
        accounts.add_user(db, "ada", "physicist", PHYSICIST_PASSWORD)
        seeded = seed(db, config, tmp_path)
        client = TestClient(create_app(config, db))
        csrf = log_in(client, "ada", PHYSICIST_PASSWORD)
        worklist = client.get("/", headers=HTML).text
        assert PATIENT_NAME in worklist and "1 held for review" in worklist
        assert client.get(f"/jobs/{seeded.held}", headers=HTML).status_code == 200
        assert "The hash chain verifies" in client.get("/audit", headers=HTML).text
        client.post(f"/jobs/{seeded.held}/release", data={"reason": "checked on PostgreSQL", "csrf": csrf})
        assert job_state(db, seeded.held) == JobState.SENDING
        assert events(db, "review")[-1].detail["by"] == "ada"
        db.dispose()
