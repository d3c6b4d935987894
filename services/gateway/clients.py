"""Channels to the encoders: per-call balancing, safe retries, deadlines, and RpcError -> domain errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medvlm.v1 import encoders_pb2, encoders_pb2_grpc, types_pb2
from services import domain
from services.plumbing import convert
from services.plumbing.interceptors import REQUEST_ID_KEY, RETRY_AFTER_KEY, current_request_id
from services.security.tls import ClientCertificateFiles

_VISION_SERVICE = encoders_pb2.DESCRIPTOR.services_by_name["VisionEncoderService"].full_name
_TEXT_SERVICE = encoders_pb2.DESCRIPTOR.services_by_name["TextEncoderService"].full_name

# round_robin spreads calls over every address the target resolves to (dns:/// on a
# headless Service gives one per pod). Embedding is idempotent, so retrying a call that
# failed with UNAVAILABLE is safe; at most 3 attempts, always inside the call's deadline.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": _VISION_SERVICE}, {"service": _TEXT_SERVICE}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def channel_options(max_message_bytes: int) -> list[tuple[str, object]]:
    return [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A replaced encoder is reconnected to within ~2 s, however long the old one was gone
        # (gRPC's default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # dns:/// targets are resolved again when a connection closes (an encoder's maximum
        # connection age), but by default at most every 30 s: 5 s lets new replicas in sooner.
        ("grpc.dns_min_time_between_resolutions_ms", 5000),
    ]


@dataclasses.dataclass(frozen=True)
class Embedded:
    """What an encoder returned: unit-length vectors [N, D], input digests, and the bundle."""

    vectors: np.ndarray
    digests: list[str]
    bundle_id: str


def _domain_error(name: str, exc: grpc.aio.AioRpcError) -> domain.MedvlmError:
    """The one conversion of an encoder's status into a domain error. Encoders' messages for
    bad input are our own and safe to pass on; everything else gets a message of ours."""
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return domain.InvalidInput(exc.details() or f"{name} refused the input")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return domain.Overloaded(f"{name} encoder is overloaded; retry shortly", retry_after_s=_retry_after_s(exc))
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return domain.DeadlineExpired(f"{name} encoder did not answer within the deadline")
    if code == grpc.StatusCode.UNAVAILABLE:
        return domain.Unavailable(f"{name} encoder is unavailable")
    return domain.MedvlmError(f"{name} encoder failed ({code.name})")


def _retry_after_s(exc: grpc.aio.AioRpcError) -> float:
    """The encoder's own retry hint (trailing metadata), else 0.1 s."""
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except (TypeError, ValueError):
                break
    return 0.1


class EncoderClient:
    """One encoder behind one channel."""

    # How long a channel replaced after a certificate rotation stays open for the calls on it.
    RETIRE_AFTER_S = 60.0

    def __init__(self, name: str, target: str, stub_class, max_message_bytes: int,
                 certificates: ClientCertificateFiles | None = None) -> None:
        self.name = name
        self.target = target
        self.stub_class = stub_class
        self.options = channel_options(max_message_bytes)
        self.certificates = certificates
        self._retiring: set[asyncio.Task] = set()
        self._version = 0 if certificates is None else certificates.version
        self._open(None if certificates is None else certificates.credentials)

    def _open(self, credentials: grpc.ChannelCredentials | None) -> None:
        # With TLS the encoders' certificates must name the host of the target (for dns:///vision:50051
        # on a headless Service: its DNS name); every resolved replica is checked against it.
        self.channel = (grpc.aio.insecure_channel(self.target, options=self.options) if credentials is None
                        else grpc.aio.secure_channel(self.target, credentials, options=self.options))
        self.stub = self.stub_class(self.channel)

    def _follow_rotation(self) -> None:
        """After the gateway's certificate files changed, new calls go over a new channel; the old
        one is closed once the calls on it had time to finish."""
        if self.certificates is None:
            return
        version, credentials = self.certificates.current(time.monotonic())
        if version == self._version:
            return
        self._version = version
        old = self.channel
        self._open(credentials)
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        try:
            await asyncio.sleep(self.RETIRE_AFTER_S)
        finally:
            await channel.close()

    async def call(self, method: str, request, timeout: float):
        self._follow_rotation()
        metadata = ((REQUEST_ID_KEY, current_request_id()),) if current_request_id() else None
        try:
            return await getattr(self.stub, method)(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(self.name, exc) from exc

    async def serving(self, timeout: float) -> bool | None:
        """The encoder's grpc.health.v1 answer: True SERVING, False NOT_SERVING or unreachable,
        None when it did not answer in time (busy or hung: the caller decides)."""
        self._follow_rotation()
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            return None if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def model_info(self, timeout: float) -> types_pb2.ModelInfo:
        response = await self.call("GetModelInfo", types_pb2.GetModelInfoRequest(), timeout)
        return response.model

    async def close(self) -> None:
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await self.channel.close()


def byte_chunks(images: list[types_pb2.Image], limit: int) -> list[list[types_pb2.Image]]:
    """Consecutive groups of images whose encoded bytes stay within `limit` (an image larger
    than the limit goes alone)."""
    chunks: list[list[types_pb2.Image]] = []
    size = limit + 1
    for image in images:
        if size + len(image.data) > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(image)
        size += len(image.data)
    return chunks


class VisionClient(EncoderClient):
    # Requests to the encoder are split to stay well under its message limit (32 MiB by
    # default); the parts run concurrently and, with round_robin, on different replicas.
    CHUNK_BYTES = 16 << 20

    def __init__(self, target: str, max_message_bytes: int, certificates: ClientCertificateFiles | None = None) -> None:
        super().__init__("vision", target, encoders_pb2_grpc.VisionEncoderServiceStub, max_message_bytes, certificates)

    async def embed(self, images: list[types_pb2.Image], timeout: float, priority: int) -> Embedded:
        """Image messages, passed through untouched -> embeddings, in order."""
        calls = [self.call("EmbedImages", types_pb2.EmbedImagesRequest(images=chunk, priority=priority), timeout)
                 for chunk in byte_chunks(images, self.CHUNK_BYTES)]
        # one chunk (the usual case) is awaited as it is: gather would wrap it in a task of its own
        parts = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        done = [_embedded(reply, len(reply.embeddings)) for reply in parts]
        if len({d.bundle_id for d in done}) != 1:
            raise domain.BundleChanged("vision encoder replicas serve different bundles; retry shortly")
        vectors = np.concatenate([d.vectors for d in done])
        if len(vectors) != len(images):
            raise domain.MedvlmError(f"vision encoder returned {len(vectors)} embeddings for {len(images)} images")
        return Embedded(vectors, [x for d in done for x in d.digests], done[0].bundle_id)


class TextClient(EncoderClient):
    def __init__(self, target: str, max_message_bytes: int, certificates: ClientCertificateFiles | None = None) -> None:
        super().__init__("text", target, encoders_pb2_grpc.TextEncoderServiceStub, max_message_bytes, certificates)

    async def embed(self, texts: list[str], timeout: float, priority: int) -> Embedded:
        request = types_pb2.EmbedTextsRequest(texts=texts, priority=priority)
        response = await self.call("EmbedTexts", request, timeout)
        return _embedded(response, len(texts))


def _embedded(response, expected: int) -> Embedded:
    if len(response.embeddings) != expected:
        raise domain.MedvlmError(f"encoder returned {len(response.embeddings)} embeddings for {expected} inputs")
    return Embedded(
        vectors=convert.vectors(response.embeddings),
        digests=[e.input_sha256 for e in response.embeddings],
        bundle_id=response.bundle_id,
    )
