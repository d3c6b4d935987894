"""The encoder app both encoders are built from: a verified tower of a bundle, its batcher, its model info."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import structlog

from engines.runtime.bundle import TOWER_TENSORS, Bundle, BundleError, load_bundle
from engines.runtime.engine import Engine
from engines.runtime.manifest import KIND_BENCHMARK
from engines.runtime.select import open_engine
from services.domain import MedvlmError, NotReady, Priority
from services.encoder.batching import Batcher, BatchLimit, measure_batch_limit
from services.plumbing import convert, metrics
from services.plumbing.settings import Settings

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
    # The first engine (TensorRT plan -> ONNX Runtime CUDA -> OpenVINO/ONNX Runtime CPU, at the precision asked for)
    # that opens and reproduces the golden outputs within its file's tolerance.
    selected = open_engine(bundle, tower, settings.engine, settings.precision, settings.intra_op_threads,
                           settings.max_batch, openvino_cache_dir=settings.openvino_cache_dir)
    engine, cosine = selected.engine, selected.golden_cosine
    log.info("tower_ready", tower=tower, bundle_id=bundle.bundle_id, kind=manifest.kind,
             signing_key_id=bundle.signing_key_id or None,
             engine=engine.kind, precision=engine.precision, golden_min_cosine=round(cosine, 7))
    metrics.ENGINE_INFO.labels(tower, engine.kind, engine.precision, bundle.bundle_id).set(1)
    return LoadedTower(bundle, engine, cosine)


class Preparer(Protocol):
    """The tower-specific half of an encoder: raw inputs -> engine rows, rows -> a batch."""

    def prepare(self, payload: Any) -> list[np.ndarray]:
        """Decode/tokenize one request's inputs into one array per input (blocking)."""

    def collate(self, rows: list[np.ndarray]) -> np.ndarray:
        """Rows of possibly many requests -> one engine input [B, ...]."""


@dataclasses.dataclass(frozen=True)
class Tower:
    """What makes an encoder app one tower's: its name in the bundle, its gRPC service, how its
    inputs are prepared, and how its servicer is added to a server."""

    name: str  # "vision" or "text"
    service: str  # full name of the gRPC service
    preparer: Callable[[Settings, LoadedTower], Preparer]
    add_servicer: Callable[[EncoderApp, Any], None]  # (app, grpc.aio.Server)


class EncoderApp:
    """An encoder service: a tower loaded at start, and a batcher that admits requests, prepares
    their inputs with the tower's preparer off the event loop and runs them through the engine."""

    def __init__(self, settings: Settings, tower: Tower) -> None:
        self.settings = settings
        self.tower = tower.name
        self._spec = tower
        self.service_names = (tower.service,)
        self.admission_limit = settings.inflight_limit  # calls at once, refused by the server's interceptor
        self._loaded: LoadedTower | None = None
        self._preparer: Preparer | None = None
        self.batcher: Batcher | None = None
        self._probe_failure: str | None = None

    def register(self, server: Any) -> None:
        self._spec.add_servicer(self, server)

    async def start(self) -> None:
        loaded = await asyncio.to_thread(load_tower, self.settings, self.tower)
        self._preparer = self._spec.preparer(self.settings, loaded)
        max_batch = loaded.engine.max_batch
        if self.settings.measure_batch_limit and max_batch > 1:
            max_batch = (await asyncio.to_thread(self._batch_limit, loaded)).size
        self.batcher = Batcher(
            loaded.engine.embed,  # the engine call, in the batcher's threads, off the loop
            self._preparer.collate,
            max_batch=max_batch,
            max_delay_s=self.settings.max_delay_ms / 1000,
            max_admitted=self.settings.max_queue,
            aging_s=self.settings.priority_aging_ms / 1000,
            workers=self.settings.workers,
            engine_calls=self.settings.engine_calls,
            name=self.tower,
        )
        log.info("batching", tower=self.tower, max_batch=max_batch, engine_calls=self.settings.engine_calls,
                 max_delay_ms=self.settings.max_delay_ms)
        self._loaded = loaded

    def _batch_limit(self, loaded: LoadedTower) -> BatchLimit:
        """Time the engine on the golden inputs at growing batch sizes; the batcher never forms a batch
        of a size that is slower per item than a smaller one."""
        input_key, _ = TOWER_TENSORS[self.tower]
        limit = measure_batch_limit(loaded.engine.infer, loaded.bundle.golden()[input_key], loaded.engine.max_batch)
        log.info("batch_limit_measured", tower=self.tower, engine=loaded.engine.kind,
                 precision=loaded.engine.precision, max_batch=loaded.engine.max_batch, **limit.describe())
        return limit

    @property
    def loaded(self) -> LoadedTower:
        """The served tower; NotReady until start() has verified it."""
        if self._loaded is None:
            raise NotReady("model is still loading; retry shortly")
        return self._loaded

    async def embed(self, payload: Any, priority: Priority, deadline: float | None) -> np.ndarray:
        """One request's inputs -> [N, D] unit-length embeddings, batched with other requests."""
        self.loaded  # noqa: B018 - NotReady before start
        return await self.batcher.submit(self._preparer.prepare, payload, priority, deadline)

    async def watch(self, set_serving) -> None:
        """Every probe_interval_s, when idle, run one golden input through the engine. A probe that
        fails or errs turns readiness off and marks the app stalled; the next good one clears it."""
        interval = self.settings.probe_interval_s
        if interval <= 0:
            return
        row = self.loaded.bundle.golden()[TOWER_TENSORS[self.tower][0]][0]  # one input row
        while True:
            await asyncio.sleep(interval)
            if self.batcher.admitted or self.batcher.busy_for():
                continue  # traffic exercises the engine; a wedged call is seen by stalled()
            try:
                await asyncio.wait_for(self.batcher.submit(list, [row], Priority.STAT), self.settings.liveness_stall_s)
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
        if self.batcher is None:
            return None
        running = self.batcher.busy_for()
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
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.close)
        if self._loaded is not None:
            self._loaded.engine.close()


__all__ = ["BundleError", "EncoderApp", "LoadedTower", "Tower", "load_tower"]
