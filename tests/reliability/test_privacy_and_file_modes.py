"""Security: no patient identifiers in the node's INFO log of a full run; files readable by the service user only.

A full run: a series whose patient name, ID, birth date and accession number are distinctive
strings goes through reception, check, sampling, writing and sending, and a second series is
quarantined (so that the quarantine path is covered too). Then the node's log (INFO, the default
level of ``sct-node serve``) is searched for every identifier, and every file and folder the node
created under its storage root, and the audit database with its WAL files, are checked for mode
0600 / 0700.
"""

from __future__ import annotations

import re
import stat

from sqlalchemy import select

from dicom_node.audit import JobRow, JobState, SeriesRow, SeriesState
from dicom_node.synthetic_mr import generate_mr_series
from tests.integration.harness import NodeProcess, node_config, storescu, wait_for

PATIENT_NAME = "Zyxwvut^Qponmlk"
PATIENT_ID = "PID8675309X"


def _identifiers(patient_id: str, patient_name: str) -> list[str]:
    family, given = patient_name.split("^")
    return [patient_id, patient_name, family, given]


def test_a_full_run_logs_no_identifiers_and_creates_private_files(orthanc, tmp_path, report):
    config = node_config(tmp_path, pacs_port=orthanc.dicom_port, model={"method": "bulk_density"})
    good = generate_mr_series(
        tmp_path / "mr_good", slices=16, rows=48, columns=48, patient_id=PATIENT_ID, patient_name=PATIENT_NAME
    )
    bad = generate_mr_series(
        tmp_path / "mr_bad",
        slices=16,
        rows=48,
        columns=48,
        patient_id=PATIENT_ID + "B",
        patient_name=PATIENT_NAME + "B",
        drop_slices=[7],
    )
    node = NodeProcess(config).start()
    db = node.db()
    try:
        assert storescu(node.port, good[0].parent).returncode == 0
        assert storescu(node.port, bad[0].parent).returncode == 0

        def finished() -> bool:
            with db.session() as session:
                job = session.scalars(select(JobRow)).first()
                states = set(session.scalars(select(SeriesRow.state)))
                return job is not None and job.state == JobState.DONE and SeriesState.QUARANTINED in states

        wait_for(finished, 180, "the good series delivered and the bad one quarantined")
        assert node.cli("audit", "jobs").returncode == 0
    finally:
        db.dispose()
        node.stop()

    log_text = node.log_text()
    assert "INFO" in log_text, "the log holds no INFO lines: the check would prove nothing"
    leaks = [
        identifier
        for identifier in _identifiers(PATIENT_ID, PATIENT_NAME) + _identifiers(PATIENT_ID + "B", PATIENT_NAME + "B")
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(identifier)}(?![A-Za-z0-9])", log_text)
    ]
    assert not leaks, f"patient identifiers in the INFO log: {leaks}"

    root = tmp_path / "node"
    checked = {"files": 0, "folders": 0}
    wrong: list[str] = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            checked["folders"] += 1
            if mode & 0o077:
                wrong.append(f"{path.relative_to(tmp_path)} {oct(mode)}")
        elif path.is_file():
            checked["files"] += 1
            if mode & 0o077:
                wrong.append(f"{path.relative_to(tmp_path)} {oct(mode)}")
    database = root / "audit.sqlite"
    assert database.exists() and (root / "quarantine").is_dir() and (root / "outbox").is_dir()
    assert checked["files"] > 30, checked  # spool, outbox, quarantine, database
    assert not wrong, f"readable by others than the service user: {wrong}"

    report(
        did=(
            "a full run (one series delivered, one quarantined) with distinctive patient name and ID; the node's "
            f"INFO log ({len(log_text.splitlines())} lines) searched for them; modes of every file and folder under "
            f"the storage root checked ({checked['files']} files, {checked['folders']} folders, database included)"
        ),
        result="no identifier in the log; every file 0600 and every folder 0700 (nothing readable by group/others)",
        log_lines=len(log_text.splitlines()),
        **checked,
    )
