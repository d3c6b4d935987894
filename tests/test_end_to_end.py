"""Through the real gateway and encoders, answers equal in-process open_clip torch on the same inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

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


async def test_classify_and_similarity_equal_open_clip(tiny_stack, reference):
    images = odd_images()
    prompts = [TEMPLATE.replace("{}", label) for label in LABELS]
    ref_image, ref_text = torch_embeddings(reference, images, prompts)
    scale = float(reference.model.logit_scale.detach().exp())
    ref_cos = ref_image @ ref_text.T  # [N, M]
    ref_prob = torch.softmax(torch.from_numpy(scale * ref_cos), dim=1).numpy()

    stub = tiny_stack.gateway_stub
    emb_images = await stub.EmbedImages(
        types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=b) for b in images]), timeout=10)
    emb_texts = await stub.EmbedTexts(types_pb2.EmbedTextsRequest(texts=prompts), timeout=10)
    got_image = np.array([e.values for e in emb_images.embeddings])
    got_text = np.array([e.values for e in emb_texts.embeddings])
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
