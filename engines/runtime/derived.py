"""derived.json: files added to a signed bundle after signing, recorded beside its manifest, never in it.

A file added to a bundle that carries manifest.sig (TensorRT plans built by a Job on each GPU pool,
int8/fp16 graphs made later) is listed here with its sha256, so manifest.json and its signature
never change. Nothing in this index is signed, so it is trusted only as far as the load can check
it: each file matches its sha256, is an engine made from the signed reference (a TensorRT plan, or
an fp16/int8 graph of a tower and its weights), shadows no signed file, and is served only if it reproduces the
signed golden outputs within a tolerance no looser than the signed floor of its precision
(golden_floor). Derived files are not part of the bundle id, so adding them changes no identity.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from engines.runtime.manifest import (
    BF16_GOLDEN_MIN_COSINE,
    FP16,
    INT8,
    MANIFEST_NAME,
    PLAN_ROLE,
    PRECISIONS,
    TOWERS,
    WEIGHTS_ROLE,
    FileEntry,
    Manifest,
    ManifestError,
    inside,
)
from engines.runtime.signature import SIGNATURE_NAME

DERIVED_NAME = "derived.json"
FORMAT_VERSION = 1
# Names no file of either index may take: the indexes and the signature themselves.
RESERVED_NAMES = (MANIFEST_NAME, SIGNATURE_NAME, DERIVED_NAME)


@dataclasses.dataclass(frozen=True)
class DerivedIndex:
    """Contents of derived.json."""

    files: dict[str, FileEntry] = dataclasses.field(default_factory=dict)  # relative path -> entry
    build: dict[str, Any] = dataclasses.field(default_factory=dict)  # records of the steps that added them
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = {"format_version": self.format_version, "build": self.build,
                "files": {name: entry.to_dict() for name, entry in sorted(self.files.items())}}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, bundle_dir: Path) -> DerivedIndex:
        """The bundle's derived.json; empty when it has none."""
        path = Path(bundle_dir) / DERIVED_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{DERIVED_NAME} is not valid JSON: {exc}") from exc
        try:
            if data.get("format_version") != FORMAT_VERSION:
                raise ManifestError(f"unsupported {DERIVED_NAME} format_version {data.get('format_version')!r}, "
                                    f"expected {FORMAT_VERSION}")
            return cls(files={str(k): FileEntry(**v) for k, v in data["files"].items()},
                       build=dict(data.get("build", {})))
        except ManifestError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"malformed {DERIVED_NAME}: {exc!r}") from exc


def refusal(root: Path, manifest: Manifest, name: str, entry: FileEntry) -> str | None:
    """Why `name` cannot be a derived file of the bundle at `root` (None: it can). Checked where a
    file is added (amend_bundle) and again at every load."""
    target = inside(root, name)
    if target is None:
        return f"{DERIVED_NAME} names a file outside the bundle: {name!r}"
    signed = {(root / n).resolve() for n in (*RESERVED_NAMES, *manifest.files)}
    if target in signed:
        return (f"{DERIVED_NAME} names {name!r}, a signed file of the bundle (or its index): "
                "a derived file never replaces one")
    is_plan = entry.role == PLAN_ROLE and entry.tower in TOWERS and entry.precision in PRECISIONS
    if not (is_plan or (entry.role in (*TOWERS, WEIGHTS_ROLE) and entry.precision in (FP16, INT8))):
        return (f"{DERIVED_NAME} lists {name!r} as role {entry.role!r}, precision {entry.precision!r}: only TensorRT "
                "plans and fp16/int8 graphs of a tower (with their weights) may be added to a signed bundle")
    return None


def golden_floor(manifest: Manifest, entry: FileEntry) -> float:
    """The loosest golden tolerance a derived file may be held to, from the signed manifest.

    fp16/int8: the signed precision gate's golden_floor, the lowest tolerance the build lets any
    gated reduced-precision engine carry. fp32 (plans): BF16_GOLDEN_MIN_COSINE, since TensorRT may
    compute fp32 layers in TF32 (10 explicit mantissa bits), more precise than bf16 (7).
    """
    return manifest.precision_gate.golden_floor if entry.precision in (FP16, INT8) else BF16_GOLDEN_MIN_COSINE


def served_entry(manifest: Manifest, entry: FileEntry) -> FileEntry:
    """`entry` as it is served: its golden tolerance (what it records, else the manifest's) raised
    to golden_floor. An unsigned entry can tighten its bound, never loosen it."""
    recorded = manifest.golden_min_cosine if entry.golden_min_cosine is None else entry.golden_min_cosine
    return dataclasses.replace(entry, golden_min_cosine=max(recorded, golden_floor(manifest, entry)))
