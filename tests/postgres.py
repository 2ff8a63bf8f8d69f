"""A throw-away PostgreSQL cluster for tests and benchmarks (Debian's postgresql 15: initdb and pg_ctl
as the postgres user, a Unix socket in the test's folder, no TCP)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from dicom_node.peers import free_port

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), Path("/usr/lib/postgresql/15/bin"))


def available() -> bool:
    return (PG_BIN / "initdb").exists() and shutil.which("runuser") is not None


@contextlib.contextmanager
def postgres(folder: Path) -> Iterator[str]:
    """A throw-away PostgreSQL 15 cluster on a free port; yields its SQLAlchemy URL."""
    data = folder / "pgdata"
    folder.mkdir(parents=True, exist_ok=True)
    for parent in (folder, *folder.parents):  # the postgres user must reach the socket folder
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o711)
    shutil.chown(folder, "postgres")
    port = free_port()

    def as_postgres(*command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=120)

    as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", f"-p {port} -k {folder} -c listen_addresses=''",
                "-l", str(folder / "log"), "-w", "start")  # fmt: skip
    try:
        as_postgres(str(PG_BIN / "createdb"), "-h", str(folder), "-p", str(port), "bench")
        yield f"postgresql+psycopg://postgres@/bench?host={folder}&port={port}"
    finally:
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
