"""Served throughput at a concurrency against the in-process engine one request at a time, paired.

`python -m bench.batch_ab --bundle bundles/biomedclip-arch-1 --rounds 3 --requests 16`

Three systems take turns, round after round, so that load from other processes on a shared machine
hits each alike: the ONNX Runtime engine in this process answering `--requests` preprocessed images
one at a time; the vision encoder at `--concurrency` with the batch limit it measured at start
(the default); and the same encoder told to trust --max-batch (`--no-measure-batch-limit`). Prints
one JSON object: images/s of each system per round and the per-round ratios to the in-process
engine, with their medians.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from bench.images import synthetic_png
from bench.procs import HOST, Server, free_port, service_env
from bench.systems import decode_limits
from engines.runtime.bundle import load_bundle
from engines.runtime.manifest import VISION_INPUT, VISION_OUTPUT
from engines.runtime.onnx import OnnxRuntimeEngine
from medvlm.imaging.preprocess import PNG, decode_image, preprocess

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batch_ab", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=16, help="requests per system per round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=Path("/tmp"))
    args = p.parse_args(argv)

    from medvlm.v1 import encoders_pb2_grpc, types_pb2

    bundle = load_bundle(args.bundle)
    pngs = [synthetic_png(i) for i in range(8)]
    tensors = np.stack([preprocess(decode_image(b, PNG, decode_limits()), bundle.manifest.image) for b in pngs])
    engine = OnnxRuntimeEngine(bundle.engine_file("vision"), input_name=VISION_INPUT, output_name=VISION_OUTPUT,
                               precision="fp32", intra_op_threads=args.threads)
    servers, stubs, limits = [], {}, {}
    common = ["--bundle", str(bundle.path), "--allow-benchmark", "--no-metrics", "--engine", "onnxruntime-cpu",
              "--precision", "fp32", "--intra-op-threads", str(args.threads), "--max-batch", str(args.max_batch)]
    try:
        for name, extra in (("served-measured", []), ("served-max-batch", ["--no-measure-batch-limit"])):
            port = free_port()
            server = Server(name, [sys.executable, "-m", "services.vision", "--host", HOST, "--port", str(port),
                                   *common, *extra], cwd=ROOT, env=service_env(ROOT), log_dir=args.workdir)
            servers.append(server)
            server.wait_serving(f"{HOST}:{port}", 900)
            channel = grpc.insecure_channel(f"{HOST}:{port}")
            stubs[name] = encoders_pb2_grpc.VisionEncoderServiceStub(channel)
            limits[name] = [line for line in server.log_path.read_text().splitlines() if "batch_limit_measured" in line]

        def served(name: str) -> float:
            def call(n: int) -> None:
                stubs[name].EmbedImages(types_pb2.EmbedImagesRequest(
                    images=[types_pb2.Image(data=pngs[n % len(pngs)], format=types_pb2.IMAGE_FORMAT_PNG)]),
                    timeout=1800)

            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                started = time.perf_counter()
                list(pool.map(call, range(args.requests)))
                return args.requests / (time.perf_counter() - started)

        def in_process() -> float:
            started = time.perf_counter()
            for n in range(args.requests):
                engine.infer(tensors[n % len(tensors)][None])
            return args.requests / (time.perf_counter() - started)

        systems = {"in-process-one-at-a-time": in_process, "served-measured": lambda: served("served-measured"),
                   "served-max-batch": lambda: served("served-max-batch")}
        engine.infer(tensors[:1])  # warm-up: lazy allocations, connections
        for stub in stubs.values():
            stub.EmbedImages(types_pb2.EmbedImagesRequest(images=[types_pb2.Image(data=pngs[0])]), timeout=1800)
        rates: dict[str, list[float]] = {k: [] for k in systems}
        for r in range(args.rounds):
            order = list(systems) if r % 2 == 0 else list(systems)[::-1]
            for key in order:
                rates[key].append(systems[key]())
        base = rates["in-process-one-at-a-time"]
        ratios = {k: [v / b for v, b in zip(rates[k], base)] for k in rates if k != "in-process-one-at-a-time"}
        print(json.dumps({
            "bundle": bundle.bundle_id, "requests_per_round": args.requests, "concurrency": args.concurrency,
            "images_per_s": {k: [round(x, 3) for x in v] for k, v in rates.items()},
            "ratio_to_in_process": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
            "median_ratio": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
            "batch_limit_log": {k: v[-1] if v else None for k, v in limits.items()},
        }, indent=1))
    finally:
        for server in servers:
            server.stop()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
