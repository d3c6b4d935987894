"""Bundle signatures: an Ed25519 signature of manifest.json (which holds the sha256 of every other
file), stored beside it, and its check against trusted public keys at load."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

SIGNATURE_NAME = "manifest.sig"
ALGORITHM = "ed25519"


class SignatureError(Exception):
    """A bundle's signature is missing, malformed, by an unknown key, or does not match."""


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """Short id of a public key: first 16 hex digits of the sha256 of its raw 32 bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Signature:
    """Contents of manifest.sig."""

    key_id: str
    signature: bytes

    def to_json(self) -> str:
        return json.dumps({"algorithm": ALGORITHM, "key_id": self.key_id,
                           "signature": base64.b64encode(self.signature).decode()}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: bytes) -> Signature:
        try:
            data = json.loads(text)
            if data.get("algorithm") != ALGORITHM:
                raise SignatureError(f"{SIGNATURE_NAME}: algorithm must be {ALGORITHM!r}")
            return cls(str(data["key_id"]), base64.b64decode(data["signature"], validate=True))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SignatureError(f"{SIGNATURE_NAME} is malformed") from exc


def load_public_keys(paths: Iterable[str | Path]) -> dict[str, ed25519.Ed25519PublicKey]:
    """Trusted Ed25519 public keys (PEM files) by key id."""
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise SignatureError(f"trusted bundle key {path} cannot be read as a PEM public key") from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise SignatureError(f"trusted bundle key {path} is not an Ed25519 key")
        keys[key_id(key)] = key
    return keys


def verify(manifest_bytes: bytes, signature_path: Path, trusted: dict[str, ed25519.Ed25519PublicKey]) -> str:
    """Check the signature of `manifest_bytes` against the trusted keys; returns the key id."""
    if not signature_path.is_file():
        raise SignatureError(f"bundle is not signed (no {SIGNATURE_NAME}) and signed bundles are required")
    sig = Signature.from_json(signature_path.read_bytes())
    key = trusted.get(sig.key_id)
    if key is None:
        raise SignatureError(f"bundle is signed by key {sig.key_id}, which is not among the trusted keys")
    try:
        key.verify(sig.signature, manifest_bytes)
    except InvalidSignature as exc:
        raise SignatureError(
            f"the signature by key {sig.key_id} does not match manifest.json: the bundle was changed after signing"
        ) from exc
    return sig.key_id
