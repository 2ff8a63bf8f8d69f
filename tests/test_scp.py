"""The DICOM listener against real peers on loopback: DCMTK storescu/echoscu and pynetdicom SCUs."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pydicom
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
