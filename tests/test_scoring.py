"""One scoring path: labels sent in a request are a transient label set, checked by a pure function
and scored by the same exact search as a served set, with today's behaviour of ad hoc labels."""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pytest
from prometheus_client import REGISTRY

from conftest import start_stack
from engines.runtime.bundle import load_bundle
from engines.runtime.calibration import DEFAULT_SCOPE, Calibration, Scope
from medvlm.v1 import encoders_pb2_grpc, gateway_pb2, types_pb2
from services.domain import InvalidInput
from services.gateway.labels import SetEmbeddings, best, softmax, transient_set
from services.gateway.questions import Question, check_question
from services.plumbing.settings import TEXT, VISION, Settings
from test_gateway import classify_request, png_bytes
from test_labelsets import write_set

# --- the pure parts ----------------------------------------------------------------------------------


def test_best_is_the_k_highest_with_ties_in_label_order_at_every_place():
    scores = np.array([0.2, 0.5, 0.5, 0.1, 0.5, 0.9])
    assert best(scores, 1).tolist() == [5]
    assert best(scores, 2).tolist() == [5, 1]  # a tie at the k-th place goes to the first label
    assert best(scores, 3).tolist() == [5, 1, 2]
    assert best(scores, 6).tolist() == [5, 1, 2, 4, 0, 3]
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        values = rng.integers(0, 5, n).astype(np.float64)  # many ties
        for k in range(1, n + 1):
            assert best(values, k).tolist() == np.argsort(-values, kind="stable")[:k].tolist()


def test_a_transient_set_is_scored_as_softmax_over_every_cosine():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(7, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    image = vectors[3] * 0.6 + vectors[5] * 0.4
    image /= np.linalg.norm(image)
    ranked = SetEmbeddings(transient_set([f"l{i}" for i in range(7)], "{}"), vectors).rank(image, 3, 20.0)
    cosine = vectors.astype(np.float64) @ image
    np.testing.assert_allclose(ranked.cosine, cosine, atol=1e-6)
    np.testing.assert_allclose(ranked.probabilities, softmax(20.0 * cosine), atol=1e-6)
    assert ranked.order.tolist() == np.argsort(-cosine, kind="stable")[:3].tolist()


def test_the_question_checks_are_pure_and_refuse_in_order():
    settings = Settings()
    image = types_pb2.Image(data=png_bytes())
    images, asked = check_question(image, Question(labels=("b", "a")), settings)
    assert images == [image]
    assert asked.transient and asked.ref == "" and asked.templates == ("{}",)  # one template, no ensemble
    assert [(label.name, label.code, label.synonyms) for label in asked.labels] == [("b", "", ()), ("a", "", ())]
    assert check_question(image, Question(labels=("b", "a"), template="x {}"), settings)[1].templates == ("x {}",)
    assert check_question(image, Question(label_set="chest", top_k=3), settings) == ([image], None)
    # each case also breaks every rule checked after it: the first broken rule is the one named
    for given, question, needle in [
        (None, Question(labels=("a", "a"), template="bad"), "no image"),
        (image, Question(label_set="x", labels=("a",), template="bad"), "not both"),
        (image, Question(label_set="x", template="a {}"), "brings its own templates"),
        (image, Question(labels=("a",), template="bad"), "at least 2 label"),
        (image, Question(labels=("a", "a"), template="bad"), "distinct"),
        (image, Question(labels=("a", "b"), template="bad"), 'exactly one "{}"'),
        (image, Question(labels=("a", "b" * 2000)), "label 1 has 2000 characters"),
    ]:
        with pytest.raises(InvalidInput, match=needle.replace("(", r"\(").replace("{", r"\{")):
            check_question(given, question, settings)


# --- through the gateway -------------------------------------------------------------------------------


def tag() -> str:
    return uuid.uuid4().hex[:8]


async def encoder_embeddings(stack, texts: list[str], image: bytes) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] text and [D] image embeddings straight from the encoders, not through the gateway."""
    async with stack.encoder_channel(TEXT) as channel:
        reply = await encoders_pb2_grpc.TextEncoderServiceStub(channel).EmbedTexts(
            types_pb2.EmbedTextsRequest(texts=texts), timeout=10)
        text_vectors = np.array([e.values for e in reply.embeddings])
    async with stack.encoder_channel(VISION) as channel:
        reply = await encoders_pb2_grpc.VisionEncoderServiceStub(channel).EmbedImages(
            types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=image)]), timeout=10)
        image_vector = np.array(reply.embeddings[0].values)
    return text_vectors, image_vector


async def test_labels_are_one_prompt_each_in_the_request_template_every_label_listed_in_order(tiny_stack):
    t = tag()
    labels = [f"pleural effusion {t}", f"cardiomegaly {t}", f"normal {t}"]
    template = "an image showing {}"
    image = png_bytes(11)
    reply = await tiny_stack.gateway_stub.Classify(
        classify_request(labels, data=image, template=template, top_k=1), timeout=10)
    info = await tiny_stack.gateway_stub.GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=5)
    prompts, image_vector = await encoder_embeddings(tiny_stack, [f"an image showing {x}" for x in labels], image)
    cosine = prompts @ image_vector  # one prompt per label: no ensemble
    assert reply.label_set == ""
    assert [(s.label, s.index, s.code) for s in reply.scores] == [(x, i, "") for i, x in enumerate(labels)]
    np.testing.assert_allclose([s.cosine for s in reply.scores], cosine, atol=1e-5)
    np.testing.assert_allclose([s.probability for s in reply.scores], softmax(info.model.logit_scale * cosine),
                               atol=1e-5)
    assert [s.index for s in reply.top] == [int(np.argmax(cosine))]
    # the labels alone are another answer, and the reply is nearer the templated one (tiny's random
    # text tower puts every text nearly parallel, so the two can differ by less than 1e-4)
    plain, _ = await encoder_embeddings(tiny_stack, labels, image)
    got = np.array([s.cosine for s in reply.scores])
    assert np.abs(got - cosine).max() < np.abs(got - plain @ image_vector).max()
    # what the gateway holds: one embedding per label, of the templated prompt, and none of the label alone
    core = tiny_stack.gateway.app.core
    cached = core.cache.get([(core.model.text_key, template, x) for x in labels], count=False)
    np.testing.assert_allclose(np.stack(cached), prompts, atol=1e-5)
    assert core.cache.get([(core.model.text_key, "{}", x) for x in labels], count=False) == [None] * 3


async def test_tied_labels_are_listed_in_request_order_at_the_top_k_cut_too(tiny_stack):
    t = tag()
    # a trailing space tokenizes away: two distinct labels, one token sequence, one embedding
    first, second, other = f"effusion {t}", f"effusion {t} ", f"nodule {t}"
    stub = tiny_stack.gateway_stub
    reply = await stub.Classify(classify_request([first, second, other], data=png_bytes(12)), timeout=10)
    assert reply.scores[0].cosine == reply.scores[1].cosine  # the tie this test is about
    assert reply.scores[0].probability == reply.scores[1].probability
    order = [s.index for s in reply.top]
    assert order.index(1) == order.index(0) + 1
    cut = order.index(0) + 1  # top_k ending between the tied labels
    reply = await stub.Classify(classify_request([first, second, other], data=png_bytes(12), top_k=cut), timeout=10)
    assert [s.index for s in reply.top] == order[:cut]
    swapped = await stub.Classify(classify_request([second, first, other], data=png_bytes(12)), timeout=10)
    assert [s.label for s in swapped.top] == [[second, first, other][i] for i in order]


def adhoc_lookups() -> dict[str, float]:
    return {r: REGISTRY.get_sample_value("medvlm_label_cache_total", {"cache": "adhoc", "result": r}) or 0.0
            for r in ("hit", "miss")}


async def test_label_embeddings_are_cached_per_text_tower_template_and_label_across_requests(tiny_stack):
    t = tag()
    labels = [f"consolidation {t}", f"atelectasis {t}", f"edema {t}"]
    stub = tiny_stack.gateway_stub

    async def counted(call) -> dict[str, float]:
        before = adhoc_lookups()
        await call
        after = adhoc_lookups()
        return {r: after[r] - before[r] for r in after}

    assert await counted(stub.Classify(classify_request(labels), timeout=10)) == {"hit": 0, "miss": 3}
    assert await counted(stub.Classify(classify_request(labels[::-1], data=png_bytes(3)), timeout=10)) == {
        "hit": 3, "miss": 0}
    assert await counted(stub.Classify(classify_request(labels, template="{}"), timeout=10)) == {"hit": 3, "miss": 0}
    similarity = stub.Similarity(gateway_pb2.SimilarityRequest(
        images=[types_pb2.Image(data=png_bytes())], texts=labels[:2]), timeout=10)
    assert await counted(similarity) == {"hit": 2, "miss": 0}  # one cache for every RPC
    assert await counted(stub.Classify(classify_request(labels, template="x {}"), timeout=10)) == {
        "hit": 0, "miss": 3}
    core = tiny_stack.gateway.app.core
    for template in ("{}", "x {}"):
        assert all((core.model.text_key, template, label) in core.cache for label in labels)
    assert core.model.text_key.startswith(core.model.bundle_id + "|")  # bundle, precision, engine


@pytest.fixture(scope="module")
async def calibrated_tiny_stack(tiny_bundle, tmp_path_factory):
    """The tiny bundle with a small calibration of its own: scope "pair" fitted on labels a, b with
    the plain template, scope "calibrated@1" for a served set of that name, the bundle's for the rest."""
    folder = tmp_path_factory.mktemp("scoring")
    dim = load_bundle(tiny_bundle).manifest.embed_dim
    centroids = np.random.default_rng(2).normal(size=(3, dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    bundle_scope = Scope(name=DEFAULT_SCOPE, template="{}", labels=("a", "b", "c"), temperature=1.0,
                         ood_threshold=1e9, min_probability=0.0, fitted_on=3)
    calibration = Calibration(
        bundle_id=load_bundle(tiny_bundle).bundle_id, version="2026-01-01T00:00:00Z", data="test",
        classes=("a", "b", "c"), centroids=centroids, precision=np.eye(dim, dtype=np.float32),
        scopes=(bundle_scope, dataclasses.replace(bundle_scope, name="pair", labels=("a", "b"), temperature=2.0),
                dataclasses.replace(bundle_scope, name="calibrated@1", labels=("a", "c"), temperature=4.0)),
        report={})
    path = calibration.write(folder / "calibration.json")
    sets = folder / "labelsets"
    sets.mkdir()
    write_set(sets, "calibrated.yaml", name="calibrated", labels=["a", "c"])
    write_set(sets, "other.yaml", name="other", labels=["a", "b"])
    stack = await start_stack(tiny_bundle, calibration=str(path), label_sets_dir=str(sets))
    yield stack
    await stack.stop()


async def test_the_calibration_scope_is_chosen_by_the_labels_and_the_template(calibrated_tiny_stack):
    stub = calibrated_tiny_stack.gateway_stub
    info = await stub.GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=5)

    async def scope_of(**asked) -> tuple[str, float]:
        reply = await stub.Classify(gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=png_bytes(4)), **asked),
                                    timeout=30)
        listed = reply.scores or reply.top
        cosine = np.array([s.cosine for s in sorted(listed, key=lambda s: s.index)])
        calibrated = np.array([s.calibrated_probability for s in sorted(listed, key=lambda s: s.index)])
        np.testing.assert_allclose(calibrated, softmax(info.model.logit_scale * cosine / reply.trust.temperature),
                                   atol=1e-5)
        return reply.trust.scope, reply.trust.temperature

    assert await scope_of(labels=["a", "b"]) == ("pair", 2.0)
    assert await scope_of(labels=["b", "a"], template="{}") == ("pair", 2.0)  # any order, "" is "{}"
    assert await scope_of(labels=["a", "b"], template="an image of {}") == (DEFAULT_SCOPE, 1.0)
    assert await scope_of(labels=["a", "b", "c"]) == (DEFAULT_SCOPE, 1.0)
    # labels and template choose among every fitted scope, a served set's too
    assert await scope_of(labels=["c", "a"]) == ("calibrated@1", 4.0)
    assert await scope_of(labels=["c", "a"], template="an image of {}") == (DEFAULT_SCOPE, 1.0)
    assert await scope_of(label_set="calibrated") == ("calibrated@1", 4.0)
    assert await scope_of(label_set="other") == (DEFAULT_SCOPE, 1.0)  # its labels match "pair", its name nothing
