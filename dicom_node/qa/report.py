"""The QA report a medical physicist reads (DESIGN.md §8): a PDF of two A4 pages and a PNG of each page.

Page 1 says what happened and why: that this is the QA report of a *synthetic* CT, whether it was
sent, held or rejected (and, after a review, who released or rejected it, when and why), the
overall verdict, every check's quantities with their levels and verdicts (colour and word), and
where the sCT came from. Page 2 shows it: the MR, the sCT (soft-tissue and bone windows, with the
MR's body outline) and the uncertainty at three orthogonal planes through the body, and the sCT's
HU histogram inside the body against the training CTs', with the tissue classes.

Drawn with matplotlib's object API (``Figure`` with an Agg canvas, ``PdfPages``), never pyplot's
global state, so that a worker thread of the server can draw while another does. Text from DICOM
headers is cleaned (control and format characters removed) and never read as mathtext.

``extract_planes`` cuts the three planes out of the volumes (only the planes are resampled: fast
for a 300-slice sCT); ``write_report`` stores everything the report needs next to the job
(``report_data``) and ``redraw_report`` draws it again from there, e.g. after a review.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import math
import re
import threading
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle
from scipy import ndimage

from dicom_node import __version__
from dicom_node.qa.layout import PAGE_PNG, REPORT_PDF
from dicom_node.qa.report_data import PLANES_NPZ, Planes, ReportData, Review, write_atomically
from dicom_node.qa.results import FAIL, PASS, WARN, CheckResult
from dicom_node.qa.results import _number as _three_digits
from sct_model.volume import Grid, Volume

PNG_DPI = 150
MAX_PLANE_PIXELS = 256  # the longest side of a plane on the display grid
MAX_PLANES_HEIGHT = 5.7  # inches: the three planes one above the other
MIN_PLANES_HEIGHT = 3.0  # below this the planes get a page of their own
MIN_ROW_H = 0.45  # inches: the row of a plane thinner than this (a thin slab) is this high
HU_OUTSIDE = -1024.0

# A4 portrait, in inches; everything below is laid out in inches from the page's top left corner.
PAGE_W, PAGE_H = 8.27, 11.69
MARGIN_X, MARGIN_TOP, FOOTER_H = 0.55, 0.5, 0.6
CONTENT_W = PAGE_W - 2 * MARGIN_X
CONTENT_BOTTOM = PAGE_H - FOOTER_H
RUNNING_HEADER_H = 0.32  # the header line at the top of every page after the first

INK, MUTED, RULE, HEADER_BG = "#1f2328", "#57606a", "#d0d7de", "#f2f4f7"
VERDICT_COLOURS = {PASS: "#1a7f37", WARN: "#b35900", FAIL: "#c62828"}
VERDICT_TINTS = {PASS: "#e8f5ec", WARN: "#fff3e0", FAIL: "#fdecea"}
SOFT_TISSUE_WINDOW = (40.0, 400.0)  # (level, width) in HU
BONE_WINDOW = (400.0, 1800.0)
BODY_OUTLINE = "#00d5ff"
UNCERTAINTY_COLOURMAP = "inferno"
TISSUE_COLOURS = ("#4c78a8", "#72b7b2", "#eeca3b", "#e45756", "#b279a2", "#9d755d", "#54a24b")
CHECK_TITLES = {
    "in_distribution": "Input in distribution",
    "body_agreement": "Body agreement",
    "hu_plausibility": "HU plausibility",
    "uncertainty": "Uncertainty",
    "field_of_view": "Field of view",
}
SANS, MONO = "DejaVu Sans", "DejaVu Sans Mono"


@dataclasses.dataclass(frozen=True)
class RenderedReport:
    """The report as a PDF and one PNG per PDF page (same figures, ``PNG_DPI``)."""

    pdf: bytes
    pages_png: tuple[bytes, ...]


# --- planes ----------------------------------------------------------------------------------------------


def extract_planes(mr: Volume, sct: Volume, std: Volume | None, body: Volume) -> Planes:
    """The MR, sCT, uncertainty and body at three orthogonal planes through the body's centre of mass.

    ``sct``, ``std`` and ``body`` share the sCT's grid; ``mr`` lies on its own (oblique or sagittal
    grids allowed). The planes are on an isotropic display grid over the sCT's extent, with pixels
    of the sCT's smallest spacing, coarser where needed to keep the longest side at
    ``MAX_PLANE_PIXELS``. Only the planes' points are interpolated (linear; the body: nearest).
    """
    grid = sct.grid
    for name, volume in (("std", std), ("body", body)):
        if volume is not None and not _same_grid(volume.grid, grid):
            raise ValueError(f"the {name} volume is not on the sCT's grid")
    corners = grid.corner_points()
    low, high = corners.min(axis=0), corners.max(axis=0)
    extent = high - low
    pixel_mm = max(min(grid.spacing_mm), float(extent.max()) / MAX_PLANE_PIXELS)
    counts = np.clip(np.round(extent / pixel_mm).astype(int), 1, MAX_PLANE_PIXELS)
    axes = [(low[a] + high[a]) / 2 + (np.arange(counts[a]) - (counts[a] - 1) / 2) * pixel_mm for a in range(3)]
    xs, ys, zs = axes
    centre = grid.index_to_point(_body_centre_index(body.array))[0]
    # (rows, columns, 3) LPS points: axial seen from the feet with anterior up (rows run to posterior,
    # columns to the patient's left); coronal and sagittal head up (rows run to the feet).
    points = (
        _plane_points(rows=(1, ys), columns=(0, xs), fixed=(2, centre[2])),
        _plane_points(rows=(2, zs[::-1]), columns=(0, xs), fixed=(1, centre[1])),
        _plane_points(rows=(2, zs[::-1]), columns=(1, ys), fixed=(0, centre[0])),
    )
    sct_planes = _three(lambda p: _sample(sct, p, order=1, outside=HU_OUTSIDE), points)
    std_planes = None if std is None else _three(lambda p: _sample(std, p, order=1, outside=0.0), points)
    body_planes = _three(lambda p: _sample(body, p, order=0, outside=0.0) > 0.5, points)
    mr_planes = _three(lambda p: _sample(mr, p, order=1, outside=0.0), points)
    mr_window = _mr_window(mr_planes, body_planes)
    # Display values: steps far below what a screen shows (1/2048 of the MR window, 1 HU, 1/16 HU) let
    # the npz compress to a few hundred kB.
    mr_step = 2.0 ** math.floor(math.log2((mr_window[1] - mr_window[0]) / 2048))
    return Planes(
        pixel_mm=float(pixel_mm),
        mr=_three(lambda a: _quantised(a, mr_step), mr_planes),
        sct=_three(lambda a: _quantised(a, 1.0), sct_planes),
        std=None if std_planes is None else _three(lambda a: _quantised(a, 1 / 16), std_planes),
        body=body_planes,
        mr_window=mr_window,
    )


def _three(function: Callable[[np.ndarray], np.ndarray], planes: Sequence[np.ndarray]) -> tuple[
    np.ndarray, np.ndarray, np.ndarray
]:  # fmt: skip
    a, c, s = (function(plane) for plane in planes)
    return a, c, s


def _same_grid(a: Grid, b: Grid) -> bool:
    return (
        a.size == b.size
        and np.allclose(a.spacing_mm, b.spacing_mm, atol=1e-4)
        and np.allclose(a.origin_mm, b.origin_mm, atol=1e-3)
        and np.allclose(a.direction, b.direction, atol=1e-5)
    )


def _body_centre_index(body: np.ndarray) -> np.ndarray:
    """The body's centre of mass as a continuous (x, y, z) index; the grid's centre when it is empty."""
    mask = body.view(np.uint8) if body.dtype == np.bool_ else (body > 0.5).view(np.uint8)
    shape = np.asarray(mask.shape)
    per_yx = np.add.reduce(mask, axis=0, dtype=np.uint32)
    total = float(per_yx.sum())
    if total == 0:
        return (shape[::-1] - 1) / 2.0
    per_z = np.add.reduce(mask.reshape(mask.shape[0], -1), axis=1, dtype=np.uint64)
    z = float(np.arange(shape[0]) @ per_z) / total
    y = float(np.arange(shape[1]) @ per_yx.sum(axis=1)) / total
    x = float(np.arange(shape[2]) @ per_yx.sum(axis=0)) / total
    return np.array([x, y, z])


def _plane_points(*, rows: tuple[int, np.ndarray], columns: tuple[int, np.ndarray], fixed: tuple[int, float]) -> (
    np.ndarray
):  # fmt: skip
    (row_axis, row_values), (column_axis, column_values), (fixed_axis, fixed_value) = rows, columns, fixed
    points = np.empty((len(row_values), len(column_values), 3))
    points[..., row_axis] = row_values[:, None]
    points[..., column_axis] = column_values[None, :]
    points[..., fixed_axis] = fixed_value
    return points


_SAMPLEABLE = {np.dtype(t) for t in (np.float32, np.float64, np.int16, np.uint16, np.int32, np.uint8, np.int8)}


def _sample(volume: Volume, points: np.ndarray, *, order: int, outside: float) -> np.ndarray:
    """``volume`` at LPS ``points`` (..., 3); ``outside`` beyond its outer voxel edges."""
    grid = volume.grid
    flat = points.reshape(-1, 3)
    # point = origin + (index * spacing) @ direction.T, the direction being orthonormal; written out
    # element by element, which is ten times faster than numpy's matmul on (N, 3) @ (3, 3).
    offset = flat - np.asarray(grid.origin_mm)
    matrix = grid.direction_matrix
    index_xyz = np.empty_like(offset)
    for axis in range(3):
        index_xyz[:, axis] = (
            offset[:, 0] * matrix[0, axis] + offset[:, 1] * matrix[1, axis] + offset[:, 2] * matrix[2, axis]
        ) / grid.spacing_mm[axis]
    array = volume.array
    if array.dtype == np.bool_:
        array = array.view(np.uint8)
    elif array.dtype not in _SAMPLEABLE:
        array = array.astype(np.float32)
    coordinates = np.ascontiguousarray(index_xyz[:, ::-1].T)  # (z, y, x) rows
    values = ndimage.map_coordinates(array, coordinates, order=order, mode="nearest", prefilter=False)
    values = values.astype(np.float32)
    inside = np.ones(len(flat), dtype=bool)
    for axis in range(3):
        inside &= (index_xyz[:, axis] >= -0.5) & (index_xyz[:, axis] <= grid.size[axis] - 0.5)
    values[~inside] = outside
    return values.reshape(points.shape[:-1])


def _quantised(plane: np.ndarray, step: float) -> np.ndarray:
    """Rounded to a power-of-two ``step`` (exact in float32, and it compresses well in the npz)."""
    return (np.round(plane / step) * step).astype(np.float32)


def _mr_window(mr_planes: Sequence[np.ndarray], body_planes: Sequence[np.ndarray]) -> tuple[float, float]:
    """The 1st and 99.5th percentile of the MR inside the body on the planes (all of it without a body)."""
    inside = np.concatenate([m[b] for m, b in zip(mr_planes, body_planes, strict=True)])
    if np.count_nonzero(np.isfinite(inside)) < 16:
        inside = np.concatenate([m.ravel() for m in mr_planes])
    inside = inside[np.isfinite(inside)]
    if not inside.size:
        return (0.0, 1.0)
    low, high = (float(v) for v in np.percentile(inside, [1.0, 99.5]))
    return (low, high if high > low else low + 1.0)


# --- text --------------------------------------------------------------------------------------------------


def clean_text(value: object, max_chars: int = 200) -> str:
    """``value`` as one line of printable text: control, format and separator characters become
    spaces (a header may carry anything, e.g. a right-to-left override), runs of spaces one, at
    most ``max_chars`` characters (with an ellipsis). Dollar signs stay literal: every text is drawn
    with ``parse_math=False``."""
    text = "".join(
        " " if unicodedata.category(ch)[0] in "CZ" and ch != " " else ch
        for ch in unicodedata.normalize("NFC", str(value))
    )
    text = re.sub(r" +", " ", text).strip()
    return text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"


class _Measure:
    """Text widths in inches, and word wrapping by measured width (fonts of the Agg renderer)."""

    def __init__(self) -> None:
        figure = Figure(figsize=(1, 1), dpi=72)
        self._renderer = FigureCanvasAgg(figure).get_renderer()
        self._cache: dict[tuple[str, float, str, str], float] = {}

    def width(self, text: str, size: float, weight: str = "normal", family: str = SANS) -> float:
        key = (text, size, weight, family)
        if key not in self._cache:
            prop = FontProperties(family=family, size=size, weight=weight)
            width, _, _ = self._renderer.get_text_width_height_descent(text, prop, ismath=False)
            self._cache[key] = width / self._renderer.dpi
        return self._cache[key]

    def wrap(self, text: str, width_in: float, size: float, *, weight: str = "normal", family: str = SANS,
             max_lines: int = 6) -> list[str]:  # fmt: skip
        def fits(candidate: str) -> bool:
            return self.width(candidate, size, weight, family) <= width_in

        lines: list[str] = []
        current = ""
        for word in clean_text(text, 2000).split(" "):
            candidate = f"{current} {word}" if current else word
            if fits(candidate):
                current = candidate
                continue
            if current:
                lines.append(current)
            while word and not fits(word):  # a word longer than the line: cut it, after a _ . - / if one is near
                cut = max((n for n in range(1, len(word) + 1) if fits(word[:n])), default=1)
                breaks = [n + 1 for n in range(cut // 2, cut) if word[n] in "_.-/"]
                cut = breaks[-1] if breaks else cut
                lines.append(word[:cut])
                word = word[cut:]
            current = word
        if current:
            lines.append(current)
        if len(lines) > max_lines:
            last = lines[max_lines - 1]
            while last and not fits(last + " …"):
                last = last[:-1]
            lines = [*lines[: max_lines - 1], last.rstrip() + " …"]
        return lines or [""]


_measures = threading.local()


def _measure() -> _Measure:
    """This thread's measurer: its widths are kept from one report to the next (titles, labels and the
    words of the notes recur), and a renderer is never shared between threads."""
    found = getattr(_measures, "measure", None)
    if found is None or len(found._cache) > 50_000:
        found = _measures.measure = _Measure()
    return found


# --- pages ---------------------------------------------------------------------------------------------------


class _Page:
    """One A4 figure; coordinates in inches from the top left corner."""

    def __init__(self) -> None:
        self.figure = Figure(figsize=(PAGE_W, PAGE_H), dpi=PNG_DPI, facecolor="white")
        FigureCanvasAgg(self.figure)
        self.y = MARGIN_TOP

    def text(self, x: float, y: float, text: str, *, size: float = 8.0, weight: str = "normal", colour: str = INK,
             ha: str = "left", va: str = "top", family: str = SANS, **options: Any) -> None:  # fmt: skip
        self.figure.text(
            x / PAGE_W, 1 - y / PAGE_H, text, fontsize=size, fontweight=weight, color=colour, ha=ha, va=va,
            family=family, parse_math=False, **options,
        )  # fmt: skip

    def box(self, x: float, y: float, width: float, height: float, *, fill: str, edge: str = "none",
            linewidth: float = 0.0) -> None:  # fmt: skip
        self.figure.add_artist(
            Rectangle(
                (x / PAGE_W, 1 - (y + height) / PAGE_H), width / PAGE_W, height / PAGE_H,
                transform=self.figure.transFigure, facecolor=fill, edgecolor=edge, linewidth=linewidth,
            )
        )  # fmt: skip

    def rule(self, y: float, *, colour: str = RULE, linewidth: float = 0.6, x0: float = MARGIN_X,
             x1: float = PAGE_W - MARGIN_X) -> None:  # fmt: skip
        self.box(x0, y - linewidth / 144, x1 - x0, linewidth / 72, fill=colour)

    def axes(self, x: float, y: float, width: float, height: float) -> matplotlib.axes.Axes:
        return self.figure.add_axes((x / PAGE_W, 1 - (y + height) / PAGE_H, width / PAGE_W, height / PAGE_H))

    def room(self) -> float:
        return CONTENT_BOTTOM - self.y


class _Block:
    """A piece of a page: its height in inches, and how to draw it at the page's current y;
    ``continued`` draws what must come first when the block opens a new page (e.g. a table's
    column titles), and moves the page's y below it."""

    def __init__(self, height: float, draw: Callable[[_Page], None], *, new_page: bool = False,
                 continued: Callable[[_Page], None] | None = None) -> None:  # fmt: skip
        self.height, self.draw, self.new_page, self.continued = height, draw, new_page, continued


def render_report(
    data: ReportData, planes: Planes, review: Review | None = None, *, pdf: bool = True, png: bool = True
) -> RenderedReport:
    """The report as PDF bytes and one PNG per page (either can be left out: b"" and ())."""
    measure = _measure()
    histogram = _histogram_block(data, measure)
    pages = [_Page()]
    # Page 1: what happened (header, checks, provenance); the provenance moves to page 2 when page 1
    # is full. Page 2: what it looks like; the planes take what that page has left, so that the
    # report stays two pages (a third only when the planes would be smaller than MIN_PLANES_HEIGHT).
    for block in (_header_block(data, review, measure), *_checks_blocks(data, measure),
                  _provenance_block(data, measure)):  # fmt: skip
        _place(pages, block, data)
    room = pages[-1].room() if len(pages) > 1 else CONTENT_BOTTOM - MARGIN_TOP - RUNNING_HEADER_H
    planes_block = _planes_block(planes, measure, room - histogram.height, new_page=len(pages) == 1)
    for block in (planes_block, histogram):
        _place(pages, block, data)
    for number, page in enumerate(pages, start=1):
        _footer(page, data, number, len(pages))
    prov = data.provenance
    buffer = io.BytesIO()
    metadata = {
        "Title": f"sct-node QA report, job {prov.job_id}: synthetic CT",
        "Subject": "Quality assurance of a synthetic CT computed from MR; HU values are predicted, not measured",
        "Creator": "sct-node",
        "Keywords": f"synthetic CT; sCT; QA; {data.outcome.verdict}",
        "Producer": f"sct-node {__version__} (matplotlib {matplotlib.__version__})",
    }
    if pdf:
        with PdfPages(buffer, metadata=metadata) as document:
            for page in pages:
                document.savefig(page.figure)
    pngs = []
    for page in pages if png else ():
        image = io.BytesIO()
        page.figure.savefig(image, format="png", dpi=PNG_DPI, facecolor="white")
        pngs.append(image.getvalue())
    return RenderedReport(pdf=buffer.getvalue(), pages_png=tuple(pngs))


def _place(pages: list[_Page], block: _Block, data: ReportData) -> None:
    """Draws ``block`` on the last page, or on a new one when asked or when it does not fit."""
    page = pages[-1]
    if block.new_page or (block.height > page.room() and page.y > MARGIN_TOP + 0.6):
        pages.append(_Page())
        page = pages[-1]
        _running_header(page, data)
        if block.continued is not None:
            block.continued(page)
    block.draw(page)
    page.y += block.height


# --- page 1: what happened --------------------------------------------------------------------------------


def _status(data: ReportData, review: Review | None) -> tuple[str, str]:
    """The status word and its colour: the review's decision when there is one, else the policy's."""
    if review is not None:
        word = clean_text(review.decision, 32).upper()
        return word, VERDICT_COLOURS[PASS] if word.startswith("RELEASE") else VERDICT_COLOURS[FAIL]
    decision = clean_text(data.decision.split(":")[0], 32)  # "held for a physicist's review: not sent..."
    lowered = decision.lower()
    if lowered.startswith("sent"):
        colour = VERDICT_COLOURS[PASS]
    elif lowered.startswith("held"):
        colour = VERDICT_COLOURS[WARN]
    else:
        colour = VERDICT_COLOURS[FAIL]
    return decision.upper(), colour


def _is_demo(data: ReportData) -> bool:
    return "demo" in data.provenance.model_name.lower()


def _header_block(data: ReportData, review: Review | None, measure: _Measure) -> _Block:
    prov = data.provenance
    status, status_colour = _status(data, review)
    subtitle = (
        f"Patient {clean_text(prov.patient_name, 64)} ({clean_text(prov.patient_id, 64)})  ·  "
        f"MR “{clean_text(prov.mr_series_description, 64)}”  ·  job {prov.job_id}"
    )
    subtitle_lines = measure.wrap(subtitle, CONTENT_W, 9.0, max_lines=2)
    policy_text = (
        f"Policy decision: {clean_text(data.decision, 80)}  (route “{clean_text(prov.route, 64)}”, "
        f"policy {clean_text(prov.qa_policy, 32)})"
    )
    policy_lines = measure.wrap(policy_text, CONTENT_W, 8.5, max_lines=2)
    review_lines: list[str] = []
    heading_lines: list[str] = []
    if review is not None:
        reason = clean_text(review.reason, 600) or "(no reason given)"
        review_lines = measure.wrap(f"Reason: {reason}", CONTENT_W - 0.3, 8.5, max_lines=6)
        heading = f"Review: {_status(data, review)[0]} by {clean_text(review.by, 64)}, {_when(review.at_utc)}"
        heading_lines = measure.wrap(heading, CONTENT_W - 0.3, 10.5, weight="bold", max_lines=2)
    verdict = data.outcome.verdict
    verdict_lines = measure.wrap(data.outcome.verdict_line(), CONTENT_W - 2.2, 8.5, max_lines=2)
    height = 0.42 + 0.17 * len(subtitle_lines) + (0.2 if _is_demo(data) else 0.0) + 0.1 + 0.15 * len(policy_lines)
    review_height = 0.16 + 0.2 * len(heading_lines) + 0.16 * len(review_lines)
    height += (review_height + 0.08) if review is not None else 0.0
    height += 0.5 + 0.15 * max(0, len(verdict_lines) - 1) + 0.12

    def draw(page: _Page) -> None:
        y = page.y
        page.text(MARGIN_X, y, "Synthetic CT — QA report", size=17, weight="bold")
        page.text(
            PAGE_W - MARGIN_X, y + 0.02, f" {status} ", size=10.5, weight="bold", colour="white", ha="right",
            bbox={"boxstyle": "round,pad=0.35", "facecolor": status_colour, "edgecolor": "none"},
        )  # fmt: skip
        y += 0.42
        for line in subtitle_lines:
            page.text(MARGIN_X, y, line, size=9, colour=MUTED)
            y += 0.17
        if _is_demo(data):
            page.text(
                MARGIN_X, y + 0.02, "Demo model: not for clinical use unless validated", size=8.5, weight="bold",
                colour=VERDICT_COLOURS[FAIL],
            )  # fmt: skip
            y += 0.2
        for line in policy_lines:
            page.text(MARGIN_X, y + 0.04, line, size=8.5)
            y += 0.15
        y += 0.1
        if review is not None:
            colour = _status(data, review)[1]
            tint = VERDICT_TINTS[PASS] if colour == VERDICT_COLOURS[PASS] else VERDICT_TINTS[FAIL]
            page.box(MARGIN_X, y + 0.04, CONTENT_W, review_height, fill=tint, edge=colour, linewidth=1.2)
            page.box(MARGIN_X, y + 0.04, 0.08, review_height, fill=colour)
            line_y = y + 0.12
            for line in heading_lines:
                page.text(MARGIN_X + 0.2, line_y, line, size=10.5, weight="bold", colour=colour)
                line_y += 0.2
            for line in review_lines:
                page.text(MARGIN_X + 0.2, line_y + 0.04, line, size=8.5)
                line_y += 0.16
            y += review_height + 0.08
        # Overall verdict
        colour = VERDICT_COLOURS.get(verdict, VERDICT_COLOURS[FAIL])
        box_height = 0.4 + 0.15 * max(0, len(verdict_lines) - 1)
        page.box(MARGIN_X, y + 0.06, CONTENT_W, box_height, fill=VERDICT_TINTS.get(verdict, "#ffffff"))
        page.box(MARGIN_X, y + 0.06, 1.9, box_height, fill=colour)
        page.text(
            MARGIN_X + 0.95, y + 0.06 + box_height / 2, f"QA VERDICT: {verdict.upper()}", size=11, weight="bold",
            colour="white", ha="center", va="center",
        )  # fmt: skip
        for number, line in enumerate(verdict_lines):
            page.text(MARGIN_X + 2.05, y + 0.16 + 0.15 * number, line, size=8.5)

    return _Block(height, draw)


# The checks table: (title, width in inches); the notes take what is left.
_COLUMNS = (("Check", 1.25), ("Quantity", 1.2), ("Value", 0.72), ("Levels", 1.25), ("Verdict", 0.55))
_TABLE_SIZE, _LINE = 7.3, 0.135
_PAD = 0.05


def _checks_blocks(data: ReportData, measure: _Measure) -> list[_Block]:
    """The checks table: one block per check (a page break falls between checks, and the next page
    repeats the column titles); the section title and column titles stay with the first check."""
    notes_width = CONTENT_W - sum(width for _, width in _COLUMNS)
    widths = [width for _, width in _COLUMNS] + [notes_width]
    lefts = [MARGIN_X + sum(widths[:i]) for i in range(len(widths))]
    header_height = _LINE + 2 * _PAD
    title_height = 0.32
    footnote = "A quantity warns or fails when its value is beyond a level (> higher is worse, < lower is worse)."
    footnote_height = 0.3

    def draw_title_and_header(page: _Page, title: str) -> None:
        page.text(MARGIN_X, page.y, title, size=11, weight="bold")
        y = page.y + title_height
        page.box(MARGIN_X, y, CONTENT_W, header_height, fill=HEADER_BG)
        for (column_title, _), left in zip((*_COLUMNS, ("Notes", 0.0)), lefts, strict=True):
            page.text(left + _PAD, y + _PAD, column_title, size=_TABLE_SIZE, weight="bold", colour=MUTED)
        page.rule(y + header_height, colour="#8c959f", linewidth=0.8)
        page.y += title_height + header_height

    def group_block(check: CheckResult, *, first: bool, last: bool) -> _Block:
        rows = []
        for m in check.measurements:
            cells = [
                measure.wrap(m.quantity, widths[1] - 2 * _PAD, _TABLE_SIZE, max_lines=2),
                measure.wrap(m.value_text(), widths[2] - 2 * _PAD, _TABLE_SIZE, max_lines=2),
                measure.wrap(m.levels_text(), widths[3] - 2 * _PAD, _TABLE_SIZE, max_lines=2),
                measure.wrap(m.note or "", widths[5] - 2 * _PAD, _TABLE_SIZE - 0.5, max_lines=3),
            ]
            rows.append((m, cells, max(len(c) for c in cells) * _LINE + 2 * _PAD))
        name_lines = measure.wrap(CHECK_TITLES.get(check.name, ""), widths[0] - 2 * _PAD - 0.04, 6.6, max_lines=2)
        name_height = (len(name_lines) + 1) * _LINE + 2 * _PAD
        summary_width = CONTENT_W - widths[0] - 2 * _PAD
        summary_lines = measure.wrap(clean_text(check.summary, 300), summary_width, 6.6, max_lines=2)
        summary_height = len(summary_lines) * _LINE + (_PAD if summary_lines else 0.0)
        rows_height = max(name_height - summary_height, sum(h for _, _, h in rows))
        group_height = rows_height + summary_height
        extra_top = title_height + header_height if first else 0.0

        def draw(page: _Page) -> None:
            if first:
                draw_title_and_header(page, "Checks")
            y = page.y
            colour = VERDICT_COLOURS.get(check.verdict, VERDICT_COLOURS[FAIL])
            page.box(MARGIN_X, y, 0.05, group_height, fill=colour)
            page.text(lefts[0] + _PAD + 0.04, y + _PAD, check.name, size=_TABLE_SIZE + 0.4, weight="bold")
            for number, line in enumerate(name_lines):
                page.text(lefts[0] + _PAD + 0.04, y + _PAD + _LINE * (number + 1), line, size=6.6, colour=MUTED)
            row_y = y
            for index, (m, cells, row_height) in enumerate(rows):
                if index == len(rows) - 1:
                    row_height = y + rows_height - row_y  # the last row takes what the check cell needs more
                for column, lines in zip((1, 2, 3, 5), cells, strict=True):
                    size = _TABLE_SIZE - 0.5 if column == 5 else _TABLE_SIZE
                    for number, line in enumerate(lines):
                        page.text(lefts[column] + _PAD, row_y + _PAD + _LINE * number, line, size=size,
                                  colour=MUTED if column == 5 else INK)  # fmt: skip
                verdict_colour = VERDICT_COLOURS.get(m.verdict, VERDICT_COLOURS[FAIL])
                page.box(lefts[4] + 0.03, row_y + 0.03, widths[4] - 0.06, row_height - 0.06, fill=verdict_colour)
                page.text(
                    lefts[4] + widths[4] / 2, row_y + row_height / 2, m.verdict.upper(), size=_TABLE_SIZE,
                    weight="bold", colour="white", ha="center", va="center",
                )  # fmt: skip
                if index < len(rows) - 1:
                    page.rule(row_y + row_height, colour="#eaeef2", linewidth=0.5, x0=lefts[1])
                row_y += row_height
            for number, line in enumerate(summary_lines):
                page.text(lefts[1] + _PAD, y + rows_height + _LINE * number, line, size=6.6, colour=MUTED)
            page.rule(y + group_height)
            if last:
                page.text(MARGIN_X, y + group_height + 0.07, footnote, size=6.5, colour=MUTED)
            page.y -= extra_top  # the caller advances y by the block's whole height

        def continued(page: _Page) -> None:
            draw_title_and_header(page, "Checks (continued)")

        height = extra_top + group_height + (footnote_height if last else 0.0)
        return _Block(height, draw, continued=None if first else continued)

    checks = data.outcome.checks
    if not checks:

        def nothing(page: _Page) -> None:
            page.text(MARGIN_X, page.y, "Checks", size=11, weight="bold")
            page.text(MARGIN_X, page.y + 0.32, "No checks were run.", size=8.5, colour=VERDICT_COLOURS[FAIL])

        return [_Block(0.6, nothing)]
    return [group_block(c, first=i == 0, last=i == len(checks) - 1) for i, c in enumerate(checks)]


def _provenance_block(data: ReportData, measure: _Measure) -> _Block:
    prov = data.provenance
    columns = (
        (
            ("Patient", f"{clean_text(prov.patient_name, 64)}"),
            ("Patient ID", clean_text(prov.patient_id, 64)),
            ("MR series", clean_text(prov.mr_series_description, 64) or "-"),
            ("MR instances", str(prov.mr_instances)),
            ("MR scanner", clean_text(prov.mr_scanner, 64) or "-"),
            ("sCT slices", str(prov.sct_slices)),
            ("Route, policy", f"{clean_text(prov.route, 48)}, {clean_text(prov.qa_policy, 32)}"),
            ("Checks run at", _when(prov.computed_at_utc)),
        ),
        (
            ("Method", clean_text(prov.method, 64)),
            ("Model", f"{clean_text(prov.model_name, 64)} {clean_text(prov.model_version, 64)}"),
            ("Sampler", f"{clean_text(prov.sampler, 32)}, {prov.steps} steps"),
            ("Samples", str(prov.samples)),
            ("Seed", str(prov.seed)),
            ("Device", clean_text(prov.device, 48)),
            ("Job", str(prov.job_id)),
        ),
    )
    identifiers = (
        ("Checkpoint SHA-256", clean_text(prov.checkpoint_sha256, 64) or "none"),
        ("Study UID", clean_text(prov.study_instance_uid, 64)),
        ("MR series UID", clean_text(prov.mr_series_uid, 64)),
        ("sCT series UID", clean_text(prov.sct_series_uid, 64)),
    )
    half = CONTENT_W / 2
    label_w, line_h = 1.0, 0.145
    wrapped = [[(label, measure.wrap(value, half - label_w - 0.15, 7.6, max_lines=2)) for label, value in column]
               for column in columns]  # fmt: skip
    column_heights = [sum(len(lines) * line_h for _, lines in column) for column in wrapped]
    height = 0.32 + max(column_heights) + 0.08 + len(identifiers) * line_h + 0.12

    def draw(page: _Page) -> None:
        y = page.y
        page.text(MARGIN_X, y, "Provenance", size=11, weight="bold")
        y += 0.32
        for index, column in enumerate(wrapped):
            x, row_y = MARGIN_X + index * half, y
            for label, lines in column:
                page.text(x, row_y, label, size=7.6, colour=MUTED)
                for line in lines:
                    page.text(x + label_w, row_y, line, size=7.6)
                    row_y += line_h
        y += max(column_heights) + 0.08
        page.rule(y - 0.02, colour="#eaeef2")
        for label, value in identifiers:
            page.text(MARGIN_X, y + 0.02, label, size=7.6, colour=MUTED)
            page.text(MARGIN_X + 1.3, y + 0.025, value, size=7.3, family=MONO)
            y += line_h

    return _Block(height, draw)


# --- page 2: what it looks like ------------------------------------------------------------------------------


def _planes_block(planes: Planes, measure: _Measure, available_height: float, *, new_page: bool) -> _Block:
    """The three planes, as large as ``available_height`` (inches for the whole block) allows, up
    to ``MAX_PLANES_HEIGHT`` for the images; never under ``MIN_PLANES_HEIGHT``."""
    columns: list[tuple[str, str]] = [
        ("MR", f"window {_number(planes.mr_window[0])} to {_number(planes.mr_window[1])}"),
        ("sCT soft tissue", "W 400 / L 40 HU"),
        ("sCT bone", "W 1800 / L 400 HU"),
    ]
    if planes.std is not None:
        columns.append(("Uncertainty (SD)", "over the samples, HU"))
    label_w, gap = 0.28, 0.07
    slot_w = (CONTENT_W - label_w - gap * (len(columns) - 1)) / len(columns)
    # One scale for every plane (inches per pixel), so that a centimetre is as long in each of them.
    scale = min(slot_w, 2.2) / max(plane.shape[1] for plane in planes.sct)
    colourbar_h = 0.5 if planes.std is not None else 0.0
    fixed_h = 0.32 + 0.36 + gap * 2 + colourbar_h + 0.42  # titles, gaps, colour bar, caption
    images_h = min(MAX_PLANES_HEIGHT, max(MIN_PLANES_HEIGHT, available_height - fixed_h))
    rows = [plane.shape[0] for plane in planes.sct]
    scale = min(scale, images_h / sum(rows))
    thin = [r * scale < MIN_ROW_H for r in rows]  # a thin plane's row is MIN_ROW_H high; the others share the rest
    if any(thin) and not all(thin):
        others = sum(r for r, is_thin in zip(rows, thin, strict=True) if not is_thin)
        scale = min(scale, (images_h - MIN_ROW_H * sum(thin)) / others)
    sizes = [(plane.shape[1] * scale, plane.shape[0] * scale) for plane in planes.sct]
    heights = [max(height, MIN_ROW_H) for _, height in sizes]
    caption = (
        f"Planes through the body's centre of mass, {planes.pixel_mm:.2g} mm pixels. Axial seen from the feet "
        "(anterior up, patient's left on the right); coronal from the front and sagittal from the patient's left "
        f"(head up). Cyan: the MR's body outline."
    )
    height = fixed_h + sum(heights)
    std_top = _std_display_max(planes)

    def draw(page: _Page) -> None:
        y = page.y
        page.text(MARGIN_X, y, "MR, synthetic CT and its uncertainty", size=11, weight="bold")
        y += 0.32
        x0 = MARGIN_X + label_w
        for index, (title, subtitle) in enumerate(columns):
            x = x0 + index * (slot_w + gap) + slot_w / 2
            page.text(x, y, title, size=8.2, weight="bold", ha="center")
            page.text(x, y + 0.16, subtitle, size=6.6, colour=MUTED, ha="center")
        y += 0.36
        image = None
        for plane_index, (name, row_h) in enumerate(zip(("Axial", "Coronal", "Sagittal"), heights, strict=True)):
            page.text(MARGIN_X + 0.1, y + row_h / 2, name, size=8, weight="bold", colour=MUTED, ha="center",
                      va="center", rotation=90)  # fmt: skip
            for index in range(len(columns)):
                width, height = sizes[plane_index]
                axes = page.axes(
                    x0 + index * (slot_w + gap) + (slot_w - width) / 2, y + (row_h - height) / 2, width, height
                )
                axes.set_facecolor("black")
                axes.set_xticks([])
                axes.set_yticks([])
                for spine in axes.spines.values():
                    spine.set_visible(False)
                body = planes.body[plane_index]
                if index == 0:
                    low, high = planes.mr_window
                    axes.imshow(planes.mr[plane_index], cmap="gray", vmin=low, vmax=high, interpolation="bilinear")
                    _orientation_letters(axes, plane_index)
                elif index in (1, 2):
                    level, width = SOFT_TISSUE_WINDOW if index == 1 else BONE_WINDOW
                    axes.imshow(planes.sct[plane_index], cmap="gray", vmin=level - width / 2, vmax=level + width / 2,
                                interpolation="bilinear")  # fmt: skip
                    if body.any() and not body.all():
                        axes.contour(body.astype(np.float32), levels=[0.5], colors=BODY_OUTLINE, linewidths=0.5)
                elif planes.std is not None:
                    image = axes.imshow(planes.std[plane_index], cmap=UNCERTAINTY_COLOURMAP, vmin=0.0, vmax=std_top,
                                        interpolation="bilinear")  # fmt: skip
                axes.set_aspect("equal")
            y += row_h + gap
        if image is not None:
            x = x0 + (len(columns) - 1) * (slot_w + gap)
            colourbar_axes = page.axes(x + 0.12, y + 0.04, slot_w - 0.24, 0.1)
            colourbar = page.figure.colorbar(image, cax=colourbar_axes, orientation="horizontal")
            colourbar.ax.tick_params(labelsize=6, length=2, pad=1)
            colourbar.set_label("SD in HU", fontsize=6.5, labelpad=1, parse_math=False)
            y += colourbar_h
        for number, line in enumerate(measure.wrap(caption, CONTENT_W, 6.8, max_lines=3)):
            page.text(MARGIN_X, y + 0.02 + 0.13 * number, line, size=6.8, colour=MUTED)

    return _Block(height, draw, new_page=new_page)


def _std_display_max(planes: Planes) -> float:
    if planes.std is None:
        return 1.0
    values = np.concatenate([s[b] for s, b in zip(planes.std, planes.body, strict=True)])
    if values.size < 16:
        values = np.concatenate([s.ravel() for s in planes.std])
    top = float(np.percentile(values, 99)) if values.size else 1.0
    return top if math.isfinite(top) and top > 0 else 1.0


def _orientation_letters(axes: matplotlib.axes.Axes, plane_index: int) -> None:
    """Patient directions at the edges (top, bottom, left, right) of the plane."""
    letters = (("A", "P", "R", "L"), ("H", "F", "R", "L"), ("H", "F", "A", "P"))[plane_index]
    positions = ((0.5, 0.98, "center", "top"), (0.5, 0.02, "center", "bottom"), (0.02, 0.5, "left", "center"),
                 (0.98, 0.5, "right", "center"))  # fmt: skip
    for letter, (x, y, ha, va) in zip(letters, positions, strict=True):
        axes.text(x, y, letter, transform=axes.transAxes, ha=ha, va=va, fontsize=6.5, color="#ffd54f",
                  fontweight="bold", parse_math=False)  # fmt: skip


def _histogram_block(data: ReportData, measure: _Measure) -> _Block:
    tissues = data.tissues
    table_w = 3.21
    plot_w = CONTENT_W - table_w - 0.55
    plot_h = 2.3
    row_h = 0.17
    height = 0.32 + max(plot_h + 0.45, 0.2 + row_h * (len(tissues) + 1) + 0.3) + 0.1

    def draw(page: _Page) -> None:
        y = page.y
        page.text(MARGIN_X, y, "HU histogram inside the body", size=11, weight="bold")
        y += 0.32
        axes = page.axes(MARGIN_X + 0.45, y + 0.05, plot_w, plot_h)
        _draw_histogram(axes, data)
        # The tissue classes
        x = MARGIN_X + CONTENT_W - table_w
        widths = (0.8, 0.75, 0.42, 0.62, 0.62)
        titles = ("Tissue", "HU range", "sCT %", "usual %", "CTs %")
        page.box(x, y + 0.05, table_w, row_h, fill=HEADER_BG)
        for column, title in enumerate(titles):
            left = x + sum(widths[:column])
            page.text(left + (0.14 if column == 0 else 0.03), y + 0.08, title, size=6.8, weight="bold", colour=MUTED)
        row_y = y + 0.05 + row_h
        for index, tissue in enumerate(tissues):
            outside = _outside_training(tissue.sct_percent, tissue.usual_min_percent, tissue.usual_max_percent)
            if outside:
                page.box(x, row_y, table_w, row_h, fill=VERDICT_TINTS[WARN])
            page.box(x + 0.03, row_y + 0.045, 0.08, 0.08, fill=TISSUE_COLOURS[index % len(TISSUE_COLOURS)])
            cells = (
                clean_text(tissue.name, 24),
                f"[{_number(tissue.low_hu)}, {_number(tissue.high_hu)})",
                f"{tissue.sct_percent:.1f}",
                _range(tissue.usual_min_percent, tissue.usual_max_percent),
                _range(tissue.training_min_percent, tissue.training_max_percent),
            )
            for column, cell in enumerate(cells):
                left = x + sum(widths[:column])
                weight = "bold" if outside and column == 2 else "normal"
                colour = VERDICT_COLOURS[WARN] if outside and column == 2 else INK
                page.text(left + (0.14 if column == 0 else 0.03), row_y + 0.03, cell, size=6.8, weight=weight,
                          colour=colour)  # fmt: skip
            row_y += row_h
            page.rule(row_y, colour="#eaeef2", linewidth=0.5, x0=x, x1=x + table_w)
        note = (
            "usual: the range of shares this model gives its training cases (what hu_plausibility judges by); "
            "CTs: the range in the training CTs. Shaded amber: outside the usual range."
        )
        for number, line in enumerate(measure.wrap(note, table_w, 6.5, max_lines=4)):
            page.text(x, row_y + 0.06 + 0.12 * number, line, size=6.5, colour=MUTED)

    return _Block(height, draw)


def _draw_histogram(axes: matplotlib.axes.Axes, data: ReportData) -> None:
    histogram = data.histogram
    edges = np.asarray(histogram.edges_hu, dtype=float)
    sct = np.asarray(histogram.sct_percent, dtype=float)
    if len(edges) < 2 or len(sct) != len(edges) - 1 or not np.all(np.isfinite(edges)):
        axes.set_axis_off()
        axes.text(0.5, 0.5, "no histogram stored", ha="center", va="center", fontsize=8, color=MUTED,
                  transform=axes.transAxes, parse_math=False)  # fmt: skip
        return
    low, high = float(edges[0]), float(edges[-1])
    for index, tissue in enumerate(data.tissues):
        band_low, band_high = max(tissue.low_hu, low), min(tissue.high_hu, high)
        if band_high > band_low:
            axes.axvspan(band_low, band_high, color=TISSUE_COLOURS[index % len(TISSUE_COLOURS)], alpha=0.13, lw=0)
    if histogram.training_percent is not None and len(histogram.training_percent) == len(sct):
        training = np.asarray(histogram.training_percent, dtype=float)
        axes.stairs(training, edges, fill=True, color="#9aa4ae", alpha=0.45, label="training CTs (mean)")
    if histogram.usual_percent is not None and len(histogram.usual_percent) == len(sct):
        usual = np.asarray(histogram.usual_percent, dtype=float)
        axes.stairs(
            usual, edges, color="#6e7781", linewidth=0.9, linestyle="--", label="this model, training MRs (mean)"
        )
    axes.stairs(sct, edges, color="#0b5cad", linewidth=1.1, label="this sCT")
    axes.set_xlim(low, high)
    axes.set_ylim(bottom=0)
    axes.set_xlabel("HU", fontsize=7.5, labelpad=2)
    axes.set_ylabel("% of body voxels per bin", fontsize=7.5, labelpad=2)
    axes.tick_params(labelsize=6.8, length=2.5)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    axes.grid(axis="y", color="#eaeef2", linewidth=0.5)
    axes.set_axisbelow(True)
    axes.legend(fontsize=6.8, frameon=False, loc="upper right")


def _range(low: float | None, high: float | None) -> str:
    return f"{low:.1f}–{high:.1f}" if low is not None and high is not None else "-"


def _outside_training(value: float, low: float | None, high: float | None) -> bool:
    return (low is not None and value < low) or (high is not None and value > high)


def _running_header(page: _Page, data: ReportData) -> None:
    prov = data.provenance
    text = (
        f"Synthetic CT — QA report  ·  {clean_text(prov.patient_name, 64)} ({clean_text(prov.patient_id, 64)})"
        f"  ·  job {prov.job_id}"
    )
    page.text(MARGIN_X, page.y - 0.05, text, size=8, colour=MUTED)
    page.rule(page.y + 0.17)
    page.y += RUNNING_HEADER_H


def _footer(page: _Page, data: ReportData, number: int, count: int) -> None:
    y = PAGE_H - FOOTER_H + 0.12
    page.rule(y)
    text = f"sct-node QA report — job {data.provenance.job_id} — synthetic CT, not measured — page {number}/{count}"
    page.text(PAGE_W / 2, y + 0.08, text, size=7.5, colour=MUTED, ha="center")
    if _is_demo(data):
        page.text(
            PAGE_W / 2, y + 0.24, "Demo model: not for clinical use unless validated", size=7.5, weight="bold",
            colour=VERDICT_COLOURS[FAIL], ha="center",
        )  # fmt: skip


def _when(iso_text: str) -> str:
    """An ISO 8601 time as "2026-03-04 09:12:00 UTC" (as it is when it cannot be read)."""
    text = clean_text(iso_text, 40)
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    if moment.tzinfo is None:
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: float | None) -> str:
    return "-" if value is None else _three_digits(float(value))


# --- files ---------------------------------------------------------------------------------------------------


def write_report(
    folder: Path, data: ReportData, planes: Planes, review: Review | None = None, *, pages: bool = True
) -> RenderedReport:
    """Store what the report shows (report.json, report-planes.npz) in ``folder`` and write the report
    (report.pdf and, with ``pages``, report-page-<k>.png: ``draw_pages`` draws them later); every file
    atomically."""
    folder = Path(folder)
    rendered = render_report(data, planes, review, png=pages)
    folder.mkdir(parents=True, exist_ok=True)
    if not pages:  # those of an earlier run of the job are not this report's
        for stale in folder.glob(PAGE_PNG.format("*")):
            stale.unlink(missing_ok=True)
    data.save(folder)
    planes.save(folder)
    _write_rendered(folder, rendered)
    return rendered


def redraw_report(folder: Path, review: Review | None) -> RenderedReport:
    """Draw the report in ``folder`` again from its report.json and report-planes.npz, e.g. with the
    review of a held job, and rewrite report.pdf and the page PNGs."""
    folder = Path(folder)
    if not (folder / PLANES_NPZ).is_file():
        raise FileNotFoundError(f"{folder / PLANES_NPZ} not found: the report cannot be drawn again")
    rendered = render_report(ReportData.load(folder), Planes.load(folder), review)
    _write_rendered(folder, rendered)
    return rendered


def draw_pages(folder: Path, review: Review | None = None) -> int:
    """The report's pages as PNG (for the review page), drawn from the stored data when they are not there
    yet (a job's report is written as PDF first, so that the sCT goes out sooner); returns how many."""
    folder = Path(folder)
    existing = sorted(folder.glob(PAGE_PNG.format("*")))
    if existing:
        return len(existing)
    rendered = render_report(ReportData.load(folder), Planes.load(folder), review, pdf=False)
    _write_rendered(folder, rendered)
    return len(rendered.pages_png)


def _write_rendered(folder: Path, rendered: RenderedReport) -> None:
    for number, png in enumerate(rendered.pages_png, start=1):
        write_atomically(folder / PAGE_PNG.format(number), png)
    if rendered.pdf:
        write_atomically(folder / REPORT_PDF, rendered.pdf)
    if not rendered.pages_png:
        return
    for stale in folder.glob(PAGE_PNG.format("*")):
        match = re.fullmatch(PAGE_PNG.format(r"(\d+)").replace(".", r"\."), stale.name)
        if match and int(match.group(1)) > len(rendered.pages_png):
            stale.unlink(missing_ok=True)
