"""The bundle manifest: the contract between the build half and the serving half."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Model kinds. Only "clinical" is real BiomedCLIP; the others are never presented as clinical.
KIND_CLINICAL = "clinical"
KIND_DEMO = "demo"
KIND_TEST = "test"
KIND_BENCHMARK = "benchmark"
KINDS = (KIND_CLINICAL, KIND_DEMO, KIND_TEST, KIND_BENCHMARK)

# Tensor names of the exported graphs.
VISION_INPUT = "images"  # float32 [N, 3, H, W], normalized
VISION_OUTPUT = "image_embeds"  # float32 [N, D], not L2-normalized
TEXT_INPUT = "input_ids"  # int64 [N, L], padded with text.pad_id
TEXT_OUTPUT = "text_embeds"  # float32 [N, D], not L2-normalized

# golden.npz keys: the same names as the graph tensors.
GOLDEN_KEYS = (VISION_INPUT, VISION_OUTPUT, TEXT_INPUT, TEXT_OUTPUT)


class ManifestError(ValueError):
    """The manifest is missing, malformed, or does not describe the files beside it."""


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """open_clip preprocessing: resize shortest side, center crop, normalize."""

    size: int  # square crop side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    resize_mode: str = "shortest"  # open_clip's default resize mode


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """Tokenization: files for the `tokenizers` library, padded/truncated to context_length."""

    context_length: int
    pad_id: int
    tokenizer_dir: str = "tokenizer"  # relative to the bundle; holds tokenizer.json
    clean: str = "whitespace"  # open_clip HFTokenizer cleaning: collapse whitespace


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of the bundle, hashed."""

    sha256: str
    role: str  # "vision" | "text" | "tokenizer" | "golden" | "plan" | "source"
    precision: str = ""  # "fp32" | "fp16" | "int8" for engines; "" otherwise


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything a service needs to know about a bundle, and nothing it must guess."""

    model: str  # registry name, e.g. "demo", "biomedclip"
    version: str
    kind: str  # one of KINDS
    embed_dim: int
    logit_scale: float  # exp() already applied: multiply cosine by this
    opset: int
    image: ImageSpec
    text: TextSpec
    files: dict[str, FileEntry]  # relative path -> entry
    golden_min_cosine: float = 0.9999  # each golden output must match at least this (plain and centred)
    description: str = ""
    build: dict[str, Any] = dataclasses.field(default_factory=dict)  # tool versions, parity figures
    format_version: int = FORMAT_VERSION

    @property
    def content_hash(self) -> str:
        """A short hash over every file's hash: two bundles with the same files share it."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(f"{name}:{self.files[name].sha256}\n".encode())
        return h.hexdigest()[:12]

    @property
    def bundle_id(self) -> str:
        """Identity of the bundle as served: model, version and content."""
        return f"{self.model}-{self.version}+{self.content_hash}"

    def precision_of(self, role: str) -> str:
        """Precision of the engine file serving `role` ("vision" or "text")."""
        for entry in self.files.values():
            if entry.role == role:
                return entry.precision
        raise ManifestError(f"no file with role {role!r} in manifest")

    def file_for(self, role: str) -> str:
        """Relative path of the (single) engine file serving `role`."""
        names = [n for n, e in self.files.items() if e.role == role]
        if len(names) != 1:
            raise ManifestError(f"expected one file with role {role!r}, found {len(names)}")
        return names[0]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            if data.get("format_version") != FORMAT_VERSION:
                raise ManifestError(
                    f"unsupported manifest format_version {data.get('format_version')!r}, "
                    f"expected {FORMAT_VERSION}"
                )
            fields = dict(data)
            img = fields.pop("image")
            fields["image"] = ImageSpec(
                size=int(img["size"]),
                mean=tuple(float(x) for x in img["mean"]),
                std=tuple(float(x) for x in img["std"]),
                interpolation=img.get("interpolation", "bicubic"),
                resize_mode=img.get("resize_mode", "shortest"),
            )
            fields["text"] = TextSpec(**fields.pop("text"))
            fields["files"] = {k: FileEntry(**v) for k, v in fields.pop("files").items()}
            manifest = cls(**fields)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"malformed manifest: {exc}") from exc
        if manifest.kind not in KINDS:
            raise ManifestError(f"unknown model kind {manifest.kind!r}")
        return manifest

    @classmethod
    def read(cls, bundle_dir: Path) -> Manifest:
        path = Path(bundle_dir) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ManifestError(f"no {MANIFEST_NAME} in bundle directory {bundle_dir}") from exc
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
