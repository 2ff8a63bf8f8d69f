"""The periodic work of the node, on APScheduler 3.x executors.

- ``sweep`` (default executor): closes quiet series, creates jobs, wakes the runner;
- ``runner`` (the ``sampler`` executor, one thread per worker: one job at a time per GPU or CPU
  worker): runs QUEUED jobs, wakes the sender after each;
- ``sender`` (the ``sender`` executor): sends SENDING jobs whose attempt is due (retries with
  backoff are due times in the database, so they survive restarts);
- ``retention`` (hourly, or at a tenth of the retention time when that is shorter): deletes spool
  and outbox of delivered series past their retention time;
- ``certificate`` (at start, then daily, when TLS is in use): warns in the log and the audit trail
  from 30 days before the node's certificate expires (an expired one fails every handshake).
Reception never waits for any of these: the SCP runs in pynetdicom's own threads.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node import pipeline, retention, series, tls
from dicom_node.audit import AuditDB, add_event, utcnow
from dicom_node.config import Config
from dicom_node.pipeline import PipelineContext

log = logging.getLogger(__name__)

RUNNER_INTERVAL_S = 1.0
SENDER_INTERVAL_S = 1.0
RETENTION_INTERVAL_S = 3600.0
CERTIFICATE_INTERVAL_S = 86400.0


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
                "sender": ThreadPoolExecutor(1),
            },
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
            timezone=dt.UTC,
        )
        # Made right after the listener started (Node.start): the quiet period of a series left
        # RECEIVING by a crash or a stop counts from here, not from its last instance.
        self.listening_since = utcnow()
        self._busy: dict[str, int] = {}
        self._busy_lock = threading.Lock()
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
            "sender": lambda: pipeline.send_due_jobs(ctx),
            "retention": lambda: retention.clean(ctx.config, ctx.db),
            "certificate": lambda: check_certificate(ctx.config, ctx.db, dt.datetime.now(dt.UTC)),
        }
        executor = {"runner": "sampler", "sender": "sender"}
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
        self.scheduler.shutdown(wait=wait)

    def wake(self, name: str) -> None:
        """Run a task now instead of at its next tick (unless all its instances are busy: a busy
        runner or sender loops over the database and finds the new work itself)."""
        with self._busy_lock:
            if self._busy.get(name, 0) >= self._limits[name]:
                return
        try:
            self.scheduler.modify_job(name, next_run_time=dt.datetime.now(dt.UTC))
        except Exception:  # the scheduler is shutting down
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


def check_certificate(config: Config, db: AuditDB, now: dt.datetime) -> str | None:
    """Warn (log WARNING, audit ``tls_certificate_expiring``; ERROR and ``tls_certificate_expired``
    once it is unusable) when the node's certificate is in use and expires within
    ``tls.EXPIRY_WARNING_DAYS``; returns the message, or None when all is well."""
    in_use = config.node.tls == "required" or any(destination.tls for destination in config.destinations)
    if not (in_use and config.tls.certificate is not None):
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
