"""A generated T1 MR series of a head phantom: the scanner stand-in for the demo and the tests.

The phantom is a function of patient (DICOM LPS) coordinates, so the same anatomy lies at the same
place whatever the slice orientation: a scalp and subcutaneous fat ring, a skull that is dark on
T1 (cortical bone has no MR signal) with brighter diploe, CSF, grey matter, folded white matter,
lateral ventricles, air sinuses, eyes and a small bright lesion in the left hemisphere (so that a
left-right or head-foot flip shows). Intensities are MPRAGE-like, with a smooth bias field and
Rician noise, stored as unsigned 16-bit integers.

The files carry the Type 1 and 2 attributes of the MR Image IOD (or, with ``enhanced=True``, the
Enhanced MR Image IOD in one multi-frame file) so that DCMTK, Orthanc and ``dciodvfy`` accept them,
and ``Synthetic Data`` = YES because they are. Keyword options make the defective series that
the series checks must refuse (missing or duplicate slices, 4D, mixed orientations).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import ArrayLike
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds
from scipy import ndimage

from sct_model.volume import Volume

log = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

HEAD_CENTRE_LPS_MM = np.array([2.0, 6.0, 4.0])
FOV_CENTRE_LPS_MM = np.array([0.0, 4.0, 10.0])
HEAD_SEMI_AXES_MM = np.array([70.0, 86.0, 80.0])
EDGE_WIDTH_MM = 0.8
NOISE_SIGMA = 10.0
OBLIQUE_ROTATION_DEG = (13.0, 7.0)  # about L-R, then A-P: a double-oblique axial (like an AC-PC aligned scan)

# (row direction, column direction) of the standard planes; the slice normal is row x column.
PLANE_AXES = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
OTHER_PLANE = {"axial": "coronal", "coronal": "sagittal", "sagittal": "axial", "oblique": "sagittal"}

# T1 MPRAGE-like signal of each tissue (arbitrary scanner units)
SKIN, FAT, CORTICAL_BONE, DIPLOE, CSF = 520.0, 880.0, 50.0, 400.0, 160.0
GREY_MATTER, WHITE_MATTER, AIR, VITREOUS, LESION = 460.0, 700.0, 0.0, 110.0, 980.0

# Layers of the head, outside in: (inset from the head surface in mm, signal, gyral folding)
HEAD_LAYERS = (
    (0.0, SKIN, 0.0),
    (3.0, FAT, 0.0),
    (7.0, CORTICAL_BONE, 0.0),
    (9.0, DIPLOE, 0.0),
    (11.0, CORTICAL_BONE, 0.0),
    (13.0, CSF, 0.0),
    (15.0, GREY_MATTER, 0.0),
    (24.0, WHITE_MATTER, 0.06),
)
# Structures inside, painted in this order: (centre offset from the head centre (L, P, S), semi-axes, signal)
HEAD_STRUCTURES = (
    ((-9.0, -4.0, 12.0), (5.0, 22.0, 9.0), CSF),  # right lateral ventricle
    ((9.0, -4.0, 12.0), (5.0, 22.0, 9.0), CSF),  # left lateral ventricle
    ((-30.0, -66.0, -30.0), (11.0, 11.0, 11.0), VITREOUS),  # right eye (anterior, inferior)
    ((30.0, -66.0, -30.0), (11.0, 11.0, 11.0), VITREOUS),  # left eye
    ((0.0, -72.0, 6.0), (14.0, 6.0, 9.0), AIR),  # frontal sinus
    ((0.0, -22.0, -48.0), (12.0, 10.0, 8.0), AIR),  # sphenoid sinus
)
LESION_OFFSET_MM = (30.0, 12.0, 26.0)  # left hemisphere, posterior, superior: shows any flip
LESION_CENTRE_LPS_MM = HEAD_CENTRE_LPS_MM + LESION_OFFSET_MM
LESION_RADIUS_MM = 6.0


# --------------------------------------------------------------------------------------------- phantom


def _soft_ellipsoid(points: np.ndarray, centre: ArrayLike, semi_axes: ArrayLike, wobble: float = 0.0) -> np.ndarray:
    """1 inside, 0 outside, a smooth edge EDGE_WIDTH_MM wide; ``wobble`` folds the surface (gyri)."""
    offset = points - np.asarray(centre, dtype=float)
    distance = np.linalg.norm(offset, axis=-1)
    unit = offset / np.maximum(distance, 1e-9)[..., None]
    # The radius along this direction (a point exactly at the centre has no direction: any radius will do).
    radius = 1.0 / np.maximum(np.linalg.norm(unit / np.asarray(semi_axes, dtype=float), axis=-1), 1e-12)
    if wobble:
        azimuth = np.arctan2(unit[..., 1], unit[..., 0])
        radius = radius * (1.0 + wobble * np.sin(7.0 * azimuth) * np.cos(9.0 * unit[..., 2]))
    return 0.5 * (1.0 - np.tanh((distance - radius) / EDGE_WIDTH_MM))


def phantom_t1(points_lps_mm: np.ndarray, contrast_gain: float = 1.0) -> np.ndarray:
    """Noise-free T1 signal of the head phantom at LPS points (..., 3).

    ``contrast_gain`` scales the lesion's signal (contrast uptake in a dynamic series).
    """
    centre, semi_axes = HEAD_CENTRE_LPS_MM, HEAD_SEMI_AXES_MM
    signal = np.zeros(points_lps_mm.shape[:-1])

    def paint(mask: np.ndarray, value: float) -> None:
        nonlocal signal
        signal = signal * (1.0 - mask) + value * mask

    for inset_mm, value, wobble in HEAD_LAYERS:
        paint(_soft_ellipsoid(points_lps_mm, centre, semi_axes - inset_mm, wobble), value)
    for offset_mm, structure_semi_axes, value in HEAD_STRUCTURES:
        paint(_soft_ellipsoid(points_lps_mm, centre + offset_mm, structure_semi_axes), value)
    paint(_soft_ellipsoid(points_lps_mm, LESION_CENTRE_LPS_MM, (LESION_RADIUS_MM,) * 3), LESION * contrast_gain)
    relative = (points_lps_mm - centre) / semi_axes
    bias = 1.0 + 0.08 * relative[..., 1] - 0.06 * relative[..., 2]  # smooth receive-coil bias field
    return signal * bias


def _rotation_about(axis: int, angle_deg: float) -> np.ndarray:
    cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    i, j = [k for k in range(3) if k != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = cos, -sin, sin, cos
    return matrix


def orientation_axes(orientation: str, tilt_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Unit row and column directions (LPS) of a plane; ``tilt_deg`` rotates it about the L-R axis."""
    if orientation == "oblique":
        row, column = (np.asarray(v) for v in PLANE_AXES["axial"])
        rotation = _rotation_about(1, OBLIQUE_ROTATION_DEG[1]) @ _rotation_about(0, OBLIQUE_ROTATION_DEG[0])
    elif orientation in PLANE_AXES:
        row, column = (np.asarray(v) for v in PLANE_AXES[orientation])
        rotation = np.eye(3)
    else:
        raise ValueError(f"orientation must be one of axial, sagittal, coronal, oblique; got {orientation!r}")
    rotation = _rotation_about(0, tilt_deg) @ rotation
    return rotation @ row, rotation @ column


# --------------------------------------------------------------------------------------------- series


def generate_mr_series(
    out_dir: Path,
    *,
    slices: int = 48,
    rows: int = 96,
    columns: int = 96,
    pixel_spacing_mm: float | tuple[float, float] = 2.0,
    slice_spacing_mm: float = 2.5,
    orientation: str = "axial",
    tilt_deg: float = 0.0,
    series_description: str = "T1 MPRAGE SYNTHETIC PHANTOM",
    protocol_name: str = "T1_MPRAGE_3D_PHANTOM",
    patient_id: str = "PHANTOM001",
    patient_name: str = "Phantom^Head",
    study_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 3,
    enhanced: bool = False,
    seed: int = 0,
    rescale_slope: float = 1.0,
    drop_slices: Sequence[int] = (),
    duplicate_slices: Sequence[int] = (),
    temporal_positions: int = 1,
    diffusion_b_values: Sequence[float] = (),
    mixed_orientation: bool = False,
    signal: Callable[[np.ndarray], np.ndarray] | None = None,
    fov_centre_mm: Sequence[float] | None = None,
    noise_sigma: float = NOISE_SIGMA,
    study_description: str = "MR HEAD PHANTOM",
    body_part: str = "HEAD",
) -> list[Path]:
    """Write a phantom MR series into ``out_dir`` and return the files written.

    ``signal`` maps LPS points (..., 3) in mm to MR signal (default: the T1 head phantom,
    :func:`phantom_t1`; :func:`volume_signal` samples a volume, e.g. a training phantom), to which
    Rician noise of ``noise_sigma`` is added (0: none); ``fov_centre_mm`` is where the planes are
    centred (default FOV_CENTRE_LPS_MM).

    ``pixel_spacing_mm`` is one number or, in DICOM PixelSpacing order, (between rows, between
    columns). The planes are centred on FOV_CENTRE_LPS_MM; ``orientation`` "oblique" is an axial
    plane rotated 13° about L-R and 7° about A-P; ``tilt_deg`` turns any plane about L-R.
    Slice indices (``drop_slices``, ``duplicate_slices``) count from 0 in spatial order along the
    slice normal. ``temporal_positions`` > 1 repeats every position at each time point (a dynamic
    series), ``diffusion_b_values`` once per b-value (a diffusion series); ``mixed_orientation``
    writes the second half of the slices in another plane. ``enhanced`` writes one Enhanced MR
    multi-frame file instead of one file per slice. Files are numbered in acquisition order,
    which runs against the slice normal, so that file order is not spatial order.
    """
    axes = orientation_axes(orientation, tilt_deg)
    other_axes = orientation_axes(OTHER_PLANE[orientation], tilt_deg) if mixed_orientation else axes
    row_spacing_mm, column_spacing_mm = (
        (pixel_spacing_mm, pixel_spacing_mm) if isinstance(pixel_spacing_mm, int | float) else pixel_spacing_mm
    )
    if min(slices, rows, columns) < 1 or min(row_spacing_mm, column_spacing_mm, slice_spacing_mm) <= 0:
        raise ValueError("slices, rows, columns and spacings must be positive")
    if temporal_positions > 1 and diffusion_b_values:
        raise ValueError("a series is either dynamic (temporal_positions) or diffusion (b-values), not both")
    if any(not 0 <= k < slices for k in (*drop_slices, *duplicate_slices)):
        raise ValueError(f"drop_slices and duplicate_slices must be slice indices in [0, {slices})")
    geometry = _Geometry(
        slices,
        rows,
        columns,
        float(row_spacing_mm),
        float(column_spacing_mm),
        slice_spacing_mm,
        np.asarray(fov_centre_mm if fov_centre_mm is not None else FOV_CENTRE_LPS_MM, dtype=float),
        signal or phantom_t1,
        float(noise_sigma),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    now = datetime.datetime.now()
    common = _common_dataset(
        now=now,
        series_description=series_description,
        protocol_name=protocol_name,
        patient_id=patient_id,
        patient_name=patient_name,
        study_instance_uid=study_instance_uid or generate_uid(),
        frame_of_reference_uid=frame_of_reference_uid or generate_uid(),
        series_number=series_number,
        geometry=geometry,
        study_description=study_description,
        body_part=body_part,
    )
    frames = _frame_plan(
        geometry,
        axes,
        other_axes,
        drop_slices,
        duplicate_slices,
        temporal_positions,
        diffusion_b_values,
    )
    for frame in frames:
        frame.pixels = _render(frame, geometry, rescale_slope, rng)
    if enhanced:
        paths = [
            _write_enhanced(
                out_dir,
                common,
                frames,
                geometry,
                rescale_slope,
                now,
                temporal_positions,
                bool(diffusion_b_values),
            )
        ]
    else:
        paths = [
            _write_single_frame(out_dir, common, frame, number, geometry, rescale_slope, now, temporal_positions)
            for number, frame in enumerate(frames, start=1)
        ]
    log.debug("generated %d %s phantom MR file(s) in %s", len(paths), orientation, out_dir)
    return paths


@dataclasses.dataclass(frozen=True)
class _Geometry:
    slices: int
    rows: int
    columns: int
    row_spacing_mm: float  # between rows, along the column direction: PixelSpacing[0]
    column_spacing_mm: float  # between columns, along the row direction: PixelSpacing[1]
    slice_spacing_mm: float
    centre_mm: np.ndarray  # LPS, where the planes are centred
    signal: Callable[..., np.ndarray]  # LPS points (..., 3) -> signal
    noise_sigma: float


@dataclasses.dataclass
class _PlannedFrame:
    """One frame to write: its slice index (spatial order), plane, volume (time point or b-value)."""

    slice_index: int
    row: np.ndarray
    column: np.ndarray
    volume_index: int
    temporal_position: int | None
    b_value: float | None
    ipp_mm: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))
    pixels: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.uint16))

    @property
    def iop(self) -> np.ndarray:
        return np.concatenate([self.row, self.column])


def _frame_plan(
    geometry: _Geometry,
    axes: tuple[np.ndarray, np.ndarray],
    other_axes: tuple[np.ndarray, np.ndarray],
    drop_slices: Sequence[int],
    duplicate_slices: Sequence[int],
    temporal_positions: int,
    b_values: Sequence[float],
) -> list[_PlannedFrame]:
    """The frames to write, in acquisition order (against the slice normal), with their positions.

    The second half of each volume's slices lies in the plane ``other_axes`` (a mixed-orientation
    series when they differ from ``axes``).
    """
    volumes: list[tuple[int | None, float | None]] = (
        [(None, float(b)) for b in b_values]
        if b_values
        else [(t + 1 if temporal_positions > 1 else None, None) for t in range(temporal_positions)]
    )
    kept = [k for k in reversed(range(geometry.slices)) if k not in set(drop_slices)]
    frames = []
    for volume_index, (temporal_position, b_value) in enumerate(volumes, start=1):
        for order, k in enumerate(kept):
            row, column = other_axes if order >= len(kept) // 2 else axes
            for _ in range(2 if k in set(duplicate_slices) else 1):
                frame = _PlannedFrame(k, row, column, volume_index, temporal_position, b_value)
                frame.ipp_mm = _position(frame, geometry)
                frames.append(frame)
    return frames


def _position(frame: _PlannedFrame, geometry: _Geometry) -> np.ndarray:
    """ImagePositionPatient: the planes are centred on ``geometry.centre_mm``, slice k at (k - mid) spacings."""
    normal = np.cross(frame.row, frame.column)
    centre = geometry.centre_mm + (frame.slice_index - (geometry.slices - 1) / 2.0) * geometry.slice_spacing_mm * normal
    half_width = (geometry.columns - 1) / 2.0 * geometry.column_spacing_mm
    half_height = (geometry.rows - 1) / 2.0 * geometry.row_spacing_mm
    return centre - half_width * frame.row - half_height * frame.column


def _render(frame: _PlannedFrame, geometry: _Geometry, rescale_slope: float, rng: np.random.Generator) -> np.ndarray:
    """The stored uint16 pixels (rows, columns) of one frame: phantom signal, Rician noise, rescale."""
    j, i = np.mgrid[0 : geometry.rows, 0 : geometry.columns]
    points = (
        frame.ipp_mm
        + i[..., None] * geometry.column_spacing_mm * frame.row
        + j[..., None] * geometry.row_spacing_mm * frame.column
    )
    gain = 1.0 + 0.3 * (frame.temporal_position - 1) if frame.temporal_position else 1.0  # contrast uptake
    signal = geometry.signal(points) * gain
    if frame.b_value is not None:
        signal = signal * np.exp(-frame.b_value * 0.0008)  # diffusion attenuation, ADC 0.8e-3 mm²/s
    if geometry.noise_sigma > 0:
        real = signal + rng.normal(0.0, geometry.noise_sigma, signal.shape)
        signal = np.hypot(real, rng.normal(0.0, geometry.noise_sigma, signal.shape))  # magnitude: Rician noise
    return np.clip(np.rint(signal / rescale_slope), 0, 4095).astype(np.uint16)


def write_volume_series(volume: Volume, out_dir: Path, **options: Any) -> list[Path]:
    """An axial ``volume`` (a training phantom, a generated test input) as an MR series of one slice per
    plane, on exactly its grid and with no noise added (``options``: as :func:`generate_mr_series`)."""
    grid = volume.grid
    if not grid.is_axial():
        raise ValueError("write_volume_series writes axial volumes only")
    spacing_x, spacing_y, spacing_z = grid.spacing_mm
    centre = grid.index_to_point(np.asarray([[(n - 1) / 2.0 for n in grid.size]]))[0]
    return generate_mr_series(
        out_dir,
        **{
            "slices": grid.size[2],
            "rows": grid.size[1],
            "columns": grid.size[0],
            "pixel_spacing_mm": (spacing_y, spacing_x),
            "slice_spacing_mm": spacing_z,
            "signal": volume_signal(volume),
            "fov_centre_mm": centre,
            "noise_sigma": 0.0,
            **options,
        },
    )


def volume_signal(volume: Volume) -> Callable[[np.ndarray], np.ndarray]:
    """The signal of ``volume`` at LPS points (linear interpolation, 0 outside it): to write any volume
    (a training phantom, for example) as an MR series with :func:`generate_mr_series`."""
    array = np.asarray(volume.array, dtype=np.float64)
    grid = volume.grid
    inverse = np.linalg.inv(grid.direction_matrix)
    origin, spacing = np.asarray(grid.origin_mm), np.asarray(grid.spacing_mm)

    def sample(points: np.ndarray) -> np.ndarray:
        flat = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        index_xyz = ((flat - origin) @ inverse.T) / spacing
        values = ndimage.map_coordinates(array, index_xyz[:, ::-1].T, order=1, mode="constant", cval=0.0)
        return values.reshape(np.asarray(points).shape[:-1])

    return sample


# --------------------------------------------------------------------------------------------- DICOM


def _ds(values: Sequence[float] | np.ndarray) -> list[str]:
    """Decimal strings of at most 16 characters (VR DS)."""
    return [format_number_as_ds(float(v)) for v in values]


def _common_dataset(
    *,
    now: datetime.datetime,
    series_description: str,
    protocol_name: str,
    patient_id: str,
    patient_name: str,
    study_instance_uid: str,
    frame_of_reference_uid: str,
    series_number: int,
    geometry: _Geometry,
    study_description: str,
    body_part: str,
) -> Dataset:
    """Patient, study, series, frame of reference, equipment and pixel format attributes shared by all."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "PHANTOM"
    ds.AccessionNumber = ""
    ds.StudyDescription = study_description
    ds.Modality = "MR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.SeriesDescription = series_description
    ds.ProtocolName = protocol_name
    ds.BodyPartExamined = body_part
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "sct-node"
    ds.ManufacturerModelName = "synthetic MR phantom"
    ds.SoftwareVersions = "0.1.0"
    ds.InstitutionName = "sct-node test bench"
    ds.StationName = "PHANTOM"
    ds.DeviceSerialNumber = "PHANTOM-0001"
    ds.SyntheticData = "YES"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geometry.rows
    ds.Columns = geometry.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SliceThickness = format_number_as_ds(float(geometry.slice_spacing_mm))
    ds.WindowCenter = "600"
    ds.WindowWidth = "1200"
    return ds


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "SCT_NODE_PHANTOM"
    return meta


def _set_mr_acquisition(ds: Dataset) -> None:
    """The acquisition parameters of a 3T sagittal/axial MPRAGE (classic MR Image module)."""
    ds.ScanningSequence = ["GR", "IR"]
    ds.SequenceVariant = ["SK", "SP", "MP"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.SequenceName = "tfl3d1"
    ds.AngioFlag = "N"
    ds.RepetitionTime = "2300"
    ds.EchoTime = "2.98"
    ds.InversionTime = "900"
    ds.EchoTrainLength = 1
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = "3"
    ds.FlipAngle = "9"
    ds.EchoNumbers = 1


def _write_single_frame(
    out_dir: Path,
    common: Dataset,
    frame: _PlannedFrame,
    number: int,
    geometry: _Geometry,
    rescale_slope: float,
    now: datetime.datetime,
    temporal_positions: int,
) -> Path:
    ds = Dataset()
    ds.update(common)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = ds.StudyTime
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    ds.PatientOrientation = ""
    _set_mr_acquisition(ds)
    ds.PixelSpacing = _ds([geometry.row_spacing_mm, geometry.column_spacing_mm])
    ds.ImageOrientationPatient = _ds(frame.iop)
    ds.ImagePositionPatient = _ds(frame.ipp_mm)
    ds.SliceLocation = format_number_as_ds(float(frame.ipp_mm @ np.cross(frame.row, frame.column)))
    ds.SpacingBetweenSlices = common.SliceThickness
    if frame.temporal_position is not None:
        ds.TemporalPositionIdentifier = frame.temporal_position
        ds.NumberOfTemporalPositions = temporal_positions
        ds.TriggerTime = format_number_as_ds(30000.0 * (frame.temporal_position - 1))
    if frame.b_value is not None:
        ds.DiffusionBValue = frame.b_value
    if rescale_slope != 1.0:
        ds.RescaleSlope = format_number_as_ds(float(rescale_slope))
        ds.RescaleIntercept = "0"
        ds.RescaleType = "US"
    ds.PixelData = frame.pixels.tobytes()
    ds.file_meta = _file_meta(MR_IMAGE_STORAGE, ds.SOPInstanceUID)
    path = out_dir / f"mr_s{int(common.SeriesNumber):03d}_i{number:04d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _item(**attributes: object) -> DicomSequence:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return DicomSequence([item])


def _write_enhanced(
    out_dir: Path,
    common: Dataset,
    frames: list[_PlannedFrame],
    geometry: _Geometry,
    rescale_slope: float,
    now: datetime.datetime,
    temporal_positions: int,
    diffusion: bool,
) -> Path:
    ds = Dataset()
    ds.update(common)
    del ds.SliceThickness, ds.WindowCenter, ds.WindowWidth  # functional groups carry them
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "T1", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionDuration = 300.0
    ds.AcquisitionNumber = 1
    ds.NumberOfFrames = len(frames)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1"
    ds.ContentQualification = "RESEARCH"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = "3"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ImageComments = "synthetic phantom"
    ds.AcquisitionContextSequence = DicomSequence([])
    _set_pulse_sequence(ds)
    _set_dimensions(ds, temporal_positions > 1, diffusion)
    mixed = len({tuple(np.round(f.iop, 6)) for f in frames}) > 1
    shared = _shared_groups(geometry, rescale_slope)
    if not mixed:
        shared.PlaneOrientationSequence = _item(ImageOrientationPatient=_ds(frames[0].iop))
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([_per_frame_groups(frame, now, mixed) for frame in frames])
    ds.PixelData = np.stack([frame.pixels for frame in frames]).tobytes()
    ds.file_meta = _file_meta(ENHANCED_MR_IMAGE_STORAGE, ds.SOPInstanceUID)
    path = out_dir / f"mr_s{int(common.SeriesNumber):03d}_enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _set_pulse_sequence(ds: Dataset) -> None:
    """MR Pulse Sequence module (Type 1C for ORIGINAL images) of a 3D inversion-recovery gradient echo."""
    ds.PulseSequenceName = "MPRAGE"
    ds.MRAcquisitionType = "3D"
    ds.EchoPulseSequence = "GRADIENT"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1


def _set_dimensions(ds: Dataset, temporal: bool, diffusion: bool) -> None:
    """Multi-frame Dimension module: stack and in-stack position, then time point or b-value."""
    organization_uid = generate_uid()
    ds.DimensionOrganizationSequence = _item(DimensionOrganizationUID=organization_uid)
    pointers = [(0x00209056, 0x00209111, "Stack ID"), (0x00209057, 0x00209111, "In-Stack Position Number")]
    if temporal:
        pointers.append((0x00209128, 0x00209111, "Temporal Position Index"))
    if diffusion:
        pointers.append((0x00189087, 0x00189117, "Diffusion b-value"))
    items = []
    for index_pointer, group_pointer, label in pointers:
        item = Dataset()
        item.DimensionOrganizationUID = organization_uid
        item.DimensionIndexPointer = index_pointer
        item.FunctionalGroupPointer = group_pointer
        item.DimensionDescriptionLabel = label
        items.append(item)
    ds.DimensionIndexSequence = DicomSequence(items)
    if not diffusion:
        ds.DimensionOrganizationType = "3D_TEMPORAL" if temporal else "3D"


def _shared_groups(geometry: _Geometry, rescale_slope: float) -> Dataset:
    shared = Dataset()
    shared.PixelMeasuresSequence = _item(
        PixelSpacing=_ds([geometry.row_spacing_mm, geometry.column_spacing_mm]),
        SliceThickness=format_number_as_ds(float(geometry.slice_spacing_mm)),
        SpacingBetweenSlices=format_number_as_ds(float(geometry.slice_spacing_mm)),
    )
    shared.PixelValueTransformationSequence = _item(
        RescaleIntercept="0", RescaleSlope=format_number_as_ds(float(rescale_slope)), RescaleType="US"
    )
    shared.FrameVOILUTSequence = _item(WindowCenter="600", WindowWidth="1200")
    shared.FrameAnatomySequence = _item(
        AnatomicRegionSequence=DicomSequence([_code("69536005", "SCT", "Head")]), FrameLaterality="U"
    )
    shared.MRImageFrameTypeSequence = _item(
        FrameType=["ORIGINAL", "PRIMARY", "T1", "NONE"],
        PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE",
        ComplexImageComponent="MAGNITUDE",
        AcquisitionContrast="T1",
    )
    shared.MRTimingAndRelatedParametersSequence = _item(
        RepetitionTime="2300",
        FlipAngle="9",
        EchoTrainLength=1,
        RFEchoTrainLength=1,
        GradientEchoTrainLength=1,
        SpecificAbsorptionRateSequence=_item(
            SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=0.4
        ),
        GradientOutputType="DB_DT",
        GradientOutput=22.0,
        OperatingModeSequence=DicomSequence(
            [
                _item(OperatingModeType=mode_type, OperatingMode="IEC_NORMAL")[0]
                for mode_type in ("STATIC FIELD", "RF", "GRADIENT")
            ]
        ),
    )
    shared.MRFOVGeometrySequence = _item(
        InPlanePhaseEncodingDirection="ROW",
        MRAcquisitionFrequencyEncodingSteps=geometry.columns,
        MRAcquisitionPhaseEncodingStepsInPlane=geometry.rows,
        MRAcquisitionPhaseEncodingStepsOutOfPlane=geometry.slices,
        PercentSampling="100",
        PercentPhaseFieldOfView="100",
    )
    shared.MREchoSequence = _item(EffectiveEchoTime=2.98)
    shared.MRModifierSequence = _item(
        InversionRecovery="YES",
        InversionTimes=[900.0],
        FlowCompensation="NONE",
        Spoiling="RF",
        T2Preparation="NO",
        SpectrallySelectedExcitation="NONE",
        SpatialPresaturation="NONE",
        PartialFourier="NO",
        ParallelAcquisition="NO",
    )
    shared.MRImagingModifierSequence = _item(
        MagnetizationTransfer="NONE",
        BloodSignalNulling="NO",
        Tagging="NONE",
        TransmitterFrequency=123.2,
        PixelBandwidth=240.0,
    )
    shared.MRReceiveCoilSequence = _item(
        ReceiveCoilName="HEAD",
        ReceiveCoilManufacturerName="",
        ReceiveCoilType="VOLUME",
        QuadratureReceiveCoil="YES",
    )
    shared.MRTransmitCoilSequence = _item(
        TransmitCoilName="BODY", TransmitCoilManufacturerName="", TransmitCoilType="BODY"
    )
    shared.MRAveragesSequence = _item(NumberOfAverages="1")
    return shared


def _per_frame_groups(frame: _PlannedFrame, now: datetime.datetime, mixed_orientation: bool) -> Dataset:
    per_frame = Dataset()
    content = Dataset()
    content.FrameAcquisitionNumber = 1
    content.FrameReferenceDateTime = now.strftime("%Y%m%d%H%M%S")
    content.FrameAcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    content.FrameAcquisitionDuration = 6250.0
    content.StackID = "1"
    content.InStackPositionNumber = frame.slice_index + 1
    index_values = [1, frame.slice_index + 1]
    if frame.temporal_position is not None:
        content.TemporalPositionIndex = frame.temporal_position
        index_values.append(frame.temporal_position)
    if frame.b_value is not None:
        index_values.append(frame.volume_index)
    content.DimensionIndexValues = index_values
    per_frame.FrameContentSequence = DicomSequence([content])
    per_frame.PlanePositionSequence = _item(ImagePositionPatient=_ds(frame.ipp_mm))
    if mixed_orientation:
        per_frame.PlaneOrientationSequence = _item(ImageOrientationPatient=_ds(frame.iop))
    if frame.b_value is not None:
        per_frame.MRDiffusionSequence = _item(
            DiffusionBValue=frame.b_value, DiffusionDirectionality="ISOTROPIC" if frame.b_value else "NONE"
        )
    return per_frame
