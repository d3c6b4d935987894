"""Closed-loop load generator: N threads, each sending its next request when the last one returns.

Standard library only, so that the same code drives every system, including the Triton client that
runs in its own environment.

One point (one system at one concurrency) runs in three phases:

* warm-up: at least `warmup_s`, and until every worker has completed a request (capped at
  `max_warmup_s`), so that connections, lazy allocations and queues are in their steady state;
* measurement: `seconds` long, or as long as the warm-up's first round took if that was longer
  (requests served side by side, by threads sharing the cores or in batches, start and complete in
  bursts once per round: a shorter window could see none). Latency samples are the requests
  *started* inside it. Throughput follows from Little's law for a closed loop, concurrency / mean
  latency, which bursts do not skew; answers completed in the window / its length is kept beside it
  as a cross-check (`throughput_window`), exact only over many rounds;
* drain: no new requests; requests started inside the window finish (bounded by the caller's own
  request timeout) and are counted, so slow requests are not censored from the percentiles.

A closed loop reaches its steady state only after every worker has had an answer, which takes one
"round" of concurrency / throughput seconds. run_points skips a point whose round, estimated from the
throughput of the point before it, would exceed `max_round_s`, and says so, instead of spending minutes
on it or reporting a point that never reached its steady state.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable

# One worker's request function: called with a running request number, raises on failure.
Request = Callable[[int], object]


@dataclasses.dataclass(frozen=True)
class Point:
    """What one system did at one concurrency."""

    concurrency: int
    window_s: float  # length of the measurement window (at least one round)
    requests: int  # requests started in the window and completed without error
    errors: int  # requests started in the window that raised
    completed_in_window: int  # successful completions inside the window, whatever their start
    throughput: float  # images per second (one image per request): concurrency / mean latency
    throughput_window: float  # completed_in_window / window_s: the same, counted; noisy under bursts
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    warmup_s: float  # how long the warm-up actually took
    round_s: float  # when the last worker got its first answer, from the start: one round from cold
    error_sample: str = ""  # type and message of the first error, if any
    # CPU used during the window by processes outside the benchmark (other users' work), in cores;
    # None where /proc cannot tell. On a shared machine this says how much the numbers can be trusted.
    background_cores: float | None = None
    # CPU the benchmark's own processes (the system under test and this load generator) used during
    # the window per answer completed in it, in ms; None where /proc cannot tell. Steadier than a
    # rate between runs, and it bounds what the system can serve: cores * 1000 / cpu_ms_per_image.
    cpu_ms_per_image: float | None = None
    warmed_up: bool = True  # every worker had an answer before the window opened
    skipped: str = ""  # why the point was not measured (then every number is NaN)

    @classmethod
    def skip(cls, concurrency: int, reason: str) -> Point:
        nan = math.nan
        return cls(concurrency=concurrency, window_s=0.0, requests=0, errors=0, completed_in_window=0,
                   throughput=nan, throughput_window=nan, p50_ms=nan, p95_ms=nan, p99_ms=nan, mean_ms=nan,
                   max_ms=nan, warmup_s=0.0, round_s=nan, warmed_up=False, skipped=reason)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _jiffies_per_s() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100.0


def cpu_snapshot(root_pid: int) -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of `root_pid` and its descendants), from /proc;
    None where /proc is not readable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        busy = user + nice + system + irq + softirq + steal
        parents: dict[int, int] = {}
        times: dict[int, int] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # exited meanwhile
            rest = stat[stat.rindex(")") + 2 :].split()
            parents[int(name)] = int(rest[1])
            times[int(name)] = int(rest[11]) + int(rest[12])
    except (OSError, ValueError, IndexError):
        return None
    tree, todo = set(), [root_pid]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, []))
    hz = _jiffies_per_s()
    return busy / hz, sum(times.get(pid, 0) for pid in tree) / hz


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
    own_root_pid: int | None = None,
    min_rounds: int = 1,
) -> Point:
    """Drive `concurrency` workers, each with its own request function `make_request(worker)`.

    Worker w's k-th call gets the number w + k * concurrency, so workers cycle through inputs
    without sharing one. Requests that raise count as errors and not as latency samples.
    `own_root_pid` (default: this process) roots the process tree whose CPU is the benchmark's own.
    The window lasts `seconds`, or `min_rounds` rounds (every worker's first answer) if that is longer:
    a slow model at high concurrency answers in bursts of one batch, and one burst is no rate.
    """
    own_root = os.getpid() if own_root_pid is None else own_root_pid
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
    warmed_up = all(event.is_set() for event in done_once)
    firsts = [own[0].end for own in records if own]
    round_s = (max(firsts) - begin) if warmed_up and firsts else time.perf_counter() - begin
    cpu_start = cpu_snapshot(own_root)
    window_start = time.perf_counter()
    time.sleep(max(seconds, min_rounds * round_s))
    window_end = time.perf_counter()
    cpu_end = cpu_snapshot(own_root)
    stop.set()
    deadline = time.perf_counter() + drain_timeout_s
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.perf_counter()))

    measured = [r for own in records for r in list(own) if r.start >= window_start and r.start < window_end]
    good = sorted((r.end - r.start) * 1000.0 for r in measured if r.ok)
    completed = sum(1 for own in records for r in list(own) if r.ok and window_start <= r.end <= window_end)
    window = window_end - window_start
    background = own_cpu_ms = None
    if cpu_start is not None and cpu_end is not None and window > 0:
        own = cpu_end[1] - cpu_start[1]
        background = round(max(0.0, (cpu_end[0] - cpu_start[0]) - own) / window, 2)
        own_cpu_ms = round(1000.0 * own / completed, 3) if completed else None
    return Point(
        concurrency=concurrency,
        window_s=round(window, 3),
        requests=len(good),
        errors=sum(1 for r in measured if not r.ok),
        completed_in_window=completed,
        throughput=concurrency / (sum(good) / len(good) / 1000.0) if good else math.nan,
        throughput_window=completed / window if window > 0 else math.nan,
        p50_ms=percentile(good, 50),
        p95_ms=percentile(good, 95),
        p99_ms=percentile(good, 99),
        mean_ms=sum(good) / len(good) if good else math.nan,
        max_ms=good[-1] if good else math.nan,
        warmup_s=round(window_start - begin, 3),
        round_s=round(round_s, 3),
        error_sample=errors[0] if errors else "",
        background_cores=background,
        cpu_ms_per_image=own_cpu_ms,
        warmed_up=warmed_up,
    )


def run_points(
    make_request: Callable[[int], Request],
    concurrency: list[int],
    seconds: float,
    warmup_s: float,
    *,
    max_round_s: float = 0.0,
    on_point: Callable[[Point], None] | None = None,
    **kwargs: object,
) -> list[Point]:
    """run_point at each concurrency, ascending. With `max_round_s` > 0, a point whose round
    (concurrency / the previous point's throughput) would take longer is skipped, with the reason."""
    points: list[Point] = []
    for c in sorted(concurrency):
        measured = [p for p in points if not p.skipped and p.throughput > 0]
        if max_round_s > 0 and measured:
            rate = measured[-1].throughput
            round_s = c / rate
            if round_s > max_round_s:
                point = Point.skip(c, f"one round of {c} requests would take about {round_s:.0f} s at "
                                      f"{rate:.2f} img/s (limit {max_round_s:.0f} s, --max-round-s)")
                points.append(point)
                if on_point:
                    on_point(point)
                continue
        point = run_point(make_request, c, seconds, warmup_s, **kwargs)  # type: ignore[arg-type]
        points.append(point)
        if on_point:
            on_point(point)
    return points
