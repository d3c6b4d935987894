"""The imaging package's one error: an image refused, with a message safe to show a caller."""

from __future__ import annotations


class InvalidImage(Exception):
    """Bytes that are not a supported image, break a limit, or ask for what the image lacks (a
    window on colour, a frame beyond the last). The message names the problem and the caller's
    label ("image 3"), never a header value or pixel; the services send it as INVALID_ARGUMENT."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
