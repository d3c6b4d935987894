"""Dynamic batcher: one worker thread owns the engine and drains a bounded priority queue into batches."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import structlog

from services.common import metrics
from services.common.errors import DeadlineExpired, MedvlmError, NotReady, Overloaded

log = structlog.get_logger("medvlm.batcher")

# Domain priorities: a lower number is served first.
STAT, URGENT, ROUTINE = 0, 1, 2
PRIORITIES = (STAT, URGENT, ROUTINE)


@dataclasses.dataclass(eq=False)
class _Request:
    """One caller's items. Touched by the worker thread only, except `future` (the loop's)."""

    rows: Sequence[np.ndarray]
    priority: int
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray]
    results: list[np.ndarray | None]
    queued: int  # items of this request still in the queue
    remaining: int  # items without a result yet
    dead: bool = False  # cancelled, expired or failed: its queued items are skipped

    def settle(self, result: np.ndarray | None = None, error: BaseException | None = None) -> None:
        """Complete the caller's future from any thread."""
        def apply() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(apply)


@dataclasses.dataclass(eq=False)
class _Item:
    request: _Request
    index: int
    enqueued: float


class Batcher:
    """Merges items of concurrent requests into engine calls of at most `max_batch` items.

    Policy: higher priority first (STAT, URGENT, ROUTINE), first come first served within a
    priority; an item that has waited longer than `aging_s` is served before fresher items
    of any priority, so routine work is delayed but never starved. A batch is sent as soon
    as it is full, or when nothing more is known to be coming (`pending()` is 0), or after
    `max_delay_s`. Items whose deadline passed are dropped before compute; items of
    cancelled calls are skipped. At most `max_queue` items wait; more are refused.
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        collate: Callable[[list[np.ndarray]], np.ndarray],
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        aging_s: float,
        pending: Callable[[], int] = lambda: 0,
        name: str = "engine",
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self._infer = infer
        self._collate = collate
        self.max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._max_queue = max_queue
        self._aging_s = aging_s
        self._pending = pending
        self._name = name
        self._queues: dict[int, collections.deque[_Item]] = {p: collections.deque() for p in PRIORITIES}
        self._queued = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"medvlm-batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Items waiting for the engine."""
        with self._cond:
            return self._queued

    async def submit(self, rows: Sequence[np.ndarray], priority: int = ROUTINE,
                     deadline: float | None = None) -> np.ndarray:
        """Queue one request's rows; returns [len(rows), D] outputs in row order."""
        loop = asyncio.get_running_loop()
        request = _Request(rows, priority, deadline, loop, loop.create_future(),
                           [None] * len(rows), len(rows), len(rows))
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise NotReady("server is shutting down")
            if self._queued + len(rows) > self._max_queue:
                metrics.REJECTED.labels(self._name).inc()
                raise Overloaded(
                    f"queue full: {self._queued} items waiting (limit {self._max_queue}); retry shortly",
                    retry_after_s=self._retry_hint(),
                )
            for index in range(len(rows)):
                self._queues[priority].append(_Item(request, index, now))
            self._queued += len(rows)
            metrics.QUEUE_DEPTH.labels(self._name).set(self._queued)
            self._cond.notify()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._abandon(request)
            raise

    def _retry_hint(self) -> float:
        return max(0.05, min(5.0, 0.01 * self._queued))

    def _abandon(self, request: _Request) -> None:
        """A caller gave up: its queued items free their slots now and are never computed."""
        with self._cond:
            if not request.dead:
                request.dead = True
                self._queued -= request.queued
                request.queued = 0
                metrics.QUEUE_DEPTH.labels(self._name).set(self._queued)

    def close(self) -> None:
        """Stop taking requests; queued work is refused, the running batch finishes."""
        with self._cond:
            self._closed = True
            for queue in self._queues.values():
                for item in queue:
                    if not item.request.dead:
                        item.request.dead = True
                        item.request.settle(error=NotReady("server is shutting down"))
                queue.clear()
            self._queued = 0
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # --- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and self._queued == 0:
                    self._cond.wait()
                if self._closed:
                    return
                started = time.monotonic()
                while self._queued < self.max_batch and self._pending() > 0 and not self._closed:
                    left = self._max_delay_s - (time.monotonic() - started)
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, expired = self._take(time.monotonic())
                metrics.QUEUE_DEPTH.labels(self._name).set(self._queued)
            for request in expired:
                metrics.EXPIRED.labels(self._name).inc()
                request.settle(error=DeadlineExpired("deadline passed while waiting for the engine"))
            if batch:
                self._compute(batch)

    def _head(self, priority: int) -> _Item | None:
        queue = self._queues[priority]
        while queue and queue[0].request.dead:
            queue.popleft()  # slots of dead requests were released when they died
        return queue[0] if queue else None

    def _next(self, now: float) -> collections.deque[_Item] | None:
        heads = {p: h for p in PRIORITIES if (h := self._head(p)) is not None}
        if not heads:
            return None
        aged = [p for p, h in heads.items() if now - h.enqueued >= self._aging_s]
        if aged:
            return self._queues[min(aged, key=lambda p: heads[p].enqueued)]
        return self._queues[min(heads)]

    def _take(self, now: float) -> tuple[list[_Item], list[_Request]]:
        batch: list[_Item] = []
        expired: list[_Request] = []
        while len(batch) < self.max_batch and (queue := self._next(now)) is not None:
            item = queue.popleft()
            request = item.request
            self._queued -= 1
            request.queued -= 1
            if request.deadline is not None and now >= request.deadline:
                request.dead = True
                self._queued -= request.queued
                request.queued = 0
                expired.append(request)
                continue
            metrics.QUEUE_WAIT.labels(self._name).observe(now - item.enqueued)
            batch.append(item)
        # items of a request that expired after some of its items were taken are not computed
        batch = [item for item in batch if not item.request.dead]
        return batch, expired

    def _compute(self, batch: list[_Item]) -> None:
        inputs = self._collate([item.request.rows[item.index] for item in batch])  # [B, ...]
        metrics.BATCH_SIZE.labels(self._name).observe(len(batch))
        started = time.perf_counter()
        try:
            outputs = self._infer(inputs)  # [B, D]
        except Exception as exc:  # noqa: BLE001 - every waiting caller must hear about it
            log.error("engine_failed", batcher=self._name, error_type=type(exc).__name__, exc_info=exc)
            for request in {id(i.request): i.request for i in batch}.values():
                request.dead = True
                with self._cond:
                    self._queued -= request.queued
                    request.queued = 0
                request.settle(error=MedvlmError("the engine failed on this batch"))
            return
        finally:
            metrics.ENGINE_SECONDS.labels(self._name).observe(time.perf_counter() - started)
        for item, row in zip(batch, outputs, strict=True):
            request = item.request
            request.results[item.index] = row
            request.remaining -= 1
            if request.remaining == 0 and not request.dead:
                request.settle(result=np.stack(request.results))  # type: ignore[arg-type]
