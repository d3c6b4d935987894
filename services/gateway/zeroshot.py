"""Zero-shot classification and similarity over the encoders, with cached text embeddings.

Plain objects: they take a time budget, not a gRPC context, check input and raise domain errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import structlog

from services.domain import BundleChanged, DeadlineExpired, InvalidInput, ROUTINE
from services.gateway.cache import CacheKey, TextEmbeddingCache
from services.gateway.clients import Embedded, TextClient, VisionClient
from services.gateway.labels import DEFAULT_TEMPLATE, LabelSet, LabelSets, SetEmbeddings, apply_template, softmax
from services.gateway.questions import Question, check_question, check_template, top_count
from services.gateway.trust import Trust, Verdict
from services.plumbing.limits import check_images, check_texts
from services.plumbing.logs import text_digest
from services.plumbing.settings import Settings

log = structlog.get_logger("medvlm.gateway")

T = TypeVar("T")


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
    # What computes text embeddings: "bundle id|precision|engine". Every stored or cached text
    # embedding is keyed by it, so a bundle or precision change never reuses old ones.
    text_tower: str = ""

    @property
    def text_key(self) -> str:
        return self.text_tower or self.bundle_id


@dataclasses.dataclass(frozen=True)
class LabelScore:
    """One label's score; the fields of the public LabelScore."""

    label: str
    index: int  # position in the request's labels or in the label set
    probability: float  # softmax(logit_scale * cosine) over every label
    cosine: float
    calibrated_probability: float  # the calibration's, else `probability` again
    code: str = ""  # a label set's code for the label


@dataclasses.dataclass(frozen=True)
class Answer:
    """One image classified."""

    scores: list[LabelScore]  # every label in request order; empty for a label set
    top: list[LabelScore]  # the best top_k, most probable first
    image_sha256: str
    label_set: str  # "name@version" of the set that answered; "" for labels
    verdict: Verdict | None  # the calibration's judgement; None without a calibration


class ZeroShot:
    """Classify and compare images with texts; text embeddings computed once per bundle,
    template and text, even under concurrent requests for the same label.

    Concurrent calls that need the same uncached texts share one fill: a task of its own,
    bounded by the downstream timeout, that no single caller can cancel. Each caller waits for it
    only as long as its own budget allows.
    """

    def __init__(self, model: ModelIdentity, vision: VisionClient, text: TextClient, settings: Settings,
                 sets: LabelSets | None = None, trust: Trust | None = None,
                 on_bundle_changed: Callable[[], None] = lambda: None) -> None:
        self.model = model
        self.on_bundle_changed = on_bundle_changed
        self.vision = vision
        self.text = text
        self.settings = settings
        self.sets = sets
        self.trust = trust  # the bundle's calibration, when --calibration names one
        self.cache = TextEmbeddingCache(model.embed_dim, settings.label_cache_mb << 20)
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
        """Unit-length embeddings of image messages, checked against the limits."""
        return await self._embed_images(check_images(images, self.settings), timeout, priority)

    async def _embed_images(self, images: list, timeout: float, priority: int) -> Embedded:
        try:
            embedded = await self.vision.embed(images, timeout, priority)
        except BundleChanged:
            self.on_bundle_changed()
            raise
        return self._check(embedded, "vision")

    async def _alongside_images(self, images: list, work: Awaitable[T], timeout: float,
                                priority: int) -> tuple[Embedded, T]:
        """Embed the images while `work` runs; the image call is cancelled when `work` fails."""
        image_task = asyncio.ensure_future(self._embed_images(images, timeout, priority))
        try:
            done = await work
        except BaseException:
            image_task.cancel()
            raise
        return await image_task, done

    async def embed_texts(self, texts: list[str], timeout: float, priority: int = ROUTINE) -> np.ndarray:
        """[N, D] unit-length embeddings of texts as they are, checked against the limits; cached."""
        return await self._texts(check_texts(texts, self.settings), timeout, DEFAULT_TEMPLATE, priority)

    async def _texts(self, labels: list[str], timeout: float, template: str, priority: int) -> np.ndarray:
        """[N, D] unit-length embeddings of the labels in a checked template, cached where possible."""
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
        result = self._check(await self.text.embed(texts, self.settings.downstream_timeout_s, priority), "text")
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
        result = self._check(await self.text.embed(texts, self.settings.downstream_timeout_s, ROUTINE), "text")
        return result.vectors

    async def classify(self, image, question: Question, timeout: float, priority: int = ROUTINE) -> Answer:
        """One image message (None: none sent) against labels or a label set: checked (limits, question
        rules), scored, the best top_k listed and, with a calibration, judged. Labels sent in the
        request are a transient set, scored as a served set is."""
        images, asked = check_question(image, question, self.settings)
        if asked is None:
            if self.sets is None:
                raise InvalidInput("unknown label set (see ListLabelSets)")
            served = self.sets.catalogue.resolve(question.label_set)  # refused before any encoder call
            embeddings = self.sets.embeddings(served.ref, timeout)
        else:
            embeddings = self._transient(asked, timeout, priority)
        embedded, found = await self._alongside_images(images, embeddings, timeout, priority)
        return self._answer(found, embedded, question.top_k)

    async def _transient(self, asked: LabelSet, timeout: float, priority: int) -> SetEmbeddings:
        """A request's labels with their cached (or just encoded) embeddings in its one template."""
        labels = [label.name for label in asked.labels]
        return SetEmbeddings(asked, await self._texts(labels, timeout, asked.templates[0], priority))

    def _answer(self, found: SetEmbeddings, embedded: Embedded, top_k: int) -> Answer:
        """Score one image against a set; a transient set lists every label in `scores` as well."""
        label_set, vector = found.label_set, embedded.vectors[0]  # vector: [D]
        ranked = found.rank(vector, top_count(top_k, len(label_set.labels)), self.model.logit_scale)
        verdict = self.trust and self.trust.judge(ranked.cosine, vector, label_set, self.model.logit_scale)
        calibrated = ranked.probabilities if verdict is None else verdict.calibrated

        def score(i: int) -> LabelScore:
            label = label_set.labels[i]
            return LabelScore(label.name, int(i), float(ranked.probabilities[i]), float(ranked.cosine[i]),
                              float(calibrated[i]), label.code)

        every = [score(i) for i in range(len(label_set.labels))] if label_set.transient else []
        top = [every[i] if every else score(i) for i in ranked.order]
        return Answer(every, top, embedded.digests[0], label_set.ref, verdict)

    async def similarity(self, images: list, texts: list[str], template: str, timeout: float,
                         priority: int = ROUTINE) -> Scores:
        """Cosine and softmax(logit_scale * cosine) of every image against every prompted text, both
        checked against the limits."""
        images, texts = check_images(images, self.settings), check_texts(texts, self.settings)
        template = check_template(template, texts, self.settings.max_text_chars)
        embedded, text_vectors = await self._alongside_images(
            images, self._texts(texts, timeout, template, priority), timeout, priority)
        cosine = embedded.vectors @ text_vectors.T  # [N_images, N_texts]
        return Scores(cosine=cosine, probabilities=softmax(self.model.logit_scale * cosine),
                      image_digests=embedded.digests)
