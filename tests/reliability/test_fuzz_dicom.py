"""Malformed DICOM over the network: hypothesis-made broken MR instances sent as C-STOREs to `sct-node serve`.

Each input is the middle slice of a fresh 5-slice phantom series (new study, series and instance
UIDs), broken in one way, and sent with pynetdicom as the raw bytes it is (the file-path form of
``send_c_store`` never decodes it) on one long association that is re-opened after an abort:

* truncated at any byte; an element's length field changed (0, odd, off by a few, past the end,
  0xFFFFFFFF); an element's VR replaced (garbage, lower case, NULs, a valid VR of the other
  header size); random bytes flipped; random bytes inserted; nothing but random bytes;
* a required attribute missing (the four UIDs, pixel data, geometry, pixel format); a UID that
  is no UID ("", "1..2", "../../x", 65 digits, non-ASCII, several values); the SOP Instance or
  SOP Class UID not the one the C-STORE request announces; attribute values that make no image
  (0 rows, PixelSpacing "abc", 3 samples per pixel, a CT modality...); pixel data short, odd,
  empty or of undefined length;
* a wrong transfer syntax claim: implicit VR data on an explicit VR context and the reverse, big
  endian data, deflated data on a plain context and plain data on a deflated one, native pixels
  on an RLE context;
* "garbage in the meta header", as it reaches a node (a C-STORE carries no file meta): a whole
  Part 10 preamble and meta, or a group 0002 with garbage values, wrong lengths or another
  transfer syntax, in front of the dataset;
* damaged sequences before the UIDs: no delimiter, nested 20 deep, an item that is no item,
  an item running past the end.

Checked for every input: the answer is a documented C-STORE status (never 0xC211, the node's own
bug status, never no answer), an abort being allowed; inputs that cannot be a usable instance
(missing or invalid UIDs, mismatches, header cut short, wrong transfer syntax, random bytes) are
refused with their status; nothing is left in incoming/. After the run, from the audit database
and the storage: a refused input has its store_refused event with its status and no spooled
file, no instance row, no series row; an accepted one was spooled byte for byte as sent, has its
instance row, and its series (the broken slice with its four good neighbours, sent right after it
was accepted) is quarantined with a reason, not routed with a reason, or made an sCT that reached
the destination (a job that failed, or a series left open, fails the test): nothing accepted is
silently dropped. Meanwhile DCMTK echoscu and storescu send good
series on their own associations; they all go through. At the end the node is alive and one more
good series becomes an sCT at the destination.

Reproducible: every variant the kinds list (EXPLICIT_RECIPES) is sent first, then hypothesis draws
INPUTS more; in CI it is derandomized (the same inputs every run), under `make reliability`
(SCT_RELIABILITY=long) the seed is random unless SCT_FUZZ_SEED is set, and printed (SCT_FUZZ_INPUTS
sets the number). A failing input is printed as its recipe (kind and parameters) and what was sent.
"""

from __future__ import annotations

import collections
import copy
import io
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from hypothesis import note
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom import association as pynetdicom_association
from sqlalchemy import select

from dicom_node.audit import EventRow, InstanceRow, SeriesRow, SeriesState
from dicom_node.spool import is_valid_uid, part10_header
from dicom_node.synthetic_mr import generate_mr_series
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
    series_outcomes,
    wait_until_settled,
)

INPUTS = fuzz_inputs(250, 3000)  # drawn, after EXPLICIT_RECIPES
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.3811.3.0.4"
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless)
REFUSALS = {0xA900, 0xC210, 0xC220, 0xC221}  # the statuses a malformed dataset may get (scp.py)
SUCCESS = 0x0000
ABORTED = "aborted"
SERIES_UID_TAG = 0x0020000E
SLICES, BROKEN = 5, 2  # each input is the middle slice of a series of 5 (the smallest the model takes is 4)
UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# Explicit VRs with a 16-bit length (PS3.5 7.1.2); all others have 2 reserved bytes and a 32-bit length.
SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())


# Encoded elements ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Element:
    tag: int
    offset: int  # of the element header
    vr: bytes
    value_offset: int
    length: int  # as encoded (0xFFFFFFFF: undefined)
    end: int  # offset after the element (after its delimiter when of undefined length)

    @property
    def header_size(self) -> int:
        return self.value_offset - self.offset


def elements(data: bytes) -> list[Element]:
    """The top-level elements of a well-formed explicit VR little endian dataset."""
    found, pos = [], 0
    while pos < len(data):
        element = _element_at(data, pos)
        found.append(element)
        pos = element.end
    return found


def _element_at(data: bytes, pos: int) -> Element:
    group, number, vr = struct.unpack_from("<HH2s", data, pos)
    tag = group << 16 | number
    if vr in SHORT_VRS:
        (length,) = struct.unpack_from("<H", data, pos + 6)
        value_offset = pos + 8
    else:
        (length,) = struct.unpack_from("<L", data, pos + 8)
        value_offset = pos + 12
    if length != 0xFFFFFFFF:
        return Element(tag, pos, vr, value_offset, length, value_offset + length)
    return Element(tag, pos, vr, value_offset, length, _after_sequence(data, value_offset))


def _after_sequence(data: bytes, pos: int) -> int:
    while True:
        tag, length = struct.unpack_from("<LL", data, pos)
        tag = (tag & 0xFFFF) << 16 | tag >> 16
        pos += 8
        if tag == 0xFFFEE0DD:
            return pos
        if length != 0xFFFFFFFF:
            pos += length
            continue
        while struct.unpack_from("<HH", data, pos) != (0xFFFE, 0xE00D):
            pos = _element_at(data, pos).end
        pos += 8


def encode_element(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr in SHORT_VRS:
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2s2xL", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def even(value: bytes, pad: bytes = b" ") -> bytes:
    return value + pad if len(value) % 2 else value


def set_value(data: bytes, tag: int, value: bytes) -> bytes:
    """The dataset with the value of ``tag`` replaced (its length field follows), bytes kept as given."""
    for element in elements(data):
        if element.tag == tag:
            return data[: element.offset] + encode_element(tag, element.vr, value) + data[element.end :]
    raise KeyError(hex(tag))


def remove_element(data: bytes, tag: int) -> bytes:
    for element in elements(data):
        if element.tag == tag:
            return data[: element.offset] + data[element.end :]
    raise KeyError(hex(tag))


def insert_before(data: bytes, tag: int, encoded: bytes) -> bytes:
    """``encoded`` put where an element ``tag`` belongs (before the first element with a larger tag)."""
    for element in elements(data):
        if element.tag > tag:
            return data[: element.offset] + encoded + data[element.offset :]
    return data + encoded


def keyword_tag(keyword: str) -> int:
    return int(pydicom.datadict.tag_for_keyword(keyword))  # type: ignore[arg-type]


def encode_dataset(ds: Dataset, *, implicit: bool = False, little_endian: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little_endian
    write_dataset(fp, ds)
    return fp.getvalue()


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


# Recipes: what hypothesis draws -----------------------------------------------------------------------


ANY_INDEX = st.integers(0, 10**6)  # an element or offset, taken modulo what the slice has
BAD_UID_VALUES = st.one_of(
    st.sampled_from(
        [
            b"",
            b" ",
            b"\x00\x00",
            b"1.2.abc",
            b"../../escaped",
            b"1..2",
            b".1.2",
            b"1.2.",
            b"1.2.3\x004",
            b"9" * 65,
            b"1.2.3 4",
            b"1.2.3\\1.2.4",
            b"1.2.\xe9",
            "\u0663.\u0663".encode(),
            b"\xff\xfe",
        ]
    ),
    st.binary(max_size=80),
)
BAD_VALUES: dict[str, list[bytes]] = {
    "Rows": [b"\x00\x00", b"\x01\x00", b"\xff\xff", b"\x11"],
    "Columns": [b"\x00\x00", b"\x03\x00"],
    "BitsAllocated": [b"\x08\x00", b"\x20\x00", b"\x00\x00"],
    "SamplesPerPixel": [b"\x03\x00", b"\x00\x00"],
    "PhotometricInterpretation": [b"RGB ", b"", b"PALETTE COLOR "],
    "PixelSpacing": [b"abc ", b"0\\0 ", b"-1\\1 ", b"nan\\1 ", b"1e999\\1 ", b"1 "],
    "ImagePositionPatient": [b"a\\b\\c ", b"1\\2 ", b"", b"inf\\0\\0 "],
    "ImageOrientationPatient": [b"1\\0\\0\\1\\0\\0 ", b"0\\0\\0\\0\\0\\0 ", b"1\\0\\0 ", b"x "],
    "Modality": [b"CT", b"", b"\xff\xff"],
    "SeriesDescription": [b"\xff" * 64, b"LOCALIZER ", b"\x00" * 8],
    "PatientName": [b"\xff\xfe\x00" + b"=" * 61, b"^^^^^^^^\\\\\\ ", b"\x1b$B\x1b(B "],
    "SpecificCharacterSet": [b"ISO 2022 IR 87\\bogus ", b"\xff\xff", b"ISO_IR 192"],
    "FrameOfReferenceUID": [b"", b"1..2 "],
}
REQUIRED = (
    *UID_KEYWORDS,
    "PixelData",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Modality",
    "FrameOfReferenceUID",
    "PhotometricInterpretation",
)
WRONG_SYNTAX = (
    "implicit_on_explicit",
    "explicit_on_implicit",
    "big_endian_on_explicit",
    "deflated_on_explicit",
    "explicit_on_deflated",
    "implicit_deflated_on_deflated",
    "native_pixels_on_rle",
)

RECIPE_STRATEGIES = (
    recipe("truncated", at=ANY_INDEX),
    recipe(
        "wrong_length",
        element=ANY_INDEX,
        length=st.one_of(
            st.sampled_from([0, 1, 2, 3, 0xFFFF, 0xFFFFFFFE, 0xFFFFFFFF, 0x7FFFFFFF]),
            st.integers(-8, 8).map(lambda delta: ("delta", delta)),
            st.integers(0, 5000),
        ),
    ),
    recipe(
        "bad_vr",
        element=ANY_INDEX,
        vr=st.one_of(
            st.sampled_from([b"ui", b"\x00\x00", b"  ", b"OB", b"UN", b"SQ", b"UT", b"US", b"UI", b"XX", b"A1"]),
            st.binary(min_size=2, max_size=2),
        ),
    ),
    recipe("byte_flips", flips=st.lists(st.tuples(ANY_INDEX, st.integers(1, 255)), min_size=1, max_size=8)),
    recipe("inserted_garbage", at=ANY_INDEX, garbage=st.binary(min_size=1, max_size=64)),
    recipe("random_bytes", data=st.binary(max_size=2048)),
    recipe("missing_attribute", keyword=st.sampled_from(REQUIRED)),
    recipe("invalid_uid", keyword=st.sampled_from(UID_KEYWORDS), value=BAD_UID_VALUES),
    recipe("uid_mismatch", which=st.sampled_from(["SOPInstanceUID", "SOPClassUID"])),
    recipe(
        "bad_value",
        item=st.sampled_from([(k, v) for k, values in BAD_VALUES.items() for v in values]),
    ),
    recipe(
        "pixel_data",
        variant=st.sampled_from(["short", "odd_length", "empty", "too_long", "undefined_length", "as_ow_in_sq"]),
        cut=st.integers(1, 511),
    ),
    recipe("wrong_transfer_syntax", variant=st.sampled_from(WRONG_SYNTAX)),
    recipe(
        "meta_in_dataset",
        variant=st.sampled_from(
            ["part10_prefix", "meta_group", "meta_garbage", "meta_wrong_lengths", "meta_big_endian"]
        ),
        garbage=st.binary(min_size=0, max_size=40),
    ),
    recipe(
        "bad_sequence",
        variant=st.sampled_from(
            ["no_delimiter", "too_deep", "item_not_an_item", "item_past_end", "explicit_items_in_un"]
        ),
    ),
)
# Kind first, then its parameters. Hypothesis does not repeat an input: a kind with few variants
# is soon exhausted, and the rest of the inputs go to the kinds with many.
RECIPES = st.sampled_from(RECIPE_STRATEGIES).flatmap(lambda strategy: strategy)
# Tried first in every run, whatever hypothesis draws: every variant of the kinds that list them.
EXPLICIT_RECIPES = (
    *(Recipe("missing_attribute", (("keyword", keyword),)) for keyword in REQUIRED),
    *(Recipe("wrong_transfer_syntax", (("variant", variant),)) for variant in WRONG_SYNTAX),
    *(Recipe("uid_mismatch", (("which", which),)) for which in ("SOPInstanceUID", "SOPClassUID")),
    *(
        Recipe("pixel_data", (("variant", variant), ("cut", 100)))
        for variant in ("short", "odd_length", "empty", "too_long", "undefined_length", "as_ow_in_sq")
    ),
    *(
        Recipe("meta_in_dataset", (("variant", variant), ("garbage", b"\x01\x02\x03")))
        for variant in ("part10_prefix", "meta_group", "meta_garbage", "meta_wrong_lengths", "meta_big_endian")
    ),
    *(
        Recipe("bad_sequence", (("variant", variant),))
        for variant in ("no_delimiter", "too_deep", "item_not_an_item", "item_past_end", "explicit_items_in_un")
    ),
)


# One input: a recipe applied to a fresh slice ------------------------------------------------------


@dataclass
class Case:
    recipe: Recipe
    payload: bytes
    transfer_syntax: str
    request_sop_class: str
    request_sop_instance: str
    series_uid: str  # the intended one (the neighbours' series)
    must_refuse: bool
    expected: frozenset[int] | None = None  # the exact statuses, when the input allows only those
    status: int | str | None = None
    neighbours: list[str] = field(default_factory=list)  # SOP Instance UIDs of the good neighbours sent

    def describe(self) -> str:
        return (
            f"{self.recipe!r} -> {len(self.payload)} bytes on {pydicom.uid.UID(self.transfer_syntax).name}, "
            f"request {pydicom.uid.UID(self.request_sop_class).name} {self.request_sop_instance}; "
            f"must refuse: {self.must_refuse}; first bytes {self.payload[:48].hex()}"
        )


class SliceFactory:
    """Good phantom slices as templates; each call makes a fresh series of them (new UIDs)."""

    def __init__(self, folder: Path) -> None:
        paths = generate_mr_series(folder, slices=SLICES, rows=16, columns=16, patient_id="FUZZ")
        self.templates = [pydicom.dcmread(p) for p in sorted(paths, key=_position_along_normal)]

    def fresh_series(self) -> FreshSeries:
        return FreshSeries(self, generate_uid(), generate_uid(), generate_uid())


@dataclass
class FreshSeries:
    """The UIDs of one new series; its slices are made when asked for (each with a new SOP Instance UID)."""

    factory: SliceFactory
    study_uid: str
    series_uid: str
    frame_uid: str

    def slice(self, index: int) -> Dataset:
        ds = copy.deepcopy(self.factory.templates[index])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            self.study_uid,
            self.series_uid,
            self.frame_uid,
        )
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds


def _position_along_normal(path: Path) -> float:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return float(ds.ImagePositionPatient[2])


def materialize(recipe: Recipe, ds: Dataset) -> Case:
    """Apply ``recipe`` to the (fresh) slice ``ds``: the bytes to send and what they must get."""
    sop_instance = str(ds.SOPInstanceUID)
    clean = encode_dataset(ds)
    layout = elements(clean)
    series_end = next(e.end for e in layout if e.tag == SERIES_UID_TAG)
    case = Case(
        recipe=recipe,
        payload=clean,
        transfer_syntax=ExplicitVRLittleEndian,
        request_sop_class=MRImageStorage,
        request_sop_instance=sop_instance,
        series_uid=str(ds.SeriesInstanceUID),
        must_refuse=False,
    )
    kind = recipe.kind
    if kind == "truncated":
        at = recipe.get("at") % len(clean)
        case.payload = clean[:at]
        case.must_refuse = at < series_end  # the UIDs the node needs are not all there
    elif kind == "wrong_length":
        element = layout[recipe.get("element") % len(layout)]
        length = recipe.get("length")
        if isinstance(length, tuple):
            length = max(0, element.length + length[1]) if element.length != 0xFFFFFFFF else 0
        field_offset, fmt = (element.offset + 6, "<H") if element.header_size == 8 else (element.offset + 8, "<L")
        length &= 0xFFFF if fmt == "<H" else 0xFFFFFFFF
        case.payload = clean[:field_offset] + struct.pack(fmt, length) + clean[field_offset + struct.calcsize(fmt) :]
    elif kind == "bad_vr":
        element = layout[recipe.get("element") % len(layout)]
        case.payload = clean[: element.offset + 4] + recipe.get("vr") + clean[element.offset + 6 :]
    elif kind == "byte_flips":
        data = bytearray(clean)
        for at, mask in recipe.get("flips"):
            data[at % len(data)] ^= mask
        case.payload = bytes(data)
    elif kind == "inserted_garbage":
        at = recipe.get("at") % (len(clean) + 1)
        case.payload = clean[:at] + recipe.get("garbage") + clean[at:]
    elif kind == "random_bytes":
        case.payload = recipe.get("data")
        case.must_refuse = True  # the request's new SOP Instance UID cannot be in random bytes
    elif kind == "missing_attribute":
        keyword = recipe.get("keyword")
        case.payload = remove_element(clean, keyword_tag(keyword))
        if keyword in UID_KEYWORDS:
            case.must_refuse = True
            case.expected = frozenset({0xA900 if keyword == "SOPClassUID" else 0xC220})
    elif kind == "invalid_uid":
        keyword, value = recipe.get("keyword"), recipe.get("value")
        case.payload = set_value(clean, keyword_tag(keyword), even(value, b"\x00"))
        read_back = even(value, b"\x00").decode("ascii", "replace").strip(" \x00")
        if keyword == "SOPClassUID":
            case.must_refuse = read_back != MRImageStorage
            case.expected = frozenset({0xA900}) if case.must_refuse else None
        elif not is_valid_uid(read_back):
            case.must_refuse, case.expected = True, frozenset({0xC220})
        elif keyword == "SOPInstanceUID" and read_back != sop_instance:
            case.must_refuse, case.expected = True, frozenset({0xC221})
    elif kind == "uid_mismatch":
        case.must_refuse = True
        if recipe.get("which") == "SOPInstanceUID":
            case.request_sop_instance = generate_uid()
            case.expected = frozenset({0xC221})
        else:
            case.request_sop_class = EnhancedMRImageStorage
            case.expected = frozenset({0xA900})
    elif kind == "bad_value":
        keyword, value = recipe.get("item")
        case.payload = set_value(clean, keyword_tag(keyword), even(value))
    elif kind == "pixel_data":
        case.payload = _broken_pixel_data(clean, recipe.get("variant"), recipe.get("cut"))
    elif kind == "wrong_transfer_syntax":
        case.payload, case.transfer_syntax = _wrong_syntax(ds, clean, recipe.get("variant"))
        case.must_refuse = recipe.get("variant") != "native_pixels_on_rle"
    elif kind == "meta_in_dataset":
        case.payload = _meta_in_front(ds, clean, recipe.get("variant"), recipe.get("garbage"))
        case.must_refuse, case.expected = True, frozenset({0xC210})
    elif kind == "bad_sequence":
        case.payload = _broken_sequence(clean, recipe.get("variant"))
        case.must_refuse = recipe.get("variant") != "explicit_items_in_un"
    else:
        raise AssertionError(kind)
    return case


PIXEL_DATA = 0x7FE00010


def _broken_pixel_data(clean: bytes, variant: str, cut: int) -> bytes:
    pixels = next(e for e in elements(clean) if e.tag == PIXEL_DATA)
    value = clean[pixels.value_offset : pixels.end]
    before = clean[: pixels.offset]
    if variant == "short":
        return before + encode_element(PIXEL_DATA, b"OW", value[: cut & ~1])
    if variant == "odd_length":
        return before + encode_element(PIXEL_DATA, b"OW", value[:cut] if cut % 2 else value[: cut - 1])
    if variant == "empty":
        return before + encode_element(PIXEL_DATA, b"OW", b"")
    if variant == "too_long":
        return before + encode_element(PIXEL_DATA, b"OW", value + value[:cut] + (b"\x00" if cut % 2 else b""))
    if variant == "undefined_length":  # native pixels need a defined length
        header = struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", 0xFFFFFFFF)
        return before + header + value + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    # as_ow_in_sq: pixel data encoded as a sequence
    item = struct.pack("<HHL", 0xFFFE, 0xE000, len(value)) + value
    return before + struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"SQ", len(item)) + item


def _wrong_syntax(ds: Dataset, clean: bytes, variant: str) -> tuple[bytes, str]:
    if variant == "implicit_on_explicit":
        return encode_dataset(ds, implicit=True), ExplicitVRLittleEndian
    if variant == "explicit_on_implicit":
        return clean, ImplicitVRLittleEndian
    if variant == "big_endian_on_explicit":
        return encode_dataset(ds, little_endian=False), ExplicitVRLittleEndian
    if variant == "deflated_on_explicit":
        return deflate(clean), ExplicitVRLittleEndian
    if variant == "explicit_on_deflated":
        return clean, DeflatedExplicitVRLittleEndian
    if variant == "implicit_deflated_on_deflated":
        return deflate(encode_dataset(ds, implicit=True)), DeflatedExplicitVRLittleEndian
    if variant == "native_pixels_on_rle":
        return clean, RLELossless
    raise AssertionError(variant)


def _meta_in_front(ds: Dataset, clean: bytes, variant: str, garbage: bytes) -> bytes:
    meta = part10_header(
        sop_class_uid=MRImageStorage,
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        implementation_class_uid=IMPLEMENTATION_UID,
    )
    group = meta[132:]  # the group 0002 elements, without preamble and "DICM"
    if variant == "part10_prefix":
        return meta + clean
    if variant == "meta_group":
        return group + clean
    if variant == "meta_garbage":
        return (
            encode_element(0x00020001, b"OB", even(garbage, b"\x00"))
            + encode_element(0x00020010, b"UI", even(garbage[:20], b"\x00"))
            + encode_element(0x00020013, b"SH", even(garbage[::-1]))
            + clean
        )
    if variant == "meta_wrong_lengths":  # the group length and the first element claim more than there is
        wrong = bytearray(group)
        struct.pack_into("<L", wrong, 8, 0xFFFFFFF0)
        struct.pack_into("<L", wrong, 20, len(group) + len(garbage) + 1000)
        return bytes(wrong) + garbage + clean
    if variant == "meta_big_endian":
        return encode_element(0x00020010, b"UI", b"1.2.840.10008.1.2.2\x00") + clean
    raise AssertionError(variant)


def _broken_sequence(clean: bytes, variant: str) -> bytes:
    tag = 0x00080006  # LanguageCodeSequence: sorts before the UIDs the node reads
    head = struct.pack("<HH2s2xL", 0x0008, 0x0006, b"SQ", 0xFFFFFFFF)
    item_start = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    sequence_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    if variant == "no_delimiter":
        encoded = head + item_start + encode_element(0x00080100, b"SH", b"T-A0100 ") + item_end
    elif variant == "too_deep":
        encoded = (head + item_start) * 20 + (item_end + sequence_end) * 20
    elif variant == "item_not_an_item":
        encoded = head + struct.pack("<HHL", 0xFFFE, 0xE001, 4) + b"abcd" + sequence_end
    elif variant == "item_past_end":
        encoded = head + struct.pack("<HHL", 0xFFFE, 0xE000, 0x7FFFFFFF) + b"ab"
    elif variant == "explicit_items_in_un":  # an undefined-length UN holds implicit VR items (PS3.5 6.2.2)
        inner = struct.pack("<HHL", 0x0008, 0x0100, 8) + b"T-A0100 "
        encoded = (
            struct.pack("<HH2s2xL", 0x0008, 0x0006, b"UN", 0xFFFFFFFF) + item_start + inner + item_end + sequence_end
        )
    else:
        raise AssertionError(variant)
    return insert_before(clean, tag, encoded)


# The sender ----------------------------------------------------------------------------------------------


class FuzzSender:
    """pynetdicom SCU sending raw dataset bytes on one association, re-associating after an abort."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.path = workdir / "input.dcm"
        self.ae = AE("FUZZER")
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        for sop_class in (MRImageStorage, EnhancedMRImageStorage):
            for syntax in TRANSFER_SYNTAXES:
                self.ae.add_requested_context(sop_class, syntax)
        self.assoc: Any = None
        self.associations = 0
        self.aborts = 0

    def store(self, sop_class: str, sop_instance: str, transfer_syntax: str, payload: bytes) -> int | str:
        """The status of the C-STORE, or ABORTED when the association ended without an answer."""
        meta = part10_header(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax_uid=transfer_syntax,
            implementation_class_uid=IMPLEMENTATION_UID,
        )
        self.path.write_bytes(meta + payload)
        file_meta = FileMetaDataset()
        file_meta.MediaStorageSOPClassUID = sop_class
        file_meta.MediaStorageSOPInstanceUID = sop_instance
        file_meta.TransferSyntaxUID = transfer_syntax
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="SCTNODE")
            assert self.assoc.is_established, "the node did not accept a new association"
            self.associations += 1
        # The file-path form sends the file's bytes after the meta as they are. pynetdicom finds
        # where the meta ends by reading group 0002 elements, which would take in an input's own
        # group 0002 (and not send it): it is told where our meta ends instead.
        previous = _config.STORE_SEND_CHUNKED_DATASET, pynetdicom_association.split_dataset
        _config.STORE_SEND_CHUNKED_DATASET = True
        pynetdicom_association.split_dataset = lambda path: (file_meta, len(meta))
        try:
            response = self.assoc.send_c_store(self.path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET, pynetdicom_association.split_dataset = previous
        if "Status" in response:
            return int(response.Status)
        assert self.assoc.is_aborted, "no C-STORE response and no abort: the node did not answer in 30 s"
        self.aborts += 1
        self.assoc = None
        return ABORTED

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


# The test ------------------------------------------------------------------------------------------------


def test_malformed_c_stores_are_refused_or_accounted_for(tmp_path: Path, report: Any) -> None:
    factory = SliceFactory(tmp_path / "templates")
    cases: list[Case] = []
    with node_under_test(tmp_path) as under_test:
        node = under_test.node
        sender = FuzzSender(node.port, tmp_path)
        good = GoodTraffic(node.port, tmp_path / "good", interval_s=scale(2.0, 5.0)).start()

        def send(case: Case) -> int | str:
            status = sender.store(case.request_sop_class, case.request_sop_instance, case.transfer_syntax, case.payload)
            case.status = status
            return status

        def one_input(recipe: Recipe) -> None:
            series = factory.fresh_series()
            case = materialize(recipe, series.slice(BROKEN))
            cases.append(case)
            note(case.describe())
            status = send(case)
            note(f"answered {status if status == ABORTED else hex(status)}")
            assert node.alive()
            assert status in (ABORTED, SUCCESS) or status in REFUSALS, f"unexpected status {status:#06x}"
            if case.must_refuse:
                assert status != SUCCESS, "accepted an input that cannot be a usable MR instance"
            if case.expected is not None and status != ABORTED:
                assert status in case.expected, f"{status:#06x} instead of {sorted(map(hex, case.expected))}"
            assert leftover_temp_files(under_test.root) == [], "a temporary file was left behind"
            if status == SUCCESS:  # its good neighbours, so that the series check sees a real series
                for neighbour in (series.slice(i) for i in range(SLICES) if i != BROKEN):
                    encoded = encode_dataset(neighbour)
                    answer = sender.store(MRImageStorage, neighbour.SOPInstanceUID, ExplicitVRLittleEndian, encoded)
                    assert answer == SUCCESS, f"a good neighbour slice got {answer}"
                    case.neighbours.append(str(neighbour.SOPInstanceUID))

        started = time.monotonic()
        try:
            run_fuzzer(one_input, RECIPES, EXPLICIT_RECIPES, INPUTS)
        finally:
            good.stop()
            sender.close()
        fuzz_s = time.monotonic() - started
        assert not good.errors, "good senders failed during the fuzzing:\n" + "\n".join(good.errors[:10])
        assert good.series, "no good series was sent during the fuzzing"

        # One more good series after all of it, then wait for everything to settle.
        good.send_series(len(good.stores))
        assert not good.errors, good.errors
        accepted_series = {case.series_uid for case in cases if case.neighbours}
        wait_until_settled(node, timeout_s=scale(180, 900), expect_series={*good.series, *accepted_series})
        assert node.alive()
        delivered = check_good_series_done(under_test, good)
        ended = _account(under_test.root, node, cases)
        assert leftover_temp_files(under_test.root) == []
        assert node.alive()

    by_kind = collections.Counter(c.recipe.kind for c in cases)
    statuses = collections.Counter(_status_name(c.status) for c in cases)
    by_kind_status: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (kind, status), n in collections.Counter((c.recipe.kind, _status_name(c.status)) for c in cases).items():
        by_kind_status[kind][status] = n
    accepted_by_kind: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (kind, outcome), n in ended.items():
        accepted_by_kind[kind][outcome] = n
    accounting = collections.Counter(outcome for (_, outcome) in ended.elements())
    assert set(by_kind) == set(KINDS), f"kinds never tried: {set(KINDS) - set(by_kind)}"
    print(f"\nfuzz seed {'derandomized' if not LONG else FUZZ_SEED}; {len(cases)} inputs in {fuzz_s:.0f} s")
    for kind in sorted(by_kind_status):
        print(f"  {kind:22s} {dict(sorted(by_kind_status[kind].items()))}; accepted: {accepted_by_kind.get(kind, {})}")
    print(f"  accepted inputs ended as: {dict(accounting)}; good traffic: {good.summary()}")
    report(
        did=(
            f"sent {len(cases)} malformed C-STOREs ({len(by_kind)} kinds: {', '.join(sorted(by_kind))}) over "
            f"{sender.associations} associations to `sct-node serve`, while DCMTK sent "
            f"{len(good.stores)} good series and {len(good.echoes)} C-ECHOs on their own associations"
        ),
        result=(
            f"every input answered with a documented status ({dict(statuses)}), none with 0xC211, no crash, "
            f"no temporary file left; every refused input audited and not stored; every accepted one "
            f"stored as sent and its series {dict(accounting)}; all good series made an sCT at the destination"
        ),
        inputs=len(cases),
        associations=sender.associations,
        aborts=sender.aborts,
        by_kind=dict(by_kind),
        by_status=dict(statuses),
        by_kind_and_status={k: dict(v) for k, v in by_kind_status.items()},
        accepted_outcomes=dict(accounting),
        accepted_outcomes_by_kind={k: dict(v) for k, v in accepted_by_kind.items()},
        sct_instances_delivered=delivered,
        fuzz_seconds=round(fuzz_s, 1),
        seed="derandomized" if not LONG else FUZZ_SEED,
        **good.summary(),
    )


KINDS = (
    "truncated",
    "wrong_length",
    "bad_vr",
    "byte_flips",
    "inserted_garbage",
    "random_bytes",
    "missing_attribute",
    "invalid_uid",
    "uid_mismatch",
    "bad_value",
    "pixel_data",
    "wrong_transfer_syntax",
    "meta_in_dataset",
    "bad_sequence",
)


def _status_name(status: int | str | None) -> str:
    return status if isinstance(status, str) or status is None else f"0x{status:04X}"


def _account(root: Path, node: Any, cases: list[Case]) -> collections.Counter[tuple[str, str]]:
    """Check each input's traces in the audit database and the storage; count how accepted ones
    ended, by (kind, outcome)."""
    db = node.db()
    try:
        with db.session() as session:
            instance_series = dict(
                session.execute(
                    select(InstanceRow.sop_instance_uid, SeriesRow.series_instance_uid).join(
                        SeriesRow, SeriesRow.id == InstanceRow.series_id
                    )
                ).all()
            )
            instance_paths = dict(session.execute(select(InstanceRow.sop_instance_uid, InstanceRow.path)).all())
            series_uids = set(session.scalars(select(SeriesRow.series_instance_uid)).all())
            refusals = collections.defaultdict(list)
            for event in session.scalars(select(EventRow).where(EventRow.kind == "store_refused")):
                detail = event.detail or {}
                refusals[detail.get("affected_sop_instance_uid")].append(detail.get("status"))
    finally:
        db.dispose()
    files = {p.stem: p for p in [*(root / "spool").rglob("*.dcm"), *(root / "quarantine").rglob("*.dcm")]}
    outcomes = series_outcomes(node)
    ended: collections.Counter[tuple[str, str]] = collections.Counter()
    problems: list[str] = []
    for case in cases:
        uid = case.request_sop_instance
        if case.status == SUCCESS:
            path = files.get(uid)
            if uid not in instance_series or path is None:
                problems.append(f"accepted but no instance row or no file: {case.describe()}")
                continue
            if Path(instance_paths[uid]) != path:
                problems.append(f"instance row points at {instance_paths[uid]}, file at {path}: {case.describe()}")
            stored = path.read_bytes()
            if stored[128:132] != b"DICM" or stored[144 + struct.unpack_from("<L", stored, 140)[0] :] != case.payload:
                problems.append(f"not stored byte for byte as sent: {case.describe()}")
            state, reason, job_state, job_error = outcomes[instance_series[uid]]
            if state == SeriesState.QUARANTINED and reason:
                ended[(case.recipe.kind, "quarantined")] += 1
            elif state == SeriesState.NOT_ROUTED and reason:
                ended[(case.recipe.kind, "not routed")] += 1
            elif state == SeriesState.ROUTED and job_state == "DONE":
                ended[(case.recipe.kind, "made an sCT")] += 1
            else:
                problems.append(f"series {state} ({reason}), job {job_state} ({job_error[:150]}): {case.describe()}")
        else:
            if uid in instance_series or uid in files:
                problems.append(f"refused ({_status_name(case.status)}) but stored or recorded: {case.describe()}")
            if case.series_uid in series_uids and not case.neighbours:
                problems.append(f"refused but its series has a row: {case.describe()}")
            if case.status != ABORTED and _status_name(case.status) not in refusals.get(uid, []):
                problems.append(f"refused without its store_refused event: {case.describe()}")
    assert not problems, f"{len(problems)} inputs not accounted for:\n" + "\n".join(sorted(problems)[:40])
    return ended


def test_recipes_reach_every_kind_and_the_templates_are_sound(tmp_path: Path) -> None:
    """The fuzzer itself: a clean slice is accepted as is by the element walker; each kind changes the bytes."""
    factory = SliceFactory(tmp_path)
    ds = factory.fresh_series().slice(BROKEN)
    clean = encode_dataset(ds)
    layout = elements(clean)
    assert layout[-1].tag == PIXEL_DATA and layout[-1].end == len(clean)
    assert pydicom.dcmread(io.BytesIO(clean), force=True).SOPInstanceUID == ds.SOPInstanceUID
    probes = [
        Recipe("truncated", (("at", 10),)),
        Recipe("wrong_length", (("element", 3), ("length", 0xFFFF))),
        Recipe("bad_vr", (("element", 3), ("vr", b"\x00\x00"))),
        Recipe("byte_flips", (("flips", [(5, 1)]),)),
        Recipe("inserted_garbage", (("at", 5), ("garbage", b"xx"))),
        Recipe("random_bytes", (("data", b"abc"),)),
        Recipe("missing_attribute", (("keyword", "PixelData"),)),
        Recipe("invalid_uid", (("keyword", "SeriesInstanceUID"), ("value", b"1..2"))),
        Recipe("bad_value", (("item", ("Rows", b"\x00\x00")),)),
        Recipe("wrong_transfer_syntax", (("variant", "big_endian_on_explicit"),)),
        Recipe("meta_in_dataset", (("variant", "meta_group"), ("garbage", b""))),
        Recipe("bad_sequence", (("variant", "too_deep"),)),
    ]
    for variant in ("short", "odd_length", "empty", "too_long", "undefined_length", "as_ow_in_sq"):
        probes.append(Recipe("pixel_data", (("variant", variant), ("cut", 7))))
    for probe in probes:
        case = materialize(probe, ds)
        assert case.payload != clean, probe
    mismatch = materialize(Recipe("uid_mismatch", (("which", "SOPInstanceUID"),)), ds)
    assert mismatch.request_sop_instance != ds.SOPInstanceUID and mismatch.must_refuse
    assert {kind for kind in KINDS} == {r.kind for r in probes} | {"uid_mismatch"}
