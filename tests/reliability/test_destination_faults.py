"""Destination faults: a PACS down for a long outage, a PACS refusing instances, a slow PACS.

`sct-node serve` runs as a subprocess with small retry intervals; the scanner is DCMTK storescu;
the destinations are Orthanc (real PACS) and :class:`FaultyPACS` (a pynetdicom SCP that refuses
or delays C-STOREs on purpose). What tests/integration/test_faults.py already covers (a PACS down
at first, one retry) is extended: an outage spanning many backoff intervals with a node restart
in the middle of it, per-instance refusals ending in FAILED and a manual resend, and reception
going on at full speed while the sender is stuck on a slow PACS.
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from dicom_node.audit import EventRow, JobRow, JobState, SendRow, SeriesRow
from dicom_node.peers import Orthanc, free_port
from dicom_node.synthetic_mr import generate_mr_series
from tests.integration.harness import NodeProcess, node_config, require_binary, storescu, wait_for
from tests.reliability.audit_reader import AuditReader
from tests.reliability.conftest import scale
from tests.reliability.faulty_pacs import OUT_OF_RESOURCES, FaultyPACS, sop_instance_uid

SLICES = 20


def _series(folder: Path, index: int, *, routed: bool = True) -> Path:
    generate_mr_series(
        folder,
        slices=SLICES,
        rows=48,
        columns=48,
        patient_id=f"FAULT{index:03d}",
        patient_name=f"Fault^Patient{index:03d}",
        series_description="T1 MPRAGE SYNTHETIC PHANTOM" if routed else "DWI TRACEW SYNTHETIC PHANTOM",
        seed=index,
    )
    return folder


def _series_uid(folder: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


_DATABASES: dict[str, AuditReader] = {}


def _db(node: NodeProcess) -> AuditReader:
    """One read-only engine per audit database for the whole test run."""
    if node.db_url not in _DATABASES:
        _DATABASES[node.db_url] = AuditReader(node.db_url)
    return _DATABASES[node.db_url]


def _job_for(node: NodeProcess, series_uid: str) -> JobRow | None:
    with _db(node).session() as session:
        return session.scalars(
            select(JobRow)
            .join(SeriesRow, SeriesRow.id == JobRow.series_id)
            .where(SeriesRow.series_instance_uid == series_uid)
        ).first()


def _sends(node: NodeProcess, job_id: int) -> list[SendRow]:
    with _db(node).session() as session:
        return list(session.scalars(select(SendRow).where(SendRow.job_id == job_id).order_by(SendRow.id)))


def _outbox_uids(job: JobRow) -> set[str]:
    return {sop_instance_uid(p) for p in Path(job.output_dir).glob("*.dcm")}


def _wait(node: NodeProcess, predicate: Any, timeout_s: float, what: str, pacs: Orthanc | None = None) -> Any:
    """wait_for, with the logs as they are at the time of the failure in its message."""
    try:
        return wait_for(predicate, timeout_s, what, interval_s=0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}{_logs(node, pacs)}") from None


def _logs(node: NodeProcess, pacs: Orthanc | None = None) -> str:
    text = f"\n--- node log (tail) ---\n{node.log_text()[-5000:]}"
    if pacs is not None and pacs.log_path.exists():
        text += f"\n--- Orthanc log (tail) ---\n{pacs.log_path.read_text(errors='replace')[-2000:]}"
    return text


def _ct_files(folder: Path, count: int) -> list[Path]:
    """Minimal CT Image Storage files (one series) to probe the peer with."""
    folder.mkdir(parents=True)
    series_uid, paths = generate_uid(), []
    for number in range(1, count + 1):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = series_uid, generate_uid(), "CT"
        ds.InstanceNumber = number
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
            CTImageStorage,
            ds.SOPInstanceUID,
        )
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"ct{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _store(port: int, files: list[Path]) -> list[int]:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="PLANNING")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in files]
    finally:
        assoc.release()


def test_faulty_pacs_refuses_what_it_is_told_and_keeps_one_copy_per_uid(tmp_path):
    """The peer itself: refusals by position and by UID, then accept; a second copy replaces the first."""
    files = _ct_files(tmp_path / "ct", count=6)
    uids = [sop_instance_uid(p) for p in files]
    with FaultyPACS(tmp_path / "pacs", refuse_every=3, refuse_uids=[uids[0]]) as pacs:
        assert _store(pacs.port, files) == [OUT_OF_RESOURCES, 0, OUT_OF_RESOURCES, 0, 0, OUT_OF_RESOURCES]
        pacs.accept_all()
        assert _store(pacs.port, files) == [0] * 6
        held = pacs.stored()
        assert len(held) == 1 and set(next(iter(held.values()))) == set(uids)
        assert len(pacs.offers) == 12


# --- a. the PACS down for a long outage, then back -------------------------------------------------


def test_pacs_down_for_many_retry_intervals_then_back_delivers_exactly_one_series(tmp_path, report):
    require_binary("Orthanc", "orthanc")
    outage_s = scale(15.0, 90.0)
    first_retry_s, max_retry_s = 0.5, 2.0
    pacs_dir, dicom_port, http_port = tmp_path / "orthanc", free_port(), free_port()
    config = node_config(
        tmp_path,
        pacs_port=dicom_port,
        model={"method": "bulk_density"},
        sender={"max_attempts": 1000, "first_retry_s": first_retry_s, "max_retry_s": max_retry_s, "timeout_s": 10.0},
    )
    node = NodeProcess(config).start()
    pacs = Orthanc(pacs_dir, dicom_port=dicom_port, http_port=http_port).start()
    try:
        # a first series goes through while the PACS is up
        before = _series(tmp_path / "mr_before", 1)
        assert storescu(node.port, before).returncode == 0
        _wait(node, lambda: (j := _job_for(node, _series_uid(before))) and j.state == JobState.DONE, 120, "first job")
        pacs.stop()  # the PACS goes down (maintenance, network)
        down_since = time.monotonic()

        during = _series(tmp_path / "mr_during", 2)
        assert storescu(node.port, during).returncode == 0
        uid = _series_uid(during)

        def failed_sends() -> list[SendRow]:
            job = _job_for(node, uid)
            return [s for s in _sends(node, job.id) if not s.ok] if job else []

        _wait(node, failed_sends, 120, "a failed send while the PACS is down")
        # halfway through the outage the node itself is killed and restarted: the retries go on
        time.sleep(max(0.0, down_since + outage_s / 2 - time.monotonic()))
        attempts_before_kill = len(failed_sends())
        node.kill9()
        node.start()
        time.sleep(max(0.0, down_since + outage_s - time.monotonic()))
        job = _job_for(node, uid)
        assert job is not None and job.state == JobState.SENDING, f"{job and job.state}{_logs(node)}"
        attempts_during_outage = len(failed_sends())
        pacs.start()  # back, same storage
        measured_outage_s = time.monotonic() - down_since
        _wait(node, lambda: _job_for(node, uid).state == JobState.DONE, 60 + 2 * max_retry_s, "delivery", pacs)
        job = _job_for(node, uid)
        sends = _sends(node, job.id)
        failures = [s for s in sends if not s.ok]
        assert [s.ok for s in sends] == [False] * len(failures) + [True], [(s.attempt, s.ok) for s in sends]
        assert len(failures) >= 4, f"only {len(failures)} failed attempts in a {outage_s:.0f} s outage"
        assert attempts_during_outage > attempts_before_kill, "no retry after the restart during the outage"
        assert job.send_attempts == len(sends) and [s.attempt for s in sends] == list(range(1, len(sends) + 1))
        # backoff: the waits grow from first_retry_s and never exceed max_retry_s (plus scheduling slack);
        # the kill in the middle leaves one longer gap (the restart)
        gaps = [(b.started_at - a.finished_at).total_seconds() for a, b in zip(sends, sends[1:], strict=False)]
        assert gaps[0] >= first_retry_s * 0.9, gaps
        assert sorted(gaps)[-2] <= max_retry_s + 2.0, gaps
        assert all("cannot connect" in s.message or "association" in s.message for s in failures), failures[0].message

        ct = [s for s in pacs.series() if s["MainDicomTags"].get("Modality") == "CT"]
        assert len(ct) == 2, f"{len(ct)} CT series for 2 MR series{_logs(node, pacs)}"
        found = pacs.find_series(job.sct_series_uid)
        assert found is not None and len(found["Instances"]) == job.sct_instance_count == SLICES
        in_pacs = {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.get(f"/series/{found['ID']}/instances")}
        assert in_pacs == _outbox_uids(job)
        delivered_after_s = (sends[-1].finished_at - sends[0].started_at).total_seconds()
    finally:
        node.stop()
        pacs.stop()

    report(
        did=(
            f"stopped Orthanc for {measured_outage_s:.0f} s while a 20-slice sCT was due (sender first_retry_s "
            f"{first_retry_s}, max_retry_s {max_retry_s}), killed and restarted the node halfway through, then "
            "started Orthanc again on the same storage"
        ),
        result=(
            f"{len(failures)} failed attempts with backoff (gaps {min(gaps):.1f}-{max(gaps):.1f} s), the retries "
            f"survived the restart, attempt {len(sends)} delivered {delivered_after_s:.1f} s after the first one; "
            "exactly one sCT series with all 20 instances in the PACS"
        ),
        outage_s=round(measured_outage_s, 1),
        attempts=len(sends),
        failed_attempts=len(failures),
        max_gap_s=round(max(gaps), 2),
    )


# --- b. the PACS refuses some instances, then a manual resend ---------------------------------------


def test_pacs_refusing_instances_fails_the_job_with_the_status_then_resend_delivers(tmp_path, report):
    max_attempts = 3
    refuse_every = 5
    with FaultyPACS(tmp_path / "pacs", refuse_every=refuse_every, refuse_status=OUT_OF_RESOURCES) as pacs:
        config = node_config(
            tmp_path,
            pacs_port=pacs.port,
            model={"method": "bulk_density"},
            sender={"max_attempts": max_attempts, "first_retry_s": 0.5, "max_retry_s": 1.0},
        )
        node = NodeProcess(config).start()
        try:
            mr = _series(tmp_path / "mr", 1)
            assert storescu(node.port, mr).returncode == 0
            uid = _series_uid(mr)
            _wait(
                node, lambda: (j := _job_for(node, uid)) is not None and j.state == JobState.FAILED, 120, "job FAILED"
            )
            job = _job_for(node, uid)
            refused = SLICES // refuse_every
            status, count = f"0x{OUT_OF_RESOURCES:04X}", f"{refused} of {SLICES}"  # what a physicist must see
            assert status in job.error and count in job.error, job.error
            sends = _sends(node, job.id)
            assert [(s.attempt, s.ok, s.instances_sent, s.instances_failed) for s in sends] == [
                (a, False, SLICES - refused, refused) for a in range(1, max_attempts + 1)
            ]
            assert all(status in s.message and count in s.message for s in sends), [s.message for s in sends]
            shown = node.cli("audit", "show", str(job.id))
            assert shown.returncode == 0, shown.stderr
            assert f"job {job.id}: FAILED" in shown.stdout, shown.stdout
            assert shown.stdout.count(status) >= max_attempts and count in shown.stdout, shown.stdout
            assert shown.stdout.count(f"FAILED {SLICES - refused} sent, {refused} failed") == max_attempts
            offers_failed = pacs.offers_of(job.sct_series_uid)
            assert len(offers_failed) == max_attempts * SLICES  # the node retried the whole series each time
            assert sum(o.status == OUT_OF_RESOURCES for o in offers_failed) == max_attempts * refused

            pacs.accept_all()
            resend = node.cli("resend", str(job.id))
            assert resend.returncode == 0, resend.stderr + resend.stdout
            _wait(node, lambda: _job_for(node, uid).state == JobState.DONE, 60, "delivery after the resend")
            job = _job_for(node, uid)
            sends = _sends(node, job.id)
            assert sends[-1].ok and sends[-1].instances_sent == SLICES and not job.error
            held = pacs.stored()
            assert list(held) == [job.sct_series_uid], list(held)  # one series, the job's UID
            assert set(held[job.sct_series_uid]) == _outbox_uids(job)  # each SOP UID once, all of them
            assert len(held[job.sct_series_uid]) == job.sct_instance_count == SLICES
            offers = pacs.offers_of(job.sct_series_uid)
            received_twice = SLICES - refused  # accepted in the failed attempts, then again by the resend
            shown = node.cli("audit", "show", str(job.id)).stdout
            assert f"job {job.id}: DONE" in shown and "manual resend requested" in shown, shown
        finally:
            node.stop()

    report(
        did=(
            f"a pynetdicom PACS answered 0x{OUT_OF_RESOURCES:04X} to every {refuse_every}th C-STORE; the node "
            f"(max_attempts {max_attempts}) sent a {SLICES}-slice sCT, then the PACS was switched to accept and "
            "`sct-node resend JOB` was run"
        ),
        result=(
            f"{max_attempts} attempts, each {refused} of {SLICES} refused, then FAILED with the status and count in "
            "job.error, SendRow.message and `sct-node audit show`; the resend delivered: the PACS holds one series "
            f"(the job's UID) with each of the {SLICES} SOP Instance UIDs once ({len(offers)} C-STOREs offered in "
            f"all; {received_twice} instances were stored in several attempts under the same UID)"
        ),
        attempts=max_attempts + 1,
        refused_per_attempt=refused,
        c_stores_offered=len(offers),
    )


# --- c. a slow PACS does not slow reception ------------------------------------------------------


def test_a_slow_pacs_does_not_block_reception_and_both_scts_arrive(tmp_path, report):
    delay_s = scale(0.3, 0.5)
    with FaultyPACS(tmp_path / "pacs") as pacs:
        config = node_config(tmp_path, pacs_port=pacs.port, model={"method": "bulk_density"})
        node = NodeProcess(config).start()
        try:
            # reception time of a series of the same size with nothing being sent (not routed: no job)
            baseline = []
            for i in range(3):
                folder = _series(tmp_path / f"mr_base{i}", 10 + i, routed=False)
                started = time.monotonic()
                assert storescu(node.port, folder).returncode == 0
                baseline.append(time.monotonic() - started)
            baseline_s = statistics.median(baseline)

            pacs.set_delay(delay_s)
            first = _series(tmp_path / "mr_first", 1)
            assert storescu(node.port, first).returncode == 0
            first_uid = _series_uid(first)
            _wait(
                node,
                lambda: (j := _job_for(node, first_uid)) is not None and pacs.offers_of(j.sct_series_uid),
                120,
                "the slow send of the first sCT to begin",
            )
            second = _series(tmp_path / "mr_second", 2)
            started = time.monotonic()
            result = storescu(node.port, second)
            during_s = time.monotonic() - started
            assert result.returncode == 0, result.stderr
            first_job = _job_for(node, first_uid)
            offered_by_then = len(pacs.offers_of(first_job.sct_series_uid))
            assert first_job.state == JobState.SENDING and offered_by_then < SLICES, (
                f"the slow send ended before the second series was received ({offered_by_then} offered)"
            )
            second_uid = _series_uid(second)
            for uid in (first_uid, second_uid):
                _wait(
                    node,
                    lambda uid=uid: (j := _job_for(node, uid)) is not None and j.state == JobState.DONE,
                    120 + 2 * SLICES * delay_s,
                    f"the sCT of {uid}",
                )
            jobs = [_job_for(node, first_uid), _job_for(node, second_uid)]
            held = pacs.stored()
            for job in jobs:
                assert set(held.get(job.sct_series_uid, {})) == _outbox_uids(job), f"job {job.id}"
                assert len(held[job.sct_series_uid]) == SLICES
            assert set(held) == {j.sct_series_uid for j in jobs}
            first_send = _sends(node, jobs[0].id)[-1]
            first_send_s = (first_send.finished_at - first_send.started_at).total_seconds()
            # the second series was received in a fraction of the time the first send took, and not
            # much slower than with nothing being sent (timing noise on a shared machine: generous)
            assert during_s < first_send_s / 3, (during_s, first_send_s)
            assert during_s < max(4 * baseline_s, baseline_s + 1.5), (during_s, baseline)
            second_written_at = _state_time(node, jobs[1].id, JobState.SENDING)
            first_done_at = _state_time(node, jobs[0].id, JobState.DONE)
        finally:
            node.stop()

    computed_during_send = second_written_at < first_done_at
    report(
        did=(
            f"a PACS answering each C-STORE after {delay_s} s received a {SLICES}-slice sCT "
            f"({first_send_s:.1f} s); while it was being sent a second scanner sent a {SLICES}-slice MR series"
        ),
        result=(
            f"the second series was received in {during_s:.2f} s (baseline without sending {baseline_s:.2f} s), "
            f"{'its sCT was computed during the slow send; ' if computed_during_send else ''}"
            "both sCTs arrived complete"
        ),
        slow_send_s=round(first_send_s, 2),
        reception_during_send_s=round(during_s, 3),
        reception_baseline_s=round(baseline_s, 3),
        delay_per_instance_s=delay_s,
        second_computed_during_first_send=computed_during_send,
    )


def _state_time(node: NodeProcess, job_id: int, state: str) -> dt.datetime:
    with _db(node).session() as session:
        return session.scalars(
            select(EventRow.at).where(EventRow.job_id == job_id, EventRow.to_state == state).order_by(EventRow.id)
        ).first()
