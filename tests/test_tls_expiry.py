"""The node's TLS certificate: refused at start when expired or not yet valid, warned about (log and
audit trail) from 30 days before it expires."""

from __future__ import annotations

import datetime as dt
import logging
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from dicom_node import tls
from dicom_node.audit import AuditDB, EventRow
from dicom_node.config import DEFAULT_CONFIG_PATH, load_config
from dicom_node.errors import ConfigError
from dicom_node.scheduler import check_certificate
from tests.integration.harness import dump_toml

NOW = dt.datetime.now(dt.UTC)


def _certificate(folder: Path, not_before: dt.datetime, not_after: dt.datetime) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) valid from ``not_before`` to ``not_after``, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sct-node test")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    certificate_path, key_path = folder / "node.crt", folder / "node.key"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certificate_path, key_path


def _config_file(tmp_path: Path, not_before: dt.datetime, not_after: dt.datetime, *, listener_tls: str) -> Path:
    certificate, key = _certificate(tmp_path / f"pki-{not_after:%Y%m%d%H%M%S}", not_before, not_after)
    data = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())
    data["node"]["tls"] = listener_tls
    data["tls"] = {"certificate": str(certificate), "private_key": str(key), "ca_certificates": str(certificate)}
    data["storage"]["root"] = str(tmp_path / "storage")
    data["audit"]["url"] = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    data["model"]["checkpoint"] = str(load_config().model.checkpoint)
    path = tmp_path / f"node-{not_after:%Y%m%d%H%M%S}.toml"
    path.write_text(dump_toml(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("not_before", "not_after", "says"),
    [
        (NOW - dt.timedelta(days=400), NOW - dt.timedelta(days=1), "expired on"),
        (NOW + dt.timedelta(days=1), NOW + dt.timedelta(days=400), "not valid before"),
    ],
)
def test_an_unusable_certificate_stops_the_node_at_start(tmp_path, not_before, not_after, says) -> None:
    with pytest.raises(ConfigError, match=f'tls.certificate: .* is {says} .*; node.tls = "required" needs a valid one'):
        load_config(_config_file(tmp_path, not_before, not_after, listener_tls="required"))
    # Configured but not used (listener off, no TLS destination): not the node's problem yet.
    assert load_config(_config_file(tmp_path, not_before, not_after, listener_tls="off")).tls.configured


def test_expiry_is_warned_about_from_30_days_before(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    expiring = load_config(_config_file(tmp_path, NOW - dt.timedelta(days=300), NOW + dt.timedelta(days=10),
                                        listener_tls="required"))  # fmt: skip
    fine = load_config(_config_file(tmp_path, NOW - dt.timedelta(days=300), NOW + dt.timedelta(days=90),
                                    listener_tls="required"))  # fmt: skip
    db = AuditDB(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    try:
        with caplog.at_level(logging.WARNING, logger="dicom_node.scheduler"):
            assert check_certificate(fine, db, NOW) is None
            message = check_certificate(expiring, db, NOW)
            assert message is not None and "expires in 10 days" in message
            later = check_certificate(expiring, db, NOW + dt.timedelta(days=11))  # a node left running
            assert later is not None and "expired on" in later
        with db.reading() as session:
            events = session.scalars(select(EventRow).order_by(EventRow.id)).all()
            assert [e.kind for e in events] == ["tls_certificate_expiring", "tls_certificate_expired"]
            assert round(events[0].detail["days_left"]) == 10
        assert [r.levelname for r in caplog.records] == ["WARNING", "ERROR"]
    finally:
        db.dispose()


def test_certificate_dates_reads_the_first_certificate_of_a_chain(tmp_path: Path) -> None:
    leaf, _ = _certificate(tmp_path / "a", NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=5))
    ca, _ = _certificate(tmp_path / "b", NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=500))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaf.read_bytes() + ca.read_bytes())
    assert round(tls.certificate_dates(chain).days_left(NOW)) == 5
    (tmp_path / "empty.pem").write_text("no certificate here")
    with pytest.raises(ValueError):
        tls.certificate_dates(tmp_path / "empty.pem")
