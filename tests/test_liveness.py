"""Liveness apart from readiness: live while warming up and draining, not live when the engine hangs."""

from __future__ import annotations

import asyncio
import threading

import grpc

from conftest import encoder_settings, health_status, start_server, wait_health
from medvlm.v1 import encoders_pb2_grpc, types_pb2
from services.plumbing.server import LIVENESS, NOT_SERVING, SERVING
from services.plumbing.settings import VISION
from test_gateway import png_bytes
from test_lifecycle import GatedVisionApp
from services.vision.servicer import VisionApp


async def test_live_while_warming_up_and_while_draining(tiny_bundle):
    gate = asyncio.Event()
    settings = encoder_settings(VISION, tiny_bundle, drain_s=5)  # ample for two health checks
    server = await start_server(settings, GatedVisionApp(settings, gate), wait=False)
    stopping = None
    try:
        assert await health_status(server.port) == NOT_SERVING  # not ready: still loading
        assert await health_status(server.port, LIVENESS) == SERVING  # but alive
        gate.set()
        await asyncio.wait_for(server.ready.wait(), 30)
        assert await health_status(server.port) == SERVING
        stopping = asyncio.ensure_future(server.stop(1.0))
        await wait_health(server.port, NOT_SERVING)  # draining: no new work, please
        assert await health_status(server.port, LIVENESS) == SERVING  # and do not kill it
        assert not stopping.done()
    finally:
        gate.set()
        await (stopping if stopping is not None else server.stop(0))


async def test_not_live_when_the_engine_hangs_and_live_again_when_it_returns(tiny_bundle):
    settings = encoder_settings(VISION, tiny_bundle, liveness_stall_s=1.0, probe_interval_s=0.3)
    app = VisionApp(settings)
    server = await start_server(settings, app)
    engine = app.loaded.engine
    real_infer = engine.infer
    hang = threading.Event()
    release = threading.Event()

    def infer(batch):
        if hang.is_set():
            release.wait(60)  # a wedged engine call
        return real_infer(batch)

    engine.infer = infer
    try:
        await wait_health(server.port, SERVING, service=LIVENESS)
        hang.set()  # no traffic at all: the periodic probe is what finds the hang
        await wait_health(server.port, NOT_SERVING, service=LIVENESS)
        hang.clear()
        release.set()
        await wait_health(server.port, SERVING, service=LIVENESS)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            reply = await encoders_pb2_grpc.VisionEncoderServiceStub(channel).EmbedImages(
                types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=png_bytes(4))]), timeout=10)
        assert len(reply.embeddings) == 1
    finally:
        release.set()
        engine.infer = real_infer
        await server.stop(0)


async def test_a_failing_engine_is_found_by_the_probe(tiny_bundle):
    settings = encoder_settings(VISION, tiny_bundle, probe_interval_s=0.2)
    app = VisionApp(settings)
    server = await start_server(settings, app)
    engine = app.loaded.engine
    real_infer = engine.infer

    def broken(batch):
        raise RuntimeError("device lost")

    try:
        engine.infer = broken
        await wait_health(server.port, NOT_SERVING, service=LIVENESS)
        assert await health_status(server.port) == NOT_SERVING  # not ready either
        engine.infer = real_infer
        await wait_health(server.port, SERVING, service=LIVENESS)
        await wait_health(server.port, SERVING)
    finally:
        engine.infer = real_infer
        await server.stop(0)
