"""Tokenization with the `tokenizers` library from a bundle's files, exactly as open_clip's HFTokenizer."""

from __future__ import annotations

import html
from pathlib import Path

import ftfy
import numpy as np
from tokenizers import Tokenizer

from engines.runtime.manifest import TextSpec

TOKENIZER_FILE = "tokenizer.json"


def clean_whitespace(text: str) -> str:
    """open_clip's "whitespace" cleaning: ftfy repair, HTML entities unescaped (twice, as open_clip
    does), runs of whitespace collapsed to one space, ends stripped."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split())


class TextTokenizer:
    """Texts -> input ids [N, L]: cleaned, truncated to the context length, padded with pad_id.

    Rows are padded only to the longest text of the call, not to the context length: the
    text graph masks padding, so the embeddings are the same and short texts cost less.
    """

    def __init__(self, bundle_dir: Path, spec: TextSpec) -> None:
        """Load `tokenizer/tokenizer.json` of the bundle in `bundle_dir`."""
        if spec.clean != "whitespace":
            raise ValueError(f"unsupported text cleaning {spec.clean!r}")
        self.spec = spec
        self._tokenizer = Tokenizer.from_file(str(bundle_dir / spec.tokenizer_dir / TOKENIZER_FILE))
        self._tokenizer.enable_truncation(max_length=spec.context_length)
        self._tokenizer.no_padding()

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """One int64 id array per text: cleaned, truncated to the context length, unpadded."""
        encodings = self._tokenizer.encode_batch([clean_whitespace(t) for t in texts])
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def pad(self, rows: list[np.ndarray], pad_to: int | None = None) -> np.ndarray:
        """Rows -> [N, L] with pad_id; L is the longest row, or `pad_to`."""
        width = pad_to or max(len(r) for r in rows)
        out = np.full((len(rows), width), self.spec.pad_id, dtype=np.int64)  # [N, L]
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def ids(self, texts: list[str], pad_to: int | None = None) -> np.ndarray:
        """[N, L] int64 ids; L is the longest row, or `pad_to` (the context length for parity checks)."""
        return self.pad(self.encode(texts), pad_to)
