"""Zero-shot evaluation of the demo model on held-out synthetic images, per class and per prompt template."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from engines.build import demo, synthetic
from engines.build.localdir import OPENAI_MEAN, OPENAI_STD, WEIGHTS_NAME, load_local_dir

EVAL_SEED = 1000  # data set seed of the reported held-out evaluation; never used for training
PLAIN_TEMPLATE = "{}"  # the plain prompt: the class label alone, e.g. "left pleural effusion"
CHANGED_TEMPLATE = "an image showing {}"  # a template no training caption uses

Tokenizer = Callable[[list[str]], torch.Tensor]  # texts -> token ids [N, context_length]


@dataclasses.dataclass(frozen=True)
class ZeroShotResult:
    """Top-1 accuracy of one prompt template, overall and per class."""

    template: str
    top1: float
    per_class: tuple[float, ...]  # in synthetic.FINDINGS order
    predictions: np.ndarray  # int64 [N]


def normalize_uint8(images: np.ndarray | torch.Tensor, downsample: int = 1) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H/downsample, W/downsample] with the OpenAI CLIP mean/std.

    For 224 px generator output and no downsampling this equals open_clip's preprocessing
    (the resize and centre crop are identities), without a round trip through PIL.
    """
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()  # [N, 3, H, W], 0..255
    if downsample > 1:
        x = torch.nn.functional.avg_pool2d(x, downsample)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1) * 255.0
    return x.sub_(mean).div_(std)


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """L2-normalized image embeddings [N, D] of preprocessed images [N, 3, H, W]."""
    starts = range(0, len(images), batch_size)
    return torch.cat([model.encode_image(images[i:i + batch_size], normalize=True) for i in starts])


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalized text embeddings [N, D]."""
    return model.encode_text(tokenizer(list(texts)), normalize=True)


def zero_shot(model: torch.nn.Module, tokenizer: Tokenizer, image_features: torch.Tensor, labels: np.ndarray,
              templates: Sequence[str]) -> list[ZeroShotResult]:
    """Classify image features against every class label put into each template."""
    results = []
    for template in templates:
        text_features = encode_texts(model, tokenizer, [template.format(c) for c in synthetic.CLASS_LABELS])
        predictions = (image_features @ text_features.T).argmax(dim=1).numpy()
        correct = predictions == labels
        per_class = tuple(float(correct[labels == c].mean()) for c in range(synthetic.NUM_CLASSES))
        results.append(ZeroShotResult(template, float(correct.mean()), per_class, predictions))
    return results


def class_mean_probe(train_features: torch.Tensor, train_labels: np.ndarray, test_features: torch.Tensor,
                     test_labels: np.ndarray) -> ZeroShotResult:
    """Nearest-class-mean classifier on image features alone: can the image tower separate the classes?"""
    means = torch.stack([train_features[torch.as_tensor(train_labels == c)].mean(0)
                         for c in range(synthetic.NUM_CLASSES)])
    means = torch.nn.functional.normalize(means, dim=1)
    predictions = (test_features @ means.T).argmax(dim=1).numpy()
    correct = predictions == test_labels
    per_class = tuple(float(correct[test_labels == c].mean()) for c in range(synthetic.NUM_CLASSES))
    return ZeroShotResult("class-mean probe", float(correct.mean()), per_class, predictions)


def held_out_set(seed: int, per_class: int, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` generated images of every class from data set `seed` (uint8 [N, H, W, 3], labels [N])."""
    return synthetic.generate(seed, per_class * synthetic.NUM_CLASSES, workers=workers)


def evaluate(model_dir: Path, seed: int = EVAL_SEED, per_class: int = 25,
             templates: Sequence[str] = (PLAIN_TEMPLATE, CHANGED_TEMPLATE), workers: int = 1,
             probe_seed: int | None = None) -> list[ZeroShotResult]:
    """Zero-shot top-1 of an open_clip local-dir model on a held-out generated set.

    Images go through the model's own open_clip preprocessing (PIL), as a service would
    send them. With `probe_seed`, a nearest-class-mean probe fitted on that data set is appended.
    """
    loaded = load_local_dir(model_dir)
    images, labels = held_out_set(seed, per_class, workers)
    pixels = torch.stack([loaded.preprocess(Image.fromarray(im)) for im in images])
    features = encode_images(loaded.model, pixels)
    results = zero_shot(loaded.model, loaded.tokenizer, features, labels, templates)
    if probe_seed is not None:
        fit_images, fit_labels = held_out_set(probe_seed, per_class, workers)
        fit_features = encode_images(loaded.model, normalize_uint8(fit_images))
        results.append(class_mean_probe(fit_features, fit_labels, features, labels))
    return results


def format_table(results: Sequence[ZeroShotResult]) -> str:
    """A Markdown table: one row per class, one column per result, and the overall top-1."""
    head = "| class | " + " | ".join(f"`{r.template}`" for r in results) + " |"
    rule = "|---|" + "---:|" * len(results)
    rows = [f"| {label} | " + " | ".join(f"{100 * r.per_class[c]:.0f}" for r in results) + " |"
            for c, label in enumerate(synthetic.CLASS_LABELS)]
    total = "| **top-1** | " + " | ".join(f"**{100 * r.top1:.1f}**" for r in results) + " |"
    return "\n".join([head, rule, *rows, total])


def main(argv: list[str] | None = None) -> None:
    """CLI: evaluate committed (or other) demo weights and print the per-class table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, default=demo.WEIGHTS_DIR,
                        help="folder with recipe.json, vocab.txt and open_clip_model.safetensors")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="data set seed of the held-out images")
    parser.add_argument("--per-class", type=int, default=25, help="held-out images per class")
    parser.add_argument("--workers", type=int, default=2, help="processes generating images")
    parser.add_argument("--probe", action="store_true",
                        help="add a nearest-class-mean probe on image features (fitted on seed + 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = demo.write_demo_dir(demo.load_recipe(args.weights), Path(tmp) / "demo",
                                        args.weights / demo.VOCAB_NAME, args.weights / WEIGHTS_NAME)
        results = evaluate(model_dir, args.seed, args.per_class, workers=args.workers,
                           probe_seed=args.seed + 1 if args.probe else None)
    print(f"held-out seed {args.seed}, {args.per_class * synthetic.NUM_CLASSES} images")
    print(format_table(results))


if __name__ == "__main__":
    main()
