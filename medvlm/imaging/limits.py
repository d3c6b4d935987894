"""What one image may cost, checked before it is decoded."""

from __future__ import annotations

import dataclasses

from medvlm.imaging.errors import InvalidImage


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """What one image may cost."""

    max_bytes: int
    max_pixels: int


def check_image_bytes(data: bytes, max_bytes: int, label: str) -> None:
    """Encoded image bytes within `max_bytes`; the message names `label`, never the content."""
    if len(data) > max_bytes:
        raise InvalidImage(f"{label}: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
