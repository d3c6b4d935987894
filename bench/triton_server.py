"""NVIDIA Triton serving a bundle's vision.onnx through ONNX Runtime in its Python backend, with its dynamic
batcher. Runs in the Triton environment (nvidia-pytriton, numpy < 2), started by bench.triton.

`python -m bench.triton_server --onnx vision.onnx --grpc-port P ...` prints one JSON line
{"ready": true, ...} on stdout once the model is loaded, then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

MODEL_NAME = "vision"
INPUT, OUTPUT = "images", "image_embeds"  # the bundle's tensor names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True, help="the bundle's vision.onnx")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--max-batch", type=int, default=32, help="max_batch_size of the model config")
    parser.add_argument("--max-delay-us", type=int, default=5000,
                        help="dynamic batcher max_queue_delay_microseconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(args.onnx, sess_options=options, providers=["CPUExecutionProvider"])
    (meta_in,) = session.get_inputs()
    size = int(meta_in.shape[-1])
    dim = int(session.get_outputs()[0].shape[-1])

    @batch
    def infer(images: np.ndarray) -> dict[str, np.ndarray]:
        (out,) = session.run([OUTPUT], {INPUT: images})  # [N, 3, S, S] -> [N, D]
        return {OUTPUT: out}

    config = TritonConfig(
        grpc_address="127.0.0.1", grpc_port=args.grpc_port,
        http_address="127.0.0.1", http_port=args.http_port,
        metrics_address="127.0.0.1", metrics_port=args.metrics_port,
        log_verbose=0,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=infer,
            inputs=[Tensor(name=INPUT, dtype=np.float32, shape=(3, size, size))],
            outputs=[Tensor(name=OUTPUT, dtype=np.float32, shape=(dim,))],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_delay_us),
            ),
            strict=False,
        )
        triton.connect()  # waits until the model is loaded
        print(json.dumps({"ready": True, "model": MODEL_NAME, "image_size": size, "embed_dim": dim,
                          "onnxruntime": ort.__version__}), flush=True)
        while not stop.wait(0.5):
            if not triton.is_alive():
                print(json.dumps({"ready": False, "error": "tritonserver or its proxy died"}), flush=True)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
