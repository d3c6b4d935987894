"""Client-side balancing with real processes: the gateway spreads calls over vision replicas and
survives losing one."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest

from conftest import encoder_settings, gateway_settings, spawn_service, start_server, wait_for_serving
from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2
from services.gateway.app import GatewayApp
from services.plumbing.settings import TEXT
from services.text.servicer import TextApp
from test_gateway import png_bytes

EMBED_OK = 'medvlm_requests_total{code="OK",method="/medvlm.v1.VisionEncoderService/EmbedImages"}'


class Replica:
    """A vision encoder in its own process."""

    def __init__(self, bundle) -> None:
        self.proc = spawn_service("vision", "--metrics-port", "0", "--bundle", str(bundle))
        self.port = self.metrics_port = 0

    def wait_serving(self) -> None:
        ports = wait_for_serving(self.proc)
        self.port, self.metrics_port = ports["port"], ports["metrics_port"]
        # keep draining the log so the replica never blocks on a full pipe
        self.drain = asyncio.get_running_loop().run_in_executor(None, self.proc.stderr.read)

    def served(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(EMBED_OK):
                    return float(line.split()[-1])
        return 0.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


async def test_calls_spread_over_replicas_and_survive_losing_one(tiny_bundle):
    replicas = [Replica(tiny_bundle), Replica(tiny_bundle)]
    text = gateway = channel = None
    try:
        for replica in replicas:
            replica.wait_serving()  # blocks the loop briefly; nothing else runs yet
        text = await start_server(encoder_settings(TEXT, tiny_bundle), TextApp(encoder_settings(TEXT, tiny_bundle)))
        # one target that resolves to both replicas; round_robin picks per call
        target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
        settings = gateway_settings(0, text.port, vision_target=target)
        gateway = await start_server(settings, GatewayApp(settings))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=png_bytes(1)), labels=["lb a", "lb b"])
        for _ in range(20):
            await stub.Classify(request, timeout=10)
        counts = [r.served() for r in replicas]
        assert all(c >= 5 for c in counts), f"calls were not spread: {counts}"

        replicas[0].kill()
        failures = 0
        for _ in range(30):
            try:
                reply = await stub.Classify(request, timeout=10)
                assert len(reply.scores) == 2
            except grpc.aio.AioRpcError:
                failures += 1
        # retry policy: UNAVAILABLE is retried up to 3 attempts on the other replica, so losing
        # one replica costs no failed call
        assert failures == 0
        assert replicas[1].served() >= counts[1] + 30
    finally:
        if channel is not None:
            await channel.close()
        for server in (gateway, text):
            if server is not None:
                await server.stop(0)
        for replica in replicas:
            replica.kill()


pytestmark = pytest.mark.slow
