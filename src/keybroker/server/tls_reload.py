"""The server's certificate, key and client CA bundle, re-read when their files change.

gRPC's dynamic server credentials call :meth:`ServerTls.fetch` before each new TLS handshake;
it looks at the files' ``stat`` (device, inode, size, modification time) at most once per
``check_every`` seconds, and when one changed reads and checks all three as at start-up
(:func:`keybroker.server.startup.load_tls_material`). New connections then get the new files;
connections already open, and their calls, keep the ones they were established with. Files
that cannot be used (unreadable, not PEM, key not matching the certificate, certificate expired
or not yet valid) are refused with a warning naming the file and the problem, and the previous
files stay in use; they are tried again when they change, or after :data:`RETRY_SECONDS`.

The health monitor calls :meth:`ServerTls.probe` too, so files are re-read without traffic, and
a certificate about to expire is logged (:data:`WARN_AHEAD`) and measured
(:meth:`ServerTls.expires_in`, the ``keybroker.tls.certificate.expires_in`` gauge).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography import x509

from keybroker.errors import ConfigurationError
from keybroker.server.startup import TlsMaterial, load_tls_material
from keybroker.settings import TlsSettings

log = logging.getLogger(__name__)

WARN_AHEAD = dt.timedelta(days=7)
"""A certificate expiring within this (or within a quarter of its lifetime, if shorter) is
logged as a warning."""
WARN_EVERY = 3600.0
"""Seconds between repeated warnings for one certificate (every reload also warns at once)."""
RETRY_SECONDS = 30.0
"""Refused files are tried again after this long even if they did not change (a certificate
that was not yet valid may be by then)."""

Stamp = tuple[tuple[int, int, int, int] | None, ...]


def _stamp(paths: tuple[Path, ...]) -> Stamp:
    """What changes when a file is replaced or rewritten (None for one that cannot be read)."""
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)  # follows symlinks: a Kubernetes secret volume swaps a link
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key_pem, material.cert_pem)], root_certificates=material.ca_pem
    )


def warn_within(cert: x509.Certificate) -> dt.timedelta:
    """How long before its expiry a certificate is warned about: 7 days, or a quarter of its
    lifetime if that is shorter (a 1-hour certificate renewed every 30 minutes is not news; one
    with 15 minutes left is: its renewal is late)."""
    return min(WARN_AHEAD, (cert.not_valid_after_utc - cert.not_valid_before_utc) / 4)


class ServerTls:
    """The server's TLS material, re-read when its files change (see the module docstring)."""

    def __init__(
        self,
        tls: TlsSettings,
        *,
        check_every: float = 1.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """Reads and checks the files now (a ConfigurationError if they cannot be used)."""
        if tls.cert_file is None or tls.key_file is None or tls.client_ca_file is None:
            raise ConfigurationError("[tls] cert_file, key_file and client_ca_file are required")
        self._tls = tls
        self._paths = (tls.cert_file, tls.key_file, tls.client_ca_file)
        self._check_every = check_every
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        self._material = load_tls_material(tls, self._now())
        self._version = self._served = 0
        self._next_check = monotonic() + check_every
        self._refused: tuple[Stamp, str] | None = None
        self._retry_at = 0.0
        self._warned: dict[str, float] = {}
        self.warn_if_expiring(force=True)

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    @property
    def material(self) -> TlsMaterial:
        """The files in use for new connections."""
        return self._material

    def credentials(self) -> grpc.ServerCredentials:
        """mTLS server credentials (client certificates required) that follow the files."""
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._material),
            self.fetch,  # type: ignore[arg-type]  # None (no change) is documented, not typed
            require_client_authentication=True,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake callback: the new configuration once after a reload, else None
        (keep the current one). Never raises: gRPC runs it inside the handshake."""
        try:
            self.check()
            with self._lock:
                if self._served == self._version:
                    return None
                self._served = self._version
                return _configuration(self._material)
        except Exception as exc:  # noqa: BLE001 - never break a handshake; the old files serve
            # no traceback: the type says enough, and nothing of the files can reach the log
            log.error("[tls] checking the TLS files failed: %s", type(exc).__name__)  # noqa: TRY400
            return None

    def probe(self) -> None:
        """The health monitor's periodic call: re-read changed files, warn about expiry."""
        self.check()
        self.warn_if_expiring()

    def check(self, *, force: bool = False) -> bool:
        """Re-read the files if their stat changed (looked at no more than once per
        ``check_every`` seconds unless ``force``). True if new files were taken into use."""
        now = self._monotonic()
        with self._lock:
            if not force and now < self._next_check:
                return False
            self._next_check = now + self._check_every
            stamp = _stamp(self._paths)
            if stamp == self._stamp:
                return False
            if self._refused is not None and self._refused[0] == stamp and now < self._retry_at:
                return False
            self._retry_at = now + RETRY_SECONDS
        try:
            material = load_tls_material(self._tls, self._now())
        except ConfigurationError as exc:
            if self._refused != (stamp, exc.message):
                log.warning(
                    "[tls] the TLS files changed but cannot be used; new connections still get "
                    "the previous certificate (valid until %s): %s",
                    self._material.leaf.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%SZ"),
                    exc.message,
                )
            self._refused = (stamp, exc.message)
            return False
        with self._lock:
            self._material, self._stamp, self._refused = material, stamp, None
            self._version += 1
        leaf = material.leaf
        log.info(
            "[tls] re-read the TLS files: new connections get the certificate %s (serial %x, "
            "valid until %s)",
            leaf.subject.rfc4514_string(),
            leaf.serial_number,
            leaf.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%SZ"),
        )
        self.warn_if_expiring(force=True)
        return True

    def _watched(self) -> dict[str, tuple[str, x509.Certificate]]:
        material = self._material
        first_ca = min(material.client_cas, key=lambda c: c.not_valid_after_utc)
        return {
            "server": (f"the server certificate in {self._paths[0]}", material.leaf),
            "client_ca": (f"a CA certificate in {self._paths[2]}", first_ca),
        }

    def expires_in(self) -> dict[str, float]:
        """Seconds until each watched certificate expires (negative once it has): the server
        certificate, and the first to expire of the client CA bundle."""
        now = self._clock()
        return {
            name: cert.not_valid_after_utc.timestamp() - now
            for name, (_what, cert) in self._watched().items()
        }

    def warn_if_expiring(self, *, force: bool = False) -> None:
        """Log a warning for each watched certificate that expires soon (:func:`warn_within`),
        at most once per :data:`WARN_EVERY` seconds each unless ``force``."""
        now, wall = self._monotonic(), self._now()
        for name, (what, cert) in self._watched().items():
            left = cert.not_valid_after_utc - wall
            if left >= warn_within(cert):
                continue
            if not force and now - self._warned.get(name, float("-inf")) < WARN_EVERY:
                continue
            self._warned[name] = now
            until = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%SZ")
            if left <= dt.timedelta(0):
                log.error("[tls] %s expired on %s: renew it (no restart needed)", what, until)
            else:
                log.warning(
                    "[tls] %s expires in %s (on %s): renew it; new files are used without "
                    "a restart",
                    what,
                    _duration(left),
                    until,
                )


def _duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 86400:
        return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 60} min {seconds % 60} s"
