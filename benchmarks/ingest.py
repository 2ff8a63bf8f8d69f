"""C-STORE ingest throughput: the node's reception against DCMTK storescp, Orthanc and bare pynetdicom.

    .venv/bin/python benchmarks/ingest.py [--runs 5] [--slices 300]

Builds a series of ``--slices`` MR slices (256 x 256) from the GE series in ../shared/data/mr
(new SOP Instance UIDs, one new Series Instance UID, positions one slice spacing apart) and sends
it with ``TCP_NODELAY=1 storescu +sd`` to each receiver, a fresh receiver process and a fresh
folder for every run, the receiver's start-up not timed:

- sct-node: the node's StorageSCP with spool, audit database and InstanceRecorder (the full
  reception), in its own Python process, with ``storage.fsync`` true and false;
- storescp: DCMTK's storescp writing files;
- Orthanc: Orthanc with its SQLite index and file storage;
- bare pynetdicom: a pynetdicom AE (default settings) whose handler only writes the raw bytes.

Prints the median images/s over ``--runs`` and the ratio to storescp, and checks that the node
reaches at least 0.25 of storescp. The node and the bare receiver run as
``python benchmarks/ingest.py --serve {node,bare} ...`` (an entry in this script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
GE_SERIES = REPO.parent / "shared" / "data" / "mr" / "ge_mprage_axial"
REQUIRED_RATIO = 0.25
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}


# The series ------------------------------------------------------------------------------------


def build_series(target: Path, slices: int) -> None:
    """``slices`` files from the GE series, cycling through its slices, as one consistent new series."""
    sources = sorted(
        (pydicom.dcmread(path) for path in GE_SERIES.iterdir()),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    first = sources[0]
    row, column = (
        np.array(first.ImageOrientationPatient[:3], float),
        np.array(first.ImageOrientationPatient[3:], float),
    )
    normal = np.cross(row, column)
    spacing_mm = float(first.get("SpacingBetweenSlices", first.SliceThickness))
    origin = np.array(first.ImagePositionPatient, float)
    series_uid = generate_uid()
    target.mkdir(parents=True)
    for index in range(slices):
        ds = sources[index % len(sources)].copy()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = f"{first.get('SeriesDescription', 'MR')} x{slices}"
        ds.InstanceNumber = index + 1
        position = origin + index * spacing_mm * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.SliceLocation = f"{float(position @ normal):.4f}"
        ds.save_as(target / f"MR{index + 1:04d}.dcm", enforce_file_format=True)


# Receivers -------------------------------------------------------------------------------------


@dataclass
class Receiver:
    name: str
    start: Callable[[Path, int], subprocess.Popen[bytes]]
    called_aet: str
    ready: Callable[[int], bool] | None = None  # extra readiness check besides C-ECHO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_python_receiver(kind: str, fsync: bool = False) -> Callable[[Path, int], subprocess.Popen[bytes]]:
    def start(workdir: Path, port: int) -> subprocess.Popen[bytes]:
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--dir", str(workdir)]
        command += ["--port", str(port), "--fsync", "1" if fsync else "0"]
        return _popen_logged(command, workdir, cwd=REPO)

    return start


def start_storescp(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    out = workdir / "out"
    out.mkdir()
    command = [require("storescp"), "-aet", "STORESCP", "-od", str(out), str(port)]
    return _popen_logged(command, workdir, env=NODELAY_ENV)


def start_orthanc(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    http_port = free_port()
    (workdir / "http-port").write_text(str(http_port))
    config = {
        "Name": "bench",
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": http_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "Plugins": [],
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    command = [require("Orthanc"), str(workdir / "orthanc.json")]
    return _popen_logged(command, workdir, env=NODELAY_ENV)


def _popen_logged(command: list[str], workdir: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a receiver with its output in workdir/receiver.log (a pipe nobody reads could block it)."""
    with open(workdir / "receiver.log", "wb") as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, **kwargs)


def orthanc_ready(workdir: Path) -> Callable[[int], bool]:
    def ready(_port: int) -> bool:
        http_port = int((workdir / "http-port").read_text())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    return ready


def require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        sys.exit(f"{program} not found: apt-get install -y dcmtk orthanc")
    return path


def echo_ok(port: int, called_aet: str) -> bool:
    command = [require("echoscu"), "-to", "2", "-aet", "BENCH", "-aec", called_aet, "127.0.0.1", str(port)]
    return subprocess.run(command, env=NODELAY_ENV, capture_output=True, timeout=10).returncode == 0


@contextlib.contextmanager
def running(receiver: Receiver, workdir: Path) -> Iterator[int]:
    port = free_port()
    process = receiver.start(workdir, port)
    try:
        deadline = time.monotonic() + 60
        while not (echo_ok(port, receiver.called_aet) and (receiver.ready is None or receiver.ready(port))):
            if process.poll() is not None or time.monotonic() > deadline:
                output = (workdir / "receiver.log").read_text(errors="replace")
                raise RuntimeError(f"{receiver.name} did not start: {output[-2000:]}")
            time.sleep(0.1)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def send_series(series_dir: Path, port: int, called_aet: str) -> float:
    """Seconds storescu takes to send the whole series (process start to exit)."""
    command = [
        require("storescu"),
        "-aet",
        "SCANNER",
        "-aec",
        called_aet,
        "127.0.0.1",
        str(port),
        "+sd",
        str(series_dir),
    ]
    started = time.perf_counter()
    result = subprocess.run(command, env=NODELAY_ENV, capture_output=True, text=True, timeout=600)
    elapsed_s = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed_s


def count_received(name: str, workdir: Path) -> int:
    if name.startswith("sct-node"):
        return int((workdir / "rows").read_text())
    if name == "Orthanc":
        return len([p for p in (workdir / "storage").rglob("*") if p.is_file()])
    return len([p for p in (workdir / "out").rglob("*") if p.is_file()])


# The Python receivers (run in their own process) -----------------------------------------------


def serve_node(workdir: Path, port: int, fsync: bool) -> None:
    """The node's full reception, as `sct-node serve` runs it, until SIGTERM."""
    sys.path.insert(0, str(REPO))
    from sqlalchemy import func, select

    from dicom_node.audit import AuditDB, InstanceRecorder, InstanceRow
    from dicom_node.config import load_config, with_overrides
    from dicom_node.scp import StorageSCP

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # as the CLI does
    config = with_overrides(
        load_config(),
        node={"port": port, "bind": "127.0.0.1", "ae_title": "SCTNODE"},
        storage={"root": workdir / "var", "fsync": fsync, "min_free_mb": 100},
        audit={"url": f"sqlite:///{workdir / 'audit.sqlite'}"},
    )
    db = AuditDB(config.audit.url)
    recorder = InstanceRecorder(db)
    scp = StorageSCP(config, db, recorder)
    scp.start()
    wait_for_sigterm()
    scp.stop()
    recorder.flush()
    recorder.close()
    with db.session() as session:
        (workdir / "rows").write_text(str(session.scalar(select(func.count()).select_from(InstanceRow))))
    db.dispose()


def serve_bare(workdir: Path, port: int) -> None:
    """pynetdicom with default settings, writing the received bytes and nothing else."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
    from pynetdicom import AE, evt

    out = workdir / "out"
    out.mkdir()

    def handle_store(event: evt.Event) -> int:
        with open(out / f"{event.request.AffectedSOPInstanceUID}.dcm", "wb") as f:  # type: ignore[union-attr]
            f.write(event.encoded_dataset())
        return 0x0000

    ae = AE("BARE")
    ae.add_supported_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context("1.2.840.10008.1.1")  # Verification, for the readiness check
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert server is not None
    wait_for_sigterm()
    server.shutdown()


def wait_for_sigterm() -> None:
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    while not stop:
        time.sleep(0.1)


# Main --------------------------------------------------------------------------------------------


def receivers() -> list[Receiver]:
    return [
        Receiver("storescp", start_storescp, "STORESCP"),
        Receiver("sct-node (fsync)", start_python_receiver("node", fsync=True), "SCTNODE"),
        Receiver("sct-node (no fsync)", start_python_receiver("node", fsync=False), "SCTNODE"),
        Receiver("Orthanc", start_orthanc, "ORTHANC"),
        Receiver("bare pynetdicom", start_python_receiver("bare"), "BARE"),
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import pynetdicom

    return (
        f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, "
        f"pydicom {pydicom.__version__}, pynetdicom {pynetdicom.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per receiver (median reported)")
    parser.add_argument("--slices", type=int, default=300, help="slices in the series")
    parser.add_argument("--only", nargs="*", help="receivers to run (names as printed)")
    parser.add_argument("--serve", choices=["node", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fsync", default="0", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve == "node":
        serve_node(args.dir, args.port, args.fsync == "1")
        return 0
    if args.serve == "bare":
        serve_bare(args.dir, args.port)
        return 0

    with tempfile.TemporaryDirectory(prefix="sct-ingest-") as temp:
        root = Path(temp)
        series_dir = root / "series"
        build_series(series_dir, args.slices)
        size_mb = sum(p.stat().st_size for p in series_dir.iterdir()) / 1e6
        print(f"series: {args.slices} MR slices, {size_mb:.1f} MB; {machine()}")
        run_counter = iter(range(10**6))
        rates: dict[str, list[float]] = {}
        for receiver in receivers():
            if args.only and receiver.name not in args.only:
                continue
            for _ in range(args.runs):
                workdir = root / f"run{next(run_counter)}"
                workdir.mkdir()
                if receiver.name == "Orthanc":
                    receiver.ready = orthanc_ready(workdir)
                with running(receiver, workdir) as port:
                    elapsed_s = send_series(series_dir, port, receiver.called_aet)
                received = count_received(receiver.name, workdir)
                if received != args.slices:
                    raise RuntimeError(f"{receiver.name} kept {received} of {args.slices} instances")
                rates.setdefault(receiver.name, []).append(args.slices / elapsed_s)
                shutil.rmtree(workdir, ignore_errors=True)
        return report(rates, args.runs)


def report(rates: dict[str, list[float]], runs: int) -> int:
    reference = statistics.median(rates["storescp"]) if "storescp" in rates else None
    print(f"\n{'receiver':<22}{'median img/s':>14}{'min':>9}{'max':>9}{'vs storescp':>13}   ({runs} runs)")
    for name, values in rates.items():
        median = statistics.median(values)
        ratio = f"{median / reference:.2f}" if reference else "-"
        print(f"{name:<22}{median:>14.0f}{min(values):>9.0f}{max(values):>9.0f}{ratio:>13}")
    failed = False
    if reference:
        for name, values in rates.items():
            if name.startswith("sct-node"):
                ratio_value = statistics.median(values) / reference
                ok = ratio_value >= REQUIRED_RATIO
                failed |= not ok
                print(
                    f"check: {name} reaches {ratio_value:.2f} of storescp "
                    f"(>= {REQUIRED_RATIO}): {'OK' if ok else 'FAIL'}"
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
