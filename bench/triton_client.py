"""Load on the Triton server from the Triton environment, with bench.load and tritonclient.grpc.

Started by bench.triton: reads preprocessed images (.npy, [K, 3, S, S] float32), or with --pngs the encoded
images for a server started with --decode-bundle, runs one point per concurrency and writes JSON (server version, the embedding of image 0 for the parity check, points).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from bench.load import Point, run_points
from bench.triton_server import INPUT, MODEL_NAME, OUTPUT, PNG_INPUT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of Triton's gRPC endpoint")
    images = parser.add_mutually_exclusive_group(required=True)
    images.add_argument("--tensors", help=".npy file of [K, 3, S, S] float32 images")
    images.add_argument("--pngs", help="folder of PNG files, sent as bytes (sorted by name)")
    parser.add_argument("--concurrency", required=True, help="comma-separated, e.g. 1,4,16,64")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup-s", type=float, required=True)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="deadline of one request")
    parser.add_argument("--max-round-s", type=float, default=0.0, help="see bench.load.run_points")
    parser.add_argument("--min-rounds", type=int, default=1, help="see bench.load.run_point")
    parser.add_argument("--out", required=True, help="JSON file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.pngs:
        files = sorted(Path(args.pngs).glob("*.png"))
        rows = [np.array([[f.read_bytes()]], dtype=np.object_) for f in files]  # each [1, 1] bytes
        name, datatype = PNG_INPUT, "BYTES"
    else:
        tensors = np.load(args.tensors)  # [K, 3, S, S]
        rows = [np.ascontiguousarray(tensors[i : i + 1]) for i in range(len(tensors))]  # each [1, 3, S, S]
        name, datatype = INPUT, "FP32"

    def infer(client: grpcclient.InferenceServerClient, row: np.ndarray) -> np.ndarray:
        image = grpcclient.InferInput(name, list(row.shape), datatype)
        image.set_data_from_numpy(row)
        result = client.infer(MODEL_NAME, [image], outputs=[grpcclient.InferRequestedOutput(OUTPUT)],
                              client_timeout=args.timeout_s)
        out = result.as_numpy(OUTPUT)  # [1, D]
        if out is None or out.shape[0] != 1:
            raise RuntimeError(f"unexpected output {None if out is None else out.shape}")
        return out

    with grpcclient.InferenceServerClient(url=args.target) as probe:
        metadata = probe.get_server_metadata()
        check = infer(probe, rows[0])[0]

    def make_request(worker: int):
        client = grpcclient.InferenceServerClient(url=args.target)
        return lambda n: infer(client, rows[n % len(rows)])

    def progress(point: Point) -> None:
        line = {"concurrency": point.concurrency, "throughput": point.throughput, "skipped": point.skipped}
        print(json.dumps(line), file=sys.stderr, flush=True)

    # The harness that started this client also started the server: its tree is the benchmark's own CPU.
    points = run_points(make_request, [int(c) for c in args.concurrency.split(",") if c], args.seconds,
                        args.warmup_s, max_round_s=args.max_round_s, on_point=progress,
                        own_root_pid=os.getppid(), drain_timeout_s=args.timeout_s + 10,
                        min_rounds=args.min_rounds)
    result = {
        "server": {"name": metadata.name, "version": metadata.version},
        "tritonclient": importlib.metadata.version("tritonclient"),
        "check_embedding": check.astype(float).tolist(),
        "points": [p.as_dict() for p in points],
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
