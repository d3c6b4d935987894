"""The fault matrix's loads against the stack's bounds: its steady loads fit the defaults, so a
RESOURCE_EXHAUSTED there is a defect of the stack, and its flood does not, so the flood row tests refusal."""

from __future__ import annotations

import pytest

from bench import faults
from bench.stress import MixedLoad
from services.plumbing.settings import GATEWAY, TEXT, VISION, Settings


@pytest.mark.parametrize("load", [faults.STEADY_LOAD, faults.CACHED_LOAD, faults.STREAMS_LOAD],
                         ids=["steady", "cached", "streams"])
def test_the_matrix_steady_loads_stay_within_the_default_bounds(load):
    gateway, vision = Settings(service=GATEWAY), Settings(service=VISION, bundle="b")
    mixed = MixedLoad("127.0.0.1:1", **load)
    calls, images = mixed.encoder_peak(gateway.stream_window)
    assert mixed.workers <= gateway.inflight_limit
    assert calls <= vision.inflight_limit, f"{calls} encoder calls at once; the encoder admits {vision.inflight_limit}"
    assert images <= vision.max_queue, f"{images} images at once; the encoder admits {vision.max_queue}"


def test_the_flood_exceeds_the_gateway_bound():
    assert faults.FLOOD_CALLS > Settings(service=GATEWAY).inflight_limit


def test_an_encoder_admits_every_call_its_item_bound_admits():
    """One gate for one queue: an encoder's call bound (0: derived) never refuses a call that its item
    bound (--max-queue) and the items being computed leave room for; --max-inflight still overrides it."""
    for service in (VISION, TEXT):
        settings = Settings(service=service, bundle="b", max_queue=100, max_batch=8, engine_calls=2)
        assert settings.inflight_limit == 100 + 2 * 8
        assert Settings(service=service, bundle="b", max_inflight=5).inflight_limit == 5
    assert Settings(service=GATEWAY).inflight_limit == 64


def test_encoder_peak_counts_a_stream_window_of_calls_per_worker():
    load = MixedLoad("127.0.0.1:1", workers=3, mix=(("classify", 1), ("similarity", 1), ("stream", 1)), stream_items=5)
    assert load.encoder_peak(stream_window=16) == (3 * 5, 3 * 5)  # a stream of 5 items: 5 calls of 1 image
    assert load.encoder_peak(stream_window=2) == (3 * 2, 3 * 3)  # window 2: 2 calls; Similarity's 3 images
