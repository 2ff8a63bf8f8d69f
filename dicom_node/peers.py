"""Receiving peers started on loopback: Orthanc (a real PACS) or a plain storage SCP writing files.

Used by ``sct-node demo``, the tests and the benchmarks. Orthanc, like DCMTK, leaves Nagle's
algorithm on unless TCP_NODELAY=1 is in its environment (every image would wait ~40 ms).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

from pynetdicom import AE, AllStoragePresentationContexts, evt

ORTHANC_INSTALL_HINT = "apt-get install -y orthanc"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (str(Path("/usr/sbin/Orthanc")) if Path("/usr/sbin/Orthanc").exists() else None)


class Orthanc:
    """An Orthanc server in ``workdir`` on free ports; ``with Orthanc(dir) as pacs: ...``."""

    def __init__(
        self, workdir: Path, *, ae_title: str = "PLANNING", dicom_port: int | None = None, http_port: int | None = None
    ) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError(f"Orthanc is not installed: {ORTHANC_INSTALL_HINT}")
        self.binary = binary
        self.workdir = Path(workdir)
        self.ae_title = ae_title
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "sct-node-test-pacs",
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "StableAge": 2,
            "Plugins": [],
            "HttpDescribeErrors": True,
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [self.binary, str(config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.log_path}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return bytes(response.read())

    def series(self) -> list[dict[str, Any]]:
        return list(self.get("/series?expand"))

    def find_series(self, series_instance_uid: str) -> dict[str, Any] | None:
        return next(
            (s for s in self.series() if s["MainDicomTags"].get("SeriesInstanceUID") == series_instance_uid), None
        )

    def series_files(self, orthanc_series_id: str) -> list[bytes]:
        instances = self.get(f"/series/{orthanc_series_id}/instances")
        return [self.get_bytes(f"/instances/{i['ID']}/file") for i in instances]


class FileStoreSCP:
    """A minimal storage SCP (pynetdicom) that writes what it receives to ``folder`` (a fallback PACS).

    Subclasses change what a C-STORE does by overriding ``_on_store`` (tests/reliability/faulty_pacs.py).
    """

    timeout_s: float | None = None  # ACSE, DIMSE and network timeouts (None: pynetdicom's defaults)

    def __init__(self, folder: Path, *, ae_title: str = "PLANNING", port: int | None = None) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.port = port or free_port()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        meta = event.request
        target = self.folder / f"{meta.AffectedSOPInstanceUID}.dcm"
        target.write_bytes(event.encoded_dataset())
        return 0x0000

    def start(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        if self.timeout_s is not None:
            ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = self.timeout_s
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
