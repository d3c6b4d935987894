"""Through the real gateway with the demo model: DICOM answers as its PNG, and greyscale of
more than 8 bits embeds as its 8-bit rendering unless a window says otherwise."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from conftest import ROOT
from engines.build.synthetic import CLASS_LABELS
from medvlm.imaging.window import Window, to_eight_bit
from medvlm.v1 import gateway_pb2, types_pb2
from scripts.make_dicom_samples import sample_dicom

SAMPLES = sorted((ROOT / "samples").glob("*.png"))
CHEST = [p for p in SAMPLES if p.name.startswith("chest_")]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


async def _embed(stack, *images: types_pb2.Image) -> np.ndarray:
    reply = await stack.gateway_stub.EmbedImages(types_pb2.EmbedImagesRequest(images=list(images)), timeout=30)
    vectors = np.array([e.values for e in reply.embeddings], dtype=np.float64)  # [N, D], unit rows
    assert np.isfinite(vectors).all()
    return vectors


async def test_the_dicom_form_of_each_sample_classifies_as_its_png(demo_stack):
    for path in SAMPLES:
        answers = []
        for image in (types_pb2.Image(data=path.read_bytes()),
                      types_pb2.Image(data=sample_dicom(path), format=types_pb2.IMAGE_FORMAT_DICOM)):
            reply = await demo_stack.gateway_stub.Classify(
                gateway_pb2.ClassifyRequest(image=image, labels=list(CLASS_LABELS)), timeout=30
            )
            answers.append(reply)
        png, dcm = answers
        assert dcm.top[0].label == png.top[0].label, path.name
        np.testing.assert_allclose([s.probability for s in dcm.scores], [s.probability for s in png.scores],
                                   atol=1e-3, err_msg=path.name)


async def test_twelve_and_sixteen_bit_pngs_embed_as_the_eight_bit_slice(demo_stack):
    for path in CHEST:
        grey = np.asarray(Image.open(path).convert("L"))  # [H, W] uint8
        full = grey.astype(np.uint16) * 257  # 0..65535
        twelve = np.rint(grey / 255 * 4095).astype(np.uint16)  # 12-bit data in 16-bit words
        assert Image.open(io.BytesIO(_png(twelve))).mode.startswith("I;16")
        vectors = await _embed(demo_stack, *(types_pb2.Image(data=_png(a)) for a in (grey, full, twelve)))
        cosine = vectors @ vectors.T
        assert cosine.min() >= 0.999, (path.name, cosine.round(5).tolist())
        # the old high-byte mapping would have given an almost black image: make sure this differs
        dark = await _embed(demo_stack, types_pb2.Image(data=_png((twelve >> 8).astype(np.uint8))))
        assert float(dark[0] @ vectors[0]) < 0.99


async def test_a_request_window_changes_the_result_as_expected(demo_stack):
    grey = np.asarray(Image.open(CHEST[0]).convert("L"))
    twelve = np.rint(grey / 255 * 4095).astype(np.uint16)
    narrow = Window(1200, 800)
    plain, full_window, narrowed, rendered = await _embed(
        demo_stack,
        types_pb2.Image(data=_png(twelve)),
        types_pb2.Image(data=_png(twelve), window=types_pb2.Window(center=2048, width=4096)),
        types_pb2.Image(data=_png(twelve), window=types_pb2.Window(center=narrow.center, width=narrow.width)),
        types_pb2.Image(data=_png(to_eight_bit(twelve, narrow))),  # the same window applied by the caller
    )
    assert float(plain @ full_window) >= 0.999
    assert float(narrowed @ rendered) >= 0.99999
    assert float(narrowed @ plain) < 0.99
    # a DICOM CT slice: a preset is the same as its window, and differs from the file's window
    dicom = sample_dicom(CHEST[0])
    own, preset, explicit = await _embed(
        demo_stack,
        types_pb2.Image(data=dicom),
        types_pb2.Image(data=dicom, window_preset=types_pb2.WINDOW_PRESET_BONE),
        types_pb2.Image(data=dicom, window=types_pb2.Window(center=400, width=1800)),
    )
    assert float(preset @ explicit) >= 0.99999
    assert float(own @ preset) < 0.99


async def test_a_constant_image_and_a_single_bright_pixel_embed_without_nan(demo_stack):
    constant = np.full((64, 64), 3000, dtype=np.uint16)
    spot = np.zeros((64, 64), dtype=np.uint16)
    spot[10, 20] = 4000
    vectors = await _embed(
        demo_stack,
        types_pb2.Image(data=_png(constant)),
        types_pb2.Image(data=_png(spot)),
        types_pb2.Image(data=_png(constant), window=types_pb2.Window(center=3000, width=1)),
    )
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
