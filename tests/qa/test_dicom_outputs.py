"""What goes to the PACS with the sCT (dicom_node.qa.dicom_outputs): the QA report as an Encapsulated PDF
and the uncertainty as a float Parametric Map, both valid for dciodvfy, in the MR's patient, study and
(the map) frame of reference, and never a CT image.

The MR is the generated phantom series (headers only are used), the sCT a small series made with the
node's own writer on a coarse axial grid covering it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, EncapsulatedPDFStorage, ExplicitVRLittleEndian, ParametricMapStorage

from dicom_node.mr_series import check_series, read_headers
from dicom_node.qa.dicom_outputs import build_report_document, build_uncertainty_map, write_dataset
from dicom_node.sct_writer import build_ct_series
from dicom_node.synthetic_mr import generate_mr_series
from sct_model.result import PredictorInfo
from sct_model.volume import Grid, Volume
from tests.test_sct_writer import dciodvfy, error_lines

UID_PREFIX = "1.2.826.0.1.3680043.8.498."
SCT_SERIES_UID = UID_PREFIX + "101"
REPORT_SERIES_UID, REPORT_SOP_UID = UID_PREFIX + "201", UID_PREFIX + "202"
MAP_SERIES_UID, MAP_SOP_UID = UID_PREFIX + "301", UID_PREFIX + "302"
CREATED = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
INFO = PredictorInfo("diffusion", "sct-ldm-demo", "0.1.0+ckpt.3", "3f" * 32, "DDIM", "cpu")
# An odd length, so that the padding to an even length shows
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


@dataclass(frozen=True)
class Source:
    mr_headers: list[pydicom.Dataset]
    sct: list[pydicom.FileDataset]
    std: Volume


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    folder = tmp_path_factory.mktemp("mr")
    paths = generate_mr_series(
        folder, slices=8, rows=20, columns=18, pixel_spacing_mm=10.0, slice_spacing_mm=10.0, patient_name="Doe^Jane"
    )
    headers = read_headers(paths)
    mr_grid = check_series(headers, paths).grid
    centre = mr_grid.index_to_point((np.asarray(mr_grid.size) - 1) / 2)[0]
    size = np.array([12, 10, 7])
    spacing = np.array([14.0, 16.0, 11.0])  # anisotropic: a swapped axis shows
    grid = Grid(size=tuple(size), spacing_mm=tuple(spacing), origin_mm=tuple(centre - (size - 1) / 2 * spacing))
    rng = np.random.default_rng(7)
    hu = Volume(rng.normal(0.0, 300.0, grid.shape_zyx).astype(np.float32), grid)
    sct = build_ct_series(
        headers, hu, info=INFO, steps=50, samples=4, seed=1, series_instance_uid=SCT_SERIES_UID, created=CREATED
    )
    std_values = (rng.gamma(2.0, 15.0, grid.shape_zyx) * (rng.random(grid.shape_zyx) > 0.2)).astype(np.float32)
    std_values[3, 4, 5] = np.float32(123.456789)  # not representable in fewer than 32 bits
    return Source(headers, sct, Volume(std_values, grid))


def sources_of(source: Source) -> list[tuple[str, str]]:
    return [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in (*source.mr_headers, *source.sct)]


def report_document(source: Source, **overrides: object) -> pydicom.FileDataset:
    arguments: dict[str, object] = dict(
        mr_header=source.mr_headers[0],
        sources=sources_of(source),
        series_instance_uid=REPORT_SERIES_UID,
        sop_instance_uid=REPORT_SOP_UID,
        series_number=1101,
        created=CREATED,
        title="sCT QA report, job 42: released",
    )
    arguments.update(overrides)
    pdf = arguments.pop("pdf", PDF)
    return build_report_document(pdf, **arguments)  # type: ignore[arg-type]


def uncertainty_map(source: Source, **overrides: object) -> pydicom.Dataset:
    mr = source.mr_headers[0]
    arguments: dict[str, object] = dict(
        mr_series_reference=(str(mr.StudyInstanceUID), str(mr.SeriesInstanceUID)),
        series_instance_uid=MAP_SERIES_UID,
        sop_instance_uid=MAP_SOP_UID,
        series_number=1102,
        created=CREATED,
    )
    arguments.update(overrides)
    std = arguments.pop("std", source.std)
    sct = arguments.pop("sct", source.sct)
    return build_uncertainty_map(std, sct, **arguments)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def written(source: Source, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("outputs")
    return {
        "report": write_dataset(report_document(source), folder / "report.dcm"),
        "map": write_dataset(uncertainty_map(source), folder / "uncertainty.dcm"),
    }


# --- validity -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["report", "map"])
def test_dciodvfy_reports_no_error(written: dict[str, Path], name: str) -> None:
    report = dciodvfy(written[name])
    assert not error_lines(report), report
    assert not [line for line in report.splitlines() if "Warning" in line], report


def test_files_are_written_atomically_as_dicom_files(written: dict[str, Path]) -> None:
    folder = written["report"].parent
    assert sorted(path.name for path in folder.iterdir()) == ["report.dcm", "uncertainty.dcm"]  # no temporary file
    for path in written.values():
        content = path.read_bytes()
        assert content[128:132] == b"DICM"
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


# --- the report document --------------------------------------------------------------------------------------


def test_report_document_is_an_encapsulated_pdf_in_the_mr_study(source: Source, written: dict[str, Path]) -> None:
    ds = pydicom.dcmread(written["report"])
    mr = source.mr_headers[0]
    assert ds.SOPClassUID == EncapsulatedPDFStorage == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == REPORT_SOP_UID and ds.SeriesInstanceUID == REPORT_SERIES_UID
    assert ds.Modality == "DOC" and ds.SeriesNumber == 1101 and ds.InstanceNumber == 1
    assert "QA REPORT" in ds.SeriesDescription
    for keyword in ("PatientName", "PatientID", "PatientSex", "StudyInstanceUID", "StudyID", "StudyDate"):
        assert ds[keyword].value == mr[keyword].value, keyword
    assert ds.DocumentTitle == "sCT QA report, job 42: released"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.BurnedInAnnotation == "YES" and ds.ConversionType == "WSD"
    assert ds.Manufacturer == "sct-node"
    assert ds.ContentDate == "20260304" and ds.AcquisitionDateTime.startswith("20260304")


def test_report_document_holds_the_pdf_bytes_exactly(written: dict[str, Path]) -> None:
    ds = pydicom.dcmread(written["report"])
    assert len(PDF) % 2 == 1 and len(ds.EncapsulatedDocument) == len(PDF) + 1
    assert ds.EncapsulatedDocumentLength == len(PDF)
    assert ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength] == PDF
    assert ds["EncapsulatedDocument"].VR == "OB"


def test_report_document_lists_every_source_instance(source: Source, written: dict[str, Path]) -> None:
    ds = pydicom.dcmread(written["report"])
    listed = [(item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) for item in ds.SourceInstanceSequence]
    assert listed == sources_of(source)
    assert {sop_class for sop_class, _ in listed} == {str(source.mr_headers[0].SOPClassUID), CTImageStorage}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pdf": b""}, "empty"),
        ({"pdf": b"<html>not a pdf</html>"}, "not a PDF"),
        ({"sources": []}, "no source instances"),
        ({"sources": [("1.2.3", "not a uid")]}, "invalid UID"),
        ({"series_instance_uid": "1.2.3.04"}, "not a valid DICOM UID"),
        ({"series_number": -1}, "series_number"),
        ({"title": "   "}, "title is empty"),
    ],
)
def test_report_document_refuses_bad_input(source: Source, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        report_document(source, **overrides)


def test_report_document_refuses_the_mr_series_uid(source: Source) -> None:
    with pytest.raises(ValueError, match="new one"):
        report_document(source, series_instance_uid=str(source.mr_headers[0].SeriesInstanceUID))


# --- the uncertainty map ---------------------------------------------------------------------------------------


def test_uncertainty_map_is_a_parametric_map_never_a_ct(source: Source, written: dict[str, Path]) -> None:
    ds = pydicom.dcmread(written["map"])
    sct, mr = source.sct[0], source.mr_headers[0]
    assert ds.SOPClassUID == ParametricMapStorage and ds.SOPClassUID != CTImageStorage
    assert ds.Modality != "CT" and "CT" not in ds.ImageType
    assert ds.SeriesInstanceUID == MAP_SERIES_UID and ds.SeriesNumber == 1102
    assert ds.SeriesDescription == "sCT UNCERTAINTY (STD HU)"
    assert "uncertainty" in ds.ContentDescription.lower() and ds.ContentLabel == "SCT_UNCERTAINTY"
    assert ds.PatientID == mr.PatientID and ds.PatientName == mr.PatientName
    assert ds.StudyInstanceUID == mr.StudyInstanceUID
    assert ds.FrameOfReferenceUID == sct.FrameOfReferenceUID == mr.FrameOfReferenceUID
    related = ds.RelatedSeriesSequence[0]
    assert (related.StudyInstanceUID, related.SeriesInstanceUID) == (mr.StudyInstanceUID, mr.SeriesInstanceUID)
    sources = {item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence}
    assert sources == {str(s.SOPInstanceUID) for s in source.sct}


def test_uncertainty_values_are_the_std_on_the_sct_grid(source: Source, written: dict[str, Path]) -> None:
    ds = pydicom.dcmread(written["map"])
    std = source.std
    assert ds.BitsAllocated == 32 and "FloatPixelData" in ds
    assert (int(ds.NumberOfFrames), ds.Rows, ds.Columns) == std.array.shape
    positions = frame_positions(ds)
    order = np.argsort([position[2] for position in positions])
    sct_positions = sorted([float(v) for v in s.ImagePositionPatient] for s in source.sct)
    np.testing.assert_allclose(np.asarray(positions)[order], sct_positions, atol=1e-6)
    pixels = ds.pixel_array
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels[order], std.array)  # exactly: float32 in, float32 out
    shared = ds.SharedFunctionalGroupsSequence[0]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == [float(v) for v in source.sct[0].PixelSpacing]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    voi = shared.FrameVOILUTSequence[0]
    assert float(voi.WindowWidth) == pytest.approx(np.percentile(std.array[std.array > 0], 99), rel=1e-6)
    assert float(voi.WindowCenter) == pytest.approx(float(voi.WindowWidth) / 2)


def test_uncertainty_real_world_values_are_standard_deviations_in_hu(written: dict[str, Path]) -> None:
    ds = pydicom.dcmread(written["map"])
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("[hnsf'U]", "UCUM")
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("386136009", "SCT")
    assert quantity.CodeMeaning == "Standard Deviation"
    assert mapping.LUTLabel == "sCT_STD" and "standard deviation" in mapping.LUTExplanation.lower()
    assert float(mapping.RealWorldValueSlope) == 1.0 and float(mapping.RealWorldValueIntercept) == 0.0


def frame_positions(ds: pydicom.Dataset) -> list[list[float]]:
    return [
        [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        for frame in ds.PerFrameFunctionalGroupsSequence
    ]


def test_each_frame_derives_from_the_sct_slice_at_its_position(source: Source, written: dict[str, Path]) -> None:
    ds = pydicom.dcmread(written["map"])
    slice_at = {round(float(s.ImagePositionPatient[2]), 3): str(s.SOPInstanceUID) for s in source.sct}
    for position, frame in zip(frame_positions(ds), ds.PerFrameFunctionalGroupsSequence, strict=True):
        derived_from = frame.DerivationImageSequence[0].SourceImageSequence
        assert [item.ReferencedSOPInstanceUID for item in derived_from] == [slice_at[round(position[2], 3)]]


def test_uncertainty_map_takes_the_sct_slices_in_any_order(source: Source, written: dict[str, Path]) -> None:
    reference = pydicom.dcmread(written["map"])
    ds = uncertainty_map(source, sct=list(reversed(source.sct)))
    assert frame_positions(ds) == frame_positions(reference)
    np.testing.assert_array_equal(ds.pixel_array, reference.pixel_array)


def test_uncertainty_map_without_mr_reference(source: Source) -> None:
    ds = uncertainty_map(source, mr_series_reference=None)
    assert "RelatedSeriesSequence" not in ds


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("shape", "exactly the sCT's grid"),
        ("nan", "NaN or infinite"),
        ("negative", "negative"),
        ("shifted", "exactly the sCT's grid"),
        ("no_slices", "no sCT instances"),
        ("mr_as_source", "not CT Image Storage"),
        ("other_study", "another study"),
    ],
)
def test_uncertainty_map_refuses_bad_input(source: Source, change: str, message: str) -> None:
    std = source.std
    overrides: dict[str, object] = {}
    grid = std.grid
    if change == "shape":
        smaller = Grid((grid.size[0], grid.size[1], grid.size[2] - 1), grid.spacing_mm, grid.origin_mm)
        overrides["std"] = Volume(std.array[:-1], smaller)
    elif change == "nan":
        values = std.array.copy()
        values[0, 0, 0] = np.nan
        overrides["std"] = Volume(values, grid)
    elif change == "negative":
        overrides["std"] = Volume(std.array - 1000.0, grid)
    elif change == "shifted":
        overrides["std"] = Volume(std.array, Grid(grid.size, grid.spacing_mm, tuple(np.add(grid.origin_mm, 0.5))))
    elif change == "no_slices":
        overrides["sct"] = []
    elif change == "mr_as_source":
        overrides["sct"] = source.mr_headers
    elif change == "other_study":
        overrides["mr_series_reference"] = (UID_PREFIX + "9", str(source.mr_headers[0].SeriesInstanceUID))
    with pytest.raises(ValueError, match=message):
        uncertainty_map(source, **overrides)
