"""storescu (the scanner) → sct-node serve → Orthanc (the planning PACS), with the real MR series.

The shipped demo checkpoint is trained on phantoms: a real MR is not of its distribution, so the QA
holds the job (in_distribution fails) and a person's release (the command) sends it, as in a clinic.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from dicom_node.audit import InstanceRow, JobRow, JobState, QAResultRow, SeriesRow
from dicom_node.mr_series import read_headers
from tests.integration.harness import NodeProcess, node_config, shared_series, storescu, wait_for
from tests.integration.sct_rules import check_sct_series, read_datasets, run_dciodvfy


@pytest.mark.parametrize(("series_name", "samples"), [("ge_mprage_axial", 1), ("philips_mprage_sagittal", 2)])
def test_real_mr_series_becomes_a_valid_sct_in_orthanc(series_name, samples, orthanc, tmp_path):
    mr_dir = shared_series(series_name)
    mr_paths = sorted(p for p in mr_dir.iterdir() if p.suffix == ".dcm" or p.is_file())
    mr_headers = read_headers(mr_paths)
    config = node_config(
        tmp_path, pacs_port=orthanc.dicom_port, qa_policy="hold", send_qa_objects=True, model={"samples": samples}
    )
    node = NodeProcess(config).start()
    try:
        sent = storescu(node.port, mr_dir)
        assert sent.returncode == 0, sent.stdout + sent.stderr

        def sct_in_orthanc():
            for series in orthanc.series():
                if series["MainDicomTags"].get("Modality") == "CT" and series.get("Status") != "Missing":
                    return series
            return None

        db = node.db()

        def job_in(state):
            with db.session() as session:
                job = session.scalars(select(JobRow)).first()
                if job is not None and job.state == JobState.FAILED:
                    raise AssertionError(f"job failed: {job.error}\n{node.log_text()[-3000:]}")
                return job if job is not None and job.state == state else None

        held = wait_for(lambda: job_in(JobState.HELD), 300, "the QA to hold the job")
        with db.reading() as session:
            failed = {r.check for r in session.scalars(select(QAResultRow).where(QAResultRow.verdict == "fail"))}
        assert "in_distribution" in failed, failed
        assert orthanc.series() == []
        released = node.cli("review", "release", str(held.id), "--by", "Dr Test", "--reason", "tags and geometry")
        assert released.returncode == 0, released.stdout + released.stderr
        job = wait_for(lambda: job_in(JobState.DONE), 120, "the released job to be DONE")
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
        # The QA report (DOC) and, with samples > 1, the uncertainty map went with it, dciodvfy-clean too.
        others = {s["MainDicomTags"].get("Modality"): s for s in orthanc.series() if s["ID"] != found["ID"]}
        assert "DOC" in others and "CT" not in others and len(others) == (2 if samples > 1 else 1), others.keys()
        qa_paths = []
        for modality, series in others.items():
            (data,) = orthanc.series_files(series["ID"])
            qa_paths.append(written / f"qa-{modality}.dcm")
            qa_paths[-1].write_bytes(data)
        run_dciodvfy(qa_paths)

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
        for text in ("QUEUED -> RUNNING", "RUNNING -> HELD", "HELD -> SENDING", "SENDING -> DONE", job.sct_series_uid):
            assert text in history.stdout, history.stdout
    finally:
        node.stop()
    # Logs at INFO never carry patient identifiers.
    patient_id = str(mr_headers[0].PatientID)
    patient_name = str(mr_headers[0].PatientName)
    log = node.log_text()
    for identifier in (patient_id, patient_name):
        assert not re.search(rf"(?<![A-Za-z0-9_]){re.escape(identifier)}(?![A-Za-z0-9_])", log), identifier
