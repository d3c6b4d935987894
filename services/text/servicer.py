"""TextEncoderService: converts messages and delegates to TextEncoder."""

from __future__ import annotations

import grpc

from medvlm.v1 import encoders_pb2, encoders_pb2_grpc, types_pb2
from services.common import convert
from services.common.encoder import EncoderApp, LoadedTower
from services.common.texts import check_texts
from services.common.work import deadline_of
from services.text.encoder import TextEncoder
from engines.runtime.text import TextTokenizer


class TextApp(EncoderApp):
    """The text encoder service."""

    tower = "text"
    service_names = (encoders_pb2.DESCRIPTOR.services_by_name["TextEncoderService"].full_name,)

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.encoder: TextEncoder | None = None

    def on_loaded(self, loaded: LoadedTower) -> None:
        tokenizer = TextTokenizer(loaded.bundle.path, loaded.bundle.manifest.text)
        self.encoder = TextEncoder(loaded.engine, tokenizer)

    def register(self, server: grpc.aio.Server) -> None:
        encoders_pb2_grpc.add_TextEncoderServiceServicer_to_server(TextServicer(self), server)


class TextServicer(encoders_pb2_grpc.TextEncoderServiceServicer):
    """Converts EmbedTexts and GetModelInfo messages; the work is TextEncoder's."""

    def __init__(self, app: TextApp) -> None:
        self.app = app

    async def EmbedTexts(self, request, context):
        loaded = self.app.loaded
        texts = check_texts(list(request.texts), self.app.settings, what="text")
        vectors = await self.app.pool.run(self.app.encoder.embed, texts, deadline=deadline_of(context))
        digests = [convert.sha256_hex(t.encode("utf-8")) for t in texts]
        return types_pb2.EmbedTextsResponse(
            embeddings=convert.embeddings(vectors, digests), bundle_id=loaded.bundle.bundle_id
        )

    async def GetModelInfo(self, request, context):
        return types_pb2.GetModelInfoResponse(model=self.app.model_info())
