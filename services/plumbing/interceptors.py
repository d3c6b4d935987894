"""The one server interceptor: request ids, caller checks (auth, roles, quotas), audit records, and
domain errors -> status codes."""

from __future__ import annotations

import contextvars
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

from services import domain
from services.plumbing import metrics
from services.security import auth

log = structlog.get_logger("medvlm.rpc")

REQUEST_ID_KEY = "x-request-id"
RETRY_AFTER_KEY = "retry-after-ms"
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# The one table from domain errors to status codes. Subclasses map like their base.
STATUS_OF: dict[type[domain.MedvlmError], grpc.StatusCode] = {
    domain.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    domain.NotReady: grpc.StatusCode.UNAVAILABLE,
    domain.Unavailable: grpc.StatusCode.UNAVAILABLE,
    domain.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    domain.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    domain.Inconsistent: grpc.StatusCode.FAILED_PRECONDITION,
    domain.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    domain.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}
_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# Health and reflection are never refused for load: probes must answer during a flood.
_EXEMPT_PREFIXES = _QUIET_PREFIXES


def current_request_id() -> str:
    """Request id of the call being served ("" outside a call)."""
    return _request_id.get()


def status_of(exc: domain.MedvlmError) -> grpc.StatusCode:
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


class Admission:
    """At most `limit` calls in progress; more are refused at once with RESOURCE_EXHAUSTED.

    This is the server's own bound, set below the HTTP/2 stream limit, so that overload is
    refused on purpose (with a retry hint) instead of by the transport (UNAVAILABLE).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._inflight = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self._inflight >= self.limit:
                metrics.ADMISSION_REJECTED.inc()
                raise domain.Overloaded(
                    f"server busy: {self.limit} calls in progress; retry shortly",
                    retry_after_s=max(0.05, min(1.0, 0.002 * self.limit)),
                )
            self._inflight += 1

    def leave(self) -> None:
        with self._lock:
            self._inflight -= 1


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Binds a request id, writes one audit record per call, and maps errors to codes.

    Unknown exceptions become INTERNAL with a generic message; their detail goes
    to the log only, under the request id the client also receives. With an
    `admission` bound, calls beyond it (health and reflection excepted) are refused.
    With a `guard`, every call but health is authenticated, authorised and charged to its
    caller's quotas first. `audit_fields` are added to every audit record (the server fills in
    the served bundle's signing key id once it is loaded).
    """

    def __init__(self, admission: Admission | None = None, guard: auth.Guard | None = None) -> None:
        self.admission = admission
        self.guard = guard if guard is not None and guard.active else None
        self.audit_fields: dict[str, str] = {}

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
            call = _Call(method, context, self.admission, self.guard, self.audit_fields)
            try:
                call.admit()
                response = await behavior(_checked(request, call), context)
                call.set_trailers()
                return response
            except BaseException as exc:  # noqa: BLE001 - every outcome is audited
                await call.fail(exc)
                raise
            finally:
                call.end()

        return wrapper

    def _wrap_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(method, context, self.admission, self.guard, self.audit_fields)
            try:
                call.admit()
                async for response in behavior(_checked(request, call), context):
                    if not call.began:
                        await call.send_headers()
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


def _checked(request: Any, call: _Call) -> Any:
    """The request, or for a client stream an iterator over it, refusing malformed messages and
    charging its images to the caller's quota."""
    if request is _MALFORMED:
        raise domain.InvalidInput("request is not a valid protobuf message of this method's type")
    if hasattr(request, "__aiter__"):
        return _checked_stream(request, call)
    call.charge(request)
    return request


async def _checked_stream(requests: Any, call: _Call) -> Any:
    async for message in requests:
        yield _checked(message, call)


class _Call:
    """State of one call as the interceptor sees it.

    Everything the audit record and the guard need (peer, deadline, metadata, client
    certificate) is read from the context when the call starts: after a call has ended (a client
    cancelled a stream, say) gRPC core may have freed what the context points to, and reading it
    then crashes the process.
    """

    def __init__(self, method: str, context: grpc.aio.ServicerContext, admission: Admission | None,
                 guard: auth.Guard | None = None, audit_fields: dict[str, str] | None = None) -> None:
        self.method = method
        self.context = context
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()
        self.request_id = _incoming_request_id(context)
        self.peer = context.peer()
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.monotonic() + remaining
        self.ended = False
        context.add_done_callback(self._ended)
        self.token = _request_id.set(self.request_id)
        self.quiet = method.startswith(_QUIET_PREFIXES)
        self.admission = None if method.startswith(_EXEMPT_PREFIXES) else admission
        self.admitted = False
        self.guard = None if method.startswith(auth.OPEN_PREFIXES) else guard
        # quotas, like admission, never refuse health or reflection
        self.quotas = None if self.guard is None or method.startswith(_EXEMPT_PREFIXES) else self.guard.quotas
        self.peer_auth = auth.Peer.capture(context) if self.guard is not None else None
        self.caller: auth.Caller | None = None
        self.role = ""
        self.refusal = ""
        self.audit_fields = {} if audit_fields is None else audit_fields
        self.began = False
        metrics.INFLIGHT.labels(method).inc()

    def _ended(self, _context: object) -> None:
        self.ended = True

    def admit(self) -> None:
        """Before the handler runs: authenticate, authorise, charge the caller's request quota and
        take an admission slot; the refusal is the call's outcome."""
        if self.guard is not None:
            try:
                self.caller = self.guard.authenticate(self.peer_auth)
                self.role = self.guard.authorize(self.caller, self.method)
            except (domain.Unauthenticated, domain.PermissionDenied) as exc:
                self.refusal = exc.message
                metrics.AUTH_REFUSED.labels(status_of(exc).name).inc()
                raise
            if self.quotas is not None:
                try:
                    self.quotas.charge(self.caller.identity, "requests", 1)
                except domain.Overloaded as exc:
                    self.refusal = exc.message
                    raise
        if self.admission is not None:
            self.admission.enter()
            self.admitted = True

    async def send_headers(self) -> None:
        """A stream's first response: send the request id in the headers with it, so that the
        caller has it while the stream runs. Never before: a call that fails before answering gets
        a trailers-only reply, which a client's retry policy may still retry (gRPC never retries a
        call once headers have arrived)."""
        self.began = True
        await self.context.send_initial_metadata(((REQUEST_ID_KEY, self.request_id),))

    def set_trailers(self) -> None:
        """A unary call's answer: the request id goes in the trailers, sent with the response and
        its status in one operation (sending headers first would cost a round of the event loop
        and of gRPC core per call)."""
        if not self.ended:
            self.context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))

    def charge(self, request: Any) -> None:
        """Charge the images of one request message to the caller's images-per-second quota."""
        if self.caller is not None and self.quotas is not None:
            try:
                self.quotas.charge(self.caller.identity, "images", auth.count_images(request))
            except domain.Overloaded as exc:
                self.refusal = exc.message
                raise

    def _expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    async def fail(self, exc: BaseException) -> None:
        """Record the outcome; turn a domain or unknown error into an abort (while the call lives)."""
        if isinstance(exc, grpc.aio.AbortError):
            self.code = (None if self.ended else self.context.code()) or grpc.StatusCode.UNKNOWN
            return
        if self.ended or not isinstance(exc, Exception):
            # asyncio.CancelledError and friends: the client cancelled or its deadline passed
            self.code = grpc.StatusCode.DEADLINE_EXCEEDED if self._expired() else grpc.StatusCode.CANCELLED
            return
        trailers = [(REQUEST_ID_KEY, self.request_id)]
        if isinstance(exc, domain.MedvlmError):
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
        """Account for the call. Never touches the context: the call may be gone."""
        if self.admitted:
            self.admission.leave()
        elapsed = time.perf_counter() - self.start
        metrics.INFLIGHT.labels(self.method).dec()
        metrics.REQUESTS.labels(self.method, self.code.name).inc()
        metrics.REQUEST_SECONDS.labels(self.method).observe(elapsed)
        record = dict(
            rpc=self.method,
            request_id=self.request_id,
            peer=self.peer,
            code=self.code.name,
            latency_ms=round(elapsed * 1000, 3),
            **self.audit_fields,
        )
        caller = self.caller or (auth.ANONYMOUS if self.guard is None else None)
        identity = caller.identity if caller else "unauthenticated"
        record.update(caller=identity, auth=caller.method if caller else "", role=self.role)
        if self.refusal:
            record["reason"] = self.refusal
        if self.guard is not None:
            metrics.CALLER_REQUESTS.labels(identity, self.code.name).inc()
        if self.quiet:
            log.debug("audit", **record)
        else:
            log.info("audit", **record)
        _request_id.reset(self.token)
