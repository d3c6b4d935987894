"""Zero-shot classification and similarity over the encoders, with cached text embeddings.

Plain objects: they take a time budget, not a gRPC context, and raise domain errors.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import structlog

from services.common.batching import ROUTINE
from services.common.errors import Inconsistent, InvalidInput
from services.common.logs import text_digest
from services.gateway.cache import CacheKey, TextEmbeddingCache
from services.gateway.clients import Embedded, TextClient, VisionClient

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


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What the gateway verified at start that both encoders serve."""

    bundle_id: str
    embed_dim: int
    logit_scale: float


class ZeroShot:
    """Classify and compare images with texts; text embeddings computed once per bundle,
    template and text, even under concurrent requests for the same label."""

    def __init__(self, model: ModelIdentity, vision: VisionClient, text: TextClient, max_chars: int) -> None:
        self.model = model
        self.vision = vision
        self.text = text
        self.max_chars = max_chars
        self.cache = TextEmbeddingCache(model.embed_dim)
        self._pending: dict[CacheKey, asyncio.Future[np.ndarray]] = {}

    def _check(self, result: Embedded, what: str) -> Embedded:
        if result.bundle_id != self.model.bundle_id:
            log.error("bundle_mismatch", encoder=what, got=result.bundle_id, expected=self.model.bundle_id)
            raise Inconsistent(
                f"{what} encoder serves bundle {result.bundle_id}, the gateway serves "
                f"{self.model.bundle_id}; refusing to mix them"
            )
        return result

    async def embed_images(self, images: list, timeout: float, priority: int = ROUTINE) -> Embedded:
        return self._check(await self.vision.embed(images, timeout, priority), "vision")

    async def embed_texts(self, labels: list[str], timeout: float, template: str = DEFAULT_TEMPLATE,
                          priority: int = ROUTINE) -> np.ndarray:
        """[N, D] unit-length embeddings of the labels with the template applied (a checked
        template), from the cache where possible."""
        keys = [(self.model.bundle_id, template, label) for label in labels]
        found = self.cache.get(keys)
        missing = [k for k, v in zip(keys, found, strict=True) if v is None]
        if missing:
            await self._fill(list(dict.fromkeys(missing)), timeout, priority)
            found = [v if v is not None else self.cache.get([k], count=False)[0]
                     for k, v in zip(keys, found, strict=True)]
        return np.stack(found)  # [N, D]

    async def _fill(self, keys: list[CacheKey], timeout: float, priority: int) -> None:
        """Encode the keys nobody is encoding yet; wait for the ones already in flight."""
        mine = [k for k in keys if k not in self._pending and k not in self.cache]
        waits = [self._pending[k] for k in keys if k in self._pending]
        if mine:
            loop = asyncio.get_running_loop()
            futures = {k: loop.create_future() for k in mine}
            self._pending.update(futures)
            try:
                texts = [apply_template(k[1], k[2]) for k in mine]
                result = self._check(await self.text.embed(texts, timeout, priority), "text")
                self.cache.put(mine, result.vectors)
                for k, vec in zip(mine, result.vectors, strict=True):
                    futures[k].set_result(vec)
                log.debug("texts_encoded", count=len(mine), digests=[text_digest(k[2]) for k in mine])
            except BaseException as exc:
                for fut in futures.values():
                    if not fut.done():
                        fut.set_exception(exc)
                        fut.exception()  # mark retrieved: waiters re-raise it themselves
                raise
            finally:
                for k in mine:
                    self._pending.pop(k, None)
        if waits:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)

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
        return Scores(cosine=cosine, probabilities=probabilities, image_digests=embedded.digests)
