"""Signing a bundle: an Ed25519 signature of its manifest (which lists every file's sha256),
written beside it as manifest.sig. Sign after the last step that changes the manifest
(quantize, plans): a manifest changed after signing is refused by encoders that check signatures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from engines.build.amend import bundle_lock
from engines.runtime import manifest as mf
from engines.runtime.signature import SIGNATURE_NAME, Signature, key_id


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """An unencrypted PEM Ed25519 private key."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def sign_bundle(bundle_dir: Path, key_path: Path) -> str:
    """Sign the bundle's manifest.json with the key at `key_path`; returns the key id."""
    key = load_private_key(key_path)
    root = Path(bundle_dir).resolve()
    with bundle_lock(root):
        data = (root / mf.MANIFEST_NAME).read_bytes()
        mf.Manifest.read(root)  # refuse to sign what is not a manifest
        sig = Signature(key_id(key.public_key()), key.sign(data))
        fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE_NAME}.", dir=root)
        with os.fdopen(fd, "w") as out:
            out.write(sig.to_json())
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / SIGNATURE_NAME)
    return sig.key_id
