"""The demo model: a small BiomedCLIP-shaped model trained on synthetic images, with committed weights."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from engines.build.localdir import WEIGHTS_NAME, write_local_dir

log = logging.getLogger(__name__)

DEMO_VERSION = "synthetic-1"
DEMO_DESCRIPTION = (
    "Synthetic demo model, NOT for clinical use: a small BiomedCLIP-shaped CLIP model (timm ViT + BERT) "
    "trained offline on procedurally generated chest-radiograph-, dermoscopy- and fundus-like images. "
    "Its answers only reflect the synthetic generator and mean nothing for real patients."
)
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights" / "demo"
RECIPE_NAME = "recipe.json"
VOCAB_NAME = "vocab.txt"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Shapes and training settings that, with the code, determine the demo weights."""

    seed: int = 0
    # Model.
    timm_model: str = "test_vit"
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 2
    text_mlp: int = 512
    text_dropout: float = 0.1
    context_length: int = 64
    vocab_size: int = 2000  # an upper bound: the caption corpus yields fewer tokens
    # Training.
    train_images: int = 12000
    steps: int = 1200
    batch_size: int = 64
    captions_per_class: int = 2  # captions of each class in every batch
    text_text_weight: float = 1.0  # weight of the caption-caption same-class loss
    image_image_weight: float = 1.0  # weight of the image-image same-class loss
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 60
    sincos_init: bool = True  # start the learned ViT position embedding from a 2-D sine-cosine table
    low_res_steps: int = 900  # the first steps see images average-pooled to half size (4x cheaper)
    full_res_lr: float = 6e-4  # peak learning rate of the full-resolution phase that follows
    init_logit_scale: float = 14.3  # exp() applied: cosine multiplier at the start
    max_logit_scale: float = 100.0
    threads: int = 1  # one thread: on a shared 2-core machine, two threads often wait on each other

    def bert(self) -> dict[str, Any]:
        """BertConfig keyword arguments of the text tower."""
        return {
            "hidden_size": self.text_width,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.text_heads,
            "intermediate_size": self.text_mlp,
            "hidden_dropout_prob": self.text_dropout,
            "attention_probs_dropout_prob": self.text_dropout,
            "max_position_embeddings": self.context_length,
        }

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Recipe":
        """The recipe of a dict written by `to_json` (unknown keys are an error)."""
        return cls(**data)


def load_recipe(weights_dir: Path = WEIGHTS_DIR) -> Recipe:
    """The recipe stored beside trained weights."""
    data = json.loads((Path(weights_dir) / RECIPE_NAME).read_text())
    return Recipe.from_json(data["recipe"])


def write_demo_dir(recipe: Recipe, dst: Path, vocab_path: Path, weights_path: Path | None = None) -> Path:
    """Write an open_clip local-dir folder of the demo shapes (random weights unless `weights_path`)."""
    return write_local_dir(
        dst,
        timm_model=recipe.timm_model,
        embed_dim=recipe.embed_dim,
        bert=recipe.bert(),
        vocab_path=vocab_path,
        context_length=recipe.context_length,
        weights_path=weights_path,
    )


def prepare(workdir: Path) -> Path:
    """Return an open_clip local-dir folder of the demo model with its committed trained weights.

    The folder (`workdir/demo-<version>`) is rewritten on every call, which takes well under a
    second; nothing is trained here.
    """
    weights = WEIGHTS_DIR / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"demo weights missing: {weights} (its README.md says how to train them)")
    dst = Path(workdir).resolve() / f"demo-{DEMO_VERSION}"
    log.info("writing demo model folder %s from %s", dst, WEIGHTS_DIR)
    return write_demo_dir(load_recipe(), dst, WEIGHTS_DIR / VOCAB_NAME, weights)
