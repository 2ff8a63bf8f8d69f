"""The sender: C-STORE of a whole series to one destination over one association (or a few in parallel).

Every instance's status is checked; the series counts as delivered only when every instance got
a success (0x0000) or warning (0xB000, 0xB006, 0xB007) status. Retries and backoff belong to the
caller (the pipeline's send stage), which records each attempt in the audit database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config

from dicom_node import tls as tls_support
from dicom_node.config import Destination, TLSConfig

log = logging.getLogger(__name__)

# While send_series runs, send_c_store(path) sends each file's encoded bytes as they are, without
# decoding and re-encoding the dataset (pynetdicom's default decodes the whole file and encodes it
# again: about 40 % of the sender's time for an sCT slice with 300 source references, and a chance
# to alter what was written). It needs a presentation context with exactly the file's transfer
# syntax, which send_series proposes first; a peer that accepts only another syntax gets the
# decoded dataset. pynetdicom's switch is process-wide, so it is on only while a send runs
# (counted, for parallel associations) and back to its value after.
_raw_sends_lock = threading.Lock()
_raw_sends_active = 0
_raw_sends_saved = False


@contextlib.contextmanager
def _raw_file_sends() -> Iterator[None]:
    global _raw_sends_active, _raw_sends_saved
    with _raw_sends_lock:
        if _raw_sends_active == 0:
            _raw_sends_saved = _config.STORE_SEND_CHUNKED_DATASET
            _config.STORE_SEND_CHUNKED_DATASET = True
        _raw_sends_active += 1
    try:
        yield
    finally:
        with _raw_sends_lock:
            _raw_sends_active -= 1
            if _raw_sends_active == 0:
                _config.STORE_SEND_CHUNKED_DATASET = _raw_sends_saved


WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})


@dataclasses.dataclass(frozen=True)
class InstanceStatus:
    path: str
    sop_instance_uid: str
    status: int | None  # None: no response (association lost or timed out)


@dataclasses.dataclass(frozen=True)
class SendResult:
    destination: str
    ok: bool
    sent: int  # instances acknowledged with success or warning
    failed: int  # instances refused or not answered
    message: str
    statuses: tuple[InstanceStatus, ...]


def set_tcp_nodelay(assoc: Any) -> None:
    """Disable Nagle's algorithm on the association's socket.

    pynetdicom sends a C-STORE as a small command PDU followed by the dataset PDUs and then waits
    for the response; with Nagle on, the peer's delayed ACK makes every instance wait ~40 ms (the
    same reason DCMTK and Orthanc are started with TCP_NODELAY=1).
    """
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            log.debug("could not set TCP_NODELAY", exc_info=True)


def _sop_uids(path: Path) -> tuple[str, str, str]:
    """SOP Class, SOP Instance and transfer syntax UIDs from the file meta information only (the
    writer fills its Media Storage UIDs from the dataset's): a tenth of the time of reading the
    dataset's header, whose references to the MR can be tens of kilobytes."""
    meta = read_file_meta_info(path)
    if "MediaStorageSOPClassUID" in meta and "MediaStorageSOPInstanceUID" in meta and "TransferSyntaxUID" in meta:
        return str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)
    header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    return str(header.SOPClassUID), str(header.SOPInstanceUID), str(header.file_meta.TransferSyntaxUID)


def send_series(
    paths: Sequence[Path],
    destination: Destination,
    *,
    calling_aet: str,
    timeout_s: float,
    tls: TLSConfig | None = None,
) -> SendResult:
    """Send every file in ``paths`` to ``destination``, over one association (the default) or over
    ``destination.associations`` associations in parallel, each carrying every n-th file.

    With ``destination.tls`` the association runs over DICOM TLS with the certificates of ``tls``
    (built into a fresh SSL context per send, so renewed certificate files are picked up).
    """
    if not paths:
        return SendResult(destination.name, False, 0, 0, "nothing to send", ())
    headers = [(Path(p), *_sop_uids(Path(p))) for p in paths]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class, syntax in sorted({(h[1], h[3]) for h in headers}):
        ae.add_requested_context(sop_class, [syntax])  # the file's own syntax: sent as it is
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])  # else converted
    where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
    tls_args = None
    if destination.tls:
        where += " over TLS"
        try:
            if tls is None:
                raise ValueError("no [tls] configuration was given to the sender")
            tls_args = (tls.client_context(), destination.host)
        except Exception as exc:  # missing or unreadable certificate files
            return SendResult(destination.name, False, 0, len(paths), f"{where}: cannot set up TLS: {exc}", ())
    count = max(1, min(destination.associations, len(headers)))
    shares = [headers[i::count] for i in range(count)]
    try:
        with _raw_file_sends():
            if count == 1:
                outcomes = [_send_share(ae, destination, where, tls_args, timeout_s, shares[0])]
            else:
                with ThreadPoolExecutor(count, thread_name_prefix=f"send-{destination.name}") as pool:
                    outcomes = list(
                        pool.map(lambda share: _send_share(ae, destination, where, tls_args, timeout_s, share), shares)
                    )
    finally:
        ae.shutdown()
    problems = [problem for problem, _ in outcomes if problem is not None]
    statuses = [s for _, share in outcomes for s in share]
    if problems and not statuses:
        return SendResult(destination.name, False, 0, len(paths), problems[0], ())
    good = [s for s in statuses if s.status is not None and (s.status == 0 or s.status in WARNING_STATUSES)]
    bad = [s for s in statuses if s.status is None or not (s.status == 0 or s.status in WARNING_STATUSES)]
    unsent = len(paths) - len(statuses)  # shares whose association could not be opened
    over = f" over {count} associations" if count > 1 else ""
    if bad or unsent:
        if bad:
            first = "no response" if bad[0].status is None else f"status 0x{bad[0].status:04X}"
        else:
            first = problems[0].removeprefix(f"{where}: ")
        message = f"{where}: {len(bad) + unsent} of {len(paths)} instance(s) not stored{over} (first: {first})"
    else:
        message = f"{where}: {len(good)} instance(s) stored{over}"
    return SendResult(destination.name, not (bad or unsent), len(good), len(bad) + unsent, message, tuple(statuses))


def _send_share(
    ae: AE,
    destination: Destination,
    where: str,
    tls_args: tuple[Any, str] | None,
    timeout_s: float,
    share: Sequence[tuple[Path, str, str, str]],
) -> tuple[str | None, list[InstanceStatus]]:
    """One association carrying ``share``: (why it could not be opened, or None; each instance's status)."""
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    except Exception as exc:  # name resolution and socket errors surface here
        return f"cannot connect to {where}: {exc}", []
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "association aborted or no answer"
        if tls_args is not None and not assoc.is_rejected:  # pynetdicom only logs why: ask again
            problem = tls_support.probe(destination.host, destination.port, tls_args[0], timeout_s)
            reason = f"TLS connection failed: {problem}" if problem else f"{reason} (TLS handshake succeeded)"
        return f"{where}: {reason}", []
    set_tcp_nodelay(assoc)

    statuses: list[InstanceStatus] = []
    try:
        for message_id, (path, _sop_class, sop_instance, _syntax) in enumerate(share, start=1):
            if not assoc.is_established:
                statuses.append(InstanceStatus(str(path), sop_instance, None))
                continue
            try:
                try:
                    response = assoc.send_c_store(path, msg_id=message_id % 65536)
                except ValueError:  # no accepted context with the file's syntax: decode, let pynetdicom convert
                    response = assoc.send_c_store(dcmread(path), msg_id=message_id % 65536)
                status = int(response.Status) if response is not None and "Status" in response else None
            except (ValueError, AttributeError, OSError) as exc:
                log.warning("C-STORE of %s to %s failed: %s", path.name, destination.name, exc)
                status = None
            statuses.append(InstanceStatus(str(path), sop_instance, status))
    finally:
        if assoc.is_established:
            assoc.release()
    return None, statuses
