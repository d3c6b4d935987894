"""Train the demo model on synthetic images, reproducibly from a seed (CPU, fixed threads and data order)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engines.build import demo, demo_eval, synthetic
from engines.build.localdir import (WEIGHTS_NAME, LoadedModel, build_wordpiece_vocab, load_local_dir,
                                    save_weights)

log = logging.getLogger(__name__)

VALIDATION_SEED = 999  # data set seed of the small validation set logged during training
CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "demo"


def cached_images(seed: int, count: int, workers: int,
                  cache_dir: Path = CACHE_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Training images uint8 [count, H, W, 3] (memory-mapped) and labels, generated once into a .npy cache."""
    path = cache_dir / f"synthetic-v{synthetic.GENERATOR_VERSION}-seed{seed}-n{count}.npy"
    labels = np.arange(count, dtype=np.int64) % synthetic.NUM_CLASSES
    if path.is_file():
        log.info("using cached training images %s", path)
    else:
        start = time.perf_counter()
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        synthetic.write_npy(seed, count, tmp, workers=workers)
        tmp.replace(path)
        log.info("generated %d training images in %.1f s", count, time.perf_counter() - start)
    return np.load(path, mmap_mode="r"), labels


def multi_positive_loss(a: torch.Tensor, b: torch.Tensor, a_labels: torch.Tensor, b_labels: torch.Tensor,
                        logit_scale: torch.Tensor, same_set: bool = False) -> torch.Tensor:
    """Symmetric contrastive loss where every pair of the same class is a positive (soft targets).

    a [A, D] and b [B, D] are L2-normalized. Each row of a spreads its target mass equally
    over the items of b with its class, and each item of b over the rows of a with its
    class; items without a positive are skipped. With `same_set` (a is b), self-pairs are
    neither positives nor candidates.
    """
    logits = logit_scale * a @ b.T  # [A, B]
    positive = (a_labels[:, None] == b_labels[None, :]).float()  # [A, B]
    if same_set:
        eye = torch.eye(len(a), dtype=torch.bool)
        logits = logits.masked_fill(eye, -1e4)
        positive = positive.masked_fill(eye, 0.0)
    return (_soft_cross_entropy(logits, positive) + _soft_cross_entropy(logits.T, positive.T)) / 2


def _soft_cross_entropy(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows that have a positive of the cross-entropy against uniform weights on the positives."""
    rows = positive.sum(1) > 0
    target = positive[rows] / positive[rows].sum(1, keepdim=True)
    return -(target * logits[rows].log_softmax(1)).sum(1).mean()


def demo_loss(image_features: torch.Tensor, text_features: torch.Tensor, image_labels: torch.Tensor,
              text_labels: torch.Tensor, logit_scale: torch.Tensor, recipe: demo.Recipe) -> torch.Tensor:
    """Image-text loss, plus same-class terms within captions and within images.

    In a CLIP trained from scratch, classes that look alike start with near-identical image
    features, which make their captions collapse too, and neither side then has a gradient
    to separate them. The caption-caption term keeps the class prototypes apart (and makes
    captions of one class agree across templates); the image-image term pulls images of one
    class together and pushes the others away directly.
    """
    loss = multi_positive_loss(image_features, text_features, image_labels, text_labels, logit_scale)
    if recipe.text_text_weight:
        loss = loss + recipe.text_text_weight * multi_positive_loss(
            text_features, text_features, text_labels, text_labels, logit_scale, same_set=True)
    if recipe.image_image_weight:
        loss = loss + recipe.image_image_weight * multi_positive_loss(
            image_features, image_features, image_labels, image_labels, logit_scale, same_set=True)
    return loss


def sincos_position_embedding(grid: tuple[int, int], dim: int, prefix_tokens: int,
                               temperature: float = 10.0) -> torch.Tensor:
    """A 2-D sine-cosine position embedding [1, prefix_tokens + H*W, dim]; prefix tokens get zeros.

    Used as the initial value of the ViT's learned position embedding: timm's default
    (std 0.02) is about 30x weaker than the patch tokens, and a from-scratch model then
    needs hundreds of steps before it can tell left from right. A low temperature spreads
    the frequencies over a grid of only ten or so patches.
    """
    quarter = dim // 4
    omega = temperature ** (-torch.arange(quarter, dtype=torch.float32) / quarter)  # [dim/4]
    rows, cols = (torch.arange(n, dtype=torch.float32) for n in grid)
    ys, xs = torch.meshgrid(rows, cols, indexing="ij")
    phases = [c.flatten()[:, None] * omega[None, :] for c in (ys, xs)]  # 2 x [H*W, dim/4]
    table = torch.cat([f(p) for p in phases for f in (torch.sin, torch.cos)], dim=1)  # [H*W, dim]
    return torch.cat([torch.zeros(prefix_tokens, dim), table])[None]


def lr_at(step: int, recipe: demo.Recipe) -> float:
    """Two phases, each a linear warmup and a cosine decay to zero: half resolution, then full resolution."""
    if step < recipe.low_res_steps:
        return _warmup_cosine(step, recipe.low_res_steps, recipe.warmup_steps, recipe.lr)
    full_steps = recipe.steps - recipe.low_res_steps
    warmup = max(1, full_steps // 10) if recipe.low_res_steps else recipe.warmup_steps
    peak = recipe.full_res_lr if recipe.low_res_steps else recipe.lr
    return _warmup_cosine(step - recipe.low_res_steps, full_steps, warmup, peak)


def _warmup_cosine(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embed" in name or "logit_scale" in name or "token" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(recipe: demo.Recipe, vocab: Path) -> LoadedModel:
    """A freshly initialized demo model, built through open_clip's local-dir loader (seeded)."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(recipe.seed)
        loaded = load_local_dir(demo.write_demo_dir(recipe, Path(tmp) / "demo", vocab))
    with torch.no_grad():
        loaded.model.logit_scale.fill_(math.log(recipe.init_logit_scale))
        if recipe.sincos_init:
            trunk = loaded.model.visual.trunk
            prefix = 0 if trunk.no_embed_class else trunk.num_prefix_tokens
            table = sincos_position_embedding(trunk.patch_embed.grid_size, trunk.embed_dim, prefix)
            trunk.pos_embed.copy_(table)
    loaded.model.train()
    return loaded


def train(recipe: demo.Recipe, out: Path, workers: int = 2, log_every: int = 50,
          validate_every: int = 300) -> dict:
    """Train the demo model and write recipe.json, vocab.txt and open_clip_model.safetensors into `out`.

    Deterministic for a given recipe, code and thread count: initial weights, data, data
    order and caption draws all derive from `recipe.seed`. Sets torch's thread count and
    deterministic mode for the process. Returns the run record stored in recipe.json.
    """
    if recipe.seed in (VALIDATION_SEED, demo_eval.EVAL_SEED):
        raise ValueError(f"seed {recipe.seed} is reserved for held-out data")
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    wall_start, cpu_start = time.perf_counter(), time.process_time()

    vocab = build_wordpiece_vocab(synthetic.all_captions(), out / demo.VOCAB_NAME,
                                  vocab_size=recipe.vocab_size)
    images, labels = cached_images(recipe.seed, recipe.train_images, workers)
    val_images, val_labels = demo_eval.held_out_set(VALIDATION_SEED, 10)
    val_pixels = {d: demo_eval.normalize_uint8(val_images, d) for d in (1, 2)}
    loaded = build_model(recipe, vocab)
    model, tokenizer = loaded.model, loaded.tokenizer
    pad_id = model.text.config.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s + BERT %dx%d, %.2f M parameters", recipe.timm_model, recipe.text_layers,
             recipe.text_width, n_params / 1e6)

    optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    order = torch.Generator().manual_seed(recipe.seed)
    captions_rng = np.random.default_rng([recipe.seed, 1])
    text_labels = torch.arange(synthetic.NUM_CLASSES).repeat_interleave(recipe.captions_per_class)  # [T]
    perm, cursor = torch.randperm(len(images), generator=order), 0
    losses, history = [], []
    train_start = time.perf_counter()
    for step in range(recipe.steps):
        if cursor + recipe.batch_size > len(perm):
            perm, cursor = torch.randperm(len(images), generator=order), 0
        idx = perm[cursor:cursor + recipe.batch_size].sort().values.numpy()
        cursor += recipe.batch_size
        # [B, 3, 224, 224], or [B, 3, 112, 112] early on: the ViT resamples its position embedding.
        downsample = 2 if step < recipe.low_res_steps else 1
        pixels = demo_eval.normalize_uint8(np.asarray(images[idx]), downsample)
        tokens = tokenizer([synthetic.caption(int(c), captions_rng) for c in text_labels])  # [T, context]
        tokens = tokens[:, :int((tokens != pad_id).sum(1).max())]  # all-pad columns change nothing: drop them
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)

        image_features = F.normalize(model.encode_image(pixels), dim=-1)  # [B, D]
        text_features = F.normalize(model.encode_text(tokens), dim=-1)  # [T, D]
        loss = demo_loss(image_features, text_features, torch.as_tensor(labels[idx]), text_labels,
                         model.logit_scale.exp(), recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(recipe.max_logit_scale))
        losses.append(loss.item())

        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            rate = (step + 1) * recipe.batch_size / (time.perf_counter() - train_start)
            log.info("step %d/%d loss %.4f scale %.1f lr %.2e %.0f img/s", step + 1, recipe.steps,
                     float(np.mean(losses[-log_every:])), model.logit_scale.exp().item(), lr_at(step, recipe),
                     rate)
        if (step + 1) % validate_every == 0 or step + 1 == recipe.steps:
            model.eval()
            features = demo_eval.encode_images(model, val_pixels[downsample])
            val = demo_eval.zero_shot(model, tokenizer, features, val_labels, (demo_eval.PLAIN_TEMPLATE,))[0]
            model.train()
            history.append({"step": step + 1, "pixels": 224 // downsample, "val_top1": round(val.top1, 4)})
            log.info("step %d validation top-1 %.1f %% (seed %d, %d images); worst classes %s", step + 1,
                     100 * val.top1, VALIDATION_SEED, len(val_labels),
                     sorted(zip(val.per_class, synthetic.CLASS_KEYS))[:3])

    model.eval()
    save_weights(model, out)
    record = {
        "recipe": recipe.to_json(),
        "generator_version": synthetic.GENERATOR_VERSION,
        "parameters": n_params,
        "first_losses": [round(x, 6) for x in losses[:10]],
        "final_loss": round(float(np.mean(losses[-log_every:])), 6),
        "validation": history,
        "seconds": {"total": round(time.perf_counter() - wall_start, 1),
                    "training_loop": round(time.perf_counter() - train_start, 1),
                    "cpu_main_process": round(time.process_time() - cpu_start, 1)},
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": recipe.threads,
                    "generation_workers": workers, "torch": torch.__version__},
    }
    (out / demo.RECIPE_NAME).write_text(json.dumps(record, indent=2) + "\n")
    log.info("wrote %s (%.1f min in all)", out, record["seconds"]["total"] / 60)
    return record


def parse_overrides(defaults: demo.Recipe, items: list[str]) -> dict:
    """Recipe fields from FIELD=VALUE strings, converted to the type of the default."""
    overrides = {}
    for item in items:
        name, _, value = item.partition("=")
        if not hasattr(defaults, name):
            raise ValueError(f"unknown recipe field {name!r}")
        kind = type(getattr(defaults, name))
        overrides[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return overrides


def main(argv: list[str] | None = None) -> None:
    """CLI: train and write the weights folder; optionally evaluate it on the held-out set."""
    defaults = demo.Recipe()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of weights, data and order")
    parser.add_argument("--out", type=Path, default=demo.WEIGHTS_DIR, help="folder for the weights")
    parser.add_argument("--workers", type=int, default=2, help="processes generating the training images")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a recipe field (experiments only), e.g. --set steps=600")
    parser.add_argument("--validate-every", type=int, default=300, help="steps between validation logs")
    parser.add_argument("--eval", action="store_true", help="evaluate on the held-out set afterwards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        recipe = dataclasses.replace(defaults, seed=args.seed, **parse_overrides(defaults, args.set))
    except ValueError as exc:
        parser.error(str(exc))
    record = train(recipe, args.out, workers=args.workers, validate_every=args.validate_every)
    print(f"trained in {record['seconds']['total'] / 60:.1f} min; weights in {args.out}")
    if args.eval:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = demo.write_demo_dir(recipe, Path(tmp) / "demo", args.out / demo.VOCAB_NAME,
                                            args.out / WEIGHTS_NAME)
            results = demo_eval.evaluate(model_dir, workers=args.workers)
        print(demo_eval.format_table(results))


if __name__ == "__main__":
    main()
