"""Safe decoding of PNG/JPEG bytes and the open_clip preprocessing of a bundle, with Pillow and numpy."""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from engines.runtime.manifest import ImageSpec
from services.common.errors import InvalidInput

PNG, JPEG, DICOM = "PNG", "JPEG", "DICOM"
_MAGIC = ((b"\x89PNG\r\n\x1a\n", PNG), (b"\xff\xd8\xff", JPEG))
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """What one image may cost."""

    max_bytes: int
    max_pixels: int


def configure_pillow(max_pixels: int) -> None:
    """Process-wide Pillow guards, set once at start: our pixel limit, bomb warnings as errors,
    truncated files refused."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    Image.LOAD_TRUNCATED_IMAGES = False
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or DICOM from the magic bytes; None if none of them."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[128:132] == b"DICM":
        return DICOM
    return None


def decode_image(data: bytes, stated: str | None, limits: DecodeLimits, label: str = "image") -> Image.Image:
    """Decode PNG or JPEG bytes into a loaded PIL image, refusing anything else or anything too big.

    `stated` is the format the caller declared (None: detect). Error messages name the
    problem and `label` (e.g. "image 3"), never the content.
    """
    if not data:
        raise InvalidInput(f"{label}: empty image data")
    if len(data) > limits.max_bytes:
        raise InvalidInput(f"{label}: {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    detected = sniff_format(data)
    if detected == DICOM:
        raise InvalidInput(f"{label}: DICOM is not accepted by this server; send PNG or JPEG")
    if detected is None:
        raise InvalidInput(f"{label}: not a PNG or JPEG image (unrecognised file signature)")
    if stated is not None and stated != detected:
        raise InvalidInput(f"{label}: declared format {stated} but the data is {detected}")
    try:
        img = Image.open(io.BytesIO(data), formats=[detected])
        width, height = img.size
        if width < 1 or height < 1:
            raise InvalidInput(f"{label}: image has no pixels")
        if width * height > limits.max_pixels:
            raise InvalidInput(
                f"{label}: {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels"
            )
        img.load()
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"{label}: image exceeds the limit of {limits.max_pixels} pixels") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise InvalidInput(f"{label}: truncated or corrupt {detected} data") from exc
    return img


def _to_eight_bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale -> 8-bit grayscale by keeping the high byte (full-range linear map)."""
    arr = np.asarray(img, dtype=np.uint32)  # [H, W]
    return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")


def preprocess(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """open_clip's eval transform for resize_mode "shortest": resize the shortest side to
    spec.size, centre crop, convert to RGB, scale to [0, 1], normalize -> [3, S, S] float32.

    The steps run in open_clip's order and with the same Pillow calls, so palette and RGBA
    images come out as open_clip makes them. One deliberate difference: 16-bit grayscale is
    first mapped to 8 bits (open_clip's RGB conversion would saturate it to white).
    """
    if spec.resize_mode != "shortest":
        raise ValueError(f"unsupported resize_mode {spec.resize_mode!r}")
    if img.mode in _SIXTEEN_BIT:
        img = _to_eight_bit(img)
    size = spec.size
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), _RESAMPLE[spec.interpolation])
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    arr = np.asarray(img, dtype=np.float32) / 255.0  # [S, S, 3]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return ((arr - mean) / std).transpose(2, 0, 1).copy()  # [3, S, S]
