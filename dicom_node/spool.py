"""The spool: where received instances live until their series is processed.

Layout (all under ``storage.root``, directories 0o700 and files 0o600, readable by the service
user only)::

    spool/<SeriesInstanceUID>/<SOPInstanceUID>.dcm    one DICOM Part 10 file per instance
    incoming/<random>.part                            being written; renamed into spool/ when complete

A file appears in ``spool/`` only complete (written in ``incoming/``, optionally fsynced, then
renamed with ``os.replace``, which is atomic on one file system), so a reader never sees half an
instance. Files in ``incoming/`` at start-up were never acknowledged to the sender and are
deleted by :func:`reconcile_spool`, which also rebuilds the audit rows of spooled files whose
batched row had not reached the database when the node died.

UIDs coming from a sender are used in paths only after :func:`is_valid_uid` (digits and dots,
at most 64 characters): a sender's string never escapes the spool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import mmap
import logging
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import PersonName
from sqlalchemy import select

from dicom_node.audit import AuditDB, InstanceRow, ReceivedInstance, SeriesRow, record_instances
from dicom_node.config import StorageConfig
from dicom_node.errors import SctNodeError

log = logging.getLogger(__name__)

DIR_MODE = 0o700
TEMP_SUFFIX = ".part"
INSTANCE_SUFFIX = ".dcm"
MAX_UID_CHARS = 64
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_fdatasync = getattr(os, "fdatasync", os.fsync)  # data and size; timestamps are not needed

# The header fields an audit row needs; all lie at or before (0020,000E), so parsing stops there
# and never reaches the rest of the header, let alone the pixel data.
HEADER_TAGS: tuple[int, ...] = (
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x00080060,  # Modality
    0x0008103E,  # SeriesDescription
    0x00100010,  # PatientName
    0x00100020,  # PatientID
    0x00181030,  # ProtocolName
    0x0020000D,  # StudyInstanceUID
    0x0020000E,  # SeriesInstanceUID
)
_LAST_HEADER_TAG = max(HEADER_TAGS)
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")
_ROWS_PER_TRANSACTION = 500
_SERIES_PER_QUERY = 500


class InvalidUIDError(SctNodeError, ValueError):
    """A UID that is not digits and dots of at most 64 characters (never used in a path)."""


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_UID_CHARS and _UID.fullmatch(value) is not None


def _checked_uid(value: str, name: str) -> str:
    if not is_valid_uid(value):
        raise InvalidUIDError(f"{name} is not a valid UID: {value!r:.80}")
    return value


def spool_path(storage: StorageConfig, series_uid: str, sop_instance_uid: str) -> Path:
    """``spool/<series>/<instance>.dcm``; raises InvalidUIDError for anything but a UID."""
    series = _checked_uid(series_uid, "SeriesInstanceUID")
    instance = _checked_uid(sop_instance_uid, "SOPInstanceUID")
    return storage.spool / series / f"{instance}{INSTANCE_SUFFIX}"


def ensure_storage_dirs(storage: StorageConfig) -> None:
    """Create root, spool/ and incoming/ (0o700) if missing; existing folders are left as they are."""
    for folder in (storage.root, storage.spool, storage.incoming):
        folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


Buffer = bytes | bytearray | memoryview


def write_atomic(data: Buffer | Sequence[Buffer], final_path: Path, incoming_dir: Path, fsync: bool) -> int:
    """Write ``data`` (one buffer, or several written one after the other) to ``final_path`` atomically.

    The bytes go to a new temporary file (0o600) in ``incoming_dir``, which must be on the same
    file system; with ``fsync`` its data is flushed to disk, then it is renamed over
    ``final_path`` (parent folders created 0o700) and, with ``fsync``, the folder holding the new
    name is flushed too. Either the whole file is at ``final_path`` or nothing new is. Returns
    the number of bytes written; on any error the temporary file is removed and the error raised.
    """
    buffers: Sequence[Buffer] = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    fd, temp_name = tempfile.mkstemp(suffix=TEMP_SUFFIX, dir=incoming_dir)  # O_EXCL, mode 0o600
    try:
        try:
            size_bytes = sum(_write_all(fd, buffer) for buffer in buffers)
            if fsync:
                _fdatasync(fd)
        finally:
            os.close(fd)
        new_dirs = _replace_creating_dirs(temp_name, final_path)
        if fsync:  # make the new name durable, and the name of every folder just created
            for folder in [final_path.parent, *(created.parent for created in new_dirs)]:
                _fsync_dir(folder)
    except BaseException:
        _unlink_quietly(temp_name)
        raise
    return size_bytes


def _write_all(fd: int, buffer: Buffer) -> int:
    view = memoryview(buffer).cast("B")
    written = 0
    while written < len(view):
        written += os.write(fd, view[written:])
    return written


def _replace_creating_dirs(temp_name: str, final_path: Path) -> list[Path]:
    """os.replace, creating missing parents (0o700) only when needed; returns the folders created."""
    try:
        os.replace(temp_name, final_path)
        return []
    except FileNotFoundError:
        if not os.path.exists(temp_name):
            raise
    created = [p for p in reversed(final_path.parents) if not p.exists()]
    for folder in created:
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
    os.replace(temp_name, final_path)
    return created


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


@dataclasses.dataclass(frozen=True)
class InstanceHeader:
    """The few header fields the audit needs, as read from the encoded dataset ("" when absent)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    patient_name: str
    modality: str
    series_description: str
    protocol_name: str

    def received(
        self,
        *,
        calling_aet: str,
        path: Path,
        size_bytes: int,
        received_at: dt.datetime,
        recovered: bool = False,
    ) -> ReceivedInstance:
        """The audit record of this instance, text cut to the audit columns' widths."""
        return ReceivedInstance(
            sop_instance_uid=self.sop_instance_uid,
            sop_class_uid=self.sop_class_uid,
            transfer_syntax_uid=self.transfer_syntax_uid,
            series_instance_uid=self.series_instance_uid,
            study_instance_uid=self.study_instance_uid,
            patient_id=_fit(self.patient_id, SeriesRow.patient_id),
            patient_name=_fit(self.patient_name, SeriesRow.patient_name),
            modality=_fit(self.modality, SeriesRow.modality),
            series_description=_fit(self.series_description, SeriesRow.series_description),
            protocol_name=_fit(self.protocol_name, SeriesRow.protocol_name),
            calling_aet=_fit(calling_aet, InstanceRow.calling_aet),
            path=str(path),
            size_bytes=size_bytes,
            received_at=received_at,
            recovered=recovered,
        )


def _fit(text: str, column: object) -> str:
    """Cut ``text`` to a String column's length (PostgreSQL refuses longer values; SQLite does not)."""
    length = getattr(getattr(column, "type", None), "length", None)
    return text[:length] if length else text


def read_instance_header(source: Path | str | Buffer, transfer_syntax_uid: str | None = None) -> InstanceHeader:
    """Parse the header fields of one instance, stopping after (0020,000E): pixels are never read.

    ``source`` is a DICOM Part 10 file (path or bytes, with preamble and file meta), or, when
    ``transfer_syntax_uid`` is given, a bare encoded dataset as received in a C-STORE. Raises
    HeaderError when the data cannot be parsed or the transfer syntax is not supported.

    A small element scanner (:func:`_scan`) walks the encoded elements by their lengths and
    keeps the raw bytes of the few wanted tags; only those are decoded (with the dataset's
    Specific Character Set). This costs tens of microseconds per instance where pydicom's
    general reader, which builds an element for every tag it passes, costs about half a
    millisecond on a GE header with 200 elements before (0020,000E).
    """
    if isinstance(source, str | Path):
        with open(source, "rb") as fp, _map(fp) as mapped:
            return read_instance_header(mapped, transfer_syntax_uid)
    data = memoryview(source).cast("B")
    if transfer_syntax_uid is None:
        transfer_syntax_uid, offset = _read_file_meta(data)
        data = data[offset:]
    return _header_from(_scan_dataset(data, transfer_syntax_uid), transfer_syntax_uid)


class HeaderError(SctNodeError, ValueError):
    """The encoded data is not a dataset that the header scanner can read."""


_UNDEFINED_LENGTH = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_SEQUENCE_DEPTH = 16
_HEADER_TAG_SET = frozenset((0x00080005, *HEADER_TAGS))  # with Specific Character Set
_META_TAGS = frozenset({0x00020010, 0x00020016})  # TransferSyntaxUID, SourceApplicationEntityTitle
_HEADER_SCAN_SYNTAXES = {  # transfer syntax: implicit VR (all little endian)
    "1.2.840.10008.1.2": True,
    "1.2.840.10008.1.2.1": False,
    "1.2.840.10008.1.2.1.99": False,  # deflated, inflated before scanning
}


@contextlib.contextmanager
def _map(fp: io.BufferedReader) -> Iterator[Buffer]:
    size = os.fstat(fp.fileno()).st_size
    if size == 0:
        yield b""
        return
    with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            yield view
        finally:
            view.release()


def _read_file_meta(data: memoryview) -> tuple[str, int]:
    """(transfer syntax UID, offset of the dataset) of a Part 10 stream."""
    if bytes(data[128:132]) != b"DICM":
        raise HeaderError("not a DICOM Part 10 file (no DICM prefix)")
    meta, offset = _scan(data, 132, implicit=False, wanted=_META_TAGS, last_tag=0x0002FFFF)
    transfer_syntax_uid = _uid(meta.get(0x00020010, b""))
    if not transfer_syntax_uid:
        raise HeaderError("the file meta has no Transfer Syntax UID")
    return transfer_syntax_uid, offset


def source_application_entity_title(path: Path) -> str:
    """The calling AE title the SCP wrote into the file meta, "" when absent."""
    with open(path, "rb") as fp, _map(fp) as mapped:
        data = memoryview(mapped).cast("B")
        if bytes(data[128:132]) != b"DICM":
            return ""
        meta, _ = _scan(data, 132, implicit=False, wanted=_META_TAGS, last_tag=0x0002FFFF)
        return bytes(meta.get(0x00020016, b"")).decode("ascii", "replace").strip(" \x00")


def _scan_dataset(data: memoryview, transfer_syntax_uid: str) -> dict[int, memoryview]:
    implicit = _HEADER_SCAN_SYNTAXES.get(transfer_syntax_uid)
    if implicit is None:
        raise HeaderError(f"transfer syntax {transfer_syntax_uid!r:.70} is not supported")
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        try:
            data = memoryview(zlib.decompress(data, -zlib.MAX_WBITS))
        except zlib.error as exc:
            raise HeaderError(f"cannot inflate the deflated dataset: {exc}") from exc
    values, _ = _scan(data, 0, implicit=implicit, wanted=_HEADER_TAG_SET, last_tag=_LAST_HEADER_TAG)
    return values


def _scan(
    data: memoryview, pos: int, *, implicit: bool, wanted: frozenset[int], last_tag: int
) -> tuple[dict[int, memoryview], int]:
    """Walk top-level elements from ``pos`` until a tag > ``last_tag`` or the end of ``data``.

    Returns the raw values of the ``wanted`` tags and the offset where the walk stopped.
    Sequences are skipped, never decoded. Raises HeaderError on truncated or malformed data.
    """
    found: dict[int, memoryview] = {}
    end = len(data)
    while pos < end:
        tag, value_pos, length = _element_header(data, pos, implicit)
        if tag > last_tag:
            return found, pos
        if length == _UNDEFINED_LENGTH:
            if tag in wanted:
                raise HeaderError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has an undefined length")
            pos = _skip_sequence(data, value_pos, implicit, depth=1)
            continue
        pos = value_pos + length
        if pos > end:
            raise HeaderError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end of the data")
        if tag in wanted:
            found[tag] = data[value_pos:pos]
    return found, pos


def _element_header(data: memoryview, pos: int, implicit: bool) -> tuple[int, int, int]:
    """(tag, offset of the value, value length) of the element at ``pos``."""
    try:
        group, element = _TAG.unpack_from(data, pos)
        tag = group << 16 | element
        if implicit or group == 0xFFFE:  # items and delimiters have no VR in any syntax
            return tag, pos + 8, _U32.unpack_from(data, pos + 4)[0]
        vr = bytes(data[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            return tag, pos + 12, _U32.unpack_from(data, pos + 8)[0]
        if not (vr.isalpha() and vr.isupper()):
            raise HeaderError(f"element ({group:04X},{element:04X}) has no valid VR")
        return tag, pos + 8, _U16.unpack_from(data, pos + 6)[0]
    except struct.error as exc:
        raise HeaderError("the data ends inside an element header") from exc


def _skip_sequence(data: memoryview, pos: int, implicit: bool, depth: int) -> int:
    """Offset after the Sequence Delimitation Item of the undefined-length sequence starting at ``pos``."""
    if depth > _MAX_SEQUENCE_DEPTH:
        raise HeaderError("sequences nested too deeply")
    while True:
        tag, value_pos, length = _element_header(data, pos, implicit=True)
        if tag == _SEQUENCE_END:
            return value_pos
        if tag != _ITEM:
            raise HeaderError("a sequence holds something other than items")
        pos = _skip_item(data, value_pos, implicit, depth) if length == _UNDEFINED_LENGTH else value_pos + length
        if pos > len(data):
            raise HeaderError("a sequence item runs past the end of the data")


def _skip_item(data: memoryview, pos: int, implicit: bool, depth: int) -> int:
    """Offset after the Item Delimitation Item of the undefined-length item starting at ``pos``."""
    while True:
        tag, value_pos, length = _element_header(data, pos, implicit)
        if tag == _ITEM_END:
            return value_pos
        if length == _UNDEFINED_LENGTH:
            # An undefined-length UN in explicit VR holds implicit VR little endian (PS3.5 6.2.2).
            vr_is_un = not implicit and bytes(data[pos + 4 : pos + 6]) == b"UN"
            pos = _skip_sequence(data, value_pos, implicit or vr_is_un, depth + 1)
        else:
            pos = value_pos + length
        if pos > len(data):
            raise HeaderError("an item runs past the end of the data")


def _uid(raw: Buffer) -> str:
    return bytes(raw).decode("ascii", "replace").strip(" \x00")


def _header_from(values: dict[int, memoryview], transfer_syntax_uid: str) -> InstanceHeader:
    encodings = _encodings(values.get(0x00080005))

    def text(tag: int) -> str:
        raw = values.get(tag)
        return "" if raw is None else decode_bytes(bytes(raw), encodings, set()).strip(" \x00")

    name = values.get(0x00100010)
    return InstanceHeader(
        sop_class_uid=_uid(values.get(0x00080016, b"")),
        sop_instance_uid=_uid(values.get(0x00080018, b"")),
        transfer_syntax_uid=transfer_syntax_uid,
        series_instance_uid=_uid(values.get(0x0020000E, b"")),
        study_instance_uid=_uid(values.get(0x0020000D, b"")),
        patient_id=text(0x00100020),
        patient_name="" if name is None else str(PersonName(bytes(name), encodings)).strip(" \x00"),
        modality=text(0x00080060),
        series_description=text(0x0008103E),
        protocol_name=text(0x00181030),
    )


def _encodings(raw: memoryview | None) -> list[str]:
    if raw is None:
        return ["iso8859"]  # the default character repertoire, decoded leniently as pydicom does
    terms = [term.strip(" \x00") for term in bytes(raw).decode("ascii", "replace").split("\\")]
    return convert_encodings(terms or [""])


def reconcile_spool(db: AuditDB, storage: StorageConfig) -> int:
    """Start-up repair: delete unacknowledged temporary files, rebuild missing audit rows.

    A spooled file without an instance row (the node died between the rename and the batched
    audit write) gets its row back, marked ``recovered``, with the calling AE title that the SCP
    wrote into the file meta (Source Application Entity Title) and the file's time as
    ``received_at``. Files are matched to rows by (SeriesInstanceUID, SOPInstanceUID), one
    query per 500 spooled series, so the cost follows the spool, not the audit history.
    Returns the number of rows rebuilt. Files that cannot be read are logged and left alone.
    """
    ensure_storage_dirs(storage)
    removed = _remove_temp_files(storage.incoming)
    if removed:
        log.warning("deleted %d unacknowledged temporary file(s) from %s", removed, storage.incoming)
    spooled = _spooled_files(storage.spool)
    known = _known_instances(db, list(spooled))
    missing = [
        (series_uid, instance_uid, path)
        for series_uid, files in spooled.items()
        for instance_uid, path in files.items()
        if (series_uid, instance_uid) not in known
    ]
    rows = [row for row in (_recovered_row(*item) for item in missing) if row is not None]
    for start in range(0, len(rows), _ROWS_PER_TRANSACTION):
        with db.session() as session:
            record_instances(session, rows[start : start + _ROWS_PER_TRANSACTION])
    if rows:
        log.warning("rebuilt %d missing audit row(s) from spooled files", len(rows))
    return len(rows)


def _remove_temp_files(incoming: Path) -> int:
    removed = 0
    with os.scandir(incoming) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
    return removed


def _spooled_files(spool: Path) -> dict[str, dict[str, Path]]:
    """{series UID: {instance UID: path}} for every well-named file in the spool."""
    found: dict[str, dict[str, Path]] = {}
    with os.scandir(spool) as series_dirs:
        for series_dir in series_dirs:
            if not (series_dir.is_dir(follow_symlinks=False) and is_valid_uid(series_dir.name)):
                log.warning("ignoring unexpected entry in the spool: %s", series_dir.path)
                continue
            files = found.setdefault(series_dir.name, {})
            with os.scandir(series_dir.path) as entries:
                for entry in entries:
                    instance_uid = entry.name.removesuffix(INSTANCE_SUFFIX)
                    if entry.name.endswith(INSTANCE_SUFFIX) and is_valid_uid(instance_uid) and entry.is_file():
                        files[instance_uid] = Path(entry.path)
                    else:
                        log.warning("ignoring unexpected entry in the spool: %s", entry.path)
    return found


def _known_instances(db: AuditDB, series_uids: Iterable[str]) -> set[tuple[str, str]]:
    uids = list(series_uids)
    known: set[tuple[str, str]] = set()
    with db.session() as session:
        for start in range(0, len(uids), _SERIES_PER_QUERY):
            query = (
                select(SeriesRow.series_instance_uid, InstanceRow.sop_instance_uid)
                .join(InstanceRow, InstanceRow.series_id == SeriesRow.id)
                .where(SeriesRow.series_instance_uid.in_(uids[start : start + _SERIES_PER_QUERY]))
            )
            known.update((series, instance) for series, instance in session.execute(query))
    return known


def _recovered_row(series_uid: str, instance_uid: str, path: Path) -> ReceivedInstance | None:
    try:
        header = read_instance_header(path)
        calling_aet = source_application_entity_title(path)
        stat = path.stat()
    except Exception as exc:  # a damaged file must not stop the start-up; it stays for a human to see
        log.warning("cannot read spooled file %s (%s); left in place without an audit row", path, exc)
        return None
    if (header.series_instance_uid, header.sop_instance_uid) != (series_uid, instance_uid):
        log.warning("spooled file %s holds other UIDs than its name says; left without an audit row", path)
        return None
    received_at = dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC).replace(tzinfo=None)
    return header.received(
        calling_aet=calling_aet or "UNKNOWN",
        path=path,
        size_bytes=stat.st_size,
        received_at=received_at,
        recovered=True,
    )
