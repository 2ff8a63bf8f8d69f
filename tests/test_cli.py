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
    # the QA verdicts and the report
    assert "QA              PASS" in printed and "in_distribution  score" in printed
    assert (output / "node" / "outbox" / "job_1_qa" / "report.pdf").exists()


def test_demo_with_a_series_the_checkpoint_does_not_know_says_held_why_and_how_to_release(tmp_path, capsys):
    import numpy as np

    from dicom_node.audit import AuditDB, JobRow, JobState
    from dicom_node.synthetic_mr import write_volume_series
    from training.ood import make_ood
    from training.phantoms import make_phantom

    phantom = make_phantom("AB", seed=31, shape_zyx=(64, 64, 64), spacing_mm=(3.0, 3.0, 3.0))
    meat = make_ood("unseen_anatomy", phantom, np.random.default_rng(31))
    write_volume_series(meat, tmp_path / "meat", series_description="T2 PORCINE PHANTOM")
    output = tmp_path / "demo"
    assert main(["demo", "--input", str(tmp_path / "meat"), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    config = output / "node" / "config.toml"
    assert "job 1 is HELD" in printed
    assert "in_distribution.score" in printed and ": fail" in printed  # why
    command = f"sct-node review release 1 --by NAME --reason TEXT --config {config}"
    assert command in printed
    assert main(["review", "release", "1", "--by", "Dr Curie", "--reason", "demo", "--config", str(config)]) == 0
    db = AuditDB(f"sqlite:///{output / 'node' / 'audit.sqlite'}")
    with db.session() as session:
        assert session.get(JobRow, 1).state == JobState.SENDING  # the demo's node has stopped: it waits to be sent
    db.dispose()
