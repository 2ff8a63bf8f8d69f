"""Read a running node's audit database from a test without ever taking its write lock.

``AuditDB.session()`` is the node's writer session (on SQLite every transaction takes the write
lock at BEGIN); a test that polls job states every few milliseconds through it would compete with
the node for that lock. This reader uses a plain engine: each SELECT reads a WAL snapshot and
holds no lock, and the ORM models of ``dicom_node.audit`` are used as they are. Never write with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def _busy_timeout(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA query_only=ON")
    cursor.close()


class AuditReader:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _busy_timeout)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session; the objects it loaded stay readable after the block."""
        with self._sessions() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
