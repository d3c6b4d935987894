"""`medvlm batch` throughput against the benchmark's gateway load at the same concurrency, in one run.

    python -m bench.client_batch [--model demo] [--concurrency 16] [--items 1000] [--rounds 3]

Starts the benchmark's `gateway` system (vision, text and gateway processes with the flags
`make bench` gives them), then alternates, `--rounds` times: the benchmark's closed-loop load
(`--concurrency` threads of unary Classify, bench.load.run_point) and `medvlm batch` in its own
process at its default concurrency, over a folder of `--items` copies of the same PNGs with the
same labels and template. Prints each rate and the ratio of the medians as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import bundles
from bench.__main__ import ROOT
from bench.images import load_images
from bench.load import run_point
from bench.machine import describe
from bench.systems import LABELS, TEMPLATE, Context, GatewayClassify
from engines.runtime.bundle import load_bundle


def batch_once(target: str, folder: Path, out: Path) -> dict:
    """One `medvlm batch` run from scratch; its own rate (stream start to end) and the wall time."""
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "medvlm.client", "batch", str(folder), "--out", str(out), "--labels", *LABELS,
         "--template", TEMPLATE, "--top-k", "1", "--json", "--no-progress", "--target", target],
        cwd=ROOT, capture_output=True, text=True, check=False,
        env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}"))
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"medvlm batch failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout)
    return {"items_per_s": summary["items_per_s"], "classified": summary["classified"],
            "wall_items_per_s": round(summary["classified"] / wall, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--concurrency", type=int, default=16, help="the batch's default concurrency")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="window of each benchmark point")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    choices, left_out = bundles.choose(ROOT / "bundles", [args.model], ROOT)
    if not choices:
        raise SystemExit(f"no bundle: {left_out}")
    images = load_images(ROOT)
    with tempfile.TemporaryDirectory(prefix="medvlm-client-batch-") as tmp:
        work = Path(tmp)
        ctx = Context(root=ROOT, model=args.model, bundle=load_bundle(choices[0].bundle), images=images,
                      threads=args.threads, max_batch=32, max_delay_ms=5.0, batch_flags=[], workdir=work / "bench")
        ctx.workdir.mkdir()
        folder = work / "studies"
        folder.mkdir()
        for i in range(args.items):
            (folder / f"{i:05d}.png").write_bytes(images.pngs[i % len(images.pngs)])
        system = GatewayClassify(ctx)
        system.start()
        try:
            system.check()
            bench_rates, batch_runs = [], []
            for _ in range(args.rounds):
                point = run_point(system.make_request, args.concurrency, args.seconds, 2.0)
                bench_rates.append(point.throughput_window)
                batch_runs.append(batch_once(system.target, folder, work / "results.csv"))
                logging.info("round: benchmark %.1f/s, medvlm batch %.1f/s", bench_rates[-1],
                             batch_runs[-1]["items_per_s"])
        finally:
            system.stop()
    bench_median = statistics.median(bench_rates)
    batch_median = statistics.median(r["items_per_s"] for r in batch_runs)
    print(json.dumps({
        "model": args.model, "bundle_id": ctx.bundle.bundle_id, "concurrency": args.concurrency,
        "items": args.items, "images": images.describe(), "labels": list(LABELS), "template": TEMPLATE,
        "benchmark_gateway_per_s": [round(r, 2) for r in bench_rates], "medvlm_batch": batch_runs,
        "ratio_of_medians": round(batch_median / bench_median, 3),
        "machine": {k: v for k, v in describe(ROOT).items() if k != "versions"},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
