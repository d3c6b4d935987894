"""Malformed input never crashes a decoder or a server: fuzzed bytes in, INVALID_ARGUMENT out."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medvlm.imaging.errors import InvalidImage
from medvlm.imaging.limits import DecodeLimits
from medvlm.imaging.preprocess import configure_pillow, decode_image, preprocess
from medvlm.imaging.spec import ImageSpec
from medvlm.v1 import encoders_pb2_grpc, types_pb2

LIMITS = DecodeLimits(max_bytes=1 << 20, max_pixels=4_000_000)
SPEC = ImageSpec(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _seed_images() -> list[bytes]:
    out = []
    for fmt, mode in (("PNG", "RGB"), ("PNG", "L"), ("PNG", "P"), ("JPEG", "RGB")):
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).convert(mode)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        if not data:
            break
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(mutated(), st.binary(max_size=512)))
def test_decoder_raises_only_invalid_input(data):
    configure_pillow(LIMITS.max_pixels)
    try:
        tensor = preprocess(decode_image(data, None, LIMITS), SPEC)
    except InvalidImage:
        return
    assert tensor.shape == (3, 224, 224) and np.isfinite(tensor).all()


async def test_fuzzed_requests_over_grpc_get_invalid_argument_and_the_server_keeps_serving(tiny_stack):
    rng = np.random.default_rng(1)
    async with tiny_stack.encoder_channel("vision") as channel:
        stub = encoders_pb2_grpc.VisionEncoderServiceStub(channel)
        good = types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=SEEDS[0])])
        for i in range(60):
            data = bytearray(SEEDS[i % len(SEEDS)])
            for _ in range(1 + i % 5):
                data[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))
            request = types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=bytes(data))])
            try:
                reply = await stub.EmbedImages(request, timeout=10)
                assert len(reply.embeddings) == 1  # some mutations still decode
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
            assert len((await stub.EmbedImages(good, timeout=10)).embeddings) == 1
        # a message that is not an EmbedImagesRequest at all
        raw = channel.unary_unary("/medvlm.v1.VisionEncoderService/EmbedImages")
        for junk in (b"\xff" * 40, bytes(rng.integers(0, 256, 200, dtype=np.uint8))):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw(junk, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid protobuf message" in info.value.details()
        assert len((await stub.EmbedImages(good, timeout=10)).embeddings) == 1


# The same targets `make fuzz` runs at volume (bench/fuzz.py), a few hundred cases each here.

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=200).map(lambda t: t.encode())))
def test_gateway_request_checks_raise_only_invalid_input(data):
    from bench.fuzz import request_target

    request_target()(data)


@pytest.fixture(scope="module")
def text_checks(tiny_bundle):
    from bench.fuzz import text_target

    return text_target(tiny_bundle)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_text_checks_and_tokenizer_raise_only_invalid_input(text_checks, text):
    text_checks(text.encode("utf-8", errors="surrogatepass"))
