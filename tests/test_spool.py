"""The spool: paths from UIDs only, atomic private writes, the cheap header parse, start-up repair."""

from __future__ import annotations

import datetime as dt
import io
import os
import random
import shutil
import stat
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom.dsutils import split_dataset
from sqlalchemy import event, select

from dicom_node import spool
from dicom_node.audit import AuditDB, InstanceRow, ReceivedInstance, SeriesRow, record_instances
from dicom_node.config import StorageConfig, load_config, with_overrides
from dicom_node.spool import (
    HeaderError,
    InvalidUIDError,
    part10_header,
    read_instance_header,
    reconcile_spool,
    spool_path,
    write_atomic,
)

MR_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mr"
GE_SERIES = MR_DATA / "ge_mprage_axial"
PHILIPS_SERIES = MR_DATA / "philips_mprage_sagittal"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.3811.3.0.4"


@pytest.fixture
def storage(tmp_path: Path) -> StorageConfig:
    config = with_overrides(load_config(), storage={"root": tmp_path / "var"})
    spool.ensure_storage_dirs(config.storage)
    return config.storage


@pytest.fixture
def db(tmp_path: Path) -> Iterator[AuditDB]:
    database = AuditDB(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    yield database
    database.dispose()


def small_mr(series_uid: str = "1.2.3.4", *, patient_name: str = "Doe^Jane", charset: str = "") -> Dataset:
    """A tiny valid MR instance, with a nested undefined-length sequence before the wanted tags."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.SeriesDescription = "T1 MPRAGE"
    inner = Dataset()
    inner.CodeValue = "T-A0100"
    inner.CodingSchemeDesignator = "SRT"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.AnatomicRegionSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds["ReferencedImageSequence"].is_undefined_length = True  # as scanners write them
    item.is_undefined_length_sequence_item = True
    ds.PatientName = patient_name
    ds.PatientID = "PID-0001"
    ds.ProtocolName = "Brain"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    return ds


def encode(ds: Dataset, transfer_syntax: str) -> bytes:
    """A DICOM Part 10 file of ``ds`` in ``transfer_syntax``."""
    ds = ds.copy()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if transfer_syntax == RLELossless:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(RLELossless)  # pydicom's own RLE encoder
    else:
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dataset_part(path_or_bytes: Path | bytes) -> bytes:
    """The encoded dataset after the file meta, as sent in a C-STORE."""
    if isinstance(path_or_bytes, Path):
        _, offset = split_dataset(path_or_bytes)
        return path_or_bytes.read_bytes()[offset:]
    data = path_or_bytes
    assert data[128:132] == b"DICM" and data[132:138] == b"\x02\x00\x00\x00UL"  # group length first
    return data[144 + struct.unpack_from("<L", data, 140)[0] :]


# spool_path -----------------------------------------------------------------------------------


def test_spool_path_is_series_folder_and_instance_file(storage: StorageConfig) -> None:
    assert spool_path(storage, "1.2.840.1", "1.2.840.1.7") == storage.spool / "1.2.840.1" / "1.2.840.1.7.dcm"


@pytest.mark.parametrize(
    "bad_uid",
    [
        "../../x",
        "..",
        ".",
        "",
        "1.2/3",
        "1..2",
        "1.2.",
        ".1.2",
        "1.2.3a",
        "/etc/passwd",
        "1.2\x00",
        " 1.2",
        "9" * 65,
    ],
)
def test_spool_path_refuses_what_is_not_a_uid(storage: StorageConfig, bad_uid: str) -> None:
    with pytest.raises(InvalidUIDError):
        spool_path(storage, bad_uid, "1.2.3")
    with pytest.raises(InvalidUIDError):
        spool_path(storage, "1.2.3", bad_uid)


def test_spool_path_accepts_a_64_character_uid(storage: StorageConfig) -> None:
    uid = "1." + "2" * 62
    assert spool_path(storage, uid, uid).name == f"{uid}.dcm"


# write_atomic ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", [True, False])
def test_write_atomic_writes_the_whole_file_privately(storage: StorageConfig, fsync: bool) -> None:
    final = storage.spool / "1.2.3" / "4.5.dcm"
    parts: list[bytes | bytearray | memoryview] = [b"head", memoryview(b"-middle-"), bytearray(100_000)]
    size = write_atomic(parts, final, storage.incoming, fsync)
    assert size == sum(len(p) for p in parts)
    assert final.read_bytes() == b"".join(bytes(p) for p in parts)
    assert stat.S_IMODE(final.stat().st_mode) == 0o600
    assert stat.S_IMODE(final.parent.stat().st_mode) & 0o077 == 0
    assert list(storage.incoming.iterdir()) == []


def test_write_atomic_replaces_an_existing_file(storage: StorageConfig) -> None:
    final = storage.spool / "1.2.3" / "4.5.dcm"
    write_atomic(b"first version", final, storage.incoming, False)
    assert write_atomic(b"second", final, storage.incoming, True) == 6
    assert final.read_bytes() == b"second"


def test_write_atomic_failing_rename_leaves_nothing(storage: StorageConfig) -> None:
    (storage.spool / "1.2.3").write_bytes(b"a file where the series folder should be")
    with pytest.raises(OSError):
        write_atomic(b"data", storage.spool / "1.2.3" / "4.5.dcm", storage.incoming, True)
    assert list(storage.incoming.iterdir()) == []


def test_write_atomic_failing_write_leaves_nothing(storage: StorageConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool.os, "write", disk_full)
    final = storage.spool / "1.2.3" / "4.5.dcm"
    with pytest.raises(OSError):
        write_atomic(b"data", final, storage.incoming, True)
    monkeypatch.undo()
    assert not final.exists()
    assert list(storage.incoming.iterdir()) == []


# part10_header and read_instance_header -------------------------------------------------------


def test_part10_header_with_the_dataset_is_the_dicom_file(tmp_path: Path) -> None:
    ds = small_mr()
    data = dataset_part(encode(ds, ExplicitVRLittleEndian))
    meta = part10_header(
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        implementation_class_uid=IMPLEMENTATION_UID,
        implementation_version_name="SCTNODE_01",
        source_aet="SCANNER7",
    )
    path = tmp_path / "x.dcm"
    path.write_bytes(meta + data)
    read = pydicom.dcmread(path)
    assert read.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert read.file_meta.SourceApplicationEntityTitle == "SCANNER7"
    assert read.file_meta.ImplementationVersionName == "SCTNODE_01"
    assert read.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(read.pixel_array.ravel(), np.arange(16))
    assert spool.source_application_entity_title(path) == "SCANNER7"


def test_part10_header_leaves_out_an_ae_title_outside_the_repertoire() -> None:
    meta = part10_header(
        sop_class_uid=MRImageStorage,
        sop_instance_uid="1.2.3",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        implementation_class_uid=IMPLEMENTATION_UID,
        source_aet="BAD\\AE\x01",
    )
    assert b"BAD" not in meta
    with pytest.raises(InvalidUIDError):
        part10_header(
            sop_class_uid=MRImageStorage,
            sop_instance_uid="../x",
            transfer_syntax_uid=ExplicitVRLittleEndian,
            implementation_class_uid=IMPLEMENTATION_UID,
        )


def expected_header(path: Path) -> tuple[str, ...]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
        ds.file_meta.TransferSyntaxUID,
        ds.SeriesInstanceUID,
        ds.StudyInstanceUID,
        str(ds.get("PatientID", "")),
        str(ds.get("PatientName", "")),
        str(ds.get("Modality", "")),
        str(ds.get("SeriesDescription", "")),
        str(ds.get("ProtocolName", "")),
    )


def header_tuple(header: spool.InstanceHeader) -> tuple[str, ...]:
    return (
        header.sop_class_uid,
        header.sop_instance_uid,
        header.transfer_syntax_uid,
        header.series_instance_uid,
        header.study_instance_uid,
        header.patient_id,
        header.patient_name,
        header.modality,
        header.series_description,
        header.protocol_name,
    )


@pytest.mark.parametrize("series", [GE_SERIES, PHILIPS_SERIES], ids=["ge", "philips"])
def test_header_of_real_mr_files_matches_pydicom(series: Path) -> None:
    files = sorted(series.iterdir())[::13]
    assert len(files) >= 10
    for path in files:
        expected = expected_header(path)
        assert header_tuple(read_instance_header(path)) == expected
        assert header_tuple(read_instance_header(path.read_bytes())) == expected
        bare = read_instance_header(dataset_part(path), expected[2])
        assert header_tuple(bare) == expected


@pytest.mark.parametrize(
    "transfer_syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless],
)
def test_header_in_every_accepted_transfer_syntax(tmp_path: Path, transfer_syntax: str) -> None:
    ds = small_mr(series_uid="1.2.3.99")
    encoded = encode(ds, transfer_syntax)
    path = tmp_path / "x.dcm"
    path.write_bytes(encoded)
    expected = expected_header(path)
    assert expected[3] == "1.2.3.99"
    assert header_tuple(read_instance_header(path)) == expected
    assert header_tuple(read_instance_header(dataset_part(encoded), transfer_syntax)) == expected


@pytest.mark.filterwarnings("ignore:The value length")
def test_audit_record_fits_the_audit_columns() -> None:
    ds = small_mr()
    ds.PatientID = "P" * 100
    ds.SeriesDescription = "D" * 80
    header = read_instance_header(dataset_part(encode(ds, ExplicitVRLittleEndian)), ExplicitVRLittleEndian)
    assert len(header.patient_id) == 100
    record = header.received(
        calling_aet="SCANNER", path=Path("/x.dcm"), size_bytes=1, received_at=dt.datetime(2026, 1, 1)
    )
    assert (record.patient_id, record.series_description) == ("P" * 64, "D" * 64)
    assert record.patient_name == "Doe^Jane" and record.calling_aet == "SCANNER"


@pytest.mark.parametrize(
    ("charset", "name"),
    [("ISO_IR 100", "Müller^Jürgen"), ("ISO_IR 192", "Ωmega^Ærø"), ("", "Plain^Name")],
)
def test_header_decodes_names_in_the_dataset_character_set(charset: str, name: str) -> None:
    ds = small_mr(patient_name=name, charset=charset)
    header = read_instance_header(dataset_part(encode(ds, ExplicitVRLittleEndian)), ExplicitVRLittleEndian)
    assert header.patient_name == name
    assert header.patient_id == "PID-0001"


def test_header_skips_undefined_length_sequences() -> None:
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        data = dataset_part(encode(small_mr(), syntax))
        assert bytes.fromhex("feffdde0") in data and bytes.fromhex("feff0de0") in data
        assert read_instance_header(data, syntax).series_instance_uid == "1.2.3.4"


def test_header_skips_an_undefined_length_un_holding_implicit_vr_items() -> None:
    """PS3.5 6.2.2: an explicit VR UN of undefined length holds implicit VR little endian."""

    def element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", group, number, vr, len(value)) + value

    def item_tag(number: int, length: int) -> bytes:
        return struct.pack("<HHL", 0xFFFE, number, length)

    private_un = struct.pack("<HH2s2xL", 0x0009, 0x1001, b"UN", 0xFFFFFFFF)
    private_un += item_tag(0xE000, 0xFFFFFFFF) + struct.pack("<HHL", 0x0009, 0x1002, 4) + b"abcd"
    private_un += item_tag(0xE00D, 0) + item_tag(0xE0DD, 0)
    data = b"".join(
        [
            element(0x0008, 0x0016, b"UI", MRImageStorage.encode() + b"\x00"),
            element(0x0008, 0x0018, b"UI", b"1.2.3.4.5\x00"),
            element(0x0009, 0x0010, b"LO", b"PRIV"),
            private_un,
            element(0x0020, 0x000D, b"UI", b"1.2.3\x00"),
            element(0x0020, 0x000E, b"UI", b"1.2.3.4\x00"),
        ]
    )
    header = read_instance_header(data, ExplicitVRLittleEndian)
    assert (header.sop_instance_uid, header.study_instance_uid, header.series_instance_uid) == (
        "1.2.3.4.5",
        "1.2.3",
        "1.2.3.4",
    )


def test_header_stops_before_the_pixels() -> None:
    """A header followed by pixel data that is not even there parses: the pixels are never read."""
    data = dataset_part(encode(small_mr(), ExplicitVRLittleEndian))
    pixel_tag = bytes.fromhex("e07f1000")
    cut = data[: data.index(pixel_tag) + 12]  # the Pixel Data element header, no value
    assert read_instance_header(cut, ExplicitVRLittleEndian).series_instance_uid == "1.2.3.4"


@pytest.mark.filterwarnings("ignore:Unknown encoding:UserWarning", "ignore:Found unknown escape:UserWarning")
def test_garbage_and_damaged_data_raise_header_error_only() -> None:
    good = dataset_part(encode(small_mr(charset="ISO_IR 100"), ExplicitVRLittleEndian))
    rng = random.Random(1234)
    candidates = [b"", b"\x00", os.urandom(7), os.urandom(4096), b"DICM" * 100]
    candidates += [good[: rng.randrange(len(good))] for _ in range(100)]
    for _ in range(300):
        damaged = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            damaged[rng.randrange(300)] = rng.randrange(256)
        candidates.append(bytes(damaged))
    outcomes = {"parsed": 0, "refused": 0}
    for data in candidates:
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
            try:
                read_instance_header(data, syntax)
                outcomes["parsed"] += 1
            except HeaderError:
                outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["parsed"] > 0
    noise = random.Random(7).randbytes(5000)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):  # implicit VR noise looks like elements
        with pytest.raises(HeaderError):
            read_instance_header(noise, syntax)
    with pytest.raises(HeaderError):
        read_instance_header(good, "1.2.840.10008.1.2.2")  # big endian is not accepted
    with pytest.raises(HeaderError):
        read_instance_header(b"\x00" * 200)  # no DICM prefix


@pytest.mark.parametrize(
    "transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
)
def test_a_dataset_that_starts_with_file_meta_is_refused(transfer_syntax: str) -> None:
    """Found by tests/reliability/test_fuzz_dicom.py: a dataset sent with the sender's group 0002 in
    front was spooled, and in the file that group ran on from the node's meta, so that readers took
    the sender's transfer syntax (any UID, garbage included) for the file's."""
    encoded = encode(small_mr(), ExplicitVRLittleEndian)
    sender_meta = encoded[132 : len(encoded) - len(dataset_part(encoded))]
    assert sender_meta[:2] == b"\x02\x00"
    dataset = dataset_part(encode(small_mr(), transfer_syntax))
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        inflated = zlib.decompress(dataset, -zlib.MAX_WBITS)
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        with_meta = compressor.compress(sender_meta + inflated) + compressor.flush()
    else:
        with_meta = sender_meta + dataset
    assert read_instance_header(dataset, transfer_syntax).series_instance_uid == "1.2.3.4"
    with pytest.raises(HeaderError, match=r"File Meta Information elements \(group 0002\)"):
        read_instance_header(with_meta, transfer_syntax)


# pixel_data_length --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transfer_syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless],
)
def test_pixel_data_length_in_every_accepted_transfer_syntax(tmp_path: Path, transfer_syntax: str) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(encode(small_mr(), transfer_syntax))  # 4 x 4 pixels of 16 bits after sequences
    expected = spool.UNDEFINED_LENGTH if transfer_syntax == RLELossless else 32
    assert spool.pixel_data_length(path) == (transfer_syntax, expected)


def test_pixel_data_length_without_pixels_and_cut_short(tmp_path: Path) -> None:
    ds = small_mr()
    del ds.PixelData
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 4)  # trailing padding after where the pixels would be
    path = tmp_path / "x.dcm"
    path.write_bytes(encode(ds, ExplicitVRLittleEndian))
    assert spool.pixel_data_length(path) == (ExplicitVRLittleEndian, None)
    path.write_bytes(encode(small_mr(), ExplicitVRLittleEndian)[:-3])
    with pytest.raises(HeaderError, match=r"the pixel data \(32 bytes\) runs past the end of the file"):
        spool.pixel_data_length(path)
    path.write_bytes(encode(small_mr(), ExplicitVRLittleEndian)[:400])
    with pytest.raises(HeaderError):
        spool.pixel_data_length(path)


# reconcile_spool ------------------------------------------------------------------------------


def spool_instance(storage: StorageConfig, ds: Dataset, calling_aet: str = "SCANNER") -> Path:
    data = dataset_part(encode(ds, ExplicitVRLittleEndian))
    meta = part10_header(
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        implementation_class_uid=IMPLEMENTATION_UID,
        source_aet=calling_aet,
    )
    path = spool_path(storage, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    write_atomic((meta, data), path, storage.incoming, False)
    return path


def test_reconcile_rebuilds_missing_rows_and_deletes_temporary_files(storage: StorageConfig, db: AuditDB) -> None:
    datasets = [small_mr("1.2.3.4") for _ in range(3)] + [small_mr("1.2.3.5")]
    paths = [spool_instance(storage, ds, calling_aet="MR_SCANNER_1") for ds in datasets]
    header = read_instance_header(paths[0])
    with db.session() as session:  # the first instance's row made it to the database before the crash
        received = header.received(calling_aet="MR_SCANNER_1", path=paths[0], size_bytes=1, received_at=_now())
        record_instances(session, [received])
    (storage.incoming / "tmpabc.part").write_bytes(b"half an instance")
    (storage.incoming / "tmpdef.part").write_bytes(b"")
    corrupt = storage.spool / "1.2.3.4" / "1.2.3.4.999.dcm"
    corrupt.write_bytes(b"not dicom at all")
    (storage.spool / "not-a-uid").mkdir()

    assert reconcile_spool(db, storage) == 3

    assert list(storage.incoming.iterdir()) == []
    assert corrupt.exists()  # never deleted: a human decides
    with db.session() as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(InstanceRow))}
        series = {row.series_instance_uid: row for row in session.scalars(select(SeriesRow))}
        assert set(rows) == {ds.SOPInstanceUID for ds in datasets}
        assert [rows[ds.SOPInstanceUID].recovered for ds in datasets] == [False, True, True, True]
        assert {row.calling_aet for row in rows.values()} == {"MR_SCANNER_1"}
        assert rows[datasets[1].SOPInstanceUID].path == str(paths[1])
        assert rows[datasets[1].SOPInstanceUID].size_bytes == paths[1].stat().st_size
        assert series["1.2.3.4"].instance_count == 3
        assert series["1.2.3.5"].instance_count == 1
        assert series["1.2.3.5"].patient_id == "PID-0001"
    assert reconcile_spool(db, storage) == 0  # idempotent


def test_reconcile_compares_thousands_of_files_in_one_query(storage: StorageConfig, db: AuditDB) -> None:
    template = spool_instance(storage, small_mr("1.2.3.4"))
    data = template.read_bytes()
    instances = []
    for series_index in range(4):
        series_uid = f"1.2.3.{10 + series_index}"
        (storage.spool / series_uid).mkdir()
        for index in range(500):
            instance_uid = f"{series_uid}.{index}"
            path = storage.spool / series_uid / f"{instance_uid}.dcm"
            path.write_bytes(data)
            instances.append(_received(series_uid, instance_uid, path))
    with db.session() as session:
        record_instances(session, instances)
    template.unlink()
    template.parent.rmdir()

    statements: list[str] = []
    event.listen(db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    assert reconcile_spool(db, storage) == 0
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1


def test_reconcile_finds_missing_rows_among_hundreds_of_series(storage: StorageConfig, db: AuditDB) -> None:
    template = spool_instance(storage, small_mr("1.2.3.4")).read_bytes()
    shutil.rmtree(storage.spool / "1.2.3.4")
    series_uids = [f"1.2.4.{index}" for index in range(450)]  # more than one query's worth
    lost = set(series_uids[::50])  # spread over every chunk, whatever order the folders are read in
    for series_uid in series_uids:
        if series_uid in lost:
            ds = small_mr(series_uid)
            ds.SOPInstanceUID = f"{series_uid}.1"
            spool_instance(storage, ds)
        else:  # these have their rows: their content is never read
            (storage.spool / series_uid).mkdir()
            (storage.spool / series_uid / f"{series_uid}.1.dcm").write_bytes(template)
    kept = [uid for uid in series_uids if uid not in lost]
    with db.session() as session:
        record_instances(session, [_received(uid, f"{uid}.1", storage.spool / uid / f"{uid}.1.dcm") for uid in kept])

    assert reconcile_spool(db, storage) == len(lost)
    with db.session() as session:
        recovered = session.scalars(select(InstanceRow.sop_instance_uid).where(InstanceRow.recovered)).all()
    assert sorted(recovered) == sorted(f"{uid}.1" for uid in lost)


def _now() -> dt.datetime:
    return dt.datetime(2026, 1, 1, 12, 0, 0)


def _received(series_uid: str, instance_uid: str, path: Path) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=instance_uid,
        sop_class_uid=MRImageStorage,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_instance_uid=series_uid,
        study_instance_uid="1.2.3",
        patient_id="P",
        patient_name="N",
        modality="MR",
        series_description="",
        protocol_name="",
        calling_aet="SCANNER",
        path=str(path),
        size_bytes=1,
        received_at=_now(),
    )
