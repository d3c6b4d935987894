"""Image side of the vision encoder as a plain object: decode and preprocess. Knows nothing of gRPC."""

from __future__ import annotations

import dataclasses

import numpy as np

from medvlm.imaging.dicom import DicomInfo
from medvlm.imaging.limits import DecodeLimits
from medvlm.imaging.preprocess import DEFAULT_OPTIONS, ImageOptions, decode, preprocess
from medvlm.imaging.spec import ImageSpec
from services.domain import image_refusals
from services.encoder.app import LoadedTower
from services.plumbing.settings import Settings


@dataclasses.dataclass
class ImageInput:
    """One image of a request: its bytes, declared format and options. `dicom` is filled in by
    ImagePreparer.prepare() for a DICOM source, for the audit record."""

    data: bytes
    format: str | None
    options: ImageOptions = DEFAULT_OPTIONS
    dicom: DicomInfo | None = None


class ImagePreparer:
    """Encoded images -> normalized [3, S, S] tensors, stacked into engine batches."""

    def __init__(self, spec: ImageSpec, limits: DecodeLimits) -> None:
        self.spec = spec
        self.limits = limits

    def prepare(self, items: list[ImageInput] | list[tuple[bytes, str | None]]) -> list[np.ndarray]:
        """Images (or (bytes, declared format) pairs) -> one [3, S, S] float32 per image;
        InvalidInput names the bad one."""
        rows = []
        with image_refusals():
            for i, item in enumerate(items):
                if not isinstance(item, ImageInput):
                    item = ImageInput(*item)
                decoded = decode(item.data, item.format, self.limits, item.options, label=f"image {i}")
                item.dicom = decoded.dicom
                rows.append(preprocess(decoded.image, self.spec))
        return rows

    def collate(self, rows: list[np.ndarray]) -> np.ndarray:
        return np.stack(rows)  # [B, 3, S, S]


def image_preparer(settings: Settings, loaded: LoadedTower) -> ImagePreparer:
    """The vision tower's preparer: the bundle's preprocessing, the settings' decode limits."""
    limits = DecodeLimits(settings.max_image_bytes, settings.max_image_pixels)
    return ImagePreparer(loaded.bundle.manifest.image, limits)
