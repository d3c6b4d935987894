"""Plain objects of the services: cache, templates, softmax, error table."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from services.common import errors
from services.common.interceptors import status_of
from services.gateway.cache import TextEmbeddingCache
from services.gateway.zeroshot import apply_template, check_template, softmax_rows


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cache_round_trip_and_bundle_isolation():
    cache = TextEmbeddingCache(16)
    vectors = unit(3, 16, 0)
    keys = [("bundle-a", "{}", t) for t in ("x", "y", "z")]
    cache.put(keys, vectors)
    got = cache.get(keys + [("bundle-b", "{}", "x"), ("bundle-a", "a {}", "x")])
    np.testing.assert_array_equal(np.stack(got[:3]), vectors)
    assert got[3] is None and got[4] is None  # another bundle or template never matches
    assert (cache.hits, cache.misses) == (3, 2)
    cache.put(keys[:1], unit(1, 16, 9))  # existing keys keep their first vector
    np.testing.assert_array_equal(cache.get(keys[:1], count=False)[0], vectors[0])
    assert len(cache) == 3


def test_templates_are_replaced_not_formatted():
    assert check_template("", ["a"], 100) == "{}"
    assert apply_template("a photo of {}", "{0.__class__}") == "a photo of {0.__class__}"
    for bad in ("none", "{} {}", "{0}"):
        with pytest.raises(errors.InvalidInput):
            check_template(bad, ["a"], 100)
    with pytest.raises(errors.InvalidInput, match="prompt 1"):
        check_template("x" * 50 + "{}", ["a", "b" * 60], 100)


def test_softmax_rows_is_stable_and_normalized():
    logits = np.array([[1000.0, 1000.0, 0.0], [-5.0, 0.0, 5.0]])
    p = softmax_rows(logits)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0], atol=1e-12)
    assert np.all(np.diff(p[1]) > 0)


def test_every_domain_error_has_its_status():
    assert status_of(errors.InvalidInput("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(errors.NotReady("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(errors.Unavailable("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(errors.Overloaded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(errors.DeadlineExpired("x")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_of(errors.Inconsistent("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(errors.MedvlmError("x")) == grpc.StatusCode.INTERNAL


def test_images_are_split_by_bytes_in_order():
    from medvlm.v1 import types_pb2
    from services.gateway.clients import byte_chunks

    images = [types_pb2.Image(data=bytes([i]) * n) for i, n in enumerate([4, 4, 3, 10, 1, 1])]
    chunks = byte_chunks(images, limit=8)
    assert [[len(im.data) for im in c] for c in chunks] == [[4, 4], [3], [10], [1, 1]]
    assert [im for c in chunks for im in c] == images
