"""What the gateway and the encoders both speak of: a request's priority and deadline, and the domain
errors services raise; one interceptor turns those into gRPC status codes.

Messages of these errors are sent to clients: they name the problem and never
contain clinical data (image bytes, header values, free text).
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Iterator

from medvlm.imaging.errors import InvalidImage


class Priority(enum.IntEnum):
    """Priority of a request; the values are those of medvlm.v1.Priority on the wire, and a higher
    value is served first."""

    UNSPECIFIED = 0
    ROUTINE = 1
    URGENT = 2
    STAT = 3

    @classmethod
    def of(cls, value: int) -> Priority:
        """A wire value as served: UNSPECIFIED and values this build does not know are ROUTINE."""
        return cls(value) if value in (cls.URGENT, cls.STAT) else cls.ROUTINE


ROUTINE, URGENT, STAT = Priority.ROUTINE, Priority.URGENT, Priority.STAT
SERVED = (STAT, URGENT, ROUTINE)  # the priorities work is queued at, first served first


def deadline_of(context: object) -> float | None:
    """A call's deadline as a time.monotonic() instant, or None if the caller set none."""
    remaining = context.time_remaining()  # type: ignore[attr-defined]
    return None if remaining is None else time.monotonic() + remaining


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
