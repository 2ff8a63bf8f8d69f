"""The DICOM listener: receives MR instances from scanners (C-STORE) into the spool.

Accepted: MR Image Storage and Enhanced MR Image Storage, in the transfer syntaxes whose pixel
data the installed pydicom decodes without extra plugins (:data:`TRANSFER_SYNTAXES`), and
Verification (C-ECHO). Every other SOP class is refused at association negotiation (its
presentation context is rejected; an association that proposes no MR storage at all is audited
as ``sop_class_refused``). Calling AE titles outside ``node.allowed_calling_aets`` (when the
list is not empty) and, with ``node.require_called_aet``, a called AE title other than
``node.ae_title`` get the association rejected (audited as ``association_rejected``), as does
one beyond ``node.max_associations``. With ``node.tls = "required"`` the listener speaks only
DICOM TLS (:mod:`dicom_node.tls`): a connection without TLS, or without a client certificate
signed by ``tls.ca_certificates``, fails its handshake before any DICOM is read and is audited
as ``tls_refused``; the AE title checks above still apply inside TLS.

What pynetdicom 3.0 leaves unbounded on a connection is bounded here (hooks installed on each
new connection, see :func:`guard_connection` and the functions after it; tests/test_scp.py and
tests/reliability/test_fuzz_pdu.py hold the behaviour): a PDU declared longer than
:data:`MAX_PDU_BYTES` is not read, a PDU header or body that does not arrive within
:data:`PDU_READ_TIMEOUT_S` drops the connection, a connection that ends before its association
frees its slot at once, an A-ASSOCIATE-RQ pynetdicom fails on and a DIMSE message that is no
valid request are answered with an A-ABORT instead of silence. Between PDUs pynetdicom's own
timers apply (ARTIM 30 s before an association, 60 s idle inside one).

Each instance is written to the spool from the raw bytes the sender encoded, never decoded and
re-encoded: pynetdicom's ``event.encoded_dataset(include_meta=False)`` hands over the dataset as
received, our own File Meta Information goes in front (:func:`dicom_node.spool.part10_header`)
and :func:`dicom_node.spool.write_atomic` puts the file in place. Only the few header fields the
audit needs are parsed (:func:`dicom_node.spool.read_instance_header`). The success status is
sent only once the file is complete in the spool (and fsynced when ``storage.fsync``); its audit
row follows within a fraction of a second through the batching :class:`InstanceRecorder`.

Why in memory and not pynetdicom's chunked receive (``STORE_RECV_CHUNKED_DATASET``): that
setting is process-wide, writes its temporary file in the system temporary folder (often another
file system than the spool, so no atomic rename, and a copy instead), with a write call per PDU
and pynetdicom's own file meta; it saves memory only for datasets far larger than an MR slice
(an Enhanced MR series object is at most a few hundred MB, times ``max_associations``). In
memory, the dataset is one bytes object written to disk as it is, after the file meta.

C-STORE response statuses (PS3.4 B.2.3 and PS3.7 C); each failure also carries an Error Comment
(0000,0902), is logged at WARNING (no patient identifiers) and audited as a ``store_refused``
event with the details; nothing is left in the spool:

======  ==========================================  ===========================================
Status  Meaning                                     When
======  ==========================================  ===========================================
0x0000  Success                                     the file is in the spool
0x0122  Refused: SOP Class Not Supported            not MR / Enhanced MR (negotiation should
                                                    have refused it already)
0xA700  Refused: Out of Resources                   free space on ``storage.root`` would fall
                                                    below ``storage.min_free_mb`` (checked
                                                    before writing), or the disk is full
0xA701  Refused: Out of Resources                   writing the file failed (any other OSError)
0xA900  Data Set Does Not Match SOP Class           SOP Class UID in the dataset differs from
                                                    the request's Affected SOP Class UID
0xC210  Cannot Understand                           the dataset cannot be parsed
0xC211  Cannot Understand                           unexpected error in the node (a bug; logged
                                                    with its traceback)
0xC220  Cannot Understand                           SOP Instance, Series Instance or Study
                                                    Instance UID missing or not a valid UID
0xC221  Cannot Understand                           SOP Instance UID in the dataset differs from
                                                    the request's Affected SOP Instance UID
======  ==========================================  ===========================================
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.audit import AuditDB, InstanceRecorder, add_event, utcnow
from dicom_node.config import Config
from dicom_node.scu import set_tcp_nodelay
from dicom_node.spool import (
    InstanceHeader,
    ensure_storage_dirs,
    is_valid_uid,
    part10_header,
    read_instance_header,
    spool_path,
    write_atomic,
)
from dicom_node.tls import start_tls_server

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: tuple[str, ...] = (MRImageStorage, EnhancedMRImageStorage)
VERIFICATION_SOP_CLASS = UID("1.2.840.10008.1.1")
# Uncompressed, deflated and RLE Lossless: pydicom decodes all four with numpy alone. JPEG
# Lossless, JPEG-LS and JPEG 2000 need optional plugins and are left out until one is a
# dependency of the project; scanners then fall back to an uncompressed syntax they also offer.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
)
_MIB = 1 << 20
_ERROR_COMMENT_CHARS = 64  # Error Comment is LO
_MAX_LISTED_CLASSES = 10
# What one PDU may cost (see guard_connection): its header, and then its body, must arrive within
# PDU_READ_TIMEOUT_S (the usual ACSE/ARTIM timeout of DCMTK and pynetdicom), and its declared
# length must not exceed MAX_PDU_BYTES (a thousand times the 16382-byte maximum the node proposes).
PDU_READ_TIMEOUT_S = 30.0
MAX_PDU_BYTES = 16 * _MIB
_RECV_CHUNK_BYTES = 1 << 20
_PDU_HEADER_BYTES = 6
_PDU_TYPES = frozenset(range(0x01, 0x08))  # A-ASSOCIATE-RQ ... A-ABORT (PS3.8 9.3.1)


class Status(IntEnum):
    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    WRITE_FAILED = 0xA701
    SOP_CLASS_MISMATCH = 0xA900
    CANNOT_PARSE = 0xC210
    INTERNAL_ERROR = 0xC211
    UID_MISSING_OR_INVALID = 0xC220
    INSTANCE_UID_MISMATCH = 0xC221


class StoreRefusedError(Exception):
    """Why one C-STORE is refused: the status, a short reason (no patient data) and audit details."""

    def __init__(self, status: Status, reason: str, **detail: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail

    def response(self) -> Dataset:
        rsp = Dataset()
        rsp.Status = int(self.status)
        rsp.ErrorComment = self.reason[:_ERROR_COMMENT_CHARS]
        return rsp


@dataclass
class _AssociationTally:
    calling_aet: str
    address: str
    stored: int = 0
    refused: dict[int, int] = field(default_factory=dict)


# Rejection reasons by (result source, diagnostic) of the A-ASSOCIATE-RJ that pynetdicom sent.
_REJECTION_REASONS: dict[tuple[int | None, int | None], str] = {
    (0x01, 0x03): "calling AE title not allowed",
    (0x01, 0x07): "called AE title is not this node's",
    (0x03, 0x02): "too many simultaneous associations",
    (0x02, 0x01): "user identity refused",
}


class StorageSCP:
    """The node's C-STORE / C-ECHO listener; ``start()`` returns at once, ``stop()`` ends it."""

    def __init__(self, config: Config, db: AuditDB, recorder: InstanceRecorder) -> None:
        self._config = config
        self._db = db
        self._recorder = recorder
        self._server: ThreadedAssociationServer | None = None
        self._tallies: weakref.WeakKeyDictionary[Association, _AssociationTally] = weakref.WeakKeyDictionary()
        self._tally_lock = threading.Lock()
        self._ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self._config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.require_called_aet = node.require_called_aet
        ae.require_calling_aet = list(node.allowed_calling_aets)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION_SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    def _handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_CONN_CLOSE, self._on_connection_close),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the DICOM listener is already running")
        ensure_storage_dirs(self._config.storage)
        node = self._config.node
        if node.tls == "required":
            self._server = start_tls_server(
                self._ae,
                (node.bind, node.port),
                self._config.tls.server_context(),
                self._handlers(),
                on_failure=self._on_tls_refused,
            )
        else:
            self._server = self._ae.start_server((node.bind, node.port), block=False, evt_handlers=self._handlers())
        log.info(
            "DICOM listener %s on %s:%d%s: MR and Enhanced MR Image Storage, Verification; %s",
            node.ae_title,
            node.bind,
            self.port,
            " (DICOM TLS only, client certificates required)" if node.tls == "required" else "",
            f"calling AE titles {', '.join(node.allowed_calling_aets)}"
            if node.allowed_calling_aets
            else "any calling AE title",
        )

    @property
    def port(self) -> int:
        """The TCP port actually bound (the configured one, or the free one picked for port 0)."""
        if self._server is None:
            raise RuntimeError("the DICOM listener is not running")
        return int(self._server.server_address[1])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting; let running associations finish for ``timeout_s``, then abort them.

        An aborted sender has not had the success status of its last instance, so it sends it
        again: nothing acknowledged is lost.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + timeout_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            log.warning("aborting the association from %s at shutdown", printable_ae_title(assoc.requestor.ae_title))
            assoc.abort()
        log.info("DICOM listener %s stopped", self._config.node.ae_title)

    # C-STORE ---------------------------------------------------------------------------------

    def _on_store(self, event: Event) -> Dataset | int:
        """The EVT_C_STORE handler. Never raises: every problem becomes a failure status."""
        calling_aet = "?"
        try:
            calling_aet = _calling_aet(event)
            self._store(event, calling_aet)
        except StoreRefusedError as refusal:
            self._refuse(event, calling_aet, refusal)
            return refusal.response()
        except Exception as exc:  # a bug: the sender gets a failure and resends, the node stays up
            log.exception("unexpected error while storing an instance from %s", calling_aet)
            internal = StoreRefusedError(Status.INTERNAL_ERROR, "internal error in the node", error=repr(exc)[:500])
            self._refuse(event, calling_aet, internal)
            return internal.response()
        self._tally(event, stored=1)
        return int(Status.SUCCESS)

    def _store(self, event: Event, calling_aet: str) -> None:
        request = cast(C_STORE, event.request)
        sop_class_uid = str(request.AffectedSOPClassUID or "")
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        if sop_class_uid not in STORAGE_SOP_CLASSES:
            raise StoreRefusedError(
                Status.SOP_CLASS_NOT_SUPPORTED, "SOP class not supported", sop_class_uid=sop_class_uid
            )
        transfer_syntax_uid = str(event.context.transfer_syntax)
        data = event.encoded_dataset(include_meta=False)
        self._check_free_space(len(data))
        header = _parse_header(data, transfer_syntax_uid)
        _check_header(header, sop_class_uid, sop_instance_uid)
        storage = self._config.storage
        path = spool_path(storage, header.series_instance_uid, header.sop_instance_uid)
        meta = part10_header(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            implementation_class_uid=self._ae.implementation_class_uid,
            implementation_version_name=self._ae.implementation_version_name or "",
            source_aet=calling_aet,
        )
        try:
            size_bytes = write_atomic((meta, data), path, storage.incoming, storage.fsync)
        except OSError as exc:
            disk_full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise StoreRefusedError(
                Status.OUT_OF_RESOURCES if disk_full else Status.WRITE_FAILED,
                "storage full" if disk_full else "cannot write to the spool",
                error=f"{type(exc).__name__}: {exc.strerror or exc}",
                series_instance_uid=header.series_instance_uid,
                sop_instance_uid=header.sop_instance_uid,
            ) from exc
        self._recorder.record(
            header.received(calling_aet=calling_aet, path=path, size_bytes=size_bytes, received_at=utcnow())
        )
        log.debug("stored %s (%d bytes) from %s", path.name, size_bytes, calling_aet)

    def _check_free_space(self, incoming_bytes: int) -> None:
        storage = self._config.storage
        try:
            stat = os.statvfs(storage.root)
        except OSError as exc:
            raise StoreRefusedError(Status.WRITE_FAILED, "storage not available", error=str(exc)) from exc
        free_bytes = stat.f_bavail * stat.f_frsize
        floor_bytes = storage.min_free_mb * _MIB
        if free_bytes - incoming_bytes < floor_bytes:
            raise StoreRefusedError(
                Status.OUT_OF_RESOURCES,
                "storage below its free-space floor",
                free_mb=round(free_bytes / _MIB, 1),
                min_free_mb=storage.min_free_mb,
            )

    def _refuse(self, event: Event, calling_aet: str, refusal: StoreRefusedError) -> None:
        """Log (no patient data) and audit one refused C-STORE; never raises."""
        try:
            request = cast(C_STORE, event.request)
            self._tally(event, refused_status=int(refusal.status))
            log.warning("C-STORE from %s refused with 0x%04X: %s", calling_aet, int(refusal.status), refusal.reason)
            detail = {
                "status": f"0x{int(refusal.status):04X}",
                "calling_aet": calling_aet,
                "address": _address(event),
                "affected_sop_class_uid": str(request.AffectedSOPClassUID or ""),
                "affected_sop_instance_uid": str(request.AffectedSOPInstanceUID or ""),
                **refusal.detail,
            }
            with self._db.session() as session:
                add_event(session, "store_refused", refusal.reason, detail=detail)
        except Exception:
            log.exception("could not audit a refused C-STORE from %s", calling_aet)

    # Association events ----------------------------------------------------------------------

    def _on_echo(self, event: Event) -> int:
        log.debug("C-ECHO from %s", _calling_aet(event))
        return int(Status.SUCCESS)

    def _on_connection_open(self, event: Event) -> None:
        try:
            guard_connection(event.assoc, _address(event))
            abort_invalid_requests(event.assoc, _address(event))
            end_with_failed_negotiation(event.assoc, _address(event))
        except Exception:
            log.exception("cannot guard a new connection")

    def _on_connection_close(self, event: Event) -> None:
        try:
            end_if_unassociated(event.assoc)
        except Exception:
            log.exception("cannot end the thread of a connection closed before its association")

    def _on_accepted(self, event: Event) -> None:
        try:
            calling_aet = _calling_aet(event)
            with self._tally_lock:
                self._tallies[event.assoc] = _AssociationTally(calling_aet, _address(event))
            log.info("association from %s (%s) accepted", calling_aet, _address(event))
            set_tcp_nodelay(event.assoc)  # responses are small writes: never wait for a delayed ACK
            accepted = {str(cx.abstract_syntax) for cx in event.assoc.accepted_contexts}
            proposed = {str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts}
            refused = sorted(proposed - accepted)
            if refused and not accepted.intersection(STORAGE_SOP_CLASSES):
                # Senders commonly propose every class they know (storescu proposes about 60):
                # only an association that can send nothing the node takes is worth an audit row.
                names = [UID(uid).name for uid in refused]
                log.warning(
                    "association from %s proposes no MR storage; refused: %s",
                    calling_aet,
                    "; ".join(names[:_MAX_LISTED_CLASSES]),
                )
                self._audit(
                    "sop_class_refused",
                    f"{calling_aet} proposed only SOP classes the node does not accept",
                    calling_aet=calling_aet,
                    address=_address(event),
                    sop_classes=[f"{uid} ({name})" for uid, name in zip(refused, names, strict=True)],
                )
            elif refused:
                log.debug("association from %s: %d SOP class(es) refused", calling_aet, len(refused))
        except Exception:
            log.exception("error in the association-accepted handler")

    def _on_tls_refused(self, address: str, reason: str) -> None:
        """A connection to the TLS listener failed its handshake (no TLS, untrusted certificate, timeout)."""
        self._audit("tls_refused", f"TLS connection from {address} refused: {reason}", address=address, reason=reason)

    def _on_rejected(self, event: Event) -> None:
        try:
            calling_aet = _calling_aet(event)
            primitive = event.assoc.acceptor.primitive
            key = (getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None))
            reason = _REJECTION_REASONS.get(key, "rejected")
            log.warning("association from %s (%s) rejected: %s", calling_aet, _address(event), reason)
            self._audit(
                "association_rejected",
                f"association from {calling_aet} rejected: {reason}",
                calling_aet=calling_aet,
                called_aet=_called_aet(event),
                address=_address(event),
                reason=reason,
            )
        except Exception:
            log.exception("error in the association-rejected handler")

    def _on_closed(self, event: Event) -> None:
        try:
            with self._tally_lock:
                tally = self._tallies.pop(event.assoc, None)
            if tally is None:
                return
            how = "released" if event.event is evt.EVT_RELEASED else "aborted"
            refused = ", ".join(f"{n} x 0x{status:04X}" for status, n in sorted(tally.refused.items()))
            log.info(
                "association from %s %s: %d instance(s) stored%s",
                tally.calling_aet,
                how,
                tally.stored,
                f", refused {refused}" if refused else "",
            )
        except Exception:
            log.exception("error in the association-closed handler")

    def _tally(self, event: Event, *, stored: int = 0, refused_status: int | None = None) -> None:
        """Count for the association's summary line; never raises (the counts are only for the log)."""
        try:
            with self._tally_lock:
                tally = self._tallies.get(event.assoc)
                if tally is None:
                    return
                tally.stored += stored
                if refused_status is not None:
                    tally.refused[refused_status] = tally.refused.get(refused_status, 0) + 1
        except Exception:
            log.exception("cannot count a C-STORE for the association summary")

    def _audit(self, kind: str, message: str, **detail: Any) -> None:
        with self._db.session() as session:
            add_event(session, kind, message, detail=detail)


def _parse_header(data: bytes, transfer_syntax_uid: str) -> InstanceHeader:
    try:
        return read_instance_header(data, transfer_syntax_uid)
    except Exception as exc:
        raise StoreRefusedError(
            Status.CANNOT_PARSE, "dataset cannot be parsed", error=f"{type(exc).__name__}: {exc}"[:500]
        ) from exc


def _check_header(header: InstanceHeader, sop_class_uid: str, sop_instance_uid: str) -> None:
    """The dataset must be the instance the request announced, with usable UIDs."""
    for name, value in (
        ("SOPInstanceUID", header.sop_instance_uid),
        ("SeriesInstanceUID", header.series_instance_uid),
        ("StudyInstanceUID", header.study_instance_uid),
    ):
        if not is_valid_uid(value):
            raise StoreRefusedError(
                Status.UID_MISSING_OR_INVALID,
                f"{name} {'invalid' if value else 'missing'}",
                element=name,
                value=value[:80],
                sop_instance_uid=header.sop_instance_uid[:80],
            )
    if header.sop_instance_uid != sop_instance_uid:
        raise StoreRefusedError(
            Status.INSTANCE_UID_MISMATCH,
            "SOPInstanceUID differs from the request's",
            dataset_sop_instance_uid=header.sop_instance_uid,
        )
    if header.sop_class_uid != sop_class_uid:
        raise StoreRefusedError(
            Status.SOP_CLASS_MISMATCH,
            "SOPClassUID differs from the request's",
            dataset_sop_class_uid=header.sop_class_uid[:80],
            sop_instance_uid=header.sop_instance_uid,
        )


def guard_connection(assoc: Association, address: str) -> None:
    """Bound the time and the memory one PDU may take on the connection of ``assoc``.

    pynetdicom reads a PDU with a blocking recv() without a time limit, first its 6-byte header
    and then as many bytes as the header declares. A peer that stops in the middle of a PDU (a
    crash, a pulled cable, a half-open connection, a client sending half a header or a byte now
    and then) held its connection thread, and one of ``node.max_associations``, for as long as
    the connection stayed up: neither pynetdicom's ARTIM timer nor its idle timer can fire while
    that thread waits in recv(). And a declared length of up to 4 GiB was read into memory.

    Here each of the two reads must complete within PDU_READ_TIMEOUT_S, and a declared length
    above MAX_PDU_BYTES is not read at all: pynetdicom then closes the connection as it does for
    a peer that closed it (no association, or an aborted one; nothing half-stored). The socket
    timeout also bounds a send to a peer that stopped reading.
    """
    assoc_socket = assoc.dul.socket
    if assoc_socket is None or assoc_socket.socket is None:
        return
    assoc_socket.socket.settimeout(PDU_READ_TIMEOUT_S)
    # pynetdicom reads each PDU as recv(6) for its header, then recv(length) for its body (none for
    # an unknown PDU type), and it reads the next PDU before it acts on the one before: once the
    # connection is being dropped, or aborted for an unknown PDU type, what follows is read as a
    # closed connection at once instead of being waited for.
    state = {"header_next": True, "ended": False}

    def recv(nr_bytes: int) -> bytearray:
        sock = assoc_socket.socket
        if sock is None or state["ended"]:
            return bytearray()
        try:
            data = _recv_within(sock, nr_bytes, PDU_READ_TIMEOUT_S)
        except OSError as exc:
            state["ended"] = True
            log.warning("dropping the connection from %s: %s", address, exc)
            raise
        if not state["header_next"]:
            state["header_next"] = True
        elif len(data) == _PDU_HEADER_BYTES:
            state["header_next"] = False
            state["ended"] = data[0] not in _PDU_TYPES
        return data

    assoc_socket.recv = recv  # type: ignore[method-assign]


def abort_invalid_requests(assoc: Association, address: str) -> None:
    """Abort the association on a DIMSE message that is not a valid request, instead of ignoring it.

    pynetdicom drops such a message with a warning (a C-STORE-RQ without its Affected SOP Instance
    UID, a C-ECHO-RQ without its SOP Class UID, a response sent to the node), and its sender waited
    for an answer that never came, holding its association until a timeout. The abort tells it at
    once that its request was not taken.
    """
    serve = assoc._serve_request

    def serve_or_abort(msg: Any, context_id: int) -> None:
        if msg is not None and not assoc._sent_release and not msg.is_valid_request:
            log.warning(
                "aborting the association from %s: a %s message that is not a valid request", address, msg.msg_type
            )
            assoc.abort()
            return
        serve(msg, context_id)

    assoc._serve_request = serve_or_abort  # type: ignore[method-assign]


def end_with_failed_negotiation(assoc: Association, address: str) -> None:
    """Abort at once when pynetdicom fails on an A-ASSOCIATE-RQ it cannot handle.

    Some malformed requests (found by tests/reliability/test_fuzz_pdu.py) raise inside pynetdicom
    and leave the peer without an answer: a presentation context ID that is even or 0 fails its
    connection thread, and the acceptor thread waited for the request for ``acse_timeout`` (30 s),
    the connection open and its slot taken; a presentation context without a transfer syntax
    fails the acceptor thread, and the connection stayed open for as long as the peer kept it.
    Here the peer gets an A-ABORT and the connection is closed.
    """
    negotiate = assoc.acse.negotiate_association

    def negotiate_or_abort() -> None:
        try:
            negotiate()
        except Exception as exc:
            log.warning("aborting the association request from %s, which pynetdicom cannot handle: %r", address, exc)
            assoc.abort()

    assoc.acse.negotiate_association = negotiate_or_abort  # type: ignore[method-assign]
    dul = assoc.dul
    do_action = dul.state_machine.do_action

    def do_action_or_abort(event: str) -> None:
        try:
            do_action(event)
        except Exception as exc:
            if assoc.is_established:
                raise  # pynetdicom's acceptor thread sees its connection thread end, and closes
            # pynetdicom has logged the error and stopped the connection thread (kill_dul)
            log.warning("aborting the association request from %s, which pynetdicom cannot handle: %r", address, exc)
            with contextlib.suppress(Exception):
                dul.socket.send(_A_ABORT_PDU)  # type: ignore[union-attr]
            end_if_unassociated(assoc)

    dul.state_machine.do_action = do_action_or_abort  # type: ignore[method-assign]


_A_ABORT_PDU = bytes.fromhex("07000000000400000000")  # A-ABORT, service-user source, no reason (PS3.8 9.3.8)


def end_if_unassociated(assoc: Association) -> None:
    """Let the thread of a connection closed before any association end with it.

    pynetdicom's acceptor thread waits for the A-ASSOCIATE-RQ for ``acse_timeout`` (30 s) even
    when its connection is already gone (closed by the peer, aborted for an invalid PDU, dropped by
    :func:`guard_connection`), and counts towards ``node.max_associations`` all that time: ten
    port scans, health checks or garbage connections within 30 s locked every scanner out. The
    thread ends at once on ``None`` in the queue it waits on (what its own timeout gives it).
    """
    if not assoc.is_established and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]


def _recv_within(sock: Any, nr_bytes: int, timeout_s: float) -> bytearray:
    """``nr_bytes`` from ``sock`` within ``timeout_s``, or fewer when the peer closes (as pynetdicom's recv)."""
    if nr_bytes > MAX_PDU_BYTES:
        raise OSError(errno.EMSGSIZE, f"a PDU declared {nr_bytes} bytes long (at most {MAX_PDU_BYTES} are read)")
    deadline = time.monotonic() + timeout_s
    data = bytearray()
    try:
        while len(data) < nr_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(data)} of {nr_bytes} bytes of a PDU arrived in {timeout_s:g} s")
            sock.settimeout(remaining)
            chunk = sock.recv(min(nr_bytes - len(data), _RECV_CHUNK_BYTES))
            if not chunk:
                break
            data += chunk
    except TimeoutError as exc:
        raise TimeoutError(f"{len(data)} of {nr_bytes} bytes of a PDU arrived in {timeout_s:g} s") from exc
    finally:
        sock.settimeout(timeout_s)
    return data


def _calling_aet(event: Event) -> str:
    return printable_ae_title(event.assoc.requestor.ae_title)


def _called_aet(event: Event) -> str:
    primitive = event.assoc.requestor.primitive
    return printable_ae_title(getattr(primitive, "called_ae_title", ""))


def printable_ae_title(value: object) -> str:
    """An AE title as the peer sent it, stripped, with anything outside printable ASCII escaped
    (``\\x1b``, ``\\n``...): AE titles go into logs, the audit trail and ``audit show`` on a terminal,
    and a peer must not be able to forge log lines or send terminal escape codes through them.
    Valid AE titles (the DICOM default repertoire without control characters) are unchanged."""
    text = str(value or "").strip()
    return "".join(c if " " <= c <= "~" and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in text)


def _address(event: Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.address}:{requestor.port}"
