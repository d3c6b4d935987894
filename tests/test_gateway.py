"""The gateway over real encoders on real ports: answers, bad input, caching, outages, identity."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import uuid

import grpc
import numpy as np
import pytest
import structlog
from PIL import Image
from prometheus_client import REGISTRY

from conftest import eventually, gateway_settings, health_status, start_server, start_stack
from medvlm.v1 import gateway_pb2, types_pb2
from services import domain
from services.gateway.app import GatewayApp
from services.gateway.cache import TextEmbeddingCache
from services.gateway.labels import apply_template, softmax
from services.gateway.questions import check_template
from services.plumbing.interceptors import REQUEST_ID_KEY
from services.plumbing.server import NOT_SERVING, SERVING

TEXT_RPC = "/medvlm.v1.TextEncoderService/EmbedTexts"


def png_bytes(seed: int = 0, size: tuple[int, int] = (96, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def fresh_labels(n: int = 2, stem: str = "label") -> list[str]:
    """Labels no earlier call used (the shared stack caches every label it has seen)."""
    tag = uuid.uuid4().hex[:8]
    return [f"{stem} {tag} {i}" for i in range(n)]


def classify_request(labels, data: bytes | None = None, **kwargs) -> gateway_pb2.ClassifyRequest:
    return gateway_pb2.ClassifyRequest(
        image=types_pb2.Image(data=png_bytes() if data is None else data), labels=labels, **kwargs
    )


async def expect_status(call, code: grpc.StatusCode, needle: str = "") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert needle.lower() in (info.value.details() or "").lower()
    return info.value.details()


async def test_classify_probabilities_and_top_k(tiny_stack):
    labels = ["normal chest radiograph", "left pleural effusion", "cardiomegaly"]
    reply = await tiny_stack.gateway_stub.Classify(classify_request(labels, top_k=2), timeout=10)
    assert [s.label for s in reply.scores] == labels
    assert [s.index for s in reply.scores] == [0, 1, 2]
    assert sum(s.probability for s in reply.scores) == pytest.approx(1.0, abs=1e-5)
    assert len(reply.top) == 2
    assert reply.top[0].probability >= reply.top[1].probability
    assert reply.top[0].probability == max(s.probability for s in reply.scores)
    assert reply.bundle_id.startswith("tiny-")
    assert len(reply.image_sha256) == 64


async def test_similarity_rows_match_classify(tiny_stack):
    texts = ["a", "pleural effusion", "cardiomegaly"]
    images = [types_pb2.Image(data=png_bytes(s)) for s in (1, 2)]
    sim = await tiny_stack.gateway_stub.Similarity(
        gateway_pb2.SimilarityRequest(images=images, texts=texts, template="an image showing {}"), timeout=10
    )
    assert len(sim.rows) == 2 and all(len(r.cosine) == 3 for r in sim.rows)
    cls = await tiny_stack.gateway_stub.Classify(
        classify_request(texts, data=png_bytes(2), template="an image showing {}"), timeout=10
    )
    np.testing.assert_allclose(sim.rows[1].probabilities, [s.probability for s in cls.scores], atol=1e-6)
    np.testing.assert_allclose(sim.rows[1].cosine, [s.cosine for s in cls.scores], atol=1e-6)


async def test_request_id_is_returned_and_propagated_to_encoders(tiny_stack):
    with structlog.testing.capture_logs() as logs:
        call = tiny_stack.gateway_stub.Classify(
            classify_request(fresh_labels(stem="request id")),
            metadata=((REQUEST_ID_KEY, "rid-12345"),), timeout=10,
        )
        await call
        # a unary answer carries it in the trailers, sent with the response in one operation
        assert dict(await call.trailing_metadata())[REQUEST_ID_KEY] == "rid-12345"
        assert REQUEST_ID_KEY not in dict(await call.initial_metadata())
    rpcs = {e["rpc"] for e in logs if e.get("event") == "audit" and e.get("request_id") == "rid-12345"}
    assert rpcs == {
        "/medvlm.v1.GatewayService/Classify",
        "/medvlm.v1.VisionEncoderService/EmbedImages",
        TEXT_RPC,
    }


async def test_a_repeated_label_is_never_encoded_twice(tiny_stack):
    labels = fresh_labels(4, stem="cache probe")
    ours = [f"cache-probe-{uuid.uuid4().hex}" for _ in range(7)]

    def text_calls(logs) -> int:
        # text-encoder calls made for these requests (the shared stack may be busy with others)
        return len([e for e in logs if e.get("event") == "audit" and e.get("rpc") == TEXT_RPC
                    and e.get("request_id") in ours])

    def call(rid: str, request: gateway_pb2.ClassifyRequest):
        return tiny_stack.gateway_stub.Classify(request, metadata=((REQUEST_ID_KEY, rid),), timeout=10)

    with structlog.testing.capture_logs() as logs:
        # concurrent requests for the same new labels: one text-encoder call between them
        await asyncio.gather(*[call(ours[i], classify_request(labels, data=png_bytes(i))) for i in range(5)])
        await call(ours[5], classify_request(labels[::-1]))
    assert text_calls(logs) == 1
    # another template is another key
    with structlog.testing.capture_logs() as logs:
        await call(ours[6], classify_request(labels, template="x {}"))
    assert text_calls(logs) == 1


@pytest.mark.parametrize(
    ("request_kwargs", "needle"),
    [
        (dict(data=b"definitely not an image"), "not a PNG or JPEG"),
        (dict(data=png_bytes()[:-100]), "truncated or corrupt PNG"),
        (dict(labels=[]), "at least 2 label"),
        (dict(labels=["only one"]), "at least 2 label"),
        (dict(labels=[f"l{i}" for i in range(300)]), "exceeds the limit of 256"),
        (dict(labels=["ok", "x" * 2000]), "label 1 has 2000 characters"),
        (dict(labels=["same", "same"]), "distinct"),
        (dict(labels=["ok", "   "]), "label 1 is blank"),
        (dict(template="no placeholder"), 'exactly one "{}"'),
        (dict(template="{} and {}"), 'exactly one "{}"'),
    ],
)
async def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(tiny_stack, request_kwargs, needle):
    kwargs = dict(labels=["effusion", "normal"])
    kwargs.update(request_kwargs)
    labels = kwargs.pop("labels")
    await expect_status(
        tiny_stack.gateway_stub.Classify(classify_request(labels, **kwargs), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT, needle,
    )
    reply = await tiny_stack.gateway_stub.Classify(classify_request(["effusion", "normal"]), timeout=10)
    assert len(reply.scores) == 2


async def test_oversized_image_is_invalid_argument(tiny_stack):
    # bigger than the gateway's max image bytes (20 MiB), smaller than its message limit (64 MiB)
    big = b"\x89PNG\r\n\x1a\n" + bytes(21 << 20)
    await expect_status(
        tiny_stack.gateway_stub.Classify(classify_request(["a", "b"], data=big), timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit",
    )
    assert len((await tiny_stack.gateway_stub.Classify(classify_request(["a", "b"]), timeout=10)).scores) == 2


async def test_missing_image_and_expired_deadline(tiny_stack):
    await expect_status(
        tiny_stack.gateway_stub.Classify(gateway_pb2.ClassifyRequest(labels=["a", "b"]), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT, "no image",
    )
    await expect_status(
        tiny_stack.gateway_stub.Classify(classify_request(["deadline a", "deadline b"]), timeout=0.001),
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


async def test_clinical_text_never_reaches_logs_or_errors(tiny_stack):
    canary = "DOE^JANE MRN-99812 suspected malignancy"
    with structlog.testing.capture_logs() as logs:
        await tiny_stack.gateway_stub.Classify(classify_request([canary, "normal"]), timeout=10)
        details = await expect_status(
            tiny_stack.gateway_stub.Classify(classify_request([canary, canary]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        await expect_status(
            tiny_stack.gateway_stub.Classify(classify_request([canary, "x"], template=canary), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    assert logs, "expected audit records"
    dumped = json.dumps(logs, default=str)
    for fragment in ("DOE", "MRN-99812", "malignancy"):
        assert fragment not in dumped
        assert fragment not in details


async def test_text_encoder_down_uncached_is_unavailable_cached_still_answers(tiny_bundle):
    stack = await start_stack(tiny_bundle, downstream_timeout_s=3.0)
    try:
        cached = ["outage cached a", "outage cached b"]
        await stack.gateway_stub.Classify(classify_request(cached), timeout=10)
        await stack.text.stop(0)
        # UNAVAILABLE, not DEADLINE_EXCEEDED: the outage is reported, not waited out
        await expect_status(
            stack.gateway_stub.Classify(classify_request(["outage new a", "outage new b"]), timeout=5),
            grpc.StatusCode.UNAVAILABLE, "text encoder",
        )
        reply = await stack.gateway_stub.Classify(classify_request(cached), timeout=5)
        assert len(reply.scores) == 2
    finally:
        await stack.stop()


async def test_gateway_refuses_to_serve_encoders_of_different_bundles(tiny_bundle, tiny_stack, tmp_path):
    other = tmp_path / "tiny-other"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["version"] = manifest["version"] + "-other"
    (other / "manifest.json").write_text(json.dumps(manifest))
    from conftest import encoder_settings
    from services.plumbing.settings import TEXT
    from services.text.servicer import TextApp

    from medvlm.v1 import gateway_pb2_grpc

    text = await start_server(encoder_settings(TEXT, other), TextApp(encoder_settings(TEXT, other)))
    gateway = None

    def refused(logs: list[dict]) -> bool:
        return any(e.get("event") == "encoders_not_verified" and "disagree" in e["reason"] for e in logs)

    try:
        settings = gateway_settings(tiny_stack.vision.port, text.port, verify_retry_max_s=0.5)
        with structlog.testing.capture_logs() as logs:
            gateway = await start_server(settings, GatewayApp(settings), wait=False)
            await eventually(lambda: refused(logs), what="the gateway reporting that the encoders disagree")
            assert await health_status(gateway.port) == NOT_SERVING
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)
                await expect_status(stub.Classify(classify_request(["a", "b"]), timeout=5),
                                    grpc.StatusCode.UNAVAILABLE, "not verified")
    finally:
        if gateway is not None:
            await gateway.stop(0)
        await text.stop(0)
    assert await health_status(tiny_stack.gateway.port) == SERVING


async def test_images_split_across_encoder_calls_come_back_in_order(tiny_stack):
    images = [types_pb2.Image(data=png_bytes(s, (120 + s, 90))) for s in range(5)]
    whole = await tiny_stack.gateway_stub.EmbedImages(types_pb2.EmbedImagesRequest(images=images), timeout=10)
    vision_client = tiny_stack.gateway.app.vision
    vision_client.CHUNK_BYTES = 2 * len(images[0].data)  # about two images per encoder call
    try:
        with structlog.testing.capture_logs() as logs:
            split = await tiny_stack.gateway_stub.EmbedImages(types_pb2.EmbedImagesRequest(images=images), timeout=10)
    finally:
        del vision_client.CHUNK_BYTES
    calls = [e for e in logs if e.get("event") == "audit" and e["rpc"].endswith("VisionEncoderService/EmbedImages")]
    assert len(calls) >= 3
    assert [e.input_sha256 for e in split.embeddings] == [e.input_sha256 for e in whole.embeddings]
    np.testing.assert_allclose([e.values for e in split.embeddings], [e.values for e in whole.embeddings], atol=1e-6)


async def test_metrics_endpoint_reports_requests_batches_and_cache(tiny_stack):
    """Counters are process-wide and earlier tests moved them: what this test's calls add is compared."""
    import urllib.request

    url = f"http://127.0.0.1:{tiny_stack.gateway.metrics_port}/metrics"

    async def scrape() -> tuple[str, dict[str, float]]:
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        values = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return body, values

    labels = fresh_labels(stem="metrics")
    _, before = await scrape()
    for _ in range(2):
        await tiny_stack.gateway_stub.Classify(classify_request(labels), timeout=10)
    body, after = await scrape()

    def added(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert added('medvlm_requests_total{code="OK",method="/medvlm.v1.GatewayService/Classify"}') == 2
    assert added('medvlm_text_cache_total{result="miss"}') == 2  # the first call, one per label
    assert added('medvlm_text_cache_total{result="hit"}') == 2  # the second
    assert added('medvlm_batch_size_count{tower="vision"}') >= 2
    assert added('medvlm_engine_seconds_count{tower="text"}') >= 1
    assert after['medvlm_queue_depth{tower="vision"}'] == 0
    # the bound the queue alert divides by (its value is checked where one encoder is known to have
    # set it last: test_batching's full-queue test; this process holds many encoders' gauges)
    assert after['medvlm_queue_capacity{tower="vision"}'] > 0
    assert any(k.startswith("medvlm_engine_info{") and 'tower="vision"' in k for k in after)
    assert not any(label in body for label in labels)  # no clinical text in metric labels


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cache_round_trip_and_bundle_isolation():
    cache = TextEmbeddingCache(16, name="round-trip")
    vectors = unit(3, 16, 0)
    keys = [("bundle-a", "{}", t) for t in ("x", "y", "z")]
    cache.put(keys, vectors)
    got = cache.get(keys + [("bundle-b", "{}", "x"), ("bundle-a", "a {}", "x")])
    np.testing.assert_array_equal(np.stack(got[:3]), vectors)
    assert got[3] is None and got[4] is None  # another bundle or template never matches
    counted = {r: REGISTRY.get_sample_value("medvlm_label_cache_total", {"cache": "round-trip", "result": r})
               for r in ("hit", "miss")}
    assert counted == {"hit": 3, "miss": 2}
    cache.put(keys[:1], unit(1, 16, 9))  # existing keys keep their first vector
    np.testing.assert_array_equal(cache.get(keys[:1], count=False)[0], vectors[0])
    assert len(cache) == 3


def test_templates_are_replaced_not_formatted():
    assert check_template("", ["a"], 100) == "{}"
    assert apply_template("a photo of {}", "{0.__class__}") == "a photo of {0.__class__}"
    for bad in ("none", "{} {}", "{0}"):
        with pytest.raises(domain.InvalidInput):
            check_template(bad, ["a"], 100)
    with pytest.raises(domain.InvalidInput, match="prompt 1"):
        check_template("x" * 50 + "{}", ["a", "b" * 60], 100)


def test_softmax_is_stable_and_normalized():
    logits = np.array([[1000.0, 1000.0, 0.0], [-5.0, 0.0, 5.0]])
    p = softmax(logits)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0], atol=1e-12)
    assert np.all(np.diff(p[1]) > 0)
    np.testing.assert_array_equal(softmax(logits[1]), p[1])  # a vector is one row


def test_images_are_split_by_bytes_in_order():
    from medvlm.v1 import types_pb2
    from services.gateway.clients import byte_chunks

    images = [types_pb2.Image(data=bytes([i]) * n) for i, n in enumerate([4, 4, 3, 10, 1, 1])]
    chunks = byte_chunks(images, limit=8)
    assert [[len(im.data) for im in c] for c in chunks] == [[4, 4], [3], [10], [1, 1]]
    assert [im for c in chunks for im in c] == images
