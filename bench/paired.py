"""Served overhead at concurrency 1, measured in pairs.

Separate runs of two systems drift apart on a shared machine by more than the few milliseconds a server
adds. Here each pair sends the same PNG through the in-process engine with the encoder's decode work
(`ort-decode`) and through a served system, back to back, alternating which goes first; the median of the
per-pair differences is the overhead, and the machine's drift cancels out of it.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from bench.load import percentile
from bench.systems import Context, GatewayClassify, GatewayTLS, OrtWithDecode, System, VisionGrpc

log = logging.getLogger("bench.paired")

SERVED = (VisionGrpc, GatewayClassify)  # the encoder as deployed (batching on) and Classify end to end


def _timed(request, n: int) -> float:
    start = time.perf_counter()
    request(n)
    return (time.perf_counter() - start) * 1000


def measure_pair(local: System, served: System, pairs: int, budget_s: float, warmup: int = 10) -> dict[str, Any]:
    """Alternate requests of two started, checked systems; per-pair differences in ms."""
    first, second = local.make_request(0), served.make_request(0)
    for n in range(warmup):
        first(n), second(n)
    diffs, local_ms, served_ms = [], [], []
    deadline = time.perf_counter() + budget_s
    for n in range(pairs):
        if n >= 20 and time.perf_counter() > deadline:
            break
        if n % 2:
            b = _timed(second, n)
            a = _timed(first, n)
        else:
            a = _timed(first, n)
            b = _timed(second, n)
        local_ms.append(a)
        served_ms.append(b)
        diffs.append(b - a)
    diffs.sort()
    return {
        "pairs": len(diffs),
        "in_process_p50_ms": round(statistics.median(local_ms), 2),
        "served_p50_ms": round(statistics.median(served_ms), 2),
        "overhead_p50_ms": round(percentile(diffs, 50), 2),
        "overhead_p25_ms": round(percentile(diffs, 25), 2),
        "overhead_p75_ms": round(percentile(diffs, 75), 2),
    }


def paired_overhead(ctx: Context, pairs: int = 300, budget_s: float = 60.0) -> dict[str, Any]:
    """For each served system: its overhead over `ort-decode` at concurrency 1, measured in pairs."""
    out: dict[str, Any] = {}
    local = OrtWithDecode(ctx)
    local.start()
    try:
        local.check()
        for cls in SERVED:
            served = cls(ctx)
            try:
                served.start()
                served.check()
                out[cls.key] = measure_pair(local, served, pairs, budget_s)
                log.info("paired overhead %s - %s: %s", cls.key, local.key, out[cls.key])
            except Exception as exc:  # recorded, like a failed system
                log.exception("paired overhead of %s failed", cls.key)
                out[cls.key] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                served.stop()
    finally:
        local.stop()
    return out


def tls_overhead(ctx: Context, pairs: int = 300, budget_s: float = 60.0) -> dict[str, Any]:
    """What TLS, mTLS to the encoders and a bearer token checked per call add to Classify at
    concurrency 1: the plaintext gateway stack and the secured one, in alternating pairs."""
    plain, secured = GatewayClassify(ctx), GatewayTLS(ctx)
    try:
        for system in (plain, secured):
            system.start()
            system.check()
        out = measure_pair(plain, secured, pairs, budget_s)
        log.info("paired overhead of TLS + auth: %s", out)
        return out
    except Exception as exc:  # recorded, like a failed system
        log.exception("paired overhead of TLS + auth failed")
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        secured.stop()
        plain.stop()
