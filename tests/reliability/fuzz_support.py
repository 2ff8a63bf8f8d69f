"""What the two fuzzers share: a node under test, good senders running beside the fuzzing, the final accounting.

The node is `sct-node serve` as a subprocess (tests/integration/harness.NodeProcess) with the
bulk-density model (no sampler: a job is done in well under a second) and a short quiet period,
sending its sCT series to a pynetdicom storage SCP (dicom_node.peers.FileStoreSCP) that keeps
every file it receives.
"""

from __future__ import annotations

import collections
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st
from sqlalchemy import select

from dicom_node.audit import JobRow, JobState, SeriesRow, SeriesState
from dicom_node.peers import FileStoreSCP
from dicom_node.synthetic_mr import generate_mr_series
from tests.integration.harness import NodeProcess, node_config, require_binary, wait_for
from tests.reliability.conftest import LONG, scale

QUIET_PERIOD_S = 1.5
GOOD_SLICES = 6
GOOD_SIZE = 24


@dataclass
class NodeUnderTest:
    node: NodeProcess
    pacs: FileStoreSCP
    root: Path  # storage.root of the node

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    def pid(self) -> int:
        assert self.node.process is not None
        return self.node.process.pid


@contextmanager
def node_under_test(workdir: Path, **sections: dict[str, Any]) -> Iterator[NodeUnderTest]:
    """A started node and its destination; both stopped on exit. ``sections``: config changes."""
    pacs = FileStoreSCP(workdir / "pacs").start()
    config = node_config(
        workdir,
        pacs_port=pacs.port,
        model={"method": "bulk_density", "device": "cpu"},
        series={"quiet_period_s": QUIET_PERIOD_S, "sweep_interval_s": 0.3},
        **sections,
    )
    node = NodeProcess(config)
    try:
        node.start()
        yield NodeUnderTest(node=node, pacs=pacs, root=workdir / "node")
    finally:
        node.stop()
        pacs.stop()


def leftover_temp_files(root: Path, grace_s: float = 2.0) -> list[str]:
    """Temporary files in the storage that are still there ``grace_s`` later: a C-STORE answered
    must never leave one (the good senders running beside may have one in flight for a moment)."""

    def temp_files() -> set[str]:
        incoming = root / "incoming"
        names = {str(p) for p in incoming.iterdir()} if incoming.is_dir() else set()
        # os.walk, not rglob: series folders move to quarantine/ while this looks
        for folder, _, files in os.walk(root / "spool", onerror=lambda error: None):
            names |= {os.path.join(folder, name) for name in files if name.endswith(".part")}
        return names

    found = temp_files()
    if found:
        time.sleep(grace_s)
        found &= temp_files()
    return sorted(found)


# Good senders beside the fuzzing -----------------------------------------------------------------


@dataclass
class GoodTraffic:
    """DCMTK echoscu and storescu of a small phantom series, over and over, on their own associations.

    Runs in a thread while the fuzzer runs; records every attempt. A good sender that fails or
    has to wait much longer than usual means the bad input got in the way.
    """

    port: int
    workdir: Path
    interval_s: float = 1.0
    echoes: list[tuple[bool, float]] = field(default_factory=list)
    stores: list[tuple[bool, float, str]] = field(default_factory=list)
    series: dict[str, int] = field(default_factory=dict)  # SeriesInstanceUID -> instances sent
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> GoodTraffic:
        self._thread = threading.Thread(target=self._run, name="good-traffic", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            try:
                self.echo()
                self.send_series(index)
            except Exception as exc:  # recorded, and the test fails on it
                self.errors.append(f"{type(exc).__name__}: {exc}")
            index += 1
            self._stop.wait(self.interval_s)

    def echo(self) -> bool:
        started = time.monotonic()
        result = subprocess.run(
            [require_binary("echoscu", "dcmtk"), "-aet", "GOODSCANNER", "-aec", "SCTNODE", "127.0.0.1", str(self.port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.echoes.append((result.returncode == 0, time.monotonic() - started))
        if result.returncode != 0:
            self.errors.append(f"echoscu failed: {result.stdout[-300:]} {result.stderr[-300:]}")
        return result.returncode == 0

    def send_series(self, index: int) -> str:
        """One new phantom series (a new patient) sent whole with storescu; its SeriesInstanceUID."""
        folder = self.workdir / f"good-{index:04d}"
        paths = generate_mr_series(
            folder,
            slices=GOOD_SLICES,
            rows=GOOD_SIZE,
            columns=GOOD_SIZE,
            seed=index,
            patient_id=f"GOOD{index:04d}",
        )
        series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        started = time.monotonic()
        result = subprocess.run(
            [
                require_binary("storescu", "dcmtk"),
                "-aet",
                "GOODSCANNER",
                "-aec",
                "SCTNODE",
                "127.0.0.1",
                str(self.port),
                *map(str, paths),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        ok = result.returncode == 0
        self.stores.append((ok, time.monotonic() - started, series_uid))
        if ok:
            self.series[series_uid] = len(paths)
        else:
            self.errors.append(f"storescu failed: {result.stdout[-300:]} {result.stderr[-300:]}")
        return series_uid

    def summary(self) -> dict[str, object]:
        def slowest(rows: list[tuple]) -> float:
            return round(max((r[1] for r in rows), default=0.0), 2)

        return {
            "good_echoes": len(self.echoes),
            "good_echoes_failed": sum(1 for ok, _ in self.echoes if not ok),
            "good_series_sent": len(self.stores),
            "good_series_failed": sum(1 for ok, *_ in self.stores if not ok),
            "slowest_good_echo_s": slowest(self.echoes),
            "slowest_good_series_s": slowest(self.stores),
        }


# The end: everything accounted for ------------------------------------------------------------------


def wait_until_settled(node: NodeProcess, timeout_s: float, expect_series: Iterable[str] = ()) -> None:
    """Every series in ``expect_series`` has its row (audit rows are written in batches, a moment
    after the C-STORE response), every series is closed (no longer RECEIVING) and every job is DONE
    or FAILED."""
    db = node.db()
    expected = set(expect_series)

    def settled() -> bool:
        assert node.alive()
        with db.session() as session:
            known = set(session.scalars(select(SeriesRow.series_instance_uid)).all())
            receiving = session.scalars(select(SeriesRow.id).where(SeriesRow.state == SeriesState.RECEIVING)).all()
            busy = session.scalars(select(JobRow.id).where(JobRow.state.not_in([JobState.DONE, JobState.FAILED]))).all()
        return expected <= known and not receiving and not busy

    try:
        wait_for(settled, timeout_s, "every series closed and every job finished", interval_s=0.5)
    except AssertionError as exc:
        with db.session() as session:
            open_series = session.execute(
                select(SeriesRow.series_instance_uid, SeriesRow.instance_count).where(
                    SeriesRow.state == SeriesState.RECEIVING
                )
            ).all()
            open_jobs = session.execute(
                select(JobRow.id, JobRow.state).where(JobRow.state.not_in([JobState.DONE, JobState.FAILED]))
            ).all()
        errors = [line for line in node.log_text().splitlines() if " ERROR " in line or "Error" in line]
        raise AssertionError(
            f"{exc}: still receiving {open_series[:10]}, jobs not finished {open_jobs[:10]}; "
            f"last errors in the node's log:\n" + "\n".join(errors[-15:])
        ) from None
    finally:
        db.dispose()


def series_outcomes(node: NodeProcess) -> dict[str, tuple[str, str, str | None, str]]:
    """SeriesInstanceUID -> (state, reason, job state or None, job error)."""
    db = node.db()
    try:
        with db.session() as session:
            rows = session.execute(
                select(SeriesRow.series_instance_uid, SeriesRow.state, SeriesRow.reason, JobRow.state, JobRow.error)
                .outerjoin(JobRow, JobRow.series_id == SeriesRow.id)
                .order_by(SeriesRow.id, JobRow.id)
            ).all()
    finally:
        db.dispose()
    return {uid: (state, reason or "", job_state, job_error or "") for uid, state, reason, job_state, job_error in rows}


def check_good_series_done(node: NodeUnderTest, good: GoodTraffic) -> int:
    """Every series a good sender had acknowledged became an sCT that reached the destination.

    Returns the number of sCT instances found at the destination for them.
    """
    outcomes = series_outcomes(node.node)
    problems = []
    for series_uid in good.series:
        state, reason, job_state, job_error = outcomes.get(series_uid, ("absent", "", None, ""))
        if state != SeriesState.ROUTED or job_state != JobState.DONE:
            problems.append(f"{series_uid}: {state} ({reason}), job {job_state} {job_error}")
    assert not problems, "good series that did not go through:\n" + "\n".join(problems)
    db = node.node.db()
    try:
        with db.session() as session:
            expected = dict(
                session.execute(
                    select(JobRow.sct_series_uid, JobRow.sct_instance_count)
                    .join(SeriesRow, SeriesRow.id == JobRow.series_id)
                    .where(SeriesRow.series_instance_uid.in_(list(good.series)))
                ).all()
            )
    finally:
        db.dispose()
    delivered = collections.Counter(
        str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
        for path in node.pacs.folder.glob("*.dcm")
    )
    missing = {uid: (n, delivered.get(uid, 0)) for uid, n in expected.items() if delivered.get(uid, 0) != n or n == 0}
    assert not missing, f"sCT series not (completely) at the destination, expected vs found: {missing}"
    return sum(expected.values())


# Recipes: what hypothesis draws in both fuzzers ------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """How to break one input; hypothesis draws these."""

    kind: str
    params: tuple[tuple[str, Any], ...]

    def get(self, name: str) -> Any:
        return dict(self.params)[name]

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r:.80}" for k, v in self.params)
        return f"Recipe({self.kind}: {shown})"


def recipe(kind: str, **params: Any) -> st.SearchStrategy[Recipe]:
    return st.fixed_dictionaries(params).map(lambda p: Recipe(kind, tuple(p.items())))


# Under `make reliability` (long) a random seed unless SCT_FUZZ_SEED is set; printed either way.
FUZZ_SEED = int(os.environ.get("SCT_FUZZ_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)


def fuzz_inputs(short: int, long: int) -> int:
    """How many inputs a fuzzer draws: SCT_FUZZ_INPUTS when set, else ``short`` (CI) or ``long``."""
    return int(os.environ.get("SCT_FUZZ_INPUTS", "0")) or scale(short, long)


def run_fuzzer(
    one_input: Callable[[Recipe], None],
    recipes: st.SearchStrategy[Recipe],
    explicit: Iterable[Recipe],
    inputs: int,
) -> None:
    """``one_input`` on every ``explicit`` recipe, then on ``inputs`` recipes drawn by hypothesis:
    derandomized in CI (the same inputs every run), seeded with FUZZ_SEED in long mode. A failing
    input is shrunk and printed as its recipe."""

    @settings(
        max_examples=inputs,
        deadline=None,
        derandomize=not LONG,
        database=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(recipe=recipes)
    def fuzz(recipe: Recipe) -> None:
        one_input(recipe)

    for recipe_ in explicit:
        fuzz = example(recipe=recipe_)(fuzz)
    print(f"\nfuzz seed {'derandomized' if not LONG else FUZZ_SEED}, {inputs} inputs drawn", flush=True)
    if LONG:
        seed(FUZZ_SEED)(fuzz)()
    else:
        fuzz()
