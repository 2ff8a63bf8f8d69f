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
import logging
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Sequence
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
_EXPLICIT_HEADER = struct.Struct("<HH2sH")
_IMPLICIT_HEADER = struct.Struct("<HHL")
_U32 = struct.Struct("<L")
_ROWS_PER_TRANSACTION = 500
_SERIES_PER_QUERY = 200


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


_PREAMBLE = b"\x00" * 128 + b"DICM"
_AE_TITLE_CHARS = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # default repertoire, no backslash


def part10_header(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version_name: str = "",
    source_aet: str = "",
) -> bytes:
    """Preamble, "DICM" and File Meta Information (PS3.10 7.1) to put before a received dataset.

    Encoded here rather than with pydicom's writer (about 300 us per instance, a tenth of the
    time budget of one C-STORE) because it is eight short elements. The Source Application
    Entity Title (0002,0016) keeps the calling AE title with the file, so that a row rebuilt at
    start-up (:func:`reconcile_spool`) still names the sender. Raises InvalidUIDError for a UID
    that is not a UID; an AE title with characters outside the default repertoire is left out.
    """
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _checked_uid(sop_class_uid, "SOP Class UID").encode()),
        _meta_element(0x0003, b"UI", _checked_uid(sop_instance_uid, "SOP Instance UID").encode()),
        _meta_element(0x0010, b"UI", _checked_uid(transfer_syntax_uid, "Transfer Syntax UID").encode()),
        _meta_element(0x0012, b"UI", _checked_uid(implementation_class_uid, "Implementation UID").encode()),
    ]
    if implementation_version_name:
        elements.append(_meta_element(0x0013, b"SH", implementation_version_name[:16].encode("ascii", "replace")))
    if _AE_TITLE_CHARS.fullmatch(source_aet) and source_aet.strip():
        elements.append(_meta_element(0x0016, b"AE", source_aet.strip().encode("ascii")))
    body = b"".join(elements)
    group_length = _META_SHORT.pack(0x0002, 0x0000, b"UL", 4) + _U32.pack(len(body))
    return b"".join((_PREAMBLE, group_length, body))


_META_SHORT = struct.Struct("<HH2sH")
_META_OB = struct.Struct("<HH2s2xL")


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr == b"OB":
        return _META_OB.pack(0x0002, element, vr, len(value)) + value
    return _META_SHORT.pack(0x0002, element, vr, len(value)) + value


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
            patient_id=self.patient_id[: _WIDTHS["patient_id"]],
            patient_name=self.patient_name[: _WIDTHS["patient_name"]],
            modality=self.modality[: _WIDTHS["modality"]],
            series_description=self.series_description[: _WIDTHS["series_description"]],
            protocol_name=self.protocol_name[: _WIDTHS["protocol_name"]],
            calling_aet=calling_aet[: _WIDTHS["calling_aet"]],
            path=str(path),
            size_bytes=size_bytes,
            received_at=received_at,
            recovered=recovered,
        )


def _column_width(column: object) -> int | None:
    return getattr(getattr(column, "type", None), "length", None)


# Text columns' widths: PostgreSQL refuses longer values (SQLite does not), and one refused row
# would fail the whole batch of the InstanceRecorder. Looked up once, not per instance.
_WIDTHS: dict[str, int | None] = {
    "patient_id": _column_width(SeriesRow.patient_id),
    "patient_name": _column_width(SeriesRow.patient_name),
    "modality": _column_width(SeriesRow.modality),
    "series_description": _column_width(SeriesRow.series_description),
    "protocol_name": _column_width(SeriesRow.protocol_name),
    "calling_aet": _column_width(InstanceRow.calling_aet),
}


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
        return _read_file_header(Path(source), transfer_syntax_uid)
    data = memoryview(source).cast("B")
    if transfer_syntax_uid is None:
        transfer_syntax_uid, offset = _read_file_meta(data)
        data = data[offset:]
    return _header_from(_scan_dataset(data, transfer_syntax_uid), transfer_syntax_uid)


class HeaderError(SctNodeError, ValueError):
    """The encoded data is not a dataset that the header scanner can read."""


_UNDEFINED_LENGTH = 0xFFFFFFFF
_SHORT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
)  # explicit VRs with a 16-bit length (PS3.5 7.1.2); every other VR has a 32-bit one
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_SEQUENCE_DEPTH = 16
_HEADER_TAG_SET = frozenset((0x00080005, *HEADER_TAGS))  # with Specific Character Set
_META_TAGS = frozenset({0x00020010, 0x00020016})  # TransferSyntaxUID, SourceApplicationEntityTitle
_HEADER_SCAN_SYNTAXES = {  # transfer syntax: implicit VR (all little endian)
    "1.2.840.10008.1.2": True,
    "1.2.840.10008.1.2.1": False,
    "1.2.840.10008.1.2.1.99": False,  # deflated, inflated before scanning
    "1.2.840.10008.1.2.5": False,  # RLE Lossless: explicit VR, encapsulated pixel data
}


_DEFAULT_ENCODING = "iso8859"  # the default repertoire, decoded leniently as pydicom does
_MAX_INFLATED_HEADER_BYTES = 16 << 20
_FIRST_READ_BYTES = 1 << 20  # the header of any real instance; larger ones are read whole


def _read_file_header(path: Path, transfer_syntax_uid: str | None) -> InstanceHeader:
    with open(path, "rb") as fp:
        head = fp.read(_FIRST_READ_BYTES)
        try:
            return read_instance_header(head, transfer_syntax_uid)
        except HeaderError:
            rest = fp.read()
            if not rest:
                raise
    return read_instance_header(head + rest, transfer_syntax_uid)


def _read_file_meta(data: memoryview) -> tuple[str, int]:
    """(transfer syntax UID, offset of the dataset) of a Part 10 stream."""
    if bytes(data[128:132]) != b"DICM":
        raise HeaderError("not a DICOM Part 10 file (no DICM prefix)")
    meta, offset = _scan(data, 132, implicit=False, wanted=_META_TAGS, last_tag=0x0002FFFF, stop_at_any_later_tag=True)
    transfer_syntax_uid = _uid(meta.get(0x00020010, b""))
    if not transfer_syntax_uid:
        raise HeaderError("the file meta has no Transfer Syntax UID")
    return transfer_syntax_uid, offset


def source_application_entity_title(path: Path) -> str:
    """The calling AE title the SCP wrote into the file meta, "" when absent."""
    with open(path, "rb") as fp:
        data = memoryview(fp.read(_FIRST_READ_BYTES))
    if bytes(data[128:132]) != b"DICM":
        return ""
    meta, _ = _scan(data, 132, implicit=False, wanted=_META_TAGS, last_tag=0x0002FFFF, stop_at_any_later_tag=True)
    return bytes(meta.get(0x00020016, b"")).decode("ascii", "replace").strip(" \x00")


PIXEL_DATA_TAG = 0x7FE00010
_IMPLICIT_VR_LITTLE_ENDIAN, _EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
UNDEFINED_LENGTH = _UNDEFINED_LENGTH
_MAX_INFLATED_BYTES = 4 << 30


def pixel_data_length(path: Path) -> tuple[str, int | None]:
    """(transfer syntax UID, encoded length of the top-level Pixel Data) of a DICOM Part 10 file.

    The length is None when the dataset has no Pixel Data and :data:`UNDEFINED_LENGTH` for
    encapsulated (compressed) pixel data. Only element headers are walked, as in
    :func:`read_instance_header`: nothing is decoded. Raises HeaderError when the file cannot be
    walked to its pixel data (cut short, damaged lengths, unsupported transfer syntax).
    """
    data = memoryview(path.read_bytes())
    transfer_syntax_uid, offset = _read_file_meta(data)
    if transfer_syntax_uid == _EXPLICIT_VR_BIG_ENDIAN:
        raise HeaderError("transfer syntax Explicit VR Big Endian is not supported")
    # Every other transfer syntax (the compressed ones included) is explicit VR little endian.
    implicit = transfer_syntax_uid == _IMPLICIT_VR_LITTLE_ENDIAN
    dataset = data[offset:]
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            dataset = memoryview(inflater.decompress(dataset, _MAX_INFLATED_BYTES))
        except zlib.error as exc:
            raise HeaderError(f"cannot inflate the deflated dataset: {exc}") from exc
        if inflater.unconsumed_tail:
            raise HeaderError(f"the deflated dataset inflates to more than {_MAX_INFLATED_BYTES >> 30} GiB")
    _, pos = _scan(dataset, 0, implicit=implicit, wanted=frozenset(), last_tag=PIXEL_DATA_TAG - 1)
    if pos >= len(dataset):
        return transfer_syntax_uid, None
    tag, value_pos, length = _element_header(dataset, pos, implicit)
    if tag != PIXEL_DATA_TAG:
        return transfer_syntax_uid, None
    if length != _UNDEFINED_LENGTH and value_pos + length > len(dataset):
        raise HeaderError(f"the pixel data ({length} bytes) runs past the end of the file")
    return transfer_syntax_uid, length


def _scan_dataset(data: memoryview, transfer_syntax_uid: str) -> dict[int, memoryview]:
    implicit = _HEADER_SCAN_SYNTAXES.get(transfer_syntax_uid)
    if implicit is None:
        raise HeaderError(f"transfer syntax {transfer_syntax_uid!r:.70} is not supported")
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        try:  # only the head: the header is far smaller, and a deflate bomb must not fill the memory
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = memoryview(inflater.decompress(data, _MAX_INFLATED_HEADER_BYTES))
        except zlib.error as exc:
            raise HeaderError(f"cannot inflate the deflated dataset: {exc}") from exc
    if _tag_at(data, 0) >> 16 == 0x0002:
        # File Meta Information belongs in no dataset: in a spooled file it would run on from the
        # node's own meta, and readers would take the sender's (any transfer syntax) for the file's.
        raise HeaderError("the dataset starts with File Meta Information elements (group 0002)")
    values, _ = _scan(data, 0, implicit=implicit, wanted=_HEADER_TAG_SET, last_tag=_LAST_HEADER_TAG)
    if 0x00080016 not in values and 0x00080018 not in values:
        # Every composite instance has both; with neither, these bytes are not a dataset at all
        # (random bytes read as implicit VR look like elements of some high tag).
        raise HeaderError("no SOP Class UID and no SOP Instance UID: not an encoded dataset")
    return values


def _scan(
    data: memoryview,
    pos: int,
    *,
    implicit: bool,
    wanted: frozenset[int],
    last_tag: int,
    stop_at_any_later_tag: bool = False,
) -> tuple[dict[int, memoryview], int]:
    """Walk top-level elements from ``pos`` until a tag > ``last_tag`` or the end of ``data``.

    Returns the raw values of the ``wanted`` tags and the offset where the walk stopped.
    Sequences are skipped, never decoded. Raises HeaderError on truncated or malformed data,
    including an element header that is not valid where the walk stops, unless
    ``stop_at_any_later_tag`` (the file meta, which may be followed by another encoding).
    """
    found: dict[int, memoryview] = {}
    end = len(data)
    while pos < end:
        try:
            tag, value_pos, length = _element_header(data, pos, implicit)
        except HeaderError:
            # After the file meta may come an implicit VR dataset, which has no VR to read.
            if stop_at_any_later_tag and _tag_at(data, pos) > last_tag:
                return found, pos
            raise
        if tag > last_tag:
            return found, pos
        if length == _UNDEFINED_LENGTH:
            if tag in wanted:
                raise HeaderError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has an undefined length")
            pos = _skip_sequence(data, value_pos, _items_implicit(data, pos, implicit), depth=1)
            continue
        pos = value_pos + length
        if pos > end:
            raise HeaderError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end of the data")
        if tag in wanted:
            found[tag] = data[value_pos:pos]
    return found, pos


def _tag_at(data: memoryview, pos: int) -> int:
    if pos + 4 > len(data):
        return -1
    group, element = _TAG.unpack_from(data, pos)
    return group << 16 | element


def _element_header(data: memoryview, pos: int, implicit: bool) -> tuple[int, int, int]:
    """(tag, offset of the value, value length) of the element at ``pos``."""
    try:
        if implicit:
            group, element, length = _IMPLICIT_HEADER.unpack_from(data, pos)
            return group << 16 | element, pos + 8, length
        group, element, vr, length = _EXPLICIT_HEADER.unpack_from(data, pos)
        if group == 0xFFFE:  # items and delimiters have no VR in any transfer syntax
            return group << 16 | element, pos + 8, _U32.unpack_from(data, pos + 4)[0]
        if vr in _SHORT_VRS:
            return group << 16 | element, pos + 8, length
        if not (vr.isalpha() and vr.isupper()):
            raise HeaderError(f"element ({group:04X},{element:04X}) has no valid VR")
        # OB, OW, SQ, UN, UT... and any VR added later have a reserved word and a 32-bit length.
        return group << 16 | element, pos + 12, _U32.unpack_from(data, pos + 8)[0]
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
            pos = _skip_sequence(data, value_pos, _items_implicit(data, pos, implicit), depth + 1)
        else:
            pos = value_pos + length
        if pos > len(data):
            raise HeaderError("an item runs past the end of the data")


def _items_implicit(data: memoryview, pos: int, implicit: bool) -> bool:
    """Whether the items of the undefined-length element at ``pos`` are implicit VR encoded:
    an undefined-length UN in explicit VR holds implicit VR little endian (PS3.5 6.2.2)."""
    return implicit or bytes(data[pos + 4 : pos + 6]) == b"UN"


def _uid(raw: Buffer) -> str:
    return bytes(raw).decode("ascii", "replace").strip(" \x00")


def _header_from(values: dict[int, memoryview], transfer_syntax_uid: str) -> InstanceHeader:
    encodings = _encodings(values.get(0x00080005))

    def text(tag: int, person_name: bool = False) -> str:
        raw = values.get(tag)
        if raw is None:
            return ""
        try:
            decoded = (
                str(PersonName(bytes(raw), encodings)) if person_name else decode_bytes(bytes(raw), encodings, set())
            )
        except Exception:  # a damaged value must not refuse the instance: the audit gets the bytes as Latin-1
            decoded = bytes(raw).decode("latin-1")
        return decoded.strip(" \x00")

    return InstanceHeader(
        sop_class_uid=_uid(values.get(0x00080016, b"")),
        sop_instance_uid=_uid(values.get(0x00080018, b"")),
        transfer_syntax_uid=transfer_syntax_uid,
        series_instance_uid=_uid(values.get(0x0020000E, b"")),
        study_instance_uid=_uid(values.get(0x0020000D, b"")),
        patient_id=text(0x00100020),
        patient_name=text(0x00100010, person_name=True),
        modality=text(0x00080060),
        series_description=text(0x0008103E),
        protocol_name=text(0x00181030),
    )


def _encodings(raw: memoryview | None) -> list[str]:
    """Python codecs for the Specific Character Set; pydicom's lenient default when absent or unusable."""
    if raw is None:
        return [_DEFAULT_ENCODING]
    terms = [term.strip(" \x00") for term in bytes(raw).decode("ascii", "replace").split("\\")]
    try:
        return convert_encodings(terms)
    except Exception:  # pydicom warns about unknown terms, but raises on some damaged ones
        return [_DEFAULT_ENCODING]


def reconcile_spool(db: AuditDB, storage: StorageConfig) -> int:
    """Start-up repair: delete unacknowledged temporary files, rebuild missing audit rows.

    A spooled file without an instance row (the node died between the rename and the batched
    audit write) gets its row back, marked ``recovered``, with the calling AE title that the SCP
    wrote into the file meta (Source Application Entity Title) and the file's time as
    ``received_at``. Files are matched to rows by (SeriesInstanceUID, SOPInstanceUID) rather
    than by path (a storage root moved in the config does not make every file look new), with
    one query per 200 spooled series (one query for any usual spool), so that time and memory
    follow the spool, not the years of audit history.
    Returns the number of rows rebuilt. Files that cannot be read are logged and left alone.
    """
    ensure_storage_dirs(storage)
    removed = _remove_temp_files(storage.incoming)
    if removed:
        log.warning("deleted %d unacknowledged temporary file(s) from %s", removed, storage.incoming)
    spooled = _spooled_files(storage.spool)
    series_uids = list(spooled)
    missing: list[tuple[str, str, Path]] = []
    for start in range(0, len(series_uids), _SERIES_PER_QUERY):  # memory bounded by one chunk's rows
        chunk = series_uids[start : start + _SERIES_PER_QUERY]
        known = _known_instances(db, chunk)
        missing += [
            (series_uid, instance_uid, path)
            for series_uid in chunk
            for instance_uid, path in spooled[series_uid].items()
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


def _known_instances(db: AuditDB, series_uids: list[str]) -> set[tuple[str, str]]:
    """(series UID, instance UID) of every instance row of these series, in one query."""
    query = (
        select(SeriesRow.series_instance_uid, InstanceRow.sop_instance_uid)
        .join(InstanceRow, InstanceRow.series_id == SeriesRow.id)
        .where(SeriesRow.series_instance_uid.in_(series_uids))
    )
    with db.session() as session:
        return {(series, instance) for series, instance in session.execute(query)}


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
