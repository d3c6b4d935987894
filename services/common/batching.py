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
class Ticket:
    """One caller's request, from the moment it is announced until its result is delivered.

    Fields other than `future` are guarded by the batcher's lock; `future` belongs to the loop.
    """

    priority: int
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray]
    rows: Sequence[np.ndarray] = ()
    results: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    queued: int = 0  # items of this request still in the queue
    remaining: int = 0  # items without a result yet
    announced: bool = True  # counted as in preparation until enqueued or abandoned
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
    request: Ticket
    index: int
    enqueued: float


class Batcher:
    """Merges items of concurrent requests into engine calls of at most `max_batch` items.

    Policy: higher priority first (STAT, URGENT, ROUTINE), first come first served within a
    priority; an item that has waited longer than `aging_s` is served before fresher items
    of any priority, so routine work is delayed but never starved. A batch is sent as soon
    as it is full, or when no announced request is still being prepared, or after
    `max_delay_s`. Items whose deadline passed are dropped before compute; items of
    cancelled calls are skipped. At most `max_queue` items wait; more are refused.

    One batch runs at a time. The worker thread runs batches while requests keep coming;
    a thread that has just queued a request and finds the engine idle with nothing more
    coming runs the batch itself (`run_if_idle`), which saves two thread hand-offs per
    request when the service is not busy.
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
        self._name = name
        self._queues: dict[int, collections.deque[_Item]] = {p: collections.deque() for p in PRIORITIES}
        self._queued = 0
        self._preparing = 0  # announced requests not yet queued: a fuller batch is worth a short wait
        self._busy = False  # a batch is being computed (by the worker or by run_if_idle)
        self._busy_since = 0.0  # time.monotonic() when the running batch was taken
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"medvlm-batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Items waiting for the engine."""
        with self._cond:
            return self._queued

    def busy_for(self) -> float:
        """Seconds the engine call in progress has been running (0 when the engine is idle)."""
        with self._cond:
            return time.monotonic() - self._busy_since if self._busy else 0.0

    def announce(self, priority: int = ROUTINE, deadline: float | None = None) -> Ticket:
        """A request is on its way (its inputs are being prepared). On the event loop."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closed:
                raise NotReady("server is shutting down")
            self._preparing += 1
        return Ticket(priority, deadline, loop, loop.create_future())

    def enqueue(self, ticket: Ticket, rows: Sequence[np.ndarray]) -> None:
        """Queue an announced request's rows (from any thread); Overloaded when the queue is full."""
        now = time.monotonic()
        with self._cond:
            self._unannounce(ticket)
            if ticket.dead:
                return  # abandoned while it was being prepared
            if self._closed:
                raise NotReady("server is shutting down")
            if self._queued + len(rows) > self._max_queue:
                metrics.REJECTED.labels(self._name).inc()
                raise Overloaded(
                    f"queue full: {self._queued} items waiting (limit {self._max_queue}); retry shortly",
                    retry_after_s=self._retry_hint(),
                )
            ticket.rows, ticket.results = rows, [None] * len(rows)
            ticket.queued = ticket.remaining = len(rows)
            for index in range(len(rows)):
                self._queues[ticket.priority].append(_Item(ticket, index, now))
            self._queued += len(rows)
            metrics.QUEUE_DEPTH.labels(self._name).set(self._queued)
            self._cond.notify()

    async def result(self, ticket: Ticket) -> np.ndarray:
        """[len(rows), D] outputs of a queued request in row order; cancelling gives its slots back."""
        try:
            return await ticket.future
        except asyncio.CancelledError:
            self.abandon(ticket)
            raise

    async def submit(self, rows: Sequence[np.ndarray], priority: int = ROUTINE,
                     deadline: float | None = None) -> np.ndarray:
        """Announce, queue and await one request whose rows are ready (the worker computes it)."""
        ticket = self.announce(priority, deadline)
        try:
            self.enqueue(ticket, rows)
        except BaseException:
            self.abandon(ticket)
            raise
        return await self.result(ticket)

    def abandon(self, ticket: Ticket) -> None:
        """A caller gave up or failed: its queued items free their slots now and are never computed.

        A caller whose deadline has passed is counted as deadline-dropped: gRPC cancels a call
        when its deadline expires, so this is where most expired work is seen.
        """
        with self._cond:
            self._unannounce(ticket)
            if not ticket.dead:
                if ticket.deadline is not None and time.monotonic() >= ticket.deadline:
                    metrics.EXPIRED.labels(self._name).inc()
                ticket.dead = True
                self._queued -= ticket.queued
                ticket.queued = 0
                metrics.QUEUE_DEPTH.labels(self._name).set(self._queued)

    def _unannounce(self, ticket: Ticket) -> None:
        """Under the lock: the ticket is no longer in preparation; the worker may stop waiting for it."""
        if ticket.announced:
            ticket.announced = False
            self._preparing -= 1
            self._cond.notify()

    def _retry_hint(self) -> float:
        return max(0.05, min(5.0, 0.01 * self._queued))

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

    # --- engine side: the worker thread, or a thread that found the engine idle ----------------

    def run_if_idle(self, ticket: Ticket) -> None:
        """Compute a queued request in the calling thread (never the event loop) when it is the only
        work there is: the engine idle, nothing else queued or being prepared. Otherwise the worker
        batches it with the others."""
        with self._cond:
            if self._busy or self._closed or self._preparing or self._queued != ticket.queued:
                return
            self._busy, self._busy_since = True, time.monotonic()
            batch, expired = self._take(self._busy_since)
        self._finish(batch, expired)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._queued == 0 or self._busy):
                    self._cond.wait()
                if self._closed:
                    return
                self._busy = True
                started = time.monotonic()
                while self._queued < self.max_batch and self._preparing > 0 and not self._closed:
                    left = self._max_delay_s - (time.monotonic() - started)
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self._busy_since = time.monotonic()
                batch, expired = self._take(self._busy_since)
            self._finish(batch, expired)

    def _finish(self, batch: list[_Item], expired: list[Ticket]) -> None:
        """Outside the lock: settle what expired, compute the batch, then let the next one start."""
        try:
            for request in expired:
                metrics.EXPIRED.labels(self._name).inc()
                request.settle(error=DeadlineExpired("deadline passed while waiting for the engine"))
            if batch:
                self._compute(batch)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify()

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

    def _take(self, now: float) -> tuple[list[_Item], list[Ticket]]:
        batch: list[_Item] = []
        expired: list[Ticket] = []
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
        metrics.QUEUE_DEPTH.labels(self._name).set(self._queued)
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
