"""The node: audit database, reception, scheduler, put together and started in the right order."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from dicom_node import jobs, series, spool
from dicom_node.audit import AuditDB, InstanceRecorder, add_event
from dicom_node.config import Config
from dicom_node.errors import StorageInUseError
from dicom_node.pipeline import PipelineContext, PredictorPool, default_predictor_factory
from dicom_node.scheduler import NodeScheduler
from dicom_node.scp import StorageSCP
from sct_model.result import SCTPredictor

if TYPE_CHECKING:
    from dicom_node.web.server import WebThread

log = logging.getLogger(__name__)


class Node:
    """One sct-node: ``start()`` recovers from any earlier crash, then listens and schedules."""

    def __init__(self, config: Config, predictor_factory: Callable[[], SCTPredictor] | None = None) -> None:
        self.config = config
        self._predictor_factory = predictor_factory or default_predictor_factory(config)
        self.db: AuditDB | None = None
        self.recorder: InstanceRecorder | None = None
        self.scp: StorageSCP | None = None
        self.scheduler: NodeScheduler | None = None
        self.web: WebThread | None = None
        self._lock_file: IO[str] | None = None

    @property
    def port(self) -> int:
        assert self.scp is not None, "node not started"
        return self.scp.port

    def start(self) -> None:
        os.umask(0o077)  # spool, outbox and database readable by the service user only
        storage = self.config.storage
        for folder in (storage.root, storage.spool, storage.incoming, storage.outbox, storage.quarantine):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_storage_root()
        self.db = AuditDB(self.config.audit.url)
        recovered = spool.reconcile_spool(self.db, storage)
        for partial in storage.outbox.glob(".*.tmp-*"):  # an sCT write cut short by a crash: redone
            shutil.rmtree(partial, ignore_errors=True)
        moved = series.finish_quarantine_moves(self.config, self.db)
        with self.db.session() as session:
            counts = jobs.recover_after_restart(session)
            add_event(
                session,
                "node_started",
                f"{self.config.node.ae_title} on {self.config.node.bind}:{self.config.node.port}",
                detail={
                    "recovered_instances": recovered,
                    "quarantine_moves": moved,
                    **counts,
                    "config": str(self.config.source),
                },
            )
        if recovered or moved or any(counts.values()):
            log.info(
                "recovery: %d instance rows rebuilt, %d quarantine moves finished, %d jobs requeued, "
                "%d jobs resume sending",
                recovered,
                moved,
                counts["requeued"],
                counts["resumed_sending"],
            )
        self.recorder = InstanceRecorder(self.db)
        self.scp = StorageSCP(self.config, self.db, self.recorder)
        self.scp.start()
        ctx = PipelineContext(self.config, self.db, PredictorPool(self._predictor_factory))
        self.scheduler = NodeScheduler(ctx)
        self.scheduler.start()
        if self.config.web.enabled:
            from dicom_node.web.server import WebThread  # the web stack is loaded only when served

            self.web = WebThread(self.config, self.db)
            self.web.start()
        log.info("sct-node %s listening on %s:%d", self.config.node.ae_title, self.config.node.bind, self.port)

    def _lock_storage_root(self) -> None:
        """One node per storage root: a second one would delete the first one's files in transit."""
        path = self.config.storage.root / ".sct-node.lock"
        self._lock_file = open(path, "a+")  # noqa: SIM115 - held for the node's lifetime
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock_file.close()
            raise StorageInUseError(f"another sct-node is running on {self.config.storage.root}") from exc

    def stop(self) -> None:
        """Stop listening, let running tasks finish, write the last audit rows."""
        if self.web is not None:
            self.web.stop()
        if self.scp is not None:
            self.scp.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        if self.recorder is not None:
            self.recorder.close()
        if self.db is not None:
            with self.db.session() as session:
                add_event(session, "node_stopped", "clean shutdown")
            self.db.dispose()
        if self._lock_file is not None:
            self._lock_file.close()
        log.info("sct-node stopped")
