"""Dynamic batching, priorities, deadlines, backpressure and the measured batch limit, with real engines."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from conftest import encoder_settings, eventually, start_server
from engines.runtime.bundle import load_bundle
from engines.runtime.select import ORT_CPU, open_engine
from medvlm.v1 import encoders_pb2_grpc, types_pb2
from services.domain import ROUTINE, STAT, URGENT, Priority
from services.domain import DeadlineExpired, InvalidInput, NotReady, Overloaded
from services.encoder import batching
from services.encoder.batching import Batcher
from services.plumbing import metrics
from services.plumbing.interceptors import RETRY_AFTER_KEY
from services.plumbing.settings import VISION
from services.vision.servicer import VisionApp
from test_gateway import png_bytes


@pytest.fixture(scope="module")
def vision_engine(tiny_bundle):
    engine = open_engine(load_bundle(tiny_bundle), "vision", ORT_CPU, max_batch=64).engine
    yield engine
    engine.close()


class Recorder:
    """A real engine, with a record of what reached it and an optional gate to hold it busy."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.calls: list[np.ndarray] = []
        self.threads: list[str] = []  # the thread of each engine call
        self.entered = 0  # rows of the engine calls that have started (some may wait at the gate)
        self.gate = threading.Event()
        self.gate.set()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.entered += len(batch)
        self.gate.wait(10)
        self.calls.append(batch.copy())
        self.threads.append(threading.current_thread().name)
        return self.engine.infer(batch)


async def placed(batcher: Batcher, recorder: Recorder, n: int) -> None:
    """Wait until `n` rows are queued or inside an engine call: every submission so far has landed."""
    await eventually(lambda: batcher.queued + recorder.entered == n, what=f"{n} rows queued or computing")


def rows(seed: int, n: int) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).normal(size=(n, 3, 224, 224)).astype(np.float32))


def make_batcher(recorder: Recorder, **kwargs) -> Batcher:
    options = dict(max_batch=8, max_delay_s=0.01, max_admitted=256, aging_s=10.0, workers=2)
    options.update(kwargs)
    return Batcher(recorder.infer, np.stack, **options)


def gated(gate: threading.Event, prepared: list | None = None, started: threading.Event | None = None):
    """A prepare function that says it `started`, waits for `gate`, then records and passes its rows on."""
    def prepare(payload):
        if started is not None:
            started.set()
        gate.wait(10)
        if prepared is not None:
            prepared.append(len(payload))
        return list(payload)
    return prepare


async def test_concurrent_requests_get_exactly_their_own_results(vision_engine):
    recorder = Recorder(vision_engine)
    batcher = make_batcher(recorder)
    try:
        requests = [rows(seed, n) for seed, n in enumerate([1, 3, 5, 2, 7, 1, 4, 6])]
        alone = [vision_engine.infer(np.stack(r)) for r in requests]
        recorder.gate.clear()  # hold the engine so the requests queue up and get merged
        tasks = [asyncio.ensure_future(batcher.submit(list, r)) for r in requests]
        await placed(batcher, recorder, sum(len(r) for r in requests))
        recorder.gate.set()
        results = await asyncio.gather(*tasks)
        for got, expected in zip(results, alone, strict=True):
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, atol=1e-5)
        assert max(len(c) for c in recorder.calls) == 8  # merged up to max_batch
        assert sum(len(c) for c in recorder.calls) == sum(len(r) for r in requests)
    finally:
        batcher.close()


async def test_stat_is_served_before_routine_work_queued_ahead_of_it(vision_engine):
    recorder = Recorder(vision_engine)
    batcher = make_batcher(recorder, max_batch=1)
    finished: list[str] = []

    async def submit(name: str, priority: int) -> None:
        await batcher.submit(list, rows(len(finished), 1), priority)
        finished.append(name)

    try:
        recorder.gate.clear()
        tasks = []
        for i in range(12):  # one at a time: two preparing threads could enqueue neighbours swapped
            tasks.append(asyncio.ensure_future(submit(f"routine-{i}", ROUTINE)))
            await placed(batcher, recorder, i + 1)  # routine-0 holds the engine; the others wait
        tasks.append(asyncio.ensure_future(submit("urgent", URGENT)))
        tasks.append(asyncio.ensure_future(submit("stat", STAT)))
        await placed(batcher, recorder, 14)
        recorder.gate.set()
        await asyncio.gather(*tasks)
        assert finished[:3] == ["routine-0", "stat", "urgent"]
        assert finished[3:] == [f"routine-{i}" for i in range(1, 12)]
    finally:
        batcher.close()


async def test_routine_work_is_not_starved_by_a_stream_of_stat(vision_engine):
    aging_s = 0.05
    recorder = Recorder(vision_engine)
    batcher = make_batcher(recorder, max_batch=1, aging_s=aging_s)
    try:
        recorder.gate.clear()
        blocker = asyncio.ensure_future(batcher.submit(list, rows(100, 1), STAT))
        await placed(batcher, recorder, 1)  # the blocker holds the engine
        routine_row = rows(0, 1)
        routine = asyncio.ensure_future(batcher.submit(list, routine_row, ROUTINE))
        await placed(batcher, recorder, 2)  # queued before any STAT item
        stats = [asyncio.ensure_future(batcher.submit(list, rows(i, 1), STAT)) for i in range(1, 40)]
        await placed(batcher, recorder, 41)
        queued_at = time.monotonic()
        # the routine item ages: aging is defined by the clock, so the test waits for the clock
        await eventually(lambda: time.monotonic() - queued_at > 2 * aging_s, what="the routine item aging")
        recorder.gate.set()
        await asyncio.gather(blocker, routine, *stats)
        order = [i for i, call in enumerate(recorder.calls) if np.array_equal(call[0], routine_row[0])]
        assert order == [1], f"the aged routine item ran as engine call {order}, not right after the blocker"
    finally:
        batcher.close()


async def test_an_expired_deadline_never_reaches_the_engine(vision_engine):
    recorder = Recorder(vision_engine)
    batcher = make_batcher(recorder, max_batch=1)
    try:
        recorder.gate.clear()
        busy = asyncio.ensure_future(batcher.submit(list, rows(1, 1)))
        await placed(batcher, recorder, 1)
        doomed = rows(2, 3)
        deadline = time.monotonic() + 0.5  # long enough to be seen admitted on a loaded machine
        late = asyncio.ensure_future(batcher.submit(list, doomed, deadline=deadline))
        # admitted (being prepared or queued): whichever it is when the deadline passes, it is dropped
        await eventually(lambda: batcher.admitted + recorder.entered == 4, what="the late request admitted")
        await eventually(lambda: time.monotonic() > deadline, what="the deadline passing")
        recorder.gate.set()
        with pytest.raises(DeadlineExpired):
            await late
        await busy
        assert len(recorder.calls) == 1
        assert not any(np.array_equal(call[0], d) for call in recorder.calls for d in doomed)
        assert batcher.queued == batcher.admitted == 0
    finally:
        batcher.close()


async def test_cancelled_requests_free_their_slots_and_are_not_computed(vision_engine):
    recorder = Recorder(vision_engine)
    batcher = make_batcher(recorder, max_batch=1, max_admitted=6)
    try:
        recorder.gate.clear()
        busy = asyncio.ensure_future(batcher.submit(list, rows(1, 1)))
        await placed(batcher, recorder, 1)
        cancelled = asyncio.ensure_future(batcher.submit(list, rows(2, 5)))
        await placed(batcher, recorder, 6)
        with pytest.raises(Overloaded) as info:
            await batcher.submit(list, rows(3, 2))  # 5 queued + 2 > 6
        assert "queue full" in info.value.message and info.value.retry_after_s > 0
        cancelled.cancel()
        await eventually(lambda: batcher.queued == batcher.admitted == 0, what="the cancelled request's slots freed")
        after = asyncio.ensure_future(batcher.submit(list, rows(4, 2)))  # fits again
        recorder.gate.set()
        await busy
        assert (await after).shape[0] == 2
        assert sum(len(c) for c in recorder.calls) == 3  # busy + after, never the cancelled 5
    finally:
        batcher.close()


async def test_a_lone_request_runs_in_its_own_thread_and_concurrent_ones_are_batched(vision_engine):
    recorder = Recorder(vision_engine)
    batcher = make_batcher(recorder, max_delay_s=5.0)  # the worker waits for requests being prepared
    loop_thread = threading.current_thread().name
    try:
        # Alone (engine idle, nothing else queued or being prepared): computed by the preparing thread.
        assert (await batcher.submit(list, rows(1, 2))).shape[0] == 2
        assert recorder.threads[-1].startswith("medvlm-prepare-engine")
        assert recorder.threads[-1] != loop_thread
        # Another request still being prepared: the first is left for the worker, which waits for
        # the second and merges both into one engine call.
        gate = threading.Event()
        second = asyncio.ensure_future(batcher.submit(gated(gate), rows(3, 4)))
        first = asyncio.ensure_future(batcher.submit(list, rows(2, 3)))
        await eventually(lambda: batcher.queued == 3, what="the first request queued")
        assert len(recorder.calls) == 1  # not computed by its preparing thread
        gate.set()
        assert (await first).shape[0] == 3 and (await second).shape[0] == 4
        assert [len(c) for c in recorder.calls] == [2, 7]
        assert recorder.threads[-1].startswith("medvlm-batcher-engine")
    finally:
        batcher.close()


async def test_up_to_engine_calls_batches_are_computed_at_once(vision_engine):
    recorder = Recorder(vision_engine)
    batcher = make_batcher(recorder, max_batch=2, engine_calls=2)
    try:
        recorder.gate.clear()  # every engine call waits here once it has started
        calls = [asyncio.ensure_future(batcher.submit(list, rows(i, 2))) for i in range(3)]
        await eventually(lambda: recorder.entered == 4 and batcher.queued == 2,
                         what="two engine calls started, the third batch queued")
        await asyncio.sleep(0.2)
        assert recorder.entered == 4 and batcher.busy_for() > 0  # no third call while two run
        recorder.gate.set()
        for i, call in enumerate(calls):
            np.testing.assert_allclose(await call, vision_engine.infer(np.stack(rows(i, 2))), rtol=1e-4,
                                       atol=1e-5)
        assert sorted(len(c) for c in recorder.calls) == [2, 2, 2]
        assert batcher.admitted == batcher.queued == 0
    finally:
        batcher.close()


async def test_work_being_prepared_counts_against_the_bound_and_a_cancelled_caller_frees_it(vision_engine):
    recorder = Recorder(vision_engine)
    batcher = make_batcher(recorder, max_admitted=3, workers=1)
    gate, prepared, started = threading.Event(), [], threading.Event()
    try:
        held = asyncio.ensure_future(batcher.submit(gated(gate, prepared, started), rows(1, 2)))
        await eventually(lambda: batcher.admitted == 2, what="the first request admitted")
        await eventually(started.is_set, what="its preparation started")  # so the cancel cannot unschedule it
        with pytest.raises(Overloaded) as info:
            await batcher.submit(list, rows(2, 2))  # 2 being prepared + 2 > 3: refused before any work
        assert info.value.retry_after_s > 0
        held.cancel()  # gives up while its inputs are being prepared: never queued, never computed
        await eventually(lambda: batcher.admitted == 0, what="the cancelled request's admission freed")
        gate.set()
        # one preparing thread: this request is prepared after the cancelled one has finished preparing
        assert (await batcher.submit(list, rows(3, 3))).shape[0] == 3
        assert prepared == [2] and [len(c) for c in recorder.calls] == [3]
        assert batcher.queued == batcher.admitted == 0
    finally:
        gate.set()
        batcher.close()


async def test_a_deadline_that_passes_before_preparation_drops_the_work_unprepared(vision_engine):
    recorder = Recorder(vision_engine)
    batcher = make_batcher(recorder, workers=1)
    gate, prepared = threading.Event(), []
    expired = metrics.EXPIRED.labels("engine")
    before = expired._value.get()
    try:
        blocker = asyncio.ensure_future(batcher.submit(gated(gate, prepared), rows(1, 1)))
        deadline = time.monotonic() + 0.05
        late = asyncio.ensure_future(batcher.submit(gated(gate, prepared), rows(2, 2), deadline=deadline))
        await eventually(lambda: time.monotonic() > deadline, what="the deadline passing")
        gate.set()  # the only preparing thread is free now; the late request's turn comes too late
        with pytest.raises(DeadlineExpired):
            await late
        assert (await blocker).shape[0] == 1
        assert prepared == [1] and [len(c) for c in recorder.calls] == [1]
        assert expired._value.get() - before == 1
        assert batcher.admitted == 0
    finally:
        gate.set()
        batcher.close()


async def test_a_preparation_error_reaches_its_caller_alone(vision_engine):
    recorder = Recorder(vision_engine)
    batcher = make_batcher(recorder)

    def bad(payload):
        raise InvalidInput("image 1: not a PNG or JPEG")

    try:
        with pytest.raises(InvalidInput, match="image 1"):
            await batcher.submit(bad, rows(1, 2))
        assert (await batcher.submit(list, rows(2, 2))).shape[0] == 2
        assert [len(c) for c in recorder.calls] == [2] and batcher.admitted == 0
    finally:
        batcher.close()


async def test_close_refuses_admitted_work_and_lets_the_running_batch_finish(vision_engine):
    recorder = Recorder(vision_engine)
    batcher = make_batcher(recorder, max_batch=1)
    recorder.gate.clear()
    running = asyncio.ensure_future(batcher.submit(list, rows(1, 1)))
    await placed(batcher, recorder, 1)
    waiting = [asyncio.ensure_future(batcher.submit(list, rows(2 + i, 1))) for i in range(3)]
    await placed(batcher, recorder, 4)
    closing = asyncio.ensure_future(asyncio.to_thread(batcher.close))
    for task in waiting:
        with pytest.raises(NotReady):
            await task
    recorder.gate.set()
    await closing
    assert (await running).shape[0] == 1
    assert len(recorder.calls) == 1
    with pytest.raises(NotReady):
        await batcher.submit(list, rows(9, 1))


class Doubler:
    """An engine-like function: doubles its input rows, records the ids (first value) it computed."""

    def __init__(self) -> None:
        self.computed: list[float] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = 0
        self.lock = threading.Lock()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.entered += len(batch)
        self.gate.wait(30)
        with self.lock:
            self.computed.extend(batch[:, 0].tolist())
        time.sleep(0.0005 * len(batch))  # stands for compute, so that queues build up
        return batch * 2.0


def id_rows(start: int, n: int) -> list[np.ndarray]:
    return [np.array([start + i, 1.0, -1.0, 0.5], np.float32) for i in range(n)]


async def test_many_callers_from_many_threads_each_get_exactly_their_own_rows_or_their_error():
    """Callers on four event loops (threads) submit, cancel and expire at once, against a small bound:
    every call gets its own rows computed or the right error, refused and expired work is never
    computed, and the batcher ends empty."""
    engine = Doubler()
    batcher = Batcher(engine.infer, np.stack, max_batch=8, max_delay_s=0.002, max_admitted=40,
                      aging_s=0.01, workers=4)

    async def callers(thread: int) -> list[tuple[str, str, list[float]]]:
        rng = np.random.default_rng(thread)

        async def one(k: int) -> tuple[str, str, list[float]]:
            await asyncio.sleep(float(rng.uniform(0, 0.05)))  # arrivals spread out, not one burst
            payload = id_rows(thread * 100_000 + k * 10, int(rng.integers(1, 5)))
            ids = [float(r[0]) for r in payload]
            kind = ["ok", "ok", "cancel", "expired"][k % 4]
            deadline = time.monotonic() - 1 if kind == "expired" else None
            task = asyncio.ensure_future(batcher.submit(list, payload, Priority(1 + k % 3), deadline))
            if kind == "cancel":
                await asyncio.sleep(float(rng.uniform(0, 0.003)))
                task.cancel()
            try:
                got = await task
            except asyncio.CancelledError:
                return kind, "cancelled", ids
            except (Overloaded, DeadlineExpired) as exc:
                return kind, type(exc).__name__, ids
            np.testing.assert_array_equal(got, np.stack(payload) * 2.0)  # exactly its own rows, in order
            return kind, "ok", ids

        return await asyncio.gather(*[one(k) for k in range(120)])

    try:
        results = await asyncio.gather(*[asyncio.to_thread(asyncio.run, callers(t)) for t in range(4)])
        outcomes = [o for r in results for o in r]
        computed = engine.computed
        assert len(computed) == len(set(computed))  # no row computed twice
        for kind, outcome, ids in outcomes:
            if outcome == "ok":
                assert kind != "expired" and set(ids) <= set(computed)
            elif outcome in ("Overloaded", "DeadlineExpired"):
                assert not set(ids) & set(computed), (kind, outcome)
                assert outcome == "Overloaded" or kind == "expired"
            else:
                assert kind == "cancel"
        assert {o for _, o, _ in outcomes} >= {"ok", "DeadlineExpired"}
        assert all(o == "DeadlineExpired" or o == "Overloaded" for k, o, _ in outcomes if k == "expired")
        await eventually(lambda: batcher.admitted == batcher.queued == 0 and not batcher.busy_for(),
                         what="the batcher empty")

        # Held engine: what is cancelled or expires while queued is never computed.
        engine.gate.clear()
        blocker = asyncio.ensure_future(batcher.submit(list, id_rows(-10, 1)))
        await eventually(lambda: engine.entered == len(computed) + 1, what="the engine held")
        soon = time.monotonic() + 0.5
        tasks = [asyncio.ensure_future(batcher.submit(list, id_rows(-1000 - 10 * k, 2), Priority(1 + k % 3),
                                                      soon if k % 3 == 2 else None)) for k in range(12)]
        await eventually(lambda: batcher.admitted == 24, what="all admitted")
        for task in tasks[0::3]:
            task.cancel()
        await eventually(lambda: time.monotonic() > soon, what="the short deadlines passing")
        engine.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await blocker
        for k, outcome in enumerate(outcomes):
            ids = {-1000.0 - 10 * k, -1000.0 - 10 * k + 1}
            expected = {0: asyncio.CancelledError, 1: np.ndarray, 2: DeadlineExpired}[k % 3]
            assert isinstance(outcome, expected), (k, outcome)
            assert (ids <= set(engine.computed)) == (k % 3 == 1)
            assert ids <= set(engine.computed) or not ids & set(engine.computed)
        assert batcher.admitted == batcher.queued == 0
    finally:
        engine.gate.set()
        batcher.close()


async def test_full_queue_is_resource_exhausted_in_waves_and_the_server_keeps_serving(tiny_bundle):
    settings = encoder_settings(VISION, tiny_bundle, max_queue=8, max_batch=4)
    server = await start_server(settings, VisionApp(settings))
    try:
        # the bound the queue alert divides by, as this (latest started) encoder was told it
        assert metrics.QUEUE_CAPACITY.labels("vision")._value.get() == 8
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = encoders_pb2_grpc.VisionEncoderServiceStub(channel)
            image = types_pb2.Image(data=png_bytes(5))
            too_big = types_pb2.EmbedImagesRequest(images=[image] * 9)  # more than the queue holds
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.EmbedImages(too_big, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue full" in info.value.details()
            assert int(dict(info.value.trailing_metadata())[RETRY_AFTER_KEY]) > 0
            request = types_pb2.EmbedImagesRequest(images=[image] * 3)
            codes: dict[str, int] = {}
            for _wave in range(5):
                calls = [stub.EmbedImages(request, timeout=20) for _ in range(12)]
                for outcome in await asyncio.gather(*calls, return_exceptions=True):
                    code = outcome.code().name if isinstance(outcome, grpc.aio.AioRpcError) else "OK"
                    codes[code] = codes.get(code, 0) + 1
                    if code == "OK":
                        assert len(outcome.embeddings) == 3
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
            assert codes.get("OK", 0) > 0
            reply = await stub.EmbedImages(request, timeout=10)
            assert len(reply.embeddings) == 3
        assert server.app.batcher.admitted == 0
    finally:
        await server.stop(0)


class _FakeEngine:
    """An engine whose call costs `cost(batch size)` seconds on a clock the test owns."""

    def __init__(self, cost) -> None:
        self.now = 0.0
        self.cost = cost
        self.sizes: list[int] = []

    def clock(self) -> float:
        return self.now

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        self.now += self.cost(len(batch))
        return np.zeros((len(batch), 4), np.float32)


@pytest.mark.parametrize("cost, max_batch, limit, why", [
    (lambda b: 0.010 + 0.002 * b, 32, 32, "max_batch 32"),  # fixed overhead: per item keeps falling
    (lambda b: 0.04 * b, 32, 32, "max_batch 32"),  # flat per item: batching still saves per-call work
    (lambda b: 0.300 * b, 32, 4, "start-up budget"),  # flat but slow: the 20 s budget ends it
    (lambda b: 0.100 * b * (1.0 if b <= 4 else 1.3), 32, 4, "batch 8 is slower per item"),
    (lambda b: 0.05 + 0.1 * b if b <= 4 else 0.2 * b, 32, 4, "batch 8 is slower per item"),
    (lambda b: 0.200 * b * (1.0 if b == 1 else 1.4), 32, 1, "batch 2 is slower per item"),
    (lambda b: 0.010 + 0.002 * b, 12, 12, "max_batch 12"),  # the last step is max_batch itself
])
def test_batch_limit_never_allows_a_size_slower_per_item(cost, max_batch, limit, why):
    engine = _FakeEngine(cost)
    rows = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    found = batching.measure_batch_limit(engine.infer, rows, max_batch, clock=engine.clock)
    assert (found.size, found.stopped.split(" (")[0].split(" of ")[0]) == (limit, why.split(" of ")[0])
    assert max(engine.sizes) <= max_batch
    assert found.seconds_per_item[1] == pytest.approx(cost(1))
    assert engine.now <= 20.0 + cost(1)  # the budget holds (the warm-up call comes first)
    for size, seconds in found.seconds_per_item.items():
        if size <= found.size:
            assert seconds <= min(found.seconds_per_item[s] for s in found.seconds_per_item if s <= size) * 1.1


async def test_served_batches_stay_within_the_measured_limit(tiny_bundle):
    settings = encoder_settings(VISION, tiny_bundle, max_batch=8)
    server = await start_server(settings, VisionApp(settings))
    try:
        limit = server.app.batcher.max_batch
        assert 1 <= limit <= 8
        unmeasured = encoder_settings(VISION, tiny_bundle, max_batch=8, measure_batch_limit=False)
        other = await start_server(unmeasured, VisionApp(unmeasured))
        assert other.app.batcher.max_batch == 8
        await other.stop(0)
    finally:
        await server.stop(0)
