"""Zero-shot classification and similarity over the encoders, with cached text embeddings.

Plain objects: they take a time budget, not a gRPC context, and raise domain errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import numpy as np
import structlog

from services.common.batching import ROUTINE
from services.common.errors import BundleChanged, DeadlineExpired, InvalidInput
from services.common.logs import text_digest
from services.gateway.cache import CacheKey, TextEmbeddingCache
from services.gateway.clients import Embedded, TextClient, VisionClient
from services.gateway.labelsets import LabelSet
from services.gateway.sets import LabelSets

log = structlog.get_logger("medvlm.gateway")

DEFAULT_TEMPLATE = "{}"
PLACEHOLDER = "{}"


def check_template(template: str, labels: list[str], max_chars: int) -> str:
    """The template to use ("" means "{}"): exactly one "{}", and every prompt within max_chars."""
    template = template or DEFAULT_TEMPLATE
    if template.count(PLACEHOLDER) != 1:
        raise InvalidInput('template must contain exactly one "{}"')
    extra = len(template) - len(PLACEHOLDER)
    for i, label in enumerate(labels):
        if len(label) + extra > max_chars:
            raise InvalidInput(f"prompt {i} (template + label) exceeds {max_chars} characters")
    return template


def apply_template(template: str, label: str) -> str:
    """Plain replacement of "{}", never str.format(): labels may contain braces."""
    return template.replace(PLACEHOLDER, label)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [N, M], computed in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Scores:
    """Cosines and probabilities of images against texts."""

    cosine: np.ndarray  # [N_images, N_texts]
    probabilities: np.ndarray  # [N_images, N_texts], rows sum to 1
    image_digests: list[str]
    image_vectors: np.ndarray | None = None  # [N_images, D] unit embeddings


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What the gateway verified at start that both encoders serve."""

    bundle_id: str
    embed_dim: int
    logit_scale: float
    # What computes text embeddings: "bundle id|precision|engine". Every stored or cached text
    # embedding is keyed by it, so a bundle or precision change never reuses old ones.
    text_tower: str = ""

    @property
    def text_key(self) -> str:
        return self.text_tower or self.bundle_id


@dataclasses.dataclass(frozen=True)
class SetScores:
    """The best labels of a label set for one image."""

    label_set: LabelSet
    indexes: np.ndarray  # [k] positions in the set, best first
    cosine: np.ndarray  # [k]
    probabilities: np.ndarray  # [k], softmax over every label of the set
    image_digest: str
    every_cosine: np.ndarray  # [N] every label of the set
    image_vector: np.ndarray  # [D] unit-length image embedding


class ZeroShot:
    """Classify and compare images with texts; text embeddings computed once per bundle,
    template and text, even under concurrent requests for the same label.

    Concurrent calls that need the same uncached texts share one fill: a task of its own,
    bounded by `fill_timeout_s`, that no single caller can cancel. Each caller waits for it
    only as long as its own budget allows.
    """

    def __init__(self, model: ModelIdentity, vision: VisionClient, text: TextClient, max_chars: int,
                 fill_timeout_s: float, cache_bytes: int = 64 << 20,
                 on_bundle_changed: Callable[[], None] = lambda: None) -> None:
        self.model = model
        self.on_bundle_changed = on_bundle_changed
        self.vision = vision
        self.text = text
        self.max_chars = max_chars
        self.fill_timeout_s = fill_timeout_s
        self.cache = TextEmbeddingCache(model.embed_dim, cache_bytes)
        self.sets: LabelSets | None = None
        self._pending: dict[CacheKey, asyncio.Task[dict[CacheKey, np.ndarray]]] = {}

    def _check(self, result: Embedded, what: str) -> Embedded:
        if result.bundle_id != self.model.bundle_id:
            log.error("bundle_mismatch", encoder=what, got=result.bundle_id, expected=self.model.bundle_id)
            self.on_bundle_changed()
            raise BundleChanged(
                f"{what} encoder serves bundle {result.bundle_id}, the gateway serves "
                f"{self.model.bundle_id}; refusing to mix them until the encoders agree; retry shortly"
            )
        return result

    async def embed_images(self, images: list, timeout: float, priority: int = ROUTINE) -> Embedded:
        try:
            embedded = await self.vision.embed(images, timeout, priority)
        except BundleChanged:
            self.on_bundle_changed()
            raise
        return self._check(embedded, "vision")

    async def embed_texts(self, labels: list[str], timeout: float, template: str = DEFAULT_TEMPLATE,
                          priority: int = ROUTINE) -> np.ndarray:
        """[N, D] unit-length embeddings of the labels with the template applied (a checked
        template), from the cache where possible."""
        keys = [(self.model.text_key, template, label) for label in labels]
        found = self.cache.get(keys)
        missing = list(dict.fromkeys(k for k, v in zip(keys, found, strict=True) if v is None))
        if missing:
            filled = await self._fill(missing, timeout, priority)
            found = [v if v is not None else filled[k] for k, v in zip(keys, found, strict=True)]
        return np.stack(found)  # [N, D]

    async def _fill(self, keys: list[CacheKey], timeout: float, priority: int) -> dict[CacheKey, np.ndarray]:
        """Vectors of uncached keys: start one fill for the keys nobody is encoding yet, join the
        fills already running for the others, and wait for all of them at most `timeout`."""
        mine = [k for k in keys if k not in self._pending]
        if mine:
            task = asyncio.create_task(self._encode(mine, priority))
            task.add_done_callback(lambda t, ks=mine: self._settled(t, ks))
            for k in mine:
                self._pending[k] = task
        tasks = list({id(t): t for t in (self._pending[k] for k in keys)}.values())
        # shield: a caller whose budget runs out stops waiting, the fill goes on for the others
        done, _ = await asyncio.wait([asyncio.shield(t) for t in tasks], timeout=timeout)
        if len(done) < len(tasks):
            raise DeadlineExpired("the text encoder did not answer within the deadline")
        vectors: dict[CacheKey, np.ndarray] = {}
        for t in tasks:
            vectors.update(t.result())  # re-raises the fill's error for each of its waiters
        return vectors

    async def _encode(self, keys: list[CacheKey], priority: int) -> dict[CacheKey, np.ndarray]:
        texts = [apply_template(k[1], k[2]) for k in keys]
        result = self._check(await self.text.embed(texts, self.fill_timeout_s, priority), "text")
        self.cache.put(keys, result.vectors)
        log.debug("texts_encoded", count=len(keys), digests=[text_digest(k[2]) for k in keys])
        return dict(zip(keys, result.vectors, strict=True))

    def _settled(self, task: asyncio.Task, keys: list[CacheKey]) -> None:
        for k in keys:
            if self._pending.get(k) is task:
                del self._pending[k]
        if not task.cancelled():
            task.exception()  # retrieved here; every waiter re-raises it itself

    async def encode_prompts(self, texts: list[str]) -> np.ndarray:
        """[N, D] embeddings of prompts, straight from the text encoder (routine priority), for
        label sets, whose embeddings are kept apart from the ad hoc cache."""
        result = self._check(await self.text.embed(texts, self.fill_timeout_s, ROUTINE), "text")
        return result.vectors

    async def classify_set(self, images: list, ref: str, top_k: int, timeout: float,
                           priority: int = ROUTINE) -> SetScores:
        """The top_k labels (0: all) of a served label set for one image, by exact FAISS search."""
        if self.sets is None:
            raise InvalidInput("unknown label set (see ListLabelSets)")
        self.sets.catalogue.resolve(ref)  # an unknown set is refused before any encoder call
        image_task = asyncio.ensure_future(self.embed_images(images, timeout, priority))
        try:
            found = await self.sets.embeddings(ref, timeout)
        except BaseException:
            image_task.cancel()
            raise
        embedded = await image_task
        count = len(found.label_set.labels)
        k = top_k if 0 < top_k <= count else count
        indexes, cosine, probabilities, every = found.top(embedded.vectors[0], k, self.model.logit_scale)
        return SetScores(found.label_set, indexes, cosine, probabilities, embedded.digests[0], every,
                         embedded.vectors[0])

    async def scores(self, images: list, texts: list[str], template: str, timeout: float,
                     priority: int = ROUTINE) -> Scores:
        """Cosine and softmax(logit_scale * cosine) of every image against every prompted text."""
        template = check_template(template, texts, self.max_chars)
        image_task = asyncio.ensure_future(self.embed_images(images, timeout, priority))
        try:
            text_vectors = await self.embed_texts(texts, timeout, template, priority)
        except BaseException:
            image_task.cancel()
            raise
        embedded = await image_task
        cosine = embedded.vectors @ text_vectors.T  # [N_images, N_texts]
        probabilities = softmax_rows(self.model.logit_scale * cosine)
        return Scores(cosine=cosine, probabilities=probabilities, image_digests=embedded.digests,
                      image_vectors=embedded.vectors)
