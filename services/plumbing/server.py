"""Start-up, health, reflection and graceful shutdown, written once for the three services."""

from __future__ import annotations

import asyncio
import importlib
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from engines.runtime.engine import EngineError
from services.plumbing.interceptors import Admission, ServerInterceptor
from services.plumbing.logs import configure_logging
from services.plumbing.metrics import serve_metrics
from services.plumbing.settings import Settings, parse_settings
from services.security.auth import Guard
from services.security.tls import check_listen, server_credentials

log = structlog.get_logger("medvlm.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Liveness is its own health service name, apart from readiness ("" and the service names):
# SERVING while the process can make progress, also while it warms up or drains; NOT_SERVING
# only when the app reports itself stuck. An unresponsive event loop cannot answer at all.
LIVENESS = "medvlm.liveness"
LIVENESS_CHECK_S = 1.0


class App(Protocol):
    """What a service supplies: its servicers and how to load (and unload) its model."""

    service_names: Sequence[str]  # full names, e.g. "medvlm.v1.VisionEncoderService"
    # Calls admitted at once by the server itself (None: the app bounds its own work).
    admission_limit: int | None

    def register(self, server: grpc.aio.Server) -> None:
        """Add the service's servicers to the server."""

    async def start(self) -> None:
        """Load, warm up and verify the model. Raises if the service cannot serve."""

    async def watch(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        """While serving: call set_serving(False) when the app can no longer serve (a
        dependency is down) and set_serving(True) when it can again. May return at once."""

    def stalled(self) -> str | None:
        """Why the app is stuck and needs a restart (e.g. an engine call that never ends), or None."""

    async def close(self) -> None:
        """Release what start() acquired."""

    def audit_fields(self) -> dict[str, str]:
        """Fields every audit record carries once start() has succeeded (the bundle's signing key id)."""


MAX_CONCURRENT_STREAMS = 4096

# Engines the build half registers when imported (the torch reference needs torch and open_clip):
# imported only when asked for, so a serving image without the build half never loads them.
BUILD_HALF_ENGINES = {"torch-cpu": "engines.build.torch_engine", "torch-cuda": "engines.build.torch_engine"}


def load_build_half_engine(engine: str) -> None:
    """Register `engine` from the build half if it lives there; EngineError if it cannot be imported."""
    module = BUILD_HALF_ENGINES.get(engine)
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise EngineError(f"engine {engine} is the torch reference: it needs torch, open_clip and engines/build "
                          f"(requirements/build.txt); this installation lacks them ({exc})") from exc


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments of every server: message limits, keepalive, connection ageing."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Far above any admission bound: overload is refused by our RESOURCE_EXHAUSTED with a
        # retry hint, never by HTTP/2 (REFUSED_STREAM reaches callers as UNAVAILABLE).
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
        ("grpc.max_connection_idle_ms", 5 * 60_000),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(max(settings.grace_s, 60) * 1000)),
        ("grpc.server_handshake_timeout_ms", 15_000),
        # a second server on a taken port must fail, not silently share it
        ("grpc.so_reuseport", 0),
    ]


class Server:
    """One gRPC server around one App: health NOT_SERVING until the app has started."""

    def __init__(self, settings: Settings, app: App) -> None:
        self.settings = settings
        self.app = app
        self.health = HealthServicer()
        limit = app.admission_limit
        check_listen(settings)
        self.interceptor = ServerInterceptor(Admission(limit) if limit else None, Guard(settings))
        self.grpc = grpc.aio.server(interceptors=[self.interceptor], options=server_options(settings))
        app.register(self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = (*app.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        if settings.reflection:
            reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), self.grpc)
        address = f"{settings.host}:{settings.port}"
        credentials = server_credentials(settings)
        if credentials is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, credentials)
        self.metrics_port: int | None = None
        # Health alone in plaintext, for probes that cannot speak TLS (the kubelet's gRPC probe).
        self.health_grpc: grpc.aio.Server | None = None
        self.health_port: int | None = None
        if settings.health_port >= 0:
            self.health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_grpc)
            self.health_port = self.health_grpc.add_insecure_port(f"{settings.host}:{settings.health_port}")
        self.ready = asyncio.Event()
        self._start_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._liveness_task: asyncio.Task[None] | None = None
        self._stopping = False

    async def _set_all(self, status: int) -> None:
        for name in ("", *self.app.service_names):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Listen at once (so health answers NOT_SERVING), then load the app in the background."""
        await self._set_all(NOT_SERVING)
        await self.health.set(LIVENESS, SERVING)
        await self.grpc.start()
        if self.health_grpc is not None:
            await self.health_grpc.start()
        if self.settings.metrics:
            self.metrics_port = serve_metrics(self.settings.host, self.settings.metrics_port)
        log.info("listening", port=self.port, metrics_port=self.metrics_port, health_port=self.health_port,
                 tls=bool(self.settings.tls_cert), mtls=bool(self.settings.tls_client_ca),
                 auth=self.interceptor.guard is not None)
        self._start_task = asyncio.create_task(self._start_app())
        self._liveness_task = asyncio.create_task(self._follow_liveness())

    async def _follow_liveness(self) -> None:
        """Ask the app every second whether it is stuck; liveness NOT_SERVING while it is."""
        stuck: str | None = None
        while True:
            await asyncio.sleep(LIVENESS_CHECK_S)
            reason = self.app.stalled()
            if (reason is None) != (stuck is None):
                if reason is None:
                    log.info("live_again")
                else:
                    log.error("stalled", reason=reason)
                await self.health.set(LIVENESS, SERVING if reason is None else NOT_SERVING)
            stuck = reason

    async def _start_app(self) -> None:
        try:
            await asyncio.to_thread(load_build_half_engine, self.settings.engine)
            await self.app.start()
        except Exception as exc:  # noqa: BLE001 - stay live, report NOT_SERVING, say why
            log.error("start_failed", error_type=type(exc).__name__, error=str(exc))
            return
        self.interceptor.audit_fields.update(self.app.audit_fields())
        await self._set_all(SERVING)
        self.ready.set()
        log.info("serving", port=self.port, event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0])
        self._watch_task = asyncio.create_task(self.app.watch(self._report))

    async def _report(self, serving: bool) -> None:
        """The app's own view of whether it can serve; ignored once shutting down."""
        if not self._stopping:
            await self._set_all(SERVING if serving else NOT_SERVING)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING at once, drain, stop accepting, let in-flight calls finish, unload."""
        grace = self.settings.grace_s if grace_s is None else grace_s
        self._stopping = True
        await self._set_all(NOT_SERVING)  # readiness only: liveness holds while draining
        for task in (self._start_task, self._watch_task):
            if task is not None and not task.done():
                task.cancel()
        if self.settings.drain_s > 0:
            await asyncio.sleep(self.settings.drain_s)
        await self.grpc.stop(grace)
        if self._liveness_task is not None:
            self._liveness_task.cancel()
        if self.health_grpc is not None:
            await self.health_grpc.stop(0)
        await self.app.close()
        log.info("stopped")


async def serve(settings: Settings, app_factory: Callable[[Settings], App]) -> None:
    """Build the app inside the running loop (gRPC channels bind to it), serve until SIGTERM or
    SIGINT, then shut down gracefully."""
    server = Server(settings, app_factory(settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    log.info("shutting_down", grace_s=settings.grace_s)
    await server.stop()


def main(service: str, app_factory: Callable[[Settings], App], argv: Sequence[str] | None = None) -> None:
    """Entry point of a service: parse settings once, configure logs, serve."""
    settings = parse_settings(service, argv)
    configure_logging(service, settings.log_level)
    run_loop(serve(settings, app_factory), settings.event_loop)


def run_loop(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run a service to its end on the event loop its settings name."""
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)
