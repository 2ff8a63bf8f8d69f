"""The periodic work of the node, on APScheduler 3.x executors.

- ``sweep`` (default executor): closes quiet series, creates jobs, wakes the runner;
- ``runner`` (the ``sampler`` executor, one thread per worker: one job at a time per GPU or CPU
  worker): runs QUEUED jobs, wakes the sender after each;
- ``sender``: hands each SENDING job whose attempt is due (retries with backoff are due times in
  the database, so they survive restarts) to a pool of send threads, one job per thread at a time
  (``SendDispatcher``): a slow or unreachable destination holds its own job's thread, not the
  delivery of the other jobs;
- ``retention`` (hourly, or at a tenth of the retention time when that is shorter): deletes spool
  and outbox of delivered series past their retention time;
- ``certificate`` (at start, then daily, when TLS is in use): warns in the log and the audit trail
  from 30 days before the node's certificate expires (an expired one fails every handshake).
Reception never waits for any of these: the SCP runs in pynetdicom's own threads.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import threading
from collections.abc import Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node import jobs, pipeline, retention, series, tls
from dicom_node.audit import AuditDB, add_event, utcnow
from dicom_node.config import Config
from dicom_node.pipeline import PipelineContext

log = logging.getLogger(__name__)

RUNNER_INTERVAL_S = 1.0
SENDER_INTERVAL_S = 1.0
RETENTION_INTERVAL_S = 3600.0
CERTIFICATE_INTERVAL_S = 86400.0
SEND_THREADS = 4  # jobs sent at the same time (each to its destinations in turn)


def retention_interval_s(retention_days: float) -> float:
    """How often retention runs: hourly, but at least ten times per retention time (files are then
    deleted at most 10 % after their time), and never more than once a second."""
    if retention_days <= 0:
        return RETENTION_INTERVAL_S
    return max(1.0, min(RETENTION_INTERVAL_S, retention_days * 86400.0 / 10.0))


class NodeScheduler:
    def __init__(self, ctx: PipelineContext) -> None:
        self.ctx = ctx
        workers = ctx.config.jobs.workers
        self.scheduler = BackgroundScheduler(
            executors={
                "default": ThreadPoolExecutor(2),
                "sampler": ThreadPoolExecutor(workers),
            },
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
            timezone=dt.UTC,
        )
        # Made right after the listener started (Node.start): the quiet period of a series left
        # RECEIVING by a crash or a stop counts from here, not from its last instance.
        self.listening_since = utcnow()
        self.sends = SendDispatcher(ctx, SEND_THREADS)
        self._busy: dict[str, int] = {}
        self._busy_lock = threading.Lock()
        # APScheduler's shutdown holds its job store lock while it waits for running tasks, and
        # wake() needs that lock: a task waking another one during shutdown waited forever.
        self._wake_lock = threading.Lock()
        self._stopping = False
        self._limits = {"sweep": 1, "runner": workers, "sender": 1, "retention": 1, "certificate": 1}
        interval_s = {
            "sweep": ctx.config.series.sweep_interval_s,
            "runner": RUNNER_INTERVAL_S,
            "sender": SENDER_INTERVAL_S,
            "retention": retention_interval_s(ctx.config.jobs.retention_days),
            "certificate": CERTIFICATE_INTERVAL_S,
        }
        tasks: dict[str, Callable[[], object]] = {
            "sweep": self._sweep,
            "runner": self._run,
            "sender": self.sends.dispatch_due,
            "retention": lambda: retention.clean(ctx.config, ctx.db),
            "certificate": lambda: check_certificate(ctx.config, ctx.db, dt.datetime.now(dt.UTC)),
        }
        executor = {"runner": "sampler"}
        for name, task in tasks.items():
            self.scheduler.add_job(
                self._guarded(name, task),
                "interval",
                seconds=interval_s[name],
                id=name,
                executor=executor.get(name, "default"),
                max_instances=self._limits[name],
                next_run_time=dt.datetime.now(dt.UTC),
            )

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self, wait: bool = True) -> None:
        with self._wake_lock:  # after this, wake() does nothing (a wake in progress has finished)
            self._stopping = True
        self.scheduler.shutdown(wait=wait)
        self.sends.shutdown(wait=wait)

    def wake(self, name: str) -> None:
        """Run a task now instead of at its next tick (unless all its instances are busy: a busy
        runner or sender loops over the database and finds the new work itself)."""
        with self._busy_lock:
            if self._busy.get(name, 0) >= self._limits[name]:
                return
        with self._wake_lock:
            if self._stopping:
                return
            try:
                self.scheduler.modify_job(name, next_run_time=dt.datetime.now(dt.UTC))
            except Exception:  # not started, or already shut down
                log.debug("could not wake %s", name, exc_info=True)

    def _guarded(self, name: str, task: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with self._busy_lock:
                self._busy[name] = self._busy.get(name, 0) + 1
            try:
                task()
            except Exception:  # a task must never kill its schedule; the next tick tries again
                log.exception("scheduled task %s failed", name)
            finally:
                with self._busy_lock:
                    self._busy[name] -= 1

        return run

    def _sweep(self) -> None:
        if series.sweep(self.ctx.config, self.ctx.db, self.ctx.checked_series, self.listening_since):
            self.wake("runner")

    def _run(self) -> None:
        pipeline.run_queued_jobs(self.ctx, after_each=lambda: self.wake("sender"))


class SendDispatcher:
    """Sends the due SENDING jobs on ``threads`` threads, never one job on two threads at once.

    ``dispatch_due`` (the sender tick, and ``wake("sender")``) only hands jobs over and returns:
    a job whose destination answers slowly, or not at all until its timeout, keeps one thread
    busy while the others deliver the other jobs. A job is sent again only after its attempt has
    been recorded (its next attempt is then a due time in the database, as before).
    """

    def __init__(self, ctx: PipelineContext, threads: int) -> None:
        self.ctx = ctx
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="send")
        self._in_flight: set[int] = set()
        self._lock = threading.Lock()

    def dispatch_due(self) -> int:
        """Hand every due job that is not being sent to the pool; returns how many were handed over."""
        with self.ctx.db.reading() as session:
            due = jobs.jobs_due_for_sending(session)
        handed = 0
        for job_id in due:
            with self._lock:
                if job_id in self._in_flight:
                    continue
                self._in_flight.add(job_id)
            try:
                self._pool.submit(self._send, job_id)
            except RuntimeError:  # the pool is shutting down: the job stays due for the next start
                with self._lock:
                    self._in_flight.discard(job_id)
                break
            handed += 1
        return handed

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def _send(self, job_id: int) -> None:
        try:
            pipeline.send_job(self.ctx, job_id)
        except Exception:  # recorded nothing: the job is still due and the next tick tries again
            log.exception("sending job %d failed", job_id)
        finally:
            with self._lock:
                self._in_flight.discard(job_id)


def check_certificate(config: Config, db: AuditDB, now: dt.datetime) -> str | None:
    """Warn (log WARNING, audit ``tls_certificate_expiring``; ERROR and ``tls_certificate_expired``
    once it is unusable) when the node's certificate is in use and expires within
    ``tls.EXPIRY_WARNING_DAYS``; returns the message, or None when all is well."""
    if not (config.tls_in_use and config.tls.certificate is not None):
        return None
    dates = tls.certificate_dates(config.tls.certificate)
    problem = dates.problem(now)
    days_left = dates.days_left(now)
    if problem is None and days_left > tls.EXPIRY_WARNING_DAYS:
        return None
    if problem is None:
        kind, message = (
            "tls_certificate_expiring",
            f"the node's TLS certificate {config.tls.certificate} expires in {days_left:.0f} days "
            f"({dates.not_after:%Y-%m-%d %H:%M} UTC): renew it (then restart the node)",
        )
        log.warning("%s", message)
    else:
        kind, message = (
            "tls_certificate_expired",
            f"the node's TLS certificate {config.tls.certificate} is {problem}: "
            "every DICOM TLS connection fails until it is renewed",
        )
        log.error("%s", message)
    with db.session() as session:
        add_event(session, kind, message, detail={"not_after": dates.not_after.isoformat(), "days_left": days_left})
    return message
