"""Answers that say when not to trust them: calibration file, abstain decisions, and the gateway
serving them over real encoders of the demo bundle."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json

import grpc
import numpy as np
import pytest
import structlog
from PIL import Image

from conftest import CALIBRATION_PER_CLASS, gateway_settings, health_status, start_server, start_stack
from engines.runtime.calibration import DEFAULT_SCOPE, Calibration, CalibrationError, Scope
from medvlm.v1 import gateway_pb2, types_pb2
from services.gateway.app import GatewayApp
from services.gateway.labels import transient_set
from services.gateway.trust import LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, Trust
from services.plumbing.server import NOT_SERVING

CHEST = "chest"
PER_CLASS = CALIBRATION_PER_CLASS  # demo calibration images per class (conftest's demo_calibration)
HELD_OUT_SEED = 1000


# ----------------------------------------------------------------------------- file and decisions


def small_calibration(bundle_id: str = "demo-x+000000000000") -> Calibration:
    """Two classes on the axes of a 3-d space, identity precision: distances are plain Euclidean."""
    scope = Scope(name="pair", template="{}", labels=("a", "b"), temperature=2.0, ood_threshold=0.5,
                  min_probability=0.6, fitted_on=10)
    default = dataclasses.replace(scope, name=DEFAULT_SCOPE, labels=("a", "b", "c"), temperature=1.0,
                                  ood_threshold=0.9)
    return Calibration(bundle_id=bundle_id, version="2026-01-01T00:00:00Z", data="test",
                       classes=("a", "b", "c"), centroids=np.eye(3, dtype=np.float32),
                       precision=np.eye(3, dtype=np.float32), scopes=(default, scope), report={})


def test_calibration_round_trips_and_refuses_tampering_and_other_bundles(tmp_path):
    path = small_calibration().write(tmp_path / "calibration.json")
    again = Calibration.read(path, "demo-x+000000000000")
    assert again.sha256 == small_calibration().sha256
    assert again.scope_for(["b", "a"], "{}").name == "pair"
    assert again.scope_for(["a", "b"], "a photo of {}").name == DEFAULT_SCOPE
    with pytest.raises(CalibrationError, match="fitted for bundle demo-x"):
        Calibration.read(path, "demo-y+111111111111")
    data = json.loads(path.read_text())
    data["scopes"][1]["ood_threshold"] = 99.0
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="sha256"):
        Calibration.read(path)


def test_judge_abstains_out_of_distribution_and_on_low_confidence():
    trust = Trust(small_calibration())
    near_a = np.array([0.9, 0.1, 0.0], np.float32)
    pair = transient_set(["a", "b"], "{}")
    confident = trust.judge(np.array([0.9, 0.1]), near_a, pair, logit_scale=10.0)
    assert (confident.abstain, confident.reason, confident.scope) == (False, "", "pair")
    assert confident.calibrated.sum() == pytest.approx(1.0)
    assert confident.calibrated[0] == pytest.approx(1 / (1 + np.exp(-10.0 * 0.8 / 2.0)))
    unsure = trust.judge(np.array([0.5, 0.45]), near_a, pair, logit_scale=10.0)
    assert (unsure.abstain, unsure.reason) == (True, LOW_CONFIDENCE)
    # near class "c": inside the bundle's classes, but not near the label set's
    near_c = np.array([0.0, 0.1, 0.9], np.float32)
    foreign = trust.judge(np.array([0.9, 0.1]), near_c, pair, logit_scale=10.0)
    assert (foreign.abstain, foreign.reason) == (True, OUT_OF_DISTRIBUTION)
    anywhere = trust.judge(np.array([0.9, 0.1]), near_c, transient_set(["a", "x"], "{}"), logit_scale=10.0)
    assert (anywhere.scope, anywhere.reason) == (DEFAULT_SCOPE, "")


# ----------------------------------------------------------------------------- demo bundle


@pytest.fixture(scope="module")
async def demo_trust_stack(demo_bundle, demo_calibration):
    stack = await start_stack(demo_bundle, calibration=str(demo_calibration))
    yield stack
    await stack.stop()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def held_out(modality: str, per_class: int) -> list[bytes]:
    from engines.build import synthetic

    images, labels = synthetic.generate(HELD_OUT_SEED, per_class * synthetic.NUM_CLASSES)
    return [png(im) for im, y in zip(images, labels, strict=True) if synthetic.FINDINGS[y].modality == modality]


def label_set(modality: str) -> list[str]:
    from engines.build import synthetic

    return [f.label for f in synthetic.FINDINGS if f.modality == modality]


async def classify_all(stub, images: list[bytes], labels: list[str]) -> list[gateway_pb2.ClassifyResponse]:
    calls = [stub.Classify(gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=d), labels=labels), timeout=60)
             for d in images]
    return list(await asyncio.gather(*calls))


def test_fitted_calibration_covers_each_modality_and_lowers_ece(demo_calibration):
    calibration = Calibration.read(demo_calibration)
    assert [s.name for s in calibration.scopes] == [DEFAULT_SCOPE, "chest", "derm", "fundus"]
    for scope in calibration.scopes:
        figures = calibration.report[scope.name]
        assert figures["images"] == PER_CLASS * len(scope.labels)
        assert figures["ece_after"] <= figures["ece_before"], scope.name
        assert scope.temperature > 0 and scope.ood_threshold > 0


async def test_in_distribution_answers_are_trusted_with_calibrated_probabilities(demo_trust_stack, demo_calibration):
    responses = await classify_all(demo_trust_stack.gateway_stub, held_out(CHEST, 3), label_set(CHEST))
    calibration_id = Calibration.read(demo_calibration).calibration_id
    flagged = [r for r in responses if r.abstain_reason == gateway_pb2.ABSTAIN_REASON_OUT_OF_DISTRIBUTION]
    assert len(flagged) <= 1, [r.trust.ood_score for r in flagged]
    for r in responses:
        assert r.HasField("trust") and r.trust.scope == CHEST and r.trust.calibration_id == calibration_id
        raw = [s.probability for s in r.scores]
        calibrated = [s.calibrated_probability for s in r.scores]
        assert sum(calibrated) == pytest.approx(1.0, abs=1e-5)
        assert int(np.argmax(calibrated)) == int(np.argmax(raw))  # calibration never changes the answer
        assert r.top[0].calibrated_probability == pytest.approx(max(calibrated))
        assert r.abstain == (r.abstain_reason != gateway_pb2.ABSTAIN_REASON_UNSPECIFIED)


async def test_other_modalities_noise_and_photo_like_images_are_flagged(demo_trust_stack):
    stub = demo_trust_stack.gateway_stub
    rng = np.random.default_rng(7)
    strange = [png(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(4)]
    strange += [png(np.full((160, 200, 3), rng.integers(0, 256, 3), np.uint8)) for _ in range(3)]
    xx = np.mgrid[0:224, 0:224][1] / 224.0
    strange += [png((255 * (0.5 + 0.5 * np.sin(xx[..., None] * rng.uniform(2, 40, 3)))).astype(np.uint8))
                for _ in range(3)]
    cases = [(held_out("derm", 2) + held_out("fundus", 2) + strange, label_set(CHEST)),
             (held_out(CHEST, 1) + held_out("fundus", 2) + strange, label_set("derm")),
             (held_out(CHEST, 1) + held_out("derm", 2) + strange, label_set("fundus"))]
    for images, labels in cases:
        responses = await classify_all(stub, images, labels)
        ood = [r.abstain and r.abstain_reason == gateway_pb2.ABSTAIN_REASON_OUT_OF_DISTRIBUTION for r in responses]
        assert np.mean(ood) >= 0.9, (labels, [round(r.trust.ood_score, 2) for r in responses])
        assert all(r.trust.ood_score > r.trust.ood_threshold for r, o in zip(responses, ood, strict=True) if o)


async def test_stream_items_carry_the_same_trust(demo_trust_stack):
    images = held_out(CHEST, 1)[:2] + held_out("derm", 1)[:1]
    unary = await classify_all(demo_trust_stack.gateway_stub, images, label_set(CHEST))

    async def items():
        for i, data in enumerate(images):
            request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=data),
                                                  labels=label_set(CHEST) if i == 0 else [])
            yield gateway_pb2.ClassifyStreamRequest(correlation_id=str(i), request=request)

    streamed = {m.correlation_id: m.result async for m in demo_trust_stack.gateway_stub.ClassifyStream(items(), timeout=60)}
    for i, r in enumerate(unary):
        assert streamed[str(i)].abstain == r.abstain and streamed[str(i)].abstain_reason == r.abstain_reason
        assert streamed[str(i)].trust.ood_score == pytest.approx(r.trust.ood_score, rel=1e-5)
    assert unary[2].abstain_reason == gateway_pb2.ABSTAIN_REASON_OUT_OF_DISTRIBUTION


async def test_calibration_survives_a_restart_and_never_serves_another_bundle(demo_bundle, demo_calibration,
                                                                              demo_trust_stack, tiny_stack):
    image = held_out("fundus", 1)[0]
    before = (await classify_all(demo_trust_stack.gateway_stub, [image], label_set("fundus")))[0]
    restarted = await start_stack(demo_bundle, calibration=str(demo_calibration))
    try:
        after = (await classify_all(restarted.gateway_stub, [image], label_set("fundus")))[0]
    finally:
        await restarted.stop()
    assert after.trust == before.trust and after.abstain == before.abstain
    assert [s.calibrated_probability for s in after.scores] == [s.calibrated_probability for s in before.scores]

    # the demo bundle's calibration given to a gateway in front of the tiny bundle's encoders
    settings = gateway_settings(tiny_stack.vision.port, tiny_stack.text.port, verify_retry_max_s=0.2,
                                calibration=str(demo_calibration))
    with structlog.testing.capture_logs() as logs:
        gateway = await start_server(settings, GatewayApp(settings), wait=False)
        try:
            for _ in range(200):  # bounded wait for the first refused attempt
                if any(e.get("event") == "encoders_not_verified" for e in logs):
                    break
                await asyncio.sleep(0.05)
            assert await health_status(gateway.port) == NOT_SERVING
        finally:
            await gateway.stop(0)
    refusals = [e["reason"] for e in logs if e.get("event") == "encoders_not_verified"]
    assert refusals and all("fitted for bundle demo-" in r for r in refusals)


async def test_without_calibration_there_is_no_trust_and_probabilities_repeat(tiny_stack):
    data = png(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (response,) = await classify_all(tiny_stack.gateway_stub, [data], ["a", "b", "c"])
    assert not response.HasField("trust") and not response.abstain
    assert [s.calibrated_probability for s in response.scores] == [s.probability for s in response.scores]


async def test_bad_input_still_gets_invalid_argument_with_calibration(demo_trust_stack):
    stub = demo_trust_stack.gateway_stub
    bad = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=b"not an image"), labels=label_set(CHEST))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Classify(bad, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (good,) = await classify_all(stub, held_out(CHEST, 1)[:1], label_set(CHEST))
    assert good.HasField("trust")
