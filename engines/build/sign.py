"""Signing a bundle: an Ed25519 signature of its manifest (which lists every file's sha256),
written beside it as manifest.sig. Steps that add files to a bundle once it is signed (plans,
quantize) leave manifest.json alone and list their files in derived.json, which is not signed:
those files are served only if they reproduce the signed golden outputs (engines/runtime/derived.py)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from engines.build.amend import bundle_lock, write_atomically
from engines.runtime import manifest as mf
from engines.runtime.signature import SIGNATURE_NAME, Signature, key_id


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """An unencrypted PEM Ed25519 private key."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def sign_bundle(bundle_dir: Path, key_path: Path) -> str:
    """Sign the bundle's manifest.json with the key at `key_path`; returns the key id. The files of
    its derived.json, if any, stay derived (unsigned)."""
    key = load_private_key(key_path)
    root = Path(bundle_dir).resolve()
    with bundle_lock(root):
        data = (root / mf.MANIFEST_NAME).read_bytes()
        mf.Manifest.read(root)  # refuse to sign what is not a manifest
        sig = Signature(key_id(key.public_key()), key.sign(data))
        write_atomically(root / SIGNATURE_NAME, sig.to_json())
    return sig.key_id
