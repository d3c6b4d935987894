"""The blocking client."""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medvlm.client import _convert
from medvlm.client._errors import REQUEST_ID_KEY, from_rpc_error
from medvlm.client._images import ImageSource, load_image
from medvlm.client._settings import ConnectionSettings
from medvlm.client._types import (
    ClassifyResult, Embeddings, ItemResult, ModelInfo, Priority, SimilarityResult,
)
from medvlm.client._worklist import WorkItem, Worklist
from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2

DEFAULT_WINDOW = 16


def make_channel(settings: ConnectionSettings) -> grpc.Channel:
    """A blocking channel to the gateway: TLS when asked, retries by service config."""
    credentials = settings.credentials()
    if credentials is None:
        return grpc.insecure_channel(settings.target, options=settings.channel_options())
    return grpc.secure_channel(settings.target, credentials, options=settings.channel_options())


def _settings(target: str | None, settings: ConnectionSettings | None, options: dict[str, Any]) -> ConnectionSettings:
    if settings is not None:
        if target is not None or options:
            raise ValueError("give settings, or a target and options, not both")
        return settings
    if target is not None:
        options["target"] = target
    return ConnectionSettings(**options)


class Client:
    """A blocking client of the medvlm gateway.

        with Client("127.0.0.1:50050") as client:
            result = client.classify("chest.png", labels=["normal chest radiograph", "cardiomegaly"])

    Options are the fields of ConnectionSettings (timeout_s, ca_cert, client_cert, client_key,
    token, token_file, ...). Every call's timeout becomes its deadline; failed calls raise a
    MedvlmError subclass carrying the server's status and message.
    """

    def __init__(self, target: str | None = None, *, settings: ConnectionSettings | None = None,
                 **options: Any) -> None:
        self.settings = _settings(target, settings, options)
        self._channel = make_channel(self.settings)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def _call(self, method, request, timeout: float | None):
        request_id = uuid.uuid4().hex
        try:
            return method(request, timeout=timeout or self.settings.timeout_s,
                          metadata=((REQUEST_ID_KEY, request_id),))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, request_id) from None

    def classify(self, image: ImageSource, labels: Sequence[str] | None = None, *, label_set: str | None = None,
                 template: str = "", top_k: int = 0, priority: Priority = Priority.ROUTINE,
                 timeout: float | None = None) -> ClassifyResult:
        """Zero-shot classification of one image (path or bytes; PNG, JPEG or DICOM) among `labels`
        or the labels of a named label set. `template` has one "{}" for the label ("" is the label as
        is); top_k 0 returns every label in `top`."""
        _convert.check_labels(labels, label_set)
        request = _convert.classify_request(load_image(image).to_proto(), labels, label_set, template,
                                            top_k, priority)
        return _convert.classify_result(self._call(self._stub.Classify, request, timeout))

    def similarity(self, images: Sequence[ImageSource], texts: Sequence[str], *, template: str = "",
                   priority: Priority = Priority.ROUTINE, timeout: float | None = None) -> SimilarityResult:
        """Cosine similarities and probabilities of every image against every text."""
        request = gateway_pb2.SimilarityRequest(images=[load_image(i).to_proto() for i in images],
                                                texts=list(texts), template=template, priority=int(priority))
        return _convert.similarity_result(self._call(self._stub.Similarity, request, timeout))

    def embed_images(self, images: Sequence[ImageSource], *, priority: Priority = Priority.ROUTINE,
                     timeout: float | None = None) -> Embeddings:
        """Unit-length image embeddings, in order."""
        request = types_pb2.EmbedImagesRequest(images=[load_image(i).to_proto() for i in images],
                                               priority=int(priority))
        return _convert.embeddings(self._call(self._stub.EmbedImages, request, timeout))

    def embed_texts(self, texts: Sequence[str], *, priority: Priority = Priority.ROUTINE,
                    timeout: float | None = None) -> Embeddings:
        """Unit-length text embeddings, in order."""
        request = types_pb2.EmbedTextsRequest(texts=list(texts), priority=int(priority))
        return _convert.embeddings(self._call(self._stub.EmbedTexts, request, timeout))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The bundle the gateway serves and the engine of each tower."""
        return _convert.model_info(self._call(self._stub.GetModelInfo, types_pb2.GetModelInfoRequest(), timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The gateway's health (grpc.health.v1): "SERVING", "NOT_SERVING", ..."""
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def classify_worklist(self, items: Iterable[WorkItem], labels: Sequence[str] | None = None, *,
                          label_set: str | None = None, template: str = "", top_k: int = 0,
                          priority: Priority = Priority.ROUTINE, window: int = DEFAULT_WINDOW,
                          timeout: float | None = None) -> Iterator[ItemResult]:
        """Classify (id, image) items over one ClassifyStream, yielding each outcome as it is ready
        (not in order). At most `window` items are in flight, so files are read as the server keeps
        up. A bad item yields an ItemResult with an error and the rest go on. If the stream itself
        fails, the items in flight are yielded with its error and then the MedvlmError is raised.
        `timeout` (default none) is a deadline for the whole stream."""
        _convert.check_labels(labels, label_set)
        if window < 1:
            raise ValueError("window must be at least 1")
        work = Worklist(labels, label_set, template, top_k, int(priority))
        slots = threading.Semaphore(window)
        local: queue.SimpleQueue[ItemResult] = queue.SimpleQueue()
        stop = threading.Event()

        def requests() -> Iterator[gateway_pb2.ClassifyStreamRequest]:
            for item in items:
                if stop.is_set():
                    return
                prepared = work.prepare(item)
                if isinstance(prepared, ItemResult):
                    local.put(prepared)
                    continue
                slots.acquire()
                if stop.is_set():
                    return
                yield prepared

        request_id = uuid.uuid4().hex
        call = self._stub.ClassifyStream(requests(), timeout=timeout, metadata=((REQUEST_ID_KEY, request_id),))
        try:
            for reply in call:
                slots.release()
                while not local.empty():
                    yield local.get()
                yield work.result(reply)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, request_id)
            yield from work.unanswered(error)
            raise error from None
        finally:
            stop.set()
            call.cancel()
            for _ in range(window):  # wake the request thread if it waits for a slot
                slots.release()
        while not local.empty():
            yield local.get()
