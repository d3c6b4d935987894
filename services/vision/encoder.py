"""Image side of the vision encoder as a plain object: decode and preprocess. Knows nothing of gRPC."""

from __future__ import annotations

import numpy as np

from engines.runtime.manifest import ImageSpec
from services.vision.preprocess import DecodeLimits, decode_image, preprocess


class ImagePreparer:
    """Encoded images -> normalized [3, S, S] tensors, stacked into engine batches."""

    def __init__(self, spec: ImageSpec, limits: DecodeLimits) -> None:
        self.spec = spec
        self.limits = limits

    def prepare(self, items: list[tuple[bytes, str | None]]) -> list[np.ndarray]:
        """(bytes, declared format) pairs -> one [3, S, S] float32 per image; InvalidInput names
        the bad one."""
        return [
            preprocess(decode_image(data, fmt, self.limits, label=f"image {i}"), self.spec)
            for i, (data, fmt) in enumerate(items)
        ]

    def collate(self, rows: list[np.ndarray]) -> np.ndarray:
        return np.stack(rows)  # [B, 3, S, S]
