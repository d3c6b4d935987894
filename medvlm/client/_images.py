"""Images from paths or bytes: the file type sniffed from the content, never from the name."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Union

from medvlm.client._errors import UnreadableFile, UnrecognizedFile
from medvlm.v1 import types_pb2

ImageSource = Union[str, "os.PathLike[str]", bytes]
"""An image as a path to a file or as the file's bytes (PNG, JPEG or DICOM Part 10)."""

PNG, JPEG, DICOM = "png", "jpeg", "dicom"
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


def _wire_format(kind: str) -> int:
    """The ImageFormat sent for a file type. DICOM is sent as UNSPECIFIED (the server sniffs it)
    while the contract has no IMAGE_FORMAT_DICOM value."""
    names = {PNG: "IMAGE_FORMAT_PNG", JPEG: "IMAGE_FORMAT_JPEG", DICOM: "IMAGE_FORMAT_DICOM"}
    values = types_pb2.ImageFormat.DESCRIPTOR.values_by_name
    value = values.get(names[kind])
    return value.number if value is not None else types_pb2.IMAGE_FORMAT_UNSPECIFIED


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """One image read and recognised: its bytes, file type and sha256 (hex, of the bytes)."""

    data: bytes
    kind: str
    sha256: str
    name: str  # the path it came from, or "<bytes>"

    def to_proto(self) -> types_pb2.Image:
        """The wire message; the bytes go as read, the server decodes them."""
        return types_pb2.Image(data=self.data, format=_wire_format(self.kind))


def load_image(source: ImageSource) -> LoadedImage:
    """Read an image from a path or take it from bytes, and recognise its type by content.

    Raises UnreadableFile when the file cannot be read and UnrecognizedFile when the content
    is not PNG, JPEG or DICOM.
    """
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
    return LoadedImage(data=data, kind=kind, sha256=hashlib.sha256(data).hexdigest(), name=name)
