"""Server lifecycle: NOT_SERVING before warm-up and for a corrupt bundle, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal

import grpc
import pytest
import structlog

from conftest import encoder_settings, eventually, health_status, spawn_service, start_server, wait_for_serving
from medvlm.v1 import encoders_pb2_grpc, types_pb2
from services.plumbing.server import NOT_SERVING, SERVING
from services.plumbing.settings import TEXT, VISION
from services.text.servicer import TextApp
from services.vision.servicer import VisionApp
from test_gateway import png_bytes


def GatedVisionApp(settings, gate: asyncio.Event):  # noqa: N802 - stands for an app class
    """The real vision app, whose loading waits for the test to open a gate."""
    app = VisionApp(settings)
    start = app.start

    async def gated_start() -> None:
        await gate.wait()
        await start()

    app.start = gated_start
    return app


async def test_not_serving_until_loaded_and_verified(tiny_bundle):
    gate = asyncio.Event()
    settings = encoder_settings(VISION, tiny_bundle)
    server = await start_server(settings, GatedVisionApp(settings, gate), wait=False)
    try:
        assert await health_status(server.port) == NOT_SERVING
        assert await health_status(server.port, "medvlm.v1.VisionEncoderService") == NOT_SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = encoders_pb2_grpc.VisionEncoderServiceStub(channel)
            request = types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=png_bytes())])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.EmbedImages(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            gate.set()
            await asyncio.wait_for(server.ready.wait(), 30)
            assert await health_status(server.port) == SERVING
            reply = await stub.EmbedImages(request, timeout=5)
            assert len(reply.embeddings) == 1
    finally:
        await server.stop(0)


@pytest.mark.parametrize("damage", ["flip_onnx_byte", "wrong_golden"])
async def test_corrupt_bundle_stays_live_but_not_serving(tiny_bundle, tmp_path, damage):
    bundle = tmp_path / "damaged"
    shutil.copytree(tiny_bundle, bundle)
    if damage == "flip_onnx_byte":
        target = bundle / "text.onnx"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        # outputs changed and hashes updated: only the golden check can catch it
        import numpy as np

        from engines.runtime.manifest import sha256_file

        golden = dict(np.load(bundle / "golden.npz"))
        golden["text_embeds"] = golden["text_embeds"][::-1].copy()
        np.savez(bundle / "golden.npz", **golden)
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["files"]["golden.npz"]["sha256"] = sha256_file(bundle / "golden.npz")
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    settings = encoder_settings(TEXT, bundle)
    with structlog.testing.capture_logs() as logs:
        server = await start_server(settings, TextApp(settings), wait=False)
        try:
            await eventually(lambda: any(e.get("event") == "start_failed" for e in logs), what="start_failed")
            assert await health_status(server.port) == NOT_SERVING
            assert not server.ready.is_set()
        finally:
            await server.stop(0)


def _large_png() -> bytes:
    """4 Mpx of smooth content: small to send, slow enough to decode that calls stay in flight."""
    import io

    import numpy as np
    from PIL import Image

    ramp = np.add.outer(np.arange(2000), np.arange(2000)) % 256  # [H, W]
    buf = io.BytesIO()
    Image.fromarray(ramp.astype(np.uint8)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _inflight(metrics_port: int, method: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f'medvlm_inflight_requests{{method="{method}"}}'):
                return float(line.split()[-1])
    return 0.0


async def test_sigterm_goes_not_serving_drains_and_exits(tiny_bundle):
    proc = spawn_service("vision", "--bundle", str(tiny_bundle), "--metrics-port", "0",
                         MEDVLM_DRAIN_S="2", MEDVLM_GRACE_S="30")
    try:
        ports = await asyncio.to_thread(wait_for_serving, proc)
        port = ports["port"]
        assert await health_status(port) == SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = encoders_pb2_grpc.VisionEncoderServiceStub(channel)
            request = types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=_large_png())] * 12)
            finished: list[int] = []

            async def call(i: int):
                reply = await stub.EmbedImages(request, timeout=120)
                finished.append(i)
                return reply

            in_flight = [asyncio.ensure_future(call(i)) for i in range(4)]
            method = "/medvlm.v1.VisionEncoderService/EmbedImages"
            inflight = 0.0

            async def all_in_flight() -> bool:
                nonlocal inflight
                inflight = await asyncio.to_thread(_inflight, ports["metrics_port"], method)
                return inflight >= 4

            for _ in range(2000):  # bounded polling: the four calls reach the server
                if await all_in_flight() or finished:
                    break
            assert inflight >= 4 and len(finished) < 4, "the calls were not in flight at SIGTERM"
            proc.send_signal(signal.SIGTERM)
            statuses = set()
            for _ in range(2000):  # bounded polling: health turns NOT_SERVING during the drain
                statuses.add(await health_status(port))
                if NOT_SERVING in statuses:
                    break
            assert NOT_SERVING in statuses
            replies = await asyncio.gather(*in_flight)
            # every call in flight at SIGTERM completed
            assert all(len(r.embeddings) == 12 for r in replies) and sorted(finished) == [0, 1, 2, 3]
        assert await asyncio.to_thread(proc.wait, 120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.mark.parametrize("flags, loop", [((), "uvloop"), (("--event-loop", "asyncio"), "asyncio")])
async def test_a_service_runs_on_the_event_loop_its_settings_name(tiny_bundle, flags, loop):
    """uvloop by default, asyncio's own loop when asked; either serves calls and stops on SIGTERM."""
    proc = spawn_service("text", "--bundle", str(tiny_bundle), "--no-metrics", *flags)
    try:
        ports = await asyncio.to_thread(wait_for_serving, proc)
        assert ports["event_loop"] == loop
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['port']}") as channel:
            reply = await encoders_pb2_grpc.TextEncoderServiceStub(channel).EmbedTexts(
                types_pb2.EmbedTextsRequest(texts=["a chest x-ray"]), timeout=30)
        assert len(reply.embeddings) == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
