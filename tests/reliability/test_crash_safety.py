"""Crash safety, repeated: `sct-node serve` killed with SIGKILL in every phase of a series' life.

One node subprocess, one Orthanc. Each cycle sends a new phantom MR series (a new patient) with
DCMTK storescu and kills the node at a random moment aimed at one phase (reception, the quiet
period and sweep, sampling, writing, sending), then restarts it; after a kill before the sweep the
node stays down for up to a quiet period first (a service manager's restart delay). A scanner
whose association was killed re-sends what it had not had acknowledged, up to half a quiet period
after the node answers again (the way a scanner's auto-send queue retries). Each kill is
classified afterwards from the evidence the node left (storescu's acknowledgements, the committed
job state, the outbox), not from where it was aimed. The moments come from a seeded random
generator: ``SCT_CRASH_SEED=<seed>`` repeats a run's schedule (the seed is printed and is in
every assertion message).

At the end, after a settle time: every routed MR series has exactly one job, DONE, made from all its
instances, and exactly one sCT series in Orthanc with all the instances of the job's outbox (same
SOP Instance UIDs, no second sCT series); every instance storescu saw acknowledged has its audit
row in its series and its file where the row says; series that no rule routes (a diffusion series)
are NOT_ROUTED and defective ones (a slice missing) QUARANTINED with the reason and their files in
quarantine/; no partial write is left.
"""

from __future__ import annotations

import collections
import os
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from sqlalchemy import select

from dicom_node.audit import InstanceRow, JobRow, JobState, SeriesRow, SeriesState
from dicom_node.peers import Orthanc
from dicom_node.synthetic_mr import generate_mr_series
from tests.integration.harness import NodeProcess, node_config, require_binary, wait_for
from tests.reliability.audit_reader import AuditReader
from tests.reliability.conftest import scale

PHASES = ("reception", "quiet_sweep", "sampling", "writing", "sending")
SLICES = 20
QUIET_PERIOD_S = 3.0
MIN_KILLS = scale(5, 20)
CYCLE_BUDGET_S = scale(60.0, 300.0)  # kills go on until the budget is spent and every phase was hit
MAX_CYCLES = scale(24, 80)
# A scanner retries its queue a while after the node answers again; the node must keep a series
# that was cut short open for a whole quiet period after its restart (the time it was down was not quiet).
SCANNER_RETRY_MAX_S = 0.5 * QUIET_PERIOD_S


@dataclass
class SentSeries:
    index: int
    folder: Path
    files: list[Path]
    series_uid: str
    sop_by_path: dict[Path, str]
    kind: str  # "routed", "not_routed" (a diffusion series) or "defective" (a slice missing: quarantined)
    acked: set[Path] = field(default_factory=set)
    storescu_runs: int = 0
    log_path: Path = Path()


@dataclass(frozen=True)
class Moment:
    """Everything random about one cycle, drawn at its start (the same seed gives the same draws)."""

    kind: str
    acked_before_kill: int  # reception: kill once this many instances are in the spool
    delay_s: float  # fraction of the phase's delay window
    down_s: float  # how long the node stays down after a kill before reception or the sweep
    scanner_retry_s: float  # how long after the node answers again the scanner re-sends

    @classmethod
    def draw(cls, rng: random.Random, aimed: str) -> Moment:
        kinds = ("routed", "routed", "routed", "not_routed", "defective")
        kind = rng.choice(kinds)
        return cls(
            # the kills before a job exists hit the other kinds too
            kind=kind if aimed in ("reception", "quiet_sweep") else "routed",
            acked_before_kill=rng.randint(1, SLICES // 2),
            delay_s=rng.random(),
            down_s=rng.uniform(0.0, QUIET_PERIOD_S),
            scanner_retry_s=rng.uniform(0.0, SCANNER_RETRY_MAX_S),
        )


@dataclass
class Kill:
    cycle: int
    aimed: str
    landed: str
    detail: str


def _storescu_popen(port: int, files: list[Path], log_path: Path) -> subprocess.Popen[bytes]:
    """storescu in the background, verbose, its output in ``log_path`` (parsed for acknowledgements)."""
    binary = require_binary("storescu", "dcmtk")
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            [binary, "-v", "-aet", "SCANNER", "-aec", "SCTNODE", "127.0.0.1", str(port), *map(str, files)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )


def acknowledged(storescu_output: str) -> set[Path]:
    """The files storescu reported as stored: a 'Sending file' line followed by a success response."""
    acked: set[Path] = set()
    current: Path | None = None
    for line in storescu_output.splitlines():
        if "Sending file: " in line:
            current = Path(line.split("Sending file: ", 1)[1].strip())
        elif "Received Store Response" in line and current is not None:
            if "(Success" in line:
                acked.add(current)
            current = None
    return acked


def test_acknowledged_parses_storescu_verbose_output():
    output = (
        "I: Sending file: /a/1.dcm\nI: Sending Store Request (MsgID 1, MR)\nI: Received Store Response (Success)\n"
        "I: Sending file: /a/2.dcm\nI: Received Store Response (Error: Failed - Out of Resources)\n"
        "I: Sending file: /a/3.dcm\nE: Store Failed, file: /a/3.dcm:\n"
    )
    assert acknowledged(output) == {Path("/a/1.dcm")}


class CrashRig:
    def __init__(self, tmp_path: Path, pacs: Orthanc, seed: int) -> None:
        self.tmp_path = tmp_path
        self.pacs = pacs
        self.rng = random.Random(seed)
        self.seed = seed
        config = node_config(
            tmp_path,
            pacs_port=pacs.dicom_port,
            model={"method": "bulk_density"},
            series={"quiet_period_s": QUIET_PERIOD_S, "sweep_interval_s": 0.25},
            sender={"max_attempts": 20, "first_retry_s": 0.5, "max_retry_s": 2.0},
            jobs={"retention_days": 0},
        )
        self.node = NodeProcess(config)
        self.db_url = self.node.db_url
        self.outbox = tmp_path / "node" / "outbox"
        self.spool = tmp_path / "node" / "spool"
        self.sent: list[SentSeries] = []
        self.kills: list[Kill] = []
        self.restart_s: list[float] = []
        self._db: AuditReader | None = None

    @property
    def db(self) -> AuditReader:
        if self._db is None:
            self._db = AuditReader(self.db_url)
        return self._db

    def logs(self) -> str:
        orthanc_log = self.pacs.log_path.read_text(errors="replace") if self.pacs.log_path.exists() else ""
        return (
            f"\nseed {self.seed} (SCT_CRASH_SEED={self.seed} repeats the schedule)\nkills: {self.kills}\n"
            f"--- node log (tail) ---\n{self.node.log_text()[-5000:]}\n"
            f"--- Orthanc log (tail) ---\n{orthanc_log[-2000:]}"
        )

    # --- the scanner ---------------------------------------------------------------------------

    def new_series(self, index: int, kind: str = "routed") -> SentSeries:
        folder = self.tmp_path / f"mr{index:03d}"
        routed = kind != "not_routed"
        files = generate_mr_series(
            folder,
            slices=SLICES,
            rows=48,
            columns=48,
            patient_id=f"CRASH{index:03d}",
            patient_name=f"Crash^Patient{index:03d}",
            series_description="T1 MPRAGE SYNTHETIC PHANTOM" if routed else "DWI TRACEW SYNTHETIC PHANTOM",
            seed=index,
            drop_slices=(SLICES // 2,) if kind == "defective" else (),
        )
        sops = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        return SentSeries(index, folder, files, series_uid, sops, kind)

    def send(self, series: SentSeries, files: list[Path] | None = None) -> subprocess.Popen[bytes]:
        """storescu of ``files`` (default: every file not yet acknowledged), in the background."""
        series.storescu_runs += 1
        pending = files if files is not None else [p for p in series.files if p not in series.acked]
        series.log_path = series.folder.parent / f"storescu_{series.index:03d}_{series.storescu_runs}.log"
        return _storescu_popen(self.node.port, pending, series.log_path)

    def collect(self, series: SentSeries, process: subprocess.Popen[bytes]) -> None:
        process.wait(timeout=120)
        series.acked |= acknowledged(series.log_path.read_text(errors="replace"))

    def resend_until_complete(self, series: SentSeries) -> None:
        for _ in range(3):
            if series.acked == set(series.files):
                return
            self.collect(series, self.send(series))
        assert series.acked == set(series.files), f"the re-send did not complete series {series.index}{self.logs()}"

    # --- the node ------------------------------------------------------------------------------

    def job_of(self, series: SentSeries) -> JobRow | None:
        with self.db.session() as session:
            return session.scalars(
                select(JobRow)
                .join(SeriesRow, SeriesRow.id == JobRow.series_id)
                .where(SeriesRow.series_instance_uid == series.series_uid)
            ).first()

    def wait_job_state(self, series: SentSeries, states: set[str], timeout_s: float = 90.0) -> JobRow | None:
        """Poll (every ~5 ms) until the series' job is in one of ``states``; None when it went past them."""
        order = [JobState.QUEUED, JobState.RUNNING, JobState.SENDING, JobState.DONE]
        last = max(order.index(s) for s in states)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job_of(series)
            if job is not None and job.state in states:
                return job
            if job is not None and job.state in order and order.index(job.state) > last:
                return None
            time.sleep(0.005)
        raise AssertionError(f"series {series.index}: no job in {states} after {timeout_s:.0f} s{self.logs()}")

    def wait_for_write(self, series: SentSeries, timeout_s: float = 90.0) -> None:
        job = self.wait_job_state(series, {JobState.RUNNING}, timeout_s)
        if job is None:
            return
        deadline, checked_db_at = time.monotonic() + timeout_s, 0.0
        while time.monotonic() < deadline:
            if any(self.outbox.glob(f".job_{job.id}.tmp-*")):
                return
            if time.monotonic() - checked_db_at > 0.02:
                checked_db_at = time.monotonic()
                current = self.job_of(series)
                if current is None or current.state != JobState.RUNNING:
                    return
            time.sleep(0.001)

    def kill_and_classify(
        self, cycle: int, aimed: str, series: SentSeries, scanner: subprocess.Popen[bytes], moment: Moment
    ) -> None:
        assert self.node.alive(), self.logs()
        self.node.kill9()
        self.collect(series, scanner)
        landed, detail = self.classify(series)
        self.kills.append(Kill(cycle, aimed, landed, detail))
        print(f"kill {len(self.kills)} (cycle {cycle}): aimed at {aimed}, landed in {landed}: {detail}")
        if landed in ("reception", "quiet_sweep"):
            time.sleep(moment.down_s)  # a service manager's restart delay: the node stays down a while
        started = time.monotonic()
        self.node.start(timeout_s=120)
        self.restart_s.append(time.monotonic() - started)
        if series.acked != set(series.files):
            time.sleep(moment.scanner_retry_s)
        self.resend_until_complete(series)  # the scanner's auto-send retries what was not acknowledged

    def classify(self, series: SentSeries) -> tuple[str, str]:
        """Where the kill landed, from what the dead node left behind."""
        if series.acked != set(series.files):
            return "reception", f"{len(series.acked)} of {len(series.files)} instances acknowledged"
        job = self.job_of(series)
        if job is None or job.state == JobState.QUEUED:
            return "quiet_sweep", "series complete, " + ("no job yet" if job is None else f"job {job.id} QUEUED")
        if job.state == JobState.RUNNING:
            partial = list(self.outbox.glob(f".job_{job.id}.tmp-*"))
            if partial:
                written = sum(len(list(p.glob("*.dcm"))) for p in partial)
                return "writing", f"job {job.id} RUNNING, {written} sCT file(s) in a partial outbox folder"
            if (self.outbox / f"job_{job.id}").is_dir():
                return "writing", f"job {job.id} RUNNING, outbox folder renamed but not yet committed"
            return "sampling", f"job {job.id} RUNNING (load/sampling), nothing written"
        if job.state == JobState.SENDING:
            found = self.pacs.find_series(job.sct_series_uid)
            count = len(found["Instances"]) if found else 0
            return "sending", f"job {job.id} SENDING, {count} of {job.sct_instance_count} sCT instances in the PACS"
        return "after_done", f"job {job.id} already {job.state}"

    def cycle(self, cycle: int, aimed: str) -> None:
        moment = Moment.draw(self.rng, aimed)
        series = self.new_series(cycle, moment.kind)
        self.sent.append(series)
        scanner = self.send(series)
        if aimed == "reception":
            threshold = moment.acked_before_kill
            folder = self.spool / series.series_uid
            while scanner.poll() is None:
                if folder.is_dir() and len(os.listdir(folder)) >= threshold:
                    break
                time.sleep(0.001)
        else:
            self.collect(series, scanner)
            assert series.acked == set(series.files), f"storescu failed without a kill{self.logs()}"
            if aimed == "quiet_sweep":
                time.sleep(moment.delay_s * (QUIET_PERIOD_S + 0.5))
            elif aimed == "sampling":
                self.wait_job_state(series, {JobState.RUNNING})
                time.sleep(moment.delay_s * 0.05)
            elif aimed == "writing":
                self.wait_for_write(series)
                time.sleep(moment.delay_s * 0.01)
            elif aimed == "sending":
                self.wait_job_state(series, {JobState.SENDING})
                time.sleep(moment.delay_s * 0.08)
        self.kill_and_classify(cycle, aimed, series, scanner, moment)

    def landed(self) -> collections.Counter[str]:
        return collections.Counter(k.landed for k in self.kills)


def test_repeated_kill_9_in_every_phase_loses_and_duplicates_nothing(orthanc, tmp_path, report):
    seed = int(os.environ.get("SCT_CRASH_SEED") or int.from_bytes(os.urandom(4), "big"))
    print(f"crash-safety seed: {seed} (SCT_CRASH_SEED={seed} to repeat)")
    rig = CrashRig(tmp_path, orthanc, seed)
    rig.node.start(timeout_s=120)
    started = time.monotonic()
    try:
        cycle = 0
        while cycle < MAX_CYCLES:
            landed = rig.landed()
            missing = [p for p in PHASES if landed[p] == 0]
            if not missing and len(rig.kills) >= MIN_KILLS and time.monotonic() - started > CYCLE_BUDGET_S:
                break
            # aim at a phase not hit yet; once all are, at a random one
            aimed = rig.rng.choice(missing) if missing else rig.rng.choice(PHASES)
            rig.cycle(cycle, aimed)
            cycle += 1
        kill_seconds = time.monotonic() - started
        landed = rig.landed()
        assert all(landed[p] > 0 for p in PHASES), f"phases not hit: {landed}{rig.logs()}"
        assert len(rig.kills) >= MIN_KILLS, rig.logs()

        # settle: every job finishes after the last restart
        settle_started = time.monotonic()
        routed = [s for s in rig.sent if s.kind == "routed"]

        def all_done() -> bool:
            with rig.db.session() as session:
                states = session.scalars(select(JobRow.state)).all()
                receiving = session.scalars(select(SeriesRow.id).where(SeriesRow.state == SeriesState.RECEIVING)).all()
            return len(states) >= len(routed) and all(s == JobState.DONE for s in states) and not receiving

        try:
            wait_for(all_done, 180, "every series closed and every job DONE", interval_s=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {_job_summary(rig)}{rig.logs()}") from None
        settle_s = time.monotonic() - settle_started
        time.sleep(1.0)  # nothing must change any more: no late re-run, no second job
        _check_end_state(rig)
        total_restarts = len(rig.restart_s)
    finally:
        rig.node.stop()

    figures = {phase: landed[phase] for phase in (*PHASES, "after_done")}
    print(f"kills per phase: {figures}; restarts {total_restarts}, mean {_mean(rig.restart_s):.1f} s")
    report(
        did=(
            f"sent {len(rig.sent)} MR series of {SLICES} slices ({len(routed)} routed, the others a diffusion series "
            "or one with a slice missing) through `sct-node serve` and "
            f"killed it with SIGKILL {len(rig.kills)} times in a row at seeded random moments (seed {seed}), "
            f"restarting it each time; kills per phase: "
            + ", ".join(f"{k} {v}" for k, v in figures.items())
            + "; the scanner re-sent what was not acknowledged"
        ),
        result=(
            "every routed MR series got exactly one job, DONE, and exactly one sCT series in Orthanc with all its "
            "instances (same SOP Instance UIDs as its outbox); every acknowledged instance is in the audit database; "
            f"no job stuck (settled {settle_s:.1f} s after the last restart)"
        ),
        kills=len(rig.kills),
        kills_per_phase=figures,
        series=len(rig.sent),
        routed_series=len(routed),
        not_routed_series=sum(s.kind == "not_routed" for s in rig.sent),
        quarantined_series=sum(s.kind == "defective" for s in rig.sent),
        seed=seed,
        kill_phase_seconds=round(kill_seconds, 1),
        mean_restart_s=round(_mean(rig.restart_s), 2),
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _job_summary(rig: CrashRig) -> str:
    with rig.db.session() as session:
        rows = session.execute(
            select(JobRow.id, JobRow.state, JobRow.run_attempts, JobRow.send_attempts, JobRow.error)
        ).all()
        series = session.execute(select(SeriesRow.id, SeriesRow.state, SeriesRow.reason)).all()
    return f"\njobs: {rows}\nseries: {series}"


def _check_end_state(rig: CrashRig) -> None:
    """The end-state checks; a failure carries the jobs, the series and the logs."""
    try:
        _check_series_and_pacs(rig)
    except AssertionError as exc:
        raise AssertionError(f"{exc}{_job_summary(rig)}{rig.logs()}") from None


def _check_series_and_pacs(rig: CrashRig) -> None:
    ct_series = [s for s in rig.pacs.series() if s["MainDicomTags"].get("Modality") == "CT"]
    ct_by_uid = collections.Counter(s["MainDicomTags"]["SeriesInstanceUID"] for s in ct_series)
    routed = [s for s in rig.sent if s.kind == "routed"]
    job_uids: set[str] = set()
    with rig.db.session() as session:
        for sent in rig.sent:
            where = f"series {sent.index} ({sent.kind}, {sent.series_uid})"
            rows = session.scalars(select(SeriesRow).where(SeriesRow.series_instance_uid == sent.series_uid)).all()
            assert len(rows) == 1, where
            row = rows[0]
            instances = session.scalars(select(InstanceRow).where(InstanceRow.series_id == row.id)).all()
            # every acknowledged instance has its audit row in this series
            audited = {i.sop_instance_uid for i in instances}
            acked_uids = {sent.sop_by_path[p] for p in sent.acked}
            assert acked_uids == set(sent.sop_by_path.values()), where
            assert acked_uids <= audited, f"acknowledged but not audited: {acked_uids - audited} in {where}"
            # ...and was part of the series when it was closed (none arrived late, after the decision)
            late = [i.sop_instance_uid for i in instances if i.late]
            assert not late, f"{len(late)} instance(s) arrived after the series was closed: {where}"
            # ...and its file is where its row says (spool, or quarantine/ for a quarantined series)
            missing = [i.path for i in instances if not Path(i.path).is_file()]
            assert not missing, f"{len(missing)} audited file(s) missing, e.g. {missing[:2]}: {where}"
            jobs = session.scalars(select(JobRow).where(JobRow.series_id == row.id)).all()
            if sent.kind == "not_routed":
                assert row.state == SeriesState.NOT_ROUTED and row.reason, where
                assert not jobs, where
                continue
            if sent.kind == "defective":
                assert row.state == SeriesState.QUARANTINED and "missing" in row.reason.lower(), (row.reason, where)
                assert not jobs, where
                quarantine = rig.tmp_path / "node" / "quarantine" / sent.series_uid
                assert all(Path(i.path).parent == quarantine for i in instances), where
                assert not (rig.spool / sent.series_uid).exists(), f"spool folder left behind: {where}"
                continue
            assert row.state == SeriesState.ROUTED, f"{row.state} ({row.reason}): {where}"
            assert row.instance_count == SLICES, where
            assert len(jobs) == 1, f"{len(jobs)} jobs for one MR series: {where}"
            job = jobs[0]
            assert job.state == JobState.DONE, where
            assert job.sct_instance_count == SLICES, where
            job_uids.add(job.sct_series_uid)
            # exactly one sCT series in the PACS, holding exactly the SOP instances of the job's outbox
            assert ct_by_uid[job.sct_series_uid] == 1, where
            found = rig.pacs.find_series(job.sct_series_uid)
            assert found is not None, where
            in_pacs = {i["MainDicomTags"]["SOPInstanceUID"] for i in rig.pacs.get(f"/series/{found['ID']}/instances")}
            outbox = Path(job.output_dir)
            in_outbox = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in outbox.glob("*.dcm")}
            assert len(in_pacs) == len(found["Instances"]) == job.sct_instance_count, where
            assert in_pacs == in_outbox, f"PACS and outbox differ: {len(in_pacs ^ in_outbox)} UIDs, {where}"
    # no sCT series that no job owns (a second series for the same MR would show here)
    assert set(ct_by_uid) == job_uids and len(ct_series) == len(routed), (
        f"{len(ct_series)} CT series in the PACS for {len(routed)} routed MR series"
    )
    assert not list(rig.outbox.glob(".*.tmp-*")), "a partial sCT write was left behind"
    assert not list((rig.tmp_path / "node" / "incoming").iterdir()), "unacknowledged temporary files left"


def test_a_series_cut_short_by_a_crash_is_kept_open_for_a_quiet_period_after_the_restart(orthanc, tmp_path):
    """The node dies after half a series; it is down for longer than the quiet period; the scanner
    re-sends the rest a moment after the node answers again. The time the node was down was not
    quiet (nothing could arrive): the series must not be closed at the restart with half its slices."""
    rig = CrashRig(tmp_path, orthanc, seed=0)
    rig.node.start(timeout_s=120)
    try:
        series = rig.new_series(0)
        rig.sent.append(series)
        half = sorted(series.files)[: SLICES // 2]
        rig.collect(series, rig.send(series, half))
        assert series.acked == set(half), rig.logs()
        rig.node.kill9()
        time.sleep(QUIET_PERIOD_S + 1.0)  # down for longer than the quiet period
        rig.node.start(timeout_s=120)
        time.sleep(0.3 * QUIET_PERIOD_S)  # the scanner's retry comes a moment later
        rig.resend_until_complete(series)
        try:
            wait_for(lambda: (job := rig.job_of(series)) is not None and job.state == JobState.DONE, 120, "the job")
        except AssertionError as exc:
            raise AssertionError(f"{exc}{_job_summary(rig)}{rig.logs()}") from None
        _check_end_state(rig)
    finally:
        rig.node.stop()
