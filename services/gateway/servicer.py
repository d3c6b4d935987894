"""GatewayService: converts messages and delegates to ZeroShot."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import structlog

from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2
from services.common import convert, metrics
from services.common.errors import DeadlineExpired, Inconsistent, InvalidInput, MedvlmError, NotReady
from services.common.interceptors import status_of
from services.common.settings import Settings
from services.common.texts import check_texts
from services.common.tls import encoder_certificates
from services.gateway.clients import TextClient, VisionClient
from services.gateway.labelsets import LabelSet
from services.gateway.sets import LabelSets
from services.gateway.store import EmbeddingStore
from services.gateway.stream import map_unordered
from services.gateway.trust import Trust, Verdict
from services.gateway.zeroshot import DEFAULT_TEMPLATE, ModelIdentity, SetScores, ZeroShot

log = structlog.get_logger("medvlm.gateway")


def agreed_identity(vision_info: types_pb2.ModelInfo,
                    text_info: types_pb2.ModelInfo) -> tuple[ModelIdentity, types_pb2.ModelInfo]:
    """The identity both encoders serve and a ModelInfo carrying both engines; Inconsistent
    when they serve different bundles or dimensions."""
    if (vision_info.bundle_id, vision_info.embed_dim) != (text_info.bundle_id, text_info.embed_dim):
        raise Inconsistent(
            f"encoders disagree: vision serves {vision_info.bundle_id} (dim {vision_info.embed_dim}), "
            f"text serves {text_info.bundle_id} (dim {text_info.embed_dim})"
        )
    info = types_pb2.ModelInfo()
    info.CopyFrom(vision_info)
    info.engines.extend(text_info.engines)
    identity = ModelIdentity(vision_info.bundle_id, vision_info.embed_dim, vision_info.logit_scale,
                             text_tower(text_info))
    return identity, info


def text_tower(info: types_pb2.ModelInfo) -> str:
    """"bundle id|precision|engine" of the text tower a ModelInfo describes: what text embeddings
    are keyed by, in memory and on disk."""
    engines = [e for e in info.engines if e.tower == types_pb2.TOWER_TEXT]
    engine = engines[0] if engines else types_pb2.EngineInfo()
    return f"{info.bundle_id}|{types_pb2.Precision.Name(engine.precision)}|{engine.engine}"


async def verify_encoders(vision: VisionClient, text: TextClient,
                          timeout: float = 5.0) -> tuple[ModelIdentity, types_pb2.ModelInfo]:
    """Ask both encoders what they serve and require the same bundle and dimension (see
    agreed_identity); the clients' errors when one does not answer."""
    return agreed_identity(*await asyncio.gather(vision.model_info(timeout), text.model_info(timeout)))


# How the gateway follows its vision encoder once serving: a grpc.health.v1 check every
# second; NOT_SERVING at once when it answers NOT_SERVING or cannot be reached, and after three
# checks in a row without an answer (a hung encoder; one slow answer under load is not an outage).
CHECK_INTERVAL_S = 1.0
CHECK_TIMEOUT_S = 2.0
SILENT_CHECKS_DOWN = 3


class GatewayApp:
    """The gateway service: clients to both encoders, verified at start.

    Its health follows the vision encoder, which every image call needs. A text-encoder outage
    leaves it SERVING: labels already cached still answer, uncached ones get UNAVAILABLE; the
    outage is logged and shown by medvlm_encoder_up{encoder="text"}.
    """

    service_names = (gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admission_limit = settings.max_inflight
        self.retained: list | None = [] if settings.fault_retain_requests else None
        certificates = encoder_certificates(settings)
        self.vision = VisionClient(settings.vision_target, settings.max_message_bytes, certificates)
        self.text = TextClient(settings.text_target, settings.max_message_bytes, certificates)
        self._core: ZeroShot | None = None
        self._info: types_pb2.ModelInfo | None = None
        self._recheck = asyncio.Event()  # set when a reply named another bundle
        self.trust: Trust | None = None  # the bundle's calibration, when --calibration names one
        self.store: EmbeddingStore | None = None
        self.sets: LabelSets | None = None
        self._text_verified = True
        self._sets_task: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(self), server)

    async def start(self) -> None:
        """Wait, as long as it takes, until both encoders answer and agree (or, with stored label
        sets, the vision encoder alone: see _verify); NOT_SERVING meanwhile. Stored label sets are
        ready before this returns."""
        if self.settings.data_dir:
            self.store = await asyncio.to_thread(EmbeddingStore, self.settings.data_dir)
        delay = 0.5
        while True:
            try:
                identity, info = await self._verify()
                self._adopt(identity, info)
                break
            except MedvlmError as exc:
                log.warning("encoders_not_verified", reason=exc.message, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.verify_retry_max_s)
        metrics.ENCODER_UP.labels("vision").set(1)
        metrics.ENCODER_UP.labels("text").set(int(self._text_verified))
        await self.sets.reload()
        self._sets_task = asyncio.create_task(self.sets.watch(self.settings.label_sets_poll_s))

    async def _verify(self) -> tuple[ModelIdentity, types_pb2.ModelInfo]:
        """Both encoders verified; or, with a data directory, the vision encoder alone when the
        text encoder does not answer but a text tower was verified for its bundle before (label
        sets are then served from disk; the text tower is checked again once it answers)."""
        try:
            identity, info = await verify_encoders(self.vision, self.text)
        except MedvlmError as exc:
            if self.store is None or isinstance(exc, Inconsistent):
                raise
            vision_info = await self.vision.model_info(5.0)
            remembered = await asyncio.to_thread(self.store.text_tower, vision_info.bundle_id)
            if remembered is None:
                raise
            log.warning("text_encoder_unverified", reason=exc.message, assumed_text_tower=remembered)
            self._text_verified = False
            return ModelIdentity(vision_info.bundle_id, vision_info.embed_dim, vision_info.logit_scale,
                                 remembered), vision_info
        await self._text_confirmed(identity)
        return identity, info

    async def _text_confirmed(self, identity: ModelIdentity) -> None:
        self._text_verified = True
        if self.store is not None:
            await asyncio.to_thread(self.store.remember_text_tower, identity.bundle_id, identity.text_tower)

    def _adopt(self, identity: ModelIdentity, info: types_pb2.ModelInfo) -> None:
        """Serve this bundle from now on, with a text cache of its own (embeddings never mix);
        label sets switch to the embeddings of its text tower (bundle, precision, engine).
        Inconsistent, and nothing changes, when --calibration was made for another bundle."""
        trust = Trust.load(self.settings.calibration, identity.bundle_id) if self.settings.calibration else None
        core = ZeroShot(identity, self.vision, self.text, self.settings.max_text_chars,
                        self.settings.downstream_timeout_s, self.settings.label_cache_mb << 20,
                        on_bundle_changed=self._recheck.set)
        if self.sets is None:
            self.sets = LabelSets(self.settings.label_sets_dir, self.store, identity.text_key, self._encode_prompts,
                                  self.settings.max_text_chars, self.settings.max_texts)
        else:
            self.sets.use_text_tower(identity.text_key)
        core.sets = self.sets
        self.trust, self._info, self._core = trust, info, core
        log.info("encoders_verified", bundle_id=identity.bundle_id, embed_dim=identity.embed_dim,
                 text_tower=identity.text_tower, text_verified=self._text_verified,
                 calibration=trust.calibration.calibration_id if trust else None)

    async def _encode_prompts(self, texts: list[str]):
        return await self.core.encode_prompts(texts)

    async def watch(self, set_serving) -> None:
        """Follow both encoders every CHECK_INTERVAL_S, and at once when a reply named another
        bundle. SERVING while the vision encoder is up and the encoders agree on a bundle; when
        they agree on a new one (a rollout), it is adopted without a restart."""
        up = {"vision": True, "text": self._text_verified}
        silent = {"vision": 0, "text": 0}
        agree = serving = True
        while True:
            try:
                await asyncio.wait_for(self._recheck.wait(), CHECK_INTERVAL_S)
            except TimeoutError:
                pass
            recheck = self._recheck.is_set() or not agree
            self._recheck.clear()
            answers = await asyncio.gather(self.vision.serving(CHECK_TIMEOUT_S), self.text.serving(CHECK_TIMEOUT_S))
            for name, answer in zip(("vision", "text"), answers, strict=True):
                silent[name] = silent[name] + 1 if answer is None else 0
                now = up[name] and silent[name] < SILENT_CHECKS_DOWN if answer is None else answer
                if now != up[name]:
                    up[name] = now
                    recheck = recheck or now  # a recovered (or replaced) encoder may serve another bundle
                    metrics.ENCODER_UP.labels(name).set(int(now))
                    log.warning("encoder_down" if not now else "encoder_up", encoder=name)
            if recheck and up["vision"]:
                agree = await self._reverify()
            if (up["vision"] and agree) != serving:
                serving = up["vision"] and agree
                await set_serving(serving)

    async def _reverify(self) -> bool:
        """Do the encoders (still) agree on a bundle? A new bundle is adopted only when both
        confirm it; with the text encoder unreachable, the vision encoder must serve ours."""
        try:
            vision_info = await self.vision.model_info(CHECK_TIMEOUT_S)
        except MedvlmError:
            return False
        try:
            text_info = await self.text.model_info(CHECK_TIMEOUT_S)
        except MedvlmError:
            return vision_info.bundle_id == self.core.model.bundle_id
        try:
            identity, info = agreed_identity(vision_info, text_info)
        except Inconsistent as exc:
            log.warning("encoders_disagree", reason=exc.message)
            return False
        if identity != self.core.model or not self._text_verified:
            if identity.bundle_id != self.core.model.bundle_id:
                log.warning("bundle_changed", old=self.core.model.bundle_id, new=identity.bundle_id)
            try:
                self._adopt(identity, info)
            except Inconsistent as exc:  # the calibration file is the old bundle's: not served
                log.error("bundle_not_adopted", reason=exc.message)
                return False
            await self._text_confirmed(identity)
        return True

    def stalled(self) -> str | None:
        """The gateway runs no engine: it is live while its event loop answers."""
        return None

    @property
    def core(self) -> ZeroShot:
        if self._core is None:
            raise NotReady("gateway has not verified its encoders yet; retry shortly")
        return self._core

    @property
    def info(self) -> types_pb2.ModelInfo:
        if self._info is None:
            raise NotReady("gateway has not verified its encoders yet; retry shortly")
        return self._info

    def audit_fields(self) -> dict[str, str]:
        return {"bundle_signer": self.info.signing_key_id}

    async def close(self) -> None:
        if self._sets_task is not None:
            self._sets_task.cancel()
        await asyncio.gather(self.vision.close(), self.text.close())
        if self.store is not None:
            self.store.close()

    def timeout(self, context: grpc.aio.ServicerContext) -> float:
        """Budget for downstream calls: the caller's remaining time, capped by the setting."""
        remaining = context.time_remaining()
        budget = self.settings.downstream_timeout_s if remaining is None else min(remaining, self.settings.downstream_timeout_s)
        if budget <= 0:
            raise DeadlineExpired("deadline passed before the gateway could call the encoders")
        return budget

    def check_images(self, images) -> list:
        if not images:
            raise InvalidInput("no images in the request")
        if len(images) > self.settings.max_images:
            raise InvalidInput(f"{len(images)} images exceeds the limit of {self.settings.max_images} per request")
        for i, image in enumerate(images):
            if len(image.data) > self.settings.max_image_bytes:
                raise InvalidInput(
                    f"image {i}: {len(image.data)} bytes exceeds the limit of {self.settings.max_image_bytes} bytes"
                )
        return list(images)


def _label_score(labels: list[str], index: int, probabilities: np.ndarray, cosine: np.ndarray) -> gateway_pb2.LabelScore:
    return gateway_pb2.LabelScore(
        label=labels[index], index=index,
        probability=float(probabilities[index]), cosine=float(cosine[index]),
    )


_REASONS = {"": gateway_pb2.ABSTAIN_REASON_UNSPECIFIED,
            "out_of_distribution": gateway_pb2.ABSTAIN_REASON_OUT_OF_DISTRIBUTION,
            "low_confidence": gateway_pb2.ABSTAIN_REASON_LOW_CONFIDENCE}


def _add_trust(response: gateway_pb2.ClassifyResponse, verdict: Verdict | None) -> gateway_pb2.ClassifyResponse:
    """Calibrated probabilities, abstain flag and trust assessment into a ClassifyResponse; without a
    calibration, calibrated_probability repeats probability and `trust` stays unset."""
    for score in (*response.scores, *response.top):
        score.calibrated_probability = score.probability if verdict is None else float(verdict.calibrated[score.index])
    if verdict is not None:
        response.abstain = verdict.abstain
        response.abstain_reason = _REASONS[verdict.reason]
        response.trust.CopyFrom(gateway_pb2.Trust(
            ood_score=verdict.ood_score, ood_threshold=verdict.ood_threshold, min_probability=verdict.min_probability,
            temperature=verdict.temperature, scope=verdict.scope, calibration_id=verdict.calibration_id))
    return response


def _set_response(found: SetScores, bundle_id: str) -> gateway_pb2.ClassifyResponse:
    labels = found.label_set.labels
    top = [
        gateway_pb2.LabelScore(label=labels[i].name, index=int(i), probability=float(p), cosine=float(c),
                               code=labels[i].code)
        for i, c, p in zip(found.indexes, found.cosine, found.probabilities, strict=True)
    ]
    return gateway_pb2.ClassifyResponse(top=top, bundle_id=bundle_id, image_sha256=found.image_digest,
                                        label_set=found.label_set.ref)


def _summary(label_set: LabelSet, ready: bool) -> gateway_pb2.LabelSetSummary:
    return gateway_pb2.LabelSetSummary(
        name=label_set.name, version=label_set.version, description=label_set.description,
        label_count=len(label_set.labels), templates=label_set.templates, ready=ready,
        content_sha256=label_set.content_sha256,
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Converts the public messages; ZeroShot does the work."""

    def __init__(self, app: GatewayApp) -> None:
        self.app = app

    async def Classify(self, request, context):
        return await self._classify(request, self.app.timeout(context))

    async def _classify(self, request, timeout: float) -> gateway_pb2.ClassifyResponse:
        core = self.app.core
        if self.app.retained is not None:
            self.app.retained.append(request)  # the soak's leaking control (fault_retain_requests)
        if not request.HasField("image"):
            raise InvalidInput("no image in the request")
        images = self.app.check_images([request.image])
        if request.label_set:
            if request.labels:
                raise InvalidInput("send labels or a label_set, not both")
            if request.template:
                raise InvalidInput("a label set brings its own templates: leave template empty")
            found = await core.classify_set(images, request.label_set, request.top_k, timeout,
                                            convert.priority(request.priority))
            trust = self.app.trust
            # a set is judged by its own calibrated scope, else the bundle's: no per-call label list
            verdict = trust and trust.judge(
                found.every_cosine, found.image_vector, [], "", core.model.logit_scale,
                scope=trust.calibration.scope_named(found.label_set.ref) or trust.calibration.default())
            return _add_trust(_set_response(found, core.model.bundle_id), verdict)
        labels = check_texts(list(request.labels), self.app.settings, what="label", minimum=2)
        if len(set(labels)) != len(labels):
            raise InvalidInput("labels must be distinct")
        scores = await core.scores(images, labels, request.template, timeout, convert.priority(request.priority))
        probabilities, cosine = scores.probabilities[0], scores.cosine[0]  # [N_labels]
        order = np.argsort(-probabilities, kind="stable")
        k = request.top_k if 0 < request.top_k <= len(labels) else len(labels)
        verdict = self.app.trust and self.app.trust.judge(
            cosine, scores.image_vectors[0], labels, request.template or DEFAULT_TEMPLATE, core.model.logit_scale)
        return _add_trust(gateway_pb2.ClassifyResponse(
            scores=[_label_score(labels, i, probabilities, cosine) for i in range(len(labels))],
            top=[_label_score(labels, int(i), probabilities, cosine) for i in order[:k]],
            bundle_id=core.model.bundle_id,
            image_sha256=scores.image_digests[0],
        ), verdict)

    async def ClassifyStream(self, request_iterator, context):
        self.app.core  # noqa: B018 - NotReady before the stream starts

        async def items():
            shared = gateway_pb2.ClassifyRequest()  # labels, template, top_k carried forward
            async for message in request_iterator:
                request = message.request
                if request.labels or request.label_set:
                    shared = gateway_pb2.ClassifyRequest(
                        labels=request.labels, label_set=request.label_set, template=request.template,
                        top_k=request.top_k,
                    )
                else:
                    merged = gateway_pb2.ClassifyRequest()
                    merged.CopyFrom(shared)
                    merged.image.CopyFrom(request.image)
                    merged.priority = request.priority
                    request = merged
                yield message.correlation_id, request

        async def one(item):
            correlation_id, request = item
            try:
                result = await self._classify(request, self.app.timeout(context))
                return gateway_pb2.ClassifyStreamResponse(correlation_id=correlation_id, result=result)
            except MedvlmError as exc:
                error = gateway_pb2.ItemError(code=status_of(exc).name, message=exc.message)
                return gateway_pb2.ClassifyStreamResponse(correlation_id=correlation_id, error=error)

        async for response in map_unordered(items(), one, self.app.settings.stream_window):
            yield response

    async def Similarity(self, request, context):
        core = self.app.core
        images = self.app.check_images(request.images)
        texts = check_texts(list(request.texts), self.app.settings, what="text")
        scores = await core.scores(
            images, texts, request.template, self.app.timeout(context), convert.priority(request.priority)
        )
        rows = [
            gateway_pb2.SimilarityRow(cosine=c.tolist(), probabilities=p.tolist(), image_sha256=d)
            for c, p, d in zip(scores.cosine, scores.probabilities, scores.image_digests, strict=True)
        ]
        return gateway_pb2.SimilarityResponse(rows=rows, bundle_id=core.model.bundle_id)

    async def EmbedImages(self, request, context):
        core = self.app.core
        images = self.app.check_images(request.images)
        result = await core.embed_images(images, self.app.timeout(context), convert.priority(request.priority))
        return types_pb2.EmbedImagesResponse(
            embeddings=convert.embeddings(result.vectors, result.digests), bundle_id=result.bundle_id
        )

    async def EmbedTexts(self, request, context):
        core = self.app.core
        texts = check_texts(list(request.texts), self.app.settings, what="text")
        vectors = await core.embed_texts(
            texts, self.app.timeout(context), DEFAULT_TEMPLATE, convert.priority(request.priority)
        )
        digests = [convert.sha256_hex(t.encode("utf-8")) for t in texts]
        return types_pb2.EmbedTextsResponse(
            embeddings=convert.embeddings(vectors, digests), bundle_id=core.model.bundle_id
        )

    async def GetModelInfo(self, request, context):
        return types_pb2.GetModelInfoResponse(model=self.app.info)

    async def ListLabelSets(self, request, context):
        sets = self.app.core.sets
        return gateway_pb2.ListLabelSetsResponse(
            label_sets=[_summary(s, sets.ready(ref)) for ref, s in sets.catalogue.sets.items()],
            refused=[gateway_pb2.RefusedLabelSetFile(file=r.file, problem=r.problem) for r in sets.catalogue.refused],
        )

    async def GetLabelSet(self, request, context):
        sets = self.app.core.sets
        label_set = sets.catalogue.resolve(request.label_set)
        return gateway_pb2.GetLabelSetResponse(
            label_set=_summary(label_set, sets.ready(label_set.ref)),
            labels=[gateway_pb2.Label(name=x.name, code=x.code, synonyms=x.synonyms) for x in label_set.labels],
        )
