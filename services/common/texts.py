"""Validation of texts and labels, shared by the text encoder and the gateway."""

from __future__ import annotations

from services.common.errors import InvalidInput
from services.common.settings import Settings


def check_texts(texts: list[str], settings: Settings, what: str = "text", minimum: int = 1) -> list[str]:
    """Refuse empty lists, too many items, blank or over-long items. Messages name the index,
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
