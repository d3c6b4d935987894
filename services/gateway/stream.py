"""Worklist streams: the question carried from item to item; a bounded, unordered concurrent map."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

from services.gateway.questions import Question

T = TypeVar("T")
R = TypeVar("R")


async def carry_questions(items: AsyncIterable[tuple[T, Question]]) -> AsyncIterator[tuple[T, Question]]:
    """A worklist states its question once: an item naming neither labels nor a label set is
    asked the latest question named before it (labels or set, template and top_k together)."""
    question = Question()
    async for item, asked in items:
        question = asked if asked.labels or asked.label_set else question
        yield item, question


async def map_unordered(
    source: AsyncIterable[T], fn: Callable[[T], Awaitable[R]], window: int
) -> AsyncIterator[R]:
    """Apply `fn` to items of `source`, at most `window` at once, yielding results as they finish.

    The next item is read only while fewer than `window` are running, so a fast producer
    waits (for gRPC: HTTP/2 flow control holds the client back and memory stays bounded).
    `fn` must not raise for one item's failure: it returns an error result instead.
    If reading `source` fails (a malformed message), nothing more is read, the items already
    accepted still finish and are yielded, and then the error is raised.
    Closing or cancelling the iterator cancels every running call.
    """
    items = source.__aiter__()
    running: set[asyncio.Task[R]] = set()
    reading: asyncio.Task[T] | None = None
    exhausted = False
    failure: Exception | None = None
    try:
        while True:
            if reading is None and not exhausted and len(running) < window:
                reading = asyncio.ensure_future(items.__anext__())
            waiting = running | ({reading} if reading is not None else set())
            if not waiting:
                if failure is not None:
                    raise failure
                return
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if reading is not None and reading in done:
                try:
                    running.add(asyncio.ensure_future(fn(reading.result())))
                except StopAsyncIteration:
                    exhausted = True
                except Exception as exc:  # noqa: BLE001 - raised once the accepted items are done
                    exhausted, failure = True, exc
                reading = None
            for task in done & running:
                running.discard(task)
                yield task.result()
    finally:
        for task in (*running, *([reading] if reading is not None else [])):
            task.cancel()
