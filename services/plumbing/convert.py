"""Conversions between domain objects and protobuf messages that more than one service needs."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from engines.runtime.engine import Engine
from engines.runtime.manifest import Manifest
from medvlm.v1 import types_pb2

KIND = {
    "clinical": types_pb2.MODEL_KIND_CLINICAL,
    "demo": types_pb2.MODEL_KIND_DEMO,
    "test": types_pb2.MODEL_KIND_TEST,
    "benchmark": types_pb2.MODEL_KIND_BENCHMARK,
}
PRECISION = {
    "fp32": types_pb2.PRECISION_FP32,
    "fp16": types_pb2.PRECISION_FP16,
    "int8": types_pb2.PRECISION_INT8,
    "bf16": types_pb2.PRECISION_BF16,
}
TOWER = {"vision": types_pb2.TOWER_VISION, "text": types_pb2.TOWER_TEXT}


def engine_info(tower: str, engine: Engine) -> types_pb2.EngineInfo:
    return types_pb2.EngineInfo(
        tower=TOWER[tower],
        engine=engine.kind,
        precision=PRECISION.get(engine.precision, types_pb2.PRECISION_UNSPECIFIED),
        max_batch=engine.max_batch,
    )


def model_info(manifest: Manifest, engines: list[types_pb2.EngineInfo], signing_key_id: str = "") -> types_pb2.ModelInfo:
    return types_pb2.ModelInfo(
        bundle_id=manifest.bundle_id,
        model=manifest.model,
        version=manifest.version,
        kind=KIND.get(manifest.kind, types_pb2.MODEL_KIND_UNSPECIFIED),
        description=manifest.description,
        embed_dim=manifest.embed_dim,
        logit_scale=manifest.logit_scale,
        image_size=manifest.image.size,
        context_length=manifest.text.context_length,
        engines=engines,
        signing_key_id=signing_key_id,
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def embeddings(vectors: np.ndarray, digests: list[str]) -> list[types_pb2.Embedding]:
    """[N, D] float32 rows and their inputs' sha256 -> Embedding messages."""
    return [
        types_pb2.Embedding(values=row.tolist(), input_sha256=digest)
        for row, digest in zip(vectors, digests, strict=True)
    ]


def vectors(items) -> np.ndarray:
    """Embedding messages -> [N, D] float32."""
    return np.asarray([list(e.values) for e in items], dtype=np.float32)
