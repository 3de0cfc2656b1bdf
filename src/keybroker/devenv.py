"""The embedded development environment: one state directory with everything the broker needs.

``keybroker dev init`` (and ``make run``) provisions, reusing whatever already exists:

* ``hsm/``: a SoftHSM2 config and token (label ``keybroker-dev``), random user and SO PINs in files,
  and KEK ``recordings`` version 1;
* ``pki/``: a dev CA, a server certificate for 127.0.0.1/::1/localhost and a client certificate;
* ``issuer/``: an ES256 signing key and its JWKS, for ``keybroker dev token``;
* ``keybroker.toml``: settings pointing at all of it.

The test suite provisions a fresh one per test module with the same code.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keybroker.adapters.audit_keys import ensure_default_keys
from keybroker.adapters.files import private_dir, write_private
from keybroker.errors import ConfigurationError
from keybroker.settings import AuditLayout, AuditSettings

TOKEN_LABEL = "keybroker-dev"  # noqa: S105 - a label, not a secret
ISSUER = "https://issuer.keybroker.dev"
AUDIENCE = "keybroker"
DEFAULT_KEY = "recordings"
SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def softhsm_module() -> str:
    for path in SOFTHSM_MODULE_CANDIDATES:
        if Path(path).exists():
            return path
    raise ConfigurationError(
        "SoftHSM2 is not installed: run `apt-get install softhsm2` (make run does it for you)"
    )


@dataclass(frozen=True)
class DevEnv:
    """Paths of a provisioned state directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "keybroker.toml"

    @property
    def softhsm_conf(self) -> Path:
        return self.root / "hsm" / "softhsm2.conf"

    @property
    def token_dir(self) -> Path:
        return self.root / "hsm" / "tokens"

    @property
    def pin_file(self) -> Path:
        return self.root / "hsm" / "user.pin"

    @property
    def so_pin_file(self) -> Path:
        return self.root / "hsm" / "so.pin"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.pki / "ca.key"

    @property
    def audit_layout(self) -> AuditLayout:
        """The default journal and its keys: the config has no ``[audit] dir``."""
        return AuditLayout(self.root)

    @property
    def journal_dir(self) -> Path:
        return self.audit_layout.journal

    @property
    def chain_key(self) -> Path:
        return self.audit_layout.chain_key

    @property
    def pseudonym_key(self) -> Path:
        return self.audit_layout.pseudonym_key

    @property
    def checkpoint_key(self) -> Path:
        return self.audit_layout.signing_key

    @property
    def checkpoint_public_key(self) -> Path:
        return self.audit_layout.signing_public_key

    @property
    def signing_key(self) -> Path:
        return self.root / "issuer" / "signing-key.pem"

    @property
    def jwks(self) -> Path:
        return self.root / "issuer" / "jwks.json"

    def cert(self, name: str) -> Path:
        return self.pki / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.pki / f"{name}.key"


def _write_secret(path: Path, data: bytes) -> None:
    write_private(path, data)  # 0600 in 0700 directories, whatever the umask


# -- HSM ------------------------------------------------------------------------------------


def provision_hsm(env: DevEnv) -> None:
    """SoftHSM config and token (skipped if the token directory already holds one)."""
    private_dir(env.token_dir)
    write_private(
        env.softhsm_conf,
        f"directories.tokendir = {env.token_dir.resolve()}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n",
    )
    if any(env.token_dir.iterdir()):
        return
    if shutil.which("softhsm2-util") is None:
        raise ConfigurationError("softhsm2-util not found: run `apt-get install softhsm2`")
    for path in (env.pin_file, env.so_pin_file):
        _write_secret(path, secrets.token_hex(16).encode() + b"\n")
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            TOKEN_LABEL,
            "--pin",
            env.pin_file.read_text().strip(),
            "--so-pin",
            env.so_pin_file.read_text().strip(),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(env.softhsm_conf.resolve())},
    )


# -- PKI ------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keybroker dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(cert_path: Path, key_path: Path, cn: str = "keybroker dev CA") -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_secret(key_path, _pem_key(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def issue_cert(
    ca_cert_path: Path,
    ca_key_path: Path,
    cert_path: Path,
    key_path: Path,
    *,
    cn: str,
    server: bool = False,
    spiffe_id: str | None = None,
    days: int = 825,
) -> None:
    """Issue a server or client certificate signed by the given CA."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{ca_key_path}: expected an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = []
    if server:
        sans += [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    if spiffe_id:
        sans.append(x509.UniformResourceIdentifier(spiffe_id))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_secret(key_path, _pem_key(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def provision_pki(env: DevEnv) -> None:
    private_dir(env.pki)
    if not env.ca_cert.exists():
        make_ca(env.ca_cert, env.ca_key)
    if not env.cert("server").exists():
        issue_cert(
            env.ca_cert,
            env.ca_key,
            env.cert("server"),
            env.key("server"),
            cn="keybroker",
            server=True,
        )
    if not env.cert("client").exists():
        issue_cert(
            env.ca_cert,
            env.ca_key,
            env.cert("client"),
            env.key("client"),
            cn="dev-storage",
            spiffe_id="spiffe://keybroker.dev/storage/dev",
        )


# -- token issuer ---------------------------------------------------------------------------


def provision_issuer(env: DevEnv) -> None:
    if env.signing_key.exists() and env.jwks.exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    _write_secret(env.signing_key, _pem_key(key))
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": f"dev-{secrets.token_hex(4)}", "alg": "ES256", "use": "sig"})
    write_private(env.jwks, json.dumps({"keys": [jwk]}, indent=2) + "\n")


def signing_kid(env: DevEnv) -> str:
    kid: str = json.loads(env.jwks.read_text())["keys"][0]["kid"]
    return kid


def mint_token(
    env: DevEnv,
    *,
    scopes: Iterable[str],
    purposes: Iterable[str] = (),
    subject: str = "dev-storage",
    lifetime: int = 3600,
    client_id: str | None = "dev-storage",
    cnf_cert: Path | None = None,
    amr: Iterable[str] = (),
    now: float | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """A dev access token signed by the dev issuer (ES256, ``typ: at+jwt``)."""
    from keybroker.server.peer import certificate_thumbprint

    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "jti": str(uuid.uuid4()),
        "iat": issued,
        "exp": issued + lifetime,
        "scope": " ".join(scopes),
        "purpose": list(purposes),
    }
    if client_id:
        claims["client_id"] = client_id
    if cnf_cert is not None:
        claims["cnf"] = {"x5t#S256": certificate_thumbprint(cnf_cert.read_bytes())}
    if amr:
        claims["amr"] = list(amr)
    claims.update(extra_claims or {})
    header = {"typ": "at+jwt", "kid": signing_kid(env), **(headers or {})}
    key = serialization.load_pem_private_key(env.signing_key.read_bytes(), password=None)
    return jwt.encode(claims, key, algorithm="ES256", headers=header)  # type: ignore[arg-type]


# -- audit keys -----------------------------------------------------------------------------


def provision_audit(env: DevEnv) -> None:
    """The journal's chain key (HMAC), pseudonym key and checkpoint signing key (Ed25519), at the
    default journal's paths: the same code the broker runs at its first start."""
    layout = env.audit_layout
    ensure_default_keys(
        AuditSettings(
            dir=layout.journal,
            chain_key_file=layout.chain_key,
            signing_key_file=layout.signing_key,
            pseudonym_key_file=layout.pseudonym_key,
        ),
        layout,
    )


# -- settings and KEK -----------------------------------------------------------------------


def write_config(env: DevEnv, listen: str = "127.0.0.1:50051") -> None:
    if env.config.exists():
        return
    write_private(
        env.config,
        f"""# keybroker development settings (written by `keybroker dev init`).
# Paths are relative to this file. See README.md "Configuration" for every key.

[server]
listen = "{listen}"
processes = 1

[tls]
cert_file = "pki/server.pem"
key_file = "pki/server.key"
client_ca_file = "pki/ca.pem"

[auth]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "issuer/jwks.json"
algorithms = ["ES256", "EdDSA", "RS256"]
max_token_lifetime = "24h"

[hsm]
module = "{softhsm_module()}"
token_label = "{TOKEN_LABEL}"
pin_file = "hsm/user.pin"
env = {{ SOFTHSM2_CONF = "{env.softhsm_conf.resolve()}" }}

[keys]
default = "{DEFAULT_KEY}"
default_retention = "90d"

# Key metadata (versions, states, usage): SQLite here; postgresql://… for several replicas.
[state]
url = "sqlite:keybroker.db"

[telemetry]
otlp_endpoint = ""
# Decision spans as JSON lines, for `make demo` and curious developers.
span_file = "spans.jsonl"

# The durable, hash-chained audit journal is on by default: without [audit] dir it is journal/
# next to this file (one chain per worker process, journal/w<N>/), with its chain, checkpoint
# signing and pseudonym keys in audit/ (generated at first start if missing).

# For `keybroker encrypt | decrypt` (mint a token into client.token with `keybroker dev token`).
[client]
target = "{listen}"
ca_file = "pki/ca.pem"
cert_file = "pki/client.pem"
key_file = "pki/client.key"
token_file = "client.token"
""",
    )


def provision(root: Path, *, listen: str = "127.0.0.1:50051", create_key: bool = True) -> DevEnv:
    """Provision (or reuse) the whole dev environment under ``root``."""
    env = DevEnv(root)
    private_dir(root)
    provision_hsm(env)
    provision_pki(env)
    provision_issuer(env)
    provision_audit(env)
    write_config(env, listen)
    if create_key:
        ensure_kek(env, DEFAULT_KEY)
    return env


def ensure_kek(env: DevEnv, name: str) -> None:
    """Create version 1 of ``name`` unless the token already has it (in a child process, so
    this process keeps no PKCS#11 login)."""
    from keybroker import settings as settings_mod

    settings = settings_mod.load(env.config, environ={})
    script = (
        "import sys\n"
        "from keybroker.cli.main import main\n"
        "sys.exit(main(['kek', 'create', sys.argv[1], '--config', sys.argv[2], '--offline',"
        " '--if-missing']))\n"
    )
    import sys

    subprocess.run(
        [sys.executable, "-c", script, name, str(env.config)],
        check=True,
        env={**os.environ, **settings.hsm.env},
    )
