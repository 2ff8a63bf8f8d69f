"""The audit database, one package imported one way: ``models`` (tables and states) ← ``chain``
(the events' hash chain: append, set up, migrate) ← ``db`` (``AuditDB``: engine, sessions, added
columns) ← ``instances`` (received instances, batched) and ``verify`` (the chain checked, a
deleted head restored); ``report`` (what ``sct-node audit`` prints) uses them all, and nothing
here imports it.

The names the rest of the node uses are re-exported here: ``from dicom_node.audit import AuditDB,
JobRow, add_event``.
"""

from dicom_node.audit.chain import add_event, event_hash, row_content_hash
from dicom_node.audit.db import AuditDB
from dicom_node.audit.instances import InstanceRecorder, ReceivedInstance, record_instances
from dicom_node.audit.models import (
    CHAIN_HEAD_ID,
    GENESIS_HASH,
    Base,
    ChainHeadRow,
    EventRow,
    InstanceRow,
    JobRow,
    JobState,
    QAResultRow,
    SendInstanceRow,
    SendRow,
    SeriesRow,
    SeriesState,
    WebUserRow,
    utcnow,
)

__all__ = [
    "CHAIN_HEAD_ID",
    "GENESIS_HASH",
    "AuditDB",
    "Base",
    "ChainHeadRow",
    "EventRow",
    "InstanceRecorder",
    "InstanceRow",
    "JobRow",
    "JobState",
    "QAResultRow",
    "ReceivedInstance",
    "SendInstanceRow",
    "SendRow",
    "SeriesRow",
    "SeriesState",
    "WebUserRow",
    "add_event",
    "event_hash",
    "record_instances",
    "row_content_hash",
    "utcnow",
]
