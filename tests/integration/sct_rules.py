"""Every rule of DESIGN.md §3 for the sCT series, checked on the files a PACS holds."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from dicom_node.mr_series import check_series
from sct_model.volume import axial_grid_covering
from tests.integration.harness import dciodvfy

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def read_datasets(files: Sequence[bytes]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(io.BytesIO(f)) for f in files]


def check_sct_series(
    sct: Sequence[pydicom.Dataset], mr_headers: Sequence[pydicom.Dataset], mr_paths: Sequence[Path]
) -> None:
    assert sct, "no sCT instances"
    mr = mr_headers[0]
    expected_grid = axial_grid_covering(check_series(mr_headers, mr_paths).grid)
    assert len(sct) == expected_grid.size[2], f"{len(sct)} slices, expected {expected_grid.size[2]}"
    assert len({d.SeriesInstanceUID for d in sct}) == 1
    assert len({d.SOPInstanceUID for d in sct}) == len(sct)
    assert sct[0].SeriesInstanceUID != mr.SeriesInstanceUID
    mr_sop_uids = {str(h.SOPInstanceUID) for h in mr_headers}
    for ds in sct:
        assert ds.SOPClassUID == CT_IMAGE_STORAGE and ds.Modality == "CT"
        assert ds.SyntheticData == "YES"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert "SYNTHETIC" in ds.SeriesDescription.upper()
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
            "StudyID",
            "StudyDate",
            "AccessionNumber",
        ):
            assert str(ds.get(keyword, "")) == str(mr.get(keyword, "")), keyword
        assert ds.FrameOfReferenceUID == mr.FrameOfReferenceUID
        referenced = {str(item.ReferencedSOPInstanceUID) for item in ds.SourceImageSequence}
        assert referenced == mr_sop_uids
        (related,) = ds.RelatedSeriesSequence  # the MR series, with why (compact references: the default)
        assert related.SeriesInstanceUID == mr.SeriesInstanceUID
        assert related.StudyInstanceUID == mr.StudyInstanceUID
        purpose = related.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121323", "DCM")
        equipment = ds.ContributingEquipmentSequence[0]
        assert (
            equipment.PurposeOfReferenceCodeSequence[0].CodeValue,
            equipment.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator,
            equipment.PurposeOfReferenceCodeSequence[0].CodeMeaning,
        ) == ("109100", "DCM", "Synthesizing Equipment")
        for word in ("seed", "steps", "sha256"):
            assert word in ds.DerivationDescription.lower(), ds.DerivationDescription
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert ds.RescaleSlope == 1 and ds.RescaleType == "HU"
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu.min() >= -1024 and hu.max() <= 3071
    # Geometry: uniform spacing along z, the expected grid, covering the MR.
    ordered = sorted(sct, key=lambda d: float(d.ImagePositionPatient[2]))
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in ordered])
    steps = np.diff(positions[:, 2])
    assert np.allclose(steps, expected_grid.spacing_mm[2], atol=1e-3), steps
    assert np.allclose(positions[:, :2], positions[0, :2], atol=1e-3)
    assert np.allclose(positions[0], expected_grid.origin_mm, atol=1e-2)
    first = ordered[0]
    assert (int(first.Columns), int(first.Rows)) == expected_grid.size[:2]
    assert np.allclose([float(first.PixelSpacing[1]), float(first.PixelSpacing[0])], expected_grid.spacing_mm[:2])
    assert np.isclose(float(first.SliceThickness), expected_grid.spacing_mm[2])
    mr_grid = check_series(mr_headers, mr_paths).grid
    low = positions[0] - np.asarray(expected_grid.spacing_mm) / 2
    high = positions[-1] + np.asarray(expected_grid.spacing_mm) * (np.array([first.Columns, first.Rows, 1]) - 0.5)
    corners = mr_grid.corner_points()
    assert np.all(corners >= low - 1e-3) and np.all(corners <= high + 1e-3), "the sCT grid does not cover the MR"


def run_dciodvfy(paths: Sequence[Path]) -> None:
    validator = dciodvfy()
    for path in paths:
        result = subprocess.run([validator, str(path)], capture_output=True, text=True, timeout=120)
        output = result.stdout + result.stderr
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert not errors, f"dciodvfy on {path.name}:\n{output}"
