"""The sender against a pynetdicom storage SCP that records which association carried each instance."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node import scu
from dicom_node.config import Destination
from dicom_node.peers import free_port
from dicom_node.synthetic_mr import generate_mr_series


class RecordingSCP:
    """Stores nothing; records (association id, SOP Instance UID) of each C-STORE, refuses listed UIDs."""

    def __init__(self, refuse: frozenset[str] = frozenset(), syntaxes: list[str] | None = None) -> None:
        self.port = free_port()
        self.refuse = refuse
        self.syntaxes = syntaxes
        self.received: list[tuple[int, str]] = []
        self.encoded: dict[str, tuple[str, bytes]] = {}  # SOP Instance UID -> (transfer syntax, dataset bytes)
        self._lock = threading.Lock()
        self._server = None

    def _on_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.received.append((id(event.assoc), uid))
            self.encoded[uid] = (str(event.context.transfer_syntax), bytes(event.encoded_dataset(include_meta=False)))
        return 0xA700 if uid in self.refuse else 0x0000

    def __enter__(self) -> RecordingSCP:
        ae = AE(ae_title="PLANNING")
        if self.syntaxes is None:
            ae.supported_contexts = AllStoragePresentationContexts
        else:
            for context in AllStoragePresentationContexts:
                ae.add_supported_context(context.abstract_syntax, self.syntaxes)
        ae.maximum_associations = 16
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return sorted(generate_mr_series(tmp_path_factory.mktemp("mr"), slices=10, rows=16, columns=16))


def _send(files, port: int, associations: int) -> scu.SendResult:
    destination = Destination("pacs", "PLANNING", "127.0.0.1", port, associations=associations)
    return scu.send_series(files, destination, calling_aet="SCTNODE", timeout_s=10)


def test_one_association_carries_every_instance_once(files):
    with RecordingSCP() as pacs:
        result = _send(files, pacs.port, 1)
    assert result.ok and result.sent == len(files) and result.failed == 0, result.message
    assert len({assoc for assoc, _ in pacs.received}) == 1
    assert sorted(uid for _, uid in pacs.received) == sorted(s.sop_instance_uid for s in result.statuses)
    assert "over" not in result.message


def test_parallel_associations_share_the_instances_and_each_is_sent_once(files):
    with RecordingSCP() as pacs:
        result = _send(files, pacs.port, 3)
    assert result.ok and result.sent == len(files), result.message
    per_association = Counter(assoc for assoc, _ in pacs.received)
    assert sorted(per_association.values()) == [3, 3, 4]
    uids = [uid for _, uid in pacs.received]
    assert len(uids) == len(set(uids)) == len(files)
    assert "over 3 associations" in result.message


def test_more_associations_than_instances_opens_one_per_instance(files):
    with RecordingSCP() as pacs:
        result = _send(files[:2], pacs.port, 8)
    assert result.ok and len({assoc for assoc, _ in pacs.received}) == 2


def test_refused_instances_fail_the_send_with_their_status_on_any_association(files):
    refused = {str(__import__("pydicom").dcmread(files[4]).SOPInstanceUID)}
    with RecordingSCP(frozenset(refused)) as pacs:
        result = _send(files, pacs.port, 2)
    assert not result.ok and result.sent == len(files) - 1 and result.failed == 1
    assert "1 of 10 instance(s) not stored over 2 associations (first: status 0xA700)" in result.message
    assert [s.sop_instance_uid for s in result.statuses if s.status == 0xA700] == sorted(refused)


def test_an_unreachable_destination_fails_every_instance(files):
    result = _send(files, free_port(), 2)
    assert not result.ok and result.sent == 0 and result.failed == len(files)
    assert "association" in result.message or "cannot connect" in result.message


def test_files_are_sent_byte_for_byte_and_converted_only_for_a_peer_that_needs_it(files):
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom.dsutils import split_dataset

    def dataset_bytes(path):
        _meta, offset = split_dataset(path)
        return path.read_bytes()[offset:]

    with RecordingSCP() as pacs:
        result = _send(files, pacs.port, 1)
    assert result.ok
    for path, status in zip(files, result.statuses, strict=True):
        syntax, data = pacs.encoded[status.sop_instance_uid]
        assert syntax == ExplicitVRLittleEndian and data == dataset_bytes(path)  # the file as written

    with RecordingSCP(syntaxes=[ImplicitVRLittleEndian]) as implicit_only:
        result = _send(files, implicit_only.port, 1)
    assert result.ok and result.sent == len(files), result.message
    assert {syntax for syntax, _ in implicit_only.encoded.values()} == {ImplicitVRLittleEndian}


def test_raw_file_sends_are_switched_on_only_while_the_sender_runs(files):
    from pynetdicom import _config

    assert _config.STORE_SEND_CHUNKED_DATASET is False  # other pynetdicom users in the process are not affected
    seen: list[bool] = []

    class Probe(RecordingSCP):
        def _on_store(self, event) -> int:
            seen.append(_config.STORE_SEND_CHUNKED_DATASET)
            return super()._on_store(event)

    with Probe() as pacs:
        assert _send(files, pacs.port, 2).ok
    assert seen and all(seen)
    assert _config.STORE_SEND_CHUNKED_DATASET is False
