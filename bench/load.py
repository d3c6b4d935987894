"""Closed-loop load generator: N threads, each sending its next request when the last one returns.

Standard library only, so that the same code drives every system, including the Triton client that
runs in its own environment.

One point (one system at one concurrency) runs in three phases:

* warm-up: at least `warmup_s`, and until every worker has completed a request (capped at
  `max_warmup_s`), so that connections, lazy allocations and queues are in their steady state;
* measurement: `seconds` long. Throughput is the number of requests completed inside it divided by
  its length. Latency samples are the requests *started* inside it;
* drain: no new requests; requests started inside the window finish (bounded by the caller's own
  request timeout) and are counted, so slow requests are not censored from the percentiles.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable

# One worker's request function: called with a running request number, raises on failure.
Request = Callable[[int], object]


@dataclasses.dataclass(frozen=True)
class Point:
    """What one system did at one concurrency."""

    concurrency: int
    window_s: float  # length of the measurement window
    requests: int  # requests started in the window and completed without error
    errors: int  # requests started in the window that raised
    completed_in_window: int  # successful completions inside the window, whatever their start
    throughput: float  # images per second (one image per request): completed_in_window / window_s
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    warmup_s: float  # how long the warm-up actually took
    error_sample: str = ""  # type and message of the first error, if any

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an ascending list; q in [0, 100]."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclasses.dataclass
class _Record:
    start: float
    end: float
    ok: bool


def run_point(
    make_request: Callable[[int], Request],
    concurrency: int,
    seconds: float,
    warmup_s: float,
    *,
    max_warmup_s: float = 120.0,
    drain_timeout_s: float = 120.0,
) -> Point:
    """Drive `concurrency` workers, each with its own request function `make_request(worker)`.

    Worker w's k-th call gets the number w + k * concurrency, so workers cycle through inputs
    without sharing one. Requests that raise count as errors and not as latency samples.
    """
    requests = [make_request(w) for w in range(concurrency)]  # clients are built before the clock starts
    records: list[list[_Record]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    done_once = [threading.Event() for _ in range(concurrency)]
    stop = threading.Event()
    go = threading.Barrier(concurrency + 1)

    def worker(w: int) -> None:
        own = records[w]
        call = requests[w]
        k = 0
        go.wait()
        while not stop.is_set():
            start = time.perf_counter()
            ok = True
            try:
                call(w + k * concurrency)
            except Exception as exc:  # noqa: BLE001 - any failure of the system under test is an error
                ok = False
                if not errors:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            own.append(_Record(start, time.perf_counter(), ok))
            done_once[w].set()
            k += 1

    threads = [threading.Thread(target=worker, args=(w,), daemon=True, name=f"load-{w}")
               for w in range(concurrency)]
    for t in threads:
        t.start()
    go.wait()
    begin = time.perf_counter()
    time.sleep(warmup_s)
    for event in done_once:
        event.wait(timeout=max(0.0, begin + max_warmup_s - time.perf_counter()))
    window_start = time.perf_counter()
    time.sleep(seconds)
    window_end = time.perf_counter()
    stop.set()
    deadline = time.perf_counter() + drain_timeout_s
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.perf_counter()))

    measured = [r for own in records for r in list(own) if r.start >= window_start and r.start < window_end]
    good = sorted((r.end - r.start) * 1000.0 for r in measured if r.ok)
    completed = sum(1 for own in records for r in list(own) if r.ok and window_start <= r.end <= window_end)
    window = window_end - window_start
    return Point(
        concurrency=concurrency,
        window_s=round(window, 3),
        requests=len(good),
        errors=sum(1 for r in measured if not r.ok),
        completed_in_window=completed,
        throughput=completed / window if window > 0 else math.nan,
        p50_ms=percentile(good, 50),
        p95_ms=percentile(good, 95),
        p99_ms=percentile(good, 99),
        mean_ms=sum(good) / len(good) if good else math.nan,
        max_ms=good[-1] if good else math.nan,
        warmup_s=round(window_start - begin, 3),
        error_sample=errors[0] if errors else "",
    )
