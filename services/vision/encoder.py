"""Image embedding as a plain object: decode, preprocess, run the engine. Knows nothing of gRPC."""

from __future__ import annotations

import numpy as np

from engines.runtime.engine import Engine
from engines.runtime.manifest import ImageSpec
from services.common.encoder import l2_normalize
from services.vision.preprocess import DecodeLimits, decode_image, preprocess


class ImageEncoder:
    """Turns encoded images into unit-length embeddings with one engine."""

    def __init__(self, engine: Engine, spec: ImageSpec, limits: DecodeLimits) -> None:
        self.engine = engine
        self.spec = spec
        self.limits = limits

    def prepare(self, items: list[tuple[bytes, str | None]]) -> np.ndarray:
        """(bytes, declared format) pairs -> [N, 3, S, S] float32; InvalidInput names the bad one."""
        tensors = [
            preprocess(decode_image(data, fmt, self.limits, label=f"image {i}"), self.spec)
            for i, (data, fmt) in enumerate(items)
        ]
        return np.stack(tensors)  # [N, 3, S, S]

    def embed(self, items: list[tuple[bytes, str | None]]) -> np.ndarray:
        """Encoded images -> [N, D] unit-length float32 embeddings."""
        return l2_normalize(self.engine.infer_all(self.prepare(items)))
