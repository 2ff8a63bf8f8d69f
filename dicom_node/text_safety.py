"""Text that came from outside (AE titles, DICOM strings such as patient names and descriptions,
peers' error messages) on a terminal or in a log file.

A control character in such text can forge a log record (a newline followed by a fake timestamp),
rewrite what a terminal shows (carriage return, ANSI escape sequences: ``sct-node audit show`` prints
patient names and series descriptions, and ISO 2022 DICOM character sets even use ESC), or hide
text. pynetdicom logs a refused AE title exactly as received. So the node's log lines and the audit
reports escape every C0 and C1 control character (``\\x1b``, ``\\r``...), and a record's
continuation lines (tracebacks, multi-line messages) are indented, so that every line that starts
at the left margin is the start of a real record.
"""

from __future__ import annotations

import logging
import re

_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls, except tab and newline
_CONTROLS_AND_NEWLINE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def escape_controls(text: str, *, keep_newlines: bool = True) -> str:
    """``text`` with control characters written as Python escapes (``\\x1b``, ``\\r``, ``\\n``)."""
    pattern = _CONTROLS if keep_newlines else _CONTROLS_AND_NEWLINE
    return pattern.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


class SafeLogFormatter(logging.Formatter):
    """A logging.Formatter whose output has no control characters but newlines, and whose
    continuation lines are indented by four spaces."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record)).replace("\n", "\n    ")
