"""Decoding and preprocessing: equal to open_clip's own transform, and safe on bad input."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
from PIL import Image

from medvlm.imaging.errors import InvalidImage
from medvlm.imaging.geometry import crop_box
from medvlm.imaging.limits import DecodeLimits
from medvlm.imaging.preprocess import ImageOptions, configure_pillow, decode, decode_image, preprocess
from medvlm.imaging.spec import ImageSpec
from medvlm.imaging.window import LINEAR_EXACT, SIGMOID, Window, WindowRequest, data_range, to_eight_bit

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SPEC = ImageSpec(size=224, mean=MEAN, std=STD)
LIMITS = DecodeLimits(max_bytes=1 << 20, max_pixels=4_000_000)


@pytest.fixture(scope="module", autouse=True)
def _pillow_guards():
    configure_pillow(LIMITS.max_pixels)


def _png(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    # smooth content (like real images) plus noise, so resampling differences show up
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / 7.0) + np.cos(yy / 11.0)) * 60 + 128
    rgba = np.stack([base, base[::-1], base[:, ::-1], np.full_like(base, 200)], axis=-1)
    rgba = np.clip(rgba + rng.normal(0, 20, rgba.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgba, mode="RGBA")
    if mode == "P":
        return img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode == "RGBA":
        alpha = (rng.random((h, w)) * 255).astype(np.uint8)
        img.putalpha(Image.fromarray(alpha, mode="L"))
        return img
    return img.convert(mode)


CASES = [
    ("RGB", (300, 200)),  # landscape
    ("RGB", (171, 389)),  # odd, portrait
    ("RGBA", (257, 263)),
    ("L", (640, 481)),
    ("P", (333, 222)),
    ("RGB", (224, 224)),  # already the model size
    ("RGB", (97, 131)),  # smaller than the model size: upsampled
]


# JPEG stores neither alpha nor a palette: those modes are PNG only.
ENCODED = [(m, s, _png) for m, s in CASES] + [(m, s, _jpeg) for m, s in CASES if m not in ("RGBA", "P")]


@pytest.mark.parametrize(("mode", "size", "encode"), ENCODED)
def test_preprocess_equals_open_clip(mode, size, encode):
    data = encode(_random_image(mode, size, seed=size[0]))
    reference = open_clip.image_transform(224, is_train=False, mean=MEAN, std=STD)
    expected = reference(Image.open(io.BytesIO(data))).numpy()  # [3, 224, 224]
    got = preprocess(decode_image(data, None, LIMITS), SPEC)
    assert got.shape == expected.shape == (3, 224, 224)
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= 0.02


@pytest.mark.parametrize("size", [(224, 224), (640, 481)])
def test_greyscale_is_normalized_from_its_one_channel_exactly_as_its_rgb_copy(size):
    grey = _random_image("L", size, seed=7)
    got = preprocess(grey, SPEC)
    assert np.array_equal(got, preprocess(grey.convert("RGB"), SPEC))  # bit for bit, not within a bound
    assert not np.array_equal(got[0], got[1])  # each channel has its own mean and std


def test_crop_box_is_the_resize_and_centre_crop_of_open_clip():
    landscape = crop_box(400, 300, 224)
    assert (landscape.resized, landscape.left, landscape.top) == ((298, 224), 37, 0)  # long side truncated
    assert landscape.box == pytest.approx((37 * 400 / 298, 0.0, 261 * 400 / 298, 300.0))
    portrait = crop_box(300, 400, 224)
    assert (portrait.resized, portrait.left, portrait.top) == ((224, 298), 0, 37)
    assert portrait.box == pytest.approx((0.0, 37 * 400 / 298, 300.0, 261 * 400 / 298))
    assert crop_box(512, 512, 224).box == (0.0, 0.0, 512.0, 512.0)


@pytest.mark.parametrize(("width", "height", "size"), [(250, 100, 50), (97, 203, 40), (256, 181, 64)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_crop_box_maps_each_model_pixel_back_to_where_preprocess_took_it(width, height, size, interpolation):
    # red = x and green = y of each original pixel, so a model pixel's value says where it came from
    yy, xx = np.mgrid[0:height, 0:width]
    img = Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8))  # [H, W, 3]
    spec = ImageSpec(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation=interpolation)
    got = preprocess(img, spec) * 255.0  # [3, S, S], original coordinates as values
    crop = crop_box(width, height, size)
    centres = np.arange(size) + 0.5  # model pixel centres; an original pixel's centre is at index + 0.5
    x = np.array([crop.to_original(c, 0.0)[0] for c in centres]) - 0.5  # [S]
    y = np.array([crop.to_original(0.0, c)[1] for c in centres]) - 0.5  # [S]
    assert np.abs(got[0] - x[None, :]).max() <= 0.51  # within the resize's rounding to uint8
    assert np.abs(got[1] - y[:, None]).max() <= 0.51


def test_sixteen_bit_png_keeps_its_contrast():
    ramp = np.linspace(0, 65535, 300 * 300).reshape(300, 300).astype(np.uint16)  # [H, W]
    data = _png(Image.fromarray(ramp))
    img = decode_image(data, None, LIMITS)
    assert img.mode.startswith("I")
    got = preprocess(img, SPEC)
    # de-normalize channel 0 back to [0, 1]: a full-range ramp must stay a ramp, not saturate
    channel = got[0] * STD[0] + MEAN[0]
    assert channel.min() < 0.1 and channel.max() > 0.9
    assert np.all(np.diff(channel.mean(axis=1)) >= -1e-3)  # rows brighten downwards


def _truncated_png() -> bytes:
    return _png(_random_image("RGB", (64, 64), 1))[:-200]


@pytest.mark.parametrize(
    ("data", "stated", "needle"),
    [
        (b"", None, "empty"),
        (b"this is not an image at all", None, "not a PNG or JPEG image or a DICOM file"),
        (b"\x00" * 128 + b"DICM" + b"\x00" * 64, None, "DICOM"),
        ("truncated", None, "truncated or corrupt PNG"),
        ("jpeg", "PNG", "declared format PNG but the data is JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, None, "truncated or corrupt PNG"),
    ],
)
def test_bad_images_are_refused_with_a_named_problem(data, stated, needle):
    if data == "truncated":
        data = _truncated_png()
    elif data == "jpeg":
        data = _jpeg(_random_image("RGB", (32, 32), 2))
    with pytest.raises(InvalidImage, match=needle):
        decode(data, stated, LIMITS, label="image 0")


def test_oversized_payload_is_refused_before_decoding():
    small = DecodeLimits(max_bytes=1000, max_pixels=LIMITS.max_pixels)
    data = _png(_random_image("RGB", (64, 64), 3))
    assert len(data) > 1000
    with pytest.raises(InvalidImage, match="exceeds the limit of 1000 bytes"):
        decode_image(data, None, small)


def test_decompression_bomb_is_refused_without_decoding():
    # 3000 x 3000 of one colour compresses to a few KB but is 9 Mpx > the 4 Mpx limit
    data = _png(Image.new("L", (3000, 3000), 0))
    assert len(data) < 50_000
    with pytest.raises(InvalidImage, match="exceeds the limit of 4000000 pixels"):
        decode_image(data, None, LIMITS)
    # far beyond 2x the limit, where Pillow itself raises at open
    huge = _png(Image.new("1", (10_000, 10_000), 0))
    with pytest.raises(InvalidImage, match="pixels"):
        decode_image(huge, None, LIMITS)


def test_error_messages_carry_no_image_content():
    secret = b"PATIENT-NAME-DOE^JANE"
    with pytest.raises(InvalidImage) as info:
        decode_image(b"\x89PNG\r\n\x1a\n" + secret, None, LIMITS)
    assert "DOE" not in str(info.value)


# ---- greyscale of more than 8 bits: one window for PNG and DICOM ------------------------


def _slice() -> np.ndarray:
    yy, xx = np.mgrid[0:120, 0:90]
    return np.clip((np.sin(xx / 9.0) + np.cos(yy / 13.0)) * 70 + 128, 0, 255).astype(np.uint8)  # [H, W]


def test_twelve_bit_in_sixteen_renders_as_the_eight_bit_slice():
    grey = _slice()
    eight = np.asarray(decode(_png(Image.fromarray(grey)), None, LIMITS).image)
    for scale in (1023, 4095, 16383, 65535):  # 10, 12, 14 and 16 bits of data in 16-bit words
        words = np.rint(grey / 255 * scale).astype(np.uint16)
        decoded = decode(_png(Image.fromarray(words)), None, LIMITS)
        assert decoded.image.mode == "L" and decoded.dicom is None
        np.testing.assert_array_equal(np.asarray(decoded.image), eight)


def test_a_request_window_maps_greyscale_by_the_dicom_linear_function():
    words = (np.arange(4096, dtype=np.uint16).reshape(64, 64))
    window = Window(1000, 401)  # LINEAR: black at <= 799.5, white above 1199.5
    got = np.asarray(decode(_png(Image.fromarray(words)), None, LIMITS, ImageOptions(WindowRequest(window))).image)
    flat = got.reshape(-1)
    assert (flat[:800] == 0).all() and (flat[1200:] == 255).all()
    assert np.all(np.diff(flat[800:1200].astype(int)) >= 0) and 100 < flat[1000] < 155
    # 8-bit greyscale is left alone without a window (open_clip parity), windowed with one
    grey = _slice()
    assert np.array_equal(np.asarray(decode(_png(Image.fromarray(grey)), None, LIMITS).image), grey)
    narrowed = decode(_png(Image.fromarray(grey)), None, LIMITS, ImageOptions(WindowRequest(Window(128, 64))))
    np.testing.assert_array_equal(np.asarray(narrowed.image), to_eight_bit(grey, Window(128, 64)))


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (ImageOptions(WindowRequest(Window(100, 50))), "greyscale images only"),
        (ImageOptions(WindowRequest(preset="lung")), "apply to DICOM CT only"),
        (ImageOptions(frame=2), "multi-frame DICOM objects only"),
    ],
)
def test_colour_windows_presets_and_frames_on_png_are_refused(options, needle):
    with pytest.raises(InvalidImage, match=needle):
        decode(_png(_random_image("RGB", (40, 30), 4)), None, LIMITS, options)


def test_constant_and_single_pixel_images_never_divide_by_zero():
    constant = np.full((50, 40), 3000, dtype=np.uint16)
    spot = np.zeros((50, 40), dtype=np.uint16)
    spot[7, 9] = 4000
    for words, window in ((constant, None), (spot, None), (constant, Window(3000, 1)), (spot, Window(0, 1))):
        options = ImageOptions(WindowRequest(window)) if window else ImageOptions()
        img = decode(_png(Image.fromarray(words)), None, LIMITS, options).image
        tensor = preprocess(img, SPEC)
        assert np.isfinite(tensor).all()
    assert not to_eight_bit(constant, data_range(constant)).any()  # an empty range is black
    spot_out = to_eight_bit(spot, data_range(spot))
    assert spot_out[7, 9] == 255 and spot_out.sum() == 255
    assert np.isfinite(to_eight_bit(spot, Window(0, 1e-300, SIGMOID)).astype(float)).all()


def test_window_functions_match_the_dicom_definitions():
    values = np.array([-1000.0, 0.0, 39.5, 40.0, 40.5, 1000.0])
    assert to_eight_bit(values, Window(40, 1)).tolist() == [0, 0, 0, 255, 255, 255]  # LINEAR width 1: above 39.5
    exact = to_eight_bit(values, Window(40, 80, LINEAR_EXACT))
    assert exact.tolist() == [0, 0, 126, 128, 129, 255]  # (x - c) / w + 0.5
    sigmoid = to_eight_bit(values, Window(40, 80, SIGMOID))
    assert sigmoid[3] == 128 and sigmoid[0] == 0 and sigmoid[-1] == 255
