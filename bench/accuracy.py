"""Zero-shot accuracy of the demo model measured through a running gateway, per class and template.

    python -m bench.accuracy --target 127.0.0.1:50050 [--per-class 25] [--seed 1000]

Generates the held-out synthetic set (a seed never used for training), sends every image as a
PNG to GatewayService/Classify with the class labels, and prints the markdown table the README
shows. Start the stack first (`make run` serves the demo bundle on 127.0.0.1:50050).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence

import grpc
import numpy as np
from PIL import Image

from engines.build import synthetic
from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2

EVAL_SEED = 1000  # held-out data set; training never uses it
TEMPLATES = ("{}", "an image showing {}")


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def classify_all(stub, images: np.ndarray, template: str, priority: int = types_pb2.PRIORITY_ROUTINE) -> np.ndarray:
    """Predicted class index per image, through one ClassifyStream."""
    labels = list(synthetic.CLASS_LABELS)

    def requests():
        for i, image in enumerate(images):
            request = gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=png(image)), priority=priority)
            if i == 0:
                request.labels.extend(labels)
                request.template = template
                request.top_k = 1
            yield gateway_pb2.ClassifyStreamRequest(correlation_id=str(i), request=request)

    predictions = np.full(len(images), -1, dtype=np.int64)
    for reply in stub.ClassifyStream(requests(), timeout=1800):
        if reply.HasField("error"):
            raise SystemExit(f"item {reply.correlation_id}: {reply.error.code} {reply.error.message}")
        predictions[int(reply.correlation_id)] = reply.result.top[0].index
    if (predictions < 0).any():
        raise SystemExit("some items got no answer")
    return predictions


def table(results: dict[str, np.ndarray], labels: np.ndarray) -> str:
    """Markdown: one row per class, one column per template, then the overall top-1."""
    header = "| class | " + " | ".join(f'`"{t}"`' for t in results) + " |"
    rows = [header, "|---|" + "---:|" * len(results)]
    for index, finding in enumerate(synthetic.FINDINGS):
        mask = labels == index
        cells = [f"{100 * (pred[mask] == index).mean():.0f} %" for pred in results.values()]
        rows.append(f"| {finding.label} ({mask.sum()}) | " + " | ".join(cells) + " |")
    overall = [f"**{100 * (pred == labels).mean():.1f} %**" for pred in results.values()]
    rows.append(f"| **all ({len(labels)})** | " + " | ".join(overall) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50050", help="gateway address")
    parser.add_argument("--per-class", type=int, default=25, help="held-out images per class")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out data set seed")
    parser.add_argument("--json", help="also write the per-image predictions here")
    args = parser.parse_args(argv)

    images, labels = synthetic.generate(args.seed, args.per_class * synthetic.NUM_CLASSES)
    with grpc.insecure_channel(args.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        info = stub.GetModelInfo(types_pb2.GetModelInfoRequest(), timeout=10).model
        results = {t: classify_all(stub, images, t) for t in TEMPLATES}
    engines = ", ".join(f"{types_pb2.Tower.Name(e.tower)}={e.engine}/{types_pb2.Precision.Name(e.precision)}"
                        for e in info.engines)
    print(f"bundle {info.bundle_id} ({engines}); held-out seed {args.seed}, {len(labels)} images\n")
    print(table(results, labels))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bundle_id": info.bundle_id, "labels": labels.tolist(),
                       "predictions": {t: p.tolist() for t, p in results.items()}}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
