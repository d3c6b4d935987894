"""Admission and dynamic batching of an encoder: one bound on admitted work, one worker thread owning the engine."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import structlog

from services.domain import ROUTINE, SERVED, STAT, URGENT, DeadlineExpired, MedvlmError, NotReady, Overloaded, Priority
from services.plumbing import metrics

log = structlog.get_logger("medvlm.batcher")


@dataclasses.dataclass(frozen=True)
class BatchLimit:
    """The largest batch worth forming on this engine and machine, and the timings it rests on."""

    size: int
    seconds_per_item: dict[int, float]  # batch size -> median engine seconds per item
    stopped: str  # why no larger size was allowed

    def describe(self) -> dict[str, object]:
        return {"batch_limit": self.size, "stopped": self.stopped,
                "ms_per_item": {str(b): round(1000 * t, 2) for b, t in sorted(self.seconds_per_item.items())}}


def measure_batch_limit(
    infer: Callable[[np.ndarray], np.ndarray],
    rows: np.ndarray,
    max_batch: int,
    *,
    rounds: int = 5,
    tolerance: float = 0.10,
    budget_s: float = 20.0,
    min_time_s: float = 0.05,
    clock: Callable[[], float] = time.perf_counter,
) -> BatchLimit:
    """Largest batch size (1, 2, 4, ... up to max_batch) whose engine time per item is not more than
    `tolerance` above the best smaller size's.

    On a compute-bound CPU a big batch can take longer per item than small ones (a ViT-B/16 on 2
    cores: 15-40 % more per item at batch 4-8 than at 1), so a batcher that fills to max_batch serves
    fewer items per second under load than one at a time. Sizes whose time per item is flat stay
    allowed: a batch still saves the serving path's per-call work (thread hand-offs, collation).
    Each step times the best size so far and the next one alternately, `rounds` times each (a
    timing repeats the call until it lasts `min_time_s`, so a fast engine is not timed at the
    clock's grain), and compares medians, so load from other processes hits both alike. It stops at the first size that
    is slower per item, at max_batch, or before a step that would take the measurement past
    `budget_s`. `rows` [M, ...] are repeated to fill a batch.
    """
    def batch(size: int) -> np.ndarray:
        return rows[np.arange(size) % len(rows)]

    def per_item(size: int, times: list[float]) -> None:
        example = batch(size)
        calls = 0
        started = clock()
        while calls == 0 or clock() - started < min_time_s:
            infer(example)
            calls += 1
        times.append((clock() - started) / (calls * size))

    began = clock()
    infer(batch(1))  # lazy allocations out of the first timing
    measured: dict[int, float] = {}
    best = limit = 1
    size = 1
    stopped = f"max_batch {max_batch}"
    while size < max_batch:
        size = min(2 * size, max_batch)
        if measured:  # predicted cost of the step from what the best size took per item
            cost = rounds * (max(min_time_s, best * measured[best]) + max(min_time_s, size * measured[best]))
            if clock() - began + cost > budget_s:
                stopped = f"start-up budget of {budget_s:.0f} s (next step {size}: about {cost:.1f} s)"
                break
        times: dict[int, list[float]] = {best: [], size: []}
        for k in range(rounds):
            for s in ((best, size) if k % 2 == 0 else (size, best)):
                per_item(s, times[s])
        measured[best] = float(np.median(times[best]))
        measured[size] = float(np.median(times[size]))
        if measured[size] > measured[best] * (1 + tolerance):
            stopped = (f"batch {size} is slower per item ({1000 * measured[size]:.2f} ms vs "
                       f"{1000 * measured[best]:.2f} ms at {best})")
            break
        limit = size
        if measured[size] < measured[best]:
            best = size
    return BatchLimit(limit, measured, stopped)


@dataclasses.dataclass(eq=False)
class Ticket:
    """One caller's request, from admission until its result is delivered.

    `future` belongs to the caller's event loop; every other field is read and written only under
    the batcher's lock.
    """

    count: int  # items admitted for this request
    priority: Priority
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray]
    rows: Sequence[np.ndarray] = ()
    results: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    preparing: bool = True  # its inputs are being decoded/tokenized (or wait for a thread to be)
    queued: int = 0  # items of this request still in the queue
    remaining: int = 0  # items without a result yet
    done: bool = False  # settled, or given up: nothing more of it is prepared or computed

    def expired(self, now: float) -> bool:
        """Its deadline (a time.monotonic() instant) has passed."""
        return self.deadline is not None and now >= self.deadline

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
    """An encoder's admission and batching: requests are admitted, prepared in a thread pool (decode,
    tokenize), queued, and merged into engine calls of at most `max_batch` items.

    Admission: at most `max_admitted` items are admitted at once, counted from submit() until they
    are taken for an engine call (being prepared or queued); a request that would pass the bound is
    refused at once (Overloaded, with a retry hint), before any of its work is done.
    Deadline: a request whose deadline has passed is dropped (DeadlineExpired, counted as expired)
    wherever it is seen before compute: when its preparation would start, when it is taken from the
    queue, or when its caller gives up. A cancelled caller's work is never computed.
    Order: higher priority first (STAT, URGENT, ROUTINE), first come first served within a priority;
    an item that has waited longer than `aging_s` is served before fresher items of any priority,
    so routine work is delayed but never starved.
    Batching: at most `engine_calls` batches are computed at once, each by its own worker thread.
    A batch is sent as soon as it is full, when no admitted request is still being prepared, or
    after `max_delay_s`. A thread that has just prepared a request and finds the engine idle with
    nothing else queued or being prepared computes it itself, which saves two thread hand-offs per
    request when the service is not busy; otherwise a worker thread does.
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        collate: Callable[[list[np.ndarray]], np.ndarray],
        *,
        max_batch: int,
        max_delay_s: float,
        max_admitted: int,
        aging_s: float,
        workers: int = 2,
        engine_calls: int = 1,
        name: str = "engine",
    ) -> None:
        if max_batch < 1 or max_admitted < 1 or engine_calls < 1:
            raise ValueError("max_batch, max_admitted and engine_calls must be at least 1")
        self._infer = infer
        self._collate = collate
        self.max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._max_admitted = max_admitted
        self._aging_s = aging_s
        self._name = name
        self._queues: dict[Priority, collections.deque[_Item]] = {p: collections.deque() for p in SERVED}
        self._live: set[Ticket] = set()  # admitted and not yet settled or wholly taken for compute
        self._admitted = 0  # items being prepared or queued: what the bound counts
        self._queued = 0
        self._preparing = 0  # requests being prepared: a fuller batch is worth a short wait
        self._engine_calls = engine_calls  # batches that may be formed or computed at once
        self._running: list[float] = []  # time.monotonic() when each of them was started
        self._forming = False  # a worker is waiting for a fuller batch
        self._cond = threading.Condition()
        self._closed = False
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"medvlm-prepare-{name}")
        metrics.QUEUE_CAPACITY.labels(name).set(max_admitted)
        self._threads = [threading.Thread(target=self._run, name=f"medvlm-batcher-{name}-{i}", daemon=True)
                         for i in range(engine_calls)]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        """Items waiting for the engine."""
        with self._cond:
            return self._queued

    @property
    def admitted(self) -> int:
        """Items admitted and not yet taken for an engine call (being prepared or queued)."""
        with self._cond:
            return self._admitted

    def busy_for(self) -> float:
        """Seconds the oldest engine call in progress has been running (0 when the engine is idle)."""
        with self._cond:
            return time.monotonic() - min(self._running) if self._running else 0.0

    async def submit(self, prepare: Callable[[Any], Sequence[np.ndarray]], payload: Sequence[Any],
                     priority: Priority = ROUTINE, deadline: float | None = None) -> np.ndarray:
        """[len(payload), D] engine outputs of one request, in order. `prepare(payload)` runs in the
        pool and gives one engine row per element of `payload`; its exceptions reach the caller.
        `deadline` is a time.monotonic() instant. Cancelling the caller gives its admission back."""
        loop = asyncio.get_running_loop()
        ticket = Ticket(len(payload), Priority.of(priority), deadline, loop, loop.create_future())
        with self._cond:
            if self._closed:
                raise NotReady("server is shutting down")
            if self._admitted + ticket.count > self._max_admitted:
                metrics.REJECTED.labels(self._name).inc()
                raise Overloaded(
                    f"queue full: {self._admitted} items admitted (limit {self._max_admitted}); retry shortly",
                    retry_after_s=max(0.05, min(5.0, 0.01 * self._admitted)),
                )
            self._admitted += ticket.count
            self._preparing += 1
            self._live.add(ticket)
        try:
            job = self._pool.submit(self._prepare, ticket, prepare, payload)
        except BaseException:
            self._give_up(ticket)
            raise
        try:
            return await ticket.future
        except asyncio.CancelledError:
            job.cancel()
            self._give_up(ticket)
            raise

    def _give_up(self, ticket: Ticket) -> None:
        """The caller is gone: the ticket's admitted items are released now and never computed.

        A caller whose deadline has passed is counted as expired: gRPC cancels a call when its
        deadline passes, so this is where most expired work is seen.
        """
        with self._cond:
            if self._release(ticket) and ticket.expired(time.monotonic()):
                metrics.EXPIRED.labels(self._name).inc()

    def _release(self, ticket: Ticket) -> bool:
        """Under the lock: the ticket is done; its admitted items free their slots. False if it
        already was."""
        if ticket.done:
            return False
        ticket.done = True
        if ticket.preparing:
            ticket.preparing = False
            self._preparing -= 1
            self._admitted -= ticket.count
        else:
            self._admitted -= ticket.queued
            self._queued -= ticket.queued
            ticket.queued = 0
        self._live.discard(ticket)
        metrics.QUEUE_DEPTH.labels(self._name).set(self._queued)
        self._cond.notify_all()  # the worker may be waiting for this request's preparation
        return True

    def _dropped_expired(self, ticket: Ticket, now: float) -> bool:
        """Under the lock: the one deadline rule, applied before more work is done for a ticket. True
        if its deadline has passed: it is then released, counted and told (DeadlineExpired)."""
        if not ticket.expired(now):
            return False
        if self._release(ticket):
            metrics.EXPIRED.labels(self._name).inc()
            ticket.settle(error=DeadlineExpired("deadline passed before the work reached the engine"))
        return True

    def close(self) -> None:
        """Stop taking requests; admitted work not yet computing is refused, the running batch finishes."""
        with self._cond:
            self._closed = True
            for ticket in list(self._live):
                self._release(ticket)
                ticket.settle(error=NotReady("server is shutting down"))
            for queue in self._queues.values():
                queue.clear()
            self._cond.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for thread in self._threads:
            thread.join(timeout=30)

    # --- preparing threads ----------------------------------------------------------------------

    def _prepare(self, ticket: Ticket, prepare: Callable[[Any], Sequence[np.ndarray]], payload: Any) -> None:
        """In a pool thread: prepare, queue, and compute here if this is the only work there is."""
        with self._cond:
            if self._dropped_expired(ticket, time.monotonic()) or ticket.done:
                return
        try:
            rows = prepare(payload)
            if len(rows) != ticket.count:
                raise ValueError(f"prepare gave {len(rows)} rows for {ticket.count} inputs")
        except Exception as exc:  # noqa: BLE001 - bad input (or a bug) reaches its caller
            with self._cond:
                if self._release(ticket):
                    ticket.settle(error=exc)
            return
        now = time.monotonic()
        with self._cond:
            if ticket.done:
                return  # given up while it was being prepared
            ticket.preparing = False
            self._preparing -= 1
            ticket.rows, ticket.results = rows, [None] * len(rows)
            ticket.queued = ticket.remaining = len(rows)
            self._queues[ticket.priority].extend(_Item(ticket, index, now) for index in range(len(rows)))
            self._queued += len(rows)
            metrics.QUEUE_DEPTH.labels(self._name).set(self._queued)
            # Only on an idle engine: a preparing thread busy computing prepares nothing meanwhile.
            if self._running or self._closed or self._preparing or self._queued != len(rows):
                self._cond.notify_all()  # the worker batches it with the others
                return
            self._running.append(now)
            batch = self._take(now)
        self._finish(batch, now)

    # --- engine side: the worker thread, or a preparing thread that found the engine idle ---------

    def _run(self) -> None:
        while True:
            with self._cond:
                # one worker forms a batch at a time: two forming at once would split it
                while not self._closed and (self._queued == 0 or self._forming
                                            or len(self._running) >= self._engine_calls):
                    self._cond.wait()
                if self._closed:
                    return
                started = time.monotonic()
                self._running.append(started)
                self._forming = True
                while self._queued < self.max_batch and self._preparing > 0 and not self._closed:
                    left = self._max_delay_s - (time.monotonic() - started)
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self._forming = False
                batch = self._take(time.monotonic())  # wakes the other workers
            self._finish(batch, started)

    def _finish(self, batch: list[tuple[_Item, np.ndarray]], started: float) -> None:
        """Outside the lock: compute the batch, then let the next one start."""
        try:
            if batch:
                self._compute(batch)
        finally:
            with self._cond:
                self._running.remove(started)
                self._cond.notify_all()

    def _head(self, priority: Priority) -> _Item | None:
        queue = self._queues[priority]
        while queue and queue[0].request.done:
            queue.popleft()  # slots of finished requests were released when they finished
        return queue[0] if queue else None

    def _next(self, now: float) -> collections.deque[_Item] | None:
        heads = {p: h for p in SERVED if (h := self._head(p)) is not None}
        if not heads:
            return None
        aged = [p for p, h in heads.items() if now - h.enqueued >= self._aging_s]
        if aged:
            return self._queues[min(aged, key=lambda p: heads[p].enqueued)]
        return self._queues[max(heads)]

    def _take(self, now: float) -> list[tuple[_Item, np.ndarray]]:
        """Under the lock: the next batch's items and rows; expired requests are dropped on the way."""
        batch: list[_Item] = []
        while len(batch) < self.max_batch and (queue := self._next(now)) is not None:
            item = queue.popleft()
            request = item.request
            if self._dropped_expired(request, now):
                continue
            request.queued -= 1
            self._queued -= 1
            self._admitted -= 1
            if request.queued == 0:
                self._live.discard(request)
            metrics.QUEUE_WAIT.labels(self._name).observe(now - item.enqueued)
            batch.append(item)
        metrics.QUEUE_DEPTH.labels(self._name).set(self._queued)
        self._cond.notify_all()
        return [(item, item.request.rows[item.index]) for item in batch if not item.request.done]

    def _compute(self, batch: list[tuple[_Item, np.ndarray]]) -> None:
        inputs = self._collate([row for _, row in batch])  # [B, ...]
        metrics.BATCH_SIZE.labels(self._name).observe(len(batch))
        started = time.perf_counter()
        try:
            outputs = self._infer(inputs)  # [B, D]
        except Exception as exc:  # noqa: BLE001 - every waiting caller must hear about it
            log.error("engine_failed", batcher=self._name, error_type=type(exc).__name__, exc_info=exc)
            with self._cond:
                for item, _ in batch:
                    if self._release(item.request):
                        item.request.settle(error=MedvlmError("the engine failed on this batch"))
            return
        finally:
            metrics.ENGINE_SECONDS.labels(self._name).observe(time.perf_counter() - started)
        with self._cond:
            for (item, _), row in zip(batch, outputs, strict=True):
                request = item.request
                if request.done:
                    continue
                request.results[item.index] = row
                request.remaining -= 1
                if request.remaining == 0:
                    request.done = True
                    request.settle(result=np.stack(request.results))  # type: ignore[arg-type]
