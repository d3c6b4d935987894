"""Images from paths or bytes: the file type sniffed from the content, never from the name."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import Union

from medvlm.client._errors import UnreadableFile, UnrecognizedFile
from medvlm.v1 import types_pb2

ImageSource = Union[str, "os.PathLike[str]", bytes, "LoadedImage"]
"""An image as a path to a file, as the file's bytes (PNG, JPEG or DICOM Part 10), or as a
LoadedImage (load_image's result, with its display window and frame)."""

PNG, JPEG, DICOM = "png", "jpeg", "dicom"
_WIRE_FORMAT = {PNG: types_pb2.IMAGE_FORMAT_PNG, JPEG: types_pb2.IMAGE_FORMAT_JPEG,
                DICOM: types_pb2.IMAGE_FORMAT_DICOM}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_PREAMBLE = 128  # a Part 10 file: 128-byte preamble, then "DICM"
_DICOM_MAGIC = b"DICM"


def sniff(data: bytes) -> str | None:
    """The file type of encoded bytes ("png", "jpeg" or "dicom"), or None if it is none of them."""
    if data.startswith(_PNG_MAGIC):
        return PNG
    if data.startswith(_JPEG_MAGIC):
        return JPEG
    if data[_DICOM_PREAMBLE:_DICOM_PREAMBLE + len(_DICOM_MAGIC)] == _DICOM_MAGIC:
        return DICOM
    return None


WINDOW_PRESETS: tuple[str, ...] = tuple(
    name.removeprefix("WINDOW_PRESET_").lower() for name in types_pb2.WindowPreset.keys()
    if name != "WINDOW_PRESET_UNSPECIFIED")
"""Named CT windows the contract knows (Hounsfield units; DICOM CT only): lung, mediastinum, ..."""


@dataclasses.dataclass(frozen=True)
class Window:
    """A display window for greyscale images, in the image's own units (Hounsfield units for CT)."""

    center: float
    width: float  # at least 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.width)) or self.width < 1:
            raise ValueError("a window needs a finite center and a finite width of at least 1")

    @classmethod
    def parse(cls, text: str) -> Window:
        """"CENTER,WIDTH", e.g. "-600,1500"."""
        parts = text.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            return cls(float(parts[0]), float(parts[1]))
        except ValueError:
            raise ValueError(f"window {text!r}: give CENTER,WIDTH with a width of at least 1, e.g. -600,1500") from None


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """One image read and recognised: its bytes, file type and sha256 (hex, of the bytes), and how
    the server should display it: a window or a named preset (greyscale; presets for DICOM CT
    only), and the frame of a multi-frame DICOM object."""

    data: bytes
    kind: str
    sha256: str
    name: str  # the path it came from, or "<bytes>"
    window: Window | None = None
    window_preset: str | None = None  # one of WINDOW_PRESETS
    frame: int | None = None  # from 0

    def __post_init__(self) -> None:
        if self.window is not None and self.window_preset:
            raise ValueError("give a window or a window preset, not both")
        if self.window_preset and self.window_preset not in WINDOW_PRESETS:
            raise ValueError(f"window preset {self.window_preset!r}: one of {', '.join(WINDOW_PRESETS)}")
        if self.frame is not None and self.frame < 0:
            raise ValueError("frame counts from 0")

    def to_proto(self) -> types_pb2.Image:
        """The wire message; the bytes go as read, the server decodes and windows them."""
        image = types_pb2.Image(data=self.data, format=_WIRE_FORMAT[self.kind])
        if self.window is not None:
            image.window.center, image.window.width = self.window.center, self.window.width
        if self.window_preset:
            image.window_preset = types_pb2.WindowPreset.Value("WINDOW_PRESET_" + self.window_preset.upper())
        if self.frame is not None:
            image.frame = self.frame
        return image


def load_image(source: ImageSource, *, window: Window | None = None,
               window_preset: str | None = None, frame: int | None = None) -> LoadedImage:
    """Read an image from a path or take it from bytes, and recognise its type by content.

    `window` (center, width) or `window_preset` (a name of WINDOW_PRESETS) sets how the server
    maps greyscale to 8 bits before the model sees it, overriding the file's own window; `frame`
    chooses the frame of a multi-frame DICOM object. A LoadedImage comes back as it is, with the
    options given here replacing its own. Raises UnreadableFile when the file cannot be read,
    UnrecognizedFile when the content is not PNG, JPEG or DICOM, and ValueError for bad options.
    """
    options = {k: v for k, v in (("window", window), ("window_preset", window_preset), ("frame", frame))
               if v is not None}
    if isinstance(source, LoadedImage):
        if window is not None or window_preset is not None:
            options.setdefault("window", None)
            options.setdefault("window_preset", None)
        return dataclasses.replace(source, **options) if options else source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "<bytes>"
    else:
        name = os.fspath(source)
        try:
            data = Path(name).read_bytes()
        except OSError as exc:
            raise UnreadableFile(f"cannot read the file ({exc.strerror or type(exc).__name__})") from exc
    kind = sniff(data)
    if kind is None:
        raise UnrecognizedFile("not a PNG, JPEG or DICOM file (its first bytes match none of them)")
    return LoadedImage(data=data, kind=kind, sha256=hashlib.sha256(data).hexdigest(), name=name, **options)
