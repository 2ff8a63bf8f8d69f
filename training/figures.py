"""Evaluation figures drawn with Pillow alone (no matplotlib needed): box plots and error maps as PNG."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
# anchors of a perceptually ordered black-red-yellow-white map for |sCT - CT|
_HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=float)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = high - low
    step = 10 ** math.floor(math.log10(span / count))
    for factor in (1, 2, 2.5, 5, 10):
        if span / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _tick_label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def boxplot_png(
    path: Path,
    *,
    title: str,
    groups: Sequence[str],
    methods: Sequence[str],
    values: Mapping[tuple[str, str], Sequence[float]],
) -> Path:
    """Box plots (median, quartiles, whiskers at 1.5 IQR, outliers) of ``values[(group, method)]``: a
    panel per group, a box per method, one shared y axis."""
    font, small = _font(15), _font(12)
    finite = [v for vs in values.values() for v in vs if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 1.0, high + 1.0
    margin = 0.06 * (high - low)
    low, high = low - margin, high + margin
    box_w, gap, left, top, plot_h = 34, 16, 70, 60, 320
    panel_w = len(methods) * (box_w + gap) + gap
    width = left + len(groups) * (panel_w + 20) + 10
    height = top + plot_h + 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title, fill="black", font=font)

    def y_of(value: float) -> float:
        return top + plot_h * (high - value) / (high - low)

    for tick in _nice_ticks(low, high):
        y = y_of(tick)
        draw.line([(left - 5, y), (width - 10, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), _tick_label(tick), fill="black", font=small, anchor="rm")
    for g, group in enumerate(groups):
        x0 = left + g * (panel_w + 20)
        draw.rectangle([x0, top, x0 + panel_w, top + plot_h], outline=(120, 120, 120))
        draw.text((x0 + panel_w / 2, top + plot_h + 8), group, fill="black", font=font, anchor="ma")
        for m, method in enumerate(methods):
            data = np.array([v for v in values.get((group, method), []) if math.isfinite(v)], dtype=float)
            if data.size == 0:
                continue
            colour = COLOURS[m % len(COLOURS)]
            cx = x0 + gap + m * (box_w + gap) + box_w / 2
            q1, median, q3 = np.percentile(data, [25, 50, 75])
            iqr = q3 - q1
            inside = data[(data >= q1 - 1.5 * iqr) & (data <= q3 + 1.5 * iqr)]
            lo, hi = float(inside.min()), float(inside.max())
            draw.line([(cx, y_of(lo)), (cx, y_of(q1))], fill=colour, width=2)
            draw.line([(cx, y_of(q3)), (cx, y_of(hi))], fill=colour, width=2)
            for end in (lo, hi):
                draw.line([(cx - box_w / 4, y_of(end)), (cx + box_w / 4, y_of(end))], fill=colour, width=2)
            fill = tuple(int(255 - 0.35 * (255 - c)) for c in colour)
            draw.rectangle([cx - box_w / 2, y_of(q3), cx + box_w / 2, y_of(q1)], fill=fill, outline=colour, width=2)
            draw.line([(cx - box_w / 2, y_of(median)), (cx + box_w / 2, y_of(median))], fill="black", width=2)
            for outlier in data[(data < q1 - 1.5 * iqr) | (data > q3 + 1.5 * iqr)]:
                y = y_of(float(outlier))
                draw.ellipse([cx - 3, y - 3, cx + 3, y + 3], outline=colour, width=1)
    x = left
    for m, method in enumerate(methods):  # legend
        colour = COLOURS[m % len(COLOURS)]
        draw.rectangle([x, top - 22, x + 14, top - 8], fill=colour)
        draw.text((x + 20, top - 15), method, fill="black", font=small, anchor="lm")
        x += 30 + int(draw.textlength(method, font=small))
    image.save(path)
    return Path(path)


def grey(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """``array`` windowed to [low, high] as RGB uint8."""
    unit = np.clip((np.asarray(array, dtype=float) - low) / max(high - low, 1e-9), 0.0, 1.0)
    return np.repeat((unit * 255).astype(np.uint8)[..., None], 3, axis=-1)


def heat(array: np.ndarray, high: float) -> np.ndarray:
    """``array`` in [0, high] through the heat colour map, RGB uint8."""
    position = np.clip(np.asarray(array, dtype=float) / high, 0.0, 1.0) * (len(_HEAT) - 1)
    index = np.minimum(position.astype(int), len(_HEAT) - 2)
    fraction = (position - index)[..., None]
    return (_HEAT[index] * (1 - fraction) + _HEAT[index + 1] * fraction).astype(np.uint8)


def panel_grid_png(
    path: Path,
    *,
    title: str,
    column_titles: Sequence[str],
    rows: Sequence[tuple[str, Sequence[np.ndarray], float]],
    footer: str = "",
    cell_width: int = 220,
) -> Path:
    """A grid of RGB images: ``rows`` of (row title, images, pixel aspect height / width), each image
    scaled to ``cell_width`` pixels wide."""
    font, small = _font(15), _font(12)
    cells = []
    for _, images, aspect in rows:
        row = []
        for rgb in images:
            h, w = rgb.shape[:2]
            size = (cell_width, max(1, int(round(cell_width * h * aspect / w))))
            row.append(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        cells.append(row)
    left, top, pad = 90, 56, 6
    width = left + len(column_titles) * (cell_width + pad) + pad
    heights = [max(cell.height for cell in row) for row in cells]
    height = top + sum(h + pad for h in heights) + (30 if footer else 8)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, 8), title, fill="black", font=font)
    for c, name in enumerate(column_titles):
        draw.text(
            (left + c * (cell_width + pad) + cell_width / 2, top - 8),
            name,
            fill="black",
            font=small,
            anchor="md",
        )
    y = top
    for (row_title, _, _), row, h in zip(rows, cells, heights, strict=True):
        draw.text((pad, y + h / 2), row_title, fill="black", font=small, anchor="lm")
        for c, cell in enumerate(row):
            image.paste(cell, (left + c * (cell_width + pad), y))
        y += h + pad
    if footer:
        draw.text((pad, y + 6), footer, fill="black", font=small)
    image.save(path)
    return Path(path)
