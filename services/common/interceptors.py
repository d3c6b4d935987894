"""The one server interceptor: request ids, audit records, and domain errors -> status codes."""

from __future__ import annotations

import contextvars
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

from services.common import errors, metrics

log = structlog.get_logger("medvlm.rpc")

REQUEST_ID_KEY = "x-request-id"
RETRY_AFTER_KEY = "retry-after-ms"
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# The one table from domain errors to status codes. Subclasses map like their base.
STATUS_OF: dict[type[errors.MedvlmError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Inconsistent: grpc.StatusCode.FAILED_PRECONDITION,
}
_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def current_request_id() -> str:
    """Request id of the call being served ("" outside a call)."""
    return _request_id.get()


def status_of(exc: errors.MedvlmError) -> grpc.StatusCode:
    """Status code of a domain error (INTERNAL for one the table does not know)."""
    for klass in type(exc).__mro__:
        if klass in STATUS_OF:
            return STATUS_OF[klass]
    return grpc.StatusCode.INTERNAL


def _incoming_request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Binds a request id, writes one audit record per call, and maps errors to codes.

    Unknown exceptions become INTERNAL with a generic message; their detail goes
    to the log only, under the request id the client also receives.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        codec = dict(
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._wrap_unary(handler.unary_unary, method), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._wrap_stream(handler.unary_stream, method), **codec)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(self._wrap_stream(handler.stream_stream, method), **codec)
        return grpc.stream_unary_rpc_method_handler(self._wrap_unary(handler.stream_unary, method), **codec)

    def _wrap_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(method, context)
            try:
                response = await behavior(_checked(request), context)
                await call.begin()
                return response
            except BaseException as exc:  # noqa: BLE001 - every outcome is audited
                await call.fail(exc)
                raise
            finally:
                call.end()

        return wrapper

    def _wrap_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(method, context)
            try:
                async for response in behavior(_checked(request), context):
                    if not call.began:
                        await call.begin()
                    yield response
            except BaseException as exc:  # noqa: BLE001
                await call.fail(exc)
                raise
            finally:
                call.end()

        return wrapper


class _Malformed:
    """Stands for a request message that could not be parsed."""


_MALFORMED = _Malformed()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns _MALFORMED instead of raising, so that a corrupt message
    becomes INVALID_ARGUMENT (gRPC itself would answer UNKNOWN with the parser's text)."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any parse failure is the caller's bad input
            return _MALFORMED

    return parse


def _checked(request: Any) -> Any:
    """The request, or for a client stream an iterator over it, refusing malformed messages."""
    if request is _MALFORMED:
        raise errors.InvalidInput("request is not a valid protobuf message of this method's type")
    if hasattr(request, "__aiter__"):
        return _checked_stream(request)
    return request


async def _checked_stream(requests: Any) -> Any:
    async for message in requests:
        yield _checked(message)


class _Call:
    """State of one call as the interceptor sees it."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()
        self.request_id = _incoming_request_id(context)
        self.token = _request_id.set(self.request_id)
        self.quiet = method.startswith(_QUIET_PREFIXES)
        self.began = False
        metrics.INFLIGHT.labels(method).inc()

    async def begin(self) -> None:
        """Send the request id in the headers, with the first response: a call that fails before
        answering gets a trailers-only reply, which a client's retry policy may still retry
        (gRPC never retries a call once headers have arrived)."""
        self.began = True
        await self.context.send_initial_metadata(((REQUEST_ID_KEY, self.request_id),))

    async def fail(self, exc: BaseException) -> None:
        """Record the outcome; turn a domain or unknown error into an abort."""
        if isinstance(exc, grpc.aio.AbortError):
            self.code = self.context.code() or grpc.StatusCode.UNKNOWN
            return
        if isinstance(exc, BaseException) and not isinstance(exc, Exception):
            self.code = grpc.StatusCode.CANCELLED  # asyncio.CancelledError and friends
            return
        trailers = [(REQUEST_ID_KEY, self.request_id)]
        if isinstance(exc, errors.MedvlmError):
            self.code = status_of(exc)
            message = exc.message
            if exc.retry_after_s is not None:
                trailers.append((RETRY_AFTER_KEY, str(int(exc.retry_after_s * 1000))))
        else:
            self.code = grpc.StatusCode.INTERNAL
            message = f"internal error (request id {self.request_id})"
            log.error("unhandled_error", rpc=self.method, request_id=self.request_id,
                      error_type=type(exc).__name__, exc_info=exc)
        await self.context.abort(self.code, message, trailing_metadata=tuple(trailers))

    def end(self) -> None:
        elapsed = time.perf_counter() - self.start
        metrics.INFLIGHT.labels(self.method).dec()
        metrics.REQUESTS.labels(self.method, self.code.name).inc()
        metrics.REQUEST_SECONDS.labels(self.method).observe(elapsed)
        record = dict(
            rpc=self.method,
            request_id=self.request_id,
            peer=self.context.peer(),
            code=self.code.name,
            latency_ms=round(elapsed * 1000, 3),
        )
        if self.quiet:
            log.debug("audit", **record)
        else:
            log.info("audit", **record)
        _request_id.reset(self.token)
