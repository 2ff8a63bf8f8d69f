from __future__ import annotations

import tomllib
from pathlib import Path

from dicom_node.__main__ import main
from dicom_node.config import DEFAULT_CONFIG_PATH, load_config
from tests.integration.harness import dump_toml


def _config_file(tmp_path: Path, **changes: dict) -> Path:
    data = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())
    data["storage"]["root"] = str(tmp_path / "node")
    data["model"]["checkpoint"] = str(load_config().model.checkpoint)
    data["audit"]["url"] = f"sqlite:///{tmp_path / 'node' / 'audit.sqlite'}"
    for section, values in changes.items():
        data[section].update(values)
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(data))
    return path


def test_check_config_ok_and_bad_key_named(tmp_path, capsys):
    assert main(["check-config", "--config", str(_config_file(tmp_path))]) == 0
    assert "OK" in capsys.readouterr().out
    bad = _config_file(tmp_path, series={"quiet_period": 3})
    assert main(["check-config", "--config", str(bad)]) == 2
    assert "unknown key series.quiet_period" in capsys.readouterr().err


def test_serve_refuses_to_start_on_a_bad_config(tmp_path, capsys):
    bad = _config_file(tmp_path, node={"port": "eleven"})
    assert main(["serve", "--config", str(bad)]) == 2
    assert "node.port must be an integer" in capsys.readouterr().err


def test_audit_and_resend_without_a_database_say_so(tmp_path, capsys):
    config = str(_config_file(tmp_path))
    assert main(["audit", "jobs", "--config", config]) == 1
    assert "no audit database" in capsys.readouterr().err
    (tmp_path / "node").mkdir()
    assert main(["resend", "7", "--config", config]) == 1
    assert "no job 7" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "job 1: DONE" in printed
    assert "SENDING -> DONE" in printed
    assert "CT slices received by the PACS" in printed
    montage = output / "montage.png"
    assert montage.exists() and montage.stat().st_size > 1000
    assert str(montage) in printed
