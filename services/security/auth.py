"""Who is calling and what they may do: client certificates, bearer tokens (JWT) and API keys;
roles per RPC; per-caller quotas. The interceptor asks `Guard` once per call.

Credentials never leave this module: errors and audit records carry a reason and, once known, the
caller's identity, never a token, a key or certificate material.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services import domain
from services.plumbing import metrics
from services.plumbing.settings import Settings

log = structlog.get_logger("medvlm.auth")

# Roles. "admin" is what manages the service (label sets); an RPC not in ROLE_OF needs it, so a
# new RPC is closed until someone decides who may call it.
CLASSIFY, EMBED, ADMIN = "classify", "embed", "admin"
ROLES = (CLASSIFY, EMBED, ADMIN)
ANY = ""  # any authenticated caller
_GATEWAY = "/medvlm.v1.GatewayService/"
ROLE_OF: dict[str, str] = {
    _GATEWAY + "Classify": CLASSIFY,
    _GATEWAY + "ClassifyStream": CLASSIFY,
    _GATEWAY + "Similarity": CLASSIFY,
    # Embeddings can re-identify patients: a role of their own.
    _GATEWAY + "EmbedImages": EMBED,
    _GATEWAY + "EmbedTexts": EMBED,
    _GATEWAY + "GetModelInfo": ANY,
    # Reading the served vocabularies is part of classifying with them.
    _GATEWAY + "ListLabelSets": CLASSIFY,
    _GATEWAY + "GetLabelSet": CLASSIFY,
    # The encoders are reached only by the gateway, whose certificate --allowed-clients names.
    "/medvlm.v1.VisionEncoderService/EmbedImages": ANY,
    "/medvlm.v1.VisionEncoderService/GetModelInfo": ANY,
    "/medvlm.v1.TextEncoderService/EmbedTexts": ANY,
    "/medvlm.v1.TextEncoderService/GetModelInfo": ANY,
}
OPEN_PREFIXES = ("/grpc.health.v1.",)  # probes carry no credential
REFLECTION_PREFIX = "/grpc.reflection."  # any authenticated caller (grpcurl sends -H here too)

AUTHORIZATION_KEY = "authorization"
API_KEY_KEY = "x-api-key"
JWT_ALGORITHMS = ["RS256", "ES256"]
_KEY_TYPES = {"RS256": rsa.RSAPublicKey, "ES256": ec.EllipticCurvePublicKey}

# How the caller proved who it is (the audit record's "auth").
MTLS, JWT, API_KEY, NONE = "mtls", "jwt", "api-key", "none"


def role_of(method: str) -> str:
    """The role an RPC needs (ANY: authentication alone); unknown RPCs need admin."""
    if method.startswith(REFLECTION_PREFIX):
        return ANY
    return ROLE_OF.get(method, ADMIN)


@dataclasses.dataclass(frozen=True)
class Caller:
    """An identified caller: `identity` (certificate name, token subject or key id), how it was
    proved, and the roles it holds."""

    identity: str
    method: str
    roles: frozenset[str] = frozenset()


ANONYMOUS = Caller("anonymous", NONE, frozenset(ROLES))


@dataclasses.dataclass(frozen=True)
class Peer:
    """What the interceptor captured from a call when it started: its metadata and the names of
    the client certificate (empty without one)."""

    metadata: Mapping[str, str]
    cert_names: tuple[str, ...] = ()

    @classmethod
    def capture(cls, context: Any) -> Peer:
        """Read the context now, while the call is alive."""
        metadata: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if isinstance(value, str) and key not in metadata:
                metadata[key] = value
        return cls(metadata, certificate_names(context.auth_context() or {}))


def certificate_names(auth_context: Mapping[str, Sequence[bytes]]) -> tuple[str, ...]:
    """Names of a verified client certificate, most specific first: URI SANs (SPIFFE ids), the
    subject CN, DNS SANs. Empty for plaintext or TLS without a client certificate."""
    if not auth_context.get("x509_pem_cert"):
        return ()
    sans = [v.decode() for v in auth_context.get("x509_subject_alternative_name", ())]
    cn = [v.decode() for v in auth_context.get("x509_common_name", ())]
    uris = [s for s in sans if "://" in s]
    names = uris + cn + [s for s in sans if s not in uris]
    return tuple(dict.fromkeys(names))


T = TypeVar("T")


class Watched(Generic[T]):
    """A file parsed by `parse` and parsed again when it changes (a Secret or ConfigMap update).
    A change that does not parse keeps the previous value and is logged."""

    def __init__(self, path: str, parse: Callable[[bytes], T]) -> None:
        self.path = path
        self.parse = parse
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._value: T = self._load(initial=True)  # type: ignore[assignment]

    def _load(self, initial: bool = False) -> T | None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            value = self.parse(Path(self.path).read_bytes())
        except OSError as exc:
            if initial:
                raise SystemExit(f"cannot read {self.path}: {exc.strerror}") from exc
            return None  # being replaced: keep the current value, look again at the next call
        except (ValueError, KeyError, TypeError) as exc:
            if initial:
                raise SystemExit(f"{self.path}: {exc}") from exc
            log.error("auth_file_unusable", path=self.path, error=str(exc))
            self._stamp = stamp
            return None
        self._stamp = stamp
        return value

    def get(self) -> T:
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError:
                return self._value  # being replaced
            if (st.st_ino, st.st_mtime_ns, st.st_size) != self._stamp:
                value = self._load()
                if value is not None:
                    self._value = value
                    log.info("auth_file_reloaded", path=self.path)
            return self._value


def hash_api_key(key: str) -> str:
    """How an API key is stored: hex sha256 of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _api_keys(data: bytes) -> dict[str, Caller]:
    """{"keys": [{"id", "sha256", "roles", "revoked"?}]} -> callers by key hash."""
    out: dict[str, Caller] = {}
    for entry in json.loads(data)["keys"]:
        if entry.get("revoked"):
            continue
        digest = str(entry["sha256"]).lower()
        if len(digest) != 64:
            raise ValueError(f"API key {entry['id']!r}: sha256 must be 64 hex digits")
        out[digest] = Caller(str(entry["id"]), API_KEY, _roles(entry.get("roles", ())))
    return out


def _roles(value: Iterable[str] | str) -> frozenset[str]:
    names = value.split() if isinstance(value, str) else list(value)
    return frozenset(str(n) for n in names)


@dataclasses.dataclass(frozen=True)
class Limit:
    """A token bucket's refill rate per second and its capacity."""

    rate: float
    burst: float


@dataclasses.dataclass(frozen=True)
class Access:
    """Contents of the access file: roles of certificate identities, quotas per caller."""

    cert_roles: Mapping[str, frozenset[str]]
    quotas: Mapping[str, Mapping[str, Limit]]  # caller id ("default" for the rest) -> kind -> limit

    def limits(self, identity: str) -> Mapping[str, Limit]:
        return self.quotas.get(identity) or self.quotas.get("default") or {}


QUOTA_KINDS = ("requests", "images")


def _access(data: bytes) -> Access:
    raw = json.loads(data)
    cert_roles = {str(k): _roles(v) for k, v in raw.get("certificates", {}).items()}
    quotas: dict[str, dict[str, Limit]] = {}
    for caller, entry in raw.get("quotas", {}).items():
        limits = {}
        for kind in QUOTA_KINDS:
            rate = entry.get(f"{kind}_per_s")
            if rate is None:
                continue
            rate = float(rate)
            burst = float(entry.get(f"{kind}_burst", max(1.0, rate)))
            if rate <= 0 or burst <= 0:
                raise ValueError(f"quota of {caller!r}: {kind} rate and burst must be positive")
            limits[kind] = Limit(rate, burst)
        quotas[str(caller)] = limits
    return Access(cert_roles, quotas)


def _jwt_keys(paths: Sequence[str]) -> Callable[[], list[tuple[str | None, Any]]]:
    """(kid, key) pairs from JWKS files and PEM public keys, each re-read when it changes."""

    def parse(data: bytes) -> list[tuple[str | None, Any]]:
        text = data.strip()
        if text.startswith(b"{"):
            try:
                keyset = jwt.PyJWKSet.from_dict(json.loads(text))
            except jwt.PyJWTError as exc:
                raise ValueError(f"not a usable JWKS: {exc}") from exc
            return [(k.key_id, k.key) for k in keyset.keys]
        return [(None, serialization.load_pem_public_key(text))]

    files = [Watched(p, parse) for p in paths]
    return lambda: [pair for f in files for pair in f.get()]


class _Bucket:
    """A token bucket. Taking more than is left is refused with the wait until it would succeed;
    a cost above the capacity is allowed from a full bucket (and leaves it in debt)."""

    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self.tokens = limit.burst
        self.at = time.monotonic()

    def take(self, cost: float) -> float:
        """0 when taken, else seconds to wait."""
        now = time.monotonic()
        self.tokens = min(self.limit.burst, self.tokens + (now - self.at) * self.limit.rate)
        self.at = now
        need = min(cost, self.limit.burst)
        if self.tokens >= need:
            self.tokens -= cost
            return 0.0
        return (need - self.tokens) / self.limit.rate


class Quotas:
    """Token buckets per caller and kind ("requests", "images"), limits from the access file."""

    def __init__(self, limits: Callable[[str], Mapping[str, Limit]]) -> None:
        self._limits = limits
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()

    def charge(self, identity: str, kind: str, cost: float) -> None:
        """Take `cost` from the caller's bucket or raise Overloaded with the wait."""
        if cost <= 0:
            return
        limit = self._limits(identity).get(kind)
        if limit is None:
            return
        with self._lock:
            bucket = self._buckets.get((identity, kind))
            if bucket is None or bucket.limit != limit:
                bucket = self._buckets[(identity, kind)] = _Bucket(limit)
            wait = bucket.take(cost)
        if wait > 0:
            metrics.QUOTA_REJECTED.labels(identity, kind).inc()
            raise domain.Overloaded(
                f"quota of caller {identity} exceeded: {limit.rate:g} {kind} per second", retry_after_s=wait
            )


class Guard:
    """Authentication, authorisation and quotas of one server, configured from Settings."""

    def __init__(self, settings: Settings) -> None:
        self.allowed_clients = frozenset(n.strip() for n in settings.allowed_clients.split(",") if n.strip())
        # An allow-list of certificates means nobody else gets in, certificate or not.
        self.required = settings.auth or bool(self.allowed_clients)
        self.client_ca = bool(settings.tls_client_ca)
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway_s
        self.roles_claim = settings.jwt_roles_claim
        paths = [p.strip() for p in settings.jwt_keys.split(",") if p.strip()]
        self._jwt_keys = _jwt_keys(paths) if paths else None
        self._api_keys = Watched(settings.api_keys, _api_keys) if settings.api_keys else None
        self._access = Watched(settings.access, _access) if settings.access else None
        self.quotas = Quotas(lambda identity: self._access.get().limits(identity)) if self._access else None

    @property
    def active(self) -> bool:
        """Whether calls need looking at at all (auth, client certificates, an allow-list or quotas)."""
        return self.required or self.client_ca or bool(self.allowed_clients) or self.quotas is not None

    def authenticate(self, peer: Peer) -> Caller:
        """The caller of a call, or Unauthenticated/PermissionDenied with the reason."""
        authorization = peer.metadata.get(AUTHORIZATION_KEY, "")
        api_key = peer.metadata.get(API_KEY_KEY, "")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise domain.Unauthenticated("authorization metadata must be 'Bearer <token>'")
            caller = self._bearer(token.strip())
        elif api_key:
            caller = self._api_key(api_key)
        elif peer.cert_names:
            caller = self._certificate(peer.cert_names)
        elif self.required:
            raise domain.Unauthenticated("no credential: send a client certificate, a bearer token or an API key")
        else:
            return ANONYMOUS
        if not self.required:
            caller = dataclasses.replace(caller, roles=ANONYMOUS.roles)
        return caller

    def _certificate(self, names: tuple[str, ...]) -> Caller:
        if self.allowed_clients and not self.allowed_clients.intersection(names):
            raise domain.PermissionDenied(f"client certificate {names[0]} is not among the allowed clients")
        roles: frozenset[str] = frozenset()
        if self._access is not None:
            table = self._access.get().cert_roles
            roles = frozenset().union(*(table.get(n, frozenset()) for n in names))
        return Caller(names[0], MTLS, roles)

    def _api_key(self, key: str) -> Caller:
        if self._api_keys is None:
            raise domain.Unauthenticated("API keys are not accepted by this server")
        caller = self._api_keys.get().get(hash_api_key(key))
        if caller is None:
            raise domain.Unauthenticated("unknown or revoked API key")
        return caller

    def _bearer(self, token: str) -> Caller:
        if self._jwt_keys is None:
            raise domain.Unauthenticated("bearer tokens are not accepted by this server")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise domain.Unauthenticated("bearer token is not a JWT") from exc
        if header.get("alg") not in JWT_ALGORITHMS:
            raise domain.Unauthenticated(f"bearer token algorithm must be one of {', '.join(JWT_ALGORITHMS)}")
        kid, kind = header.get("kid"), _KEY_TYPES[header["alg"]]
        keys = [key for key_id, key in self._jwt_keys()
                if isinstance(key, kind) and (kid is None or key_id in (None, kid))]
        if not keys:
            raise domain.Unauthenticated("bearer token signed by an unknown key")
        for key in keys:
            try:
                claims = jwt.decode(
                    token, key, algorithms=JWT_ALGORITHMS, audience=self.audience, issuer=self.issuer,
                    leeway=self.leeway, options={"require": ["exp", "iss", "aud", "sub"]},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError as exc:
                raise domain.Unauthenticated("bearer token expired") from exc
            except jwt.ImmatureSignatureError as exc:
                raise domain.Unauthenticated("bearer token not yet valid") from exc
            except jwt.InvalidAudienceError as exc:
                raise domain.Unauthenticated("bearer token is for another audience") from exc
            except jwt.InvalidIssuerError as exc:
                raise domain.Unauthenticated("bearer token is from another issuer") from exc
            except jwt.MissingRequiredClaimError as exc:
                raise domain.Unauthenticated(f"bearer token lacks the {exc.claim!r} claim") from exc
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                raise domain.Unauthenticated("bearer token is malformed") from exc
            return Caller(str(claims["sub"]), JWT, _roles(claims.get(self.roles_claim, ())))
        raise domain.Unauthenticated("bearer token has a bad signature")

    def authorize(self, caller: Caller, method: str) -> str:
        """The role used for `method`, or PermissionDenied."""
        role = role_of(method)
        if role != ANY and role not in caller.roles:
            raise domain.PermissionDenied(f"caller {caller.identity} lacks the {role!r} role this RPC needs")
        return role


def count_images(message: Any, depth: int = 2) -> int:
    """medvlm.v1.Image messages in a request (set singular fields and repeated ones, nested up to
    `depth` levels), for the images-per-second quota."""
    total = 0
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        values = value if field.is_repeated else [value]
        if field.message_type.full_name == "medvlm.v1.Image":
            total += len(values)
        elif depth > 0:
            total += sum(count_images(v, depth - 1) for v in values)
    return total
