"""Limits on what one request may carry, each checked here once for the gateway and both
encoders (an image's bytes by medvlm.imaging.limits, the check its decoder makes too). The limits
themselves are settings (services/plumbing/settings.py)."""

from __future__ import annotations

from collections.abc import Sequence

from medvlm.imaging.limits import check_image_bytes
from services.domain import InvalidInput, image_refusals
from services.plumbing.settings import Settings


def check_image_count(images: Sequence, max_images: int) -> None:
    """At least one image and at most `max_images`."""
    if not images:
        raise InvalidInput("no images in the request")
    if len(images) > max_images:
        raise InvalidInput(f"{len(images)} images exceeds the limit of {max_images} per request")


def check_images(images: Sequence, settings: Settings) -> list:
    """Image messages within the count and byte limits, as a list."""
    check_image_count(images, settings.max_images)
    with image_refusals():
        for i, image in enumerate(images):
            check_image_bytes(image.data, settings.max_image_bytes, f"image {i}")
    return list(images)


def check_texts(texts: list[str], settings: Settings, what: str = "text", minimum: int = 1) -> list[str]:
    """Refuse too few or too many items, blank or over-long items. Messages name the index,
    never the text."""
    if len(texts) < minimum:
        raise InvalidInput(f"at least {minimum} {what}(s) required, got {len(texts)}")
    if len(texts) > settings.max_texts:
        raise InvalidInput(f"{len(texts)} {what}s exceeds the limit of {settings.max_texts} per request")
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidInput(f"{what} {i} is blank")
        if len(text) > settings.max_text_chars:
            raise InvalidInput(
                f"{what} {i} has {len(text)} characters, over the limit of {settings.max_text_chars}"
            )
    return texts
