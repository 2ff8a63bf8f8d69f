"""Calling-AE allow-list and called-AE check of `sct-node serve`, with DCMTK storescu as the scanner.

tests/test_scp.py checks the rejection codes on the listener in-process (pynetdicom and echoscu
as peers) and tests/integration/test_bad_input.py that one unknown title gets a failing storescu;
here the whole node runs as a subprocess and each case is checked both ways, with real C-STOREs:
what is accepted lands in the spool and the audit database under its calling AE title, what is
rejected leaves nothing there and one ``association_rejected`` audit event with the reason.
Titles that nearly match an allowed one (prefix, extension, other case) are rejected too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_node.audit import EventRow, InstanceRow
from dicom_node.peers import free_port
from dicom_node.synthetic_mr import generate_mr_series
from tests.integration.harness import NodeProcess, node_config, storescu, wait_for
from tests.reliability.conftest import scale

SLICES = scale(4, 24)
ALLOWED = ("MR_SIMULATOR", "MR_LINAC")
NEAR_MISSES = ("INTRUDER", "MR_LINAC2", "MR_LIN", "mr_linac", "MR_SIMULATOR_X")


def _start(workdir: Path, **node: object) -> NodeProcess:
    config = node_config(
        workdir,
        pacs_port=free_port(),
        node={"allowed_calling_aets": list(ALLOWED), **node},
        series={"quiet_period_s": 600.0, "sweep_interval_s": 1.0},  # receive only: no sCT job during the test
        model={"method": "bulk_density"},
    )
    return NodeProcess(config)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    """Two nodes, started side by side: called AE title required (strict) and not (lenient)."""
    started = {
        "strict": _start(tmp_path_factory.mktemp("strict"), require_called_aet=True),
        "lenient": _start(tmp_path_factory.mktemp("lenient"), require_called_aet=False),
    }
    try:
        with ThreadPoolExecutor(2) as pool:  # start both at once; echo as an allowed title
            list(pool.map(lambda node: node.start(echo_args=("-aet", ALLOWED[0])), started.values()))
        yield started
    finally:
        for node in started.values():
            node.stop()


@pytest.fixture
def series(tmp_path: Path) -> Path:
    """A fresh series (new UIDs) for each test."""
    generate_mr_series(tmp_path / "mr", slices=SLICES, rows=48, columns=48)
    return tmp_path / "mr"


def _instances(node: NodeProcess, calling_aet: str | None = None) -> int:
    query = select(func.count()).select_from(InstanceRow)
    if calling_aet is not None:
        query = query.where(InstanceRow.calling_aet == calling_aet)
    with node.db().session() as session:
        return int(session.scalar(query) or 0)


def _spooled(node: NodeProcess) -> int:
    return len(list((node.config_path.parent / "node" / "spool").glob("*/*.dcm")))


def _rejections(node: NodeProcess) -> list[EventRow]:
    with node.db().session() as session:
        query = select(EventRow).where(EventRow.kind == "association_rejected").order_by(EventRow.id)
        return list(session.scalars(query))


def _expect_rejected(node: NodeProcess, series: Path, calling_aet: str, called_aet: str, dcmtk_reason: str) -> EventRow:
    """storescu is rejected at association; nothing stored; exactly one new audit event, returned."""
    instances, spooled, events = _instances(node), _spooled(node), len(_rejections(node))
    sent = storescu(node.port, series, calling_aet=calling_aet, called_aet=called_aet)
    assert sent.returncode != 0, sent.stdout + sent.stderr
    assert "Association Rejected" in sent.stderr and dcmtk_reason in sent.stderr, sent.stderr
    wait_for(lambda: len(_rejections(node)) > events, 10, f"the rejection of {calling_aet} -> {called_aet} audited")
    time.sleep(0.3)  # a late instance row or a second event would be there now
    new = _rejections(node)[events:]
    assert len(new) == 1, [e.message for e in new]
    assert (new[0].detail["calling_aet"], new[0].detail["called_aet"]) == (calling_aet, called_aet)
    assert new[0].detail["address"].startswith("127.0.0.1:")
    assert _instances(node) == instances
    assert _spooled(node) == spooled
    assert node.alive()
    return new[0]


def _expect_stored(node: NodeProcess, series: Path, calling_aet: str, called_aet: str) -> None:
    before = _instances(node, calling_aet)
    events = len(_rejections(node))
    sent = storescu(node.port, series, calling_aet=calling_aet, called_aet=called_aet)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(
        lambda: _instances(node, calling_aet) == before + SLICES, 10, f"{SLICES} instances from {calling_aet} audited"
    )
    assert len(_rejections(node)) == events


def test_only_allow_listed_calling_ae_titles_can_store(nodes, series, report):
    node = nodes["strict"]
    for calling_aet in NEAR_MISSES:
        event = _expect_rejected(node, series, calling_aet, "SCTNODE", "Calling AE Title Not Recognized")
        assert event.detail["reason"] == "calling AE title not allowed"
    _expect_stored(node, series, "MR_LINAC", "SCTNODE")
    report(
        did=f"storescu of a {SLICES}-slice series to a node allowing {', '.join(ALLOWED)}, calling as "
        f"{', '.join(NEAR_MISSES)} and then as MR_LINAC",
        result="every near-miss title rejected at association (nothing stored, one audit event each with "
        "the reason); MR_LINAC stored every instance",
        rejected=len(NEAR_MISSES),
        stored=SLICES,
    )


def test_a_wrong_called_ae_title_is_rejected_when_required(nodes, series, report):
    node = nodes["strict"]
    for called_aet in ("OTHERNODE", "SCTNODE2", "sctnode"):
        event = _expect_rejected(node, series, "MR_SIMULATOR", called_aet, "Called AE Title Not Recognized")
        assert event.detail["reason"] == "called AE title is not this node's"
    _expect_stored(node, series, "MR_SIMULATOR", "SCTNODE")
    report(
        did="storescu from an allowed scanner to a node with require_called_aet = true, addressed as "
        "OTHERNODE, SCTNODE2 and sctnode, then as SCTNODE",
        result="the three wrong called AE titles rejected, nothing stored, audited; SCTNODE stored the series",
        rejected=3,
        stored=SLICES,
    )


def test_a_wrong_called_ae_title_is_accepted_when_not_required(nodes, series, report):
    node = nodes["lenient"]
    _expect_stored(node, series, "MR_SIMULATOR", "OTHERNODE")
    # Not checking the called title does not open the calling-AE allow-list.
    event = _expect_rejected(node, series, "INTRUDER", "OTHERNODE", "Calling AE Title Not Recognized")
    assert event.detail["reason"] == "calling AE title not allowed"
    report(
        did="storescu to a node with require_called_aet = false, addressed as OTHERNODE, from an allowed "
        "scanner and from INTRUDER",
        result="the allowed scanner's series stored; INTRUDER still rejected by the calling-AE allow-list",
        stored=SLICES,
        rejected=1,
    )
