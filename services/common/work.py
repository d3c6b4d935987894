"""Blocking work (decode, tokenize, engine calls) off the event loop, with a bound on calls in flight."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from services.common.errors import DeadlineExpired, Overloaded

T = TypeVar("T")


class WorkPool:
    """A thread pool that admits at most `max_inflight` jobs; more are refused, not queued.

    A job's slot is released when its thread finishes, not when its caller gives up,
    so the bound holds for the work actually running (a cancelled call cannot stop a
    running engine call, but its slot is not handed out again until that call ends).
    """

    def __init__(self, workers: int, max_inflight: int, name: str = "medvlm-work") -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._max_inflight = max_inflight
        self._inflight = 0
        self._lock = threading.Lock()

    @property
    def inflight(self) -> int:
        """Jobs admitted and not yet finished."""
        with self._lock:
            return self._inflight

    async def run(self, fn: Callable[..., T], *args: object, deadline: float | None = None) -> T:
        """Run fn(*args) in a worker thread. `deadline` is a time.monotonic() instant: a job
        still queued when it passes is dropped before it starts (DeadlineExpired)."""
        with self._lock:
            if self._inflight >= self._max_inflight:
                raise Overloaded(
                    f"server busy: {self._max_inflight} calls in flight; retry shortly",
                    retry_after_s=0.05,
                )
            self._inflight += 1
        try:
            future: Future[T] = self._executor.submit(_before_deadline, fn, args, deadline)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def _release(self, _: object) -> None:
        with self._lock:
            self._inflight -= 1

    def close(self) -> None:
        """Finish running jobs, drop queued ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)


def _before_deadline(fn: Callable[..., T], args: tuple[object, ...], deadline: float | None) -> T:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExpired("deadline passed before the work started")
    return fn(*args)


def deadline_of(context: object) -> float | None:
    """The call's deadline as a time.monotonic() instant, or None if the caller set none."""
    remaining = context.time_remaining()  # type: ignore[attr-defined]
    return None if remaining is None else time.monotonic() + remaining
