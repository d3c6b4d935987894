"""The gateway service: clients to both encoders, verified at start and followed while serving."""

from __future__ import annotations

import asyncio

import grpc
import structlog

from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2
from services.domain import DeadlineExpired, Inconsistent, MedvlmError, NotReady
from services.gateway.clients import TextClient, VisionClient
from services.gateway.servicer import GatewayServicer
from services.gateway.labels import EmbeddingStore, LabelSets
from services.gateway.trust import Trust
from services.gateway.zeroshot import ModelIdentity, ZeroShot
from services.plumbing import metrics
from services.plumbing.settings import Settings
from services.security.tls import encoder_certificates

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
    servicer: type[GatewayServicer] = GatewayServicer  # what register() serves; bench.leaky_gateway swaps it

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admission_limit = settings.inflight_limit
        certificates = encoder_certificates(settings)
        self.vision = VisionClient(settings.vision_target, settings.max_message_bytes, certificates)
        self.text = TextClient(settings.text_target, settings.max_message_bytes, certificates)
        self._core: ZeroShot | None = None
        self._info: types_pb2.ModelInfo | None = None
        self._recheck = asyncio.Event()  # set when a reply named another bundle
        self.store: EmbeddingStore | None = None
        self.sets: LabelSets | None = None
        self._text_verified = True
        self._sets_task: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(self.servicer(self), server)

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
        """Both encoders verified (agreed_identity); or, with a data directory, the vision encoder
        alone when the text encoder does not answer but a text tower was verified for its bundle
        before (label sets are then served from disk; the text tower is checked again once it answers)."""
        try:
            identity, info = agreed_identity(*await asyncio.gather(self.vision.model_info(5.0),
                                                                   self.text.model_info(5.0)))
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
        if self.sets is None:
            self.sets = LabelSets(self.settings.label_sets_dir, self.store, identity.text_key,
                                  lambda texts: self.core.encode_prompts(texts),
                                  self.settings.max_text_chars, self.settings.max_texts)
        else:
            self.sets.use_text_tower(identity.text_key)
        self._info = info
        self._core = ZeroShot(identity, self.vision, self.text, self.settings, self.sets, trust,
                              on_bundle_changed=self._recheck.set)
        log.info("encoders_verified", bundle_id=identity.bundle_id, embed_dim=identity.embed_dim,
                 text_tower=identity.text_tower, text_verified=self._text_verified,
                 calibration=trust.calibration.calibration_id if trust else None)

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
        self.core  # noqa: B018 - NotReady until verified (set together with the core)
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
