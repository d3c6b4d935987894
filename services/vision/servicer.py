"""VisionEncoderService: converts messages and delegates to the encoder app."""

from __future__ import annotations

import grpc
import structlog

from medvlm.imaging.preprocess import DICOM, JPEG, PNG, ImageOptions, configure_pillow
from medvlm.imaging.window import WindowRequest, checked_window
from medvlm.v1 import encoders_pb2, encoders_pb2_grpc, types_pb2
from services.domain import InvalidInput, Priority, deadline_of, image_refusals
from services.encoder.app import EncoderApp, Tower
from services.plumbing import convert
from services.plumbing.limits import check_image_count
from services.plumbing.settings import VISION, Settings
from services.vision.encoder import ImageInput, image_preparer

FORMATS = {
    types_pb2.IMAGE_FORMAT_UNSPECIFIED: None,
    types_pb2.IMAGE_FORMAT_PNG: PNG,
    types_pb2.IMAGE_FORMAT_JPEG: JPEG,
    types_pb2.IMAGE_FORMAT_DICOM: DICOM,
}
PRESETS = {
    types_pb2.WINDOW_PRESET_UNSPECIFIED: None,
    types_pb2.WINDOW_PRESET_LUNG: "lung",
    types_pb2.WINDOW_PRESET_MEDIASTINUM: "mediastinum",
    types_pb2.WINDOW_PRESET_BONE: "bone",
    types_pb2.WINDOW_PRESET_BRAIN: "brain",
    types_pb2.WINDOW_PRESET_ABDOMEN: "abdomen",
}


def image_options(image, label: str) -> ImageOptions:
    """The window, preset and frame of one Image message, checked."""
    if image.window_preset not in PRESETS:
        raise InvalidInput(f"{label}: unsupported window preset value {image.window_preset}")
    preset = PRESETS[image.window_preset]
    window = None
    if image.HasField("window"):
        with image_refusals():
            window = checked_window(image.window.center, image.window.width, label)
    if window is not None and preset is not None:
        raise InvalidInput(f"{label}: set either a window or a window preset, not both")
    frame = image.frame if image.HasField("frame") else None
    return ImageOptions(WindowRequest(window, preset), frame)


def image_items(images, max_images: int) -> list[ImageInput]:
    """Image messages -> ImageInputs, checking count, format enum, window and frame."""
    check_image_count(images, max_images)
    items = []
    for i, image in enumerate(images):
        if image.format not in FORMATS:
            raise InvalidInput(f"image {i}: unsupported format value {image.format}")
        items.append(ImageInput(image.data, FORMATS[image.format], image_options(image, f"image {i}")))
    return items


def bind_dicom_audit(items: list[ImageInput]) -> None:
    """Add the DICOM facts that are not PHI (modality, transfer syntax, burned-in annotation
    flag) to this call's audit record."""
    infos = [item.dicom for item in items if item.dicom is not None]
    if infos:
        structlog.contextvars.bind_contextvars(
            dicom_modality=[info.modality for info in infos],
            dicom_transfer_syntax=[info.transfer_syntax for info in infos],
            dicom_burned_in_annotation=[info.burned_in_annotation for info in infos],
            dicom_window=[info.window_source for info in infos],
        )


class VisionServicer(encoders_pb2_grpc.VisionEncoderServiceServicer):
    """Converts EmbedImages and GetModelInfo messages; the work is the app's."""

    def __init__(self, app: EncoderApp) -> None:
        self.app = app

    async def EmbedImages(self, request, context):
        loaded = self.app.loaded
        items = image_items(request.images, self.app.settings.max_images)
        vectors = await self.app.embed(items, Priority.of(request.priority), deadline_of(context))
        bind_dicom_audit(items)
        digests = [convert.sha256_hex(item.data) for item in items]
        return types_pb2.EmbedImagesResponse(
            embeddings=convert.embeddings(vectors, digests), bundle_id=loaded.bundle.bundle_id
        )

    async def GetModelInfo(self, request, context):
        return types_pb2.GetModelInfoResponse(model=self.app.model_info())


def add_servicer(app: EncoderApp, server: grpc.aio.Server) -> None:
    encoders_pb2_grpc.add_VisionEncoderServiceServicer_to_server(VisionServicer(app), server)


VISION_TOWER = Tower(
    VISION, encoders_pb2.DESCRIPTOR.services_by_name["VisionEncoderService"].full_name, image_preparer, add_servicer
)


def VisionApp(settings: Settings) -> EncoderApp:  # noqa: N802 - constructs the app, like a class
    """The vision encoder service: decode + preprocess, then the vision tower."""
    configure_pillow(settings.max_image_pixels)
    return EncoderApp(settings, VISION_TOWER)
