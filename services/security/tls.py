"""Transport security of every server and of the gateway's encoder channels: certificates from
files, re-read when they change, and the rule that plaintext stays on loopback."""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.plumbing.settings import Settings

log = structlog.get_logger("medvlm.tls")

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    bare = host.strip("[]")
    if bare in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def check_listen(settings: Settings) -> None:
    """Refuse plaintext off loopback unless --insecure says so, and then say so at start."""
    if settings.tls_cert or is_loopback(settings.host):
        return
    if not settings.insecure:
        raise SystemExit(
            f"refusing to listen on {settings.host} without TLS: give --tls-cert and --tls-key, "
            "or --insecure on an isolated test network"
        )
    log.warning("insecure_listen", host=settings.host,
                reason="plaintext off loopback (--insecure): calls can be read and forged on the network")


def _stamp(paths: Sequence[str]) -> tuple:
    """What changes when a file is replaced (kubelet swaps a Secret's files by renaming a link)."""
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Raise ValueError unless the key belongs to the first certificate of the chain."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise ValueError("the private key does not belong to the certificate")


class CertificateFiles:
    """A server's certificate, key and optional client CA, read again whenever a file changes.

    gRPC asks `fetch` before each TLS handshake; it answers None (keep the current certificate)
    unless the files changed and the new pair is consistent. A half-written rotation (a new
    certificate beside the old key) is skipped and picked up on a later handshake.
    """

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.paths = [p for p in (cert, key, client_ca) if p]
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self.reloads = 0
        config = self._read()
        if config is None:
            raise SystemExit(f"cannot use the TLS certificate {cert} with key {key}; see the log")
        self.initial = config

    def _read(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = _stamp(self.paths)
            cert, key = Path(self.paths[0]).read_bytes(), Path(self.paths[1]).read_bytes()
            ca = Path(self.paths[2]).read_bytes() if len(self.paths) > 2 else None
            _check_pair(cert, key)
        except (OSError, ValueError) as exc:  # the message names files and reasons, never key bytes
            log.error("tls_certificate_unusable", cert=self.paths[0], error_type=type(exc).__name__,
                      error=str(exc) if isinstance(exc, OSError) else "certificate and key do not match or do not parse")
            return None
        self._stamp = stamp
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher: a new configuration, or None for no change."""
        with self._lock:
            try:
                if _stamp(self.paths) == self._stamp:
                    return None
            except OSError:
                return None  # a file is being replaced; keep serving the current certificate
            config = self._read()
            if config is not None:
                self.reloads += 1
                log.info("tls_certificate_reloaded", cert=self.paths[0], reloads=self.reloads)
            return config


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials of a server (certificates reloaded on change), or None for plaintext."""
    if not settings.tls_cert:
        return None
    files = CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=bool(settings.tls_client_ca)
    )


class ClientCertificateFiles:
    """The gateway's credentials towards the encoders: their CA and its own client certificate.

    gRPC has no reloading channel credentials, so `current` is asked before calls; it reads the
    files again when they changed (looking at most every CHECK_INTERVAL_S) and bumps `version`,
    and each channel's owner opens a new channel for new calls when the version moved on.
    """

    CHECK_INTERVAL_S = 1.0

    def __init__(self, ca: str, cert: str = "", key: str = "") -> None:
        self.paths = [p for p in (ca, cert, key) if p]
        self._stamp: tuple = ()
        self._checked = 0.0
        self.version = 0
        self.credentials = self._read()
        if self.credentials is None:
            raise SystemExit(f"cannot use the encoder TLS files {', '.join(self.paths)}; see the log")

    def _read(self) -> grpc.ChannelCredentials | None:
        try:
            stamp = _stamp(self.paths)
            ca = Path(self.paths[0]).read_bytes()
            if len(self.paths) == 1:
                credentials = grpc.ssl_channel_credentials(root_certificates=ca)
            else:
                cert, key = Path(self.paths[1]).read_bytes(), Path(self.paths[2]).read_bytes()
                _check_pair(cert, key)
                credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        except (OSError, ValueError) as exc:
            log.error("tls_client_certificate_unusable", files=self.paths, error_type=type(exc).__name__)
            return None
        self._stamp = stamp
        return credentials

    def current(self, now: float) -> tuple[int, grpc.ChannelCredentials]:
        """(version, credentials), read again first if the files changed."""
        if now - self._checked >= self.CHECK_INTERVAL_S:
            self._checked = now
            try:
                changed = _stamp(self.paths) != self._stamp
            except OSError:
                changed = False  # being replaced: look again later
            credentials = self._read() if changed else None
            if credentials is not None:
                self.credentials = credentials
                self.version += 1
                log.info("tls_client_certificate_reloaded", files=self.paths, version=self.version)
        return self.version, self.credentials


def encoder_certificates(settings: Settings) -> ClientCertificateFiles | None:
    """The gateway's TLS files towards the encoders, or None for plaintext (loopback)."""
    if not settings.encoder_tls_ca:
        return None
    return ClientCertificateFiles(settings.encoder_tls_ca, settings.encoder_tls_cert, settings.encoder_tls_key)
