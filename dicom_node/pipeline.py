"""The only place where the stages meet: load → sample → write → QA gate → send, for one job.

Each stage is a plain function in its own module and raises the project's own exceptions;
``run_job`` and ``send_job`` are the only code that turns an exception into a FAILED job with an
audit row. Files carry the data (spool → outbox), the database carries the state.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from dicom_node import jobs, scu
from dicom_node.audit import AuditDB, JobRow, JobState, QAResultRow, SendInstanceRow, SendRow, add_event, utcnow
from dicom_node.config import Config
from dicom_node.errors import SctNodeError
from dicom_node.mr_series import check_series, load_mr_volume, read_headers
from dicom_node.qa.gate import GateJob, GateResult, draw_report_pages, run_gate
from dicom_node.qa.layout import qa_folder
from dicom_node.qa.policy import DECISION_TEXT, HOLD, SEND
from dicom_node.sct_writer import build_sct_series, write_series
from dicom_node.series import CheckedSeriesCache, series_instance_paths
from sct_model.result import SCTPredictor, SCTResult
from sct_model.volume import axial_grid_covering

log = logging.getLogger(__name__)


class PredictorPool:
    """One predictor per worker thread, loaded on first use and kept (the model is loaded once per
    worker, not per job)."""

    def __init__(self, factory: Callable[[], SCTPredictor]) -> None:
        self._factory = factory
        self._local = threading.local()

    def get(self) -> SCTPredictor:
        predictor = getattr(self._local, "predictor", None)
        if predictor is None:
            predictor = self._local.predictor = self._factory()
        return predictor


def default_predictor_factory(config: Config) -> Callable[[], SCTPredictor]:
    def load() -> SCTPredictor:
        from sct_model.factory import load_predictor  # torch is imported here, not at node start

        checkpoint = config.model.checkpoint if config.model.method == "diffusion" else None
        return load_predictor(config.model.method, checkpoint, config.model.device)

    return load


@dataclasses.dataclass
class PipelineContext:
    config: Config
    db: AuditDB
    predictors: PredictorPool
    checked_series: CheckedSeriesCache = dataclasses.field(default_factory=CheckedSeriesCache)

    def job_outbox(self, job_id: int) -> Path:
        return self.config.storage.outbox / f"job_{job_id}"

    def job_qa_folder(self, job_id: int) -> Path:
        return qa_folder(self.config.storage.outbox, job_id)


def run_queued_jobs(ctx: PipelineContext, after_each: Callable[[], None] | None = None) -> int:
    """Claim and run QUEUED jobs until none is left; returns how many ran (a scheduler task)."""
    count = 0
    while True:
        with ctx.db.session() as session:
            job = jobs.claim_next_queued(session)
            job_id = job.id if job is not None else None
        if job_id is None:
            return count
        for_people = run_job(ctx, job_id)
        count += 1
        if after_each is not None:
            after_each()  # the sender starts on the job before its report's pages are drawn
        try:
            draw_report_pages(ctx.job_qa_folder(job_id))
            if for_people is not None:
                for_people()
        except Exception:  # they serve people; the job is not touched (the page builds them again)
            log.exception("job %d: drawing the QA report's pages or the viewer's volumes failed", job_id)


def run_job(ctx: PipelineContext, job_id: int) -> Callable[[], None] | None:
    """Compute and write the sCT of a RUNNING job; SENDING when its series is in the outbox.

    Returns what is left to do for people once the job has moved on: with the review page served
    (``[web] enabled``), writing the viewer's volumes while the MR and the sCT are still in memory."""
    with ctx.db.session() as session:
        job = session.get(JobRow, job_id)
        if job is None or job.state != JobState.RUNNING:
            return None
        series_id = job.series_id
        paths = series_instance_paths(session, series_id)
        gate_job = GateJob(
            job_id=job.id,
            route=job.route_name,
            qa_policy=job.qa_policy,
            send_qa_report=job.send_qa_report,
            send_uncertainty=job.send_uncertainty,
            sct_series_uid=job.sct_series_uid,
            uid_root=ctx.config.node.uid_root,
            created=job.created_at.replace(tzinfo=dt.UTC).astimezone(),  # local time; a re-run writes identical files
            steps=job.steps,
            samples=job.samples,
            seed=job.seed,
            ae_title=ctx.config.node.ae_title,
        )
    steps, samples, seed = gate_job.steps, gate_job.samples, gate_job.seed
    timings: dict[str, float] = {}
    try:
        started = time.perf_counter()
        cached = ctx.checked_series.take(series_id, paths)
        if cached is not None:  # the sweep has just read and checked exactly these files
            headers, checked = list(cached.headers), cached.checked
        else:
            headers = read_headers(paths)
            checked = check_series(headers, paths)
        mr_volume = cached.volume if cached is not None and cached.volume is not None else load_mr_volume(checked)
        output_grid = axial_grid_covering(checked.grid)
        timings["load"] = time.perf_counter() - started

        started = time.perf_counter()
        predictor = ctx.predictors.get()
        result = predictor.predict(mr_volume, steps=steps, samples=samples, seed=seed, output_grid=output_grid)
        timings["sampling"] = time.perf_counter() - started

        started = time.perf_counter()
        sct_series = build_sct_series(
            headers,
            result.hu,
            info=result.info,
            steps=steps,
            samples=samples,
            seed=seed,
            series_instance_uid=gate_job.sct_series_uid,
            uid_root=gate_job.uid_root,
            source_references=ctx.config.node.source_references,
            created=gate_job.created,
        )
        outbox = ctx.job_outbox(job_id)
        built_s = time.perf_counter() - started

        def write() -> tuple[tuple[str, float, float] | None, float]:
            began = time.perf_counter()
            write_series(sct_series, outbox)
            written = _write_uncertainty(result, outbox.with_name(outbox.name + "_uncertainty.mha"))
            return written, time.perf_counter() - began

        # The QA gate needs the sCT in memory, not its files: it runs while they are written and fsynced.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"write-job-{job_id}") as writer:
            writing = writer.submit(write)
            try:
                gate = run_gate(
                    gate_job,
                    mr=mr_volume,
                    mr_headers=headers,
                    result=result,
                    sct_series=sct_series,
                    qa=ctx.config.qa,
                    folder=ctx.job_qa_folder(job_id),
                )
            finally:
                uncertainty, write_s = writing.result()  # the writer's own failure, if any, wins
        timings["writing"] = built_s + write_s
        timings.update(gate.timings_s)
    except Exception as exc:  # noqa: BLE001 - the one place a stage's failure becomes a FAILED job
        _fail(ctx, job_id, exc, timings)
        return None

    with ctx.db.session() as session:
        job = session.get(JobRow, job_id)
        assert job is not None
        info = result.info
        job.model_name, job.model_version = info.model_name, info.model_version
        job.checkpoint_sha256, job.device = info.checkpoint_sha256, info.device
        job.sct_instance_count = len(sct_series)
        job.output_dir = str(outbox)
        job.timings_s = {**job.timings_s, **{k: round(v, 3) for k, v in timings.items()}}
        job.timings_s.update({f"sampler.{k}": round(v, 3) for k, v in result.timings_s.items()})
        if uncertainty is not None:
            job.uncertainty_path, job.uncertainty_mean_hu, job.uncertainty_p95_hu = uncertainty
        written = f"sCT written: {len(sct_series)} axial slices by {info.model_name} ({info.method}, {info.device})"
        record_gate(session, job, gate, ctx.job_qa_folder(job_id), written)
    log.info(
        "job %d: %d sCT slices written in %.1f s (sampling %.1f s); QA %s: %s",
        job_id,
        len(sct_series),
        sum(v for k, v in timings.items() if "." not in k),
        timings["sampling"],
        gate.outcome.verdict,
        gate.decision,
    )
    if not ctx.config.web.enabled:
        return None
    from dicom_node.web.volumes import write_viewer_volumes

    return functools.partial(write_viewer_volumes, ctx.job_qa_folder(job_id), mr_volume, result.hu, result.std_hu)


def record_gate(session: Session, job: JobRow, gate: GateResult, folder: Path, written: str) -> None:
    """Store the QA gate's results (replacing those of an earlier run of the job) and move the job on:
    SENDING, HELD or REJECTED, as the route's policy decided. One transaction with the state change."""
    now = utcnow()
    session.execute(delete(QAResultRow).where(QAResultRow.job_id == job.id))
    for m in gate.outcome.measurements:
        session.add(
            QAResultRow(
                job_id=job.id,
                check=m.check,
                quantity=m.quantity,
                value=m.value,
                unit=m.unit,
                warn_at=m.warn_at,
                fail_at=m.fail_at,
                worse=m.worse,
                verdict=m.verdict,
                note=m.note,
                measured_at=now,
            )
        )
    job.qa_verdict, job.qa_decision, job.qa_dir = gate.outcome.verdict, gate.decision, str(folder)
    job.qa_deliverables = list(gate.deliverables)
    job.review_decision, job.reviewed_by, job.review_reason, job.reviewed_at = "", "", "", None
    add_event(
        session,
        "qa",
        f"QA {gate.outcome.verdict_line()}; policy {job.qa_policy}: {DECISION_TEXT[gate.decision]}",
        job_id=job.id,
        detail={
            "verdict": gate.outcome.verdict,
            "checks": {check.name: check.verdict for check in gate.outcome.checks},
            "reasons": gate.outcome.reasons(),
            "policy": job.qa_policy,
            "decision": gate.decision,
        },
    )
    if gate.decision == SEND:
        jobs.transition(session, job, JobState.SENDING, written, timings_s=job.timings_s)
    elif gate.decision == HOLD:
        reasons = "; ".join(gate.outcome.reasons())
        jobs.transition(session, job, JobState.HELD, f"{written}; held for review: {reasons}", timings_s=job.timings_s)
    else:
        job.error = "rejected by the QA block policy: " + "; ".join(gate.outcome.reasons())
        jobs.transition(session, job, JobState.REJECTED, f"{written}; {job.error}", timings_s=job.timings_s)


def _write_uncertainty(result: SCTResult, path: Path) -> tuple[str, float, float] | None:
    """Store the per-voxel standard deviation next to the job; summarise it inside the body."""
    if result.std_hu is None:
        return None
    sitk.WriteImage(result.std_hu.to_image(), str(path), useCompression=True)
    std = result.std_hu.array
    inside = std[result.body_mask.array > 0] if result.body_mask is not None else std.ravel()
    if inside.size == 0:
        inside = std.ravel()
    return str(path), float(np.mean(inside)), float(np.percentile(inside, 95))


def _fail(ctx: PipelineContext, job_id: int, exc: BaseException, timings: dict[str, float]) -> None:
    if isinstance(exc, SctNodeError):
        message = f"{type(exc).__name__}: {exc}"
        log.error("job %d failed: %s", job_id, message)
    else:
        message = f"internal error {type(exc).__name__}: {exc}"
        log.exception("job %d failed with an unexpected error", job_id)
    with ctx.db.session() as session:
        job = session.get(JobRow, job_id)
        if job is None:
            return
        job.error = message
        job.timings_s = {**job.timings_s, **{k: round(v, 3) for k, v in timings.items()}}
        jobs.transition(session, job, JobState.FAILED, message)


def send_job(ctx: PipelineContext, job_id: int) -> None:
    """One send attempt to each destination that has not yet received the whole series."""
    with ctx.db.session() as session:
        job = session.get(JobRow, job_id)
        if job is None or job.state != JobState.SENDING:
            return
        if not jobs.cleared_for_sending(job):  # never reached through the state machine; a last guard
            job.error = "its sCT was not cleared by the QA gate (no QA result, or held and not released)"
            jobs.transition(session, job, JobState.FAILED, f"not sent: {job.error}; resend computes it again with QA")
            return
        qa_objects = jobs.qa_objects(job)
        delivered = set(
            session.scalars(select(SendRow.destination).where(SendRow.job_id == job_id, SendRow.ok.is_(True)))
        )
        pending = [name for name in job.destinations if name not in delivered]
        outbox, attempt = Path(job.output_dir), job.send_attempts + 1
        # Audited attempts are numbered across manual resends (a resend restarts the retry count,
        # not the history): attempt 4 after three failed ones, not a second "attempt 1".
        numbered = (session.scalar(select(func.max(SendRow.attempt)).where(SendRow.job_id == job_id)) or 0) + 1
        expected = job.sct_instance_count
    files = sorted(outbox.glob("*.dcm"))
    attempts: list[SendAttempt] = []
    for name in pending:
        started_at, started = utcnow(), time.perf_counter()
        result = _send_to(ctx, name, files, expected, outbox, qa_objects)
        attempts.append(SendAttempt(result, started_at, time.perf_counter() - started))
    _record_send(ctx, job_id, attempt, numbered, attempts)


@dataclasses.dataclass(frozen=True)
class SendAttempt:
    result: scu.SendResult
    started_at: dt.datetime
    seconds: float


def _send_to(
    ctx: PipelineContext, name: str, files: list[Path], expected: int, outbox: Path, qa_objects: list[Path]
) -> scu.SendResult:
    """The sCT's files and the QA objects that go with it, over one association (or the destination's
    parallel ones), every instance's status checked."""
    if len(files) != expected or expected == 0:
        return scu.SendResult(name, False, 0, expected, f"outbox {outbox} holds {len(files)} of {expected} files", ())
    missing = [path for path in qa_objects if not path.is_file()]
    if missing:
        return scu.SendResult(name, False, 0, expected, f"QA object {missing[0]} is missing", ())
    files = files + qa_objects
    try:
        destination = ctx.config.destination(name)
    except KeyError:
        return scu.SendResult(name, False, 0, expected, f"destination {name!r} is no longer configured", ())
    return scu.send_series(
        files,
        destination,
        calling_aet=ctx.config.node.ae_title,
        timeout_s=ctx.config.sender.timeout_s,
        tls=ctx.config.tls,
    )


def _record_send(ctx: PipelineContext, job_id: int, attempt: int, numbered: int, attempts: list[SendAttempt]) -> None:
    """Audit one attempt: ``attempt`` counts towards sender.max_attempts (from 1 again after a manual
    resend), ``numbered`` is its number in the job's history."""
    with ctx.db.session() as session:
        job = session.get(JobRow, job_id)
        assert job is not None
        job.send_attempts = attempt
        for item in attempts:
            result = item.result
            send = SendRow(
                job_id=job_id,
                destination=result.destination,
                attempt=numbered,
                started_at=item.started_at,
                finished_at=utcnow(),
                ok=result.ok,
                instances_sent=result.sent,
                instances_failed=result.failed,
                message=result.message,
            )
            session.add(send)
            session.flush()
            if result.statuses:  # each instance's answer, in one multi-row insert
                session.execute(
                    insert(SendInstanceRow),
                    [{"send_id": send.id, "sop_instance_uid": s.sop_instance_uid, "status": s.status}
                     for s in result.statuses],
                )  # fmt: skip
            add_event(
                session,
                "send",
                result.message,
                job_id=job_id,
                detail={
                    "destination": result.destination,
                    "attempt": numbered,
                    "ok": result.ok,
                    "seconds": round(item.seconds, 3),
                },
            )
        sending_s = job.timings_s.get("sending", 0.0) + sum(item.seconds for item in attempts)
        job.timings_s = {**job.timings_s, "sending": round(sending_s, 3)}
        failed = [item.result for item in attempts if not item.result.ok]
        if not failed:
            jobs.transition(session, job, JobState.DONE, f"delivered to {', '.join(job.destinations)}")
            log.info("job %d delivered", job_id)
        elif attempt >= ctx.config.sender.max_attempts:
            job.error = "; ".join(r.message for r in failed)
            jobs.transition(session, job, JobState.FAILED, f"sending failed after {attempt} attempt(s): {job.error}")
            log.error("job %d: sending failed after %d attempts", job_id, attempt)
        else:
            delay = ctx.config.sender.retry_delay_s(attempt)
            job.next_send_at = utcnow() + dt.timedelta(seconds=delay)
            add_event(
                session,
                "send_retry",
                f"attempt {attempt} failed; next attempt in {delay:.0f} s",
                job_id=job_id,
                detail={"delay_s": delay},
            )
            log.warning("job %d: send attempt %d failed, retry in %.0f s", job_id, attempt, delay)
