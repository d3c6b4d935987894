"""ClassifyStream through the real gateway: every item answered once, errors per item, the
question carried forward, and a cancelled stream stops using the engine."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from prometheus_client import REGISTRY

from conftest import eventually, start_stack
from medvlm.v1 import gateway_pb2, types_pb2
from services.plumbing.interceptors import REQUEST_ID_KEY
from test_gateway import classify_request, fresh_labels, png_bytes


def sample_value(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_stream_of_500_images_all_arrive_once_each(tiny_stack):
    labels = ["stream label a", "stream label b", "stream label c"]
    images = [png_bytes(i % 7, (64 + i % 5, 64)) for i in range(500)]

    async def requests():
        for i, data in enumerate(images):
            request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=data))
            if i == 0:
                request.labels.extend(labels)
            if i == 250:
                request.image.data = b"broken"
            yield gateway_pb2.ClassifyStreamRequest(correlation_id=f"item-{i}", request=request)

    seen: dict[str, gateway_pb2.ClassifyStreamResponse] = {}
    async for response in tiny_stack.gateway_stub.ClassifyStream(requests(), timeout=300):
        assert response.correlation_id not in seen
        seen[response.correlation_id] = response
    assert set(seen) == {f"item-{i}" for i in range(500)}
    assert seen["item-250"].error.code == "INVALID_ARGUMENT"
    assert "not a PNG or JPEG" in seen["item-250"].error.message
    ok = [r for r in seen.values() if r.HasField("result")]
    assert len(ok) == 499
    assert all([s.label for s in r.result.scores] == labels for r in ok)


async def test_a_cancelled_stream_stops_consuming_engine_time(tiny_bundle):
    # This stack's own engine calls are counted (the metrics are shared by every server of the test
    # process, and another stack's idle probe may run any time); its own probe is off.
    stack = await start_stack(tiny_bundle, vision_overrides={"probe_interval_s": 0})
    engine = stack.vision.app.loaded.engine
    engine_calls, infer = [], engine.infer

    def counted(batch):
        engine_calls.append(len(batch))
        return infer(batch)

    engine.infer = counted  # Engine.embed, which the batcher calls, goes through self.infer
    try:
        big = png_bytes(3, (1200, 1200))  # slow enough to keep work outstanding

        async def requests():
            for i in range(400):
                request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=big))
                if i == 0:
                    request.labels.extend(["cancel a", "cancel b"])
                yield gateway_pb2.ClassifyStreamRequest(correlation_id=str(i), request=request)

        call = stack.gateway_stub.ClassifyStream(requests(), timeout=120)
        received = 0
        async for _ in call:
            received += 1
            if received == 5:
                break
        call.cancel()

        def inflight(method: str) -> float:
            return sample_value("medvlm_inflight_requests", {"method": f"/medvlm.v1.{method}"})

        def quiet() -> bool:  # nothing in flight at the gateway or the encoder, nothing queued
            return (inflight("GatewayService/ClassifyStream") == inflight("VisionEncoderService/EmbedImages")
                    == stack.vision.app.batcher.admitted == 0)

        # work already inside an engine call may finish
        await eventually(quiet, what="the cancelled stream's work ending")
        assert sum(engine_calls) >= 5  # the five answers read came from this engine
        before = len(engine_calls)
        # an observation window, not synchronisation: a correct server does nothing in it, so it
        # can only let a leak go unseen, never fail a correct build
        await asyncio.sleep(1.0)
        assert len(engine_calls) == before, "the engine kept working for a cancelled stream"
        assert received == 5
    finally:
        await stack.stop()


async def test_a_stream_item_naming_labels_replaces_the_carried_question(tiny_stack):
    """A worklist item without labels is asked the latest question named before it, template and
    top_k included; its own template and top_k count for nothing."""
    first, second = fresh_labels(2, "first"), fresh_labels(3, "second")
    asked = [dict(labels=first, top_k=1), {}, dict(labels=second), dict(template="an image of {}", top_k=1)]

    async def requests():
        for i, kwargs in enumerate(asked):
            request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=png_bytes(i)), **kwargs)
            yield gateway_pb2.ClassifyStreamRequest(correlation_id=str(i), request=request)

    call = tiny_stack.gateway_stub.ClassifyStream(requests(), timeout=60)
    streamed = {r.correlation_id: r.result async for r in call}
    for i, (labels, top_k) in enumerate([(first, 1), (first, 1), (second, 0), (second, 0)]):
        unary = await tiny_stack.gateway_stub.Classify(
            classify_request(labels, data=png_bytes(i), top_k=top_k), timeout=10)
        result = streamed[str(i)]
        assert [s.label for s in result.scores] == labels
        assert [t.index for t in result.top] == [t.index for t in unary.top]
        np.testing.assert_allclose([s.cosine for s in result.scores], [s.cosine for s in unary.scores], atol=1e-6)


async def test_a_stream_carries_its_request_id_in_the_headers_of_its_first_result(tiny_stack):
    """A worklist can run for minutes: its caller has the request id from the first result on."""
    async def requests():
        for i in range(2):
            request = classify_request(fresh_labels(2, "stream id"), data=png_bytes(i))
            yield gateway_pb2.ClassifyStreamRequest(correlation_id=str(i), request=request)

    call = tiny_stack.gateway_stub.ClassifyStream(requests(), metadata=((REQUEST_ID_KEY, "rid-stream-1"),),
                                                  timeout=60)
    first = await call.read()  # results come as they finish (unordered), so either item may be first
    assert first.correlation_id in ("0", "1") and first.HasField("result")
    assert dict(await call.initial_metadata())[REQUEST_ID_KEY] == "rid-stream-1"
    second = await call.read()
    assert {first.correlation_id, second.correlation_id} == {"0", "1"}
    assert await call.read() is grpc.aio.EOF
