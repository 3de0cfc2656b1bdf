"""The client's mTLS files, watched: when one changes on disk (a certificate renewed by
cert-manager or SPIRE), the next call runs over a new channel with the new files, and the old
channel is closed once the calls still running on it are done (``keybroker.client._base``).

The files' ``stat`` (device, inode, size, modification time) is looked at no more than once per
:data:`CHECK_SECONDS`, before a call. New files are read and checked (PEM certificate, PEM key
matching it, a CA certificate); files that cannot be used are logged as a warning naming the
file and the problem, and the client goes on with the previous ones until the files change
again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from keybroker.client._calls import TlsFiles

log = logging.getLogger("keybroker.client")

CHECK_SECONDS = 1.0
"""Seconds between looks at the files' stat (each before a call, never in the background)."""

Stamp = tuple[tuple[int, int, int, int] | None, ...]


def stamp(paths: tuple[Path, ...]) -> Stamp:
    """What changes when a file is replaced or rewritten (None for one that cannot be read)."""
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()  # follows symlinks: a Kubernetes secret volume swaps a link
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _public(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def checked_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Channel credentials from ``files`` after checking they can work; a ValueError naming the
    file and the problem otherwise (never their content)."""
    data: dict[str, bytes] = {}
    for name, path in (("ca_file", files.ca_file), ("cert_file", files.cert_file),
                       ("key_file", files.key_file)):  # fmt: skip
        try:
            data[name] = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{name} {path}: cannot read it ({exc.strerror})") from None
    try:
        cas = x509.load_pem_x509_certificates(data["ca_file"])
    except ValueError:
        cas = []
    if not cas:
        raise ValueError(f"ca_file {files.ca_file}: no PEM certificate in it")
    try:
        cert = x509.load_pem_x509_certificates(data["cert_file"])[0]
    except ValueError:
        raise ValueError(f"cert_file {files.cert_file}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(data["key_file"], password=None)
    except (ValueError, TypeError):
        raise ValueError(f"key_file {files.key_file}: not an unencrypted PEM key") from None
    if _public(key.public_key()) != _public(cert.public_key()):
        raise ValueError(
            f"key_file {files.key_file} does not match the certificate in {files.cert_file}"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=data["ca_file"],
        private_key=data["key_file"],
        certificate_chain=data["cert_file"],
    )


class TlsWatch:
    """Tells the client when its mTLS files changed, with credentials made from the new ones."""

    def __init__(
        self,
        files: TlsFiles,
        *,
        check_every: float = CHECK_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._files = files
        self._paths = (files.ca_file, files.cert_file, files.key_file)
        self._check_every = check_every
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._stamp = stamp(self._paths)
        self._next = monotonic() + check_every

    def changed(self) -> grpc.ChannelCredentials | None:
        """Credentials from the files if they changed since last asked (and can be used), else
        None. Looks at the files no more than once per ``check_every`` seconds."""
        now = self._monotonic()
        if now < self._next:
            return None
        with self._lock:
            if now < self._next:
                return None
            self._next = now + self._check_every
            current = stamp(self._paths)
            if current == self._stamp:
                return None
            self._stamp = current
        try:
            creds = checked_credentials(self._files)
        except ValueError as exc:
            log.warning(
                "keybroker client: the TLS files changed but cannot be used; calls go on with "
                "the previous ones: %s",
                exc,
            )
            return None
        log.info("keybroker client: TLS files changed; new calls use a new channel with them")
        return creds
