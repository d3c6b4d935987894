"""TextEncoderService: converts messages and delegates to the encoder app."""

from __future__ import annotations

import grpc

from medvlm.v1 import encoders_pb2, encoders_pb2_grpc, types_pb2
from services.domain import Priority, deadline_of
from services.encoder.app import EncoderApp, Tower
from services.plumbing import convert
from services.plumbing.limits import check_texts
from services.plumbing.settings import TEXT, Settings
from services.text.encoder import text_preparer


class TextServicer(encoders_pb2_grpc.TextEncoderServiceServicer):
    """Converts EmbedTexts and GetModelInfo messages; the work is the app's."""

    def __init__(self, app: EncoderApp) -> None:
        self.app = app

    async def EmbedTexts(self, request, context):
        loaded = self.app.loaded
        texts = check_texts(list(request.texts), self.app.settings, what="text")
        vectors = await self.app.embed(texts, Priority.of(request.priority), deadline_of(context))
        digests = [convert.sha256_hex(t.encode("utf-8")) for t in texts]
        return types_pb2.EmbedTextsResponse(
            embeddings=convert.embeddings(vectors, digests), bundle_id=loaded.bundle.bundle_id
        )

    async def GetModelInfo(self, request, context):
        return types_pb2.GetModelInfoResponse(model=self.app.model_info())


def add_servicer(app: EncoderApp, server: grpc.aio.Server) -> None:
    encoders_pb2_grpc.add_TextEncoderServiceServicer_to_server(TextServicer(app), server)


TEXT_TOWER = Tower(
    TEXT, encoders_pb2.DESCRIPTOR.services_by_name["TextEncoderService"].full_name, text_preparer, add_servicer
)


def TextApp(settings: Settings) -> EncoderApp:  # noqa: N802 - constructs the app, like a class
    """The text encoder service: tokenize, then the text tower."""
    return EncoderApp(settings, TEXT_TOWER)
