"""Text-embedding cache: a FAISS index keyed by (bundle id, prompt template, text)."""

from __future__ import annotations

import faiss
import numpy as np

from services.common import metrics

CacheKey = tuple[str, str, str]  # (bundle_id, template, text)


class TextEmbeddingCache:
    """Unit-length text embeddings in an exact inner-product FAISS index.

    Keys include the bundle id, so embeddings of different bundles never mix; the
    index also answers nearest-text queries (inner product = cosine for unit vectors).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._ids: dict[CacheKey, int] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._ids

    def get(self, keys: list[CacheKey], count: bool = True) -> list[np.ndarray | None]:
        """The cached vector of each key, or None; counts hits and misses unless told not to."""
        out: list[np.ndarray | None] = []
        for key in keys:
            ident = self._ids.get(key)
            if count:
                self.hits += ident is not None
                self.misses += ident is None
                metrics.TEXT_CACHE.labels("miss" if ident is None else "hit").inc()
            out.append(None if ident is None else self._index.reconstruct(ident))
        return out

    def put(self, keys: list[CacheKey], vectors: np.ndarray) -> None:
        """Add [N, D] vectors under their keys (keys already present are left as they are)."""
        new = [(k, v) for k, v in zip(keys, vectors, strict=True) if k not in self._ids]
        if not new:
            return
        start = len(self._ids)
        ids = np.arange(start, start + len(new), dtype=np.int64)
        block = np.ascontiguousarray(np.stack([v for _, v in new]), dtype=np.float32)  # [M, D]
        self._index.add_with_ids(block, ids)
        for (key, _), ident in zip(new, ids, strict=True):
            self._ids[key] = int(ident)
