"""The periodic work of the node, on APScheduler 3.x executors.

- ``sweep`` (default executor): closes quiet series, creates jobs, wakes the runner;
- ``runner`` (the ``sampler`` executor, one thread per worker: one job at a time per GPU or CPU
  worker): runs QUEUED jobs, wakes the sender after each;
- ``sender`` (the ``sender`` executor): sends SENDING jobs whose attempt is due (retries with
  backoff are due times in the database, so they survive restarts);
- ``retention`` (hourly, or at a tenth of the retention time when that is shorter): deletes spool
  and outbox of delivered series past their retention time.
Reception never waits for any of these: the SCP runs in pynetdicom's own threads.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node import pipeline, retention, series
from dicom_node.audit import utcnow
from dicom_node.pipeline import PipelineContext

log = logging.getLogger(__name__)

RUNNER_INTERVAL_S = 1.0
SENDER_INTERVAL_S = 1.0
RETENTION_INTERVAL_S = 3600.0


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
        self._limits = {"sweep": 1, "runner": workers, "sender": 1, "retention": 1}
        interval_s = {
            "sweep": ctx.config.series.sweep_interval_s,
            "runner": RUNNER_INTERVAL_S,
            "sender": SENDER_INTERVAL_S,
            "retention": retention_interval_s(ctx.config.jobs.retention_days),
        }
        tasks: dict[str, Callable[[], object]] = {
            "sweep": self._sweep,
            "runner": self._run,
            "sender": lambda: pipeline.send_due_jobs(ctx),
            "retention": lambda: retention.clean(ctx.config, ctx.db),
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
