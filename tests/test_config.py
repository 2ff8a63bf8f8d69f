import re
import tomllib
from pathlib import Path

import pytest

from dicom_node.config import DEFAULT_CONFIG_PATH, REPO_ROOT, load_config, parse_config
from dicom_node.errors import ConfigError


def _default() -> dict:
    return tomllib.loads(DEFAULT_CONFIG_PATH.read_text())


def test_embedded_default_is_valid_and_resolves_paths():
    config = load_config()
    assert config.node.ae_title == "SCTNODE"
    assert config.storage.root == REPO_ROOT / "var"
    assert config.audit.url == f"sqlite:///{REPO_ROOT / 'var' / 'audit.sqlite'}"
    assert config.destinations[0].name in config.routes[0].destinations
    assert config.model.method in ("diffusion", "bulk_density")


def test_hospital_example_is_valid():
    config = load_config(REPO_ROOT / "deploy" / "hospital-example.toml")
    assert config.node.allowed_calling_aets == ("MR_SIMULATOR", "MR_LINAC")
    assert {d.name for d in config.destinations} == {"planning_pacs", "research_archive"}
    assert config.storage.root == Path("/var/lib/sct-node")


def test_every_key_of_the_default_is_documented_by_a_comment():
    lines = DEFAULT_CONFIG_PATH.read_text().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            above = lines[index - 1].strip()
            assert above.startswith("#"), f"key {line.split('=')[0].strip()} has no comment above it"


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("node", "ae_title"),
        ("node", "port"),
        ("storage", "root"),
        ("audit", "url"),
        ("series", "quiet_period_s"),
        ("model", "seed"),
        ("sender", "max_attempts"),
        ("jobs", "workers"),
        ("node", "allowed_calling_aets"),
    ],
)
def test_missing_key_is_named(section, key):
    data = _default()
    del data[section][key]
    with pytest.raises(ConfigError, match=re.escape(f"missing key {section}.{key}")):
        parse_config(data, DEFAULT_CONFIG_PATH)


def test_unknown_key_is_named():
    data = _default()
    data["series"]["quiet_periods"] = 3
    with pytest.raises(ConfigError, match=r"unknown key series\.quiet_periods"):
        parse_config(data, DEFAULT_CONFIG_PATH)


def test_unknown_table_is_named():
    data = _default()
    data["nodes"] = {}
    with pytest.raises(ConfigError, match="unknown key .*nodes"):
        parse_config(data, DEFAULT_CONFIG_PATH)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("node", "port", "104", r"node\.port must be an integer"),
        ("node", "port", 70000, r"node\.port: must be a TCP port"),
        ("node", "ae_title", "A" * 17, r"node\.ae_title: must be 1-16"),
        ("node", "require_called_aet", 1, r"node\.require_called_aet must be true or false"),
        ("series", "quiet_period_s", 0, r"series\.quiet_period_s: must be > 0"),
        ("series", "quiet_period_s", True, r"series\.quiet_period_s must be"),
        ("model", "method", "gan", r"model\.method: must be one of"),
        ("model", "device", "tpu", r"model\.device"),
        ("node", "uid_root", "1.2.abc.", r"node\.uid_root"),
        ("audit", "url", "audit.sqlite", r"audit\.url: must be an SQLAlchemy URL"),
    ],
)
def test_wrong_values_are_named(section, key, value, message):
    data = _default()
    data[section][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_config(data, DEFAULT_CONFIG_PATH)


def test_route_must_name_known_destination_and_valid_regex():
    data = _default()
    data["route"][0]["destinations"] = ["nowhere"]
    with pytest.raises(ConfigError, match=r"route\[0\]\.destinations: unknown destination 'nowhere'"):
        parse_config(data, DEFAULT_CONFIG_PATH)
    data = _default()
    data["route"][0]["description_pattern"] = "(unclosed"
    with pytest.raises(ConfigError, match=r"route\[0\]\.description_pattern: not a valid regular expression"):
        parse_config(data, DEFAULT_CONFIG_PATH)


def test_destination_names_unique_and_required():
    data = _default()
    data["destination"].append(dict(data["destination"][0]))
    with pytest.raises(ConfigError, match="used twice"):
        parse_config(data, DEFAULT_CONFIG_PATH)
    data = _default()
    del data["destination"]
    with pytest.raises(ConfigError, match=r"missing \[\[destination\]\]"):
        parse_config(data, DEFAULT_CONFIG_PATH)


def test_diffusion_needs_an_existing_checkpoint(tmp_path):
    data = _default()
    data["model"]["method"] = "diffusion"
    data["model"]["checkpoint"] = str(tmp_path / "absent.pt")
    with pytest.raises(ConfigError, match=r"model\.checkpoint: file not found"):
        parse_config(data, DEFAULT_CONFIG_PATH)


def test_load_config_reports_file_and_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_retry_delay_is_exponential_and_capped():
    sender = load_config().sender
    assert sender.retry_delay_s(1) == sender.first_retry_s
    assert sender.retry_delay_s(2) == 2 * sender.first_retry_s
    assert sender.retry_delay_s(3) == 4 * sender.first_retry_s
    assert sender.retry_delay_s(50) == sender.max_retry_s
