"""Measurements that compare two systems side by side, so that a shared machine's drift cancels out.

Separate runs of two systems drift apart on a shared machine by more than the few milliseconds a server
adds. Here each pair sends the same PNG through the in-process engine with the encoder's decode work
(`ort-decode`) and through a served system, back to back, alternating which goes first; the median of the
per-pair differences is the overhead, and the machine's drift cancels out of it.

The same holds for throughput: whether a served system under load keeps up with its engine in process
one request at a time, or batching on against off, is judged from windows of the two that
alternate (interleaved).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from bench.goals import SERVED_VS_ENGINE
from bench.load import Point, percentile
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


def _window(system: System, concurrency: int, seconds: float, warmup_s: float) -> Point:
    point = system.points([concurrency], seconds, warmup_s)[0]
    if point.errors or not point.throughput > 0:
        raise RuntimeError(f"{system.key} at {concurrency}: {point.error_sample or 'no answer'}")
    return point


def side_by_side(base: System, base_c: int, other: System, other_c: int, rounds: int, seconds: float,
                 warmup_s: float) -> dict[str, Any]:
    """Throughput and p50 of two started, checked systems in `rounds` rounds of one window each, the order
    alternating (B O, O B, ...): the ratio other / base of each round's two windows, and their median."""
    sides: dict[str, list[Point]] = {"base": [], "other": []}
    for r in range(rounds):
        order = [("base", base, base_c), ("other", other, other_c)]
        for side, system, c in order[::-1] if r % 2 else order:
            sides[side].append(_window(system, c, seconds, warmup_s))
    rounds_of = list(zip(sides["base"], sides["other"], strict=True))
    ratios = sorted(o.throughput / b.throughput for b, o in rounds_of)
    return {
        "base": base.key, "base_concurrency": base_c, "other": other.key, "other_concurrency": other_c,
        "rounds": rounds, "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(ratios[0], 3), "ratio_max": round(ratios[-1], 3),
        "p50_ratio_median": round(statistics.median(o.p50_ms / b.p50_ms for b, o in rounds_of), 3),
        **{f"{side}_img_s": [round(p.throughput, 2) for p in points] for side, points in sides.items()},
        **{f"{side}_p50_ms": [round(p.p50_ms, 2) for p in points] for side, points in sides.items()},
        **{f"{side}_cpu_ms_per_image": _median_of(p.cpu_ms_per_image for p in points)
           for side, points in sides.items()},
    }


def interleaved(ctx: Context, classes: dict[str, type[System]], measured: set[str], mid: int, rounds: int,
                seconds: float, warmup_s: float) -> dict[str, Any]:
    """The comparisons that separate points, minutes apart, cannot judge on a drifting machine, each
    run side by side (both systems in `measured`):

    * per served system (goals.SERVED_VS_ENGINE): the served system at `mid` against the in-process
      engine doing the same inference one request at a time;
    * "batching": the vision encoder at `mid` with batching on against batching off;
    * "engine-calls": the vision encoder at `mid` with one single-threaded engine call per core
      against the default (one call on every core);
    * "openvino-vs-triton" at `mid` and "openvino-vs-triton-at-1" at 1: the vision encoder on OpenVINO
      against Triton serving the same OpenVINO model.
    """
    pairs = [(served, engine, 1, served, mid) for served, engine in SERVED_VS_ENGINE]
    pairs.append(("batching", "vision-nobatch", mid, "vision-batch", mid))
    pairs.append(("engine-calls", "vision-batch", mid, "vision-calls", mid))
    pairs.append(("openvino-vs-triton", "triton-openvino", mid, "vision-openvino", mid))
    pairs.append(("openvino-vs-triton-at-1", "triton-openvino", 1, "vision-openvino", 1))
    out: dict[str, Any] = {}
    for name, base_key, base_c, other_key, other_c in pairs:
        if base_key not in measured or other_key not in measured:
            continue
        base, other = classes[base_key](ctx), classes[other_key](ctx)
        try:
            for system in (base, other):
                system.start()
                system.check()
            out[name] = side_by_side(base, base_c, other, other_c, rounds, seconds, warmup_s)
            log.info("side by side, %s: %s", name, out[name])
        except Exception as exc:  # recorded, like a failed system
            log.exception("side by side %s failed", name)
            out[name] = {"base": base_key, "other": other_key, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            other.stop()
            base.stop()
    return out


def _median_of(values) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None
