import re
import ssl
import tomllib
from pathlib import Path

import pytest

from dicom_node.config import DEFAULT_CONFIG_PATH, REPO_ROOT, TLS_KEYS, dump_config, load_config, parse_config
from dicom_node.errors import ConfigError
from tests.tls_pki import PKI, encrypted_key, make_pki


def _default() -> dict:
    return tomllib.loads(DEFAULT_CONFIG_PATH.read_text())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_embedded_default_is_valid_and_resolves_paths():
    config = load_config()
    assert config.node.ae_title == "SCTNODE"
    assert config.storage.root == REPO_ROOT / "var"
    assert config.audit.url == f"sqlite:///{REPO_ROOT / 'var' / 'audit.sqlite'}"
    assert config.destinations[0].name in config.routes[0].destinations
    assert config.model.method in ("diffusion", "bulk_density")


def test_hospital_example_is_valid(pki: PKI):
    """Valid once its [tls] files exist: here our test PKI's files stand in for the hospital's."""
    example = REPO_ROOT / "deploy" / "hospital-example.toml"
    with pytest.raises(ConfigError, match=re.escape("tls.certificate: file not found: /etc/sct-node/tls/sct-node.crt")):
        load_config(example)
    data = tomllib.loads(example.read_text())
    assert set(data["tls"]) == set(TLS_KEYS)
    data["tls"] = pki.tls_section()
    config = parse_config(data, example)
    assert config.node.allowed_calling_aets == ("MR_SIMULATOR", "MR_LINAC")
    assert {d.name for d in config.destinations} == {"planning_pacs", "research_archive"}
    assert {d.name: d.tls for d in config.destinations} == {"planning_pacs": False, "research_archive": True}
    assert config.destination("research_archive").port == 2762
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
        ("node", "tls"),
        ("tls", "certificate"),
        ("tls", "private_key"),
        ("tls", "ca_certificates"),
        ("qa", "in_distribution_fail"),
        ("qa", "fov_truncation_warn_percent"),
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
        ("node", "tls", "on", r"node\.tls: must be one of off, required"),
        ("node", "tls", True, r"node\.tls must be a string"),
        ("tls", "certificate", 1, r"tls\.certificate must be a string"),
        ("qa", "body_dice_warn", 1.5, r"qa\.body_dice_warn: must be between 0 and 1"),
        ("qa", "body_hd95_fail_mm", -1, r"qa\.body_hd95_fail_mm: must be >= 0"),
        ("qa", "in_distribution_warn", 3.0, r"qa\.in_distribution_warn must be <= qa\.in_distribution_fail"),
        ("qa", "body_dice_fail", 0.99, r"qa\.body_dice_warn must be >= qa\.body_dice_fail"),
        ("qa", "uncertainty_p95_warn_hu", "150", r"qa\.uncertainty_p95_warn_hu must be an integer or a number"),
    ],
)
def test_wrong_values_are_named(section, key, value, message):
    data = _default()
    data[section][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_config(data, DEFAULT_CONFIG_PATH)


def test_routes_have_a_qa_policy_and_say_what_goes_with_the_sct():
    config = load_config()
    assert [(r.qa_policy, r.send_qa_report, r.send_uncertainty) for r in config.routes] == [("hold", True, True)]
    for key, value, message in (
        ("qa_policy", "maybe", r"route\[0\]\.qa_policy: must be one of send, hold, block"),
        ("send_qa_report", "yes", r"route\[0\]\.send_qa_report must be true or false"),
    ):
        data = _default()
        data["route"][0][key] = value
        with pytest.raises(ConfigError, match=message):
            parse_config(data, DEFAULT_CONFIG_PATH)
    data = _default()
    del data["route"][0]["send_uncertainty"]
    with pytest.raises(ConfigError, match=r"missing key route\[0\]\.send_uncertainty"):
        parse_config(data, DEFAULT_CONFIG_PATH)


def test_a_dumped_configuration_reads_back_the_same():
    config = load_config()
    assert parse_config(tomllib.loads(dump_config(config)), config.source) == config


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


# DICOM TLS -----------------------------------------------------------------------------------


def _with_tls(pki: PKI, *, node_tls: str = "off", destination_tls: bool = False, **paths: str) -> dict:
    data = _default()
    data["node"]["tls"] = node_tls
    data["destination"][0]["tls"] = destination_tls
    data["tls"] = {**pki.tls_section(), **paths}
    return data


def test_tls_is_off_by_default():
    config = load_config()
    assert config.node.tls == "off"
    assert [d.tls for d in config.destinations] == [False]
    assert not config.tls.configured
    assert (config.tls.certificate, config.tls.private_key, config.tls.ca_certificates) == (None, None, None)


def test_missing_tls_table_and_destination_tls_key_are_named():
    data = _default()
    del data["tls"]
    with pytest.raises(ConfigError, match=r"missing table \[tls\]"):
        parse_config(data, DEFAULT_CONFIG_PATH)
    data = _default()
    del data["destination"][0]["tls"]
    with pytest.raises(ConfigError, match=re.escape("missing key destination[0].tls")):
        parse_config(data, DEFAULT_CONFIG_PATH)
    data = _default()
    data["destination"][0]["tls"] = "yes"
    with pytest.raises(ConfigError, match=re.escape("destination[0].tls must be true or false")):
        parse_config(data, DEFAULT_CONFIG_PATH)


@pytest.mark.parametrize(
    ("node_tls", "destination_tls", "user"),
    [("required", False, 'node.tls = "required"'), ("off", True, "destination[0].tls = true")],
)
def test_tls_without_its_files_is_refused_naming_the_keys(pki, node_tls, destination_tls, user):
    everything_missing = _with_tls(
        pki, node_tls=node_tls, destination_tls=destination_tls, certificate="", private_key="", ca_certificates=""
    )
    with pytest.raises(ConfigError) as refused:
        parse_config(everything_missing, DEFAULT_CONFIG_PATH)
    assert str(refused.value) == (
        f"{user} needs tls.certificate, tls.private_key and tls.ca_certificates"
        " (missing: tls.certificate, tls.private_key, tls.ca_certificates)"
    )
    no_ca = _with_tls(pki, node_tls=node_tls, destination_tls=destination_tls, ca_certificates="")
    with pytest.raises(ConfigError, match=re.escape("(missing: tls.ca_certificates)")):
        parse_config(no_ca, DEFAULT_CONFIG_PATH)


def test_tls_files_must_exist_and_load(pki, tmp_path):
    absent = str(tmp_path / "absent.pem")
    for key in TLS_KEYS:
        with pytest.raises(ConfigError, match=re.escape(f"tls.{key}: file not found: {absent}")):
            parse_config(_with_tls(pki, node_tls="required", **{key: absent}), DEFAULT_CONFIG_PATH)
    # Even when nothing uses TLS yet, a configured file that is not there is an error.
    with pytest.raises(ConfigError, match=r"tls\.ca_certificates: file not found"):
        parse_config(_with_tls(pki, ca_certificates=absent), DEFAULT_CONFIG_PATH)

    with pytest.raises(ConfigError, match=r"tls\.certificate and tls\.private_key must be set together"):
        parse_config(_with_tls(pki, private_key=""), DEFAULT_CONFIG_PATH)

    other_key = str(pki.scanner.private_key)  # a real key, but not the certificate's
    with pytest.raises(ConfigError, match=r"tls\.certificate / tls\.private_key: cannot load"):
        parse_config(_with_tls(pki, node_tls="required", private_key=other_key), DEFAULT_CONFIG_PATH)

    # An encrypted key is refused with the reason (OpenSSL would otherwise prompt on the terminal).
    encrypted = str(encrypted_key(pki.node.private_key, tmp_path / "encrypted.key"))
    with pytest.raises(ConfigError, match=r"tls\.certificate / tls\.private_key: .*the private key is encrypted"):
        parse_config(_with_tls(pki, node_tls="required", private_key=encrypted), DEFAULT_CONFIG_PATH)

    not_pem = tmp_path / "not-a-bundle.pem"
    not_pem.write_text("this is not a certificate\n")
    with pytest.raises(ConfigError, match=r"tls\.ca_certificates: cannot load"):
        parse_config(_with_tls(pki, destination_tls=True, ca_certificates=str(not_pem)), DEFAULT_CONFIG_PATH)
    with pytest.raises(ConfigError, match=r"tls\.certificate / tls\.private_key: cannot load"):
        parse_config(_with_tls(pki, destination_tls=True, certificate=str(not_pem)), DEFAULT_CONFIG_PATH)


def test_tls_paths_resolve_against_the_config_folder_and_build_strict_contexts(pki):
    data = _with_tls(
        pki,
        node_tls="required",
        destination_tls=True,
        certificate="node.crt",
        private_key="node.key",
        ca_certificates="ca.crt",
    )
    data["model"]["method"] = "bulk_density"  # the relative demo checkpoint is not in that folder
    config = parse_config(data, pki.folder / "node.toml")
    assert (config.tls.certificate, config.tls.private_key, config.tls.ca_certificates) == (
        pki.node.certificate,
        pki.node.private_key,
        pki.ca,
    )
    assert config.node.tls == "required" and config.destinations[0].tls
    server = config.tls.server_context()
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    client = config.tls.client_context()
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    assert client.minimum_version >= ssl.TLSVersion.TLSv1_2
    # Only the configured CA is trusted, not the system's store.
    assert [c["subject"] for c in client.get_ca_certs()] == [((("commonName", "test ca"),),)]


def test_destination_associations_are_one_by_default_and_bounded():
    assert [d.associations for d in load_config().destinations] == [1]
    data = _default()
    del data["destination"][0]["associations"]
    with pytest.raises(ConfigError, match=re.escape("missing key destination[0].associations")):
        parse_config(data, DEFAULT_CONFIG_PATH)
    for wrong in (0, 9):
        data = _default()
        data["destination"][0]["associations"] = wrong
        with pytest.raises(ConfigError, match=re.escape("destination[0].associations: must be 1 to 8")):
            parse_config(data, DEFAULT_CONFIG_PATH)
    data = _default()
    data["destination"][0]["associations"] = 3
    assert parse_config(data, DEFAULT_CONFIG_PATH).destinations[0].associations == 3


def test_the_review_page_is_off_by_default_and_never_in_clear_text_beyond_this_machine(pki):
    web = load_config().web
    assert (web.enabled, web.bind, web.tls) == (False, "127.0.0.1", False)
    for bind in ("0.0.0.0", "10.1.2.3", "sct-node.hospital.example"):
        data = _default()
        data["web"]["bind"] = bind
        with pytest.raises(ConfigError, match=r"web.bind = .* set web.tls = true"):
            parse_config(data, DEFAULT_CONFIG_PATH)
    data = _default()
    data["web"].update(bind="0.0.0.0", tls=True)
    with pytest.raises(ConfigError, match=r"web.tls = true needs tls.certificate"):
        parse_config(data, DEFAULT_CONFIG_PATH)
    data["tls"] = pki.tls_section()
    assert parse_config(data, DEFAULT_CONFIG_PATH).web.tls
    for key, value, message in (("port", 70000, "web.port"), ("session_minutes", 0, "web.session_minutes"),
                                ("enabled", "yes", "web.enabled")):  # fmt: skip
        data = _default()
        data["web"][key] = value
        with pytest.raises(ConfigError, match=message):
            parse_config(data, DEFAULT_CONFIG_PATH)
