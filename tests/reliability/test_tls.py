"""DICOM TLS against real peers on loopback (issue 5, security).

Reception: `sct-node serve` with ``node.tls = "required"`` and DCMTK storescu as the scanner: a
scanner with a certificate from the hospital CA stores a series; plain DICOM, a certificate from
another CA and no certificate at all are refused at the handshake (nothing stored, audited as
``tls_refused``, the node keeps serving), and an idle TCP connection does not block the listener.

Sending: the node's sender with ``destination.tls = true`` against DCMTK storescp in TLS mode:
a PACS whose certificate the hospital CA signed for 127.0.0.1 gets the sCT (and it required the
node's client certificate); a PACS with a certificate from another CA, one whose certificate names
another host, and one that does not trust the node's certificate get nothing, and the audit's
send rows say why.
"""

from __future__ import annotations

import socket
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_node.audit import EventRow, InstanceRow, JobRow, JobState, SendRow
from dicom_node.config import DEFAULT_CONFIG_PATH
from dicom_node.peers import free_port
from dicom_node.synthetic_mr import generate_mr_series
from tests.integration.harness import NodeProcess, node_config, require_binary, storescu, wait_for
from tests.reliability.conftest import scale
from tests.tls_pki import PKI, KeyPair, make_pki

SLICES = scale(8, 48)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_args(client: KeyPair, trusted_ca: Path) -> tuple[str, ...]:
    """DCMTK options: TLS with this client certificate, trusting ``trusted_ca``."""
    return ("+tls", str(client.private_key), str(client.certificate), "+cf", str(trusted_ca))


def _count(node: NodeProcess, what: type[InstanceRow] | type[EventRow], *where: object) -> int:
    with node.db().session() as session:
        return int(session.scalar(select(func.count()).select_from(what).where(*where)) or 0)


def _events(node: NodeProcess, kind: str) -> list[EventRow]:
    with node.db().session() as session:
        return list(session.scalars(select(EventRow).where(EventRow.kind == kind).order_by(EventRow.id)))


def _new_events(node: NodeProcess, kind: str, *, after: int, count: int) -> list[EventRow]:
    """Wait for ``count`` events of ``kind`` beyond the first ``after`` ones, and return exactly those."""
    wait_for(lambda: len(_events(node, kind)) >= after + count, 10, f"{count} new {kind} event(s)")
    time.sleep(0.3)  # an unexpected extra event would be there now
    rows = _events(node, kind)
    assert len(rows) == after + count, [e.message for e in rows[after:]]
    return rows[after:]


# Reception -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_node(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node whose listener requires TLS; no series is processed during the tests (long quiet period)."""
    workdir = tmp_path_factory.mktemp("tls-node")
    config = node_config(
        workdir,
        pacs_port=free_port(),
        node={"tls": "required", "allowed_calling_aets": ["SCANNER"]},
        tls=pki.tls_section(),
        series={"quiet_period_s": 600.0, "sweep_interval_s": 1.0},
        model={"method": "bulk_density"},
    )
    node = NodeProcess(config).start(echo_args=tls_args(pki.scanner, pki.ca))
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mr")
    generate_mr_series(folder, slices=SLICES, rows=48, columns=48)
    return folder


def test_a_scanner_with_a_hospital_certificate_stores_over_tls(tls_node, pki, series, report):
    refused_before = len(_events(tls_node, "tls_refused"))
    # A connection that never starts its handshake must not hold up the others.
    with socket.create_connection(("127.0.0.1", tls_node.port)) as idle:
        started = time.monotonic()
        # -ts: storescu gives up after 15 s instead of 60 if the node never answers the handshake
        sent = storescu(tls_node.port, series, extra=("-ts", "15", *tls_args(pki.scanner, pki.ca)))
        seconds = time.monotonic() - started
        assert idle.fileno() >= 0
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert seconds < 20, f"the store took {seconds:.1f} s with an idle connection open"
    # The idle connection, closed without a handshake, is the one refusal.
    (dropped,) = _new_events(tls_node, "tls_refused", after=refused_before, count=1)
    assert dropped.detail["address"].startswith("127.0.0.1:")
    wait_for(
        lambda: _count(tls_node, InstanceRow, InstanceRow.calling_aet == "SCANNER") == SLICES,
        15,
        f"{SLICES} instances in the audit database",
    )
    spooled = list((tls_node.config_path.parent / "node" / "spool").glob("*/*.dcm"))
    assert len(spooled) == SLICES
    assert tls_node.alive()
    report(
        did=f"stored a {SLICES}-slice MR series with DCMTK storescu +tls (scanner certificate from the "
        "hospital CA) into a node with node.tls = required, while an idle TCP connection was held open",
        result="accepted; every instance in the spool and the audit database; the idle connection did not block it",
        instances=SLICES,
        seconds=round(seconds, 2),
    )


def test_plain_dicom_to_the_tls_node_is_refused(tls_node, series, report):
    before = _count(tls_node, InstanceRow)
    refused_before = len(_events(tls_node, "tls_refused"))
    sent = storescu(tls_node.port, series)
    assert sent.returncode != 0
    assert "Association Request Failed" in sent.stderr, sent.stderr
    echo = subprocess.run(
        [require_binary("echoscu", "dcmtk"), "-aec", "SCTNODE", "127.0.0.1", str(tls_node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode != 0
    events = _new_events(tls_node, "tls_refused", after=refused_before, count=2)
    assert all(e.detail["address"].startswith("127.0.0.1:") and e.detail["reason"] for e in events)
    time.sleep(0.5)  # a late write would show now
    assert _count(tls_node, InstanceRow) == before
    assert tls_node.alive()
    report(
        did="sent the MR series with plain (non-TLS) storescu and a plain C-ECHO to the TLS-only node",
        result=f"both refused at the TLS handshake ({events[0].detail['reason']}), nothing stored, "
        "audited as tls_refused, node still serving",
        attempts=2,
        stored=0,
    )


@pytest.mark.parametrize(
    ("who", "options"),
    [
        ("rogue-ca client certificate", lambda pki: tls_args(pki.rogue, pki.ca)),
        ("no client certificate", lambda pki: ("+tla", "+cf", str(pki.ca))),
    ],
    ids=["rogue-ca", "no-certificate"],
)
def test_an_untrusted_client_certificate_is_refused(tls_node, pki, series, who, options, report):
    before = _count(tls_node, InstanceRow)
    refused_before = len(_events(tls_node, "tls_refused"))
    sent = storescu(tls_node.port, series, extra=options(pki))
    assert sent.returncode != 0, sent.stdout + sent.stderr
    (event,) = _new_events(tls_node, "tls_refused", after=refused_before, count=1)
    expected = "certificate verification failed" if who.startswith("rogue") else "CERTIFICATE"
    assert expected in event.detail["reason"], event.detail
    time.sleep(0.5)
    assert _count(tls_node, InstanceRow) == before
    # The node still serves a trusted scanner afterwards.
    echo = subprocess.run(
        [
            require_binary("echoscu", "dcmtk"),
            "-aet",
            "SCANNER",
            "-aec",
            "SCTNODE",
            *tls_args(pki.scanner, pki.ca),
            "127.0.0.1",
            str(tls_node.port),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr
    report(
        did=f"storescu +tls with {who} against the TLS-only node",
        result=f"handshake refused ({event.detail['reason']}), nothing stored, audited; trusted scanners still served",
        stored=0,
    )


def test_a_trusted_certificate_does_not_bypass_the_calling_ae_allow_list(tls_node, pki, series, report):
    before = _count(tls_node, InstanceRow)
    rejected_before = len(_events(tls_node, "association_rejected"))
    sent = storescu(tls_node.port, series, calling_aet="INTRUDER", extra=tls_args(pki.scanner, pki.ca))
    assert sent.returncode != 0
    assert "Calling AE Title Not Recognized" in sent.stderr, sent.stderr
    (event,) = _new_events(tls_node, "association_rejected", after=rejected_before, count=1)
    assert event.detail["calling_aet"] == "INTRUDER"
    assert event.detail["reason"] == "calling AE title not allowed"
    assert _count(tls_node, InstanceRow) == before
    report(
        did="storescu +tls with the hospital-signed scanner certificate but calling AE title INTRUDER "
        "(not in node.allowed_calling_aets) against the TLS-only node",
        result="TLS handshake accepted, association rejected (calling AE title not allowed), nothing stored, audited",
        stored=0,
    )


# Sending -------------------------------------------------------------------------------------


class TLSStoreSCP:
    """DCMTK storescp in TLS mode on a free port, writing what it receives to ``folder``."""

    def __init__(self, folder: Path, server: KeyPair, trusts: Path) -> None:
        self.folder = folder
        self.server = server
        self.trusts = trusts
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, echo_as: KeyPair, echo_trusts: Path) -> TLSStoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        binary = require_binary("storescp", "dcmtk")
        with open(self.folder.parent / f"{self.folder.name}.log", "wb") as log:  # the child keeps its copy
            self.process = subprocess.Popen(
                [
                    binary,
                    "-aet",
                    "PLANNING",
                    "-od",
                    str(self.folder),
                    *tls_args(self.server, self.trusts),
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        echoscu = require_binary("echoscu", "dcmtk")
        wait_for(
            lambda: (
                subprocess.run(
                    [echoscu, "-aec", "PLANNING", *tls_args(echo_as, echo_trusts), "127.0.0.1", str(self.port)],
                    capture_output=True,
                ).returncode
                == 0
            ),
            15,
            "storescp to answer a TLS C-ECHO",
        )
        return self

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


def test_the_sender_verifies_the_destination_and_presents_the_node_certificate(pki, tmp_path, report):
    # name: (its certificate, the CA it trusts, a client it accepts, the CA that signed its certificate)
    setups = {
        # signed by the hospital CA for 127.0.0.1; requires and verifies the node's client certificate
        "trusted": (pki.peer, pki.ca, pki.node, pki.ca),
        # a certificate for 127.0.0.1 from a CA the node does not trust
        "rogue": (pki.rogue, pki.ca, pki.node, pki.rogue_ca),
        # signed by the hospital CA, but for another host name
        "wrong_host": (pki.wrong_host, pki.ca, pki.node, pki.ca),
        # a good certificate, but the PACS does not trust the CA of the node's certificate
        "distrusts_node": (pki.peer, pki.rogue_ca, pki.rogue, pki.ca),
    }
    peers: dict[str, TLSStoreSCP] = {}
    try:
        for name, (certificate, trusts, echo_as, echo_trusts) in setups.items():
            peers[name] = TLSStoreSCP(tmp_path / name, certificate, trusts=trusts)
            peers[name].start(echo_as, echo_trusts)  # a working TLS peer: any failure below is the node's
        route = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())["route"][0]
        config = node_config(
            tmp_path / "run",
            pacs_port=peers["trusted"].port,
            tls=pki.tls_section(),
            destination=[
                {
                    "name": name,
                    "ae_title": "PLANNING",
                    "host": "127.0.0.1",
                    "port": peer.port,
                    "tls": True,
                    "associations": 1,
                }
                for name, peer in peers.items()
            ],
            route=[{**route, "destinations": list(peers)}],
            model={"method": "bulk_density"},
            series={"quiet_period_s": 1.0, "sweep_interval_s": 0.2},
            sender={"max_attempts": 1, "first_retry_s": 1.0, "max_retry_s": 1.0, "timeout_s": 10.0},
        )
        node = NodeProcess(config).start()
        try:
            generate_mr_series(tmp_path / "mr", slices=SLICES, rows=48, columns=48)
            sent = storescu(node.port, tmp_path / "mr")
            assert sent.returncode == 0, sent.stdout + sent.stderr
            db = node.db()

            def finished() -> JobRow | None:
                with db.session() as session:
                    job = session.scalars(select(JobRow)).first()
                    return job if job is not None and job.state in (JobState.DONE, JobState.FAILED) else None

            job = wait_for(finished, 60, f"the sCT job to finish ({node.log_text()[-1500:]})")
            with db.session() as session:
                sends = {row.destination: row for row in session.scalars(select(SendRow))}
        finally:
            node.stop()
    finally:
        for peer in peers.values():
            peer.stop()

    assert job.sct_instance_count > 0
    assert set(sends) == set(peers)
    assert sends["trusted"].ok, sends["trusted"].message
    assert sends["trusted"].instances_sent == job.sct_instance_count
    assert "over TLS" in sends["trusted"].message
    assert len(peers["trusted"].received()) == job.sct_instance_count
    for name, reason in (
        ("rogue", "certificate verification failed"),
        ("wrong_host", "IP address mismatch"),
        ("distrusts_node", "UNKNOWN_CA"),
    ):
        assert not sends[name].ok
        assert sends[name].instances_sent == 0
        assert "TLS connection failed" in sends[name].message and reason in sends[name].message, sends[name].message
        assert peers[name].received() == [], name
    assert job.state == JobState.FAILED  # three of four destinations refused: not delivered everywhere
    report(
        did=f"a full node run (bulk_density, {SLICES} slices) sending its sCT over DICOM TLS to four DCMTK "
        "storescp +tls destinations: trusted, rogue CA, wrong host name, PACS distrusting the node",
        result=f"the trusted PACS got all {job.sct_instance_count} instances (after checking the node's client "
        "certificate); the three others got nothing and each send row names the TLS reason",
        destinations=len(peers),
        instances=job.sct_instance_count,
    )
