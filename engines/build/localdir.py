"""Write and load open_clip `local-dir:` model folders (timm vision tower + HF BERT text tower) offline."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

# OpenAI CLIP normalisation, used by BiomedCLIP.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class LoadedModel:
    """An open_clip model ready for inference, with the preprocessing and tokenizer it was built with."""

    model: torch.nn.Module  # open_clip CustomTextCLIP, eval mode, fp32, CPU
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> [3, H, W] float32 (open_clip val transform)
    tokenizer: Any  # open_clip HFTokenizer: list[str] -> [N, context_length] int64
    preprocess_cfg: dict[str, Any]  # open_clip PreprocessCfg as a dict: size, mean, std, interpolation, ...
    origin: str = ""  # where the weights came from, for the bundle manifest


def open_clip_config(
    *,
    timm_model: str,
    embed_dim: int,
    text_dir: str,
    context_length: int,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int = 224,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
) -> dict[str, Any]:
    """The BiomedCLIP-shaped `open_clip_config.json` content.

    Vision: a timm model with its head removed (`timm_pool=""`, token pooling by the
    timm model itself) and a linear projection. Text: a HF BERT loaded from
    `text_dir` (config and tokenizer files), CLS token of the last hidden state,
    MLP projection.
    """
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {
                "timm_model_name": timm_model,
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": image_size,
            },
            "text_cfg": {
                "hf_model_name": text_dir,
                "hf_tokenizer_name": text_dir,
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": context_length,
            },
        },
        "preprocess_cfg": {
            "size": image_size,
            "mean": list(mean),
            "std": list(std),
            "interpolation": interpolation,
            "resize_mode": resize_mode,
        },
    }


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first: pad id 0, as in BERT


def build_wordpiece_vocab(
    texts: Sequence[str], dst: Path, *, vocab_size: int, lowercase: bool = True
) -> Path:
    """Build a BERT-style WordPiece vocabulary from `texts` offline and write it to `dst` (a vocab.txt).

    Texts are normalized and split exactly as BertTokenizerFast does (the `tokenizers`
    BERT normalizer and pre-tokenizer). The vocabulary is the special tokens ([PAD] first,
    so the pad id is 0), every character seen as a word start and as a `##` continuation
    (so any word over that alphabet tokenizes without [UNK]), then whole words by
    descending frequency, ties by spelling. Counting instead of the library's WordPiece
    trainer keeps the result identical from run to run: the trainer breaks ties between
    equally frequent merges in hash order.
    """
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    tokens = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    if len(tokens) > vocab_size:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the special tokens and alphabet ({len(tokens)})"
        )
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    tokens += words[: vocab_size - len(tokens)]
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(f"{token}\n" for token in tokens), encoding="utf-8")
    return dst


def write_text_files(
    dst: Path, *, bert: dict[str, Any], vocab_path: Path, context_length: int, lowercase: bool = True
) -> int:
    """Write a transformers BertConfig and WordPiece tokenizer files (tokenizer.json included) into `dst`.

    `bert` holds BertConfig keyword arguments (hidden_size, num_hidden_layers, ...).
    `vocab_size` defaults to the vocabulary's length and may not be smaller; the
    config's pad_token_id is set to the tokenizer's [PAD] id, which is what
    open_clip's text tower uses to build its attention mask. Returns the pad id.
    """
    from transformers import BertConfig, BertTokenizerFast

    dst.mkdir(parents=True, exist_ok=True)
    # `vocab=`, not `vocab_file=`: transformers 5 ignores the latter and builds a 5-token vocabulary.
    tokenizer = BertTokenizerFast(vocab=str(vocab_path), do_lower_case=lowercase)
    tokenizer.model_max_length = context_length
    n_vocab = len(tokenizer.get_vocab())
    if tokenizer.pad_token_id is None or tokenizer.convert_tokens_to_ids("[UNK]") is None:
        raise ValueError(f"vocabulary {vocab_path} lacks [PAD] or [UNK]")
    cfg = dict(bert)
    vocab_size = int(cfg.pop("vocab_size", n_vocab))
    if vocab_size < n_vocab:
        raise ValueError(f"bert vocab_size {vocab_size} is smaller than the vocabulary ({n_vocab} tokens)")
    max_positions = int(cfg.get("max_position_embeddings", 512))
    if context_length > max_positions:
        raise ValueError(f"context_length {context_length} exceeds max_position_embeddings {max_positions}")
    cfg["pad_token_id"] = tokenizer.pad_token_id
    BertConfig(vocab_size=vocab_size, **cfg).save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return int(tokenizer.pad_token_id)


def write_local_dir(
    dst: Path,
    *,
    timm_model: str,
    embed_dim: int,
    bert: dict[str, Any],
    vocab_path: Path,
    context_length: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    image_size: int = 224,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    lowercase: bool = True,
    weights_path: Path | None = None,
) -> Path:
    """Write an open_clip `local-dir:` folder for a BiomedCLIP-shaped model, without any network access.

    Args:
        dst: folder to write (created; existing files of the same names are overwritten).
        timm_model: timm model name of the vision tower, e.g. "vit_base_patch16_224" or "test_vit".
        embed_dim: shared embedding dimension of both towers.
        bert: BertConfig keyword arguments, e.g. {"hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512}.
        vocab_path: WordPiece vocab.txt (one token per line, with [PAD] [UNK] [CLS] [SEP] [MASK]).
        context_length: tokens per text (padded/truncated), at most max_position_embeddings.
        mean, std: per-channel image normalisation.
        image_size: square input side in pixels.
        interpolation, resize_mode: open_clip preprocessing options.
        lowercase: lowercase and strip accents when tokenizing (uncased vocabularies).
        weights_path: optional open_clip state dict (.safetensors) copied in as open_clip_model.safetensors;
            without it the model is built with random initial weights.

    Returns:
        `dst`, loadable with `load_local_dir(dst)` or `open_clip.create_model_and_transforms(
        "local-dir:" + str(dst), pretrained_text=False)`.
    """
    dst = Path(dst).resolve()
    dst.mkdir(parents=True, exist_ok=True)
    write_text_files(
        dst, bert=bert, vocab_path=Path(vocab_path), context_length=context_length, lowercase=lowercase
    )
    config = open_clip_config(
        timm_model=timm_model,
        embed_dim=embed_dim,
        text_dir=str(dst),
        context_length=context_length,
        mean=mean,
        std=std,
        image_size=image_size,
        interpolation=interpolation,
        resize_mode=resize_mode,
    )
    (dst / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if weights_path is not None:
        weights_path = Path(weights_path)
        if weights_path.suffix != ".safetensors":
            raise ValueError(f"weights must be a .safetensors open_clip state dict, got {weights_path}")
        shutil.copyfile(weights_path, dst / WEIGHTS_NAME)
    log.info("wrote open_clip local-dir %s (vision %s, embed %d)", dst, timm_model, embed_dim)
    return dst


def save_weights(model: torch.nn.Module, dst: Path) -> Path:
    """Save an open_clip model's state dict as `dst/open_clip_model.safetensors`: the folder then loads it."""
    from safetensors.torch import save_file

    path = Path(dst) / WEIGHTS_NAME
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path


def load_open_clip(model_id: str) -> LoadedModel:
    """Load an open_clip model ("local-dir:DIR" or "hf-hub:ORG/NAME") for fp32 CPU inference.

    Base text-tower weights are never fetched (`pretrained_text=False`): the weights
    are those of the folder's checkpoint, or random when it has none.
    """
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_id, pretrained_text=False)
    tokenizer = open_clip.get_tokenizer(model_id)
    model.eval()
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, preprocess_cfg=preprocess_cfg)


def load_local_dir(path: Path) -> LoadedModel:
    """Load a folder written by `write_local_dir` (with its weights if it has them)."""
    path = Path(path).resolve()
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} is not an open_clip local-dir folder: no {CONFIG_NAME}")
    return load_open_clip(f"local-dir:{path}")
