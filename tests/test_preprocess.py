"""Decoding and preprocessing: equal to open_clip's own transform, and safe on bad input."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
from PIL import Image

from engines.runtime.manifest import ImageSpec
from services.common.errors import InvalidInput
from services.vision.preprocess import DecodeLimits, configure_pillow, decode, decode_image, preprocess

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
        (b"this is not an image at all", None, "not a PNG, JPEG or DICOM"),
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
    with pytest.raises(InvalidInput, match=needle):
        decode(data, stated, LIMITS, label="image 0")


def test_oversized_payload_is_refused_before_decoding():
    small = DecodeLimits(max_bytes=1000, max_pixels=LIMITS.max_pixels)
    data = _png(_random_image("RGB", (64, 64), 3))
    assert len(data) > 1000
    with pytest.raises(InvalidInput, match="exceeds the limit of 1000 bytes"):
        decode_image(data, None, small)


def test_decompression_bomb_is_refused_without_decoding():
    # 3000 x 3000 of one colour compresses to a few KB but is 9 Mpx > the 4 Mpx limit
    data = _png(Image.new("L", (3000, 3000), 0))
    assert len(data) < 50_000
    with pytest.raises(InvalidInput, match="exceeds the limit of 4000000 pixels"):
        decode_image(data, None, LIMITS)
    # far beyond 2x the limit, where Pillow itself raises at open
    huge = _png(Image.new("1", (10_000, 10_000), 0))
    with pytest.raises(InvalidInput, match="pixels"):
        decode_image(huge, None, LIMITS)


def test_error_messages_carry_no_image_content():
    secret = b"PATIENT-NAME-DOE^JANE"
    with pytest.raises(InvalidInput) as info:
        decode_image(b"\x89PNG\r\n\x1a\n" + secret, None, LIMITS)
    assert "DOE" not in str(info.value)
