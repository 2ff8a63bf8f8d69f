"""The QA gate with real peers: a held job survives kill -9, its release by command delivers the sCT,
the QA report (Encapsulated PDF) and the uncertainty map (Parametric Map) to Orthanc once, in the
MR's study, each dciodvfy-clean."""

from __future__ import annotations

import numpy as np
import pydicom
from sqlalchemy import select

from dicom_node.audit import JobRow, JobState
from dicom_node.synthetic_mr import write_volume_series
from tests.integration.harness import NodeProcess, node_config, storescu, wait_for
from tests.integration.sct_rules import run_dciodvfy
from training.ood import make_ood
from training.phantoms import make_phantom


def test_held_job_survives_kill9_and_its_release_delivers_once_to_orthanc(orthanc, tmp_path):
    phantom = make_phantom("AB", seed=20261207, shape_zyx=(64, 64, 64), spacing_mm=(3.0, 3.0, 3.0))
    meat = make_ood("unseen_anatomy", phantom, np.random.default_rng(11))
    mr_dir = tmp_path / "meat"
    mr_files = write_volume_series(meat, mr_dir, series_description="T2 PORCINE PHANTOM", patient_id="PIG001")
    config = node_config(
        tmp_path, pacs_port=orthanc.dicom_port, qa_policy="hold", send_qa_objects=True, model={"samples": 2}
    )
    node = NodeProcess(config).start()
    try:
        sent = storescu(node.port, mr_dir)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        db = node.db()

        def job_in(*states: str) -> JobRow | None:
            with db.session() as session:
                job = session.scalars(select(JobRow)).first()
                if job is not None and job.state == JobState.FAILED:
                    raise AssertionError(f"job failed: {job.error}\n{node.log_text()[-3000:]}")
                return job if job is not None and job.state in states else None

        held = wait_for(lambda: job_in(JobState.HELD), 240, "the job to be HELD")
        node.kill9()
        node.start()
        assert job_in(JobState.HELD) is not None  # still held after kill -9 and a restart
        assert orthanc.series() == []
        listing = node.cli("review", "list")
        assert listing.returncode == 0 and f"{held.id}" in listing.stdout and "HELD" in listing.stdout
        released = node.cli("review", "release", str(held.id), "--by", "Dr Curie", "--reason", "outline checked")
        assert released.returncode == 0, released.stderr
        again = node.cli("review", "release", str(held.id), "--by", "Dr Curie", "--reason", "twice")
        assert again.returncode == 1 and "only a HELD job" in again.stderr
        done = wait_for(lambda: job_in(JobState.DONE), 120, "the released job to be DONE")

        def all_three() -> dict[str, dict] | None:
            found = {s["MainDicomTags"].get("Modality"): s for s in orthanc.series() if s.get("Status") != "Missing"}
            return found if {"CT", "DOC"} <= set(found) and len(found) == 3 else None

        series = wait_for(all_three, 60, "the sCT, the report and the uncertainty map in Orthanc")
        assert len(series["CT"]["Instances"]) == done.sct_instance_count
        studies = {s["ParentStudy"] for s in series.values()}
        assert len(studies) == 1  # one study: the MR's
        study = orthanc.get(f"/studies/{studies.pop()}")
        mr = pydicom.dcmread(mr_files[0], stop_before_pixels=True)
        assert study["MainDicomTags"]["StudyInstanceUID"] == str(mr.StudyInstanceUID)
        written = []
        for modality, found in series.items():
            if modality == "CT":
                continue
            (data,) = orthanc.series_files(found["ID"])
            path = tmp_path / f"{modality}.dcm"
            path.write_bytes(data)
            written.append(path)
        run_dciodvfy(written)
        history = node.cli("audit", "show", str(held.id))
        for text in ("RUNNING -> HELD", "released by Dr Curie: outline checked", "HELD -> SENDING", "SENDING -> DONE"):
            assert text in history.stdout, history.stdout
    finally:
        node.stop()
