"""storescu (the scanner) → sct-node serve → Orthanc (the planning PACS), with the real MR series."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from dicom_node.audit import InstanceRow, JobRow, JobState, SeriesRow
from dicom_node.mr_series import read_headers
from tests.integration.harness import NodeProcess, node_config, shared_series, storescu, wait_for
from tests.integration.sct_rules import check_sct_series, read_datasets, run_dciodvfy


@pytest.mark.parametrize("series_name", ["ge_mprage_axial", "philips_mprage_sagittal"])
def test_real_mr_series_becomes_a_valid_sct_in_orthanc(series_name, orthanc, tmp_path):
    mr_dir = shared_series(series_name)
    mr_paths = sorted(p for p in mr_dir.iterdir() if p.suffix == ".dcm" or p.is_file())
    mr_headers = read_headers(mr_paths)
    node = NodeProcess(node_config(tmp_path, pacs_port=orthanc.dicom_port)).start()
    try:
        sent = storescu(node.port, mr_dir)
        assert sent.returncode == 0, sent.stdout + sent.stderr

        def sct_in_orthanc():
            for series in orthanc.series():
                if series["MainDicomTags"].get("Modality") == "CT" and series.get("Status") != "Missing":
                    return series
            return None

        db = node.db()

        def job_done():
            with db.session() as session:
                job = session.scalars(select(JobRow)).first()
                if job is not None and job.state == JobState.FAILED:
                    raise AssertionError(f"job failed: {job.error}\n{node.log_text()[-3000:]}")
                return job if job is not None and job.state == JobState.DONE else None

        job = wait_for(job_done, 300, "the job to be DONE")
        found = wait_for(sct_in_orthanc, 30, "the sCT series in Orthanc")
        assert len(found["Instances"]) == job.sct_instance_count
        files = orthanc.series_files(found["ID"])
        check_sct_series(read_datasets(files), mr_headers, mr_paths)
        written = tmp_path / "from-orthanc"
        written.mkdir()
        paths = []
        for index, data in enumerate(files):
            path = written / f"{index:04d}.dcm"
            path.write_bytes(data)
            paths.append(path)
        run_dciodvfy(paths)

        with db.session() as session:
            series = session.scalars(select(SeriesRow)).one()
            assert series.instance_count == len(mr_paths)
            assert series.state == "ROUTED"
            instance_count = session.scalars(select(InstanceRow.id)).all()
            assert len(instance_count) == len(mr_paths)
            assert {"quiet_period", "load", "sampling", "writing", "sending"} <= set(job.timings_s)
        listing = node.cli("audit", "jobs")
        assert listing.returncode == 0 and "DONE" in listing.stdout, listing.stdout + listing.stderr
        history = node.cli("audit", "show", str(job.id))
        assert history.returncode == 0, history.stderr
        for text in ("QUEUED -> RUNNING", "RUNNING -> SENDING", "SENDING -> DONE", job.sct_series_uid):
            assert text in history.stdout, history.stdout
    finally:
        node.stop()
    # Logs at INFO never carry patient identifiers.
    patient_id = str(mr_headers[0].PatientID)
    patient_name = str(mr_headers[0].PatientName)
    log = node.log_text()
    for identifier in (patient_id, patient_name):
        assert not re.search(rf"(?<![A-Za-z0-9_]){re.escape(identifier)}(?![A-Za-z0-9_])", log), identifier
