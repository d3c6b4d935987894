"""Loading a bundle: its signature, its manifest, hash checks of every file, and the golden parity check."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import structlog

from engines.runtime import derived, signature
from engines.runtime.manifest import (
    MANIFEST_NAME,
    TEXT_INPUT,
    TEXT_OUTPUT,
    VISION_INPUT,
    VISION_OUTPUT,
    FileEntry,
    Manifest,
    ManifestError,
    inside,
    sha256_file,
)

log = structlog.get_logger("medvlm.bundle")

GOLDEN_ROLE = "golden"
TOWER_TENSORS = {"vision": (VISION_INPUT, VISION_OUTPUT), "text": (TEXT_INPUT, TEXT_OUTPUT)}


class BundleError(Exception):
    """The bundle cannot be built or served: missing, tampered with, or failing a check (golden
    outputs, parity); a build that raises it has written nothing."""


def find_bundle(bundles: Path, model: str) -> Path | None:
    """The newest bundles/<model>-<version> directory with a manifest (by the manifest's mtime)."""
    found = sorted(bundles.glob(f"{model}-*/{MANIFEST_NAME}"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A verified bundle directory.

    `manifest` is manifest.json, as verified, with the files of derived.json added, each at the
    golden tolerance it is served with (derived.served_entry); its bundle_id is the signed
    manifest's, since derived files are never part of it.
    """

    path: Path
    manifest: Manifest
    signing_key_id: str = ""  # the trusted key whose signature was verified; "" when none was asked for
    derived: frozenset[str] = frozenset()  # the files from derived.json: unsigned, golden-checked when opened

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    def file(self, relative: str) -> Path:
        return self.path / relative

    def engine_file(self, tower: str, precision: str | None = None) -> Path:
        """The ONNX file of `tower` ("vision" or "text") of `precision` (default: the fp32 reference)."""
        return self.file(self.manifest.file_for(tower, precision))

    def golden(self) -> dict[str, np.ndarray]:
        """Reference inputs and torch fp32 outputs stored at build time."""
        with np.load(self.file(self.manifest.file_for(GOLDEN_ROLE)), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def load_bundle(path: str | Path, trusted_keys: Sequence[str | Path] = ()) -> Bundle:
    """Read the manifest and derived.json, and check the sha256 of every file they list.

    With `trusted_keys` (Ed25519 public key PEM files) the manifest must carry a signature by
    one of them (signature.SIGNATURE_NAME); since the manifest holds every file's sha256, the
    signature covers every file but those of derived.json, which engine selection serves only
    if they reproduce the signed golden outputs (engines/runtime/derived.py). Without, signatures
    are not checked.
    """
    root = Path(path).resolve()
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist")
    key_id = ""
    try:
        if trusted_keys:
            # the bytes that were verified are the bytes that are parsed
            data = (root / MANIFEST_NAME).read_bytes()
            key_id = signature.verify(data, root / signature.SIGNATURE_NAME, signature.load_public_keys(trusted_keys))
            manifest = Manifest.from_dict(json.loads(data))
        else:
            manifest = Manifest.read(root)
        index = derived.DerivedIndex.read(root)
    except FileNotFoundError as exc:
        raise BundleError(f"no {MANIFEST_NAME} in bundle directory {root}") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{MANIFEST_NAME} of {root} is not valid JSON") from exc
    except (ManifestError, signature.SignatureError) as exc:
        raise BundleError(f"bundle {root.name}: {exc}") from exc
    _check_files(root, manifest.files, MANIFEST_NAME)
    for name, entry in index.files.items():
        reason = derived.refusal(root, manifest, name, entry)
        if reason is not None:
            raise BundleError(f"bundle {root.name}: {reason}")
    _check_files(root, index.files, derived.DERIVED_NAME)
    served = {name: derived.served_entry(manifest, entry) for name, entry in index.files.items()}
    for name, entry in served.items():
        recorded = index.files[name].golden_min_cosine
        raised = recorded is not None and recorded < entry.golden_min_cosine  # it claimed a looser bound
        (log.warning if raised else log.info)("derived_file", bundle=root.name, file=name, role=entry.role,
                                              precision=entry.precision, golden_min_cosine=entry.golden_min_cosine,
                                              recorded=recorded)
    return Bundle(path=root, manifest=dataclasses.replace(manifest, files={**manifest.files, **served}),
                  signing_key_id=key_id, derived=frozenset(served))


def _check_files(root: Path, files: dict[str, FileEntry], listed_in: str) -> None:
    """Every file of an index is inside the bundle, present, and matches its sha256."""
    for name, entry in files.items():
        target = inside(root, name)
        if target is None:
            raise BundleError(f"{listed_in} names a file outside the bundle: {name!r}")
        if not target.is_file():
            raise BundleError(f"bundle file {name} (listed in {listed_in}) is missing")
        if sha256_file(target) != entry.sha256:
            raise BundleError(f"bundle file {name} does not match its sha256 in {listed_in}")


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of two [N, D] arrays -> [N]."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-30)


def golden_cosine(golden: dict[str, np.ndarray], tower: str, infer) -> float:
    """Lowest row cosine, plain or centred, between `infer` on the golden inputs of `tower` and
    the stored torch outputs."""
    input_key, output_key = TOWER_TENSORS[tower]
    got = infer(golden[input_key])  # [G, D]
    expected = golden[output_key]  # [G, D]
    if got.shape != expected.shape:
        raise BundleError(f"{tower} golden check: output shape {got.shape} != {expected.shape}")
    centre = expected.mean(axis=0, keepdims=True)  # [1, D]
    return float(min(row_cosines(got, expected).min(), row_cosines(got - centre, expected - centre).min()))


def check_golden(bundle: Bundle, tower: str, infer, min_cosine: float | None = None) -> float:
    """Run the golden inputs of `tower` through `infer` and compare with the stored torch
    outputs. Returns the lowest row cosine; raises BundleError below `min_cosine` (default: the
    manifest's bound; a reduced-precision engine passes the tolerance its file records).

    Both the plain cosine and the cosine after subtracting the mean golden output must pass:
    embeddings of an untrained tower are nearly parallel (plain cosine ~0.999 between
    different inputs), so the plain cosine alone cannot tell a right answer from a wrong one.
    """
    bound = bundle.manifest.golden_min_cosine if min_cosine is None else min_cosine
    worst = golden_cosine(bundle.golden(), tower, infer)
    if not worst >= bound:
        raise BundleError(f"{tower} golden check failed: cosine {worst:.6f} < {bound}")
    return worst
