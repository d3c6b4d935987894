"""Safe decoding of PNG, JPEG and DICOM bytes, and the open_clip preprocessing of a bundle."""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from medvlm.imaging.dicom import DicomInfo, configure_pydicom, decode_dicom, looks_like_raw_dataset
from medvlm.imaging.errors import InvalidImage
from medvlm.imaging.geometry import crop_box
from medvlm.imaging.limits import DecodeLimits, check_image_bytes
from medvlm.imaging.spec import ImageSpec
from medvlm.imaging.window import NO_WINDOW, WindowRequest, bit_depth_range, to_eight_bit

PNG, JPEG, DICOM = "PNG", "JPEG", "DICOM"
_MAGIC = ((b"\x89PNG\r\n\x1a\n", PNG), (b"\xff\xd8\xff", JPEG))
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """Per-image choices of the caller: the display window and, for multi-frame DICOM, the frame."""

    window: WindowRequest = NO_WINDOW
    frame: int | None = None


DEFAULT_OPTIONS = ImageOptions()


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A decoded image ready for preprocess(), and what the audit may say about a DICOM source."""

    image: Image.Image
    dicom: DicomInfo | None = None


def configure_pillow(max_pixels: int) -> None:
    """Process-wide decoder guards, set once at start: our pixel limit, bomb warnings as errors,
    truncated files refused; pydicom quiet (its messages can quote header values)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    Image.LOAD_TRUNCATED_IMAGES = False
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    configure_pydicom()


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or DICOM from the magic bytes; None if none of them."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[128:132] == b"DICM":
        return DICOM
    return None


def _detect(data: bytes, stated: str | None, limits: DecodeLimits, label: str) -> str:
    """The format of the bytes after the checks every format shares: not empty, not too large,
    a known signature that agrees with the declared format."""
    if not data:
        raise InvalidImage(f"{label}: empty image data")
    check_image_bytes(data, limits.max_bytes, label)
    detected = sniff_format(data)
    if detected is None and looks_like_raw_dataset(data):
        raise InvalidImage(
            f"{label}: looks like a DICOM dataset without the 128-byte preamble and 'DICM' prefix; "
            "send a DICOM Part-10 file"
        )
    if detected is None:
        raise InvalidImage(f"{label}: not a PNG or JPEG image or a DICOM file (unrecognised file signature)")
    if stated is not None and stated != detected:
        raise InvalidImage(f"{label}: declared format {stated} but the data is {detected}")
    return detected


def decode(data: bytes, stated: str | None, limits: DecodeLimits, options: ImageOptions = DEFAULT_OPTIONS,
           label: str = "image") -> Decoded:
    """Decode PNG, JPEG or DICOM bytes into an image preprocess() takes, applying the caller's
    window; greyscale of more than 8 bits always comes out windowed to 8 bits.

    `stated` is the format the caller declared (None: detect). Error messages name the
    problem and `label` (e.g. "image 3"), never the content.
    """
    detected = _detect(data, stated, limits, label)
    if detected == DICOM:
        image, info = decode_dicom(data, limits.max_pixels, options.window, options.frame, label)
        return Decoded(image, info)
    if options.frame:
        raise InvalidImage(f"{label}: `frame` applies to multi-frame DICOM objects only")
    return Decoded(to_display(decode_image(data, detected, limits, label), options.window, label))


def to_display(img: Image.Image, request: WindowRequest, label: str = "image") -> Image.Image:
    """Greyscale of more than 8 bits -> 8-bit "L" through the request's window or else its
    bit depth's range (bit_depth_range); 8-bit greyscale through the request's window if one
    is set; anything else as it is."""
    if request.preset:
        raise InvalidImage(f"{label}: window presets are in Hounsfield units and apply to DICOM CT only")
    window = request.resolve()
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img)  # [H, W]
        return Image.fromarray(to_eight_bit(values, window or bit_depth_range(values)))
    if window is None:
        return img
    if img.mode not in ("L", "LA", "1"):
        raise InvalidImage(f"{label}: a window applies to greyscale images only")
    return Image.fromarray(to_eight_bit(np.asarray(img.convert("L")), window))


def decode_image(data: bytes, stated: str | None, limits: DecodeLimits, label: str = "image") -> Image.Image:
    """Decode PNG or JPEG bytes into a loaded PIL image as stored (16-bit greyscale stays
    16-bit), refusing anything else or anything too big. DICOM goes through decode()."""
    detected = _detect(data, stated, limits, label)
    if detected == DICOM:
        raise InvalidImage(f"{label}: DICOM must be decoded with its window and frame (decode())")
    try:
        img = Image.open(io.BytesIO(data), formats=[detected])
        width, height = img.size
        if width < 1 or height < 1:
            raise InvalidImage(f"{label}: image has no pixels")
        if width * height > limits.max_pixels:
            raise InvalidImage(
                f"{label}: {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels"
            )
        img.load()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"{label}: image exceeds the limit of {limits.max_pixels} pixels") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise InvalidImage(f"{label}: truncated or corrupt {detected} data") from exc
    return img


def preprocess(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """open_clip's eval transform for resize_mode "shortest": resize the shortest side to
    spec.size, centre crop, convert to RGB, scale to [0, 1], normalize -> [3, S, S] float32.

    The steps run in open_clip's order and with the same Pillow calls, so palette and RGBA
    images come out as open_clip makes them. One deliberate difference: greyscale of more than
    8 bits is first windowed to 8 bits by its bit depth's range (open_clip's RGB conversion would
    saturate it to white); decode() has normally done that already, with the caller's window.
    """
    if spec.resize_mode != "shortest":
        raise ValueError(f"unsupported resize_mode {spec.resize_mode!r}")
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img)  # [H, W]
        img = Image.fromarray(to_eight_bit(values, bit_depth_range(values)))
    crop = crop_box(*img.size, spec.size)
    if crop.resized != img.size:
        img = img.resize(crop.resized, _RESAMPLE[spec.interpolation])
    img = img.crop((crop.left, crop.top, crop.left + crop.size, crop.top + crop.size))
    if img.mode != "L":  # 8-bit greyscale is normalized from its one channel, which RGB would copy thrice
        img = img.convert("RGB")
    return normalize(np.asarray(img), spec.mean, spec.std)


def normalize(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[S, S, 3] RGB or [S, S] greyscale uint8 -> [3, S, S] float32 (x / 255 - mean) / std, in one
    pass over the pixels: as x * (1 / (255 std)) - mean / std, which differs from the three-step
    form by float rounding (under 1e-6) and costs a sixth of it."""
    std32 = np.asarray(std, dtype=np.float32)
    scale = (1.0 / (255.0 * std32)).astype(np.float32)[:, None, None]
    offset = (np.asarray(mean, dtype=np.float32) / std32)[:, None, None]
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    channels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    np.multiply(channels, scale, out=out, casting="unsafe")
    out -= offset
    return out
