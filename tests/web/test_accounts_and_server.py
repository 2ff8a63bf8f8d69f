"""``sct-node web add-user | set-password | disable | users`` on a real audit database, and the review
page served by a real node (``[web] enabled = true``) over HTTPS with the node's certificate: a
browser-like client logs in, and the server's log holds no patient identifier."""

from __future__ import annotations

import io
import logging
import re
import ssl
from pathlib import Path

import httpx2 as httpx
import pytest
from sqlalchemy import select

from dicom_node.__main__ import main
from dicom_node.audit import AuditDB, EventRow, WebUserRow
from dicom_node.config import Config, dump_config, load_config, with_overrides
from dicom_node.node import Node
from dicom_node.peers import free_port
from dicom_node.web import accounts
from tests.tls_pki import PKI, make_pki
from tests.web.seed import PATIENT_ID, PATIENT_NAME, seed

PASSWORD = "a long enough passphrase"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    config = with_overrides(
        load_config(), storage={"root": tmp_path / "node"}, audit={"url": f"sqlite:///{tmp_path / 'audit.sqlite'}"}
    )
    path = tmp_path / "config.toml"
    path.write_text(dump_config(config))
    return path


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: str, *args: str) -> tuple[int, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_account_commands(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = ("--config", str(config_file))
    assert run(monkeypatch, capsys, "short\n", "web", "add-user", "ada", "--role", "physicist", *cfg)[0] == 1
    code, out = run(monkeypatch, capsys, PASSWORD + "\n", "web", "add-user", "ada", "--role", "physicist", *cfg)
    assert code == 0 and "account ada added (physicist)" in out
    code, out = run(monkeypatch, capsys, PASSWORD + "\n", "web", "add-user", "ada", "--role", "viewer", *cfg)
    assert code == 1 and "exists already" in out
    assert run(monkeypatch, capsys, PASSWORD + "\n", "web", "add-user", "bad name!", "--role", "viewer", *cfg)[0] == 1
    assert run(monkeypatch, capsys, PASSWORD + "\n", "web", *cfg, "add-user", "vic", "--role", "viewer")[0] == 0
    db = AuditDB(load_config(config_file).audit.url)
    with db.session() as session:
        stored = {row.name: row for row in session.scalars(select(WebUserRow))}
        assert stored["ada"].password_hash.startswith("$argon2id$") and PASSWORD not in stored["ada"].password_hash
        texts = " ".join(f"{e.message} {e.detail}" for e in session.scalars(select(EventRow)))
    assert PASSWORD not in texts and "account ada added, role physicist" in texts
    assert accounts.authenticate(db, "ada", PASSWORD, client="test") == accounts.User("ada", "physicist")
    new_password = "another long passphrase"
    assert run(monkeypatch, capsys, new_password + "\n", "web", "set-password", "ada", *cfg)[0] == 0
    assert accounts.authenticate(db, "ada", PASSWORD, client="test") is None
    assert accounts.authenticate(db, "ada", new_password, client="test") is not None
    assert run(monkeypatch, capsys, "", "web", "disable", "vic", *cfg)[0] == 0
    assert run(monkeypatch, capsys, "", "web", "disable", "nobody", *cfg)[0] == 1
    code, out = run(monkeypatch, capsys, "", "web", "users", *cfg)
    assert code == 0 and re.search(r"ada\s+physicist\s+enabled", out) and re.search(r"vic\s+viewer\s+disabled", out)
    db.dispose()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_the_node_serves_the_page_over_https_and_logs_no_identifiers(
    tmp_path: Path, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    base = load_config()
    config: Config = with_overrides(
        base,
        node={"port": free_port(), "bind": "127.0.0.1"},
        storage={"root": tmp_path / "node"},
        audit={"url": f"sqlite:///{tmp_path / 'audit.sqlite'}"},
        web={"enabled": True, "tls": True, "port": free_port(), "bind": "127.0.0.1"},
        tls=type(base.tls)(certificate=pki.node.certificate, private_key=pki.node.private_key, ca_certificates=pki.ca),
    )
    db = AuditDB(config.audit.url)
    seeded = seed(db, config, tmp_path)
    accounts.add_user(db, "ada", "physicist", PASSWORD)
    node = Node(config)
    caplog.set_level(logging.INFO)
    node.start()
    try:
        url = f"https://127.0.0.1:{config.web.port}"
        with pytest.raises(httpx.ConnectError):  # a certificate nobody vouches for is not trusted
            httpx.get(url + "/login", verify=ssl.create_default_context(cafile=pki.rogue_ca))
        trusted = ssl.create_default_context(cafile=pki.ca)
        with httpx.Client(base_url=url, verify=trusted, headers={"accept": "text/html"}) as browser:
            login = browser.get("/", follow_redirects=True)
            assert login.status_code == 200 and "log in" in login.text
            token = re.search(r'name="csrf" value="([^"]+)"', login.text)
            assert token
            response = browser.post("/login", data={"username": "ada", "password": PASSWORD, "csrf": token.group(1)})
            assert response.status_code == 303 and "secure" in response.headers["set-cookie"].lower()
            worklist = browser.get("/")
            assert worklist.status_code == 200 and PATIENT_NAME in worklist.text
            assert browser.get(f"/jobs/{seeded.held}").status_code == 200
    finally:
        node.stop()
        db.dispose()
    log = caplog.text
    assert f'"GET /jobs/{seeded.held} HTTP/1.1" 200' in log  # the access log is there...
    assert PATIENT_NAME not in log and PATIENT_ID not in log and PASSWORD not in log  # ...without identifiers
