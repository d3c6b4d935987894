"""The Python client against the real local stack (tiny and demo bundles on port 0), and over real TLS."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from conftest import ROOT, start_stack
from medvlm.client import (
    AsyncClient, Client, ConnectionSettings, InvalidInput, Unavailable, load_image,
    settings_from, sniff,
)
from medvlm.client._errors import UnrecognizedFile
from medvlm.v1 import gateway_pb2

SAMPLES = ROOT / "samples"
CHEST = ["normal chest radiograph", "left pleural effusion", "right pleural effusion", "cardiomegaly",
         "pneumothorax", "lobar consolidation"]


def png_bytes(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(tmp_path: Path, with_pixels: bool) -> bytes:
    """A Part 10 file made with pydicom; PatientName is a canary that must never come back."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "OT", "CANARY^PATIENT", "CANARY-ID-77"
    if with_pixels:
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = bytes(range(256))
    path = tmp_path / ("with.dcm" if with_pixels else "without.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


# ----------------------------------------------------------------------------- without a server

def test_sniff_by_content(tmp_path):
    assert sniff(png_bytes(0)) == "png"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    assert sniff(buf.getvalue()) == "jpeg"
    assert sniff(dicom_bytes(tmp_path, with_pixels=True)) == "dicom"
    assert sniff(b"patient notes, not an image") is None
    # the name says PNG, the content says text: the content wins
    fake = tmp_path / "scan.png"
    fake.write_text("hello")
    with pytest.raises(UnrecognizedFile):
        load_image(fake)
    loaded = load_image(SAMPLES / "chest_normal.png")
    assert loaded.sha256 == hashlib.sha256((SAMPLES / "chest_normal.png").read_bytes()).hexdigest()


def test_settings_from_flags_and_variables(tmp_path):
    import argparse

    from medvlm.client._settings import add_connection_flags

    parser = argparse.ArgumentParser()
    add_connection_flags(parser)
    env = {"MEDVLM_TARGET": "gw:443", "MEDVLM_TIMEOUT_S": "5", "MEDVLM_TLS": "yes", "MEDVLM_RETRY_ATTEMPTS": "2"}
    settings = settings_from(parser.parse_args(["--timeout-s", "7"]), env)
    assert (settings.target, settings.timeout_s, settings.tls, settings.retry_attempts) == ("gw:443", 7.0, True, 2)
    with pytest.raises(ValueError, match="MEDVLM_TLS"):
        settings_from(parser.parse_args([]), {"MEDVLM_TLS": "maybe"})
    with pytest.raises(ValueError, match="TLS"):
        settings_from(parser.parse_args(["--token", "abc"]), {})
    with pytest.raises(ValueError, match="client-key"):
        settings_from(parser.parse_args(["--client-cert", "c.pem"]), {})


def test_retries_only_unavailable_and_never_the_stream():
    config = ConnectionSettings(retry_attempts=4).service_config()["methodConfig"][0]
    assert config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["retryPolicy"]["maxAttempts"] == 4
    methods = {n["method"] for n in config["name"] if n["service"] == "medvlm.v1.GatewayService"}
    assert "Classify" in methods and "ClassifyStream" not in methods
    assert "retryPolicy" not in ConnectionSettings(retry_attempts=1).service_config()["methodConfig"][0]


# ----------------------------------------------------------------------------- against the stack

async def test_sync_client_calls(tiny_stack):
    sample = SAMPLES / "chest_normal.png"

    def calls():
        with Client(tiny_stack.target) as client:
            return (client.health(), client.model_info(), client.classify(sample, CHEST[:3], top_k=2),
                    client.similarity([sample, sample.read_bytes()], ["a", "b", "c"]),
                    client.embed_images([sample]), client.embed_texts(["x", "y"]))

    status, info, result, sim, images, texts = await asyncio.to_thread(calls)
    assert status == "SERVING"
    assert info.kind == "test" and info.engines and info.bundle_id
    assert [s.label for s in result.scores] == CHEST[:3] and [s.index for s in result.scores] == [0, 1, 2]
    assert len(result.top) == 2 and result.top[0].probability >= result.top[1].probability
    assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert result.image_sha256 == hashlib.sha256(sample.read_bytes()).hexdigest()
    assert result.bundle_id == info.bundle_id
    assert sim.cosine.shape == sim.probabilities.shape == (2, 3)
    np.testing.assert_allclose(sim.cosine[0], sim.cosine[1], atol=1e-6)  # same image as path and as bytes
    assert images.matrix.shape == (1, info.embed_dim) and texts.matrix.shape == (2, info.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(texts.matrix, axis=1), 1.0, atol=1e-4)
    assert texts.items[0].input_sha256 == hashlib.sha256(b"x").hexdigest()


async def test_errors_carry_the_servers_status_and_message(tiny_stack):
    def bad_image():
        with Client(tiny_stack.target) as client:
            client.classify(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ["a", "b"])

    with pytest.raises(InvalidInput) as caught:
        await asyncio.to_thread(bad_image)
    assert caught.value.code == "INVALID_ARGUMENT" and "PNG" in caught.value.message
    assert re.fullmatch(r"[0-9a-f]{32}", caught.value.request_id)

    async with AsyncClient(tiny_stack.target) as client:
        with pytest.raises(InvalidInput, match="label"):
            await client.classify(SAMPLES / "chest_normal.png", ["only one"])
        with pytest.raises(ValueError):
            await client.classify(SAMPLES / "chest_normal.png")
        with pytest.raises(ValueError):
            await client.classify(SAMPLES / "chest_normal.png", CHEST, label_set="chest-findings@1")
        with pytest.raises(InvalidInput, match="label set"):  # this stack serves none
            await client.classify(SAMPLES / "chest_normal.png", label_set="chest-findings@1")


@pytest.fixture(scope="module")
async def stack_with_label_sets(demo_bundle, tmp_path_factory):
    stack = await start_stack(demo_bundle, label_sets_dir=str(ROOT / "labelsets"),
                              data_dir=str(tmp_path_factory.mktemp("label-set-store")))
    yield stack
    await stack.stop()


async def test_label_sets_listed_and_classified_with_codes(stack_with_label_sets):
    async with AsyncClient(stack_with_label_sets.target) as client:
        names = await client.label_sets()
        assert {"chest-findings@1", "skin-findings@1", "fundus-findings@1"} <= set(names)
        result = await client.classify(SAMPLES / "chest_left_effusion.png", label_set="chest-findings", top_k=2)
    assert result.top[0].label == "left pleural effusion" and result.top[0].code.startswith("demo:")
    assert len(result.top) == 2 and result.top[0].probability > result.top[1].probability


async def test_unavailable_after_retries():
    async with AsyncClient("127.0.0.1:1", retry_attempts=3, timeout_s=5) as client:
        with pytest.raises(Unavailable):
            await client.model_info()


async def test_async_worklist_good_and_bad_items(tiny_stack, tmp_path):
    corrupt = png_bytes(1)[:60]
    items = [("good-0", SAMPLES / "chest_normal.png"), ("text", b"not an image at all"),
             ("corrupt", corrupt), ("good-1", png_bytes(2)), ("missing", tmp_path / "nope.png"),
             ("good-2", SAMPLES / "derm_naevus.png")]
    async with AsyncClient(tiny_stack.target) as client:
        results = {r.id: r async for r in client.classify_worklist(items, CHEST, top_k=1, window=2)}
    assert set(results) == {i for i, _ in items}
    assert all(results[f"good-{k}"].ok for k in range(3))
    assert results["good-1"].sha256 == hashlib.sha256(png_bytes(2)).hexdigest()
    assert results["text"].error.code == "UNRECOGNIZED_FILE"
    assert results["missing"].error.code == "UNREADABLE_FILE"
    assert results["corrupt"].error.code == "INVALID_ARGUMENT" and results["corrupt"].error.message


async def test_sync_worklist_keeps_at_most_window_items_in_flight(tiny_stack):
    window, count = 3, 40
    pulled = 0
    peak = 0

    def items():
        nonlocal pulled
        for i in range(count):
            pulled += 1
            yield str(i), png_bytes(100 + i, size=32)

    def run():
        nonlocal peak
        answered = 0
        with Client(tiny_stack.target) as client:
            for result in client.classify_worklist(items(), ["a", "b"], window=window):
                assert result.ok, result.error
                peak = max(peak, pulled - answered)
                answered += 1
        return answered

    assert await asyncio.to_thread(run) == count
    # the request side reads one item ahead of the slot it waits for, and a slot is freed just before
    # its answer reaches this loop (which counts it answered only then): bounded, not a growing backlog
    assert peak <= window + 2


async def test_demo_answers_through_the_client(demo_stack):
    async with AsyncClient(demo_stack.target) as client:
        for key, label in [("chest_left_effusion", "left pleural effusion"), ("chest_cardiomegaly", "cardiomegaly")]:
            result = await client.classify(SAMPLES / f"{key}.png", CHEST, top_k=1)
            assert result.best.label == label


# ----------------------------------------------------------------------------- README examples

def readme_blocks(section: str, language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


async def test_readme_python_client_examples_run(demo_stack):
    blocks = readme_blocks("Python client", "python")
    assert len(blocks) == 2
    outputs = []
    for code in blocks:
        code = code.replace("127.0.0.1:50050", demo_stack.target)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={"PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}", "PATH": "/usr/bin:/bin"})
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        outputs.append(out.decode().splitlines())
    sync_lines, async_lines = outputs
    label, probability, bundle = sync_lines[0].rsplit(" ", 2)
    assert label == "left pleural effusion" and float(probability) > 0.5 and bundle.startswith("demo-")
    answers = dict(line.split(" ", 1) for line in sync_lines[1:-1])
    assert len(answers) == len(list(SAMPLES.glob("chest_*.png")))
    assert answers["chest_normal.png"] == "normal chest radiograph"
    assert answers["chest_left_effusion.png"] == "left pleural effusion"
    assert answers["chest_cardiomegaly.png"] == "cardiomegaly"
    assert sync_lines[-1].startswith("INVALID_ARGUMENT ")
    assert async_lines[0].split()[1] == "demo" and async_lines[1] == "(2, 128)"


# ----------------------------------------------------------------------------- TLS and tokens

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=medvlm test CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, subject, ext in [("server", "/CN=localhost", ["-extfile", "server.ext"]),
                               ("client", "/CN=integration-engine", [])]:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subject, cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)
    (d / "token").write_text("test-token-123\n")
    return d


class _RecordAuthorization(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def intercept_service(self, continuation, details):
        self.seen += [v for k, v in details.invocation_metadata if k == "authorization"]
        return await continuation(details)


async def test_tls_client_certificate_and_token(pki):
    """The client's TLS, client certificate and token options against a real gRPC TLS server with
    client authentication required (the health service stands in for the gateway's: the servers'
    own TLS is another change)."""
    recorder = _RecordAuthorization()
    server = grpc.aio.server(interceptors=[recorder])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        options = dict(ca_cert=str(pki / "ca.pem"), client_cert=str(pki / "client.pem"),
                       client_key=str(pki / "client.key"), server_name="localhost", timeout_s=10)
        async with AsyncClient(f"127.0.0.1:{port}", token_file=str(pki / "token"), **options) as client:
            assert await client.health() == "SERVING"
        assert recorder.seen == ["Bearer test-token-123"]

        for refused in [dict(), dict(ca_cert=str(pki / "ca.pem"), server_name="localhost", timeout_s=5),
                        dict(tls=True, client_cert=str(pki / "client.pem"), client_key=str(pki / "client.key"),
                             server_name="localhost", timeout_s=5)]:
            # plaintext; TLS without a client certificate; a client that does not trust the CA
            async with AsyncClient(f"127.0.0.1:{port}", retry_attempts=1, **refused) as client:
                with pytest.raises(Unavailable):
                    await client.health()
        assert recorder.seen == ["Bearer test-token-123"]
    finally:
        await server.stop(0)


# ----------------------------------------------------------------------------- display options and trust

DICOM_SAMPLE = SAMPLES / "chest_left_effusion.dcm"  # a synthetic CT object with a window of its own


def test_display_options_go_on_the_wire_and_are_checked():
    from medvlm.client import WINDOW_PRESETS, Window
    from medvlm.v1 import types_pb2

    assert WINDOW_PRESETS == ("lung", "mediastinum", "bone", "brain", "abdomen")
    plain = load_image(DICOM_SAMPLE).to_proto()
    assert plain.format == types_pb2.IMAGE_FORMAT_DICOM
    assert load_image(SAMPLES / "chest_normal.png").to_proto().format == types_pb2.IMAGE_FORMAT_PNG
    assert not plain.HasField("window") and plain.window_preset == 0 and not plain.HasField("frame")
    lung = load_image(DICOM_SAMPLE, window_preset="lung", frame=0)
    wire = lung.to_proto()
    assert wire.window_preset == types_pb2.WINDOW_PRESET_LUNG and wire.HasField("frame") and wire.frame == 0
    # options given again replace the image's own: a window replaces the preset
    windowed = load_image(lung, window=Window.parse("-40,400"))
    assert (windowed.window, windowed.window_preset, windowed.frame) == (Window(-40.0, 400.0), None, 0)
    assert (windowed.to_proto().window.center, windowed.to_proto().window.width) == (-40.0, 400.0)
    assert windowed.to_proto().window_preset == 0
    for bad in ("40", "40,0", "a,b", "1,2,3", "nan,10"):
        with pytest.raises(ValueError, match="window"):
            Window.parse(bad)
    with pytest.raises(ValueError, match="not both"):
        load_image(DICOM_SAMPLE, window=Window(40, 400), window_preset="lung")
    with pytest.raises(ValueError, match="one of lung"):
        load_image(DICOM_SAMPLE, window_preset="liver")
    with pytest.raises(ValueError, match="from 0"):
        load_image(DICOM_SAMPLE, frame=-1)


@pytest.fixture(scope="module")
async def calibrated_stack(demo_bundle, demo_calibration):
    stack = await start_stack(demo_bundle, calibration=str(demo_calibration))
    yield stack
    await stack.stop()


async def test_trust_abstain_and_calibrated_probabilities(calibrated_stack, demo_calibration, tiny_stack):
    from engines.runtime.calibration import Calibration
    from medvlm.client import AbstainReason
    from medvlm.v1 import types_pb2

    calibration_id = Calibration.read(demo_calibration).calibration_id
    chest, derm = SAMPLES / "chest_left_effusion.png", SAMPLES / "derm_naevus.png"
    async with AsyncClient(calibrated_stack.target) as client:
        trusted = await client.classify(chest, CHEST)
        foreign = await client.classify(derm, CHEST)
        streamed = {r.id: r async for r in client.classify_worklist([("chest", chest), ("derm", derm)], CHEST)}
    # the client's dataclasses carry exactly what the gateway sent
    for result, path in ((trusted, chest), (foreign, derm)):
        raw = await calibrated_stack.gateway_stub.Classify(
            gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=path.read_bytes()), labels=CHEST), timeout=60)
        assert [s.calibrated_probability for s in result.scores] == [s.calibrated_probability for s in raw.scores]
        assert [s.probability for s in result.scores] == [s.probability for s in raw.scores]
        assert result.abstain == raw.abstain
        assert result.trust is not None and result.trust.ood_score == raw.trust.ood_score
        assert (result.trust.scope, result.trust.calibration_id) == ("chest", calibration_id)
        assert result.best.shown_probability == result.best.calibrated_probability
    assert trusted.best.label == "left pleural effusion"
    assert not trusted.abstain and trusted.abstain_reason is AbstainReason.NONE
    # a dermoscopy image against chest labels: withheld as out of distribution
    assert foreign.abstain and foreign.abstain_reason is AbstainReason.OUT_OF_DISTRIBUTION
    assert foreign.trust.ood_score > foreign.trust.ood_threshold
    # stream items carry the same
    assert streamed["derm"].result.abstain_reason is AbstainReason.OUT_OF_DISTRIBUTION
    assert streamed["chest"].result.trust == trusted.trust and not streamed["chest"].result.abstain

    # without a calibration: no trust, no calibrated probability, never abstains
    with Client(tiny_stack.target) as plain_client:
        plain = await asyncio.to_thread(plain_client.classify, chest, CHEST[:3])
    assert plain.trust is None and not plain.calibrated and not plain.abstain
    assert all(s.calibrated_probability is None and s.shown_probability == s.probability for s in plain.scores)


async def test_dicom_window_options_reach_the_encoder(calibrated_stack):
    from medvlm.client import Window
    from medvlm.v1 import types_pb2

    async with AsyncClient(calibrated_stack.target) as client:
        default, lung, same_as_lung = (await client.embed_images([
            DICOM_SAMPLE, load_image(DICOM_SAMPLE, window_preset="lung"),
            load_image(DICOM_SAMPLE, window=Window(-600, 1500))])).matrix
        result = await client.classify(load_image(DICOM_SAMPLE, window_preset="bone"), CHEST)
        with pytest.raises(InvalidInput, match="greyscale"):  # a window on a colour PNG: the server refuses
            await client.classify(load_image(SAMPLES / "derm_naevus.png", window=Window(40, 400)), CHEST)
        with pytest.raises(InvalidInput, match="frame"):  # a frame beyond the single one
            await client.classify(load_image(DICOM_SAMPLE, frame=3), CHEST)
    assert float(default @ lung) < 0.9999  # the window changed what the model saw
    np.testing.assert_allclose(lung, same_as_lung, atol=1e-6)  # the preset is that window
    raw = await calibrated_stack.gateway_stub.Classify(gateway_pb2.ClassifyRequest(
        image=types_pb2.Image(data=DICOM_SAMPLE.read_bytes(), window_preset=types_pb2.WINDOW_PRESET_BONE),
        labels=CHEST), timeout=60)
    assert [s.probability for s in result.scores] == [s.probability for s in raw.scores]
