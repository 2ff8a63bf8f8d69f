"""The QA gate in a running node (the demo checkpoint, the default [qa] levels): what passes is
delivered with its report, what the checkpoint does not know is HELD with the right check failing,
a release delivers it once, a rejection never, the block policy never sends a fail."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from dicom_node import jobs, scu
from dicom_node.audit import EventRow, JobRow, JobState, QAResultRow, SeriesRow
from dicom_node.audit.report import describe_job
from dicom_node.config import Config, Destination
from dicom_node.demo import generate_demo_series
from dicom_node.errors import JobStateError
from dicom_node.node import Node
from dicom_node.peers import FileStoreSCP
from dicom_node.qa import review
from dicom_node.synthetic_mr import write_volume_series
from tests.integration.harness import in_process_config, wait_for
from training.ood import make_ood
from training.phantoms import make_phantom

CT = "1.2.840.10008.5.1.4.1.1.2"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
# What each generated input must fail (training.ood documents the kinds).
OOD_EXPECTED_FAILURE = {
    "inverted": "in_distribution",
    "block": "in_distribution",
    "truncated": "field_of_view",
    "unseen_anatomy": "in_distribution",
    "noise": "in_distribution",
}


@pytest.fixture
def pacs(tmp_path):
    with FileStoreSCP(tmp_path / "pacs") as server:
        yield server


def _config(tmp_path: Path, pacs_port: int, *, policy: str = "hold", **model: object) -> Config:
    """The default configuration (the demo checkpoint, 25 steps, the default [qa]) on free ports."""
    return in_process_config(
        tmp_path, pacs_port, qa_policy=policy, sender={"timeout_s": 20.0}, model={"device": "cpu", **model}
    )


def _send(node: Node, files: list[Path]) -> None:
    result = scu.send_series(
        files, Destination("node", "SCTNODE", "127.0.0.1", node.port), calling_aet="SCANNER", timeout_s=60
    )
    assert result.ok, result.message


def _jobs_in(node: Node, states: tuple[str, ...], count: int, timeout_s: float = 240) -> list[JobRow]:
    assert node.db is not None

    def settled() -> list[JobRow] | None:
        with node.db.session() as session:
            found = session.scalars(select(JobRow).order_by(JobRow.id)).all()
            failed = [job for job in found if job.state == JobState.FAILED]
            if failed:
                raise AssertionError(f"job {failed[0].id} failed: {failed[0].error}")
            return list(found) if len(found) == count and all(job.state in states for job in found) else None

    return wait_for(settled, timeout_s, f"{count} job(s) in {states}")


def _received(pacs: FileStoreSCP) -> dict[str, list[pydicom.Dataset]]:
    by_class: dict[str, list[pydicom.Dataset]] = {}
    for path in pacs.folder.glob("*.dcm"):
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        by_class.setdefault(str(dataset.SOPClassUID), []).append(dataset)
    return by_class


def _verdicts(node: Node, job_id: int) -> dict[str, str]:
    assert node.db is not None
    verdicts: dict[str, str] = {}
    with node.db.reading() as session:
        for check, verdict in session.execute(
            select(QAResultRow.check, QAResultRow.verdict).where(QAResultRow.job_id == job_id)
        ):
            verdicts[check] = max(verdicts.get(check, "pass"), verdict, key=("pass", "warn", "fail").index)
    return verdicts


def _pdf_pages_not_blank(pdf: Path, tmp_path: Path) -> int:
    prefix = tmp_path / "page"
    subprocess.run(["pdftoppm", "-png", "-r", "40", str(pdf), str(prefix)], check=True, capture_output=True)
    pages = sorted(tmp_path.glob("page*.png"))
    from PIL import Image

    for page in pages:
        grey = np.asarray(Image.open(page).convert("L"), dtype=np.float32)
        assert grey.std() > 20 and (grey < 200).mean() > 0.02, f"{page.name} looks blank"
    return len(pages)


def test_a_phantom_of_the_checkpoints_own_distribution_passes_and_goes_with_its_report(tmp_path, pacs):
    node = Node(_config(tmp_path, pacs.port, samples=2))
    node.start()
    try:
        _send(node, generate_demo_series(tmp_path / "mr"))
        (job,) = _jobs_in(node, (JobState.DONE,), 1)
        assert job.qa_verdict == "pass" and set(_verdicts(node, job.id).values()) == {"pass"}
        received = _received(pacs)
        assert len(received[CT]) == job.sct_instance_count == 64
        (report,) = received[ENCAPSULATED_PDF]
        (uncertainty,) = received[PARAMETRIC_MAP]
        mr = pydicom.dcmread(next((tmp_path / "mr").glob("*.dcm")), stop_before_pixels=True)
        for obj in (report, uncertainty):  # same patient and study, a series of its own
            assert obj.PatientID == mr.PatientID and obj.StudyInstanceUID == mr.StudyInstanceUID
            assert obj.SeriesInstanceUID not in (job.sct_series_uid, mr.SeriesInstanceUID)
        assert uncertainty.FrameOfReferenceUID == mr.FrameOfReferenceUID
        assert pydicom.dcmread(pacs.folder / f"{uncertainty.SOPInstanceUID}.dcm").Modality != "CT"
        assert _pdf_pages_not_blank(Path(job.qa_dir) / "report.pdf", tmp_path) in (1, 2)
        assert node.db is not None
        text = describe_job(node.db, job.id)
        assert text is not None and "QA              PASS" in text and "in_distribution  score" in text
    finally:
        node.stop()


def test_inputs_the_checkpoint_does_not_know_fail_the_right_check_and_are_held(tmp_path, pacs):
    rng = np.random.default_rng(7)
    phantom = make_phantom("TH", seed=20261204, shape_zyx=(64, 64, 64), spacing_mm=(3.0, 3.0, 3.0))
    node = Node(_config(tmp_path, pacs.port))
    node.start()
    try:
        kinds = list(OOD_EXPECTED_FAILURE)
        for number, kind in enumerate(kinds, start=1):
            files = write_volume_series(make_ood(kind, phantom, rng), tmp_path / kind, series_description=f"T1 {kind}")
            _send(node, files)
            wait_for(lambda n=number: _count_jobs(node) >= n, 30, f"the job of {kind}")
        held = _jobs_in(node, (JobState.HELD,), len(kinds))
        for kind, job in zip(kinds, held, strict=True):
            verdicts = _verdicts(node, job.id)
            assert verdicts[OOD_EXPECTED_FAILURE[kind]] == "fail", (kind, verdicts)
        assert not list(pacs.folder.glob("*.dcm"))  # nothing held reaches the PACS
        with pytest.raises(JobStateError):  # a held job is released, not resent
            assert node.db is not None
            with node.db.session() as session:
                jobs.request_resend(session, held[0].id)
    finally:
        node.stop()


def _count_jobs(node: Node) -> int:
    assert node.db is not None
    with node.db.reading() as session:
        return len(session.scalars(select(JobRow.id)).all())


def _held_jobs(tmp_path: Path, node: Node, count: int) -> list[JobRow]:
    rng = np.random.default_rng(3)
    phantom = make_phantom("AB", seed=20261205, shape_zyx=(64, 64, 64), spacing_mm=(3.0, 3.0, 3.0))
    for index in range(count):
        volume = make_ood("unseen_anatomy", phantom, rng)
        _send(node, write_volume_series(volume, tmp_path / f"meat{index}", patient_id=f"MEAT{index}"))
        wait_for(lambda n=index + 1: _count_jobs(node) >= n, 30, "the job")
    return _jobs_in(node, (JobState.HELD,), count)


def test_release_delivers_once_and_reject_never(tmp_path, pacs):
    node = Node(_config(tmp_path, pacs.port))
    node.start()
    try:
        released, rejected = _held_jobs(tmp_path, node, 2)
        assert node.db is not None
        with pytest.raises(review.ReviewError, match="reason"):
            review.take_decision(node.db, released.id, review.RELEASED, by="Dr Curie", reason="  ")
        state = review.take_decision(
            node.db, released.id, review.RELEASED, by="Dr Curie", reason="checked the outline against the MR"
        )
        assert state == JobState.SENDING
        with pytest.raises(review.ReviewError, match="SENDING|DONE"):  # a second release finds it gone
            review.take_decision(node.db, released.id, review.RELEASED, by="Dr Curie", reason="again")
        assert (
            review.take_decision(node.db, rejected.id, review.REJECTED, by="Dr Bohr", reason="meat is not a patient")
            == JobState.REJECTED
        )
        jobs_now = _jobs_in(node, (JobState.DONE, JobState.REJECTED), 2)
        assert [job.state for job in jobs_now] == [JobState.DONE, JobState.REJECTED]
        received = _received(pacs)
        assert len(received[CT]) == released.sct_instance_count  # one sCT, sent once
        assert {ds.SeriesInstanceUID for ds in received[CT]} == {released.sct_series_uid}
        (report,) = received[ENCAPSULATED_PDF]
        pdf = pydicom.dcmread(pacs.folder / f"{report.SOPInstanceUID}.dcm")
        pdf_path = tmp_path / "released.pdf"
        pdf_path.write_bytes(bytes(pdf.EncapsulatedDocument)[: int(pdf.EncapsulatedDocumentLength)])
        text = subprocess.run(["pdftotext", str(pdf_path), "-"], capture_output=True, text=True, check=True).stdout
        assert "Dr Curie" in text and "checked the outline against the MR" in text  # who released it and why
        with node.db.reading() as session:
            decisions = session.scalars(select(EventRow).where(EventRow.kind == "review").order_by(EventRow.id)).all()
            assert [(e.job_id, e.detail["decision"], e.detail["by"]) for e in decisions] == [
                (released.id, "released", "Dr Curie"),
                (rejected.id, "rejected", "Dr Bohr"),
            ]
            assert decisions[1].detail["reason"] == "meat is not a patient"
            rows = {job.id: job for job in session.scalars(select(JobRow))}
            assert rows[rejected.id].reviewed_by == "Dr Bohr" and rows[released.id].review_decision == "released"
        with pytest.raises(JobStateError, match="never sent"), node.db.session() as session:
            jobs.request_resend(session, rejected.id)
    finally:
        node.stop()


def test_the_block_policy_never_sends_a_fail(tmp_path, pacs):
    node = Node(_config(tmp_path, pacs.port, policy="block"))
    node.start()
    try:
        rng = np.random.default_rng(5)
        phantom = make_phantom("HN", seed=20261206, shape_zyx=(64, 64, 64), spacing_mm=(3.0, 3.0, 3.0))
        _send(node, write_volume_series(make_ood("noise", phantom, rng), tmp_path / "noise"))
        (job,) = _jobs_in(node, (JobState.REJECTED,), 1)
        assert "block policy" in job.error and job.qa_verdict == "fail"
        assert not list(pacs.folder.glob("*.dcm"))
        assert node.db is not None
        with pytest.raises(review.ReviewError, match="REJECTED"):
            review.take_decision(node.db, job.id, review.RELEASED, by="Dr Curie", reason="try")
        with node.db.reading() as session:
            series = session.scalars(select(SeriesRow)).one()
            assert series.state == "ROUTED"
    finally:
        node.stop()


def test_review_commands_list_show_and_decide(tmp_path, pacs, capsys):
    from dicom_node.__main__ import main
    from dicom_node.config import dump_config

    config = _config(tmp_path, pacs.port)
    node = Node(config)
    node.start()
    try:
        (job,) = _held_jobs(tmp_path, node, 1)
    finally:
        node.stop()
    path = tmp_path / "node.toml"
    path.write_text(dump_config(config))
    capsys.readouterr()
    assert main(["review", "list", "--config", str(path)]) == 0
    listing = capsys.readouterr().out
    assert f"{job.id}" in listing and "HELD" in listing and "in_distribution fail" in listing
    assert main(["review", "show", str(job.id), "--config", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "in_distribution  score" in shown and "FAIL" in shown
    assert f"sct-node review release {job.id} --by NAME --reason TEXT --config {path}" in shown
    assert main(["review", "release", str(job.id), "--by", "", "--reason", "x", "--config", str(path)]) == 1
    assert (
        main(["review", "reject", str(job.id), "--by", "Dr Bohr", "--reason", "no anatomy", "--config", str(path)]) == 0
    )
    assert "REJECTED by Dr Bohr" in capsys.readouterr().out
    assert main(["review", "list", "--all", "--config", str(path)]) == 0
    assert "rejected by Dr Bohr" in capsys.readouterr().out
    assert main(["audit", "show", str(job.id), "--config", str(path)]) == 0
    history = capsys.readouterr().out
    assert (
        "RUNNING -> HELD" in history and "HELD -> REJECTED" in history and "rejected by Dr Bohr: no anatomy" in history
    )
