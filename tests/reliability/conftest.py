"""Reliability tests (issue 5): crash safety, destination faults, load, bad input, disk, security.

Every test here runs in `make test` in a SHORT version. `make reliability` runs the LONG versions
(``SCT_RELIABILITY=long``) and writes docs/reliability.md from the figures each test records with
the ``report`` fixture (what it did, how many kills / inputs / series / minutes of outage, result).

    scale(short, long)   -> the short value in CI, the long one under `make reliability`
    report(did=..., result=..., **figures)   -> one row of the report for this test
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dicom_node.peers import Orthanc
from tests.integration.harness import require_binary

T = TypeVar("T")

LONG = os.environ.get("SCT_RELIABILITY", "short") == "long"
REPORT_ENV = "SCT_RELIABILITY_REPORT"


def scale(short: T, long: T) -> T:
    """``short`` in `make test`, ``long`` under `make reliability` (SCT_RELIABILITY=long)."""
    return long if LONG else short


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/reliability/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Iterator[Callable[..., None]]:
    """Record one row of docs/reliability.md: ``report(did="...", result="...", kills=20, ...)``.

    Call it once at the end of the test, after the assertions passed, with plain-language text:
    ``did`` says what the test did (with the numbers), ``result`` what it found. Figures are
    JSON-serialisable keyword arguments (counts, seconds, MB). Without SCT_RELIABILITY_REPORT set
    it only checks the arguments, so tests behave the same in CI.
    """
    started = time.monotonic()

    def record(*, did: str, result: str, **figures: Any) -> None:
        if not did or not result:
            raise ValueError("report() needs both `did` and `result`")
        row = {
            "test": request.node.nodeid,
            "mode": "long" if LONG else "short",
            "did": did,
            "result": result,
            "seconds": round(time.monotonic() - started, 1),
            "figures": figures,
        }
        text = json.dumps(row)  # fails here, in CI too, when a figure is not serialisable
        path = os.environ.get(REPORT_ENV)
        if path:
            with open(Path(path), "a", encoding="utf-8") as out:
                out.write(text + "\n")

    yield record


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    require_binary("Orthanc", "orthanc")
    with Orthanc(tmp_path / "orthanc") as pacs:
        yield pacs
