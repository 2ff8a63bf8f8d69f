"""DICOM TLS (PS3.15 B.1): the SSL contexts of the node, its TLS listener and a sender-side diagnosis.

One certificate and private key (``[tls] certificate``, ``private_key``) serve both as the
listener's server certificate and as the sender's client certificate; ``[tls] ca_certificates``
is the only trust anchor: peers' certificates must be signed by it (the system's CA store is not
used). Both directions require TLS 1.2 or later and a verified peer certificate; the sender also
checks that the destination's certificate names the configured host (DNS name or IP address).

Why the listener is not pynetdicom's ``start_server(ssl_context=...)``: that server does the TLS
handshake inside its accept loop, with no timeout, so a single TCP connection that sends nothing
(a port scanner, a half-open connection) stops every later scanner from connecting until it goes
away. :class:`TLSAssociationServer` accepts plain sockets and does each handshake in the
connection's own thread with a time limit; a failed handshake is reported (``on_failure``) and the
connection closed before any DICOM is read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
HANDSHAKE_TIMEOUT_S = 30.0
_PROBE_READ_S = 2.0


EXPIRY_WARNING_DAYS = 30  # the node warns (log and audit) this long before its certificate expires


@dataclasses.dataclass(frozen=True)
class CertificateDates:
    """The validity period of a certificate (UTC)."""

    not_before: dt.datetime
    not_after: dt.datetime

    def problem(self, now: dt.datetime) -> str | None:
        """Why the certificate cannot be used at ``now`` (every TLS handshake would fail), or None."""
        if now >= self.not_after:
            return f"expired on {self.not_after:%Y-%m-%d %H:%M} UTC"
        if now < self.not_before:
            return f"not valid before {self.not_before:%Y-%m-%d %H:%M} UTC"
        return None

    def days_left(self, now: dt.datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400.0


def certificate_dates(certificate: Path) -> CertificateDates:
    """The validity period of the first certificate of a PEM file (the node's own; the others are
    its chain). Raises ValueError for a file without a PEM certificate."""
    from cryptography import x509  # only where TLS is configured

    first = x509.load_pem_x509_certificates(certificate.read_bytes())[0]
    return CertificateDates(first.not_valid_before_utc, first.not_valid_after_utc)


def no_password() -> str:
    """The ``password`` of ``load_cert_chain``: without it OpenSSL would prompt on the terminal."""
    raise ValueError("the private key is encrypted: the node needs an unencrypted key (protect it by file permissions)")


def server_context(certificate: Path, private_key: Path, ca_certificates: Path) -> ssl.SSLContext:
    """The listener's context: present ``certificate``, require a client certificate signed by the CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(certificate, private_key, password=no_password)
    context.load_verify_locations(cafile=ca_certificates)
    return context


def client_context(certificate: Path, private_key: Path, ca_certificates: Path) -> ssl.SSLContext:
    """The sender's context: verify the server's certificate and host name, present ``certificate``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = MINIMUM_VERSION
    context.load_cert_chain(certificate, private_key, password=no_password)
    context.load_verify_locations(cafile=ca_certificates)
    return context


def describe_error(exc: BaseException) -> str:
    """A short, plain reason for a failed TLS connection."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    return f"{type(exc).__name__}: {exc}"


class TLSAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake in each connection's thread.

    Set :attr:`tls_context` (and optionally :attr:`on_failure`, :attr:`handshake_timeout_s`)
    before ``serve_forever`` starts; :func:`start_tls_server` does it.
    """

    tls_context: ssl.SSLContext
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    on_failure: Callable[[str, str], None] | None = None
    # A handshake that is still waiting must not keep the process alive at shutdown.
    daemon_threads = True
    _closing = False

    def shutdown(self) -> None:
        self._closing = True
        super().shutdown()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = f"{client_address[0]}:{client_address[1]}"
        try:
            request.settimeout(self.handshake_timeout_s)
            tls_socket = self.tls_context.wrap_socket(request, server_side=True)
            tls_socket.settimeout(None)  # pynetdicom's reactor polls with select() from here on
            if self._closing:  # the listener stopped while this handshake was going on
                tls_socket.close()
                raise ConnectionAbortedError("the listener is shutting down")
        except (OSError, ValueError) as exc:
            reason = describe_error(exc)
            log.warning("TLS connection from %s refused: %s", address, reason)
            self.shutdown_request(request)
            if self.on_failure is not None:
                try:
                    self.on_failure(address, reason)
                except Exception:
                    log.exception("could not report the refused TLS connection from %s", address)
            return
        super().process_request_thread(tls_socket, client_address)


def start_tls_server(
    ae: AE,
    address: tuple[str, int],
    context: ssl.SSLContext,
    evt_handlers: list[EventHandlerType],
    on_failure: Callable[[str, str], None] | None = None,
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> TLSAssociationServer:
    """Like ``ae.start_server(address, block=False, ssl_context=context, ...)``, handshakes in threads."""
    server = cast(
        TLSAssociationServer, ae.make_server(address, evt_handlers=evt_handlers, server_class=TLSAssociationServer)
    )
    server.tls_context = context
    server.handshake_timeout_s = handshake_timeout_s
    server.on_failure = on_failure
    thread = threading.Thread(target=server.serve_forever, name="TLSAcceptorServer", daemon=True)
    thread.start()
    # As start_server does: the AE's list of its servers, which server.shutdown() and
    # ae.shutdown() expect this server in.
    ae._servers.append(server)
    return server


def probe(host: str, port: int, context: ssl.SSLContext, timeout_s: float) -> str | None:
    """Why a TLS connection to ``host:port`` fails, or None when the handshake and peer are fine.

    Used by the sender after a failed association, to put a clear reason in the audit: pynetdicom
    logs the TLS error but reports only that no association was made. The read after the
    handshake catches a server that refuses this node's certificate (in TLS 1.3 the server says so
    only after the client considers the handshake done); a server that waits for our A-ASSOCIATE
    is fine.
    """
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls_socket,
        ):
            tls_socket.settimeout(min(timeout_s, _PROBE_READ_S))
            try:
                data = tls_socket.recv(1)
            except TimeoutError:
                return None
            return None if data else "the destination closed the TLS connection (this node's certificate refused?)"
    except (OSError, ValueError) as exc:
        return describe_error(exc)
