"""Malformed PDUs over raw TCP to `sct-node serve`: the node answers or closes, never hangs, never falls over.

Each input is one TCP connection (PS3.8 PDUs built by hand, big endian), drawn by hypothesis:

* before any association: random bytes; a PDU type that does not exist; an A-ASSOCIATE-RQ cut
  short then the connection closed, or sent a few bytes at a time; an item length inside it
  changed (0, one off, past the end, 0xFFFF); the PDU length too short, too long or 0; a field
  changed (protocol version, AE titles of NULs / 0xFF / a backslash, application context,
  presentation context IDs even / 0 / repeated, 0 or 200 presentation contexts, empty or 200-byte
  abstract syntaxes, no transfer syntax, user information missing or with garbage sub-items, a
  maximum PDU length of 0, 1 or 4 GiB); random bytes flipped in it; P-DATA-TF, A-RELEASE-RQ/RP,
  A-ABORT, A-ASSOCIATE-AC or -RJ as the first PDU; a PDU length of 4 GiB (or just over the
  node's limit); a connection that sends nothing;
* inside an association the node accepted: random bytes; P-DATA-TF with PDV lengths of 0 / past
  the PDU, an unknown presentation context, a message control header the standard does not have,
  a data set fragment before any command; a C-ECHO command set damaged (bytes flipped, cut, the
  command field or the group length changed); a C-STORE announced with no data set ever coming;
  a second A-ASSOCIATE-RQ, an A-ASSOCIATE-AC, an unknown PDU; half a PDU then closing; a peer
  that asked for a tiny maximum PDU length (1 to 14 bytes) and then sends a C-ECHO.

For every input that is exactly one PDU, or starts with a PDU header of an unknown type or
declaring more than the node reads, the node must answer (A-ASSOCIATE-AC/RJ, A-ABORT, P-DATA,
A-RELEASE-RP) or close within ANSWER_S; inside an association, where a DIMSE message may still
wait for the data set its command announced, an A-RELEASE-RQ sent after the bad PDU must get its
answer or the connection closed. Otherwise the node may wait for more bytes: the client closes
after a moment (the stalled peers below cover that wait).

Beside the fuzzing: DCMTK echoscu and storescu send good series on their own associations the
whole time; stalled peers are held open from the start (one that sends nothing, half a PDU
header, half an A-ASSOCIATE-RQ, half a P-DATA-TF inside an association, one byte a second); the
node must drop each of them within its PDU read limit or ARTIM timer (30 s) plus a margin while
serving everyone else. At the end: the node is alive, has not leaked sockets, a last good series
becomes an sCT at the destination, and every good series sent meanwhile did too.

Reproducible: every listed variant (EXPLICIT_RECIPES) first, then INPUTS drawn by hypothesis,
derandomized in CI; under `make reliability` a random seed (SCT_FUZZ_SEED to set it), printed.
A failing input is printed as its recipe and the bytes sent.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import note
from hypothesis import strategies as st
from pynetdicom import AE

from dicom_node.scp import MAX_PDU_BYTES, PDU_READ_TIMEOUT_S
from tests.reliability.conftest import LONG, scale
from tests.reliability.fuzz_support import (
    FUZZ_SEED,
    GoodTraffic,
    Recipe,
    check_good_series_done,
    fuzz_inputs,
    leftover_temp_files,
    node_under_test,
    recipe,
    run_fuzzer,
    wait_until_settled,
)

INPUTS = fuzz_inputs(600, 6000)
ANSWER_S = 10.0  # a complete PDU gets its answer (or the connection closed) within this
DWELL_S = 0.2  # how long a client that sent an incomplete PDU stays before closing
DIMSE_ANSWER_S = 2.0  # inside an association: the wait for a DIMSE answer before releasing anyway
# A stalled peer is dropped PDU_READ_TIMEOUT_S after the first byte of the PDU it does not finish
# (the trickling one: after its 6-byte header, sent at one byte a second, plus PDU_READ_TIMEOUT_S).
STALL_LIMIT_S = PDU_READ_TIMEOUT_S + 15.0
# The stalled peers hold 5 associations until dropped; the fuzzer, the good senders and associations
# still finishing after their release need the rest (pynetdicom counts them until their thread ends).
MAX_ASSOCIATIONS = 16

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
MR_STORAGE = b"1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = b"1.2.840.10008.1.2.1"
IMPLICIT = b"1.2.840.10008.1.2"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.9.3811.3.0.4"
PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}


# PDUs (PS3.8 9.3) -----------------------------------------------------------------------------------------


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def ae_title(value: bytes) -> bytes:
    return (value + b" " * 16)[:16]


def presentation_context(context_id: int, abstract: bytes, syntaxes: list[bytes]) -> bytes:
    return item(0x20, bytes([context_id, 0, 0, 0]) + item(0x30, abstract) + b"".join(item(0x40, s) for s in syntaxes))


def user_information(max_length: int = 16384, extra: bytes = b"") -> bytes:
    return item(0x50, item(0x51, struct.pack(">L", max_length)) + item(0x52, IMPLEMENTATION_UID) + extra)


GOOD_CONTEXTS = (
    presentation_context(1, VERIFICATION, [EXPLICIT, IMPLICIT]),
    presentation_context(3, MR_STORAGE, [EXPLICIT]),
)


def associate_rq_items(
    *,
    version: int = 1,
    called: bytes = b"SCTNODE",
    calling: bytes = b"FUZZER",
    application_context: bytes = APPLICATION_CONTEXT,
    contexts: tuple[bytes, ...] = GOOD_CONTEXTS,
    user: bytes | None = None,
) -> tuple[bytes, list[bytes]]:
    """The fixed part and the variable items of an A-ASSOCIATE-RQ."""
    fixed = struct.pack(">HH", version, 0) + ae_title(called) + ae_title(calling) + b"\x00" * 32
    items = [item(0x10, application_context), *contexts, user_information() if user is None else user]
    return fixed, items


def associate_rq(**fields: Any) -> bytes:
    fixed, items = associate_rq_items(**fields)
    return pdu(0x01, fixed + b"".join(items))


GOOD_RQ = associate_rq()


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """P-DATA-TF of (context ID, message control header, fragment) PDVs."""
    return pdu(0x04, b"".join(struct.pack(">LBB", len(data) + 2, cid, control) + data for cid, control, data in pdvs))


def implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(implicit(tag, value) for tag, value in elements)
    return implicit(0x00000000, struct.pack("<L", len(body))) + body


def c_echo_rq(message_id: int = 1) -> bytes:
    return command_set(
        [
            (0x00000002, VERIFICATION + b"\x00"),
            (0x00000100, struct.pack("<H", 0x0030)),
            (0x00000110, struct.pack("<H", message_id)),
            (0x00000800, struct.pack("<H", 0x0101)),
        ]
    )


def c_store_rq(message_id: int = 1) -> bytes:
    return command_set(
        [
            (0x00000002, MR_STORAGE),
            (0x00000100, struct.pack("<H", 0x0001)),
            (0x00000110, struct.pack("<H", message_id)),
            (0x00000700, struct.pack("<H", 0)),
            (0x00000800, struct.pack("<H", 0x0000)),
            (0x00001000, b"1.2.826.0.1.3680043.8.498.1.2.3.4\x00"),
        ]
    )


RELEASE_RQ = pdu(0x05, b"\x00" * 4)


def pdu_complete(data: bytes) -> bool:
    """Whether the node must act on ``data`` at once: it starts with a PDU header of an unknown type or
    declaring more than the node reads, or it is exactly one PDU. Otherwise the node may wait for
    more bytes (pynetdicom reads the next PDU before it acts on the one before), up to its PDU read
    limit: the stalled peers of the test check that this wait ends."""
    if len(data) < 6:
        return False
    pdu_type, _, length = struct.unpack_from(">BBL", data)
    return pdu_type not in PDU_NAMES or length > MAX_PDU_BYTES or 6 + length == len(data)


# Recipes --------------------------------------------------------------------------------------------------


ANY = st.integers(0, 10**6)
WEIRD_AE = st.one_of(
    st.sampled_from([b"", b" " * 16, b"\x00" * 16, b"\xff" * 16, b"sctnode", b"SCTNODE\\X", b"\x1b$B"]),
    st.binary(min_size=16, max_size=16),
)
WEIRD_UID = st.one_of(
    st.sampled_from([b"", b"1.2.3", b"\x00", b"1" * 200, APPLICATION_CONTEXT * 4, b"\xff\xfe"]),
    st.binary(max_size=70),
)
FIELD_MUTATIONS = st.one_of(
    st.tuples(st.just("version"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("called"), WEIRD_AE),
    st.tuples(st.just("calling"), WEIRD_AE),
    st.tuples(st.just("application_context"), WEIRD_UID),
    st.tuples(st.just("context_id"), st.sampled_from([0, 2, 254, 255])),
    st.tuples(st.just("duplicate_context_ids"), st.just(True)),
    st.tuples(st.just("context_count"), st.sampled_from([0, 127, 128, 129, 200])),
    st.tuples(st.just("abstract_syntax"), WEIRD_UID),
    st.tuples(st.just("transfer_syntaxes"), st.lists(WEIRD_UID, max_size=3)),
    st.tuples(st.just("no_user_information"), st.just(True)),
    st.tuples(st.just("max_length"), st.sampled_from([0, 1, 2, 6, 7, 0xFFFFFFFF])),
    st.tuples(st.just("user_sub_item"), st.tuples(st.integers(0x51, 0x5F), st.binary(max_size=64))),
    st.tuples(st.just("unknown_item"), st.tuples(st.integers(0, 0xFF), st.binary(max_size=64))),
)
OTHER_PDUS = {
    "P-DATA-TF": p_data((1, 0x03, c_echo_rq())),
    "A-RELEASE-RQ": RELEASE_RQ,
    "A-RELEASE-RP": pdu(0x06, b"\x00" * 4),
    "A-ABORT": pdu(0x07, b"\x00\x00\x00\x00"),
    "A-ASSOCIATE-AC": pdu(0x02, GOOD_RQ[6:]),
    "A-ASSOCIATE-RJ": pdu(0x03, b"\x00\x01\x01\x01"),
}

PRE_ASSOCIATION = (
    recipe("garbage", data=st.binary(max_size=2048)),
    recipe(
        "unknown_pdu_type",
        pdu_type=st.sampled_from([0x00, *range(0x08, 0x100)]),
        body=st.binary(max_size=256),
        send_body=st.booleans(),
    ),
    recipe("truncated_rq", at=ANY),
    recipe("rq_in_pieces", cuts=st.lists(ANY, min_size=1, max_size=6)),
    recipe("bad_item_length", index=ANY, length=st.one_of(st.sampled_from([0, 0xFFFF]), st.integers(-3, 3))),
    recipe("bad_pdu_length", delta=st.one_of(st.sampled_from([None]), st.integers(-40, 40))),
    recipe("rq_field", mutation=FIELD_MUTATIONS),
    recipe("rq_byte_flips", flips=st.lists(st.tuples(ANY, st.integers(1, 255)), min_size=1, max_size=6)),
    recipe("other_pdu_first", name=st.sampled_from(sorted(OTHER_PDUS))),
    recipe(
        "huge_pdu_length",
        pdu_type=st.sampled_from([0x01, 0x04, 0x05]),
        length=st.sampled_from([0xFFFFFFFF, 0x80000000, MAX_PDU_BYTES + 1]),
    ),
    recipe("nothing", wait=st.booleans()),
)
IN_ASSOCIATION = (
    recipe("post_garbage", data=st.binary(min_size=1, max_size=1024)),
    recipe(
        "post_bad_pdv",
        pdv_length=st.one_of(st.sampled_from([0, 1, 2, 0xFFFFFFFF]), st.integers(-4, 4).map(lambda d: ("delta", d))),
        context_id=st.sampled_from([1, 3, 0, 2, 99, 255]),
        control=st.sampled_from([0x03, 0x00, 0x01, 0x02, 0x04, 0x07, 0x80, 0xFF]),
    ),
    recipe(
        "post_bad_command",
        flips=st.lists(st.tuples(ANY, st.integers(1, 255)), max_size=4),
        cut=st.one_of(st.none(), ANY),
        command_field=st.one_of(st.none(), st.integers(0, 0xFFFF)),
        group_length_delta=st.integers(-8, 8),
    ),
    recipe("post_dataset_first", data=st.binary(max_size=512)),
    recipe("post_store_without_dataset", then=st.sampled_from(["release", "abort", "close"])),
    recipe(
        "post_wrong_pdu",
        name=st.sampled_from(["A-ASSOCIATE-RQ", "A-ASSOCIATE-AC", "A-ASSOCIATE-RJ", "A-RELEASE-RP", "unknown"]),
    ),
    recipe("post_truncated", at=ANY),
    recipe("tiny_max_pdu", max_length=st.integers(1, 14)),
)
RECIPES = st.sampled_from(PRE_ASSOCIATION + IN_ASSOCIATION).flatmap(lambda strategy: strategy)
# Tried first in every run, whatever hypothesis draws: every listed variant of the kinds that list them.
EXPLICIT_RECIPES = (
    *(
        Recipe("rq_field", (("mutation", mutation),))
        for mutation in [
            ("version", 0),
            ("version", 2),
            ("called", b"\x00" * 16),
            ("calling", b"\xff" * 16),
            ("calling", b"SCTNODE\\X"),
            ("application_context", b""),
            ("application_context", b"1" * 200),
            *(("context_id", value) for value in (0, 2, 254, 255)),
            ("duplicate_context_ids", True),
            *(("context_count", value) for value in (0, 128, 129, 200)),
            ("abstract_syntax", b""),
            ("abstract_syntax", b"\xff\xfe"),
            ("transfer_syntaxes", []),
            ("transfer_syntaxes", [b"", b"1.2.3"]),
            ("no_user_information", True),
            *(("max_length", value) for value in (0, 1, 2, 6, 7, 0xFFFFFFFF)),
            *(("user_sub_item", (sub_type, b"\x00\x01garbage")) for sub_type in (0x53, 0x54, 0x56, 0x57, 0x58, 0x5F)),
            ("unknown_item", (0xFF, b"abc")),
        ]
    ),
    *(Recipe("other_pdu_first", (("name", name),)) for name in sorted(OTHER_PDUS)),
    *(
        Recipe("post_wrong_pdu", (("name", name),))
        for name in ("A-ASSOCIATE-RQ", "A-ASSOCIATE-AC", "A-ASSOCIATE-RJ", "A-RELEASE-RP", "unknown")
    ),
    *(Recipe("post_store_without_dataset", (("then", then),)) for then in ("release", "abort", "close")),
    *(Recipe("tiny_max_pdu", (("max_length", length),)) for length in range(1, 15)),
    *(
        Recipe("huge_pdu_length", (("pdu_type", pdu_type), ("length", 0xFFFFFFFF)))
        for pdu_type in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
    ),
)
KINDS = (
    "garbage",
    "unknown_pdu_type",
    "truncated_rq",
    "rq_in_pieces",
    "bad_item_length",
    "bad_pdu_length",
    "rq_field",
    "rq_byte_flips",
    "other_pdu_first",
    "huge_pdu_length",
    "nothing",
    "post_garbage",
    "post_bad_pdv",
    "post_bad_command",
    "post_dataset_first",
    "post_store_without_dataset",
    "post_wrong_pdu",
    "post_truncated",
    "tiny_max_pdu",
)


@dataclass
class Plan:
    """What one connection does: optionally associate, then send ``chunks`` (with pauses), then finish."""

    recipe: Recipe
    associate: bytes | None  # the A-ASSOCIATE-RQ to open with, or None
    chunks: list[bytes]
    pause_s: float = 0.0
    finish: str = "wait"  # "wait": for the answer, then release; "close": close at once
    outcome: str = ""
    answers: list[str] = field(default_factory=list)

    @property
    def sent(self) -> bytes:
        return b"".join(self.chunks)

    def describe(self) -> str:
        where = "after an association " if self.associate else ""
        return f"{self.recipe!r}: {len(self.sent)} bytes {where}{self.sent[:64].hex()}"


def plan(recipe: Recipe) -> Plan:
    kind = recipe.kind
    if kind == "garbage":
        return Plan(recipe, None, [recipe.get("data")])
    if kind == "unknown_pdu_type":
        whole = pdu(recipe.get("pdu_type"), recipe.get("body"))
        return Plan(recipe, None, [whole if recipe.get("send_body") else whole[:6]])
    if kind == "truncated_rq":
        return Plan(recipe, None, [GOOD_RQ[: 1 + recipe.get("at") % (len(GOOD_RQ) - 1)]], finish="close")
    if kind == "rq_in_pieces":
        cuts = sorted({c % len(GOOD_RQ) for c in recipe.get("cuts")} - {0})
        pieces = [GOOD_RQ[a:b] for a, b in zip([0, *cuts], [*cuts, len(GOOD_RQ)], strict=True)]
        return Plan(recipe, None, pieces, pause_s=0.05)
    if kind == "bad_item_length":
        fixed, items = associate_rq_items()
        index = recipe.get("index") % len(items)
        length = recipe.get("length")
        actual = len(items[index]) - 4
        new_length = length if length in (0, 0xFFFF) else max(0, actual + length)
        items[index] = items[index][:2] + struct.pack(">H", new_length & 0xFFFF) + items[index][4:]
        return Plan(recipe, None, [pdu(0x01, fixed + b"".join(items))])
    if kind == "bad_pdu_length":
        delta = recipe.get("delta")
        declared = 0 if delta is None else max(0, len(GOOD_RQ) - 6 + delta)
        return Plan(recipe, None, [struct.pack(">BBL", 1, 0, declared) + GOOD_RQ[6:]])
    if kind == "rq_field":
        return Plan(recipe, None, [_mutated_rq(*recipe.get("mutation"))])
    if kind == "rq_byte_flips":
        data = bytearray(GOOD_RQ)
        for at, mask in recipe.get("flips"):
            data[6 + at % (len(data) - 6)] ^= mask  # the PDU header stays: the framing is complete
        return Plan(recipe, None, [bytes(data)])
    if kind == "other_pdu_first":
        return Plan(recipe, None, [OTHER_PDUS[recipe.get("name")]])
    if kind == "huge_pdu_length":
        return Plan(
            recipe, None, [struct.pack(">BBL", recipe.get("pdu_type"), 0, recipe.get("length")) + b"\x00" * 4096]
        )
    if kind == "nothing":  # the stalled peer "sends nothing" waits for the node's ARTIM timer
        return Plan(recipe, None, [], pause_s=0.5 if recipe.get("wait") else 0.0, finish="close")
    # Inside an association
    if kind == "post_garbage":
        return Plan(recipe, GOOD_RQ, [recipe.get("data")])
    if kind == "post_bad_pdv":
        command = c_echo_rq()
        length = recipe.get("pdv_length")
        length = len(command) + 2 + length[1] if isinstance(length, tuple) else length
        body = struct.pack(">LBB", length & 0xFFFFFFFF, recipe.get("context_id"), recipe.get("control")) + command
        return Plan(recipe, GOOD_RQ, [pdu(0x04, body)])
    if kind == "post_bad_command":
        command = bytearray(c_echo_rq())
        if recipe.get("command_field") is not None:
            field_at = command.index(struct.pack("<HH", 0, 0x0100)) + 8
            struct.pack_into("<H", command, field_at, recipe.get("command_field"))
        struct.pack_into("<L", command, 8, max(0, len(command) - 12 + recipe.get("group_length_delta")))
        for at, mask in recipe.get("flips"):
            command[at % len(command)] ^= mask
        cut = recipe.get("cut")
        data = bytes(command) if cut is None else bytes(command[: cut % len(command)])
        return Plan(recipe, GOOD_RQ, [p_data((1, 0x03, data))])
    if kind == "post_dataset_first":
        return Plan(recipe, GOOD_RQ, [p_data((3, 0x02, recipe.get("data")))])
    if kind == "post_store_without_dataset":
        then = recipe.get("then")
        chunks = [p_data((3, 0x03, c_store_rq()))]
        if then == "release":
            chunks.append(RELEASE_RQ)
        elif then == "abort":
            chunks.append(OTHER_PDUS["A-ABORT"])
        return Plan(recipe, GOOD_RQ, chunks, pause_s=0.05, finish="close" if then == "close" else "wait")
    if kind == "post_wrong_pdu":
        name = recipe.get("name")
        data = {"A-ASSOCIATE-RQ": GOOD_RQ, "unknown": pdu(0x09, b"abcd")}.get(name) or OTHER_PDUS[name]
        return Plan(recipe, GOOD_RQ, [data])
    if kind == "post_truncated":
        whole = p_data((1, 0x03, c_echo_rq()))
        return Plan(recipe, GOOD_RQ, [whole[: 1 + recipe.get("at") % (len(whole) - 1)]], finish="close")
    if kind == "tiny_max_pdu":
        rq = associate_rq(user=user_information(max_length=recipe.get("max_length")))
        return Plan(recipe, rq, [p_data((1, 0x03, c_echo_rq()))])
    raise AssertionError(kind)


def _mutated_rq(name: str, value: Any) -> bytes:
    if name in ("version", "called", "calling", "application_context"):
        return associate_rq(**{name: value})
    if name == "context_id":
        return associate_rq(contexts=(presentation_context(value, VERIFICATION, [EXPLICIT]),))
    if name == "duplicate_context_ids":
        return associate_rq(contexts=(presentation_context(1, VERIFICATION, [EXPLICIT]),) * 2)
    if name == "context_count":
        return associate_rq(
            contexts=tuple(presentation_context((2 * i + 1) & 0xFF, VERIFICATION, [EXPLICIT]) for i in range(value))
        )
    if name == "abstract_syntax":
        return associate_rq(contexts=(presentation_context(1, value, [EXPLICIT]),))
    if name == "transfer_syntaxes":
        return associate_rq(contexts=(presentation_context(1, VERIFICATION, value),))
    if name == "no_user_information":
        fixed, items = associate_rq_items()
        return pdu(0x01, fixed + b"".join(items[:-1]))
    if name == "max_length":
        return associate_rq(user=user_information(max_length=value))
    if name == "user_sub_item":
        sub_type, body = value
        return associate_rq(user=user_information(extra=item(sub_type, body)))
    if name == "unknown_item":
        item_type, body = value
        fixed, items = associate_rq_items()
        return pdu(0x01, fixed + b"".join(items) + item(item_type, body))
    raise AssertionError(name)


# The client ---------------------------------------------------------------------------------------------


class PduReader:
    """Reads whole PDUs from a socket; ``next(timeout)`` is a PDU name, "closed" or "silent"."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def next(self, timeout_s: float) -> tuple[str, bytes]:
        deadline = time.monotonic() + timeout_s
        while True:
            if len(self.buffer) >= 6:
                pdu_type, _, length = struct.unpack_from(">BBL", self.buffer)
                if len(self.buffer) >= 6 + length:
                    body = bytes(self.buffer[6 : 6 + length])
                    del self.buffer[: 6 + length]
                    return PDU_NAMES.get(pdu_type, f"PDU type 0x{pdu_type:02X}"), body
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "silent", b""
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return "silent", b""
            except OSError:  # reset by the node
                return "closed", b""
            if not chunk:
                return "closed", b""
            self.buffer += chunk


def run_plan(port: int, case: Plan) -> str:
    """Play ``case`` on a new connection; the outcome, or raises AssertionError for a hang."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = PduReader(sock)
        if case.associate is not None:
            sock.sendall(case.associate)
            answer, _ = reader.next(ANSWER_S)
            case.answers.append(answer)
            assert answer in ("A-ASSOCIATE-AC", "A-ASSOCIATE-RJ", "A-ABORT", "closed"), (
                f"to the A-ASSOCIATE-RQ: {answer}"
            )
            if answer != "A-ASSOCIATE-AC":
                return f"association {answer}"
        try:
            for index, chunk in enumerate(case.chunks):
                if index and case.pause_s:
                    time.sleep(case.pause_s)
                sock.sendall(chunk)
        except OSError:
            return "closed while sending"
        if case.finish == "close":
            time.sleep(case.pause_s or DWELL_S / 4)
            return "client closed"
        sent = case.sent
        if not pdu_complete(sent):
            answer, _ = reader.next(DWELL_S)  # the node waits for the rest of the PDU: so does no client for long
            case.answers.append(answer)
            return "client closed (incomplete PDU)" if answer == "silent" else answer
        # A complete PDU: an answer, or the connection closed. Inside an association a DIMSE message
        # may wait for a data set its command announced: then the A-RELEASE-RQ below must be answered.
        answer, _ = reader.next(ANSWER_S if case.associate is None else DIMSE_ANSWER_S)
        case.answers.append(answer)
        assert case.associate is not None or answer != "silent", f"no answer and still open after {ANSWER_S:.0f} s"
        if case.associate is None or answer in ("closed", "A-ABORT", "A-RELEASE-RP"):
            return answer
        # Still associated: the node must still answer an A-RELEASE-RQ (after any P-DATA it sends first).
        first = answer
        try:
            sock.sendall(RELEASE_RQ)
        except OSError:
            return f"{first}, then closed"
        for _ in range(200):  # a tiny maximum PDU length makes a C-ECHO response many P-DATA-TFs
            answer, _ = reader.next(ANSWER_S)
            case.answers.append(answer)
            if answer != "P-DATA-TF":
                break
        assert answer in ("A-RELEASE-RP", "A-ABORT", "closed"), f"to the A-RELEASE-RQ after {first}: {answer}"
        return f"{first}, then {answer}"


# Stalled peers ------------------------------------------------------------------------------------------


@dataclass
class StalledPeer:
    name: str
    sock: socket.socket
    opened_at: float
    closed_after_s: float | None = None
    trickle: threading.Thread | None = None
    watcher: threading.Thread | None = None

    def watch(self) -> None:
        """Note when the node closes the connection (reading whatever it sends before), in a thread."""

        def run() -> None:
            self.sock.settimeout(None)
            try:
                while self.sock.recv(65536):
                    pass
            except OSError:
                pass
            self.closed_after_s = time.monotonic() - self.opened_at

        self.watcher = threading.Thread(target=run, name=f"stalled: {self.name}", daemon=True)
        self.watcher.start()


def open_stalled_peers(port: int) -> list[StalledPeer]:
    peers = []

    def connect(name: str, first: bytes) -> StalledPeer:
        sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_S)
        sock.sendall(first)
        peer = StalledPeer(name, sock, time.monotonic())
        peers.append(peer)
        return peer

    connect("sends nothing", b"")
    connect("half a PDU header", GOOD_RQ[:3])
    connect("half an A-ASSOCIATE-RQ", GOOD_RQ[: len(GOOD_RQ) // 2])
    associated = connect("half a P-DATA-TF inside an association", GOOD_RQ)
    answer, _ = PduReader(associated.sock).next(ANSWER_S)
    assert answer == "A-ASSOCIATE-AC", answer
    associated.sock.sendall(p_data((1, 0x03, c_echo_rq()))[:9])
    associated.opened_at = time.monotonic()
    slow = connect("one byte a second", b"")

    def trickle() -> None:
        for byte in GOOD_RQ:
            try:
                slow.sock.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(1.0)

    slow.trickle = threading.Thread(target=trickle, daemon=True)
    slow.trickle.start()
    for peer in peers:
        peer.watch()
    return peers


def wait_for_drops(peers: list[StalledPeer], limit_s: float) -> None:
    """Wait until the node has closed every stalled peer's connection, or ``limit_s`` after each opened."""
    for peer in peers:
        assert peer.watcher is not None
        peer.watcher.join(timeout=max(0.0, peer.opened_at + limit_s - time.monotonic()))


# The test -------------------------------------------------------------------------------------------------


def node_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_malformed_pdus_get_an_answer_or_a_closed_connection(tmp_path: Path, report: Any) -> None:
    plans: list[Plan] = []
    with node_under_test(tmp_path, node={"max_associations": MAX_ASSOCIATIONS}) as under_test:
        node = under_test.node
        warm = GoodTraffic(node.port, tmp_path / "warm")
        warm.echo()
        warm.send_series(0)
        fds_before = node_fds(under_test.pid())
        stalled = open_stalled_peers(node.port)
        good = GoodTraffic(node.port, tmp_path / "good", interval_s=scale(2.0, 5.0)).start()
        echo_ae = AE("PDUFUZZ-ECHO")
        echo_ae.add_requested_context("1.2.840.10008.1.1")
        echoes: list[bool] = []

        def one_input(recipe: Recipe) -> None:
            case = plan(recipe)
            plans.append(case)
            note(case.describe())
            case.outcome = run_plan(node.port, case)
            note(f"outcome: {case.outcome}; answers {case.answers}")
            assert node.alive()
            if len(plans) % 25 == 0:  # a good pynetdicom C-ECHO now and then, on its own association
                assoc = echo_ae.associate("127.0.0.1", node.port, ae_title="SCTNODE")
                ok = assoc.is_established and assoc.send_c_echo().Status == 0x0000
                echoes.append(ok)
                if assoc.is_established:
                    assoc.release()
                assert ok, "a good C-ECHO failed among the malformed PDUs"

        started = time.monotonic()
        try:
            run_fuzzer(one_input, RECIPES, EXPLICIT_RECIPES, INPUTS)
        finally:
            fuzz_s = time.monotonic() - started
            wait_for_drops(stalled, STALL_LIMIT_S)
            for peer in stalled:
                peer.sock.close()
            good.stop()
        not_dropped = [p.name for p in stalled if p.closed_after_s is None or p.closed_after_s > STALL_LIMIT_S]
        assert not not_dropped, f"stalled peers the node did not drop within {STALL_LIMIT_S:.0f} s: {not_dropped}"
        assert not good.errors, "good senders failed during the fuzzing:\n" + "\n".join(good.errors[:10])

        good.send_series(len(good.stores))
        assert not good.errors, good.errors
        wait_until_settled(node, timeout_s=scale(120, 600), expect_series=good.series)
        delivered = check_good_series_done(under_test, good)
        assert leftover_temp_files(under_test.root) == []
        deadline = time.monotonic() + 20
        while node_fds(under_test.pid()) > fds_before + 8 and time.monotonic() < deadline:
            time.sleep(0.5)
        fds_after = node_fds(under_test.pid())
        assert fds_after <= fds_before + 8, f"the node holds {fds_after} file descriptors, {fds_before} before"
        assert node.alive()

    by_kind = collections.Counter(p.recipe.kind for p in plans)
    assert set(by_kind) == set(KINDS), f"kinds never tried: {set(KINDS) - set(by_kind)}"
    outcomes = collections.Counter(_short(p.outcome) for p in plans)
    by_kind_outcome: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (kind, outcome), n in collections.Counter((p.recipe.kind, _short(p.outcome)) for p in plans).items():
        by_kind_outcome[kind][outcome] = n
    drops = {p.name: round(p.closed_after_s or -1, 1) for p in stalled}
    print(f"\nfuzz seed {'derandomized' if not LONG else FUZZ_SEED}; {len(plans)} connections in {fuzz_s:.0f} s")
    for kind in sorted(by_kind_outcome):
        print(f"  {kind:28s} {dict(sorted(by_kind_outcome[kind].items()))}")
    print(f"  stalled peers dropped after (s): {drops}; good traffic: {good.summary()}")
    report(
        did=(
            f"sent {len(plans)} malformed PDU sequences ({len(by_kind)} kinds: {', '.join(sorted(by_kind))}), "
            f"each on its own TCP connection, to `sct-node serve`, with {len(stalled)} stalled peers held open "
            f"and DCMTK sending {len(good.stores)} good series and {len(good.echoes)} C-ECHOs meanwhile"
        ),
        result=(
            f"every complete PDU answered or its connection closed within {ANSWER_S:.0f} s ({dict(outcomes)}); "
            f"no crash, no hang, no leaked socket ({fds_before} -> {fds_after} descriptors); stalled peers "
            f"dropped after {drops} s; all good series made an sCT at the destination"
        ),
        inputs=len(plans),
        by_kind=dict(by_kind),
        by_outcome=dict(outcomes),
        by_kind_and_outcome={k: dict(v) for k, v in by_kind_outcome.items()},
        stalled_peers_dropped_after_s=drops,
        good_pynetdicom_echoes=len(echoes),
        sct_instances_delivered=delivered,
        fuzz_seconds=round(fuzz_s, 1),
        seed="derandomized" if not LONG else FUZZ_SEED,
        **good.summary(),
    )


def _short(outcome: str) -> str:
    return outcome if len(outcome) < 60 else outcome[:57] + "..."


def test_the_pdu_builders_make_what_pynetdicom_accepts(tmp_path: Path) -> None:
    """The fuzzer itself: its good A-ASSOCIATE-RQ and C-ECHO are accepted and answered by a pynetdicom SCP,
    and every kind of input is planned as something that differs from the good exchange."""
    ae = AE("CHECK")
    ae.add_supported_context("1.2.840.10008.1.1", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        port = server.server_address[1]
        case = Plan(Recipe("check", ()), GOOD_RQ, [p_data((1, 0x03, c_echo_rq()))])
        assert run_plan(port, case) == "P-DATA-TF, then A-RELEASE-RP", case.answers
        assert run_plan(port, Plan(Recipe("check", ()), None, [GOOD_RQ])) == "A-ASSOCIATE-AC"
    finally:
        server.shutdown()
    assert pdu_complete(GOOD_RQ) and not pdu_complete(GOOD_RQ[:-1]) and not pdu_complete(GOOD_RQ + b"\x01")
    assert pdu_complete(b"\x09\x00\x00\x00\x00\x09x") and not pdu_complete(b"\x01\x00\x00\x00\x00\x01xy")
    examples = {
        "garbage": {"data": b"abc"},
        "unknown_pdu_type": {"pdu_type": 9, "body": b"", "send_body": True},
        "truncated_rq": {"at": 10},
        "rq_in_pieces": {"cuts": [3, 50]},
        "bad_item_length": {"index": 1, "length": 0},
        "bad_pdu_length": {"delta": -2},
        "rq_field": {"mutation": ("context_count", 200)},
        "rq_byte_flips": {"flips": [(7, 1)]},
        "other_pdu_first": {"name": "A-ABORT"},
        "huge_pdu_length": {"pdu_type": 1, "length": 0xFFFFFFFF},
        "nothing": {"wait": True},
        "post_garbage": {"data": b"x"},
        "post_bad_pdv": {"pdv_length": 0, "context_id": 99, "control": 0xFF},
        "post_bad_command": {"flips": [], "cut": None, "command_field": 0x1234, "group_length_delta": 0},
        "post_dataset_first": {"data": b"xx"},
        "post_store_without_dataset": {"then": "release"},
        "post_wrong_pdu": {"name": "unknown"},
        "post_truncated": {"at": 5},
        "tiny_max_pdu": {"max_length": 7},
    }
    assert sorted(examples) == sorted(KINDS)
    good_exchange = (None, [GOOD_RQ])
    for kind, params in examples.items():
        planned = plan(Recipe(kind, tuple(params.items())))
        assert (planned.associate, planned.chunks) != good_exchange, kind
        assert planned.chunks or kind == "nothing", kind
