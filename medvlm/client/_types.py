"""What the client returns: plain frozen dataclasses, no protobuf messages."""

from __future__ import annotations

import dataclasses
import enum

import numpy as np


class Priority(enum.IntEnum):
    """How urgently the encoders should serve a request (medvlm.v1.Priority)."""

    ROUTINE = 1
    URGENT = 2
    STAT = 3


@dataclasses.dataclass(frozen=True)
class LabelScore:
    """The score of one candidate label."""

    label: str
    index: int  # position in the request's labels
    probability: float  # softmax over the request's labels of logit_scale * cosine
    cosine: float
    code: str = ""  # the label's code (e.g. SNOMED CT) when the server sends one


@dataclasses.dataclass(frozen=True)
class ClassifyResult:
    """A zero-shot classification of one image."""

    scores: tuple[LabelScore, ...]  # every label, in request order
    top: tuple[LabelScore, ...]  # the top_k labels, most probable first
    bundle_id: str  # the bundle that computed the answer
    image_sha256: str  # hex sha256 of the image bytes, as the server received them

    @property
    def best(self) -> LabelScore:
        """The most probable label."""
        return self.top[0] if self.top else max(self.scores, key=lambda s: s.probability)

    @property
    def probabilities(self) -> np.ndarray:
        """Probabilities in request order, float32 [L]."""
        return np.array([s.probability for s in self.scores], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class SimilarityResult:
    """Images x texts: cosine similarities and softmax probabilities over the texts."""

    cosine: np.ndarray  # float32 [images, texts]
    probabilities: np.ndarray  # float32 [images, texts], each row sums to 1
    image_sha256: tuple[str, ...]  # per image
    bundle_id: str


@dataclasses.dataclass(frozen=True)
class Embedding:
    """One unit-length embedding and the sha256 of the input it came from."""

    vector: np.ndarray  # float32 [embed_dim]
    input_sha256: str


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """Embeddings in request order, and the bundle that computed them."""

    items: tuple[Embedding, ...]
    bundle_id: str

    @property
    def matrix(self) -> np.ndarray:
        """float32 [N, embed_dim]."""
        return np.stack([e.vector for e in self.items]) if self.items else np.zeros((0, 0), np.float32)


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """The engine that serves one tower."""

    tower: str  # "vision" or "text"
    engine: str  # e.g. "onnxruntime/CPUExecutionProvider"
    precision: str  # "fp32", "fp16" or "int8"
    max_batch: int


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The model the gateway serves. Only kind "clinical" is real BiomedCLIP."""

    bundle_id: str
    model: str
    version: str
    kind: str  # "clinical", "demo", "test" or "benchmark"
    description: str
    embed_dim: int
    logit_scale: float
    image_size: int
    context_length: int
    engines: tuple[EngineInfo, ...]

    @property
    def engine_summary(self) -> str:
        """One line naming each tower's engine and precision."""
        return ", ".join(f"{e.tower}: {e.engine} {e.precision}" for e in self.engines)


@dataclasses.dataclass(frozen=True)
class ItemError:
    """Why one item of a worklist failed: a gRPC status name (or a client code) and a message."""

    code: str
    message: str


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """The outcome of one worklist item: its result or its error."""

    id: str
    result: ClassifyResult | None = None
    error: ItemError | None = None
    sha256: str = ""  # of the bytes read ("" when the file could not be read)

    @property
    def ok(self) -> bool:
        return self.error is None
