"""TextEncoderService: converts messages and delegates to the encoder app."""

from __future__ import annotations

import grpc

from engines.runtime.text import TextTokenizer
from medvlm.v1 import encoders_pb2, encoders_pb2_grpc, types_pb2
from services.common import convert
from services.common.encoder import EncoderApp, LoadedTower
from services.common.limits import check_texts
from services.common.work import deadline_of
from services.text.encoder import TextPreparer


class TextApp(EncoderApp):
    """The text encoder service."""

    tower = "text"
    service_names = (encoders_pb2.DESCRIPTOR.services_by_name["TextEncoderService"].full_name,)

    def make_preparer(self, loaded: LoadedTower) -> TextPreparer:
        return TextPreparer(TextTokenizer(loaded.bundle.path, loaded.bundle.manifest.text))

    def register(self, server: grpc.aio.Server) -> None:
        encoders_pb2_grpc.add_TextEncoderServiceServicer_to_server(TextServicer(self), server)


class TextServicer(encoders_pb2_grpc.TextEncoderServiceServicer):
    """Converts EmbedTexts and GetModelInfo messages; the work is the app's."""

    def __init__(self, app: TextApp) -> None:
        self.app = app

    async def EmbedTexts(self, request, context):
        loaded = self.app.loaded
        texts = check_texts(list(request.texts), self.app.settings, what="text")
        vectors = await self.app.embed(texts, convert.priority(request.priority), deadline_of(context))
        digests = [convert.sha256_hex(t.encode("utf-8")) for t in texts]
        return types_pb2.EmbedTextsResponse(
            embeddings=convert.embeddings(vectors, digests), bundle_id=loaded.bundle.bundle_id
        )

    async def GetModelInfo(self, request, context):
        return types_pb2.GetModelInfoResponse(model=self.app.model_info())
