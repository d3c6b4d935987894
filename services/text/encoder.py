"""Text side of the text encoder as a plain object: tokenize. Knows nothing of gRPC."""

from __future__ import annotations

import numpy as np

from engines.runtime.text import TextTokenizer
from services.encoder.app import LoadedTower
from services.plumbing.settings import Settings


class TextPreparer:
    """Texts -> token ids per text, padded per batch to its longest text."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer

    def prepare(self, texts: list[str]) -> list[np.ndarray]:
        return self.tokenizer.encode(texts)

    def collate(self, rows: list[np.ndarray]) -> np.ndarray:
        return self.tokenizer.pad(rows)  # [B, L]


def text_preparer(settings: Settings, loaded: LoadedTower) -> TextPreparer:
    """The text tower's preparer: the bundle's tokenizer."""
    return TextPreparer(TextTokenizer(loaded.bundle.path, loaded.bundle.manifest.text))
