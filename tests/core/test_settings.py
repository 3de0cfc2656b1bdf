"""Settings: TOML plus KEYBROKER_<SECTION>_<KEY> overrides, durations, paths, start-up failures."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from keybroker import settings as settings_mod
from keybroker.errors import ConfigurationError
from keybroker.settings import Settings, load, parse_duration, validate_for_serving

PIN = "7391-secret-pin-5520"

SERVING_TOML = """
[server]
listen = "127.0.0.1:0"

[tls]
cert_file = "pki/server.pem"
key_file = "pki/server.key"
client_ca_file = "pki/ca.pem"

[auth]
issuer = "https://issuer.example"
audience = "keybroker"
jwks_file = "issuer/jwks.json"
algorithms = ["ES256"]
max_token_lifetime = "24h"
leeway = 30

[hsm]
token_label = "keybroker-test"
pin_file = "hsm/user.pin"
env = { SOFTHSM2_CONF = "/tmp/softhsm2.conf" }

[keys]
default = "recordings"
default_retention = "90d"
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def serving_dir(tmp_path: Path) -> Path:
    """A config folder with every file `serve` needs (contents are never read by settings)."""
    root = tmp_path / "conf"
    for name in ("pki/server.pem", "pki/server.key", "pki/ca.pem", "issuer/jwks.json"):
        write(root / name, "placeholder\n")
    write(root / "hsm/user.pin", PIN + "\n")
    write(root / "keybroker.toml", SERVING_TOML)
    return root


def config_error(
    text: str, tmp_path: Path, environ: dict[str, str] | None = None
) -> ConfigurationError:
    path = write(tmp_path / "keybroker.toml", text)
    with pytest.raises(ConfigurationError) as info:
        load(path, environ=environ or {})
    return info.value


# -- loading ----------------------------------------------------------------------------------


def test_defaults_without_file_or_environment() -> None:
    """With no file and no overrides every section holds its documented default."""
    s = load(None, environ={})
    assert s.server.listen == "127.0.0.1:50051"
    assert s.auth.algorithms == ("ES256", "EdDSA", "RS256")
    assert s.auth.leeway == 30
    assert s.keys.default == "recordings"
    assert s.keys.default_retention == 90 * 86400
    assert s.source is None


def test_toml_values_are_loaded_and_typed(serving_dir: Path) -> None:
    """Values come from the TOML file, coerced to the field types."""
    s = load(serving_dir / "keybroker.toml", environ={})
    assert s.server.listen == "127.0.0.1:0"
    assert s.auth.issuer == "https://issuer.example"
    assert s.auth.algorithms == ("ES256",)
    assert s.auth.max_token_lifetime == 86400
    assert s.hsm.token_label == "keybroker-test"
    assert dict(s.hsm.env) == {"SOFTHSM2_CONF": "/tmp/softhsm2.conf"}
    assert s.keys.default_retention == 90 * 86400
    assert s.source == serving_dir / "keybroker.toml"


def test_environment_overrides_toml(serving_dir: Path) -> None:
    """KEYBROKER_<SECTION>_<KEY> wins over the file, for every value type."""
    environ = {
        "KEYBROKER_SERVER_LISTEN": "0.0.0.0:9443",
        "KEYBROKER_SERVER_THREADS": "8",
        "KEYBROKER_AUTH_LEEWAY": "5",
        "KEYBROKER_AUTH_ALGORITHMS": "ES256, EdDSA",
        "KEYBROKER_AUTH_REQUIRE_CNF": "true",
        "KEYBROKER_AUTH_MAX_TOKEN_LIFETIME": "15m",
        "KEYBROKER_HSM_HEALTH_INTERVAL": "0.25",
        "KEYBROKER_KEYS_DEFAULT_RETENTION": "30d",
        "KEYBROKER_CONFIG": "/ignored/by/load.toml",
        "UNRELATED": "x",
    }
    s = load(serving_dir / "keybroker.toml", environ=environ)
    assert s.server.listen == "0.0.0.0:9443"
    assert s.server.threads == 8
    assert s.auth.leeway == 5
    assert s.auth.algorithms == ("ES256", "EdDSA")
    assert s.auth.require_cnf is True
    assert s.auth.max_token_lifetime == 900
    assert s.hsm.health_interval == 0.25
    assert s.keys.default_retention == 30 * 86400
    assert s.auth.issuer == "https://issuer.example"  # untouched keys keep the file's value


@pytest.mark.parametrize("value", ["false", "0", "no", "FALSE"])
def test_environment_booleans_false(value: str) -> None:
    """Boolean overrides accept the usual spellings of false."""
    s = load(None, environ={"KEYBROKER_AUTH_REQUIRE_CNF": value})
    assert s.auth.require_cnf is False


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping, load() reads the process environment."""
    monkeypatch.setenv("KEYBROKER_AUTH_LEEWAY", "7")
    assert load(None).auth.leeway == 7


# -- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("24h", 86400),
        ("90d", 90 * 86400),
        ("15m", 900),
        ("30s", 30),
        ("45", 45),
        (" 2h ", 7200),
        ("2 h", 7200),
        (45, 45),
        (0, 0),
    ],
)
def test_durations(value: object, seconds: int) -> None:
    """Durations are integers of seconds or a number with s, m, h or d."""
    assert parse_duration(value, "[keys] default_retention") == seconds


@pytest.mark.parametrize("value", ["1w", "1.5h", "h", "", "-5m", "24 hours", True, 1.5, None])
def test_bad_durations_name_the_key(value: object) -> None:
    """A bad duration is refused with the key's name in the message."""
    with pytest.raises(ConfigurationError) as info:
        parse_duration(value, "[keys] default_retention")
    assert "[keys] default_retention" in str(info.value)


def test_duration_keys_in_toml(tmp_path: Path) -> None:
    """Every duration setting accepts the string form in TOML."""
    path = write(
        tmp_path / "k.toml",
        '[auth]\nmax_token_lifetime = "1h"\nleeway = "1m"\njwks_refresh_interval = "2m"\n'
        '[server]\ngrace_period = "30s"\n[keys]\ndefault_retention = "365d"\n',
    )
    s = load(path, environ={})
    assert (s.auth.max_token_lifetime, s.auth.leeway, s.auth.jwks_refresh_interval) == (
        3600,
        60,
        120,
    )
    assert s.server.grace_period == 30
    assert s.keys.default_retention == 365 * 86400


# -- paths ------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(
    serving_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths are resolved against the TOML file's folder, not the working directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load(serving_dir / "keybroker.toml", environ={})
    root = serving_dir.resolve()
    assert s.tls.cert_file == root / "pki/server.pem"
    assert s.tls.client_ca_file == root / "pki/ca.pem"
    assert s.auth.jwks_file == root / "issuer/jwks.json"
    assert s.hsm.pin_file == root / "hsm/user.pin"


def test_relative_config_path_still_resolves_against_its_folder(
    serving_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config given by a relative path resolves paths against its own folder."""
    monkeypatch.chdir(serving_dir.parent)
    s = load(Path("conf/keybroker.toml"), environ={})
    assert s.tls.cert_file == serving_dir.resolve() / "pki/server.pem"


def test_relative_path_from_environment_resolves_against_the_config_folder(
    serving_dir: Path,
) -> None:
    """A relative path given by an override is resolved like one in the file."""
    s = load(serving_dir / "keybroker.toml", environ={"KEYBROKER_TLS_CERT_FILE": "other.pem"})
    assert s.tls.cert_file == serving_dir.resolve() / "other.pem"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    """Absolute paths are used as given."""
    path = write(tmp_path / "k.toml", '[tls]\nclient_ca_file = "/etc/keybroker/ca.pem"\n')
    assert load(path, environ={}).tls.client_ca_file == Path("/etc/keybroker/ca.pem")


# -- failures name the key --------------------------------------------------------------------


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    """An unknown key names section and key, and lists the known keys."""
    err = config_error("[auth]\nleway = 5\n", tmp_path)
    assert "[auth] leway" in str(err)
    assert "leeway" in str(err)


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    """An unknown section is named in the message."""
    err = config_error("[authn]\nissuer = 'x'\n", tmp_path)
    assert "[authn]" in str(err)


def test_unknown_environment_section_is_refused() -> None:
    """An override for an unknown section names the variable."""
    with pytest.raises(ConfigurationError) as info:
        load(None, environ={"KEYBROKER_AUTHN_ISSUER": "x"})
    assert "KEYBROKER_AUTHN_ISSUER" in str(info.value)


def test_unknown_environment_key_is_refused() -> None:
    """An override for an unknown key names section and key."""
    with pytest.raises(ConfigurationError) as info:
        load(None, environ={"KEYBROKER_AUTH_LEWAY": "5"})
    assert "[auth] leway" in str(info.value)


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    """A value of the wrong type names the key."""
    err = config_error('[server]\nthreads = "many"\n', tmp_path)
    assert "[server] threads" in str(err)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A syntax error names the file."""
    err = config_error("[auth\n", tmp_path)
    assert "keybroker.toml" in str(err)


def test_missing_config_file_names_the_file(tmp_path: Path) -> None:
    """A missing config file is a configuration error naming it."""
    with pytest.raises(ConfigurationError) as info:
        load(tmp_path / "absent.toml", environ={})
    assert "absent.toml" in str(info.value)


@pytest.mark.parametrize("algorithms", ['["none"]', '["ES256", "none"]', '["None"]', '["NONE"]'])
def test_none_algorithm_is_refused(tmp_path: Path, algorithms: str) -> None:
    """'none' is never an allowed JWT algorithm, in any spelling."""
    err = config_error(f"[auth]\nalgorithms = {algorithms}\n", tmp_path)
    assert "[auth] algorithms" in str(err)
    assert "none" in str(err)


@pytest.mark.parametrize("algorithms", ["HS256,ES256", "RS256,HS512", "EdDSA,HS384"])
def test_hmac_mixed_with_public_key_algorithms_is_refused(algorithms: str) -> None:
    """HS* must not be mixed with public-key algorithms (algorithm confusion)."""
    with pytest.raises(ConfigurationError) as info:
        load(None, environ={"KEYBROKER_AUTH_ALGORITHMS": algorithms})
    assert "[auth] algorithms" in str(info.value)
    assert "HMAC" in str(info.value)


def test_hmac_alone_is_accepted() -> None:
    """A pure HMAC family is allowed (for issuers sharing a secret)."""
    assert load(None, environ={"KEYBROKER_AUTH_ALGORITHMS": "HS256"}).auth.algorithms == ("HS256",)


def test_unknown_and_empty_algorithm_lists_are_refused() -> None:
    """An unsupported algorithm, or none at all, is refused."""
    for value in ("ES257", ""):
        with pytest.raises(ConfigurationError) as info:
            load(None, environ={"KEYBROKER_AUTH_ALGORITHMS": value})
        assert "[auth] algorithms" in str(info.value)


@pytest.mark.parametrize("leeway", ["61", "2m", "-1"])
def test_leeway_over_sixty_seconds_is_refused(leeway: str) -> None:
    """Clock-skew leeway is bounded to 0..60 seconds."""
    with pytest.raises(ConfigurationError) as info:
        load(None, environ={"KEYBROKER_AUTH_LEEWAY": leeway})
    assert "[auth] leeway" in str(info.value)


def test_leeway_sixty_is_accepted() -> None:
    """60 seconds is the largest allowed leeway."""
    assert load(None, environ={"KEYBROKER_AUTH_LEEWAY": "1m"}).auth.leeway == 60


def test_non_positive_retention_is_refused() -> None:
    """The default retention must be positive."""
    with pytest.raises(ConfigurationError) as info:
        load(None, environ={"KEYBROKER_KEYS_DEFAULT_RETENTION": "0d"})
    assert "[keys] default_retention" in str(info.value)


# -- serving checks ---------------------------------------------------------------------------


def test_complete_config_passes_serving_checks(serving_dir: Path) -> None:
    """A config with TLS files, issuer, audience, JWKS, token label and PIN file passes."""
    s = load(serving_dir / "keybroker.toml", environ={})
    validate_for_serving(s)
    assert s.read_pin() == PIN


@pytest.mark.parametrize("key", ["cert_file", "key_file", "client_ca_file"])
def test_serving_requires_tls_files(serving_dir: Path, key: str) -> None:
    """Each TLS file is required; a missing client CA says mutual TLS is mandatory."""
    s = load(serving_dir / "keybroker.toml", environ={})
    s = dataclasses.replace(s, tls=dataclasses.replace(s.tls, **{key: None}))
    with pytest.raises(ConfigurationError) as info:
        validate_for_serving(s)
    assert f"[tls] {key}" in str(info.value)
    if key == "client_ca_file":
        assert "mutual TLS" in str(info.value)


def test_serving_requires_client_ca_file_to_exist(serving_dir: Path) -> None:
    """A client CA path that does not exist is refused with its key and path."""
    (serving_dir / "pki/ca.pem").unlink()
    s = load(serving_dir / "keybroker.toml", environ={})
    with pytest.raises(ConfigurationError) as info:
        validate_for_serving(s)
    assert "[tls] client_ca_file" in str(info.value)
    assert "ca.pem" in str(info.value)


def test_serving_requires_pin_file(serving_dir: Path) -> None:
    """No pin_file at all is refused with a message naming [hsm] pin_file."""
    s = load(serving_dir / "keybroker.toml", environ={})
    s = dataclasses.replace(s, hsm=dataclasses.replace(s.hsm, pin_file=None))
    with pytest.raises(ConfigurationError) as info:
        validate_for_serving(s)
    assert "[hsm] pin_file" in str(info.value)


def test_serving_refuses_missing_pin_file(serving_dir: Path) -> None:
    """A pin_file that cannot be read is refused naming the key and the path."""
    (serving_dir / "hsm/user.pin").unlink()
    s = load(serving_dir / "keybroker.toml", environ={})
    with pytest.raises(ConfigurationError) as info:
        validate_for_serving(s)
    assert "[hsm] pin_file" in str(info.value)
    assert "user.pin" in str(info.value)


@pytest.mark.parametrize("content", ["", "\n", "  \n\n"])
def test_serving_refuses_empty_pin_file(serving_dir: Path, content: str) -> None:
    """An empty (or whitespace-only) PIN file is refused naming the key."""
    (serving_dir / "hsm/user.pin").write_text(content)
    s = load(serving_dir / "keybroker.toml", environ={})
    with pytest.raises(ConfigurationError) as info:
        validate_for_serving(s)
    assert "[hsm] pin_file" in str(info.value)
    assert "empty" in str(info.value)


def test_serving_requires_token_label_issuer_and_one_jwks(serving_dir: Path) -> None:
    """token_label, issuer/audience and exactly one JWKS source are required."""
    base = load(serving_dir / "keybroker.toml", environ={})
    variants = {
        "[hsm] token_label": dataclasses.replace(
            base, hsm=dataclasses.replace(base.hsm, token_label="")
        ),
        "[auth] issuer": dataclasses.replace(base, auth=dataclasses.replace(base.auth, issuer="")),
        "[auth] give exactly one": dataclasses.replace(
            base, auth=dataclasses.replace(base.auth, jwks_url="https://issuer.example/jwks")
        ),
        "[auth] jwks_url": dataclasses.replace(
            base,
            auth=dataclasses.replace(base.auth, jwks_file=None, jwks_url="http://plain.example"),
        ),
    }
    for expected, settings in variants.items():
        with pytest.raises(ConfigurationError) as info:
            validate_for_serving(settings)
        assert expected in str(info.value)


# -- secrets and immutability -----------------------------------------------------------------


def test_settings_repr_never_contains_the_pin(serving_dir: Path) -> None:
    """The PIN is read from its file on demand and never appears in repr or str of settings."""
    s = load(serving_dir / "keybroker.toml", environ={})
    assert s.read_pin() == PIN
    for text in (repr(s), str(s), repr(s.hsm), str(s.hsm)):
        assert PIN not in text
    assert not any(PIN in repr(getattr(s.hsm, f.name)) for f in dataclasses.fields(s.hsm))


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after loading."""
    s = load(None, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.auth.leeway = 10  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.keys = settings_mod.KeysSettings()  # type: ignore[misc]


def test_settings_type_is_exported() -> None:
    """load() returns the public Settings type."""
    assert isinstance(load(None, environ={}), Settings)


def test_max_retention_defaults_to_ten_years_and_bounds_the_default(tmp_path: Path) -> None:
    """``[keys] max_retention``: 10 years unless set; never below ``default_retention``."""
    assert load(None, environ={}).keys.max_retention == 3650 * 86400
    assert load(None, environ={"KEYBROKER_KEYS_MAX_RETENTION": "400d"}).keys.max_retention == (
        400 * 86400
    )
    err = config_error("[keys]\nmax_retention = '30d'\n", tmp_path)
    assert "[keys] max_retention" in str(err)
    assert "default_retention" in str(err)


def test_health_port_is_off_by_default_and_takes_a_tcp_address() -> None:
    """`[server] health_listen`: empty (no health port) unless set; `liveness_timeout` is a
    duration."""
    loaded = load(None, environ={})
    assert loaded.server.health_listen == ""
    assert loaded.server.liveness_timeout == 60
    set_ = load(
        None,
        environ={
            "KEYBROKER_SERVER_HEALTH_LISTEN": "[::]:8081",
            "KEYBROKER_SERVER_LIVENESS_TIMEOUT": "2m",
        },
    )
    assert (set_.server.health_listen, set_.server.liveness_timeout) == ("[::]:8081", 120)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"KEYBROKER_SERVER_HEALTH_LISTEN": "8081"}, "is not an address"),
        ({"KEYBROKER_SERVER_HEALTH_LISTEN": "unix:/run/kb.sock"}, "need a TCP address"),
        ({"KEYBROKER_SERVER_HEALTH_LISTEN": "0.0.0.0:0"}, "give a fixed port"),
        (
            {
                "KEYBROKER_SERVER_LISTEN": "0.0.0.0:50051",
                "KEYBROKER_SERVER_HEALTH_LISTEN": "[::]:50051",
            },
            "port 50051 is [server] listen's",
        ),
        ({"KEYBROKER_SERVER_LIVENESS_TIMEOUT": "0"}, "[server] liveness_timeout"),
    ],
)
def test_bad_health_port_settings_are_refused(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load(None, environ=environ)
    assert expected in str(info.value)
    assert "[server] " in str(info.value)
