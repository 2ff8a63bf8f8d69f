"""What goes to the PACS with the sCT besides the CT series (DESIGN.md §8), each a series of its own in
the MR's study:

- the QA report for people: an Encapsulated PDF (``build_report_document``), which PACS viewers
  show, with the MR and sCT instances it is about in its Source Instance Sequence;
- the uncertainty of the sCT: the per-voxel standard deviation over the diffusion samples, in HU,
  on exactly the sCT's grid and frame of reference, as a DICOM Parametric Map made with highdicom
  (``build_uncertainty_map``): float pixels with a Real World Value Mapping (unit HU, quantity
  "Standard Deviation"), Modality RWV. Never a CT Image, so that nobody can plan on it.

Both are checked after they are built (an object that exists is a valid one, highdicom's habit);
``write_dataset`` writes either atomically.
"""

from __future__ import annotations

import copy
import datetime as dt
import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    ParametricMapStorage,
)

from dicom_node import __version__
from dicom_node.qa.report_data import write_atomically
from dicom_node.sct_writer import (
    MANUFACTURER,
    SOURCE_SERIES_PURPOSE,
    SYNTHESIZING_EQUIPMENT,
    _code_item,
    _copy_patient_and_study,
    _is_valid_uid,
    _lo,
    _text,
)
from sct_model.volume import Volume

PDF_MIME_TYPE = "application/pdf"
REPORT_SERIES_DESCRIPTION = "sCT QA REPORT"
UNCERTAINTY_SERIES_DESCRIPTION = "sCT UNCERTAINTY (STD HU)"
UNCERTAINTY_LUT_LABEL = "sCT_STD"
UNCERTAINTY_LUT_EXPLANATION = "Standard deviation of the sCT over the diffusion samples (HU)"
UNCERTAINTY_CONTENT_LABEL = "SCT_UNCERTAINTY"  # CS: upper case, digits, space and underscore, at most 16
UNCERTAINTY_CONTENT_DESCRIPTION = "Uncertainty of the synthetic CT: voxel SD over samples (HU)"
# pydicom's codes where it has them; the same values otherwise (UCUM "[hnsf'U]", SNOMED CT 386136009).
HOUNSFIELD_UNIT = getattr(codes.UCUM, "HounsfieldUnit", None) or hd.sr.CodedConcept(
    "[hnsf'U]", "UCUM", "Hounsfield unit"
)
STANDARD_DEVIATION = getattr(codes.SCT, "StandardDeviation", None) or hd.sr.CodedConcept(
    "386136009", "SCT", "Standard Deviation"
)
POSITION_TOLERANCE_MM = 0.01  # sct_writer rounds positions to 1 nm; anything beyond this is another grid
MAX_IS = 2**31 - 1


# --- the QA report as an Encapsulated PDF ---------------------------------------------------------------


def build_report_document(
    pdf: bytes,
    *,
    mr_header: pydicom.Dataset,
    sources: Sequence[tuple[str, str]],
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    created: dt.datetime,
    title: str,
) -> FileDataset:
    """The QA report ``pdf`` as an Encapsulated PDF Storage instance in the MR's patient and study.

    ``sources`` are (SOP Class UID, SOP Instance UID) of every instance the report is about (the MR
    instances and the sCT instances), listed in the Source Instance Sequence. ``created`` (naive:
    local time) is written as content, acquisition and instance creation time. Raises ValueError
    on bad input.
    """
    pdf = bytes(pdf) if isinstance(pdf, bytearray | memoryview) else pdf
    if not isinstance(pdf, bytes) or not pdf:
        raise ValueError("the report PDF is empty")
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("the report is not a PDF (it does not start with %PDF-)")
    if len(pdf) >= 2**32 - 2:
        raise ValueError(f"a PDF of {len(pdf)} bytes does not fit into one DICOM element")
    _check_mr_header(mr_header)
    references = _checked_sources(sources)
    _check_new_series(series_instance_uid, sop_instance_uid, series_number, mr_header)
    if not isinstance(created, dt.datetime):
        raise ValueError(f"created must be a datetime, got {type(created).__name__}")
    document_title = _text(title, 1024)
    if not document_title:
        raise ValueError("the document title is empty")
    created_local = created.astimezone()
    date, time = created_local.strftime("%Y%m%d"), created_local.strftime("%H%M%S")

    ds = FileDataset(
        "", Dataset(), file_meta=_file_meta(EncapsulatedPDFStorage, sop_instance_uid), preamble=b"\0" * 128
    )
    if "SpecificCharacterSet" in mr_header:
        ds.SpecificCharacterSet = mr_header.SpecificCharacterSet
    # SOP Common
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SyntheticData = "YES"  # its pictures are of a synthetic CT
    ds.ContributingEquipmentSequence = [_node_equipment_item(created_local, "QA report of a synthetic CT")]
    # Patient, Clinical Trial Subject, General Study, Patient Study, Clinical Trial Study (and Series)
    _copy_patient_and_study(mr_header, ds)
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = REPORT_SERIES_DESCRIPTION
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = _lo(f"{MANUFACTURER} QA report")
    ds.SoftwareVersions = _lo(f"{MANUFACTURER} {__version__}")
    # SC Equipment
    ds.ConversionType = "WSD"  # workstation
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = created_local.strftime("%Y%m%d%H%M%S%z")
    ds.BurnedInAnnotation = "YES"  # names and IDs are printed on the pages
    ds.RecognizableVisualFeatures = "YES"  # head planes may show a face profile
    ds.SourceInstanceSequence = [_instance_item(sop_class, sop_instance) for sop_class, sop_instance in references]
    ds.DocumentTitle = document_title
    ds.ConceptNameCodeSequence = []  # Type 2: no standard code names an sCT QA report
    ds.MIMETypeOfEncapsulatedDocument = PDF_MIME_TYPE
    ds.EncapsulatedDocument = pdf + b"\0" * (len(pdf) % 2)  # OB values have even length
    ds.EncapsulatedDocumentLength = len(pdf)
    _validate_report_document(ds, pdf)
    return ds


def _validate_report_document(ds: Dataset, pdf: bytes) -> None:
    for keyword in (
        "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
        "InstanceNumber", "BurnedInAnnotation", "ConversionType", "MIMETypeOfEncapsulatedDocument",
        "EncapsulatedDocument", "SourceInstanceSequence",
    ):  # fmt: skip
        if keyword not in ds or ds[keyword].is_empty:
            raise ValueError(f"built report document lacks Type 1 attribute {keyword}")
    for keyword in ("PatientName", "PatientID", "StudyDate", "StudyTime", "ContentDate", "ContentTime",
                    "AcquisitionDateTime", "DocumentTitle", "ConceptNameCodeSequence", "Manufacturer"):  # fmt: skip
        if keyword not in ds:
            raise ValueError(f"built report document lacks Type 2 attribute {keyword}")
    document = ds.EncapsulatedDocument
    if len(document) % 2 or document[: len(pdf)] != pdf or int(ds.EncapsulatedDocumentLength) != len(pdf):
        raise ValueError("the encapsulated PDF does not hold the report's bytes")


# --- the uncertainty as a Parametric Map ---------------------------------------------------------------


def build_uncertainty_map(
    std: Volume,
    sct_datasets: Sequence[pydicom.Dataset],
    *,
    mr_series_reference: tuple[str, str] | None = None,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    created: dt.datetime,
    device_serial_number: str = MANUFACTURER,
) -> pydicom.Dataset:
    """The per-voxel standard deviation of the sCT samples (HU) as a float Parametric Map.

    ``std`` lies on exactly the sCT's grid: its array (z, y, x) has one plane per sCT slice (in
    increasing z) of Rows x Columns (checked against each slice's position and pixel spacing).
    ``sct_datasets`` (any order; headers suffice) are the sCT's CT instances, the map's source
    images: its patient, study, frame of reference and geometry come from them, and each frame
    references the slice it lies on. highdicom stores the frames in its own order (decreasing z);
    each frame's Plane Position Sequence says where it lies. ``mr_series_reference`` (Study, Series
    Instance UID of the MR) is named in the Related Series Sequence. ``device_serial_number`` (Type
    1 in the Enhanced General Equipment module) is best the node's AE title. Raises ValueError on
    bad input.
    """
    if not isinstance(std, Volume):
        raise ValueError(f"std must be a sct_model.volume.Volume, got {type(std).__name__}")
    sources = _checked_sct_datasets(sct_datasets, std)
    _check_new_series(series_instance_uid, sop_instance_uid, series_number, sources[0])
    if not isinstance(created, dt.datetime):
        raise ValueError(f"created must be a datetime, got {type(created).__name__}")
    if mr_series_reference is not None:
        if len(mr_series_reference) != 2 or not all(_is_valid_uid(uid) for uid in mr_series_reference):
            raise ValueError(f"mr_series_reference must be (study UID, series UID), got {mr_series_reference!r}")
        if str(mr_series_reference[0]) != str(sources[0].StudyInstanceUID):
            raise ValueError("mr_series_reference names another study than the sCT's")
    if not (np.issubdtype(std.array.dtype, np.floating) or np.issubdtype(std.array.dtype, np.integer)):
        raise ValueError(f"std has dtype {std.array.dtype}, expected real numbers")
    values = np.ascontiguousarray(std.array, dtype=np.float32)
    not_finite = int(values.size - np.count_nonzero(np.isfinite(values)))
    if not_finite:
        raise ValueError(f"the standard deviation has {not_finite} NaN or infinite voxel(s)")
    if float(values.min()) < 0:
        raise ValueError(f"a standard deviation cannot be negative (minimum {float(values.min())})")
    created_local = created.astimezone()
    top = float(values.max())
    # The window shows 0 to the 99th percentile of the voxels where the samples differ (the body, mostly),
    # from at most about a million of them.
    spread = values.ravel()[:: max(1, values.size // 1_000_000)]
    spread = spread[spread > 0]
    window_width = max(float(np.percentile(spread, 99)) if spread.size else 0.0, 1.0)
    first = sources[0]
    model = _lo(str(first.get("ManufacturerModelName", "") or "sct model")) or "sct model"
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=UNCERTAINTY_LUT_LABEL,
        lut_explanation=UNCERTAINTY_LUT_EXPLANATION,
        unit=HOUNSFIELD_UNIT,
        value_range=(0.0, max(top, 1e-3)),
        slope=1.0,
        intercept=0.0,
        quantity_definition=STANDARD_DEVIATION,
    )
    # highdicom warns (UserWarning) about values it copies from the source headers, quoting them: a
    # patient name among them. Identifiers never go to the node's log, so its warnings are not shown
    # (the values are the MR's own, which the sCT carries as they are).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pm = hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=values,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=model,
            software_versions=_lo(f"{MANUFACTURER} {__version__}"),
            device_serial_number=_lo(device_serial_number) or MANUFACTURER,
            contains_recognizable_visual_features=True,  # the body outline of a head may show its face
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[
                hd.VOILUTTransformation(
                    window_center=[window_width / 2.0],
                    window_width=[window_width],
                    window_explanation=["SD 0 TO P99"],
                )
            ],
            content_description=UNCERTAINTY_CONTENT_DESCRIPTION,
            content_label=UNCERTAINTY_CONTENT_LABEL,
            content_qualification="RESEARCH" if "demo" in model.lower() else "PRODUCT",
            contributing_equipment=[
                hd.ContributingEquipment(
                    MANUFACTURER,
                    SYNTHESIZING_EQUIPMENT,
                    software_versions=_lo(f"{MANUFACTURER} {__version__}"),
                    contribution_datetime=created_local.strftime("%Y%m%d%H%M%S%z"),
                    contribution_description="Standard deviation of the synthetic CT over the diffusion samples",
                )
            ],
            series_description=UNCERTAINTY_SERIES_DESCRIPTION,
            series_date=created_local.date(),
            series_time=created_local.time().replace(microsecond=0),
            content_date=created_local.date(),
            content_time=created_local.time().replace(microsecond=0),
        )
    date, time = created_local.strftime("%Y%m%d"), created_local.strftime("%H%M%S")
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        pm.add_new(keyword, "DA" if keyword.endswith("Date") else "TM", date if keyword.endswith("Date") else time)
    pm.add_new("SyntheticData", "CS", "YES")  # computed from synthetic samples, not measured
    # The rest of the patient- and study-level modules (as the sCT has them from the MR).
    _copy_patient_and_study(first, pm)
    # General Series: the body part and, where the body part is paired, the laterality (Type 2C), as the sCT has them.
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in first:
            pm[keyword] = copy.deepcopy(first[keyword])
    if mr_series_reference is not None:
        related = Dataset()
        related.StudyInstanceUID, related.SeriesInstanceUID = (str(uid) for uid in mr_series_reference)
        related.PurposeOfReferenceCodeSequence = [_code_item(SOURCE_SERIES_PURPOSE)]
        pm.RelatedSeriesSequence = [related]
    _validate_uncertainty_map(pm, values, sources)
    return pm


def _checked_sct_datasets(sct_datasets: Sequence[pydicom.Dataset], std: Volume) -> list[pydicom.Dataset]:
    """The sCT instances in increasing z, after checking that ``std`` lies on exactly their grid."""
    if not sct_datasets:
        raise ValueError("no sCT instances: the uncertainty map needs the sCT slices as its source images")
    grid = std.grid
    if not grid.is_axial():
        raise ValueError(f"the uncertainty grid is not axial (direction {grid.direction})")
    for ds in sct_datasets:
        if str(ds.get("SOPClassUID", "")) != CTImageStorage:
            raise ValueError(f"source instance has SOP class {ds.get('SOPClassUID', '(none)')}, not CT Image Storage")
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
            if not _is_valid_uid(str(ds.get(keyword, "") or "")):
                raise ValueError(f"sCT instance without a valid {keyword}")
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if not ds.get(keyword):
                raise ValueError(f"sCT instance {ds.SOPInstanceUID} lacks {keyword}")
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        if len({str(ds[keyword].value) for ds in sct_datasets}) > 1:
            raise ValueError(f"the sCT instances do not share one {keyword}")
    if len({str(ds.SOPInstanceUID) for ds in sct_datasets}) != len(sct_datasets):
        raise ValueError("duplicate sCT instances")
    sources = sorted(sct_datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    slices, rows, columns = std.array.shape
    if len(sources) != slices or any(int(ds.Rows) != rows or int(ds.Columns) != columns for ds in sources):
        raise ValueError(
            f"std has shape (z, y, x) {std.array.shape}, the sCT {len(sources)} slices of "
            f"{int(sources[0].Rows)} x {int(sources[0].Columns)}: the map must lie on exactly the sCT's grid"
        )
    for index, ds in enumerate(sources):
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0], atol=1e-4):
            raise ValueError(f"sCT slice {index + 1} is not axial")
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        if not np.allclose([column_spacing, row_spacing], grid.spacing_mm[:2], atol=1e-4):
            raise ValueError(f"sCT pixel spacing {[row_spacing, column_spacing]} is not the std grid's")
        expected = grid.index_to_point(np.array([0.0, 0.0, float(index)]))[0]
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        if np.max(np.abs(position - expected)) > POSITION_TOLERANCE_MM:
            raise ValueError(
                f"sCT slice {index + 1} lies at {position.round(3).tolist()} mm, the std grid's plane "
                f"{index} at {expected.round(3).tolist()} mm: the map must lie on exactly the sCT's grid"
            )
    return sources


def _validate_uncertainty_map(pm: Dataset, values: np.ndarray, sources: Sequence[pydicom.Dataset]) -> None:
    if pm.SOPClassUID != ParametricMapStorage or pm.Modality == "CT" or "CT" in pm.ImageType[2:]:
        raise ValueError("the uncertainty map must be a Parametric Map, never a CT image")
    if int(pm.NumberOfFrames) != values.shape[0] or (int(pm.Rows), int(pm.Columns)) != values.shape[1:]:
        raise ValueError("the uncertainty map's frames do not match the sCT grid")
    if "FloatPixelData" not in pm or len(pm.FloatPixelData) != values.size * 4:
        raise ValueError("the uncertainty map lacks its float pixel data")
    if str(pm.FrameOfReferenceUID) != str(sources[0].FrameOfReferenceUID):
        raise ValueError("the uncertainty map is not in the sCT's frame of reference")


# --- shared -------------------------------------------------------------------------------------------


def write_dataset(ds: pydicom.Dataset, path: Path) -> Path:
    """Write ``ds`` to ``path`` as a DICOM file, atomically (``write_atomically``)."""
    return write_atomically(path, lambda stream: ds.save_as(stream, enforce_file_format=True))


def _check_mr_header(mr_header: pydicom.Dataset) -> None:
    if not isinstance(mr_header, Dataset):
        raise ValueError(f"mr_header must be a pydicom Dataset, got {type(mr_header).__name__}")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not _is_valid_uid(str(mr_header.get(keyword, "") or "")):
            raise ValueError(f"the MR header has no valid {keyword}")


def _checked_sources(sources: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    if not sources:
        raise ValueError("no source instances: the report must reference the MR and sCT instances it is about")
    references: list[tuple[str, str]] = []
    seen: set[str] = set()
    for source in sources:
        if len(source) != 2:
            raise ValueError(f"a source must be (SOP Class UID, SOP Instance UID), got {source!r}")
        sop_class, sop_instance = (str(uid) for uid in source)
        if not (_is_valid_uid(sop_class) and _is_valid_uid(sop_instance)):
            raise ValueError(f"source {source!r} holds an invalid UID")
        if sop_instance in seen:
            raise ValueError(f"source instance {sop_instance} is listed twice")
        seen.add(sop_instance)
        references.append((sop_class, sop_instance))
    return references


def _check_new_series(series_instance_uid: str, sop_instance_uid: str, series_number: int, source: Dataset) -> None:
    for name, uid in (("series_instance_uid", series_instance_uid), ("sop_instance_uid", sop_instance_uid)):
        if not _is_valid_uid(uid):
            raise ValueError(f"{name} {uid!r} is not a valid DICOM UID")
    if series_instance_uid == str(source.get("SeriesInstanceUID", "")):
        raise ValueError("series_instance_uid is its source's own Series Instance UID; a new series needs a new one")
    if isinstance(series_number, bool) or not isinstance(series_number, int | np.integer):
        raise ValueError(f"series_number must be an integer, got {series_number!r}")
    if not 0 <= int(series_number) <= MAX_IS:
        raise ValueError(f"series_number must be in [0, {MAX_IS}], got {series_number}")


def _instance_item(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def _node_equipment_item(created: dt.datetime, description: str) -> Dataset:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [_code_item(SYNTHESIZING_EQUIPMENT)]
    item.Manufacturer = MANUFACTURER
    item.SoftwareVersions = _lo(f"{MANUFACTURER} {__version__}")
    item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S%z")
    item.ContributionDescription = _text(description, 1024)
    return item


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"SCTNODE_{__version__}"[:16]
    return meta
