"""Text embedding as a plain object: tokenize, run the engine. Knows nothing of gRPC."""

from __future__ import annotations

import numpy as np

from engines.runtime.engine import Engine
from services.common.encoder import l2_normalize
from engines.runtime.text import TextTokenizer


class TextEncoder:
    """Turns texts into unit-length embeddings with one engine."""

    def __init__(self, engine: Engine, tokenizer: TextTokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer

    def embed(self, texts: list[str]) -> np.ndarray:
        """Texts -> [N, D] unit-length float32 embeddings."""
        return l2_normalize(self.engine.infer_all(self.tokenizer.ids(texts)))
