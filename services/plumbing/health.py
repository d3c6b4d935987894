"""Waiting on a server's grpc.health.v1 from outside it: the launcher, the benchmarks and the tests
poll the same way."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def wait_for_health(target: str, timeout_s: float, *, want: int = SERVING, service: str = "",
                    credentials: grpc.ChannelCredentials | None = None,
                    keep_waiting: Callable[[], bool] = lambda: True, interval_s: float = 0.25) -> bool:
    """Poll `service`'s health on `target` until it is `want` (True), or until timeout_s has passed or
    keep_waiting() turns false (False). A server not yet listening counts as not there yet."""
    deadline = time.monotonic() + timeout_s
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and keep_waiting():
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == want:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(interval_s)
    return False
