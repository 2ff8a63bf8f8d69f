"""What a route's ``qa_policy`` does with a job's overall QA verdict.

========  ==============  ==============  ===============================
policy    pass            warn            fail
========  ==============  ==============  ===============================
send      sent            sent            sent (the report says the fail)
hold      sent            held            held
block     sent            held            rejected, never sent
========  ==============  ==============  ===============================

A held job waits in the HELD state until a person releases it (it is then sent, once) or rejects it
(REJECTED, never sent): ``sct-node review``.
"""

from __future__ import annotations

from dicom_node.config import QA_POLICIES
from dicom_node.qa.results import FAIL, PASS, VERDICTS

SEND, HOLD, REJECT = "send", "hold", "reject"

DECISION_TEXT = {
    SEND: "sent to the destinations",
    HOLD: "held for a physicist's review: not sent until released",
    REJECT: "rejected by the route's block policy: never sent",
}


def decide(policy: str, verdict: str) -> str:
    """SEND, HOLD or REJECT for a job of a route with ``policy`` whose worst verdict is ``verdict``."""
    if policy not in QA_POLICIES:
        raise ValueError(f"unknown QA policy {policy!r}; known: {', '.join(QA_POLICIES)}")
    if verdict not in VERDICTS:
        raise ValueError(f"unknown QA verdict {verdict!r}")
    if policy == "send" or verdict == PASS:
        return SEND
    if policy == "block" and verdict == FAIL:
        return REJECT
    return HOLD
