"""The only place where the stages meet: load → sample → write → send, for one job.

Each stage is a plain function in its own module and raises the project's own exceptions;
``run_job`` and ``send_job`` are the only code that turns an exception into a FAILED job with an
audit row. Files carry the data (spool → outbox), the database carries the state.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from sqlalchemy import func, select

from dicom_node import jobs, scu
from dicom_node.audit import AuditDB, JobRow, JobState, SendRow, add_event, utcnow
from dicom_node.config import Config
from dicom_node.errors import SctNodeError
from dicom_node.mr_series import check_series, load_mr_volume, read_headers
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


def run_queued_jobs(ctx: PipelineContext, after_each: Callable[[], None] | None = None) -> int:
    """Claim and run QUEUED jobs until none is left; returns how many ran (a scheduler task)."""
    count = 0
    while True:
        with ctx.db.session() as session:
            job = jobs.claim_next_queued(session)
            job_id = job.id if job is not None else None
        if job_id is None:
            return count
        run_job(ctx, job_id)
        count += 1
        if after_each is not None:
            after_each()


def run_job(ctx: PipelineContext, job_id: int) -> None:
    """Compute and write the sCT of a RUNNING job; SENDING when its series is in the outbox."""
    with ctx.db.session() as session:
        job = session.get(JobRow, job_id)
        if job is None or job.state != JobState.RUNNING:
            return
        series_id = job.series_id
        paths = series_instance_paths(session, series_id)
        settings = (job.steps, job.samples, job.seed, job.sct_series_uid, job.created_at)
    steps, samples, seed, sct_series_uid, created_at = settings
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
            series_instance_uid=sct_series_uid,
            uid_root=ctx.config.node.uid_root,
            source_references=ctx.config.node.source_references,
            created=created_at.replace(tzinfo=dt.UTC).astimezone(),  # local time; a re-run writes identical files
        )
        outbox = ctx.job_outbox(job_id)
        write_series(sct_series, outbox)
        uncertainty = _write_uncertainty(result, outbox.with_name(outbox.name + "_uncertainty.mha"))
        timings["writing"] = time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001 - the one place a stage's failure becomes a FAILED job
        _fail(ctx, job_id, exc, timings)
        return

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
        jobs.transition(
            session,
            job,
            JobState.SENDING,
            f"sCT written: {len(sct_series)} axial slices by {info.model_name} ({info.method}, {info.device})",
            timings_s=job.timings_s,
        )
    log.info(
        "job %d: %d sCT slices written in %.1f s (sampling %.1f s)",
        job_id,
        len(sct_series),
        sum(timings.values()),
        timings["sampling"],
    )


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
        result = _send_to(ctx, name, files, expected, outbox)
        attempts.append(SendAttempt(result, started_at, time.perf_counter() - started))
    _record_send(ctx, job_id, attempt, numbered, attempts)


@dataclasses.dataclass(frozen=True)
class SendAttempt:
    result: scu.SendResult
    started_at: dt.datetime
    seconds: float


def _send_to(ctx: PipelineContext, name: str, files: list[Path], expected: int, outbox: Path) -> scu.SendResult:
    if len(files) != expected or expected == 0:
        return scu.SendResult(name, False, 0, expected, f"outbox {outbox} holds {len(files)} of {expected} files", ())
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
            session.add(
                SendRow(
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
            )
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
