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
    # softmax of logit_scale * cosine / the calibration's temperature; None when the gateway has no calibration
    calibrated_probability: float | None = None

    @property
    def shown_probability(self) -> float:
        """The calibrated probability where there is one, else the raw one."""
        return self.probability if self.calibrated_probability is None else self.calibrated_probability


class AbstainReason(str, enum.Enum):
    """Why the gateway withholds an answer (medvlm.v1.AbstainReason)."""

    NONE = ""  # not withheld
    OUT_OF_DISTRIBUTION = "out_of_distribution"  # the image is unlike the calibration images of these labels
    LOW_CONFIDENCE = "low_confidence"  # no label's calibrated probability reaches the threshold
    OTHER = "other"  # a reason newer than this client's contract


@dataclasses.dataclass(frozen=True)
class Trust:
    """The gateway's calibration assessment behind `abstain` (medvlm.v1.Trust)."""

    ood_score: float  # Mahalanobis distance to the nearest calibration centroid; larger is stranger
    ood_threshold: float  # scores above it are out of distribution
    min_probability: float  # abstention threshold on the best calibrated probability
    temperature: float
    scope: str  # the calibrated label set used, or "bundle"
    calibration_id: str  # "<bundle id>/<version>+<content hash>"


@dataclasses.dataclass(frozen=True)
class ClassifyResult:
    """A zero-shot classification of one image."""

    scores: tuple[LabelScore, ...]  # every label, in request order
    top: tuple[LabelScore, ...]  # the top_k labels, most probable first
    bundle_id: str  # the bundle that computed the answer
    image_sha256: str  # hex sha256 of the image bytes, as the server received them
    # True: do not act on this answer (see abstain_reason). Only meaningful when `trust` is set.
    abstain: bool = False
    abstain_reason: AbstainReason = AbstainReason.NONE
    trust: Trust | None = None  # None: the gateway serves without a calibration ("not calibrated")

    @property
    def calibrated(self) -> bool:
        """Whether the gateway judged this answer against a calibration."""
        return self.trust is not None

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
