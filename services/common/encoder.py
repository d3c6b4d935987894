"""What both encoders share: loading and verifying their tower of a bundle, and describing it."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Protocol

import numpy as np
import structlog

from engines.runtime.bundle import TOWER_TENSORS, Bundle, BundleError, load_bundle
from engines.runtime.engine import Engine
from engines.runtime.manifest import KIND_BENCHMARK
from engines.runtime.select import open_engine
from services.common import convert, metrics
from services.common.batching import STAT, Batcher, Ticket
from services.common.errors import MedvlmError, NotReady
from services.common.settings import Settings
from services.common.work import WorkPool

log = structlog.get_logger("medvlm.encoder")


@dataclasses.dataclass(frozen=True)
class LoadedTower:
    """A verified bundle and the engine running one of its towers."""

    bundle: Bundle
    engine: Engine
    golden_cosine: float


def load_tower(settings: Settings, tower: str) -> LoadedTower:
    """Load the bundle, check hashes, open the engine, run the golden inputs (which also warms it).

    Blocking; raises BundleError when the bundle must not be served.
    """
    trusted = [k.strip() for k in settings.trusted_bundle_keys.split(",") if k.strip()]
    bundle = load_bundle(settings.bundle, trusted)
    manifest = bundle.manifest
    if manifest.kind == KIND_BENCHMARK and not settings.allow_benchmark:
        raise BundleError(
            f"bundle {bundle.bundle_id} is a benchmark model (random weights); "
            "serve it only with --allow-benchmark"
        )
    # The first engine (TensorRT plan -> ONNX Runtime CUDA -> CPU, at the precision asked for)
    # that opens and reproduces the golden outputs within its file's tolerance.
    selected = open_engine(bundle, tower, settings.engine, settings.precision, settings.intra_op_threads,
                           settings.max_batch)
    engine, cosine = selected.engine, selected.golden_cosine
    log.info("tower_ready", tower=tower, bundle_id=bundle.bundle_id, kind=manifest.kind,
             signing_key_id=bundle.signing_key_id or None,
             engine=engine.kind, precision=engine.precision, golden_min_cosine=round(cosine, 7))
    metrics.ENGINE_INFO.labels(tower, engine.kind, engine.precision, bundle.bundle_id).set(1)
    return LoadedTower(bundle, engine, cosine)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of [N, D] scaled to unit length (float32)."""
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Preparer(Protocol):
    """The service-specific half of an encoder: raw inputs -> engine rows, rows -> a batch."""

    def prepare(self, payload: Any) -> list[np.ndarray]:
        """Decode/tokenize one request's inputs into one array per item (blocking)."""

    def collate(self, rows: list[np.ndarray]) -> np.ndarray:
        """Rows of possibly many requests -> one engine input [B, ...]."""


class EncoderApp:
    """Base of the two encoder services: a tower loaded at start, a work pool that prepares
    inputs off the event loop, and a batcher that owns the engine.

    Subclasses set `tower` and `service_names`, implement register() and make_preparer().
    """

    tower: str
    service_names: tuple[str, ...]
    admission_limit = None  # the work pool bounds calls in flight (settings.max_inflight)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = WorkPool(settings.workers, settings.max_inflight, name=f"medvlm-{self.tower}")
        self._loaded: LoadedTower | None = None
        self._preparer: Preparer | None = None
        self._batcher: Batcher | None = None
        self._probe_failure: str | None = None

    def register(self, server: Any) -> None:  # pragma: no cover - subclasses
        raise NotImplementedError

    def make_preparer(self, loaded: LoadedTower) -> Preparer:  # pragma: no cover - subclasses
        raise NotImplementedError

    async def start(self) -> None:
        loaded = await asyncio.to_thread(load_tower, self.settings, self.tower)
        self._preparer = self.make_preparer(loaded)
        self._batcher = Batcher(
            lambda batch: l2_normalize(loaded.engine.infer(batch)),  # in the engine's thread, off the loop
            self._preparer.collate,
            max_batch=loaded.engine.max_batch,
            max_delay_s=self.settings.max_delay_ms / 1000,
            max_queue=self.settings.max_queue,
            aging_s=self.settings.priority_aging_ms / 1000,
            name=self.tower,
        )
        self._loaded = loaded

    @property
    def loaded(self) -> LoadedTower:
        """The served tower; NotReady until start() has verified it."""
        if self._loaded is None:
            raise NotReady("model is still loading; retry shortly")
        return self._loaded

    async def embed(self, payload: Any, priority: int, deadline: float | None) -> np.ndarray:
        """One request's inputs -> [N, D] unit-length embeddings, batched with other requests."""
        self.loaded  # noqa: B018 - NotReady before start
        ticket = self._batcher.announce(priority, deadline)
        try:
            await self.pool.run(self._prepare_and_queue, payload, ticket, deadline=deadline)
        except BaseException:
            self._batcher.abandon(ticket)
            raise
        return await self._batcher.result(ticket)

    def _prepare_and_queue(self, payload: Any, ticket: Ticket) -> None:
        """In a work-pool thread: decode/tokenize, queue, and run the batch here if the engine is idle."""
        self._batcher.enqueue(ticket, self._preparer.prepare(payload))
        self._batcher.run_if_idle(ticket)

    async def watch(self, set_serving) -> None:
        """Every probe_interval_s, when idle, run one golden input through the engine. A probe that
        fails or errs turns readiness off and marks the app stalled; the next good one clears it."""
        interval = self.settings.probe_interval_s
        if interval <= 0:
            return
        row = self.loaded.bundle.golden()[TOWER_TENSORS[self.tower][0]][0]  # one input row
        while True:
            await asyncio.sleep(interval)
            if self._batcher.queued or self._batcher.busy_for():
                continue  # traffic exercises the engine; a wedged call is seen by stalled()
            try:
                await asyncio.wait_for(self._batcher.submit([row], STAT), self.settings.liveness_stall_s)
                failure = None
            except TimeoutError:
                failure = f"probe inference took longer than {self.settings.liveness_stall_s} s"
            except MedvlmError as exc:
                failure = f"probe inference failed: {exc.message}"
            if failure != self._probe_failure:
                if failure:
                    log.error("probe_failed", tower=self.tower, reason=failure)
                else:
                    log.info("probe_ok_again", tower=self.tower)
                self._probe_failure = failure
                await set_serving(failure is None)

    def stalled(self) -> str | None:
        """Stuck: an engine call running longer than liveness_stall_s, or the probe failing."""
        if self._batcher is None:
            return None
        running = self._batcher.busy_for()
        if running > self.settings.liveness_stall_s:
            return f"an engine call has run for {running:.0f} s (limit {self.settings.liveness_stall_s} s)"
        return self._probe_failure

    def model_info(self):
        loaded = self.loaded
        return convert.model_info(
            loaded.bundle.manifest, [convert.engine_info(self.tower, loaded.engine)], loaded.bundle.signing_key_id
        )

    def audit_fields(self) -> dict[str, str]:
        return {"bundle_signer": self.loaded.bundle.signing_key_id}

    async def close(self) -> None:
        if self._batcher is not None:
            await asyncio.to_thread(self._batcher.close)
        self.pool.close()
        if self._loaded is not None:
            self._loaded.engine.close()


__all__ = ["BundleError", "EncoderApp", "LoadedTower", "l2_normalize", "load_tower"]
