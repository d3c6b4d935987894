"""Through the real gateway and encoders, answers equal in-process open_clip torch on the same inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (ORT_FP32, ROOT, cosine_shift, embedding_bound, precision_name, served_engines,
                      start_bf16_standin_stack, start_stack)
from medvlm.v1 import gateway_pb2, types_pb2
from test_gateway import png_bytes

LABELS = ["normal chest radiograph", "left pleural effusion", "right pleural effusion", "cardiomegaly",
          "dermoscopy of a melanocytic naevus"]
TEMPLATE = "a medical image showing {}"


@pytest.fixture(scope="module")
def reference(tiny_reference):
    return tiny_reference


def torch_embeddings(reference, images: list[bytes], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        pixels = torch.stack([reference.preprocess(Image.open(io.BytesIO(b))) for b in images])  # [N, 3, H, W]
        image = reference.model.encode_image(pixels, normalize=True).numpy()  # [N, D]
        text = reference.model.encode_text(reference.tokenizer(texts), normalize=True).numpy()  # [M, D]
    return image, text


def odd_images() -> list[bytes]:
    rgba = Image.fromarray(np.random.default_rng(3).integers(0, 256, (301, 187, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(np.random.default_rng(4).integers(0, 256, (150, 410), dtype=np.uint8), "L")
    out = [png_bytes(11, (333, 222))]
    for img in (rgba, gray):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
async def fp32_stack(tiny_bundle):
    """The engine and precision parity with open_clip is judged at, whatever MEDVLM_TEST_ENGINE says."""
    stack = await start_stack(tiny_bundle, encoder_overrides=ORT_FP32)
    yield stack
    await stack.stop()


@pytest.fixture(scope="module")
async def bf16_standin_stack(demo_bundle):
    """On the demo model: rounding the outputs of tiny's random text tower to bf16 fails its golden
    check (centred cosine 0.957: its embeddings are nearly parallel), the trained demo's passes (0.999997)."""
    stack = await start_bf16_standin_stack(demo_bundle)
    yield stack
    await stack.stop()


@pytest.fixture(scope="module")
def demo_reference(tmp_path_factory):
    """The demo model in torch through open_clip, from the committed weights the bundle was built from."""
    from engines.build import registry

    return registry.get_source("demo").load(tmp_path_factory.mktemp("demo-src"), None)


def reference_answers(reference, images: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """open_clip's image and text embeddings, cosines [N, M] and probabilities [N, M] of LABELS, and its
    logit scale."""
    prompts = [TEMPLATE.replace("{}", label) for label in LABELS]
    ref_image, ref_text = torch_embeddings(reference, images, prompts)
    scale = float(reference.model.logit_scale.detach().exp())
    ref_cos = ref_image @ ref_text.T  # [N, M]
    ref_prob = torch.softmax(torch.from_numpy(scale * ref_cos), dim=1).numpy()
    return ref_image, ref_text, ref_cos, ref_prob, scale


async def served_embeddings(stub, images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    prompts = [TEMPLATE.replace("{}", label) for label in LABELS]
    emb_images = await stub.EmbedImages(
        types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=b) for b in images]), timeout=10)
    emb_texts = await stub.EmbedTexts(types_pb2.EmbedTextsRequest(texts=prompts), timeout=10)
    return (np.array([e.values for e in emb_images.embeddings]), np.array([e.values for e in emb_texts.embeddings]))


async def test_classify_and_similarity_equal_open_clip(fp32_stack, reference):
    """ONNX Runtime fp32, pinned: the answers of open_clip to 1e-4 in cosine, 1e-3 in probability."""
    engines = await served_engines(fp32_stack.gateway_stub)
    assert {t: (e.engine, precision_name(e.precision)) for t, e in engines.items()} == {
        "vision": ("onnxruntime/CPUExecutionProvider", "fp32"), "text": ("onnxruntime/CPUExecutionProvider", "fp32")}
    images = odd_images()
    ref_image, ref_text, ref_cos, ref_prob, scale = reference_answers(reference, images)

    stub = fp32_stack.gateway_stub
    got_image, got_text = await served_embeddings(stub, images)
    assert (got_image * ref_image).sum(axis=1).min() >= 0.9999
    assert (got_text * ref_text).sum(axis=1).min() >= 0.9999

    sim = await stub.Similarity(gateway_pb2.SimilarityRequest(
        images=[types_pb2.Image(data=b) for b in images], texts=LABELS, template=TEMPLATE), timeout=10)
    got_prob = np.array([r.probabilities for r in sim.rows])
    got_cos = np.array([r.cosine for r in sim.rows])
    np.testing.assert_allclose(got_prob, ref_prob, atol=1e-3)
    np.testing.assert_allclose(got_cos, ref_cos, atol=1e-4)
    np.testing.assert_array_equal(np.argsort(-got_prob, axis=1), np.argsort(-ref_prob, axis=1))

    for row, data in enumerate(images):
        cls = await stub.Classify(gateway_pb2.ClassifyRequest(
            image=types_pb2.Image(data=data), labels=LABELS, template=TEMPLATE), timeout=10)
        np.testing.assert_allclose([s.probability for s in cls.scores], ref_prob[row], atol=1e-3)
        assert [s.index for s in cls.top] == list(np.argsort(-ref_prob[row], kind="stable"))


async def judge_within_precision(stack, reference, images: list[bytes]) -> dict[str, float]:
    """The stack's answers against open_clip's, within what the precision GetModelInfo reports allows:
    each embedding keeps the manifest's cosine bound c for that precision; so an image-text cosine
    moves by at most cosine_shift (sqrt(2 (1 - c)) per tower), a logit by scale times that, and a
    probability by half a logit's move (the softmax's Jacobian has infinity norm <= 1/2) and by at most
    the factor exp(+-2 logit moves); rankings are asserted only between labels whose reference cosines
    differ by more than twice the shift. Returns the bounds used."""
    engines = await served_engines(stack.gateway_stub)
    bound = {tower: embedding_bound(stack.bundle, tower, engine) for tower, engine in engines.items()}
    ref_image, ref_text, ref_cos, ref_prob, scale = reference_answers(reference, images)
    stub = stack.gateway_stub
    got_image, got_text = await served_embeddings(stub, images)
    assert (got_image * ref_image).sum(axis=1).min() >= bound["vision"]
    assert (got_text * ref_text).sum(axis=1).min() >= bound["text"]

    shift = cosine_shift(bound["vision"], bound["text"])
    logit_move = scale * shift
    prob_tolerance = np.minimum(logit_move / 2, ref_prob * np.expm1(2 * logit_move)) + 1e-6  # [N, M]
    ordered = ref_cos[:, :, None] - ref_cos[:, None, :] > 2 * shift  # [N, M, M]: j surely above k

    sim = await stub.Similarity(gateway_pb2.SimilarityRequest(
        images=[types_pb2.Image(data=b) for b in images], texts=LABELS, template=TEMPLATE), timeout=10)
    got_cos = np.array([r.cosine for r in sim.rows])
    got_prob = np.array([r.probabilities for r in sim.rows])
    assert np.abs(got_cos - ref_cos).max() <= shift
    assert (np.abs(got_prob - ref_prob) <= prob_tolerance).all()
    assert (got_prob[:, :, None] > got_prob[:, None, :])[ordered].all()
    for row, data in enumerate(images):
        cls = await stub.Classify(gateway_pb2.ClassifyRequest(
            image=types_pb2.Image(data=data), labels=LABELS, template=TEMPLATE), timeout=10)
        probabilities = np.array([s.probability for s in cls.scores])
        assert (np.abs(probabilities - ref_prob[row]) <= prob_tolerance[row]).all()
        rank = {s.index: position for position, s in enumerate(cls.top)}
        for j, k in zip(*np.nonzero(ordered[row])):
            assert rank[j] < rank[k], (LABELS[j], LABELS[k])
    return bound


async def test_served_answers_agree_with_open_clip_within_their_precision(tiny_stack, reference):
    """The stack as the tests start it (auto, or MEDVLM_TEST_ENGINE), judged at the precision it serves."""
    await judge_within_precision(tiny_stack, reference, odd_images())


async def test_bf16_answers_are_judged_at_the_bf16_bound(bf16_standin_stack, demo_reference):
    """The bf16 branch on any CPU: ONNX Runtime's outputs rounded to bf16, reported as bf16."""
    engines = await served_engines(bf16_standin_stack.gateway_stub)
    assert {precision_name(e.precision) for e in engines.values()} == {"bf16"}
    assert all(e.engine.startswith("bf16-stand-in/onnxruntime/") for e in engines.values())
    samples = [p.read_bytes() for p in sorted((ROOT / "samples").glob("*.png"))]
    assert await judge_within_precision(bf16_standin_stack, demo_reference, samples) == {"vision": 0.998, "text": 0.998}
