"""Requests built from plain arguments, and replies converted into the client's dataclasses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medvlm.client._types import (
    AbstainReason, ClassifyResult, Embedding, Embeddings, EngineInfo, LabelScore, ModelInfo, SimilarityResult,
    Trust,
)
from medvlm.v1 import gateway_pb2, types_pb2

def classify_request(image: types_pb2.Image | None, labels: Sequence[str] | None, label_set: str | None,
                     template: str, top_k: int, priority: int) -> gateway_pb2.ClassifyRequest:
    """A ClassifyRequest with either labels or a named label set."""
    request = gateway_pb2.ClassifyRequest(template=template, top_k=top_k, priority=int(priority))
    if image is not None:
        request.image.CopyFrom(image)
    if labels:
        request.labels.extend(labels)
    if label_set:
        request.label_set = label_set
    return request


def check_labels(labels: Sequence[str] | None, label_set: str | None) -> None:
    """Exactly one of labels and label set."""
    if bool(labels) == bool(label_set):
        raise ValueError("give labels or a label set, one of them")


def list_label_sets_request() -> gateway_pb2.ListLabelSetsRequest:
    return gateway_pb2.ListLabelSetsRequest()


def label_set_names(reply) -> tuple[str, ...]:
    return tuple(f"{s.name}@{s.version}" for s in reply.label_sets)


def label_score(score: gateway_pb2.LabelScore, calibrated: bool) -> LabelScore:
    return LabelScore(label=score.label, index=score.index, probability=score.probability,
                      cosine=score.cosine, code=score.code,
                      calibrated_probability=score.calibrated_probability if calibrated else None)


_ABSTAIN_REASONS = {
    gateway_pb2.ABSTAIN_REASON_UNSPECIFIED: AbstainReason.NONE,
    gateway_pb2.ABSTAIN_REASON_OUT_OF_DISTRIBUTION: AbstainReason.OUT_OF_DISTRIBUTION,
    gateway_pb2.ABSTAIN_REASON_LOW_CONFIDENCE: AbstainReason.LOW_CONFIDENCE,
}


def classify_result(reply: gateway_pb2.ClassifyResponse) -> ClassifyResult:
    calibrated = reply.HasField("trust")
    t = reply.trust
    trust = Trust(ood_score=t.ood_score, ood_threshold=t.ood_threshold, min_probability=t.min_probability,
                  temperature=t.temperature, scope=t.scope, calibration_id=t.calibration_id) if calibrated else None
    return ClassifyResult(
        scores=tuple(label_score(s, calibrated) for s in reply.scores),
        top=tuple(label_score(s, calibrated) for s in reply.top),
        bundle_id=reply.bundle_id, image_sha256=reply.image_sha256,
        abstain=reply.abstain,
        abstain_reason=_ABSTAIN_REASONS.get(reply.abstain_reason, AbstainReason.OTHER)
        if reply.abstain else AbstainReason.NONE,
        trust=trust,
    )


def similarity_result(reply: gateway_pb2.SimilarityResponse) -> SimilarityResult:
    rows = list(reply.rows)
    return SimilarityResult(
        cosine=np.array([list(r.cosine) for r in rows], dtype=np.float32),  # [I, T]
        probabilities=np.array([list(r.probabilities) for r in rows], dtype=np.float32),  # [I, T]
        image_sha256=tuple(r.image_sha256 for r in rows), bundle_id=reply.bundle_id,
    )


def embeddings(reply) -> Embeddings:
    return Embeddings(
        items=tuple(Embedding(np.array(e.values, dtype=np.float32), e.input_sha256) for e in reply.embeddings),
        bundle_id=reply.bundle_id,
    )


def _enum_name(enum, value: int, prefix: str) -> str:
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def model_info(reply: types_pb2.GetModelInfoResponse) -> ModelInfo:
    m = reply.model
    return ModelInfo(
        bundle_id=m.bundle_id, model=m.model, version=m.version,
        kind=_enum_name(types_pb2.ModelKind, m.kind, "MODEL_KIND_"),
        description=m.description, embed_dim=m.embed_dim, logit_scale=m.logit_scale,
        image_size=m.image_size, context_length=m.context_length,
        engines=tuple(EngineInfo(tower=_enum_name(types_pb2.Tower, e.tower, "TOWER_"), engine=e.engine,
                                 precision=_enum_name(types_pb2.Precision, e.precision, "PRECISION_"),
                                 max_batch=e.max_batch) for e in m.engines),
    )
