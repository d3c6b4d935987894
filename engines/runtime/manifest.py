"""The bundle manifest: the contract between the build half and the serving half."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from medvlm.imaging.spec import ImageSpec  # the manifest's `image` section

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
class TextSpec:
    """Tokenization: files for the `tokenizers` library, padded/truncated to context_length."""

    context_length: int
    pad_id: int
    tokenizer_dir: str = "tokenizer"  # relative to the bundle; holds tokenizer.json
    clean: str = "whitespace"  # open_clip HFTokenizer cleaning: collapse whitespace


# Engine precisions, and the one every bundle has: the reference the others are gated against.
FP32, FP16, INT8 = "fp32", "fp16", "int8"
PRECISIONS = (FP32, FP16, INT8)
REFERENCE_PRECISION = FP32
TOWERS = ("vision", "text")
PLAN_ROLE = "plan"
WEIGHTS_ROLE = "ir-weights"  # an OpenVINO IR's weights (.bin), beside the graph (.xml) its `source` names

# How a reduced-precision ONNX graph was made (FileEntry.scheme).
SCHEME_DYNAMIC = "dynamic"  # ONNX Runtime dynamic int8 (MatMulInteger): ONNX Runtime on CPU only
SCHEME_QDQ = "qdq"  # static int8 with explicit QuantizeLinear/DequantizeLinear: ONNX Runtime and TensorRT
SCHEME_MIXED_FP16 = "mixed-fp16"  # MatMul/Gemm/Conv in fp16, the rest (LayerNorm, Softmax, ...) in fp32
SCHEME_NNCF = "nncf"  # static int8 Q/DQ placed and calibrated by NNCF, gated on OpenVINO: OpenVINO only


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of the bundle, hashed.

    Engine files are ONNX graphs (role "vision" or "text", one per precision; the fp32 one is
    the reference) and TensorRT plans (role "plan", with `tower` and the TensorRT version and
    GPU they were built for). Fields after `precision` are empty for every other file.
    """

    sha256: str
    role: str  # "vision" | "text" | "tokenizer" | "golden" | "plan" | "ir-weights" | "source"
    precision: str = ""  # "fp32" | "fp16" | "int8" for engines; "" otherwise
    # Lowest golden cosine (plain and centred) this engine must reach at load; None: the
    # manifest's golden_min_cosine. Set for reduced-precision engines by their build-time gate.
    golden_min_cosine: float | None = None
    scheme: str = ""  # reduced-precision ONNX: one of SCHEME_*
    tower: str = ""  # plans: "vision" | "text"
    source: str = ""  # plans: the ONNX file the plan was built from
    tensorrt: str = ""  # plans: TensorRT version that built it (and the only one that loads it)
    gpu: str = ""  # plans: name of the GPU it was built on, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str = ""  # plans: "major.minor" of that GPU, e.g. "9.0"

    @property
    def derived(self) -> bool:
        """An engine made from the reference graphs (reduced precision, or a plan): not part of
        the model's identity."""
        return self.role == PLAN_ROLE or self.precision in (FP16, INT8)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the three basic fields always, the others only when set."""
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items() if k in ("sha256", "role", "precision") or v not in ("", None)}


# Golden tolerance of an fp32 graph run in bf16 arithmetic (8 mantissa bits instead of 23), by
# OpenVINO on CPUs, and the floor of an unsigned fp32 plan (TensorRT may compute fp32 in TF32, at
# least as precise as bf16; see engines/runtime/derived.py). OpenVINO bf16 on a ViT-B/16 measured
# cosine 0.9999 plain and 0.9996 centred to fp32 on a Zen 4; 0.998 leaves room for deeper towers
# and still tells a working engine from a broken one (a wrong graph or weights gives a centred
# cosine near 0).
BF16_GOLDEN_MIN_COSINE = 0.998


@dataclasses.dataclass(frozen=True)
class PrecisionGate:
    """What a reduced-precision engine must reach against fp32 on a held-out set to be kept."""

    min_agreement: float = 0.99  # zero-shot top-1 answers identical to fp32's (fraction)
    max_top1_drop: float = 0.01  # zero-shot top-1 accuracy below fp32's (fraction; 0.01 = 1 point)
    # Mean cosine to fp32 after subtracting the fp32 mean embedding, per tower: 1 - this is the
    # share of the answer-bearing signal the engine may change.
    min_centred_cosine: float = 0.98
    # Lowest golden tolerance a kept engine may carry: below it the load-time golden check could
    # no longer tell that engine from a broken one.
    golden_floor: float = 0.9


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
    precision_gate: PrecisionGate = dataclasses.field(default_factory=PrecisionGate)
    build: dict[str, Any] = dataclasses.field(default_factory=dict)  # tool versions, parity figures
    format_version: int = FORMAT_VERSION

    @property
    def content_hash(self) -> str:
        """A short hash over the hash of every file that defines the model: two bundles with the
        same reference graphs, tokenizer and golden data share it.

        Derived engines (int8/fp16 graphs, TensorRT plans) are left out: they are added to a
        bundle after it is built (plans by a Job on each GPU pool) and are gated against the
        reference, so adding one must not change the identity encoders agree on. Every file,
        derived or not, is still checked against its sha256 at load.
        """
        h = hashlib.sha256()
        for name in sorted(self.files):
            if not self.files[name].derived:
                h.update(f"{name}:{self.files[name].sha256}\n".encode())
        return h.hexdigest()[:12]

    @property
    def bundle_id(self) -> str:
        """Identity of the bundle as served: model, version and content."""
        return f"{self.model}-{self.version}+{self.content_hash}"

    def precision_of(self, role: str) -> str:
        """Precision of the reference engine file serving `role` ("vision" or "text")."""
        return self.files[self.file_for(role)].precision

    def file_for(self, role: str, precision: str | None = None) -> str:
        """Relative path of the file serving `role`.

        For a tower ("vision", "text") this is its ONNX graph of `precision`, by default the
        fp32 reference; for other roles, the single file of that role.
        """
        names = [n for n, e in self.files.items() if e.role == role]
        if role in TOWERS and (len(names) > 1 or precision is not None):
            wanted = precision or REFERENCE_PRECISION
            names = [n for n in names if self.files[n].precision == wanted]
            if len(names) != 1:
                raise ManifestError(f"expected one {wanted} file with role {role!r}, found {len(names)}")
        elif len(names) != 1:
            raise ManifestError(f"expected one file with role {role!r}, found {len(names)}")
        return names[0]

    def engine_files(self, tower: str) -> dict[str, FileEntry]:
        """ONNX graphs of `tower`, every precision, reference first."""
        found = {n: e for n, e in self.files.items() if e.role == tower}
        return dict(sorted(found.items(), key=lambda item: item[1].precision != REFERENCE_PRECISION))

    def plan_files(self, tower: str) -> dict[str, FileEntry]:
        """TensorRT plans of `tower`, every GPU and precision."""
        return {n: e for n, e in self.files.items() if e.role == PLAN_ROLE and e.tower == tower}

    def golden_tolerance(self, name: str) -> float:
        """Lowest golden cosine the engine file `name` must reach at load."""
        entry = self.files[name]
        return self.golden_min_cosine if entry.golden_min_cosine is None else entry.golden_min_cosine

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["files"] = {name: entry.to_dict() for name, entry in self.files.items()}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

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
            if "precision_gate" in fields:
                fields["precision_gate"] = PrecisionGate(**fields.pop("precision_gate"))
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


def inside(root: Path, name: str) -> Path | None:
    """`root / name` resolved, or None when it leads out of `root` (an absolute name, `..`, a link)."""
    target = (root / name).resolve()
    return target if root in target.parents else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
