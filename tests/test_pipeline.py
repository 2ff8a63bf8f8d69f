"""The node in-process: reception → sweep → job → writer → sender, with a pynetdicom storage SCP as
the destination and sCT methods chosen by the test (the real bulk-density baseline, a predictor
that reports an uncertainty, one that fails)."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from sqlalchemy import select

from dicom_node import scu
from dicom_node.audit import EventRow, JobRow, JobState, SendInstanceRow, SendRow, SeriesRow
from dicom_node.config import Destination, load_config, with_overrides
from dicom_node.errors import SamplingError
from dicom_node.node import Node
from dicom_node.peers import FileStoreSCP, free_port
from dicom_node.synthetic_mr import generate_mr_series
from sct_model.result import PredictorInfo, SCTResult
from sct_model.volume import Grid, Volume, axial_grid_covering
from tests.integration.harness import in_process_config, wait_for


class UncertainPredictor:
    """40 HU everywhere with a known standard deviation (10 HU in the body half, 0 elsewhere)."""

    info = PredictorInfo("diffusion", "fake-ldm", "9.9", "ab" * 32, "DDIM", "cpu")

    def predict(self, mr: Volume, *, steps: int, samples: int, seed: int, output_grid: Grid | None = None) -> SCTResult:
        grid = output_grid or axial_grid_covering(mr.grid)
        hu = np.full(grid.shape_zyx, 40.0, np.float32)
        body = np.zeros(grid.shape_zyx, np.uint8)
        body[: grid.shape_zyx[0] // 2] = 1
        std = np.where(body > 0, 10.0, 0.0).astype(np.float32)
        return SCTResult(
            Volume(hu, grid),
            Volume(std, grid),
            Volume(body, grid),
            {"sampling": 0.01},
            self.info,
            tuple(range(seed, seed + samples)),
        )


class FailingPredictor:
    info = UncertainPredictor.info

    def predict(self, mr: Volume, **_kwargs: object) -> SCTResult:
        raise SamplingError("out of GPU memory (simulated)")


@pytest.fixture
def pacs(tmp_path):
    with FileStoreSCP(tmp_path / "pacs") as server:
        yield server


def _config(tmp_path: Path, pacs_port: int, **model: object):
    """The default config on free ports under tmp_path; the fast bulk-density method unless given."""
    return in_process_config(tmp_path, pacs_port, model={"method": "bulk_density", **model})


def _send(node: Node, files: list[Path]) -> None:
    result = scu.send_series(
        files, Destination("node", "SCTNODE", "127.0.0.1", node.port), calling_aet="SCANNER", timeout_s=30
    )
    assert result.ok, result.message


def _wait_job(node: Node, states=(JobState.DONE, JobState.FAILED)) -> JobRow:
    assert node.db is not None

    def finished():
        with node.db.session() as session:
            job = session.scalars(select(JobRow)).first()
            return job if job is not None and job.state in states else None

    return wait_for(finished, 60, f"a job in {states}")


def test_bulk_density_series_is_written_and_delivered(tmp_path, pacs):
    node = Node(_config(tmp_path, pacs.port))
    node.start()
    try:
        files = generate_mr_series(tmp_path / "mr", slices=12, rows=32, columns=32, orientation="sagittal")
        _send(node, files)
        job = _wait_job(node)
        assert job.state == JobState.DONE, job.error
        received = sorted(pacs.folder.glob("*.dcm"))
        assert len(received) == job.sct_instance_count > 0
        ct = pydicom.dcmread(received[0])
        assert ct.Modality == "CT" and ct.SeriesInstanceUID == job.sct_series_uid
        assert job.model_name == "bulk-density" and job.method == "bulk_density"
        assert {"quiet_period", "load", "sampling", "writing", "sending"} <= set(job.timings_s)
        assert job.timings_s["quiet_period"] >= 0.5
        with node.db.session() as session:
            sends = session.scalars(select(SendRow)).all()
            assert [(s.destination, s.ok, s.instances_sent) for s in sends] == [
                ("planning_pacs", True, job.sct_instance_count)
            ]
    finally:
        node.stop()


def test_uncertainty_is_stored_next_to_the_job_and_summarised(tmp_path, pacs):
    config = _config(tmp_path, pacs.port, samples=3)
    node = Node(config, predictor_factory=UncertainPredictor)
    node.start()
    try:
        _send(node, generate_mr_series(tmp_path / "mr", slices=10, rows=24, columns=24))
        job = _wait_job(node)
        assert job.state == JobState.DONE, job.error
        assert job.samples == 3
        path = Path(job.uncertainty_path)
        assert path.exists() and path.parent == config.storage.outbox
        std = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        assert std.max() == pytest.approx(10.0)
        assert job.uncertainty_mean_hu == pytest.approx(10.0)  # inside the body only
        assert job.uncertainty_p95_hu == pytest.approx(10.0)
        assert job.checkpoint_sha256 == "ab" * 32
    finally:
        node.stop()


def test_a_failing_stage_makes_a_failed_job_with_the_reason_and_the_node_goes_on(tmp_path, pacs):
    node = Node(_config(tmp_path, pacs.port), predictor_factory=FailingPredictor)
    node.start()
    try:
        _send(node, generate_mr_series(tmp_path / "mr", slices=8, rows=16, columns=16))
        job = _wait_job(node)
        assert job.state == JobState.FAILED
        assert "SamplingError: out of GPU memory (simulated)" in job.error
        assert not list(pacs.folder.glob("*.dcm"))
        assert node.scp is not None
        assert (
            scu.send_series(
                [], Destination("n", "SCTNODE", "127.0.0.1", node.port), calling_aet="X", timeout_s=5
            ).message
            == "nothing to send"
        )
    finally:
        node.stop()


def test_destination_refusing_gets_retries_then_failed_then_resend_delivers(tmp_path):
    refusing = FileStoreSCP(tmp_path / "refusing")
    refusing._on_store = lambda event: 0xA700  # type: ignore[method-assign]
    refusing.start()
    config = _config(tmp_path, refusing.port)
    node = Node(config)
    node.start()
    try:
        _send(node, generate_mr_series(tmp_path / "mr", slices=8, rows=16, columns=16))
        job = _wait_job(node)
        assert job.state == JobState.FAILED
        assert job.send_attempts == config.sender.max_attempts
        assert "status 0xA700" in job.error
        refusing.stop()
        with FileStoreSCP(tmp_path / "good", port=refusing.port) as good:
            from dicom_node import jobs

            with node.db.session() as session:
                assert jobs.request_resend(session, job.id) == JobState.SENDING
            job = _wait_job(node, states=(JobState.DONE,))
            assert len(list(good.folder.glob("*.dcm"))) == job.sct_instance_count
        with node.db.reading() as session:  # the history numbers attempts across the resend
            rows = session.scalars(select(SendRow).where(SendRow.job_id == job.id).order_by(SendRow.id)).all()
            assert [(row.attempt, row.ok) for row in rows] == [
                *((n, False) for n in range(1, config.sender.max_attempts + 1)),
                (config.sender.max_attempts + 1, True),
            ]
            for row in rows:  # what the destination answered, instance by instance
                answers = session.scalars(select(SendInstanceRow).where(SendInstanceRow.send_id == row.id)).all()
                assert len(answers) == job.sct_instance_count
                assert {a.status for a in answers} == ({0} if row.ok else {0xA700})
    finally:
        node.stop()
        refusing.stop()


def test_a_slow_destination_does_not_hold_up_the_delivery_of_other_jobs(tmp_path):
    """One sender thread sent the due jobs one after another: a research archive taking seconds per
    instance held up the planning PACS's next sCT. Sends now run per job, in parallel."""
    slow = FileStoreSCP(tmp_path / "slow", ae_title="ARCHIVE")
    slow_store = slow._on_store

    def slow_on_store(event):  # type: ignore[no-untyped-def]
        time.sleep(0.5)
        return slow_store(event)

    slow._on_store = slow_on_store  # type: ignore[method-assign]
    slow.start()
    fast = FileStoreSCP(tmp_path / "fast").start()
    config = _config(tmp_path, fast.port)
    route = config.routes[0]
    config = with_overrides(
        config,
        destinations=(
            Destination("planning_pacs", "PLANNING", "127.0.0.1", fast.port),
            Destination("archive", "ARCHIVE", "127.0.0.1", slow.port),
        ),
        routes=(
            dataclasses.replace(
                route, name="t1-archive", description_pattern=re.compile("T1"), destinations=("archive",)
            ),
            dataclasses.replace(
                route, name="t2-planning", description_pattern=re.compile("T2"), destinations=("planning_pacs",)
            ),
        ),  # fmt: skip
    )
    node = Node(config)
    node.start()
    try:
        _send(node, generate_mr_series(tmp_path / "t1", slices=16, rows=16, columns=16,
                                       series_description="T1 3D", protocol_name="T1"))  # fmt: skip

        def job_of(route_name: str) -> tuple[str, int] | None:
            """(state, sCT instance count) of the route's job, or None before it exists."""
            with node.db.reading() as session:
                job = session.scalars(select(JobRow).where(JobRow.route_name == route_name)).first()
                return None if job is None else (job.state, job.sct_instance_count)

        def in_state(route_name: str, state: str) -> tuple[str, int] | None:
            job = job_of(route_name)
            return job if job is not None and job[0] == state else None

        wait_for(lambda: in_state("t1-archive", JobState.SENDING), 60, "the T1 sCT sending to the archive")
        _send(node, generate_mr_series(tmp_path / "t2", slices=8, rows=16, columns=16,
                                       series_description="T2 TSE", protocol_name="T2", patient_id="P2"))  # fmt: skip
        _, delivered_count = wait_for(lambda: in_state("t2-planning", JobState.DONE), 60, "the T2 sCT delivered")
        assert in_state("t1-archive", JobState.SENDING), "the T2 sCT waited for the archive"
        assert len(list(fast.folder.glob("*.dcm"))) == delivered_count
        _, archived_count = wait_for(lambda: in_state("t1-archive", JobState.DONE), 60, "the T1 sCT archived")
        assert len(list(slow.folder.glob("*.dcm"))) == archived_count
    finally:
        node.stop()
        slow.stop()
        fast.stop()


def test_not_routed_series_is_audited_with_the_reason(tmp_path, pacs):
    node = Node(_config(tmp_path, pacs.port))
    node.start()
    try:
        _send(
            node,
            generate_mr_series(
                tmp_path / "mr",
                slices=6,
                rows=16,
                columns=16,
                series_description="T2 TRACEW",
                protocol_name="ep2d_diff_b1000",
            ),
        )
        assert node.db is not None

        def closed():
            with node.db.session() as session:
                row = session.scalars(select(SeriesRow)).first()
                return row if row is not None and row.state != "RECEIVING" else None

        series = wait_for(closed, 30, "the series to be closed")
        assert series.state == "NOT_ROUTED" and "excluded" in series.reason
        with node.db.session() as session:
            assert session.scalars(select(JobRow)).first() is None
            assert session.scalars(select(EventRow).where(EventRow.kind == "series_state")).first() is not None
    finally:
        node.stop()


def test_with_overrides_keeps_the_config_frozen():
    config = load_config()
    changed = with_overrides(config, series={"quiet_period_s": 1.0})
    assert changed.series.quiet_period_s == 1.0 and config.series.quiet_period_s != 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.series.quiet_period_s = 2.0  # type: ignore[misc]


def test_a_second_node_on_the_same_storage_root_is_refused(tmp_path, pacs):
    from dicom_node.errors import StorageInUseError

    config = _config(tmp_path, pacs.port)
    first = Node(config)
    first.start()
    try:
        second = Node(with_overrides(config, node={"port": free_port()}))
        with pytest.raises(StorageInUseError, match="another sct-node is running"):
            second.start()
    finally:
        first.stop()
    again = Node(config)  # the lock goes with the node
    again.start()
    again.stop()


def test_demo_diffusion_model_with_samples_gives_an_uncertainty_map(tmp_path, pacs):
    config = _config(tmp_path, pacs.port, method="diffusion", samples=2, steps=5)
    node = Node(config)
    node.start()
    try:
        _send(
            node,
            generate_mr_series(
                tmp_path / "mr", slices=20, rows=40, columns=40, pixel_spacing_mm=4.0, slice_spacing_mm=4.0
            ),
        )
        job = _wait_job(node)
        assert job.state == JobState.DONE, job.error
        assert job.method == "diffusion" and job.model_name.startswith("sct-ldm")
        assert len(job.checkpoint_sha256) == 64
        assert job.uncertainty_mean_hu is not None and job.uncertainty_mean_hu > 0
        assert job.uncertainty_p95_hu >= job.uncertainty_mean_hu
        std = sitk.GetArrayFromImage(sitk.ReadImage(job.uncertainty_path))
        assert std.shape[0] == job.sct_instance_count
        ct = pydicom.dcmread(sorted(pacs.folder.glob("*.dcm"))[0])
        assert job.checkpoint_sha256 in ct.DerivationDescription
    finally:
        node.stop()


def test_the_runner_reuses_the_headers_the_sweep_checked_and_rereads_when_the_files_differ(tmp_path, pacs, monkeypatch):
    from dicom_node import pipeline
    from dicom_node.mr_series import check_series, read_headers
    from dicom_node.series import CheckedFiles, CheckedSeriesCache

    reads: list[int] = []

    def counting_read_headers(paths):
        reads.append(len(paths))
        return read_headers(paths)

    monkeypatch.setattr(pipeline, "read_headers", counting_read_headers)
    node = Node(_config(tmp_path, pacs.port))
    node.start()
    try:
        files = generate_mr_series(tmp_path / "mr", slices=10, rows=32, columns=32)
        _send(node, files)
        job = _wait_job(node)
        assert job.state == JobState.DONE, job.error
        assert reads == [], "the runner read the headers again although the sweep had just checked them"
    finally:
        node.stop()

    # The cache answers only for the very files it was made from, once.
    cache = CheckedSeriesCache(max_series=2)
    headers = read_headers(files)
    entry = CheckedFiles(tuple(files), tuple(headers), check_series(headers, files))
    cache.put(7, entry)
    assert cache.take(7, files[:-1]) is None  # another file list: not this entry (and it is gone)
    cache.put(7, entry)
    assert cache.take(7, files) is entry and cache.take(7, files) is None
    for series_id in (1, 2, 3):
        cache.put(series_id, entry)
    assert len(cache) == 2 and cache.take(1, files) is None  # bounded: the oldest went first


def test_headers_are_read_in_the_quiet_period_and_again_only_when_an_instance_arrived_since(
    tmp_path, pacs, monkeypatch
):
    import time

    from dicom_node import series as series_module
    from dicom_node.mr_series import read_headers

    reads: list[int] = []

    def counting_read_headers(paths):
        reads.append(len(paths))
        return read_headers(paths)

    monkeypatch.setattr(series_module, "read_headers", counting_read_headers)
    from dicom_node import pipeline

    runner_loads: list[int] = []
    real_load = pipeline.load_mr_volume
    monkeypatch.setattr(pipeline, "load_mr_volume", lambda checked: runner_loads.append(1) or real_load(checked))
    config = with_overrides(_config(tmp_path, pacs.port), series={"quiet_period_s": 2.0, "sweep_interval_s": 0.1})
    node = Node(config)
    node.start()
    try:
        files = sorted(generate_mr_series(tmp_path / "mr", slices=24, rows=32, columns=32))
        _send(node, files[:12])
        wait_for(lambda: 12 in reads, 10, "the first half read in the quiet period")
        time.sleep(0.3)
        assert reads == [12], "read more than once although nothing arrived"
        _send(node, files[12:])  # the rest of the series arrives after the precheck
        job = _wait_job(node)
        assert job.state == JobState.DONE, job.error
        assert reads == [12, 24], "the whole series must be read once more, and only once"
        assert job.timings_s["check"] < 0.05  # the close used what the quiet period had read
        assert runner_loads == [], "the runner loaded the voxels although the quiet period had"
        with node.db.session() as session:
            assert session.get(SeriesRow, job.series_id).instance_count == 24
    finally:
        node.stop()
