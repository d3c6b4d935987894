"""Served label sets: their embeddings (prompt ensembles), from disk or the encoder, for one text tower.

Plain objects: they take a time budget, not a gRPC context, and raise domain errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import structlog

from services.domain import DeadlineExpired, MedvlmError
from services.gateway.labels import files
from services.gateway.labels.files import LabelSet
from services.gateway.labels.search import SetEmbeddings
from services.gateway.labels.store import EmbeddingStore, index_key
from services.plumbing import metrics

log = structlog.get_logger("medvlm.gateway")

# texts -> [N, D] unit-length embeddings; raises domain errors
Encode = Callable[[list[str]], Awaitable[np.ndarray]]


def ensemble(vectors: np.ndarray, owner: list[int], count: int) -> np.ndarray:
    """The normalised mean of each label's prompt embeddings: [P, D] prompts -> [count, D]."""
    sums = np.zeros((count, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, np.asarray(owner), vectors)
    sums /= np.linalg.norm(sums, axis=1, keepdims=True)
    return sums.astype(np.float32)


class LabelSets:
    """The label sets of a directory and their embeddings for one text tower.

    A set's embeddings are made ready once per (text tower, set content): from the store when it
    holds them (no encoder call), else by encoding every prompt, in the background. Calls that
    need a set still being prepared share that work and wait at most their own budget.
    """

    def __init__(self, directory: str, store: EmbeddingStore | None, text_tower: str, encode: Encode,
                 max_text_chars: int, chunk: int) -> None:
        self.directory = Path(directory) if directory else None
        self.store = store
        self.text_tower = text_tower
        self.encode = encode
        self.max_text_chars = max_text_chars
        self.chunk = chunk
        self.catalogue = files.EMPTY
        self._signature: tuple | None = None
        self._ready: dict[str, SetEmbeddings] = {}
        self._preparing: dict[str, asyncio.Task[SetEmbeddings]] = {}

    def ready(self, ref: str) -> bool:
        return ref in self._ready

    async def reload(self) -> bool:
        """Read the directory if it changed; start preparing new sets. True when it was read."""
        if self.directory is None:
            return False
        signature = await asyncio.to_thread(files.signature, self.directory)
        if signature == self._signature:
            return False
        if not self.directory.is_dir():
            log.error("label_sets_dir_missing", directory=str(self.directory))
        before = self.catalogue
        self.catalogue = await asyncio.to_thread(files.load, self.directory, before, self.max_text_chars)
        self._signature = signature
        for refused in self.catalogue.refused:
            log.error("label_set_refused", file=refused.file, problem=refused.problem)
        metrics.LABEL_SET_FILES_REFUSED.set(len(self.catalogue.refused))
        for ref in list(self._ready):
            if ref not in self.catalogue.sets:
                del self._ready[ref]
                metrics.LABEL_CACHE_ENTRIES.labels(ref).set(0)
                metrics.LABEL_CACHE_BYTES.labels(ref).set(0)
        log.info("label_sets_read", served=list(self.catalogue.sets), refused=len(self.catalogue.refused))
        for ref in files.changed(before, self.catalogue):
            # stored embeddings are ready before this returns (at start: before serving, without
            # the text encoder); the others are encoded in the background
            label_set = self.catalogue.sets[ref]
            found = await asyncio.to_thread(self._from_store, label_set) if self.store is not None else None
            if found is not None:
                self._ready[ref] = found
            else:
                self._start(label_set)
        return True

    async def watch(self, poll_s: float) -> None:
        """Re-read the directory whenever it changes, every poll_s seconds."""
        while True:
            await asyncio.sleep(poll_s)
            try:
                await self.reload()
            except Exception as exc:  # noqa: BLE001 - keep serving the sets already read
                log.error("label_sets_reload_failed", error_type=type(exc).__name__)

    def use_text_tower(self, text_tower: str) -> None:
        """Another text tower (bundle, precision or engine) answers now: forget every embedding
        of the old one and prepare the sets again."""
        if text_tower == self.text_tower:
            return
        log.warning("label_sets_text_tower_changed", before=self.text_tower, after=text_tower)
        self.text_tower = text_tower
        self._ready.clear()
        for task in self._preparing.values():
            task.cancel()
        self._preparing.clear()
        for label_set in self.catalogue.sets.values():
            self._start(label_set)

    async def embeddings(self, ref: str, timeout: float) -> SetEmbeddings:
        """A served set's embeddings, waiting at most `timeout` for them to be prepared."""
        label_set = self.catalogue.resolve(ref)
        found = self._ready.get(label_set.ref)
        if found is not None:
            metrics.LABEL_CACHE.labels(label_set.ref, "hit").inc()
            return found
        metrics.LABEL_CACHE.labels(label_set.ref, "miss").inc()
        task = self._start(label_set)
        # shield: a caller whose budget runs out stops waiting, the preparation goes on
        done, _ = await asyncio.wait([asyncio.shield(task)], timeout=timeout)
        if not done:
            raise DeadlineExpired("the label set's embeddings were not ready within the deadline")
        return task.result()

    def _start(self, label_set: LabelSet) -> asyncio.Task[SetEmbeddings]:
        task = self._preparing.get(label_set.ref)
        if task is None:
            task = asyncio.create_task(self._prepare(label_set, self.text_tower))
            self._preparing[label_set.ref] = task
            task.add_done_callback(lambda t, ref=label_set.ref: self._settled(ref, t))
        return task

    def _settled(self, ref: str, task: asyncio.Task) -> None:
        if self._preparing.get(ref) is task:
            del self._preparing[ref]
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.warning("label_set_not_prepared", label_set=ref, error_type=type(exc).__name__,
                        reason=exc.message if isinstance(exc, MedvlmError) else "unexpected error")

    def _from_store(self, label_set: LabelSet) -> SetEmbeddings | None:
        vectors = self.store.load(index_key(self.text_tower, label_set.content_sha256))
        if vectors is None or len(vectors) != len(label_set.labels):
            return None
        metrics.LABEL_SET_LOADS.labels("disk").inc()
        log.info("label_set_ready", label_set=label_set.ref, source="disk", labels=len(vectors))
        return self._publish(label_set, vectors)

    async def _prepare(self, label_set: LabelSet, text_tower: str) -> SetEmbeddings:
        if self.store is not None:
            found = await asyncio.to_thread(self._from_store, label_set)
            if found is not None:
                self._ready[label_set.ref] = found
                return found
        texts, owner = label_set.prompts()
        parts = [await self.encode(texts[i:i + self.chunk]) for i in range(0, len(texts), self.chunk)]
        vectors = ensemble(np.concatenate(parts), owner, len(label_set.labels))  # [N_labels, D]
        if self.store is not None:
            await asyncio.to_thread(self.store.save, index_key(text_tower, label_set.content_sha256),
                                    text_tower, label_set.ref, label_set.content_sha256, vectors)
        metrics.LABEL_SET_LOADS.labels("encoder").inc()
        log.info("label_set_ready", label_set=label_set.ref, source="encoder", labels=len(vectors),
                 prompts=len(texts))
        found = self._publish(label_set, vectors)
        if text_tower == self.text_tower and label_set.ref in self.catalogue.sets:
            self._ready[label_set.ref] = found
        return found

    @staticmethod
    def _publish(label_set: LabelSet, vectors: np.ndarray) -> SetEmbeddings:
        found = SetEmbeddings(label_set, vectors)
        metrics.LABEL_CACHE_ENTRIES.labels(label_set.ref).set(len(found.vectors))
        metrics.LABEL_CACHE_BYTES.labels(label_set.ref).set(found.vectors.nbytes)
        return found
