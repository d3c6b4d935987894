"""Behaviours a hospital depends on, each tested through the real services so that breaking it
fails a test: bundle identity per call, the benchmark guard, engine failures reaching callers,
input digests, priority across hops, the golden check, limits, stream defaults, retries and
unit-length embeddings. `make mutate` breaks each one on purpose and expects these to notice."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import structlog

from conftest import (
    encoder_settings, eventually, gateway_settings, health_status, start_server,
)
from engines.runtime.manifest import sha256_file
from medvlm.v1 import encoders_pb2_grpc, gateway_pb2, gateway_pb2_grpc, types_pb2
from services import domain
from services.domain import ROUTINE, STAT, URGENT
from services.gateway.app import GatewayApp
from services.plumbing.interceptors import REQUEST_ID_KEY, status_of
from services.plumbing.server import NOT_SERVING, SERVING
from services.plumbing.settings import TEXT, VISION
from services.text.servicer import TextApp
from services.vision.servicer import VisionApp
from test_gateway import classify_request, expect_status, png_bytes
from test_lifecycle import GatedVisionApp

VISION_RPC = "/medvlm.v1.VisionEncoderService/EmbedImages"


def fresh_labels(n: int = 2) -> list[str]:
    """Labels no earlier test used, so the text encoder is really called."""
    tag = uuid.uuid4().hex[:8]
    return [f"finding {tag} {i}" for i in range(n)]


def copy_bundle(src: Path, dst: Path, manifest_edit=None, golden_edit=None) -> Path:
    """A copy of a bundle with its manifest and/or golden outputs changed (hashes kept valid)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    if golden_edit is not None:
        golden = dict(np.load(dst / "golden.npz"))
        golden_edit(golden)
        np.savez(dst / "golden.npz", **golden)
        manifest["files"]["golden.npz"]["sha256"] = sha256_file(dst / "golden.npz")
    if manifest_edit is not None:
        manifest_edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def other_version(manifest: dict) -> None:
    manifest["version"] = manifest["version"] + "-other"


async def start_failure(server, logs: list[dict]) -> dict:
    """Wait (bounded) until a server's app has failed to start; returns the logged record."""
    await eventually(lambda: any(e.get("event") == "start_failed" for e in logs), what="start_failed logged")
    return next(e for e in logs if e.get("event") == "start_failed")


class Spy:
    """Records the priority each call of a real encoder app's `embed` carried, then delegates."""

    def __init__(self, app) -> None:
        self.app = app
        self.priorities: list[int] = []
        self._real = app.embed

    async def embed(self, payload, priority, deadline):
        self.priorities.append(priority)
        return await self._real(payload, priority, deadline)

    def __enter__(self) -> Spy:
        self.app.embed = self.embed
        return self

    def __exit__(self, *exc) -> None:
        del self.app.embed


# --- bundle identity -------------------------------------------------------------------------


@pytest.fixture
async def mixed_vision_replicas(tiny_bundle, tiny_stack, tmp_path):
    """Two vision replicas behind one target, one serving another bundle; a gateway over them."""
    other = copy_bundle(tiny_bundle, tmp_path / "tiny-other", manifest_edit=other_version)
    odd = await start_server(encoder_settings(VISION, other), VisionApp(encoder_settings(VISION, other)))
    gateway = channel = None
    try:
        target = f"ipv4:127.0.0.1:{tiny_stack.vision.port},127.0.0.1:{odd.port}"
        settings = gateway_settings(0, tiny_stack.text.port, vision_target=target, verify_retry_max_s=0.2)
        gateway = await start_server(settings, GatewayApp(settings))  # verified once it reached the good one
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        yield gateway_pb2_grpc.GatewayServiceStub(channel), gateway
    finally:
        if channel is not None:
            await channel.close()
        if gateway is not None:
            await gateway.stop(0)
        await odd.stop(0)


async def test_a_reply_of_another_bundle_is_refused_per_call(mixed_vision_replicas, tiny_stack):
    stub, _ = mixed_vision_replicas
    labels = fresh_labels()
    codes = []
    for seed in range(8):  # round robin: about half of these reach the replica of the other bundle
        try:
            reply = await stub.Classify(classify_request(labels, data=png_bytes(seed)), timeout=10)
            assert reply.bundle_id.startswith("tiny-") and "other" not in reply.bundle_id
            codes.append("OK")
        except grpc.aio.AioRpcError as exc:
            # a rollout in progress, as the gateway sees it: retry shortly, never a mixed answer
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
            assert "refusing to mix" in exc.details()
            codes.append(exc.code().name)
    assert "UNAVAILABLE" in codes and "OK" in codes, codes
    assert await health_status(tiny_stack.gateway.port) == SERVING


async def test_one_request_split_over_replicas_of_different_bundles_is_never_mixed(mixed_vision_replicas):
    stub, gateway = mixed_vision_replicas
    images = [types_pb2.Image(data=png_bytes(s)) for s in range(3)]
    gateway.app.vision.CHUNK_BYTES = 1  # one image per encoder call: three calls, both replicas
    for _ in range(4):
        await expect_status(
            stub.EmbedImages(types_pb2.EmbedImagesRequest(images=images), timeout=10),
            grpc.StatusCode.UNAVAILABLE, "different bundles",
        )


# --- what a service agrees to serve ------------------------------------------------------------


async def test_a_benchmark_bundle_is_served_only_when_allowed(tiny_bundle, tmp_path):
    def benchmark(manifest: dict) -> None:
        manifest["kind"] = "benchmark"

    bundle = copy_bundle(tiny_bundle, tmp_path / "bench", manifest_edit=benchmark)
    settings = encoder_settings(VISION, bundle)
    with structlog.testing.capture_logs() as logs:
        server = await start_server(settings, VisionApp(settings), wait=False)
        try:
            failure = await start_failure(server, logs)
            assert "allow-benchmark" in failure["error"]
            assert await health_status(server.port) == NOT_SERVING
        finally:
            await server.stop(0)
    allowed = encoder_settings(VISION, bundle, allow_benchmark=True)
    server = await start_server(allowed, VisionApp(allowed))
    try:
        assert await health_status(server.port) == SERVING
    finally:
        await server.stop(0)


async def test_golden_outputs_of_other_inputs_are_refused_even_under_a_loose_bound(tiny_bundle, tmp_path):
    """The tiny text tower's embeddings nearly coincide (plain cosine between different texts
    above 0.999): golden outputs shifted by one row pass a plain-cosine bound of 0.999, as a
    reduced-precision file may have; only the centred comparison sees the answers are wrong."""
    def shifted(golden: dict) -> None:
        golden["text_embeds"] = np.roll(golden["text_embeds"], 1, axis=0)

    def loose(manifest: dict) -> None:
        manifest["golden_min_cosine"] = 0.999

    bundle = copy_bundle(tiny_bundle, tmp_path / "shifted", manifest_edit=loose, golden_edit=shifted)
    settings = encoder_settings(TEXT, bundle)
    with structlog.testing.capture_logs() as logs:
        server = await start_server(settings, TextApp(settings), wait=False)
        try:
            failure = await start_failure(server, logs)
            assert "golden" in failure["error"]
            assert await health_status(server.port) == NOT_SERVING
        finally:
            await server.stop(0)


# --- failures reach callers ------------------------------------------------------------------


async def test_an_engine_failure_reaches_every_waiting_caller_and_the_server_recovers(tiny_bundle):
    settings = encoder_settings(VISION, tiny_bundle)
    server = await start_server(settings, VisionApp(settings))

    def broken(batch):
        raise RuntimeError("simulated device fault")

    try:
        engine = server.app.loaded.engine
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = encoders_pb2_grpc.VisionEncoderServiceStub(channel)
            request = types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=png_bytes(1))] * 2)
            engine.infer = broken
            try:
                # a deadline far beyond the work: a caller nobody tells waits until it, and fails
                # with DEADLINE_EXCEEDED instead of the engine's error
                outcomes = await asyncio.gather(
                    *[stub.EmbedImages(request, timeout=60) for _ in range(3)], return_exceptions=True
                )
            finally:
                del engine.infer
            for outcome in outcomes:
                assert isinstance(outcome, grpc.aio.AioRpcError), outcome
                assert outcome.code() == grpc.StatusCode.INTERNAL, outcome.details()
                assert "engine failed" in outcome.details()
                assert "simulated" not in outcome.details()
            assert len((await stub.EmbedImages(request, timeout=10)).embeddings) == 2
        assert server.app.batcher.admitted == 0
    finally:
        await server.stop(0)


# --- what the replies say about the inputs ---------------------------------------------------


async def test_digests_are_the_sha256_of_each_input(tiny_stack):
    stub = tiny_stack.gateway_stub
    datas = [png_bytes(s, (70 + s, 64)) for s in range(3)]
    labels = fresh_labels()
    cls = await stub.Classify(classify_request(labels, data=datas[0]), timeout=10)
    assert cls.image_sha256 == hashlib.sha256(datas[0]).hexdigest()
    sim = await stub.Similarity(gateway_pb2.SimilarityRequest(
        images=[types_pb2.Image(data=d) for d in datas], texts=labels), timeout=10)
    assert [r.image_sha256 for r in sim.rows] == [hashlib.sha256(d).hexdigest() for d in datas]
    emb = await stub.EmbedImages(types_pb2.EmbedImagesRequest(
        images=[types_pb2.Image(data=d) for d in datas]), timeout=10)
    assert [e.input_sha256 for e in emb.embeddings] == [hashlib.sha256(d).hexdigest() for d in datas]
    texts = await stub.EmbedTexts(types_pb2.EmbedTextsRequest(texts=labels), timeout=10)
    expected = [hashlib.sha256(t.encode()).hexdigest() for t in labels]
    assert [e.input_sha256 for e in texts.embeddings] == expected


async def test_embeddings_are_unit_length_from_the_encoders_and_the_gateway(tiny_stack):
    images = [types_pb2.Image(data=png_bytes(s)) for s in range(3)]
    texts = fresh_labels(3)
    via_gateway = [
        await tiny_stack.gateway_stub.EmbedImages(types_pb2.EmbedImagesRequest(images=images), timeout=10),
        await tiny_stack.gateway_stub.EmbedTexts(types_pb2.EmbedTextsRequest(texts=texts), timeout=10),
    ]
    async with tiny_stack.encoder_channel(VISION) as vch, tiny_stack.encoder_channel(TEXT) as tch:
        direct = [
            await encoders_pb2_grpc.VisionEncoderServiceStub(vch).EmbedImages(
                types_pb2.EmbedImagesRequest(images=images), timeout=10),
            await encoders_pb2_grpc.TextEncoderServiceStub(tch).EmbedTexts(
                types_pb2.EmbedTextsRequest(texts=fresh_labels(3)), timeout=10),
        ]
    for reply in (*via_gateway, *direct):
        norms = np.linalg.norm([e.values for e in reply.embeddings], axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)


# --- priority across the hop -----------------------------------------------------------------


async def test_priority_reaches_both_encoders(tiny_stack):
    stub = tiny_stack.gateway_stub
    with Spy(tiny_stack.vision.app) as vision, Spy(tiny_stack.text.app) as text:
        await stub.Classify(classify_request(fresh_labels(), priority=types_pb2.PRIORITY_STAT), timeout=10)
        assert (vision.priorities, text.priorities) == ([STAT], [STAT])
        await stub.Similarity(gateway_pb2.SimilarityRequest(
            images=[types_pb2.Image(data=png_bytes(4))], texts=fresh_labels(),
            priority=types_pb2.PRIORITY_URGENT), timeout=10)
        assert (vision.priorities[-1], text.priorities[-1]) == (URGENT, URGENT)
        await stub.EmbedImages(types_pb2.EmbedImagesRequest(
            images=[types_pb2.Image(data=png_bytes(5))], priority=types_pb2.PRIORITY_STAT), timeout=10)
        assert vision.priorities[-1] == STAT
        await stub.EmbedTexts(types_pb2.EmbedTextsRequest(
            texts=fresh_labels(), priority=types_pb2.PRIORITY_URGENT), timeout=10)
        assert text.priorities[-1] == URGENT
        await stub.Classify(classify_request(fresh_labels()), timeout=10)  # unspecified: routine
        assert (vision.priorities[-1], text.priorities[-1]) == (ROUTINE, ROUTINE)


async def test_stream_items_carry_their_own_priority(tiny_stack):
    labels = fresh_labels()

    async def requests():
        first = classify_request(labels, priority=types_pb2.PRIORITY_ROUTINE)
        yield gateway_pb2.ClassifyStreamRequest(correlation_id="0", request=first)
        urgent = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=png_bytes(9)),
                                             priority=types_pb2.PRIORITY_STAT)
        yield gateway_pb2.ClassifyStreamRequest(correlation_id="1", request=urgent)

    with Spy(tiny_stack.vision.app) as vision:
        replies = [r async for r in tiny_stack.gateway_stub.ClassifyStream(requests(), timeout=30)]
    assert all(r.HasField("result") for r in replies)
    assert sorted(vision.priorities, reverse=True) == [STAT, ROUTINE]  # one item each


# --- limits ------------------------------------------------------------------------------------


async def test_the_gateway_enforces_its_own_image_count_limit(tiny_stack):
    """The encoders allow more images per call than this gateway does: only the gateway's own
    check can refuse, before any encoder is called."""
    settings = gateway_settings(tiny_stack.vision.port, tiny_stack.text.port, max_images=3)
    gateway = await start_server(settings, GatewayApp(settings))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            images = [types_pb2.Image(data=png_bytes(s)) for s in range(4)]
            similarity = gateway_pb2.SimilarityRequest(images=images, texts=["a", "b"])
            with structlog.testing.capture_logs() as logs:
                await expect_status(
                    stub.Similarity(similarity, timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "4 images exceeds the limit of 3",
                )
                await expect_status(
                    stub.EmbedImages(types_pb2.EmbedImagesRequest(images=images), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, "4 images exceeds the limit of 3",
                )
            assert not [e for e in logs if e.get("event") == "audit" and e.get("rpc") == VISION_RPC]
            reply = await stub.EmbedImages(types_pb2.EmbedImagesRequest(images=images[:3]), timeout=10)
            assert len(reply.embeddings) == 3
    finally:
        await gateway.stop(0)


# --- worklist streams ------------------------------------------------------------------------


async def test_stream_items_use_the_first_items_template_and_top_k_and_answer_for_their_image(tiny_stack):
    labels = fresh_labels(4)
    template = "a radiograph showing {}"
    datas = [png_bytes(s, (60 + 3 * s, 72)) for s in range(6)]

    async def requests():
        for i, data in enumerate(datas):
            request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=data))
            if i == 0:
                request.labels.extend(labels)
                request.template = template
                request.top_k = 2
            yield gateway_pb2.ClassifyStreamRequest(correlation_id=f"img-{i}", request=request)

    call = tiny_stack.gateway_stub.ClassifyStream(requests(), timeout=60)
    streamed = {r.correlation_id: r async for r in call}
    assert set(streamed) == {f"img-{i}" for i in range(len(datas))}
    for i, data in enumerate(datas):
        result = streamed[f"img-{i}"].result
        unary = await tiny_stack.gateway_stub.Classify(
            classify_request(labels, data=data, template=template, top_k=2), timeout=10)
        assert result.image_sha256 == hashlib.sha256(data).hexdigest()
        assert len(result.top) == 2
        assert [t.index for t in result.top] == [t.index for t in unary.top]
        np.testing.assert_allclose([s.cosine for s in result.scores], [s.cosine for s in unary.scores],
                                   atol=1e-6)
    # the template matters for this model, so an item scored without it would differ
    plain = await tiny_stack.gateway_stub.Classify(classify_request(labels, data=datas[1]), timeout=10)
    assert not np.allclose([s.cosine for s in plain.scores],
                           [s.cosine for s in streamed["img-1"].result.scores], atol=1e-6)


# --- retries ---------------------------------------------------------------------------------


async def test_a_failed_call_carries_its_request_id_in_trailers_and_no_headers(tiny_stack):
    """gRPC retries a call only while no headers have arrived: a refusal must come without them."""
    call = tiny_stack.gateway_stub.Classify(classify_request(["same", "same"]),
                                            metadata=((REQUEST_ID_KEY, "rid-failed-1"),), timeout=10)
    await expect_status(call, grpc.StatusCode.INVALID_ARGUMENT, "distinct")
    assert REQUEST_ID_KEY not in dict(await call.initial_metadata())
    assert dict(await call.trailing_metadata())[REQUEST_ID_KEY] == "rid-failed-1"


async def test_a_replica_answering_unavailable_costs_no_failed_call(tiny_bundle, tiny_stack):
    """A replica whose connection is up but which answers UNAVAILABLE (still loading) stays in
    round robin's rotation: only the retry policy keeps its share of calls from failing."""
    gate = asyncio.Event()  # never opened: this replica stays NOT_SERVING
    loading_settings = encoder_settings(VISION, tiny_bundle)
    loading = await start_server(loading_settings, GatedVisionApp(loading_settings, gate), wait=False)
    gateway = channel = None
    try:
        target = f"ipv4:127.0.0.1:{tiny_stack.vision.port},127.0.0.1:{loading.port}"
        settings = gateway_settings(0, tiny_stack.text.port, vision_target=target, verify_retry_max_s=0.2)
        gateway = await start_server(settings, GatewayApp(settings))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        labels = fresh_labels()
        failures = []
        with structlog.testing.capture_logs() as logs:
            for seed in range(12):
                try:
                    reply = await stub.Classify(classify_request(labels, data=png_bytes(seed)), timeout=10)
                    assert len(reply.scores) == 2
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc.code().name)
        refused = [e for e in logs if e.get("event") == "audit" and e.get("rpc") == VISION_RPC
                   and e.get("code") == "UNAVAILABLE"]
        assert refused, "the loading replica was never tried: the test proves nothing"
        assert failures == []
    finally:
        gate.set()
        if channel is not None:
            await channel.close()
        if gateway is not None:
            await gateway.stop(0)
        await loading.stop(0)


def test_every_domain_error_has_its_status():
    assert status_of(domain.InvalidInput("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(domain.NotReady("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(domain.Unavailable("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(domain.Overloaded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(domain.DeadlineExpired("x")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_of(domain.Inconsistent("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(domain.MedvlmError("x")) == grpc.StatusCode.INTERNAL
