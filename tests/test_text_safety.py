"""Peers' text on terminals and in logs: no forged log records, no terminal escape codes."""

from __future__ import annotations

import logging
import re
import socket
import struct
import sys
from pathlib import Path

import pytest

from dicom_node.audit import AuditDB, JobRow, SeriesRow
from dicom_node.audit import report as audit_report
from dicom_node.config import load_config, with_overrides
from dicom_node.scp import printable_ae_title
from dicom_node.text_safety import SafeLogFormatter, escape_controls
from tests.integration.harness import NodeProcess, node_config, wait_for
from tests.test_jobs import _job

HOSTILE = "EV\nIL\x1b[2J\r2026-01-01 00:00:00,000 INFO    fake: record\x9b31m"
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +[\w.]+: ")


def test_escape_controls() -> None:
    assert escape_controls("plain text, tab\tand\nnewline") == "plain text, tab\tand\nnewline"
    assert escape_controls("a\x1b[31mb\rc\x00d\x9b") == "a\\x1b[31mb\\rc\\x00d\\x9b"
    assert escape_controls("one\ntwo", keep_newlines=False) == "one\\ntwo"
    assert escape_controls("Müller^Zoë") == "Müller^Zoë"  # letters are not controls
    assert printable_ae_title(" SCANNER  ") == "SCANNER"
    assert printable_ae_title("EV\\IL\x1b") == "EV\\\\IL\\x1b"


def test_log_formatter_indents_continuations_and_escapes_controls() -> None:
    formatter = SafeLogFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        raise ValueError(f"Invalid 'Calling AE Title' value {HOSTILE!s}")
    except ValueError:
        record = logging.LogRecord("pynetdicom.dul", logging.ERROR, __file__, 1, "bad %s", (HOSTILE,), sys.exc_info())
    lines = formatter.format(record).split("\n")
    assert RECORD_START.match(lines[0]), lines[0]
    assert all(line.startswith("    ") for line in lines[1:]), lines  # a traceback and the message's own newline
    assert not any(RECORD_START.match(line) for line in lines[1:])
    assert not any(c in line for line in lines for c in "\x1b\r\x9b")


def test_audit_reports_show_one_line_per_fact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = AuditDB(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    try:
        job_id = _job(db, "1.2.3.99")
        with db.session() as session:
            job = session.get(JobRow, job_id)
            assert job is not None
            series = session.get(SeriesRow, job.series_id)
            assert series is not None
            series.patient_name, series.series_description, job.error = HOSTILE, HOSTILE, HOSTILE
        text = audit_report.describe_job(db, job_id)
        assert text is not None
        assert not any(c in text for c in "\x1b\r\x9b")
        assert not any(line.startswith(("IL", "2026")) for line in text.split("\n")), text
        assert "EV\\nIL\\x1b[2J" in text
        config = with_overrides(load_config(), audit={"url": db.url})
        assert audit_report.print_series(config) == 0
        shown = capsys.readouterr().out
        assert not any(c in shown for c in "\x1b\r\x9b") and len(shown.strip().split("\n")) == 3, shown
    finally:
        db.dispose()


def _associate_rq(calling_aet: bytes) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) for Verification from ``calling_aet`` (16 bytes, as sent)."""

    def item(item_type: int, body: bytes) -> bytes:
        return struct.pack(">BBH", item_type, 0, len(body)) + body

    context = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">L", 16384)) + item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + b"SCTNODE".ljust(16) + calling_aet[:16].ljust(16) + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1") + context + user
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


@pytest.mark.integration
def test_node_log_of_a_hostile_ae_title(tmp_path: Path) -> None:
    """pynetdicom refuses an AE title with control characters and logs it as received: in the node's
    log (``sct-node serve``) no line may start a forged record or carry an escape code."""
    node = NodeProcess(node_config(tmp_path, pacs_port=1)).start()
    try:
        with socket.create_connection(("127.0.0.1", node.port)) as sock:
            sock.sendall(_associate_rq(b"A\n2026-01-01 0\x1b[2J"))
            sock.settimeout(10)
            assert sock.recv(1) == b"\x07"  # A-ABORT: pynetdicom cannot decode it
        wait_for(lambda: "Calling AE Title" in node.log_path.read_text(errors="replace"), 10, "the refusal in the log")
    finally:
        node.stop()
    text = node.log_path.read_text(errors="replace")
    assert "\x1b" not in text and "0\\x1b[" in text  # the AE title is 16 bytes: "A\n2026-01-01 0\x1b["
    for line in text.split("\n"):
        assert not line or line.startswith("    ") or RECORD_START.match(line), line
