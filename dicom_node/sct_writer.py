"""The sCT writer: an HU volume on an axial grid -> a CT Image Storage series (DESIGN.md §3, output).

``build_ct_series`` validates its input, builds one single-frame CT instance per axial slice with
pydicom and checks what it built before returning it (highdicom's habit: an object that exists is
a valid one). ``write_series`` puts the files in place atomically.

What a planning system needs from the sCT, and where it comes from:

- the patient and study of the MR (Patient, Clinical Trial Subject, General Study, Patient Study
  and Clinical Trial Study modules copied as they are; Type 2 attributes present even if empty);
- the MR's Frame of Reference UID, so that the sCT lies registered on the MR;
- labels that say "synthetic": Synthetic Data (0008,001C) YES, ImageType DERIVED\\SECONDARY\\AXIAL,
  SeriesDescription "sCT SYNTHETIC <model> <version>", a DerivationDescription with everything
  needed to reproduce it (method, model, version, full checkpoint SHA-256, sampler, steps,
  samples, seed, device), and a Contributing Equipment item (109100, DCM, "Synthesizing Equipment");
- references to the MR: its series in the Related Series Sequence of the General Series module
  (purpose 121323, DCM, "Source series for image processing operation") and every MR instance in
  the Source Image Sequence of each slice. ``source_references="full"`` adds DESIGN.md's literal
  form: a purpose code (121322, DCM) in every Source Image Sequence item and the Referenced Series
  Sequence of the Common Instance Reference module (a second list of every MR instance). Both
  optional in the CT Image IOD, they repeat per item what the series-level item says once and
  make each slice's header about three times larger, which costs every PACS ingest time
  (Orthanc: 8.5 s instead of 3 s for a 346-slice series; benchmarks/README.md);
- signed 16-bit HU (RescaleIntercept 0, RescaleSlope 1), clipped to [-1024, 3071].

SOP Instance UIDs are derived from the sCT's Series Instance UID (fixed by the caller) and the
slice index, so a re-run after a crash yields the same UIDs; pass ``created`` (e.g. the job's
creation time) to make the re-run byte-identical as well.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import functools
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, MutableSequence, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info, write_sequence
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    RE_VALID_UID,
    RE_VALID_UID_PREFIX,
    UID,
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from dicom_node import __version__
from dicom_node.config import SOURCE_REFERENCE_FORMS
from dicom_node.errors import WriterError
from sct_model.result import HU_MAX, HU_MIN, PredictorInfo
from sct_model.volume import Grid, Volume

_FSYNC_THREADS = 8
log = logging.getLogger(__name__)

MANUFACTURER = "sct-node"
MR_SOP_CLASSES = frozenset({MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage})
SOURCE_IMAGE_PURPOSE = Code("121322", "DCM", "Source image for image processing operation")
# CID 7210 "Related Series Purpose of Reference"
SOURCE_SERIES_PURPOSE = Code("121323", "DCM", "Source series for image processing operation")
SYNTHESIZING_EQUIPMENT = Code("109100", "DCM", "Synthesizing Equipment")
ACQUISITION_EQUIPMENT = Code("109101", "DCM", "Acquisition Equipment")
# (centre, width, explanation) in HU; the first is what a viewer shows by default.
HU_WINDOWS: tuple[tuple[int, int, str], ...] = ((40, 400, "SOFT TISSUE"), (400, 1800, "BONE"))
SOURCE_IMAGE_SEQUENCE_TAG = Tag("SourceImageSequence")
REFERENCED_SERIES_SEQUENCE_TAG = Tag("ReferencedSeriesSequence")
MAX_UID_PREFIX_LENGTH = 54  # pydicom's limit: leaves room for a hash suffix of 10 or more digits
MAX_US = 65535  # Rows and Columns are US
MAX_IS = 2**31 - 1
MIN_MR_OVERLAP_TOLERANCE_MM = 1.0

# Copied from the MR as they are (top-level attributes of the study- and patient-level modules of
# PS3.3 that the CT Image IOD shares with MR), and the Type 2 ones written empty when absent.
PATIENT_LEVEL_KEYWORDS: tuple[str, ...] = (
    # Patient (C.7.1.1)
    "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "ReferencedPatientSequence", "PatientBirthDate", "PatientBirthTime", "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar", "PatientSex", "QualityControlSubject",
    "OtherPatientNames", "OtherPatientIDsSequence", "EthnicGroup", "EthnicGroupCodeSequence",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence", "PatientBreedDescription",
    "PatientBreedCodeSequence", "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole",
    "ResponsibleOrganization", "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence", "StrainDescription", "StrainNomenclature", "StrainStockSequence",
    "StrainAdditionalInformation", "StrainCodeSequence", "GeneticModificationsSequence",
    "SourcePatientGroupIdentificationSequence", "GroupOfPatientsIdentificationSequence",
    # Clinical Trial Subject (C.7.1.3)
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID", "OtherClinicalTrialProtocolIDsSequence", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID", "ClinicalTrialSubjectID",
    "IssuerOfClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "IssuerOfClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName", "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # General Study (C.7.2.1)
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "StudyID", "AccessionNumber", "IssuerOfAccessionNumberSequence",
    "StudyDescription", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence", "RequestingService",
    "RequestingServiceCodeSequence", "ReferencedStudySequence", "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    # Patient Study (C.7.2.2)
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize",
    "PatientSizeCodeSequence", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension",
    "PatientWeight", "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus", "AdditionalPatientHistory",
    "PregnancyStatus", "LastMenstrualDate", "PatientSexNeutered", "ReasonForVisit", "ReasonForVisitCodeSequence",
    "AdmissionID", "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence", "PatientState",
    # Clinical Trial Study (C.7.2.3)
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription", "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType", "ClinicalTrialTimePointTypeCodeSequence",
    "IssuerOfClinicalTrialTimePointID", "ConsentForClinicalTrialUseSequence",
    # Clinical Trial Series (C.7.3.2): the sCT belongs to the same trial series context as its MR
    "ClinicalTrialCoordinatingCenterName", "ClinicalTrialSeriesID", "ClinicalTrialSeriesDescription",
    "IssuerOfClinicalTrialSeriesID",
)  # fmt: skip
ALWAYS_TYPE2_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
TYPE2C_SEQUENCE_KEYWORDS = frozenset({"PatientBreedCodeSequence", "BreedRegistrationSequence"})
# Type 2 attributes of the optional modules above, written empty when the module is there.
OPTIONAL_MODULE_TYPE2_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ClinicalTrialProtocolID", ("ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName")),
    ("ClinicalTrialTimePointDescription", ("ClinicalTrialTimePointID",)),
    ("ClinicalTrialSeriesID", ("ClinicalTrialCoordinatingCenterName",)),
)
# Body Part Examined values (PS3.16 Annex L) of unpaired regions, which dciodvfy checks: with one of
# them Laterality must be absent; with any other value, or none, it must be present (empty if unknown).
UNPAIRED_BODY_PARTS = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "AORTA", "BLADDER", "BRAIN", "CEREBELLUM", "CERVIX", "CHEST", "CHESTABDOMEN",
    "CHESTABDPELVIS", "COCCYX", "COLON", "CSPINE", "CTSPINE", "DUODENUM", "ESOPHAGUS", "FACE", "GALLBLADDER",
    "HEAD", "HEADNECK", "HEART", "ILEUM", "ILIUM", "JAW", "JEJUNUM", "LARYNX", "LIVER", "LSPINE", "LSSPINE",
    "MAXILLA", "MEDIASTINUM", "MOUTH", "NECK", "NECKCHEST", "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "NOSE",
    "PANCREAS", "PELVIS", "PENIS", "PHARYNX", "PROSTATE", "RECTUM", "SKULL", "SPINE", "SPLEEN", "SSPINE",
    "STERNUM", "STOMACH", "THYROID", "TLSPINE", "TONGUE", "TRACHEA", "TSPINE", "URETHRA", "UTERUS", "VAGINA",
    "VULVA", "WHOLEBODY",
})  # fmt: skip
# The MR scanner's General Equipment attributes kept in its Contributing Equipment item.
SCANNER_KEYWORDS = (
    "Manufacturer", "InstitutionName", "StationName", "InstitutionalDepartmentName", "ManufacturerModelName",
    "DeviceSerialNumber", "SoftwareVersions",
)  # fmt: skip
# Checked in every built instance: Type 1 (present, not empty) and Type 2 (present).
REQUIRED_TYPE1_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Modality",
    "ImageType", "SyntheticData", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "RescaleIntercept", "RescaleSlope", "RescaleType", "PixelData",
    "SourceImageSequence", "RelatedSeriesSequence", "ContributingEquipmentSequence",
)  # fmt: skip
REQUIRED_TYPE2_KEYWORDS = ALWAYS_TYPE2_KEYWORDS + (
    "SeriesNumber", "PatientPosition", "PositionReferenceIndicator", "Manufacturer", "InstanceNumber",
    "ContentDate", "ContentTime", "SliceThickness", "KVP", "AcquisitionNumber",
)  # fmt: skip


def sop_instance_uid(series_instance_uid: str, slice_index: int, uid_root: str = "") -> UID:
    """The SOP Instance UID of slice ``slice_index`` (0-based, increasing z) of an sCT series.

    Deterministic: a hash of the series UID and the slice index under ``uid_root`` (pydicom's root
    when empty; pydicom ignores the entropy sources with ``prefix=None``, which would make the UID
    random). The separator keeps ("1.2.3", 45) and ("1.2.34", 5) apart.
    """
    return generate_uid(prefix=uid_root or PYDICOM_ROOT_UID, entropy_srcs=[series_instance_uid, "|", str(slice_index)])


def build_ct_series(
    mr_headers: Sequence[pydicom.Dataset],
    hu: Volume,
    **options: Any,
) -> list[FileDataset]:
    """``build_sct_series`` as a list of pydicom datasets, one per slice, each checked (for callers
    that read or change the objects; the node writes the SCTSeries itself, which is faster)."""
    series = build_sct_series(mr_headers, hu, **options)
    datasets = [series.dataset(index) for index in range(len(series))]
    for dataset in datasets:
        _validate_instance(dataset, full_references=series.full_references)
    return datasets


@dataclasses.dataclass(frozen=True, eq=False)
class SCTSeries:
    """A built sCT series: the elements every slice shares and what each slice has of its own.

    ``dataset(i)`` is slice i as a pydicom FileDataset (a new object on each call: changing it
    changes nothing here); ``encoded(i)`` is the content of its file, byte for byte pydicom's
    encoding of ``dataset(i)`` (tested on every slice), but with the ~70 shared elements encoded
    once for the series instead of once per slice: building and encoding a 346-slice series
    takes about a fifth of the time of building and encoding 346 datasets.
    """

    series_instance_uid: str
    uid_root: str
    hu: Volume
    shared: tuple[DataElement | RawDataElement, ...]  # in tag order
    text_encoding: str | list[str]
    full_references: bool

    @functools.cached_property
    def _encodings(self) -> list[str]:
        return convert_encodings(self.text_encoding)

    @functools.cached_property
    def _encoded_shared(self) -> tuple[tuple[BaseTag, bytes], ...]:
        """(tag, bytes) of each shared element, encoded once for all slices."""
        return tuple((element.tag, _encoded_element(element, self._encodings)) for element in self.shared)

    def __len__(self) -> int:
        return self.hu.grid.size[2]

    def file_name(self, index: int) -> str:
        return f"CT_{index + 1:04d}.dcm"

    def dataset(self, index: int) -> FileDataset:
        own = self._own_elements(index)
        ds = FileDataset("", Dataset(), file_meta=self._file_meta(own.SOPInstanceUID), preamble=b"\0" * 128)
        # Each slice gets its own element objects (a shallow copy of each; sequences as immutable raw
        # bytes), so that changing one slice never changes another.
        for element in self.shared:
            ds[element.tag] = element if isinstance(element, RawDataElement) else _own_copy(element)
        # Lets pydicom write the raw references as they are (it would decode them for another encoding).
        ds.set_original_encoding(False, True, self.text_encoding)
        for element in own:
            ds[element.tag] = element
        return ds

    def encoded(self, index: int) -> bytes:
        own = self._own_elements(index)
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        buffer.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(buffer, self._file_meta(own.SOPInstanceUID), enforce_standard=True)
        encoded_own = tuple((element.tag, _encoded_element(element, self._encodings)) for element in own)
        for _, encoded in sorted(self._encoded_shared + encoded_own, key=lambda pair: pair[0]):
            buffer.write(encoded)
        return buffer.getvalue()

    def check_slices(self) -> None:
        """What differs per slice, checked without building datasets; the first and last slice in full."""
        for index in (0, len(self) - 1):
            _validate_instance(self.dataset(index), full_references=self.full_references)
        for index in range(len(self)):
            if not _is_valid_uid(sop_instance_uid(self.series_instance_uid, index, self.uid_root)):
                raise WriterError(f"slice {index + 1} would get an invalid SOP Instance UID")

    @staticmethod
    def _file_meta(sop_uid: UID) -> FileMetaDataset:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"SCTNODE_{__version__}"[:16]
        return meta

    def _own_elements(self, index: int) -> Dataset:
        """SOPInstanceUID, InstanceNumber, ImagePositionPatient, SliceLocation and PixelData of slice ``index``."""
        own = Dataset()
        own.SOPInstanceUID = sop_instance_uid(self.series_instance_uid, index, self.uid_root)
        own.InstanceNumber = index + 1
        position_mm = self.hu.grid.index_to_point(np.array([0.0, 0.0, float(index)]))[0]
        own.ImagePositionPatient = [_ds(v) for v in position_mm]
        own.SliceLocation = _ds(position_mm[2])
        own.PixelData = _stored_pixels(self.hu.array[index]).tobytes()
        own["PixelData"].VR = "OW"
        return own


def build_sct_series(
    mr_headers: Sequence[pydicom.Dataset],
    hu: Volume,
    *,
    info: PredictorInfo,
    steps: int,
    samples: int,
    seed: int,
    series_instance_uid: str,
    uid_root: str = "",
    series_number: int | None = None,
    created: dt.datetime | None = None,
    source_references: str = "compact",
) -> SCTSeries:
    """One CT Image Storage instance per axial slice of ``hu``, in increasing z (InstanceNumber 1..N).

    ``mr_headers`` are the headers of all MR instances of the source series (classic single-frame
    or Enhanced MR; pixel data may be absent). ``hu`` is the sCT in HU on an axial grid in the MR's
    frame of reference. ``created`` (default: now) is the time written as series, content and
    instance creation time; naive values are local time. ``source_references`` is "compact" (the
    MR series once, every MR instance in the Source Image Sequence) or "full" (also a purpose code
    per item and the Referenced Series Sequence; see the module docstring). Raises WriterError on
    bad input.
    """
    if source_references not in SOURCE_REFERENCE_FORMS:
        raise WriterError(f"source_references must be one of {SOURCE_REFERENCE_FORMS}, not {source_references!r}")
    sources = _checked_mr_headers(mr_headers)
    _check_volume(hu)
    _check_parameters(
        sources,
        info=info,
        steps=steps,
        samples=samples,
        seed=seed,
        series_instance_uid=series_instance_uid,
        uid_root=uid_root,
        series_number=series_number,
    )
    _check_overlap_with_mr(sources, hu.grid)
    created_local = (created or dt.datetime.now()).astimezone()
    template = _series_template(
        sources[0],
        hu.grid,
        info=info,
        steps=steps,
        samples=samples,
        seed=seed,
        series_instance_uid=series_instance_uid,
        series_number=_default_series_number(sources[0], series_number),
        created=created_local,
    )
    shared = sorted(
        [*_shared_elements(template), *_encoded_references(sources, template, full=source_references == "full")],
        key=lambda element: element.tag,
    )
    series = SCTSeries(
        series_instance_uid=series_instance_uid,
        uid_root=uid_root,
        hu=hu,
        shared=tuple(shared),
        text_encoding=_text_encoding(template),
        full_references=source_references == "full",
    )
    series.check_slices()
    log.info(
        "built sCT series %s: %d axial slices of %dx%d from %d MR instances (%s %s)",
        series_instance_uid,
        len(series),
        hu.grid.size[0],
        hu.grid.size[1],
        len(sources),
        info.model_name,
        info.model_version,
    )
    return series


def write_series(datasets: SCTSeries | Sequence[FileDataset], out_dir: Path) -> list[Path]:
    """Write ``datasets`` (an SCTSeries, or pydicom datasets) to ``out_dir`` as
    CT_<InstanceNumber:04d>.dcm, atomically.

    Every file goes into the sibling folder ``.<name>.tmp-<pid>``, is fsynced, then the folder is
    renamed to ``out_dir``. An existing ``out_dir`` is replaced only when it is empty or holds an
    earlier write of the same series (CT_*.dcm files of the same Series Instance UID).
    """
    out_dir = Path(out_dir)
    contents: Iterable[FileDataset | bytes]
    if isinstance(datasets, SCTSeries):
        names = [datasets.file_name(index) for index in range(len(datasets))]
        series_instance_uid = datasets.series_instance_uid
        contents = map(datasets.encoded, range(len(datasets)))  # one file's bytes at a time
    else:
        names = _file_names(datasets)
        series_instance_uid = str(datasets[0].SeriesInstanceUID)
        contents = datasets
    _check_replaceable(out_dir, series_instance_uid)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)  # left by an earlier crashed run of a process with our pid
    tmp_dir.mkdir()
    try:
        for content, name in zip(contents, names, strict=True):
            _write_file(content, tmp_dir / name)
        # One fsync per file, issued concurrently (the disk merges them): half the time of a
        # write-fsync-write-fsync sequence, and the folder is renamed only once all are durable.
        with ThreadPoolExecutor(max_workers=_FSYNC_THREADS) as pool:
            list(pool.map(_fsync_file, [tmp_dir / name for name in names]))
        _fsync_dir(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log.info("wrote %d sCT files to %s", len(names), out_dir)
    return [out_dir / name for name in names]


# --- input checks -----------------------------------------------------------------------------------


# MR attributes the writer puts into the sCT besides the patient and study modules.
_COPIED_SERIES_KEYWORDS = (
    "SpecificCharacterSet", "SeriesNumber", "PatientPosition", "BodyPartExamined", "Laterality",
    "PositionReferenceIndicator", "LossyImageCompression", "LossyImageCompressionRatio",
    "LossyImageCompressionMethod", *SCANNER_KEYWORDS,
)  # fmt: skip


def check_source_headers(mr_headers: Sequence[pydicom.Dataset]) -> None:
    """Raise WriterError when the writer could not build an sCT from ``mr_headers``: not one MR
    series with its identifying UIDs, or an attribute it copies into the sCT that cannot be read
    or written (an unknown VR, a value its VR cannot hold: pydicom converts values only when used).

    The series check calls this, so that such a series is quarantined with the reason when it
    closes, instead of failing its job in the writer after sampling.
    """
    mr = _checked_mr_headers(mr_headers)[0]  # the header build_sct_series copies from
    keywords = [*PATIENT_LEVEL_KEYWORDS, *_COPIED_SERIES_KEYWORDS]
    try:
        encodings = convert_encodings(_text_encoding(mr))
    except Exception as exc:
        raise WriterError(f"the MR's SpecificCharacterSet cannot be used: {exc}") from exc
    for keyword in keywords:
        if keyword not in mr:
            continue
        try:
            _encoded_element(copy.deepcopy(mr[keyword]), encodings)
        except Exception as exc:
            raise WriterError(f"the MR's {keyword} cannot be copied into the sCT: {type(exc).__name__}: {exc}") from exc


def _checked_mr_headers(mr_headers: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The MR headers sorted by (InstanceNumber, SOPInstanceUID), after checking they form one series."""
    if not mr_headers:
        raise WriterError("no MR headers: the sCT must reference its source MR series")
    for header in mr_headers:
        sop_class = str(header.get("SOPClassUID", ""))
        if sop_class not in MR_SOP_CLASSES:
            raise WriterError(f"source instance has SOP class {sop_class or '(none)'}, not MR or Enhanced MR")
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
            if not str(header.get(keyword, "") or ""):
                raise WriterError(f"source MR instance without {keyword}")
    for keyword, what in (
        ("SeriesInstanceUID", "series"),
        ("StudyInstanceUID", "studies"),
        ("FrameOfReferenceUID", "frames of reference"),
    ):
        values = {str(header[keyword].value) for header in mr_headers}
        if len(values) > 1:
            raise WriterError(f"MR headers come from {len(values)} {what}; the sCT derives from exactly one series")
    sop_uids = [str(header.SOPInstanceUID) for header in mr_headers]
    if len(set(sop_uids)) != len(sop_uids):
        raise WriterError(f"{len(sop_uids) - len(set(sop_uids))} duplicate MR instance(s) in the MR headers")
    return sorted(mr_headers, key=lambda h: (_int_or(h.get("InstanceNumber"), 0), str(h.SOPInstanceUID)))


def _check_volume(hu: Volume) -> None:
    if not isinstance(hu, Volume):
        raise WriterError(f"hu must be a sct_model.volume.Volume, got {type(hu).__name__}")
    if not hu.grid.is_axial():
        raise WriterError(
            f"the sCT grid is not axial (direction {hu.grid.direction}); resample it onto "
            "axial_grid_covering(mr_grid) first"
        )
    array = hu.array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise WriterError(f"HU array has dtype {array.dtype}, expected a real number type")
    not_finite = int(array.size - np.count_nonzero(np.isfinite(array)))
    if not_finite:
        raise WriterError(f"HU volume has {not_finite} NaN or infinite voxel(s)")
    columns, rows, _ = hu.grid.size
    if rows > MAX_US or columns > MAX_US:
        raise WriterError(f"slices of {columns}x{rows} pixels exceed the DICOM limit of {MAX_US}")


def _check_parameters(
    sources: Sequence[pydicom.Dataset],
    *,
    info: PredictorInfo,
    steps: int,
    samples: int,
    seed: int,
    series_instance_uid: str,
    uid_root: str,
    series_number: int | None,
) -> None:
    if not isinstance(info, PredictorInfo):
        raise WriterError(f"info must be a sct_model.result.PredictorInfo, got {type(info).__name__}")
    for name, value, minimum in (("steps", steps, 0), ("samples", samples, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise WriterError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not _is_valid_uid(series_instance_uid):
        raise WriterError(f"series_instance_uid {series_instance_uid!r} is not a valid DICOM UID")
    if series_instance_uid == str(sources[0].SeriesInstanceUID):
        raise WriterError("series_instance_uid is the MR's own Series Instance UID; the sCT needs a new one")
    if uid_root and (len(uid_root) > MAX_UID_PREFIX_LENGTH or not re.match(RE_VALID_UID_PREFIX, uid_root)):
        raise WriterError(
            f"uid_root {uid_root!r} must be a UID prefix ending in '.', at most {MAX_UID_PREFIX_LENGTH} characters"
        )
    if series_number is not None and (isinstance(series_number, bool) or not 0 <= series_number <= MAX_IS):
        raise WriterError(f"series_number must be an integer in [0, {MAX_IS}], got {series_number!r}")


def _check_overlap_with_mr(sources: Sequence[pydicom.Dataset], grid: Grid) -> None:
    """Refuse a grid that does not even touch the MR's extent: it cannot be in the MR's frame of reference."""
    try:
        mr_points = _mr_corner_points(sources)
    except (TypeError, ValueError, IndexError) as exc:
        raise WriterError(f"the MR headers have unreadable plane geometry ({exc})") from exc
    if mr_points is None:
        log.debug("MR headers lack plane geometry; the overlap check of the sCT grid is skipped")
        return
    grid_points = grid.corner_points()
    tolerance = MIN_MR_OVERLAP_TOLERANCE_MM
    mr_lo, mr_hi = mr_points.min(axis=0), mr_points.max(axis=0)
    grid_lo, grid_hi = grid_points.min(axis=0), grid_points.max(axis=0)
    if np.any(grid_lo > mr_hi + tolerance) or np.any(grid_hi < mr_lo - tolerance):
        raise WriterError(
            f"the sCT grid (LPS box {np.round(grid_lo, 1).tolist()} to {np.round(grid_hi, 1).tolist()} mm) does not "
            f"overlap the MR series ({np.round(mr_lo, 1).tolist()} to {np.round(mr_hi, 1).tolist()} mm)"
        )


def _mr_corner_points(sources: Sequence[pydicom.Dataset]) -> np.ndarray | None:
    """The in-plane corners (pixel edges) of every MR frame as LPS points, or None without geometry."""
    corners: list[np.ndarray] = []
    for header in sources:
        for position, orientation, spacing in _frame_planes(header):
            row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
            rows, columns = int(header.Rows), int(header.Columns)
            for r in (-0.5, rows - 0.5):
                for c in (-0.5, columns - 0.5):
                    corners.append(np.asarray(position, float) + c * spacing[1] * row_dir + r * spacing[0] * col_dir)
    return np.asarray(corners) if corners else None


def _frame_planes(header: pydicom.Dataset) -> Iterator[tuple[list[float], list[float], list[float]]]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of each frame that has all three."""
    if "Rows" not in header or "Columns" not in header:
        return
    if "PerFrameFunctionalGroupsSequence" not in header:
        if all(header.get(k) for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")):
            yield list(header.ImagePositionPatient), list(header.ImageOrientationPatient), list(header.PixelSpacing)
        return
    shared = header.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    for frame in header.PerFrameFunctionalGroupsSequence:
        position = _functional_value(frame, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _functional_value(frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _functional_value(frame, shared, "PixelMeasuresSequence", "PixelSpacing")
        if position and orientation and spacing:
            yield position, orientation, spacing


def _functional_value(frame: Dataset, shared: Dataset, macro: str, keyword: str) -> list[float] | None:
    """``keyword`` of functional group ``macro`` for one frame: the frame's own, else the shared one."""
    for group in (frame, shared):
        if macro in group and len(group[macro].value) and keyword in group[macro][0]:
            return [float(v) for v in group[macro][0][keyword].value]
    return None


# --- building ---------------------------------------------------------------------------------------


def _series_template(
    mr: pydicom.Dataset,
    grid: Grid,
    *,
    info: PredictorInfo,
    steps: int,
    samples: int,
    seed: int,
    series_instance_uid: str,
    series_number: int,
    created: dt.datetime,
) -> Dataset:
    """Every attribute that is the same in all slices, except the references to the MR instances."""
    ds = Dataset()
    if "SpecificCharacterSet" in mr:
        ds.SpecificCharacterSet = mr.SpecificCharacterSet
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    # SOP Common
    ds.SOPClassUID = CTImageStorage
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SyntheticData = "YES"
    ds.ContributingEquipmentSequence = _contributing_equipment(mr, info, created)
    # Patient, study (and clinical trial) modules, as they are in the MR
    _copy_patient_and_study(mr, ds)
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = _lo(f"sCT SYNTHETIC {info.model_name} {info.model_version}")
    ds.RelatedSeriesSequence = [_source_series_item(mr)]
    # Type 2C, required for CT without a Patient Orientation Code Sequence: HFS, FFS... as the MR was taken
    ds.PatientPosition = mr.get("PatientPosition") or None
    if mr.get("BodyPartExamined"):
        ds.BodyPartExamined = mr.BodyPartExamined
    if _laterality_required(mr):
        ds.Laterality = mr.Laterality if str(mr.get("Laterality", "")) in ("R", "L") else None
    # Frame of Reference
    ds.FrameOfReferenceUID = mr.FrameOfReferenceUID
    ds.PositionReferenceIndicator = mr.get("PositionReferenceIndicator") or None
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = _lo(info.model_name)
    ds.SoftwareVersions = _software_versions(info)
    # General Image
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.ContentDate, ds.ContentTime = date, time
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = "Synthetic CT computed from MR: HU values are predicted by a model, not measured."
    if str(mr.get("LossyImageCompression", "")) == "01":  # once lossy, always lossy (C.7.6.1.1.5)
        for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in mr:
                ds[keyword] = copy.deepcopy(mr[keyword])
    # General Reference
    ds.DerivationDescription = _derivation_description(info, steps=steps, samples=samples, seed=seed)
    # Image Plane (position and location are per slice)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    spacing_x_mm, spacing_y_mm, spacing_z_mm = grid.spacing_mm
    ds.PixelSpacing = [_ds(spacing_y_mm), _ds(spacing_x_mm)]  # [between rows (y), between columns (x)]
    ds.SliceThickness = _ds(spacing_z_mm)
    ds.SpacingBetweenSlices = _ds(spacing_z_mm)
    # Image Pixel and CT Image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Columns, ds.Rows = grid.size[0], grid.size[1]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    ds.KVP = None  # Type 2: no tube, no voltage
    ds.AcquisitionNumber = None  # Type 2: nothing was acquired
    # VOI LUT
    ds.WindowCenter = [str(centre) for centre, _, _ in HU_WINDOWS]
    ds.WindowWidth = [str(width) for _, width, _ in HU_WINDOWS]
    ds.WindowCenterWidthExplanation = [name for _, _, name in HU_WINDOWS]
    return ds


def _encoded_references(sources: Sequence[pydicom.Dataset], template: Dataset, *, full: bool) -> list[RawDataElement]:
    """Source Image Sequence (General Reference) and, with ``full``, Referenced Series Sequence
    (Common Instance Reference: the MR is in the same study), encoded once as explicit VR little
    endian.

    They hold one or more items per MR instance and are the same in every slice: encoding them once
    and putting the bytes into every slice as a raw element (as if read from a file; pydicom decodes
    it on first access) keeps a 300-slice series from encoding 300 x N items one by one.
    """
    encodings = convert_encodings(_text_encoding(template))
    references = [
        _encoded_sequence(
            DataElement(SOURCE_IMAGE_SEQUENCE_TAG, "SQ", _source_image_sequence(sources, with_purpose=full)), encodings
        )
    ]
    if full:
        references.append(
            _encoded_sequence(
                DataElement(REFERENCED_SERIES_SEQUENCE_TAG, "SQ", _referenced_series_sequence(sources[0], sources)),
                encodings,
            )
        )
    return references


def _encoded_sequence(element: DataElement, encodings: list[str]) -> RawDataElement:
    """A sequence element as a raw element of explicit VR little endian bytes (immutable, shareable)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_sequence(buffer, element, encodings)
    value = buffer.getvalue()
    return RawDataElement(element.tag, "SQ", len(value), value, 0, False, True)


def _shared_elements(template: Dataset) -> list[DataElement | RawDataElement]:
    """The template's elements in a form each slice can take without copying the whole template:
    sequences as raw bytes (each slice decodes its own items on access), the others as they are
    (``_slice_instance`` gives each slice its own shallow copy)."""
    encodings = convert_encodings(_text_encoding(template))
    shared: list[DataElement | RawDataElement] = []
    for element in template:  # every element, in tag order
        shared.append(_encoded_sequence(element, encodings) if element.VR == "SQ" else element)
    return shared


def _encoded_element(element: DataElement | RawDataElement, encodings: list[str]) -> bytes:
    """One element as explicit VR little endian bytes, as pydicom writes it into a file."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_data_element(buffer, element, encodings)
    return buffer.getvalue()


def _own_copy(element: DataElement) -> DataElement:
    copied = copy.copy(element)
    if isinstance(element.value, MutableSequence):  # MultiValue: its own list (strings, numbers are immutable)
        copied.value = list(element.value)
    return copied


def _laterality_required(mr: pydicom.Dataset) -> bool:
    """Laterality (Type 2C) is needed unless the body part is known to be unpaired (then it must be absent)."""
    return str(mr.get("BodyPartExamined", "")).strip().upper() not in UNPAIRED_BODY_PARTS


def _text_encoding(ds: Dataset) -> str | list[str]:
    """The Python encoding(s) of ``ds``'s text, in the form pydicom compares before writing raw elements."""
    charset = ds.get("SpecificCharacterSet")
    return convert_encodings(charset) if charset else default_encoding


def _stored_pixels(hu_slice: np.ndarray) -> np.ndarray:
    """HU rounded to the nearest integer and clipped to [HU_MIN, HU_MAX], as little-endian int16."""
    return np.clip(np.rint(hu_slice.astype(np.float64)), HU_MIN, HU_MAX).astype("<i2")


def _copy_patient_and_study(mr: pydicom.Dataset, ds: Dataset) -> None:
    for keyword in PATIENT_LEVEL_KEYWORDS:
        if keyword not in mr:
            continue
        element = mr[keyword]
        if element.VR == "SQ" and not element.value and keyword not in TYPE2C_SEQUENCE_KEYWORDS:
            continue  # an empty Type 3 sequence is invalid (zero items); some scanners write one anyway
        ds[keyword] = copy.deepcopy(element)
    for keyword in ALWAYS_TYPE2_KEYWORDS:
        if keyword not in ds:
            setattr(ds, keyword, None)
    for marker, type2_keywords in OPTIONAL_MODULE_TYPE2_KEYWORDS:
        if marker in ds:
            for keyword in type2_keywords:
                if keyword not in ds:
                    setattr(ds, keyword, None)


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _contributing_equipment(mr: pydicom.Dataset, info: PredictorInfo, created: dt.datetime) -> DicomSequence:
    """This node, which synthesized the CT (first: what readers look for), then the scanner that
    acquired the MR, when the MR says who made it."""
    node = Dataset()
    node.PurposeOfReferenceCodeSequence = [_code_item(SYNTHESIZING_EQUIPMENT)]
    node.Manufacturer = MANUFACTURER
    node.ManufacturerModelName = _lo(info.model_name)
    node.SoftwareVersions = _software_versions(info)
    node.ContributionDateTime = created.strftime("%Y%m%d%H%M%S%z")
    node.ContributionDescription = _text(
        f"Synthetic CT computed from the MR series by {info.method} ({info.model_name} {info.model_version})", 1024
    )
    items = [node]
    if mr.get("Manufacturer"):
        scanner = Dataset()
        scanner.PurposeOfReferenceCodeSequence = [_code_item(ACQUISITION_EQUIPMENT)]
        for keyword in SCANNER_KEYWORDS:
            if mr.get(keyword):
                scanner[keyword] = copy.deepcopy(mr[keyword])
        items.append(scanner)
    return DicomSequence(items)


def _source_series_item(mr: pydicom.Dataset) -> Dataset:
    """The Related Series Sequence item that says, once, what the sCT was computed from."""
    item = Dataset()
    item.StudyInstanceUID = mr.StudyInstanceUID
    item.SeriesInstanceUID = mr.SeriesInstanceUID
    item.PurposeOfReferenceCodeSequence = [_code_item(SOURCE_SERIES_PURPOSE)]
    return item


def _source_image_sequence(sources: Sequence[pydicom.Dataset], *, with_purpose: bool) -> DicomSequence:
    """Every MR instance, as a whole (no frame numbers: each slice of a 3D model depends on all frames)."""
    items = []
    for header in sources:
        item = Dataset()
        item.ReferencedSOPClassUID = header.SOPClassUID
        item.ReferencedSOPInstanceUID = header.SOPInstanceUID
        if with_purpose:
            item.PurposeOfReferenceCodeSequence = [_code_item(SOURCE_IMAGE_PURPOSE)]
        items.append(item)
    return DicomSequence(items)


def _referenced_series_sequence(mr: pydicom.Dataset, sources: Sequence[pydicom.Dataset]) -> DicomSequence:
    series = Dataset()
    series.SeriesInstanceUID = mr.SeriesInstanceUID
    instances = []
    for header in sources:
        instance = Dataset()
        instance.ReferencedSOPClassUID = header.SOPClassUID
        instance.ReferencedSOPInstanceUID = header.SOPInstanceUID
        instances.append(instance)
    series.ReferencedInstanceSequence = instances
    return DicomSequence([series])


def _derivation_description(info: PredictorInfo, *, steps: int, samples: int, seed: int) -> str:
    parts = [
        f"Synthetic CT from MR by {MANUFACTURER} {__version__}",
        f"method={_text(info.method, 64)}",
        f"model={_text(info.model_name, 64)}",
        f"model_version={_text(info.model_version, 64)}",
        f"checkpoint_sha256={_text(info.checkpoint_sha256, 64) or 'none'}",
        f"sampler={_text(info.sampler, 64)}",
        f"steps={steps}",
        f"samples={samples}",
        f"seed={seed}",
        f"device={_text(info.device, 64)}",
    ]
    return "; ".join(parts)  # at most ~520 characters: within ST's 1024


def _software_versions(info: PredictorInfo) -> list[str]:
    return [_lo(f"{MANUFACTURER} {__version__}"), _lo(f"{info.model_name} {info.model_version}")]


def _default_series_number(mr: pydicom.Dataset, series_number: int | None) -> int:
    if series_number is not None:
        return int(series_number)
    mr_number = _int_or(mr.get("SeriesNumber"), None)
    return 1000 if mr_number is None else min(mr_number + 1000, MAX_IS)


def _int_or(value: object, default: int | None) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default


def _text(value: str, max_chars: int) -> str:
    """Printable ASCII without backslash (the DICOM value separator), at most ``max_chars``."""
    cleaned = "".join(ch if " " <= ch <= "~" and ch != "\\" else "_" for ch in str(value))
    return cleaned.strip()[:max_chars]


def _lo(value: str) -> str:
    return _text(value, 64)


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters; rounding to 1 nm first avoids '-0.0000000001'."""
    rounded = round(float(value), 6)
    return format_number_as_ds(rounded + 0.0)  # + 0.0 turns -0.0 into 0.0


# --- self-check -------------------------------------------------------------------------------------


def _validate_instance(ds: FileDataset, *, full_references: bool) -> None:
    """The checks highdicom would do at construction: the Type 1/2 attributes and the pixel layout."""
    for keyword in REQUIRED_TYPE1_KEYWORDS + (("ReferencedSeriesSequence",) if full_references else ()):
        if keyword not in ds or _is_empty(ds.get_item(keyword)):
            raise WriterError(f"built sCT instance lacks Type 1 attribute {keyword}")
    for keyword in REQUIRED_TYPE2_KEYWORDS:
        if keyword not in ds:
            raise WriterError(f"built sCT instance lacks Type 2 attribute {keyword}")
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        if not _is_valid_uid(ds[keyword].value):
            raise WriterError(f"built sCT instance has an invalid {keyword}: {ds[keyword].value!r}")
    expected_bytes = int(ds.Rows) * int(ds.Columns) * 2
    if len(ds.PixelData) != expected_bytes:
        raise WriterError(f"pixel data has {len(ds.PixelData)} bytes, expected {expected_bytes}")
    if len(ds.DerivationDescription) > 1024 or len(ds.SeriesDescription) > 64:
        raise WriterError("DerivationDescription or SeriesDescription exceeds its VR's length")


# --- writing ----------------------------------------------------------------------------------------


def _is_valid_uid(value: object) -> bool:
    """Checked with the regular expression, as pydicom's UID() would warn before telling."""
    return isinstance(value, str) and len(value) <= 64 and re.fullmatch(RE_VALID_UID, value) is not None


def _is_empty(element: DataElement | RawDataElement) -> bool:
    """Emptiness without decoding a raw element."""
    if isinstance(element, RawDataElement):
        return not element.length
    return element.is_empty


def _file_names(datasets: Sequence[FileDataset]) -> list[str]:
    if not datasets:
        raise WriterError("no sCT instances to write")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1 or "" in series_uids:
        raise WriterError(f"the instances to write belong to {len(series_uids)} series; write one series per folder")
    names = [f"CT_{_int_or(ds.get('InstanceNumber'), -1):04d}.dcm" for ds in datasets]
    if any(name.startswith("CT_-") for name in names):
        raise WriterError("every sCT instance needs a non-negative InstanceNumber")
    if len(set(names)) != len(names):
        raise WriterError("duplicate InstanceNumbers in the sCT series")
    return names


def _check_replaceable(out_dir: Path, series_instance_uid: str) -> None:
    """An existing out_dir may only be an empty folder or an earlier write of this same series."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise WriterError(f"{out_dir} exists and is not a folder")
    for entry in out_dir.iterdir():
        if not (entry.is_file() and re.fullmatch(r"CT_\d{4,}\.dcm", entry.name)):
            raise WriterError(f"{out_dir} holds {entry.name!r}, which this writer did not write; not replacing it")
        try:
            found = pydicom.dcmread(entry, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception as exc:  # an unreadable file: not ours to delete
            raise WriterError(f"{entry} is not a readable DICOM file ({exc}); not replacing {out_dir}") from exc
        if str(found.get("SeriesInstanceUID", "")) != series_instance_uid:
            raise WriterError(f"{out_dir} holds another series ({entry.name}); not replacing it")


def _write_file(content: FileDataset | bytes, path: Path) -> None:
    with open(path, "xb") as handle:
        if isinstance(content, bytes):
            handle.write(content)
        else:
            content.save_as(handle, enforce_file_format=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(new_dir: Path, out_dir: Path) -> None:
    """Rename ``new_dir`` to ``out_dir``; an existing out_dir (already checked) is moved aside, then removed."""
    old_dir = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if old_dir.exists():
        shutil.rmtree(old_dir)
    had_old = out_dir.exists()
    if had_old:
        out_dir.rename(old_dir)
    new_dir.rename(out_dir)
    _fsync_dir(out_dir.parent)
    if had_old:
        shutil.rmtree(old_dir)
