"""Connection settings: flags and MEDVLM_* variables (the flag wins), parsed once into a frozen dataclass
(declared and parsed with medvlm.settings, as the services' are), and the channel options and
credentials they make."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from medvlm.settings import add_flags, parse, setting
from medvlm.v1 import gateway_pb2

_GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
# Unary calls are idempotent and safe to retry. ClassifyStream is not retried: a retried stream
# would replay its items from a buffer, and a stream that has answered cannot be retried anyway.
_RETRIED = [{"service": _GATEWAY.full_name, "method": m.name} for m in _GATEWAY.methods
            if not (m.client_streaming or m.server_streaming)]
_RETRIED.append({"service": "grpc.health.v1.Health", "method": "Check"})


@dataclasses.dataclass(frozen=True)
class ConnectionSettings:
    """How to reach a medvlm gateway. Each field is a flag (--ca-cert) and a variable
    (MEDVLM_CA_CERT); the flag wins over the variable."""

    target: str = setting("127.0.0.1:50050", "gRPC target of the gateway: host:port or dns:///name:port.")
    timeout_s: float = setting(
        30.0, "Deadline of one call in seconds (a worklist stream has none: its items each answer as "
              "they finish). Shorter fails faster when a server hangs.")
    retry_attempts: int = setting(
        3, "Most attempts of a call that failed with UNAVAILABLE, with backoff, always inside the "
           "call's deadline (gRPC retry policy). 1 turns retries off.")
    tls: bool = setting(False, "Use TLS. Implied by --ca-cert and --client-cert.")
    ca_cert: str = setting("", "PEM file of the CA that signed the gateway's certificate; empty: the "
                               "system's roots.")
    client_cert: str = setting("", "PEM certificate chain of this client, for mutual TLS.")
    client_key: str = setting("", "PEM private key of --client-cert.")
    server_name: str = setting("", "Name expected in the gateway's certificate when it differs from the "
                                   "target's host (e.g. connecting by IP address).")
    token: str = setting("", "Bearer token sent with every call (TLS only). Prefer --token-file: a "
                             "flag is visible to other users of the machine.", secret=True)
    token_file: str = setting("", "File holding the bearer token (read once at start; TLS only).")
    max_message_mb: int = setting(0, "Largest message sent or received, in MiB; 0: 64, the gateway's default.")

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.ca_cert or self.client_cert)

    def bearer_token(self) -> str:
        """The token from --token or --token-file ("" if neither)."""
        if self.token:
            return self.token
        if self.token_file:
            return Path(self.token_file).read_text(encoding="utf-8").strip()
        return ""

    def validate(self) -> None:
        """Refuse combinations that cannot work, with a message that says why."""
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("--client-cert and --client-key go together")
        if (self.token or self.token_file) and not self.uses_tls:
            raise ValueError("a token is sent over TLS only: add --tls or --ca-cert")
        if self.token and self.token_file:
            raise ValueError("give --token or --token-file, not both")
        if self.retry_attempts < 1:
            raise ValueError("--retry-attempts must be at least 1")

    def service_config(self) -> dict[str, Any]:
        """gRPC service config: retries on UNAVAILABLE only, for idempotent unary calls."""
        config: dict[str, Any] = {"methodConfig": [{"name": _RETRIED}]}
        if self.retry_attempts > 1:
            config["methodConfig"][0]["retryPolicy"] = {
                "maxAttempts": min(self.retry_attempts, 5),  # gRPC caps attempts at 5
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return config

    def channel_options(self) -> list[tuple[str, Any]]:
        size = (self.max_message_mb or 64) << 20
        options: list[tuple[str, Any]] = [
            ("grpc.service_config", json.dumps(self.service_config())),
            ("grpc.enable_retries", 1 if self.retry_attempts > 1 else 0),
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials (with the client certificate and the token's call credentials),
        or None for plaintext."""
        self.validate()
        if not self.uses_tls:
            return None

        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )
        token = self.bearer_token()
        if token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token))
        return credentials


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """Add a flag per ConnectionSettings field, with its variable in the help."""
    add_flags(parser.add_argument_group("connection (flags, or the MEDVLM_* variable shown)"), ConnectionSettings)


def settings_from(args: argparse.Namespace | None = None,
                  environ: Mapping[str, str] | None = None) -> ConnectionSettings:
    """Flags, then MEDVLM_* variables, then defaults. Raises ValueError naming a bad variable."""
    settings = parse(ConnectionSettings, args, environ)
    settings.validate()
    return settings
