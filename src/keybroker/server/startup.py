"""Start-up checks that turn a mistake into a message saying what happened and what to do.

Run by ``keybroker serve`` before it binds its port: the TLS files (readable, PEM, key matching
the certificate, certificate valid now, a non-empty client CA bundle), and, when gRPC cannot bind,
the address and the operating system's reason. Every failure is a ConfigurationError (exit 2).
docs/TROUBLESHOOTING.md lists each message with its fix; a test keeps the two in step.
"""

from __future__ import annotations

import datetime as dt
import errno
import socket
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from keybroker.errors import ConfigurationError
from keybroker.settings import TlsSettings, validate_listen

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


def _read(key: str, path: Path | None) -> tuple[Path, bytes]:
    if path is None:  # validate_for_serving refuses this first
        raise ConfigurationError(f"[tls] {key} is required")
    try:
        return path, path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"[tls] {key}: cannot read {path} ({exc.strerror}); "
            "check the path and that this user may read it"
        ) from None


def _certificates(key: str, path: Path, data: bytes, what: str) -> list[x509.Certificate]:
    if _PEM_CERT not in data:
        raise ConfigurationError(
            f"[tls] {key}: {path} holds no PEM certificate (no '-----BEGIN CERTIFICATE-----' "
            f"line); give {what} in PEM form (convert DER with `openssl x509 -inform der`)"
        )
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigurationError(
            f"[tls] {key}: {path} is not a valid PEM certificate (damaged or truncated); "
            f"give {what} in PEM form"
        ) from None


def _private_key(path: Path, data: bytes) -> PrivateKeyTypes:
    if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise ConfigurationError(
            f"[tls] key_file: {path} holds no PEM private key; give the server's private key "
            "in PEM form ('-----BEGIN PRIVATE KEY-----')"
        )
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigurationError(
            f"[tls] key_file: {path} is encrypted; give an unencrypted key file readable only "
            "by the broker (e.g. `openssl pkey -in KEY -out server.key`)"
        ) from None
    except ValueError:
        raise ConfigurationError(
            f"[tls] key_file: {path} is not a valid PEM private key (damaged or unsupported)"
        ) from None


def _public_bytes(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class TlsMaterial:
    """The server's TLS files, read and checked: what gRPC serves, and when each part expires."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_pem: bytes
    leaf: x509.Certificate
    """The server certificate (the first of ``cert_pem``)."""
    client_cas: tuple[x509.Certificate, ...]


def load_tls_material(tls: TlsSettings, now: dt.datetime | None = None) -> TlsMaterial:
    """The TLS files, checked; a ConfigurationError naming the file and the problem otherwise."""
    now = now or dt.datetime.now(dt.UTC)
    cert_file, cert_data = _read("cert_file", tls.cert_file)
    key_file, key_data = _read("key_file", tls.key_file)
    ca_file, ca_data = _read("client_ca_file", tls.client_ca_file)
    chain = _certificates(
        "cert_file", cert_file, cert_data, "the server certificate (and its chain)"
    )
    leaf = chain[0]
    when = "%Y-%m-%d %H:%M:%SZ"
    if leaf.not_valid_after_utc <= now:
        raise ConfigurationError(
            f"[tls] cert_file: the certificate in {cert_file} expired on "
            f"{leaf.not_valid_after_utc.strftime(when)}; renew it (or check this host's clock)"
        )
    if leaf.not_valid_before_utc > now:
        raise ConfigurationError(
            f"[tls] cert_file: the certificate in {cert_file} is not valid before "
            f"{leaf.not_valid_before_utc.strftime(when)}; check this host's clock, or wait"
        )
    key = _private_key(key_file, key_data)
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        raise ConfigurationError(
            f"[tls] key_file: {key_file} does not match the certificate in "
            f"{cert_file}; give the key the certificate was issued for"
        )
    if _PEM_CERT not in ca_data:
        raise ConfigurationError(
            f"[tls] client_ca_file: {ca_file} holds no certificate (empty CA "
            "bundle): no client could connect; give the PEM CA certificate(s) that sign "
            "client certificates"
        )
    cas = _certificates("client_ca_file", ca_file, ca_data, "the CA certificate(s) of your clients")
    return TlsMaterial(cert_data, key_data, ca_data, leaf, tuple(cas))


def check_tls_material(tls: TlsSettings, now: dt.datetime | None = None) -> None:
    """Raise a ConfigurationError naming the file and the problem, or return."""
    load_tls_material(tls, now)


def bind_error(listen: str, key: str = "listen", *, reuseport: bool = True) -> ConfigurationError:
    """Why gRPC could not bind ``listen`` (the setting ``[server] key``): the address and the OS
    reason, found by trying it.

    The probe binds like the server does (SO_REUSEPORT for the broker's port, so a port held by
    another keybroker of this user is not reported as busy: that case is caught earlier by the
    journal lock; the health port binds without it)."""
    reason = "gRPC refused the address (see the log above)"
    try:
        target = validate_listen(listen, f"[server] {key}")
    except ConfigurationError as exc:
        return exc
    if target is not None:
        host, port = target
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            reason = f"cannot resolve {host!r} ({exc.strerror})"
            infos = []
        for family, kind, proto, _name, address in infos:
            try:
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
                    probe.bind(address)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                if exc.errno == errno.EADDRINUSE:
                    reason += " (another program listens there: `ss -ltnp` names it)"
                elif exc.errno == errno.EACCES:
                    reason += " (ports below 1024 need privileges; use a port >= 1024)"
                elif exc.errno == errno.EADDRNOTAVAIL:
                    reason += " (no network interface of this host has that address)"
                break
    return ConfigurationError(
        f"[server] {key}: cannot bind {listen}: {reason}; change [server] {key} "
        f"(or KEYBROKER_SERVER_{key.upper()}) or free the port"
    )
