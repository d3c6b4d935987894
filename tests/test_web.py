"""The web page in a real headless Chromium (Debian's chromium, driven by Playwright) against a real
demo stack and the page's server in its own process: answers as grpcurl's, errors as the gateway's
message, the synthetic-model banner, keyboard-only use, limits, nothing on disk and nothing clinical
in its logs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import ORT_FP32, ROOT, precision_name, served_engines, start_stack
from medvlm.client import AsyncClient
from medvlm.web import WebSettings
from services.plumbing.settings import GATEWAY, VISION, Settings

SAMPLES = ROOT / "samples"
CHEST = ["normal chest radiograph", "left pleural effusion", "right pleural effusion", "cardiomegaly",
         "pneumothorax", "lobar consolidation"]
GRPCURL = ROOT / ".venv" / "bin" / "grpcurl"


def chromium_executable() -> str | None:
    """Debian's chromium (apt-get install chromium; .ci/run installs it). Playwright's own browser
    downloads are never used."""
    for candidate in (os.environ.get("MEDVLM_CHROMIUM", ""), "/usr/lib/chromium/chromium",
                      shutil.which("chromium")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = chromium_executable()
# CI sets MEDVLM_REQUIRE_BROWSER=1, so there a missing chromium fails the test instead of skipping it.
needs_browser = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("MEDVLM_REQUIRE_BROWSER"),
                                   reason="no chromium: apt-get install chromium (.ci/run does)")


class WebProcess:
    """`python -m medvlm.web` in its own process, in an empty working directory with an empty TMPDIR."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, workdir: Path) -> None:
        self.proc, self.url, self.workdir = proc, url, workdir
        self.log: list[str] = []
        self._drain = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode())

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._drain


@contextlib.asynccontextmanager
async def web_app(gateway_port: int, workdir: Path, *args: str):
    (workdir / "cwd").mkdir(parents=True)
    (workdir / "tmp").mkdir()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}", TMPDIR=str(workdir / "tmp"),
               PYTHONDONTWRITEBYTECODE="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "medvlm.web", "--target", f"127.0.0.1:{gateway_port}", "--port", "0", *args,
        cwd=workdir / "cwd", env=env, stderr=asyncio.subprocess.PIPE)
    url, early = None, []
    try:
        while url is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            if not line:
                raise AssertionError(f"the web app exited: {''.join(early)}")
            early.append(line)
            found = re.search(r"listening on (http://\S+/)", line)
            url = found.group(1) if found else None
        web = WebProcess(proc, url, workdir)
        web.log.extend(early)
        yield web
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


@contextlib.asynccontextmanager
async def browser_page():
    from playwright.async_api import async_playwright

    assert CHROMIUM, "no chromium executable: apt-get install chromium, or set MEDVLM_CHROMIUM"
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 900})
            yield page
        finally:
            await browser.close()


async def grpcurl_classify(port: int, image: bytes, labels: list[str]) -> tuple[int, str]:
    """grpcurl's answer to a Classify call: exit status and output."""
    body = json.dumps({"image": {"data": base64.b64encode(image).decode()}, "labels": labels})
    proc = await asyncio.create_subprocess_exec(
        str(GRPCURL), "-plaintext", "-d", "@", f"127.0.0.1:{port}", "medvlm.v1.GatewayService/Classify",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(body.encode()), 60)
    return proc.returncode, out.decode()


async def focused_id(page) -> str:
    return await page.evaluate("document.activeElement && document.activeElement.id")


def artifacts(tmp_path: Path) -> Path:
    """Where screenshots go: MEDVLM_TEST_ARTIFACTS (CI collects it), else the test's tmp dir."""
    folder = Path(os.environ.get("MEDVLM_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_limits_default_to_the_gateways():
    gateway = Settings(service=GATEWAY)
    assert WebSettings().max_image_bytes == gateway.max_image_bytes
    assert WebSettings().max_images == gateway.max_images
    assert WebSettings().max_image_pixels == Settings(service=VISION).max_image_pixels


@needs_browser
async def test_page_in_a_real_browser(demo_stack, tmp_path):
    port = demo_stack.gateway.port
    sample = (SAMPLES / "chest_left_effusion.png").read_bytes()
    corrupt = sample[:300]  # a PNG signature and header, then nothing: the gateway refuses it
    async with web_app(port, tmp_path / "web") as web, browser_page() as page:
        await page.goto(web.url)
        banner = page.locator("#banner")
        await banner.wait_for(state="visible", timeout=30_000)
        assert "Synthetic, not for clinical use" in await banner.inner_text()
        assert "demo" in await page.locator("#model").inner_text()

        # Label sets are offered only when the gateway lists some; otherwise the page says why not.
        sets_offered = await page.locator("#label-set-row").is_visible()
        if not sets_offered:
            assert "type labels" in await page.locator("#label-set-note").inner_text()

        # Keyboard only: Tab reaches the file input first, then the fields in order, then the button.
        await page.keyboard.press("Tab")
        assert await focused_id(page) == "image"
        await page.locator("#image").set_input_files(
            files=[{"name": "study.png", "mimeType": "image/png", "buffer": sample}])
        order = (["label-set"] if sets_offered else []) + ["labels", "template", "classify-submit"]
        for expected in order:
            await page.keyboard.press("Tab")
            assert await focused_id(page) == expected
            if expected == "labels":
                await page.keyboard.type("\n".join(CHEST))
        await page.keyboard.press("Enter")

        first = page.locator("#ranking tbody tr").first
        await first.wait_for(state="visible", timeout=60_000)
        page_label = await first.locator(".label").inner_text()
        page_probability = await first.locator(".probability .value").inner_text()
        rows = await page.locator("#ranking tbody tr").count()
        assert rows == len(CHEST)
        assert await focused_id(page) == "result-title"
        answered = await page.locator("#answered-by").inner_text()

        code, out = await grpcurl_classify(port, sample, CHEST)
        assert code == 0, out
        direct = json.loads(out)
        best = max(direct["scores"], key=lambda s: s["probability"])
        assert best["label"] == "left pleural effusion" == page_label
        assert page_probability == f"{best['probability']:.3f}"
        assert direct["bundle_id"] in answered
        for tower, engine in (await served_engines(demo_stack.gateway_stub)).items():  # whichever engine serves
            assert f"{tower}: {engine.engine} {precision_name(engine.precision)}" in answered

        # Similarity: the heatmap shows the cosines the gateway computes.
        images = [SAMPLES / "chest_left_effusion.png", SAMPLES / "chest_cardiomegaly.png"]
        texts = ["left pleural effusion", "cardiomegaly"]
        await page.locator("#sim-images").set_input_files(files=[str(p) for p in images])
        await page.locator("#sim-texts").fill("\n".join(texts))
        await page.locator("#similarity-submit").click()
        cells = page.locator("#heatmap tbody td")
        await cells.first.wait_for(state="visible", timeout=60_000)
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            expected = await client.similarity(images, texts)
        shown_cells = await cells.all_inner_texts()
        assert shown_cells == [f"{v:.3f}" for v in expected.cosine.flatten()]

        await page.screenshot(path=str(artifacts(tmp_path) / "web.png"), full_page=True)

        # A corrupt file: the page shows the gateway's INVALID_ARGUMENT message, as grpcurl gets it.
        code, out = await grpcurl_classify(port, corrupt, CHEST)
        assert code != 0 and "InvalidArgument" in out
        message = out.split("Message:", 1)[1].strip()
        # ... dropped on the drop zone this time.
        dropped = await page.evaluate_handle(
            "bytes => { const d = new DataTransfer();"
            " d.items.add(new File([new Uint8Array(bytes)], 'broken.png', {type: 'image/png'})); return d; }",
            list(corrupt))
        await page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
        assert await page.evaluate("document.getElementById('image').files[0].size") == len(corrupt)
        await page.locator("#classify-submit").click()
        error = page.locator("#classify-error")
        await error.wait_for(state="visible", timeout=60_000)
        shown = await error.inner_text()
        assert shown.startswith("INVALID_ARGUMENT: ") and message in shown
        assert not await page.locator("#classify-result").is_visible()
        await page.screenshot(path=str(artifacts(tmp_path) / "web-error.png"), full_page=True)

        await web.stop()
        log = "".join(web.log)
    # The page's server logged its requests, but no label, text or image content, and wrote no file.
    assert "POST /api/classify 200" in log and "POST /api/classify 400" in log
    image_text = base64.b64encode(sample[:60]).decode()[:40]
    for secret in [*CHEST, "cardiomegaly", "study.png", "broken.png", image_text]:
        assert secret not in log
    assert list((tmp_path / "web" / "cwd").iterdir()) == []
    assert list((tmp_path / "web" / "tmp").iterdir()) == []


def post_form(url: str, fields: dict[str, str], file_field: str, data: bytes) -> tuple[int, dict]:
    """A multipart POST with the standard library, as a browser would send the form."""
    boundary = "medvlm-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="image"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_uploads_over_the_limit_are_refused_and_large_ones_stay_in_memory(demo_stack, tmp_path):
    sample = (SAMPLES / "chest_left_effusion.png").read_bytes()
    limit = 3 << 20
    labels = {"labels": "\n".join(CHEST)}
    async with web_app(demo_stack.gateway.port, tmp_path / "web", "--max-image-bytes", str(limit)) as web:
        # Above the limit: refused before the gateway is called.
        big = sample + b"\x00" * (limit + 1 - len(sample))
        status, body = await asyncio.to_thread(post_form, web.url + "api/classify", labels, "image", big)
        assert status == 413 and body["error"]["code"] == "TOO_LARGE"
        # Just below it (and above the 1 MiB where form parsers usually spill to a temporary file): the
        # gateway answers, and nothing appears in TMPDIR or the working directory.
        padded = sample + b"\x00" * (limit - len(sample))
        status, body = await asyncio.to_thread(post_form, web.url + "api/classify", labels, "image", padded)
        assert status == 200, body
        assert body["ranked"][0]["label"] == "left pleural effusion"
        # Labels missing: a clear message, not a stack trace.
        status, body = await asyncio.to_thread(post_form, web.url + "api/classify", {}, "image", sample)
        assert status == 400 and "labels" in body["error"]["message"]
        # Not an image at all: refused by the client package before anything is sent.
        status, body = await asyncio.to_thread(post_form, web.url + "api/classify", {"labels": "a\nb"},
                                               "image", b"plain text, not an image")
        assert status == 400 and body["error"]["code"] == "UNRECOGNIZED_FILE"
        await web.stop()
    assert list((tmp_path / "web" / "cwd").iterdir()) == []
    assert list((tmp_path / "web" / "tmp").iterdir()) == []


@needs_browser
async def test_page_checks_the_size_before_uploading(demo_stack, tmp_path):
    sample = (SAMPLES / "chest_left_effusion.png").read_bytes()
    async with web_app(demo_stack.gateway.port, tmp_path / "web", "--max-image-bytes", "1000") as web, \
            browser_page() as page:
        await page.goto(web.url)
        await page.locator("#banner").wait_for(state="visible", timeout=30_000)
        await page.locator("#image").set_input_files(
            files=[{"name": "study.png", "mimeType": "image/png", "buffer": sample}])
        await page.locator("#labels").fill("\n".join(CHEST))
        await page.locator("#classify-submit").click()
        error = page.locator("#classify-error")
        await error.wait_for(state="visible", timeout=30_000)
        assert (await error.inner_text()).startswith("TOO_LARGE: ")
        await web.stop()
    assert "POST /api/classify" not in "".join(web.log)  # refused in the browser, never sent


@pytest.fixture(scope="module")
async def calibrated_stack(demo_bundle, demo_calibration):
    """Pinned to ONNX Runtime fp32: the page names that engine literally."""
    stack = await start_stack(demo_bundle, encoder_overrides=ORT_FP32, calibration=str(demo_calibration))
    yield stack
    await stack.stop()


def data_url_bytes(url: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return base64.b64decode(url[len(prefix):])


@needs_browser
async def test_abstain_calibration_and_the_dicom_window_in_a_real_browser(calibrated_stack, demo_calibration, tmp_path):
    from engines.runtime.calibration import Calibration
    from medvlm.client import Window, load_image

    port = calibrated_stack.gateway.port
    calibration_id = Calibration.read(demo_calibration).calibration_id
    dicom = SAMPLES / "chest_left_effusion.dcm"
    async with web_app(port, tmp_path / "web") as web, browser_page() as page, \
            AsyncClient(f"127.0.0.1:{port}") as client:
        await page.goto(web.url)
        await page.locator("#banner").wait_for(state="visible", timeout=30_000)

        # A dermoscopy image against chest labels: withheld, said before any label, with the calibration.
        await page.locator("#image").set_input_files(files=[str(SAMPLES / "derm_naevus.png")])
        assert not await page.locator("#dicom-controls").is_visible()
        await page.locator("#labels").fill("\n".join(CHEST))
        await page.locator("#classify-submit").click()
        abstain = page.locator("#abstain")
        await abstain.wait_for(state="visible", timeout=60_000)
        text = await abstain.inner_text()
        assert "Answer withheld" in text and "Out of distribution" in text
        assert await page.evaluate("document.getElementById('abstain').compareDocumentPosition("
                                   "document.getElementById('ranking')) & Node.DOCUMENT_POSITION_FOLLOWING")
        expected = await client.classify(SAMPLES / "derm_naevus.png", CHEST)
        assert expected.abstain and expected.trust is not None
        trust = await page.locator("#trust").inner_text()
        assert f"calibration {calibration_id}, scope chest" in trust
        assert await page.locator("#probability-head").inner_text() == "Calibrated probability"
        first = await page.locator("#ranking tbody tr .probability .value").first.inner_text()
        assert first == f"{expected.top[0].calibrated_probability:.3f}"
        answered = await page.locator("#answered-by").inner_text()
        assert "vision: onnxruntime/CPUExecutionProvider fp32 · text: onnxruntime/CPUExecutionProvider fp32" in answered
        await page.screenshot(path=str(artifacts(tmp_path) / "web-abstain.png"), full_page=True)

        # A DICOM file: preset and center/width controls and the image as the model will see it.
        await page.locator("#labels").focus()
        await page.keyboard.press("Shift+Tab")  # back to the file input, by keyboard
        assert await focused_id(page) == "image"
        await page.locator("#image").set_input_files(files=[str(dicom)])
        preview = page.locator("#window-preview")
        await preview.wait_for(state="visible", timeout=60_000)
        assert "file's own window" in await page.locator("#window-caption").inner_text()
        default_src = await preview.get_attribute("src")
        # Keyboard only: the window controls come right after the file input, each with its label.
        for expected_id in ("window-preset", "window-center"):
            await page.keyboard.press("Tab")
            assert await focused_id(page) == expected_id
        await page.keyboard.type("-600")
        await page.keyboard.press("Tab")
        assert await focused_id(page) == "window-width"
        await page.keyboard.type("1500")
        await page.keyboard.press("Tab")  # leaving the field updates the preview
        assert await focused_id(page) == "preview-update"
        for control in ("window-preset", "window-center", "window-width"):
            assert await page.locator(f"label[for='{control}']").count() == 1
        await page.wait_for_function("src => document.getElementById('window-preview').src !== src", arg=default_src)
        assert "center and width given here" in await page.locator("#window-caption").inner_text()
        windowed = data_url_bytes(await preview.get_attribute("src"))
        # What the page shows is what the encoder sees: embedded as a PNG it gives the embedding of the
        # DICOM file under that window (the preview is already at the input size, so no resampling).
        shown, sent = (await client.embed_images([windowed, load_image(dicom, window=Window(-600, 1500))])).matrix
        np.testing.assert_allclose(shown, sent, atol=1e-5)
        # A preset fills in its values and shows the same image.
        await page.locator("#window-preset").select_option("lung")
        await page.wait_for_function("() => document.getElementById('window-caption').textContent.includes('preset')")
        assert await page.locator("#window-center").input_value() == "-600"
        assert data_url_bytes(await preview.get_attribute("src")) == windowed

        await page.locator("#classify-submit").click()
        await page.locator("#preview").wait_for(state="visible", timeout=60_000)
        await page.wait_for_function("() => document.getElementById('preview').src.startsWith('data:')")
        expected = await client.classify(load_image(dicom, window_preset="lung"), CHEST)
        page_first = page.locator("#ranking tbody tr").first
        assert await page_first.locator(".label").inner_text() == expected.best.label
        assert (await page_first.locator(".probability .value").inner_text()
                == f"{expected.best.calibrated_probability:.3f}")
        assert await page.locator("#abstain").is_visible() == expected.abstain
        await page.screenshot(path=str(artifacts(tmp_path) / "web-dicom.png"), full_page=True)

        # A bad window is the page's message, and a preset on a PNG the decoder's own.
        await page.locator("#window-preset").select_option("")
        await page.locator("#window-width").fill("0")
        await page.locator("#preview-update").click()
        error = page.locator("#window-error")
        await error.wait_for(state="visible", timeout=30_000)
        assert "width of at least 1" in await error.inner_text()
        await web.stop()
        log = "".join(web.log)
    assert "POST /api/preview 200" in log and "POST /api/preview 400" in log
    for secret in ["SYNTHETIC", "CANARY", "1016.5", "4081", *CHEST]:  # header values and labels never logged
        assert secret not in log
    assert list((tmp_path / "web" / "cwd").iterdir()) == []
    assert list((tmp_path / "web" / "tmp").iterdir()) == []
