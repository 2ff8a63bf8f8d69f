"""The node's configuration: one TOML file read into frozen, validated dataclasses.

Every key is required and every unknown key is an error, so that a typo in a hospital's
configuration stops the node at start with a message naming the key, instead of silently
falling back to a default. Relative paths are resolved against the configuration file's folder.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dicom_node import tls as _tls
from dicom_node.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = REPO_ROOT / "config.toml"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash
_UID_ROOT = re.compile(r"^([0-9]+\.)*$|^$")


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    ae_title: str
    port: int
    bind: str
    allowed_calling_aets: tuple[str, ...]
    require_called_aet: bool
    uid_root: str
    max_associations: int
    tls: str = "off"  # "off" or "required" (TLS_MODES)
    source_references: str = "compact"


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """The node's certificate, its key and the CA bundle peers are checked against; None: not configured."""

    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None

    @property
    def configured(self) -> bool:
        return None not in (self.certificate, self.private_key, self.ca_certificates)

    def _paths(self) -> tuple[Path, Path, Path]:
        if self.certificate is None or self.private_key is None or self.ca_certificates is None:
            raise ConfigError("TLS is not configured: set tls.certificate, tls.private_key and tls.ca_certificates")
        return self.certificate, self.private_key, self.ca_certificates

    def server_context(self) -> ssl.SSLContext:
        """The listener's SSL context (client certificates required); raises OSError (SSLError) or ValueError."""
        return _tls.server_context(*self._paths())

    def client_context(self) -> ssl.SSLContext:
        """The sender's SSL context (server certificate and host name checked); raises OSError or ValueError."""
        return _tls.client_context(*self._paths())


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    root: Path
    min_free_mb: int
    fsync: bool

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def incoming(self) -> Path:
        """Temporary files being received; renamed into spool/ when complete."""
        return self.root / "incoming"


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    url: str


@dataclasses.dataclass(frozen=True)
class SeriesConfig:
    quiet_period_s: float
    sweep_interval_s: float


@dataclasses.dataclass(frozen=True)
class SenderConfig:
    max_attempts: int
    first_retry_s: float
    max_retry_s: float
    timeout_s: float

    def retry_delay_s(self, attempt: int) -> float:
        """Delay before attempt number ``attempt + 1`` after ``attempt`` failed ones (>= 1)."""
        return float(min(self.max_retry_s, self.first_retry_s * 2 ** max(0, attempt - 1)))


MAX_ASSOCIATIONS_PER_DESTINATION = 8


@dataclasses.dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    associations: int = 1  # C-STOREs in parallel over this many associations (1: one association)


@dataclasses.dataclass(frozen=True)
class Route:
    name: str
    description_pattern: re.Pattern[str]
    exclude_pattern: re.Pattern[str] | None
    calling_aet_pattern: re.Pattern[str]
    destinations: tuple[str, ...]
    qa_policy: str = "hold"  # QA_POLICIES: what a warn or fail verdict does to the job
    send_qa_report: bool = True  # the QA report (Encapsulated PDF) goes with the sCT
    send_uncertainty: bool = True  # the uncertainty map (Parametric Map) goes with it (samples > 1)


@dataclasses.dataclass(frozen=True)
class QAConfig:
    """The warn and fail levels of the QA checks (dicom_node.qa; config.toml documents each)."""

    in_distribution_warn: float
    in_distribution_fail: float
    body_dice_warn: float
    body_dice_fail: float
    body_hd95_warn_mm: float
    body_hd95_fail_mm: float
    tissue_outside_training_warn_pp: float
    tissue_outside_training_fail_pp: float
    bone_outside_body_warn_ml: float
    bone_outside_body_fail_ml: float
    outside_hu_range_fail_percent: float
    uncertainty_mean_warn_hu: float
    uncertainty_mean_fail_hu: float
    uncertainty_p95_warn_hu: float
    uncertainty_p95_fail_hu: float
    fov_truncation_warn_percent: float
    fov_truncation_fail_percent: float


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    method: str
    checkpoint: Path
    device: str
    steps: int
    samples: int
    seed: int


@dataclasses.dataclass(frozen=True)
class JobsConfig:
    workers: int
    retention_days: float


WEB_ROLES = ("viewer", "physicist")


@dataclasses.dataclass(frozen=True)
class WebConfig:
    """The physicists' review page (dicom_node.web; config.toml documents each key)."""

    enabled: bool = False  # `sct-node serve` serves it too (`sct-node web` serves it on its own)
    bind: str = "127.0.0.1"
    port: int = 8440
    tls: bool = False  # HTTPS with the [tls] certificate
    session_minutes: float = 30.0  # a session ends after this long without a request


@dataclasses.dataclass(frozen=True)
class Config:
    node: NodeConfig
    storage: StorageConfig
    audit: AuditConfig
    series: SeriesConfig
    sender: SenderConfig
    destinations: tuple[Destination, ...]
    routes: tuple[Route, ...]
    model: ModelConfig
    jobs: JobsConfig
    source: Path
    qa: QAConfig
    tls: TLSConfig = TLSConfig()
    web: WebConfig = WebConfig()

    def route(self, name: str) -> Route:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)

    def destination(self, name: str) -> Destination:
        for destination in self.destinations:
            if destination.name == name:
                return destination
        raise KeyError(name)

    @property
    def tls_in_use(self) -> bool:
        """The listener or a destination uses the [tls] certificate."""
        return bool(_tls_users(self.node, self.destinations))


def _tls_users(node: NodeConfig, destinations: Sequence[Destination]) -> list[str]:
    """The settings that use the [tls] files, as written in the configuration (for messages)."""
    return (['node.tls = "required"'] if node.tls == "required" else []) + [
        f"destination[{i}].tls = true" for i, d in enumerate(destinations) if d.tls
    ]


MODEL_METHODS = ("diffusion", "bulk_density")
# route.qa_policy: "send" sends whatever the verdicts; "hold" holds a job with any warn or fail for a
# person's release or rejection; "block" rejects a job with a fail and holds one with a warn.
QA_POLICIES = ("send", "hold", "block")
# [qa] levels: (key, the larger or the smaller value is worse). A warn level must not be worse than
# its fail level.
QA_LEVELS: tuple[tuple[str, str, str], ...] = (
    ("in_distribution_warn", "in_distribution_fail", "above"),
    ("body_dice_warn", "body_dice_fail", "below"),
    ("body_hd95_warn_mm", "body_hd95_fail_mm", "above"),
    ("tissue_outside_training_warn_pp", "tissue_outside_training_fail_pp", "above"),
    ("bone_outside_body_warn_ml", "bone_outside_body_fail_ml", "above"),
    ("uncertainty_mean_warn_hu", "uncertainty_mean_fail_hu", "above"),
    ("uncertainty_p95_warn_hu", "uncertainty_p95_fail_hu", "above"),
    ("fov_truncation_warn_percent", "fov_truncation_fail_percent", "above"),
)
TLS_MODES = ("off", "required")
# How the sCT references its MR (node.source_references; sct_writer.build_ct_series explains both).
SOURCE_REFERENCE_FORMS = ("compact", "full")
TLS_KEYS = ("certificate", "private_key", "ca_certificates")

T = TypeVar("T")


class _Table:
    """A TOML table read key by key; reports missing, mistyped and unknown keys by full name."""

    def __init__(self, data: Any, name: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"[{name}] must be a table")
        self.data = data
        self.name = name
        self.used: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def get(self, key: str, kind: type[T] | tuple[type, ...], check: Callable[[Any], str | None] | None = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            raise ConfigError(f"missing key {self.key(key)}")
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python: refuse true/false where a number is wanted, and vice versa.
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{self.key(key)} must be {_kind_name(kinds)}, not {value!r}")
        if not isinstance(value, kinds):
            raise ConfigError(f"{self.key(key)} must be {_kind_name(kinds)}, not {value!r}")
        if check is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{self.key(key)}: {problem} (got {value!r})")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(
                f"unknown key {self.key(unknown[0])}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            )


def _is_loopback(host: str) -> bool:
    """``host`` (an address or a name) only reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP port (0-65535; 0 picks a free one)"


def _ae_title(value: str) -> str | None:
    return None if _AE_TITLE.match(value) and value.strip() else "must be 1-16 printable characters, no backslash"


def _regex(key_name: str, value: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error as exc:
        raise ConfigError(f"{key_name}: not a valid regular expression: {exc}") from exc


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_db_url(base: Path, url: str) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        return prefix + str(_resolve(base, url[len(prefix) :]))
    return url


def parse_config(data: Mapping[str, Any], source: Path) -> Config:
    """Validate a parsed TOML document; raise ConfigError naming the first bad key."""
    base = source.parent
    top = _Table(data, "config")
    top.name = ""

    def table(name: str) -> _Table:
        top.used.add(name)
        if name not in data:
            raise ConfigError(f"missing table [{name}]")
        return _Table(data[name], name)

    t = table("node")
    node = NodeConfig(
        ae_title=t.get("ae_title", str, _ae_title),
        port=t.get("port", int, _port),
        bind=t.get("bind", str),
        allowed_calling_aets=tuple(
            t.get(
                "allowed_calling_aets",
                list,
                lambda v: (
                    None if all(isinstance(a, str) and not _ae_title(a) for a in v) else "must be a list of AE titles"
                ),
            )
        ),
        require_called_aet=t.get("require_called_aet", bool),
        uid_root=t.get(
            "uid_root",
            str,
            lambda v: (
                None
                if _UID_ROOT.match(v) and len(v) <= 40
                else "must be digits and dots ending in '.', at most 40 characters"
            ),
        ),
        max_associations=t.get("max_associations", int, _positive),
        tls=t.get("tls", str, lambda v: None if v in TLS_MODES else f"must be one of {', '.join(TLS_MODES)}"),
        source_references=t.get(
            "source_references",
            str,
            lambda v: None if v in SOURCE_REFERENCE_FORMS else f"must be one of {', '.join(SOURCE_REFERENCE_FORMS)}",
        ),
    )
    t.finish()

    t = table("tls")
    tls_paths = {key: t.get(key, str) for key in TLS_KEYS}
    t.finish()

    t = table("storage")
    storage = StorageConfig(
        root=_resolve(base, t.get("root", str, lambda v: None if v else "must not be empty")),
        min_free_mb=t.get("min_free_mb", int, _non_negative),
        fsync=t.get("fsync", bool),
    )
    t.finish()

    t = table("audit")
    audit = AuditConfig(
        url=_resolve_db_url(base, t.get("url", str, lambda v: None if "://" in v else "must be an SQLAlchemy URL"))
    )
    t.finish()

    t = table("series")
    series = SeriesConfig(
        quiet_period_s=float(t.get("quiet_period_s", (int, float), _positive)),
        sweep_interval_s=float(t.get("sweep_interval_s", (int, float), _positive)),
    )
    t.finish()

    t = table("sender")
    sender = SenderConfig(
        max_attempts=t.get("max_attempts", int, _positive),
        first_retry_s=float(t.get("first_retry_s", (int, float), _positive)),
        max_retry_s=float(t.get("max_retry_s", (int, float), _positive)),
        timeout_s=float(t.get("timeout_s", (int, float), _positive)),
    )
    t.finish()

    top.used.add("destination")
    raw_destinations = data.get("destination")
    if not isinstance(raw_destinations, list) or not raw_destinations:
        raise ConfigError("missing [[destination]]: at least one destination is required")
    destinations = []
    for i, raw in enumerate(raw_destinations):
        t = _Table(raw, f"destination[{i}]")
        destinations.append(
            Destination(
                name=t.get("name", str, lambda v: None if v else "must not be empty"),
                ae_title=t.get("ae_title", str, _ae_title),
                host=t.get("host", str, lambda v: None if v else "must not be empty"),
                port=t.get("port", int, _port),
                tls=t.get("tls", bool),
                associations=t.get(
                    "associations",
                    int,
                    lambda v: (
                        None
                        if 1 <= v <= MAX_ASSOCIATIONS_PER_DESTINATION
                        else f"must be 1 to {MAX_ASSOCIATIONS_PER_DESTINATION}"
                    ),
                ),
            )
        )
        t.finish()
    names = [d.name for d in destinations]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"destination.name {duplicates[0]!r} is used twice")

    top.used.add("route")
    raw_routes = data.get("route")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise ConfigError("missing [[route]]: at least one routing rule is required")
    routes = []
    for i, raw in enumerate(raw_routes):
        t = _Table(raw, f"route[{i}]")
        exclude = t.get("exclude_pattern", str)
        route_destinations = tuple(
            t.get("destinations", list, lambda v: None if v else "must name at least one destination")
        )
        for name in route_destinations:
            if name not in names:
                raise ConfigError(f"{t.key('destinations')}: unknown destination {name!r} (known: {', '.join(names)})")
        routes.append(
            Route(
                name=t.get("name", str, lambda v: None if v else "must not be empty"),
                description_pattern=_regex(t.key("description_pattern"), t.get("description_pattern", str)),
                exclude_pattern=_regex(t.key("exclude_pattern"), exclude) if exclude else None,
                calling_aet_pattern=_regex(t.key("calling_aet_pattern"), t.get("calling_aet_pattern", str)),
                destinations=route_destinations,
                qa_policy=t.get(
                    "qa_policy", str, lambda v: None if v in QA_POLICIES else f"must be one of {', '.join(QA_POLICIES)}"
                ),
                send_qa_report=t.get("send_qa_report", bool),
                send_uncertainty=t.get("send_uncertainty", bool),
            )
        )
        t.finish()

    t = table("model")
    model = ModelConfig(
        method=t.get(
            "method", str, lambda v: None if v in MODEL_METHODS else f"must be one of {', '.join(MODEL_METHODS)}"
        ),
        checkpoint=_resolve(base, t.get("checkpoint", str)),
        device=t.get(
            "device",
            str,
            lambda v: None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else "must be auto, cpu, cuda or cuda:N",
        ),
        steps=t.get("steps", int, _positive),
        samples=t.get("samples", int, _positive),
        seed=t.get("seed", int, _non_negative),
    )
    t.finish()
    if model.method == "diffusion" and not model.checkpoint.is_file():
        raise ConfigError(f"model.checkpoint: file not found: {model.checkpoint}")

    t = table("jobs")
    jobs = JobsConfig(
        workers=t.get("workers", int, _positive),
        retention_days=float(t.get("retention_days", (int, float), _non_negative)),
    )
    t.finish()

    qa = _qa_config(table("qa"))

    t = table("web")
    web = WebConfig(
        enabled=t.get("enabled", bool),
        bind=t.get("bind", str),
        port=t.get("port", int, _port),
        tls=t.get("tls", bool),
        session_minutes=float(t.get("session_minutes", (int, float), _positive)),
    )
    t.finish()
    if not web.tls and not _is_loopback(web.bind):
        raise ConfigError(
            f"web.bind = {web.bind!r} is reachable from other machines: set web.tls = true (passwords and "
            "patient data must not cross the network in clear text) or bind to 127.0.0.1"
        )

    users = _tls_users(node, destinations) + (["web.tls = true"] if web.tls else [])
    tls = _tls_config(base, tls_paths, users)

    top.finish()
    return Config(
        node=node,
        storage=storage,
        audit=audit,
        series=series,
        sender=sender,
        destinations=tuple(destinations),
        routes=tuple(routes),
        model=model,
        jobs=jobs,
        source=source,
        tls=tls,
        qa=qa,
        web=web,
    )


def _qa_config(t: _Table) -> QAConfig:
    """The [qa] levels: numbers >= 0 (Dice levels at most 1), each warn level no worse than its fail level."""
    values: dict[str, float] = {}
    for field in dataclasses.fields(QAConfig):
        dice = field.name.startswith("body_dice")
        values[field.name] = float(
            t.get(
                field.name,
                (int, float),
                (lambda v: None if 0 <= v <= 1 else "must be between 0 and 1")
                if dice
                else (lambda v: None if v >= 0 else "must be >= 0"),
            )
        )
    t.finish()
    for warn, fail, worse in QA_LEVELS:
        if (values[warn] > values[fail]) if worse == "above" else (values[warn] < values[fail]):
            sign = "<=" if worse == "above" else ">="
            raise ConfigError(f"qa.{warn} must be {sign} qa.{fail} (a warning comes before a failure)")
    return QAConfig(**values)


def _tls_config(base: Path, values: Mapping[str, str], users: list[str]) -> TLSConfig:
    """Resolve and check the [tls] files; ``users`` are the settings that need them (for the errors).

    Set paths must be existing files, certificate and private key go together, and when TLS is used
    all three are required and must load into SSL contexts (a key that does not match the
    certificate, a file that is not PEM, fail here rather than at the first scanner).
    """
    paths = {key: _resolve(base, value) if value else None for key, value in values.items()}
    for key, path in paths.items():
        if path is not None and not path.is_file():
            raise ConfigError(f"tls.{key}: file not found: {path}")
    if (paths["certificate"] is None) != (paths["private_key"] is None):
        raise ConfigError("tls.certificate and tls.private_key must be set together")
    missing = [f"tls.{key}" for key, path in paths.items() if path is None]
    if users and missing:
        raise ConfigError(
            f"{users[0]} needs tls.certificate, tls.private_key and tls.ca_certificates (missing: {', '.join(missing)})"
        )
    config = TLSConfig(**paths)
    if not config.configured:
        return config
    certificate, private_key, ca_certificates = config._paths()
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, private_key, password=_tls.no_password)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"tls.certificate / tls.private_key: cannot load the certificate and its key: {exc}") from exc
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.ca_certificates: cannot load the CA certificates: {exc}") from exc
    try:
        config.server_context()
        config.client_context()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tls: cannot build the TLS contexts: {exc}") from exc
    if users:  # in use: an expired certificate would fail every handshake, scanners' and PACS's alike
        problem = _tls.certificate_dates(certificate).problem(dt.datetime.now(dt.UTC))
        if problem:
            raise ConfigError(f"tls.certificate: {certificate} is {problem}; {users[0]} needs a valid one")
    return config


def load_config(path: Path | str | None = None) -> Config:
    """Read and validate a configuration file (the embedded default when ``path`` is None)."""
    source = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {source}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        return parse_config(data, source.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def dump_config(config: Config) -> str:
    """``config`` as TOML that ``load_config`` reads back to the same configuration (absolute paths;
    no comments: the documented keys are in the embedded default)."""
    import tomli_w

    def plain(value: Any) -> Any:
        if isinstance(value, re.Pattern):
            return value.pattern
        if isinstance(value, Path):
            return str(value)
        if value is None:
            return ""
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    def section(instance: Any) -> dict[str, Any]:
        return {field.name: plain(getattr(instance, field.name)) for field in dataclasses.fields(instance)}

    document: dict[str, Any] = {
        "node": section(config.node),
        "tls": section(config.tls),
        "storage": section(config.storage),
        "audit": section(config.audit),
        "series": section(config.series),
        "sender": section(config.sender),
        "destination": [section(d) for d in config.destinations],
        "route": [section(r) for r in config.routes],
        "model": section(config.model),
        "jobs": section(config.jobs),
        "qa": section(config.qa),
        "web": section(config.web),
    }
    return tomli_w.dumps(document)


def with_overrides(config: Config, **sections: Any) -> Config:
    """A copy of ``config`` with some fields of some sections replaced (tests and the demo)."""
    changes: dict[str, Any] = {}
    for section, fields in sections.items():
        if isinstance(fields, Mapping):
            changes[section] = dataclasses.replace(getattr(config, section), **fields)
        else:  # destinations, routes: the whole tuple
            changes[section] = fields
    return dataclasses.replace(config, **changes)
