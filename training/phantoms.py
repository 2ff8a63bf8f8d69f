"""Paired MR/CT phantoms with anatomy, in the SynthRAD2025 layout: tests and the demo checkpoint without data.

Each case is a seeded random anatomy of its region, built as a label map in patient space (LPS mm,
axial grid: x to the patient's left, y posterior, z superior), from which both images are made:

- HN: head (scalp, skull with cortical tables and diploe, grey and white matter, ventricles, eyes,
  frontal and maxillary sinuses, nasal cavity, mandible) on a neck (fat, muscle, airway, cervical
  spine with discs, spinal canal and cord).
- TH: torso (subcutaneous fat, muscle), lungs, heart, aorta, trachea, thoracic spine, ribs, sternum.
- AB: torso, liver, spleen, kidneys in perirenal fat, aorta, vena cava, psoas, visceral fat, bowel
  gas, lumbar spine, lower ribs, iliac wings.

Bones are solids whose outer layer is cortical bone and whose inside is marrow (a Euclidean
distance transform), so that cortex lines every bone and cavity wall. The CT gives every tissue a
realistic HU value (varied per case) with a smooth texture, partial-volume blur and noise, clipped
to [-1024, 3071] and stored as int16. The MR is T1-weighted-like: fat and marrow bright, muscle
and fluid darker, and cortical bone, air cavities, lung and outside air all dark, so the MR is not
a function of the CT (bone and air look alike on it, as in real MR); it has its own texture, a
smooth multiplicative bias field, a random gain and Rician noise. The mask is the body.

Sizes and positions are fractions of the field of view drawn per case, so the anatomy scales with
``shape_zyx`` and ``spacing_mm``. The same seed gives the same files; case ``k`` of a region does
not depend on how many cases are generated.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813
from scipy import ndimage

from sct_model.result import HU_MAX, HU_MIN
from sct_model.volume import AXIAL_DIRECTION, Grid, Volume
from training.data import REGIONS_2025, Case

log = logging.getLogger(__name__)

# name: (CT HU, HU texture standard deviation, T1 MR intensity in arbitrary units)
TISSUES: dict[str, tuple[float, float, float]] = {
    "air": (-1000.0, 0.0, 0.0),
    "fat": (-100.0, 8.0, 900.0),
    "muscle": (50.0, 6.0, 330.0),
    "soft": (35.0, 6.0, 400.0),
    "liver": (60.0, 5.0, 520.0),
    "spleen": (45.0, 5.0, 340.0),
    "kidney": (32.0, 5.0, 300.0),
    "blood": (40.0, 4.0, 180.0),
    "heart": (40.0, 5.0, 260.0),
    "lung": (-800.0, 35.0, 35.0),
    "cavity": (-1000.0, 0.0, 12.0),
    "cortical": (1400.0, 100.0, 30.0),
    "marrow": (300.0, 50.0, 620.0),
    "disc": (90.0, 8.0, 320.0),
    "csf": (10.0, 3.0, 130.0),
    "cord": (35.0, 4.0, 430.0),
    "grey": (38.0, 3.0, 450.0),
    "white": (28.0, 3.0, 560.0),
    "vitreous": (10.0, 3.0, 100.0),
}
LABELS = {name: index for index, name in enumerate(TISSUES)}


@dataclasses.dataclass(frozen=True)
class Phantom:
    """One phantom case in memory: the MR, CT (HU), body mask and tissue label map (see :data:`LABELS`)."""

    mr: Volume
    ct: Volume
    mask: Volume
    labels: Volume


class _Canvas:
    """Anatomical coordinates (mm, in-plane rotated and shifted per case) and the label map being painted."""

    def __init__(self, grid: Grid, centre_xy: tuple[float, float], angle_rad: float) -> None:
        nz, ny, nx = grid.shape_zyx
        sx, sy, sz = grid.spacing_mm
        x = (np.arange(nx) - (nx - 1) / 2.0) * sx
        y = (np.arange(ny) - (ny - 1) / 2.0) * sy
        self.z = ((np.arange(nz) - (nz - 1) / 2.0) * sz).astype(np.float32)[:, None, None]
        dx, dy = x[None, :] - centre_xy[0], y[:, None] - centre_xy[1]
        cos, sin = np.cos(angle_rad), np.sin(angle_rad)
        self.x = (cos * dx + sin * dy).astype(np.float32)[None]  # (1, ny, nx)
        self.y = (-sin * dx + cos * dy).astype(np.float32)[None]
        self.half = np.array([nx * sx, ny * sy, nz * sz]) / 2.0  # half field of view (x, y, z), mm
        self.spacing_zyx = (sz, sy, sx)
        self.min_spacing, self.max_spacing = min(grid.spacing_mm), max(grid.spacing_mm)
        self.shape = grid.shape_zyx
        self.labels = np.zeros(self.shape, dtype=np.uint8)
        self.bone = np.zeros(self.shape, dtype=bool)  # bone solids, split into cortex and marrow at the end
        self.after_bone: list[tuple[np.ndarray, str]] = []  # painted over the bone (cavities, eyes)

    def full(self, mask: np.ndarray) -> np.ndarray:
        return np.broadcast_to(mask, self.shape)

    def paint(self, mask: np.ndarray, tissue: str) -> None:
        self.labels[self.full(mask)] = LABELS[tissue]

    def is_(self, *tissues: str) -> np.ndarray:
        return np.isin(self.labels, [LABELS[t] for t in tissues])

    def ellipsoid(self, centre: Sequence[float], semi: Sequence[float] | np.ndarray) -> np.ndarray:
        r2 = ((self.x - centre[0]) / semi[0]) ** 2 + ((self.y - centre[1]) / semi[1]) ** 2
        return self.full(r2 + ((self.z - centre[2]) / semi[2]) ** 2 <= 1.0)

    def cylinder(self, centre_xy: Sequence[float], semi_xy: Sequence[float], z_range: Sequence[float]) -> np.ndarray:
        disc = ((self.x - centre_xy[0]) / semi_xy[0]) ** 2 + ((self.y - centre_xy[1]) / semi_xy[1]) ** 2 <= 1.0
        return self.full(disc & (self.z >= z_range[0]) & (self.z <= z_range[1]))

    def box(self, x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> np.ndarray:
        inside_xy = (self.x >= x[0]) & (self.x <= x[1]) & (self.y >= y[0]) & (self.y <= y[1])
        return self.full(inside_xy & (self.z >= z[0]) & (self.z <= z[1]))

    def finish(self, body: np.ndarray, cortex_mm: float) -> None:
        """Split the bone solids (less what is painted over them) into cortex and marrow, paint what goes over
        the bone, and leave air outside the body."""
        over = np.zeros(self.shape, dtype=bool)
        for mask, _ in self.after_bone:
            over |= mask
        solid = self.bone & ~over
        depth_mm = ndimage.distance_transform_edt(solid, sampling=self.spacing_zyx)
        cortex = solid & (depth_mm <= max(cortex_mm, 1.01 * self.min_spacing))
        self.paint(solid & ~cortex, "marrow")
        self.paint(cortex, "cortical")
        for mask, tissue in self.after_bone:
            self.paint(mask, tissue)
        self.labels[~body] = LABELS["air"]


def _spine(
    c: _Canvas,
    rng: np.random.Generator,
    *,
    y0: float,
    radius: float,
    z_range: tuple[float, float],
) -> None:
    """Vertebral bodies between discs, pedicles, arches and spinous processes around a canal with the cord."""
    period = 2.0 * c.half[2] / rng.uniform(3.5, 5.5)
    segment = ((c.z - z_range[0] + rng.uniform(0.0, period)) % period) >= 0.22 * period  # False: disc level
    column = c.cylinder((0.0, y0), (radius * 1.1, radius), z_range)
    c.paint(column & ~segment, "disc")
    canal_r = 0.45 * radius
    canal_y = y0 + radius + 1.1 * canal_r
    arch_t = max(2.0 * c.max_spacing, 0.35 * canal_r)
    canal = c.cylinder((0.0, canal_y), (canal_r, canal_r), z_range)
    arch = c.cylinder((0.0, canal_y), (canal_r + arch_t,) * 2, z_range) & ~canal & (c.y >= canal_y - 0.3 * canal_r)
    pedicles = c.box((-0.8 * radius, 0.8 * radius), (y0, canal_y), z_range) & ~canal
    spinous = c.box((-0.3 * arch_t, 0.3 * arch_t), (canal_y, canal_y + canal_r + 2.5 * arch_t), z_range)
    c.bone |= (column | arch | pedicles | spinous) & segment
    c.paint(canal, "csf")
    c.paint(c.cylinder((0.0, canal_y), (0.55 * canal_r,) * 2, z_range), "cord")


def _torso(c: _Canvas, rng: np.random.Generator, region: str) -> np.ndarray:
    """Thorax or abdomen; returns the body mask."""
    hx, hy, hz = c.half
    a = rng.uniform(0.72, 0.86) * hx
    b = rng.uniform(0.52, 0.62 if region == "TH" else 0.70) * hy
    taper = 1.0 + rng.uniform(-0.08, 0.08) * c.z / hz
    radius = np.sqrt((c.x / (a * taper)) ** 2 + (c.y / (b * taper)) ** 2)
    depth = (1.0 - radius) * b * taper  # approximate depth below the skin, mm
    body = c.full(depth >= 0)
    t_fat = max(rng.uniform(0.06, 0.12 if region == "TH" else 0.20) * b, 1.5 * c.max_spacing)
    t_muscle = max(rng.uniform(0.07, 0.11) * b, 3.0 * c.max_spacing)
    inner = t_fat + t_muscle
    c.paint(body, "soft")
    c.paint(body & (depth < inner), "muscle")
    c.paint(body & (depth < t_fat), "fat")
    a_in, b_in = a - inner, b - inner
    interior = c.full(depth > inner)
    rib_t = max(2.0 * c.max_spacing, 0.5 * t_muscle)
    spine_r = (0.14 if region == "TH" else 0.18) * b_in
    spine_y = b_in - 2.4 * spine_r
    z_all = (-hz - 1.0, hz + 1.0)
    if region == "TH":
        for side in (-1.0, 1.0):
            centre = (side * 0.48 * a_in, rng.uniform(-0.05, 0.1) * b_in, rng.uniform(-0.2, 0.2) * hz)
            semi = np.array([0.40 * a_in, 0.75 * b_in, 1.3 * hz]) * [
                rng.uniform(0.9, 1.05),
                rng.uniform(0.9, 1.05),
                1.0,
            ]
            c.paint(c.ellipsoid(centre, semi) & c.full(depth > inner + 0.3 * t_muscle), "lung")
        heart_c = (rng.uniform(0.05, 0.18) * a_in, -0.25 * b_in, rng.uniform(-0.6, -0.3) * hz)
        heart_s = np.array([0.30 * a_in, 0.38 * b_in, 0.45 * hz]) * rng.uniform(0.85, 1.1)
        c.paint(c.ellipsoid(heart_c, heart_s) & interior, "heart")
        c.paint(c.cylinder((-0.12 * a_in, spine_y - 1.4 * spine_r), (0.08 * b_in,) * 2, z_all), "blood")
        trachea_r = max(rng.uniform(0.06, 0.09) * b_in, 1.5 * c.max_spacing)
        trachea_z = (rng.uniform(0.2, 0.4) * hz, hz + 1.0)
        c.after_bone.append((c.cylinder((0.0, -0.05 * b_in), (trachea_r,) * 2, trachea_z), "cavity"))
        rib_z = (-hz, hz)
        c.bone |= c.box((-0.1 * a, 0.1 * a), (-b, 0.0), z_all) & c.full(
            (depth > t_fat) & (depth < t_fat + 1.4 * rib_t)
        )  # sternum
    else:
        liver_c = (-0.42 * a_in, -0.05 * b_in, rng.uniform(0.1, 0.5) * hz)
        liver_s = np.array([0.52 * a_in, 0.62 * b_in, 0.8 * hz]) * rng.uniform(0.85, 1.1)
        c.paint(c.ellipsoid(liver_c, liver_s) & interior, "liver")
        spleen_s = np.array([0.18 * a_in, 0.28 * b_in, 0.35 * hz]) * rng.uniform(0.8, 1.2)
        c.paint(c.ellipsoid((0.58 * a_in, 0.25 * b_in, rng.uniform(0.1, 0.5) * hz), spleen_s) & interior, "spleen")
        kidney_z = rng.uniform(-0.3, 0.1) * hz
        for side in (-1.0, 1.0):
            centre = (side * 0.36 * a_in, spine_y, kidney_z + rng.uniform(-0.08, 0.08) * hz)
            semi = np.array([0.13 * a_in, 0.20 * b_in, 0.35 * hz]) * rng.uniform(0.85, 1.15)
            c.paint(c.ellipsoid(centre, semi * 1.35) & interior, "fat")
            c.paint(c.ellipsoid(centre, semi) & interior, "kidney")
            c.paint(c.cylinder((side * 0.2 * a_in, spine_y), (0.1 * a_in, 0.9 * spine_r), z_all), "muscle")  # psoas
        c.paint(c.cylinder((0.12 * a_in, spine_y - 1.5 * spine_r), (0.09 * b_in,) * 2, z_all), "blood")  # aorta
        c.paint(c.cylinder((-0.15 * a_in, spine_y - 1.5 * spine_r), (0.1 * b_in, 0.08 * b_in), z_all), "blood")
        for _ in range(rng.integers(3, 7)):  # visceral fat
            centre = (
                rng.uniform(-0.4, 0.6) * a_in,
                rng.uniform(-0.7, 0.2) * b_in,
                rng.uniform(-0.9, 0.5) * hz,
            )
            blob = c.ellipsoid(centre, rng.uniform(0.08, 0.2, size=3) * np.array([a_in, b_in, hz]))
            c.paint(blob & c.is_("soft"), "fat")
        for _ in range(rng.integers(2, 7)):  # bowel gas, surrounded by bowel wall (soft tissue)
            centre = (
                rng.uniform(-0.5, 0.6) * a_in,
                rng.uniform(-0.7, 0.1) * b_in,
                rng.uniform(-0.8, 0.3) * hz,
            )
            semi = np.maximum(rng.uniform(0.08, 0.18, size=3) * b_in, 1.5 * c.max_spacing)
            gas = c.ellipsoid(centre, semi) & c.is_("soft", "fat")
            c.after_bone.append((gas, "cavity"))
        pelvis_top = rng.uniform(-0.45, -0.15) * hz
        for side in (-1.0, 1.0):
            centre = (side * 0.5 * a_in, 0.35 * b_in, pelvis_top - 0.9 * hz)
            semi = np.array([0.42 * a_in, 0.38 * b_in, 0.9 * hz])
            thickness = max(3.0 * c.max_spacing, 0.08 * a_in)
            shell = c.ellipsoid(centre, semi) & ~c.ellipsoid(centre, semi - thickness)
            c.bone |= shell & c.full((side * c.x > 0.2 * a_in) & (c.y > -0.1 * b_in)) & interior
        rib_z = (rng.uniform(0.3, 0.6) * hz, hz)
    period = 2.0 * hz / rng.uniform(4.0, 6.0)
    rib_h = max(1.6 * c.spacing_zyx[0], 0.3 * period)
    rib_band = c.full((depth > t_fat + 0.25 * t_muscle) & (depth < t_fat + 0.25 * t_muscle + rib_t))
    rib_level = c.full(
        np.abs((c.z - 0.25 * period * c.y / b + rng.uniform(0, period)) % period - period / 2) < rib_h / 2
    )
    not_front = c.full(~((np.abs(c.x) < 0.15 * a) & (c.y < 0))) if region == "TH" else c.full(np.abs(c.x) > 0.45 * a)
    c.bone |= rib_band & rib_level & not_front & c.full((c.z >= rib_z[0]) & (c.z <= rib_z[1]))
    _spine(c, rng, y0=spine_y, radius=spine_r, z_range=z_all)
    return body


def _head_neck(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Head on a neck; returns the body mask."""
    hx, hy, hz = c.half
    zc = rng.uniform(0.15, 0.3) * hz
    ah, bh = rng.uniform(0.60, 0.72) * hx, rng.uniform(0.72, 0.84) * hy
    ch = min(rng.uniform(0.62, 0.72) * hz, 0.95 * hz - zc)
    head_r = np.sqrt((c.x / ah) ** 2 + (c.y / bh) ** 2 + ((c.z - zc) / ch) ** 2)
    head_depth = (1.0 - head_r) * min(ah, bh, ch)
    an, bn = rng.uniform(0.40, 0.50) * hx, rng.uniform(0.42, 0.52) * hy
    yn = rng.uniform(0.0, 0.1) * hy
    neck_r = np.sqrt((c.x / an) ** 2 + ((c.y - yn) / bn) ** 2)
    neck_depth = np.where(c.z <= zc, (1.0 - neck_r) * min(an, bn), -np.inf)
    depth = np.maximum(head_depth, neck_depth)
    body = c.full(depth >= 0)
    t_skin = max(rng.uniform(0.04, 0.07) * min(ah, bh), 1.5 * c.max_spacing)
    t_skull = max(rng.uniform(0.06, 0.09) * min(ah, bh), 3.0 * c.max_spacing)
    z_base = zc - rng.uniform(0.15, 0.3) * ch  # skull base: brain above, face below
    c.paint(body, "muscle")
    c.paint(body & c.full(depth < t_skin), "fat")
    inside_skull = c.full((head_depth > t_skin + t_skull) & (c.z > z_base))
    c.bone |= c.full((head_depth > t_skin) & (c.z > z_base - t_skull)) & ~inside_skull
    c.paint(inside_skull, "grey")
    c.paint(c.full((head_depth > t_skin + t_skull + 0.12 * min(ah, bh)) & (c.z > z_base + 0.1 * ch)), "white")
    for side in (-1.0, 1.0):
        centre = (side * 0.12 * ah, -0.05 * bh, zc + 0.1 * ch)
        c.paint(c.ellipsoid(centre, (0.07 * ah, 0.25 * bh, 0.15 * ch)) & inside_skull, "csf")
        eye_r = 0.11 * min(ah, bh)
        eye_c = (side * 0.33 * ah, -(bh - t_skin - 1.1 * eye_r), z_base + 0.05 * ch)
        c.after_bone.append((c.ellipsoid(eye_c, (eye_r,) * 3) & body, "vitreous"))
        sinus_c = (side * 0.25 * ah, -0.55 * bh, z_base - 0.3 * ch)
        sinus_s = np.array([0.14 * ah, 0.18 * bh, 0.15 * ch]) * rng.uniform(0.8, 1.2)
        maxilla = c.ellipsoid(sinus_c, sinus_s + t_skull / 2) & c.full(depth > t_skin)
        c.bone |= maxilla  # its wall is what the carved sinus leaves
        c.after_bone.append((c.ellipsoid(sinus_c, sinus_s), "cavity"))
    frontal = c.ellipsoid((0.0, -0.82 * bh, z_base + 0.3 * ch), (0.15 * ah, 0.06 * bh, 0.08 * ch))
    c.after_bone.append((frontal & c.full(head_depth > t_skin), "cavity"))
    nasal = c.ellipsoid((0.0, -0.62 * bh, z_base - 0.2 * ch), (0.06 * ah, 0.22 * bh, 0.2 * ch))
    c.after_bone.append((nasal & body, "cavity"))
    mandible_z = (z_base - 0.8 * ch, z_base - 0.55 * ch)
    thickness = max(2.5 * c.max_spacing, 0.07 * ah)
    outer = c.cylinder((0.0, -0.05 * bh), (0.78 * ah, 0.85 * bh), mandible_z)
    inner = c.cylinder((0.0, -0.05 * bh), (0.78 * ah - thickness, 0.85 * bh - thickness), mandible_z)
    c.bone |= outer & ~inner & c.full((c.y < 0.15 * bh) & (depth > t_skin))
    airway_r = max(rng.uniform(0.06, 0.09) * min(an, bn), 1.5 * c.max_spacing)
    c.after_bone.append((c.cylinder((0.0, yn - 0.25 * bn), (airway_r,) * 2, (-hz - 1, z_base - 0.3 * ch)), "cavity"))
    spine_r = 0.17 * min(an, bn)
    _spine(c, rng, y0=yn + 0.25 * bn, radius=spine_r, z_range=(-hz - 1.0, z_base - 0.35 * ch))
    return body


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], sigma_voxels: float) -> np.ndarray:
    """A smooth random field with zero mean and unit standard deviation (float32)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_voxels)
    return ((field - field.mean()) / max(float(field.std()), 1e-6)).astype(np.float32)


def _bias_field(c: _Canvas, rng: np.random.Generator, strength: float) -> np.ndarray:
    """exp of a random quadratic polynomial of the normalised coordinates (like MONAI's RandBiasField)."""
    u, v, w = c.x / c.half[0], c.y / c.half[1], c.z / c.half[2]
    terms = (u, v, w, u * u, v * v, w * w, u * v, u * w, v * w)
    coefficients = rng.normal(0.0, strength, size=len(terms))
    exponent = sum(k * t for k, t in zip(coefficients, terms, strict=True))
    return np.exp(np.broadcast_to(exponent, c.shape)).astype(np.float32)


def make_phantom(
    region: str,
    *,
    seed: int | Sequence[int] = 0,
    shape_zyx: tuple[int, int, int] = (64, 64, 64),
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0),
) -> Phantom:
    """One phantom of ``region`` ("HN", "TH" or "AB"); ``spacing_mm`` in (x, y, z) order, as in Grid."""
    if region not in REGIONS_2025:
        raise ValueError(f"unknown phantom region {region!r}; known: {', '.join(REGIONS_2025)}")
    if any(int(n) < 16 for n in shape_zyx):
        raise ValueError(f"shape_zyx must be at least 16 voxels per axis, got {shape_zyx}")
    rng = np.random.default_rng(seed)
    size = (int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0]))
    offset = rng.uniform(-10.0, 10.0, size=3)  # the table position: origins differ between cases
    origin = offset - (np.asarray(size) - 1) / 2.0 * np.asarray(spacing_mm, dtype=float)
    grid = Grid(
        size=size,
        spacing_mm=(float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2])),
        origin_mm=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=AXIAL_DIRECTION,
    )
    half = np.asarray(size) * np.asarray(grid.spacing_mm) / 2.0
    shift_x, shift_y = rng.uniform(-0.05, 0.05, 2) * half[:2]
    canvas = _Canvas(grid, (float(shift_x), float(shift_y)), float(np.radians(rng.uniform(-8.0, 8.0))))
    body = _head_neck(canvas, rng) if region == "HN" else _torso(canvas, rng, region)
    canvas.finish(body, cortex_mm=rng.uniform(2.0, 3.5))
    labels = canvas.labels

    # per-case tissue values: HU of lung, bone and marrow vary most, MR contrast varies per tissue
    hu = np.array([v[0] for v in TISSUES.values()], dtype=np.float32)
    hu_texture = np.array([v[1] for v in TISSUES.values()], dtype=np.float32)
    mr = np.array([v[2] for v in TISSUES.values()], dtype=np.float32)
    hu[1:] += rng.normal(0.0, 4.0, size=len(hu) - 1).astype(np.float32)
    hu[LABELS["lung"]] = rng.uniform(-860.0, -740.0)
    hu[LABELS["cortical"]] = rng.uniform(1200.0, 1800.0)
    hu[LABELS["marrow"]] = rng.uniform(200.0, 450.0)
    hu[LABELS["cavity"]] = hu[LABELS["air"]] = -1000.0
    mr[1:] *= rng.uniform(0.9, 1.1, size=len(mr) - 1).astype(np.float32)

    blur = 0.4  # voxels: partial volume
    ct_field = _smooth_field(rng, canvas.shape, 2.0)
    ct_array = ndimage.gaussian_filter(hu[labels] + hu_texture[labels] * ct_field, blur)
    ct_array += rng.normal(0.0, rng.uniform(8.0, 20.0), size=canvas.shape).astype(np.float32)
    ct_array = np.round(np.clip(ct_array, HU_MIN, HU_MAX)).astype(np.int16)

    mr_field = _smooth_field(rng, canvas.shape, 2.5)
    signal = ndimage.gaussian_filter(mr[labels] * (1.0 + 0.05 * mr_field), blur)
    gain = rng.uniform(0.5, 2.0)  # the scanner's arbitrary intensity scale
    signal *= _bias_field(canvas, rng, strength=0.12) * gain
    sigma = rng.uniform(0.01, 0.03) * float(mr[LABELS["fat"]]) * gain
    noise_re, noise_im = rng.normal(0.0, sigma, size=(2, *canvas.shape)).astype(np.float32)
    mr_array = np.sqrt((signal + noise_re) ** 2 + noise_im**2).astype(np.float32)  # Rician

    return Phantom(
        mr=Volume(mr_array, grid),
        ct=Volume(ct_array, grid),
        mask=Volume(body.astype(np.uint8), grid),
        labels=Volume(labels, grid),
    )


def _case_seed(seed: int, region: str, number: int) -> list[int]:
    return [int(seed), zlib.crc32(region.encode()), int(number)]


def _write(volume: Volume, path: Path) -> None:
    sitk.WriteImage(volume.to_image(), str(path), useCompression=True)


def generate_phantoms(
    out_dir: Path,
    n_cases: int,
    *,
    seed: int = 0,
    regions: Sequence[str] = REGIONS_2025,
    shape_zyx: tuple[int, int, int] = (64, 64, 64),
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0),
    write_labels: bool = False,
) -> list[Case]:
    """Write ``n_cases`` phantoms as ``out_dir/Task1/<region>/<case_id>/{mr,ct,mask}.mha``; their cases.

    Cases go to ``regions`` in turn (case ``i`` to ``regions[i % len(regions)]``) and are named like
    SynthRAD's, ``1<region>A<number>`` (``1HNA001``, ``1THA001``, ...). Case ``k`` of a region is
    seeded by (``seed``, region, ``k``). ``write_labels`` adds the tissue label map ``labels.mha``
    (see :data:`LABELS`). Returns the cases sorted like :func:`training.data.find_cases`.
    """
    if n_cases < 1:
        raise ValueError("n_cases must be >= 1")
    regions = list(regions)
    unknown = [region for region in regions if region not in REGIONS_2025]
    if not regions or unknown:
        raise ValueError(f"regions must be among {', '.join(REGIONS_2025)}, got {regions}")
    cases = []
    for index in range(n_cases):
        region, number = regions[index % len(regions)], index // len(regions) + 1
        case_id = f"1{region}A{number:03d}"
        folder = Path(out_dir) / "Task1" / region / case_id
        folder.mkdir(parents=True, exist_ok=True)
        phantom = make_phantom(
            region, seed=_case_seed(seed, region, number), shape_zyx=shape_zyx, spacing_mm=spacing_mm
        )
        paths = {name: folder / f"{name}.mha" for name in ("mr", "ct", "mask")}
        _write(phantom.mr, paths["mr"])
        _write(phantom.ct, paths["ct"])
        _write(phantom.mask, paths["mask"])
        if write_labels:
            _write(phantom.labels, folder / "labels.mha")
        cases.append(Case(case_id, region, paths["mr"], paths["ct"], paths["mask"]))
    log.info("wrote %d phantom case(s) under %s", len(cases), out_dir)
    return sorted(cases, key=lambda case: (case.region, case.case_id))
