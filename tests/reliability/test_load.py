"""Load: four scanners sending at the same time over separate associations, several rounds.

Each round, four DCMTK ``storescu`` processes (calling AE titles SCANNER1..4, one new patient and
series each) send to ``sct-node serve`` at once; the next round starts as soon as the previous
round's stores are answered, so reception overlaps the sampling of the previous round. At the
end: every series was received whole, every series has exactly one complete sCT series in
Orthanc, no job is left unfinished, and the node's memory stayed bounded: its peak resident size
(VmHWM) stays under MEMORY_BUDGET_MB, and the resident size after each round is reported (the
first is taken before the model is loaded; glibc keeps freed memory, so RSS is a high-water mark
more than a leak detector).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from sqlalchemy import select

from dicom_node.audit import JobRow, JobState, SeriesRow
from dicom_node.synthetic_mr import generate_mr_series
from tests.integration.harness import NodeProcess, node_config, require_binary, wait_for
from tests.reliability.conftest import scale

SCANNERS = 4
ROUNDS = scale(2, 3)
SLICES = scale(40, 300)
MATRIX = scale(64, 256)
MEMORY_BUDGET_MB = scale(2048, 3072)  # 4 scanners' series in flight, two prefetched volumes, one sampling job


def _memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a live process, in kB, from /proc."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def _jobs_in(db, states: tuple[str, ...]) -> list[int]:
    with db.session() as session:
        return list(session.scalars(select(JobRow.id).where(JobRow.state.in_(states))))


def _start_storescu(port: int, folder: Path, calling_aet: str) -> subprocess.Popen[str]:
    binary = require_binary("storescu", "dcmtk")
    return subprocess.Popen(
        [binary, "-aet", calling_aet, "-aec", "SCTNODE", "127.0.0.1", str(port), "+sd", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def test_four_scanners_at_once_for_several_rounds(orthanc, tmp_path, report):
    config = node_config(
        tmp_path,
        pacs_port=orthanc.dicom_port,
        node={"max_associations": 8},
        series={"quiet_period_s": 2.0, "sweep_interval_s": 0.25},
        model={"method": "diffusion", "steps": 10},  # the shipped demo checkpoint, few steps
    )
    series_dirs: dict[tuple[int, int], Path] = {}
    for round_index in range(ROUNDS):
        for scanner in range(SCANNERS):
            folder = tmp_path / "mr" / f"r{round_index}_s{scanner}"
            generate_mr_series(
                folder,
                slices=SLICES,
                rows=MATRIX,
                columns=MATRIX,
                pixel_spacing_mm=240.0 / MATRIX,
                slice_spacing_mm=150.0 / SLICES,
                orientation=("axial", "sagittal", "oblique", "coronal")[scanner],
                patient_id=f"LOAD{round_index}{scanner}",
                patient_name=f"Load^R{round_index}S{scanner}",
                seed=round_index * SCANNERS + scanner,
            )
            series_dirs[(round_index, scanner)] = folder

    node = NodeProcess(config).start()
    db = node.db()
    receive_s: list[float] = []
    overlapped_rounds = 0
    rss_after_round_mb: list[float] = []
    try:
        for round_index in range(ROUNDS):
            if round_index > 0:
                # Send while the sampler works on the previous round (as a busy department does).
                wait_for(lambda: _jobs_in(db, (JobState.RUNNING,)), 300, "a job to be sampling", interval_s=0.05)
            started = time.monotonic()
            senders = [
                _start_storescu(node.port, series_dirs[(round_index, s)], f"SCANNER{s + 1}") for s in range(SCANNERS)
            ]
            outputs = [p.communicate(timeout=600)[0] for p in senders]
            receive_s.append(time.monotonic() - started)
            for scanner, (process, output) in enumerate(zip(senders, outputs, strict=True)):
                assert process.returncode == 0, f"round {round_index} scanner {scanner + 1}: {output[-2000:]}"
            # Reception did not wait for the sampler: the four series were all stored while earlier
            # jobs were still queued or sampling.
            if round_index > 0 and _jobs_in(db, (JobState.QUEUED, JobState.RUNNING)):
                overlapped_rounds += 1
            rss_after_round_mb.append(_memory_kb(node.process.pid)["VmRSS"] / 1024)  # type: ignore[union-attr]

        expected_series = ROUNDS * SCANNERS

        def all_finished() -> bool:
            with db.session() as session:
                found = session.scalars(select(JobRow)).all()
                return len(found) == expected_series and all(j.state in (JobState.DONE, JobState.FAILED) for j in found)

        wait_for(all_finished, scale(600, 3600), f"{expected_series} jobs to finish", interval_s=1.0)
        memory = _memory_kb(node.process.pid)  # type: ignore[union-attr]
        with db.session() as session:
            series_rows = session.scalars(select(SeriesRow)).all()
            job_rows = session.scalars(select(JobRow)).all()
        assert len(series_rows) == expected_series
        assert all(s.instance_count == SLICES for s in series_rows), [(s.id, s.instance_count) for s in series_rows]
        assert {s.calling_aet for s in series_rows} == {f"SCANNER{i + 1}" for i in range(SCANNERS)}
        failed = [(j.id, j.error) for j in job_rows if j.state != JobState.DONE]
        assert not failed, failed
        ct_series = [s for s in orthanc.series() if s["MainDicomTags"].get("Modality") == "CT"]
        assert len(ct_series) == expected_series, "each MR series must have exactly one sCT series"
        stored = {s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"]) for s in ct_series}
        assert stored == {j.sct_series_uid: j.sct_instance_count for j in job_rows}
        assert overlapped_rounds == ROUNDS - 1, (
            f"only {overlapped_rounds} of {ROUNDS - 1} later rounds were received while earlier jobs were pending"
        )
        peak_mb = memory["VmHWM"] / 1024
        assert peak_mb <= MEMORY_BUDGET_MB, (peak_mb, rss_after_round_mb)
    finally:
        db.dispose()
        node.stop()

    images = expected_series * SLICES
    report(
        did=(
            f"{SCANNERS} scanners (storescu, separate associations) sent {ROUNDS} rounds of {SLICES}-slice "
            f"{MATRIX}x{MATRIX} series at once ({expected_series} series, {images} images); each round started "
            f"while a job of the previous round was sampling (demo diffusion checkpoint, 10 DDIM steps)"
        ),
        result=(
            f"all {expected_series} series received whole, {expected_series} sCT series in Orthanc (one each), "
            f"no job failed; every later round was stored while earlier jobs were still queued or sampling; "
            f"reception per round {', '.join(f'{s:.1f}' for s in receive_s)} s (round 1 with the sampler idle); "
            f"peak RSS {peak_mb:.0f} MB (budget {MEMORY_BUDGET_MB} MB); RSS after each round's reception "
            f"{', '.join(f'{m:.0f}' for m in rss_after_round_mb)} MB"
        ),
        series=expected_series,
        images=images,
        receive_s=[round(s, 2) for s in receive_s],
        peak_rss_mb=round(peak_mb),
        rss_after_round_mb=[round(m) for m in rss_after_round_mb],
    )
