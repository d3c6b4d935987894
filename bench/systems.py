"""The systems under test. Each one starts, answers one checked request, then serves load from bench.load.

| key | what a request does |
|---|---|
| torch | open_clip `encode_image` in this process, on a tensor made by open_clip's own transform |
| ort | OnnxRuntimeEngine.infer in this process, on a tensor made by medvlm.imaging |
| ort-decode | the encoder's work in process, unbatched: PNG decode + preprocess (ImagePreparer) + engine |
| vision-nobatch | EmbedImages on `python -m services.vision --max-batch 1` over gRPC, PNG bytes |
| vision-batch | the same with the service's default batching settings |
| vision-calls | vision-batch with one single-threaded engine call per core (--intra-op-threads 1 --engine-calls N) |
| gateway | Classify on the gateway (vision + text + gateway processes), PNG bytes, labels cached |
| ort-int8 | ort with the bundle's int8 vision engine |
| gateway-int8 | gateway with the vision encoder serving int8 (--precision int8) |
| gateway-torch | gateway with both encoders serving the torch reference engine (--engine torch-cpu) |
| openvino | OpenVinoEngine.infer in this process (bf16 where the CPU has native bf16, else f32), tensors as ort |
| vision-openvino | vision-batch with the encoder on OpenVINO (--engine openvino) |
| gateway-openvino | gateway with both encoders on OpenVINO (--engine openvino) |
| triton | NVIDIA Triton (bench.triton), preprocessed float32 tensors over gRPC |
| triton-decode | the same Triton taking PNG bytes, decoding them in its Python backend with our code |
| triton-openvino | triton with OpenVINO instead of ONNX Runtime in its Python backend (same precision as ours) |

Tensor preparation for torch, ort, ort-int8 and triton happens once, before timing. The fp32 rows pin
--precision fp32, so a bundle that also holds int8 engines does not change what they measure.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import logging
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from bench import bundles
from bench.images import ImageSet
from bench.load import Point, Request, run_points
from bench.procs import HOST, Server, ServerFailed, free_port, service_env
from engines.runtime import manifest as mf
from engines.runtime.bundle import Bundle, load_bundle, row_cosines
from engines.runtime.engine import Engine, l2_normalize
from engines.runtime.manifest import TEXT_INPUT, TEXT_OUTPUT, VISION_INPUT, VISION_OUTPUT
from engines.runtime.onnx import OnnxRuntimeEngine
from engines.runtime.select import ORT_CPU, open_engine
from engines.runtime.text import TextTokenizer
from medvlm.imaging.limits import DecodeLimits
from medvlm.imaging.preprocess import PNG, configure_pillow, decode_image, preprocess
from services.plumbing.settings import Settings
from services.vision.encoder import ImagePreparer

log = logging.getLogger("bench.systems")

MIN_CHECK_COSINE = 0.999  # an answer further than this from the in-process reference is a wrong answer
# int8 against fp32: only a sanity bound (the right image); precision is judged by the build's gate
MIN_INT8_CHECK_COSINE = 0.98
MAX_LABEL_COSINE_DIFF = 1e-3  # served Classify vs the same engine's cosines in process
MAX_MESSAGE = 64 << 20
LABELS = ("normal chest radiograph", "left pleural effusion", "right pleural effusion", "cardiomegaly",
          "dermoscopy of a melanocytic naevus")
TEMPLATE = "a medical image showing {}"


class SystemUnavailable(RuntimeError):
    """The system cannot run here (a missing environment, not a bug); the message says why."""


class WrongAnswer(RuntimeError):
    """The system answered, but not what the in-process reference computes."""


def setting_default(name: str) -> Any:
    """The services' default for a setting (so the benchmark follows it when it changes)."""
    return Settings.__dataclass_fields__[name].default


@dataclasses.dataclass
class Context:
    """Everything the systems of one model share."""

    root: Path
    model: str
    bundle: Bundle
    images: ImageSet
    threads: int  # engine threads of every system
    max_batch: int  # batching on: largest batch (ours and Triton's)
    max_delay_ms: float  # batching on: longest wait for more items (ours and Triton's)
    batch_flags: list[str]  # what the batching-on encoder is started with ([] = the service's defaults)
    workdir: Path
    max_round_s: float = 0.0  # see bench.load.run_points; 0 measures every point
    min_rounds: int = 1  # see bench.load.run_point
    request_timeout_s: float = 120.0
    server_start_timeout_s: float = 300.0
    tensors: np.ndarray = dataclasses.field(init=False)  # [K, 3, S, S] float32, medvlm.imaging.preprocess
    reference: np.ndarray = dataclasses.field(init=False)  # [K, D] in-process ORT outputs, not normalized
    _int8: bundles.Int8Bundle | Exception | None = dataclasses.field(init=False, default=None)
    _int8_reference: np.ndarray | None = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        spec = self.bundle.manifest.image
        limits = decode_limits()
        self.tensors = np.stack([preprocess(decode_image(p, PNG, limits), spec) for p in self.images.pngs])
        engine = open_vision_engine(self.bundle, self.threads)
        self.reference = engine.infer_all(self.tensors)
        engine.close()

    def int8(self) -> bundles.Int8Bundle:
        """The bundle serving this model's int8 vision engine, prepared once; SystemUnavailable if none."""
        if self._int8 is None:
            try:
                self._int8 = bundles.int8_bundle(self.bundle.path, self.bundle.manifest.kind, self.workdir,
                                                 self.root)
            except bundles.BundleUnavailable as exc:
                self._int8 = exc
        if isinstance(self._int8, Exception):
            raise SystemUnavailable(str(self._int8))
        return self._int8

    def int8_reference(self) -> np.ndarray:
        """[D] output of the int8 vision engine in process for image 0 alone, not normalized (dynamic int8
        scales activations per call, so the answer depends on what else is in the batch)."""
        if self._int8_reference is None:
            engine = open_int8_vision_engine(self)
            try:
                self._int8_reference = engine.infer(self.tensors[:1])[0]
            finally:
                engine.close()
        return self._int8_reference


def decode_limits() -> DecodeLimits:
    return DecodeLimits(setting_default("max_image_bytes"), setting_default("max_image_pixels"))


def open_vision_engine(bundle: Bundle, threads: int) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(bundle.engine_file("vision"), input_name=VISION_INPUT, output_name=VISION_OUTPUT,
                             precision=bundle.manifest.precision_of("vision"), intra_op_threads=threads)


def open_int8_vision_engine(ctx: Context) -> Engine:
    """The int8 vision engine of the model's int8 bundle, on ONNX Runtime CPU, golden-checked."""
    return open_engine(load_bundle(ctx.int8().path), "vision", ORT_CPU, mf.INT8, ctx.threads).engine


def log_point(key: str, point: Point) -> None:
    if point.skipped:
        log.info("%-15s c=%-3d skipped: %s", key, point.concurrency, point.skipped)
        return
    log.info("%-15s c=%-3d %8.1f img/s  p50 %8.1f ms  p99 %8.1f ms  n=%d errors=%d cpu %s ms/img other load %s "
             "cores%s", key, point.concurrency, point.throughput, point.p50_ms, point.p99_ms, point.requests,
             point.errors, point.cpu_ms_per_image, point.background_cores,
             "" if point.warmed_up else " (warm-up incomplete)")


def check_cosine(got: np.ndarray, expected: np.ndarray, bound: float = MIN_CHECK_COSINE) -> dict[str, float]:
    """Cosine of one answer [D] with the in-process fp32 reference [D]; WrongAnswer below `bound`."""
    cosine = float(row_cosines(np.asarray(got, dtype=np.float32)[None], expected[None])[0])
    if not cosine >= bound:
        raise WrongAnswer(f"image 0: cosine {cosine:.5f} with the in-process ONNX Runtime fp32 answer "
                          f"(need >= {bound})")
    return {"reference": "in-process ONNX Runtime fp32, image 0", "cosine": round(cosine, 7)}


class System(abc.ABC):
    """One way of computing image embeddings, measured the same way as the others."""

    key: str
    title: str
    request: str  # what one request carries

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.details: dict[str, Any] = {}  # flags, versions: recorded with the results

    @abc.abstractmethod
    def start(self) -> None:
        """Load or start the system; SystemUnavailable or ServerFailed when it cannot."""

    @abc.abstractmethod
    def check(self) -> dict[str, Any]:
        """Send one request and compare the answer with the reference; WrongAnswer if it differs."""

    @abc.abstractmethod
    def make_request(self, worker: int) -> Request:
        """The request function of one load-generator worker."""

    def run(self, concurrency: list[int], seconds: float,
            warmup_s: float) -> tuple[dict[str, Any], list[Point]]:
        """Check, then one point per concurrency."""
        checked = self.check()
        return checked, self.points(concurrency, seconds, warmup_s)

    def points(self, concurrency: list[int], seconds: float, warmup_s: float) -> list[Point]:
        """One point per concurrency of a started, checked system."""
        return run_points(self.make_request, concurrency, seconds, warmup_s,
                          max_round_s=self.ctx.max_round_s, on_point=lambda p: log_point(self.key, p),
                          drain_timeout_s=self.ctx.request_timeout_s + 10, min_rounds=self.ctx.min_rounds)

    def stop(self) -> None:  # a hook: systems without resources keep this default
        """Release what start() took."""


class TorchEager(System):
    key = "torch"
    title = "torch eager (open_clip, in process)"
    request = "preprocessed float32 tensor [1, 3, S, S] (open_clip's transform, before timing)"

    def start(self) -> None:
        import open_clip  # noqa: F401 - fail early with a clear import error
        import torch

        from engines.build import registry

        torch.set_num_threads(self.ctx.threads)
        loaded = registry.get_source(self.ctx.model).load(self.ctx.workdir / "torch-source", None)
        self.torch = torch
        self.model = loaded.model.eval()
        self.inputs = [loaded.preprocess(Image.open(io.BytesIO(p)))[None] for p in self.ctx.images.pngs]
        self.details = {"torch_threads": torch.get_num_threads(), "weights": loaded.origin}

    def _embed(self, n: int) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model.encode_image(self.inputs[n % len(self.inputs)]).numpy()  # [1, D]

    def check(self) -> dict[str, Any]:
        return check_cosine(self._embed(0)[0], self.ctx.reference[0])

    def make_request(self, worker: int) -> Request:
        return self._embed

    def stop(self) -> None:
        self.model = None
        self.inputs = []


class OrtEngine(System):
    key = "ort"
    title = "ONNX Runtime engine (in process)"
    request = "preprocessed float32 tensor [1, 3, S, S] (medvlm.imaging.preprocess, before timing)"

    def start(self) -> None:
        self.engine = open_vision_engine(self.ctx.bundle, self.ctx.threads)
        self.details = {"engine": self.engine.kind, "intra_op_threads": self.ctx.threads}

    def _embed(self, n: int) -> np.ndarray:
        t = self.ctx.tensors
        return self.engine.infer(t[n % len(t)][None])  # [1, D]

    def check(self) -> dict[str, Any]:
        return check_cosine(self._embed(0)[0], self.ctx.reference[0])

    def make_request(self, worker: int) -> Request:
        return self._embed

    def stop(self) -> None:
        self.engine.close()


class OrtWithDecode(OrtEngine):
    key = "ort-decode"
    title = "ONNX Runtime engine + PNG decode and preprocessing (in process)"
    request = "PNG bytes: decode + preprocess (the encoder's ImagePreparer) + engine + L2 norm"

    def start(self) -> None:
        super().start()
        configure_pillow(setting_default("max_image_pixels"))
        self.preparer = ImagePreparer(self.ctx.bundle.manifest.image, decode_limits())

    def _embed(self, n: int) -> np.ndarray:
        pngs = self.ctx.images.pngs
        rows = self.preparer.prepare([(pngs[n % len(pngs)], PNG)])  # [[3, S, S]]
        return self.engine.embed(self.preparer.collate(rows))  # [1, D]

    def check(self) -> dict[str, Any]:
        return check_cosine(self._embed(0)[0], self.ctx.reference[0])


class OrtInt8(OrtEngine):
    key = "ort-int8"
    title = "ONNX Runtime engine, int8 vision graph (in process)"
    request = OrtEngine.request

    def start(self) -> None:
        int8 = self.ctx.int8()
        self.engine = open_int8_vision_engine(self.ctx)
        self.details = {"engine": self.engine.kind, "precision": self.engine.precision,
                        "intra_op_threads": self.ctx.threads, "int8": int8.note, "gated": int8.gated}

    def check(self) -> dict[str, Any]:
        return check_cosine(self._embed(0)[0], self.ctx.reference[0], MIN_INT8_CHECK_COSINE)


def openvino_precision() -> str:
    """What medvlm's OpenVINO engine computes in on this CPU: bf16 with native bf16, fp32 elsewhere."""
    from engines.runtime import openvino as ov_engine

    try:
        return ov_engine.BF16 if ov_engine.CpuSupport.probe().bf16 else mf.FP32
    except Exception as exc:  # noqa: BLE001 - any failure to load OpenVINO makes the system unavailable
        raise SystemUnavailable(f"OpenVINO cannot run here: {exc}") from exc


class OpenVinoInProcess(OrtEngine):
    key = "openvino"
    title = "OpenVINO engine (in process; bf16 where the CPU has native bf16, else f32)"
    request = OrtEngine.request

    def start(self) -> None:
        from engines.runtime import openvino as ov_engine

        precision = openvino_precision()
        self.engine = ov_engine.OpenVinoEngine(self.ctx.bundle.engine_file("vision"), input_name=VISION_INPUT,
                                               output_name=VISION_OUTPUT, precision=precision,
                                               threads=self.ctx.threads)
        support = ov_engine.CpuSupport.probe()
        self.details = {"engine": self.engine.kind, "precision": precision, "threads": self.ctx.threads,
                        "openvino": support.version, "cpu_flags": list(support.reported_flags),
                        "bf16": support.bf16_reason or "used", "compile_s": round(self.engine.load_s, 2)}

    def check(self) -> dict[str, Any]:
        bound = MIN_CHECK_COSINE if self.engine.precision == mf.FP32 else MIN_INT8_CHECK_COSINE
        return check_cosine(self._embed(0)[0], self.ctx.reference[0], bound)


class GrpcSystem(System):
    """Helpers of the systems that talk to medvlm servers: subprocesses, channels, stubs."""

    root: Path | None = None  # the checkout whose services are started (None: this one)

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.servers: list[Server] = []
        self.channels: dict[int, grpc.Channel] = {}
        # TLS towards the server under test (None: plaintext), and metadata of every call.
        self.credentials: grpc.ChannelCredentials | None = None
        self.call_metadata: tuple[tuple[str, str], ...] = ()

    def launch(self, name: str, args: list[str], port: int, credentials: grpc.ChannelCredentials | None = None) -> str:
        root = self.root or self.ctx.root
        server = Server(name, [sys.executable, "-m", *args], cwd=root, env=service_env(root), log_dir=self.ctx.workdir)
        self.servers.append(server)
        target = f"{HOST}:{port}"
        server.wait_serving(target, self.ctx.server_start_timeout_s, credentials)
        return target

    def encoder_args(self, service: str, port: int, bundle: Path | None = None) -> list[str]:
        return [f"services.{service}", "--host", HOST, "--port", str(port),
                "--bundle", str(bundle or self.ctx.bundle.path), "--allow-benchmark", "--no-metrics"]

    def channel(self, worker: int, target: str) -> grpc.Channel:
        """One channel per load-generator worker, reused across points (grpc shares the connection)."""
        if worker not in self.channels:
            options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
            self.channels[worker] = (grpc.insecure_channel(target, options=options) if self.credentials is None
                                     else grpc.secure_channel(target, self.credentials, options=options))
        return self.channels[worker]

    def served_engines(self, stub) -> list[str]:
        """What the server says it runs (GetModelInfo): tower, engine, precision, largest batch."""
        from medvlm.v1 import types_pb2

        info = stub.GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=10, metadata=self.call_metadata).model
        return [f"{types_pb2.Tower.Name(e.tower).removeprefix('TOWER_').lower()}: {e.engine} "
                f"{types_pb2.Precision.Name(e.precision).removeprefix('PRECISION_').lower()}, "
                f"max batch {e.max_batch}" for e in info.engines]

    def stop(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()
        if self.servers:  # after the measurements: the peak includes every batch served
            self.details["memory_mib"] = {server.name: server.memory() for server in self.servers}
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()


class VisionGrpc(GrpcSystem):
    key = "vision-batch"
    title = "medvlm vision encoder over gRPC, batching on"
    request = "PNG bytes over gRPC (EmbedImages, 1 image); the server decodes and preprocesses"
    batching = True
    # Pinned: with OpenVINO installed, `auto` may pick it for fp32 on the CPU.
    engine_flags: tuple[str, ...] = ("--engine", "onnxruntime-cpu", "--precision", "fp32")

    def start(self) -> None:
        from medvlm.v1 import encoders_pb2_grpc, types_pb2

        self.pb = types_pb2
        self.stub_class = encoders_pb2_grpc.VisionEncoderServiceStub
        port = free_port()
        flags = [*self.thread_flags(), *self.engine_flags,
                 *(self.ctx.batch_flags if self.batching else ["--max-batch", "1"])]
        self.target = self.launch("vision", [*self.encoder_args("vision", port), *flags], port)
        self.details = {"flags": flags}

    def thread_flags(self) -> list[str]:
        return ["--intra-op-threads", str(self.ctx.threads)]

    def _call(self, worker: int, n: int):
        pngs = self.ctx.images.pngs
        stub = self.stub_class(self.channel(worker, self.target))
        request = self.pb.EmbedImagesRequest(
            images=[self.pb.Image(data=pngs[n % len(pngs)], format=self.pb.IMAGE_FORMAT_PNG)])
        return stub.EmbedImages(request, timeout=self.ctx.request_timeout_s)

    def check(self) -> dict[str, Any]:
        reply = self._call(-1, 0)
        self.details["bundle_id"] = reply.bundle_id
        self.details["served_engines"] = self.served_engines(self.stub_class(self.channel(-1, self.target)))
        return check_cosine(np.array(reply.embeddings[0].values), l2_normalize(self.ctx.reference[:1])[0])

    def make_request(self, worker: int) -> Request:
        self.channel(worker, self.target)
        return lambda n: self._call(worker, n)


class VisionOpenVino(VisionGrpc):
    key = "vision-openvino"
    title = "medvlm vision encoder over gRPC on OpenVINO (--engine openvino), batching on"
    engine_flags: tuple[str, ...] = ("--engine", "openvino")

    def check(self) -> dict[str, Any]:
        reply = self._call(-1, 0)
        self.details["served_engines"] = self.served_engines(self.stub_class(self.channel(-1, self.target)))
        return check_cosine(np.array(reply.embeddings[0].values), l2_normalize(self.ctx.reference[:1])[0],
                            MIN_CHECK_COSINE if openvino_precision() == mf.FP32 else MIN_INT8_CHECK_COSINE)


class VisionPerCoreCalls(VisionGrpc):
    key = "vision-calls"
    title = ("medvlm vision encoder over gRPC, one single-threaded engine call per core "
             "(--intra-op-threads 1 --engine-calls N), batching on")

    def thread_flags(self) -> list[str]:
        return ["--intra-op-threads", "1", "--engine-calls", str(self.ctx.threads)]


class VisionGrpcNoBatch(VisionGrpc):
    key = "vision-nobatch"
    title = "medvlm vision encoder over gRPC, batching off (--max-batch 1)"
    batching = False


class GatewayClassify(GrpcSystem):
    key = "gateway"
    title = "medvlm gateway Classify end to end (vision + text + gateway), labels cached"
    request = f"PNG bytes + {len(LABELS)} labels over gRPC (Classify); text embeddings come from the cache"
    vision_flags: tuple[str, ...] = ("--engine", "onnxruntime-cpu", "--precision", "fp32")
    text_flags: tuple[str, ...] = ("--engine", "onnxruntime-cpu", "--precision", "fp32")

    def bundle_path(self) -> Path:
        return self.ctx.bundle.path

    def image_reference(self) -> tuple[np.ndarray, str]:
        """The in-process answer for image 0 [D] that the served one must match, and what it is."""
        return self.ctx.reference[0], "ONNX Runtime fp32"

    def start(self) -> None:
        from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2

        self.pb, self.gpb = types_pb2, gateway_pb2
        self.stub_class = gateway_pb2_grpc.GatewayServiceStub
        bundle = self.bundle_path()
        vision_port, text_port, gateway_port = free_port(), free_port(), free_port()
        encoder_security, gateway_security, encoder_credentials = self.security()
        threads = ["--intra-op-threads", str(self.ctx.threads)]
        vision_flags = [*threads, *self.vision_flags, *self.ctx.batch_flags]
        text_flags = [*threads, *self.text_flags, *self.ctx.batch_flags]
        vision = self.launch("vision", [*self.encoder_args("vision", vision_port, bundle), *vision_flags,
                                        *encoder_security], vision_port, encoder_credentials)
        text = self.launch("text", [*self.encoder_args("text", text_port, bundle), *text_flags,
                                    *encoder_security], text_port, encoder_credentials)
        # Callers here wait up to request_timeout_s; the gateway's default cap on an encoder call
        # (--downstream-timeout-s 10) would fail requests queued longer at high concurrency.
        self.target = self.launch("gateway", [
            "services.gateway", "--host", HOST, "--port", str(gateway_port), "--no-metrics",
            "--downstream-timeout-s", str(self.ctx.request_timeout_s),
            "--vision-target", vision, "--text-target", text, *gateway_security], gateway_port, self.credentials)
        self.details.update({
            "vision_flags": vision_flags, "text_flags": text_flags,
            "labels": list(LABELS), "template": TEMPLATE})

    def security(self) -> tuple[list[str], list[str], grpc.ChannelCredentials | None]:
        """Flags of the encoders and of the gateway, and credentials to health-check the encoders."""
        return [], [], None

    def _call(self, worker: int, n: int):
        pngs = self.ctx.images.pngs
        stub = self.stub_class(self.channel(worker, self.target))
        request = self.gpb.ClassifyRequest(
            image=self.pb.Image(data=pngs[n % len(pngs)], format=self.pb.IMAGE_FORMAT_PNG),
            labels=list(LABELS), template=TEMPLATE, top_k=1)
        return stub.Classify(request, timeout=self.ctx.request_timeout_s, metadata=self.call_metadata)

    def check(self) -> dict[str, Any]:
        reply = self._call(-1, 0)  # also fills the label cache
        got = np.array([s.cosine for s in sorted(reply.scores, key=lambda s: s.index)])  # [L]
        image, what = self.image_reference()
        expected = expected_label_cosines(self.ctx, image)  # [L]
        if got.shape != expected.shape or not np.abs(got - expected).max() <= MAX_LABEL_COSINE_DIFF:
            raise WrongAnswer(f"Classify cosines {np.round(got, 4).tolist()} differ from the in-process "
                              f"{what} ones {np.round(expected, 4).tolist()}")
        self.details["bundle_id"] = reply.bundle_id
        self.details["served_engines"] = self.served_engines(self.stub_class(self.channel(-1, self.target)))
        return {"reference": f"in-process image x label cosines, image 0, vision {what}, text ONNX Runtime fp32",
                "max_abs_diff": float(np.abs(got - expected).max())}

    def make_request(self, worker: int) -> Request:
        self.channel(worker, self.target)
        return lambda n: self._call(worker, n)


class GatewayTLS(GatewayClassify):
    key = "gateway-tls"
    title = ("medvlm gateway Classify as `make run TLS=1` runs it: TLS to the gateway with a bearer token "
             "checked on every call, mutual TLS to the encoders; labels cached")

    def security(self) -> tuple[list[str], list[str], grpc.ChannelCredentials | None]:
        from devtools.launch import make_local_tls

        tls = make_local_tls(self.ctx.workdir / "tls", [HOST])
        self.credentials = tls.channel_credentials()
        self.call_metadata = (("authorization", f"Bearer {tls.token}"),)
        folder = tls.folder
        gateway_identity = grpc.ssl_channel_credentials(
            (folder / "ca.crt").read_bytes(), (folder / "gateway.key").read_bytes(), (folder / "gateway.crt").read_bytes())
        self.details["security"] = "TLS 1.3 (gRPC's BoringSSL), ES256 bearer token, mTLS gateway -> encoders"
        return tls.encoder_flags(), tls.gateway_flags(), gateway_identity


class GatewayInt8(GatewayClassify):
    key = "gateway-int8"
    title = "medvlm gateway Classify, vision encoder serving int8 (--precision int8), labels cached"
    vision_flags = ("--engine", "onnxruntime-cpu", "--precision", "int8")

    def bundle_path(self) -> Path:
        int8 = self.ctx.int8()
        self.details.update({"int8": int8.note, "gated": int8.gated})
        return int8.path

    def image_reference(self) -> tuple[np.ndarray, str]:
        return self.ctx.int8_reference(), "ONNX Runtime int8 (same graph)"


class GatewayTorch(GatewayClassify):
    key = "gateway-torch"
    title = "medvlm gateway Classify, both encoders serving the torch reference engine (--engine torch-cpu)"
    vision_flags = text_flags = ("--engine", "torch-cpu")


class GatewayOpenVino(GatewayClassify):
    key = "gateway-openvino"
    title = ("medvlm gateway Classify, vision encoder on OpenVINO (--engine openvino), labels cached "
             "(text: ONNX Runtime fp32, off the measured path)")
    vision_flags = ("--engine", "openvino")

    def image_reference(self) -> tuple[np.ndarray, str]:
        """Image 0 through the same OpenVINO engine in process (bf16 differs from fp32 by more than the
        check's 1e-3 on cosines)."""
        from engines.runtime import openvino as ov_engine

        precision = openvino_precision()
        engine = ov_engine.OpenVinoEngine(self.ctx.bundle.engine_file("vision"), input_name=VISION_INPUT,
                                          output_name=VISION_OUTPUT, precision=precision, threads=self.ctx.threads)
        try:
            return engine.infer(self.ctx.tensors[:1])[0], f"OpenVINO {precision} (same engine)"
        finally:
            engine.close()


def expected_label_cosines(ctx: Context, image: np.ndarray) -> np.ndarray:
    """Cosines of an image embedding [D] with every prompt, computed in process: the text tower through
    ONNX Runtime fp32. The gateway fills the template by plain replacement of "{}", as here."""
    manifest = ctx.bundle.manifest
    prompts = [TEMPLATE.replace("{}", label) for label in LABELS]
    ids = TextTokenizer(ctx.bundle.path, manifest.text).ids(prompts)
    text = OnnxRuntimeEngine(ctx.bundle.engine_file("text"), input_name=TEXT_INPUT, output_name=TEXT_OUTPUT,
                             precision=manifest.precision_of("text"), intra_op_threads=ctx.threads)
    try:
        labels = l2_normalize(text.infer_all(ids))  # [L, D]
    finally:
        text.close()
    return labels @ l2_normalize(image[None])[0]  # [L]


def all_systems() -> dict[str, type[System]]:
    """Every system, in the order they run."""
    from bench.triton import TritonDecode, TritonOpenVino, TritonSystem

    order = (TorchEager, OrtEngine, OrtWithDecode, VisionGrpcNoBatch, VisionGrpc, VisionPerCoreCalls,
             GatewayClassify, GatewayTLS,
             OrtInt8, GatewayInt8, GatewayTorch, OpenVinoInProcess, VisionOpenVino, GatewayOpenVino,
             TritonSystem, TritonDecode, TritonOpenVino)
    return {cls.key: cls for cls in order}


__all__ = ["Context", "ServerFailed", "System", "SystemUnavailable", "WrongAnswer", "all_systems",
           "setting_default"]
