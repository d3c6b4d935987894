"""What the sync and asyncio worklists share: items in, ClassifyStream requests out, replies back to items."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from medvlm.client import _convert
from medvlm.client._errors import MedvlmError
from medvlm.client._images import ImageSource, LoadedImage, load_image
from medvlm.client._types import ItemError, ItemResult
from medvlm.v1 import gateway_pb2

WorkItem = tuple[str, "ImageSource | LoadedImage"]
"""One worklist item: the caller's id for it, and the image (a path, bytes or a LoadedImage)."""


@dataclasses.dataclass
class Worklist:
    """Turns items into stream requests and replies into ItemResults.

    On the wire each item is known by its position (the caller's ids, which may be file names,
    never leave this process); labels, template and top_k go with the first item only.
    """

    labels: Sequence[str] | None
    label_set: str | None
    template: str
    top_k: int
    priority: int
    ids: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # wire id -> (id, sha256)
    sent: int = 0

    def prepare(self, item: WorkItem) -> gateway_pb2.ClassifyStreamRequest | ItemResult:
        """The request of one item, or its error when it cannot be read or recognised."""
        item_id, source = item
        try:
            image = source if isinstance(source, LoadedImage) else load_image(source)
        except MedvlmError as exc:
            return ItemResult(id=item_id, error=ItemError(exc.code, exc.message))
        first = self.sent == 0
        request = _convert.classify_request(
            image.to_proto(), self.labels if first else None, self.label_set if first else None,
            self.template if first else "", self.top_k if first else 0, self.priority)
        wire_id = str(self.sent)
        self.sent += 1
        self.ids[wire_id] = (item_id, image.sha256)
        return gateway_pb2.ClassifyStreamRequest(correlation_id=wire_id, request=request)

    def result(self, reply: gateway_pb2.ClassifyStreamResponse) -> ItemResult:
        item_id, sha256 = self.ids.pop(reply.correlation_id, (reply.correlation_id, ""))
        if reply.HasField("error"):
            return ItemResult(id=item_id, error=ItemError(reply.error.code, reply.error.message), sha256=sha256)
        return ItemResult(id=item_id, result=_convert.classify_result(reply.result), sha256=sha256)

    def unanswered(self, error: MedvlmError) -> list[ItemResult]:
        """Every item sent but not answered, failed with the stream's error."""
        out = [ItemResult(id=item_id, error=ItemError(error.code, error.message), sha256=sha256)
               for item_id, sha256 in self.ids.values()]
        self.ids.clear()
        return out
