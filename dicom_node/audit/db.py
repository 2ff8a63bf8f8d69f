"""The audit database's engine and sessions: ``AuditDB``.

It creates the tables on first use, migrates an older database (columns added since, the hash
chain: ``chain.ensure_chain``), and gives two kinds of session: ``session()`` (a write transaction;
on SQLite it takes the database's write lock at BEGIN, so that the chain head it reads cannot change
before it commits) and ``reading()`` (one read-only snapshot that holds no lock).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, literal, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.chain import CHAIN_COLUMNS, ensure_chain
from dicom_node.audit.models import Base
from dicom_node.errors import AuditChainError

log = logging.getLogger(__name__)


class AuditDB:
    """The engine and session factory of the audit database; creates the tables on first use.

    A new SQLite file is created mode 0600 whatever the umask (the CLI runs with the user's); SQLite
    gives its -wal and -shm files the database file's mode. A database from before the hash chain
    is migrated once (see ``dicom_node.audit.chain.ensure_chain``).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            database = self.engine.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                _create_private_file(Path(database))
            event.listen(self.engine, "connect", _sqlite_driver_transactions_off)
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        Base.metadata.create_all(self.engine)
        add_missing_columns(self.engine)
        ensure_chain(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # One snapshot per reading session: SQLite's deferred BEGIN gives it (see _sqlite_begin);
        # PostgreSQL's default READ COMMITTED would let a long report see rows committed meanwhile.
        snapshot = {} if self.engine.dialect.name == "sqlite" else {"isolation_level": "REPEATABLE READ"}
        self._readers = sessionmaker(
            self.engine.execution_options(sct_read_only=True, **snapshot),
            expire_on_commit=False,
            info={"read_only": True},
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed when the block ends, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only session for reports: one consistent snapshot that never holds the write lock
        (a plain ``BEGIN`` on SQLite, so WAL readers do not hold up the node; REPEATABLE READ on
        PostgreSQL). Writes are refused."""
        with self._readers() as session:
            event.listen(session, "before_flush", _refuse_flush)
            try:
                yield session
            finally:
                session.rollback()

    def dispose(self) -> None:
        self.engine.dispose()


def add_missing_columns(engine: Engine) -> list[str]:
    """Add the columns a later version of the models has and an existing database lacks (a node
    upgraded in place: the jobs' QA and review columns, for example), each with its default; returns
    them as "table.column". Only additions: a column is never changed or dropped. The hash chain's
    own columns are ``ensure_chain``'s to add (it also chains the existing events)."""
    added: list[str] = []
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":  # two processes upgrading at once: one waits
            connection.execute(text("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE"))
        inspector = inspect(connection)
        for table in Base.metadata.sorted_tables:
            present = {column["name"] for column in inspector.get_columns(table.name)}
            new = [
                c
                for c in table.columns
                if c.name not in present and not (table.name == "events" and c.name in CHAIN_COLUMNS)
            ]
            for column in new:
                sql_type = column.type.compile(dialect=connection.dialect)
                scalar = column.default is not None and column.default.is_scalar
                default = getattr(column.default, "arg", None) if scalar else None
                clause = ""
                if default is not None:
                    value = literal(default, column.type).compile(
                        dialect=connection.dialect, compile_kwargs={"literal_binds": True}
                    )
                    clause = f" DEFAULT {value}" + ("" if column.nullable else " NOT NULL")
                connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {sql_type}{clause}"))
                added.append(f"{table.name}.{column.name}")
            names = {c.name for c in new}
            for index in table.indexes:
                if names & {c.name for c in index.columns}:
                    index.create(connection)
    if added:
        log.warning("audit database upgraded: added %s", ", ".join(added))
    return added


def _create_private_file(path: Path) -> None:
    """Create an empty SQLite file readable by its owner only, unless it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask took away
    finally:
        os.close(fd)


def _refuse_flush(session: Session, _context: Any, _instances: Any) -> None:
    raise AuditChainError("AuditDB.reading() is read-only: write in AuditDB.session()")


def _sqlite_driver_transactions_off(dbapi_connection: Any, _record: Any) -> None:
    """SQLAlchemy's pysqlite recipe, part 1: the driver emits no BEGIN of its own (its legacy mode
    begins only before DML, so a SELECT before the first write would run outside the transaction)."""
    dbapi_connection.isolation_level = None


def _sqlite_begin(connection: Connection) -> None:
    """The recipe, part 2: every transaction takes SQLite's write lock at BEGIN (IMMEDIATE), so that
    what it reads (the chain head above all) cannot change before it commits. Waiting writers queue
    on ``busy_timeout``; a lock taken at BEGIN cannot deadlock (no transaction upgrades from read to
    write). ``AuditDB.reading`` sessions begin DEFERRED: a snapshot that holds no lock."""
    read_only = connection.get_execution_options().get("sct_read_only", False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (the CLI) never block the node
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each WAL checkpoint; safe against kill -9
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
