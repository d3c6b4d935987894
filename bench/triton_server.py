"""NVIDIA Triton serving a bundle's vision.onnx through ONNX Runtime (or, with --backend openvino,
OpenVINO) in its Python backend, with its dynamic batcher. Runs in the Triton environment (nvidia-pytriton, numpy < 2), started by bench.triton.

With --decode-bundle the model takes PNG bytes instead of tensors and decodes and preprocesses them in the
Python backend with the vision encoder's own code (medvlm.imaging), so both do the same work.

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
PNG_INPUT = "png"  # --decode-bundle: one encoded image per request


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True, help="the bundle's vision.onnx")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op (or OpenVINO inference) threads")
    parser.add_argument("--backend", choices=("onnxruntime", "openvino"), default="onnxruntime",
                        help="what runs the graph inside the Python backend")
    parser.add_argument("--openvino-precision", choices=("f32", "bf16"), default="f32",
                        help="OpenVINO's inference precision hint (the benchmark passes what medvlm picks here)")
    parser.add_argument("--max-batch", type=int, default=32, help="max_batch_size of the model config")
    parser.add_argument("--max-delay-us", type=int, default=5000,
                        help="dynamic batcher max_queue_delay_microseconds")
    parser.add_argument("--decode-bundle", default=None,
                        help="take PNG bytes and decode and preprocess them as the vision encoder does, "
                             "with this bundle's image spec")
    parser.add_argument("--max-image-bytes", type=int, default=20 << 20, help="decoding limit, as the encoder's")
    parser.add_argument("--max-image-pixels", type=int, default=40_000_000, help="decoding limit, as the encoder's")
    return parser


def png_decoder(args: argparse.Namespace):
    """PNG bytes [N, 1] -> preprocessed float32 [N, 3, S, S], exactly as the vision encoder prepares them."""
    from pathlib import Path

    from engines.runtime.manifest import Manifest
    from medvlm.imaging.limits import DecodeLimits
    from medvlm.imaging.preprocess import PNG, configure_pillow, decode_image, preprocess

    spec = Manifest.read(Path(args.decode_bundle)).image
    limits = DecodeLimits(args.max_image_bytes, args.max_image_pixels)
    configure_pillow(limits.max_pixels)

    def decode(pngs: np.ndarray) -> np.ndarray:
        return np.stack([preprocess(decode_image(bytes(row[0]), PNG, limits), spec) for row in pngs])

    return decode


def openvino_embed(args: argparse.Namespace):
    """The graph compiled by OpenVINO with the settings medvlm's OpenVINO engine uses -> (embed, size, dim, version)."""
    import openvino as ov

    compiled = ov.Core().compile_model(args.onnx, "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": args.openvino_precision,
        "INFERENCE_NUM_THREADS": args.threads})
    request = compiled.create_infer_request()  # one model instance: Triton calls it one batch at a time
    size = int(compiled.input(INPUT).get_partial_shape()[-1].get_length())
    dim = int(compiled.output(OUTPUT).get_partial_shape()[-1].get_length())

    def embed(images: np.ndarray) -> dict[str, np.ndarray]:
        result = request.infer({INPUT: np.ascontiguousarray(images)})
        return {OUTPUT: np.array(result[compiled.output(OUTPUT)], copy=True)}  # [N, D]

    return embed, size, dim, {"openvino": ov.__version__, "inference_precision": args.openvino_precision}


def onnxruntime_embed(args: argparse.Namespace):
    """The graph in an ONNX Runtime session -> (embed, size, dim, version)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(args.onnx, sess_options=options, providers=["CPUExecutionProvider"])
    (meta_in,) = session.get_inputs()
    size = int(meta_in.shape[-1])
    dim = int(session.get_outputs()[0].shape[-1])

    def embed(images: np.ndarray) -> dict[str, np.ndarray]:
        (out,) = session.run([OUTPUT], {INPUT: images})  # [N, 3, S, S] -> [N, D]
        return {OUTPUT: out}

    return embed, size, dim, {"onnxruntime": ort.__version__}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    embed, size, dim, versions = (openvino_embed if args.backend == "openvino" else onnxruntime_embed)(args)

    @batch
    def infer(images: np.ndarray) -> dict[str, np.ndarray]:
        return embed(images)

    image_input = Tensor(name=INPUT, dtype=np.float32, shape=(3, size, size))
    if args.decode_bundle:
        decode = png_decoder(args)

        @batch
        def infer(png: np.ndarray) -> dict[str, np.ndarray]:  # noqa: F811 - the PNG-bytes model instead
            return embed(decode(png))  # [N, 1] bytes -> [N, D]

        image_input = Tensor(name=PNG_INPUT, dtype=bytes, shape=(1,))

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
            inputs=[image_input],
            outputs=[Tensor(name=OUTPUT, dtype=np.float32, shape=(dim,))],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_delay_us),
            ),
            strict=False,
        )
        triton.connect()  # waits until the model is loaded
        print("\n" + json.dumps({"ready": True, "model": MODEL_NAME, "image_size": size, "embed_dim": dim,
                          **versions}), flush=True)
        while not stop.wait(0.5):
            if not triton.is_alive():
                print(json.dumps({"ready": False, "error": "tritonserver or its proxy died"}), flush=True)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
