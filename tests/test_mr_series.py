"""The series checks and the MR volume: geometry against SimpleITK (GDCM) and highdicom, defects refused."""

from __future__ import annotations

import dataclasses
import random
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813

from dicom_node.errors import LoadError, SeriesCheckError
from dicom_node.mr_series import (
    ENHANCED_MR_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    CheckedSeries,
    check_series,
    load_mr_volume,
    read_headers,
)
from dicom_node.synthetic_mr import generate_mr_series

REAL_MR_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mr"
SMALL = dict(slices=8, rows=24, columns=20, pixel_spacing_mm=(8.0, 7.0), slice_spacing_mm=9.0)


def _check(paths: Sequence[Path]) -> CheckedSeries:
    return check_series(read_headers(paths), paths)


def _sitk_series(paths: Sequence[Path]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(Path(paths[0]).parent)))
    return reader.Execute()


def _assert_grid_matches_image(checked: CheckedSeries, image: sitk.Image) -> None:
    assert checked.grid.size == image.GetSize()
    np.testing.assert_allclose(checked.grid.spacing_mm, image.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(checked.grid.origin_mm, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(checked.grid.direction, image.GetDirection(), atol=1e-6)


# ------------------------------------------------------------------------------------ real scanner series

REAL_SERIES = {
    # name: (slices, rows, columns, pixel spacing (row, column), slice spacing, orientation)
    "ge_mprage_axial": (130, 256, 256, (0.9375, 0.9375), 1.2, "oblique axial"),
    "philips_mprage_sagittal": (170, 256, 256, (1.0, 1.0), 1.0, "oblique sagittal"),
}


@dataclasses.dataclass(frozen=True)
class RealSeries:
    name: str
    paths: list[Path]
    checked: CheckedSeries
    reference: sitk.Image  # read by SimpleITK's ImageSeriesReader (GDCM)


@pytest.fixture(scope="module", params=sorted(REAL_SERIES))
def real_series(request: pytest.FixtureRequest) -> RealSeries:
    folder = REAL_MR_ROOT / request.param
    paths = sorted(folder.glob("*")) if folder.is_dir() else []
    if not paths:
        pytest.skip(f"real MR series {request.param} not found under {REAL_MR_ROOT} (shared data absent)")
    shuffled = list(paths)
    random.Random(0).shuffle(shuffled)  # the checks must not depend on file order
    return RealSeries(request.param, paths, _check(shuffled), _sitk_series(paths))


def test_real_series_grid_matches_simpleitk(real_series: RealSeries) -> None:
    checked = real_series.checked
    slices, rows, columns, (row_spacing, column_spacing), slice_spacing, orientation = REAL_SERIES[real_series.name]
    assert checked.grid.size == (columns, rows, slices)
    np.testing.assert_allclose(checked.grid.spacing_mm, (column_spacing, row_spacing, slice_spacing), rtol=1e-5)
    assert checked.orientation_label == orientation
    assert checked.sop_class_uid == MR_IMAGE_STORAGE and not checked.is_enhanced
    assert len(checked.slices) == slices and {s.path for s in checked.slices} == set(real_series.paths)
    _assert_grid_matches_image(checked, real_series.reference)
    # slices in spatial order: ImagePositionPatient k is the grid's point (0, 0, k)
    points = checked.grid.index_to_point(np.array([[0, 0, k] for k in range(slices)]))
    np.testing.assert_allclose([s.ipp_mm for s in checked.slices], points, atol=1e-3)


def test_real_series_volume_matches_simpleitk(real_series: RealSeries) -> None:
    volume = load_mr_volume(real_series.checked)
    expected = sitk.GetArrayFromImage(real_series.reference).astype(np.float64)
    assert volume.array.dtype == np.float32 and volume.grid == real_series.checked.grid
    assert expected.max() > 100  # a real image, not zeros
    np.testing.assert_allclose(volume.array, expected, rtol=1e-6, atol=1e-3)  # Philips: RescaleSlope 2.36


# ------------------------------------------------------------------------------------ generated series


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_generated_series_pass_with_the_simpleitk_grid(tmp_path: Path, orientation: str) -> None:
    paths = generate_mr_series(tmp_path, orientation=orientation, tilt_deg=5.0, **SMALL)
    checked = _check(paths[::-1])
    image = _sitk_series(paths)
    _assert_grid_matches_image(checked, image)
    np.testing.assert_array_equal(load_mr_volume(checked).array, sitk.GetArrayFromImage(image))
    assert checked.grid.spacing_mm == pytest.approx((7.0, 8.0, 9.0))  # PixelSpacing is (row, column)


@pytest.fixture(scope="module")
def oblique_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    """The same phantom (same seed) as single-frame files and as one Enhanced MR file, RescaleSlope 2.5."""
    options = dict(SMALL, orientation="oblique", seed=7, rescale_slope=2.5)
    single = generate_mr_series(tmp_path_factory.mktemp("single"), **options)
    enhanced = generate_mr_series(tmp_path_factory.mktemp("enhanced"), enhanced=True, **options)
    return single, enhanced


def test_enhanced_gives_the_grid_and_volume_of_the_single_frame_series(
    oblique_pair: tuple[list[Path], list[Path]],
) -> None:
    single, enhanced = oblique_pair
    assert len(enhanced) == 1
    checked_single, checked_enhanced = _check(single), _check(enhanced)
    assert checked_enhanced.is_enhanced and checked_enhanced.sop_class_uid == ENHANCED_MR_IMAGE_STORAGE
    assert [s.frame_number for s in checked_enhanced.slices] == list(range(SMALL["slices"], 0, -1))
    assert checked_enhanced.grid.size == checked_single.grid.size
    for field in ("spacing_mm", "origin_mm", "direction"):
        np.testing.assert_allclose(
            getattr(checked_enhanced.grid, field), getattr(checked_single.grid, field), atol=1e-9
        )
    volume_single, volume_enhanced = load_mr_volume(checked_single), load_mr_volume(checked_enhanced)
    np.testing.assert_array_equal(volume_enhanced.array, volume_single.array)
    assert volume_single.array.max() > 500 and np.all(volume_single.array % 2.5 == 0)  # the slope applied


def test_enhanced_geometry_matches_highdicom(oblique_pair: tuple[list[Path], list[Path]]) -> None:
    """An independent reader of the multi-frame geometry: every voxel at the same LPS point, same value."""
    _, enhanced = oblique_pair
    volume = load_mr_volume(_check(enhanced))
    reference = highdicom.imread(str(enhanced[0])).get_volume()  # frames in file order, (slice, row, column)
    rng = np.random.default_rng(0)
    index_xyz = rng.integers(0, volume.grid.size, size=(50, 3))
    points = volume.grid.index_to_point(index_xyz)
    reference_index = np.linalg.solve(reference.affine, np.c_[points, np.ones(len(points))].T).T[:, :3]
    np.testing.assert_allclose(reference_index, np.round(reference_index), atol=1e-6)
    k, j, i = np.round(reference_index).astype(int).T
    np.testing.assert_allclose(
        volume.array[index_xyz[:, 2], index_xyz[:, 1], index_xyz[:, 0]], reference.array[k, j, i], rtol=1e-6
    )


# ------------------------------------------------------------------------------------ defects


@pytest.mark.parametrize("enhanced", [False, True], ids=["single-frame", "enhanced"])
@pytest.mark.parametrize(
    ("defect", "reason"),
    [
        pytest.param(
            dict(drop_slices=[3]),
            r"^missing slice\(s\): gap of 18\.00 mm after slice 3 \(of 7 received\) "
            r"where spacing is 9\.00 mm \(1 slice missing\)$",
            id="missing",
        ),
        pytest.param(
            dict(drop_slices=[2, 3, 5]),
            r"^missing slice\(s\): gap of 27\.00 mm after slice 2 .*\(2 slices missing\); "
            r"2 gaps, 3 slices missing in all$",
            id="missing-several",
        ),
        pytest.param(
            dict(duplicate_slices=[4]),
            r"^duplicate slice positions: 1 of 8 positions holds more than one slice "
            r"\(first at slice 5, 2 slices there\)$",
            id="duplicate",
        ),
        pytest.param(
            dict(temporal_positions=3),
            r"^4D series: 3 volumes at 8 positions \(3 temporal positions: 1, 2, 3\)$",
            id="dynamic-4d",
        ),
        pytest.param(
            dict(diffusion_b_values=[0, 1000]),
            r"^4D series: 2 volumes at 8 positions \(2 b-values: 0\.0, 1000\.0\)$",
            id="diffusion-4d",
        ),
        pytest.param(
            dict(mixed_orientation=True),
            r"^mixed orientations: 2 ImageOrientationPatient values: "
            r"axial \[1, 0, 0, 0, 1, 0\] in 4 slices; coronal \[1, 0, 0, 0, 0, -1\] in 4 slices$",
            id="mixed-orientation",
        ),
        pytest.param(dict(slices=1), r"^too few slices: 1 \(a volume needs at least 4\)$", id="single-slice"),
        pytest.param(dict(slices=3), r"^too few slices: 3 \(a volume needs at least 4\)$", id="three-slices"),
        pytest.param(
            dict(slices=6, rows=3, columns=16),
            r"^images too small: 3 x 16 pixels \(a volume needs at least 4 x 4\)$",
            id="three-rows",
        ),
    ],
)
def test_defective_series_are_refused_with_the_reason(
    tmp_path: Path, defect: dict, reason: str, enhanced: bool
) -> None:
    paths = generate_mr_series(tmp_path, enhanced=enhanced, **{**SMALL, **defect})
    with pytest.raises(SeriesCheckError, match=reason):
        _check(paths)


@pytest.fixture
def small_series(tmp_path: Path) -> tuple[list[Path], list[pydicom.Dataset]]:
    paths = generate_mr_series(tmp_path / "a", **SMALL)
    return paths, read_headers(paths)


def test_two_frames_of_reference(small_series: tuple[list[Path], list[pydicom.Dataset]]) -> None:
    paths, headers = small_series
    other_frame_of_reference = pydicom.uid.generate_uid()
    for ds in headers[:3]:
        ds.FrameOfReferenceUID = other_frame_of_reference
    with pytest.raises(
        SeriesCheckError,
        match=r"^more than one frame of reference: 2 FrameOfReferenceUIDs \(5 \+ 3 instances\)$",
    ):
        check_series(headers, paths)


def test_no_frame_of_reference(small_series: tuple[list[Path], list[pydicom.Dataset]]) -> None:
    paths, headers = small_series
    del headers[0].FrameOfReferenceUID
    with pytest.raises(SeriesCheckError, match=r"^no FrameOfReferenceUID in 1 of 8 instances$"):
        check_series(headers, paths)


def test_two_series_mixed(tmp_path: Path, small_series: tuple[list[Path], list[pydicom.Dataset]]) -> None:
    paths, headers = small_series
    other = generate_mr_series(tmp_path / "b", series_number=4, **SMALL)
    with pytest.raises(SeriesCheckError, match=r"^more than one series: 2 SeriesInstanceUIDs \(8 \+ 8 instances\)$"):
        check_series(headers + read_headers(other), paths + other)


def test_single_and_multi_frame_mixed(tmp_path: Path, small_series: tuple[list[Path], list[pydicom.Dataset]]) -> None:
    paths, headers = small_series
    enhanced = read_headers(generate_mr_series(tmp_path / "b", enhanced=True, **SMALL))[0]
    enhanced.SeriesInstanceUID = headers[0].SeriesInstanceUID
    with pytest.raises(
        SeriesCheckError,
        match=r"^mixed SOP classes in one series: MR Image Storage \(8\), "
        r"Enhanced MR Image Storage \(1\)$",
    ):
        check_series([*headers, enhanced], [*paths, tmp_path / "enhanced.dcm"])


def test_not_mr(small_series: tuple[list[Path], list[pydicom.Dataset]]) -> None:
    paths, headers = small_series
    for ds in headers:
        ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.2", "CT"
    with pytest.raises(SeriesCheckError, match=r"^not an MR image series: CT Image Storage"):
        check_series(headers, paths)
    for ds in headers:
        ds.SOPClassUID = MR_IMAGE_STORAGE
    with pytest.raises(SeriesCheckError, match=r"^not an MR series: Modality CT$"):
        check_series(headers, paths)


def test_same_instance_twice(small_series: tuple[list[Path], list[pydicom.Dataset]]) -> None:
    paths, headers = small_series
    with pytest.raises(SeriesCheckError, match=r"^the same SOPInstanceUID in more than one file"):
        check_series([*headers, headers[0]], [*paths, paths[0]])


def _along(ds: pydicom.Dataset, offset_mm: Sequence[float]) -> None:
    ds.ImagePositionPatient = [float(v) + o for v, o in zip(ds.ImagePositionPatient, offset_mm, strict=True)]


def test_non_uniform_spacing(small_series: tuple[list[Path], list[pydicom.Dataset]]) -> None:
    paths, headers = small_series
    _along(headers[3], (0.0, 0.0, 0.9))  # axial: z is the normal; 10 % of the 9 mm spacing
    with pytest.raises(SeriesCheckError, match=r"^non-uniform slice spacing: 2 steps between 8\.100 and 9\.900 mm"):
        check_series(headers, paths)


def test_small_position_noise_is_tolerated(small_series: tuple[list[Path], list[pydicom.Dataset]]) -> None:
    paths, headers = small_series
    _along(headers[3], (0.004, -0.004, 0.004))  # the rounding of IPP strings written with few decimals
    assert _check(paths).grid.size == check_series(headers, paths).grid.size


def test_slow_spacing_drift(small_series: tuple[list[Path], list[pydicom.Dataset]]) -> None:
    """Each step within tolerance, but the positions wander off any regular grid."""
    paths, headers = small_series
    by_z = sorted(headers, key=lambda ds: float(ds.ImagePositionPatient[2]))
    for k, ds in enumerate(by_z):
        _along(ds, (0.0, 0.0, 0.06 * min(k, 7 - k)))  # steps of 9.06 then 8.94 mm
    with pytest.raises(SeriesCheckError, match=r"^non-uniform slice spacing: slice 4 of 8 lies 0\.180 mm off"):
        check_series(headers, paths)


def test_sheared_stack(small_series: tuple[list[Path], list[pydicom.Dataset]]) -> None:
    paths, headers = small_series
    for ds in headers:
        _along(ds, (0.0, 0.2 * float(ds.ImagePositionPatient[2]) / 9.0, 0.0))  # a gantry tilt along y
    with pytest.raises(SeriesCheckError, match=r"^sheared slice stack .* drift 1\.40 mm within the slice plane"):
        check_series(headers, paths)


def test_differing_image_size_and_pixel_spacing(
    small_series: tuple[list[Path], list[pydicom.Dataset]],
) -> None:
    paths, headers = small_series
    headers[0].Rows = 48
    with pytest.raises(
        SeriesCheckError,
        match=r"^differing image sizes \(Rows x Columns\): 24x20 in 7 slices; "
        r"48x20 in 1 slice$",
    ):
        check_series(headers, paths)
    headers[0].Rows = 24
    headers[0].PixelSpacing = [8.0, 7.5]
    with pytest.raises(
        SeriesCheckError,
        match=r"^differing pixel spacings \(PixelSpacing\): 8, 7 mm in 7 slices; "
        r"8, 7\.5 mm in 1 slice$",
    ):
        check_series(headers, paths)


def test_declared_dynamic_series_with_one_time_point(
    small_series: tuple[list[Path], list[pydicom.Dataset]],
) -> None:
    paths, headers = small_series
    for ds in headers:
        ds.NumberOfTemporalPositions = 20
    with pytest.raises(SeriesCheckError, match=r"^4D series: NumberOfTemporalPositions is 20 \(dynamic\)"):
        check_series(headers, paths)


def test_missing_geometry(small_series: tuple[list[Path], list[pydicom.Dataset]]) -> None:
    paths, headers = small_series
    del headers[2].ImagePositionPatient
    with pytest.raises(SeriesCheckError, match=rf"^file {paths[2].name}: ImagePositionPatient missing or invalid"):
        check_series(headers, paths)


def test_enhanced_multi_frame_4d_with_shared_and_per_frame_groups(tmp_path: Path) -> None:
    """A dynamic Enhanced MR series: TemporalPositionIndex in the per-frame Frame Content Sequence."""
    paths = generate_mr_series(tmp_path, enhanced=True, temporal_positions=2, **SMALL)
    ds = read_headers(paths)[0]
    assert ds.NumberOfFrames == 16 and "PlaneOrientationSequence" in ds.SharedFunctionalGroupsSequence[0]
    with pytest.raises(SeriesCheckError, match=r"^4D series: 2 volumes at 8 positions \(2 temporal positions"):
        check_series([ds], paths)


# ------------------------------------------------------------------------------------ read and load errors


def test_read_headers_names_the_unreadable_file(tmp_path: Path) -> None:
    paths = generate_mr_series(tmp_path, **SMALL)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM at all" * 10)
    with pytest.raises(LoadError, match=r"broken\.dcm") as raised:
        read_headers([*paths, broken])
    assert "PHANTOM001" not in str(raised.value) and "Phantom" not in str(raised.value)


def test_load_fails_when_a_file_changed_after_the_check(tmp_path: Path) -> None:
    paths = generate_mr_series(tmp_path / "a", **SMALL)
    checked = _check(paths)
    other = generate_mr_series(tmp_path / "b", **SMALL)
    shutil.copyfile(other[0], paths[0])
    with pytest.raises(LoadError, match=r"no longer holds the instance that was checked"):
        load_mr_volume(checked)
    paths[0].unlink()
    with pytest.raises(LoadError, match=rf"cannot read .*{paths[0].name}"):
        load_mr_volume(checked)


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="DCMTK dcmcjpeg not installed")
def test_jpeg_lossless_pixels_are_decoded_with_gdcm(tmp_path: Path) -> None:
    """pydicom here has no JPEG Lossless decoder; GDCM (through SimpleITK) decodes, same values."""
    paths = generate_mr_series(tmp_path / "raw", rescale_slope=2.0, **SMALL)
    (tmp_path / "jpeg").mkdir()
    compressed = []
    for path in paths:
        target = tmp_path / "jpeg" / path.name
        subprocess.run(["dcmcjpeg", "+e1", str(path), str(target)], check=True, capture_output=True)
        compressed.append(target)
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    np.testing.assert_array_equal(load_mr_volume(_check(compressed)).array, load_mr_volume(_check(paths)).array)


# ------------------------------------------------------------------------------------ pixel data vs header
# Found by tests/reliability/test_fuzz_dicom.py: a slice whose header is sound but whose pixel data
# is missing, cut short or not what the header says passed the checks, was routed, and failed the
# job at load; the series check now quarantines it with the reason.


def _rewrite_pixels(path: Path, change: dict[str, object], pixel_bytes: bytes | None) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    if pixel_bytes is None:
        del ds.PixelData
    else:
        ds.PixelData = pixel_bytes
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    ("change", "pixels", "reason"),
    [
        pytest.param({}, None, r": no pixel data$", id="missing"),
        pytest.param(
            {}, b"\x00" * 100, r": 100 bytes of pixel data where Rows x Columns x BitsAllocated make 960$", id="short"
        ),
        pytest.param({}, b"\x00" * 1920, r": 1920 bytes of pixel data .* make 960$", id="too-long"),
        pytest.param({"BitsAllocated": 8}, "same", r": 960 bytes of pixel data .* make 480$", id="bits-allocated-8"),
        pytest.param({"BitsAllocated": 12}, "same", r": BitsAllocated is 12 \(8, 16 or 32 expected\)$", id="bits-12"),
        pytest.param({"SamplesPerPixel": 0}, "same", r": SamplesPerPixel missing or invalid$", id="samples-0"),
    ],
)
def test_a_slice_whose_pixel_data_does_not_fit_its_header_fails_the_check(
    tmp_path: Path, change: dict[str, object], pixels: bytes | str | None, reason: str
) -> None:
    paths = generate_mr_series(tmp_path, **SMALL)  # 24 x 20 pixels of 16 bits: 960 bytes
    _check(paths)
    victim = paths[3]
    same = pydicom.dcmread(victim).PixelData
    _rewrite_pixels(victim, change, same if pixels == "same" else pixels)  # type: ignore[arg-type]
    with pytest.raises(SeriesCheckError, match=rf"^file {victim.name}{reason}"):
        _check(paths)


def test_a_slice_cut_short_in_its_pixel_data_fails_the_check(tmp_path: Path) -> None:
    paths = generate_mr_series(tmp_path, **SMALL)
    paths[5].write_bytes(paths[5].read_bytes()[:-10])
    with pytest.raises(
        SeriesCheckError, match=rf"^file {paths[5].name}: the pixel data cannot be read: .*past the end"
    ):
        _check(paths)


def test_native_pixels_labelled_compressed_fail_the_check(tmp_path: Path) -> None:
    paths = generate_mr_series(tmp_path, **SMALL)
    data = paths[0].read_bytes()  # the meta says RLE Lossless (same UID length), the bytes stay native
    assert data.count(b"1.2.840.10008.1.2.1\x00") == 1
    paths[0].write_bytes(data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.5\x00"))
    with pytest.raises(SeriesCheckError, match=r"not encapsulated although the transfer syntax is RLE Lossless"):
        _check(paths)


def test_compressed_and_deflated_series_pass_the_pixel_data_check(tmp_path: Path) -> None:
    paths = generate_mr_series(tmp_path / "raw", **SMALL)
    for syntax in (
        pydicom.uid.RLELossless,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
    ):
        folder = tmp_path / syntax.name.replace(" ", "_")
        folder.mkdir()
        converted = []
        for path in paths:
            ds = pydicom.dcmread(path)
            if syntax == pydicom.uid.RLELossless:
                ds.compress(syntax)
            else:
                ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(folder / path.name, enforce_file_format=True)
            converted.append(folder / path.name)
        np.testing.assert_array_equal(load_mr_volume(_check(converted)).array, load_mr_volume(_check(paths)).array)


@pytest.mark.parametrize(
    ("keyword", "vr"),
    [("PixelSpacing", "UI"), ("ImagePositionPatient", "UI"), ("ImageOrientationPatient", "LO"), ("PixelSpacing", "OB")],
)
def test_geometry_sent_with_another_vr_fails_the_check(tmp_path: Path, keyword: str, vr: str) -> None:
    """Found by tests/reliability/test_fuzz_dicom.py: PixelSpacing sent with VR UI passed the check (its
    text converts to numbers) and failed the job in the sCT writer, which needs numbers; two bytes of
    OB passed as two numbers."""
    paths = generate_mr_series(tmp_path, **SMALL)
    ds = pydicom.dcmread(paths[2])
    text = "\\".join(str(v) for v in ds[keyword].value)
    ds.add_new(ds[keyword].tag, vr, b"\x01\x01" if vr == "OB" else text)  # the same digits, another VR
    ds.save_as(paths[2], enforce_file_format=True)
    written = pydicom.dcmread(paths[2])[keyword]
    assert str(written.VR) == vr
    with pytest.raises(SeriesCheckError, match=rf"^file {paths[2].name}: {keyword} missing or invalid"):
        _check(paths)


def test_an_attribute_pydicom_cannot_read_fails_the_check(tmp_path: Path) -> None:
    """Found by tests/reliability/test_fuzz_dicom.py: ImagePositionPatient with the unknown VR "ES"
    made pydicom raise inside the check; the error escaped it and the sweep retried the series forever."""
    paths = generate_mr_series(tmp_path, **SMALL)
    data = paths[4].read_bytes()
    ipp = struct.pack("<HH", 0x0020, 0x0032) + b"DS"
    assert data.count(ipp) == 1
    paths[4].write_bytes(data.replace(ipp, struct.pack("<HH", 0x0020, 0x0032) + b"ES"))
    headers = read_headers(paths)  # pydicom converts values only when they are used
    unreadable = r"^a header attribute cannot be read: .*Unknown Value Representation 'ES'"
    with pytest.raises(SeriesCheckError, match=unreadable):
        check_series(headers, paths)


def test_an_attribute_only_the_sct_copies_fails_the_check_when_unreadable(tmp_path: Path) -> None:
    """The check reads the geometry; the sCT writer copies the patient and study modules: with a
    value its VR cannot hold there (PatientName as FD, 12 bytes), the series passed the check and its
    job failed in the writer, after sampling. Now the series is quarantined when it closes, with
    the attribute named."""
    paths = generate_mr_series(tmp_path, **SMALL)
    name = struct.pack("<HH", 0x0010, 0x0010) + b"PN"
    for path in paths:
        data = path.read_bytes()
        assert data.count(name) == 1
        path.write_bytes(data.replace(name, struct.pack("<HH", 0x0010, 0x0010) + b"FD"))
    with pytest.raises(SeriesCheckError, match=r"^the MR's PatientName cannot be copied into the sCT: BytesLength"):
        check_series(read_headers(paths), paths)


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("StudyInstanceUID", "1.2.3.4.5.6", r"^more than one study: 2 StudyInstanceUIDs \(7 \+ 1 instances\)$"),
        ("PatientID", "PHANTOM002", r"^more than one patient: 2 PatientIDs \(7 \+ 1 instances\)$"),
    ],
)
def test_one_slice_of_another_study_or_patient_fails_the_check(
    tmp_path: Path, keyword: str, value: str, reason: str
) -> None:
    """Found by tests/reliability/test_fuzz_dicom.py: a slice whose StudyInstanceUID differed (one
    digit changed) passed the check and failed the job in the sCT writer; one of another patient
    passed too."""
    paths = generate_mr_series(tmp_path, **SMALL)
    ds = pydicom.dcmread(paths[5])
    setattr(ds, keyword, value)
    ds.save_as(paths[5], enforce_file_format=True)
    with pytest.raises(SeriesCheckError, match=reason):
        _check(paths)
