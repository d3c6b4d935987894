"""Kubernetes-style changes with real processes: a replica added behind a DNS name gets calls
within the encoders' connection age, and a bundle rollout is followed without a gateway restart,
failing calls only with UNAVAILABLE while the encoders disagree, never with a mixed answer."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import threading
import time
import urllib.request

import grpc
import pytest

from conftest import (encoder_settings, eventually, gateway_settings, health_status, spawn_service,
                      start_server, wait_for_serving)
from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2
from services.gateway.app import GatewayApp
from services.plumbing.server import SERVING
from services.plumbing.settings import TEXT
from services.text.servicer import TextApp
from test_gateway import png_bytes

pytestmark = pytest.mark.slow
EMBED_OK = 'medvlm_requests_total{code="OK",method="/medvlm.v1.VisionEncoderService/EmbedImages"}'


class DnsStub:
    """A UDP DNS server on loopback that answers every A query with the current address list."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = list(addresses)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                data, peer = self.sock.recvfrom(512)
            except OSError:
                continue
            end = 12
            while data[end]:
                end += data[end] + 1
            question = data[12:end + 5]
            qtype = struct.unpack(">H", data[end + 1:end + 3])[0]
            answers = [a for a in self.addresses] if qtype == 1 else []
            body = b"".join(b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 1, 4) + socket.inet_aton(a) for a in answers)
            header = struct.pack(">HHHHHH", struct.unpack(">H", data[:2])[0], 0x8180, 1, len(answers), 0, 0)
            self.sock.sendto(header + question + body, peer)

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


class Vision:
    """A vision encoder process on a chosen address and port (later flags win over spawn_service's)."""

    def __init__(self, bundle, host: str = "127.0.0.1", port: int = 0, *args: str) -> None:
        self.proc = spawn_service("vision", "--bundle", str(bundle), "--metrics-port", "0",
                                  "--host", host, "--port", str(port), *args)
        ports = wait_for_serving(self.proc)
        self.host, self.port, self.metrics_port = host, ports["port"], ports["metrics_port"]
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def served(self) -> float:
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=5) as reply:
            return sum(float(line.split()[-1]) for line in reply.read().decode().splitlines()
                       if line.startswith(EMBED_OK))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


async def _classify_loop(stub, stop: asyncio.Event, outcomes: list, labels: list[str]) -> None:
    image = types_pb2.Image(data=png_bytes(5))
    while not stop.is_set():
        try:
            reply = await stub.Classify(gateway_pb2.ClassifyRequest(image=image, labels=labels), timeout=30)
            outcomes.append(("OK", reply.bundle_id, time.monotonic()))
        except grpc.aio.AioRpcError as exc:
            outcomes.append((exc.code().name, exc.details(), time.monotonic()))
            await asyncio.sleep(0.05)


async def test_a_replica_added_behind_the_dns_name_gets_calls_within_the_connection_age(tiny_bundle):
    age_s = 3
    replicas = [Vision(tiny_bundle, "127.0.0.2", 0, "--max-connection-age-s", str(age_s))]
    port = replicas[0].port
    replicas.append(Vision(tiny_bundle, "127.0.0.3", port, "--max-connection-age-s", str(age_s)))
    dns = DnsStub(["127.0.0.2", "127.0.0.3"])
    text = gateway = None
    stop = asyncio.Event()
    try:
        text = await start_server(encoder_settings(TEXT, tiny_bundle), TextApp(encoder_settings(TEXT, tiny_bundle)))
        settings = gateway_settings(0, text.port, vision_target=f"dns://127.0.0.1:{dns.port}/encoders.test:{port}")
        gateway = await start_server(settings, GatewayApp(settings))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            outcomes: list = []
            load = asyncio.ensure_future(_classify_loop(gateway_pb2_grpc.GatewayServiceStub(channel), stop,
                                                        outcomes, ["scale a", "scale b"]))
            third = Vision(tiny_bundle, "127.0.0.4", port, "--max-connection-age-s", str(age_s))
            replicas.append(third)
            dns.addresses.append("127.0.0.4")
            added = time.monotonic()
            while third.served() == 0:
                assert time.monotonic() - added < 20, "the new replica got no call within 20 s"
                await asyncio.sleep(0.2)
            took = time.monotonic() - added
            stop.set()
            await load
        # bound: connection age (+10 % jitter) + its grace + the 5 s minimum between resolutions
        assert took < age_s * 1.1 + 5 + 5, took
        assert all(code == "OK" for code, *_ in outcomes), [o for o in outcomes if o[0] != "OK"][:3]
        print(f"third replica served its first call {took:.1f} s after it was added")
    finally:
        stop.set()
        dns.close()
        for server in (gateway, text):
            if server is not None:
                await server.stop(0)
        for replica in replicas:
            replica.stop()


def _other_bundle(bundle, tmp_path):
    other = tmp_path / "tiny-rolled"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["version"] = manifest["version"] + "-rolled"
    (other / "manifest.json").write_text(json.dumps(manifest))
    return other


async def test_a_bundle_rollout_is_followed_without_a_restart_and_never_mixed(tiny_bundle, tmp_path):
    new_bundle = _other_bundle(tiny_bundle, tmp_path)
    vision = Vision(tiny_bundle)
    text_proc = spawn_service("text", "--bundle", str(tiny_bundle), "--no-metrics")
    text_port = wait_for_serving(text_proc)["port"]
    threading.Thread(target=lambda: [None for _ in text_proc.stderr], daemon=True).start()
    procs = [vision.proc, text_proc]
    settings = gateway_settings(vision.port, text_port)
    gateway = await start_server(settings, GatewayApp(settings))
    stop = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            outcomes: list = []
            load = asyncio.ensure_future(_classify_loop(gateway_pb2_grpc.GatewayServiceStub(channel), stop,
                                                        outcomes, ["roll a", "roll b"]))
            await eventually(lambda: any(o[0] == "OK" for o in outcomes), what="the first answer")
            old_id = next(o[1] for o in outcomes if o[0] == "OK")
            # roll the text encoder first, then the vision encoder, each on the same address
            text_proc.kill()
            text_proc.wait(10)
            text_proc = spawn_service("text", "--bundle", str(new_bundle), "--no-metrics", "--port", str(text_port))
            procs.append(text_proc)
            wait_for_serving(text_proc)
            threading.Thread(target=lambda p=text_proc: [None for _ in p.stderr], daemon=True).start()
            await asyncio.sleep(1.0)
            vision.stop()
            vision = Vision(new_bundle, "127.0.0.1", vision.port)
            procs.append(vision.proc)
            rolled = time.monotonic()
            while not any(o[0] == "OK" and o[2] > rolled and o[1] != old_id for o in outcomes):
                assert time.monotonic() - rolled < 20, "the gateway did not take up the new bundle"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            stop.set()
            await load
        codes = {o[0] for o in outcomes}
        assert codes <= {"OK", "UNAVAILABLE"}, [o for o in outcomes if o[0] not in ("OK", "UNAVAILABLE")][:3]
        ok_ids = [o[1] for o in outcomes if o[0] == "OK"]
        new_id = ok_ids[-1]
        assert new_id != old_id and set(ok_ids) == {old_id, new_id}
        # every answer names one bundle, and once the new one answered the old one never did again
        first_new = ok_ids.index(new_id)
        assert old_id not in ok_ids[first_new:]
        assert await health_status(gateway.port) == SERVING
    finally:
        stop.set()
        await gateway.stop(0)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
