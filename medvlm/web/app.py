"""The web page's server: static files and a small JSON API that calls the gateway through medvlm.client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from medvlm.client import (
    WINDOW_PRESETS, AsyncClient, ClassifyResult, ConnectionSettings, LoadedImage, MedvlmError, ModelInfo,
    Window, load_image,
)
from medvlm.imaging.errors import InvalidImage
from medvlm.imaging.limits import DecodeLimits
from medvlm.imaging.preprocess import ImageOptions, configure_pillow, decode, preprocess
from medvlm.imaging.spec import ImageSpec
from medvlm.imaging.window import PRESETS, WindowRequest, checked_window
from medvlm.settings import setting

log = logging.getLogger("medvlm.web")
STATIC = Path(__file__).resolve().parent / "static"
FORM_OVERHEAD = 256 << 10  # multipart headers and the text fields beside the file(s)
MAX_SHOWN = 50  # labels listed on the page; a large label set is cut to its most probable
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "UNRECOGNIZED_FILE": 400, "BAD_FORM": 400,
    "TOO_LARGE": 413, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
    "UNAUTHENTICATED": 502, "PERMISSION_DENIED": 502,
}
_SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


@dataclasses.dataclass(frozen=True)
class WebSettings:
    """How the page is served: each field a flag and a variable (medvlm.settings). Limits default
    to the gateway's own (MEDVLM_MAX_IMAGE_BYTES and MEDVLM_MAX_IMAGES name the same limits there),
    so an upload the gateway would refuse is refused here before it is read into memory."""

    host: str = setting("127.0.0.1", "Address the page listens on: loopback only, since the page is plain "
                        "HTTP without authentication (reach it remotely through an SSH tunnel).",
                        env="MEDVLM_WEB_HOST")
    port: int = setting(8050, "Port of the page; 0 picks a free one (the URL is logged).", env="MEDVLM_WEB_PORT")
    max_image_bytes: int = setting(20 << 20, "Largest uploaded image in bytes; the same variable sets the "
                                   "gateway's limit, so both agree.")
    max_images: int = setting(16, "Most images in one similarity upload (the gateway's limit).")
    max_image_pixels: int = setting(40_000_000, "Largest decoded image in pixels for the window preview (the "
                                    "vision encoder's limit, same variable).")
    log_level: str = setting("info", "debug, info, warning or error. info logs one line per request "
                             "(method, path, status, latency).")


class PageError(Exception):
    """A request the page refuses itself (too large, malformed form), with a message for the page."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_response(code: str, message: str, request_id: str = "") -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "request_id": request_id}},
                        status_code=_HTTP_STATUS.get(code, 502))


def info_json(info: ModelInfo) -> dict:
    return {
        "bundle_id": info.bundle_id, "model": info.model, "version": info.version, "kind": info.kind,
        "image_size": info.image_size,
        "description": info.description, "synthetic": info.kind != "clinical",
        "engines": [{"tower": e.tower, "engine": e.engine, "precision": e.precision} for e in info.engines],
    }


async def read_form(request: Request, max_body: int, max_files: int) -> FormData:
    """The multipart form, held in memory only: the body is refused past max_body, and the parser's
    spool is sized above it so no part ever rolls over into a temporary file."""
    too_large = PageError("TOO_LARGE", f"the upload is larger than the limit of {max_body - FORM_OVERHEAD} "
                                       "bytes")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise too_large
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise PageError("BAD_FORM", "expected a multipart/form-data upload")

    async def bounded() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > max_body:
                raise too_large
            yield chunk

    parser = MultiPartParser(request.headers, bounded(), max_files=max_files, max_fields=12,
                             max_part_size=FORM_OVERHEAD)
    parser.spool_max_size = max_body + 1  # never spill to disk: the body is bounded below this
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise PageError("BAD_FORM", exc.message) from None


async def file_bytes(form: FormData, field: str, limit: int) -> list[bytes]:
    files = [v for v in form.getlist(field) if isinstance(v, UploadFile)]
    if not files:
        raise PageError("BAD_FORM", "choose an image file first")
    out = []
    for upload in files:
        data = await upload.read()
        if len(data) > limit:
            raise PageError("TOO_LARGE", f"an image is larger than the gateway's limit of {limit} bytes")
        out.append(data)
    return out


def text_lines(form: FormData, field: str) -> list[str]:
    value = form.get(field) or ""
    if not isinstance(value, str):
        raise PageError("BAD_FORM", f"{field} must be text")
    return [line.strip() for line in value.splitlines() if line.strip()]


def text_field(form: FormData, field: str) -> str:
    value = form.get(field) or ""
    if not isinstance(value, str):
        raise PageError("BAD_FORM", f"{field} must be text")
    return value.strip()


def image_options(form: FormData) -> dict:
    """load_image's display options from the form: window_center and window_width (both or neither),
    window_preset, frame. Empty fields are left out (the file's own window, frame 0)."""
    center, width = text_field(form, "window_center"), text_field(form, "window_width")
    preset, frame = text_field(form, "window_preset"), text_field(form, "frame")
    options: dict = {}
    try:
        if center or width:
            if not (center and width):
                raise ValueError("give both window center and width, or neither")
            options["window"] = Window(float(center), float(width))
        if preset:
            options["window_preset"] = preset
        if frame:
            options["frame"] = int(frame)
    except ValueError as exc:
        raise PageError("BAD_FORM", str(exc)) from None
    return options


def loaded(image: bytes, options: dict) -> LoadedImage:
    """The upload recognised by the client, with its display options checked there."""
    try:
        return load_image(image, **options)
    except ValueError as exc:
        raise PageError("BAD_FORM", str(exc)) from None


def trust_json(result: ClassifyResult) -> dict:
    """Whether to act on the answer, and the calibration behind that (None: not calibrated)."""
    t = result.trust
    return {
        "abstain": result.abstain, "abstain_reason": result.abstain_reason.value,
        "trust": None if t is None else {
            "ood_score": t.ood_score, "ood_threshold": t.ood_threshold, "min_probability": t.min_probability,
            "temperature": t.temperature, "scope": t.scope, "calibration_id": t.calibration_id},
    }


def render_preview(data: bytes, options: dict, settings: WebSettings, size: int) -> dict:
    """The image as the vision encoder sees it: decoded and windowed, resized and centre-cropped to
    the model's input size by the encoder's own code (medvlm.imaging), as a PNG data URL (nothing
    leaves memory)."""
    window = options.get("window")
    limits = DecodeLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    try:
        request = WindowRequest(checked_window(window.center, window.width, "image") if window else None,
                                options.get("window_preset"))
        decoded = decode(data, None, limits, ImageOptions(request, options.get("frame")))
    except InvalidImage as exc:
        raise PageError("INVALID_ARGUMENT", exc.message) from None
    # mean 0, std 1: the encoder's resize and crop, unnormalized, in [0, 1]
    spec = ImageSpec(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    pixels = preprocess(decoded.image, spec)  # [3, S, S]
    rgb = (pixels.transpose(1, 2, 0) * 255.0).round().clip(0, 255).astype("uint8")  # [S, S, 3]
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    info = decoded.dicom
    return {
        "image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(),
        "size": size, "dicom": info is not None,
        "modality": info.modality if info else "", "frames": info.frames if info else 1,
        "window_source": info.window_source if info else "",
        "presets": {name: {"center": w.center, "width": w.width} for name, w in PRESETS.items()
                    if name in WINDOW_PRESETS},
    }


def create_app(connection: ConnectionSettings, settings: WebSettings = WebSettings()) -> FastAPI:
    """The page and its API, calling the gateway at connection.target through one AsyncClient."""
    state: dict = {}
    max_body = settings.max_image_bytes + FORM_OVERHEAD
    # All images go to the gateway in one message, which is bounded by the channel's message size.
    max_similarity_body = min(settings.max_images * settings.max_image_bytes,
                              (connection.max_message_mb or 64) << 20) + FORM_OVERHEAD

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        configure_pillow(settings.max_image_pixels)  # the decoders' guards; pydicom never logs header values
        async with AsyncClient(settings=connection) as client:
            state["client"] = client
            yield

    app = FastAPI(title="medvlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def log_and_guard(request: Request, call_next):
        # One log line per request: method, path, status, latency. Never bodies, labels or file names.
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:12]
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - last resort: a generic answer, the detail logged
            log.error("internal error %s in %s (id %s)\n%s", type(exc).__name__, request.url.path, request_id,
                      "".join(traceback.format_tb(exc.__traceback__)))
            response = error_response("INTERNAL", "the page's server failed; see its log", request_id)
        response.headers.update(_SECURITY_HEADERS)
        log.info("%s %s %d %.1f ms", request.method, request.url.path, response.status_code,
                 (time.perf_counter() - started) * 1e3)
        return response

    async def model_info(bundle_id: str = "") -> dict:
        """The gateway's model, asked again only when an answer names another bundle."""
        if "info" not in state or (bundle_id and state["info"]["bundle_id"] != bundle_id):
            state["info"] = info_json(await state["client"].model_info())
        return state["info"]

    async def label_sets() -> tuple[list[str] | None, str]:
        """The gateway's label sets, or None and why not (a gateway without them, or a failure)."""
        try:
            return list(await state["client"].label_sets()), ""
        except MedvlmError as exc:
            if exc.code == "UNIMPLEMENTED":
                return None, "the gateway does not serve label sets"
            # Label sets are optional here: the page still classifies typed labels.
            log.warning("ListLabelSets failed with %s (request id %s)", exc.code, exc.request_id)
            return None, f"the gateway did not list its label sets: {exc.code}"

    @app.get("/api/info")
    async def info() -> JSONResponse:
        """The model the gateway serves, its label sets (null when it has none) and the upload limits."""
        try:
            state.pop("info", None)
            body = {"model": await model_info()}
            body["label_sets"], body["label_sets_note"] = await label_sets()
        except MedvlmError as exc:
            return error_response(exc.code, exc.message, exc.request_id)
        body["limits"] = {"max_image_bytes": settings.max_image_bytes, "max_images": settings.max_images}
        return JSONResponse(body)

    @app.post("/api/classify")
    async def classify(request: Request) -> JSONResponse:
        """Form: image (one file), labels (one per line) or label_set, template, and the display options
        of image_options(). Every label, ranked, and whether to act on the answer."""
        try:
            form = await read_form(request, max_body, 1)
            try:
                (image,) = await file_bytes(form, "image", settings.max_image_bytes)
                labels, label_set = text_lines(form, "labels"), text_field(form, "label_set")
                template = text_field(form, "template")
                options = image_options(form)
            finally:
                await form.close()
            if label_set and labels:
                raise PageError("BAD_FORM", "choose a label set or type labels, not both")
            if not label_set and not labels:
                raise PageError("BAD_FORM", "type at least two labels, one per line, or choose a label set")
            result = await state["client"].classify(loaded(image, options), labels or None, label_set=label_set or None,
                                                    template=template, top_k=MAX_SHOWN)
            info = await model_info(result.bundle_id)
        except PageError as exc:
            return error_response(exc.code, exc.message)
        except MedvlmError as exc:
            return error_response(exc.code, exc.message, exc.request_id)
        # `top` is most probable first; `scores` (every label) is empty when a label set answered.
        ranked = result.top
        return JSONResponse({
            **trust_json(result),
            "ranked": [{"label": s.label, "probability": s.probability, "cosine": s.cosine, "code": s.code,
                        "calibrated_probability": s.calibrated_probability} for s in ranked],
            "total": len(result.scores) or None,
            "bundle_id": result.bundle_id, "image_sha256": result.image_sha256,
            # The engines of the bundle that answered; None if the gateway changed bundle since.
            "engines": info["engines"] if info["bundle_id"] == result.bundle_id else None,
            "synthetic": info["synthetic"], "kind": info["kind"],
        })

    @app.post("/api/preview")
    async def preview(request: Request) -> JSONResponse:
        """Form: image and the display options of image_options(). The windowed image as the model sees
        it (a PNG data URL), the modality and frame count, for the page's window controls."""
        try:
            form = await read_form(request, max_body, 1)
            try:
                (image,) = await file_bytes(form, "image", settings.max_image_bytes)
                options = image_options(form)
            finally:
                await form.close()
            loaded(image, options)
            size = int((await model_info()).get("image_size") or 224)
            body = await asyncio.to_thread(render_preview, image, options, settings, size)
        except PageError as exc:
            return error_response(exc.code, exc.message)
        except MedvlmError as exc:
            return error_response(exc.code, exc.message, exc.request_id)
        return JSONResponse(body)

    @app.post("/api/similarity")
    async def similarity(request: Request) -> JSONResponse:
        """Form: images (several files), texts (one per line), template. Cosine of each image x text."""
        try:
            form = await read_form(request, max_similarity_body, settings.max_images)
            try:
                images = await file_bytes(form, "images", settings.max_image_bytes)
                texts, template = text_lines(form, "texts"), text_field(form, "template")
            finally:
                await form.close()
            if not texts:
                raise PageError("BAD_FORM", "type at least one text, one per line")
            result = await state["client"].similarity(images, texts, template=template)
        except PageError as exc:
            return error_response(exc.code, exc.message)
        except MedvlmError as exc:
            return error_response(exc.code, exc.message, exc.request_id)
        return JSONResponse({"texts": texts, "cosine": result.cosine.tolist(),
                             "probabilities": result.probabilities.tolist(),
                             "image_sha256": list(result.image_sha256), "bundle_id": result.bundle_id})

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app
