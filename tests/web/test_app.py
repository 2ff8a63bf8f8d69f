"""The review page's routes (dicom_node.web.app) through FastAPI's TestClient on a real audit database
seeded through the node's own state machine: who may see and do what, CSRF, sessions, the decisions
and what they leave in the audit trail."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from dicom_node.audit import AuditDB, EventRow, JobRow, JobState
from dicom_node.config import Config, load_config, with_overrides
from dicom_node.web import accounts
from dicom_node.web.app import SESSION_COOKIE, create_app
from tests.web.seed import PATIENT_ID, PATIENT_NAME, Seeded, seed

PHYSICIST_PASSWORD = "correct horse battery staple"
VIEWER_PASSWORD = "viewer's own passphrase"
HTML = {"accept": "text/html"}


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return with_overrides(
        load_config(),
        storage={"root": tmp_path / "node"},
        audit={"url": f"sqlite:///{tmp_path / 'audit.sqlite'}"},
    )


@pytest.fixture
def db(config: Config) -> AuditDB:
    db = AuditDB(config.audit.url)
    accounts.add_user(db, "ada", "physicist", PHYSICIST_PASSWORD)
    accounts.add_user(db, "vic", "viewer", VIEWER_PASSWORD)
    return db


@pytest.fixture
def seeded(db: AuditDB, config: Config, tmp_path: Path) -> Seeded:
    return seed(db, config, tmp_path)


@pytest.fixture
def client(config: Config, db: AuditDB) -> TestClient:
    return TestClient(create_app(config, db))


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def log_in(client: TestClient, name: str, password: str) -> str:
    """Logs in; returns the session's CSRF token (read from a page, as a browser would)."""
    form = client.get("/login")
    response = client.post(
        "/login", data={"username": name, "password": password, "csrf": csrf_of(form.text), "next": "/"},
        follow_redirects=False,
    )  # fmt: skip
    assert response.status_code == 303, response.text
    return csrf_of(client.get("/", headers=HTML).text)


def events(db: AuditDB, kind: str) -> list[EventRow]:
    with db.session() as session:
        return list(session.scalars(select(EventRow).where(EventRow.kind == kind).order_by(EventRow.id)))


def job_state(db: AuditDB, job_id: int) -> str:
    with db.session() as session:
        job = session.get(JobRow, job_id)
        assert job is not None
        return job.state


# --- nothing without a session ---------------------------------------------------------------------


def test_every_route_needs_a_session(client: TestClient, seeded: Seeded) -> None:
    """Every route the application has (read from the app, so that a new one is covered too), the
    report images included: a browser asking for a page is sent to the login, anything else gets 401."""
    routes = [r for r in client.app.routes if hasattr(r, "methods") and r.path != "/login"]  # type: ignore[attr-defined]
    assert len(routes) >= 9
    for route in routes:
        path = route.path.replace("{job_id}", str(seeded.held)).replace("{number}", "1")
        for method in route.methods:
            if method == "HEAD":
                continue
            response = client.request(method, path, follow_redirects=False)
            assert response.status_code == 401, (method, path, response.status_code)
            assert PATIENT_NAME not in response.text
            if method == "GET":
                page = client.get(path, headers=HTML, follow_redirects=False)
                assert page.status_code == 303 and page.headers["location"].startswith("/login?next="), path


def test_login_wrong_unknown_disabled_and_logout_are_audited(client: TestClient, db: AuditDB) -> None:
    token = csrf_of(client.get("/login").text)
    for name, password in (("ada", "not her password!"), ("nobody", PHYSICIST_PASSWORD)):
        refused = client.post("/login", data={"username": name, "password": password, "csrf": token})
        assert refused.status_code == 401 and "Wrong name or password" in refused.text
    accounts.disable(db, "vic")
    assert (
        client.post("/login", data={"username": "vic", "password": VIEWER_PASSWORD, "csrf": token}).status_code == 401
    )
    failed = events(db, "web_login_failed")
    assert [e.detail["why"] for e in failed] == ["wrong password", "no such account", "account disabled"]
    assert all(PHYSICIST_PASSWORD not in e.message and "not her password" not in str(e.detail) for e in failed)
    csrf = log_in(client, "ada", PHYSICIST_PASSWORD)
    assert events(db, "web_login")[-1].detail["user"] == "ada"
    assert client.post("/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    assert events(db, "web_logout")[-1].detail["user"] == "ada"
    assert client.get("/", headers=HTML, follow_redirects=False).status_code == 303  # logged out


def test_the_session_cookie_is_http_only_and_strict(client: TestClient) -> None:
    form = client.get("/login")
    response = client.post(
        "/login", data={"username": "ada", "password": PHYSICIST_PASSWORD, "csrf": csrf_of(form.text)},
        follow_redirects=False,
    )  # fmt: skip
    cookie = response.headers["set-cookie"]
    assert (
        cookie.startswith(f"{SESSION_COOKIE}=") and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    )
    assert response.headers["cache-control"] == "no-store" and response.headers["x-frame-options"] == "DENY"


def test_a_login_goes_back_to_the_page_asked_for_but_never_to_another_site(client: TestClient) -> None:
    for target, landing in (("/series?state=QUARANTINED", "/series?state=QUARANTINED"), ("//evil.example/", "/"),
                            ("https://evil.example/", "/")):  # fmt: skip
        client.cookies.clear()
        form = client.get("/login", params={"next": target})
        response = client.post(
            "/login", data={"username": "vic", "password": VIEWER_PASSWORD, "csrf": csrf_of(form.text), "next": target},
            follow_redirects=False,
        )  # fmt: skip
        assert response.headers["location"] == landing


def test_posts_without_the_csrf_token_are_refused(client: TestClient, db: AuditDB, seeded: Seeded) -> None:
    form = client.get("/login")
    assert client.post("/login", data={"username": "ada", "password": PHYSICIST_PASSWORD}).status_code == 403
    assert (
        client.post("/login", data={"username": "ada", "password": PHYSICIST_PASSWORD, "csrf": "forged"}).status_code
        == 403
    )
    assert not events(db, "web_login")
    client.post("/login", data={"username": "ada", "password": PHYSICIST_PASSWORD, "csrf": csrf_of(form.text)})
    for action in ("release", "reject"):
        for data in ({"reason": "looks fine"}, {"reason": "looks fine", "csrf": "forged"}):
            assert client.post(f"/jobs/{seeded.held}/{action}", data=data).status_code == 403
    assert client.post(f"/jobs/{seeded.failed}/resend", data={}).status_code == 403
    assert job_state(db, seeded.held) == JobState.HELD and job_state(db, seeded.failed) == JobState.FAILED


def test_a_session_ends_after_its_idle_time(config: Config, db: AuditDB) -> None:
    client = TestClient(create_app(with_overrides(config, web={"session_minutes": 0.1}), db))  # 6 s
    log_in(client, "vic", VIEWER_PASSWORD)
    for _ in range(3):  # each request starts the idle time again
        time.sleep(2.5)
        assert client.get("/", headers=HTML, follow_redirects=False).status_code == 200
    time.sleep(7)
    assert client.get("/", headers=HTML, follow_redirects=False).status_code == 303


def test_a_disabled_account_is_logged_out_at_its_next_request(client: TestClient, db: AuditDB) -> None:
    log_in(client, "vic", VIEWER_PASSWORD)
    accounts.disable(db, "vic")
    assert client.get("/", headers=HTML, follow_redirects=False).status_code == 303


# --- what a viewer and a physicist may do ------------------------------------------------------------


def test_a_viewer_sees_everything_but_may_not_decide(client: TestClient, db: AuditDB, seeded: Seeded) -> None:
    csrf = log_in(client, "vic", VIEWER_PASSWORD)
    for path in ("/", "/series", "/audit", f"/jobs/{seeded.held}", f"/jobs/{seeded.failed}", f"/jobs/{seeded.done}"):
        assert client.get(path, headers=HTML).status_code == 200, path
    held_page = client.get(f"/jobs/{seeded.held}", headers=HTML).text
    assert "may look but not decide" in held_page and 'action="/jobs/' not in held_page
    for action, job in (("release", seeded.held), ("reject", seeded.held), ("resend", seeded.failed)):
        response = client.post(f"/jobs/{job}/{action}", data={"reason": "I think it is fine", "csrf": csrf})
        assert response.status_code == 403, action
    assert job_state(db, seeded.held) == JobState.HELD and job_state(db, seeded.failed) == JobState.FAILED
    assert not events(db, "review")


def test_a_physicist_releases_a_held_job_with_a_reason(client: TestClient, db: AuditDB, seeded: Seeded,
                                                        tmp_path: Path) -> None:  # fmt: skip
    csrf = log_in(client, "ada", PHYSICIST_PASSWORD)
    page = client.get(f"/jobs/{seeded.held}", headers=HTML).text
    assert f'action="/jobs/{seeded.held}/release"' in page and f'action="/jobs/{seeded.held}/reject"' in page
    before = (tmp_path / "job_qa" / "report-page-1.png").read_bytes()
    blank = client.post(f"/jobs/{seeded.held}/release", data={"reason": "  ", "csrf": csrf}, headers=HTML)
    assert blank.status_code == 409 and "reason" in blank.text
    assert job_state(db, seeded.held) == JobState.HELD
    response = client.post(f"/jobs/{seeded.held}/release", data={"reason": "bone checked on the MR", "csrf": csrf},
                           follow_redirects=False)  # fmt: skip
    assert response.status_code == 303
    assert job_state(db, seeded.held) == JobState.SENDING
    review = events(db, "review")[-1]
    assert review.detail == {
        "decision": "released",
        "by": "ada",
        "reason": "bone checked on the MR",
        "qa_verdict": "fail",
    }
    assert (tmp_path / "job_qa" / "report-page-1.png").read_bytes() != before  # the report says who released it
    shown = client.get(response.headers["location"], headers=HTML).text
    assert "released: the job is SENDING" in shown and "released</strong> by ada" in shown
    again = client.post(f"/jobs/{seeded.held}/release", data={"reason": "twice", "csrf": csrf})
    assert again.status_code == 409  # released once only


def test_a_physicist_rejects_and_resends(client: TestClient, db: AuditDB, seeded: Seeded) -> None:
    csrf = log_in(client, "ada", PHYSICIST_PASSWORD)
    client.post(f"/jobs/{seeded.held}/reject", data={"reason": "invented bone", "csrf": csrf})
    assert job_state(db, seeded.held) == JobState.REJECTED
    assert events(db, "review")[-1].detail["by"] == "ada"
    assert client.post(f"/jobs/{seeded.done}/resend", data={"csrf": csrf}).status_code == 200  # DONE: resend allowed
    client.post(f"/jobs/{seeded.failed}/resend", data={"csrf": csrf})
    assert job_state(db, seeded.failed) in (JobState.SENDING, JobState.QUEUED)
    assert events(db, "web_resend")[-1].detail == {"user": "ada"}
    refused = client.post(f"/jobs/{seeded.held}/resend", data={"csrf": csrf})
    assert refused.status_code == 409  # a rejected job is never sent


# --- the pages ------------------------------------------------------------------------------------------


def test_the_worklist_puts_held_jobs_first_and_filters(client: TestClient, seeded: Seeded) -> None:
    log_in(client, "vic", VIEWER_PASSWORD)
    page = client.get("/", headers=HTML).text
    order = [int(n) for n in re.findall(r'<td><a href="/jobs/(\d+)">', page)]
    assert order[0] == seeded.held and set(order) == {seeded.held, seeded.failed, seeded.done}
    assert PATIENT_NAME in page and PATIENT_ID in page and "T2 PORCINE" in page and "1 held for review" in page
    assert 'http-equiv="refresh"' in page
    only_failed = client.get("/", params={"state": "FAILED"}, headers=HTML).text
    assert re.findall(r'<td><a href="/jobs/(\d+)">', only_failed) == [str(seeded.failed)]
    only_fail_verdict = client.get("/", params={"verdict": "fail"}, headers=HTML).text
    assert re.findall(r'<td><a href="/jobs/(\d+)">', only_fail_verdict) == [str(seeded.held)]
    nothing = client.get("/", params={"day": "1999-01-01"}, headers=HTML).text
    assert "match these filters" in nothing


def test_the_job_page_shows_checks_report_sends_and_history(client: TestClient, seeded: Seeded) -> None:
    log_in(client, "vic", VIEWER_PASSWORD)
    page = client.get(f"/jobs/{seeded.held}", headers=HTML).text
    for text in ("in_distribution", "mahalanobis", "warn &gt; 3, fail &gt; 5", "bone 21.4 % (training 8.1 to 17.9 %)",
                 "QA report", f"/jobs/{seeded.held}/report-1.png", "test: -&gt; HELD"):  # fmt: skip
        assert text in page, text
    image = client.get(f"/jobs/{seeded.held}/report-1.png")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content[:4] == b"\x89PNG"
    assert client.get(f"/jobs/{seeded.held}/report-9.png").status_code == 404
    assert client.get("/jobs/9999", headers=HTML).status_code == 404
    failed = client.get(f"/jobs/{seeded.failed}", headers=HTML).text
    assert "association rejected" in failed and "failed" in failed
    assert "answered for each of the 40 instances" in failed  # per instance, refused first
    assert failed.index("0xA700") < failed.index("no answer") < failed.index("0x0000 stored")
    assert f"1.2.826.0.1.77.{seeded.failed}.0" in failed


def test_the_series_page_shows_quarantined_series_with_their_reason(client: TestClient, seeded: Seeded) -> None:
    log_in(client, "vic", VIEWER_PASSWORD)
    page = client.get("/series", params={"state": "QUARANTINED"}, headers=HTML).text
    assert "LOCALIZER" in page and "fewer than 4 slices" in page and "T2 PORCINE" not in page


def test_the_audit_page_verifies_the_chain_and_shows_an_edit(client: TestClient, db: AuditDB, seeded: Seeded) -> None:
    log_in(client, "vic", VIEWER_PASSWORD)
    page = client.get("/audit", headers=HTML).text
    assert "The hash chain verifies" in page and re.search(r"hash <span class=\"mono\">[0-9a-f]{64}</span>", page)
    with db.session() as session:  # someone edits an event behind the node's back
        event = (
            session.scalars(select(EventRow).where(EventRow.kind == "web_login_failed")).first()
            or session.scalars(select(EventRow).order_by(EventRow.id)).first()
        )
        assert event is not None
        event.message = event.message + " (edited)"
    assert "The hash chain does not verify" in client.get("/audit", headers=HTML).text
