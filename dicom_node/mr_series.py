"""What an MR series is, geometrically: the checks of DESIGN.md §3 and the voxel grid they establish.

A received series becomes a volume only if its instances describe one regular 3D grid: one series,
one SOP class (MR Image Storage or Enhanced MR Image Storage), one frame of reference, one
orientation, one image size and pixel spacing, exactly one slice at each position, positions
evenly spaced along the slice normal with no gaps, no in-plane drift (shear), at least 4 slices
of at least 4 x 4 pixels, and in every file the pixel data its header describes (present, of the
size Rows x Columns x BitsAllocated give, encapsulated exactly when the transfer syntax compresses).
Anything else (4D dynamic or diffusion series, localizers, incomplete transfers, damaged slices)
raises ``SeriesCheckError`` with a reason written for the physicist who reads the quarantine list.

Geometry follows DICOM and SimpleITK (GDCM's IPP sorter): the grid's x axis is the row direction
(ImageOrientationPatient[0:3]), y the column direction (IOP[3:6]), z the slice normal x × y;
slices are sorted by their position along that normal, ascending, and the origin is the
ImagePositionPatient of the first one. PixelSpacing is [between rows, between columns], that is
[y, x].

Tolerances: orientations agree within 1e-3 per IOP component; a slice may sit at most
max(0.01 mm, 1 % of the slice spacing) off the regular grid along the normal, and drift at most
max(0.02 mm, 1 % of the pixel spacing) within the slice plane.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node import sct_writer
from dicom_node.errors import LoadError, SeriesCheckError, WriterError
from dicom_node.spool import UNDEFINED_LENGTH, HeaderError, pixel_data_length
from sct_model.volume import Grid, Vec3, Volume

log = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
ACCEPTED_SOP_CLASSES = {
    MR_IMAGE_STORAGE: "MR Image Storage",
    ENHANCED_MR_IMAGE_STORAGE: "Enhanced MR Image Storage",
}

# The smallest volume the sCT models take: their body mask smooths along each axis, which ITK does
# only with at least 4 voxels (a 3-slice or 3-pixel-wide series passed the checks and then failed
# its job with an internal error; found by tests/reliability/test_fuzz_dicom.py).
MIN_SLICES = 4
MIN_IMAGE_SIZE = 4
ORIENTATION_TOLERANCE = 1e-3
PIXEL_SPACING_TOLERANCE_MM = 1e-4
POSITION_TOLERANCE_MM = 0.01
POSITION_TOLERANCE_FRACTION = 0.01
IN_PLANE_TOLERANCE_MM = 0.02
IN_PLANE_TOLERANCE_FRACTION = 0.01


class SliceRef(NamedTuple):
    """One slice of the volume: a single-frame file, or one frame (1-based) of a multi-frame file."""

    path: Path
    frame_number: int | None
    sop_instance_uid: str
    ipp_mm: Vec3


@dataclasses.dataclass(frozen=True)
class CheckedSeries:
    """A series that passed every check: its identity, its own (possibly oblique) grid and its slices."""

    series_instance_uid: str
    frame_of_reference_uid: str
    grid: Grid
    slices: tuple[SliceRef, ...]  # in spatial order, slices[k] is z index k of the grid
    sop_class_uid: str
    is_enhanced: bool

    @property
    def orientation_label(self) -> str:
        return orientation_label(self.grid.direction_matrix[:, 2])


@dataclasses.dataclass(frozen=True)
class _Frame:
    """The per-slice facts the checks need, from a single-frame instance or one frame of a multi-frame one."""

    path: Path
    frame_number: int | None
    sop_instance_uid: str
    iop: tuple[float, ...]
    ipp_mm: tuple[float, ...]
    pixel_spacing_mm: tuple[float, ...]  # (between rows, between columns) as in DICOM
    rows: int
    columns: int
    temporal_position: str | None = None
    temporal_positions_declared: int | None = None
    b_value: str | None = None
    echo: str | None = None
    image_type: str | None = None


# --------------------------------------------------------------------------------------------- headers


def read_headers(paths: Sequence[Path]) -> list[Dataset]:
    """The headers (no pixel data) of ``paths``; LoadError names the first file that cannot be read."""
    headers: list[Dataset] = []
    for path in paths:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # pydicom raises many types for broken files
            raise LoadError(f"cannot read the DICOM header of {path}: {type(exc).__name__}: {exc}") from exc
    return headers


def orientation_label(normal: Iterable[float]) -> str:
    """'axial', 'coronal' or 'sagittal' (the axis nearest the slice normal); 'oblique ...' beyond 1°."""
    n = np.abs(np.asarray(list(normal), dtype=float))
    axis = int(np.argmax(n))
    name = ("sagittal", "coronal", "axial")[axis]
    angle_deg = math.degrees(math.acos(min(1.0, n[axis] / np.linalg.norm(n))))
    return name if angle_deg <= 1.0 else f"oblique {name}"


# --------------------------------------------------------------------------------------------- checks


def check_series(headers: Sequence[Dataset], paths: Sequence[Path]) -> CheckedSeries:
    """Check that ``headers`` (read from ``paths``, same order) form one regular 3D MR volume.

    Raises SeriesCheckError with the reason when they do not, including when an attribute cannot
    be read at all: pydicom converts values only when they are used, and one with an unknown VR
    or a value its VR cannot hold raises then. Before, that error escaped the check, and the sweep
    tried the series again and again, forever RECEIVING (found by tests/reliability/test_fuzz_dicom.py).
    """
    if len(headers) != len(paths):
        raise ValueError(f"{len(headers)} headers but {len(paths)} paths")
    try:
        return _check_series(headers, paths)
    except SeriesCheckError:
        raise
    except Exception as exc:  # the same files would fail again: quarantine, with the error
        log.warning("series check failed on an unreadable attribute", exc_info=True)
        raise SeriesCheckError(f"a header attribute cannot be read: {type(exc).__name__}: {exc}") from exc


def _check_series(headers: Sequence[Dataset], paths: Sequence[Path]) -> CheckedSeries:
    if not headers:
        raise SeriesCheckError("empty series: no instances")
    sop_class_uid = _check_sop_class(headers)
    series_instance_uid = _single_value(headers, "SeriesInstanceUID", "series")
    # One study and one patient too: a slice whose StudyInstanceUID or PatientID differs from the
    # others' (a damaged header; found by tests/reliability/test_fuzz_dicom.py) passed the check and
    # failed the job in the sCT writer, or would have lent its patient identity to the sCT.
    _single_value(headers, "StudyInstanceUID", "study")
    _check_one_patient(headers)
    frame_of_reference_uid = _single_value(headers, "FrameOfReferenceUID", "frame of reference")
    _check_unique_instances(headers)
    frames = [frame for ds, path in zip(headers, paths, strict=True) for frame in _frames_of(ds, Path(path))]
    _check_image_format(headers, frames)
    row, column, normal = _check_orientation(frames)
    groups = _group_by_position(frames, normal)
    _check_one_slice_per_position(groups, frames)
    ordered = [group[0] for group in groups]
    if len(ordered) < MIN_SLICES:
        raise SeriesCheckError(f"too few slices: {len(ordered)} (a volume needs at least {MIN_SLICES})")
    if min(ordered[0].rows, ordered[0].columns) < MIN_IMAGE_SIZE:
        raise SeriesCheckError(
            f"images too small: {ordered[0].rows} x {ordered[0].columns} pixels "
            f"(a volume needs at least {MIN_IMAGE_SIZE} x {MIN_IMAGE_SIZE})"
        )
    slice_spacing_mm = _check_slice_spacing(ordered, normal)
    _check_in_plane_drift(ordered, row, column)
    _check_pixel_data(headers, paths)
    try:
        sct_writer.check_source_headers(headers)  # what the sCT will copy from the MR can be copied
    except WriterError as exc:
        raise SeriesCheckError(str(exc)) from exc
    first = ordered[0]
    grid = Grid(
        size=(first.columns, first.rows, len(ordered)),
        spacing_mm=(first.pixel_spacing_mm[1], first.pixel_spacing_mm[0], slice_spacing_mm),
        origin_mm=tuple(first.ipp_mm),  # type: ignore[arg-type]
        direction=tuple(np.column_stack([row, column, normal]).ravel()),
    )
    slices = tuple(
        SliceRef(f.path, f.frame_number, f.sop_instance_uid, tuple(f.ipp_mm))  # type: ignore[arg-type]
        for f in ordered
    )
    log.debug("series %s checked: %d %s slices", series_instance_uid, len(slices), orientation_label(normal))
    return CheckedSeries(
        series_instance_uid=series_instance_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        grid=grid,
        slices=slices,
        sop_class_uid=sop_class_uid,
        is_enhanced=sop_class_uid == ENHANCED_MR_IMAGE_STORAGE,
    )


def _sop_class_name(uid: str) -> str:
    name = ACCEPTED_SOP_CLASSES.get(uid) or pydicom.uid.UID(uid).name
    return name if name and name != uid else f"unknown SOP class {uid}"


def _check_sop_class(headers: Sequence[Dataset]) -> str:
    counts = collections.Counter(str(ds.get("SOPClassUID", "")) for ds in headers)
    foreign = [uid for uid in counts if uid not in ACCEPTED_SOP_CLASSES]
    if foreign:
        names = ", ".join(_sop_class_name(uid) if uid else "no SOPClassUID" for uid in sorted(foreign))
        raise SeriesCheckError(f"not an MR image series: {names} (only MR and Enhanced MR Image Storage)")
    if len(counts) > 1:
        parts = ", ".join(f"{_sop_class_name(uid)} ({n})" for uid, n in counts.most_common())
        raise SeriesCheckError(f"mixed SOP classes in one series: {parts}")
    modalities = sorted({str(ds.get("Modality", "")) for ds in headers})
    if modalities != ["MR"]:
        raise SeriesCheckError(f"not an MR series: Modality {', '.join(m or '(empty)' for m in modalities)}")
    return next(iter(counts))


def _single_value(headers: Sequence[Dataset], keyword: str, what: str) -> str:
    counts = collections.Counter(str(ds.get(keyword, "") or "") for ds in headers)
    missing = counts.pop("", 0)
    if missing:
        raise SeriesCheckError(f"no {keyword} in {missing} of {len(headers)} instances")
    if len(counts) > 1:
        sizes = " + ".join(str(n) for n in sorted(counts.values(), reverse=True))
        raise SeriesCheckError(f"more than one {what}: {len(counts)} {keyword}s ({sizes} instances)")
    return next(iter(counts))


def _check_one_patient(headers: Sequence[Dataset]) -> None:
    """Every instance names the same patient (PatientID, which may be empty in all of them)."""
    counts = collections.Counter(str(ds.get("PatientID", "") or "") for ds in headers)
    if len(counts) > 1:
        sizes = " + ".join(str(n) for n in sorted(counts.values(), reverse=True))
        raise SeriesCheckError(f"more than one patient: {len(counts)} PatientIDs ({sizes} instances)")


def _check_unique_instances(headers: Sequence[Dataset]) -> None:
    counts = collections.Counter(str(ds.get("SOPInstanceUID", "")) for ds in headers)
    if "" in counts:
        raise SeriesCheckError(f"no SOPInstanceUID in {counts['']} of {len(headers)} instances")
    repeated = sum(n - 1 for n in counts.values() if n > 1)
    if repeated:
        raise SeriesCheckError(f"the same SOPInstanceUID in more than one file ({repeated} repeated files)")


def _check_image_format(headers: Sequence[Dataset], frames: Sequence[_Frame]) -> None:
    for ds in headers:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", ""))
        if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise SeriesCheckError(
                f"not a greyscale image: {photometric or 'no PhotometricInterpretation'}, {samples} samples per pixel"
            )
    sizes = collections.Counter((f.rows, f.columns) for f in frames)
    if len(sizes) > 1:
        parts = "; ".join(f"{r}x{c} in {_count(n, 'slice')}" for (r, c), n in sizes.most_common())
        raise SeriesCheckError(f"differing image sizes (Rows x Columns): {parts}")
    spacings = _cluster(frames, lambda f: f.pixel_spacing_mm, PIXEL_SPACING_TOLERANCE_MM)
    if len(spacings) > 1:
        parts = "; ".join(f"{_fmt(value)} mm in {_count(len(members), 'slice')}" for value, members in spacings)
        raise SeriesCheckError(f"differing pixel spacings (PixelSpacing): {parts}")


def _check_orientation(frames: Sequence[_Frame]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unit row, column and normal vectors of the one orientation all frames share."""
    orientations = _cluster(frames, lambda f: f.iop, ORIENTATION_TOLERANCE)
    if len(orientations) > 1:
        parts = "; ".join(
            f"{orientation_label(np.cross(value[:3], value[3:]))} [{_fmt(value, 4)}] in {_count(len(members), 'slice')}"
            for value, members in orientations
        )
        raise SeriesCheckError(f"mixed orientations: {len(orientations)} ImageOrientationPatient values: {parts}")
    iop = np.asarray(orientations[0][0], dtype=float)
    row, column = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE
        or abs(np.linalg.norm(column) - 1) > ORIENTATION_TOLERANCE
        or abs(float(row @ column)) > ORIENTATION_TOLERANCE
    ):
        raise SeriesCheckError(f"ImageOrientationPatient is not two orthogonal unit vectors: [{_fmt(iop, 6)}]")
    row = row / np.linalg.norm(row)  # Gram-Schmidt removes the rounding of the DS strings
    column = column - (column @ row) * row
    column = column / np.linalg.norm(column)
    return row, column, np.cross(row, column)


def _position_tolerance_mm(spacing_mm: float) -> float:
    return max(POSITION_TOLERANCE_MM, POSITION_TOLERANCE_FRACTION * spacing_mm)


def _group_by_position(frames: Sequence[_Frame], normal: np.ndarray) -> list[list[_Frame]]:
    """Frames grouped by their position along the normal (within tolerance), groups in ascending order."""
    distances = np.asarray([f.ipp_mm for f in frames], dtype=float) @ normal
    order = np.argsort(distances, kind="stable")
    tolerance = _position_tolerance_mm(float(np.min(frames[0].pixel_spacing_mm)))
    groups: list[list[_Frame]] = []
    previous = -math.inf
    for index in order:
        if distances[index] - previous > tolerance:
            groups.append([])
        groups[-1].append(frames[index])
        previous = distances[index]
    return groups


def _check_one_slice_per_position(groups: Sequence[Sequence[_Frame]], frames: Sequence[_Frame]) -> None:
    counts = [len(group) for group in groups]
    hint = _volume_dimension_hint(frames, with_weak=max(counts) > 1)
    if max(counts) > 1 and min(counts) == max(counts):
        raise SeriesCheckError(
            f"4D series: {counts[0]} volumes at {len(groups)} positions ({hint or 'dynamic/diffusion'})"
        )
    if max(counts) > 1:
        doubled = [i for i, n in enumerate(counts) if n > 1]
        raise SeriesCheckError(
            f"duplicate slice positions: {len(doubled)} of {len(groups)} positions "
            f"{'holds' if len(doubled) == 1 else 'hold'} more than one slice "
            f"(first at slice {doubled[0] + 1}, {counts[doubled[0]]} slices there)" + (f"; {hint}" if hint else "")
        )
    if hint:
        raise SeriesCheckError(f"4D series: {hint}, although each of the {len(groups)} positions holds one slice")


def _volume_dimension_hint(frames: Sequence[_Frame], *, with_weak: bool = True) -> str:
    """What, in the headers, says that the frames belong to several volumes ('' when nothing does).

    Temporal positions and b-values are strong signs of a 4D series on their own; echoes and image
    types (magnitude/phase) only explain slices that share positions (``with_weak``).
    """
    dimensions = [
        ("temporal positions", _distinct(f.temporal_position for f in frames)),
        ("b-values", _distinct(f.b_value for f in frames)),
    ]
    if with_weak:
        dimensions += [
            ("echoes", _distinct(f.echo for f in frames)),
            ("image types", _distinct(f.image_type for f in frames)),
        ]
    hints = []
    for attribute, values in dimensions:
        if len(values) > 1:
            shown = ", ".join(sorted(values, key=_natural_key)[:6]) + (", ..." if len(values) > 6 else "")
            hints.append(f"{len(values)} {attribute}: {shown}")
    declared = max((f.temporal_positions_declared or 0) for f in frames)
    if declared > 1 and not hints:
        hints.append(f"NumberOfTemporalPositions is {declared} (dynamic)")
    return "; ".join(hints)


def _distinct(values: Iterable[str | None]) -> set[str]:
    return {value for value in values if value is not None}


def _natural_key(text: str) -> tuple[float, str]:
    try:
        return (float(text), text)
    except ValueError:
        return (math.inf, text)


def _check_slice_spacing(ordered: Sequence[_Frame], normal: np.ndarray) -> float:
    """The uniform slice spacing (mm); SeriesCheckError for gaps and non-uniform spacing."""
    distances = np.asarray([f.ipp_mm for f in ordered], dtype=float) @ normal
    steps = np.diff(distances)
    nominal_mm = _most_common_step_mm(steps)
    tolerance = _position_tolerance_mm(nominal_mm)
    gaps, irregular = [], []
    for index, step in enumerate(steps):
        if abs(step - nominal_mm) <= tolerance:
            continue
        multiple = round(step / nominal_mm)
        if multiple >= 2 and abs(step - multiple * nominal_mm) <= tolerance * multiple:
            gaps.append((index, float(step), multiple - 1))
        else:
            irregular.append(float(step))
    if irregular:
        raise SeriesCheckError(
            f"non-uniform slice spacing: {_count(len(irregular), 'step')} between {min(irregular):.3f} and "
            f"{max(irregular):.3f} mm where spacing is {nominal_mm:.3f} mm (tolerance {tolerance:.3f} mm)"
        )
    if gaps:
        index, step, missing = gaps[0]
        more = ""
        if len(gaps) > 1:
            more = f"; {len(gaps)} gaps, {sum(g[2] for g in gaps)} slices missing in all"
        raise SeriesCheckError(
            f"missing slice(s): gap of {step:.2f} mm after slice {index + 1} (of {len(ordered)} received) "
            f"where spacing is {nominal_mm:.2f} mm ({missing} slice{'s' if missing > 1 else ''} missing)" + more
        )
    spacing_mm = float((distances[-1] - distances[0]) / (len(distances) - 1))
    residual = np.abs(distances - (distances[0] + spacing_mm * np.arange(len(distances))))
    worst = int(np.argmax(residual))
    if residual[worst] > tolerance:
        raise SeriesCheckError(
            f"non-uniform slice spacing: slice {worst + 1} of {len(ordered)} lies {residual[worst]:.3f} mm "
            f"off a regular grid of spacing {spacing_mm:.3f} mm (tolerance {tolerance:.3f} mm)"
        )
    return spacing_mm


def _most_common_step_mm(steps: np.ndarray) -> float:
    """The step between neighbouring slices that occurs most often (the smaller one on a tie).

    Not the median: with several gaps in a short series the median can be a gap.
    """
    members = [np.abs(steps - step) <= _position_tolerance_mm(float(step)) for step in steps]
    counts = [int(m.sum()) for m in members]
    best = min(range(len(steps)), key=lambda i: (-counts[i], steps[i]))
    return float(np.median(steps[members[best]]))


def _check_in_plane_drift(ordered: Sequence[_Frame], row: np.ndarray, column: np.ndarray) -> None:
    positions = np.asarray([f.ipp_mm for f in ordered], dtype=float)
    in_plane = np.stack([positions @ row, positions @ column], axis=1)
    drift = np.linalg.norm(in_plane - in_plane[0], axis=1)
    tolerance = max(IN_PLANE_TOLERANCE_MM, IN_PLANE_TOLERANCE_FRACTION * min(ordered[0].pixel_spacing_mm))
    if drift.max() > tolerance:
        raise SeriesCheckError(
            f"sheared slice stack (gantry tilt or slices not stacked along their normal): slice positions "
            f"drift {drift.max():.2f} mm within the slice plane across the series "
            f"(tolerance {tolerance:.2f} mm)"
        )


def _check_pixel_data(headers: Sequence[Dataset], paths: Sequence[Path]) -> None:
    """Each file holds the pixel data its header describes: there, encapsulated exactly when its
    transfer syntax compresses, and otherwise of the size Rows x Columns x BitsAllocated (x frames)
    make. A slice whose pixels are missing or cut short quarantines its series here, instead of
    failing the job after routing. Element headers only: no pixel is decoded."""
    for ds, path in zip(headers, paths, strict=True):
        where = f"file {Path(path).name}"
        try:
            transfer_syntax, length = pixel_data_length(Path(path))
        except (OSError, HeaderError) as exc:
            raise SeriesCheckError(f"{where}: the pixel data cannot be read: {exc}") from exc
        if length is None:
            raise SeriesCheckError(f"{where}: no pixel data")
        uid = pydicom.uid.UID(transfer_syntax)
        if not uid.is_transfer_syntax:
            raise SeriesCheckError(f"{where}: {transfer_syntax!r:.70} in the file meta is not a transfer syntax")
        name = uid.name
        if uid.is_encapsulated:
            if length != UNDEFINED_LENGTH:
                raise SeriesCheckError(
                    f"{where}: the pixel data is not encapsulated although the transfer syntax is {name}"
                )
            continue
        if length == UNDEFINED_LENGTH:
            raise SeriesCheckError(f"{where}: encapsulated pixel data in {name}, a transfer syntax without compression")
        if _integer(ds, "SamplesPerPixel", where) != 1:
            raise SeriesCheckError(f"{where}: SamplesPerPixel is not 1")
        bits = _integer(ds, "BitsAllocated", where)
        if bits not in (8, 16, 32):
            raise SeriesCheckError(f"{where}: BitsAllocated is {bits} (8, 16 or 32 expected)")
        frames = _integer(ds, "NumberOfFrames", where) if "NumberOfFrames" in ds else 1
        expected = _integer(ds, "Rows", where) * _integer(ds, "Columns", where) * frames * bits // 8
        if length != expected + expected % 2:
            raise SeriesCheckError(
                f"{where}: {length} bytes of pixel data where Rows x Columns x BitsAllocated"
                f"{' x NumberOfFrames' if frames > 1 else ''} make {expected}"
            )


def _cluster(frames: Sequence[_Frame], key: Any, tolerance: float) -> list[tuple[tuple[float, ...], list[_Frame]]]:
    """Frames grouped by a vector attribute equal within ``tolerance`` per component, largest group first."""
    clusters: list[tuple[tuple[float, ...], list[_Frame]]] = []
    for frame in frames:
        value = np.asarray(key(frame), dtype=float)
        for centre, members in clusters:
            if np.max(np.abs(value - np.asarray(centre))) <= tolerance:
                members.append(frame)
                break
        else:
            clusters.append((tuple(float(v) for v in value), [frame]))
    return sorted(clusters, key=lambda c: -len(c[1]))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fmt(values: Iterable[float], digits: int = 4) -> str:
    """Numbers with at most ``digits`` decimals and no trailing zeros: 1, 0.9375, -0.0342."""
    texts = (f"{v:.{digits}f}".rstrip("0").rstrip(".") for v in values)
    return ", ".join("0" if t == "-0" else t for t in texts)


# --------------------------------------------------------------------------------------------- frames


def _frames_of(ds: Dataset, path: Path) -> list[_Frame]:
    if str(ds.get("SOPClassUID", "")) == ENHANCED_MR_IMAGE_STORAGE:
        return _enhanced_frames(ds, path)
    return [_classic_frame(ds, path)]


def _classic_frame(ds: Dataset, path: Path) -> _Frame:
    where = f"file {path.name}"
    temporal = ds.get("TemporalPositionIdentifier")
    declared = ds.get("NumberOfTemporalPositions")
    return _Frame(
        path=path,
        frame_number=None,
        sop_instance_uid=str(ds.SOPInstanceUID),
        iop=_vector(ds, "ImageOrientationPatient", 6, where),
        ipp_mm=_vector(ds, "ImagePositionPatient", 3, where),
        pixel_spacing_mm=_vector(ds, "PixelSpacing", 2, where, positive=True),
        rows=_integer(ds, "Rows", where),
        columns=_integer(ds, "Columns", where),
        temporal_position=_text(temporal),
        temporal_positions_declared=int(declared) if declared not in (None, "") else None,
        b_value=_text(ds.get("DiffusionBValue")),
        echo=_text(ds.get("EchoNumbers")),
        image_type=_text(ds.get("ImageType")),
    )


def _enhanced_frames(ds: Dataset, path: Path) -> list[_Frame]:
    where = f"file {path.name}"
    number_of_frames = _integer(ds, "NumberOfFrames", where)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != number_of_frames:
        raise SeriesCheckError(f"{where}: {number_of_frames} frames but {len(per_frame)} per-frame functional groups")
    shared_sequence = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_sequence[0] if shared_sequence else Dataset()
    rows, columns = _integer(ds, "Rows", where), _integer(ds, "Columns", where)
    frames = []
    for number, item in enumerate(per_frame, start=1):
        here = f"{where} frame {number}"
        content = _macro(item, shared, "FrameContentSequence")
        diffusion = _macro(item, shared, "MRDiffusionSequence")
        echo = _macro(item, shared, "MREchoSequence")
        frame_type = _macro(item, shared, "MRImageFrameTypeSequence")
        frames.append(
            _Frame(
                path=path,
                frame_number=number,
                sop_instance_uid=str(ds.SOPInstanceUID),
                iop=_vector(
                    _required_macro(item, shared, "PlaneOrientationSequence", here),
                    "ImageOrientationPatient",
                    6,
                    here,
                ),
                ipp_mm=_vector(
                    _required_macro(item, shared, "PlanePositionSequence", here),
                    "ImagePositionPatient",
                    3,
                    here,
                ),
                pixel_spacing_mm=_vector(
                    _required_macro(item, shared, "PixelMeasuresSequence", here),
                    "PixelSpacing",
                    2,
                    here,
                    positive=True,
                ),
                rows=rows,
                columns=columns,
                temporal_position=_text(content.get("TemporalPositionIndex")) if content else None,
                b_value=_text(diffusion.get("DiffusionBValue")) if diffusion else None,
                echo=_text(echo.get("EffectiveEchoTime")) if echo else None,
                image_type=_text(frame_type.get("FrameType")) if frame_type else None,
            )
        )
    return frames


def _macro(per_frame_item: Dataset, shared: Dataset, keyword: str) -> Dataset | None:
    """The single item of a functional group macro, from the frame's own groups or else the shared ones."""
    for source in (per_frame_item, shared):
        sequence = source.get(keyword)
        if sequence:
            return sequence[0]
    return None


def _required_macro(per_frame_item: Dataset, shared: Dataset, keyword: str, where: str) -> Dataset:
    item = _macro(per_frame_item, shared, keyword)
    if item is None:
        raise SeriesCheckError(f"{where}: no {keyword} in the shared or per-frame functional groups")
    return item


def _vector(ds: Dataset, keyword: str, length: int, where: str, *, positive: bool = False) -> tuple[float, ...]:
    value = ds.get(keyword)
    try:
        # Numbers as pydicom reads DS or FD values: text or bytes mean the element came with another
        # VR (found by tests/reliability/test_fuzz_dicom.py), which the sCT writer cannot use either.
        values = [] if value is None or isinstance(value, str | bytes) else list(value)
        numbers = () if any(isinstance(v, str | bytes) for v in values) else tuple(float(v) for v in values)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != length or not all(math.isfinite(v) and (v > 0 or not positive) for v in numbers):
        raise SeriesCheckError(
            f"{where}: {keyword} missing or invalid (need {length} {'positive ' if positive else ''}numbers)"
        )
    return numbers


def _integer(ds: Dataset, keyword: str, where: str) -> int:
    try:
        value = int(ds.get(keyword))
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise SeriesCheckError(f"{where}: {keyword} missing or invalid")
    return value


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------------------------- pixels


def load_mr_volume(checked: CheckedSeries) -> Volume:
    """The float32 volume of ``checked`` on ``checked.grid``: stored values through RescaleSlope/Intercept."""
    array = np.empty(checked.grid.shape_zyx, dtype=np.float32)
    multi_frame: dict[Path, np.ndarray] = {}
    expected_shape = checked.grid.shape_zyx[1:]
    for z, ref in enumerate(checked.slices):
        if ref.frame_number is None:
            pixels = _single_frame_pixels(ref)
        else:
            if ref.path not in multi_frame:
                multi_frame[ref.path] = _multi_frame_pixels(ref.path, ref.sop_instance_uid)
            pixels = multi_frame[ref.path][ref.frame_number - 1]
        if pixels.shape != expected_shape:
            raise LoadError(f"{ref.path}: pixel data of shape {pixels.shape}, expected {expected_shape}")
        array[z] = pixels
    if not np.all(np.isfinite(array)):
        raise LoadError("the MR volume has non-finite values after rescaling")
    return Volume(array=array, grid=checked.grid)


def _read_instance(path: Path, sop_instance_uid: str) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise LoadError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if str(ds.get("SOPInstanceUID", "")) != sop_instance_uid:
        raise LoadError(f"{path} no longer holds the instance that was checked (SOPInstanceUID differs)")
    return ds


def _single_frame_pixels(ref: SliceRef) -> np.ndarray:
    ds = _read_instance(ref.path, ref.sop_instance_uid)
    try:
        stored = ds.pixel_array
    except Exception as exc:
        log.debug("pydicom cannot decode %s (%s); decoding with GDCM", ref.path, exc)
        return _gdcm_pixels(ref.path)
    slope, intercept = _rescale(ds)
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def _gdcm_pixels(path: Path) -> np.ndarray:
    """A single-frame image decoded by GDCM (transfer syntaxes pydicom has no plugin for); GDCM rescales."""
    try:
        image = sitk.ReadImage(str(path), sitk.sitkFloat64)
    except RuntimeError as exc:
        raise LoadError(f"cannot decode the pixel data of {path}: {exc}") from exc
    return sitk.GetArrayFromImage(image).reshape(image.GetSize()[1], image.GetSize()[0]).astype(np.float32)


def _multi_frame_pixels(path: Path, sop_instance_uid: str) -> np.ndarray:
    """All frames of an Enhanced MR file, rescaled frame by frame (PixelValueTransformationSequence)."""
    ds = _read_instance(path, sop_instance_uid)
    try:
        stored = ds.pixel_array
    except Exception as exc:
        raise LoadError(f"cannot decode the pixel data of {path}: {type(exc).__name__}: {exc}") from exc
    number_of_frames = int(ds.NumberOfFrames)
    stored = stored.reshape(number_of_frames, int(ds.Rows), int(ds.Columns))
    shared_sequence = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_sequence[0] if shared_sequence else Dataset()
    per_frame = ds.PerFrameFunctionalGroupsSequence
    frames = np.empty(stored.shape, dtype=np.float32)
    for index in range(number_of_frames):
        transformation = _macro(per_frame[index], shared, "PixelValueTransformationSequence")
        slope, intercept = _rescale(transformation if transformation is not None else ds)
        frames[index] = stored[index].astype(np.float64) * slope + intercept
    return frames


def _rescale(ds: Dataset) -> tuple[float, float]:
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    try:
        return (
            float(slope) if slope not in (None, "") else 1.0,
            float(intercept) if intercept not in (None, "") else 0.0,
        )
    except (TypeError, ValueError) as exc:
        raise LoadError(f"invalid RescaleSlope/RescaleIntercept: {slope!r}/{intercept!r}") from exc
