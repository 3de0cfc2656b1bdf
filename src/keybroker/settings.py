"""Typed, frozen settings: one TOML file plus ``KEYBROKER_<SECTION>_<KEY>`` environment overrides.

Loaded and validated once at start-up. Relative paths are resolved against the TOML file's folder.
Secrets (the HSM PIN) are read from files and never appear in a repr. Every error names the key
and the fix.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from keybroker.core.alerting import AlertThresholds
from keybroker.core.retention import MONTH, EpochScheme
from keybroker.errors import ConfigurationError

ENV_PREFIX = "KEYBROKER_"
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
MAX_LEEWAY_SECONDS = 60
SERVER_ENGINES = ("loop", "grpc")
"""``[server] engine``: keybroker.server.engines (the settings import no server code)."""
PROCESSES_AUTO = "auto"
"""``[server] processes = "auto"``: one worker per CPU the container or host grants."""

_DURATION_RE = re.compile(r"(\d{1,15})\s*([smhd]?)")  # 15 digits: far beyond any real duration
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object, key: str) -> int:
    """Seconds from an int or a string such as ``"90s"``, ``"15m"``, ``"24h"``, ``"90d"``."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{key}: expected a duration such as 30, '15m' or '24h'")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())):
        return int(m.group(1)) * _UNITS[m.group(2)]
    raise ConfigurationError(
        f"{key}: expected a duration such as 30, '15m' or '24h', got {value!r}"
    )


@dataclass(frozen=True)
class ServerSettings:
    listen: str = "127.0.0.1:50051"
    processes: int = 0
    """Worker processes sharing the port (SO_REUSEPORT). ``"auto"`` (stored as 0, the default):
    one per CPU this process may use, i.e. its affinity mask and cgroup v2 CPU quota, at least 1
    (:func:`keybroker.server.cpus.available_cpus`)."""
    threads: int = 4
    """Threads per process for calls off the data plane (admin, privacy, batch); the
    data-plane methods run on each process's server loop (keybroker.server.loop)."""
    grace_period: int = 10
    """Seconds in-flight calls may take to finish after SIGTERM."""
    max_message_bytes: int = 65536
    health_listen: str = ""
    """A plaintext port serving only ``grpc.health.v1`` (services ``readiness`` and
    ``liveness``) for kubelet probes, e.g. ``0.0.0.0:8081``; empty: none
    (keybroker.server.probes)."""
    liveness_timeout: int = 60
    """Seconds a loop may go without a turn (beyond its own interval) before the health port
    reports ``liveness`` NOT_SERVING."""
    engine: str = "loop"
    """The gRPC server: "loop" (grpcio's private layer, fastest) or "grpc" (grpcio's public
    server API, any grpcio release); see keybroker.server.engines."""


@dataclass(frozen=True)
class LimitsSettings:
    """Per-caller limits (keybroker.server.limits). The defaults never throttle a benchmark."""

    certificate_rate: float = 0.0
    """Data-plane calls per second per client-certificate identity (token bucket); 0: off."""
    subject_rate: float = 0.0
    """Data-plane calls per second per token ``sub`` (token bucket); 0: off."""
    burst: float = 2.0
    """Bucket size, in seconds' worth of calls at each rate."""
    denials_per_minute: int = 100
    """Denials per client certificate and per peer IP journaled one by one each minute; beyond,
    one aggregate record per caller and minute. 0: every denial on its own line."""
    stream_threads: int = 4
    """Threads for streaming calls (health Watch, reflection), apart from every other call."""
    streams_per_connection: int = 4
    """Streaming calls one client connection may have open at once."""
    stream_queue: int = 16
    """Streaming calls waiting for a stream thread; beyond, RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class TlsSettings:
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class AuthSettings:
    issuer: str = ""
    audience: str = ""
    jwks_file: Path | None = None
    jwks_url: str = ""
    jwks_ca_file: Path | None = None
    """CA bundle to verify the JWKS URL's server (default: the system trust store)."""
    algorithms: tuple[str, ...] = ("ES256", "EdDSA", "RS256")
    token_type: str = "at+jwt"  # noqa: S105 - a media type, not a secret
    """Required JWT header ``typ``; empty disables the check (for issuers that cannot set it)."""
    max_token_lifetime: int = 86400
    leeway: int = 30
    require_cnf: bool = False
    token_cache_size: int = 10000
    jwks_refresh_interval: int = 30
    """Minimum seconds between JWKS refreshes: those an unknown ``kid`` triggers, and the
    periodic ones however short the issuer's ``Cache-Control: max-age``."""
    jwks_max_refresh_interval: int = 300
    """Maximum seconds between periodic JWKS refreshes (and the interval when the issuer sends
    no ``max-age``): a ``kid`` removed at the issuer is refused at most this long after."""
    jwks_max_staleness: int = 86400
    """How long the last JWKS fetched from ``jwks_url`` stays in use while refreshes fail;
    after that every token is refused until a refresh succeeds."""
    admin_require_mfa: bool = True
    """KeyAdmin calls need ``amr`` to contain ``mfa`` (administrative access needs MFA)."""


@dataclass(frozen=True)
class HsmSettings:
    module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = ""
    pin_file: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    """Environment set before the module loads (e.g. SOFTHSM2_CONF)."""
    health_interval: float = 1.0
    sessions: int = 4
    """PKCS#11 sessions per process, each used by one thread at a time (with OS locking)."""
    locking: str = "os"
    """"os": initialise the module with CKF_OS_LOCKING_OK and use the session pool (a module
    that cannot lock falls back to "global"); "global": one PKCS#11 call at a time per process."""
    iv_source: str = "auto"
    """Who chooses AES-GCM IVs: "auto" (probe the module at start), "caller" or "hsm"."""


#: No configuration may make a scheduled destruction happen sooner than this.
DESTRUCTION_WINDOW_FLOOR = 3600


@dataclass(frozen=True)
class KeysSettings:
    default: str = "recordings"
    default_retention: int = 90 * 86400
    destruction_window: int = 7 * 86400
    """Default wait between scheduling a version's destruction and carrying it out."""
    min_destruction_window: int = 86400
    """Shortest window a caller may ask for (never below 1 hour)."""
    retention_epochs: bool = True
    """Wrap under retention-epoch keys (``<key>.e<epoch>``), destroyed when the epoch is over."""
    retention_epoch: str = "month"
    """``month`` (calendar months, UTC) or a duration such as ``30d`` (at least 1 day)."""
    retention_grace: int = 7 * 86400
    """Wait after an epoch ends before its key is destroyed."""
    max_retention: int = 3650 * 86400
    """Longest retention a caller may ask for (``retain_until`` at most this far ahead)."""

    def epoch_scheme(self) -> EpochScheme | None:
        if not self.retention_epochs:
            return None
        period: str | int = self.retention_epoch
        if period != MONTH:
            period = parse_duration(period, "[keys] retention_epoch")
        return EpochScheme(period, self.retention_grace)


@dataclass(frozen=True)
class StateSettings:
    """Key metadata store: SQLite for one host, PostgreSQL for several replicas."""

    dir: Path | None = None
    """Where the broker keeps what it creates itself: relative ``sqlite:`` files and, unless
    ``[audit] dir`` is set, the audit journal (``journal/``) and its keys (``audit/``). Unset: the
    config file's folder (the working directory without one)."""
    url: str = "sqlite:keybroker.db"
    """``sqlite:FILE`` (relative to the state directory) or ``postgresql://…``."""
    password_file: Path | None = None
    """PostgreSQL password, read from this file (never put it in the URL)."""
    refresh_interval: float = 0.25
    """Longest time a replica serves key metadata older than the store's (see README)."""
    migrate: bool = True
    """Apply schema migrations at start. false: the database role may lack DDL rights; the broker
    only checks the schema version and ``keybroker migrate`` applies migrations beforehand."""
    usage_flush_interval: float = 5.0
    """Seconds between adding in-memory usage counts to the store."""
    scheduler_interval: float = 10.0
    """Seconds between checks for due rotations, destructions and crash leftovers."""
    reconcile_after: float = 60.0
    """A rotation or destruction left half done this long ago was interrupted: finish it."""
    max_staleness: float = 5.0
    """A replica that could not refresh its erasure state for this long refuses unwraps
    (fail closed); an erasure call waits at most this long for replicas to confirm. 0: never."""

    def read_password(self) -> str | None:
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().strip()
        except OSError as exc:
            raise ConfigurationError(
                f"[state] password_file: cannot read {self.password_file} ({exc.strerror})"
            ) from None


@dataclass(frozen=True)
class TelemetrySettings:
    otlp_endpoint: str = ""
    otlp_insecure: bool = False
    otlp_timeout: float = 5.0
    service_name: str = "keybroker"
    log_level: str = "INFO"
    log_format: str = "text"
    """``text`` (for people) or ``json`` (one object a line; keybroker.server.logs)."""
    span_file: Path | None = None
    """Also append every span as one JSON line to this file (development and demos)."""
    prometheus_listen: str = ""
    """``HOST:PORT`` of a Prometheus scrape endpoint (``/metrics``); worker N listens on PORT + N
    (port 0: any free port, logged). Empty: off."""


@dataclass(frozen=True)
class AuditSettings:
    enabled: bool = True
    """false: no durable journal (best-effort spans only; development and benchmarks)."""
    dir: Path | None = None
    """Journal directory. Unset: ``journal/`` under the state directory; its key files, unless
    given, are then generated at first start under ``audit/`` there (:class:`AuditLayout`)."""
    chain_key_file: Path | None = None
    """32-byte HMAC key of the hash chain, as 64 hex characters. Never stored in the journal."""
    signing_key_file: Path | None = None
    """Ed25519 private key (PEM) that signs checkpoints."""
    signing_key_label: str = ""
    """Instead of signing_key_file: label of the checkpoint key pair on the [hsm] token (Ed25519 or
    ECDSA P-256; ``keybroker audit signing-key create``). The private key never leaves the HSM."""
    fsync: bool = True
    """fdatasync every group commit (durable against power loss); false: OS buffers only."""
    max_file_bytes: int = 64 * 1024 * 1024
    max_file_age: int = 86400
    checkpoint_interval: int = 60
    export_batch_size: int = 256
    """Records per OTLP export; also the most a crash can make the collector receive twice."""
    export_max_backoff: int = 10
    """Longest wait between export retries while the collector is unreachable."""
    pseudonymize: bool = True
    """Replace recording ids in exported spans by a keyed HMAC (``keybroker audit pseudonym``)."""
    pseudonym_key_file: Path | None = None
    """32-byte HMAC key for pseudonyms, as 64 hex characters."""

    def load_pseudonym_key(self) -> bytes | None:
        if not self.pseudonymize:
            return None
        if self.pseudonym_key_file is None:
            raise ConfigurationError(
                "[audit] pseudonym_key_file is required while pseudonymize = true "
                "(or set pseudonymize = false to export identifiers in clear)"
            )
        try:
            key = bytes.fromhex(self.pseudonym_key_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"[audit] pseudonym_key_file: {exc}") from None
        if len(key) != 32:
            raise ConfigurationError("[audit] pseudonym_key_file must hold 64 hex characters")
        return key

    def load_chain_key(self) -> bytes:
        """The chain key (HMAC) alone: all that reading and verifying a journal needs besides a
        public key."""
        if self.chain_key_file is None:
            raise ConfigurationError("[audit] chain_key_file is required with [audit] dir")
        try:
            chain_key = bytes.fromhex(self.chain_key_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"[audit] cannot read audit keys: {exc}") from None
        if len(chain_key) != 32:
            raise ConfigurationError("[audit] chain_key_file must hold 64 hex characters")
        return chain_key

    def load_keys(self) -> tuple[bytes, Any]:
        """(chain key, Ed25519 private key) from their files, or a ConfigurationError."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        if self.chain_key_file is None or self.signing_key_file is None:
            raise ConfigurationError(
                "[audit] chain_key_file and signing_key_file (or signing_key_label) are "
                "required with [audit] dir"
            )
        try:
            chain_key = bytes.fromhex(self.chain_key_file.read_text().strip())
            signing = load_pem_private_key(self.signing_key_file.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"[audit] cannot read audit keys: {exc}") from None
        if len(chain_key) != 32:
            raise ConfigurationError("[audit] chain_key_file must hold 64 hex characters")
        if not isinstance(signing, Ed25519PrivateKey):
            raise ConfigurationError("[audit] signing_key_file must be an Ed25519 private key")
        return chain_key, signing


@dataclass(frozen=True)
class AuditLayout:
    """The default journal and key files under a state directory: what a broker without
    ``[audit] dir`` uses, and generates when missing (key files 0600, directories 0700)."""

    state_dir: Path

    @property
    def journal(self) -> Path:
        return self.state_dir / "journal"

    @property
    def keys(self) -> Path:
        return self.state_dir / "audit"

    @property
    def chain_key(self) -> Path:
        return self.keys / "chain.key"

    @property
    def pseudonym_key(self) -> Path:
        return self.keys / "pseudonym.key"

    @property
    def signing_key(self) -> Path:
        return self.keys / "checkpoint-signing.pem"

    @property
    def signing_public_key(self) -> Path:
        """The checkpoint public key, for ``keybroker audit verify --public-key``."""
        return self.keys / "checkpoint-signing.pub.pem"


@dataclass(frozen=True)
class ClientSettings:
    """For the ``keybroker encrypt | decrypt`` commands (the SDK takes arguments instead)."""

    target: str = "127.0.0.1:50051"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    token_file: Path | None = None
    timeout: float = 10.0

    def require(self, token_file: Path | None = None) -> tuple[tuple[Path, Path, Path], Path]:
        """((ca, cert, key), token file), checked to exist; else a ConfigurationError.

        ``token_file`` (e.g. from a command-line option) replaces ``[client] token_file``.
        """
        paths = []
        for key in ("ca_file", "cert_file", "key_file", "token_file"):
            path = getattr(self, key) if key != "token_file" or token_file is None else token_file
            if path is None:
                raise ConfigurationError(f"[client] {key} is required to call the broker")
            if not path.is_file():
                hint = (
                    "; mint one with `keybroker dev token --scope … --purpose … --output FILE` "
                    "(dev broker) or ask your identity provider"
                    if key == "token_file"
                    else ""
                )
                raise ConfigurationError(f"[client] {key}: {path} does not exist{hint}")
            paths.append(path)
        return (paths[0], paths[1], paths[2]), paths[3]


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    hsm: HsmSettings = field(default_factory=HsmSettings)
    keys: KeysSettings = field(default_factory=KeysSettings)
    state: StateSettings = field(default_factory=StateSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    alerts: AlertThresholds = field(default_factory=AlertThresholds)
    client: ClientSettings = field(default_factory=ClientSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    source: Path | None = None

    def read_pin(self) -> str:
        """The HSM user PIN from ``[hsm] pin_file`` (trailing newline stripped)."""
        path = self.hsm.pin_file
        if path is None:
            raise ConfigurationError(
                "[hsm] pin_file is required: a file holding the token user PIN"
            )
        try:
            pin = path.read_text().strip()
        except OSError as exc:
            raise ConfigurationError(
                f"[hsm] pin_file: cannot read {path} ({exc.strerror}); "
                "check the path and permissions"
            ) from None
        if not pin:
            raise ConfigurationError(f"[hsm] pin_file: {path} is empty; write the user PIN into it")
        return pin

    def state_dir(self) -> Path:
        """``[state] dir``, or the config file's folder (the working directory without one)."""
        if self.state.dir is not None:
            return self.state.dir
        return self.source.resolve().parent if self.source is not None else Path.cwd()

    def audit_layout(self) -> AuditLayout:
        return AuditLayout(self.state_dir())


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "tls": TlsSettings,
    "auth": AuthSettings,
    "hsm": HsmSettings,
    "keys": KeysSettings,
    "state": StateSettings,
    "telemetry": TelemetrySettings,
    "audit": AuditSettings,
    "alerts": AlertThresholds,
    "client": ClientSettings,
    "limits": LimitsSettings,
}
_DURATION_KEYS = {
    "auth.max_token_lifetime",
    "auth.leeway",
    "auth.jwks_refresh_interval",
    "auth.jwks_max_refresh_interval",
    "auth.jwks_max_staleness",
    "server.grace_period",
    "server.liveness_timeout",
    "keys.default_retention",
    "keys.destruction_window",
    "keys.min_destruction_window",
    "keys.retention_grace",
    "keys.max_retention",
    "audit.max_file_age",
    "audit.checkpoint_interval",
    "audit.export_max_backoff",
}


def _coerce(  # noqa: PLR0911, PLR0912 - one branch per setting type, kept flat on purpose
    section: str, key: str, hint: Any, value: Any, base: Path
) -> Any:
    name = f"[{section}] {key}"
    if f"{section}.{key}" == "server.processes" and isinstance(value, str):
        if value.strip().lower() == PROCESSES_AUTO:
            return 0
        if not value.strip().isdigit():
            raise ConfigurationError(f'{name}: expected "auto" or a number, got {value!r}')
    if f"{section}.{key}" in _DURATION_KEYS:
        return parse_duration(value, name)
    text = str(hint)
    if "Path" in text:
        if value == "" and "None" in text:
            return None  # an empty override unsets an optional path
        if not isinstance(value, str) or not value or "\0" in value:
            raise ConfigurationError(f"{name}: expected a file path")
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # "~user/…" naming no user, or no home directory
            raise ConfigurationError(f"{name}: cannot expand '~' in {value!r}") from None
        return path if path.is_absolute() else (base / path)
    if hint is bool or text == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "false", "0", "no"}:
            return value.lower() in {"true", "1", "yes"}
        raise ConfigurationError(f"{name}: expected true or false")
    if hint is int or text == "int":
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: TOML inf
            raise ConfigurationError(f"{name}: expected an integer, got {value!r}") from None
    if hint is float or text == "float":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigurationError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # TOML and float() both read nan and inf
            raise ConfigurationError(f"{name}: expected a finite number, got {value!r}")
        return number
    if text.startswith("tuple"):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ConfigurationError(f"{name}: expected a list of strings")
        return tuple(i.strip() for i in items if i.strip())
    if text.startswith("collections.abc.Mapping") or "Mapping" in text:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigurationError(f"{name}: expected a table of strings")
        return dict(value)
    if not isinstance(value, str):
        raise ConfigurationError(f"{name}: expected a string")
    return value


#: Variables Kubernetes injects for a Service named ``keybroker`` (or ``keybroker-…``), e.g.
#: ``KEYBROKER_SERVICE_HOST=10.96.0.12``, ``KEYBROKER_SERVICE_PORT_GRPC=50051``,
#: ``KEYBROKER_PORT=tcp://10.96.0.12:50051``, ``KEYBROKER_PORT_50051_TCP_ADDR=10.96.0.12``: not
#: settings, so they never stop start-up. Recognised by name and value together, so that a
#: mistaken ``KEYBROKER_SERVER_PORT=50051`` is still refused as an unknown key.
_SERVICE_LINKS = (
    (re.compile(r"KEYBROKER_(?:\w+_)?SERVICE_HOST"), re.compile(r".*")),
    (re.compile(r"KEYBROKER_(?:\w+_)?SERVICE_PORT(?:_\w+)?"), re.compile(r"\d+")),
    (re.compile(r"KEYBROKER_(?:\w+_)?PORT"), re.compile(r"(tcp|udp|sctp)://\S+:\d+")),
    (
        re.compile(r"KEYBROKER_(?:\w+_)?PORT_\d+_(TCP|UDP|SCTP)"),
        re.compile(r"(tcp|udp|sctp)://\S+"),
    ),
    (re.compile(r"KEYBROKER_(?:\w+_)?PORT_\d+_(TCP|UDP|SCTP)_PROTO"), re.compile(r"tcp|udp|sctp")),
    (re.compile(r"KEYBROKER_(?:\w+_)?PORT_\d+_(TCP|UDP|SCTP)_PORT"), re.compile(r"\d+")),
    (re.compile(r"KEYBROKER_(?:\w+_)?PORT_\d+_(TCP|UDP|SCTP)_ADDR"), re.compile(r"\S+")),
)


def is_service_link(var: str, value: str) -> bool:
    """True for a Kubernetes service-link variable that merely shares the ``KEYBROKER_`` prefix."""
    return any(
        name.fullmatch(var) is not None and shape.fullmatch(value) is not None
        for name, shape in _SERVICE_LINKS
    )


def _env_overrides(
    environ: Mapping[str, str],
) -> tuple[dict[str, dict[str, str]], dict[tuple[str, str], str]]:
    """``{section: {key: value}}`` from ``KEYBROKER_<SECTION>_<KEY>``, and each one's variable."""
    found: dict[str, dict[str, str]] = {}
    names: dict[tuple[str, str], str] = {}
    for var, value in environ.items():
        if (
            not var.startswith(ENV_PREFIX)
            or var == f"{ENV_PREFIX}CONFIG"
            or is_service_link(var, value)
        ):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in _SECTIONS or not key:
            raise ConfigurationError(
                f"environment variable {var}: unknown setting; use {ENV_PREFIX}<SECTION>_<KEY> "
                "with a section among " + ", ".join(_SECTIONS)
            )
        found.setdefault(section, {})[key] = value
        names[(section, key)] = var
    return found, names


def _toml_line(text: str, section: str, key: str | None = None) -> int | None:
    """The line of ``[section]`` (or of ``key`` inside it) in TOML ``text``: best effort, for
    messages only."""
    header = re.compile(rf"\s*\[\s*{re.escape(section)}\s*\]\s*(#.*)?")
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if re.fullmatch(r"\s*\[.*", line):
            inside = header.fullmatch(line) is not None
            if inside and key is None:
                return number
            continue
        if inside and key is not None and re.match(rf"\s*[\"']?{re.escape(key)}[\"']?\s*=", line):
            return number
    return None


class _Sources:
    """Where each value came from (a TOML file and line, or an environment variable), so that an
    error can say where to fix it."""

    def __init__(self, path: Path | None, text: str, env: dict[tuple[str, str], str]) -> None:
        self._path, self._text, self._env = path, text, env

    def of(self, section: str, key: str | None = None) -> str:
        if key is not None and (section, key) in self._env:
            return f"environment variable {self._env[(section, key)]}"
        line = _toml_line(self._text, section, key) if self._path else None
        if self._path is None:
            return "settings"
        return f"{self._path}, line {line}" if line else str(self._path)


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    """The text of a TOML settings file and its tables (ConfigurationError naming the file)."""
    try:
        text = path.read_bytes().decode("utf-8")
        return text, tomllib.loads(text)
    except OSError as exc:
        raise ConfigurationError(f"config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigurationError(
            f"config file {path}: not UTF-8 (byte {exc.start}); TOML files are UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {path}: invalid TOML ({exc})") from None


def load(path: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load settings from ``path`` (TOML) and environment overrides, then validate."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    text = ""
    base = Path.cwd()
    if path is not None:
        text, raw = _read_toml(path)
        base = path.resolve().parent
    overrides, env_names = _env_overrides(environ)
    sources = _Sources(path, text, env_names)
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        section = sorted(unknown)[0]
        raise ConfigurationError(
            f"unknown section [{section}] ({sources.of(section)}); known sections: "
            + ", ".join(_SECTIONS)
        )
    for section, values in overrides.items():
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigurationError(f"[{section}] must be a table ({sources.of(section)})")
        table.update(values)
    built: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        values = raw.get(section, {})
        if not isinstance(values, dict):
            raise ConfigurationError(f"[{section}] must be a table ({sources.of(section)})")
        hints = get_type_hints(cls)
        names = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in names:
                raise ConfigurationError(
                    f"[{section}] {key}: unknown key ({sources.of(section, key)}); known keys: "
                    + ", ".join(sorted(names))
                )
            try:
                kwargs[key] = _coerce(section, key, hints[key], value, base)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{exc.message} ({sources.of(section, key)})") from None
        try:
            built[section] = cls(**kwargs)
        except ValueError as exc:
            raise ConfigurationError(f"[{section}] {exc} ({sources.of(section)})") from None
    settings = _default_journal(Settings(**built, source=path), sources)
    validate(settings)
    return settings


def _default_journal(settings: Settings, sources: _Sources) -> Settings:
    """Unless ``[audit] enabled = false``, an unset ``[audit] dir`` and unset key files take their
    default paths under the state directory (:class:`AuditLayout`). The broker generates missing
    key files only for the default journal (``dir`` at its default path)."""
    audit = settings.audit
    if not audit.enabled:
        if audit.dir is not None:
            raise ConfigurationError(
                f"[audit] enabled = false but [audit] dir is set ({sources.of('audit', 'dir')}); "
                "remove dir (or set KEYBROKER_AUDIT_DIR=) to run without a journal, or remove "
                "enabled = false to keep it"
            )
        return settings
    layout = settings.audit_layout()
    signing = audit.signing_key_file
    if signing is None and not audit.signing_key_label:
        signing = layout.signing_key
    pseudonym = audit.pseudonym_key_file
    if pseudonym is None and audit.pseudonymize:
        pseudonym = layout.pseudonym_key
    return replace(
        settings,
        audit=replace(
            audit,
            dir=audit.dir or layout.journal,
            chain_key_file=audit.chain_key_file or layout.chain_key,
            signing_key_file=signing,
            pseudonym_key_file=pseudonym,
        ),
    )


def validate(settings: Settings) -> None:
    """Start-up checks that need no I/O beyond the file system."""
    auth = settings.auth
    algorithms = set(auth.algorithms)
    if not algorithms:
        raise ConfigurationError("[auth] algorithms: list at least one algorithm, e.g. ['ES256']")
    if "none" in {a.lower() for a in algorithms}:
        raise ConfigurationError("[auth] algorithms: 'none' is never allowed; remove it")
    unknown = algorithms - PUBLIC_KEY_ALGORITHMS - HMAC_ALGORITHMS
    if unknown:
        raise ConfigurationError(f"[auth] algorithms: unsupported {sorted(unknown)}")
    if algorithms & HMAC_ALGORITHMS and algorithms & PUBLIC_KEY_ALGORITHMS:
        raise ConfigurationError(
            "[auth] algorithms: HMAC (HS*) must not be mixed with public-key algorithms "
            "(algorithm confusion); keep one family"
        )
    if not 0 <= auth.leeway <= MAX_LEEWAY_SECONDS:
        raise ConfigurationError(f"[auth] leeway: must be 0..{MAX_LEEWAY_SECONDS} seconds")
    if auth.max_token_lifetime <= 0:
        raise ConfigurationError("[auth] max_token_lifetime: must be positive, e.g. '24h'")
    if auth.token_cache_size < 0:
        raise ConfigurationError("[auth] token_cache_size: must be 0 (off) or more")
    _validate_jwks_refresh(auth)
    if settings.server.processes < 0 or settings.server.threads < 1:
        raise ConfigurationError(
            '[server] processes must be "auto" (or 0), or >= 1; threads must be >= 1'
        )
    if settings.server.engine not in SERVER_ENGINES:
        raise ConfigurationError(
            f'[server] engine: expected "loop" or "grpc", got {settings.server.engine!r}'
        )
    validate_listen(settings.server.listen)
    _validate_health_listen(settings.server)
    _validate_keys(settings.keys)
    if settings.hsm.sessions < 1 or settings.hsm.locking not in {"os", "global"}:
        raise ConfigurationError('[hsm] sessions must be >= 1 and locking one of "os", "global"')
    if settings.hsm.iv_source not in {"auto", "caller", "hsm"}:
        raise ConfigurationError('[hsm] iv_source must be "auto", "caller" or "hsm"')
    _validate_limits(settings.limits)
    _validate_telemetry(settings.telemetry)
    state = settings.state
    if min(state.refresh_interval, state.usage_flush_interval, state.scheduler_interval) <= 0:
        raise ConfigurationError(
            "[state] refresh_interval, usage_flush_interval and scheduler_interval must be > 0"
        )


_HOST_RE = re.compile(r"\[[0-9A-Fa-f:.%a-zA-Z]+\]|[A-Za-z0-9._-]+")


def validate_listen(listen: str, key: str = "[server] listen") -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` address (IPv6 in brackets, e.g. ``[::]:50051``), or
    None for a ``unix:`` socket path; a ConfigurationError otherwise."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return None
    host, sep, port = listen.rpartition(":")
    hint = "expected HOST:PORT, e.g. 127.0.0.1:50051, 0.0.0.0:50051 or [::]:50051"
    if not sep or not host or not _HOST_RE.fullmatch(host):
        raise ConfigurationError(f"{key}: {listen!r} is not an address; {hint}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"{key}: {listen!r} has no valid port (0..65535); {hint}")
    return host.strip("[]"), int(port)


def _validate_health_listen(server: ServerSettings) -> None:
    if server.liveness_timeout < 1:
        raise ConfigurationError("[server] liveness_timeout: must be at least 1 s, e.g. '60s'")
    if not server.health_listen:
        return
    health = validate_listen(server.health_listen, "[server] health_listen")
    listen = validate_listen(server.listen)
    if health is None:
        raise ConfigurationError(
            "[server] health_listen: kubelet probes need a TCP address, e.g. 0.0.0.0:8081"
        )
    if health[1] == 0:
        raise ConfigurationError("[server] health_listen: give a fixed port, e.g. 0.0.0.0:8081")
    if listen is not None and listen[1] == health[1]:
        raise ConfigurationError(
            f"[server] health_listen: port {health[1]} is [server] listen's; the plaintext "
            "health port needs a port of its own, e.g. 0.0.0.0:8081"
        )


LOG_FORMATS = ("text", "json")


def _validate_telemetry(telemetry: TelemetrySettings) -> None:
    if telemetry.log_format not in LOG_FORMATS:
        raise ConfigurationError(
            f'[telemetry] log_format must be "text" or "json", got {telemetry.log_format!r}'
        )
    if telemetry.prometheus_listen:
        key = "[telemetry] prometheus_listen"
        if validate_listen(telemetry.prometheus_listen, key) is None:
            raise ConfigurationError(f"{key}: expected HOST:PORT (no unix socket)")


def _validate_jwks_refresh(auth: AuthSettings) -> None:
    """A jwks_refresh_interval above jwks_max_refresh_interval (set before the maximum existed)
    is honoured: it then is the refresh interval."""
    if min(auth.jwks_refresh_interval, auth.jwks_max_refresh_interval) < 0:
        raise ConfigurationError(
            "[auth] jwks_refresh_interval and jwks_max_refresh_interval: must be 0 or more"
        )
    if auth.jwks_max_staleness < max(auth.jwks_refresh_interval, auth.jwks_max_refresh_interval):
        raise ConfigurationError(
            "[auth] jwks_max_staleness: must be at least jwks_max_refresh_interval (and "
            "jwks_refresh_interval), e.g. '1d'"
        )


def _validate_limits(limits: LimitsSettings) -> None:
    if min(limits.certificate_rate, limits.subject_rate, limits.denials_per_minute) < 0:
        raise ConfigurationError(
            "[limits] certificate_rate, subject_rate and denials_per_minute: 0 (off) or more"
        )
    if limits.burst <= 0:
        raise ConfigurationError("[limits] burst: must be positive (seconds' worth of calls)")
    if min(limits.stream_threads, limits.streams_per_connection, limits.stream_queue) < 1:
        raise ConfigurationError(
            "[limits] stream_threads, streams_per_connection and stream_queue: at least 1"
        )


def _validate_keys(keys: KeysSettings) -> None:
    if keys.default_retention <= 0:
        raise ConfigurationError("[keys] default_retention: must be positive, e.g. '90d'")
    if keys.min_destruction_window < DESTRUCTION_WINDOW_FLOOR:
        raise ConfigurationError(
            f"[keys] min_destruction_window: must be at least {DESTRUCTION_WINDOW_FLOOR} s ('1h')"
        )
    if keys.destruction_window < keys.min_destruction_window:
        raise ConfigurationError(
            "[keys] destruction_window: must be at least [keys] min_destruction_window"
        )
    keys.epoch_scheme()  # raises ConfigurationError for a bad [keys] retention_epoch
    if keys.retention_grace < 0:
        raise ConfigurationError("[keys] retention_grace: must be 0 or more, e.g. '7d'")
    if keys.max_retention < keys.default_retention:
        raise ConfigurationError(
            "[keys] max_retention: must be at least [keys] default_retention, e.g. '3650d'"
        )


NO_CONFIGURATION = (
    "no configuration given: pass --config FILE or set KEYBROKER_CONFIG=FILE "
    "(`keybroker dev init` writes a development one to .keybroker/keybroker.toml)"
)


def validate_for_serving(settings: Settings) -> None:
    """Checks ``keybroker serve`` needs: TLS files, token verification, HSM."""
    tls = settings.tls
    if settings.source is None and tls.cert_file is None:
        raise ConfigurationError(NO_CONFIGURATION)
    for key in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(tls, key)
        if path is None:
            hint = (
                "mutual TLS is mandatory: give the CA that signs client certificates"
                if key == "client_ca_file"
                else "give the server's PEM file"
            )
            raise ConfigurationError(f"[tls] {key} is required; {hint}")
        if not path.is_file():
            raise ConfigurationError(f"[tls] {key}: {path} does not exist")
    auth = settings.auth
    if not auth.issuer or not auth.audience:
        raise ConfigurationError(
            "[auth] issuer and audience are required (the values tokens carry)"
        )
    if (auth.jwks_file is None) == (not auth.jwks_url):
        raise ConfigurationError("[auth] give exactly one of jwks_file or jwks_url")
    if auth.jwks_url and not auth.jwks_url.startswith("https://"):
        raise ConfigurationError("[auth] jwks_url must be an https:// URL")
    if not settings.hsm.token_label:
        raise ConfigurationError("[hsm] token_label is required: the label of the PKCS#11 token")
    settings.read_pin()
