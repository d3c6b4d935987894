"""VisionEncoderService: converts messages and delegates to the encoder app."""

from __future__ import annotations

import grpc

from medvlm.v1 import encoders_pb2, encoders_pb2_grpc, types_pb2
from services.common import convert
from services.common.encoder import EncoderApp, LoadedTower
from services.common.errors import InvalidInput
from services.common.work import deadline_of
from services.vision.encoder import ImagePreparer
from services.vision.preprocess import JPEG, PNG, DecodeLimits, configure_pillow

FORMATS = {
    types_pb2.IMAGE_FORMAT_UNSPECIFIED: None,
    types_pb2.IMAGE_FORMAT_PNG: PNG,
    types_pb2.IMAGE_FORMAT_JPEG: JPEG,
}


def image_items(images, max_images: int) -> list[tuple[bytes, str | None]]:
    """Image messages -> (bytes, declared format) pairs, checking count and format enum."""
    if not images:
        raise InvalidInput("no images in the request")
    if len(images) > max_images:
        raise InvalidInput(f"{len(images)} images exceeds the limit of {max_images} per request")
    items = []
    for i, image in enumerate(images):
        if image.format not in FORMATS:
            raise InvalidInput(f"image {i}: unsupported format value {image.format}")
        items.append((image.data, FORMATS[image.format]))
    return items


class VisionApp(EncoderApp):
    """The vision encoder service."""

    tower = "vision"
    service_names = (encoders_pb2.DESCRIPTOR.services_by_name["VisionEncoderService"].full_name,)

    def __init__(self, settings) -> None:
        super().__init__(settings)
        configure_pillow(settings.max_image_pixels)

    def make_preparer(self, loaded: LoadedTower) -> ImagePreparer:
        limits = DecodeLimits(self.settings.max_image_bytes, self.settings.max_image_pixels)
        return ImagePreparer(loaded.bundle.manifest.image, limits)

    def register(self, server: grpc.aio.Server) -> None:
        encoders_pb2_grpc.add_VisionEncoderServiceServicer_to_server(VisionServicer(self), server)


class VisionServicer(encoders_pb2_grpc.VisionEncoderServiceServicer):
    """Converts EmbedImages and GetModelInfo messages; the work is the app's."""

    def __init__(self, app: VisionApp) -> None:
        self.app = app

    async def EmbedImages(self, request, context):
        loaded = self.app.loaded
        items = image_items(request.images, self.app.settings.max_images)
        vectors = await self.app.embed(items, convert.priority(request.priority), deadline_of(context))
        digests = [convert.sha256_hex(data) for data, _ in items]
        return types_pb2.EmbedImagesResponse(
            embeddings=convert.embeddings(vectors, digests), bundle_id=loaded.bundle.bundle_id
        )

    async def GetModelInfo(self, request, context):
        return types_pb2.GetModelInfoResponse(model=self.app.model_info())
