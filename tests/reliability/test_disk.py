"""Disk: below the free-space floor the node refuses stores and writes nothing; when space returns it resumes.

The node's storage root and its SQLite audit database live on a small tmpfs of their own (a real
file system that really fills up), mounted for the test; a "balloon" file takes the space away
and gives it back. Mounting needs root, which CI has (`.ci/run` runs as root).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.audit import EventRow, InstanceRow, JobRow, JobState, SeriesRow
from dicom_node.synthetic_mr import generate_mr_series
from tests.integration.harness import NodeProcess, node_config, storescu, wait_for

FS_MB = 64
FLOOR_MB = 24
MIB = 1024 * 1024


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting the small test file system needs root (CI runs as root)")
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_MB}m,mode=0700", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _free_mb(path: Path) -> float:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize / MIB


def _inflate(balloon: Path, leave_free_mb: float) -> None:
    """Grow ``balloon`` until about ``leave_free_mb`` MiB are left on its file system."""
    target = max(0.0, _free_mb(balloon.parent) - leave_free_mb)
    with open(balloon, "ab") as out:
        chunk = b"\0" * MIB
        for _ in range(int(target)):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_below_the_floor_stores_are_refused_and_nothing_is_written_then_service_resumes(orthanc, small_fs, report):
    workdir = small_fs / "work"
    config = node_config(
        workdir,
        pacs_port=orthanc.dicom_port,
        storage={"min_free_mb": FLOOR_MB, "fsync": True},
        # Long enough that the half-received series stays open while the disk is full.
        series={"quiet_period_s": 8.0, "sweep_interval_s": 0.5},
        model={"method": "bulk_density"},
    )
    files = sorted(generate_mr_series(small_fs.parent / "mr", slices=24, rows=64, columns=64))
    first_half, second_half = files[:12], files[12:]
    balloon = small_fs / "balloon.bin"

    node = NodeProcess(config).start()
    db = node.db()
    spool = workdir / "node" / "spool"
    incoming = workdir / "node" / "incoming"
    try:
        assert storescu(node.port, first_half).returncode == 0
        wait_for(lambda: _instance_count(db) == len(first_half), 30, "the first half in the audit database")
        spooled_before = {p.name for p in _files_under(spool)}
        assert len(spooled_before) == len(first_half)

        _inflate(balloon, leave_free_mb=FLOOR_MB - 8)  # the disk is now below the floor
        free_when_full = _free_mb(small_fs)
        assert free_when_full < FLOOR_MB
        # -nh: storescu tries every file instead of halting at the first failure; -v prints each status.
        refused = storescu(node.port, second_half, extra=("-nh", "-v"))
        assert refused.stderr.count("Refused: OutOfResources") == len(second_half), refused.stderr[-2000:]
        # Nothing of the refused instances exists anywhere: no spool file, no temporary file, no row.
        assert {p.name for p in _files_under(spool)} == spooled_before
        assert _files_under(incoming) == []
        assert _instance_count(db) == len(first_half)
        with db.session() as session:
            refusals = session.scalars(select(EventRow).where(EventRow.kind == "store_refused")).all()
        assert len(refusals) == len(second_half)
        assert {r.detail["status"] for r in refusals} == {"0xA700"}
        assert node.alive()

        balloon.unlink()  # space returns
        assert _free_mb(small_fs) > FLOOR_MB
        assert storescu(node.port, second_half).returncode == 0  # the scanner sends the refused half again
        wait_for(lambda: (j := _job(db)) is not None and j.state == JobState.DONE, 180, "the sCT after space returned")
        with db.session() as session:
            series = session.scalars(select(SeriesRow)).one()
            assert series.instance_count == len(files)
        job = _job(db)
        ct = [s for s in orthanc.series() if s["MainDicomTags"].get("Modality") == "CT"]
        assert len(ct) == 1 and len(ct[0]["Instances"]) == job.sct_instance_count
    finally:
        db.dispose()
        node.stop()

    report(
        did=(
            f"node storage and audit database on a {FS_MB} MiB tmpfs with a {FLOOR_MB} MiB floor; "
            f"{len(first_half)} of {len(files)} slices stored, then a balloon file left {free_when_full:.0f} MiB free "
            f"and the other {len(second_half)} were sent; then the balloon was removed and they were sent again"
        ),
        result=(
            f"{len(second_half)} stores refused with 0xA700 (audited), no spool, temporary or database row written "
            f"for them, node up; after space returned the series completed ({len(files)} instances) and its sCT "
            f"({job.sct_instance_count} slices) reached Orthanc"
        ),
        refused=len(second_half),
        free_mb_when_full=round(free_when_full, 1),
    )


def _instance_count(db) -> int:
    with db.session() as session:
        return len(session.scalars(select(InstanceRow.id)).all())


def _job(db) -> JobRow | None:
    with db.session() as session:
        return session.scalars(select(JobRow)).first()
