"""The QA gate of one job without a node: its folder, its DICOM objects, a review drawn into the
report and the rebuilt document; big sCT grids checked on every n-th voxel."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import load_config
from dicom_node.demo import generate_demo_series
from dicom_node.mr_series import check_series, load_mr_volume, read_headers
from dicom_node.qa import checks
from dicom_node.qa.gate import GateJob, derived_uid, record_review, run_gate
from dicom_node.qa.layout import MR_HEADER_DCM, REPORT_DCM, REPORT_DICOM_JSON, REPORT_PDF, UNCERTAINTY_DCM
from dicom_node.qa.policy import SEND
from dicom_node.qa.report import draw_pages
from dicom_node.qa.report_data import Review
from dicom_node.sct_writer import build_sct_series
from sct_model.factory import DEMO_CHECKPOINT
from sct_model.sampler import SCTSampler
from sct_model.volume import axial_grid_covering

SCT_UID = "1.2.826.0.1.3680043.8.498.123456789"


@pytest.fixture(scope="module")
def demo_case(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("mr")
    files = generate_demo_series(folder)
    headers = read_headers(files)
    mr = load_mr_volume(check_series(headers, files))
    result = SCTSampler.from_checkpoint(DEMO_CHECKPOINT, device="cpu").predict(
        mr, steps=25, samples=2, seed=1, output_grid=axial_grid_covering(mr.grid)
    )
    return headers, mr, result


def _job(**changes: object) -> GateJob:
    values = dict(
        job_id=7,
        route="structural-t1-t2",
        qa_policy="hold",
        send_qa_report=True,
        send_uncertainty=True,
        sct_series_uid=SCT_UID,
        uid_root="",
        created=dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC).astimezone(),
        steps=25,
        samples=2,
        seed=1,
        ae_title="SCTNODE",
    )
    values.update(changes)
    return GateJob(**values)  # type: ignore[arg-type]


def test_the_gate_writes_its_folder_and_a_review_is_drawn_into_the_report(demo_case, tmp_path, monkeypatch):
    headers, mr, result = demo_case
    monkeypatch.setattr(checks, "MAX_CHECK_VOXELS", 40_000)  # 64³ voxels: checked on every 2nd
    assert checks.stride_for(result.hu.grid) == 2
    job = _job()
    series = build_sct_series(
        headers, result.hu, info=result.info, steps=25, samples=2, seed=1, series_instance_uid=SCT_UID
    )
    folder = tmp_path / "job_7_qa"
    gate = run_gate(
        job, mr=mr, mr_headers=headers, result=result, sct_series=series, qa=load_config().qa, folder=folder
    )
    assert gate.outcome.verdict == "pass" and gate.decision == SEND, gate.outcome.reasons()
    assert gate.deliverables == (REPORT_DCM, UNCERTAINTY_DCM)
    assert {"qa", "qa_outputs", "qa.in_distribution", "qa.field_of_view"} <= set(gate.timings_s)
    for name in (REPORT_PDF, REPORT_DCM, UNCERTAINTY_DCM, REPORT_DICOM_JSON, MR_HEADER_DCM, "report.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("report-page-*.png"))  # drawn after the job moved on
    assert draw_pages(folder) in (1, 2)
    report = pydicom.dcmread(folder / REPORT_DCM)
    assert report.SOPInstanceUID == derived_uid(SCT_UID, "qa-report", "")
    sources = {item.ReferencedSOPInstanceUID for item in report.SourceInstanceSequence}
    assert {str(h.SOPInstanceUID) for h in headers} <= sources and len(sources) == len(headers) + len(series)
    uncertainty = pydicom.dcmread(folder / UNCERTAINTY_DCM)
    assert uncertainty.SOPInstanceUID == derived_uid(SCT_UID, "uncertainty", "")
    assert uncertainty.NumberOfFrames == len(series)
    # the same job run again (after a crash) writes the same objects
    again = run_gate(
        job, mr=mr, mr_headers=headers, result=result, sct_series=series, qa=load_config().qa, folder=folder
    )
    assert again.outcome == gate.outcome and not list(folder.glob("report-page-*.png"))
    assert pydicom.dcmread(folder / REPORT_DCM).SOPInstanceUID == report.SOPInstanceUID

    record_review(
        folder, Review("released", "Dr Curie", "outline checked", "2026-12-03T13:00:00+00:00"), rebuild_document=True
    )
    rebuilt = pydicom.dcmread(folder / REPORT_DCM)
    pdf = tmp_path / "rebuilt.pdf"
    pdf.write_bytes(bytes(rebuilt.EncapsulatedDocument)[: int(rebuilt.EncapsulatedDocumentLength)])
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    assert "Dr Curie" in text and "outline checked" in text
    assert rebuilt.SOPInstanceUID == report.SOPInstanceUID  # the held report never left: same object, now final
    assert json.loads((folder / REPORT_DICOM_JSON).read_text())["created"] == job.created.isoformat()


def test_a_route_that_sends_nothing_with_the_sct_builds_no_dicom_objects(demo_case, tmp_path):
    headers, mr, result = demo_case
    series = build_sct_series(
        headers, result.hu, info=result.info, steps=25, samples=2, seed=1, series_instance_uid=SCT_UID
    )
    folder = tmp_path / "qa"
    job = _job(send_qa_report=False, send_uncertainty=False)
    gate = run_gate(
        job, mr=mr, mr_headers=headers, result=result, sct_series=series, qa=load_config().qa, folder=folder
    )
    assert gate.deliverables == () and (folder / REPORT_PDF).is_file()
    assert not (folder / REPORT_DCM).exists() and not (folder / UNCERTAINTY_DCM).exists()
    assert Path(folder / REPORT_DICOM_JSON).is_file()  # a later release may still need the document
