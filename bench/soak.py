"""Soak: the local stack under a mixed load at saturation, with a leak detector known to fire.

python -m bench.soak --minutes 10 [--leak]   (make soak MINUTES=10 [LEAK=1])

Samples each process's resident memory, open descriptors and threads; after a warm-up the
verdict fails on more than --max-rss-growth-mb of memory growth or a growth trend in
descriptors or threads. --leak starts the gateway of bench/leaky_gateway.py, which retains every
request: that run must fail, which shows the detector works.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

from bench.machine import cpu_info
from bench.stress import ROOT, MixedLoad, Stack
from devtools.launch import ensure_bundle


class Sampler(threading.Thread):
    """Every `every_s`: rss (MB), open fds and threads of each process."""

    def __init__(self, procs: dict[str, int], every_s: float) -> None:
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in procs.items()}
        self.every_s = every_s
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            row: dict = {"t": round(time.monotonic() - self.start_time, 2)}
            for name, proc in self.procs.items():
                try:
                    with proc.oneshot():
                        row[name] = {"rss_mb": proc.memory_info().rss / 2**20, "fds": proc.num_fds(),
                                     "threads": proc.num_threads()}
                except psutil.Error:
                    row[name] = None
            self.samples.append(row)
            self.stop.wait(self.every_s)


def _window_median(values: list[float], first: bool, fraction: float = 0.15) -> float:
    k = max(3, int(len(values) * fraction))
    return statistics.median(values[:k] if first else values[-k:])


def verdict(samples: list[dict], warmup_s: float, max_rss_growth_mb: float) -> dict:
    """Growth of each measure from the start to the end of the post-warm-up samples (medians of
    the first and last 15 % of them, so one spike decides nothing)."""
    after = [s for s in samples if s["t"] >= warmup_s]
    result: dict = {"samples_after_warmup": len(after), "processes": {}, "passed": True, "reasons": []}
    if len(after) < 6:
        return {**result, "passed": False, "reasons": ["too few samples after warm-up"]}
    for name in (k for k in after[0] if k != "t"):
        series = [s[name] for s in after if s.get(name)]
        if len(series) < len(after):
            result["passed"] = False
            result["reasons"].append(f"{name} exited during the soak")
            continue
        growth = {m: _window_median([x[m] for x in series], False) - _window_median([x[m] for x in series], True)
                  for m in ("rss_mb", "fds", "threads")}
        result["processes"][name] = {k: round(v, 1) for k, v in growth.items()}
        if growth["rss_mb"] > max_rss_growth_mb:
            result["passed"] = False
            result["reasons"].append(f"{name}: resident memory grew {growth['rss_mb']:.0f} MB (limit {max_rss_growth_mb:.0f})")
        for measure in ("fds", "threads"):
            if growth[measure] > 2:
                result["passed"] = False
                result["reasons"].append(f"{name}: {measure} grew by {growth[measure]:.0f}")
    return result


def plot(samples: list[dict], warmup_s: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in (k for k in samples[0] if k != "t"):
        points = [(s["t"] / 60, s[name]["rss_mb"]) for s in samples if s.get(name)]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.axvline(warmup_s / 60, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--leak", action="store_true", help="start the gateway of bench/leaky_gateway.py, which retains every request")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--bundles", type=Path, default=ROOT / "bundles")
    parser.add_argument("--workers", type=int, default=8, help="concurrent callers (enough to saturate 2 cores)")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak")
    args = parser.parse_args(argv)

    bundle = ensure_bundle(args.bundles.resolve(), args.model)
    name = "soak-leak" if args.leak else "soak"
    args.out.mkdir(parents=True, exist_ok=True)
    duration = args.minutes * 60
    warmup = max(60.0, 0.2 * duration) if duration >= 180 else 0.3 * duration
    gateway = "bench.leaky_gateway" if args.leak else "services.gateway"
    stack = Stack(bundle, args.out / f"{name}-logs", gateway_module=gateway)
    try:
        sampler = Sampler({n: s.proc.pid for n, s in stack.processes().items()}, args.sample_s)
        sampler.start()
        load = MixedLoad(stack.target, workers=args.workers)
        tally = asyncio.run(load.run(duration))
        sampler.stop.set()
        sampler.join()
    finally:
        stack.stop()
    result = verdict(sampler.samples, warmup, args.max_rss_growth_mb)
    report = {"name": name, "minutes": args.minutes, "warmup_s": warmup, "bundle": bundle.name,
              "machine": cpu_info(), "load": tally.summary(), "verdict": result, "samples": sampler.samples}
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot(sampler.samples, warmup, args.out / f"{name}.png",
         f"{name}: {args.minutes:g} min, {'PASS' if result['passed'] else 'FAIL'}")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    print(f"{name}: {'PASS' if result['passed'] else 'FAIL'}" + "".join(f"\n  {r}" for r in result["reasons"]))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
