"""Under load and cancellation, with real processes: cancelled calls never crash the gateway, a
shared label fill answers each caller by its own deadline, overload is RESOURCE_EXHAUSTED (never
"encoder unavailable"), the gateway's health follows its vision encoder, a malformed stream message
still delivers the items before it, and expired queued work is counted as such."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
import urllib.request

import grpc
import pytest

from conftest import (
    encoder_settings, gateway_settings, health_status, spawn_service, start_server, start_stack,
    wait_for_serving, wait_health,
)
from devtools.launch import how_it_ended
from medvlm.v1 import encoders_pb2_grpc, gateway_pb2, gateway_pb2_grpc, types_pb2
from services.gateway.app import GatewayApp
from services.plumbing import metrics
from services.plumbing.interceptors import RETRY_AFTER_KEY
from services.plumbing.server import NOT_SERVING, SERVING
from services.plumbing.settings import TEXT, VISION
from services.text.servicer import TextApp
from services.vision.servicer import VisionApp
from test_gateway import png_bytes

pytestmark = pytest.mark.slow

CLASSIFY_STREAM = "/medvlm.v1.GatewayService/ClassifyStream"


class Proc:
    """A service in its own process; its log is drained so it never blocks on a full pipe."""

    def __init__(self, service: str, *args: str) -> None:
        self.proc = spawn_service(service, "--metrics-port", "0", *args)
        ports = wait_for_serving(self.proc)
        self.port, self.metrics_port = ports["port"], ports["metrics_port"]
        self.log: list[str] = []
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, prefix: str) -> float:
        """Sum of the samples whose line starts with `prefix`."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            lines = reply.read().decode().splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process cannot handle SIGKILL's cleanup
            self.proc.kill()
        self.proc.wait(10)


def stream_item(i: int, labels: list[str] | None = None) -> gateway_pb2.ClassifyStreamRequest:
    request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=png_bytes(i % 7)))
    if labels:
        request.labels.extend(labels)
    return gateway_pb2.ClassifyStreamRequest(correlation_id=f"item-{i}", request=request)


@pytest.fixture
async def processes(tiny_bundle):
    """vision, text and gateway, each in its own process."""
    started: list[Proc] = []

    def start(service: str, *args: str) -> Proc:
        proc = Proc(service, *args)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


async def test_calls_cancelled_at_random_moments_never_crash_the_gateway(tiny_bundle, processes):
    vision = processes("vision", "--bundle", str(tiny_bundle))
    text = processes("text", "--bundle", str(tiny_bundle))
    gateway = processes("gateway", "--vision-target", vision.target, "--text-target", text.target)
    rng = random.Random(21)
    labels = ["cancel a", "cancel b", "cancel c"]
    async with grpc.aio.insecure_channel(gateway.target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for round_ in range(300):
            if round_ % 2:
                call = stub.ClassifyStream(iter([stream_item(i, labels if i == 0 else None) for i in range(40)]))
                for _ in range(rng.randrange(0, 12)):
                    await call.read()
                call.cancel()
            else:
                call = stub.Classify(gateway_pb2.ClassifyRequest(
                    image=types_pb2.Image(data=png_bytes(round_ % 5)), labels=labels))
                await asyncio.sleep(rng.uniform(0, 0.02))
                call.cancel()
            assert gateway.proc.poll() is None, f"gateway {how_it_ended(gateway.proc.returncode)}"
        # one full stream after all that: every item answered
        replies = [r async for r in stub.ClassifyStream(iter([stream_item(i, labels if i == 0 else None)
                                                             for i in range(50)]))]
        assert sorted(r.correlation_id for r in replies) == sorted(f"item-{i}" for i in range(50))
        assert all(r.HasField("result") for r in replies)
    assert await health_status(gateway.port) == SERVING
    assert gateway.metric('medvlm_requests_total{code="INTERNAL"') == 0
    assert gateway.metric('medvlm_requests_total{code="CANCELLED"') > 0
    assert not [line for line in gateway.log if "unhandled_error" in line]


async def test_a_shared_fill_answers_each_caller_by_its_own_deadline(tiny_bundle, processes):
    vision = processes("vision", "--bundle", str(tiny_bundle))
    text = processes("text", "--bundle", str(tiny_bundle))
    gateway = processes("gateway", "--vision-target", vision.target, "--text-target", text.target,
                        "--downstream-timeout-s", "4")
    image = types_pb2.Image(data=png_bytes(3))
    async with grpc.aio.insecure_channel(gateway.target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)

        async def classify(labels: list[str], timeout: float | None):
            started = time.monotonic()
            try:
                reply = await stub.Classify(gateway_pb2.ClassifyRequest(image=image, labels=labels), timeout=timeout)
                return "OK", reply, time.monotonic() - started
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details(), time.monotonic() - started

        labels = ["shared fill one", "shared fill two"]
        os.kill(text.proc.pid, signal.SIGSTOP)
        try:
            calls = [asyncio.ensure_future(classify(labels, t)) for t in (6.0, 1.0, 6.0)]
            await asyncio.sleep(2.0)  # the text encoder stays frozen for 2 s, as in the report
        finally:
            os.kill(text.proc.pid, signal.SIGCONT)
        (first, r1, t1), (impatient, _, t2), (third, r3, t3) = await asyncio.gather(*calls)
        assert impatient == "DEADLINE_EXCEEDED" and t2 < 1.9
        assert (first, third) == ("OK", "OK"), (r1, r3)
        assert [s.label for s in r1.scores] == labels and [s.label for s in r3.scores] == labels
        assert t1 < 6.0 and t3 < 6.0

        # no deadline at all: bounded by the downstream timeout (4 s), never INTERNAL, never a hang
        os.kill(text.proc.pid, signal.SIGSTOP)
        try:
            code, _, took = await classify(["never cached here", "nor this"], None)
        finally:
            os.kill(text.proc.pid, signal.SIGCONT)
        assert code in ("DEADLINE_EXCEEDED", "UNAVAILABLE") and took < 6.0, (code, took)
    assert gateway.metric('medvlm_requests_total{code="INTERNAL"') == 0


@pytest.mark.parametrize("connections, gateway_inflight, vision_inflight", [(1, 16, 64), (64, 256, 8)])
async def test_a_flood_is_refused_with_resource_exhausted_never_unavailable(
        tiny_bundle, connections, gateway_inflight, vision_inflight):
    """256 concurrent callers: each call succeeds or gets RESOURCE_EXHAUSTED with retry-after-ms.
    With the gateway's bound at 256 the flood reaches the vision encoder over one connection (past
    HTTP/2's usual 100 streams), whose own bound must come back as RESOURCE_EXHAUSTED, not as
    "vision encoder is unavailable"."""
    stack = await start_stack(tiny_bundle, vision_overrides=dict(max_inflight=vision_inflight),
                              max_inflight=gateway_inflight)
    channels = [grpc.aio.insecure_channel(stack.target) for _ in range(connections)]
    try:
        labels = ["flood a", "flood b"]
        warm = gateway_pb2_grpc.GatewayServiceStub(channels[0])
        await warm.Classify(gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=png_bytes(0)), labels=labels))

        async def one(i: int):
            stub = gateway_pb2_grpc.GatewayServiceStub(channels[i % connections])
            call = stub.Classify(gateway_pb2.ClassifyRequest(
                image=types_pb2.Image(data=png_bytes(i % 9, (160, 140))), labels=labels), timeout=60)
            try:
                await call
                return "OK", None
            except grpc.aio.AioRpcError as exc:
                hint = dict(exc.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
                return exc.code().name, (exc.details(), hint)

        flood = asyncio.gather(*[one(i) for i in range(256)])
        # the flood's clients share this process's event loop with the servers: allow for that
        health_during = await health_status(stack.gateway.port, timeout=60)
        outcomes = await flood
        codes = [code for code, _ in outcomes]
        others = [o for o in outcomes if o[0] not in ("OK", "RESOURCE_EXHAUSTED")]
        assert not others, others[:5]
        refused = [detail for code, detail in outcomes if code == "RESOURCE_EXHAUSTED"]
        assert all(hint is not None and int(hint) > 0 for _, hint in refused)
        assert codes.count("OK") > 0 and refused, (codes.count("OK"), len(refused))
        assert health_during == SERVING
    finally:
        for channel in channels:
            await channel.close()
        await stack.stop()


async def test_gateway_health_follows_its_vision_encoder(tiny_bundle, processes):
    vision = processes("vision", "--bundle", str(tiny_bundle))
    port = vision.port
    text = await start_server(encoder_settings(TEXT, tiny_bundle), TextApp(encoder_settings(TEXT, tiny_bundle)))
    settings = gateway_settings(port, text.port)
    gateway = await start_server(settings, GatewayApp(settings))
    try:
        assert await health_status(gateway.port) == SERVING
        vision.stop()
        took_down = await wait_health(gateway.port, NOT_SERVING, 5.0)
        replacement = processes("vision", "--bundle", str(tiny_bundle), "--port", str(port))
        assert replacement.port == port
        took_up = await wait_health(gateway.port, SERVING, 5.0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            reply = await gateway_pb2_grpc.GatewayServiceStub(channel).Classify(gateway_pb2.ClassifyRequest(
                image=types_pb2.Image(data=png_bytes(1)), labels=["back a", "back b"]), timeout=10)
        assert len(reply.scores) == 2
        print(f"gateway NOT_SERVING {took_down:.2f} s after the kill, SERVING {took_up:.2f} s after the replacement")
    finally:
        await gateway.stop(0)
        await text.stop(0)


async def test_a_malformed_stream_message_still_delivers_the_items_before_it(tiny_stack):
    raw = tiny_stack.channel.stream_stream(
        CLASSIFY_STREAM, request_serializer=lambda b: b,
        response_deserializer=gateway_pb2.ClassifyStreamResponse.FromString,
    )
    good = [stream_item(i, ["malformed a", "malformed b"] if i == 0 else None).SerializeToString() for i in range(6)]

    async def requests():
        for message in good:
            yield message
        yield b"\xff\xff\xff\xff not a protobuf"

    call = raw(requests(), timeout=30)
    replies = [reply async for reply in _until_error(call)]
    assert sorted(r.correlation_id for r in replies) == [f"item-{i}" for i in range(6)]
    assert all(r.HasField("result") for r in replies)
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf" in await call.details()


async def _until_error(call):
    try:
        async for reply in call:
            yield reply
    except grpc.aio.AioRpcError:
        return


async def test_calls_that_expire_while_queued_are_counted_as_deadline_dropped(tiny_bundle):
    settings = encoder_settings(VISION, tiny_bundle)
    app = VisionApp(settings)
    server = await start_server(settings, app)
    engine = app.loaded.engine
    gate = threading.Event()
    real_infer = engine.infer

    def held_infer(batch):
        gate.wait(30)  # the engine is busy: what arrives meanwhile waits in the queue
        return real_infer(batch)

    engine.infer = held_infer
    dropped = metrics.EXPIRED.labels(VISION)
    before = dropped._value.get()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = encoders_pb2_grpc.VisionEncoderServiceStub(channel)
            request = types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=png_bytes(2))])
            busy = asyncio.ensure_future(stub.EmbedImages(request, timeout=30))
            await _until(lambda: app.batcher.busy_for() > 0)
            late = [stub.EmbedImages(request, timeout=0.5) for _ in range(3)]
            codes = []
            for call in late:
                try:
                    await call
                    codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code().name)
            await _until(lambda: dropped._value.get() >= before + 3)
            gate.set()
            assert len((await busy).embeddings) == 1
        assert codes == ["DEADLINE_EXCEEDED"] * 3
        assert dropped._value.get() - before == 3
    finally:
        gate.set()
        engine.infer = real_infer
        await server.stop(0)


async def _until(condition, within_s: float = 10.0) -> None:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within_s, "condition not reached"
        await asyncio.sleep(0.02)


def test_the_launcher_says_how_a_process_ended():
    assert how_it_ended(-signal.SIGSEGV) == "was killed by SIGSEGV"
    assert how_it_ended(3) == "exited with status 3"
