"""Shared fixtures: bundles built once per run, and real servers on port 0."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import hypothesis  # noqa: F401 - see below
import pytest
import uvloop
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

os.environ["HF_HUB_OFFLINE"] = "1"

from devtools.localca import signing_key  # noqa: E402
from engines.runtime import select  # noqa: E402
from engines.runtime.bundle import load_bundle  # noqa: E402
from engines.runtime.engine import Engine  # noqa: E402
from medvlm.v1 import encoders_pb2_grpc, gateway_pb2_grpc, types_pb2  # noqa: E402
from services.gateway.app import GatewayApp  # noqa: E402
from services.plumbing.convert import PRECISION, TOWER  # noqa: E402
from services.plumbing.health import wait_for_health  # noqa: E402
from services.plumbing.server import Server  # noqa: E402
from services.plumbing.settings import GATEWAY, TEXT, VISION, Settings  # noqa: E402
from services.text.servicer import TextApp  # noqa: E402
from services.vision.servicer import VisionApp  # noqa: E402

# hypothesis is imported here, before any server runs, rather than by its pytest plugin at the end of
# the run: there CPython 3.11.7 failed, at random, to assertion-rewrite it ("SystemError: AST constructor
# recursion depth mismatch"), which made a run of tests/test_gateway.py alone end in an error.
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
log = logging.getLogger("medvlm.tests")
log.setLevel(logging.INFO)  # shown with a failing test's captured log
# MEDVLM_TEST_ENGINE (read here only, never by the services): the engine of every stack a test
# starts without an engine of its own, in process (encoder_settings) or as processes (MEDVLM_ENGINE
# in service_env). A test's own pin wins. With it set to openvino, a machine without BF16 still
# runs the OpenVINO path (in f32) and catches tests that assume ONNX Runtime.
TEST_ENGINE = os.environ.get("MEDVLM_TEST_ENGINE", "").strip()
# The pin of a test that judges one engine and precision (numerical parity, a literal engine name).
ORT_FP32 = {"engine": "onnxruntime-cpu", "precision": "fp32"}
# Under CI every tool a test needs is installed (.ci/run), so a missing one fails the run
# instead of skipping the tests that need it.
UNDER_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def find_tool(name: str) -> str | None:
    """A command-line tool from this virtual environment's bin (pip-installed), else from PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def pytest_configure(config: pytest.Config) -> None:
    if TEST_ENGINE and TEST_ENGINE not in select.engine_names():
        raise pytest.UsageError(f"MEDVLM_TEST_ENGINE={TEST_ENGINE!r} is not one of {', '.join(select.engine_names())}")


def pytest_report_header(config: pytest.Config) -> str:
    return f"stacks started by tests: engine {TEST_ENGINE or 'as the services choose (auto)'} (MEDVLM_TEST_ENGINE)"


def service_env(**extra: str) -> dict[str, str]:
    """The environment of a service process a test starts: this one, the repository on PYTHONPATH, and
    MEDVLM_ENGINE from MEDVLM_TEST_ENGINE unless `extra` (the test) sets it."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}", HF_HUB_OFFLINE="1")
    if TEST_ENGINE:
        env["MEDVLM_ENGINE"] = TEST_ENGINE
    env.update(extra)
    return env


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.needs_tool(name, install=...)`: skip where the tool is missing, fail under CI."""
    for mark in item.iter_markers("needs_tool"):
        if find_tool(mark.args[0]) is None:
            message = f"{mark.args[0]} not installed ({mark.kwargs.get('install', 'requirements/dev.txt')})"
            if UNDER_CI:
                pytest.fail(f"{message}; under CI (CI=true) every tool the tests need must be installed",
                            pytrace=False)
            pytest.skip(message)


def build(model: str, out: Path) -> Path:
    """A bundle of `model` in `out`: built here, or copied from TEST_BUNDLES, a folder of bundles
    built already (the mutation check builds the tiny one once for all its runs)."""
    folder = os.environ.get("TEST_BUNDLES")
    prebuilt = sorted(Path(folder).glob(f"{model}-*")) if folder else []
    if prebuilt:
        return Path(shutil.copytree(prebuilt[0], out / prebuilt[0].name))
    from engines.build.bundle import build_bundle

    return build_bundle(model, out)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
    """The loop the services run on by default (--event-loop uvloop), for the stacks served in process."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The tiny test model, exported and verified once per run."""
    return build("tiny", tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """The tiny model in torch through open_clip (model, preprocess, tokenizer), as the bundle was built."""
    from engines.build import registry

    return registry.get_source("tiny").load(tmp_path_factory.mktemp("tiny-src"), None)


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory) -> Path:
    """The demo model (trained weights committed in the repository), exported once per run."""
    return build("demo", tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def signing(tmp_path_factory) -> Path:
    """A folder with two Ed25519 key pairs made here: release.key/.pub (the trusted one) and stranger.key/.pub."""
    folder = tmp_path_factory.mktemp("signing")
    for name in ("release", "stranger"):
        private, public = signing_key()
        (folder / f"{name}.key").write_bytes(private)
        (folder / f"{name}.pub").write_bytes(public)
    return folder


CALIBRATION_PER_CLASS = 12  # demo calibration images per class in tests (the shipped default is 40)


@pytest.fixture(scope="session")
def demo_calibration(demo_bundle, tmp_path_factory) -> Path:
    """calibration.json of the demo bundle, fitted once per run on its generator's images."""
    from engines.build.calibrate import calibrate, demo_images
    from engines.runtime.bundle import load_bundle

    bundle = load_bundle(demo_bundle)
    calibration = calibrate(bundle, demo_images(bundle, per_class=CALIBRATION_PER_CLASS))
    return calibration.write(tmp_path_factory.mktemp("calibration") / "calibration.json")


def encoder_settings(service: str, bundle: Path, **overrides) -> Settings:
    """An encoder's settings in a test: engine MEDVLM_TEST_ENGINE unless `overrides` name one."""
    values = dict(service=service, host="127.0.0.1", port=0, metrics_port=0, bundle=str(bundle), grace_s=2.0)
    if TEST_ENGINE:
        values["engine"] = TEST_ENGINE
    values.update(overrides)
    return Settings(**values)


def gateway_settings(vision_port: int, text_port: int, **overrides) -> Settings:
    values = dict(
        service=GATEWAY, host="127.0.0.1", port=0, metrics_port=0, grace_s=2.0,
        vision_target=f"127.0.0.1:{vision_port}", text_target=f"127.0.0.1:{text_port}",
        verify_retry_max_s=1.0,
    )
    values.update(overrides)
    return Settings(**values)


async def start_server(settings: Settings, app, wait: bool = True) -> Server:
    """A real server on a real port; waits until it is SERVING unless told not to."""
    server = Server(settings, app)
    await server.start()
    if wait:
        try:
            await asyncio.wait_for(server.ready.wait(), 60)
        except BaseException:
            await server.stop(0)  # a server left running would keep the run from ending
            raise
    return server


@dataclasses.dataclass
class Stack:
    """The three services of one bundle, in this process, on ports chosen by the OS."""

    bundle: Path
    vision: Server
    text: Server
    gateway: Server
    channel: grpc.aio.Channel

    @property
    def target(self) -> str:
        """The gateway's address, as a client or MEDVLM_TARGET takes it."""
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def gateway_stub(self) -> gateway_pb2_grpc.GatewayServiceStub:
        return gateway_pb2_grpc.GatewayServiceStub(self.channel)

    def encoder_channel(self, which: str) -> grpc.aio.Channel:
        port = {VISION: self.vision.port, TEXT: self.text.port}[which]
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    async def stop(self) -> None:
        await self.channel.close()
        for server in (self.gateway, self.vision, self.text):
            await server.stop(0.5)


async def start_stack(bundle: Path, vision_overrides: dict | None = None, encoder_overrides: dict | None = None,
                      **gateway_overrides) -> Stack:
    """The three services; those already started are stopped again when a later one fails to start.
    `encoder_overrides` go to both encoders (ORT_FP32 pins their engine), `vision_overrides` to vision."""
    started: list[Server] = []
    try:
        for service, app, overrides in ((VISION, VisionApp, {**(encoder_overrides or {}), **(vision_overrides or {})}),
                                        (TEXT, TextApp, encoder_overrides or {})):
            settings = encoder_settings(service, bundle, **overrides)
            started.append(await start_server(settings, app(settings)))
        settings = gateway_settings(started[0].port, started[1].port, **gateway_overrides)
        started.append(await start_server(settings, GatewayApp(settings)))
    except BaseException:
        for server in started:
            await server.stop(0)
        raise
    vision, text, gateway = started
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    stack = Stack(bundle, vision, text, gateway, channel)
    try:
        engines = await served_engines(stack.gateway_stub)
    except BaseException:
        await stack.stop()
        raise
    log.info("stack of %s serves %s", bundle.name,
                ", ".join(f"{tower} on {e.engine} {precision_name(e.precision)}" for tower, e in engines.items()))
    return stack


@pytest.fixture(scope="module")
async def demo_stack(demo_bundle):
    """The demo bundle's three services, shared by one test module."""
    stack = await start_stack(demo_bundle)
    yield stack
    await stack.stop()


async def served_engines(stub: gateway_pb2_grpc.GatewayServiceStub) -> dict[str, types_pb2.EngineInfo]:
    """Tower name ("vision", "text") -> the engine that serves it, as the gateway's GetModelInfo says."""
    reply = await stub.GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=10)
    towers = {value: name for name, value in TOWER.items()}
    return {towers[e.tower]: e for e in reply.model.engines}


def precision_name(value: int) -> str:
    """"fp32", "bf16", ... for a Precision of GetModelInfo."""
    return {v: k for k, v in PRECISION.items()}[value]


def embedding_bound(bundle: Path, tower: str, engine: types_pb2.EngineInfo) -> float:
    """The cosine to the fp32 reference the bundle holds `tower` to at the engine's precision (derived
    files at their served bounds)."""
    return select.precision_bound(load_bundle(bundle).manifest, tower, precision_name(engine.precision))


def cosine_shift(*bounds: float) -> float:
    """Most an image-text cosine of unit vectors can move when each embedding keeps a cosine >= its
    bound to the reference: |e - e'| = sqrt(2 (1 - c)) per embedding, summed (Cauchy-Schwarz)."""
    return sum(math.sqrt(2 * (1 - c)) for c in bounds)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


class Bf16StandIn(Engine):
    """Test-only: a real engine whose outputs are rounded to bf16 and which reports precision bf16, so
    the bf16 branches (tolerances, precision in GetModelInfo, cache keys) run on CPUs without BF16.
    It rounds outputs only: real bf16 arithmetic (OpenVINO on AVX512_BF16/AMX) errs more."""

    precision = "bf16"

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.kind = f"bf16-stand-in/{inner.kind}"
        self.max_batch = inner.max_batch

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return to_bf16(self.inner.infer(batch))

    def close(self) -> None:
        self.inner.close()


async def start_bf16_standin_stack(bundle: Path, **gateway_overrides) -> Stack:
    """A stack whose encoders serve ONNX Runtime fp32 wrapped in Bf16StandIn."""
    opener = select._OPENERS[select.ORT_CPU]

    def standin(*args, **kwargs) -> Engine:
        return Bf16StandIn(opener(*args, **kwargs))

    select.register_engine(select.ORT_CPU, standin)
    try:
        return await start_stack(bundle, encoder_overrides=ORT_FP32, **gateway_overrides)
    finally:
        select.register_engine(select.ORT_CPU, opener)  # the engines are open; later stacks get the real one


@pytest.fixture(scope="session")
async def tiny_stack(tiny_bundle):
    stack = await start_stack(tiny_bundle)
    yield stack
    await stack.stop()


def spawn_service(service: str, *args: str, **env: str) -> subprocess.Popen:
    """A service in its own process on free ports, its JSON log on a pipe."""
    return subprocess.Popen(
        [PYTHON, "-m", f"services.{service}", "--host", "127.0.0.1", "--port", "0", *args],
        cwd=ROOT, env=service_env(**env), stderr=subprocess.PIPE, text=True,
    )


def wait_for_serving(proc: subprocess.Popen, timeout_s: float = 60) -> dict:
    """Read a spawned service's log until it reports serving; returns the ports it logged and its
    event loop."""
    ports: dict = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                raise AssertionError(f"service exited with {proc.returncode}")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "listening":
            ports["metrics_port"] = record.get("metrics_port")
        if record.get("event") == "serving":
            ports["port"] = int(record["port"])
            ports["event_loop"] = record.get("event_loop")
            return ports
    raise AssertionError("service did not report serving")


async def eventually(predicate, timeout_s: float = 60, what: str = "the condition") -> None:
    """Bounded polling: return once predicate() is true, fail after timeout_s. Not a timing
    assertion: the bound, generous, only keeps a broken build from hanging the run."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        await asyncio.sleep(0.005)


async def wait_health(port: int, want: int, within_s: float = 10.0, service: str = "") -> float:
    """Seconds until the health of `service` on the local `port` is `want` (bounded polling through
    services.plumbing.health, off the event loop); fails after within_s."""
    start = time.monotonic()
    reached = await asyncio.to_thread(wait_for_health, f"127.0.0.1:{port}", within_s, want=want, service=service,
                                      interval_s=0.05)
    assert reached, f"{service or 'readiness'} health did not become {want} within {within_s} s"
    return time.monotonic() - start


async def health_status(port: int, service: str = "", timeout: float = 5) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return reply.status


__all__ = [
    "ROOT", "PYTHON", "UNDER_CI", "ORT_FP32", "TEST_ENGINE", "Bf16StandIn", "Stack", "cosine_shift",
    "embedding_bound", "encoder_settings", "eventually", "find_tool", "gateway_settings", "health_status",
    "precision_name", "served_engines", "service_env", "start_bf16_standin_stack", "start_server", "start_stack",
    "to_bf16", "wait_health", "encoders_pb2_grpc",
]
