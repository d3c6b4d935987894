"""DICOM Part-10 files -> an 8-bit greyscale or RGB image, the header checked before any pixel is decoded.

pydicom has no bomb guard, so the order here is the guard: the file meta is read
first and the transfer syntax allow-listed; a deflated dataset is inflated
against a bound; then only the tags this module needs are parsed, and the
geometry (rows, columns, frames, samples, bits) is checked against the limits
before pydicom decodes one frame. No message or log line carries a header value
other than the transfer syntax UID (a standard identifier, and only when it is
the reason for a refusal).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import struct
import warnings
import zlib

import numpy as np
import pydicom
import pydicom.config
from PIL import Image
from pydicom import uid as dcm_uid
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array

from medvlm.imaging.errors import InvalidImage
from medvlm.imaging.window import (
    LINEAR,
    LINEAR_EXACT,
    SIGMOID,
    Window,
    WindowRequest,
    data_range,
    to_eight_bit,
)

# Transfer syntaxes decoded here (pydicom, plus the pylibjpeg plugins for the compressed ones).
TRANSFER_SYNTAXES: dict[str, str] = {
    dcm_uid.ImplicitVRLittleEndian: "Implicit VR Little Endian",
    dcm_uid.ExplicitVRLittleEndian: "Explicit VR Little Endian",
    dcm_uid.DeflatedExplicitVRLittleEndian: "Deflated Explicit VR Little Endian",
    dcm_uid.ExplicitVRBigEndian: "Explicit VR Big Endian",
    dcm_uid.JPEGBaseline8Bit: "JPEG Baseline",
    dcm_uid.JPEGExtended12Bit: "JPEG Extended",
    dcm_uid.JPEGLossless: "JPEG Lossless",
    dcm_uid.JPEGLosslessSV1: "JPEG Lossless SV1",
    dcm_uid.JPEGLSLossless: "JPEG-LS Lossless",
    dcm_uid.JPEGLSNearLossless: "JPEG-LS Near-Lossless",
    dcm_uid.JPEG2000Lossless: "JPEG 2000 Lossless",
    dcm_uid.JPEG2000: "JPEG 2000",
    dcm_uid.HTJ2KLossless: "HTJ2K Lossless",
    dcm_uid.HTJ2KLosslessRPCL: "HTJ2K Lossless RPCL",
    dcm_uid.HTJ2K: "HTJ2K",
    dcm_uid.RLELossless: "RLE Lossless",
}
_NATIVE = {dcm_uid.ImplicitVRLittleEndian, dcm_uid.ExplicitVRLittleEndian,
           dcm_uid.DeflatedExplicitVRLittleEndian, dcm_uid.ExplicitVRBigEndian}
_DICOMDIR = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage

# At most 8192 per side, 8 or 16 bits allocated, 1 or 3 samples, 256 MiB decoded, sequences
# nested 8 deep. Only one frame is ever decoded; the frame count is bounded so that a header
# cannot make pydicom build a huge offset table.
MAX_SIDE = 8192
MAX_FRAMES = 10_000
MAX_DECODED_BYTES = 256 << 20
MAX_DEPTH = 8
# Real deflated datasets shrink a few times; a bomb of zeros shrinks about 1000 times.
MAX_DEFLATE_RATIO = 32
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
_PALETTE = "PALETTE COLOR"

# The only tags parsed from the dataset (the file meta is always read whole).
_TAGS = [
    0x00080016,  # SOP Class UID
    0x00080060,  # Modality
    0x00280002, 0x00280004, 0x00280006, 0x00280008,  # samples, photometric, planar, frames
    0x00280010, 0x00280011,  # rows, columns
    0x00280100, 0x00280101, 0x00280102, 0x00280103,  # bits allocated/stored, high bit, signed
    0x00280301,  # Burned In Annotation
    0x00281050, 0x00281051, 0x00281052, 0x00281053, 0x00281054, 0x00281056,  # window, rescale, VOI function
    0x00281101, 0x00281102, 0x00281103,  # palette descriptors
    0x00281199,  # palette UID
    0x00281201, 0x00281202, 0x00281203,  # palette data
    0x00281221, 0x00281222, 0x00281223,  # segmented palette data
    0x00283000, 0x00283010,  # modality LUT sequence, VOI LUT sequence
    0x00041220,  # Directory Record Sequence (a DICOMDIR)
    0x7FE00001, 0x7FE00002,  # extended offset table and its lengths
    0x7FE00008, 0x7FE00009, 0x7FE00010,  # float, double float and integer pixel data
]

# Modalities named in the audit record: the defined terms of PS3.3 C.7.3.1.1.1. Anything else
# is recorded as "other", so a free-text value can never reach a log.
_MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS "
    "KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG "
    "RESP RF RG RTDOSE RTIMAGE RTPLAN RTRECORD RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP "
    "TG US VA XA XC".split()
)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclasses.dataclass(frozen=True)
class DicomInfo:
    """What the audit record may say about a decoded object: nothing here is PHI."""

    modality: str  # a defined term, "other", or "" when absent
    transfer_syntax: str  # an allow-listed UID
    frames: int
    burned_in_annotation: bool  # BurnedInAnnotation YES: text (possibly PHI) is in the pixels
    window_source: str  # request, preset, file window, VOI LUT, data range, colour


def configure_pydicom() -> None:
    """Process-wide pydicom settings, set once at start: values are not validated on read
    (validation warnings quote the values), and pydicom's own log and warnings, which can
    quote header values, are silenced."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    logger = logging.getLogger("pydicom")
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def looks_like_raw_dataset(data: bytes) -> bool:
    """True for a DICOM dataset sent without the Part-10 preamble: "DICM" first, or a first
    element of group 0002 or 0008 in either byte order."""
    if data[:4] == b"DICM":
        return True
    if len(data) < 8:
        return False
    group_le, group_be = struct.unpack("<H", data[:2])[0], struct.unpack(">H", data[:2])[0]
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


def _uid_text(value: object) -> str:
    """A UID as it may appear in a message: digits and dots only, else a placeholder."""
    text = str(value).strip("\x00 ") if value is not None else ""
    return text if _UID.match(text) and len(text) <= 64 else "(not a valid UID)"


def _meta_end_and_syntax(data: bytes, label: str) -> tuple[int, str]:
    """Walk the file meta group (always explicit VR little endian) after "DICM": the offset where
    the dataset starts, and the Transfer Syntax UID."""
    pos, syntax = 132, None
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if pos + 12 > len(data):
                break
            length = struct.unpack_from("<I", data, pos + 8)[0]
            start = pos + 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            start = pos + 8
        if length == 0xFFFFFFFF or start + length > len(data):
            raise InvalidImage(f"{label}: DICOM file meta information is malformed")
        if element == 0x0010:
            syntax = data[start : start + length].decode("ascii", "replace").strip("\x00 ")
        pos = start + length
    if syntax is None:
        raise InvalidImage(f"{label}: DICOM file meta information has no transfer syntax")
    return pos, syntax


def _check_inflated_size(data: bytes, meta_end: int, label: str) -> None:
    """A deflated dataset is inflated once, in chunks whose output is dropped, against a bound
    before pydicom inflates it whole: at most MAX_DEFLATE_RATIO times its compressed size
    (plus 1 MiB for small files) and never beyond MAX_DECODED_BYTES. Inflating is the cost
    (about 70 MB/s on a shared 2-core VM), so the bound follows the input, like a bomb ratio."""
    body = data[meta_end:]
    bound = min(MAX_DECODED_BYTES, MAX_DEFLATE_RATIO * len(body) + (1 << 20))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pending = 0, body
    try:
        while pending and total <= bound:
            out = inflater.decompress(pending, 1 << 20)
            total += len(out)
            pending = inflater.unconsumed_tail
            if not out:
                break
    except zlib.error as exc:
        raise InvalidImage(f"{label}: deflated DICOM dataset is corrupt") from exc
    if total > bound:
        raise InvalidImage(
            f"{label}: deflated DICOM dataset inflates beyond {MAX_DEFLATE_RATIO} times its size "
            "(a decompression bomb)"
        )


def _check_declared_length(ds: pydicom.Dataset, label: str) -> None:
    """Refuse pixel data whose declared length runs past the end of the file (pydicom reads
    what there is and says nothing). Only a still-raw element knows its declared length."""
    if 0x7FE00010 not in ds:
        return
    raw = ds.get_item(0x7FE00010)
    declared = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    if declared not in (None, 0xFFFFFFFF) and value is not None and len(value) < declared:
        raise InvalidImage(
            f"{label}: DICOM pixel data element is declared longer than the file (truncated or corrupt)"
        )


def _convert_all(ds: pydicom.Dataset, label: str, depth: int = 0) -> None:
    """Convert every parsed element now (pydicom converts lazily, on first access, and raises
    whatever a corrupt value makes it raise), refusing sequences nested deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise InvalidImage(f"{label}: DICOM sequences are nested deeper than {MAX_DEPTH} levels")
    for tag in list(ds.keys()):
        element = ds[tag]
        if element.VR == "SQ":
            for item in element.value or ():
                _convert_all(item, label, depth + 1)


def _int(ds: pydicom.Dataset, keyword: str, label: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise InvalidImage(f"{label}: DICOM header lacks {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidImage(f"{label}: DICOM header has an invalid {keyword}") from exc


@dataclasses.dataclass(frozen=True)
class _Geometry:
    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    photometric: str

    @property
    def frame_bytes(self) -> int:
        """Bytes of one decoded frame."""
        return self.rows * self.columns * self.samples * (self.bits_allocated // 8)

    @property
    def stored_frame_bytes(self) -> int:
        """Bytes of one uncompressed frame as stored (YBR_FULL_422 keeps 2 samples per pixel)."""
        samples = 2 if self.photometric == "YBR_FULL_422" else self.samples
        return self.rows * self.columns * samples * (self.bits_allocated // 8)


def _check_geometry(ds: pydicom.Dataset, max_pixels: int, label: str) -> _Geometry:
    """Everything that sizes the decode, checked from the header alone."""
    rows = _int(ds, "Rows", label)
    columns = _int(ds, "Columns", label)
    frames = _int(ds, "NumberOfFrames", label, default=1)
    samples = _int(ds, "SamplesPerPixel", label, default=1)
    bits_allocated = _int(ds, "BitsAllocated", label)
    bits_stored = _int(ds, "BitsStored", label, default=bits_allocated)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if not (1 <= rows <= MAX_SIDE and 1 <= columns <= MAX_SIDE):
        raise InvalidImage(f"{label}: DICOM Rows and Columns must each be between 1 and {MAX_SIDE}")
    if rows * columns > max_pixels:
        raise InvalidImage(f"{label}: DICOM frame exceeds the limit of {max_pixels} pixels")
    if not 1 <= frames <= MAX_FRAMES:
        raise InvalidImage(f"{label}: DICOM Number of Frames must be between 1 and {MAX_FRAMES}")
    if bits_allocated not in (8, 16):
        raise InvalidImage(
            f"{label}: DICOM Bits Allocated must be 8 or 16 (1-bit and 32-bit data are not images here)"
        )
    if not 1 <= bits_stored <= bits_allocated:
        raise InvalidImage(f"{label}: DICOM Bits Stored must be between 1 and Bits Allocated")
    if samples == 1 and photometric not in (*_GREY, _PALETTE):
        raise InvalidImage(f"{label}: DICOM photometric interpretation unsupported for one sample per pixel")
    if samples == 3 and photometric not in _COLOUR:
        raise InvalidImage(f"{label}: DICOM photometric interpretation unsupported for 3 samples per pixel")
    if samples not in (1, 3):
        raise InvalidImage(f"{label}: DICOM Samples per Pixel must be 1 or 3")
    geometry = _Geometry(rows, columns, frames, samples, bits_allocated, bits_stored, photometric)
    if geometry.frame_bytes > MAX_DECODED_BYTES:
        raise InvalidImage(f"{label}: DICOM frame would decode to more than {MAX_DECODED_BYTES} bytes")
    return geometry


def _check_has_pixels(ds: pydicom.Dataset, label: str) -> None:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise InvalidImage(f"{label}: DICOM float pixel data is not supported")
        raise InvalidImage(
            f"{label}: DICOM object has no pixel data "
            "(e.g. a structured report, RT plan or presentation state)"
        )


def _check_pixel_length(ds: pydicom.Dataset, syntax: str, geometry: _Geometry, label: str) -> None:
    length = len(ds.PixelData or b"")
    if length == 0:
        raise InvalidImage(f"{label}: DICOM pixel data element is empty")
    if syntax in _NATIVE and length < geometry.stored_frame_bytes * geometry.frames:
        raise InvalidImage(
            f"{label}: DICOM pixel data is shorter than Rows x Columns x Frames require (truncated)"
        )


def _modality(ds: pydicom.Dataset) -> str:
    value = str(ds.get("Modality", "") or "").strip().upper()
    if not value:
        return ""
    return value if value in _MODALITIES else "other"


def _file_window(ds: pydicom.Dataset) -> Window | None:
    """The first window of the file's VOI LUT module, or None if absent or unusable."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center, width = ds.WindowCenter, ds.WindowWidth
        center = float(center[0] if isinstance(center, MultiValue) else center)
        width = float(width[0] if isinstance(width, MultiValue) else width)
        function = str(ds.get("VOILUTFunction", LINEAR) or LINEAR).strip().upper()
    except (TypeError, ValueError, IndexError):
        return None
    window = Window(center, width, function if function in (LINEAR, LINEAR_EXACT, SIGMOID) else LINEAR)
    return window if window.valid() else None


def _voi_lut_to_eight_bit(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """The file's first VOI LUT applied by pydicom, scaled from the LUT's output bits to 8 bits;
    None if the sequence is absent or unusable."""
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    try:
        bits = int(sequence[0].LUTDescriptor[2])
        if not 1 <= bits <= 16:
            return None
        if values.dtype.kind == "f" and np.array_equal(values, np.round(values)):
            values = values.astype(np.int64)  # a LUT is indexed by integers; rescale gave floats
        out = apply_voi(values, ds, index=0).astype(np.float64)  # [H, W]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None
    return np.rint(np.clip(out / (2**bits - 1), 0.0, 1.0) * 255.0).astype(np.uint8)


def _greyscale(arr: np.ndarray, ds: pydicom.Dataset, geometry: _Geometry, request: WindowRequest,
               label: str) -> tuple[np.ndarray, str]:
    """Stored values [H, W] -> modality LUT -> window -> MONOCHROME1 inversion -> uint8 [H, W]."""
    try:
        values = apply_modality_lut(arr, ds)  # [H, W], e.g. Hounsfield units for CT
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise InvalidImage(f"{label}: DICOM modality LUT or rescale values are invalid") from exc
    if not np.isfinite(values).all():
        raise InvalidImage(f"{label}: DICOM modality LUT or rescale values are invalid")
    if request.preset and _modality(ds) != "CT":
        raise InvalidImage(f"{label}: window presets are in Hounsfield units and apply to CT objects only")
    # request window -> preset -> first file window -> VOI LUT sequence -> min..max of the frame
    window, source = request.resolve(), ("request" if request.window is not None else "preset")
    out = None
    if window is None:
        window, source = _file_window(ds), "file window"
    if window is None:
        out, source = _voi_lut_to_eight_bit(values, ds), "VOI LUT"
    if out is None:
        if window is None:
            window, source = data_range(values), "data range"
        out = to_eight_bit(values, window)
    if geometry.photometric == "MONOCHROME1":
        out = 255 - out
    return out, source


def _colour(arr: np.ndarray, ds: pydicom.Dataset, geometry: _Geometry, label: str) -> np.ndarray:
    """Palette or true colour [H, W(, 3)] -> uint8 RGB [H, W, 3]; YBR was converted by pydicom."""
    bits = geometry.bits_stored
    if geometry.photometric == _PALETTE:
        try:
            arr = apply_color_lut(arr, ds)  # [H, W, 3], 8- or 16-bit entries
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise InvalidImage(f"{label}: DICOM palette colour lookup table is missing or invalid") from exc
        bits = 16 if bits not in (8, 16) else bits
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise InvalidImage(f"{label}: DICOM colour pixel data did not decode to three channels")
    if arr.dtype == np.uint8 and bits <= 8:
        return arr
    scaled = arr.astype(np.float64) / float(2**bits - 1)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def decode_dicom(data: bytes, max_pixels: int, request: WindowRequest, frame: int | None,
                 label: str = "image") -> tuple[Image.Image, DicomInfo]:
    """A Part-10 file -> (8-bit "L" or "RGB" image of one frame, audit facts).

    Greyscale: modality LUT, then the window (request, preset, first file window, VOI LUT
    sequence, or the frame's min..max), then MONOCHROME1 inversion. Colour: palette LUT or
    YBR -> RGB, scaled to 8 bits. Every refusal is InvalidImage naming the reason.
    """
    if data[128:132] != b"DICM":
        raise InvalidImage(f"{label}: not a DICOM Part-10 file (no 'DICM' after the 128-byte preamble)")
    meta_end, syntax = _meta_end_and_syntax(data, label)
    if syntax not in TRANSFER_SYNTAXES:
        raise InvalidImage(f"{label}: DICOM transfer syntax {_uid_text(syntax)} is not supported")
    if syntax == dcm_uid.DeflatedExplicitVRLittleEndian:
        _check_inflated_size(data, meta_end, label)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False, specific_tags=_TAGS)
        _check_declared_length(ds, label)
        _convert_all(ds.file_meta, label)
        _convert_all(ds, label)
    except InvalidImage:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure of these bytes is the caller's bad input
        raise InvalidImage(f"{label}: DICOM file could not be parsed (malformed header)") from exc
    meta = ds.file_meta
    if str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR or "DirectoryRecordSequence" in ds:
        raise InvalidImage(f"{label}: a DICOMDIR is an index of files, not an image; send the image files")
    _check_has_pixels(ds, label)
    geometry = _check_geometry(ds, max_pixels, label)
    _check_pixel_length(ds, syntax, geometry, label)
    if geometry.frames > 1 and frame is None:
        raise InvalidImage(f"{label}: DICOM object has more than one frame; choose one with `frame`")
    index = frame or 0
    if index >= geometry.frames:
        raise InvalidImage(f"{label}: frame {index} is beyond the last frame of the DICOM object")
    colour = geometry.samples == 3 or geometry.photometric == _PALETTE
    if colour and (request.window is not None or request.preset):
        raise InvalidImage(f"{label}: a window applies to greyscale images only")
    try:
        arr = pixel_array(ds, index=index)  # [H, W] or [H, W, 3]
    except BaseException as exc:  # noqa: BLE001 - decoder plugins raise anything on broken data
        # including pylibjpeg-rle's Rust panics, which derive from BaseException
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        raise InvalidImage(
            f"{label}: DICOM pixel data could not be decoded ({TRANSFER_SYNTAXES[syntax]}): "
            "broken or unsupported data"
        ) from exc
    if arr.shape[:2] != (geometry.rows, geometry.columns):
        raise InvalidImage(f"{label}: DICOM pixel data does not match Rows and Columns")
    if colour:
        image, source = Image.fromarray(_colour(arr, ds, geometry, label)), "colour"
    else:
        grey, source = _greyscale(arr, ds, geometry, request, label)
        image = Image.fromarray(grey)
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"
    return image, DicomInfo(_modality(ds), str(syntax), geometry.frames, burned, source)
