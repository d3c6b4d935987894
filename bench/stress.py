"""What the soak and the fault matrix share: a local stack in real processes and a mixed load
that counts every outcome (ok, codes, hung past deadline, stream results lost or duplicated)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time
from pathlib import Path

import grpc

from bench.procs import HOST, Server, free_port, service_env
from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2

ROOT = Path(__file__).resolve().parent.parent
CHEST = ["normal chest radiograph", "left pleural effusion", "right pleural effusion", "cardiomegaly",
         "pneumothorax", "lobar consolidation"]
# a call is "hung" when it has not ended this long after its own deadline
HUNG_MARGIN_S = 2.0


def sample_images() -> list[bytes]:
    """The repository's sample PNGs (demo modalities)."""
    return [p.read_bytes() for p in sorted((ROOT / "samples").glob("*.png"))]


class Stack:
    """vision (one or more replicas), text and gateway, each a process on a free loopback port."""

    def __init__(self, bundle: Path, log_dir: Path, *, vision_replicas: int = 1,
                 gateway_env: dict[str, str] | None = None, encoder_env: dict[str, str] | None = None,
                 gateway_module: str = "services.gateway") -> None:
        self.bundle = bundle
        self.log_dir = log_dir
        self.encoder_env = encoder_env or {}
        self.gateway_env = gateway_env or {}
        log_dir.mkdir(parents=True, exist_ok=True)
        self.vision_ports = [free_port() for _ in range(vision_replicas)]
        self.text_port = free_port()
        self.gateway_port = free_port()
        self.vision: list[Server] = [self._encoder("vision", port, i) for i, port in enumerate(self.vision_ports)]
        self.text = self._encoder("text", self.text_port, 0)
        for server, port in [*zip(self.vision, self.vision_ports), (self.text, self.text_port)]:
            server.wait_serving(f"{HOST}:{port}", 120)
        vision_target = "ipv4:" + ",".join(f"{HOST}:{p}" for p in self.vision_ports)
        self.gateway = Server("gateway", self._argv(gateway_module, self.gateway_port) + [
            "--vision-target", vision_target, "--text-target", f"{HOST}:{self.text_port}"],
            cwd=ROOT, env=service_env(ROOT, self.gateway_env), log_dir=log_dir)
        self.gateway.wait_serving(self.target, 120)

    @staticmethod
    def _argv(module: str, port: int) -> list[str]:
        import sys

        return [sys.executable, "-m", module, "--host", HOST, "--port", str(port),
                "--metrics-port", "0", "--grace-s", "10"]

    def _encoder(self, service: str, port: int, index: int) -> Server:
        return Server(f"{service}-{index}", self._argv(f"services.{service}", port) + ["--bundle", str(self.bundle)],
                      cwd=ROOT, env=service_env(ROOT, self.encoder_env), log_dir=self.log_dir)

    def restart(self, old: Server, service: str, port: int) -> Server:
        """A replacement process on the same port (the gateway's target does not change)."""
        old.stop(5)
        new = self._encoder(service, port, len(list(self.log_dir.glob(f"{service}-*.log"))))
        new.wait_serving(f"{HOST}:{port}", 120)
        return new

    @property
    def target(self) -> str:
        return f"{HOST}:{self.gateway_port}"

    def processes(self) -> dict[str, Server]:
        return {s.name: s for s in (*self.vision, self.text, self.gateway)}

    def stop(self) -> None:
        for server in (self.gateway, *self.vision, self.text):
            server.stop(15)


@dataclasses.dataclass
class Tally:
    """Outcomes of a load run."""

    sent: int = 0
    codes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    hung: int = 0
    stream_items_sent: int = 0
    # stream items answered with an error (ItemError.code): the stream itself ends OK
    item_codes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    stream_results_lost: int = 0
    stream_results_duplicated: int = 0
    first_ok_after: dict[str, float] = dataclasses.field(default_factory=dict)
    last_ok: float = 0.0

    def record(self, code: str, started: float, deadline_s: float | None) -> None:
        now = time.monotonic()
        self.codes[code] += 1
        if code == "OK":
            self.last_ok = now
        if deadline_s is not None and now - started > deadline_s + HUNG_MARGIN_S:
            self.hung += 1

    def summary(self) -> dict:
        return {
            "sent": self.sent, "ok": self.codes.get("OK", 0),
            "failed": {k: v for k, v in sorted(self.codes.items()) if k != "OK"},
            "hung": self.hung, "stream_items": self.stream_items_sent,
            "stream_items_failed": dict(sorted(self.item_codes.items())),
            "stream_lost": self.stream_results_lost, "stream_duplicated": self.stream_results_duplicated,
        }


class MixedLoad:
    """`workers` concurrent loops of a weighted mix of calls, until stopped.

    Mix: Classify, Similarity, ClassifyStream worklists, bad inputs, calls cancelled at a random
    moment, and deadlines too short to meet. Every call has a deadline (so a hang is visible);
    a stream's results are checked against the items it sent (lost or duplicated).
    """

    MIX = (("classify", 50), ("similarity", 10), ("stream", 10), ("bad", 10), ("cancel", 10), ("expire", 10))

    def __init__(self, target: str, workers: int = 8, deadline_s: float = 10.0, mix=MIX, seed: int = 0,
                 stream_items: int = 20) -> None:
        self.target = target
        self.workers = workers
        self.deadline_s = deadline_s
        self.kinds = [k for k, _ in mix]
        self.weights = [w for _, w in mix]
        self.rng = random.Random(seed)
        self.images = sample_images()
        self.stream_items = stream_items
        self.tally = Tally()
        self._stop = asyncio.Event()

    async def run(self, seconds: float | None = None) -> Tally:
        """Run until stop() (or for `seconds`); returns the tally."""
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            workers = [asyncio.ensure_future(self._worker(stub)) for _ in range(self.workers)]
            try:
                if seconds is None:
                    await self._stop.wait()
                else:
                    await asyncio.wait_for(self._stop.wait(), seconds)
            except TimeoutError:
                pass
            finally:
                self._stop.set()
                await asyncio.gather(*workers)
        return self.tally

    def stop(self) -> None:
        self._stop.set()

    # Vision-encoder calls and images one call of each kind puts in flight (a stream: one call per item
    # in the gateway's window, each of one image).
    IMAGES = {"classify": 1, "similarity": 3, "bad": 1, "cancel": 1, "expire": 1}

    def encoder_peak(self, stream_window: int) -> tuple[int, int]:
        """Most vision-encoder calls and images this load can have in flight at once through a
        gateway with `stream_window`: every worker in its heaviest kind of call at the same moment."""
        window = min(stream_window, self.stream_items)
        calls = max(window if kind == "stream" else 1 for kind in self.kinds)
        images = max(window if kind == "stream" else self.IMAGES[kind] for kind in self.kinds)
        return self.workers * calls, self.workers * images

    def _image(self) -> types_pb2.Image:
        return types_pb2.Image(data=self.rng.choice(self.images))

    async def _worker(self, stub) -> None:
        while not self._stop.is_set():
            kind = self.rng.choices(self.kinds, self.weights)[0]
            await getattr(self, f"_{kind}")(stub)

    async def _unary(self, call, deadline_s: float, cancel_after_s: float | None = None) -> None:
        started = time.monotonic()
        self.tally.sent += 1
        try:
            if cancel_after_s is not None:
                await asyncio.sleep(cancel_after_s)
                call.cancel()
            await call
            code = "OK"
        except asyncio.CancelledError:
            code = "CANCELLED"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        self.tally.record(code, started, deadline_s)

    async def _classify(self, stub) -> None:
        request = gateway_pb2.ClassifyRequest(image=self._image(), labels=CHEST)
        await self._unary(stub.Classify(request, timeout=self.deadline_s), self.deadline_s)

    async def _similarity(self, stub) -> None:
        request = gateway_pb2.SimilarityRequest(images=[self._image() for _ in range(3)], texts=CHEST[:3])
        await self._unary(stub.Similarity(request, timeout=self.deadline_s), self.deadline_s)

    async def _bad(self, stub) -> None:
        data = bytes(self.rng.getrandbits(8) for _ in range(self.rng.randrange(1, 400)))
        request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=data), labels=CHEST)
        await self._unary(stub.Classify(request, timeout=self.deadline_s), self.deadline_s)

    async def _cancel(self, stub) -> None:
        request = gateway_pb2.ClassifyRequest(image=self._image(), labels=CHEST)
        call = stub.Classify(request, timeout=self.deadline_s)
        await self._unary(call, self.deadline_s, cancel_after_s=self.rng.uniform(0, 0.03))

    async def _expire(self, stub) -> None:
        deadline = self.rng.uniform(0.001, 0.02)
        request = gateway_pb2.ClassifyRequest(image=self._image(), labels=CHEST)
        await self._unary(stub.Classify(request, timeout=deadline), deadline)

    async def _stream(self, stub) -> None:
        n = self.stream_items
        ids = [f"w{id(self)}-{self.tally.sent}-{i}" for i in range(n)]
        first = gateway_pb2.ClassifyRequest(image=self._image(), labels=CHEST, top_k=2)
        items = [gateway_pb2.ClassifyStreamRequest(correlation_id=ids[0], request=first)] + [
            gateway_pb2.ClassifyStreamRequest(correlation_id=i, request=gateway_pb2.ClassifyRequest(image=self._image()))
            for i in ids[1:]]
        deadline_s = self.deadline_s * 3
        started = time.monotonic()
        self.tally.sent += 1
        self.tally.stream_items_sent += n
        seen: collections.Counter = collections.Counter()
        try:
            async for reply in stub.ClassifyStream(iter(items), timeout=deadline_s):
                seen[reply.correlation_id] += 1
                if reply.HasField("error"):
                    self.tally.item_codes[reply.error.code] += 1
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        self.tally.record(code, started, deadline_s)
        if code == "OK":  # a stream that ended with an error status said so; count only silent loss
            self.tally.stream_results_lost += sum(1 for i in ids if seen[i] == 0)
        self.tally.stream_results_duplicated += sum(c - 1 for c in seen.values() if c > 1)
