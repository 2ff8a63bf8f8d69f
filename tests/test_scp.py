"""The DICOM listener against real peers on loopback: DCMTK storescu/echoscu and pynetdicom SCUs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pydicom
import pynetdicom.association
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.events import Event
from sqlalchemy import select

from dicom_node import scp
from dicom_node.audit import AuditDB, EventRow, InstanceRecorder, InstanceRow, SeriesRow
from dicom_node.config import Config, load_config, with_overrides
from dicom_node.scp import StorageSCP
from dicom_node.spool import part10_header, read_instance_header
from tests.test_spool import GE_SERIES, IMPLEMENTATION_UID, dataset_part, encode, small_mr

MR_CONTEXTS = [(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]


def dcmtk(tool: str) -> str:
    """Integration tests never skip for want of DCMTK: they fail and say what to install."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail("install dcmtk: apt-get install -y dcmtk")
    return path


@dataclasses.dataclass
class RunningNode:
    config: Config
    db: AuditDB
    recorder: InstanceRecorder
    scp: StorageSCP

    @property
    def port(self) -> int:
        return self.scp.port

    @property
    def spool(self) -> Path:
        return self.config.storage.spool

    def spooled_files(self) -> list[Path]:
        return sorted(self.spool.glob("*/*.dcm"))

    def incoming_files(self) -> list[Path]:
        """Temporary files in incoming/: none may be left once a C-STORE is answered."""
        return sorted(self.config.storage.incoming.iterdir())

    def events(self, kind: str, *, at_least: int = 0, timeout_s: float = 5.0) -> list[EventRow]:
        """Audit events of one kind; association events are written just after the peer hears the
        answer, so wait (up to ``timeout_s``) until there are ``at_least`` of them."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.db.session() as session:
                query = select(EventRow).where(EventRow.kind == kind).order_by(EventRow.id)
                rows = list(session.scalars(query))
            if len(rows) >= at_least or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)

    def instance_rows(self) -> list[InstanceRow]:
        self.recorder.flush()
        with self.db.session() as session:
            return list(session.scalars(select(InstanceRow)))

    def series_rows(self) -> list[SeriesRow]:
        self.recorder.flush()
        with self.db.session() as session:
            return list(session.scalars(select(SeriesRow)))

    def stop(self) -> None:
        self.scp.stop()
        self.recorder.close()
        self.db.dispose()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., RunningNode]]:
    """Start a StorageSCP on a free port with its storage and SQLite audit under tmp_path."""
    running: list[RunningNode] = []

    def start(node: dict[str, Any] | None = None, storage: dict[str, Any] | None = None) -> RunningNode:
        config = with_overrides(
            load_config(),
            node={"port": 0, "bind": "127.0.0.1", **(node or {})},
            storage={"root": tmp_path / "var", **(storage or {})},
            audit={"url": f"sqlite:///{tmp_path / 'audit.sqlite'}"},
        )
        db = AuditDB(config.audit.url)
        recorder = InstanceRecorder(db, flush_interval_s=0.05)
        scp = StorageSCP(config, db, recorder)
        scp.start()
        started = RunningNode(config, db, recorder, scp)
        running.append(started)
        return started

    yield start
    for started in running:
        started.stop()


def mr_dataset(**changes: Any) -> Dataset:
    ds = small_mr(series_uid="1.2.826.0.1.3680043.8.498.1")
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-0001"
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def raw_file(tmp_path: Path, *, sop_class: str, sop_instance: str, dataset_bytes: bytes) -> Path:
    """A Part 10 file whose meta announces one instance, followed by arbitrary dataset bytes."""
    path = tmp_path / f"raw-{sop_instance}.dcm"
    meta = part10_header(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        implementation_class_uid=IMPLEMENTATION_UID,
    )
    path.write_bytes(meta + dataset_bytes)
    return path


def store(
    port: int,
    items: list[Dataset | Path],
    *,
    calling_aet: str = "SCANNER",
    called_aet: str = "SCTNODE",
    contexts: list[tuple[str, list[str]]] | None = None,
) -> list[Dataset]:
    """Send each item (a dataset, or a file sent as its raw bytes) on one association; the responses."""
    ae = AE(calling_aet)
    for sop_class, syntaxes in contexts or MR_CONTEXTS:
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    assert assoc.is_established, "association not accepted"
    try:
        return [_send(assoc, item) for item in items]
    finally:
        assoc.release()


def _send(assoc: Association, item: Dataset | Path) -> Dataset:
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = isinstance(item, Path)  # a path: its bytes as they are
    try:
        response = assoc.send_c_store(item)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert "Status" in response, "no C-STORE response"
    return response


def rejection(assoc: Association) -> tuple[int | None, int | None]:
    """(result source, diagnostic) of the A-ASSOCIATE-RJ the node sent."""
    primitive = assoc.acceptor.primitive
    assert primitive is not None, "no answer from the node"
    return primitive.result_source, primitive.diagnostic


def associate(port: int, calling_aet: str, called_aet: str = "SCTNODE") -> Association:
    ae = AE(calling_aet)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate("127.0.0.1", port, ae_title=called_aet)


# The real series from DCMTK --------------------------------------------------------------------


@pytest.mark.integration
def test_storescu_sends_the_real_ge_series_byte_for_byte(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node()
    sources = sorted(GE_SERIES.iterdir())
    assert len(sources) == 130
    result = subprocess.run(
        [
            dcmtk("storescu"),
            "-aet",
            "SCANNER",
            "-aec",
            "SCTNODE",
            "127.0.0.1",
            str(node.port),
            "+sd",
            str(GE_SERIES),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr

    series_uid = read_instance_header(sources[0]).series_instance_uid
    spooled = node.spooled_files()
    assert len(spooled) == 130
    assert {path.parent.name for path in spooled} == {series_uid}
    # storescu re-encodes each file before sending (sequences get explicit lengths); dcmconv with
    # its defaults writes exactly what storescu sends, so that is the reference for "as sent".
    as_sent = tmp_path / "as-sent.dcm"
    dcmconv = dcmtk("dcmconv")
    for source in sources:
        header = read_instance_header(source)
        target = node.spool / series_uid / f"{header.sop_instance_uid}.dcm"
        subprocess.run([dcmconv, str(source), str(as_sent)], check=True, timeout=30)
        assert dataset_part(target) == dataset_part(as_sent), source.name
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
    meta = pydicom.filereader.read_file_meta_info(spooled[0])
    assert meta.SourceApplicationEntityTitle == "SCANNER"
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert node.incoming_files() == []

    rows = node.instance_rows()
    assert len(rows) == 130
    assert {row.calling_aet for row in rows} == {"SCANNER"}
    assert not any(row.recovered or row.duplicate for row in rows)
    assert {row.path for row in rows} == {str(path) for path in spooled}
    (series,) = node.series_rows()
    assert series.series_instance_uid == series_uid
    assert series.instance_count == 130
    assert (series.modality, series.series_description) == ("MR", "3D Ax T1 MP-RAGE_R22")


@pytest.mark.integration
def test_datasets_are_spooled_exactly_as_encoded_by_the_sender(
    start_node: Callable[..., RunningNode],
) -> None:
    """Sent as their raw bytes, GE files keep their undefined-length sequences: nothing re-encodes them."""
    node = start_node()
    sources = sorted(GE_SERIES.iterdir())[::26]
    assert all(b"\xff\xff\xff\xff" in dataset_part(source)[:2000] for source in sources)
    responses = store(node.port, list(sources))
    assert [r.Status for r in responses] == [0x0000] * len(sources)
    for source in sources:
        header = read_instance_header(source)
        target = node.spool / header.series_instance_uid / f"{header.sop_instance_uid}.dcm"
        assert dataset_part(target) == dataset_part(source), source.name


@pytest.mark.integration
def test_echoscu_is_answered(start_node: Callable[..., RunningNode]) -> None:
    node = start_node()
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", "SCANNER", "-aec", "SCTNODE", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


# What is refused, and the node still serves ---------------------------------------------------


@pytest.mark.integration
def test_a_ct_sop_class_is_refused_and_the_node_keeps_serving(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node()
    ct = mr_dataset(SOPClassUID=CTImageStorage, Modality="CT")

    ae = AE("SCANNER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SCTNODE")
    assert not assoc.is_established  # no context accepted: nothing to send on
    (refused,) = node.events("sop_class_refused", at_least=1)
    assert CTImageStorage in str(refused.detail["sop_classes"])

    # A CT dataset announced as MR on an MR context: the dataset does not match the SOP class.
    disguised = raw_file(
        tmp_path,
        sop_class=MRImageStorage,
        sop_instance=ct.SOPInstanceUID,
        dataset_bytes=dataset_part(encode(ct, ExplicitVRLittleEndian)),
    )
    good = mr_dataset()
    responses = store(node.port, [disguised, good])
    assert [r.Status for r in responses] == [0xA900, 0x0000]
    assert [path.stem for path in node.spooled_files()] == [good.SOPInstanceUID]
    (event,) = node.events("store_refused")
    assert event.detail["status"] == "0xA900"


def test_an_unsupported_sop_class_reaching_the_handler_gets_0122(
    start_node: Callable[..., RunningNode],
) -> None:
    node = start_node()

    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="SCANNER", address="127.0.0.1", port=104))
    request = SimpleNamespace(AffectedSOPClassUID=CTImageStorage, AffectedSOPInstanceUID="1.2.3")
    event = cast(Event, SimpleNamespace(request=request, assoc=assoc))
    response = node.scp._on_store(event)
    assert isinstance(response, Dataset) and response.Status == 0x0122
    assert node.events("store_refused")[0].detail["status"] == "0x0122"
    assert node.spooled_files() == []


@pytest.mark.integration
def test_a_corrupt_dataset_gets_a_failure_and_the_association_goes_on(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node()
    garbage = raw_file(
        tmp_path,
        sop_class=MRImageStorage,
        sop_instance="1.2.3.4.5",
        dataset_bytes=np.random.default_rng(7).bytes(5000),
    )
    good = mr_dataset()
    responses = store(node.port, [garbage, good, garbage])
    assert [r.Status for r in responses] == [0xC210, 0x0000, 0xC210]
    assert responses[0].ErrorComment == "dataset cannot be parsed"
    assert [path.stem for path in node.spooled_files()] == [good.SOPInstanceUID]
    assert node.incoming_files() == []
    events = node.events("store_refused")
    assert [e.detail["status"] for e in events] == ["0xC210", "0xC210"]
    assert events[0].detail["affected_sop_instance_uid"] == "1.2.3.4.5"
    assert len(node.instance_rows()) == 1


@pytest.mark.integration
def test_a_dataset_with_file_meta_in_front_is_refused(
    start_node: Callable[..., RunningNode], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by tests/reliability/test_fuzz_dicom.py: a sender's group 0002 sent inside the dataset
    was spooled, and readers of the file took the sender's transfer syntax for the file's."""
    node = start_node()
    ds = mr_dataset()
    encoded = encode(ds, ExplicitVRLittleEndian)
    sender_meta = encoded[132 : len(encoded) - len(dataset_part(encoded))]
    garbage_syntax = sender_meta.replace(ExplicitVRLittleEndian.encode(), b"1.2.840.10008.1.2.2")  # big endian
    for meta in (sender_meta, garbage_syntax):
        raw = raw_file(
            tmp_path,
            sop_class=MRImageStorage,
            sop_instance=ds.SOPInstanceUID,
            dataset_bytes=meta + dataset_part(encoded),
        )
        # pynetdicom takes every group 0002 element at the start of the file for the meta (and would
        # not send the dataset's own): it is told where the meta raw_file wrote ends.
        file_meta = pydicom.dataset.FileMetaDataset()
        file_meta.MediaStorageSOPClassUID, file_meta.MediaStorageSOPInstanceUID = MRImageStorage, ds.SOPInstanceUID
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        offset = len(raw.read_bytes()) - len(meta) - len(dataset_part(encoded))
        with monkeypatch.context() as patch:
            patch.setattr(pynetdicom.association, "split_dataset", lambda path, m=file_meta, o=offset: (m, o))
            (response,) = store(node.port, [raw])
        assert response.Status == 0xC210
    (response,) = store(node.port, [ds])  # the same instance without the meta in front
    assert response.Status == 0x0000
    assert [path.stem for path in node.spooled_files()] == [ds.SOPInstanceUID]
    assert node.incoming_files() == []
    events = node.events("store_refused", at_least=2)
    assert [e.detail["status"] for e in events] == ["0xC210", "0xC210"]
    assert "group 0002" in events[0].detail["error"]


@pytest.mark.integration
def test_missing_series_uid_is_refused_and_audited(start_node: Callable[..., RunningNode]) -> None:
    node = start_node()
    (response,) = store(node.port, [mr_dataset(SeriesInstanceUID=None)])
    assert response.Status == 0xC220
    assert "SeriesInstanceUID" in response.ErrorComment
    (event,) = node.events("store_refused")
    assert event.detail["element"] == "SeriesInstanceUID"
    assert node.spooled_files() == [] and node.incoming_files() == []
    assert node.instance_rows() == []


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_series_uid_that_would_escape_the_spool_is_refused(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node()
    evil = mr_dataset(SeriesInstanceUID="../../escaped")
    raw = raw_file(
        tmp_path,
        sop_class=MRImageStorage,
        sop_instance=evil.SOPInstanceUID,
        dataset_bytes=dataset_part(encode(evil, ExplicitVRLittleEndian)),
    )
    (response,) = store(node.port, [raw])
    assert response.Status == 0xC220
    assert not list(tmp_path.rglob("*escaped*"))
    assert node.spooled_files() == []


@pytest.mark.integration
def test_an_instance_uid_other_than_announced_is_refused(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node()
    ds = mr_dataset()
    raw = raw_file(
        tmp_path,
        sop_class=MRImageStorage,
        sop_instance="1.2.3.999",
        dataset_bytes=dataset_part(encode(ds, ExplicitVRLittleEndian)),
    )
    (response,) = store(node.port, [raw])
    assert response.Status == 0xC221
    assert node.spooled_files() == []


@pytest.mark.integration
def test_a_write_failure_is_out_of_resources_and_leaves_nothing(
    start_node: Callable[..., RunningNode],
) -> None:
    node = start_node()
    ds = mr_dataset()
    (node.spool / ds.SeriesInstanceUID).write_bytes(b"a file where the series folder should be")
    (response,) = store(node.port, [ds])
    assert response.Status == 0xA701
    assert node.incoming_files() == []
    (event,) = node.events("store_refused")
    assert event.detail["sop_instance_uid"] == ds.SOPInstanceUID


# Association control -------------------------------------------------------------------------


@pytest.mark.integration
def test_calling_ae_allow_list(start_node: Callable[..., RunningNode]) -> None:
    node = start_node(node={"allowed_calling_aets": ("SCANNER", "MR2")})
    intruder = associate(node.port, "INTRUDER")
    assert intruder.is_rejected
    assert rejection(intruder) == (1, 3)
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "SCTNODE", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    events = node.events("association_rejected", at_least=2)
    assert [e.detail["calling_aet"] for e in events] == ["INTRUDER", "INTRUDER"]
    assert {e.detail["reason"] for e in events} == {"calling AE title not allowed"}

    allowed = associate(node.port, "MR2")
    assert allowed.is_established
    assert allowed.send_c_echo().Status == 0x0000
    allowed.release()


@pytest.mark.integration
def test_called_ae_title_is_checked(start_node: Callable[..., RunningNode]) -> None:
    strict = start_node()
    wrong = associate(strict.port, "SCANNER", called_aet="OTHERNODE")
    assert wrong.is_rejected
    assert rejection(wrong) == (1, 7)
    (event,) = strict.events("association_rejected", at_least=1)
    assert event.detail["called_aet"] == "OTHERNODE"
    right = associate(strict.port, "SCANNER", called_aet="SCTNODE")
    assert right.is_established
    right.release()

    lenient = start_node(node={"require_called_aet": False})
    other = associate(lenient.port, "SCANNER", called_aet="OTHERNODE")
    assert other.is_established
    other.release()


@pytest.mark.integration
def test_max_associations(start_node: Callable[..., RunningNode]) -> None:
    node = start_node(node={"max_associations": 1})
    first = associate(node.port, "SCANNER")
    assert first.is_established
    second = associate(node.port, "SCANNER")
    assert second.is_rejected
    assert rejection(second) == (3, 2)
    first.release()
    (event,) = node.events("association_rejected", at_least=1)
    assert event.detail["reason"] == "too many simultaneous associations"


# Found by tests/reliability/test_fuzz_pdu.py: a peer that stopped in the middle of a PDU held its
# connection (and one of max_associations) for as long as the connection stayed up, and a declared
# PDU length of 4 GiB was read into memory.


def _closed_by_node_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the node closed ``sock`` (reading and dropping whatever it sent first), or None."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


@pytest.mark.integration
@pytest.mark.parametrize(
    "half_pdu",
    [b"\x01\x00\x00", b"\x01\x00\x00\x00\x01\x00\x00\x01", b"\x07\x00\x00\x00\x00\x04\x00"],
    ids=["half-a-header", "half-an-associate-rq", "half-an-abort"],
)
def test_a_peer_stopping_mid_pdu_is_dropped_and_its_slot_freed(
    start_node: Callable[..., RunningNode], monkeypatch: pytest.MonkeyPatch, half_pdu: bytes
) -> None:
    monkeypatch.setattr(scp, "PDU_READ_TIMEOUT_S", 1.0)
    node = start_node(node={"max_associations": 1})
    node.scp._ae.acse_timeout = 2  # how long pynetdicom keeps the slot of a connection that ended before an association
    with socket.create_connection(("127.0.0.1", node.port)) as stalled:
        stalled.sendall(half_pdu)
        waited = _closed_by_node_within(stalled, 10)
    assert waited is not None and 0.8 < waited < 5, waited
    deadline = time.monotonic() + 10
    while node.scp._server is not None and node.scp._server.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    good = associate(node.port, "SCANNER")
    assert good.is_established, "the stalled peer's slot was not freed"
    assert good.send_c_echo().Status == 0x0000
    good.release()


@pytest.mark.integration
def test_a_peer_stopping_mid_pdu_inside_an_association_is_aborted(
    start_node: Callable[..., RunningNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scp, "PDU_READ_TIMEOUT_S", 1.0)
    node = start_node()
    assoc = associate(node.port, "SCANNER")
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    time.sleep(1.5)  # idle between PDUs is not a stall
    assert assoc.send_c_echo().Status == 0x0000
    assoc.dul.socket.socket.sendall(b"\x04\x00\x00\x00\x01\x00\x00\x00")  # a P-DATA-TF declared 256 bytes long: 2 sent
    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted, "the node did not drop the association stalled in the middle of a PDU"
    again = associate(node.port, "SCANNER")
    assert again.is_established and again.send_c_echo().Status == 0x0000
    again.release()


@pytest.mark.integration
def test_connections_closed_before_an_association_free_their_slot_at_once(
    start_node: Callable[..., RunningNode],
) -> None:
    """Found by tests/reliability/test_fuzz_pdu.py: each connection that ended before an association
    (a port scan, a health check, garbage, an A-ABORT first) kept its slot for the ACSE timeout
    (30 s), and ten of them locked the scanners out."""
    node = start_node(node={"max_associations": 2})
    for first in [b"", b"\xff" * 10, b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00", PDU_HEADER_4_GIB] * 3:
        with socket.create_connection(("127.0.0.1", node.port)) as sock:
            sock.sendall(first)
            if first:  # the node's answer (an A-ABORT) or its close; it waits for the peer to close after an abort
                sock.settimeout(2)
                with contextlib.suppress(OSError):
                    sock.recv(100)
    deadline = time.monotonic() + 5
    while node.scp._server is not None and node.scp._server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.scp._server is not None and not node.scp._server.active_associations
    for _ in range(2):
        good = associate(node.port, "SCANNER")
        assert good.is_established, "slots still held by connections that are gone"
        assert good.send_c_echo().Status == 0x0000
        good.release()


PDU_HEADER_4_GIB = b"\x01\x00\xff\xff\xff\xff"


@pytest.mark.integration
def test_an_empty_data_set_is_refused_and_the_association_goes_on(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    """An empty data set travels as a P-DATA-TF whose body is 6 bytes long, the size of a PDU header:
    the connection guard must not take it for one (found by tests/reliability/test_fuzz_dicom.py)."""
    node = start_node()
    empty = raw_file(tmp_path, sop_class=MRImageStorage, sop_instance="1.2.3.4.5", dataset_bytes=b"")
    good = mr_dataset()
    responses = store(node.port, [empty, good, empty])
    assert [r.Status for r in responses] == [0xC210, 0x0000, 0xC210]
    assert [path.stem for path in node.spooled_files()] == [good.SOPInstanceUID]


def _command_p_data(context_id: int, elements: list[tuple[int, bytes]]) -> bytes:
    """A P-DATA-TF with one whole command set (implicit VR little endian) on ``context_id``, and a
    small data set when the command announces one."""
    body = b"".join(struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value for tag, value in elements)
    command = struct.pack("<HHLL", 0, 0, 4, len(body)) + body
    pdvs = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    if dict(elements).get(0x00000800) == b"\x00\x00":
        dataset = dataset_part(encode(mr_dataset(), ExplicitVRLittleEndian))
        pdvs += struct.pack(">LBB", len(dataset) + 2, context_id, 0x02) + dataset
    return struct.pack(">BBL", 0x04, 0, len(pdvs)) + pdvs


@pytest.mark.integration
@pytest.mark.parametrize(
    "elements",
    [
        [  # a C-STORE-RQ without its Affected SOP Instance UID
            (0x00000002, MRImageStorage.encode()),
            (0x00000100, struct.pack("<H", 0x0001)),
            (0x00000110, struct.pack("<H", 7)),
            (0x00000700, struct.pack("<H", 0)),
            (0x00000800, struct.pack("<H", 0x0000)),
        ],
        [(0x00000100, struct.pack("<H", 0x0030)), (0x00000110, struct.pack("<H", 7)), (0x00000800, b"\x01\x01")],
        [  # a C-ECHO-RSP, sent to the node that sent no request
            (0x00000002, b"1.2.840.10008.1.1\x00"),
            (0x00000100, struct.pack("<H", 0x8030)),
            (0x00000120, struct.pack("<H", 7)),
            (0x00000800, b"\x01\x01"),
            (0x00000900, b"\x00\x00"),
        ],
    ],
    ids=["c-store-without-instance-uid", "c-echo-without-sop-class", "c-echo-response"],
)
def test_a_dimse_message_that_is_no_valid_request_aborts_the_association(
    start_node: Callable[..., RunningNode], elements: list[tuple[int, bytes]]
) -> None:
    """Found by tests/reliability/test_fuzz_pdu.py: pynetdicom ignored these, and the sender waited
    for an answer that never came."""
    node = start_node()
    ae = AE("SCANNER")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SCTNODE")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    assoc.dul.socket.socket.sendall(_command_p_data(context_id, elements))
    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted, "the node neither answered nor aborted"
    assert node.spooled_files() == [] and node.incoming_files() == []
    again = associate(node.port, "SCANNER")
    assert again.is_established and again.send_c_echo().Status == 0x0000
    again.release()


def _wait_until_no_association(node: RunningNode, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while node.scp._server is not None and node.scp._server.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)


def _associate_rq(context_id: int, transfer_syntaxes: tuple[bytes, ...] = (b"1.2.840.10008.1.2",)) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing Verification with ``context_id``."""

    def item(item_type: int, body: bytes) -> bytes:
        return struct.pack(">BBH", item_type, 0, len(body)) + body

    syntaxes = item(0x30, b"1.2.840.10008.1.1") + b"".join(item(0x40, syntax) for syntax in transfer_syntaxes)
    context = item(0x20, bytes([context_id, 0, 0, 0]) + syntaxes)
    user = item(0x50, item(0x51, struct.pack(">L", 16384)) + item(0x52, IMPLEMENTATION_UID.encode()))
    body = struct.pack(">HH", 1, 0) + b"SCTNODE".ljust(16) + b"SCANNER".ljust(16) + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1") + context + user
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


@pytest.mark.integration
def test_an_associate_rq_pynetdicom_cannot_handle_is_aborted_at_once(start_node: Callable[..., RunningNode]) -> None:
    """Found by tests/reliability/test_fuzz_pdu.py: a presentation context ID of 0 or 2 made pynetdicom's
    connection thread fail (no answer, the slot taken for the ACSE timeout, 30 s); a presentation context
    without a transfer syntax made its acceptor thread fail (no answer, the connection open for good)."""
    node = start_node(node={"max_associations": 1})
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(_associate_rq(1))
        sock.settimeout(5)
        assert sock.recv(1)[0] == 0x02  # A-ASSOCIATE-AC: the builder makes a good request
    for request in (_associate_rq(0), _associate_rq(2), _associate_rq(1, transfer_syntaxes=()), _associate_rq(0)):
        _wait_until_no_association(node)  # the one before, released, may still be finishing
        with socket.create_connection(("127.0.0.1", node.port)) as sock:
            sock.sendall(request)
            sock.settimeout(5)
            assert sock.recv(100) == b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"  # A-ABORT
            assert _closed_by_node_within(sock, 5) is not None
        _wait_until_no_association(node)
        good = associate(node.port, "SCANNER")  # the one slot is free again
        assert good.is_established and good.send_c_echo().Status == 0x0000
        good.release()


@pytest.mark.integration
@pytest.mark.parametrize("garbage", [b"\xff" * 10, b"\x09\x00\x00\x00\x00\x05ab", b"\x00" * 6])
def test_an_unknown_pdu_type_is_aborted_at_once(start_node: Callable[..., RunningNode], garbage: bytes) -> None:
    """pynetdicom reads the next PDU before it aborts for an unknown PDU type: with a few bytes more,
    it waited for the rest of that next PDU (found by tests/reliability/test_fuzz_pdu.py)."""
    node = start_node()
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(garbage)
        sock.settimeout(3)
        assert sock.recv(100) == b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"  # A-ABORT
        assert _closed_by_node_within(sock, 3) is not None


@pytest.mark.integration
@pytest.mark.parametrize(
    ("pdu_type", "length", "then"),
    [(0x01, 0xFFFFFFFF, b"\x00" * 1000), (0x04, 0xFFFFFFFF, b"\x00" * 1000), (0x01, scp.MAX_PDU_BYTES + 1, b"\x00")],
)
def test_a_pdu_declared_4_gib_long_is_not_read(
    start_node: Callable[..., RunningNode], pdu_type: int, length: int, then: bytes
) -> None:
    node = start_node()
    node.scp._ae.acse_timeout = 2
    with socket.create_connection(("127.0.0.1", node.port)) as huge:
        huge.sendall(struct.pack(">BBL", pdu_type, 0, length) + then)
        waited = _closed_by_node_within(huge, 10)
    assert waited is not None and waited < 2, waited  # at once, not after reading or waiting for 4 GiB
    assert scp.MAX_PDU_BYTES >= 1000 * 16382
    good = associate(node.port, "SCANNER")
    assert good.is_established and good.send_c_echo().Status == 0x0000
    good.release()


# Resources -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_free_space_floor(start_node: Callable[..., RunningNode]) -> None:
    full = start_node(storage={"min_free_mb": 10**9})
    (response,) = store(full.port, [mr_dataset()])
    assert response.Status == 0xA700
    assert full.spooled_files() == [] and full.incoming_files() == []
    (event,) = full.events("store_refused")
    assert event.detail["min_free_mb"] == 10**9

    roomy = start_node(storage={"min_free_mb": 1})
    ds = mr_dataset()
    (response,) = store(roomy.port, [ds])
    assert response.Status == 0x0000
    assert [path.stem for path in roomy.spooled_files()] == [ds.SOPInstanceUID]


# Other accepted encodings --------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("transfer_syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless])
def test_other_accepted_transfer_syntaxes_are_stored_as_sent(
    start_node: Callable[..., RunningNode], transfer_syntax: str
) -> None:
    node = start_node()
    ds = mr_dataset()
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(4, 4)
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless)
    else:
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    (response,) = store(node.port, [ds], contexts=[(MRImageStorage, [transfer_syntax])])
    assert response.Status == 0x0000
    (path,) = node.spooled_files()
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(stored.pixel_array, pixels)
    (row,) = node.instance_rows()
    assert row.transfer_syntax_uid == transfer_syntax


@pytest.mark.integration
def test_enhanced_mr_is_accepted(start_node: Callable[..., RunningNode]) -> None:
    node = start_node()
    ds = mr_dataset(SOPClassUID=EnhancedMRImageStorage, NumberOfFrames=1)
    (response,) = store(node.port, [ds], contexts=[(EnhancedMRImageStorage, [ExplicitVRLittleEndian])])
    assert response.Status == 0x0000
    (row,) = node.instance_rows()
    assert row.sop_class_uid == EnhancedMRImageStorage


# Logs ----------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_no_patient_identifiers_in_logs_at_info(
    start_node: Callable[..., RunningNode], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    node = start_node(node={"allowed_calling_aets": ("SCANNER",)})
    responses = store(node.port, [mr_dataset(), mr_dataset(SeriesInstanceUID=None), mr_dataset(StudyInstanceUID="x")])
    assert [r.Status for r in responses] == [0x0000, 0xC220, 0xC220]
    associate(node.port, "INTRUDER")
    node.scp.stop()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("refused with 0xC220" in m for m in messages)  # the refusals were logged...
    for identifier in ("Doe^Jane", "PID-0001"):  # ...without the patient
        assert not [m for m in messages if identifier in m]
    with node.db.session() as session:  # the audit database is where identifiers go
        assert session.scalars(select(SeriesRow.patient_id)).one() == "PID-0001"
