"""Domain errors raised by services; one interceptor turns them into gRPC status codes.

Messages of these errors are sent to clients: they name the problem and never
contain clinical data (image bytes, header values, free text).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from medvlm.imaging.errors import InvalidImage


class MedvlmError(Exception):
    """Base of errors whose message is safe to send to a client."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidInput(MedvlmError):
    """The request is malformed, too large, or names something that does not exist."""


@contextlib.contextmanager
def image_refusals() -> Iterator[None]:
    """The imaging package's refusals (InvalidImage) as InvalidInput, message unchanged: where a
    service calls medvlm.imaging, so the error table and the per-item handlers see a domain error."""
    try:
        yield
    except InvalidImage as exc:
        raise InvalidInput(exc.message) from exc


class NotReady(MedvlmError):
    """The server has not loaded or verified its model yet, or is shutting down."""


class Overloaded(MedvlmError):
    """The server is at its in-flight limit; the caller should retry later."""


class DeadlineExpired(MedvlmError):
    """The caller's deadline passed before the work could be done."""


class Unavailable(MedvlmError):
    """A downstream service could not be reached in time."""


class Inconsistent(MedvlmError):
    """Downstream services disagree (e.g. different bundles): refusing to mix results."""


class BundleChanged(Unavailable):
    """An encoder answered with another bundle than the gateway serves (a rollout in progress):
    the answer is refused, never mixed, and the gateway re-checks its encoders."""


class Unauthenticated(MedvlmError):
    """The call carries no credential, or one that does not verify."""


class PermissionDenied(MedvlmError):
    """The caller is known but may not make this call (its role, or not an allowed client)."""
