"""Ad hoc text-embedding cache: labels sent in requests, bounded, least recently used evicted first."""

from __future__ import annotations

import collections

import numpy as np

from services.plumbing import metrics

CacheKey = tuple[str, str, str]  # (text tower: bundle id, precision, engine; template; text)

# Bookkeeping per entry besides its vector: the key tuple and its strings, the dict slot.
ENTRY_OVERHEAD_BYTES = 256


class TextEmbeddingCache:
    """Unit-length text embeddings of ad hoc labels, at most `max_bytes` of them.

    Vectors live in one float32 slab that grows by doubling up to the bound; the least recently
    used entry gives up its row when the cache is full. Keys include the text tower, so
    embeddings of another bundle or precision never match.
    """

    def __init__(self, dim: int, max_bytes: int = 64 << 20, name: str = "adhoc") -> None:
        self.dim = dim
        self.name = name
        self.entry_bytes = 4 * dim + ENTRY_OVERHEAD_BYTES
        self.capacity = max(1, max_bytes // self.entry_bytes)
        self._slab = np.empty((min(self.capacity, 1024), dim), dtype=np.float32)  # [rows, D]
        self._rows: collections.OrderedDict[CacheKey, int] = collections.OrderedDict()
        self._free: list[int] = list(range(len(self._slab) - 1, -1, -1))
        self.evictions = 0
        self._lookups = {r: metrics.LABEL_CACHE.labels(name, r) for r in ("hit", "miss")}
        self._evicted = metrics.LABEL_CACHE_EVICTIONS.labels(name)
        self._publish()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._rows

    @property
    def nbytes(self) -> int:
        """Memory the cache holds: its slab plus the bookkeeping of its entries."""
        return self._slab.nbytes + ENTRY_OVERHEAD_BYTES * len(self._rows)

    def get(self, keys: list[CacheKey], count: bool = True) -> list[np.ndarray | None]:
        """The cached vector of each key (a copy), or None; counts hits and misses unless told not to."""
        out: list[np.ndarray | None] = []
        for key in keys:
            row = self._rows.get(key)
            if row is not None:
                self._rows.move_to_end(key)
            if count:
                result = "miss" if row is None else "hit"
                metrics.TEXT_CACHE.labels(result).inc()
                self._lookups[result].inc()
            out.append(None if row is None else self._slab[row].copy())
        return out

    def put(self, keys: list[CacheKey], vectors: np.ndarray) -> None:
        """Add [N, D] vectors under their keys (keys already present keep their vector), evicting
        the least recently used entries beyond the bound."""
        for key, vector in zip(keys, vectors, strict=True):
            if key in self._rows:
                continue
            self._rows[key] = row = self._take_row()
            self._slab[row] = vector
        self._publish()

    def _take_row(self) -> int:
        if not self._free and len(self._slab) < self.capacity:
            grown = min(self.capacity, 2 * len(self._slab))
            slab = np.empty((grown, self.dim), dtype=np.float32)
            slab[: len(self._slab)] = self._slab
            self._free = list(range(grown - 1, len(self._slab) - 1, -1))
            self._slab = slab
        if not self._free:
            _, row = self._rows.popitem(last=False)
            self.evictions += 1
            self._evicted.inc()
            return row
        return self._free.pop()

    def _publish(self) -> None:
        metrics.LABEL_CACHE_ENTRIES.labels(self.name).set(len(self._rows))
        metrics.LABEL_CACHE_BYTES.labels(self.name).set(self.nbytes)
