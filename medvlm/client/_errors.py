"""Errors of the client: gRPC statuses converted once into exceptions that carry the server's message."""

from __future__ import annotations

import grpc

REQUEST_ID_KEY = "x-request-id"
RETRY_AFTER_KEY = "retry-after-ms"


class MedvlmError(Exception):
    """A call failed. `code` is the gRPC status name (e.g. "INVALID_ARGUMENT") or, for problems
    found before anything was sent, a client code such as "UNRECOGNIZED_FILE"; `message` is the
    server's message (it names the problem, never the data); `request_id` finds the call in the
    server's audit log."""

    code = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None, request_id: str = "",
                 retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.request_id = request_id
        self.retry_after_ms = retry_after_ms

    def __str__(self) -> str:
        suffix = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.code}: {self.message}{suffix}"


class InvalidInput(MedvlmError):
    """The server refused the input (INVALID_ARGUMENT): a bad image, label or limit."""

    code = "INVALID_ARGUMENT"


class Unavailable(MedvlmError):
    """The server could not be reached or is not ready (UNAVAILABLE), after the retries the
    service config allows."""

    code = "UNAVAILABLE"


class Overloaded(MedvlmError):
    """The server is at its limit (RESOURCE_EXHAUSTED); `retry_after_ms` says when to try again."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(MedvlmError):
    """The call did not finish within its timeout (DEADLINE_EXCEEDED)."""

    code = "DEADLINE_EXCEEDED"


class Unauthenticated(MedvlmError):
    """The server did not accept the caller's credentials (UNAUTHENTICATED)."""

    code = "UNAUTHENTICATED"


class PermissionDenied(MedvlmError):
    """The caller is known but may not call this (PERMISSION_DENIED)."""

    code = "PERMISSION_DENIED"


class UnreadableFile(MedvlmError):
    """An input file could not be read; nothing was sent."""

    code = "UNREADABLE_FILE"


class UnrecognizedFile(MedvlmError):
    """An input is not PNG, JPEG or DICOM by its content; nothing was sent."""

    code = "UNRECOGNIZED_FILE"


class NotSupported(MedvlmError):
    """The server's contract lacks what was asked for (e.g. label sets on an older server)."""

    code = "NOT_SUPPORTED"


_BY_CODE: dict[grpc.StatusCode, type[MedvlmError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def _metadata_value(metadata, key: str) -> str | None:
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def from_status(code: grpc.StatusCode, details: str | None, trailing_metadata=None,
                request_id: str = "") -> MedvlmError:
    """The one conversion of a gRPC status into a client error."""
    klass = _BY_CODE.get(code, MedvlmError)
    retry = _metadata_value(trailing_metadata, RETRY_AFTER_KEY)
    return klass(details or code.name.lower().replace("_", " "), code=code.name, request_id=request_id,
                 retry_after_ms=int(retry) if retry and retry.isdigit() else None)


def from_rpc_error(exc: grpc.RpcError, request_id: str = "") -> MedvlmError:
    """A client error from what a failed call raised (sync or asyncio)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else None
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return from_status(code, details, trailing, request_id)
