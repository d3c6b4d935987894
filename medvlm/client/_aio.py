"""The asyncio client."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medvlm.client import _convert
from medvlm.client._errors import REQUEST_ID_KEY, MedvlmError, from_rpc_error
from medvlm.client._images import ImageSource, LoadedImage, load_image
from medvlm.client._settings import ConnectionSettings
from medvlm.client._sync import DEFAULT_WINDOW, _settings
from medvlm.client._types import (
    ClassifyResult, Embeddings, ItemError, ItemResult, ModelInfo, Priority, SimilarityResult,
)
from medvlm.client._worklist import WorkItem, Worklist
from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2


def make_aio_channel(settings: ConnectionSettings) -> grpc.aio.Channel:
    """An asyncio channel to the gateway: TLS when asked, retries by service config."""
    credentials = settings.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(settings.target, options=settings.channel_options())
    return grpc.aio.secure_channel(settings.target, credentials, options=settings.channel_options())


async def _load(source: ImageSource | LoadedImage) -> LoadedImage:
    if isinstance(source, LoadedImage):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return load_image(source)
    return await asyncio.to_thread(load_image, source)  # file reads stay off the event loop


async def _items(items: Iterable[WorkItem] | AsyncIterable[WorkItem]) -> AsyncIterator[WorkItem]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


class AsyncClient:
    """An asyncio client of the medvlm gateway; the same calls as Client, awaited.

        async with AsyncClient("127.0.0.1:50050") as client:
            result = await client.classify("chest.png", labels=["normal chest radiograph", "cardiomegaly"])
    """

    def __init__(self, target: str | None = None, *, settings: ConnectionSettings | None = None,
                 **options: Any) -> None:
        self.settings = _settings(target, settings, options)
        self._channel = make_aio_channel(self.settings)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def _call(self, method, request, timeout: float | None):
        request_id = uuid.uuid4().hex
        try:
            return await method(request, timeout=timeout or self.settings.timeout_s,
                                metadata=((REQUEST_ID_KEY, request_id),))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, request_id) from None

    async def classify(self, image: ImageSource, labels: Sequence[str] | None = None, *,
                       label_set: str | None = None, template: str = "", top_k: int = 0,
                       priority: Priority = Priority.ROUTINE, timeout: float | None = None) -> ClassifyResult:
        """Zero-shot classification of one image; see Client.classify."""
        _convert.check_labels(labels, label_set)
        request = _convert.classify_request((await _load(image)).to_proto(), labels, label_set, template,
                                            top_k, priority)
        return _convert.classify_result(await self._call(self._stub.Classify, request, timeout))

    async def similarity(self, images: Sequence[ImageSource], texts: Sequence[str], *, template: str = "",
                         priority: Priority = Priority.ROUTINE, timeout: float | None = None) -> SimilarityResult:
        """Cosine similarities and probabilities of every image against every text."""
        loaded = [await _load(i) for i in images]
        request = gateway_pb2.SimilarityRequest(images=[i.to_proto() for i in loaded], texts=list(texts),
                                                template=template, priority=int(priority))
        return _convert.similarity_result(await self._call(self._stub.Similarity, request, timeout))

    async def embed_images(self, images: Sequence[ImageSource], *, priority: Priority = Priority.ROUTINE,
                           timeout: float | None = None) -> Embeddings:
        """Unit-length image embeddings, in order."""
        loaded = [await _load(i) for i in images]
        request = types_pb2.EmbedImagesRequest(images=[i.to_proto() for i in loaded], priority=int(priority))
        return _convert.embeddings(await self._call(self._stub.EmbedImages, request, timeout))

    async def embed_texts(self, texts: Sequence[str], *, priority: Priority = Priority.ROUTINE,
                          timeout: float | None = None) -> Embeddings:
        """Unit-length text embeddings, in order."""
        request = types_pb2.EmbedTextsRequest(texts=list(texts), priority=int(priority))
        return _convert.embeddings(await self._call(self._stub.EmbedTexts, request, timeout))

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The bundle the gateway serves and the engine of each tower."""
        reply = await self._call(self._stub.GetModelInfo, types_pb2.GetModelInfoRequest(), timeout)
        return _convert.model_info(reply)

    async def label_sets(self, *, timeout: float | None = None) -> tuple[str, ...]:
        """The label sets the gateway serves, as "name@version" (a MedvlmError with code
        UNIMPLEMENTED from a gateway older than label sets)."""
        request = _convert.list_label_sets_request()
        return _convert.label_set_names(await self._call(self._stub.ListLabelSets, request, timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The gateway's health (grpc.health.v1): "SERVING", "NOT_SERVING", ..."""
        reply = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def classify_worklist(self, items: Iterable[WorkItem] | AsyncIterable[WorkItem],
                                labels: Sequence[str] | None = None, *, label_set: str | None = None,
                                template: str = "", top_k: int = 0, priority: Priority = Priority.ROUTINE,
                                window: int = DEFAULT_WINDOW, timeout: float | None = None,
                                ) -> AsyncIterator[ItemResult]:
        """Classify (id, image) items over one ClassifyStream; see Client.classify_worklist."""
        _convert.check_labels(labels, label_set)
        if window < 1:
            raise ValueError("window must be at least 1")
        work = Worklist(labels, label_set, template, top_k, int(priority))
        slots = asyncio.Semaphore(window)
        local: asyncio.Queue[ItemResult] = asyncio.Queue()

        async def requests() -> AsyncIterator[gateway_pb2.ClassifyStreamRequest]:
            async for item_id, source in _items(items):
                try:
                    image = await _load(source)
                except MedvlmError as exc:
                    local.put_nowait(ItemResult(id=item_id, error=ItemError(exc.code, exc.message)))
                    continue
                prepared = work.prepare((item_id, image))
                if isinstance(prepared, ItemResult):
                    local.put_nowait(prepared)
                    continue
                await slots.acquire()
                yield prepared

        request_id = uuid.uuid4().hex
        call = self._stub.ClassifyStream(requests(), timeout=timeout, metadata=((REQUEST_ID_KEY, request_id),))
        try:
            async for reply in call:
                slots.release()
                while not local.empty():
                    yield local.get_nowait()
                yield work.result(reply)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, request_id)
            for result in work.unanswered(error):
                yield result
            raise error from None
        finally:
            call.cancel()
        while not local.empty():
            yield local.get_nowait()
